//! PostgreSQL backend, for a supervisor whose history outlives its host.
//!
//! Each run of same-kind events in a batch is one statement over `UNNEST`ed
//! column arrays: one round trip per run, whatever its length, and no
//! parameter limit; its audit rows are one more. The operator-control
//! events (approval decisions, control changes, demotions and resets) are
//! rare and depend on each other in order: one statement per event. Updates pick the event that sequential application would
//! have kept (`DISTINCT ON … ORDER BY ord`), so a run behaves exactly like
//! its events applied one by one.
//!
//! A dead database must fail fast, not hang: the pool waits at most 3 s for
//! a connection and every call at most 30 s; both surface as
//! [`StoreError::Unavailable`], whose message names `host:port` and never the
//! password.

use std::fmt;
use std::io;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Postgres, Row, SqlSafeStr};

use super::list::{self, Arg, Listing, limit};
use super::run::{self, Run, runs, started_ids};
use super::sqlite::{control_from_columns, count, identity_from_columns, incident_from_record};
use super::{
    ActionRecord, ApprovalRecord, AuditRecord, DemotionRecord, HoldRecord, IncidentRecord,
    Knowledge, Query, Store, StoreError, SvidRecord, VERDICT_WINDOW, VerdictRecord,
};
use crate::clock::unix_millis;
use crate::model::Event;

/// Embedded migrations, in order. `tests.rs` checks that this list matches
/// `migrations/postgres/` file for file.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "needs_operator_and_agent_identities",
        include_str!("../../migrations/postgres/0002_needs_operator_and_agent_identities.sql"),
    ),
    (
        3,
        "operator_controls",
        include_str!("../../migrations/postgres/0003_operator_controls.sql"),
    ),
    (
        4,
        "replay_frames",
        include_str!("../../migrations/postgres/0004_replay_frames.sql"),
    ),
    (
        5,
        "retention_and_svid_names",
        include_str!("../../migrations/postgres/0005_retention_and_svid_names.sql"),
    ),
    (
        6,
        "leadership",
        include_str!("../../migrations/postgres/0006_leadership.sql"),
    ),
    (
        7,
        "held_outcome",
        include_str!("../../migrations/postgres/0007_held_outcome.sql"),
    ),
];

/// Longest wait for a pooled connection (including connecting).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for one store call; covers a server that stopped answering
/// without closing the connection.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Writes are serialised by the buffer; a few more for API readers.
const MAX_CONNECTIONS: u32 = 4;

/// The knowledge store in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Set by a leader: every write checks its epoch (see
    /// [`super::leadership`]).
    fence: std::sync::Arc<std::sync::RwLock<Option<super::leadership::Fence>>>,
    /// `host:port`, for error messages.
    addr: String,
}

// SELECT lists shared by the listing and loading queries; `concat!` keeps
// every statement a `&'static str`. JSON leaves as text: the crate does not
// enable sqlx's `json` feature.
macro_rules! incident_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, symptom, subject, severity, opened_at_ms, closed_at_ms, resolution, \
             predicted_outage_ms, evidence::text AS evidence, next_rung, needs_operator, \
             needs_operator_at_ms FROM incidents ",
            $rest
        )
    };
}

macro_rules! action_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, incident_id, symptom, rung, actuator, target, params::text AS params, \
             dry_run, started_at_ms, finished_at_ms, outcome, detail::text AS detail, error, \
             verification, verified_at_ms FROM actions ",
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
             actuator, target, reason, detail::text AS detail FROM audit ",
            $rest
        )
    };
}

/// Every identity, oldest sighting first: a caller that inserts them in
/// order into a map ends with the latest.
const IDENTITIES_SELECT: &str = "SELECT spiffe_id, agent, source, last_seen_ms \
     FROM agent_identities ORDER BY last_seen_ms, spiffe_id";

// === impl PostgresStore ===

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/db`), checks
    /// that the server answers and applies migrations.
    ///
    /// # Errors
    /// [`StoreError::Config`] for an unparsable URL or when the server
    /// rejects the credentials or database; [`StoreError::Unavailable`] when
    /// it cannot be reached within 3 s;
    /// [`StoreError::Migrate`] when the schema cannot be applied. Messages
    /// name `host:port`, never the password.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // sqlx's URL errors describe the problem without echoing the URL.
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let options = options.application_name("spire-healer");
        let addr = format!("{}:{}", options.get_host(), options.get_port());

        // One direct attempt first: the pool retries a refused connection
        // until its timeout and then reports only "timed out", while this
        // names the cause (refused, bad password, no such database).
        match tokio::time::timeout(ACQUIRE_TIMEOUT, options.connect()).await {
            Ok(Ok(conn)) => {
                // Closing politely is best effort; the server cleans up.
                let _ = conn.close().await;
            }
            Ok(Err(e)) => return Err(connect_error(&addr, options.get_username(), e)),
            Err(_) => {
                let e = sqlx::Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {ACQUIRE_TIMEOUT:?}"),
                ));
                return Err(connect_error(&addr, options.get_username(), e));
            }
        }

        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let store = Self {
            pool,
            addr,
            fence: std::sync::Arc::default(),
        };
        store
            .bounded(async {
                migrator()
                    .run(&store.pool)
                    .await
                    .map_err(StoreError::Migrate)
            })
            .await?;
        Ok(store)
    }

    /// Connects for reading: no migration, and a database without our
    /// current schema is refused, naming it.
    ///
    /// # Errors
    /// As [`PostgresStore::connect`], and [`StoreError::Config`] when the
    /// database holds no spire-healer store at this schema.
    pub async fn connect_existing(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let options = options.application_name("spire-healer");
        let addr = format!("{}:{}", options.get_host(), options.get_port());
        let db = options.get_database().unwrap_or("").to_string();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let store = Self {
            pool,
            addr,
            fence: std::sync::Arc::default(),
        };
        let version: Option<i64> = store
            .bounded(async {
                let exists: bool =
                    sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                        .fetch_one(&store.pool)
                        .await
                        .map_err(StoreError::from_sqlx)?;
                if !exists {
                    return Ok(None);
                }
                sqlx::query_scalar::<_, Option<i64>>("SELECT max(version) FROM _sqlx_migrations")
                    .fetch_one(&store.pool)
                    .await
                    .map_err(StoreError::from_sqlx)
            })
            .await?;
        let want = MIGRATIONS.last().map(|m| m.0);
        if version != want {
            return Err(StoreError::Config(format!(
                "database {db:?} on {} is not a spire-healer store at schema {} (found {})",
                store.addr,
                want.unwrap_or(0),
                version.map_or("none".to_string(), |v| v.to_string())
            )));
        }
        Ok(store)
    }

    /// Runs `op` within [`OP_TIMEOUT`] and names the server in
    /// unavailability errors.
    pub(super) async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(StoreError::Unavailable(e))) => Err(unavailable(&self.addr, e)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(unavailable(
                &self.addr,
                sqlx::Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {OP_TIMEOUT:?}"),
                )),
            )),
        }
    }

    /// The underlying pool: for the replay frames (`knowledge::frames`),
    /// and for tests that inspect or corrupt rows directly.
    pub(super) fn pool(&self) -> &PgPool {
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

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let fence = self.fence.read().map(|f| f.clone()).unwrap_or(None);
        self.bounded(async {
            let mut tx = self.pool.begin().await.map_err(pg_error)?;
            if let Some(fence) = &fence {
                super::leadership::pg_check(&mut tx, fence).await?;
            }
            for rows in runs(events) {
                apply_run(&mut tx, rows.run).await?;
                if !rows.audit.is_empty() {
                    audit_rows(&rows.audit)
                        .execute(&mut *tx)
                        .await
                        .map_err(pg_error)?;
                }
            }
            if let Some(fence) = &fence {
                super::leadership::pg_stamp(&mut tx, fence, &started_ids(events)).await?;
            }
            tx.commit().await.map_err(pg_error)
        })
        .await
    }

    async fn load_knowledge(&self, since: SystemTime) -> Result<Knowledge, StoreError> {
        self.bounded(async {
            // One read transaction (REPEATABLE READ: one snapshot for
            // every part).
            let mut tx = self.pool.begin().await.map_err(pg_error)?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(pg_error)?;
            let rows = sqlx::query(incident_select!(
                "WHERE closed_at_ms IS NULL ORDER BY opened_at_ms, id"
            ))
            .fetch_all(&mut *tx)
            .await
            .map_err(pg_error)?;
            let mut open_incidents = Vec::with_capacity(rows.len());
            for row in &rows {
                let record = incident_record(row)?;
                match incident_from_record(&record) {
                    Ok(incident) => open_incidents.push(incident),
                    // One bad row must not keep the supervisor from starting;
                    // the symptom, if still present, opens a fresh incident.
                    Err(problem) => {
                        tracing::warn!(incident = %record.id, %problem, "Skipping unreadable open incident.");
                    }
                }
            }
            let rows = sqlx::query(action_select!(
                "WHERE started_at_ms >= $1 ORDER BY started_at_ms, id"
            ))
            .bind(unix_millis(since))
            .fetch_all(&mut *tx)
            .await
            .map_err(pg_error)?;
            let recent_actions = rows.iter().map(action_record).collect::<Result<_, _>>()?;
            let rows = sqlx::query(IDENTITIES_SELECT)
                .fetch_all(&mut *tx)
                .await
                .map_err(pg_error)?;
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
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(pg_error)?;
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
                .fetch_all(&mut *tx)
                .await
                .map_err(pg_error)?;
            let approvals = rows.iter().map(approval_record).collect::<Result<_, _>>()?;
            let rows = sqlx::query(list::OPEN_DEMOTIONS)
                .fetch_all(&mut *tx)
                .await
                .map_err(pg_error)?;
            let demotions = rows.iter().map(demotion_record).collect::<Result<_, _>>()?;
            let verdicts = verdicts(&mut tx).await?;
            tx.commit().await.map_err(pg_error)?;
            Ok(Knowledge {
                open_incidents,
                recent_actions,
                agent_identities,
                controls,
                approvals,
                demotions,
                verdicts,
            })
        })
        .await
    }

    async fn incidents(&self, q: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
        let rows = self.list(incident_select!(""), list::incidents(q)?).await?;
        rows.iter().map(incident_record).collect()
    }

    async fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError> {
        let row = self
            .bounded(async {
                sqlx::query(incident_select!("WHERE id = $1"))
                    .bind(text(id))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(pg_error)
            })
            .await?;
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
                 LIMIT $1"
            ))
        } else {
            sqlx::query(svid_select!(
                "ORDER BY s.first_seen_ms DESC, n.agent DESC, n.spiffe_id DESC, s.serial DESC \
                 LIMIT $1"
            ))
        };
        let rows = self
            .bounded(async {
                query
                    .bind(limit(q))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(pg_error)
            })
            .await?;
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
        self.bounded(async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map(drop)
                .map_err(pg_error)
        })
        .await
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
        self.bounded(async {
            let mut conn = self.pool.acquire().await.map_err(pg_error)?;
            super::leadership::pg_take(&mut conn, name, holder, lease).await
        })
        .await
    }

    async fn renew_leadership(
        &self,
        fence: &super::leadership::Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await.map_err(pg_error)?;
            super::leadership::pg_renew(&mut conn, fence, lease).await
        })
        .await
    }

    async fn leadership(
        &self,
        name: &str,
    ) -> Result<Option<super::leadership::LeadershipRecord>, StoreError> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await.map_err(pg_error)?;
            super::leadership::pg_read(&mut conn, name).await
        })
        .await
    }
}

impl PostgresStore {
    /// Runs a listing after `select` (`SELECT … FROM table `).
    async fn list(&self, select: &str, l: Listing) -> Result<Vec<PgRow>, StoreError> {
        // Built from our constants and `$n` placeholders only.
        let sql = AssertSqlSafe(format!("{select}{}", l.sql));
        let query = l
            .args
            .into_iter()
            .fold(sqlx::query(sql), |q, arg| match arg {
                Arg::Int(v) => q.bind(v),
                // Stored text had NUL replaced; so must a filter on it.
                Arg::Text(v) => q.bind(text(&v)),
            });
        self.bounded(async { query.fetch_all(&self.pool).await.map_err(pg_error) })
            .await
    }
}

/// The verdict window of every (symptom, actuator), pair by pair.
async fn verdicts(conn: &mut PgConnection) -> Result<Vec<VerdictRecord>, StoreError> {
    let mut out = Vec::new();
    let mut pair: Option<(String, String)> = sqlx::query_as(list::FIRST_VERDICT_PAIR)
        .fetch_optional(&mut *conn)
        .await
        .map_err(pg_error)?;
    while let Some((symptom, actuator)) = pair {
        let rows: Vec<(String, i64)> = sqlx::query_as(list::VERDICT_WINDOW_OF_PAIR)
            .bind(symptom.clone())
            .bind(actuator.clone())
            .bind(i64::MIN)
            .bind(run::to_i64(VERDICT_WINDOW))
            .fetch_all(&mut *conn)
            .await
            .map_err(pg_error)?;
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
            .map_err(pg_error)?;
    }
    Ok(out)
}

// === Errors ===

/// [`StoreError::from_sqlx`], plus the server-side codes that mean "the
/// database is going away" rather than "this query is wrong": class 08
/// (connection exception), 53300 (too many connections) and 57P01–57P03
/// (shutdown, crash, starting up).
pub(super) fn pg_error(e: sqlx::Error) -> StoreError {
    let gone = e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("08") || code == "53300" || code.starts_with("57P0"));
    if gone {
        StoreError::Unavailable(e)
    } else {
        StoreError::from_sqlx(e)
    }
}

/// A connection-time failure. The server answering "no" to our credentials
/// or database name is a configuration problem; anything else means it is
/// not there. The message is the server's own, without the position in
/// PostgreSQL's source that sqlx appends ("at line 334").
pub(super) fn connect_error(addr: &str, user: &str, e: sqlx::Error) -> StoreError {
    let refused = e.as_database_error().and_then(|d| {
        let code = d.code()?;
        let message = d.message();
        if code.starts_with("28") {
            Some(format!(
                "PostgreSQL at {addr} refused the login for user {user:?}: {message}"
            ))
        } else if code == "3D000" {
            Some(format!(
                "PostgreSQL at {addr} refused the connection: {message}"
            ))
        } else {
            None
        }
    });
    match refused {
        Some(message) => StoreError::Config(message),
        None => unavailable(addr, e),
    }
}

/// [`StoreError::Unavailable`] whose message names the server; the original
/// error stays reachable through `source()`.
fn unavailable(addr: &str, e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Io(io_err) = &e
        && io_err
            .get_ref()
            .is_some_and(|inner| inner.is::<AtAddress>())
    {
        return StoreError::Unavailable(e); // already named
    }
    let kind = match &e {
        sqlx::Error::Io(io_err) => io_err.kind(),
        _ => io::ErrorKind::Other,
    };
    StoreError::Unavailable(sqlx::Error::Io(io::Error::new(
        kind,
        AtAddress {
            addr: addr.to_owned(),
            source: e,
        },
    )))
}

/// "PostgreSQL at host:port: cause".
#[derive(Debug)]
struct AtAddress {
    addr: String,
    source: sqlx::Error,
}

impl fmt::Display for AtAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The outer `sqlx::Error::Io` already says "error communicating".
        match &self.source {
            sqlx::Error::Io(io_err) => write!(f, "PostgreSQL at {}: {io_err}", self.addr),
            other => write!(f, "PostgreSQL at {}: {other}", self.addr),
        }
    }
}

impl std::error::Error for AtAddress {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

// === Writes ===

/// Writes one run: one statement over column arrays, or, for the rare
/// operator-control events whose rows depend on each other in order, one
/// statement per event.
async fn apply_run(conn: &mut PgConnection, run: Run<'_>) -> Result<(), StoreError> {
    let query = match run {
        Run::SubjectSeen(rows) => subjects_seen(&rows),
        Run::SvidSeen(rows) => return svids_seen(conn, &rows).await,
        Run::SvidReplaced(rows) => svids_replaced(&rows),
        Run::IncidentOpened(rows) => incidents_opened(&rows),
        Run::IncidentClosed(rows) => incidents_closed(&rows),
        Run::IncidentEscalated(rows) => incidents_escalated(&rows),
        Run::ActionStarted(rows) => actions_started(&rows),
        Run::ActionFinished(rows) => actions_finished(&rows),
        Run::ActionVerified(rows) => actions_verified(&rows),
        Run::Held(rows) => holds(&rows),
        Run::IncidentNeedsOperator(rows) => incidents_need_operator(&rows),
        Run::AgentIdentified(rows) => agents_identified(&rows),
        Run::ApprovalRequested(rows) => approvals_requested(&rows),
        Run::ControlChanged(rows) => return each(conn, rows.iter().map(control_changed)).await,
        Run::ApprovalDecided(rows) => return each(conn, rows.iter().map(approval_decided)).await,
        Run::Demoted(rows) => return each(conn, rows.iter().map(demoted)).await,
        Run::DemotionReset(rows) => return each(conn, rows.iter().map(demotion_reset)).await,
    };
    query.execute(&mut *conn).await.map(drop).map_err(pg_error)
}

/// Runs `queries` one after the other.
async fn each(
    conn: &mut PgConnection,
    queries: impl Iterator<Item = PgQuery>,
) -> Result<(), StoreError> {
    for q in queries {
        q.execute(&mut *conn).await.map_err(pg_error)?;
    }
    Ok(())
}

/// One statement with its column arrays bound.
type PgQuery = sqlx::query::Query<'static, Postgres, PgArguments>;

/// One column of `rows`, as an array parameter.
fn column<R, T>(rows: &[R], value: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}

fn subjects_seen(rows: &[run::SubjectSeen<'_>]) -> PgQuery {
    // Grouping first: ON CONFLICT DO UPDATE may touch a row only once per
    // statement. min/max make it order-independent.
    sqlx::query(
        "INSERT INTO subjects (subject, kind, agent, first_seen_ms, last_seen_ms) \
         SELECT subject, kind, agent, min(at_ms), max(at_ms) \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) \
           AS u(subject, kind, agent, at_ms) \
         GROUP BY subject, kind, agent \
         ON CONFLICT (subject) DO UPDATE SET \
           first_seen_ms = LEAST(subjects.first_seen_ms, EXCLUDED.first_seen_ms), \
           last_seen_ms = GREATEST(subjects.last_seen_ms, EXCLUDED.last_seen_ms)",
    )
    .bind(column(rows, |r| text(&r.subject)))
    .bind(column(rows, |r| r.kind))
    .bind(column(rows, |r| text(r.agent)))
    .bind(column(rows, |r| r.at_ms))
}

/// The pairs first (`svid_names`, each once), then the lifecycles naming
/// them, in batch order: of two deliveries of one serial in a batch the
/// first is kept. The shared transaction lock keeps the pruner from
/// deleting a pair this transaction found but has not yet named in a
/// lifecycle (see `retention`).
async fn svids_seen(conn: &mut PgConnection, rows: &[run::SvidSeen<'_>]) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(super::retention::SVID_NAMES_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    let names = run::distinct_pairs(rows.iter().map(|r| (r.agent, r.spiffe_id)));
    // NOT EXISTS first: a conflict would still draw an identity value.
    sqlx::query(
        "INSERT INTO svid_names (agent, spiffe_id) \
         SELECT u.agent, u.spiffe_id \
         FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS u(agent, spiffe_id, ord) \
         WHERE NOT EXISTS (SELECT 1 FROM svid_names n \
                           WHERE n.agent = u.agent AND n.spiffe_id = u.spiffe_id) \
         ORDER BY u.ord \
         ON CONFLICT DO NOTHING",
    )
    .bind(column(&names, |(agent, _)| text(agent)))
    .bind(column(&names, |(_, spiffe_id)| text(spiffe_id)))
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    sqlx::query(
        "INSERT INTO svid_lifecycles \
           (name_id, serial, not_before_ms, not_after_ms, first_seen_ms) \
         SELECT (SELECT n.id FROM svid_names n \
                 WHERE n.agent = u.agent AND n.spiffe_id = u.spiffe_id), \
           u.serial, u.not_before_ms, u.not_after_ms, u.at_ms \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[]) \
           WITH ORDINALITY AS u(agent, spiffe_id, serial, not_before_ms, not_after_ms, at_ms, ord) \
         ORDER BY u.ord \
         ON CONFLICT DO NOTHING",
    )
    .bind(column(rows, |r| text(r.agent)))
    .bind(column(rows, |r| text(r.spiffe_id)))
    .bind(column(rows, |r| text(r.serial)))
    .bind(column(rows, |r| r.not_before_ms))
    .bind(column(rows, |r| r.not_after_ms))
    .bind(column(rows, |r| r.at_ms))
    .execute(&mut *conn)
    .await
    .map(drop)
    .map_err(pg_error)
}

fn svids_replaced(rows: &[run::SvidReplaced<'_>]) -> PgQuery {
    // First replacement wins, as when applied one by one.
    sqlx::query(
        "UPDATE svid_lifecycles AS s SET replaced_at_ms = u.at_ms \
         FROM (SELECT DISTINCT ON (agent, spiffe_id, serial) agent, spiffe_id, serial, at_ms \
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) \
                 WITH ORDINALITY AS u(agent, spiffe_id, serial, at_ms, ord) \
               ORDER BY agent, spiffe_id, serial, ord) AS u \
         JOIN svid_names n ON n.agent = u.agent AND n.spiffe_id = u.spiffe_id \
         WHERE s.name_id = n.id AND s.serial = u.serial AND s.replaced_at_ms IS NULL",
    )
    .bind(column(rows, |r| text(r.agent)))
    .bind(column(rows, |r| text(r.spiffe_id)))
    .bind(column(rows, |r| text(r.serial)))
    .bind(column(rows, |r| r.at_ms))
}

fn incidents_opened(rows: &[run::IncidentOpened<'_>]) -> PgQuery {
    sqlx::query(
        "INSERT INTO incidents (id, symptom, subject, severity, opened_at_ms, \
           predicted_outage_ms, evidence, next_rung) \
         SELECT id, symptom, subject, severity, opened_at_ms, predicted_outage_ms, \
           evidence::jsonb, next_rung \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], \
                     $6::int8[], $7::text[], $8::int8[]) \
           AS u(id, symptom, subject, severity, opened_at_ms, predicted_outage_ms, \
                evidence, next_rung) \
         ON CONFLICT DO NOTHING",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| r.symptom))
    .bind(column(rows, |r| text(&r.subject)))
    .bind(column(rows, |r| r.severity))
    .bind(column(rows, |r| r.opened_at_ms))
    .bind(column(rows, |r| r.predicted_outage_ms))
    .bind(column(rows, |r| json(r.evidence)))
    .bind(column(rows, |r| r.next_rung))
}

fn incidents_closed(rows: &[run::IncidentClosed<'_>]) -> PgQuery {
    // First close wins; a closed incident stays as it closed.
    sqlx::query(
        "UPDATE incidents AS i SET closed_at_ms = u.at_ms, resolution = u.resolution \
         FROM (SELECT DISTINCT ON (id) id, at_ms, resolution \
               FROM UNNEST($1::text[], $2::int8[], $3::text[]) \
                 WITH ORDINALITY AS u(id, at_ms, resolution, ord) \
               ORDER BY id, ord) AS u \
         WHERE i.id = u.id AND i.closed_at_ms IS NULL",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| r.at_ms))
    .bind(column(rows, |r| text(r.resolution)))
}

fn incidents_escalated(rows: &[run::IncidentEscalated<'_>]) -> PgQuery {
    // Last escalation wins.
    sqlx::query(
        "UPDATE incidents AS i SET next_rung = u.next_rung \
         FROM (SELECT DISTINCT ON (id) id, next_rung \
               FROM UNNEST($1::text[], $2::int8[]) WITH ORDINALITY AS u(id, next_rung, ord) \
               ORDER BY id, ord DESC) AS u \
         WHERE i.id = u.id",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| r.next_rung))
}

fn actions_started(rows: &[run::ActionStarted<'_>]) -> PgQuery {
    sqlx::query(
        "INSERT INTO actions (id, incident_id, symptom, rung, actuator, target, params, \
           dry_run, started_at_ms) \
         SELECT id, incident_id, symptom, rung, actuator, target, params::jsonb, \
           dry_run, started_at_ms \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], \
                     $6::text[], $7::text[], $8::bool[], $9::int8[]) \
           AS u(id, incident_id, symptom, rung, actuator, target, params, dry_run, \
                started_at_ms) \
         ON CONFLICT DO NOTHING",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| text(r.incident_id)))
    .bind(column(rows, |r| r.symptom))
    .bind(column(rows, |r| r.rung))
    .bind(column(rows, |r| text(r.actuator)))
    .bind(column(rows, |r| text(r.target)))
    .bind(column(rows, |r| json(r.params)))
    .bind(column(rows, |r| r.dry_run))
    .bind(column(rows, |r| r.started_at_ms))
}

fn actions_finished(rows: &[run::ActionFinished<'_>]) -> PgQuery {
    // First finish wins.
    sqlx::query(
        "UPDATE actions AS a SET finished_at_ms = u.at_ms, outcome = u.outcome, \
           detail = u.detail::jsonb, error = u.error \
         FROM (SELECT DISTINCT ON (id) id, at_ms, outcome, detail, error \
               FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[]) \
                 WITH ORDINALITY AS u(id, at_ms, outcome, detail, error, ord) \
               ORDER BY id, ord) AS u \
         WHERE a.id = u.id AND a.finished_at_ms IS NULL",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| r.at_ms))
    .bind(column(rows, |r| r.outcome))
    .bind(column(rows, |r| json(r.detail)))
    .bind(column(rows, |r| r.error.map(text)))
}

fn actions_verified(rows: &[run::ActionVerified<'_>]) -> PgQuery {
    // First verdict wins.
    sqlx::query(
        "UPDATE actions AS a SET verification = u.verification, verified_at_ms = u.at_ms \
         FROM (SELECT DISTINCT ON (id) id, verification, at_ms \
               FROM UNNEST($1::text[], $2::text[], $3::int8[]) \
                 WITH ORDINALITY AS u(id, verification, at_ms, ord) \
               ORDER BY id, ord) AS u \
         WHERE a.id = u.id AND a.verification IS NULL",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| r.verification))
    .bind(column(rows, |r| r.at_ms))
}

fn holds(rows: &[run::Held<'_>]) -> PgQuery {
    sqlx::query(
        "INSERT INTO holds (incident_id, actuator, target, reason, at_ms) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(column(rows, |r| text(r.incident_id)))
    .bind(column(rows, |r| text(r.actuator)))
    .bind(column(rows, |r| text(r.target)))
    .bind(column(rows, |r| text(r.reason)))
    .bind(column(rows, |r| r.at_ms))
}

fn incidents_need_operator(rows: &[run::IncidentNeedsOperator<'_>]) -> PgQuery {
    // Last verdict wins, as for escalations.
    sqlx::query(
        "UPDATE incidents AS i SET needs_operator = u.reason, needs_operator_at_ms = u.at_ms \
         FROM (SELECT DISTINCT ON (id) id, reason, at_ms \
               FROM UNNEST($1::text[], $2::text[], $3::int8[]) \
                 WITH ORDINALITY AS u(id, reason, at_ms, ord) \
               ORDER BY id, ord DESC) AS u \
         WHERE i.id = u.id",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| text(r.reason)))
    .bind(column(rows, |r| r.at_ms))
}

fn agents_identified(rows: &[run::AgentIdentified<'_>]) -> PgQuery {
    // One row per SPIFFE ID first (ON CONFLICT DO UPDATE may touch a row
    // only once per statement): the earliest sighting, and the latest one
    // (the later in batch order on a tie) with its agent and source. Then
    // the same rule against the stored row, which SET reads as it was.
    sqlx::query(
        "INSERT INTO agent_identities (spiffe_id, agent, source, first_seen_ms, last_seen_ms) \
         SELECT spiffe_id, agent, source, first_seen_ms, at_ms \
         FROM (SELECT DISTINCT ON (spiffe_id) spiffe_id, agent, source, at_ms, \
                 min(at_ms) OVER (PARTITION BY spiffe_id) AS first_seen_ms \
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) \
                 WITH ORDINALITY AS u(spiffe_id, agent, source, at_ms, ord) \
               ORDER BY spiffe_id, at_ms DESC, ord DESC) AS u \
         ON CONFLICT (spiffe_id) DO UPDATE SET \
           agent = CASE WHEN EXCLUDED.last_seen_ms >= agent_identities.last_seen_ms \
             THEN EXCLUDED.agent ELSE agent_identities.agent END, \
           source = CASE WHEN EXCLUDED.last_seen_ms >= agent_identities.last_seen_ms \
             THEN EXCLUDED.source ELSE agent_identities.source END, \
           first_seen_ms = LEAST(agent_identities.first_seen_ms, EXCLUDED.first_seen_ms), \
           last_seen_ms = GREATEST(agent_identities.last_seen_ms, EXCLUDED.last_seen_ms)",
    )
    .bind(column(rows, |r| text(r.spiffe_id)))
    .bind(column(rows, |r| text(r.agent)))
    .bind(column(rows, |r| r.source))
    .bind(column(rows, |r| r.at_ms))
}

fn approvals_requested(rows: &[run::ApprovalRequested<'_>]) -> PgQuery {
    sqlx::query(
        "INSERT INTO approvals (id, incident_id, symptom, rung, actuator, target, state, \
           requested_at_ms, expires_at_ms) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], \
                              $6::text[], $7::text[], $8::int8[], $9::int8[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(column(rows, |r| text(r.id)))
    .bind(column(rows, |r| text(r.incident_id)))
    .bind(column(rows, |r| r.symptom))
    .bind(column(rows, |r| r.rung))
    .bind(column(rows, |r| text(r.actuator)))
    .bind(column(rows, |r| text(r.target)))
    .bind(column(rows, |r| r.state))
    .bind(column(rows, |r| r.requested_at_ms))
    .bind(column(rows, |r| r.expires_at_ms))
}

fn approval_decided(r: &run::ApprovalDecided<'_>) -> PgQuery {
    sqlx::query(run::APPROVAL_DECIDED_SQL)
        .bind(r.state)
        .bind(r.by.map(text))
        .bind(r.reason.map(text))
        .bind(r.action_id.map(text))
        .bind(r.rank)
        .bind(r.at_ms)
        .bind(text(r.id))
}

fn control_changed(r: &run::ControlChanged<'_>) -> PgQuery {
    // One statement per change: `seq` follows batch order exactly.
    sqlx::query(
        "INSERT INTO control_changes (id, control, change, changed_by, reason, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(text(r.id))
    .bind(r.control)
    .bind(r.change)
    .bind(text(r.by))
    .bind(r.reason.map(text))
    .bind(r.at_ms)
}

fn demoted(r: &run::Demoted<'_>) -> PgQuery {
    sqlx::query(run::DEMOTED_SQL)
        .bind(r.symptom)
        .bind(text(r.actuator))
        .bind(r.verified)
        .bind(r.runs)
        .bind(r.at_ms)
}

fn demotion_reset(r: &run::DemotionReset<'_>) -> PgQuery {
    sqlx::query(run::DEMOTION_RESET_SQL)
        .bind(r.symptom)
        .bind(text(r.actuator))
        .bind(r.at_ms)
        .bind(text(r.by))
}

/// Audit rows, with the context the event did not carry taken from the
/// approval and the incident they name (when known).
fn audit_rows(rows: &[run::Audit<'_>]) -> PgQuery {
    sqlx::query(
        "INSERT INTO audit (id, at_ms, kind, actor, incident_id, action_id, approval_id, \
           symptom, actuator, target, reason, detail) \
         SELECT u.id, u.at_ms, u.kind, u.actor, coalesce(u.incident_id, a.incident_id), \
           u.action_id, u.approval_id, \
           coalesce(u.symptom, a.symptom, (SELECT i.symptom FROM incidents i \
             WHERE i.id = coalesce(u.incident_id, a.incident_id))), \
           coalesce(u.actuator, a.actuator), coalesce(u.target, a.target), u.reason, \
           u.detail::jsonb \
         FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[]) \
           AS u(id, at_ms, kind, actor, incident_id, action_id, approval_id, symptom, \
                actuator, target, reason, detail) \
         LEFT JOIN approvals a ON a.id = u.approval_id \
         ON CONFLICT DO NOTHING",
    )
    .bind(column(rows, |r| text(&r.id)))
    .bind(column(rows, |r| r.at_ms))
    .bind(column(rows, |r| r.kind))
    .bind(column(rows, |r| text(r.actor)))
    .bind(column(rows, |r| r.incident_id.map(text)))
    .bind(column(rows, |r| r.action_id.map(text)))
    .bind(column(rows, |r| r.approval_id.map(text)))
    .bind(column(rows, |r| r.symptom))
    .bind(column(rows, |r| r.actuator.map(text)))
    .bind(column(rows, |r| r.target.map(text)))
    .bind(column(rows, |r| r.reason.map(text)))
    .bind(column(rows, |r| json(&r.detail)))
}

/// PostgreSQL text cannot hold NUL, and one such string (say, in an
/// actuator's output tail) would fail its batch on every retry. Replaced by
/// U+FFFD.
fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

/// JSON text for a `jsonb` column, which rejects `\u0000` for the same
/// reason as [`text`].
fn json(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.contains("\\u0000") {
        scrub_nul(v.clone()).to_string()
    } else {
        s
    }
}

fn scrub_nul(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(text(&s)),
        Value::Array(items) => Value::Array(items.into_iter().map(scrub_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (text(&k), scrub_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

// === Reads ===

fn incident_record(row: &PgRow) -> Result<IncidentRecord, StoreError> {
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

fn action_record(row: &PgRow) -> Result<ActionRecord, StoreError> {
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

fn svid_record(row: &PgRow) -> Result<SvidRecord, StoreError> {
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

fn hold_record(row: &PgRow) -> Result<HoldRecord, StoreError> {
    Ok(HoldRecord {
        id: col::<i64>(row, "id")?.to_string(),
        incident_id: col(row, "incident_id")?,
        actuator: col(row, "actuator")?,
        target: col(row, "target")?,
        reason: col(row, "reason")?,
        at_ms: col(row, "at_ms")?,
    })
}

fn approval_record(row: &PgRow) -> Result<ApprovalRecord, StoreError> {
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

fn audit_record(row: &PgRow) -> Result<AuditRecord, StoreError> {
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

fn demotion_record(row: &PgRow) -> Result<DemotionRecord, StoreError> {
    Ok(DemotionRecord {
        symptom: col(row, "symptom")?,
        actuator: col(row, "actuator")?,
        verified: count(col(row, "verified")?, "verified")?,
        runs: count(col(row, "runs")?, "runs")?,
        demoted_at_ms: col(row, "demoted_at_ms")?,
    })
}

fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}

fn json_col(row: &PgRow, name: &str) -> Result<serde_json::Value, StoreError> {
    let text: String = col(row, name)?;
    parse_json(name, &text)
}

fn parse_json(name: &str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}
