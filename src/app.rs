//! Wiring: from a validated config to running tasks (store, sensors,
//! actuators, supervisor loop, HTTP). Used by `run`, `demo` and tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::actuators;
use crate::clock::Clock;
use crate::config::Resolved;
use crate::control::Controls;
use crate::knowledge::scope_lock::{self, ScopeLock};
use crate::knowledge::{self, Buffer, Store, StoreError};
use crate::sensors::entry_lookups::EntryLookups;
use crate::sensors::{SensorContext, Sensors};
use crate::supervisor::{Operator, Parts, Supervisor, Targets};
use crate::telemetry::{self, Health, Metrics};

/// Handles to a started supervisor.
pub struct Running {
    /// The store (for reading history).
    pub store: Arc<dyn Store>,
    /// Every metric, as `/metrics` renders them.
    pub metrics: Arc<Metrics>,
    /// Liveness and readiness, as `/healthz` and `/readyz` answer.
    pub health: Arc<Health>,
    /// Bound HTTP address, when HTTP is enabled.
    pub http_addr: Option<SocketAddr>,
    /// Bound address of the API's mTLS listener, when `[api.tcp]` is set.
    pub api_tcp_addr: Option<SocketAddr>,
    /// The scope this instance acts on, held until the last clone drops
    /// (the watch task lets go of its clone at shutdown).
    pub lock: Arc<tokio::sync::Mutex<ScopeLock>>,
    /// Sends a reloaded policy to the loop (SIGHUP).
    pub policy: tokio::sync::watch::Sender<crate::policy::Policy>,
    /// Actions cut short at shutdown (their grace elapsed).
    pub interrupted: Arc<std::sync::atomic::AtomicUsize>,
    /// The scope lock was lost (its database session dropped) and the
    /// daemon stopped for it: the process exits 69 so a supervisor such as
    /// systemd restarts it.
    pub lock_lost: Arc<std::sync::atomic::AtomicBool>,
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
    /// The API's mTLS listener could not start.
    #[error("API over TCP")]
    ApiTcp(#[from] crate::api::tcp::TcpError),
    /// The local spool could not be opened or emptied.
    #[error("cannot use the spool: {0}")]
    Spool(#[from] knowledge::SpoolError),
    /// Campaigning for the cluster role's leadership cannot work.
    #[error("cannot campaign for leadership: {0}")]
    Leadership(#[from] crate::leadership::LeadershipError),
}

/// Opens the spool at `path` (locked: one process at a time) and lands
/// what a previous run left in it; a torn last record (a crash
/// mid-append) is cut off, logged and counted.
///
/// # Errors
/// The spool is held by another process (`StoreError::InUse`), cannot be
/// opened or emptied, or the store refused the replay (the spool then
/// keeps everything for the next start).
async fn replay_spool(
    path: &std::path::Path,
    max_bytes: u64,
    store: &dyn knowledge::Store,
    metrics: &Metrics,
) -> Result<knowledge::Spool, StartError> {
    let (spool, replayed) = match knowledge::open_and_replay(path, max_bytes, store).await {
        Ok(done) => done,
        Err(knowledge::ReplayError::Spool(e @ knowledge::SpoolError::Held { .. })) => {
            return Err(StoreError::InUse(e.to_string()).into());
        }
        Err(knowledge::ReplayError::Spool(e)) => return Err(e.into()),
        Err(knowledge::ReplayError::Store(e)) => return Err(e.into()),
    };
    if replayed.discarded_bytes > 0 {
        metrics.error("spool", "torn");
        warn!(
            spool = %path.display(),
            bytes = replayed.discarded_bytes,
            "The spool ended in a torn or corrupt record (a crash while writing it); that record was cut off."
        );
    }
    if replayed.events > 0 {
        metrics
            .store_replayed_events_total
            .inc_by(replayed.events as u64);
        info!(events = replayed.events, spool = %path.display(), "Replayed the spool into the knowledge store.");
    }
    Ok(spool)
}

/// How often the store is probed when nothing needs writing.
const STORE_HEARTBEAT: Duration = Duration::from_secs(5);
/// How often a leader renews its leadership.
fn leadership_renew(cfg: &crate::config::Config) -> Duration {
    cfg.leadership
        .as_ref()
        .map_or(Duration::from_secs(5), |l| l.renew_every)
}

/// How often the scope lock's database session is checked.
const LOCK_CHECK: Duration = Duration::from_secs(10);

/// Opens the store, takes this instance's scope (see
/// [`scope_lock`]), spawns sensor tasks, the supervisor loop and the HTTP
/// server on `tasks`; all stop when `shutdown` is cancelled.
///
/// # Errors
/// The store cannot be opened, another instance holds the scope
/// (`StoreError::InUse`), or the HTTP address or API socket cannot be
/// bound.
pub async fn start(
    resolved: &Resolved,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<Running, StartError> {
    let cfg = &resolved.config;
    let url = resolved.database_url.expose_secret();
    let (store, frames) = knowledge::frames::open(url).await?;
    info!(backend = store.backend(), "Knowledge store open.");
    // One actor per scope: refuse to start when another instance acts on
    // this store (SQLite) or on one of our agents (PostgreSQL).
    let agents: Vec<String> = cfg.agents.iter().map(|a| a.name.clone()).collect();
    let health = Arc::new(Health::new(
        cfg.supervisor.tick_interval * 5 + Duration::from_secs(5),
    ));
    // HTTP first: a cluster instance standing by is live, ready and
    // scraped (`spire_healer_leader` 0) while it waits.
    let leadership = crate::leadership::of(cfg, url);
    health.set_standby(leadership.is_some());
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

    let holder = scope_lock::Holder::this_process(clock.now());
    // One actor per scope: refuse to start when another instance acts on
    // this store (SQLite) or on one of our agents (PostgreSQL); the
    // cluster role campaigns instead, and every write of its leader is
    // fenced by its epoch.
    let (lock, leader) = match &leadership {
        Some(lcfg) => {
            metrics
                .leader
                .with_label_values(&[cfg.role.as_str()])
                .set(0);
            let kube = match lcfg.backend {
                crate::leadership::Backend::Lease => {
                    Some(crate::leadership::kube_client(cfg).await?)
                }
                crate::leadership::Backend::Postgres => None,
            };
            let leader =
                crate::leadership::campaign(lcfg, url, store.clone(), kube, &holder, &shutdown)
                    .await?;
            store.set_fence(Some(leader.fence.clone()));
            metrics.leader_epoch.set(leader.fence.epoch);
            health.set_standby(false);
            (ScopeLock::nothing(), Some(leader))
        }
        None => (scope_lock::acquire(url, &agents, &holder).await?, None),
    };
    metrics
        .leader
        .with_label_values(&[cfg.role.as_str()])
        .set(1);
    let lock = Arc::new(tokio::sync::Mutex::new(lock));
    // What a previous run could not write lands first, so the loop's
    // memory (cooldowns, budget, open incidents) is read from all of it.
    // A leader keeps no spool: it acts only on what the store took under
    // its epoch, so nothing of its could be replayed later by a
    // former leader.
    let spool = match (&resolved.spool, &leader) {
        (Some(path), None) => {
            Some(replay_spool(path, cfg.database.spool_max_bytes, &*store, &metrics).await?)
        }
        _ => None,
    };
    let since = clock
        .now()
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or(clock.now());
    let knowledge = store.load_knowledge(since).await?;

    let wake = Arc::new(Notify::new());
    // Pause and dry run as last recorded (an operator's change outlives a
    // restart), live approvals and demotions.
    let operator = Operator::new(Controls::resume(
        cfg.supervisor.dry_run,
        &knowledge.controls,
        &knowledge.approvals,
        &knowledge.demotions,
        wake.clone(),
    ));
    if let Some(p) = operator.controls.paused() {
        warn!(by = %p.by, reason = p.reason.as_deref().unwrap_or(""), "Paused by an operator: no action starts until `spire-healer resume`.");
    }
    let handshakes = crate::handshake::Counter::default();
    let sensor_cx = SensorContext {
        clock: clock.clone(),
        metrics: metrics.clone(),
        wake: wake.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        handshakes: handshakes.clone(),
        lookups: Arc::new(EntryLookups::with_aliases(
            cfg.agents
                .iter()
                .filter_map(|a| Some((a.name.clone(), a.node_alias.clone()?)))
                .collect(),
        )),
    };
    let Sensors {
        sensors,
        streams,
        probes,
    } = sensor_cx.spawn_all(resolved.sensors());
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
    let kube = cfg
        .kubernetes
        .clone()
        .map(|k| Arc::new(crate::k8s::Kube::new(k, metrics.clone(), clock.clone())));
    let registry = actuators::registry(&cfg.actuators, topo, streams.clone(), kube);
    let mut actuator_names: Vec<String> = registry.keys().cloned().collect();
    actuator_names.sort();
    metrics.init_series(&actuator_names, &agents);
    metrics.set_slo(&cfg.slo);
    let mut api_tcp_addr = None;
    if let Some(api_cfg) = &cfg.api {
        // The API reads and changes what the loop uses: one set of
        // controls, one event hub, one status.
        let backend = crate::api::Backend {
            store: store.clone(),
            controls: operator.controls.clone(),
            hub: operator.hub.clone(),
            status: operator.status.subscribe(),
            clock: clock.clone(),
            leader_epoch: leader.as_ref().map(|l| l.fence.epoch),
        };
        let svc = crate::api::service(
            api_cfg,
            handshakes.clone(),
            backend,
            metrics.clone(),
            shutdown.child_token(),
        );
        let (bound, fut) = crate::api::serve_service(api_cfg, svc.clone(), shutdown.child_token())?;
        info!(socket = %bound.socket.display(), "Serving the spire_healer.v1 API.");
        tasks.spawn(async move {
            if let Err(e) = fut.await {
                error!(error = %e, "API server failed.");
            }
        });
        if let Some(tcp) = &api_cfg.tcp {
            let addr = crate::api::tcp::start(
                tcp,
                tonic::service::Routes::new(svc),
                metrics.clone(),
                shutdown.child_token(),
                tasks,
            )?;
            info!(%addr, "Serving the spire_healer.v1 API over mTLS.");
            api_tcp_addr = Some(addr);
        }
    }

    let (policy_tx, policy_rx) = tokio::sync::watch::channel(resolved.policy.clone());
    let interrupted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Old rows (`[database.retention]`) and replay frames (`[replay]
    // retention`) are pruned in batches by one task, also when recording
    // is off.
    tasks.spawn(
        knowledge::retention::Pruner::new(&frames)
            .run(
                cfg.database.retention.clone(),
                cfg.replay.retention,
                knowledge::retention::PRUNE_EVERY,
                clock.clone(),
                metrics.clone(),
                shutdown.child_token(),
            )
            .instrument(info_span!("retention")),
    );
    // Replay: observation frames around incidents, written off the loop.
    let recorder = cfg.replay.enabled.then(|| {
        let (recorder, writer) =
            crate::replay::FrameRecorder::new(&cfg.replay, &operator.hub.run_id, metrics.clone());
        tasks.spawn(
            writer
                .run(frames.clone(), shutdown.child_token())
                .instrument(info_span!("replay_frames")),
        );
        recorder
    });
    let supervisor = Supervisor::new(
        Parts {
            clock,
            sensors,
            actuators: registry,
            policy: resolved.policy.clone(),
            operator: operator.clone(),
            buffer: {
                let buffer = Buffer::new(store.clone(), cfg.database.buffer_capacity);
                match spool {
                    Some(spool) => buffer.with_spool(spool),
                    None => buffer,
                }
            },
            metrics: metrics.clone(),
            health: health.clone(),
            wake,
            tick_interval: cfg.supervisor.tick_interval,
            handshakes,
            targets: Targets::new(
                cfg.agents.iter().map(|a| a.name.clone()),
                // Configured Kubernetes workloads are peers actions may
                // target, probed or not.
                cfg.kubernetes
                    .iter()
                    .flat_map(|k| k.workloads.iter().map(|w| w.name.clone())),
                probes,
            )
            .with_streams(streams)
            // Workloads selecting the same pods are one blast-radius group.
            .with_peer_groups(
                cfg.kubernetes
                    .iter()
                    .flat_map(|k| k.workloads.iter())
                    .map(|w| {
                        (
                            w.name.clone(),
                            format!("k8s:{}/{}", w.namespace, w.selector),
                        )
                    })
                    .collect(),
            )
            .with_server_groups(
                cfg.agents
                    .iter()
                    .filter_map(|a| Some((a.name.clone(), a.config_file.clone()?)))
                    .collect(),
                cfg.servers
                    .iter()
                    .filter_map(|s| Some((s.name.clone(), s.address.clone()?)))
                    .collect(),
            ),
        },
        knowledge,
    )
    .with_policy_updates(policy_rx)
    // Three quarters of the grace for running actions: the rest is for
    // recording what was cut short and flushing.
    .with_shutdown_grace(crate::supervisor::ShutdownGrace {
        grace: cfg.supervisor.shutdown_grace * 3 / 4,
        interrupted: interrupted.clone(),
    });
    let supervisor = match recorder {
        Some(r) => supervisor.with_frame_recorder(r),
        None => supervisor,
    };
    // A leader launches a step only once the store took its ActionStarted
    // under the leader's epoch.
    let supervisor = if leader.is_some() {
        supervisor.fenced()
    } else {
        supervisor
    };
    // The store is probed even when nothing needs writing.
    tasks.spawn(
        crate::supervisor::store_heartbeat(
            store.clone(),
            supervisor.store_health(),
            metrics.clone(),
            STORE_HEARTBEAT,
            shutdown.child_token(),
        )
        .instrument(info_span!("store_heartbeat")),
    );
    // The loop holds the scope until it has drained; a watcher stops the
    // daemon if the lock is lost (its database session dropped), since
    // another instance may act from then on.
    let held = lock.clone();
    let stop = shutdown.child_token();
    tasks.spawn(
        async move {
            supervisor.run(stop).await;
            drop(held);
        }
        .instrument(info_span!("supervisor")),
    );
    let watched = Arc::downgrade(&lock);
    let watch_stop = shutdown.clone();
    let lock_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lost = lock_lost.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = watch_stop.cancelled() => return,
                _ = tokio::time::sleep(LOCK_CHECK) => {}
            }
            let Some(lock) = watched.upgrade() else {
                return;
            };
            let mut lock = lock.lock().await;
            if !lock.alive().await {
                scope_lock::lost(lock.kind());
                lost.store(true, std::sync::atomic::Ordering::SeqCst);
                watch_stop.cancel();
                return;
            }
        }
    });
    if let Some(mut leader) = leader {
        let (stop, lost, every) = (shutdown.clone(), lock_lost.clone(), leadership_renew(cfg));
        let (store, metrics, role) = (store.clone(), metrics.clone(), cfg.role.as_str());
        tasks.spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            crate::leadership::release(leader).await;
                            return;
                        }
                        _ = tokio::time::sleep(every) => {}
                    }
                    if !leader.renew().await {
                        // Stop acting at once: nothing the loop still
                        // records passes the fence, and the daemon exits.
                        error!(
                            epoch = leader.fence.epoch,
                            "Leadership lost: another instance may lead now; stopping."
                        );
                        metrics.leader.with_label_values(&[role]).set(0);
                        store.set_fence(Some(crate::knowledge::leadership::Fence {
                            name: leader.fence.name.clone(),
                            epoch: -1,
                        }));
                        lost.store(true, std::sync::atomic::Ordering::SeqCst);
                        stop.cancel();
                        return;
                    }
                }
            }
            .instrument(info_span!("leadership")),
        );
    }
    Ok(Running {
        store,
        metrics,
        health,
        http_addr,
        api_tcp_addr,
        lock,
        policy: policy_tx,
        interrupted,
        lock_lost,
    })
}
