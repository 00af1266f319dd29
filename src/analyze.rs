//! Analyze: sensor views → symptoms. Pure: a function of its inputs and `now`.
//!
//! Each symptom has an open condition and a separate, weaker close condition
//! (hysteresis): `is_open` tells whether an incident for that key is open, and
//! an open symptom stays active until its close condition holds.

mod control_plane;
mod handshake;

pub use control_plane::{control_plane, debug_view, explain_refusals};
pub use handshake::{HandshakeInput, handshakes, remediable};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;

use crate::clock::{saturating_since, unix_millis};
use crate::model::{
    AgentDebugView, AgentView, HealthView, NO_IDENTITY, Role, Severity, StreamStatus, Subject,
    SvidObservation, Symptom, SymptomKey, SymptomKind,
};
use crate::policy::Thresholds;

/// What the agents' own processes say beside their Workload API streams:
/// their Debug APIs (admin sockets) and `/live` probes. A stopped agent
/// keeps its established stream open and silent, as a healthy one is
/// between rotations; only these tell that its process no longer answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalSignals<'a> {
    /// `agent_debug` views.
    pub debug: &'a [Arc<AgentDebugView>],
    /// `health` views (only those of agents are read).
    pub health: &'a [Arc<HealthView>],
}

/// Symptoms present at `now`.
pub fn analyze<V: std::borrow::Borrow<AgentView>>(
    views: &[V],
    local: &LocalSignals<'_>,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
) -> Vec<Symptom> {
    // Only agents whose Debug API times out now matter: none, normally, and
    // then nothing is allocated.
    let unanswered: HashMap<&str, &AgentDebugView> = local
        .debug
        .iter()
        .filter(|d| d.unanswered_since.is_some())
        .map(|d| (d.agent.as_str(), &**d))
        .collect();
    let mut out = Vec::new();
    for view in views {
        let view = view.borrow();
        let hung = unanswered
            .get(view.agent.as_str())
            .map(|d| Hung::judge(view, d, local.health, th, now));
        agent_symptoms(view, hung.as_ref(), is_open, th, now, &mut out);
    }
    out
}

/// An agent whose Debug API times out: whether that says its process no
/// longer answers (`confirmed`), and the evidence.
struct Hung {
    /// Unanswered for `hung_after` up to the last poll, nothing on the
    /// stream since, and no `/live` answer since.
    confirmed: bool,
    /// The stream or `/live` answered after the Debug API stopped: the
    /// process answers, only its admin API is slow.
    answering: bool,
    /// The Debug view is older than `max_staleness`.
    blind: bool,
    evidence: serde_json::Value,
}

impl Hung {
    /// Judges the agent of `view` whose Debug API `d` has not answered since
    /// `d.unanswered_since`. The time unanswered is taken up to the latest
    /// poll (`d.updated_at`), not `now`: only polls that really timed out
    /// count, so a single slow answer never reaches `hung_after`.
    fn judge(
        view: &AgentView,
        d: &AgentDebugView,
        health: &[Arc<HealthView>],
        th: &Thresholds,
        now: SystemTime,
    ) -> Self {
        let since = d.unanswered_since.unwrap_or(d.updated_at);
        let unanswered_for = saturating_since(d.updated_at, since);
        // The stream delivered something after the Debug API stopped
        // answering: the process answers, only its admin API is slow.
        let stream_answered = view.last_message.is_some_and(|m| m > since);
        // `/live` answered after that: likewise. A failing or unprobed
        // `/live` adds nothing against it.
        let live = health
            .iter()
            .find(|h| h.role == Role::Agent && h.target == view.agent);
        let live_answered = live.is_some_and(|h| h.live == Some(true) && h.updated_at > since);
        let answering = stream_answered || live_answered;
        Self {
            confirmed: unanswered_for >= th.hung_after && !answering,
            answering,
            blind: saturating_since(now, d.updated_at) > th.max_staleness,
            evidence: json!({
                "signal": "debug_api_unanswered",
                "debug_unanswered_since_ms": unix_millis(since),
                "debug_unanswered_for_ms": unanswered_for.as_millis() as u64,
                "debug_last_error": d.last_error,
                "live": live.map(|h| h.live),
                "live_error": live.and_then(|h| h.last_error.clone()),
            }),
        }
    }
}

fn agent_symptoms(
    view: &AgentView,
    hung: Option<&Hung>,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
    out: &mut Vec<Symptom>,
) {
    let blind = saturating_since(now, view.updated_at) > th.max_staleness;

    // An agent that is up, and whose Debug API answers (or is not watched),
    // has neither stream symptom, so no key is built: this runs for every
    // agent on every tick.
    if view.status == StreamStatus::Up && hung.is_none() {
        return svid_symptoms(view, true, is_open, th, now, blind, out);
    }
    // identity_not_issued: the agent answers that it has no identity for us
    // (and we are retrying since). It answers, so it is not unreachable,
    // and no restart can issue a missing entry. An agent that has just
    // started or attested answers so until its first sync delivers our
    // entry: only a refusal that lasts `identity_grace` is a diagnosis, and
    // until then an open agent_unreachable stays as it is.
    let refused = view.status == StreamStatus::NoIdentity
        || (view.status == StreamStatus::Connecting
            && view.last_error.as_deref() == Some(NO_IDENTITY));
    let identity_key = SymptomKey {
        kind: SymptomKind::IdentityNotIssued,
        subject: Subject::agent(&view.agent),
    };
    let no_identity = refused
        && (saturating_since(now, view.status_since) >= th.identity_grace
            || is_open(&identity_key));
    if no_identity {
        out.push(Symptom {
            kind: identity_key.kind,
            subject: identity_key.subject,
            severity: Severity::Critical,
            predicted_outage: None,
            evidence: json!({
                "stream": view.status.as_str(),
                "since_ms": unix_millis(view.status_since),
                "last_error": view.last_error,
                "cause": "no registration entry matches our selectors",
            }),
            blind,
        });
    }
    // agent_unreachable: opens after `unreachable_after` in a failed state,
    // or while the stream looks up or connecting when the agent's Debug API
    // has not answered for `hung_after` (a stopped agent: its established
    // stream is merely silent). Closes only once the stream is up again and
    // the process answers: its Debug API no longer times out, or the stream
    // or `/live` answered since it did (Connecting keeps it open). The two
    // are disjoint.
    let failed_stream = matches!(
        view.status,
        StreamStatus::Down | StreamStatus::Unanswered | StreamStatus::Rejected
    );
    let unreachable = (!no_identity).then(|| {
        let key = SymptomKey {
            kind: SymptomKind::AgentUnreachable,
            subject: Subject::agent(&view.agent),
        };
        let failed_for = saturating_since(now, view.status_since);
        let open_if = (failed_stream && failed_for >= th.unreachable_after)
            || hung.is_some_and(|h| h.confirmed);
        let close_if = view.status == StreamStatus::Up && hung.is_none_or(|h| h.answering);
        let active = open_if || (!close_if && is_open(&key));
        (key, active)
    });
    if let Some((key, true)) = unreachable {
        // Earliest notAfter among what the agent last served: when it stops
        // renewing, that is when workloads lose mTLS.
        let earliest_expiry = view
            .svids
            .iter()
            .filter(|s| !s.serial.is_empty())
            .map(|s| s.not_after)
            .min();
        let mut evidence = json!({
            "stream": view.status.as_str(),
            "since_ms": unix_millis(view.status_since),
            "last_error": view.last_error,
            "last_message_ms": view.last_message.map(unix_millis),
            "cached_svids": view.svids.len(),
        });
        // What the Debug API says, when it times out; the symptom rests on
        // it (and is blind with it) only while the stream itself is up.
        let mut hung_blind = false;
        if let Some(h) = hung {
            if let (Some(e), Some(more)) = (evidence.as_object_mut(), h.evidence.as_object()) {
                e.extend(more.clone());
            }
            hung_blind = h.blind && !failed_stream;
        }
        out.push(Symptom {
            kind: key.kind,
            subject: key.subject,
            severity: if earliest_expiry.is_some_and(|t| t <= now) {
                Severity::Critical
            } else {
                Severity::Warning
            },
            predicted_outage: earliest_expiry,
            evidence,
            blind: blind || hung_blind,
        });
    }

    // SVIDs a stream that is up serves are judged as ever, whatever the
    // Debug API says.
    let served = view.status == StreamStatus::Up;
    svid_symptoms(view, served, is_open, th, now, blind, out);
}

/// The share of `svid`'s lifetime past which it is overdue:
/// `rotation_overdue_open` plus `rotation_check_slack` (SPIRE only rotates
/// when it looks, up to a check period after the point), at most a tenth
/// of the lifetime.
fn overdue_open(svid: &SvidObservation, th: &Thresholds) -> f64 {
    th.rotation_overdue_open + th.rotation_slack_share(svid.lifetime())
}

/// Lifetime and validity symptoms of the SVIDs the agent serves us.
///
/// Only what is `served` now is judged: while the stream is not up, the
/// SVIDs last served are remembered (for the predicted outage) but open no
/// incident and clear none; what is wrong then is the stream, and an open
/// lifetime incident waits for the next answer.
fn svid_symptoms(
    view: &AgentView,
    served: bool,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
    blind: bool,
    out: &mut Vec<Symptom>,
) {
    let quiet_below = th
        .expiring_close
        .min(th.expiring_open)
        .min(th.rotation_overdue_close)
        .min(th.rotation_overdue_open);
    for svid in &view.svids {
        // A leaf that did not parse has no lifetime: only svid_invalid applies.
        let timed = !svid.serial.is_empty();
        let frac = svid.elapsed_fraction(now);
        let expired = timed && now >= svid.not_after;
        // The common case, a valid SVID early in its life: below every
        // threshold, every close condition holds and no open condition does.
        if timed && !expired && svid.invalid.is_none() && frac < quiet_below {
            continue;
        }
        let checks = [
            (
                SymptomKind::SvidExpired,
                expired,
                !expired,
                Severity::Critical,
            ),
            (
                SymptomKind::SvidExpiring,
                timed && !expired && frac >= th.expiring_open,
                expired || frac < th.expiring_close,
                Severity::Critical,
            ),
            (
                SymptomKind::SvidRotationOverdue,
                timed && !expired && frac >= overdue_open(svid, th),
                expired || frac < th.rotation_overdue_close,
                Severity::Warning,
            ),
            (
                SymptomKind::SvidInvalid,
                svid.invalid.is_some(),
                svid.invalid.is_none(),
                Severity::Critical,
            ),
        ];
        for (kind, open_if, close_if, severity) in checks {
            let (open_if, close_if) = if served {
                (open_if, close_if)
            } else {
                (false, false)
            };
            // The open and close conditions are disjoint, so the incident
            // state matters only inside the hysteresis band (neither holds).
            // Subjects are built only then or when active: this runs for
            // every SVID of the fleet on every tick.
            if !open_if && close_if {
                continue;
            }
            let key = SymptomKey {
                kind,
                subject: Subject::svid(&view.agent, &svid.spiffe_id),
            };
            if !open_if && !is_open(&key) {
                continue;
            }
            let mut evidence = json!({
                "serial": svid.serial,
                "not_before_ms": unix_millis(svid.not_before),
                "not_after_ms": unix_millis(svid.not_after),
                "elapsed_fraction": (frac * 1000.0).round() / 1000.0,
                "stream": view.status.as_str(),
            });
            if kind == SymptomKind::SvidInvalid
                && let Some(problem) = &svid.invalid
            {
                evidence["problem"] = json!(problem);
            }
            out.push(Symptom {
                kind,
                subject: key.subject,
                severity,
                predicted_outage: timed.then_some(svid.not_after),
                evidence,
                blind,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SvidObservation;
    use crate::policy::Policy;
    use std::collections::HashSet;
    use std::time::{Duration, UNIX_EPOCH};

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn th() -> Thresholds {
        // The tables below were written for the rotation point itself;
        // `rotation_check_slack` has tests of its own.
        Thresholds {
            rotation_check_slack: Duration::ZERO,
            ..Policy::builtin().unwrap().thresholds
        }
    }

    /// A view of agent `a` serving one SVID valid from t(0) to t(100).
    fn view(status: StreamStatus, since: u64, updated: u64) -> AgentView {
        AgentView {
            agent: "a".into(),
            status,
            status_since: t(since),
            last_error: None,
            last_message: Some(t(0)),
            svids: vec![SvidObservation {
                spiffe_id: "spiffe://td/w".into(),
                serial: "0a".into(),
                not_before: t(0),
                not_after: t(100),
                invalid: None,
                first_seen: t(0),
                issuer: String::new(),
            }],
            bundle_authorities: 1,
            bundle: Vec::new(),
            rotations: 0,
            updated_at: t(updated),
        }
    }

    const NO_LOCAL: LocalSignals<'static> = LocalSignals {
        debug: &[],
        health: &[],
    };

    fn kinds(symptoms: &[Symptom]) -> Vec<SymptomKind> {
        let mut k: Vec<_> = symptoms.iter().map(|s| s.kind).collect();
        k.sort();
        k
    }

    fn open_set(keys: &[(SymptomKind, Subject)]) -> HashSet<SymptomKey> {
        keys.iter()
            .map(|(kind, subject)| SymptomKey {
                kind: *kind,
                subject: subject.clone(),
            })
            .collect()
    }

    #[test]
    fn svid_lifecycle_table() {
        use SymptomKind::*;
        let none: HashSet<SymptomKey> = HashSet::new();
        // (seconds into a 100 s lifetime, expected symptoms with nothing open)
        let cases: &[(u64, &[SymptomKind])] = &[
            (10, &[]),
            (50, &[]),
            (64, &[]),
            (65, &[SvidRotationOverdue]),
            (85, &[SvidRotationOverdue, SvidExpiring]),
            (100, &[SvidExpired]),
            (150, &[SvidExpired]),
        ];
        for (at, want) in cases {
            let v = view(StreamStatus::Up, 0, *at);
            let got = analyze(&[v], &NO_LOCAL, &|k| none.contains(k), &th(), t(*at));
            assert_eq!(kinds(&got), want.to_vec(), "at {at}s");
        }
    }

    /// Short SVIDs: SPIRE rotates only when it looks (every sync, 5 s), so
    /// a healthy 30 s SVID (40 s from its backdated notBefore) may still be
    /// served at 0.675 of its lifetime; the check slack (10 s, at most a
    /// tenth of the lifetime: 4 s here) keeps that quiet, and overdue still
    /// opens well before expiring (0.85).
    #[test]
    fn overdue_waits_for_the_check_slack_on_short_svids() {
        let builtin = Policy::builtin().unwrap().thresholds;
        assert_eq!(builtin.rotation_check_slack, Duration::from_secs(10));
        let mut v = view(StreamStatus::Up, 0, 27);
        v.svids[0].not_after = t(40);
        // (seconds from notBefore, overdue?): the point is 0.65 × 40 = 26 s.
        for (at, want) in [(26, false), (27, false), (29, false), (30, true)] {
            v.updated_at = t(at);
            let got = analyze(
                std::slice::from_ref(&v),
                &NO_LOCAL,
                &|_| false,
                &builtin,
                t(at),
            );
            let overdue = got
                .iter()
                .any(|s| s.kind == SymptomKind::SvidRotationOverdue);
            assert_eq!(overdue, want, "at {at}s");
        }
        // A 1 h SVID: 10 s is 0.3 % of its lifetime.
        let mut v = view(StreamStatus::Up, 0, 0);
        v.svids[0].not_after = t(3600);
        let at = 2340 + 11; // 0.65 × 3600 = 2340 s, plus the slack
        v.updated_at = t(at);
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &builtin, t(at));
        assert_eq!(kinds(&got), vec![SymptomKind::SvidRotationOverdue]);
    }

    #[test]
    fn overdue_has_hysteresis() {
        let subject = Subject::svid("a", "spiffe://td/w");
        let open = open_set(&[(SymptomKind::SvidRotationOverdue, subject)]);
        // Open incident stays active between close (0.6) and open (0.65).
        let v = view(StreamStatus::Up, 0, 62);
        let got = analyze(
            std::slice::from_ref(&v),
            &NO_LOCAL,
            &|k| open.contains(k),
            &th(),
            t(62),
        );
        assert_eq!(kinds(&got), vec![SymptomKind::SvidRotationOverdue]);
        // Not open: does not open at 0.62.
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(62));
        assert!(got.is_empty());
        // Closes once a new serial makes the share drop below 0.6.
        let mut fresh = view(StreamStatus::Up, 0, 70);
        fresh.svids[0].not_before = t(60);
        fresh.svids[0].not_after = t(160);
        let got = analyze(&[fresh], &NO_LOCAL, &|k| open.contains(k), &th(), t(70));
        assert!(got.is_empty());
    }

    #[test]
    fn unreachable_opens_on_failure_and_closes_only_when_up() {
        let key_open = open_set(&[(SymptomKind::AgentUnreachable, Subject::agent("a"))]);
        for (status, open, want) in [
            (StreamStatus::Down, false, true),
            (StreamStatus::Unanswered, false, true),
            (StreamStatus::Rejected, false, true),
            (StreamStatus::Connecting, false, false),
            (StreamStatus::Connecting, true, true),
            (StreamStatus::Up, true, false),
        ] {
            let v = view(status, 20, 21);
            let got = analyze(
                &[v],
                &NO_LOCAL,
                &|k| open && key_open.contains(k),
                &th(),
                t(21),
            );
            assert_eq!(
                got.iter().any(|s| s.kind == SymptomKind::AgentUnreachable),
                want,
                "{status:?} open={open}"
            );
        }
    }

    /// The Debug view of agent `a`: timed out since `since` (None: answered
    /// or refused), refreshed at `updated`.
    fn debug(since: Option<u64>, updated: u64, last_error: Option<&str>) -> Arc<AgentDebugView> {
        Arc::new(AgentDebugView {
            agent: "a".into(),
            reachable: last_error.is_none(),
            last_error: last_error.map(str::to_string),
            unanswered_since: since.map(t),
            updated_at: t(updated),
            last_sync_success: None,
            answered_after: None,
            uptime_secs: 0,
            cached_x509_svids: 0,
            spiffe_id: None,
            svid_expires_at: None,
        })
    }

    /// Agent `a`'s `/live` as probed at `updated`.
    fn live(live: Option<bool>, updated: u64) -> Arc<HealthView> {
        Arc::new(HealthView {
            target: "a".into(),
            role: Role::Agent,
            live,
            ready: live,
            last_error: live.is_none().then(|| "timeout".to_string()),
            updated_at: t(updated),
        })
    }

    /// A stopped agent keeps its established stream "up" and silent: only
    /// its Debug API (timing out) and `/live` tell. `hung_after` is 5 s,
    /// counted from the first timed-out poll to the end of the latest.
    #[test]
    fn a_silent_agent_whose_debug_api_times_out_is_unreachable() {
        let unreachable = open_set(&[(SymptomKind::AgentUnreachable, Subject::agent("a"))]);
        let timeout = Some("timeout");
        let refused = Some("connection_refused");
        // (case, stream, last stream message, debug view, /live, now,
        //  incident open before, want agent_unreachable, want blind)
        #[allow(clippy::type_complexity)]
        #[rustfmt::skip]
        let cases: &[(&str, StreamStatus, u64, Arc<AgentDebugView>, Option<Arc<HealthView>>, u64, bool, bool, bool)] = &[
            ("healthy", StreamStatus::Up, 0, debug(None, 26, None), None, 26, false, false, false),
            ("frozen: three timed-out polls", StreamStatus::Up, 0, debug(Some(20), 26, timeout), None, 26, false, true, false),
            ("frozen, /live failing too", StreamStatus::Up, 0, debug(Some(20), 26, timeout), Some(live(None, 25)), 26, false, true, false),
            ("frozen while the stream reconnects", StreamStatus::Connecting, 0, debug(Some(20), 26, timeout), None, 26, false, true, false),
            // Only the polls count, not `now`: one or two slow answers
            // never open it, however late the tick.
            ("one slow answer", StreamStatus::Up, 0, debug(Some(20), 22, timeout), None, 29, false, false, false),
            ("two slow answers", StreamStatus::Up, 0, debug(Some(20), 24, timeout), None, 29, false, false, false),
            // Another signal says the process answers.
            ("the stream answered since", StreamStatus::Up, 23, debug(Some(20), 26, timeout), None, 26, false, false, false),
            ("/live answered since", StreamStatus::Up, 0, debug(Some(20), 26, timeout), Some(live(Some(true), 25)), 26, false, false, false),
            ("/live answered before", StreamStatus::Up, 0, debug(Some(20), 26, timeout), Some(live(Some(true), 19)), 26, false, true, false),
            // Refused: an agent that is down; the stream decides.
            ("refused, stream up", StreamStatus::Up, 0, debug(None, 26, refused), None, 26, false, false, false),
            ("refused, stream down", StreamStatus::Down, 0, debug(None, 26, refused), None, 26, false, true, false),
            // Hysteresis: open while the Debug API still times out with no
            // other answer, or while the stream is not up (a restart in
            // progress); closed once the process answers again.
            ("open, still timing out", StreamStatus::Up, 0, debug(Some(40), 42, timeout), None, 42, true, true, false),
            ("open, restarting", StreamStatus::Connecting, 0, debug(None, 42, refused), None, 42, true, true, false),
            ("open, answers again", StreamStatus::Up, 0, debug(None, 42, None), None, 42, true, false, false),
            ("open, the stream answered since", StreamStatus::Up, 41, debug(Some(40), 42, timeout), None, 42, true, false, false),
            ("open, /live answered since", StreamStatus::Up, 0, debug(Some(40), 42, timeout), Some(live(Some(true), 41)), 42, true, false, false),
            // A Debug view older than max_staleness (10 s): reported, blind.
            ("stale debug view", StreamStatus::Up, 0, debug(Some(20), 26, timeout), None, 40, false, true, true),
        ];
        for (case, status, last_message, d, health, at, open, want, want_blind) in cases {
            let mut v = view(*status, 0, *at);
            v.last_message = Some(t(*last_message));
            let debug = [d.clone()];
            let health: Vec<_> = health.iter().cloned().collect();
            let local = LocalSignals {
                debug: &debug,
                health: &health,
            };
            let got = analyze(
                &[v],
                &local,
                &|k| *open && unreachable.contains(k),
                &th(),
                t(*at),
            );
            let found = got.iter().find(|s| s.kind == SymptomKind::AgentUnreachable);
            assert_eq!(found.is_some(), *want, "{case}");
            if let Some(s) = found {
                assert_eq!(s.blind, *want_blind, "{case}");
                if d.unanswered_since.is_some() {
                    assert_eq!(s.evidence["signal"], "debug_api_unanswered", "{case}");
                    assert_eq!(s.evidence["debug_last_error"], "timeout", "{case}");
                }
            }
        }
    }

    #[test]
    fn a_hung_agent_names_its_signals() {
        let mut v = view(StreamStatus::Up, 0, 26);
        v.last_message = Some(t(0));
        let debug = [debug(Some(20), 26, Some("timeout"))];
        let health = [live(None, 25)];
        let local = LocalSignals {
            debug: &debug,
            health: &health,
        };
        let got = analyze(&[v], &local, &|_| false, &th(), t(26));
        assert_eq!(kinds(&got), vec![SymptomKind::AgentUnreachable]);
        let e = &got[0].evidence;
        assert_eq!(e["stream"], "up");
        assert_eq!(e["debug_unanswered_for_ms"], 6000);
        assert_eq!(e["debug_unanswered_since_ms"], unix_millis(t(20)));
        assert_eq!(e["live"], serde_json::Value::Null);
        assert_eq!(e["live_error"], "timeout");
        assert_eq!(got[0].predicted_outage, Some(t(100)));
        // Another agent's Debug view says nothing about `a`.
        let other = [Arc::new(AgentDebugView {
            agent: "b".into(),
            ..(*debug[0]).clone()
        })];
        let local = LocalSignals {
            debug: &other,
            health: &[],
        };
        let v = view(StreamStatus::Up, 0, 26);
        assert!(analyze(&[v], &local, &|_| false, &th(), t(26)).is_empty());
    }

    #[test]
    fn the_stock_policy_waits_five_seconds_of_timed_out_polls() {
        assert_eq!(
            Policy::builtin().unwrap().thresholds.hung_after,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn an_agent_that_issues_us_no_identity_is_not_unreachable() {
        let unreachable = (SymptomKind::AgentUnreachable, Subject::agent("a"));
        let refusing = |since: u64, at: u64| {
            let mut v = view(StreamStatus::NoIdentity, since, at);
            v.svids.clear();
            v.last_error = Some(NO_IDENTITY.into());
            v
        };
        // (refusing since, now, unreachable open before, want)
        for (since, at, open_before, want) in [
            // Within the grace (a freshly attested agent before its first
            // sync): nothing opens, an open agent_unreachable stays.
            (20, 25, false, vec![]),
            (20, 25, true, vec![SymptomKind::AgentUnreachable]),
            // Past it: the diagnosis, and agent_unreachable closes (it
            // answers).
            (20, 30, false, vec![SymptomKind::IdentityNotIssued]),
            (20, 30, true, vec![SymptomKind::IdentityNotIssued]),
        ] {
            let open = open_set(std::slice::from_ref(&unreachable));
            let got = analyze(
                &[refusing(since, at)],
                &NO_LOCAL,
                &|k| open_before && open.contains(k),
                &th(),
                t(at),
            );
            assert_eq!(kinds(&got), want, "t{at} open={open_before}");
            if let Some(s) = got
                .iter()
                .find(|s| s.kind == SymptomKind::IdentityNotIssued)
            {
                assert_eq!(s.subject, Subject::agent("a"));
                assert_eq!(s.severity, Severity::Critical);
            }
        }
        // Open: stays open while retrying (Connecting after the refusal).
        let open = open_set(&[(SymptomKind::IdentityNotIssued, Subject::agent("a"))]);
        let mut v = refusing(29, 30);
        v.status = StreamStatus::Connecting;
        let got = analyze(&[v], &NO_LOCAL, &|k| open.contains(k), &th(), t(30));
        assert_eq!(kinds(&got), vec![SymptomKind::IdentityNotIssued]);
        // Served again: nothing.
        let mut v = view(StreamStatus::Up, 0, 21);
        v.last_error = None;
        assert!(analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(21)).is_empty());
        // Another failure is unreachable again.
        let mut v = view(StreamStatus::Down, 20, 21);
        v.last_error = Some("unavailable".into());
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(21));
        assert_eq!(kinds(&got), vec![SymptomKind::AgentUnreachable]);
    }

    #[test]
    fn what_is_not_served_opens_no_lifetime_incident_and_clears_none() {
        let svid = Subject::svid("a", "spiffe://td/w");
        // The agent is gone with the SVID at 90 % and then past notAfter:
        // only the stream is wrong; a dead agent's SVID is not "expired and
        // still served".
        for at in [90, 120] {
            let v = view(StreamStatus::Down, 20, at);
            let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(at));
            assert_eq!(kinds(&got), vec![SymptomKind::AgentUnreachable], "t{at}");
        }
        // An expiring incident opened while it was served stays open (not
        // cleared, not turned into expired) until the agent answers again.
        let open = open_set(&[
            (SymptomKind::SvidExpiring, svid.clone()),
            (SymptomKind::AgentUnreachable, Subject::agent("a")),
        ]);
        let v = view(StreamStatus::Unanswered, 95, 120);
        let got = analyze(&[v], &NO_LOCAL, &|k| open.contains(k), &th(), t(120));
        assert_eq!(
            kinds(&got),
            vec![SymptomKind::SvidExpiring, SymptomKind::AgentUnreachable]
        );
        // Served again, past notAfter: now it is expired.
        let v = view(StreamStatus::Up, 0, 120);
        let got = analyze(&[v], &NO_LOCAL, &|k| open.contains(k), &th(), t(120));
        assert_eq!(kinds(&got), vec![SymptomKind::SvidExpired]);
    }

    #[test]
    fn unreachable_predicts_outage_at_earliest_expiry() {
        let v = view(StreamStatus::Down, 20, 21);
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(21));
        let s = got
            .iter()
            .find(|s| s.kind == SymptomKind::AgentUnreachable)
            .unwrap();
        assert_eq!(s.predicted_outage, Some(t(100)));
        assert_eq!(s.severity, Severity::Warning);
        assert_eq!(s.evidence["stream"], "down");
    }

    #[test]
    fn stale_view_is_blind() {
        let v = view(StreamStatus::Down, 20, 21);
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(40));
        assert!(got.iter().all(|s| s.blind));
        let v = view(StreamStatus::Down, 20, 39);
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(40));
        assert!(got.iter().all(|s| !s.blind));
    }

    #[test]
    fn unparsable_leaf_is_only_invalid() {
        let mut v = view(StreamStatus::Up, 0, 10);
        v.svids[0].serial.clear();
        v.svids[0].not_before = UNIX_EPOCH;
        v.svids[0].not_after = UNIX_EPOCH;
        v.svids[0].invalid = Some("certificate 0 is malformed".into());
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(10));
        assert_eq!(kinds(&got), vec![SymptomKind::SvidInvalid]);
        assert_eq!(got[0].predicted_outage, None);
    }

    #[test]
    fn invalid_svid_carries_problem() {
        let mut v = view(StreamStatus::Up, 0, 10);
        v.svids[0].invalid = Some("leaf certificate has cA=true".into());
        let got = analyze(&[v], &NO_LOCAL, &|_| false, &th(), t(10));
        assert_eq!(kinds(&got), vec![SymptomKind::SvidInvalid]);
        assert_eq!(got[0].evidence["problem"], "leaf certificate has cA=true");
    }
}
