//! `command`: run a configured argv (e.g. `systemctl restart spire-agent`)
//! with a timeout; the exit code and the tail of its output are recorded.
//!
//! `{agent}` in any argument is replaced by the target agent's name. The
//! child is killed if the run is cancelled or times out. Output is collected
//! only until the child exits (plus a short grace), so a command that leaves
//! a daemon behind holding its stdout does not hang the actuator.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{Actuator, ActuatorError};
use crate::model::{Outcome, Step};

/// Bytes of output kept.
const TAIL: usize = 2048;

/// `[actuators.<name>] type = "command"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Program and arguments; `{agent}` is replaced by the target name.
    pub argv: Vec<String>,
    /// Upper bound for one run (the ladder rung's timeout also applies).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl CommandConfig {
    /// (field, problem) pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match self.argv.first() {
            None => out.push(("argv", "must name a program".to_string())),
            Some(p) if p.trim().is_empty() => {
                out.push(("argv", "program name is empty".to_string()));
            }
            _ => {}
        }
        if self.timeout.is_zero() {
            out.push(("timeout", "must be greater than zero".to_string()));
        }
        out
    }
}

/// Runs a program.
pub struct CommandActuator {
    config: CommandConfig,
}

impl CommandActuator {
    /// From its config.
    pub fn new(config: CommandConfig) -> Self {
        Self { config }
    }
}

async fn read_tail(mut r: impl AsyncRead + Unpin, tail: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        t.extend_from_slice(&buf[..n]);
        if t.len() > TAIL {
            let cut = t.len() - TAIL;
            t.drain(..cut);
        }
    }
}

#[async_trait]
impl Actuator for CommandActuator {
    fn name(&self) -> &'static str {
        "command"
    }

    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let argv: Vec<String> = self
            .config
            .argv
            .iter()
            .map(|a| a.replace("{agent}", &step.target))
            .collect();
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| ActuatorError::Failed("empty argv".into()))?;
        let limit = self.config.timeout.min(step.timeout);
        // Its own process group: on a timeout, or when the run is cancelled
        // (shutdown), the command and everything it started are killed, so
        // nothing acts on after us. A command that completes keeps what it
        // started (a restart script starts the agent).
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ActuatorError::Spawn {
                program: program.clone(),
                source,
            })?;
        let mut group = Group(child.id().map(|id| nix::unistd::Pid::from_raw(id as i32)));
        let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut readers = tokio::task::JoinSet::new();
        if let Some(out) = child.stdout.take() {
            readers.spawn(read_tail(out, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.spawn(read_tail(err, tail.clone()));
        }
        let status = match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) => {
                group.completed();
                status
            }
            Ok(Err(e)) => return Err(ActuatorError::Failed(format!("waiting for {program}: {e}"))),
            Err(_) => {
                group.kill();
                let _ = child.kill().await;
                return Err(ActuatorError::Timeout(limit));
            }
        };
        // Give the readers a moment to drain, then stop: a daemon started by
        // the command may hold the pipes open forever.
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            while readers.join_next().await.is_some() {}
        })
        .await;
        readers.abort_all();
        let output = {
            let t = tail.lock().unwrap_or_else(|p| p.into_inner());
            String::from_utf8_lossy(&t).into_owned()
        };
        let code = status.code();
        let detail = json!({ "argv": argv, "exit_code": code, "output_tail": output });
        if status.success() {
            Ok(Outcome::ok(detail))
        } else {
            Ok(Outcome {
                kind: crate::model::OutcomeKind::Error,
                error: Some(match code {
                    Some(c) => format!("{program} exited with status {c}"),
                    None => format!("{program} was killed by a signal"),
                }),
                detail,
            })
        }
    }
}

/// A command's process group, killed (SIGKILL) unless the command
/// completed: on a timeout, and when the run is dropped mid-way.
struct Group(Option<nix::unistd::Pid>);

impl Group {
    /// The command exited by itself: what it started stays.
    fn completed(&mut self) {
        self.0 = None;
    }

    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{OutcomeKind, SymptomKind};

    fn step(timeout: Duration) -> Step {
        Step {
            action_id: "a1".into(),
            incident_id: "i1".into(),
            symptom: SymptomKind::AgentUnreachable,
            rung: 1,
            actuator: "restart".into(),
            target: "node-a".into(),
            params: json!({}),
            timeout,
            verify_within: Duration::from_secs(1),
            dry_run: false,
        }
    }

    fn cmd(argv: &[&str]) -> CommandActuator {
        CommandActuator::new(CommandConfig {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(10),
        })
    }

    #[tokio::test]
    async fn records_exit_code_and_output_with_agent_substituted() {
        let out = cmd(&["/bin/sh", "-c", "echo restarting {agent}; exit 0"])
            .execute(&step(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(out.kind, OutcomeKind::Ok);
        assert_eq!(out.detail["exit_code"], 0);
        assert_eq!(out.detail["output_tail"], "restarting node-a\n");
    }

    #[tokio::test]
    async fn nonzero_exit_is_an_error_outcome() {
        let out = cmd(&["/bin/sh", "-c", "echo boom >&2; exit 3"])
            .execute(&step(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(out.kind, OutcomeKind::Error);
        assert_eq!(out.detail["exit_code"], 3);
        assert!(out.error.unwrap().contains("status 3"));
    }

    #[tokio::test]
    async fn timeout_kills() {
        let e = cmd(&["/bin/sh", "-c", "sleep 30"])
            .execute(&step(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "timeout");
    }

    /// Waits (bounded) until the process in `pidfile` is gone.
    async fn gone(pidfile: &std::path::Path) -> bool {
        let pid = loop {
            if let Ok(text) = std::fs::read_to_string(pidfile)
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                break nix::unistd::Pid::from_raw(pid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for _ in 0..250 {
            if nix::sys::signal::kill(pid, None).is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_timeout_kills_what_the_command_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let e = cmd(&["/bin/sh", "-c", &script])
            .execute(&step(Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "timeout");
        assert!(gone(&pidfile).await, "the grandchild outlived the timeout");
    }

    #[tokio::test]
    async fn a_cancelled_run_kills_what_the_command_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let c = cmd(&["/bin/sh", "-c", &script]);
        let s = step(Duration::from_secs(20));
        let run = c.execute(&s);
        // Dropped once the grandchild runs: as a shutdown past its grace.
        tokio::select! {
            _ = run => panic!("the command ended by itself"),
            _ = async {
                while !pidfile.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } => {}
        }
        assert!(
            gone(&pidfile).await,
            "the grandchild outlived the cancelled run"
        );
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let e = cmd(&["/nonexistent/program"])
            .execute(&step(Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "spawn");
    }

    #[tokio::test]
    async fn daemon_holding_stdout_does_not_hang() {
        let out = cmd(&["/bin/sh", "-c", "sleep 20 & echo started"])
            .execute(&step(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(out.kind, OutcomeKind::Ok);
    }
}
