//! The mTLS transport over loopback TCP with certificates minted per test
//! by [`TestCa`], a trivial `Supervisor` service that answers `GetStatus`
//! with the caller it was told about, our client, and raw rustls clients
//! for what our client will not do (no certificate, reading the server's
//! leaf). Certificates are judged by the system clock, so they are minted
//! around it. Waits are for facts (a counter, a new SVID), bounded by
//! [`WAIT`].

use std::sync::Mutex as StdMutex;
use std::time::SystemTime;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::api::client::{ApiAddr, ClientError, ClientIdentity, SupervisorClient, TlsSettings};
use crate::clock::{Clock, SystemClock};
use crate::proto::healer::supervisor_server::{Supervisor, SupervisorServer};
use crate::proto::healer::{self as pb, GetStatusRequest};
use crate::proto::workload::{X509svid, X509svidResponse};
use crate::simulated::agent::FakeAgent;
use crate::simulated::issuer::{Flavor, TestCa};
use crate::spire_api::tls::{
    RawIdentity, SpiffeServerVerifier, StaticIdentity, client_config_with,
};

const TD: &str = "td.test";
const SERVER_ID: &str = "spiffe://td.test/healer";
const OPERATOR_ID: &str = "spiffe://td.test/operator";
const HOUR: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(20);
const CONNECT: Duration = Duration::from_secs(5);

fn now() -> SystemTime {
    SystemClock.now()
}

fn ca(td: &str) -> TestCa {
    TestCa::new(td, now() - HOUR, now() + 24 * HOUR).expect("CA")
}

/// An SVID of `ca` for `id`, valid from `from` to `to`, with `bundle`.
fn svid_between(
    ca: &TestCa,
    id: &str,
    from: SystemTime,
    to: SystemTime,
    flavor: Flavor,
    bundle: &[&TestCa],
) -> RawIdentity {
    let (leaf, key, _) = ca.issue(id, from, to, flavor).expect("SVID");
    (
        vec![leaf],
        key,
        bundle.iter().map(|c| c.der().to_vec()).collect(),
    )
}

fn svid(ca: &TestCa, id: &str) -> RawIdentity {
    svid_between(ca, id, now() - HOUR, now() + HOUR, Flavor::Valid, &[ca])
}

/// An identity source the test rotates.
#[derive(Default)]
struct Rotating(StdMutex<Option<RawIdentity>>);

impl Rotating {
    fn holding(id: RawIdentity) -> Arc<Self> {
        let r = Arc::new(Self::default());
        r.set(Some(id));
        r
    }

    fn set(&self, id: Option<RawIdentity>) {
        *self.0.lock().expect("identity lock") = id;
    }
}

impl IdentitySource for Rotating {
    fn current(&self) -> Option<RawIdentity> {
        self.0.lock().expect("identity lock").clone()
    }
}

// === A trivial service ===

/// Answers `GetStatus` with the caller's SPIFFE ID (as `version`), as the
/// acceptor told it; everything else is unimplemented.
struct WhoAmI;

fn who(req: &Request<GetStatusRequest>) -> Result<String, Status> {
    let info = req
        .extensions()
        .get::<TcpConnectInfo>()
        .ok_or_else(|| Status::unauthenticated("no TcpConnectInfo"))?;
    assert!(info.remote.ip().is_loopback(), "{info:?}");
    info.peer_spiffe_id
        .clone()
        .ok_or_else(|| Status::unauthenticated("no peer SPIFFE ID"))
}

#[tonic::async_trait]
impl Supervisor for WhoAmI {
    async fn report_handshakes(
        &self,
        _: Request<Streaming<pb::ReportHandshakesRequest>>,
    ) -> Result<Response<pb::ReportHandshakesResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(pb::GetStatusResponse {
            version: who(&req)?,
            ..Default::default()
        }))
    }
    async fn list_incidents(
        &self,
        _: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn get_incident(
        &self,
        _: Request<pb::GetIncidentRequest>,
    ) -> Result<Response<pb::GetIncidentResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn list_actions(
        &self,
        _: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn list_holds(
        &self,
        _: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn list_approvals(
        &self,
        _: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn list_audit(
        &self,
        _: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn approve(
        &self,
        _: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn reject(
        &self,
        _: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn pause(
        &self,
        _: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn resume(
        &self,
        _: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn set_dry_run(
        &self,
        _: Request<pb::SetDryRunRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn reset_demotion(
        &self,
        _: Request<pb::ResetDemotionRequest>,
    ) -> Result<Response<pb::ResetDemotionResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    type WatchStream = futures::stream::BoxStream<'static, Result<pb::WatchEvent, Status>>;
    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(""))
    }
}

// === Harness ===

struct Harness {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    served: JoinHandle<Result<(), TcpError>>,
}

impl Harness {
    fn start(identity: Arc<dyn IdentitySource>, tweak: impl FnOnce(&mut TcpConfig)) -> Self {
        let mut cfg = TcpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), "unix:///unused");
        tweak(&mut cfg);
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let (addr, fut) = serve_tcp(
            &cfg,
            identity,
            Routes::new(SupervisorServer::new(WhoAmI)),
            metrics.clone(),
            shutdown.clone(),
        )
        .expect("serve");
        Self {
            addr,
            metrics,
            shutdown,
            served: tokio::spawn(fut),
        }
    }

    fn api_addr(&self) -> ApiAddr {
        ApiAddr::Tcp {
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
        }
    }

    fn failures(&self, reason: HandshakeFailure) -> u64 {
        self.metrics
            .api_tls_handshake_failures_total
            .with_label_values(&[reason.as_str()])
            .get()
    }

    fn total_failures(&self) -> u64 {
        HandshakeFailure::ALL
            .iter()
            .map(|r| self.failures(*r))
            .sum()
    }

    /// Waits until `reason` was counted `n` times.
    async fn counted(&self, reason: HandshakeFailure, n: u64) {
        let wait = async {
            while self.failures(reason) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(WAIT, wait).await.unwrap_or_else(|_| {
            panic!(
                "{reason} not counted {n} time(s): {}",
                self.metrics.render()
            )
        });
        assert_eq!(self.failures(reason), n, "{reason}");
    }

    /// Our client presenting `identity`.
    async fn client(
        &self,
        identity: RawIdentity,
        server_id: Option<&str>,
    ) -> Result<SupervisorClient, ClientError> {
        let tls = TlsSettings {
            identity: ClientIdentity::Source(Arc::new(StaticIdentity(Some(identity)))),
            server_id: server_id.map(|s| SpiffeId::parse(s).expect("id")),
        };
        SupervisorClient::connect(&self.api_addr(), Some(&tls), CONNECT).await
    }

    /// Who the server says we are, over a fresh connection.
    async fn whoami(&self, identity: RawIdentity) -> Result<String, String> {
        let client = self
            .client(identity, None)
            .await
            .map_err(|e| e.to_string())?;
        client
            .rpc()
            .get_status(GetStatusRequest {})
            .await
            .map(|r| r.into_inner().version)
            .map_err(|s| s.to_string())
    }
}

/// A raw TLS connection presenting `identity` (none: no client
/// certificate) and trusting `bundle` for any ID of [`TD`]: the server's
/// leaf once the server's first bytes arrived (its verdict on us).
async fn raw(
    addr: SocketAddr,
    identity: Option<RawIdentity>,
    bundle: &TestCa,
) -> io::Result<Vec<u8>> {
    let verifier = Arc::new(
        SpiffeServerVerifier::authorizing(
            &[bundle.der().to_vec()],
            Authorize::TrustDomain(TrustDomain::parse(TD).expect("td")),
        )
        .expect("verifier"),
    );
    let mut cfg = match identity {
        Some((chain, key, _)) => client_config_with(chain, key, verifier, None).expect("config"),
        None => ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
    let mut first = [0u8; 1];
    if tls.read(&mut first).await? == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| io::Error::other("no server certificate"))?;
    Ok(leaf)
}

fn serial(leaf: &[u8]) -> String {
    crate::svid::leaf_info(leaf).expect("leaf").serial
}

// === Tests ===

#[tokio::test]
async fn an_svid_of_our_trust_domain_is_served_and_named_to_the_handler() {
    let ca = ca(TD);
    let server = Harness::start(Rotating::holding(svid(&ca, SERVER_ID)), |_| {});
    assert_eq!(
        server.whoami(svid(&ca, OPERATOR_ID)).await.as_deref(),
        Ok(OPERATOR_ID)
    );
    // The exact server ID is accepted; another is not trusted.
    let exact = server.client(svid(&ca, OPERATOR_ID), Some(SERVER_ID)).await;
    assert!(exact.is_ok(), "{exact:?}");
    let e = server
        .client(
            svid(&ca, OPERATOR_ID),
            Some("spiffe://td.test/someone-else"),
        )
        .await
        .expect_err("wrong server ID");
    assert!(matches!(e, ClientError::Untrusted { .. }), "{e:?}");
    assert_eq!(e.kind(), "unauthenticated");
    let text = e.to_string();
    assert!(
        text.contains(&server.api_addr().to_string()) && text.contains(SERVER_ID),
        "{text}"
    );
    // Our refusal of the server is the server's client_refused.
    server.counted(HandshakeFailure::ClientRefused, 1).await;
    assert_eq!(server.total_failures(), 1);
}

#[tokio::test]
async fn callers_without_a_valid_svid_are_refused_counted_and_the_loop_goes_on() {
    let foreign = ca("other.test");
    let ca = ca(TD);
    let server = Harness::start(Rotating::holding(svid(&ca, SERVER_ID)), |_| {});
    let refused = |r: Result<SupervisorClient, ClientError>, what: &str| match r {
        Err(e @ ClientError::Refused { .. }) => {
            assert_eq!(e.kind(), "unauthenticated");
            assert!(
                e.to_string().contains("refused our X509-SVID"),
                "{what}: {e}"
            );
        }
        other => panic!("{what}: {other:?}"),
    };

    // No certificate at all.
    let e = raw(server.addr, None, &ca)
        .await
        .expect_err("no client cert");
    assert!(e.to_string().contains("CertificateRequired"), "{e}");
    server.counted(HandshakeFailure::NoClientCert, 1).await;

    // A foreign trust domain's SVID (it trusts our server, we do not trust it).
    let (chain, key, _) = svid(&foreign, "spiffe://other.test/operator");
    let r = server
        .client((chain, key, vec![ca.der().to_vec()]), Some(SERVER_ID))
        .await;
    refused(r, "foreign CA");
    server.counted(HandshakeFailure::UnknownCa, 1).await;

    // Expired, by our own CA.
    let expired = svid_between(
        &ca,
        OPERATOR_ID,
        now() - 2 * HOUR,
        now() - HOUR,
        Flavor::Valid,
        &[&ca],
    );
    refused(server.client(expired, None).await, "expired");
    server.counted(HandshakeFailure::Expired, 1).await;

    // Not yet valid.
    let early = svid_between(
        &ca,
        OPERATOR_ID,
        now() + HOUR,
        now() + 2 * HOUR,
        Flavor::Valid,
        &[&ca],
    );
    refused(server.client(early, None).await, "not yet valid");
    server.counted(HandshakeFailure::NotYetValid, 1).await;

    // Signed by our CA, but naming another trust domain; and two URI SANs.
    let elsewhere = svid(&ca, "spiffe://other.test/operator");
    refused(server.client(elsewhere, Some(SERVER_ID)).await, "other TD");
    let two = svid_between(
        &ca,
        OPERATOR_ID,
        now() - HOUR,
        now() + HOUR,
        Flavor::TwoUriSans,
        &[&ca],
    );
    refused(server.client(two, None).await, "two URI SANs");
    server.counted(HandshakeFailure::BadSpiffeId, 2).await;

    // Not TLS at all.
    let mut plain = TcpStream::connect(server.addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest).await;
    server.counted(HandshakeFailure::Protocol, 1).await;

    // Nothing else was counted, and the accept loop serves on.
    assert_eq!(server.total_failures(), 7, "{}", server.metrics.render());
    assert_eq!(
        server.whoami(svid(&ca, OPERATOR_ID)).await.as_deref(),
        Ok(OPERATOR_ID)
    );
}

#[tokio::test]
async fn a_configured_trust_domain_replaces_ours() {
    let ca = ca(TD);
    let server = Harness::start(Rotating::holding(svid(&ca, SERVER_ID)), |c| {
        c.trust_domain = Some("ops.test".into());
    });
    let e = server
        .client(svid(&ca, OPERATOR_ID), None)
        .await
        .expect_err("our TD");
    assert!(matches!(e, ClientError::Refused { .. }), "{e:?}");
    server.counted(HandshakeFailure::BadSpiffeId, 1).await;
    // An ID of that domain, chaining to our bundle, is admitted.
    let ops = svid(&ca, "spiffe://ops.test/operator");
    let client = server.client(ops, Some(SERVER_ID)).await.expect("ops TD");
    let who = client
        .rpc()
        .get_status(GetStatusRequest {})
        .await
        .expect("status");
    assert_eq!(who.into_inner().version, "spiffe://ops.test/operator");
}

#[tokio::test]
async fn the_next_connection_presents_a_rotated_svid_and_trusts_a_rotated_bundle() {
    let old_ca = ca(TD);
    let identity = Rotating::holding(svid(&old_ca, SERVER_ID));
    let server = Harness::start(identity.clone(), |_| {});
    let first = raw(server.addr, Some(svid(&old_ca, OPERATOR_ID)), &old_ca)
        .await
        .expect("first");
    // A client connected before the rotation.
    let before = server
        .client(svid(&old_ca, OPERATOR_ID), None)
        .await
        .expect("client before");

    // A new SVID of the same CA: presented from the next handshake on.
    let rotated = svid(&old_ca, SERVER_ID);
    let rotated_serial = serial(&rotated.0[0]);
    identity.set(Some(rotated));
    let second = raw(server.addr, Some(svid(&old_ca, OPERATOR_ID)), &old_ca)
        .await
        .expect("second");
    assert_ne!(serial(&first), serial(&second));
    assert_eq!(serial(&second), rotated_serial);

    // A new CA: a client of it is refused until the bundle holds it.
    let new_ca = ca(TD);
    let e = raw(server.addr, Some(svid(&new_ca, OPERATOR_ID)), &old_ca)
        .await
        .expect_err("new CA not trusted yet");
    // SPIRE CAs share their subject name across rotations, as these do:
    // the old CA is tried and its signature does not verify.
    assert!(e.to_string().contains("received fatal alert"), "{e}");
    server.counted(HandshakeFailure::UnknownCa, 1).await;
    identity.set(Some(svid_between(
        &new_ca,
        SERVER_ID,
        now() - HOUR,
        now() + HOUR,
        Flavor::Valid,
        &[&old_ca, &new_ca],
    )));
    let third = raw(server.addr, Some(svid(&new_ca, OPERATOR_ID)), &new_ca)
        .await
        .expect("new CA client");
    assert!(crate::svid::inspect(SERVER_ID, &third, new_ca.der()).is_valid());
    // Old-CA callers are still trusted while the bundle holds both (and,
    // their bundle updated too, trust the new server SVID).
    let old_caller = svid_between(
        &old_ca,
        OPERATOR_ID,
        now() - HOUR,
        now() + HOUR,
        Flavor::Valid,
        &[&old_ca, &new_ca],
    );
    assert_eq!(server.whoami(old_caller).await.as_deref(), Ok(OPERATOR_ID));
    // The connection made before any rotation still works.
    let who = before
        .rpc()
        .get_status(GetStatusRequest {})
        .await
        .expect("status");
    assert_eq!(who.into_inner().version, OPERATOR_ID);
    assert_eq!(server.failures(HandshakeFailure::UnknownCa), 1);
}

#[tokio::test]
async fn without_an_svid_handshakes_fail_until_one_arrives() {
    let ca = ca(TD);
    let identity = Arc::new(Rotating::default());
    let server = Harness::start(identity.clone(), |_| {});
    let e = server
        .client(svid(&ca, OPERATOR_ID), None)
        .await
        .expect_err("no server SVID");
    assert_eq!(e.kind(), "unauthenticated", "{e:?}");
    server.counted(HandshakeFailure::NoIdentity, 1).await;
    identity.set(Some(svid(&ca, SERVER_ID)));
    assert_eq!(
        server.whoami(svid(&ca, OPERATOR_ID)).await.as_deref(),
        Ok(OPERATOR_ID)
    );
}

#[tokio::test]
async fn a_silent_client_times_out_while_others_are_served() {
    let ca = ca(TD);
    let server = Harness::start(Rotating::holding(svid(&ca, SERVER_ID)), |c| {
        c.handshake_timeout = Duration::from_millis(300);
    });
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    // Served while the silent one holds its handshake open.
    assert_eq!(
        server.whoami(svid(&ca, OPERATOR_ID)).await.as_deref(),
        Ok(OPERATOR_ID)
    );
    // Dropped at the deadline: the server closes it.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("closed by the server");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    server.counted(HandshakeFailure::Timeout, 1).await;
}

#[tokio::test]
async fn at_max_connections_the_next_caller_waits_for_a_free_slot() {
    let ca = ca(TD);
    let server = Harness::start(Rotating::holding(svid(&ca, SERVER_ID)), |c| {
        c.max_connections = 1;
        c.handshake_timeout = Duration::from_millis(300);
    });
    // The silent one takes the only slot until its handshake times out.
    let _silent = TcpStream::connect(server.addr).await.expect("connect");
    let who = server.whoami(svid(&ca, OPERATOR_ID)).await;
    assert_eq!(who.as_deref(), Ok(OPERATOR_ID));
    // It could only have been served once the slot was freed.
    assert_eq!(server.failures(HandshakeFailure::Timeout), 1);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let ca = ca(TD);
    let server = Harness::start(Rotating::holding(svid(&ca, SERVER_ID)), |_| {});
    assert!(server.whoami(svid(&ca, OPERATOR_ID)).await.is_ok());
    server.shutdown.cancel();
    let result = tokio::time::timeout(WAIT, server.served)
        .await
        .expect("stopped")
        .expect("joined");
    assert!(result.is_ok(), "{result:?}");
    let e = server_client_error(server.addr, &ca).await;
    assert_eq!(e.kind(), "unreachable", "{e:?}");
}

async fn server_client_error(addr: SocketAddr, ca: &TestCa) -> ClientError {
    let tls = TlsSettings {
        identity: ClientIdentity::Source(Arc::new(StaticIdentity(Some(svid(ca, OPERATOR_ID))))),
        server_id: None,
    };
    let addr = ApiAddr::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    SupervisorClient::connect(&addr, Some(&tls), CONNECT)
        .await
        .expect_err("stopped")
}

#[test]
fn config_problems_are_named() {
    let mut cfg = TcpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), "unix://relative");
    cfg.spiffe_id = Some("not-an-id".into());
    cfg.trust_domain = Some("spiffe://with-scheme".into());
    cfg.handshake_timeout = Duration::ZERO;
    cfg.max_connections = 0;
    let fields: Vec<&str> = cfg.problems().into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        [
            "workload_api",
            "spiffe_id",
            "trust_domain",
            "handshake_timeout",
            "max_connections"
        ]
    );
    let ok = TcpConfig::new(
        SocketAddr::from(([0, 0, 0, 0], 8443)),
        "unix:///run/spire/agent/public/api.sock",
    );
    assert!(ok.problems().is_empty());
    let parsed: TcpConfig = toml::from_str(
        "listen = \"127.0.0.1:8443\"\nworkload_api = \"unix:///a.sock\"\nhandshake_timeout = \"2s\"\n",
    )
    .expect("toml");
    assert_eq!(parsed.handshake_timeout, Duration::from_secs(2));
    assert_eq!(parsed.max_connections, 256);
    assert!(
        toml::from_str::<TcpConfig>("listen = \"127.0.0.1:1\"\nworkload_api = \"x\"\nport = 1\n")
            .is_err()
    );
}

// === Picking and watching our SVID ===

fn message(svids: &[(&str, &RawIdentity)]) -> X509svidResponse {
    X509svidResponse {
        svids: svids
            .iter()
            .map(|(id, (chain, key, bundle))| X509svid {
                spiffe_id: (*id).to_string(),
                x509_svid: chain.concat(),
                x509_svid_key: key.clone(),
                bundle: bundle.concat(),
                hint: String::new(),
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn the_named_or_first_valid_svid_is_picked() {
    let ca = ca(TD);
    let a = svid(&ca, SERVER_ID);
    let b = svid(&ca, OPERATOR_ID);
    let bad = svid_between(
        &ca,
        OPERATOR_ID,
        now(),
        now() + HOUR,
        Flavor::CaLeaf,
        &[&ca],
    );
    let msg = message(&[(SERVER_ID, &a), (OPERATOR_ID, &b)]);
    assert_eq!(pick_svid(&msg, None).expect("first"), a);
    let want = SpiffeId::parse(OPERATOR_ID).expect("id");
    assert_eq!(pick_svid(&msg, Some(&want)).expect("named"), b);
    // An invalid default is skipped for the next valid one.
    let msg = message(&[(OPERATOR_ID, &bad), (SERVER_ID, &a)]);
    assert_eq!(pick_svid(&msg, None).expect("valid"), a);
    match pick_svid(&msg, Some(&want)) {
        Err(PickError::Invalid { spiffe_id, .. }) => assert_eq!(spiffe_id, OPERATOR_ID),
        other => panic!("{other:?}"),
    }
    let msg = message(&[(SERVER_ID, &a)]);
    match pick_svid(&msg, Some(&want)) {
        Err(e @ PickError::NotOffered { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(OPERATOR_ID) && text.contains(SERVER_ID),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pick_svid(&message(&[]), None), Err(PickError::Empty));
    // The claimed ID must be the leaf's.
    let msg = message(&[(OPERATOR_ID, &a)]);
    assert!(matches!(
        pick_svid(&msg, None),
        Err(PickError::Invalid { .. })
    ));
}

#[tokio::test]
async fn served_from_a_workload_api_a_rotation_needs_no_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca(TD);
    let bundle = ca.der().to_vec();
    // Rotates at half-life: every second.
    let agent = FakeAgent::new(
        ca,
        SERVER_ID,
        Duration::from_secs(2),
        Arc::new(SystemClock),
        &dir.path().join("agent.sock"),
    );
    agent.start().expect("agent");
    let endpoint = Endpoint::Unix(agent.socket().to_path_buf());
    let identity = WorkloadIdentity::new(
        endpoint.clone(),
        Some(SpiffeId::parse(SERVER_ID).expect("id")),
    );
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(identity.clone().run(stop.clone()));
    let mut taken = identity.subscribe();
    let first_taken = *tokio::time::timeout(WAIT, taken.wait_for(|n| *n >= 1))
        .await
        .expect("first SVID")
        .expect("watcher alive");
    let server = Harness::start(identity.clone(), |_| {});

    // Our operator SVID, from the same CA via a one-shot fetch (the fake
    // agent serves one ID, so it is the server's: enough to authenticate).
    let ours = fetch_once(&endpoint, None, CONNECT)
        .await
        .expect("fetch once");
    let one = server.client(ours.clone(), None).await.expect("client");
    let status = one
        .rpc()
        .get_status(GetStatusRequest {})
        .await
        .expect("status");
    assert_eq!(status.into_inner().version, SERVER_ID);
    let presented = presented_leaf(server.addr, &ours, &bundle).await;
    // The agent rotates; the next connection presents the new SVID.
    tokio::time::timeout(WAIT, taken.wait_for(|n| *n > first_taken))
        .await
        .expect("rotated")
        .expect("watcher alive");
    let after = presented_leaf(server.addr, &ours, &bundle).await;
    assert_ne!(serial(&presented), serial(&after));
    let current = identity.current().expect("current");
    assert_eq!(current.0[0], after, "the leaf presented is the latest");

    stop.cancel();
    watcher.await.expect("watcher stopped");
}

/// The leaf the server presents to a client holding `ours`.
async fn presented_leaf(addr: SocketAddr, ours: &RawIdentity, bundle: &[u8]) -> Vec<u8> {
    let verifier = Arc::new(
        SpiffeServerVerifier::authorizing(
            &[bundle.to_vec()],
            Authorize::TrustDomain(TrustDomain::parse(TD).expect("td")),
        )
        .expect("verifier"),
    );
    let (chain, key, _) = ours.clone();
    let mut cfg = client_config_with(chain, key, verifier, None).expect("config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let mut first = [0u8; 1];
    assert_eq!(tls.read(&mut first).await.expect("settings"), 1);
    tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
}

#[tokio::test]
async fn a_one_shot_fetch_names_the_endpoint_and_the_cause() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("agent.sock");
    let missing = Endpoint::Unix(dir.path().join("absent.sock"));
    let e = fetch_once(&missing, None, Duration::from_secs(1))
        .await
        .expect_err("no agent");
    assert!(!e.is_refusal(), "{e}");
    assert!(e.to_string().contains("absent.sock"), "{e}");

    let agent = FakeAgent::new(ca(TD), SERVER_ID, HOUR, Arc::new(SystemClock), &socket);
    agent.start().expect("agent");
    let endpoint = Endpoint::Unix(socket.clone());
    let want = SpiffeId::parse(OPERATOR_ID).expect("id");
    let e = fetch_once(&endpoint, Some(&want), CONNECT)
        .await
        .expect_err("not ours");
    assert!(e.is_refusal(), "{e}");
    assert!(e.to_string().contains(OPERATOR_ID), "{e}");
    agent.set_no_identity(true);
    let e = fetch_once(&endpoint, None, CONNECT)
        .await
        .expect_err("refused");
    assert!(matches!(e, IdentityError::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("agent.sock"), "{e}");
}
