//! Plan: open incidents + history + policy → steps or holds. Pure.
//!
//! For each open incident, most urgent first, the next rung of its ladder is
//! proposed unless a guard holds it back: the target already has an action
//! running or awaiting verification, the observation is blind, the
//! (target, actuator) cooldown has not passed, or the hourly budget is spent.
//! Every hold carries its reason so "held back, because" is recorded.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use serde_json::json;

use crate::clock::saturating_since;
use crate::model::{Incident, Step, Symptom, SymptomKey};
use crate::policy::{Class, Policy};

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
}

impl HoldReason {
    /// Every reason.
    pub const ALL: [HoldReason; 22] = [
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
        }
    }

    /// Whether an incident held for this reason keeps its target's slot:
    /// it is the right step, only not now. A diagnosis with nothing to do
    /// (no ladder, nothing configured or left to try, a target we may not
    /// act on) leaves the slot to the next incident on the target.
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
    /// The step needs a person's yes: the loop asks for one (unless one is
    /// pending) and holds the incident as `awaiting_approval`.
    AwaitApproval {
        step: Step,
        /// Rung to try if this one does not verify.
        next_rung: usize,
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
    /// An operator paused the supervisor: every step holds as `paused`.
    pub paused: bool,
    /// Live approvals by (incident id, rung): the approval id and whether
    /// it is `Pending` or `Approved`.
    pub approvals: HashMap<(&'a str, usize), (&'a str, crate::model::ApprovalState)>,
    /// (incident id, rung) an operator rejected: skipped for that incident.
    pub rejected: HashSet<(&'a str, usize)>,
    /// Demoted (symptom, actuator) steps: skipped until reset.
    pub demoted: HashSet<(crate::model::SymptomKind, &'a str)>,
    /// Actions running or awaiting verification: (target, actuator).
    pub in_flight: Vec<(&'a str, &'a str)>,
    /// The server each configured agent is behind (blast-radius groups);
    /// agents missing here are in no server group.
    pub agent_server: HashMap<&'a str, &'a str>,
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

/// The guards' view while one tick is planned: targets taken and actions
/// planned so far.
struct Planner<'i, 'a> {
    input: &'i PlanInput<'a>,
    blind: HashSet<SymptomKey>,
    busy: HashSet<String>,
    planned: usize,
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
        let ladder = input.policy.ladder(inc.kind);
        if ladder.is_empty() {
            return hold(inc, "", HoldReason::NoLadder);
        }
        if !inc.subject.is_actionable() {
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
        // whose actuator is not configured, or futile on this target.
        let start = inc.next_rung.min(ladder.len() - 1);
        let configured = |r: &&crate::policy::Rung| (input.class)(&r.actuator).is_some();
        let Some((idx, rung)) = ladder
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, r)| configured(r) && self.futile(&target, &r.actuator).is_none())
        else {
            let futile: Vec<String> = ladder
                .iter()
                .skip(start)
                .filter(configured)
                .filter_map(|r| {
                    let n = self.futile(&target, &r.actuator)?;
                    Some(format!("{} failed verification {n} times", r.actuator))
                })
                .collect();
            if futile.is_empty() {
                return hold(inc, "", HoldReason::NotConfigured);
            }
            return Decision::NeedsOperator {
                incident_id: inc.id.clone(),
                target: target.clone(),
                reason: format!("nothing left to try on {target}: {}", futile.join(", ")),
            };
        };
        let class = (input.class)(&rung.actuator).unwrap_or(Class::AgentLocal);
        let held = |reason| hold(inc, &rung.actuator, reason);
        if self.busy.contains(&target) {
            return held(HoldReason::TargetBusy);
        }
        if self.blind.contains(&inc.key()) {
            return held(HoldReason::Blind);
        }
        if on_agent
            && class != Class::Gentle
            && input.policy.guards.hold_disruptive_without_server
            && input.servers_reachable == Some(false)
        {
            return held(HoldReason::NoServerReachable);
        }
        if on_agent && class == Class::AgentLocal && input.breaker_open {
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
        if let Some(last) = input.last_run.get(&(target.clone(), rung.actuator.clone()))
            && saturating_since(input.now, *last) < input.policy.cooldown(rung)
        {
            return held(HoldReason::Cooldown);
        }
        if input.actions_last_hour + self.planned >= input.policy.guards.budget_per_hour as usize {
            return held(HoldReason::Budget);
        }
        self.busy.insert(target.clone());
        self.planned += 1;
        Decision::Act {
            skipped: Vec::new(),
            step: Step {
                action_id: String::new(),
                incident_id: inc.id.clone(),
                symptom: inc.kind,
                rung: idx,
                actuator: rung.actuator.clone(),
                target,
                params: json!({ "subject": inc.subject.to_string() }),
                timeout: rung.timeout,
                verify_within: rung.verify_within,
                dry_run: input.dry_run,
            },
            next_rung: idx + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Severity, Subject, SymptomKind};
    use std::time::{Duration, UNIX_EPOCH};

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn incident(id: &str, kind: SymptomKind, agent: &str, rung: usize) -> Incident {
        Incident {
            id: id.into(),
            kind,
            subject: Subject::agent(agent),
            severity: Severity::Warning,
            opened_at: t(0),
            predicted_outage: Some(t(100)),
            evidence: json!({}),
            next_rung: rung,
            needs_operator: None,
        }
    }

    struct Case {
        incidents: Vec<Incident>,
        blind: bool,
        busy: Vec<&'static str>,
        last_run: Vec<(&'static str, &'static str, u64)>,
        hour: usize,
        configured: &'static [&'static str],
        servers_reachable: Option<bool>,
        breaker_open: bool,
        servers_back_since: Option<SystemTime>,
        /// (target, actuator, failed verifications).
        failures: Vec<(&'static str, &'static str, u32)>,
    }

    impl Default for Case {
        fn default() -> Self {
            Self {
                incidents: vec![incident("i1", SymptomKind::AgentUnreachable, "a", 0)],
                blind: false,
                busy: vec![],
                last_run: vec![],
                hour: 0,
                configured: &["refetch", "restart-agent", "failover"],
                servers_reachable: None,
                breaker_open: false,
                servers_back_since: None,
                failures: vec![],
            }
        }
    }

    fn run(c: &Case, now: u64) -> Vec<Decision> {
        let policy = Policy::builtin().unwrap();
        let symptoms: Vec<Symptom> = c
            .incidents
            .iter()
            .map(|i| Symptom {
                kind: i.kind,
                subject: i.subject.clone(),
                severity: i.severity,
                predicted_outage: i.predicted_outage,
                evidence: json!({}),
                blind: c.blind,
            })
            .collect();
        let busy = c.busy.iter().map(|s| s.to_string()).collect();
        let last_run = c
            .last_run
            .iter()
            .map(|(tg, a, at)| ((tg.to_string(), a.to_string()), t(*at)))
            .collect();
        let failures = c
            .failures
            .iter()
            .map(|(tg, a, n)| ((tg.to_string(), a.to_string()), *n))
            .collect();
        let class = |a: &str| {
            c.configured.contains(&a).then_some(match a {
                "refetch" => Class::Gentle,
                "failover" => Class::Failover,
                _ => Class::AgentLocal,
            })
        };
        plan(&PlanInput {
            symptoms: &symptoms,
            incidents: c.incidents.iter().collect(),
            busy_targets: &busy,
            last_run: &last_run,
            failures: &failures,
            actions_last_hour: c.hour,
            class: &class,
            servers_reachable: c.servers_reachable,
            breaker_open: c.breaker_open,
            servers_back_since: c.servers_back_since,
            peers: &HashSet::from(["web".to_string()]),
            agents: &["a", "b", "c"].map(String::from).into(),
            policy: &policy,
            dry_run: false,
            controls: &PlanControls::default(),
            now: t(now),
        })
    }

    fn summary(d: &[Decision]) -> Vec<String> {
        d.iter()
            .map(|d| match d {
                Decision::Act {
                    step, next_rung, ..
                } => {
                    format!(
                        "act {} {} rung{} next{}",
                        step.target, step.actuator, step.rung, next_rung
                    )
                }
                Decision::Hold { target, reason, .. } => {
                    format!("hold {target} {}", reason.as_str())
                }
                Decision::NeedsOperator { target, reason, .. } => {
                    format!("operator {target}: {reason}")
                }
                Decision::AwaitApproval { step, .. } => {
                    format!(
                        "approval {} {} rung{}",
                        step.target, step.actuator, step.rung
                    )
                }
            })
            .collect()
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, Case, u64, Vec<&str>)> = vec![
            (
                "first rung",
                Case::default(),
                10,
                vec!["act a refetch rung0 next1"],
            ),
            (
                "second rung",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentUnreachable, "a", 1)],
                    ..Case::default()
                },
                10,
                vec!["act a restart-agent rung1 next2"],
            ),
            (
                "past the end repeats the last rung",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentUnreachable, "a", 7)],
                    ..Case::default()
                },
                10,
                vec!["act a restart-agent rung1 next2"],
            ),
            (
                "unconfigured rung is skipped",
                Case {
                    configured: &["restart-agent"],
                    ..Case::default()
                },
                10,
                vec!["act a restart-agent rung1 next2"],
            ),
            (
                "nothing configured",
                Case {
                    incidents: vec![incident("i1", SymptomKind::SvidExpired, "a", 0)],
                    configured: &["refetch"],
                    ..Case::default()
                },
                10,
                vec!["hold a not_configured"],
            ),
            (
                "a burst nothing local explains is only reported",
                Case {
                    incidents: vec![Incident {
                        subject: Subject::handshakes("web", crate::handshake::Reason::UnknownCa),
                        evidence: json!({ "remediable": false }),
                        ..incident("i1", SymptomKind::HandshakeFailureBurst, "web", 0)
                    }],
                    configured: &["refetch", "reload-peer", "restart-peer"],
                    ..Case::default()
                },
                10,
                vec!["hold web no_local_cause"],
            ),
            (
                "a burst after a rotation reloads the peer, servers down or not",
                Case {
                    incidents: vec![Incident {
                        subject: Subject::handshakes("web", crate::handshake::Reason::UnknownCa),
                        evidence: json!({ "remediable": true }),
                        ..incident("i1", SymptomKind::HandshakeFailureBurst, "web", 1)
                    }],
                    configured: &["refetch", "reload-peer", "restart-peer"],
                    servers_reachable: Some(false),
                    breaker_open: true,
                    ..Case::default()
                },
                10,
                vec!["act web reload-peer rung1 next2"],
            ),
            (
                "a peer that is not a configured probe is never acted on",
                Case {
                    incidents: vec![Incident {
                        subject: Subject::handshakes("sshd", crate::handshake::Reason::Expired),
                        evidence: json!({ "remediable": true }),
                        ..incident("i1", SymptomKind::HandshakeFailureBurst, "sshd", 1)
                    }],
                    configured: &["refetch", "reload-peer", "restart-peer"],
                    ..Case::default()
                },
                10,
                vec!["hold sshd unknown_target"],
            ),
            (
                "an agent known only by its SPIFFE ID is never acted on",
                Case {
                    incidents: vec![incident(
                        "i1",
                        SymptomKind::AgentNotRenewing,
                        "spiffe://td/spire/agent/join_token/x",
                        0,
                    )],
                    configured: &["restart-agent", "evict-agent"],
                    ..Case::default()
                },
                10,
                vec!["hold spiffe://td/spire/agent/join_token/x unknown_target"],
            ),
            (
                "a stale served certificate: reload, then restart",
                Case {
                    incidents: vec![Incident {
                        subject: Subject::peer("web"),
                        ..incident("i1", SymptomKind::StaleServedCert, "web", 1)
                    }],
                    configured: &["reload-peer", "restart-peer"],
                    ..Case::default()
                },
                10,
                vec!["act web restart-peer rung1 next2"],
            ),
            (
                "blind",
                Case {
                    blind: true,
                    ..Case::default()
                },
                10,
                vec!["hold a blind"],
            ),
            (
                "busy",
                Case {
                    busy: vec!["a"],
                    ..Case::default()
                },
                10,
                vec!["hold a target_busy"],
            ),
            (
                "cooldown",
                Case {
                    last_run: vec![("a", "refetch", 5)],
                    ..Case::default()
                },
                10,
                vec!["hold a cooldown"],
            ),
            (
                "cooldown passed",
                Case {
                    last_run: vec![("a", "refetch", 5)],
                    ..Case::default()
                },
                30,
                vec!["act a refetch rung0 next1"],
            ),
            (
                "budget",
                Case {
                    hour: 30,
                    ..Case::default()
                },
                10,
                vec!["hold a budget"],
            ),
            (
                "gentle steps run while no server answers",
                Case {
                    servers_reachable: Some(false),
                    ..Case::default()
                },
                10,
                vec!["act a refetch rung0 next1"],
            ),
            (
                "no restart while no server answers",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentUnreachable, "a", 1)],
                    servers_reachable: Some(false),
                    ..Case::default()
                },
                10,
                vec!["hold a no_server_reachable"],
            ),
            (
                "no failover while no server answers",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentSyncStale, "a", 0)],
                    servers_reachable: Some(false),
                    ..Case::default()
                },
                10,
                vec!["hold a no_server_reachable"],
            ),
            (
                "stale agents get their sync backoff after an outage",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentSyncStale, "a", 1)],
                    servers_reachable: Some(true),
                    servers_back_since: Some(t(0)),
                    ..Case::default()
                },
                10,
                vec!["hold a awaiting_resync"],
            ),
            (
                "breaker holds restarts",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentUnreachable, "a", 1)],
                    breaker_open: true,
                    ..Case::default()
                },
                10,
                vec!["hold a circuit_open"],
            ),
            (
                "breaker lets failover through",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentSyncStale, "a", 0)],
                    breaker_open: true,
                    servers_reachable: Some(true),
                    ..Case::default()
                },
                10,
                vec!["act a failover rung0 next1"],
            ),
            (
                "server subjects are observed only",
                Case {
                    incidents: vec![Incident {
                        subject: Subject::server("s1"),
                        ..incident("i1", SymptomKind::BundleDivergence, "x", 0)
                    }],
                    ..Case::default()
                },
                10,
                vec!["hold s1 observe_only"],
            ),
            (
                "one slot per target: of equally specific diagnoses the most urgent acts",
                Case {
                    incidents: vec![
                        incident("i1", SymptomKind::SvidRotationOverdue, "a", 0),
                        Incident {
                            severity: Severity::Critical,
                            ..incident("i2", SymptomKind::SvidExpired, "a", 0)
                        },
                        incident("i3", SymptomKind::AgentUnreachable, "b", 0),
                    ],
                    ..Case::default()
                },
                10,
                vec![
                    "act a restart-agent rung0 next1",
                    "hold a explained",
                    "act b refetch rung0 next1",
                ],
            ),
            (
                "the most specific diagnosis chooses the step, not the most severe",
                Case {
                    incidents: vec![
                        Incident {
                            severity: Severity::Critical,
                            ..incident("i1", SymptomKind::SvidExpired, "a", 0)
                        },
                        Incident {
                            severity: Severity::Critical,
                            ..incident("i2", SymptomKind::AgentUnreachable, "a", 0)
                        },
                        incident("i3", SymptomKind::AgentNotRenewing, "a", 0),
                    ],
                    configured: &["refetch", "restart-agent", "evict-agent"],
                    ..Case::default()
                },
                10,
                vec![
                    "act a restart-agent rung0 next1",
                    "hold a explained",
                    "hold a explained",
                ],
            ),
            (
                "a specific diagnosis held for now keeps the slot",
                Case {
                    incidents: vec![
                        incident("i1", SymptomKind::AgentUnreachable, "a", 0),
                        incident("i2", SymptomKind::AgentNotRenewing, "a", 0),
                    ],
                    configured: &["refetch", "restart-agent", "evict-agent"],
                    last_run: vec![("a", "restart-agent", 5)],
                    ..Case::default()
                },
                10,
                vec!["hold a cooldown", "hold a explained"],
            ),
            (
                "one failed verification is not futility yet",
                Case {
                    incidents: vec![incident("i1", SymptomKind::AgentNotRenewing, "a", 0)],
                    configured: &["restart-agent", "evict-agent"],
                    failures: vec![("a", "restart-agent", 1)],
                    ..Case::default()
                },
                100,
                vec!["act a restart-agent rung0 next1"],
            ),
            (
                "a rung futile on the target is skipped: straight to eviction",
                Case {
                    incidents: vec![
                        incident("i1", SymptomKind::AgentUnreachable, "a", 2),
                        incident("i2", SymptomKind::AgentNotRenewing, "a", 0),
                    ],
                    configured: &["refetch", "restart-agent", "evict-agent"],
                    failures: vec![("a", "restart-agent", 2), ("b", "evict-agent", 9)],
                    ..Case::default()
                },
                100,
                vec!["act a evict-agent rung1 next2", "hold a explained"],
            ),
            (
                "an incident that needs an operator stays so (after a restart too)",
                Case {
                    incidents: vec![Incident {
                        needs_operator: Some("restart-agent failed".into()),
                        ..incident("i1", SymptomKind::AgentUnreachable, "a", 2)
                    }],
                    ..Case::default()
                },
                100,
                vec!["operator a: restart-agent failed"],
            ),
            (
                "nothing left to try: an operator must act, and the slot passes on",
                Case {
                    incidents: vec![
                        incident("i1", SymptomKind::AgentUnreachable, "a", 2),
                        incident("i2", SymptomKind::SvidRotationOverdue, "a", 0),
                    ],
                    failures: vec![("a", "restart-agent", 2)],
                    ..Case::default()
                },
                100,
                vec![
                    "operator a: nothing left to try on a: restart-agent failed verification 2 times",
                    "act a refetch rung0 next1",
                ],
            ),
        ];
        for (name, case, now, want) in cases {
            assert_eq!(summary(&run(&case, now)), want, "{name}");
        }
    }
}
