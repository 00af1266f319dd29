use super::*;
use crate::svid_files::tests::{TD, issue, test_ca, write_svid};
use crate::svid_files::{KEY_FILE, SVID_FILE};
use spire_healer::simulated::issuer::TestCa;

const SERVER_ID: &str = "spiffe://healer.test/peer";
const LIMIT: Duration = Duration::from_secs(5);

/// A client identity minted by `issuer`, trusting `server_ca`.
fn client(issuer: &TestCa, spiffe_id: &str, server_ca: &TestCa) -> RawIdentity {
    let (leaf, key, _) = issue(issuer, spiffe_id);
    (vec![leaf], key, vec![server_ca.der().to_vec()])
}

fn server_id() -> SpiffeId {
    SpiffeId::parse(SERVER_ID).unwrap()
}

/// The client learns of the refusal as a fatal TLS alert.
fn assert_refused(result: Result<PeerAnswer, PeerError>) {
    let err = result.unwrap_err();
    let text = spire_healer::sensors::server_api::error_chain(&err);
    assert_eq!(err.kind(), "io", "{text}");
    assert!(text.contains("fatal alert"), "{text}");
}

struct Running {
    peer: Arc<Peer>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(dir: &Path, listen: &str, on_hup: OnHup) -> Running {
        let listen = parse_listen(listen).unwrap();
        let peer = Arc::new(Peer::bind(dir, &listen, on_hup).await.unwrap());
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let (peer, token) = (peer.clone(), token.clone());
            async move { peer.serve(token).await }
        });
        Running { peer, token, task }
    }

    async fn ask(&self, identity: RawIdentity) -> Result<PeerAnswer, PeerError> {
        ask_serial(self.peer.local_endpoint(), identity, &server_id(), LIMIT).await
    }

    async fn stop(self) {
        self.token.cancel();
        timeout(LIMIT, self.task).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn serves_the_loaded_serial_to_a_client_of_its_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = test_ca(TD);
    let serial = write_svid(tmp.path(), &ca, SERVER_ID);
    let running = Running::start(tmp.path(), "127.0.0.1:0", OnHup::Ignore).await;
    assert!(matches!(running.peer.local_endpoint(), Endpoint::Tcp(a) if a.port() != 0));
    assert_eq!(running.peer.serial(), serial);
    assert_eq!(running.peer.spiffe_id(), SERVER_ID);

    let answer = running
        .ask(client(&ca, "spiffe://healer.test/client", &ca))
        .await
        .unwrap();
    assert_eq!(answer.serial, serial);
    assert_eq!(answer.certificate_serial, serial);
    running.stop().await;
}

#[tokio::test]
async fn rejects_a_client_from_another_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = test_ca(TD);
    write_svid(tmp.path(), &ca, SERVER_ID);
    let running = Running::start(tmp.path(), "127.0.0.1:0", OnHup::Ignore).await;
    let stranger = test_ca(TD);
    let refused = running
        .ask(client(&stranger, "spiffe://healer.test/client", &ca))
        .await;
    assert_refused(refused);
    // The peer keeps serving others.
    running
        .ask(client(&ca, "spiffe://healer.test/client", &ca))
        .await
        .unwrap();
    running.stop().await;
}

#[tokio::test]
async fn rejects_a_client_of_another_trust_domain_even_from_the_same_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = test_ca(TD);
    write_svid(tmp.path(), &ca, SERVER_ID);
    let running = Running::start(tmp.path(), "127.0.0.1:0", OnHup::Ignore).await;
    let refused = running
        .ask(client(&ca, "spiffe://other.test/client", &ca))
        .await;
    assert_refused(refused);
    running.stop().await;
}

#[tokio::test]
async fn on_hangup_reload_serves_the_new_serial_while_ignore_keeps_the_old() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = test_ca(TD);
    let old = write_svid(tmp.path(), &ca, SERVER_ID);
    let ignore = Running::start(tmp.path(), "127.0.0.1:0", OnHup::Ignore).await;
    let reload = Running::start(tmp.path(), "127.0.0.1:0", OnHup::Reload).await;
    let me = || client(&ca, "spiffe://healer.test/client", &ca);

    let new = write_svid(tmp.path(), &ca, SERVER_ID);
    assert_ne!(old, new);
    // Without a hangup neither looks at the files again.
    assert_eq!(reload.ask(me()).await.unwrap().serial, old);

    assert_eq!(
        ignore.peer.hangup().unwrap(),
        Hangup::Ignored {
            serial: old.clone()
        }
    );
    assert_eq!(
        reload.peer.hangup().unwrap(),
        Hangup::Reloaded {
            serial: new.clone()
        }
    );
    assert_eq!(ignore.ask(me()).await.unwrap().serial, old);
    let answer = reload.ask(me()).await.unwrap();
    assert_eq!(answer.serial, new);
    assert_eq!(answer.certificate_serial, new);

    // A reload that fails keeps the certificate in service.
    std::fs::write(tmp.path().join(SVID_FILE), "garbage").unwrap();
    assert!(reload.peer.hangup().is_err());
    assert_eq!(reload.ask(me()).await.unwrap().serial, new);

    ignore.stop().await;
    reload.stop().await;
}

#[tokio::test]
async fn serves_over_a_unix_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = test_ca(TD);
    let serial = write_svid(tmp.path(), &ca, SERVER_ID);
    let sock = tmp.path().join("peer.sock");
    let running = Running::start(
        tmp.path(),
        &format!("unix://{}", sock.display()),
        OnHup::Ignore,
    )
    .await;
    assert_eq!(running.peer.local_endpoint(), &Endpoint::Unix(sock));
    let answer = running
        .ask(client(&ca, "spiffe://healer.test/client", &ca))
        .await
        .unwrap();
    assert_eq!(answer.serial, serial);
    running.stop().await;
}

#[tokio::test]
async fn refuses_to_start_on_missing_or_invalid_files() {
    let listen = parse_listen("127.0.0.1:0").unwrap();
    let bind = |dir: PathBuf| {
        let listen = listen.clone();
        async move { Peer::bind(&dir, &listen, OnHup::Ignore).await }
    };
    let tmp = tempfile::tempdir().unwrap();
    let err = bind(tmp.path().to_path_buf()).await.unwrap_err();
    assert_eq!(err.kind(), "files", "{err}");

    // A key that belongs to another certificate.
    let ca = test_ca(TD);
    let other = tempfile::tempdir().unwrap();
    write_svid(other.path(), &ca, SERVER_ID);
    write_svid(tmp.path(), &ca, SERVER_ID);
    std::fs::copy(other.path().join(KEY_FILE), tmp.path().join(KEY_FILE)).unwrap();
    let err = bind(tmp.path().to_path_buf()).await.unwrap_err();
    assert_eq!(err.kind(), "tls", "{err}");

    // A chain that does not lead to the bundle.
    write_svid(tmp.path(), &test_ca(TD), SERVER_ID);
    std::fs::copy(
        other.path().join(super::super::svid_files::BUNDLE_FILE),
        tmp.path().join(super::super::svid_files::BUNDLE_FILE),
    )
    .unwrap();
    let err = bind(tmp.path().to_path_buf()).await.unwrap_err();
    assert_eq!(err.kind(), "invalid", "{err}");
}

#[test]
fn listen_addresses_parse() {
    assert_eq!(
        parse_listen("127.0.0.1:0").unwrap(),
        Endpoint::Tcp("127.0.0.1:0".parse().unwrap())
    );
    assert_eq!(
        parse_listen("tcp://127.0.0.1:8443").unwrap(),
        Endpoint::Tcp("127.0.0.1:8443".parse().unwrap())
    );
    assert_eq!(
        parse_listen("unix:///tmp/p.sock").unwrap(),
        Endpoint::Unix("/tmp/p.sock".into())
    );
    assert!(parse_listen("localhost:1").is_err());
    assert!(parse_listen("unix://relative").is_err());
}
