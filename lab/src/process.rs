//! One `spire-agent` or `spire-server` process slot: spawn, readiness,
//! signals, reaping. Shared by both labs.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

use super::{
    CLI_TIMEOUT, LabError, POLL, log_tail, open_append, output_text, pids_with_arg, process_alive,
    process_has_arg, run_bounded, write_file,
};

/// Written to an agent log before every agent start (by the lab and by the
/// restart script).
pub(crate) const AGENT_START_MARKER: &str = "---- spire-lab: starting spire-agent ----";
/// Written to a server log before every server start.
pub(crate) const SERVER_START_MARKER: &str = "---- spire-lab: starting spire-server ----";

/// How long a SIGKILLed process may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

fn signal(pid: i32, sig: Signal) -> Result<(), LabError> {
    kill(Pid::from_raw(pid), sig).map_err(|source| LabError::Signal {
        pid,
        signal: sig.as_str(),
        source,
    })
}

/// The text of `log` from its last `marker` line on (the current run).
fn current_run(log: &Path, marker: &str) -> String {
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    match text.rfind(marker) {
        Some(i) => text[i..].to_owned(),
        None => text,
    }
}

/// Kills a child we own and waits (blocking, bounded) until it is reaped.
pub(crate) fn kill_child_blocking(child: &mut Child) {
    let _ = child.start_kill();
    for _ in 0..500 {
        if !matches!(child.try_wait(), Ok(None)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// === impl AgentProc ===

/// One agent: its files and whichever process currently runs it.
pub(crate) struct AgentProc {
    pub bin: PathBuf,
    /// Working directory of the agent.
    pub cwd: PathBuf,
    pub conf: PathBuf,
    pub log: PathBuf,
    pub pidfile: PathBuf,
    /// A pending join token, consumed by the next start.
    pub token_file: PathBuf,
    pub restart_script: PathBuf,
    pub workload_socket: PathBuf,
    pub admin_socket: PathBuf,
    /// The agent this lab spawned last (it may since have been killed by the
    /// restart script; it is reaped whenever that is noticed).
    child: Mutex<Option<Child>>,
    /// Agent pids read from the pidfile that may still need reaping.
    seen: Mutex<Vec<i32>>,
}

pub(crate) struct AgentPaths {
    pub bin: PathBuf,
    pub cwd: PathBuf,
    pub conf: PathBuf,
    pub log: PathBuf,
    pub pidfile: PathBuf,
    pub token_file: PathBuf,
    pub restart_script: PathBuf,
    pub workload_socket: PathBuf,
    pub admin_socket: PathBuf,
}

impl AgentProc {
    pub fn new(p: AgentPaths) -> Self {
        Self {
            bin: p.bin,
            cwd: p.cwd,
            conf: p.conf,
            log: p.log,
            pidfile: p.pidfile,
            token_file: p.token_file,
            restart_script: p.restart_script,
            workload_socket: p.workload_socket,
            admin_socket: p.admin_socket,
            child: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// `/bin/sh <restart script>`.
    pub fn restart_command(&self) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            self.restart_script.to_string_lossy().into_owned(),
        ]
    }

    /// The pid in the pidfile, if that process is a live agent of this slot.
    pub fn pid(&self) -> Option<i32> {
        let pid = self.pidfile_pid()?;
        process_has_arg(pid, &self.conf).then_some(pid)
    }

    pub fn pidfile_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if !seen.contains(&pid) {
            seen.push(pid);
        }
        Some(pid)
    }

    /// SIGKILLs the current agent and waits until it is gone.
    pub async fn kill(&self) -> Result<(), LabError> {
        self.reap();
        if let Some(pid) = self.pid() {
            let _ = signal(pid, Signal::SIGKILL);
            self.wait_gone(pid).await?;
        }
        self.reap();
        Ok(())
    }

    pub fn freeze(&self) -> Result<(), LabError> {
        let pid = self
            .pid()
            .ok_or_else(|| LabError::State("no running agent to freeze".into()))?;
        signal(pid, Signal::SIGSTOP)
    }

    pub fn thaw(&self) -> Result<(), LabError> {
        let pid = self
            .pid()
            .ok_or_else(|| LabError::State("no running agent to thaw".into()))?;
        signal(pid, Signal::SIGCONT)
    }

    /// Kills the current agent and starts a new one (passing and deleting a
    /// pending join token), without waiting for readiness.
    pub async fn spawn(&self) -> Result<i32, LabError> {
        self.kill().await?;
        let mut log = open_append(&self.log)?;
        writeln!(log, "{AGENT_START_MARKER}")
            .map_err(LabError::io(format!("writing {}", self.log.display())))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg("-config").arg(&self.conf);
        let token = fs::read_to_string(&self.token_file)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        if let Some(token) = &token {
            cmd.arg("-joinToken").arg(token);
        }
        let stdout = log
            .try_clone()
            .map_err(LabError::io(format!("opening {}", self.log.display())))?;
        cmd.current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(LabError::io("spawning spire-agent"))?;
        let pid = child
            .id()
            .ok_or_else(|| LabError::State("spire-agent exited at once".into()))?
            as i32;
        if token.is_some() {
            let _ = fs::remove_file(&self.token_file);
        }
        write_file(&self.pidfile, format!("{pid}\n").as_bytes())?;
        *self.child.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);
        Ok(pid)
    }

    /// Waits (bounded) until the current agent answers `spire-agent
    /// healthcheck`; fails early when no agent has been running for 3 s.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + limit;
        let mut gone_since: Option<Instant> = None;
        loop {
            self.reap();
            if self.pid().is_none() {
                // A restart in progress may leave the pidfile naming the old
                // agent for a moment; only a lasting absence is an error.
                let since = *gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    return Err(LabError::Exited {
                        what: format!(
                            "spire-agent is not running (pidfile {:?})",
                            self.pidfile_pid()
                        ),
                        status: "gone".into(),
                        log: self.log.clone(),
                        tail: log_tail(&self.log),
                    });
                }
            } else {
                gone_since = None;
            }
            if self.healthcheck().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::not_ready(
                    "spire-agent not ready",
                    limit,
                    &self.log,
                ));
            }
            sleep(POLL).await;
        }
    }

    /// Waits (bounded) until no agent of this slot runs.
    pub async fn wait_exited(&self, limit: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + limit;
        loop {
            self.reap();
            if self.pid().is_none() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::not_ready(
                    "spire-agent still running",
                    limit,
                    &self.log,
                ));
            }
            sleep(POLL).await;
        }
    }

    /// `spire-agent healthcheck` against the Workload API socket, bounded.
    pub async fn healthcheck(&self) -> bool {
        let args = [
            "healthcheck".to_owned(),
            "-socketPath".to_owned(),
            self.workload_socket.to_string_lossy().into_owned(),
        ];
        matches!(
            run_bounded(&self.bin, &args, Duration::from_secs(3)).await,
            Ok(out) if out.status.success()
        )
    }

    /// `spire-agent api fetch x509 -output json` as this process's uid.
    pub async fn fetch_x509(&self, fetch_timeout: Duration) -> Result<Output, LabError> {
        let secs = fetch_timeout.as_secs().max(1);
        let args = [
            "api",
            "fetch",
            "x509",
            "-socketPath",
            &self.workload_socket.to_string_lossy(),
            "-timeout",
            &format!("{secs}s"),
            "-output",
            "json",
        ]
        .map(String::from);
        run_bounded(&self.bin, &args, fetch_timeout + Duration::from_secs(5)).await
    }

    /// The SPIFFE IDs the Workload API gives this process's uid.
    pub async fn fetch_x509_ids(&self, fetch_timeout: Duration) -> Result<Vec<String>, LabError> {
        let out = self.fetch_x509(fetch_timeout).await?;
        let command = "spire-agent api fetch x509";
        if !out.status.success() {
            return Err(LabError::Command {
                command: command.into(),
                status: out.status.to_string(),
                output: output_text(&out),
            });
        }
        let v = super::parse_json(command, &out)?;
        Ok(v["svids"]
            .as_array()
            .map(|svids| {
                svids
                    .iter()
                    .filter_map(|s| s["spiffe_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `spire-agent debug getinfo -output json` on the admin socket, bounded.
    pub async fn debug_info(&self) -> Result<serde_json::Value, LabError> {
        let args = [
            "debug",
            "getinfo",
            "-socketPath",
            &self.admin_socket.to_string_lossy(),
            "-output",
            "json",
        ]
        .map(String::from);
        let out = run_bounded(&self.bin, &args, Duration::from_secs(5)).await?;
        let command = "spire-agent debug getinfo";
        if !out.status.success() {
            return Err(LabError::Command {
                command: command.into(),
                status: out.status.to_string(),
                output: output_text(&out),
            });
        }
        super::parse_json(command, &out)
    }

    /// The log from the last start marker on.
    pub fn current_log(&self) -> String {
        current_run(&self.log, AGENT_START_MARKER)
    }

    /// Waits (bounded) until the current run has cached an SVID for `id`.
    pub async fn wait_for_svid_logged(&self, id: &str, limit: Duration) -> Result<(), LabError> {
        let logged = format!("spiffe_id=\"{id}\"");
        let deadline = Instant::now() + limit;
        loop {
            if self
                .current_log()
                .lines()
                .any(|l| l.contains("X509-SVID") && l.contains(&logged))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::not_ready(
                    format!("entry {id} not synced to the agent"),
                    limit,
                    &self.log,
                ));
            }
            sleep(POLL).await;
        }
    }

    /// Reaps dead agents: the child we spawned once it is no longer current
    /// or has exited, and agents started by the restart script that were
    /// re-parented to this process.
    pub fn reap(&self) {
        let own = self.reap_own_child();
        self.reap_adopted(own);
    }

    /// Reaps exited agents among the pids seen in the pidfile, except `own`
    /// (our tokio child, reaped through its handle).
    fn reap_adopted(&self, own: Option<i32>) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.retain(|&pid| {
            if Some(pid) == own {
                return true;
            }
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => true,
                Ok(_) => false,
                // Not (yet) our child: keep watching while it lives.
                Err(Errno::ECHILD) => process_alive(pid),
                Err(_) => false,
            }
        });
    }

    /// Returns the pid of our agent child if it is still unreaped.
    fn reap_own_child(&self) -> Option<i32> {
        let current = self.pidfile_pid();
        let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(child) = guard.as_mut() {
            let exited = matches!(child.try_wait(), Ok(Some(_)) | Err(_));
            if exited {
                *guard = None;
            } else if child.id().map(|p| p as i32) != current {
                // Superseded but still running: it must not linger.
                kill_child_blocking(child);
                *guard = None;
            }
        }
        guard.as_ref().and_then(|c| c.id()).map(|p| p as i32)
    }

    async fn wait_gone(&self, pid: i32) -> Result<(), LabError> {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            self.reap();
            if !process_alive(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::State(format!(
                    "spire-agent pid {pid} still alive {KILL_WAIT:?} after SIGKILL"
                )));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// For `Drop`: SIGKILLs every process running this agent's config (the
    /// current one, possibly started by the restart script, and any other
    /// found in /proc) and reaps what it can, blocking for a few seconds at
    /// most.
    pub fn kill_blocking(&self) {
        let mut pids = pids_with_arg(&self.conf);
        if let Some(pid) = self.pid()
            && !pids.contains(&pid)
        {
            pids.push(pid);
        }
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut child) = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            kill_child_blocking(&mut child);
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            for pid in pids {
                if !seen.contains(&pid) {
                    seen.push(pid);
                }
            }
        }
        for _ in 0..500 {
            self.reap_adopted(None);
            let alive = self
                .seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|&p| process_alive(p));
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reap_adopted(None);
    }
}

// === impl ServerProc ===

/// One server: its files and its process (always our child).
pub(crate) struct ServerProc {
    pub bin: PathBuf,
    pub cwd: PathBuf,
    pub conf: PathBuf,
    pub log: PathBuf,
    /// Holds the pid of the current run, for other programs.
    pub pidfile: Option<PathBuf>,
    pub socket: PathBuf,
    child: Mutex<Option<Child>>,
    frozen: AtomicBool,
}

impl ServerProc {
    pub fn new(
        bin: PathBuf,
        cwd: PathBuf,
        conf: PathBuf,
        log: PathBuf,
        pidfile: Option<PathBuf>,
        socket: PathBuf,
    ) -> Self {
        Self {
            bin,
            cwd,
            conf,
            log,
            pidfile,
            socket,
            child: Mutex::new(None),
            frozen: AtomicBool::new(false),
        }
    }

    /// The pid of the running server, if any.
    pub fn pid(&self) -> Option<i32> {
        let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let child = guard.as_mut()?;
        if matches!(child.try_wait(), Ok(None)) {
            child.id().map(|p| p as i32)
        } else {
            *guard = None;
            None
        }
    }

    /// Running and not frozen.
    pub fn available(&self) -> bool {
        self.pid().is_some() && !self.frozen.load(Ordering::SeqCst)
    }

    pub fn frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Kills a running instance, starts the server and waits (bounded) until
    /// it logged `Starting Server APIs` twice and answers `healthcheck`.
    pub async fn start(&self, limit: Duration) -> Result<(), LabError> {
        self.kill().await?;
        let mut log = open_append(&self.log)?;
        writeln!(log, "{SERVER_START_MARKER}")
            .map_err(LabError::io(format!("writing {}", self.log.display())))?;
        let stdout = log
            .try_clone()
            .map_err(LabError::io(format!("opening {}", self.log.display())))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("-config")
            .arg(&self.conf)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(LabError::io("spawning spire-server"))?;
        if let (Some(pidfile), Some(pid)) = (&self.pidfile, child.id()) {
            write_file(pidfile, format!("{pid}\n").as_bytes())?;
        }
        *self.child.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);
        self.frozen.store(false, Ordering::SeqCst);

        let deadline = Instant::now() + limit;
        loop {
            let exited = {
                let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
                guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
            };
            if let Some(status) = exited {
                return Err(LabError::Exited {
                    what: "spire-server exited during startup".into(),
                    status: status.to_string(),
                    log: self.log.clone(),
                    tail: log_tail(&self.log),
                });
            }
            let started = current_run(&self.log, SERVER_START_MARKER)
                .matches("Starting Server APIs")
                .count()
                >= 2;
            if started && self.healthcheck().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::not_ready(
                    "spire-server not ready",
                    limit,
                    &self.log,
                ));
            }
            sleep(POLL).await;
        }
    }

    /// `spire-server healthcheck` on the admin socket, bounded (3 s).
    pub async fn healthcheck(&self) -> bool {
        let args = [
            "healthcheck".to_owned(),
            "-socketPath".to_owned(),
            self.socket.to_string_lossy().into_owned(),
        ];
        matches!(
            run_bounded(&self.bin, &args, Duration::from_secs(3)).await,
            Ok(out) if out.status.success()
        )
    }

    /// SIGKILLs the server and waits until it is reaped.
    pub async fn kill(&self) -> Result<(), LabError> {
        let child = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.frozen.store(false, Ordering::SeqCst);
        let Some(mut child) = child else {
            return Ok(());
        };
        let _ = child.start_kill();
        match tokio::time::timeout(KILL_WAIT, child.wait()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(LabError::State(format!(
                "spire-server {} still alive {KILL_WAIT:?} after SIGKILL",
                self.conf.display()
            ))),
        }
    }

    pub fn freeze(&self) -> Result<(), LabError> {
        let pid = self
            .pid()
            .ok_or_else(|| LabError::State("no running server to freeze".into()))?;
        signal(pid, Signal::SIGSTOP)?;
        self.frozen.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub fn thaw(&self) -> Result<(), LabError> {
        let pid = self
            .pid()
            .ok_or_else(|| LabError::State("no running server to thaw".into()))?;
        signal(pid, Signal::SIGCONT)?;
        self.frozen.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Runs `spire-server <args> -socketPath <socket>`, bounded; fails on a
    /// non-zero exit.
    pub async fn cli(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // Subcommand flags must follow the subcommand words.
        let pos = argv
            .iter()
            .position(|a| a.starts_with('-'))
            .unwrap_or(argv.len());
        argv.insert(pos, "-socketPath".into());
        argv.insert(pos + 1, self.socket.to_string_lossy().into_owned());
        let out = run_bounded(&self.bin, &argv, CLI_TIMEOUT).await?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("spire-server {}", argv.join(" ")),
                status: out.status.to_string(),
                output: output_text(&out),
            });
        }
        Ok(out)
    }

    /// For `Drop`: SIGKILLs and reaps the server (and any other process
    /// running its config), blocking for a few seconds at most.
    pub fn kill_blocking(&self) {
        if let Some(mut child) = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            kill_child_blocking(&mut child);
        }
        for pid in pids_with_arg(&self.conf) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            for _ in 0..200 {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(_) => break,
                    Err(_) if !process_alive(pid) => break,
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
