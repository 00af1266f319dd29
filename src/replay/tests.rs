//! End to end: the real supervisor runs a scripted fleet under one policy
//! while the frame recorder records (as the loop will call it); a replay
//! of those frames under a policy whose ladder starts elsewhere shows,
//! side by side, the recorded refetch and the replayed restart at the same
//! incident and time, and where its memory started afresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::actuators::{Actuator, ActuatorError, Registry};
use crate::clock::{Clock, ManualClock};
use crate::knowledge::{Buffer, Knowledge};
use crate::model::{
    AgentView, Observations, Outcome, Reading, Step, StreamStatus, SvidObservation,
};
use crate::policy::{Policy, Rung};
use crate::sensors::{Sensor, SensorError};
use crate::supervisor::{Operator, Parts, Supervisor, Targets};
use crate::telemetry::{Health, Metrics};

const SPIFFE_ID: &str = "spiffe://example.org/workload/web";

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn ms(secs: u64) -> i64 {
    crate::clock::unix_millis(t(secs))
}

/// Agent `a` serving `serial`, valid for 100 s from `from`.
fn svids(serial: &str, from: u64) -> Vec<SvidObservation> {
    vec![SvidObservation {
        spiffe_id: SPIFFE_ID.into(),
        serial: serial.into(),
        not_before: t(from),
        not_after: t(from + 100),
        invalid: None,
        first_seen: t(from),
        issuer: String::new(),
    }]
}

/// The Workload API view of agent `a`, stamped with the clock as a live
/// sensor does; remembers what it returned (what the tick sensed).
struct AgentSensor {
    view: Arc<Mutex<AgentView>>,
    clock: Arc<ManualClock>,
    sensed: Arc<Mutex<Vec<Reading>>>,
}

#[async_trait]
impl Sensor for AgentSensor {
    fn name(&self) -> &'static str {
        "workload_api"
    }
    fn instance(&self) -> &str {
        "a"
    }
    async fn observe(&self) -> Result<Vec<Reading>, SensorError> {
        let mut v = self.view.lock().unwrap().clone();
        v.updated_at = self.clock.now();
        let r = vec![Reading::WorkloadApi(Arc::new(v))];
        *self.sensed.lock().unwrap() = r.clone();
        Ok(r)
    }
}

type Effect = Box<dyn Fn() + Send + Sync>;

/// Answers `Ok` after running its effect; counts its runs.
#[derive(Default)]
struct FakeActuator {
    runs: AtomicUsize,
    effect: Option<Effect>,
}

#[async_trait]
impl Actuator for FakeActuator {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn execute(&self, _step: &Step) -> Result<Outcome, ActuatorError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if let Some(f) = &self.effect {
            f();
        }
        Ok(Outcome::ok(serde_json::json!({})))
    }
}

fn rung(actuator: &str, verify_secs: u64) -> Rung {
    Rung {
        actuator: actuator.into(),
        timeout: Duration::from_secs(5),
        verify_within: Duration::from_secs(verify_secs),
        cooldown: None,
        approval: None,
    }
}

/// The built-in policy with `ladder` for `svid_rotation_overdue`.
fn policy(ladder: Vec<Rung>) -> Policy {
    let mut p = Policy::builtin().unwrap();
    // Overdue at the rotation point itself (the check slack is tested in
    // `analyze`).
    p.thresholds.rotation_check_slack = Duration::ZERO;
    p.ladders.insert("svid_rotation_overdue".into(), ladder);
    p
}

#[tokio::test]
async fn a_replay_under_another_ladder_shows_the_recorded_refetch_beside_the_replayed_restart() {
    // === Record: the live loop under refetch → restart-agent ===
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let (store, frames) = crate::knowledge::frames::open(&url).await.unwrap();
    let clock = Arc::new(ManualClock::new(t(50)));
    let view = Arc::new(Mutex::new(AgentView {
        agent: "a".into(),
        status: StreamStatus::Up,
        status_since: t(0),
        last_error: None,
        last_message: Some(t(0)),
        svids: svids("01", 0),
        bundle_authorities: 1,
        bundle: Vec::new(),
        rotations: 0,
        updated_at: t(0),
    }));
    let sensed = Arc::new(Mutex::new(Vec::new()));
    // The restart works: the agent serves a new serial from now on.
    let restart = Arc::new(FakeActuator {
        runs: AtomicUsize::new(0),
        effect: Some({
            let (view, clock) = (view.clone(), clock.clone());
            Box::new(move || {
                let at = clock.now().duration_since(t(0)).unwrap().as_secs();
                view.lock().unwrap().svids = svids(&format!("r{at}"), at);
            })
        }),
    });
    let refetch = Arc::new(FakeActuator::default());
    let actuators: Registry = HashMap::from([
        ("refetch".to_string(), refetch.clone() as Arc<dyn Actuator>),
        (
            "restart-agent".to_string(),
            restart.clone() as Arc<dyn Actuator>,
        ),
    ]);
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::new());
    let mut sup = Supervisor::new(
        Parts {
            clock: clock.clone(),
            sensors: vec![Box::new(AgentSensor {
                view: view.clone(),
                clock: clock.clone(),
                sensed: sensed.clone(),
            })],
            actuators,
            policy: policy(vec![rung("refetch", 4), rung("restart-agent", 20)]),
            operator: Operator::detached(false),
            buffer: Buffer::new(store.clone(), 10_000),
            metrics: metrics.clone(),
            health: Arc::new(Health::new(Duration::from_secs(60))),
            wake: wake.clone(),
            tick_interval: Duration::from_secs(1),
            handshakes: crate::handshake::Counter::default(),
            targets: Targets::new(["a".to_string()], [], HashMap::new()),
        },
        Knowledge::default(),
    );
    let cfg = ReplayConfig {
        pre_roll: Duration::from_secs(10),
        post_roll: Duration::from_secs(5),
        ..ReplayConfig::default()
    };
    let (recorder, writer) = FrameRecorder::new(&cfg, "run-1", metrics.clone());
    let writing = tokio::spawn(writer.run(frames.clone(), CancellationToken::new()));
    for s in 50..=150 {
        clock.set(t(s));
        let report = sup.tick(t(s)).await;
        // What the loop will call after analysis (see the module docs).
        let mut obs = Observations::default();
        for r in sensed.lock().unwrap().iter() {
            obs.push(r.clone());
        }
        recorder.observe(&obs, &HashMap::new(), !report.symptoms.is_empty(), t(s));
        if !report.started.is_empty() {
            tokio::time::timeout(Duration::from_secs(5), wake.notified())
                .await
                .expect("the action reports back");
        }
    }
    drop(recorder);
    writing.await.unwrap();
    assert_eq!(
        refetch.runs.load(Ordering::SeqCst),
        2,
        "one refetch per episode"
    );
    assert_eq!(
        restart.runs.load(Ordering::SeqCst),
        2,
        "one restart per episode"
    );

    // === Replay: restart-agent first ===
    let other = policy(vec![rung("restart-agent", 20), rung("refetch", 4)]);
    let fake = || Arc::new(FakeActuator::default()) as Arc<dyn Actuator>;
    let setup = Setup {
        policy: other,
        actuators: HashMap::from([
            ("refetch".to_string(), fake()),
            ("restart-agent".to_string(), fake()),
        ]),
        agents: vec!["a".into()],
        peers: Vec::new(),
    };
    let replayed = replay(&frames, &setup, t(0), t(1_000)).await.unwrap();
    // Two episodes, recorded apart: two segments, the second after a gap.
    let segments = &replayed.segments;
    assert_eq!(segments.len(), 2, "{segments:?}");
    assert_eq!(segments[0].start, SegmentStart::First);
    let SegmentStart::Gap {
        missing_ticks,
        after_ms,
    } = segments[1].start
    else {
        panic!("the second segment starts after a gap: {segments:?}");
    };
    assert_eq!(after_ms, segments[0].to_ms);
    let gap_ticks = (segments[1].from_ms - segments[0].to_ms) / 1_000 - 1;
    assert_eq!(missing_ticks, u64::try_from(gap_ticks).unwrap());
    // Each segment starts with the pre-roll: 10 quiet ticks.
    assert_eq!(segments[0].from_ms, ms(55), "{segments:?}");
    assert_eq!(replayed.unreadable, 0);
    // The replay executed nothing.
    assert_eq!(refetch.runs.load(Ordering::SeqCst), 2);
    assert_eq!(restart.runs.load(Ordering::SeqCst), 2);

    let (recorded, complete) = compare::recorded_decisions(&*store, ms(0), ms(1_000))
        .await
        .unwrap();
    assert!(complete);
    let report = Report::new("other.toml", t(0), t(1_000), replayed, recorded, true);

    // At each incident's first decision: the recorded refetch, the
    // replayed restart, on the same row.
    let subject = format!("svid:a/{SPIFFE_ID}");
    let firsts: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| {
            r.subject == subject
                && r.recorded.iter().any(|d| {
                    matches!(&d.kind, DecisionKind::Acted { actuator, rung: 0, .. } if actuator == "refetch")
                })
        })
        .collect();
    assert_eq!(firsts.len(), 2, "{:#?}", report.rows);
    for row in &firsts {
        assert_eq!(row.symptom, "svid_rotation_overdue");
        assert!(row.replayed_frames);
        assert!(
            matches!(
                row.replayed.as_slice(),
                [Decision { kind: DecisionKind::Acted { actuator, rung: 0, .. }, .. }] if actuator == "restart-agent"
            ),
            "{row:#?}"
        );
    }
    // The replay never reached for the refetch before its restart was
    // judged: it is in flight when the recorded loop escalated.
    let replayed_refetch = report.rows.iter().any(|r| {
        r.replayed.iter().any(
            |d| matches!(&d.kind, DecisionKind::Acted { actuator, .. } if actuator == "refetch"),
        )
    });
    assert!(!replayed_refetch, "{:#?}", report.rows);
    // The recorded restart shows beside what the replay did then.
    assert!(report.rows.iter().any(|r| r.recorded.iter().any(|d| {
        matches!(&d.kind, DecisionKind::Acted { actuator, rung: 1, verification, .. }
            if actuator == "restart-agent" && verification.as_deref() == Some("verified"))
    })));

    let text = report.table();
    let line = text
        .lines()
        .find(|l| l.contains("acted refetch (rung 0"))
        .expect("a recorded refetch line");
    assert!(line.contains("would act restart-agent (rung 0)"), "{text}");
    assert!(text.contains("memory reset"), "{text}");
}

#[tokio::test]
async fn the_command_line_replays_a_store_and_prints_json() {
    // A store with frames but no decisions: a replay that opens an
    // incident the recorded loop never acted on.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let url = format!("sqlite://{}", db.display());
    let (_, frames) = crate::knowledge::frames::open(&url).await.unwrap();
    let mut obs = Observations::default();
    obs.agents.push(Arc::new(AgentView {
        agent: "a".into(),
        status: StreamStatus::Up,
        status_since: t(0),
        last_error: None,
        last_message: Some(t(0)),
        svids: svids("01", 0),
        bundle_authorities: 1,
        bundle: Vec::new(),
        rotations: 0,
        updated_at: t(0),
    }));
    let good = |i: u64| {
        let mut o = obs.clone();
        let mut v = (*o.agents[0]).clone();
        v.updated_at = t(70 + i);
        o.agents[0] = Arc::new(v);
        crate::knowledge::frames::StoredFrame {
            run_id: "r".into(),
            seq: i as i64,
            at_ms: ms(70 + i),
            frame: serde_json::to_string(&Frame {
                format: frames::FORMAT,
                at: t(70 + i),
                observations: o,
                handshakes: Vec::new(),
            })
            .unwrap(),
        }
    };
    // Ticks 0 to 2, tick 3 unreadable, tick 4.
    let mut rows: Vec<_> = (0..3).map(good).collect();
    rows.push(crate::knowledge::frames::StoredFrame {
        frame: "{\"format\": 1, \"at\": garbage".into(),
        ..good(3)
    });
    rows.push(good(4));
    frames.insert(&rows).await.unwrap();
    let config = dir.path().join("spire-healer.toml");
    std::fs::write(
        &config,
        "[[agents]]\nname = \"a\"\naddress = \"unix:///run/spire/agent.sock\"\n\
         [actuators.restart-agent]\ntype = \"command\"\nargv = [\"/bin/true\"]\n",
    )
    .unwrap();
    let policy_file = dir.path().join("other.toml");
    // The default policy, overdue at the rotation point itself (the frames'
    // SVID runs from t(0) to t(100)).
    let default = include_str!("../../policies/default.toml");
    assert!(default.contains("rotation_check_slack = \"10s\""));
    std::fs::write(
        &policy_file,
        default.replace(
            "rotation_check_slack = \"10s\"",
            "rotation_check_slack = \"0s\"",
        ),
    )
    .unwrap();
    let args = ReplayArgs {
        store: Some(url),
        config,
        since: "2023-11-14T22:13:20Z".into(),
        until: Some("2023-11-14T22:30:00Z".into()),
        policy: policy_file,
        output: cli::Format::Json,
    };
    let clock = ManualClock::new(t(1_000));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let env = |_: &str| None;
    let code = cli::run_with(&args, &env, &clock, &mut out, &mut err).await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["frames"], 4);
    assert_eq!(report["unreadable_frames"], 1);
    assert_eq!(report["segments"][0]["start"]["kind"], "first");
    // The unreadable frame is a gap: the memory starts afresh after it.
    assert_eq!(report["segments"][1]["start"]["kind"], "gap");
    assert_eq!(report["segments"][1]["start"]["missing_ticks"], 1);
    // The default ladder starts with refetch, which applies to agent `a`.
    let row = &report["rows"][0];
    assert_eq!(row["symptom"], "svid_rotation_overdue");
    assert_eq!(row["recorded"], serde_json::json!([]));
    assert_eq!(row["replayed"][0]["actuator"], "refetch");
    assert_eq!(row["replayed"][0]["decision"], "acted");

    // Bad input: exit 64 and a message naming the problem.
    let bad = ReplayArgs {
        since: "yesterday-ish".into(),
        ..args
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        cli::run_with(&bad, &env, &clock, &mut out, &mut err).await,
        64
    );
    let msg = String::from_utf8(err).unwrap();
    assert!(
        msg.contains("--since") && msg.contains("yesterday-ish"),
        "{msg}"
    );
}
