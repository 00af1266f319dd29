//! The sensor against a raw HTTP server whose `/live` and `/ready` answers
//! the test flips, hangs or takes away. Every test asserts the sensor's
//! metrics.

use crate::sensors::Sensor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::ManualClock;
use crate::http_client::test_server::{Reply, TestServer};
use crate::telemetry::metrics::sample;

const WAIT: Duration = Duration::from_secs(10);
const T0: u64 = 1_700_000_000;

/// What `/live` and `/ready` answer.
#[derive(Clone)]
struct Answers {
    live: Reply,
    ready: Reply,
}

fn status(code: u16) -> Reply {
    Reply::Status(code, br#"{"agent":{}}"#.to_vec())
}

async fn server(live: Reply, ready: Reply) -> (TestServer, Arc<Mutex<Answers>>) {
    let answers = Arc::new(Mutex::new(Answers { live, ready }));
    let current = answers.clone();
    let server = TestServer::start(move |path| {
        let a = current.lock().expect("answers lock");
        match path {
            "/live" => a.live.clone(),
            "/ready" => a.ready.clone(),
            _ => Reply::Status(404, Vec::new()),
        }
    })
    .await;
    (server, answers)
}

struct Running {
    sensor: HealthSensor,
    metrics: Arc<Metrics>,
    clock: Arc<ManualClock>,
    wake: Arc<Notify>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

fn start(settings: Settings) -> Running {
    let metrics = Arc::new(Metrics::new());
    let clock = Arc::new(ManualClock::at_unix(T0));
    let wake = Arc::new(Notify::new());
    let (sensor, task) = build(settings, clock.clone(), metrics.clone(), wake.clone());
    let token = CancellationToken::new();
    let task = tokio::spawn(task.run(token.clone()));
    Running {
        sensor,
        metrics,
        clock,
        wake,
        token,
        task,
    }
}

fn settings(server: &TestServer, role: Role) -> Settings {
    Settings::from_base_url(
        "node-a",
        role,
        &server.url("/"),
        Duration::from_millis(20),
        Duration::from_millis(300),
    )
}

impl Running {
    async fn view(&self) -> Arc<HealthView> {
        let mut readings = self.sensor.observe().await.expect("observe never fails");
        assert_eq!(readings.len(), 1);
        match readings.remove(0) {
            Reading::Health(v) => v,
            other => panic!("health produced {other:?}"),
        }
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&HealthView) -> bool) -> Arc<HealthView> {
        crate::sensors::wait_for_view(self.sensor.subscribe(), what, WAIT, done).await
    }

    fn errors(&self, kind: &str) -> f64 {
        let series = format!(r#"spire_healer_errors_total{{kind="{kind}",stage="sensor"}}"#);
        sample(&self.metrics.render(), &series).unwrap_or(0.0)
    }

    fn all_errors(&self) -> f64 {
        ["invalid_url", "connect", "timeout", "too_large", "protocol"]
            .iter()
            .map(|k| self.errors(k))
            .sum()
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("task stops on shutdown")
            .expect("task does not panic");
    }
}

#[tokio::test]
async fn flips_between_200_and_500() {
    let (server, answers) = server(status(200), status(500)).await;
    let r = start(settings(&server, Role::Agent));
    let first = r.view().await;
    assert_eq!(
        (first.live, first.ready, first.last_error.as_deref()),
        (None, None, None)
    );

    r.clock.advance(Duration::from_secs(7));
    let v = r
        .wait_for("live, not ready", |v| {
            v.live == Some(true) && v.ready == Some(false)
        })
        .await;
    assert_eq!(v.target, "node-a");
    assert_eq!(v.role, Role::Agent);
    assert_eq!(v.last_error, None, "a 500 is an answer, not an error");
    assert_eq!(v.updated_at, UNIX_EPOCH + Duration::from_secs(T0 + 7));

    answers.lock().expect("lock").ready = status(200);
    r.wait_for("ready", |v| v.ready == Some(true)).await;

    {
        let mut a = answers.lock().expect("lock");
        a.live = status(500);
        a.ready = status(503);
    }
    let v = r
        .wait_for("down", |v| v.live == Some(false) && v.ready == Some(false))
        .await;
    assert_eq!(v.last_error, None);
    assert_eq!(r.all_errors(), 0.0, "status answers never count as errors");
    r.stop().await;
}

#[tokio::test]
async fn server_going_away_reads_as_unknown() {
    let (server, _) = server(status(200), status(200)).await;
    let r = start(settings(&server, Role::Server));
    r.wait_for("healthy", |v| v.live == Some(true) && v.ready == Some(true))
        .await;
    server.stop().await;
    let v = r
        .wait_for("unreachable", |v| v.live.is_none() && v.ready.is_none())
        .await;
    assert_eq!(v.last_error.as_deref(), Some("connect"));
    assert_eq!(v.role, Role::Server);
    assert!(r.errors("connect") >= 2.0, "one per probe");
    r.stop().await;
}

#[tokio::test]
async fn a_hanging_probe_times_out_alone() {
    let (server, _) = server(status(200), Reply::Hang).await;
    let r = start(settings(&server, Role::Agent));
    let v = r
        .wait_for("ready timed out", |v| v.last_error.is_some())
        .await;
    assert_eq!(v.live, Some(true));
    assert_eq!(v.ready, None);
    assert_eq!(v.last_error.as_deref(), Some("timeout"));
    assert!(r.errors("timeout") >= 1.0);
    assert_eq!(r.errors("connect"), 0.0);
    r.stop().await;
}

#[tokio::test]
async fn garbage_is_a_protocol_error() {
    let (server, _) = server(Reply::Raw(b"NOT HTTP\r\n\r\n".to_vec()), status(200)).await;
    let r = start(settings(&server, Role::Agent));
    let v = r.wait_for("garbage", |v| v.last_error.is_some()).await;
    assert_eq!((v.live, v.ready), (None, Some(true)));
    assert_eq!(v.last_error.as_deref(), Some("protocol"));
    assert!(r.errors("protocol") >= 1.0);
    r.stop().await;
}

#[tokio::test]
async fn unconfigured_probes_stay_unknown_without_errors() {
    let (server, _) = server(status(200), status(200)).await;
    let mut s = settings(&server, Role::Agent);
    s.ready_url = None;
    let r = start(s);
    let v = r.wait_for("live", |v| v.live == Some(true)).await;
    assert_eq!(v.ready, None);
    assert_eq!(v.last_error, None);
    assert_eq!(r.all_errors(), 0.0);
    r.stop().await;
}

#[tokio::test]
async fn wakes_the_loop_on_change() {
    let (server, answers) = server(status(200), status(200)).await;
    let r = start(settings(&server, Role::Agent));
    tokio::time::timeout(WAIT, r.wake.notified())
        .await
        .expect("woken by the first answer");
    r.wait_for("healthy", |v| v.ready == Some(true)).await;
    answers.lock().expect("lock").ready = status(500);
    tokio::time::timeout(WAIT, r.wake.notified())
        .await
        .expect("woken when ready flips");
    assert_eq!(r.all_errors(), 0.0);
    assert_eq!(r.sensor.name(), "health");
    assert_eq!(r.sensor.instance(), "node-a");
    r.stop().await;
}

#[tokio::test]
async fn invalid_url_is_counted() {
    let r = start(Settings {
        target: "node-a".into(),
        role: Role::Agent,
        live_url: Some("https://127.0.0.1:8080/live".into()),
        ready_url: None,
        interval: Duration::from_millis(20),
        timeout: Duration::from_millis(300),
    });
    let v = r.wait_for("invalid", |v| v.last_error.is_some()).await;
    assert_eq!(v.last_error.as_deref(), Some("invalid_url"));
    assert!(r.errors("invalid_url") >= 1.0);
    r.stop().await;
}

#[test]
fn base_url_gets_spire_default_paths() {
    for base in ["http://127.0.0.1:8080", "http://127.0.0.1:8080/"] {
        let s = Settings::from_base_url("a", Role::Agent, base, Duration::ZERO, Duration::ZERO);
        assert_eq!(s.live_url.as_deref(), Some("http://127.0.0.1:8080/live"));
        assert_eq!(s.ready_url.as_deref(), Some("http://127.0.0.1:8080/ready"));
    }
}
