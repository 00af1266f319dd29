//! `ReportHandshakes` ingest over the Unix socket: N concurrent reporter
//! streams (one connection each) send batches of reports for a fixed time;
//! the server folds them into the shared counter, which a tick-like task
//! drains every second. Prints outcomes/s (server side, from
//! `spire_healer_handshakes_total`) and the process's peak and current RSS
//! (client and server share the process).
//!
//! Throughput: `cargo bench --bench report_ingest`
//! Storm (RSS every 30 s): `REPORT_STORM_SECS=600 cargo bench --bench report_ingest`
//!
//! Knobs (environment): `REPORT_STREAMS` (8), `REPORT_BATCH` (1000 reports
//! per batch), `REPORT_TARGETS` (distinct targets, 1000), `REPORT_SECS`
//! (10), `REPORT_STORM_SECS` (storm mode; overrides `REPORT_SECS`),
//! `REPORT_BATCHES_PER_STREAM` (500; a reporter then opens a new stream).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use spire_healer::api::reports::report;
use spire_healer::api::{ApiConfig, ReportClient, serve};
use spire_healer::handshake::{Counter, Reason};
use spire_healer::proto::healer::ReportHandshakesRequest;
use spire_healer::telemetry::metrics::Metrics;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (VmHWM, VmRSS) in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn batch(stream: u64, size: u64, targets: u64) -> ReportHandshakesRequest {
    ReportHandshakesRequest {
        reports: (0..size)
            .map(|i| {
                let n = stream * size + i;
                let reason = Reason::ALL[(n % 7 % Reason::COUNT as u64) as usize];
                report(
                    format!("spiffe://bench.example/svc-{}", n % targets),
                    reason,
                    1,
                )
            })
            .collect(),
    }
}

fn main() {
    let streams = knob("REPORT_STREAMS", 8);
    let batch_size = knob("REPORT_BATCH", 1_000);
    let targets = knob("REPORT_TARGETS", 1_000);
    let storm = std::env::var("REPORT_STORM_SECS").is_ok();
    let secs = if storm {
        knob("REPORT_STORM_SECS", 600)
    } else {
        knob("REPORT_SECS", 10)
    };
    let per_stream = knob("REPORT_BATCHES_PER_STREAM", 500);

    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = ApiConfig {
            socket: dir.path().join("api.sock"),
            ..ApiConfig::default()
        };
        let counter = Counter::default();
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let store = spire_healer::knowledge::open(
            dir.path().join("store.db").to_str().expect("utf-8 temp path"),
        )
        .await
        .expect("open a store");
        let backend = spire_healer::api::Backend {
            store,
            controls: spire_healer::control::Controls::resume(
                false,
                &[],
                &[],
                &[],
                Arc::new(tokio::sync::Notify::new()),
            ),
            hub: spire_healer::control::Hub::new(16),
            status: tokio::sync::watch::channel(spire_healer::control::Status::default()).1,
            clock: Arc::new(spire_healer::clock::SystemClock),
            leader_epoch: None,
        };
        let (_, server) = serve(
            &cfg,
            counter.clone(),
            backend,
            metrics.clone(),
            shutdown.clone(),
        )
        .expect("bind the API socket");
        let server = tokio::spawn(server);
        // What the supervisor's tick does with the counter.
        let drainer = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break,
                        _ = every.tick() => drop(counter.drain()),
                    }
                }
            }
        });
        let outcomes = metrics.handshakes_total.clone();
        let counted = move || -> u64 {
            Reason::ALL
                .iter()
                .map(|r| outcomes.with_label_values(&["report", r.as_str()]).get())
                .sum()
        };

        println!(
            "report_ingest: {streams} streams x {batch_size} reports/batch, {targets} targets, {secs} s{}",
            if storm { " (storm)" } else { "" }
        );
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let mut reporters = tokio::task::JoinSet::new();
        for s in 0..streams {
            let client = ReportClient::connect_unix(&cfg.socket).expect("client");
            let b = batch(s, batch_size, targets);
            reporters.spawn(async move {
                let mut accepted = 0u64;
                while Instant::now() < deadline {
                    let b = b.clone();
                    let batches = futures::stream::iter(0..per_stream)
                        .take_while(move |_| std::future::ready(Instant::now() < deadline))
                        .map(move |_| b.clone());
                    let resp = client.report(batches).await.expect("report stream");
                    accepted += resp.accepted;
                }
                accepted
            });
        }

        if storm {
            let mut every = tokio::time::interval_at(
                start + Duration::from_secs(30),
                Duration::from_secs(30),
            );
            let mut last = 0;
            while Instant::now() < deadline {
                every.tick().await;
                let now = counted();
                let (hwm, rss) = rss_kib();
                println!(
                    "  t={:>4.0}s  {:>9.0} outcomes/s  VmRSS {:>7} KiB  VmHWM {:>7} KiB",
                    start.elapsed().as_secs_f64(),
                    (now - last) as f64 / 30.0,
                    rss,
                    hwm
                );
                last = now;
            }
        }

        let mut accepted = 0;
        while let Some(r) = reporters.join_next().await {
            accepted += r.expect("reporter task");
        }
        let elapsed = start.elapsed().as_secs_f64();
        let total = counted();
        assert_eq!(total, accepted, "server and clients agree");
        let (hwm, rss) = rss_kib();
        println!(
            "outcomes: {total} in {elapsed:.1} s = {:.0} outcomes/s",
            total as f64 / elapsed
        );
        println!("peak RSS (VmHWM): {hwm} KiB; RSS now (VmRSS): {rss} KiB");

        shutdown.cancel();
        server.await.expect("server task").expect("server");
        drainer.await.expect("drainer task");
    });
}
