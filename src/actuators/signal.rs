//! `signal`: send a signal (SIGHUP by default) to a local process found by
//! pidfile or by exact name, e.g. to make a workload or proxy reload the
//! SVID files that `spiffe-helper` rewrote, or to stop a wedged agent.
//!
//! Guarantees:
//! - A pidfile is trusted only after checking /proc: the pid must be a live,
//!   non-zombie process and, when `process_name` / `match_arg` are set, its
//!   name and command line must match. A recycled pid is refused with an
//!   error outcome that says why; nothing is signalled.
//! - Pid 1, pids below 1 (which `kill(2)` treats as process groups) and our
//!   own pid are never signalled.
//! - Resolving the targets and sending the signal run back to back on a
//!   blocking thread, with no `.await` in between.
//!
//! Caveat: without pidfds there is still a window of microseconds between
//! the /proc check and `kill(2)` in which the pid could be recycled.

use std::fs;
use std::time::Duration;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Actuator, ActuatorError, Class};
use crate::model::{Outcome, OutcomeKind, Step};

/// The signals this actuator may send.
const SIGNALS: &[(&str, Signal)] = &[
    ("SIGHUP", Signal::SIGHUP),
    ("SIGUSR1", Signal::SIGUSR1),
    ("SIGUSR2", Signal::SIGUSR2),
    ("SIGINT", Signal::SIGINT),
    ("SIGQUIT", Signal::SIGQUIT),
    ("SIGTERM", Signal::SIGTERM),
    ("SIGKILL", Signal::SIGKILL),
];

/// Longest name `/proc/<pid>/comm` can hold (the kernel truncates it).
const COMM_MAX: usize = 15;

/// Parses a signal name from the closed set (`SIGHUP`, `SIGTERM`, …).
pub fn parse_signal(name: &str) -> Option<Signal> {
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// `[actuators.<name>] type = "signal"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    /// Signal name: `SIGHUP` (default), `SIGUSR1`, `SIGUSR2`, `SIGINT`,
    /// `SIGQUIT`, `SIGTERM` or `SIGKILL`.
    #[serde(default = "default_signal")]
    pub signal: String,
    /// File holding the target's pid; `{agent}` is replaced by the target
    /// name. Exactly one of `pidfile` and `process_name` is set.
    #[serde(default)]
    pub pidfile: Option<String>,
    /// Exact `/proc/<pid>/comm` of the target (at most 15 bytes). Alone, it
    /// selects every live process of that name; with `pidfile`, it is a
    /// check that the pid was not recycled.
    #[serde(default)]
    pub process_name: Option<String>,
    /// An argument the target's command line must contain, exactly (e.g.
    /// the workload's config path); `{agent}` is replaced by the target name.
    #[serde(default)]
    pub match_arg: Option<String>,
    /// Upper bound for one run (the ladder rung's timeout also applies).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_signal() -> String {
    "SIGHUP".to_string()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl SignalConfig {
    /// (field, problem) pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if parse_signal(&self.signal).is_none() {
            let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            out.push((
                "signal",
                format!(
                    "unknown signal {:?}; expected one of {}",
                    self.signal,
                    known.join(", ")
                ),
            ));
        }
        match (&self.pidfile, &self.process_name) {
            (Some(_), Some(_)) | (None, None) => out.push((
                "pidfile",
                "set exactly one of pidfile and process_name".to_string(),
            )),
            _ => {}
        }
        if self.pidfile.as_deref().is_some_and(|p| p.trim().is_empty()) {
            out.push(("pidfile", "is empty".to_string()));
        }
        if let Some(name) = &self.process_name {
            if name.is_empty() {
                out.push(("process_name", "is empty".to_string()));
            } else if name.contains('/') {
                out.push((
                    "process_name",
                    "is a process name (/proc/<pid>/comm), not a path".to_string(),
                ));
            } else if name.len() > COMM_MAX {
                out.push((
                    "process_name",
                    format!(
                        "{name:?} is longer than {COMM_MAX} bytes and can never match \
                         /proc/<pid>/comm (the kernel truncates it); use its first \
                         {COMM_MAX} bytes"
                    ),
                ));
            }
        }
        if self.match_arg.as_deref().is_some_and(str::is_empty) {
            out.push(("match_arg", "is empty".to_string()));
        }
        if self.timeout.is_zero() {
            out.push(("timeout", "must be greater than zero".to_string()));
        }
        out
    }
}

// === impl SignalActuator ===

/// Sends a signal to a local process.
pub struct SignalActuator {
    config: SignalConfig,
    /// `None` only for a config that failed validation.
    signal: Option<Signal>,
}

impl SignalActuator {
    /// From its config (validated by [`SignalConfig::problems`]).
    pub fn new(config: SignalConfig) -> Self {
        let signal = parse_signal(&config.signal);
        Self { config, signal }
    }
}

#[async_trait]
impl Actuator for SignalActuator {
    fn name(&self) -> &'static str {
        "signal"
    }

    /// Reload-style signals are [`Class::Gentle`]; signals that stop the
    /// target (SIGINT, SIGQUIT, SIGTERM, SIGKILL) are [`Class::AgentLocal`].
    fn class(&self) -> Class {
        match self.signal {
            Some(Signal::SIGHUP | Signal::SIGUSR1 | Signal::SIGUSR2) => Class::Gentle,
            _ => Class::AgentLocal,
        }
    }

    /// Resolves the target pids and signals them. A target that cannot be
    /// resolved safely (missing or garbled pidfile, stale pid, no process of
    /// that name) is an error outcome naming why.
    ///
    /// # Errors
    ///
    /// [`ActuatorError::Failed`] for an unknown signal name (config
    /// validation prevents it), [`ActuatorError::Timeout`] when reading
    /// /proc or the pidfile takes longer than the timeout.
    ///
    /// # Cancel safety
    ///
    /// The work runs on a blocking thread that is not interrupted: once
    /// started, the targets are resolved and signalled back to back even if
    /// this future is dropped or times out. Sending the same signal again
    /// is harmless for reload signals; a target that a stop signal already
    /// ended no longer resolves, so a rerun reports it instead of
    /// signalling anything.
    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let signal = self.signal.ok_or_else(|| {
            ActuatorError::Failed(format!("unknown signal {:?}", self.config.signal))
        })?;
        let target = Target::new(&self.config, &step.target);
        let limit = self.config.timeout.min(step.timeout);
        let job = tokio::task::spawn_blocking(move || target.signal(signal, own_pid()));
        match tokio::time::timeout(limit, job).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(ActuatorError::Failed(format!("signal task failed: {e}"))),
            Err(_) => Err(ActuatorError::Timeout(limit)),
        }
    }
}

fn own_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(i32::MAX)
}

// === impl Target ===

/// How to find the processes, with `{agent}` substituted.
#[derive(Debug, Clone)]
struct Target {
    pidfile: Option<String>,
    process_name: Option<String>,
    match_arg: Option<String>,
}

impl Target {
    fn new(config: &SignalConfig, agent: &str) -> Self {
        Self {
            pidfile: config.pidfile.as_ref().map(|p| p.replace("{agent}", agent)),
            process_name: config.process_name.clone(),
            match_arg: config
                .match_arg
                .as_ref()
                .map(|a| a.replace("{agent}", agent)),
        }
    }

    fn detail(&self, signal: Signal) -> Value {
        json!({
            "signal": signal.as_str(),
            "pidfile": self.pidfile,
            "process_name": self.process_name,
            "match_arg": self.match_arg,
        })
    }

    /// Resolves and signals, with nothing in between but /proc reads.
    fn signal(&self, signal: Signal, me: i32) -> Outcome {
        let mut detail = self.detail(signal);
        let pids = match self.resolve(me) {
            Ok(pids) => pids,
            Err(why) => return error_outcome(why, detail),
        };
        let mut sent = Vec::new();
        let mut vanished = Vec::new();
        let mut failed = Vec::new();
        for pid in pids {
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) => sent.push(pid),
                Err(Errno::ESRCH) => vanished.push(pid),
                Err(e) => failed.push(format!("pid {pid}: {}", e.desc())),
            }
        }
        detail["pids"] = json!(sent);
        if !vanished.is_empty() {
            detail["vanished"] = json!(vanished);
        }
        if !failed.is_empty() {
            let why = format!("cannot send {} to {}", signal.as_str(), failed.join("; "));
            detail["failed"] = json!(failed);
            return error_outcome(why, detail);
        }
        if sent.is_empty() {
            let why = format!(
                "pid {} exited before {} could be sent",
                join_pids(&vanished),
                signal.as_str()
            );
            return error_outcome(why, detail);
        }
        Outcome::ok(detail)
    }

    /// The pids to signal, or why there are none.
    fn resolve(&self, me: i32) -> Result<Vec<i32>, String> {
        match (&self.pidfile, &self.process_name) {
            (Some(pidfile), _) => self.via_pidfile(pidfile, me).map(|pid| vec![pid]),
            (None, Some(name)) => self.by_name(name, me),
            (None, None) => Err("neither pidfile nor process_name is set".to_string()),
        }
    }

    fn via_pidfile(&self, pidfile: &str, me: i32) -> Result<i32, String> {
        let text = fs::read_to_string(pidfile)
            .map_err(|e| format!("cannot read pidfile {pidfile}: {e}"))?;
        let pid: i32 = text.trim().parse().map_err(|_| {
            let shown: String = text.trim().chars().take(40).collect();
            format!("pidfile {pidfile} does not hold a pid: {shown:?}")
        })?;
        if pid < 1 {
            return Err(format!(
                "pidfile {pidfile} names pid {pid}, which is not a process id"
            ));
        }
        if let Some(why) = forbidden(pid, me) {
            return Err(format!("pidfile {pidfile} names pid {pid}: {why}"));
        }
        let names = format!("pidfile {pidfile} names pid {pid}");
        let Some(state) = proc_state(pid) else {
            return Err(format!("{names}, which is not running"));
        };
        if is_dead(state) {
            return Err(format!("{names}, which is not running (state {state})"));
        }
        if let Some(want) = &self.process_name {
            let comm = proc_comm(pid).ok_or_else(|| format!("{names}, which is not running"))?;
            if &comm != want {
                return Err(format!("{names}, which is now `{comm}`, not `{want}`"));
            }
        }
        if let Some(arg) = &self.match_arg
            && !proc_has_arg(pid, arg)
        {
            let comm = proc_comm(pid).unwrap_or_default();
            return Err(format!(
                "{names}, which is now `{comm}` without the argument {arg:?}"
            ));
        }
        Ok(pid)
    }

    fn by_name(&self, name: &str, me: i32) -> Result<Vec<i32>, String> {
        let entries = fs::read_dir("/proc").map_err(|e| format!("cannot list /proc: {e}"))?;
        let mut pids: Vec<i32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid > 0 && forbidden(pid, me).is_none())
            .filter(|&pid| proc_comm(pid).as_deref() == Some(name))
            .filter(|&pid| proc_state(pid).is_some_and(|s| !is_dead(s)))
            .filter(|&pid| {
                self.match_arg
                    .as_deref()
                    .is_none_or(|a| proc_has_arg(pid, a))
            })
            .collect();
        pids.sort_unstable();
        if pids.is_empty() {
            return Err(match &self.match_arg {
                Some(arg) => format!("no live process named `{name}` with the argument {arg:?}"),
                None => format!("no live process named `{name}`"),
            });
        }
        Ok(pids)
    }
}

/// Why `pid` must never be signalled, if it must not.
fn forbidden(pid: i32, me: i32) -> Option<&'static str> {
    if pid == 1 {
        Some("refusing to signal pid 1")
    } else if pid == me {
        Some("refusing to signal our own process")
    } else {
        None
    }
}

fn error_outcome(why: String, detail: Value) -> Outcome {
    Outcome {
        kind: OutcomeKind::Error,
        detail,
        error: Some(why),
    }
}

fn join_pids(pids: &[i32]) -> String {
    pids.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

// === /proc ===

/// The state letter from `/proc/<pid>/stat`, if the process exists.
fn proc_state(pid: i32) -> Option<char> {
    stat_state(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The state follows the parenthesised command name, which may itself
/// contain spaces and parentheses.
fn stat_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// Zombie or dead: exited, only waiting to be reaped.
fn is_dead(state: char) -> bool {
    matches!(state, 'Z' | 'X' | 'x')
}

fn proc_comm(pid: i32) -> Option<String> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.strip_suffix('\n').unwrap_or(&comm).to_string())
}

/// One of the process's command-line arguments is exactly `arg`.
fn proc_has_arg(pid: i32, arg: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())
}

#[cfg(test)]
mod tests;
