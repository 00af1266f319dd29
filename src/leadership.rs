//! Roles and leadership: who acts.
//!
//! `role = "node"` instances (one per node) watch their local agents and
//! workloads and act on them; `role = "cluster"` watches the servers and
//! the fleet and acts on pods and failover; `role = "all"` (the default)
//! does both on one host. Node and cluster instances share one PostgreSQL.
//! What is between an agent and its servers ([`CLUSTER_SYMPTOMS`]) is the
//! cluster instance's to act on, even where a node instance sees it: a
//! node instance records those incidents and acts on nothing for them.
//!
//! The cluster role runs active/standby. Liveness comes from one of two
//! backends:
//! - `postgres`: a session advisory lock on a dedicated connection. The
//!   session sets `idle_session_timeout` to the lease duration and short
//!   TCP keepalives, so the database itself ends a hung (paused,
//!   partitioned) leader's session, and with it the lock, on its own clock.
//! - `lease`: a Kubernetes `coordination.k8s.io/v1` Lease, taken and renewed
//!   with `resourceVersion` preconditions. Like client-go, a standby judges
//!   expiry by how long it has itself seen the same record unchanged, never
//!   by the holder's clock.
//!
//! Safety comes from fencing, the same for both: each new leader bumps the
//! epoch of the `leadership` row in the store, and every write of the
//! leader checks that epoch in its own transaction
//! ([`crate::knowledge::leadership`]). The loop launches a step only once
//! its `ActionStarted` is recorded, so a former leader that wakes up after
//! losing its lease records, and starts, nothing; it then stops. Kubernetes
//! writes carry their own preconditions (uid, resourceVersion).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Row};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::knowledge::leadership::{self as fence, Fence};
use crate::knowledge::scope_lock::Holder;
use crate::knowledge::{Store, StoreError};
use crate::model::SymptomKind;

/// What an instance watches and acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// One per node: the local agents and workloads.
    Node,
    /// The servers, the fleet view, pods and failover; active/standby.
    Cluster,
    /// Everything, on one host (the default).
    #[default]
    All,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Node, Role::Cluster, Role::All];

    /// Config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Cluster => "cluster",
            Role::All => "all",
        }
    }

    /// Whether an instance of this role acts on `kind`: every role but
    /// `node` acts on everything; a node instance leaves
    /// [`CLUSTER_SYMPTOMS`] to the cluster instance (it records their
    /// incidents and holds them as `left_to_cluster`).
    pub fn acts_on(self, kind: SymptomKind) -> bool {
        self != Role::Node || !CLUSTER_SYMPTOMS.contains(&kind)
    }
}

/// The symptoms between an agent and its servers (its sync, its renewal,
/// its ban), whose remedies are the cluster instance's: failover first,
/// then what it has configured. A node instance sees some of them too (an
/// agent's sync goes stale on its Debug API); if it acted on them with
/// what it has, it would restart the agent while the cluster instance
/// fails the same agent over. So it only records them, and while one is
/// open it keeps the agent's slot: the agent's stream dropping while the
/// cluster instance restarts it is explained by it, not acted on.
///
/// An unhealthy server is the cluster instance's alone too: only it may
/// replace a server's pod, and only while another server answers.
pub const CLUSTER_SYMPTOMS: [SymptomKind; 4] = [
    SymptomKind::AgentSyncStale,
    SymptomKind::AgentNotRenewing,
    SymptomKind::AgentBanned,
    SymptomKind::ServerUnhealthy,
];

/// Where liveness comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// A PostgreSQL session advisory lock.
    #[default]
    Postgres,
    /// A Kubernetes Lease.
    Lease,
}

/// `[leadership]`: active/standby for the cluster role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeadershipConfig {
    /// `postgres` (default) or `lease`.
    #[serde(default)]
    pub backend: Backend,
    /// Lock and Lease name, and the store's leadership row.
    #[serde(default = "default_name")]
    pub name: String,
    /// The Lease's namespace (`lease` backend).
    #[serde(default)]
    pub namespace: Option<String>,
    /// How long a leader that stopped renewing keeps it.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease_duration: Duration,
    /// How often the leader renews.
    #[serde(default = "default_renew", with = "humantime_serde")]
    pub renew_every: Duration,
    /// How often a standby tries to take over.
    #[serde(default = "default_retry", with = "humantime_serde")]
    pub retry_every: Duration,
}

fn default_name() -> String {
    "spire-healer-cluster".into()
}
fn default_lease() -> Duration {
    Duration::from_secs(15)
}
fn default_renew() -> Duration {
    Duration::from_secs(5)
}
fn default_retry() -> Duration {
    Duration::from_secs(2)
}

impl Default for LeadershipConfig {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            name: default_name(),
            namespace: None,
            lease_duration: default_lease(),
            renew_every: default_renew(),
            retry_every: default_retry(),
        }
    }
}

impl LeadershipConfig {
    /// (field, problem) pairs; empty when valid.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if !valid_lease_name(&self.name) {
            p.push((
                "name",
                format!(
                    "{:?} must be 1-63 characters of a-z, 0-9 and '-', starting and ending alphanumeric (a Lease name)",
                    self.name
                ),
            ));
        }
        if self.lease_duration < Duration::from_secs(2) || self.lease_duration.subsec_nanos() != 0 {
            p.push((
                "lease_duration",
                "must be whole seconds, at least 2 s".to_string(),
            ));
        }
        if self.renew_every.is_zero() || self.renew_every * 2 > self.lease_duration {
            p.push((
                "renew_every",
                "must be positive and at most half of lease_duration".to_string(),
            ));
        }
        if self.retry_every.is_zero() || self.retry_every > self.lease_duration {
            p.push((
                "retry_every",
                "must be positive and at most lease_duration".to_string(),
            ));
        }
        match (self.backend, &self.namespace) {
            (Backend::Lease, None) => p.push((
                "namespace",
                "the lease backend needs the Lease's namespace".to_string(),
            )),
            (Backend::Lease, Some(ns)) if !valid_lease_name(ns) => {
                p.push(("namespace", format!("{ns:?} is not a namespace name")))
            }
            _ => {}
        }
        p
    }
}

fn valid_lease_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The leadership settings of an instance: `[leadership]` for the cluster
/// role, or the `postgres` backend's defaults for a cluster instance on
/// PostgreSQL without one; none for `node` and `all` (config validation
/// refuses `[leadership]` there) and on SQLite.
pub fn of(cfg: &crate::config::Config, url: &str) -> Option<LeadershipConfig> {
    let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
    match (cfg.role, &cfg.leadership) {
        (Role::Cluster, Some(l)) => Some(l.clone()),
        (Role::Cluster, None) if postgres => Some(LeadershipConfig::default()),
        _ => None,
    }
}

/// The Kubernetes client of the `lease` backend: `[kubernetes]` when set
/// (the same client the actuators use), else `$KUBECONFIG`,
/// `~/.kube/config` or the pod's service account; the client's default
/// retry is off either way (a Lease conflict is an answer).
///
/// # Errors
/// No usable configuration.
pub async fn kube_client(cfg: &crate::config::Config) -> Result<kube::Client, LeadershipError> {
    if let Some(k) = &cfg.kubernetes {
        return crate::k8s::client::build_client(k)
            .await
            .map_err(|e| LeadershipError::Kube(e.to_string()));
    }
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| LeadershipError::Kube(e.to_string()))?;
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| LeadershipError::Kube(e.to_string()))
}

/// Why leadership could not be campaigned for at all (a standby waiting is
/// not an error).
#[derive(Debug, thiserror::Error)]
pub enum LeadershipError {
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Kubernetes API refused in a way waiting will not fix.
    #[error("Lease {namespace}/{name}: {reason}")]
    Lease {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What the API server said.
        reason: String,
    },
    /// Shut down while waiting.
    #[error("stopped while standing by")]
    Stopped,
    /// No Kubernetes client could be built.
    #[error("no Kubernetes client: {0}")]
    Kube(String),
}

/// A held leadership: renewed by [`Leader::renew`] until it is lost.
pub struct Leader {
    /// The epoch every write is fenced with.
    pub fence: Fence,
    lease: Duration,
    held: Held,
    /// Last successful renewal (monotonic).
    renewed: Instant,
}

impl std::fmt::Debug for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader")
            .field("fence", &self.fence)
            .field("backend", &self.kind())
            .finish_non_exhaustive()
    }
}

enum Held {
    /// The dedicated session holding the advisory lock.
    Postgres(Box<PgConnection>),
    /// The Lease, as last written by us, and the store the epoch lives in.
    Lease(Box<HeldLease>),
}

struct HeldLease {
    api: Api<Lease>,
    lease: Lease,
    store: Arc<dyn Store>,
    holder: String,
}

impl Leader {
    /// Backend name, for logs.
    pub fn kind(&self) -> &'static str {
        match self.held {
            Held::Postgres(_) => "advisory_lock",
            Held::Lease(_) => "lease",
        }
    }

    /// Renews once. `false` once leadership is lost: another leader took
    /// over (a stale epoch, a Lease someone else wrote), or nothing could
    /// be renewed for a whole lease duration. The caller stops acting.
    pub async fn renew(&mut self) -> bool {
        let bound = self.lease.min(Duration::from_secs(5));
        let result: Result<bool, String> = match &mut self.held {
            Held::Postgres(conn) => {
                match tokio::time::timeout(bound, fence::pg_renew(conn, &self.fence, self.lease))
                    .await
                {
                    Ok(Ok(ok)) => Ok(ok),
                    // A session that dropped has lost its lock: another
                    // instance may hold it now.
                    Ok(Err(e)) => {
                        warn!(error = %e, "Leadership session lost.");
                        Ok(false)
                    }
                    Err(_) => Err("no answer from the database".into()),
                }
            }
            Held::Lease(held) => {
                let HeldLease {
                    api,
                    lease,
                    store,
                    holder,
                } = &mut **held;
                let renewed = tokio::time::timeout(bound, renew_lease(api, lease, holder)).await;
                match renewed {
                    Ok(Ok(next)) => {
                        *lease = next;
                        match tokio::time::timeout(
                            bound,
                            store.renew_leadership(&self.fence, self.lease),
                        )
                        .await
                        {
                            Ok(Ok(ok)) => Ok(ok),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("no answer from the store".into()),
                        }
                    }
                    Ok(Err(LeaseRenew::Lost(why))) => {
                        warn!(reason = %why, "Lease lost.");
                        Ok(false)
                    }
                    Ok(Err(LeaseRenew::Transient(e))) => Err(e),
                    Err(_) => Err("no answer from the API server".into()),
                }
            }
        };
        match result {
            Ok(true) => {
                self.renewed = Instant::now();
                true
            }
            Ok(false) => false,
            Err(error) => {
                let left = self.lease.saturating_sub(self.renewed.elapsed());
                warn!(%error, left_ms = left.as_millis() as u64, "Leadership renewal failed.");
                !left.is_zero()
            }
        }
    }
}

/// Campaigns for leadership until this instance leads (returned) or
/// `stop` is cancelled. A standby tries every `retry_every`; `on_standby`
/// is told each time it finds another leader.
///
/// # Errors
/// [`LeadershipError`] when campaigning cannot work at all (a bad URL,
/// no permission on the Lease), or `Stopped`.
pub async fn campaign(
    cfg: &LeadershipConfig,
    url: &str,
    store: Arc<dyn Store>,
    kube: Option<kube::Client>,
    holder: &Holder,
    stop: &CancellationToken,
) -> Result<Leader, LeadershipError> {
    let label = holder.label();
    let mut observed: Option<(String, Instant)> = None;
    let mut logged = false;
    loop {
        let attempt = match (cfg.backend, &kube) {
            (Backend::Postgres, _) => try_postgres(cfg, url, &label).await,
            (Backend::Lease, Some(client)) => {
                try_lease(cfg, client, store.clone(), &label, &mut observed).await
            }
            (Backend::Lease, None) => {
                return Err(LeadershipError::Lease {
                    namespace: cfg.namespace.clone().unwrap_or_default(),
                    name: cfg.name.clone(),
                    reason: "the lease backend needs [kubernetes]".into(),
                });
            }
        };
        match attempt {
            Ok(Some(leader)) => {
                info!(name = %cfg.name, epoch = leader.fence.epoch, backend = leader.kind(), "Leading: this instance acts.");
                return Ok(leader);
            }
            Ok(None) => {
                if !logged {
                    info!(name = %cfg.name, "Standing by: another instance leads.");
                    logged = true;
                }
            }
            Err(e @ (LeadershipError::Lease { .. } | LeadershipError::Stopped)) => return Err(e),
            Err(LeadershipError::Store(e @ StoreError::Config(_))) => return Err(e.into()),
            Err(e) => warn!(error = %e, "Cannot campaign for leadership now; trying again."),
        }
        tokio::select! {
            _ = stop.cancelled() => return Err(LeadershipError::Stopped),
            _ = tokio::time::sleep(cfg.retry_every) => {}
        }
    }
}

/// The advisory-lock key of a leadership name.
fn lock_key(name: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("spire-healer/leadership/{name}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]))
}

/// One attempt at the advisory lock; on success bumps the epoch on the same
/// session.
async fn try_postgres(
    cfg: &LeadershipConfig,
    url: &str,
    label: &str,
) -> Result<Option<Leader>, LeadershipError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
    let options = options.application_name(label);
    let mut conn = tokio::time::timeout(Duration::from_secs(5), options.connect())
        .await
        .map_err(|_| {
            StoreError::Unavailable(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 5 s while campaigning for leadership",
            )))
        })?
        .map_err(StoreError::from_sqlx)?;
    // The database ends this session, and releases the lock, when the
    // leader stops using it for a lease duration (paused, hung) or its
    // peer stops answering keepalives (partitioned).
    let secs = cfg.lease_duration.as_secs();
    for (setting, value) in [
        ("idle_session_timeout", format!("{secs}s")),
        ("tcp_keepalives_idle", "5".to_string()),
        ("tcp_keepalives_interval", "2".to_string()),
        ("tcp_keepalives_count", "3".to_string()),
    ] {
        sqlx::query("SELECT set_config($1, $2, false)")
            .bind(setting)
            .bind(value)
            .execute(&mut conn)
            .await
            .map_err(StoreError::from_sqlx)?;
    }
    let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
        .bind(lock_key(&cfg.name))
        .fetch_one(&mut conn)
        .await
        .map_err(StoreError::from_sqlx)?
        .try_get(0)
        .map_err(StoreError::from_sqlx)?;
    if !got {
        let _ = conn.close().await;
        return Ok(None);
    }
    let epoch = fence::pg_take(&mut conn, &cfg.name, label, cfg.lease_duration).await?;
    Ok(Some(Leader {
        fence: Fence {
            name: cfg.name.clone(),
            epoch,
        },
        lease: cfg.lease_duration,
        held: Held::Postgres(Box::new(conn)),
        renewed: Instant::now(),
    }))
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One attempt at the Lease: create it, or take it over once its record
/// has not changed for a whole lease duration as this instance saw it
/// (`observed`: resourceVersion and when first seen).
async fn try_lease(
    cfg: &LeadershipConfig,
    client: &kube::Client,
    store: Arc<dyn Store>,
    label: &str,
    observed: &mut Option<(String, Instant)>,
) -> Result<Option<Leader>, LeadershipError> {
    let ns = cfg.namespace.clone().unwrap_or_default();
    let api: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let refused = |reason: String| LeadershipError::Lease {
        namespace: ns.clone(),
        name: cfg.name.clone(),
        reason,
    };
    let secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let current = match api.get_opt(&cfg.name).await {
        Ok(l) => l,
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 401 => {
            return Err(refused(s.message));
        }
        Err(e) => {
            warn!(error = %e, "Cannot read the Lease; trying again.");
            return Ok(None);
        }
    };
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(ns.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(label.to_string()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            let rv = lease.metadata.resource_version.clone().unwrap_or_default();
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let free = holder.is_empty() || holder == label;
            if !free {
                // Expired only once we saw it unchanged for a lease
                // duration (the holder's clock is not ours).
                let seen = match observed {
                    Some((v, at)) if *v == rv => *at,
                    _ => {
                        *observed = Some((rv.clone(), Instant::now()));
                        Instant::now()
                    }
                };
                let theirs = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(cfg.lease_duration, Duration::from_secs);
                if seen.elapsed() < theirs {
                    return Ok(None);
                }
            }
            if holder != label {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.acquire_time = Some(now_micro());
            }
            spec.holder_identity = Some(label.to_string());
            spec.lease_duration_seconds = Some(secs);
            spec.renew_time = Some(now_micro());
            // resourceVersion in the body: a concurrent writer gets 409.
            api.replace(&cfg.name, &PostParams::default(), &lease).await
        }
    };
    let lease = match written {
        Ok(l) => l,
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok(None),
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 401 => {
            return Err(refused(s.message));
        }
        Err(e) => {
            warn!(error = %e, "Cannot write the Lease; trying again.");
            return Ok(None);
        }
    };
    let epoch = store
        .take_leadership(&cfg.name, label, cfg.lease_duration)
        .await?;
    Ok(Some(Leader {
        fence: Fence {
            name: cfg.name.clone(),
            epoch,
        },
        lease: cfg.lease_duration,
        held: Held::Lease(Box::new(HeldLease {
            api,
            lease,
            store,
            holder: label.to_string(),
        })),
        renewed: Instant::now(),
    }))
}

enum LeaseRenew {
    /// Someone else holds it now, or it is gone.
    Lost(String),
    /// Try again.
    Transient(String),
}

/// Writes a new `renewTime` over the Lease as we last wrote it (409 when
/// anyone else wrote since).
async fn renew_lease(api: &Api<Lease>, lease: &Lease, holder: &str) -> Result<Lease, LeaseRenew> {
    let mut next = lease.clone();
    let name = next.metadata.name.clone().unwrap_or_default();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(holder) {
        return Err(LeaseRenew::Lost("held by another instance".into()));
    }
    spec.renew_time = Some(now_micro());
    match api.replace(&name, &PostParams::default(), &next).await {
        Ok(l) => Ok(l),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Err(LeaseRenew::Lost(
            format!("the Lease changed under us ({})", s.code),
        )),
        Err(e) => Err(LeaseRenew::Transient(e.to_string())),
    }
}

/// Gives the Lease up on a clean exit, so a standby need not wait for it
/// to expire (empty holder, as client-go's `ReleaseOnCancel`).
pub async fn release(leader: Leader) {
    if let Held::Lease(held) = leader.held {
        let HeldLease {
            api, lease, holder, ..
        } = *held;
        let mut next = lease;
        let name = next.metadata.name.clone().unwrap_or_default();
        if let Some(spec) = next.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(holder.as_str())
        {
            spec.holder_identity = None;
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                api.replace(&name, &PostParams::default(), &next),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests;
