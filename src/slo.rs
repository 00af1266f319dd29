//! Service levels of SPIRE itself, measured from what spire-healer already
//! sees: the indicators ([`Sli`]), their objectives ([`SloConfig`], the
//! `[slo]` section) and the pure judgements behind each good or bad event.
//!
//! - **SVID issuance**: a new serial arriving on a Workload API stream
//!   (a rotation, or a new entry once the agent has it) is judged by
//!   [`issuance_latency`], from the server signing it to the workload being
//!   served it, against `issuance_latency`.
//! - **Renewal**: each SVID is judged once by [`Renewals`]: good when a new
//!   serial signed before its rotation point (`rotation_overdue_open` of the
//!   policy, as a share of its lifetime) replaced it, bad when the point
//!   passed while it was still served.
//! - **Handshake**: every handshake outcome counted (probes, reports, Envoy
//!   statistics) is good when it completed ([`crate::handshake::Reason::Ok`]).
//! - **Server availability**: every admin-API poll of every server is good
//!   when the server answered.
//!
//! Events are counted in `spire_healer_slo_events_total{slo, result}`; the
//! alert rules compare their error ratio with `spire_healer_slo_objective`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::clock::saturating_since;
use crate::config::ConfigError;
use crate::model::{AgentView, StreamStatus, SvidObservation};

/// How far SPIRE backdates an X.509-SVID's notBefore from the moment it
/// signs it (`NotBeforeCushion` in SPIRE's `pkg/server/credtemplate`,
/// v1.15.3: `notBefore = now - 10s`, for clock skew).
pub const NOT_BEFORE_CUSHION: Duration = Duration::from_secs(10);

/// The resolution of a certificate's notBefore: X.509 times are encoded to
/// the second (Go truncates the fraction), so the signing instant lies in
/// `[notBefore + cushion, notBefore + cushion + 1 s)`.
pub const NOT_BEFORE_RESOLUTION: Duration = Duration::from_secs(1);

/// A service-level indicator (the `slo` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sli {
    /// A new SVID served within `issuance_latency` of being signed.
    SvidIssuance,
    /// An SVID rotated before its rotation point.
    Renewal,
    /// An mTLS handshake completed.
    Handshake,
    /// A server's admin API answered a poll.
    ServerAvailability,
}

impl Sli {
    /// Number of indicators.
    pub const COUNT: usize = 4;
    /// Every indicator.
    pub const ALL: [Sli; Sli::COUNT] = [
        Sli::SvidIssuance,
        Sli::Renewal,
        Sli::Handshake,
        Sli::ServerAvailability,
    ];

    /// The `slo` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Sli::SvidIssuance => "svid_issuance",
            Sli::Renewal => "renewal",
            Sli::Handshake => "handshake",
            Sli::ServerAvailability => "server_availability",
        }
    }
}

/// The `result` label values of `spire_healer_slo_events_total`.
pub const RESULTS: [&str; 2] = ["good", "bad"];

/// The `result` label value of one event.
pub fn result(good: bool) -> &'static str {
    if good { "good" } else { "bad" }
}

/// `[slo]`: the objectives the alert rules hold SPIRE to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    /// A new SVID served later than this after signing is a bad issuance
    /// event.
    #[serde(default = "default_issuance_latency", with = "humantime_serde")]
    pub issuance_latency: Duration,
    /// Share of issuances within `issuance_latency` (e.g. 0.99: p99).
    #[serde(default = "default_issuance_objective")]
    pub issuance_objective: f64,
    /// Share of SVIDs rotated before their rotation point.
    #[serde(default = "default_renewal_objective")]
    pub renewal_objective: f64,
    /// Share of mTLS handshakes that complete (1.0: no error budget).
    #[serde(default = "default_handshake_objective")]
    pub handshake_objective: f64,
    /// Share of admin-API polls a server answers.
    #[serde(default = "default_server_availability_objective")]
    pub server_availability_objective: f64,
}

fn default_issuance_latency() -> Duration {
    Duration::from_millis(100)
}
fn default_issuance_objective() -> f64 {
    0.99
}
fn default_renewal_objective() -> f64 {
    0.999
}
fn default_handshake_objective() -> f64 {
    1.0
}
fn default_server_availability_objective() -> f64 {
    0.9999
}

impl Default for SloConfig {
    fn default() -> Self {
        Self {
            issuance_latency: default_issuance_latency(),
            issuance_objective: default_issuance_objective(),
            renewal_objective: default_renewal_objective(),
            handshake_objective: default_handshake_objective(),
            server_availability_objective: default_server_availability_objective(),
        }
    }
}

/// Longest `issuance_latency`: an SVID served minutes after signing is an
/// outage, not a latency.
const MAX_ISSUANCE_LATENCY: Duration = Duration::from_secs(300);

impl SloConfig {
    /// The objective of `sli`, a share in (0, 1].
    pub fn objective(&self, sli: Sli) -> f64 {
        match sli {
            Sli::SvidIssuance => self.issuance_objective,
            Sli::Renewal => self.renewal_objective,
            Sli::Handshake => self.handshake_objective,
            Sli::ServerAvailability => self.server_availability_objective,
        }
    }

    /// Appends one error per invalid key: every objective in (0, 1], the
    /// latency above zero and at most five minutes.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (key, value) in [
            ("issuance_objective", self.issuance_objective),
            ("renewal_objective", self.renewal_objective),
            ("handshake_objective", self.handshake_objective),
            (
                "server_availability_objective",
                self.server_availability_objective,
            ),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                errors.push(ConfigError::invalid(
                    format!("slo.{key}"),
                    format!(
                        "{value} must be above 0 and at most 1 (a share of good events, e.g. 0.999)"
                    ),
                ));
            }
        }
        if self.issuance_latency.is_zero() {
            errors.push(ConfigError::invalid(
                "slo.issuance_latency",
                "must be above zero".to_string(),
            ));
        } else if self.issuance_latency > MAX_ISSUANCE_LATENCY {
            errors.push(ConfigError::invalid(
                "slo.issuance_latency",
                format!(
                    "{} is too long (at most {})",
                    humantime::format_duration(self.issuance_latency),
                    humantime::format_duration(MAX_ISSUANCE_LATENCY)
                ),
            ));
        }
    }
}

/// Time from SPIRE signing an SVID to the workload being served it: `seen_at
/// − (not_before + NOT_BEFORE_CUSHION)`, 0 when that is negative.
///
/// Assumes the server's clock and ours agree: skew adds to (or, clamped,
/// hides) the latency. notBefore has one-second resolution, so the result
/// is up to [`NOT_BEFORE_RESOLUTION`] above the true latency (an upper
/// bound); [`issuance_good`] allows for that.
pub fn issuance_latency(seen_at: SystemTime, not_before: SystemTime) -> Duration {
    saturating_since(seen_at, not_before + NOT_BEFORE_CUSHION)
}

/// An issuance whose [`issuance_latency`] is `latency` is good unless it
/// is certainly above `threshold`: the latency's lower bound (`latency −
/// NOT_BEFORE_RESOLUTION`) must exceed the threshold for it to count bad,
/// so a certificate's truncated notBefore never makes a fast issuance bad.
pub fn issuance_good(latency: Duration, threshold: Duration) -> bool {
    latency.saturating_sub(NOT_BEFORE_RESOLUTION) <= threshold
}

/// When SPIRE should have rotated an SVID: `share` of its lifetime after
/// notBefore (`rotation_overdue_open` of the policy).
pub fn rotation_due(not_before: SystemTime, not_after: SystemTime, share: f64) -> SystemTime {
    let lifetime = saturating_since(not_after, not_before);
    let share = if share.is_finite() {
        share.max(0.0)
    } else {
        1.0
    };
    not_before + lifetime.mul_f64(share)
}

/// A 64-bit digest of a SPIFFE ID or a serial: the ledger holds one per
/// served SVID, so it keeps digests, not copies (a collision between two
/// SVIDs of one agent is ~n²/2⁶⁵ likely).
fn digest(s: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(s, &mut h);
    std::hash::Hasher::finish(&h)
}

/// One served serial, until it is judged.
#[derive(Debug, Clone, PartialEq)]
struct Tracked {
    /// [`digest`] of the serial.
    serial: u64,
    due: SystemTime,
    judged: bool,
}

/// Renewal judgements: each SVID (agent, SPIFFE ID, serial) counts once,
/// good when replaced by a serial signed at or before its rotation point,
/// bad when that point passes while it is still served (or a later serial
/// replaced it).
#[derive(Debug, Default)]
pub struct Renewals {
    /// Agent → its ledger.
    agents: HashMap<String, Ledger>,
    /// Counts [`Renewals::end_tick`] calls.
    generation: u64,
}

/// What one agent serves, as far as renewals are concerned.
#[derive(Debug, Default)]
struct Ledger {
    /// [`digest`] of a SPIFFE ID → the serials it serves.
    ids: HashMap<u64, Vec<Tracked>>,
    /// The answer judged last: the same view (or one listing the same
    /// SVIDs in the same order) before `next_due` has nothing to judge, so
    /// the steady tick looks no SVID up. Held, so the pointer comparison
    /// cannot meet a freed and reused allocation.
    last: Option<Arc<AgentView>>,
    /// The earliest rotation point of a serial not judged yet.
    next_due: Option<SystemTime>,
    /// The [`Renewals::end_tick`] generation that last observed the agent.
    seen: u64,
}

impl Ledger {
    /// Whether `v` lists, in order, the SVIDs judged last.
    fn unchanged(&self, v: &Arc<AgentView>) -> bool {
        self.last.as_ref().is_some_and(|p| {
            Arc::ptr_eq(p, v)
                || (p.svids.len() == v.svids.len()
                    && p.svids
                        .iter()
                        .zip(&v.svids)
                        .all(|(a, b)| a.serial == b.serial && a.spiffe_id == b.spiffe_id))
        })
    }

    /// The earliest rotation point still to judge.
    fn next_due(&self) -> Option<SystemTime> {
        self.ids
            .values()
            .flatten()
            .filter(|t| !t.judged)
            .map(|t| t.due)
            .min()
    }
}

/// Good and bad renewal events of one observation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    /// SVIDs rotated on time.
    pub good: u64,
    /// SVIDs rotated late or not at all by their rotation point.
    pub bad: u64,
}

impl Renewals {
    /// Judges what the agent of `v` serves at `now`. Only while its
    /// Workload API stream is up is what it lists what workloads get; while
    /// it is not, a missed rotation point is not judged (the next answer shows
    /// when the new serial was signed). `share` is the rotation point as a
    /// share of the lifetime, and `slack` how long after it SPIRE may still
    /// rotate on time (it only looks once per check period).
    pub fn observe(
        &mut self,
        v: &Arc<AgentView>,
        share: f64,
        slack: Duration,
        now: SystemTime,
    ) -> Judged {
        if !self.agents.contains_key(v.agent.as_str()) {
            self.agents.insert(v.agent.clone(), Ledger::default());
        }
        let generation = self.generation;
        let Some(ledger) = self.agents.get_mut(v.agent.as_str()) else {
            return Judged::default();
        };
        ledger.seen = generation;
        if v.status != StreamStatus::Up {
            return Judged::default();
        }
        let unchanged = ledger.unchanged(v);
        ledger.last = Some(Arc::clone(v));
        if unchanged && ledger.next_due.is_none_or(|due| now < due) {
            return Judged::default();
        }
        let out = Self::judge(&mut ledger.ids, &v.svids, share, slack, now);
        ledger.next_due = ledger.next_due();
        out
    }

    /// [`Renewals::observe`] of an answer that changed, or past a
    /// rotation point.
    fn judge(
        ids: &mut HashMap<u64, Vec<Tracked>>,
        svids: &[SvidObservation],
        share: f64,
        slack: Duration,
        now: SystemTime,
    ) -> Judged {
        let mut out = Judged::default();
        // Every serial already tracked: only rotation points that passed
        // are looked for (one look-up per SVID).
        let mut news = false;
        // (SPIFFE ID, serial) by their digests, as the ledger keeps them.
        let listed: Vec<(u64, u64)> = svids
            .iter()
            .map(|s| (digest(&s.spiffe_id), digest(&s.serial)))
            .collect();
        for (s, &(id, serial)) in svids.iter().zip(&listed) {
            if s.serial.is_empty() {
                continue;
            }
            match ids
                .get_mut(&id)
                .and_then(|ts| ts.iter_mut().find(|t| t.serial == serial))
            {
                Some(t) => {
                    if !t.judged && now >= t.due {
                        t.judged = true;
                        out.bad += 1;
                    }
                }
                None => news = true,
            }
        }
        if !news {
            return out;
        }
        // Sets, not searches: a node serving thousands of SVIDs sees a new
        // serial on most ticks.
        let served: HashSet<(u64, u64)> = listed.iter().copied().collect();
        let served_ids: HashSet<u64> = served.iter().map(|&(id, _)| id).collect();
        // SPIFFE IDs no longer served (entry deleted) are dropped unjudged.
        ids.retain(|id, _| served_ids.contains(id));
        for (s, &(id, serial)) in svids.iter().zip(&listed) {
            if s.serial.is_empty() {
                continue;
            }
            let tracked = ids.entry(id).or_default();
            if tracked.iter().any(|t| t.serial == serial) {
                continue;
            }
            // A new serial: it replaces every tracked serial no longer served.
            let signed = s.not_before + NOT_BEFORE_CUSHION;
            tracked.retain(|t| {
                let gone = !served.contains(&(id, t.serial));
                if gone && !t.judged {
                    if signed <= t.due {
                        out.good += 1;
                    } else {
                        out.bad += 1;
                    }
                }
                !gone
            });
            // The slack, at most a tenth of the lifetime (as the overdue
            // symptom has it).
            let life = saturating_since(s.not_after, s.not_before);
            let slack = slack.min(life.mul_f64(crate::policy::MAX_ROTATION_SLACK_SHARE));
            let due = rotation_due(s.not_before, s.not_after, share) + slack;
            // First seen already past its rotation point (e.g. after a
            // restart of spire-healer): missed.
            let judged = now >= due;
            if judged {
                out.bad += 1;
            }
            tracked.push(Tracked {
                serial,
                due,
                judged,
            });
        }
        out
    }

    /// Ends a tick: forgets the agents [`Renewals::observe`] was not
    /// called for since the previous call (no longer configured or
    /// observed).
    pub fn end_tick(&mut self) {
        let generation = self.generation;
        self.agents.retain(|_, l| l.seen == generation);
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of `agent` listing `svids`, its stream up when `served`.
    fn view(agent: &str, served: bool, svids: &[SvidObservation]) -> Arc<AgentView> {
        Arc::new(AgentView {
            agent: agent.into(),
            status: if served {
                StreamStatus::Up
            } else {
                StreamStatus::Down
            },
            status_since: UNIX_EPOCH,
            last_error: None,
            last_message: None,
            svids: svids.to_vec(),
            bundle_authorities: 0,
            bundle: Vec::new(),
            rotations: 0,
            updated_at: UNIX_EPOCH,
        })
    }

    /// [`Renewals::observe`] of a fresh [`view`].
    fn observe(
        r: &mut Renewals,
        agent: &str,
        served: bool,
        svids: &[SvidObservation],
        share: f64,
        slack: Duration,
        now: SystemTime,
    ) -> Judged {
        r.observe(&view(agent, served, svids), share, slack, now)
    }
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    fn svid(id: &str, serial: &str, nb: u64, na: u64) -> SvidObservation {
        SvidObservation {
            spiffe_id: id.into(),
            serial: serial.into(),
            not_before: t(nb),
            not_after: t(na),
            invalid: None,
            first_seen: t(nb),
            issuer: String::new(),
        }
    }

    #[test]
    fn issuance_latency_from_the_backdated_not_before() {
        // (seen at, notBefore, expected latency)
        let cases = [
            (t(1_010) + ms(40), t(1_000), ms(40)),
            (t(1_010), t(1_000), Duration::ZERO),
            (t(1_012) + ms(500), t(1_000), ms(2_500)),
            // A server clock ahead of ours: clamped at 0.
            (t(1_005), t(1_000), Duration::ZERO),
            (t(900), t(1_000), Duration::ZERO),
        ];
        for (seen, nb, want) in cases {
            assert_eq!(issuance_latency(seen, nb), want, "seen {seen:?} nb {nb:?}");
        }
    }

    #[test]
    fn issuance_is_bad_only_when_certainly_over_the_threshold() {
        // (measured latency, threshold, good)
        let cases = [
            (ms(0), ms(100), true),
            (ms(100), ms(100), true),
            // Up to a second of it may be notBefore's truncation.
            (ms(1_100), ms(100), true),
            (ms(1_101), ms(100), false),
            (ms(5_000), ms(100), false),
            (ms(5_000), Duration::from_secs(4), true),
        ];
        for (latency, threshold, good) in cases {
            assert_eq!(
                issuance_good(latency, threshold),
                good,
                "{latency:?} vs {threshold:?}"
            );
        }
    }

    #[test]
    fn the_check_slack_moves_the_rotation_point() {
        let svid = |serial: &str, nb: u64| SvidObservation {
            spiffe_id: "spiffe://td/w".into(),
            serial: serial.into(),
            not_before: t(nb),
            not_after: t(nb + 40),
            invalid: None,
            first_seen: t(nb),
            issuer: String::new(),
        };
        let slack = Duration::from_secs(10);
        let mut r = Renewals::default();
        // Point at 0.65 × 40 = 26 s, plus the slack (10 s, at most a tenth of
        // the lifetime: 4 s); the replacement signed at 17 + 10 = 27 s
        // (notBefore is backdated 10 s) is on time with it.
        assert_eq!(
            observe(&mut r, "x", true, &[svid("a", 0)], 0.65, slack, t(1)),
            Judged::default()
        );
        assert_eq!(
            observe(&mut r, "x", true, &[svid("a", 0)], 0.65, slack, t(29)),
            Judged::default()
        );
        let got = observe(&mut r, "x", true, &[svid("b", 17)], 0.65, slack, t(29));
        assert_eq!(got, Judged { good: 1, bad: 0 });
        // Without a replacement the point passes at 26 + 4 s.
        let got = observe(&mut r, "x", true, &[svid("b", 17)], 0.65, slack, t(17 + 36));
        assert_eq!(got, Judged { good: 0, bad: 1 });
    }

    #[test]
    fn rotation_due_is_a_share_of_the_lifetime() {
        let cases = [
            (t(0), t(3_600), 0.5, t(1_800)),
            (t(100), t(1_100), 0.65, t(750)),
            (t(100), t(1_100), 0.0, t(100)),
            (t(100), t(1_100), f64::NAN, t(1_100)),
            // notAfter before notBefore: no lifetime.
            (t(100), t(50), 0.5, t(100)),
        ];
        for (nb, na, share, want) in cases {
            assert_eq!(rotation_due(nb, na, share), want, "{share}");
        }
    }

    /// Table of (now, served, svids) → (good, bad) for one agent, in order.
    #[test]
    fn an_unchanged_answer_is_judged_at_each_rotation_point_it_passes() {
        let (a, b) = ("spiffe://td/a", "spiffe://td/b");
        // a due at 650, b at 1_300 (share 0.65).
        let both = vec![svid(a, "01", 0, 1_000), svid(b, "02", 0, 2_000)];
        let swapped: Vec<_> = both.iter().rev().cloned().collect();
        let mut r = Renewals::default();
        let mut at = |now, svids: &[SvidObservation]| {
            observe(&mut r, "agent", true, svids, 0.65, Duration::ZERO, t(now))
        };
        assert_eq!(at(10, &both), Judged::default());
        assert_eq!(at(600, &both), Judged::default());
        assert_eq!(at(700, &both), Judged { good: 0, bad: 1 }, "a missed");
        // The same SVIDs in another order: nothing new, nothing judged twice.
        assert_eq!(at(800, &swapped), Judged::default());
        assert_eq!(at(1_200, &both), Judged::default());
        assert_eq!(at(1_400, &both), Judged { good: 0, bad: 1 }, "b missed");
        assert_eq!(at(1_500, &both), Judged::default());

        // One view held across ticks (the steady daemon): its point is
        // still judged when it passes, once.
        let mut r = Renewals::default();
        let v = view("held", true, &both);
        let mut held = |now| {
            let j = r.observe(&v, 0.65, Duration::ZERO, t(now));
            r.end_tick();
            j
        };
        assert_eq!(held(10), Judged::default());
        assert_eq!(held(600), Judged::default());
        assert_eq!(held(700), Judged { good: 0, bad: 1 });
        assert_eq!(held(800), Judged::default());
        assert_eq!(held(1_400), Judged { good: 0, bad: 1 });
        assert_eq!(held(1_500), Judged::default());
    }

    #[test]
    fn renewals_are_judged_once_per_svid() {
        let a = "spiffe://td/a";
        // Lifetime 1000 s from 0, rotation point at 650 s.
        type Step = (u64, bool, Vec<SvidObservation>, (u64, u64));
        let steps: Vec<Step> = vec![
            (10, true, vec![svid(a, "01", 0, 1_000)], (0, 0)),
            (400, true, vec![svid(a, "01", 0, 1_000)], (0, 0)),
            // Rotated at 490 (signed 500): on time.
            (510, true, vec![svid(a, "02", 490, 1_490)], (1, 0)),
            // The same view again: nothing new.
            (520, true, vec![svid(a, "02", 490, 1_490)], (0, 0)),
            // "02" is due at 490 + 650 = 1140; the stream is down then.
            (1_200, false, vec![svid(a, "02", 490, 1_490)], (0, 0)),
            // Back up, still "02": missed, counted once.
            (1_210, true, vec![svid(a, "02", 490, 1_490)], (0, 1)),
            (1_220, true, vec![svid(a, "02", 490, 1_490)], (0, 0)),
            // Replaced late: already judged, not counted again.
            (1_300, true, vec![svid(a, "03", 1_290, 2_290)], (0, 0)),
            // "03" due at 1940; replaced by a serial signed at 1960 (nb
            // 1950), first seen while the stream was down: late.
            (2_100, true, vec![svid(a, "04", 1_950, 2_950)], (0, 1)),
        ];
        let mut r = Renewals::default();
        for (i, (now, served, svids, (good, bad))) in steps.into_iter().enumerate() {
            let got = observe(
                &mut r,
                "agent",
                served,
                &svids,
                0.65,
                Duration::ZERO,
                t(now),
            );
            assert_eq!(got, Judged { good, bad }, "step {i} at {now}");
        }
    }

    #[test]
    fn deleted_entries_and_other_agents_are_not_judged() {
        let a = "spiffe://td/a";
        let b = "spiffe://td/b";
        let mut r = Renewals::default();
        let both = [svid(a, "01", 0, 1_000), svid(b, "0b", 0, 1_000)];
        assert_eq!(
            observe(&mut r, "x", true, &both, 0.5, Duration::ZERO, t(10)),
            Judged::default()
        );
        assert_eq!(
            observe(&mut r, "y", true, &both[..1], 0.5, Duration::ZERO, t(10)),
            Judged::default()
        );
        // b's entry deleted before its point: forgotten, not bad.
        let only_a = [svid(a, "02", 100, 1_100)];
        assert_eq!(
            observe(&mut r, "x", true, &only_a, 0.5, Duration::ZERO, t(120)),
            Judged { good: 1, bad: 0 }
        );
        // A tick that observes only x forgets y.
        r.end_tick();
        observe(&mut r, "x", true, &only_a, 0.5, Duration::ZERO, t(125));
        r.end_tick();
        // y forgotten: its SVID is tracked afresh, nothing counted.
        assert_eq!(
            observe(&mut r, "y", true, &both[..1], 0.5, Duration::ZERO, t(130)),
            Judged::default()
        );
        // x's a at 100 + 500 = 600 missed.
        assert_eq!(
            observe(&mut r, "x", true, &only_a, 0.5, Duration::ZERO, t(600)),
            Judged { good: 0, bad: 1 }
        );
    }

    #[test]
    fn unparsed_leaves_are_skipped() {
        let mut r = Renewals::default();
        let mut s = svid("spiffe://td/a", "", 0, 10);
        s.invalid = Some("no leaf".into());
        assert_eq!(
            observe(&mut r, "x", true, &[s], 0.5, Duration::ZERO, t(100)),
            Judged::default()
        );
    }

    #[test]
    fn objectives_are_validated() {
        let cases: [(SloConfig, &[&str]); 4] = [
            (SloConfig::default(), &[]),
            (
                SloConfig {
                    issuance_objective: 0.0,
                    handshake_objective: 1.5,
                    ..SloConfig::default()
                },
                &["slo.issuance_objective", "slo.handshake_objective"],
            ),
            (
                SloConfig {
                    renewal_objective: f64::NAN,
                    server_availability_objective: -1.0,
                    issuance_latency: Duration::ZERO,
                    ..SloConfig::default()
                },
                &[
                    "slo.renewal_objective",
                    "slo.server_availability_objective",
                    "slo.issuance_latency",
                ],
            ),
            (
                SloConfig {
                    issuance_latency: Duration::from_secs(301),
                    ..SloConfig::default()
                },
                &["slo.issuance_latency"],
            ),
        ];
        for (cfg, want) in cases {
            let mut errors = Vec::new();
            cfg.validate(&mut errors);
            let keys: Vec<String> = errors
                .iter()
                .map(|e| match e {
                    ConfigError::Invalid { key, .. } => key.clone(),
                    other => other.to_string(),
                })
                .collect();
            assert_eq!(keys, want, "{cfg:?}");
        }
    }
}
