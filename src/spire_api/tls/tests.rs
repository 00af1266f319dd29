use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::clock::{Clock, SystemClock};
use crate::simulated::issuer::{Flavor, TestCa};
use crate::spire_api::ServerAdminClient;

const TD: &str = "td";
const SERVER_ID: &str = "spiffe://td/spire/server";
const CLIENT_ID: &str = "spiffe://td/healer-admin";
const HOUR: Duration = Duration::from_secs(3600);

fn now() -> SystemTime {
    SystemClock.now()
}

fn ca() -> TestCa {
    TestCa::new(TD, now() - HOUR, now() + 24 * HOUR).expect("CA")
}

/// (leaf DER, PKCS#8) valid around now.
fn svid(ca: &TestCa, id: &str) -> (Vec<u8>, Vec<u8>) {
    let (leaf, key, _) = ca
        .issue(id, now() - HOUR, now() + HOUR, Flavor::Valid)
        .expect("SVID");
    (leaf, key)
}

fn identity(ca: &TestCa, id: &str) -> RawIdentity {
    let (leaf, key) = svid(ca, id);
    (vec![leaf], key, vec![ca.der().to_vec()])
}

fn verify(
    bundle: &TestCa,
    leaf: &[u8],
    expected: &str,
    at: SystemTime,
) -> Result<(), rustls::Error> {
    let v = SpiffeServerVerifier::new(
        &[bundle.der().to_vec()],
        &SpiffeId::parse(expected).expect("id"),
    )
    .expect("verifier");
    let at = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).expect("time"));
    v.verify_server_cert(
        &CertificateDer::from(leaf),
        &[],
        &ServerName::try_from("ignored.example").expect("name"),
        &[],
        at,
    )
    .map(|_| ())
}

#[test]
fn verifier_accepts_the_server_svid_whatever_the_dns_name() {
    let ca = ca();
    let (leaf, _) = svid(&ca, SERVER_ID);
    verify(&ca, &leaf, SERVER_ID, now()).expect("accepted");
}

#[test]
fn verifier_rejects_another_spiffe_id() {
    let ca = ca();
    let (leaf, _) = svid(&ca, "spiffe://td/not-the-server");
    let err = verify(&ca, &leaf, SERVER_ID, now()).expect_err("rejected");
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
            let w = o.0.downcast_ref::<WrongPeerId>().expect("WrongPeerId");
            assert_eq!(w.side, "server");
            assert_eq!(w.found, vec!["spiffe://td/not-the-server".to_string()]);
            assert_eq!(w.expected, SERVER_ID);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn verifier_rejects_two_uri_sans_even_if_one_matches() {
    let ca = ca();
    let (leaf, _, _) = ca
        .issue(SERVER_ID, now() - HOUR, now() + HOUR, Flavor::TwoUriSans)
        .expect("SVID");
    let err = verify(&ca, &leaf, SERVER_ID, now()).expect_err("rejected");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Other(_))
        ),
        "{err:?}"
    );
}

#[test]
fn verifier_rejects_a_foreign_ca() {
    let ours = ca();
    let foreign = ca();
    let (leaf, _) = svid(&foreign, SERVER_ID);
    let err = verify(&ours, &leaf, SERVER_ID, now()).expect_err("rejected");
    assert!(
        matches!(
            err,
            // Same subject DN as ours: webpki tries our CA and the
            // signature fails; another DN finds no issuer at all.
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            )
        ),
        "{err:?}"
    );
}

#[test]
fn verifier_rejects_an_expired_leaf() {
    let ca = ca();
    let (leaf, _, _) = ca
        .issue(SERVER_ID, now() - 3 * HOUR, now() - HOUR, Flavor::Valid)
        .expect("SVID");
    let err = verify(&ca, &leaf, SERVER_ID, now()).expect_err("rejected");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
    // The same leaf was fine while valid.
    verify(&ca, &leaf, SERVER_ID, now() - 2 * HOUR).expect("valid then");
}

#[test]
fn verifier_needs_a_usable_bundle() {
    let err = SpiffeServerVerifier::new(
        &[b"junk".to_vec()],
        &SpiffeId::parse(SERVER_ID).expect("id"),
    )
    .expect_err("no roots");
    assert_eq!(err.kind(), Some("no_identity"));
}

#[test]
fn default_server_id_is_the_trust_domains_spire_server() {
    let ca = ca();
    let (leaf, _) = svid(&ca, CLIENT_ID);
    assert_eq!(default_server_id(&leaf).expect("id").as_str(), SERVER_ID);
}

/// A TLS server requiring a client certificate from `ca`, presenting a
/// `server_id` SVID of `ca`; reports the client's leaf of each handshake.
async fn tls_server(
    ca: &TestCa,
    server_id: &str,
) -> (
    SocketAddr,
    tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.der().to_vec()))
        .expect("root");
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("client verifier");
    let (leaf, key) = svid(ca, server_id);
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            vec![CertificateDer::from(leaf)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let r = match acceptor.accept(tcp).await {
                Ok(tls) => {
                    let (_, conn) = tls.get_ref();
                    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
                    conn.peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec())
                        .ok_or_else(|| "no client certificate".to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(r).await;
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn full_handshake_presents_our_svid() {
    let ca = ca();
    let (addr, mut seen) = tls_server(&ca, SERVER_ID).await;
    let id = identity(&ca, CLIENT_ID);
    let our_leaf = id.0[0].clone();
    let connector = MtlsConnector::new(addr, None, Arc::new(StaticIdentity(Some(id))));
    connector.connect().await.expect("handshake");
    let peer = seen.recv().await.expect("server saw a handshake");
    assert_eq!(peer.expect("client cert"), our_leaf);
}

#[tokio::test]
async fn the_identity_is_read_per_connection() {
    let ca = ca();
    let (addr, mut seen) = tls_server(&ca, SERVER_ID).await;
    struct Rotating(std::sync::Mutex<Vec<RawIdentity>>);
    impl IdentitySource for Rotating {
        fn current(&self) -> Option<RawIdentity> {
            self.0.lock().expect("lock").pop()
        }
    }
    let first = identity(&ca, CLIENT_ID);
    let second = identity(&ca, CLIENT_ID);
    let leaves = (first.0[0].clone(), second.0[0].clone());
    let source = Arc::new(Rotating(std::sync::Mutex::new(vec![second, first])));
    let connector = MtlsConnector::new(addr, None, source);
    connector.connect().await.expect("first");
    connector.connect().await.expect("second");
    assert_eq!(seen.recv().await.expect("1").expect("cert"), leaves.0);
    assert_eq!(seen.recv().await.expect("2").expect("cert"), leaves.1);
}

#[tokio::test]
async fn no_identity_fails_before_dialling() {
    let ca = ca();
    let (addr, _seen) = tls_server(&ca, SERVER_ID).await;
    let connector = MtlsConnector::new(addr, None, Arc::new(StaticIdentity(None)));
    let err = connector.connect().await.expect_err("no identity");
    assert_eq!(err.kind(), Some("no_identity"));

    let client = ServerAdminClient::tcp_mtls(
        addr,
        None,
        Arc::new(StaticIdentity(None)),
        Duration::from_secs(2),
    )
    .expect("client");
    let err = client.get_bundle().await.expect_err("no identity");
    assert_eq!(err.kind(), "no_identity", "{err}");
}

#[tokio::test]
async fn a_server_with_another_id_is_bad_server_id() {
    let ca = ca();
    let (addr, _seen) = tls_server(&ca, "spiffe://td/impostor").await;
    let id = Arc::new(StaticIdentity(Some(identity(&ca, CLIENT_ID))));
    let err = MtlsConnector::new(addr, None, id.clone())
        .connect()
        .await
        .expect_err("wrong server");
    assert_eq!(err.kind(), Some("bad_server_id"), "{err}");

    let client = ServerAdminClient::tcp_mtls(addr, None, id.clone(), Duration::from_secs(2))
        .expect("client");
    let err = client
        .list_agents_paged(10, 1)
        .await
        .expect_err("wrong server");
    assert_eq!(err.kind(), "bad_server_id", "{err}");

    // Naming the impostor explicitly makes it acceptable.
    MtlsConnector::new(
        addr,
        Some(SpiffeId::parse("spiffe://td/impostor").expect("id")),
        id,
    )
    .connect()
    .await
    .expect("explicit server id");
}

#[tokio::test]
async fn a_server_from_a_foreign_ca_is_tls() {
    let ours = ca();
    let foreign = ca();
    let (addr, _seen) = tls_server(&foreign, SERVER_ID).await;
    let id = Arc::new(StaticIdentity(Some(identity(&ours, CLIENT_ID))));
    let client =
        ServerAdminClient::tcp_mtls(addr, None, id, Duration::from_secs(2)).expect("client");
    let err = client.get_bundle().await.expect_err("untrusted server");
    assert_eq!(err.kind(), "tls", "{err}");
}

#[test]
fn an_invalid_server_id_is_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let _guard = rt.enter();
    let err = ServerAdminClient::tcp_mtls(
        "127.0.0.1:1".parse().expect("addr"),
        Some("not a spiffe id"),
        Arc::new(StaticIdentity(None)),
        Duration::from_secs(1),
    )
    .expect_err("invalid");
    assert_eq!(err.kind(), "invalid_spiffe_id");
}
