//! Execute: the actions in flight and awaiting verification. A step is
//! prepared against what was just observed (its precondition), recorded,
//! then launched as a tracked task; its outcome comes back over a channel
//! and the step is verified against the incident it was for: cleared
//! within `verify_within` or not.
//!
//! Actions may target only what the loop watches: agents, and configured
//! peers (probe targets). When an action returns, its target is looked at
//! again at once (a peer's probe is poked, an agent's Workload API stream
//! retried without waiting out its backoff) so verification sees the new
//! state, not one a backoff old.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{Notify, mpsc};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, field, info, info_span, warn};

use super::Tick;
use super::changes::Changes;
use crate::actuators::{ActuatorError, Class, Prepared, Registry};
use crate::clock::{Clock, from_unix_millis, saturating_since};
use crate::knowledge::ActionRecord;
use crate::model::{
    Event, Incident, Observations, Outcome, OutcomeKind, Step, SymptomKey, Verification,
};
use crate::policy::Policy;

/// Verification window of a resumed action whose rung is no longer in
/// the policy.
const RESUMED_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);
use crate::sensors::handshake_probe::ProbeHandle;
use crate::sensors::workload_api::Shared;
use crate::telemetry::Metrics;

/// What actions may target: configured agents and configured peers, plus
/// the probes to poke when an action on a peer returns.
#[derive(Debug, Default, Clone)]
pub struct Targets {
    agents: HashSet<String>,
    peers: HashSet<String>,
    probes: HashMap<String, Arc<ProbeHandle>>,
    /// Workload API streams by agent: retried at once when an action on
    /// their agent returns, rather than after their reconnect backoff.
    streams: HashMap<String, Arc<Shared>>,
    /// Which server each agent is behind (blast-radius groups).
    server_groups: super::groups::AgentServers,
    /// Blast-radius groups of peers their names do not give.
    peer_groups: HashMap<String, String>,
}

impl Targets {
    /// The configured `[[agents]]` names.
    pub(super) fn agents(&self) -> &HashSet<String> {
        &self.agents
    }

    /// The `[[agents]]` names, and the peers named by their probes plus
    /// `peers` (peers without a probe).
    pub fn new(
        agents: impl IntoIterator<Item = String>,
        peers: impl IntoIterator<Item = String>,
        probes: HashMap<String, Arc<ProbeHandle>>,
    ) -> Self {
        let mut all: HashSet<String> = probes.keys().cloned().collect();
        all.extend(peers);
        Self {
            agents: agents.into_iter().collect(),
            peers: all,
            probes,
            streams: HashMap::new(),
            server_groups: super::groups::AgentServers::default(),
            peer_groups: HashMap::new(),
        }
    }

    /// Peers (peer or certificate-file names) and their blast-radius
    /// group, for peers whose name does not say it: configured Kubernetes
    /// workloads that select the same pods.
    pub fn with_peer_groups(mut self, groups: HashMap<String, String>) -> Self {
        self.peer_groups = groups;
        self
    }

    /// Agents' config files (agent, path) and the servers (name,
    /// `host:port`) they may point at: the "agents behind one server"
    /// blast-radius groups.
    pub fn with_server_groups(
        mut self,
        files: Vec<(String, std::path::PathBuf)>,
        servers: Vec<(String, String)>,
    ) -> Self {
        self.server_groups = super::groups::AgentServers::new(files, servers);
        self
    }

    /// The agents' Workload API streams, to retry when an action on their
    /// agent returns.
    pub fn with_streams(mut self, streams: HashMap<String, Arc<Shared>>) -> Self {
        self.streams = streams;
        self
    }
}

/// The verdict of an action that was run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Verdict {
    pub symptom: crate::model::SymptomKind,
    pub target: String,
    pub actuator: String,
    /// The symptom cleared in time.
    pub verified: bool,
}

/// A step an actuator held at execute time ([`OutcomeKind::Held`]): the
/// loop records the hold and re-arms the rung.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HeldStep {
    pub incident_id: String,
    pub actuator: String,
    pub target: String,
    /// The rung to try again (after the cooldown).
    pub rung: usize,
    /// When it started (its booking against the hourly budget).
    pub started: SystemTime,
    /// Closed-set reason ([`crate::actuators::HELD_REASONS`]).
    pub reason: &'static str,
}

/// An action in flight or awaiting verification.
#[derive(Debug, Clone)]
struct Pending {
    step: Step,
    started: SystemTime,
    key: SymptomKey,
    finished: Option<(SystemTime, OutcomeKind)>,
    /// The incident turned into a diagnosis no action fixes (an agent
    /// that answers with no identity for us): whatever happens next is not
    /// this action's doing, so it is neither credited nor blamed.
    no_credit: bool,
    /// The `action` span, a child of its incident's: open until the
    /// verdict (see [`crate::telemetry::tracing`]).
    span: Span,
}

/// The `action` span of `step`, a child of `parent` (its incident's span)
/// linked to the current (tick) span. `resumed`: taken over from the
/// store after a restart.
fn action_span(step: &Step, parent: &Span, resumed: bool) -> Span {
    let span = info_span!(
        parent: parent,
        "action",
        action.id = %step.action_id,
        incident.id = %step.incident_id,
        symptom = %step.symptom,
        actuator = %step.actuator,
        rung = step.rung,
        target = %step.target,
        dry_run = step.dry_run,
        resumed,
        outcome = field::Empty,
        verification = field::Empty,
        otel.status_code = field::Empty,
    );
    span.follows_from(Span::current());
    span
}

type Finished = (String, Outcome, SystemTime);

/// Runs steps and tracks them until verified.
pub(super) struct Executor {
    actuators: Registry,
    targets: Targets,
    pending: HashMap<String, Pending>,
    results_tx: mpsc::UnboundedSender<Finished>,
    results_rx: mpsc::UnboundedReceiver<Finished>,
    tasks: TaskTracker,
    /// Abort handles of launched actions, to cut them short at shutdown.
    aborts: HashMap<String, tokio::task::AbortHandle>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Woken when an action returns, so its verification need not wait
    /// for the next interval.
    wake: Arc<Notify>,
}

impl Executor {
    pub(super) fn new(
        actuators: Registry,
        targets: Targets,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        Self {
            actuators,
            targets,
            pending: HashMap::new(),
            results_tx,
            results_rx,
            tasks: TaskTracker::new(),
            aborts: HashMap::new(),
            clock,
            metrics,
            wake,
        }
    }

    /// Takes up, after a restart, the verification of every action of a
    /// still-open incident that has no verdict: finished ones from their
    /// recorded outcome and finish time; unfinished ones (the process died
    /// while they ran; `abandoned` records them) as if they had returned
    /// `now`, since they may have worked. The window is the rung's
    /// `verify_within` in `policy` (or [`RESUMED_WINDOW`] when the ladder
    /// has changed). Returns how many were taken up.
    pub(super) fn resume(
        &mut self,
        actions: &[ActionRecord],
        open: &[Incident],
        policy: &Policy,
        now: SystemTime,
    ) -> usize {
        let open: HashMap<&str, &Incident> = open.iter().map(|i| (i.id.as_str(), i)).collect();
        let mut n = 0;
        for a in actions.iter().filter(|a| a.verification.is_none()) {
            let Some(incident) = open.get(a.incident_id.as_str()) else {
                continue;
            };
            let rung = usize::try_from(a.rung).ok();
            let window = rung
                .and_then(|r| policy.ladder(incident.kind).get(r))
                .filter(|r| r.actuator == a.actuator)
                .map_or(RESUMED_WINDOW, |r| r.verify_within);
            // Cut short by a shutdown, or never finished: it may have
            // worked, so the symptom gets the window to clear.
            let cut_short = a
                .detail
                .as_ref()
                .is_some_and(|d| d["interrupted"] == serde_json::Value::Bool(true));
            let finished = match (&a.outcome, a.finished_at_ms) {
                (Some(_), Some(at)) if cut_short => (from_unix_millis(at), Some(OutcomeKind::Ok)),
                (Some(o), Some(at)) => (from_unix_millis(at), OutcomeKind::parse(o)),
                _ => (now, Some(OutcomeKind::Ok)),
            };
            let (finished_at, Some(kind)) = finished else {
                continue;
            };
            let step = Step {
                action_id: a.id.clone(),
                incident_id: a.incident_id.clone(),
                symptom: incident.kind,
                rung: rung.unwrap_or(0),
                actuator: a.actuator.clone(),
                target: a.target.clone(),
                params: a.params.clone(),
                timeout: window,
                verify_within: window,
                dry_run: a.dry_run,
            };
            let span = action_span(&step, &Span::none(), true);
            span.in_scope(|| {
                info!(action = %a.id, incident = %a.incident_id, actuator = %a.actuator, target_name = %a.target, "Resuming the verification of an action recorded before the restart.");
            });
            self.pending.insert(
                a.id.clone(),
                Pending {
                    step,
                    started: from_unix_millis(a.started_at_ms),
                    key: incident.key(),
                    finished: Some((finished_at, kind)),
                    no_credit: false,
                    span,
                },
            );
            n += 1;
        }
        n
    }

    /// Configured peers: the only peers actions may target.
    pub(super) fn peers(&self) -> &HashSet<String> {
        &self.targets.peers
    }

    /// Configured agents: the only agents actions may target.
    pub(super) fn agents(&self) -> &HashSet<String> {
        &self.targets.agents
    }

    /// Blast-radius groups of peers their names do not give.
    pub(super) fn peer_groups(&self) -> &HashMap<String, String> {
        &self.targets.peer_groups
    }

    /// The class of a configured actuator; `None` when not configured.
    pub(super) fn class(&self, actuator: &str) -> Option<Class> {
        self.actuators.get(actuator).map(|a| a.class())
    }

    /// Agent → the server it is behind (read again every 30 s).
    pub(super) fn agent_servers(&mut self, now: SystemTime) -> &HashMap<String, String> {
        self.targets.server_groups.current(now)
    }

    /// (target, actuator) of every action running or awaiting verification.
    pub(super) fn in_flight(&self) -> Vec<(String, String)> {
        self.pending
            .values()
            .map(|p| (p.step.target.clone(), p.step.actuator.clone()))
            .collect()
    }

    /// Targets with an action running or awaiting verification.
    pub(super) fn busy_targets(&self) -> HashSet<String> {
        self.pending
            .values()
            .map(|p| p.step.target.clone())
            .collect()
    }

    /// Whether an action in flight explains an agent's stream going down:
    /// a restart drops the stream, so `agent_unreachable` waits for the
    /// verdict. A stream already down when the action started is not
    /// explained by it.
    pub(super) fn explains_stream_loss(&self, agent: &str, changes: &Changes) -> bool {
        self.pending.values().any(|p| {
            p.step.target == agent
                && changes
                    .view(agent)
                    .is_some_and(|v| v.status_since >= p.started)
        })
    }

    /// Checks the step's precondition against what was just observed.
    pub(super) fn prepare(&self, step: &mut Step, obs: &Observations) -> Prepared {
        self.actuators
            .get(&step.actuator)
            .map_or(Prepared::Ready, |a| a.prepare(step, obs))
    }

    /// Tracks a recorded step until it is verified; its span is a child
    /// of `incident` (the incident's span).
    pub(super) fn track(&mut self, step: &Step, key: SymptomKey, incident: &Span, now: SystemTime) {
        let span = action_span(step, incident, false);
        span.in_scope(|| {
            info!(action = %step.action_id, incident = %step.incident_id, symptom = %step.symptom, actuator = %step.actuator, target_name = %step.target, rung = step.rung, dry_run = step.dry_run, "Starting action.");
        });
        self.pending.insert(
            step.action_id.clone(),
            Pending {
                step: step.clone(),
                started: now,
                key,
                finished: None,
                no_credit: false,
                span,
            },
        );
    }

    /// Actions run for an incident that was superseded (its symptom got
    /// worse, or was diagnosed better) are judged by the successor: they
    /// are verified only when that clears. When the successor is a
    /// diagnosis no action fixes (`fixable` says no: it has no ladder), its
    /// clearing is someone else's doing: the action is `skipped`.
    pub(super) fn follow(
        &mut self,
        superseded: &[(SymptomKey, SymptomKey)],
        fixable: &dyn Fn(crate::model::SymptomKind) -> bool,
    ) {
        for (old, new) in superseded {
            for p in self.pending.values_mut().filter(|p| &p.key == old) {
                p.key = new.clone();
                p.no_credit |= !fixable(new.kind);
            }
        }
    }

    /// Outcomes of the actions that returned since the last call. Returns
    /// the steps their actuator held at execute time: neither done nor
    /// failed (their verdict is `skipped`), for the caller to record as
    /// holds and re-arm.
    pub(super) fn collect(&mut self, tick: &mut Tick<'_>) -> Vec<HeldStep> {
        let mut held = Vec::new();
        while let Ok((id, outcome, at)) = self.results_rx.try_recv() {
            if let Some(p) = self.pending.get_mut(&id) {
                p.finished = Some((at, outcome.kind));
                p.span.record("outcome", outcome.kind.as_str());
                if matches!(outcome.kind, OutcomeKind::Error | OutcomeKind::Timeout) {
                    p.span.record("otel.status_code", "ERROR");
                }
                if outcome.kind == OutcomeKind::Held {
                    held.push(HeldStep {
                        incident_id: p.step.incident_id.clone(),
                        actuator: p.step.actuator.clone(),
                        target: p.step.target.clone(),
                        rung: p.step.rung,
                        started: p.started,
                        reason: outcome.held_reason(),
                    });
                }
                tick.summary
                    .actions
                    .push((p.step.actuator.clone(), outcome.kind.as_str()));
                if let Some(probe) = self.targets.probes.get(&p.step.target) {
                    probe.probe_now();
                }
                if let Some(stream) = self.targets.streams.get(&p.step.target) {
                    stream.retry_now();
                }
            }
            self.aborts.remove(&id);
            tick.events.push(Event::ActionFinished { id, outcome, at });
        }
        held
    }

    /// Decides the verification of every returned action whose verdict is
    /// due; `is_open` tells whether its incident is still open. Returns the
    /// verdict of every action that was really run (not a dry run): the
    /// futility ledger's and the demotion ledger's input.
    pub(super) fn verify(
        &mut self,
        is_open: &dyn Fn(&SymptomKey) -> bool,
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) -> Vec<Verdict> {
        let mut done: Vec<(String, Verification)> = self
            .pending
            .iter()
            .filter_map(|(id, p)| {
                let (finished_at, kind) = p.finished?;
                if p.no_credit {
                    return Some((id.clone(), Verification::Skipped));
                }
                let deadline_passed = saturating_since(now, finished_at) >= p.step.verify_within;
                verdict(kind, !is_open(&p.key), deadline_passed).map(|v| (id.clone(), v))
            })
            .collect();
        let mut failed = Vec::new();
        done.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, v) in done {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            p.span.record("verification", v.as_str());
            p.span.in_scope(|| {
                info!(action = %id, actuator = %p.step.actuator, target_name = %p.step.target, verification = v.as_str(), "Action verified.");
            });
            if v != Verification::Skipped && !p.step.dry_run {
                failed.push(Verdict {
                    symptom: p.step.symptom,
                    target: p.step.target.clone(),
                    actuator: p.step.actuator.clone(),
                    verified: v == Verification::Verified,
                });
            }
            tick.summary
                .verifications
                .push((p.step.actuator, v.as_str()));
            tick.events.push(Event::ActionVerified {
                id: id.clone(),
                verification: v,
                at: now,
            });
            tick.report.verified.push((id, v));
        }
        failed
    }

    /// Runs the step as a tracked task (a dry run only reports back).
    /// Returns `step` as failed without running it: a fenced leader whose
    /// store did not take the step's `ActionStarted` under its epoch (the
    /// store is away, or another leader took over) may not act on it.
    /// Held, like an execute-time hold: the rung is tried again after its
    /// cooldown, by whichever instance leads then.
    pub(super) fn refuse(&mut self, step: &Step, why: &str, now: SystemTime) {
        let held = crate::model::Outcome::held(
            crate::actuators::NOT_RECORDED,
            serde_json::json!({ "executed": false, "why": why }),
        );
        let _ = self.results_tx.send((step.action_id.clone(), held, now));
    }

    pub(super) fn launch(&mut self, step: Step, now: SystemTime) {
        let tx = self.results_tx.clone();
        if step.dry_run {
            let _ = tx.send((
                step.action_id.clone(),
                outcome(OutcomeKind::DryRun, None),
                now,
            ));
            return;
        }
        let Some(actuator) = self.actuators.get(&step.actuator).cloned() else {
            let error = format!("actuator {:?} is not configured", step.actuator);
            let _ = tx.send((
                step.action_id.clone(),
                outcome(OutcomeKind::Error, Some(error)),
                now,
            ));
            return;
        };
        let clock = self.clock.clone();
        let metrics = self.metrics.clone();
        let wake = self.wake.clone();
        let span = self
            .pending
            .get(&step.action_id)
            .map_or_else(Span::none, |p| p.span.clone());
        let id = step.action_id.clone();
        let handle = self.tasks.spawn(
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
        self.aborts.insert(id, handle.abort_handle());
    }

    /// Waits for every launched action to return, at most `grace`.
    /// Returns whether they all did.
    pub(super) async fn wait(&self, grace: std::time::Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }

    /// Cuts short every action still running (its task is aborted, which
    /// kills a command's process group) and records it as interrupted.
    /// Returns how many there were.
    pub(super) fn interrupt(&mut self, now: SystemTime, tick: &mut Tick<'_>) -> usize {
        let running: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.finished.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &running {
            if let Some(h) = self.aborts.remove(id) {
                h.abort();
            }
            let Some(p) = self.pending.remove(id) else {
                continue;
            };
            p.span.record("outcome", "interrupted");
            p.span.in_scope(|| {
                warn!(action = %id, actuator = %p.step.actuator, target_name = %p.step.target, "Action interrupted: shutting down before it returned.");
            });
            tick.summary
                .actions
                .push((p.step.actuator.clone(), OutcomeKind::Error.as_str()));
            tick.events.push(Event::ActionFinished {
                id: id.clone(),
                outcome: Outcome {
                    kind: OutcomeKind::Error,
                    detail: serde_json::json!({ "interrupted": true, "started": true }),
                    error: Some(
                        "interrupted: spire-healer stopped before the action returned".into(),
                    ),
                },
                at: now,
            });
        }
        running.len()
    }
}

/// The verification of a returned action: `cleared` when its incident is
/// closed, `deadline_passed` when `verify_within` has elapsed since it
/// returned. `None`: not yet decided. A step held at execute time did
/// nothing: `skipped` at once (no futility, no demotion).
fn verdict(kind: OutcomeKind, cleared: bool, deadline_passed: bool) -> Option<Verification> {
    match kind {
        OutcomeKind::Held => Some(Verification::Skipped),
        OutcomeKind::DryRun if deadline_passed || cleared => Some(Verification::Skipped),
        OutcomeKind::Ok if cleared => Some(Verification::Verified),
        OutcomeKind::Ok if deadline_passed => Some(Verification::Failed),
        OutcomeKind::Error | OutcomeKind::Timeout if cleared => Some(Verification::Verified),
        OutcomeKind::Error | OutcomeKind::Timeout => Some(Verification::Failed),
        _ => None,
    }
}

fn outcome(kind: OutcomeKind, error: Option<String>) -> Outcome {
    Outcome {
        kind,
        detail: serde_json::json!({}),
        error,
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
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::model::{AgentView, StreamStatus, Subject, SymptomKind};
    use std::time::{Duration, UNIX_EPOCH};

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn executor() -> Executor {
        Executor::new(
            Registry::new(),
            Targets::new(["a".to_string()], ["web".to_string()], HashMap::new()),
            Arc::new(ManualClock::new(t(0))),
            Arc::new(Metrics::new()),
            Arc::new(Notify::new()),
        )
    }

    fn step(id: &str, target: &str, dry_run: bool) -> Step {
        Step {
            action_id: id.into(),
            incident_id: "i1".into(),
            symptom: SymptomKind::AgentUnreachable,
            rung: 0,
            actuator: "restart".into(),
            target: target.into(),
            params: serde_json::json!({}),
            timeout: Duration::from_secs(5),
            verify_within: Duration::from_secs(10),
            dry_run,
        }
    }

    fn key(agent: &str) -> SymptomKey {
        SymptomKey {
            kind: SymptomKind::AgentUnreachable,
            subject: Subject::agent(agent),
        }
    }

    #[test]
    fn a_dry_run_is_tracked_collected_and_verified_without_a_runtime() {
        let mut ex = executor();
        let s = step("a1", "a", true);
        ex.track(&s, key("a"), &Span::none(), t(1));
        assert!(ex.busy_targets().contains("a"));
        ex.launch(s, t(1));
        let mut tick = Tick::default();
        ex.collect(&mut tick);
        assert_eq!(tick.summary.actions, [("restart".to_string(), "dry_run")]);
        assert!(matches!(&tick.events[..], [Event::ActionFinished { id, .. }] if id == "a1"));
        // Still open, within verify_within: no verdict yet.
        ex.verify(&|_| true, t(5), &mut tick);
        assert!(tick.report.verified.is_empty());
        // Cleared: skipped (a dry run proves nothing).
        ex.verify(&|_| false, t(6), &mut tick);
        assert_eq!(
            tick.report.verified,
            [("a1".to_string(), Verification::Skipped)]
        );
        assert!(ex.busy_targets().is_empty());
    }

    #[test]
    fn an_action_follows_its_superseded_incident() {
        let mut ex = executor();
        let s = step("a1", "a", true);
        let svid = |kind| SymptomKey {
            kind,
            subject: Subject::svid("a", "spiffe://td/w"),
        };
        ex.track(&s, svid(SymptomKind::SvidExpiring), &Span::none(), t(1));
        ex.launch(s, t(1));
        let mut tick = Tick::default();
        ex.collect(&mut tick);
        // Expiring became expired: only the successor's clearing counts.
        ex.follow(
            &[(
                svid(SymptomKind::SvidExpiring),
                svid(SymptomKind::SvidExpired),
            )],
            &|_| true,
        );
        let expired_open = |k: &SymptomKey| k == &svid(SymptomKind::SvidExpired);
        ex.verify(&expired_open, t(2), &mut tick);
        assert!(tick.report.verified.is_empty(), "not credited");
        ex.verify(&|_| false, t(3), &mut tick);
        assert_eq!(tick.report.verified.len(), 1);
    }

    #[test]
    fn an_unconfigured_actuator_fails_and_is_verified_failed() {
        let mut ex = executor();
        let s = step("a1", "a", false);
        ex.track(&s, key("a"), &Span::none(), t(1));
        ex.launch(s, t(1));
        let mut tick = Tick::default();
        ex.collect(&mut tick);
        ex.verify(&|_| true, t(1), &mut tick);
        assert_eq!(tick.summary.actions, [("restart".to_string(), "error")]);
        assert_eq!(
            tick.report.verified,
            [("a1".to_string(), Verification::Failed)]
        );
    }

    #[test]
    fn only_a_stream_lost_after_the_action_started_is_explained_by_it() {
        let view = |since: u64| {
            Arc::new(AgentView {
                agent: "a".into(),
                status: StreamStatus::Down,
                status_since: t(since),
                last_error: None,
                last_message: None,
                svids: Vec::new(),
                bundle_authorities: 0,
                bundle: Vec::new(),
                rotations: 0,
                updated_at: t(since),
            })
        };
        let changes_with = |v| {
            let mut c = Changes::default();
            let obs = Observations {
                agents: vec![v],
                ..Observations::default()
            };
            c.observe(&obs, t(20), &mut Tick::default());
            c
        };
        let mut ex = executor();
        ex.track(&step("a1", "a", false), key("a"), &Span::none(), t(10));
        assert!(ex.explains_stream_loss("a", &changes_with(view(11))));
        assert!(!ex.explains_stream_loss("a", &changes_with(view(9))));
        assert!(!ex.explains_stream_loss("b", &changes_with(view(11))));
        assert!(ex.peers().contains("web"));
        assert!(ex.agents().contains("a"));
    }

    /// An actuator whose steps a PodDisruptionBudget blocks.
    struct Blocked;

    #[async_trait::async_trait]
    impl crate::actuators::Actuator for Blocked {
        fn name(&self) -> &'static str {
            "blocked"
        }
        async fn execute(&self, _step: &Step) -> Result<Outcome, ActuatorError> {
            Ok(Outcome::held(
                "pdb_blocked",
                serde_json::json!({ "pod": "apps/web-1" }),
            ))
        }
    }

    #[tokio::test]
    async fn a_step_held_at_execute_time_is_handed_back_and_skipped() {
        let actuators: Registry = HashMap::from([(
            "evict".to_string(),
            Arc::new(Blocked) as Arc<dyn crate::actuators::Actuator>,
        )]);
        let mut ex = Executor::new(
            actuators,
            Targets::new([], ["web".to_string()], HashMap::new()),
            Arc::new(ManualClock::new(t(0))),
            Arc::new(Metrics::new()),
            Arc::new(Notify::new()),
        );
        let mut s = step("a1", "web", false);
        s.actuator = "evict".into();
        s.rung = 2;
        ex.track(&s, key("web"), &Span::none(), t(1));
        ex.launch(s, t(1));
        assert!(ex.wait(Duration::from_secs(5)).await);
        let mut tick = Tick::default();
        let held = ex.collect(&mut tick);
        assert_eq!(
            held,
            [HeldStep {
                incident_id: "i1".into(),
                actuator: "evict".into(),
                target: "web".into(),
                rung: 2,
                started: t(1),
                reason: "pdb_blocked",
            }]
        );
        assert_eq!(tick.summary.actions, [("evict".to_string(), "held")]);
        // Skipped at once, whether or not the incident is open: no verdict
        // for the futility or demotion ledgers.
        let verdicts = ex.verify(&|_| true, t(2), &mut tick);
        assert!(verdicts.is_empty());
        assert_eq!(
            tick.report.verified,
            [("a1".to_string(), Verification::Skipped)]
        );
        assert!(ex.busy_targets().is_empty());
        // An unknown reason in the detail is reported as `held`.
        let odd = Outcome {
            kind: OutcomeKind::Held,
            detail: serde_json::json!({ "held": "made_up" }),
            error: None,
        };
        assert_eq!(odd.held_reason(), "held");
    }

    #[test]
    fn verdict_table() {
        use OutcomeKind::*;
        use Verification::*;
        // (outcome, cleared, deadline passed, verdict)
        let cases = [
            (Ok, true, false, Some(Verified)),
            (Ok, false, false, None),
            (Ok, false, true, Some(Failed)),
            (Error, true, false, Some(Verified)),
            (Error, false, false, Some(Failed)),
            (Timeout, false, false, Some(Failed)),
            (DryRun, false, false, None),
            (DryRun, true, false, Some(Skipped)),
            (DryRun, false, true, Some(Skipped)),
            (Held, false, false, Some(Skipped)),
            (Held, true, true, Some(Skipped)),
        ];
        for (kind, cleared, passed, want) in cases {
            assert_eq!(
                verdict(kind, cleared, passed),
                want,
                "{kind:?} {cleared} {passed}"
            );
        }
    }
}
