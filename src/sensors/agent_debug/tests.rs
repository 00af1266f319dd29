//! The sensor against a minimal agent Debug service on a Unix socket, raw
//! listeners that hang or speak garbage, and paths that are not sockets.
//! Every test asserts the sensor's error metrics.

use crate::sensors::Sensor;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::*;
use crate::clock::SystemClock;
use crate::model::AgentDebugView;
use crate::proto::spire::agent::debug::v1 as pb;
use crate::proto::spire::agent::debug::v1::debug_server::{Debug, DebugServer};
use crate::proto::spire::api::types::Spiffeid;
use crate::simulated::server::{RawFault, serve_raw};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::sample;

const AGENT: &str = "a";
const WAIT: Duration = Duration::from_secs(10);

/// Answers GetInfo with whatever `answer` holds; `None` hangs.
#[derive(Clone)]
struct FakeDebug(Arc<Mutex<Option<pb::GetInfoResponse>>>);

#[tonic::async_trait]
impl Debug for FakeDebug {
    async fn get_info(
        &self,
        _req: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        let answer = self.0.lock().expect("lock").clone();
        match answer {
            Some(a) => Ok(Response::new(a)),
            None => std::future::pending().await,
        }
    }
}

#[allow(deprecated)] // SPIRE still fills `svids_count`; so does the fake.
fn answer(last_sync: i64, cached: i32) -> pb::GetInfoResponse {
    let cert = |path: &str, expires_at| pb::get_info_response::Cert {
        id: (!path.is_empty()).then(|| Spiffeid {
            trust_domain: "example.org".into(),
            path: path.into(),
        }),
        expires_at,
        subject: String::new(),
    };
    pb::GetInfoResponse {
        svid_chain: vec![
            cert("/spire/agent/join_token/t", 2_000_000_000),
            cert("", 1_900_000_000),
        ],
        uptime: 42,
        svids_count: cached,
        last_sync_success: last_sync,
        cached_x509_svids_count: cached,
        cached_jwt_svids_count: 0,
        cached_svidstore_x509_svids_count: 0,
    }
}

fn serve(socket: &Path, first: pb::GetInfoResponse) -> (FakeDebug, JoinHandle<()>) {
    let fake = FakeDebug(Arc::new(Mutex::new(Some(first))));
    let listener = UnixListener::bind(socket).expect("bind");
    let svc = DebugServer::new(fake.clone());
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
    });
    (fake, task)
}

fn settings(socket: &Path) -> Settings {
    Settings {
        poll_interval: Duration::from_millis(50),
        timeout: Duration::from_millis(300),
        ..Settings::new(AGENT, socket)
    }
}

struct Running {
    sensor: AgentDebugSensor,
    metrics: Arc<Metrics>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

fn start(settings: Settings) -> Running {
    let metrics = Arc::new(Metrics::new());
    let (sensor, task) = build(
        settings,
        Arc::new(SystemClock),
        metrics.clone(),
        Arc::new(Notify::new()),
    );
    let token = CancellationToken::new();
    let task = tokio::spawn(task.run(token.clone()));
    Running {
        sensor,
        metrics,
        token,
        task,
    }
}

impl Running {
    async fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&AgentDebugView) -> bool,
    ) -> Arc<AgentDebugView> {
        crate::sensors::wait_for_view(self.sensor.subscribe(), what, WAIT, done).await
    }

    fn errors(&self, kind: &str) -> f64 {
        sample(
            &self.metrics.render(),
            &format!(r#"spire_healer_errors_total{{kind="{kind}",stage="sensor"}}"#),
        )
        .unwrap_or(0.0)
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("the task ends promptly on shutdown")
            .expect("no panic");
    }
}

#[tokio::test]
async fn reads_the_agent_debug_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    let (fake, server) = serve(&socket, answer(1_800_000_000, 3));
    let r = start(settings(&socket));
    assert_eq!(r.sensor.name(), "agent_debug");
    assert_eq!(r.sensor.instance(), AGENT);
    let v = r.wait_for("reachable", |v| v.reachable).await;
    assert_eq!(v.agent, AGENT);
    assert_eq!(v.last_error, None);
    assert_eq!(
        v.last_sync_success,
        Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
    );
    assert_eq!(v.uptime_secs, 42);
    assert_eq!(v.cached_x509_svids, 3);
    assert_eq!(
        v.spiffe_id.as_deref(),
        Some("spiffe://example.org/spire/agent/join_token/t")
    );
    // The earliest notAfter in the chain (the CA here).
    assert_eq!(
        v.svid_expires_at,
        Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
    );

    // Never synced: Go's zero time is reported as no sync at all.
    *fake.0.lock().expect("lock") = Some(answer(-62_135_596_800, 0));
    let v = r
        .wait_for("no sync", |v| v.last_sync_success.is_none())
        .await;
    assert!(v.reachable);
    assert_eq!(r.errors("timeout"), 0.0);

    // A hung agent: a timeout, the last values kept.
    *fake.0.lock().expect("lock") = None;
    let v = r.wait_for("timed out", |v| !v.reachable).await;
    assert_eq!(v.last_error.as_deref(), Some("timeout"));
    assert_eq!(v.uptime_secs, 42);
    assert!(v.spiffe_id.is_some());
    assert!(r.errors("timeout") >= 1.0);
    r.stop().await;
    server.abort();
}

#[tokio::test]
async fn bad_peers_and_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.sock");
    let raw = serve_raw(&garbage, RawFault::Garbage).expect("bind");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let cases = [
        (garbage.clone(), "protocol"),
        (file, "not_a_socket"),
        (dir.path().to_path_buf(), "not_a_socket"),
        (dir.path().join("missing.sock"), "socket_missing"),
    ];
    for (path, kind) in cases {
        let r = start(settings(&path));
        let v = r.wait_for(kind, |v| v.last_error.is_some()).await;
        assert!(!v.reachable);
        assert_eq!(v.last_error.as_deref(), Some(kind), "{}", path.display());
        assert!(r.errors(kind) >= 1.0);
        assert_eq!(v.spiffe_id, None);
        r.stop().await;
    }
    raw.abort();
}

/// `answered_after`, poll by poll (2 s apart, times in seconds after
/// `t0`): the poll time minus SPIRE's 5 s cache, or the previous poll when
/// the answer changed since (it was still cached then).
#[test]
fn answered_after_bounds_when_the_agent_computed_its_answer() {
    let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let at = |s: u64| t0 + Duration::from_secs(s);
    let info = |uptime: u64, last_sync: u64| AgentDebugInfo {
        uptime_secs: uptime,
        last_sync_success: Some(at(last_sync)),
        cached_x509_svids: 0,
        cached_jwt_svids: 0,
        cached_svidstore_x509_svids: 0,
        svid_chain: Vec::new(),
    };
    let (_sensor, task) = build(
        Settings::new(AGENT, "/nonexistent"),
        Arc::new(SystemClock),
        Arc::new(Metrics::new()),
        Arc::new(Notify::new()),
    );
    // (poll start, uptime, last sync, expected answered_after).
    let polls = [
        (10, 60, 8, 5),   // first answer: the cache bound only
        (12, 60, 8, 7),   // same answer: the cache bound moves on
        (14, 66, 13, 12), // new answer: after the poll at 12 (> 14 − 5)
        (16, 66, 13, 12), // same answer: 12 is still known (> 16 − 5)
        (18, 66, 13, 13), // the cache bound passes it
        (30, 78, 13, 25), // changed after a gap: the cache bound (> 18)
    ];
    for (poll, uptime, last, want) in polls {
        let got = task.answered_after(&info(uptime, last), at(poll));
        assert_eq!(got, at(want), "poll at {poll}");
    }
}

/// A socket that accepts but never answers (a stopped agent: the kernel
/// queues the connection) dates its first timed-out poll and keeps that
/// date poll after poll; a missing socket (an agent that is down) and a
/// refused one never set it.
#[tokio::test]
async fn unanswered_since_dates_polls_that_time_out_in_a_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let silent = dir.path().join("silent.sock");
    let raw = serve_raw(&silent, RawFault::Silent).expect("bind");
    let r = start(settings(&silent));
    let first = r
        .wait_for("a timed-out poll", |v| v.unanswered_since.is_some())
        .await;
    assert!(!first.reachable);
    assert_eq!(first.last_error.as_deref(), Some("timeout"));
    let since = first.unanswered_since.expect("set");
    assert!(since < first.updated_at);
    let later = r
        .wait_for("two more polls", |v| v.updated_at > first.updated_at)
        .await;
    let later = r
        .wait_for("another poll", |v| v.updated_at > later.updated_at)
        .await;
    assert_eq!(later.unanswered_since, Some(since), "kept across polls");
    assert!(r.errors("timeout") >= 2.0);
    r.stop().await;
    raw.abort();

    // Absent, and bound by nobody: the agent is down, not hung.
    let refused = dir.path().join("refused.sock");
    drop(std::os::unix::net::UnixListener::bind(&refused).expect("bind"));
    for (path, kind) in [
        (dir.path().join("absent.sock"), "socket_missing"),
        (refused, "connection_refused"),
    ] {
        let r = start(settings(&path));
        let v = r.wait_for(kind, |v| v.last_error.is_some()).await;
        assert_eq!(v.last_error.as_deref(), Some(kind), "{}", path.display());
        let v = r
            .wait_for("another poll", |n| n.updated_at > v.updated_at)
            .await;
        assert_eq!(v.unanswered_since, None, "{kind}");
        r.stop().await;
    }
}

/// A hung Debug service after answers: dated from the first poll that
/// timed out; an answer clears it.
#[tokio::test]
async fn an_answer_clears_unanswered_since() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    let (fake, server) = serve(&socket, answer(1_800_000_000, 3));
    let r = start(settings(&socket));
    let v = r.wait_for("reachable", |v| v.reachable).await;
    assert_eq!(v.unanswered_since, None);
    *fake.0.lock().expect("lock") = None;
    let v = r
        .wait_for("timed out", |v| v.unanswered_since.is_some())
        .await;
    assert_eq!(v.last_error.as_deref(), Some("timeout"));
    *fake.0.lock().expect("lock") = Some(answer(1_800_000_000, 3));
    let v = r.wait_for("answers again", |v| v.reachable).await;
    assert_eq!(v.unanswered_since, None);
    r.stop().await;
    server.abort();
}
