//! Execute: actuators carry out steps. Each is idempotent (a second run, or a
//! run after a cancelled one, is safe) and treats every `.await` as a
//! cancellation point. The supervisor records every run before and after.

pub mod agent_config;
pub mod agent_data;
pub mod command;
pub mod k8s;
pub mod refetch;
pub mod signal;
pub mod spire;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::model::{Observations, Outcome, Step};
use crate::sensors::workload_api::Shared;

pub use crate::policy::Class;
pub use command::{CommandActuator, CommandConfig};
pub use refetch::RefetchActuator;
pub use signal::{SignalActuator, SignalConfig};
pub use webhook::{WebhookActuator, WebhookConfig};

/// Name of the built-in refetch actuator.
pub const REFETCH: &str = "refetch";

/// Why an actuator may hold its step at execute time (an outcome of kind
/// [`OutcomeKind::Held`](crate::model::OutcomeKind::Held)): a
/// PodDisruptionBudget refused the eviction (`pdb_blocked`), or the
/// symptom maps to no pods the healer may act on (the
/// [`Refusal`](crate::k8s::Refusal)s). A closed set: hold reasons are
/// metric labels.
pub const HELD_REASONS: [&str; 6] = [
    k8s::PDB_BLOCKED,
    NOT_RECORDED,
    "no_pods_matched",
    "too_many_pods",
    "namespace_not_allowed",
    "no_k8s_selectors",
];

/// A fenced leader did not start the step: the store has not recorded it
/// under the leader's epoch (the store is away, or another instance leads
/// now). Not an actuator's reason: the loop's.
pub const NOT_RECORDED: &str = "not_recorded";

/// Errors at the actuator boundary.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    /// The target agent is unknown to this actuator.
    #[error("unknown target agent {0:?}")]
    UnknownTarget(String),
    /// The process could not be started.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// It ran but failed.
    #[error("{0}")]
    Failed(String),
    /// It did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

impl ActuatorError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            ActuatorError::UnknownTarget(_) => "unknown_target",
            ActuatorError::Spawn { .. } => "spawn",
            ActuatorError::Failed(_) => "failed",
            ActuatorError::Timeout(_) => "timeout",
        }
    }
}

/// Result of [`Actuator::prepare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// Run it.
    Ready,
    /// Not applicable here (closed-set reason): move to the next rung.
    Skip(&'static str),
    /// Not yet (closed-set reason): hold and try again later.
    Wait(&'static str),
}

/// Something that can act on a target.
#[async_trait]
pub trait Actuator: Send + Sync {
    /// Actuator type (`refetch`, `command`): metric label.
    fn name(&self) -> &'static str;
    /// Which guards apply; restarts and evictions unless stated otherwise.
    fn class(&self) -> Class {
        Class::AgentLocal
    }
    /// Checks the step's precondition against the latest observations and
    /// fills in parameters (target server, SPIFFE ID, …). Pure: no I/O
    /// beyond reading local files.
    fn prepare(&self, _step: &mut Step, _obs: &Observations) -> Prepared {
        Prepared::Ready
    }
    /// Runs the step. Idempotent and cancel-safe.
    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError>;
}

/// A configured actuator instance (`[actuators.<name>]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ActuatorConfig {
    /// Run a program.
    Command(CommandConfig),
    /// Bump the registration entry so the agent re-signs the SVID.
    EntryBump(spire::EntryBumpConfig),
    /// DeleteAgent + join token + restart: re-attestation.
    AgentEvict(spire::AgentEvictConfig),
    /// Move the agent to another HA server.
    ServerFailover(spire::FailoverConfig),
    /// Send a signal (reload or stop) to a local process found by pidfile
    /// or exact name, refusing stale PIDs.
    Signal(SignalConfig),
    /// POST the step as JSON to an HTTP endpoint (retried, idempotency-keyed).
    Webhook(WebhookConfig),
    /// Evict the workload's pods through the Eviction API (under their
    /// PodDisruptionBudget), waiting for each replacement.
    K8sEvict(k8s::K8sPodConfig),
    /// Delete the workload's pods (UID and resourceVersion preconditions),
    /// waiting for each replacement.
    K8sDeletePod(k8s::K8sPodConfig),
    /// Restart the Deployment, DaemonSet or StatefulSet owning the
    /// workload's pods (`kubectl rollout restart`), waiting until every pod
    /// is replaced.
    K8sRolloutRestart(k8s::K8sRolloutConfig),
}

impl ActuatorConfig {
    /// (field, problem) pairs; empty when valid.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        match self {
            ActuatorConfig::Command(c) => c.problems(),
            ActuatorConfig::Signal(c) => c.problems(),
            ActuatorConfig::Webhook(c) => c.problems(),
            ActuatorConfig::K8sEvict(c) | ActuatorConfig::K8sDeletePod(c) => c.problems(),
            ActuatorConfig::K8sRolloutRestart(c) => c.problems(),
            ActuatorConfig::EntryBump(_) | ActuatorConfig::AgentEvict(_) => Vec::new(),
            ActuatorConfig::ServerFailover(_) => Vec::new(),
        }
    }

    /// Whether it acts through the Kubernetes API (`[kubernetes]` is then
    /// required, with a namespace allow-list).
    pub fn is_kubernetes(&self) -> bool {
        matches!(
            self,
            ActuatorConfig::K8sEvict(_)
                | ActuatorConfig::K8sDeletePod(_)
                | ActuatorConfig::K8sRolloutRestart(_)
        )
    }

    /// The other actuator this one runs (a restart), if any.
    pub fn depends_on(&self) -> Option<&str> {
        match self {
            ActuatorConfig::AgentEvict(c) => Some(&c.restart),
            ActuatorConfig::ServerFailover(c) => Some(&c.restart),
            _ => None,
        }
    }
}

/// Actuators by instance name.
pub type Registry = HashMap<String, Arc<dyn Actuator>>;

/// The built-in `refetch` plus every configured instance. Composite
/// actuators (evict, failover) get the restart actuator they name; config
/// validation guarantees it is a configured `command`. Kubernetes
/// actuators share `kube` (config validation guarantees `[kubernetes]`
/// when one is configured; without it they are left out) and read
/// registration entries from `topo`'s servers.
pub fn registry(
    configured: &BTreeMap<String, ActuatorConfig>,
    topo: Arc<spire::Topology>,
    streams: HashMap<String, Arc<Shared>>,
    kube: Option<Arc<crate::k8s::Kube>>,
) -> Registry {
    let mut r: Registry = HashMap::new();
    for (name, c) in configured {
        if let ActuatorConfig::Command(c) = c {
            r.insert(name.clone(), Arc::new(CommandActuator::new(c.clone())));
        }
    }
    for (name, c) in configured {
        let restart = c.depends_on().and_then(|d| r.get(d).cloned());
        let a: Arc<dyn Actuator> = match (c, restart) {
            (ActuatorConfig::Command(_), _) => continue,
            (ActuatorConfig::Signal(c), _) => Arc::new(SignalActuator::new(c.clone())),
            (ActuatorConfig::Webhook(c), _) => Arc::new(WebhookActuator::new(c.clone())),
            (ActuatorConfig::EntryBump(c), _) => {
                Arc::new(spire::EntryBump::new(c.clone(), topo.clone()))
            }
            (ActuatorConfig::AgentEvict(c), Some(restart)) => {
                Arc::new(spire::AgentEvict::new(c.clone(), topo.clone(), restart))
            }
            (ActuatorConfig::ServerFailover(c), Some(restart)) => {
                Arc::new(spire::Failover::new(c.clone(), topo.clone(), restart))
            }
            (ActuatorConfig::K8sEvict(c), _) => {
                let Some(kube) = kube.clone() else { continue };
                Arc::new(k8s::PodActuator::pods(
                    k8s::Mode::Evict,
                    c,
                    kube,
                    topo.clone(),
                ))
            }
            (ActuatorConfig::K8sDeletePod(c), _) => {
                let Some(kube) = kube.clone() else { continue };
                Arc::new(k8s::PodActuator::pods(
                    k8s::Mode::Delete,
                    c,
                    kube,
                    topo.clone(),
                ))
            }
            (ActuatorConfig::K8sRolloutRestart(c), _) => {
                let Some(kube) = kube.clone() else { continue };
                Arc::new(k8s::PodActuator::rollout(c, kube, topo.clone()))
            }
            (_, None) => continue,
        };
        r.insert(name.clone(), a);
    }
    r.insert(REFETCH.to_string(), Arc::new(RefetchActuator::new(streams)));
    r
}
