//! Replay on real SPIRE: the loop heals a killed agent while recording
//! observation frames; `spire-healer replay` then runs analyze + plan over
//! those frames under a policy whose ladder restarts first, and shows,
//! side by side, the refetch that was done and the restart the other policy
//! would have started.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use spire_healer::policy::DEFAULT_POLICY;

use crate::helpers::Healer;
use crate::spire_lab::{LabOptions, SpireLab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_shows_what_another_policy_would_have_done_with_a_recorded_fault() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    lab.register_entry("/healer", nix::unistd::geteuid().as_raw(), 300)
        .await?;
    lab.wait_for_entry_synced("/healer").await?;
    let healer = Healer::start(&lab, None).await?;
    let (incident, _) = healer
        .kill_agent_and_wait_open(&lab, Duration::from_secs(15))
        .await?;
    healer
        .wait_closed(&incident.id, Duration::from_secs(60))
        .await?;
    healer
        .wait_actions_verified(&incident.id, Duration::from_secs(30))
        .await?;
    let store = format!(
        "sqlite://{}",
        healer.config.parent().unwrap().join("healer.db").display()
    );
    let config = healer.config.clone();
    let dir = config.parent().unwrap().to_path_buf();
    // Stopping writes the frames still queued.
    let _files = healer.stop_keeping_files().await;

    // The other policy: the agent_unreachable ladder starts with the restart.
    let other = dir.join("restart-first.toml");
    let edited = DEFAULT_POLICY.replace(
        "[[ladders.agent_unreachable]]\nactuator = \"refetch\"\ntimeout = \"5s\"\nverify_within = \"3s\"\n\n",
        "",
    );
    ensure!(edited != DEFAULT_POLICY, "the refetch rung was removed");
    std::fs::write(&other, edited)?;

    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
            .args(["replay", "--store", &store, "--since", "10m", "-o", "json"])
            .arg("--config")
            .arg(&config)
            .arg("--policy")
            .arg(&other)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("replay timed out")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "replay failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(report["frames"].as_u64().unwrap_or(0) > 0, "{report:#}");
    let rows = report["rows"].as_array().context("rows")?;
    let unreachable: Vec<&Value> = rows
        .iter()
        .filter(|r| r["symptom"] == "agent_unreachable")
        .collect();
    let acted = |side: &str, actuator: &str| {
        unreachable.iter().any(|r| {
            r[side].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["decision"] == "acted" && d["actuator"] == actuator)
            })
        })
    };
    ensure!(acted("recorded", "refetch"), "recorded refetch: {report:#}");
    ensure!(
        acted("replayed", "restart-agent"),
        "replayed restart first: {report:#}"
    );
    ensure!(
        !acted("replayed", "refetch"),
        "the other policy has no refetch: {report:#}"
    );
    println!("replay: {} frames, {} rows", report["frames"], rows.len());
    Ok(())
}
