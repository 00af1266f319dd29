//! Between the wire and the domain: request checks (sizes, paging, time
//! ranges), page tokens, the record kinds a listing pages through
//! ([`Paged`]), and store records and events as protobuf messages. Pure
//! functions; the handlers in [`super::rpc`] call them.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::future::BoxFuture;
use tonic::Status;

use crate::clock::unix_millis;
use crate::control::{ApprovalEntry, DemotedStep, SubjectState};
use crate::knowledge::{
    ActionRecord, ApprovalRecord, AuditRecord, HoldRecord, IncidentRecord, PageKey, Query, Store,
    StoreError,
};
use crate::model::{ApprovalState, Event, LOOP_ACTOR, SymptomKind};
use crate::proto::healer as pb;

/// Rows in a page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most rows in a page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Longest id (incident, approval, actuator, symptom) a request may carry.
pub const MAX_ID_BYTES: usize = 128;
/// Longest reason or comment.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest page token we hand out is far shorter; anything longer is not
/// ours.
pub const MAX_TOKEN_BYTES: usize = 512;
/// Longest `Watch` cursor (`<run id>:<seq>`).
pub const MAX_CURSOR_BYTES: usize = 128;
/// Most audit kinds in one filter.
pub const MAX_KINDS: usize = 32;

/// The audit kinds `ListAudit` filters on (`AuditRecord::kind`).
pub const AUDIT_KINDS: [&str; 15] = [
    "acted",
    "held",
    "pending",
    "approved",
    "rejected",
    "expired",
    "withdrawn",
    "used",
    "demoted",
    "demotion_reset",
    "paused",
    "resumed",
    "dry_run_on",
    "dry_run_off",
    "needs_operator",
];

// === Request checks ===

/// Checks a required id: non-empty, at most [`MAX_ID_BYTES`].
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field`.
pub fn required_id<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    optional_id(field, value).map(|_| value)
}

/// Checks an optional id filter; empty means none.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field` when it is over [`MAX_ID_BYTES`].
pub fn optional_id(field: &str, value: &str) -> Result<Option<String>, Status> {
    if value.len() > MAX_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_ID_BYTES}",
            value.len()
        )));
    }
    Ok((!value.is_empty()).then(|| value.to_string()))
}

/// Checks a reason or comment; empty means none.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field` when it is over [`MAX_REASON_BYTES`].
pub fn reason(field: &str, value: String) -> Result<Option<String>, Status> {
    if value.len() > MAX_REASON_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_REASON_BYTES}",
            value.len()
        )));
    }
    Ok((!value.is_empty()).then_some(value))
}

/// A symptom name.
///
/// # Errors
/// `INVALID_ARGUMENT` for a name no symptom has.
pub fn symptom(field: &str, value: &str) -> Result<SymptomKind, Status> {
    required_id(field, value)?;
    SymptomKind::parse(value).ok_or_else(|| {
        Status::invalid_argument(format!(
            "{field} {value:?} is not a symptom; known: {}",
            SymptomKind::ALL.map(SymptomKind::as_str).join(", ")
        ))
    })
}

/// Which listing a page token belongs to: a token from one listing is
/// refused by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Incidents,
    Actions,
    Holds,
    Approvals,
    Audit,
}

impl Listing {
    fn tag(self) -> &'static str {
        match self {
            Listing::Incidents => "i",
            Listing::Actions => "a",
            Listing::Holds => "h",
            Listing::Approvals => "p",
            Listing::Audit => "u",
        }
    }
}

/// The paging part of a list request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paging {
    /// Rows to answer.
    pub size: u32,
    /// Where the page starts.
    pub after: Option<PageKey>,
}

/// Checks `page_size` and decodes `page_token`.
///
/// # Errors
/// `INVALID_ARGUMENT` for a size over [`MAX_PAGE_SIZE`] (the message
/// names the bound) or a token that is not one of ours for `listing`.
pub fn paging(listing: Listing, page_size: u32, page_token: &str) -> Result<Paging, Status> {
    let size = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(Status::invalid_argument(format!(
                "page_size {n} is over the limit of {MAX_PAGE_SIZE}"
            )));
        }
        n => n,
    };
    let after = if page_token.is_empty() {
        None
    } else {
        Some(decode_token(listing, page_token).ok_or_else(|| {
            Status::invalid_argument("page_token is malformed: pass next_page_token as given")
        })?)
    };
    Ok(Paging { size, after })
}

/// The opaque token for the page after `key`: `<tag>:<at_ms>:<id>`,
/// base64url.
pub fn encode_token(listing: Listing, key: &PageKey) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}:{}", listing.tag(), key.at_ms, key.id))
}

fn decode_token(listing: Listing, token: &str) -> Option<PageKey> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    let mut parts = raw.splitn(3, ':');
    let (tag, at, id) = (parts.next()?, parts.next()?, parts.next()?);
    if tag != listing.tag() || id.len() > MAX_ID_BYTES {
        return None;
    }
    let at_ms: i64 = at.parse().ok()?;
    (at_ms >= 0).then(|| PageKey {
        at_ms,
        id: id.to_string(),
    })
}

/// Checks a `[since, until)` filter (0 = unbounded).
///
/// # Errors
/// `INVALID_ARGUMENT` for a negative time or `since` not before `until`.
pub fn range(since_ms: i64, until_ms: i64) -> Result<(Option<i64>, Option<i64>), Status> {
    if since_ms < 0 || until_ms < 0 {
        return Err(Status::invalid_argument(
            "since_unix_ms and until_unix_ms must not be negative",
        ));
    }
    if since_ms > 0 && until_ms > 0 && since_ms >= until_ms {
        return Err(Status::invalid_argument(
            "since_unix_ms must be before until_unix_ms",
        ));
    }
    Ok((
        (since_ms > 0).then_some(since_ms),
        (until_ms > 0).then_some(until_ms),
    ))
}

/// A store query for one page: one row more than the page, to tell
/// whether another follows.
pub fn page_query(paging: &Paging, base: Query) -> Query {
    Query {
        limit: paging.size + 1,
        page: paging.after.clone(),
        ..base
    }
}

/// Cuts the extra row off and returns the next page's token (empty when
/// this is the last page).
pub fn cut<T>(
    listing: Listing,
    paging: &Paging,
    rows: &mut Vec<T>,
    key: impl Fn(&T) -> PageKey,
) -> String {
    let size = paging.size as usize;
    if rows.len() <= size {
        return String::new();
    }
    rows.truncate(size);
    rows.last()
        .map(|last| encode_token(listing, &key(last)))
        .unwrap_or_default()
}

// === Page keys ===

/// A stored record kind a list RPC pages through: its listing, where the
/// page after a record starts, and the store's listing of the kind.
pub trait Paged: Sized {
    /// The listing its page tokens belong to.
    const LISTING: Listing;
    /// What the store lists (`incidents`, …), for errors.
    const WHAT: &'static str;
    /// Where the page after this record starts: its time and its id.
    fn key(&self) -> PageKey;
    /// The store's listing of this kind for `q`.
    fn list<'a>(store: &'a dyn Store, q: &'a Query)
    -> BoxFuture<'a, Result<Vec<Self>, StoreError>>;
}

/// Implements [`Paged`] for a record kind: its listing, the store method
/// that lists it, and the field its page key's time is.
macro_rules! paged {
    ($record:ty, $listing:ident, $list:ident, $at:ident) => {
        impl Paged for $record {
            const LISTING: Listing = Listing::$listing;
            const WHAT: &'static str = stringify!($list);
            fn key(&self) -> PageKey {
                PageKey {
                    at_ms: self.$at,
                    id: self.id.clone(),
                }
            }
            fn list<'a>(
                store: &'a dyn Store,
                q: &'a Query,
            ) -> BoxFuture<'a, Result<Vec<Self>, StoreError>> {
                store.$list(q)
            }
        }
    };
}

paged!(IncidentRecord, Incidents, incidents, opened_at_ms);
paged!(ActionRecord, Actions, actions, started_at_ms);
paged!(HoldRecord, Holds, holds, at_ms);
paged!(ApprovalRecord, Approvals, approvals, requested_at_ms);
paged!(AuditRecord, Audit, audit, at_ms);

// === Records ===

fn text(v: Option<&str>) -> String {
    v.unwrap_or_default().to_string()
}

fn json(v: Option<&serde_json::Value>) -> String {
    v.map(serde_json::Value::to_string).unwrap_or_default()
}

fn rung(r: i64) -> u32 {
    u32::try_from(r.max(0)).unwrap_or(u32::MAX)
}

/// An incident on the wire.
pub fn incident(r: IncidentRecord) -> pb::Incident {
    pb::Incident {
        evidence_json: r.evidence.to_string(),
        next_rung: rung(r.next_rung),
        id: r.id,
        symptom: r.symptom,
        subject: r.subject,
        severity: r.severity,
        opened_at_unix_ms: r.opened_at_ms,
        closed_at_unix_ms: r.closed_at_ms.unwrap_or(0),
        resolution: r.resolution.unwrap_or_default(),
        predicted_outage_unix_ms: r.predicted_outage_ms.unwrap_or(0),
        needs_operator: r.needs_operator.unwrap_or_default(),
    }
}

/// An action on the wire.
pub fn action(r: ActionRecord) -> pb::Action {
    pb::Action {
        params_json: r.params.to_string(),
        detail_json: json(r.detail.as_ref()),
        rung: rung(r.rung),
        id: r.id,
        incident_id: r.incident_id,
        symptom: r.symptom,
        actuator: r.actuator,
        target: r.target,
        dry_run: r.dry_run,
        started_at_unix_ms: r.started_at_ms,
        finished_at_unix_ms: r.finished_at_ms.unwrap_or(0),
        outcome: r.outcome.unwrap_or_default(),
        error: r.error.unwrap_or_default(),
        verification: r.verification.unwrap_or_default(),
        verified_at_unix_ms: r.verified_at_ms.unwrap_or(0),
    }
}

/// A hold on the wire.
pub fn hold(r: HoldRecord) -> pb::Hold {
    pb::Hold {
        incident_id: r.incident_id,
        actuator: r.actuator,
        target: r.target,
        reason: r.reason,
        at_unix_ms: r.at_ms,
    }
}

fn approval_state(s: ApprovalState) -> pb::ApprovalState {
    match s {
        ApprovalState::Pending => pb::ApprovalState::Pending,
        ApprovalState::Approved => pb::ApprovalState::Approved,
        ApprovalState::Rejected => pb::ApprovalState::Rejected,
        ApprovalState::Expired => pb::ApprovalState::Expired,
        ApprovalState::Used => pb::ApprovalState::Used,
        ApprovalState::Withdrawn => pb::ApprovalState::Withdrawn,
    }
}

/// A stored approval on the wire. When the controls hold a newer state
/// for it (decided since the loop last recorded), that state wins.
pub fn approval(r: ApprovalRecord, live: Option<ApprovalEntry>) -> pb::Approval {
    if let Some(live) = live {
        return approval_entry(live);
    }
    let state = ApprovalState::parse(&r.state)
        .map(approval_state)
        .unwrap_or(pb::ApprovalState::Unspecified);
    pb::Approval {
        rung: rung(r.rung),
        id: r.id,
        incident_id: r.incident_id,
        symptom: r.symptom,
        actuator: r.actuator,
        target: r.target,
        state: state.into(),
        requested_at_unix_ms: r.requested_at_ms,
        expires_at_unix_ms: r.expires_at_ms,
        decided_by: r.decided_by.unwrap_or_default(),
        decided_at_unix_ms: r.decided_at_ms.unwrap_or(0),
        reason: r.reason.unwrap_or_default(),
        action_id: r.action_id.unwrap_or_default(),
    }
}

/// An approval as the controls hold it, on the wire.
pub fn approval_entry(e: ApprovalEntry) -> pb::Approval {
    let a = e.approval;
    pb::Approval {
        id: a.id,
        incident_id: a.incident_id,
        symptom: a.symptom.as_str().to_string(),
        rung: u32::try_from(a.rung).unwrap_or(u32::MAX),
        actuator: a.actuator,
        target: a.target,
        state: approval_state(e.state).into(),
        requested_at_unix_ms: unix_millis(a.requested_at),
        expires_at_unix_ms: unix_millis(a.expires_at),
        decided_by: e.decided_by.unwrap_or_default(),
        decided_at_unix_ms: crate::control::ms(e.decided_at),
        reason: e.reason.unwrap_or_default(),
        action_id: e.action_id.unwrap_or_default(),
    }
}

/// An audit entry on the wire.
pub fn audit(r: AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        detail_json: r.detail.to_string(),
        id: r.id,
        at_unix_ms: r.at_ms,
        kind: r.kind,
        actor: r.actor,
        incident_id: r.incident_id.unwrap_or_default(),
        action_id: r.action_id.unwrap_or_default(),
        approval_id: r.approval_id.unwrap_or_default(),
        symptom: r.symptom.unwrap_or_default(),
        actuator: r.actuator.unwrap_or_default(),
        target: r.target.unwrap_or_default(),
        reason: r.reason.unwrap_or_default(),
    }
}

/// A demoted step on the wire.
pub fn demotion(d: DemotedStep) -> pb::Demotion {
    pb::Demotion {
        symptom: d.symptom.as_str().to_string(),
        actuator: d.actuator,
        verified: d.verified,
        runs: d.runs,
        demoted_at_unix_ms: unix_millis(d.at),
    }
}

/// A subject's state on the wire.
pub fn subject_state(s: SubjectState) -> pb::SubjectState {
    match s {
        SubjectState::Ok => pb::SubjectState::Ok,
        SubjectState::Degraded => pb::SubjectState::Degraded,
        SubjectState::Failing => pb::SubjectState::Failing,
        SubjectState::Blind => pb::SubjectState::Blind,
    }
}

// === Events ===

/// A watch event of `kind` at `at`, by the loop: what every event carries.
fn event(kind: &str, at: SystemTime) -> pb::WatchEvent {
    pb::WatchEvent {
        at_unix_ms: unix_millis(at),
        kind: kind.to_string(),
        actor: LOOP_ACTOR.to_string(),
        ..Default::default()
    }
}

/// A recorded event as `Watch` streams it (without its cursor); `None` for
/// the sightings `Watch` leaves out.
pub fn watch_event(e: &Event) -> Option<pb::WatchEvent> {
    let ev = match e {
        Event::SubjectSeen { .. }
        | Event::SvidSeen { .. }
        | Event::SvidReplaced { .. }
        | Event::AgentIdentified(_) => return None,
        Event::IncidentOpened { incident: i } => pb::WatchEvent {
            incident_id: i.id.clone(),
            symptom: i.kind.as_str().into(),
            subject: i.subject.to_string(),
            reason: i.severity.as_str().into(),
            detail_json: serde_json::json!({
                "severity": i.severity.as_str(),
                "predicted_outage_unix_ms": crate::control::ms(i.predicted_outage),
                "evidence": i.evidence,
            })
            .to_string(),
            ..event("incident_opened", i.opened_at)
        },
        Event::IncidentClosed { id, at, resolution } => pb::WatchEvent {
            incident_id: id.clone(),
            reason: resolution.clone(),
            ..event("incident_closed", *at)
        },
        Event::IncidentEscalated { id, next_rung } => pb::WatchEvent {
            kind: "incident_escalated".into(),
            incident_id: id.clone(),
            actor: LOOP_ACTOR.to_string(),
            detail_json: serde_json::json!({ "next_rung": next_rung }).to_string(),
            ..Default::default()
        },
        Event::IncidentNeedsOperator { id, reason, at } => pb::WatchEvent {
            incident_id: id.clone(),
            reason: reason.clone(),
            ..event("needs_operator", *at)
        },
        Event::ActionStarted { step, at } => pb::WatchEvent {
            incident_id: step.incident_id.clone(),
            action_id: step.action_id.clone(),
            symptom: step.symptom.as_str().into(),
            actuator: step.actuator.clone(),
            target: step.target.clone(),
            detail_json: serde_json::json!({
                "rung": step.rung,
                "params": step.params,
                "dry_run": step.dry_run,
            })
            .to_string(),
            ..event("action_started", *at)
        },
        Event::ActionFinished { id, outcome, at } => pb::WatchEvent {
            action_id: id.clone(),
            reason: outcome.kind.as_str().into(),
            detail_json: serde_json::json!({
                "detail": outcome.detail,
                "error": outcome.error,
            })
            .to_string(),
            ..event("action_finished", *at)
        },
        Event::ActionVerified {
            id,
            verification,
            at,
        } => pb::WatchEvent {
            action_id: id.clone(),
            reason: verification.as_str().into(),
            ..event("action_verified", *at)
        },
        Event::Held {
            incident_id,
            actuator,
            target,
            reason,
            at,
        } => pb::WatchEvent {
            incident_id: incident_id.clone(),
            actuator: actuator.clone(),
            target: target.clone(),
            reason: reason.clone(),
            ..event("held", *at)
        },
        Event::ApprovalRequested { approval: a } => pb::WatchEvent {
            incident_id: a.incident_id.clone(),
            approval_id: a.id.clone(),
            symptom: a.symptom.as_str().into(),
            actuator: a.actuator.clone(),
            target: a.target.clone(),
            detail_json: serde_json::json!({
                "rung": a.rung,
                "expires_at_unix_ms": unix_millis(a.expires_at),
            })
            .to_string(),
            ..event(ApprovalState::Pending.as_str(), a.requested_at)
        },
        Event::ApprovalDecided {
            id,
            state,
            by,
            reason,
            action_id,
            at,
        } => pb::WatchEvent {
            approval_id: id.clone(),
            action_id: text(action_id.as_deref()),
            reason: text(reason.as_deref()),
            actor: by.clone().unwrap_or_else(|| LOOP_ACTOR.to_string()),
            ..event(state.as_str(), *at)
        },
        Event::ControlChanged {
            change,
            by,
            reason,
            at,
            ..
        } => pb::WatchEvent {
            reason: text(reason.as_deref()),
            actor: by.clone(),
            ..event(change.as_str(), *at)
        },
        Event::Demoted {
            symptom,
            actuator,
            verified,
            runs,
            at,
        } => pb::WatchEvent {
            symptom: symptom.as_str().into(),
            actuator: actuator.clone(),
            detail_json: serde_json::json!({ "verified": verified, "runs": runs }).to_string(),
            ..event("demoted", *at)
        },
        Event::DemotionReset {
            symptom,
            actuator,
            by,
            at,
            ..
        } => pb::WatchEvent {
            symptom: symptom.as_str().into(),
            actuator: actuator.clone(),
            actor: by.clone(),
            ..event("demotion_reset", *at)
        },
    };
    Some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_belong_to_one_listing() {
        let key = PageKey {
            at_ms: 1_700_000_000_123,
            id: "0190a7f0-0000-7000-8000-00000000000a".into(),
        };
        let token = encode_token(Listing::Incidents, &key);
        let p = paging(Listing::Incidents, 0, &token).unwrap();
        assert_eq!(p.size, DEFAULT_PAGE_SIZE);
        assert_eq!(p.after, Some(key.clone()));
        assert!(paging(Listing::Holds, 0, &token).is_err());
        // An id with colons survives (only the first two split).
        let odd = PageKey {
            at_ms: 5,
            id: "a:b:c".into(),
        };
        let token = encode_token(Listing::Audit, &odd);
        assert_eq!(paging(Listing::Audit, 1, &token).unwrap().after, Some(odd));
        // Not base64; "i:-1:i" (a negative time); "i::i" (no time).
        for bad in ["x", "aTotMTpp", "aTo6aQ"] {
            assert!(paging(Listing::Incidents, 0, bad).is_err(), "{bad}");
        }
        assert_eq!(
            paging(Listing::Audit, MAX_PAGE_SIZE, "").unwrap().size,
            1000
        );
        let err = paging(Listing::Audit, MAX_PAGE_SIZE + 1, "").unwrap_err();
        assert!(err.message().contains("1000"), "{err}");
    }

    #[test]
    fn a_page_of_n_asks_for_n_plus_one_and_cuts() {
        let p = Paging {
            size: 2,
            after: None,
        };
        assert_eq!(page_query(&p, Query::default()).limit, 3);
        let key = |n: &i64| PageKey {
            at_ms: *n,
            id: n.to_string(),
        };
        let mut rows = vec![30, 20, 10];
        let token = cut(Listing::Actions, &p, &mut rows, key);
        assert_eq!(rows, vec![30, 20]);
        assert_eq!(
            paging(Listing::Actions, 2, &token).unwrap().after,
            Some(key(&20))
        );
        let mut rows = vec![30, 20];
        assert_eq!(cut(Listing::Actions, &p, &mut rows, key), "");
    }

    #[test]
    fn ranges_and_strings_are_bounded() {
        assert_eq!(range(0, 0).unwrap(), (None, None));
        assert_eq!(range(5, 10).unwrap(), (Some(5), Some(10)));
        assert!(range(10, 10).is_err());
        assert!(range(-1, 0).is_err());
        assert!(required_id("id", "").is_err());
        assert!(required_id("id", &"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(required_id("id", &"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert_eq!(reason("reason", String::new()).unwrap(), None);
        assert!(reason("reason", "r".repeat(MAX_REASON_BYTES + 1)).is_err());
        assert!(symptom("symptom", "agent_unreachable").is_ok());
        assert!(symptom("symptom", "nope").is_err());
    }

    #[test]
    fn sightings_are_not_watched() {
        let e = Event::SubjectSeen {
            subject: crate::model::Subject::agent("a"),
            at: std::time::UNIX_EPOCH,
        };
        assert_eq!(watch_event(&e), None);
    }
}
