//! The demotion ledger: the last verdicts of each (symptom, actuator) step
//! and which steps are demoted.
//!
//! A step whose share of verified runs over its last `guards.demotion.window`
//! verdicts falls below `min_success_ratio` is demoted once (an
//! [`Event::Demoted`] to record); `plan` skips it for that symptom and the
//! ladder moves on, until an operator resets it, which starts its window
//! afresh. Only verdicts count (verified or failed); a run with no verdict
//! (dry run, skipped, interrupted) is never recorded here. Rebuilt from the
//! store at start ([`Demotions::resume`]), so a restart neither forgets a
//! demotion nor the runs leading to one. Pure: time comes in as `now`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::SystemTime;

use crate::knowledge::{DemotionRecord, VERDICT_WINDOW, VerdictRecord};
use crate::model::{Event, SymptomKind};
use crate::policy::Policy;

/// Verdict windows and demoted steps.
#[derive(Debug, Default)]
pub(super) struct Demotions {
    /// The last verdicts (true: verified) per (symptom, actuator), oldest
    /// first; at most [`VERDICT_WINDOW`], so a policy reload that widens the
    /// window judges runs already seen.
    windows: HashMap<(SymptomKind, String), VecDeque<bool>>,
    /// Demoted and not reset.
    demoted: BTreeSet<(SymptomKind, String)>,
}

impl Demotions {
    /// The ledger as the store remembers it: the verdicts since each step's
    /// last reset (oldest first) and the demotions not reset. Records naming
    /// a symptom this build does not know are ignored.
    pub(super) fn resume(verdicts: &[VerdictRecord], demoted: &[DemotionRecord]) -> Self {
        let mut d = Self::default();
        let mut ordered: Vec<&VerdictRecord> = verdicts.iter().collect();
        ordered.sort_by_key(|v| v.at_ms);
        for v in ordered {
            if let Some(symptom) = SymptomKind::parse(&v.symptom) {
                d.push(symptom, &v.actuator, v.verified);
            }
        }
        for r in demoted {
            if let Some(symptom) = SymptomKind::parse(&r.symptom) {
                d.demoted.insert((symptom, r.actuator.clone()));
            }
        }
        d
    }

    /// Books one verdict of `actuator` run for `symptom`. Returns
    /// [`Event::Demoted`] when this verdict demotes the step: demotion is
    /// enabled, the step is not demoted yet, it has at least `window`
    /// verdicts and fewer than `min_success_ratio` of the last `window`
    /// verified.
    pub(super) fn record(
        &mut self,
        symptom: SymptomKind,
        actuator: &str,
        verified: bool,
        now: SystemTime,
        policy: &Policy,
    ) -> Option<Event> {
        self.push(symptom, actuator, verified);
        let guard = &policy.guards.demotion;
        let key = (symptom, actuator.to_string());
        if !guard.enabled || self.demoted.contains(&key) {
            return None;
        }
        let runs = self.windows.get(&key)?;
        let window = guard.window.clamp(1, VERDICT_WINDOW);
        if runs.len() < window {
            return None;
        }
        let ok = runs.iter().rev().take(window).filter(|v| **v).count();
        if ok as f64 / window as f64 >= guard.min_success_ratio {
            return None;
        }
        self.demoted.insert(key);
        Some(Event::Demoted {
            symptom,
            actuator: actuator.to_string(),
            verified: ok as u32,
            runs: window as u32,
            at: now,
        })
    }

    /// An operator let the step run again: it is no longer demoted and its
    /// window starts afresh (the runs that demoted it do not count again).
    pub(super) fn reset(&mut self, symptom: SymptomKind, actuator: &str) {
        let key = (symptom, actuator.to_string());
        self.demoted.remove(&key);
        self.windows.remove(&key);
    }

    /// Demoted steps, for `PlanControls::demoted`.
    pub(super) fn demoted(&self) -> impl Iterator<Item = (SymptomKind, &str)> {
        self.demoted.iter().map(|(s, a)| (*s, a.as_str()))
    }

    /// Whether the step is demoted.
    pub(super) fn is_demoted(&self, symptom: SymptomKind, actuator: &str) -> bool {
        self.demoted.contains(&(symptom, actuator.to_string()))
    }

    fn push(&mut self, symptom: SymptomKind, actuator: &str, verified: bool) {
        let runs = self
            .windows
            .entry((symptom, actuator.to_string()))
            .or_default();
        if runs.len() == VERDICT_WINDOW {
            runs.pop_front();
        }
        runs.push_back(verified);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::unix_millis;
    use std::time::{Duration, UNIX_EPOCH};

    const RESTART: &str = "restart-agent";
    const STALE: SymptomKind = SymptomKind::AgentSyncStale;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn policy(window: usize, ratio: f64) -> Policy {
        let mut p = Policy::builtin().unwrap();
        p.guards.demotion.window = window;
        p.guards.demotion.min_success_ratio = ratio;
        p
    }

    /// The index of a verdict and the demotion it caused.
    type Demoted = (usize, Event);

    /// Books `verdicts` at t(0), t(1), …; returns every demotion.
    fn run(d: &mut Demotions, verdicts: &[bool], p: &Policy) -> Vec<Demoted> {
        verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i, d.record(STALE, RESTART, *v, t(i as u64), p)?)))
            .collect()
    }

    fn demoted_event(verified: u32, runs: u32, at: u64) -> Event {
        Event::Demoted {
            symptom: STALE,
            actuator: RESTART.into(),
            verified,
            runs,
            at: t(at),
        }
    }

    #[test]
    fn demoted_once_when_the_full_window_verifies_too_rarely() {
        // Window 5, 0.4: 1 of 5 (0.2) demotes; 2 of 5 (0.4) does not.
        let p = policy(5, 0.4);
        let cases: [(&str, &[bool], Vec<Demoted>); 5] = [
            ("not full yet", &[false; 4], vec![]),
            (
                "full: 0 of 5",
                &[false; 5],
                vec![(4, demoted_event(0, 5, 4))],
            ),
            (
                "2 of 5 is exactly the threshold",
                &[true, false, true, false, false],
                vec![],
            ),
            (
                "the window slides: the old successes drop out",
                &[true, true, false, false, false, false],
                vec![(5, demoted_event(1, 5, 5))],
            ),
            (
                "once: more failures do not demote again",
                &[false; 8],
                vec![(4, demoted_event(0, 5, 4))],
            ),
        ];
        for (name, verdicts, want) in cases {
            let mut d = Demotions::default();
            assert_eq!(run(&mut d, verdicts, &p), want, "{name}");
            assert_eq!(d.is_demoted(STALE, RESTART), !want.is_empty(), "{name}");
        }
    }

    #[test]
    fn steps_are_judged_apart() {
        let p = policy(2, 0.5);
        let mut d = Demotions::default();
        assert!(d.record(STALE, RESTART, false, t(0), &p).is_none());
        assert!(d.record(STALE, "failover", false, t(1), &p).is_none());
        assert!(
            d.record(SymptomKind::AgentUnreachable, RESTART, false, t(2), &p)
                .is_none()
        );
        assert_eq!(
            d.record(STALE, RESTART, false, t(3), &p),
            Some(demoted_event(0, 2, 3))
        );
        assert_eq!(d.demoted().collect::<Vec<_>>(), [(STALE, RESTART)]);
    }

    #[test]
    fn reset_restarts_the_window() {
        let p = policy(3, 0.5);
        let mut d = Demotions::default();
        assert_eq!(run(&mut d, &[false; 3], &p).len(), 1);
        d.reset(STALE, RESTART);
        assert!(!d.is_demoted(STALE, RESTART));
        assert_eq!(d.demoted().count(), 0);
        // The failures before the reset do not count: two more are not a
        // full window; the third is, and demotes again.
        assert!(d.record(STALE, RESTART, false, t(10), &p).is_none());
        assert!(d.record(STALE, RESTART, false, t(11), &p).is_none());
        assert_eq!(
            d.record(STALE, RESTART, false, t(12), &p),
            Some(demoted_event(0, 3, 12))
        );
    }

    #[test]
    fn disabled_demotes_nothing_but_keeps_counting() {
        let mut p = policy(3, 0.5);
        p.guards.demotion.enabled = false;
        let mut d = Demotions::default();
        assert!(run(&mut d, &[false; 3], &p).is_empty());
        p.guards.demotion.enabled = true;
        assert_eq!(
            d.record(STALE, RESTART, false, t(9), &p),
            Some(demoted_event(0, 3, 9))
        );
    }

    #[test]
    fn a_wider_window_after_a_reload_judges_runs_already_seen() {
        let mut d = Demotions::default();
        assert!(run(&mut d, &[true, true, false, false], &policy(5, 0.5)).is_empty());
        // Window 5 now: t, t, f, f, f → 2 of 5 < 0.5.
        assert_eq!(
            d.record(STALE, RESTART, false, t(4), &policy(5, 0.5)),
            Some(demoted_event(2, 5, 4))
        );
    }

    #[test]
    fn resume_from_the_store() {
        let verdict = |symptom: &str, verified: bool, at: u64| VerdictRecord {
            symptom: symptom.into(),
            actuator: RESTART.into(),
            verified,
            at_ms: unix_millis(t(at)),
        };
        // Out of order and one unknown symptom: sorted, the unknown ignored.
        let verdicts = [
            verdict("agent_sync_stale", false, 2),
            verdict("agent_sync_stale", true, 1),
            verdict("no_such_symptom", false, 3),
            verdict("agent_sync_stale", false, 4),
        ];
        let demoted = [DemotionRecord {
            symptom: "agent_unreachable".into(),
            actuator: "refetch".into(),
            verified: 0,
            runs: 5,
            demoted_at_ms: unix_millis(t(0)),
        }];
        let mut d = Demotions::resume(&verdicts, &demoted);
        assert_eq!(
            d.demoted().collect::<Vec<_>>(),
            [(SymptomKind::AgentUnreachable, "refetch")]
        );
        // Window 4: t, f, f + this f → 1 of 4 < 0.5.
        assert_eq!(
            d.record(STALE, RESTART, false, t(5), &policy(4, 0.5)),
            Some(demoted_event(1, 4, 5))
        );
        // A step demoted before the restart is not demoted again.
        assert!(
            d.record(
                SymptomKind::AgentUnreachable,
                "refetch",
                false,
                t(6),
                &policy(1, 0.5)
            )
            .is_none()
        );
    }

    #[test]
    fn the_window_keeps_at_most_verdict_window_runs() {
        let mut d = Demotions::default();
        let p = policy(VERDICT_WINDOW, 0.01);
        for i in 0..VERDICT_WINDOW as u64 + 10 {
            assert!(d.record(STALE, RESTART, true, t(i), &p).is_none());
        }
        assert_eq!(
            d.windows[&(STALE, RESTART.to_string())].len(),
            VERDICT_WINDOW
        );
    }
}
