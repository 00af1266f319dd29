//! `docs/metrics.md`, rendered from the registry: every metric's name,
//! type and help text come from [`Metrics::descriptions`], its unit from its
//! name, its label values from the closed enums (or the configuration keys
//! they name), and when it moves from [`NOTES`]. The test fails when the
//! file differs, when a metric has no note or a label no value set, and
//! when a note names no metric: the catalogue cannot drift.
//!
//! Regenerate with `SPIRE_HEALER_UPDATE_DOCS=1 cargo test --lib catalogue`.

use std::fmt::Write as _;

use super::{MetricDescription, Metrics, OTHER_TARGET, OUTAGE_TOP_K, SVID_TOP_K};
use crate::model::{OutcomeKind, Severity, SymptomKind, Verification};

/// When each metric moves (and anything its help text leaves out).
const NOTES: &[(&str, &str)] = &[
    (
        "spire_healer_leader",
        "Set at start, one series (this instance's `role`): 1 for `all` and `node`; for `cluster` 0 while standing by, 1 from the moment it leads. A leader that loses leadership sets 0 and exits (code 69).",
    ),
    (
        "spire_healer_leader_epoch",
        "Set when a cluster instance takes over: the epoch every write is fenced with.",
    ),
    (
        "spire_healer_paused",
        "Set every tick: 1 from the tick after `Pause` until the tick after `Resume`; a pause outlives a restart.",
    ),
    (
        "spiffe_certificate_rotation_total",
        "+1 when an agent serves a new serial for a SPIFFE ID it already served. Created at 0 per configured agent.",
    ),
    (
        "spiffe_svid_expiry_seconds",
        "Set every tick for the soonest-expiring SVIDs (top-k); series of SVIDs that left the top-k are removed.",
    ),
    (
        "spiffe_workload_api_errors_total",
        "+1 per failed Workload API call or stream break. Created at 0 per configured agent and code.",
    ),
    (
        "spire_healer_action_duration_seconds",
        "Observed when an action returns. Created empty per configured actuator.",
    ),
    (
        "spire_healer_actions_total",
        "+1 when an action returns (or is recorded as a dry run). Created at 0 per configured actuator and outcome.",
    ),
    (
        "spire_healer_agent_last_sync_age_seconds",
        "Set every tick for agents whose Debug API reports a last successful sync.",
    ),
    (
        "spire_healer_agent_predicted_outage_timestamp_seconds",
        "Set every tick per configured agent with an open incident (about the agent or one of its SVIDs) that predicts an outage; the series is removed when the agent has none.",
    ),
    (
        "spire_healer_agent_svid_ttl_seconds",
        "Set every tick per configured server once the TTL is known (learned from the agent listing, or set by the policy).",
    ),
    ("spire_healer_agents_at_risk", "Set every tick."),
    (
        "spire_healer_slo_events_total",
        "`svid_issuance`: +1 per new serial on a Workload API stream after the stream's first answer (a rotation or a new entry), `bad` when even its latency minus notBefore's 1 s resolution exceeds `[slo] issuance_latency`. `renewal`: +1 once per SVID each tick judges it, `good` when a serial signed before its rotation point (`rotation_overdue_open` of the lifetime) replaced it, `bad` when the point passed while it was served. `handshake`: +n beside `spire_healer_handshakes_total`, `good` for `reason=\"ok\"`. `server_availability`: +1 per admin-API poll of each server, `good` when answered. Created at 0 for every `slo` and `result`.",
    ),
    (
        "spire_healer_slo_svid_issuance_seconds",
        "Observed with each `svid_issuance` event: `seen − (notBefore + 10 s)`, 0 when negative.",
    ),
    (
        "spire_healer_slo_objective",
        "Set at start from `[slo]` (the defaults until then): one series per `slo`.",
    ),
    (
        "spire_healer_slo_issuance_latency_threshold_seconds",
        "Set at start from `[slo] issuance_latency`.",
    ),
    (
        "spire_healer_approvals_pending",
        "Set every tick: approvals asked for and not yet approved, rejected or expired.",
    ),
    (
        "spire_healer_api_denied_total",
        "+1 per call refused before its body is read: `no_credentials` answers UNAUTHENTICATED, every other reason PERMISSION_DENIED (counted under `outcome=\"unauthenticated\"` in `spire_healer_api_requests_total` too).",
    ),
    (
        "spire_healer_api_requests_total",
        "+1 per call to the gRPC API, when it is answered; a `Watch` counts when its stream starts.",
    ),
    (
        "spire_healer_api_watch_dropped_total",
        "+1 when a Watch subscriber misses events (its queue of `watch_buffer` was full while the event ring moved past it); its stream ends with RESOURCE_EXHAUSTED.",
    ),
    (
        "spire_healer_api_tls_handshake_failures_total",
        "+1 per connection to `[api.tcp]` whose TLS handshake fails or times out; the caller never reaches a handler.",
    ),
    (
        "spire_healer_server_address_checks_total",
        "+1 per poll of a server with an `address` configured (the `host:port` agents dial): a TLS handshake from this node, bounded by the poll `timeout`; `ok` when it completes.",
    ),
    (
        "spire_healer_build_info",
        "Set once at start; join on it to show the version.",
    ),
    (
        "spire_healer_bundle_authority_expiration_timestamp_seconds",
        "Set every tick per configured server whose last bundle holds an untainted authority; removed while it holds none.",
    ),
    (
        "spire_healer_cert_file_expiration_timestamp_seconds",
        "Set on each read of a watched certificate file.",
    ),
    (
        "spire_healer_errors_total",
        "+1 per error, labelled by where it happened and its closed-set kind.",
    ),
    (
        "spire_healer_handshake_peer_expiration_timestamp_seconds",
        "Set after each probe that saw the peer's certificate.",
    ),
    (
        "spire_healer_k8s_requests_total",
        "+1 per call the Kubernetes actuators make (mappings, owner reads, evictions, deletions, patches, waits for replacements), when it is answered, refused, or times out; a call refused because its namespace is not allowed is never sent and not counted. Created at 0 per verb and code.",
    ),
    (
        "spire_healer_handshake_probe_duration_seconds",
        "Observed per active probe.",
    ),
    (
        "spire_healer_handshake_reports_rejected_total",
        "+1 per report (or outcome) refused. Created at 0 per kind.",
    ),
    (
        "spire_healer_handshakes_total",
        "+n per handshake outcome counted (probes, reports, Envoy scrapes).",
    ),
    (
        "spire_healer_holds_total",
        "+1 when a hold is recorded (once per incident, actuator and reason, not once per tick). Created at 0 per `HoldReason`.",
    ),
    (
        "spire_healer_incident_duration_seconds",
        "Observed when an incident closes as cleared (a superseded incident is not a recovery). Created empty per symptom.",
    ),
    (
        "spire_healer_demoted_steps",
        "Set every tick for every (symptom, actuator) step of the policy's ladders: 1 while demoted, 0 otherwise (an operator's reset sets it back to 0).",
    ),
    (
        "spire_healer_dry_run",
        "Set every tick: the config's `dry_run`, or the last `SetDryRun`.",
    ),
    (
        "spire_healer_incidents_held",
        "Set every tick: an incident counts under the reason of its latest hold until an action starts for it or it closes. Created at 0 per `HoldReason`; a precondition reason, once seen, stays at 0.",
    ),
    (
        "spire_healer_incidents_needing_operator",
        "Set every tick. Created at 0 per symptom, and back to 0 when none needs an operator.",
    ),
    (
        "spire_healer_incidents_open",
        "Set every tick; symptoms with none have no series.",
    ),
    (
        "spire_healer_incidents_opened_total",
        "+1 when an incident opens. Created at 0 per symptom.",
    ),
    (
        "spire_healer_last_tick_timestamp_seconds",
        "Set at the end of every tick: `time() - spire_healer_last_tick_timestamp_seconds` is how long the loop has been stuck.",
    ),
    (
        "spire_healer_open_incident",
        "Set every tick: 1 while open; a series, once set, stays at 0 after its incident closed (until restart). An agent's SVIDs share the agent's series; unconfigured subjects share `target=\"other\"`.",
    ),
    (
        "spire_healer_predicted_outage_timestamp_seconds",
        "Set every tick; 0 when no open incident predicts an outage.",
    ),
    (
        "spire_healer_sensor_blind",
        "Set every tick per sensor (any instance stale makes it 1).",
    ),
    (
        "spire_healer_sensor_duration_seconds",
        "Observed per sensor poll.",
    ),
    (
        "spire_healer_sensor_last_success_timestamp_seconds",
        "Set every tick per sensor: the oldest of its instances' last refreshes.",
    ),
    (
        "spire_healer_server_up",
        "Set every tick per configured server.",
    ),
    ("spire_healer_servers_up", "Set every tick."),
    (
        "spire_healer_store_buffered_events",
        "Set after each flush attempt.",
    ),
    (
        "spire_healer_store_dropped_events_total",
        "+n when the write buffer overflows (the spool is full or absent).",
    ),
    (
        "spire_healer_store_flush_duration_seconds",
        "Observed per flush.",
    ),
    (
        "spire_healer_store_prune_duration_seconds",
        "Observed per retention pass (every 10 min), failed passes included.",
    ),
    (
        "spire_healer_store_pruned_rows_total",
        "+n after each retention pass, per table it deleted from (also for a pass cut short by an error). Created at 0 per table.",
    ),
    (
        "spire_healer_store_replayed_events_total",
        "+n at start, when the spool is replayed.",
    ),
    (
        "spire_healer_store_spool_bytes",
        "Set when the spool is written or replayed.",
    ),
    (
        "spire_healer_store_spooled_events_total",
        "+n per flush the store refused, when the events go to the spool.",
    ),
    (
        "spire_healer_store_up",
        "Set after each flush and store heartbeat.",
    ),
    (
        "spire_healer_svid_expiration_timestamp_seconds",
        "Set every tick for the soonest-expiring SVIDs (top-k); series of SVIDs that left the top-k are removed.",
    ),
    (
        "spire_healer_svid_predicted_outage_timestamp_seconds",
        "Set every tick for the soonest predicted outages per SVID (top-k); an SVID with its own incident takes that incident's prediction, one on an agent with an incident the later of the agent's predicted outage and its own notAfter. All other series are removed.",
    ),
    (
        "spire_healer_symptoms",
        "Set every tick; symptoms not present have no series.",
    ),
    (
        "spire_healer_replay_frames_total",
        "+1 per frame the loop handed to the recorder and what became of it: `written` to the store; dropped because the recorder's queue was full (`queue_full`: the loop never waits for it), its JSON exceeded `[replay] max_frame_bytes` (`oversize`), the hour's `max_bytes_per_hour` was spent (`over_budget`) or the store refused it (`write_failed`); and +1 per frame deleted for being older than `retention` (`pruned`). Created at 0 per outcome when recording is on.",
    ),
    ("spire_healer_tick_duration_seconds", "Observed per tick."),
    (
        "spire_healer_trace_spans_dropped_total",
        "Only with `[telemetry.otlp]`: +1 per span not exported, because the bounded export queue was full (`queue_full`: the loop never waits for the exporter) or its export call failed (`export_failed`).",
    ),
    (
        "spire_healer_verifications_total",
        "+1 when an action's effect is judged. Created at 0 per configured actuator and result.",
    ),
    (
        "spire_healer_workload_api_stream_up",
        "Set by the Workload API sensor when its streams go up or down.",
    ),
    ("spire_healer_workloads_at_risk", "Set every tick."),
];

/// Sensor names (`Sensor::name`).
const SENSORS: &[&str] = &[
    "agent_debug",
    "bootstrap_bundle",
    "cert_files",
    "handshake_probe",
    "health",
    "metrics_scrape",
    "server_api",
    "workload_api",
];

fn codes(values: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    values
        .into_iter()
        .map(|v| format!("`{}`", v.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The values `label` takes on `metric`; `None` when undocumented.
fn label_values(metric: &str, label: &str) -> Option<String> {
    let symptoms = || codes(SymptomKind::ALL.map(SymptomKind::as_str));
    let holds = || {
        format!(
            "{}; an actuator's execute-time hold, {}; and an actuator's precondition reason (a fixed set in code, e.g. `not_an_svid`, `agent_id_unknown`, `current_server_healthy`)",
            codes(crate::plan::HoldReason::ALL.map(|r| r.as_str())),
            codes(crate::actuators::HELD_REASONS)
        )
    };
    Some(match (metric, label) {
        (_, "agent") => "a configured `[[agents]]` name".into(),
        (_, "server") => "a configured `[[servers]]` name".into(),
        (_, "actuator") => "a configured `[actuators.NAME]` name".into(),
        (_, "file") => "a configured `[[cert_files]]` name".into(),
        (_, "symptom") => symptoms(),
        (_, "severity") => codes([Severity::Warning, Severity::Critical].map(Severity::as_str)),
        (_, "sensor") => codes(SENSORS),
        (_, "version") => "the crate version (`CARGO_PKG_VERSION`)".into(),
        ("spire_healer_leader", "role") => {
            codes(crate::leadership::Role::ALL.map(crate::leadership::Role::as_str))
        }
        (_, "spiffe_id") => format!(
            "a SPIFFE ID, only for the top {} series",
            if metric.contains("predicted_outage") {
                OUTAGE_TOP_K
            } else {
                SVID_TOP_K
            }
        ),
        ("spire_healer_open_incident", "target") => format!(
            "a configured agent (also for its SVIDs), server, probe target or peer, or certificate-file name; the trust domain for cluster symptoms; `{OTHER_TARGET}` for subjects not configured (a peer named only in reports, an agent known only by its SPIFFE ID)"
        ),
        (_, "target") => "a configured probe target name".into(),
        ("spire_healer_actions_total", "outcome") => codes(OutcomeKind::ALL.map(OutcomeKind::as_str)),
        ("spire_healer_api_requests_total", "outcome") => {
            codes(crate::api::Outcome::ALL.map(crate::api::Outcome::as_str))
        }
        ("spire_healer_api_requests_total" | "spire_healer_api_denied_total", "method") => {
            codes(crate::api::Method::ALL.map(crate::api::Method::as_str))
        }
        ("spire_healer_api_denied_total", "reason") => {
            codes(crate::api::authz::Denial::ALL.map(crate::api::authz::Denial::as_str))
        }
        ("spire_healer_server_address_checks_total", "outcome") => {
            codes(crate::sensors::server_api::AddressError::OUTCOMES)
        }
        ("spire_healer_api_tls_handshake_failures_total", "reason") => {
            codes(crate::api::tcp::HandshakeFailure::ALL.map(|r| r.as_str()))
        }
        ("spire_healer_trace_spans_dropped_total", "reason") => {
            codes(["queue_full", "export_failed"])
        }
        ("spire_healer_store_pruned_rows_total", "table") => {
            codes(crate::knowledge::retention::Table::ALL.map(|t| t.as_str()))
        }
        ("spire_healer_replay_frames_total", "outcome") => {
            codes(crate::replay::frames::FrameOutcome::ALL.map(|o| o.as_str()))
        }
        ("spire_healer_verifications_total", "result") => codes(
            [
                Verification::Verified,
                Verification::Failed,
                Verification::Skipped,
            ]
            .map(Verification::as_str),
        ),
        ("spire_healer_holds_total" | "spire_healer_incidents_held", "reason") => holds(),
        ("spire_healer_handshakes_total", "reason") => {
            codes(crate::handshake::Reason::ALL.map(|r| r.as_str()))
        }
        ("spire_healer_handshakes_total", "source") => {
            codes(crate::handshake::Source::ALL.map(|s| s.as_str()))
        }
        ("spire_healer_handshake_reports_rejected_total", "kind") => {
            codes(crate::api::reports::RejectKind::ALL.map(|k| k.as_str()))
        }
        (_, "slo") => codes(crate::slo::Sli::ALL.map(crate::slo::Sli::as_str)),
        ("spire_healer_slo_events_total", "result") => codes(crate::slo::RESULTS),
        ("spire_healer_k8s_requests_total", "verb") => {
            codes(crate::k8s::Verb::ALL.map(crate::k8s::Verb::as_str))
        }
        ("spire_healer_k8s_requests_total", "code") => format!(
            "{}: `ok` for any 2xx; the HTTP status of a refusal (`5xx` for every server error, `other` for the rest); `transport` when no answer came; `timeout` past `[kubernetes] request_timeout`",
            codes(crate::k8s::client::CODES)
        ),
        ("spire_healer_errors_total", "stage") => codes(["actuator", "sensor", "spool", "store"]),
        ("spire_healer_errors_total", "kind") => {
            "the closed-set `kind()` of the stage's error type (`SensorError`, `ActuatorError`, `StoreError`, the spool's errors), e.g. `unavailable`, `timeout`, `disk_full`".into()
        }
        ("spiffe_workload_api_errors_total", "code") => {
            codes(crate::sensors::workload_api::ERROR_CODES)
        }
        _ => return None,
    })
}

/// The unit a metric's name states.
fn unit(d: &MetricDescription) -> &'static str {
    let n = d.name.as_str();
    if n.ends_with("_timestamp_seconds") {
        "seconds since the Unix epoch"
    } else if n.ends_with("_seconds") {
        "seconds"
    } else if n.ends_with("_bytes") {
        "bytes"
    } else if n.ends_with("_info") {
        "none (always 1)"
    } else if d.help.starts_with("1 ") || d.help.contains(", else 0") {
        "none (0 or 1)"
    } else {
        "count"
    }
}

/// The catalogue, or every problem found while rendering it.
fn render(metrics: &[MetricDescription]) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    let mut out = String::from(
        "# Metrics\n\n\
         Every metric spire-healer exports on `/metrics`. This file is generated from the \
         metric registry (`src/telemetry/metrics.rs`) by a unit test, which fails when it \
         differs; regenerate it with `SPIRE_HEALER_UPDATE_DOCS=1 cargo test --lib catalogue`.\n\n\
         Label values come from closed sets or configuration keys, never from IDs, paths or \
         messages; SPIFFE IDs appear only on the top-k per-SVID series. Alert rules built on \
         these metrics: [`deploy/prometheus/spire-healer.rules.yaml`](../deploy/prometheus/spire-healer.rules.yaml), \
         explained in [runbooks.md](runbooks.md).\n\n\
         | Metric | Type | Labels |\n|---|---|---|\n",
    );
    for d in metrics {
        let labels = if d.labels.is_empty() {
            "–".to_string()
        } else {
            codes(&d.labels)
        };
        // GitHub's heading anchors keep underscores.
        let _ = writeln!(out, "| [`{0}`](#{0}) | {1} | {labels} |", d.name, d.kind);
    }
    for d in metrics {
        let _ = write!(out, "\n## {}\n\n| | |\n|---|---|\n", d.name);
        let kind = if d.kind == "histogram" {
            "histogram (`_bucket{le}`, `_sum`, `_count`)".to_string()
        } else {
            d.kind.to_string()
        };
        let _ = writeln!(out, "| Type | {kind} |");
        let _ = writeln!(out, "| Unit | {} |", unit(d));
        for l in &d.labels {
            match label_values(&d.name, l) {
                Some(v) => {
                    let _ = writeln!(out, "| Label `{l}` | {v} |");
                }
                None => problems.push(format!(
                    "{}: label {l} has no value set in label_values",
                    d.name
                )),
            }
        }
        let _ = writeln!(out, "| Meaning | {} |", d.help);
        match NOTES.iter().find(|(n, _)| *n == d.name) {
            Some((_, note)) => {
                let _ = writeln!(out, "| Moves | {note} |");
            }
            None => problems.push(format!("{}: no entry in NOTES", d.name)),
        }
    }
    for (n, _) in NOTES {
        if !metrics.iter().any(|d| d.name == *n) {
            problems.push(format!("NOTES names {n}, which is not registered"));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[test]
fn docs_metrics_md_matches_the_registry() {
    let text = match render(&Metrics::new().descriptions()) {
        Ok(t) => t,
        Err(problems) => panic!(
            "the metrics catalogue cannot be rendered:\n  {}",
            problems.join("\n  ")
        ),
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
    if std::env::var_os("SPIRE_HEALER_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &text).expect("write docs/metrics.md");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == text,
        "docs/metrics.md differs from the metric registry; regenerate it with\n  \
         SPIRE_HEALER_UPDATE_DOCS=1 cargo test --lib catalogue\nand review the diff"
    );
}

#[test]
fn an_undocumented_metric_or_label_is_reported() {
    let d = |name: &str, labels: &[&str]| MetricDescription {
        name: name.into(),
        help: "h".into(),
        kind: "gauge",
        labels: labels.iter().map(|l| l.to_string()).collect(),
    };
    let err = render(&[d("spire_healer_new_thing", &["colour"])]).unwrap_err();
    assert!(err.iter().any(|p| p.contains("label colour")), "{err:?}");
    assert!(
        err.iter().any(|p| p.contains("no entry in NOTES")),
        "{err:?}"
    );
    assert!(err.iter().any(|p| p.contains("not registered")), "{err:?}");
}
