//! Open incidents: which symptoms became incidents, when they close, which
//! rung each has reached, and which "held back, because" was already
//! recorded for each.
//!
//! An incident opens when its symptom appears (after the symptom's
//! `open_after`, if the policy sets one: a debounce for symptoms that flap)
//! and closes when the symptom is gone; analysis applies the hysteresis, so
//! here "present" is the whole truth. Holds are recorded once per
//! (incident, actuator, reason): a guard that holds for an hour must not
//! write a row every tick.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use tracing::{Span, field, info, info_span, warn};

use super::Tick;
use crate::clock::saturating_since;
use crate::model::{Event, Incident, Subject, Symptom, SymptomKey, SymptomKind};

/// The loop's open incidents and what was recorded about them.
#[derive(Debug, Default)]
pub(super) struct Incidents {
    /// By kind, then subject: looked up without building a key.
    open: HashMap<SymptomKind, HashMap<Subject, Incident>>,
    /// Debounce: when a symptom with an `open_after` was first seen.
    first_seen: HashMap<SymptomKey, SystemTime>,
    /// The last hold recorded per incident id: (actuator, reason).
    last_hold: HashMap<String, (String, &'static str)>,
    /// Incidents the last reconcile closed because their symptom turned
    /// into a successor on the same subject: (old key, successor key).
    superseded: Vec<(SymptomKey, SymptomKey)>,
    /// Each open incident's `incident` span, by incident id: open as long
    /// as the incident (see [`crate::telemetry::tracing`]).
    spans: HashMap<String, Span>,
}

/// The `incident` span of `inc`: a root, linked to the current (tick)
/// span. `resumed`: taken over from the store after a restart (the span
/// of the process that opened it ended with that process).
fn incident_span(inc: &Incident, resumed: bool) -> Span {
    let span = info_span!(
        parent: None,
        "incident",
        incident.id = %inc.id,
        symptom = %inc.kind,
        subject = %inc.subject,
        severity = inc.severity.as_str(),
        predicted_outage = field::Empty,
        resumed,
        needs_operator = field::Empty,
        resolution = field::Empty,
    );
    if let Some(at) = inc.predicted_outage {
        span.record(
            "predicted_outage",
            field::display(humantime::format_rfc3339_seconds(at)),
        );
    }
    span.follows_from(Span::current());
    span
}

impl Incidents {
    /// Resumes the incidents the store still has open.
    pub(super) fn resume(open: Vec<Incident>) -> Self {
        let mut s = Self::default();
        for i in open {
            s.spans.insert(i.id.clone(), incident_span(&i, true));
            s.insert(i);
        }
        s
    }

    /// The `incident` span of an open incident (for its actions' spans);
    /// a disabled span when there is none.
    pub(super) fn span(&self, id: &str) -> Span {
        self.spans.get(id).cloned().unwrap_or_else(Span::none)
    }

    fn insert(&mut self, inc: Incident) {
        self.open
            .entry(inc.kind)
            .or_default()
            .insert(inc.subject.clone(), inc);
    }

    fn get(&self, kind: SymptomKind, subject: &Subject) -> Option<&Incident> {
        self.open.get(&kind)?.get(subject)
    }

    pub(super) fn is_open(&self, key: &SymptomKey) -> bool {
        self.get(key.kind, &key.subject).is_some()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Incident> {
        self.open.values().flat_map(HashMap::values)
    }

    pub(super) fn by_id(&self, id: &str) -> Option<&Incident> {
        self.iter().find(|i| i.id == id)
    }

    /// Closes the incidents whose symptom is gone, then opens one for each
    /// new symptom that has persisted its `open_after` and that `defer` does
    /// not hold back (an action in flight explains it). `new_id` names each
    /// opened incident.
    pub(super) fn reconcile(
        &mut self,
        symptoms: &[Symptom],
        defer: &dyn Fn(&Symptom) -> bool,
        open_after: &BTreeMap<String, Duration>,
        now: SystemTime,
        new_id: &mut dyn FnMut() -> String,
        tick: &mut Tick<'_>,
    ) {
        let present: HashSet<(SymptomKind, &Subject)> =
            symptoms.iter().map(|s| (s.kind, &s.subject)).collect();
        self.first_seen
            .retain(|k, _| present.contains(&(k.kind, &k.subject)));
        let last_hold = &mut self.last_hold;
        let spans = &mut self.spans;
        let superseded = &mut self.superseded;
        superseded.clear();
        for (kind, by_subject) in &mut self.open {
            by_subject.retain(|subject, inc| {
                if present.contains(&(*kind, subject)) {
                    return true;
                }
                last_hold.remove(&inc.id);
                // Ends when dropped, at the end of this closure.
                let span = spans.remove(&inc.id).unwrap_or_else(Span::none);
                let _in = span.enter();
                // Worse, or better diagnosed, is not healed: not counted as
                // a recovery, and whatever ran for it is judged by what it
                // turned into.
                let next = kind
                    .successors()
                    .iter()
                    .find(|k| present.contains(&(**k, subject)));
                let resolution = if let Some(next) = next {
                    info!(incident = %inc.id, symptom = %inc.kind, subject = %inc.subject, into = %next, "Incident superseded.");
                    let successor = SymptomKey {
                        kind: *next,
                        subject: subject.clone(),
                    };
                    superseded.push((inc.key(), successor));
                    span.record("resolution", "superseded");
                    "superseded"
                } else {
                    let took = saturating_since(now, inc.opened_at);
                    info!(incident = %inc.id, symptom = %inc.kind, subject = %inc.subject, after_ms = took.as_millis() as u64, "Incident closed.");
                    tick.summary.closed.push((inc.kind.as_str(), took.as_secs_f64()));
                    span.record("resolution", "cleared");
                    "cleared"
                };
                tick.events.push(Event::IncidentClosed {
                    id: inc.id.clone(),
                    at: now,
                    resolution: resolution.into(),
                });
                tick.report.closed.push(inc.id.clone());
                false
            });
        }
        for s in symptoms {
            if self.get(s.kind, &s.subject).is_some() || defer(s) {
                continue;
            }
            if let Some(wait) = open_after.get(s.kind.as_str()) {
                let since = *self.first_seen.entry(s.key()).or_insert(now);
                if saturating_since(now, since) < *wait {
                    continue;
                }
            }
            let inc = Incident {
                id: new_id(),
                kind: s.kind,
                subject: s.subject.clone(),
                severity: s.severity,
                opened_at: now,
                predicted_outage: s.predicted_outage,
                evidence: s.evidence.clone(),
                next_rung: 0,
                needs_operator: None,
            };
            let span = incident_span(&inc, false);
            span.in_scope(|| {
                warn!(incident = %inc.id, symptom = %s.kind, subject = %s.subject, severity = s.severity.as_str(), blind = s.blind, "Incident opened.");
            });
            self.spans.insert(inc.id.clone(), span);
            tick.summary.opened.push(s.kind.as_str());
            tick.events.push(Event::IncidentOpened {
                incident: inc.clone(),
            });
            tick.report.opened.push(inc.id.clone());
            self.insert(inc);
        }
    }

    /// What the last reconcile superseded: (old key, successor key).
    pub(super) fn superseded(&self) -> &[(SymptomKey, SymptomKey)] {
        &self.superseded
    }

    /// Records "held back, because" once per (incident, actuator, reason).
    pub(super) fn hold(
        &mut self,
        incident_id: &str,
        actuator: &str,
        target: &str,
        reason: &'static str,
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) {
        if self
            .last_hold
            .get(incident_id)
            .is_some_and(|(a, r)| a == actuator && *r == reason)
        {
            return;
        }
        self.last_hold
            .insert(incident_id.to_string(), (actuator.to_string(), reason));
        tick.summary.holds.push(reason);
        info!(incident = %incident_id, %actuator, target_name = %target, reason, "Holding back.");
        tick.events.push(Event::Held {
            incident_id: incident_id.to_string(),
            actuator: actuator.to_string(),
            target: target.to_string(),
            reason: reason.to_string(),
            at: now,
        });
    }

    /// Moves the incident's ladder to `next_rung` (recorded).
    pub(super) fn escalate(&mut self, key: &SymptomKey, next_rung: usize, tick: &mut Tick<'_>) {
        if let Some(inc) = self
            .open
            .get_mut(&key.kind)
            .and_then(|m| m.get_mut(&key.subject))
        {
            inc.next_rung = next_rung;
            tick.events.push(Event::IncidentEscalated {
                id: inc.id.clone(),
                next_rung,
            });
        }
    }

    /// Sets the ladder of the open incident `id` back to `rung` (recorded):
    /// a step held at execute time is tried again, not passed over.
    pub(super) fn rearm(&mut self, id: &str, rung: usize, tick: &mut Tick<'_>) {
        if let Some(inc) = self
            .open
            .values_mut()
            .flat_map(HashMap::values_mut)
            .find(|i| i.id == id)
            && inc.next_rung != rung
        {
            inc.next_rung = rung;
            tick.events.push(Event::IncidentEscalated {
                id: inc.id.clone(),
                next_rung: rung,
            });
        }
    }

    /// Nothing left on the incident's ladder can help: marks it (recorded
    /// once, with `reason`) and holds it as `needs_operator`.
    pub(super) fn needs_operator(
        &mut self,
        incident_id: &str,
        target: &str,
        reason: &str,
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) {
        if let Some(inc) = self
            .open
            .values_mut()
            .flat_map(HashMap::values_mut)
            .find(|i| i.id == incident_id)
            && inc.needs_operator.is_none()
        {
            let span = self
                .spans
                .get(incident_id)
                .cloned()
                .unwrap_or_else(Span::none);
            span.record("needs_operator", reason);
            span.in_scope(|| {
                warn!(incident = %incident_id, symptom = %inc.kind, target_name = %target, %reason, "Incident needs an operator.");
            });
            inc.needs_operator = Some(reason.to_string());
            tick.events.push(Event::IncidentNeedsOperator {
                id: incident_id.to_string(),
                reason: reason.to_string(),
                at: now,
            });
        }
        self.hold(incident_id, "", target, "needs_operator", now, tick);
    }

    /// An operator reset a demoted step of `kind`: its open incidents that
    /// had nothing left to try are planned again (in memory; after a
    /// restart such an incident asks for an operator again until it
    /// clears).
    pub(super) fn reconsider(&mut self, kind: SymptomKind) {
        if let Some(by_subject) = self.open.get_mut(&kind) {
            for inc in by_subject.values_mut() {
                if inc.needs_operator.take().is_some() {
                    self.last_hold.remove(&inc.id);
                }
            }
        }
    }

    /// The targets (agent, peer or file names) of open incidents that
    /// something can be done about (`acts`: the kind has a ladder): a
    /// long-lived report such as a stale bootstrap bundle keeps no
    /// futility alive.
    pub(super) fn acting_targets(&self, acts: impl Fn(SymptomKind) -> bool) -> HashSet<&str> {
        self.iter()
            .filter(|i| i.subject.is_actionable() && acts(i.kind))
            .map(|i| i.subject.agent_name())
            .collect()
    }

    /// Open incidents waiting for an operator, per symptom kind.
    pub(super) fn needing_operator_by_kind(&self) -> BTreeMap<&'static str, i64> {
        let mut out = BTreeMap::new();
        for i in self.iter().filter(|i| i.needs_operator.is_some()) {
            *out.entry(i.kind.as_str()).or_default() += 1;
        }
        out
    }

    /// Open incidents whose latest decision was a hold, by its reason (an
    /// action started since clears it, see [`acted`](Self::acted)).
    pub(super) fn held_by_reason(&self) -> BTreeMap<&'static str, i64> {
        let open: HashSet<&str> = self.iter().map(|i| i.id.as_str()).collect();
        let mut out = BTreeMap::new();
        for (id, (_, reason)) in &self.last_hold {
            if open.contains(id.as_str()) {
                *out.entry(*reason).or_default() += 1;
            }
        }
        out
    }

    /// An action started for the incident: the next hold is news again.
    pub(super) fn acted(&mut self, incident_id: &str) {
        self.last_hold.remove(incident_id);
    }

    /// Agents with an open agent-level incident.
    pub(super) fn agents_at_risk(&self) -> HashSet<&str> {
        self.iter()
            .filter(|i| i.subject.is_agent_level())
            .map(|i| i.subject.agent_name())
            .collect()
    }

    /// The earliest predicted outage over open incidents.
    pub(super) fn earliest_outage(&self) -> Option<SystemTime> {
        self.iter().filter_map(|i| i.predicted_outage).min()
    }

    /// Open incidents per symptom kind.
    pub(super) fn count_by_kind(&self) -> BTreeMap<&'static str, i64> {
        self.open
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(k, m)| (k.as_str(), m.len() as i64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Severity, SymptomKind};
    use serde_json::json;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn symptom(kind: SymptomKind, agent: &str) -> Symptom {
        Symptom {
            kind,
            subject: Subject::agent(agent),
            severity: Severity::Warning,
            predicted_outage: Some(t(100)),
            evidence: json!({}),
            blind: false,
        }
    }

    /// Ids `i1`, `i2`, … in order.
    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("i{n}")
        }
    }

    fn debounce() -> BTreeMap<String, Duration> {
        BTreeMap::from([("bundle_divergence".to_string(), Duration::from_secs(30))])
    }

    #[test]
    fn opens_once_and_closes_when_the_symptom_is_gone() {
        let mut inc = Incidents::default();
        let mut id = ids();
        let s = [symptom(SymptomKind::AgentUnreachable, "a")];
        let mut tick = Tick::default();
        inc.reconcile(&s, &|_| false, &debounce(), t(0), &mut id, &mut tick);
        inc.reconcile(&s, &|_| false, &debounce(), t(1), &mut id, &mut tick);
        assert_eq!(tick.report.opened, ["i1"]);
        assert_eq!(tick.summary.opened, ["agent_unreachable"]);
        assert!(inc.is_open(&s[0].key()));

        let mut tick = Tick::default();
        inc.reconcile(&[], &|_| false, &debounce(), t(31), &mut id, &mut tick);
        assert_eq!(tick.report.closed, ["i1"]);
        assert_eq!(tick.summary.closed, [("agent_unreachable", 31.0)]);
        assert!(matches!(
            &tick.events[..],
            [Event::IncidentClosed { id, resolution, .. }] if id == "i1" && resolution == "cleared"
        ));
        assert_eq!(inc.iter().count(), 0);
    }

    #[test]
    fn a_symptom_that_turns_into_its_successor_is_superseded_not_cleared() {
        let mut inc = Incidents::default();
        let mut id = ids();
        let on_svid = |kind| Symptom {
            subject: Subject::svid("a", "spiffe://td/w"),
            ..symptom(kind, "a")
        };
        let mut tick = Tick::default();
        let expiring = [on_svid(SymptomKind::SvidExpiring)];
        inc.reconcile(&expiring, &|_| false, &debounce(), t(0), &mut id, &mut tick);
        let expired = [on_svid(SymptomKind::SvidExpired)];
        let mut tick = Tick::default();
        inc.reconcile(&expired, &|_| false, &debounce(), t(10), &mut id, &mut tick);
        assert_eq!(tick.report.closed, ["i1"]);
        assert_eq!(tick.report.opened, ["i2"]);
        assert!(tick.summary.closed.is_empty(), "not a recovery");
        assert!(matches!(
            &tick.events[0],
            Event::IncidentClosed { id, resolution, .. } if id == "i1" && resolution == "superseded"
        ));
        assert_eq!(
            inc.superseded(),
            [(expiring[0].key(), expired[0].key())].as_slice()
        );
        // The next reconcile starts afresh.
        inc.reconcile(
            &expired,
            &|_| false,
            &debounce(),
            t(11),
            &mut id,
            &mut Tick::default(),
        );
        assert!(inc.superseded().is_empty());
    }

    #[test]
    fn debounce_needs_the_symptom_to_persist() {
        let mut inc = Incidents::default();
        let mut id = ids();
        let s = [symptom(SymptomKind::BundleDivergence, "a")];
        let mut tick = Tick::default();
        inc.reconcile(&s, &|_| false, &debounce(), t(0), &mut id, &mut tick);
        inc.reconcile(&s, &|_| false, &debounce(), t(29), &mut id, &mut tick);
        assert!(tick.report.opened.is_empty());
        // Gone for one tick: the wait starts over.
        inc.reconcile(&[], &|_| false, &debounce(), t(30), &mut id, &mut tick);
        inc.reconcile(&s, &|_| false, &debounce(), t(31), &mut id, &mut tick);
        inc.reconcile(&s, &|_| false, &debounce(), t(60), &mut id, &mut tick);
        assert!(tick.report.opened.is_empty());
        inc.reconcile(&s, &|_| false, &debounce(), t(61), &mut id, &mut tick);
        assert_eq!(tick.report.opened, ["i1"]);
    }

    #[test]
    fn deferred_symptoms_do_not_open() {
        let mut inc = Incidents::default();
        let s = [symptom(SymptomKind::AgentUnreachable, "a")];
        let mut tick = Tick::default();
        inc.reconcile(&s, &|_| true, &debounce(), t(0), &mut ids(), &mut tick);
        assert!(tick.report.opened.is_empty());
        assert!(tick.events.is_empty());
    }

    #[test]
    fn a_hold_is_recorded_once_until_something_changes() {
        let mut inc = Incidents::default();
        let mut tick = Tick::default();
        for at in 0..3 {
            inc.hold("i1", "restart", "a", "cooldown", t(at), &mut tick);
        }
        assert_eq!(tick.events.len(), 1);
        // Another reason is news; so is the same one after an action.
        inc.hold("i1", "restart", "a", "budget", t(3), &mut tick);
        inc.acted("i1");
        inc.hold("i1", "restart", "a", "budget", t(4), &mut tick);
        assert_eq!(tick.summary.holds, ["cooldown", "budget", "budget"]);
        assert_eq!(tick.events.len(), 3);
    }

    #[test]
    fn held_counts_open_incidents_by_their_latest_hold() {
        let mut inc = Incidents::default();
        let s = [
            symptom(SymptomKind::AgentUnreachable, "a"),
            symptom(SymptomKind::AgentUnreachable, "b"),
        ];
        let mut tick = Tick::default();
        inc.reconcile(&s, &|_| false, &debounce(), t(0), &mut ids(), &mut tick);
        inc.hold("i1", "restart", "a", "cooldown", t(1), &mut tick);
        inc.hold("i1", "restart", "a", "budget", t(2), &mut tick);
        inc.hold("i2", "restart", "b", "budget", t(2), &mut tick);
        inc.hold("gone", "restart", "c", "cooldown", t(2), &mut tick);
        assert_eq!(inc.held_by_reason(), BTreeMap::from([("budget", 2)]));
        // An action clears it; so does the incident closing.
        inc.acted("i2");
        assert_eq!(inc.held_by_reason(), BTreeMap::from([("budget", 1)]));
        inc.reconcile(&[], &|_| false, &debounce(), t(3), &mut ids(), &mut tick);
        assert!(inc.held_by_reason().is_empty());
    }

    #[test]
    fn escalation_moves_the_ladder_and_is_recorded() {
        let mut inc = Incidents::default();
        let s = [symptom(SymptomKind::AgentUnreachable, "a")];
        let mut tick = Tick::default();
        inc.reconcile(&s, &|_| false, &debounce(), t(0), &mut ids(), &mut tick);
        inc.escalate(&s[0].key(), 2, &mut tick);
        assert_eq!(inc.by_id("i1").map(|i| i.next_rung), Some(2));
        assert!(matches!(
            tick.events.last(),
            Some(Event::IncidentEscalated { id, next_rung: 2 }) if id == "i1"
        ));
    }
}
