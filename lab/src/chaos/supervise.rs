//! The baselines: supervision operators run today, over the lab's agents and
//! servers. (Skeleton: the semantics are filled in by the implementation.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A boxed, sendable future.
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One supervised process (a container, a unit).
#[derive(Clone)]
pub struct Unit {
    /// Its name (`agent-0`, `server-a`).
    pub name: String,
    /// Starts the process; returns once it is spawned, without waiting for
    /// readiness. An `Err` names what failed.
    pub start: Arc<dyn Fn() -> BoxFut<Result<(), String>> + Send + Sync>,
    /// The current process id, when one is alive (not a zombie).
    pub pid: Arc<dyn Fn() -> Option<i32> + Send + Sync>,
    /// `http://127.0.0.1:PORT/live`, probed by the kubelet baseline.
    pub live_url: Option<String>,
}

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit")
            .field("name", &self.name)
            .field("live_url", &self.live_url)
            .finish_non_exhaustive()
    }
}

/// Kubernetes' defaults for a container with a liveness probe.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeletSettings {
    /// `periodSeconds`.
    pub period: Duration,
    /// `timeoutSeconds`.
    pub timeout: Duration,
    /// `failureThreshold`.
    pub failure_threshold: u32,
    /// `terminationGracePeriodSeconds`: SIGTERM, then SIGKILL after this.
    pub termination_grace: Duration,
    /// First CrashLoopBackOff delay.
    pub backoff_initial: Duration,
    /// Longest CrashLoopBackOff delay.
    pub backoff_max: Duration,
    /// How long a container must run before its back-off is forgotten.
    pub backoff_reset: Duration,
    /// How often the kubelet notices a container exit (PLEG relist).
    pub relist: Duration,
}

/// systemd's defaults for `Restart=always`.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemdSettings {
    /// `RestartSec`.
    pub restart_sec: Duration,
    /// `StartLimitIntervalSec`.
    pub start_limit_interval: Duration,
    /// `StartLimitBurst`.
    pub start_limit_burst: u32,
    /// How often an exit is noticed (systemd gets SIGCHLD at once).
    pub exit_poll: Duration,
}

/// A baseline supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum Baseline {
    /// Kubelet liveness probe and restart policy `Always`.
    Kubelet(KubeletSettings),
    /// systemd `Restart=always`.
    Systemd(SystemdSettings),
}

/// What a baseline did or saw.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// The process was found gone.
    Exited,
    /// A liveness probe failed (`consecutive` failures so far).
    ProbeFailed {
        /// Consecutive failures, this one included.
        consecutive: u32,
    },
    /// The failure threshold was reached: the container will be killed.
    LivenessFailed,
    /// A signal was sent to the process.
    Killed {
        /// `SIGTERM` or `SIGKILL`.
        signal: &'static str,
    },
    /// The next start waits this long.
    BackOff {
        /// The delay.
        delay: Duration,
    },
    /// The process was started again.
    Started,
    /// A start failed.
    StartFailed {
        /// Why.
        error: String,
    },
    /// systemd gave up (start limit hit); the unit stays failed.
    StartLimitHit,
}

/// One event of a baseline, for one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When it happened.
    pub at: Instant,
    /// The unit's name.
    pub unit: String,
    /// What happened.
    pub kind: EventKind,
}

/// Runs `baseline` over `units` until `shutdown`; every event goes to
/// `events`.
pub fn spawn(
    baseline: Baseline,
    units: Vec<Unit>,
    events: UnboundedSender<Event>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let _ = (baseline, units, events);
    tokio::spawn(async move { shutdown.cancelled().await })
}
