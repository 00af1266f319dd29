//! Analyze: sensor views → symptoms. Pure: a function of its inputs and `now`.
//!
//! Each symptom has an open condition and a separate, weaker close condition
//! (hysteresis): `is_open` tells whether an incident for that key is open, and
//! an open symptom stays active until its close condition holds.

mod control_plane;
mod handshake;

pub use control_plane::{control_plane, debug_view, explain_refusals};
pub use handshake::{HandshakeInput, handshakes, remediable};

use std::time::SystemTime;

use serde_json::json;

use crate::clock::{saturating_since, unix_millis};
use crate::model::{
    AgentView, NO_IDENTITY, Severity, StreamStatus, Subject, SvidObservation, Symptom, SymptomKey,
    SymptomKind,
};
use crate::policy::Thresholds;

/// Symptoms present at `now`.
pub fn analyze<V: std::borrow::Borrow<AgentView>>(
    views: &[V],
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
) -> Vec<Symptom> {
    let mut out = Vec::new();
    for view in views {
        agent_symptoms(view.borrow(), is_open, th, now, &mut out);
    }
    out
}

fn agent_symptoms(
    view: &AgentView,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
    out: &mut Vec<Symptom>,
) {
    let blind = saturating_since(now, view.updated_at) > th.max_staleness;

    // An agent that is up has neither stream symptom, so no key is built:
    // this runs for every agent on every tick.
    if view.status == StreamStatus::Up {
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
    // closes only once the stream is up again (Connecting keeps it open).
    let unreachable = (!no_identity).then(|| {
        let key = SymptomKey {
            kind: SymptomKind::AgentUnreachable,
            subject: Subject::agent(&view.agent),
        };
        let failed = matches!(
            view.status,
            StreamStatus::Down | StreamStatus::Unanswered | StreamStatus::Rejected
        );
        let failed_for = saturating_since(now, view.status_since);
        let active = is_open(&key) || (failed && failed_for >= th.unreachable_after);
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
        out.push(Symptom {
            kind: key.kind,
            subject: key.subject,
            severity: if earliest_expiry.is_some_and(|t| t <= now) {
                Severity::Critical
            } else {
                Severity::Warning
            },
            predicted_outage: earliest_expiry,
            evidence: json!({
                "stream": view.status.as_str(),
                "since_ms": unix_millis(view.status_since),
                "last_error": view.last_error,
                "last_message_ms": view.last_message.map(unix_millis),
                "cached_svids": view.svids.len(),
            }),
            blind,
        });
    }

    svid_symptoms(view, false, is_open, th, now, blind, out);
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
            let got = analyze(&[v], &|k| none.contains(k), &th(), t(*at));
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
            let got = analyze(std::slice::from_ref(&v), &|_| false, &builtin, t(at));
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
        let got = analyze(&[v], &|_| false, &builtin, t(at));
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
            &|k| open.contains(k),
            &th(),
            t(62),
        );
        assert_eq!(kinds(&got), vec![SymptomKind::SvidRotationOverdue]);
        // Not open: does not open at 0.62.
        let got = analyze(&[v], &|_| false, &th(), t(62));
        assert!(got.is_empty());
        // Closes once a new serial makes the share drop below 0.6.
        let mut fresh = view(StreamStatus::Up, 0, 70);
        fresh.svids[0].not_before = t(60);
        fresh.svids[0].not_after = t(160);
        let got = analyze(&[fresh], &|k| open.contains(k), &th(), t(70));
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
            let got = analyze(&[v], &|k| open && key_open.contains(k), &th(), t(21));
            assert_eq!(
                got.iter().any(|s| s.kind == SymptomKind::AgentUnreachable),
                want,
                "{status:?} open={open}"
            );
        }
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
        let got = analyze(&[v], &|k| open.contains(k), &th(), t(30));
        assert_eq!(kinds(&got), vec![SymptomKind::IdentityNotIssued]);
        // Served again: nothing.
        let mut v = view(StreamStatus::Up, 0, 21);
        v.last_error = None;
        assert!(analyze(&[v], &|_| false, &th(), t(21)).is_empty());
        // Another failure is unreachable again.
        let mut v = view(StreamStatus::Down, 20, 21);
        v.last_error = Some("unavailable".into());
        let got = analyze(&[v], &|_| false, &th(), t(21));
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
            let got = analyze(&[v], &|_| false, &th(), t(at));
            assert_eq!(kinds(&got), vec![SymptomKind::AgentUnreachable], "t{at}");
        }
        // An expiring incident opened while it was served stays open (not
        // cleared, not turned into expired) until the agent answers again.
        let open = open_set(&[
            (SymptomKind::SvidExpiring, svid.clone()),
            (SymptomKind::AgentUnreachable, Subject::agent("a")),
        ]);
        let v = view(StreamStatus::Unanswered, 95, 120);
        let got = analyze(&[v], &|k| open.contains(k), &th(), t(120));
        assert_eq!(
            kinds(&got),
            vec![SymptomKind::SvidExpiring, SymptomKind::AgentUnreachable]
        );
        // Served again, past notAfter: now it is expired.
        let v = view(StreamStatus::Up, 0, 120);
        let got = analyze(&[v], &|k| open.contains(k), &th(), t(120));
        assert_eq!(kinds(&got), vec![SymptomKind::SvidExpired]);
    }

    #[test]
    fn unreachable_predicts_outage_at_earliest_expiry() {
        let v = view(StreamStatus::Down, 20, 21);
        let got = analyze(&[v], &|_| false, &th(), t(21));
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
        let got = analyze(&[v], &|_| false, &th(), t(40));
        assert!(got.iter().all(|s| s.blind));
        let v = view(StreamStatus::Down, 20, 39);
        let got = analyze(&[v], &|_| false, &th(), t(40));
        assert!(got.iter().all(|s| !s.blind));
    }

    #[test]
    fn unparsable_leaf_is_only_invalid() {
        let mut v = view(StreamStatus::Up, 0, 10);
        v.svids[0].serial.clear();
        v.svids[0].not_before = UNIX_EPOCH;
        v.svids[0].not_after = UNIX_EPOCH;
        v.svids[0].invalid = Some("certificate 0 is malformed".into());
        let got = analyze(&[v], &|_| false, &th(), t(10));
        assert_eq!(kinds(&got), vec![SymptomKind::SvidInvalid]);
        assert_eq!(got[0].predicted_outage, None);
    }

    #[test]
    fn invalid_svid_carries_problem() {
        let mut v = view(StreamStatus::Up, 0, 10);
        v.svids[0].invalid = Some("leaf certificate has cA=true".into());
        let got = analyze(&[v], &|_| false, &th(), t(10));
        assert_eq!(kinds(&got), vec![SymptomKind::SvidInvalid]);
        assert_eq!(got[0].evidence["problem"], "leaf certificate has cA=true");
    }
}
