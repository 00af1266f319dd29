//! Observation frames: what the loop sensed in one tick, recorded so that
//! `spire-healer replay` can run analyze and plan over it again.
//!
//! A [`Frame`] is the tick's time, its [`Observations`] (every view, as
//! analysis read them) and the handshake outcomes the tick drained from the
//! counter (fed back through a counter on replay, so the replayed policy's
//! burst windows apply). Everything else analysis and plan read is loop
//! memory, which the replay rebuilds by ticking through the frames in
//! order.
//!
//! Recording is bounded:
//! - [`FrameRecorder::observe`] runs in the tick and only clones `Arc`s:
//!   the last `pre_roll` of frames wait in memory; when a tick has a
//!   symptom they are handed to the writer, then every tick until
//!   `post_roll` after the last symptom. A quiet fleet writes nothing.
//! - [`FrameWriter`] serializes and writes in its own task, behind a
//!   bounded queue: when the queue is full the frame is dropped and
//!   counted, the tick never waits. Frames over `max_frame_bytes`, and
//!   past `max_bytes_per_hour` within an hour, are dropped and counted.
//! - frames older than `retention` are deleted in batches by the store's
//!   retention pruner ([`crate::knowledge::retention`]), with the rest of
//!   the store's old rows.
//!
//! Every frame carries its run id and the run's tick number (`seq`), so a
//! replay sees where frames are missing (not recorded, dropped) and starts
//! its memory afresh there.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ReplayConfig;
use crate::clock::unix_millis;
use crate::handshake::{Counts, Reason, Source};
use crate::knowledge::frames::{FrameStore, StoredFrame};
use crate::model::Observations;
use crate::telemetry::Metrics;

/// The frame format written now; frames say which they are in.
pub const FORMAT: u32 = 1;

/// Frames the writer's queue holds. A symptom hands over the whole
/// pre-roll at once (120 frames at the default 1 s tick and 2 min).
pub const QUEUE_FRAMES: usize = 1024;

/// Most frames the pre-roll keeps, whatever the tick rate (early ticks
/// on sensor changes can come faster than the interval).
pub const MAX_PRE_ROLL_FRAMES: usize = 1024;

/// Frames written per store call.
const WRITE_BATCH: usize = 64;

/// What one tick sensed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// The frame format ([`FORMAT`]).
    pub format: u32,
    /// The tick's `now`.
    pub at: SystemTime,
    /// What the sensors returned (and the agent identities the loop knew).
    pub observations: Observations,
    /// Handshake outcomes drained this tick, by target.
    #[serde(default)]
    pub handshakes: Vec<HandshakeOutcomes>,
}

/// Handshake outcomes of one target within one tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeOutcomes {
    pub target: String,
    /// Count per reason (reasons with none left out).
    pub counts: BTreeMap<Reason, u64>,
    /// The sources that contributed.
    pub sources: Vec<Source>,
}

impl HandshakeOutcomes {
    /// From a drained counter entry.
    pub fn from_counts(target: &str, c: &Counts) -> Self {
        Self {
            target: target.to_string(),
            counts: Reason::ALL
                .into_iter()
                .filter(|r| c.get(*r) > 0)
                .map(|r| (r, c.get(r)))
                .collect(),
            sources: Source::ALL
                .into_iter()
                .filter(|s| c.source_names().contains(&s.as_str()))
                .collect(),
        }
    }

    /// Back to counter counts.
    pub fn to_counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.sources {
            c.add(Reason::Ok, 0, *s);
        }
        for (r, n) in &self.counts {
            c.by_reason[r.index()] = *n;
        }
        c
    }
}

/// What became of a frame: the `outcome` label of
/// `spire_healer_replay_frames_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Stored.
    Written,
    /// Dropped: the writer's queue was full.
    QueueFull,
    /// Dropped: larger than `max_frame_bytes`.
    Oversize,
    /// Dropped: the hour's `max_bytes_per_hour` was spent.
    OverBudget,
    /// Dropped: the store refused it.
    WriteFailed,
    /// Deleted for being older than `retention`.
    Pruned,
}

impl FrameOutcome {
    /// Every outcome.
    pub const ALL: [FrameOutcome; 6] = [
        Self::Written,
        Self::QueueFull,
        Self::Oversize,
        Self::OverBudget,
        Self::WriteFailed,
        Self::Pruned,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::QueueFull => "queue_full",
            Self::Oversize => "oversize",
            Self::OverBudget => "over_budget",
            Self::WriteFailed => "write_failed",
            Self::Pruned => "pruned",
        }
    }
}

fn count(metrics: &Metrics, outcome: FrameOutcome, n: u64) {
    metrics
        .replay_frames_total
        .with_label_values(&[outcome.as_str()])
        .inc_by(n);
}

/// A tick's frame on its way to the writer: shared views, not yet
/// serialized.
#[derive(Debug)]
struct Pending {
    seq: u64,
    at: SystemTime,
    observations: Observations,
    handshakes: HashMap<Arc<str>, Counts>,
}

// === impl FrameRecorder ===

/// The loop's side: decides which ticks become frames (see the module
/// docs) and hands them to the [`FrameWriter`] without waiting.
pub struct FrameRecorder {
    state: Mutex<RecorderState>,
    tx: mpsc::Sender<Pending>,
    pre_roll: Duration,
    post_roll: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct RecorderState {
    /// Ticks observed so far (the next frame's `seq`).
    seq: u64,
    /// The pre-roll: recent frames not written (yet).
    ring: VecDeque<Pending>,
    /// Every tick up to this time is written (the post-roll of the last
    /// symptom).
    until: Option<SystemTime>,
}

impl FrameRecorder {
    /// A recorder and its writer, with a queue of [`QUEUE_FRAMES`]. The
    /// writer's frames are stored under `run_id` (one per process: the
    /// `Watch` hub's run id).
    pub fn new(cfg: &ReplayConfig, run_id: &str, metrics: Arc<Metrics>) -> (Self, FrameWriter) {
        Self::with_queue(cfg, QUEUE_FRAMES, run_id, metrics)
    }

    /// [`FrameRecorder::new`] with a queue of `queue` frames (at least 1).
    pub fn with_queue(
        cfg: &ReplayConfig,
        queue: usize,
        run_id: &str,
        metrics: Arc<Metrics>,
    ) -> (Self, FrameWriter) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        for o in FrameOutcome::ALL {
            metrics.replay_frames_total.with_label_values(&[o.as_str()]);
        }
        let recorder = Self {
            state: Mutex::default(),
            tx,
            pre_roll: cfg.pre_roll,
            post_roll: cfg.post_roll,
            metrics: metrics.clone(),
        };
        let writer = FrameWriter {
            rx,
            run_id: run_id.to_string(),
            max_frame_bytes: cfg.max_frame_bytes,
            max_bytes_per_hour: cfg.max_bytes_per_hour,
            hour: (u64::MAX, 0),
            metrics,
        };
        (recorder, writer)
    }

    /// Called once per tick, after analysis: `obs` is what the tick
    /// sensed (with the agent identities it used), `handshakes` the
    /// outcomes it drained, `any_symptom` whether analysis found any.
    /// Clones `Arc`s only; never waits (a full queue drops the frame and
    /// counts it).
    pub fn observe(
        &self,
        obs: &Observations,
        handshakes: &HashMap<Arc<str>, Counts>,
        any_symptom: bool,
        now: SystemTime,
    ) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let frame = Pending {
            seq: st.seq,
            at: now,
            observations: obs.clone(),
            handshakes: handshakes.clone(),
        };
        st.seq += 1;
        let pre_roll = self.pre_roll;
        while st.ring.front().is_some_and(|f| {
            crate::clock::saturating_since(now, f.at) > pre_roll
                || st.ring.len() >= MAX_PRE_ROLL_FRAMES
        }) {
            st.ring.pop_front();
        }
        if any_symptom {
            st.until = now.checked_add(self.post_roll);
        }
        if st.until.is_some_and(|until| now <= until) {
            let ring = std::mem::take(&mut st.ring);
            drop(st);
            for f in ring.into_iter().chain(std::iter::once(frame)) {
                if self.tx.try_send(f).is_err() {
                    count(&self.metrics, FrameOutcome::QueueFull, 1);
                }
            }
        } else {
            st.until = None;
            st.ring.push_back(frame);
        }
    }
}

// === impl FrameWriter ===

/// The writer's side: serializes frames and stores them, in its own task.
pub struct FrameWriter {
    rx: mpsc::Receiver<Pending>,
    run_id: String,
    max_frame_bytes: usize,
    max_bytes_per_hour: u64,
    /// (hour since the epoch, bytes written in it).
    hour: (u64, u64),
    metrics: Arc<Metrics>,
}

impl FrameWriter {
    /// Writes frames as they come until the recorder is dropped (the loop
    /// stopped) or `shutdown`; then writes what is queued and returns.
    ///
    /// # Cancel safety
    /// Not meant to be cancelled: stop it with `shutdown`, which lets the
    /// queued frames land (bounded by the queue's capacity and the store's
    /// timeouts).
    pub async fn run(mut self, store: FrameStore, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                biased;
                f = self.rx.recv() => f,
                () = shutdown.cancelled() => {
                    // No new frames; what is queued still lands.
                    self.rx.close();
                    self.rx.recv().await
                }
            };
            let Some(first) = first else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < WRITE_BATCH {
                match self.rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            let rows = self.encode(batch);
            self.write(&store, &rows).await;
        }
    }

    /// Serializes `batch`; frames over the size bound or the hour's budget
    /// are dropped and counted.
    fn encode(&mut self, batch: Vec<Pending>) -> Vec<StoredFrame> {
        let mut rows = Vec::with_capacity(batch.len());
        for p in batch {
            let mut handshakes: Vec<HandshakeOutcomes> = p
                .handshakes
                .iter()
                .map(|(t, c)| HandshakeOutcomes::from_counts(t, c))
                .collect();
            handshakes.sort_by(|a, b| a.target.cmp(&b.target));
            let frame = Frame {
                format: FORMAT,
                at: p.at,
                observations: p.observations,
                handshakes,
            };
            let json = match serde_json::to_string(&frame) {
                Ok(j) => j,
                Err(e) => {
                    // Every field is plain data: not expected, but never fatal.
                    warn!(error = %e, "Cannot encode a replay frame; it is not recorded.");
                    count(&self.metrics, FrameOutcome::WriteFailed, 1);
                    continue;
                }
            };
            if json.len() > self.max_frame_bytes {
                count(&self.metrics, FrameOutcome::Oversize, 1);
                continue;
            }
            let hour =
                crate::clock::saturating_since(p.at, SystemTime::UNIX_EPOCH).as_secs() / 3600;
            if self.hour.0 != hour {
                self.hour = (hour, 0);
            }
            let len = json.len() as u64;
            if self.hour.1 + len > self.max_bytes_per_hour {
                count(&self.metrics, FrameOutcome::OverBudget, 1);
                continue;
            }
            self.hour.1 += len;
            rows.push(StoredFrame {
                run_id: self.run_id.clone(),
                seq: i64::try_from(p.seq).unwrap_or(i64::MAX),
                at_ms: unix_millis(p.at),
                frame: json,
            });
        }
        rows
    }

    async fn write(&self, store: &FrameStore, rows: &[StoredFrame]) {
        if rows.is_empty() {
            return;
        }
        let n = rows.len() as u64;
        match store.insert(rows).await {
            Ok(()) => count(&self.metrics, FrameOutcome::Written, n),
            Err(e) => {
                // Replay data is best effort: never retried, never queued
                // behind the loop's own events.
                count(&self.metrics, FrameOutcome::WriteFailed, n);
                self.metrics.error("store", e.kind());
                warn!(error = %e, frames = n, "Cannot store replay frames; they are dropped.");
            }
        }
    }
}

#[cfg(test)]
mod tests;
