//! Every metric spire-healer exports, declared in one place.
//!
//! Label values come from closed sets or config keys (agent names, actuator
//! names). SPIFFE IDs appear only on the per-SVID expiry gauges, and only for
//! the `top_k` soonest-expiring SVIDs, so the series count stays bounded.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::clock::unix_secs_f64;
use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[cfg(test)]
mod catalogue;

/// Buckets for durations of sub-second work.
const FAST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets for action runs: a refetch takes milliseconds, an eviction with
/// its restart up to minutes.
const ACTION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets for SVID issuance latencies (signing to served), around the
/// default 100 ms objective; values carry up to a second of notBefore
/// truncation ([`crate::slo::NOT_BEFORE_RESOLUTION`]), hence the buckets
/// past 1 s.
const ISSUANCE_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 5.0,
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
    /// Open incidents as (symptom, target, severity): the target is a
    /// configured name (agent, server, peer, certificate file), the trust
    /// domain, or [`OTHER_TARGET`]; never a SPIFFE ID.
    pub open_incidents: Vec<OpenIncidentLabels>,
    /// Per configured agent, the earliest predicted outage among its open
    /// incidents (agents with none are left out).
    pub agent_outages: Vec<(String, SystemTime)>,
    /// Per SVID (agent, SPIFFE ID), its predicted outage; the
    /// [`OUTAGE_TOP_K`] soonest are exported.
    pub svid_outages: Vec<(String, String, SystemTime)>,
    /// Per sensor: when every instance last refreshed its view (`None`:
    /// one never did), and whether that is older than the policy allows.
    pub sensors: Vec<SensorFreshness>,
    /// Per configured server: whether its admin API answered the last poll,
    /// and the latest notAfter among the untainted authorities of its
    /// trust bundle.
    pub servers: Vec<(&'a str, bool, Option<SystemTime>)>,
    /// Open incidents whose latest decision was a hold, by reason.
    pub held: BTreeMap<&'static str, i64>,
}

/// How fresh one sensor's view is (all its instances together).
#[derive(Debug, Clone, PartialEq)]
pub struct SensorFreshness {
    /// The sensor's name (`workload_api`, `server_api`, …).
    pub sensor: &'static str,
    /// The oldest of its instances' last refreshes; `None` while one has
    /// never published a view.
    pub last_success: Option<SystemTime>,
    /// Older than the policy's staleness limit for its readings: analysis
    /// treats what it says as blind.
    pub blind: bool,
}

/// The `target` of incidents about a subject that is not configured (a
/// peer named only in reports, an agent known only by its SPIFFE ID): one
/// shared series, so a reporter cannot grow the label set.
pub const OTHER_TARGET: &str = "other";

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
    /// Replay frames by what became of them
    /// ([`FrameOutcome`](crate::replay::frames::FrameOutcome)).
    pub replay_frames_total: IntCounterVec,
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
    /// Rows deleted by retention, by table
    /// ([`Table`](crate::knowledge::retention::Table)).
    pub store_pruned_rows_total: IntCounterVec,
    /// Duration of one retention pass over every table.
    pub store_prune_duration_seconds: Histogram,
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
    /// TLS handshake checks of a server's agent-facing address, by server
    /// and outcome.
    pub server_address_checks_total: IntCounterVec,
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
    /// Calls to our gRPC API, by method and outcome (`api::Outcome`).
    pub api_requests_total: IntCounterVec,
    /// Failed mTLS handshakes on the API's TCP listener, by closed-set
    /// reason (`api::tcp::HandshakeFailure`).
    pub api_tls_handshake_failures_total: IntCounterVec,
    /// API calls refused by authorization, by method and reason
    /// (`api::authz::Denial`).
    pub api_denied_total: IntCounterVec,
    /// `Watch` streams ended because the client did not keep up.
    pub api_watch_dropped_total: prometheus::IntCounter,
    /// Kubernetes API calls, by verb and closed-set code
    /// ([`crate::k8s::client::CODES`]).
    pub k8s_requests_total: IntCounterVec,
    /// notAfter of the leaf in a watched certificate file, by file.
    pub cert_file_expiration_timestamp_seconds: GaugeVec,
    /// 1: the version of this build.
    pub build_info: IntGaugeVec,
    /// 1 while an incident of that symptom on that target is open, 0 after.
    pub open_incident: IntGaugeVec,
    /// Earliest predicted outage per agent with open incidents.
    pub agent_predicted_outage_timestamp_seconds: GaugeVec,
    /// Predicted outage of the `OUTAGE_TOP_K` soonest SVIDs at risk.
    pub svid_predicted_outage_timestamp_seconds: GaugeVec,
    /// 1 when a sensor's view is older than the policy's staleness limit.
    pub sensor_blind: IntGaugeVec,
    /// When each sensor last refreshed its view (all instances).
    pub sensor_last_success_timestamp_seconds: GaugeVec,
    /// 1 when the server's admin API answered the last poll.
    pub server_up: IntGaugeVec,
    /// Latest notAfter of the untainted authorities in a server's bundle.
    pub bundle_authority_expiration_timestamp_seconds: GaugeVec,
    /// Open incidents whose latest decision was a hold, by reason.
    pub incidents_held: IntGaugeVec,
    /// 1 while an operator has paused the supervisor.
    pub paused: IntGauge,
    /// 1 while this instance leads (acts); 0 while it stands by. By role.
    pub leader: IntGaugeVec,
    /// The fencing epoch this instance leads under (0 while standing by).
    pub leader_epoch: IntGauge,
    /// 1 while dry run is on (configured or switched by an operator).
    pub dry_run: IntGauge,
    /// Approvals waiting for an operator.
    pub approvals_pending: IntGauge,
    /// Per (symptom, actuator) step of the ladders: 1 while demoted.
    pub demoted_steps: IntGaugeVec,
    /// Service-level events of SPIRE, by indicator (`crate::slo::Sli`) and
    /// result (`good`, `bad`).
    pub slo_events_total: IntCounterVec,
    /// SVID issuance latency: signing to served on a Workload API stream.
    pub slo_svid_issuance_seconds: Histogram,
    /// The configured objective of each indicator (`[slo]`).
    pub slo_objective: GaugeVec,
    /// The configured `[slo] issuance_latency`, in seconds.
    pub slo_issuance_latency_threshold_seconds: prometheus::Gauge,
    /// `[slo] issuance_latency` in nanoseconds, read by
    /// [`Metrics::observe_svid_issuance`].
    issuance_threshold_nanos: std::sync::atomic::AtomicU64,
    /// Per-agent set of labelled SVID series currently exported, so stale
    /// ones can be removed.
    exported_svids: std::sync::Mutex<Vec<(String, String)>>,
    /// Every `open_incident` series ever set: kept at 0 once closed.
    exported_incidents: std::sync::Mutex<Vec<OpenIncidentLabels>>,
    /// Every hold reason `incidents_held` has a series for.
    held_reasons: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
    /// Every registered metric, series or not (the registry's `gather`
    /// leaves out those without one): [`Metrics::descriptions`].
    collectors: Vec<Box<dyn Collector>>,
}

/// What the registry says about one metric, with or without series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricDescription {
    /// Full name.
    pub name: String,
    /// Help text.
    pub help: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Label names, in declaration order.
    pub labels: Vec<String>,
}

/// How many SVID expiry series at most.
pub const SVID_TOP_K: usize = 20;
/// How many per-SVID predicted-outage series at most.
pub const OUTAGE_TOP_K: usize = 10;

/// (symptom, target, severity) of an open incident, as
/// `spire_healer_open_incident` labels it.
pub type OpenIncidentLabels = (&'static str, String, &'static str);

impl Metrics {
    /// Creates at zero every labelled series whose labels are known in
    /// advance, so the first event is an increase Prometheus can see
    /// (`increase()`/`rate()` need a previous sample): incidents, their
    /// durations and those needing an operator per symptom, actions, durations and verifications per
    /// configured actuator and outcome, holds per reason, Workload API
    /// errors per agent and code, rotations per agent.
    pub fn init_series(&self, actuators: &[String], agents: &[String]) {
        use crate::model::{OutcomeKind, SymptomKind, Verification};
        for k in SymptomKind::ALL {
            self.incidents_opened_total.with_label_values(&[k.as_str()]);
            self.incident_duration_seconds
                .with_label_values(&[k.as_str()]);
            self.incidents_needing_operator
                .with_label_values(&[k.as_str()]);
        }
        for a in actuators {
            self.action_duration_seconds.with_label_values(&[a]);
            for o in OutcomeKind::ALL {
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
            self.incidents_held.with_label_values(&[r.as_str()]);
        }
        for verb in crate::k8s::Verb::ALL {
            for code in crate::k8s::client::CODES {
                self.k8s_requests_total
                    .with_label_values(&[verb.as_str(), code]);
            }
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
        let mut collectors: Vec<Box<dyn Collector>> = Vec::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                collectors.push(Box::new(m.clone()));
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
        let m = Self {
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
            replay_frames_total: reg!(c(
                "spire_healer_replay_frames_total",
                "Observation frames for replay, by what became of them.",
                &["outcome"]
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
            store_pruned_rows_total: reg!(c(
                "spire_healer_store_pruned_rows_total",
                "Rows deleted from the knowledge store for being older than their retention, by table.",
                &["table"]
            )),
            store_prune_duration_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spire_healer_store_prune_duration_seconds",
                    "Duration of one retention pass over the knowledge store (pauses between batches included)."
                )
                .buckets(ACTION_BUCKETS.to_vec())
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
            server_address_checks_total: reg!(c(
                "spire_healer_server_address_checks_total",
                "TLS handshake checks of a server's agent-facing address from this node, by server and outcome.",
                &["server", "outcome"]
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
            api_tls_handshake_failures_total: reg!(c(
                "spire_healer_api_tls_handshake_failures_total",
                "Failed mTLS handshakes on the API's TCP listener, by reason.",
                &["reason"]
            )),
            api_denied_total: reg!(c(
                "spire_healer_api_denied_total",
                "Calls to the spire_healer.v1 API refused by authorization, by method and reason.",
                &["method", "reason"]
            )),
            api_watch_dropped_total: reg!(prometheus::IntCounter::new(
                "spire_healer_api_watch_dropped_total",
                "Watch streams ended because the client fell behind the server's event ring."
            )),
            k8s_requests_total: reg!(c(
                "spire_healer_k8s_requests_total",
                "Calls to the Kubernetes API, by verb and result code.",
                &["verb", "code"]
            )),
            cert_file_expiration_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_cert_file_expiration_timestamp_seconds",
                    "notAfter (unix time) of the leaf in a watched certificate file."
                ),
                &["file"]
            )),
            build_info: reg!(g(
                "spire_healer_build_info",
                "Always 1; the version label names this build.",
                &["version"]
            )),
            open_incident: reg!(g(
                "spire_healer_open_incident",
                "1 while an incident of this symptom on this target is open, 0 once it closed.",
                &["symptom", "target", "severity"]
            )),
            agent_predicted_outage_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_agent_predicted_outage_timestamp_seconds",
                    "Earliest predicted outage (unix time) among the agent's open incidents; absent when it has none."
                ),
                &["agent"]
            )),
            svid_predicted_outage_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_svid_predicted_outage_timestamp_seconds",
                    "Predicted outage (unix time) of the SVIDs at risk, top-k soonest."
                ),
                &["agent", "spiffe_id"]
            )),
            sensor_blind: reg!(g(
                "spire_healer_sensor_blind",
                "1 when the sensor's view is older than the policy's staleness limit (analysis calls it blind), else 0.",
                &["sensor"]
            )),
            sensor_last_success_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_sensor_last_success_timestamp_seconds",
                    "Unix time by which every instance of the sensor had last refreshed its view; 0 while one never did."
                ),
                &["sensor"]
            )),
            server_up: reg!(g(
                "spire_healer_server_up",
                "1 when the SPIRE server's admin API answered the last poll, else 0.",
                &["server"]
            )),
            bundle_authority_expiration_timestamp_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_bundle_authority_expiration_timestamp_seconds",
                    "Latest notAfter (unix time) of the untainted X.509 authorities in the server's trust bundle: past it, no authority is left."
                ),
                &["server"]
            )),
            incidents_held: reg!(g(
                "spire_healer_incidents_held",
                "Open incidents whose latest decision was to hold back, by reason.",
                &["reason"]
            )),
            paused: reg!(IntGauge::new(
                "spire_healer_paused",
                "1 while an operator has paused the supervisor: no action starts."
            )),
            leader: reg!(g(
                "spire_healer_leader",
                "1 while this instance acts: the sole instance, or the cluster role's leader; 0 while it stands by.",
                &["role"]
            )),
            leader_epoch: reg!(IntGauge::new(
                "spire_healer_leader_epoch",
                "The fencing epoch this cluster instance leads under (0 while standing by or unfenced)."
            )),
            dry_run: reg!(IntGauge::new(
                "spire_healer_dry_run",
                "1 while dry run is on: decisions are recorded, nothing is executed."
            )),
            approvals_pending: reg!(IntGauge::new(
                "spire_healer_approvals_pending",
                "Steps waiting for an operator's approval."
            )),
            demoted_steps: reg!(g(
                "spire_healer_demoted_steps",
                "1 while the (symptom, actuator) ladder step is demoted for verifying too rarely (skipped until an operator resets it), else 0.",
                &["symptom", "actuator"]
            )),
            slo_events_total: reg!(c(
                "spire_healer_slo_events_total",
                "Service-level events of SPIRE by indicator and result: svid_issuance (a new SVID served within [slo] issuance_latency of signing), renewal (an SVID rotated before its rotation point), handshake (an mTLS handshake completed), server_availability (an admin-API poll answered).",
                &["slo", "result"]
            )),
            slo_svid_issuance_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spire_healer_slo_svid_issuance_seconds",
                    "Time from SPIRE signing an SVID (its notBefore + 10 s backdate) to a Workload API stream serving it, for rotations and new entries. Assumes the server's clock agrees with ours (skew adds, or is clamped at 0); notBefore's one-second resolution makes each value up to 1 s high."
                )
                .buckets(ISSUANCE_BUCKETS.to_vec())
            )),
            slo_objective: reg!(GaugeVec::new(
                Opts::new(
                    "spire_healer_slo_objective",
                    "The configured objective of each service-level indicator ([slo]): the share of good events aimed for."
                ),
                &["slo"]
            )),
            slo_issuance_latency_threshold_seconds: reg!(prometheus::Gauge::new(
                "spire_healer_slo_issuance_latency_threshold_seconds",
                "The configured [slo] issuance_latency: an SVID served later than this (plus notBefore's 1 s resolution) after signing is a bad issuance."
            )),
            issuance_threshold_nanos: std::sync::atomic::AtomicU64::new(0),
            exported_svids: std::sync::Mutex::new(Vec::new()),
            exported_incidents: std::sync::Mutex::new(Vec::new()),
            held_reasons: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            collectors,
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.set_slo(&crate::slo::SloConfig::default());
        for sli in crate::slo::Sli::ALL {
            for r in crate::slo::RESULTS {
                m.slo_events_total.with_label_values(&[sli.as_str(), r]);
            }
        }
        m
    }

    /// Exports the objectives of `slo` and judges issuances by its
    /// latency from now on.
    pub fn set_slo(&self, slo: &crate::slo::SloConfig) {
        for sli in crate::slo::Sli::ALL {
            self.slo_objective
                .with_label_values(&[sli.as_str()])
                .set(slo.objective(sli));
        }
        self.slo_issuance_latency_threshold_seconds
            .set(slo.issuance_latency.as_secs_f64());
        let nanos = u64::try_from(slo.issuance_latency.as_nanos()).unwrap_or(u64::MAX);
        self.issuance_threshold_nanos
            .store(nanos, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts `good` and `bad` events of `sli`.
    pub fn slo_events(&self, sli: crate::slo::Sli, good: u64, bad: u64) {
        for (n, r) in [(good, "good"), (bad, "bad")] {
            if n > 0 {
                self.slo_events_total
                    .with_label_values(&[sli.as_str(), r])
                    .inc_by(n);
            }
        }
    }

    /// Counts handshake outcomes as `spire_healer_handshakes_total` and as
    /// handshake service-level events (good when `reason` is `ok`).
    pub fn count_handshakes(
        &self,
        source: crate::handshake::Source,
        reason: crate::handshake::Reason,
        n: u64,
    ) {
        self.handshakes_total
            .with_label_values(&[source.as_str(), reason.as_str()])
            .inc_by(n);
        if reason == crate::handshake::Reason::Ok {
            self.slo_events(crate::slo::Sli::Handshake, n, 0);
        } else {
            self.slo_events(crate::slo::Sli::Handshake, 0, n);
        }
    }

    /// Counts one check of a server's agent-facing address
    /// (`outcome`: `ok` or an [`crate::sensors::server_api::AddressError`]
    /// kind).
    pub fn count_server_address_check(&self, server: &str, outcome: &str) {
        self.server_address_checks_total
            .with_label_values(&[server, outcome])
            .inc();
    }

    /// Observes one SVID issuance of `latency`
    /// ([`crate::slo::issuance_latency`]) and counts it good or bad
    /// against the configured `issuance_latency`.
    pub fn observe_svid_issuance(&self, latency: Duration) {
        self.slo_svid_issuance_seconds
            .observe(latency.as_secs_f64());
        let threshold = Duration::from_nanos(
            self.issuance_threshold_nanos
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let good = crate::slo::issuance_good(latency, threshold);
        self.slo_events(
            crate::slo::Sli::SvidIssuance,
            u64::from(good),
            u64::from(!good),
        );
    }

    /// Every metric this set declares, sorted by name: the source of the
    /// metrics catalogue (`docs/metrics.md`).
    pub fn descriptions(&self) -> Vec<MetricDescription> {
        let mut out: Vec<MetricDescription> = self
            .collectors
            .iter()
            .flat_map(|c| {
                let labels: Vec<String> = c
                    .desc()
                    .first()
                    .map(|d| d.variable_labels.clone())
                    .unwrap_or_default();
                c.collect().into_iter().map(move |mf| MetricDescription {
                    name: mf.name().to_string(),
                    help: mf.help().to_string(),
                    kind: match mf.get_field_type() {
                        MetricType::COUNTER => "counter",
                        MetricType::GAUGE => "gauge",
                        MetricType::HISTOGRAM => "histogram",
                        MetricType::SUMMARY => "summary",
                        MetricType::UNTYPED => "untyped",
                    },
                    labels: labels.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
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
        // Every symptom keeps its series (at 0 when none needs an
        // operator), so `> 0` rules and `sum()` panels always see one.
        for k in crate::model::SymptomKind::ALL {
            let n = g.needs_operator.get(k.as_str()).copied().unwrap_or(0);
            self.incidents_needing_operator
                .with_label_values(&[k.as_str()])
                .set(n);
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
        self.set_open_incidents(&g.open_incidents);
        self.agent_predicted_outage_timestamp_seconds.reset();
        for (agent, at) in &g.agent_outages {
            self.agent_predicted_outage_timestamp_seconds
                .with_label_values(&[agent])
                .set(unix_secs_f64(*at));
        }
        let mut svids: Vec<_> = g.svid_outages.iter().collect();
        svids.sort_by_key(|(agent, id, at)| (*at, agent, id));
        self.svid_predicted_outage_timestamp_seconds.reset();
        for (agent, id, at) in svids.into_iter().take(OUTAGE_TOP_K) {
            self.svid_predicted_outage_timestamp_seconds
                .with_label_values(&[agent, id])
                .set(unix_secs_f64(*at));
        }
        for s in &g.sensors {
            self.sensor_blind
                .with_label_values(&[s.sensor])
                .set(i64::from(s.blind));
            self.sensor_last_success_timestamp_seconds
                .with_label_values(&[s.sensor])
                .set(s.last_success.map_or(0.0, unix_secs_f64));
        }
        self.bundle_authority_expiration_timestamp_seconds.reset();
        for (server, up, bundle_expiry) in &g.servers {
            self.server_up
                .with_label_values(&[server])
                .set(i64::from(*up));
            if let Some(at) = bundle_expiry {
                self.bundle_authority_expiration_timestamp_seconds
                    .with_label_values(&[server])
                    .set(unix_secs_f64(*at));
            }
        }
        {
            // Reasons outside `HoldReason` (actuator preconditions, a
            // static set in code) keep their series at 0 once seen, like
            // the closed set does from the start.
            let mut reasons = self.held_reasons.lock().unwrap_or_else(|p| p.into_inner());
            reasons.extend(crate::plan::HoldReason::ALL.map(|r| r.as_str()));
            reasons.extend(g.held.keys());
            for reason in reasons.iter() {
                let n = g.held.get(reason).copied().unwrap_or(0);
                self.incidents_held.with_label_values(&[reason]).set(n);
            }
        }
        self.last_tick_timestamp_seconds.set(now_s);
    }

    /// Sets `open_incident` to 1 for `open` and to 0 for every series set
    /// before and no longer open.
    fn set_open_incidents(&self, open: &[OpenIncidentLabels]) {
        let sorted;
        let open = if open.is_sorted() {
            open
        } else {
            let mut v = open.to_vec();
            v.sort_unstable();
            v.dedup();
            sorted = v;
            &sorted[..]
        };
        let mut last = self
            .exported_incidents
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Steady state: the same incidents as last tick, nothing to do.
        if last.as_slice() == open {
            return;
        }
        // Both sorted: one merge walk sets what closed to 0, what opened to 1.
        let set = |(k, t, s): &OpenIncidentLabels, v| {
            self.open_incident
                .with_label_values(&[*k, t.as_str(), *s])
                .set(v);
        };
        let (mut old, mut new) = (last.iter().peekable(), open.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (Some(o), Some(n)) if o == n => {
                    old.next();
                    new.next();
                }
                (Some(o), Some(n)) if o < n => {
                    set(o, 0);
                    old.next();
                }
                (_, Some(n)) => {
                    set(n, 1);
                    new.next();
                }
                (Some(o), None) => {
                    set(o, 0);
                    old.next();
                }
                (None, None) => break,
            }
        }
        *last = open.to_vec();
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
            r#"spire_healer_incidents_needing_operator{symptom="stale_cert_file"}"#,
            r#"spire_healer_actions_total{actuator="restart-agent",outcome="ok"}"#,
            r#"spire_healer_action_duration_seconds_count{actuator="restart-agent"}"#,
            r#"spire_healer_verifications_total{actuator="restart-agent",result="failed"}"#,
            r#"spire_healer_holds_total{reason="needs_operator"}"#,
            r#"spire_healer_incidents_held{reason="circuit_open"}"#,
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
    fn build_info_names_the_version() {
        let text = Metrics::new().render();
        let series = format!(
            r#"spire_healer_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &series), Some(1.0));
    }

    #[test]
    fn the_tick_sets_incidents_outages_sensors_servers_and_holds() {
        let m = Metrics::new();
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let tick = |g: Gauges<'static>| {
            m.record_tick(
                at(10),
                &TickSummary {
                    gauges: Some(g),
                    ..TickSummary::default()
                },
            );
            m.render()
        };
        let text = tick(Gauges {
            open_incidents: vec![
                ("agent_banned", "node-a".into(), "critical"),
                ("ca_expiring", "td".into(), "warning"),
            ],
            agent_outages: vec![("node-a".into(), at(900))],
            svid_outages: (0..15)
                .map(|i| {
                    (
                        "node-a".to_string(),
                        format!("spiffe://td/w{i}"),
                        at(100 + i),
                    )
                })
                .collect(),
            sensors: vec![SensorFreshness {
                sensor: "server_api",
                last_success: Some(at(3)),
                blind: true,
            }],
            servers: vec![("s1", true, Some(at(5000))), ("s2", false, None)],
            held: BTreeMap::from([("no_server_reachable", 2), ("not_an_svid", 1)]),
            needs_operator: BTreeMap::from([("agent_banned", 1)]),
            ..Gauges::default()
        });
        for (series, want) in [
            (
                r#"spire_healer_open_incident{severity="critical",symptom="agent_banned",target="node-a"}"#,
                Some(1.0),
            ),
            (
                r#"spire_healer_agent_predicted_outage_timestamp_seconds{agent="node-a"}"#,
                Some(900.0),
            ),
            (
                r#"spire_healer_svid_predicted_outage_timestamp_seconds{agent="node-a",spiffe_id="spiffe://td/w9"}"#,
                Some(109.0),
            ),
            (
                r#"spire_healer_svid_predicted_outage_timestamp_seconds{agent="node-a",spiffe_id="spiffe://td/w10"}"#,
                None,
            ),
            (
                r#"spire_healer_sensor_blind{sensor="server_api"}"#,
                Some(1.0),
            ),
            (
                r#"spire_healer_sensor_last_success_timestamp_seconds{sensor="server_api"}"#,
                Some(3.0),
            ),
            (r#"spire_healer_server_up{server="s1"}"#, Some(1.0)),
            (r#"spire_healer_server_up{server="s2"}"#, Some(0.0)),
            (
                r#"spire_healer_bundle_authority_expiration_timestamp_seconds{server="s1"}"#,
                Some(5000.0),
            ),
            (
                r#"spire_healer_bundle_authority_expiration_timestamp_seconds{server="s2"}"#,
                None,
            ),
            (
                r#"spire_healer_incidents_held{reason="no_server_reachable"}"#,
                Some(2.0),
            ),
            (
                r#"spire_healer_incidents_held{reason="not_an_svid"}"#,
                Some(1.0),
            ),
            (r#"spire_healer_incidents_held{reason="budget"}"#, Some(0.0)),
            (
                r#"spire_healer_incidents_needing_operator{symptom="agent_banned"}"#,
                Some(1.0),
            ),
            (
                r#"spire_healer_incidents_needing_operator{symptom="ca_expiring"}"#,
                Some(0.0),
            ),
        ] {
            assert_eq!(sample(&text, series), want, "{series}");
        }
        let svids = text
            .lines()
            .filter(|l| l.starts_with("spire_healer_svid_predicted_outage_timestamp_seconds{"))
            .count();
        assert_eq!(svids, OUTAGE_TOP_K);

        // Everything closed: incident series stay at 0, outages go, a
        // precondition reason seen once stays at 0.
        let text = tick(Gauges::default());
        for (series, want) in [
            (
                r#"spire_healer_open_incident{severity="critical",symptom="agent_banned",target="node-a"}"#,
                Some(0.0),
            ),
            (
                r#"spire_healer_open_incident{severity="warning",symptom="ca_expiring",target="td"}"#,
                Some(0.0),
            ),
            (
                r#"spire_healer_agent_predicted_outage_timestamp_seconds{agent="node-a"}"#,
                None,
            ),
            (
                r#"spire_healer_incidents_held{reason="not_an_svid"}"#,
                Some(0.0),
            ),
            (
                r#"spire_healer_incidents_needing_operator{symptom="agent_banned"}"#,
                Some(0.0),
            ),
        ] {
            assert_eq!(sample(&text, series), want, "{series}");
        }
        assert!(!text.contains("spire_healer_svid_predicted_outage_timestamp_seconds{"));
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
