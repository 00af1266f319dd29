//! The `spire-healer run` binary as a child process of a test (its own
//! process group, killed on drop), and polling for facts.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

/// The `spire-healer run` binary in its own process group, its JSON log
/// lines sent on a channel.
pub struct Daemon {
    /// The process.
    pub child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Daemon {
    pub fn spawn(config: &Path) -> Result<Daemon> {
        Self::spawn_with_env(config, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables.
    pub fn spawn_with_env(config: &Path, env: &[(&str, &Path)]) -> Result<Daemon> {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Daemon { child, lines })
    }

    /// The first log line (from now on) containing `needle`.
    pub async fn wait_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let found = timeout(limit, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => Ok(line),
            Ok(None) => bail!("the daemon exited before logging {needle:?}"),
            Err(_) => bail!("no {needle:?} in the log within {limit:?}"),
        }
    }

    /// The log lines received and not yet read, taken.
    pub fn take_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push(line);
        }
        out
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.child.id().context("already reaped")?;
        killpg(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        Ok(timeout(limit, self.child.wait()).await??)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.signal(Signal::SIGKILL);
    }
}

/// Polls `check` every 100 ms until it yields a value.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        sleep(Duration::from_millis(100)).await;
    }
}
