//! Domain vocabulary shared by every stage: subjects, observed SVIDs,
//! symptoms, incidents, steps, outcomes and the events written to the store.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

// === Subjects ===

/// What a symptom, incident or action is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    /// A SPIRE agent, by its configured name.
    Agent {
        /// Configured agent name.
        agent: String,
    },
    /// A SPIRE server, by its configured name.
    Server {
        /// Configured server name.
        server: String,
    },
    /// The whole trust domain (bundle, CA, all servers).
    Cluster {
        /// Trust domain name.
        trust_domain: String,
    },
    /// One SVID identity as served by one agent.
    Svid {
        /// Configured agent name.
        agent: String,
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
    },
    /// An mTLS endpoint (a probed target, or one named in reports), by its
    /// configured or reported name.
    Peer {
        /// Target name.
        peer: String,
    },
    /// Handshakes to one peer failing for one reason.
    Handshakes {
        /// Target name.
        peer: String,
        /// Failure reason (`unknown_ca`, …).
        reason: crate::handshake::Reason,
    },
    /// A certificate file on disk, by its configured name.
    CertFile {
        /// Configured `cert_files` name.
        file: String,
    },
}

impl Subject {
    /// An agent subject.
    pub fn agent(agent: impl Into<String>) -> Self {
        Subject::Agent {
            agent: agent.into(),
        }
    }

    /// An SVID subject.
    pub fn svid(agent: impl Into<String>, spiffe_id: impl Into<String>) -> Self {
        Subject::Svid {
            agent: agent.into(),
            spiffe_id: spiffe_id.into(),
        }
    }

    /// A server subject.
    pub fn server(server: impl Into<String>) -> Self {
        Subject::Server {
            server: server.into(),
        }
    }

    /// The cluster subject of a trust domain.
    pub fn cluster(trust_domain: impl Into<String>) -> Self {
        Subject::Cluster {
            trust_domain: trust_domain.into(),
        }
    }

    /// A peer subject.
    pub fn peer(peer: impl Into<String>) -> Self {
        Subject::Peer { peer: peer.into() }
    }

    /// The handshake-failure subject of a peer and reason.
    pub fn handshakes(peer: impl Into<String>, reason: crate::handshake::Reason) -> Self {
        Subject::Handshakes {
            peer: peer.into(),
            reason,
        }
    }

    /// A certificate-file subject.
    pub fn cert_file(file: impl Into<String>) -> Self {
        Subject::CertFile { file: file.into() }
    }

    /// `agent`, `workload`, `server` or `cluster`: the store's `subjects.kind`.
    /// Peers, their handshakes and certificate files are workloads.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::Agent { .. } => "agent",
            Subject::Svid { .. }
            | Subject::Peer { .. }
            | Subject::Handshakes { .. }
            | Subject::CertFile { .. } => "workload",
            Subject::Server { .. } => "server",
            Subject::Cluster { .. } => "cluster",
        }
    }

    /// What actions on this subject target: the agent an SVID or agent
    /// subject lives on, the server, the trust domain, the peer, or the
    /// certificate file's name.
    pub fn agent_name(&self) -> &str {
        match self {
            Subject::Agent { agent } | Subject::Svid { agent, .. } => agent,
            Subject::Server { server } => server,
            Subject::Cluster { trust_domain } => trust_domain,
            Subject::Peer { peer } | Subject::Handshakes { peer, .. } => peer,
            Subject::CertFile { file } => file,
        }
    }

    /// Whether this subject is an agent or lives on one.
    pub fn is_agent_level(&self) -> bool {
        matches!(self, Subject::Agent { .. } | Subject::Svid { .. })
    }

    /// Whether remediation may act on it: everything but servers and the
    /// cluster, which are reported only (a server's pod is the exception:
    /// the plan lets a `workload` rung replace it).
    pub fn is_actionable(&self) -> bool {
        !matches!(self, Subject::Server { .. } | Subject::Cluster { .. })
    }

    /// Parses the [`Display`](fmt::Display) form back.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(rest) = s.strip_prefix("agent:") {
            return Some(Subject::agent(rest));
        }
        if let Some(rest) = s.strip_prefix("server:") {
            return Some(Subject::server(rest));
        }
        if let Some(rest) = s.strip_prefix("cluster:") {
            return Some(Subject::cluster(rest));
        }
        if let Some(rest) = s.strip_prefix("peer:") {
            return Some(Subject::peer(rest));
        }
        if let Some(rest) = s.strip_prefix("cert_file:") {
            return Some(Subject::cert_file(rest));
        }
        if let Some(rest) = s.strip_prefix("handshakes:") {
            let (peer, reason) = rest.rsplit_once('/')?;
            return Some(Subject::handshakes(
                peer,
                crate::handshake::Reason::parse(reason)?,
            ));
        }
        let rest = s.strip_prefix("svid:")?;
        let (agent, id) = rest.split_once('/')?;
        Some(Subject::svid(agent, id))
    }
}

/// `agent:<name>`, `server:<name>`, `cluster:<trust domain>`,
/// `svid:<agent>/<spiffe id>`, `peer:<name>`, `handshakes:<peer>/<reason>` or
/// `cert_file:<name>`: the store key.
impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Agent { agent } => write!(f, "agent:{agent}"),
            Subject::Server { server } => write!(f, "server:{server}"),
            Subject::Cluster { trust_domain } => write!(f, "cluster:{trust_domain}"),
            Subject::Svid { agent, spiffe_id } => write!(f, "svid:{agent}/{spiffe_id}"),
            Subject::Peer { peer } => write!(f, "peer:{peer}"),
            Subject::Handshakes { peer, reason } => write!(f, "handshakes:{peer}/{reason}"),
            Subject::CertFile { file } => write!(f, "cert_file:{file}"),
        }
    }
}

// === Observed SVIDs ===

/// One X.509-SVID as the Workload API served it, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvidObservation {
    /// SPIFFE ID from the response (the URI SAN when valid).
    pub spiffe_id: String,
    /// Leaf serial, lower-case hex; empty when the leaf did not parse.
    pub serial: String,
    /// Leaf notBefore.
    pub not_before: SystemTime,
    /// Leaf notAfter.
    pub not_after: SystemTime,
    /// `None` when the SVID passed every check of the X509-SVID spec.
    pub invalid: Option<String>,
    /// When this serial was first delivered.
    pub first_seen: SystemTime,
    /// Which CA key signed the leaf ([`crate::svid::LeafInfo::issuer`]);
    /// empty when the leaf did not parse.
    #[serde(default)]
    pub issuer: String,
}

impl SvidObservation {
    /// notAfter − notBefore.
    pub fn lifetime(&self) -> std::time::Duration {
        crate::clock::saturating_since(self.not_after, self.not_before)
    }

    /// Share of the lifetime elapsed at `now` (0.0 at notBefore, 1.0 at notAfter).
    pub fn elapsed_fraction(&self, now: SystemTime) -> f64 {
        let life = self.lifetime().as_secs_f64();
        if life <= 0.0 {
            return 1.0;
        }
        crate::clock::saturating_since(now, self.not_before).as_secs_f64() / life
    }
}

/// [`AgentView::last_error`] of a stream the agent refused with
/// `PermissionDenied`: it issued no identity to the caller, so nothing is
/// served (the Workload API spec: no identity, nothing to keep).
pub const NO_IDENTITY: &str = "permission_denied";

/// State of a Workload API stream pair as the sensor last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStatus {
    /// Both streams open and the agent has answered since the last (re)connect.
    Up,
    /// Connecting, or connected but no first message yet (not yet overdue).
    Connecting,
    /// Connected but the agent has not answered within the answer timeout.
    Unanswered,
    /// The connection failed or the stream ended.
    Down,
    /// The agent refused us permanently (`InvalidArgument`/`Unimplemented`).
    Rejected,
    /// The agent answers but issues us no identity (`PermissionDenied`: no
    /// registration entry matches our selectors); retried.
    NoIdentity,
}

impl StreamStatus {
    /// Snake-case name for metrics and evidence.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamStatus::Up => "up",
            StreamStatus::Connecting => "connecting",
            StreamStatus::Unanswered => "unanswered",
            StreamStatus::Down => "down",
            StreamStatus::Rejected => "rejected",
            StreamStatus::NoIdentity => "no_identity",
        }
    }
}

/// What the Workload API sensor knows about one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    /// Configured agent name.
    pub agent: String,
    /// Stream state.
    pub status: StreamStatus,
    /// Since when the stream has been in `status`.
    pub status_since: SystemTime,
    /// Last gRPC status code or transport error class, if any.
    pub last_error: Option<String>,
    /// Last message received on the SVID stream.
    pub last_message: Option<SystemTime>,
    /// SVIDs from the last message (full state), kept while the stream is down.
    pub svids: Vec<SvidObservation>,
    /// Number of CA certificates in the agent's own trust-domain bundle.
    pub bundle_authorities: usize,
    /// SHA-256 fingerprints (hex) of the agent's own trust-domain bundle,
    /// sorted: compared with the servers' bundles.
    pub bundle: Vec<String>,
    /// Count of rotations (new serial for a known SPIFFE ID) since start.
    pub rotations: u64,
    /// When the sensor last refreshed this view (its heartbeat); an old
    /// value means the sensor itself is stuck and the view is blind.
    pub updated_at: SystemTime,
}

/// One agent as a SPIRE server lists it (`Agent.ListAgents`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerAgent {
    /// `spiffe://td/spire/agent/...`.
    pub spiffe_id: String,
    /// Node attestor type.
    pub attestation_type: String,
    /// Current agent SVID serial; empty when banned.
    pub serial: String,
    /// Agent SVID notAfter.
    pub expires_at: SystemTime,
    /// Banned (cannot re-attest until deleted).
    pub banned: bool,
    /// Can re-attest after eviction.
    pub can_reattest: bool,
}

/// How the agent SVID TTL of a server is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TtlSource {
    /// `thresholds.agent_svid_ttl` in the policy (an override).
    Policy,
    /// From a renewal seen between two listings: the new SVID's lifetime
    /// left when first listed, at most a poll interval and a sync interval
    /// short of the TTL.
    Learned,
    /// The longest lifetime left seen on any listed SVID of unknown age: a
    /// lower bound, until a renewal is seen.
    LowerBound,
}

impl TtlSource {
    /// Stable snake_case name (evidence, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Learned => "learned",
            Self::LowerBound => "lower_bound",
        }
    }
}

/// The agent SVID TTL (`agent_ttl`) of a server, and how it is known. Never
/// more than the real TTL unless the policy says so: a shorter TTL only
/// makes an agent's share of it left look larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentTtl {
    /// The TTL.
    pub ttl: std::time::Duration,
    /// Where it comes from.
    pub source: TtlSource,
}

/// Learned agent SVID TTLs by configured server name (the loop's memory,
/// handed to `analyze`).
pub type LearnedTtls = std::collections::HashMap<String, AgentTtl>;

/// One X.509 authority of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authority {
    /// SHA-256 of the DER, lower-case hex: identity across sources.
    pub fingerprint: String,
    /// Subject key identifier (hex) when present, as SPIRE names authorities.
    pub key_id: String,
    /// notAfter.
    pub not_after: SystemTime,
    /// Tainted (forced rotation in progress).
    pub tainted: bool,
}

/// What the `server_api` sensor knows about one SPIRE server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    /// Configured server name.
    pub server: String,
    /// The admin API answered on the last poll.
    pub reachable: bool,
    /// Closed-set error class of the last failed poll.
    pub last_error: Option<String>,
    /// Since when `reachable` has had its current value.
    pub since: SystemTime,
    /// When the sensor last refreshed this view.
    pub updated_at: SystemTime,
    /// Server uptime (Debug.GetInfo).
    pub uptime_secs: u64,
    /// The server's own SVID chain notAfter (earliest in the chain).
    pub svid_expires_at: Option<SystemTime>,
    /// Agents known to the server (Debug.GetInfo count).
    pub agents_count: u64,
    /// Registration entries (Debug.GetInfo count).
    pub entries_count: u64,
    /// Agents listed (paged ListAgents), possibly truncated.
    pub agents: Vec<ServerAgent>,
    /// Paging stopped at the configured bound before the end.
    pub agents_truncated: bool,
    /// Trust bundle (Bundle.GetBundle).
    pub bundle: Vec<Authority>,
    /// Bundle sequence number.
    pub bundle_sequence: u64,
    /// Registration entries looked up for SPIFFE IDs an agent refuses us.
    pub entry_lookups: Vec<EntryLookup>,
    /// A TLS handshake to the server's agent-facing `address` (the
    /// `host:port` agents dial) succeeded from this node on the last poll;
    /// `None` when no address is configured (or before the first poll). The
    /// admin API can answer while agents cannot reach the server.
    #[serde(default)]
    pub address_reachable: Option<bool>,
    /// Closed-set error class of the last failed address check
    /// (`refused`, `timeout`, `protocol`, `unresolved`).
    #[serde(default)]
    pub address_error: Option<String>,
}

impl ServerView {
    /// Agents can reach the server, as far as we know: its admin API answers
    /// and its agent-facing address is not known to be unreachable.
    pub fn serves_agents(&self) -> bool {
        self.reachable && self.address_reachable != Some(false)
    }
}

/// What a server holds for a SPIFFE ID: one an agent refuses to issue us,
/// or a configured agent's node alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryLookup {
    /// The agent that refused it, or whose node alias it is.
    pub agent: String,
    pub spiffe_id: String,
    /// `spiffe_id` is the agent's node alias: its entries' parent is the
    /// agent's own SPIFFE ID.
    pub alias: bool,
    /// The entries for it (`None`: the lookup failed, see `error`).
    pub entries: Option<Vec<EntrySummary>>,
    /// Closed-set error class of a failed lookup.
    pub error: Option<String>,
}

/// One registration entry, as much as a diagnosis needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySummary {
    /// Entry id.
    pub id: String,
    /// Parent SPIFFE ID (the agent or a node alias).
    pub parent_id: String,
    /// `type:value`.
    pub selectors: Vec<String>,
}

#[cfg(test)]
impl ServerView {
    /// A view of server `name` polled at `at`: reachable, or failed with
    /// `unavailable`; its bundle holds one authority per fingerprint.
    pub(crate) fn test(name: &str, reachable: bool, fingerprints: &[&str], at: SystemTime) -> Self {
        Self {
            server: name.into(),
            reachable,
            last_error: (!reachable).then(|| "unavailable".into()),
            since: at,
            updated_at: at,
            uptime_secs: 0,
            svid_expires_at: None,
            agents_count: 0,
            entries_count: 0,
            agents: Vec::new(),
            agents_truncated: false,
            bundle: fingerprints
                .iter()
                .map(|f| Authority {
                    fingerprint: f.to_string(),
                    key_id: String::new(),
                    not_after: at + std::time::Duration::from_secs(86_400),
                    tainted: false,
                })
                .collect(),
            bundle_sequence: 0,
            entry_lookups: Vec::new(),
            address_reachable: None,
            address_error: None,
        }
    }
}

/// How long spire-agent serves one computed Debug `GetInfo` answer
/// (`cacheExpiry` in SPIRE's `pkg/agent/api/debug/v1/service.go`).
pub const SPIRE_DEBUG_ANSWER_CACHE: Duration = Duration::from_secs(5);

/// What the `agent_debug` sensor knows about one agent (admin socket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDebugView {
    /// Configured agent name.
    pub agent: String,
    /// The admin API answered on the last poll.
    pub reachable: bool,
    /// Closed-set error class of the last failed poll.
    pub last_error: Option<String>,
    /// Start of the first of the polls in a row, up to the last one, that
    /// got no answer within the deadline (`timeout`): the socket accepted
    /// but the process did not answer, as a stopped (hung) agent does.
    /// `None` after an answer or any other failure (a refused or missing
    /// socket is an agent that is down, which its stream sees).
    #[serde(default)]
    pub unanswered_since: Option<SystemTime>,
    /// When the sensor last refreshed this view.
    pub updated_at: SystemTime,
    /// Last successful sync with a server.
    pub last_sync_success: Option<SystemTime>,
    /// The agent computed the answer this view holds after this instant (a
    /// lower bound: SPIRE caches its Debug answer for 5 s, so the answer is
    /// younger than the poll that read it minus 5 s, and younger than the
    /// last poll that read a different answer). `last_sync_success` was the
    /// agent's last sync at least until then.
    #[serde(default)]
    pub answered_after: Option<SystemTime>,
    /// Agent uptime.
    pub uptime_secs: u64,
    /// Cached X.509-SVIDs.
    pub cached_x509_svids: u64,
    /// The agent's own SPIFFE ID (leaf of its SVID chain).
    pub spiffe_id: Option<String>,
    /// The agent's own SVID notAfter (earliest in its chain).
    pub svid_expires_at: Option<SystemTime>,
}

/// Which kind of SPIRE process a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// spire-agent.
    Agent,
    /// spire-server.
    Server,
    /// An Envoy proxy fed by SPIRE's SDS (metrics only).
    Envoy,
}

/// HTTP `/live` and `/ready` of one SPIRE process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthView {
    /// Configured agent or server name.
    pub target: String,
    /// Agent or server.
    pub role: Role,
    /// `/live` answered 200 (None: not reachable).
    pub live: Option<bool>,
    /// `/ready` answered 200 (None: not reachable).
    pub ready: Option<bool>,
    /// Closed-set error class of the last failed probe.
    pub last_error: Option<String>,
    /// When probed.
    pub updated_at: SystemTime,
}

/// One scraped Prometheus sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels, sorted by name.
    pub labels: Vec<(String, String)>,
    /// Prometheus values may be NaN or infinite, which JSON writes as
    /// `null`: read back as NaN.
    #[serde(deserialize_with = "null_as_nan")]
    pub value: f64,
}

/// An `f64` that JSON may hold as `null` (how it writes NaN and infinities).
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A scrape of one SPIRE (or Envoy) metrics endpoint, reduced to the
/// series spire-healer uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsView {
    /// Configured agent or server name.
    pub target: String,
    /// Agent or server.
    pub role: Role,
    /// The endpoint answered and parsed.
    pub reachable: bool,
    /// Closed-set error class of the last failed scrape.
    pub last_error: Option<String>,
    /// When scraped.
    pub updated_at: SystemTime,
    /// Samples kept (filtered by the sensor's name list).
    pub samples: Vec<Sample>,
    /// Agent: its syncs with its server as its counters showed them from
    /// scrape to scrape; kept through failed scrapes, `None` until the
    /// agent has counted a sync.
    #[serde(default)]
    pub sync: Option<SyncCounters>,
}

/// An agent's syncs with its server, from its own counters
/// (`spire_agent_manager_sync_fetch_entries_updates`, one per sync, labelled
/// by status) as successive scrapes read them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SyncCounters {
    /// Successful syncs counted, as last read.
    pub ok: f64,
    /// Failed syncs counted, as last read.
    pub failed: f64,
    /// Failed syncs counted at `ok_seen_at`.
    pub failed_at_ok: f64,
    /// The scrape that first showed the latest successful sync (its count
    /// rose): that sync happened before it, and none since, up to
    /// `read_at`.
    pub ok_seen_at: SystemTime,
    /// The latest scrape that read the counters.
    pub read_at: SystemTime,
    /// `spire_agent_uptime_in_ms` as last read: a drop is a restart.
    pub uptime_ms: Option<f64>,
}

impl SyncCounters {
    /// How long the agent has certainly not synced: `read_at − ok_seen_at`
    /// (a lower bound of the age of its last successful sync; a healthy
    /// agent stays below its sync interval plus one sync's duration,
    /// whatever the scrape period).
    pub fn confirmed_stale(&self) -> Duration {
        crate::clock::saturating_since(self.read_at, self.ok_seen_at)
    }

    /// Failed syncs counted since the latest successful one was seen.
    pub fn failed_since_ok(&self) -> f64 {
        (self.failed - self.failed_at_ok).max(0.0)
    }
}

/// The leaf certificate a peer presented in a handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCert {
    /// URI SAN, when it has exactly one `spiffe://` URI.
    pub spiffe_id: Option<String>,
    /// Serial, lower-case hex without leading zeros (as [`SvidObservation`]).
    pub serial: String,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
}

/// One active mTLS probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Outcome.
    pub reason: crate::handshake::Reason,
    /// When the probe finished.
    pub at: SystemTime,
    /// Connect plus handshake time.
    pub latency: std::time::Duration,
    /// The peer's leaf, when it presented one (also on verification failure).
    pub peer: Option<PeerCert>,
    /// Short, human-readable detail of a failure (never a metric label).
    pub detail: Option<String>,
    /// The failure is the peer's verdict on *our* certificate (a TLS alert),
    /// not ours on its: an `unknown_ca` from the peer means it lacks our CA,
    /// i.e. holds a stale bundle.
    #[serde(default)]
    pub peer_refused: bool,
}

/// What the `handshake_probe` sensor knows about one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeView {
    /// Configured target name.
    pub target: String,
    /// `host:port` or `unix:///path`, for evidence.
    pub address: String,
    /// The SPIFFE ID expected of the peer, if one is configured.
    pub expected_id: Option<String>,
    /// The `cert_files` source this peer serves from, if configured: its
    /// serial is what the peer should present.
    pub cert_file: Option<String>,
    /// Last probe (None: not probed yet).
    pub last: Option<ProbeResult>,
    /// Last probe in which the peer presented a certificate.
    pub last_peer: Option<ProbeResult>,
    /// When the sensor last refreshed this view.
    pub updated_at: SystemTime,
}

/// What the `cert_files` sensor knows about one certificate file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertFileView {
    /// Configured name.
    pub file: String,
    /// Certificate path, for evidence.
    pub path: String,
    /// The agent whose Workload API issues this identity, if configured.
    pub agent: Option<String>,
    /// Closed-set problem with the file (`missing`, `truncated`,
    /// `not_a_certificate`, …); None when its leaf parsed.
    pub error: Option<String>,
    /// The leaf as parsed (kept from the last good read while `error` is set).
    pub leaf: Option<PeerCert>,
    /// `None` when the leaf passed the X509-SVID checks, else the problem.
    pub invalid: Option<String>,
    /// SHA-256 fingerprints (hex, sorted) of the bundle file, if configured.
    pub bundle: Vec<String>,
    /// Closed-set problem with the bundle file, if configured and bad.
    pub bundle_error: Option<String>,
    /// When the file's content or its error kind last changed (as first
    /// seen by the sensor): a file that just went missing or half-written
    /// gets the reload grace from here.
    pub changed_at: SystemTime,
    /// When the sensor last refreshed this view.
    pub updated_at: SystemTime,
}

/// What the `bootstrap_bundle` sensor knows about one agent's bootstrap
/// trust bundle (`trust_bundle_path`): the file an agent that lost its
/// `data_dir` attests with, so it must still hold a current authority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapBundleView {
    /// Configured agent name.
    pub agent: String,
    /// The file, for evidence.
    pub path: String,
    /// The file has been read at least once (before that the view says
    /// nothing).
    pub read: bool,
    /// SHA-256 fingerprints (hex, sorted, deduplicated) of the file's
    /// certificates, the form of [`Authority::fingerprint`]; empty while
    /// `error` is set.
    pub authorities: Vec<String>,
    /// Closed-set problem with the file (`missing`, `unreadable`, `empty`,
    /// `truncated`, …); None when it parsed.
    pub error: Option<String>,
    /// When the sensor last refreshed this view.
    pub updated_at: SystemTime,
}

// === Readings ===

/// One sensor result: a shared, immutable snapshot, so a fleet-sized view
/// costs a pointer copy per tick, not a deep clone. A new sensor adds its
/// variant here, its field in [`Observations`], and the two match arms the
/// compiler then asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// Workload API views, one per agent (`workload_api` sensor).
    WorkloadApi(Arc<AgentView>),
    /// Server admin API views, one per server (`server_api` sensor).
    Server(Arc<ServerView>),
    /// Agent admin (Debug) API views (`agent_debug` sensor).
    AgentDebug(Arc<AgentDebugView>),
    /// HTTP health probes (`health` sensor).
    Health(Arc<HealthView>),
    /// Metrics scrapes (`metrics_scrape` sensor).
    Metrics(Arc<MetricsView>),
    /// mTLS probes (`handshake_probe` sensor).
    Probe(Arc<ProbeView>),
    /// Certificate files (`cert_files` sensor).
    CertFile(Arc<CertFileView>),
    /// Agents' bootstrap bundle files (`bootstrap_bundle` sensor).
    BootstrapBundle(Arc<BootstrapBundleView>),
}

impl Reading {
    /// The configured name of the agent, server or other target this
    /// reading describes.
    pub fn target(&self) -> &str {
        match self {
            Reading::WorkloadApi(v) => &v.agent,
            Reading::Server(v) => &v.server,
            Reading::AgentDebug(v) => &v.agent,
            Reading::Health(v) => &v.target,
            Reading::Metrics(v) => &v.target,
            Reading::Probe(v) => &v.target,
            Reading::CertFile(v) => &v.file,
            Reading::BootstrapBundle(v) => &v.agent,
        }
    }
}

/// Everything sensed in one tick, by kind. Serializable: the replay
/// frames (`crate::replay`) record it as is, so field names are part of
/// the stored format; a field added later must read as empty from frames
/// recorded before it (`#[serde(default)]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Observations {
    /// Workload API views, one per agent (`workload_api` sensor).
    #[serde(with = "shared")]
    pub agents: Vec<Arc<AgentView>>,
    /// Server admin API views, one per server (`server_api` sensor).
    #[serde(with = "shared")]
    pub servers: Vec<Arc<ServerView>>,
    /// Agent admin (Debug) API views (`agent_debug` sensor).
    #[serde(with = "shared")]
    pub agent_debug: Vec<Arc<AgentDebugView>>,
    /// HTTP health probes (`health` sensor).
    #[serde(with = "shared")]
    pub health: Vec<Arc<HealthView>>,
    /// Metrics scrapes (`metrics_scrape` sensor).
    #[serde(with = "shared")]
    pub metrics: Vec<Arc<MetricsView>>,
    /// mTLS probes (`handshake_probe` sensor).
    #[serde(with = "shared")]
    pub probes: Vec<Arc<ProbeView>>,
    /// Certificate files (`cert_files` sensor).
    #[serde(with = "shared")]
    pub cert_files: Vec<Arc<CertFileView>>,
    /// Agents' bootstrap bundle files (`bootstrap_bundle` sensor).
    #[serde(with = "shared")]
    pub bootstrap_bundles: Vec<Arc<BootstrapBundleView>>,
    /// Agent SPIFFE ID → configured agent name: not a reading but what the
    /// loop has learned and remembers across restarts (the Debug API, the
    /// servers' node-alias entries), so an agent that no longer answers is
    /// still known by name where a server lists it.
    #[serde(with = "shared_map")]
    pub agent_ids: Arc<HashMap<String, String>>,
}

/// Serde for the shared views of [`Observations`]: a list of the views
/// themselves (serde's own `Arc` support needs its `rc` feature, which
/// would rebuild every dependency for two small functions).
mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<T: Serialize, S: Serializer>(
        views: &[Arc<T>],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(views.iter().map(|v| &**v))
    }

    pub(super) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Arc<T>>, D::Error> {
        Ok(Vec::<T>::deserialize(d)?
            .into_iter()
            .map(Arc::new)
            .collect())
    }
}

/// Serde for [`Observations::agent_ids`]: the map itself.
mod shared_map {
    use std::collections::HashMap;
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        map: &Arc<HashMap<String, String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        map.as_ref().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<HashMap<String, String>>, D::Error> {
        HashMap::deserialize(d).map(Arc::new)
    }
}

impl Observations {
    /// Files a reading under its kind.
    pub fn push(&mut self, r: Reading) {
        match r {
            Reading::WorkloadApi(v) => self.agents.push(v),
            Reading::Server(v) => self.servers.push(v),
            Reading::AgentDebug(v) => self.agent_debug.push(v),
            Reading::Health(v) => self.health.push(v),
            Reading::Metrics(v) => self.metrics.push(v),
            Reading::Probe(v) => self.probes.push(v),
            Reading::CertFile(v) => self.cert_files.push(v),
            Reading::BootstrapBundle(v) => self.bootstrap_bundles.push(v),
        }
    }
}

// === Symptoms and incidents ===

/// Closed set of symptoms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SymptomKind {
    /// Past ~60 % of its lifetime with no new serial.
    SvidRotationOverdue,
    /// Close to notAfter and still not replaced.
    SvidExpiring,
    /// Past notAfter and still served.
    SvidExpired,
    /// Fails the X509-SVID checks.
    SvidInvalid,
    /// Workload API stream down or unanswered.
    AgentUnreachable,
    /// The agent answers but issued no identity to us (`PermissionDenied`,
    /// "no identity issued"): our registration entry is missing or its
    /// selectors no longer match. Fixed in SPIRE's registration, not by
    /// restarting the agent.
    IdentityNotIssued,
    /// The agent has not synced with a server for too long (Debug API).
    AgentSyncStale,
    /// The server sees the agent's SVID past the point it should have renewed.
    AgentNotRenewing,
    /// A server lists the agent as banned.
    AgentBanned,
    /// A server's admin API or readiness fails.
    ServerUnhealthy,
    /// No configured server answers.
    AllServersDown,
    /// Every authority in the trust bundle expires soon.
    CaExpiring,
    /// Servers and agents disagree on the trust bundle.
    BundleDivergence,
    /// Handshakes to a peer fail for one reason well above their baseline.
    HandshakeFailureBurst,
    /// A peer serves an older certificate than SPIRE has issued for it.
    StaleServedCert,
    /// A certificate file on disk is older than what the agent issued,
    /// expired, or unreadable.
    StaleCertFile,
    /// An agent's bootstrap bundle (`trust_bundle_path`) holds no authority
    /// of the current trust bundle, or cannot be read: the agent could not
    /// attest again after losing its `data_dir`. Fixed by whatever
    /// distributes the file, not by acting on the agent.
    BootstrapBundleStale,
}

impl SymptomKind {
    /// Every kind, in a stable order.
    pub const ALL: [SymptomKind; 17] = [
        SymptomKind::SvidRotationOverdue,
        SymptomKind::SvidExpiring,
        SymptomKind::SvidExpired,
        SymptomKind::SvidInvalid,
        SymptomKind::AgentUnreachable,
        SymptomKind::IdentityNotIssued,
        SymptomKind::AgentSyncStale,
        SymptomKind::AgentNotRenewing,
        SymptomKind::AgentBanned,
        SymptomKind::ServerUnhealthy,
        SymptomKind::AllServersDown,
        SymptomKind::CaExpiring,
        SymptomKind::BundleDivergence,
        SymptomKind::HandshakeFailureBurst,
        SymptomKind::StaleServedCert,
        SymptomKind::StaleCertFile,
        SymptomKind::BootstrapBundleStale,
    ];

    /// Snake-case name: metric label, policy key and store value.
    pub fn as_str(self) -> &'static str {
        match self {
            SymptomKind::SvidRotationOverdue => "svid_rotation_overdue",
            SymptomKind::SvidExpiring => "svid_expiring",
            SymptomKind::SvidExpired => "svid_expired",
            SymptomKind::SvidInvalid => "svid_invalid",
            SymptomKind::AgentUnreachable => "agent_unreachable",
            SymptomKind::IdentityNotIssued => "identity_not_issued",
            SymptomKind::AgentSyncStale => "agent_sync_stale",
            SymptomKind::AgentNotRenewing => "agent_not_renewing",
            SymptomKind::AgentBanned => "agent_banned",
            SymptomKind::ServerUnhealthy => "server_unhealthy",
            SymptomKind::AllServersDown => "all_servers_down",
            SymptomKind::CaExpiring => "ca_expiring",
            SymptomKind::BundleDivergence => "bundle_divergence",
            SymptomKind::HandshakeFailureBurst => "handshake_failure_burst",
            SymptomKind::StaleServedCert => "stale_served_cert",
            SymptomKind::StaleCertFile => "stale_cert_file",
            SymptomKind::BootstrapBundleStale => "bootstrap_bundle_stale",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The symptoms this one turns into on the same subject when it gets
    /// worse or is diagnosed better: an expiring SVID that expires, an
    /// unreachable agent that turns out to answer with no identity for us.
    /// Such a turn supersedes the incident; it never clears it.
    pub fn successors(self) -> &'static [SymptomKind] {
        match self {
            SymptomKind::SvidRotationOverdue | SymptomKind::SvidExpiring => {
                &[SymptomKind::SvidExpired]
            }
            SymptomKind::AgentUnreachable => &[SymptomKind::IdentityNotIssued],
            _ => &[],
        }
    }

    /// How precisely the symptom names its cause; higher is more specific.
    /// Incidents on one target are planned together and the most specific
    /// diagnosis chooses the step: what a server says about the agent (banned,
    /// no identity, not renewing) explains what the workloads see (an
    /// unreachable stream, an expiring SVID), never the other way round.
    pub fn specificity(self) -> u8 {
        match self {
            SymptomKind::AgentBanned => 9,
            SymptomKind::IdentityNotIssued => 8,
            SymptomKind::AgentNotRenewing => 7,
            SymptomKind::AgentSyncStale => 6,
            SymptomKind::StaleServedCert | SymptomKind::StaleCertFile => 5,
            SymptomKind::BundleDivergence => 4,
            SymptomKind::AgentUnreachable => 3,
            SymptomKind::HandshakeFailureBurst => 2,
            SymptomKind::SvidExpired
            | SymptomKind::SvidExpiring
            | SymptomKind::SvidRotationOverdue
            | SymptomKind::SvidInvalid => 1,
            SymptomKind::ServerUnhealthy
            | SymptomKind::AllServersDown
            | SymptomKind::CaExpiring
            | SymptomKind::BootstrapBundleStale => 0,
        }
    }
}

impl fmt::Display for SymptomKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How bad a symptom is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Warning,
    /// mTLS will break soon or has broken.
    Critical,
}

impl Severity {
    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Identity of an incident: one per (symptom, subject) while open.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SymptomKey {
    /// Which symptom.
    pub kind: SymptomKind,
    /// About whom.
    pub subject: Subject,
}

/// A symptom currently present, as computed by `analyze`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Symptom {
    /// Which symptom.
    pub kind: SymptomKind,
    /// About whom.
    pub subject: Subject,
    /// How bad.
    pub severity: Severity,
    /// Earliest expiry that can no longer be renewed, if known.
    pub predicted_outage: Option<SystemTime>,
    /// Machine-readable facts that led here.
    pub evidence: serde_json::Value,
    /// The observation behind it is too old to act on.
    pub blind: bool,
}

impl Symptom {
    /// Its incident key.
    pub fn key(&self) -> SymptomKey {
        SymptomKey {
            kind: self.kind,
            subject: self.subject.clone(),
        }
    }
}

/// An open incident as the supervisor tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Store id.
    pub id: String,
    /// Which symptom.
    pub kind: SymptomKind,
    /// About whom.
    pub subject: Subject,
    /// Current severity.
    pub severity: Severity,
    /// When it opened.
    pub opened_at: SystemTime,
    /// Predicted outage when it opened.
    pub predicted_outage: Option<SystemTime>,
    /// Evidence when it opened.
    pub evidence: serde_json::Value,
    /// Index of the next ladder rung to try.
    pub next_rung: usize,
    /// Set when nothing left on the ladder can help: why an operator must
    /// act.
    pub needs_operator: Option<String>,
}

impl Incident {
    /// Its key.
    pub fn key(&self) -> SymptomKey {
        SymptomKey {
            kind: self.kind,
            subject: self.subject.clone(),
        }
    }
}

// === Steps and outcomes ===

/// One remediation step chosen by `plan`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Store id of the action this step becomes: empty as planned,
    /// assigned when the loop executes the decision.
    pub action_id: String,
    /// The incident it serves.
    pub incident_id: String,
    /// The symptom it serves.
    pub symptom: SymptomKind,
    /// Ladder rung index.
    pub rung: usize,
    /// Actuator instance name (policy/config key).
    pub actuator: String,
    /// The agent acted upon.
    pub target: String,
    /// Actuator parameters (recorded as-is).
    pub params: serde_json::Value,
    /// Hard timeout for the actuator.
    pub timeout: std::time::Duration,
    /// How long to wait for the symptom to clear after the action.
    pub verify_within: std::time::Duration,
    /// Record but do not execute.
    pub dry_run: bool,
}

/// Result class of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// The actuator did its job.
    Ok,
    /// The actuator failed.
    Error,
    /// Dry run: recorded, not executed.
    DryRun,
    /// Timed out.
    Timeout,
    /// Held at execute time, neither done nor failed: what the step needs
    /// is not possible now (a PodDisruptionBudget allows no eviction, the
    /// workload maps to no pods). The detail's `held` names the closed-set
    /// reason ([`crate::actuators::HELD_REASONS`]); the loop records it as a
    /// hold, re-arms the same rung and lets the cooldown decide when it is
    /// tried again. It is never verified as failed.
    Held,
}

impl OutcomeKind {
    /// Every kind.
    pub const ALL: [OutcomeKind; 5] = [
        Self::Ok,
        Self::Error,
        Self::DryRun,
        Self::Timeout,
        Self::Held,
    ];

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Snake-case name: metric label and store value.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Ok => "ok",
            OutcomeKind::Error => "error",
            OutcomeKind::DryRun => "dry_run",
            OutcomeKind::Timeout => "timeout",
            OutcomeKind::Held => "held",
        }
    }
}

/// What an actuator run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Result class.
    pub kind: OutcomeKind,
    /// Details (exit code, output tail, …).
    pub detail: serde_json::Value,
    /// Error text when it failed.
    pub error: Option<String>,
}

impl Outcome {
    /// A success with details.
    pub fn ok(detail: serde_json::Value) -> Self {
        Self {
            kind: OutcomeKind::Ok,
            detail,
            error: None,
        }
    }

    /// Held at execute time for `reason` (one of
    /// [`crate::actuators::HELD_REASONS`]), with details; `detail` must be
    /// an object (anything else is wrapped under `detail`).
    pub fn held(reason: &'static str, detail: serde_json::Value) -> Self {
        let mut detail = match detail {
            serde_json::Value::Object(_) => detail,
            other => serde_json::json!({ "detail": other }),
        };
        detail["held"] = serde_json::json!(reason);
        Self {
            kind: OutcomeKind::Held,
            detail,
            error: None,
        }
    }

    /// The execute-time hold reason of a [`OutcomeKind::Held`] outcome:
    /// its detail's `held` when that is a known reason, else `held`.
    pub fn held_reason(&self) -> &'static str {
        let named = self.detail["held"].as_str().unwrap_or_default();
        crate::actuators::HELD_REASONS
            .into_iter()
            .find(|r| *r == named)
            .unwrap_or("held")
    }
}

/// Whether the symptom cleared after an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verification {
    /// The symptom cleared within the window.
    Verified,
    /// It did not.
    Failed,
    /// Nothing to verify: a dry run. (A failed or timed-out actuator is
    /// still judged by the symptom: cleared means verified, else failed.)
    Skipped,
}

impl Verification {
    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verification::Verified => "verified",
            Verification::Failed => "failed",
            Verification::Skipped => "skipped",
        }
    }
}

// === Store events ===

/// Everything the supervisor writes to the knowledge store. Applied in
/// batches, each batch atomically; every event is idempotent by id so a
/// retried batch never duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A subject was seen (upsert; keeps the first `first_seen`).
    SubjectSeen {
        /// Who.
        subject: Subject,
        /// When.
        at: SystemTime,
    },
    /// A serial was delivered for the first time.
    SvidSeen {
        /// Agent name.
        agent: String,
        spiffe_id: String,
        /// Leaf serial (hex).
        serial: String,
        /// notBefore.
        not_before: SystemTime,
        /// notAfter.
        not_after: SystemTime,
        /// First delivery.
        at: SystemTime,
    },
    /// A newer serial replaced this one.
    SvidReplaced {
        /// Agent name.
        agent: String,
        spiffe_id: String,
        /// The replaced serial.
        serial: String,
        /// When the replacement was seen.
        at: SystemTime,
    },
    /// An incident opened.
    IncidentOpened {
        /// Its id.
        incident: Incident,
    },
    /// An incident closed.
    IncidentClosed {
        /// Its id.
        id: String,
        /// When.
        at: SystemTime,
        /// Why (`cleared`, …).
        resolution: String,
    },
    /// The incident's ladder moved.
    IncidentEscalated {
        /// Its id.
        id: String,
        /// The next rung to try.
        next_rung: usize,
    },
    /// An action is about to run (recorded before acting).
    ActionStarted {
        step: Step,
        /// When.
        at: SystemTime,
    },
    /// An action returned.
    ActionFinished {
        /// Action id.
        id: String,
        /// What happened.
        outcome: Outcome,
        /// When.
        at: SystemTime,
    },
    /// The action's effect was checked.
    ActionVerified {
        /// Action id.
        id: String,
        /// Result.
        verification: Verification,
        /// When.
        at: SystemTime,
    },
    /// A decision not to act, with the reason (audit trail).
    Held {
        incident_id: String,
        /// Actuator that was held back.
        actuator: String,
        /// Target agent.
        target: String,
        /// Closed-set reason (`cooldown`, `budget`, `blind`, …).
        reason: String,
        /// When.
        at: SystemTime,
    },
    /// Nothing left on the incident's ladder can help: an operator must act.
    /// The incident stays open (and keeps being reported) until its symptom
    /// clears.
    IncidentNeedsOperator {
        /// Incident id.
        id: String,
        /// Why, for a person: which rungs were futile and how often.
        reason: String,
        /// When.
        at: SystemTime,
    },
    /// An agent's SPIFFE ID was learned (or seen again): the durable mapping
    /// from agent SPIFFE IDs to configured `[[agents]]` names.
    AgentIdentified(AgentIdentity),
    /// A step that needs a person's yes waits for it (`pending`).
    ApprovalRequested {
        /// The approval, as requested.
        approval: Approval,
    },
    /// An approval changed state: approved or rejected by an operator,
    /// expired, used (its step started) or withdrawn.
    ApprovalDecided {
        /// Approval id.
        id: String,
        /// The new state (never `Pending`).
        state: ApprovalState,
        /// Who decided (an operator's principal; `None` for the loop).
        by: Option<String>,
        /// The operator's reason or comment.
        reason: Option<String>,
        /// The action it became (`Used`).
        action_id: Option<String>,
        /// When.
        at: SystemTime,
    },
    /// An operator changed a control (pause, resume, dry run). The last
    /// change of each control is restored at start.
    ControlChanged {
        /// Unique id (idempotence).
        id: String,
        /// What changed.
        change: ControlChange,
        /// Who (the caller's principal).
        by: String,
        /// Why, when given.
        reason: Option<String>,
        /// When.
        at: SystemTime,
    },
    /// A (symptom, actuator) step verified too rarely over its last runs:
    /// skipped until an operator resets it.
    Demoted {
        symptom: SymptomKind,
        actuator: String,
        /// Verified runs in the window.
        verified: u32,
        /// Runs in the window.
        runs: u32,
        /// When.
        at: SystemTime,
    },
    /// An operator let a demoted step run again; its run window starts
    /// afresh.
    DemotionReset {
        /// Unique id (idempotence).
        id: String,
        symptom: SymptomKind,
        actuator: String,
        /// Who.
        by: String,
        /// When.
        at: SystemTime,
    },
}

// === Operator controls ===

/// A step waiting for a person's yes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Id (what `approve ID` names).
    pub id: String,
    /// The incident the step serves.
    pub incident_id: String,
    pub symptom: SymptomKind,
    /// The ladder rung.
    pub rung: usize,
    /// The actuator that would run.
    pub actuator: String,
    /// Its target.
    pub target: String,
    /// When it was asked for.
    pub requested_at: SystemTime,
    /// After this, it is expired (recorded as a hold) and asked again.
    pub expires_at: SystemTime,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for a person.
    Pending,
    /// Approved; the step runs at the next tick its guards allow.
    Approved,
    /// Rejected: held as `approval_rejected`, the ladder moves on.
    Rejected,
    /// Nobody decided in time: held as `approval_expired`.
    Expired,
    /// Approved and started.
    Used,
    /// The incident closed, or its ladder moved on, before a decision.
    Withdrawn,
}

impl ApprovalState {
    /// Every state.
    pub const ALL: [ApprovalState; 6] = [
        Self::Pending,
        Self::Approved,
        Self::Rejected,
        Self::Expired,
        Self::Used,
        Self::Withdrawn,
    ];

    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Used => "used",
            Self::Withdrawn => "withdrawn",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether no decision can follow.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Approved)
    }
}

/// A change of an operator control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlChange {
    /// No action starts until resumed.
    Paused,
    /// The pause ended.
    Resumed,
    /// Dry run on.
    DryRunOn,
    /// Dry run off.
    DryRunOff,
}

impl ControlChange {
    /// Every change.
    pub const ALL: [ControlChange; 4] =
        [Self::Paused, Self::Resumed, Self::DryRunOn, Self::DryRunOff];

    /// Stored name (also the audit kind).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paused => "paused",
            Self::Resumed => "resumed",
            Self::DryRunOn => "dry_run_on",
            Self::DryRunOff => "dry_run_off",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The control it sets: `pause` or `dry_run`.
    pub fn control(self) -> &'static str {
        match self {
            Self::Paused | Self::Resumed => "pause",
            Self::DryRunOn | Self::DryRunOff => "dry_run",
        }
    }
}

/// The principal the loop records its own decisions under.
pub const LOOP_ACTOR: &str = "spire-healer";

/// Where an agent name ↔ SPIFFE ID pairing was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The agent's own Debug API (the leaf of its SVID chain).
    DebugApi,
    /// The server's node-alias entry (`node_alias`) parented to the agent.
    NodeAlias,
}

impl IdentitySource {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::DebugApi => "debug_api",
            IdentitySource::NodeAlias => "node_alias",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::DebugApi, Self::NodeAlias]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One agent SPIFFE ID and the configured agent it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// Configured agent name.
    pub agent: String,
    /// `spiffe://<td>/spire/agent/...`.
    pub spiffe_id: String,
    /// How it was learned.
    pub source: IdentitySource,
    /// When it was learned or last confirmed.
    pub at: SystemTime,
}

/// A new random, time-ordered id for incidents and actions. It reads the
/// clock and a random source, so only the loop calls it, when it opens an
/// incident or executes a decision; the pure stages never do.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn subject_display_round_trips() {
        for s in [
            Subject::agent("node-a"),
            Subject::server("server-a"),
            Subject::cluster("example.org"),
            Subject::svid("node-a", "spiffe://td/w/x"),
            Subject::peer("web"),
            Subject::cert_file("web-svid"),
            Subject::handshakes("web/a", crate::handshake::Reason::UnknownCa),
        ] {
            assert_eq!(Subject::parse(&s.to_string()), Some(s));
        }
        assert_eq!(Subject::parse("nope"), None);
    }

    #[test]
    fn elapsed_fraction() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        let s = SvidObservation {
            spiffe_id: "spiffe://td/a".into(),
            serial: "01".into(),
            not_before: t0,
            not_after: t0 + Duration::from_secs(100),
            invalid: None,
            first_seen: t0,
            issuer: String::new(),
        };
        assert!((s.elapsed_fraction(t0 + Duration::from_secs(60)) - 0.6).abs() < 1e-9);
        assert_eq!(s.elapsed_fraction(t0 - Duration::from_secs(5)), 0.0);
    }

    #[test]
    fn symptom_kind_names_round_trip() {
        for k in SymptomKind::ALL {
            assert_eq!(SymptomKind::parse(k.as_str()), Some(k));
        }
    }
}
