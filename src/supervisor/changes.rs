//! Change tracking: what is new since the previous tick. Each agent's last
//! view is kept to see SVIDs rotate (a new serial for a known SPIFFE ID),
//! subjects appear, trust bundles change and CA keys activate; those
//! instants explain handshake failures that follow them.
//!
//! Runs over every agent and SVID on every tick, so the steady case costs
//! no allocation and no string comparison per SVID: a view the sensor did
//! not replace (the same `Arc`) is not compared at all, and agents are
//! looked up once.
//!
//! Servers' agent listings are compared too: a renewed agent SVID teaches
//! the servers' agent SVID TTL ([`agent_ttl`]).

mod agent_ttl;

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use tracing::info;

use super::Tick;
use crate::model::{AgentView, Event, LearnedTtls, Observations, ServerView, Subject};
use crate::telemetry::metrics::SVID_TOP_K;
use agent_ttl::AgentTtls;

/// One agent as last seen.
#[derive(Debug)]
struct Known {
    view: Arc<AgentView>,
    /// The last non-empty bundle the agent served.
    bundle: Vec<String>,
    /// The tick that last saw the agent; agents not seen since are kept
    /// (their bundle is still the one to compare with) but not watched.
    seen: u64,
}

/// Instants that explain handshake failures.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct Instants {
    /// An agent's or server's trust bundle last changed.
    pub(super) bundle_change: Option<SystemTime>,
    /// An SVID last rotated.
    pub(super) rotation: Option<SystemTime>,
    /// A rotation last brought an SVID signed by another CA key: a CA
    /// activation, after which peers with a stale bundle start failing.
    pub(super) issuer_change: Option<SystemTime>,
}

/// Previous views, subjects already recorded and the change instants.
#[derive(Debug, Default)]
pub(super) struct Changes {
    agents: Vec<Known>,
    /// Agent name → index in `agents`.
    index: HashMap<String, usize>,
    /// Index in `agents` of each agent, in the previous tick's order: a
    /// sensor that serves the same `Arc` at the same position costs no
    /// look-up at all.
    order: Vec<usize>,
    /// Server bundles (sorted fingerprints) by server name.
    server_bundles: HashMap<String, Vec<String>>,
    subjects: HashSet<Subject>,
    instants: Instants,
    generation: u64,
    /// The servers' agent SVID TTLs, learned from their listings.
    ttls: AgentTtls,
}

impl Changes {
    pub(super) fn instants(&self) -> Instants {
        self.instants
    }

    /// Each server's agent SVID TTL as learned so far.
    pub(super) fn agent_ttls(&self) -> &LearnedTtls {
        self.ttls.learned()
    }

    /// The agent's view as of the last tick.
    pub(super) fn view(&self, agent: &str) -> Option<&AgentView> {
        self.index
            .get(agent)
            .map(|&i| &self.agents[i])
            .filter(|k| k.seen == self.generation)
            .map(|k| &*k.view)
    }

    /// Compares `obs` with the previous tick: records new subjects and SVID
    /// lifecycles (first delivery of a serial, its replacement), notes
    /// rotations, CA-key and bundle changes, and keeps `obs` as the
    /// previous views. Fills the summary's soonest expiries and rotations.
    pub(super) fn observe<'o>(
        &mut self,
        obs: &'o Observations,
        now: SystemTime,
        tick: &mut Tick<'o>,
    ) {
        self.generation += 1;
        let generation = self.generation;
        let mut order = Vec::with_capacity(obs.agents.len());
        for (vi, v) in obs.agents.iter().enumerate() {
            let same = self
                .order
                .get(vi)
                .copied()
                .filter(|&i| Arc::ptr_eq(&self.agents[i].view, v));
            let found = same.or_else(|| self.index.get(v.agent.as_str()).copied());
            match found {
                Some(i) => {
                    order.push(i);
                    let known = &mut self.agents[i];
                    // Not seen at the previous tick: as if new, but its
                    // subject and bundle are known.
                    let prev = (known.seen + 1 >= generation).then_some(&known.view);
                    known.seen = generation;
                    if same.is_some() || prev.is_some_and(|p| Arc::ptr_eq(p, v)) {
                        continue;
                    }
                    if prev.is_none() {
                        subject_seen(&mut self.subjects, Subject::agent(&v.agent), now, tick);
                    }
                    lifecycles(prev, v, now, &mut self.subjects, &mut self.instants, tick);
                    note_bundle(
                        &v.agent,
                        &mut known.bundle,
                        &v.bundle,
                        now,
                        &mut self.instants,
                    );
                    known.view = v.clone();
                }
                None => {
                    subject_seen(&mut self.subjects, Subject::agent(&v.agent), now, tick);
                    lifecycles(None, v, now, &mut self.subjects, &mut self.instants, tick);
                    order.push(self.agents.len());
                    self.index.insert(v.agent.clone(), self.agents.len());
                    self.agents.push(Known {
                        view: v.clone(),
                        bundle: v.bundle.clone(),
                        seen: generation,
                    });
                }
            }
        }
        self.order = order;
        self.note_server_bundles(&obs.servers, now);
        self.ttls.observe(&obs.servers);
        tick.summary.svid_expiries = soonest_expiries(&obs.agents);
    }

    /// Notes a change of any server's bundle. Servers are few; their
    /// authorities come unsorted.
    fn note_server_bundles(&mut self, servers: &[Arc<ServerView>], now: SystemTime) {
        for v in servers.iter().filter(|v| !v.bundle.is_empty()) {
            let mut fps: Vec<String> = v.bundle.iter().map(|a| a.fingerprint.clone()).collect();
            fps.sort();
            match self.server_bundles.get_mut(&v.server) {
                Some(prev) => {
                    let source = format!("server:{}", v.server);
                    note_bundle(&source, prev, &fps, now, &mut self.instants);
                }
                None => {
                    self.server_bundles.insert(v.server.clone(), fps);
                }
            }
        }
    }
}

/// The `SVID_TOP_K` soonest-expiring SVIDs, soonest first, without copying
/// every SPIFFE ID: a max-heap of (notAfter, view index, svid index)
/// bounded to k.
fn soonest_expiries(agents: &[Arc<AgentView>]) -> Vec<(&str, &str, SystemTime)> {
    let mut soonest: BinaryHeap<(SystemTime, usize, usize)> = BinaryHeap::new();
    for (vi, v) in agents.iter().enumerate() {
        for (si, s) in v.svids.iter().enumerate() {
            if s.serial.is_empty() {
                continue;
            }
            if soonest.len() < SVID_TOP_K {
                soonest.push((s.not_after, vi, si));
            } else if soonest.peek().is_some_and(|top| s.not_after < top.0) {
                soonest.pop();
                soonest.push((s.not_after, vi, si));
            }
        }
    }
    let mut soonest = soonest.into_vec();
    soonest.sort();
    soonest
        .into_iter()
        .map(|(not_after, vi, si)| {
            let v = &agents[vi];
            (v.agent.as_str(), v.svids[si].spiffe_id.as_str(), not_after)
        })
        .collect()
}

/// Records a subject the first time it is seen.
fn subject_seen(
    subjects: &mut HashSet<Subject>,
    subject: Subject,
    now: SystemTime,
    tick: &mut Tick<'_>,
) {
    if subjects.insert(subject.clone()) {
        tick.events.push(Event::SubjectSeen { subject, at: now });
    }
}

/// Notes a bundle change against the last non-empty bundle `prev` (not a
/// first sighting).
fn note_bundle(
    source: &str,
    prev: &mut Vec<String>,
    now_bundle: &[String],
    now: SystemTime,
    instants: &mut Instants,
) {
    if now_bundle.is_empty() || prev.as_slice() == now_bundle {
        return;
    }
    if !prev.is_empty() {
        info!(%source, authorities = now_bundle.len(), "Trust bundle changed.");
        instants.bundle_change = Some(now);
    }
    *prev = now_bundle.to_vec();
}

/// SVID lifecycles of one agent against its previous view. Subjects are
/// recorded with their first serial (a new subject always brings a new
/// serial).
fn lifecycles<'o>(
    prev: Option<&Arc<AgentView>>,
    v: &'o AgentView,
    now: SystemTime,
    subjects: &mut HashSet<Subject>,
    instants: &mut Instants,
    tick: &mut Tick<'o>,
) {
    for (si, s) in v.svids.iter().enumerate() {
        if s.serial.is_empty() {
            continue;
        }
        // Same position first: the agent's list order is stable.
        let old = prev.and_then(|p| {
            p.svids
                .get(si)
                .filter(|o| o.spiffe_id == s.spiffe_id)
                .or_else(|| p.svids.iter().find(|o| o.spiffe_id == s.spiffe_id))
        });
        if old.is_some_and(|o| o.serial == s.serial) {
            continue;
        }
        subject_seen(subjects, Subject::svid(&v.agent, &s.spiffe_id), now, tick);
        tick.events.push(Event::SvidSeen {
            agent: v.agent.clone(),
            spiffe_id: s.spiffe_id.clone(),
            serial: s.serial.clone(),
            not_before: s.not_before,
            not_after: s.not_after,
            at: s.first_seen,
        });
        if let Some(o) = old.filter(|o| !o.serial.is_empty()) {
            tick.events.push(Event::SvidReplaced {
                agent: v.agent.clone(),
                spiffe_id: o.spiffe_id.clone(),
                serial: o.serial.clone(),
                at: s.first_seen,
            });
            instants.rotation = Some(now);
            if !o.issuer.is_empty() && !s.issuer.is_empty() && o.issuer != s.issuer {
                info!(agent = %v.agent, spiffe_id = %s.spiffe_id, old = %o.issuer, new = %s.issuer, "SVID signed by a new CA key.");
                instants.issuer_change = Some(now);
            }
            tick.summary.rotations.push(&v.agent);
            info!(agent = %v.agent, spiffe_id = %s.spiffe_id, old = %o.serial, new = %s.serial, "SVID rotated.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServerView, StreamStatus, SvidObservation};
    use std::time::{Duration, UNIX_EPOCH};

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn svid(id: &str, serial: &str, issuer: &str, from: u64) -> SvidObservation {
        SvidObservation {
            spiffe_id: id.into(),
            serial: serial.into(),
            not_before: t(from),
            not_after: t(from + 100),
            invalid: None,
            first_seen: t(from),
            issuer: issuer.into(),
        }
    }

    fn agent(name: &str, svids: Vec<SvidObservation>, bundle: &[&str]) -> Arc<AgentView> {
        Arc::new(AgentView {
            agent: name.into(),
            status: StreamStatus::Up,
            status_since: t(0),
            last_error: None,
            last_message: Some(t(0)),
            svids,
            bundle_authorities: bundle.len(),
            bundle: bundle.iter().map(|s| s.to_string()).collect(),
            rotations: 0,
            updated_at: t(0),
        })
    }

    fn obs(agents: Vec<Arc<AgentView>>) -> Observations {
        Observations {
            agents,
            ..Observations::default()
        }
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                Event::SubjectSeen { .. } => "subject",
                Event::SvidSeen { .. } => "seen",
                Event::SvidReplaced { .. } => "replaced",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn first_sighting_records_subjects_and_serials() {
        let mut c = Changes::default();
        let o = obs(vec![agent(
            "a",
            vec![svid("spiffe://td/w", "01", "k1", 0)],
            &[],
        )]);
        let mut tick = Tick::default();
        c.observe(&o, t(1), &mut tick);
        assert_eq!(kinds(&tick.events), ["subject", "subject", "seen"]);
        assert_eq!(c.instants(), Instants::default());
        assert_eq!(tick.summary.svid_expiries, [("a", "spiffe://td/w", t(100))]);
    }

    #[test]
    fn the_same_view_again_is_not_news() {
        let mut c = Changes::default();
        let o = obs(vec![agent(
            "a",
            vec![svid("spiffe://td/w", "01", "k1", 0)],
            &[],
        )]);
        c.observe(&o, t(1), &mut Tick::default());
        let mut tick = Tick::default();
        c.observe(&o, t(2), &mut tick);
        // An equal view in a new allocation is not news either.
        let copy = obs(vec![Arc::new((*o.agents[0]).clone())]);
        c.observe(&copy, t(3), &mut tick);
        assert!(tick.events.is_empty());
        assert_eq!(tick.summary.svid_expiries.len(), 1);
    }

    #[test]
    fn rotation_and_new_ca_key_are_noted() {
        let mut c = Changes::default();
        let id = "spiffe://td/w";
        c.observe(
            &obs(vec![agent("a", vec![svid(id, "01", "k1", 0)], &[])]),
            t(1),
            &mut Tick::default(),
        );
        let o = obs(vec![agent("a", vec![svid(id, "02", "k1", 50)], &[])]);
        let mut tick = Tick::default();
        c.observe(&o, t(51), &mut tick);
        assert_eq!(kinds(&tick.events), ["seen", "replaced"]);
        assert_eq!(tick.summary.rotations, ["a"]);
        assert_eq!(c.instants().rotation, Some(t(51)));
        assert_eq!(c.instants().issuer_change, None);
        c.observe(
            &obs(vec![agent("a", vec![svid(id, "03", "k2", 60)], &[])]),
            t(61),
            &mut Tick::default(),
        );
        assert_eq!(c.instants().issuer_change, Some(t(61)));
    }

    #[test]
    fn bundle_changes_count_after_the_first_sighting_only() {
        let mut c = Changes::default();
        c.observe(
            &obs(vec![agent("a", vec![], &[])]),
            t(0),
            &mut Tick::default(),
        );
        c.observe(
            &obs(vec![agent("a", vec![], &["f1"])]),
            t(1),
            &mut Tick::default(),
        );
        assert_eq!(c.instants().bundle_change, None);
        // An empty bundle (not served) is not a change; back to f1 neither.
        c.observe(
            &obs(vec![agent("a", vec![], &[])]),
            t(2),
            &mut Tick::default(),
        );
        c.observe(
            &obs(vec![agent("a", vec![], &["f1"])]),
            t(3),
            &mut Tick::default(),
        );
        assert_eq!(c.instants().bundle_change, None);
        c.observe(
            &obs(vec![agent("a", vec![], &["f1", "f2"])]),
            t(4),
            &mut Tick::default(),
        );
        assert_eq!(c.instants().bundle_change, Some(t(4)));

        let server = |fps: &[&str]| {
            let mut o = Observations::default();
            o.servers
                .push(Arc::new(ServerView::test("s", true, fps, t(0))));
            o
        };
        c.observe(&server(&["b", "a"]), t(5), &mut Tick::default());
        c.observe(&server(&["a", "b"]), t(6), &mut Tick::default());
        assert_eq!(c.instants().bundle_change, Some(t(4)));
        c.observe(&server(&["a", "c"]), t(7), &mut Tick::default());
        assert_eq!(c.instants().bundle_change, Some(t(7)));
    }

    #[test]
    fn agents_that_disappear_are_forgotten_until_seen_again() {
        let mut c = Changes::default();
        c.observe(
            &obs(vec![agent("a", vec![], &[]), agent("b", vec![], &[])]),
            t(0),
            &mut Tick::default(),
        );
        c.observe(
            &obs(vec![agent("b", vec![], &[])]),
            t(1),
            &mut Tick::default(),
        );
        assert!(c.view("a").is_none());
        // Back again: a known subject is not recorded twice.
        let o = obs(vec![agent("a", vec![], &[])]);
        let mut tick = Tick::default();
        c.observe(&o, t(2), &mut tick);
        assert!(tick.events.is_empty());
    }
}
