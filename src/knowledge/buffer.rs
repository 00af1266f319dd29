//! The supervisor's write path: events wait here, in order, until the store
//! has committed them.
//!
//! Guarantees:
//! - Events reach the store in the order they were pushed, in chunks of at
//!   of at most 5,000 (one `apply`, so one transaction, per chunk).
//! - An event leaves the buffer only after the chunk holding it committed. A
//!   chunk whose outcome is unknown (the connection died during `COMMIT`) is
//!   sent again; `Store::apply` is idempotent, so it lands once.
//!
//! - With a [`Spool`], events the store did not take can be made durable
//!   ([`Buffer::spool_pending`]); while the spool holds anything, every new
//!   event is spooled before it is written (write-ahead), and the spool is
//!   emptied once the store has taken everything. Events dropped from
//!   memory while spooled are read back from the spool before that.
//!
//! Caveat: memory is bounded by `capacity`. When full, the oldest
//! `SubjectSeen` events go first (the next observation re-derives them;
//! only `first_seen`/`last_seen` widen less), then the oldest events of any
//! kind. Every drop is counted in [`Buffer::dropped`].

use std::collections::VecDeque;
use std::sync::Arc;

use super::spool::{Spool, SpoolError};
use super::{Store, StoreError};
use crate::model::Event;

/// Events per `apply` call: big enough to amortise a round trip, small
/// enough to keep a transaction short.
const DEFAULT_CHUNK: usize = 5_000;

/// A bounded, ordered queue of events in front of a [`Store`].
pub struct Buffer {
    store: Arc<dyn Store>,
    capacity: usize,
    chunk: usize,
    pending: VecDeque<Event>,
    dropped: u64,
    /// Set once a drop was logged at `warn`; cleared by a complete flush, so
    /// an outage logs one warning, not one per tick.
    warned: bool,
    spool: Option<Spool>,
    /// Index in `pending` of the first event not in the spool.
    unspooled: usize,
    /// Events the spool holds were dropped from memory: read them back
    /// from the spool before emptying it.
    spooled_dropped: bool,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("backend", &self.store.backend())
            .field("capacity", &self.capacity)
            .field("chunk", &self.chunk)
            .field("pending", &self.pending.len())
            .field("dropped", &self.dropped)
            .field("spool", &self.spool)
            .field("unspooled", &self.unspooled)
            .finish()
    }
}

// === impl Buffer ===

impl Buffer {
    /// An empty buffer holding at most `capacity` (at least 1) events.
    pub fn new(store: Arc<dyn Store>, capacity: usize) -> Self {
        Self {
            store,
            capacity: capacity.max(1),
            chunk: DEFAULT_CHUNK,
            pending: VecDeque::new(),
            dropped: 0,
            warned: false,
            spool: None,
            unspooled: 0,
            spooled_dropped: false,
        }
    }

    /// Backs the buffer with `spool` (opened and replayed by the caller, so
    /// it starts empty or holds events the store already took).
    pub fn with_spool(mut self, spool: Spool) -> Self {
        self.spool = Some(spool);
        self
    }

    /// Sets the number of events per `apply` call (at least 1).
    pub fn with_chunk_size(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// Queues `events` after those already pending. When this overflows the
    /// capacity, drops the oldest `SubjectSeen` events first and then the
    /// oldest of the rest, counting each in [`dropped`](Self::dropped).
    pub fn push(&mut self, events: impl IntoIterator<Item = Event>) {
        self.pending.extend(events);
        let excess = self.pending.len().saturating_sub(self.capacity);
        if excess == 0 {
            return;
        }
        let mut subjects_to_drop = excess;
        let (mut index, mut spooled_gone) = (0, 0);
        let unspooled = self.unspooled;
        // `retain` visits front to back: the oldest go first.
        self.pending.retain(|e| {
            let drop = subjects_to_drop > 0 && matches!(e, Event::SubjectSeen { .. });
            if drop {
                subjects_to_drop -= 1;
                spooled_gone += usize::from(index < unspooled);
            }
            index += 1;
            !drop
        });
        let others = self.pending.len().saturating_sub(self.capacity);
        self.pending.drain(..others);
        let unspooled = self.unspooled - spooled_gone;
        self.unspooled = unspooled.saturating_sub(others);
        if spooled_gone > 0 || others.min(unspooled) > 0 {
            self.spooled_dropped = true;
        }
        self.dropped += u64::try_from(excess).unwrap_or(u64::MAX);
        if self.warned {
            tracing::debug!(
                dropped = excess,
                dropped_total = self.dropped,
                "Write buffer full; dropped oldest events."
            );
        } else {
            self.warned = true;
            tracing::warn!(
                dropped = excess,
                subject_seen = excess - subjects_to_drop,
                capacity = self.capacity,
                "Write buffer full; dropping oldest events until the store accepts writes."
            );
        }
    }

    /// Writes pending events in order, one `apply` per chunk, and returns how
    /// many were written. Stops at the first failing chunk.
    ///
    /// # Errors
    /// The store's error. Chunks committed before it are removed; the
    /// failing chunk and everything after it stay for the next flush.
    ///
    /// # Cancel safety
    /// Cancel-safe: events are removed only after their chunk committed, and
    /// a chunk cancelled mid-commit is re-applied idempotently.
    pub async fn flush(&mut self) -> Result<usize, StoreError> {
        let mut written = 0;
        while !self.pending.is_empty() {
            let n = self.pending.len().min(self.chunk);
            let chunk = &self.pending.make_contiguous()[..n];
            if let Err(error) = self.store.apply(chunk).await {
                tracing::debug!(
                    written,
                    pending = self.pending.len(),
                    %error,
                    "Flush stopped; keeping events."
                );
                return Err(error);
            }
            self.pending.drain(..n);
            self.unspooled = self.unspooled.saturating_sub(n);
            written += n;
        }
        self.warned = false;
        Ok(written)
    }

    /// Appends the events not yet in the spool to it, synced to disk, and
    /// returns how many. Without a spool, does nothing.
    ///
    /// # Errors
    /// The spool's: full, disk full, or I/O. The events stay in memory and
    /// are offered to the spool again next time.
    pub fn spool_pending(&mut self) -> Result<usize, SpoolError> {
        let Some(spool) = self.spool.as_mut() else {
            return Ok(0);
        };
        let events = &self.pending.make_contiguous()[self.unspooled..];
        spool.append(events)?;
        let n = events.len();
        self.unspooled = self.pending.len();
        Ok(n)
    }

    /// The spool holds events: new ones are spooled before they are
    /// written.
    pub fn spooling(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Bytes the spool holds (0 without one).
    pub fn spool_bytes(&self) -> u64 {
        self.spool.as_ref().map_or(0, Spool::bytes)
    }

    /// After a complete flush: empties the spool, or, when events it holds
    /// were dropped from memory, reads them back into the buffer first
    /// (they are then written by the next flush; applying them again is
    /// idempotent) and returns how many. Does nothing while events are
    /// pending.
    ///
    /// # Errors
    /// The spool could not be read or emptied; it keeps its events.
    pub fn settle_spool(&mut self) -> Result<usize, SpoolError> {
        let Some(spool) = self.spool.as_mut() else {
            return Ok(0);
        };
        if !self.pending.is_empty() || spool.is_empty() {
            return Ok(0);
        }
        if self.spooled_dropped {
            let events = spool.read_all()?;
            let n = events.len();
            self.pending.extend(events);
            self.unspooled = self.pending.len();
            self.spooled_dropped = false;
            return Ok(n);
        }
        spool.clear()?;
        Ok(0)
    }

    /// Events waiting to be written.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Events dropped because the buffer was full, since it was created.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The most events held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use async_trait::async_trait;

    use super::*;
    use crate::knowledge::{
        ActionRecord, ApprovalRecord, AuditRecord, HoldRecord, IncidentRecord, Knowledge, Query,
        SvidRecord,
    };
    use crate::model::Subject;

    /// Records applied batches; fails while `failing`, or after
    /// `ok_before_failing` more successful calls.
    #[derive(Default)]
    struct FakeStore {
        applied: Mutex<Vec<Event>>,
        calls: AtomicUsize,
        /// Calls that succeed before every later call fails; `usize::MAX`
        /// for "never fail".
        ok_calls_left: AtomicUsize,
    }

    impl FakeStore {
        fn healthy() -> Arc<Self> {
            let s = Self::default();
            s.ok_calls_left.store(usize::MAX, Ordering::SeqCst);
            Arc::new(s)
        }

        fn fail_after(&self, ok_calls: usize) {
            self.ok_calls_left.store(ok_calls, Ordering::SeqCst);
        }

        fn applied(&self) -> Vec<Event> {
            self.applied.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Store for FakeStore {
        fn backend(&self) -> &'static str {
            "fake"
        }
        async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let left = self.ok_calls_left.load(Ordering::SeqCst);
            if left == 0 {
                return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
            }
            if left != usize::MAX {
                self.ok_calls_left.store(left - 1, Ordering::SeqCst);
            }
            self.applied.lock().unwrap().extend_from_slice(events);
            Ok(())
        }
        async fn load_knowledge(&self, _: SystemTime) -> Result<Knowledge, StoreError> {
            Ok(Knowledge::default())
        }
        async fn incidents(&self, _: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
            Ok(vec![])
        }
        async fn actions(&self, _: &Query) -> Result<Vec<ActionRecord>, StoreError> {
            Ok(vec![])
        }
        async fn svids(&self, _: &Query) -> Result<Vec<SvidRecord>, StoreError> {
            Ok(vec![])
        }
        async fn holds(&self, _: &Query) -> Result<Vec<HoldRecord>, StoreError> {
            Ok(vec![])
        }
        async fn incident(&self, _: &str) -> Result<Option<IncidentRecord>, StoreError> {
            Ok(None)
        }
        async fn approvals(&self, _: &Query) -> Result<Vec<ApprovalRecord>, StoreError> {
            Ok(vec![])
        }
        async fn audit(&self, _: &Query) -> Result<Vec<AuditRecord>, StoreError> {
            Ok(vec![])
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn seen(n: u64) -> Event {
        Event::SubjectSeen {
            subject: Subject::agent(format!("agent-{n}")),
            at: t(n),
        }
    }

    fn held(n: u64) -> Event {
        Event::Held {
            incident_id: format!("inc-{n}"),
            actuator: "restart".into(),
            target: "agent-a".into(),
            reason: "cooldown".into(),
            at: t(n),
        }
    }

    #[tokio::test]
    async fn outage_keeps_events_then_lands_exactly_once_in_order() {
        let store = FakeStore::healthy();
        let mut buf = Buffer::new(store.clone(), 100).with_chunk_size(4);
        let events: Vec<Event> = (0..10)
            .map(|n| if n % 2 == 0 { seen(n) } else { held(n) })
            .collect();

        store.fail_after(0);
        buf.push(events[..6].iter().cloned());
        assert!(matches!(buf.flush().await, Err(StoreError::Unavailable(_))));
        assert_eq!(buf.len(), 6);
        buf.push(events[6..].iter().cloned());
        assert!(buf.flush().await.is_err());
        assert_eq!(buf.len(), 10);
        assert!(store.applied().is_empty());

        store.fail_after(usize::MAX);
        assert_eq!(buf.flush().await.unwrap(), 10);
        assert!(buf.is_empty());
        assert_eq!(store.applied(), events);
        assert_eq!(buf.dropped(), 0);
        // Three chunks of at most 4 once healthy, plus the two failed calls.
        assert_eq!(store.calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn failure_mid_flush_keeps_only_uncommitted_chunks() {
        let store = FakeStore::healthy();
        let mut buf = Buffer::new(store.clone(), 100).with_chunk_size(3);
        let events: Vec<Event> = (0..8).map(held).collect();
        buf.push(events.clone());

        store.fail_after(1);
        assert!(buf.flush().await.is_err());
        assert_eq!(buf.len(), 5);
        assert_eq!(store.applied(), events[..3]);

        store.fail_after(usize::MAX);
        assert_eq!(buf.flush().await.unwrap(), 5);
        assert_eq!(store.applied(), events);
    }

    #[tokio::test]
    async fn empty_flush_does_not_touch_the_store() {
        let store = FakeStore::healthy();
        let mut buf = Buffer::new(store.clone(), 10);
        assert_eq!(buf.flush().await.unwrap(), 0);
        assert_eq!(store.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn full_buffer_drops_oldest_subject_seen_first() {
        let mut buf = Buffer::new(FakeStore::healthy(), 4);
        buf.push([held(1), seen(2), held(3), seen(4)]);
        buf.push([held(5), held(6)]);
        assert_eq!(buf.dropped(), 2);
        let kept: Vec<Event> = buf.pending.iter().cloned().collect();
        assert_eq!(kept, vec![held(1), held(3), held(5), held(6)]);
    }

    #[test]
    fn full_buffer_then_drops_oldest_of_any_kind() {
        let mut buf = Buffer::new(FakeStore::healthy(), 3);
        buf.push([held(1), seen(2), held(3)]);
        buf.push([held(4), held(5)]);
        // seen(2) first, then the oldest remaining: held(1).
        assert_eq!(buf.dropped(), 2);
        let kept: Vec<Event> = buf.pending.iter().cloned().collect();
        assert_eq!(kept, vec![held(3), held(4), held(5)]);

        // A single push larger than the capacity keeps its newest events.
        buf.push((10..20).map(held));
        assert_eq!(buf.len(), 3);
        assert_eq!(buf.dropped(), 12);
        let kept: Vec<Event> = buf.pending.iter().cloned().collect();
        assert_eq!(kept, vec![held(17), held(18), held(19)]);
    }

    fn spool_in(dir: &tempfile::TempDir) -> Spool {
        Spool::open(&dir.path().join("b.spool"), 1 << 20).unwrap().0
    }

    #[tokio::test]
    async fn spooled_events_dropped_from_memory_are_read_back_before_the_spool_empties() {
        let dir = tempfile::tempdir().unwrap();
        let store = FakeStore::healthy();
        let mut buf = Buffer::new(store.clone(), 3).with_spool(spool_in(&dir));
        store.fail_after(0);
        buf.push([held(1), held(2)]);
        assert!(buf.flush().await.is_err());
        assert_eq!(buf.spool_pending().unwrap(), 2);
        assert!(buf.spooling());
        assert_eq!(buf.spool_pending().unwrap(), 0, "nothing new to spool");
        // Memory overflows: held(1) and held(2) go, but the spool has them.
        buf.push([held(3), held(4), held(5)]);
        assert_eq!(buf.dropped(), 2);
        assert_eq!(buf.spool_pending().unwrap(), 3);

        store.fail_after(usize::MAX);
        assert_eq!(buf.flush().await.unwrap(), 3);
        assert_eq!(buf.settle_spool().unwrap(), 5, "read back from the spool");
        assert!(buf.spooling(), "emptied only once the store has it all");
        assert_eq!(buf.flush().await.unwrap(), 5);
        assert_eq!(buf.settle_spool().unwrap(), 0);
        assert!(!buf.spooling());
        assert_eq!(buf.spool_bytes(), 0);
        let applied = store.applied();
        assert_eq!(applied[..3], [held(3), held(4), held(5)]);
        assert_eq!(applied[3..], (1..=5).map(held).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_partly_committed_flush_spools_only_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.spool");
        let store = FakeStore::healthy();
        let mut buf = Buffer::new(store.clone(), 100)
            .with_chunk_size(2)
            .with_spool(Spool::open(&path, 1 << 20).unwrap().0);
        buf.push((1..=5).map(held));
        store.fail_after(1);
        assert!(buf.flush().await.is_err());
        assert_eq!(buf.spool_pending().unwrap(), 3);
        // Without the spool's lock: read what a restart would replay.
        drop(buf);
        let (_, replay) = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(replay.events, (3..=5).map(held).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn without_a_spool_nothing_is_spooled() {
        let mut buf = Buffer::new(FakeStore::healthy(), 10);
        buf.push([held(1)]);
        assert_eq!(buf.spool_pending().unwrap(), 0);
        assert!(!buf.spooling());
        assert_eq!(buf.settle_spool().unwrap(), 0);
    }
}
