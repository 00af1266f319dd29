//! `spire-lab peer`: a mutual-TLS server that loads its X509-SVID
//! files (`svid.pem`, `svid_key.pem`, `bundle.pem`, as written by
//! [`super::svid_files`] or spiffe-helper) **once**, at start: the workload
//! that keeps serving an old certificate after SPIRE rotated it
//! (served-versus-issued drift).
//!
//! Each connection gets the TLS handshake, one line (the serial of the
//! certificate being served, lower-case hex as [`spire_healer::svid::LeafInfo`]
//! prints it) and a close. Clients must present an X509-SVID that chains to
//! the loaded bundle and names exactly one SPIFFE ID of the server's trust
//! domain. Only the `ring` provider is used.
//!
//! On SIGHUP, [`OnHup::Ignore`] (the default) logs and keeps serving what it
//! loaded, so only a restart heals it; [`OnHup::Reload`] re-reads the files
//! and serves the new certificate to new connections (a failed reload keeps
//! the old one). SIGTERM and SIGINT stop it cleanly.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::svid_files::{SvidFilesError, read_svid_files, write_atomic};
use spire_healer::endpoint::{Endpoint, EndpointError};
use spire_healer::sensors::server_api::error_chain;
use spire_healer::spiffe_id::SpiffeId;
use spire_healer::spire_api::tls::{self, RawIdentity, TlsError};
use spire_healer::svid::{self, SvidError};

/// Bound of one connection: handshake, answer, close.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping waits for connections in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What SIGHUP does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnHup {
    /// Log it and keep serving the certificate loaded at start.
    Ignore,
    /// Re-read the files and serve the new certificate.
    Reload,
}

/// `spire-lab peer`.
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// Directory holding svid.pem, svid_key.pem and bundle.pem.
    #[arg(long)]
    pub dir: PathBuf,
    /// Where to listen: `127.0.0.1:0` (any free port), `tcp://IP:port` or
    /// `unix:///path`.
    #[arg(long)]
    pub listen: String,
    /// Once listening, write the bound address here (`tcp://IP:port` or
    /// `unix:///path`).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Once listening, write this process's pid here.
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
    /// What SIGHUP does.
    #[arg(long, value_enum, default_value_t = OnHup::Ignore)]
    pub on_hup: OnHup,
}

// === Errors ===

/// Why the peer cannot serve, or a client could not ask it.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The SVID files are missing or unreadable.
    #[error("cannot load the SVID files")]
    Files(#[from] SvidFilesError),
    /// The files hold no valid X509-SVID.
    #[error("the SVID files in {} are not a valid X509-SVID", dir.display())]
    Invalid {
        /// The directory.
        dir: PathBuf,
        /// The first broken rule.
        #[source]
        source: SvidError,
    },
    /// rustls refused the chain, key or bundle (e.g. a key of another
    /// certificate).
    #[error("the SVID files cannot be used for TLS")]
    Tls(#[source] rustls::Error),
    /// The bundle holds no usable trust anchor.
    #[error("the trust bundle cannot verify clients")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The listen or peer address is unusable.
    #[error("invalid address")]
    Address(#[from] EndpointError),
    /// Binding or accepting failed, or the client could not connect.
    #[error("{what} {addr}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The address.
        addr: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The client's identity cannot be used.
    #[error("client identity")]
    ClientIdentity(#[source] TlsError),
    /// The peer closed without a serial line.
    #[error("the peer at {0} closed without answering")]
    NoAnswer(String),
    /// The exchange took too long.
    #[error("the peer at {addr} did not answer within {limit:?}")]
    Timeout {
        /// The address.
        addr: String,
        /// The bound.
        limit: Duration,
    },
}

impl PeerError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Files(_) => "files",
            Self::Invalid { .. } => "invalid",
            Self::Tls(_) => "tls",
            Self::Verifier(_) => "verifier",
            Self::Address(_) => "address",
            Self::Io { .. } => "io",
            Self::ClientIdentity(_) => "client_identity",
            Self::NoAnswer(_) => "no_answer",
            Self::Timeout { .. } => "timeout",
        }
    }

    fn io(what: &'static str, addr: &impl fmt::Display) -> impl FnOnce(std::io::Error) -> Self {
        let addr = addr.to_string();
        move |source| Self::Io { what, addr, source }
    }
}

/// The verifier's error for a client outside our trust domain.
#[derive(Debug, thiserror::Error)]
#[error("the client certificate names {found:?}, expected exactly one SPIFFE ID: {expected}")]
struct ForeignClient {
    expected: String,
    found: Vec<String>,
}

// === impl SpiffeClientVerifier ===

/// Verifies client certificates with webpki against the bundle, then
/// requires exactly one URI SAN: a SPIFFE ID of `trust_domain`.
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// Any SPIFFE ID of the server's own trust domain.
    authorize: tls::Authorize,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("authorize", &self.authorize)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let found = tls::uri_sans(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if self.authorize.admits(&found) {
            return Ok(ClientCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(ForeignClient {
                expected: self.authorize.to_string(),
                found,
            })),
        )))
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

// === Loading ===

/// What is being served: the certificate's serial and SPIFFE ID, and the
/// TLS acceptor presenting it.
struct Served {
    serial: String,
    spiffe_id: String,
    acceptor: TlsAcceptor,
}

/// Reads and checks the files of `dir` and builds the TLS server config.
fn load(dir: &Path) -> Result<Served, PeerError> {
    let (chain, key, bundle) = read_svid_files(dir)?;
    let invalid = |source| PeerError::Invalid {
        dir: dir.to_path_buf(),
        source,
    };
    let leaf = chain
        .first()
        .map(|der| svid::leaf_info(der))
        .transpose()
        .map_err(invalid)?
        .ok_or_else(|| invalid(SvidError::EmptyChain))?;
    let insp = svid::inspect(&leaf.spiffe_id, &chain.concat(), &bundle.concat());
    if let Some(problem) = insp.problem {
        return Err(invalid(problem));
    }
    let authorize = SpiffeId::parse(&leaf.spiffe_id)
        .map(|id| tls::Authorize::TrustDomain(id.trust_domain().clone()))
        .map_err(|source| {
            invalid(SvidError::InvalidSpiffeId {
                uri: leaf.spiffe_id.clone(),
                source,
            })
        })?;

    let provider = Arc::new(tls::provider());
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(bundle.into_iter().map(CertificateDer::from));
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(PeerError::Verifier)?;
    let verifier = Arc::new(SpiffeClientVerifier { inner, authorize });
    let certs = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(PeerError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(PeerError::Tls)?;
    Ok(Served {
        serial: leaf.serial,
        spiffe_id: leaf.spiffe_id,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    })
}

/// Parses `--listen`: a bare `IP:port` means `tcp://IP:port`.
///
/// # Errors
/// [`EndpointError`] from [`Endpoint::parse`].
pub fn parse_listen(s: &str) -> Result<Endpoint, EndpointError> {
    if s.contains("://") {
        Endpoint::parse(s)
    } else {
        Endpoint::parse(&format!("tcp://{s}"))
    }
}

// === impl Peer ===

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// What [`Peer::hangup`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hangup {
    /// Nothing: still serving this serial.
    Ignored {
        /// The serial still served.
        serial: String,
    },
    /// Re-read the files: now serving this serial.
    Reloaded {
        /// The serial served from now on.
        serial: String,
    },
}

/// A bound peer (see the module docs).
pub struct Peer {
    dir: PathBuf,
    on_hup: OnHup,
    served: watch::Sender<Arc<Served>>,
    listener: Listener,
    local: Endpoint,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("dir", &self.dir)
            .field("on_hup", &self.on_hup)
            .field("local", &self.local)
            .field("serial", &self.serial())
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Loads the files of `dir` and binds `listen` (a stale Unix socket file
    /// is replaced). Nothing is served until [`Peer::serve`].
    ///
    /// # Errors
    /// Missing or invalid files (checked first), or the bind fails.
    pub async fn bind(dir: &Path, listen: &Endpoint, on_hup: OnHup) -> Result<Peer, PeerError> {
        let served = load(dir)?;
        let (listener, local) = match listen {
            Endpoint::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(PeerError::io("binding", addr))?;
                let bound = l
                    .local_addr()
                    .map_err(PeerError::io("reading the address of", addr))?;
                (Listener::Tcp(l), Endpoint::Tcp(bound))
            }
            Endpoint::Unix(path) => {
                let shown = listen.to_string();
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(PeerError::io("binding", &shown))?;
                (Listener::Unix(l), listen.clone())
            }
        };
        Ok(Peer {
            dir: dir.to_path_buf(),
            on_hup,
            served: watch::Sender::new(Arc::new(served)),
            listener,
            local,
        })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local
    }

    /// Serial of the certificate served to new connections.
    pub fn serial(&self) -> String {
        self.served.borrow().serial.clone()
    }

    /// SPIFFE ID of the certificate served.
    pub fn spiffe_id(&self) -> String {
        self.served.borrow().spiffe_id.clone()
    }

    /// Applies the SIGHUP policy.
    ///
    /// # Errors
    /// With [`OnHup::Reload`], the files cannot be loaded; the old
    /// certificate stays in service.
    pub fn hangup(&self) -> Result<Hangup, PeerError> {
        match self.on_hup {
            OnHup::Ignore => Ok(Hangup::Ignored {
                serial: self.serial(),
            }),
            OnHup::Reload => {
                let fresh = load(&self.dir)?;
                let serial = fresh.serial.clone();
                self.served.send_replace(Arc::new(fresh));
                Ok(Hangup::Reloaded { serial })
            }
        }
    }

    /// Accepts and answers connections until `shutdown`, then waits up to
    /// two seconds for connections in flight. Accept errors (e.g. out of
    /// file descriptors) are logged and retried after a pause.
    ///
    /// # Cancel safety
    /// Dropping it stops accepting; answers in flight are dropped with it.
    pub async fn serve(&self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                a = self.accept() => a,
            };
            match accepted {
                Ok(conn) => {
                    let served = self.served.borrow().clone();
                    tasks.spawn(conn.answer(served));
                }
                Err(e) => {
                    warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tasks.close();
        let _ = timeout(DRAIN_TIMEOUT, tasks.wait()).await;
    }

    async fn accept(&self) -> std::io::Result<Conn> {
        match &self.listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    async fn answer(self, served: Arc<Served>) {
        let result = match self {
            Conn::Tcp(s) => timeout(CONNECTION_TIMEOUT, answer_on(s, &served)).await,
            Conn::Unix(s) => timeout(CONNECTION_TIMEOUT, answer_on(s, &served)).await,
        };
        match result {
            Ok(Ok(())) => debug!(serial = %served.serial, "Answered."),
            Ok(Err(error)) => debug!(%error, "Connection failed."),
            Err(_) => debug!("Connection timed out."),
        }
    }
}

async fn answer_on<S>(stream: S, served: &Served) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tls = served.acceptor.accept(stream).await?;
    tls.write_all(format!("{}\n", served.serial).as_bytes())
        .await?;
    tls.shutdown().await
}

// === Client ===

/// What a peer answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAnswer {
    /// The serial line it sent.
    pub serial: String,
    /// The serial of the certificate it presented in the handshake.
    pub certificate_serial: String,
}

/// Connects to a peer at `endpoint` with `identity` as client certificate,
/// verifies the peer against the identity's bundle and `server_id`, and
/// returns its answer; the whole exchange is bounded by `limit`.
///
/// # Errors
/// [`PeerError::ClientIdentity`], [`PeerError::Io`] (connect or handshake
/// refused, e.g. our certificate rejected), [`PeerError::NoAnswer`],
/// [`PeerError::Timeout`].
pub async fn ask_serial(
    endpoint: &Endpoint,
    identity: RawIdentity,
    server_id: &SpiffeId,
    limit: Duration,
) -> Result<PeerAnswer, PeerError> {
    let mut config =
        tls::client_config(identity, Some(server_id)).map_err(PeerError::ClientIdentity)?;
    config.alpn_protocols.clear();
    let connector = TlsConnector::from(Arc::new(config));
    let addr = endpoint.to_string();
    let exchange = async {
        match endpoint {
            Endpoint::Tcp(a) => {
                let tcp = TcpStream::connect(a)
                    .await
                    .map_err(PeerError::io("connecting to", &addr))?;
                ask_on(&connector, ServerName::IpAddress(a.ip().into()), tcp, &addr).await
            }
            Endpoint::Unix(p) => {
                let unix = UnixStream::connect(p)
                    .await
                    .map_err(PeerError::io("connecting to", &addr))?;
                let name = ServerName::try_from("localhost")
                    .map_err(|e| PeerError::io("naming", &addr)(std::io::Error::other(e)))?;
                ask_on(&connector, name, unix, &addr).await
            }
        }
    };
    timeout(limit, exchange)
        .await
        .map_err(|_| PeerError::Timeout {
            addr: addr.clone(),
            limit,
        })?
}

async fn ask_on<S>(
    connector: &TlsConnector,
    name: ServerName<'static>,
    stream: S,
    addr: &str,
) -> Result<PeerAnswer, PeerError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tls = connector
        .connect(name, stream)
        .await
        .map_err(PeerError::io("TLS handshake with", &addr))?;
    let certificate_serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| svid::leaf_info(leaf).ok())
        .map(|l| l.serial)
        .unwrap_or_default();
    let mut text = String::new();
    // With TLS 1.3 a refused client certificate surfaces here, as an alert.
    tls.read_to_string(&mut text)
        .await
        .map_err(PeerError::io("reading from", &addr))?;
    let serial = text.lines().next().unwrap_or_default().trim().to_string();
    if serial.is_empty() {
        return Err(PeerError::NoAnswer(addr.to_string()));
    }
    Ok(PeerAnswer {
        serial,
        certificate_serial,
    })
}

// === main ===

/// `spire-lab peer`: serves until SIGINT/SIGTERM; returns the exit code (64 for
/// bad arguments, 1 when it cannot start).
///
/// The signal handlers are installed before the pidfile is written, so a
/// SIGHUP sent to the pid read from the pidfile never kills the peer.
pub async fn main(args: PeerArgs, out: &mut (dyn Write + Send)) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = match parse_listen(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --listen {:?}: {}", args.listen, error_chain(&e));
            return 64;
        }
    };
    let (mut hup, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(h), Ok(t), Ok(i)) => (h, t, i),
        _ => {
            eprintln!("error: cannot install signal handlers");
            return 1;
        }
    };
    let peer = match Peer::bind(&args.dir, &listen, args.on_hup).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return 1;
        }
    };
    let _ = writeln!(
        out,
        "Serving {} (serial {}) on {}; SIGHUP: {:?}.",
        peer.spiffe_id(),
        peer.serial(),
        peer.local_endpoint(),
        args.on_hup
    );
    let _ = out.flush();
    let pid = std::process::id().to_string();
    let announced = args
        .addr_file
        .iter()
        .map(|f| (f, peer.local_endpoint().to_string()))
        .chain(args.pidfile.iter().map(|f| (f, pid.clone())))
        .try_for_each(|(f, text)| write_atomic(f, format!("{text}\n").as_bytes(), 0o644));
    if let Err(e) = announced {
        eprintln!("error: {}", error_chain(&e));
        return 1;
    }

    let shutdown = CancellationToken::new();
    let serve = peer.serve(shutdown.clone());
    tokio::pin!(serve);
    loop {
        tokio::select! {
            () = &mut serve => break,
            _ = hup.recv() => match peer.hangup() {
                Ok(Hangup::Ignored { serial }) => {
                    let _ = writeln!(out, "SIGHUP ignored; still serving serial {serial}.");
                }
                Ok(Hangup::Reloaded { serial }) => {
                    let _ = writeln!(out, "SIGHUP: reloaded; now serving serial {serial}.");
                }
                Err(e) => eprintln!(
                    "warning: reload failed, still serving serial {}: {}",
                    peer.serial(),
                    error_chain(&e)
                ),
            },
            _ = term.recv() => shutdown.cancel(),
            _ = int.recv() => shutdown.cancel(),
        }
        let _ = out.flush();
    }
    if let Some(p) = &args.pidfile
        && std::fs::read_to_string(p).is_ok_and(|t| t.trim() == pid)
    {
        let _ = std::fs::remove_file(p);
    }
    if let Endpoint::Unix(path) = peer.local_endpoint() {
        let _ = std::fs::remove_file(path);
    }
    let _ = writeln!(out, "Stopped.");
    0
}

#[cfg(test)]
mod tests;
