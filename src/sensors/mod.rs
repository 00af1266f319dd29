//! Monitor: sensors produce [`Reading`]s. A sensor is read-only and its
//! `observe` is cancel-safe; long-lived connections live in a background task
//! per sensor (see [`workload_api`]), and `observe` returns its latest view.
//!
//! Which sensors run is derived from the configuration as one
//! [`SensorSpec`] per instance; [`SensorContext::spawn_all`] starts them.
//! Adding a sensor: a file here with its settings, `build` and task; one
//! [`SensorSpec`] variant with its arm in [`SensorSpec::spawn`] and in
//! `Resolved::sensors`; one line in the reading table of [`crate::model`].

pub mod agent_debug;
pub mod bootstrap_bundle;
pub mod cert_files;
pub mod entry_lookups;
pub mod envoy_tls;
pub mod handshake_probe;
pub mod health;
pub mod metrics_scrape;
pub mod server_api;
pub mod workload_api;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, error, info_span};

use crate::clock::Clock;
use crate::handshake::Counter;
use crate::model::Reading;
use crate::telemetry::Metrics;

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
    /// Whether its task has published a view of its own yet (not just the
    /// placeholder it starts with): the loop judges nothing before every
    /// sensor has (bounded, see `Supervisor::tick`).
    fn has_reported(&self) -> bool {
        true
    }
}

// === Sensors from the configuration ===

/// One sensor instance, as the configuration asks for it (derived by
/// `Resolved::sensors`, in the order the sensors are started and observed).
#[derive(Debug, Clone)]
pub enum SensorSpec {
    /// An agent's Workload API stream. Its shared state is our identity
    /// for the sensors that present that agent's SVID, and the handle of the
    /// refetch actuator.
    WorkloadApi(workload_api::Settings),
    /// A server's admin API over its local socket.
    ServerApi(server_api::Settings),
    /// A server's admin API over TCP with mTLS, presenting the X509-SVID of
    /// the agent `via_agent` (`settings.admin_socket` is unused).
    ServerApiTcp {
        /// Cadence, timeout and paging.
        settings: server_api::Settings,
        /// `IP:port` of the server's TCP port.
        address: String,
        /// The SPIFFE ID required of the server, if not the default.
        server_id: Option<String>,
        /// The `[[agents]]` entry whose SVID we present.
        via_agent: String,
    },
    /// An agent's Debug API over its admin socket.
    AgentDebug(agent_debug::Settings),
    /// A SPIRE process's `/live` and `/ready`.
    Health(health::Settings),
    /// A SPIRE process's or an Envoy's Prometheus endpoint; an Envoy's TLS
    /// counters become handshake outcomes.
    MetricsScrape(metrics_scrape::Settings),
    /// An active mTLS probe presenting the SVID of the agent it names.
    HandshakeProbe(handshake_probe::ProbeConfig),
    /// A certificate file on disk.
    CertFile(cert_files::CertFileConfig),
    /// An agent's bootstrap bundle file (`trust_bundle_path`).
    BootstrapBundle(bootstrap_bundle::Settings),
}

/// What every sensor task is given, and what sensors share.
#[derive(Clone)]
pub struct SensorContext {
    /// Stamps every view (`updated_at`).
    pub clock: Arc<dyn Clock>,
    /// Each sensor records its own metrics.
    pub metrics: Arc<Metrics>,
    /// Notified when a view changes in a way worth an early tick.
    pub wake: Arc<Notify>,
    /// Every sensor task stops when this is cancelled (each gets a child).
    pub shutdown: CancellationToken,
    /// Where the sensor tasks are spawned.
    pub tasks: TaskTracker,
    /// Handshake outcomes, added to by probes and Envoy scrapes.
    pub handshakes: Counter,
    /// Entries to look up for identities agents refuse us: asked for by
    /// Workload API sensors, answered by server sensors.
    pub lookups: Arc<entry_lookups::EntryLookups>,
}

/// The started sensors, and the handles others need from them.
#[derive(Default)]
pub struct Sensors {
    /// For the supervisor's Monitor step, in spec order.
    pub sensors: Vec<Box<dyn Sensor>>,
    /// Workload API state by agent name.
    pub streams: HashMap<String, Arc<workload_api::Shared>>,
    /// Probe-now handles by probe name.
    pub probes: HashMap<String, Arc<handshake_probe::ProbeHandle>>,
}

impl SensorContext {
    /// Starts every spec in order. A spec that presents an agent's SVID
    /// must come after that agent's [`SensorSpec::WorkloadApi`].
    pub fn spawn_all(&self, specs: impl IntoIterator<Item = SensorSpec>) -> Sensors {
        let mut out = Sensors::default();
        for spec in specs {
            spec.spawn(self, &mut out);
        }
        out
    }

    /// Spawns a sensor's background task in `span` and files the sensor.
    fn start(
        &self,
        out: &mut Sensors,
        sensor: impl Sensor + 'static,
        task: impl Future<Output = ()> + Send + 'static,
        span: Span,
    ) {
        self.tasks.spawn(task.instrument(span));
        out.sensors.push(Box::new(sensor));
    }
}

impl SensorSpec {
    /// Builds the sensor, spawns its task on `cx.tasks` and files it (and
    /// its handles) in `out`. A spec whose agent has no Workload API
    /// sensor in `out`, or whose settings do not hold, is logged and
    /// skipped (validation rules both out).
    pub fn spawn(self, cx: &SensorContext, out: &mut Sensors) {
        let (clock, metrics, wake) = (cx.clock.clone(), cx.metrics.clone(), cx.wake.clone());
        let stop = cx.shutdown.child_token();
        match self {
            SensorSpec::WorkloadApi(settings) => {
                let agent = settings.agent.clone();
                let (sensor, task, shared) = workload_api::build(settings, clock, metrics, wake);
                let span = info_span!("sensor", sensor = "workload_api", agent = %agent);
                let task = task.with_lookups(cx.lookups.clone());
                cx.start(out, sensor, task.run(stop), span);
                out.streams.insert(agent, shared);
            }
            SensorSpec::ServerApi(settings) => {
                let span =
                    info_span!("sensor", sensor = "server_api", target_name = %settings.server);
                let (sensor, task) = server_api::build(settings, clock, metrics, wake);
                let task = task.with_lookups(cx.lookups.clone());
                cx.start(out, sensor, task.run(stop), span);
            }
            SensorSpec::ServerApiTcp {
                settings,
                address,
                server_id,
                via_agent,
            } => {
                let identity = out.streams.get(&via_agent).cloned();
                let client = address.parse().ok().zip(identity).map(|(addr, identity)| {
                    crate::spire_api::ServerAdminClient::tcp_mtls(
                        addr,
                        server_id.as_deref(),
                        identity,
                        settings.timeout,
                    )
                });
                let server = settings.server.clone();
                match client {
                    Some(Ok(client)) => {
                        let span =
                            info_span!("sensor", sensor = "server_api", target_name = %server);
                        let (sensor, task) = server_api::build(settings, clock, metrics, wake);
                        let task = task.with_client(client).with_lookups(cx.lookups.clone());
                        cx.start(out, sensor, task.run(stop), span);
                    }
                    Some(Err(e)) => {
                        error!(server = %server, error = %e, "Server admin API over TCP not started.")
                    }
                    None => {
                        error!(server = %server, "Server admin API over TCP not started: invalid address or agent.")
                    }
                }
            }
            SensorSpec::AgentDebug(settings) => {
                let span =
                    info_span!("sensor", sensor = "agent_debug", target_name = %settings.agent);
                let (sensor, task) = agent_debug::build(settings, clock, metrics, wake);
                cx.start(out, sensor, task.run(stop), span);
            }
            SensorSpec::Health(settings) => {
                let span = info_span!("sensor", sensor = "health", target_name = %settings.target);
                let (sensor, task) = health::build(settings, clock, metrics, wake);
                cx.start(out, sensor, task.run(stop), span);
            }
            SensorSpec::MetricsScrape(settings) => {
                let span =
                    info_span!("sensor", sensor = "metrics_scrape", target_name = %settings.target);
                let (sensor, task) = metrics_scrape::build(settings, clock, metrics, wake);
                // Only an Envoy's counters are handshake outcomes.
                let task = task.with_handshakes(cx.handshakes.clone());
                cx.start(out, sensor, task.run(stop), span);
            }
            SensorSpec::HandshakeProbe(probe) => {
                let (Ok(settings), Some(identity)) =
                    (probe.settings(), out.streams.get(&probe.agent))
                else {
                    error!(probe = %probe.name, "Probe not started: invalid settings or agent.");
                    return;
                };
                let (sensor, task, handle) = handshake_probe::build(
                    settings,
                    identity.clone(),
                    cx.handshakes.clone(),
                    clock,
                    metrics,
                    wake,
                );
                let span =
                    info_span!("sensor", sensor = "handshake_probe", target_name = %probe.name);
                cx.start(out, sensor, task.run(stop), span);
                out.probes.insert(probe.name, handle);
            }
            SensorSpec::CertFile(file) => {
                let span = info_span!("sensor", sensor = "cert_files", target_name = %file.name);
                let (sensor, task) = cert_files::build(file, clock, metrics, wake);
                cx.start(out, sensor, task.run(stop), span);
            }
            SensorSpec::BootstrapBundle(settings) => {
                let span = info_span!("sensor", sensor = "bootstrap_bundle", target_name = %settings.agent);
                let (sensor, task) = bootstrap_bundle::build(settings, clock, metrics, wake);
                cx.start(out, sensor, task.run(stop), span);
            }
        }
    }
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
    fn has_reported(&self) -> bool {
        // Views are read with `borrow`, which never marks them seen: the
        // receiver has "changed" from the first publication on. A task
        // that ended has nothing more to say.
        self.view.has_changed().unwrap_or(true)
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
/// Runs one poll of `sensor` and times it into
/// `spire_healer_sensor_duration_seconds`: the real work (calls, reads),
/// not the loop's read of the published view.
pub(crate) async fn timed<T>(
    metrics: Arc<Metrics>,
    sensor: &'static str,
    poll: impl Future<Output = T>,
) -> T {
    let timer = metrics
        .sensor_duration_seconds
        .with_label_values(&[sensor])
        .start_timer();
    let out = poll.await;
    timer.observe_duration();
    out
}

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

/// Waits until the view a sensor task publishes satisfies `done`, checking
/// the current view first; a test that never gets there fails after `wait`
/// with the last view, rather than hanging.
#[cfg(test)]
pub(crate) async fn wait_for_view<V: std::fmt::Debug>(
    mut view: tokio::sync::watch::Receiver<Arc<V>>,
    what: &str,
    wait: std::time::Duration,
    done: impl Fn(&V) -> bool,
) -> Arc<V> {
    let reached = tokio::time::timeout(wait, view.wait_for(|v| done(v)))
        .await
        .map(|r| r.map(|v| Arc::clone(&v)));
    match reached {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!(
            "{what}: the sensor task stopped; last view: {:#?}",
            view.borrow()
        ),
        Err(_) => panic!(
            "{what}: not reached within {wait:?}; last view: {:#?}",
            view.borrow()
        ),
    }
}

/// Keeps paused tokio time from auto-advancing while a test waits for real
/// I/O (a poll over a socket): tokio does not auto-advance while a blocking
/// task runs, so time moves only by `tokio::time::advance`. Lets go when
/// dropped, or after `wait` of real time, so that a stuck test fails on its
/// own timeouts rather than hanging.
#[cfg(test)]
pub(crate) struct HoldTime {
    _release: std::sync::mpsc::Sender<()>,
}

#[cfg(test)]
impl HoldTime {
    pub(crate) fn new(wait: std::time::Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = rx.recv_timeout(wait);
        });
        Self { _release: tx }
    }
}
