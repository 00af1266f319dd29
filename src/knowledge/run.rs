//! What each event writes, shared by both backends.
//!
//! A batch is applied as runs of consecutive same-kind events, in batch
//! order: a backend writes one run with one statement (or one per event)
//! and never reorders events of different kinds, whose effects may depend
//! on each other (an action finishes after it started). [`runs`] cuts a
//! batch into those runs and turns each event into the column values it
//! stores, so the two backends cannot drift apart on what a column holds;
//! they differ only in how they send the rows.
//!
//! The audit trail is derived here too: every decision event (an action
//! started, a hold, a needs-operator verdict, an approval's every state, a
//! control change, a demotion and its reset) also becomes an [`Audit`] row,
//! written after its run's own rows in the same transaction.

use sha2::{Digest, Sha256};

use crate::clock::unix_millis;
use crate::model::{ApprovalState, Event, LOOP_ACTOR};

/// The runs of `events`, in order, each with its audit rows.
pub(super) fn runs(events: &[Event]) -> impl Iterator<Item = Rows<'_>> {
    events
        .chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b))
        .filter_map(|run| {
            Some(Rows {
                run: Run::of(run)?,
                audit: run.iter().filter_map(Audit::of).collect(),
            })
        })
}

/// What one run writes: its own rows, then its audit rows (after them, so
/// an audit row can read context its run just wrote).
pub(super) struct Rows<'a> {
    pub run: Run<'a>,
    pub audit: Vec<Audit<'a>>,
}

/// One run: the rows of consecutive events of one kind.
pub(super) enum Run<'a> {
    SubjectSeen(Vec<SubjectSeen<'a>>),
    SvidSeen(Vec<SvidSeen<'a>>),
    SvidReplaced(Vec<SvidReplaced<'a>>),
    IncidentOpened(Vec<IncidentOpened<'a>>),
    IncidentClosed(Vec<IncidentClosed<'a>>),
    IncidentEscalated(Vec<IncidentEscalated<'a>>),
    ActionStarted(Vec<ActionStarted<'a>>),
    ActionFinished(Vec<ActionFinished<'a>>),
    ActionVerified(Vec<ActionVerified<'a>>),
    Held(Vec<Held<'a>>),
    IncidentNeedsOperator(Vec<IncidentNeedsOperator<'a>>),
    AgentIdentified(Vec<AgentIdentified<'a>>),
    ApprovalRequested(Vec<ApprovalRequested<'a>>),
    ApprovalDecided(Vec<ApprovalDecided<'a>>),
    ControlChanged(Vec<ControlChanged<'a>>),
    Demoted(Vec<Demoted<'a>>),
    DemotionReset(Vec<DemotionReset<'a>>),
}

impl<'a> Run<'a> {
    /// `None` for an empty slice; otherwise `run` holds one kind of event
    /// (as [`runs`] cuts it) and every event becomes a row.
    fn of(run: &'a [Event]) -> Option<Self> {
        Some(match run.first()? {
            Event::SubjectSeen { .. } => Self::SubjectSeen(rows(run, SubjectSeen::of)),
            Event::SvidSeen { .. } => Self::SvidSeen(rows(run, SvidSeen::of)),
            Event::SvidReplaced { .. } => Self::SvidReplaced(rows(run, SvidReplaced::of)),
            Event::IncidentOpened { .. } => Self::IncidentOpened(rows(run, IncidentOpened::of)),
            Event::IncidentClosed { .. } => Self::IncidentClosed(rows(run, IncidentClosed::of)),
            Event::IncidentEscalated { .. } => {
                Self::IncidentEscalated(rows(run, IncidentEscalated::of))
            }
            Event::ActionStarted { .. } => Self::ActionStarted(rows(run, ActionStarted::of)),
            Event::ActionFinished { .. } => Self::ActionFinished(rows(run, ActionFinished::of)),
            Event::ActionVerified { .. } => Self::ActionVerified(rows(run, ActionVerified::of)),
            Event::Held { .. } => Self::Held(rows(run, Held::of)),
            Event::IncidentNeedsOperator { .. } => {
                Self::IncidentNeedsOperator(rows(run, IncidentNeedsOperator::of))
            }
            Event::AgentIdentified(_) => Self::AgentIdentified(rows(run, AgentIdentified::of)),
            Event::ApprovalRequested { .. } => {
                Self::ApprovalRequested(rows(run, ApprovalRequested::of))
            }
            Event::ApprovalDecided { .. } => Self::ApprovalDecided(rows(run, ApprovalDecided::of)),
            Event::ControlChanged { .. } => Self::ControlChanged(rows(run, ControlChanged::of)),
            Event::Demoted { .. } => Self::Demoted(rows(run, Demoted::of)),
            Event::DemotionReset { .. } => Self::DemotionReset(rows(run, DemotionReset::of)),
        })
    }
}

fn rows<'a, T>(run: &'a [Event], row: fn(&'a Event) -> Option<T>) -> Vec<T> {
    run.iter().filter_map(row).collect()
}

// === Rows ===
//
// Times are Unix milliseconds, counts `int8`, enums their stored names.

/// `subjects`: re-seeing a subject widens `[first_seen, last_seen]`.
pub(super) struct SubjectSeen<'a> {
    pub subject: String,
    pub kind: &'static str,
    pub agent: &'a str,
    pub at_ms: i64,
}

impl<'a> SubjectSeen<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::SubjectSeen { subject, at } = e else {
            return None;
        };
        Some(Self {
            subject: subject.to_string(),
            kind: subject.kind(),
            agent: subject.agent_name(),
            at_ms: unix_millis(*at),
        })
    }
}

/// `svid_lifecycles`: a serial's first delivery; a known one is kept.
pub(super) struct SvidSeen<'a> {
    pub agent: &'a str,
    pub spiffe_id: &'a str,
    pub serial: &'a str,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub at_ms: i64,
}

impl<'a> SvidSeen<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::SvidSeen {
            agent,
            spiffe_id,
            serial,
            not_before,
            not_after,
            at,
        } = e
        else {
            return None;
        };
        Some(Self {
            agent,
            spiffe_id,
            serial,
            not_before_ms: unix_millis(*not_before),
            not_after_ms: unix_millis(*not_after),
            at_ms: unix_millis(*at),
        })
    }
}

/// The distinct `(agent, SPIFFE ID)` pairs of `pairs`, in first-seen order:
/// the `svid_names` rows a run of [`SvidSeen`] needs.
pub(super) fn distinct_pairs<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> Vec<(&'a str, &'a str)> {
    let mut seen = std::collections::HashSet::new();
    pairs.filter(|p| seen.insert(*p)).collect()
}

/// `svid_lifecycles.replaced_at_ms`: the first replacement wins.
pub(super) struct SvidReplaced<'a> {
    pub agent: &'a str,
    pub spiffe_id: &'a str,
    pub serial: &'a str,
    pub at_ms: i64,
}

impl<'a> SvidReplaced<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::SvidReplaced {
            agent,
            spiffe_id,
            serial,
            at,
        } = e
        else {
            return None;
        };
        Some(Self {
            agent,
            spiffe_id,
            serial,
            at_ms: unix_millis(*at),
        })
    }
}

/// `incidents`: a new incident; a known id is kept.
pub(super) struct IncidentOpened<'a> {
    pub id: &'a str,
    pub symptom: &'static str,
    pub subject: String,
    pub severity: &'static str,
    pub opened_at_ms: i64,
    pub predicted_outage_ms: Option<i64>,
    pub evidence: &'a serde_json::Value,
    pub next_rung: i64,
}

impl<'a> IncidentOpened<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::IncidentOpened { incident: i } = e else {
            return None;
        };
        Some(Self {
            id: &i.id,
            symptom: i.kind.as_str(),
            subject: i.subject.to_string(),
            severity: i.severity.as_str(),
            opened_at_ms: unix_millis(i.opened_at),
            predicted_outage_ms: i.predicted_outage.map(unix_millis),
            evidence: &i.evidence,
            next_rung: to_i64(i.next_rung),
        })
    }
}

/// `incidents.closed_at_ms`: the first close wins.
pub(super) struct IncidentClosed<'a> {
    pub id: &'a str,
    pub at_ms: i64,
    pub resolution: &'a str,
}

impl<'a> IncidentClosed<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::IncidentClosed { id, at, resolution } = e else {
            return None;
        };
        Some(Self {
            id,
            at_ms: unix_millis(*at),
            resolution,
        })
    }
}

/// `incidents.next_rung`: the last escalation wins.
pub(super) struct IncidentEscalated<'a> {
    pub id: &'a str,
    pub next_rung: i64,
}

impl<'a> IncidentEscalated<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::IncidentEscalated { id, next_rung } = e else {
            return None;
        };
        Some(Self {
            id,
            next_rung: to_i64(*next_rung),
        })
    }
}

/// `actions`: recorded before acting; a known id is kept.
pub(super) struct ActionStarted<'a> {
    pub id: &'a str,
    pub incident_id: &'a str,
    pub symptom: &'static str,
    pub rung: i64,
    pub actuator: &'a str,
    pub target: &'a str,
    pub params: &'a serde_json::Value,
    pub dry_run: bool,
    pub started_at_ms: i64,
}

impl<'a> ActionStarted<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::ActionStarted { step, at } = e else {
            return None;
        };
        Some(Self {
            id: &step.action_id,
            incident_id: &step.incident_id,
            symptom: step.symptom.as_str(),
            rung: to_i64(step.rung),
            actuator: &step.actuator,
            target: &step.target,
            params: &step.params,
            dry_run: step.dry_run,
            started_at_ms: unix_millis(*at),
        })
    }
}

/// `actions.finished_at_ms` and the outcome: the first finish wins.
pub(super) struct ActionFinished<'a> {
    pub id: &'a str,
    pub at_ms: i64,
    pub outcome: &'static str,
    pub detail: &'a serde_json::Value,
    pub error: Option<&'a str>,
}

impl<'a> ActionFinished<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::ActionFinished { id, outcome, at } = e else {
            return None;
        };
        Some(Self {
            id,
            at_ms: unix_millis(*at),
            outcome: outcome.kind.as_str(),
            detail: &outcome.detail,
            error: outcome.error.as_deref(),
        })
    }
}

/// `actions.verification`: the first verdict wins.
pub(super) struct ActionVerified<'a> {
    pub id: &'a str,
    pub verification: &'static str,
    pub at_ms: i64,
}

impl<'a> ActionVerified<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::ActionVerified {
            id,
            verification,
            at,
        } = e
        else {
            return None;
        };
        Some(Self {
            id,
            verification: verification.as_str(),
            at_ms: unix_millis(*at),
        })
    }
}

/// `holds`: an action held back; a known hold is kept.
pub(super) struct Held<'a> {
    pub incident_id: &'a str,
    pub actuator: &'a str,
    pub target: &'a str,
    pub reason: &'a str,
    pub at_ms: i64,
}

impl<'a> Held<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::Held {
            incident_id,
            actuator,
            target,
            reason,
            at,
        } = e
        else {
            return None;
        };
        Some(Self {
            incident_id,
            actuator,
            target,
            reason,
            at_ms: unix_millis(*at),
        })
    }
}

/// `incidents.needs_operator` and its time: the last verdict wins, as for
/// escalations.
pub(super) struct IncidentNeedsOperator<'a> {
    pub id: &'a str,
    pub reason: &'a str,
    pub at_ms: i64,
}

impl<'a> IncidentNeedsOperator<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::IncidentNeedsOperator { id, reason, at } = e else {
            return None;
        };
        Some(Self {
            id,
            reason,
            at_ms: unix_millis(*at),
        })
    }
}

/// `agent_identities`: re-learning a known SPIFFE ID widens
/// `[first_seen, last_seen]`; the sighting with the latest time (the later
/// one in batch order on a tie) sets `agent` and `source`.
pub(super) struct AgentIdentified<'a> {
    pub spiffe_id: &'a str,
    pub agent: &'a str,
    pub source: &'static str,
    pub at_ms: i64,
}

impl<'a> AgentIdentified<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::AgentIdentified(id) = e else {
            return None;
        };
        Some(Self {
            spiffe_id: &id.spiffe_id,
            agent: &id.agent,
            source: id.source.as_str(),
            at_ms: unix_millis(id.at),
        })
    }
}

/// `approvals`: a step waiting for a person; a known id is kept.
pub(super) struct ApprovalRequested<'a> {
    pub id: &'a str,
    pub incident_id: &'a str,
    pub symptom: &'static str,
    pub rung: i64,
    pub actuator: &'a str,
    pub target: &'a str,
    /// Always `pending`.
    pub state: &'static str,
    pub requested_at_ms: i64,
    pub expires_at_ms: i64,
}

impl<'a> ApprovalRequested<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::ApprovalRequested { approval: a } = e else {
            return None;
        };
        Some(Self {
            id: &a.id,
            incident_id: &a.incident_id,
            symptom: a.symptom.as_str(),
            rung: to_i64(a.rung),
            actuator: &a.actuator,
            target: &a.target,
            state: ApprovalState::Pending.as_str(),
            requested_at_ms: unix_millis(a.requested_at),
            expires_at_ms: unix_millis(a.expires_at),
        })
    }
}

/// `approvals.state` and the decision: applied only when it moves the
/// state forward (the stored state's rank `< rank`), so a final state is never
/// overwritten and a re-applied or late event is a no-op. `decided_by`,
/// `reason` and `action_id` keep their value when the event has none (the
/// loop's `used` keeps the approver); `decided_at_ms` is the last change.
/// An unknown id changes nothing.
pub(super) struct ApprovalDecided<'a> {
    pub id: &'a str,
    pub state: &'static str,
    /// 0 pending, 1 approved, 2 final: the state may only rise.
    pub rank: i64,
    pub by: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub action_id: Option<&'a str>,
    pub at_ms: i64,
}

/// Applies one [`ApprovalDecided`], binding `state`, `by`, `reason`,
/// `action_id`, `rank`, `at_ms`, `id` as `$1`…`$7`. The same SQL on both
/// backends.
pub(super) const APPROVAL_DECIDED_SQL: &str = "UPDATE approvals SET state = $1, \
     decided_by = coalesce($2, decided_by), reason = coalesce($3, reason), \
     action_id = coalesce($4, action_id), decided_at_ms = $6 \
     WHERE id = $7 AND $5 > CASE state WHEN 'pending' THEN 0 WHEN 'approved' THEN 1 ELSE 2 END";

fn state_rank(state: ApprovalState) -> i64 {
    match state {
        ApprovalState::Pending => 0,
        ApprovalState::Approved => 1,
        ApprovalState::Rejected
        | ApprovalState::Expired
        | ApprovalState::Used
        | ApprovalState::Withdrawn => 2,
    }
}

impl<'a> ApprovalDecided<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::ApprovalDecided {
            id,
            state,
            by,
            reason,
            action_id,
            at,
        } = e
        else {
            return None;
        };
        Some(Self {
            id,
            state: state.as_str(),
            rank: state_rank(*state),
            by: by.as_deref(),
            reason: reason.as_deref(),
            action_id: action_id.as_deref(),
            at_ms: unix_millis(*at),
        })
    }
}

/// `control_changes`: appended in batch order; a known id is kept.
pub(super) struct ControlChanged<'a> {
    pub id: &'a str,
    /// `pause` or `dry_run`.
    pub control: &'static str,
    pub change: &'static str,
    pub by: &'a str,
    pub reason: Option<&'a str>,
    pub at_ms: i64,
}

impl<'a> ControlChanged<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::ControlChanged {
            id,
            change,
            by,
            reason,
            at,
        } = e
        else {
            return None;
        };
        Some(Self {
            id,
            control: change.control(),
            change: change.as_str(),
            by,
            reason: reason.as_deref(),
            at_ms: unix_millis(*at),
        })
    }
}

/// `demotions`: a new open demotion, unless the pair has one open
/// already; a known (symptom, actuator, time) is kept.
pub(super) struct Demoted<'a> {
    pub symptom: &'static str,
    pub actuator: &'a str,
    pub verified: i64,
    pub runs: i64,
    pub at_ms: i64,
}

/// Applies one [`Demoted`], binding `symptom`, `actuator`, `verified`,
/// `runs`, `at_ms` as `$1`…`$5`.
pub(super) const DEMOTED_SQL: &str = "INSERT INTO demotions \
     (symptom, actuator, verified, runs, demoted_at_ms) \
     SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM demotions \
       WHERE symptom = $1 AND actuator = $2 AND reset_at_ms IS NULL) \
     ON CONFLICT DO NOTHING";

impl<'a> Demoted<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::Demoted {
            symptom,
            actuator,
            verified,
            runs,
            at,
        } = e
        else {
            return None;
        };
        Some(Self {
            symptom: symptom.as_str(),
            actuator,
            verified: i64::from(*verified),
            runs: i64::from(*runs),
            at_ms: unix_millis(*at),
        })
    }
}

/// `demotions.reset_at_ms`: closes the pair's open demotion if it began at
/// or before the reset (a re-applied old reset leaves a newer demotion
/// alone).
pub(super) struct DemotionReset<'a> {
    pub symptom: &'static str,
    pub actuator: &'a str,
    pub by: &'a str,
    pub at_ms: i64,
}

/// Applies one [`DemotionReset`], binding `symptom`, `actuator`, `at_ms`,
/// `by` as `$1`…`$4`.
pub(super) const DEMOTION_RESET_SQL: &str = "UPDATE demotions \
     SET reset_at_ms = $3, reset_by = $4 \
     WHERE symptom = $1 AND actuator = $2 AND reset_at_ms IS NULL AND demoted_at_ms <= $3";

impl<'a> DemotionReset<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Event::DemotionReset {
            symptom,
            actuator,
            by,
            at,
            ..
        } = e
        else {
            return None;
        };
        Some(Self {
            symptom: symptom.as_str(),
            actuator,
            by,
            at_ms: unix_millis(*at),
        })
    }
}

// === Audit ===

/// `audit`: one row per decision; a known id is kept. Context the event
/// does not carry is filled by the backend from the approval (incident,
/// symptom, actuator, target) and the incident (symptom).
pub(super) struct Audit<'a> {
    /// `<kind>:<natural key>`: the same event always gives the same id.
    pub id: String,
    pub at_ms: i64,
    pub kind: &'static str,
    pub actor: &'a str,
    pub incident_id: Option<&'a str>,
    pub action_id: Option<&'a str>,
    pub approval_id: Option<&'a str>,
    pub symptom: Option<&'static str>,
    pub actuator: Option<&'a str>,
    pub target: Option<&'a str>,
    pub reason: Option<&'a str>,
    /// A JSON object.
    pub detail: serde_json::Value,
}

impl<'a> Audit<'a> {
    /// The audit row of a decision event; `None` for the others (and for
    /// an `ApprovalDecided` to `pending`, which decides nothing).
    fn of(e: &'a Event) -> Option<Self> {
        let empty = || serde_json::Value::Object(serde_json::Map::new());
        let row = |id: String, at, kind| Self {
            id,
            at_ms: unix_millis(at),
            kind,
            actor: LOOP_ACTOR,
            incident_id: None,
            action_id: None,
            approval_id: None,
            symptom: None,
            actuator: None,
            target: None,
            reason: None,
            detail: empty(),
        };
        Some(match e {
            Event::ActionStarted { step, at } => {
                let approval_id = step.params.get("approval_id").and_then(|v| v.as_str());
                let mut detail = serde_json::json!({ "dry_run": step.dry_run });
                if let Some(id) = approval_id {
                    detail["approval_id"] = id.into();
                }
                Self {
                    incident_id: Some(&step.incident_id),
                    action_id: Some(&step.action_id),
                    approval_id,
                    symptom: Some(step.symptom.as_str()),
                    actuator: Some(&step.actuator),
                    target: Some(&step.target),
                    detail,
                    ..row(format!("acted:{}", step.action_id), *at, "acted")
                }
            }
            Event::Held {
                incident_id,
                actuator,
                target,
                reason,
                at,
            } => {
                let key = digest(&[
                    incident_id,
                    actuator,
                    target,
                    reason,
                    &unix_millis(*at).to_string(),
                ]);
                Self {
                    incident_id: Some(incident_id),
                    actuator: Some(actuator),
                    target: Some(target),
                    reason: Some(reason),
                    ..row(format!("held:{key}"), *at, "held")
                }
            }
            Event::IncidentNeedsOperator { id, reason, at } => Self {
                incident_id: Some(id),
                reason: Some(reason),
                ..row(
                    format!("needs_operator:{id}:{}", unix_millis(*at)),
                    *at,
                    "needs_operator",
                )
            },
            Event::ApprovalRequested { approval: a } => Self {
                incident_id: Some(&a.incident_id),
                approval_id: Some(&a.id),
                symptom: Some(a.symptom.as_str()),
                actuator: Some(&a.actuator),
                target: Some(&a.target),
                detail: serde_json::json!({
                    "rung": a.rung,
                    "expires_at_ms": unix_millis(a.expires_at),
                }),
                ..row(format!("pending:{}", a.id), a.requested_at, "pending")
            },
            Event::ApprovalDecided {
                id,
                state,
                by,
                reason,
                action_id,
                at,
            } => {
                let actor = match state {
                    ApprovalState::Pending => return None,
                    ApprovalState::Approved | ApprovalState::Rejected => {
                        by.as_deref().unwrap_or(LOOP_ACTOR)
                    }
                    ApprovalState::Expired | ApprovalState::Used | ApprovalState::Withdrawn => {
                        LOOP_ACTOR
                    }
                };
                Self {
                    actor,
                    approval_id: Some(id),
                    action_id: action_id.as_deref(),
                    reason: reason.as_deref(),
                    ..row(format!("{}:{id}", state.as_str()), *at, state.as_str())
                }
            }
            Event::ControlChanged {
                id,
                change,
                by,
                reason,
                at,
            } => Self {
                actor: by,
                reason: reason.as_deref(),
                ..row(format!("{}:{id}", change.as_str()), *at, change.as_str())
            },
            Event::Demoted {
                symptom,
                actuator,
                verified,
                runs,
                at,
            } => Self {
                symptom: Some(symptom.as_str()),
                actuator: Some(actuator),
                detail: serde_json::json!({ "verified": verified, "runs": runs }),
                ..row(
                    format!(
                        "demoted:{}:{}",
                        unix_millis(*at),
                        digest(&[symptom.as_str(), actuator])
                    ),
                    *at,
                    "demoted",
                )
            },
            Event::DemotionReset {
                id,
                symptom,
                actuator,
                by,
                at,
            } => Self {
                actor: by,
                symptom: Some(symptom.as_str()),
                actuator: Some(actuator),
                ..row(format!("demotion_reset:{id}"), *at, "demotion_reset")
            },
            Event::SubjectSeen { .. }
            | Event::SvidSeen { .. }
            | Event::SvidReplaced { .. }
            | Event::IncidentOpened { .. }
            | Event::IncidentClosed { .. }
            | Event::IncidentEscalated { .. }
            | Event::ActionFinished { .. }
            | Event::ActionVerified { .. }
            | Event::AgentIdentified(_) => return None,
        })
    }
}

/// 32 hex digits of SHA-256 over length-prefixed `parts`: a short natural
/// key for free text (hold reasons, actuator names) that no choice of
/// separator could make ambiguous.
fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Ladder rungs are small; saturate rather than wrap.
pub(super) fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The ids of the actions `events` start: what a fenced write stamps with
/// its epoch.
pub(super) fn started_ids(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ActionStarted { step, .. } => Some(step.action_id.clone()),
            _ => None,
        })
        .collect()
}
