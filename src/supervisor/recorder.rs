//! Knowledge: the store's write path as the loop uses it. Events are
//! buffered in order and flushed within a budget each tick, so a database
//! that hangs never stalls detection; what does not land stays buffered
//! for the next tick, and is appended to the local spool (fsync'd) so that
//! a crash before the database answers again loses nothing: the spool is
//! replayed at the next start.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::clock::saturating_since;
use crate::knowledge::{ActionRecord, Buffer, Store};
use crate::model::{Event, Outcome, OutcomeKind};
use crate::telemetry::Metrics;

/// Time a tick may spend writing to the store.
const FLUSH_BUDGET: Duration = Duration::from_millis(400);
/// Bounded attempts to land what is left at shutdown.
const DRAIN_ATTEMPTS: usize = 10;
/// While the store is known to be away, a write is tried again this often
/// (or as soon as the heartbeat finds it back); the loop does not wait on
/// it in between.
const RETRY_AWAY: Duration = Duration::from_secs(5);

/// Whether the store answers: set by every write and by the heartbeat
/// ([`heartbeat`]), which probes it even when nothing needs writing.
#[derive(Debug)]
pub struct StoreHealth {
    up: AtomicBool,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
        }
    }
}

impl StoreHealth {
    /// The store answered at the last write or probe.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Probes `store` once (bounded by `limit`) and records the answer.
    pub async fn probe(&self, store: &dyn Store, metrics: &Metrics, limit: Duration) {
        let up = matches!(tokio::time::timeout(limit, store.ping()).await, Ok(Ok(())));
        if !up {
            metrics.error("store", "ping");
        }
        self.set(up, metrics);
    }

    /// Records a write's or probe's result and `spire_healer_store_up`;
    /// logs the transitions only.
    fn set(&self, up: bool, metrics: &Metrics) {
        metrics.store_up.set(i64::from(up));
        let was = self.up.swap(up, Ordering::SeqCst);
        if was && !up {
            warn!(
                "The knowledge store is away; events stay buffered and actions do not wait for it."
            );
        } else if !was && up {
            info!("The knowledge store answers again.");
        }
    }
}

/// Probes `store` every `every` until `shutdown`, even when nothing needs
/// writing: a database outage on a quiet fleet shows within one beat.
pub async fn heartbeat(
    store: Arc<dyn Store>,
    health: Arc<StoreHealth>,
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        health
            .probe(&*store, &metrics, every.min(Duration::from_secs(2)))
            .await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The buffer in front of the store, with its metrics.
pub(super) struct Recorder {
    buffer: Buffer,
    metrics: Arc<Metrics>,
    health: Arc<StoreHealth>,
    /// The last write that failed: none is tried before `RETRY_AWAY` after
    /// it, unless the heartbeat finds the store back first.
    failed_at: Option<SystemTime>,
    /// The last spool error was logged; cleared when spooling works again,
    /// so a full disk logs once, not every tick.
    spool_warned: bool,
    /// A fenced write found another leader's epoch: nothing more of ours
    /// will ever be recorded.
    fenced_out: bool,
}

impl Recorder {
    pub(super) fn new(buffer: Buffer, metrics: Arc<Metrics>) -> Self {
        Self {
            buffer,
            metrics,
            health: Arc::default(),
            failed_at: None,
            spool_warned: false,
            fenced_out: false,
        }
    }

    /// The store's health, shared with [`heartbeat`].
    pub(super) fn health(&self) -> Arc<StoreHealth> {
        self.health.clone()
    }

    pub(super) fn push(&mut self, events: Vec<Event>) {
        self.buffer.push(events);
    }

    /// Whether a fenced write found another leader's epoch.
    pub(super) fn fenced_out(&self) -> bool {
        self.fenced_out
    }

    /// Events still waiting for the store.
    pub(super) fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Writes what is buffered, within [`FLUSH_BUDGET`]. Cancel-safe:
    /// committed chunks are gone from the buffer, the rest waits. Nothing
    /// is tried (and nothing waited for) while the store is known to be
    /// away, until `RETRY_AWAY` after the last failure or until the
    /// heartbeat finds it back. What the store did not take is spooled
    /// before this returns, so the loop may act on it.
    pub(super) async fn flush(&mut self, now: SystemTime) {
        if self.buffer.is_empty() {
            return;
        }
        if !self.health.is_up()
            && self
                .failed_at
                .is_some_and(|t| saturating_since(now, t) < RETRY_AWAY)
        {
            self.spool();
            self.metrics
                .store_buffered_events
                .set(self.buffer.len() as i64);
            return;
        }
        self.write(now).await;
    }

    /// Makes the events the store has not taken durable in the spool.
    fn spool(&mut self) {
        let m = &self.metrics;
        match self.buffer.spool_pending() {
            Ok(n) => {
                m.store_spooled_events_total.inc_by(n as u64);
                if n > 0 {
                    self.spool_warned = false;
                }
            }
            Err(error) => {
                m.error("spool", error.kind());
                if !self.spool_warned {
                    self.spool_warned = true;
                    tracing::error!(%error, buffered = self.buffer.len(), "Cannot spool events; they are kept in memory only until the store answers.");
                }
            }
        }
        m.store_spool_bytes
            .set(i64::try_from(self.buffer.spool_bytes()).unwrap_or(i64::MAX));
    }

    async fn write(&mut self, now: SystemTime) {
        // Write-ahead: once the spool holds anything, new events go to it
        // before the store, so it always holds a contiguous run of them.
        if self.buffer.spooling() {
            self.spool();
        }
        let m = &self.metrics;
        let timer = m.store_flush_duration_seconds.start_timer();
        let dropped_before = self.buffer.dropped();
        let failed = match tokio::time::timeout(FLUSH_BUDGET, self.buffer.flush()).await {
            Ok(Ok(_)) => None,
            Err(_) => Some("timeout".to_string()),
            Ok(Err(e)) => {
                m.error("store", e.kind());
                if matches!(e, crate::knowledge::StoreError::Fenced { .. }) && !self.fenced_out {
                    tracing::error!(error = %e, "Fenced out: another instance leads; nothing more is recorded or started here.");
                    self.fenced_out = true;
                }
                Some(e.to_string())
            }
        };
        timer.observe_duration();
        match failed {
            None => {
                self.failed_at = None;
                self.health.set(true, m);
                self.settle_spool();
            }
            Some(error) => {
                if self.health.is_up() {
                    warn!(%error, buffered = self.buffer.len(), "Store write failed; keeping events buffered and spooled.");
                }
                if error == "timeout" {
                    m.error("store", "timeout");
                }
                self.failed_at = Some(now);
                self.health.set(false, m);
                self.spool();
            }
        }
        let m = &self.metrics;
        let dropped = self.buffer.dropped().saturating_sub(dropped_before);
        m.store_dropped_events_total.inc_by(dropped);
        m.store_buffered_events.set(self.buffer.len() as i64);
    }

    /// The store took everything: empty the spool (or read back what the
    /// buffer dropped from it, written by the next flush).
    fn settle_spool(&mut self) {
        match self.buffer.settle_spool() {
            Ok(0) => {}
            Ok(n) => info!(
                events = n,
                "Events dropped from memory during the outage are read back from the spool."
            ),
            Err(error) => {
                self.metrics.error("spool", error.kind());
                warn!(%error, "Cannot empty the spool; its events will be replayed (idempotently) at the next start.");
            }
        }
        self.metrics
            .store_spool_bytes
            .set(i64::try_from(self.buffer.spool_bytes()).unwrap_or(i64::MAX));
    }

    /// A few bounded attempts to land everything before exiting, whether
    /// or not the store was last seen away.
    pub(super) async fn drain(&mut self, now: SystemTime) {
        for _ in 0..DRAIN_ATTEMPTS {
            if self.buffer.is_empty() {
                break;
            }
            self.write(now).await;
        }
        // Whatever is left survives the exit in the spool.
        self.spool();
    }
}

/// Closes the actions the store has as started but never finished: the
/// supervisor stopped (crashed) before they returned, so they started and
/// their outcome is unknown. Their verification is taken up again by the
/// executor.
pub(super) fn abandoned(recent_actions: &[ActionRecord], now: SystemTime) -> Vec<Event> {
    recent_actions
        .iter()
        .filter(|a| a.finished_at_ms.is_none())
        .map(|a| Event::ActionFinished {
            id: a.id.clone(),
            outcome: Outcome {
                kind: OutcomeKind::Error,
                detail: serde_json::json!({ "started": true, "outcome_unknown": true }),
                error: Some(
                    "abandoned: spire-healer stopped before the action returned; its outcome is unknown"
                        .into(),
                ),
            },
            at: now,
        })
        .collect()
}
