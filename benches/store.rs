//! Store write throughput: batches of `SvidSeen` and `ActionStarted` events
//! (fresh keys every batch, so every row is a real insert) through
//! `Store::apply`, as the write buffer sends them.
//!
//! `svid_seen` keys spread over 2,000 (agent, SPIFFE ID) pairs, so inserts
//! land all over the primary-key B-tree: the expensive case, and it slows as
//! the table grows (to about 350,000 rows in one run). `action_started` ids
//! grow like the time-ordered ids the supervisor uses.
//!
//! SQLite runs on a temp file. PostgreSQL runs when
//! `SPIRE_HEALER_TEST_PG_URL` is set, on a scratch database that is dropped
//! afterwards. Criterion reports rows/s as `elem/s`; the target is at least
//! 50,000 rows/s on SQLite.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use spire_healer::knowledge::{PostgresStore, SqliteStore, Store};
use spire_healer::model::{Event, Step, SymptomKind};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::runtime::Runtime;
use tokio::time::Instant;

/// Events per `apply`: the write buffer's chunk size.
const BATCH: u64 = 5_000;

/// Unique keys across iterations and backends.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn svid_batch() -> Vec<Event> {
    let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    (0..BATCH)
        .map(|_| {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            Event::SvidSeen {
                agent: format!("node-{}", n % 16),
                spiffe_id: format!("spiffe://example.org/ns/bench/sa/w{}", n % 1_000),
                serial: format!("{n:032x}"),
                not_before: t,
                not_after: t + Duration::from_secs(3_600),
                at: t + Duration::from_millis(n),
            }
        })
        .collect()
}

fn action_batch() -> Vec<Event> {
    let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    (0..BATCH)
        .map(|_| {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            Event::ActionStarted {
                step: Step {
                    action_id: format!("bench-action-{n}"),
                    incident_id: format!("bench-incident-{}", n / 4),
                    symptom: SymptomKind::SvidRotationOverdue,
                    rung: usize::try_from(n % 3).unwrap_or(0),
                    actuator: "refetch".into(),
                    target: format!("node-{}", n % 16),
                    params: json!({"timeout_s": 10, "signal": "SIGHUP"}),
                    timeout: Duration::from_secs(10),
                    verify_within: Duration::from_secs(60),
                    dry_run: false,
                },
                at: t + Duration::from_millis(n),
            }
        })
        .collect()
}

/// Times only `apply`; building the batch is excluded.
fn bench_store(c: &mut Criterion, rt: &Runtime, name: &str, store: &Arc<dyn Store>) {
    let mut group = c.benchmark_group(name);
    group
        .throughput(Throughput::Elements(BATCH))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (kind, make) in [
        ("svid_seen", svid_batch as fn() -> Vec<Event>),
        ("action_started", action_batch),
    ] {
        group.bench_function(kind, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let batch = make();
                        let start = Instant::now();
                        store.apply(&batch).await.expect("apply");
                        spent += start.elapsed();
                    }
                    spent
                })
            });
        });
    }
    group.finish();
}

fn sqlite(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(
        rt.block_on(SqliteStore::open(&dir.path().join("bench.db")))
            .expect("open SQLite"),
    );
    bench_store(c, &rt, "store_sqlite", &store);
}

fn postgres(c: &mut Criterion) {
    let Ok(admin_url) = std::env::var("SPIRE_HEALER_TEST_PG_URL") else {
        eprintln!("SPIRE_HEALER_TEST_PG_URL is not set; skipping the PostgreSQL benchmark.");
        return;
    };
    let rt = Runtime::new().expect("runtime");
    let name = format!("spire_healer_bench_{}", std::process::id());
    let admin = |sql: String| {
        let admin_url = admin_url.clone();
        rt.block_on(async move {
            let mut conn = PgConnection::connect(&admin_url)
                .await
                .expect("connect to SPIRE_HEALER_TEST_PG_URL");
            sqlx::query(AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("admin statement");
        });
    };
    admin(format!("DROP DATABASE IF EXISTS \"{name}\""));
    admin(format!("CREATE DATABASE \"{name}\""));
    let url = with_database(&admin_url, &name);
    let store: Arc<dyn Store> = Arc::new(
        rt.block_on(PostgresStore::connect(&url))
            .expect("connect PostgreSQL"),
    );
    bench_store(c, &rt, "store_postgres", &store);
    drop(store);
    // Not FORCE: that may not end an autovacuum worker busy with the rows
    // just written; a plain DROP stops it and waits for our closed sessions.
    admin(format!("DROP DATABASE IF EXISTS \"{name}\""));
}

/// `postgres://user:pw@host:port/db?params` with another database.
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let (rest, query) = rest
        .split_once('?')
        .map_or((rest, None), |(r, q)| (r, Some(q)));
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

criterion_group!(benches, sqlite, postgres);
criterion_main!(benches);
