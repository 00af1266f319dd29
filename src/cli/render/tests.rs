//! Rendering from literal messages at a literal `now`.

use std::time::UNIX_EPOCH;

use super::*;

/// 2023-11-14T22:13:20Z.
const T: i64 = 1_700_000_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(T as u64)
}

#[test]
fn ages_are_compact() {
    let s = Duration::from_secs;
    assert_eq!(age(s(0)), "0s");
    assert_eq!(age(s(59)), "59s");
    assert_eq!(age(s(60)), "1m");
    assert_eq!(age(s(3599)), "59m");
    assert_eq!(age(s(3600)), "1h");
    assert_eq!(age(s(2 * 3600 + 5 * 60)), "2h5m");
    assert_eq!(age(s(86_400)), "1d");
    assert_eq!(age(s(4 * 86_400 + 3 * 3600 + 59)), "4d3h");
}

#[test]
fn times_are_rfc3339_utc_with_their_age() {
    assert_eq!(when(0, now()), "");
    assert_eq!(when(T - 180_000, now()), "2023-11-14T22:10:20Z (3m ago)");
    assert_eq!(when(T + 7_200_000, now()), "2023-11-15T00:13:20Z (in 2h)");
    assert_eq!(time_json(0), Value::Null);
    assert_eq!(time_json(T + 5), json!("2023-11-14T22:13:20.005Z"));
}

fn incident(id: &str, closed: i64, needs: &str) -> pb::Incident {
    pb::Incident {
        id: id.into(),
        symptom: "agent_unreachable".into(),
        subject: "agent:node-a".into(),
        severity: "critical".into(),
        opened_at_unix_ms: T - 60_000,
        closed_at_unix_ms: closed,
        resolution: String::new(),
        predicted_outage_unix_ms: 0,
        evidence_json: r#"{"stream":"down"}"#.into(),
        next_rung: 1,
        needs_operator: needs.into(),
    }
}

#[test]
fn incidents_table_shows_open_and_needs_operator_last() {
    let text = incidents_table(
        &[
            incident("inc-1", 0, "agent-evict futile 3 times"),
            incident("inc-2", T - 1000, ""),
        ],
        now(),
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("ID ") && lines[0].ends_with("NEEDS OPERATOR"),
        "{text}"
    );
    assert!(lines[1].contains("2023-11-14T22:12:20Z (1m ago)"), "{text}");
    assert!(lines[1].ends_with("agent-evict futile 3 times"), "{text}");
    assert!(lines[1].contains(" open "), "{text}");
    assert!(lines[2].ends_with("(1s ago)"), "{text}");
}

#[test]
fn incident_json_embeds_evidence_and_nulls_what_is_unset() {
    let v = incident_json(&incident("inc-1", 0, ""));
    assert_eq!(v["id"], "inc-1");
    assert_eq!(v["evidence"]["stream"], "down");
    assert_eq!(v["opened_at"], "2023-11-14T22:12:20.000Z");
    assert_eq!(v["closed_at"], Value::Null);
    assert_eq!(v["open"], true);
    assert_eq!(v["needs_operator"], Value::Null);
    assert_eq!(v["predicted_outage"], Value::Null);
    // A JSON field that does not parse is kept as text.
    let mut odd = incident("inc-3", 0, "");
    odd.evidence_json = "not json".into();
    assert_eq!(incident_json(&odd)["evidence"], "not json");
}

fn approval(state: pb::ApprovalState) -> pb::Approval {
    pb::Approval {
        id: "apr-1".into(),
        incident_id: "inc-1".into(),
        symptom: "agent_unreachable".into(),
        rung: 2,
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        state: state as i32,
        requested_at_unix_ms: T - 30_000,
        expires_at_unix_ms: T + 600_000,
        decided_by: "spiffe://example.org/operator".into(),
        decided_at_unix_ms: T - 1000,
        reason: "maintenance over".into(),
        action_id: String::new(),
    }
}

#[test]
fn approvals_name_their_state() {
    assert_eq!(approval_state(pb::ApprovalState::Pending as i32), "pending");
    assert_eq!(
        approval_state(pb::ApprovalState::Withdrawn as i32),
        "withdrawn"
    );
    assert_eq!(approval_state(99), "unknown(99)");
    let text = approvals_table(&[approval(pb::ApprovalState::Pending)], now());
    let row = text.lines().nth(1).expect("row");
    assert!(row.starts_with("apr-1  pending  inc-1"), "{text}");
    assert!(row.contains("(in 10m)"), "{text}");
    let one = approval_text(&approval(pb::ApprovalState::Approved), now());
    assert!(one.contains("State       approved"), "{one}");
    assert!(
        one.contains("Step        restart-agent rung 2 (agent_unreachable)"),
        "{one}"
    );
    assert!(!one.contains("Action"), "unset rows are left out: {one}");
    let v = approval_json(&approval(pb::ApprovalState::Rejected));
    assert_eq!(v["state"], "rejected");
    assert_eq!(v["action_id"], Value::Null);
    assert_eq!(v["expires_at"], "2023-11-14T22:23:20.000Z");
}

#[test]
fn status_says_paused_by_whom_and_lists_subjects_and_demotions() {
    let s = pb::GetStatusResponse {
        subjects: vec![pb::SubjectStatus {
            subject: "agent:node-a".into(),
            state: pb::SubjectState::Failing as i32,
            open_incident_ids: vec!["inc-1".into(), "inc-2".into()],
            predicted_outage_unix_ms: T + 300_000,
        }],
        healthy_subjects: 4,
        blind_sensors: vec!["agent_debug/node-b".into()],
        paused: true,
        paused_by: "uid:1000".into(),
        pause_reason: "maintenance".into(),
        paused_at_unix_ms: T - 120_000,
        dry_run: false,
        leadership: pb::Leadership::Sole as i32,
        pending_approvals: 1,
        demoted: vec![pb::Demotion {
            symptom: "agent_unreachable".into(),
            actuator: "restart-agent".into(),
            verified: 1,
            runs: 5,
            demoted_at_unix_ms: T - 3_600_000,
        }],
        actions_in_flight: 0,
        last_tick_unix_ms: T - 2000,
        store_up: true,
        version: "0.1.0".into(),
        open_incidents: 2,
        leader_epoch: 0,
    };
    let text = status_text(&s, now());
    for want in [
        "Supervisor         PAUSED by uid:1000 at 2023-11-14T22:11:20Z (2m ago): maintenance",
        "Dry run            off",
        "Leadership         sole",
        "Last tick          2023-11-14T22:13:18Z (2s ago)",
        "Blind sensors      agent_debug/node-b",
        "agent:node-a  failing  inc-1,inc-2  2023-11-14T22:18:20Z (in 5m)",
        "agent_unreachable  restart-agent  1/5",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let v = status_json(&s);
    assert_eq!(v["paused"], true);
    assert_eq!(v["leader_epoch"], Value::Null);
    let leader = pb::GetStatusResponse {
        leadership: pb::Leadership::Leader as i32,
        leader_epoch: 3,
        ..s.clone()
    };
    assert!(status_text(&leader, now()).contains("Leadership         leader (epoch 3)"));
    assert_eq!(status_json(&leader)["leader_epoch"], 3);
    assert_eq!(v["subjects"][0]["state"], "failing");
    assert_eq!(v["leadership"], "sole");
    assert_eq!(v["demoted"][0]["runs"], 5);
    // Running, nothing at risk: no tables.
    let calm = status_text(&pb::GetStatusResponse::default(), now());
    assert!(calm.starts_with("Supervisor         running"), "{calm}");
    assert!(calm.contains("Last tick          none yet"), "{calm}");
    assert!(!calm.contains("SUBJECT"), "{calm}");
    assert!(
        !calm.contains("Leadership"),
        "unspecified is left out: {calm}"
    );
    assert_eq!(
        status_json(&pb::GetStatusResponse::default())["leadership"],
        Value::Null
    );
}

#[test]
fn an_incident_shows_its_sections_in_order() {
    let r = pb::GetIncidentResponse {
        incident: Some(incident("inc-1", 0, "")),
        actions: vec![pb::Action {
            id: "act-1".into(),
            incident_id: "inc-1".into(),
            actuator: "refetch".into(),
            started_at_unix_ms: T - 50_000,
            outcome: "ok".into(),
            verification: "failed".into(),
            ..Default::default()
        }],
        holds: vec![pb::Hold {
            incident_id: "inc-1".into(),
            actuator: "restart-agent".into(),
            target: "node-a".into(),
            reason: "awaiting_approval".into(),
            at_unix_ms: T - 40_000,
        }],
        approvals: vec![approval(pb::ApprovalState::Pending)],
        timeline: vec![pb::AuditEntry {
            id: "aud-1".into(),
            at_unix_ms: T - 40_000,
            kind: "pending".into(),
            actor: "spire-healer".into(),
            ..Default::default()
        }],
    };
    let text = incident_text(&r, now());
    let at = |s: &str| {
        text.find(s)
            .unwrap_or_else(|| panic!("{s:?} missing:\n{text}"))
    };
    assert!(at("Incident ") < at("\nACTIONS\n"));
    assert!(at("\nACTIONS\n") < at("\nHOLDS\n"));
    assert!(at("\nHOLDS\n") < at("\nAPPROVALS\n"));
    assert!(at("\nAPPROVALS\n") < at("\nTIMELINE\n"));
    assert!(
        text.contains(r#"Evidence          {"stream":"down"}"#),
        "{text}"
    );
    let v = incident_detail_json(&r);
    assert_eq!(v["incident"]["id"], "inc-1");
    assert_eq!(v["actions"][0]["verification"], "failed");
    assert_eq!(v["holds"][0]["reason"], "awaiting_approval");
    assert_eq!(v["timeline"][0]["kind"], "pending");
}

#[test]
fn actions_show_running_and_dry_runs() {
    let running = pb::Action {
        id: "act-1".into(),
        started_at_unix_ms: T,
        ..Default::default()
    };
    let dry = pb::Action {
        id: "act-2".into(),
        dry_run: true,
        outcome: "dry_run".into(),
        ..Default::default()
    };
    let text = actions_table(&[running.clone(), dry], now());
    assert!(
        text.lines().nth(1).expect("row").contains(" running"),
        "{text}"
    );
    assert!(
        text.lines().nth(2).expect("row").contains(" dry_run"),
        "{text}"
    );
    let v = action_json(&running);
    assert_eq!(v["outcome"], Value::Null);
    assert_eq!(v["params"], Value::Null);
}

#[test]
fn watch_lines_are_greppable_and_json_lines_carry_the_cursor() {
    let e = pb::WatchEvent {
        cursor: "run-1:42".into(),
        at_unix_ms: T,
        kind: "held".into(),
        incident_id: "inc-1".into(),
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        reason: "paused".into(),
        actor: "spire-healer".into(),
        detail_json: "{}".into(),
        ..Default::default()
    };
    assert_eq!(
        watch_line(&e),
        "2023-11-14T22:13:20Z  held               incident=inc-1 actuator=restart-agent target=node-a reason=paused actor=spire-healer"
    );
    let spaced = pb::WatchEvent {
        kind: "paused".into(),
        reason: "db migration".into(),
        ..e.clone()
    };
    assert!(watch_line(&spaced).contains(r#"reason="db migration""#));
    let v = watch_json(&e);
    assert_eq!(v["cursor"], "run-1:42");
    assert_eq!(v["approval_id"], Value::Null);
    assert_eq!(v["detail"], json!({}));
    // One line.
    assert!(!v.to_string().contains('\n'));
}

#[test]
fn controls_say_whether_anything_changed() {
    let changed = pb::ControlResponse {
        paused: true,
        dry_run: false,
        changed: true,
        by: "uid:1000".into(),
    };
    assert_eq!(
        control_text("paused", &changed),
        "paused (recorded as uid:1000): supervisor paused, dry run off"
    );
    let same = pb::ControlResponse {
        changed: false,
        ..changed.clone()
    };
    assert_eq!(
        control_text("paused", &same),
        "paused: nothing to change, nothing recorded: supervisor paused, dry run off"
    );
    assert_eq!(control_json(&changed)["by"], "uid:1000");
}

#[test]
fn a_page_is_one_document_with_its_next_token() {
    let v = page_json("holds", vec![json!({"a": 1})], "tok");
    assert_eq!(v, json!({"holds": [{"a": 1}], "next_page_token": "tok"}));
    let last = page_json("holds", vec![], "");
    assert_eq!(last["next_page_token"], Value::Null);
}

#[test]
fn audit_rows_name_the_actor() {
    let text = audit_table(
        &[pb::AuditEntry {
            at_unix_ms: T - 5000,
            kind: "approved".into(),
            actor: "spiffe://example.org/operator".into(),
            incident_id: "inc-1".into(),
            actuator: "restart-agent".into(),
            target: "node-a".into(),
            reason: "go".into(),
            ..Default::default()
        }],
        now(),
    );
    assert!(
        text.lines()
            .nth(1)
            .expect("row")
            .contains("approved  spiffe://example.org/operator  inc-1"),
        "{text}"
    );
    let v = audit_json(&pb::AuditEntry::default());
    assert_eq!(v["incident_id"], Value::Null);
    assert_eq!(v["at"], Value::Null);
}
