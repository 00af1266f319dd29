//! Every metric spire-healer exports, declared in one place.
//!
//! Label values come from closed sets or config keys (agent names, actuator
//! names). SPIFFE IDs appear only on the per-SVID expiry gauges, and only for
//! the `top_k` soonest-expiring SVIDs, so the series count stays bounded.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::clock::unix_secs_f64;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for durations of sub-second work.
const FAST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets for action runs: a refetch takes milliseconds, an eviction with
/// its restart up to minutes.
const ACTION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets for times to recover.
const MTTR_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
];

/// What one supervisor tick did, as the metrics see it: filled by the loop,
/// written by [`Metrics::record_tick`]. Names borrow from the tick's
/// observations.
#[derive(Debug, Default)]
pub struct TickSummary<'a> {
    /// Symptom kinds of the incidents opened.
    pub opened: Vec<&'static str>,
    /// Symptom kind and duration in seconds of the incidents closed.
    pub closed: Vec<(&'static str, f64)>,
    /// Reasons of the holds recorded.
    pub holds: Vec<&'static str>,
    /// Agents whose SVIDs rotated, once per rotation.
    pub rotations: Vec<&'a str>,
    /// Actuator and outcome of the actions that returned.
    pub actions: Vec<(String, &'static str)>,
    /// Actuator and verdict of the actions verified.
    pub verifications: Vec<(String, &'static str)>,
    /// The soonest-expiring SVIDs: agent, SPIFFE ID, notAfter.
    pub svid_expiries: Vec<(&'a str, &'a str, SystemTime)>,
    /// The state after a whole tick; `None` when only actions were
    /// collected (at shutdown), which leaves the gauges as they are.
    pub gauges: Option<Gauges<'a>>,
}

/// Gauges describing the fleet after a tick.
#[derive(Debug, Default)]
pub struct Gauges<'a> {
    /// Active symptoms by (kind, severity).
    pub symptoms: BTreeMap<(&'static str, &'static str), i64>,
    /// Open incidents by kind.
    pub incidents_open: BTreeMap<&'static str, i64>,
    /// Open incidents with nothing left to try, by kind.
    pub needs_operator: BTreeMap<&'static str, i64>,
    /// Agents with an open agent-level incident.
    pub agents_at_risk: i64,
    /// SVIDs served by an agent at risk, or themselves at risk.
    pub workloads_at_risk: i64,
    /// The earliest predicted outage over open incidents.
    pub predicted_outage: Option<SystemTime>,
    /// Servers answering.
    pub servers_up: i64,
    /// Time since each agent's last successful sync with a server.
    pub agent_sync_ages: Vec<(&'a str, Duration)>,
    /// Each configured server's agent SVID TTL, once known (learned or
    /// set by the policy).
    pub agent_svid_ttls: Vec<(&'a str, Duration)>,
}

/// The metric set, registered on its own [`Registry`].
pub struct Metrics {
    registry: Registry,
    /// Duration of one supervisor tick.
    pub tick_duration_seconds: Histogram,
    /// Unix time of the last completed tick.
    pub last_tick_timestamp_seconds: prometheus::Gauge,
    /// Duration of one sensor observation, by sensor.
    pub sensor_duration_seconds: HistogramVec,
    /// Errors by stage and closed-set kind.
    pub errors_total: IntCounterVec,
    /// Finished spans never sent, by reason (`queue_full`, `export_failed`).
    pub trace_spans_dropped_total: IntCounterVec,
    /// Symptoms currently present, by symptom and severity.
    pub symptoms: IntGaugeVec,
    /// Incidents currently open, by symptom.
    pub incidents_open: IntGaugeVec,
    /// Open incidents with nothing left to try, by symptom.
    pub incidents_needing_operator: IntGaugeVec,
    /// Incidents opened, by symptom.
    pub incidents_opened_total: IntCounterVec,
    /// Time from open to close, by symptom.
    pub incident_duration_seconds: HistogramVec,
    /// Actions run, by actuator and outcome.
    pub actions_total: IntCounterVec,
    /// Actuator run time, by actuator.
    pub action_duration_seconds: HistogramVec,
    /// Verifications, by actuator and result.
    pub verifications_total: IntCounterVec,
    /// Decisions not to act, by reason.
    pub holds_total: IntCounterVec,
    /// Events waiting in the write buffer.
    pub store_buffered_events: IntGauge,
    /// Events dropped because the write buffer was full.
    pub store_dropped_events_total: prometheus::IntCounter,
    /// Store flush duration.
    pub store_flush_duration_seconds: Histogram,
    /// 1 when the store accepted the last flush.
    pub store_up: IntGauge,
    /// Bytes of events in the local spool (waiting for the database).
    pub store_spool_bytes: IntGauge,
    /// Events written to the local spool.
    pub store_spooled_events_total: prometheus::IntCounter,
    /// Events replayed from the spool into the database at start.
    pub store_replayed_events_total: prometheus::IntCounter,
    /// Workload API stream state per agent (1 = up).
    pub workload_api_stream_up: IntGaugeVec,
    /// SVID notAfter, top-k soonest.
    pub svid_expiration_timestamp_seconds: GaugeVec,
    /// `spiffe_svid_expiry_seconds`: seconds until notAfter, top-k soonest.
    pub spiffe_svid_expiry_seconds: GaugeVec,
    /// `spiffe_workload_api_errors_total`: Workload API errors by agent and code.
    pub spiffe_workload_api_errors_total: IntCounterVec,
    /// `spiffe_certificate_rotation_total`: new serials seen, by agent.
    pub spiffe_certificate_rotation_total: IntCounterVec,
    /// Agents with at least one open incident.
    pub agents_at_risk: IntGauge,
    /// SVIDs served by agents at risk or themselves in an open incident.
    pub workloads_at_risk: IntGauge,
    /// Earliest predicted outage over open incidents (0: none).
    pub predicted_outage_timestamp_seconds: prometheus::Gauge,
    /// Servers whose admin API answers.
    pub servers_up: IntGauge,
    /// Seconds since the agent's last successful server sync (Debug API).
    pub agent_last_sync_age_seconds: GaugeVec,
    /// The agent SVID TTL `agent_not_renewing` judges a server's agents by,
    /// by configured server.
    pub agent_svid_ttl_seconds: GaugeVec,
    /// Handshake outcomes counted, by source (`probe`, `report`, `envoy`)
    /// and reason.
    pub handshakes_total: IntCounterVec,
    /// Duration of one active mTLS probe (connect + handshake), by target.
    pub handshake_probe_duration_seconds: HistogramVec,
    /// notAfter of the leaf a probed peer last presented, by target.
    pub handshake_peer_expiration_timestamp_seconds: GaugeVec,
    /// Handshake outcomes or reports refused, by closed-set kind.
    pub handshake_reports_rejected_total: IntCounterVec,
    /// Calls to our gRPC API, by method and outcome (`ok`, `unauthenticated`,
    /// `invalid`, `resource_exhausted`, `error`).
    pub api_requests_total: IntCounterVec,
    /// notAfter of the leaf in a watched certificate file, by file.
    pub cert_file_expiration_timestamp_seconds: GaugeVec,
    /// Per-agent set of labelled SVID series currently exported, so stale
    /// ones can be removed.
    exported_svids: std::sync::Mutex<Vec<(String, String)>>,
}

/// How many SVID expiry series at most.
pub const SVID_TOP_K: usize = 20;

impl Metrics {
    /// Creates at zero every labelled series whose labels are known in
    /// advance, so the first event is an increase Prometheus can see
    /// (`increase()`/`rate()` need a previous sample): incidents and their
    /// durations per symptom, actions, durations and verifications per
    /// configured actuator and outcome, holds per reason, Workload API
    /// errors per agent and code, rotations per agent.
    pub fn init_series(&self, actuators: &[String], agents: &[String]) {
        use crate::model::{OutcomeKind, SymptomKind, Verification};
        for k in SymptomKind::ALL {
            self.incidents_opened_total.with_label_values(&[k.as_str()]);
            self.incident_duration_seconds
                .with_label_values(&[k.as_str()]);
        }
        for a in actuators {
            self.action_duration_seconds.with_label_values(&[a]);
            for o in [
                OutcomeKind::Ok,
                OutcomeKind::Error,
                OutcomeKind::DryRun,
                OutcomeKind::Timeout,
            ] {
                self.actions_total.with_label_values(&[a, o.as_str()]);
            }
            for v in [
                Verification::Verified,
                Verification::Failed,
                Verification::Skipped,
            ] {
                self.verifications_total.with_label_values(&[a, v.as_str()]);
            }
        }
        for r in crate::plan::HoldReason::ALL {
            self.holds_total.with_label_values(&[r.as_str()]);
        }
        for kind in ["io", "disk_full", "full", "torn"] {
            self.errors_total.with_label_values(&["spool", kind]);
        }
        for agent in agents {
            self.spiffe_certificate_rotation_total
                .with_label_values(&[agent]);
            for code in crate::sensors::workload_api::ERROR_CODES {
                self.spiffe_workload_api_errors_total
                    .with_label_values(&[agent, code]);
            }
        }
    }

    /// Builds and registers every metric.
    ///
    /// # Panics
    /// Only if two metrics share a name, a programming error caught by tests.
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let h = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
        };
        let c = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let g = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        Self {
            tick_duration_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spire_healer_tick_duration_seconds",
                    "Duration of one supervisor tick (sense, analyze, plan, execute, verify, record)."
                )
                .buckets(FAST_BUCKETS.to_vec())
            )),
            last_tick_timestamp_seconds: reg!(prometheus::Gauge::new(
                "spire_healer_last_tick_timestamp_seconds",
                "Unix time of the last completed tick."
            )),
            sensor_duration_seconds: reg!(h(
                "spire_healer_sensor_duration_seconds",
                "Duration of one sensor observation.",
                &["sensor"],
                FAST_BUCKETS
            )),
            errors_total: reg!(c(
                "spire_healer_errors_total",
                "Errors by stage and kind.",
                &["stage", "kind"]
            )),
            trace_spans_dropped_total: reg!(c(
                "spire_healer_trace_spans_dropped_total",
                "Finished spans never sent to the OTLP collector, by reason.",
                &["reason"]
            )),
            symptoms: reg!(g(
                "spire_healer_symptoms",
                "Symptoms currently present.",
                &["symptom", "severity"]
            )),
            incidents_open: reg!(g(
                "spire_healer_incidents_open",
                "Incidents currently open.",
                &["symptom"]
            )),
            incidents_needing_operator: reg!(g(
                "spire_healer_incidents_needing_operator",
                "Open incidents whose every remaining remediation is futile: an operator must act.",
                &["symptom"]
            )),
            incidents_opened_total: reg!(c(
                "spire_healer_incidents_opened_total",
                "Incidents opened.",
                &["symptom"]
            )),
            incident_duration_seconds: reg!(h(
                "spire_healer_incident_duration_seconds",
                "Time from incident open to close (time to recover).",
                &["symptom"],
                MTTR_BUCKETS
            )),
            actions_total: reg!(c(
                "spire_healer_actions_total",
                "Remediation actions by actuator and outcome.",
                &["actuator", "outcome"]
            )),
            action_duration_seconds: reg!(h(
                "spire_healer_action_duration_seconds",
                "Actuator run time.",
                &["actuator"],
                ACTION_BUCKETS
            )),
            verifications_total: reg!(c(
                "spire_healer_verifications_total",
                "Action verifications by actuator and result.",
                &["actuator", "result"]
            )),
            holds_total: reg!(c(
                "spire_healer_holds_total",
                "Decisions not to act, by reason.",
                &["reason"]
            )),
            store_buffered_events: reg!(IntGauge::new(
                "spire_healer_store_buffered_events",
                "Events waiting to be written to the knowledge store."
            )),
            store_dropped_events_total: reg!(prometheus::IntCounter::new(
                "spire_healer_store_dropped_events_total",
                "Events dropped because the write buffer was full."
            )),
            store_flush_duration_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spire_healer_store_flush_duration_seconds",
                    "Duration of one write-buffer flush."
                )
                .buckets(FAST_BUCKETS.to_vec())
            )),
            store_up: reg!(IntGauge::new(
                "spire_healer_store_up",
                "1 when the knowledge store accepted the last flush, else 0."
            )),
            store_spool_bytes: reg!(IntGauge::new(
                "spire_healer_store_spool_bytes",
                "Bytes of events in the local spool, waiting for the knowledge store."
            )),
            store_spooled_events_total: reg!(prometheus::IntCounter::new(
                "spire_healer_store_spooled_events_total",
                "Events written (fsync'd) to the local spool because the knowledge store did not take them."
            )),
            store_replayed_events_total: reg!(prometheus::IntCounter::new(
                "spire_healer_store_replayed_events_total",
                "Events replayed from the local spool into the knowledge store at start."
            )),
            workload_api_stream_up: reg!(g(
                "spire_healer_workload_api_stream_up",
                "1 when the Workload API streams to the agent are up and answering.",
                &["agent"]
            )),
            svid_expiration_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_svid_expiration_timestamp_seconds",
                    "notAfter of the soonest-expiring SVIDs (top-k)."
                ),
                &["agent", "spiffe_id"]
            )),
            spiffe_svid_expiry_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spiffe_svid_expiry_seconds",
                    "Seconds until the SVID expires (top-k soonest)."
                ),
                &["agent", "spiffe_id"]
            )),
            spiffe_workload_api_errors_total: reg!(c(
                "spiffe_workload_api_errors_total",
                "Workload API errors by agent and gRPC code or transport class.",
                &["agent", "code"]
            )),
            spiffe_certificate_rotation_total: reg!(c(
                "spiffe_certificate_rotation_total",
                "SVID rotations observed (a new serial for a known SPIFFE ID).",
                &["agent"]
            )),
            agents_at_risk: reg!(IntGauge::new(
                "spire_healer_agents_at_risk",
                "Agents with at least one open incident."
            )),
            workloads_at_risk: reg!(IntGauge::new(
                "spire_healer_workloads_at_risk",
                "SVIDs served by agents with an open incident, or themselves in one."
            )),
            predicted_outage_timestamp_seconds: reg!(prometheus::Gauge::new(
                "spire_healer_predicted_outage_timestamp_seconds",
                "Earliest predicted outage (unix time) over open incidents; 0 when none."
            )),
            servers_up: reg!(IntGauge::new(
                "spire_healer_servers_up",
                "SPIRE servers whose admin API answered the last poll."
            )),
            agent_last_sync_age_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_agent_last_sync_age_seconds",
                    "Seconds since the agent last synced with a server (agent Debug API)."
                ),
                &["agent"]
            )),
            agent_svid_ttl_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_agent_svid_ttl_seconds",
                    "Agent SVID TTL of the server's agents: learned from its agent listing, or the policy's agent_svid_ttl."
                ),
                &["server"]
            )),
            handshakes_total: reg!(c(
                "spire_healer_handshakes_total",
                "mTLS handshake outcomes counted, by source and reason.",
                &["source", "reason"]
            )),
            handshake_probe_duration_seconds: reg!(h(
                "spire_healer_handshake_probe_duration_seconds",
                "Active mTLS probe time (connect and handshake), by target.",
                &["target"],
                FAST_BUCKETS
            )),
            handshake_peer_expiration_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_handshake_peer_expiration_timestamp_seconds",
                    "notAfter (unix time) of the leaf a probed peer last presented."
                ),
                &["target"]
            )),
            handshake_reports_rejected_total: reg!(c(
                "spire_healer_handshake_reports_rejected_total",
                "Handshake reports or outcomes refused, by kind.",
                &["kind"]
            )),
            api_requests_total: reg!(c(
                "spire_healer_api_requests_total",
                "Calls to the spire_healer.v1 API, by method and outcome.",
                &["method", "outcome"]
            )),
            cert_file_expiration_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_cert_file_expiration_timestamp_seconds",
                    "notAfter (unix time) of the leaf in a watched certificate file."
                ),
                &["file"]
            )),
            exported_svids: std::sync::Mutex::new(Vec::new()),
            registry,
        }
    }

    /// The registry, for tests and custom exporters.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts an error for `stage` with a closed-set `kind`.
    pub fn error(&self, stage: &str, kind: &str) {
        self.errors_total.with_label_values(&[stage, kind]).inc();
    }

    /// Sets what one supervisor tick changed: the one place the loop's
    /// metrics are written (sensors, the store and actions time their own
    /// I/O).
    pub fn record_tick(&self, now: SystemTime, t: &TickSummary<'_>) {
        for kind in &t.opened {
            self.incidents_opened_total.with_label_values(&[kind]).inc();
        }
        for (kind, secs) in &t.closed {
            self.incident_duration_seconds
                .with_label_values(&[kind])
                .observe(*secs);
        }
        for reason in &t.holds {
            self.holds_total.with_label_values(&[reason]).inc();
        }
        for agent in &t.rotations {
            self.spiffe_certificate_rotation_total
                .with_label_values(&[agent])
                .inc();
        }
        for (actuator, outcome) in &t.actions {
            self.actions_total
                .with_label_values(&[actuator.as_str(), outcome])
                .inc();
        }
        for (actuator, verdict) in &t.verifications {
            self.verifications_total
                .with_label_values(&[actuator.as_str(), verdict])
                .inc();
        }
        let Some(g) = &t.gauges else {
            return;
        };
        self.symptoms.reset();
        for ((kind, severity), n) in &g.symptoms {
            self.symptoms.with_label_values(&[kind, severity]).set(*n);
        }
        self.incidents_open.reset();
        for (kind, n) in &g.incidents_open {
            self.incidents_open.with_label_values(&[kind]).set(*n);
        }
        self.incidents_needing_operator.reset();
        for (kind, n) in &g.needs_operator {
            self.incidents_needing_operator
                .with_label_values(&[kind])
                .set(*n);
        }
        let now_s = unix_secs_f64(now);
        self.set_svid_expiries(
            t.svid_expiries
                .iter()
                .map(|(agent, id, not_after)| {
                    let at = unix_secs_f64(*not_after);
                    (agent.to_string(), id.to_string(), at, at - now_s)
                })
                .collect(),
        );
        self.agents_at_risk.set(g.agents_at_risk);
        self.workloads_at_risk.set(g.workloads_at_risk);
        self.predicted_outage_timestamp_seconds
            .set(g.predicted_outage.map_or(0.0, unix_secs_f64));
        self.servers_up.set(g.servers_up);
        for (agent, age) in &g.agent_sync_ages {
            self.agent_last_sync_age_seconds
                .with_label_values(&[agent])
                .set(age.as_secs_f64());
        }
        for (server, ttl) in &g.agent_svid_ttls {
            self.agent_svid_ttl_seconds
                .with_label_values(&[server])
                .set(ttl.as_secs_f64());
        }
        self.last_tick_timestamp_seconds.set(now_s);
    }

    /// Replaces the per-SVID expiry series with `svids` (agent, spiffe id,
    /// notAfter unix secs, seconds left), keeping only the `SVID_TOP_K`
    /// soonest and removing series no longer present.
    pub fn set_svid_expiries(&self, mut svids: Vec<(String, String, f64, f64)>) {
        svids.sort_by(|a, b| a.3.total_cmp(&b.3));
        svids.truncate(SVID_TOP_K);
        let mut exported = self
            .exported_svids
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (agent, id) in exported.iter() {
            if !svids.iter().any(|s| &s.0 == agent && &s.1 == id) {
                let _ = self
                    .svid_expiration_timestamp_seconds
                    .remove_label_values(&[agent, id]);
                let _ = self
                    .spiffe_svid_expiry_seconds
                    .remove_label_values(&[agent, id]);
            }
        }
        exported.clear();
        for (agent, id, not_after, left) in svids {
            self.svid_expiration_timestamp_seconds
                .with_label_values(&[&agent, &id])
                .set(not_after);
            self.spiffe_svid_expiry_seconds
                .with_label_values(&[&agent, &id])
                .set(left);
            exported.push((agent, id));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Value of one sample in Prometheus text `text`, for tests: the line
/// starting with `series` (name plus exact label block).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_exist_at_zero_before_their_first_event() {
        let m = Metrics::new();
        m.init_series(&["restart-agent".into()], &["node-a".into()]);
        let text = m.render();
        for series in [
            r#"spire_healer_incidents_opened_total{symptom="agent_unreachable"}"#,
            r#"spire_healer_incident_duration_seconds_count{symptom="svid_expiring"}"#,
            r#"spire_healer_actions_total{actuator="restart-agent",outcome="ok"}"#,
            r#"spire_healer_action_duration_seconds_count{actuator="restart-agent"}"#,
            r#"spire_healer_verifications_total{actuator="restart-agent",result="failed"}"#,
            r#"spire_healer_holds_total{reason="needs_operator"}"#,
            r#"spiffe_certificate_rotation_total{agent="node-a"}"#,
            r#"spiffe_workload_api_errors_total{agent="node-a",code="permission_denied"}"#,
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series}");
        }
        // Action durations: milliseconds to minutes.
        assert!(text.contains(
            r#"spire_healer_action_duration_seconds_bucket{actuator="restart-agent",le="120"} 0"#
        ));
    }

    #[test]
    fn registers_and_renders() {
        let m = Metrics::new();
        m.error("sensor", "unavailable");
        m.spiffe_certificate_rotation_total
            .with_label_values(&["a"])
            .inc();
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"spire_healer_errors_total{kind="unavailable",stage="sensor"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"spiffe_certificate_rotation_total{agent="a"}"#),
            Some(1.0)
        );
    }

    #[test]
    fn the_tick_sets_each_servers_agent_svid_ttl() {
        let m = Metrics::new();
        let summary = TickSummary {
            gauges: Some(Gauges {
                agent_svid_ttls: vec![("server-a", Duration::from_secs(599))],
                ..Gauges::default()
            }),
            ..TickSummary::default()
        };
        m.record_tick(SystemTime::UNIX_EPOCH, &summary);
        assert_eq!(
            sample(
                &m.render(),
                r#"spire_healer_agent_svid_ttl_seconds{server="server-a"}"#
            ),
            Some(599.0)
        );
    }

    #[test]
    fn svid_series_are_bounded_and_pruned() {
        let m = Metrics::new();
        let many: Vec<_> = (0..50)
            .map(|i| {
                (
                    "a".to_string(),
                    format!("spiffe://td/w{i}"),
                    0.0,
                    f64::from(i),
                )
            })
            .collect();
        m.set_svid_expiries(many);
        let text = m.render();
        let n = text
            .lines()
            .filter(|l| l.starts_with("spiffe_svid_expiry_seconds{"))
            .count();
        assert_eq!(n, SVID_TOP_K);
        m.set_svid_expiries(vec![("a".into(), "spiffe://td/x".into(), 1.0, 5.0)]);
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"spiffe_svid_expiry_seconds{agent="a",spiffe_id="spiffe://td/x"}"#
            ),
            Some(5.0)
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("spiffe_svid_expiry_seconds{"))
                .count(),
            1
        );
    }
}
