//! `handshake_probe` sensor: active mTLS handshakes to configured targets.
//!
//! Every `interval` (or at once on [`ProbeHandle::probe_now`]) the task
//! connects to the target (TCP or Unix socket) and runs a rustls client
//! handshake presenting our own X509-SVID, read from the agent's Workload
//! API ([`IdentitySource`]) afresh for every probe so rotations apply at
//! once. The peer is verified the SPIFFE way ([`SpiffeServerVerifier`]): its
//! chain must lead to the agent's trust bundle and its leaf's single URI SAN
//! must be the configured SPIFFE ID, or any ID of the configured trust
//! domain. Certificate validity is judged by the injected [`Clock`]
//! ([`ClockTime`]). One deadline, `timeout`, covers connect and handshake.
//!
//! The peer's leaf is kept even when verification fails, and every outcome
//! is classified into the closed [`Reason`] set:
//!
//! | What happened | Reason |
//! |---|---|
//! | handshake done, peer verified, no objection from the peer | `ok` |
//! | peer's chain: a certificate past notAfter | `expired` |
//! | peer's chain: a certificate before notBefore | `not_yet_valid` |
//! | peer's chain: unknown issuer, bad signature, unusable chain | `unknown_ca` |
//! | peer's chain fine, but its SPIFFE ID is wrong, missing or doubled | `bad_spiffe_id` |
//! | peer sent an empty Certificate message | `no_client_cert` |
//! | alert `unknown_ca` from the peer (it holds a stale or foreign bundle) | `unknown_ca` |
//! | alert `decrypt_error` (rustls' answer to a bad chain signature, e.g. a CA key the peer does not know) | `unknown_ca` |
//! | alert `certificate_expired` | `expired`, or `not_yet_valid` when our own leaf is not yet valid by our clock (rustls and RFC 8446 use this alert for both) |
//! | alert `certificate_required` | `no_client_cert` |
//! | alert `access_denied` (chain accepted, our ID refused) | `bad_spiffe_id` |
//! | alert `bad_certificate`, `certificate_unknown`, `unsupported_certificate`, `certificate_revoked` | `expired` / `not_yet_valid` when our own leaf is out of its validity by our clock, else `unknown_ca` |
//! | any other alert (`handshake_failure`, `protocol_version`, `decode_error`, …) | `protocol` |
//! | connect refused, socket missing (`ENOENT`), reset or EOF during the handshake, name not resolvable | `refused` |
//! | deadline passed (connect, or a peer stalling anywhere in the handshake) | `timeout` |
//! | bytes that are not TLS, no common version or cipher, any other TLS error | `protocol` |
//!
//! `bad_certificate` and `certificate_unknown` are what Go's `crypto/tls`
//! (and so go-spiffe) and BoringSSL send for most client certificates they
//! cannot verify; in a SPIFFE mesh with a valid SVID of ours that is almost
//! always a trust bundle the peer lacks, hence `unknown_ca`. The `detail` of
//! the result names the alert, so the guess stays visible.
//!
//! # TLS 1.3 and the peer's verdict on us
//!
//! In TLS 1.3 the client's handshake ends before the server has checked the
//! client certificate; a server refusing us says so in an alert right after.
//! So after a TLS 1.3 handshake the probe waits for the peer's first record
//! (a session ticket, data or an alert) for at most [`SETTLE`], within the
//! deadline. Silence is read as acceptance. `latency` stops at the end of
//! the handshake, not of that wait.
//!
//! With no SVID of our own, no probe is made and nothing is counted; the
//! view's `last` then says so in `detail` (reason `no_client_cert`, latency
//! zero, no peer) and `errors_total{stage="sensor",kind="no_identity"}`
//! rises.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::time_provider::TimeProvider;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct,
    ProtocolVersion, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::{Clock, unix_secs_f64};
use crate::endpoint::{Endpoint, EndpointError};
use crate::handshake::{Counter, MAX_TARGET_LEN, Reason, Source};
use crate::model::{PeerCert, ProbeResult, ProbeView, Reading};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::spire_api::tls::{
    Authorize, IdentitySource, SpiffeServerVerifier, TlsError, client_config_with,
    is_wrong_peer_id, uri_sans,
};
use crate::svid::{LeafInfo, leaf_info};
use crate::telemetry::Metrics;

/// Longest wait, after a TLS 1.3 handshake, for the peer's first record
/// (its verdict on our certificate); always within the probe deadline.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Read buffer per probe: one full TLS record and its header.
const READ_BUF: usize = 16 * 1024 + 256;

// === Config ===

/// One `[[probes]]` entry: a peer to handshake with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Target name: metric label, counter key and store key.
    pub name: String,
    /// `tcp://IP:port`, `host:port` or `unix:///absolute/path`.
    pub address: String,
    /// Server name (SNI) to send; default: the host of a `host:port`
    /// address, `localhost` for IP and Unix addresses. Never used for
    /// verification, which goes by SPIFFE ID.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The exact SPIFFE ID the peer must present. Exactly one of
    /// `spiffe_id` and `trust_domain` is set.
    #[serde(default)]
    pub spiffe_id: Option<SpiffeId>,
    /// Accept any SPIFFE ID of this trust domain.
    #[serde(default)]
    pub trust_domain: Option<TrustDomain>,
    /// The configured agent whose Workload API identity we present and whose
    /// bundle we trust.
    pub agent: String,
    /// The `cert_files` entry the peer serves from, if any (copied into the
    /// view so analysis can compare served and issued serials).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Time between probe starts.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Deadline of one probe, connect and handshake together.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(3)
}

impl ProbeConfig {
    /// Every problem with this entry, as (field, what is wrong). The agent
    /// name is only checked for emptiness; that it names a configured agent
    /// is for `Config::validate`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        self.check().err().unwrap_or_default()
    }

    /// The validated settings.
    ///
    /// # Errors
    /// [`InvalidProbe`] listing every problem ([`problems`](Self::problems)).
    pub fn settings(&self) -> Result<Settings, InvalidProbe> {
        self.check().map_err(|problems| InvalidProbe {
            name: self.name.clone(),
            problems,
        })
    }

    fn check(&self) -> Result<Settings, Vec<(&'static str, String)>> {
        let mut out = Vec::new();
        if self.name.is_empty() || self.name.len() > MAX_TARGET_LEN {
            out.push(("name", format!("must be 1 to {MAX_TARGET_LEN} bytes long")));
        }
        let address = ProbeAddress::parse(&self.address)
            .map_err(|e| out.push(("address", e.to_string())))
            .ok();
        let server_name = match &self.server_name {
            Some(n) => ServerName::try_from(n.clone())
                .map_err(|_| {
                    out.push((
                        "server_name",
                        format!("{n:?} is neither a DNS name nor an IP address"),
                    ));
                })
                .ok(),
            None => address
                .as_ref()
                .and_then(|a| ServerName::try_from(a.default_server_name()).ok()),
        };
        let authorize = match (&self.spiffe_id, &self.trust_domain) {
            (Some(id), None) if id.is_root() => {
                out.push((
                    "spiffe_id",
                    format!(
                        "{id} is a trust domain, not a workload ID; use trust_domain = \"{}\"",
                        id.trust_domain()
                    ),
                ));
                None
            }
            (Some(id), None) => Some(Authorize::Exact(id.clone())),
            (None, Some(td)) => Some(Authorize::TrustDomain(td.clone())),
            _ => {
                out.push((
                    "spiffe_id",
                    "set exactly one of spiffe_id and trust_domain".to_string(),
                ));
                None
            }
        };
        if self.agent.trim().is_empty() {
            out.push(("agent", "is empty".to_string()));
        }
        if self
            .cert_file
            .as_deref()
            .is_some_and(|f| f.trim().is_empty())
        {
            out.push(("cert_file", "is empty".to_string()));
        }
        if self.interval.is_zero() {
            out.push(("interval", "must be positive".to_string()));
        }
        if self.timeout.is_zero() {
            out.push(("timeout", "must be positive".to_string()));
        } else if self.timeout > self.interval && !self.interval.is_zero() {
            out.push((
                "timeout",
                format!(
                    "{} is longer than the interval ({})",
                    humantime::format_duration(self.timeout),
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        match (address, server_name, authorize) {
            (Some(address), Some(server_name), Some(authorize)) if out.is_empty() => Ok(Settings {
                name: self.name.clone(),
                address_text: self.address.clone(),
                target: Target {
                    address,
                    server_name,
                    authorize,
                    settle: SETTLE,
                },
                agent: self.agent.clone(),
                cert_file: self.cert_file.clone(),
                interval: self.interval,
                timeout: self.timeout,
            }),
            _ => {
                if out.is_empty() {
                    out.push(("server_name", "cannot be derived; set it".to_string()));
                }
                Err(out)
            }
        }
    }
}

/// A probe entry that does not validate.
#[derive(Debug, thiserror::Error)]
#[error("handshake probe {name:?} is misconfigured: {}", list(problems))]
pub struct InvalidProbe {
    /// The entry's name.
    pub name: String,
    /// (field, what is wrong), every one.
    pub problems: Vec<(&'static str, String)>,
}

impl InvalidProbe {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        "invalid_probe"
    }
}

fn list(problems: &[(&'static str, String)]) -> String {
    problems
        .iter()
        .map(|(field, why)| format!("{field}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

// === impl ProbeAddress ===

/// Where a probe connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAddress {
    /// An IP address and port (`tcp://IP:port`, or a bare `IP:port`).
    Tcp(SocketAddr),
    /// A DNS name and port, resolved on every probe.
    Host {
        /// The DNS name.
        host: String,
        port: u16,
    },
    /// A Unix domain socket (`unix:///absolute/path`).
    Unix(PathBuf),
}

/// Why a probe address is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// A `tcp://` or `unix:` URI that breaks the SPIFFE endpoint rules.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A `host:port` that is not one.
    #[error("address {address:?}: {why}; write tcp://IP:port, host:port or unix:///absolute/path")]
    HostPort {
        /// The address as given.
        address: String,
        /// What is wrong.
        why: &'static str,
    },
}

impl AddressError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Endpoint(e) => e.kind(),
            Self::HostPort { .. } => "host_port",
        }
    }
}

impl ProbeAddress {
    /// Parses `tcp://IP:port`, `unix:///abs/path` (the SPIFFE endpoint
    /// rules of [`Endpoint::parse`]), `IP:port`, `[IPv6]:port` or
    /// `host:port`.
    ///
    /// # Errors
    /// An [`AddressError`] naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let lower = s.to_ascii_lowercase();
        if s.contains("://") || lower.starts_with("unix:") || lower.starts_with("tcp:") {
            return Ok(match Endpoint::parse(s)? {
                Endpoint::Tcp(a) => Self::Tcp(a),
                Endpoint::Unix(p) => Self::Unix(p),
            });
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self::Tcp(a));
        }
        let bad = |why| AddressError::HostPort {
            address: s.to_string(),
            why,
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains([':', '[', ']']) {
            return Err(bad("an IPv6 address must be bracketed, as in [::1]:443"));
        }
        match ServerName::try_from(host) {
            Ok(ServerName::DnsName(_)) => Ok(Self::Host {
                host: host.to_string(),
                port,
            }),
            _ => Err(bad("the host is not a DNS name")),
        }
    }

    /// The server name sent when none is configured: the host of a
    /// `host:port` address, else `localhost`.
    pub fn default_server_name(&self) -> String {
        match self {
            Self::Host { host, .. } => host.clone(),
            Self::Tcp(_) | Self::Unix(_) => "localhost".to_string(),
        }
    }
}

impl fmt::Display for ProbeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Host { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

// === Settings ===

/// What one probe needs to know about its peer.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect.
    pub address: ProbeAddress,
    /// Server name (SNI) to send.
    pub server_name: ServerName<'static>,
    /// Which SPIFFE IDs the peer may present.
    pub authorize: Authorize,
    /// How long to wait after a TLS 1.3 handshake for the peer to object
    /// to our certificate ([`SETTLE`] from config; tests on a loaded
    /// machine give it longer).
    pub settle: Duration,
}

/// Validated settings of one probe ([`ProbeConfig::settings`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Target name.
    pub name: String,
    /// The address as configured, for the view.
    pub address_text: String,
    /// The peer.
    pub target: Target,
    /// The agent whose identity we present.
    pub agent: String,
    /// The `cert_files` entry the peer serves from.
    pub cert_file: Option<String>,
    /// Time between probe starts.
    pub interval: Duration,
    /// Deadline of one probe.
    pub timeout: Duration,
}

// === One probe ===

/// The injected [`Clock`] as rustls' time source, so certificate validity
/// is judged by the supervisor's clock (and tests can move it).
pub struct ClockTime(
    /// The supervisor's clock.
    pub Arc<dyn Clock>,
);

impl fmt::Debug for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClockTime")
    }
}

impl TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        self.0
            .now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(UnixTime::since_unix_epoch)
    }
}

/// Why no probe was made (nothing is counted then).
#[derive(Debug, thiserror::Error)]
pub enum NotProbed {
    /// The agent has handed out no X509-SVID or no usable bundle (yet).
    #[error("no X509-SVID of our own to present: {0}")]
    NoIdentity(&'static str),
    /// Our SVID or key cannot be used for TLS.
    #[error("our X509-SVID cannot be used for TLS")]
    BadIdentity(#[source] TlsError),
}

impl NotProbed {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoIdentity(_) => "no_identity",
            Self::BadIdentity(_) => "bad_identity",
        }
    }
}

impl From<TlsError> for NotProbed {
    fn from(e: TlsError) -> Self {
        match e {
            TlsError::NoIdentity(why) => Self::NoIdentity(why),
            e => Self::BadIdentity(e),
        }
    }
}

/// One probe of `target`: connect, handshake with the identity `identity`
/// holds right now, classify. `clock` judges certificate validity and
/// stamps the result; `timeout` bounds connect plus handshake.
///
/// # Errors
/// [`NotProbed`] when we hold no usable SVID; nothing was sent then.
///
/// # Cancel safety
/// Dropping it closes the connection; nothing else is held.
pub async fn probe_once(
    target: &Target,
    identity: &dyn IdentitySource,
    clock: &Arc<dyn Clock>,
    timeout: Duration,
) -> Result<ProbeResult, NotProbed> {
    let (chain, key, bundle) = identity.current().ok_or(NotProbed::NoIdentity(
        "the agent has handed out no X509-SVID yet",
    ))?;
    let ours = chain
        .first()
        .ok_or(NotProbed::NoIdentity("the SVID chain is empty"))
        .map(|leaf| leaf_info(leaf).ok())?;
    let verifier = Arc::new(Recorder::new(SpiffeServerVerifier::authorizing(
        &bundle,
        target.authorize.clone(),
    )?));
    let time: Arc<dyn TimeProvider> = Arc::new(ClockTime(clock.clone()));
    let cfg = client_config_with(chain, key, verifier.clone(), Some(time))?;
    let wire = handshake(target, Arc::new(cfg), timeout).await;
    let at = clock.now();
    let (reason, detail) = classify(&wire.end, ours.as_ref(), at, timeout);
    let peer = verifier.take().and_then(|der| peer_cert(&der));
    let peer_refused = matches!(wire.end, End::Tls(rustls::Error::AlertReceived(_)));
    Ok(ProbeResult {
        reason,
        at,
        latency: wire.latency,
        peer,
        detail,
        peer_refused,
    })
}

/// How the wire part of a probe ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Handshake done and the peer did not object.
    Ok,
    /// The connection could not be made.
    Connect(io::Error),
    /// The connection broke (reset, EOF) before the handshake was settled.
    Io(io::Error),
    /// rustls ended the handshake: our verifier, a peer alert, bad bytes.
    Tls(rustls::Error),
    /// The deadline passed.
    Timeout {
        /// Whether the connection was made.
        connected: bool,
    },
}

/// The wire part of a probe: how it ended and the connect plus handshake
/// time.
#[derive(Debug)]
pub(crate) struct Wire {
    pub(crate) end: End,
    pub(crate) latency: Duration,
}

#[derive(Default)]
struct Progress {
    connected: bool,
    handshaken: Option<Instant>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(address: &ProbeAddress) -> io::Result<Box<dyn Io>> {
    Ok(match address {
        ProbeAddress::Tcp(a) => Box::new(nodelay(TcpStream::connect(a).await?)),
        ProbeAddress::Host { host, port } => {
            Box::new(nodelay(TcpStream::connect((host.as_str(), *port)).await?))
        }
        ProbeAddress::Unix(p) => Box::new(UnixStream::connect(p).await?),
    })
}

fn nodelay(s: TcpStream) -> TcpStream {
    // Best effort: a handshake is a few small flights.
    let _ = s.set_nodelay(true);
    s
}

/// Connects and runs the handshake with `cfg` under one deadline.
pub(crate) async fn handshake(target: &Target, cfg: Arc<ClientConfig>, timeout: Duration) -> Wire {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut progress = Progress::default();
    let ran = timeout_at(deadline, run(&mut progress, target, cfg, deadline)).await;
    let end = match ran {
        Ok(Ok(())) => End::Ok,
        Ok(Err(end)) => end,
        // Nothing heard while settling: accepted.
        Err(_) if progress.handshaken.is_some() => End::Ok,
        Err(_) => End::Timeout {
            connected: progress.connected,
        },
    };
    let stop = progress.handshaken.unwrap_or_else(Instant::now);
    Wire {
        end,
        latency: stop.saturating_duration_since(start),
    }
}

async fn run(
    progress: &mut Progress,
    target: &Target,
    cfg: Arc<ClientConfig>,
    deadline: Instant,
) -> Result<(), End> {
    let mut io = connect(&target.address).await.map_err(End::Connect)?;
    progress.connected = true;
    let mut conn = ClientConnection::new(cfg, target.server_name.clone()).map_err(End::Tls)?;
    let mut buf = vec![0u8; READ_BUF];
    drive(&mut io, &mut conn, &mut buf).await?;
    let done = Instant::now();
    progress.handshaken = Some(done);
    if conn.protocol_version() == Some(ProtocolVersion::TLSv1_3) {
        // The peer judges our certificate only now; give it a moment to
        // object. Silence means acceptance.
        let until = deadline.min(done + target.settle);
        if let Ok(Err(end)) = timeout_at(until, read_some(&mut io, &mut conn, &mut buf)).await {
            return Err(end);
        }
    }
    conn.send_close_notify();
    let _ = flush(&mut io, &mut conn).await;
    Ok(())
}

/// Writes and reads until the handshake is done.
async fn drive(
    io: &mut Box<dyn Io>,
    conn: &mut ClientConnection,
    buf: &mut [u8],
) -> Result<(), End> {
    loop {
        flush(io, conn).await?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        read_some(io, conn, buf).await?;
    }
}

async fn flush(io: &mut Box<dyn Io>, conn: &mut ClientConnection) -> Result<(), End> {
    while conn.wants_write() {
        let mut out = Vec::new();
        conn.write_tls(&mut out).map_err(End::Io)?;
        io.write_all(&out).await.map_err(End::Io)?;
    }
    io.flush().await.map_err(End::Io)
}

/// Reads what the peer sent and hands it to rustls. On a TLS error, our
/// alert is sent (best effort) before returning it.
async fn read_some(
    io: &mut Box<dyn Io>,
    conn: &mut ClientConnection,
    buf: &mut [u8],
) -> Result<(), End> {
    let n = io.read(buf).await.map_err(End::Io)?;
    if n == 0 {
        return Err(End::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    let mut rest = &buf[..n];
    while !rest.is_empty() {
        let used = conn.read_tls(&mut rest).map_err(End::Io)?;
        if let Err(e) = conn.process_new_packets() {
            let _ = flush(io, conn).await;
            return Err(End::Tls(e));
        }
        if used == 0 {
            break;
        }
    }
    Ok(())
}

// === Classification ===

/// The reason and detail of a probe's end. `ours` is our own leaf, used
/// to tell apart what a vague alert from the peer most likely means.
fn classify(
    end: &End,
    ours: Option<&LeafInfo>,
    now: SystemTime,
    timeout: Duration,
) -> (Reason, Option<String>) {
    let limit = humantime::format_duration(timeout);
    match end {
        End::Ok => (Reason::Ok, None),
        End::Connect(e) => (io_reason(e), Some(format!("cannot connect: {e}"))),
        End::Io(e) => (
            io_reason(e),
            Some(format!("connection lost during the handshake: {e}")),
        ),
        End::Timeout { connected: false } => (
            Reason::Timeout,
            Some(format!("no connection within {limit}")),
        ),
        End::Timeout { connected: true } => (
            Reason::Timeout,
            Some(format!("no complete handshake within {limit}")),
        ),
        End::Tls(rustls::Error::AlertReceived(a)) => (
            alert_reason(*a, ours, now),
            Some(format!("the peer refused the handshake: alert {a:?}")),
        ),
        End::Tls(e) => (tls_reason(e), Some(e.to_string())),
    }
}

fn io_reason(e: &io::Error) -> Reason {
    match e.kind() {
        io::ErrorKind::TimedOut => Reason::Timeout,
        _ => Reason::Refused,
    }
}

/// A local TLS failure: our verifier's verdict on the peer, or bytes we
/// cannot accept.
pub(crate) fn tls_reason(e: &rustls::Error) -> Reason {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => Reason::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => Reason::NotYetValid,
            _ if is_wrong_peer_id(e) => Reason::BadSpiffeId,
            _ => Reason::UnknownCa,
        },
        rustls::Error::NoCertificatesPresented => Reason::NoClientCert,
        rustls::Error::AlertReceived(a) => alert_reason(*a, None, UNIX_EPOCH),
        _ => Reason::Protocol,
    }
}

/// An alert from the peer: its verdict on us (see the module table).
pub(crate) fn alert_reason(
    a: AlertDescription,
    ours: Option<&LeafInfo>,
    now: SystemTime,
) -> Reason {
    use AlertDescription as A;
    let our_validity = || {
        ours.and_then(|l| {
            if now > l.not_after {
                Some(Reason::Expired)
            } else if now < l.not_before {
                Some(Reason::NotYetValid)
            } else {
                None
            }
        })
    };
    match a {
        A::UnknownCA | A::DecryptError => Reason::UnknownCa,
        A::CertificateExpired => match our_validity() {
            Some(Reason::NotYetValid) => Reason::NotYetValid,
            _ => Reason::Expired,
        },
        A::CertificateRequired => Reason::NoClientCert,
        A::AccessDenied => Reason::BadSpiffeId,
        A::BadCertificate
        | A::CertificateUnknown
        | A::UnsupportedCertificate
        | A::CertificateRevoked => our_validity().unwrap_or(Reason::UnknownCa),
        _ => Reason::Protocol,
    }
}

fn peer_cert(der: &[u8]) -> Option<PeerCert> {
    let info = leaf_info(der).ok()?;
    let spiffe_id = match uri_sans(der)?.as_slice() {
        [only] if only.starts_with("spiffe://") => Some(only.clone()),
        _ => None,
    };
    Some(PeerCert {
        spiffe_id,
        serial: info.serial,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

// === impl Recorder ===

/// The SPIFFE verifier, keeping the peer's leaf whatever its verdict.
#[derive(Debug)]
pub(crate) struct Recorder {
    inner: SpiffeServerVerifier,
    leaf: Mutex<Option<CertificateDer<'static>>>,
}

impl Recorder {
    pub(crate) fn new(inner: SpiffeServerVerifier) -> Self {
        Self {
            inner,
            leaf: Mutex::new(None),
        }
    }

    /// The leaf the peer presented, if it got that far.
    pub(crate) fn take(&self) -> Option<CertificateDer<'static>> {
        self.leaf.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.leaf.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(end_entity.clone().into_owned());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// === The sensor ===

/// The sensor half: returns the latest published view.
pub type ProbeSensor = super::Snapshot<ProbeView>;

/// Asks the task for a probe now, e.g. to verify a remediation without
/// waiting a full interval.
pub struct ProbeHandle {
    wanted: Notify,
    requested: AtomicU64,
    done: watch::Sender<u64>,
    view: watch::Receiver<Arc<ProbeView>>,
}

impl fmt::Debug for ProbeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeHandle")
            .field("requested", &self.requested)
            .finish_non_exhaustive()
    }
}

impl ProbeHandle {
    /// Asks for a probe as soon as the current one (if any) ends. Requests
    /// made while one is pending coalesce. Returns a ticket: the probe
    /// answering it is the first to start after this call.
    pub fn probe_now(&self) -> u64 {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.wanted.notify_one();
        ticket
    }

    /// [`probe_now`](Self::probe_now), then waits until a probe started
    /// after this call is published, and returns that view.
    ///
    /// Waits forever while the task is not running: bound it with a timeout.
    ///
    /// # Cancel safety
    /// Dropping it only stops the wait; the probe still runs.
    pub async fn probe_now_and_wait(&self) -> Arc<ProbeView> {
        let mut done = self.done.subscribe();
        let ticket = self.probe_now();
        // The sender lives in `self`, so this only ends by the condition.
        let _ = done.wait_for(|d| *d >= ticket).await;
        self.view.borrow().clone()
    }
}

/// The background task half: probes every `interval` and on request.
pub struct ProbeTask {
    settings: Settings,
    identity: Arc<dyn IdentitySource>,
    counter: Counter,
    view: watch::Sender<Arc<ProbeView>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    handle: Arc<ProbeHandle>,
}

/// Builds the sensor, its task and the handle asking for immediate probes.
/// `identity` is the Workload API identity of `settings.agent` (the
/// `workload_api` sensor's `Shared`); `counter` is the shared handshake
/// outcome counter. Until the first probe `last` is `None`. `wake` is
/// notified when the reason of the last probe changes.
pub fn build(
    settings: Settings,
    identity: Arc<dyn IdentitySource>,
    counter: Counter,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (ProbeSensor, ProbeTask, Arc<ProbeHandle>) {
    let expected_id = match &settings.target.authorize {
        Authorize::Exact(id) => Some(id.as_str().to_string()),
        Authorize::TrustDomain(_) => None,
    };
    let (tx, rx) = watch::channel(Arc::new(ProbeView {
        target: settings.name.clone(),
        address: settings.address_text.clone(),
        expected_id,
        cert_file: settings.cert_file.clone(),
        last: None,
        last_peer: None,
        updated_at: clock.now(),
    }));
    let handle = Arc::new(ProbeHandle {
        wanted: Notify::new(),
        requested: AtomicU64::new(0),
        done: watch::channel(0).0,
        view: rx.clone(),
    });
    (
        super::Snapshot::new("handshake_probe", settings.name.clone(), rx, Reading::Probe),
        ProbeTask {
            settings,
            identity,
            counter,
            view: tx,
            clock,
            metrics,
            wake,
            handle: handle.clone(),
        },
        handle,
    )
}

impl ProbeTask {
    /// Probes at once, then every `interval` and whenever asked, never two
    /// at a time, until `shutdown`.
    ///
    /// # Cancel safety
    /// Holds nothing but the probe's connection; dropping it closes that.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut cadence = super::Cadence::new(self.settings.interval);
        loop {
            tokio::select! {
                biased;
                more = cadence.next(&shutdown) => if !more { return },
                () = self.handle.wanted.notified() => {}
            }
            let ticket = self.handle.requested.load(Ordering::SeqCst);
            let probe = probe_once(
                &self.settings.target,
                &*self.identity,
                &self.clock,
                self.settings.timeout,
            );
            let Some(result) = super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "handshake_probe", probe),
            )
            .await
            else {
                return;
            };
            self.apply(result);
            self.handle.done.send_if_modified(|d| {
                let newer = ticket > *d;
                if newer {
                    *d = ticket;
                }
                newer
            });
        }
    }

    /// Counts and publishes one probe's outcome.
    fn apply(&self, result: Result<ProbeResult, NotProbed>) {
        let name = self.settings.name.as_str();
        let prev = self.view.borrow().clone();
        let mut next = (*prev).clone();
        let now = self.clock.now();
        let result = match result {
            Ok(r) => {
                if let Err(refused) = self.counter.add(name, r.reason, 1, Source::Probe) {
                    self.metrics.error("sensor", refused.kind());
                }
                self.metrics.count_handshakes(Source::Probe, r.reason, 1);
                self.metrics
                    .handshake_probe_duration_seconds
                    .with_label_values(&[name])
                    .observe(r.latency.as_secs_f64());
                if let Some(peer) = &r.peer {
                    self.metrics
                        .handshake_peer_expiration_timestamp_seconds
                        .with_label_values(&[name])
                        .set(unix_secs_f64(peer.not_after));
                    next.last_peer = Some(r.clone());
                }
                r
            }
            Err(why) => {
                self.metrics.error("sensor", why.kind());
                ProbeResult {
                    reason: Reason::NoClientCert,
                    at: now,
                    latency: Duration::ZERO,
                    peer: None,
                    detail: Some(format!("not probed: {why}")),
                    peer_refused: false,
                }
            }
        };
        let changed = prev.last.as_ref().map(|r| r.reason) != Some(result.reason);
        if changed {
            if result.reason == Reason::Ok {
                info!(probe = name, agent = %self.settings.agent, "Handshake probe succeeded.");
            } else {
                warn!(
                    probe = name,
                    agent = %self.settings.agent,
                    reason = %result.reason,
                    detail = result.detail.as_deref().unwrap_or(""),
                    "Handshake probe failed."
                );
            }
        }
        next.last = Some(result);
        next.updated_at = now;
        self.view.send_replace(Arc::new(next));
        if changed {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
