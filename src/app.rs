//! Wiring: from a validated config to running tasks (store, sensors,
//! actuators, supervisor loop, HTTP). Used by `run`, `demo` and tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span};

use crate::actuators;
use crate::clock::Clock;
use crate::config::Resolved;
use crate::knowledge::{self, Buffer, Store, StoreError};
use crate::sensors::Sensor;
use crate::sensors::workload_api::{self, Settings};
use crate::supervisor::{Parts, Peers, Supervisor};
use crate::telemetry::{self, Health, Metrics};

/// Handles to a started supervisor.
pub struct Running {
    /// The store (for reading history).
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health.
    pub health: Arc<Health>,
    /// Bound HTTP address, when HTTP is enabled.
    pub http_addr: Option<SocketAddr>,
}

/// Errors while starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The knowledge store could not be opened.
    #[error("cannot open the knowledge store: {0}")]
    Store(#[from] StoreError),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The API socket could not be set up.
    #[error("cannot serve the API: {0}")]
    Api(#[from] crate::api::ApiError),
}

/// Opens the store, spawns sensor tasks, the supervisor loop and the HTTP
/// server on `tasks`; all stop when `shutdown` is cancelled.
///
/// # Errors
/// The store cannot be opened, or the HTTP address or API socket cannot be
/// bound.
pub async fn start(
    resolved: &Resolved,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<Running, StartError> {
    let cfg = &resolved.config;
    let store = knowledge::open(resolved.database_url.expose_secret()).await?;
    info!(backend = store.backend(), "Knowledge store open.");
    let since = clock
        .now()
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or(clock.now());
    let knowledge = store.load_knowledge(since).await?;

    let health = Arc::new(Health::new(
        cfg.supervisor.tick_interval * 5 + Duration::from_secs(5),
    ));
    let wake = Arc::new(Notify::new());
    let mut sensors: Vec<Box<dyn Sensor>> = Vec::new();
    let mut streams = HashMap::new();
    for (agent, endpoint) in cfg.agents.iter().zip(&resolved.endpoints) {
        let (sensor, task, shared) = workload_api::build(
            Settings {
                agent: agent.name.clone(),
                endpoint: endpoint.clone(),
                answer_timeout: agent.answer_timeout,
                backoff_max: agent.backoff_max,
            },
            clock.clone(),
            metrics.clone(),
            wake.clone(),
        );
        let span = info_span!("sensor", sensor = "workload_api", agent = %agent.name);
        tasks.spawn(task.run(shutdown.child_token()).instrument(span));
        sensors.push(Box::new(sensor));
        streams.insert(agent.name.clone(), shared);
    }
    let topo = Arc::new(actuators::spire::Topology {
        servers: cfg
            .servers
            .iter()
            .map(|s| (s.name.clone(), s.admin_socket.clone(), s.address.clone()))
            .collect(),
        agents: cfg
            .agents
            .iter()
            .zip(&resolved.endpoints)
            .map(|(a, e)| {
                (
                    a.name.clone(),
                    actuators::spire::AgentInfo {
                        config_file: a.config_file.clone(),
                        node_alias: a.node_alias.clone(),
                        data_dir: a.data_dir.clone(),
                        endpoint: Some(e.clone()),
                    },
                )
            })
            .collect(),
    });
    spawn_control_plane_sensors(
        cfg,
        &streams,
        &clock,
        &metrics,
        &wake,
        &shutdown,
        tasks,
        &mut sensors,
    );
    let handshakes = crate::handshake::Counter::default();
    let probes = spawn_handshake_sensors(
        cfg,
        &streams,
        &handshakes,
        (&clock, &metrics, &wake),
        &shutdown,
        tasks,
        &mut sensors,
    );
    let registry = actuators::registry(&cfg.actuators, topo, streams);
    if let Some(api_cfg) = &cfg.api {
        let (bound, fut) = crate::api::serve(
            api_cfg,
            handshakes.clone(),
            metrics.clone(),
            shutdown.child_token(),
        )?;
        info!(socket = %bound.socket.display(), "Serving the spire_healer.v1 API.");
        tasks.spawn(async move {
            if let Err(e) = fut.await {
                error!(error = %e, "API server failed.");
            }
        });
    }

    let http_addr = match cfg.http.enabled.then_some(cfg.http.listen) {
        Some(addr) => {
            let router = telemetry::router(metrics.clone(), health.clone(), clock.clone());
            let (bound, fut) = telemetry::serve_http(addr, router, shutdown.child_token())
                .await
                .map_err(|source| StartError::Http { addr, source })?;
            tasks.spawn(
                async move {
                    if let Err(e) = fut.await {
                        error!(error = %e, "HTTP server failed.");
                    }
                }
                .instrument(info_span!("http")),
            );
            info!(addr = %bound, "Serving /metrics, /healthz, /readyz.");
            Some(bound)
        }
        None => None,
    };

    let supervisor = Supervisor::new(
        Parts {
            clock,
            sensors,
            actuators: registry,
            policy: resolved.policy.clone(),
            dry_run: cfg.supervisor.dry_run,
            buffer: Buffer::new(store.clone(), cfg.database.buffer_capacity),
            metrics: metrics.clone(),
            health: health.clone(),
            wake,
            tick_interval: cfg.supervisor.tick_interval,
            handshakes,
            peers: Peers::new(probes, []),
        },
        knowledge,
    );
    tasks.spawn(
        supervisor
            .run(shutdown.child_token())
            .instrument(info_span!("supervisor")),
    );
    Ok(Running {
        store,
        metrics,
        health,
        http_addr,
    })
}

/// Active mTLS probes (each presenting the SVID of the agent it names),
/// certificate files and Envoy TLS counters, all adding to `handshakes`.
/// Returns the probe handles by target.
fn spawn_handshake_sensors(
    cfg: &crate::config::Config,
    streams: &HashMap<String, Arc<workload_api::Shared>>,
    handshakes: &crate::handshake::Counter,
    (clock, metrics, wake): (&Arc<dyn Clock>, &Arc<Metrics>, &Arc<Notify>),
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    sensors: &mut Vec<Box<dyn Sensor>>,
) -> HashMap<String, Arc<crate::sensors::handshake_probe::ProbeHandle>> {
    use crate::sensors::handshake_probe;
    let mut handles = HashMap::new();
    for p in &cfg.probes {
        // Validated: the settings parse and the agent is configured.
        let (Ok(settings), Some(identity)) = (p.settings(), streams.get(&p.agent)) else {
            error!(probe = %p.name, "Probe not started: invalid settings or agent.");
            continue;
        };
        let (sensor, task, handle) = handshake_probe::build(
            settings,
            identity.clone(),
            handshakes.clone(),
            clock.clone(),
            metrics.clone(),
            wake.clone(),
        );
        let span = info_span!("sensor", sensor = "handshake_probe", target = %p.name);
        tasks.spawn(task.run(shutdown.child_token()).instrument(span));
        sensors.push(Box::new(sensor));
        handles.insert(p.name.clone(), handle);
    }
    for f in &cfg.cert_files {
        let (sensor, task) = crate::sensors::cert_files::build(
            f.clone(),
            clock.clone(),
            metrics.clone(),
            wake.clone(),
        );
        let span = info_span!("sensor", sensor = "cert_files", target = %f.name);
        tasks.spawn(task.run(shutdown.child_token()).instrument(span));
        sensors.push(Box::new(sensor));
    }
    for e in &cfg.envoys {
        use crate::sensors::metrics_scrape;
        let st = metrics_scrape::Settings::new(
            &e.name,
            crate::model::Role::Envoy,
            &e.metrics_url,
            e.poll_interval,
            e.timeout,
        );
        let (sensor, task) =
            metrics_scrape::build(st, clock.clone(), metrics.clone(), wake.clone());
        let span = info_span!("sensor", sensor = "metrics_scrape", target = %e.name);
        tasks.spawn(
            task.with_handshakes(handshakes.clone())
                .run(shutdown.child_token())
                .instrument(span),
        );
        sensors.push(Box::new(sensor));
    }
    handles
}

/// Admin API, health and metrics sensors for every configured server and
/// agent that names an admin socket or URL. A server's admin API over TCP
/// presents the SVID of the agent stream in `streams` it names.
#[allow(clippy::too_many_arguments)]
fn spawn_control_plane_sensors(
    cfg: &crate::config::Config,
    streams: &HashMap<String, Arc<workload_api::Shared>>,
    clock: &Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
    wake: &Arc<Notify>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    sensors: &mut Vec<Box<dyn Sensor>>,
) {
    use crate::model::Role;
    use crate::sensors::{agent_debug, health, metrics_scrape, server_api};
    let c = || (clock.clone(), metrics.clone(), wake.clone());
    macro_rules! spawn {
        ($module:ident, $settings:expr, $sensor:literal, $target:expr) => {{
            let (clock, metrics, wake) = c();
            let (sensor, task) = $module::build($settings, clock, metrics, wake);
            let span = info_span!("sensor", sensor = $sensor, target = %$target);
            tasks.spawn(task.run(shutdown.child_token()).instrument(span));
            sensors.push(Box::new(sensor));
        }};
    }
    for s in &cfg.servers {
        if let Some(sock) = &s.admin_socket {
            let mut st = server_api::Settings::new(&s.name, sock);
            st.poll_interval = s.poll_interval;
            st.timeout = s.timeout;
            spawn!(server_api, st, "server_api", s.name);
        } else if let (Some(addr), Some(via)) = (&s.admin_address, &s.admin_via_agent) {
            // Validated: an IP:port and a configured agent.
            let identity = streams.get(via).cloned();
            let client = addr.parse().ok().zip(identity).map(|(addr, identity)| {
                crate::spire_api::ServerAdminClient::tcp_mtls(
                    addr,
                    s.admin_server_id.as_deref(),
                    identity,
                    s.timeout,
                )
            });
            match client {
                Some(Ok(client)) => {
                    let mut st = server_api::Settings::new(&s.name, "");
                    st.poll_interval = s.poll_interval;
                    st.timeout = s.timeout;
                    let (clock, metrics, wake) = c();
                    let (sensor, task) = server_api::build(st, clock, metrics, wake);
                    let span = info_span!("sensor", sensor = "server_api", target = %s.name);
                    tasks.spawn(
                        task.with_client(client)
                            .run(shutdown.child_token())
                            .instrument(span),
                    );
                    sensors.push(Box::new(sensor));
                }
                Some(Err(e)) => {
                    error!(server = %s.name, error = %e, "Server admin API over TCP not started.")
                }
                None => {
                    error!(server = %s.name, "Server admin API over TCP not started: invalid address or agent.")
                }
            }
        }
        if let Some(url) = &s.health_url {
            let st = health::Settings::from_base_url(
                &s.name,
                Role::Server,
                url,
                s.poll_interval,
                s.timeout,
            );
            spawn!(health, st, "health", s.name);
        }
        if let Some(url) = &s.metrics_url {
            let st = metrics_scrape::Settings::new(
                &s.name,
                Role::Server,
                url,
                s.poll_interval,
                s.timeout,
            );
            spawn!(metrics_scrape, st, "metrics_scrape", s.name);
        }
    }
    for a in &cfg.agents {
        let timeout = a.poll_interval.max(Duration::from_secs(1));
        if let Some(sock) = &a.admin_socket {
            let mut st = agent_debug::Settings::new(&a.name, sock);
            st.poll_interval = a.poll_interval;
            st.timeout = timeout;
            spawn!(agent_debug, st, "agent_debug", a.name);
        }
        if let Some(url) = &a.health_url {
            let st = health::Settings::from_base_url(
                &a.name,
                Role::Agent,
                url,
                a.poll_interval,
                timeout,
            );
            spawn!(health, st, "health", a.name);
        }
        if let Some(url) = &a.metrics_url {
            let st =
                metrics_scrape::Settings::new(&a.name, Role::Agent, url, a.poll_interval, timeout);
            spawn!(metrics_scrape, st, "metrics_scrape", a.name);
        }
    }
}
