//! Handshake outcomes: the closed reason set, the shared counter every
//! source feeds (active probes, reports over our API, Envoy stats) and the
//! per-tick history `analyze` reads.
//!
//! Outcomes are never stored one by one. Sources add to a [`Counter`] (a
//! map of (target, reason) → count behind one short lock; a batch takes the
//! lock once). Each tick the supervisor drains it into a [`History`] bucket
//! stamped with its own `now`, so sources never read the clock and the
//! analysis stays a pure function of (history, now).
//!
//! Memory is bounded: the counter holds at most `max_targets` targets (the
//! rest are refused and counted), and the history keeps buckets for one
//! baseline window only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Why a handshake ended as it did: a closed set (metric label, store value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Completed, peer verified.
    Ok,
    /// A certificate in the verified chain is past notAfter.
    Expired,
    /// A certificate in the verified chain is before notBefore.
    NotYetValid,
    /// The chain does not lead to a trusted authority (stale or foreign bundle).
    UnknownCa,
    /// Chain fine, but the SPIFFE ID is not the one expected (or missing).
    BadSpiffeId,
    /// A side that must present a certificate did not.
    NoClientCert,
    /// The connection was refused or reset before the handshake completed.
    Refused,
    /// No answer within the deadline (connect or handshake).
    Timeout,
    /// The peer spoke something that is not TLS, or TLS we cannot agree on.
    Protocol,
}

impl Reason {
    /// Number of reasons.
    pub const COUNT: usize = 9;

    /// Every reason, in index order.
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::Ok,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::UnknownCa,
        Reason::BadSpiffeId,
        Reason::NoClientCert,
        Reason::Refused,
        Reason::Timeout,
        Reason::Protocol,
    ];

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::UnknownCa => "unknown_ca",
            Reason::BadSpiffeId => "bad_spiffe_id",
            Reason::NoClientCert => "no_client_cert",
            Reason::Refused => "refused",
            Reason::Timeout => "timeout",
            Reason::Protocol => "protocol",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether this is a failure.
    pub fn is_failure(self) -> bool {
        self != Reason::Ok
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where outcomes for a target came from (evidence; a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Our own `handshake_probe`.
    Probe,
    /// Reported by a workload or sidecar over our API.
    Report,
    /// Derived from Envoy TLS counters scraped by `metrics_scrape`.
    Envoy,
}

impl Source {
    /// Every source.
    pub const ALL: [Source; 3] = [Source::Probe, Source::Report, Source::Envoy];

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Report => "report",
            Source::Envoy => "envoy",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Outcome counts per reason, indexed by [`Reason::index`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Count per reason.
    pub by_reason: [u64; Reason::COUNT],
    /// Bit set of [`Source`]s that contributed.
    pub sources: u8,
}

impl Counts {
    /// Adds `n` outcomes of `reason` from `source`.
    pub fn add(&mut self, reason: Reason, n: u64, source: Source) {
        let c = &mut self.by_reason[reason.index()];
        *c = c.saturating_add(n);
        self.sources |= source.bit();
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &Counts) {
        for (a, b) in self.by_reason.iter_mut().zip(other.by_reason) {
            *a = a.saturating_add(b);
        }
        self.sources |= other.sources;
    }

    /// Count of one reason.
    pub fn get(&self, reason: Reason) -> u64 {
        self.by_reason[reason.index()]
    }

    /// All outcomes, successes included.
    pub fn total(&self) -> u64 {
        self.by_reason
            .iter()
            .fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Names of the contributing sources.
    pub fn source_names(&self) -> Vec<&'static str> {
        Source::ALL
            .into_iter()
            .filter(|s| self.sources & s.bit() != 0)
            .map(Source::as_str)
            .collect()
    }
}

/// Why outcomes were not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The counter already tracks `max_targets` other targets.
    #[error("too many distinct handshake targets")]
    TooManyTargets,
    /// Target name empty or longer than [`MAX_TARGET_LEN`].
    #[error("handshake target name is empty or too long")]
    BadTarget,
}

impl Refused {
    /// Closed-set label.
    pub fn kind(self) -> &'static str {
        match self {
            Refused::TooManyTargets => "too_many_targets",
            Refused::BadTarget => "bad_target",
        }
    }
}

/// Longest accepted target name, in bytes.
pub const MAX_TARGET_LEN: usize = 256;

/// Default bound on distinct targets counted between two ticks.
pub const DEFAULT_MAX_TARGETS: usize = 10_000;

/// Outcomes counted since the last drain, shared by every source.
/// Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Counter {
    inner: Arc<Mutex<HashMap<Arc<str>, Counts>>>,
    max_targets: usize,
}

impl Default for Counter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TARGETS)
    }
}

impl Counter {
    /// A counter tracking at most `max_targets` targets between drains.
    pub fn new(max_targets: usize) -> Self {
        Self {
            inner: Arc::default(),
            max_targets: max_targets.max(1),
        }
    }

    /// Adds `n` outcomes.
    ///
    /// # Errors
    /// [`Refused`] when the target name is unusable or the target bound is
    /// reached; nothing is counted then.
    pub fn add(&self, target: &str, reason: Reason, n: u64, source: Source) -> Result<(), Refused> {
        let mut c = Counts::default();
        c.add(reason, n, source);
        self.add_counts(std::iter::once((target, c)))
            .pop()
            .map_or(Ok(()), Err)
    }

    /// Adds pre-aggregated counts for several targets under one lock.
    /// Returns one [`Refused`] per target that was not counted.
    pub fn add_counts<'a>(
        &self,
        batch: impl IntoIterator<Item = (&'a str, Counts)>,
    ) -> Vec<Refused> {
        self.add_counts_indexed(batch)
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// [`add_counts`](Self::add_counts), telling which items were refused:
    /// (position in `batch`, why), in order. Callers that report per-item
    /// results (the reports API) need to know which targets were dropped.
    pub fn add_counts_indexed<'a>(
        &self,
        batch: impl IntoIterator<Item = (&'a str, Counts)>,
    ) -> Vec<(usize, Refused)> {
        let mut refused = Vec::new();
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (target, counts)) in batch.into_iter().enumerate() {
            if target.is_empty() || target.len() > MAX_TARGET_LEN {
                refused.push((i, Refused::BadTarget));
                continue;
            }
            if let Some(c) = map.get_mut(target) {
                c.merge(&counts);
            } else if map.len() >= self.max_targets {
                refused.push((i, Refused::TooManyTargets));
            } else {
                map.insert(Arc::from(target), counts);
            }
        }
        refused
    }

    /// Takes everything counted so far.
    pub fn drain(&self) -> HashMap<Arc<str>, Counts> {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Counts for one target over a window, as `analyze` reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    /// Outcomes in the recent (burst) window.
    pub recent: Counts,
    /// Outcomes in the baseline window before it.
    pub baseline: Counts,
    /// Length of the baseline actually covered by history (may be shorter
    /// than configured right after start).
    pub baseline_span: Duration,
}

/// Buckets of drained counts, newest last, pruned to `keep`.
///
/// Bounded: ticks closer together than `granularity` share a bucket, target
/// names are interned once and at most `max_targets` distinct names are held
/// across the whole history (outcomes for more are dropped and counted in
/// [`dropped`](Self::dropped)). Worst case: `keep / granularity` buckets of
/// `max_targets` entries.
#[derive(Debug, Default)]
pub struct History {
    /// (stamp: the last tick merged in, opened: the first, counts).
    buckets: VecDeque<(SystemTime, SystemTime, HashMap<Arc<str>, Counts>)>,
    keep: Duration,
    granularity: Duration,
    names: std::collections::HashSet<Arc<str>>,
    max_targets: usize,
    dropped: u64,
}

impl History {
    /// A history keeping `keep` of buckets (the baseline plus burst
    /// windows), one bucket per push, up to [`DEFAULT_MAX_TARGETS`] names.
    pub fn new(keep: Duration) -> Self {
        Self {
            buckets: VecDeque::new(),
            keep,
            granularity: Duration::ZERO,
            names: std::collections::HashSet::new(),
            max_targets: DEFAULT_MAX_TARGETS,
            dropped: 0,
        }
    }

    /// Pushes less than `granularity` after a bucket opened merge into it.
    pub fn with_granularity(mut self, granularity: Duration) -> Self {
        self.granularity = granularity;
        self
    }

    /// Outcomes dropped because `max_targets` names were already held.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Distinct target names held.
    pub fn targets(&self) -> usize {
        self.names.len()
    }

    /// Stores what `counter` gathered since the last call as the bucket
    /// ending at `now`, and drops buckets older than `keep`.
    pub fn drain_from(&mut self, counter: &Counter, now: SystemTime) {
        self.push(now, counter.drain());
    }

    /// Stores one bucket (tests and benches feed literal buckets).
    pub fn push(&mut self, now: SystemTime, bucket: HashMap<Arc<str>, Counts>) {
        let mut interned: HashMap<Arc<str>, Counts> = HashMap::with_capacity(bucket.len());
        for (name, counts) in bucket {
            let name = match self.names.get(&*name) {
                Some(n) => n.clone(),
                None if self.names.len() < self.max_targets => {
                    self.names.insert(name.clone());
                    name
                }
                None => {
                    self.dropped = self.dropped.saturating_add(counts.total());
                    continue;
                }
            };
            interned.insert(name, counts);
        }
        if !interned.is_empty() {
            let merge = self.buckets.back().is_some_and(|(_, opened, _)| {
                now.duration_since(*opened).unwrap_or_default() < self.granularity
            });
            match self.buckets.back_mut() {
                Some((stamp, _, counts)) if merge => {
                    *stamp = now;
                    for (name, c) in interned {
                        counts.entry(name).or_default().merge(&c);
                    }
                }
                _ => self.buckets.push_back((now, now, interned)),
            }
        }
        let mut pruned = false;
        while let Some((t, _, _)) = self.buckets.front() {
            if now.duration_since(*t).unwrap_or_default() > self.keep {
                self.buckets.pop_front();
                pruned = true;
            } else {
                break;
            }
        }
        if pruned {
            // Names only the interning set still holds are gone from history.
            self.names.retain(|n| Arc::strong_count(n) > 1);
        }
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Per target: counts in `(now − recent, now]` and in the baseline
    /// `(now − recent − baseline, now − recent]`.
    pub fn windows(
        &self,
        now: SystemTime,
        recent: Duration,
        baseline: Duration,
    ) -> HashMap<Arc<str>, Window> {
        let recent_start = now.checked_sub(recent).unwrap_or(SystemTime::UNIX_EPOCH);
        let base_start = recent_start
            .checked_sub(baseline)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let oldest = self.buckets.front().map(|(t, _, _)| *t);
        let span = match oldest {
            Some(t) if t > base_start => recent_start.duration_since(t).unwrap_or_default(),
            Some(_) => baseline,
            None => Duration::ZERO,
        };
        let mut out: HashMap<Arc<str>, Window> = HashMap::new();
        for (t, _, bucket) in &self.buckets {
            if *t <= base_start || *t > now {
                continue;
            }
            let in_recent = *t > recent_start;
            for (target, counts) in bucket {
                let w = out.entry(target.clone()).or_default();
                w.baseline_span = span;
                if in_recent {
                    w.recent.merge(counts);
                } else {
                    w.baseline.merge(counts);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn reason_names_round_trip_and_index() {
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            assert_eq!(r.index(), i);
        }
        assert_eq!(Reason::parse("nope"), None);
        assert!(!Reason::Ok.is_failure());
        assert!(Reason::UnknownCa.is_failure());
    }

    #[test]
    fn counter_merges_and_drains() {
        let c = Counter::new(2);
        c.add("a", Reason::Ok, 3, Source::Probe).unwrap();
        c.add("a", Reason::UnknownCa, 2, Source::Report).unwrap();
        c.add("b", Reason::Timeout, 1, Source::Envoy).unwrap();
        assert_eq!(
            c.add("c", Reason::Ok, 1, Source::Probe),
            Err(Refused::TooManyTargets)
        );
        assert_eq!(
            c.add("", Reason::Ok, 1, Source::Probe),
            Err(Refused::BadTarget)
        );
        let long = "x".repeat(MAX_TARGET_LEN + 1);
        assert_eq!(
            c.add(&long, Reason::Ok, 1, Source::Probe),
            Err(Refused::BadTarget)
        );
        let d = c.drain();
        let a = d.get("a").unwrap();
        assert_eq!(a.get(Reason::Ok), 3);
        assert_eq!(a.get(Reason::UnknownCa), 2);
        assert_eq!(a.total(), 5);
        assert_eq!(a.source_names(), vec!["probe", "report"]);
        assert_eq!(d.len(), 2);
        assert!(c.drain().is_empty(), "drain empties the counter");
        // After a drain there is room again.
        c.add("c", Reason::Ok, 1, Source::Probe).unwrap();
    }

    #[test]
    fn indexed_add_names_the_refused_items() {
        let c = Counter::new(1);
        let mut one = Counts::default();
        one.add(Reason::Ok, 1, Source::Report);
        let refused = c.add_counts_indexed([("a", one), ("", one), ("b", one), ("a", one)]);
        assert_eq!(
            refused,
            vec![(1, Refused::BadTarget), (2, Refused::TooManyTargets)]
        );
        assert_eq!(c.drain().get("a").map(|a| a.get(Reason::Ok)), Some(2));
    }

    #[test]
    fn counts_saturate() {
        let mut a = Counts::default();
        a.add(Reason::Ok, u64::MAX, Source::Report);
        a.add(Reason::Ok, 5, Source::Report);
        assert_eq!(a.get(Reason::Ok), u64::MAX);
        a.add(Reason::Timeout, 1, Source::Report);
        assert_eq!(a.total(), u64::MAX);
    }

    #[test]
    fn history_splits_recent_and_baseline_and_prunes() {
        let c = Counter::default();
        let mut h = History::new(Duration::from_secs(100));
        for s in 1..=100u64 {
            c.add("a", Reason::Ok, 1, Source::Probe).unwrap();
            if s > 90 {
                c.add("a", Reason::UnknownCa, 2, Source::Probe).unwrap();
            }
            h.drain_from(&c, t(s));
        }
        let w = h.windows(t(100), Duration::from_secs(10), Duration::from_secs(60));
        let a = w.get("a").unwrap();
        assert_eq!(a.recent.get(Reason::Ok), 10);
        assert_eq!(a.recent.get(Reason::UnknownCa), 20);
        assert_eq!(a.baseline.get(Reason::Ok), 60);
        assert_eq!(a.baseline.get(Reason::UnknownCa), 0);
        assert_eq!(a.baseline_span, Duration::from_secs(60));
        // Pruned to `keep`.
        h.drain_from(&c, t(250));
        assert!(h.is_empty(), "an empty drain adds nothing, old buckets go");
    }

    #[test]
    fn history_is_bounded_by_granularity_and_names() {
        let mut h =
            History::new(Duration::from_secs(600)).with_granularity(Duration::from_secs(10));
        h.max_targets = 3;
        let c = Counter::default();
        for s in 0..100u64 {
            for name in ["a", "b", "c", "d"] {
                c.add(name, Reason::Ok, 1, Source::Report).unwrap();
            }
            h.drain_from(&c, t(1000 + s));
        }
        assert_eq!(h.len(), 10, "one bucket per 10 s");
        assert_eq!(h.targets(), 3);
        assert_eq!(h.dropped(), 100, "the fourth name is dropped");
        let w = h.windows(t(1099), Duration::from_secs(30), Duration::from_secs(600));
        let total: u64 = w
            .values()
            .map(|w| w.recent.total() + w.baseline.total())
            .sum();
        assert_eq!(total, 300);
        drop(w);
        // Everything ages out; the names go with it and room comes back.
        h.drain_from(&c, t(5000));
        assert!(h.is_empty());
        assert_eq!(h.targets(), 0);
    }

    #[test]
    fn baseline_span_is_short_right_after_start() {
        let mut h = History::new(Duration::from_secs(700));
        let mut b = HashMap::new();
        let mut c = Counts::default();
        c.add(Reason::Ok, 1, Source::Probe);
        b.insert(Arc::from("a"), c);
        h.push(t(1000), b.clone());
        h.push(t(1030), b);
        let w = h.windows(t(1030), Duration::from_secs(10), Duration::from_secs(600));
        let a = w.get("a").unwrap();
        assert_eq!(a.baseline_span, Duration::from_secs(20));
        assert_eq!(a.baseline.get(Reason::Ok), 1);
        assert_eq!(a.recent.get(Reason::Ok), 1);
    }
}
