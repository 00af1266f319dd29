//! `agent_debug` sensor: polls one spire-agent's admin socket (Debug API).
//!
//! A background task calls `spire.agent.debug.v1.Debug/GetInfo` every
//! `poll_interval` under `timeout` and publishes an `Arc<AgentDebugView>`:
//! the last successful sync with a server (the most direct agent→server
//! connectivity signal SPIRE exposes), uptime, cached X.509-SVIDs, and the
//! agent's own SPIFFE ID and SVID expiry. A failed poll marks the view
//! unreachable with a closed-set error kind and keeps the last answer's
//! values; polls that time out in a row (the socket accepts, the process
//! does not answer: a stopped agent) are dated by `unanswered_since`, which
//! an answer or any other failure clears. SPIRE caches the answer for 5 s ([`SPIRE_ANSWER_CACHE`]), so
//! `last_sync_success` may lag by that much: the view says after which
//! instant the agent computed its answer (`answered_after`), from the poll
//! time minus the cache and from the last poll that read a different
//! answer (the uptime moves with every fresh answer).
//!
//! The admin socket is off by default (`admin_socket_path`) and created
//! 0770: a supervisor outside the agent's group gets `permission_denied`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::server_api::error_chain;
use crate::clock::Clock;
use crate::model::{AgentDebugView, Reading};
use crate::spire_api::{AgentAdminClient, AgentDebugInfo, SpireApiError};
use crate::telemetry::Metrics;

/// Default poll period.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default deadline of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// The error kind of a poll that got no answer within its deadline.
const TIMEOUT_KIND: &str = "timeout";
/// How long spire-agent serves one computed `GetInfo` answer.
pub use crate::model::SPIRE_DEBUG_ANSWER_CACHE as SPIRE_ANSWER_CACHE;

/// Settings for one agent's Debug sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Configured agent name.
    pub agent: String,
    /// The agent's admin socket (`admin_socket_path`).
    pub admin_socket: PathBuf,
    /// Time between poll starts.
    pub poll_interval: Duration,
    /// Deadline of each call (and of each dial).
    pub timeout: Duration,
}

impl Settings {
    /// Settings with the default interval and timeout.
    pub fn new(agent: impl Into<String>, admin_socket: impl Into<PathBuf>) -> Self {
        Self {
            agent: agent.into(),
            admin_socket: admin_socket.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The sensor half: reads the published view.
pub type AgentDebugSensor = super::Snapshot<AgentDebugView>;

/// The background task half.
pub struct AgentDebugTask {
    settings: Settings,
    view: watch::Sender<Arc<AgentDebugView>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    /// The last answer read.
    last_answer: std::sync::Mutex<Option<LastAnswer>>,
}

/// The last answer read, when, and since when it is known to exist.
#[derive(Debug, Clone, Copy)]
struct LastAnswer {
    answer: Answer,
    /// Start of the latest poll that read it.
    read_at: SystemTime,
    /// The agent computed it after this.
    after: SystemTime,
}

/// What identifies one computed Debug answer: SPIRE recomputes uptime and
/// last sync together when its cache expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    uptime_secs: u64,
    last_sync_success: Option<SystemTime>,
}

/// Builds the sensor and its poll task. Until the first poll ends the view
/// is unreachable with no error. `wake` is notified whenever the view
/// changes beyond its timestamp.
pub fn build(
    settings: Settings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (AgentDebugSensor, AgentDebugTask) {
    let initial = AgentDebugView {
        agent: settings.agent.clone(),
        reachable: false,
        last_error: None,
        unanswered_since: None,
        updated_at: clock.now(),
        last_sync_success: None,
        answered_after: None,
        uptime_secs: 0,
        cached_x509_svids: 0,
        spiffe_id: None,
        svid_expires_at: None,
    };
    let (tx, rx) = watch::channel(Arc::new(initial));
    (
        super::Snapshot::new(
            "agent_debug",
            settings.agent.clone(),
            rx,
            Reading::AgentDebug,
        ),
        AgentDebugTask {
            settings,
            view: tx,
            clock,
            metrics,
            wake,
            last_answer: std::sync::Mutex::new(None),
        },
    )
}

impl AgentDebugTask {
    /// Polls until `shutdown`: at once, then every `poll_interval` (never
    /// overlapping).
    ///
    /// # Cancel safety
    /// Holds no external state: dropping it mid-poll abandons the call.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut client: Option<AgentAdminClient> = None;
        let mut cadence = super::Cadence::new(self.settings.poll_interval);
        while cadence.next(&shutdown).await {
            if client.is_none() {
                match AgentAdminClient::new(&self.settings.admin_socket, self.settings.timeout) {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        self.apply(Err(e), self.clock.now());
                        continue;
                    }
                }
            }
            let Some(c) = &client else { continue };
            let started = self.clock.now();
            let Some(result) = super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "agent_debug", c.agent_debug_info()),
            )
            .await
            else {
                return;
            };
            self.apply(result, started);
        }
    }

    /// Publishes the outcome of one poll that started at `started`.
    fn apply(&self, result: Result<AgentDebugInfo, SpireApiError>, started: SystemTime) {
        let now = self.clock.now();
        let prev = self.view.borrow().clone();
        let mut next = (*prev).clone();
        match result {
            Ok(info) => {
                if !prev.reachable {
                    info!(
                        spiffe_id = info.spiffe_id().unwrap_or("unknown"),
                        "Agent admin API answered."
                    );
                }
                next.reachable = true;
                next.last_error = None;
                next.unanswered_since = None;
                next.answered_after = Some(self.answered_after(&info, started));
                next.last_sync_success = info.last_sync_success;
                next.uptime_secs = info.uptime_secs;
                next.cached_x509_svids = info.cached_x509_svids;
                next.spiffe_id = info.spiffe_id().map(str::to_string);
                next.svid_expires_at = info.svid_expires_at();
            }
            Err(e) => {
                let kind = e.kind();
                self.metrics.error("sensor", kind);
                if prev.reachable || prev.last_error.as_deref() != Some(kind) {
                    warn!(kind, error = %error_chain(&e), "Agent admin API poll failed.");
                }
                next.reachable = false;
                next.last_error = Some(kind.to_string());
                // Only polls that got no answer in time, in a row, count
                // towards a hung agent.
                next.unanswered_since =
                    (kind == TIMEOUT_KIND).then(|| prev.unanswered_since.unwrap_or(started));
            }
        }
        // `answered_after` moves with every poll: only a new answer wakes
        // the loop (its tick re-reads the view anyway).
        let changed = AgentDebugView {
            answered_after: prev.answered_after,
            ..next.clone()
        } != *prev;
        next.updated_at = now;
        self.view.send_replace(Arc::new(next));
        if changed {
            self.wake.notify_one();
        }
    }

    /// The instant after which the agent computed `info`, read by a poll
    /// that started at `now`: the latest of `now` minus SPIRE's cache (the
    /// answer was served after `now`), the start of the latest poll that
    /// read a different answer (that one was still cached then), and what
    /// was known of this answer before.
    fn answered_after(&self, info: &AgentDebugInfo, now: SystemTime) -> SystemTime {
        let answer = Answer {
            uptime_secs: info.uptime_secs,
            last_sync_success: info.last_sync_success,
        };
        let by_cache = now.checked_sub(SPIRE_ANSWER_CACHE).unwrap_or(now);
        let mut last = self
            .last_answer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let after = match *last {
            Some(l) if l.answer != answer => by_cache.max(l.read_at),
            Some(l) => by_cache.max(l.after),
            None => by_cache,
        }
        .min(now);
        *last = Some(LastAnswer {
            answer,
            read_at: now,
            after,
        });
        after
    }
}

#[cfg(test)]
mod tests;
