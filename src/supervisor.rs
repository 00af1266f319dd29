//! The MAPE-K loop. [`Supervisor::tick`] runs one pass:
//! sense → analyze → (open/close incidents) → verify → plan → execute →
//! record; [`Supervisor::run`] repeats it until shutdown.

use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::actuators::{ActuatorError, Prepared, Registry};
use crate::analyze::{HandshakeInput, analyze, control_plane, handshakes};
use crate::clock::{Clock, saturating_since, unix_secs_f64};
use crate::knowledge::{Buffer, Knowledge};
use crate::model::{
    AgentView, Event, Incident, Observations, Outcome, OutcomeKind, Reading, Step, Subject,
    Symptom, SymptomKey, Verification, new_id,
};
use crate::plan::{Decision, PlanInput, plan};
use crate::policy::Policy;
use crate::sensors::Sensor;
use crate::telemetry::metrics::SVID_TOP_K;
use crate::telemetry::{Health, Metrics};

/// An action in flight or awaiting verification.
#[derive(Debug, Clone)]
struct Pending {
    step: Step,
    started: SystemTime,
    key: SymptomKey,
    finished: Option<(SystemTime, OutcomeKind)>,
}

/// What one tick did (for tests and logs).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TickReport {
    /// Symptoms present.
    pub symptoms: Vec<Symptom>,
    /// Incident ids opened this tick.
    pub opened: Vec<String>,
    /// Incident ids closed this tick.
    pub closed: Vec<String>,
    /// Steps started this tick.
    pub started: Vec<Step>,
    /// (action id, verification) decided this tick.
    pub verified: Vec<(String, Verification)>,
    /// Events still waiting for the store after this tick.
    pub buffered: usize,
}

/// Everything the loop needs.
pub struct Parts {
    /// Clock.
    pub clock: Arc<dyn Clock>,
    /// Sensors.
    pub sensors: Vec<Box<dyn Sensor>>,
    /// Actuators by instance name.
    pub actuators: Registry,
    /// Policy.
    pub policy: Policy,
    /// Record without executing.
    pub dry_run: bool,
    /// Store write path.
    pub buffer: Buffer,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health.
    pub health: Arc<Health>,
    /// Notified by sensors on state changes.
    pub wake: Arc<Notify>,
    /// Tick interval.
    pub tick_interval: Duration,
}

/// The supervisor.
pub struct Supervisor {
    p: Parts,
    views: HashMap<String, Arc<AgentView>>,
    last_readings: HashMap<usize, Vec<Reading>>,
    pending_since: HashMap<SymptomKey, SystemTime>,
    servers_reachable: Option<bool>,
    servers_back_since: Option<SystemTime>,
    incidents: HashMap<SymptomKey, Incident>,
    pending: HashMap<String, Pending>,
    last_run: HashMap<(String, String), SystemTime>,
    recent_starts: VecDeque<SystemTime>,
    last_hold: HashMap<String, (String, &'static str)>,
    subjects: HashSet<Subject>,
    results_tx: mpsc::UnboundedSender<(String, Outcome, SystemTime)>,
    results_rx: mpsc::UnboundedReceiver<(String, Outcome, SystemTime)>,
    actions: TaskTracker,
    /// Handshake outcomes from probes, reports and Envoy, drained per tick.
    handshakes: crate::handshake::Counter,
    handshake_history: crate::handshake::History,
    /// Bundle fingerprints by agent name and `server:<name>`, to see
    /// bundles change.
    bundles: HashMap<String, Vec<String>>,
    last_bundle_change: Option<SystemTime>,
    last_rotation: Option<SystemTime>,
    /// Last time a rotation brought an SVID signed by another CA key: a CA
    /// activation, after which peers with a stale bundle start failing.
    last_issuer_change: Option<SystemTime>,
    /// Probes by target: poked when an action on that target returns, so
    /// verification sees the peer's new state without waiting an interval.
    probes: HashMap<String, Arc<crate::sensors::handshake_probe::ProbeHandle>>,
    /// Configured peer names: the only peers actions may target.
    peers: HashSet<String>,
}

const HOUR: Duration = Duration::from_secs(3600);
/// Time a tick may spend writing to the store.
const FLUSH_BUDGET: Duration = Duration::from_millis(400);

impl Supervisor {
    /// A supervisor resuming from `knowledge` (open incidents, recent
    /// actions: cooldowns and budget survive restarts). Actions recorded as
    /// started but never finished are closed as abandoned.
    pub fn new(parts: Parts, knowledge: Knowledge) -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let mut s = Self {
            p: parts,
            views: HashMap::new(),
            last_readings: HashMap::new(),
            pending_since: HashMap::new(),
            servers_reachable: None,
            servers_back_since: None,
            incidents: HashMap::new(),
            pending: HashMap::new(),
            last_run: HashMap::new(),
            recent_starts: VecDeque::new(),
            last_hold: HashMap::new(),
            subjects: HashSet::new(),
            results_tx,
            results_rx,
            actions: TaskTracker::new(),
            handshakes: crate::handshake::Counter::default(),
            handshake_history: crate::handshake::History::default(),
            bundles: HashMap::new(),
            last_bundle_change: None,
            last_rotation: None,
            last_issuer_change: None,
            probes: HashMap::new(),
            peers: HashSet::new(),
        };
        let th = &s.p.policy.thresholds;
        s.handshake_history = crate::handshake::History::new(th.burst_window + th.burst_baseline);
        let now = s.p.clock.now();
        for inc in knowledge.open_incidents {
            s.incidents.insert(inc.key(), inc);
        }
        let mut abandoned = Vec::new();
        for a in &knowledge.recent_actions {
            let at = crate::clock::from_unix_millis(a.started_at_ms);
            let key = (a.target.clone(), a.actuator.clone());
            if s.last_run.get(&key).is_none_or(|t| *t < at) {
                s.last_run.insert(key, at);
            }
            if !a.dry_run {
                s.recent_starts.push_back(at);
            }
            if a.finished_at_ms.is_none() {
                abandoned.push(Event::ActionFinished {
                    id: a.id.clone(),
                    outcome: Outcome {
                        kind: OutcomeKind::Error,
                        detail: serde_json::json!({}),
                        error: Some(
                            "abandoned: the supervisor stopped before the action finished".into(),
                        ),
                    },
                    at: now,
                });
            }
        }
        s.recent_starts.make_contiguous().sort();
        s.p.buffer.push(abandoned);
        s
    }

    /// Uses `counter` for handshake outcomes: the one probes, the report API
    /// and Envoy scrapes add to.
    pub fn with_handshakes(mut self, counter: crate::handshake::Counter) -> Self {
        self.handshakes = counter;
        self
    }

    /// Probe handles by target name (see the `probes` field).
    pub fn with_probes(
        mut self,
        probes: HashMap<String, Arc<crate::sensors::handshake_probe::ProbeHandle>>,
    ) -> Self {
        self.peers.extend(probes.keys().cloned());
        self.probes = probes;
        self
    }

    /// Peer names actions may target (configured probes; `with_probes`
    /// adds its own).
    pub fn with_peers(mut self, peers: impl IntoIterator<Item = String>) -> Self {
        self.peers.extend(peers);
        self
    }

    /// Notes when any agent's or server's trust bundle changes (not its
    /// first sighting): bursts of `unknown_ca` right after are explained.
    fn track_bundles(&mut self, obs: &Observations, now: SystemTime) {
        // Runs every tick over every agent: compare in place, allocate only
        // on a first sighting or a change.
        let mut note = |key: &str, fps: &[String]| match self.bundles.get_mut(key) {
            Some(prev) if prev.as_slice() == fps => {}
            Some(prev) => {
                info!(source = %key, authorities = fps.len(), "Trust bundle changed.");
                self.last_bundle_change = Some(now);
                *prev = fps.to_vec();
            }
            None => {
                self.bundles.insert(key.to_string(), fps.to_vec());
            }
        };
        for v in obs.agents.iter().filter(|v| !v.bundle.is_empty()) {
            note(&v.agent, &v.bundle);
        }
        // Servers are few; their authorities come unsorted.
        for v in obs.servers.iter().filter(|v| !v.bundle.is_empty()) {
            let mut fps: Vec<String> = v.bundle.iter().map(|a| a.fingerprint.clone()).collect();
            fps.sort();
            note(&format!("server:{}", v.server), &fps);
        }
    }

    /// Records "held back, because" once per (incident, actuator, reason).
    fn hold(
        &mut self,
        incident_id: &str,
        actuator: &str,
        target: &str,
        reason: &'static str,
        now: SystemTime,
        events: &mut Vec<Event>,
    ) {
        let entry = (actuator.to_string(), reason);
        if self.last_hold.get(incident_id) == Some(&entry) {
            return;
        }
        self.last_hold.insert(incident_id.to_string(), entry);
        self.p
            .metrics
            .holds_total
            .with_label_values(&[reason])
            .inc();
        info!(incident = %incident_id, %actuator, %target, reason, "Holding back.");
        events.push(Event::Held {
            incident_id: incident_id.to_string(),
            actuator: actuator.to_string(),
            target: target.to_string(),
            reason: reason.to_string(),
            at: now,
        });
    }

    /// Cluster circuit breaker: more than `breaker_share` of the watched
    /// agents (and at least `breaker_min_agents`) have open agent-level
    /// incidents at once.
    fn breaker_open(&self) -> bool {
        let total = self.views.len().max(
            self.incidents
                .values()
                .filter(|i| i.subject.is_agent_level())
                .map(|i| i.subject.agent_name())
                .collect::<HashSet<_>>()
                .len(),
        );
        let unhealthy = self
            .incidents
            .values()
            .filter(|i| i.subject.is_agent_level())
            .map(|i| i.subject.agent_name())
            .collect::<HashSet<_>>()
            .len();
        let g = &self.p.policy.guards;
        total > 0
            && unhealthy >= g.breaker_min_agents
            && unhealthy as f64 > g.breaker_share * total as f64
    }

    /// Open incidents (for tests and the demo).
    pub fn open_incidents(&self) -> Vec<Incident> {
        self.incidents.values().cloned().collect()
    }

    /// One pass of the loop at `now`.
    pub async fn tick(&mut self, now: SystemTime) -> TickReport {
        let timer = self.p.metrics.tick_duration_seconds.start_timer();
        let mut report = TickReport::default();
        let mut events = Vec::new();

        // Monitor.
        let obs = self.sense().await;
        let obs_servers = obs.servers.clone();
        self.record_lifecycles(&obs.agents, now, &mut events);
        self.track_bundles(&obs, now);

        // Analyze.
        let symptoms = {
            let open = &self.incidents;
            let is_open = |k: &SymptomKey| open.contains_key(k);
            let th = &self.p.policy.thresholds;
            let mut s = analyze(&obs.agents, &is_open, th, now);
            s.extend(control_plane(&obs, obs.servers.len(), &is_open, th, now));
            self.handshake_history.drain_from(&self.handshakes, now);
            let windows = self
                .handshake_history
                .windows(now, th.burst_window, th.burst_baseline);
            s.extend(handshakes(
                &HandshakeInput {
                    windows: &windows,
                    probes: &obs.probes,
                    cert_files: &obs.cert_files,
                    agents: &obs.agents,
                    last_bundle_change: self.last_bundle_change,
                    last_rotation: self.last_rotation,
                    last_issuer_change: self.last_issuer_change,
                },
                &is_open,
                th,
                now,
            ));
            s
        };
        self.views = obs
            .agents
            .iter()
            .map(|v| (v.agent.clone(), v.clone()))
            .collect();
        self.update_symptom_gauges(&symptoms);
        self.track_incidents(&symptoms, now, &mut events, &mut report);
        self.update_cluster_view(&obs, now);

        // Verify what previous ticks did.
        self.collect_results(&mut events);
        self.verify(now, &mut events, &mut report);

        // Plan.
        while self
            .recent_starts
            .front()
            .is_some_and(|t| saturating_since(now, *t) >= HOUR)
        {
            self.recent_starts.pop_front();
        }
        let incidents: Vec<&Incident> = self.incidents.values().collect();
        let busy: HashSet<String> = self
            .pending
            .values()
            .map(|p| p.step.target.clone())
            .collect();
        let actuators = &self.p.actuators;
        let class = |name: &str| actuators.get(name).map(|a| a.class());
        // Unknown until every watched server has been polled once.
        let polled: Vec<_> = obs_servers
            .iter()
            .filter(|s| s.reachable || s.last_error.is_some())
            .collect();
        let servers_reachable = (!obs_servers.is_empty() && polled.len() == obs_servers.len())
            .then(|| polled.iter().any(|s| s.reachable));
        let breaker_open = self.breaker_open();
        match (self.servers_reachable, servers_reachable) {
            (Some(false), Some(true)) => self.servers_back_since = Some(now),
            (_, Some(false)) => self.servers_back_since = None,
            _ => {}
        }
        if servers_reachable.is_some() {
            self.servers_reachable = servers_reachable;
        }
        let decisions = plan(&PlanInput {
            symptoms: &symptoms,
            incidents,
            busy_targets: &busy,
            last_run: &self.last_run,
            actions_last_hour: self.recent_starts.len(),
            class: &class,
            servers_reachable,
            breaker_open,
            servers_back_since: self.servers_back_since,
            peers: &self.peers,
            policy: &self.p.policy,
            dry_run: self.p.dry_run,
            now,
        });

        // Execute: record first, then act.
        let mut to_run = Vec::new();
        for d in decisions {
            match d {
                Decision::Act {
                    mut step,
                    next_rung,
                } => {
                    let Some(inc) = self.incidents.values().find(|i| i.id == step.incident_id)
                    else {
                        continue;
                    };
                    let key = inc.key();
                    if let Some(id) = inc.evidence.get("spiffe_id").and_then(|v| v.as_str()) {
                        step.params["evidence_spiffe_id"] = serde_json::json!(id);
                    }
                    // Precondition against what was just observed.
                    let prepared = self
                        .p
                        .actuators
                        .get(&step.actuator)
                        .map_or(Prepared::Ready, |a| a.prepare(&mut step, &obs));
                    let hold_reason = match prepared {
                        Prepared::Ready => None,
                        Prepared::Skip(r) | Prepared::Wait(r) => Some(r),
                    };
                    if let Some(reason) = hold_reason {
                        self.hold(
                            &step.incident_id,
                            &step.actuator,
                            &step.target,
                            reason,
                            now,
                            &mut events,
                        );
                        if matches!(prepared, Prepared::Skip(_)) {
                            // Not applicable: the next tick tries the next rung.
                            if let Some(inc) = self.incidents.get_mut(&key) {
                                inc.next_rung = next_rung;
                            }
                            events.push(Event::IncidentEscalated {
                                id: step.incident_id.clone(),
                                next_rung,
                            });
                        }
                        continue;
                    }
                    if let Some(inc) = self.incidents.get_mut(&key) {
                        inc.next_rung = next_rung;
                    }
                    events.push(Event::IncidentEscalated {
                        id: step.incident_id.clone(),
                        next_rung,
                    });
                    events.push(Event::ActionStarted {
                        step: step.clone(),
                        at: now,
                    });
                    self.last_hold.remove(&step.incident_id);
                    self.last_run
                        .insert((step.target.clone(), step.actuator.clone()), now);
                    if !step.dry_run {
                        self.recent_starts.push_back(now);
                    }
                    info!(action = %step.action_id, incident = %step.incident_id, symptom = %step.symptom, actuator = %step.actuator, target = %step.target, rung = step.rung, dry_run = step.dry_run, "Starting action.");
                    self.pending.insert(
                        step.action_id.clone(),
                        Pending {
                            step: step.clone(),
                            started: now,
                            key,
                            finished: None,
                        },
                    );
                    report.started.push(step.clone());
                    to_run.push(step);
                }
                Decision::Hold {
                    incident_id,
                    actuator,
                    target,
                    reason,
                } => self.hold(
                    &incident_id,
                    &actuator,
                    &target,
                    reason.as_str(),
                    now,
                    &mut events,
                ),
            }
        }
        self.p.buffer.push(events);
        if !to_run.is_empty() {
            // "Recorded before acting": try to land ActionStarted first. If
            // the store is away the events stay buffered and we act anyway;
            // the loop must not stall on the database.
            self.flush().await;
        }
        for step in to_run {
            self.launch(step, now);
        }

        // Knowledge.
        self.flush().await;
        report.buffered = self.p.buffer.len();
        report.symptoms = symptoms;
        self.p.health.ticked(now);
        self.p
            .metrics
            .last_tick_timestamp_seconds
            .set(unix_secs_f64(now));
        timer.observe_duration();
        report
    }

    async fn sense(&mut self) -> Observations {
        let mut obs = Observations::default();
        for (i, s) in self.p.sensors.iter().enumerate() {
            let t = self
                .p
                .metrics
                .sensor_duration_seconds
                .with_label_values(&[s.name()])
                .start_timer();
            match s.observe().await {
                Ok(readings) => {
                    self.last_readings.insert(i, readings.clone());
                    for r in readings {
                        obs.push(r);
                    }
                }
                Err(e) => {
                    self.p.metrics.error("sensor", e.kind());
                    warn!(sensor = s.name(), instance = s.instance(), error = %e, "Sensor failed.");
                    // Keep the last readings: their `updated_at` ages and
                    // they go blind by themselves.
                    for r in self.last_readings.get(&i).into_iter().flatten() {
                        obs.push(r.clone());
                    }
                }
            }
            t.observe_duration();
        }
        obs
    }

    /// SVID lifecycles: first delivery of a serial and its replacement,
    /// compared with the previous tick's views. Subjects are recorded with
    /// their first serial (a new subject always brings a new serial).
    fn record_lifecycles(
        &mut self,
        views: &[Arc<AgentView>],
        now: SystemTime,
        events: &mut Vec<Event>,
    ) {
        // Top-k soonest expiries without copying every SPIFFE ID: a max-heap
        // of (notAfter, view index, svid index) bounded to k.
        let mut soonest: BinaryHeap<(SystemTime, usize, usize)> = BinaryHeap::new();
        for (vi, v) in views.iter().enumerate() {
            if !self.views.contains_key(&v.agent) {
                let subject = Subject::agent(&v.agent);
                if self.subjects.insert(subject.clone()) {
                    events.push(Event::SubjectSeen { subject, at: now });
                }
            }
            let prev = self.views.get(&v.agent);
            for (si, s) in v.svids.iter().enumerate() {
                if s.serial.is_empty() {
                    continue;
                }
                if soonest.len() < SVID_TOP_K {
                    soonest.push((s.not_after, vi, si));
                } else if soonest.peek().is_some_and(|top| s.not_after < top.0) {
                    soonest.pop();
                    soonest.push((s.not_after, vi, si));
                }
                // Same position first: the agent's list order is stable.
                let old = prev.and_then(|p| {
                    p.svids
                        .get(si)
                        .filter(|o| o.spiffe_id == s.spiffe_id)
                        .or_else(|| p.svids.iter().find(|o| o.spiffe_id == s.spiffe_id))
                });
                if old.is_some_and(|o| o.serial == s.serial) {
                    continue;
                }
                let subject = Subject::svid(&v.agent, &s.spiffe_id);
                if self.subjects.insert(subject.clone()) {
                    events.push(Event::SubjectSeen { subject, at: now });
                }
                events.push(Event::SvidSeen {
                    agent: v.agent.clone(),
                    spiffe_id: s.spiffe_id.clone(),
                    serial: s.serial.clone(),
                    not_before: s.not_before,
                    not_after: s.not_after,
                    at: s.first_seen,
                });
                if let Some(o) = old.filter(|o| !o.serial.is_empty()) {
                    events.push(Event::SvidReplaced {
                        agent: v.agent.clone(),
                        spiffe_id: o.spiffe_id.clone(),
                        serial: o.serial.clone(),
                        at: s.first_seen,
                    });
                    self.last_rotation = Some(now);
                    if !o.issuer.is_empty() && !s.issuer.is_empty() && o.issuer != s.issuer {
                        info!(agent = %v.agent, spiffe_id = %s.spiffe_id, old = %o.issuer, new = %s.issuer, "SVID signed by a new CA key.");
                        self.last_issuer_change = Some(now);
                    }
                    self.p
                        .metrics
                        .spiffe_certificate_rotation_total
                        .with_label_values(&[&v.agent])
                        .inc();
                    info!(agent = %v.agent, spiffe_id = %s.spiffe_id, old = %o.serial, new = %s.serial, "SVID rotated.");
                }
            }
        }
        let now_s = unix_secs_f64(now);
        self.p.metrics.set_svid_expiries(
            soonest
                .into_iter()
                .map(|(not_after, vi, si)| {
                    let at = unix_secs_f64(not_after);
                    (
                        views[vi].agent.clone(),
                        views[vi].svids[si].spiffe_id.clone(),
                        at,
                        at - now_s,
                    )
                })
                .collect(),
        );
    }

    /// The cluster view: agents at risk and the earliest predicted outage
    /// over open incidents, plus what the admin APIs report.
    fn update_cluster_view(&self, obs: &Observations, now: SystemTime) {
        let m = &self.p.metrics;
        let at_risk: HashSet<&str> = self
            .incidents
            .values()
            .filter(|i| i.subject.is_agent_level())
            .map(|i| i.subject.agent_name())
            .collect();
        m.agents_at_risk.set(at_risk.len() as i64);
        // Workloads at risk: SVIDs served by an agent at risk, or themselves
        // the subject of an open incident.
        let svid_subjects: HashSet<(&str, &str)> = self
            .incidents
            .values()
            .filter_map(|i| match &i.subject {
                Subject::Svid { agent, spiffe_id } => Some((agent.as_str(), spiffe_id.as_str())),
                _ => None,
            })
            .collect();
        let workloads = obs
            .agents
            .iter()
            .flat_map(|v| {
                v.svids
                    .iter()
                    .map(move |s| (v.agent.as_str(), s.spiffe_id.as_str()))
            })
            .filter(|(agent, id)| at_risk.contains(agent) || svid_subjects.contains(&(*agent, *id)))
            .count();
        m.workloads_at_risk.set(workloads as i64);
        let outage = self
            .incidents
            .values()
            .filter_map(|i| i.predicted_outage)
            .min();
        m.predicted_outage_timestamp_seconds
            .set(outage.map_or(0.0, unix_secs_f64));
        m.servers_up
            .set(obs.servers.iter().filter(|s| s.reachable).count() as i64);
        for d in &obs.agent_debug {
            if let Some(last) = d.last_sync_success {
                m.agent_last_sync_age_seconds
                    .with_label_values(&[&d.agent])
                    .set(saturating_since(now, last).as_secs_f64());
            }
        }
    }

    fn update_symptom_gauges(&self, symptoms: &[Symptom]) {
        self.p.metrics.symptoms.reset();
        for s in symptoms {
            self.p
                .metrics
                .symptoms
                .with_label_values(&[s.kind.as_str(), s.severity.as_str()])
                .inc();
        }
    }

    fn track_incidents(
        &mut self,
        symptoms: &[Symptom],
        now: SystemTime,
        events: &mut Vec<Event>,
        report: &mut TickReport,
    ) {
        let present: HashSet<SymptomKey> = symptoms.iter().map(Symptom::key).collect();
        // Debounce: symptoms with an `open_after` must persist that long.
        self.pending_since.retain(|k, _| present.contains(k));
        let closed: Vec<SymptomKey> = self
            .incidents
            .keys()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        for key in closed {
            if let Some(inc) = self.incidents.remove(&key) {
                let took = saturating_since(now, inc.opened_at);
                self.p
                    .metrics
                    .incident_duration_seconds
                    .with_label_values(&[inc.kind.as_str()])
                    .observe(took.as_secs_f64());
                info!(incident = %inc.id, symptom = %inc.kind, subject = %inc.subject, after_ms = took.as_millis() as u64, "Incident closed.");
                self.last_hold.remove(&inc.id);
                events.push(Event::IncidentClosed {
                    id: inc.id.clone(),
                    at: now,
                    resolution: "cleared".into(),
                });
                report.closed.push(inc.id);
            }
        }
        // An action on an agent may drop its stream (a restart does exactly
        // that): defer opening agent_unreachable while an action that started
        // before the stream went down awaits its verdict. A stream already
        // down when the action started is not explained by it.
        let views = &self.views;
        let busy: HashSet<&str> = self
            .pending
            .values()
            .filter(|p| {
                views
                    .get(&p.step.target)
                    .is_some_and(|v| v.status_since >= p.started)
            })
            .map(|p| p.step.target.as_str())
            .collect();
        for s in symptoms {
            let key = s.key();
            if self.incidents.contains_key(&key) {
                continue;
            }
            if s.kind == crate::model::SymptomKind::AgentUnreachable
                && busy.contains(s.subject.agent_name())
            {
                continue;
            }
            if let Some(wait) = self.p.policy.thresholds.open_after.get(s.kind.as_str()) {
                let since = *self.pending_since.entry(key.clone()).or_insert(now);
                if saturating_since(now, since) < *wait {
                    continue;
                }
            }
            let inc = Incident {
                id: new_id(),
                kind: s.kind,
                subject: s.subject.clone(),
                severity: s.severity,
                opened_at: now,
                predicted_outage: s.predicted_outage,
                evidence: s.evidence.clone(),
                next_rung: 0,
            };
            self.p
                .metrics
                .incidents_opened_total
                .with_label_values(&[s.kind.as_str()])
                .inc();
            warn!(incident = %inc.id, symptom = %s.kind, subject = %s.subject, severity = s.severity.as_str(), blind = s.blind, "Incident opened.");
            events.push(Event::IncidentOpened {
                incident: inc.clone(),
            });
            report.opened.push(inc.id.clone());
            self.incidents.insert(key, inc);
        }
        self.p.metrics.incidents_open.reset();
        for inc in self.incidents.values() {
            self.p
                .metrics
                .incidents_open
                .with_label_values(&[inc.kind.as_str()])
                .inc();
        }
    }

    fn collect_results(&mut self, events: &mut Vec<Event>) {
        while let Ok((id, outcome, at)) = self.results_rx.try_recv() {
            if let Some(p) = self.pending.get_mut(&id) {
                p.finished = Some((at, outcome.kind));
                self.p
                    .metrics
                    .actions_total
                    .with_label_values(&[&p.step.actuator, outcome.kind.as_str()])
                    .inc();
                if let Some(probe) = self.probes.get(&p.step.target) {
                    probe.probe_now();
                }
            }
            events.push(Event::ActionFinished { id, outcome, at });
        }
    }

    fn verify(&mut self, now: SystemTime, events: &mut Vec<Event>, report: &mut TickReport) {
        let mut done = Vec::new();
        for (id, p) in &self.pending {
            let Some((finished_at, kind)) = p.finished else {
                continue;
            };
            let cleared = !self.incidents.contains_key(&p.key);
            let deadline_passed = saturating_since(now, finished_at) >= p.step.verify_within;
            let verdict = match kind {
                OutcomeKind::DryRun if deadline_passed || cleared => Some(Verification::Skipped),
                OutcomeKind::Ok if cleared => Some(Verification::Verified),
                OutcomeKind::Ok if deadline_passed => Some(Verification::Failed),
                OutcomeKind::Error | OutcomeKind::Timeout if cleared => {
                    Some(Verification::Verified)
                }
                OutcomeKind::Error | OutcomeKind::Timeout => Some(Verification::Failed),
                _ => None,
            };
            if let Some(v) = verdict {
                done.push((id.clone(), v));
            }
        }
        for (id, v) in done {
            if let Some(p) = self.pending.remove(&id) {
                self.p
                    .metrics
                    .verifications_total
                    .with_label_values(&[&p.step.actuator, v.as_str()])
                    .inc();
                info!(action = %id, actuator = %p.step.actuator, target = %p.step.target, verification = v.as_str(), "Action verified.");
                events.push(Event::ActionVerified {
                    id: id.clone(),
                    verification: v,
                    at: now,
                });
                report.verified.push((id, v));
            }
        }
    }

    fn launch(&mut self, step: Step, now: SystemTime) {
        let tx = self.results_tx.clone();
        if step.dry_run {
            let _ = tx.send((
                step.action_id.clone(),
                Outcome {
                    kind: OutcomeKind::DryRun,
                    detail: serde_json::json!({}),
                    error: None,
                },
                now,
            ));
            return;
        }
        let Some(actuator) = self.p.actuators.get(&step.actuator).cloned() else {
            let _ = tx.send((
                step.action_id.clone(),
                Outcome {
                    kind: OutcomeKind::Error,
                    detail: serde_json::json!({}),
                    error: Some(format!("actuator {:?} is not configured", step.actuator)),
                },
                now,
            ));
            return;
        };
        let clock = self.p.clock.clone();
        let metrics = self.p.metrics.clone();
        let wake = self.p.wake.clone();
        let span = info_span!("action", action = %step.action_id, actuator = %step.actuator, target = %step.target, reason = %step.symptom);
        self.actions.spawn(
            async move {
                let timer = metrics
                    .action_duration_seconds
                    .with_label_values(&[&step.actuator])
                    .start_timer();
                let outcome =
                    match tokio::time::timeout(step.timeout, actuator.execute(&step)).await {
                        Ok(Ok(o)) => o,
                        Ok(Err(e)) => {
                            metrics.error("actuator", e.kind());
                            warn!(error = %e, "Action failed.");
                            error_outcome(&e)
                        }
                        Err(_) => error_outcome(&ActuatorError::Timeout(step.timeout)),
                    };
                timer.observe_duration();
                let _ = tx.send((step.action_id.clone(), outcome, clock.now()));
                wake.notify_one();
            }
            .instrument(span),
        );
    }

    async fn flush(&mut self) {
        let timer = self.p.metrics.store_flush_duration_seconds.start_timer();
        let dropped_before = self.p.buffer.dropped();
        // Bounded: a database that hangs (pool timeouts, dropped packets)
        // must not stall detection. Flushing is cancel-safe: committed chunks
        // are gone from the buffer, the rest waits for the next tick.
        let flushed = tokio::time::timeout(FLUSH_BUDGET, self.p.buffer.flush()).await;
        match flushed {
            Ok(Ok(_)) => self.p.metrics.store_up.set(1),
            Err(_) => {
                self.p.metrics.store_up.set(0);
                self.p.metrics.error("store", "timeout");
                warn!(
                    buffered = self.p.buffer.len(),
                    budget_ms = FLUSH_BUDGET.as_millis() as u64,
                    "Store write did not finish within its budget; keeping events buffered."
                );
            }
            Ok(Err(e)) => {
                self.p.metrics.store_up.set(0);
                self.p.metrics.error("store", e.kind());
                warn!(error = %e, buffered = self.p.buffer.len(), "Store write failed; keeping events buffered.");
            }
        }
        timer.observe_duration();
        let dropped = self.p.buffer.dropped().saturating_sub(dropped_before);
        self.p.metrics.store_dropped_events_total.inc_by(dropped);
        self.p
            .metrics
            .store_buffered_events
            .set(self.p.buffer.len() as i64);
    }

    /// Ticks every `tick_interval` (or early when a sensor reports a change)
    /// until `shutdown`; then waits for running actions and flushes.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.p.tick_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wake = self.p.wake.clone();
        self.p.health.set_ready(true);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = interval.tick() => {}
                _ = wake.notified() => {
                    // Debounce bursts of changes.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let now = self.p.clock.now();
            let span = info_span!("tick");
            self.tick(now).instrument(span).await;
        }
        info!("Supervisor stopping.");
        self.actions.close();
        self.actions.wait().await;
        let now = self.p.clock.now();
        let mut events = Vec::new();
        self.collect_results(&mut events);
        self.verify(now, &mut events, &mut TickReport::default());
        self.p.buffer.push(events);
        // A few bounded attempts to land what is left before exiting.
        for _ in 0..10 {
            self.flush().await;
            if self.p.buffer.is_empty() {
                break;
            }
        }
    }
}

fn error_outcome(e: &ActuatorError) -> Outcome {
    Outcome {
        kind: if matches!(e, ActuatorError::Timeout(_)) {
            OutcomeKind::Timeout
        } else {
            OutcomeKind::Error
        },
        detail: serde_json::json!({ "kind": e.kind() }),
        error: Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
