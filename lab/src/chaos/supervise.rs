//! The baselines: supervision operators run today, over the lab's agents and
//! servers, with the semantics of their sources.
//!
//! # Kubelet (Kubernetes v1.37, restart policy `Always`, a liveness probe)
//!
//! Defaults ([`KubeletSettings::default`]):
//! - `periodSeconds` 10, `timeoutSeconds` 1, `failureThreshold` 3,
//!   `successThreshold` 1, `initialDelaySeconds` 0, and
//!   `terminationGracePeriodSeconds` 30: `pkg/apis/core/v1/defaults.go`
//!   (`SetDefaults_Probe`, `SetDefaults_PodSpec`).
//! - CrashLoopBackOff: initial 10 s (`initialCrashLoopBackOff`), maximum
//!   300 s (`MaxContainerBackOff`) in `pkg/kubelet/kubelet.go`, chosen by
//!   `newCrashLoopBackOff` (the `ReduceDefaultCrashLoopBackOffDecay` gate,
//!   1 s / 60 s, is alpha and off by default in
//!   `pkg/features/kube_features.go`; no jitter for container restarts).
//! - Exits are seen by the generic PLEG relist every 1 s
//!   (`genericPlegRelistPeriod`, `pkg/kubelet/kubelet.go`;
//!   `GenericPLEG.Relist` in `pkg/kubelet/pleg/generic.go`): here
//!   [`Unit::pid`] is polled every [`KubeletSettings::relist`].
//!
//! Probing (`pkg/kubelet/prober/worker.go`, `worker.run` and
//! `worker.doProbe`): the worker probes once when it starts and then on every
//! tick of a `periodSeconds` ticker that keeps running across restarts. A
//! container that is not running is not probed. A result only counts when
//! it has repeated `failureThreshold` times in a row (`resultRun`); the run
//! is **not** reset when a new container starts, only by a different result
//! or when the threshold is reached. On a liveness failure at the threshold
//! the worker goes `onHold` (no probing) until it sees a new container ID,
//! so **probing stops while the container is killed and backed off** and
//! resumes with the next tick after the restart. The probe itself
//! (`pkg/kubelet/prober/prober.go` `runProbe`, `pkg/probe/http/http.go`
//! `DoHTTPProbe`, `pkg/probe/http/request.go` `NewProbeRequest`): an HTTP GET
//! with `User-Agent: kube-probe/1.37` and `Accept: */*`, no keep-alive, the
//! whole request bounded by `timeoutSeconds`; a status in 200..=399 is a
//! success, anything else, a timeout or a connection error is a failure
//! (failures are results, not errors, so `runProbeWithRetries` does not
//! retry them).
//!
//! Restart (`pkg/kubelet/kuberuntime/kuberuntime_manager.go`
//! `computePodActions`, `SyncPod`, `doBackOff`; back-off arithmetic in
//! `k8s.io/client-go/util/flowcontrol/backoff.go` `Backoff.Next`,
//! `IsInBackOffSince`, `hasExpired`):
//! - A liveness failure kills the container (`killContainer` in
//!   `kuberuntime_container.go`: SIGTERM, SIGKILL after the grace period;
//!   the kubelet raises a grace below 2 s to 2 s, which the settings here
//!   do not, so that tests run fast) and starts it again in the same sync.
//! - Before every start `doBackOff` looks at the newest **exited** instance
//!   of the container and its finish time `ts`: the start is held back while
//!   `now - ts < backoff` (unless the entry expired: `ts - lastUpdate >
//!   2 × max`, i.e. the container ran 10 min without a restart); otherwise
//!   `Backoff.Next` runs (first time or expired: `backoff = initial`; else
//!   `min(2 × backoff, max)`; `lastUpdate = now`) and the container starts.
//!   Hence after repeated exits: restart at once, then 10 s, 20 s, 40 s, …,
//!   300 s after each exit.
//! - **The liveness kill goes through the same back-off**, but `doBackOff`
//!   runs with the pod status read before the kill: it sees the *previous*
//!   exited instance (or none: then the container restarts at once and
//!   `Next` is not even called). If that older instance is still in
//!   back-off, the container stays down and the next sync uses the killed
//!   instance's own finish time. Both cases are implemented.
//! - Approximation: the real kubelet retries a backed-off pod only when its
//!   pod worker syncs again (`podWorkers.completeWork` in
//!   `pkg/kubelet/pod_workers.go` requeues after `backOffPeriod` 10 s with
//!   50 % jitter), so its restarts come up to 15 s *later* than here; this
//!   baseline restarts exactly when the back-off expires, which favours
//!   kubelet. Exit times are the relist that saw them (the kubelet uses the
//!   runtime's `FinishedAt`, up to one relist earlier).
//! - A start that fails ([`EventKind::StartFailed`]) counts as an instance
//!   that exited at once.
//!
//! # systemd (`Restart=always`, no watchdog)
//!
//! Defaults ([`SystemdSettings::default`]): `RestartSec=100ms`,
//! `DefaultStartLimitIntervalSec=10s` and `DefaultStartLimitBurst=5`
//! (`DEFAULT_RESTART_USEC`, `DEFAULT_START_LIMIT_INTERVAL`,
//! `DEFAULT_START_LIMIT_BURST` in `src/basic/constants.h`, used by
//! `service_init` in `src/core/service.c`; man `systemd.service`,
//! `systemd-system.conf`). `RestartSteps=` and
//! `RestartMaxDelaySec=` are unset by default, so every restart waits
//! `RestartSec`.
//! - `Restart=always` restarts on every exit, clean or not, and on a failed
//!   exec (`service_sigchld_event`, `service_enter_dead` →
//!   `service_shall_restart` in `src/core/service.c`).
//! - Every start, automatic or not, passes `unit_test_start_limit`
//!   (`src/core/unit.c`, over `ratelimit_below` in `src/basic/ratelimit.c`):
//!   a window opens at the first start and admits `burst` starts within
//!   `interval`; one more and the unit enters `failed` with result
//!   `start-limit-hit` and is never restarted again
//!   ([`EventKind::StartLimitHit`]). A failed start counts like any other.
//! - No liveness: SPIRE v1.15.3 does not speak `sd_notify` (its binaries
//!   contain no `NOTIFY_SOCKET` and SPIRE has no systemd notification
//!   code), so `Type=notify` and `WatchdogSec=` cannot be used and a frozen
//!   agent is never noticed.
//! - systemd sees an exit at once (SIGCHLD); here [`Unit::pid`] is polled
//!   every [`SystemdSettings::exit_poll`] (50 ms).
//!
//! A process that was already running when [`spawn`] is called is taken
//! over as it is (for systemd it does not count against the start limit: it
//! was started before the window); a unit without a process is started at
//! once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// A boxed, sendable future.
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One supervised process (a container, a unit).
///
/// `start` must return once the process is spawned with [`Unit::pid`]
/// already naming it; `pid` must return `None` for a reaped or zombie
/// process (the baselines read `None` as "exited").
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

impl Default for KubeletSettings {
    /// Kubernetes v1.37's defaults: probe every 10 s, timeout 1 s, 3
    /// failures; grace 30 s; back-off 10 s doubling to 300 s, forgotten
    /// after 600 s; relist every 1 s (sources in the module docs).
    fn default() -> Self {
        Self {
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            termination_grace: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            backoff_reset: Duration::from_secs(600),
            relist: Duration::from_secs(1),
        }
    }
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

impl Default for SystemdSettings {
    /// systemd's defaults: `RestartSec=100ms`, start limit 5 starts in 10 s;
    /// exits polled every 50 ms (sources in the module docs).
    fn default() -> Self {
        Self {
            restart_sec: Duration::from_millis(100),
            start_limit_interval: Duration::from_secs(10),
            start_limit_burst: 5,
            exit_poll: Duration::from_millis(50),
        }
    }
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
///
/// Each unit is supervised by its own task; the returned handle ends once
/// every unit task has seen `shutdown`. A closed `events` channel is
/// ignored. Processes are left as they are at shutdown.
pub fn spawn(
    baseline: Baseline,
    units: Vec<Unit>,
    events: UnboundedSender<Event>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = Vec::with_capacity(units.len());
        for unit in units {
            let ctx = Ctx {
                unit,
                events: events.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.push(match &baseline {
                Baseline::Kubelet(s) => tokio::spawn(run_kubelet(s.clone(), ctx)),
                Baseline::Systemd(s) => tokio::spawn(run_systemd(s.clone(), ctx)),
            });
        }
        for task in tasks {
            let _ = task.await;
        }
    })
}

/// One unit's supervision context.
struct Ctx {
    unit: Unit,
    events: UnboundedSender<Event>,
    shutdown: CancellationToken,
}

impl Ctx {
    fn emit(&self, kind: EventKind) {
        let _ = self.events.send(Event {
            at: Instant::now(),
            unit: self.unit.name.clone(),
            kind,
        });
    }

    fn pid(&self) -> Option<i32> {
        (self.unit.pid)()
    }

    /// Starts the unit; `true` when it started.
    async fn start(&self) -> bool {
        match (self.unit.start)().await {
            Ok(()) => {
                self.emit(EventKind::Started);
                true
            }
            Err(error) => {
                self.emit(EventKind::StartFailed { error });
                false
            }
        }
    }

    /// Sleeps `d`; `false` when shut down first.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Sends `signal` to the process, when there is one.
    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid), signal);
            self.emit(EventKind::Killed {
                signal: signal.as_str(),
            });
        }
    }

    /// Waits until the process is gone, polling every `poll`, at most
    /// `limit`; `true` when it is gone.
    async fn wait_gone(&self, poll: Duration, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.pid().is_none() {
                return true;
            }
            if Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return false;
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }
}

/// The kubelet's per-container back-off entry
/// (`k8s.io/client-go/util/flowcontrol/backoff.go`, no jitter).
#[derive(Debug, Clone)]
struct CrashLoop {
    initial: Duration,
    max: Duration,
    /// `2 × max` by default: an entry older than this is forgotten.
    reset: Duration,
    /// `(backoff, lastUpdate)`.
    entry: Option<(Duration, Instant)>,
}

impl CrashLoop {
    fn new(s: &KubeletSettings) -> Self {
        Self {
            initial: s.backoff_initial,
            max: s.backoff_max,
            reset: s.backoff_reset,
            entry: None,
        }
    }

    /// `hasExpired`: `eventTime - lastUpdate > 2 × max`.
    fn expired(&self, ts: Instant, last_update: Instant) -> bool {
        ts.saturating_duration_since(last_update) > self.reset
    }

    /// `IsInBackOffSince(ts)`: `Some(backoff)` while `now - ts < backoff`.
    fn in_backoff_since(&self, ts: Instant, now: Instant) -> Option<Duration> {
        let (backoff, last_update) = self.entry?;
        if self.expired(ts, last_update) {
            return None;
        }
        (now.saturating_duration_since(ts) < backoff).then_some(backoff)
    }

    /// `Next(ts)`: first or expired → `initial`; else doubled up to `max`.
    fn next(&mut self, ts: Instant, now: Instant) {
        let backoff = match self.entry {
            Some((b, last)) if !self.expired(ts, last) => (b * 2).min(self.max),
            _ => self.initial,
        };
        self.entry = Some((backoff, now));
    }
}

/// What the kubelet knows of a container.
enum KState {
    Running,
    /// Down; the newest exited instance finished at `ts`.
    Down {
        ts: Instant,
    },
}

async fn run_kubelet(s: KubeletSettings, ctx: Ctx) {
    let mut crash = CrashLoop::new(&s);
    // Finish time of the newest exited instance (what `doBackOff` reads).
    let mut last_exit: Option<Instant> = None;
    let mut state = if ctx.pid().is_some() {
        KState::Running
    } else {
        // No container yet: the first start is never backed off.
        if ctx.start().await {
            KState::Running
        } else {
            let ts = Instant::now();
            last_exit = Some(ts);
            KState::Down { ts }
        }
    };
    let mut relist = tokio::time::interval(s.relist);
    relist.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut probe_tick = tokio::time::interval(s.period);
    probe_tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut probe: Option<JoinHandle<bool>> = None;
    let mut on_hold = false;
    // `resultRun` of the last result (`true` = success).
    let mut last_result: Option<bool> = None;
    let mut result_run: u32 = 0;
    loop {
        if let KState::Down { ts } = state {
            // `doBackOff` before the start.
            let now = Instant::now();
            if let Some(backoff) = crash.in_backoff_since(ts, now) {
                ctx.emit(EventKind::BackOff { delay: backoff });
                let wait = (ts + backoff).saturating_duration_since(now);
                if !ctx.sleep(wait).await {
                    return;
                }
                continue;
            }
            crash.next(ts, Instant::now());
            on_hold = false;
            state = if ctx.start().await {
                KState::Running
            } else {
                let ts = Instant::now();
                last_exit = Some(ts);
                KState::Down { ts }
            };
            continue;
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                if let Some(p) = probe.take() {
                    p.abort();
                }
                return;
            }
            _ = relist.tick() => {
                if ctx.pid().is_none() {
                    ctx.emit(EventKind::Exited);
                    let ts = Instant::now();
                    last_exit = Some(ts);
                    state = KState::Down { ts };
                    if let Some(p) = probe.take() {
                        p.abort();
                    }
                }
            }
            _ = probe_tick.tick(), if probe.is_none() => {
                if !on_hold && let Some(url) = ctx.unit.live_url.clone() {
                    let timeout = s.timeout;
                    probe = Some(tokio::spawn(async move { http_probe(&url, timeout).await }));
                }
            }
            res = async { probe.as_mut().expect("guarded by is_some").await }, if probe.is_some() => {
                probe = None;
                // A panicked probe task is thrown away (`doProbe` recovers).
                let Ok(ok) = res else { continue };
                if last_result == Some(ok) {
                    result_run += 1;
                } else {
                    last_result = Some(ok);
                    result_run = 1;
                }
                if ok {
                    continue;
                }
                ctx.emit(EventKind::ProbeFailed { consecutive: result_run });
                if result_run < s.failure_threshold {
                    continue;
                }
                // Threshold reached: hold probing until a new container.
                ctx.emit(EventKind::LivenessFailed);
                on_hold = true;
                result_run = 0;
                let previous_exit = last_exit;
                if !kill_container(&ctx, &s).await {
                    return;
                }
                let killed_at = Instant::now();
                last_exit = Some(killed_at);
                // `SyncPod` kills and starts in one go; `doBackOff` sees the
                // exited instance from before the kill.
                let start_now = match previous_exit {
                    None => true,
                    Some(prev) => {
                        if crash.in_backoff_since(prev, Instant::now()).is_some() {
                            false
                        } else {
                            crash.next(prev, Instant::now());
                            true
                        }
                    }
                };
                if start_now {
                    on_hold = false;
                    state = if ctx.start().await {
                        KState::Running
                    } else {
                        let ts = Instant::now();
                        last_exit = Some(ts);
                        KState::Down { ts }
                    };
                } else {
                    state = KState::Down { ts: killed_at };
                }
            }
        }
    }
}

/// `killContainer`: SIGTERM, then SIGKILL after the grace period; waits for
/// the process to be gone. `false` when shut down meanwhile.
async fn kill_container(ctx: &Ctx, s: &KubeletSettings) -> bool {
    let poll = Duration::from_millis(20);
    ctx.signal(Signal::SIGTERM);
    if ctx.wait_gone(poll, s.termination_grace).await {
        return true;
    }
    if ctx.shutdown.is_cancelled() {
        return false;
    }
    ctx.signal(Signal::SIGKILL);
    loop {
        if ctx.wait_gone(poll, Duration::from_secs(5)).await {
            return true;
        }
        if ctx.shutdown.is_cancelled() {
            return false;
        }
    }
}

/// One HTTP liveness probe as `pkg/probe/http` does it: GET, no keep-alive,
/// everything within `timeout`; success on a status in 200..=399.
pub async fn http_probe(url: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, http_get_status(url)).await,
        Ok(Ok(200..=399))
    )
}

/// The status code of a GET on `url` (`http://host:port/path` only).
async fn http_get_status(url: &str) -> io::Result<u16> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {url}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    let mut stream = TcpStream::connect(authority).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 10 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no HTTP status line",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad HTTP status line"))
}

/// systemd's start rate limit (`ratelimit_below`).
struct StartLimit {
    interval: Duration,
    burst: u32,
    begin: Option<Instant>,
    num: u32,
}

impl StartLimit {
    /// `true` when one more start is allowed now (and counts it).
    fn below(&mut self, now: Instant) -> bool {
        match self.begin {
            Some(b) if now < b + self.interval => {}
            _ => {
                self.begin = Some(now);
                self.num = 0;
            }
        }
        if self.num < self.burst {
            self.num += 1;
            true
        } else {
            false
        }
    }
}

async fn run_systemd(s: SystemdSettings, ctx: Ctx) {
    let mut limit = StartLimit {
        interval: s.start_limit_interval,
        burst: s.start_limit_burst,
        begin: None,
        num: 0,
    };
    // Whether the next start is an automatic restart (waits RestartSec).
    let mut restart = false;
    let mut poll = tokio::time::interval(s.exit_poll);
    poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut running = ctx.pid().is_some();
    loop {
        if !running {
            if restart && !ctx.sleep(s.restart_sec).await {
                return;
            }
            if !limit.below(Instant::now()) {
                ctx.emit(EventKind::StartLimitHit);
                ctx.shutdown.cancelled().await;
                return;
            }
            running = ctx.start().await;
            restart = true;
            continue;
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = poll.tick() => {
                if ctx.pid().is_none() {
                    ctx.emit(EventKind::Exited);
                    running = false;
                    restart = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

    use tokio::net::TcpListener;
    use tokio::process::{Child, Command};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::*;

    /// A unit whose process is a real `sleep 1000`.
    struct Proc {
        child: Mutex<Option<Child>>,
    }

    impl Proc {
        fn pid(&self) -> Option<i32> {
            let mut guard = self.child.lock().unwrap();
            let child = guard.as_mut()?;
            match child.try_wait() {
                Ok(None) => child.id().map(|p| p as i32),
                _ => None,
            }
        }

        fn signal(&self, signal: Signal) {
            let pid = self.pid().expect("a running process");
            kill(Pid::from_raw(pid), signal).unwrap();
        }
    }

    fn sleep_unit(name: &str, live_url: Option<String>) -> (Unit, Arc<Proc>) {
        let proc = Arc::new(Proc {
            child: Mutex::new(None),
        });
        let p = proc.clone();
        let start = Arc::new(move || -> BoxFut<Result<(), String>> {
            let p = p.clone();
            Box::pin(async move {
                let child = Command::new("sleep")
                    .arg("1000")
                    .stdin(Stdio::null())
                    .process_group(0)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("spawning sleep: {e}"))?;
                *p.child.lock().unwrap() = Some(child);
                Ok(())
            })
        });
        let p = proc.clone();
        let unit = Unit {
            name: name.into(),
            start,
            pid: Arc::new(move || p.pid()),
            live_url,
        };
        (unit, proc)
    }

    fn failing_unit(name: &str) -> Unit {
        Unit {
            name: name.into(),
            start: Arc::new(|| -> BoxFut<Result<(), String>> {
                Box::pin(async { Err("no such binary".to_string()) })
            }),
            pid: Arc::new(|| None),
            live_url: None,
        }
    }

    /// Receives events into `seen` until `done(seen)`; panics after 30 s.
    async fn until(
        rx: &mut UnboundedReceiver<Event>,
        seen: &mut Vec<EventKind>,
        done: impl Fn(&[EventKind]) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(seen) {
            let ev = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out; events so far: {seen:?}"))
                .expect("event channel open");
            seen.push(ev.kind);
        }
    }

    fn count(seen: &[EventKind], kind: &EventKind) -> usize {
        seen.iter().filter(|k| *k == kind).count()
    }

    fn fast_kubelet() -> KubeletSettings {
        KubeletSettings {
            period: Duration::from_millis(200),
            timeout: Duration::from_millis(100),
            failure_threshold: 3,
            termination_grace: Duration::from_millis(300),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
            backoff_reset: Duration::from_secs(60),
            relist: Duration::from_millis(20),
        }
    }

    fn fast_systemd(burst: u32) -> SystemdSettings {
        SystemdSettings {
            restart_sec: Duration::from_millis(100),
            start_limit_interval: Duration::from_secs(60),
            start_limit_burst: burst,
            exit_poll: Duration::from_millis(20),
        }
    }

    /// A loopback HTTP server: mode 0 answers 200, 1 accepts and never
    /// answers, 2 answers 500, 3 answers 302.
    struct Live {
        url: String,
        mode: Arc<AtomicU8>,
        answered: Arc<AtomicU32>,
        task: JoinHandle<()>,
    }

    impl Drop for Live {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn live_server(mode: u8) -> Live {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/live", listener.local_addr().unwrap());
        let mode = Arc::new(AtomicU8::new(mode));
        let answered = Arc::new(AtomicU32::new(0));
        let (m, a) = (mode.clone(), answered.clone());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let status = match m.load(Ordering::SeqCst) {
                    0 => "200 OK",
                    2 => "500 Internal Server Error",
                    3 => "302 Found",
                    _ => {
                        held.push(stream);
                        continue;
                    }
                };
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                let _ = stream.write_all(reply.as_bytes()).await;
                a.fetch_add(1, Ordering::SeqCst);
            }
        });
        Live {
            url,
            mode,
            answered,
            task,
        }
    }

    #[test]
    fn crash_loop_backoff_follows_flowcontrol() {
        let s = KubeletSettings {
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            backoff_reset: Duration::from_secs(600),
            ..KubeletSettings::default()
        };
        let mut b = CrashLoop::new(&s);
        let t0 = Instant::now();
        assert_eq!(b.in_backoff_since(t0, t0), None, "first restart at once");
        let mut seen = Vec::new();
        let mut t = t0;
        for _ in 0..7 {
            b.next(t, t);
            seen.push(b.entry.unwrap().0.as_secs());
            t += Duration::from_secs(1);
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 300, 300]);
        // Still backed off right after an exit, not after the window.
        assert_eq!(b.in_backoff_since(t, t), Some(Duration::from_secs(300)));
        assert_eq!(b.in_backoff_since(t, t + Duration::from_secs(300)), None);
        // An exit more than 2 × max after the last restart: forgotten.
        let late = t + Duration::from_secs(601);
        assert_eq!(b.in_backoff_since(late, late), None);
        b.next(late, late);
        assert_eq!(b.entry.unwrap().0, Duration::from_secs(10));
    }

    #[test]
    fn defaults_are_the_sources() {
        let k = KubeletSettings::default();
        assert_eq!(
            (
                k.period,
                k.timeout,
                k.failure_threshold,
                k.termination_grace
            ),
            (
                Duration::from_secs(10),
                Duration::from_secs(1),
                3,
                Duration::from_secs(30)
            )
        );
        assert_eq!(
            (k.backoff_initial, k.backoff_max, k.backoff_reset, k.relist),
            (
                Duration::from_secs(10),
                Duration::from_secs(300),
                Duration::from_secs(600),
                Duration::from_secs(1)
            )
        );
        let s = SystemdSettings::default();
        assert_eq!(
            (s.restart_sec, s.start_limit_interval, s.start_limit_burst),
            (Duration::from_millis(100), Duration::from_secs(10), 5)
        );
    }

    #[tokio::test]
    async fn http_probe_results() {
        let live = live_server(0).await;
        assert!(http_probe(&live.url, Duration::from_secs(2)).await, "200");
        live.mode.store(3, Ordering::SeqCst);
        assert!(http_probe(&live.url, Duration::from_secs(2)).await, "302");
        live.mode.store(2, Ordering::SeqCst);
        assert!(!http_probe(&live.url, Duration::from_secs(2)).await, "500");
        live.mode.store(1, Ordering::SeqCst);
        assert!(
            !http_probe(&live.url, Duration::from_millis(100)).await,
            "timeout"
        );
        // A port nobody listens on: connection refused.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/live", closed.local_addr().unwrap());
        drop(closed);
        assert!(!http_probe(&url, Duration::from_secs(2)).await, "refused");
        assert!(
            !http_probe("https://x/", Duration::from_secs(2)).await,
            "scheme"
        );
    }

    #[tokio::test]
    async fn systemd_restarts_until_the_start_limit() {
        let (unit, proc) = sleep_unit("agent-0", None);
        let (tx, mut rx) = unbounded_channel();
        let stop = CancellationToken::new();
        let task = spawn(
            Baseline::Systemd(fast_systemd(3)),
            vec![unit],
            tx,
            stop.clone(),
        );
        let mut seen = Vec::new();
        for n in 1..=3 {
            until(&mut rx, &mut seen, |s| count(s, &EventKind::Started) == n).await;
            proc.signal(Signal::SIGKILL);
        }
        until(&mut rx, &mut seen, |s| {
            s.contains(&EventKind::StartLimitHit)
        })
        .await;
        use EventKind::*;
        assert_eq!(
            seen,
            [
                Started,
                Exited,
                Started,
                Exited,
                Started,
                Exited,
                StartLimitHit
            ]
        );
        assert_eq!(proc.pid(), None, "a failed unit stays down");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn systemd_counts_failed_starts_against_the_limit() {
        let (tx, mut rx) = unbounded_channel();
        let stop = CancellationToken::new();
        let task = spawn(
            Baseline::Systemd(fast_systemd(2)),
            vec![failing_unit("server-a")],
            tx,
            stop.clone(),
        );
        let mut seen = Vec::new();
        until(&mut rx, &mut seen, |s| {
            s.contains(&EventKind::StartLimitHit)
        })
        .await;
        let failed = EventKind::StartFailed {
            error: "no such binary".into(),
        };
        assert_eq!(seen, [failed.clone(), failed, EventKind::StartLimitHit]);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn kubelet_restarts_at_once_then_backs_off_doubling() {
        let (unit, proc) = sleep_unit("agent-0", None);
        let (tx, mut rx) = unbounded_channel();
        let stop = CancellationToken::new();
        let task = spawn(
            Baseline::Kubelet(fast_kubelet()),
            vec![unit],
            tx,
            stop.clone(),
        );
        let mut seen = Vec::new();
        for n in 1..=3 {
            until(&mut rx, &mut seen, |s| count(s, &EventKind::Started) == n).await;
            proc.signal(Signal::SIGKILL);
        }
        until(&mut rx, &mut seen, |s| count(s, &EventKind::Started) == 4).await;
        use EventKind::*;
        let ms = |m| BackOff {
            delay: Duration::from_millis(m),
        };
        assert_eq!(
            seen,
            [
                Started,
                Exited,
                Started,
                Exited,
                ms(200),
                Started,
                Exited,
                ms(400),
                Started
            ]
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn kubelet_backs_off_failed_starts() {
        let (tx, mut rx) = unbounded_channel();
        let stop = CancellationToken::new();
        let task = spawn(
            Baseline::Kubelet(fast_kubelet()),
            vec![failing_unit("agent-1")],
            tx,
            stop.clone(),
        );
        let mut seen = Vec::new();
        until(&mut rx, &mut seen, |s| s.len() >= 6).await;
        use EventKind::*;
        let failed = StartFailed {
            error: "no such binary".into(),
        };
        let ms = |m| BackOff {
            delay: Duration::from_millis(m),
        };
        assert_eq!(
            seen[..6],
            [
                failed.clone(),
                failed.clone(),
                ms(200),
                failed.clone(),
                ms(400),
                failed
            ]
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn kubelet_kills_a_frozen_process_after_three_failed_probes() {
        let live = live_server(1).await;
        let (unit, proc) = sleep_unit("agent-0", Some(live.url.clone()));
        (unit.start)().await.unwrap();
        proc.signal(Signal::SIGSTOP);
        let frozen = proc.pid().unwrap();
        let (tx, mut rx) = unbounded_channel();
        let stop = CancellationToken::new();
        let task = spawn(
            Baseline::Kubelet(fast_kubelet()),
            vec![unit],
            tx,
            stop.clone(),
        );
        let mut seen = Vec::new();
        until(&mut rx, &mut seen, |s| {
            s.contains(&EventKind::LivenessFailed)
        })
        .await;
        // The restarted process answers.
        live.mode.store(0, Ordering::SeqCst);
        until(&mut rx, &mut seen, |s| s.contains(&EventKind::Started)).await;
        use EventKind::*;
        assert_eq!(
            seen,
            [
                ProbeFailed { consecutive: 1 },
                ProbeFailed { consecutive: 2 },
                ProbeFailed { consecutive: 3 },
                LivenessFailed,
                Killed { signal: "SIGTERM" },
                Killed { signal: "SIGKILL" },
                Started
            ]
        );
        assert_ne!(proc.pid(), Some(frozen), "a new process");
        // Probing resumed on the new process and succeeds.
        let deadline = Instant::now() + Duration::from_secs(30);
        while live.answered.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "no probe answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while let Ok(ev) = rx.try_recv() {
            seen.push(ev.kind);
        }
        assert_eq!(count(&seen, &Started), 1, "{seen:?}");
        assert!(
            !seen[7..].iter().any(|k| matches!(k, ProbeFailed { .. })),
            "{seen:?}"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
