//! Knowledge: the store's write path as the loop uses it. Events are
//! buffered in order and flushed within a budget each tick, so a database
//! that hangs never stalls detection; what does not land stays buffered
//! for the next tick.

use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::knowledge::{ActionRecord, Buffer};
use crate::model::{Event, Outcome, OutcomeKind};
use crate::telemetry::Metrics;
use std::sync::Arc;

/// Time a tick may spend writing to the store.
const FLUSH_BUDGET: Duration = Duration::from_millis(400);
/// Bounded attempts to land what is left at shutdown.
const DRAIN_ATTEMPTS: usize = 10;

/// The buffer in front of the store, with its metrics.
pub(super) struct Recorder {
    buffer: Buffer,
    metrics: Arc<Metrics>,
}

impl Recorder {
    pub(super) fn new(buffer: Buffer, metrics: Arc<Metrics>) -> Self {
        Self { buffer, metrics }
    }

    pub(super) fn push(&mut self, events: Vec<Event>) {
        self.buffer.push(events);
    }

    /// Events still waiting for the store.
    pub(super) fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Writes what is buffered, within [`FLUSH_BUDGET`]. Cancel-safe:
    /// committed chunks are gone from the buffer, the rest waits.
    pub(super) async fn flush(&mut self) {
        let m = &self.metrics;
        let timer = m.store_flush_duration_seconds.start_timer();
        let dropped_before = self.buffer.dropped();
        match tokio::time::timeout(FLUSH_BUDGET, self.buffer.flush()).await {
            Ok(Ok(_)) => m.store_up.set(1),
            Err(_) => {
                m.store_up.set(0);
                m.error("store", "timeout");
                warn!(
                    buffered = self.buffer.len(),
                    budget_ms = FLUSH_BUDGET.as_millis() as u64,
                    "Store write did not finish within its budget; keeping events buffered."
                );
            }
            Ok(Err(e)) => {
                m.store_up.set(0);
                m.error("store", e.kind());
                warn!(error = %e, buffered = self.buffer.len(), "Store write failed; keeping events buffered.");
            }
        }
        timer.observe_duration();
        let dropped = self.buffer.dropped().saturating_sub(dropped_before);
        m.store_dropped_events_total.inc_by(dropped);
        m.store_buffered_events.set(self.buffer.len() as i64);
    }

    /// A few bounded attempts to land everything before exiting.
    pub(super) async fn drain(&mut self) {
        for _ in 0..DRAIN_ATTEMPTS {
            self.flush().await;
            if self.buffer.is_empty() {
                break;
            }
        }
    }
}

/// Closes the actions the store has as started but never finished: the
/// supervisor stopped before they returned.
pub(super) fn abandoned(recent_actions: &[ActionRecord], now: SystemTime) -> Vec<Event> {
    recent_actions
        .iter()
        .filter(|a| a.finished_at_ms.is_none())
        .map(|a| Event::ActionFinished {
            id: a.id.clone(),
            outcome: Outcome {
                kind: OutcomeKind::Error,
                detail: serde_json::json!({}),
                error: Some("abandoned: the supervisor stopped before the action finished".into()),
            },
            at: now,
        })
        .collect()
}
