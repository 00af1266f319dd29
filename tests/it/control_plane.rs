//! Control-plane scenarios on a real HA cluster: two spire-servers sharing
//! one PostgreSQL datastore, two agents (agent-0 on server A, agent-1 on
//! server B), spire-healer in-process watching everything.
//!
//! a. server A killed → agent-0 `agent_sync_stale` → failed over to B
//!    (config rewrite + restart) → fresh sync and SVID → closed, MTTR recorded
//! b. both servers down → nothing restarted, `all_servers_down` open with a
//!    predicted outage; servers back → incidents close without action
//! c. `entry_bump` yields a new serial within about one sync interval
//! d. agent banned → `agent_evict` re-admits it (DeleteAgent, fresh join
//!    token, restart) → verified
//!
//! e. (a CA rotation on both servers) is in `ca_rotation.rs`; the rig is in
//!    `cluster.rs`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use spire_healer::actuators::Actuator;
use spire_healer::actuators::spire::{EntryBump, EntryBumpConfig, Topology};
use spire_healer::knowledge::Query;
use spire_healer::model::{Step, SymptomKind};

use crate::cluster::Cluster;

/// Test policy: the built-in one with the resync grace scaled to a 1 s
/// sync interval (the built-in sync thresholds already fit it; see
/// `sync_loss.rs` for them at SPIRE's default 5 s interval).
pub(crate) const POLICY_OVERRIDES: &[(&str, &str)] =
    &[("resync_grace = \"4m\"", "resync_grace = \"90s\"")];

fn secs(a: i64, b: i64) -> f64 {
    (b - a) as f64 / 1000.0
}

/// a. Server A dies: agent-0 fails over to server B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_other_server() -> Result<()> {
    let c = Cluster::start(600, POLICY_OVERRIDES, false).await?;
    c.wait_for("both servers up", Duration::from_secs(20), || async {
        (c.metric("spire_healer_servers_up") == 2.0).then_some(())
    })
    .await?;
    let killed = c.now_ms();
    c.lab.kill_server(0).await?;

    let stale = c
        .wait_for("agent-0 sync stale", Duration::from_secs(60), || async {
            c.incident("agent_sync_stale", "agent:agent-0", killed)
                .await
        })
        .await?;
    let closed = c
        .wait_for("failover verified", Duration::from_secs(90), || async {
            c.closed(&stale.id).await
        })
        .await?;
    let actions: Vec<_> = c
        .actions()
        .await
        .into_iter()
        .filter(|a| a.incident_id == stale.id)
        .collect();
    let failover = actions
        .iter()
        .find(|a| a.actuator == "failover")
        .context("failover ran")?;
    assert_eq!(failover.outcome.as_deref(), Some("ok"), "{failover:#?}");
    assert_eq!(failover.params["to_server"], "server-b", "{failover:#?}");
    c.wait_for("failover verification", Duration::from_secs(30), || async {
        c.actions()
            .await
            .into_iter()
            .find(|a| a.id == failover.id && a.verification.as_deref() == Some("verified"))
    })
    .await?;
    // The agent config now points at B, and the agent syncs through it.
    let conf = std::fs::read_to_string(c.lab.agent(0).conf())?;
    assert!(
        conf.contains(&format!(
            "server_port = \"{}\"",
            c.lab.server(1).bind_port()
        )) || conf.contains(&format!("server_port = {}", c.lab.server(1).bind_port())),
        "{conf}"
    );
    c.lab.wait_agent_ready(0).await?;
    let fresh = c.lab.last_sync_success(0).await?;
    assert!(
        fresh >= closed.opened_at_ms / 1000, // unix seconds
        "synced after the failover"
    );
    // A fresh SVID from the restarted agent.
    let svids = c
        .store
        .svids(&Query {
            limit: 100,
            ..Query::default()
        })
        .await?;
    assert!(
        svids
            .iter()
            .any(|s| s.agent == "agent-0" && s.first_seen_ms > failover.started_at_ms),
        "{svids:#?}"
    );
    // agent-1 (on B) was left alone; server A is reported, not acted on.
    assert!(actions.iter().all(|a| a.target == "agent-0"));
    assert!(
        c.incident("server_unhealthy", "server:server-a", killed)
            .await
            .is_some()
    );
    assert!(
        c.metric(r#"spire_healer_incident_duration_seconds_count{symptom="agent_sync_stale"}"#)
            >= 1.0
    );
    println!(
        "scenario a: sync stale detected {:.1}s after the kill; failover healed it in {:.1}s (MTTR)",
        secs(killed, stale.opened_at_ms),
        secs(stale.opened_at_ms, closed.closed_at_ms.unwrap_or(0)),
    );
    c.stop().await;
    Ok(())
}

/// b. Both servers down: nothing is restarted; back up: closes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_down_restarts_nothing() -> Result<()> {
    let c = Cluster::start(600, POLICY_OVERRIDES, false).await?;
    c.wait_for("both servers up", Duration::from_secs(20), || async {
        (c.metric("spire_healer_servers_up") == 2.0).then_some(())
    })
    .await?;
    let pids: Vec<_> = c.lab.agents().iter().map(|a| a.pid()).collect();
    let down = c.now_ms();
    c.lab.kill_server(0).await?;
    c.lab.kill_server(1).await?;
    let all = c
        .wait_for("all_servers_down", Duration::from_secs(30), || async {
            c.incidents()
                .await
                .into_iter()
                .find(|i| i.symptom == "all_servers_down" && i.opened_at_ms >= down)
        })
        .await?;
    assert!(
        all.predicted_outage_ms.is_some_and(|t| t > down),
        "{all:#?}"
    );
    // Sync goes stale on both agents; every disruptive step is held.
    c.wait_for(
        "both agents stale and held",
        Duration::from_secs(60),
        || async {
            let holds = c.holds().await;
            let held: std::collections::HashSet<_> = holds
                .iter()
                .filter(|h| h.reason == "no_server_reachable")
                .map(|h| h.target.clone())
                .collect();
            (held.len() == 2).then_some(())
        },
    )
    .await?;
    // A dozen more ticks (3 s at this cadence) with both agents held.
    c.wait_ticks(12).await?;
    let acted: Vec<_> = c
        .actions()
        .await
        .into_iter()
        .filter(|a| {
            a.started_at_ms >= down && a.actuator != "refetch" && a.actuator != "entry-bump"
        })
        .collect();
    assert!(acted.is_empty(), "nothing disruptive may run: {acted:#?}");
    let now_pids: Vec<_> = c.lab.agents().iter().map(|a| a.pid()).collect();
    assert_eq!(pids, now_pids, "no agent was restarted");

    let back = c.now_ms();
    c.lab.start_server(0).await?;
    c.lab.start_server(1).await?;
    c.wait_for("incidents closed", Duration::from_secs(120), || async {
        let open: Vec<_> = c
            .incidents()
            .await
            .into_iter()
            .filter(|i| i.closed_at_ms.is_none() && i.opened_at_ms >= down)
            .collect();
        open.is_empty().then_some(())
    })
    .await?;
    let acted: Vec<_> = c
        .actions()
        .await
        .into_iter()
        .filter(|a| a.started_at_ms >= down && a.actuator != "refetch")
        .collect();
    assert!(acted.is_empty(), "closed without action: {acted:#?}");
    let now_pids: Vec<_> = c.lab.agents().iter().map(|a| a.pid()).collect();
    assert_eq!(pids, now_pids, "still the same agent processes");
    println!(
        "scenario b: all servers down detected {:.1}s after the kill; recovered {:.1}s after restart, no action",
        secs(down, all.opened_at_ms),
        secs(back, c.now_ms()),
    );
    c.stop().await;
    Ok(())
}

/// c. entry_bump: a new serial for our own entry within about one sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_bump_yields_a_new_serial() -> Result<()> {
    let c = Cluster::start(3600, POLICY_OVERRIDES, false).await?;
    let id = c.lab.spiffe_id("/healer-0");
    let first = c
        .wait_for("our SVID", Duration::from_secs(20), || async {
            let rows = c
                .store
                .svids(&Query {
                    limit: 100,
                    ..Query::default()
                })
                .await
                .ok()?;
            rows.into_iter()
                .find(|r| r.agent == "agent-0" && r.spiffe_id == id)
        })
        .await?;
    let topo = Arc::new(Topology {
        servers: c
            .lab
            .servers()
            .iter()
            .map(|s| {
                (
                    s.name().to_string(),
                    Some(s.socket().to_path_buf()),
                    Some(s.address()),
                )
            })
            .collect(),
        agents: Default::default(),
    });
    let bump = EntryBump::new(
        EntryBumpConfig {
            call_timeout: Duration::from_secs(5),
        },
        topo,
    );
    let step = Step {
        action_id: "test".into(),
        incident_id: "test".into(),
        symptom: SymptomKind::SvidRotationOverdue,
        rung: 0,
        actuator: "entry-bump".into(),
        target: "agent-0".into(),
        params: serde_json::json!({ "spiffe_id": id }),
        timeout: Duration::from_secs(10),
        verify_within: Duration::from_secs(10),
        dry_run: false,
    };
    let bumped_at = c.now_ms();
    let out = bump.execute(&step).await?;
    assert_eq!(
        out.detail["entries"].as_array().map(Vec::len),
        Some(1),
        "{out:?}"
    );
    let fresh = c
        .wait_for("a new serial", Duration::from_secs(20), || async {
            let rows = c
                .store
                .svids(&Query {
                    limit: 100,
                    ..Query::default()
                })
                .await
                .ok()?;
            rows.into_iter().find(|r| {
                r.spiffe_id == id && r.serial != first.serial && r.first_seen_ms >= bumped_at
            })
        })
        .await?;
    println!(
        "scenario c: new serial {:.2}s after the bump (agent sync interval 1 s)",
        secs(bumped_at, fresh.first_seen_ms)
    );
    c.stop().await;
    Ok(())
}

/// d. A banned agent is re-admitted by agent_evict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_agent_is_readmitted() -> Result<()> {
    let c = Cluster::start(600, POLICY_OVERRIDES, false).await?;
    c.wait_for(
        "agent-1 known by its SPIFFE ID",
        Duration::from_secs(20),
        || async { (c.metric("spire_healer_servers_up") == 2.0).then_some(()) },
    )
    .await?;
    // A dozen ticks over the servers' 1 s listings: the healer has seen
    // agent-1 listed before it is banned.
    c.wait_ticks(12).await?;
    let old_id = c.lab.agent(1).spiffe_id();
    let banned_at = c.now_ms();
    c.lab.ban_agent(1).await?;
    let banned = c
        .wait_for("agent_banned", Duration::from_secs(30), || async {
            c.incidents()
                .await
                .into_iter()
                .find(|i| i.symptom == "agent_banned" && i.opened_at_ms >= banned_at)
        })
        .await?;
    assert_eq!(banned.subject, "agent:agent-1", "{banned:#?}");
    let closed = c
        .wait_for("re-admitted", Duration::from_secs(90), || async {
            c.closed(&banned.id).await
        })
        .await?;
    let evict = c
        .wait_judged(&banned.id, "evict-agent", Duration::from_secs(30))
        .await?;
    assert_eq!(evict.outcome.as_deref(), Some("ok"), "{evict:#?}");
    assert_eq!(
        evict.verification.as_deref(),
        Some("verified"),
        "{evict:#?}"
    );
    assert_eq!(evict.params["spiffe_id"], old_id);
    c.lab.wait_agent_ready(1).await?;
    // The old identity is gone (DeleteAgent), a new one attested and is not banned.
    let listed = c.lab.list_agents(0).await?;
    assert!(listed.iter().all(|a| a.spiffe_id != old_id), "{listed:#?}");
    assert!(listed.iter().all(|a| !a.banned), "{listed:#?}");
    assert_eq!(listed.len(), 2, "{listed:#?}");
    c.lab.wait_fetch_has(1, "/healer-1").await?;
    println!(
        "scenario d: ban detected {:.1}s after the ban; re-admitted (MTTR) {:.1}s",
        secs(banned_at, banned.opened_at_ms),
        secs(banned.opened_at_ms, closed.closed_at_ms.unwrap_or(0)),
    );
    c.stop().await;
    Ok(())
}
