//! Registration entries to look up (Entry.ListEntries by SPIFFE ID), by
//! every server sensor at its polls:
//! - when an agent refuses us an identity (`PermissionDenied`), the
//!   Workload API sensor asks for the SPIFFE IDs it last served us, so
//!   `identity_not_issued` says whether the entry is gone or still there
//!   but no longer matches us;
//! - each configured agent's `node_alias`: the alias entry's parent is the
//!   agent's SPIFFE ID, so an agent is known by name where a server lists
//!   it even if its Debug API never answered us.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most this many SPIFFE IDs are looked up per poll for refusals.
pub const MAX_LOOKUPS: usize = 16;
/// Node aliases looked up per poll, round robin.
pub const ALIASES_PER_POLL: usize = 4;

/// SPIFFE IDs wanted, with the agent that refused them, and the configured
/// node aliases.
#[derive(Debug, Default)]
pub struct EntryLookups {
    wanted: Mutex<BTreeMap<String, String>>,
    /// (agent, node alias), from the config.
    aliases: Vec<(String, String)>,
    next_alias: AtomicUsize,
}

impl EntryLookups {
    /// Lookups that also resolve these (agent name, node alias) pairs.
    pub fn with_aliases(aliases: Vec<(String, String)>) -> Self {
        Self {
            aliases,
            ..Self::default()
        }
    }

    /// The next node aliases to resolve: [`ALIASES_PER_POLL`] of them, each
    /// caller (server sensor) moving the shared round robin on.
    pub fn aliases_now(&self) -> Vec<(String, String)> {
        let n = self.aliases.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self
            .next_alias
            .fetch_add(ALIASES_PER_POLL, Ordering::Relaxed);
        (0..ALIASES_PER_POLL.min(n))
            .map(|i| self.aliases[(start + i) % n].clone())
            .collect()
    }

    /// `agent` refused us `spiffe_ids`: look them up.
    pub fn want(&self, agent: &str, spiffe_ids: impl IntoIterator<Item = String>) {
        let mut w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        for id in spiffe_ids {
            w.insert(id, agent.to_string());
        }
    }

    /// `agent` serves us again: nothing of it to look up any more.
    pub fn forget(&self, agent: &str) {
        self.wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, a| a != agent);
    }

    /// (agent, SPIFFE ID) pairs to look up now, at most [`MAX_LOOKUPS`].
    pub fn wanted(&self) -> Vec<(String, String)> {
        self.wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .take(MAX_LOOKUPS)
            .map(|(id, agent)| (agent.clone(), id.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_round_robin() {
        let l = EntryLookups::with_aliases(
            (0..6)
                .map(|i| (format!("agent-{i}"), format!("spiffe://td/node/{i}")))
                .collect(),
        );
        let first: Vec<String> = l.aliases_now().into_iter().map(|(a, _)| a).collect();
        assert_eq!(first, ["agent-0", "agent-1", "agent-2", "agent-3"]);
        let second: Vec<String> = l.aliases_now().into_iter().map(|(a, _)| a).collect();
        assert_eq!(second, ["agent-4", "agent-5", "agent-0", "agent-1"]);
        assert!(EntryLookups::default().aliases_now().is_empty());
        let one = EntryLookups::with_aliases(vec![("a".into(), "spiffe://td/n".into())]);
        assert_eq!(one.aliases_now().len(), 1);
    }

    #[test]
    fn wanted_until_served_again_and_bounded() {
        let l = EntryLookups::default();
        l.want("a", ["spiffe://td/w1".to_string()]);
        l.want("b", (0..40).map(|i| format!("spiffe://td/b{i:02}")));
        assert_eq!(l.wanted().len(), MAX_LOOKUPS);
        l.forget("b");
        assert_eq!(
            l.wanted(),
            [("a".to_string(), "spiffe://td/w1".to_string())]
        );
        l.forget("a");
        assert!(l.wanted().is_empty());
    }
}
