//! d. Servers with a 10 min agent TTL and the built-in policy (which sets no
//! `agent_svid_ttl`): spire-healer learns the TTL from the servers' agent
//! listing, and over 15 minutes, through at least one renewal of every
//! agent, no `agent_not_renewing` opens on the healthy agents and nothing
//! is done. Needs `SPIRE_HEALER_TEST_PG_URL`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use spire_healer::spire_api::ServerAdminClient;
use tokio::time::Instant;

use crate::ha_healer;
use crate::helpers::Healer;
use crate::spire_lab::{HaLab, HaOptions, test_pg_url};

/// The servers' `agent_ttl`.
const AGENT_TTL: Duration = Duration::from_secs(600);
/// How long the healthy cluster is watched (the 15 minutes: at
/// least one full TTL).
const WATCH: Duration = Duration::from_secs(15 * 60);
/// Past `WATCH`, how long to wait for an agent that has not renewed yet
/// (each renews within 55 % of the TTL).
const RENEWAL_GRACE: Duration = Duration::from_secs(6 * 60);

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_min_agent_ttl_is_learned_and_healthy_agents_are_not_flagged() -> Result<()> {
    let lab = HaLab::start(HaOptions {
        postgres_url: test_pg_url(),
        agent_ttl: "10m".into(),
        ..HaOptions::default()
    })
    .await?;
    let result = with_lab(&lab).await;
    let _ = lab.stop().await;
    result
}

async fn with_lab(lab: &HaLab) -> Result<()> {
    // One workload entry per agent, so each Workload API stream serves.
    for j in 0..lab.agents().len() {
        lab.register_entry(j, &format!("/ttl-{j}"), uid(), 3600)
            .await?;
    }
    for j in 0..lab.agents().len() {
        lab.wait_for_entry_synced(j, &format!("/ttl-{j}")).await?;
    }
    let healer = ha_healer::start_builtin(lab).await?;
    let result = watch(lab, &healer).await;
    healer.stop().await;
    result
}

/// One agent's SVID as the test sees it in server A's listing.
struct Seen {
    name: String,
    serial: String,
    renewals: u32,
    /// Lifetime left on the SVID at the last listing, seconds.
    left: u64,
    /// The least lifetime left seen on an SVID before it was replaced.
    least_left: Option<u64>,
}

async fn watch(lab: &HaLab, healer: &Healer) -> Result<()> {
    healer
        .wait_for("both servers up", Duration::from_secs(30), || async {
            (healer.metric("spire_healer_servers_up") == 2.0).then_some(())
        })
        .await?;
    let listing = ServerAdminClient::new(lab.server(0).socket(), Duration::from_secs(2))?;
    let names: HashMap<String, String> = lab
        .agents()
        .iter()
        .map(|a| (a.spiffe_id(), a.name().to_string()))
        .collect();
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut ttls: HashMap<String, f64> = HashMap::new();
    let started = Instant::now();
    let ticks_at_start = healer.ticks();
    loop {
        let at = started.elapsed().as_secs();
        // The healer's view: no agent_not_renewing, as a symptom or an
        // incident.
        for severity in ["warning", "critical"] {
            let series = format!(
                "spire_healer_symptoms{{severity=\"{severity}\",symptom=\"agent_not_renewing\"}}"
            );
            ensure!(
                healer.metric(&series) == 0.0,
                "agent_not_renewing present at +{at} s\nincidents: {:#?}",
                healer.incidents().await
            );
        }
        if let Some(i) = healer
            .incidents()
            .await
            .into_iter()
            .find(|i| i.symptom == "agent_not_renewing")
        {
            bail!("agent_not_renewing opened at +{at} s: {i:#?}");
        }
        for s in lab.servers() {
            let ttl = healer.metric(&format!(
                "spire_healer_agent_svid_ttl_seconds{{server=\"{}\"}}",
                s.name()
            ));
            if ttls.insert(s.name().to_string(), ttl) != Some(ttl) {
                println!("+{at:>4} s  {}: agent SVID TTL in use {ttl} s", s.name());
            }
        }
        // SPIRE's view: renewals, from server A's listing.
        if let Ok((agents, _)) = listing.list_agents_paged(100, 10).await {
            for a in agents.iter().filter(|a| !a.banned) {
                let name = names
                    .get(&a.spiffe_id)
                    .cloned()
                    .unwrap_or_else(|| a.spiffe_id.clone());
                let left = a
                    .expires_at
                    .duration_since(spire_healer::clock::Clock::now(&*healer.clock))
                    .unwrap_or_default()
                    .as_secs();
                let e = seen.entry(a.spiffe_id.clone()).or_insert_with(|| {
                    println!("+{at:>4} s  {name}: listed, {left} s left");
                    Seen {
                        name: name.clone(),
                        serial: a.serial.clone(),
                        renewals: 0,
                        left,
                        least_left: None,
                    }
                });
                if e.serial != a.serial {
                    println!(
                        "+{at:>4} s  {name}: renewed, {left} s left (the old SVID had {} s left)",
                        e.left
                    );
                    e.least_left = Some(e.least_left.map_or(e.left, |l| l.min(e.left)));
                    e.serial = a.serial.clone();
                    e.renewals += 1;
                }
                e.left = left;
            }
        }
        let all_renewed = seen.len() == lab.agents().len() && seen.values().all(|s| s.renewals > 0);
        if started.elapsed() >= WATCH && all_renewed {
            break;
        }
        ensure!(
            started.elapsed() < WATCH + RENEWAL_GRACE,
            "not every agent renewed within {:?}: {:?}",
            WATCH + RENEWAL_GRACE,
            seen.values()
                .map(|s| (&s.name, s.renewals))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Everything the healer saw until now has been judged.
    healer.wait_ticks(4).await?;

    let ticks = healer.ticks() - ticks_at_start;
    let incidents = healer.incidents().await;
    let actions = healer.actions().await;
    println!(
        "watched {} s, {ticks} ticks; renewals (and the least lifetime left, s, an old SVID was listed with): {:?}; TTL in use: {:?}; incidents: {}; actions: {}",
        started.elapsed().as_secs(),
        seen.values()
            .map(|s| (&s.name, s.renewals, s.least_left))
            .collect::<Vec<_>>(),
        ttls,
        incidents.len(),
        actions.len(),
    );
    for i in &incidents {
        println!("incident: {} {} {}", i.symptom, i.subject, i.evidence);
    }
    ensure!(
        !incidents.iter().any(|i| i.symptom == "agent_not_renewing"),
        "{incidents:#?}"
    );
    ensure!(actions.is_empty(), "{actions:#?}");
    // Learned from a renewal: never above the servers' TTL, and close to
    // it (a poll and a sync interval short at most).
    for s in lab.servers() {
        let ttl = ttls.get(s.name()).copied().unwrap_or_default();
        ensure!(
            ttl <= AGENT_TTL.as_secs_f64() && ttl >= 0.9 * AGENT_TTL.as_secs_f64(),
            "{}: agent SVID TTL in use {ttl} s",
            s.name()
        );
    }
    Ok(())
}
