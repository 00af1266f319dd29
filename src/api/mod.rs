//! Our gRPC API (`spire_healer.v1.Supervisor`), served on a Unix socket
//! and, optionally, on TCP with mTLS ([`tcp`]).
//!
//! Callers are identified by their transport, never by anything they
//! send: the kernel's peer credentials on the socket, the verified SPIFFE
//! ID on TCP. [`authz`] admits each call by role before tonic reads its
//! body; [`rpc`] holds the RPC bodies over a [`Backend`] (store, controls,
//! watch hub, the loop's status); [`convert`] maps between protobuf and
//! the domain; `watch` bounds each `Watch` subscriber; [`reports`] folds
//! `ReportHandshakes` batches into the shared
//! [`handshake::Counter`](crate::handshake::Counter).
//!
//! [`service`] builds the service both transports serve; [`serve`] serves
//! it on the socket. The socket file is ours: [`serve`] refuses a path
//! that exists and is not a socket (a regular file is never deleted) or
//! that a live server answers on, replaces a stale socket, sets the
//! configured mode (0600 by default) and removes the socket when serving
//! stops.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{Instrument, info, info_span, warn};

use crate::handshake::Counter;
use crate::proto::healer::supervisor_server::SupervisorServer;
use crate::telemetry::metrics::Metrics;

pub mod authz;
mod client;
pub mod convert;
pub mod reports;
pub mod rpc;
pub mod tcp;
mod watch;

pub use client::{
    ApiAddr, ClientError, ClientIdentity, ReportClient, SupervisorClient, TlsSettings,
};

// === Config ===

/// `[api]`: our gRPC API on a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Path of the Unix socket. Its directory must exist; a stale socket
    /// there is replaced, anything else is refused.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Permission bits of the socket file (TOML: `0o600`). Connecting needs
    /// write permission; widen it (e.g. `0o666`) only to let other uids
    /// listed in `report_uids`, `read_uids` or `operator_uids` connect: the
    /// uid check is what admits them.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    /// Uids allowed to call `ReportHandshakes`. Default: only the uid
    /// spire-healer runs as.
    #[serde(default = "default_report_uids")]
    pub report_uids: Vec<u32>,
    /// Most reports in one batch (request message); a larger batch ends
    /// the stream with `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_max_batch_reports")]
    pub max_batch_reports: usize,
    /// Most reports in one stream, over all its batches.
    #[serde(default = "default_max_stream_reports")]
    pub max_stream_reports: u64,
    /// Largest request message, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most report streams open at once, over all connections (and the
    /// HTTP/2 stream limit of each connection).
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Largest `count` in one report; a report over it is rejected.
    #[serde(default = "default_max_count_per_report")]
    pub max_count_per_report: u64,
    /// Longest wait for the next batch before the stream is ended with
    /// `DEADLINE_EXCEEDED` (frees its slot from idle reporters).
    #[serde(default = "default_stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Uids allowed to read over the socket (status, lists, watch).
    /// Default: only the uid spire-healer runs as.
    #[serde(default = "default_report_uids")]
    pub read_uids: Vec<u32>,
    /// Uids allowed to operate over the socket (approve, reject, pause,
    /// resume, dry run, reset a demotion; operators read too). Default:
    /// only the uid spire-healer runs as.
    #[serde(default = "default_report_uids")]
    pub operator_uids: Vec<u32>,
    /// Callers by SPIFFE ID (TCP with mTLS).
    #[serde(default)]
    pub authz: AuthzConfig,
    /// Optional TCP listener with mTLS, using our own X509-SVID from the
    /// Workload API.
    #[serde(default)]
    pub tcp: Option<tcp::TcpConfig>,
    /// Events queued per `Watch` subscriber. A subscriber whose queue is
    /// full waits in the event hub's ring; once the ring moves past it,
    /// it is dropped with `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_watch_buffer")]
    pub watch_buffer: usize,
    /// Most `Watch` streams open at once, over all transports; one more is
    /// refused with `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_max_watchers")]
    pub max_watchers: u32,
}

/// `[api.authz]`: roles by SPIFFE ID, for callers over TCP with mTLS.
/// Every ID listed must be of one trust domain; a caller of another trust
/// domain, or not listed, is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    /// May read (status, lists, watch).
    #[serde(default)]
    pub readers: Vec<String>,
    /// May operate and read.
    #[serde(default)]
    pub operators: Vec<String>,
    /// May call `ReportHandshakes`.
    #[serde(default)]
    pub reporters: Vec<String>,
}

impl AuthzConfig {
    /// Entries that are not SPIFFE IDs a caller's SVID could carry, and a
    /// second trust domain.
    fn problems(&self, out: &mut Vec<(&'static str, String)>) {
        let mut first: Option<crate::spiffe_id::SpiffeId> = None;
        for (field, list) in [
            ("authz.operators", &self.operators),
            ("authz.readers", &self.readers),
            ("authz.reporters", &self.reporters),
        ] {
            for entry in list {
                let id = match crate::spiffe_id::SpiffeId::parse(entry) {
                    Ok(id) => id,
                    Err(e) => {
                        out.push((field, format!("{entry:?} is not a SPIFFE ID: {e}")));
                        continue;
                    }
                };
                if id.is_root() {
                    out.push((
                        field,
                        format!("{entry:?} names a trust domain, not a workload"),
                    ));
                    continue;
                }
                match &first {
                    None => first = Some(id),
                    Some(f) if f.trust_domain() != id.trust_domain() => out.push((
                        field,
                        format!(
                            "{entry:?} is in trust domain {}, but {} is in {}: every ID must be of one trust domain",
                            id.trust_domain(),
                            f,
                            f.trust_domain()
                        ),
                    )),
                    Some(_) => {}
                }
            }
        }
    }
}

/// What the API reads and changes.
#[derive(Clone)]
pub struct Backend {
    /// History (lists, incidents, audit).
    pub store: Arc<dyn crate::knowledge::Store>,
    /// Pause, dry run, approvals, demotions.
    pub controls: crate::control::Controls,
    /// Recent events for `Watch`.
    pub hub: Arc<crate::control::Hub>,
    /// The loop's last published status.
    pub status: tokio::sync::watch::Receiver<crate::control::Status>,
    /// The clock mutating calls are stamped with.
    pub clock: Arc<dyn crate::clock::Clock>,
    /// The epoch a cluster leader acts under; `None` for the sole actor
    /// (role `all` or `node`). A standby serves no API.
    pub leader_epoch: Option<i64>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/spire-healer/api.sock")
}

fn default_socket_mode() -> u32 {
    0o600
}

fn default_report_uids() -> Vec<u32> {
    vec![nix::unistd::getuid().as_raw()]
}

fn default_max_batch_reports() -> usize {
    10_000
}

fn default_max_stream_reports() -> u64 {
    10_000_000
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_max_concurrent_streams() -> u32 {
    256
}

fn default_max_count_per_report() -> u64 {
    1_000_000
}

fn default_stream_idle_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_watch_buffer() -> usize {
    256
}

fn default_max_watchers() -> u32 {
    64
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            socket_mode: default_socket_mode(),
            report_uids: default_report_uids(),
            max_batch_reports: default_max_batch_reports(),
            max_stream_reports: default_max_stream_reports(),
            max_message_bytes: default_max_message_bytes(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_count_per_report: default_max_count_per_report(),
            stream_idle_timeout: default_stream_idle_timeout(),
            read_uids: default_report_uids(),
            operator_uids: default_report_uids(),
            authz: AuthzConfig::default(),
            tcp: None,
            watch_buffer: default_watch_buffer(),
            max_watchers: default_max_watchers(),
        }
    }
}

/// Longest socket path: `sun_path` holds 108 bytes with the trailing NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Smallest and largest accepted `max_message_bytes`.
const MESSAGE_BYTES_RANGE: (usize, usize) = (1024, 64 * 1024 * 1024);

/// Largest accepted `watch_buffer`.
const MAX_WATCH_BUFFER: usize = 65_536;

/// The key of an `[api.tcp]` field, as `check-config` names it.
fn tcp_key(field: &str) -> &'static str {
    match field {
        "listen" => "tcp.listen",
        "workload_api" => "tcp.workload_api",
        "spiffe_id" => "tcp.spiffe_id",
        "trust_domain" => "tcp.trust_domain",
        "handshake_timeout" => "tcp.handshake_timeout",
        "max_connections" => "tcp.max_connections",
        _ => "tcp",
    }
}

/// Largest accepted `max_watchers`.
const MAX_WATCHERS: u32 = 10_000;

impl ApiConfig {
    /// Every problem, as (field, problem) pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let socket_len = self.socket.as_os_str().len();
        if !self.socket.is_absolute() {
            out.push(("socket", "must be an absolute path".to_string()));
        } else if socket_len > MAX_SOCKET_PATH {
            out.push((
                "socket",
                format!(
                    "is {socket_len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}"
                ),
            ));
        }
        if self.socket_mode & !0o777 != 0 {
            out.push((
                "socket_mode",
                format!("{:#o} has bits beyond 0o777", self.socket_mode),
            ));
        } else if self.socket_mode & 0o600 != 0o600 {
            out.push((
                "socket_mode",
                format!(
                    "{:#o} must give the owner read and write (0o600)",
                    self.socket_mode
                ),
            ));
        }
        if self.report_uids.is_empty() {
            out.push((
                "report_uids",
                "is empty: no caller could report".to_string(),
            ));
        }
        if self.max_batch_reports == 0 {
            out.push(("max_batch_reports", "must be greater than zero".to_string()));
        }
        if self.max_stream_reports < self.max_batch_reports as u64 {
            out.push((
                "max_stream_reports",
                "must be at least max_batch_reports".to_string(),
            ));
        }
        let (lo, hi) = MESSAGE_BYTES_RANGE;
        if !(lo..=hi).contains(&self.max_message_bytes) {
            out.push((
                "max_message_bytes",
                format!("must be between {lo} and {hi}"),
            ));
        }
        if self.max_concurrent_streams == 0 {
            out.push((
                "max_concurrent_streams",
                "must be greater than zero".to_string(),
            ));
        }
        if self.max_count_per_report == 0 {
            out.push((
                "max_count_per_report",
                "must be greater than zero".to_string(),
            ));
        }
        if self.stream_idle_timeout.is_zero() {
            out.push((
                "stream_idle_timeout",
                "must be greater than zero".to_string(),
            ));
        }
        if !(1..=MAX_WATCH_BUFFER).contains(&self.watch_buffer) {
            out.push((
                "watch_buffer",
                format!("must be between 1 and {MAX_WATCH_BUFFER}"),
            ));
        }
        if !(1..=MAX_WATCHERS).contains(&self.max_watchers) {
            out.push((
                "max_watchers",
                format!("must be between 1 and {MAX_WATCHERS}"),
            ));
        }
        self.authz.problems(&mut out);
        if let Some(tcp) = &self.tcp {
            out.extend(tcp.problems().into_iter().map(|(f, p)| (tcp_key(f), p)));
        }
        out
    }

    fn limits(&self) -> reports::Limits {
        reports::Limits {
            max_batch_reports: self.max_batch_reports,
            max_stream_reports: self.max_stream_reports,
            max_count_per_report: self.max_count_per_report,
            idle_timeout: self.stream_idle_timeout,
        }
    }
}

// === Errors ===

/// Why the API could not start, stopped, or a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket's directory does not exist.
    #[error("socket directory {path} does not exist")]
    NoSocketDir {
        /// The directory.
        path: PathBuf,
    },
    /// Something other than a socket exists at the socket path; it is left
    /// alone.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket's directory is writable by everyone without the sticky
    /// bit: another user could swap the socket for a symlink between bind
    /// and chmod.
    #[error(
        "socket directory {path} is writable by everyone (and not sticky); use a private directory"
    )]
    UnsafeSocketDir {
        /// The directory.
        path: PathBuf,
    },
    /// A live server already answers on the socket.
    #[error("another process is serving on {path}")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A filesystem or socket operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was attempted (`bind`, `chmod`, …).
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("API server failed")]
    Serve(#[source] tonic::transport::Error),
    /// A client channel could not be built.
    #[error("cannot build an API client channel")]
    Channel(#[source] crate::endpoint::EndpointError),
}

impl ApiError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NoSocketDir { .. } => "no_socket_dir",
            ApiError::UnsafeSocketDir { .. } => "unsafe_socket_dir",
            ApiError::NotASocket { .. } => "not_a_socket",
            ApiError::InUse { .. } => "in_use",
            ApiError::Io { .. } => "io",
            ApiError::Serve(_) => "serve",
            ApiError::Channel(_) => "channel",
        }
    }
}

// === Methods and outcomes ===

/// An RPC of the `Supervisor` service (the `method` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    ReportHandshakes,
    GetStatus,
    ListIncidents,
    GetIncident,
    ListActions,
    ListHolds,
    ListApprovals,
    ListAudit,
    Watch,
    Approve,
    Reject,
    Pause,
    Resume,
    SetDryRun,
    ResetDemotion,
}

impl Method {
    /// Every RPC, in the proto's order.
    pub const ALL: [Method; 15] = [
        Method::ReportHandshakes,
        Method::GetStatus,
        Method::ListIncidents,
        Method::GetIncident,
        Method::ListActions,
        Method::ListHolds,
        Method::ListApprovals,
        Method::ListAudit,
        Method::Watch,
        Method::Approve,
        Method::Reject,
        Method::Pause,
        Method::Resume,
        Method::SetDryRun,
        Method::ResetDemotion,
    ];

    /// Snake-case name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ReportHandshakes => "report_handshakes",
            Method::GetStatus => "get_status",
            Method::ListIncidents => "list_incidents",
            Method::GetIncident => "get_incident",
            Method::ListActions => "list_actions",
            Method::ListHolds => "list_holds",
            Method::ListApprovals => "list_approvals",
            Method::ListAudit => "list_audit",
            Method::Watch => "watch",
            Method::Approve => "approve",
            Method::Reject => "reject",
            Method::Pause => "pause",
            Method::Resume => "resume",
            Method::SetDryRun => "set_dry_run",
            Method::ResetDemotion => "reset_demotion",
        }
    }

    /// The RPC's name in the proto (`GetStatus`).
    pub fn rpc_name(self) -> &'static str {
        match self {
            Method::ReportHandshakes => "ReportHandshakes",
            Method::GetStatus => "GetStatus",
            Method::ListIncidents => "ListIncidents",
            Method::GetIncident => "GetIncident",
            Method::ListActions => "ListActions",
            Method::ListHolds => "ListHolds",
            Method::ListApprovals => "ListApprovals",
            Method::ListAudit => "ListAudit",
            Method::Watch => "Watch",
            Method::Approve => "Approve",
            Method::Reject => "Reject",
            Method::Pause => "Pause",
            Method::Resume => "Resume",
            Method::SetDryRun => "SetDryRun",
            Method::ResetDemotion => "ResetDemotion",
        }
    }

    /// The RPC an HTTP/2 path names (`/spire_healer.v1.Supervisor/GetStatus`).
    pub fn from_path(path: &str) -> Option<Self> {
        let name = path
            .strip_prefix('/')?
            .strip_prefix(crate::proto::healer::supervisor_server::SERVICE_NAME)?
            .strip_prefix('/')?;
        Self::ALL.into_iter().find(|m| m.rpc_name() == name)
    }

    /// The role a caller needs.
    pub fn role(self) -> authz::Role {
        use authz::Role;
        match self {
            Method::ReportHandshakes => Role::Reporter,
            Method::GetStatus
            | Method::ListIncidents
            | Method::GetIncident
            | Method::ListActions
            | Method::ListHolds
            | Method::ListApprovals
            | Method::ListAudit
            | Method::Watch => Role::Reader,
            Method::Approve
            | Method::Reject
            | Method::Pause
            | Method::Resume
            | Method::SetDryRun
            | Method::ResetDemotion => Role::Operator,
        }
    }

    /// Whether the call changes something (and records who).
    pub fn mutates(self) -> bool {
        self.role() == authz::Role::Operator
    }
}

/// How a call ended (the `outcome` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (for `Watch`: the stream started).
    Ok,
    /// Caller unknown or not allowed (`UNAUTHENTICATED`,
    /// `PERMISSION_DENIED`).
    Unauthenticated,
    /// The request was malformed (`INVALID_ARGUMENT`, `OUT_OF_RANGE`).
    Invalid,
    /// What it names does not exist.
    NotFound,
    /// It cannot be done in the current state (already decided, expired).
    FailedPrecondition,
    /// A bound was hit (batch, stream, message size, open streams).
    ResourceExhausted,
    /// The store did not answer, or the server shut down.
    Unavailable,
    /// Anything else (client went away, idle timeout).
    Error,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Unauthenticated,
        Outcome::Invalid,
        Outcome::NotFound,
        Outcome::FailedPrecondition,
        Outcome::ResourceExhausted,
        Outcome::Unavailable,
        Outcome::Error,
    ];

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Invalid => "invalid",
            Outcome::NotFound => "not_found",
            Outcome::FailedPrecondition => "failed_precondition",
            Outcome::ResourceExhausted => "resource_exhausted",
            Outcome::Unavailable => "unavailable",
            Outcome::Error => "error",
        }
    }

    /// The outcome of a call that ended with `code`.
    pub fn of(code: Code) -> Self {
        match code {
            Code::Ok => Outcome::Ok,
            Code::Unauthenticated | Code::PermissionDenied => Outcome::Unauthenticated,
            Code::InvalidArgument | Code::OutOfRange => Outcome::Invalid,
            Code::NotFound => Outcome::NotFound,
            Code::FailedPrecondition => Outcome::FailedPrecondition,
            Code::ResourceExhausted => Outcome::ResourceExhausted,
            Code::Unavailable => Outcome::Unavailable,
            _ => Outcome::Error,
        }
    }
}

// === Service ===

/// The service both transports serve: [`rpc::Api`] behind
/// [`authz::Authorized`], with `max_message_bytes` as its decoding bound.
pub type Service = authz::Authorized<SupervisorServer<rpc::Api>>;

/// Builds the service. Serve clones of one service on every transport
/// (Unix socket: [`serve_service`]; TCP: `tcp`'s acceptor with
/// `tonic::transport::Server::builder().add_service(svc)`) so they share
/// the bounds on report streams and watchers. Its `Watch` streams end
/// with `UNAVAILABLE` when `shutdown` is cancelled.
pub fn service(
    cfg: &ApiConfig,
    counter: Counter,
    backend: Backend,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Service {
    let api = api(cfg, counter, backend, metrics.clone(), shutdown);
    wrap(cfg, api, metrics)
}

fn api(
    cfg: &ApiConfig,
    counter: Counter,
    backend: Backend,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> rpc::Api {
    rpc::Api {
        ingest: reports::Ingest::new(counter, cfg.limits(), &metrics),
        report_slots: Arc::new(Semaphore::new(cfg.max_concurrent_streams as usize)),
        backend,
        watchers: Arc::new(watch::Watchers::new(cfg.max_watchers, cfg.watch_buffer)),
        metrics,
        shutdown,
    }
}

fn wrap(cfg: &ApiConfig, api: rpc::Api, metrics: Arc<Metrics>) -> Service {
    let watchers = api.watchers.clone();
    let server = SupervisorServer::new(api).max_decoding_message_size(cfg.max_message_bytes);
    authz::Authorized::new(server, Arc::new(authz::Policy::new(cfg)), metrics, watchers)
}

// === Serving ===

/// Where [`serve`] bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The socket path (as configured).
    pub socket: PathBuf,
}

/// Builds the [`service`], binds the socket now and returns the future
/// that serves on it.
///
/// Binding happens before this returns, so a bad path fails startup. The
/// future serves until `shutdown` is cancelled: it then stops accepting,
/// ends open report and watch streams with `UNAVAILABLE` (report batches
/// received stay counted), waits for connections to close and removes the
/// socket file. If the future is dropped instead, the socket file is
/// removed too. It is removed only while it is still the socket bound
/// here.
///
/// # Errors
/// [`ApiError::NoSocketDir`], [`ApiError::NotASocket`], [`ApiError::InUse`]
/// or [`ApiError::Io`] when the socket cannot be set up; the future
/// returns [`ApiError::Serve`] or [`ApiError::Io`] if serving fails.
///
/// # Panics
/// The future panics when polled outside a tokio runtime.
pub fn serve(
    cfg: &ApiConfig,
    counter: Counter,
    backend: Backend,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<
    (
        Bound,
        impl Future<Output = Result<(), ApiError>> + Send + 'static + use<>,
    ),
    ApiError,
> {
    let svc = service(cfg, counter, backend, metrics, shutdown.clone());
    serve_service(cfg, svc, shutdown)
}

/// Serves `svc` (a clone of the one [`service`] the TCP side serves too)
/// on the configured Unix socket; otherwise as [`serve`].
///
/// # Errors
/// As [`serve`].
///
/// # Panics
/// The future panics when polled outside a tokio runtime.
pub fn serve_service(
    cfg: &ApiConfig,
    svc: Service,
    shutdown: CancellationToken,
) -> Result<
    (
        Bound,
        impl Future<Output = Result<(), ApiError>> + Send + 'static + use<>,
    ),
    ApiError,
> {
    let socket = cfg.socket.clone();
    let (listener, guard) = bind(&socket, cfg.socket_mode)?;
    let max_streams = cfg.max_concurrent_streams;
    let path = socket.clone();
    let fut = async move {
        // Dropped last, whatever the exit: removes the socket file.
        let _guard = guard;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|source| ApiError::Io {
                op: "listen on",
                path: path.clone(),
                source,
            })?;
        info!(socket = %path.display(), "API listening.");
        // tonic skips accept errors and retries at once; pause so a full
        // file table (EMFILE) does not turn into a busy loop.
        let incoming = UnixListenerStream::new(listener).then(|accepted| async move {
            if let Err(error) = &accepted {
                warn!(%error, "API accept failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            accepted
        });
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(max_streams)
            .add_service(svc.clone())
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
            .map_err(ApiError::Serve);
        svc.drained().await;
        info!("API stopped.");
        result
    }
    .instrument(info_span!("api"));
    Ok((Bound { socket }, fut))
}

/// Removes the socket file on drop, if it is still the one we bound.
struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    warn!(socket = %self.path.display(), %error, "Cannot remove the API socket.");
                }
            }
            _ => {}
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ApiError + 'a {
    move |source| ApiError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks the path, replaces a stale socket, binds and sets the mode.
fn bind(
    path: &Path,
    mode: u32,
) -> Result<(std::os::unix::net::UnixListener, SocketGuard), ApiError> {
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("/"),
    };
    if !dir.is_dir() {
        return Err(ApiError::NoSocketDir {
            path: dir.to_path_buf(),
        });
    }
    let dir_mode = std::fs::metadata(dir)
        .map_err(io("inspect", dir))?
        .permissions()
        .mode();
    // World-writable without the sticky bit: anyone could rename our socket
    // away and put a symlink in its place before the chmod below.
    if dir_mode & 0o002 != 0 && dir_mode & 0o1000 == 0 {
        return Err(ApiError::UnsafeSocketDir {
            path: dir.to_path_buf(),
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Live or stale? A stale socket refuses connections.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ApiError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                Err(_) => std::fs::remove_file(path).map_err(io("remove stale socket", path))?,
            }
        }
        Ok(_) => {
            return Err(ApiError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io("bind", path))?;
    // From here on the file is ours: the guard removes it on any error.
    let meta = std::fs::symlink_metadata(path).map_err(io("inspect", path))?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    listener
        .set_nonblocking(true)
        .map_err(io("configure", path))?;
    Ok((listener, guard))
}

#[cfg(test)]
mod tests;
