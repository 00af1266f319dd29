//! `health` sensor: polls the HTTP `health_checks` listener (`/live`,
//! `/ready`) of one SPIRE agent or server.
//!
//! SPIRE answers 200 when every subsystem is live (ready) and 500
//! otherwise, and re-checks only every 60 s once healthy, so a result can be
//! up to a minute stale (spiffe/spire `pkg/common/health/health.go`). Here
//! 200 reads as `true`, any other status as `false`, and an endpoint that
//! does not answer (refused, timeout, garbage) as `None` with the error
//! class in `last_error`.
//!
//! # What an agent's `/ready` means
//!
//! **An agent's `/ready` does NOT mean "connected to a server".** The agent
//! check (spiffe/spire `pkg/agent/agent.go`, `CheckHealth`) only calls
//! `FetchX509Bundles` on the agent's own Workload API socket and fails only
//! on `Unavailable`. It says the agent's Workload API answers, nothing about
//! server connectivity or SVID freshness (spiffe/spire#1562: "Health checks
//! still pass in this state"). Analysis must never treat an agent's
//! `ready: Some(true)` as connectivity; use the Debug API's
//! `last_sync_success` or the sync metrics instead.
//!
//! A server's checks (bundle read, test signing, CA rotation, datastore)
//! do include the datastore, so a database outage fails its `/live` too.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::http_client::{self, HttpError, Options};
use crate::model::{HealthView, Reading, Role};
use crate::telemetry::Metrics;

/// Body cap for health answers: SPIRE's JSON details are a few hundred bytes.
pub const HEALTH_MAX_BODY: usize = 64 * 1024;

/// Settings for one process's health sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Configured agent or server name.
    pub target: String,
    /// Agent or server.
    pub role: Role,
    /// `http://host:port/live`; `None` skips the probe (`live` stays `None`).
    pub live_url: Option<String>,
    /// `http://host:port/ready`; `None` skips the probe (`ready` stays
    /// `None`). For an agent this is "Workload API answers", not server
    /// connectivity (see the module docs).
    pub ready_url: Option<String>,
    /// Poll period.
    pub interval: Duration,
    /// Deadline of one probe (each of the two).
    pub timeout: Duration,
}

impl Settings {
    /// Settings probing `<base_url>/live` and `<base_url>/ready`, SPIRE's
    /// default paths.
    pub fn from_base_url(
        target: impl Into<String>,
        role: Role,
        base_url: &str,
        interval: Duration,
        timeout: Duration,
    ) -> Self {
        let base = base_url.trim_end_matches('/');
        Self {
            target: target.into(),
            role,
            live_url: Some(format!("{base}/live")),
            ready_url: Some(format!("{base}/ready")),
            interval,
            timeout,
        }
    }
}

/// The sensor half: returns the latest published view.
pub type HealthSensor = super::Snapshot<HealthView>;

/// The background task half: probes every `interval`.
pub struct HealthTask {
    settings: Settings,
    view: watch::Sender<Arc<HealthView>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
}

/// Builds the sensor and its task. Until the first probe, `live` and
/// `ready` are `None` with no error. `wake` is notified when `live`,
/// `ready` or the error class changes.
pub fn build(
    settings: Settings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (HealthSensor, HealthTask) {
    let (tx, rx) = watch::channel(Arc::new(HealthView {
        target: settings.target.clone(),
        role: settings.role,
        live: None,
        ready: None,
        last_error: None,
        updated_at: clock.now(),
    }));
    (
        super::Snapshot::new("health", settings.target.clone(), rx, Reading::Health),
        HealthTask {
            settings,
            view: tx,
            clock,
            metrics,
            wake,
        },
    )
}

impl HealthTask {
    fn send_view(&self, view: HealthView) {
        self.view.send_replace(Arc::new(view));
    }

    /// Probes immediately, then every `interval`, until `shutdown`.
    ///
    /// # Cancel safety
    /// Holds nothing but HTTP connections; dropping it closes them.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut cadence = super::Cadence::new(self.settings.interval);
        while cadence.next(&shutdown).await {
            let both = async {
                tokio::join!(
                    self.probe(self.settings.live_url.as_deref()),
                    self.probe(self.settings.ready_url.as_deref()),
                )
            };
            let Some((live, ready)) = super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "health", both),
            )
            .await
            else {
                return;
            };
            self.publish(live, ready);
        }
    }

    /// One probe: `Ok(None)` when not configured, `Ok(Some(status == 200))`
    /// when it answered.
    async fn probe(&self, url: Option<&str>) -> Result<Option<bool>, HttpError> {
        let Some(url) = url else {
            return Ok(None);
        };
        let opts = Options::new(self.settings.timeout).max_body(HEALTH_MAX_BODY);
        let resp = http_client::get(url, &opts).await?;
        Ok(Some(resp.status == 200))
    }

    fn publish(
        &self,
        live: Result<Option<bool>, HttpError>,
        ready: Result<Option<bool>, HttpError>,
    ) {
        let now = self.clock.now();
        let target = &self.settings.target;
        let previous = self.view.borrow().clone();
        let mut last_error = None;
        let mut read = |probe: &'static str, r: Result<Option<bool>, HttpError>| match r {
            Ok(v) => v,
            Err(error) => {
                let kind = error.kind();
                self.metrics.error("sensor", kind);
                if previous.last_error.as_deref() != Some(kind) {
                    warn!(target_name = %target, probe, kind, %error, "Health probe failed.");
                }
                last_error.get_or_insert(kind);
                None
            }
        };
        let live = read("live", live);
        let ready = read("ready", ready);
        let view = HealthView {
            target: target.clone(),
            role: self.settings.role,
            live,
            ready,
            last_error: last_error.map(str::to_string),
            updated_at: now,
        };
        let changed = previous.live != view.live
            || previous.ready != view.ready
            || previous.last_error != view.last_error;
        if changed {
            info!(
                target_name = %target,
                live = ?view.live,
                ready = ?view.ready,
                error = ?view.last_error,
                "Health changed."
            );
        }
        self.send_view(view);
        if changed {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
