//! The agent SVID TTL (`agent_ttl`) of each server, learned from its agent
//! listing.
//!
//! `ListAgents` shows each agent's SVID serial and notAfter but not its
//! notBefore, and the agent Debug API shows notAfter only, so the TTL is
//! never read directly. What can be observed bounds it from below:
//!
//! - An SVID's lifetime left, `notAfter − t`, at any time `t` after it was
//!   issued is at most the TTL. The longest seen on any listed SVID is a
//!   lower bound from the first listing on ([`TtlSource::LowerBound`]).
//! - A renewal seen between two listings (the agent's serial changed) gives
//!   an SVID issued shortly before it was first listed: its lifetime left
//!   then is the TTL less at most the time between the two listings and
//!   the agent's next sync (the server lists the new serial once the agent
//!   uses it). That is [`TtlSource::Learned`], and it replaces the lower
//!   bound: it follows the servers' current `agent_ttl` when that changes,
//!   which the longest ever seen would not.
//!
//! Both are under-estimates (SPIRE backdates notBefore by 10 s for clock
//! skew but sets notAfter to issuance + `agent_ttl`, so nothing observable
//! here exceeds the TTL; a server clock ahead of ours inflates both the TTL
//! and the lifetime left alike). An under-estimate only makes an agent's
//! share of its TTL left look larger, so a healthy agent, which renews with
//! at least 45 % of its SVID's lifetime left, is never judged not renewing;
//! a real non-renewing agent is still found, once its lifetime left falls
//! below `not_renewing_open` of the estimate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::info;

use crate::model::{AgentTtl, LearnedTtls, ServerAgent, ServerView, TtlSource};

/// A renewal counts as learned only when the listing before it is at most
/// this old: the estimate is short of the TTL by up to this much.
pub(super) const PROMPT: Duration = Duration::from_secs(30);

/// A learned TTL is logged again when it moves by more than this share.
const LOG_CHANGE: f64 = 0.05;

/// One server's listing as last seen, and what it taught.
#[derive(Debug)]
struct Server {
    /// The last reachable listing.
    last: Arc<ServerView>,
    /// The TTL as last logged.
    logged: Option<AgentTtl>,
    /// Renewals seen in this server's listing.
    renewals: u64,
}

/// What each server's agent listing taught about its agent SVID TTL.
#[derive(Debug, Default)]
pub(in crate::supervisor) struct AgentTtls {
    servers: HashMap<String, Server>,
    learned: LearnedTtls,
}

impl AgentTtls {
    /// The TTL per server, for `analyze` (the policy may override it).
    pub(in crate::supervisor) fn learned(&self) -> &LearnedTtls {
        &self.learned
    }

    /// Renewals seen in the listings of `server` so far.
    #[cfg(test)]
    pub(in crate::supervisor) fn renewals(&self, server: &str) -> u64 {
        self.servers.get(server).map_or(0, |s| s.renewals)
    }

    /// Learns from each reachable server's new listing. A listing already
    /// seen (the same `Arc`) costs nothing; a new one costs one pass over
    /// its agents, and a look-up by SPIFFE ID only for those not at the
    /// position they held in the previous listing.
    pub(in crate::supervisor) fn observe(&mut self, servers: &[Arc<ServerView>]) {
        for v in servers.iter().filter(|v| v.reachable) {
            let Some(known) = self.servers.get_mut(&v.server) else {
                let ttl = longest_left(v).map(|ttl| AgentTtl {
                    ttl,
                    source: TtlSource::LowerBound,
                });
                let mut s = Server {
                    last: v.clone(),
                    logged: None,
                    renewals: 0,
                };
                if let Some(ttl) = ttl {
                    self.learned.insert(v.server.clone(), ttl);
                    log_change(&v.server, &mut s, ttl);
                }
                self.servers.insert(v.server.clone(), s);
                continue;
            };
            if Arc::ptr_eq(&known.last, v) || v.updated_at <= known.last.updated_at {
                continue;
            }
            let prompt = v.updated_at.duration_since(known.last.updated_at).ok() <= Some(PROMPT)
                && !v.agents_truncated
                && !known.last.agents_truncated;
            let prev = prompt.then_some(&*known.last);
            let current = self.learned.get(&v.server).copied();
            let mut renewed: Option<Duration> = None;
            let mut longest = current
                .filter(|t| t.source == TtlSource::LowerBound)
                .map(|t| t.ttl);
            let mut by_id: Option<HashMap<&str, &ServerAgent>> = None;
            for (i, a) in v.agents.iter().enumerate() {
                let Some(left) = left_at(a, v.updated_at) else {
                    continue;
                };
                longest = longest.max(Some(left));
                let Some(prev) = prev else { continue };
                let old = prev
                    .agents
                    .get(i)
                    .filter(|o| o.spiffe_id == a.spiffe_id)
                    .or_else(|| {
                        by_id
                            .get_or_insert_with(|| {
                                prev.agents
                                    .iter()
                                    .map(|o| (o.spiffe_id.as_str(), o))
                                    .collect()
                            })
                            .get(a.spiffe_id.as_str())
                            .copied()
                    });
                // A new serial is a freshly signed SVID (renewal or
                // re-attestation); it may expire before the old one when
                // the servers' TTL was shortened.
                let renewal = old.is_some_and(|o| !o.serial.is_empty() && o.serial != a.serial);
                if renewal {
                    known.renewals += 1;
                    // Of several renewals in one listing, the freshest.
                    renewed = renewed.max(Some(left));
                }
            }
            let next = match (renewed, current) {
                (Some(ttl), _) => Some(AgentTtl {
                    ttl,
                    source: TtlSource::Learned,
                }),
                // Once learned, the lower bound no longer applies: it may
                // date from a longer TTL the servers no longer issue.
                (None, Some(t)) if t.source == TtlSource::Learned => Some(t),
                (None, _) => longest.map(|ttl| AgentTtl {
                    ttl,
                    source: TtlSource::LowerBound,
                }),
            };
            known.last = v.clone();
            if let Some(ttl) = next
                && Some(ttl) != current
            {
                match self.learned.get_mut(&v.server) {
                    Some(t) => *t = ttl,
                    None => {
                        self.learned.insert(v.server.clone(), ttl);
                    }
                }
                log_change(&v.server, known, ttl);
            }
        }
    }
}

/// Lifetime left at `at` of a listed agent's SVID; `None` when it has none
/// (banned) or it has expired.
fn left_at(a: &ServerAgent, at: SystemTime) -> Option<Duration> {
    if a.banned || a.serial.is_empty() {
        return None;
    }
    a.expires_at
        .duration_since(at)
        .ok()
        .filter(|d| !d.is_zero())
}

/// The longest lifetime left in a listing.
fn longest_left(v: &ServerView) -> Option<Duration> {
    v.agents
        .iter()
        .filter_map(|a| left_at(a, v.updated_at))
        .max()
}

/// Logs a new source, or a value that moved by more than `LOG_CHANGE`.
fn log_change(server: &str, s: &mut Server, ttl: AgentTtl) {
    let moved = s.logged.is_none_or(|l| {
        l.source != ttl.source
            || (l.ttl.as_secs_f64() - ttl.ttl.as_secs_f64()).abs()
                > LOG_CHANGE * l.ttl.as_secs_f64()
    });
    if moved {
        info!(
            server,
            ttl_secs = ttl.ttl.as_secs(),
            source = ttl.source.as_str(),
            renewals = s.renewals,
            "Agent SVID TTL estimated."
        );
        s.logged = Some(ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn agent(name: &str, serial: &str, expires: u64) -> ServerAgent {
        ServerAgent {
            spiffe_id: format!("spiffe://td/spire/agent/join_token/{name}"),
            attestation_type: "join_token".into(),
            serial: serial.into(),
            expires_at: t(expires),
            banned: false,
            can_reattest: false,
        }
    }

    fn listing(server: &str, at: u64, agents: Vec<ServerAgent>) -> Vec<Arc<ServerView>> {
        let mut v = ServerView::test(server, true, &[], t(at));
        v.agents = agents;
        vec![Arc::new(v)]
    }

    fn ttl(l: &AgentTtls, server: &str) -> Option<(u64, TtlSource)> {
        l.learned().get(server).map(|t| (t.ttl.as_secs(), t.source))
    }

    #[test]
    fn first_listing_gives_the_longest_lifetime_left_as_a_lower_bound() {
        let mut l = AgentTtls::default();
        // 10 min TTL: one agent just past its renewal (280 s left), one
        // early in its lifetime (500 s left), one banned.
        let mut banned = agent("c", "", 0);
        banned.banned = true;
        l.observe(&listing(
            "s1",
            1000,
            vec![agent("a", "01", 1280), agent("b", "02", 1500), banned],
        ));
        assert_eq!(ttl(&l, "s1"), Some((500, TtlSource::LowerBound)));
        // Later listings raise it, never lower it.
        l.observe(&listing(
            "s1",
            1100,
            vec![agent("a", "01", 1280), agent("b", "02", 1500)],
        ));
        assert_eq!(ttl(&l, "s1"), Some((500, TtlSource::LowerBound)));
        assert_eq!(ttl(&l, "s2"), None);
    }

    #[test]
    fn a_renewal_between_two_listings_is_learned() {
        let mut l = AgentTtls::default();
        l.observe(&listing(
            "s1",
            1000,
            vec![agent("a", "01", 1280), agent("b", "02", 1500)],
        ));
        // a renewed at 1001 (10 min TTL); listed at 1002.
        l.observe(&listing(
            "s1",
            1002,
            vec![agent("a", "03", 1601), agent("b", "02", 1500)],
        ));
        assert_eq!(ttl(&l, "s1"), Some((599, TtlSource::Learned)));
        assert_eq!(l.renewals("s1"), 1);
        // The agents' order may change: matched by SPIFFE ID.
        l.observe(&listing(
            "s1",
            1004,
            vec![agent("b", "04", 1603), agent("a", "03", 1601)],
        ));
        assert_eq!(ttl(&l, "s1"), Some((599, TtlSource::Learned)));
        assert_eq!(l.renewals("s1"), 2);
        // A longer lifetime left of unknown age no longer counts; the next
        // renewal does, shorter or longer (the servers' TTL changed).
        l.observe(&listing(
            "s1",
            1010,
            vec![agent("b", "04", 1603), agent("a", "03", 1601)],
        ));
        assert_eq!(ttl(&l, "s1"), Some((599, TtlSource::Learned)));
        l.observe(&listing(
            "s1",
            1012,
            vec![agent("b", "05", 1312), agent("a", "03", 1601)],
        ));
        assert_eq!(ttl(&l, "s1"), Some((300, TtlSource::Learned)));
    }

    #[test]
    fn late_or_partial_listings_teach_only_a_lower_bound() {
        let mut l = AgentTtls::default();
        l.observe(&listing("s1", 1000, vec![agent("a", "01", 1280)]));
        // The previous listing is older than PROMPT: the renewal may have
        // happened long before this listing.
        l.observe(&listing("s1", 1200, vec![agent("a", "02", 1700)]));
        assert_eq!(ttl(&l, "s1"), Some((500, TtlSource::LowerBound)));
        assert_eq!(l.renewals("s1"), 0);
        // A truncated listing neither.
        let mut v = (*listing("s1", 1201, vec![agent("a", "03", 1801)])[0]).clone();
        v.agents_truncated = true;
        l.observe(&[Arc::new(v)]);
        assert_eq!(ttl(&l, "s1"), Some((600, TtlSource::LowerBound)));
        assert_eq!(l.renewals("s1"), 0);
        // An unreachable server's (kept) listing is not looked at.
        let mut down = ServerView::test("s1", false, &[], t(1202));
        down.agents = vec![agent("a", "04", 9999)];
        l.observe(&[Arc::new(down)]);
        assert_eq!(ttl(&l, "s1"), Some((600, TtlSource::LowerBound)));
    }

    /// An agent as SPIRE runs it: renews when its SVID's lifetime left
    /// (notBefore backdated 10 s) falls to half ± 10 %, checked every 5 s;
    /// the server lists the new serial once the agent syncs with it, 5 s
    /// later. Stops renewing at `stops`.
    struct Sim {
        name: &'static str,
        ttl: u64,
        serial: u64,
        /// The listed SVID's notAfter, and the pending one with the time it
        /// gets listed.
        expires: u64,
        pending: Option<(u64, u64)>,
        stops: u64,
        seed: u64,
    }

    impl Sim {
        fn new(name: &'static str, ttl: u64, issued: u64, stops: u64) -> Self {
            Self {
                name,
                ttl,
                serial: 1,
                expires: issued + ttl,
                pending: None,
                stops,
                seed: issued,
            }
        }

        fn step(&mut self, now: u64) {
            if let Some((expires, listed)) = self.pending
                && now >= listed
            {
                self.expires = expires;
                self.serial += 1;
                self.pending = None;
            }
            if self.pending.is_some() || now >= self.stops || !now.is_multiple_of(5) {
                return;
            }
            // Jitter from a fixed linear congruential sequence.
            self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let jitter = 0.9 + 0.2 * ((self.seed >> 33) % 1000) as f64 / 1000.0;
            let half = (self.ttl + 10) as f64 / 2.0 * jitter;
            if (self.expires.saturating_sub(now) as f64) <= half {
                self.pending = Some((now + self.ttl, now + 5));
            }
        }

        fn listed(&self) -> ServerAgent {
            agent(self.name, &format!("{:x}", self.serial), self.expires)
        }
    }

    /// Runs `agents` under the built-in policy, polled every `poll` s from
    /// `from` to `until`: the first time each agent is judged not renewing.
    fn simulate(agents: &mut [Sim], poll: u64, from: u64, until: u64) -> Vec<(String, u64)> {
        let th = crate::policy::Policy::builtin().unwrap().thresholds;
        assert_eq!(th.agent_svid_ttl, None, "the built-in policy learns");
        let mut l = AgentTtls::default();
        let mut flagged: Vec<(String, u64)> = Vec::new();
        for now in from..until {
            for a in agents.iter_mut() {
                a.step(now);
            }
            if !(now - from).is_multiple_of(poll) {
                continue;
            }
            let obs = crate::model::Observations {
                servers: listing("s1", now, agents.iter().map(Sim::listed).collect()),
                ..Default::default()
            };
            l.observe(&obs.servers);
            let symptoms =
                crate::analyze::control_plane(&obs, 1, &|_| false, &th, l.learned(), t(now));
            for s in symptoms {
                let id = s.evidence["spiffe_id"].as_str().unwrap_or_default();
                if !flagged.iter().any(|(f, _)| f == id) {
                    flagged.push((id.to_string(), now));
                }
            }
        }
        flagged
    }

    #[test]
    fn a_healthy_fleet_is_never_judged_not_renewing() {
        // From any start phase, over several lifetimes, with 10 min, 1 h and
        // 24 h TTLs.
        for (ttl, poll, span) in [
            (600, 2, 3 * 3600),
            (3600, 2, 5 * 3600),
            (86_400, 10, 4 * 86_400),
        ] {
            // The oldest a healthy agent's SVID can be: 55 % of its TTL
            // (it renews with 45 % of its lifetime left at the earliest).
            for phase in [0, ttl / 7, ttl / 3, ttl / 2, ttl * 55 / 100] {
                let from = 1_000_000;
                let mut fleet = [
                    Sim::new("a", ttl, from - phase, u64::MAX),
                    Sim::new("b", ttl, from - phase / 2, u64::MAX),
                    Sim::new("c", ttl, from - ttl / 2 + 40, u64::MAX),
                ];
                let flagged = simulate(&mut fleet, poll, from, from + span);
                assert!(flagged.is_empty(), "ttl {ttl} phase {phase}: {flagged:?}");
                assert!(fleet.iter().all(|a| a.serial > 3), "ttl {ttl}: renewed");
            }
        }
    }

    #[test]
    fn an_agent_that_stops_renewing_is_still_found_with_a_learned_10_min_ttl() {
        let from = 1_000_000;
        // b stops renewing 20 min after spire-healer started (its last SVID
        // then expires within 10 min).
        let stops = from + 1200;
        let mut fleet = [
            Sim::new("a", 600, from - 100, u64::MAX),
            Sim::new("b", 600, from - 200, stops),
        ];
        let flagged = simulate(&mut fleet, 2, from, from + 3600);
        assert_eq!(flagged.len(), 1, "{flagged:?}");
        let (id, at) = &flagged[0];
        assert!(id.ends_with("/b"), "{id}");
        // Found with less than 40 % of ~600 s left, before it expires.
        let expires = fleet[1].expires;
        assert!(*at < expires, "found at {at}, expires at {expires}");
        assert!(expires - at <= 240, "{} s before expiry", expires - at);
        assert!(expires - at >= 200, "{} s before expiry", expires - at);
    }

    #[test]
    fn servers_learn_apart() {
        let mut l = AgentTtls::default();
        let mut both = listing("s1", 1000, vec![agent("a", "01", 1280)]);
        both.extend(listing("s2", 1000, vec![agent("a", "01", 1280)]));
        l.observe(&both);
        let mut next = listing("s1", 1001, vec![agent("a", "02", 1600)]);
        next.extend(listing("s2", 1001, vec![agent("a", "02", 1600)]));
        l.observe(&next[..1]);
        assert_eq!(ttl(&l, "s1"), Some((599, TtlSource::Learned)));
        assert_eq!(ttl(&l, "s2"), Some((280, TtlSource::LowerBound)));
        l.observe(&next);
        assert_eq!(ttl(&l, "s2"), Some((599, TtlSource::Learned)));
    }
}
