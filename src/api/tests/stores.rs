//! Stores for the API tests: [`Empty`] answers nothing (tests of the
//! socket alone), [`Failing`] is always away.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::api::Backend;
use crate::control::{Controls, Hub};
use crate::knowledge::{
    ActionRecord, ApprovalRecord, AuditRecord, HoldRecord, IncidentRecord, Knowledge, Query, Store,
    StoreError, SvidRecord,
};
use crate::model::Event;

/// A backend over [`Empty`].
pub(super) fn empty_backend() -> Backend {
    Backend {
        store: Arc::new(Empty),
        controls: Controls::resume(false, &[], &[], &[], Arc::new(tokio::sync::Notify::new())),
        hub: Hub::new(16),
        status: tokio::sync::watch::channel(crate::control::Status::default()).1,
        clock: Arc::new(crate::clock::ManualClock::at_unix(super::T0)),
        leader_epoch: None,
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
