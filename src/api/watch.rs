//! `Watch`: each subscriber gets a pump task and a bounded queue.
//!
//! The pump follows the [`Hub`] from the subscriber's position and moves
//! events into the subscriber's queue while it has room (at most
//! `watch_buffer` events); the response stream takes them from there as
//! the client reads. A client that stops reading fills its queue; the pump
//! then waits, and its position stays in the hub's ring until the ring
//! moves past it. At that point the subscriber has missed events: its
//! queue is emptied, the stream ends with `RESOURCE_EXHAUSTED` as soon as
//! it is polled, its slot is freed, and
//! `spire_healer_api_watch_dropped_total` counts it. Memory per subscriber
//! is therefore the queue (bounded) plus what HTTP/2 flow control lets sit
//! in the connection's send buffer; the events themselves live once, in
//! the hub's ring.
//!
//! At shutdown the stream delivers what is queued, then ends with
//! `UNAVAILABLE`. When the client goes away, the stream is dropped and the
//! pump ends with it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tracing::{Instrument, debug, info_span};

use super::convert;
use crate::control::Hub;
use crate::proto::healer as pb;
use crate::telemetry::metrics::Metrics;

/// The subscribers of one service: the slot bound, the pump tasks and
/// what tests measure.
#[derive(Debug)]
pub(super) struct Watchers {
    slots: Arc<Semaphore>,
    buffer: usize,
    tasks: TaskTracker,
    /// The most events any subscriber's queue held at once.
    high_water: AtomicUsize,
    /// The most encoded bytes any subscriber's queue held at once.
    high_water_bytes: AtomicUsize,
}

impl Watchers {
    pub(super) fn new(max_watchers: u32, buffer: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_watchers as usize)),
            buffer: buffer.max(1),
            tasks: TaskTracker::new(),
            high_water: AtomicUsize::new(0),
            high_water_bytes: AtomicUsize::new(0),
        }
    }

    /// A slot for one more subscriber.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when `max_watchers` streams are open.
    pub(super) fn slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many Watch streams open; retry later"))
    }

    /// The most events, and encoded bytes, one subscriber's queue held.
    #[cfg(test)]
    pub(super) fn high_water(&self) -> (usize, usize) {
        (
            self.high_water.load(Ordering::Relaxed),
            self.high_water_bytes.load(Ordering::Relaxed),
        )
    }

    /// Subscribers with a pump running.
    #[cfg(test)]
    pub(super) fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Waits for every pump to end (they end at shutdown).
    pub(super) async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Starts a subscriber at `seq` (events after it are streamed).
    pub(super) fn start(
        self: &Arc<Self>,
        hub: Arc<Hub>,
        seq: u64,
        slot: OwnedSemaphorePermit,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> WatchStream {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            waker: AtomicWaker::new(),
            room: Notify::new(),
            gone: CancellationToken::new(),
            capacity: self.buffer,
        });
        let pump = Pump {
            hub,
            seq,
            queue: queue.clone(),
            watchers: self.clone(),
            metrics,
            shutdown,
            _slot: slot,
        };
        self.tasks
            .spawn(pump.run().instrument(info_span!("api_watch", from = seq)));
        WatchStream { queue, done: false }
    }

    fn observe(&self, len: usize, bytes: usize) {
        self.high_water.fetch_max(len, Ordering::Relaxed);
        self.high_water_bytes.fetch_max(bytes, Ordering::Relaxed);
    }
}

// === Queue ===

#[derive(Debug, Default)]
struct QueueState {
    events: VecDeque<pb::WatchEvent>,
    /// Encoded size of `events`.
    bytes: usize,
    /// How the stream ends once `events` is empty.
    end: Option<Status>,
}

/// One subscriber's queue, shared by its pump and its stream.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    /// The stream's task, woken on every change.
    waker: AtomicWaker,
    /// The pump, woken when the stream took an event.
    room: Notify,
    /// Cancelled when the stream is dropped (the client went away).
    gone: CancellationToken,
    capacity: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn room(&self) -> usize {
        self.capacity.saturating_sub(self.lock().events.len())
    }

    /// Appends events; the caller made sure there is room.
    fn push(&self, events: Vec<pb::WatchEvent>, watchers: &Watchers) {
        let mut st = self.lock();
        for e in events {
            st.bytes += prost::Message::encoded_len(&e);
            st.events.push_back(e);
        }
        watchers.observe(st.events.len(), st.bytes);
        drop(st);
        self.waker.wake();
    }

    /// Ends the stream with `status`; `discard` drops what is queued.
    fn end(&self, status: Status, discard: bool) {
        let mut st = self.lock();
        if discard {
            st.events = VecDeque::new();
            st.bytes = 0;
        }
        st.end = Some(status);
        drop(st);
        self.waker.wake();
    }
}

// === Stream ===

/// The response stream of one `Watch` call.
#[derive(Debug)]
pub(super) struct WatchStream {
    queue: Arc<Queue>,
    done: bool,
}

impl Stream for WatchStream {
    type Item = Result<pb::WatchEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Register before looking, so a push after the look wakes us.
        self.queue.waker.register(cx.waker());
        let mut st = self.queue.lock();
        if let Some(e) = st.events.pop_front() {
            st.bytes = st.bytes.saturating_sub(prost::Message::encoded_len(&e));
            drop(st);
            self.queue.room.notify_one();
            return Poll::Ready(Some(Ok(e)));
        }
        if let Some(status) = st.end.take() {
            drop(st);
            self.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Pending
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.queue.gone.cancel();
    }
}

// === Pump ===

/// Most events moved from the hub per step (one lock of its ring).
const CHUNK: usize = 256;

struct Pump {
    hub: Arc<Hub>,
    /// The last event handed to the queue.
    seq: u64,
    queue: Arc<Queue>,
    watchers: Arc<Watchers>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Held until the pump ends: the subscriber's place under
    /// `max_watchers`.
    _slot: OwnedSemaphorePermit,
}

impl Pump {
    async fn run(mut self) {
        let mut newest = self.hub.subscribe();
        loop {
            if let Err(missed) = self.step() {
                debug!(missed, "Watch subscriber fell behind; dropping it.");
                self.metrics.api_watch_dropped_total.inc();
                self.queue.end(
                    Status::resource_exhausted(format!(
                        "this Watch fell behind the server's event buffer ({missed} events \
                         missed): read faster, or list and watch again from now"
                    )),
                    true,
                );
                return;
            }
            // Registered before the look below, so no wake-up is lost.
            let room = self.queue.room.notified();
            let blocked = self.queue.room() == 0;
            let behind = self.hub.newest() > self.seq;
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    self.queue.end(Status::unavailable("spire-healer is shutting down"), false);
                    return;
                }
                () = self.queue.gone.cancelled() => return,
                changed = newest.changed() => {
                    if changed.is_err() {
                        // The hub is gone: nothing more will come.
                        self.queue.end(Status::unavailable("the event hub closed"), false);
                        return;
                    }
                }
                () = room, if blocked && behind => {}
            }
        }
    }

    /// Moves what fits from the hub into the queue.
    ///
    /// # Errors
    /// How many events the subscriber missed, when the hub's ring moved
    /// past its position.
    fn step(&mut self) -> Result<(), u64> {
        loop {
            if self.hub.newest() <= self.seq {
                return Ok(());
            }
            let room = self.queue.room();
            // Even without room, look at one event: is our position still
            // in the ring?
            let batch = self.hub.after(self.seq, room.clamp(1, CHUNK));
            let Some(first) = batch.first() else {
                // Newer events exist, none held after us: all gone.
                return Err(self.hub.newest() - self.seq);
            };
            if first.seq != self.seq + 1 {
                return Err(first.seq - self.seq - 1);
            }
            if room == 0 {
                return Ok(());
            }
            self.seq = batch.last().map_or(self.seq, |w| w.seq);
            let events = batch
                .iter()
                .filter_map(|w| {
                    convert::watch_event(&w.event).map(|mut e| {
                        e.cursor = self.hub.cursor(w.seq);
                        e
                    })
                })
                .collect();
            self.queue.push(events, &self.watchers);
        }
    }
}
