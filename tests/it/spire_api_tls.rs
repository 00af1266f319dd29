//! The server admin API over the server's TCP port with mTLS, against a real
//! spire-server (v1.15.3) configured with `admin_ids`: our X509-SVID comes
//! from the in-process `workload_api` sensor; an admin ID lists agents and
//! reads the bundle (directly and through the `server_api` sensor), a
//! registered but non-admin ID is refused with `PermissionDenied` (but may
//! still read the bundle, which SPIRE serves to any caller), and a
//! wrong expected server ID fails the handshake with `bad_server_id`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use spire_healer::clock::{Clock, SystemClock};
use spire_healer::endpoint::Endpoint;
use spire_healer::model::ServerView;
use spire_healer::proto::workload::X509svidRequest;
use spire_healer::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spire_healer::sensors::{server_api, workload_api};
use spire_healer::spire_api::ServerAdminClient;
use spire_healer::spire_api::tls::{IdentitySource, RawIdentity, StaticIdentity};
use spire_healer::svid;
use spire_healer::telemetry::Metrics;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::spire_lab::{LabOptions, SpireLab, log_tail};

const TIMEOUT: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(30);
const ADMIN_PATH: &str = "/healer-admin";
const OTHER_PATH: &str = "/not-admin";

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

/// The SPIFFE ID of an identity's leaf.
fn leaf_id(identity: &RawIdentity) -> Option<String> {
    svid::leaf_info(identity.0.first()?)
        .ok()
        .map(|l| l.spiffe_id)
}

/// One `FetchX509SVID` message, straight from the agent: the SVID of `id`
/// as (chain, key, bundle).
async fn fetch_identity(lab: &SpireLab, id: &str) -> Result<Option<RawIdentity>> {
    let channel = Endpoint::Unix(lab.workload_socket()).channel(TIMEOUT)?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        workload_api::SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = tokio::time::timeout(TIMEOUT, client.fetch_x509svid(req))
        .await??
        .into_inner();
    let msg = tokio::time::timeout(TIMEOUT, stream.message())
        .await??
        .context("the agent closed the stream")?;
    let Some(s) = msg.svids.iter().find(|s| s.spiffe_id == id) else {
        return Ok(None);
    };
    let split = |der: &[u8]| -> Result<Vec<Vec<u8>>> {
        Ok(svid::split_der(der)?
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect())
    };
    Ok(Some((
        split(&s.x509_svid)?,
        s.x509_svid_key.clone(),
        split(&s.bundle)?,
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_tcp_mtls_on_real_spire() -> Result<()> {
    let admin_id = format!(
        "spiffe://{}{ADMIN_PATH}",
        LabOptions::default().trust_domain
    );
    let lab = SpireLab::start(LabOptions {
        admin_ids: vec![admin_id.clone()],
        ..LabOptions::default()
    })
    .await?;
    let td = lab.trust_domain().to_string();
    let uid = nix::unistd::geteuid().as_raw();
    lab.register_entry(ADMIN_PATH, uid, 3600).await?;
    lab.wait_for_entry_synced(ADMIN_PATH).await?;

    // --- our SVID, from the workload_api sensor ----------------------------------
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    let wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (_wl_sensor, wl_task, workload) = workload_api::build(
        workload_api::Settings {
            agent: "a1".into(),
            endpoint: Endpoint::Unix(lab.workload_socket()),
            answer_timeout: TIMEOUT,
            backoff_max: Duration::from_secs(1),
        },
        clock.clone(),
        metrics.clone(),
        wake.clone(),
    );
    tasks.spawn(wl_task.run(shutdown.child_token()));
    eventually("our admin SVID", WAIT, || async {
        workload
            .current()
            .filter(|i| leaf_id(i).as_deref() == Some(admin_id.as_str()))
    })
    .await
    .with_context(|| format!("agent log:\n{}", log_tail(&lab.agent_log())))?;

    // --- admin calls over TCP ------------------------------------------------------
    let addr = SocketAddr::from(([127, 0, 0, 1], lab.server_port()));
    let tcp = ServerAdminClient::tcp_mtls(addr, None, workload.clone(), TIMEOUT)?;
    let (agents, truncated) = tcp
        .list_agents_paged(10, 10)
        .await
        .with_context(|| format!("server log:\n{}", log_tail(&lab.server_log())))?;
    println!("ListAgents over mTLS: {agents:#?}");
    ensure!(!truncated);
    ensure!(
        agents.iter().any(|a| a.attestation_type == "join_token"
            && a.spiffe_id
                .starts_with(&format!("spiffe://{td}/spire/agent/join_token/"))),
        "{agents:?}"
    );
    let (bundle, sequence) = tcp.get_bundle().await?;
    let local = ServerAdminClient::new(&lab.server_socket(), TIMEOUT)?;
    let (local_bundle, local_sequence) = local.get_bundle().await?;
    ensure!(!bundle.is_empty());
    ensure!(
        bundle == local_bundle && sequence == local_sequence,
        "TCP bundle {bundle:?} ({sequence}) vs socket {local_bundle:?} ({local_sequence})"
    );
    // Debug is served on the socket only.
    let e = tcp.server_debug_info().await.expect_err("Debug over TCP");
    println!("Debug.GetInfo over TCP: {} ({e})", e.kind());

    // --- the server_api sensor over TCP ----------------------------------------------
    let (srv_sensor, srv_task) = server_api::build(
        server_api::Settings {
            poll_interval: Duration::from_millis(500),
            ..server_api::Settings::new("s1", "")
        },
        clock.clone(),
        metrics.clone(),
        wake.clone(),
    );
    tasks.spawn(
        srv_task
            .with_client(tcp.clone())
            .run(shutdown.child_token()),
    );
    let sv: Arc<ServerView> = eventually("server_api over TCP reachable", WAIT, || async {
        Some(srv_sensor.view()).filter(|v| v.reachable)
    })
    .await
    .with_context(|| format!("last view: {:?}", srv_sensor.view()))?;
    ensure!(
        sv.agents.len() == agents.len() && sv.agents_count == agents.len() as u64,
        "{sv:?}"
    );
    ensure!(
        sv.bundle == bundle && sv.svid_expires_at.is_none(),
        "{sv:?}"
    );

    // --- a wrong expected server ID --------------------------------------------------
    let wrong = ServerAdminClient::tcp_mtls(
        addr,
        Some(&format!("spiffe://{td}/not-the-server")),
        workload.clone(),
        TIMEOUT,
    )?;
    let e = wrong.get_bundle().await.expect_err("wrong server id");
    ensure!(e.kind() == "bad_server_id", "{e:?}");

    // --- a registered ID that is not in admin_ids ------------------------------------
    let other_id = lab.spiffe_id(OTHER_PATH);
    lab.register_entry(OTHER_PATH, uid, 3600).await?;
    lab.wait_for_entry_synced(OTHER_PATH).await?;
    let other = eventually("the non-admin SVID", WAIT, || async {
        fetch_identity(&lab, &other_id).await.ok().flatten()
    })
    .await?;
    let outsider =
        ServerAdminClient::tcp_mtls(addr, None, Arc::new(StaticIdentity(Some(other))), TIMEOUT)?;
    let e = outsider
        .list_agents_paged(10, 1)
        .await
        .expect_err("not an admin");
    println!("ListAgents as {other_id}: {e}");
    ensure!(e.kind() == "permission_denied", "{e:?}");
    let e = outsider
        .get_agent(&agents[0].spiffe_id)
        .await
        .expect_err("not an admin");
    ensure!(e.kind() == "permission_denied", "{e:?}");
    // SPIRE lets any authenticated caller read the bundle.
    let (b, _) = outsider.get_bundle().await?;
    ensure!(b == bundle, "{b:?}");

    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}
