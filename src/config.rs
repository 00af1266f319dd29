//! Typed configuration (`spire-healer.toml`) and its validation.
//!
//! Parsing rejects unknown keys; [`Config::validate`] then reports every
//! semantic problem at once. `main` exits with [`EXIT_CONFIG`] on any error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::actuators::ActuatorConfig;
use crate::endpoint::Endpoint;
use crate::policy::{DEFAULT_POLICY, Policy};
use crate::sensors::SensorSpec;

mod otlp;
mod parse;

pub use otlp::{OtlpConfig, OtlpSettings, TelemetryConfig};

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Reads environment variables; injectable so tests pass a map.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The environment variable naming this node (`{node}` in agent names).
pub const NODE_NAME_ENV: &str = "SPIRE_HEALER_NODE_NAME";
/// Replaced in `[[agents]] name` by the node's name.
pub const NODE_PLACEHOLDER: &str = "{node}";

/// The process environment.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// Longest poll interval of a sensor: one slower than this could miss most
/// of a short-lived SVID's lifetime before noticing a problem.
const MAX_POLL: Duration = Duration::from_secs(600);
/// Longest deadline of one call or of a stream's first answer.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest reconnect backoff: a recovered agent is seen again within it.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// `<key>.<field>` is at most `max`.
fn check_max(
    key: &str,
    field: &str,
    value: Duration,
    max: Duration,
    errors: &mut Vec<ConfigError>,
) {
    let key = format!("{key}.{field}");
    if value > max {
        errors.push(ConfigError::invalid(
            key,
            format!(
                "{} is too long (at most {})",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        ));
    }
}

/// A probe, file or Envoy name: valid and not already taken.
fn unique_name<'a>(
    key: &str,
    name: &'a str,
    names: &mut std::collections::BTreeSet<&'a str>,
    errors: &mut Vec<ConfigError>,
) {
    if !valid_name(name) {
        errors.push(ConfigError::invalid(
            format!("{key}.name"),
            format!("{name:?} must be 1-63 characters of a-z, 0-9, '-' or '_'"),
        ));
    } else if !names.insert(name) {
        errors.push(ConfigError::invalid(
            format!("{key}.name"),
            format!("{name:?} is already the name of an agent, server, probe, file or Envoy"),
        ));
    }
}

/// `agent`, when set, names a configured agent.
fn known_agent(
    key: &str,
    agent: Option<&str>,
    agents: &std::collections::BTreeSet<&str>,
    errors: &mut Vec<ConfigError>,
) {
    if let Some(a) = agent.filter(|a| !a.is_empty() && !agents.contains(a)) {
        errors.push(ConfigError::invalid(
            format!("{key}.agent"),
            format!("{a:?} is not a configured agent"),
        ));
    }
}

/// Whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Loop settings.
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    /// Knowledge store.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// What this instance watches and acts on (`node`, `cluster`, `all`).
    #[serde(default)]
    pub role: crate::leadership::Role,
    /// Active/standby for the cluster role (`[leadership]`); a cluster
    /// instance on PostgreSQL leads by the `postgres` backend when unset.
    #[serde(default)]
    pub leadership: Option<crate::leadership::LeadershipConfig>,
    /// HTTP endpoints.
    #[serde(default)]
    pub http: HttpConfig,
    /// SPIRE agents to watch, one Workload API sensor each.
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    /// SPIRE servers to watch (admin API, health, metrics).
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
    /// Actuator instances by name (`refetch` is built in).
    #[serde(default)]
    pub actuators: BTreeMap<String, ActuatorConfig>,
    /// Remediation policy file; the built-in `policies/default.toml` if unset.
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    /// Active mTLS probes (`[[probes]]`), each presenting the SVID of a
    /// configured agent's Workload API.
    #[serde(default)]
    pub probes: Vec<crate::sensors::handshake_probe::ProbeConfig>,
    /// Certificate files on disk to watch (`[[cert_files]]`), e.g. as
    /// spiffe-helper writes them.
    #[serde(default)]
    pub cert_files: Vec<crate::sensors::cert_files::CertFileConfig>,
    /// Envoy admin endpoints whose TLS counters become handshake outcomes
    /// (`[[envoys]]`).
    #[serde(default)]
    pub envoys: Vec<EnvoyConfig>,
    /// Our gRPC API (`spire_healer.v1`) on a Unix socket; off when unset.
    #[serde(default)]
    pub api: Option<crate::api::ApiConfig>,
    /// Trace export (`[telemetry.otlp]`); off when unset.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Observation frames recorded for `spire-healer replay` (`[replay]`).
    #[serde(default)]
    pub replay: crate::replay::ReplayConfig,
    /// The Kubernetes API (`[kubernetes]`): how to reach it, the
    /// namespaces that may be touched and the workloads by name; required
    /// by the `k8s_*` actuators.
    #[serde(default)]
    pub kubernetes: Option<crate::k8s::KubernetesConfig>,
    /// Service-level objectives for SPIRE itself (`[slo]`): what the
    /// shipped burn-rate alerts hold issuance, renewal, handshakes and
    /// server availability to.
    #[serde(default)]
    pub slo: crate::slo::SloConfig,
}

/// One Envoy whose Prometheus stats (`/stats/prometheus`) are scraped for
/// TLS handshake and SDS counters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyConfig {
    /// Name: prefix of its handshake targets (`<name>/listener/<address>`,
    /// `<name>/cluster/<cluster>`).
    pub name: String,
    /// `http://host:port/stats/prometheus` of its admin interface.
    pub metrics_url: String,
    /// Time between scrapes.
    #[serde(default = "default_envoy_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Bound of one scrape.
    #[serde(default = "default_envoy_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_envoy_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_envoy_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Loop settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Time between ticks.
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick_interval: Duration,
    /// How long to wait for tasks on shutdown.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Record planned actions without executing them.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_tick() -> Duration {
    Duration::from_secs(1)
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            tick_interval: default_tick(),
            shutdown_grace: default_grace(),
            dry_run: false,
        }
    }
}

/// Knowledge store settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (default `sqlite://spire-healer.db`) or
    /// `postgres://user:password@host:port/db`. `SPIRE_HEALER_DATABASE_URL`
    /// overrides it.
    #[serde(default = "default_db_url")]
    pub url: secrecy::SecretString,
    /// Events buffered in memory while the database is away.
    #[serde(default = "default_buffer")]
    pub buffer_capacity: usize,
    /// The local spool: events the database could not take are appended
    /// here (fsync'd, checksummed) before the loop acts on them, and replayed
    /// when the database answers again, also after a restart. Default:
    /// beside the SQLite file (`<file>.spool`); for PostgreSQL,
    /// `spire-healer.spool` in the working directory (the systemd unit runs
    /// in its state directory).
    #[serde(default)]
    pub spool: Option<PathBuf>,
    /// Most bytes the spool may hold; past it, events stay in memory only
    /// (counted as `spire_healer_errors_total{stage="spool",kind="full"}`).
    #[serde(default = "default_spool_max")]
    pub spool_max_bytes: u64,
    /// How long old rows are kept (`[database.retention]`); pruned in
    /// batches by a background task.
    #[serde(default)]
    pub retention: crate::knowledge::retention::RetentionConfig,
}

fn default_db_url() -> secrecy::SecretString {
    "sqlite://spire-healer.db".into()
}
fn default_buffer() -> usize {
    100_000
}
fn default_spool_max() -> u64 {
    256 << 20
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: default_db_url(),
            buffer_capacity: default_buffer(),
            spool: None,
            spool_max_bytes: default_spool_max(),
            retention: Default::default(),
        }
    }
}

/// HTTP endpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address to listen on (port 0: any free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

fn default_true() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_listen(),
        }
    }
}

/// One SPIRE agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stable name: metric label, store key, `{agent}` in commands.
    pub name: String,
    /// Workload API address, `unix:///abs/path` or `tcp://IP:port`;
    /// falls back to `SPIFFE_ENDPOINT_SOCKET`.
    #[serde(default)]
    pub address: Option<String>,
    /// A connected stream that has not delivered its first message within
    /// this time counts as unanswered.
    #[serde(default = "default_answer_timeout", with = "humantime_serde")]
    pub answer_timeout: Duration,
    /// Cap of the reconnect backoff.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// The agent's admin socket (`admin_socket_path`): Debug API for
    /// `last_sync_success`, the real server-connectivity signal.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Base URL of the agent's `health_checks` listener (`/live`, `/ready`).
    #[serde(default)]
    pub health_url: Option<String>,
    /// The agent's Prometheus endpoint.
    #[serde(default)]
    pub metrics_url: Option<String>,
    /// The agent's config file, rewritten by `server_failover`.
    #[serde(default)]
    pub config_file: Option<PathBuf>,
    /// The agent's `data_dir`: its persisted trust bundle (`agent-data.json`)
    /// is what it trusts after a restart, so `server_failover` checks it.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// SPIFFE ID a fresh join token is aliased to (`-spiffeID` of
    /// `token generate`), so entries parented to it apply again after
    /// `agent_evict` re-admits the agent.
    #[serde(default)]
    pub node_alias: Option<String>,
    /// The agent's bootstrap bundle (`trust_bundle_path`): the PEM file it
    /// attests with when it has no `data_dir` state. Watched so that one no
    /// longer holding any current authority (`bootstrap_bundle_stale`) is
    /// reported before an agent needs it.
    #[serde(default)]
    pub trust_bundle_path: Option<PathBuf>,
    /// Admin API, health, metrics and bootstrap bundle poll interval.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

/// One SPIRE server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Stable name: metric label, store key.
    pub name: String,
    /// The server's local admin socket (`socket_path`).
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// `IP:port` of the server's TCP port (`bind_address:bind_port`), for
    /// its admin API over mTLS when no `admin_socket` is reachable (set one
    /// or the other). Needs `admin_via_agent`, and our SPIFFE ID in the
    /// server's `admin_ids`. No Debug API there: uptime and entry counts
    /// are not read.
    #[serde(default)]
    pub admin_address: Option<String>,
    /// Name of the `[[agents]]` entry whose Workload API gives us the
    /// X509-SVID (and trust bundle) used with `admin_address`.
    #[serde(default)]
    pub admin_via_agent: Option<String>,
    /// The server's SPIFFE ID required on `admin_address`; default
    /// `spiffe://<our trust domain>/spire/server`.
    #[serde(default)]
    pub admin_server_id: Option<String>,
    /// `host:port` agents dial to reach this server (`server_address`,
    /// `server_port`): the target of a failover.
    #[serde(default)]
    pub address: Option<String>,
    /// Base URL of the server's `health_checks` listener.
    #[serde(default)]
    pub health_url: Option<String>,
    /// The server's Prometheus endpoint.
    #[serde(default)]
    pub metrics_url: Option<String>,
    /// How often the server's admin API, health and metrics are polled.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Deadline of one poll.
    #[serde(default = "default_poll_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_poll() -> Duration {
    Duration::from_secs(2)
}
fn default_poll_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_answer_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

/// The TCP admin settings of one server: `admin_address` is an `IP:port`
/// and excludes `admin_socket`; it and `admin_via_agent` (a configured
/// agent) come together; `admin_server_id` is a SPIFFE ID.
fn check_admin_tcp(
    key: &str,
    srv: &ServerConfig,
    agents: &std::collections::BTreeSet<String>,
) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Some(addr) = &srv.admin_address {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            errors.push(ConfigError::invalid(
                format!("{key}.admin_address"),
                format!("{addr:?} is not IP:port (IPv6 in brackets)"),
            ));
        }
        if srv.admin_socket.is_some() {
            errors.push(ConfigError::invalid(
                format!("{key}.admin_address"),
                "set admin_socket or admin_address, not both",
            ));
        }
    }
    match (&srv.admin_address, &srv.admin_via_agent) {
        (Some(_), None) => errors.push(ConfigError::invalid(
            format!("{key}.admin_via_agent"),
            "admin_address needs the agent whose X509-SVID we present",
        )),
        (None, Some(_)) => errors.push(ConfigError::invalid(
            format!("{key}.admin_via_agent"),
            "only used with admin_address",
        )),
        (Some(_), Some(agent)) if !agents.contains(agent) => {
            errors.push(ConfigError::invalid(
                format!("{key}.admin_via_agent"),
                format!("{agent:?} is not a configured agent"),
            ));
        }
        _ => {}
    }
    if let Some(id) = &srv.admin_server_id {
        if srv.admin_address.is_none() {
            errors.push(ConfigError::invalid(
                format!("{key}.admin_server_id"),
                "only used with admin_address",
            ));
        }
        if let Err(e) = crate::spiffe_id::SpiffeId::parse(id) {
            errors.push(ConfigError::invalid(
                format!("{key}.admin_server_id"),
                format!("{id:?}: {e}"),
            ));
        }
    }
    errors
}

/// Where in a file a problem is: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// ` (line 3, column 17)`, or nothing.
fn at_suffix(at: &Option<Location>) -> String {
    at.map(|at| format!(" ({at})")).unwrap_or_default()
}

/// `, line 3, column 17`, or nothing.
fn comma_at(at: &Option<Location>) -> String {
    at.map(|at| format!(", {at}")).unwrap_or_default()
}

/// `text` on the lines below a message, or nothing.
fn below(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!("\n{text}")
    }
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        reason: String,
    },
    /// The TOML does not parse (or, for a file read whole such as the
    /// policy, has a wrong type or an unknown key). Displayed over several
    /// lines: the message, then the line with a caret under the column.
    #[error("{path}{}: {reason}{}", comma_at(.at), below(.diagram))]
    Parse {
        /// File.
        path: String,
        /// Where, when the parser knows.
        at: Option<Location>,
        /// Parser message.
        reason: String,
        /// The line at fault with a caret under `at` (empty without `at`).
        diagram: String,
    },
    /// A key that is not part of the configuration (a typo, or a setting
    /// of another section).
    #[error("{key}{}: unknown key, expected {expected}", at_suffix(.at))]
    UnknownKey {
        /// Dotted key, e.g. `supervisor.tick`.
        key: String,
        /// Where the key is.
        at: Option<Location>,
        /// The keys allowed there.
        expected: String,
    },
    /// A value of the wrong type or form (a duration, an address), or a
    /// required key that is missing.
    #[error("{key}{}: {reason}", at_suffix(.at))]
    Value {
        /// Dotted key, e.g. `agents[0].answer_timeout`.
        key: String,
        /// Where the value (or its table) is.
        at: Option<Location>,
        /// What is wrong.
        reason: String,
    },
    /// A value is invalid.
    #[error("{key}{}: {reason}", at_suffix(.at))]
    Invalid {
        /// Dotted key, e.g. `agents[0].address`.
        key: String,
        /// Where the value (or the nearest enclosing table) is in the file;
        /// `None` for values that come from elsewhere (the environment, the
        /// policy).
        at: Option<Location>,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Read { .. } => "read",
            ConfigError::Parse { .. } => "parse",
            ConfigError::UnknownKey { .. } => "unknown_key",
            ConfigError::Value { .. } => "value",
            ConfigError::Invalid { .. } => "invalid",
        }
    }

    /// The dotted key the problem is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. }
            | ConfigError::Value { key, .. }
            | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Parse { .. } => None,
        }
    }

    /// Where in the file the problem is, if known.
    pub fn location(&self) -> Option<Location> {
        match self {
            ConfigError::Parse { at, .. }
            | ConfigError::UnknownKey { at, .. }
            | ConfigError::Value { at, .. }
            | ConfigError::Invalid { at, .. } => *at,
            ConfigError::Read { .. } => None,
        }
    }

    pub(crate) fn invalid(key: impl Into<String>, reason: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            at: None,
            reason: reason.to_string(),
        }
    }
}

/// A validated configuration with resolved addresses and policy.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The file as parsed.
    pub config: Config,
    /// Agent endpoints, in `config.agents` order.
    pub endpoints: Vec<Endpoint>,
    /// The policy in force.
    pub policy: Policy,
    /// Database URL after environment overrides.
    pub database_url: secrecy::SecretString,
    /// The spool file in force (`database.spool` or its default); none
    /// for an in-memory SQLite store, which a crash loses anyway.
    pub spool: Option<PathBuf>,
    /// Non-fatal findings (e.g. a ladder rung whose actuator is not configured).
    pub warnings: Vec<String>,
    /// The trace export in force (`[telemetry.otlp]` and the `OTEL_*`
    /// variables); `None`: traces are off.
    pub otlp: Option<OtlpSettings>,
}

impl Config {
    /// The sections of `self` that differ from `other`: what a reload
    /// cannot apply without a restart (sensors, actuators, the store and
    /// the listeners are built once, at start). The policy is not among
    /// them: it is reloaded live.
    pub fn restart_needed(&self, other: &Config) -> Vec<&'static str> {
        let d =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let mut out = Vec::new();
        for (name, differs) in [
            ("supervisor", d(&self.supervisor, &other.supervisor)),
            ("database", d(&self.database, &other.database)),
            ("http", d(&self.http, &other.http)),
            ("agents", d(&self.agents, &other.agents)),
            ("servers", d(&self.servers, &other.servers)),
            ("actuators", d(&self.actuators, &other.actuators)),
            ("probes", d(&self.probes, &other.probes)),
            ("cert_files", d(&self.cert_files, &other.cert_files)),
            ("envoys", d(&self.envoys, &other.envoys)),
            ("api", d(&self.api, &other.api)),
            ("telemetry", d(&self.telemetry, &other.telemetry)),
            ("replay", d(&self.replay, &other.replay)),
        ] {
            if differs {
                out.push(name);
            }
        }
        out
    }

    /// Parses TOML text; `path` names the source in errors.
    ///
    /// # Errors
    /// The first problem [`Config::parse`] finds.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        Self::parse(text, path).map_err(|mut errors| errors.remove(0))
    }

    /// Parses TOML text: its syntax, the types of its values and its keys,
    /// without the checks of [`Config::validate`].
    ///
    /// # Errors
    /// Every syntax error (and nothing else when there is one), else every
    /// unknown key and every value of the wrong type or form, with its
    /// dotted key and position.
    pub fn parse(text: &str, path: &str) -> Result<Self, Vec<ConfigError>> {
        let src = parse::Source { text, path };
        let root = parse::document(src)?;
        let sections = parse::sections(src, root.get_ref());
        if sections.errors.is_empty() {
            Ok(sections.config)
        } else {
            Err(sections.errors)
        }
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// `Read`, or the first problem [`Config::parse`] finds.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text: [`Config::parse`], then
    /// [`Config::validate`] on every part that parsed, so that one run lists
    /// every problem of the file, each with its dotted key and position, in
    /// file order.
    ///
    /// # Errors
    /// Every problem found (only the syntax errors when there are any: a
    /// document that does not parse cannot be checked further).
    pub fn check(text: &str, path: &str, env: Env<'_>) -> Result<Resolved, Vec<ConfigError>> {
        let src = parse::Source { text, path };
        let root = parse::document(src)?;
        let parse::Sections {
            config,
            mut errors,
            kept,
        } = parse::sections(src, root.get_ref());
        let semantic = match config.validate(env) {
            Ok(resolved) if errors.is_empty() => return Ok(resolved),
            Ok(_) => Vec::new(),
            Err(semantic) => semantic,
        };
        // A semantic problem of a value that did not parse (it was left at
        // its default, or its element left out) says nothing new.
        let unparsed: Vec<String> = errors
            .iter()
            .filter_map(|e| e.key().map(str::to_string))
            .collect();
        let url_from_env = env("SPIRE_HEALER_DATABASE_URL").is_some();
        for mut e in semantic {
            if let ConfigError::Invalid { key, at, .. } = &mut e {
                *key = parse::file_key(key, &kept);
                if unparsed.iter().any(|k| parse::overlaps(k, key)) {
                    continue;
                }
                if !(url_from_env && key == "database.url") {
                    *at = parse::offset_of(&root, key).map(|o| src.locate(o));
                }
            }
            errors.push(e);
        }
        errors.sort_by_key(|e| {
            e.location()
                .map_or((usize::MAX, 0), |at| (at.line, at.column))
        });
        Err(errors)
    }

    /// Reads a file and [`Config::check`]s it.
    ///
    /// # Errors
    /// `Read`, or every problem [`Config::check`] finds.
    pub fn check_file(path: &Path, env: Env<'_>) -> Result<Resolved, Vec<ConfigError>> {
        let text = read(path).map_err(|e| vec![e])?;
        Self::check(&text, &path.display().to_string(), env)
    }

    /// Probes, certificate files and Envoy targets: valid, uniquely named
    /// (their names are subjects and action targets, so they must not clash
    /// with agents or servers either), naming configured agents.
    fn validate_handshakes(&self, errors: &mut Vec<ConfigError>) {
        let agents: std::collections::BTreeSet<&str> =
            self.agents.iter().map(|a| a.name.as_str()).collect();
        let mut names: std::collections::BTreeSet<&str> = agents.clone();
        names.extend(self.servers.iter().map(|s| s.name.as_str()));
        for (i, p) in self.probes.iter().enumerate() {
            let key = format!("probes[{i}]");
            unique_name(&key, &p.name, &mut names, errors);
            for (field, reason) in p.problems() {
                errors.push(ConfigError::invalid(format!("{key}.{field}"), reason));
            }
            known_agent(&key, Some(&p.agent), &agents, errors);
            if let Some(f) = p.cert_file.as_deref()
                && !self.cert_files.iter().any(|c| c.name == f)
            {
                errors.push(ConfigError::invalid(
                    format!("{key}.cert_file"),
                    format!("{f:?} is not a configured [[cert_files]] name"),
                ));
            }
        }
        for (i, f) in self.cert_files.iter().enumerate() {
            let key = format!("cert_files[{i}]");
            unique_name(&key, &f.name, &mut names, errors);
            for (field, reason) in f.problems() {
                errors.push(ConfigError::invalid(format!("{key}.{field}"), reason));
            }
            known_agent(&key, f.agent.as_deref(), &agents, errors);
        }
        for (i, e) in self.envoys.iter().enumerate() {
            let key = format!("envoys[{i}]");
            unique_name(&key, &e.name, &mut names, errors);
            if let Err(reason) = crate::http_client::check_url(&e.metrics_url) {
                errors.push(ConfigError::invalid(
                    format!("{key}.metrics_url"),
                    format!(
                        "{:?}: {reason} (expected http://host:port/stats/prometheus)",
                        e.metrics_url
                    ),
                ));
            }
            if e.poll_interval.is_zero() || e.timeout.is_zero() {
                errors.push(ConfigError::invalid(
                    &key,
                    "poll_interval and timeout must be greater than zero",
                ));
            }
            check_max(&key, "poll_interval", e.poll_interval, MAX_POLL, errors);
            check_max(&key, "timeout", e.timeout, MAX_TIMEOUT, errors);
        }
        if let Some(api) = &self.api {
            let problems = api.problems();
            let socket_ok = !problems.iter().any(|(field, _)| *field == "socket");
            for (field, reason) in problems {
                errors.push(ConfigError::invalid(format!("api.{field}"), reason));
            }
            if let Some(Err(reason)) = socket_ok.then(|| check_api_socket(&api.socket)) {
                errors.push(ConfigError::invalid("api.socket", reason));
            }
        }
    }

    /// Checks every value and resolves addresses, environment overrides and
    /// the policy. Reports all problems together, section by section.
    ///
    /// # Errors
    /// Every problem found.
    pub fn validate(&self, env: Env<'_>) -> Result<Resolved, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let expanded = self.with_node_name(env, &mut errors);
        expanded.validate_expanded(env, errors)
    }

    /// `{node}` in `[[agents]] name` replaced by this node's name from
    /// `SPIRE_HEALER_NODE_NAME` (a DaemonSet passes `spec.nodeName`), with
    /// dots as `_`: one config for every node instance, one agent name (and
    /// advisory lock) per node.
    fn with_node_name(&self, env: Env<'_>, errors: &mut Vec<ConfigError>) -> Config {
        let mut cfg = self.clone();
        let node = env(NODE_NAME_ENV).map(|n| n.trim().to_ascii_lowercase().replace('.', "_"));
        for (i, a) in cfg.agents.iter_mut().enumerate() {
            if !a.name.contains(NODE_PLACEHOLDER) {
                continue;
            }
            match &node {
                Some(n) if !n.is_empty() => a.name = a.name.replace(NODE_PLACEHOLDER, n),
                _ => errors.push(ConfigError::invalid(
                    format!("agents[{i}].name"),
                    format!(
                        "{:?} names {NODE_PLACEHOLDER} but {NODE_NAME_ENV} is not set (the node's name, e.g. from spec.nodeName)",
                        a.name
                    ),
                )),
            }
        }
        cfg
    }

    fn validate_expanded(
        &self,
        env: Env<'_>,
        mut errors: Vec<ConfigError>,
    ) -> Result<Resolved, Vec<ConfigError>> {
        let mut warnings = Vec::new();
        self.validate_supervisor(&mut errors);
        let database_url = self.validate_database(env, &mut errors, &mut warnings);
        let spool = self.spool_path(&database_url, &mut errors);
        self.validate_role(&database_url, &mut errors);
        let (endpoints, agents) = self.validate_agents(env, &mut errors);
        self.validate_servers(&agents, &mut errors);
        self.validate_agent_sources(&mut errors);
        self.validate_actuators(&mut errors);
        self.validate_handshakes(&mut errors);
        self.validate_kubernetes(&mut errors);
        self.slo.validate(&mut errors);
        let policy = self.resolve_policy(&mut errors, &mut warnings);
        let otlp = otlp::resolve(self.telemetry.otlp.as_ref(), env, &mut errors);

        match policy {
            Some(policy) if errors.is_empty() => Ok(Resolved {
                config: self.clone(),
                endpoints,
                policy,
                database_url,
                spool,
                warnings,
                otlp,
            }),
            _ => Err(errors),
        }
    }

    /// `[supervisor]`: the tick and the shutdown grace are positive.
    fn validate_supervisor(&self, errors: &mut Vec<ConfigError>) {
        let sup = &self.supervisor;
        // Upper bounds: a tick slower than a minute cannot heal a 1 h SVID
        // in time, and a grace longer than systemd's stop timeout is cut
        // short by it anyway.
        for (field, value, max) in [
            ("tick_interval", sup.tick_interval, Duration::from_secs(60)),
            (
                "shutdown_grace",
                sup.shutdown_grace,
                Duration::from_secs(600),
            ),
        ] {
            if value.is_zero() {
                errors.push(ConfigError::invalid(
                    format!("supervisor.{field}"),
                    "must be greater than zero",
                ));
            } else {
                check_max("supervisor", field, value, max, errors);
            }
        }
    }

    /// `[database]`: the URL in force (`SPIRE_HEALER_DATABASE_URL` wins)
    /// names a backend we speak and parses, and the buffer holds something.
    /// A relative SQLite path is a warning naming the file it resolves to.
    fn validate_database(
        &self,
        env: Env<'_>,
        errors: &mut Vec<ConfigError>,
        warnings: &mut Vec<String>,
    ) -> secrecy::SecretString {
        let database_url: secrecy::SecretString = env("SPIRE_HEALER_DATABASE_URL")
            .map(Into::into)
            .unwrap_or_else(|| self.database.url.clone());
        let url = secrecy::ExposeSecret::expose_secret(&database_url);
        if let Err(reason) = check_database_url(url) {
            errors.push(ConfigError::invalid("database.url", reason));
        } else if let Some(path) = url.strip_prefix("sqlite://").map(Path::new)
            && path.is_relative()
        {
            let absolute = std::env::current_dir()
                .map(|cwd| cwd.join(path).display().to_string())
                .unwrap_or_else(|_| "unknown: the working directory cannot be read".into());
            warnings.push(format!(
                "database.url {url:?} is relative to the working directory: the store is {absolute} \
                 (write sqlite:///absolute/path to pin it)"
            ));
        }
        if self.database.buffer_capacity == 0 {
            errors.push(ConfigError::invalid(
                "database.buffer_capacity",
                "must be greater than zero",
            ));
        }
        database_url
    }

    /// `role` and `[leadership]`: a node instance acts on local agents
    /// only (no servers, no failover); leadership needs PostgreSQL (one
    /// SQLite file is one host: its lock file already makes one actor), and
    /// only the cluster role campaigns.
    fn validate_role(&self, url: &secrecy::SecretString, errors: &mut Vec<ConfigError>) {
        use crate::leadership::Role;
        let url = secrecy::ExposeSecret::expose_secret(url);
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if let Some(l) = &self.leadership {
            for (field, reason) in l.problems() {
                errors.push(ConfigError::invalid(format!("leadership.{field}"), reason));
            }
            if self.role != Role::Cluster {
                errors.push(ConfigError::invalid(
                    "leadership",
                    format!(
                        "only role = \"cluster\" runs active/standby (role is {:?})",
                        self.role.as_str()
                    ),
                ));
            } else if !postgres {
                errors.push(ConfigError::invalid(
                    "leadership",
                    "leadership with fencing needs a PostgreSQL database.url shared by every cluster instance",
                ));
            }
        }
        if self.role == Role::Node {
            if !self.servers.is_empty() {
                errors.push(ConfigError::invalid(
                    "servers",
                    "role = \"node\" watches local agents only: the cluster instance watches the servers",
                ));
            }
            for (name, act) in &self.actuators {
                if matches!(act, crate::actuators::ActuatorConfig::ServerFailover(_)) {
                    errors.push(ConfigError::invalid(
                        format!("actuators.{name}"),
                        "role = \"node\" acts locally: failover belongs to the cluster instance",
                    ));
                }
                if act.is_kubernetes() {
                    errors.push(ConfigError::invalid(
                        format!("actuators.{name}"),
                        "role = \"node\" acts locally: evicting, deleting or restarting pods belongs to the cluster instance",
                    ));
                }
            }
        }
    }

    /// The spool file: `database.spool`, else beside the SQLite file, else
    /// `spire-healer.spool` in the working directory. Its directory must
    /// exist and it must not be a directory.
    fn spool_path(
        &self,
        database_url: &secrecy::SecretString,
        errors: &mut Vec<ConfigError>,
    ) -> Option<PathBuf> {
        let url = secrecy::ExposeSecret::expose_secret(database_url);
        let path = match (&self.database.spool, url.strip_prefix("sqlite://")) {
            (Some(p), _) => p.clone(),
            (None, Some(":memory:")) => return None,
            (None, Some(db)) if !db.is_empty() => PathBuf::from(format!("{db}.spool")),
            (None, _) => PathBuf::from("spire-healer.spool"),
        };
        if path.is_dir() {
            errors.push(ConfigError::invalid(
                "database.spool",
                format!("{} is a directory, not a spool file", path.display()),
            ));
        } else if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            errors.push(ConfigError::invalid(
                "database.spool",
                format!("directory {} of the spool does not exist", parent.display()),
            ));
        }
        if self.database.spool_max_bytes < 1 << 20 {
            errors.push(ConfigError::invalid(
                "database.spool_max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        Some(path)
    }

    /// `[[agents]]`, their Workload API side: at least one, uniquely named,
    /// each with an address that resolves. Returns the endpoints of the
    /// agents that resolved (in order) and the agent names.
    fn validate_agents(
        &self,
        env: Env<'_>,
        errors: &mut Vec<ConfigError>,
    ) -> (Vec<Endpoint>, std::collections::BTreeSet<String>) {
        // The cluster role watches servers and the fleet: no local agent.
        if self.agents.is_empty() && self.role != crate::leadership::Role::Cluster {
            errors.push(ConfigError::invalid(
                "agents",
                "at least one [[agents]] entry is required (role = \"cluster\" may have none)",
            ));
        }
        let mut endpoints = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, a) in self.agents.iter().enumerate() {
            let key = format!("agents[{i}]");
            // A `{node}` left unexpanded is reported already.
            if !valid_name(&a.name) && !a.name.contains(NODE_PLACEHOLDER) {
                errors.push(ConfigError::invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?} must be 1-63 characters of a-z, 0-9, '-' or '_'",
                        a.name
                    ),
                ));
            } else if !seen.insert(a.name.clone()) {
                errors.push(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("{:?} is used by more than one agent", a.name),
                ));
            }
            match Endpoint::resolve(a.address.as_deref(), env).and_then(|e| e.check().map(|()| e)) {
                Ok(e) => endpoints.push(e),
                Err(e) => errors.push(ConfigError::invalid(format!("{key}.address"), e)),
            }
            for (field, value, max) in [
                ("answer_timeout", a.answer_timeout, MAX_TIMEOUT),
                ("backoff_max", a.backoff_max, MAX_BACKOFF),
            ] {
                if value.is_zero() {
                    errors.push(ConfigError::invalid(
                        format!("{key}.{field}"),
                        "must be greater than zero",
                    ));
                }
                check_max(&key, field, value, max, errors);
            }
        }
        (endpoints, seen)
    }

    /// `[[servers]]`: uniquely named (agents included), admin socket or TCP
    /// admin settings, failover address, health and metrics URLs, cadence.
    fn validate_servers(
        &self,
        agents: &std::collections::BTreeSet<String>,
        errors: &mut Vec<ConfigError>,
    ) {
        let mut server_names = std::collections::BTreeSet::new();
        for (i, srv) in self.servers.iter().enumerate() {
            let key = format!("servers[{i}]");
            if !valid_name(&srv.name) {
                errors.push(ConfigError::invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?} must be 1-63 characters of a-z, 0-9, '-' or '_'",
                        srv.name
                    ),
                ));
            } else if !server_names.insert(srv.name.clone()) || agents.contains(&srv.name) {
                errors.push(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("{:?} is used by more than one agent or server", srv.name),
                ));
            }
            if let Some(Err(e)) = srv.admin_socket.as_deref().map(check_socket_path) {
                errors.push(ConfigError::invalid(format!("{key}.admin_socket"), e));
            }
            errors.extend(check_admin_tcp(&key, srv, agents));
            if let Some(Err(e)) = srv.address.as_deref().map(check_host_port) {
                errors.push(ConfigError::invalid(format!("{key}.address"), e));
            }
            for (field, url) in [
                ("health_url", &srv.health_url),
                ("metrics_url", &srv.metrics_url),
            ] {
                if let Some(Err(e)) = url.as_deref().map(check_http_url) {
                    errors.push(ConfigError::invalid(format!("{key}.{field}"), e));
                }
            }
            if srv.poll_interval.is_zero() || srv.timeout.is_zero() {
                errors.push(ConfigError::invalid(
                    &key,
                    "poll_interval and timeout must be greater than zero",
                ));
            }
            check_max(&key, "poll_interval", srv.poll_interval, MAX_POLL, errors);
            check_max(&key, "timeout", srv.timeout, MAX_TIMEOUT, errors);
        }
    }

    /// `[[agents]]`, their control-plane side: admin socket, health and
    /// metrics URLs, the config file `server_failover` rewrites, cadence.
    fn validate_agent_sources(&self, errors: &mut Vec<ConfigError>) {
        for (i, a) in self.agents.iter().enumerate() {
            let key = format!("agents[{i}]");
            if let Some(Err(e)) = a.admin_socket.as_deref().map(check_socket_path) {
                errors.push(ConfigError::invalid(format!("{key}.admin_socket"), e));
            }
            for (field, url) in [
                ("health_url", &a.health_url),
                ("metrics_url", &a.metrics_url),
            ] {
                if let Some(Err(e)) = url.as_deref().map(check_http_url) {
                    errors.push(ConfigError::invalid(format!("{key}.{field}"), e));
                }
            }
            if let Some(f) = &a.config_file
                && !f.is_absolute()
            {
                errors.push(ConfigError::invalid(
                    format!("{key}.config_file"),
                    format!("{} must be an absolute path", f.display()),
                ));
            }
            if let Some(dir) = &a.data_dir {
                if !dir.is_absolute() {
                    errors.push(ConfigError::invalid(
                        format!("{key}.data_dir"),
                        format!("{} must be an absolute path", dir.display()),
                    ));
                } else if dir.exists() && !dir.is_dir() {
                    errors.push(ConfigError::invalid(
                        format!("{key}.data_dir"),
                        format!("{} is not a directory", dir.display()),
                    ));
                }
            }
            if let Some(Err(e)) = a
                .node_alias
                .as_deref()
                .map(crate::spiffe_id::SpiffeId::parse)
            {
                errors.push(ConfigError::invalid(format!("{key}.node_alias"), e));
            }
            if let Some(path) = &a.trust_bundle_path {
                let mut problems = Vec::new();
                crate::sensors::cert_files::path_problems("trust_bundle_path", path, &mut problems);
                for (field, reason) in problems {
                    errors.push(ConfigError::invalid(format!("{key}.{field}"), reason));
                }
            }
            if a.poll_interval.is_zero() {
                errors.push(ConfigError::invalid(
                    format!("{key}.poll_interval"),
                    "must be greater than zero",
                ));
            }
            check_max(&key, "poll_interval", a.poll_interval, MAX_POLL, errors);
        }
    }

    /// `[actuators.<name>]`: valid names other than the built-in `refetch`,
    /// each instance's own problems, and `restart` naming a command.
    fn validate_actuators(&self, errors: &mut Vec<ConfigError>) {
        for (name, act) in &self.actuators {
            let key = format!("actuators.{name}");
            if !valid_name(name) {
                errors.push(ConfigError::invalid(
                    &key,
                    "actuator names must be 1-63 characters of a-z, 0-9, '-' or '_'",
                ));
            }
            if name == crate::actuators::REFETCH {
                errors.push(ConfigError::invalid(
                    &key,
                    "\"refetch\" is built in and cannot be redefined",
                ));
            }
            for (field, reason) in act.problems() {
                errors.push(ConfigError::invalid(format!("{key}.{field}"), reason));
            }
            for (field, reason) in spire_actuator_problems(act) {
                errors.push(ConfigError::invalid(format!("{key}.{field}"), reason));
            }
            if let Some(dep) = act.depends_on()
                && !matches!(
                    self.actuators.get(dep),
                    Some(crate::actuators::ActuatorConfig::Command(_))
                )
            {
                errors.push(ConfigError::invalid(
                    format!("{key}.restart"),
                    format!("{dep:?} must name a configured actuator of type \"command\""),
                ));
            }
        }
    }

    /// `[kubernetes]`: present, with a namespace allow-list, when a
    /// Kubernetes actuator is configured; each value valid; a workload
    /// named like an agent says its `node`.
    fn validate_kubernetes(&self, errors: &mut Vec<ConfigError>) {
        let k8s_actuators: Vec<&str> = self
            .actuators
            .iter()
            .filter(|(_, a)| a.is_kubernetes())
            .map(|(n, _)| n.as_str())
            .collect();
        let Some(k) = &self.kubernetes else {
            if let Some(first) = k8s_actuators.first() {
                errors.push(ConfigError::invalid(
                    format!("actuators.{first}"),
                    "a Kubernetes actuator needs a [kubernetes] section with the namespaces it may touch",
                ));
            }
            return;
        };
        for (field, reason) in k.problems(!k8s_actuators.is_empty()) {
            errors.push(ConfigError::invalid(format!("kubernetes.{field}"), reason));
        }
        // A workload named like a server is that server's pod; one named
        // like an agent is its DaemonSet pod on its node, so it needs
        // `node` (the selector alone matches every agent's pod).
        for (i, w) in k.workloads.iter().enumerate() {
            if w.node.is_none() && self.agents.iter().any(|a| a.name == w.name) {
                errors.push(ConfigError::invalid(
                    format!("kubernetes.workloads[{i}].name"),
                    format!(
                        "{:?} names an agent: its pod needs `node` (the node its DaemonSet pod runs on)",
                        w.name
                    ),
                ));
            }
        }
    }

    /// The policy file (or the built-in one): it parses and is consistent.
    /// Warns about probes too slow to ever open a burst on their own and
    /// about ladder rungs whose actuator is not configured.
    fn resolve_policy(
        &self,
        errors: &mut Vec<ConfigError>,
        warnings: &mut Vec<String>,
    ) -> Option<Policy> {
        let loaded = match &self.policy_file {
            None => Policy::builtin(),
            Some(p) => Policy::load(p),
        };
        let mut policy = match loaded {
            Ok(policy) => policy,
            Err(e) => {
                errors.push(e);
                return None;
            }
        };
        for problem in policy.problems() {
            errors.push(ConfigError::invalid("policy", problem));
        }
        // A node instance leaves what is between an agent and its servers
        // to the cluster instance: it records those incidents and holds them
        // (`left_to_cluster`).
        policy.left_to_cluster = crate::leadership::CLUSTER_SYMPTOMS
            .into_iter()
            .filter(|k| !self.role.acts_on(*k))
            .collect();
        let th = &policy.thresholds;
        for p in &self.probes {
            let per_window = th.burst_window.as_secs_f64() / p.interval.as_secs_f64().max(1e-3);
            if per_window < th.burst_open_failures as f64 {
                warnings.push(format!(
                    "probe {:?} runs every {} but a burst needs {} failures within {}: its own probes alone can never open handshake_failure_burst",
                    p.name,
                    humantime::format_duration(p.interval),
                    th.burst_open_failures,
                    humantime::format_duration(th.burst_window),
                ));
            }
        }
        for (symptom, rung, actuator) in policy.actuators_used() {
            let left = crate::model::SymptomKind::parse(symptom)
                .is_some_and(|k| policy.left_to_cluster.contains(&k));
            if !left
                && actuator != crate::actuators::REFETCH
                && !self.actuators.contains_key(actuator)
            {
                warnings.push(format!(
                    "policy ladder {symptom}[{rung}] uses actuator {actuator:?}, which is not configured; that rung is skipped"
                ));
            }
        }
        Some(policy)
    }
}

// === impl Resolved: sensors ===

impl Resolved {
    /// The sensors this configuration asks for, in start order: the agents'
    /// Workload API streams first (others present their SVIDs), then per
    /// server its admin API, health and metrics, per agent its Debug API,
    /// health and metrics, then probes, certificate files and Envoys.
    pub fn sensors(&self) -> Vec<SensorSpec> {
        use crate::model::Role;
        use crate::sensors::{
            agent_debug, bootstrap_bundle, health, metrics_scrape, server_api, workload_api,
        };
        let cfg = &self.config;
        let mut specs = Vec::new();
        for (agent, endpoint) in cfg.agents.iter().zip(&self.endpoints) {
            specs.push(SensorSpec::WorkloadApi(workload_api::Settings {
                agent: agent.name.clone(),
                endpoint: endpoint.clone(),
                answer_timeout: agent.answer_timeout,
                backoff_max: agent.backoff_max,
            }));
        }
        for s in &cfg.servers {
            let admin = |socket: &Path| server_api::Settings {
                poll_interval: s.poll_interval,
                timeout: s.timeout,
                address: s.address.clone(),
                ..server_api::Settings::new(&s.name, socket)
            };
            if let Some(socket) = &s.admin_socket {
                specs.push(SensorSpec::ServerApi(admin(socket)));
            } else if let (Some(address), Some(via)) = (&s.admin_address, &s.admin_via_agent) {
                specs.push(SensorSpec::ServerApiTcp {
                    settings: admin(Path::new("")),
                    address: address.clone(),
                    server_id: s.admin_server_id.clone(),
                    via_agent: via.clone(),
                });
            }
            if let Some(url) = &s.health_url {
                specs.push(SensorSpec::Health(health::Settings::from_base_url(
                    &s.name,
                    Role::Server,
                    url,
                    s.poll_interval,
                    s.timeout,
                )));
            }
            if let Some(url) = &s.metrics_url {
                specs.push(SensorSpec::MetricsScrape(metrics_scrape::Settings::new(
                    &s.name,
                    Role::Server,
                    url,
                    s.poll_interval,
                    s.timeout,
                )));
            }
        }
        for a in &cfg.agents {
            let timeout = a.poll_interval.max(Duration::from_secs(1));
            if let Some(socket) = &a.admin_socket {
                specs.push(SensorSpec::AgentDebug(agent_debug::Settings {
                    poll_interval: a.poll_interval,
                    timeout,
                    ..agent_debug::Settings::new(&a.name, socket)
                }));
            }
            if let Some(url) = &a.health_url {
                specs.push(SensorSpec::Health(health::Settings::from_base_url(
                    &a.name,
                    Role::Agent,
                    url,
                    a.poll_interval,
                    timeout,
                )));
            }
            if let Some(url) = &a.metrics_url {
                specs.push(SensorSpec::MetricsScrape(metrics_scrape::Settings::new(
                    &a.name,
                    Role::Agent,
                    url,
                    a.poll_interval,
                    timeout,
                )));
            }
            if let Some(path) = &a.trust_bundle_path {
                specs.push(SensorSpec::BootstrapBundle(
                    bootstrap_bundle::Settings::new(&a.name, path, a.poll_interval),
                ));
            }
        }
        specs.extend(cfg.probes.iter().cloned().map(SensorSpec::HandshakeProbe));
        specs.extend(cfg.cert_files.iter().cloned().map(SensorSpec::CertFile));
        for e in &cfg.envoys {
            specs.push(SensorSpec::MetricsScrape(metrics_scrape::Settings::new(
                &e.name,
                Role::Envoy,
                &e.metrics_url,
                e.poll_interval,
                e.timeout,
            )));
        }
        specs
    }
}

/// Reads a whole file as text.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Parses TOML text as one `T`; `path` names the source in errors (the
/// parser stops at the first one).
fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| parse::single_error(parse::Source { text, path }, &e))
}

/// Reads and parses a TOML file as one `T`.
fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    parse_toml(&read(path)?, &path.display().to_string())
}

// === impl Policy: loading ===

impl Policy {
    /// The built-in default.
    ///
    /// # Errors
    /// Never in a released build (a test parses it).
    pub fn builtin() -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_POLICY, "policies/default.toml (built in)")
    }

    /// Parses policy TOML.
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        parse_toml(text, path)
    }

    /// Reads a policy file.
    ///
    /// # Errors
    /// `Read` or `Parse`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }
}

/// The SPIRE API actuators' settings: positive deadlines and an absolute
/// join token file.
fn spire_actuator_problems(act: &ActuatorConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let positive = |field, d: Duration, out: &mut Vec<(&'static str, String)>| {
        if d.is_zero() {
            out.push((field, "must be greater than zero".to_string()));
        }
    };
    match act {
        ActuatorConfig::EntryBump(c) => positive("call_timeout", c.call_timeout, &mut out),
        ActuatorConfig::AgentEvict(c) => {
            positive("call_timeout", c.call_timeout, &mut out);
            positive("join_token_ttl", c.join_token_ttl, &mut out);
            if let Some(f) = c.join_token_file.as_deref().filter(|f| !f.starts_with('/')) {
                out.push(("join_token_file", format!("{f:?} must be an absolute path")));
            }
        }
        _ => {}
    }
    out
}

/// An admin socket path: absolute, short enough, and a socket if it exists.
fn check_socket_path(p: &Path) -> Result<(), String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", p.display()))?;
    Endpoint::parse(&format!("unix://{s}"))
        .and_then(|e| e.check())
        .map_err(|e| e.to_string())
}

/// `host:port` with a numeric port.
fn check_host_port(a: &str) -> Result<(), String> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| format!("{a:?} must be host:port"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "{a:?} must be host:port with a port between 1 and 65535"
        ));
    }
    Ok(())
}

/// `http://host:port/...`.
fn check_http_url(u: &str) -> Result<(), String> {
    let rest = u.strip_prefix("http://").ok_or_else(|| {
        format!("{u:?} must start with http:// (SPIRE serves health and metrics over plain HTTP)")
    })?;
    let authority = rest.split('/').next().unwrap_or("");
    check_host_port(authority).map_err(|_| format!("{u:?} must name host:port"))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A database URL we can open: a PostgreSQL URL that parses (checked
/// without connecting), or `sqlite://PATH` whose directory exists.
fn check_database_url(url: &str) -> Result<(), String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return check_postgres_url(url);
    }
    let path = url
        .strip_prefix("sqlite://")
        .ok_or_else(|| "must start with sqlite:// or postgres:// (or postgresql://)".to_string())?;
    if path.is_empty() {
        return Err("sqlite:// needs a file path".into());
    }
    let p = Path::new(path);
    if p.is_dir() {
        return Err(format!("{path} is a directory, not a database file"));
    }
    if let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(format!(
            "directory {} of the SQLite file does not exist",
            parent.display()
        ));
    }
    Ok(())
}

/// Parses a PostgreSQL URL as the store will. The reason never quotes the
/// URL, which may hold a password.
fn check_postgres_url(url: &str) -> Result<(), String> {
    use sqlx::postgres::PgConnectOptions;
    let options = url.parse::<PgConnectOptions>().map_err(|e| {
        let reason = match &e {
            sqlx::Error::Configuration(inner) => inner.to_string(),
            other => other.to_string(),
        };
        format!(
            "not a valid PostgreSQL URL ({reason}); expected postgres://user:password@host:port/database"
        )
    })?;
    if options.get_database().is_none_or(str::is_empty) {
        return Err(
            "names no database; expected postgres://user:password@host:port/database".into(),
        );
    }
    Ok(())
}

/// The `[api]` socket as the server will bind it: its directory exists and
/// is not open to everyone, and what is already there is a socket (a stale
/// one is replaced).
fn check_api_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()), // relative or root: `problems` reports it
    };
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", dir.display())),
        Ok(m) if m.permissions().mode() & 0o1002 == 0o002 => {
            return Err(format!(
                "directory {} is world-writable without the sticky bit: anyone could replace the socket",
                dir.display()
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("directory {} does not exist", dir.display()));
        }
        Err(e) => return Err(format!("directory {}: {e}", dir.display())),
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(m) => Err(format!(
            "{} exists and is a {}, not a socket; it would not be replaced",
            path.display(),
            if m.is_dir() {
                "directory"
            } else if m.file_type().is_symlink() {
                "symbolic link"
            } else {
                "regular file"
            }
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn shipped_example_config_is_valid() {
        let text = include_str!("../deploy/examples/spire-healer.toml");
        let c = Config::from_toml(text, "deploy/examples/spire-healer.toml").unwrap();
        // The example's database directory exists only on a real host.
        let env = |k: &str| {
            (k == "SPIRE_HEALER_DATABASE_URL").then(|| "sqlite://healer-example.db".to_string())
        };
        let r = c.validate(&env).unwrap();
        assert!(
            r.warnings.iter().all(|w| !w.contains("\"restart-agent\"")),
            "{:?}",
            r.warnings
        );
        assert_eq!(
            r.endpoints[0].to_string(),
            "unix:///run/spire/agent/public/api.sock"
        );
        // The example shows the [slo] defaults.
        assert_eq!(c.slo, crate::slo::SloConfig::default());
    }
}
