//! The admin API clients and the `server_api` / `agent_debug` sensors
//! against a real spire-server and spire-agent (v1.15.3): Debug.GetInfo on
//! both sockets, paged ListAgents, GetBundle checked against the bundle the
//! CLI prints, an entry bump that makes the agent re-sign the SVID, a join
//! token, an unprivileged caller refused by the socket's permissions, and
//! finally a ban (the lab is dropped afterwards).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use spire_healer::clock::{Clock, SystemClock};
use spire_healer::endpoint::Endpoint;
use spire_healer::model::{AgentDebugView, AgentView, ServerView, StreamStatus};
use spire_healer::sensors::entry_lookups::EntryLookups;
use spire_healer::sensors::{agent_debug, server_api, workload_api};
use spire_healer::spire_api::{AgentAdminClient, ServerAdminClient, SpireApiError};
use spire_healer::telemetry::Metrics;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::spire_lab::{LabOptions, SpireLab, log_tail};

const TIMEOUT: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(30);

fn now() -> SystemTime {
    SystemClock.now()
}

/// SHA-256 (hex) of every certificate in a PEM file.
fn pem_fingerprints(path: &Path) -> Result<Vec<String>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(&data) {
        let der = der.map_err(|e| anyhow!("bad PEM in {}: {e}", path.display()))?;
        out.push(hex::encode(Sha256::digest(&der)));
    }
    ensure!(!out.is_empty(), "no certificate in {}", path.display());
    Ok(out)
}

/// Polls `probe` until it yields `Some`, for at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {limit:?}");
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `call` on a fresh thread whose filesystem uid and gid are `nobody`,
/// as an unprivileged supervisor outside SPIRE's group would (fsuid and fsgid
/// are per thread, so nothing else in the test process is affected; root
/// loses `CAP_DAC_OVERRIDE` with them).
fn as_nobody<T: Send + 'static>(
    call: impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = T> + Send>> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(65534));
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(65534));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow!("runtime: {e}"))?;
        Ok(rt.block_on(call()))
    })
    .join()
    .map_err(|_| anyhow!("the unprivileged thread panicked"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_apis_and_sensors_on_real_spire() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    let td = lab.trust_domain().to_string();
    let server = ServerAdminClient::new(&lab.server_socket(), TIMEOUT)?;
    let agent_admin = AgentAdminClient::new(&lab.agent_admin_socket(), TIMEOUT)?;

    // --- server Debug.GetInfo ------------------------------------------------
    let info = server.server_debug_info().await?;
    println!(
        "server debug: uptime {} s, agents {}, entries {}, federated bundles {}, chain {:?}",
        info.uptime_secs,
        info.agents_count,
        info.entries_count,
        info.federated_bundles_count,
        info.svid_chain
    );
    ensure!(info.agents_count >= 1, "agents_count {}", info.agents_count);
    ensure!(info.uptime_secs < 600, "uptime {} s", info.uptime_secs);
    ensure!(
        info.svid_chain.first().and_then(|c| c.spiffe_id.as_deref())
            == Some(format!("spiffe://{td}/spire/server").as_str()),
        "server SVID chain {:?}",
        info.svid_chain
    );
    ensure!(info.svid_expires_at().is_some_and(|t| t > now()));

    // --- paged ListAgents ------------------------------------------------------
    let (agents, truncated) = server.list_agents_paged(1, 100).await?;
    println!("ListAgents (page_size 1): {agents:#?}, truncated {truncated}");
    ensure!(!truncated);
    let me = agents
        .iter()
        .find(|a| a.attestation_type == "join_token")
        .context("no join_token agent listed")?
        .clone();
    ensure!(me.expires_at > now(), "agent SVID expired: {me:?}");
    ensure!(!me.banned && !me.serial.is_empty(), "{me:?}");
    ensure!(
        me.spiffe_id
            .starts_with(&format!("spiffe://{td}/spire/agent/join_token/"))
    );
    let got = server.get_agent(&me.spiffe_id).await?;
    ensure!(
        got.serial == me.serial,
        "GetAgent {got:?} vs ListAgents {me:?}"
    );

    // --- GetBundle -------------------------------------------------------------
    let (bundle, sequence) = server.get_bundle().await?;
    println!("GetBundle: sequence {sequence}, {bundle:#?}");
    ensure!(!bundle.is_empty());
    let cli = pem_fingerprints(&lab.bundle_path())?;
    ensure!(
        bundle.iter().any(|a| cli.contains(&a.fingerprint)),
        "no authority matches the CLI bundle: {cli:?}"
    );
    let out = lab
        .server_cli(&["localauthority", "x509", "show", "-output", "json"])
        .await?;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let active = shown["active"]["authority_id"]
        .as_str()
        .with_context(|| format!("no active authority in {shown}"))?;
    ensure!(
        bundle.iter().any(|a| a.key_id == active),
        "active authority {active} not among key ids {:?}",
        bundle.iter().map(|a| &a.key_id).collect::<Vec<_>>()
    );

    // --- agent Debug.GetInfo ---------------------------------------------------
    let dbg = agent_admin.agent_debug_info().await?;
    println!("agent debug: {dbg:#?}");
    let last = dbg.last_sync_success.context("agent never synced")?;
    ensure!(
        last > now() - Duration::from_secs(60) && last <= now() + Duration::from_secs(5),
        "last_sync_success {last:?}"
    );
    ensure!(dbg.spiffe_id() == Some(me.spiffe_id.as_str()), "{dbg:?}");
    ensure!(dbg.svid_expires_at().is_some_and(|t| t > now()));

    // --- the sensors, in-process ---------------------------------------------
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    let wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (srv_sensor, srv_task) = server_api::build(
        server_api::Settings {
            poll_interval: Duration::from_millis(500),
            page_size: 1,
            ..server_api::Settings::new("s1", lab.server_socket())
        },
        clock.clone(),
        metrics.clone(),
        wake.clone(),
    );
    // The agent's node alias is looked up: its entry's parent is the
    // agent's own SPIFFE ID (how spire-healer names an agent whose Debug
    // API it has never reached).
    let lookups = Arc::new(EntryLookups::with_aliases(vec![(
        "a1".into(),
        lab.node_alias(),
    )]));
    tasks.spawn(srv_task.with_lookups(lookups).run(shutdown.child_token()));
    let (dbg_sensor, dbg_task) = agent_debug::build(
        agent_debug::Settings {
            poll_interval: Duration::from_millis(500),
            ..agent_debug::Settings::new("a1", lab.agent_admin_socket())
        },
        clock.clone(),
        metrics.clone(),
        wake.clone(),
    );
    tasks.spawn(dbg_task.run(shutdown.child_token()));

    let sv: Arc<ServerView> = eventually("server_api reachable", WAIT, || async {
        Some(srv_sensor.view()).filter(|v| v.reachable)
    })
    .await?;
    ensure!(
        sv.agents
            .iter()
            .any(|a| a.spiffe_id == me.spiffe_id && !a.banned)
    );
    ensure!(!sv.agents_truncated && sv.agents_count >= 1 && sv.bundle == bundle);
    let alias = sv
        .entry_lookups
        .iter()
        .find(|l| l.alias && l.agent == "a1")
        .with_context(|| format!("{:?}", sv.entry_lookups))?;
    ensure!(
        alias
            .entries
            .iter()
            .flatten()
            .any(|e| e.parent_id == me.spiffe_id),
        "{alias:?} (agent {})",
        me.spiffe_id
    );
    ensure!(sv.svid_expires_at.is_some() && sv.last_error.is_none());
    let dv: Arc<AgentDebugView> = eventually("agent_debug reachable", WAIT, || async {
        Some(dbg_sensor.view()).filter(|v| v.reachable)
    })
    .await?;
    ensure!(
        dv.spiffe_id.as_deref() == Some(me.spiffe_id.as_str()),
        "{dv:?}"
    );
    ensure!(
        dv.last_sync_success
            .is_some_and(|t| t > now() - Duration::from_secs(60))
    );
    ensure!(
        !metrics.render().contains("spire_healer_errors_total{"),
        "sensor errors: {}",
        metrics.render()
    );

    // --- entry bump → new revision → new serial --------------------------------
    let uid = nix::unistd::geteuid().as_raw();
    let path = "/it/bump";
    let id = lab.spiffe_id(path);
    let entry_id = lab.register_entry(path, uid, 3600).await?;
    lab.wait_for_entry_synced(path).await?;
    let (_wl_sensor, wl_task, workload) = workload_api::build(
        workload_api::Settings {
            agent: "a1".into(),
            endpoint: Endpoint::Unix(lab.workload_socket()),
            answer_timeout: Duration::from_secs(5),
            backoff_max: Duration::from_secs(1),
        },
        clock.clone(),
        metrics.clone(),
        wake.clone(),
    );
    tasks.spawn(wl_task.run(shutdown.child_token()));
    let serial_of = |v: &AgentView| {
        v.svids
            .iter()
            .find(|s| s.spiffe_id == id)
            .map(|s| s.serial.clone())
    };
    let wl_view = || workload.view();
    let first = eventually("workload SVID", WAIT, || async {
        let v = wl_view();
        (v.status == StreamStatus::Up)
            .then(|| serial_of(&v))
            .flatten()
    })
    .await?;
    let before = server.get_entry(&entry_id).await?.revision_number;
    let listed = server.list_entries_by_spiffe_id(&id).await?;
    ensure!(listed.iter().any(|e| e.id == entry_id), "{listed:?}");
    let bumped_at = Instant::now();
    let revision = server.bump_entry(&entry_id).await?;
    ensure!(revision > before, "revision {before} → {revision}");
    let stored = server.get_entry(&entry_id).await?;
    ensure!(stored.revision_number == revision);
    ensure!(
        stored.hint.is_empty() && stored.x509_svid_ttl == 3600,
        "{stored:?}"
    );
    let second = eventually("new serial after the bump", WAIT, || async {
        serial_of(&wl_view()).filter(|s| *s != first)
    })
    .await
    .with_context(|| format!("agent log:\n{}", log_tail(&lab.agent_log())))?;
    println!(
        "bump_entry: revision {before} → {revision}; serial {first} → {second} after {:.2} s (sync interval {})",
        bumped_at.elapsed().as_secs_f64(),
        lab.options().sync_interval
    );
    let e = server.bump_entry("no-such-entry").await.unwrap_err();
    ensure!(e.kind() == "not_found", "{e:?}");

    // --- join token ------------------------------------------------------------
    let token = server
        .create_join_token(
            Duration::from_secs(600),
            Some(&lab.spiffe_id("/node/extra")),
        )
        .await?;
    ensure!(
        !token.value.is_empty() && token.expires_at > now(),
        "{token:?}"
    );

    // --- permissions: the admin sockets are 0770 root ---------------------------
    for (socket, agent) in [
        (lab.server_socket(), false),
        (lab.agent_admin_socket(), true),
    ] {
        let err: Option<SpireApiError> = as_nobody(move || {
            Box::pin(async move {
                if agent {
                    let c = AgentAdminClient::new(&socket, TIMEOUT).ok()?;
                    c.agent_debug_info().await.err()
                } else {
                    let c = ServerAdminClient::new(&socket, TIMEOUT).ok()?;
                    c.server_debug_info().await.err()
                }
            })
        })?;
        let err = err.context("an unprivileged caller got through")?;
        println!("unprivileged caller: {err} [{}]", err.kind());
        ensure!(err.kind() == "permission_denied", "{err:?}");
    }

    // --- ban (last: the agent shuts down) -----------------------------------
    server.ban_agent(&me.spiffe_id).await?;
    let (agents, _) = server.list_agents_paged(1, 100).await?;
    let banned = agents
        .iter()
        .find(|a| a.spiffe_id == me.spiffe_id)
        .context("banned agent no longer listed")?;
    println!("after BanAgent: {banned:?}");
    ensure!(banned.banned, "{banned:?}");
    eventually("server_api sees the ban", WAIT, || async {
        srv_sensor
            .view()
            .agents
            .iter()
            .any(|a| a.spiffe_id == me.spiffe_id && a.banned)
            .then_some(())
    })
    .await?;
    let e = server
        .ban_agent(&format!("spiffe://{td}/spire/agent/join_token/nobody"))
        .await
        .unwrap_err();
    ensure!(e.kind() == "not_found", "{e:?}");
    // Deleting lifts the ban: the agent is gone from the listing.
    server.delete_agent(&me.spiffe_id).await?;
    let (agents, _) = server.list_agents_paged(10, 10).await?;
    ensure!(
        agents.iter().all(|a| a.spiffe_id != me.spiffe_id),
        "{agents:?}"
    );

    shutdown.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .context("sensor tasks did not stop")?;
    Ok(())
}
