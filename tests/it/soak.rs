//! `spire-lab soak`, short: 90 s of the real spire-healer binary on a healthy
//! HA lab with 90 s workload SVIDs (5 min agent SVIDs) and a CA rotation at 45 s. Real rotations happen,
//! the CA rotation is done, samples are written, and the healer opens no
//! incident and runs no action (a short check of false positives). Needs
//! `SPIRE_HEALER_TEST_PG_URL`.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::spire_lab::lab_bin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_soak_sees_rotations_and_no_incident() -> Result<()> {
    let pg = std::env::var("SPIRE_HEALER_TEST_PG_URL").context(
        "SPIRE_HEALER_TEST_PG_URL is not set: run scripts/test.sh (it provisions PostgreSQL)",
    )?;
    let out = tempfile::tempdir()?;
    let run = tokio::process::Command::new(lab_bin())
        // Agent SVIDs of 5 min: with 30 s ones, SPIRE's 5 s rotation check
        // lets an agent renew with under 40 % of its TTL left, which the
        // built-in policy reports as agent_not_renewing.
        .args([
            "soak",
            "--duration",
            "90s",
            "--svid-ttl",
            "30s",
            "--agent-ttl",
            "5m",
        ])
        .args(["--ca-rotation-at", "45s", "--sample-every", "15s"])
        .arg("--healer-bin")
        .arg(env!("CARGO_BIN_EXE_spire-healer"))
        .arg("--out")
        .arg(out.path())
        .args(["--postgres-url", &pg])
        .process_group(0)
        .kill_on_drop(true)
        .output();
    let o = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .context("spire-lab soak did not finish within 300 s")??;
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("soak.json"))
            .with_context(|| format!("no soak.json:\n{stdout}\n{stderr}"))?,
    )?;
    assert!(
        o.status.success(),
        "soak failed ({}):\n{stdout}\n{stderr}\n{summary:#}",
        o.status
    );
    assert!(summary["rotations_seen"].as_u64() > Some(0), "{summary:#}");
    assert!(summary["ca_rotation_done_at_s"].is_number(), "{summary:#}");
    assert_eq!(summary["incidents"], serde_json::json!([]), "{summary:#}");
    assert_eq!(summary["actions"], serde_json::json!([]), "{summary:#}");
    assert_eq!(summary["healer_up"], true);
    let csv = std::fs::read_to_string(out.path().join("samples.csv"))?;
    assert!(csv.lines().count() >= 3, "samples.csv:\n{csv}");
    assert!(out.path().join("soak.md").is_file());
    Ok(())
}
