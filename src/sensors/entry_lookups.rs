//! Registration entries to look up: when an agent refuses us an identity
//! (`PermissionDenied`), the Workload API sensor asks for the SPIFFE IDs it
//! last served us, and each server sensor looks them up (Entry.ListEntries
//! by SPIFFE ID) at its next polls, so `identity_not_issued` says whether
//! the entry is gone or still there but no longer matches us.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// At most this many SPIFFE IDs are looked up per poll.
pub const MAX_LOOKUPS: usize = 16;

/// SPIFFE IDs wanted, with the agent that refused them.
#[derive(Debug, Default)]
pub struct EntryLookups {
    wanted: Mutex<BTreeMap<String, String>>,
}

impl EntryLookups {
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
