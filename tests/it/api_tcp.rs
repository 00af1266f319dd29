//! The API over TCP with mTLS on real SVIDs: spire-agent (v1.15.3) hands
//! this process two SVIDs, the daemon's (`/healer`, a 10 s TTL: the agent
//! renews it within seconds) and an operator's (`/operator`). The server
//! presents the first from its Workload API watcher, the client the second
//! from a one-shot fetch; a real renewal is presented by the next
//! connection without a restart, while connections made before it go on;
//! a certificate of a CA outside the lab's bundle is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use rustls_pki_types::ServerName;
use spire_healer::api::tcp::{TcpConfig, WorkloadIdentity, serve_tcp};
use spire_healer::api::{ApiAddr, ClientIdentity, SupervisorClient, TlsSettings};
use spire_healer::clock::{Clock, SystemClock};
use spire_healer::endpoint::Endpoint;
use spire_healer::proto::healer::GetStatusRequest;
use spire_healer::proto::healer::supervisor_server::SupervisorServer;
use spire_healer::simulated::issuer::{Flavor, TestCa};
use spire_healer::spiffe_id::{SpiffeId, TrustDomain};
use spire_healer::spire_api::tls::{
    Authorize, IdentitySource, RawIdentity, SpiffeServerVerifier, StaticIdentity,
    client_config_with,
};
use spire_healer::svid;
use spire_healer::telemetry::Metrics;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::cli::over_api::Scripted;
use crate::spire_lab::{LabOptions, SpireLab, log_tail};

/// The daemon's SVID TTL: short, so spire-agent renews it within seconds
/// (v1.15.3 renewed a 10 s SVID 1 s after creating it).
const SERVER_TTL_SECS: u32 = 10;
const WAIT: Duration = Duration::from_secs(30);
const CONNECT: Duration = Duration::from_secs(5);

/// The serial of the leaf the server presents to a caller holding `ours`.
async fn presented_serial(addr: SocketAddr, ours: &RawIdentity, td: &str) -> Result<String> {
    let (chain, key, bundle) = ours.clone();
    let verifier = SpiffeServerVerifier::authorizing(
        &bundle,
        Authorize::TrustDomain(TrustDomain::parse(td)?),
    )?;
    let mut cfg = client_config_with(chain, key, Arc::new(verifier), None)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    // The server's first bytes: it accepted us.
    let mut first = [0u8; 1];
    ensure!(tls.read(&mut first).await? == 1, "the server closed");
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?;
    Ok(svid::leaf_info(leaf)?.serial)
}

fn serial_of(identity: &RawIdentity) -> Result<String> {
    Ok(svid::leaf_info(identity.0.first().context("empty chain")?)?.serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_over_mtls_on_real_svids_presents_a_renewal_without_restart() -> Result<()> {
    let started = Instant::now();
    let lab = SpireLab::start(LabOptions::default()).await?;
    let td = lab.trust_domain().to_string();
    let uid = nix::unistd::geteuid().as_raw();
    lab.register_entry("/healer", uid, SERVER_TTL_SECS).await?;
    lab.register_entry("/operator", uid, 3600).await?;
    lab.wait_for_entry_synced("/healer").await?;
    lab.wait_for_entry_synced("/operator").await?;
    let healer_id = SpiffeId::parse(&lab.spiffe_id("/healer"))?;
    let operator_id = SpiffeId::parse(&lab.spiffe_id("/operator"))?;
    let lab_ready = started.elapsed();

    // --- the server: our SVID from the Workload API, per handshake --------------
    let endpoint = Endpoint::Unix(lab.workload_socket());
    let identity = WorkloadIdentity::new(endpoint.clone(), Some(healer_id.clone()));
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(identity.clone().run(shutdown.child_token()));
    let mut taken = identity.subscribe();
    tokio::time::timeout(WAIT, taken.wait_for(|n| *n >= 1))
        .await
        .with_context(|| format!("our SVID; agent log:\n{}", log_tail(&lab.agent_log())))??;
    let metrics = Arc::new(Metrics::new());
    let (addr, serving) = serve_tcp(
        &TcpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), endpoint.to_string()),
        identity.clone(),
        Routes::new(SupervisorServer::new(Scripted)),
        metrics.clone(),
        shutdown.child_token(),
    )?;
    let served = tokio::spawn(serving);

    // --- the operator: its own SVID, picked by ID from the same agent ----------
    let api_addr = ApiAddr::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let tls = TlsSettings {
        identity: ClientIdentity::WorkloadApi {
            endpoint: endpoint.clone(),
            spiffe_id: Some(operator_id.clone()),
        },
        server_id: Some(healer_id.clone()),
    };
    let before = SupervisorClient::connect(&api_addr, Some(&tls), CONNECT).await?;
    let who = before
        .rpc()
        .get_status(GetStatusRequest {})
        .await?
        .into_inner();
    ensure!(who.version == operator_id.as_str(), "{who:?}");
    let operator = ClientIdentity::WorkloadApi {
        endpoint: endpoint.clone(),
        spiffe_id: Some(operator_id.clone()),
    }
    .load(CONNECT)
    .await?;

    // What the server presents now (the agent may renew at any moment).
    let old = presented_serial(addr, &operator, &td).await?;

    // --- a real renewal ----------------------------------------------------------
    let renewal = Instant::now();
    let renewed = async {
        loop {
            let current = identity.current().map(|i| serial_of(&i)).transpose()?;
            if current.as_ref().is_some_and(|s| *s != old) {
                return Ok::<_, anyhow::Error>(());
            }
            taken.changed().await?;
        }
    };
    tokio::time::timeout(WAIT, renewed)
        .await
        .with_context(|| format!("a renewal; agent log:\n{}", log_tail(&lab.agent_log())))??;
    let renewed_after = renewal.elapsed();
    // spire-agent itself renewed it (not a re-creation of the entry).
    let agent_log = std::fs::read_to_string(lab.agent_log()).unwrap_or_default();
    ensure!(
        agent_log
            .lines()
            .any(|l| l.contains("Renewing X509-SVID") && l.contains(healer_id.as_str())),
        "no renewal logged:\n{}",
        log_tail(&lab.agent_log())
    );
    let presented = presented_serial(addr, &operator, &td).await?;
    let latest = serial_of(&identity.current().context("current")?)?;
    ensure!(
        presented != old && presented == latest,
        "presented {presented}, latest {latest}, before the renewal {old}"
    );
    // The connection made before the renewal goes on; a new one works too.
    let who = before
        .rpc()
        .get_status(GetStatusRequest {})
        .await?
        .into_inner();
    ensure!(who.version == operator_id.as_str(), "{who:?}");
    let after = SupervisorClient::connect(&api_addr, Some(&tls), CONNECT).await?;
    after.rpc().get_status(GetStatusRequest {}).await?;

    // --- an outsider with the lab's trust domain name, but not its CA -----------
    let now = SystemClock.now();
    let hour = Duration::from_secs(3600);
    let fake_ca = TestCa::new(&td, now - hour, now + hour)?;
    let (leaf, key, _) =
        fake_ca.issue(operator_id.as_str(), now - hour, now + hour, Flavor::Valid)?;
    let outsider = TlsSettings {
        identity: ClientIdentity::Source(Arc::new(StaticIdentity(Some((
            vec![leaf],
            key,
            operator.2.clone(),
        ))))),
        server_id: Some(healer_id.clone()),
    };
    let e = SupervisorClient::connect(&api_addr, Some(&outsider), CONNECT)
        .await
        .expect_err("outsider");
    ensure!(e.kind() == "unauthenticated", "{e:?}");
    let refused = metrics
        .api_tls_handshake_failures_total
        .with_label_values(&["unknown_ca"])
        .get();
    let deadline = Instant::now() + WAIT;
    let mut refused_now = refused;
    while refused_now == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        refused_now = metrics
            .api_tls_handshake_failures_total
            .with_label_values(&["unknown_ca"])
            .get();
    }
    ensure!(refused_now == 1, "{}", metrics.render());

    shutdown.cancel();
    served.await??;
    watcher.await?;
    println!(
        "lab ready in {:.1}s; renewed {:.1}s after the serial first presented; whole test {:.1}s",
        lab_ready.as_secs_f64(),
        renewed_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
