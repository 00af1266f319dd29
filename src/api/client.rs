//! Clients for our API: [`SupervisorClient`] (every RPC, on the Unix
//! socket or over TCP with mTLS: the operator CLI, tests) and
//! [`ReportClient`] (handshake reports on the socket: reporters written in
//! Rust, the benchmark).
//!
//! Over TCP we authenticate with our own X509-SVID (from the Workload API
//! or PEM files) and verify the server's the SPIFFE way: its chain must
//! lead to our trust bundle and its leaf must carry exactly one SPIFFE ID,
//! the expected one or, by default, any in our trust domain. DNS names are
//! ignored.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tonic::Status;
use tonic::transport::{Channel, Uri};

use super::ApiError;
use super::tcp::{IdentityError, fetch_once};
use crate::endpoint::Endpoint;
use crate::proto::healer::supervisor_client::SupervisorClient as Generated;
use crate::proto::healer::{ReportHandshakesRequest, ReportHandshakesResponse};
use crate::spiffe_id::SpiffeId;
use crate::spire_api::tls::{
    Authorize, IdentitySource, RawIdentity, SpiffeServerVerifier, client_config_with,
    is_wrong_peer_id,
};

/// How long one dial of the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest PEM file read for `--svid`, `--svid-key`, `--bundle`.
const MAX_PEM_BYTES: usize = 1024 * 1024;

// === Addresses ===

/// Where the API listens, as a client names it: `unix:///path` or
/// `tcp://host:port` (a host name, an IPv4 address or a bracketed IPv6
/// address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    /// The Unix socket at this absolute path.
    Unix(PathBuf),
    /// A TCP listener with mTLS.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
}

impl ApiAddr {
    /// Parses an address.
    ///
    /// # Errors
    /// [`ClientError::BadAddr`] naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadAddr {
            addr: s.to_string(),
            reason,
        };
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("write unix:///absolute/path or tcp://host:port".into()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "unix" => match Endpoint::parse(s) {
                Ok(Endpoint::Unix(path)) => Ok(Self::Unix(path)),
                Ok(Endpoint::Tcp(_)) => Err(bad("not a unix address".into())),
                Err(e) => Err(bad(e.to_string())),
            },
            "tcp" => {
                let authority = rest
                    .strip_prefix("//")
                    .ok_or_else(|| bad("write tcp://host:port".into()))?;
                if authority.contains(['/', '?', '#', '@']) {
                    return Err(bad(
                        "a tcp address is host:port only (no path, query or user)".into(),
                    ));
                }
                let (host, port) = authority
                    .rsplit_once(':')
                    .ok_or_else(|| bad("the port is missing".into()))?;
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("port {port:?} is not 1 to 65535")))?;
                let host = match host.strip_prefix('[') {
                    Some(v6) => {
                        let v6 = v6
                            .strip_suffix(']')
                            .ok_or_else(|| bad("an IPv6 address needs its closing ']'".into()))?;
                        v6.parse::<std::net::Ipv6Addr>()
                            .map_err(|_| bad(format!("{v6:?} is not an IPv6 address")))?;
                        v6.to_string()
                    }
                    None if host.contains(':') => {
                        return Err(bad(
                            "put an IPv6 address in brackets: tcp://[::1]:port".into()
                        ));
                    }
                    None => host.to_string(),
                };
                if host.is_empty() {
                    return Err(bad("the host is missing".into()));
                }
                Ok(Self::Tcp { host, port })
            }
            other => Err(bad(format!(
                "scheme {other:?} is not supported; write unix:///absolute/path or tcp://host:port"
            ))),
        }
    }
}

impl fmt::Display for ApiAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

impl std::str::FromStr for ApiAddr {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// === Identity ===

/// Our own X509-SVID for mTLS.
#[derive(Clone)]
pub enum ClientIdentity {
    /// Fetched once from the Workload API at `endpoint`: the SVID of
    /// `spiffe_id`, or the first valid one.
    WorkloadApi {
        /// The Workload API.
        endpoint: Endpoint,
        /// Which SVID.
        spiffe_id: Option<SpiffeId>,
    },
    /// PEM files: the chain (leaf first), its PKCS#8 key, the trust bundle.
    Files {
        /// Certificate chain.
        svid: PathBuf,
        /// Private key (`PRIVATE KEY`, PKCS#8).
        key: PathBuf,
        /// Trust bundle.
        bundle: PathBuf,
    },
    /// Whatever `source` holds when connecting (tests, tools).
    Source(Arc<dyn IdentitySource>),
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WorkloadApi {
                endpoint,
                spiffe_id,
            } => f
                .debug_struct("WorkloadApi")
                .field("endpoint", endpoint)
                .field("spiffe_id", spiffe_id)
                .finish(),
            Self::Files { svid, key, bundle } => f
                .debug_struct("Files")
                .field("svid", svid)
                .field("key", key)
                .field("bundle", bundle)
                .finish(),
            Self::Source(_) => f.write_str("Source"),
        }
    }
}

impl ClientIdentity {
    /// The identity now.
    ///
    /// # Errors
    /// [`ClientError::Identity`] from the Workload API,
    /// [`ClientError::File`] for an unreadable or malformed file,
    /// [`ClientError::NoIdentity`] for an empty source.
    pub async fn load(&self, timeout: Duration) -> Result<RawIdentity, ClientError> {
        match self {
            Self::WorkloadApi {
                endpoint,
                spiffe_id,
            } => fetch_once(endpoint, spiffe_id.as_ref(), timeout)
                .await
                .map_err(ClientError::Identity),
            Self::Files { svid, key, bundle } => {
                let chain = read_certs(svid)?;
                let bundle = read_certs(bundle)?;
                let key = read_key(key)?;
                Ok((chain, key, bundle))
            }
            Self::Source(source) => source.current().ok_or(ClientError::NoIdentity),
        }
    }
}

fn file_error(path: &Path, reason: impl Into<String>) -> ClientError {
    ClientError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, ClientError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    crate::svid::pem::parse_certificates(&bytes, MAX_PEM_BYTES)
        .map_err(|e| file_error(path, e.to_string()))
}

fn read_key(path: &Path) -> Result<Vec<u8>, ClientError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(PrivateKeyDer::Pkcs8(k)) => Ok(k.secret_pkcs8_der().to_vec()),
        Ok(_) => Err(file_error(
            path,
            "the key is not PKCS#8 (`PRIVATE KEY`); convert it with `openssl pkcs8 -topk8 -nocrypt`",
        )),
        Err(e) => Err(file_error(path, format!("no private key in it ({e})"))),
    }
}

/// How to authenticate over TCP.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Our SVID.
    pub identity: ClientIdentity,
    /// The SPIFFE ID the server must present; `None`: any ID in our trust
    /// domain.
    pub server_id: Option<SpiffeId>,
}

// === Errors ===

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address does not parse.
    #[error("API address {addr:?}: {reason}")]
    BadAddr {
        /// As given.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// A TCP address without TLS settings.
    #[error(
        "{addr} needs an identity: pass --workload-api (or set SPIFFE_ENDPOINT_SOCKET), or --svid, --svid-key and --bundle"
    )]
    NoTls {
        /// The address.
        addr: String,
    },
    /// The Workload API gave us no usable SVID.
    #[error(transparent)]
    Identity(IdentityError),
    /// An identity file cannot be used.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The identity source holds nothing.
    #[error("no X509-SVID to authenticate with")]
    NoIdentity,
    /// Our SVID cannot be used for TLS, or its bundle has no CA.
    #[error("our X509-SVID cannot be used for TLS: {reason}")]
    BadIdentity {
        /// Why.
        reason: String,
    },
    /// The host name does not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// The address.
        addr: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// Nothing answers (no socket, connection refused, timeout).
    #[error("cannot connect to {addr}: {source}")]
    Unreachable {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket exists but we may not connect to it.
    #[error("cannot connect to {addr}: {source} (the socket's mode or owner keeps this user out)")]
    Forbidden {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server refused our certificate during the handshake.
    #[error("the server at {addr} refused our X509-SVID: {reason}")]
    Refused {
        /// The address.
        addr: String,
        /// The TLS alert or error.
        reason: String,
    },
    /// The server's certificate did not verify against our bundle, or
    /// names someone else.
    #[error("the server at {addr} is not trusted: {reason}")]
    Untrusted {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS or HTTP/2 handshake failed otherwise.
    #[error("cannot talk to {addr}: {reason}")]
    Handshake {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

impl ClientError {
    /// Closed-set label: `usage` (a bad argument or file), `unreachable`,
    /// `unauthenticated` (no identity for us, refused by the server, or a
    /// server we do not trust), `error`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadAddr { .. } | Self::NoTls { .. } | Self::File { .. } => "usage",
            Self::Identity(e) if e.is_refusal() => "unauthenticated",
            Self::Identity(IdentityError::Endpoint { .. }) => "usage",
            Self::Identity(_) | Self::Resolve { .. } | Self::Unreachable { .. } => "unreachable",
            Self::NoIdentity
            | Self::BadIdentity { .. }
            | Self::Forbidden { .. }
            | Self::Refused { .. }
            | Self::Untrusted { .. } => "unauthenticated",
            Self::Handshake { .. } => "error",
        }
    }
}

/// Why the last dial failed, kept by the connector: tonic's own error
/// only says that the connector failed.
type LastFailure = Arc<Mutex<Option<ClientError>>>;

fn record(slot: &LastFailure, e: ClientError) -> io::Error {
    let text = e.to_string();
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    io::Error::other(text)
}

/// Sorts an I/O error from dialling.
fn dial_error(addr: &str, source: io::Error) -> ClientError {
    match source.kind() {
        io::ErrorKind::PermissionDenied => ClientError::Forbidden {
            addr: addr.to_string(),
            source,
        },
        _ => ClientError::Unreachable {
            addr: addr.to_string(),
            source,
        },
    }
}

/// Sorts a failed TLS handshake.
fn tls_error(addr: &str, e: io::Error) -> ClientError {
    let addr = addr.to_string();
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return ClientError::Handshake {
            addr,
            reason: format!("the connection broke during the TLS handshake: {e}"),
        };
    };
    match tls {
        rustls::Error::AlertReceived(alert) => ClientError::Refused {
            addr,
            reason: format!("TLS alert {alert:?}"),
        },
        rustls::Error::InvalidCertificate(_) if is_wrong_peer_id(tls) => ClientError::Untrusted {
            addr,
            reason: tls.to_string(),
        },
        rustls::Error::InvalidCertificate(c) => ClientError::Untrusted {
            addr,
            reason: format!("its certificate does not verify against our trust bundle: {c:?}"),
        },
        other => ClientError::Handshake {
            addr,
            reason: other.to_string(),
        },
    }
}

// === impl SupervisorClient ===

/// A `Supervisor` client connected to one address. Cheap to clone; clones
/// share the connection, which multiplexes concurrent calls.
#[derive(Debug, Clone)]
pub struct SupervisorClient {
    inner: Generated<Channel>,
    addr: ApiAddr,
}

impl SupervisorClient {
    /// Connects now: over the Unix socket, or over TCP with mTLS using
    /// `tls` (required for TCP, ignored for Unix). `timeout` bounds each
    /// step (identity, dial plus handshake).
    ///
    /// # Errors
    /// [`ClientError`], naming the address and the cause.
    pub async fn connect(
        addr: &ApiAddr,
        tls: Option<&TlsSettings>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let name = addr.to_string();
        let last: LastFailure = Arc::default();
        let connected = match addr {
            ApiAddr::Unix(path) => {
                let path = path.clone();
                let (slot, name) = (last.clone(), name.clone());
                let connector = tower::service_fn(move |_: Uri| {
                    let (path, slot, name) = (path.clone(), slot.clone(), name.clone());
                    async move {
                        UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                            .map_err(|e| record(&slot, dial_error(&name, e)))
                    }
                });
                tonic::transport::Endpoint::from_static("http://localhost")
                    .connect_timeout(timeout)
                    .connect_with_connector(connector)
                    .await
            }
            ApiAddr::Tcp { host, port } => {
                let tls = tls.ok_or_else(|| ClientError::NoTls { addr: name.clone() })?;
                let cfg = Arc::new(tls_config(tls, timeout).await?);
                let targets: Vec<SocketAddr> =
                    tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), *port)))
                        .await
                        .unwrap_or_else(|_| Err(io::Error::from(io::ErrorKind::TimedOut)))
                        .map_err(|source| ClientError::Resolve {
                            addr: name.clone(),
                            source,
                        })?
                        .collect();
                let server_name = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => {
                        ServerName::try_from(host.clone()).map_err(|_| ClientError::BadAddr {
                            addr: name.clone(),
                            reason: format!("{host:?} is not a valid host name"),
                        })?
                    }
                };
                let (slot, n) = (last.clone(), name.clone());
                let connector = tower::service_fn(move |_: Uri| {
                    let (cfg, targets, server_name, slot, name) = (
                        cfg.clone(),
                        targets.clone(),
                        server_name.clone(),
                        slot.clone(),
                        n.clone(),
                    );
                    async move {
                        dial_tls(&targets, cfg, server_name, &name)
                            .await
                            .map(TokioIo::new)
                            .map_err(|e| record(&slot, e))
                    }
                });
                let uri = format!("http://{}", authority(host, *port));
                tonic::transport::Endpoint::from_shared(uri)
                    .map_err(|e| ClientError::BadAddr {
                        addr: name.clone(),
                        reason: e.to_string(),
                    })?
                    .connect_timeout(timeout)
                    .connect_with_connector(connector)
                    .await
            }
        };
        let channel = connected.map_err(|e| {
            last.lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| ClientError::Unreachable {
                    addr: name.clone(),
                    source: io::Error::other(e),
                })
        })?;
        Ok(Self {
            inner: Generated::new(channel),
            addr: addr.clone(),
        })
    }

    /// The generated client, for any RPC (a clone sharing the connection).
    pub fn rpc(&self) -> Generated<Channel> {
        self.inner.clone()
    }

    /// Where it is connected.
    pub fn addr(&self) -> &ApiAddr {
        &self.addr
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The rustls configuration for `tls`: our SVID, the server verified
/// against our bundle and the expected ID (or our trust domain).
async fn tls_config(tls: &TlsSettings, timeout: Duration) -> Result<ClientConfig, ClientError> {
    let (chain, key, bundle) = tls.identity.load(timeout).await?;
    let expected = match &tls.server_id {
        Some(id) => Authorize::Exact(id.clone()),
        None => chain
            .first()
            .and_then(|leaf| Authorize::trust_domain_of(leaf))
            .ok_or_else(|| ClientError::BadIdentity {
                reason: "our X509-SVID carries no SPIFFE ID".into(),
            })?,
    };
    let verifier = SpiffeServerVerifier::authorizing(&bundle, expected).map_err(|e| {
        ClientError::BadIdentity {
            reason: e.to_string(),
        }
    })?;
    let mut cfg = client_config_with(chain, key, Arc::new(verifier), None).map_err(|e| {
        ClientError::BadIdentity {
            reason: std::error::Error::source(&e)
                .map_or_else(|| e.to_string(), ToString::to_string),
        }
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Dials each resolved address in turn; the first TLS connection wins.
///
/// With TLS 1.3 the client's side of the handshake ends before the server
/// has judged our certificate: a refusal arrives as an alert on the first
/// read. So the server's first bytes (its HTTP/2 SETTINGS, sent at once)
/// are read here, and a refusal is this dial's error rather than a vague
/// failure of the first call.
async fn dial_tls(
    targets: &[SocketAddr],
    cfg: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    name: &str,
) -> Result<Primed, ClientError> {
    let mut last = None;
    for target in targets {
        match TcpStream::connect(target).await {
            Ok(tcp) => {
                // Best effort: small RPCs should not wait for Nagle.
                let _ = tcp.set_nodelay(true);
                let mut io = TlsConnector::from(cfg.clone())
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| tls_error(name, e))?;
                let mut first = vec![0; 1024];
                let n = io.read(&mut first).await.map_err(|e| tls_error(name, e))?;
                if n == 0 {
                    return Err(ClientError::Handshake {
                        addr: name.to_string(),
                        reason: "the server closed the connection after the TLS handshake".into(),
                    });
                }
                first.truncate(n);
                return Ok(Primed { first, at: 0, io });
            }
            Err(e) => last = Some(dial_error(name, e)),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Unreachable {
        addr: name.to_string(),
        source: io::Error::new(io::ErrorKind::NotFound, "the host resolves to no address"),
    }))
}

/// A TLS stream whose first bytes from the server were read at connect
/// time; they are handed out before anything else.
struct Primed {
    first: Vec<u8>,
    at: usize,
    io: tokio_rustls::client::TlsStream<TcpStream>,
}

impl AsyncRead for Primed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.first.len() {
            let n = buf.remaining().min(this.first.len() - this.at);
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Primed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// === impl ReportClient ===

/// A `Supervisor` client on a Unix socket, for handshake reports. Cheap to
/// clone; clones share one connection, which multiplexes concurrent
/// streams.
#[derive(Debug, Clone)]
pub struct ReportClient {
    inner: Generated<Channel>,
}

impl ReportClient {
    /// A client for the API socket at `path`. Nothing is dialled until the
    /// first call; a failed dial is that call's error.
    ///
    /// # Errors
    /// [`ApiError::Channel`] if tonic rejects the endpoint.
    ///
    /// # Panics
    /// Outside a tokio runtime (tonic spawns the channel's worker task).
    pub fn connect_unix(path: impl Into<PathBuf>) -> Result<Self, ApiError> {
        let channel = Endpoint::Unix(path.into())
            .channel(CONNECT_TIMEOUT)
            .map_err(ApiError::Channel)?;
        Ok(Self {
            inner: Generated::new(channel),
        })
    }

    /// Sends `batches` as one `ReportHandshakes` stream and returns the
    /// server's totals once the stream ends.
    ///
    /// # Errors
    /// The server's status (see the RPC's documentation in
    /// `proto/spire_healer/v1/healer.proto`) or a transport failure.
    pub async fn report(
        &self,
        batches: impl Stream<Item = ReportHandshakesRequest> + Send + 'static,
    ) -> Result<ReportHandshakesResponse, Status> {
        let mut client = self.inner.clone();
        client
            .report_handshakes(batches)
            .await
            .map(tonic::Response::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_why() {
        assert_eq!(
            ApiAddr::parse("unix:///run/spire-healer/api.sock").expect("unix"),
            ApiAddr::Unix(PathBuf::from("/run/spire-healer/api.sock"))
        );
        assert_eq!(
            ApiAddr::parse("tcp://healer.internal:8443").expect("host"),
            ApiAddr::Tcp {
                host: "healer.internal".into(),
                port: 8443
            }
        );
        let v6 = ApiAddr::parse("tcp://[::1]:9").expect("v6");
        assert_eq!(
            v6,
            ApiAddr::Tcp {
                host: "::1".into(),
                port: 9
            }
        );
        assert_eq!(v6.to_string(), "tcp://[::1]:9");
        assert_eq!(
            ApiAddr::parse("tcp://10.0.0.1:1").expect("v4").to_string(),
            "tcp://10.0.0.1:1"
        );
        for (bad, why) in [
            ("/run/api.sock", "unix:///absolute/path"),
            ("http://x:1", "not supported"),
            ("unix://relative/api.sock", "authority"),
            ("tcp://host", "port is missing"),
            ("tcp://host:0", "1 to 65535"),
            ("tcp://host:99999", "1 to 65535"),
            ("tcp://:80", "host is missing"),
            ("tcp://::1:80", "brackets"),
            ("tcp://[::1:80", "closing"),
            ("tcp://h:1/path", "host:port only"),
            ("tcp:h:1", "tcp://host:port"),
        ] {
            let e = ApiAddr::parse(bad).expect_err(bad);
            assert_eq!(e.kind(), "usage", "{bad}");
            let text = e.to_string();
            assert!(text.contains(why) && text.contains(bad), "{bad}: {text}");
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_and_named() {
        let dir = tempfile::tempdir().expect("dir");
        let addr = ApiAddr::Unix(dir.path().join("absent.sock"));
        let e = SupervisorClient::connect(&addr, None, Duration::from_secs(1))
            .await
            .expect_err("no socket");
        assert_eq!(e.kind(), "unreachable", "{e}");
        assert!(e.to_string().contains("absent.sock"), "{e}");
    }

    #[tokio::test]
    async fn tcp_needs_an_identity() {
        let addr = ApiAddr::parse("tcp://127.0.0.1:9").expect("addr");
        let e = SupervisorClient::connect(&addr, None, Duration::from_secs(1))
            .await
            .expect_err("no tls");
        assert_eq!(e.kind(), "usage");
        assert!(e.to_string().contains("tcp://127.0.0.1:9"), "{e}");
    }

    #[test]
    fn key_files_must_be_pkcs8() {
        let dir = tempfile::tempdir().expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let pkcs8 = dir.path().join("key.pem");
        std::fs::write(
            &pkcs8,
            crate::svid::pem::encode("PRIVATE KEY", &key.serialize_der()),
        )
        .expect("write");
        assert_eq!(read_key(&pkcs8).expect("pkcs8"), key.serialize_der());
        let sec1 = dir.path().join("ec.pem");
        std::fs::write(
            &sec1,
            crate::svid::pem::encode("EC PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x01]),
        )
        .expect("write");
        let e = read_key(&sec1).expect_err("sec1");
        assert!(
            e.to_string().contains("PKCS#8") && e.to_string().contains("ec.pem"),
            "{e}"
        );
        let e = read_certs(&dir.path().join("absent.pem")).expect_err("absent");
        assert_eq!(e.kind(), "usage");
        assert!(e.to_string().contains("absent.pem"), "{e}");
    }
}
