//! A network partition between agent-0 and server A while A's admin API
//! answers (`spire-lab chaos --faults sync_loss`, a cut TCP proxy on
//! agent-0's path to A): spire-healer sees A's agent-facing address
//! unreachable from the node, fails agent-0 over to server B and the agent
//! syncs again. The heal time is printed, never asserted.
//! Needs `SPIRE_HEALER_TEST_PG_URL`.

use std::time::Duration;

use anyhow::Result;
use spire_lab::chaos::{Fault, SupervisorKind};

use crate::spire_lab::run_chaos;

/// Bound of the whole run (lab setup plus a 90 s window).
const LIMIT: Duration = Duration::from_secs(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_from_server_a_fails_over_to_b() -> Result<()> {
    let run = run_chaos(
        &[
            "--faults",
            "sync_loss",
            "--supervisors",
            "spire-healer",
            "--window",
            "90s",
        ],
        LIMIT,
    )
    .await?;
    let (records, stdout) = (&run.records, &run.stdout);
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
