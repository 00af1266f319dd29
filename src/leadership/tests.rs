//! Leadership on a real PostgreSQL (`SPIRE_HEALER_TEST_PG_URL`): one
//! leader at a time, takeover when the leader's session ends, and a
//! former leader fenced out of the store.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::*;
use crate::knowledge::Store;

/// A fresh database and a leadership config for it; `None` (skipped)
/// when the PostgreSQL half is skipped (`SPIRE_HEALER_SKIP_PG=1`).
async fn setup(
    lease: Duration,
) -> Option<(
    crate::knowledge::tests::PgDatabase,
    String,
    Arc<dyn Store>,
    LeadershipConfig,
)> {
    let db = crate::knowledge::tests::PgDatabase::create().await?;
    let url = db.url.clone();
    let store = crate::knowledge::open(&url).await.unwrap();
    let cfg = LeadershipConfig {
        name: "test-leadership".into(),
        lease_duration: lease,
        renew_every: lease / 3,
        retry_every: Duration::from_millis(200),
        ..LeadershipConfig::default()
    };
    Some((db, url, store, cfg))
}

fn label(n: u32) -> String {
    format!("spire-healer host=test pid={n} since_ms=0")
}

/// Ends the session that holds `cfg`'s advisory lock, as the database does
/// when its process is killed. Advisory locks are per database and every
/// test uses the same name in its own database: only this one's holder.
async fn terminate_holder(url: &str, cfg: &LeadershipConfig) -> u64 {
    let key = lock_key(&cfg.name);
    let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' \
         AND l.granted AND l.objsubid = 1 AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind((key >> 32) & 0xffff_ffff)
    .bind(key & 0xffff_ffff)
    .execute(&mut admin)
    .await
    .unwrap()
    .rows_affected()
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_takeover_bumps_the_epoch() {
    let Some((_db, url, store, cfg)) = setup(Duration::from_secs(15)).await else {
        return;
    };
    let mut a = try_postgres(&cfg, &url, &label(1)).await.unwrap().unwrap();
    assert_eq!(a.kind(), "advisory_lock");
    assert!(try_postgres(&cfg, &url, &label(2)).await.unwrap().is_none());
    assert!(a.renew().await);
    let row = store.leadership(&cfg.name).await.unwrap().unwrap();
    assert_eq!((row.epoch, row.holder.clone()), (a.fence.epoch, label(1)));
    // The leader's process dies: its session ends and the lock with it.
    assert_eq!(terminate_holder(&url, &cfg).await, 1);
    let b = try_postgres(&cfg, &url, &label(2)).await.unwrap().unwrap();
    assert_eq!(b.fence.epoch, a.fence.epoch + 1);
    // The former leader learns it at its next renewal, and its writes are
    // fenced out.
    assert!(!a.renew().await);
    store.set_fence(Some(a.fence.clone()));
    let err = store
        .apply(&[crate::model::Event::SubjectSeen {
            subject: crate::model::Subject::agent("x"),
            at: std::time::UNIX_EPOCH,
        }])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "fenced");
    store.set_fence(None);
}

#[tokio::test]
async fn the_database_ends_a_paused_leaders_session() {
    let lease = Duration::from_secs(2);
    let Some((_db, url, _store, cfg)) = setup(lease).await else {
        return;
    };
    // A leader that stops renewing (paused): the database's
    // idle_session_timeout ends its session after the lease, and a
    // standby campaigning meanwhile takes over.
    let mut a = try_postgres(&cfg, &url, &label(1)).await.unwrap().unwrap();
    let stop = CancellationToken::new();
    let store = crate::knowledge::open(&url).await.unwrap();
    let b = tokio::time::timeout(
        Duration::from_secs(30),
        campaign(&cfg, &url, store, None, &holder(2), &stop),
    )
    .await
    .expect("the standby takes over once the paused leader's session ends")
    .unwrap();
    assert_eq!(b.fence.epoch, a.fence.epoch + 1);
    assert!(!a.renew().await);
}

fn holder(pid: u32) -> Holder {
    Holder {
        host: "test".into(),
        pid,
        since: std::time::UNIX_EPOCH,
    }
}

#[tokio::test]
async fn a_standby_stops_campaigning_when_told() {
    let Some((_db, url, store, cfg)) = setup(Duration::from_secs(15)).await else {
        return;
    };
    let _a = try_postgres(&cfg, &url, &label(1)).await.unwrap().unwrap();
    let stop = CancellationToken::new();
    stop.cancel();
    let r = campaign(&cfg, &url, store, None, &holder(2), &stop).await;
    assert!(matches!(r, Err(LeadershipError::Stopped)), "{r:?}");
}

#[test]
fn config_problems_name_the_field() {
    let ok = LeadershipConfig::default();
    assert!(ok.problems().is_empty());
    let bad = LeadershipConfig {
        name: "Not_A_Lease".into(),
        backend: Backend::Lease,
        lease_duration: Duration::from_millis(1500),
        renew_every: Duration::from_secs(10),
        retry_every: Duration::ZERO,
        namespace: None,
    };
    let fields: Vec<&str> = bad.problems().iter().map(|(f, _)| *f).collect();
    assert_eq!(
        fields,
        [
            "name",
            "lease_duration",
            "renew_every",
            "retry_every",
            "namespace"
        ]
    );
}
