//! The loop's side of the operator controls (`crate::control`): what
//! operators changed since the last tick becomes this tick's events, live
//! approvals expire or are withdrawn, `plan` gets its [`PlanControls`], and
//! after the tick the status and the recorded events are published for the
//! API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::info;

use super::Tick;
use super::incidents::Incidents;
use crate::control::{ApprovalEntry, Controls, DemotionReset, Hub, Status};
use crate::model::{Approval, ApprovalState, Event, Step, new_id};
use crate::plan::{HoldReason, PlanControls};

/// How the loop and the API share controls, status and events.
#[derive(Debug, Clone)]
pub struct Operator {
    /// Pause, dry run, approvals, demotions.
    pub controls: Controls,
    /// Recorded events for `Watch`.
    pub hub: Arc<Hub>,
    /// The status published after each tick.
    pub status: Arc<watch::Sender<Status>>,
}

/// Events `Watch` keeps for resuming readers.
pub const HUB_CAPACITY: usize = 4096;

impl Operator {
    /// Controls with nothing recorded (tests, the demo, benches).
    pub fn detached(dry_run: bool) -> Self {
        Self::new(Controls::resume(
            dry_run,
            &[],
            &[],
            &[],
            Arc::new(tokio::sync::Notify::new()),
        ))
    }

    /// Wraps `controls` with a fresh hub and status.
    pub fn new(controls: Controls) -> Self {
        Self {
            controls,
            hub: Hub::new(HUB_CAPACITY),
            status: Arc::new(watch::channel(Status::default()).0),
        }
    }
}

/// Loop state for the controls: the approvals seen live this tick.
pub(super) struct Operations {
    link: Operator,
    live: Vec<ApprovalEntry>,
    rejected: Vec<(String, usize)>,
}

impl Operations {
    pub(super) fn new(link: Operator) -> Self {
        Self {
            link,
            live: Vec::new(),
            rejected: Vec::new(),
        }
    }

    pub(super) fn controls(&self) -> &Controls {
        &self.link.controls
    }

    /// Takes what operators changed (recorded this tick), holds and moves
    /// on past rejected steps, expires pending approvals past their time
    /// and withdraws those whose incident closed or moved past the rung.
    /// Returns the demotion resets to apply.
    pub(super) fn intake(
        &mut self,
        incidents: &mut Incidents,
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) -> Vec<DemotionReset> {
        let controls = &self.link.controls;
        let (events, resets) = controls.take();
        for e in &events {
            if let Event::ApprovalDecided {
                id,
                state: ApprovalState::Rejected,
                ..
            } = e
                && let Some(entry) = controls.approval(id)
            {
                let a = &entry.approval;
                if let Some(inc) = incidents.by_id(&a.incident_id) {
                    let key = inc.key();
                    let passed = inc.next_rung <= a.rung;
                    incidents.hold(
                        &a.incident_id,
                        &a.actuator,
                        &a.target,
                        HoldReason::ApprovalRejected.as_str(),
                        now,
                        tick,
                    );
                    if passed {
                        incidents.escalate(&key, a.rung + 1, tick);
                    }
                }
            }
        }
        tick.events.extend(events);
        for entry in controls.live_approvals() {
            let a = &entry.approval;
            let open = incidents
                .by_id(&a.incident_id)
                .filter(|inc| inc.next_rung <= a.rung + 1);
            let Some(inc) = open else {
                tick.events
                    .extend(controls.conclude(&a.id, ApprovalState::Withdrawn, None, now));
                continue;
            };
            if entry.state == ApprovalState::Pending && now >= a.expires_at {
                let target = inc.subject.agent_name().to_string();
                tick.events
                    .extend(controls.conclude(&a.id, ApprovalState::Expired, None, now));
                incidents.hold(
                    &a.incident_id,
                    &a.actuator,
                    &target,
                    HoldReason::ApprovalExpired.as_str(),
                    now,
                    tick,
                );
            }
        }
        self.live = controls.live_approvals();
        self.rejected = controls.rejected();
        self.rejected
            .retain(|(incident, _)| incidents.by_id(incident).is_some());
        resets
    }

    /// What `plan` needs of the controls: pause and live approvals. The
    /// group guards' fields are filled by the caller.
    pub(super) fn plan_controls(&self) -> PlanControls<'_> {
        let mut approvals = HashMap::with_capacity(self.live.len());
        for e in &self.live {
            approvals.insert(
                (e.approval.incident_id.as_str(), e.approval.rung),
                (e.approval.id.as_str(), e.state),
            );
        }
        PlanControls {
            paused: self.link.controls.paused().is_some(),
            approvals,
            rejected: self
                .rejected
                .iter()
                .map(|(i, r)| (i.as_str(), *r))
                .collect(),
            ..PlanControls::default()
        }
    }

    /// Asks for a person's yes for `step` (recorded as `pending`).
    pub(super) fn request(
        &self,
        step: &Step,
        expires_after: std::time::Duration,
        now: SystemTime,
    ) -> Event {
        let approval = Approval {
            id: new_id(),
            incident_id: step.incident_id.clone(),
            symptom: step.symptom,
            rung: step.rung,
            actuator: step.actuator.clone(),
            target: step.target.clone(),
            requested_at: now,
            expires_at: now + expires_after,
        };
        info!(
            approval = %approval.id,
            incident = %step.incident_id,
            actuator = %step.actuator,
            target_name = %step.target,
            "Step waits for approval: spire-healer approve {}",
            approval.id
        );
        self.link.controls.request(approval)
    }

    /// The approved step `step` started as its action.
    pub(super) fn used(&self, step: &Step, now: SystemTime) -> Option<Event> {
        let id = step.params.get("approval_id")?.as_str()?;
        self.link
            .controls
            .conclude(id, ApprovalState::Used, Some(step.action_id.clone()), now)
    }

    /// The controls' gauges: paused, dry run, approvals waiting, and per
    /// (symptom, actuator) step of the policy's ladders whether it is
    /// demoted (0 or 1, so every step has a series).
    pub(super) fn gauges(
        &self,
        metrics: &crate::telemetry::Metrics,
        policy: &crate::policy::Policy,
        demoted: &dyn Fn(crate::model::SymptomKind, &str) -> bool,
    ) {
        let c = &self.link.controls;
        metrics.paused.set(i64::from(c.paused().is_some()));
        metrics.dry_run.set(i64::from(c.dry_run()));
        let pending = self
            .live
            .iter()
            .filter(|a| a.state == ApprovalState::Pending)
            .count();
        metrics
            .approvals_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        for (name, rungs) in &policy.ladders {
            let Some(symptom) = crate::model::SymptomKind::parse(name) else {
                continue;
            };
            for rung in rungs {
                metrics
                    .demoted_steps
                    .with_label_values(&[name.as_str(), rung.actuator.as_str()])
                    .set(i64::from(demoted(symptom, &rung.actuator)));
            }
        }
    }

    /// Publishes the tick's recorded events for `Watch`.
    pub(super) fn publish_events(&self, events: &[Event]) {
        self.link.hub.publish(events);
    }

    /// Publishes the status (only when someone may read it).
    pub(super) fn publish_status(&self, status: impl FnOnce() -> Status) {
        if self.link.status.receiver_count() > 0 {
            self.link.status.send_replace(status());
        }
    }
}
