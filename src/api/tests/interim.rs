//! Stores for the API tests.
//!
//! [`Interim`] wraps the SQLite store and filters its listings by the
//! [`Query`] (paging, time range, symptom) in memory as well, and answers
//! `incident`, `approvals` and `audit` from the events it applied where the
//! store does not (yet) answer them itself. Filtering twice is harmless,
//! so the tests hold whichever way the store answers.
//!
//! [`Empty`] answers nothing; for tests of the socket alone.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;

use crate::api::Backend;
use crate::clock::unix_millis;
use crate::control::{Controls, Hub};
use crate::knowledge::{
    ActionRecord, ApprovalRecord, AuditRecord, HoldRecord, IncidentRecord, Knowledge, PageKey,
    Query, Store, StoreError, SvidRecord,
};
use crate::model::{ApprovalState, Event};

use super::super::convert;

/// A backend over [`Empty`].
pub(super) fn empty_backend() -> Backend {
    Backend {
        store: Arc::new(Empty),
        controls: Controls::resume(false, &[], &[], &[], Arc::new(tokio::sync::Notify::new())),
        hub: Hub::new(16),
        status: tokio::sync::watch::channel(crate::control::Status::default()).1,
        clock: Arc::new(crate::clock::ManualClock::at_unix(super::T0)),
    }
}

fn not_built(e: &StoreError) -> bool {
    matches!(e, StoreError::Corrupt(m) if m.ends_with("not built yet"))
}

/// The rows of one page of `q`, newest first by `key`.
fn window<T>(mut rows: Vec<T>, q: &Query, key: impl Fn(&T) -> PageKey) -> Vec<T> {
    let order = |k: &PageKey| (k.at_ms, k.id.clone());
    rows.retain(|r| {
        let k = key(r);
        q.since_ms.is_none_or(|s| k.at_ms >= s)
            && q.until_ms.is_none_or(|u| k.at_ms < u)
            && q.page.as_ref().is_none_or(|p| order(&k) < order(p))
    });
    rows.sort_by_key(|r| std::cmp::Reverse(order(&key(r))));
    rows.truncate(if q.limit == 0 { 100 } else { q.limit as usize });
    rows
}

/// Everything `q` filters on, but every row of it.
fn wide(q: &Query) -> Query {
    Query {
        limit: 100_000,
        page: None,
        since_ms: None,
        until_ms: None,
        ..q.clone()
    }
}

/// The SQLite store, filtered again in memory; see the module doc.
pub(super) struct Interim {
    inner: Arc<dyn Store>,
    applied: Mutex<Vec<Event>>,
}

impl Interim {
    pub(super) fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            applied: Mutex::new(Vec::new()),
        }
    }

    fn applied_approvals(&self) -> Vec<ApprovalRecord> {
        let mut out: Vec<ApprovalRecord> = Vec::new();
        for e in self.applied.lock().unwrap().iter() {
            match e {
                Event::ApprovalRequested { approval: a } => out.push(ApprovalRecord {
                    id: a.id.clone(),
                    incident_id: a.incident_id.clone(),
                    symptom: a.symptom.as_str().into(),
                    rung: a.rung as i64,
                    actuator: a.actuator.clone(),
                    target: a.target.clone(),
                    state: ApprovalState::Pending.as_str().into(),
                    requested_at_ms: unix_millis(a.requested_at),
                    expires_at_ms: unix_millis(a.expires_at),
                    decided_by: None,
                    decided_at_ms: None,
                    reason: None,
                    action_id: None,
                }),
                Event::ApprovalDecided {
                    id,
                    state,
                    by,
                    reason,
                    action_id,
                    at,
                } => {
                    if let Some(r) = out.iter_mut().find(|r| &r.id == id) {
                        r.state = state.as_str().into();
                        if by.is_some() {
                            r.decided_by.clone_from(by);
                            r.reason.clone_from(reason);
                        }
                        r.decided_at_ms = Some(unix_millis(*at));
                        if action_id.is_some() {
                            r.action_id.clone_from(action_id);
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[async_trait]
impl Store for Interim {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        self.inner.apply(events).await?;
        self.applied.lock().unwrap().extend_from_slice(events);
        Ok(())
    }

    async fn load_knowledge(&self, since: SystemTime) -> Result<Knowledge, StoreError> {
        self.inner.load_knowledge(since).await
    }

    async fn incidents(&self, q: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
        let mut rows = self.inner.incidents(&wide(q)).await?;
        if let Some(s) = &q.symptom {
            rows.retain(|r| &r.symptom == s);
        }
        Ok(window(rows, q, convert::incident_key))
    }

    async fn actions(&self, q: &Query) -> Result<Vec<ActionRecord>, StoreError> {
        let rows = self.inner.actions(&wide(q)).await?;
        Ok(window(rows, q, convert::action_key))
    }

    async fn svids(&self, q: &Query) -> Result<Vec<SvidRecord>, StoreError> {
        self.inner.svids(q).await
    }

    async fn holds(&self, q: &Query) -> Result<Vec<HoldRecord>, StoreError> {
        let rows = self.inner.holds(&wide(q)).await?;
        Ok(window(rows, q, convert::hold_key))
    }

    async fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError> {
        match self.inner.incident(id).await {
            Err(e) if not_built(&e) => Ok(self
                .inner
                .incidents(&wide(&Query::default()))
                .await?
                .into_iter()
                .find(|r| r.id == id)),
            other => other,
        }
    }

    async fn approvals(&self, q: &Query) -> Result<Vec<ApprovalRecord>, StoreError> {
        let rows = match self.inner.approvals(&wide(q)).await {
            Err(e) if not_built(&e) => {
                let mut rows = self.applied_approvals();
                rows.retain(|r| {
                    (!q.open_only || r.state == ApprovalState::Pending.as_str())
                        && q.incident_id.as_ref().is_none_or(|i| &r.incident_id == i)
                });
                rows
            }
            other => other?,
        };
        Ok(window(rows, q, convert::approval_key))
    }

    async fn audit(&self, q: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        match self.inner.audit(&wide(q)).await {
            Err(e) if not_built(&e) => Ok(Vec::new()),
            other => Ok(window(other?, q, convert::audit_key)),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// A store with nothing in it.
pub(super) struct Empty;

#[async_trait]
impl Store for Empty {
    fn backend(&self) -> &'static str {
        "empty"
    }

    async fn apply(&self, _: &[Event]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn load_knowledge(&self, _: SystemTime) -> Result<Knowledge, StoreError> {
        Ok(Knowledge::default())
    }

    async fn incidents(&self, _: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn actions(&self, _: &Query) -> Result<Vec<ActionRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn svids(&self, _: &Query) -> Result<Vec<SvidRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn holds(&self, _: &Query) -> Result<Vec<HoldRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn incident(&self, _: &str) -> Result<Option<IncidentRecord>, StoreError> {
        Ok(None)
    }

    async fn approvals(&self, _: &Query) -> Result<Vec<ApprovalRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn audit(&self, _: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store that is away.
pub(super) struct Failing;

fn away() -> StoreError {
    StoreError::Unavailable(sqlx::Error::PoolClosed)
}

#[async_trait]
impl Store for Failing {
    fn backend(&self) -> &'static str {
        "failing"
    }

    async fn apply(&self, _: &[Event]) -> Result<(), StoreError> {
        Err(away())
    }

    async fn load_knowledge(&self, _: SystemTime) -> Result<Knowledge, StoreError> {
        Err(away())
    }

    async fn incidents(&self, _: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
        Err(away())
    }

    async fn actions(&self, _: &Query) -> Result<Vec<ActionRecord>, StoreError> {
        Err(away())
    }

    async fn svids(&self, _: &Query) -> Result<Vec<SvidRecord>, StoreError> {
        Err(away())
    }

    async fn holds(&self, _: &Query) -> Result<Vec<HoldRecord>, StoreError> {
        Err(away())
    }

    async fn incident(&self, _: &str) -> Result<Option<IncidentRecord>, StoreError> {
        Err(away())
    }

    async fn approvals(&self, _: &Query) -> Result<Vec<ApprovalRecord>, StoreError> {
        Err(away())
    }

    async fn audit(&self, _: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        Err(away())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Err(away())
    }
}
