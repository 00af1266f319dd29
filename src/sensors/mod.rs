//! Monitor: sensors produce [`Reading`]s. A sensor is read-only and its
//! `observe` is cancel-safe; long-lived connections live in a background task
//! per sensor (see [`workload_api`]), and `observe` returns its latest view.

pub mod agent_debug;
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
