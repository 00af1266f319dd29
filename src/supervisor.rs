//! The MAPE-K loop. [`Supervisor::tick`] runs one pass:
//! sense → analyze → reconcile incidents → verify → plan → execute →
//! record; [`Supervisor::run`] repeats it until shutdown.
//!
//! The loop's memory lives in one type per concern, each in its own file
//! with its own literal-time tests: [`incidents`](self::incidents) (open,
//! debounce, escalation, holds), [`guards`](self::guards) (cooldown and
//! budget ledger, server reachability, the breaker),
//! [`executor`](self::executor) (prepare, launch, collect, verify),
//! [`changes`](self::changes) (previous views, subjects, rotation and
//! bundle instants), [`handshakes`](self::handshakes) (outcome counter and
//! history), [`sensing`](self::sensing) (sensors and their last good
//! readings) and [`recorder`](self::recorder) (the store's write path).
//! A new guard, symptom or actuator belongs in one of them or in the pure
//! stages ([`crate::analyze`], [`crate::plan`]), never in a field here.

mod changes;
mod demotion;
mod executor;
mod gauges;
mod groups;
mod guards;
mod handshakes;
mod identities;
mod incidents;
mod operator;
mod recorder;
mod sensing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::actuators::{Prepared, Registry};
use crate::analyze::{
    HandshakeInput, LocalSignals, analyze, control_plane, explain_refusals, handshakes,
};
use crate::clock::{Clock, saturating_since};
use crate::handshake::Counter;
use crate::knowledge::{Buffer, Knowledge};
use crate::model::{
    Event, Incident, Observations, Step, Symptom, SymptomKey, SymptomKind, Verification, new_id,
};
use crate::plan::{Decision, PlanInput, plan};
use crate::policy::Policy;
use crate::sensors::Sensor;
use crate::telemetry::metrics::{Gauges, TickSummary};
use crate::telemetry::{Health, Metrics};
use changes::Changes;
use executor::Executor;
pub use executor::Targets;
use guards::{Guards, breaker_open};
use handshakes::Handshakes;
use identities::Identities;
use incidents::Incidents;
use operator::Operations;
pub use operator::{HUB_CAPACITY, Operator};
use recorder::{Recorder, abandoned};
pub use recorder::{StoreHealth, heartbeat as store_heartbeat};
use sensing::Sensing;

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

/// Everything the loop needs, handed over once.
pub struct Parts {
    /// The one clock the loop reads, once per tick.
    pub clock: Arc<dyn Clock>,
    /// Monitor.
    pub sensors: Vec<Box<dyn Sensor>>,
    /// Execute: actuators by instance name.
    pub actuators: Registry,
    /// Thresholds, ladders and guards.
    pub policy: Policy,
    /// Operator controls (pause, dry run as configured and as changed,
    /// approvals, demotions), the status and the events the API reads.
    pub operator: Operator,
    /// The store's write path.
    pub buffer: Buffer,
    pub metrics: Arc<Metrics>,
    /// Liveness and readiness of the loop (`/healthz`, `/readyz`).
    pub health: Arc<Health>,
    /// Notified by sensors on state changes and by returning actions: an
    /// early tick.
    pub wake: Arc<Notify>,
    pub tick_interval: Duration,
    /// Handshake outcomes: the counter probes, the report API and Envoy
    /// scrapes add to.
    pub handshakes: Counter,
    /// What actions may target: configured agents and peers.
    pub targets: Targets,
}

/// What one tick builds up: events for the store, the report, and the
/// summary the metrics are set from.
#[derive(Debug, Default)]
struct Tick<'o> {
    events: Vec<Event>,
    report: TickReport,
    summary: TickSummary<'o>,
}

/// The loop and its memory: each concern in its own type.
pub struct Supervisor {
    clock: Arc<dyn Clock>,
    policy: Policy,
    metrics: Arc<Metrics>,
    cadence: Cadence,
    operations: Operations,
    demotions: demotion::Demotions,
    sensing: Sensing,
    changes: Changes,
    /// Renewal service-level events: each SVID judged once against its
    /// rotation point.
    renewals: crate::slo::Renewals,
    handshakes: Handshakes,
    identities: Identities,
    incidents: Incidents,
    guards: Guards,
    executor: Executor,
    store: Recorder,
    /// Records observation frames for `replay`, when enabled.
    frames: Option<crate::replay::FrameRecorder>,
    /// Until when the loop waits for every sensor's first reading before
    /// judging anything (set at the first tick; `None` once warmed up).
    warm_until: Option<SystemTime>,
    /// Warm-up is over.
    warmed: bool,
    /// A leader: acts only on what its store recorded under its epoch.
    fenced: bool,
    /// A new policy, from a reload (SIGHUP); applied between ticks.
    reload: Option<tokio::sync::watch::Receiver<Policy>>,
    /// At shutdown: how long running actions may take, and how many had to
    /// be cut short.
    shutdown: ShutdownGrace,
}

/// What shutdown allows running actions, and what it had to cut short.
#[derive(Debug, Clone)]
pub struct ShutdownGrace {
    /// How long running actions may take to return.
    pub grace: Duration,
    /// Actions interrupted at shutdown.
    pub interrupted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for ShutdownGrace {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(30),
            interrupted: Arc::default(),
        }
    }
}

/// When the loop ticks, and the proof that it does.
struct Cadence {
    interval: Duration,
    wake: Arc<Notify>,
    health: Arc<Health>,
}

impl Supervisor {
    /// A supervisor resuming from `knowledge` (open incidents, recent
    /// actions: cooldowns and budget survive restarts). Actions recorded as
    /// started but never finished are closed as abandoned (started, outcome
    /// unknown); the verification of every unverified action of an open
    /// incident is taken up again.
    pub fn new(parts: Parts, knowledge: Knowledge) -> Self {
        let now = parts.clock.now();
        let mut store = Recorder::new(parts.buffer, parts.metrics.clone());
        store.push(abandoned(&knowledge.recent_actions, now));
        let th = &parts.policy.thresholds;
        let identities = Identities::resume(knowledge.agent_identities, parts.targets.agents());
        let mut executor = Executor::new(
            parts.actuators,
            parts.targets,
            parts.clock.clone(),
            parts.metrics.clone(),
            parts.wake.clone(),
        );
        executor.resume(
            &knowledge.recent_actions,
            &knowledge.open_incidents,
            &parts.policy,
            now,
        );
        Self {
            handshakes: Handshakes::new(parts.handshakes, th.burst_window + th.burst_baseline),
            guards: Guards::resume(&knowledge.recent_actions, &knowledge.open_incidents),
            identities,
            incidents: Incidents::resume(knowledge.open_incidents),
            executor,
            sensing: Sensing::new(parts.sensors),
            changes: Changes::default(),
            renewals: crate::slo::Renewals::default(),
            cadence: Cadence {
                interval: parts.tick_interval,
                wake: parts.wake,
                health: parts.health,
            },
            clock: parts.clock,
            policy: parts.policy,
            operations: Operations::new(parts.operator),
            demotions: demotion::Demotions::resume(&knowledge.verdicts, &knowledge.demotions),
            metrics: parts.metrics,
            store,
            reload: None,
            frames: None,
            fenced: false,
            warm_until: None,
            warmed: false,
            shutdown: ShutdownGrace::default(),
        }
    }

    /// Fenced (the cluster role's leader): a step starts only once the
    /// store has recorded its `ActionStarted` under the leader's epoch;
    /// otherwise it is returned failed, unexecuted.
    #[must_use]
    pub fn fenced(mut self) -> Self {
        self.fenced = true;
        self
    }

    /// Records observation frames around incidents for `replay`.
    #[must_use]
    pub fn with_frame_recorder(mut self, frames: crate::replay::FrameRecorder) -> Self {
        self.frames = Some(frames);
        self
    }

    /// Running actions get `grace.grace` at shutdown; the rest are
    /// interrupted, recorded as such and counted in `grace.interrupted`.
    #[must_use]
    pub fn with_shutdown_grace(mut self, grace: ShutdownGrace) -> Self {
        self.shutdown = grace;
        self
    }

    /// Takes every policy sent on `updates` from the next tick on (a
    /// reload: thresholds, ladders and guards; what the loop already
    /// remembers stays).
    #[must_use]
    pub fn with_policy_updates(mut self, updates: tokio::sync::watch::Receiver<Policy>) -> Self {
        self.reload = Some(updates);
        self
    }

    /// Whether the store answers, shared with the store heartbeat.
    pub fn store_health(&self) -> Arc<recorder::StoreHealth> {
        self.store.health()
    }

    /// Open incidents (for tests and the demo).
    pub fn open_incidents(&self) -> Vec<Incident> {
        self.incidents.iter().cloned().collect()
    }

    /// Counts renewal service-level events: SVIDs rotated before their
    /// rotation point (`rotation_overdue_open` of their lifetime, plus
    /// `rotation_check_slack`), or not.
    fn judge_renewals(&mut self, obs: &Observations, now: SystemTime) {
        let th = &self.policy.thresholds;
        let (share, slack) = (th.rotation_overdue_open, th.rotation_check_slack);
        let (mut good, mut bad) = (0, 0);
        for v in &obs.agents {
            let j = self.renewals.observe(v, share, slack, now);
            good += j.good;
            bad += j.bad;
        }
        self.renewals.end_tick();
        self.metrics.slo_events(crate::slo::Sli::Renewal, good, bad);
    }

    /// One pass of the loop at `now`.
    pub async fn tick(&mut self, now: SystemTime) -> TickReport {
        let timer = self.metrics.tick_duration_seconds.start_timer();
        // Monitor.
        let mut obs = self.sensing.sense(&self.metrics).await;
        // Warm-up: nothing is judged until every sensor has given its first
        // reading (at most `max_staleness` from the first tick). Otherwise
        // an incident or a verification resumed from the store, whose
        // sensor has not spoken yet, would look healed: closed, credited,
        // and acted on again when the reading arrives.
        if !self.warmed {
            if self.sensing.all_reported() {
                self.warmed = true;
            } else {
                let until = *self
                    .warm_until
                    .get_or_insert(now + self.policy.thresholds.max_staleness);
                if now < until {
                    self.cadence.health.ticked(now);
                    timer.observe_duration();
                    return TickReport::default();
                }
                warn!(sensors = ?self.sensing.silent(), "Some sensors gave no reading within the warm-up; judging without them.");
                self.warmed = true;
            }
        }
        let mut tick = Tick::default();
        self.identities
            .observe(&obs, self.executor.agents(), now, &mut tick);
        obs.agent_ids = self.identities.shared();
        self.changes.observe(&obs, now, &mut tick);
        self.judge_renewals(&obs, now);
        // Analyze.
        let symptoms = self.analyze(&obs, now);
        if let Some(f) = &self.frames {
            f.observe(&obs, self.handshakes.drained(), !symptoms.is_empty(), now);
        }
        // Reconcile incidents: an agent's stream lost to our own restart
        // waits for that action's verdict.
        let (executor, changes) = (&self.executor, &self.changes);
        let defer = |s: &Symptom| {
            s.kind == SymptomKind::AgentUnreachable
                && executor.explains_stream_loss(s.subject.agent_name(), changes)
        };
        let open_after = &self.policy.thresholds.open_after;
        self.incidents
            .reconcile(&symptoms, &defer, open_after, now, &mut new_id, &mut tick);
        // Verify what previous ticks did.
        let policy = &self.policy;
        self.executor.follow(self.incidents.superseded(), &|k| {
            !policy.ladder(k).is_empty()
        });
        self.collect(now, &mut tick);
        self.verify(now, &mut tick);
        // What operators changed since the last tick.
        for reset in self.operations.intake(&mut self.incidents, now, &mut tick) {
            info!(symptom = %reset.symptom, actuator = %reset.actuator, "Demotion reset by an operator.");
            self.demotions.reset(reset.symptom, &reset.actuator);
            self.incidents.reconsider(reset.symptom);
        }
        // Plan.
        let decisions = self.plan(&obs, &symptoms, now);
        // Execute: record first, then act.
        let steps = self.execute(decisions, &obs, &symptoms, now, &mut tick);
        tick.summary.gauges = Some(self.gauges(&obs, &symptoms, now));
        self.metrics.record_tick(now, &tick.summary);
        let demotions = &self.demotions;
        self.operations
            .gauges(&self.metrics, &self.policy, &|s, a| {
                demotions.is_demoted(s, a)
            });
        self.operations.publish_events(&tick.events);
        self.store.push(tick.events);
        if !steps.is_empty() {
            // "Recorded before acting": try to land ActionStarted first. If
            // the store is away the events stay buffered and we act anyway;
            // the loop must not stall on the database. A fenced leader acts
            // only on what the store took under its epoch.
            self.store.flush(now).await;
        }
        let unrecorded = self.fenced && self.store.len() > 0;
        for step in steps {
            if unrecorded {
                let why = if self.store.fenced_out() {
                    "another instance leads now (fenced out)"
                } else {
                    "the store has not recorded it under this leader's epoch"
                };
                warn!(action = %step.action_id, actuator = %step.actuator, target = %step.target, reason = why, "Not starting an action.");
                self.executor.refuse(&step, why, now);
            } else {
                self.executor.launch(step, now);
            }
        }
        // Knowledge.
        self.store.flush(now).await;
        self.publish_status(&obs, now);
        self.cadence.health.ticked(now);
        timer.observe_duration();
        TickReport {
            symptoms,
            buffered: self.store.len(),
            ..tick.report
        }
    }

    /// Outcomes of the actions that returned. A step its actuator held at
    /// execute time (a PodDisruptionBudget, a mapping to no pods) is
    /// recorded as a hold with the actuator's reason and its rung re-armed:
    /// no escalation, no charge to the hourly budget, and the cooldown
    /// decides when it runs again.
    fn collect(&mut self, now: SystemTime, tick: &mut Tick<'_>) {
        for h in self.executor.collect(tick) {
            let (incident, actuator, target) = (&h.incident_id, &h.actuator, &h.target);
            self.incidents
                .hold(incident, actuator, target, h.reason, now, tick);
            self.incidents.rearm(incident, h.rung, tick);
            self.guards.released(h.started);
        }
    }

    /// Verdicts of the returned actions; failures feed the futility ledger,
    /// which forgets targets whose incidents all closed.
    fn verify(&mut self, now: SystemTime, tick: &mut Tick<'_>) {
        let incidents = &self.incidents;
        for v in self.executor.verify(&|k| incidents.is_open(k), now, tick) {
            if !v.verified {
                self.guards.failed(&v.target, &v.actuator);
            }
            let demoted =
                self.demotions
                    .record(v.symptom, &v.actuator, v.verified, now, &self.policy);
            if let Some(event) = demoted {
                if let Event::Demoted { verified, runs, .. } = &event {
                    warn!(symptom = %v.symptom, actuator = %v.actuator, verified, runs, "Demoted: the step verified too rarely; skipped until `spire-healer reset-demotion`.");
                    self.operations
                        .controls()
                        .demote(crate::control::DemotedStep {
                            symptom: v.symptom,
                            actuator: v.actuator.clone(),
                            verified: *verified,
                            runs: *runs,
                            at: now,
                        });
                }
                tick.events.push(event);
            }
        }
        let policy = &self.policy;
        let acting = incidents.acting_targets(|k| !policy.ladder(k).is_empty());
        self.guards.settle(|target| acting.contains(target));
    }

    /// Symptoms of agents, the control plane and handshakes at `now`.
    fn analyze(&mut self, obs: &Observations, now: SystemTime) -> Vec<Symptom> {
        let incidents = &self.incidents;
        let is_open = |k: &SymptomKey| incidents.is_open(k);
        let th = &self.policy.thresholds;
        let local = LocalSignals {
            debug: &obs.agent_debug,
            health: &obs.health,
        };
        let mut s = analyze(&obs.agents, &local, &is_open, th, now);
        let ttls = self.changes.agent_ttls();
        s.extend(control_plane(
            obs,
            obs.servers.len(),
            &is_open,
            th,
            ttls,
            now,
        ));
        explain_refusals(obs, &mut s);
        let windows = self.handshakes.windows(now, th);
        let instants = self.changes.instants();
        s.extend(handshakes(
            &HandshakeInput {
                windows: &windows,
                probes: &obs.probes,
                cert_files: &obs.cert_files,
                agents: &obs.agents,
                last_bundle_change: instants.bundle_change,
                last_rotation: instants.rotation,
                last_issuer_change: instants.issuer_change,
            },
            &is_open,
            th,
            now,
        ));
        s
    }

    /// Decisions for the open incidents under the guards.
    fn plan(&mut self, obs: &Observations, symptoms: &[Symptom], now: SystemTime) -> Vec<Decision> {
        let servers_reachable = self.guards.note_servers(&obs.servers, now);
        let actions_last_hour = self.guards.actions_last_hour(now);
        let agent_servers = self.executor.agent_servers(now).clone();
        let g = &self.guards;
        let executor = &self.executor;
        let mut controls = self.operations.plan_controls();
        controls.demoted = self.demotions.demoted().collect();
        controls.agent_server = agent_servers
            .iter()
            .map(|(a, s)| (a.as_str(), s.as_str()))
            .collect();
        controls.peer_groups = executor
            .peer_groups()
            .iter()
            .map(|(p, g)| (p.as_str(), g.as_str()))
            .collect();
        let in_flight = executor.in_flight();
        controls.in_flight = in_flight
            .iter()
            .map(|(t, a)| (t.as_str(), a.as_str()))
            .collect();
        plan(&PlanInput {
            symptoms,
            incidents: self.incidents.iter().collect(),
            busy_targets: &executor.busy_targets(),
            last_run: g.last_run(),
            failures: g.failures(),
            actions_last_hour,
            class: &|name| executor.class(name),
            servers_reachable,
            breaker_open: breaker_open(
                executor.agents(),
                self.incidents.iter(),
                &self.policy.guards,
            ),
            servers_back_since: g.servers_back_since(),
            peers: executor.peers(),
            agents: executor.agents(),
            policy: &self.policy,
            dry_run: self.operations.controls().dry_run(),
            controls: &controls,
            now,
        })
    }

    /// Turns decisions into recorded steps (and recorded holds). A step
    /// whose precondition fails is held; one that does not apply here moves
    /// its ladder on. Returns the steps to launch.
    fn execute(
        &mut self,
        decisions: Vec<Decision>,
        obs: &Observations,
        symptoms: &[Symptom],
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) -> Vec<Step> {
        let mut to_run = Vec::new();
        for d in decisions {
            let (mut step, next_rung) = match d {
                Decision::Act {
                    step,
                    next_rung,
                    skipped,
                } => {
                    self.hold_skipped(&step, skipped, now, tick);
                    (step, next_rung)
                }
                Decision::AwaitApproval { step, skipped, .. } => {
                    self.hold_skipped(&step, skipped, now, tick);
                    let expiry = self.policy.approval_expiry();
                    tick.events
                        .push(self.operations.request(&step, expiry, now));
                    let reason = crate::plan::HoldReason::AwaitingApproval.as_str();
                    let (incident, actuator, target) =
                        (&step.incident_id, &step.actuator, &step.target);
                    self.incidents
                        .hold(incident, actuator, target, reason, now, tick);
                    continue;
                }
                Decision::Hold {
                    incident_id,
                    actuator,
                    target,
                    reason,
                } => {
                    let reason = reason.as_str();
                    self.incidents
                        .hold(&incident_id, &actuator, &target, reason, now, tick);
                    continue;
                }
                Decision::NeedsOperator {
                    incident_id,
                    target,
                    reason,
                } => {
                    self.incidents
                        .needs_operator(&incident_id, &target, &reason, now, tick);
                    continue;
                }
            };
            let Some(inc) = self.incidents.by_id(&step.incident_id) else {
                continue;
            };
            let key = inc.key();
            // The agent's SPIFFE ID as the symptom names it now (it may have
            // re-attested since the incident opened), else as it opened.
            let now_id = symptoms
                .iter()
                .find(|s| s.kind == key.kind && s.subject == key.subject)
                .and_then(|s| s.evidence.get("spiffe_id"))
                .and_then(|v| v.as_str());
            if let Some(id) =
                now_id.or_else(|| inc.evidence.get("spiffe_id").and_then(|v| v.as_str()))
            {
                step.params["evidence_spiffe_id"] = serde_json::json!(id);
            }
            let prepared = self.executor.prepare(&mut step, obs);
            if let Prepared::Skip(reason) | Prepared::Wait(reason) = prepared {
                let (incident, actuator, target) =
                    (&step.incident_id, &step.actuator, &step.target);
                self.incidents
                    .hold(incident, actuator, target, reason, now, tick);
                if matches!(prepared, Prepared::Skip(_)) {
                    // Not applicable here: the next tick tries the next rung.
                    self.incidents.escalate(&key, next_rung, tick);
                }
                continue;
            }
            step.action_id = new_id();
            self.incidents.escalate(&key, next_rung, tick);
            tick.events.push(Event::ActionStarted {
                step: step.clone(),
                at: now,
            });
            tick.events.extend(self.operations.used(&step, now));
            self.incidents.acted(&step.incident_id);
            self.guards.started(&step, now);
            let span = self.incidents.span(&step.incident_id);
            self.executor.track(&step, key, &span, now);
            tick.report.started.push(step.clone());
            to_run.push(step);
        }
        to_run
    }

    /// Records a hold for each rung `plan` passed over on the way to `step`
    /// (demoted, rejected).
    fn hold_skipped(
        &mut self,
        step: &Step,
        skipped: Vec<(String, crate::plan::HoldReason)>,
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) {
        for (actuator, reason) in skipped {
            let (incident, target) = (&step.incident_id, &step.target);
            self.incidents
                .hold(incident, &actuator, target, reason.as_str(), now, tick);
        }
    }

    /// Publishes what `GetStatus` answers: subjects with open incidents,
    /// blind sensors, actions in flight, the store's health.
    fn publish_status(&self, obs: &Observations, now: SystemTime) {
        let incidents = &self.incidents;
        let (sensing, policy, executor) = (&self.sensing, &self.policy, &self.executor);
        let store_up = self.store.health().is_up();
        self.operations.publish_status(|| {
            let mut by_subject: BTreeMap<String, crate::control::SubjectStatus> = BTreeMap::new();
            for inc in incidents.iter() {
                let e = by_subject
                    .entry(inc.subject.to_string())
                    .or_insert_with(|| crate::control::SubjectStatus {
                        subject: inc.subject.to_string(),
                        state: crate::control::SubjectState::Degraded,
                        open_incident_ids: Vec::new(),
                        predicted_outage: None,
                    });
                e.open_incident_ids.push(inc.id.clone());
                if inc.severity == crate::model::Severity::Critical {
                    e.state = crate::control::SubjectState::Failing;
                }
                e.predicted_outage = match (e.predicted_outage, inc.predicted_outage) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let watched = executor.agents().len() + executor.peers().len() + obs.servers.len();
            let unhealthy = by_subject.len();
            crate::control::Status {
                subjects: by_subject.into_values().collect(),
                healthy_subjects: watched.saturating_sub(unhealthy) as u64,
                blind_sensors: sensing
                    .freshness(&policy.thresholds, now)
                    .into_iter()
                    .filter(|f| f.blind)
                    .map(|f| f.sensor.to_string())
                    .collect(),
                actions_in_flight: u32::try_from(executor.in_flight().len()).unwrap_or(u32::MAX),
                open_incidents: u32::try_from(incidents.iter().count()).unwrap_or(u32::MAX),
                last_tick: Some(now),
                store_up,
            }
        });
    }

    /// The fleet as the metrics show it after this tick.
    fn gauges<'o>(
        &self,
        obs: &'o Observations,
        symptoms: &[Symptom],
        now: SystemTime,
    ) -> Gauges<'o> {
        let mut by_kind = BTreeMap::new();
        for s in symptoms {
            *by_kind
                .entry((s.kind.as_str(), s.severity.as_str()))
                .or_default() += 1;
        }
        let agents = self.executor.agents();
        let known = gauges::Known {
            agents,
            peers: self.executor.peers(),
            servers: obs.servers.iter().map(|s| s.server.as_str()).collect(),
            files: obs.cert_files.iter().map(|f| f.file.as_str()).collect(),
        };
        let open_list: Vec<&Incident> = self.incidents.iter().collect();
        let open = || open_list.iter().copied();
        Gauges {
            symptoms: by_kind,
            incidents_open: self.incidents.count_by_kind(),
            needs_operator: self.incidents.needing_operator_by_kind(),
            agents_at_risk: self.incidents.agents_at_risk().len() as i64,
            workloads_at_risk: gauges::workloads_at_risk(open(), &obs.agents, &known),
            predicted_outage: self.incidents.earliest_outage(),
            servers_up: obs.servers.iter().filter(|s| s.reachable).count() as i64,
            agent_sync_ages: obs
                .agent_debug
                .iter()
                .filter_map(|d| {
                    Some((
                        d.agent.as_str(),
                        saturating_since(now, d.last_sync_success?),
                    ))
                })
                .collect(),
            agent_svid_ttls: obs
                .servers
                .iter()
                .filter_map(|s| {
                    let learned = self.changes.agent_ttls().get(&s.server).copied();
                    let ttl = self.policy.thresholds.agent_ttl(learned)?;
                    Some((s.server.as_str(), ttl.ttl))
                })
                .collect(),
            open_incidents: gauges::open_incidents(open(), &known),
            agent_outages: gauges::agent_outages(open(), agents),
            svid_outages: gauges::svid_outages(
                open(),
                &obs.agents,
                agents,
                crate::telemetry::metrics::OUTAGE_TOP_K,
            ),
            sensors: self.sensing.freshness(&self.policy.thresholds, now),
            servers: gauges::servers(&obs.servers),
            held: self.incidents.held_by_reason(),
        }
    }

    /// Ticks every `tick_interval` (or early when a sensor reports a change)
    /// until `shutdown`; then waits for running actions and flushes.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.cadence.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wake = self.cadence.wake.clone();
        self.cadence.health.set_ready(true);
        let mut reload = self.reload.take();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(()) = policy_changed(&mut reload) => {
                    if let Some(rx) = &mut reload {
                        self.policy = rx.borrow_and_update().clone();
                        info!("Policy reloaded.");
                    }
                    continue;
                }
                _ = interval.tick() => {}
                _ = wake.notified() => {
                    // Debounce bursts of changes.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let now = self.clock.now();
            // `idle`: nothing opened, closed, started or verified (an idle
            // tick is not exported, see `telemetry::tracing`).
            let span = info_span!("tick", idle = tracing::field::Empty);
            let r = self.tick(now).instrument(span.clone()).await;
            let idle = r.opened.is_empty()
                && r.closed.is_empty()
                && r.started.is_empty()
                && r.verified.is_empty();
            span.record("idle", idle);
        }
        info!("Supervisor stopping.");
        let all_returned = self.executor.wait(self.shutdown.grace).await;
        let now = self.clock.now();
        let mut tick = Tick::default();
        self.collect(now, &mut tick);
        if !all_returned {
            let n = self.executor.interrupt(now, &mut tick);
            self.shutdown
                .interrupted
                .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            // An aborted action is dropped at its task's next poll, which
            // kills a command's process group: wait for that (bounded) so
            // it happens before the process exits.
            self.executor.wait(Duration::from_secs(2)).await;
        }
        self.verify(now, &mut tick);
        self.metrics.record_tick(now, &tick.summary);
        self.store.push(tick.events);
        self.store.drain(now).await;
    }
}
/// Resolves when a new policy was sent; `None` (never, in a select with
/// `Some(())`) once the sender is gone or when there is no channel.
async fn policy_changed(rx: &mut Option<tokio::sync::watch::Receiver<Policy>>) -> Option<()> {
    match rx {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
