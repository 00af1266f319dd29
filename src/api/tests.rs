//! The API's tests: reporting, the socket, config (here); the
//! authorization matrix ([`matrix`]); RPC bodies and bad input ([`rpcs`]);
//! `Watch` ([`watching`]). Every server runs on a temporary Unix socket
//! with a real tonic client, over a SQLite store in a temporary file.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::reports::report;
use super::*;
use crate::clock::{Clock as _, ManualClock};
use crate::control::{Controls, Hub};
use crate::handshake::{Counts, Reason};
use crate::proto::healer::supervisor_client::SupervisorClient;
use crate::proto::healer::{HandshakeReport, ReportHandshakesRequest, ReportHandshakesResponse};
use crate::telemetry::metrics::sample;

mod matrix;
mod rpcs;
mod stores;
mod watching;

fn our_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// 2023-11-14T22:13:20Z: where every test clock starts.
const T0: u64 = 1_700_000_000;

/// A served API and handles on everything behind it.
struct TestApi {
    dir: tempfile::TempDir,
    socket: PathBuf,
    counter: Counter,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ApiError>>,
    /// The service, for calls with hand-made connect info.
    svc: Service,
    /// The same service's state (watchers).
    api: rpc::Api,
    backend: Backend,
    clock: Arc<ManualClock>,
    status: tokio::sync::watch::Sender<crate::control::Status>,
}

/// How [`TestApi::start_with`] builds the backend.
struct Setup {
    /// Events in the hub's ring.
    hub_capacity: usize,
    /// Instead of SQLite.
    store: Option<Arc<dyn crate::knowledge::Store>>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            hub_capacity: 4096,
            store: None,
        }
    }
}

impl TestApi {
    async fn start(tweak: impl FnOnce(&mut ApiConfig)) -> Self {
        Self::start_with(Setup::default(), tweak).await
    }

    async fn start_with(setup: Setup, tweak: impl FnOnce(&mut ApiConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Others may traverse (not write): the other-uid test dials from
        // uid 65534.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cfg = ApiConfig {
            socket: dir.path().join("api.sock"),
            ..ApiConfig::default()
        };
        tweak(&mut cfg);
        let store: Arc<dyn crate::knowledge::Store> = match setup.store {
            Some(store) => store,
            None => crate::knowledge::open(dir.path().join("store.db").to_str().unwrap())
                .await
                .unwrap(),
        };
        let clock = Arc::new(ManualClock::at_unix(T0));
        let (status, status_rx) = tokio::sync::watch::channel(crate::control::Status::default());
        let backend = Backend {
            store,
            controls: Controls::resume(false, &[], &[], &[], Arc::new(tokio::sync::Notify::new())),
            hub: Hub::new(setup.hub_capacity),
            status: status_rx,
            clock: clock.clone(),
            leader_epoch: None,
        };
        let counter = Counter::default();
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let api = api(
            &cfg,
            counter.clone(),
            backend.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        let svc = wrap(&cfg, api.clone(), metrics.clone());
        let (bound, fut) = serve_service(&cfg, svc.clone(), shutdown.clone()).unwrap();
        assert_eq!(bound.socket, cfg.socket);
        Self {
            socket: cfg.socket,
            dir,
            counter,
            metrics,
            shutdown,
            task: tokio::spawn(fut),
            svc,
            api,
            backend,
            clock,
            status,
        }
    }

    fn client(&self) -> ReportClient {
        ReportClient::connect_unix(&self.socket).unwrap()
    }

    /// A `Supervisor` client on the socket.
    fn grpc(&self) -> SupervisorClient<Channel> {
        grpc_at(&self.socket)
    }

    /// A client calling the service in-process, without a transport: its
    /// requests carry only the extensions a test puts in them.
    fn direct(&self) -> SupervisorClient<Service> {
        SupervisorClient::new(self.svc.clone())
    }

    /// (target, reason) → count, drained from the counter.
    fn drain(&self) -> HashMap<(String, Reason), u64> {
        let mut out = HashMap::new();
        for (target, counts) in self.counter.drain() {
            for r in Reason::ALL {
                if counts.get(r) > 0 {
                    out.insert((target.to_string(), r), counts.get(r));
                }
            }
        }
        out
    }

    fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics.render(), series).unwrap_or(0.0)
    }

    fn requests(&self, outcome: &str) -> f64 {
        self.calls("report_handshakes", outcome)
    }

    fn calls(&self, method: &str, outcome: &str) -> f64 {
        self.metric(&format!(
            r#"spire_healer_api_requests_total{{method="{method}",outcome="{outcome}"}}"#
        ))
    }

    fn denied(&self, method: &str, reason: &str) -> f64 {
        self.metric(&format!(
            r#"spire_healer_api_denied_total{{method="{method}",reason="{reason}"}}"#
        ))
    }

    fn rejected(&self, kind: &str) -> f64 {
        self.metric(&format!(
            r#"spire_healer_handshake_reports_rejected_total{{kind="{kind}"}}"#
        ))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        assert!(
            std::fs::symlink_metadata(&self.socket).is_err(),
            "socket removed on stop"
        );
        drop(self.dir);
    }
}

fn grpc_at(socket: &Path) -> SupervisorClient<Channel> {
    let channel = crate::endpoint::Endpoint::Unix(socket.to_path_buf())
        .channel(Duration::from_secs(5))
        .unwrap();
    SupervisorClient::new(channel)
}

/// Polls `check` until it holds, for at most 20 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn batch(reports: Vec<HandshakeReport>) -> ReportHandshakesRequest {
    ReportHandshakesRequest { reports }
}

fn stream(
    batches: Vec<ReportHandshakesRequest>,
) -> impl futures::Stream<Item = ReportHandshakesRequest> + Send + 'static {
    futures::stream::iter(batches)
}

fn raw(target: &str, reason: i32, count: u64) -> HandshakeReport {
    HandshakeReport {
        target: target.to_string(),
        reason,
        count,
        peer_spiffe_id: String::new(),
    }
}

// === Raw-bytes client ===

/// Sends each `Vec<u8>` as one gRPC message, unchecked.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ReportHandshakesResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = ReportHandshakesResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        Message::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

async fn send_raw(
    socket: &Path,
    messages: Vec<Vec<u8>>,
) -> Result<ReportHandshakesResponse, Status> {
    let channel = crate::endpoint::Endpoint::Unix(socket.to_path_buf())
        .channel(Duration::from_secs(5))
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::from_static("/spire_healer.v1.Supervisor/ReportHandshakes");
    grpc.client_streaming(
        Request::new(futures::stream::iter(messages)),
        path,
        RawCodec,
    )
    .await
    .map(Response::into_inner)
}

// === Reporting ===

#[tokio::test]
async fn allowed_caller_reports_land_in_the_counter() {
    let api = TestApi::start(|_| {}).await;
    let resp = api
        .client()
        .report(stream(vec![
            batch(vec![
                report("db", Reason::Ok, 0),
                report("db", Reason::Ok, 9),
                report("db", Reason::UnknownCa, 3),
            ]),
            batch(vec![]),
            batch(vec![
                report("web", Reason::Timeout, 1),
                report("db", Reason::UnknownCa, 2),
            ]),
        ]))
        .await
        .unwrap();
    assert_eq!((resp.accepted, resp.rejected), (5, 0));
    let got = api.drain();
    let want: HashMap<_, _> = [
        (("db".to_string(), Reason::Ok), 10),
        (("db".to_string(), Reason::UnknownCa), 5),
        (("web".to_string(), Reason::Timeout), 1),
    ]
    .into();
    assert_eq!(got, want);
    let text = api.metrics.render();
    assert_eq!(
        sample(
            &text,
            r#"spire_healer_handshakes_total{reason="unknown_ca",source="report"}"#
        ),
        Some(5.0)
    );
    assert_eq!(api.requests("ok"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn counts_carry_the_report_source() {
    let api = TestApi::start(|_| {}).await;
    api.client()
        .report(stream(vec![batch(vec![report("db", Reason::Ok, 1)])]))
        .await
        .unwrap();
    let d = api.counter.drain();
    let db: &Counts = d.get("db").unwrap();
    assert_eq!(db.source_names(), vec!["report"]);
    api.stop().await;
}

#[tokio::test]
async fn other_uid_is_refused_and_nothing_is_counted() {
    let api = TestApi::start(|c| {
        c.report_uids = vec![our_uid().wrapping_add(1)];
        c.operator_uids = vec![];
    })
    .await;
    let err = api
        .client()
        .report(stream(vec![batch(vec![report("db", Reason::Ok, 1)])]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(api.drain().is_empty());
    assert_eq!(api.requests("unauthenticated"), 1.0);
    assert_eq!(api.requests("ok"), 0.0);
    let text = api.metrics.render();
    assert_eq!(
        sample(
            &text,
            r#"spire_healer_handshakes_total{reason="ok",source="report"}"#
        ),
        Some(0.0)
    );
    api.stop().await;
}

#[tokio::test]
async fn malformed_reports_are_rejected_and_the_rest_kept() {
    let api = TestApi::start(|c| c.max_count_per_report = 1_000).await;
    let long = "x".repeat(crate::handshake::MAX_TARGET_LEN + 1);
    let resp = api
        .client()
        .report(stream(vec![batch(vec![
            report("db", Reason::Ok, 1),
            raw("db", 0, 1),
            raw("db", 10, 1),
            raw("db", -7, 1),
            raw("", 1, 1),
            raw(&long, 1, 1),
            raw("db", 1, 1_001),
            report("db", Reason::Ok, 1_000),
        ])]))
        .await
        .unwrap();
    assert_eq!((resp.accepted, resp.rejected), (2, 6));
    let got = api.drain();
    assert_eq!(got, [(("db".to_string(), Reason::Ok), 1_001)].into());
    assert_eq!(api.rejected("unspecified_reason"), 1.0);
    assert_eq!(api.rejected("unknown_reason"), 2.0);
    assert_eq!(api.rejected("empty_target"), 1.0);
    assert_eq!(api.rejected("target_too_long"), 1.0);
    assert_eq!(api.rejected("count_too_large"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn unknown_enum_value_on_the_wire_is_rejected() {
    // Hand-encoded: reports { target: "db" (field 1), reason: 99 (field 2) }.
    let report = [0x0a, 0x02, b'd', b'b', 0x10, 99];
    let mut msg = vec![0x0a, report.len() as u8];
    msg.extend_from_slice(&report);
    let api = TestApi::start(|_| {}).await;
    let resp = send_raw(&api.socket, vec![msg]).await.unwrap();
    assert_eq!((resp.accepted, resp.rejected), (0, 1));
    assert!(api.drain().is_empty());
    assert_eq!(api.rejected("unknown_reason"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn garbage_bytes_end_the_stream_as_invalid_keeping_earlier_batches() {
    let api = TestApi::start(|_| {}).await;
    let good = batch(vec![report("db", Reason::Ok, 2)]).encode_to_vec();
    let garbage = vec![0xff; 16];
    let err = send_raw(&api.socket, vec![good.clone(), garbage])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // A target that is not UTF-8 does not decode either.
    let bad_utf8 = vec![0x0a, 0x04, 0x0a, 0x02, 0xc3, 0x28];
    let err = send_raw(&api.socket, vec![bad_utf8]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(api.drain(), [(("db".to_string(), Reason::Ok), 2)].into());
    assert_eq!(api.requests("invalid"), 2.0);
    api.stop().await;
}

#[tokio::test]
async fn oversized_batch_ends_the_stream_keeping_earlier_batches() {
    let api = TestApi::start(|c| c.max_batch_reports = 10).await;
    let big = (0..11).map(|_| report("db", Reason::Ok, 1)).collect();
    let err = api
        .client()
        .report(stream(vec![
            batch(vec![report("db", Reason::Expired, 1)]),
            batch(big),
            batch(vec![report("db", Reason::Timeout, 1)]),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(
        api.drain(),
        [(("db".to_string(), Reason::Expired), 1)].into()
    );
    assert_eq!(api.rejected("batch_too_large"), 11.0);
    assert_eq!(api.requests("resource_exhausted"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn oversized_message_ends_the_stream_keeping_earlier_batches() {
    let api = TestApi::start(|c| c.max_message_bytes = 64 * 1024).await;
    let target = "t".repeat(250);
    let big: Vec<_> = (0..300)
        .map(|_| report(target.as_str(), Reason::Ok, 1))
        .collect();
    assert!(batch(big.clone()).encoded_len() > 64 * 1024);
    let err = api
        .client()
        .report(stream(vec![
            batch(vec![report("db", Reason::Ok, 1)]),
            batch(big),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(api.drain(), [(("db".to_string(), Reason::Ok), 1)].into());
    api.stop().await;
}

#[tokio::test]
async fn stream_over_its_bound_ends_keeping_what_came_before() {
    let api = TestApi::start(|c| {
        c.max_batch_reports = 10;
        c.max_stream_reports = 25;
    })
    .await;
    let ten = || batch((0..10).map(|_| report("db", Reason::Ok, 1)).collect());
    let err = api
        .client()
        .report(stream(vec![ten(), ten(), ten()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("20 reports accepted"), "{err}");
    assert_eq!(api.drain(), [(("db".to_string(), Reason::Ok), 20)].into());
    assert_eq!(api.rejected("stream_too_long"), 10.0);
    api.stop().await;
}

#[tokio::test]
async fn too_many_open_streams_are_refused() {
    let api = TestApi::start(|c| c.max_concurrent_streams = 1).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let client = api.client();
    let held = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }
    });
    tx.send(batch(vec![report("db", Reason::Ok, 1)]))
        .await
        .unwrap();
    // The first stream holds the slot once its batch is counted.
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while api.counter.drain().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first batch is counted");
    // Another connection: the bound is global, not per connection.
    let err = api.client().report(stream(vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    drop(tx);
    let resp = held.await.unwrap().unwrap();
    assert_eq!(resp.accepted, 1);
    api.stop().await;
}

#[tokio::test]
async fn hundred_concurrent_streams_are_all_counted() {
    let api = TestApi::start(|_| {}).await;
    let mut tasks = tokio::task::JoinSet::new();
    let shared = api.client();
    for i in 0..100u64 {
        // Half share one connection, half dial their own.
        let client = if i % 2 == 0 {
            shared.clone()
        } else {
            api.client()
        };
        tasks.spawn(async move {
            let target = format!("t{}", i % 10);
            let batches = (0..3)
                .map(|_| {
                    batch(
                        (0..10)
                            .map(|_| report(target.as_str(), Reason::Ok, 2))
                            .collect(),
                    )
                })
                .collect();
            client.report(stream(batches)).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap().accepted, 30);
    }
    let got = api.drain();
    assert_eq!(got.len(), 10);
    assert!(got.values().all(|n| *n == 10 * 30 * 2), "{got:?}");
    assert_eq!(api.requests("ok"), 100.0);
    api.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_keeping_their_batches() {
    let api = TestApi::start(|_| {}).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let client = api.client();
    let held = tokio::spawn(async move {
        client
            .report(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(batch(vec![report("db", Reason::Refused, 4)]))
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let got = api.drain();
            if !got.is_empty() {
                break got;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the batch is counted");
    assert_eq!(got, [(("db".to_string(), Reason::Refused), 4)].into());
    api.shutdown.cancel();
    let err = held.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    drop(tx);
    api.stop().await;
}

// === Socket handling ===

#[tokio::test]
async fn socket_is_owner_only() {
    let api = TestApi::start(|_| {}).await;
    let mode = std::fs::metadata(&api.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    api.stop().await;
}

/// `serve` at `socket` with default settings, a fresh counter and metrics,
/// and a shutdown that never comes.
fn serve_at(
    socket: &std::path::Path,
) -> Result<
    (
        Bound,
        impl std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
    ),
    ApiError,
> {
    let cfg = ApiConfig {
        socket: socket.to_path_buf(),
        ..ApiConfig::default()
    };
    serve(
        &cfg,
        Counter::default(),
        stores::empty_backend(),
        Arc::new(Metrics::new()),
        CancellationToken::new(),
    )
}

#[tokio::test]
async fn regular_file_at_the_socket_path_is_refused_and_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = serve_at(&path).err().unwrap();
    assert!(matches!(err, ApiError::NotASocket { .. }), "{err}");
    assert_eq!(err.kind(), "not_a_socket");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // A directory is not replaced either.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let err = serve_at(&sub).err().unwrap();
    assert!(matches!(err, ApiError::NotASocket { .. }), "{err}");
    assert!(sub.is_dir());
}

#[tokio::test]
async fn world_writable_socket_directory_is_refused_unless_sticky() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = serve_at(&open.join("api.sock")).err().unwrap();
    assert_eq!(err.kind(), "unsafe_socket_dir", "{err}");
    assert!(!open.join("api.sock").exists());
    // The sticky bit (as on /tmp) keeps others from replacing our socket.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (bound, _) = serve_at(&open.join("api.sock")).expect("a sticky directory is fine");
    assert_eq!(bound.socket, open.join("api.sock"));
}

#[tokio::test]
async fn missing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = serve_at(&dir.path().join("nope").join("api.sock"))
        .err()
        .unwrap();
    assert!(matches!(err, ApiError::NoSocketDir { .. }), "{err}");
}

#[tokio::test]
async fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // A stale socket: bound, then its listener closed.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let cfg = ApiConfig {
        socket: path.clone(),
        ..ApiConfig::default()
    };
    let shutdown = CancellationToken::new();
    let (_, fut) = serve(
        &cfg,
        Counter::default(),
        stores::empty_backend(),
        Arc::new(Metrics::new()),
        shutdown.clone(),
    )
    .unwrap();
    let task = tokio::spawn(fut);
    // The socket is live now: a second server is refused and the first
    // keeps its socket.
    let err = serve_at(&path).err().unwrap();
    assert!(matches!(err, ApiError::InUse { .. }), "{err}");
    assert!(path.exists());
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn dropping_the_future_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (_, fut) = serve_at(&socket).unwrap();
    assert!(socket.exists());
    drop(fut);
    assert!(!socket.exists());
}

// === Config ===

#[test]
fn config_defaults_and_unknown_keys() {
    let cfg: ApiConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, ApiConfig::default());
    assert_eq!(cfg.report_uids, vec![our_uid()]);
    assert_eq!(cfg.socket_mode, 0o600);
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let cfg: ApiConfig = toml::from_str(
        "socket = \"/run/x.sock\"\nsocket_mode = 0o660\nreport_uids = [0, 1000]\nstream_idle_timeout = \"30s\"",
    )
    .unwrap();
    assert_eq!(cfg.socket_mode, 0o660);
    assert_eq!(cfg.report_uids, vec![0, 1000]);
    assert_eq!(cfg.stream_idle_timeout, Duration::from_secs(30));
    assert!(toml::from_str::<ApiConfig>("sockett = \"/x\"").is_err());
}

#[test]
fn config_problems_are_all_listed() {
    let cfg = ApiConfig {
        socket: PathBuf::from("relative.sock"),
        socket_mode: 0o1600,
        report_uids: vec![],
        max_batch_reports: 0,
        max_stream_reports: 0,
        max_message_bytes: 10,
        max_concurrent_streams: 0,
        max_count_per_report: 0,
        stream_idle_timeout: Duration::ZERO,
        ..ApiConfig::default()
    };
    let fields: Vec<_> = cfg.problems().into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        vec![
            "socket",
            "socket_mode",
            "report_uids",
            "max_batch_reports",
            "max_message_bytes",
            "max_concurrent_streams",
            "max_count_per_report",
            "stream_idle_timeout",
        ]
    );
    let cfg = ApiConfig {
        socket: PathBuf::from(format!("/{}", "s".repeat(200))),
        socket_mode: 0o400,
        max_batch_reports: 10,
        max_stream_reports: 5,
        ..ApiConfig::default()
    };
    let fields: Vec<_> = cfg.problems().into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, vec!["socket", "socket_mode", "max_stream_reports"]);
}

#[test]
fn outcomes_map_status_codes() {
    assert_eq!(Outcome::of(Code::Ok), Outcome::Ok);
    assert_eq!(
        Outcome::of(Code::PermissionDenied),
        Outcome::Unauthenticated
    );
    assert_eq!(Outcome::of(Code::Unauthenticated), Outcome::Unauthenticated);
    assert_eq!(Outcome::of(Code::InvalidArgument), Outcome::Invalid);
    assert_eq!(
        Outcome::of(Code::ResourceExhausted),
        Outcome::ResourceExhausted
    );
    assert_eq!(Outcome::of(Code::Unavailable), Outcome::Unavailable);
    assert_eq!(Outcome::of(Code::OutOfRange), Outcome::Invalid);
    assert_eq!(Outcome::of(Code::NotFound), Outcome::NotFound);
    assert_eq!(
        Outcome::of(Code::FailedPrecondition),
        Outcome::FailedPrecondition
    );
    assert_eq!(Outcome::of(Code::Cancelled), Outcome::Error);
}

#[test]
fn watch_bounds_default_and_are_checked() {
    let cfg: ApiConfig = toml::from_str("").unwrap();
    assert_eq!((cfg.watch_buffer, cfg.max_watchers), (256, 64));
    let cfg = ApiConfig {
        watch_buffer: 0,
        max_watchers: 0,
        ..ApiConfig::default()
    };
    let fields: Vec<_> = cfg.problems().into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, vec!["watch_buffer", "max_watchers"]);
    let cfg = ApiConfig {
        watch_buffer: 1_000_000,
        max_watchers: 1_000_000,
        ..ApiConfig::default()
    };
    assert_eq!(cfg.problems().len(), 2, "{:?}", cfg.problems());
}

#[test]
fn authz_ids_must_parse_name_workloads_and_share_one_trust_domain() {
    let cfg: ApiConfig = toml::from_str(
        "[authz]\noperators = [\"spiffe://td.test/ops\"]\nreaders = [\"spiffe://td.test/ro\"]\nreporters = [\"spiffe://td.test/sidecar\"]",
    )
    .unwrap();
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let cfg = ApiConfig {
        authz: AuthzConfig {
            operators: vec!["spiffe://td.test/ops".into(), "ops".into()],
            readers: vec!["spiffe://other.test/ro".into(), "spiffe://td.test".into()],
            reporters: vec!["spiffe://td.test/a/../b".into()],
        },
        ..ApiConfig::default()
    };
    let problems = cfg.problems();
    let fields: Vec<_> = problems.iter().map(|(f, _)| *f).collect();
    assert_eq!(
        fields,
        vec![
            "authz.operators",
            "authz.readers",
            "authz.readers",
            "authz.reporters"
        ]
    );
    assert!(problems[0].1.contains("not a SPIFFE ID"), "{problems:?}");
    assert!(
        problems[1].1.contains("other.test") && problems[1].1.contains("one trust domain"),
        "{problems:?}"
    );
    assert!(problems[2].1.contains("not a workload"), "{problems:?}");
}

#[test]
fn every_rpc_has_a_method_label_a_role_and_a_path() {
    use crate::proto::healer::supervisor_server::SERVICE_NAME;
    for m in Method::ALL {
        let path = format!("/{SERVICE_NAME}/{}", m.rpc_name());
        assert_eq!(Method::from_path(&path), Some(m), "{path}");
    }
    assert_eq!(Method::from_path("/other.Service/GetStatus"), None);
    assert_eq!(Method::from_path("/spire_healer.v1.Supervisor/Nope"), None);
    let mutating: Vec<_> = Method::ALL.into_iter().filter(|m| m.mutates()).collect();
    assert_eq!(
        mutating,
        vec![
            Method::Approve,
            Method::Reject,
            Method::Pause,
            Method::Resume,
            Method::SetDryRun,
            Method::ResetDemotion
        ]
    );
}
