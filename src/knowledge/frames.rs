//! The replay frames (`replay_frames`, migration 0004) on both backends:
//! inserted in small batches by the frame writer, read back in time order
//! and in pages by `spire-healer replay`, pruned by age in batches of at
//! most [`MAX_PRUNE_BATCH`] rows so that no statement holds the database
//! for long. The frames themselves are opaque JSON text here
//! ([`crate::replay::frames`] knows what is inside).
//!
//! The SQL is the same on both backends (numbered placeholders, row
//! values); only the pools differ.

use std::sync::Arc;

use sqlx::Row;

use super::{PostgresStore, SqliteStore, Store, StoreError};

/// Most rows one prune statement deletes.
pub const MAX_PRUNE_BATCH: u32 = 1000;

/// One stored frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFrame {
    /// The recording process (its run id).
    pub run_id: String,
    /// That process's tick count when it recorded the frame.
    pub seq: i64,
    /// The tick's time (unix ms).
    pub at_ms: i64,
    /// The frame's JSON.
    pub frame: String,
}

impl StoredFrame {
    /// Where the next page after this frame starts.
    pub fn key(&self) -> FrameKey {
        FrameKey {
            at_ms: self.at_ms,
            run_id: self.run_id.clone(),
            seq: self.seq,
        }
    }
}

/// A position in `(at_ms, run_id, seq)` order: a page starts strictly
/// after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameKey {
    pub at_ms: i64,
    pub run_id: String,
    pub seq: i64,
}

/// The frames table of a knowledge store.
#[derive(Debug, Clone)]
pub struct FrameStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
pub(super) enum Backend {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

const INSERT: &str = "INSERT INTO replay_frames (run_id, seq, at_ms, frame) \
                      VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
const READ_FIRST: &str = "SELECT run_id, seq, at_ms, frame FROM replay_frames \
                          WHERE at_ms >= $1 AND at_ms < $2 \
                          ORDER BY at_ms, run_id, seq LIMIT $3";
const READ_AFTER: &str = "SELECT run_id, seq, at_ms, frame FROM replay_frames \
                          WHERE at_ms >= $1 AND at_ms < $2 AND (at_ms, run_id, seq) > ($3, $4, $5) \
                          ORDER BY at_ms, run_id, seq LIMIT $6";
/// The oldest rows first, through the primary key (both backends take row
/// values in `IN`).
const PRUNE: &str = "DELETE FROM replay_frames WHERE (run_id, seq) IN \
                     (SELECT run_id, seq FROM replay_frames WHERE at_ms < $1 \
                      ORDER BY at_ms LIMIT $2)";

impl FrameStore {
    /// The frames of a SQLite store.
    pub fn sqlite(store: &SqliteStore) -> Self {
        Self {
            backend: Backend::Sqlite(store.clone()),
        }
    }

    /// The frames of a PostgreSQL store.
    pub fn postgres(store: &PostgresStore) -> Self {
        Self {
            backend: Backend::Postgres(store.clone()),
        }
    }

    /// The store the frames are in (the retention pruner shares its pool).
    pub(super) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Inserts `frames` in one transaction. A frame already stored (same run
    /// and seq) is left as it is, so a retried batch never duplicates.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database is away, `Query` when
    /// it refuses the rows.
    pub async fn insert(&self, frames: &[StoredFrame]) -> Result<(), StoreError> {
        if frames.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Sqlite(s) => {
                // The write lock up front, as the event writes take it.
                let mut tx = s
                    .pool()
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(StoreError::from_sqlx)?;
                for f in frames {
                    sqlx::query(INSERT)
                        .bind(f.run_id.clone())
                        .bind(f.seq)
                        .bind(f.at_ms)
                        .bind(f.frame.clone())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from_sqlx)?;
                }
                tx.commit().await.map_err(StoreError::from_sqlx)
            }
            Backend::Postgres(s) => {
                s.bounded(async {
                    let mut tx = s.pool().begin().await.map_err(super::postgres::pg_error)?;
                    for f in frames {
                        sqlx::query(INSERT)
                            .bind(f.run_id.clone())
                            .bind(f.seq)
                            .bind(f.at_ms)
                            .bind(f.frame.clone())
                            .execute(&mut *tx)
                            .await
                            .map_err(super::postgres::pg_error)?;
                    }
                    tx.commit().await.map_err(super::postgres::pg_error)
                })
                .await
            }
        }
    }

    /// At most `limit` frames with `since_ms <= at_ms < until_ms`, in
    /// `(at_ms, run_id, seq)` order, starting after `after` (the last
    /// frame of the previous page).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database is away, `Query` when
    /// the table is missing (a store older than migration 0004).
    pub async fn read(
        &self,
        since_ms: i64,
        until_ms: i64,
        after: Option<&FrameKey>,
        limit: u32,
    ) -> Result<Vec<StoredFrame>, StoreError> {
        let limit = i64::from(limit.max(1));
        macro_rules! fetch {
            ($pool:expr, $err:expr) => {{
                let rows = match after {
                    None => {
                        sqlx::query(READ_FIRST)
                            .bind(since_ms)
                            .bind(until_ms)
                            .bind(limit)
                            .fetch_all($pool)
                            .await
                    }
                    Some(k) => {
                        sqlx::query(READ_AFTER)
                            .bind(since_ms)
                            .bind(until_ms)
                            .bind(k.at_ms)
                            .bind(k.run_id.clone())
                            .bind(k.seq)
                            .bind(limit)
                            .fetch_all($pool)
                            .await
                    }
                }
                .map_err($err)?;
                rows.iter()
                    .map(|r| {
                        Ok(StoredFrame {
                            run_id: r.try_get("run_id").map_err(StoreError::from_sqlx)?,
                            seq: r.try_get("seq").map_err(StoreError::from_sqlx)?,
                            at_ms: r.try_get("at_ms").map_err(StoreError::from_sqlx)?,
                            frame: r.try_get("frame").map_err(StoreError::from_sqlx)?,
                        })
                    })
                    .collect()
            }};
        }
        match &self.backend {
            Backend::Sqlite(s) => fetch!(s.pool(), StoreError::from_sqlx),
            Backend::Postgres(s) => {
                s.bounded(async { fetch!(s.pool(), super::postgres::pg_error) })
                    .await
            }
        }
    }

    /// Deletes at most `batch` (capped at [`MAX_PRUNE_BATCH`]) of the
    /// oldest frames recorded before `before_ms`; returns how many went.
    ///
    /// # Errors
    /// As [`FrameStore::insert`].
    pub async fn prune_batch(&self, before_ms: i64, batch: u32) -> Result<u64, StoreError> {
        let batch = i64::from(batch.clamp(1, MAX_PRUNE_BATCH));
        match &self.backend {
            Backend::Sqlite(s) => sqlx::query(PRUNE)
                .bind(before_ms)
                .bind(batch)
                .execute(s.pool())
                .await
                .map(|r| r.rows_affected())
                .map_err(StoreError::from_sqlx),
            Backend::Postgres(s) => {
                s.bounded(async {
                    sqlx::query(PRUNE)
                        .bind(before_ms)
                        .bind(batch)
                        .execute(s.pool())
                        .await
                        .map(|r| r.rows_affected())
                        .map_err(super::postgres::pg_error)
                })
                .await
            }
        }
    }

    /// Deletes every frame recorded before `before_ms`, [`MAX_PRUNE_BATCH`]
    /// rows per statement, yielding between statements so the store's
    /// other writers get their turn; returns how many went.
    ///
    /// # Errors
    /// As [`FrameStore::insert`]; what was deleted before the error stays
    /// deleted.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self.prune_batch(before_ms, MAX_PRUNE_BATCH).await?;
            total += n;
            if n < u64::from(MAX_PRUNE_BATCH) {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Opens the store named by `url` as [`super::open`] does (creating and
/// migrating it), with its frames: one pool for both.
///
/// # Errors
/// As [`super::open`].
pub async fn open(url: &str) -> Result<(Arc<dyn Store>, FrameStore), StoreError> {
    if is_postgres(url) {
        let s = PostgresStore::connect(url).await?;
        let frames = FrameStore::postgres(&s);
        Ok((Arc::new(s), frames))
    } else {
        let s = SqliteStore::open(std::path::Path::new(sqlite_path(url))).await?;
        let frames = FrameStore::sqlite(&s);
        Ok((Arc::new(s), frames))
    }
}

/// Opens an existing store for reading, as [`super::open_existing`] does
/// (never creating or migrating it), with its frames.
///
/// # Errors
/// As [`super::open_existing`].
pub async fn open_existing(url: &str) -> Result<(Arc<dyn Store>, FrameStore), StoreError> {
    if is_postgres(url) {
        let s = PostgresStore::connect_existing(url).await?;
        let frames = FrameStore::postgres(&s);
        Ok((Arc::new(s), frames))
    } else {
        let s = SqliteStore::open_existing(std::path::Path::new(sqlite_path(url))).await?;
        let frames = FrameStore::sqlite(&s);
        Ok((Arc::new(s), frames))
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knowledge::tests::PgDatabase;

    fn frame(run: &str, seq: i64, at_ms: i64) -> StoredFrame {
        StoredFrame {
            run_id: run.into(),
            seq,
            at_ms,
            frame: format!(r#"{{"seq":{seq}}}"#),
        }
    }

    /// Reads every frame in `[since, until)` in pages of `page`.
    async fn read_all(fs: &FrameStore, since: i64, until: i64, page: u32) -> Vec<StoredFrame> {
        let mut out: Vec<StoredFrame> = Vec::new();
        loop {
            let after = out.last().map(StoredFrame::key);
            let got = fs.read(since, until, after.as_ref(), page).await.unwrap();
            let done = got.len() < page as usize;
            out.extend(got);
            if done {
                return out;
            }
        }
    }

    async fn contract(fs: FrameStore) {
        // Two runs interleaved in time, one frame twice (a retried batch).
        let mut frames: Vec<StoredFrame> =
            (0..5).map(|i| frame("run-a", i, 1_000 + i * 10)).collect();
        frames.extend((0..3).map(|i| frame("run-b", i, 1_005 + i * 10)));
        fs.insert(&frames).await.unwrap();
        fs.insert(&frames[..1]).await.unwrap();
        fs.insert(&[]).await.unwrap();

        // In time order, in pages of 2, within [since, until).
        let got = read_all(&fs, 1_005, 1_040, 2).await;
        let keys: Vec<(&str, i64, i64)> = got
            .iter()
            .map(|f| (f.run_id.as_str(), f.seq, f.at_ms))
            .collect();
        assert_eq!(
            keys,
            [
                ("run-b", 0, 1_005),
                ("run-a", 1, 1_010),
                ("run-b", 1, 1_015),
                ("run-a", 2, 1_020),
                ("run-b", 2, 1_025),
                ("run-a", 3, 1_030),
            ]
        );
        assert_eq!(got[0].frame, r#"{"seq":0}"#);
        assert_eq!(read_all(&fs, 0, i64::MAX, 100).await.len(), 8);

        // Pruning: only rows before the cut, oldest first, in batches.
        assert_eq!(fs.prune_batch(1_020, 2).await.unwrap(), 2);
        let left: Vec<i64> = read_all(&fs, 0, i64::MAX, 100)
            .await
            .iter()
            .map(|f| f.at_ms)
            .collect();
        assert_eq!(left, [1_010, 1_015, 1_020, 1_025, 1_030, 1_040]);
        assert_eq!(fs.prune(1_030).await.unwrap(), 4);
        assert_eq!(fs.prune(1_030).await.unwrap(), 0);
        let left: Vec<i64> = read_all(&fs, 0, i64::MAX, 100)
            .await
            .iter()
            .map(|f| f.at_ms)
            .collect();
        assert_eq!(left, [1_030, 1_040]);

        // More than one batch: 2,000 of 2,500 rows go in two calls of
        // several statements.
        assert_eq!(fs.prune(i64::MAX).await.unwrap(), 2);
        let many: Vec<StoredFrame> = (0..2_500).map(|i| frame("run-c", i, i)).collect();
        for chunk in many.chunks(500) {
            fs.insert(chunk).await.unwrap();
        }
        assert_eq!(fs.prune(1_000).await.unwrap(), 1_000);
        assert_eq!(fs.prune(2_000).await.unwrap(), 1_000);
        assert_eq!(read_all(&fs, 0, i64::MAX, 1_000).await.len(), 500);
    }

    #[tokio::test]
    async fn sqlite_frames_are_stored_read_in_order_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let (_, fs) = open(&url).await.unwrap();
        contract(fs).await;
        // A reader sees them through the read-only opening.
        let (_, fs) = open_existing(&url).await.unwrap();
        assert_eq!(read_all(&fs, 0, i64::MAX, 10).await.len(), 500);
    }

    #[tokio::test]
    async fn postgres_frames_are_stored_read_in_order_and_pruned() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let (_, fs) = open(&db.url).await.unwrap();
        contract(fs).await;
        let (_, fs) = open_existing(&db.url).await.unwrap();
        assert_eq!(read_all(&fs, 0, i64::MAX, 10).await.len(), 500);
    }
}
