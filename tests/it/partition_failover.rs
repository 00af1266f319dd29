//! A network partition between agent-0 and server A while A's admin API
//! answers (`spire-lab chaos --faults sync_loss`, a cut TCP proxy on
//! agent-0's path to A): spire-healer sees A's agent-facing address
//! unreachable from the node, fails agent-0 over to server B and the agent
//! syncs again. The heal time is printed, never asserted.
//! Needs `SPIRE_HEALER_TEST_PG_URL`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use spire_lab::chaos::{Fault, RunRecord, SupervisorKind};

use crate::spire_lab::{lab_bin, test_pg_url};

/// Bound of the whole run (lab setup plus a 90 s window).
const LIMIT: Duration = Duration::from_secs(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_from_server_a_fails_over_to_b() -> Result<()> {
    let out = tempfile::tempdir()?;
    let child = tokio::process::Command::new(lab_bin())
        .args([
            "chaos",
            "--runs",
            "1",
            "--seed",
            "13",
            "--faults",
            "sync_loss",
            "--supervisors",
            "spire-healer",
            "--svid-ttl",
            "60s",
            "--window",
            "90s",
            "--healer-bin",
            env!("CARGO_BIN_EXE_spire-healer"),
            "--postgres-url",
            &test_pg_url(),
            "--out",
        ])
        .arg(out.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting spire-lab chaos")?;
    let done = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .context("spire-lab chaos did not finish in time")??;
    let stdout = String::from_utf8_lossy(&done.stdout);
    let stderr = String::from_utf8_lossy(&done.stderr);
    ensure!(
        done.status.success(),
        "spire-lab chaos failed ({}):\n{stdout}\n{stderr}",
        done.status
    );
    let records: Vec<RunRecord> =
        serde_json::from_slice(&std::fs::read(out.path().join("runs.json"))?)
            .context("runs.json")?;
    let [r] = records.as_slice() else {
        anyhow::bail!("one run expected: {records:#?}");
    };
    assert_eq!(r.fault, Fault::SyncLoss);
    assert_eq!(r.supervisor, SupervisorKind::Healer);
    println!(
        "sync_loss under spire-healer: detect {:?} s, heal {:?} s, disruptive {}, notes: {}",
        r.detect_s, r.heal_s, r.disruptive_actions, r.notes
    );
    assert!(r.heal_s.is_some(), "agent-0 syncs again: {r:#?}\n{stdout}");
    assert!(r.notes.contains("failover"), "healed by a failover: {r:#?}");
    assert_eq!(r.wrong_actions, 0, "{r:#?}");
    Ok(())
}
