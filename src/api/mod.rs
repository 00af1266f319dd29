//! Our gRPC API (`spire_healer.v1.Supervisor`), served on a Unix socket.
//!
//! Callers are identified by the kernel's peer credentials (`SO_PEERCRED`
//! through tonic's [`UdsConnectInfo`]), never by anything they send. Each
//! RPC checks its own set of allowed uids before it reads the request, so
//! later RPCs (status, incidents, watch, approve) can allow other callers.
//!
//! This module only maps between the protobuf messages and the domain:
//! [`reports`] folds `ReportHandshakes` batches into the shared
//! [`handshake::Counter`](crate::handshake::Counter).
//!
//! The socket file is ours: [`serve`] refuses a path that exists and is not
//! a socket (a regular file is never deleted) or that a live server
//! answers on, replaces a stale socket, sets the configured mode (0600 by
//! default) and removes the socket when serving stops.

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
use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::handshake::Counter;
use crate::proto::healer::supervisor_server::{Supervisor, SupervisorServer};
use crate::proto::healer::{self as pb, ReportHandshakesRequest, ReportHandshakesResponse};
use crate::telemetry::metrics::Metrics;

mod client;
pub mod reports;
pub mod tcp;

pub use client::ReportClient;

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
    /// listed in `report_uids` connect: the uid check is what admits them.
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
}

/// `[api.authz]`: roles by SPIFFE ID, for callers over TCP with mTLS.
/// An ID must be in our trust domain; anyone else is refused.
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
        }
    }
}

/// Longest socket path: `sun_path` holds 108 bytes with the trailing NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Smallest and largest accepted `max_message_bytes`.
const MESSAGE_BYTES_RANGE: (usize, usize) = (1024, 64 * 1024 * 1024);

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `ReportHandshakes`.
    ReportHandshakes,
}

impl Method {
    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ReportHandshakes => "report_handshakes",
        }
    }
}

/// How a call ended (the `outcome` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Caller unknown or not allowed.
    Unauthenticated,
    /// The request was malformed.
    Invalid,
    /// A bound was hit (batch, stream, message size, open streams).
    ResourceExhausted,
    /// Anything else (client went away, idle timeout, shutdown).
    Error,
}

impl Outcome {
    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Invalid => "invalid",
            Outcome::ResourceExhausted => "resource_exhausted",
            Outcome::Error => "error",
        }
    }

    /// The outcome of a call that ended with `code`.
    pub fn of(code: Code) -> Self {
        match code {
            Code::Ok => Outcome::Ok,
            Code::Unauthenticated | Code::PermissionDenied => Outcome::Unauthenticated,
            Code::InvalidArgument => Outcome::Invalid,
            Code::ResourceExhausted => Outcome::ResourceExhausted,
            _ => Outcome::Error,
        }
    }
}

/// The caller's uid, from the connection's peer credentials.
///
/// # Errors
/// `UNAUTHENTICATED` when the connection carries no credentials (not a
/// Unix socket, or the kernel did not tell).
fn caller_uid<T>(req: &Request<T>) -> Result<u32, Status> {
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
        .ok_or_else(|| Status::unauthenticated("caller credentials unknown"))
}

/// Admits callers whose uid is in `allowed`.
///
/// # Errors
/// `UNAUTHENTICATED` without credentials, `PERMISSION_DENIED` for another uid.
fn authorize<T>(req: &Request<T>, method: Method, allowed: &[u32]) -> Result<u32, Status> {
    let uid = caller_uid(req)?;
    if allowed.contains(&uid) {
        Ok(uid)
    } else {
        // Debug, not warn: any local process can trigger this at will.
        debug!(uid, method = method.as_str(), "API caller not allowed.");
        Err(Status::permission_denied(format!(
            "uid {uid} may not call {}",
            method.as_str()
        )))
    }
}

// === Service ===

#[derive(Clone)]
struct Api {
    ingest: Arc<reports::Ingest>,
    report_uids: Arc<[u32]>,
    report_slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Api {
    fn count<T>(&self, method: Method, result: &Result<T, Status>) {
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics
            .api_requests_total
            .with_label_values(&[method.as_str(), Outcome::of(code).as_str()])
            .inc();
    }

    async fn report_handshakes(
        &self,
        req: Request<Streaming<ReportHandshakesRequest>>,
    ) -> Result<ReportHandshakesResponse, Status> {
        authorize(&req, Method::ReportHandshakes, &self.report_uids)?;
        let _slot = self
            .report_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many report streams open"))?;
        let totals = self.ingest.run(req.into_inner(), &self.shutdown).await?;
        Ok(ReportHandshakesResponse {
            accepted: totals.accepted,
            rejected: totals.rejected,
        })
    }
}

#[tonic::async_trait]
impl Supervisor for Api {
    async fn report_handshakes(
        &self,
        req: Request<Streaming<ReportHandshakesRequest>>,
    ) -> Result<Response<ReportHandshakesResponse>, Status> {
        let result = Api::report_handshakes(self, req).await;
        self.count(Method::ReportHandshakes, &result);
        result.map(Response::new)
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn list_incidents(
        &self,
        _req: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn get_incident(
        &self,
        _req: Request<pb::GetIncidentRequest>,
    ) -> Result<Response<pb::GetIncidentResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn list_actions(
        &self,
        _req: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn list_holds(
        &self,
        _req: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn list_approvals(
        &self,
        _req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn list_audit(
        &self,
        _req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn approve(
        &self,
        _req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn reject(
        &self,
        _req: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn pause(
        &self,
        _req: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn resume(
        &self,
        _req: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn set_dry_run(
        &self,
        _req: Request<pb::SetDryRunRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    async fn reset_demotion(
        &self,
        _req: Request<pb::ResetDemotionRequest>,
    ) -> Result<Response<pb::ResetDemotionResponse>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        _req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("SKELETON"))
    }
}

// === Serving ===

/// Where [`serve`] bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The socket path (as configured).
    pub socket: PathBuf,
}

/// Binds the socket now and returns the future that serves on it.
///
/// Binding happens before this returns, so a bad path fails startup. The
/// future serves until `shutdown` is cancelled: it then stops accepting,
/// ends open report streams with `UNAVAILABLE` (their earlier batches stay
/// counted), waits for connections to close and removes the socket file.
/// If the future is dropped instead, the socket file is removed too. It is
/// removed only while it is still the socket bound here.
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
    metrics: Arc<Metrics>,
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
    let api = Api {
        ingest: reports::Ingest::new(counter, cfg.limits(), &metrics),
        report_uids: cfg.report_uids.clone().into(),
        report_slots: Arc::new(Semaphore::new(cfg.max_concurrent_streams as usize)),
        metrics,
        shutdown: shutdown.clone(),
    };
    let svc = SupervisorServer::new(api).max_decoding_message_size(cfg.max_message_bytes);
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
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
            .map_err(ApiError::Serve);
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
