//! Remediation policy (TOML): thresholds, guards and per-symptom ladders.
//! Plain data that `plan` reads; reading and parsing the file belong to
//! `config` (`Policy::builtin`, `Policy::load`), so the pure stages never
//! reach the configuration.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::model::{AgentTtl, SymptomKind, TtlSource};

/// The built-in policy, `policies/default.toml`.
pub const DEFAULT_POLICY: &str = include_str!("../policies/default.toml");

/// How much an actuator disturbs its target: decides which do-no-harm
/// guards apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Cannot make things worse (re-open a stream, bump an entry).
    Gentle,
    /// Restarts or evicts the agent: it serves nothing until it has synced
    /// again. Held while no server answers and while the cluster circuit
    /// breaker is open (the cause is upstream).
    AgentLocal,
    /// Moves the agent to another server: held while no server answers, but
    /// not by the breaker (a dead server is exactly what it fixes).
    Failover,
}

/// A whole policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Open/close conditions.
    pub thresholds: Thresholds,
    /// Guards on every action.
    pub guards: Guards,
    /// Ladder per symptom name.
    #[serde(default)]
    pub ladders: BTreeMap<String, Vec<Rung>>,
}

/// Open and close conditions of the symptoms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Share of lifetime past which an unreplaced SVID is overdue.
    pub rotation_overdue_open: f64,
    /// Overdue closes below this share (a new serial).
    pub rotation_overdue_close: f64,
    /// Share of lifetime past which an SVID is expiring.
    pub expiring_open: f64,
    /// Expiring closes below this share.
    pub expiring_close: f64,
    /// How long the stream must be down before `agent_unreachable` opens.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// How long an agent must refuse us an identity (`PermissionDenied`)
    /// before `identity_not_issued` opens: a freshly started or re-attested
    /// agent refuses until its first sync delivers our entry.
    #[serde(default = "d_identity_grace", with = "humantime_serde")]
    pub identity_grace: Duration,
    /// Sensor views older than this are blind.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// `agent_sync_stale` opens when the agent's last successful sync is
    /// older than this (SPIRE syncs every 5 s by default; its Debug API
    /// caches answers for 5 s).
    #[serde(default = "d_sync_open", with = "humantime_serde")]
    pub sync_stale_open: Duration,
    /// … and closes when it is younger than this.
    #[serde(default = "d_sync_close", with = "humantime_serde")]
    pub sync_stale_close: Duration,
    /// The servers' agent SVID TTL (`agent_ttl`). Unset (the default): each
    /// server's is learned from its agent listing (see
    /// [`AgentTtl`](crate::model::AgentTtl)); set: it overrides what is
    /// learned, for every server.
    #[serde(default, with = "humantime_serde")]
    pub agent_svid_ttl: Option<Duration>,
    /// `agent_not_renewing` opens when the server sees less than this share
    /// of the agent SVID TTL left (SPIRE renews at 50 ± 5 % left).
    #[serde(default = "d_renew_open")]
    pub not_renewing_open: f64,
    /// … and closes above this share.
    #[serde(default = "d_renew_close")]
    pub not_renewing_close: f64,
    /// After the servers come back from an outage, agents find them again by
    /// themselves within their sync backoff (SPIRE caps it at
    /// min(8 m, 48 × sync_interval), 4 m by default): for this long, agents
    /// whose sync is stale are not restarted or evicted.
    #[serde(default = "d_resync_grace", with = "humantime_serde")]
    pub resync_grace: Duration,
    /// `ca_expiring` opens when every bundle authority expires within this.
    #[serde(default = "d_ca_within", with = "humantime_serde")]
    pub ca_expiring_within: Duration,
    /// A symptom must persist this long before its incident opens (e.g.
    /// bundle propagation takes a sync interval or two). By symptom name.
    #[serde(default = "d_open_after", with = "open_after_serde")]
    pub open_after: BTreeMap<String, Duration>,
    /// Handshake outcomes: the recent window a burst is judged over.
    #[serde(default = "d_burst_window", with = "humantime_serde")]
    pub burst_window: Duration,
    /// … and the baseline window before it.
    #[serde(default = "d_burst_baseline", with = "humantime_serde")]
    pub burst_baseline: Duration,
    /// `handshake_failure_burst` opens when, in `burst_window`, a reason has
    /// at least this many failures,
    #[serde(default = "d_burst_open_failures")]
    pub burst_open_failures: u64,
    /// … makes up at least this share of all outcomes to that target,
    #[serde(default = "d_burst_open_share")]
    pub burst_open_share: f64,
    /// … and its rate is at least this multiple of its baseline rate.
    #[serde(default = "d_burst_factor")]
    pub burst_factor: f64,
    /// It closes once the reason has at most this many failures in the
    /// window, or
    #[serde(default = "d_burst_close_failures")]
    pub burst_close_failures: u64,
    /// … its share has dropped to this.
    #[serde(default = "d_burst_close_share")]
    pub burst_close_share: f64,
    /// A burst counts as caused by a rotation (a peer holding a stale bundle
    /// or SVID) when a bundle change or SVID rotation happened this long
    /// before it, or less.
    #[serde(default = "d_correlate_within", with = "humantime_serde")]
    pub correlate_within: Duration,
    /// `stale_served_cert` / `stale_cert_file`: a newer SVID must have been
    /// issued this long ago (time to write files and reload) before a peer
    /// or file still holding the old one is stale; also how long a file may
    /// stay unreadable (half-written) before it counts.
    #[serde(default = "d_reload_grace", with = "humantime_serde")]
    pub reload_grace: Duration,
    /// Probe and certificate-file views older than this are blind (probes
    /// run less often than the loop ticks).
    #[serde(default = "d_probe_staleness", with = "humantime_serde")]
    pub probe_max_staleness: Duration,
}

fn d_burst_window() -> Duration {
    Duration::from_secs(30)
}
fn d_burst_baseline() -> Duration {
    Duration::from_secs(600)
}
fn d_burst_open_failures() -> u64 {
    10
}
fn d_burst_open_share() -> f64 {
    0.2
}
fn d_burst_factor() -> f64 {
    3.0
}
fn d_burst_close_failures() -> u64 {
    2
}
fn d_burst_close_share() -> f64 {
    0.05
}
fn d_correlate_within() -> Duration {
    Duration::from_secs(1800)
}
fn d_reload_grace() -> Duration {
    Duration::from_secs(30)
}
fn d_probe_staleness() -> Duration {
    Duration::from_secs(60)
}

fn d_sync_open() -> Duration {
    Duration::from_secs(30)
}
fn d_sync_close() -> Duration {
    Duration::from_secs(15)
}
fn d_renew_open() -> f64 {
    0.4
}
fn d_renew_close() -> f64 {
    0.45
}
fn d_resync_grace() -> Duration {
    Duration::from_secs(240)
}
fn d_ca_within() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn d_open_after() -> BTreeMap<String, Duration> {
    BTreeMap::from([
        ("bundle_divergence".to_string(), Duration::from_secs(30)),
        (
            "bootstrap_bundle_stale".to_string(),
            Duration::from_secs(10),
        ),
        ("server_unhealthy".to_string(), Duration::from_secs(5)),
    ])
}

mod open_after_serde {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|d| (k.clone(), d))
                    .map_err(|e| serde::de::Error::custom(format!("open_after.{k}: {e}")))
            })
            .collect()
    }
}

/// Guards applied to every step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guards {
    /// Default per-(target, actuator) cooldown.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Actions per rolling hour, all targets.
    pub budget_per_hour: u32,
    /// Hold disruptive agent actions (restart, evict, failover) while no
    /// configured server answers: a restarted agent serves nothing until it
    /// has synced, so that would turn "stale but working" into "down".
    #[serde(default = "d_true")]
    pub hold_disruptive_without_server: bool,
    /// Cluster circuit breaker: when more than this share of the watched
    /// agents is unhealthy at once, the cause is upstream; hold disruptive
    /// agent-level actions.
    #[serde(default = "d_breaker_share")]
    pub breaker_share: f64,
    /// … but only once at least this many agents are unhealthy.
    #[serde(default = "d_breaker_min")]
    pub breaker_min_agents: usize,
    /// A rung whose actuator failed verification this many times on the
    /// same target, while that target's incidents stayed open, is futile:
    /// exhausted for every incident on the target until they all close. A
    /// ladder with nothing left holds as `needs_operator`.
    #[serde(default = "d_futile_after")]
    pub futile_after: u32,
}

fn d_identity_grace() -> Duration {
    Duration::from_secs(10)
}

fn d_futile_after() -> u32 {
    2
}

fn d_true() -> bool {
    true
}
fn d_breaker_share() -> f64 {
    0.5
}
fn d_breaker_min() -> usize {
    2
}

/// One step of a ladder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rung {
    /// Actuator instance name (`refetch` or a configured one).
    pub actuator: String,
    /// Hard timeout of the actuator run.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Window for the symptom to clear after the run.
    #[serde(with = "humantime_serde")]
    pub verify_within: Duration,
    /// Overrides the default cooldown for this rung.
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
}

impl Thresholds {
    /// The agent SVID TTL to judge a server's agents by: the policy's
    /// `agent_svid_ttl` when set, else what was `learned` about the server.
    pub fn agent_ttl(&self, learned: Option<AgentTtl>) -> Option<AgentTtl> {
        match self.agent_svid_ttl {
            Some(ttl) => Some(AgentTtl {
                ttl,
                source: TtlSource::Policy,
            }),
            None => learned,
        }
    }
}

impl Policy {
    /// Every semantic problem (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let t = &self.thresholds;
        for (name, v) in [
            ("rotation_overdue_open", t.rotation_overdue_open),
            ("rotation_overdue_close", t.rotation_overdue_close),
            ("expiring_open", t.expiring_open),
            ("expiring_close", t.expiring_close),
        ] {
            if !(v > 0.0 && v < 1.0) {
                out.push(format!("thresholds.{name} = {v} must be between 0 and 1"));
            }
        }
        if t.rotation_overdue_close > t.rotation_overdue_open {
            out.push(
                "thresholds.rotation_overdue_close must not exceed rotation_overdue_open".into(),
            );
        }
        if t.expiring_close > t.expiring_open {
            out.push("thresholds.expiring_close must not exceed expiring_open".into());
        }
        if t.max_staleness.is_zero() {
            out.push("thresholds.max_staleness must be greater than zero".into());
        }
        if t.burst_window.is_zero() || t.burst_baseline.is_zero() {
            out.push("thresholds.burst_window and burst_baseline must be greater than zero".into());
        }
        if t.burst_close_failures >= t.burst_open_failures || t.burst_open_failures == 0 {
            out.push(
                "thresholds: need burst_close_failures < burst_open_failures (and > 0)".into(),
            );
        }
        if !(0.0 <= t.burst_close_share
            && t.burst_close_share < t.burst_open_share
            && t.burst_open_share <= 1.0)
        {
            out.push("thresholds: need 0 <= burst_close_share < burst_open_share <= 1".into());
        }
        if !(t.burst_factor >= 1.0 && t.burst_factor.is_finite()) {
            out.push("thresholds.burst_factor must be at least 1".into());
        }
        if t.sync_stale_close > t.sync_stale_open {
            out.push("thresholds.sync_stale_close must not exceed sync_stale_open".into());
        }
        if !(t.not_renewing_open > 0.0
            && t.not_renewing_open <= t.not_renewing_close
            && t.not_renewing_close < 1.0)
        {
            out.push("thresholds: need 0 < not_renewing_open <= not_renewing_close < 1".into());
        }
        if t.agent_svid_ttl.is_some_and(|d| d.is_zero()) {
            out.push("thresholds.agent_svid_ttl must be greater than zero".into());
        }
        for k in t.open_after.keys() {
            if SymptomKind::parse(k).is_none() {
                out.push(format!("thresholds.open_after.{k}: unknown symptom"));
            }
        }
        let g = &self.guards;
        if g.futile_after == 0 {
            out.push("guards.futile_after must be at least 1".into());
        }
        if !(g.breaker_share > 0.0 && g.breaker_share <= 1.0) {
            out.push(format!(
                "guards.breaker_share = {} must be in (0, 1]",
                g.breaker_share
            ));
        }
        for (symptom, ladder) in &self.ladders {
            if SymptomKind::parse(symptom).is_none() {
                out.push(format!("ladders.{symptom}: unknown symptom"));
            }
            for (i, r) in ladder.iter().enumerate() {
                if r.timeout.is_zero() {
                    out.push(format!(
                        "ladders.{symptom}[{i}].timeout must be greater than zero"
                    ));
                }
                if r.verify_within.is_zero() {
                    out.push(format!(
                        "ladders.{symptom}[{i}].verify_within must be greater than zero"
                    ));
                }
            }
        }
        out
    }

    /// (symptom, rung index, actuator) for every rung.
    pub fn actuators_used(&self) -> impl Iterator<Item = (&str, usize, &str)> {
        self.ladders.iter().flat_map(|(s, l)| {
            l.iter()
                .enumerate()
                .map(move |(i, r)| (s.as_str(), i, r.actuator.as_str()))
        })
    }

    /// The ladder for a symptom (empty when none).
    pub fn ladder(&self, kind: SymptomKind) -> &[Rung] {
        self.ladders
            .get(kind.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The cooldown of a rung.
    pub fn cooldown(&self, rung: &Rung) -> Duration {
        rung.cooldown.unwrap_or(self.guards.cooldown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_policy_is_valid() {
        let p = Policy::builtin().unwrap();
        assert!(p.problems().is_empty(), "{:?}", p.problems());
        for k in SymptomKind::ALL {
            let observe_only = matches!(
                k,
                SymptomKind::ServerUnhealthy
                    | SymptomKind::AllServersDown
                    | SymptomKind::CaExpiring
                    | SymptomKind::IdentityNotIssued
                    | SymptomKind::BootstrapBundleStale
            );
            assert_eq!(p.ladder(k).is_empty(), observe_only, "ladder for {k}");
        }
    }

    #[test]
    fn problems_are_listed() {
        let mut p = Policy::builtin().unwrap();
        p.thresholds.rotation_overdue_open = 1.5;
        p.thresholds.expiring_close = 0.99;
        p.ladders.insert("nonsense".into(), vec![]);
        p.guards.futile_after = 0;
        let problems = p.problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("futile_after")));
    }

    #[test]
    fn agent_svid_ttl_is_learned_unless_the_policy_sets_it() {
        let learned = AgentTtl {
            ttl: Duration::from_secs(599),
            source: TtlSource::Learned,
        };
        let p = Policy::builtin().unwrap();
        assert_eq!(p.thresholds.agent_svid_ttl, None);
        assert_eq!(p.thresholds.agent_ttl(Some(learned)), Some(learned));
        assert_eq!(p.thresholds.agent_ttl(None), None);
        // Policies written before the TTL was learned still load, and their
        // value wins.
        let text =
            DEFAULT_POLICY.replace("[thresholds]\n", "[thresholds]\nagent_svid_ttl = \"1h\"\n");
        let p = Policy::from_toml(&text, "p.toml").unwrap();
        assert_eq!(
            p.thresholds.agent_ttl(Some(learned)),
            Some(AgentTtl {
                ttl: Duration::from_secs(3600),
                source: TtlSource::Policy
            })
        );
        let zero =
            DEFAULT_POLICY.replace("[thresholds]\n", "[thresholds]\nagent_svid_ttl = \"0s\"\n");
        let p = Policy::from_toml(&zero, "p.toml").unwrap();
        assert_eq!(p.problems().len(), 1, "{:?}", p.problems());
    }

    #[test]
    fn unknown_policy_key_is_rejected() {
        let text = DEFAULT_POLICY.replace("[guards]", "[guards]\nbudget = 3");
        assert!(Policy::from_toml(&text, "p.toml").is_err());
    }
}
