//! Smoke run of the chaos benchmark (`spire-lab chaos`): one fault
//! (`agent_killed`) under every supervisor, with a short window. spire-healer,
//! the kubelet and systemd baselines heal it without a wrong action;
//! without supervision it stays broken; the report files are written.
//! Needs `SPIRE_HEALER_TEST_PG_URL`.

use std::time::Duration;

use anyhow::{Context as _, Result};
use spire_lab::chaos::{Fault, SupervisorKind};

use crate::spire_lab::run_chaos;

/// Bound of the whole smoke run (4 runs of at most a 40 s window, plus
/// lab setup each).
const LIMIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_smoke_agent_killed_under_every_supervisor() -> Result<()> {
    let run = run_chaos(&["--faults", "agent_killed", "--window", "40s"], LIMIT).await?;
    let (records, stdout, out) = (&run.records, &run.stdout, &run.out);
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
