//! `metrics_scrape` sensor: scrapes one Prometheus endpoint of a SPIRE agent
//! or server (or an Envoy) and keeps the few series spire-healer reads.
//!
//! A background task GETs `url` every `interval` (plain HTTP, body capped),
//! parses the text exposition with our own parser ([`parse`]), keeps the
//! samples whose name starts with one of `keep`, and publishes an
//! `Arc<MetricsView>`. A failed scrape (unreachable, non-200, unparsable)
//! publishes `reachable: false` with **no samples**: analysis must never
//! compute rates from stale counters, so absent data reads as unknown.
//!
//! SPIRE naming (go-metrics): counters have no `_total` suffix; a call
//! counter `<key>{status="<gRPC code>"}` comes with a summary
//! `<key>_elapsed_time`; every series carries a `host` label. The helpers
//! ([`counter_sum`], [`sync_failures`], …) encode those conventions.
//!
//! For an Envoy target ([`Role::Envoy`]) the task can also feed handshake
//! outcomes: given a [`Counter`] ([`MetricsScrapeTask::with_handshakes`]),
//! it turns the TLS counters of each successful scrape into deltas
//! ([`EnvoyTls`]) and adds them with [`Source::Envoy`].

mod text;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use text::{ParseError, parse, parse_bytes, parse_filtered};

use super::envoy_tls::{DEFAULT_MAX_SERIES, ENVOY_KEEP, EnvoyTls};
use crate::clock::Clock;
use crate::handshake::{Counter, Source};
use crate::http_client::{self, DEFAULT_MAX_BODY, Options};
use crate::model::{MetricsView, Reading, Role, Sample, SyncCounters};
use crate::telemetry::Metrics;

/// `Accept` header: the text format, which is all we parse.
const ACCEPT: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

/// Bodies above this are parsed on the blocking pool, not on the runtime.
const INLINE_PARSE_MAX: usize = 256 * 1024;

/// Agent series kept by default (name prefixes).
pub const AGENT_KEEP: &[&str] = &[
    "spire_agent_manager_sync_fetch_entries_updates",
    "spire_agent_agent_svid_rotate",
    "spire_agent_node_attest",
    "spire_agent_started",
    "spire_agent_uptime_in_ms",
    "spire_agent_workload_api_connections",
    "spire_agent_bootstrapped",
];

/// Server series kept by default (name prefixes).
pub const SERVER_KEEP: &[&str] = &[
    "spire_server_ca_manager_",
    "spire_server_manager_x509_ca_rotate_expiration",
    "spire_server_svid_rotate",
    "spire_server_rpc_agent_v1_agent_renew_agent",
    "spire_server_datastore_",
    "spire_server_uptime_in_ms",
];

/// The default `keep` list for `role`.
pub fn default_keep(role: Role) -> Vec<String> {
    let keep = match role {
        Role::Agent => AGENT_KEEP,
        Role::Server => SERVER_KEEP,
        Role::Envoy => ENVOY_KEEP,
    };
    keep.iter().map(|s| (*s).to_string()).collect()
}

/// Settings for one endpoint's sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Configured agent or server name.
    pub target: String,
    /// Agent or server.
    pub role: Role,
    /// `http://host:port/metrics`.
    pub url: String,
    /// Scrape period.
    pub interval: Duration,
    /// Deadline of one scrape (connect, headers, body).
    pub timeout: Duration,
    /// Metric name prefixes to keep (a trailing `*` is allowed and means
    /// the same). Empty keeps every sample: only sensible for small
    /// endpoints.
    pub keep: Vec<String>,
    /// Largest body accepted, in bytes.
    pub max_body: usize,
}

impl Settings {
    /// Settings with the role's [`default_keep`] list and
    /// [`DEFAULT_MAX_BODY`].
    pub fn new(
        target: impl Into<String>,
        role: Role,
        url: impl Into<String>,
        interval: Duration,
        timeout: Duration,
    ) -> Self {
        Self {
            target: target.into(),
            role,
            url: url.into(),
            interval,
            timeout,
            keep: default_keep(role),
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// Whether `name` matches one of the `keep` prefixes (empty keeps all).
pub fn keeps(keep: &[String], name: &str) -> bool {
    keep.is_empty()
        || keep
            .iter()
            .any(|p| name.starts_with(p.strip_suffix('*').unwrap_or(p)))
}

// === Helpers for analysis ===

/// A predicate over a sample's (sorted) labels.
pub type LabelFilter<'a> = dyn Fn(&[(String, String)]) -> bool + 'a;

/// Sum of the samples named exactly `name` whose labels pass
/// `label_filter`.
///
/// `None` when no sample has that name at all (metric absent: unknown);
/// `Some(0.0)` when the metric is present but no series passes the filter
/// (e.g. no failed syncs yet; go-metrics only creates a series on first use).
pub fn counter_sum(samples: &[Sample], name: &str, label_filter: &LabelFilter<'_>) -> Option<f64> {
    let mut seen = false;
    let mut sum = 0.0;
    for s in samples.iter().filter(|s| s.name == name) {
        seen = true;
        if label_filter(&s.labels) {
            sum += s.value;
        }
    }
    seen.then_some(sum)
}

/// The value of label `key` in `labels`, if present.
pub fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The first sample named exactly `name` (a gauge, typically).
pub fn gauge(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

/// Agent: failed entry/bundle syncs with a server since the agent started,
/// `sum(spire_agent_manager_sync_fetch_entries_updates{status!="OK"})`.
/// A rising value means server sync is failing (spiffe/spire
/// `pkg/agent/manager/sync.go`, `fetchEntries`).
pub fn sync_failures(samples: &[Sample]) -> Option<f64> {
    status_sum(
        samples,
        "spire_agent_manager_sync_fetch_entries_updates",
        false,
    )
}

/// Agent: successful syncs,
/// `sum(spire_agent_manager_sync_fetch_entries_updates{status="OK"})`.
pub fn sync_successes(samples: &[Sample]) -> Option<f64> {
    status_sum(
        samples,
        "spire_agent_manager_sync_fetch_entries_updates",
        true,
    )
}

/// Agent: its sync counters after a scrape at `at` read `samples`, given
/// what the previous scrapes read (`prev`).
///
/// `None` while the agent has counted no sync (the metric is absent: it
/// has just started). The latest successful sync is "seen" at the first
/// scrape whose OK count is higher than the previous one's, or after a
/// restart (uptime dropped), or when the OK series reappears with a lower
/// count (go-metrics' Prometheus sink drops a series left unchanged for a
/// while and starts it again at the next increment). An OK series gone
/// while failures are still counted (`0`) is such an expiry: nothing
/// succeeded, so the count read before is kept.
pub fn track_sync(
    prev: Option<&SyncCounters>,
    samples: &[Sample],
    at: SystemTime,
) -> Option<SyncCounters> {
    let ok = sync_successes(samples)?;
    let failed = sync_failures(samples).unwrap_or(0.0);
    let uptime_ms = gauge(samples, "spire_agent_uptime_in_ms");
    let fresh = SyncCounters {
        ok,
        failed,
        failed_at_ok: failed,
        ok_seen_at: at,
        read_at: at,
        uptime_ms,
    };
    let Some(p) = prev else {
        return Some(fresh);
    };
    let restarted = matches!((p.uptime_ms, uptime_ms), (Some(before), Some(now)) if now < before);
    if restarted || ok > p.ok || (ok > 0.0 && ok < p.ok) {
        return Some(fresh);
    }
    Some(SyncCounters {
        ok: p.ok,
        failed,
        failed_at_ok: p.failed_at_ok.min(failed),
        ok_seen_at: p.ok_seen_at,
        read_at: at,
        uptime_ms: uptime_ms.or(p.uptime_ms),
    })
}

/// Agent: failed renewals of the agent's own SVID,
/// `sum(spire_agent_agent_svid_rotate{status!="OK"})`.
pub fn agent_svid_rotate_failures(samples: &[Sample]) -> Option<f64> {
    status_sum(samples, "spire_agent_agent_svid_rotate", false)
}

/// Server: failed datastore calls, `sum(spire_server_datastore_*{status!="OK"})`
/// over the call counters (not their `_elapsed_time` summaries). `None`
/// when no datastore counter is present.
pub fn datastore_failures(samples: &[Sample]) -> Option<f64> {
    let mut seen = false;
    let mut sum = 0.0;
    for s in samples.iter().filter(|s| {
        s.name.starts_with("spire_server_datastore_") && label(&s.labels, "status").is_some()
    }) {
        seen = true;
        if label(&s.labels, "status") != Some("OK") {
            sum += s.value;
        }
    }
    seen.then_some(sum)
}

/// Server: expiry of the active X.509 CA
/// (`spire_server_manager_x509_ca_rotate_expiration`, unix seconds); the
/// earliest when several trust domains report.
pub fn x509_ca_expiration(samples: &[Sample]) -> Option<SystemTime> {
    samples
        .iter()
        .filter(|s| s.name == "spire_server_manager_x509_ca_rotate_expiration")
        .filter(|s| s.value.is_finite() && s.value >= 0.0)
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s.value.min(1e12)))
        .min()
}

/// Agent or server uptime (`spire_{agent,server}_uptime_in_ms`); `None`
/// for Envoy, whose uptime is not scraped.
pub fn uptime(samples: &[Sample], role: Role) -> Option<Duration> {
    let name = match role {
        Role::Agent => "spire_agent_uptime_in_ms",
        Role::Server => "spire_server_uptime_in_ms",
        Role::Envoy => return None,
    };
    gauge(samples, name)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms.min(1e15) / 1000.0))
}

fn status_sum(samples: &[Sample], name: &str, ok: bool) -> Option<f64> {
    counter_sum(samples, name, &|labels| {
        (label(labels, "status") == Some("OK")) == ok
    })
}

// === Sensor ===

/// The sensor half: returns the latest published view.
pub type MetricsScrapeSensor = super::Snapshot<MetricsView>;

/// The background task half: scrapes every `interval`.
pub struct MetricsScrapeTask {
    settings: Settings,
    view: watch::Sender<Arc<MetricsView>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    /// Envoy only: the converter and where its outcomes go.
    handshakes: Option<(EnvoyTls, Counter)>,
}

/// Builds the sensor and its task. Until the first scrape the view is
/// unreachable with no error and no samples. `wake` is notified when
/// reachability or the error class changes.
pub fn build(
    settings: Settings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (MetricsScrapeSensor, MetricsScrapeTask) {
    let (tx, rx) = watch::channel(Arc::new(MetricsView {
        target: settings.target.clone(),
        role: settings.role,
        reachable: false,
        last_error: None,
        updated_at: clock.now(),
        samples: Vec::new(),
        sync: None,
    }));
    (
        super::Snapshot::new(
            "metrics_scrape",
            settings.target.clone(),
            rx,
            Reading::Metrics,
        ),
        MetricsScrapeTask {
            settings,
            view: tx,
            clock,
            metrics,
            wake,
            handshakes: None,
        },
    )
}

/// Why a scrape failed: an [`HttpError`](http_client::HttpError) kind,
/// `http_status` or `parse`.
#[derive(Debug, thiserror::Error)]
enum ScrapeError {
    #[error(transparent)]
    Http(#[from] http_client::HttpError),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("parser task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl ScrapeError {
    fn kind(&self) -> &'static str {
        match self {
            ScrapeError::Http(e) => e.kind(),
            ScrapeError::Status(_) => "http_status",
            ScrapeError::Parse(e) => e.kind(),
            ScrapeError::Task(_) => "internal",
        }
    }
}

impl MetricsScrapeTask {
    /// For an Envoy target: after each successful scrape, add the TLS
    /// handshake outcomes since the previous one to `counter` (source
    /// `envoy`, target `<name>/listener/<address>` or
    /// `<name>/cluster/<cluster>`) and to `spire_healer_handshakes_total`.
    /// The first successful scrape only sets the baseline. Ignored for
    /// agents and servers.
    #[must_use]
    pub fn with_handshakes(mut self, counter: Counter) -> Self {
        if self.settings.role == Role::Envoy {
            let converter = EnvoyTls::new(self.settings.target.clone(), DEFAULT_MAX_SERIES);
            self.handshakes = Some((converter, counter));
        }
        self
    }

    fn send_view(&self, view: MetricsView) {
        self.view.send_replace(Arc::new(view));
    }

    /// Scrapes immediately, then every `interval`, until `shutdown`.
    ///
    /// # Cancel safety
    /// Holds nothing but an HTTP connection; dropping it closes the socket.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut cadence = super::Cadence::new(self.settings.interval);
        while cadence.next(&shutdown).await {
            let Some(result) = super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "metrics_scrape", self.scrape()),
            )
            .await
            else {
                return;
            };
            if let Ok(samples) = &result {
                self.count_handshakes(samples);
            }
            self.publish(result);
        }
    }

    /// Envoy: adds the outcomes since the previous scrape.
    fn count_handshakes(&mut self, samples: &[Sample]) {
        let Some((converter, counter)) = &mut self.handshakes else {
            return;
        };
        let dropped = converter.dropped();
        let deltas = converter.deltas(samples);
        if converter.dropped() > dropped {
            self.metrics
                .handshake_reports_rejected_total
                .with_label_values(&["too_many_series"])
                .inc_by(converter.dropped() - dropped);
        }
        for (target, reason, n) in deltas {
            match counter.add(&target, reason, n, Source::Envoy) {
                Ok(()) => self.metrics.count_handshakes(Source::Envoy, reason, n),
                Err(refused) => self
                    .metrics
                    .handshake_reports_rejected_total
                    .with_label_values(&[refused.kind()])
                    .inc(),
            }
        }
    }

    /// One scrape, parsed and filtered.
    async fn scrape(&self) -> Result<Vec<Sample>, ScrapeError> {
        let opts = Options::new(self.settings.timeout)
            .max_body(self.settings.max_body)
            .accept(ACCEPT);
        let resp = http_client::get(&self.settings.url, &opts).await?;
        if resp.status != 200 {
            return Err(ScrapeError::Status(resp.status));
        }
        let keep = self.settings.keep.clone();
        let filter = move |body: &[u8]| parse_bytes(body, &|name| keeps(&keep, name));
        if resp.body.len() <= INLINE_PARSE_MAX {
            return Ok(filter(&resp.body)?);
        }
        let body = resp.body;
        // Awaited right here, so the blocking task cannot outlive the scrape
        // by more than one parse. A join error means a parser panic, which
        // the fuzzer says cannot happen.
        match tokio::task::spawn_blocking(move || filter(&body)).await {
            Ok(parsed) => Ok(parsed?),
            Err(e) => Err(ScrapeError::Task(e)),
        }
    }

    fn publish(&self, result: Result<Vec<Sample>, ScrapeError>) {
        let now = self.clock.now();
        let previous = self.view.borrow().clone();
        let target = &self.settings.target;
        let (reachable, last_error, samples) = match result {
            Ok(samples) => {
                if !previous.reachable {
                    info!(target_name = %target, samples = samples.len(), "Metrics endpoint scraped.");
                } else {
                    debug!(target_name = %target, samples = samples.len(), "Metrics endpoint scraped.");
                }
                (true, None, samples)
            }
            Err(error) => {
                let kind = error.kind();
                self.metrics.error("sensor", kind);
                if previous.last_error.as_deref() != Some(kind) {
                    warn!(target_name = %target, kind, %error, "Metrics scrape failed.");
                } else {
                    debug!(target_name = %target, kind, %error, "Metrics scrape failed.");
                }
                (false, Some(kind.to_string()), Vec::new())
            }
        };
        let changed = previous.reachable != reachable || previous.last_error != last_error;
        let sync = match (self.settings.role, reachable) {
            (Role::Agent, true) => track_sync(previous.sync.as_ref(), &samples, now),
            _ => previous.sync,
        };
        self.send_view(MetricsView {
            target: target.clone(),
            role: self.settings.role,
            reachable,
            last_error,
            updated_at: now,
            samples,
            sync,
        });
        if changed {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
