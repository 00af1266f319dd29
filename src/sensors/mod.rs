//! Monitor: sensors produce [`Reading`]s. A sensor is read-only and its
//! `observe` is cancel-safe; long-lived connections live in a background task
//! per sensor (see [`workload_api`]), and `observe` returns its latest view.

pub mod agent_debug;
pub mod cert_files;
pub mod envoy_tls;
pub mod handshake_probe;
pub mod health;
pub mod metrics_scrape;
pub mod server_api;
pub mod workload_api;

use async_trait::async_trait;

use crate::model::Reading;

/// Errors at the sensor boundary.
#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    /// The sensor's background task is not running.
    #[error("sensor task for {0} is not running")]
    NotRunning(String),
}

impl SensorError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            SensorError::NotRunning(_) => "not_running",
        }
    }
}

/// A source of readings.
#[async_trait]
pub trait Sensor: Send + Sync {
    /// Stable snake_case id: metric label.
    fn name(&self) -> &'static str;
    /// The instance (agent) this sensor watches.
    fn instance(&self) -> &str;
    /// One reading. Read-only and cancel-safe.
    async fn observe(&self) -> Result<Vec<Reading>, SensorError>;
}

/// The sensor half of a polling sensor: reads the snapshot its background
/// task publishes over a `watch` channel. Cheap to observe: a pointer copy.
pub struct Snapshot<V> {
    name: &'static str,
    instance: String,
    view: tokio::sync::watch::Receiver<std::sync::Arc<V>>,
    wrap: fn(std::sync::Arc<V>) -> Reading,
}

impl<V> Snapshot<V> {
    /// A sensor named `name` (metric label) for `instance`, wrapping each
    /// snapshot into a reading with `wrap`.
    pub fn new(
        name: &'static str,
        instance: String,
        view: tokio::sync::watch::Receiver<std::sync::Arc<V>>,
        wrap: fn(std::sync::Arc<V>) -> Reading,
    ) -> Self {
        Self {
            name,
            instance,
            view,
            wrap,
        }
    }

    /// The current view.
    pub fn view(&self) -> std::sync::Arc<V> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every published view.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<std::sync::Arc<V>> {
        self.view.clone()
    }
}

#[async_trait]
impl<V: Send + Sync + 'static> Sensor for Snapshot<V> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    async fn observe(&self) -> Result<Vec<Reading>, SensorError> {
        Ok(vec![(self.wrap)(self.view())])
    }
}

/// The cadence of a polling sensor task: the first poll at once, then one
/// every `period`; a poll that overruns delays the next one and never
/// overlaps it.
pub(crate) struct Cadence {
    tick: tokio::time::Interval,
}

impl Cadence {
    /// Every `period` (clamped to at least 1 ms).
    pub(crate) fn new(period: std::time::Duration) -> Self {
        let mut tick = tokio::time::interval(period.max(std::time::Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { tick }
    }

    /// Waits for the next poll; `false` once `shutdown` is cancelled.
    pub(crate) async fn next(&mut self, shutdown: &tokio_util::sync::CancellationToken) -> bool {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = self.tick.tick() => true,
        }
    }
}

/// Runs `poll` unless `shutdown` comes first (then the poll is abandoned).
pub(crate) async fn until_shutdown<T>(
    shutdown: &tokio_util::sync::CancellationToken,
    poll: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = poll => Some(r),
    }
}
