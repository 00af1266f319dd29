//! Remediation policy (TOML): thresholds, guards and per-symptom ladders.
//! Plain data that `plan` reads; reading and parsing the file belong to
//! `config` (`Policy::builtin`, `Policy::load`), so the pure stages never
//! reach the configuration.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer};

use crate::model::{AgentTtl, SymptomKind, TtlSource};

pub mod maintenance;

pub use maintenance::MaintenanceWindow;

/// The built-in policy, `policies/default.toml`.
pub const DEFAULT_POLICY: &str = include_str!("../policies/default.toml");

/// How much an actuator disturbs its target: decides which do-no-harm
/// guards apply. Named in the policy as `gentle`, `agent_local`,
/// `failover` and `workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// Evicts, deletes or restarts a workload's pods through Kubernetes:
    /// the workload runs short of a replica until the replacement is Ready,
    /// and the replacement needs its SVID from SPIRE. Whatever its target
    /// (a peer, a certificate file, an SVID), held while no server answers
    /// (`hold_disruptive_without_server`) and while the cluster breaker is
    /// open (the cause is upstream: replacing pods cannot fix it and takes
    /// capacity away meanwhile); counted by the blast radius like every
    /// disruptive class.
    Workload,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 4] = [
        Class::Gentle,
        Class::AgentLocal,
        Class::Failover,
        Class::Workload,
    ];

    /// Policy name.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Gentle => "gentle",
            Class::AgentLocal => "agent_local",
            Class::Failover => "failover",
            Class::Workload => "workload",
        }
    }

    /// Whether it can disturb its target (everything but [`Class::Gentle`]):
    /// what the blast-radius guard counts.
    pub fn is_disruptive(self) -> bool {
        self != Class::Gentle
    }
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
    /// Maintenance windows (`[[maintenance]]`): while one is open, the
    /// classes and actuators it lists hold with `maintenance_window`.
    #[serde(default)]
    pub maintenance: Vec<MaintenanceWindow>,
    /// Symptoms this instance records but leaves to the cluster instance
    /// (held as `left_to_cluster`): set from the config's `role` (a node
    /// instance's are [`crate::leadership::CLUSTER_SYMPTOMS`]), never read
    /// from the policy file.
    #[serde(skip)]
    pub left_to_cluster: Vec<SymptomKind>,
}

/// Open and close conditions of the symptoms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Share of lifetime past which an unreplaced SVID is overdue.
    pub rotation_overdue_open: f64,
    /// Overdue closes below this share (a new serial).
    pub rotation_overdue_close: f64,
    /// Added to the rotation point before an SVID is overdue and taken off
    /// the share an agent SVID must keep before it is not renewing: SPIRE
    /// decides to rotate only when it looks (at each sync, every 5 s by
    /// default, and on its rotator's tick), so a healthy rotation lands up
    /// to about one check period after the point. Negligible for 1 h SVIDs,
    /// decisive for short ones (a 30 s agent SVID renews with 38 % left).
    #[serde(default = "d_rotation_slack", with = "humantime_serde")]
    pub rotation_check_slack: Duration,
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
    /// How long an agent's Debug API must have answered no poll in time
    /// (the socket accepts, the process does not answer: a stopped agent),
    /// with nothing on its Workload API stream either, before
    /// `agent_unreachable` opens while the stream still looks up. Measured
    /// from the start of the first poll that timed out to the end of the
    /// latest, so one slow answer never opens it: with the default 2 s
    /// poll deadline, 5 s takes three polls in a row.
    #[serde(default = "d_hung_after", with = "humantime_serde")]
    pub hung_after: Duration,
    /// Sensor views older than this are blind.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// `agent_sync_stale` opens when the agent's last successful sync was
    /// older than this when the agent computed its Debug answer (SPIRE syncs
    /// every 5 s by default; its Debug API caches answers for 5 s, which the
    /// `agent_debug` sensor accounts for in `answered_after`).
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
    Duration::from_secs(8)
}
fn d_sync_close() -> Duration {
    Duration::from_secs(6)
}
fn d_rotation_slack() -> Duration {
    Duration::from_secs(10)
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
    /// At most this many actions running or awaiting verification at once
    /// (all targets, all classes); more hold as `max_concurrent`.
    #[serde(default = "d_max_concurrent")]
    pub max_concurrent_actions: u32,
    /// Which steps need a person's yes (`[guards.approval]`).
    #[serde(default)]
    pub approval: ApprovalGuard,
    /// Steps that verify too rarely are skipped (`[guards.demotion]`).
    #[serde(default)]
    pub demotion: DemotionGuard,
    /// How much of a group may be under disruptive action at once
    /// (`[guards.blast_radius]`).
    #[serde(default)]
    pub blast_radius: BlastRadius,
}

fn d_max_concurrent() -> u32 {
    4
}

/// `[guards.approval]`: approval per actuator class.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalGuard {
    /// Steps of these classes need an approval, unless their rung says
    /// `approval = "none"`. Empty (the default): only rungs with
    /// `approval = "required"` do.
    #[serde(default)]
    pub classes: Vec<Class>,
    /// A pending approval nobody decided within this is expired (held as
    /// `approval_expired`) and asked for again.
    #[serde(default = "d_approval_expiry", with = "humantime_serde")]
    pub expires_after: Duration,
}

impl Default for ApprovalGuard {
    fn default() -> Self {
        Self {
            classes: Vec::new(),
            expires_after: d_approval_expiry(),
        }
    }
}

fn d_approval_expiry() -> Duration {
    Duration::from_secs(15 * 60)
}

/// `[guards.demotion]`: a (symptom, actuator) step whose share of verified
/// runs over its last `window` runs falls below `min_success_ratio` is
/// demoted: skipped (the ladder moves on) until an operator resets it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemotionGuard {
    /// Off: nothing is demoted, and steps demoted before are not skipped
    /// (they stay recorded until reset).
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Runs judged (verified or failed), per (symptom, actuator); nothing
    /// is demoted before there are this many.
    #[serde(default = "d_demotion_window")]
    pub window: usize,
    /// Demoted when verified / window falls below this.
    #[serde(default = "d_min_success_ratio")]
    pub min_success_ratio: f64,
}

impl Default for DemotionGuard {
    fn default() -> Self {
        Self {
            enabled: true,
            window: d_demotion_window(),
            min_success_ratio: d_min_success_ratio(),
        }
    }
}

fn d_demotion_window() -> usize {
    5
}
fn d_min_success_ratio() -> f64 {
    0.4
}

/// `[guards.blast_radius]`: at most this much of a group under disruptive
/// action (any class but `gentle`) at once, counting actions running or
/// awaiting verification and those planned in the same tick; more hold as
/// `blast_radius`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlastRadius {
    /// Off: no group limit (`max_concurrent_actions` still applies).
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Of all configured agents.
    #[serde(default = "d_radius_agents")]
    pub agents: Limit,
    /// Of the agents behind one server.
    #[serde(default = "d_radius_server")]
    pub per_server: Limit,
    /// Of the peers of one name: the part of a peer's (or certificate
    /// file's) name before its first `/`, so `web/a` and `web/b` are two
    /// instances of `web`. Configured Kubernetes workloads that select the
    /// same pods (one namespace, one selector) are one group, whatever
    /// their names.
    #[serde(default = "d_radius_peer")]
    pub per_peer: Limit,
}

impl Default for BlastRadius {
    fn default() -> Self {
        Self {
            enabled: true,
            agents: d_radius_agents(),
            per_server: d_radius_server(),
            per_peer: d_radius_peer(),
        }
    }
}

fn d_radius_agents() -> Limit {
    Limit::Percent(25.0)
}
fn d_radius_server() -> Limit {
    Limit::Percent(50.0)
}
fn d_radius_peer() -> Limit {
    Limit::Count(1)
}

/// A group limit: a count (`2`) or a share of the group (`"25%"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// At most this many.
    Count(u32),
    /// At most this percentage of the group, rounded down, but at least 1.
    Percent(f64),
}

impl Limit {
    /// How many members of a group of `size` may be under action at once:
    /// a count as written; a percentage rounded down but at least 1, so a
    /// small group is never frozen entirely.
    pub fn of(self, size: usize) -> usize {
        match self {
            Limit::Count(n) => n as usize,
            Limit::Percent(p) => ((size as f64 * p / 100.0).floor() as usize).max(1),
        }
    }

    /// What is wrong with it, if anything.
    fn problem(self) -> Option<String> {
        match self {
            Limit::Count(0) => Some("0 would hold every disruptive step: use at least 1".into()),
            Limit::Percent(p) if !(p > 0.0 && p <= 100.0) => {
                Some(format!("{p}% must be above 0% and at most 100%"))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Limit;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a count such as 2 or a percentage such as \"25%\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Limit, E> {
                u32::try_from(v)
                    .map(Limit::Count)
                    .map_err(|_| E::custom(format!("{v} must be a count from 0 to {}", u32::MAX)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Limit, E> {
                u32::try_from(v)
                    .map(Limit::Count)
                    .map_err(|_| E::custom(format!("{v} must be a count from 0 to {}", u32::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Limit, E> {
                v.trim()
                    .strip_suffix('%')
                    .and_then(|n| n.trim().parse::<f64>().ok())
                    .map(Limit::Percent)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "{v:?} is not a percentage such as \"25%\" (a count is written without quotes)"
                        ))
                    })
            }
        }
        d.deserialize_any(V)
    }
}

fn d_identity_grace() -> Duration {
    Duration::from_secs(10)
}

fn d_hung_after() -> Duration {
    Duration::from_secs(5)
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
    /// `"required"`: the step waits for an operator's approval; `"none"`:
    /// it never does, whatever `[guards.approval] classes` says. Unset: as
    /// its actuator's class says.
    #[serde(default)]
    pub approval: Option<ApprovalMode>,
}

/// Whether a rung needs a person's yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalMode {
    /// It waits for an approval.
    Required,
    /// It never does.
    #[serde(rename = "none")]
    NotRequired,
}

/// The largest share of a lifetime [`Thresholds::rotation_check_slack`]
/// may take: overdue stays well before expiring (0.65 + 0.1 < 0.85), and
/// `agent_not_renewing` still opens with 30 % of the TTL left.
pub const MAX_ROTATION_SLACK_SHARE: f64 = 0.1;

impl Thresholds {
    /// `rotation_check_slack` as a share of `lifetime`, at most
    /// [`MAX_ROTATION_SLACK_SHARE`] (0 for an empty lifetime).
    pub fn rotation_slack_share(&self, lifetime: Duration) -> f64 {
        let life = lifetime.as_secs_f64();
        if life <= 0.0 {
            return 0.0;
        }
        (self.rotation_check_slack.as_secs_f64() / life).min(MAX_ROTATION_SLACK_SHARE)
    }

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
        if t.hung_after.is_zero() {
            out.push(
                "thresholds.hung_after must be greater than zero (one slow Debug answer must not open agent_unreachable)"
                    .into(),
            );
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
        if g.max_concurrent_actions == 0 {
            out.push("guards.max_concurrent_actions must be at least 1".into());
        }
        if g.approval.expires_after.is_zero() {
            out.push("guards.approval.expires_after must be greater than zero".into());
        }
        let d = &g.demotion;
        if !(1..=crate::knowledge::VERDICT_WINDOW).contains(&d.window) {
            out.push(format!(
                "guards.demotion.window = {} must be from 1 to {}",
                d.window,
                crate::knowledge::VERDICT_WINDOW
            ));
        }
        if !(d.min_success_ratio > 0.0 && d.min_success_ratio <= 1.0) {
            out.push(format!(
                "guards.demotion.min_success_ratio = {} must be in (0, 1]",
                d.min_success_ratio
            ));
        }
        let b = &g.blast_radius;
        for (name, limit) in [
            ("agents", b.agents),
            ("per_server", b.per_server),
            ("per_peer", b.per_peer),
        ] {
            if let Some(why) = limit.problem() {
                out.push(format!("guards.blast_radius.{name}: {why}"));
            }
        }
        for (i, w) in self.maintenance.iter().enumerate() {
            for (field, why) in w.problems() {
                out.push(format!("maintenance[{i}].{field}: {why}"));
            }
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

    /// How long a pending approval waits for a decision before it expires
    /// (`guards.approval.expires_after`).
    pub fn approval_expiry(&self) -> Duration {
        self.guards.approval.expires_after
    }

    /// Whether a step of `rung`, whose actuator is of `class`, needs an
    /// operator's approval: the rung's `approval` when set, else whether
    /// `guards.approval.classes` lists the class.
    pub fn needs_approval(&self, rung: &Rung, class: Class) -> bool {
        match rung.approval {
            Some(ApprovalMode::Required) => true,
            Some(ApprovalMode::NotRequired) => false,
            None => self.guards.approval.classes.contains(&class),
        }
    }

    /// The maintenance windows open at `now`, each with when it closes.
    pub fn open_maintenance(&self, now: SystemTime) -> Vec<(&MaintenanceWindow, SystemTime)> {
        self.maintenance
            .iter()
            .filter_map(|w| Some((w, w.open_until(now)?)))
            .collect()
    }

    /// When the maintenance window holding `actuator` (of `class`) at `now`
    /// closes (the latest, when several do); `None`: no window holds it.
    pub fn maintenance_until(
        &self,
        now: SystemTime,
        class: Class,
        actuator: &str,
    ) -> Option<SystemTime> {
        self.open_maintenance(now)
            .into_iter()
            .filter(|(w, _)| w.holds(class, actuator))
            .map(|(_, until)| until)
            .max()
    }
}

#[cfg(test)]
mod tests;
