//! The API over TCP with mTLS (`[api.tcp]`).
//!
//! We present our own X509-SVID, as the Workload API hands it out, and
//! require one from every caller. Both are read from an
//! [`IdentitySource`] during each handshake, so a rotated SVID or bundle
//! applies from the next connection on, without a restart:
//!
//! - [`SvidResolver`] picks the server certificate: the SVID the source
//!   holds now (its parsed key cached until the leaf changes);
//! - [`SpiffeClientVerifier`] checks the caller's chain against the trust
//!   bundle the source holds now (webpki path validation with the `ring`
//!   provider: time, signatures, `clientAuth` if an EKU is present) and
//!   requires exactly one URI SAN, a SPIFFE ID in our trust domain.
//!
//! Which caller may call what is not decided here: the verified SPIFFE ID
//! reaches the handlers as the [`TcpConnectInfo`] request extension.
//!
//! A failed handshake (no certificate, a foreign or expired one, a slow
//! client past `handshake_timeout`) is counted in
//! `spire_healer_api_tls_handshake_failures_total{reason}` and never stops
//! the accept loop. At most `max_connections` connections (handshaking or
//! established) are held; further callers wait in the listen backlog.
//!
//! Only TLS 1.3 and 1.2 with `ring`; ALPN offers `h2`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::endpoint::{Endpoint, EndpointError};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::spire_api::tls::{
    Authorize, IdentitySource, WrongPeerId, bundle_roots, check_peer_id, provider, uri_sans,
};
use crate::telemetry::metrics::Metrics;

mod identity;

pub use identity::{IdentityError, PickError, WorkloadIdentity, fetch_once, pick_svid};
// The client lives in `api::client`, which `api` does not export (yet):
// reachable from here, for the CLI.

// === Config ===

/// `[api.tcp]`: serve the API on TCP with mTLS, presenting our own
/// X509-SVID from the Workload API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Workload API endpoint our SVID comes from (`unix:///…` or
    /// `tcp://IP:port`).
    pub workload_api: String,
    /// Which of our SVIDs to present (default: the first valid one the
    /// Workload API hands out).
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Trust domain callers must belong to (a bare name such as
    /// `example.org`). Default: the trust domain of our own SVID. Callers
    /// are verified against our trust bundle either way.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Longest a TLS handshake may take; a slower client is dropped (and
    /// counted as `timeout`).
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most connections held at once, handshaking or established; further
    /// callers wait in the listen backlog until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_connections() -> usize {
    256
}

impl TcpConfig {
    /// A configuration with every optional field at its default.
    pub fn new(listen: SocketAddr, workload_api: impl Into<String>) -> Self {
        Self {
            listen,
            workload_api: workload_api.into(),
            spiffe_id: None,
            trust_domain: None,
            handshake_timeout: default_handshake_timeout(),
            max_connections: default_max_connections(),
        }
    }

    /// Every problem, as (field under `api.tcp`, problem) pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(e) = Endpoint::parse(&self.workload_api) {
            out.push(("workload_api", e.to_string()));
        }
        if let Some(id) = &self.spiffe_id
            && let Err(e) = SpiffeId::parse(id)
        {
            out.push(("spiffe_id", format!("{id:?} is not a SPIFFE ID: {e}")));
        }
        if let Some(td) = &self.trust_domain
            && let Err(e) = TrustDomain::parse(td)
        {
            out.push(("trust_domain", format!("{td:?} is not a trust domain: {e}")));
        }
        if self.handshake_timeout.is_zero() {
            out.push(("handshake_timeout", "must be greater than zero".to_string()));
        }
        if self.max_connections == 0 {
            out.push(("max_connections", "must be greater than zero".to_string()));
        }
        out
    }
}

/// What a TCP connection tells the API about its caller: set by the mTLS
/// acceptor (tonic `Connected::connect_info`), read by authorization
/// through `req.extensions().get::<TcpConnectInfo>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnectInfo {
    /// The remote address.
    pub remote: SocketAddr,
    /// The SPIFFE ID of the caller's X509-SVID, verified against our trust
    /// bundle during the handshake (`None` never reaches a handler: a
    /// caller without a valid SVID fails the handshake).
    pub peer_spiffe_id: Option<String>,
}

// === Errors ===

/// Why the TCP API could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// `[api.tcp]` is invalid (see [`TcpConfig::problems`]).
    #[error("[api.tcp] {field}: {problem}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The Workload API endpoint does not parse.
    #[error("[api.tcp] workload_api {endpoint:?} is unusable")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// Why.
        #[source]
        source: EndpointError,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("API server on {addr} failed")]
    Serve {
        /// The bound address.
        addr: SocketAddr,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
}

impl TcpError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Config { .. } => "config",
            Self::Endpoint { .. } => "endpoint",
            Self::Bind { .. } => "bind",
            Self::Serve { .. } => "serve",
        }
    }
}

// === Handshake failures ===

/// Why a caller's handshake failed (the `reason` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The caller presented no certificate.
    NoClientCert,
    /// Its chain does not lead to our bundle (a foreign trust domain, a
    /// stale bundle), or a signature does not verify.
    UnknownCa,
    /// A certificate of its chain is past notAfter.
    Expired,
    /// A certificate of its chain is before notBefore.
    NotYetValid,
    /// The chain verifies, but its leaf does not carry exactly one SPIFFE
    /// ID of our trust domain.
    BadSpiffeId,
    /// The caller refused our certificate (it sent an alert).
    ClientRefused,
    /// We hold no SVID (yet) to present, or no bundle to verify with.
    NoIdentity,
    /// Not TLS, or TLS we cannot agree on.
    Protocol,
    /// The connection closed or broke before the handshake finished.
    Closed,
    /// The handshake did not finish within `handshake_timeout`.
    Timeout,
}

impl HandshakeFailure {
    /// Every reason.
    pub const ALL: [HandshakeFailure; 10] = [
        Self::NoClientCert,
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::BadSpiffeId,
        Self::ClientRefused,
        Self::NoIdentity,
        Self::Protocol,
        Self::Closed,
        Self::Timeout,
    ];

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoClientCert => "no_client_cert",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::BadSpiffeId => "bad_spiffe_id",
            Self::ClientRefused => "client_refused",
            Self::NoIdentity => "no_identity",
            Self::Protocol => "protocol",
            Self::Closed => "closed",
            Self::Timeout => "timeout",
        }
    }

    /// The reason of a failed `accept`; `have_identity` tells whether we
    /// held an SVID when it failed (without one, every handshake fails).
    fn of(e: &io::Error, have_identity: bool) -> Self {
        if !have_identity {
            return Self::NoIdentity;
        }
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Self::Closed;
        };
        use CertificateError as C;
        match tls {
            rustls::Error::NoCertificatesPresented => Self::NoClientCert,
            rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                Self::Expired
            }
            rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                Self::NotYetValid
            }
            rustls::Error::InvalidCertificate(C::Other(o))
                if o.0.downcast_ref::<WrongPeerId>().is_some() =>
            {
                Self::BadSpiffeId
            }
            rustls::Error::InvalidCertificate(C::BadEncoding) => Self::BadSpiffeId,
            rustls::Error::InvalidCertificate(_) => Self::UnknownCa,
            rustls::Error::AlertReceived(_) => Self::ClientRefused,
            _ => Self::Protocol,
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl SvidResolver ===

/// Presents the SVID an [`IdentitySource`] holds at each handshake. The
/// parsed key is cached until the leaf changes.
pub struct SvidResolver {
    identity: Arc<dyn IdentitySource>,
    cached: Mutex<Option<(Vec<u8>, Arc<CertifiedKey>)>>,
}

impl fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidResolver").finish_non_exhaustive()
    }
}

impl SvidResolver {
    /// A resolver reading `identity`.
    pub fn new(identity: Arc<dyn IdentitySource>) -> Self {
        Self {
            identity,
            cached: Mutex::new(None),
        }
    }

    /// The certified key for the current SVID; `None` while there is none,
    /// or when its key does not load (logged).
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let (chain, key, _) = self.identity.current()?;
        let leaf = chain.first()?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((der, certified)) = cached.as_ref()
            && der == leaf
        {
            return Some(certified.clone());
        }
        let leaf = leaf.clone();
        let certs = chain.into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        match CertifiedKey::from_der(certs, key, &provider()) {
            Ok(certified) => {
                let certified = Arc::new(certified);
                *cached = Some((leaf, certified.clone()));
                Some(certified)
            }
            Err(error) => {
                warn!(%error, "Our X509-SVID cannot be used for TLS.");
                None
            }
        }
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

// === impl SpiffeClientVerifier ===

/// A trust bundle (DER certificates) and the webpki verifier built on it.
type BundleVerifier = (Vec<Vec<u8>>, Arc<dyn ClientCertVerifier>);

/// Verifies callers against the trust bundle an [`IdentitySource`] holds
/// at each handshake, and requires a SPIFFE ID of one trust domain (fixed,
/// or that of our own SVID).
pub struct SpiffeClientVerifier {
    identity: Arc<dyn IdentitySource>,
    trust_domain: Option<TrustDomain>,
    algs: WebPkiSupportedAlgorithms,
    /// The webpki verifier for the last bundle seen.
    cached: Mutex<Option<BundleVerifier>>,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// A verifier reading the bundle from `identity`; callers must belong
    /// to `trust_domain` (`None`: the trust domain of our current SVID).
    pub fn new(identity: Arc<dyn IdentitySource>, trust_domain: Option<TrustDomain>) -> Self {
        Self {
            identity,
            trust_domain,
            algs: provider().signature_verification_algorithms,
            cached: Mutex::new(None),
        }
    }

    /// The webpki verifier for `bundle`, rebuilt only when it changed.
    fn chain_verifier(
        &self,
        bundle: Vec<Vec<u8>>,
    ) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, v)) = cached.as_ref()
            && *b == bundle
        {
            return Ok(v.clone());
        }
        let roots = bundle_roots(&bundle)
            .ok_or_else(|| rustls::Error::General("our trust bundle has no usable CA".into()))?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider()))
                .build()
                .map_err(|e| rustls::Error::General(format!("cannot verify clients: {e}")))?;
        *cached = Some((bundle, verifier.clone()));
        Ok(verifier)
    }

    /// Which IDs are accepted now.
    fn authorize(&self, our_leaf: Option<&Vec<u8>>) -> Result<Authorize, rustls::Error> {
        if let Some(td) = &self.trust_domain {
            return Ok(Authorize::TrustDomain(td.clone()));
        }
        our_leaf
            .and_then(|leaf| Authorize::trust_domain_of(leaf))
            .ok_or_else(|| rustls::Error::General("our X509-SVID names no trust domain".into()))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle changes under us; an empty list lets a client send
        // whichever SVID it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (chain, _, bundle) = self
            .identity
            .current()
            .ok_or_else(|| rustls::Error::General("we hold no trust bundle yet".into()))?;
        let expected = self.authorize(chain.first())?;
        self.chain_verifier(bundle)?
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer_id(end_entity, &expected, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The rustls server configuration: our SVID from `identity` at each
/// handshake, callers verified by [`SpiffeClientVerifier`]. TLS 1.3 and
/// 1.2, `ring`, ALPN `h2`.
///
/// # Panics
/// Never: the protocol versions are supported by the `ring` provider.
pub fn server_config(
    identity: Arc<dyn IdentitySource>,
    trust_domain: Option<TrustDomain>,
) -> ServerConfig {
    let verifier = Arc::new(SpiffeClientVerifier::new(identity.clone(), trust_domain));
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.3 and 1.2")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SvidResolver::new(identity)));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

// === Connections ===

/// An established mTLS connection, with what it tells the handlers. Holds
/// one of the `max_connections` slots until it closes.
struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
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

/// The single SPIFFE ID of the caller's leaf (verified by then).
fn peer_spiffe_id(io: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<String> {
    let leaf = io.get_ref().1.peer_certificates()?.first()?;
    uri_sans(leaf)?.into_iter().next()
}

/// What the accept loop needs.
struct Acceptor {
    tls: TlsAcceptor,
    identity: Arc<dyn IdentitySource>,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Acceptor {
    /// One handshake; `None` when it failed (counted and logged).
    async fn handshake(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        slot: OwnedSemaphorePermit,
    ) -> Option<TlsConn> {
        // Best effort: small RPCs should not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let failure = match tokio::time::timeout(self.handshake_timeout, self.tls.accept(tcp)).await
        {
            Ok(Ok(io)) => {
                let peer = peer_spiffe_id(&io);
                debug!(%remote, peer = peer.as_deref().unwrap_or(""), "API caller connected over mTLS.");
                return Some(TlsConn {
                    io,
                    info: TcpConnectInfo {
                        remote,
                        peer_spiffe_id: peer,
                    },
                    _slot: slot,
                });
            }
            Ok(Err(error)) => {
                let reason = HandshakeFailure::of(&error, self.identity.current().is_some());
                // Debug, not warn: anyone who can connect can trigger it.
                debug!(%remote, %reason, %error, "API TLS handshake failed.");
                reason
            }
            Err(_) => {
                debug!(%remote, timeout = ?self.handshake_timeout, "API TLS handshake timed out.");
                HandshakeFailure::Timeout
            }
        };
        self.metrics
            .api_tls_handshake_failures_total
            .with_label_values(&[failure.as_str()])
            .inc();
        None
    }
}

/// Accepts until `shutdown`, handshakes concurrently (each bounded by the
/// timeout, all aborted when this returns) and hands established
/// connections to `tx`.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Arc<Acceptor>,
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<Result<TlsConn, io::Error>>,
    shutdown: CancellationToken,
) {
    let mut handshakes = JoinSet::new();
    loop {
        // A slot first: at the limit, callers wait in the backlog.
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (tcp, remote) = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok(a) => break a,
                    Err(error) => {
                        // A full file table (EMFILE) must not become a busy loop.
                        warn!(%error, "API accept failed.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        handshakes.spawn(async move {
            if let Some(conn) = acceptor.handshake(tcp, remote, slot).await {
                // Closed only when the server stopped: the connection drops.
                let _ = tx.send(Ok(conn)).await;
            }
        });
    }
}

/// Binds `cfg.listen` now and returns the bound address and the future
/// that serves `routes` on it with mTLS until `shutdown`.
///
/// `routes` is any tonic service set, e.g.
/// `Routes::new(SupervisorServer::new(api))`. Our SVID and the trust
/// bundle are read from `identity` at every handshake (see the module
/// documentation); handlers find the caller in the [`TcpConnectInfo`]
/// request extension.
///
/// On `shutdown` the future stops accepting, aborts handshakes in flight
/// and waits for open connections to finish their calls.
///
/// # Errors
/// [`TcpError::Config`] for an invalid `trust_domain` or limit,
/// [`TcpError::Bind`] when the address cannot be bound; the future returns
/// [`TcpError::Serve`] or [`TcpError::Bind`] if serving fails.
///
/// # Panics
/// The future panics when polled outside a tokio runtime.
pub fn serve_tcp(
    cfg: &TcpConfig,
    identity: Arc<dyn IdentitySource>,
    routes: Routes,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<
    (
        SocketAddr,
        impl Future<Output = Result<(), TcpError>> + Send + 'static + use<>,
    ),
    TcpError,
> {
    let trust_domain = match &cfg.trust_domain {
        Some(td) => Some(TrustDomain::parse(td).map_err(|e| TcpError::Config {
            field: "trust_domain",
            problem: format!("{td:?} is not a trust domain: {e}"),
        })?),
        None => None,
    };
    if let Some((field, problem)) = cfg
        .problems()
        .into_iter()
        .find(|(f, _)| matches!(*f, "handshake_timeout" | "max_connections"))
    {
        return Err(TcpError::Config { field, problem });
    }
    let bind_err = |source| TcpError::Bind {
        addr: cfg.listen,
        source,
    };
    let std_listener = std::net::TcpListener::bind(cfg.listen).map_err(bind_err)?;
    let addr = std_listener.local_addr().map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let acceptor = Arc::new(Acceptor {
        tls: TlsAcceptor::from(Arc::new(server_config(identity.clone(), trust_domain))),
        identity,
        handshake_timeout: cfg.handshake_timeout,
        metrics,
    });
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let fut = async move {
        let listener = TcpListener::from_std(std_listener)
            .map_err(|source| TcpError::Bind { addr, source })?;
        info!(%addr, "API listening on TCP with mTLS.");
        let (tx, rx) = mpsc::channel(16);
        // Stops with the server too, should it fail on its own.
        let accepting = shutdown.child_token();
        let accept = accept_loop(listener, acceptor, slots, tx, accepting.clone());
        let server = async {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(60)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_routes(routes)
                .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown.cancelled_owned())
                .await;
            accepting.cancel();
            result
        };
        let ((), result) = tokio::join!(accept, server);
        info!(%addr, "API on TCP stopped.");
        result.map_err(|source| TcpError::Serve { addr, source })
    }
    .instrument(info_span!("api_tcp"));
    Ok((addr, fut))
}

/// Starts `[api.tcp]` on `tasks`: a Workload API watcher for our SVID
/// (`cfg.workload_api`, `cfg.spiffe_id`) and the server ([`serve_tcp`]).
/// Returns the bound address; both stop when `shutdown` is cancelled.
///
/// # Errors
/// [`TcpError::Config`] or [`TcpError::Endpoint`] for a bad `[api.tcp]`,
/// [`TcpError::Bind`] when the address cannot be bound. A failure while
/// serving is logged.
pub fn start(
    cfg: &TcpConfig,
    routes: Routes,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<SocketAddr, TcpError> {
    let endpoint = Endpoint::parse(&cfg.workload_api).map_err(|source| TcpError::Endpoint {
        endpoint: cfg.workload_api.clone(),
        source,
    })?;
    let spiffe_id = match &cfg.spiffe_id {
        Some(id) => Some(SpiffeId::parse(id).map_err(|e| TcpError::Config {
            field: "spiffe_id",
            problem: format!("{id:?} is not a SPIFFE ID: {e}"),
        })?),
        None => None,
    };
    let identity = WorkloadIdentity::new(endpoint, spiffe_id);
    let (addr, fut) = serve_tcp(cfg, identity.clone(), routes, metrics, shutdown.clone())?;
    tasks.spawn(
        identity
            .run(shutdown)
            .instrument(info_span!("api_tcp_identity")),
    );
    tasks.spawn(async move {
        if let Err(e) = fut.await {
            tracing::error!(error = %e, "API server on TCP failed.");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests;
