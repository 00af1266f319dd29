//! The probe against in-process tokio-rustls servers over loopback TCP and
//! Unix sockets, with certificates minted per test by [`TestCa`]. Both
//! sides judge validity by one [`ManualClock`]. No timing is asserted; the
//! deadlines only bound the tests that need one to pass.

use std::path::PathBuf;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::server::WebPkiClientVerifier;
use rustls::version::{TLS12, TLS13};
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::clock::ManualClock;
use crate::sensors::Sensor;
use crate::simulated::issuer::{Flavor, TestCa};
use crate::spire_api::tls::RawIdentity;
use crate::telemetry::metrics::sample;

const T0: u64 = 1_700_000_000;
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
/// Deadline of probes expected to complete.
const GENEROUS: Duration = Duration::from_secs(10);
/// Deadline of probes expected to time out.
const SHORT: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(20);

static ONLY_TLS12: [&SupportedProtocolVersion; 1] = [&TLS12];

const TD: &str = "example.test";
const SERVER_ID: &str = "spiffe://example.test/server";
const CLIENT_ID: &str = "spiffe://example.test/client";

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0)
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at_unix(T0))
}

fn ca(td: &str) -> TestCa {
    TestCa::new(td, t0() - 30 * DAY, t0() + 365 * DAY).expect("CA")
}

/// A leaf valid from `from` to `to`: (leaf DER, key DER, serial).
fn leaf(ca: &TestCa, id: &str, from: SystemTime, to: SystemTime) -> (Vec<u8>, Vec<u8>, u64) {
    ca.issue(id, from, to, Flavor::Valid).expect("leaf")
}

fn valid(ca: &TestCa, id: &str) -> (Vec<u8>, Vec<u8>, u64) {
    leaf(ca, id, t0() - HOUR, t0() + HOUR)
}

/// Our identity as the Workload API would hand it out.
fn identity(ca: &TestCa, svid: (Vec<u8>, Vec<u8>, u64)) -> RawIdentity {
    (vec![svid.0], svid.1, vec![ca.der().to_vec()])
}

/// An identity source the test can rotate.
#[derive(Default)]
struct Rotating(StdMutex<Option<RawIdentity>>);

impl Rotating {
    fn set(&self, id: Option<RawIdentity>) {
        *self.0.lock().expect("identity lock") = id;
    }
}

impl IdentitySource for Rotating {
    fn current(&self) -> Option<RawIdentity> {
        self.0.lock().expect("identity lock").clone()
    }
}

fn exact(id: &str) -> Authorize {
    Authorize::Exact(SpiffeId::parse(id).expect("id"))
}

fn target(address: ProbeAddress, authorize: Authorize) -> Target {
    Target {
        address,
        server_name: ServerName::try_from("localhost").expect("name"),
        authorize,
        // A peer's objection may be scheduled late on a loaded machine.
        settle: Duration::from_secs(5),
    }
}

// === Test servers ===

/// What the TLS server presents and whom it trusts.
struct Tls {
    leaf: (Vec<u8>, Vec<u8>, u64),
    client_ca: Vec<u8>,
    versions: &'static [&'static SupportedProtocolVersion],
}

impl Tls {
    fn new(leaf: (Vec<u8>, Vec<u8>, u64), client_ca: &TestCa) -> Self {
        Self {
            leaf,
            client_ca: client_ca.der().to_vec(),
            versions: rustls::ALL_VERSIONS,
        }
    }

    fn tls12(mut self) -> Self {
        self.versions = &ONLY_TLS12;
        self
    }

    fn acceptor(self, clock: Arc<ManualClock>) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.client_ca))
            .expect("client CA");
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .expect("client verifier");
        let cfg = ServerConfig::builder_with_details(provider, Arc::new(ClockTime(clock)))
            .with_protocol_versions(self.versions)
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(self.leaf.0)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf.1)),
            )
            .expect("server cert");
        TlsAcceptor::from(Arc::new(cfg))
    }
}

/// How a server answers a connection.
#[derive(Clone)]
enum Behaviour {
    /// A TLS server; client leaf serials it accepted are recorded.
    Tls(TlsAcceptor, Arc<StdMutex<Vec<String>>>),
    /// Accepts and never says a word.
    Silent,
    /// Writes these bytes, then stalls.
    Send(&'static [u8]),
}

struct Server {
    address: ProbeAddress,
    seen: Arc<StdMutex<Vec<String>>>,
    task: JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Stops accepting: the listener is closed when this returns.
    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

async fn answer<S>(how: Behaviour, mut s: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match how {
        Behaviour::Tls(acceptor, seen) => {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                let serial = leaf_info(leaf).expect("client leaf").serial;
                seen.lock().expect("seen lock").push(serial);
            }
            // Until the client closes.
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(WAIT, tls.read(&mut buf)).await;
        }
        Behaviour::Silent => {
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        Behaviour::Send(bytes) => {
            let _ = s.write_all(bytes).await;
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    }
}

fn seen_of(how: &Behaviour) -> Arc<StdMutex<Vec<String>>> {
    match how {
        Behaviour::Tls(_, seen) => seen.clone(),
        _ => Arc::default(),
    }
}

async fn tcp_server(how: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = seen_of(&how);
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(answer(how.clone(), s));
        }
    });
    Server {
        address: ProbeAddress::Tcp(addr),
        seen,
        task,
        _dir: None,
    }
}

async fn unix_server(how: Behaviour) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let seen = seen_of(&how);
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(answer(how.clone(), s));
        }
    });
    Server {
        address: ProbeAddress::Unix(path),
        seen,
        task,
        _dir: Some(dir),
    }
}

fn tls(t: Tls, clock: &Arc<ManualClock>) -> Behaviour {
    Behaviour::Tls(t.acceptor(clock.clone()), Arc::default())
}

async fn probe(
    address: &ProbeAddress,
    authorize: Authorize,
    ours: RawIdentity,
    clock: &Arc<ManualClock>,
    timeout: Duration,
) -> ProbeResult {
    let clock: Arc<dyn Clock> = clock.clone();
    let id = Rotating::default();
    id.set(Some(ours));
    probe_once(&target(address.clone(), authorize), &id, &clock, timeout)
        .await
        .expect("probed")
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).expect("after epoch").as_secs()
}

// === Outcomes ===

#[tokio::test]
async fn ok_over_tcp_captures_the_peer() {
    let clock = clock();
    let ca = ca(TD);
    let server_leaf = valid(&ca, SERVER_ID);
    let server_serial = format!("{:x}", server_leaf.2);
    let client = valid(&ca, CLIENT_ID);
    let client_serial = format!("{:x}", client.2);
    let server = tcp_server(tls(Tls::new(server_leaf, &ca), &clock)).await;

    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, client),
        &clock,
        GENEROUS,
    )
    .await;

    assert_eq!(r.reason, Reason::Ok, "{:?}", r.detail);
    assert_eq!(r.detail, None);
    assert_eq!(r.at, t0());
    assert!(!r.latency.is_zero(), "latency is measured");
    let peer = r.peer.expect("peer leaf");
    assert_eq!(peer.serial, server_serial);
    assert_eq!(peer.spiffe_id.as_deref(), Some(SERVER_ID));
    assert_eq!(unix_secs(peer.not_after), T0 + 3600);
    assert_eq!(unix_secs(peer.not_before), T0 - 3600);
    assert_eq!(
        server.seen(),
        vec![client_serial],
        "the server saw our SVID"
    );
}

#[tokio::test]
async fn ok_over_unix_and_by_trust_domain() {
    let clock = clock();
    let ca = ca(TD);
    let server = unix_server(tls(Tls::new(valid(&ca, SERVER_ID), &ca), &clock)).await;
    let any = Authorize::TrustDomain(TrustDomain::parse(TD).expect("td"));

    let r = probe(
        &server.address,
        any,
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        GENEROUS,
    )
    .await;

    assert_eq!(r.reason, Reason::Ok, "{:?}", r.detail);
    assert!(r.peer.is_some());
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn ok_over_tls12() {
    let clock = clock();
    let ca = ca(TD);
    let server = tcp_server(tls(Tls::new(valid(&ca, SERVER_ID), &ca).tls12(), &clock)).await;
    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        GENEROUS,
    )
    .await;
    assert_eq!(r.reason, Reason::Ok, "{:?}", r.detail);
}

#[tokio::test]
async fn expired_peer_leaf() {
    let clock = clock();
    let ca = ca(TD);
    let old = leaf(&ca, SERVER_ID, t0() - DAY, t0() - Duration::from_secs(60));
    let server = tcp_server(tls(Tls::new(old, &ca), &clock)).await;

    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        GENEROUS,
    )
    .await;

    assert_eq!(r.reason, Reason::Expired, "{:?}", r.detail);
    let peer = r.peer.expect("leaf kept although refused");
    assert_eq!(unix_secs(peer.not_after), T0 - 60);
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn not_yet_valid_peer_leaf() {
    let clock = clock();
    let ca = ca(TD);
    let early = leaf(&ca, SERVER_ID, t0() + HOUR, t0() + 2 * HOUR);
    let server = tcp_server(tls(Tls::new(early, &ca), &clock)).await;

    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        GENEROUS,
    )
    .await;

    assert_eq!(r.reason, Reason::NotYetValid, "{:?}", r.detail);
    assert!(r.peer.is_some());
}

#[tokio::test]
async fn peer_from_a_foreign_ca_is_unknown_ca() {
    let clock = clock();
    let ours = ca(TD);
    let foreign = ca(TD);
    let server = tcp_server(tls(Tls::new(valid(&foreign, SERVER_ID), &ours), &clock)).await;

    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ours, valid(&ours, CLIENT_ID)),
        &clock,
        GENEROUS,
    )
    .await;

    assert_eq!(r.reason, Reason::UnknownCa, "{:?}", r.detail);
    assert_eq!(r.peer.expect("leaf").spiffe_id.as_deref(), Some(SERVER_ID));
}

#[tokio::test]
async fn wrong_spiffe_id() {
    let clock = clock();
    let ca = ca(TD);
    let server = tcp_server(tls(
        Tls::new(valid(&ca, "spiffe://example.test/impostor"), &ca),
        &clock,
    ))
    .await;

    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        GENEROUS,
    )
    .await;
    assert_eq!(r.reason, Reason::BadSpiffeId, "{:?}", r.detail);
    assert_eq!(
        r.peer.expect("leaf").spiffe_id.as_deref(),
        Some("spiffe://example.test/impostor")
    );

    // By trust domain: an ID of another trust domain, though signed by our CA.
    let other_td = tcp_server(tls(
        Tls::new(valid(&ca, "spiffe://elsewhere.test/server"), &ca),
        &clock,
    ))
    .await;
    let any = Authorize::TrustDomain(TrustDomain::parse(TD).expect("td"));
    let r = probe(
        &other_td.address,
        any,
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        GENEROUS,
    )
    .await;
    assert_eq!(r.reason, Reason::BadSpiffeId, "{:?}", r.detail);
}

#[tokio::test]
async fn peer_that_distrusts_our_ca_sends_unknown_ca() {
    let clock = clock();
    let ours = ca(TD);
    // A CA of another name: the peer finds no issuer (alert unknown_ca). A
    // CA of the same name but another key, as after a CA rotation the peer
    // missed: the signature check fails (rustls alerts decrypt_error).
    for (theirs, alert) in [(ca("other.test"), "UnknownCA"), (ca(TD), "DecryptError")] {
        for t in [
            Tls::new(valid(&ours, SERVER_ID), &theirs),
            Tls::new(valid(&ours, SERVER_ID), &theirs).tls12(),
        ] {
            let server = tcp_server(tls(t, &clock)).await;
            let r = probe(
                &server.address,
                exact(SERVER_ID),
                identity(&ours, valid(&ours, CLIENT_ID)),
                &clock,
                GENEROUS,
            )
            .await;
            assert_eq!(r.reason, Reason::UnknownCa, "{:?}", r.detail);
            let detail = r.detail.expect("detail");
            assert!(detail.contains(alert), "{detail}");
            assert!(
                r.peer.is_some(),
                "we verified the peer before it refused us"
            );
            assert!(server.seen().is_empty());
        }
    }
}

#[tokio::test]
async fn peer_refusing_our_expired_or_early_svid() {
    let clock = clock();
    let ca = ca(TD);
    let server = tcp_server(tls(Tls::new(valid(&ca, SERVER_ID), &ca), &clock)).await;

    let expired = leaf(&ca, CLIENT_ID, t0() - DAY, t0() - Duration::from_secs(60));
    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, expired),
        &clock,
        GENEROUS,
    )
    .await;
    assert_eq!(r.reason, Reason::Expired, "{:?}", r.detail);

    // rustls answers certificate_expired for a not-yet-valid certificate
    // too; our own leaf tells the two apart.
    let early = leaf(&ca, CLIENT_ID, t0() + HOUR, t0() + 2 * HOUR);
    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, early),
        &clock,
        GENEROUS,
    )
    .await;
    assert_eq!(r.reason, Reason::NotYetValid, "{:?}", r.detail);
}

#[tokio::test]
async fn no_client_cert_when_the_peer_requires_one() {
    let clock = clock();
    let ca = ca(TD);
    let server = tcp_server(tls(Tls::new(valid(&ca, SERVER_ID), &ca), &clock)).await;
    let verifier = Arc::new(Recorder::new(
        SpiffeServerVerifier::new(
            &[ca.der().to_vec()],
            &SpiffeId::parse(SERVER_ID).expect("id"),
        )
        .expect("verifier"),
    ));
    let cfg = ClientConfig::builder_with_details(
        Arc::new(rustls::crypto::ring::default_provider()),
        Arc::new(ClockTime(clock.clone())),
    )
    .with_protocol_versions(&[&TLS13])
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(verifier.clone())
    .with_no_client_auth();

    let wire = handshake(
        &target(server.address.clone(), exact(SERVER_ID)),
        Arc::new(cfg),
        GENEROUS,
    )
    .await;

    assert!(
        matches!(
            wire.end,
            End::Tls(rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
            ))
        ),
        "{:?}",
        wire.end
    );
    let (reason, _) = classify(&wire.end, None, t0(), GENEROUS);
    assert_eq!(reason, Reason::NoClientCert);
    assert!(verifier.take().is_some());
}

#[tokio::test]
async fn closed_port_and_missing_socket_are_refused() {
    let clock = clock();
    let ca = ca(TD);
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for address in [
        ProbeAddress::Tcp(closed),
        ProbeAddress::Unix(dir.path().join("absent.sock")),
    ] {
        let r = probe(
            &address,
            exact(SERVER_ID),
            identity(&ca, valid(&ca, CLIENT_ID)),
            &clock,
            GENEROUS,
        )
        .await;
        assert_eq!(r.reason, Reason::Refused, "{address}: {:?}", r.detail);
        assert!(r.peer.is_none());
        assert!(r.detail.expect("detail").starts_with("cannot connect"));
    }
}

#[tokio::test]
async fn silent_listener_times_out() {
    let clock = clock();
    let ca = ca(TD);
    let server = tcp_server(Behaviour::Silent).await;
    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        SHORT,
    )
    .await;
    assert_eq!(r.reason, Reason::Timeout, "{:?}", r.detail);
    assert!(r.detail.expect("detail").contains("no complete handshake"));
}

#[tokio::test]
async fn garbage_instead_of_a_server_hello_is_protocol() {
    let clock = clock();
    let ca = ca(TD);
    for server in [
        tcp_server(Behaviour::Send(b"HTTP/1.1 400 Bad Request\r\n\r\n")).await,
        unix_server(Behaviour::Send(b"SSH-2.0-OpenSSH_9.6\r\n")).await,
    ] {
        let r = probe(
            &server.address,
            exact(SERVER_ID),
            identity(&ca, valid(&ca, CLIENT_ID)),
            &clock,
            GENEROUS,
        )
        .await;
        assert_eq!(r.reason, Reason::Protocol, "{:?}", r.detail);
    }
}

#[tokio::test]
async fn partial_server_hello_then_stall_times_out() {
    let clock = clock();
    let ca = ca(TD);
    // A handshake record announcing 80 bytes, a ServerHello header, and
    // then nothing.
    let server = tcp_server(Behaviour::Send(&[
        0x16, 0x03, 0x03, 0x00, 0x50, 0x02, 0x00, 0x00,
    ]))
    .await;
    let r = probe(
        &server.address,
        exact(SERVER_ID),
        identity(&ca, valid(&ca, CLIENT_ID)),
        &clock,
        SHORT,
    )
    .await;
    assert_eq!(r.reason, Reason::Timeout, "{:?}", r.detail);
}

#[tokio::test]
async fn no_identity_is_not_probed() {
    let clock: Arc<dyn Clock> = clock();
    let none = Rotating::default();
    let address = ProbeAddress::Unix(PathBuf::from("/nonexistent/peer.sock"));
    let e = probe_once(&target(address, exact(SERVER_ID)), &none, &clock, SHORT)
        .await
        .expect_err("nothing to present");
    assert_eq!(e.kind(), "no_identity");
}

// === Mapping ===

#[test]
fn alert_and_error_mapping() {
    use AlertDescription as A;
    let ours = LeafInfo {
        spiffe_id: CLIENT_ID.into(),
        serial: "1".into(),
        not_before: t0() - HOUR,
        not_after: t0() + HOUR,
        issuer: String::new(),
    };
    let cases = [
        (A::UnknownCA, t0(), Reason::UnknownCa),
        (A::DecryptError, t0(), Reason::UnknownCa),
        (A::CertificateExpired, t0(), Reason::Expired),
        (A::CertificateExpired, t0() - DAY, Reason::NotYetValid),
        (A::CertificateRequired, t0(), Reason::NoClientCert),
        (A::AccessDenied, t0(), Reason::BadSpiffeId),
        (A::BadCertificate, t0(), Reason::UnknownCa),
        (A::BadCertificate, t0() + DAY, Reason::Expired),
        (A::CertificateUnknown, t0(), Reason::UnknownCa),
        (A::CertificateUnknown, t0() - DAY, Reason::NotYetValid),
        (A::HandshakeFailure, t0(), Reason::Protocol),
        (A::ProtocolVersion, t0(), Reason::Protocol),
    ];
    for (alert, now, want) in cases {
        assert_eq!(
            alert_reason(alert, Some(&ours), now),
            want,
            "{alert:?} at {now:?}"
        );
    }
    assert_eq!(
        tls_reason(&rustls::Error::InvalidCertificate(
            CertificateError::BadSignature
        )),
        Reason::UnknownCa
    );
    assert_eq!(
        tls_reason(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        )),
        Reason::UnknownCa
    );
    assert_eq!(
        tls_reason(&rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic
        )),
        Reason::Protocol
    );
    assert_eq!(
        tls_reason(&rustls::Error::NoCertificatesPresented),
        Reason::NoClientCert
    );
    let refused = io::Error::from(io::ErrorKind::ConnectionReset);
    assert_eq!(
        classify(&End::Io(refused), None, t0(), SHORT).0,
        Reason::Refused
    );
}

// === The sensor ===

struct Running {
    sensor: ProbeSensor,
    handle: Arc<ProbeHandle>,
    metrics: Arc<Metrics>,
    counter: Counter,
    wake: Arc<Notify>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn probe(&self) -> Arc<ProbeView> {
        tokio::time::timeout(WAIT, self.handle.probe_now_and_wait())
            .await
            .expect("probe within the wait")
    }

    async fn stop(self) {
        self.token.cancel();
        self.task.await.expect("task ends");
    }
}

fn settings(name: &str, address: ProbeAddress, authorize: Authorize) -> Settings {
    Settings {
        name: name.into(),
        address_text: address.to_string(),
        target: target(address, authorize),
        agent: "agent-a".into(),
        cert_file: Some("web-cert".into()),
        // Only the first probe and the test's requests.
        interval: Duration::from_secs(3600),
        timeout: GENEROUS,
    }
}

fn start(
    settings: Settings,
    identity: Arc<Rotating>,
    counter: Counter,
    clock: &Arc<ManualClock>,
) -> Running {
    let metrics = Arc::new(Metrics::new());
    let wake = Arc::new(Notify::new());
    let (sensor, task, handle) = build(
        settings,
        identity,
        counter.clone(),
        clock.clone(),
        metrics.clone(),
        wake.clone(),
    );
    let token = CancellationToken::new();
    let task = tokio::spawn(task.run(token.clone()));
    Running {
        sensor,
        handle,
        metrics,
        counter,
        wake,
        token,
        task,
    }
}

#[tokio::test]
async fn sensor_counts_publishes_and_exports() {
    let clock = clock();
    let ca = ca(TD);
    let server = tcp_server(tls(Tls::new(valid(&ca, SERVER_ID), &ca), &clock)).await;
    let id = Arc::new(Rotating::default());
    id.set(Some(identity(&ca, valid(&ca, CLIENT_ID))));
    let run = start(
        settings("web", server.address.clone(), exact(SERVER_ID)),
        id.clone(),
        Counter::default(),
        &clock,
    );

    let view = run.probe().await;
    assert_eq!(view.target, "web");
    assert_eq!(view.expected_id.as_deref(), Some(SERVER_ID));
    assert_eq!(view.cert_file.as_deref(), Some("web-cert"));
    let last = view.last.clone().expect("probed");
    assert_eq!(last.reason, Reason::Ok, "{:?}", last.detail);
    assert_eq!(view.last_peer.as_ref(), Some(&last));
    assert_eq!(view.updated_at, t0());
    tokio::time::timeout(WAIT, run.wake.notified())
        .await
        .expect("woken on the first outcome");
    let readings = run.sensor.observe().await.expect("observe");
    assert!(matches!(&readings[..], [Reading::Probe(v)] if v.target == "web"));
    assert_eq!(run.sensor.name(), "handshake_probe");

    let text = run.metrics.render();
    let ok = sample(
        &text,
        r#"spire_healer_handshakes_total{reason="ok",source="probe"}"#,
    )
    .expect("ok counted");
    assert!(ok >= 1.0);
    let probes = sample(
        &text,
        r#"spire_healer_handshake_probe_duration_seconds_count{target="web"}"#,
    )
    .expect("duration observed");
    assert_eq!(probes, ok);
    assert_eq!(
        sample(
            &text,
            r#"spire_healer_handshake_peer_expiration_timestamp_seconds{target="web"}"#
        ),
        Some((T0 + 3600) as f64)
    );
    let counted = run.counter.drain();
    let web = counted.get("web").expect("counted for the target");
    assert_eq!(web.get(Reason::Ok) as f64, ok);
    assert_eq!(web.source_names(), vec!["probe"]);

    // The peer goes away: refused, counted, reason changed, peer kept.
    server.stop().await;
    let view = run.probe().await;
    let last = view.last.as_ref().expect("probed");
    assert_eq!(last.reason, Reason::Refused, "{:?}", last.detail);
    assert_eq!(view.last_peer.as_ref().map(|p| p.reason), Some(Reason::Ok));
    let text = run.metrics.render();
    assert!(
        sample(
            &text,
            r#"spire_healer_handshakes_total{reason="refused",source="probe"}"#
        ) >= Some(1.0)
    );
    assert!(run.counter.drain()["web"].get(Reason::Refused) >= 1);
    // The handshake service level counts the same outcomes.
    let slo = |result: &str| {
        sample(
            &text,
            &format!(r#"spire_healer_slo_events_total{{result="{result}",slo="handshake"}}"#),
        )
    };
    assert!(slo("good") >= Some(1.0), "{:?}", slo("good"));
    assert!(slo("bad") >= Some(1.0), "{:?}", slo("bad"));
    run.stop().await;
}

#[tokio::test]
async fn rotation_between_probes_presents_the_new_svid() {
    let clock = clock();
    let ca = ca(TD);
    let server = unix_server(tls(Tls::new(valid(&ca, SERVER_ID), &ca), &clock)).await;
    let first = valid(&ca, CLIENT_ID);
    let second = valid(&ca, CLIENT_ID);
    let (s1, s2) = (format!("{:x}", first.2), format!("{:x}", second.2));
    let id = Arc::new(Rotating::default());
    id.set(Some(identity(&ca, first)));
    let run = start(
        settings("api", server.address.clone(), exact(SERVER_ID)),
        id.clone(),
        Counter::default(),
        &clock,
    );

    let view = run.probe().await;
    assert_eq!(view.last.as_ref().map(|r| r.reason), Some(Reason::Ok));
    assert_eq!(server.seen().last(), Some(&s1));

    id.set(Some(identity(&ca, second)));
    let view = run.probe().await;
    assert_eq!(view.last.as_ref().map(|r| r.reason), Some(Reason::Ok));
    assert_eq!(
        server.seen().last(),
        Some(&s2),
        "the rotated SVID is presented"
    );
    let text = run.metrics.render();
    assert!(
        sample(
            &text,
            r#"spire_healer_handshake_probe_duration_seconds_count{target="api"}"#
        ) >= Some(2.0)
    );
    run.stop().await;
}

#[tokio::test]
async fn sensor_without_identity_neither_probes_nor_counts() {
    let clock = clock();
    let server = tcp_server(Behaviour::Silent).await;
    let run = start(
        settings("web", server.address.clone(), exact(SERVER_ID)),
        Arc::new(Rotating::default()),
        Counter::default(),
        &clock,
    );

    let view = run.probe().await;
    let last = view.last.as_ref().expect("noted");
    assert!(
        last.detail
            .as_deref()
            .is_some_and(|d| d.starts_with("not probed")),
        "{:?}",
        last.detail
    );
    assert!(last.peer.is_none());
    assert!(view.last_peer.is_none());
    assert!(run.counter.drain().is_empty(), "nothing counted");
    let text = run.metrics.render();
    assert!(!text.contains("spire_healer_handshakes_total{"));
    assert!(!text.contains("spire_healer_handshake_probe_duration_seconds_count{"));
    assert!(
        sample(
            &text,
            r#"spire_healer_errors_total{kind="no_identity",stage="sensor"}"#
        ) >= Some(1.0)
    );
    run.stop().await;
}

#[tokio::test]
async fn refusal_by_the_counter_is_an_error() {
    let clock = clock();
    let ca = ca(TD);
    let server = tcp_server(tls(Tls::new(valid(&ca, SERVER_ID), &ca), &clock)).await;
    let id = Arc::new(Rotating::default());
    id.set(Some(identity(&ca, valid(&ca, CLIENT_ID))));
    let full = Counter::new(1);
    full.add("someone-else", Reason::Ok, 1, Source::Report)
        .expect("room for one");
    let run = start(
        settings("web", server.address.clone(), exact(SERVER_ID)),
        id,
        full,
        &clock,
    );

    let view = run.probe().await;
    assert_eq!(view.last.as_ref().map(|r| r.reason), Some(Reason::Ok));
    let text = run.metrics.render();
    assert!(
        sample(
            &text,
            r#"spire_healer_errors_total{kind="too_many_targets",stage="sensor"}"#
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &text,
            r#"spire_healer_handshakes_total{reason="ok",source="probe"}"#
        ) >= Some(1.0)
    );
    assert!(!run.counter.drain().contains_key("web"));
    run.stop().await;
}

// === Config ===

fn config(toml_text: &str) -> ProbeConfig {
    toml::from_str(toml_text).expect("parses")
}

const BASE: &str = r#"
name = "web"
address = "tcp://127.0.0.1:8443"
spiffe_id = "spiffe://example.test/web"
agent = "agent-a"
"#;

fn fields(c: &ProbeConfig) -> Vec<&'static str> {
    c.problems().into_iter().map(|(f, _)| f).collect()
}

#[test]
fn config_defaults_and_settings() {
    let c = config(BASE);
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    assert_eq!(c.interval, Duration::from_secs(10));
    assert_eq!(c.timeout, Duration::from_secs(3));
    let s = c.settings().expect("valid");
    assert_eq!(
        s.target.server_name,
        ServerName::try_from("localhost").expect("name")
    );
    assert_eq!(
        s.target.address,
        ProbeAddress::Tcp("127.0.0.1:8443".parse().expect("addr"))
    );
    assert_eq!(s.target.authorize, exact("spiffe://example.test/web"));

    let c = config(
        r#"
        name = "mesh"
        address = "web.internal:443"
        trust_domain = "example.test"
        agent = "agent-a"
        cert_file = "web"
        interval = "30s"
        timeout = "500ms"
        "#,
    );
    let s = c.settings().expect("valid");
    assert_eq!(
        s.target.server_name,
        ServerName::try_from("web.internal").expect("name")
    );
    assert_eq!(s.interval, Duration::from_secs(30));
    assert_eq!(s.timeout, Duration::from_millis(500));
    assert_eq!(s.cert_file.as_deref(), Some("web"));
}

#[test]
fn config_problems() {
    let both = config(&format!("{BASE}trust_domain = \"example.test\""));
    assert_eq!(fields(&both), ["spiffe_id"]);

    let neither = config(
        r#"
        name = ""
        address = "nowhere"
        agent = " "
        server_name = "not a name"
        cert_file = ""
        interval = "0s"
        "#,
    );
    assert_eq!(
        fields(&neither),
        [
            "name",
            "address",
            "server_name",
            "spiffe_id",
            "agent",
            "cert_file",
            "interval"
        ]
    );
    let err = neither.settings().expect_err("invalid");
    assert_eq!(err.problems.len(), 7);
    assert!(err.to_string().contains("address"));

    let root = config(&BASE.replace("spiffe://example.test/web", "spiffe://example.test"));
    assert_eq!(fields(&root), ["spiffe_id"]);

    let slow = config(&format!("{BASE}interval = \"1s\"\ntimeout = \"2s\""));
    assert_eq!(fields(&slow), ["timeout"]);
    let zero = config(&format!("{BASE}timeout = \"0s\""));
    assert_eq!(fields(&zero), ["timeout"]);

    assert!(toml::from_str::<ProbeConfig>(&format!("{BASE}colour = \"blue\"")).is_err());
    assert!(
        toml::from_str::<ProbeConfig>(&BASE.replace("spiffe://example.test/web", "http://x"))
            .is_err(),
        "SPIFFE IDs are parsed, not validated later"
    );
}

#[test]
fn addresses() {
    let ok = [
        (
            "tcp://127.0.0.1:1",
            ProbeAddress::Tcp("127.0.0.1:1".parse().expect("a")),
        ),
        (
            "127.0.0.1:2",
            ProbeAddress::Tcp("127.0.0.1:2".parse().expect("a")),
        ),
        ("[::1]:3", ProbeAddress::Tcp("[::1]:3".parse().expect("a"))),
        (
            "unix:///run/peer.sock",
            ProbeAddress::Unix("/run/peer.sock".into()),
        ),
        (
            "web.internal:443",
            ProbeAddress::Host {
                host: "web.internal".into(),
                port: 443,
            },
        ),
    ];
    for (text, want) in ok {
        assert_eq!(ProbeAddress::parse(text).expect(text), want);
    }
    assert_eq!(
        ProbeAddress::parse("web:1")
            .expect("host")
            .default_server_name(),
        "web"
    );
    assert_eq!(
        ProbeAddress::parse("unix:///a")
            .expect("unix")
            .default_server_name(),
        "localhost"
    );
    for bad in [
        "",
        "web",
        "web:0",
        "web:http",
        ":443",
        "::1:443",
        "tcp://localhost:1",
        "unix://relative",
        "under_score!:1",
    ] {
        let e = ProbeAddress::parse(bad).expect_err(bad);
        assert!(!e.kind().is_empty());
    }
}
