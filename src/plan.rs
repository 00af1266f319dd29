//! Plan: open incidents + history + policy + operator controls → steps or
//! holds. Pure.
//!
//! For each open incident, most urgent first, the next rung of its ladder is
//! proposed. Rungs that cannot help are passed over: not configured, futile
//! on the target, rejected by an operator for this incident, or demoted for
//! the symptom (the last two are reported in `skipped`). The chosen step is
//! then held back if a guard says so, in this order: the target already has
//! an action running or awaiting verification, the observation is blind, no
//! server answers, the circuit breaker is open, the servers just came back,
//! a maintenance window is open, the (target, actuator) cooldown has not
//! passed, the hourly budget is spent, too many actions run at once, too
//! much of the target's group is under disruptive action (blast radius).
//! Only a step that passes every guard meets the operator controls: paused
//! holds it; one that needs an approval asks for it, waits while it is
//! pending and acts once approved. Approval is consent, not a bypass: an
//! approved step still waits for the guards. Every hold carries its reason
//! so "held back, because" is recorded.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use serde_json::json;

use crate::clock::saturating_since;
use crate::model::{ApprovalState, Incident, Step, Symptom, SymptomKey};
use crate::policy::{Class, MaintenanceWindow, Policy};

/// Why a step was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldReason {
    /// Another action on the same agent is running or being verified.
    TargetBusy,
    /// The observation is too old to act on.
    Blind,
    /// The (target, actuator) cooldown has not passed.
    Cooldown,
    /// The hourly action budget is spent.
    Budget,
    /// No configured actuator on the remaining ladder.
    NotConfigured,
    /// The policy has no ladder for this symptom.
    NoLadder,
    /// The subject is a server or the cluster: reported, not acted on.
    ObserveOnly,
    /// No server answers: restarting, evicting or moving an agent now would
    /// turn "stale but working" into "down".
    NoServerReachable,
    /// Too many agents are unhealthy at once: the cause is upstream.
    CircuitOpen,
    /// The servers just came back from a total outage: stale agents get
    /// their sync backoff to reconnect by themselves before anything
    /// restarts or moves them.
    AwaitingResync,
    /// Nothing local explains the failures (a handshake burst with no
    /// rotation behind it: a foreign CA, a misconfigured or unavailable
    /// peer): reported, no healthy process is restarted for it.
    NoLocalCause,
    /// The target is not configured: a peer that is not a probe target (a
    /// name from reports or Envoy stats: a reporter must not be able to make
    /// us signal or restart a process it names), or an agent that is not an
    /// `[[agents]]` entry (known only by its SPIFFE ID from a server listing).
    UnknownTarget,
    /// A more specific diagnosis on the same target has the target's one
    /// slot: this incident is explained by it (an expired SVID because the
    /// agent cannot attest) and does not compete for the agent.
    Explained,
    /// Every rung left on the ladder is futile for this target: an operator
    /// must act (recorded on the incident as `needs_operator`).
    NeedsOperator,
    /// An operator paused the supervisor: nothing starts.
    Paused,
    /// The step needs a person's yes and waits for it.
    AwaitingApproval,
    /// An operator rejected the step: the ladder moves on.
    ApprovalRejected,
    /// Nobody approved the step in time: it is asked again.
    ApprovalExpired,
    /// The (symptom, actuator) step verified too rarely over its last runs:
    /// skipped until an operator resets it; the ladder moves on.
    Demoted,
    /// Too much of the target's group is under disruptive action already.
    BlastRadius,
    /// The most actions allowed at once are running.
    MaxConcurrent,
    /// A maintenance window holds this actuator class now.
    MaintenanceWindow,
    /// This instance (`role = "node"`) leaves the symptom to the cluster
    /// instance ([`crate::leadership::CLUSTER_SYMPTOMS`]), which may be
    /// failing the agent over right now: recorded, not acted on here. It
    /// keeps the agent's slot, so what follows on the agent (its stream
    /// dropping during that restart) is explained, not acted on twice.
    LeftToCluster,
}

impl HoldReason {
    /// Every reason.
    pub const ALL: [HoldReason; 23] = [
        HoldReason::TargetBusy,
        HoldReason::Blind,
        HoldReason::Cooldown,
        HoldReason::Budget,
        HoldReason::NotConfigured,
        HoldReason::NoLadder,
        HoldReason::ObserveOnly,
        HoldReason::NoServerReachable,
        HoldReason::CircuitOpen,
        HoldReason::AwaitingResync,
        HoldReason::NoLocalCause,
        HoldReason::UnknownTarget,
        HoldReason::Explained,
        HoldReason::NeedsOperator,
        HoldReason::Paused,
        HoldReason::AwaitingApproval,
        HoldReason::ApprovalRejected,
        HoldReason::ApprovalExpired,
        HoldReason::Demoted,
        HoldReason::BlastRadius,
        HoldReason::MaxConcurrent,
        HoldReason::MaintenanceWindow,
        HoldReason::LeftToCluster,
    ];

    /// Snake-case name: metric label and store value.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::TargetBusy => "target_busy",
            HoldReason::Blind => "blind",
            HoldReason::Cooldown => "cooldown",
            HoldReason::Budget => "budget",
            HoldReason::NotConfigured => "not_configured",
            HoldReason::NoLadder => "no_ladder",
            HoldReason::ObserveOnly => "observe_only",
            HoldReason::NoServerReachable => "no_server_reachable",
            HoldReason::CircuitOpen => "circuit_open",
            HoldReason::AwaitingResync => "awaiting_resync",
            HoldReason::NoLocalCause => "no_local_cause",
            HoldReason::UnknownTarget => "unknown_target",
            HoldReason::Explained => "explained",
            HoldReason::NeedsOperator => "needs_operator",
            HoldReason::Paused => "paused",
            HoldReason::AwaitingApproval => "awaiting_approval",
            HoldReason::ApprovalRejected => "approval_rejected",
            HoldReason::ApprovalExpired => "approval_expired",
            HoldReason::Demoted => "demoted",
            HoldReason::BlastRadius => "blast_radius",
            HoldReason::MaxConcurrent => "max_concurrent",
            HoldReason::MaintenanceWindow => "maintenance_window",
            HoldReason::LeftToCluster => "left_to_cluster",
        }
    }

    /// Whether an incident held for this reason keeps its target's slot:
    /// it is the right step, only not now. A diagnosis with nothing to do
    /// (no ladder, nothing configured or left to try, a target we may not
    /// act on) leaves the slot to the next incident on the target; one left
    /// to the cluster instance keeps it (that instance may be acting on the
    /// agent).
    fn keeps_slot(self) -> bool {
        matches!(
            self,
            HoldReason::TargetBusy
                | HoldReason::Blind
                | HoldReason::Cooldown
                | HoldReason::Budget
                | HoldReason::NoServerReachable
                | HoldReason::CircuitOpen
                | HoldReason::AwaitingResync
                | HoldReason::Paused
                | HoldReason::AwaitingApproval
                | HoldReason::ApprovalExpired
                | HoldReason::BlastRadius
                | HoldReason::MaxConcurrent
                | HoldReason::MaintenanceWindow
                | HoldReason::LeftToCluster
        )
    }
}

/// One planning decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run this step; the incident's ladder moves to `next_rung`.
    Act {
        step: Step,
        /// Rung to try if this one does not verify.
        next_rung: usize,
        /// Rungs passed over on the way (demoted, rejected): (actuator,
        /// why), each recorded as a hold.
        skipped: Vec<(String, HoldReason)>,
    },
    /// The step needs a person's yes and has no live approval: the loop
    /// asks for one and holds the incident as `awaiting_approval`. Returned
    /// only when every guard would let the step run now (and not paused).
    AwaitApproval {
        step: Step,
        /// Rung to try if this one does not verify.
        next_rung: usize,
        /// Rungs passed over on the way (demoted, rejected): (actuator,
        /// why), each recorded as a hold.
        skipped: Vec<(String, HoldReason)>,
    },
    /// Hold back.
    Hold {
        incident_id: String,
        /// Actuator that would have run (empty when none).
        actuator: String,
        /// Target agent.
        target: String,
        /// Why.
        reason: HoldReason,
    },
    /// Nothing left on the ladder can help this target: every remaining
    /// rung is futile. Held as `needs_operator`, with a reason for a person.
    NeedsOperator {
        incident_id: String,
        /// Target.
        target: String,
        /// Which rungs were futile and how often they failed.
        reason: String,
    },
}

/// Everything `plan` looks at.
pub struct PlanInput<'a> {
    /// Active symptoms (for blindness).
    pub symptoms: &'a [Symptom],
    /// Open incidents.
    pub incidents: Vec<&'a Incident>,
    /// Agents with an action running or awaiting verification.
    pub busy_targets: &'a HashSet<String>,
    /// Last start per (target, actuator).
    pub last_run: &'a HashMap<(String, String), SystemTime>,
    /// Failed verifications per (target, actuator) while the target's
    /// incidents stayed open: at `guards.futile_after` the rung is futile.
    pub failures: &'a HashMap<(String, String), u32>,
    /// Actions started in the last hour.
    pub actions_last_hour: usize,
    /// The class of a configured actuator; `None` when not configured.
    pub class: &'a dyn Fn(&str) -> Option<Class>,
    /// Whether any watched server answers (`None`: no server is watched).
    pub servers_reachable: Option<bool>,
    /// The cluster circuit breaker is open.
    pub breaker_open: bool,
    /// When the servers last came back after every one was down.
    pub servers_back_since: Option<SystemTime>,
    /// Configured peer (probe) names: the only peers actions may target.
    pub peers: &'a HashSet<String>,
    /// Configured `[[agents]]` names: the only agents actions may target.
    /// An agent known only by its SPIFFE ID (from a server's listing) is
    /// reported, never acted on: no actuator can name its node.
    pub agents: &'a HashSet<String>,
    pub policy: &'a Policy,
    /// Record without executing.
    pub dry_run: bool,
    /// Operator controls and the group guards' view.
    pub controls: &'a PlanControls<'a>,
    /// The tick's one reading of the clock.
    pub now: SystemTime,
}

/// What operators decided and what is in flight, as `plan` needs it.
#[derive(Debug, Default)]
pub struct PlanControls<'a> {
    /// An operator paused the supervisor: every step that would act or ask
    /// for an approval holds as `paused` (holds for other reasons stay).
    pub paused: bool,
    /// Live approvals by (incident id, rung): the approval id and whether
    /// it is `Pending` or `Approved` (other states count as none). An
    /// approved step carries the id in `step.params["approval_id"]`.
    pub approvals: HashMap<(&'a str, usize), (&'a str, ApprovalState)>,
    /// (incident id, rung) an operator rejected: skipped for that incident.
    pub rejected: HashSet<(&'a str, usize)>,
    /// Demoted (symptom, actuator) steps: skipped until reset (while
    /// `guards.demotion.enabled`).
    pub demoted: HashSet<(crate::model::SymptomKind, &'a str)>,
    /// Actions running or awaiting verification: (target, actuator). They
    /// count towards `max_concurrent_actions` and, when their actuator is
    /// disruptive (or no longer configured), towards the blast radius.
    pub in_flight: Vec<(&'a str, &'a str)>,
    /// The server each configured agent is behind (blast-radius groups);
    /// agents missing here are in no server group.
    pub agent_server: HashMap<&'a str, &'a str>,
    /// The blast-radius group of a peer or certificate file that its name
    /// does not give: configured Kubernetes workloads selecting the same
    /// pods share one, whatever their names. Others are grouped by
    /// [`peer_group`].
    pub peer_groups: HashMap<&'a str, &'a str>,
}

/// Decides what to do for each open incident.
///
/// Incidents on one target share one slot: they are planned together, the
/// most specific diagnosis first ([`SymptomKind::specificity`]). The first
/// that acts, or is held only for now (cooldown, budget, a busy target, …),
/// keeps the slot and the others are held as `explained`; one with nothing
/// to do (no ladder, nothing left to try) passes it on. Targets are taken
/// most urgent first: severity, then earliest predicted outage, then age.
pub fn plan(input: &PlanInput<'_>) -> Vec<Decision> {
    let blind: HashSet<SymptomKey> = input
        .symptoms
        .iter()
        .filter(|s| s.blind)
        .map(Symptom::key)
        .collect();
    let mut order: Vec<&Incident> = input.incidents.clone();
    order.sort_by(|a, b| urgency(a, b));
    // Group by slot, in the order of each slot's most urgent incident; in a
    // group, the most specific diagnosis first (stable: urgency breaks ties).
    let mut slots: Vec<Vec<&Incident>> = Vec::new();
    let mut index: HashMap<Slot<'_>, usize> = HashMap::with_capacity(order.len());
    for inc in order {
        let next = slots.len();
        let i = *index.entry(Slot::of(inc)).or_insert(next);
        if i == next {
            slots.push(Vec::new());
        }
        slots[i].push(inc);
    }
    let mut planner = Planner {
        input,
        blind,
        busy: input.busy_targets.clone(),
        planned: 0,
        disruptive: Vec::new(),
        maintenance: input.policy.open_maintenance(input.now),
    };
    let mut out = Vec::new();
    for mut group in slots {
        group.sort_by_key(|i| std::cmp::Reverse(i.kind.specificity()));
        let mut taken = false;
        for inc in group {
            if taken {
                out.push(hold(inc, "", HoldReason::Explained));
                continue;
            }
            let d = planner.decide(inc);
            taken = match &d {
                Decision::Act { .. } | Decision::AwaitApproval { .. } => true,
                Decision::Hold { reason, .. } => reason.keeps_slot(),
                Decision::NeedsOperator { .. } => false,
            };
            out.push(d);
        }
    }
    out
}

/// Most urgent first: severity, then earliest predicted outage, then age.
fn urgency(a: &Incident, b: &Incident) -> std::cmp::Ordering {
    let never = SystemTime::UNIX_EPOCH + std::time::Duration::MAX / 4;
    b.severity
        .cmp(&a.severity)
        .then_with(|| {
            a.predicted_outage
                .unwrap_or(never)
                .cmp(&b.predicted_outage.unwrap_or(never))
        })
        .then_with(|| a.opened_at.cmp(&b.opened_at))
        .then_with(|| a.id.cmp(&b.id))
}

/// What incidents compete for: an agent (its own and its SVIDs'
/// incidents), a peer or file, or nothing shared (servers, the cluster).
#[derive(Debug, PartialEq, Eq, Hash)]
enum Slot<'a> {
    Agent(&'a str),
    Other(&'a str),
    Alone(&'a str),
}

impl<'a> Slot<'a> {
    fn of(inc: &'a Incident) -> Self {
        if !inc.subject.is_actionable() {
            Slot::Alone(&inc.id)
        } else if inc.subject.is_agent_level() {
            Slot::Agent(inc.subject.agent_name())
        } else {
            Slot::Other(inc.subject.agent_name())
        }
    }
}

fn hold(inc: &Incident, actuator: &str, reason: HoldReason) -> Decision {
    Decision::Hold {
        incident_id: inc.id.clone(),
        actuator: actuator.to_string(),
        target: inc.subject.agent_name().to_string(),
        reason,
    }
}

/// The group of a peer (or certificate file) for the blast radius: its
/// name up to the first `/`. Reported handshake targets may name instances
/// of one service as `web/a`, `web/b`: both are peers of the name `web`.
pub fn peer_group(name: &str) -> &str {
    name.split_once('/').map_or(name, |(group, _)| group)
}

/// The blast-radius group of a peer or file: as configured in `groups`,
/// else by its name ([`peer_group`]).
fn radius_group<'s>(groups: &HashMap<&'s str, &'s str>, name: &'s str) -> &'s str {
    groups
        .get(name)
        .copied()
        .unwrap_or_else(|| peer_group(name))
}

/// The guards' view while one tick is planned: targets taken and actions
/// planned so far.
struct Planner<'i, 'a> {
    input: &'i PlanInput<'a>,
    blind: HashSet<SymptomKey>,
    busy: HashSet<String>,
    /// Steps planned to act this tick.
    planned: usize,
    /// Targets of the disruptive steps planned this tick.
    disruptive: Vec<String>,
    /// Maintenance windows open now.
    maintenance: Vec<(&'a MaintenanceWindow, SystemTime)>,
}

impl Planner<'_, '_> {
    /// Whether `actuator` has failed verification often enough on `target`
    /// to be futile there.
    fn futile(&self, target: &str, actuator: &str) -> Option<u32> {
        let n = *self
            .input
            .failures
            .get(&(target.to_string(), actuator.to_string()))?;
        (n >= self.input.policy.guards.futile_after).then_some(n)
    }

    /// The decision for one incident that has its target's slot.
    fn decide(&mut self, inc: &Incident) -> Decision {
        let input = self.input;
        let target = inc.subject.agent_name().to_string();
        if input.policy.left_to_cluster.contains(&inc.kind) {
            return hold(inc, "", HoldReason::LeftToCluster);
        }
        let ladder = input.policy.ladder(inc.kind);
        if ladder.is_empty() {
            return hold(inc, "", HoldReason::NoLadder);
        }
        // A server is acted on through its pod only (a workload rung).
        let on_server = matches!(inc.subject, crate::model::Subject::Server { .. });
        if !inc.subject.is_actionable() && !on_server {
            return hold(inc, "", HoldReason::ObserveOnly);
        }
        if let crate::model::Subject::Peer { peer } | crate::model::Subject::Handshakes { peer, .. } =
            &inc.subject
            && !input.peers.contains(peer)
        {
            return hold(inc, "", HoldReason::UnknownTarget);
        }
        if inc.subject.is_agent_level() && !input.agents.contains(&target) {
            return hold(inc, "", HoldReason::UnknownTarget);
        }
        if inc.kind == crate::model::SymptomKind::HandshakeFailureBurst
            && !inc.evidence["remediable"].as_bool().unwrap_or(false)
        {
            return hold(inc, "", HoldReason::NoLocalCause);
        }
        // Once nothing was left, it stays so for this incident (also after a
        // restart, when the failures behind it may be older than the hour
        // the ledger is rebuilt from): an operator acts, or it clears.
        if let Some(reason) = &inc.needs_operator {
            return Decision::NeedsOperator {
                incident_id: inc.id.clone(),
                target: target.clone(),
                reason: reason.clone(),
            };
        }
        // The agent guards protect SPIRE agents; a peer or file is reloaded
        // from what is already on disk or in the agent's cache.
        let on_agent = inc.subject.is_agent_level();
        // Past the end, repeat the last rung until it is futile. Skip rungs
        // whose actuator is not configured, futile on this target, rejected
        // for this incident or demoted for this symptom.
        let start = inc.next_rung.min(ladder.len() - 1);
        let controls = input.controls;
        let demotion = input.policy.guards.demotion.enabled;
        let mut skipped = Vec::new();
        let mut passed_over = Vec::new();
        let mut chosen = None;
        for (idx, r) in ladder.iter().enumerate().skip(start) {
            if (input.class)(&r.actuator).is_none() {
                continue;
            }
            let actuator = r.actuator.as_str();
            if let Some(n) = self.futile(&target, actuator) {
                passed_over.push(format!("{actuator} failed verification {n} times"));
            } else if controls.rejected.contains(&(inc.id.as_str(), idx)) {
                passed_over.push(format!("{actuator} was rejected by an operator"));
                skipped.push((r.actuator.clone(), HoldReason::ApprovalRejected));
            } else if demotion && controls.demoted.contains(&(inc.kind, actuator)) {
                passed_over.push(format!(
                    "{actuator} is demoted for {} (it verified too rarely; an operator may reset it)",
                    inc.kind
                ));
                skipped.push((r.actuator.clone(), HoldReason::Demoted));
            } else {
                chosen = Some((idx, r));
                break;
            }
        }
        let Some((idx, rung)) = chosen else {
            if passed_over.is_empty() {
                return hold(inc, "", HoldReason::NotConfigured);
            }
            return Decision::NeedsOperator {
                incident_id: inc.id.clone(),
                target: target.clone(),
                reason: format!(
                    "nothing left to try on {target}: {}",
                    passed_over.join(", ")
                ),
            };
        };
        let class = (input.class)(&rung.actuator).unwrap_or(Class::AgentLocal);
        let held = |reason| hold(inc, &rung.actuator, reason);
        if on_server && class != Class::Workload {
            return held(HoldReason::ObserveOnly);
        }
        if self.busy.contains(&target) {
            return held(HoldReason::TargetBusy);
        }
        if self.blind.contains(&inc.key()) {
            return held(HoldReason::Blind);
        }
        // Agent guards protect agents; a workload's pods get their
        // replacement's identity from SPIRE, so they are guarded wherever
        // the symptom was seen.
        let guarded = on_agent || class == Class::Workload;
        if guarded
            && class != Class::Gentle
            && input.policy.guards.hold_disruptive_without_server
            && input.servers_reachable == Some(false)
        {
            return held(HoldReason::NoServerReachable);
        }
        if guarded && matches!(class, Class::AgentLocal | Class::Workload) && input.breaker_open {
            return held(HoldReason::CircuitOpen);
        }
        if class != Class::Gentle
            && inc.kind == crate::model::SymptomKind::AgentSyncStale
            && input.servers_back_since.is_some_and(|t| {
                saturating_since(input.now, t) < input.policy.thresholds.resync_grace
            })
        {
            return held(HoldReason::AwaitingResync);
        }
        if self.in_maintenance(class, &rung.actuator) {
            return held(HoldReason::MaintenanceWindow);
        }
        if let Some(last) = input.last_run.get(&(target.clone(), rung.actuator.clone()))
            && saturating_since(input.now, *last) < input.policy.cooldown(rung)
        {
            return held(HoldReason::Cooldown);
        }
        if input.actions_last_hour + self.planned >= input.policy.guards.budget_per_hour as usize {
            return held(HoldReason::Budget);
        }
        if controls.in_flight.len() + self.planned
            >= input.policy.guards.max_concurrent_actions as usize
        {
            return held(HoldReason::MaxConcurrent);
        }
        if class.is_disruptive()
            && input.policy.guards.blast_radius.enabled
            && self.over_radius(on_agent, &target)
        {
            return held(HoldReason::BlastRadius);
        }
        if controls.paused {
            return held(HoldReason::Paused);
        }
        let mut params = json!({ "subject": inc.subject.to_string() });
        let approval = controls
            .approvals
            .get(&(inc.id.as_str(), idx))
            .filter(|(_, state)| matches!(state, ApprovalState::Pending | ApprovalState::Approved));
        match approval {
            Some((id, ApprovalState::Approved)) => params["approval_id"] = json!(id),
            Some(_) if input.policy.needs_approval(rung, class) => {
                return held(HoldReason::AwaitingApproval);
            }
            _ => {}
        }
        let step = Step {
            action_id: String::new(),
            incident_id: inc.id.clone(),
            symptom: inc.kind,
            rung: idx,
            actuator: rung.actuator.clone(),
            target,
            params,
            timeout: rung.timeout,
            verify_within: rung.verify_within,
            dry_run: input.dry_run,
        };
        if approval.is_none() && input.policy.needs_approval(rung, class) {
            return Decision::AwaitApproval {
                step,
                next_rung: idx + 1,
                skipped,
            };
        }
        self.busy.insert(step.target.clone());
        self.planned += 1;
        if class.is_disruptive() {
            self.disruptive.push(step.target.clone());
        }
        Decision::Act {
            skipped,
            step,
            next_rung: idx + 1,
        }
    }

    /// Whether a maintenance window open now holds `actuator` (of `class`).
    fn in_maintenance(&self, class: Class, actuator: &str) -> bool {
        self.maintenance
            .iter()
            .any(|(w, _)| w.holds(class, actuator))
    }

    /// Whether one more disruptive step on `target` would put too much of
    /// one of its groups under disruptive action: all agents and the agents
    /// behind its server (an agent), or the peers of its name (a peer or
    /// certificate file). Counts in-flight actions whose actuator is
    /// disruptive or no longer configured, and the disruptive steps
    /// planned this tick.
    fn over_radius(&self, on_agent: bool, target: &str) -> bool {
        let input = self.input;
        let c = input.controls;
        let limits = &input.policy.guards.blast_radius;
        let under_action: Vec<&str> = c
            .in_flight
            .iter()
            .filter(|(_, actuator)| (input.class)(actuator).is_none_or(Class::is_disruptive))
            .map(|(t, _)| *t)
            .chain(self.disruptive.iter().map(String::as_str))
            .collect();
        let is_agent = |t: &str| input.agents.contains(t);
        if !on_agent {
            let group = radius_group(&c.peer_groups, target);
            let busy = under_action
                .iter()
                .filter(|t| !is_agent(t) && radius_group(&c.peer_groups, t) == group)
                .count();
            // Counted only when something of the group is under action:
            // the peers are many in a storm, the busy few.
            if busy == 0 {
                return false;
            }
            let size = input
                .peers
                .iter()
                .filter(|p| radius_group(&c.peer_groups, p) == group)
                .count();
            return busy >= limits.per_peer.of(size);
        }
        let busy = under_action.iter().filter(|t| is_agent(t)).count();
        if busy >= limits.agents.of(input.agents.len()) {
            return true;
        }
        let Some(server) = c.agent_server.get(target) else {
            return false;
        };
        let behind = |t: &str| c.agent_server.get(t) == Some(server);
        let size = c.agent_server.values().filter(|s| *s == server).count();
        let busy = under_action.iter().filter(|t| behind(t)).count();
        busy >= limits.per_server.of(size)
    }
}

#[cfg(test)]
mod tests;
