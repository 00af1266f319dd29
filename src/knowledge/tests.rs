//! Store contract suite: every case in [`contract!`] runs on SQLite (a fresh
//! temp file) and on PostgreSQL (a fresh database per test, dropped after).
//!
//! PostgreSQL comes from `SPIRE_HEALER_TEST_PG_URL` (a role with CREATEDB);
//! `scripts/test.sh` starts a server and sets it. Without it the PostgreSQL
//! half fails, unless `SPIRE_HEALER_SKIP_PG=1` says to skip it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqlSafeStr};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::*;
use crate::clock::{from_unix_millis, unix_millis};
use crate::model::{
    AgentIdentity, Approval, ApprovalState, ControlChange, Event, IdentitySource, Incident,
    LOOP_ACTOR, Outcome, OutcomeKind, Severity, Step, Subject, SymptomKind, Verification, new_id,
};

const PG_URL_ENV: &str = "SPIRE_HEALER_TEST_PG_URL";
const SKIP_PG_ENV: &str = "SPIRE_HEALER_SKIP_PG";

// === Fixtures ===

/// A store on a fresh database, plus what a case needs to look underneath.
struct Fixture {
    store: Arc<dyn Store>,
    raw: Raw,
    /// What [`open`] takes to reach the same database again.
    url: String,
    _dir: Option<tempfile::TempDir>,
    _db: Option<PgDatabase>,
}

enum Raw {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knowledge.db");
        let store = SqliteStore::open(&path).await.unwrap();
        Self {
            store: Arc::new(store.clone()),
            raw: Raw::Sqlite(store),
            url: format!("sqlite://{}", path.display()),
            _dir: Some(dir),
            _db: None,
        }
    }

    /// `None` when the PostgreSQL half is skipped.
    async fn postgres() -> Option<Self> {
        let db = PgDatabase::create().await?;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        Some(Self {
            store: Arc::new(store.clone()),
            raw: Raw::Postgres(store),
            url: db.url.clone(),
            _dir: None,
            _db: Some(db),
        })
    }

    fn is_postgres(&self) -> bool {
        matches!(self.raw, Raw::Postgres(_))
    }

    /// `(kind, agent, first_seen_ms, last_seen_ms)` of a subject.
    async fn subject_row(&self, subject: &Subject) -> Option<(String, String, i64, i64)> {
        const SQL: &str =
            "SELECT kind, agent, first_seen_ms, last_seen_ms FROM subjects WHERE subject = $1";
        let key = subject.to_string();
        match &self.raw {
            Raw::Sqlite(s) => sqlx::query_as(SQL)
                .bind(key)
                .fetch_optional(s.pool())
                .await
                .unwrap(),
            Raw::Postgres(s) => sqlx::query_as(SQL)
                .bind(key)
                .fetch_optional(s.pool())
                .await
                .unwrap(),
        }
    }

    /// `(agent, source, first_seen_ms, last_seen_ms)` of an agent SPIFFE ID.
    async fn identity_row(&self, spiffe_id: &str) -> Option<(String, String, i64, i64)> {
        const SQL: &str = "SELECT agent, source, first_seen_ms, last_seen_ms \
                           FROM agent_identities WHERE spiffe_id = $1";
        match &self.raw {
            Raw::Sqlite(s) => sqlx::query_as(SQL)
                .bind(spiffe_id.to_owned())
                .fetch_optional(s.pool())
                .await
                .unwrap(),
            Raw::Postgres(s) => sqlx::query_as(SQL)
                .bind(spiffe_id.to_owned())
                .fetch_optional(s.pool())
                .await
                .unwrap(),
        }
    }

    /// Runs raw SQL with the schema's CHECKs out of the way, to plant a row
    /// that only a corrupted (or hand-edited) database holds.
    async fn execute_unchecked(&self, sql: &'static str) {
        match &self.raw {
            Raw::Sqlite(s) => {
                // The pragma is per connection: keep one for all three.
                let mut conn = s.pool().acquire().await.unwrap();
                sqlx::query("PRAGMA ignore_check_constraints = ON")
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                sqlx::query(sql).execute(&mut *conn).await.unwrap();
                sqlx::query("PRAGMA ignore_check_constraints = OFF")
                    .execute(&mut *conn)
                    .await
                    .unwrap();
            }
            Raw::Postgres(s) => {
                // A fresh database per test: dropping the CHECK is harmless.
                sqlx::query(
                    "ALTER TABLE agent_identities DROP CONSTRAINT agent_identities_source_check",
                )
                .execute(s.pool())
                .await
                .unwrap();
                sqlx::query(sql).execute(s.pool()).await.unwrap();
            }
        }
    }

    async fn count(&self, table: &str) -> i64 {
        assert!(
            [
                "subjects",
                "svid_lifecycles",
                "svid_names",
                "incidents",
                "actions",
                "holds",
                "agent_identities",
                "approvals",
                "control_changes",
                "demotions",
                "audit",
            ]
            .contains(&table),
            "unknown table {table}"
        );
        let sql = format!("SELECT count(*) FROM {table}");
        match &self.raw {
            Raw::Sqlite(s) => sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(s.pool())
                .await
                .unwrap(),
            Raw::Postgres(s) => sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(s.pool())
                .await
                .unwrap(),
        }
    }

    /// Runs raw SQL, bypassing the store (to plant bad rows).
    async fn execute(&self, sql: &'static str) {
        match &self.raw {
            Raw::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await.map(drop),
            Raw::Postgres(s) => sqlx::query(sql).execute(s.pool()).await.map(drop),
        }
        .unwrap()
    }
}

/// A uniquely named database, dropped (even after a panic) with the value.
/// Also used by the replay frames' tests (`knowledge::frames`) and the
/// leadership tests.
pub(crate) struct PgDatabase {
    admin_url: String,
    name: String,
    pub(crate) url: String,
}

impl PgDatabase {
    pub(crate) async fn create() -> Option<Self> {
        let admin_url = pg_admin_url()?;
        let name = format!("spire_healer_test_{}", new_id().replace('-', ""));
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach {PG_URL_ENV}: {e}; run scripts/test.sh"));
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        let url = rewrite_url(&admin_url, None, Some(&name));
        Some(Self {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // The test's runtime may be shutting down or panicking: use a
        // thread with its own.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(drop_database(&admin_url, &name))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

/// FORCE ends the store's pooled connections, but a role without
/// `pg_signal_backend` may not end an autovacuum worker; a plain DROP stops
/// autovacuum itself and waits a few seconds for closing sessions.
async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect(admin_url).await?;
    let force = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    let result = match sqlx::query(AssertSqlSafe(force)).execute(&mut conn).await {
        Ok(_) => Ok(()),
        Err(_) => {
            let plain = format!("DROP DATABASE IF EXISTS \"{name}\"");
            sqlx::query(AssertSqlSafe(plain))
                .execute(&mut conn)
                .await
                .map(drop)
        }
    };
    let _ = conn.close().await;
    result
}

fn pg_admin_url() -> Option<String> {
    match std::env::var(PG_URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var(SKIP_PG_ENV).is_ok_and(|v| v == "1") => {
            // Straight to stderr: the test harness captures `eprintln!`.
            static BANNER: std::sync::Once = std::sync::Once::new();
            BANNER.call_once(|| {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!!! {SKIP_PG_ENV}=1: SKIPPING every PostgreSQL store test. \
                     The PostgreSQL backend is NOT being tested. !!!!\n"
                );
            });
            None
        }
        _ => panic!(
            "{PG_URL_ENV} is not set, so the PostgreSQL half of the store contract cannot run. \
             Run scripts/test.sh (it starts PostgreSQL and sets {PG_URL_ENV}), or set \
             {SKIP_PG_ENV}=1 to skip it knowingly."
        ),
    }
}

/// `url` with its `host:port` and/or database replaced. Test URLs are plain
/// `postgres://user:pw@host:port/db[?params]`.
fn rewrite_url(url: &str, host_port: Option<&str>, db: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, p),
        None => (rest, ""),
    };
    let (userinfo, hp) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        out.push_str(u);
        out.push('@');
    }
    out.push_str(host_port.unwrap_or(hp));
    out.push('/');
    out.push_str(db.unwrap_or(path));
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The error and all its sources, as one string.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" <- ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

// === Builders ===

/// An arbitrary instant with a non-zero millisecond part.
const T0: i64 = 1_700_000_000_123;

fn at(ms: i64) -> SystemTime {
    from_unix_millis(ms)
}

pub(super) fn q() -> Query {
    Query::default()
}

pub(super) fn incident(id: &str, opened_ms: i64) -> Incident {
    Incident {
        id: id.into(),
        kind: SymptomKind::SvidExpiring,
        subject: Subject::svid("node-a", "spiffe://example.org/web"),
        severity: Severity::Critical,
        opened_at: at(opened_ms),
        predicted_outage: Some(at(opened_ms + 3_600_000)),
        evidence: json!({"remaining_s": 600, "serial": "0a1b"}),
        next_rung: 0,
        needs_operator: None,
    }
}

fn step(action_id: &str, incident_id: &str, rung: usize) -> Step {
    Step {
        action_id: action_id.into(),
        incident_id: incident_id.into(),
        symptom: SymptomKind::SvidExpiring,
        rung,
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        params: json!({"signal": "SIGHUP"}),
        timeout: Duration::from_secs(30),
        verify_within: Duration::from_secs(60),
        dry_run: false,
    }
}

pub(super) fn opened(i: Incident) -> Event {
    Event::IncidentOpened { incident: i }
}

pub(super) fn started(action_id: &str, incident_id: &str, ms: i64) -> Event {
    Event::ActionStarted {
        step: step(action_id, incident_id, 0),
        at: at(ms),
    }
}

fn finished(id: &str, kind: OutcomeKind, ms: i64) -> Event {
    Event::ActionFinished {
        id: id.into(),
        outcome: Outcome {
            kind,
            detail: json!({"exit_code": 0}),
            error: (kind == OutcomeKind::Error).then(|| "exit status 1".to_owned()),
        },
        at: at(ms),
    }
}

fn verified(id: &str, verification: Verification, ms: i64) -> Event {
    Event::ActionVerified {
        id: id.into(),
        verification,
        at: at(ms),
    }
}

pub(super) fn closed(id: &str, ms: i64, resolution: &str) -> Event {
    Event::IncidentClosed {
        id: id.into(),
        at: at(ms),
        resolution: resolution.into(),
    }
}

pub(super) fn svid_seen(agent: &str, spiffe_id: &str, serial: &str, ms: i64) -> Event {
    Event::SvidSeen {
        agent: agent.into(),
        spiffe_id: spiffe_id.into(),
        serial: serial.into(),
        not_before: at(ms - 60_000),
        not_after: at(ms + 3_540_000),
        at: at(ms),
    }
}

pub(super) fn svid_replaced(agent: &str, spiffe_id: &str, serial: &str, ms: i64) -> Event {
    Event::SvidReplaced {
        agent: agent.into(),
        spiffe_id: spiffe_id.into(),
        serial: serial.into(),
        at: at(ms),
    }
}

pub(super) fn held(incident_id: &str, reason: &str, ms: i64) -> Event {
    Event::Held {
        incident_id: incident_id.into(),
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        reason: reason.into(),
        at: at(ms),
    }
}

fn needs_operator(id: &str, reason: &str, ms: i64) -> Event {
    Event::IncidentNeedsOperator {
        id: id.into(),
        reason: reason.into(),
        at: at(ms),
    }
}

fn identity(agent: &str, spiffe_id: &str, source: IdentitySource, ms: i64) -> AgentIdentity {
    AgentIdentity {
        agent: agent.into(),
        spiffe_id: spiffe_id.into(),
        source,
        at: at(ms),
    }
}

fn identified(agent: &str, spiffe_id: &str, source: IdentitySource, ms: i64) -> Event {
    Event::AgentIdentified(identity(agent, spiffe_id, source, ms))
}

fn seen(subject: Subject, ms: i64) -> Event {
    Event::SubjectSeen {
        subject,
        at: at(ms),
    }
}

fn approval(id: &str, incident_id: &str, ms: i64) -> Approval {
    Approval {
        id: id.into(),
        incident_id: incident_id.into(),
        symptom: SymptomKind::SvidExpiring,
        rung: 1,
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        requested_at: at(ms),
        expires_at: at(ms + 600_000),
    }
}

pub(super) fn requested(id: &str, incident_id: &str, ms: i64) -> Event {
    Event::ApprovalRequested {
        approval: approval(id, incident_id, ms),
    }
}

/// An operator's decision (`by` set) or the loop's (`by` empty).
fn decided(id: &str, state: ApprovalState, by: &str, ms: i64) -> Event {
    Event::ApprovalDecided {
        id: id.into(),
        state,
        by: (!by.is_empty()).then(|| by.to_owned()),
        reason: (!by.is_empty()).then(|| format!("{by} says {}", state.as_str())),
        action_id: None,
        at: at(ms),
    }
}

fn used(id: &str, action_id: &str, ms: i64) -> Event {
    Event::ApprovalDecided {
        id: id.into(),
        state: ApprovalState::Used,
        by: None,
        reason: None,
        action_id: Some(action_id.into()),
        at: at(ms),
    }
}

fn control(id: &str, change: ControlChange, by: &str, ms: i64) -> Event {
    Event::ControlChanged {
        id: id.into(),
        change,
        by: by.into(),
        reason: Some(format!("{by}: {}", change.as_str())),
        at: at(ms),
    }
}

fn demoted(actuator: &str, verified: u32, runs: u32, ms: i64) -> Event {
    Event::Demoted {
        symptom: SymptomKind::SvidExpiring,
        actuator: actuator.into(),
        verified,
        runs,
        at: at(ms),
    }
}

fn reset(id: &str, actuator: &str, by: &str, ms: i64) -> Event {
    Event::DemotionReset {
        id: id.into(),
        symptom: SymptomKind::SvidExpiring,
        actuator: actuator.into(),
        by: by.into(),
        at: at(ms),
    }
}

/// A started action of `actuator` for the demotion window, judged at `ms`.
fn judged(id: &str, actuator: &str, v: Verification, ms: i64) -> [Event; 2] {
    let mut s = step(id, "inc-1", 0);
    s.actuator = actuator.into();
    [
        Event::ActionStarted {
            step: s,
            at: at(ms - 10),
        },
        verified(id, v, ms),
    ]
}

/// One of everything, with updates that depend on batch order.
fn mixed_batch(tag: &str, t: i64) -> Vec<Event> {
    let inc = format!("inc-{tag}");
    let act = format!("act-{tag}");
    let apr = format!("apr-{tag}");
    let restart = format!("restart-{tag}");
    let spiffe_id = format!("spiffe://example.org/{tag}");
    let agent_id = format!("spiffe://example.org/spire/agent/join_token/{tag}");
    vec![
        identified("node-a", &agent_id, IdentitySource::NodeAlias, t),
        seen(Subject::agent("node-a"), t),
        seen(Subject::svid("node-a", &spiffe_id), t),
        svid_seen("node-a", &spiffe_id, "01", t),
        svid_seen("node-a", &spiffe_id, "02", t + 1),
        svid_replaced("node-a", &spiffe_id, "01", t + 1),
        opened(incident(&inc, t)),
        Event::IncidentEscalated {
            id: inc.clone(),
            next_rung: 1,
        },
        held(&inc, "cooldown", t + 2),
        started(&act, &inc, t + 3),
        finished(&act, OutcomeKind::Ok, t + 4),
        verified(&act, Verification::Verified, t + 5),
        needs_operator(&inc, "restart-agent futile 3 times", t + 5),
        identified("node-a", &agent_id, IdentitySource::DebugApi, t + 5),
        requested(&apr, &inc, t + 2),
        decided(&apr, ApprovalState::Approved, "uid:0", t + 3),
        used(&apr, &act, t + 3),
        control(
            &format!("ctl-{tag}-1"),
            ControlChange::Paused,
            "uid:0",
            t + 4,
        ),
        control(
            &format!("ctl-{tag}-2"),
            ControlChange::DryRunOn,
            "uid:0",
            t + 4,
        ),
        demoted(&restart, 1, 10, t + 4),
        reset(&format!("rst-{tag}"), &restart, "uid:0", t + 5),
        demoted(&restart, 2, 10, t + 6),
        closed(&inc, t + 6, "cleared"),
    ]
}

/// How many kinds of [`Event`] there are; [`event_kind`] stops compiling
/// when one is added: then add it to [`mixed_batch`] too.
const EVENT_KINDS: usize = 17;

fn event_kind(e: &Event) -> &'static str {
    match e {
        Event::SubjectSeen { .. } => "subject_seen",
        Event::SvidSeen { .. } => "svid_seen",
        Event::SvidReplaced { .. } => "svid_replaced",
        Event::IncidentOpened { .. } => "incident_opened",
        Event::IncidentClosed { .. } => "incident_closed",
        Event::IncidentEscalated { .. } => "incident_escalated",
        Event::ActionStarted { .. } => "action_started",
        Event::ActionFinished { .. } => "action_finished",
        Event::ActionVerified { .. } => "action_verified",
        Event::Held { .. } => "held",
        Event::IncidentNeedsOperator { .. } => "incident_needs_operator",
        Event::AgentIdentified(_) => "agent_identified",
        Event::ApprovalRequested { .. } => "approval_requested",
        Event::ApprovalDecided { .. } => "approval_decided",
        Event::ControlChanged { .. } => "control_changed",
        Event::Demoted { .. } => "demoted",
        Event::DemotionReset { .. } => "demotion_reset",
    }
}

/// Audit rows per [`mixed_batch`]: acted, held, needs_operator, pending,
/// approved, used, paused, dry_run_on, demoted, demotion_reset, demoted.
const MIXED_AUDIT_ROWS: i64 = 11;

// === Contract ===

/// Declares each case twice: `sqlite::<case>` and `postgres::<case>`.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Fixture::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(f) = super::Fixture::postgres().await {
                        super::$case(f).await;
                    }
                }
            )*
        }
    };
}

contract!(
    migrations_are_idempotent,
    svid_lifecycle,
    incident_open_escalate_close,
    action_lifecycle_and_listing,
    reapplying_batches_is_idempotent,
    updates_follow_batch_order,
    load_knowledge_returns_open_incidents_and_recent_actions,
    subject_upsert_keeps_first_seen,
    timestamps_round_trip_exactly,
    json_round_trips,
    nul_characters_do_not_poison_a_batch,
    holds_listing,
    every_closed_set_value_is_accepted,
    large_batches_are_chunked,
    unreadable_open_incident_is_skipped,
    concurrent_applies_all_land,
    empty_store_lists_nothing,
    incident_needs_operator_round_trip,
    agent_identities_upsert,
    load_knowledge_returns_agent_identities_oldest_first,
    unreadable_agent_identity_is_skipped,
    a_spool_replays_every_kind_of_event_once,
    approvals_round_trip_and_only_move_forward,
    audit_has_a_row_per_decision,
    paging_walks_every_list_once,
    listings_filter_by_time_symptom_and_incident,
    load_knowledge_restores_controls_approvals_and_demotions,
    verdict_window_restarts_at_a_reset,
    incident_by_id,
    fenced_writes_check_the_epoch,
    a_held_action_round_trips,
);

/// The epoch an action row was stamped with.
async fn action_epoch(f: &Fixture, id: &str) -> Option<i64> {
    const SQL: &str = "SELECT epoch FROM actions WHERE id = $1";
    match &f.raw {
        Raw::Sqlite(s) => sqlx::query_scalar(SQL)
            .bind(id.to_owned())
            .fetch_one(s.pool())
            .await
            .unwrap(),
        Raw::Postgres(s) => sqlx::query_scalar(SQL)
            .bind(id.to_owned())
            .fetch_one(s.pool())
            .await
            .unwrap(),
    }
}

async fn fenced_writes_check_the_epoch(f: Fixture) {
    let lease = Duration::from_secs(15);
    // Unfenced writes carry no epoch.
    f.store
        .apply(&[opened(incident("inc-1", T0)), started("act-0", "inc-1", T0)])
        .await
        .unwrap();
    assert_eq!(action_epoch(&f, "act-0").await, None);
    assert_eq!(f.store.leadership("cluster").await.unwrap(), None);
    // A first leader: epoch 1; its actions are stamped with it.
    let first = f
        .store
        .take_leadership("cluster", "a", lease)
        .await
        .unwrap();
    assert_eq!(first, 1);
    let fence_a = leadership::Fence {
        name: "cluster".into(),
        epoch: first,
    };
    f.store.set_fence(Some(fence_a.clone()));
    f.store
        .apply(&[started("act-1", "inc-1", T0 + 1)])
        .await
        .unwrap();
    assert_eq!(action_epoch(&f, "act-1").await, Some(1));
    assert!(f.store.renew_leadership(&fence_a, lease).await.unwrap());
    // Another instance takes over: epoch 2. The former leader's renewal
    // and every write of its (the whole batch) are refused.
    let second = f
        .store
        .take_leadership("cluster", "b", lease)
        .await
        .unwrap();
    assert_eq!(second, 2);
    assert!(!f.store.renew_leadership(&fence_a, lease).await.unwrap());
    let err = f
        .store
        .apply(&[
            finished("act-1", OutcomeKind::Ok, T0 + 2),
            started("act-2", "inc-1", T0 + 3),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                ours: 1,
                current: Some(2),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), "fenced");
    let actions = f.store.actions(&q()).await.unwrap();
    assert!(actions.iter().all(|a| a.id != "act-2"), "{actions:?}");
    assert!(
        actions
            .iter()
            .find(|a| a.id == "act-1")
            .is_some_and(|a| a.finished_at_ms.is_none())
    );
    let row = f.store.leadership("cluster").await.unwrap().unwrap();
    assert_eq!(
        (row.epoch, row.holder.as_str(), row.expired),
        (2, "b", false)
    );
    // The new leader writes under its epoch; unfenced writes pass again.
    f.store.set_fence(Some(leadership::Fence {
        name: "cluster".into(),
        epoch: second,
    }));
    f.store
        .apply(&[started("act-2", "inc-1", T0 + 3)])
        .await
        .unwrap();
    assert_eq!(action_epoch(&f, "act-2").await, Some(2));
    f.store.set_fence(None);
    f.store
        .apply(&[finished("act-2", OutcomeKind::Ok, T0 + 4)])
        .await
        .unwrap();
    // A fence on a name nobody took is refused too.
    f.store.set_fence(Some(leadership::Fence {
        name: "other".into(),
        epoch: 1,
    }));
    let err = f
        .store
        .apply(&[seen(Subject::agent("x"), T0)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { current: None, .. }),
        "{err}"
    );
}

async fn migrations_are_idempotent(f: Fixture) {
    f.store
        .apply(&[opened(incident("inc-1", T0))])
        .await
        .unwrap();
    for _ in 0..2 {
        let again = open(&f.url).await.unwrap();
        assert_eq!(again.backend(), f.store.backend());
        let incidents = again.incidents(&q()).await.unwrap();
        assert_eq!(incidents.len(), 1);
        assert_eq!(incidents[0].id, "inc-1");
    }
}

async fn svid_lifecycle(f: Fixture) {
    let id = "spiffe://example.org/web";
    f.store
        .apply(&[
            svid_seen("node-a", id, "01", T0),
            svid_seen("node-b", id, "01", T0 + 10),
        ])
        .await
        .unwrap();
    f.store
        .apply(&[
            svid_seen("node-a", id, "02", T0 + 1_000),
            svid_replaced("node-a", id, "01", T0 + 1_000),
        ])
        .await
        .unwrap();
    // A later, different replacement time does not move the first one.
    f.store
        .apply(&[svid_replaced("node-a", id, "01", T0 + 9_999)])
        .await
        .unwrap();
    // Replacing an unknown serial is a no-op, not an error.
    f.store
        .apply(&[svid_replaced("node-z", id, "ff", T0)])
        .await
        .unwrap();

    let all = f.store.svids(&q()).await.unwrap();
    let keys: Vec<(&str, &str)> = all
        .iter()
        .map(|s| (s.agent.as_str(), s.serial.as_str()))
        .collect();
    assert_eq!(keys, [("node-a", "02"), ("node-b", "01"), ("node-a", "01")]);
    assert_eq!(
        all[2],
        SvidRecord {
            agent: "node-a".into(),
            spiffe_id: id.into(),
            serial: "01".into(),
            not_before_ms: T0 - 60_000,
            not_after_ms: T0 + 3_540_000,
            first_seen_ms: T0,
            replaced_at_ms: Some(T0 + 1_000),
        }
    );
    assert_eq!(all[0].replaced_at_ms, None);

    let current = f
        .store
        .svids(&Query {
            open_only: true,
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(current.len(), 2);
    assert!(current.iter().all(|s| s.replaced_at_ms.is_none()));
    let limited = f.store.svids(&Query { limit: 1, ..q() }).await.unwrap();
    assert_eq!(limited, all[..1]);
}

async fn incident_open_escalate_close(f: Fixture) {
    f.store
        .apply(&[opened(incident("inc-1", T0))])
        .await
        .unwrap();
    let open_only = Query {
        open_only: true,
        ..q()
    };
    assert_eq!(f.store.incidents(&open_only).await.unwrap().len(), 1);

    f.store
        .apply(&[Event::IncidentEscalated {
            id: "inc-1".into(),
            next_rung: 2,
        }])
        .await
        .unwrap();
    f.store
        .apply(&[closed("inc-1", T0 + 5_000, "cleared")])
        .await
        .unwrap();
    // Closing again, differently, changes nothing.
    f.store
        .apply(&[closed("inc-1", T0 + 9_000, "expired")])
        .await
        .unwrap();

    let all = f.store.incidents(&q()).await.unwrap();
    assert_eq!(
        all,
        [IncidentRecord {
            id: "inc-1".into(),
            symptom: "svid_expiring".into(),
            subject: "svid:node-a/spiffe://example.org/web".into(),
            severity: "critical".into(),
            opened_at_ms: T0,
            closed_at_ms: Some(T0 + 5_000),
            resolution: Some("cleared".into()),
            predicted_outage_ms: Some(T0 + 3_600_000),
            evidence: json!({"remaining_s": 600, "serial": "0a1b"}),
            next_rung: 2,
            needs_operator: None,
            needs_operator_at_ms: None,
        }]
    );
    assert!(f.store.incidents(&open_only).await.unwrap().is_empty());
}

async fn action_lifecycle_and_listing(f: Fixture) {
    f.store
        .apply(&[
            opened(incident("inc-a", T0)),
            opened(incident("inc-b", T0)),
            started("act-a1", "inc-a", T0 + 100),
            started("act-b1", "inc-b", T0 + 500),
            started("act-a2", "inc-a", T0 + 1_000),
        ])
        .await
        .unwrap();
    f.store
        .apply(&[
            finished("act-a1", OutcomeKind::Ok, T0 + 200),
            verified("act-a1", Verification::Verified, T0 + 300),
            finished("act-a2", OutcomeKind::Error, T0 + 1_100),
        ])
        .await
        .unwrap();
    // Second reports for the same action are ignored.
    f.store
        .apply(&[
            finished("act-a1", OutcomeKind::Timeout, T0 + 9_000),
            verified("act-a1", Verification::Failed, T0 + 9_000),
        ])
        .await
        .unwrap();

    let all = f.store.actions(&q()).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["act-a2", "act-b1", "act-a1"]);
    assert_eq!(
        all[2],
        ActionRecord {
            id: "act-a1".into(),
            incident_id: "inc-a".into(),
            symptom: "svid_expiring".into(),
            rung: 0,
            actuator: "restart-agent".into(),
            target: "node-a".into(),
            params: json!({"signal": "SIGHUP"}),
            dry_run: false,
            started_at_ms: T0 + 100,
            finished_at_ms: Some(T0 + 200),
            outcome: Some("ok".into()),
            detail: Some(json!({"exit_code": 0})),
            error: None,
            verification: Some("verified".into()),
            verified_at_ms: Some(T0 + 300),
        }
    );
    assert_eq!(all[0].outcome.as_deref(), Some("error"));
    assert_eq!(all[0].error.as_deref(), Some("exit status 1"));
    assert_eq!(all[0].verification, None);
    assert_eq!(all[1].finished_at_ms, None);
    assert_eq!(all[1].outcome, None);
    assert_eq!(all[1].detail, None);

    let limited = f.store.actions(&Query { limit: 2, ..q() }).await.unwrap();
    assert_eq!(limited, all[..2]);
    let of_a = f
        .store
        .actions(&Query {
            incident_id: Some("inc-a".into()),
            ..q()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = of_a.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["act-a2", "act-a1"]);
    let of_a_limited = f
        .store
        .actions(&Query {
            incident_id: Some("inc-a".into()),
            limit: 1,
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(of_a_limited, of_a[..1]);
    // `open_only` does not apply to actions.
    let open_only = f
        .store
        .actions(&Query {
            open_only: true,
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(open_only, all);
}

/// Everything a listing can show, for before/after comparisons.
#[derive(Debug, PartialEq)]
struct Snapshot {
    incidents: Vec<IncidentRecord>,
    actions: Vec<ActionRecord>,
    svids: Vec<SvidRecord>,
    holds: Vec<HoldRecord>,
    subject: Option<(String, String, i64, i64)>,
    approvals: Vec<ApprovalRecord>,
    audit: Vec<AuditRecord>,
    knowledge: Knowledge,
}

async fn snapshot(f: &Fixture) -> Snapshot {
    let all = Query {
        limit: 10_000,
        ..q()
    };
    Snapshot {
        incidents: f.store.incidents(&all).await.unwrap(),
        actions: f.store.actions(&all).await.unwrap(),
        svids: f.store.svids(&all).await.unwrap(),
        holds: f.store.holds(&all).await.unwrap(),
        subject: f.subject_row(&Subject::agent("node-a")).await,
        approvals: f.store.approvals(&all).await.unwrap(),
        audit: f.store.audit(&all).await.unwrap(),
        knowledge: f.store.load_knowledge(at(0)).await.unwrap(),
    }
}

async fn reapplying_batches_is_idempotent(f: Fixture) {
    let first = mixed_batch("x", T0);
    let second = mixed_batch("y", T0 + 10_000);
    f.store.apply(&first).await.unwrap();
    f.store.apply(&second).await.unwrap();
    let once = snapshot(&f).await;
    assert_eq!(once.incidents.len(), 2);
    assert_eq!(once.holds.len(), 2);
    assert_eq!(once.knowledge.agent_identities.len(), 2);
    assert!(once.incidents.iter().all(|i| i.needs_operator.is_some()));
    assert!(once.approvals.iter().all(|a| a.state == "used"));
    assert_eq!(once.knowledge.controls.len(), 2);
    assert_eq!(once.knowledge.demotions.len(), 2);

    // An unknown outcome: the client retries batches that did commit,
    // including an older one after a newer one.
    f.store.apply(&second).await.unwrap();
    f.store.apply(&first).await.unwrap();
    f.store
        .apply(&[first.clone(), second.clone()].concat())
        .await
        .unwrap();
    assert_eq!(snapshot(&f).await, once);
    for table in ["incidents", "actions", "holds", "approvals"] {
        assert_eq!(f.count(table).await, 2, "{table}");
    }
    assert_eq!(f.count("svid_lifecycles").await, 4);
    assert_eq!(f.count("subjects").await, 3);
    assert_eq!(f.count("agent_identities").await, 2);
    assert_eq!(f.count("control_changes").await, 4);
    assert_eq!(f.count("demotions").await, 4);
    assert_eq!(f.count("audit").await, 2 * MIXED_AUDIT_ROWS);
}

/// A crash during an outage: part of the stream committed, the rest (and
/// a copy of some that committed) waits in the spool. Replaying it gives
/// the same store as writing everything once, for every kind of event.
async fn a_spool_replays_every_kind_of_event_once(f: Fixture) {
    let first = mixed_batch("x", T0);
    let second = mixed_batch("y", T0 + 10_000);
    let kinds: BTreeSet<&str> = first.iter().map(event_kind).collect();
    assert_eq!(
        kinds.len(),
        EVENT_KINDS,
        "mixed_batch holds every kind: {kinds:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.spool");
    let (mut spool, _) = crate::knowledge::Spool::open(&path, 1 << 20).unwrap();
    spool.append(&first).unwrap();
    spool.append(&second).unwrap();
    drop(spool);
    f.store.apply(&first).await.unwrap();

    let (spool, replayed) = crate::knowledge::open_and_replay(&path, 1 << 20, &*f.store)
        .await
        .unwrap();
    assert_eq!(replayed.events, first.len() + second.len());
    assert!(spool.is_empty(), "emptied once the store has it");
    let replayed_store = snapshot(&f).await;
    f.store.apply(&first).await.unwrap();
    f.store.apply(&second).await.unwrap();
    assert_eq!(snapshot(&f).await, replayed_store);
    assert_eq!(replayed_store.incidents.len(), 2);
    assert_eq!(replayed_store.actions.len(), 2);
    assert_eq!(replayed_store.holds.len(), 2);
    assert_eq!(f.count("svid_lifecycles").await, 4);
    // The operator controls replay too, once each.
    assert_eq!(replayed_store.approvals.len(), 2);
    assert_eq!(replayed_store.knowledge.controls.len(), 2);
    assert_eq!(replayed_store.knowledge.demotions.len(), 2);
    assert_eq!(f.count("control_changes").await, 4);
    assert_eq!(f.count("audit").await, 2 * MIXED_AUDIT_ROWS);
}

async fn updates_follow_batch_order(f: Fixture) {
    let id = "spiffe://example.org/web";
    f.store
        .apply(&[
            // Finishing before starting: the finish finds no row yet.
            finished("act-early", OutcomeKind::Ok, T0),
            started("act-early", "inc-1", T0),
            svid_seen("node-a", id, "01", T0),
            svid_replaced("node-a", id, "01", T0 + 1),
            svid_replaced("node-a", id, "01", T0 + 2),
            opened(incident("inc-1", T0)),
            Event::IncidentEscalated {
                id: "inc-1".into(),
                next_rung: 1,
            },
            Event::IncidentEscalated {
                id: "inc-1".into(),
                next_rung: 3,
            },
            needs_operator("inc-1", "first", T0 + 3),
            needs_operator("inc-1", "second", T0 + 4),
            closed("inc-1", T0 + 5, "cleared"),
            closed("inc-1", T0 + 6, "expired"),
            // A tie on time: the later one in the batch wins.
            identified(
                "node-a",
                "spiffe://example.org/agent",
                IdentitySource::DebugApi,
                T0,
            ),
            identified(
                "node-b",
                "spiffe://example.org/agent",
                IdentitySource::NodeAlias,
                T0,
            ),
            started("act-1", "inc-1", T0),
            finished("act-1", OutcomeKind::Error, T0 + 7),
            finished("act-1", OutcomeKind::Ok, T0 + 8),
            verified("act-1", Verification::Failed, T0 + 9),
            verified("act-1", Verification::Verified, T0 + 10),
        ])
        .await
        .unwrap();

    let svids = f.store.svids(&q()).await.unwrap();
    assert_eq!(
        svids[0].replaced_at_ms,
        Some(T0 + 1),
        "first replacement wins"
    );
    let incidents = f.store.incidents(&q()).await.unwrap();
    assert_eq!(incidents[0].next_rung, 3, "last escalation wins");
    assert_eq!(incidents[0].closed_at_ms, Some(T0 + 5), "first close wins");
    assert_eq!(incidents[0].resolution.as_deref(), Some("cleared"));
    assert_eq!(
        (
            incidents[0].needs_operator.as_deref(),
            incidents[0].needs_operator_at_ms
        ),
        (Some("second"), Some(T0 + 4)),
        "last needs-operator verdict wins"
    );
    assert_eq!(
        f.identity_row("spiffe://example.org/agent").await,
        Some(("node-b".into(), "node_alias".into(), T0, T0)),
        "on a tie, the later sighting names the agent"
    );
    let actions = f
        .store
        .actions(&Query {
            incident_id: Some("inc-1".into()),
            ..q()
        })
        .await
        .unwrap();
    let by_id = |id: &str| actions.iter().find(|a| a.id == id).unwrap().clone();
    let act = by_id("act-1");
    assert_eq!(act.outcome.as_deref(), Some("error"), "first finish wins");
    assert_eq!(act.finished_at_ms, Some(T0 + 7));
    assert_eq!(
        act.verification.as_deref(),
        Some("failed"),
        "first verdict wins"
    );
    assert_eq!(by_id("act-early").finished_at_ms, None);
}

async fn load_knowledge_returns_open_incidents_and_recent_actions(f: Fixture) {
    let mut second = incident("inc-2", T0 + 2_000);
    second.kind = SymptomKind::AgentUnreachable;
    second.subject = Subject::agent("node-b");
    second.severity = Severity::Warning;
    second.predicted_outage = None;
    f.store
        .apply(&[
            opened(incident("inc-1", T0)),
            opened(incident("inc-closed", T0 + 1_000)),
            opened(second.clone()),
            Event::IncidentEscalated {
                id: "inc-2".into(),
                next_rung: 2,
            },
            closed("inc-closed", T0 + 1_500, "cleared"),
            started("act-old", "inc-1", T0),
            started("act-edge", "inc-1", T0 + 1_000),
            started("act-new", "inc-2", T0 + 2_000),
        ])
        .await
        .unwrap();

    let k = f.store.load_knowledge(at(T0 + 1_000)).await.unwrap();
    second.next_rung = 2;
    assert_eq!(k.open_incidents, [incident("inc-1", T0), second]);
    let ids: Vec<&str> = k.recent_actions.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(
        ids,
        ["act-edge", "act-new"],
        "since is inclusive, oldest first"
    );

    let everything = f.store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(everything.recent_actions.len(), 3);
    let nothing = f.store.load_knowledge(at(T0 + 2_001)).await.unwrap();
    assert!(nothing.recent_actions.is_empty());
}

async fn subject_upsert_keeps_first_seen(f: Fixture) {
    let agent = Subject::agent("node-a");
    let svid = Subject::svid("node-a", "spiffe://example.org/web");
    // Duplicates inside one batch, out of order.
    f.store
        .apply(&[
            seen(agent.clone(), T0 + 1_000),
            seen(svid.clone(), T0),
            seen(agent.clone(), T0 + 3_000),
            seen(agent.clone(), T0 + 2_000),
        ])
        .await
        .unwrap();
    assert_eq!(
        f.subject_row(&agent).await,
        Some(("agent".into(), "node-a".into(), T0 + 1_000, T0 + 3_000))
    );
    assert_eq!(
        f.subject_row(&svid).await,
        Some(("workload".into(), "node-a".into(), T0, T0))
    );
    f.store
        .apply(&[seen(agent.clone(), T0 + 60_000)])
        .await
        .unwrap();
    f.store
        .apply(&[seen(agent.clone(), T0 + 5_000)])
        .await
        .unwrap();
    assert_eq!(
        f.subject_row(&agent).await,
        Some(("agent".into(), "node-a".into(), T0 + 1_000, T0 + 60_000))
    );
}

async fn timestamps_round_trip_exactly(f: Fixture) {
    // Epoch, one millisecond, "now"-ish, and the last millisecond of 9999.
    let instants = [0, 1, T0, 253_402_300_799_999];
    for (n, &ms) in instants.iter().enumerate() {
        let inc = format!("inc-{n}");
        let mut i = incident(&inc, ms);
        i.predicted_outage = Some(at(ms));
        f.store
            .apply(&[
                opened(i),
                closed(&inc, ms, "cleared"),
                Event::SvidSeen {
                    agent: "node-a".into(),
                    spiffe_id: "spiffe://example.org/t".into(),
                    serial: format!("{n:02x}"),
                    not_before: at(ms),
                    not_after: at(ms),
                    at: at(ms),
                },
                svid_replaced("node-a", "spiffe://example.org/t", &format!("{n:02x}"), ms),
                started(&format!("act-{n}"), &inc, ms),
                finished(&format!("act-{n}"), OutcomeKind::Ok, ms),
                verified(&format!("act-{n}"), Verification::Skipped, ms),
                held(&inc, "budget", ms),
            ])
            .await
            .unwrap();
    }
    let all = Query { limit: 100, ..q() };
    let mut seen_ms = BTreeSet::new();
    for i in f.store.incidents(&all).await.unwrap() {
        assert_eq!(i.closed_at_ms, Some(i.opened_at_ms));
        assert_eq!(i.predicted_outage_ms, Some(i.opened_at_ms));
        seen_ms.insert(i.opened_at_ms);
    }
    for s in f.store.svids(&all).await.unwrap() {
        assert_eq!(
            [s.not_before_ms, s.not_after_ms, s.replaced_at_ms.unwrap()],
            [s.first_seen_ms; 3]
        );
        seen_ms.insert(s.first_seen_ms);
    }
    for a in f.store.actions(&all).await.unwrap() {
        assert_eq!(a.finished_at_ms, Some(a.started_at_ms));
        assert_eq!(a.verified_at_ms, Some(a.started_at_ms));
        seen_ms.insert(a.started_at_ms);
    }
    for h in f.store.holds(&all).await.unwrap() {
        seen_ms.insert(h.at_ms);
    }
    assert_eq!(seen_ms, instants.into_iter().collect());

    // And back into SystemTime, exactly.
    let f2 = f.store.load_knowledge(at(0)).await.unwrap();
    assert!(f2.open_incidents.is_empty());
    f.store
        .apply(&[opened(incident("open", T0))])
        .await
        .unwrap();
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(k.open_incidents[0].opened_at, at(T0));
    assert_eq!(unix_millis(k.open_incidents[0].opened_at), T0);
}

async fn json_round_trips(f: Fixture) {
    let evidence = json!({
        "nested": {"list": [1, -2, 3.5, null, true, "x"], "empty": {}, "none": []},
        "text": "ünïcødé ✓ 🔐 \"quoted\" back\\slash\nnew line\ttab",
        "big": u64::MAX,
        "small": i64::MIN,
        "fraction": 0.1,
        "tiny": 1e-7,
        "one": 1.0,
        "null": null,
    });
    let params = json!(["--flag", {"k": "v"}, 42]);
    let mut i = incident("inc-json", T0);
    i.evidence = evidence.clone();
    let mut s = step("act-json", "inc-json", 1);
    s.params = params.clone();
    s.dry_run = true;
    let detail = json!({"stdout_tail": "ok\n", "exit_code": 0, "list": []});
    f.store
        .apply(&[
            opened(i.clone()),
            Event::ActionStarted {
                step: s,
                at: at(T0),
            },
            Event::ActionFinished {
                id: "act-json".into(),
                outcome: Outcome {
                    kind: OutcomeKind::DryRun,
                    detail: detail.clone(),
                    error: None,
                },
                at: at(T0 + 1),
            },
        ])
        .await
        .unwrap();
    // Scalars and null are JSON too.
    let mut scalar = incident("inc-scalar", T0 + 1);
    scalar.evidence = json!("just a string");
    let mut null = incident("inc-null", T0 + 2);
    null.evidence = serde_json::Value::Null;
    f.store
        .apply(&[opened(scalar), opened(null)])
        .await
        .unwrap();

    let incidents = f.store.incidents(&q()).await.unwrap();
    let by_id = |id: &str| {
        incidents
            .iter()
            .find(|r| r.id == id)
            .unwrap()
            .evidence
            .clone()
    };
    assert_eq!(by_id("inc-json"), evidence);
    assert_eq!(by_id("inc-scalar"), json!("just a string"));
    assert_eq!(by_id("inc-null"), serde_json::Value::Null);
    let action = &f.store.actions(&q()).await.unwrap()[0];
    assert_eq!(action.params, params);
    assert_eq!(action.detail, Some(detail));
    assert!(action.dry_run);
    assert_eq!(action.rung, 1);
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    let loaded = k
        .open_incidents
        .iter()
        .find(|x| x.id == "inc-json")
        .unwrap();
    assert_eq!(loaded, &i);
}

async fn nul_characters_do_not_poison_a_batch(f: Fixture) {
    let nul = "before\0after";
    let mut i = incident("inc-nul", T0);
    i.evidence = json!({"out": nul, nul: 1});
    f.store
        .apply(&[
            opened(i),
            started("act-nul", "inc-nul", T0),
            Event::ActionFinished {
                id: "act-nul".into(),
                outcome: Outcome {
                    kind: OutcomeKind::Error,
                    detail: json!([nul]),
                    error: Some(nul.into()),
                },
                at: at(T0),
            },
            held("inc-nul", nul, T0),
            needs_operator("inc-nul", nul, T0),
            identified(
                nul,
                "spiffe://example.org/spire/agent/nul",
                IdentitySource::DebugApi,
                T0,
            ),
            requested("apr-nul", "inc-nul", T0),
            decided("apr-nul", ApprovalState::Rejected, nul, T0),
            control("c-nul", ControlChange::Paused, nul, T0),
            demoted(nul, 0, 3, T0),
            reset("r-nul", nul, nul, T0 + 1),
        ])
        .await
        .unwrap();
    // SQLite keeps NUL; PostgreSQL cannot store it and gets U+FFFD.
    let expected = if f.is_postgres() {
        "before\u{FFFD}after"
    } else {
        nul
    };
    let action = &f.store.actions(&q()).await.unwrap()[0];
    assert_eq!(action.error.as_deref(), Some(expected));
    assert_eq!(action.detail, Some(json!([expected])));
    let incident = &f.store.incidents(&q()).await.unwrap()[0];
    assert_eq!(incident.evidence, json!({"out": expected, expected: 1}));
    assert_eq!(f.store.holds(&q()).await.unwrap()[0].reason, expected);
    assert_eq!(incident.needs_operator.as_deref(), Some(expected));
    let identities = f
        .store
        .load_knowledge(at(0))
        .await
        .unwrap()
        .agent_identities;
    assert_eq!(identities[0].agent, expected);
    let approval = &f.store.approvals(&q()).await.unwrap()[0];
    assert_eq!(approval.decided_by.as_deref(), Some(expected));
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(k.controls[0].by, expected);
    assert!(k.demotions.is_empty(), "reset");
    let audit = f
        .store
        .audit(&Query {
            kinds: vec!["demotion_reset".into()],
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(
        (audit[0].actor.as_str(), audit[0].actuator.as_deref()),
        (expected, Some(expected))
    );
}

async fn holds_listing(f: Fixture) {
    let batch = [
        held("inc-a", "cooldown", T0),
        held("inc-b", "budget", T0 + 10),
        held("inc-a", "blind", T0 + 20),
        // Same decision reported twice: one row.
        held("inc-a", "blind", T0 + 20),
    ];
    f.store.apply(&batch).await.unwrap();
    f.store.apply(&batch).await.unwrap();

    let all = f.store.holds(&q()).await.unwrap();
    let rows: Vec<(&str, &str, i64)> = all
        .iter()
        .map(|h| (h.incident_id.as_str(), h.reason.as_str(), h.at_ms))
        .collect();
    assert_eq!(
        rows,
        [
            ("inc-a", "blind", T0 + 20),
            ("inc-b", "budget", T0 + 10),
            ("inc-a", "cooldown", T0),
        ]
    );
    assert_eq!(
        all[2],
        HoldRecord {
            id: all[2].id.clone(),
            incident_id: "inc-a".into(),
            actuator: "restart-agent".into(),
            target: "node-a".into(),
            reason: "cooldown".into(),
            at_ms: T0,
        }
    );
    let of_a = f
        .store
        .holds(&Query {
            incident_id: Some("inc-a".into()),
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(of_a, [all[0].clone(), all[2].clone()]);
    let limited = f.store.holds(&Query { limit: 1, ..q() }).await.unwrap();
    assert_eq!(limited, all[..1]);
}

/// Every value of every closed set the schema CHECKs. The `match`es stop
/// compiling when a variant is added: then extend the list and, if the
/// store CHECKs that set, both migrations.
async fn every_closed_set_value_is_accepted(f: Fixture) {
    fn outcome_kinds() -> [OutcomeKind; 5] {
        match OutcomeKind::Ok {
            OutcomeKind::Ok
            | OutcomeKind::Error
            | OutcomeKind::DryRun
            | OutcomeKind::Timeout
            | OutcomeKind::Held => {}
        }
        [
            OutcomeKind::Ok,
            OutcomeKind::Error,
            OutcomeKind::DryRun,
            OutcomeKind::Timeout,
            OutcomeKind::Held,
        ]
    }
    fn verifications() -> [Verification; 3] {
        match Verification::Verified {
            Verification::Verified | Verification::Failed | Verification::Skipped => {}
        }
        [
            Verification::Verified,
            Verification::Failed,
            Verification::Skipped,
        ]
    }
    fn severities() -> [Severity; 2] {
        match Severity::Warning {
            Severity::Warning | Severity::Critical => {}
        }
        [Severity::Warning, Severity::Critical]
    }
    fn identity_sources() -> [IdentitySource; 2] {
        match IdentitySource::DebugApi {
            IdentitySource::DebugApi | IdentitySource::NodeAlias => {}
        }
        [IdentitySource::DebugApi, IdentitySource::NodeAlias]
    }
    fn control_changes() -> [ControlChange; 4] {
        match ControlChange::Paused {
            ControlChange::Paused
            | ControlChange::Resumed
            | ControlChange::DryRunOn
            | ControlChange::DryRunOff => {}
        }
        ControlChange::ALL
    }
    fn approval_states() -> [ApprovalState; 6] {
        match ApprovalState::Pending {
            ApprovalState::Pending
            | ApprovalState::Approved
            | ApprovalState::Rejected
            | ApprovalState::Expired
            | ApprovalState::Used
            | ApprovalState::Withdrawn => {}
        }
        ApprovalState::ALL
    }

    let mut events = vec![
        seen(Subject::agent("node-a"), T0),
        seen(Subject::svid("node-a", "spiffe://example.org/w"), T0),
    ];
    for (n, kind) in SymptomKind::ALL.into_iter().enumerate() {
        for severity in severities() {
            let mut i = incident(&format!("inc-{n}-{}", severity.as_str()), T0);
            i.kind = kind;
            i.severity = severity;
            events.push(opened(i));
        }
    }
    for (n, kind) in outcome_kinds().into_iter().enumerate() {
        for v in verifications() {
            let id = format!("act-{n}-{}", v.as_str());
            events.push(started(&id, "inc-0-warning", T0));
            events.push(finished(&id, kind, T0 + 1));
            events.push(verified(&id, v, T0 + 2));
        }
    }
    for (n, source) in identity_sources().into_iter().enumerate() {
        events.push(identified(
            "node-a",
            &format!("spiffe://example.org/spire/agent/{}", source.as_str()),
            source,
            T0 + i64::try_from(n).unwrap(),
        ));
    }
    for (n, change) in control_changes().into_iter().enumerate() {
        events.push(control(&format!("c-{n}"), change, "uid:0", T0));
    }
    for (n, state) in approval_states().into_iter().enumerate() {
        let id = format!("apr-{n}");
        events.push(requested(&id, "inc-0-warning", T0));
        events.push(decided(&id, state, "uid:0", T0 + 1));
    }
    f.store.apply(&events).await.unwrap();
    assert_eq!(f.count("control_changes").await, 4);
    let states: BTreeSet<String> = f
        .store
        .approvals(&q())
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.state)
        .collect();
    assert_eq!(states.len(), approval_states().len());
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(k.open_incidents.len(), SymptomKind::ALL.len() * 2);
    let sources: Vec<_> = k.agent_identities.iter().map(|i| i.source).collect();
    assert_eq!(sources, identity_sources());
    assert_eq!(
        k.recent_actions.len(),
        outcome_kinds().len() * verifications().len()
    );
    let outcomes: BTreeSet<_> = k
        .recent_actions
        .iter()
        .filter_map(|a| a.outcome.clone())
        .collect();
    let expected: BTreeSet<_> = outcome_kinds()
        .iter()
        .map(|o| o.as_str().to_owned())
        .collect();
    assert_eq!(outcomes, expected);
}

async fn large_batches_are_chunked(f: Fixture) {
    // Well past SQLite's 32,766 parameters per statement in every run.
    let mut events: Vec<Event> = (0..12_000)
        .map(|n| {
            svid_seen(
                "node-a",
                "spiffe://example.org/bulk",
                &format!("{n:x}"),
                T0 + n,
            )
        })
        .collect();
    events.extend((0..7_000).map(|n| seen(Subject::agent(format!("node-{n}")), T0 + n)));
    events.extend((0..4_000).map(|n| started(&format!("act-{n}"), "inc-1", T0 + n)));
    events.extend((0..7_000).map(|n| held("inc-1", "cooldown", T0 + n)));
    f.store.apply(&events).await.unwrap();
    assert_eq!(f.count("svid_lifecycles").await, 12_000);
    assert_eq!(f.count("subjects").await, 7_000);
    assert_eq!(f.count("actions").await, 4_000);
    assert_eq!(f.count("holds").await, 7_000);
    let newest = f.store.svids(&Query { limit: 1, ..q() }).await.unwrap();
    assert_eq!(newest[0].first_seen_ms, T0 + 11_999);
    assert_eq!(
        f.store.svids(&q()).await.unwrap().len(),
        100,
        "limit 0 means 100"
    );
}

async fn unreadable_open_incident_is_skipped(f: Fixture) {
    f.store
        .apply(&[opened(incident("inc-good", T0))])
        .await
        .unwrap();
    f.execute(
        "INSERT INTO incidents (id, symptom, subject, severity, opened_at_ms, evidence, next_rung) \
         VALUES ('inc-bad-symptom', 'no_such_symptom', 'agent:node-a', 'warning', 1, '{}', 0), \
                ('inc-bad-subject', 'svid_expired', 'garbage', 'warning', 2, '{}', 0)",
    )
    .await;
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    let ids: Vec<&str> = k.open_incidents.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["inc-good"]);
    // Listings show raw rows, unreadable or not.
    assert_eq!(f.store.incidents(&q()).await.unwrap().len(), 3);
}

async fn concurrent_applies_all_land(f: Fixture) {
    let writers = (0..4).map(|w| {
        let store = f.store.clone();
        async move {
            for b in 0..5 {
                let batch: Vec<Event> = (0..50)
                    .map(|n| {
                        svid_seen(
                            &format!("node-{w}"),
                            "spiffe://example.org/c",
                            &format!("{b}-{n}"),
                            T0 + n,
                        )
                    })
                    .collect();
                store.apply(&batch).await.unwrap();
            }
        }
    });
    futures::future::join_all(writers).await;
    assert_eq!(f.count("svid_lifecycles").await, 4 * 5 * 50);
}

async fn empty_store_lists_nothing(f: Fixture) {
    f.store.apply(&[]).await.unwrap();
    f.store.ping().await.unwrap();
    assert!(f.store.incidents(&q()).await.unwrap().is_empty());
    assert!(f.store.actions(&q()).await.unwrap().is_empty());
    assert!(f.store.svids(&q()).await.unwrap().is_empty());
    assert!(f.store.holds(&q()).await.unwrap().is_empty());
    assert!(f.store.approvals(&q()).await.unwrap().is_empty());
    assert!(f.store.audit(&q()).await.unwrap().is_empty());
    assert_eq!(f.store.incident("inc-1").await.unwrap(), None);
    assert_eq!(
        f.store.load_knowledge(at(0)).await.unwrap(),
        Knowledge::default()
    );
}

async fn incident_needs_operator_round_trip(f: Fixture) {
    let reason = "restart-agent futile 3 times; agent-evict held: budget";
    f.store
        .apply(&[
            opened(incident("inc-1", T0)),
            opened(incident("inc-2", T0 + 1)),
        ])
        .await
        .unwrap();
    let marked = [needs_operator("inc-1", reason, T0 + 1_000)];
    f.store.apply(&marked).await.unwrap();
    // The same verdict again, and one for an unknown incident: no-ops.
    f.store.apply(&marked).await.unwrap();
    f.store
        .apply(&[needs_operator("inc-gone", reason, T0)])
        .await
        .unwrap();

    let rows = f.store.incidents(&q()).await.unwrap();
    let by_id = |id: &str| rows.iter().find(|r| r.id == id).unwrap().clone();
    assert_eq!(by_id("inc-1").needs_operator.as_deref(), Some(reason));
    assert_eq!(by_id("inc-1").needs_operator_at_ms, Some(T0 + 1_000));
    assert_eq!(
        (
            by_id("inc-2").needs_operator,
            by_id("inc-2").needs_operator_at_ms
        ),
        (None, None)
    );
    assert_eq!(f.count("incidents").await, 2);

    // The incident stays open and comes back with its verdict.
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    let mut expected = incident("inc-1", T0);
    expected.needs_operator = Some(reason.into());
    assert_eq!(k.open_incidents, [expected, incident("inc-2", T0 + 1)]);

    // A later verdict replaces the earlier one, as escalations do.
    f.store
        .apply(&[needs_operator("inc-1", "still futile", T0 + 9_000)])
        .await
        .unwrap();
    let open_only = Query {
        open_only: true,
        ..q()
    };
    let rows = f.store.incidents(&open_only).await.unwrap();
    let inc1 = rows.iter().find(|r| r.id == "inc-1").unwrap();
    assert_eq!(inc1.needs_operator.as_deref(), Some("still futile"));
    assert_eq!(inc1.needs_operator_at_ms, Some(T0 + 9_000));
}

async fn agent_identities_upsert(f: Fixture) {
    let id = "spiffe://example.org/spire/agent/join_token/abc";
    f.store
        .apply(&[identified("node-a", id, IdentitySource::NodeAlias, T0)])
        .await
        .unwrap();
    assert_eq!(
        f.identity_row(id).await,
        Some(("node-a".into(), "node_alias".into(), T0, T0))
    );
    // Seen again: first_seen stays, last_seen moves, and the newest sighting
    // names the agent and the source.
    f.store
        .apply(&[identified(
            "node-b",
            id,
            IdentitySource::DebugApi,
            T0 + 5_000,
        )])
        .await
        .unwrap();
    assert_eq!(
        f.identity_row(id).await,
        Some(("node-b".into(), "debug_api".into(), T0, T0 + 5_000))
    );
    // An older sighting, applied late (a retried batch): widens the range
    // but does not take the name back.
    f.store
        .apply(&[identified(
            "node-a",
            id,
            IdentitySource::NodeAlias,
            T0 - 1_000,
        )])
        .await
        .unwrap();
    assert_eq!(
        f.identity_row(id).await,
        Some(("node-b".into(), "debug_api".into(), T0 - 1_000, T0 + 5_000))
    );
    // Several sightings in one batch, out of time order: the latest names it.
    f.store
        .apply(&[
            identified("node-c", id, IdentitySource::NodeAlias, T0 + 9_000),
            identified("node-d", id, IdentitySource::DebugApi, T0 + 7_000),
            identified("node-e", id, IdentitySource::NodeAlias, T0 - 2_000),
        ])
        .await
        .unwrap();
    assert_eq!(
        f.identity_row(id).await,
        Some(("node-c".into(), "node_alias".into(), T0 - 2_000, T0 + 9_000))
    );
    // Re-applying the same batch changes nothing.
    f.store
        .apply(&[identified(
            "node-c",
            id,
            IdentitySource::NodeAlias,
            T0 + 9_000,
        )])
        .await
        .unwrap();
    assert_eq!(
        f.identity_row(id).await,
        Some(("node-c".into(), "node_alias".into(), T0 - 2_000, T0 + 9_000))
    );
    assert_eq!(f.count("agent_identities").await, 1);
}

async fn load_knowledge_returns_agent_identities_oldest_first(f: Fixture) {
    let a = "spiffe://example.org/spire/agent/x509pop/a";
    let b = "spiffe://example.org/spire/agent/join_token/b";
    let c = "spiffe://example.org/spire/agent/join_token/c";
    f.store
        .apply(&[
            identified("node-a", a, IdentitySource::DebugApi, T0 + 2_000),
            identified("node-b", b, IdentitySource::NodeAlias, T0),
            identified("node-c", c, IdentitySource::NodeAlias, T0 + 1_000),
        ])
        .await
        .unwrap();
    f.store
        .apply(&[identified(
            "node-b",
            b,
            IdentitySource::DebugApi,
            T0 + 3_000,
        )])
        .await
        .unwrap();
    // Every row, whatever `since` says; `at` is the last sighting.
    let k = f.store.load_knowledge(at(T0 + 60_000)).await.unwrap();
    assert_eq!(
        k.agent_identities,
        [
            identity("node-c", c, IdentitySource::NodeAlias, T0 + 1_000),
            identity("node-a", a, IdentitySource::DebugApi, T0 + 2_000),
            identity("node-b", b, IdentitySource::DebugApi, T0 + 3_000),
        ]
    );
}

async fn unreadable_agent_identity_is_skipped(f: Fixture) {
    let good = "spiffe://example.org/spire/agent/join_token/good";
    f.store
        .apply(&[identified("node-a", good, IdentitySource::NodeAlias, T0)])
        .await
        .unwrap();
    f.execute_unchecked(
        "INSERT INTO agent_identities (spiffe_id, agent, source, first_seen_ms, last_seen_ms) \
         VALUES ('spiffe://example.org/spire/agent/bad', 'node-b', 'carrier_pigeon', 1, 1)",
    )
    .await;
    // As for an unreadable open incident: skipped with a warning naming
    // the row, never a failed start.
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(
        k.agent_identities,
        [identity("node-a", good, IdentitySource::NodeAlias, T0)]
    );
    assert_eq!(f.count("agent_identities").await, 2);
}

async fn approvals_round_trip_and_only_move_forward(f: Fixture) {
    f.store
        .apply(&[
            opened(incident("inc-1", T0)),
            requested("apr-1", "inc-1", T0 + 1),
            requested("apr-2", "inc-1", T0 + 2),
        ])
        .await
        .unwrap();
    let pending = ApprovalRecord {
        id: "apr-1".into(),
        incident_id: "inc-1".into(),
        symptom: "svid_expiring".into(),
        rung: 1,
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        state: "pending".into(),
        requested_at_ms: T0 + 1,
        expires_at_ms: T0 + 600_001,
        decided_by: None,
        decided_at_ms: None,
        reason: None,
        action_id: None,
    };
    let all = f.store.approvals(&q()).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1], pending);

    // Approved by an operator, then used by the loop: the approver and
    // the reason stay, the action is recorded, the time is the last change.
    let approve = [decided(
        "apr-1",
        ApprovalState::Approved,
        "uid:1000",
        T0 + 10,
    )];
    f.store.apply(&approve).await.unwrap();
    f.store
        .apply(&[used("apr-1", "act-1", T0 + 20)])
        .await
        .unwrap();
    // Nothing moves a final state: a late rejection, a re-applied approval,
    // a second request.
    f.store
        .apply(&[decided("apr-1", ApprovalState::Rejected, "uid:0", T0 + 30)])
        .await
        .unwrap();
    f.store.apply(&approve).await.unwrap();
    f.store
        .apply(&[requested("apr-1", "inc-other", T0 + 40)])
        .await
        .unwrap();
    let used_one = ApprovalRecord {
        state: "used".into(),
        decided_by: Some("uid:1000".into()),
        decided_at_ms: Some(T0 + 20),
        reason: Some("uid:1000 says approved".into()),
        action_id: Some("act-1".into()),
        ..pending.clone()
    };
    let of = |id: &str, rows: &[ApprovalRecord]| rows.iter().find(|a| a.id == id).cloned();
    let all = f.store.approvals(&q()).await.unwrap();
    assert_eq!(of("apr-1", &all), Some(used_one));

    // Within one batch, in order: approved then rejected keeps approved
    // (not final) only until the rejection, which is final.
    f.store
        .apply(&[
            decided("apr-2", ApprovalState::Approved, "uid:1", T0 + 50),
            decided("apr-2", ApprovalState::Rejected, "uid:2", T0 + 51),
            decided("apr-2", ApprovalState::Approved, "uid:3", T0 + 52),
            decided("apr-2", ApprovalState::Pending, "uid:4", T0 + 53),
        ])
        .await
        .unwrap();
    let all = f.store.approvals(&q()).await.unwrap();
    let two = of("apr-2", &all).unwrap();
    assert_eq!(
        (
            two.state.as_str(),
            two.decided_by.as_deref(),
            two.decided_at_ms
        ),
        ("rejected", Some("uid:2"), Some(T0 + 51))
    );

    // A decision on an approval the store never saw (its request was lost)
    // fails nothing and changes nothing, but is audited.
    f.store
        .apply(&[
            decided("apr-unknown", ApprovalState::Approved, "uid:5", T0 + 60),
            opened(incident("inc-after", T0 + 61)),
        ])
        .await
        .unwrap();
    assert_eq!(f.count("approvals").await, 2);
    assert!(f.store.incident("inc-after").await.unwrap().is_some());
    let audit = f
        .store
        .audit(&Query {
            kinds: vec!["approved".into()],
            ..q()
        })
        .await
        .unwrap();
    let unknown = audit
        .iter()
        .find(|a| a.approval_id.as_deref() == Some("apr-unknown"))
        .unwrap();
    assert_eq!(
        (unknown.actor.as_str(), unknown.incident_id.as_deref()),
        ("uid:5", None)
    );

    // Every state is accepted, and `open_only` lists the pending ones.
    let mut events = Vec::new();
    for (n, state) in ApprovalState::ALL.into_iter().enumerate() {
        let id = format!("apr-s{n}");
        let ms = T0 + 100 + i64::try_from(n).unwrap();
        events.push(requested(&id, "inc-2", ms));
        if state != ApprovalState::Pending {
            events.push(decided(&id, state, "", ms + 1));
        }
    }
    f.store.apply(&events).await.unwrap();
    let listed = f
        .store
        .approvals(&Query {
            incident_id: Some("inc-2".into()),
            ..q()
        })
        .await
        .unwrap();
    let states: Vec<&str> = listed.iter().rev().map(|a| a.state.as_str()).collect();
    let expected: Vec<&str> = ApprovalState::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(states, expected);
    let open = f
        .store
        .approvals(&Query {
            open_only: true,
            ..q()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = open.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["apr-s0"]);
    // One approval by id, whatever its state.
    let one = f
        .store
        .approvals(&Query {
            id: Some("apr-s3".into()),
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].state, ApprovalState::ALL[3].as_str());
    let none = f
        .store
        .approvals(&Query {
            id: Some("no-such".into()),
            ..q()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
}

async fn audit_has_a_row_per_decision(f: Fixture) {
    let mut s = step("act-1", "inc-1", 2);
    s.params = json!({"signal": "SIGHUP", "approval_id": "apr-1"});
    s.dry_run = true;
    let batch = vec![
        opened(incident("inc-1", T0)),
        requested("apr-1", "inc-1", T0 + 1),
        decided("apr-1", ApprovalState::Approved, "uid:1000", T0 + 2),
        Event::ActionStarted {
            step: s,
            at: at(T0 + 3),
        },
        used("apr-1", "act-1", T0 + 3),
        held("inc-1", "cooldown", T0 + 4),
        needs_operator("inc-1", "nothing left", T0 + 5),
        control("c-1", ControlChange::Paused, "uid:0", T0 + 6),
        control("c-2", ControlChange::Resumed, "uid:0", T0 + 7),
        control(
            "c-3",
            ControlChange::DryRunOn,
            "spiffe://example.org/op",
            T0 + 8,
        ),
        control("c-4", ControlChange::DryRunOff, "uid:0", T0 + 9),
        demoted("restart-agent", 1, 10, T0 + 10),
        reset("r-1", "restart-agent", "uid:0", T0 + 11),
        decided("apr-gone", ApprovalState::Expired, "", T0 + 12),
        Event::ApprovalDecided {
            id: "apr-other".into(),
            state: ApprovalState::Withdrawn,
            by: None,
            reason: None,
            action_id: None,
            at: at(T0 + 12),
        },
        // Not decisions: no audit row.
        finished("act-1", OutcomeKind::DryRun, T0 + 13),
        verified("act-1", Verification::Skipped, T0 + 14),
        closed("inc-1", T0 + 15, "cleared"),
    ];
    f.store.apply(&batch).await.unwrap();
    f.store.apply(&batch).await.unwrap();

    let rows = f.store.audit(&q()).await.unwrap();
    let summary: Vec<(&str, &str)> = rows
        .iter()
        .rev()
        .map(|a| (a.kind.as_str(), a.actor.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("pending", LOOP_ACTOR),
            ("approved", "uid:1000"),
            ("acted", LOOP_ACTOR),
            ("used", LOOP_ACTOR),
            ("held", LOOP_ACTOR),
            ("needs_operator", LOOP_ACTOR),
            ("paused", "uid:0"),
            ("resumed", "uid:0"),
            ("dry_run_on", "spiffe://example.org/op"),
            ("dry_run_off", "uid:0"),
            ("demoted", LOOP_ACTOR),
            ("demotion_reset", "uid:0"),
            // Same time: by id.
            ("expired", LOOP_ACTOR),
            ("withdrawn", LOOP_ACTOR),
        ]
    );
    assert_eq!(f.count("audit").await, 14, "re-applied: nothing twice");
    let by_kind = |kind: &str| rows.iter().find(|a| a.kind == kind).unwrap().clone();

    let acted = by_kind("acted");
    assert_eq!(
        acted,
        AuditRecord {
            id: acted.id.clone(),
            at_ms: T0 + 3,
            kind: "acted".into(),
            actor: LOOP_ACTOR.into(),
            incident_id: Some("inc-1".into()),
            action_id: Some("act-1".into()),
            approval_id: Some("apr-1".into()),
            symptom: Some("svid_expiring".into()),
            actuator: Some("restart-agent".into()),
            target: Some("node-a".into()),
            reason: None,
            detail: json!({"dry_run": true, "approval_id": "apr-1"}),
        }
    );
    // The loop's `used` and the operator's decision take their context
    // from the approval.
    let approved = by_kind("approved");
    assert_eq!(approved.reason.as_deref(), Some("uid:1000 says approved"));
    for a in [&approved, &by_kind("used")] {
        assert_eq!(a.incident_id.as_deref(), Some("inc-1"), "{a:?}");
        assert_eq!(a.symptom.as_deref(), Some("svid_expiring"), "{a:?}");
        assert_eq!(a.actuator.as_deref(), Some("restart-agent"), "{a:?}");
        assert_eq!(a.target.as_deref(), Some("node-a"), "{a:?}");
    }
    assert_eq!(by_kind("used").action_id.as_deref(), Some("act-1"));
    assert_eq!(
        by_kind("pending").detail,
        json!({"rung": 1, "expires_at_ms": T0 + 600_001})
    );
    // Holds and needs-operator verdicts take the incident's symptom.
    let held = by_kind("held");
    assert_eq!(
        (
            held.reason.as_deref(),
            held.symptom.as_deref(),
            held.actuator.as_deref(),
            held.target.as_deref()
        ),
        (
            Some("cooldown"),
            Some("svid_expiring"),
            Some("restart-agent"),
            Some("node-a")
        )
    );
    let needs = by_kind("needs_operator");
    assert_eq!(needs.reason.as_deref(), Some("nothing left"));
    assert_eq!(needs.symptom.as_deref(), Some("svid_expiring"));
    assert_eq!(by_kind("paused").reason.as_deref(), Some("uid:0: paused"));
    assert_eq!(
        by_kind("demoted").detail,
        json!({"verified": 1, "runs": 10})
    );
    assert_eq!(
        by_kind("demotion_reset").actuator.as_deref(),
        Some("restart-agent")
    );
    assert_eq!(by_kind("expired").incident_id, None, "unknown approval");

    // Filters: incident, kinds, time.
    let of_incident = f
        .store
        .audit(&Query {
            incident_id: Some("inc-1".into()),
            ..q()
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = of_incident.iter().rev().map(|a| a.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "pending",
            "approved",
            "acted",
            "used",
            "held",
            "needs_operator"
        ]
    );
    let controls = f
        .store
        .audit(&Query {
            kinds: vec!["paused".into(), "resumed".into()],
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(controls.len(), 2);
    let window = f
        .store
        .audit(&Query {
            since_ms: Some(T0 + 6),
            until_ms: Some(T0 + 8),
            ..q()
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = window.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["resumed", "paused"]);
}

/// Pages of `size` through a listing (newest first), following the last
/// row's key, until a short page.
async fn walk(list: impl AsyncFn(Query) -> Vec<(i64, String)>, base: &Query) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    let mut page = None;
    loop {
        let rows = list(Query {
            page: page.clone(),
            ..base.clone()
        })
        .await;
        let short = rows.len() < usize::try_from(base.limit).unwrap();
        if let Some((at_ms, id)) = rows.last() {
            page = Some(PageKey {
                at_ms: *at_ms,
                id: id.clone(),
            });
        }
        out.extend(rows);
        if short {
            return out;
        }
    }
}

/// `walked` page by page equals `all` listed at once: newest first, every
/// one of the `n` rows once. (How ids order within a time is the
/// database's: PostgreSQL's text collation may not be byte order.)
fn assert_walked(name: &str, walked: &[(i64, String)], all: &[(i64, String)], n: usize) {
    assert_eq!(all.len(), n, "{name}: all rows");
    assert_eq!(walked, all, "{name}: pages vs one listing");
    let distinct: BTreeSet<_> = walked.iter().collect();
    assert_eq!(distinct.len(), n, "{name}: repeats");
    assert!(
        walked.windows(2).all(|w| w[0].0 >= w[1].0),
        "{name}: newest first"
    );
}

async fn paging_walks_every_list_once(f: Fixture) {
    // 23 of each, most sharing a time with others: ties must page by id.
    const N: i64 = 23;
    let mut events = Vec::new();
    for n in 0..N {
        let ms = T0 + n / 4;
        let inc = format!("inc-{n:02}");
        events.push(opened(incident(&inc, ms)));
        events.push(started(&format!("act-{n:02}"), &inc, ms));
        events.push(held(&format!("inc-{}", n % 3), &format!("reason-{n}"), ms));
        events.push(requested(&format!("apr-{n:02}"), &inc, ms));
    }
    f.store.apply(&events).await.unwrap();
    let store = &f.store;
    for size in [1, 2, 5, 100] {
        let base = Query { limit: size, ..q() };
        let all = Query {
            limit: 1_000,
            ..q()
        };
        let incidents = async |q: Query| -> Vec<(i64, String)> {
            let rows = store.incidents(&q).await.unwrap();
            rows.into_iter().map(|r| (r.opened_at_ms, r.id)).collect()
        };
        let actions = async |q: Query| -> Vec<(i64, String)> {
            let rows = store.actions(&q).await.unwrap();
            rows.into_iter().map(|r| (r.started_at_ms, r.id)).collect()
        };
        let holds = async |q: Query| -> Vec<(i64, String)> {
            let rows = store.holds(&q).await.unwrap();
            rows.into_iter().map(|r| (r.at_ms, r.id)).collect()
        };
        let approvals = async |q: Query| -> Vec<(i64, String)> {
            let rows = store.approvals(&q).await.unwrap();
            rows.into_iter()
                .map(|r| (r.requested_at_ms, r.id))
                .collect()
        };
        let audit = async |q: Query| -> Vec<(i64, String)> {
            let rows = store.audit(&q).await.unwrap();
            rows.into_iter().map(|r| (r.at_ms, r.id)).collect()
        };
        let n = usize::try_from(N).unwrap();
        assert_walked(
            "incidents",
            &walk(&incidents, &base).await,
            &incidents(all.clone()).await,
            n,
        );
        assert_walked(
            "actions",
            &walk(&actions, &base).await,
            &actions(all.clone()).await,
            n,
        );
        assert_walked(
            "holds",
            &walk(&holds, &base).await,
            &holds(all.clone()).await,
            n,
        );
        assert_walked(
            "approvals",
            &walk(&approvals, &base).await,
            &approvals(all.clone()).await,
            n,
        );
        // acted, held and pending per n.
        assert_walked(
            "audit",
            &walk(&audit, &base).await,
            &audit(all.clone()).await,
            3 * n,
        );
        // Paging within a filter.
        let of_inc_1 = Query {
            incident_id: Some("inc-1".into()),
            ..base.clone()
        };
        let walked = walk(&holds, &of_inc_1).await;
        assert_eq!(walked.len(), 8, "holds of inc-1: n % 3 == 1");
        assert_eq!(
            walked,
            holds(Query {
                limit: 1_000,
                ..of_inc_1.clone()
            })
            .await
        );
    }
    // Hold ids order as numbers within a time: 8 ties after one another.
    let holds = f
        .store
        .holds(&Query {
            limit: 1_000,
            ..q()
        })
        .await
        .unwrap();
    for w in holds.windows(2) {
        let key = |h: &HoldRecord| (h.at_ms, h.id.parse::<i64>().unwrap());
        assert!(key(&w[0]) > key(&w[1]), "{w:?}");
    }
    let bad = f
        .store
        .holds(&Query {
            page: Some(PageKey {
                at_ms: T0,
                id: "not-a-number".into(),
            }),
            ..q()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), "invalid_query", "{bad}");
}

async fn listings_filter_by_time_symptom_and_incident(f: Fixture) {
    let mut other = incident("inc-other", T0 + 20);
    other.kind = SymptomKind::AgentUnreachable;
    f.store
        .apply(&[
            opened(incident("inc-0", T0)),
            opened(incident("inc-10", T0 + 10)),
            opened(other),
            opened(incident("inc-30", T0 + 30)),
            closed("inc-30", T0 + 31, "cleared"),
            started("act-0", "inc-0", T0),
            started("act-10", "inc-10", T0 + 10),
            started("act-20", "inc-0", T0 + 20),
            held("inc-0", "cooldown", T0),
            held("inc-10", "budget", T0 + 10),
            held("inc-0", "paused", T0 + 20),
            requested("apr-0", "inc-0", T0),
            requested("apr-10", "inc-10", T0 + 10),
            requested("apr-20", "inc-0", T0 + 20),
        ])
        .await
        .unwrap();
    let window = Query {
        since_ms: Some(T0 + 10),
        until_ms: Some(T0 + 30),
        ..q()
    };
    let incidents = f.store.incidents(&window).await.unwrap();
    assert_eq!(
        incidents.into_iter().map(|r| r.id).collect::<Vec<_>>(),
        ["inc-other", "inc-10"],
        "since inclusive, until exclusive"
    );
    let svid_expiring = f
        .store
        .incidents(&Query {
            symptom: Some("svid_expiring".into()),
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(
        svid_expiring.into_iter().map(|r| r.id).collect::<Vec<_>>(),
        ["inc-30", "inc-10", "inc-0"]
    );
    let open_expiring = f
        .store
        .incidents(&Query {
            symptom: Some("svid_expiring".into()),
            open_only: true,
            since_ms: Some(T0 + 5),
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(
        open_expiring.into_iter().map(|r| r.id).collect::<Vec<_>>(),
        ["inc-10"]
    );
    let actions = f
        .store
        .actions(&Query {
            incident_id: Some("inc-0".into()),
            until_ms: Some(T0 + 20),
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(
        actions.into_iter().map(|r| r.id).collect::<Vec<_>>(),
        ["act-0"]
    );
    let holds = f
        .store
        .holds(&Query {
            incident_id: Some("inc-0".into()),
            since_ms: Some(T0 + 1),
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(
        holds.iter().map(|h| h.reason.as_str()).collect::<Vec<_>>(),
        ["paused"]
    );
    let approvals = f
        .store
        .approvals(&Query {
            incident_id: Some("inc-0".into()),
            ..window.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        approvals.into_iter().map(|r| r.id).collect::<Vec<_>>(),
        ["apr-20"]
    );
}

async fn load_knowledge_restores_controls_approvals_and_demotions(f: Fixture) {
    let record = |change, by: &str, ms| ControlRecord {
        change,
        by: by.into(),
        reason: Some(format!("{by}: {}", ControlChange::as_str(change))),
        at_ms: ms,
    };
    f.store
        .apply(&[
            control("c-1", ControlChange::Paused, "uid:1", T0),
            control("c-2", ControlChange::DryRunOn, "uid:1", T0 + 10),
        ])
        .await
        .unwrap();
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(
        k.controls,
        [
            record(ControlChange::Paused, "uid:1", T0),
            record(ControlChange::DryRunOn, "uid:1", T0 + 10),
        ]
    );
    f.store
        .apply(&[
            control("c-3", ControlChange::Resumed, "uid:2", T0 + 20),
            control("c-4", ControlChange::Paused, "uid:3", T0 + 30),
            // The clock stepped back: applied later, so still the last.
            control("c-5", ControlChange::DryRunOff, "uid:2", T0 + 5),
        ])
        .await
        .unwrap();
    // An old batch again changes nothing.
    f.store
        .apply(&[control("c-2", ControlChange::DryRunOn, "uid:1", T0 + 10)])
        .await
        .unwrap();

    // Approvals: only pending and approved come back, oldest first.
    let mut events = Vec::new();
    for (n, state) in ApprovalState::ALL.into_iter().enumerate() {
        let id = format!("apr-{}", state.as_str());
        let ms = T0 + 100 - i64::try_from(n).unwrap();
        events.push(requested(&id, "inc-1", ms));
        if state != ApprovalState::Pending {
            events.push(decided(&id, state, "uid:1", ms + 50));
        }
    }
    // Demotions: a reset one, a live one, and one demoted again after its
    // reset (only the new one is live); a second Demoted of a live pair
    // adds nothing.
    events.extend([
        demoted("refetch", 1, 10, T0 + 1),
        reset("r-1", "refetch", "uid:1", T0 + 2),
        demoted("restart-agent", 2, 10, T0 + 3),
        demoted("evict", 0, 5, T0 + 4),
        reset("r-2", "evict", "uid:1", T0 + 5),
        demoted("evict", 3, 10, T0 + 6),
        demoted("evict", 4, 10, T0 + 7),
    ]);
    f.store.apply(&events).await.unwrap();
    // A reset applied again (an old batch) leaves the newer demotion.
    f.store
        .apply(&[reset("r-2", "evict", "uid:1", T0 + 5)])
        .await
        .unwrap();

    let k = f.store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(
        k.controls,
        [
            record(ControlChange::Paused, "uid:3", T0 + 30),
            record(ControlChange::DryRunOff, "uid:2", T0 + 5),
        ]
    );
    let live: Vec<(&str, &str)> = k
        .approvals
        .iter()
        .map(|a| (a.id.as_str(), a.state.as_str()))
        .collect();
    assert_eq!(
        live,
        [("apr-approved", "approved"), ("apr-pending", "pending")]
    );
    assert_eq!(k.approvals[0].decided_by.as_deref(), Some("uid:1"));
    let demotion = |actuator: &str, verified, runs, ms| DemotionRecord {
        symptom: "svid_expiring".into(),
        actuator: actuator.into(),
        verified,
        runs,
        demoted_at_ms: ms,
    };
    assert_eq!(
        k.demotions,
        [
            demotion("restart-agent", 2, 10, T0 + 3),
            demotion("evict", 3, 10, T0 + 6),
        ]
    );
    assert_eq!(f.count("demotions").await, 4);

    // What Controls rebuilds from it.
    let controls = crate::control::Controls::resume(
        false,
        &k.controls,
        &k.approvals,
        &k.demotions,
        Arc::new(tokio::sync::Notify::new()),
    );
    assert_eq!(controls.paused().unwrap().by, "uid:3");
    assert!(!controls.dry_run());
    assert_eq!(controls.live_approvals().len(), 2);
    assert_eq!(controls.demoted().len(), 2);
}

async fn verdict_window_restarts_at_a_reset(f: Fixture) {
    use Verification::{Failed, Skipped, Verified};
    let mut events = Vec::new();
    // restart-agent: judged before the reset (dropped), skipped (never a
    // verdict), and after it, out of start order.
    events.extend(judged("a-1", "restart-agent", Verified, T0 + 1));
    events.extend(judged("a-2", "restart-agent", Failed, T0 + 2));
    events.push(demoted("restart-agent", 1, 2, T0 + 3));
    events.extend(judged("a-3", "restart-agent", Failed, T0 + 4));
    events.push(reset("r-1", "restart-agent", "uid:0", T0 + 5));
    events.extend(judged("a-4", "restart-agent", Verified, T0 + 5));
    events.extend(judged("a-5", "restart-agent", Skipped, T0 + 6));
    events.extend(judged("a-7", "restart-agent", Failed, T0 + 8));
    events.extend(judged("a-6", "restart-agent", Verified, T0 + 7));
    // refetch, never reset: more than a window; the last ones come back.
    let extra = 7;
    let window = i64::try_from(VERDICT_WINDOW).unwrap();
    for n in 0..window + extra {
        let v = if n % 2 == 0 { Verified } else { Failed };
        events.extend(judged(&format!("r-{n:04}"), "refetch", v, T0 + 1_000 + n));
    }
    // Not yet judged: no verdict.
    events.push(started("a-running", "inc-1", T0 + 9));
    f.store.apply(&events).await.unwrap();

    let k = f.store.load_knowledge(at(0)).await.unwrap();
    let refetch: Vec<&VerdictRecord> = k
        .verdicts
        .iter()
        .filter(|v| v.actuator == "refetch")
        .collect();
    assert_eq!(refetch.len(), VERDICT_WINDOW);
    assert_eq!(refetch[0].at_ms, T0 + 1_000 + extra, "the oldest kept");
    assert_eq!(
        refetch.last().unwrap().at_ms,
        T0 + 1_000 + window + extra - 1
    );
    assert!(refetch.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    assert_eq!(refetch[0].verified, extra % 2 == 0);
    let restart: Vec<(bool, i64)> = k
        .verdicts
        .iter()
        .filter(|v| v.actuator == "restart-agent")
        .map(|v| {
            assert_eq!(v.symptom, "svid_expiring");
            (v.verified, v.at_ms)
        })
        .collect();
    assert_eq!(
        restart,
        [(true, T0 + 5), (true, T0 + 7), (false, T0 + 8)],
        "since the reset (inclusive), oldest first, skipped left out"
    );
    // Grouped by pair.
    let pairs: Vec<&str> = k.verdicts.iter().map(|v| v.actuator.as_str()).collect();
    let mut grouped = pairs.clone();
    grouped.dedup();
    assert_eq!(grouped, ["refetch", "restart-agent"]);

    // A second reset starts it afresh again.
    let mut more = vec![demoted("restart-agent", 2, 3, T0 + 20)];
    more.push(reset("r-2", "restart-agent", "uid:0", T0 + 21));
    more.extend(judged("a-8", "restart-agent", Failed, T0 + 22));
    f.store.apply(&more).await.unwrap();
    let k = f.store.load_knowledge(at(0)).await.unwrap();
    let restart: Vec<i64> = k
        .verdicts
        .iter()
        .filter(|v| v.actuator == "restart-agent")
        .map(|v| v.at_ms)
        .collect();
    assert_eq!(restart, [T0 + 22]);
}

async fn incident_by_id(f: Fixture) {
    f.store
        .apply(&[
            opened(incident("inc-1", T0)),
            opened(incident("inc-2", T0 + 1)),
            needs_operator("inc-1", "nothing left", T0 + 2),
        ])
        .await
        .unwrap();
    let one = f.store.incident("inc-1").await.unwrap().unwrap();
    assert_eq!(one.id, "inc-1");
    assert_eq!(one.needs_operator.as_deref(), Some("nothing left"));
    let listed = f.store.incidents(&q()).await.unwrap();
    assert_eq!(Some(&one), listed.iter().find(|i| i.id == "inc-1"));
    assert_eq!(f.store.incident("inc-none").await.unwrap(), None);
}

/// An action its actuator held at execute time: outcome `held` with the
/// reason in its detail, verification `skipped`, read back as written and
/// among the recent actions a restart resumes from (cooldown, budget).
async fn a_held_action_round_trips(f: Fixture) {
    let held = Outcome::held(
        "pdb_blocked",
        json!({ "pod": { "namespace": "apps", "name": "web-1" }, "message": "Cannot evict pod" }),
    );
    f.store
        .apply(&[
            opened(incident("inc-1", T0)),
            started("act-1", "inc-1", T0 + 1),
            Event::ActionFinished {
                id: "act-1".into(),
                outcome: held.clone(),
                at: at(T0 + 2),
            },
            verified("act-1", Verification::Skipped, T0 + 3),
        ])
        .await
        .unwrap();
    let listed = f.store.actions(&q()).await.unwrap();
    let a = &listed[0];
    assert_eq!(a.outcome.as_deref(), Some("held"));
    assert_eq!(a.detail.as_ref(), Some(&held.detail));
    assert_eq!(a.detail.as_ref().unwrap()["held"], "pdb_blocked");
    assert_eq!(a.error, None);
    assert_eq!(a.verification.as_deref(), Some("skipped"));
    let k = f.store.load_knowledge(at(T0)).await.unwrap();
    assert_eq!(k.recent_actions.len(), 1);
    assert_eq!(
        OutcomeKind::parse(k.recent_actions[0].outcome.as_deref().unwrap()),
        Some(OutcomeKind::Held)
    );
}

// === Backend-specific ===

#[test]
fn embedded_migrations_match_the_directories() {
    for (dir, list) in [
        ("sqlite", super::sqlite::MIGRATIONS),
        ("postgres", super::postgres::MIGRATIONS),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dir);
        let mut files: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        let expected: Vec<String> = list
            .iter()
            .map(|(v, d, _)| format!("{v:04}_{d}.sql"))
            .collect();
        assert_eq!(files, expected, "migrations/{dir} vs the embedded list");
        for ((_, _, sql), file) in list.iter().zip(&files) {
            assert_eq!(*sql, std::fs::read_to_string(path.join(file)).unwrap());
        }
    }
}

// --- Upgrading in place ---

/// The first `n` embedded migrations, as a backend applies them.
fn migrator_upto(list: &[(i64, &'static str, &'static str)], n: usize) -> Migrator {
    Migrator::with_migrations(
        list[..n]
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

/// Rows as a 0001-era store wrote them; the same SQL on both backends.
const ROWS_0001: [&str; 5] = [
    "INSERT INTO incidents (id, symptom, subject, severity, opened_at_ms, predicted_outage_ms, \
       evidence, next_rung) \
     VALUES ('inc-old', 'agent_unreachable', 'agent:node-a', 'warning', 1700000000123, NULL, \
       '{\"stream\": \"down\"}', 2)",
    "INSERT INTO incidents (id, symptom, subject, severity, opened_at_ms, closed_at_ms, \
       resolution, evidence) \
     VALUES ('inc-done', 'svid_expired', 'agent:node-b', 'critical', 1700000000000, \
       1700000001000, 'cleared', '{}')",
    "INSERT INTO actions (id, incident_id, symptom, rung, actuator, target, params, dry_run, \
       started_at_ms) \
     VALUES ('act-old', 'inc-old', 'agent_unreachable', 1, 'refetch', 'node-a', '{}', false, \
       1700000000500)",
    "INSERT INTO subjects (subject, kind, agent, first_seen_ms, last_seen_ms) \
     VALUES ('agent:node-a', 'agent', 'node-a', 1700000000000, 1700000000900)",
    "INSERT INTO holds (incident_id, actuator, target, reason, at_ms) \
     VALUES ('inc-old', 'refetch', 'node-a', 'cooldown', 1700000000600), \
            ('inc-old', 'refetch', 'node-a', 'budget', 1700000000600)",
];

/// What a store opened on the upgraded database must show: the old rows
/// unchanged, the new columns empty, and the new events accepted.
async fn check_upgraded(url: &str) {
    let store = open(url).await.unwrap();
    let incidents = store.incidents(&q()).await.unwrap();
    assert_eq!(incidents.len(), 2);
    let old = incidents.iter().find(|i| i.id == "inc-old").unwrap();
    assert_eq!(old.next_rung, 2);
    assert_eq!(old.evidence, json!({"stream": "down"}));
    assert_eq!(
        (old.needs_operator.clone(), old.needs_operator_at_ms),
        (None, None)
    );
    let done = incidents.iter().find(|i| i.id == "inc-done").unwrap();
    assert_eq!(done.resolution.as_deref(), Some("cleared"));

    let k = store.load_knowledge(at(0)).await.unwrap();
    let open_ids: Vec<&str> = k.open_incidents.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(open_ids, ["inc-old"]);
    assert_eq!(k.open_incidents[0].needs_operator, None);
    assert_eq!(k.recent_actions.len(), 1);
    assert!(k.agent_identities.is_empty());

    let agent_id = "spiffe://example.org/spire/agent/join_token/t";
    store
        .apply(&[
            needs_operator("inc-old", "nothing left", T0 + 1_000),
            identified("node-a", agent_id, IdentitySource::NodeAlias, T0 + 1_000),
        ])
        .await
        .unwrap();
    let k = store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(
        k.open_incidents[0].needs_operator.as_deref(),
        Some("nothing left")
    );
    // Old holds page by their row ids; the operator controls start empty
    // and take the new events.
    let holds = store.holds(&Query { limit: 1, ..q() }).await.unwrap();
    let next = store
        .holds(&Query {
            limit: 1,
            page: Some(PageKey {
                at_ms: holds[0].at_ms,
                id: holds[0].id.clone(),
            }),
            ..q()
        })
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_ne!(holds[0].reason, next[0].reason);
    let audit = store.audit(&q()).await.unwrap();
    assert_eq!(audit.len(), 1, "the needs-operator verdict just applied");
    assert!(k.controls.is_empty() && k.approvals.is_empty() && k.demotions.is_empty());
    store
        .apply(&[
            requested("apr-1", "inc-old", T0 + 2_000),
            control("c-1", ControlChange::Paused, "uid:0", T0 + 2_000),
            demoted("refetch", 0, 5, T0 + 2_000),
        ])
        .await
        .unwrap();
    let k = store.load_knowledge(at(0)).await.unwrap();
    assert_eq!(
        (k.controls.len(), k.approvals.len(), k.demotions.len()),
        (1, 1, 1)
    );
    assert_eq!(store.audit(&q()).await.unwrap().len(), 4);
    assert_eq!(
        k.agent_identities,
        [identity(
            "node-a",
            agent_id,
            IdentitySource::NodeAlias,
            T0 + 1_000
        )]
    );
}

#[tokio::test]
async fn sqlite_upgrades_from_0001_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("knowledge.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    migrator_upto(super::sqlite::MIGRATIONS, 1)
        .run(&pool)
        .await
        .unwrap();
    for sql in ROWS_0001 {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    check_upgraded(&format!("sqlite://{}", path.display())).await;
}

#[tokio::test]
async fn postgres_upgrades_from_0001_in_place() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    migrator_upto(super::postgres::MIGRATIONS, 1)
        .run(&pool)
        .await
        .unwrap();
    for sql in ROWS_0001 {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    check_upgraded(&db.url).await;
}

/// SVID lifecycles as a 0004-era store keyed them (agent, SPIFFE ID,
/// serial); the same SQL on both backends.
const SVIDS_0004: &str = "INSERT INTO svid_lifecycles \
       (agent, spiffe_id, serial, not_before_ms, not_after_ms, first_seen_ms, replaced_at_ms) \
     VALUES ('node-a', 'spiffe://example.org/web', '01', 1, 2, 1700000000000, 1700000001000), \
            ('node-a', 'spiffe://example.org/web', '02', 3, 4, 1700000001000, NULL), \
            ('node-b', 'spiffe://example.org/web', '01', 5, 6, 1700000000500, NULL), \
            ('node-a', 'spiffe://example.org/db', '', 7, 8, 1700000000200, NULL)";

/// Migration 0005 carried the lifecycles over to `svid_names` and the
/// compact key: every row reads back as it was, a re-delivered serial is
/// still a no-op, and replacing and new serials work on the moved rows.
async fn check_svids_upgraded(url: &str) {
    let store = open(url).await.unwrap();
    let web = "spiffe://example.org/web";
    let key = |s: &SvidRecord| {
        (
            s.agent.clone(),
            s.spiffe_id.clone(),
            s.serial.clone(),
            s.not_before_ms,
            s.not_after_ms,
            s.first_seen_ms,
            s.replaced_at_ms,
        )
    };
    let before: Vec<_> = store.svids(&q()).await.unwrap().iter().map(key).collect();
    let row = |agent: &str, id: &str, serial: &str, nb, na, seen, replaced| {
        (
            agent.to_string(),
            id.to_string(),
            serial.to_string(),
            nb,
            na,
            seen,
            replaced,
        )
    };
    assert_eq!(
        before,
        [
            row("node-a", web, "02", 3, 4, 1_700_000_001_000, None),
            row("node-b", web, "01", 5, 6, 1_700_000_000_500, None),
            row(
                "node-a",
                "spiffe://example.org/db",
                "",
                7,
                8,
                1_700_000_000_200,
                None
            ),
            row(
                "node-a",
                web,
                "01",
                1,
                2,
                1_700_000_000_000,
                Some(1_700_000_001_000)
            ),
        ]
    );
    let now = 1_700_000_002_000;
    store
        .apply(&[
            svid_seen("node-b", web, "01", now),
            svid_replaced("node-b", web, "01", now),
            svid_seen("node-b", web, "03", now),
        ])
        .await
        .unwrap();
    let after = store.svids(&q()).await.unwrap();
    assert_eq!(after.len(), 5);
    assert_eq!(
        (after[0].agent.as_str(), after[0].serial.as_str()),
        ("node-b", "03")
    );
    let old = after
        .iter()
        .find(|s| s.agent == "node-b" && s.serial == "01");
    assert_eq!(
        old.map(|s| (s.first_seen_ms, s.replaced_at_ms)),
        Some((1_700_000_000_500, Some(now)))
    );
}

#[tokio::test]
async fn sqlite_upgrades_svid_lifecycles_from_0004() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("knowledge.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    migrator_upto(super::sqlite::MIGRATIONS, 4)
        .run(&pool)
        .await
        .unwrap();
    sqlx::query(SVIDS_0004).execute(&pool).await.unwrap();
    pool.close().await;
    check_svids_upgraded(&format!("sqlite://{}", path.display())).await;
}

#[tokio::test]
async fn postgres_upgrades_svid_lifecycles_from_0004() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    migrator_upto(super::postgres::MIGRATIONS, 4)
        .run(&pool)
        .await
        .unwrap();
    sqlx::query(SVIDS_0004).execute(&pool).await.unwrap();
    pool.close().await;
    check_svids_upgraded(&db.url).await;
}

/// Every listing shape and every start-up read is an index search or an
/// ordered index scan: no full table scan; and no listing sorts (a page is
/// an index range).
#[tokio::test]
async fn sqlite_listings_and_start_up_reads_use_an_index() {
    use super::list;
    let f = Fixture::sqlite().await;
    let Raw::Sqlite(s) = &f.raw else {
        unreachable!()
    };
    let page = || {
        Some(PageKey {
            at_ms: T0,
            id: "7".into(),
        })
    };
    let inc = || Some("inc-1".to_owned());
    let shapes: Vec<(&str, list::Listing)> = vec![
        ("incidents", list::incidents(&q()).unwrap()),
        (
            "incidents",
            list::incidents(&Query {
                open_only: true,
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "incidents",
            list::incidents(&Query {
                symptom: Some("svid_expiring".into()),
                open_only: true,
                since_ms: Some(T0),
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "incidents",
            list::incidents(&Query {
                since_ms: Some(T0),
                until_ms: Some(T0 + 1),
                ..q()
            })
            .unwrap(),
        ),
        (
            "actions",
            list::actions(&Query {
                page: page(),
                until_ms: Some(T0),
                ..q()
            })
            .unwrap(),
        ),
        (
            "actions",
            list::actions(&Query {
                incident_id: inc(),
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "holds",
            list::holds(&Query {
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "holds",
            list::holds(&Query {
                incident_id: inc(),
                page: page(),
                since_ms: Some(T0),
                ..q()
            })
            .unwrap(),
        ),
        (
            "approvals",
            list::approvals(&Query {
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "approvals",
            list::approvals(&Query {
                open_only: true,
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "approvals",
            list::approvals(&Query {
                incident_id: inc(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "audit",
            list::audit(&Query {
                kinds: vec!["held".into(), "acted".into()],
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
        (
            "audit",
            list::audit(&Query {
                incident_id: inc(),
                since_ms: Some(T0),
                page: page(),
                ..q()
            })
            .unwrap(),
        ),
    ];
    let mut statements: Vec<(String, bool)> = shapes
        .into_iter()
        .map(|(table, l)| (format!("SELECT * FROM {table} {}", l.sql), false))
        .collect();
    // Live approvals are few (the loop concludes each): sorting the ones
    // the index found is fine.
    statements.push((list::LIVE_APPROVALS.to_owned(), true));
    statements.extend(
        [
            list::LAST_CONTROL_CHANGE,
            list::FIRST_VERDICT_PAIR,
            list::NEXT_VERDICT_PAIR,
            list::VERDICT_WINDOW_OF_PAIR,
            "SELECT * FROM incidents WHERE id = $1",
            "SELECT * FROM incidents WHERE closed_at_ms IS NULL ORDER BY opened_at_ms, id",
            "SELECT * FROM actions WHERE started_at_ms >= $1 ORDER BY started_at_ms, id",
        ]
        .map(|sql| (sql.to_owned(), false)),
    );
    for (sql, may_sort) in statements {
        let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
            .fetch_all(s.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let plan: Vec<String> = rows
            .iter()
            .map(|r| sqlx::Row::get::<String, _>(r, "detail"))
            .collect();
        let plan = plan.join(" | ");
        let full_scan = plan
            .split(" | ")
            .any(|step| step.starts_with("SCAN") && !step.contains("USING"));
        assert!(!full_scan, "table scan: {sql}\n{plan}");
        assert!(
            may_sort || !plan.contains("TEMP B-TREE"),
            "sort: {sql}\n{plan}"
        );
    }
}

#[tokio::test]
async fn sqlite_missing_directory_is_a_config_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("knowledge.db");
    let err = SqliteStore::open(&path).await.unwrap_err();
    assert_eq!(err.kind(), "config", "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let url = format!("sqlite://{}", path.display());
    let err = open(&url).await.err().expect("open fails");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    // A directory where the file should be.
    let err = SqliteStore::open(dir.path()).await.unwrap_err();
    assert_eq!(err.kind(), "config", "{err}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn sqlite_file_is_wal_with_normal_sync() {
    let f = Fixture::sqlite().await;
    let Raw::Sqlite(s) = &f.raw else {
        unreachable!()
    };
    let mut conn = s.pool().acquire().await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(synchronous, 1, "NORMAL");
    let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(temp_store, 2, "MEMORY");
    let busy_timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(busy_timeout >= 1_000, "{busy_timeout}");
}

#[tokio::test]
async fn sqlite_in_memory_keeps_its_data() {
    let store = SqliteStore::open(std::path::Path::new(":memory:"))
        .await
        .unwrap();
    store.apply(&mixed_batch("m", T0)).await.unwrap();
    assert_eq!(store.incidents(&q()).await.unwrap().len(), 1);
    assert_eq!(store.svids(&q()).await.unwrap().len(), 2);
}

#[tokio::test]
async fn postgres_unreachable_at_start_fails_fast_naming_address_not_password() {
    // A port with nothing listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let secret = "hunter2-not-for-logs";
    let url = format!("postgres://spire_healer:{secret}@127.0.0.1:{port}/spire_healer");
    let started = Instant::now();
    let err = open(&url).await.err().expect("connect fails");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), "unavailable", "{err}");
    let text = format!("{} | {err:?}", chain(&err));
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains(secret), "{text}");
}

#[tokio::test]
async fn postgres_wrong_password_is_a_config_error_without_the_password() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let secret = "definitely-wrong-password";
    let (scheme, rest) = db.url.split_once("://").unwrap();
    let (userinfo, rest) = rest.split_once('@').unwrap();
    let user = userinfo.split(':').next().unwrap();
    let url = format!("{scheme}://{user}:{secret}@{rest}");
    let err = PostgresStore::connect(&url).await.unwrap_err();
    let text = format!("{} | {err:?}", chain(&err));
    assert!(!text.contains(secret), "{text}");
    // Local servers may trust the role; only a rejection is checked.
    if !matches!(err, StoreError::Config(_)) {
        assert_eq!(err.kind(), "unavailable", "{text}");
    }
}

#[tokio::test]
async fn schemas_agree_across_backends() {
    let Some(pg) = Fixture::postgres().await else {
        return;
    };
    let lite = Fixture::sqlite().await;
    let (Raw::Sqlite(s), Raw::Postgres(p)) = (&lite.raw, &pg.raw) else {
        unreachable!()
    };
    let lite_cols: BTreeSet<(String, String, bool)> = sqlx::query_as(
        "SELECT m.name, c.name, c.\"notnull\" = 1 OR c.pk > 0 \
         FROM sqlite_master m, pragma_table_info(m.name) c \
         WHERE m.type = 'table' AND m.name NOT LIKE '\\_%' ESCAPE '\\' \
           AND m.name NOT LIKE 'sqlite%'",
    )
    .fetch_all(s.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    let pg_cols: BTreeSet<(String, String, bool)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, is_nullable = 'NO' \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_%'",
    )
    .fetch_all(p.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(lite_cols, pg_cols);
}

// === The database goes away ===

/// A TCP forwarder between the store and PostgreSQL that can be cut: all
/// connections dropped and new ones closed on accept. Counts the bytes it
/// has passed on to PostgreSQL, so a test can cut it mid-flight.
struct Forwarder {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    sent: Arc<tokio::sync::watch::Sender<u64>>,
    conns: Arc<Mutex<JoinSet<()>>>,
    accept: JoinHandle<()>,
}

impl Forwarder {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let sent = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let accept = tokio::spawn({
            let open = open.clone();
            let sent = sent.clone();
            let conns = conns.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if !open.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let sent = sent.clone();
                    conns.lock().unwrap().spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(upstream).await {
                            forward(inbound, outbound, &sent).await;
                        }
                    });
                }
            }
        });
        Self {
            addr,
            open,
            sent,
            conns,
            accept,
        }
    }

    /// Bytes passed on to PostgreSQL so far.
    fn sent(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sent.subscribe()
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.conns.lock().unwrap().abort_all();
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// Copies both ways until either side closes, counting the bytes that go
/// upstream.
async fn forward(inbound: TcpStream, outbound: TcpStream, sent: &tokio::sync::watch::Sender<u64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = in_read.read(&mut buf).await {
            if out_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent.send_modify(|b| *b += n as u64);
        }
        let _ = out_write.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
        let _ = in_write.shutdown().await;
    };
    tokio::join!(up, down);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_mid_run_buffers_and_recovers() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let fwd = Forwarder::start(upstream).await;
    let proxied = rewrite_url(&db.url, Some(&fwd.addr.to_string()), None);
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&proxied).await.unwrap());
    let mut buffer = Buffer::new(store.clone(), 100_000);

    let before = mixed_batch("before", T0);
    buffer.push(before.clone());
    assert_eq!(buffer.flush().await.unwrap(), before.len());

    fwd.cut();
    let during = mixed_batch("during", T0 + 10_000);
    buffer.push(during.clone());
    let started = Instant::now();
    let err = buffer.flush().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), "unavailable", "{}", chain(&err));
    assert!(
        chain(&err).contains(&fwd.addr.to_string()),
        "{}",
        chain(&err)
    );
    assert_eq!(buffer.len(), during.len());
    assert!(store.ping().await.is_err());

    fwd.restore();
    let after = mixed_batch("after", T0 + 20_000);
    buffer.push(after.clone());
    assert_eq!(buffer.flush().await.unwrap(), during.len() + after.len());

    // Cut again while a large flush is in flight: whichever chunk the cut
    // lands in, everything arrives exactly once after the restore.
    let bulk: Vec<Event> = (0..30_000)
        .map(|n| {
            svid_seen(
                "node-bulk",
                "spiffe://example.org/bulk",
                &format!("{n:x}"),
                T0 + n,
            )
        })
        .collect();
    buffer.push(bulk.clone());
    let mut sent = fwd.sent();
    let mark = *sent.borrow_and_update();
    let cutter = async {
        // Cut once the flush has passed 64 KiB of the bulk to PostgreSQL.
        let in_flight = tokio::time::timeout(
            Duration::from_secs(30),
            sent.wait_for(|b| *b > mark + 64 * 1024),
        )
        .await;
        assert!(in_flight.is_ok(), "the flush never reached PostgreSQL");
        fwd.cut();
    };
    let (first_try, ()) = tokio::join!(buffer.flush(), cutter);
    if let Err(e) = &first_try {
        assert_eq!(e.kind(), "unavailable", "{}", chain(e));
    }
    fwd.restore();
    buffer.flush().await.unwrap();
    assert!(buffer.is_empty());
    assert_eq!(buffer.dropped(), 0);

    // Check through a direct connection.
    let direct = PostgresStore::connect(&db.url).await.unwrap();
    let check = Fixture {
        store: Arc::new(direct.clone()),
        raw: Raw::Postgres(direct),
        url: db.url.clone(),
        _dir: None,
        _db: None,
    };
    assert_eq!(check.count("incidents").await, 3);
    assert_eq!(check.count("actions").await, 3);
    assert_eq!(check.count("holds").await, 3);
    assert_eq!(check.count("svid_lifecycles").await, 6 + 30_000);
    let incidents = check.store.incidents(&q()).await.unwrap();
    assert!(
        incidents
            .iter()
            .all(|i| i.closed_at_ms.is_some() && i.next_rung == 1),
        "updates applied in order after their inserts: {incidents:?}"
    );
    let actions = check.store.actions(&q()).await.unwrap();
    assert!(
        actions
            .iter()
            .all(|a| a.outcome.as_deref() == Some("ok") && a.verification.is_some())
    );
}

// === One actor per scope ===

mod scope {
    use super::*;
    use crate::knowledge::scope_lock::{Holder, acquire};

    fn holder(pid: u32) -> Holder {
        Holder {
            host: "node-1".into(),
            pid,
            since: at(0),
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn sqlite_one_instance_per_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("h.db").display());
        let first = acquire(&url, &names(&["a"]), &holder(4242)).await.unwrap();
        assert_eq!(first.kind(), "lock_file");
        // Any second instance on the same file, whatever its agents.
        let e = acquire(&url, &names(&["b"]), &holder(7)).await.unwrap_err();
        assert_eq!(e.kind(), "in_use");
        let msg = e.to_string();
        assert!(
            msg.contains("pid 4242 on node-1") && msg.contains("h.db.lock"),
            "{msg}"
        );
        // Released with its holder (as when the process ends).
        drop(first);
        let again = acquire(&url, &names(&["b"]), &holder(7)).await.unwrap();
        drop(again);
        // Nothing to share in memory.
        let mem = acquire("sqlite://:memory:", &names(&["a"]), &holder(1))
            .await
            .unwrap();
        assert_eq!(mem.kind(), "none");
    }

    #[tokio::test]
    async fn postgres_one_instance_per_agent() {
        let Some(url) = pg_admin_url() else { return };
        // Agent names unique to this run: the database is shared.
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let n = |a: &str| format!("{a}-{tag}");
        let mut first = acquire(&url, &[n("a"), n("b")], &holder(4242))
            .await
            .unwrap();
        assert_eq!(first.kind(), "advisory_locks");
        assert!(first.alive().await);
        // Overlapping agents: refused, naming the agent and the holder.
        let e = acquire(&url, &[n("c"), n("b")], &holder(7))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "in_use");
        let msg = e.to_string();
        assert!(
            msg.contains(&n("b")) && msg.contains("pid 4242 on node-1"),
            "{msg}"
        );
        // Disjoint agents (another node's instance): both act.
        let other = acquire(&url, &[n("c")], &holder(8)).await.unwrap();
        drop(other);
        // Released when the holder's session ends.
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match acquire(&url, &[n("b")], &holder(7)).await {
                Ok(_) => break,
                Err(e) if e.kind() == "in_use" && tokio::time::Instant::now() < deadline => {
                    // The server notices the closed session shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

// === Reading never creates ===

#[tokio::test]
async fn sqlite_reading_a_missing_store_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.db");
    let url = format!("sqlite://{}", path.display());
    let e = crate::knowledge::open_existing(&url).await.err().unwrap();
    assert_eq!(e.kind(), "config");
    assert!(e.to_string().contains("typo.db"), "{e}");
    assert!(!path.exists(), "a reader created the file");
    // A file that is not our store is refused too.
    std::fs::write(&path, b"").unwrap();
    let e = crate::knowledge::open_existing(&url).await.err().unwrap();
    assert!(e.to_string().contains("not a spire-healer store"), "{e}");
    std::fs::remove_file(&path).unwrap();
    // Once `run` has created it, it reads.
    drop(crate::knowledge::open(&url).await.unwrap());
    let s = crate::knowledge::open_existing(&url).await.unwrap();
    assert!(s.incidents(&Query::default()).await.unwrap().is_empty());
}

#[tokio::test]
async fn postgres_reading_an_empty_database_migrates_nothing() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let e = crate::knowledge::open_existing(&db.url)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), "config");
    assert!(
        e.to_string().contains("not a spire-healer store") && e.to_string().contains(&db.name),
        "{e}"
    );
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    assert_eq!(tables, 0, "a reader migrated the database");
    drop(crate::knowledge::open(&db.url).await.unwrap());
    let s = crate::knowledge::open_existing(&db.url).await.unwrap();
    assert!(s.incidents(&Query::default()).await.unwrap().is_empty());
}
