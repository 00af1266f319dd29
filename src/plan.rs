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
}

impl HoldReason {
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
        }
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
    /// The tick's one reading of the clock.
    pub now: SystemTime,
}

/// Decides what to do for each open incident.
pub fn plan(input: &PlanInput<'_>) -> Vec<Decision> {
    let blind: HashSet<SymptomKey> = input
        .symptoms
        .iter()
        .filter(|s| s.blind)
        .map(Symptom::key)
        .collect();
    let mut order: Vec<&Incident> = input.incidents.clone();
    // Most urgent first: severity, then earliest predicted outage, then age.
    order.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| {
                let ka = a
                    .predicted_outage
                    .unwrap_or(SystemTime::UNIX_EPOCH + std::time::Duration::MAX / 4);
                let kb = b
                    .predicted_outage
                    .unwrap_or(SystemTime::UNIX_EPOCH + std::time::Duration::MAX / 4);
                ka.cmp(&kb)
            })
            .then_with(|| a.opened_at.cmp(&b.opened_at))
            .then_with(|| a.id.cmp(&b.id))
    });

    let mut busy = input.busy_targets.clone();
    let mut planned = 0usize;
    let mut out = Vec::new();
    for inc in order {
        let target = inc.subject.agent_name().to_string();
        let hold = |actuator: &str, reason| Decision::Hold {
            incident_id: inc.id.clone(),
            actuator: actuator.to_string(),
            target: target.clone(),
            reason,
        };
        let ladder = input.policy.ladder(inc.kind);
        if ladder.is_empty() {
            out.push(hold("", HoldReason::NoLadder));
            continue;
        }
        if !inc.subject.is_actionable() {
            out.push(hold("", HoldReason::ObserveOnly));
            continue;
        }
        if let crate::model::Subject::Peer { peer } | crate::model::Subject::Handshakes { peer, .. } =
            &inc.subject
            && !input.peers.contains(peer)
        {
            out.push(hold("", HoldReason::UnknownTarget));
            continue;
        }
        if inc.subject.is_agent_level() && !input.agents.contains(&target) {
            out.push(hold("", HoldReason::UnknownTarget));
            continue;
        }
        if inc.kind == crate::model::SymptomKind::HandshakeFailureBurst
            && !inc.evidence["remediable"].as_bool().unwrap_or(false)
        {
            out.push(hold("", HoldReason::NoLocalCause));
            continue;
        }
        // The agent guards protect SPIRE agents; a peer or file is reloaded
        // from what is already on disk or in the agent's cache.
        let on_agent = inc.subject.is_agent_level();
        // Past the end, repeat the last rung. Skip rungs whose actuator is
        // not configured.
        let start = inc.next_rung.min(ladder.len() - 1);
        let Some((idx, rung)) = ladder
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, r)| (input.class)(&r.actuator).is_some())
        else {
            out.push(hold("", HoldReason::NotConfigured));
            continue;
        };
        let class = (input.class)(&rung.actuator).unwrap_or(Class::AgentLocal);
        if busy.contains(&target) {
            out.push(hold(&rung.actuator, HoldReason::TargetBusy));
            continue;
        }
        if blind.contains(&inc.key()) {
            out.push(hold(&rung.actuator, HoldReason::Blind));
            continue;
        }
        if on_agent
            && class != Class::Gentle
            && input.policy.guards.hold_disruptive_without_server
            && input.servers_reachable == Some(false)
        {
            out.push(hold(&rung.actuator, HoldReason::NoServerReachable));
            continue;
        }
        if on_agent && class == Class::AgentLocal && input.breaker_open {
            out.push(hold(&rung.actuator, HoldReason::CircuitOpen));
            continue;
        }
        if class != Class::Gentle
            && inc.kind == crate::model::SymptomKind::AgentSyncStale
            && input.servers_back_since.is_some_and(|t| {
                saturating_since(input.now, t) < input.policy.thresholds.resync_grace
            })
        {
            out.push(hold(&rung.actuator, HoldReason::AwaitingResync));
            continue;
        }
        if let Some(last) = input.last_run.get(&(target.clone(), rung.actuator.clone()))
            && saturating_since(input.now, *last) < input.policy.cooldown(rung)
        {
            out.push(hold(&rung.actuator, HoldReason::Cooldown));
            continue;
        }
        if input.actions_last_hour + planned >= input.policy.guards.budget_per_hour as usize {
            out.push(hold(&rung.actuator, HoldReason::Budget));
            continue;
        }
        busy.insert(target.clone());
        planned += 1;
        out.push(Decision::Act {
            step: Step {
                action_id: String::new(),
                incident_id: inc.id.clone(),
                symptom: inc.kind,
                rung: idx,
                actuator: rung.actuator.clone(),
                target: target.clone(),
                params: json!({ "subject": inc.subject.to_string() }),
                timeout: rung.timeout,
                verify_within: rung.verify_within,
                dry_run: input.dry_run,
            },
            next_rung: idx + 1,
        });
    }
    out
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
            actions_last_hour: c.hour,
            class: &class,
            servers_reachable: c.servers_reachable,
            breaker_open: c.breaker_open,
            servers_back_since: c.servers_back_since,
            peers: &HashSet::from(["web".to_string()]),
            agents: &["a", "b", "c"].map(String::from).into(),
            policy: &policy,
            dry_run: false,
            now: t(now),
        })
    }

    fn summary(d: &[Decision]) -> Vec<String> {
        d.iter()
            .map(|d| match d {
                Decision::Act { step, next_rung } => {
                    format!(
                        "act {} {} rung{} next{}",
                        step.target, step.actuator, step.rung, next_rung
                    )
                }
                Decision::Hold { target, reason, .. } => {
                    format!("hold {target} {}", reason.as_str())
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
                "one action per target per tick, most urgent first",
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
                    "hold a target_busy",
                    "act b refetch rung0 next1",
                ],
            ),
        ];
        for (name, case, now, want) in cases {
            assert_eq!(summary(&run(&case, now)), want, "{name}");
        }
    }
}
