//! Operator controls shared by the API and the loop: pause, dry run,
//! approvals and demotion resets, the status the loop publishes each tick,
//! and the event hub `Watch` reads from.
//!
//! The API changes a control here and gets its answer at once (under one
//! lock, so two operators deciding the same approval concurrently get one
//! winner and one clear error). The change is also queued as a store event
//! in the outbox; the loop takes the outbox at the start of its next tick
//! (the API wakes it), records it with that tick's events and reads the
//! controls for `plan`. A control therefore applies from the next tick on,
//! and survives a restart once recorded (`Knowledge::controls`,
//! `Knowledge::approvals`).
//!
//! Approvals are created by the loop ([`Controls::request`]) and decided by
//! an operator ([`Controls::decide`]); the loop marks them used, expired or
//! withdrawn.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::{Notify, watch};

use crate::clock::{from_unix_millis, unix_millis};
use crate::knowledge::{ApprovalRecord, ControlRecord, DemotionRecord};
use crate::model::{Approval, ApprovalState, ControlChange, Event, SymptomKind, new_id};

/// Why a control request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No approval has this id.
    #[error("no approval {0}")]
    UnknownApproval(String),
    /// The approval is no longer pending.
    #[error("approval {id} is already {state}{by}")]
    AlreadyDecided {
        id: String,
        /// Its state.
        state: &'static str,
        /// ` by <who> at <when>` or empty.
        by: String,
    },
    /// The approval expired before the decision.
    #[error("approval {id} expired at {at}")]
    Expired {
        id: String,
        /// RFC 3339.
        at: String,
    },
    /// The (symptom, actuator) step is not demoted.
    #[error("{symptom}/{actuator} is not demoted")]
    NotDemoted { symptom: String, actuator: String },
    /// A request argument is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// A pause in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// Who paused.
    pub by: String,
    /// Why.
    pub reason: Option<String>,
    /// When.
    pub at: SystemTime,
}

/// One approval and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalEntry {
    pub approval: Approval,
    pub state: ApprovalState,
    /// Who approved or rejected it.
    pub decided_by: Option<String>,
    /// When its state last changed.
    pub decided_at: Option<SystemTime>,
    /// The operator's reason or comment.
    pub reason: Option<String>,
    /// The action it became.
    pub action_id: Option<String>,
}

/// A step demoted and not yet reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemotedStep {
    pub symptom: SymptomKind,
    pub actuator: String,
    pub verified: u32,
    pub runs: u32,
    pub at: SystemTime,
}

/// A demotion reset asked for by an operator, for the loop to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemotionReset {
    pub symptom: SymptomKind,
    pub actuator: String,
}

#[derive(Debug, Default)]
struct State {
    pause: Option<Pause>,
    dry_run: bool,
    /// Live approvals (pending or approved) and recently final ones, by id.
    approvals: BTreeMap<String, ApprovalEntry>,
    /// Ids of final approvals, oldest first, to bound `approvals`.
    finished: VecDeque<String>,
    demoted: Vec<DemotedStep>,
    resets: Vec<DemotionReset>,
    outbox: Vec<Event>,
}

/// Final approvals kept in memory (so approving one twice says what
/// happened to it); older ones are looked up in the store.
const FINISHED_KEPT: usize = 1024;

/// The shared controls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Controls {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
}

impl Controls {
    /// Controls as configured (`dry_run`), then as last recorded: the
    /// last pause and dry-run change, live approvals, demotions.
    pub fn resume(
        configured_dry_run: bool,
        controls: &[ControlRecord],
        approvals: &[ApprovalRecord],
        demotions: &[DemotionRecord],
        wake: Arc<Notify>,
    ) -> Self {
        let mut st = State {
            dry_run: configured_dry_run,
            ..State::default()
        };
        for c in controls {
            match c.change {
                ControlChange::Paused => {
                    st.pause = Some(Pause {
                        by: c.by.clone(),
                        reason: c.reason.clone(),
                        at: from_unix_millis(c.at_ms),
                    });
                }
                ControlChange::Resumed => st.pause = None,
                ControlChange::DryRunOn => st.dry_run = true,
                ControlChange::DryRunOff => st.dry_run = false,
            }
        }
        for a in approvals {
            let (Some(symptom), Some(state)) = (
                SymptomKind::parse(&a.symptom),
                ApprovalState::parse(&a.state),
            ) else {
                tracing::warn!(approval = %a.id, "Skipping a stored approval that does not parse.");
                continue;
            };
            st.approvals.insert(
                a.id.clone(),
                ApprovalEntry {
                    approval: Approval {
                        id: a.id.clone(),
                        incident_id: a.incident_id.clone(),
                        symptom,
                        rung: usize::try_from(a.rung).unwrap_or(0),
                        actuator: a.actuator.clone(),
                        target: a.target.clone(),
                        requested_at: from_unix_millis(a.requested_at_ms),
                        expires_at: from_unix_millis(a.expires_at_ms),
                    },
                    state,
                    decided_by: a.decided_by.clone(),
                    decided_at: a.decided_at_ms.map(from_unix_millis),
                    reason: a.reason.clone(),
                    action_id: a.action_id.clone(),
                },
            );
        }
        for d in demotions {
            let Some(symptom) = SymptomKind::parse(&d.symptom) else {
                continue;
            };
            st.demoted.push(DemotedStep {
                symptom,
                actuator: d.actuator.clone(),
                verified: d.verified,
                runs: d.runs,
                at: from_unix_millis(d.demoted_at_ms),
            });
        }
        Self {
            state: Arc::new(Mutex::new(st)),
            wake,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- Operator side (the API) ---

    /// Pauses. Returns whether anything changed (a second pause keeps the
    /// first one's author and reason).
    pub fn pause(&self, by: &str, reason: Option<String>, now: SystemTime) -> bool {
        let mut st = self.lock();
        if st.pause.is_some() {
            return false;
        }
        st.pause = Some(Pause {
            by: by.to_string(),
            reason: reason.clone(),
            at: now,
        });
        st.outbox
            .push(control_event(ControlChange::Paused, by, reason, now));
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Ends a pause. Returns whether anything changed.
    pub fn resume_actions(&self, by: &str, reason: Option<String>, now: SystemTime) -> bool {
        let mut st = self.lock();
        if st.pause.take().is_none() {
            return false;
        }
        st.outbox
            .push(control_event(ControlChange::Resumed, by, reason, now));
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Turns dry run on or off. Returns whether anything changed.
    pub fn set_dry_run(&self, on: bool, by: &str, reason: Option<String>, now: SystemTime) -> bool {
        let mut st = self.lock();
        if st.dry_run == on {
            return false;
        }
        st.dry_run = on;
        let change = if on {
            ControlChange::DryRunOn
        } else {
            ControlChange::DryRunOff
        };
        st.outbox.push(control_event(change, by, reason, now));
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Approves (`approve`) or rejects a pending approval.
    ///
    /// # Errors
    /// [`ControlError::UnknownApproval`] for an id not held in memory (the
    /// caller may look it up in the store to say more),
    /// [`ControlError::Expired`] past its expiry, and
    /// [`ControlError::AlreadyDecided`] when it is no longer pending.
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        reason: Option<String>,
        now: SystemTime,
    ) -> Result<ApprovalEntry, ControlError> {
        let mut st = self.lock();
        let entry = st
            .approvals
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownApproval(id.to_string()))?;
        if entry.state != ApprovalState::Pending {
            return Err(already(entry));
        }
        if now >= entry.approval.expires_at {
            return Err(ControlError::Expired {
                id: id.to_string(),
                at: crate::clock::rfc3339(entry.approval.expires_at),
            });
        }
        let state = if approve {
            ApprovalState::Approved
        } else {
            ApprovalState::Rejected
        };
        entry.state = state;
        entry.decided_by = Some(by.to_string());
        entry.decided_at = Some(now);
        entry.reason.clone_from(&reason);
        let out = entry.clone();
        st.outbox.push(Event::ApprovalDecided {
            id: id.to_string(),
            state,
            by: Some(by.to_string()),
            reason,
            action_id: None,
            at: now,
        });
        if state.is_final() {
            finish(&mut st, id);
        }
        drop(st);
        self.wake.notify_one();
        Ok(out)
    }

    /// Asks the loop to let a demoted step run again.
    ///
    /// # Errors
    /// [`ControlError::NotDemoted`] when it is not demoted.
    pub fn reset_demotion(
        &self,
        symptom: SymptomKind,
        actuator: &str,
        by: &str,
        now: SystemTime,
    ) -> Result<(), ControlError> {
        let mut st = self.lock();
        let before = st.demoted.len();
        st.demoted
            .retain(|d| !(d.symptom == symptom && d.actuator == actuator));
        if st.demoted.len() == before {
            return Err(ControlError::NotDemoted {
                symptom: symptom.as_str().to_string(),
                actuator: actuator.to_string(),
            });
        }
        st.resets.push(DemotionReset {
            symptom,
            actuator: actuator.to_string(),
        });
        st.outbox.push(Event::DemotionReset {
            id: new_id(),
            symptom,
            actuator: actuator.to_string(),
            by: by.to_string(),
            at: now,
        });
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    // --- Reads (both sides) ---

    /// The pause in force.
    pub fn paused(&self) -> Option<Pause> {
        self.lock().pause.clone()
    }

    /// Whether dry run is on.
    pub fn dry_run(&self) -> bool {
        self.lock().dry_run
    }

    /// One approval held in memory.
    pub fn approval(&self, id: &str) -> Option<ApprovalEntry> {
        self.lock().approvals.get(id).cloned()
    }

    /// Approvals still pending or approved and not used.
    pub fn live_approvals(&self) -> Vec<ApprovalEntry> {
        self.lock()
            .approvals
            .values()
            .filter(|a| !a.state.is_final())
            .cloned()
            .collect()
    }

    /// (incident id, rung) of every rejected approval still held in
    /// memory: those steps are passed over for their incident.
    pub fn rejected(&self) -> Vec<(String, usize)> {
        self.lock()
            .approvals
            .values()
            .filter(|a| a.state == ApprovalState::Rejected)
            .map(|a| (a.approval.incident_id.clone(), a.approval.rung))
            .collect()
    }

    /// Demoted steps.
    pub fn demoted(&self) -> Vec<DemotedStep> {
        self.lock().demoted.clone()
    }

    // --- Loop side ---

    /// Operator changes since the last call, as store events, and the
    /// demotion resets to apply.
    pub fn take(&self) -> (Vec<Event>, Vec<DemotionReset>) {
        let mut st = self.lock();
        (
            std::mem::take(&mut st.outbox),
            std::mem::take(&mut st.resets),
        )
    }

    /// Records a new pending approval; returns its event.
    pub fn request(&self, approval: Approval) -> Event {
        let mut st = self.lock();
        st.approvals.insert(
            approval.id.clone(),
            ApprovalEntry {
                approval: approval.clone(),
                state: ApprovalState::Pending,
                decided_by: None,
                decided_at: None,
                reason: None,
                action_id: None,
            },
        );
        Event::ApprovalRequested { approval }
    }

    /// The loop ends a live approval: `Used` (with the action), `Expired`
    /// or `Withdrawn`. Returns its event, or `None` when it was not live.
    pub fn conclude(
        &self,
        id: &str,
        state: ApprovalState,
        action_id: Option<String>,
        now: SystemTime,
    ) -> Option<Event> {
        let mut st = self.lock();
        let entry = st.approvals.get_mut(id)?;
        if entry.state.is_final() {
            return None;
        }
        entry.state = state;
        entry.decided_at = Some(now);
        entry.action_id.clone_from(&action_id);
        finish(&mut st, id);
        Some(Event::ApprovalDecided {
            id: id.to_string(),
            state,
            by: None,
            reason: None,
            action_id,
            at: now,
        })
    }

    /// Marks a step demoted (by the loop's ledger).
    pub fn demote(&self, step: DemotedStep) {
        let mut st = self.lock();
        if !st
            .demoted
            .iter()
            .any(|d| d.symptom == step.symptom && d.actuator == step.actuator)
        {
            st.demoted.push(step);
        }
    }
}

fn already(entry: &ApprovalEntry) -> ControlError {
    let by = match (&entry.decided_by, entry.decided_at) {
        (Some(who), Some(at)) => format!(" by {who} at {}", crate::clock::rfc3339(at)),
        (None, Some(at)) => format!(" since {}", crate::clock::rfc3339(at)),
        _ => String::new(),
    };
    ControlError::AlreadyDecided {
        id: entry.approval.id.clone(),
        state: entry.state.as_str(),
        by,
    }
}

fn finish(st: &mut State, id: &str) {
    st.finished.push_back(id.to_string());
    while st.finished.len() > FINISHED_KEPT {
        if let Some(old) = st.finished.pop_front() {
            st.approvals.remove(&old);
        }
    }
}

fn control_event(
    change: ControlChange,
    by: &str,
    reason: Option<String>,
    now: SystemTime,
) -> Event {
    Event::ControlChanged {
        id: new_id(),
        change,
        by: by.to_string(),
        reason,
        at: now,
    }
}

// === Status and the watch hub ===

/// What `GetStatus` answers, published by the loop after each tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    /// Subjects with an open incident or a blind view.
    pub subjects: Vec<SubjectStatus>,
    /// Subjects watched with nothing open.
    pub healthy_subjects: u64,
    /// Sensors whose view is too old.
    pub blind_sensors: Vec<String>,
    /// Actions running or awaiting verification.
    pub actions_in_flight: u32,
    /// Open incidents.
    pub open_incidents: u32,
    /// The tick this describes (`None` before the first).
    pub last_tick: Option<SystemTime>,
    /// Whether the store answered at the last write or heartbeat.
    pub store_up: bool,
}

/// One subject in [`Status`].
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectStatus {
    /// Display form.
    pub subject: String,
    /// `degraded`, `failing` or `blind`.
    pub state: SubjectState,
    pub open_incident_ids: Vec<String>,
    pub predicted_outage: Option<SystemTime>,
}

/// How a subject is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectState {
    Ok,
    Degraded,
    Failing,
    Blind,
}

/// One recorded event as `Watch` streams it, with its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    /// Increasing from 1 in this run of the daemon.
    pub seq: u64,
    pub event: Event,
}

/// Recent events for `Watch`: a bounded ring and the sequence of the
/// newest. A reader that falls behind the ring's start is told so (it
/// cannot resume; it lists and watches from now).
#[derive(Debug)]
pub struct Hub {
    /// Identifies this run: cursors from another run are refused.
    pub run_id: String,
    capacity: usize,
    ring: Mutex<VecDeque<Watched>>,
    newest: watch::Sender<u64>,
}

/// Where a reader resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Events after `seq` are all still held.
    After(u64),
    /// Events after `seq` are partly gone, or the cursor is from another run.
    Gone,
}

impl Hub {
    /// A hub holding at most `capacity` events.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            run_id: new_id(),
            capacity: capacity.max(1),
            ring: Mutex::new(VecDeque::new()),
            newest: watch::channel(0).0,
        })
    }

    fn ring(&self) -> MutexGuard<'_, VecDeque<Watched>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends the tick's events (the loop, after recording them).
    pub fn publish(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let mut ring = self.ring();
        let mut seq = *self.newest.borrow();
        for e in events {
            if !watchable(e) {
                continue;
            }
            seq += 1;
            ring.push_back(Watched {
                seq,
                event: e.clone(),
            });
            while ring.len() > self.capacity {
                ring.pop_front();
            }
        }
        drop(ring);
        self.newest.send_replace(seq);
    }

    /// The newest sequence number, and a receiver that changes with it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// The sequence of the newest event.
    pub fn newest(&self) -> u64 {
        *self.newest.borrow()
    }

    /// Events after `seq`, at most `max`.
    pub fn after(&self, seq: u64, max: usize) -> Vec<Watched> {
        let ring = self.ring();
        let start = ring.partition_point(|w| w.seq <= seq);
        ring.iter().skip(start).take(max).cloned().collect()
    }

    /// Whether a reader at `cursor` (`<run id>:<seq>`) can resume.
    pub fn resume_from(&self, cursor: &str) -> Result<Resume, ControlError> {
        let (run, seq) = cursor
            .rsplit_once(':')
            .and_then(|(r, s)| Some((r, s.parse::<u64>().ok()?)))
            .ok_or_else(|| ControlError::Invalid(format!("malformed cursor {cursor:?}")))?;
        if run != self.run_id || seq > self.newest() {
            return Ok(Resume::Gone);
        }
        let ring = self.ring();
        let oldest = ring.front().map_or(self.newest() + 1, |w| w.seq);
        Ok(if seq + 1 >= oldest {
            Resume::After(seq)
        } else {
            Resume::Gone
        })
    }

    /// The cursor naming the event `seq`.
    pub fn cursor(&self, seq: u64) -> String {
        format!("{}:{seq}", self.run_id)
    }
}

/// Events `Watch` streams: incidents, actions, holds and decisions, not
/// sightings (subjects, SVIDs, identities).
fn watchable(e: &Event) -> bool {
    !matches!(
        e,
        Event::SubjectSeen { .. }
            | Event::SvidSeen { .. }
            | Event::SvidReplaced { .. }
            | Event::AgentIdentified(_)
    )
}

/// Milliseconds for the wire (0 = unset).
pub fn ms(t: Option<SystemTime>) -> i64 {
    t.map_or(0, unix_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn approval(id: &str) -> Approval {
        Approval {
            id: id.into(),
            incident_id: "inc".into(),
            symptom: SymptomKind::AgentUnreachable,
            rung: 1,
            actuator: "restart".into(),
            target: "node-a".into(),
            requested_at: t(0),
            expires_at: t(600),
        }
    }

    fn controls() -> Controls {
        Controls::resume(false, &[], &[], &[], Arc::new(Notify::new()))
    }

    #[test]
    fn an_approval_is_decided_once_and_says_by_whom() {
        let c = controls();
        c.request(approval("a1"));
        let got = c.decide("a1", true, "uid:1000", None, t(10)).unwrap();
        assert_eq!(got.state, ApprovalState::Approved);
        let err = c
            .decide("a1", false, "spiffe://td/ops/bob", None, t(11))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "approval a1 is already approved by uid:1000 at 2023-11-14T22:13:30Z"
        );
        let (events, _) = c.take();
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn an_expired_or_unknown_approval_is_refused() {
        let c = controls();
        c.request(approval("a1"));
        assert!(matches!(
            c.decide("a1", true, "uid:0", None, t(600)),
            Err(ControlError::Expired { .. })
        ));
        assert_eq!(
            c.decide("nope", true, "uid:0", None, t(1)),
            Err(ControlError::UnknownApproval("nope".into()))
        );
        assert!(c.take().0.is_empty(), "a refused decision records nothing");
    }

    #[test]
    fn concurrent_approve_and_reject_have_one_winner() {
        let c = controls();
        c.request(approval("a1"));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    c.decide("a1", i % 2 == 0, &format!("uid:{i}"), None, t(5))
                        .is_ok()
                })
            })
            .collect();
        let winners = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(winners, 1);
        assert_eq!(c.take().0.len(), 1);
    }

    #[test]
    fn pause_and_dry_run_record_only_changes_and_survive_a_restart() {
        let c = controls();
        assert!(c.pause("uid:0", Some("incident 42".into()), t(1)));
        assert!(!c.pause("uid:1", None, t(2)));
        assert!(c.set_dry_run(true, "uid:0", None, t(3)));
        let (events, _) = c.take();
        assert_eq!(events.len(), 2);
        let records: Vec<ControlRecord> = events
            .iter()
            .map(|e| match e {
                Event::ControlChanged {
                    change,
                    by,
                    reason,
                    at,
                    ..
                } => ControlRecord {
                    change: *change,
                    by: by.clone(),
                    reason: reason.clone(),
                    at_ms: unix_millis(*at),
                },
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let back = Controls::resume(false, &records, &[], &[], Arc::new(Notify::new()));
        assert_eq!(
            back.paused().unwrap().reason.as_deref(),
            Some("incident 42")
        );
        assert!(back.dry_run());
    }

    #[test]
    fn the_hub_resumes_within_its_ring_and_refuses_what_fell_out() {
        let hub = Hub::new(3);
        let held = |id: &str| Event::Held {
            incident_id: id.into(),
            actuator: String::new(),
            target: "n".into(),
            reason: "cooldown".into(),
            at: t(0),
        };
        hub.publish(&[held("1"), held("2")]);
        assert_eq!(hub.resume_from(&hub.cursor(1)), Ok(Resume::After(1)));
        assert_eq!(hub.after(1, 10).len(), 1);
        hub.publish(&[held("3"), held("4"), held("5")]);
        assert_eq!(hub.resume_from(&hub.cursor(1)), Ok(Resume::Gone));
        assert_eq!(hub.resume_from(&hub.cursor(2)), Ok(Resume::After(2)));
        assert_eq!(hub.resume_from("other-run:2"), Ok(Resume::Gone));
        assert!(hub.resume_from("garbage").is_err());
        assert_eq!(hub.after(0, 10).len(), 3);
    }
}
