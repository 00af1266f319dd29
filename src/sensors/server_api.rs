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
//! Transport: the local socket by default; [`ServerApiTask::with_client`]
//! hands in a prebuilt client, e.g. [`ServerAdminClient::tcp_mtls`] for a
//! server reached on its TCP port. SPIRE serves no Debug there, so such a
//! poll is ListAgents and GetBundle only: `uptime_secs` and `entries_count`
//! stay 0, `svid_expires_at` `None`, and `agents_count` is the listing's
//! length.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
                        self.apply(Err(e));
                        continue;
                    }
                }
            }
            let Some(c) = &client else { continue };
            let Some(result) = super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "server_api", self.poll(c)),
            )
            .await
            else {
                return;
            };
            self.apply(result);
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

    /// Publishes the outcome of one poll.
    fn apply(&self, result: Result<Polled, SpireApiError>) {
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
