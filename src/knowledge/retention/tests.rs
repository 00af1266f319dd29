//! Retention on both backends, at literal times: what is kept, what goes,
//! statements bounded by the batch, a served SVID never pruned.

use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::knowledge::tests::{
    PgDatabase, closed, held, incident, opened, q, requested, started, svid_replaced, svid_seen,
};
use crate::knowledge::{Store, frames::StoredFrame};

const WEB: &str = "spiffe://example.org/web";
const DB: &str = "spiffe://example.org/db";
const GONE: &str = "spiffe://example.org/gone";

/// Rows in `table` (a name from this file's constants).
async fn count(fs: &FrameStore, table: &'static str) -> i64 {
    let sql = match table {
        "svid_names" => "SELECT count(*) FROM svid_names",
        "svid_lifecycles" => "SELECT count(*) FROM svid_lifecycles",
        "holds" => "SELECT count(*) FROM holds",
        "actions" => "SELECT count(*) FROM actions",
        "approvals" => "SELECT count(*) FROM approvals",
        "incidents" => "SELECT count(*) FROM incidents",
        "audit" => "SELECT count(*) FROM audit",
        "replay_frames" => "SELECT count(*) FROM replay_frames",
        other => panic!("unknown table {other}"),
    };
    match fs.backend() {
        frames::Backend::Sqlite(s) => sqlx::query_scalar(sql).fetch_one(s.pool()).await,
        frames::Backend::Postgres(s) => sqlx::query_scalar(sql).fetch_one(s.pool()).await,
    }
    .unwrap()
}

fn everything_at(cut: i64) -> Cuts {
    Cuts {
        replay_frames: Some(cut),
        svids: Some(cut),
        holds: Some(cut),
        incidents: Some(cut),
        audit: Some(cut),
    }
}

/// Times are plain milliseconds; the cut is at 10,000 for every kind.
async fn keeps_what_is_young_open_or_served(store: Arc<dyn Store>, fs: FrameStore) {
    const CUT: i64 = 10_000;
    store
        .apply(&[
            // node-a/web: 01 replaced long ago (goes), 02 replaced after the
            // cut (stays), 03 served.
            svid_seen("node-a", WEB, "01", 1_000),
            svid_seen("node-a", WEB, "02", 2_000),
            svid_replaced("node-a", WEB, "01", 2_000),
            svid_seen("node-a", WEB, "03", 50_000),
            svid_replaced("node-a", WEB, "02", 50_000),
            // node-b/db: served since before the cut, never replaced: stays.
            svid_seen("node-b", DB, "aa", 500),
            // node-c/gone: its only serial replaced long ago; the pair goes too.
            svid_seen("node-c", GONE, "bb", 100),
            svid_replaced("node-c", GONE, "bb", 200),
            // Closed before the cut, with an action, an approval and a hold:
            // all go.
            opened(incident("inc-old", 1_000)),
            started("act-old", "inc-old", 1_500),
            requested("apr-old", "inc-old", 1_200),
            held("inc-old", "cooldown", 1_300),
            closed("inc-old", 5_000, "cleared"),
            // Closed after the cut: stays, with its action.
            opened(incident("inc-new", 1_000)),
            started("act-new", "inc-new", 1_600),
            closed("inc-new", 30_000, "cleared"),
            // Open since long ago: stays with its action; only its old hold
            // goes (by the holds' own age).
            opened(incident("inc-open", 500)),
            started("act-open", "inc-open", 600),
            held("inc-open", "budget", 700),
            held("inc-open", "budget", 20_000),
        ])
        .await
        .unwrap();
    fs.insert(&[
        StoredFrame {
            run_id: "r".into(),
            seq: 0,
            at_ms: 9_999,
            frame: "{}".into(),
        },
        StoredFrame {
            run_id: "r".into(),
            seq: 1,
            at_ms: CUT,
            frame: "{}".into(),
        },
    ])
    .await
    .unwrap();
    let audit_before = count(&fs, "audit").await;
    assert!(audit_before > 0);

    let pruner = Pruner::new(&fs).with_batches(MAX_BATCH, Duration::ZERO);
    let mut pruned = Pruned::default();
    let keep_audit = Cuts {
        audit: None,
        ..everything_at(CUT)
    };
    pruner.prune(&keep_audit, &mut pruned).await.unwrap();

    let svids: Vec<(String, String)> = store
        .svids(&q())
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.agent, s.serial))
        .collect();
    assert_eq!(
        svids,
        [
            ("node-a".into(), "03".into()),
            ("node-a".into(), "02".into()),
            ("node-b".into(), "aa".into()),
        ]
    );
    assert_eq!(count(&fs, "svid_names").await, 2, "node-c/gone went");
    let incidents: Vec<String> = store
        .incidents(&q())
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(incidents, ["inc-new", "inc-open"]);
    let mut actions: Vec<String> = store
        .actions(&q())
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    actions.sort();
    assert_eq!(actions, ["act-new", "act-open"]);
    assert_eq!(count(&fs, "approvals").await, 0);
    let holds: Vec<(String, i64)> = store
        .holds(&q())
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.incident_id, h.at_ms))
        .collect();
    assert_eq!(holds, [("inc-open".to_string(), 20_000)]);
    assert_eq!(count(&fs, "replay_frames").await, 1);
    // The audit trail outlives the incidents it names.
    assert_eq!(count(&fs, "audit").await, audit_before);
    let expected = [
        (Table::ReplayFrames, 1),
        (Table::SvidLifecycles, 2),
        (Table::SvidNames, 1),
        (Table::Holds, 2),
        (Table::Actions, 1),
        (Table::Approvals, 1),
        (Table::Incidents, 1),
    ];
    assert_eq!(pruned.iter().collect::<Vec<_>>(), expected);

    // A second pass finds nothing more; an audit cut takes the old rows.
    let mut again = Pruned::default();
    pruner.prune(&keep_audit, &mut again).await.unwrap();
    assert_eq!(again.iter().count(), 0);
    pruner.prune(&everything_at(CUT), &mut again).await.unwrap();
    let audit: Vec<i64> = store
        .audit(&q())
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.at_ms)
        .collect();
    assert!(
        !audit.is_empty() && audit.iter().all(|t| *t >= CUT),
        "{audit:?}"
    );
    assert_eq!(
        again.get(Table::Audit),
        u64::try_from(audit_before).unwrap() - audit.len() as u64
    );

    // What a pass deleted can be written again: a pruned pair comes back.
    store
        .apply(&[svid_seen("node-c", GONE, "cc", 60_000)])
        .await
        .unwrap();
    assert_eq!(count(&fs, "svid_names").await, 3);
    assert_eq!(store.svids(&q()).await.unwrap()[0].serial, "cc");
}

/// Many old rows: every statement deletes at most the batch, and all go.
async fn statements_are_bounded_by_the_batch(store: Arc<dyn Store>, fs: FrameStore) {
    let mut events = Vec::new();
    for i in 0..3 {
        let id = format!("inc-{i}");
        events.push(opened(incident(&id, 100)));
        for a in 0..5 {
            events.push(started(&format!("act-{i}-{a}"), &id, 200 + a));
        }
        events.push(closed(&id, 1_000, "cleared"));
    }
    // 25 holds of an open incident, 20 pairs each with a replaced serial
    // (the names go in windows of the batch) and a served one elsewhere.
    events.push(opened(incident("inc-open", 100)));
    events.extend((0..25).map(|i| held("inc-open", "budget", 300 + i)));
    for i in 0..20 {
        let id = format!("spiffe://example.org/w{i}");
        events.push(svid_seen("node-a", &id, "01", 100));
        events.push(svid_replaced("node-a", &id, "01", 200));
    }
    events.push(svid_seen("node-b", WEB, "01", 100));
    store.apply(&events).await.unwrap();

    let pruner = Pruner::new(&fs).with_batches(7, Duration::ZERO);
    let mut pruned = Pruned::default();
    pruner
        .prune(&everything_at(5_000), &mut pruned)
        .await
        .unwrap();
    assert!(pruned.largest_statement() <= 7, "{pruned:?}");
    assert_eq!(pruned.get(Table::Actions), 15);
    assert_eq!(pruned.get(Table::Incidents), 3);
    assert_eq!(pruned.get(Table::Holds), 25);
    assert_eq!(pruned.get(Table::SvidLifecycles), 20);
    assert_eq!(pruned.get(Table::SvidNames), 20);
    assert_eq!(count(&fs, "incidents").await, 1, "the open one stays");
    assert_eq!(
        count(&fs, "svid_lifecycles").await,
        1,
        "the served one stays"
    );
    assert_eq!(count(&fs, "svid_names").await, 1);
}

macro_rules! both {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", dir.path().join("k.db").display());
                    let (store, fs) = crate::knowledge::frames::open(&url).await.unwrap();
                    super::$case(store, fs).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(db) = super::PgDatabase::create().await else {
                        return;
                    };
                    let (store, fs) = crate::knowledge::frames::open(&db.url).await.unwrap();
                    super::$case(store, fs).await;
                }
            )*
        }
    };
}

both!(
    keeps_what_is_young_open_or_served,
    statements_are_bounded_by_the_batch
);

#[test]
fn cuts_follow_the_configuration_and_zero_keeps_forever() {
    let now = UNIX_EPOCH + Duration::from_secs(100 * 86_400);
    let day_ms = 86_400_000;
    let cuts = Cuts::at(
        now,
        &RetentionConfig::default(),
        Duration::from_secs(86_400),
    );
    assert_eq!(
        cuts,
        Cuts {
            replay_frames: Some(99 * day_ms),
            svids: Some(93 * day_ms),
            holds: Some(70 * day_ms),
            incidents: Some(10 * day_ms),
            audit: None,
        }
    );
    // Longer than the clock's age: everything from the epoch on stays.
    let long = RetentionConfig {
        svids: Duration::from_secs(1_000 * 86_400),
        ..RetentionConfig::default()
    };
    assert_eq!(Cuts::at(now, &long, Duration::ZERO).svids, Some(0));
    assert_eq!(Cuts::at(now, &long, Duration::ZERO).replay_frames, None);
}

#[test]
fn the_section_reads_durations_and_names_every_problem() {
    let parse =
        |text: &str| toml::from_str::<RetentionConfig>(text).map_err(|e| e.message().to_string());
    assert_eq!(parse("").unwrap(), RetentionConfig::default());
    let c = parse("svids = \"2d\"\naudit = \"400d\"\nholds = \"0s\"").unwrap();
    assert_eq!(c.svids, Duration::from_secs(2 * 86_400));
    assert_eq!(c.audit, Duration::from_secs(400 * 86_400));
    assert_eq!(c.holds, Duration::ZERO);
    assert_eq!(c.incidents, RetentionConfig::default().incidents);
    let e = parse("svids = \"10m\"\nincidents = \"59m\"").unwrap_err();
    assert!(e.contains("svids = 10m must be at least 1h"), "{e}");
    assert!(e.contains("incidents = 59m must be at least 1h"), "{e}");
    assert!(
        parse("frames = \"1d\"")
            .unwrap_err()
            .contains("unknown field")
    );
}

#[test]
fn every_table_has_a_label() {
    let labels: Vec<&str> = Table::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(
        labels,
        [
            "replay_frames",
            "svid_lifecycles",
            "svid_names",
            "holds",
            "actions",
            "approvals",
            "incidents",
            "audit"
        ]
    );
}

#[test]
fn the_configuration_file_reads_the_section_and_names_its_problems() {
    let c = crate::config::Config::parse(
        "[database]\nurl = \"sqlite:///tmp/x.db\"\n\n[database.retention]\nsvids = \"3d\"\n",
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.database.retention.svids, Duration::from_secs(3 * 86_400));
    assert_eq!(
        crate::config::Config::parse("", "t.toml")
            .unwrap()
            .database
            .retention,
        RetentionConfig::default()
    );
    // The example configuration spells out the defaults.
    let example = include_str!("../../../deploy/examples/spire-healer.toml");
    let c = crate::config::Config::parse(example, "example").unwrap();
    assert_eq!(c.database.retention, RetentionConfig::default());
    let errors = crate::config::Config::parse(
        "[database.retention]\nsvids = \"5m\"\nfames = \"1d\"\n",
        "t.toml",
    )
    .unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        text.iter().any(|t| t.contains("database.retention.fames")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("database.retention") && t.contains("svids = 5m")),
        "{text:?}"
    );
}
