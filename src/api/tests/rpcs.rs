//! RPC bodies over the socket with our own (operator) uid: what each
//! answers, and how bad input, unknown ids and conflicting decisions are
//! refused.

use tonic::Code;

use super::matrix::{Client, Fixture, call, pending};
use super::*;
use crate::control::{DemotedStep, SubjectState, SubjectStatus};
use crate::model::{
    ApprovalState, Event, Incident, Outcome as ActionOutcome, Severity, Step, Subject, SymptomKind,
};
use crate::proto::healer as pb;

fn at(secs: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(T0 + secs)
}

fn incident(id: &str, symptom: SymptomKind, opened: u64) -> Incident {
    Incident {
        id: id.into(),
        kind: symptom,
        subject: Subject::agent("node-a"),
        severity: Severity::Warning,
        opened_at: at(opened),
        predicted_outage: Some(at(opened + 3600)),
        evidence: serde_json::json!({ "n": 1 }),
        next_rung: 0,
        needs_operator: None,
    }
}

fn step(action_id: &str, incident_id: &str, rung: usize) -> Step {
    Step {
        action_id: action_id.into(),
        incident_id: incident_id.into(),
        symptom: SymptomKind::AgentUnreachable,
        rung,
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        params: serde_json::json!({}),
        timeout: Duration::from_secs(10),
        verify_within: Duration::from_secs(60),
        dry_run: false,
    }
}

fn code<T>(r: Result<T, Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

// === Reads ===

#[tokio::test]
async fn get_status_answers_from_the_loops_status_and_the_controls() {
    let api = TestApi::start(|_| {}).await;
    api.status.send_replace(crate::control::Status {
        subjects: vec![SubjectStatus {
            subject: "agent:node-a".into(),
            state: SubjectState::Failing,
            open_incident_ids: vec!["inc-1".into()],
            predicted_outage: Some(at(600)),
        }],
        healthy_subjects: 4,
        blind_sensors: vec!["server_api".into()],
        actions_in_flight: 1,
        open_incidents: 1,
        last_tick: Some(at(0)),
        store_up: true,
    });
    let c = &api.backend.controls;
    c.pause("uid:0", Some("incident 42".into()), at(1));
    pending(&api, "a1");
    pending(&api, "a2");
    c.decide("a2", true, "uid:0", None, at(2)).unwrap();
    c.demote(DemotedStep {
        symptom: SymptomKind::AgentUnreachable,
        actuator: "restart-agent".into(),
        verified: 1,
        runs: 10,
        at: at(3),
    });
    let s = api
        .grpc()
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.subjects.len(), 1);
    assert_eq!(s.subjects[0].state(), pb::SubjectState::Failing);
    assert_eq!(
        s.subjects[0].predicted_outage_unix_ms,
        (T0 as i64 + 600) * 1000
    );
    assert_eq!(s.healthy_subjects, 4);
    assert_eq!(s.blind_sensors, vec!["server_api"]);
    assert!(s.paused);
    assert_eq!(s.paused_by, "uid:0");
    assert_eq!(s.pause_reason, "incident 42");
    assert_eq!(s.paused_at_unix_ms, (T0 as i64 + 1) * 1000);
    assert!(!s.dry_run);
    assert_eq!(s.leadership(), pb::Leadership::Sole);
    assert_eq!(s.pending_approvals, 1, "a2 is approved, not pending");
    assert_eq!(s.demoted.len(), 1);
    assert_eq!(s.demoted[0].symptom, "agent_unreachable");
    assert_eq!((s.demoted[0].verified, s.demoted[0].runs), (1, 10));
    assert_eq!(s.actions_in_flight, 1);
    assert_eq!(s.open_incidents, 1);
    assert_eq!(s.last_tick_unix_ms, T0 as i64 * 1000);
    assert!(s.store_up);
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(api.calls("get_status", "ok"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn get_incident_returns_its_history_oldest_first_and_not_found_otherwise() {
    let api = TestApi::start(|_| {}).await;
    let store = &api.backend.store;
    store
        .apply(&[
            Event::IncidentOpened {
                incident: incident("inc-1", SymptomKind::AgentUnreachable, 0),
            },
            Event::IncidentOpened {
                incident: incident("inc-2", SymptomKind::AgentUnreachable, 1),
            },
            Event::Held {
                incident_id: "inc-1".into(),
                actuator: "restart-agent".into(),
                target: "node-a".into(),
                reason: "cooldown".into(),
                at: at(5),
            },
            Event::ActionStarted {
                step: step("act-1", "inc-1", 0),
                at: at(10),
            },
            Event::ActionFinished {
                id: "act-1".into(),
                outcome: ActionOutcome::ok(serde_json::json!({ "exit": 0 })),
                at: at(11),
            },
            Event::Held {
                incident_id: "inc-1".into(),
                actuator: "restart-agent".into(),
                target: "node-a".into(),
                reason: "awaiting_approval".into(),
                at: at(20),
            },
            Event::ActionStarted {
                step: step("act-2", "inc-1", 1),
                at: at(30),
            },
            Event::ActionStarted {
                step: step("act-other", "inc-2", 0),
                at: at(31),
            },
        ])
        .await
        .unwrap();
    let approval = pending(&api, "ap-1");
    store
        .apply(&[Event::ApprovalRequested { approval }])
        .await
        .unwrap();
    let mut client = api.grpc();
    let got = client
        .get_incident(pb::GetIncidentRequest { id: "inc-1".into() })
        .await
        .unwrap()
        .into_inner();
    let inc = got.incident.unwrap();
    assert_eq!(inc.id, "inc-1");
    assert_eq!(inc.symptom, "agent_unreachable");
    assert_eq!(inc.subject, "agent:node-a");
    assert_eq!(inc.opened_at_unix_ms, T0 as i64 * 1000);
    assert_eq!(inc.closed_at_unix_ms, 0);
    assert_eq!(inc.evidence_json, r#"{"n":1}"#);
    let actions: Vec<_> = got.actions.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(
        actions,
        vec!["act-1", "act-2"],
        "oldest first, this incident only"
    );
    assert_eq!(got.actions[0].outcome, "ok");
    assert_eq!(got.actions[0].detail_json, r#"{"exit":0}"#);
    assert_eq!(got.actions[1].outcome, "", "still running");
    let holds: Vec<_> = got.holds.iter().map(|h| h.reason.as_str()).collect();
    assert_eq!(holds, vec!["cooldown", "awaiting_approval"]);
    assert_eq!(got.approvals.len(), 1);
    assert_eq!(got.approvals[0].state(), pb::ApprovalState::Pending);
    // Decided since: the controls' state wins over the stored one.
    api.backend
        .controls
        .decide("ap-1", false, "uid:0", Some("no".into()), at(40))
        .unwrap();
    let got = client
        .get_incident(pb::GetIncidentRequest { id: "inc-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.approvals[0].state(), pb::ApprovalState::Rejected);
    assert_eq!(got.approvals[0].decided_by, "uid:0");
    assert!(
        got.timeline
            .windows(2)
            .all(|w| w[0].at_unix_ms <= w[1].at_unix_ms),
        "timeline oldest first"
    );
    let err = client
        .get_incident(pb::GetIncidentRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(err.message().contains("nope"), "{err}");
    let err = client
        .get_incident(pb::GetIncidentRequest { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(api.calls("get_incident", "not_found"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn lists_page_newest_first_with_opaque_tokens() {
    let api = TestApi::start(|_| {}).await;
    let events: Vec<Event> = (0..7u64)
        .map(|i| Event::IncidentOpened {
            incident: incident(
                &format!("inc-{i}"),
                if i % 2 == 0 {
                    SymptomKind::AgentUnreachable
                } else {
                    SymptomKind::AgentNotRenewing
                },
                i * 10,
            ),
        })
        .collect();
    api.backend.store.apply(&events).await.unwrap();
    let mut client = api.grpc();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_incidents(pb::ListIncidentsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.incidents.into_iter().map(|i| i.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        (0..7).rev().map(|i| format!("inc-{i}")).collect::<Vec<_>>()
    );
    // Filters: symptom and a time range.
    let page = client
        .list_incidents(pb::ListIncidentsRequest {
            symptom: "agent_not_renewing".into(),
            since_unix_ms: (T0 as i64 + 20) * 1000,
            until_unix_ms: (T0 as i64 + 60) * 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = page.incidents.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, vec!["inc-5", "inc-3"]);
    assert!(page.next_page_token.is_empty());
    // A page exactly full has no next token when nothing follows.
    let page = client
        .list_incidents(pb::ListIncidentsRequest {
            page_size: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.incidents.len(), 7);
    assert!(page.next_page_token.is_empty());
    api.stop().await;
}

#[tokio::test]
async fn actions_and_holds_list_by_incident() {
    let api = TestApi::start(|_| {}).await;
    api.backend
        .store
        .apply(&[
            Event::IncidentOpened {
                incident: incident("inc-1", SymptomKind::AgentUnreachable, 0),
            },
            Event::ActionStarted {
                step: step("act-1", "inc-1", 0),
                at: at(10),
            },
            Event::ActionStarted {
                step: step("act-2", "inc-2", 0),
                at: at(20),
            },
            Event::Held {
                incident_id: "inc-1".into(),
                actuator: "restart-agent".into(),
                target: "node-a".into(),
                reason: "paused".into(),
                at: at(30),
            },
        ])
        .await
        .unwrap();
    let mut client = api.grpc();
    let all = client
        .list_actions(pb::ListActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = all.actions.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, vec!["act-2", "act-1"]);
    let one = client
        .list_actions(pb::ListActionsRequest {
            incident_id: "inc-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.actions.len(), 1);
    let holds = client
        .list_holds(pb::ListHoldsRequest {
            incident_id: "inc-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(holds.holds.len(), 1);
    assert_eq!(holds.holds[0].reason, "paused");
    assert_eq!(holds.holds[0].at_unix_ms, (T0 as i64 + 30) * 1000);
    api.stop().await;
}

// === Bad input ===

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_before_any_work() {
    let api = TestApi::start(|c| c.max_message_bytes = 64 * 1024).await;
    let mut client = api.grpc();
    let list = |page_size, page_token: &str| pb::ListIncidentsRequest {
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    };
    // Paging.
    let err = client.list_incidents(list(1001, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("1000"), "names the bound: {err}");
    assert_eq!(code(client.list_incidents(list(1000, "")).await), Code::Ok);
    for token in [
        "garbage!",
        "aGVsbG8", // "hello"
        &convert::encode_token(
            convert::Listing::Actions,
            &crate::knowledge::PageKey {
                at_ms: 1,
                id: "x".into(),
            },
        ), // another listing's
        &"A".repeat(10_000),
    ] {
        let err = client.list_incidents(list(0, token)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{token}: {err}");
        assert!(err.message().contains("page_token"), "{err}");
    }
    // Filters.
    let err = client
        .list_incidents(pb::ListIncidentsRequest {
            symptom: "sky_falling".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = client
        .list_incidents(pb::ListIncidentsRequest {
            since_unix_ms: 10,
            until_unix_ms: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = client
        .list_actions(pb::ListActionsRequest {
            incident_id: "i".repeat(129),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = client
        .list_audit(pb::ListAuditRequest {
            kinds: vec!["acted".into(), "sabotaged".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("sabotaged"), "{err}");
    // Controls: an overlong reason, an unknown symptom, an overlong id.
    let err = client
        .pause(pb::PauseRequest {
            reason: "r".repeat(1025),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("1024"), "{err}");
    let err = client
        .reset_demotion(pb::ResetDemotionRequest {
            symptom: "sky_falling".into(),
            actuator: "restart-agent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("agent_unreachable"),
        "lists known: {err}"
    );
    let err = client
        .approve(pb::ApproveRequest {
            approval_id: "a".repeat(129),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // Over max_message_bytes: refused by the decoder, before the handler.
    let err = client
        .pause(pb::PauseRequest {
            reason: "r".repeat(100 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(api.calls("pause", "resource_exhausted"), 1.0);
    // Nothing of it changed anything.
    assert!(api.backend.controls.paused().is_none());
    assert!(api.backend.controls.take().0.is_empty());
    // The server still answers.
    assert_eq!(
        code(client.get_status(pb::GetStatusRequest {}).await),
        Code::Ok
    );
    api.stop().await;
}

#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid() {
    let api = TestApi::start(|_| {}).await;
    let channel = crate::endpoint::Endpoint::Unix(api.socket.clone())
        .channel(Duration::from_secs(5))
        .unwrap();
    for (path, bytes) in [
        // Truncated: field 1 says 9 bytes, 1 follows.
        ("/spire_healer.v1.Supervisor/Pause", vec![0x0a, 0x09, b'x']),
        // A string that is not UTF-8.
        (
            "/spire_healer.v1.Supervisor/GetIncident",
            vec![0x0a, 0x02, 0xc3, 0x28],
        ),
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                Request::new(bytes),
                PathAndQuery::from_static(path),
                super::RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err}");
        assert!(err.message().contains("does not decode"), "{err}");
    }
    assert!(api.backend.controls.paused().is_none());
    assert_eq!(api.calls("pause", "invalid"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn store_failures_are_unavailable_with_a_clear_message() {
    let api = TestApi::start_with(
        Setup {
            store: Some(Arc::new(super::stores::Failing)),
            ..Setup::default()
        },
        |_| {},
    )
    .await;
    let mut client = api.grpc();
    let err = client
        .get_incident(pb::GetIncidentRequest { id: "inc-1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("knowledge store"), "{err}");
    let err = client
        .list_holds(pb::ListHoldsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    // An approval the controls do not hold is looked up in the store.
    let err = client
        .approve(pb::ApproveRequest {
            approval_id: "gone".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(api.calls("list_holds", "unavailable"), 1.0);
    // Status does not need the store.
    assert_eq!(
        code(client.get_status(pb::GetStatusRequest {}).await),
        Code::Ok
    );
    api.stop().await;
}

// === Controls ===

#[tokio::test]
async fn pause_resume_and_dry_run_say_whether_they_changed_and_by_whom() {
    let api = TestApi::start(|_| {}).await;
    let me = format!("uid:{}", our_uid());
    let mut client = api.grpc();
    let r = client
        .pause(pb::PauseRequest {
            reason: "incident 42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.paused, r.changed, r.by.as_str()),
        (true, true, me.as_str())
    );
    let r = client
        .pause(pb::PauseRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.paused, r.changed), (true, false));
    let p = api.backend.controls.paused().unwrap();
    assert_eq!(
        (p.by.as_str(), p.reason.as_deref()),
        (me.as_str(), Some("incident 42"))
    );
    let r = client
        .set_dry_run(pb::SetDryRunRequest {
            enabled: true,
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.dry_run, r.changed), (true, true));
    let r = client
        .resume(pb::ResumeRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.paused, r.dry_run, r.changed), (false, true, true));
    let (events, _) = api.backend.controls.take();
    let changes: Vec<_> = events
        .iter()
        .map(|e| match e {
            Event::ControlChanged { change, by, .. } => (change.as_str(), by.clone()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            ("paused", me.clone()),
            ("dry_run_on", me.clone()),
            ("resumed", me.clone())
        ]
    );
    api.stop().await;
}

#[tokio::test]
async fn reset_demotion_lets_a_demoted_step_run_and_not_found_otherwise() {
    let api = TestApi::start(|_| {}).await;
    super::matrix::demote(&api);
    let mut client = api.grpc();
    let req = || pb::ResetDemotionRequest {
        symptom: "agent_unreachable".into(),
        actuator: "restart-agent".into(),
    };
    let r = client.reset_demotion(req()).await.unwrap().into_inner();
    assert_eq!(r.by, format!("uid:{}", our_uid()));
    assert!(api.backend.controls.demoted().is_empty());
    let err = client.reset_demotion(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let (_, resets) = api.backend.controls.take();
    assert_eq!(resets.len(), 1);
    api.stop().await;
}

// === Approvals ===

#[tokio::test]
async fn approving_twice_after_expiry_or_an_unknown_id_is_refused_clearly() {
    let api = TestApi::start(|_| {}).await;
    let me = format!("uid:{}", our_uid());
    let mut client = api.grpc();
    pending(&api, "a1");
    let approved = client
        .approve(pb::ApproveRequest {
            approval_id: "a1".into(),
            comment: "go".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.state(), pb::ApprovalState::Approved);
    assert_eq!(approved.decided_by, me);
    assert_eq!(approved.reason, "go");
    // Twice.
    let err = client
        .approve(pb::ApproveRequest {
            approval_id: "a1".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains(&format!("already approved by {me}")),
        "{err}"
    );
    // After expiry.
    pending(&api, "a2");
    api.clock.advance(Duration::from_secs(601));
    let err = client
        .reject(pb::RejectRequest {
            approval_id: "a2".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("expired at"), "{err}");
    // Unknown.
    let err = client
        .approve(pb::ApproveRequest {
            approval_id: "no-such".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(err.message().contains("no-such"), "{err}");
    // Only the first decision was recorded.
    let (events, _) = api.backend.controls.take();
    assert_eq!(events.len(), 1);
    assert_eq!(api.calls("approve", "failed_precondition"), 1.0);
    assert_eq!(api.calls("approve", "not_found"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn an_approval_only_the_store_remembers_is_refused_with_its_story() {
    let api = TestApi::start(|_| {}).await;
    // Decided in an earlier run: in the store, not in these controls.
    let now = api.clock.now();
    let approval = |id: &str, expires: u64| crate::model::Approval {
        id: id.into(),
        incident_id: "inc-1".into(),
        symptom: SymptomKind::AgentUnreachable,
        rung: 1,
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        requested_at: now - Duration::from_secs(3600),
        expires_at: now - Duration::from_secs(3600) + Duration::from_secs(expires),
    };
    api.backend
        .store
        .apply(&[
            Event::ApprovalRequested {
                approval: approval("old-rejected", 600),
            },
            Event::ApprovalDecided {
                id: "old-rejected".into(),
                state: ApprovalState::Rejected,
                by: Some("spiffe://td.test/ops/bob".into()),
                reason: Some("no".into()),
                action_id: None,
                at: now - Duration::from_secs(3000),
            },
            Event::ApprovalRequested {
                approval: approval("old-pending", 600),
            },
        ])
        .await
        .unwrap();
    let mut client = api.grpc();
    let err = client
        .approve(pb::ApproveRequest {
            approval_id: "old-rejected".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message()
            .contains("already rejected by spiffe://td.test/ops/bob at 2023-11-14T21:23:20Z"),
        "{err}"
    );
    let err = client
        .approve(pb::ApproveRequest {
            approval_id: "old-pending".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("expired at 2023-11-14T21:23:20Z"),
        "{err}"
    );
    api.stop().await;
}

#[tokio::test]
async fn two_operators_deciding_one_approval_at_once_have_one_winner() {
    let api = TestApi::start(|c| {
        c.authz.operators = vec!["spiffe://td.test/ops/bob".into()];
    })
    .await;
    let fx = Fixture {
        incident_id: "inc-1".into(),
    };
    let me = format!("uid:{}", our_uid());
    let mut wins = HashMap::new();
    for round in 0..20 {
        let id = format!("race-{round}");
        pending(&api, &id);
        // Over the socket as our uid, approving; in-process as bob,
        // rejecting.
        let mut alice = Client::Socket(api.grpc());
        let mut bob = Client::Direct(api.direct());
        let (a, b) = tokio::join!(
            call(&mut alice, Method::Approve, None, &fx, &id),
            call(
                &mut bob,
                Method::Reject,
                Some("spiffe://td.test/ops/bob"),
                &fx,
                &id
            ),
        );
        let (winner, loser, lost) = match (&a, &b) {
            (Ok(()), Err(e)) => (me.as_str(), "approved", e),
            (Err(e), Ok(())) => ("spiffe://td.test/ops/bob", "rejected", e),
            other => panic!("round {round}: not one winner: {other:?}"),
        };
        assert_eq!(lost.code(), Code::FailedPrecondition, "{lost}");
        assert!(
            lost.message()
                .contains(&format!("already {loser} by {winner}")),
            "names the winner: {lost}"
        );
        let entry = api.backend.controls.approval(&id).unwrap();
        assert_eq!(entry.decided_by.as_deref(), Some(winner));
        *wins.entry(winner.to_string()).or_insert(0) += 1;
        let (events, _) = api.backend.controls.take();
        assert_eq!(events.len(), 1, "one decision recorded");
    }
    assert_eq!(wins.values().sum::<i32>(), 20);
    api.stop().await;
}

#[tokio::test]
async fn list_approvals_shows_decisions_not_yet_recorded() {
    let api = TestApi::start(|_| {}).await;
    let a1 = pending(&api, "a1");
    let a2 = pending(&api, "a2");
    api.backend
        .store
        .apply(&[
            Event::ApprovalRequested { approval: a1 },
            Event::ApprovalRequested { approval: a2 },
        ])
        .await
        .unwrap();
    api.backend
        .controls
        .decide("a1", true, "uid:0", None, api.clock.now())
        .unwrap();
    let mut client = api.grpc();
    let all = client
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let states: HashMap<_, _> = all
        .approvals
        .iter()
        .map(|a| (a.id.clone(), a.state()))
        .collect();
    assert_eq!(states["a1"], pb::ApprovalState::Approved);
    assert_eq!(states["a2"], pb::ApprovalState::Pending);
    let pending_only = client
        .list_approvals(pb::ListApprovalsRequest {
            pending_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = pending_only
        .approvals
        .iter()
        .map(|a| a.id.as_str())
        .collect();
    assert_eq!(ids, vec!["a2"]);
    api.stop().await;
}
