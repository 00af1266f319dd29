//! b and c. An agent that can never attest again by itself: its data dir is
//! wiped and its join token was used (spiffe/spire#2910, TOFU). Watched by
//! spire-healer under the built-in policy, with spire-healer itself
//! restarted while the agent is stuck:
//! - detected (`agent_unreachable`), restarts bounded by futility (no
//!   restart loop, the budget is not spent);
//! - `agent_not_renewing` (the server no longer sees the agent renew) is the
//!   more specific diagnosis: the agent is evicted and re-admitted with a
//!   fresh join token, verified by the agent listed and renewing again;
//! - across the restart the agent is known by name: no second subject for
//!   its SPIFFE ID, no breaker, no action on an unmapped target.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;

use crate::cluster::Cluster;

fn secs(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms) as f64 / 1000.0
}

/// The configured name the store maps `spiffe_id` to, if any.
async fn known_as(c: &Cluster, spiffe_id: &str) -> Option<String> {
    let k = c.store.load_knowledge(UNIX_EPOCH).await.ok()?;
    k.agent_identities
        .into_iter()
        .find(|i| i.spiffe_id == spiffe_id)
        .map(|i| i.agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_attest_is_evicted_and_readmitted() -> Result<()> {
    // Agent SVIDs live 2 min: agent_not_renewing opens within 72 s of the
    // last renewal (40 % left), the same rule as a 1 h TTL, sooner.
    let mut c = Cluster::start_with(600, &[], false, "2m").await?;
    let old_id = c.lab.agent(0).spiffe_id();
    c.wait_for("agent-0 identified", Duration::from_secs(30), || async {
        (known_as(&c, &old_id).await.as_deref() == Some("agent-0")).then_some(())
    })
    .await?;

    // Wipe the data dir and start the agent again: it has no SVID and its
    // join token is spent, so it retries node attestation forever
    // ("join token was not provided") and never serves the Workload API.
    let wiped_at = c.now_ms();
    c.lab.kill_agent(0).await?;
    let data = c.lab.agent(0).data_dir();
    std::fs::remove_dir_all(&data)?;
    std::fs::create_dir_all(&data)?;
    c.lab.run_restart_command(0).await?;

    let unreachable = c
        .wait_for("agent_unreachable", Duration::from_secs(30), || async {
            c.incident("agent_unreachable", "agent:agent-0", wiped_at)
                .await
        })
        .await?;
    // A restart verified as failed is recorded; then spire-healer restarts.
    c.wait_for("a failed restart", Duration::from_secs(90), || async {
        c.actions().await.into_iter().find(|a| {
            a.target == "agent-0"
                && a.actuator == "restart-agent"
                && a.verification.as_deref() == Some("failed")
        })
    })
    .await?;
    let restarted_at = c.now_ms();
    c.restart_healer().await?;
    c.wait_ticks(8).await?;

    let not_renewing = c
        .wait_for("agent_not_renewing", Duration::from_secs(150), || async {
            c.incident("agent_not_renewing", "agent:agent-0", wiped_at)
                .await
        })
        .await?;
    let evict = c
        .wait_judged(&not_renewing.id, "evict-agent", Duration::from_secs(150))
        .await?;
    assert_eq!(evict.outcome.as_deref(), Some("ok"), "{evict:#?}");
    assert_eq!(
        evict.verification.as_deref(),
        Some("verified"),
        "{evict:#?}"
    );
    assert_eq!(evict.params["spiffe_id"], old_id, "{evict:#?}");
    let healed = c
        .wait_for(
            "agent_not_renewing closed",
            Duration::from_secs(30),
            || async { c.closed(&not_renewing.id).await },
        )
        .await?;
    c.wait_for(
        "agent_unreachable closed",
        Duration::from_secs(30),
        || async { c.closed(&unreachable.id).await },
    )
    .await?;
    c.lab.wait_agent_ready(0).await?;
    c.lab.wait_fetch_has(0, "/healer-0").await?;

    // Re-admitted under a new identity, which spire-healer now knows.
    let listed = c.lab.list_agents(0).await?;
    assert_eq!(listed.len(), 2, "{listed:#?}");
    assert!(listed.iter().all(|a| a.spiffe_id != old_id && !a.banned));
    let new_id = listed
        .iter()
        .map(|a| a.spiffe_id.clone())
        .find(|id| *id != c.lab.agent(1).spiffe_id())
        .expect("agent-0 listed again");
    c.wait_for(
        "the new identity learned",
        Duration::from_secs(30),
        || async { (known_as(&c, &new_id).await.as_deref() == Some("agent-0")).then_some(()) },
    )
    .await?;

    let incidents = c.incidents().await;
    let actions = c.actions().await;
    let holds = c.holds().await;
    // Known by name throughout: no subject is a bare SPIFFE ID, no action
    // targets one, the breaker never held anything, and no incident is open
    // twice at once for the same symptom and subject.
    assert!(
        incidents.iter().all(|i| !i.subject.contains("spiffe://")),
        "{incidents:#?}"
    );
    assert!(
        actions.iter().all(|a| a.target == "agent-0"),
        "{actions:#?}"
    );
    assert!(
        holds.iter().all(|h| h.reason != "circuit_open"),
        "{holds:#?}"
    );
    let mut open: HashMap<(&str, &str), usize> = HashMap::new();
    for i in incidents.iter().filter(|i| i.closed_at_ms.is_none()) {
        *open.entry((&i.symptom, &i.subject)).or_default() += 1;
    }
    assert!(open.values().all(|n| *n == 1), "{incidents:#?}");
    // Bounded: restart-agent at most until futile (twice), across the
    // restart of spire-healer (a restart whose verdict the stopped process
    // never recorded counts as failed when its incident is still open); far
    // below the hourly budget.
    let restarts = actions
        .iter()
        .filter(|a| a.actuator == "restart-agent")
        .count();
    assert!(restarts <= 2, "{actions:#?}");
    assert!(actions.len() <= 5, "{actions:#?}");
    println!(
        "scenario b/c: agent_unreachable {:.1}s after the wipe; spire-healer restarted at +{:.1}s; \
         agent_not_renewing at +{:.1}s; evicted at +{:.1}s; re-admitted (incident closed) at +{:.1}s; \
         {} actions ({restarts} restarts); holds: {:?}",
        secs(wiped_at, unreachable.opened_at_ms),
        secs(wiped_at, restarted_at),
        secs(wiped_at, not_renewing.opened_at_ms),
        secs(wiped_at, evict.started_at_ms),
        secs(wiped_at, healed.closed_at_ms.unwrap_or(0)),
        actions.len(),
        holds.iter().map(|h| h.reason.as_str()).collect::<Vec<_>>(),
    );
    for i in &incidents {
        println!(
            "  incident {} {} +{:.1}s..{:?} {:?} needs_operator={:?}",
            i.symptom,
            i.subject,
            secs(wiped_at, i.opened_at_ms),
            i.closed_at_ms.map(|t| secs(wiped_at, t)),
            i.resolution,
            i.needs_operator,
        );
    }
    for a in &actions {
        println!(
            "  action {} for {} +{:.1}s {:?} {:?}",
            a.actuator,
            a.symptom,
            secs(wiped_at, a.started_at_ms),
            a.outcome,
            a.verification,
        );
    }
    c.stop().await;
    Ok(())
}
