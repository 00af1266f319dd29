//! Smoke tests of the real-SPIRE lab harness itself.

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use tokio::process::Command;
use tokio::time::{Instant, sleep, timeout};

use crate::spire_lab::{LabOptions, SpireLab, WAIT_LIMIT, log_tail, process_alive};

/// Polls `spire-agent api fetch x509` until it succeeds and returns `id`.
async fn wait_fetch_has(lab: &SpireLab, id: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let last = lab.fetch_x509_ids(Duration::from_secs(3)).await;
        if matches!(&last, Ok(ids) if ids.iter().any(|i| i == id)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "fetch x509 never returned {id}; last attempt: {last:?}\nagent log:\n{}",
                log_tail(&lab.agent_log())
            );
        }
        sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_health_ok(lab: &SpireLab) -> Result<()> {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !lab.agent_health_ok().await {
        ensure!(
            Instant::now() < deadline,
            "{} never answered 200; agent log:\n{}",
            lab.agent_health_url(),
            log_tail(&lab.agent_log())
        );
        sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_fetch_then_external_restart() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    let uid = nix::unistd::geteuid().as_raw();
    lab.register_entry("/smoke/restart", uid, 30).await?;
    lab.wait_for_entry_synced("/smoke/restart").await?;
    let id = lab.spiffe_id("/smoke/restart");
    wait_fetch_has(&lab, &id).await?;
    wait_health_ok(&lab).await?;

    let old_pid = lab
        .agent_pid()
        .context("agent not running before the restart")?;
    let argv = lab.restart_command();
    let started = Instant::now();
    let out = timeout(
        Duration::from_secs(10),
        Command::new(&argv[0]).args(&argv[1..]).output(),
    )
    .await
    .context("restart command did not exit within 10 s")??;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "restart command failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        took < Duration::from_secs(3),
        "restart command took {took:?}"
    );

    lab.wait_agent_ready().await?;
    let new_pid = lab
        .agent_pid()
        .context("no agent running after the restart")?;
    assert_ne!(old_pid, new_pid, "the pidfile still names the old agent");
    ensure!(
        !process_alive(old_pid),
        "the old agent (pid {old_pid}) survived the restart"
    );
    wait_health_ok(&lab).await?;
    wait_fetch_has(&lab, &id).await?;

    // Harness control keeps working on the externally started agent.
    lab.kill_agent().await?;
    ensure!(
        lab.agent_pid().is_none(),
        "agent still running after kill_agent"
    );
    ensure!(
        !process_alive(new_pid),
        "agent pid {new_pid} survived kill_agent"
    );
    lab.start_agent().await?;
    wait_fetch_has(&lab, &id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_freeze_and_thaw() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    let uid = nix::unistd::geteuid().as_raw();
    lab.register_entry("/smoke/freeze", uid, 30).await?;
    lab.wait_for_entry_synced("/smoke/freeze").await?;
    let id = lab.spiffe_id("/smoke/freeze");
    wait_fetch_has(&lab, &id).await?;

    lab.freeze_agent()?;
    let out = lab.fetch_x509(Duration::from_secs(2)).await;
    let frozen_fetch_ok = matches!(&out, Ok(o) if o.status.success());
    // Thaw before asserting so that a failure leaves no stopped process behind.
    lab.thaw_agent()?;
    ensure!(
        !frozen_fetch_ok,
        "fetch succeeded against a frozen agent: {out:?}"
    );

    wait_fetch_has(&lab, &id).await?;
    Ok(())
}
