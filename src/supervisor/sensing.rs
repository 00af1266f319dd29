//! Monitor: one reading from every sensor per tick. A sensor that fails
//! this time contributes its last good readings: their `updated_at` ages,
//! so they go blind by themselves instead of vanishing (a vanished view
//! would look like a healthy fleet).

use std::collections::BTreeMap;
use std::time::SystemTime;

use tracing::warn;

use crate::clock::saturating_since;
use crate::model::{Observations, Reading};
use crate::policy::Thresholds;
use crate::sensors::Sensor;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::SensorFreshness;

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

    /// Every sensor has published a reading of its own.
    pub(super) fn all_reported(&self) -> bool {
        self.sensors.iter().all(|s| s.has_reported())
    }

    /// `name/instance` of the sensors with no reading of their own yet.
    pub(super) fn silent(&self) -> Vec<String> {
        self.sensors
            .iter()
            .filter(|s| !s.has_reported())
            .map(|s| format!("{}/{}", s.name(), s.instance()))
            .collect()
    }

    /// Per sensor name, how fresh its view is at `now`: the oldest of its
    /// instances' last refreshes, blind when older than the staleness
    /// limit analysis applies to its readings (`probe_max_staleness` for
    /// probes and certificate files, `max_staleness` for the rest). An
    /// instance with no readings yet makes the time unknown, not blind.
    pub(super) fn freshness(&self, th: &Thresholds, now: SystemTime) -> Vec<SensorFreshness> {
        // Per name: each instance's last refresh, and whether one is blind.
        let mut by_name: BTreeMap<&'static str, (Vec<Option<SystemTime>>, bool)> = BTreeMap::new();
        for (s, last) in self.sensors.iter().zip(&self.last) {
            let newest = last.iter().map(refreshed).max_by_key(|(at, _)| *at);
            let entry = by_name.entry(s.name()).or_default();
            if let Some((at, probe)) = newest {
                let limit = if probe {
                    th.probe_max_staleness
                } else {
                    th.max_staleness
                };
                entry.1 |= saturating_since(now, at) > limit;
            }
            entry.0.push(newest.map(|(at, _)| at));
        }
        by_name
            .into_iter()
            .map(|(sensor, (instances, blind))| SensorFreshness {
                sensor,
                last_success: instances.into_iter().min().flatten(),
                blind,
            })
            .collect()
    }
}

/// When a reading's view was last refreshed, and whether the probe
/// staleness limit applies to it.
fn refreshed(r: &Reading) -> (SystemTime, bool) {
    match r {
        Reading::WorkloadApi(v) => (v.updated_at, false),
        Reading::Server(v) => (v.updated_at, false),
        Reading::AgentDebug(v) => (v.updated_at, false),
        Reading::Health(v) => (v.updated_at, false),
        Reading::Metrics(v) => (v.updated_at, false),
        Reading::Probe(v) => (v.updated_at, true),
        Reading::CertFile(v) => (v.updated_at, true),
        Reading::BootstrapBundle(v) => (v.updated_at, false),
    }
}
