//! The sensor against the simulated server ([`FakeServer`]) and paths that
//! are not servers. Every test asserts the sensor's error metrics.

use crate::sensors::Sensor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::{Clock, SystemClock};
use crate::model::ServerView;
use crate::simulated::server::{FakeServer, PagingFault};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::sample;

const SERVER: &str = "s1";
/// Upper bound for any state change we wait for.
const WAIT: Duration = Duration::from_secs(10);

fn settings(socket: &Path) -> Settings {
    Settings {
        poll_interval: Duration::from_millis(50),
        timeout: Duration::from_millis(300),
        page_size: 4,
        ..Settings::new(SERVER, socket)
    }
}

fn fake(dir: &TempDir, agents: usize) -> FakeServer {
    let server = FakeServer::new(
        "example.org",
        Arc::new(SystemClock),
        &dir.path().join("api.sock"),
    )
    .expect("fake server");
    server.add_fleet(agents, SystemClock.now() + Duration::from_secs(3600));
    server.start().expect("bind");
    server
}

struct Running {
    sensor: ServerApiSensor,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    token: CancellationToken,
    task: Option<JoinHandle<()>>,
}

fn start(settings: Settings) -> Running {
    let metrics = Arc::new(Metrics::new());
    let wake = Arc::new(Notify::new());
    let (sensor, task) = build(
        settings,
        Arc::new(SystemClock),
        metrics.clone(),
        wake.clone(),
    );
    let token = CancellationToken::new();
    let task = tokio::spawn(task.run(token.clone()));
    Running {
        sensor,
        metrics,
        wake,
        token,
        task: Some(task),
    }
}

impl Running {
    async fn wait_for(&self, what: &str, done: impl Fn(&ServerView) -> bool) -> Arc<ServerView> {
        crate::sensors::wait_for_view(self.sensor.subscribe(), what, WAIT, done).await
    }

    fn errors(&self, kind: &str) -> f64 {
        sample(
            &self.metrics.render(),
            &format!(r#"spire_healer_errors_total{{kind="{kind}",stage="sensor"}}"#),
        )
        .unwrap_or(0.0)
    }

    fn all_errors(&self) -> f64 {
        self.metrics
            .render()
            .lines()
            .filter(|l| {
                l.starts_with("spire_healer_errors_total{") && l.contains(r#"stage="sensor""#)
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    async fn stop(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .expect("the task ends promptly on shutdown")
                .expect("no panic");
        }
    }
}

#[tokio::test]
async fn polls_a_healthy_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = fake(&dir, 10);
    let r = start(settings(&dir.path().join("api.sock")));
    assert_eq!(r.sensor.name(), "server_api");
    assert_eq!(r.sensor.instance(), SERVER);
    let v = r.wait_for("reachable", |v| v.reachable).await;
    assert_eq!(v.server, SERVER);
    assert_eq!(v.last_error, None);
    assert_eq!(v.agents_count, 10);
    assert_eq!(v.agents.len(), 10);
    assert!(!v.agents_truncated);
    assert_eq!(v.agents[3].spiffe_id, server.agent_id(3));
    assert_eq!(v.bundle.len(), 1);
    assert_eq!(
        v.bundle[0].fingerprint,
        hex::encode(Sha256::digest(server.ca_der()))
    );
    assert_eq!(v.bundle_sequence, 1);
    assert!(v.svid_expires_at.is_some());
    assert!(v.since <= v.updated_at);

    // It keeps polling: a ban shows up, and the loop is woken for it.
    // Drain a wake-up stored by earlier polls.
    let _ = tokio::time::timeout(Duration::from_millis(200), r.wake.notified()).await;
    let admin = crate::spire_api::ServerAdminClient::new(
        &dir.path().join("api.sock"),
        Duration::from_secs(1),
    )
    .expect("client");
    admin.ban_agent(&server.agent_id(5)).await.expect("ban");
    tokio::time::timeout(WAIT, r.wake.notified())
        .await
        .expect("woken on change");
    let v = r
        .wait_for("banned", |v| v.agents.iter().any(|a| a.banned))
        .await;
    assert_eq!(v.agents.iter().filter(|a| a.banned).count(), 1);
    assert_eq!(r.all_errors(), 0.0);
    // Every poll is timed where it happens (not the loop's read of it).
    let polls = sample(
        &r.metrics.render(),
        r#"spire_healer_sensor_duration_seconds_count{sensor="server_api"}"#,
    );
    assert!(polls.is_some_and(|n| n >= 2.0), "{polls:?}");
    r.stop().await;
}

#[tokio::test]
async fn server_loss_keeps_the_last_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = fake(&dir, 6);
    let r = start(settings(&dir.path().join("api.sock")));
    let up = r.wait_for("reachable", |v| v.reachable).await;

    server.stop();
    let down = r.wait_for("unreachable", |v| !v.reachable).await;
    assert_eq!(down.last_error.as_deref(), Some("socket_missing"));
    assert!(down.since > up.since);
    assert_eq!(down.agents, up.agents, "previous agents kept");
    assert_eq!(down.bundle, up.bundle, "previous bundle kept");
    assert_eq!(down.agents_count, 6);
    // `updated_at` keeps moving while `since` stays.
    let later = r
        .wait_for("refreshed", |v| v.updated_at > down.updated_at)
        .await;
    assert_eq!(later.since, down.since);
    assert!(r.errors("socket_missing") >= 1.0);
    // Availability: one event per poll, good while answered, bad since.
    let slo = |result: &str| {
        sample(
            &r.metrics.render(),
            &format!(
                r#"spire_healer_slo_events_total{{result="{result}",slo="server_availability"}}"#
            ),
        )
        .unwrap_or(0.0)
    };
    assert!(slo("good") >= 1.0, "{}", slo("good"));
    assert!(slo("bad") >= 2.0, "{}", slo("bad"));

    server.start().expect("rebind");
    let back = r.wait_for("reachable again", |v| v.reachable).await;
    assert_eq!(back.last_error, None);
    assert!(back.since > down.since);
    r.stop().await;
}

#[tokio::test]
async fn hung_server_is_a_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = fake(&dir, 3);
    let r = start(settings(&dir.path().join("api.sock")));
    r.wait_for("reachable", |v| v.reachable).await;
    server.set_hang(true);
    let v = r.wait_for("unreachable", |v| !v.reachable).await;
    assert_eq!(v.last_error.as_deref(), Some("timeout"));
    assert_eq!(v.agents.len(), 3);
    assert!(r.errors("timeout") >= 1.0);
    // Shutdown while a poll hangs ends the task at once.
    r.stop().await;
}

#[tokio::test]
async fn endless_paging_is_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = fake(&dir, 5);
    server.set_paging_fault(Some(PagingFault::Endless));
    let r = start(Settings {
        max_pages: 7,
        ..settings(&dir.path().join("api.sock"))
    });
    let v = r.wait_for("reachable", |v| v.reachable).await;
    assert!(v.agents_truncated);
    assert_eq!(v.agents.len(), 7 * 4);
    assert_eq!(r.all_errors(), 0.0);
    r.stop().await;
}

#[tokio::test]
async fn paths_that_are_not_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a socket").expect("write");
    for path in [file.as_path(), dir.path()] {
        let r = start(settings(path));
        let v = r.wait_for("failed", |v| v.last_error.is_some()).await;
        assert!(!v.reachable);
        assert_eq!(v.last_error.as_deref(), Some("not_a_socket"));
        assert!(r.errors("not_a_socket") >= 1.0);
        r.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn polls_on_its_interval() {
    // Time moves only when the test advances it, also while polls wait
    // on the socket.
    let _held = crate::sensors::HoldTime::new(WAIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = fake(&dir, 1);
    let r = start(settings(&dir.path().join("api.sock")));
    r.wait_for("reachable", |v| v.reachable).await;
    let mut published = r.sensor.subscribe();
    published.mark_unchanged();
    let before = server.list_calls();
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(50)).await;
        tokio::time::timeout(WAIT, published.changed())
            .await
            .expect("a poll is due every 50 ms")
            .expect("the sensor task runs");
    }
    let polls = server.list_calls() - before;
    // 50 ms interval, two ListAgents calls per poll (page + empty end).
    assert!((6..=24).contains(&polls), "{polls} calls in 500 ms");
    r.stop().await;
}

// === The agent-facing address check ===

/// A TLS listener like SPIRE's agent port: a self-signed certificate (the
/// check does not validate it), ALPN `h2`, no client certificate asked.
/// Returns its address and the ALPN protocols the server negotiated.
async fn tls_listener() -> (String, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(crate::spire_api::tls::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let alpn = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = alpn.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await
                    && let Some(p) = tls.get_ref().1.alpn_protocol()
                {
                    seen.lock().expect("lock").push(p.to_vec());
                }
            });
        }
    });
    (addr, alpn)
}

/// A listener that accepts each connection and closes it at once (a
/// partition that resets, or a proxy cut from its upstream).
async fn closing_listener() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
        }
    });
    addr
}

/// A listener that accepts and never answers (a black-holing partition
/// past the connect).
async fn silent_listener() -> (String, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            // Held open by the test, never read.
            if tx.send(tcp).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn address_check_completes_a_tls_handshake_offering_h2() {
    let (addr, alpn) = tls_listener().await;
    probe_address(&addr, Duration::from_secs(5))
        .await
        .expect("handshake with a self-signed server");
    // The server side finishes its half after ours: wait for the fact.
    let deadline = tokio::time::Instant::now() + WAIT;
    while alpn.lock().expect("lock").is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*alpn.lock().expect("lock"), vec![b"h2".to_vec()]);
    // By host name too (SNI sent, name not checked against the certificate).
    let port = addr.rsplit_once(':').expect("port").1;
    probe_address(&format!("localhost:{port}"), Duration::from_secs(5))
        .await
        .expect("handshake by name");
}

#[tokio::test]
async fn address_check_classifies_failures() {
    let closing = closing_listener().await;
    let e = probe_address(&closing, Duration::from_secs(5))
        .await
        .expect_err("closed at once");
    assert_eq!(e.kind(), "refused", "{e}");

    // Nothing listening.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let free_addr = free.local_addr().expect("addr").to_string();
    drop(free);
    let e = probe_address(&free_addr, Duration::from_secs(5))
        .await
        .expect_err("nothing listens");
    assert_eq!(e.kind(), "refused", "{e}");

    // Something that is not TLS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let plain = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while matches!(tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await, Ok(n) if n > 0)
                {
                }
            });
        }
    });
    let e = probe_address(&plain, Duration::from_secs(5))
        .await
        .expect_err("not TLS");
    assert_eq!(e.kind(), "protocol", "{e}");

    for bad in ["no-port", "name.invalid:8081"] {
        let e = probe_address(bad, Duration::from_secs(5))
            .await
            .expect_err("unresolvable");
        assert_eq!(e.kind(), "unresolved", "{bad}: {e}");
    }
}

#[tokio::test]
async fn a_silent_address_times_out_within_the_poll_timeout() {
    let (addr, _held) = silent_listener().await;
    let e = tokio::time::timeout(WAIT, probe_address(&addr, Duration::from_millis(300)))
        .await
        .expect("the check is bounded by its timeout")
        .expect_err("silent peer");
    assert_eq!(e.kind(), "timeout", "{e}");
}

/// The admin API answers, the address agents dial does not: the view says
/// both, and the check is counted per outcome.
#[tokio::test]
async fn the_view_records_the_address_beside_the_admin_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _server = fake(&dir, 2);
    let closing = closing_listener().await;
    let r = start(Settings {
        address: Some(closing),
        ..settings(&dir.path().join("api.sock"))
    });
    let v = r
        .wait_for("admin up, address refused", |v| {
            v.reachable && v.address_reachable == Some(false)
        })
        .await;
    assert_eq!(v.address_error.as_deref(), Some("refused"));
    assert!(!v.serves_agents());
    let refused = sample(
        &r.metrics.render(),
        &format!(
            r#"spire_healer_server_address_checks_total{{outcome="refused",server="{SERVER}"}}"#
        ),
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    r.stop().await;

    let (tls, _) = tls_listener().await;
    let r = start(Settings {
        address: Some(tls),
        ..settings(&dir.path().join("api.sock"))
    });
    let v = r
        .wait_for("admin and address up", |v| {
            v.reachable && v.address_reachable == Some(true)
        })
        .await;
    assert_eq!(v.address_error, None);
    assert!(v.serves_agents());
    assert_eq!(r.all_errors(), 0.0);
    r.stop().await;

    // No address configured: not checked.
    let r = start(settings(&dir.path().join("api.sock")));
    let v = r.wait_for("admin up", |v| v.reachable).await;
    assert_eq!(v.address_reachable, None);
    assert!(
        !r.metrics
            .render()
            .contains("spire_healer_server_address_checks_total{")
    );
    r.stop().await;
}

/// Views recorded before the address check (replay frames) still read.
#[test]
fn views_without_the_address_fields_still_deserialize() {
    let v = ServerView::test(SERVER, true, &["f"], SystemClock.now());
    let mut json = serde_json::to_value(&v).expect("serialize");
    let map = json.as_object_mut().expect("object");
    assert!(map.remove("address_reachable").is_some());
    assert!(map.remove("address_error").is_some());
    let back: ServerView = serde_json::from_value(json).expect("older view");
    assert_eq!(back, v);
}
