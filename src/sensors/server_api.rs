//! `server_api` sensor: polls one spire-server's local admin socket.
//!
//! A background task polls every `poll_interval`: Debug.GetInfo, paged
//! Agent.ListAgents and Bundle.GetBundle, concurrently over one channel, each
//! call under `timeout`. A poll succeeds only if all three do; then the view
//! is replaced as a whole. A failure of any marks the server unreachable with
//! a closed-set error kind (see [`SpireApiError::kind`]) and keeps the agent
//! list, bundle and counts of the last good poll, so the analysis still sees
//! what the server last said. The view is published as an
//! `Arc<ServerView>` over a `watch` channel; [`Sensor::observe`] hands out a
//! pointer copy.
//!
//! View semantics ([`ServerView`]): `reachable` is the last poll's result;
//! `since` moves only when `reachable` flips; `updated_at` is the end of the
//! last poll, good or bad; `last_error` is the kind of the last failed poll
//! and is cleared by a good one.
//!
//! Agent-facing address: when [`Settings::address`] is set (the
//! `[[servers]] address`, `host:port` agents dial), every poll also runs a
//! TLS handshake to it, concurrently with the admin calls and under the same
//! `timeout` ([`probe_address`]), and records the outcome in
//! `address_reachable` / `address_error`. The healer runs on the agent's
//! node, so this approximates what the agent can reach: a network partition
//! between node and server leaves the admin API answering while agents
//! cannot sync. The check presents no client certificate (SPIRE does not
//! require one for the handshake), offers ALPN `h2` like gRPC, accepts the
//! server's certificate without validating its chain (reachability only:
//! [`ReachabilityVerifier`]) but still verifies the handshake signatures,
//! and sends nothing after the handshake: it closes the connection at once.
//! Each check is counted in
//! `spire_healer_server_address_checks_total{server,outcome}`.
//!
//! Transport: the local socket by default; [`ServerApiTask::with_client`]
//! hands in a prebuilt client, e.g. [`ServerAdminClient::tcp_mtls`] for a
//! server reached on its TCP port. SPIRE serves no Debug there, so such a
//! poll is ListAgents and GetBundle only: `uptime_secs` and `entries_count`
//! stay 0, `svid_expires_at` `None`, and `agents_count` is the listing's
//! length.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::entry_lookups::EntryLookups;
use crate::clock::Clock;
use crate::model::{Authority, EntryLookup, EntrySummary, Reading, ServerAgent, ServerView};
use crate::spire_api::{ServerAdminClient, ServerDebugInfo, SpireApiError};
use crate::telemetry::Metrics;

/// Default agents per ListAgents page.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
/// Default bound on ListAgents pages per poll (500 000 agents at the
/// default page size).
pub const DEFAULT_MAX_PAGES: u32 = 1000;
/// Default poll period.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default deadline of one RPC.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings for one server's sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Configured server name.
    pub server: String,
    /// The server's local admin socket (`socket_path`).
    pub admin_socket: PathBuf,
    /// Time between poll starts.
    pub poll_interval: Duration,
    /// Deadline of each RPC (and of each dial).
    pub timeout: Duration,
    /// Agents per ListAgents page.
    pub page_size: u32,
    /// ListAgents pages per poll at most; beyond it the listing is marked
    /// truncated.
    pub max_pages: u32,
    /// The server's agent-facing `host:port` (`[[servers]] address`): when
    /// set, each poll also checks it with a TLS handshake.
    pub address: Option<String>,
}

impl Settings {
    /// Settings with the default interval, timeout and paging bounds.
    pub fn new(server: impl Into<String>, admin_socket: impl Into<PathBuf>) -> Self {
        Self {
            server: server.into(),
            admin_socket: admin_socket.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            page_size: DEFAULT_PAGE_SIZE,
            max_pages: DEFAULT_MAX_PAGES,
            address: None,
        }
    }
}

/// The sensor half: reads the published view.
pub type ServerApiSensor = super::Snapshot<ServerView>;

/// The background task half.
pub struct ServerApiTask {
    settings: Settings,
    view: watch::Sender<Arc<ServerView>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    client: Option<ServerAdminClient>,
    lookups: Arc<EntryLookups>,
}

/// Builds the sensor and its poll task. Until the first poll ends the view
/// is unreachable with no error. `wake` is notified whenever the view
/// changes beyond its timestamp, so the loop can tick early.
pub fn build(
    settings: Settings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (ServerApiSensor, ServerApiTask) {
    let now = clock.now();
    let initial = ServerView {
        server: settings.server.clone(),
        reachable: false,
        last_error: None,
        since: now,
        updated_at: now,
        uptime_secs: 0,
        svid_expires_at: None,
        agents_count: 0,
        entries_count: 0,
        agents: Vec::new(),
        agents_truncated: false,
        bundle: Vec::new(),
        bundle_sequence: 0,
        entry_lookups: Vec::new(),
        address_reachable: None,
        address_error: None,
    };
    let (tx, rx) = watch::channel(Arc::new(initial));
    (
        super::Snapshot::new("server_api", settings.server.clone(), rx, Reading::Server),
        ServerApiTask {
            settings,
            view: tx,
            clock,
            metrics,
            wake,
            client: None,
            lookups: Arc::default(),
        },
    )
}

/// What one good poll read.
struct Polled {
    /// `None` over TCP, where SPIRE serves no Debug.
    info: Option<ServerDebugInfo>,
    agents: Vec<ServerAgent>,
    truncated: bool,
    bundle: Vec<Authority>,
    sequence: u64,
    entry_lookups: Vec<EntryLookup>,
}

/// The parts of an entry a diagnosis names.
fn entry_summary(e: &crate::proto::spire::api::types::Entry) -> EntrySummary {
    let id = |s: &Option<crate::proto::spire::api::types::Spiffeid>| {
        s.as_ref()
            .map(|s| format!("spiffe://{}{}", s.trust_domain, s.path))
            .unwrap_or_default()
    };
    EntrySummary {
        id: e.id.clone(),
        parent_id: id(&e.parent_id),
        selectors: e
            .selectors
            .iter()
            .map(|s| format!("{}:{}", s.r#type, s.value))
            .collect(),
    }
}

impl ServerApiTask {
    /// Polls through `client` instead of a client for
    /// [`Settings::admin_socket`] (which is then ignored).
    #[must_use]
    pub fn with_client(mut self, client: ServerAdminClient) -> Self {
        self.client = Some(client);
        self
    }

    /// Looks up, at every poll, the entries of SPIFFE IDs agents refuse us.
    #[must_use]
    pub fn with_lookups(mut self, lookups: Arc<EntryLookups>) -> Self {
        self.lookups = lookups;
        self
    }

    /// Polls until `shutdown`: the first poll at once, then one every
    /// `poll_interval` (a poll that overruns delays the next one, it never
    /// overlaps it).
    ///
    /// # Cancel safety
    /// Holds no external state: dropping it mid-poll abandons the calls.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut client: Option<ServerAdminClient> = self.client.clone();
        let mut cadence = super::Cadence::new(self.settings.poll_interval);
        while cadence.next(&shutdown).await {
            if client.is_none() {
                match ServerAdminClient::new(&self.settings.admin_socket, self.settings.timeout) {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        let address = self.check_address().await;
                        self.apply(Err(e), address);
                        continue;
                    }
                }
            }
            let Some(c) = &client else { continue };
            let Some((result, address)) = super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "server_api", async {
                    tokio::join!(self.poll(c), self.check_address())
                }),
            )
            .await
            else {
                return;
            };
            self.apply(result, address);
        }
    }

    async fn poll(&self, client: &ServerAdminClient) -> Result<Polled, SpireApiError> {
        let s = &self.settings;
        let local = client.tcp_addr().is_none();
        let info = async {
            if local {
                client.server_debug_info().await.map(Some)
            } else {
                Ok(None)
            }
        };
        let (info, (agents, truncated), (bundle, sequence)) = tokio::try_join!(
            info,
            client.list_agents_paged(s.page_size, s.max_pages),
            client.get_bundle(),
        )?;
        let mut entry_lookups = Vec::new();
        let refused = self.lookups.wanted().into_iter().map(|w| (w, false));
        let aliases = self.lookups.aliases_now().into_iter().map(|w| (w, true));
        for ((agent, spiffe_id), alias) in refused.chain(aliases) {
            let (entries, error) = match client.list_entries_by_spiffe_id(&spiffe_id).await {
                Ok(found) => (Some(found.iter().map(entry_summary).collect()), None),
                Err(e) => {
                    self.metrics.error("sensor", e.kind());
                    (None, Some(e.kind().to_string()))
                }
            };
            entry_lookups.push(EntryLookup {
                agent,
                spiffe_id,
                alias,
                entries,
                error,
            });
        }
        Ok(Polled {
            info,
            agents,
            truncated,
            bundle,
            sequence,
            entry_lookups,
        })
    }

    /// Checks the agent-facing address, if one is configured, and counts the
    /// outcome.
    async fn check_address(&self) -> Option<Result<(), AddressError>> {
        let address = self.settings.address.as_deref()?;
        let result = probe_address(address, self.settings.timeout).await;
        let outcome = match &result {
            Ok(()) => "ok",
            Err(e) => e.kind(),
        };
        self.metrics
            .count_server_address_check(&self.settings.server, outcome);
        Some(result)
    }

    /// Publishes the outcome of one poll and of its address check.
    fn apply(
        &self,
        result: Result<Polled, SpireApiError>,
        address: Option<Result<(), AddressError>>,
    ) {
        let now = self.clock.now();
        let prev = self.view.borrow().clone();
        // Server availability: one event per poll, good when answered.
        let answered = result.is_ok();
        self.metrics.slo_events(
            crate::slo::Sli::ServerAvailability,
            u64::from(answered),
            u64::from(!answered),
        );
        let mut next = match result {
            Ok(p) => {
                if !prev.reachable {
                    info!(agents = p.agents.len(), "Server admin API answered.");
                }
                if p.truncated {
                    warn!(
                        agents = p.agents.len(),
                        max_pages = self.settings.max_pages,
                        "Agent listing truncated."
                    );
                }
                ServerView {
                    server: prev.server.clone(),
                    reachable: true,
                    last_error: None,
                    since: prev.since,
                    updated_at: prev.updated_at,
                    uptime_secs: p.info.as_ref().map_or(0, |i| i.uptime_secs),
                    svid_expires_at: p.info.as_ref().and_then(ServerDebugInfo::svid_expires_at),
                    agents_count: p
                        .info
                        .as_ref()
                        .map_or(p.agents.len() as u64, |i| i.agents_count),
                    entries_count: p.info.as_ref().map_or(0, |i| i.entries_count),
                    agents: p.agents,
                    agents_truncated: p.truncated,
                    bundle: p.bundle,
                    bundle_sequence: p.sequence,
                    entry_lookups: p.entry_lookups,
                    address_reachable: None,
                    address_error: None,
                }
            }
            Err(e) => {
                let kind = e.kind();
                self.metrics.error("sensor", kind);
                if prev.reachable || prev.last_error.as_deref() != Some(kind) {
                    warn!(kind, error = %error_chain(&e), "Server admin API poll failed.");
                }
                // Keep what the server last said; only the status changes.
                let mut v = (*prev).clone();
                v.reachable = false;
                v.last_error = Some(kind.to_string());
                v
            }
        };
        match &address {
            None => {
                next.address_reachable = None;
                next.address_error = None;
            }
            Some(Ok(())) => {
                if prev.address_reachable == Some(false) {
                    info!(address = ?self.settings.address, "Server address reachable again.");
                }
                next.address_reachable = Some(true);
                next.address_error = None;
            }
            Some(Err(e)) => {
                if prev.address_reachable != Some(false)
                    || prev.address_error.as_deref() != Some(e.kind())
                {
                    warn!(address = ?self.settings.address, kind = e.kind(), error = %e,
                        "Server address unreachable from this node.");
                }
                next.address_reachable = Some(false);
                next.address_error = Some(e.kind().to_string());
            }
        }
        if next.reachable != prev.reachable {
            next.since = now;
        }
        // Changed beyond the timestamp? (`updated_at` still equals prev's.)
        let changed = next != *prev;
        next.updated_at = now;
        self.view.send_replace(Arc::new(next));
        if changed {
            self.wake.notify_one();
        }
    }
}

/// Why the agent-facing address failed its check.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The `host:port` does not resolve, or is not `host:port`.
    #[error("address {0:?} does not resolve")]
    Unresolved(String),
    /// Connection refused, or reset / closed before the handshake ended.
    #[error("connection refused or closed during the handshake: {0}")]
    Refused(#[source] std::io::Error),
    /// Connect plus handshake took longer than the poll timeout.
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    /// The peer spoke, but not TLS we can complete.
    #[error("TLS handshake failed: {0}")]
    Protocol(#[source] std::io::Error),
}

impl AddressError {
    /// Every outcome of a check: `ok` and each kind.
    pub const OUTCOMES: [&'static str; 5] = ["ok", "unresolved", "refused", "timeout", "protocol"];

    /// Closed-set kind: `unresolved`, `refused`, `timeout`, `protocol`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unresolved(_) => "unresolved",
            Self::Refused(_) => "refused",
            Self::Timeout(_) => "timeout",
            Self::Protocol(_) => "protocol",
        }
    }
}

/// Accepts any server certificate but verifies the handshake signatures
/// with it, so the peer must hold the key of the certificate it sent.
///
/// For reachability checks only: it proves that a TLS server answers at the
/// address, not who it is. Nothing is sent over such a connection after the
/// handshake.
#[derive(Debug)]
pub struct ReachabilityVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl Default for ReachabilityVerifier {
    fn default() -> Self {
        Self {
            algs: crate::spire_api::tls::provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ReachabilityVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The client configuration of address checks: `ring`, TLS 1.3 and 1.2,
/// ALPN `h2`, no client certificate, [`ReachabilityVerifier`].
fn reachability_config() -> Result<ClientConfig, rustls::Error> {
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(crate::spire_api::tls::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReachabilityVerifier::default()))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Connects to `address` (`host:port`) and completes a TLS handshake, all
/// within `timeout`; then closes the connection without sending anything
/// else. SNI is the host when it is a DNS name, none for an IP.
///
/// # Errors
/// [`AddressError`], classified by [`AddressError::kind`].
pub async fn probe_address(address: &str, timeout: Duration) -> Result<(), AddressError> {
    let unresolved = || AddressError::Unresolved(address.to_string());
    let (host, _) = address.rsplit_once(':').ok_or_else(unresolved)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).map_err(|_| unresolved())?;
    let cfg =
        reachability_config().map_err(|e| AddressError::Protocol(std::io::Error::other(e)))?;
    let attempt = async {
        let addr = tokio::net::lookup_host(address)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(unresolved)?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(AddressError::Refused)?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => AddressError::Protocol(e),
                _ => AddressError::Refused(e),
            })?;
        // close_notify only; a close failure does not undo the handshake.
        let _ = tls.shutdown().await;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| AddressError::Timeout(timeout))?
}

/// `error: cause: cause` for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests;
