//! Handshake outcomes: the counter that probes, the report API and Envoy
//! scrapes add to, drained each tick into a history stamped with the
//! loop's own `now` (sources never read the clock), from which analysis
//! reads the recent and baseline windows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::handshake::{Counter, Counts, History, Window};
use crate::policy::Thresholds;

/// Counter and history together.
pub(super) struct Handshakes {
    counter: Counter,
    history: History,
    /// What the last [`windows`](Self::windows) drained: the replay frame's
    /// handshake input (a replay feeds it back through a counter, so its
    /// own history and windows follow the replayed policy's thresholds).
    drained: HashMap<Arc<str>, Counts>,
}

impl Handshakes {
    /// Keeps `keep` of history (the burst window plus its baseline).
    pub(super) fn new(counter: Counter, keep: Duration) -> Self {
        Self {
            counter,
            history: History::new(keep),
            drained: HashMap::new(),
        }
    }

    /// Drains what arrived since the last tick, then reads the windows at
    /// `now`.
    pub(super) fn windows(
        &mut self,
        now: SystemTime,
        th: &Thresholds,
    ) -> HashMap<Arc<str>, Window> {
        let bucket = self.counter.drain();
        // Names are `Arc`s: a copy of a tick's few targets, none when quiet.
        self.drained.clone_from(&bucket);
        self.history.push(now, bucket);
        self.history
            .windows(now, th.burst_window, th.burst_baseline)
    }

    /// The outcomes the last [`windows`](Self::windows) drained (what
    /// arrived during the tick before it), for the replay frame recorder.
    pub(super) fn drained(&self) -> &HashMap<Arc<str>, Counts> {
        &self.drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{Reason, Source};
    use crate::policy::Policy;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn outcomes_land_in_the_window_of_the_tick_that_drains_them() {
        let th = Policy::builtin().unwrap().thresholds;
        let counter = Counter::default();
        let mut h = Handshakes::new(counter.clone(), th.burst_window + th.burst_baseline);
        counter
            .add("web", Reason::UnknownCa, 3, Source::Probe)
            .unwrap();
        let w = h.windows(t(0), &th);
        assert_eq!(w["web"].recent.get(Reason::UnknownCa), 3);
        assert_eq!(h.drained()["web"].get(Reason::UnknownCa), 3);
        // Drained: the next tick sees them in history, not twice.
        counter
            .add("web", Reason::UnknownCa, 1, Source::Probe)
            .unwrap();
        let w = h.windows(t(1), &th);
        assert_eq!(w["web"].recent.get(Reason::UnknownCa), 4);
        // The frame recorder sees only what this tick drained.
        assert_eq!(h.drained()["web"].get(Reason::UnknownCa), 1);
        // Past the window and its baseline: gone.
        let later = t(1) + th.burst_window + th.burst_baseline + Duration::from_secs(1);
        assert!(h.windows(later, &th).is_empty());
    }
}
