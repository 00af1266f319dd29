//! What the do-no-harm guards remember between ticks: the ledger behind
//! cooldowns and the hourly budget, and whether the servers answer (and
//! since when they are back after a total outage). The circuit breaker is a
//! pure function of the open incidents.
//!
//! The ledger is rebuilt from the store at start, so a restart does not
//! reset a cooldown or the budget.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::{from_unix_millis, saturating_since};
use crate::knowledge::ActionRecord;
use crate::model::{Incident, ServerView, Step};
use crate::policy::Guards as GuardPolicy;

const HOUR: Duration = Duration::from_secs(3600);

/// Cooldown and budget ledger plus server reachability.
#[derive(Debug, Default)]
pub(super) struct Guards {
    /// Last start per (target, actuator): cooldowns.
    last_run: HashMap<(String, String), SystemTime>,
    /// Starts of real (not dry-run) actions, oldest first: the budget.
    recent_starts: VecDeque<SystemTime>,
    /// Whether any watched server answered at the last complete poll.
    servers_reachable: Option<bool>,
    /// When the servers came back after every one was down.
    servers_back_since: Option<SystemTime>,
    /// Failed verifications per (target, actuator) while the target has
    /// open incidents: futility. Forgotten once the target is healthy.
    failures: HashMap<(String, String), u32>,
}

impl Guards {
    /// The ledger as the store remembers it: failed verifications count
    /// towards futility when their incident is still open. An action whose
    /// verdict was never recorded (the process stopped while it was being
    /// verified) is verified again by the executor, which books a failure
    /// then.
    pub(super) fn resume(recent_actions: &[ActionRecord], open: &[Incident]) -> Self {
        let mut g = Self::default();
        let open: HashSet<&str> = open.iter().map(|i| i.id.as_str()).collect();
        for a in recent_actions {
            if a.verification.as_deref() == Some("failed") && open.contains(a.incident_id.as_str())
            {
                g.failed(&a.target, &a.actuator);
            }
            let at = from_unix_millis(a.started_at_ms);
            let key = (a.target.clone(), a.actuator.clone());
            if g.last_run.get(&key).is_none_or(|t| *t < at) {
                g.last_run.insert(key, at);
            }
            // A step held at execute time did nothing: no charge.
            if !a.dry_run && a.outcome.as_deref() != Some("held") {
                g.recent_starts.push_back(at);
            }
        }
        g.recent_starts.make_contiguous().sort();
        g
    }

    pub(super) fn last_run(&self) -> &HashMap<(String, String), SystemTime> {
        &self.last_run
    }

    /// Failed verifications per (target, actuator).
    pub(super) fn failures(&self) -> &HashMap<(String, String), u32> {
        &self.failures
    }

    /// Books a failed verification of `actuator` on `target`.
    pub(super) fn failed(&mut self, target: &str, actuator: &str) {
        *self
            .failures
            .entry((target.to_string(), actuator.to_string()))
            .or_default() += 1;
    }

    /// Forgets the failures of targets with no open incident: a later
    /// episode starts with every rung worth trying again.
    pub(super) fn settle(&mut self, has_open: impl Fn(&str) -> bool) {
        self.failures.retain(|(target, _), _| has_open(target));
    }

    /// Real actions started within the hour before `now` (older ones are
    /// forgotten).
    pub(super) fn actions_last_hour(&mut self, now: SystemTime) -> usize {
        while self
            .recent_starts
            .front()
            .is_some_and(|t| saturating_since(now, *t) >= HOUR)
        {
            self.recent_starts.pop_front();
        }
        self.recent_starts.len()
    }

    /// Books a started step against its cooldown and the budget.
    pub(super) fn started(&mut self, step: &Step, now: SystemTime) {
        self.last_run
            .insert((step.target.clone(), step.actuator.clone()), now);
        if !step.dry_run {
            self.recent_starts.push_back(now);
        }
    }

    /// Takes back the budget a step started at `started` was charged: it
    /// was held at execute time and did nothing. Its cooldown stays.
    pub(super) fn released(&mut self, started: SystemTime) {
        if let Some(i) = self.recent_starts.iter().position(|t| *t == started) {
            self.recent_starts.remove(i);
        }
    }

    /// Notes what the server sensors report. Returns whether any server
    /// answers: `None` until every watched server has been polled once (or
    /// when none is watched).
    pub(super) fn note_servers(
        &mut self,
        servers: &[Arc<ServerView>],
        now: SystemTime,
    ) -> Option<bool> {
        let polled = servers
            .iter()
            .filter(|s| s.reachable || s.last_error.is_some())
            .count();
        let reachable = (!servers.is_empty() && polled == servers.len())
            .then(|| servers.iter().any(|s| s.reachable));
        match (self.servers_reachable, reachable) {
            (Some(false), Some(true)) => self.servers_back_since = Some(now),
            (_, Some(false)) => self.servers_back_since = None,
            _ => {}
        }
        if reachable.is_some() {
            self.servers_reachable = reachable;
        }
        reachable
    }

    pub(super) fn servers_back_since(&self) -> Option<SystemTime> {
        self.servers_back_since
    }
}

/// The cluster circuit breaker: more than `breaker_share` of the
/// configured agents (and at least `breaker_min_agents`) have open
/// agent-level incidents at once. An agent known only by a SPIFFE ID no
/// configured agent maps to is not counted: it may be one of ours seen
/// twice, and it is never acted on anyway.
pub(super) fn breaker_open<'a>(
    agents: &HashSet<String>,
    incidents: impl Iterator<Item = &'a Incident>,
    policy: &GuardPolicy,
) -> bool {
    let unhealthy = incidents
        .filter(|i| i.subject.is_agent_level())
        .map(|i| i.subject.agent_name())
        .filter(|a| agents.contains(*a))
        .collect::<HashSet<_>>()
        .len();
    let total = agents.len();
    total > 0
        && unhealthy >= policy.breaker_min_agents
        && unhealthy as f64 > policy.breaker_share * total as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Severity, Subject, SymptomKind};
    use crate::policy::Policy;
    use serde_json::json;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn step(target: &str, actuator: &str, dry_run: bool) -> Step {
        Step {
            action_id: String::new(),
            incident_id: "i".into(),
            symptom: SymptomKind::AgentUnreachable,
            rung: 0,
            actuator: actuator.into(),
            target: target.into(),
            params: json!({}),
            timeout: Duration::from_secs(1),
            verify_within: Duration::from_secs(1),
            dry_run,
        }
    }

    fn record(target: &str, actuator: &str, at: u64, dry_run: bool) -> ActionRecord {
        ActionRecord {
            id: format!("{target}-{at}"),
            incident_id: "i".into(),
            symptom: "agent_unreachable".into(),
            rung: 0,
            actuator: actuator.into(),
            target: target.into(),
            params: json!({}),
            dry_run,
            started_at_ms: crate::clock::unix_millis(t(at)),
            finished_at_ms: Some(crate::clock::unix_millis(t(at + 1))),
            outcome: Some("ok".into()),
            detail: None,
            error: None,
            verification: None,
            verified_at_ms: None,
        }
    }

    fn server(reachable: bool, polled: bool) -> Arc<ServerView> {
        let mut v = ServerView::test("s", reachable, &[], t(0));
        if !polled {
            v.last_error = None;
        }
        Arc::new(v)
    }

    #[test]
    fn cooldown_ledger_keeps_the_latest_start() {
        let g = Guards::resume(
            &[
                record("a", "restart", 20, false),
                record("a", "restart", 10, false),
                record("b", "refetch", 5, true),
            ],
            &[],
        );
        let key = |t: &str, a: &str| (t.to_string(), a.to_string());
        assert_eq!(g.last_run()[&key("a", "restart")], t(20));
        assert_eq!(g.last_run()[&key("b", "refetch")], t(5));
    }

    #[test]
    fn budget_counts_real_starts_within_the_hour() {
        let mut g = Guards::resume(
            &[
                record("a", "restart", 0, false),
                record("b", "restart", 10, true),
            ],
            &[],
        );
        g.started(&step("c", "restart", false), t(100));
        g.started(&step("d", "restart", true), t(200));
        assert_eq!(g.actions_last_hour(t(3599)), 2);
        assert_eq!(g.actions_last_hour(t(3600)), 1);
        assert_eq!(g.actions_last_hour(t(3700)), 0);
        assert_eq!(g.last_run().len(), 4);
    }

    #[test]
    fn a_step_held_at_execute_time_keeps_its_cooldown_but_costs_no_budget() {
        let held = ActionRecord {
            outcome: Some("held".into()),
            ..record("web", "evict", 10, false)
        };
        let mut g = Guards::resume(&[held, record("a", "restart", 20, false)], &[]);
        assert_eq!(g.actions_last_hour(t(30)), 1, "the held one is not charged");
        assert_eq!(
            g.last_run()[&("web".to_string(), "evict".to_string())],
            t(10),
            "its cooldown stands"
        );
        // At run time: charged at start, given back when it comes back held.
        g.started(&step("web", "evict", false), t(40));
        assert_eq!(g.actions_last_hour(t(41)), 2);
        g.released(t(40));
        assert_eq!(g.actions_last_hour(t(41)), 1);
        g.released(t(40));
        assert_eq!(g.actions_last_hour(t(41)), 1, "released once");
        assert_eq!(
            g.last_run()[&("web".to_string(), "evict".to_string())],
            t(40)
        );
    }

    #[test]
    fn futility_counts_failures_of_open_incidents_and_forgets_settled_targets() {
        let failed = |target: &str, incident: &str, at| ActionRecord {
            incident_id: incident.into(),
            verification: Some("failed".into()),
            ..record(target, "restart", at, false)
        };
        let verified = ActionRecord {
            verification: Some("verified".into()),
            ..record("a", "restart", 3, false)
        };
        let never_judged = ActionRecord {
            incident_id: "c".into(),
            ..record("c", "restart", 5, false)
        };
        // Rebuilt from the store: only failures of incidents still open.
        let mut g = Guards::resume(
            &[
                failed("a", "a", 1),
                failed("a", "a", 2),
                verified,
                failed("b", "closed", 4),
                never_judged,
            ],
            &[agent_incident("a"), agent_incident("c")],
        );
        let key = |t: &str| (t.to_string(), "restart".to_string());
        assert_eq!(g.failures()[&key("a")], 2);
        assert!(
            !g.failures().contains_key(&key("c")),
            "returned, never judged: the executor judges it again"
        );
        assert!(!g.failures().contains_key(&key("b")));
        g.failed("b", "restart");
        assert_eq!(g.failures()[&key("b")], 1);
        // b has no open incident any more: its next episode starts afresh.
        g.settle(|target| target == "a");
        assert_eq!(g.failures().len(), 1);
        assert_eq!(g.failures()[&key("a")], 2);
    }

    #[test]
    fn servers_back_is_noted_only_after_a_total_outage() {
        let mut g = Guards::default();
        // Not every server polled yet: unknown, nothing noted.
        let half = [server(true, true), server(false, false)];
        assert_eq!(g.note_servers(&half, t(0)), None);
        assert_eq!(g.note_servers(&[], t(0)), None);
        // Up from the start: never "back".
        assert_eq!(g.note_servers(&[server(true, true)], t(1)), Some(true));
        assert_eq!(g.servers_back_since(), None);
        // Every server down, then one answers: back since then.
        let down = [server(false, true), server(false, true)];
        assert_eq!(g.note_servers(&down, t(2)), Some(false));
        let one = [server(true, true), server(false, true)];
        assert_eq!(g.note_servers(&one, t(3)), Some(true));
        assert_eq!(g.servers_back_since(), Some(t(3)));
        // Still up: the instant stays; down again: forgotten.
        g.note_servers(&one, t(4));
        assert_eq!(g.servers_back_since(), Some(t(3)));
        g.note_servers(&down, t(5));
        assert_eq!(g.servers_back_since(), None);
    }

    fn agent_incident(agent: &str) -> Incident {
        Incident {
            id: agent.into(),
            kind: SymptomKind::AgentUnreachable,
            subject: Subject::agent(agent),
            severity: Severity::Warning,
            opened_at: t(0),
            predicted_outage: None,
            evidence: json!({}),
            next_rung: 0,
            needs_operator: None,
        }
    }

    #[test]
    fn breaker_opens_past_the_share_and_the_minimum() {
        let mut policy = Policy::builtin().unwrap().guards;
        policy.breaker_share = 0.5;
        policy.breaker_min_agents = 2;
        let sick = [agent_incident("a0"), agent_incident("a1")];
        let agents = |n: usize| (0..n).map(|i| format!("a{i}")).collect::<HashSet<_>>();
        // Two of three configured agents: past half, at the minimum.
        assert!(breaker_open(&agents(3), sick.iter(), &policy));
        // Exactly half is not more than half.
        assert!(!breaker_open(&agents(4), sick.iter(), &policy));
        // One sick agent is below the minimum, whatever the share.
        assert!(!breaker_open(&agents(1), sick[..1].iter(), &policy));
        assert!(!breaker_open(&agents(0), std::iter::empty(), &policy));
        // An agent known only by a SPIFFE ID is not counted: after a
        // restart it may be a configured agent seen a second time.
        let unmapped = [
            agent_incident("a0"),
            agent_incident("spiffe://td/spire/agent/join_token/x"),
        ];
        assert!(!breaker_open(&agents(2), unmapped.iter(), &policy));
        // Two incidents on one agent count once.
        let twice = [agent_incident("a0"), agent_incident("a0")];
        assert!(!breaker_open(&agents(1), twice.iter(), &policy));
    }
}
