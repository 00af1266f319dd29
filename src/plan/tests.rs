use super::*;
use crate::model::{ApprovalState, Severity, Subject, SymptomKind};
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
    /// Configured agents and peers.
    agents: &'static [&'static str],
    peers: &'static [&'static str],
    /// Changes to the built-in policy.
    policy: fn(&mut Policy),
    paused: bool,
    /// (incident, rung, approval id, state).
    approvals: Vec<(&'static str, usize, &'static str, ApprovalState)>,
    /// (incident, rung).
    rejected: Vec<(&'static str, usize)>,
    demoted: Vec<(SymptomKind, &'static str)>,
    /// (target, actuator).
    in_flight: Vec<(&'static str, &'static str)>,
    /// (agent, server).
    agent_server: Vec<(&'static str, &'static str)>,
    /// (peer, blast-radius group).
    peer_groups: Vec<(&'static str, &'static str)>,
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
            agents: &["a", "b", "c"],
            peers: &["web"],
            policy: |_| {},
            paused: false,
            approvals: vec![],
            rejected: vec![],
            demoted: vec![],
            in_flight: vec![],
            agent_server: vec![],
            peer_groups: vec![],
        }
    }
}

fn run(c: &Case, now: u64) -> Vec<Decision> {
    let mut policy = Policy::builtin().unwrap();
    (c.policy)(&mut policy);
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
            "refetch" | "reload-peer" => Class::Gentle,
            "failover" => Class::Failover,
            "evict-pod" => Class::Workload,
            _ => Class::AgentLocal,
        })
    };
    let controls = PlanControls {
        paused: c.paused,
        approvals: c
            .approvals
            .iter()
            .map(|(inc, rung, id, state)| ((*inc, *rung), (*id, *state)))
            .collect(),
        rejected: c.rejected.iter().copied().collect(),
        demoted: c.demoted.iter().copied().collect(),
        in_flight: c.in_flight.clone(),
        agent_server: c.agent_server.iter().copied().collect(),
        peer_groups: c.peer_groups.iter().copied().collect(),
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
        peers: &c.peers.iter().map(|p| p.to_string()).collect(),
        agents: &c.agents.iter().map(|a| a.to_string()).collect(),
        policy: &policy,
        dry_run: false,
        controls: &controls,
        now: t(now),
    })
}

/// ` skipped[actuator:reason,…]` when rungs were passed over.
fn skipped_list(skipped: &[(String, HoldReason)]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let items: Vec<String> = skipped
        .iter()
        .map(|(a, r)| format!("{a}:{}", r.as_str()))
        .collect();
    format!(" skipped[{}]", items.join(","))
}

fn summary(d: &[Decision]) -> Vec<String> {
    d.iter()
        .map(|d| match d {
            Decision::Act {
                step,
                next_rung,
                skipped,
            } => {
                let approval = step.params["approval_id"]
                    .as_str()
                    .map(|id| format!(" approval={id}"))
                    .unwrap_or_default();
                format!(
                    "act {} {} rung{} next{}{approval}{}",
                    step.target,
                    step.actuator,
                    step.rung,
                    next_rung,
                    skipped_list(skipped)
                )
            }
            Decision::Hold { target, reason, .. } => {
                format!("hold {target} {}", reason.as_str())
            }
            Decision::NeedsOperator { target, reason, .. } => {
                format!("operator {target}: {reason}")
            }
            Decision::AwaitApproval {
                step,
                next_rung,
                skipped,
            } => {
                format!(
                    "approval {} {} rung{} next{}{}",
                    step.target,
                    step.actuator,
                    step.rung,
                    next_rung,
                    skipped_list(skipped)
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
            "a node instance leaves a stale sync to the cluster instance, which explains the stream loss",
            Case {
                incidents: vec![
                    incident("i1", SymptomKind::AgentSyncStale, "a", 0),
                    incident("i2", SymptomKind::AgentUnreachable, "a", 0),
                ],
                configured: &["refetch", "restart-agent"],
                policy: |p| p.left_to_cluster = crate::leadership::CLUSTER_SYMPTOMS.to_vec(),
                ..Case::default()
            },
            10,
            vec!["hold a left_to_cluster", "hold a explained"],
        ),
        (
            "the cluster instance acts on a stale sync",
            Case {
                incidents: vec![
                    incident("i1", SymptomKind::AgentSyncStale, "a", 0),
                    incident("i2", SymptomKind::AgentUnreachable, "a", 0),
                ],
                ..Case::default()
            },
            10,
            vec!["act a failover rung0 next1", "hold a explained"],
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

// === Operator controls and group guards ===

fn approve_agent_local(p: &mut Policy) {
    p.guards.approval.classes = vec![Class::AgentLocal];
}

/// Two incidents on `a`: not renewing (restart-agent, evict-agent) is
/// the more specific, unreachable is explained by it.
fn not_renewing(rung: usize) -> Vec<Incident> {
    vec![
        incident("i1", SymptomKind::AgentNotRenewing, "a", rung),
        incident("i2", SymptomKind::AgentUnreachable, "a", 0),
    ]
}

const ALL_AGENT_ACTUATORS: &[&str] = &["refetch", "restart-agent", "evict-agent", "failover"];

fn unreachable(id: &str, agent: &str) -> Incident {
    incident(id, SymptomKind::AgentUnreachable, agent, 1)
}

#[test]
fn controls_table() {
    let cases: Vec<(&str, Case, u64, Vec<&str>)> = vec![
        // --- Approval ---
        (
            "a class that needs approval asks for it",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: approve_agent_local,
                ..Case::default()
            },
            10,
            vec!["approval a restart-agent rung1 next2"],
        ),
        (
            "other classes do not",
            Case {
                policy: approve_agent_local,
                ..Case::default()
            },
            10,
            vec!["act a refetch rung0 next1"],
        ),
        (
            "a rung can require approval",
            Case {
                policy: |p| {
                    p.ladders.get_mut("agent_unreachable").unwrap()[0].approval =
                        Some(crate::policy::ApprovalMode::Required);
                },
                ..Case::default()
            },
            10,
            vec!["approval a refetch rung0 next1"],
        ),
        (
            "a rung's approval = none overrides its class",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: |p| {
                    approve_agent_local(p);
                    p.ladders.get_mut("agent_unreachable").unwrap()[1].approval =
                        Some(crate::policy::ApprovalMode::NotRequired);
                },
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2"],
        ),
        (
            "a pending approval holds and keeps the slot",
            Case {
                incidents: not_renewing(0),
                configured: ALL_AGENT_ACTUATORS,
                policy: approve_agent_local,
                approvals: vec![("i1", 0, "ap1", ApprovalState::Pending)],
                ..Case::default()
            },
            10,
            vec!["hold a awaiting_approval", "hold a explained"],
        ),
        (
            "an approval for another rung is not this rung's",
            Case {
                incidents: not_renewing(1),
                configured: ALL_AGENT_ACTUATORS,
                policy: approve_agent_local,
                approvals: vec![("i1", 0, "ap1", ApprovalState::Approved)],
                ..Case::default()
            },
            10,
            vec!["approval a evict-agent rung1 next2", "hold a explained"],
        ),
        (
            "an approved step acts and carries its approval",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: approve_agent_local,
                approvals: vec![("i1", 1, "ap1", ApprovalState::Approved)],
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2 approval=ap1"],
        ),
        (
            "a final approval state is no approval",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: approve_agent_local,
                approvals: vec![("i1", 1, "ap1", ApprovalState::Expired)],
                ..Case::default()
            },
            10,
            vec!["approval a restart-agent rung1 next2"],
        ),
        (
            "approved but in cooldown: approval is consent, not a bypass",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: approve_agent_local,
                approvals: vec![("i1", 1, "ap1", ApprovalState::Approved)],
                last_run: vec![("a", "restart-agent", 5)],
                ..Case::default()
            },
            10,
            vec!["hold a cooldown"],
        ),
        (
            "approved but over the blast radius",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: approve_agent_local,
                approvals: vec![("i1", 1, "ap1", ApprovalState::Approved)],
                in_flight: vec![("b", "restart-agent")],
                ..Case::default()
            },
            10,
            vec!["hold a blast_radius"],
        ),
        (
            "no approval is asked for while a guard holds the step",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: approve_agent_local,
                hour: 30,
                ..Case::default()
            },
            10,
            vec!["hold a budget"],
        ),
        (
            "a rejected rung is skipped: the ladder moves on",
            Case {
                incidents: not_renewing(0),
                configured: ALL_AGENT_ACTUATORS,
                rejected: vec![("i1", 0)],
                ..Case::default()
            },
            10,
            vec![
                "act a evict-agent rung1 next2 skipped[restart-agent:approval_rejected]",
                "hold a explained",
            ],
        ),
        (
            "a rejection is for its incident only",
            Case {
                incidents: not_renewing(0),
                configured: ALL_AGENT_ACTUATORS,
                rejected: vec![("i2", 0)],
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung0 next1", "hold a explained"],
        ),
        (
            "rejected, the next rung asks for its own approval",
            Case {
                incidents: not_renewing(0),
                configured: ALL_AGENT_ACTUATORS,
                policy: approve_agent_local,
                rejected: vec![("i1", 0)],
                ..Case::default()
            },
            10,
            vec![
                "approval a evict-agent rung1 next2 skipped[restart-agent:approval_rejected]",
                "hold a explained",
            ],
        ),
        (
            "the last rung rejected: an operator must act, the slot passes on",
            Case {
                incidents: vec![
                    unreachable("i1", "a"),
                    incident("i2", SymptomKind::SvidRotationOverdue, "a", 0),
                ],
                rejected: vec![("i1", 1)],
                ..Case::default()
            },
            10,
            vec![
                "operator a: nothing left to try on a: restart-agent was rejected by an operator",
                "act a refetch rung0 next1",
            ],
        ),
        // --- Pause ---
        (
            "paused holds a gentle step",
            Case {
                paused: true,
                ..Case::default()
            },
            10,
            vec!["hold a paused"],
        ),
        (
            "paused holds an approved step, keeping the slot",
            Case {
                incidents: not_renewing(0),
                configured: ALL_AGENT_ACTUATORS,
                policy: approve_agent_local,
                approvals: vec![("i1", 0, "ap1", ApprovalState::Approved)],
                paused: true,
                ..Case::default()
            },
            10,
            vec!["hold a paused", "hold a explained"],
        ),
        (
            "paused asks for no approval",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: approve_agent_local,
                paused: true,
                ..Case::default()
            },
            10,
            vec!["hold a paused"],
        ),
        (
            "paused leaves other holds as they are",
            Case {
                incidents: vec![
                    unreachable("i1", "a"),
                    incident("i2", SymptomKind::AgentUnreachable, "b", 0),
                ],
                last_run: vec![("a", "restart-agent", 5)],
                paused: true,
                ..Case::default()
            },
            10,
            vec!["hold a cooldown", "hold b paused"],
        ),
        // --- Demotion ---
        (
            "a demoted rung is skipped: the ladder moves on",
            Case {
                incidents: not_renewing(0),
                configured: ALL_AGENT_ACTUATORS,
                demoted: vec![(SymptomKind::AgentNotRenewing, "restart-agent")],
                ..Case::default()
            },
            10,
            vec![
                "act a evict-agent rung1 next2 skipped[restart-agent:demoted]",
                "hold a explained",
            ],
        ),
        (
            "a demotion is for its symptom only",
            Case {
                incidents: vec![unreachable("i1", "a")],
                demoted: vec![(SymptomKind::AgentNotRenewing, "restart-agent")],
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2"],
        ),
        (
            "the last rung demoted: an operator must act",
            Case {
                incidents: vec![unreachable("i1", "a")],
                demoted: vec![(SymptomKind::AgentUnreachable, "restart-agent")],
                ..Case::default()
            },
            10,
            vec![
                "operator a: nothing left to try on a: restart-agent is demoted for agent_unreachable (it verified too rarely; an operator may reset it)",
            ],
        ),
        (
            "demotion off: demoted steps run",
            Case {
                incidents: vec![unreachable("i1", "a")],
                demoted: vec![(SymptomKind::AgentUnreachable, "restart-agent")],
                policy: |p| p.guards.demotion.enabled = false,
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2"],
        ),
        (
            "demoted and rejected rungs are both reported",
            Case {
                incidents: vec![incident("i1", SymptomKind::SvidRotationOverdue, "a", 0)],
                configured: &["refetch", "entry-bump", "restart-agent"],
                demoted: vec![(SymptomKind::SvidRotationOverdue, "refetch")],
                rejected: vec![("i1", 1)],
                ..Case::default()
            },
            10,
            vec![
                "act a restart-agent rung2 next3 skipped[refetch:demoted,entry-bump:approval_rejected]",
            ],
        ),
        // --- Max concurrent ---
        (
            "max concurrent counts in-flight actions, gentle ones too",
            Case {
                in_flight: vec![
                    ("b", "refetch"),
                    ("c", "refetch"),
                    ("web", "reload-peer"),
                    ("d", "refetch"),
                ],
                ..Case::default()
            },
            10,
            vec!["hold a max_concurrent"],
        ),
        (
            "max concurrent counts steps planned this tick",
            Case {
                incidents: vec![
                    incident("i1", SymptomKind::AgentUnreachable, "a", 0),
                    incident("i2", SymptomKind::AgentUnreachable, "b", 0),
                ],
                in_flight: vec![("c", "refetch"), ("d", "refetch"), ("e", "refetch")],
                ..Case::default()
            },
            10,
            vec!["act a refetch rung0 next1", "hold b max_concurrent"],
        ),
        // --- Blast radius ---
        (
            "25% of 3 agents rounds down to 0 but allows 1: one in flight holds",
            Case {
                incidents: vec![unreachable("i1", "a")],
                in_flight: vec![("b", "restart-agent")],
                ..Case::default()
            },
            10,
            vec!["hold a blast_radius"],
        ),
        (
            "25% of 3 agents allows 1",
            Case {
                incidents: vec![unreachable("i1", "a"), unreachable("i2", "b")],
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2", "hold b blast_radius"],
        ),
        (
            "25% of 8 agents allows 2, counting in-flight and planned",
            Case {
                incidents: vec![unreachable("i1", "a"), unreachable("i2", "c")],
                agents: &["a", "b", "c", "d", "e", "f", "g", "h"],
                in_flight: vec![("b", "restart-agent")],
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2", "hold c blast_radius"],
        ),
        (
            "gentle steps are outside the blast radius",
            Case {
                in_flight: vec![("b", "restart-agent")],
                ..Case::default()
            },
            10,
            vec!["act a refetch rung0 next1"],
        ),
        (
            "gentle in-flight actions do not count",
            Case {
                incidents: vec![unreachable("i1", "a")],
                in_flight: vec![("b", "refetch")],
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2"],
        ),
        (
            "an in-flight actuator no longer configured counts as disruptive",
            Case {
                incidents: vec![unreachable("i1", "a")],
                in_flight: vec![("b", "old-restart")],
                ..Case::default()
            },
            10,
            vec!["hold a blast_radius"],
        ),
        (
            "50% of the agents behind one server",
            Case {
                incidents: vec![unreachable("i1", "a"), unreachable("i2", "c")],
                agents: &["a", "b", "c", "d", "e", "f", "g", "h"],
                agent_server: vec![
                    ("a", "s1"),
                    ("b", "s1"),
                    ("c", "s2"),
                    ("d", "s2"),
                    ("e", "s2"),
                ],
                in_flight: vec![("b", "failover")],
                ..Case::default()
            },
            10,
            vec!["hold a blast_radius", "act c restart-agent rung1 next2"],
        ),
        (
            "one peer instance of a name at a time",
            Case {
                incidents: vec![
                    Incident {
                        subject: Subject::peer("web/b"),
                        ..incident("i1", SymptomKind::StaleServedCert, "web/b", 1)
                    },
                    Incident {
                        subject: Subject::peer("api"),
                        ..incident("i2", SymptomKind::StaleServedCert, "api", 1)
                    },
                ],
                configured: &["reload-peer", "restart-peer"],
                peers: &["web/a", "web/b", "api"],
                in_flight: vec![("web/a", "restart-peer"), ("a", "restart-agent")],
                ..Case::default()
            },
            10,
            vec![
                "hold web/b blast_radius",
                "act api restart-peer rung1 next2",
            ],
        ),
        (
            "per_peer as a percentage of the name's instances",
            Case {
                incidents: vec![Incident {
                    subject: Subject::peer("web/b"),
                    ..incident("i1", SymptomKind::StaleServedCert, "web/b", 1)
                }],
                configured: &["reload-peer", "restart-peer"],
                peers: &["web/a", "web/b", "web/c", "web/d"],
                in_flight: vec![("web/a", "restart-peer")],
                policy: |p| p.guards.blast_radius.per_peer = crate::policy::Limit::Percent(50.0),
                ..Case::default()
            },
            10,
            vec!["act web/b restart-peer rung1 next2"],
        ),
        (
            "blast radius off",
            Case {
                incidents: vec![unreachable("i1", "a")],
                in_flight: vec![("b", "restart-agent")],
                policy: |p| p.guards.blast_radius.enabled = false,
                ..Case::default()
            },
            10,
            vec!["act a restart-agent rung1 next2"],
        ),
        // --- Maintenance windows ---
        (
            "a window holds its classes and keeps the slot",
            Case {
                incidents: vec![
                    unreachable("i1", "a"),
                    incident("i2", SymptomKind::SvidRotationOverdue, "a", 0),
                ],
                policy: nightly_agent_local,
                ..Case::default()
            },
            10,
            vec!["hold a maintenance_window", "hold a explained"],
        ),
        (
            "a window lets other classes through",
            Case {
                policy: nightly_agent_local,
                ..Case::default()
            },
            10,
            vec!["act a refetch rung0 next1"],
        ),
        (
            "a window closes at its end",
            Case {
                incidents: vec![unreachable("i1", "a")],
                policy: nightly_agent_local,
                ..Case::default()
            },
            100,
            vec!["act a restart-agent rung1 next2"],
        ),
        (
            "a window can name actuators",
            Case {
                incidents: vec![incident("i1", SymptomKind::AgentSyncStale, "a", 0)],
                policy: |p| {
                    p.maintenance.push(
                        toml::from_str(
                            "actuators = [\"failover\"]\n\
                             start = \"2023-11-14T22:13:20Z\"\n\
                             end = \"2023-11-15T00:13:20+01:00\"",
                        )
                        .unwrap(),
                    );
                },
                ..Case::default()
            },
            10,
            vec!["hold a maintenance_window"],
        ),
    ];
    for (name, case, now, want) in cases {
        assert_eq!(summary(&run(&case, now)), want, "{name}");
    }
}

/// t(0) is 2023-11-14T22:13:20Z: a daily window from 22:13 to 22:15
/// holds agent-local steps at t(10), not at t(100).
fn nightly_agent_local(p: &mut Policy) {
    p.maintenance.push(
        toml::from_str("classes = [\"agent_local\"]\ncron = \"13 22 * * *\"\nduration = \"2m\"")
            .unwrap(),
    );
}

#[test]
fn peer_groups() {
    assert_eq!(peer_group("web"), "web");
    assert_eq!(peer_group("web/a"), "web");
    assert_eq!(peer_group("envoy-1/listener/x"), "envoy-1");
}

/// A certificate file whose ladder evicts its workload's pods.
fn evict_pods(p: &mut Policy) {
    p.ladders.insert(
        "stale_cert_file".into(),
        vec![
            toml::from_str("actuator = \"evict-pod\"\ntimeout = \"60s\"\nverify_within = \"30s\"")
                .unwrap(),
        ],
    );
}

fn stale_file(id: &str, file: &str) -> Incident {
    Incident {
        subject: Subject::cert_file(file),
        ..incident(id, SymptomKind::StaleCertFile, file, 0)
    }
}

#[test]
fn workload_class_guards() {
    let base = || Case {
        incidents: vec![stale_file("i1", "web/a")],
        configured: &["evict-pod"],
        peers: &["web/a", "web/b"],
        servers_reachable: Some(true),
        policy: evict_pods,
        ..Case::default()
    };
    let cases: Vec<(&str, Case, Vec<&str>)> = vec![
        ("acts", base(), vec!["act web/a evict-pod rung0 next1"]),
        (
            "a workload's pods are not replaced while no server answers, whatever the subject",
            Case {
                servers_reachable: Some(false),
                ..base()
            },
            vec!["hold web/a no_server_reachable"],
        ),
        (
            "nor while the breaker is open",
            Case {
                breaker_open: true,
                ..base()
            },
            vec!["hold web/a circuit_open"],
        ),
        (
            "the guard can be turned off like the agents'",
            Case {
                servers_reachable: Some(false),
                policy: |p| {
                    evict_pods(p);
                    p.guards.hold_disruptive_without_server = false;
                },
                ..base()
            },
            vec!["act web/a evict-pod rung0 next1"],
        ),
        (
            "disruptive: one peer of a name at a time (blast radius)",
            Case {
                in_flight: vec![("web/b", "evict-pod")],
                ..base()
            },
            vec!["hold web/a blast_radius"],
        ),
        (
            "files of one workload's pods are one group, whatever their names",
            Case {
                incidents: vec![
                    stale_file("i1", "d00-f000"),
                    stale_file("i2", "d00-f001"),
                    stale_file("i3", "d01-f000"),
                ],
                peers: &["d00-f000", "d00-f001", "d01-f000"],
                peer_groups: vec![
                    ("d00-f000", "k8s:apps/app=d00"),
                    ("d00-f001", "k8s:apps/app=d00"),
                    ("d01-f000", "k8s:apps/app=d01"),
                ],
                ..base()
            },
            vec![
                "act d00-f000 evict-pod rung0 next1",
                "hold d00-f001 blast_radius",
                "act d01-f000 evict-pod rung0 next1",
            ],
        ),
        (
            "without groups, each file is its own group",
            Case {
                incidents: vec![stale_file("i1", "d00-f000"), stale_file("i2", "d00-f001")],
                peers: &["d00-f000", "d00-f001"],
                ..base()
            },
            vec![
                "act d00-f000 evict-pod rung0 next1",
                "act d00-f001 evict-pod rung0 next1",
            ],
        ),
        (
            "approval by class",
            Case {
                policy: |p| {
                    evict_pods(p);
                    p.guards.approval.classes = vec![Class::Workload];
                },
                ..base()
            },
            vec!["approval web/a evict-pod rung0 next1"],
        ),
        (
            "maintenance by class",
            Case {
                policy: |p| {
                    evict_pods(p);
                    p.maintenance.push(
                        toml::from_str(
                            "classes = [\"workload\"]\ncron = \"13 22 * * *\"\nduration = \"2m\"",
                        )
                        .unwrap(),
                    );
                },
                ..base()
            },
            vec!["hold web/a maintenance_window"],
        ),
    ];
    for (name, case, want) in cases {
        assert_eq!(summary(&run(&case, 10)), want, "{name}");
    }
    assert_eq!(Class::Workload.as_str(), "workload");
    assert!(Class::Workload.is_disruptive());
}

/// An unhealthy server whose ladder evicts its pod (the opt-in ladder).
fn evict_server_pod(p: &mut Policy) {
    p.ladders.insert(
        "server_unhealthy".into(),
        vec![
            toml::from_str("actuator = \"evict-pod\"\ntimeout = \"90s\"\nverify_within = \"60s\"")
                .unwrap(),
        ],
    );
}

fn server_unhealthy(id: &str, server: &str) -> Incident {
    Incident {
        subject: Subject::server(server),
        ..incident(id, SymptomKind::ServerUnhealthy, server, 0)
    }
}

#[test]
fn server_pod_guards() {
    let base = || Case {
        incidents: vec![server_unhealthy("i1", "server-a")],
        configured: &["evict-pod", "restart-agent"],
        servers_reachable: Some(true),
        policy: evict_server_pod,
        ..Case::default()
    };
    let cases: Vec<(&str, Case, Vec<&str>)> = vec![
        (
            "the cluster instance evicts the server's pod",
            base(),
            vec!["act server-a evict-pod rung0 next1"],
        ),
        (
            "the default policy only observes an unhealthy server",
            Case {
                policy: |_| {},
                ..base()
            },
            vec!["hold server-a no_ladder"],
        ),
        (
            "never while no server answers",
            Case {
                servers_reachable: Some(false),
                ..base()
            },
            vec!["hold server-a no_server_reachable"],
        ),
        (
            "nor while the breaker is open",
            Case {
                breaker_open: true,
                ..base()
            },
            vec!["hold server-a circuit_open"],
        ),
        (
            "a node instance leaves servers to the cluster instance",
            Case {
                policy: |p| {
                    evict_server_pod(p);
                    p.left_to_cluster = crate::leadership::CLUSTER_SYMPTOMS.to_vec();
                },
                ..base()
            },
            vec!["hold server-a left_to_cluster"],
        ),
        (
            "a server is acted on through its pod only: any other rung observes",
            Case {
                policy: |p| {
                    p.ladders.insert(
                        "server_unhealthy".into(),
                        vec![
                            toml::from_str(
                                "actuator = \"restart-agent\"\ntimeout = \"9s\"\nverify_within = \"9s\"",
                            )
                            .unwrap(),
                        ],
                    );
                },
                ..base()
            },
            vec!["hold server-a observe_only"],
        ),
        (
            "the cluster subject stays observed only",
            Case {
                incidents: vec![Incident {
                    subject: Subject::Cluster {
                        trust_domain: "td".into(),
                    },
                    ..incident("i1", SymptomKind::ServerUnhealthy, "td", 0)
                }],
                ..base()
            },
            vec!["hold td observe_only"],
        ),
    ];
    for (name, case, want) in cases {
        assert_eq!(summary(&run(&case, 10)), want, "{name}");
    }
}

#[test]
fn an_agent_pod_is_replaced_under_the_agent_guards() {
    let base = || Case {
        incidents: vec![incident("i1", SymptomKind::AgentUnreachable, "a", 0)],
        configured: &["evict-pod"],
        servers_reachable: Some(true),
        policy: |p| {
            p.ladders.insert(
                "agent_unreachable".into(),
                vec![
                    toml::from_str(
                        "actuator = \"evict-pod\"\ntimeout = \"60s\"\nverify_within = \"30s\"",
                    )
                    .unwrap(),
                ],
            );
        },
        ..Case::default()
    };
    let cases: Vec<(&str, Case, Vec<&str>)> = vec![
        ("acts", base(), vec!["act a evict-pod rung0 next1"]),
        (
            "never while no server answers",
            Case {
                servers_reachable: Some(false),
                ..base()
            },
            vec!["hold a no_server_reachable"],
        ),
        (
            "nor while the breaker is open",
            Case {
                breaker_open: true,
                ..base()
            },
            vec!["hold a circuit_open"],
        ),
    ];
    for (name, case, want) in cases {
        assert_eq!(summary(&run(&case, 10)), want, "{name}");
    }
}
