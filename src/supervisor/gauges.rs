//! The fleet as the metrics show it: pure functions of the open incidents
//! and the tick's observations, so every bound on a label is tested here
//! with literal times.
//!
//! Label values stay within configuration: an incident's `target` is a
//! configured agent, server, peer or certificate-file name, or the trust
//! domain; anything else (a peer named only in handshake reports, an agent
//! known only by its SPIFFE ID) shares [`OTHER_TARGET`]. SPIFFE IDs appear
//! only on the top-k per-SVID outage series.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{AgentView, Incident, ServerView, Subject};
use crate::telemetry::metrics::OTHER_TARGET;

/// The configured names an incident's target may carry as a label.
pub(super) struct Known<'a> {
    /// `[[agents]]` names.
    pub agents: &'a HashSet<String>,
    /// Probe targets and configured peers.
    pub peers: &'a HashSet<String>,
    /// Configured servers (one view each).
    pub servers: HashSet<&'a str>,
    /// Configured certificate files (one view each).
    pub files: HashSet<&'a str>,
}

impl Known<'_> {
    /// The label for what `subject` is about: the agent (for an SVID, the
    /// agent serving it), server, trust domain, peer or file name when
    /// configured, else [`OTHER_TARGET`].
    pub(super) fn target<'s>(&self, subject: &'s Subject) -> &'s str {
        let name = subject.agent_name();
        let known = match subject {
            Subject::Agent { .. } | Subject::Svid { .. } => self.agents.contains(name),
            Subject::Server { .. } => self.servers.contains(name),
            Subject::Cluster { .. } => true,
            Subject::Peer { .. } | Subject::Handshakes { .. } => self.peers.contains(name),
            Subject::CertFile { .. } => self.files.contains(name),
        };
        if known { name } else { OTHER_TARGET }
    }
}

/// One (symptom, target, severity) per open incident, deduplicated (an
/// agent's SVIDs, or a peer's failure reasons, share their target).
pub(super) fn open_incidents<'i>(
    incidents: impl Iterator<Item = &'i Incident>,
    known: &Known<'_>,
) -> Vec<(&'static str, String, &'static str)> {
    let set: std::collections::BTreeSet<_> = incidents
        .map(|i| {
            (
                i.kind.as_str(),
                known.target(&i.subject),
                i.severity.as_str(),
            )
        })
        .collect();
    set.into_iter()
        .map(|(k, t, s)| (k, t.to_string(), s))
        .collect()
}

/// Per configured agent with an open agent-level incident (about the agent
/// or one of its SVIDs) that predicts one: the earliest predicted outage.
pub(super) fn agent_outages<'i>(
    incidents: impl Iterator<Item = &'i Incident>,
    agents: &HashSet<String>,
) -> Vec<(String, SystemTime)> {
    let mut out: BTreeMap<&str, SystemTime> = BTreeMap::new();
    for i in incidents.filter(|i| i.subject.is_agent_level()) {
        let agent = i.subject.agent_name();
        if let (Some(at), true) = (i.predicted_outage, agents.contains(agent)) {
            out.entry(agent)
                .and_modify(|e| *e = (*e).min(at))
                .or_insert(at);
        }
    }
    out.into_iter().map(|(a, t)| (a.to_string(), t)).collect()
}

/// The `k` SVIDs at risk with the soonest predicted outage, soonest first
/// (ties by agent and SPIFFE ID): an incident about the SVID predicts its
/// own; one about its agent (which then cannot renew it) predicts the later
/// of the agent's predicted outage and the SVID's notAfter. The earliest
/// applies. SVID incidents of agents outside `agents` are left out.
///
/// Runs every tick over every open incident: it indexes nothing per view,
/// looks each view up once, and allocates labels for the `k` kept only.
pub(super) fn svid_outages<'i>(
    incidents: impl Iterator<Item = &'i Incident>,
    views: &'i [Arc<AgentView>],
    agents: &HashSet<String>,
    k: usize,
) -> Vec<(String, String, SystemTime)> {
    let mut candidates: Vec<(SystemTime, &str, &str)> = Vec::new();
    let mut agents_at_risk: HashMap<&str, SystemTime> = HashMap::new();
    for i in incidents {
        match (&i.subject, i.predicted_outage) {
            (Subject::Svid { agent, spiffe_id }, Some(at)) if agents.contains(agent) => {
                candidates.push((at, agent, spiffe_id));
            }
            (Subject::Agent { agent }, Some(at)) => {
                agents_at_risk
                    .entry(agent)
                    .and_modify(|e| *e = (*e).min(at))
                    .or_insert(at);
            }
            _ => {}
        }
    }
    if !agents_at_risk.is_empty() {
        for v in views {
            if let Some(at) = agents_at_risk.get(v.agent.as_str()) {
                candidates.extend(v.svids.iter().map(|s| {
                    (
                        (*at).max(s.not_after),
                        v.agent.as_str(),
                        s.spiffe_id.as_str(),
                    )
                }));
            }
        }
    }
    // An SVID appears at most twice (its own incident and its agent's), so
    // the 2k soonest candidates hold the k soonest SVIDs.
    let keep = (2 * k).min(candidates.len());
    if keep < candidates.len() {
        candidates.select_nth_unstable(keep);
        candidates.truncate(keep);
    }
    candidates.sort_unstable();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    candidates
        .into_iter()
        .filter(|(_, agent, id)| seen.insert((agent, id)))
        .take(k)
        .map(|(at, agent, id)| (agent.to_string(), id.to_string(), at))
        .collect()
}

/// Workloads at risk: SVIDs served by an agent with an open agent-level
/// incident, or themselves in one (an SVID is judged only while its agent
/// serves it, so its incident stands for a served SVID), plus configured
/// peers and certificate files with an open incident. Hashes per open
/// incident and, only when an agent is at risk, once per view; never per
/// SVID.
pub(super) fn workloads_at_risk<'i>(
    incidents: impl Iterator<Item = &'i Incident>,
    views: &[Arc<AgentView>],
    known: &Known<'_>,
) -> i64 {
    let mut agents: HashSet<&str> = HashSet::new();
    let mut svids: HashSet<(&str, &str)> = HashSet::new();
    let mut others: HashSet<(bool, &str)> = HashSet::new();
    for i in incidents {
        match &i.subject {
            Subject::Agent { agent } => {
                agents.insert(agent);
            }
            Subject::Svid { agent, spiffe_id } => {
                svids.insert((agent, spiffe_id));
            }
            Subject::Peer { peer } | Subject::Handshakes { peer, .. }
                if known.peers.contains(peer) =>
            {
                others.insert((true, peer));
            }
            Subject::CertFile { file } if known.files.contains(file.as_str()) => {
                others.insert((false, file));
            }
            _ => {}
        }
    }
    // SVIDs of agents at risk count once, with all their agent's SVIDs.
    let own = svids.iter().filter(|(a, _)| !agents.contains(a)).count();
    let served: usize = if agents.is_empty() {
        0
    } else {
        views
            .iter()
            .filter(|v| agents.contains(v.agent.as_str()))
            .map(|v| v.svids.len())
            .sum()
    };
    (served + own + others.len()) as i64
}

/// Per configured server: whether it answered, and the latest notAfter of
/// the untainted authorities in its bundle (the instant past which the
/// bundle it serves holds no authority; `None` when it has none).
pub(super) fn servers(views: &[Arc<ServerView>]) -> Vec<(&str, bool, Option<SystemTime>)> {
    views
        .iter()
        .map(|s| {
            let latest = s
                .bundle
                .iter()
                .filter(|a| !a.tainted)
                .map(|a| a.not_after)
                .max();
            (s.server.as_str(), s.reachable, latest)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::Reason;
    use crate::model::{Severity, SymptomKind};
    use std::time::{Duration, UNIX_EPOCH};

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn incident(kind: SymptomKind, subject: Subject, outage: Option<u64>) -> Incident {
        Incident {
            id: format!("{kind}-{subject:?}"),
            kind,
            subject,
            severity: Severity::Warning,
            opened_at: t(0),
            predicted_outage: outage.map(t),
            evidence: serde_json::json!({}),
            next_rung: 0,
            needs_operator: None,
        }
    }

    fn names(n: &[&str]) -> HashSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn agent_view(agent: &str, svids: &[(&str, u64)]) -> Arc<AgentView> {
        Arc::new(AgentView {
            agent: agent.to_string(),
            status: crate::model::StreamStatus::Up,
            status_since: t(0),
            last_error: None,
            last_message: Some(t(0)),
            svids: svids
                .iter()
                .map(|(id, not_after)| crate::model::SvidObservation {
                    spiffe_id: id.to_string(),
                    serial: "01".into(),
                    not_before: t(0),
                    not_after: t(*not_after),
                    invalid: None,
                    first_seen: t(0),
                    issuer: String::new(),
                })
                .collect(),
            bundle_authorities: 1,
            bundle: Vec::new(),
            rotations: 0,
            updated_at: t(0),
        })
    }

    #[test]
    fn targets_are_configured_names_or_other_never_spiffe_ids() {
        let (agents, peers) = (names(&["node-a"]), names(&["web"]));
        let known = Known {
            agents: &agents,
            peers: &peers,
            servers: HashSet::from(["server-a"]),
            files: HashSet::from(["envoy-cert"]),
        };
        let cases = [
            (Subject::agent("node-a"), "node-a"),
            (Subject::svid("node-a", "spiffe://td/w"), "node-a"),
            (Subject::agent("spiffe://td/spire/agent/x"), OTHER_TARGET),
            (Subject::server("server-a"), "server-a"),
            (Subject::server("server-z"), OTHER_TARGET),
            (Subject::cluster("td"), "td"),
            (Subject::peer("web"), "web"),
            (Subject::handshakes("web", Reason::UnknownCa), "web"),
            (
                Subject::handshakes("reported-9", Reason::UnknownCa),
                OTHER_TARGET,
            ),
            (Subject::cert_file("envoy-cert"), "envoy-cert"),
            (Subject::cert_file("nope"), OTHER_TARGET),
        ];
        for (subject, want) in cases {
            assert_eq!(known.target(&subject), want, "{subject:?}");
        }
        // An agent's two SVIDs are one series.
        let open = [
            incident(
                SymptomKind::SvidExpiring,
                Subject::svid("node-a", "spiffe://td/a"),
                None,
            ),
            incident(
                SymptomKind::SvidExpiring,
                Subject::svid("node-a", "spiffe://td/b"),
                None,
            ),
        ];
        assert_eq!(
            open_incidents(open.iter(), &known),
            [("svid_expiring", "node-a".to_string(), "warning")]
        );
    }

    #[test]
    fn outages_per_agent_and_per_svid() {
        let agents = names(&["a", "b"]);
        let open = [
            incident(SymptomKind::AgentBanned, Subject::agent("a"), Some(500)),
            incident(
                SymptomKind::SvidExpiring,
                Subject::svid("a", "spiffe://td/x"),
                Some(300),
            ),
            incident(
                SymptomKind::SvidRotationOverdue,
                Subject::svid("b", "spiffe://td/y"),
                None,
            ),
            incident(SymptomKind::CaExpiring, Subject::cluster("td"), Some(100)),
            incident(
                SymptomKind::AgentUnreachable,
                Subject::agent("unconfigured"),
                Some(50),
            ),
        ];
        assert_eq!(
            agent_outages(open.iter(), &agents),
            [("a".to_string(), t(300))]
        );
        let views = [agent_view(
            "a",
            &[("spiffe://td/x", 400), ("spiffe://td/z", 900)],
        )];
        assert_eq!(
            svid_outages(open.iter(), &views, &agents, 10),
            [
                // Its own incident predicts 300, before the agent's 500.
                ("a".to_string(), "spiffe://td/x".to_string(), t(300)),
                // The agent's outage cannot break it before its notAfter.
                ("a".to_string(), "spiffe://td/z".to_string(), t(900)),
            ]
        );
    }

    #[test]
    fn only_the_k_soonest_svids_are_kept_each_once() {
        let agents = names(&["a"]);
        let open = [
            incident(SymptomKind::AgentBanned, Subject::agent("a"), Some(100)),
            incident(
                SymptomKind::SvidExpiring,
                Subject::svid("a", "spiffe://td/x"),
                Some(200),
            ),
        ];
        let views = [agent_view(
            "a",
            &[
                ("spiffe://td/x", 50),
                ("spiffe://td/y", 150),
                ("spiffe://td/z", 300),
            ],
        )];
        let svid = |id: &str, at| ("a".to_string(), id.to_string(), t(at));
        // x twice (its own 200, its agent's 100): once, at 100.
        assert_eq!(
            svid_outages(open.iter(), &views, &agents, 2),
            [svid("spiffe://td/x", 100), svid("spiffe://td/y", 150)]
        );
        assert_eq!(svid_outages(open.iter(), &views, &agents, 5).len(), 3);
        assert!(svid_outages(open.iter(), &views, &agents, 0).is_empty());
    }

    #[test]
    fn workloads_at_risk_count_svids_peers_and_files() {
        let (agents, peers) = (names(&["a", "b"]), names(&["web"]));
        let known = Known {
            agents: &agents,
            peers: &peers,
            servers: HashSet::new(),
            files: HashSet::from(["envoy-cert"]),
        };
        let views = [
            agent_view("a", &[("spiffe://td/1", 9), ("spiffe://td/2", 9)]),
            agent_view("b", &[("spiffe://td/3", 9), ("spiffe://td/4", 9)]),
        ];
        let open = [
            incident(SymptomKind::AgentUnreachable, Subject::agent("a"), None),
            incident(
                SymptomKind::SvidExpiring,
                Subject::svid("b", "spiffe://td/3"),
                None,
            ),
            incident(SymptomKind::StaleServedCert, Subject::peer("web"), None),
            incident(
                SymptomKind::HandshakeFailureBurst,
                Subject::handshakes("web", Reason::UnknownCa),
                None,
            ),
            incident(
                SymptomKind::HandshakeFailureBurst,
                Subject::handshakes("reported", Reason::UnknownCa),
                None,
            ),
            incident(
                SymptomKind::StaleCertFile,
                Subject::cert_file("envoy-cert"),
                None,
            ),
        ];
        // 2 SVIDs of a, 1 of b, the peer once, the file.
        assert_eq!(workloads_at_risk(open.iter(), &views, &known), 5);
        assert_eq!(workloads_at_risk([].iter(), &views, &known), 0);
    }

    #[test]
    fn a_servers_bundle_expiry_is_its_last_untainted_authority() {
        let mut s = ServerView::test("s", true, &["f1", "f2", "f3"], t(0));
        s.bundle[0].not_after = t(100);
        s.bundle[1].not_after = t(200);
        s.bundle[2].not_after = t(300);
        s.bundle[2].tainted = true;
        let down = ServerView::test("d", false, &[], t(0));
        assert_eq!(
            servers(&[Arc::new(s), Arc::new(down)]),
            [("s", true, Some(t(200))), ("d", false, None)]
        );
    }
}
