//! Smoke run of the chaos benchmark (`spire-lab chaos`): one fault
//! (`agent_killed`) under every supervisor, with a short window. spire-healer,
//! the kubelet and systemd baselines heal it without a wrong action;
//! without supervision it stays broken; the report files are written.
//! Needs `SPIRE_HEALER_TEST_PG_URL`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use spire_lab::chaos::{Fault, RunRecord, SupervisorKind};

use crate::spire_lab::{lab_bin, test_pg_url};

/// Bound of the whole smoke run (4 runs of at most a 40 s window, plus
/// lab setup each).
const LIMIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_smoke_agent_killed_under_every_supervisor() -> Result<()> {
    let out = tempfile::tempdir()?;
    let child = tokio::process::Command::new(lab_bin())
        .args([
            "chaos",
            "--runs",
            "1",
            "--seed",
            "13",
            "--faults",
            "agent_killed",
            "--svid-ttl",
            "60s",
            "--window",
            "40s",
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
    assert_eq!(records.len(), 4, "{records:#?}");
    for kind in SupervisorKind::ALL {
        let r = records
            .iter()
            .find(|r| r.supervisor == kind)
            .with_context(|| format!("no run for {kind}"))?;
        assert_eq!(r.fault, Fault::AgentKilled);
        if kind == SupervisorKind::None {
            assert_eq!(r.heal_s, None, "nothing restarts a killed agent: {r:#?}");
            assert_eq!(r.disruptive_actions, 0, "{r:#?}");
        } else {
            assert!(r.heal_s.is_some(), "{kind} heals it: {r:#?}\n{stdout}");
            assert!(r.detect_s.is_some(), "{kind} notices it: {r:#?}");
            assert!(r.disruptive_actions >= 1, "a restart: {r:#?}");
            assert_eq!(r.wrong_actions, 0, "{r:#?}");
        }
    }
    let csv = std::fs::read_to_string(out.path().join("runs.csv"))?;
    assert!(csv.lines().count() >= 5, "header + 4 runs:\n{csv}");
    let md = std::fs::read_to_string(out.path().join("chaos.md"))?;
    assert!(md.contains("agent_killed"), "{md}");
    assert!(stdout.contains(md.trim()), "the table is printed");
    for f in ["summary.csv", "chaos.svg"] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    Ok(())
}
