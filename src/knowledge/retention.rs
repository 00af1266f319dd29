//! Retention: rows older than `[database.retention]` (and replay frames
//! older than `[replay] retention`) deleted by one background task, in
//! batches, on both backends.
//!
//! What goes, oldest first, each by its own time:
//! - replaced SVID lifecycles, by `replaced_at_ms` (`svids`). A serial still
//!   served (`replaced_at_ms IS NULL`) is never pruned, however old; the
//!   `svid_names` pairs no lifecycle names any more go after them;
//! - holds, by `at_ms` (`holds`);
//! - closed incidents, by `closed_at_ms` (`incidents`), with their actions,
//!   approvals and holds. An open incident and its rows are never pruned;
//! - audit rows, by `at_ms` (`audit`). They are not pruned with their
//!   incident: the record of who decided what stands on its own and may be
//!   kept longer than the incidents it names;
//! - replay frames, by `at_ms` (`[replay] retention`).
//!
//! A zero duration keeps that kind of row forever.
//!
//! Bounded: every DELETE removes at most [`MAX_BATCH`] rows (closed
//! incidents are taken [`INCIDENTS_PER_ROUND`] at a time), and the pruner
//! pauses between statements. On SQLite, whose one writer is also the
//! loop's, no write of the loop then waits for more than one small
//! statement. A failed pass is logged and counted, never fatal: what it
//! deleted stays deleted, and the next pass goes on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::frames::{self, FrameStore};
use super::postgres::pg_error;
use super::{PostgresStore, SqliteStore, StoreError};
use crate::clock::{Clock, unix_millis};
use crate::telemetry::Metrics;

/// The PostgreSQL transaction-level advisory lock between writers of SVID
/// lifecycles (shared) and the pruner of `svid_names` (exclusive): a pair
/// the writer found is not deleted before its lifecycle is committed.
/// SQLite needs none: its writers are serialized. The first 8 bytes of
/// SHA-256(`spire-healer/svid_names`), as the scope locks derive theirs.
pub const SVID_NAMES_LOCK: i64 = 2_500_761_781_936_539_291;

/// Most rows one DELETE removes.
pub const MAX_BATCH: u32 = frames::MAX_PRUNE_BATCH;

/// Closed incidents whose rows are deleted together, per round.
pub const INCIDENTS_PER_ROUND: u32 = 100;

/// How often a pass runs.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The pause between two statements of a pass: the loop's writes get the
/// database in between.
pub const BATCH_PAUSE: Duration = Duration::from_millis(25);

/// Shortest retention other than zero (forever): rows younger than an hour
/// are what the loop reads back at start (cooldowns, the hourly budget).
const MIN_RETENTION: Duration = Duration::from_secs(3600);

// === Configuration ===

/// `[database.retention]`: how long each kind of row is kept. `"0s"` keeps
/// it forever.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRetention")]
pub struct RetentionConfig {
    /// Replaced SVID lifecycles, counted from their replacement. The bulk
    /// of the store: a fleet of 100,000 SVIDs rotating hourly writes 2.4
    /// million a day.
    pub svids: Duration,
    /// Holds (decisions not to act), counted from the decision.
    pub holds: Duration,
    /// Closed incidents with their actions, approvals and holds, counted
    /// from the close. The verdicts that demote a step are read from the
    /// actions: older ones than this no longer count.
    pub incidents: Duration,
    /// Audit rows, counted from the decision. Forever by default: an audit
    /// trail is kept for as long as someone decides it must be.
    pub audit: Duration,
}

const DAY: u64 = 86_400;

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            svids: Duration::from_secs(7 * DAY),
            holds: Duration::from_secs(30 * DAY),
            incidents: Duration::from_secs(90 * DAY),
            audit: Duration::ZERO,
        }
    }
}

/// `[database.retention]` as written, before its checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    #[serde(default = "d_svids", with = "humantime_serde")]
    svids: Duration,
    #[serde(default = "d_holds", with = "humantime_serde")]
    holds: Duration,
    #[serde(default = "d_incidents", with = "humantime_serde")]
    incidents: Duration,
    #[serde(default = "d_audit", with = "humantime_serde")]
    audit: Duration,
}

fn d_svids() -> Duration {
    RetentionConfig::default().svids
}
fn d_holds() -> Duration {
    RetentionConfig::default().holds
}
fn d_incidents() -> Duration {
    RetentionConfig::default().incidents
}
fn d_audit() -> Duration {
    RetentionConfig::default().audit
}

impl TryFrom<RawRetention> for RetentionConfig {
    type Error = String;

    /// Every problem of the section, joined.
    fn try_from(raw: RawRetention) -> Result<Self, String> {
        let problems: Vec<String> = [
            ("svids", raw.svids),
            ("holds", raw.holds),
            ("incidents", raw.incidents),
            ("audit", raw.audit),
        ]
        .into_iter()
        .filter(|(_, d)| !d.is_zero() && *d < MIN_RETENTION)
        .map(|(name, d)| {
            format!(
                "{name} = {} must be at least 1h (or 0s: keep forever)",
                humantime::format_duration(d)
            )
        })
        .collect();
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Self {
            svids: raw.svids,
            holds: raw.holds,
            incidents: raw.incidents,
            audit: raw.audit,
        })
    }
}

// === What a pass prunes ===

/// A table pruned by retention: the `table` label of
/// `spire_healer_store_pruned_rows_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    ReplayFrames,
    SvidLifecycles,
    SvidNames,
    Holds,
    Actions,
    Approvals,
    Incidents,
    Audit,
}

impl Table {
    /// Every table, in the order a pass prunes them.
    pub const ALL: [Table; 8] = [
        Self::ReplayFrames,
        Self::SvidLifecycles,
        Self::SvidNames,
        Self::Holds,
        Self::Actions,
        Self::Approvals,
        Self::Incidents,
        Self::Audit,
    ];

    /// The table's name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReplayFrames => "replay_frames",
            Self::SvidLifecycles => "svid_lifecycles",
            Self::SvidNames => "svid_names",
            Self::Holds => "holds",
            Self::Actions => "actions",
            Self::Approvals => "approvals",
            Self::Incidents => "incidents",
            Self::Audit => "audit",
        }
    }
}

/// The cut-off times of one pass (unix ms): rows strictly older go.
/// `None` keeps that kind of row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cuts {
    pub replay_frames: Option<i64>,
    pub svids: Option<i64>,
    pub holds: Option<i64>,
    pub incidents: Option<i64>,
    pub audit: Option<i64>,
}

impl Cuts {
    /// The cuts at `now` for `cfg` and the replay frames' retention.
    pub fn at(now: SystemTime, cfg: &RetentionConfig, replay_frames: Duration) -> Self {
        let cut = |keep: Duration| {
            (!keep.is_zero())
                .then(|| unix_millis(now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH)))
        };
        Self {
            replay_frames: cut(replay_frames),
            svids: cut(cfg.svids),
            holds: cut(cfg.holds),
            incidents: cut(cfg.incidents),
            audit: cut(cfg.audit),
        }
    }
}

/// Rows deleted, by table, and the most that one statement deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    rows: BTreeMap<Table, u64>,
    largest: u64,
}

impl Pruned {
    /// Rows deleted from `table`.
    pub fn get(&self, table: Table) -> u64 {
        self.rows.get(&table).copied().unwrap_or(0)
    }

    /// Every table with rows deleted.
    pub fn iter(&self) -> impl Iterator<Item = (Table, u64)> + '_ {
        self.rows
            .iter()
            .map(|(t, n)| (*t, *n))
            .filter(|(_, n)| *n > 0)
    }

    /// The most rows one statement deleted: at most the pruner's batch.
    pub fn largest_statement(&self) -> u64 {
        self.largest
    }

    /// One statement deleted `n` rows of `table`.
    fn add(&mut self, table: Table, n: u64) {
        *self.rows.entry(table).or_default() += n;
        self.largest = self.largest.max(n);
    }
}

// === Statements ===

/// The oldest replaced lifecycles. SQLite by rowid; PostgreSQL by key.
const SVIDS_SQLITE: &str = "DELETE FROM svid_lifecycles WHERE rowid IN \
     (SELECT rowid FROM svid_lifecycles WHERE replaced_at_ms < $1 \
      ORDER BY replaced_at_ms LIMIT $2)";
const SVIDS_POSTGRES: &str = "DELETE FROM svid_lifecycles WHERE (name_id, serial) IN \
     (SELECT name_id, serial FROM svid_lifecycles WHERE replaced_at_ms < $1 \
      ORDER BY replaced_at_ms LIMIT $2)";
/// The last id of the next window of pairs after $1.
const NAMES_WINDOW: &str = "SELECT max(id) AS hi FROM \
     (SELECT id FROM svid_names WHERE id > $1 ORDER BY id LIMIT $2) AS w";
/// The pairs of a window that no lifecycle names.
const NAMES: &str = "DELETE FROM svid_names WHERE id > $1 AND id <= $2 \
     AND NOT EXISTS (SELECT 1 FROM svid_lifecycles s WHERE s.name_id = svid_names.id)";
const HOLDS: &str = "DELETE FROM holds WHERE id IN \
     (SELECT id FROM holds WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)";
const AUDIT: &str = "DELETE FROM audit WHERE id IN \
     (SELECT id FROM audit WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)";

/// The incidents of one round: the oldest closed before $1, at most $2.
/// Their rows go $3 at a time.
macro_rules! round {
    () => {
        "SELECT id FROM incidents WHERE closed_at_ms < $1 ORDER BY closed_at_ms, id LIMIT $2"
    };
}
const ROUND_ACTIONS: &str = concat!(
    "DELETE FROM actions WHERE id IN (SELECT id FROM actions WHERE incident_id IN (",
    round!(),
    ") LIMIT $3)"
);
const ROUND_APPROVALS: &str = concat!(
    "DELETE FROM approvals WHERE id IN (SELECT id FROM approvals WHERE incident_id IN (",
    round!(),
    ") LIMIT $3)"
);
const ROUND_HOLDS: &str = concat!(
    "DELETE FROM holds WHERE id IN (SELECT id FROM holds WHERE incident_id IN (",
    round!(),
    ") LIMIT $3)"
);
/// The round's incidents whose rows are gone. An incident that joined the
/// round after its rows were deleted (a clock that stepped back) keeps its
/// rows and waits for the next round.
const ROUND_INCIDENTS: &str = concat!(
    "DELETE FROM incidents WHERE id IN (",
    round!(),
    ") \
     AND NOT EXISTS (SELECT 1 FROM actions a WHERE a.incident_id = incidents.id) \
     AND NOT EXISTS (SELECT 1 FROM approvals p WHERE p.incident_id = incidents.id) \
     AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.incident_id = incidents.id)"
);

// === impl Pruner ===

/// Deletes old rows of one knowledge store (see the module docs).
#[derive(Debug, Clone)]
pub struct Pruner {
    frames: FrameStore,
    batch: u32,
    pause: Duration,
}

impl Pruner {
    /// A pruner over the store `frames` belongs to (one pool for both),
    /// deleting [`MAX_BATCH`] rows per statement with [`BATCH_PAUSE`]
    /// between statements.
    pub fn new(frames: &FrameStore) -> Self {
        Self {
            frames: frames.clone(),
            batch: MAX_BATCH,
            pause: BATCH_PAUSE,
        }
    }

    /// The same with at most `batch` rows per statement (1 to
    /// [`MAX_BATCH`]) and `pause` between statements.
    pub fn with_batches(mut self, batch: u32, pause: Duration) -> Self {
        self.batch = batch.clamp(1, MAX_BATCH);
        self.pause = pause;
        self
    }

    /// One pass: deletes every row older than its cut, batch by batch,
    /// adding what went to `pruned` as it goes (so a failed pass still
    /// tells what it did).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database is away, `Query` when
    /// a statement fails; the pass stops there.
    ///
    /// # Cancel safety
    /// Cancel-safe between statements: every statement commits on its own
    /// (the PostgreSQL pair deletion in its own transaction).
    pub async fn prune(&self, cuts: &Cuts, pruned: &mut Pruned) -> Result<(), StoreError> {
        let batch = i64::from(self.batch);
        if let Some(cut) = cuts.replay_frames {
            loop {
                let n = self.frames.prune_batch(cut, self.batch).await?;
                pruned.add(Table::ReplayFrames, n);
                self.pause().await;
                if n < u64::from(self.batch) {
                    break;
                }
            }
        }
        if let Some(cut) = cuts.svids {
            let svids = match self.frames.backend() {
                frames::Backend::Sqlite(_) => SVIDS_SQLITE,
                frames::Backend::Postgres(_) => SVIDS_POSTGRES,
            };
            // Pairs lose their last lifecycle only here, so a pass that
            // deleted none has no pair to look for (one left by a pass cut
            // short goes at the next that deletes lifecycles).
            if self
                .drain(svids, &[cut, batch], Table::SvidLifecycles, pruned)
                .await?
                > 0
            {
                self.prune_names(pruned).await?;
            }
        }
        if let Some(cut) = cuts.holds {
            self.drain(HOLDS, &[cut, batch], Table::Holds, pruned)
                .await?;
        }
        if let Some(cut) = cuts.incidents {
            self.prune_incidents(cut, pruned).await?;
        }
        if let Some(cut) = cuts.audit {
            self.drain(AUDIT, &[cut, batch], Table::Audit, pruned)
                .await?;
        }
        Ok(())
    }

    /// Runs a pass now and every `every` after until `shutdown`, with the
    /// cuts of `cfg` and the replay frames' `replay_retention` at the
    /// clock's time. Rows deleted are counted by table, each pass timed;
    /// a failed pass is logged and counted as a store error and the next
    /// one tries again.
    pub async fn run(
        self,
        cfg: RetentionConfig,
        replay_retention: Duration,
        every: Duration,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        for t in Table::ALL {
            metrics
                .store_pruned_rows_total
                .with_label_values(&[t.as_str()]);
        }
        loop {
            let cuts = Cuts::at(clock.now(), &cfg, replay_retention);
            let mut pruned = Pruned::default();
            let started = tokio::time::Instant::now();
            let pass = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                r = self.prune(&cuts, &mut pruned) => r,
            };
            metrics
                .store_prune_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            for (table, n) in pruned.iter() {
                metrics
                    .store_pruned_rows_total
                    .with_label_values(&[table.as_str()])
                    .inc_by(n);
                if table == Table::ReplayFrames {
                    metrics
                        .replay_frames_total
                        .with_label_values(&[crate::replay::frames::FrameOutcome::Pruned.as_str()])
                        .inc_by(n);
                }
            }
            match pass {
                Ok(()) => debug!(?pruned, "Retention pass done."),
                Err(e) => {
                    metrics.error("store", e.kind());
                    warn!(error = %e, "Cannot prune old rows; trying again at the next pass.");
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Runs `sql` (deleting at most `batch` rows) until it deletes fewer.
    async fn drain(
        &self,
        sql: &'static str,
        args: &[i64],
        table: Table,
        pruned: &mut Pruned,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self.execute(sql, args).await?;
            pruned.add(table, n);
            total += n;
            self.pause().await;
            if n < u64::from(self.batch) {
                return Ok(total);
            }
        }
    }

    /// Deletes the pairs no lifecycle names, window by window of `batch`
    /// pairs in id order.
    async fn prune_names(&self, pruned: &mut Pruned) -> Result<(), StoreError> {
        let mut after = 0_i64;
        while let Some(hi) = self.window_end(after).await? {
            let n = match self.frames.backend() {
                frames::Backend::Sqlite(s) => sqlite_exec(s, NAMES, &[after, hi]).await?,
                frames::Backend::Postgres(s) => postgres_names(s, after, hi).await?,
            };
            pruned.add(Table::SvidNames, n);
            after = hi;
            self.pause().await;
        }
        Ok(())
    }

    /// Closed incidents, [`INCIDENTS_PER_ROUND`] at a time: their actions,
    /// approvals and holds first, in batches, then the incidents.
    async fn prune_incidents(&self, cut: i64, pruned: &mut Pruned) -> Result<(), StoreError> {
        let round = i64::from(INCIDENTS_PER_ROUND);
        let args = [cut, round, i64::from(self.batch)];
        loop {
            self.drain(ROUND_ACTIONS, &args, Table::Actions, pruned)
                .await?;
            self.drain(ROUND_APPROVALS, &args, Table::Approvals, pruned)
                .await?;
            self.drain(ROUND_HOLDS, &args, Table::Holds, pruned).await?;
            let n = self.execute(ROUND_INCIDENTS, &[cut, round]).await?;
            pruned.add(Table::Incidents, n);
            self.pause().await;
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// The last pair id of the window after `after`; `None` past the end.
    async fn window_end(&self, after: i64) -> Result<Option<i64>, StoreError> {
        let batch = i64::from(self.batch);
        match self.frames.backend() {
            frames::Backend::Sqlite(s) => sqlx::query(NAMES_WINDOW)
                .bind(after)
                .bind(batch)
                .fetch_one(s.pool())
                .await
                .and_then(|r| r.try_get::<Option<i64>, _>("hi"))
                .map_err(StoreError::from_sqlx),
            frames::Backend::Postgres(s) => {
                s.bounded(async {
                    sqlx::query(NAMES_WINDOW)
                        .bind(after)
                        .bind(batch)
                        .fetch_one(s.pool())
                        .await
                        .and_then(|r| r.try_get::<Option<i64>, _>("hi"))
                        .map_err(pg_error)
                })
                .await
            }
        }
    }

    /// Runs one statement binding `args` in order; the rows it deleted.
    async fn execute(&self, sql: &'static str, args: &[i64]) -> Result<u64, StoreError> {
        match self.frames.backend() {
            frames::Backend::Sqlite(s) => sqlite_exec(s, sql, args).await,
            frames::Backend::Postgres(s) => {
                s.bounded(async {
                    args.iter()
                        .fold(sqlx::query(sql), |q, a| q.bind(*a))
                        .execute(s.pool())
                        .await
                        .map(|r| r.rows_affected())
                        .map_err(pg_error)
                })
                .await
            }
        }
    }

    async fn pause(&self) {
        if self.pause.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(self.pause).await;
        }
    }
}

async fn sqlite_exec(s: &SqliteStore, sql: &'static str, args: &[i64]) -> Result<u64, StoreError> {
    args.iter()
        .fold(sqlx::query(sql), |q, a| q.bind(*a))
        .execute(s.pool())
        .await
        .map(|r| r.rows_affected())
        .map_err(StoreError::from_sqlx)
}

/// One window of pairs, under the exclusive [`SVID_NAMES_LOCK`]: it waits
/// for the lifecycle writers in flight, and their next batch waits for it.
async fn postgres_names(s: &PostgresStore, after: i64, hi: i64) -> Result<u64, StoreError> {
    s.bounded(async {
        let mut tx = s.pool().begin().await.map_err(pg_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SVID_NAMES_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        let n = sqlx::query(NAMES)
            .bind(after)
            .bind(hi)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?
            .rows_affected();
        tx.commit().await.map_err(pg_error)?;
        Ok(n)
    })
    .await
}

#[cfg(test)]
mod tests;
