//! Idle cost of `spire-healer run` supervising one real agent: CPU share and
//! resident memory over a minute. A measurement, not a test: it is ignored
//! by default and prints figures for BENCHMARKS.md.
//!
//! `cargo test --release --test it idle -- --ignored --nocapture`

use std::time::Duration;

use anyhow::{Context, Result};

use crate::spire_lab::{LabOptions, SpireLab};

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// A `Vm*` line of /proc/<pid>/status, in KiB.
fn vm_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .context("status key")?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

#[tokio::test]
#[ignore = "measurement; run explicitly"]
async fn idle_cost_against_one_real_agent() -> Result<()> {
    let window: u64 = std::env::var("IDLE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let lab = SpireLab::start(LabOptions::default()).await?;
    lab.register_entry("/healer", nix::unistd::geteuid().as_raw(), 3600)
        .await?;
    lab.wait_for_entry_synced("/healer").await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("spire-healer.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[database]
url = "sqlite://{db}"
[http]
listen = "127.0.0.1:0"
[[agents]]
name = "idle"
address = "unix://{sock}"
"#,
            db = dir.path().join("h.db").display(),
            sock = lab.workload_socket().display()
        ),
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("pid")?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let hz = 100.0; // USER_HZ on Linux
    let t0 = cpu_ticks(pid)?;
    tokio::time::sleep(Duration::from_secs(window)).await;
    let t1 = cpu_ticks(pid)?;
    let cpu = (t1 - t0) as f64 / hz / window as f64 * 100.0;
    let rss = vm_kib(pid, "VmRSS:")? as f64 / 1024.0;
    let hwm = vm_kib(pid, "VmHWM:")? as f64 / 1024.0;
    println!(
        "idle over {window}s supervising 1 agent: CPU {cpu:.3}% of one core, RSS {rss:.1} MiB (peak {hwm:.1} MiB)"
    );
    assert!(child.try_wait()?.is_none(), "spire-healer kept running");
    child.kill().await?;
    Ok(())
}
