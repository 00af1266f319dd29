//! e. A CA rotation on both HA servers (`localauthority x509 prepare` →
//! `activate` → `taint` → `revoke`), watched by spire-healer under the
//! built-in policy with every agent's `trust_bundle_path` configured: the
//! rotation itself opens no incident and runs no action; the lab's
//! bootstrap bundle, which still holds only the old CAs, is reported as
//! `bootstrap_bundle_stale` on both agents (held `no_ladder`), and closes
//! once the file is rewritten from the current bundle.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use spire_healer::knowledge::{IncidentRecord, Query};

use crate::cluster::Cluster;

/// `localauthority x509 show` on server `i`: the `active`, `prepared` and
/// `old` authority ids (empty when there is none).
async fn authorities(c: &Cluster, i: usize) -> Result<(String, String, String)> {
    let out = c
        .lab
        .server_cli(i, &["localauthority", "x509", "show", "-output", "json"])
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    let id = |slot: &str| {
        v[slot]["authority_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    Ok((id("active"), id("prepared"), id("old")))
}

/// `localauthority x509 <verb> -authorityID <id>` on server `i`.
async fn authority_cli(c: &Cluster, i: usize, verb: &str, id: &str) -> Result<()> {
    c.lab
        .server_cli(i, &["localauthority", "x509", verb, "-authorityID", id])
        .await
        .with_context(|| format!("localauthority x509 {verb} {id} on server {i}"))?;
    Ok(())
}

/// Every incident and action so far, when there is any: the rotation must
/// cause none (the bootstrap bundle aside, once expected).
async fn nothing_but(c: &Cluster, allowed: &[&str], when: &str) -> Result<()> {
    let unexpected: Vec<IncidentRecord> = c
        .incidents()
        .await
        .into_iter()
        .filter(|i| !allowed.contains(&i.symptom.as_str()))
        .collect();
    let actions = c.actions().await;
    if !unexpected.is_empty() || !actions.is_empty() {
        bail!("{when}: incidents {unexpected:#?}\nactions {actions:#?}");
    }
    Ok(())
}

/// The agent SVID's notAfter as agent `j`'s Debug API reports it.
async fn agent_svid_expiry(c: &Cluster, j: usize) -> Option<i64> {
    let v = c.lab.agent_debug_info(j).await.ok()?;
    let field = &v["svid_chain"][0]["expires_at"];
    field
        .as_i64()
        .or_else(|| field.as_str().and_then(|s| s.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_reports_only_the_stale_bootstrap_bundle() -> Result<()> {
    let c = Cluster::start(600, &[], true).await?;
    let servers = c.lab.servers().len();
    let agents = c.lab.agents().len();
    c.wait_for("both servers up", Duration::from_secs(20), || async {
        (c.metric("spire_healer_servers_up") == 2.0).then_some(())
    })
    .await?;
    // Forty ticks (10 s) over 1 s polls: every sensor, the bootstrap
    // bundles included, has been read and judged.
    c.wait_ticks(40).await?;
    nothing_but(&c, &[], "steady state").await?;
    let old: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..servers {
            ids.push(authorities(&c, i).await?.0);
        }
        ids
    };

    // Prepare: each server adds its next CA to the shared bundle; wait
    // until every agent has persisted the grown bundle.
    let prepared_at = c.now_ms();
    let mut prepared = Vec::new();
    for i in 0..servers {
        c.lab
            .server_cli(i, &["localauthority", "x509", "prepare"])
            .await?;
        let (_, next, _) = authorities(&c, i).await?;
        assert!(!next.is_empty(), "server {i} has a prepared authority");
        prepared.push(next);
    }
    c.wait_for(
        "the prepared CAs in every agent's bundle",
        Duration::from_secs(30),
        || async {
            (0..agents)
                .all(|j| c.lab.agent(j).stored_bundle_cas() == Some(2 * servers))
                .then_some(())
        },
    )
    .await?;
    let propagated_at = c.now_ms();

    // Activate: new SVIDs are signed by the new CAs from now on.
    for (i, id) in prepared.iter().enumerate() {
        authority_cli(&c, i, "activate", id).await?;
        let (active, _, was) = authorities(&c, i).await?;
        assert_eq!((&active, &was), (id, &old[i]), "server {i} after activate");
    }
    c.wait_ticks(40).await?;
    nothing_but(&c, &[], "after activate").await?;

    // Taint the old CAs: agents and servers re-sign every SVID off them.
    let expiries: Vec<Option<i64>> = {
        let mut e = Vec::new();
        for j in 0..agents {
            e.push(agent_svid_expiry(&c, j).await);
        }
        e
    };
    let tainted_at = c.now_ms();
    for (i, id) in old.iter().enumerate() {
        authority_cli(&c, i, "taint", id).await?;
    }
    // Every agent SVID and our workload SVIDs have moved to the new CAs:
    // a new agent SVID, and a serial first seen after the taint.
    c.wait_for(
        "SVIDs re-signed after the taint",
        Duration::from_secs(60),
        || async {
            for (j, before) in expiries.iter().enumerate() {
                let now = agent_svid_expiry(&c, j).await?;
                if before.is_some_and(|b| now <= b) {
                    return None;
                }
            }
            let svids = c
                .store
                .svids(&Query {
                    limit: 500,
                    ..Query::default()
                })
                .await
                .ok()?;
            let moved: BTreeSet<&str> = svids
                .iter()
                .filter(|s| s.first_seen_ms > tainted_at)
                .map(|s| s.agent.as_str())
                .collect();
            (moved.len() == agents).then_some(())
        },
    )
    .await?;
    let resigned_at = c.now_ms();

    // Revoke the old CAs: they leave the bundle.
    for (i, id) in old.iter().enumerate() {
        authority_cli(&c, i, "revoke", id).await?;
    }
    let revoked_at = c.now_ms();
    c.wait_for(
        "the old CAs gone from every bundle",
        Duration::from_secs(30),
        || async {
            for i in 0..servers {
                if c.lab.x509_authorities(i).await.ok()?.len() != servers {
                    return None;
                }
            }
            (0..agents)
                .all(|j| c.lab.agent(j).stored_bundle_cas() == Some(servers))
                .then_some(())
        },
    )
    .await?;

    // The bootstrap bundle still holds only the old CAs: reported on every
    // agent, held without a ladder.
    let stale: Vec<IncidentRecord> = c
        .wait_for(
            "bootstrap_bundle_stale on every agent",
            Duration::from_secs(30),
            || async {
                let open: Vec<IncidentRecord> = c
                    .incidents()
                    .await
                    .into_iter()
                    .filter(|i| i.symptom == "bootstrap_bundle_stale" && i.closed_at_ms.is_none())
                    .collect();
                (open.len() == agents).then_some(open)
            },
        )
        .await?;
    let subjects: BTreeSet<&str> = stale.iter().map(|i| i.subject.as_str()).collect();
    let want: BTreeSet<String> = (0..agents).map(|j| format!("agent:agent-{j}")).collect();
    assert_eq!(
        subjects,
        want.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for i in &stale {
        assert_eq!(i.evidence["file_authorities"], servers, "{i:#?}");
        assert_eq!(i.evidence["error"], serde_json::Value::Null, "{i:#?}");
        assert_eq!(
            i.evidence["path"],
            c.lab.bundle_path().display().to_string()
        );
    }
    c.wait_for("no_ladder holds", Duration::from_secs(10), || async {
        let holds = c.holds().await;
        stale
            .iter()
            .all(|i| {
                holds
                    .iter()
                    .any(|h| h.incident_id == i.id && h.reason == "no_ladder")
            })
            .then_some(())
    })
    .await?;
    // Past bundle_divergence's 30 s debounce after the revoke: nothing else
    // opened, nothing ran.
    c.wait_ticks(140).await?;
    nothing_but(&c, &["bootstrap_bundle_stale"], "after revoke").await?;

    // The fix: the bootstrap bundle rewritten from the current bundle.
    let out = c.lab.server_cli(0, &["bundle", "show"]).await?;
    let rewritten_at = c.now_ms();
    std::fs::write(c.lab.bundle_path(), &out.stdout)?;
    for i in &stale {
        let closed = c.wait_for("cleared", Duration::from_secs(30), || async {
            c.closed(&i.id).await
        });
        let closed = closed.await?;
        assert_eq!(closed.resolution.as_deref(), Some("cleared"), "{closed:#?}");
    }
    let cleared_at = c.now_ms();
    nothing_but(&c, &["bootstrap_bundle_stale"], "after the rewrite").await?;

    let first = stale.iter().map(|i| i.opened_at_ms).min().unwrap_or(0);
    let last = stale.iter().map(|i| i.opened_at_ms).max().unwrap_or(0);
    println!(
        "scenario e: prepared CAs in every agent's bundle {:.1}s after prepare; SVIDs re-signed {:.1}s after taint; \
         bootstrap_bundle_stale opened {:.1}-{:.1}s after taint, i.e. {:+.1}s from revoke (debounce 10 s); \
         cleared {:.1}s after the file was rewritten; no other incident, no action",
        crate::helpers::secs(prepared_at, propagated_at),
        crate::helpers::secs(tainted_at, resigned_at),
        crate::helpers::secs(tainted_at, first),
        crate::helpers::secs(tainted_at, last),
        crate::helpers::secs(revoked_at, last),
        crate::helpers::secs(rewritten_at, cleared_at),
    );
    c.stop().await;
    Ok(())
}
