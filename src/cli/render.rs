//! What the API commands print: tables and key-value blocks for people,
//! JSON for scripts, from the `spire_healer.v1` messages. Pure: the time
//! ages are measured from the `now` passed in.
//!
//! Times are shown in RFC 3339 UTC with their age (`3m ago`, `in 2h`); in
//! JSON they are RFC 3339 strings with milliseconds (`null` when unset),
//! enums are their short lower-case names (`pending`, `failing`), and the
//! messages' `*_json` fields are embedded as JSON under their name without
//! the suffix.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::clock::from_unix_millis;
use crate::proto::healer as pb;
use crate::term::table;

// === Times ===

/// A compact duration: `45s`, `3m`, `2h5m`, `4d3h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => match (s % 3600) / 60 {
            0 => format!("{}h", s / 3600),
            m => format!("{}h{m}m", s / 3600),
        },
        _ => match (s % 86_400) / 3600 {
            0 => format!("{}d", s / 86_400),
            h => format!("{}d{h}h", s / 86_400),
        },
    }
}

/// RFC 3339 UTC, to the second.
pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(from_unix_millis(ms)).to_string()
}

/// `2026-01-02T03:04:05Z (3m ago)` or `(in 2h)`; empty for 0 (unset).
pub fn when(ms: i64, now: SystemTime) -> String {
    if ms == 0 {
        return String::new();
    }
    let t = from_unix_millis(ms);
    let rel = match now.duration_since(t) {
        Ok(ago) => format!("{} ago", age(ago)),
        Err(e) => format!("in {}", age(e.duration())),
    };
    format!("{} ({rel})", rfc3339(ms))
}

/// RFC 3339 UTC, with milliseconds.
pub fn rfc3339_millis(ms: i64) -> String {
    humantime::format_rfc3339_millis(from_unix_millis(ms)).to_string()
}

/// RFC 3339 with milliseconds, or `null` for 0.
pub fn time_json(ms: i64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::String(rfc3339_millis(ms))
    }
}

/// A `*_json` field as JSON: `null` when empty, the text when it does not
/// parse.
fn embedded(text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Empty strings as `null`.
fn opt(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// An enum's protobuf name without its type prefix, lower-case:
/// `APPROVAL_STATE_PENDING` → `pending`.
fn short(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// The name of an `ApprovalState` value (`unknown(7)` for one this build
/// does not know).
pub fn approval_state(v: i32) -> String {
    pb::ApprovalState::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| short(s.as_str_name(), "APPROVAL_STATE_"),
    )
}

fn subject_state(v: i32) -> String {
    pb::SubjectState::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| short(s.as_str_name(), "SUBJECT_STATE_"),
    )
}

/// Empty when unspecified (a daemon without leadership says nothing).
fn leadership(v: i32) -> String {
    match pb::Leadership::try_from(v) {
        Ok(pb::Leadership::Unspecified) => String::new(),
        Ok(s) => short(s.as_str_name(), "LEADERSHIP_"),
        Err(_) => format!("unknown({v})"),
    }
}

/// Aligned `key  value` lines; rows with an empty value are left out.
pub fn pairs(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k:<width$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.to_string()
}

// === Status ===

/// `spire-healer status` for people.
pub fn status_text(s: &pb::GetStatusResponse, now: SystemTime) -> String {
    let supervisor = if s.paused {
        let mut line = "PAUSED".to_string();
        if !s.paused_by.is_empty() {
            line.push_str(&format!(" by {}", s.paused_by));
        }
        if s.paused_at_unix_ms != 0 {
            line.push_str(&format!(" at {}", when(s.paused_at_unix_ms, now)));
        }
        if !s.pause_reason.is_empty() {
            line.push_str(&format!(": {}", s.pause_reason));
        }
        line
    } else {
        "running".to_string()
    };
    let mut out = pairs(&[
        ("Supervisor", supervisor),
        ("Dry run", on_off(s.dry_run)),
        (
            "Leadership",
            match (leadership(s.leadership), s.leader_epoch) {
                (l, 0) => l,
                (l, epoch) => format!("{l} (epoch {epoch})"),
            },
        ),
        ("Version", s.version.clone()),
        (
            "Last tick",
            if s.last_tick_unix_ms == 0 {
                "none yet".to_string()
            } else {
                when(s.last_tick_unix_ms, now)
            },
        ),
        ("Store", if s.store_up { "up" } else { "DOWN" }.to_string()),
        ("Open incidents", s.open_incidents.to_string()),
        ("Actions in flight", s.actions_in_flight.to_string()),
        ("Pending approvals", s.pending_approvals.to_string()),
        ("Healthy subjects", s.healthy_subjects.to_string()),
        ("Blind sensors", s.blind_sensors.join(", ")),
    ]);
    if !s.subjects.is_empty() {
        let rows: Vec<Vec<String>> = s
            .subjects
            .iter()
            .map(|x| {
                vec![
                    x.subject.clone(),
                    subject_state(x.state),
                    x.open_incident_ids.join(","),
                    when(x.predicted_outage_unix_ms, now),
                ]
            })
            .collect();
        out.push_str("\n\n");
        out.push_str(&table(
            &["SUBJECT", "STATE", "INCIDENTS", "PREDICTED OUTAGE"],
            &rows,
        ));
    }
    if !s.demoted.is_empty() {
        let rows: Vec<Vec<String>> = s
            .demoted
            .iter()
            .map(|d| {
                vec![
                    d.symptom.clone(),
                    d.actuator.clone(),
                    format!("{}/{}", d.verified, d.runs),
                    when(d.demoted_at_unix_ms, now),
                ]
            })
            .collect();
        out.push_str("\n\n");
        out.push_str(&table(
            &["DEMOTED SYMPTOM", "ACTUATOR", "VERIFIED/RUNS", "SINCE"],
            &rows,
        ));
    }
    out
}

/// `spire-healer status -o json`.
pub fn status_json(s: &pb::GetStatusResponse) -> Value {
    json!({
        "paused": s.paused,
        "paused_by": opt(&s.paused_by),
        "pause_reason": opt(&s.pause_reason),
        "paused_at": time_json(s.paused_at_unix_ms),
        "dry_run": s.dry_run,
        "leadership": opt(&leadership(s.leadership)),
        "leader_epoch": (s.leader_epoch != 0).then_some(s.leader_epoch),
        "version": s.version,
        "last_tick": time_json(s.last_tick_unix_ms),
        "store_up": s.store_up,
        "open_incidents": s.open_incidents,
        "actions_in_flight": s.actions_in_flight,
        "pending_approvals": s.pending_approvals,
        "healthy_subjects": s.healthy_subjects,
        "blind_sensors": s.blind_sensors,
        "subjects": s.subjects.iter().map(|x| json!({
            "subject": x.subject,
            "state": subject_state(x.state),
            "open_incident_ids": x.open_incident_ids,
            "predicted_outage": time_json(x.predicted_outage_unix_ms),
        })).collect::<Vec<_>>(),
        "demoted": s.demoted.iter().map(|d| json!({
            "symptom": d.symptom,
            "actuator": d.actuator,
            "verified": d.verified,
            "runs": d.runs,
            "demoted_at": time_json(d.demoted_at_unix_ms),
        })).collect::<Vec<_>>(),
    })
}

// === Incidents ===

/// Incidents as a table, newest first as the API lists them.
pub fn incidents_table(rows: &[pb::Incident], now: SystemTime) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.symptom.clone(),
                r.subject.clone(),
                r.severity.clone(),
                when(r.opened_at_unix_ms, now),
                if r.closed_at_unix_ms == 0 {
                    "open".to_string()
                } else {
                    when(r.closed_at_unix_ms, now)
                },
                // Last: a sentence, of any length.
                r.needs_operator.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SYMPTOM",
            "SUBJECT",
            "SEVERITY",
            "OPENED",
            "CLOSED",
            "NEEDS OPERATOR",
        ],
        &body,
    )
}

/// One incident as JSON.
pub fn incident_json(r: &pb::Incident) -> Value {
    json!({
        "id": r.id,
        "symptom": r.symptom,
        "subject": r.subject,
        "severity": r.severity,
        "opened_at": time_json(r.opened_at_unix_ms),
        "closed_at": time_json(r.closed_at_unix_ms),
        "open": r.closed_at_unix_ms == 0,
        "resolution": opt(&r.resolution),
        "predicted_outage": time_json(r.predicted_outage_unix_ms),
        "evidence": embedded(&r.evidence_json),
        "next_rung": r.next_rung,
        "needs_operator": opt(&r.needs_operator),
    })
}

/// `spire-healer incident ID` for people: the incident, then its actions,
/// holds, approvals and timeline (sections with nothing are left out).
pub fn incident_text(r: &pb::GetIncidentResponse, now: SystemTime) -> String {
    let mut out = match &r.incident {
        Some(i) => pairs(&[
            ("Incident", i.id.clone()),
            ("Symptom", i.symptom.clone()),
            ("Subject", i.subject.clone()),
            ("Severity", i.severity.clone()),
            ("Opened", when(i.opened_at_unix_ms, now)),
            (
                "Closed",
                if i.closed_at_unix_ms == 0 {
                    "open".to_string()
                } else {
                    when(i.closed_at_unix_ms, now)
                },
            ),
            ("Resolution", i.resolution.clone()),
            ("Predicted outage", when(i.predicted_outage_unix_ms, now)),
            ("Next rung", i.next_rung.to_string()),
            ("Needs operator", i.needs_operator.clone()),
            ("Evidence", compact(&i.evidence_json)),
        ]),
        None => "Incident  (not sent)".to_string(),
    };
    let mut section = |title: &str, body: String| {
        out.push_str("\n\n");
        out.push_str(title);
        out.push('\n');
        out.push_str(&body);
    };
    if !r.actions.is_empty() {
        section("ACTIONS", actions_table(&r.actions, now));
    }
    if !r.holds.is_empty() {
        section("HOLDS", holds_table(&r.holds, now));
    }
    if !r.approvals.is_empty() {
        section("APPROVALS", approvals_table(&r.approvals, now));
    }
    if !r.timeline.is_empty() {
        section("TIMELINE", audit_table(&r.timeline, now));
    }
    out
}

/// A `*_json` field on one line.
fn compact(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) if m.is_empty() => String::new(),
        Ok(v) => v.to_string(),
        Err(_) => text.to_string(),
    }
}

/// `spire-healer incident ID -o json`.
pub fn incident_detail_json(r: &pb::GetIncidentResponse) -> Value {
    json!({
        "incident": r.incident.as_ref().map(incident_json),
        "actions": r.actions.iter().map(action_json).collect::<Vec<_>>(),
        "holds": r.holds.iter().map(hold_json).collect::<Vec<_>>(),
        "approvals": r.approvals.iter().map(approval_json).collect::<Vec<_>>(),
        "timeline": r.timeline.iter().map(audit_json).collect::<Vec<_>>(),
    })
}

// === Actions, holds ===

/// Actions as a table.
pub fn actions_table(rows: &[pb::Action], now: SystemTime) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.incident_id.clone(),
                r.symptom.clone(),
                r.rung.to_string(),
                r.actuator.clone(),
                r.target.clone(),
                when(r.started_at_unix_ms, now),
                if r.outcome.is_empty() {
                    "running".to_string()
                } else if r.dry_run && r.outcome != "dry_run" {
                    format!("{} (dry run)", r.outcome)
                } else {
                    r.outcome.clone()
                },
                r.verification.clone(),
                r.error.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "INCIDENT", "SYMPTOM", "RUNG", "ACTUATOR", "TARGET", "STARTED", "OUTCOME",
            "VERIFIED", "ERROR",
        ],
        &body,
    )
}

/// One action as JSON.
pub fn action_json(r: &pb::Action) -> Value {
    json!({
        "id": r.id,
        "incident_id": r.incident_id,
        "symptom": r.symptom,
        "rung": r.rung,
        "actuator": r.actuator,
        "target": r.target,
        "params": embedded(&r.params_json),
        "dry_run": r.dry_run,
        "started_at": time_json(r.started_at_unix_ms),
        "finished_at": time_json(r.finished_at_unix_ms),
        "outcome": opt(&r.outcome),
        "detail": embedded(&r.detail_json),
        "error": opt(&r.error),
        "verification": opt(&r.verification),
        "verified_at": time_json(r.verified_at_unix_ms),
    })
}

/// Holds as a table.
pub fn holds_table(rows: &[pb::Hold], now: SystemTime) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                when(r.at_unix_ms, now),
                r.incident_id.clone(),
                r.actuator.clone(),
                r.target.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    table(&["AT", "INCIDENT", "ACTUATOR", "TARGET", "REASON"], &body)
}

/// One hold as JSON.
pub fn hold_json(r: &pb::Hold) -> Value {
    json!({
        "incident_id": r.incident_id,
        "actuator": r.actuator,
        "target": r.target,
        "reason": r.reason,
        "at": time_json(r.at_unix_ms),
    })
}

// === Approvals ===

/// Approvals as a table.
pub fn approvals_table(rows: &[pb::Approval], now: SystemTime) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                approval_state(r.state),
                r.incident_id.clone(),
                r.symptom.clone(),
                r.rung.to_string(),
                r.actuator.clone(),
                r.target.clone(),
                when(r.requested_at_unix_ms, now),
                when(r.expires_at_unix_ms, now),
                r.decided_by.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "INCIDENT",
            "SYMPTOM",
            "RUNG",
            "ACTUATOR",
            "TARGET",
            "REQUESTED",
            "EXPIRES",
            "DECIDED BY",
            "REASON",
        ],
        &body,
    )
}

/// One approval for people (the answer to `approve` and `reject`).
pub fn approval_text(r: &pb::Approval, now: SystemTime) -> String {
    pairs(&[
        ("Approval", r.id.clone()),
        ("State", approval_state(r.state)),
        ("Incident", r.incident_id.clone()),
        (
            "Step",
            format!("{} rung {} ({})", r.actuator, r.rung, r.symptom),
        ),
        ("Target", r.target.clone()),
        ("Requested", when(r.requested_at_unix_ms, now)),
        ("Expires", when(r.expires_at_unix_ms, now)),
        ("Decided by", r.decided_by.clone()),
        ("Decided", when(r.decided_at_unix_ms, now)),
        ("Reason", r.reason.clone()),
        ("Action", r.action_id.clone()),
    ])
}

/// One approval as JSON.
pub fn approval_json(r: &pb::Approval) -> Value {
    json!({
        "id": r.id,
        "state": approval_state(r.state),
        "incident_id": r.incident_id,
        "symptom": r.symptom,
        "rung": r.rung,
        "actuator": r.actuator,
        "target": r.target,
        "requested_at": time_json(r.requested_at_unix_ms),
        "expires_at": time_json(r.expires_at_unix_ms),
        "decided_by": opt(&r.decided_by),
        "decided_at": time_json(r.decided_at_unix_ms),
        "reason": opt(&r.reason),
        "action_id": opt(&r.action_id),
    })
}

// === Audit ===

/// Audit entries as a table.
pub fn audit_table(rows: &[pb::AuditEntry], now: SystemTime) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                when(r.at_unix_ms, now),
                r.kind.clone(),
                r.actor.clone(),
                r.incident_id.clone(),
                r.actuator.clone(),
                r.target.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    table(
        &[
            "AT", "KIND", "ACTOR", "INCIDENT", "ACTUATOR", "TARGET", "REASON",
        ],
        &body,
    )
}

/// One audit entry as JSON.
pub fn audit_json(r: &pb::AuditEntry) -> Value {
    json!({
        "id": r.id,
        "at": time_json(r.at_unix_ms),
        "kind": r.kind,
        "actor": r.actor,
        "incident_id": opt(&r.incident_id),
        "action_id": opt(&r.action_id),
        "approval_id": opt(&r.approval_id),
        "symptom": opt(&r.symptom),
        "actuator": opt(&r.actuator),
        "target": opt(&r.target),
        "reason": opt(&r.reason),
        "detail": embedded(&r.detail_json),
    })
}

// === Watch ===

/// One event on one line: time, kind, then the fields it has as
/// `key=value` (grep-friendly).
pub fn watch_line(e: &pb::WatchEvent) -> String {
    let mut line = format!("{}  {:<18}", rfc3339(e.at_unix_ms), e.kind);
    for (k, v) in [
        ("incident", &e.incident_id),
        ("action", &e.action_id),
        ("approval", &e.approval_id),
        ("symptom", &e.symptom),
        ("subject", &e.subject),
        ("actuator", &e.actuator),
        ("target", &e.target),
        ("reason", &e.reason),
        ("actor", &e.actor),
    ] {
        if !v.is_empty() {
            line.push_str(&format!(" {k}={}", quoted(v)));
        }
    }
    line.trim_end().to_string()
}

/// A value as is, or quoted when it holds spaces, quotes or `=`.
fn quoted(v: &str) -> String {
    if v.contains([' ', '"', '=', '\t', '\n']) {
        format!("{v:?}")
    } else {
        v.to_string()
    }
}

/// One event as JSON (one line of `watch -o json`).
pub fn watch_json(e: &pb::WatchEvent) -> Value {
    json!({
        "cursor": e.cursor,
        "at": time_json(e.at_unix_ms),
        "kind": e.kind,
        "incident_id": opt(&e.incident_id),
        "action_id": opt(&e.action_id),
        "approval_id": opt(&e.approval_id),
        "symptom": opt(&e.symptom),
        "subject": opt(&e.subject),
        "actuator": opt(&e.actuator),
        "target": opt(&e.target),
        "reason": opt(&e.reason),
        "actor": opt(&e.actor),
        "detail": embedded(&e.detail_json),
    })
}

// === Controls ===

/// The answer to `pause`, `resume` and `dry-run` for people.
pub fn control_text(what: &str, r: &pb::ControlResponse) -> String {
    let state = format!(
        "supervisor {}, dry run {}",
        if r.paused { "paused" } else { "running" },
        on_off(r.dry_run)
    );
    if r.changed {
        format!("{what} (recorded as {}): {state}", r.by)
    } else {
        format!("{what}: nothing to change, nothing recorded: {state}")
    }
}

/// The answer to `pause`, `resume` and `dry-run` as JSON.
pub fn control_json(r: &pb::ControlResponse) -> Value {
    json!({
        "paused": r.paused,
        "dry_run": r.dry_run,
        "changed": r.changed,
        "by": r.by,
    })
}

/// A list page as one JSON document: `{"<key>": [...], "next_page_token": …}`.
pub fn page_json(key: &str, items: Vec<Value>, next_page_token: &str) -> Value {
    let mut doc = serde_json::Map::new();
    doc.insert(key.to_string(), Value::Array(items));
    doc.insert("next_page_token".into(), opt(next_page_token));
    Value::Object(doc)
}

#[cfg(test)]
mod tests;
