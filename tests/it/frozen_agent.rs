//! A stopped agent with an established Workload API stream, at the default
//! thresholds, on the real HA lab: agent-0 is SIGSTOPped and stays stopped.
//! Its stream stays open and silent (as a healthy one is between
//! rotations); its Debug API accepts connections into the kernel backlog
//! and never answers. `agent_unreachable` opens on that signal, the ladder
//! restarts the agent (the restart script SIGKILLs the stopped process),
//! and the agent serves again. The detection time is printed, never
//! asserted.

use std::time::Duration;

use anyhow::Result;

use crate::cluster::Cluster;

fn secs(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms) as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_with_a_silent_stream_is_restarted() -> Result<()> {
    // Long SVIDs (workload 10 min, agent 1 h): no rotation, and no
    // agent_not_renewing, within the run; only the frozen process tells.
    let c = Cluster::start(600, &[], false).await?;
    let up = r#"spire_healer_workload_api_stream_up{agent="agent-0"}"#;
    c.wait_for("agent-0's stream up", Duration::from_secs(30), || async {
        (c.metric(up) == 1.0).then_some(())
    })
    .await?;
    // A few polls of the Debug API answered on the established stream.
    c.wait_ticks(12).await?;
    let old_pid = c.lab.agent(0).pid();
    assert!(old_pid.is_some(), "agent-0 runs");

    c.lab.freeze_agent(0)?;
    let frozen_at = c.now_ms();
    let incident = c
        .wait_for(
            "agent_unreachable opened on agent-0",
            Duration::from_secs(60),
            || async {
                c.incident("agent_unreachable", "agent:agent-0", frozen_at)
                    .await
            },
        )
        .await?;
    let detected = secs(frozen_at, incident.opened_at_ms);
    // Opened on the Debug API while the established stream still looked up.
    assert_eq!(
        incident.evidence["signal"], "debug_api_unanswered",
        "{incident:#?}"
    );
    assert_eq!(
        incident.evidence["debug_last_error"], "timeout",
        "{incident:#?}"
    );

    let closed = c
        .wait_for(
            "agent_unreachable closed",
            Duration::from_secs(120),
            || async { c.closed(&incident.id).await },
        )
        .await?;
    let restart = c
        .wait_judged(&incident.id, "restart-agent", Duration::from_secs(60))
        .await?;
    assert_eq!(
        restart.verification.as_deref(),
        Some("verified"),
        "{restart:#?}"
    );
    c.lab.wait_agent_ready(0).await?;
    let new_pid = c.lab.agent(0).pid();
    assert!(
        new_pid.is_some() && new_pid != old_pid,
        "a new agent process: {old_pid:?} -> {new_pid:?}"
    );
    c.wait_for(
        "agent-0's stream up again",
        Duration::from_secs(30),
        || async { (c.metric(up) == 1.0).then_some(()) },
    )
    .await?;
    // agent-1 was never judged unreachable.
    let others: Vec<_> = c
        .incidents()
        .await
        .into_iter()
        .filter(|i| i.symptom == "agent_unreachable" && i.subject != "agent:agent-0")
        .collect();
    assert!(others.is_empty(), "{others:#?}");
    let mut ladder: Vec<_> = c
        .actions()
        .await
        .into_iter()
        .filter(|a| a.incident_id == incident.id)
        .map(|a| (a.rung, a.actuator, a.verification))
        .collect();
    ladder.sort();
    println!(
        "frozen agent: agent_unreachable {detected:.2}s after SIGSTOP (stream {}, Debug API unanswered for {} ms, /live {}); closed {:.2}s after it opened; ladder {ladder:?}",
        incident.evidence["stream"],
        incident.evidence["debug_unanswered_for_ms"],
        incident.evidence["live"],
        secs(
            incident.opened_at_ms,
            closed.closed_at_ms.unwrap_or(incident.opened_at_ms)
        ),
    );
    c.stop().await;
    Ok(())
}
