//! The store's side of leadership with fencing (see [`crate::leadership`]).
//!
//! One `leadership` row per name holds the current leader's **epoch**, a
//! fencing token that only grows: each new leader bumps it when it takes
//! over. A fenced store ([`Fence`], set by the leader on its store) checks,
//! inside every write transaction, that the row still holds its epoch
//! before writing anything, and stamps the actions it starts with that
//! epoch. A former leader that wakes up after losing its lease (paused,
//! partitioned) therefore records nothing, and since the loop launches a
//! step only once its `ActionStarted` is recorded, starts nothing.
//!
//! PostgreSQL takes the row `FOR SHARE` in the write transaction: a
//! takeover's bump waits for a write in progress, and a write after the bump
//! sees the new epoch. SQLite serialises writers (`BEGIN IMMEDIATE`), which
//! gives the same order. Expiry is on the database's clock for PostgreSQL
//! (`now()`), in Unix milliseconds of the writer's clock for SQLite (one
//! host).

use std::time::Duration;

use sqlx::{PgConnection, Row, SqliteConnection};

use super::StoreError;

/// The epoch a fenced store writes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// `[leadership] name`: the row checked.
    pub name: String,
    /// The epoch this instance took over with.
    pub epoch: i64,
}

/// A `leadership` row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeadershipRecord {
    /// Leadership name.
    pub name: String,
    /// The current leader's epoch.
    pub epoch: i64,
    /// Who holds it (`spire-healer host=… pid=… since_ms=…`).
    pub holder: String,
    /// Whether its expiry had passed when read (database clock).
    pub expired: bool,
}

/// `StoreError::Fenced` for `fence` when the row holds `current`.
fn fenced(fence: &Fence, current: Option<i64>) -> StoreError {
    StoreError::Fenced {
        name: fence.name.clone(),
        ours: fence.epoch,
        current,
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// PostgreSQL: the row still holds `fence.epoch` (taken `FOR SHARE` until
/// the transaction ends).
pub(super) async fn pg_check(conn: &mut PgConnection, fence: &Fence) -> Result<(), StoreError> {
    let current: Option<i64> =
        sqlx::query_scalar("SELECT epoch FROM leadership WHERE name = $1 FOR SHARE")
            .bind(&fence.name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::Query)?;
    if current == Some(fence.epoch) {
        Ok(())
    } else {
        Err(fenced(fence, current))
    }
}

/// PostgreSQL: stamps the actions `ids` with the fence's epoch.
pub(super) async fn pg_stamp(
    conn: &mut PgConnection,
    fence: &Fence,
    ids: &[String],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE actions SET epoch = $1 WHERE id = ANY($2)")
        .bind(fence.epoch)
        .bind(ids)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::Query)?;
    Ok(())
}

/// PostgreSQL: takes the leadership `name` for `holder`: bumps the epoch
/// (1 for a new name) and sets the expiry `lease` ahead on the database
/// clock. Returns the new epoch. The caller decides that it may take over
/// (an advisory lock or a Kubernetes Lease); this only fences the former
/// leader out.
pub async fn pg_take(
    conn: &mut PgConnection,
    name: &str,
    holder: &str,
    lease: Duration,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO leadership (name, epoch, holder, acquired_at, expires_at) \
         VALUES ($1, 1, $2, now(), now() + make_interval(secs => $3 / 1000.0)) \
         ON CONFLICT (name) DO UPDATE SET epoch = leadership.epoch + 1, \
           holder = EXCLUDED.holder, acquired_at = EXCLUDED.acquired_at, \
           expires_at = EXCLUDED.expires_at \
         RETURNING epoch",
    )
    .bind(name)
    .bind(holder)
    .bind(millis(lease) as f64)
    .fetch_one(&mut *conn)
    .await
    .map_err(super::postgres::pg_error)
}

/// PostgreSQL: renews `fence`'s expiry `lease` ahead. `false` when another
/// leader has taken over since (the row holds another epoch).
pub async fn pg_renew(
    conn: &mut PgConnection,
    fence: &Fence,
    lease: Duration,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE leadership SET expires_at = now() + make_interval(secs => $3 / 1000.0) \
         WHERE name = $1 AND epoch = $2",
    )
    .bind(&fence.name)
    .bind(fence.epoch)
    .bind(millis(lease) as f64)
    .execute(&mut *conn)
    .await
    .map_err(super::postgres::pg_error)?
    .rows_affected();
    Ok(n == 1)
}

/// PostgreSQL: the row of `name`, if any.
pub(super) async fn pg_read(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<LeadershipRecord>, StoreError> {
    let row = sqlx::query(
        "SELECT name, epoch, holder, expires_at < now() AS expired FROM leadership WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::Query)?;
    row.map(|r| {
        Ok(LeadershipRecord {
            name: r.try_get("name").map_err(StoreError::Query)?,
            epoch: r.try_get("epoch").map_err(StoreError::Query)?,
            holder: r.try_get("holder").map_err(StoreError::Query)?,
            expired: r.try_get("expired").map_err(StoreError::Query)?,
        })
    })
    .transpose()
}

/// SQLite: the row still holds `fence.epoch` (inside the writer's
/// `BEGIN IMMEDIATE`).
pub(super) async fn sqlite_check(
    conn: &mut SqliteConnection,
    fence: &Fence,
) -> Result<(), StoreError> {
    let current: Option<i64> = sqlx::query_scalar("SELECT epoch FROM leadership WHERE name = ?")
        .bind(&fence.name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::Query)?;
    if current == Some(fence.epoch) {
        Ok(())
    } else {
        Err(fenced(fence, current))
    }
}

/// SQLite: stamps the actions `ids` with the fence's epoch.
pub(super) async fn sqlite_stamp(
    conn: &mut SqliteConnection,
    fence: &Fence,
    ids: &[String],
) -> Result<(), StoreError> {
    for id in ids {
        sqlx::query("UPDATE actions SET epoch = ? WHERE id = ?")
            .bind(fence.epoch)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::Query)?;
    }
    Ok(())
}

/// SQLite: [`pg_take`] with expiry in Unix milliseconds from `now_ms`.
pub(super) async fn sqlite_take(
    conn: &mut SqliteConnection,
    name: &str,
    holder: &str,
    lease: Duration,
    now_ms: i64,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO leadership (name, epoch, holder, acquired_at, expires_at) \
         VALUES (?1, 1, ?2, ?3, ?4) \
         ON CONFLICT (name) DO UPDATE SET epoch = leadership.epoch + 1, \
           holder = excluded.holder, acquired_at = excluded.acquired_at, \
           expires_at = excluded.expires_at \
         RETURNING epoch",
    )
    .bind(name)
    .bind(holder)
    .bind(now_ms)
    .bind(now_ms.saturating_add(millis(lease)))
    .fetch_one(&mut *conn)
    .await
    .map_err(StoreError::from_sqlx)
}

/// SQLite: [`pg_renew`].
pub(super) async fn sqlite_renew(
    conn: &mut SqliteConnection,
    fence: &Fence,
    lease: Duration,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let n = sqlx::query("UPDATE leadership SET expires_at = ?3 WHERE name = ?1 AND epoch = ?2")
        .bind(&fence.name)
        .bind(fence.epoch)
        .bind(now_ms.saturating_add(millis(lease)))
        .execute(&mut *conn)
        .await
        .map_err(StoreError::from_sqlx)?
        .rows_affected();
    Ok(n == 1)
}

/// SQLite: the row of `name`, if any.
pub(super) async fn sqlite_read(
    conn: &mut SqliteConnection,
    name: &str,
    now_ms: i64,
) -> Result<Option<LeadershipRecord>, StoreError> {
    let row = sqlx::query("SELECT name, epoch, holder, expires_at FROM leadership WHERE name = ?")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::Query)?;
    row.map(|r| {
        let expires: i64 = r.try_get("expires_at").map_err(StoreError::Query)?;
        Ok(LeadershipRecord {
            name: r.try_get("name").map_err(StoreError::Query)?,
            epoch: r.try_get("epoch").map_err(StoreError::Query)?,
            holder: r.try_get("holder").map_err(StoreError::Query)?,
            expired: expires < now_ms,
        })
    })
    .transpose()
}
