//! Knowledge store: SQLite (embedded default, WAL) or PostgreSQL, one schema
//! (`migrations/sqlite`, `migrations/postgres`), one contract test suite.
//!
//! The supervisor writes [`Event`]s in batches through [`Buffer`], which keeps
//! them in memory (bounded) while the database is away and retries; it reads
//! [`Knowledge`] once at start so cooldowns, budgets and open incidents survive
//! a restart.

mod buffer;
pub mod frames;
pub mod leadership;
mod list;
mod postgres;
pub mod retention;
mod run;
pub mod scope_lock;
mod spool;
mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

pub use buffer::Buffer;
pub use postgres::PostgresStore;
pub use spool::{Replay, ReplayError, Replayed, Spool, SpoolError, open_and_replay};
pub use sqlite::SqliteStore;

use crate::model::{AgentIdentity, Event, Incident};

/// Errors at the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Could not connect or the connection dropped.
    #[error("database unreachable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Applying migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
    /// A stored value could not be decoded.
    #[error("stored value is malformed: {0}")]
    Corrupt(String),
    /// The database URL or path is unusable, or the server refused our
    /// login or database name: the configuration must change. The message
    /// says which.
    #[error("{0}")]
    Config(String),
    /// Another instance holds the scope (see [`scope_lock`]).
    #[error("store in use: {0}")]
    InUse(String),
    /// A listing's arguments cannot be used (a page key that no row of
    /// that listing could have given). The message says which.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// A fenced write found another leader's epoch: this instance lost its
    /// leadership and must not record (or start) anything.
    #[error(
        "leadership {name:?} moved on: this instance led under epoch {ours}, the store now holds {}",
        current.map_or_else(|| "no epoch".to_string(), |c| format!("epoch {c}"))
    )]
    Fenced {
        /// Leadership name.
        name: String,
        /// Our epoch.
        ours: i64,
        /// The stored epoch (none: the row is gone).
        current: Option<i64>,
    },
}

impl StoreError {
    /// Closed-set label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Migrate(_) => "migrate",
            StoreError::Query(_) => "query",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Config(_) => "config",
            StoreError::InUse(_) => "in_use",
            StoreError::InvalidQuery(_) => "invalid_query",
            StoreError::Fenced { .. } => "fenced",
        }
    }

    /// Classifies an sqlx error: I/O, pool and protocol failures mean the
    /// database is away; the rest are query errors.
    pub fn from_sqlx(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            other => StoreError::Query(other),
        }
    }
}

/// One stored incident.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncidentRecord {
    pub id: String,
    /// Symptom name.
    pub symptom: String,
    /// Subject (display form).
    pub subject: String,
    /// `warning` or `critical`.
    pub severity: String,
    /// Opened (unix ms, UTC).
    pub opened_at_ms: i64,
    /// Closed (unix ms, UTC), if closed.
    pub closed_at_ms: Option<i64>,
    /// Why it closed.
    pub resolution: Option<String>,
    /// Predicted outage (unix ms, UTC).
    pub predicted_outage_ms: Option<i64>,
    /// Evidence JSON.
    pub evidence: serde_json::Value,
    /// Next ladder rung.
    pub next_rung: i64,
    /// Why an operator must act, when the ladder has nothing left.
    pub needs_operator: Option<String>,
    /// When that was decided (unix ms).
    pub needs_operator_at_ms: Option<i64>,
}

/// One stored action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionRecord {
    pub id: String,
    /// Incident served.
    pub incident_id: String,
    /// Symptom served.
    pub symptom: String,
    /// Ladder rung.
    pub rung: i64,
    /// Actuator instance name.
    pub actuator: String,
    /// Target agent.
    pub target: String,
    /// Parameters JSON.
    pub params: serde_json::Value,
    /// Recorded, not executed (`dry_run` in the config).
    pub dry_run: bool,
    /// Started (unix ms).
    pub started_at_ms: i64,
    /// Finished (unix ms).
    pub finished_at_ms: Option<i64>,
    /// `ok`, `error`, `timeout`, `dry_run`, `held`.
    pub outcome: Option<String>,
    /// Outcome details JSON.
    pub detail: Option<serde_json::Value>,
    /// Error text.
    pub error: Option<String>,
    /// `verified`, `failed`, `skipped`.
    pub verification: Option<String>,
    /// Verified at (unix ms).
    pub verified_at_ms: Option<i64>,
}

/// One stored SVID lifecycle row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SvidRecord {
    /// Agent name.
    pub agent: String,
    pub spiffe_id: String,
    /// Serial (hex).
    pub serial: String,
    /// notBefore (unix ms).
    pub not_before_ms: i64,
    /// notAfter (unix ms).
    pub not_after_ms: i64,
    /// First delivery (unix ms).
    pub first_seen_ms: i64,
    /// Replaced (unix ms).
    pub replaced_at_ms: Option<i64>,
}

/// One "held back, because" decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HoldRecord {
    /// Stable row id (decimal digits), unique per hold: the tie-breaker of
    /// its [`PageKey`].
    pub id: String,
    /// Incident.
    pub incident_id: String,
    /// Actuator held back.
    pub actuator: String,
    /// Target agent.
    pub target: String,
    /// Why it was held back (a `HoldReason`, snake_case).
    pub reason: String,
    /// When (unix ms).
    pub at_ms: i64,
}

/// One stored approval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalRecord {
    pub id: String,
    pub incident_id: String,
    /// Symptom name.
    pub symptom: String,
    pub rung: i64,
    pub actuator: String,
    pub target: String,
    /// An [`ApprovalState`](crate::model::ApprovalState) name.
    pub state: String,
    pub requested_at_ms: i64,
    pub expires_at_ms: i64,
    /// Who approved or rejected it.
    pub decided_by: Option<String>,
    /// When its state last changed from pending or approved.
    pub decided_at_ms: Option<i64>,
    /// The operator's reason or comment.
    pub reason: Option<String>,
    /// The action it became.
    pub action_id: Option<String>,
}

/// One decision, as `spire-healer audit` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Unique per decision (derived from the event, so a re-applied batch
    /// writes nothing twice).
    pub id: String,
    pub at_ms: i64,
    /// `acted`, `held`, `pending`, `approved`, `rejected`, `expired`,
    /// `withdrawn`, `used`, `demoted`, `demotion_reset`, `paused`,
    /// `resumed`, `dry_run_on`, `dry_run_off`, `needs_operator`.
    pub kind: String,
    /// [`LOOP_ACTOR`](crate::model::LOOP_ACTOR) or an operator's principal.
    pub actor: String,
    pub incident_id: Option<String>,
    pub action_id: Option<String>,
    pub approval_id: Option<String>,
    pub symptom: Option<String>,
    pub actuator: Option<String>,
    pub target: Option<String>,
    /// A hold reason, an operator's reason, …
    pub reason: Option<String>,
    /// Anything else (JSON object; `{}` when nothing).
    pub detail: serde_json::Value,
}

/// A (symptom, actuator) step demoted and not yet reset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemotionRecord {
    pub symptom: String,
    pub actuator: String,
    pub verified: u32,
    pub runs: u32,
    pub demoted_at_ms: i64,
}

/// The last change of one control (pause, dry run).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlRecord {
    pub change: crate::model::ControlChange,
    pub by: String,
    pub reason: Option<String>,
    pub at_ms: i64,
}

/// One verdict of a (symptom, actuator) step, for the demotion window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerdictRecord {
    pub symptom: String,
    pub actuator: String,
    /// `verified` (true) or `failed` (false); skipped runs are not verdicts.
    pub verified: bool,
    /// When it was judged.
    pub at_ms: i64,
}

/// What the supervisor needs from history at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Knowledge {
    /// Incidents not yet closed.
    pub open_incidents: Vec<Incident>,
    /// Actions started at or after the `since` passed to `load_knowledge`.
    pub recent_actions: Vec<ActionRecord>,
    /// Every agent SPIFFE ID learned so far, mapped to its configured name.
    pub agent_identities: Vec<AgentIdentity>,
    /// The last change of each control (at most one per control: `pause`
    /// first, then `dry_run`). "Last" is the order the changes were
    /// applied, which is the order they were made.
    pub controls: Vec<ControlRecord>,
    /// Approvals still pending or approved and not used, oldest request
    /// first.
    pub approvals: Vec<ApprovalRecord>,
    /// Demotions not reset, oldest first.
    pub demotions: Vec<DemotionRecord>,
    /// Verdicts (`verified` or `failed` verifications; `skipped` is none)
    /// per (symptom, actuator), judged at or after the pair's last demotion
    /// reset: at most the last [`VERDICT_WINDOW`] per pair. Grouped by
    /// pair (by symptom, then actuator), oldest first within a pair.
    pub verdicts: Vec<VerdictRecord>,
}

/// Most verdicts per (symptom, actuator) `load_knowledge` returns.
pub const VERDICT_WINDOW: usize = 100;

/// Where a page starts: strictly older than this row (newest first).
///
/// Listings are ordered by (time column, id), newest first; the time
/// column is `opened_at_ms` for incidents, `started_at_ms` for actions,
/// `at_ms` for holds and audit, `requested_at_ms` for approvals. The next
/// page is the rows strictly below the last row's pair, so a listing walked
/// page by page shows every row once, ties on time included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageKey {
    /// The last row's time column.
    pub at_ms: i64,
    /// The last row's id (ties on time). For holds, the decimal
    /// [`HoldRecord::id`]; anything else there is
    /// [`StoreError::InvalidQuery`].
    pub id: String,
}

/// Filter for listing. Fields a listing does not name are ignored by it.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only open incidents (incidents), only not replaced (svids), only
    /// pending approvals (approvals).
    pub open_only: bool,
    /// Only this incident's rows (actions, holds, approvals, audit).
    pub incident_id: Option<String>,
    /// At most this many rows, newest first; 0 means 100.
    pub limit: u32,
    /// Rows strictly older than this key (the next page). Not for svids.
    pub page: Option<PageKey>,
    /// Rows whose time column is at or after this (unix ms). Not for svids.
    pub since_ms: Option<i64>,
    /// Rows whose time column is before this (unix ms). Not for svids.
    pub until_ms: Option<i64>,
    /// Only this symptom (incidents).
    pub symptom: Option<String>,
    /// Only these kinds (audit); empty: all.
    pub kinds: Vec<String>,
    /// Only the row with this id (approvals).
    pub id: Option<String>,
}

/// What a store without a leadership table answers.
fn no_leadership(backend: &str) -> StoreError {
    StoreError::Config(format!("the {backend} store keeps no leadership"))
}

/// The knowledge store.
#[async_trait]
pub trait Store: Send + Sync {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Applies a batch atomically, in order. Each event is idempotent by its
    /// ids, so re-applying a batch after an unknown outcome is safe. Every
    /// decision event also writes its [`AuditRecord`], in the same
    /// transaction.
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError>;
    /// What the supervisor resumes from, every part bounded: open
    /// incidents, actions started since `since` (oldest first), every agent
    /// identity (oldest sighting first), the last change of each control,
    /// approvals still pending or approved, demotions not reset, and the
    /// verdict window of each (symptom, actuator) (see
    /// [`Knowledge::verdicts`]). A row that does not parse is skipped with
    /// a warning naming it.
    async fn load_knowledge(&self, since: SystemTime) -> Result<Knowledge, StoreError>;
    /// Incidents, newest first by `opened_at_ms`. Uses `open_only`,
    /// `symptom`, `since_ms`, `until_ms`, `page`, `limit`.
    async fn incidents(&self, q: &Query) -> Result<Vec<IncidentRecord>, StoreError>;
    /// Actions, newest first by `started_at_ms`. Uses `incident_id`,
    /// `since_ms`, `until_ms`, `page`, `limit`.
    async fn actions(&self, q: &Query) -> Result<Vec<ActionRecord>, StoreError>;
    /// SVID lifecycles, newest first. Uses `open_only` and `limit`.
    async fn svids(&self, q: &Query) -> Result<Vec<SvidRecord>, StoreError>;
    /// Hold decisions, newest first by `at_ms`. Uses `incident_id`,
    /// `since_ms`, `until_ms`, `page`, `limit`.
    async fn holds(&self, q: &Query) -> Result<Vec<HoldRecord>, StoreError>;
    /// One incident by id; `None` when there is none.
    async fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError>;
    /// Approvals, newest first by `requested_at_ms`. Uses `open_only`
    /// (pending only), `incident_id`, `since_ms`, `until_ms`, `page`,
    /// `limit`.
    async fn approvals(&self, q: &Query) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// Decisions, newest first by `at_ms`. Uses `incident_id`, `kinds`,
    /// `since_ms`, `until_ms`, `page`, `limit`.
    async fn audit(&self, q: &Query) -> Result<Vec<AuditRecord>, StoreError>;
    /// Cheap liveness check.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Fences every later [`Store::apply`] (see [`leadership`]): each checks,
    /// in its own transaction, that the leadership row still holds this
    /// epoch, and stamps the actions it starts with it. `None` unfences.
    fn set_fence(&self, _fence: Option<leadership::Fence>) {}
    /// Takes the leadership `name` for `holder` over a pooled connection:
    /// bumps its epoch and sets its expiry `lease` ahead. Returns the new
    /// epoch (see [`leadership::pg_take`]).
    async fn take_leadership(
        &self,
        _name: &str,
        _holder: &str,
        _lease: Duration,
    ) -> Result<i64, StoreError> {
        Err(no_leadership(self.backend()))
    }
    /// Renews `fence`'s expiry `lease` ahead; `false` when another leader
    /// took over since.
    async fn renew_leadership(
        &self,
        _fence: &leadership::Fence,
        _lease: Duration,
    ) -> Result<bool, StoreError> {
        Err(no_leadership(self.backend()))
    }
    /// The leadership row `name`, if any.
    async fn leadership(
        &self,
        _name: &str,
    ) -> Result<Option<leadership::LeadershipRecord>, StoreError> {
        Err(no_leadership(self.backend()))
    }
}

/// Opens an existing store for reading (`incidents`, `actions`): never
/// creates a SQLite file, never migrates; a location without our schema is
/// an error naming it.
///
/// # Errors
/// [`StoreError::Config`] when there is no spire-healer store there;
/// `Unavailable` when the database cannot be reached.
pub async fn open_existing(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect_existing(url).await?))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Ok(Arc::new(
            SqliteStore::open_existing(std::path::Path::new(path)).await?,
        ))
    }
}

/// Opens the store named by `url`: `postgres://…`/`postgresql://…` selects
/// PostgreSQL, `sqlite://PATH` or a bare path selects SQLite (file created,
/// WAL). Applies migrations.
///
/// # Errors
/// [`StoreError::Config`] for an unusable location, `Unavailable` when the
/// database cannot be reached, `Migrate` when the schema cannot be applied.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url).await?))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Ok(Arc::new(
            SqliteStore::open(std::path::Path::new(path)).await?,
        ))
    }
}
