//! The loop driven tick by tick with literal times: fake sensors and
//! actuators, a real SQLite store, the built-in policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::json;
use tempfile::TempDir;
use tokio::sync::Notify;

use super::*;
use crate::actuators::{Actuator, ActuatorError, Registry};
use crate::clock::{Clock, ManualClock, unix_millis};
use crate::knowledge::{
    self, ActionRecord, ApprovalRecord, AuditRecord, HoldRecord, IncidentRecord, Knowledge, Query,
    Store, StoreError, SvidRecord,
};
use crate::model::{
    AgentView, Event, Outcome, Reading, Step, StreamStatus, SvidObservation, SymptomKind,
    Verification,
};
use crate::policy::{Policy, Rung};
use crate::sensors::{Sensor, SensorError};
use crate::telemetry::metrics::sample;
use crate::telemetry::{Health, Metrics};

/// `secs` seconds into the test's timeline.
fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

const HOUR: Duration = Duration::from_secs(3600);
const SPIFFE_ID: &str = "spiffe://example.org/workload/web";
/// Generous bound for a spawned fake action to report back.
const WAIT: Duration = Duration::from_secs(5);

// === Fixtures ===

fn svid(serial: &str, from: u64, to: u64) -> SvidObservation {
    SvidObservation {
        spiffe_id: SPIFFE_ID.to_string(),
        serial: serial.to_string(),
        not_before: t(from),
        not_after: t(to),
        invalid: None,
        first_seen: t(from),
        issuer: String::new(),
    }
}

/// Agent `agent`, stream up since t(0), serving serial `01` valid from t(0)
/// to t(100): overdue from t(65) under the built-in thresholds.
fn view(agent: &str) -> AgentView {
    AgentView {
        agent: agent.to_string(),
        status: StreamStatus::Up,
        status_since: t(0),
        last_error: None,
        last_message: Some(t(0)),
        svids: vec![svid("01", 0, 100)],
        bundle_authorities: 1,
        bundle: Vec::new(),
        rotations: 0,
        updated_at: t(0),
    }
}

/// The view a fake sensor serves. While `heartbeat` is on, `updated_at` is
/// stamped with the clock on every observation, as a live sensor task does.
#[derive(Clone)]
struct AgentHandle {
    view: Arc<Mutex<AgentView>>,
    heartbeat: Arc<AtomicBool>,
}

impl AgentHandle {
    fn new(view: AgentView) -> Self {
        Self {
            view: Arc::new(Mutex::new(view)),
            heartbeat: Arc::new(AtomicBool::new(true)),
        }
    }

    fn update(&self, f: impl FnOnce(&mut AgentView)) {
        f(&mut self.view.lock().unwrap());
    }

    /// The agent rotates: serial `serial`, valid for 100 s from `at`.
    fn rotate(&self, serial: &str, at: u64) {
        self.update(|v| v.svids = vec![svid(serial, at, at + 100)]);
    }

    /// The stream drops at `at`.
    fn drop_stream(&self, at: u64) {
        self.update(|v| {
            v.status = StreamStatus::Down;
            v.status_since = t(at);
            v.last_error = Some("unavailable".into());
        });
    }
}

struct FakeSensor {
    agent: String,
    handle: AgentHandle,
    clock: Arc<ManualClock>,
}

#[async_trait]
impl Sensor for FakeSensor {
    fn name(&self) -> &'static str {
        "workload_api"
    }
    fn instance(&self) -> &str {
        &self.agent
    }
    async fn observe(&self) -> Result<Vec<Reading>, SensorError> {
        let mut v = self.handle.view.lock().unwrap().clone();
        if self.handle.heartbeat.load(Ordering::SeqCst) {
            v.updated_at = self.clock.now();
        }
        Ok(vec![Reading::WorkloadApi(Arc::new(v))])
    }
}

type Effect = Box<dyn Fn() + Send + Sync>;

/// Records every step it is given and answers `Ok`, running `effect` first
/// (e.g. "the restart healed the agent").
#[derive(Default)]
struct FakeActuator {
    calls: Mutex<Vec<Step>>,
    effect: Mutex<Option<Effect>>,
    /// Set: every run is held at execute time with this reason.
    held: Mutex<Option<&'static str>>,
}

impl FakeActuator {
    fn hold_with(&self, reason: &'static str) {
        *self.held.lock().unwrap() = Some(reason);
    }

    fn on_run(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.effect.lock().unwrap() = Some(Box::new(f));
    }

    fn calls(&self) -> Vec<Step> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Actuator for FakeActuator {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        self.calls.lock().unwrap().push(step.clone());
        if let Some(reason) = *self.held.lock().unwrap() {
            return Ok(Outcome::held(reason, json!({ "fake": true })));
        }
        if let Some(f) = &*self.effect.lock().unwrap() {
            f();
        }
        Ok(Outcome::ok(json!({ "fake": true })))
    }
}

/// Delegates to a real store but fails every call while `down` is set.
struct FlakyStore {
    inner: Arc<dyn Store>,
    down: AtomicBool,
}

impl FlakyStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for FlakyStore {
    fn backend(&self) -> &'static str {
        "flaky"
    }
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.apply(events).await
    }
    async fn load_knowledge(&self, since: SystemTime) -> Result<Knowledge, StoreError> {
        self.check()?;
        self.inner.load_knowledge(since).await
    }
    async fn incidents(&self, q: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
        self.check()?;
        self.inner.incidents(q).await
    }
    async fn actions(&self, q: &Query) -> Result<Vec<ActionRecord>, StoreError> {
        self.check()?;
        self.inner.actions(q).await
    }
    async fn svids(&self, q: &Query) -> Result<Vec<SvidRecord>, StoreError> {
        self.check()?;
        self.inner.svids(q).await
    }
    async fn holds(&self, q: &Query) -> Result<Vec<HoldRecord>, StoreError> {
        self.check()?;
        self.inner.holds(q).await
    }
    async fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError> {
        self.check()?;
        self.inner.incident(id).await
    }
    async fn approvals(&self, q: &Query) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.check()?;
        self.inner.approvals(q).await
    }
    async fn audit(&self, q: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        self.check()?;
        self.inner.audit(q).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
}

/// Everything around a supervisor, shared by the supervisors a test builds.
struct Harness {
    _dir: TempDir,
    url: String,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    agents: Vec<(String, AgentHandle)>,
    refetch: Arc<FakeActuator>,
    restart: Arc<FakeActuator>,
    policy: Policy,
    dry_run: bool,
    /// Shared controls (pause, approvals) when a test drives them.
    operator: Option<Operator>,
}

impl Harness {
    /// Agents serving `views`, a fresh SQLite file, the built-in policy.
    async fn new(views: Vec<AgentView>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = knowledge::open(&url).await.expect("open SQLite store");
        Self {
            _dir: dir,
            url,
            store,
            clock: Arc::new(ManualClock::new(t(0))),
            metrics: Arc::new(Metrics::new()),
            wake: Arc::new(Notify::new()),
            agents: views
                .into_iter()
                .map(|v| (v.agent.clone(), AgentHandle::new(v)))
                .collect(),
            refetch: Arc::default(),
            restart: Arc::default(),
            policy: two_rung_policy(),
            dry_run: false,
            operator: None,
        }
    }

    fn agent(&self, name: &str) -> AgentHandle {
        self.agents
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
            .expect("known agent")
    }

    fn parts(&self, store: Arc<dyn Store>) -> Parts {
        let sensors: Vec<Box<dyn Sensor>> = self
            .agents
            .iter()
            .map(|(name, handle)| {
                Box::new(FakeSensor {
                    agent: name.clone(),
                    handle: handle.clone(),
                    clock: self.clock.clone(),
                }) as Box<dyn Sensor>
            })
            .collect();
        let actuators: Registry = HashMap::from([
            (
                "refetch".to_string(),
                self.refetch.clone() as Arc<dyn Actuator>,
            ),
            (
                "restart-agent".to_string(),
                self.restart.clone() as Arc<dyn Actuator>,
            ),
        ]);
        Parts {
            clock: self.clock.clone(),
            sensors,
            actuators,
            policy: self.policy.clone(),
            operator: self
                .operator
                .clone()
                .unwrap_or_else(|| Operator::detached(self.dry_run)),
            buffer: Buffer::new(store, 10_000),
            metrics: self.metrics.clone(),
            health: Arc::new(Health::new(Duration::from_secs(60))),
            wake: self.wake.clone(),
            tick_interval: Duration::from_secs(1),
            handshakes: crate::handshake::Counter::default(),
            targets: Targets::new(
                self.agents.iter().map(|(name, _)| name.clone()),
                [],
                HashMap::new(),
            ),
        }
    }

    /// A supervisor counting handshakes in `counter`, with `peers`
    /// configured.
    async fn supervisor_with(
        &self,
        counter: &crate::handshake::Counter,
        peers: &[&str],
    ) -> Supervisor {
        let since = self.clock.now() - HOUR;
        let knowledge = self
            .store
            .load_knowledge(since)
            .await
            .expect("load knowledge");
        let parts = Parts {
            handshakes: counter.clone(),
            targets: Targets::new(
                self.agents.iter().map(|(name, _)| name.clone()),
                peers.iter().map(|p| p.to_string()),
                HashMap::new(),
            ),
            ..self.parts(self.store.clone())
        };
        Supervisor::new(parts, knowledge)
    }

    /// A supervisor over `store`, resuming from what it holds.
    async fn supervisor_over(&self, store: Arc<dyn Store>) -> Supervisor {
        let since = self.clock.now() - HOUR;
        let knowledge = store.load_knowledge(since).await.expect("load knowledge");
        Supervisor::new(self.parts(store), knowledge)
    }

    async fn supervisor(&self) -> Supervisor {
        self.supervisor_over(self.store.clone()).await
    }

    /// Moves the clock to `t(at)` and ticks there.
    async fn tick(&self, sup: &mut Supervisor, at: u64) -> TickReport {
        self.clock.set(t(at));
        sup.tick(t(at)).await
    }

    /// Waits until a spawned action has sent its result (it notifies `wake`
    /// right after).
    async fn action_finished(&self) {
        tokio::time::timeout(WAIT, self.wake.notified())
            .await
            .expect("the action reports back");
    }

    async fn incidents(&self) -> Vec<IncidentRecord> {
        self.store.incidents(&Query::default()).await.unwrap()
    }

    async fn actions(&self) -> Vec<ActionRecord> {
        let mut a = self.store.actions(&Query::default()).await.unwrap();
        a.sort_by_key(|a| (a.started_at_ms, a.rung));
        a
    }

    async fn holds(&self) -> Vec<HoldRecord> {
        self.store.holds(&Query::default()).await.unwrap()
    }

    fn metric(&self, series: &str) -> Option<f64> {
        sample(&self.metrics.render(), series)
    }
}

/// A policy whose overdue ladder is `refetch` only, so a repeat of the same
/// (target, actuator) is what the cooldown guards.
fn refetch_only(mut policy: Policy) -> Policy {
    let rung = Rung {
        actuator: "refetch".into(),
        timeout: Duration::from_secs(5),
        verify_within: Duration::from_secs(4),
        cooldown: None,
        approval: None,
    };
    policy
        .ladders
        .insert(SymptomKind::SvidRotationOverdue.as_str().into(), vec![rung]);
    policy
}

fn kinds(report: &TickReport) -> Vec<SymptomKind> {
    report.symptoms.iter().map(|s| s.kind).collect()
}

// === Tests ===

#[tokio::test]
async fn overdue_escalates_from_refetch_to_restart_and_closes() {
    let h = Harness::new(vec![view("a")]).await;
    let agent = h.agent("a");
    h.restart.on_run(move || agent.rotate("02", 75));
    let mut sup = h.supervisor().await;

    // t(70): 70 % of the lifetime, no new serial.
    let r = h.tick(&mut sup, 70).await;
    assert_eq!(kinds(&r), vec![SymptomKind::SvidRotationOverdue]);
    assert_eq!(r.opened.len(), 1);
    let incident = r.opened[0].clone();
    assert_eq!(r.started.len(), 1);
    let refetch = r.started[0].clone();
    assert_eq!((refetch.actuator.as_str(), refetch.rung), ("refetch", 0));
    assert_eq!(refetch.incident_id, incident);
    assert_eq!(refetch.target, "a");
    h.action_finished().await;
    assert_eq!(h.refetch.calls().len(), 1);
    // The cluster view: one agent and its one workload at risk, outage at
    // the SVID's notAfter.
    assert_eq!(h.metric("spire_healer_agents_at_risk"), Some(1.0));
    assert_eq!(h.metric("spire_healer_workloads_at_risk"), Some(1.0));
    assert!(
        h.metric("spire_healer_predicted_outage_timestamp_seconds")
            .is_some_and(|v| v > 0.0)
    );
    let outage = crate::clock::unix_secs_f64(t(100));
    let open_series = |severity: &str| {
        format!(
            r#"spire_healer_open_incident{{severity="{severity}",symptom="svid_rotation_overdue",target="a"}}"#
        )
    };
    let severity = ["warning", "critical"]
        .into_iter()
        .find(|s| h.metric(&open_series(s)) == Some(1.0))
        .expect("an open_incident series at 1 for agent a");
    assert_eq!(
        h.metric(r#"spire_healer_agent_predicted_outage_timestamp_seconds{agent="a"}"#),
        Some(outage)
    );
    assert_eq!(
        h.metric(&format!(
            r#"spire_healer_svid_predicted_outage_timestamp_seconds{{agent="a",spiffe_id="{SPIFFE_ID}"}}"#
        )),
        Some(outage)
    );
    assert_eq!(
        h.metric(r#"spire_healer_sensor_blind{sensor="workload_api"}"#),
        Some(0.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_sensor_last_success_timestamp_seconds{sensor="workload_api"}"#),
        Some(crate::clock::unix_secs_f64(t(70)))
    );

    // t(72): refetch returned ok but the serial did not change; still inside
    // its verification window, so nothing else may run on the agent.
    let r = h.tick(&mut sup, 72).await;
    assert!(r.started.is_empty() && r.verified.is_empty() && r.closed.is_empty());

    // t(75): the 4 s window has passed: failed; rung 1 runs.
    let r = h.tick(&mut sup, 75).await;
    assert_eq!(
        r.verified,
        vec![(refetch.action_id.clone(), Verification::Failed)]
    );
    assert_eq!(r.started.len(), 1);
    let restart = r.started[0].clone();
    assert_eq!(
        (restart.actuator.as_str(), restart.rung),
        ("restart-agent", 1)
    );
    h.action_finished().await;
    assert_eq!(h.restart.calls().len(), 1);

    // t(76): the restart delivered a new serial: the incident closes and the
    // restart is verified.
    let r = h.tick(&mut sup, 76).await;
    assert!(r.symptoms.is_empty(), "{:?}", r.symptoms);
    assert_eq!(r.closed, vec![incident.clone()]);
    assert_eq!(
        r.verified,
        vec![(restart.action_id.clone(), Verification::Verified)]
    );
    assert!(sup.open_incidents().is_empty());
    assert_eq!(r.buffered, 0);
    // Closed: its series stays, at 0; no outage is predicted any more.
    assert_eq!(h.metric(&open_series(severity)), Some(0.0));
    assert_eq!(
        h.metric(r#"spire_healer_agent_predicted_outage_timestamp_seconds{agent="a"}"#),
        None
    );
    assert_eq!(h.metric("spire_healer_workloads_at_risk"), Some(0.0));

    let incidents = h.incidents().await;
    assert_eq!(incidents.len(), 1);
    let i = &incidents[0];
    assert_eq!(i.id, incident);
    assert_eq!(i.symptom, "svid_rotation_overdue");
    assert_eq!(i.subject, format!("svid:a/{SPIFFE_ID}"));
    assert_eq!(i.opened_at_ms, unix_millis(t(70)));
    assert_eq!(i.closed_at_ms, Some(unix_millis(t(76))));
    assert_eq!(i.resolution.as_deref(), Some("cleared"));
    assert_eq!(i.predicted_outage_ms, Some(unix_millis(t(100))));
    assert_eq!(i.next_rung, 2);

    let actions = h.actions().await;
    let summary: Vec<_> = actions
        .iter()
        .map(|a| {
            (
                a.id.as_str(),
                a.actuator.as_str(),
                a.outcome.as_deref(),
                a.verification.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                refetch.action_id.as_str(),
                "refetch",
                Some("ok"),
                Some("failed")
            ),
            (
                restart.action_id.as_str(),
                "restart-agent",
                Some("ok"),
                Some("verified")
            ),
        ]
    );
    assert_eq!(actions[0].started_at_ms, unix_millis(t(70)));
    assert_eq!(actions[0].verified_at_ms, Some(unix_millis(t(75))));
    assert_eq!(actions[1].started_at_ms, unix_millis(t(75)));
    assert_eq!(actions[1].verified_at_ms, Some(unix_millis(t(76))));
    assert!(
        actions
            .iter()
            .all(|a| a.incident_id == incident && !a.dry_run)
    );

    // Both serials are recorded; the first was replaced when the second came.
    let mut svids = h.store.svids(&Query::default()).await.unwrap();
    svids.sort_by(|a, b| a.serial.cmp(&b.serial));
    assert_eq!(svids.len(), 2);
    assert_eq!(svids[0].replaced_at_ms, Some(unix_millis(t(75))));
    assert_eq!(svids[1].replaced_at_ms, None);

    assert_eq!(
        h.metric(
            r#"spire_healer_incident_duration_seconds_count{symptom="svid_rotation_overdue"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_incident_duration_seconds_sum{symptom="svid_rotation_overdue"}"#),
        Some(6.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_actions_total{actuator="refetch",outcome="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_verifications_total{actuator="refetch",result="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_verifications_total{actuator="restart-agent",result="verified"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spiffe_certificate_rotation_total{agent="a"}"#),
        Some(1.0)
    );
    // Renewal service level: the first SVID passed its rotation point while
    // served (bad, once); the new one is not due yet.
    assert_eq!(
        h.metric(r#"spire_healer_slo_events_total{result="bad",slo="renewal"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_slo_events_total{result="good",slo="renewal"}"#),
        Some(0.0)
    );
    assert_eq!(h.metric("spire_healer_store_up"), Some(1.0));
}

#[tokio::test]
async fn an_on_time_rotation_is_a_good_renewal_counted_once() {
    let h = Harness::new(vec![view("a")]).await;
    let agent = h.agent("a");
    let mut sup = h.supervisor().await;
    let renewal = |result: &str| {
        h.metric(&format!(
            r#"spire_healer_slo_events_total{{result="{result}",slo="renewal"}}"#
        ))
    };
    h.tick(&mut sup, 10).await;
    assert_eq!((renewal("good"), renewal("bad")), (Some(0.0), Some(0.0)));
    // Serial 02, notBefore t(40) (signed at t(50) with SPIRE's 10 s
    // backdate), replaces 01 before its rotation point t(65).
    agent.rotate("02", 40);
    h.tick(&mut sup, 50).await;
    assert_eq!((renewal("good"), renewal("bad")), (Some(1.0), Some(0.0)));
    h.tick(&mut sup, 51).await;
    assert_eq!((renewal("good"), renewal("bad")), (Some(1.0), Some(0.0)));
}

#[tokio::test]
async fn stream_down_opens_agent_unreachable_in_the_first_tick() {
    let h = Harness::new(vec![view("a")]).await;
    h.agent("a").drop_stream(20);
    let mut sup = h.supervisor().await;

    let r = h.tick(&mut sup, 20).await;
    assert_eq!(kinds(&r), vec![SymptomKind::AgentUnreachable]);
    assert_eq!(r.opened.len(), 1);
    let symptom = &r.symptoms[0];
    assert_eq!(
        symptom.predicted_outage,
        Some(t(100)),
        "the cached SVID's notAfter"
    );
    assert_eq!(symptom.evidence["stream"], "down");
    assert_eq!(r.started.len(), 1);
    assert_eq!(r.started[0].actuator, "refetch");

    let incidents = h.incidents().await;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].symptom, "agent_unreachable");
    assert_eq!(incidents[0].subject, "agent:a");
    assert_eq!(incidents[0].opened_at_ms, unix_millis(t(20)));
    assert_eq!(incidents[0].predicted_outage_ms, Some(unix_millis(t(100))));
    assert_eq!(
        h.metric(r#"spire_healer_incidents_open{symptom="agent_unreachable"}"#),
        Some(1.0)
    );
    h.action_finished().await;
}

#[tokio::test]
async fn no_identity_issued_is_reported_and_restarts_nothing() {
    let h = Harness::new(vec![view("a")]).await;
    let mut sup = h.supervisor().await;
    h.tick(&mut sup, 10).await;
    // Our entry is deleted: the agent refuses us an identity, and the
    // sensor drops what it served.
    h.agent("a").update(|v| {
        v.status = StreamStatus::NoIdentity;
        v.status_since = t(20);
        v.last_error = Some(crate::model::NO_IDENTITY.into());
        v.svids.clear();
    });
    // Within identity_grace (10 s) it may be an agent that has not synced
    // yet: nothing.
    let r = h.tick(&mut sup, 21).await;
    assert!(r.symptoms.is_empty() && r.started.is_empty());
    for at in [30, 45, 70] {
        let r = h.tick(&mut sup, at).await;
        assert_eq!(kinds(&r), vec![SymptomKind::IdentityNotIssued], "at {at}");
        assert!(r.started.is_empty(), "nothing restarted at {at}");
    }
    let incidents = h.incidents().await;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].symptom, "identity_not_issued");
    assert_eq!(incidents[0].subject, "agent:a");
    let holds = h.holds().await;
    assert_eq!(holds.len(), 1, "recorded once: {holds:?}");
    assert_eq!(holds[0].reason, "no_ladder");
    assert!(h.restart.calls().is_empty() && h.refetch.calls().is_empty());

    // The entry is back: served again, the incident closes, nothing credited.
    h.agent("a").update(|v| {
        v.status = StreamStatus::Up;
        v.status_since = t(80);
        v.last_error = None;
    });
    h.agent("a").rotate("02", 80);
    let r = h.tick(&mut sup, 80).await;
    assert_eq!(r.closed.len(), 1);
    assert!(r.verified.is_empty());
    assert!(h.actions().await.is_empty());
}

#[tokio::test]
async fn cooldown_and_open_incidents_survive_a_restart() {
    let mut h = Harness::new(vec![view("a")]).await;
    h.policy = refetch_only(h.policy);
    let incident;
    let refetch_id;
    {
        let mut first = h.supervisor().await;
        let r = h.tick(&mut first, 70).await;
        incident = r.opened[0].clone();
        refetch_id = r.started[0].action_id.clone();
        h.action_finished().await;
        let r = h.tick(&mut first, 71).await;
        assert_eq!(r.buffered, 0);
    }
    assert_eq!(h.refetch.calls().len(), 1);

    // A new process on the same file: the overdue incident is still open and
    // refetch on `a` ran 5 s ago (cooldown 20 s).
    let reopened = knowledge::open(&h.url).await.unwrap();
    let mut second = h.supervisor_over(reopened).await;
    let restored = second.open_incidents();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].id, incident);
    assert_eq!(restored[0].next_rung, 1);

    let r = h.tick(&mut second, 76).await;
    assert_eq!(kinds(&r), vec![SymptomKind::SvidRotationOverdue]);
    assert!(r.opened.is_empty(), "no duplicate incident");
    assert!(r.started.is_empty());
    assert_eq!(h.refetch.calls().len(), 1);

    // (The first process recorded target_busy while its refetch was pending.)
    let holds: Vec<_> = h
        .holds()
        .await
        .into_iter()
        .filter(|h| h.at_ms == unix_millis(t(76)))
        .collect();
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert_eq!(holds[0].incident_id, incident);
    assert_eq!(holds[0].actuator, "refetch");
    assert_eq!(holds[0].target, "a");
    assert_eq!(holds[0].reason, "cooldown");
    assert_eq!(holds[0].at_ms, unix_millis(t(76)));
    let incidents = h.incidents().await;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].closed_at_ms, None);
    let actions = h.actions().await;
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].id, refetch_id);
    assert_eq!(
        h.metric(r#"spire_healer_holds_total{reason="cooldown"}"#),
        Some(1.0)
    );

    // Once the cooldown has passed, refetch runs again.
    let r = h.tick(&mut second, 91).await;
    assert_eq!(r.started.len(), 1);
    assert_eq!(r.started[0].actuator, "refetch");
    h.action_finished().await;
}

#[tokio::test]
async fn hourly_budget_holds_the_second_incident() {
    let mut h = Harness::new(vec![view("a"), view("b")]).await;
    h.policy.guards.budget_per_hour = 1;
    // Two of two agents unhealthy would open the circuit breaker; this test
    // is about the budget.
    h.policy.guards.breaker_min_agents = 10;
    let mut sup = h.supervisor().await;

    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.opened.len(), 2);
    assert_eq!(r.started.len(), 1);
    let acted = r.started[0].incident_id.clone();
    let other = r.opened.iter().find(|id| **id != acted).unwrap().clone();
    h.action_finished().await;

    let holds = h.holds().await;
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert_eq!(holds[0].incident_id, other);
    assert_eq!(holds[0].reason, "budget");
    assert_eq!(holds[0].actuator, "refetch");
    assert_ne!(holds[0].target, r.started[0].target);
    assert_eq!(
        h.metric(r#"spire_healer_holds_total{reason="budget"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_incidents_held{reason="budget"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_incidents_held{reason="cooldown"}"#),
        Some(0.0)
    );

    // Still spent on the next tick; the same hold is not recorded twice.
    let r = h.tick(&mut sup, 71).await;
    assert!(r.started.is_empty());
    let budget: Vec<_> = h
        .holds()
        .await
        .into_iter()
        .filter(|h| h.reason == "budget")
        .collect();
    assert_eq!(budget.len(), 1, "{budget:?}");
    assert_eq!(h.refetch.calls().len(), 1);
    assert!(h.restart.calls().is_empty());
}

#[tokio::test]
async fn dry_run_records_without_acting() {
    let mut h = Harness::new(vec![view("a")]).await;
    h.dry_run = true;
    let mut sup = h.supervisor().await;

    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.started.len(), 1);
    let step = r.started[0].clone();
    assert!(step.dry_run);

    // A dry run is not verified against the symptom: skipped once the window
    // has passed.
    let r = h.tick(&mut sup, 72).await;
    assert!(r.verified.is_empty());
    let r = h.tick(&mut sup, 75).await;
    assert_eq!(
        r.verified,
        vec![(step.action_id.clone(), Verification::Skipped)]
    );

    assert!(h.refetch.calls().is_empty());
    assert!(h.restart.calls().is_empty());
    let actions = h.actions().await;
    let a = actions.iter().find(|a| a.id == step.action_id).unwrap();
    assert!(a.dry_run);
    assert_eq!(a.outcome.as_deref(), Some("dry_run"));
    assert_eq!(a.verification.as_deref(), Some("skipped"));
    assert!(actions.iter().all(|a| a.dry_run));
    assert_eq!(
        h.metric(r#"spire_healer_actions_total{actuator="refetch",outcome="dry_run"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_verifications_total{actuator="refetch",result="skipped"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn blind_view_opens_but_never_acts() {
    let h = Harness::new(vec![view("a")]).await;
    let agent = h.agent("a");
    agent.heartbeat.store(false, Ordering::SeqCst);
    // Last refreshed 20 s before the tick; max_staleness is 10 s.
    agent.update(|v| v.updated_at = t(50));
    let mut sup = h.supervisor().await;

    let r = h.tick(&mut sup, 70).await;
    assert_eq!(kinds(&r), vec![SymptomKind::SvidRotationOverdue]);
    assert!(r.symptoms.iter().all(|s| s.blind));
    assert_eq!(r.opened.len(), 1);
    let incident = r.opened[0].clone();
    assert!(r.started.is_empty());
    let r = h.tick(&mut sup, 71).await;
    assert!(r.started.is_empty());

    assert!(h.refetch.calls().is_empty());
    assert!(h.restart.calls().is_empty());
    assert!(h.actions().await.is_empty());
    let holds = h.holds().await;
    assert_eq!(
        holds.len(),
        1,
        "recorded once, not once per tick: {holds:?}"
    );
    assert_eq!(holds[0].reason, "blind");
    assert_eq!(holds[0].actuator, "refetch");
    assert_eq!(holds[0].incident_id, incident);
    assert_eq!(
        h.metric(r#"spire_healer_holds_total{reason="blind"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_incidents_held{reason="blind"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_sensor_blind{sensor="workload_api"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_sensor_last_success_timestamp_seconds{sensor="workload_api"}"#),
        Some(crate::clock::unix_secs_f64(t(50)))
    );
}

#[tokio::test]
async fn store_outage_buffers_then_lands_everything_once() {
    let h = Harness::new(vec![view("a")]).await;
    let agent = h.agent("a");
    h.restart.on_run(move || agent.rotate("02", 75));
    let flaky = Arc::new(FlakyStore {
        inner: h.store.clone(),
        down: AtomicBool::new(false),
    });
    let mut sup = h.supervisor_over(flaky.clone()).await;

    let r = h.tick(&mut sup, 10).await;
    assert_eq!(r.buffered, 0);
    assert_eq!(h.metric("spire_healer_store_up"), Some(1.0));

    flaky.down.store(true, Ordering::SeqCst);
    let mut buffered = Vec::new();
    // The whole incident happens while the database is away.
    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.opened.len(), 1);
    assert_eq!(
        r.started.len(),
        1,
        "acts even though the start is not yet recorded"
    );
    let incident = r.opened[0].clone();
    buffered.push(r.buffered);
    h.action_finished().await;
    let r = h.tick(&mut sup, 72).await;
    buffered.push(r.buffered);
    let r = h.tick(&mut sup, 75).await;
    assert_eq!(r.started.len(), 1);
    buffered.push(r.buffered);
    h.action_finished().await;
    let r = h.tick(&mut sup, 76).await;
    assert_eq!(r.closed, vec![incident.clone()]);
    buffered.push(r.buffered);

    assert!(buffered[0] > 0, "{buffered:?}");
    assert!(buffered.windows(2).all(|w| w[1] > w[0]), "{buffered:?}");
    assert_eq!(h.metric("spire_healer_store_up"), Some(0.0));
    assert_eq!(
        h.metric("spire_healer_store_buffered_events"),
        Some(buffered[3] as f64)
    );
    // Tried at 70 and again 5 s later at 75: not at every tick, and no
    // tick waited on the store in between.
    assert_eq!(
        h.metric(r#"spire_healer_errors_total{kind="unavailable",stage="store"}"#),
        Some(2.0)
    );
    assert!(
        h.incidents().await.is_empty(),
        "nothing reached the store yet"
    );

    flaky.down.store(false, Ordering::SeqCst);
    // The heartbeat finds it back: the next tick writes at once.
    sup.store_health()
        .probe(&*flaky, &h.metrics, Duration::from_secs(1))
        .await;
    let r = h.tick(&mut sup, 77).await;
    assert_eq!(r.buffered, 0);
    assert_eq!(h.metric("spire_healer_store_up"), Some(1.0));
    assert_eq!(h.metric("spire_healer_store_buffered_events"), Some(0.0));

    let incidents = h.incidents().await;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].id, incident);
    assert_eq!(incidents[0].closed_at_ms, Some(unix_millis(t(76))));
    assert_eq!(incidents[0].next_rung, 2);
    let actions = h.actions().await;
    let summary: Vec<_> = actions
        .iter()
        .map(|a| {
            (
                a.actuator.as_str(),
                a.outcome.as_deref(),
                a.verification.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("refetch", Some("ok"), Some("failed")),
            ("restart-agent", Some("ok"), Some("verified")),
        ]
    );
    let holds = h.holds().await;
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert_eq!(holds[0].reason, "target_busy");
    let svids = h.store.svids(&Query::default()).await.unwrap();
    assert_eq!(svids.len(), 2);
    assert_eq!(
        h.metric("spire_healer_store_dropped_events_total"),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_crash_during_a_store_outage_loses_nothing_the_spool_replays_it() {
    let h = Harness::new(vec![view("a")]).await;
    let spool_path = h._dir.path().join("healer.spool");
    let (spool, _) = knowledge::Spool::open(&spool_path, 1 << 20).unwrap();
    // Record before act: when the restart runs, its start is on disk.
    let recorded_first = Arc::new(AtomicBool::new(false));
    let (path, seen, agent) = (spool_path.clone(), recorded_first.clone(), h.agent("a"));
    h.restart.on_run(move || {
        let spooled =
            String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        seen.store(
            spooled.contains(r#""actuator":"restart-agent""#),
            Ordering::SeqCst,
        );
        agent.rotate("02", 75);
    });
    let flaky = Arc::new(FlakyStore {
        inner: h.store.clone(),
        down: AtomicBool::new(false),
    });
    let since = h.clock.now();
    let knowledge = flaky.load_knowledge(since).await.unwrap();
    let parts = Parts {
        buffer: Buffer::new(flaky.clone(), 10_000).with_spool(spool),
        ..h.parts(flaky.clone())
    };
    let mut sup = Supervisor::new(parts, knowledge);
    h.tick(&mut sup, 10).await;
    assert_eq!(h.metric("spire_healer_store_spool_bytes"), Some(0.0));

    flaky.down.store(true, Ordering::SeqCst);
    let r = h.tick(&mut sup, 70).await;
    let incident = r.opened[0].clone();
    h.action_finished().await;
    h.tick(&mut sup, 72).await;
    assert_eq!(h.tick(&mut sup, 75).await.started.len(), 1);
    h.action_finished().await;
    let r = h.tick(&mut sup, 76).await;
    assert_eq!(r.closed, vec![incident.clone()]);
    assert!(
        recorded_first.load(Ordering::SeqCst),
        "acted before spooling"
    );
    assert!(h.metric("spire_healer_store_spool_bytes").unwrap() > 0.0);
    let spooled = h.metric("spire_healer_store_spooled_events_total").unwrap();
    assert!(spooled >= r.buffered as f64, "{spooled} < {}", r.buffered);
    assert!(h.incidents().await.is_empty(), "nothing reached the store");

    // kill -9: nothing is drained. The database returns; the next start
    // replays the spool before it reads the loop's memory.
    drop(sup);
    flaky.down.store(false, Ordering::SeqCst);
    let (spool, replayed) = knowledge::open_and_replay(&spool_path, 1 << 20, &*h.store)
        .await
        .unwrap();
    assert_eq!(replayed.events as f64, spooled);
    assert!(spool.is_empty());
    let incidents = h.incidents().await;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].id, incident);
    assert_eq!(incidents[0].closed_at_ms, Some(unix_millis(t(76))));
    let summary: Vec<_> = h
        .actions()
        .await
        .iter()
        .map(|a| {
            (
                a.actuator.clone(),
                a.outcome.clone(),
                a.verification.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("refetch".into(), Some("ok".into()), Some("failed".into())),
            (
                "restart-agent".into(),
                Some("ok".into()),
                Some("verified".into())
            ),
        ]
    );
    assert_eq!(h.holds().await.len(), 1);
    // The cooldown and budget entries are back too: a supervisor resuming
    // from the store remembers the restart.
    let resumed = h.store.load_knowledge(t(0)).await.unwrap();
    assert_eq!(resumed.recent_actions.len(), 2);
}

#[tokio::test]
async fn an_idle_store_outage_shows_within_one_heartbeat() {
    let h = Harness::new(vec![view("a")]).await;
    let flaky = Arc::new(FlakyStore {
        inner: h.store.clone(),
        down: AtomicBool::new(false),
    });
    let mut sup = h.supervisor_over(flaky.clone()).await;
    h.tick(&mut sup, 10).await;
    let health = sup.store_health();
    health
        .probe(&*flaky, &h.metrics, Duration::from_secs(1))
        .await;
    assert_eq!(h.metric("spire_healer_store_up"), Some(1.0));
    // Nothing needs writing on a healthy fleet; the database goes away.
    flaky.down.store(true, Ordering::SeqCst);
    let r = h.tick(&mut sup, 11).await;
    assert_eq!(r.buffered, 0);
    health
        .probe(&*flaky, &h.metrics, Duration::from_secs(1))
        .await;
    assert_eq!(h.metric("spire_healer_store_up"), Some(0.0));
    assert!(!health.is_up());
    flaky.down.store(false, Ordering::SeqCst);
    health
        .probe(&*flaky, &h.metrics, Duration::from_secs(1))
        .await;
    assert_eq!(h.metric("spire_healer_store_up"), Some(1.0));
}

#[tokio::test]
async fn unfinished_action_is_closed_as_abandoned() {
    let h = Harness::new(vec![view("a")]).await;
    let step = Step {
        action_id: "action-1".into(),
        incident_id: "incident-1".into(),
        symptom: SymptomKind::AgentUnreachable,
        rung: 1,
        actuator: "restart-agent".into(),
        target: "a".into(),
        params: json!({}),
        timeout: Duration::from_secs(30),
        verify_within: Duration::from_secs(20),
        dry_run: false,
    };
    h.store
        .apply(&[Event::ActionStarted { step, at: t(5) }])
        .await
        .unwrap();

    h.clock.set(t(10));
    let mut sup = h.supervisor().await;
    let r = h.tick(&mut sup, 10).await;
    assert_eq!(r.buffered, 0);

    let actions = h.actions().await;
    assert_eq!(actions.len(), 1);
    let a = &actions[0];
    assert_eq!(a.id, "action-1");
    assert_eq!(a.outcome.as_deref(), Some("error"));
    assert_eq!(a.finished_at_ms, Some(unix_millis(t(10))));
    assert!(
        a.error.as_deref().is_some_and(|e| e.contains("abandoned")),
        "{a:?}"
    );
    assert_eq!(
        a.detail,
        Some(json!({ "started": true, "outcome_unknown": true })),
        "started, outcome unknown"
    );
    assert!(
        h.restart.calls().is_empty(),
        "an abandoned action is not re-run"
    );
}

/// The verdict of the refetch started at 70, after a crash at 72 (its
/// outcome recorded, its verification not), with the agent rotated at
/// `healed_at` or not at all.
async fn verdict_after_a_crash(healed_at: Option<u64>, tick_at: u64) -> (Harness, ActionRecord) {
    let h = Harness::new(vec![view("a")]).await;
    let mut sup = h.supervisor().await;
    h.tick(&mut sup, 10).await;
    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.started.len(), 1);
    h.action_finished().await;
    let r = h.tick(&mut sup, 72).await;
    assert!(r.verified.is_empty(), "within its window");
    drop(sup);
    let recorded = h.actions().await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].outcome.as_deref(), Some("ok"));
    assert_eq!(recorded[0].verification, None);

    if let Some(at) = healed_at {
        h.agent("a").rotate("02", at);
    }
    h.clock.set(t(tick_at));
    let mut sup = h.supervisor().await;
    let r = h.tick(&mut sup, tick_at).await;
    assert_eq!(r.verified.len(), 1, "{r:?}");
    let action = h
        .actions()
        .await
        .into_iter()
        .find(|a| a.id == recorded[0].id)
        .unwrap();
    (h, action)
}

#[tokio::test]
async fn a_verification_cut_short_by_a_crash_is_resumed_and_fails_when_nothing_cleared() {
    let (h, action) = verdict_after_a_crash(None, 76).await;
    assert_eq!(action.verification.as_deref(), Some("failed"));
    assert_eq!(
        h.metric(r#"spire_healer_verifications_total{actuator="refetch",result="failed"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_verification_cut_short_by_a_crash_is_resumed_and_credits_a_clear() {
    let (h, action) = verdict_after_a_crash(Some(73), 73).await;
    assert_eq!(action.verification.as_deref(), Some("verified"));
    assert_eq!(
        h.incidents().await[0].resolution.as_deref(),
        Some("cleared")
    );
    assert!(h.restart.calls().is_empty(), "nothing else was tried");
}

#[tokio::test]
async fn unreachable_waits_for_the_pending_verdict() {
    let mut h = Harness::new(vec![view("a")]).await;
    h.policy = refetch_only(h.policy);
    let agent = h.agent("a");
    // The refetch drops the stream and it does not come back.
    h.refetch.on_run(move || agent.drop_stream(70));
    let mut sup = h.supervisor().await;

    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.started.len(), 1);
    let refetch = r.started[0].action_id.clone();
    h.action_finished().await;

    // The stream is down but the refetch is still being verified: expected,
    // so agent_unreachable is present but not opened.
    for at in [71, 73] {
        let r = h.tick(&mut sup, at).await;
        assert!(
            kinds(&r).contains(&SymptomKind::AgentUnreachable),
            "at {at}"
        );
        assert!(r.opened.is_empty(), "at {at}");
    }
    // t(75): the verdict comes in this tick (after incidents were tracked);
    // refetch is now cooling down, so the agent is no longer busy.
    let r = h.tick(&mut sup, 75).await;
    assert_eq!(r.verified, vec![(refetch, Verification::Failed)]);
    assert!(r.opened.is_empty());
    assert!(r.started.is_empty());

    // t(76): still down with nothing pending: it opens.
    let r = h.tick(&mut sup, 76).await;
    assert_eq!(r.opened.len(), 1);
    let open: Vec<_> = h
        .incidents()
        .await
        .into_iter()
        .filter(|i| i.symptom == "agent_unreachable")
        .collect();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, r.opened[0]);
    assert_eq!(open[0].opened_at_ms, unix_millis(t(76)));
    assert_eq!(
        h.metric(r#"spire_healer_incidents_opened_total{symptom="agent_unreachable"}"#),
        Some(1.0)
    );
}

/// The built-in policy with the overdue ladder pinned to refetch →
/// restart-agent, the two actuators these tests fake.
/// A step its actuator holds at execute time (a PodDisruptionBudget) is a
/// recorded hold: the same rung again after the cooldown, never the next
/// one, no failed verification, no charge to the hourly budget.
#[tokio::test]
async fn a_step_held_at_execute_time_is_retried_on_the_same_rung_after_the_cooldown() {
    let h = Harness::new(vec![view("a")]).await;
    h.refetch.hold_with("pdb_blocked");
    let mut sup = h.supervisor().await;
    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.started.len(), 1);
    let incident = r.opened[0].clone();
    h.action_finished().await;
    // Collected: a hold with the actuator's reason, the verdict `skipped`
    // at once, and the ladder back on rung 0; the cooldown (20 s) holds.
    let r = h.tick(&mut sup, 71).await;
    assert!(r.started.is_empty());
    assert_eq!(r.verified.len(), 1);
    assert_eq!(r.verified[0].1, Verification::Skipped);
    let reasons: Vec<String> = h.holds().await.into_iter().map(|x| x.reason).collect();
    assert!(reasons.contains(&"pdb_blocked".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"cooldown".to_string()), "{reasons:?}");
    let inc = h.store.incident(&incident).await.unwrap().unwrap();
    assert_eq!(inc.next_rung, 0, "re-armed, not escalated");
    assert!(h.tick(&mut sup, 85).await.started.is_empty(), "cooldown");
    // Past the cooldown: rung 0 again, not restart-agent.
    let r = h.tick(&mut sup, 91).await;
    assert_eq!(r.started.len(), 1);
    assert_eq!(
        (r.started[0].actuator.as_str(), r.started[0].rung),
        ("refetch", 0)
    );
    h.action_finished().await;
    h.tick(&mut sup, 92).await;
    let actions = h.actions().await;
    assert_eq!(actions.len(), 2);
    for a in &actions {
        assert_eq!(a.outcome.as_deref(), Some("held"));
        assert_eq!(a.detail.as_ref().unwrap()["held"], "pdb_blocked");
        assert_eq!(a.verification.as_deref(), Some("skipped"));
    }
    assert!(h.restart.calls().is_empty());
    assert_eq!(
        h.metric(r#"spire_healer_actions_total{actuator="refetch",outcome="held"}"#),
        Some(2.0)
    );
    assert_eq!(
        h.metric(r#"spire_healer_holds_total{reason="pdb_blocked"}"#),
        Some(2.0),
        "recorded again after the cooldown hold in between"
    );
    // Nothing was charged to the budget: a resumed supervisor sees none
    // of the two (the cooldown stands).
    let k = h.store.load_knowledge(t(0)).await.unwrap();
    let mut g = super::guards::Guards::resume(&k.recent_actions, &k.open_incidents);
    assert_eq!(g.actions_last_hour(t(93)), 0);
    assert!(
        g.last_run()
            .contains_key(&("a".to_string(), "refetch".to_string()))
    );
}

fn two_rung_policy() -> Policy {
    let mut p = Policy::builtin().unwrap();
    if let Some(l) = p.ladders.get_mut("svid_rotation_overdue") {
        l.retain(|r| r.actuator == "refetch" || r.actuator == "restart-agent");
    }
    p
}

// === Handshakes ===

/// One agent; `handshake_failure_burst` has a one-rung ladder (the fake
/// restart actuator) verified within `verify_within`.
async fn burst_harness(verify_within: Duration) -> Harness {
    let mut h = Harness::new(vec![view("a")]).await;
    h.policy.ladders.insert(
        "handshake_failure_burst".into(),
        vec![Rung {
            actuator: "restart-agent".into(),
            timeout: Duration::from_secs(5),
            verify_within,
            cooldown: None,
            approval: None,
        }],
    );
    h
}

/// 40 of 50 handshakes to `web` fail with `unknown_ca` between two ticks.
fn burst(counter: &crate::handshake::Counter) {
    use crate::handshake::{Reason, Source};
    counter.add("web", Reason::Ok, 10, Source::Report).unwrap();
    counter
        .add("web", Reason::UnknownCa, 40, Source::Report)
        .unwrap();
}

#[tokio::test]
async fn unexplained_handshake_burst_is_reported_not_acted_on() {
    let h = burst_harness(Duration::from_secs(10)).await;
    let counter = crate::handshake::Counter::default();
    let mut sup = h.supervisor_with(&counter, &["web"]).await;
    h.tick(&mut sup, 1).await;
    burst(&counter);
    let r = h.tick(&mut sup, 2).await;
    assert_eq!(r.opened.len(), 1, "{:?}", r.symptoms);
    let inc = &h.incidents().await[0];
    assert_eq!(inc.symptom, "handshake_failure_burst");
    assert_eq!(inc.subject, "handshakes:web/unknown_ca");
    assert_eq!(inc.evidence["remediable"], false);
    assert!(r.started.is_empty());
    let holds = h.holds().await;
    assert!(
        holds.iter().any(|x| x.reason == "no_local_cause"),
        "{holds:?}"
    );
    // The failures stop; the burst window (30 s) passes: it closes.
    counter
        .add(
            "web",
            crate::handshake::Reason::Ok,
            50,
            crate::handshake::Source::Report,
        )
        .unwrap();
    let r = h.tick(&mut sup, 40).await;
    assert_eq!(r.closed.len(), 1);
    assert!(h.restart.calls().is_empty(), "no healthy process restarted");
    assert_eq!(
        sample(
            &h.metrics.render(),
            "spire_healer_holds_total{reason=\"no_local_cause\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn handshake_burst_after_a_bundle_change_is_remediated() {
    let h = burst_harness(Duration::from_secs(60)).await;
    let counter = crate::handshake::Counter::default();
    let mut sup = h.supervisor_with(&counter, &["web"]).await;
    h.agent("a").update(|v| v.bundle = vec!["aa".into()]);
    h.tick(&mut sup, 1).await;
    // The trust bundle rotates, then handshakes fail with unknown_ca.
    h.agent("a")
        .update(|v| v.bundle = vec!["aa".into(), "bb".into()]);
    h.tick(&mut sup, 2).await;
    burst(&counter);
    let r = h.tick(&mut sup, 3).await;
    assert_eq!(r.started.len(), 1, "{:?}", h.holds().await);
    assert_eq!(r.started[0].target, "web");
    h.action_finished().await;
    // The peer reloaded: only successes from now on.
    counter
        .add(
            "web",
            crate::handshake::Reason::Ok,
            50,
            crate::handshake::Source::Report,
        )
        .unwrap();
    let r = h.tick(&mut sup, 40).await;
    assert_eq!(r.verified.len(), 1);
    assert_eq!(r.verified[0].1, Verification::Verified);
    let inc = &h.incidents().await[0];
    assert_eq!(inc.evidence["likely_cause"], "peer_holds_stale_bundle");
}

// === Futility ===

#[tokio::test]
async fn a_futile_restart_stops_and_the_incident_needs_an_operator() {
    let h = Harness::new(vec![view("a")]).await;
    // The agent is gone for good: nothing we run brings its stream back.
    h.agent("a").drop_stream(20);
    let mut sup = h.supervisor().await;

    // refetch, then restart-agent twice (the last rung repeats): each
    // fails its verification.
    let mut started = Vec::new();
    for at in [20, 23, 43, 63, 90, 200] {
        let r = h.tick(&mut sup, at).await;
        for s in &r.started {
            started.push((at, s.actuator.clone()));
            h.action_finished().await;
        }
    }
    assert_eq!(
        started,
        [
            (20, "refetch".to_string()),
            (23, "restart-agent".to_string()),
            (43, "restart-agent".to_string()),
        ],
        "restart-agent failed verification twice: futile, not repeated"
    );
    let open = sup.open_incidents();
    assert_eq!(open.len(), 1);
    let reason = open[0].needs_operator.clone().expect("needs an operator");
    assert!(
        reason.contains("restart-agent failed verification 2 times"),
        "{reason}"
    );
    assert_eq!(
        h.metric(r#"spire_healer_incidents_needing_operator{symptom="agent_unreachable"}"#),
        Some(1.0)
    );
    let stored = h.incidents().await;
    assert_eq!(stored[0].needs_operator.as_deref(), Some(reason.as_str()));
    assert!(stored[0].needs_operator_at_ms.is_some());
    let holds: Vec<String> = h.holds().await.into_iter().map(|h| h.reason).collect();
    assert_eq!(
        holds.iter().filter(|r| *r == "needs_operator").count(),
        1,
        "recorded once: {holds:?}"
    );
    let failed = h
        .actions()
        .await
        .iter()
        .filter(|a| a.verification.as_deref() == Some("failed"))
        .count();
    assert_eq!(failed, 3);

    // The agent comes back by other hands: the incident closes and the
    // ledger forgets; the next outage starts from the first rung again.
    h.agent("a").update(|v| {
        v.status = StreamStatus::Up;
        v.status_since = t(300);
        v.last_error = None;
    });
    h.agent("a").rotate("02", 300);
    let r = h.tick(&mut sup, 300).await;
    assert_eq!(r.closed.len(), 1);
    assert_eq!(
        h.metric(r#"spire_healer_incidents_needing_operator{symptom="agent_unreachable"}"#),
        Some(0.0)
    );
    h.agent("a").drop_stream(400);
    let r = h.tick(&mut sup, 400).await;
    assert_eq!(r.started.len(), 1);
    assert_eq!(r.started[0].actuator, "refetch");
    h.action_finished().await;
    let r = h.tick(&mut sup, 403).await;
    assert_eq!(r.started.len(), 1);
    assert_eq!(r.started[0].actuator, "restart-agent", "no longer futile");
    h.action_finished().await;
}

#[tokio::test]
async fn a_refusal_neither_clears_a_lifetime_incident_nor_credits_its_action() {
    let h = Harness::new(vec![view("a")]).await;
    let mut sup = h.supervisor().await;
    // 86 % of the lifetime: svid_expiring (and overdue) open, one refetch
    // runs for the agent's one slot.
    let r = h.tick(&mut sup, 86).await;
    assert!(kinds(&r).contains(&SymptomKind::SvidExpiring));
    assert_eq!(r.started.len(), 1);
    h.action_finished().await;
    // The agent then refuses us (as right after a restart, before its first
    // sync): what it served is remembered, not served.
    h.agent("a").update(|v| {
        v.status = StreamStatus::NoIdentity;
        v.status_since = t(87);
        v.last_error = Some(crate::model::NO_IDENTITY.into());
    });
    for at in [87, 89, 91] {
        let r = h.tick(&mut sup, at).await;
        assert!(r.closed.is_empty(), "not cleared at {at}");
        assert!(
            r.verified.iter().all(|(_, v)| *v != Verification::Verified),
            "not credited at {at}: {:?}",
            r.verified
        );
    }
    let open = sup.open_incidents();
    assert!(
        open.iter().any(|i| i.kind == SymptomKind::SvidExpiring),
        "{open:?}"
    );
    assert!(
        open.iter()
            .all(|i| i.kind != SymptomKind::IdentityNotIssued)
    );
}

mod operator;

#[tokio::test]
async fn a_fenced_leader_starts_nothing_the_store_has_not_recorded() {
    let h = Harness::new(vec![view("a")]).await;
    let flaky = Arc::new(FlakyStore {
        inner: h.store.clone(),
        down: AtomicBool::new(false),
    });
    let mut sup = h.supervisor_over(flaky.clone()).await.fenced();
    h.tick(&mut sup, 10).await;
    // The store is away when the step is decided: it is not executed, it
    // comes back held as not_recorded, and the ladder stays on rung 0.
    flaky.down.store(true, Ordering::SeqCst);
    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.started.len(), 1, "decided");
    // Its outcome is queued at once (nothing ran): the next tick takes it.
    let r = h.tick(&mut sup, 71).await;
    assert_eq!(r.verified.len(), 1);
    assert_eq!(r.verified[0].1, Verification::Skipped);
    assert!(h.refetch.calls().is_empty(), "nothing ran unrecorded");
    // Back: after the cooldown rung 0 is tried again, recorded first, and
    // runs.
    flaky.down.store(false, Ordering::SeqCst);
    sup.store_health()
        .probe(&*flaky, &h.metrics, Duration::from_secs(1))
        .await;
    let r = h.tick(&mut sup, 91).await;
    assert_eq!(r.started.len(), 1);
    assert_eq!(
        (r.started[0].actuator.as_str(), r.started[0].rung),
        ("refetch", 0)
    );
    h.action_finished().await;
    h.tick(&mut sup, 92).await;
    assert_eq!(h.refetch.calls().len(), 1);
    let actions = h.actions().await;
    let summary: Vec<_> = actions
        .iter()
        .map(|a| {
            (
                a.outcome.as_deref(),
                a.detail
                    .as_ref()
                    .and_then(|d| d["held"].as_str().map(str::to_string)),
            )
        })
        .collect();
    assert!(
        summary.contains(&(Some("held"), Some("not_recorded".to_string()))),
        "{summary:?}"
    );
    assert_eq!(summary.len(), 2, "{summary:?}");
}
