//! Who an agent SPIFFE ID is: the durable mapping from agent SPIFFE IDs to
//! configured `[[agents]]` names. Learned from each agent's Debug API (the
//! leaf of its own SVID) and from the servers' node-alias entries (an
//! agent's `node_alias` entry is parented to its SPIFFE ID); persisted (`AgentIdentified`) and resumed at start, so
//! an agent that stopped answering before spire-healer restarted is still
//! known by name where a server lists it: counted once, acted on by name.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use tracing::info;

use super::Tick;
use crate::model::{AgentIdentity, Event, IdentitySource, Observations};

/// SPIFFE ID → agent name, shared with every tick's observations.
#[derive(Debug, Default)]
pub(super) struct Identities {
    by_id: Arc<HashMap<String, String>>,
}

impl Identities {
    /// The mapping the store remembers. Only configured agents count: a
    /// name removed from the config maps nothing any more.
    pub(super) fn resume(known: Vec<AgentIdentity>, configured: &HashSet<String>) -> Self {
        let by_id = known
            .into_iter()
            .filter(|i| configured.contains(&i.agent))
            .map(|i| (i.spiffe_id, i.agent))
            .collect();
        Self {
            by_id: Arc::new(by_id),
        }
    }

    /// The mapping, for the observations of this tick.
    pub(super) fn shared(&self) -> Arc<HashMap<String, String>> {
        self.by_id.clone()
    }

    /// Learns what the agents' Debug APIs say about themselves, and whose
    /// node-alias entries the servers hold (an alias entry's parent is the
    /// agent's SPIFFE ID).
    pub(super) fn observe(
        &mut self,
        obs: &Observations,
        configured: &HashSet<String>,
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) {
        for d in &obs.agent_debug {
            if let Some(id) = &d.spiffe_id
                && configured.contains(&d.agent)
            {
                self.learn(&d.agent, id, IdentitySource::DebugApi, now, tick);
            }
        }
        // Only a parent a server lists as an attested agent: a join token
        // minted with an alias is the parent of its alias entry before any
        // agent has used it, and an unused token must never reach a log or
        // the store.
        let reachable = || obs.servers.iter().filter(|s| s.reachable);
        let aliased = reachable()
            .flat_map(|s| s.entry_lookups.iter())
            .filter(|l| l.alias && configured.contains(&l.agent));
        for l in aliased {
            for e in l.entries.iter().flatten() {
                let attested =
                    reachable().any(|s| s.agents.iter().any(|a| a.spiffe_id == e.parent_id));
                if attested {
                    self.learn(&l.agent, &e.parent_id, IdentitySource::NodeAlias, now, tick);
                }
            }
        }
    }

    /// Records that `spiffe_id` is `agent` (a new or moved pairing only).
    pub(super) fn learn(
        &mut self,
        agent: &str,
        spiffe_id: &str,
        source: IdentitySource,
        now: SystemTime,
        tick: &mut Tick<'_>,
    ) {
        if self.by_id.get(spiffe_id).is_some_and(|a| a == agent) {
            return;
        }
        info!(%agent, %spiffe_id, source = source.as_str(), "Agent identity learned.");
        Arc::make_mut(&mut self.by_id).insert(spiffe_id.to_string(), agent.to_string());
        tick.events.push(Event::AgentIdentified(AgentIdentity {
            agent: agent.to_string(),
            spiffe_id: spiffe_id.to_string(),
            source,
            at: now,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AgentDebugView;
    use std::time::{Duration, UNIX_EPOCH};

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn debug(agent: &str, id: Option<&str>) -> Arc<AgentDebugView> {
        Arc::new(AgentDebugView {
            agent: agent.into(),
            reachable: id.is_some(),
            last_error: None,
            unanswered_since: None,
            updated_at: t(0),
            last_sync_success: None,
            answered_after: None,
            uptime_secs: 0,
            cached_x509_svids: 0,
            spiffe_id: id.map(str::to_string),
            svid_expires_at: None,
        })
    }

    #[test]
    fn learns_once_remembers_and_ignores_unconfigured_names() {
        let configured: HashSet<String> = ["a".to_string()].into();
        let old = AgentIdentity {
            agent: "a".into(),
            spiffe_id: "spiffe://td/spire/agent/join_token/old".into(),
            source: IdentitySource::DebugApi,
            at: t(0),
        };
        let gone = AgentIdentity {
            agent: "removed".into(),
            spiffe_id: "spiffe://td/spire/agent/join_token/r".into(),
            ..old.clone()
        };
        let mut ids = Identities::resume(vec![old, gone], &configured);
        assert_eq!(
            ids.shared().len(),
            1,
            "a name no longer configured maps nothing"
        );

        let obs = Observations {
            agent_debug: vec![
                debug("a", Some("spiffe://td/spire/agent/join_token/new")),
                debug("b", Some("spiffe://td/spire/agent/join_token/b")),
                debug("a", None),
            ],
            ..Observations::default()
        };
        let mut tick = Tick::default();
        ids.observe(&obs, &configured, t(10), &mut tick);
        ids.observe(&obs, &configured, t(11), &mut tick);
        assert_eq!(tick.events.len(), 1, "recorded once: {:?}", tick.events);
        let map = ids.shared();
        assert_eq!(map["spiffe://td/spire/agent/join_token/old"], "a");
        assert_eq!(map["spiffe://td/spire/agent/join_token/new"], "a");
        assert!(!map.contains_key("spiffe://td/spire/agent/join_token/b"));

        // A node-alias entry parented to a new identity of `a`.
        ids.learn(
            "a",
            "spiffe://td/spire/agent/join_token/minted",
            IdentitySource::NodeAlias,
            t(12),
            &mut tick,
        );
        assert!(matches!(
            &tick.events[1],
            Event::AgentIdentified(AgentIdentity {
                source: IdentitySource::NodeAlias,
                ..
            })
        ));
    }

    #[test]
    fn learns_an_attested_agent_from_its_node_alias_entry() {
        use crate::model::{EntryLookup, EntrySummary, ServerAgent, ServerView};
        let configured: HashSet<String> = ["a".to_string()].into();
        let id = |t: &str| format!("spiffe://td/spire/agent/join_token/{t}");
        let lookup = |agent: &str, parent: &str| EntryLookup {
            agent: agent.into(),
            spiffe_id: "spiffe://td/node/0".into(),
            alias: true,
            entries: Some(vec![EntrySummary {
                id: "e".into(),
                parent_id: parent.into(),
                selectors: vec![],
            }]),
            error: None,
        };
        let server = |reachable, lookups| {
            let mut v = ServerView::test("s", reachable, &[], t(0));
            v.entry_lookups = lookups;
            // Attested agents only: "unused" is a token minted, not used.
            v.agents = ["t1", "x", "t9"]
                .iter()
                .map(|tok| ServerAgent {
                    spiffe_id: id(tok),
                    attestation_type: "join_token".into(),
                    serial: "01".into(),
                    expires_at: t(100),
                    banned: false,
                    can_reattest: false,
                })
                .collect();
            Arc::new(v)
        };
        let obs = Observations {
            servers: vec![
                server(
                    true,
                    vec![
                        lookup("a", &id("t1")),
                        // Not an agent: an alias of an alias.
                        lookup("a", "spiffe://td/node/parent"),
                        // A token minted for `a`, not used yet: never
                        // learned, so never logged nor stored.
                        lookup("a", &id("unused")),
                        // Not configured.
                        lookup("x", &id("x")),
                    ],
                ),
                // An unreachable server's lookups count for nothing.
                server(false, vec![lookup("a", &id("t9"))]),
            ],
            ..Observations::default()
        };
        let mut ids = Identities::default();
        let mut tick = Tick::default();
        ids.observe(&obs, &configured, t(1), &mut tick);
        let map = ids.shared();
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map[&id("t1")], "a");
        assert!(matches!(
            &tick.events[..],
            [Event::AgentIdentified(AgentIdentity {
                source: IdentitySource::NodeAlias,
                ..
            })]
        ));
    }
}
