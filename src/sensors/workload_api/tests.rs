//! The sensor against real gRPC peers on Unix sockets: the simulated agent
//! ([`FakeAgent`]), a server that rejects everything, and raw listeners that
//! hang or speak garbage. Every test asserts the sensor's metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::sensors::entry_lookups::EntryLookups;
use tonic::{Code, Request, Response, Status};

use super::*;
use crate::clock::{Clock, SystemClock};
use crate::endpoint::Endpoint;
use crate::model::{AgentView, Reading, StreamStatus};
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};
use crate::simulated::agent::FakeAgent;
use crate::simulated::issuer::{Flavor, TestCa};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::sample;

const AGENT: &str = "a";
const SPIFFE_ID: &str = "spiffe://example.org/workload/web";
/// Upper bound for any state change we wait for.
const WAIT: Duration = Duration::from_secs(10);
const STREAM_UP: &str = r#"spire_healer_workload_api_stream_up{agent="a"}"#;
const ISSUANCE_COUNT: &str = "spire_healer_slo_svid_issuance_seconds_count";
const ISSUANCE_GOOD: &str = r#"spire_healer_slo_events_total{result="good",slo="svid_issuance"}"#;
const ISSUANCE_BAD: &str = r#"spire_healer_slo_events_total{result="bad",slo="svid_issuance"}"#;

// === Fixtures ===

fn settings(socket: &Path) -> Settings {
    Settings {
        agent: AGENT.to_string(),
        endpoint: Endpoint::Unix(socket.to_path_buf()),
        answer_timeout: Duration::from_millis(500),
        backoff_max: Duration::from_secs(1),
    }
}

/// A simulated agent serving `SPIFFE_ID` with SVIDs of `ttl` at
/// `<dir>/agent.sock`, already started.
fn fake_agent(dir: &Path, ttl: Duration) -> FakeAgent {
    let clock = Arc::new(SystemClock);
    let now = clock.now();
    let ca = TestCa::new(
        "example.org",
        now - Duration::from_secs(3600),
        now + Duration::from_secs(24 * 3600),
    )
    .expect("test CA");
    let agent = FakeAgent::new(ca, SPIFFE_ID, ttl, clock, &dir.join("agent.sock"));
    agent.start().expect("fake agent binds its socket");
    agent
}

/// A sensor and its running task.
struct Running {
    sensor: WorkloadApiSensor,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    lookups: Arc<EntryLookups>,
    token: CancellationToken,
    task: Option<JoinHandle<()>>,
}

fn start(settings: Settings) -> Running {
    let metrics = Arc::new(Metrics::new());
    let (sensor, task, shared) = build(
        settings,
        Arc::new(SystemClock),
        metrics.clone(),
        Arc::new(Notify::new()),
    );
    let lookups = Arc::new(EntryLookups::default());
    let task = task.with_lookups(lookups.clone());
    let token = CancellationToken::new();
    let task = tokio::spawn(task.run(token.clone()));
    Running {
        sensor,
        shared,
        metrics,
        lookups,
        token,
        task: Some(task),
    }
}

impl Running {
    async fn view(&self) -> AgentView {
        let mut readings = self.sensor.observe().await.expect("observe never fails");
        assert_eq!(readings.len(), 1, "one reading per agent");
        match readings.remove(0) {
            Reading::WorkloadApi(v) => (*v).clone(),
            other => panic!("workload_api produced {other:?}"),
        }
    }

    /// Waits until the view satisfies `done`; panics after [`WAIT`].
    async fn wait_for(&self, what: &str, done: impl Fn(&AgentView) -> bool) -> AgentView {
        let mut updates = self.shared.subscribe();
        let reached = timeout(WAIT, updates.wait_for(|v| done(v)))
            .await
            .map(|r| r.map(|v| v.clone()));
        match reached {
            Ok(Ok(v)) => v,
            _ => panic!(
                "{what}: not reached within {WAIT:?}; last view: {:#?}",
                self.shared.view()
            ),
        }
    }

    fn metric(&self, series: &str) -> Option<f64> {
        sample(&self.metrics.render(), series)
    }

    fn errors(&self, code: &str) -> f64 {
        self.metric(&format!(
            r#"spiffe_workload_api_errors_total{{agent="{AGENT}",code="{code}"}}"#
        ))
        .unwrap_or(0.0)
    }

    /// Workload API errors of every code.
    fn all_errors(&self) -> f64 {
        let prefix = format!(r#"spiffe_workload_api_errors_total{{agent="{AGENT}","#);
        self.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// The task is alive (it did not panic or return on its own).
    fn assert_running(&self) {
        let task = self.task.as_ref().expect("task not yet shut down");
        assert!(!task.is_finished(), "the sensor task ended on its own");
    }

    /// Cancels the task and checks that it ends promptly.
    async fn shutdown(mut self) {
        self.assert_running();
        self.token.cancel();
        let task = self.task.take().expect("task not yet shut down");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the sensor task stops on shutdown")
            .expect("the sensor task did not panic");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn is_up_with_svid(v: &AgentView) -> bool {
    v.status == StreamStatus::Up && !v.svids.is_empty() && v.bundle_authorities > 0
}

fn serial_hex(agent: &FakeAgent) -> String {
    format!(
        "{:x}",
        agent.serial().expect("the agent has minted an SVID")
    )
}

/// A count a test can wait on.
#[derive(Clone)]
struct Count(Arc<watch::Sender<usize>>);

impl Default for Count {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }
}

impl Count {
    fn add(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    fn get(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until the count exceeds `n`; panics after [`WAIT`].
    async fn wait_past(&self, n: usize, what: &str) {
        let mut counts = self.0.subscribe();
        let passed = timeout(WAIT, counts.wait_for(|c| *c > n)).await;
        assert!(passed.is_ok(), "{what} within {WAIT:?}");
    }
}

/// Keeps accepted connections open until dropped.
struct RawPeer {
    accepted: Count,
    task: JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that accepts connections and never writes a byte.
fn mute_peer(socket: &Path) -> RawPeer {
    let listener = UnixListener::bind(socket).expect("bind mute peer");
    let accepted = Count::default();
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held: Vec<UnixStream> = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            count.add();
            held.push(conn);
        }
    });
    RawPeer { accepted, task }
}

/// A listener that answers every connection with pseudo-random bytes
/// (fixed seed) and hangs up.
fn garbage_peer(socket: &Path) -> RawPeer {
    let listener = UnixListener::bind(socket).expect("bind garbage peer");
    let accepted = Count::default();
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        while let Ok((mut conn, _)) = listener.accept().await {
            count.add();
            let garbage: Vec<u8> = (0..512)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = conn.write_all(&garbage).await;
            let _ = conn.shutdown().await;
        }
    });
    RawPeer { accepted, task }
}

/// A Workload API server that refuses every call with `InvalidArgument`.
#[derive(Clone, Default)]
struct Refuser {
    calls: Count,
}

impl Refuser {
    fn refuse(&self) -> Status {
        self.calls.add();
        Status::invalid_argument("refused by test server")
    }
}

type Never<T> = tokio_stream::Empty<Result<T, Status>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Refuser {
    type FetchX509SVIDStream = Never<X509svidResponse>;
    type FetchX509BundlesStream = Never<X509BundlesResponse>;
    type FetchJWTBundlesStream = Never<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Err(self.refuse())
    }
    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(self.refuse())
    }
    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(self.refuse())
    }
    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(self.refuse())
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(self.refuse())
    }
}

fn serve_refuser(socket: &Path, shutdown: CancellationToken) -> Refuser {
    let refuser = Refuser::default();
    let listener = UnixListener::bind(socket).expect("bind refusing server");
    let svc = SpiffeWorkloadApiServer::new(refuser.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled())
            .await;
    });
    refuser
}

fn socket_in(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_publishes_the_svid_and_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    let run = start(settings(agent.socket()));

    let v = run
        .wait_for("stream up with an SVID and a bundle", is_up_with_svid)
        .await;
    assert_eq!(v.agent, AGENT);
    assert_eq!(v.last_error, None);
    assert!(v.last_message.is_some());
    assert_eq!(v.svids.len(), 1, "{v:#?}");
    let s = &v.svids[0];
    assert_eq!(s.spiffe_id, SPIFFE_ID);
    assert_eq!(s.invalid, None);
    assert!(!s.serial.is_empty());
    assert_eq!(s.serial, serial_hex(&agent));
    assert!(s.not_after > s.not_before);
    assert!(v.bundle_authorities >= 1);

    assert_eq!(run.metric(STREAM_UP), Some(1.0));
    assert_eq!(run.all_errors(), 0.0);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_delivers_a_new_serial() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(2));
    let run = start(settings(agent.socket()));

    let first = run.wait_for("first SVID", is_up_with_svid).await;
    let first_serial = first.svids[0].serial.clone();
    // The stream's first answer is what the agent already served: not an
    // issuance.
    assert_eq!(run.metric(ISSUANCE_COUNT), Some(0.0));
    let next = run
        .wait_for("a rotated serial", |v| {
            v.svids.first().is_some_and(|s| s.serial != first_serial)
        })
        .await;
    let s = &next.svids[0];
    assert_eq!(next.svids.len(), 1, "full state: the old SVID is gone");
    assert_eq!(s.spiffe_id, SPIFFE_ID);
    assert_eq!(s.invalid, None);
    // Certificate times have whole-second precision: a rotation within the
    // same second may keep the notAfter.
    assert!(s.not_after >= first.svids[0].not_after, "{next:#?}");
    assert!(s.first_seen >= first.svids[0].first_seen);
    assert_eq!(next.status, StreamStatus::Up);
    // The rotation is an issuance: observed and judged (the simulated agent
    // backdates less than SPIRE's 10 s, so its latency reads as 0: good).
    let issued = run.metric(ISSUANCE_COUNT).unwrap_or(0.0);
    assert!(issued >= 1.0, "{issued}");
    assert_eq!(run.metric(ISSUANCE_GOOD), Some(issued));
    assert_eq!(run.metric(ISSUANCE_BAD), Some(0.0));

    assert_eq!(run.metric(STREAM_UP), Some(1.0));
    assert_eq!(run.all_errors(), 0.0);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_issued_drops_what_was_served_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    let run = start(settings(agent.socket()));
    let before = run.wait_for("stream up", is_up_with_svid).await;

    // Our entry is deleted: the agent answers, with no identity for us.
    agent.set_no_identity(true);
    let denied = run
        .wait_for("identity refused", |v| {
            v.last_error.as_deref() == Some(NO_IDENTITY)
        })
        .await;
    assert_eq!(denied.status, StreamStatus::NoIdentity);
    // Nothing is served any more: what was served is remembered (the
    // status says it is not served, so it is not judged) and looked up on
    // the servers.
    assert_eq!(denied.svids.len(), before.svids.len(), "{denied:#?}");
    let wanted: Vec<String> = run.lookups.wanted().into_iter().map(|(_, id)| id).collect();
    let served: Vec<String> = before.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    assert_eq!(wanted, served);
    assert!(run.errors(NO_IDENTITY) > 0.0, "{}", run.metrics.render());

    // The entry is back: the SVID is served again.
    agent.set_no_identity(false);
    let up = run.wait_for("served again", is_up_with_svid).await;
    assert!(run.lookups.wanted().is_empty(), "nothing left to look up");
    assert_eq!(up.last_error, None);
    assert_eq!(up.svids[0].spiffe_id, before.svids[0].spiffe_id);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_now_skips_the_backoff_of_a_down_stream_and_leaves_an_up_one_alone() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    let run = start(Settings {
        backoff_max: Duration::from_secs(3600),
        ..settings(agent.socket())
    });
    run.wait_for("stream up", is_up_with_svid).await;

    // Up: a retry is not a refetch; the streams stay as they are, over
    // three more published views (heartbeats).
    run.shared.retry_now();
    let mut views = run.shared.subscribe();
    for _ in 0..3 {
        tokio::time::timeout(WAIT, views.changed())
            .await
            .expect("a heartbeat")
            .expect("the sensor runs");
    }
    assert_eq!(run.shared.reconnects(), 0);
    assert_eq!(run.view().await.status, StreamStatus::Up);

    // Down, and backing off longer than this test waits for anything (six
    // failures in, the next attempt is 12.8 s away): a retry reconnects at
    // once.
    agent.stop();
    let down = run
        .wait_for("down", |v| v.status == StreamStatus::Down)
        .await;
    let code = down.last_error.clone().expect("a failure code");
    run.wait_for("six failed attempts", |_| run.errors(&code) >= 6.0)
        .await;
    agent.restart().unwrap();
    run.shared.retry_now();
    run.wait_for("up again", is_up_with_svid).await;
    assert_eq!(run.shared.reconnects(), 1);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stop_is_down_and_restart_is_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    let run = start(settings(agent.socket()));
    let before = run.wait_for("stream up", is_up_with_svid).await;

    agent.stop();
    let down = run
        .wait_for("down after the agent stopped", |v| {
            v.status == StreamStatus::Down
        })
        .await;
    assert!(down.last_error.is_some(), "{down:#?}");
    assert!(down.status_since >= before.status_since);
    // The last SVIDs are kept while the stream is down.
    assert_eq!(down.svids, before.svids);
    let code = down.last_error.as_deref().unwrap();
    assert!(run.errors(code) > 0.0, "{}", run.metrics.render());
    assert_eq!(run.metric(STREAM_UP), Some(0.0));

    agent.restart().unwrap();
    let up = run
        .wait_for("up again after the restart", |v| {
            v.status == StreamStatus::Up
                && v.svids
                    .first()
                    .is_some_and(|s| s.serial != before.svids[0].serial)
        })
        .await;
    assert_eq!(up.last_error, None);
    assert_eq!(up.svids[0].serial, serial_hex(&agent));
    assert_eq!(run.metric(STREAM_UP), Some(1.0));
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_svids_from_the_agent_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    let run = start(settings(agent.socket()));
    run.wait_for("stream up", is_up_with_svid).await;
    assert_eq!(run.errors("invalid_svid"), 0.0);

    agent.serve_flavor(Flavor::CaLeaf);
    let v = run
        .wait_for("CA leaf flagged", |v| {
            v.svids.first().is_some_and(|s| s.invalid.is_some())
        })
        .await;
    let problem = v.svids[0].invalid.clone().unwrap();
    assert!(problem.contains("cA=true"), "{problem}");
    assert_eq!(
        v.svids[0].serial,
        serial_hex(&agent),
        "the bad SVID is still parsed"
    );
    // An invalid SVID is a valid message: the stream stays up.
    assert_eq!(v.status, StreamStatus::Up);
    let after_ca_leaf = run.errors("invalid_svid");
    assert!(after_ca_leaf >= 1.0);

    agent.serve_flavor(Flavor::TwoUriSans);
    let v = run
        .wait_for("two URI SANs flagged", |v| {
            v.svids
                .first()
                .and_then(|s| s.invalid.as_deref())
                .is_some_and(|p| p.contains("URI SANs"))
        })
        .await;
    assert_eq!(v.svids[0].spiffe_id, SPIFFE_ID);
    let after_two_sans = run.errors("invalid_svid");
    assert!(after_two_sans > after_ca_leaf);
    assert_eq!(run.metric(STREAM_UP), Some(1.0));

    // Garbage DER in place of the chain: flagged, no leaf, stream still up.
    agent.serve_flavor(Flavor::GarbageDer);
    let v = run
        .wait_for("garbage DER flagged", |v| {
            v.svids
                .first()
                .is_some_and(|s| s.invalid.is_some() && s.serial.is_empty())
        })
        .await;
    let problem = v.svids[0].invalid.clone().unwrap();
    assert!(
        problem.to_lowercase().contains("malformed") || problem.contains("DER"),
        "{problem}"
    );
    assert_eq!(v.status, StreamStatus::Up);
    assert!(run.errors("invalid_svid") > after_two_sans);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_is_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    agent.set_silent(true);
    let run = start(settings(agent.socket()));

    let v = run
        .wait_for("unanswered", |v| v.status == StreamStatus::Unanswered)
        .await;
    assert_eq!(v.last_error.as_deref(), Some("unanswered"));
    assert!(v.svids.is_empty());
    assert_eq!(v.last_message, None);
    assert!(run.errors("unanswered") >= 1.0);
    assert_eq!(run.metric(STREAM_UP), Some(0.0));

    // It answers again: the next session is up.
    agent.set_silent(false);
    agent.serve_flavor(Flavor::Valid);
    run.wait_for("up once the agent answers", is_up_with_svid)
        .await;
    assert_eq!(run.metric(STREAM_UP), Some(1.0));
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_never_completes_the_handshake_is_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "mute.sock");
    let peer = mute_peer(&socket);
    let run = start(settings(&socket));

    let v = run
        .wait_for("unanswered", |v| v.status == StreamStatus::Unanswered)
        .await;
    assert_eq!(v.last_error.as_deref(), Some("unanswered"));
    assert!(peer.accepted.get() >= 1, "the sensor did connect");
    assert!(run.errors("unanswered") >= 1.0);
    assert_eq!(run.metric(STREAM_UP), Some(0.0));
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_peer_is_down_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "garbage.sock");
    let peer = garbage_peer(&socket);
    let run = start(settings(&socket));

    let v = run
        .wait_for("down after garbage", |v| v.status == StreamStatus::Down)
        .await;
    assert!(v.last_error.is_some(), "{v:#?}");
    assert!(v.svids.is_empty());
    assert!(peer.accepted.get() >= 1);
    assert!(run.all_errors() >= 1.0, "{}", run.metrics.render());
    assert_eq!(run.metric(STREAM_UP), Some(0.0));

    // It keeps retrying (retryable failure) and keeps running.
    let seen = peer.accepted.get();
    peer.accepted.wait_past(seen, "a retry after garbage").await;
    run.assert_running();
    assert_eq!(run.view().await.status, StreamStatus::Down);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_security_header_is_required_and_sent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    let channel = Endpoint::Unix(agent.socket().to_path_buf())
        .channel(WAIT)
        .unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel);

    let bare = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect_err("a request without the header is refused");
    assert_eq!(bare.code(), Code::InvalidArgument);
    let mut ok = client
        .fetch_x509svid(request(X509svidRequest {}))
        .await
        .expect("a request with the header is served")
        .into_inner();
    let first = ok.message().await.unwrap().expect("one full-state message");
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].spiffe_id, SPIFFE_ID);

    // The sensor's own requests carry it.
    let run = start(settings(agent.socket()));
    run.wait_for("stream up", is_up_with_svid).await;
    assert_eq!(run.errors("invalid_argument"), 0.0);
    assert_eq!(run.metric(STREAM_UP), Some(1.0));
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_rejected_and_not_retried_until_asked() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir, "refuser.sock");
    let server_stop = CancellationToken::new();
    let _stop_server = server_stop.clone().drop_guard();
    let refuser = serve_refuser(&socket, server_stop);
    let run = start(Settings {
        // Long enough that a rejected stream is not retried in this test.
        backoff_max: Duration::from_secs(30),
        ..settings(&socket)
    });

    let v = run
        .wait_for("rejected", |v| v.status == StreamStatus::Rejected)
        .await;
    assert_eq!(v.last_error.as_deref(), Some("invalid_argument"));
    assert_eq!(run.metric(STREAM_UP), Some(0.0));

    // No rapid retries: over four heartbeats of the backoff wait (2 s of
    // the task's own time) the server sees no new attempt. Allow one for a
    // session that was already in flight.
    let calls = refuser.calls.get();
    assert!(calls >= 1);
    let mut updates = run.shared.subscribe();
    updates.mark_unchanged();
    for _ in 0..4 {
        timeout(WAIT, updates.changed())
            .await
            .expect("the task heartbeats while it waits")
            .expect("the task runs");
    }
    let later = refuser.calls.get();
    assert!(later <= calls + 1, "retried {later} times");
    assert!(
        run.errors("invalid_argument") <= 2.0,
        "{}",
        run.metrics.render()
    );
    assert!(run.errors("invalid_argument") >= 1.0);
    assert_eq!(run.view().await.status, StreamStatus::Rejected);

    // A refetch asks for it: reconnect at once.
    assert!(run.shared.request_reconnect(WAIT).await);
    refuser
        .calls
        .wait_past(later, "an attempt after a refetch")
        .await;
    assert_eq!(run.shared.reconnects(), 1);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_on_request_returns_the_cached_state() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Duration::from_secs(60));
    let run = start(settings(agent.socket()));
    let before = run.wait_for("stream up", is_up_with_svid).await;
    let last_message = before.last_message.expect("a message arrived");
    assert_eq!(run.shared.reconnects(), 0);

    assert!(run.shared.request_reconnect(WAIT).await);
    assert_eq!(run.shared.reconnects(), 1);
    let after = run
        .wait_for("a fresh message after the reconnect", |v| {
            v.status == StreamStatus::Up && v.last_message.is_some_and(|t| t > last_message)
        })
        .await;
    assert_eq!(after.svids.len(), 1);
    assert_eq!(after.svids[0].serial, before.svids[0].serial);
    assert_eq!(
        after.svids[0].first_seen, before.svids[0].first_seen,
        "same serial, same first delivery"
    );
    assert_eq!(run.metric(STREAM_UP), Some(1.0));
    assert_eq!(run.all_errors(), 0.0);
    run.shutdown().await;
}
