//! What each event writes, shared by both backends.
//!
//! A batch is applied as runs of consecutive same-kind events, in batch
//! order: a backend writes one run with one statement (or one per event)
//! and never reorders events of different kinds, whose effects may depend
//! on each other (an action finishes after it started). [`runs`] cuts a
//! batch into those runs and turns each event into the column values it
//! stores, so the two backends cannot drift apart on what a column holds;
//! they differ only in how they send the rows.

use crate::clock::unix_millis;
use crate::model::Event;

/// The runs of `events`, in order.
pub(super) fn runs(events: &[Event]) -> impl Iterator<Item = Run<'_>> {
    events
        .chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b))
        .filter_map(Run::of)
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
            // SKELETON: the operator-control events are not stored yet.
            _ => return None,
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

/// Ladder rungs are small; saturate rather than wrap.
pub(super) fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
