//! Monitor: one reading from every sensor per tick. A sensor that fails
//! this time contributes its last good readings: their `updated_at` ages,
//! so they go blind by themselves instead of vanishing (a vanished view
//! would look like a healthy fleet).

use tracing::warn;

use crate::model::{Observations, Reading};
use crate::sensors::Sensor;
use crate::telemetry::Metrics;

/// The sensors and their last good readings.
pub(super) struct Sensing {
    sensors: Vec<Box<dyn Sensor>>,
    /// By sensor position.
    last: Vec<Vec<Reading>>,
}

impl Sensing {
    pub(super) fn new(sensors: Vec<Box<dyn Sensor>>) -> Self {
        let last = sensors.iter().map(|_| Vec::new()).collect();
        Self { sensors, last }
    }

    /// Everything sensed now, by kind; each sensor timed and its errors
    /// counted.
    pub(super) async fn sense(&mut self, metrics: &Metrics) -> Observations {
        let mut obs = Observations::default();
        // Reading a sensor is a copy of what its task last published; the
        // task times its own polls (`sensors::timed`).
        for (s, last) in self.sensors.iter().zip(self.last.iter_mut()) {
            match s.observe().await {
                Ok(readings) => *last = readings,
                Err(e) => {
                    metrics.error("sensor", e.kind());
                    warn!(sensor = s.name(), instance = s.instance(), error = %e, "Sensor failed.");
                }
            }
            for r in last.iter() {
                obs.push(r.clone());
            }
        }
        obs
    }
}
