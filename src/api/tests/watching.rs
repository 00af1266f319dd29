//! `Watch`: mapping, order, resuming, bounds, a client that never reads,
//! shutdown.

use tonic::Code;
use tonic::Streaming;

use super::*;
use crate::model::{Approval, ApprovalState, ControlChange, Event, SymptomKind};
use crate::proto::healer as pb;

fn held(incident: &str) -> Event {
    Event::Held {
        incident_id: incident.into(),
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        reason: "cooldown".into(),
        at: std::time::UNIX_EPOCH + Duration::from_secs(T0),
    }
}

async fn watch(api: &TestApi, cursor: &str) -> Result<Streaming<pb::WatchEvent>, Status> {
    api.grpc()
        .watch(pb::WatchRequest {
            cursor: cursor.into(),
        })
        .await
        .map(Response::into_inner)
}

/// The next event, waiting at most 20 s.
async fn next(stream: &mut Streaming<pb::WatchEvent>) -> Result<Option<pb::WatchEvent>, Status> {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an event or the end within 20 s")
}

/// Waits until the server runs `n` subscribers (a Watch call returns
/// before its pump has looked at the hub).
async fn subscribers(api: &TestApi, n: usize) {
    let watchers = api.api.watchers.clone();
    eventually("the subscriber count", || watchers.running() == n).await;
}

#[tokio::test]
async fn events_stream_in_order_mapped_and_sightings_left_out() {
    let api = TestApi::start(|_| {}).await;
    let hub = &api.backend.hub;
    hub.publish(&[held("before")]);
    let mut stream = watch(&api, "").await.unwrap();
    subscribers(&api, 1).await;
    let now = api.clock.now();
    hub.publish(&[
        Event::SubjectSeen {
            subject: crate::model::Subject::agent("node-a"),
            at: now,
        },
        Event::ApprovalRequested {
            approval: Approval {
                id: "ap-1".into(),
                incident_id: "inc-1".into(),
                symptom: SymptomKind::AgentUnreachable,
                rung: 1,
                actuator: "restart-agent".into(),
                target: "node-a".into(),
                requested_at: now,
                expires_at: now + Duration::from_secs(600),
            },
        },
        Event::ApprovalDecided {
            id: "ap-1".into(),
            state: ApprovalState::Approved,
            by: Some("spiffe://td.test/ops/alice".into()),
            reason: Some("go".into()),
            action_id: None,
            at: now,
        },
        Event::ControlChanged {
            id: "c1".into(),
            change: ControlChange::Paused,
            by: "uid:0".into(),
            reason: Some("incident 42".into()),
            at: now,
        },
        held("inc-1"),
    ]);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next(&mut stream).await.unwrap().unwrap());
    }
    let kinds: Vec<_> = got.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["pending", "approved", "paused", "held"]);
    assert_eq!(got[0].approval_id, "ap-1");
    assert_eq!(got[0].actuator, "restart-agent");
    assert_eq!(got[0].actor, "spire-healer");
    assert_eq!(got[1].actor, "spiffe://td.test/ops/alice");
    assert_eq!(got[1].reason, "go");
    assert_eq!(
        (got[2].actor.as_str(), got[2].reason.as_str()),
        ("uid:0", "incident 42")
    );
    assert_eq!(got[3].incident_id, "inc-1");
    assert_eq!(got[3].at_unix_ms, T0 as i64 * 1000);
    // Cursors follow the hub's sequence: `before` was 1.
    let cursors: Vec<_> = got.iter().map(|e| e.cursor.clone()).collect();
    assert_eq!(cursors, (2..=5).map(|s| hub.cursor(s)).collect::<Vec<_>>());
    assert_eq!(api.calls("watch", "ok"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn a_cursor_resumes_after_its_event_and_a_stale_one_is_out_of_range() {
    let api = TestApi::start_with(
        Setup {
            hub_capacity: 8,
            ..Setup::default()
        },
        |_| {},
    )
    .await;
    let hub = &api.backend.hub;
    hub.publish(&(1..=5).map(|i| held(&format!("i{i}"))).collect::<Vec<_>>());
    let mut stream = watch(&api, &hub.cursor(2)).await.unwrap();
    for want in ["i3", "i4", "i5"] {
        let e = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(e.incident_id, want);
    }
    // And goes on with what comes next.
    hub.publish(&[held("i6")]);
    let e = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(
        (e.incident_id.as_str(), e.cursor.clone()),
        ("i6", hub.cursor(6))
    );
    // The newest cursor: nothing until something new.
    let mut tail = watch(&api, &hub.cursor(6)).await.unwrap();
    hub.publish(&[held("i7")]);
    assert_eq!(next(&mut tail).await.unwrap().unwrap().incident_id, "i7");
    // The ring (8) moves past 2.
    hub.publish(&(8..=20).map(|i| held(&format!("i{i}"))).collect::<Vec<_>>());
    let err = watch(&api, &hub.cursor(2)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(err.message().contains("list, then watch"), "{err}");
    // Another run's cursor, and one from the future.
    let err = watch(&api, "0190a7f0-0000-7000-8000-000000000000:3")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    let err = watch(&api, &hub.cursor(1000)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    // Malformed, and overlong.
    let err = watch(&api, "garbage").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = watch(&api, &"c".repeat(10_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(
        api.calls("watch", "invalid"),
        5.0,
        "OUT_OF_RANGE counts as invalid"
    );
    drop((stream, tail));
    api.stop().await;
}

#[tokio::test]
async fn watchers_over_the_bound_are_refused_until_one_leaves() {
    let api = TestApi::start(|c| c.max_watchers = 2).await;
    let a = watch(&api, "").await.unwrap();
    let b = watch(&api, "").await.unwrap();
    let err = watch(&api, "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(api.calls("watch", "resource_exhausted"), 1.0);
    drop(a);
    // The client's cancel reaches the server; its subscriber ends.
    subscribers(&api, 1).await;
    let c = watch(&api, "").await.unwrap();
    drop((b, c));
    api.stop().await;
}

#[tokio::test]
async fn shutdown_ends_a_watch_with_unavailable_after_what_was_queued() {
    let api = TestApi::start(|_| {}).await;
    let mut stream = watch(&api, "").await.unwrap();
    subscribers(&api, 1).await;
    api.backend.hub.publish(&[held("i1")]);
    assert_eq!(next(&mut stream).await.unwrap().unwrap().incident_id, "i1");
    api.shutdown.cancel();
    let err = next(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    api.stop().await;
}

/// A client that opens a Watch and never reads while 100,000 events are
/// published: its queue never holds more than `watch_buffer` events, it is
/// dropped once the hub's ring moves past it, counted, its slot freed,
/// and when it reads at last it gets what was in flight, then
/// RESOURCE_EXHAUSTED.
#[tokio::test]
async fn a_client_that_never_reads_is_dropped_with_its_memory_bounded() {
    const EVENTS: usize = 100_000;
    const BUFFER: usize = 256;
    let api = TestApi::start_with(
        Setup {
            hub_capacity: 1024,
            ..Setup::default()
        },
        |c| {
            c.watch_buffer = BUFFER;
            c.max_watchers = 1;
        },
    )
    .await;
    let mut idle = watch(&api, "").await.unwrap();
    subscribers(&api, 1).await;
    let watchers = api.api.watchers.clone();
    let hub = &api.backend.hub;
    let batch: Vec<Event> = (0..100).map(|i| held(&format!("inc-{i}"))).collect();
    let mut dropped_at = None;
    for n in 0..EVENTS / batch.len() {
        hub.publish(&batch);
        // Let the pump and the connection run between batches, as the
        // loop's ticks would.
        tokio::task::yield_now().await;
        if dropped_at.is_none() && watchers.running() == 0 {
            dropped_at = Some((n + 1) * batch.len());
        }
    }
    assert_eq!(hub.newest(), EVENTS as u64);
    eventually("the idle subscriber to be dropped", || {
        api.metric("spire_healer_api_watch_dropped_total") == 1.0
    })
    .await;
    subscribers(&api, 0).await;
    let (queued, bytes) = watchers.high_water();
    println!(
        "idle Watch client, {EVENTS} events published: queue high-water {queued} events \
         ({bytes} bytes encoded), watch_buffer {BUFFER}, hub ring 1024; dropped after \
         {dropped_at:?} events"
    );
    assert!(queued <= BUFFER, "queue held {queued} > {BUFFER}");
    assert!(queued > 0, "the queue was used");
    // Its slot is free again.
    let mut fresh = watch(&api, "").await.unwrap();
    subscribers(&api, 1).await;
    hub.publish(&[held("after")]);
    assert_eq!(
        next(&mut fresh).await.unwrap().unwrap().incident_id,
        "after"
    );
    // Reading at last: what HTTP/2 had in flight, then the verdict.
    let mut delivered = 0usize;
    let err = loop {
        match next(&mut idle).await {
            Ok(Some(_)) => delivered += 1,
            Ok(None) => panic!("ended without a status after {delivered} events"),
            Err(e) => break e,
        }
    };
    println!("the idle client then read {delivered} events in flight before its status");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("fell behind"), "{err}");
    assert!(delivered < EVENTS, "{delivered}");
    drop(fresh);
    api.stop().await;
}
