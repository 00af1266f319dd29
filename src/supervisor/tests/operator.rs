//! Operator controls in the loop, on a literal clock: pause, approvals
//! (approved, rejected, expired, decided twice), demotion and its reset, and
//! that each survives a restart through the store.

use super::*;
use crate::control::ControlError;
use crate::model::ApprovalState;
use crate::policy::ApprovalMode;

/// The overdue ladder (refetch, restart-agent) with the restart needing a
/// person's yes.
fn restart_needs_approval(mut policy: Policy) -> Policy {
    for rung in policy
        .ladders
        .get_mut("svid_rotation_overdue")
        .expect("overdue ladder")
    {
        if rung.actuator == "restart-agent" {
            rung.approval = Some(ApprovalMode::Required);
        }
    }
    policy
}

impl Harness {
    /// Shares controls with the supervisors this harness builds.
    fn with_operator(&mut self) -> Operator {
        let op = Operator::detached(false);
        self.operator = Some(op.clone());
        op
    }

    /// A supervisor whose controls are resumed from the store, as `run`
    /// does at start.
    async fn restarted(&mut self) -> (Supervisor, Operator) {
        let since = self.clock.now() - HOUR;
        let knowledge = self.store.load_knowledge(since).await.unwrap();
        let op = Operator::new(crate::control::Controls::resume(
            false,
            &knowledge.controls,
            &knowledge.approvals,
            &knowledge.demotions,
            self.wake.clone(),
        ));
        self.operator = Some(op.clone());
        (
            Supervisor::new(self.parts(self.store.clone()), knowledge),
            op,
        )
    }
}

async fn audit_kinds(h: &Harness) -> Vec<(String, String)> {
    let mut rows = h.store.audit(&Query::default()).await.unwrap();
    rows.reverse();
    rows.into_iter().map(|r| (r.kind, r.actor)).collect()
}

#[tokio::test]
async fn pause_holds_every_step_lets_running_actions_finish_and_survives_a_restart() {
    let mut h = Harness::new(vec![view("a")]).await;
    let op = h.with_operator();
    let mut sup = h.supervisor().await;

    // t(70): refetch starts; then an operator pauses while it runs.
    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.started.len(), 1);
    assert!(
        op.controls
            .pause("uid:1000", Some("change freeze".into()), t(71))
    );
    h.action_finished().await;
    // t(75): the running refetch returned and is judged (failed), but the
    // next rung does not start: paused.
    let r = h.tick(&mut sup, 75).await;
    assert_eq!(r.verified.len(), 1, "in-flight work is still verified");
    assert!(r.started.is_empty());
    assert!(h.holds().await.iter().any(|x| x.reason == "paused"));
    assert_eq!(h.restart.calls().len(), 0);
    assert_eq!(h.metric("spire_healer_paused"), Some(1.0));

    // A restart keeps the pause.
    drop(sup);
    let (mut sup, op) = h.restarted().await;
    let paused = op.controls.paused().expect("still paused after a restart");
    assert_eq!(paused.by, "uid:1000");
    assert_eq!(paused.reason.as_deref(), Some("change freeze"));
    assert!(h.tick(&mut sup, 76).await.started.is_empty());

    // Resume: the next tick acts.
    assert!(op.controls.resume_actions("uid:1000", None, t(77)));
    let r = h.tick(&mut sup, 78).await;
    assert_eq!(r.started.len(), 1);
    assert_eq!(r.started[0].actuator, "restart-agent");
    h.action_finished().await;
    let kinds = audit_kinds(&h).await;
    assert!(
        kinds.contains(&("paused".into(), "uid:1000".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("resumed".into(), "uid:1000".into())),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn a_step_needing_approval_waits_runs_once_approved_and_records_who() {
    let mut h = Harness::new(vec![view("a")]).await;
    h.policy = restart_needs_approval(h.policy.clone());
    let agent = h.agent("a");
    h.restart.on_run(move || agent.rotate("02", 80));
    let op = h.with_operator();
    let mut sup = h.supervisor().await;

    h.tick(&mut sup, 70).await;
    h.action_finished().await;
    // t(75): refetch failed; the restart needs approval: asked, not run.
    let r = h.tick(&mut sup, 75).await;
    assert!(r.started.is_empty());
    let pending = op.controls.live_approvals();
    assert_eq!(pending.len(), 1);
    let id = pending[0].approval.id.clone();
    assert_eq!(pending[0].state, ApprovalState::Pending);
    assert_eq!(pending[0].approval.actuator, "restart-agent");
    // Still waiting: no second request, nothing runs.
    assert!(h.tick(&mut sup, 76).await.started.is_empty());
    assert_eq!(op.controls.live_approvals().len(), 1);
    assert_eq!(h.metric("spire_healer_approvals_pending"), Some(1.0));

    op.controls
        .decide(&id, true, "spiffe://example.org/ops/alice", None, t(77))
        .unwrap();
    // Approving twice is refused and names who approved.
    let again = op
        .controls
        .decide(&id, true, "uid:0", None, t(77))
        .unwrap_err();
    assert!(
        again.to_string().contains("spiffe://example.org/ops/alice"),
        "{again}"
    );
    let r = h.tick(&mut sup, 78).await;
    assert_eq!(r.started.len(), 1);
    let step = &r.started[0];
    assert_eq!(step.actuator, "restart-agent");
    assert_eq!(step.params["approval_id"], id.as_str());
    h.action_finished().await;
    h.tick(&mut sup, 81).await;
    assert!(op.controls.live_approvals().is_empty(), "used");

    let stored = h.store.approvals(&Query::default()).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].state, "used");
    assert_eq!(
        stored[0].decided_by.as_deref(),
        Some("spiffe://example.org/ops/alice")
    );
    assert_eq!(
        stored[0].action_id.as_deref(),
        Some(step.action_id.as_str())
    );
    let kinds = audit_kinds(&h).await;
    for want in [
        ("pending", "spire-healer"),
        ("approved", "spiffe://example.org/ops/alice"),
        ("acted", "spire-healer"),
    ] {
        assert!(
            kinds.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {kinds:?}"
        );
    }
}

#[tokio::test]
async fn a_rejected_step_is_held_and_an_expired_one_is_asked_again() {
    let mut h = Harness::new(vec![view("a")]).await;
    h.policy = restart_needs_approval(h.policy.clone());
    // Within the SVID's lifetime (the incident must stay open).
    h.policy.guards.approval.expires_after = Duration::from_secs(3);
    let op = h.with_operator();
    let mut sup = h.supervisor().await;
    h.tick(&mut sup, 70).await;
    h.action_finished().await;
    h.tick(&mut sup, 75).await;
    let first = op.controls.live_approvals()[0].clone();

    // Nobody answers in time.
    let expired_at = 75 + h.policy.approval_expiry().as_secs();
    h.tick(&mut sup, expired_at).await;
    let late = op
        .controls
        .decide(&first.approval.id, true, "uid:0", None, t(expired_at + 1));
    assert!(
        matches!(late, Err(ControlError::AlreadyDecided { .. })),
        "{late:?}"
    );
    assert!(
        h.holds()
            .await
            .iter()
            .any(|x| x.reason == "approval_expired")
    );
    // Asked again.
    h.tick(&mut sup, expired_at + 1).await;
    let second = op.controls.live_approvals();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].approval.id, first.approval.id);

    // Rejected: held, nothing runs, nothing is asked again for this rung.
    op.controls
        .decide(
            &second[0].approval.id,
            false,
            "uid:1000",
            Some("not now".into()),
            t(expired_at + 2),
        )
        .unwrap();
    let r = h.tick(&mut sup, expired_at + 3).await;
    assert!(r.started.is_empty());
    assert!(
        h.holds()
            .await
            .iter()
            .any(|x| x.reason == "approval_rejected")
    );
    h.tick(&mut sup, expired_at + 4).await;
    assert!(op.controls.live_approvals().is_empty());
    assert!(h.restart.calls().is_empty());
    let kinds = audit_kinds(&h).await;
    assert!(
        kinds.contains(&("expired".into(), "spire-healer".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("rejected".into(), "uid:1000".into())),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn a_step_that_keeps_failing_is_demoted_remembered_across_a_restart_and_reset() {
    let mut h = Harness::new(vec![view("a"), view("b")]).await;
    h.policy.guards.demotion.window = 2;
    h.policy.guards.demotion.min_success_ratio = 0.5;
    // Two agents in trouble at once is not an upstream cause here.
    h.policy.guards.breaker_min_agents = 3;
    h.policy.guards.blast_radius.enabled = false;
    let op = h.with_operator();
    let mut sup = h.supervisor().await;

    // Both agents overdue: refetch runs on each and fails verification
    // twice in all: demoted.
    let r = h.tick(&mut sup, 70).await;
    assert_eq!(r.started.len(), 2);
    h.action_finished().await;
    h.action_finished().await;
    h.tick(&mut sup, 75).await;
    let demoted = op.controls.demoted();
    assert_eq!(demoted.len(), 1, "{demoted:?}");
    assert_eq!(demoted[0].actuator, "refetch");
    assert_eq!((demoted[0].verified, demoted[0].runs), (0, 2));
    assert_eq!(
        h.metric(
            r#"spire_healer_demoted_steps{actuator="refetch",symptom="svid_rotation_overdue"}"#
        ),
        Some(1.0)
    );

    // A restart remembers it.
    drop(sup);
    let (_sup, op) = h.restarted().await;
    assert_eq!(op.controls.demoted().len(), 1);
    op.controls
        .reset_demotion(SymptomKind::SvidRotationOverdue, "refetch", "uid:7", t(80))
        .unwrap();
    assert!(matches!(
        op.controls
            .reset_demotion(SymptomKind::SvidRotationOverdue, "refetch", "uid:7", t(80)),
        Err(ControlError::NotDemoted { .. })
    ));
}
