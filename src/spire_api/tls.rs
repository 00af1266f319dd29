//! mTLS transport to a spire-server's TCP port (`bind_address:bind_port`).
//!
//! SPIRE serves Agent, Bundle and Entry there to callers whose X509-SVID
//! SPIFFE ID is listed in the server's `admin_ids`; Debug, Logger and Health
//! stay on the local socket. We authenticate with our own X509-SVID as the
//! Workload API hands it out, so the identity is read from an
//! [`IdentitySource`] afresh for every new connection: a rotated SVID or
//! bundle applies from the next reconnect on.
//!
//! The server is verified the SPIFFE way, not the web way: its chain must
//! lead to a certificate of our trust bundle (webpki path validation, time
//! and signature checks, `serverAuth` if an EKU is present) and its leaf must
//! carry exactly one URI SAN, equal to the expected server ID (by default
//! `spiffe://<our trust domain>/spire/server`). DNS names are ignored. Only
//! the `ring` provider is used; ALPN offers `h2` (grpc-go requires it).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::time_provider::TimeProvider;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Uri};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Path of a spire-server's own SPIFFE ID.
pub const SERVER_PATH: &str = "/spire/server";

/// Our X509-SVID as the Workload API hands it out: (certificate chain, leaf
/// first, as DER; the leaf's private key as PKCS#8 DER; the trust bundle of
/// our trust domain as DER certificates).
pub type RawIdentity = (Vec<Vec<u8>>, Vec<u8>, Vec<Vec<u8>>);

/// Where our client identity comes from.
///
/// Called once per new connection; must be cheap and must not block.
pub trait IdentitySource: Send + Sync {
    /// Our current X509-SVID ([`RawIdentity`]); `None` while we hold none.
    fn current(&self) -> Option<RawIdentity>;
}

/// A fixed identity, for tests and tools.
#[derive(Clone)]
pub struct StaticIdentity(pub Option<RawIdentity>);

impl fmt::Debug for StaticIdentity {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticIdentity")
            .field("present", &self.0.is_some())
            .finish()
    }
}

impl IdentitySource for StaticIdentity {
    fn current(&self) -> Option<RawIdentity> {
        self.0.clone()
    }
}

// === Errors ===

/// Why a TLS connection to the server could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The identity source holds no SVID (yet), or no trust bundle.
    #[error("no X509-SVID of our own to authenticate with: {0}")]
    NoIdentity(&'static str),
    /// Our SVID, key or bundle cannot be used for TLS.
    #[error("our X509-SVID cannot be used for TLS")]
    BadIdentity(#[source] rustls::Error),
    /// The TCP connection failed.
    #[error("cannot connect to {addr}")]
    Dial {
        /// The server address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server's certificate chains to our bundle but names someone else.
    #[error("the server at {addr} is {found:?}, expected {expected}")]
    BadServerId {
        /// The server address.
        addr: SocketAddr,
        /// The ID we required.
        expected: String,
        /// The URI SANs its leaf carries.
        found: Vec<String>,
    },
    /// The handshake failed (untrusted or expired chain, our certificate
    /// refused, no common protocol, …).
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        /// The server address.
        addr: SocketAddr,
        /// The error; rustls' error sits inside.
        #[source]
        source: io::Error,
    },
}

impl TlsError {
    /// Closed-set label: `no_identity`, `bad_server_id`, `tls`; `None` for a
    /// dial failure, which is classified by its `io::Error`.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            Self::NoIdentity(_) => Some("no_identity"),
            Self::BadIdentity(_) | Self::Handshake { .. } => Some("tls"),
            Self::BadServerId { .. } => Some("bad_server_id"),
            Self::Dial { .. } => None,
        }
    }
}

/// A verifier's error for a peer whose chain verified but whose leaf does
/// not name exactly one SPIFFE ID it allows, carried through rustls.
#[derive(Debug, thiserror::Error)]
#[error("the {side} certificate names {found:?}, expected {expected}")]
pub struct WrongPeerId {
    /// Which peer was refused: `client` or `server`.
    pub side: &'static str,
    /// What was required.
    pub expected: String,
    /// The URI SANs the leaf carries.
    pub found: Vec<String>,
}

/// The wrong-ID error a verifier returned, if `e` is one.
pub fn wrong_peer_id(e: &rustls::Error) -> Option<&WrongPeerId> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.0.downcast_ref(),
        _ => None,
    }
}

/// Whether `e` is a verifier refusing a chain that verified but names the
/// wrong SPIFFE ID (or none, or several).
pub fn is_wrong_peer_id(e: &rustls::Error) -> bool {
    wrong_peer_id(e).is_some()
}

/// The roots of a trust bundle (DER certificates); `None` when no
/// certificate of it is a usable CA.
pub fn bundle_roots(bundle: &[Vec<u8>]) -> Option<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(
        bundle
            .iter()
            .map(|der| CertificateDer::from(der.as_slice()).into_owned()),
    );
    (added > 0).then_some(roots)
}

/// Checks that a leaf whose chain verified names exactly one SPIFFE ID
/// `expected` allows; `side` (`client` or `server`) names the peer in the
/// error.
///
/// # Errors
/// `BadEncoding` when the leaf or its SAN extension does not parse;
/// a [`WrongPeerId`] (see [`wrong_peer_id`]) when it names another ID, none
/// or several.
pub fn check_peer_id(
    end_entity: &CertificateDer<'_>,
    expected: &Authorize,
    side: &'static str,
) -> Result<(), rustls::Error> {
    let found = uri_sans(end_entity).ok_or(rustls::Error::InvalidCertificate(
        CertificateError::BadEncoding,
    ))?;
    if expected.admits(&found) {
        return Ok(());
    }
    Err(rustls::Error::InvalidCertificate(CertificateError::Other(
        OtherError(Arc::new(WrongPeerId {
            side,
            expected: expected.to_string(),
            found,
        })),
    )))
}

// === impl Authorize ===

/// Which peer SPIFFE IDs a verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorize {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in this trust domain.
    TrustDomain(TrustDomain),
}

impl Authorize {
    /// Whether `id` is accepted.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::TrustDomain(td) => id.trust_domain() == td,
        }
    }

    /// Whether a leaf's URI SANs (`found`) are exactly one SPIFFE ID this
    /// allows, as X509-SVIDs must carry.
    pub fn admits(&self, found: &[String]) -> bool {
        matches!(found, [only] if SpiffeId::parse(only).is_ok_and(|id| self.allows(&id)))
    }

    /// Any ID in the trust domain of the SPIFFE ID `leaf` (our own SVID's
    /// leaf, DER) names first; `None` when it does not parse or names none.
    pub fn trust_domain_of(leaf: &[u8]) -> Option<Self> {
        uri_sans(leaf)?
            .first()
            .and_then(|s| SpiffeId::parse(s).ok())
            .map(|id| Self::TrustDomain(id.trust_domain().clone()))
    }
}

impl fmt::Display for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => f.write_str(id.as_str()),
            Self::TrustDomain(td) => write!(f, "any ID in spiffe://{td}"),
        }
    }
}

// === impl SpiffeServerVerifier ===

/// Verifies a server's certificate against a SPIFFE trust bundle and an
/// expected SPIFFE ID (or trust domain), ignoring the DNS name.
pub struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: Authorize,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("roots", &self.roots.len())
            .field("expected", &self.expected)
            .finish()
    }
}

impl SpiffeServerVerifier {
    /// A verifier trusting the DER certificates of `bundle` and requiring the
    /// leaf's single URI SAN to be `expected`. Signatures use `ring`.
    ///
    /// # Errors
    /// [`TlsError::NoIdentity`] when no bundle certificate is a usable
    /// trust anchor.
    pub fn new(bundle: &[Vec<u8>], expected: &SpiffeId) -> Result<Self, TlsError> {
        Self::authorizing(bundle, Authorize::Exact(expected.clone()))
    }

    /// A verifier trusting the DER certificates of `bundle` and requiring the
    /// leaf's single URI SAN to be a SPIFFE ID that `expected` allows.
    ///
    /// # Errors
    /// [`TlsError::NoIdentity`] when no bundle certificate is a usable
    /// trust anchor.
    pub fn authorizing(bundle: &[Vec<u8>], expected: Authorize) -> Result<Self, TlsError> {
        let roots = bundle_roots(bundle)
            .ok_or(TlsError::NoIdentity("the trust bundle has no usable CA"))?;
        Ok(Self {
            roots,
            expected,
            algs: provider().signature_verification_algorithms,
        })
    }
}

/// Every URI SAN of a certificate; `None` when the certificate or its SAN
/// extension does not parse (callers refuse it as a bad encoding).
pub fn uri_sans(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let sans = crate::svid::uri_sans(&cert).ok()?;
    Some(sans.into_iter().map(str::to_string).collect())
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        check_peer_id(end_entity, &self.expected, "server")?;
        Ok(ServerCertVerified::assertion())
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

// === Client configuration ===

/// The only crypto provider we use: `ring`.
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// `spiffe://<trust domain of the leaf>/spire/server`.
fn default_server_id(leaf: &[u8]) -> Result<SpiffeId, TlsError> {
    let sans = uri_sans(leaf).ok_or(TlsError::NoIdentity("our SVID does not parse"))?;
    let ours = sans
        .first()
        .and_then(|s| SpiffeId::parse(s).ok())
        .ok_or(TlsError::NoIdentity("our SVID carries no SPIFFE ID"))?;
    SpiffeId::parse(&format!(
        "spiffe://{}{SERVER_PATH}",
        ours.trust_domain().as_str()
    ))
    .map_err(|_| TlsError::NoIdentity("our SVID's trust domain is unusable"))
}

/// A rustls client configuration presenting `identity` and verifying the
/// server against its bundle and `server_id` (default: the `spire/server`
/// ID of the SVID's trust domain). TLS 1.3 and 1.2, ALPN `h2`.
///
/// # Errors
/// [`TlsError::NoIdentity`] for an empty chain or bundle,
/// [`TlsError::BadIdentity`] when rustls refuses the key or chain.
pub fn client_config(
    identity: RawIdentity,
    server_id: Option<&SpiffeId>,
) -> Result<ClientConfig, TlsError> {
    let (chain, key, bundle) = identity;
    let leaf = chain
        .first()
        .ok_or(TlsError::NoIdentity("the SVID chain is empty"))?;
    let expected = match server_id {
        Some(id) => id.clone(),
        None => default_server_id(leaf)?,
    };
    let verifier = Arc::new(SpiffeServerVerifier::new(&bundle, &expected)?);
    let mut cfg = client_config_with(chain, key, verifier, None)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A rustls client configuration (TLS 1.3 and 1.2, `ring`, no ALPN)
/// presenting `chain` (leaf first) and its PKCS#8 `key`, checking the
/// server with `verifier`, and reading the time for certificate checks from
/// `time` (rustls' system clock when `None`).
///
/// # Errors
/// [`TlsError::BadIdentity`] when rustls refuses the key or chain.
pub fn client_config_with(
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    verifier: Arc<dyn ServerCertVerifier>,
    time: Option<Arc<dyn TimeProvider>>,
) -> Result<ClientConfig, TlsError> {
    let certs = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let builder = match time {
        Some(time) => ClientConfig::builder_with_details(Arc::new(provider()), time),
        None => ClientConfig::builder_with_provider(Arc::new(provider())),
    };
    builder
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::BadIdentity)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .map_err(TlsError::BadIdentity)
}

// === Connector ===

/// Dials the server and runs the TLS handshake with the identity of the
/// moment.
#[derive(Clone)]
pub struct MtlsConnector {
    addr: SocketAddr,
    server_id: Option<SpiffeId>,
    identity: Arc<dyn IdentitySource>,
}

impl fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsConnector")
            .field("addr", &self.addr)
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

impl MtlsConnector {
    /// A connector to `addr`; `server_id` `None` means the `spire/server`
    /// ID of our own trust domain.
    pub fn new(
        addr: SocketAddr,
        server_id: Option<SpiffeId>,
        identity: Arc<dyn IdentitySource>,
    ) -> Self {
        Self {
            addr,
            server_id,
            identity,
        }
    }

    /// One TLS connection.
    ///
    /// # Errors
    /// Any [`TlsError`]; the identity is checked before dialling.
    ///
    /// # Cancel safety
    /// Dropping it drops the half-open connection.
    pub async fn connect(&self) -> Result<TlsStream<TcpStream>, TlsError> {
        let identity = self
            .identity
            .current()
            .ok_or(TlsError::NoIdentity("no X509-SVID received yet"))?;
        let cfg = client_config(identity, self.server_id.as_ref())?;
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TlsError::Dial { addr, source })?;
        // Best effort: small RPCs should not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let name = ServerName::IpAddress(addr.ip().into());
        TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| handshake_error(addr, e))
    }
}

/// Lifts a wrong server ID out of the handshake's `io::Error`.
fn handshake_error(addr: SocketAddr, e: io::Error) -> TlsError {
    let wrong = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(wrong_peer_id);
    match wrong {
        Some(w) => TlsError::BadServerId {
            addr,
            expected: w.expected.clone(),
            found: w.found.clone(),
        },
        None => TlsError::Handshake { addr, source: e },
    }
}

/// A lazy gRPC channel over `connector`; `connect_timeout` bounds dial plus
/// handshake.
///
/// # Errors
/// tonic rejects the address as a URI (not expected for a socket address).
pub fn channel(
    connector: MtlsConnector,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", connector.addr))?
        .connect_timeout(connect_timeout);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let c = connector.clone();
            async move { c.connect().await.map(TokioIo::new) }
        })),
    )
}

#[cfg(test)]
mod tests;
