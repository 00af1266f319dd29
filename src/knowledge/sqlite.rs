//! SQLite backend: one local file in WAL mode, the embedded default.
//!
//! Writes take the write lock up front (`BEGIN IMMEDIATE`), so two writers
//! queue on the busy timeout instead of failing with `SQLITE_BUSY` when a
//! deferred transaction tries to upgrade. Inserts are sent as multi-row
//! statements (the benchmark target is 50,000 rows/s); updates are rare and go
//! one statement per event, which also keeps their in-batch order exact.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, SqlSafeStr, Sqlite};

use super::list::{self, Arg, Listing, limit};
use super::run::{self, Run, runs, started_ids};
use super::{
    ActionRecord, ApprovalRecord, AuditRecord, ControlRecord, DemotionRecord, HoldRecord,
    IncidentRecord, Knowledge, Query, Store, StoreError, SvidRecord, VERDICT_WINDOW, VerdictRecord,
};
use crate::clock::{from_unix_millis, unix_millis};
use crate::model::{
    AgentIdentity, ControlChange, Event, IdentitySource, Incident, Severity, Subject, SymptomKind,
};

/// Embedded migrations, in order. `tests.rs` checks that this list matches
/// `migrations/sqlite/` file for file.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "needs_operator_and_agent_identities",
        include_str!("../../migrations/sqlite/0002_needs_operator_and_agent_identities.sql"),
    ),
    (
        3,
        "operator_controls",
        include_str!("../../migrations/sqlite/0003_operator_controls.sql"),
    ),
    (
        4,
        "replay_frames",
        include_str!("../../migrations/sqlite/0004_replay_frames.sql"),
    ),
    (
        5,
        "retention_and_svid_names",
        include_str!("../../migrations/sqlite/0005_retention_and_svid_names.sql"),
    ),
    (
        6,
        "leadership",
        include_str!("../../migrations/sqlite/0006_leadership.sql"),
    ),
    (
        7,
        "held_outcome",
        include_str!("../../migrations/sqlite/0007_held_outcome.sql"),
    ),
];

/// How long a writer waits for another writer's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// One writer at a time anyway (WAL); a few more for concurrent readers.
const MAX_CONNECTIONS: u32 = 4;
/// SQLite's default `SQLITE_MAX_VARIABLE_NUMBER` since 3.32.
const MAX_PARAMS: usize = 32_766;
/// Rows per multi-row INSERT; bigger statements gain little and cost parse
/// time and memory.
const MAX_ROWS_PER_STATEMENT: usize = 256;

type SqliteQuery = sqlx::query::Query<'static, Sqlite, SqliteArguments>;

/// The knowledge store in a local SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Set by a leader: every write checks its epoch (see
    /// [`super::leadership`]).
    fence: std::sync::Arc<std::sync::RwLock<Option<super::leadership::Fence>>>,
}

// SELECT lists shared by the listing and loading queries; `concat!` keeps
// every statement a `&'static str`.
macro_rules! incident_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, symptom, subject, severity, opened_at_ms, closed_at_ms, resolution, \
             predicted_outage_ms, evidence, next_rung, needs_operator, needs_operator_at_ms \
             FROM incidents ",
            $rest
        )
    };
}
macro_rules! action_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, incident_id, symptom, rung, actuator, target, params, dry_run, \
             started_at_ms, finished_at_ms, outcome, detail, error, verification, \
             verified_at_ms FROM actions ",
            $rest
        )
    };
}
macro_rules! svid_select {
    ($rest:literal) => {
        concat!(
            "SELECT n.agent, n.spiffe_id, s.serial, s.not_before_ms, s.not_after_ms, \
             s.first_seen_ms, s.replaced_at_ms \
             FROM svid_lifecycles s JOIN svid_names n ON n.id = s.name_id ",
            $rest
        )
    };
}
macro_rules! hold_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, incident_id, actuator, target, reason, at_ms FROM holds ",
            $rest
        )
    };
}
macro_rules! audit_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, at_ms, kind, actor, incident_id, action_id, approval_id, symptom, \
             actuator, target, reason, detail FROM audit ",
            $rest
        )
    };
}
/// Every identity, oldest sighting first: a caller that inserts them in
/// order into a map ends with the latest.
const IDENTITIES_SELECT: &str = "SELECT spiffe_id, agent, source, last_seen_ms \
     FROM agent_identities ORDER BY last_seen_ms, spiffe_id";

// === impl SqliteStore ===

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and applies
    /// migrations. `:memory:` opens a private in-memory database on a single
    /// connection, for tests.
    ///
    /// # Errors
    /// [`StoreError::Config`], naming the path, when its directory is missing
    /// or the file cannot be opened or created; [`StoreError::Migrate`] when
    /// the schema cannot be applied.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let in_memory = path == Path::new(":memory:");
        // temp_store: a multi-row INSERT … ON CONFLICT keeps a statement
        // journal, by default in a temp file; in memory, inserts into a
        // large table ran about 1.5x faster. Bounded by one statement.
        let base = SqliteConnectOptions::new()
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("temp_store", "memory");
        let (options, pool) = if in_memory {
            // Every connection would see its own empty database: keep one
            // forever.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
            (base.in_memory(true), pool)
        } else {
            check_location(path).await?;
            let options = base
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // WAL + NORMAL: a power loss may roll back the last
                // commits but never corrupts; a process crash loses nothing.
                .synchronous(SqliteSynchronous::Normal)
                // New SVID lifecycles land all over their unique key (one
                // spot per agent and SPIFFE ID), so a 5,000-row batch
                // dirties thousands of pages. A 16 MiB page cache and
                // checkpoints every 32 MiB of WAL (not 4) keep pages that
                // batches share from being re-read and re-written (about
                // +30 % on a table of 400,000 SVIDs, measured with the
                // wider key of migration 0001). The WAL file is trimmed
                // back to 64 MiB after a checkpoint.
                .pragma("cache_size", "-16384")
                .pragma("wal_autocheckpoint", "8192")
                .pragma("journal_size_limit", "67108864");
            let pool = SqlitePoolOptions::new().max_connections(MAX_CONNECTIONS);
            (options, pool)
        };
        let pool = pool.connect_with(options).await.map_err(|e| {
            StoreError::Config(format!(
                "cannot open SQLite database {}: {e}",
                path.display()
            ))
        })?;
        migrator().run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Self {
            pool,
            fence: std::sync::Arc::default(),
        })
    }

    /// Opens an existing database file for reading: never creates it, never
    /// migrates it, and refuses a file without our current schema.
    ///
    /// # Errors
    /// [`StoreError::Config`], naming the path, when the file is missing or
    /// is not a spire-healer store at this version.
    pub async fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Config(format!(
                "no spire-healer store at {} (the file does not exist)",
                path.display()
            )));
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .create_if_missing(false)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Config(format!(
                    "cannot open SQLite database {}: {e}",
                    path.display()
                ))
            })?;
        let version: Option<i64> = sqlx::query("SELECT max(version) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .ok()
            .and_then(|r| r.try_get(0).ok());
        let want = MIGRATIONS.last().map(|m| m.0);
        if version != want {
            return Err(StoreError::Config(format!(
                "{} is not a spire-healer store at schema {} (found {})",
                path.display(),
                want.unwrap_or(0),
                version.map_or("none".to_string(), |v| v.to_string())
            )));
        }
        Ok(Self {
            pool,
            fence: std::sync::Arc::default(),
        })
    }

    /// The underlying pool: for the replay frames (`knowledge::frames`),
    /// and for tests that inspect or corrupt rows directly.
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Fails early, naming the path, when the file cannot possibly be created:
/// SQLite's own error ("unable to open database file") names neither.
async fn check_location(path: &Path) -> Result<(), StoreError> {
    if path.as_os_str().is_empty() {
        return Err(StoreError::Config("SQLite path is empty".into()));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match tokio::fs::metadata(&dir).await {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StoreError::Config(format!(
                "cannot open SQLite database {}: {} is not a directory",
                path.display(),
                dir.display()
            )));
        }
        Err(e) => {
            return Err(StoreError::Config(format!(
                "cannot open SQLite database {}: directory {}: {e}",
                path.display(),
                dir.display()
            )));
        }
    }
    if tokio::fs::metadata(path).await.is_ok_and(|m| m.is_dir()) {
        return Err(StoreError::Config(format!(
            "cannot open SQLite database {}: it is a directory",
            path.display()
        )));
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::from_sqlx)?;
        let fence = self.fence.read().map(|f| f.clone()).unwrap_or(None);
        if let Some(fence) = &fence {
            super::leadership::sqlite_check(&mut tx, fence).await?;
        }
        for rows in runs(events) {
            apply_run(&mut tx, rows.run).await?;
            if !rows.audit.is_empty() {
                audit_rows(&mut tx, &rows.audit).await?;
            }
        }
        if let Some(fence) = &fence {
            super::leadership::sqlite_stamp(&mut tx, fence, &started_ids(events)).await?;
        }
        tx.commit().await.map_err(StoreError::from_sqlx)
    }

    async fn load_knowledge(&self, since: SystemTime) -> Result<Knowledge, StoreError> {
        // One read transaction: every part from the same snapshot.
        let mut conn = self.pool.begin().await.map_err(StoreError::from_sqlx)?;
        let rows = sqlx::query(incident_select!(
            "WHERE closed_at_ms IS NULL ORDER BY opened_at_ms, id"
        ))
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::from_sqlx)?;
        let mut open_incidents = Vec::with_capacity(rows.len());
        for row in &rows {
            let record = incident_record(row)?;
            match incident_from_record(&record) {
                Ok(incident) => open_incidents.push(incident),
                // One bad row must not keep the supervisor from starting; the
                // symptom, if still present, opens a fresh incident.
                Err(problem) => {
                    tracing::warn!(incident = %record.id, %problem, "Skipping unreadable open incident.");
                }
            }
        }
        let rows = sqlx::query(action_select!(
            "WHERE started_at_ms >= ? ORDER BY started_at_ms, id"
        ))
        .bind(unix_millis(since))
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::from_sqlx)?;
        let recent_actions = rows.iter().map(action_record).collect::<Result<_, _>>()?;
        let rows = sqlx::query(IDENTITIES_SELECT)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
        let mut agent_identities = Vec::with_capacity(rows.len());
        for row in &rows {
            let source: String = col(row, "source")?;
            agent_identities.extend(identity_from_columns(
                col(row, "spiffe_id")?,
                col(row, "agent")?,
                &source,
                col(row, "last_seen_ms")?,
            ));
        }

        let mut controls = Vec::with_capacity(list::CONTROLS.len());
        for control in list::CONTROLS {
            let row = sqlx::query(list::LAST_CONTROL_CHANGE)
                .bind(control)
                .fetch_optional(&mut *conn)
                .await
                .map_err(StoreError::from_sqlx)?;
            if let Some(row) = row {
                controls.extend(control_from_columns(
                    control,
                    &col::<String>(&row, "change")?,
                    col(&row, "changed_by")?,
                    col(&row, "reason")?,
                    col(&row, "at_ms")?,
                ));
            }
        }
        let rows = sqlx::query(list::LIVE_APPROVALS)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
        let approvals = rows.iter().map(approval_record).collect::<Result<_, _>>()?;
        let rows = sqlx::query(list::OPEN_DEMOTIONS)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
        let demotions = rows.iter().map(demotion_record).collect::<Result<_, _>>()?;
        let verdicts = verdicts(&mut conn).await?;
        conn.commit().await.map_err(StoreError::from_sqlx)?;
        Ok(Knowledge {
            open_incidents,
            recent_actions,
            agent_identities,
            controls,
            approvals,
            demotions,
            verdicts,
        })
    }

    async fn incidents(&self, q: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
        let rows = self.list(incident_select!(""), list::incidents(q)?).await?;
        rows.iter().map(incident_record).collect()
    }

    async fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError> {
        let row = sqlx::query(incident_select!("WHERE id = ?"))
            .bind(id.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from_sqlx)?;
        row.as_ref().map(incident_record).transpose()
    }

    async fn actions(&self, q: &Query) -> Result<Vec<ActionRecord>, StoreError> {
        let rows = self.list(action_select!(""), list::actions(q)?).await?;
        rows.iter().map(action_record).collect()
    }

    /// `open_only` lists only serials not yet replaced.
    async fn svids(&self, q: &Query) -> Result<Vec<SvidRecord>, StoreError> {
        let query = if q.open_only {
            sqlx::query(svid_select!(
                "WHERE s.replaced_at_ms IS NULL \
                 ORDER BY s.first_seen_ms DESC, n.agent DESC, n.spiffe_id DESC, s.serial DESC \
                 LIMIT ?"
            ))
        } else {
            sqlx::query(svid_select!(
                "ORDER BY s.first_seen_ms DESC, n.agent DESC, n.spiffe_id DESC, s.serial DESC \
                 LIMIT ?"
            ))
        };
        let rows = query
            .bind(limit(q))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_sqlx)?;
        rows.iter().map(svid_record).collect()
    }

    async fn holds(&self, q: &Query) -> Result<Vec<HoldRecord>, StoreError> {
        let rows = self.list(hold_select!(""), list::holds(q)?).await?;
        rows.iter().map(hold_record).collect()
    }

    async fn approvals(&self, q: &Query) -> Result<Vec<ApprovalRecord>, StoreError> {
        let rows = self
            .list(list::APPROVAL_SELECT, list::approvals(q)?)
            .await?;
        rows.iter().map(approval_record).collect()
    }

    async fn audit(&self, q: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self.list(audit_select!(""), list::audit(q)?).await?;
        rows.iter().map(audit_record).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(StoreError::from_sqlx)
    }

    fn set_fence(&self, fence: Option<super::leadership::Fence>) {
        if let Ok(mut f) = self.fence.write() {
            *f = fence;
        }
    }

    async fn take_leadership(
        &self,
        name: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<i64, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::from_sqlx)?;
        let epoch = super::leadership::sqlite_take(&mut tx, name, holder, lease, now_ms()).await?;
        tx.commit().await.map_err(StoreError::from_sqlx)?;
        Ok(epoch)
    }

    async fn renew_leadership(
        &self,
        fence: &super::leadership::Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::from_sqlx)?;
        super::leadership::sqlite_renew(&mut conn, fence, lease, now_ms()).await
    }

    async fn leadership(
        &self,
        name: &str,
    ) -> Result<Option<super::leadership::LeadershipRecord>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::from_sqlx)?;
        super::leadership::sqlite_read(&mut conn, name, now_ms()).await
    }
}

/// Unix milliseconds now: SQLite's leadership expiry (one host, one clock).
#[allow(clippy::disallowed_methods)]
fn now_ms() -> i64 {
    crate::clock::unix_millis(std::time::SystemTime::now())
}

impl SqliteStore {
    /// Runs a listing after `select` (`SELECT … FROM table `).
    async fn list(&self, select: &str, l: Listing) -> Result<Vec<SqliteRow>, StoreError> {
        // Built from our constants and `$n` placeholders only.
        let sql = AssertSqlSafe(format!("{select}{}", l.sql));
        let query = l
            .args
            .into_iter()
            .fold(sqlx::query(sql), |q, arg| match arg {
                Arg::Int(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
            });
        query
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_sqlx)
    }
}

/// The verdict window of every (symptom, actuator), pair by pair.
async fn verdicts(conn: &mut SqliteConnection) -> Result<Vec<VerdictRecord>, StoreError> {
    let mut out = Vec::new();
    let mut pair: Option<(String, String)> = sqlx::query_as(list::FIRST_VERDICT_PAIR)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::from_sqlx)?;
    while let Some((symptom, actuator)) = pair {
        let rows: Vec<(String, i64)> = sqlx::query_as(list::VERDICT_WINDOW_OF_PAIR)
            .bind(symptom.clone())
            .bind(actuator.clone())
            .bind(i64::MIN)
            .bind(super::run::to_i64(VERDICT_WINDOW))
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
        out.extend(rows.into_iter().rev().map(|(v, at_ms)| VerdictRecord {
            symptom: symptom.clone(),
            actuator: actuator.clone(),
            verified: v == "verified",
            at_ms,
        }));
        pair = sqlx::query_as(list::NEXT_VERDICT_PAIR)
            .bind(symptom)
            .bind(actuator)
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
    }
    Ok(out)
}

// === Writes ===

/// Writes one run. Inserts are multi-row statements; updates are rare and
/// go one statement per event, which keeps their in-run order exact. Each
/// update is a no-op when it already took effect (or its row is unknown,
/// e.g. dropped by the buffer), so re-applying is safe.
async fn apply_run(conn: &mut SqliteConnection, run: Run<'_>) -> Result<(), StoreError> {
    match run {
        Run::SubjectSeen(rows) => subjects_seen(conn, &rows).await,
        Run::SvidSeen(rows) => svids_seen(conn, &rows).await,
        Run::SvidReplaced(rows) => svids_replaced(conn, &rows).await,
        Run::IncidentOpened(rows) => incidents_opened(conn, &rows).await,
        Run::IncidentClosed(rows) => incidents_closed(conn, &rows).await,
        Run::IncidentEscalated(rows) => incidents_escalated(conn, &rows).await,
        Run::ActionStarted(rows) => actions_started(conn, &rows).await,
        Run::ActionFinished(rows) => actions_finished(conn, &rows).await,
        Run::ActionVerified(rows) => actions_verified(conn, &rows).await,
        Run::Held(rows) => holds(conn, &rows).await,
        Run::IncidentNeedsOperator(rows) => incidents_need_operator(conn, &rows).await,
        Run::AgentIdentified(rows) => agents_identified(conn, &rows).await,
        Run::ApprovalRequested(rows) => approvals_requested(conn, &rows).await,
        Run::ApprovalDecided(rows) => approvals_decided(conn, &rows).await,
        Run::ControlChanged(rows) => controls_changed(conn, &rows).await,
        Run::Demoted(rows) => demoted(conn, &rows).await,
        Run::DemotionReset(rows) => demotions_reset(conn, &rows).await,
    }
}

async fn subjects_seen(
    conn: &mut SqliteConnection,
    rows: &[run::SubjectSeen<'_>],
) -> Result<(), StoreError> {
    // min/max make the upsert order-independent and so idempotent.
    insert_rows(
        conn,
        "INSERT INTO subjects (subject, kind, agent, first_seen_ms, last_seen_ms) VALUES ",
        5,
        " ON CONFLICT (subject) DO UPDATE SET \
         first_seen_ms = min(first_seen_ms, excluded.first_seen_ms), \
         last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
        rows,
        |q, r| {
            q.bind(r.subject.clone())
                .bind(r.kind)
                .bind(r.agent.to_owned())
                .bind(r.at_ms)
                .bind(r.at_ms)
        },
    )
    .await
}

/// The pairs first (`svid_names`, each once), then the lifecycles naming
/// them: the scalar look-up keeps the rows in batch order, so of two
/// deliveries of one serial in a batch the first is kept, as before.
async fn svids_seen(
    conn: &mut SqliteConnection,
    rows: &[run::SvidSeen<'_>],
) -> Result<(), StoreError> {
    let names = run::distinct_pairs(rows.iter().map(|r| (r.agent, r.spiffe_id)));
    insert_rows(
        conn,
        "INSERT INTO svid_names (agent, spiffe_id) VALUES ",
        2,
        " ON CONFLICT DO NOTHING",
        &names,
        |q, (agent, spiffe_id)| q.bind(agent.to_string()).bind(spiffe_id.to_string()),
    )
    .await?;
    // `WHERE true`: SQLite reads `ON CONFLICT` after a FROM as a join
    // constraint otherwise.
    insert_rows(
        conn,
        "WITH u (agent, spiffe_id, serial, not_before_ms, not_after_ms, at_ms) AS (VALUES ",
        6,
        ") INSERT INTO svid_lifecycles \
           (name_id, serial, not_before_ms, not_after_ms, first_seen_ms) \
         SELECT (SELECT n.id FROM svid_names n \
                 WHERE n.agent = u.agent AND n.spiffe_id = u.spiffe_id), \
           u.serial, u.not_before_ms, u.not_after_ms, u.at_ms \
         FROM u WHERE true ON CONFLICT DO NOTHING",
        rows,
        |q, r| {
            q.bind(r.agent.to_owned())
                .bind(r.spiffe_id.to_owned())
                .bind(r.serial.to_owned())
                .bind(r.not_before_ms)
                .bind(r.not_after_ms)
                .bind(r.at_ms)
        },
    )
    .await
}

async fn svids_replaced(
    conn: &mut SqliteConnection,
    rows: &[run::SvidReplaced<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(
            "UPDATE svid_lifecycles SET replaced_at_ms = ? \
             WHERE name_id = (SELECT id FROM svid_names WHERE agent = ? AND spiffe_id = ?) \
               AND serial = ? AND replaced_at_ms IS NULL",
        )
        .bind(r.at_ms)
        .bind(r.agent.to_owned())
        .bind(r.spiffe_id.to_owned())
        .bind(r.serial.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

async fn incidents_opened(
    conn: &mut SqliteConnection,
    rows: &[run::IncidentOpened<'_>],
) -> Result<(), StoreError> {
    insert_rows(
        conn,
        "INSERT INTO incidents (id, symptom, subject, severity, opened_at_ms, \
         predicted_outage_ms, evidence, next_rung) VALUES ",
        8,
        " ON CONFLICT DO NOTHING",
        rows,
        |q, r| {
            q.bind(r.id.to_owned())
                .bind(r.symptom)
                .bind(r.subject.clone())
                .bind(r.severity)
                .bind(r.opened_at_ms)
                .bind(r.predicted_outage_ms)
                .bind(r.evidence.to_string())
                .bind(r.next_rung)
        },
    )
    .await
}

async fn incidents_closed(
    conn: &mut SqliteConnection,
    rows: &[run::IncidentClosed<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(
            "UPDATE incidents SET closed_at_ms = ?, resolution = ? \
             WHERE id = ? AND closed_at_ms IS NULL",
        )
        .bind(r.at_ms)
        .bind(r.resolution.to_owned())
        .bind(r.id.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

async fn incidents_escalated(
    conn: &mut SqliteConnection,
    rows: &[run::IncidentEscalated<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query("UPDATE incidents SET next_rung = ? WHERE id = ?")
            .bind(r.next_rung)
            .bind(r.id.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

async fn actions_started(
    conn: &mut SqliteConnection,
    rows: &[run::ActionStarted<'_>],
) -> Result<(), StoreError> {
    insert_rows(
        conn,
        "INSERT INTO actions (id, incident_id, symptom, rung, actuator, target, params, \
         dry_run, started_at_ms) VALUES ",
        9,
        " ON CONFLICT DO NOTHING",
        rows,
        |q, r| {
            q.bind(r.id.to_owned())
                .bind(r.incident_id.to_owned())
                .bind(r.symptom)
                .bind(r.rung)
                .bind(r.actuator.to_owned())
                .bind(r.target.to_owned())
                .bind(r.params.to_string())
                .bind(r.dry_run)
                .bind(r.started_at_ms)
        },
    )
    .await
}

async fn actions_finished(
    conn: &mut SqliteConnection,
    rows: &[run::ActionFinished<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(
            "UPDATE actions SET finished_at_ms = ?, outcome = ?, detail = ?, error = ? \
             WHERE id = ? AND finished_at_ms IS NULL",
        )
        .bind(r.at_ms)
        .bind(r.outcome)
        .bind(r.detail.to_string())
        .bind(r.error.map(str::to_owned))
        .bind(r.id.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

async fn actions_verified(
    conn: &mut SqliteConnection,
    rows: &[run::ActionVerified<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(
            "UPDATE actions SET verification = ?, verified_at_ms = ? \
             WHERE id = ? AND verification IS NULL",
        )
        .bind(r.verification)
        .bind(r.at_ms)
        .bind(r.id.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

async fn holds(conn: &mut SqliteConnection, rows: &[run::Held<'_>]) -> Result<(), StoreError> {
    insert_rows(
        conn,
        "INSERT INTO holds (incident_id, actuator, target, reason, at_ms) VALUES ",
        5,
        " ON CONFLICT DO NOTHING",
        rows,
        |q, r| {
            q.bind(r.incident_id.to_owned())
                .bind(r.actuator.to_owned())
                .bind(r.target.to_owned())
                .bind(r.reason.to_owned())
                .bind(r.at_ms)
        },
    )
    .await
}

async fn incidents_need_operator(
    conn: &mut SqliteConnection,
    rows: &[run::IncidentNeedsOperator<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(
            "UPDATE incidents SET needs_operator = ?, needs_operator_at_ms = ? WHERE id = ?",
        )
        .bind(r.reason.to_owned())
        .bind(r.at_ms)
        .bind(r.id.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

async fn agents_identified(
    conn: &mut SqliteConnection,
    rows: &[run::AgentIdentified<'_>],
) -> Result<(), StoreError> {
    // SET expressions read the row as it was, so `agent` and `source`
    // compare against the old last_seen. A later row of the same statement
    // sees the earlier one's update: the statement behaves like its rows
    // applied one by one, and min/max/`>=` make re-applying harmless.
    insert_rows(
        conn,
        "INSERT INTO agent_identities (spiffe_id, agent, source, first_seen_ms, last_seen_ms) \
         VALUES ",
        5,
        " ON CONFLICT (spiffe_id) DO UPDATE SET \
         agent = CASE WHEN excluded.last_seen_ms >= last_seen_ms \
           THEN excluded.agent ELSE agent END, \
         source = CASE WHEN excluded.last_seen_ms >= last_seen_ms \
           THEN excluded.source ELSE source END, \
         first_seen_ms = min(first_seen_ms, excluded.first_seen_ms), \
         last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
        rows,
        |q, r| {
            q.bind(r.spiffe_id.to_owned())
                .bind(r.agent.to_owned())
                .bind(r.source)
                .bind(r.at_ms)
                .bind(r.at_ms)
        },
    )
    .await
}

async fn approvals_requested(
    conn: &mut SqliteConnection,
    rows: &[run::ApprovalRequested<'_>],
) -> Result<(), StoreError> {
    insert_rows(
        conn,
        "INSERT INTO approvals (id, incident_id, symptom, rung, actuator, target, state, \
         requested_at_ms, expires_at_ms) VALUES ",
        9,
        " ON CONFLICT DO NOTHING",
        rows,
        |q, r| {
            q.bind(r.id.to_owned())
                .bind(r.incident_id.to_owned())
                .bind(r.symptom)
                .bind(r.rung)
                .bind(r.actuator.to_owned())
                .bind(r.target.to_owned())
                .bind(r.state)
                .bind(r.requested_at_ms)
                .bind(r.expires_at_ms)
        },
    )
    .await
}

async fn approvals_decided(
    conn: &mut SqliteConnection,
    rows: &[run::ApprovalDecided<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(run::APPROVAL_DECIDED_SQL)
            .bind(r.state)
            .bind(r.by.map(str::to_owned))
            .bind(r.reason.map(str::to_owned))
            .bind(r.action_id.map(str::to_owned))
            .bind(r.rank)
            .bind(r.at_ms)
            .bind(r.id.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

async fn controls_changed(
    conn: &mut SqliteConnection,
    rows: &[run::ControlChanged<'_>],
) -> Result<(), StoreError> {
    // The rows of one INSERT take rowids (`seq`) in VALUES order.
    insert_rows(
        conn,
        "INSERT INTO control_changes (id, control, change, changed_by, reason, at_ms) VALUES ",
        6,
        " ON CONFLICT DO NOTHING",
        rows,
        |q, r| {
            q.bind(r.id.to_owned())
                .bind(r.control)
                .bind(r.change)
                .bind(r.by.to_owned())
                .bind(r.reason.map(str::to_owned))
                .bind(r.at_ms)
        },
    )
    .await
}

async fn demoted(conn: &mut SqliteConnection, rows: &[run::Demoted<'_>]) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(run::DEMOTED_SQL)
            .bind(r.symptom)
            .bind(r.actuator.to_owned())
            .bind(r.verified)
            .bind(r.runs)
            .bind(r.at_ms);
        execute(conn, query).await?;
    }
    Ok(())
}

async fn demotions_reset(
    conn: &mut SqliteConnection,
    rows: &[run::DemotionReset<'_>],
) -> Result<(), StoreError> {
    for r in rows {
        let query = sqlx::query(run::DEMOTION_RESET_SQL)
            .bind(r.symptom)
            .bind(r.actuator.to_owned())
            .bind(r.at_ms)
            .bind(r.by.to_owned());
        execute(conn, query).await?;
    }
    Ok(())
}

/// Audit rows, with the context the event did not carry taken from the
/// approval and the incident they name (when known).
async fn audit_rows(
    conn: &mut SqliteConnection,
    rows: &[run::Audit<'_>],
) -> Result<(), StoreError> {
    // `WHERE true`: SQLite reads `ON CONFLICT` after a join as the join's
    // constraint otherwise.
    insert_rows(
        conn,
        "WITH u (id, at_ms, kind, actor, incident_id, action_id, approval_id, symptom, \
           actuator, target, reason, detail) AS (VALUES ",
        12,
        ") INSERT INTO audit (id, at_ms, kind, actor, incident_id, action_id, approval_id, \
           symptom, actuator, target, reason, detail) \
         SELECT u.id, u.at_ms, u.kind, u.actor, coalesce(u.incident_id, a.incident_id), \
           u.action_id, u.approval_id, \
           coalesce(u.symptom, a.symptom, (SELECT i.symptom FROM incidents i \
             WHERE i.id = coalesce(u.incident_id, a.incident_id))), \
           coalesce(u.actuator, a.actuator), coalesce(u.target, a.target), u.reason, u.detail \
         FROM u LEFT JOIN approvals a ON a.id = u.approval_id WHERE true \
         ON CONFLICT DO NOTHING",
        rows,
        |q, r| {
            q.bind(r.id.clone())
                .bind(r.at_ms)
                .bind(r.kind)
                .bind(r.actor.to_owned())
                .bind(r.incident_id.map(str::to_owned))
                .bind(r.action_id.map(str::to_owned))
                .bind(r.approval_id.map(str::to_owned))
                .bind(r.symptom)
                .bind(r.actuator.map(str::to_owned))
                .bind(r.target.map(str::to_owned))
                .bind(r.reason.map(str::to_owned))
                .bind(r.detail.to_string())
        },
    )
    .await
}

/// Sends `rows` as `head (?, …), (?, …) tail` statements of at most
/// [`MAX_ROWS_PER_STATEMENT`] rows and [`MAX_PARAMS`] parameters. `bind`
/// binds one row's `cols` values.
async fn insert_rows<T>(
    conn: &mut SqliteConnection,
    head: &'static str,
    cols: usize,
    tail: &'static str,
    rows: &[T],
    bind: impl Fn(SqliteQuery, &T) -> SqliteQuery,
) -> Result<(), StoreError> {
    let per_statement = (MAX_PARAMS / cols).min(MAX_ROWS_PER_STATEMENT);
    for chunk in rows.chunks(per_statement) {
        // Only the full-size statement is worth keeping prepared; a tail of
        // arbitrary length would churn the statement cache.
        let persistent = chunk.len() == per_statement;
        let sql = values_sql(head, cols, chunk.len(), tail);
        // The SQL is built from our constants and `?` placeholders only.
        let query = sqlx::query(AssertSqlSafe(sql)).persistent(persistent);
        chunk
            .iter()
            .fold(query, &bind)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::from_sqlx)?;
    }
    Ok(())
}

/// `head (?, ?), (?, ?) tail` with `rows` groups of `cols` placeholders.
fn values_sql(head: &str, cols: usize, rows: usize, tail: &str) -> String {
    let group = format!("({})", vec!["?"; cols].join(", "));
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * (group.len() + 2));
    sql.push_str(head);
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&group);
    }
    sql.push_str(tail);
    sql
}

async fn execute(conn: &mut SqliteConnection, query: SqliteQuery) -> Result<(), StoreError> {
    query
        .execute(&mut *conn)
        .await
        .map(drop)
        .map_err(StoreError::from_sqlx)
}

// === Reads ===

fn incident_record(row: &SqliteRow) -> Result<IncidentRecord, StoreError> {
    Ok(IncidentRecord {
        id: col(row, "id")?,
        symptom: col(row, "symptom")?,
        subject: col(row, "subject")?,
        severity: col(row, "severity")?,
        opened_at_ms: col(row, "opened_at_ms")?,
        closed_at_ms: col(row, "closed_at_ms")?,
        resolution: col(row, "resolution")?,
        predicted_outage_ms: col(row, "predicted_outage_ms")?,
        evidence: json_col(row, "evidence")?,
        next_rung: col(row, "next_rung")?,
        needs_operator: col(row, "needs_operator")?,
        needs_operator_at_ms: col(row, "needs_operator_at_ms")?,
    })
}

fn action_record(row: &SqliteRow) -> Result<ActionRecord, StoreError> {
    let detail: Option<String> = col(row, "detail")?;
    Ok(ActionRecord {
        id: col(row, "id")?,
        incident_id: col(row, "incident_id")?,
        symptom: col(row, "symptom")?,
        rung: col(row, "rung")?,
        actuator: col(row, "actuator")?,
        target: col(row, "target")?,
        params: json_col(row, "params")?,
        dry_run: col(row, "dry_run")?,
        started_at_ms: col(row, "started_at_ms")?,
        finished_at_ms: col(row, "finished_at_ms")?,
        outcome: col(row, "outcome")?,
        detail: detail
            .as_deref()
            .map(|s| parse_json("detail", s))
            .transpose()?,
        error: col(row, "error")?,
        verification: col(row, "verification")?,
        verified_at_ms: col(row, "verified_at_ms")?,
    })
}

fn svid_record(row: &SqliteRow) -> Result<SvidRecord, StoreError> {
    Ok(SvidRecord {
        agent: col(row, "agent")?,
        spiffe_id: col(row, "spiffe_id")?,
        serial: col(row, "serial")?,
        not_before_ms: col(row, "not_before_ms")?,
        not_after_ms: col(row, "not_after_ms")?,
        first_seen_ms: col(row, "first_seen_ms")?,
        replaced_at_ms: col(row, "replaced_at_ms")?,
    })
}

fn hold_record(row: &SqliteRow) -> Result<HoldRecord, StoreError> {
    Ok(HoldRecord {
        id: col::<i64>(row, "id")?.to_string(),
        incident_id: col(row, "incident_id")?,
        actuator: col(row, "actuator")?,
        target: col(row, "target")?,
        reason: col(row, "reason")?,
        at_ms: col(row, "at_ms")?,
    })
}

fn approval_record(row: &SqliteRow) -> Result<ApprovalRecord, StoreError> {
    Ok(ApprovalRecord {
        id: col(row, "id")?,
        incident_id: col(row, "incident_id")?,
        symptom: col(row, "symptom")?,
        rung: col(row, "rung")?,
        actuator: col(row, "actuator")?,
        target: col(row, "target")?,
        state: col(row, "state")?,
        requested_at_ms: col(row, "requested_at_ms")?,
        expires_at_ms: col(row, "expires_at_ms")?,
        decided_by: col(row, "decided_by")?,
        decided_at_ms: col(row, "decided_at_ms")?,
        reason: col(row, "reason")?,
        action_id: col(row, "action_id")?,
    })
}

fn audit_record(row: &SqliteRow) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        id: col(row, "id")?,
        at_ms: col(row, "at_ms")?,
        kind: col(row, "kind")?,
        actor: col(row, "actor")?,
        incident_id: col(row, "incident_id")?,
        action_id: col(row, "action_id")?,
        approval_id: col(row, "approval_id")?,
        symptom: col(row, "symptom")?,
        actuator: col(row, "actuator")?,
        target: col(row, "target")?,
        reason: col(row, "reason")?,
        detail: json_col(row, "detail")?,
    })
}

fn demotion_record(row: &SqliteRow) -> Result<DemotionRecord, StoreError> {
    Ok(DemotionRecord {
        symptom: col(row, "symptom")?,
        actuator: col(row, "actuator")?,
        verified: count(col(row, "verified")?, "verified")?,
        runs: count(col(row, "runs")?, "runs")?,
        demoted_at_ms: col(row, "demoted_at_ms")?,
    })
}

fn col<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}

fn json_col(row: &SqliteRow, name: &str) -> Result<serde_json::Value, StoreError> {
    let text: String = col(row, name)?;
    parse_json(name, &text)
}

fn parse_json(name: &str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}

// === Shared with the PostgreSQL backend ===

/// Rebuilds an open incident for the supervisor. Backend-neutral: both
/// stores decode to [`IncidentRecord`] first.
///
/// # Errors
/// A description of the first field that does not parse.
pub(super) fn incident_from_record(r: &IncidentRecord) -> Result<Incident, String> {
    let kind =
        SymptomKind::parse(&r.symptom).ok_or_else(|| format!("unknown symptom {:?}", r.symptom))?;
    let subject =
        Subject::parse(&r.subject).ok_or_else(|| format!("unparsable subject {:?}", r.subject))?;
    let severity = match r.severity.as_str() {
        "warning" => Severity::Warning,
        "critical" => Severity::Critical,
        other => return Err(format!("unknown severity {other:?}")),
    };
    let next_rung =
        usize::try_from(r.next_rung).map_err(|_| format!("negative next_rung {}", r.next_rung))?;
    Ok(Incident {
        id: r.id.clone(),
        kind,
        subject,
        severity,
        opened_at: from_unix_millis(r.opened_at_ms),
        predicted_outage: r.predicted_outage_ms.map(from_unix_millis),
        evidence: r.evidence.clone(),
        next_rung,
        needs_operator: r.needs_operator.clone(),
    })
}

/// Rebuilds an agent identity from its `agent_identities` columns; `at` is
/// the last sighting. Backend-neutral.
///
/// `None`, with a warning naming the row, when the source is not one we
/// know: as with an unreadable open incident, one bad row must not keep the
/// supervisor from starting, and the agent is identified again when next
/// seen.
pub(super) fn identity_from_columns(
    spiffe_id: String,
    agent: String,
    source: &str,
    last_seen_ms: i64,
) -> Option<AgentIdentity> {
    let Some(source) = IdentitySource::parse(source) else {
        tracing::warn!(%spiffe_id, %agent, source, "Skipping agent identity with an unknown source.");
        return None;
    };
    Some(AgentIdentity {
        agent,
        spiffe_id,
        source,
        at: from_unix_millis(last_seen_ms),
    })
}

/// Rebuilds the change in force of `control` from its `control_changes`
/// columns. Backend-neutral.
///
/// `None`, with a warning, when the change is not one we know (or belongs
/// to the other control): the control then starts as configured.
pub(super) fn control_from_columns(
    control: &str,
    change: &str,
    by: String,
    reason: Option<String>,
    at_ms: i64,
) -> Option<ControlRecord> {
    match ControlChange::parse(change) {
        Some(change) if change.control() == control => Some(ControlRecord {
            change,
            by,
            reason,
            at_ms,
        }),
        _ => {
            tracing::warn!(control, change, "Skipping an unknown control change.");
            None
        }
    }
}

/// A stored count as `u32`.
///
/// # Errors
/// [`StoreError::Corrupt`] naming `name` when it is negative or too large.
pub(super) fn count(n: i64, name: &str) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("column {name}: {n} is no count")))
}
