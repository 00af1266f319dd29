//! Frames round-trip through JSON; the recorder keeps its bounds (pre-roll,
//! post-roll, queue, size, hourly budget) at literal times; the writer
//! stores what the recorder hands it.

use std::time::UNIX_EPOCH;

use super::*;
use crate::handshake::{Reason, Source};
use crate::model::{
    AgentDebugView, AgentView, Authority, BootstrapBundleView, CertFileView, EntryLookup,
    EntrySummary, HealthView, MetricsView, PeerCert, ProbeResult, ProbeView, Role, Sample,
    ServerAgent, ServerView, StreamStatus, SvidObservation,
};
use crate::telemetry::metrics::sample;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn peer_cert() -> PeerCert {
    PeerCert {
        spiffe_id: Some("spiffe://example.org/web".into()),
        serial: "0a".into(),
        not_before: t(0),
        not_after: t(3600),
    }
}

/// One of every view, every optional field set.
fn observations() -> Observations {
    let agent = AgentView {
        agent: "node-a".into(),
        status: StreamStatus::Unanswered,
        status_since: t(1),
        last_error: Some("unavailable".into()),
        last_message: Some(t(2)),
        svids: vec![SvidObservation {
            spiffe_id: "spiffe://example.org/web".into(),
            serial: "0a".into(),
            not_before: t(0),
            not_after: t(3600),
            invalid: Some("expired".into()),
            first_seen: t(0),
            issuer: "ab:cd".into(),
        }],
        bundle_authorities: 2,
        bundle: vec!["f1".into(), "f2".into()],
        rotations: 3,
        updated_at: t(4),
    };
    let server = ServerView {
        server: "server-a".into(),
        reachable: true,
        last_error: None,
        since: t(0),
        updated_at: t(4),
        uptime_secs: 99,
        svid_expires_at: Some(t(7200)),
        agents_count: 1,
        entries_count: 5,
        agents: vec![ServerAgent {
            spiffe_id: "spiffe://example.org/spire/agent/x".into(),
            attestation_type: "join_token".into(),
            serial: "01".into(),
            expires_at: t(1800),
            banned: false,
            can_reattest: true,
        }],
        agents_truncated: true,
        bundle: vec![Authority {
            fingerprint: "f1".into(),
            key_id: "k1".into(),
            not_after: t(86_400),
            tainted: true,
        }],
        bundle_sequence: 7,
        entry_lookups: vec![EntryLookup {
            agent: "node-a".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            alias: true,
            entries: Some(vec![EntrySummary {
                id: "e1".into(),
                parent_id: "spiffe://example.org/spire/agent/x".into(),
                selectors: vec!["unix:uid:0".into()],
            }]),
            error: Some("timeout".into()),
        }],
        address_reachable: Some(false),
        address_error: Some("refused".into()),
    };
    let debug = AgentDebugView {
        agent: "node-a".into(),
        reachable: true,
        last_error: Some("x".into()),
        unanswered_since: None,
        updated_at: t(4),
        last_sync_success: Some(t(3)),
        answered_after: None,
        uptime_secs: 10,
        cached_x509_svids: 4,
        spiffe_id: Some("spiffe://example.org/spire/agent/x".into()),
        svid_expires_at: Some(t(1800)),
    };
    let health = HealthView {
        target: "server-a".into(),
        role: Role::Server,
        live: Some(true),
        ready: Some(false),
        last_error: Some("status_503".into()),
        updated_at: t(4),
    };
    let metrics = MetricsView {
        target: "envoy".into(),
        role: Role::Envoy,
        reachable: true,
        last_error: None,
        updated_at: t(4),
        samples: vec![Sample {
            name: "envoy_ssl_handshake".into(),
            labels: vec![("listener".into(), "l1".into())],
            value: 12.5,
        }],
        sync: None,
    };
    let probe_result = ProbeResult {
        reason: Reason::UnknownCa,
        at: t(4),
        latency: Duration::from_millis(12),
        peer: Some(peer_cert()),
        detail: Some("alert".into()),
        peer_refused: true,
    };
    let probe = ProbeView {
        target: "web".into(),
        address: "127.0.0.1:8443".into(),
        expected_id: Some("spiffe://example.org/web".into()),
        cert_file: Some("web-svid".into()),
        last: Some(probe_result.clone()),
        last_peer: Some(probe_result),
        updated_at: t(4),
    };
    let cert_file = CertFileView {
        file: "web-svid".into(),
        path: "/etc/web/svid.pem".into(),
        agent: Some("node-a".into()),
        error: Some("truncated".into()),
        leaf: Some(peer_cert()),
        invalid: Some("expired".into()),
        bundle: vec!["f1".into()],
        bundle_error: Some("missing".into()),
        changed_at: t(3),
        updated_at: t(4),
    };
    let bootstrap = BootstrapBundleView {
        agent: "node-a".into(),
        path: "/etc/spire/bundle.pem".into(),
        read: true,
        authorities: vec!["f1".into()],
        error: Some("empty".into()),
        updated_at: t(4),
    };
    Observations {
        agents: vec![Arc::new(agent)],
        servers: vec![Arc::new(server)],
        agent_debug: vec![Arc::new(debug)],
        health: vec![Arc::new(health)],
        metrics: vec![Arc::new(metrics)],
        probes: vec![Arc::new(probe)],
        cert_files: vec![Arc::new(cert_file)],
        bootstrap_bundles: vec![Arc::new(bootstrap)],
        agent_ids: Arc::new(HashMap::from([(
            "spiffe://example.org/spire/agent/x".to_string(),
            "node-a".to_string(),
        )])),
    }
}

fn outcomes() -> HashMap<Arc<str>, Counts> {
    let mut c = Counts::default();
    c.add(Reason::UnknownCa, 7, Source::Probe);
    c.add(Reason::Ok, 3, Source::Report);
    HashMap::from([(Arc::from("web"), c)])
}

#[test]
fn a_frame_of_every_view_round_trips() {
    let obs = observations();
    let frame = Frame {
        format: FORMAT,
        at: t(5),
        observations: obs.clone(),
        handshakes: vec![HandshakeOutcomes::from_counts("web", &outcomes()["web"])],
    };
    let json = serde_json::to_string(&frame).unwrap();
    let back: Frame = serde_json::from_str(&json).unwrap();
    assert_eq!(back, frame);
    // Each view type on its own, too.
    let v = serde_json::to_value(&obs).unwrap();
    for key in [
        "agents",
        "servers",
        "agent_debug",
        "health",
        "metrics",
        "probes",
        "cert_files",
        "bootstrap_bundles",
    ] {
        assert_eq!(v[key].as_array().map(Vec::len), Some(1), "{key}");
    }
    assert_eq!(
        v["agent_ids"]["spiffe://example.org/spire/agent/x"],
        "node-a"
    );
    // Handshake outcomes come back as the counter counted them.
    assert_eq!(back.handshakes[0].to_counts(), outcomes()["web"]);
    assert_eq!(
        serde_json::to_value(&back.handshakes[0]).unwrap(),
        serde_json::json!({
            "target": "web",
            "counts": {"ok": 3, "unknown_ca": 7},
            "sources": ["probe", "report"],
        })
    );
}

#[test]
fn frames_read_what_json_cannot_hold_and_what_older_frames_lack() {
    // NaN (a Prometheus value) is written as null and read back as NaN.
    let mut obs = Observations::default();
    let mut m = (*observations().metrics[0]).clone();
    m.samples[0].value = f64::NAN;
    obs.metrics.push(Arc::new(m));
    let json = serde_json::to_string(&obs).unwrap();
    let back: Observations = serde_json::from_str(&json).unwrap();
    assert!(back.metrics[0].samples[0].value.is_nan());
    // A frame from before a sensor existed (no key) reads as empty.
    let old = r#"{"format":1,"at":{"secs_since_epoch":1700000000,"nanos_since_epoch":0},
                 "observations":{"agents":[]}}"#;
    let f: Frame = serde_json::from_str(old).unwrap();
    assert!(f.observations.bootstrap_bundles.is_empty() && f.handshakes.is_empty());
}

// === Recorder bounds ===

fn cfg(pre: u64, post: u64) -> ReplayConfig {
    ReplayConfig {
        pre_roll: Duration::from_secs(pre),
        post_roll: Duration::from_secs(post),
        ..ReplayConfig::default()
    }
}

/// Seqs and times (s) of the frames queued for the writer so far.
fn queued(w: &mut FrameWriter) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while let Ok(p) = w.rx.try_recv() {
        let secs = p.at.duration_since(t(0)).unwrap().as_secs();
        out.push((p.seq, secs));
    }
    out
}

fn metric(m: &Metrics, outcome: &str) -> f64 {
    sample(
        &m.render(),
        &format!(r#"spire_healer_replay_frames_total{{outcome="{outcome}"}}"#),
    )
    .unwrap_or(0.0)
}

#[test]
fn quiet_ticks_wait_in_the_pre_roll_and_symptoms_write_it_then_the_post_roll() {
    let metrics = Arc::new(Metrics::new());
    let (rec, mut w) = FrameRecorder::new(&cfg(2, 3), "run", metrics.clone());
    let obs = Observations::default();
    let none = HashMap::new();
    // t0..t5: quiet; nothing leaves memory.
    for s in 0..=5 {
        rec.observe(&obs, &none, false, t(s));
    }
    assert_eq!(queued(&mut w), []);
    // t6: a symptom. The last 2 s before it come along (t4, t5).
    rec.observe(&obs, &none, true, t(6));
    assert_eq!(queued(&mut w), [(4, 4), (5, 5), (6, 6)]);
    // Quiet again: written until 3 s after the last symptom, t9 included.
    for s in 7..=11 {
        rec.observe(&obs, &none, false, t(s));
    }
    assert_eq!(queued(&mut w), [(7, 7), (8, 8), (9, 9)]);
    // t12: a symptom again; the pre-roll (t10, t11) has the tick numbers
    // that show nothing is missing since t9.
    rec.observe(&obs, &none, true, t(12));
    assert_eq!(queued(&mut w), [(10, 10), (11, 11), (12, 12)]);
    // A long quiet stretch keeps only the pre-roll in memory.
    for s in 16..100 {
        rec.observe(&obs, &none, false, t(s));
    }
    let ring = rec.state.lock().unwrap().ring.len();
    assert_eq!(ring, 3, "t97, t98, t99");
    assert_eq!(metric(&metrics, "queue_full"), 0.0);
}

#[test]
fn a_full_queue_drops_frames_and_counts_them() {
    let metrics = Arc::new(Metrics::new());
    let (rec, mut w) = FrameRecorder::with_queue(&cfg(10, 0), 2, "run", metrics.clone());
    let obs = Observations::default();
    let none = HashMap::new();
    for s in 0..3 {
        rec.observe(&obs, &none, false, t(s));
    }
    // Four frames for a queue of two: the pre-roll's oldest fit.
    rec.observe(&obs, &none, true, t(3));
    assert_eq!(queued(&mut w), [(0, 0), (1, 1)]);
    assert_eq!(metric(&metrics, "queue_full"), 2.0);
    // Drained: the next symptom tick goes through.
    rec.observe(&obs, &none, true, t(4));
    assert_eq!(queued(&mut w), [(4, 4)]);
}

fn pending(seq: u64, at: SystemTime) -> Pending {
    Pending {
        seq,
        at,
        observations: observations(),
        handshakes: outcomes(),
    }
}

#[test]
fn oversize_frames_and_frames_past_the_hourly_budget_are_dropped_and_counted() {
    let metrics = Arc::new(Metrics::new());
    let size = {
        let (_, mut w) = FrameRecorder::new(&ReplayConfig::default(), "run", metrics.clone());
        w.encode(vec![pending(0, t(0))])[0].frame.len()
    };
    // Frames fit, and three fit in the hour's budget.
    let budget = ReplayConfig {
        max_frame_bytes: size,
        max_bytes_per_hour: 3 * size as u64,
        ..ReplayConfig::default()
    };
    let (_, mut w) = FrameRecorder::new(&budget, "run", metrics.clone());
    let hour = 3600 - 1_700_000_000 % 3600;
    let rows = w.encode((0..5).map(|i| pending(i, t(hour + i))).collect());
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(metric(&metrics, "over_budget"), 2.0);
    // The next hour has its own budget.
    let rows = w.encode(vec![pending(5, t(hour + 3600))]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].at_ms, unix_millis(t(hour + 3600)));
    assert_eq!(rows[0].run_id, "run");

    // One byte less than the frame: oversize.
    let small = ReplayConfig {
        max_frame_bytes: size - 1,
        ..ReplayConfig::default()
    };
    let (_, mut w) = FrameRecorder::new(&small, "run", metrics.clone());
    assert!(w.encode(vec![pending(0, t(0))]).is_empty());
    assert_eq!(metric(&metrics, "oversize"), 1.0);
}

#[tokio::test]
async fn the_writer_stores_frames_until_the_loop_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let (_, store) = crate::knowledge::frames::open(&url).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let (rec, w) = FrameRecorder::new(&cfg(1, 1), "run-1", metrics.clone());
    let task = tokio::spawn(w.run(store.clone(), CancellationToken::new()));
    let obs = observations();
    rec.observe(&obs, &outcomes(), false, t(0));
    rec.observe(&obs, &HashMap::new(), true, t(1));
    rec.observe(&obs, &HashMap::new(), false, t(2));
    rec.observe(&obs, &HashMap::new(), false, t(3));
    // The loop stops: the recorder goes, the writer lands what is queued.
    drop(rec);
    task.await.unwrap();
    let rows = store.read(0, i64::MAX, None, 10).await.unwrap();
    let seqs: Vec<(i64, i64)> = rows.iter().map(|r| (r.seq, r.at_ms)).collect();
    assert_eq!(
        seqs,
        [
            (0, unix_millis(t(0))),
            (1, unix_millis(t(1))),
            (2, unix_millis(t(2)))
        ]
    );
    let first: Frame = serde_json::from_str(&rows[0].frame).unwrap();
    assert_eq!(first.observations, obs);
    assert_eq!(first.handshakes[0].to_counts(), outcomes()["web"]);
    assert_eq!(metric(&metrics, "written"), 3.0);
}

#[tokio::test]
async fn a_shutdown_writes_what_is_queued_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let (_, store) = crate::knowledge::frames::open(&url).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let (rec, w) = FrameRecorder::new(&cfg(0, 0), "run-1", metrics.clone());
    let obs = Observations::default();
    rec.observe(&obs, &HashMap::new(), true, t(0));
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    // Cancelled before it started: the queued frame still lands.
    w.run(store.clone(), shutdown).await;
    assert_eq!(store.read(0, i64::MAX, None, 10).await.unwrap().len(), 1);
    // The writer is gone: the loop's next frame is dropped, counted.
    rec.observe(&obs, &HashMap::new(), true, t(1));
    assert_eq!(metric(&metrics, "queue_full"), 1.0);
}

#[tokio::test]
async fn pruning_deletes_what_is_older_than_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let (_, store) = crate::knowledge::frames::open(&url).await.unwrap();
    let rows: Vec<StoredFrame> = (0..10)
        .map(|i| StoredFrame {
            run_id: "r".into(),
            seq: i,
            at_ms: unix_millis(t(i as u64 * 3600)),
            frame: "{}".into(),
        })
        .collect();
    store.insert(&rows).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let clock = Arc::new(crate::clock::ManualClock::new(t(9 * 3600)));
    let shutdown = CancellationToken::new();
    // Keep 4 h: the frames at 5 h .. 9 h stay. The store's pruner does it
    // (every other kind of row kept here).
    let keep = crate::knowledge::retention::RetentionConfig {
        svids: Duration::ZERO,
        holds: Duration::ZERO,
        incidents: Duration::ZERO,
        audit: Duration::ZERO,
    };
    let pruner = crate::knowledge::retention::Pruner::new(&store);
    let task = tokio::spawn(pruner.run(
        keep,
        Duration::from_secs(4 * 3600),
        Duration::from_secs(3600),
        clock,
        metrics.clone(),
        shutdown.clone(),
    ));
    // The first pass runs at once; wait for its count, not for time.
    tokio::time::timeout(Duration::from_secs(10), async {
        while metric(&metrics, "pruned") < 5.0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first pass prunes");
    shutdown.cancel();
    task.await.unwrap();
    let left = store.read(0, i64::MAX, None, 100).await.unwrap();
    assert_eq!(
        left.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [5, 6, 7, 8, 9]
    );
    assert_eq!(metric(&metrics, "pruned"), 5.0);
}
