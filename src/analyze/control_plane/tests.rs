use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::model::{
    AgentView, Authority, BootstrapBundleView, HealthView, ServerView, StreamStatus, TtlSource,
};
use crate::policy::Policy;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn th() -> Thresholds {
    // The tables below were written for the rotation point itself;
    // `rotation_check_slack` has tests of its own.
    Thresholds {
        rotation_check_slack: Duration::ZERO,
        ..Policy::builtin().unwrap().thresholds
    }
}

fn debug(agent: &str, last_sync: u64, updated: u64) -> Arc<AgentDebugView> {
    Arc::new(AgentDebugView {
        agent: agent.into(),
        reachable: true,
        last_error: None,
        unanswered_since: None,
        updated_at: t(updated),
        last_sync_success: Some(t(last_sync)),
        answered_after: Some(t(updated)),
        uptime_secs: 100,
        cached_x509_svids: 1,
        spiffe_id: Some(format!("spiffe://td/spire/agent/join_token/{agent}")),
        svid_expires_at: Some(t(3600)),
    })
}

fn authority(fp: &str, not_after: u64) -> Authority {
    Authority {
        fingerprint: fp.into(),
        key_id: String::new(),
        not_after: t(not_after),
        tainted: false,
    }
}

fn server(
    name: &str,
    reachable: bool,
    agents: Vec<ServerAgent>,
    bundle: &[&str],
) -> Arc<ServerView> {
    Arc::new(ServerView {
        server: name.into(),
        reachable,
        last_error: (!reachable).then(|| "unavailable".into()),
        since: t(0),
        updated_at: t(100),
        uptime_secs: 10,
        svid_expires_at: None,
        agents_count: agents.len() as u64,
        entries_count: 1,
        agents,
        agents_truncated: false,
        bundle: bundle.iter().map(|f| authority(f, 86_400)).collect(),
        bundle_sequence: 1,
        entry_lookups: Vec::new(),
        address_reachable: None,
        address_error: None,
    })
}

fn listed(agent: &str, expires: u64, banned: bool) -> ServerAgent {
    ServerAgent {
        spiffe_id: format!("spiffe://td/spire/agent/join_token/{agent}"),
        attestation_type: "join_token".into(),
        serial: if banned { String::new() } else { "01".into() },
        expires_at: t(expires),
        banned,
        can_reattest: false,
    }
}

fn kinds(s: &[Symptom]) -> Vec<(SymptomKind, String)> {
    let mut v: Vec<_> = s.iter().map(|s| (s.kind, s.subject.to_string())).collect();
    v.sort();
    v
}

/// Servers `s1` and `s2` with a learned 1 h agent SVID TTL.
fn hour() -> LearnedTtls {
    learned(3600, TtlSource::Learned)
}

fn learned(secs: u64, source: TtlSource) -> LearnedTtls {
    ["s1", "s2"]
        .into_iter()
        .map(|s| {
            let ttl = AgentTtl {
                ttl: Duration::from_secs(secs),
                source,
            };
            (s.to_string(), ttl)
        })
        .collect()
}

fn run(obs: &Observations, now: u64) -> Vec<Symptom> {
    control_plane(obs, obs.servers.len(), &|_| false, &th(), &hour(), t(now))
}

#[test]
fn sync_stale_opens_after_threshold_and_predicts_agent_svid_expiry() {
    let obs = Observations {
        agent_debug: vec![debug("a", 60, 100), debug("b", 95, 100)],
        ..Default::default()
    };
    let got = run(&obs, 100);
    assert_eq!(
        kinds(&got),
        vec![(SymptomKind::AgentSyncStale, "agent:a".into())]
    );
    assert_eq!(got[0].predicted_outage, Some(t(3600)));
    assert_eq!(got[0].evidence["age_ms"], 40_000);
    assert!(!got[0].blind);
}

#[test]
fn sync_stale_has_hysteresis() {
    let obs = Observations {
        agent_debug: vec![debug("a", 93, 100)],
        ..Default::default()
    };
    // 7 s: between close (6 s) and open (8 s).
    assert!(run(&obs, 100).is_empty());
    let open = |k: &SymptomKey| k.kind == SymptomKind::AgentSyncStale;
    let got = control_plane(&obs, 0, &open, &th(), &hour(), t(100));
    assert_eq!(got.len(), 1);
    let fresh = Observations {
        agent_debug: vec![debug("a", 95, 100)],
        ..Default::default()
    };
    assert!(control_plane(&fresh, 0, &open, &th(), &hour(), t(100)).is_empty());
}

/// The age that counts is the one when the agent computed its (cached)
/// answer, with the built-in 8 s / 6 s thresholds. Times are seconds after
/// `t(0)`; `answered` is `answered_after` (`None`: an old view, taken as
/// `updated` − 5 s).
#[test]
fn sync_stale_judges_the_age_at_the_agents_answer() {
    struct Case {
        name: &'static str,
        last_sync: u64,
        answered: Option<u64>,
        updated: u64,
        reachable: bool,
        now: u64,
        was_open: bool,
        present: bool,
    }
    let cases = [
        Case {
            name: "healthy: 11 s old now, 5 s old at the answer",
            last_sync: 100,
            answered: Some(105),
            updated: 110,
            reachable: true,
            now: 111,
            was_open: false,
            present: false,
        },
        Case {
            name: "healthy worst case: interval + truncation, 6 s at the answer",
            last_sync: 100,
            answered: Some(106),
            updated: 111,
            reachable: true,
            now: 112,
            was_open: false,
            present: false,
        },
        Case {
            name: "exactly the open bar does not open",
            last_sync: 100,
            answered: Some(108),
            updated: 109,
            reachable: true,
            now: 109,
            was_open: false,
            present: false,
        },
        Case {
            name: "past the open bar at the answer opens",
            last_sync: 100,
            answered: Some(109),
            updated: 110,
            reachable: true,
            now: 110,
            was_open: false,
            present: true,
        },
        Case {
            name: "old now but not at the answer: the cache, not a lost sync",
            last_sync: 100,
            answered: Some(104),
            updated: 113,
            reachable: true,
            now: 114,
            was_open: false,
            present: false,
        },
        Case {
            name: "no answered_after: the poll time minus the 5 s cache",
            last_sync: 100,
            answered: None,
            updated: 114,
            reachable: true,
            now: 114,
            was_open: false,
            present: true,
        },
        Case {
            name: "no answered_after, within the cache",
            last_sync: 100,
            answered: None,
            updated: 112,
            reachable: true,
            now: 112,
            was_open: false,
            present: false,
        },
        Case {
            name: "unreachable never opens",
            last_sync: 100,
            answered: Some(130),
            updated: 131,
            reachable: false,
            now: 131,
            was_open: false,
            present: false,
        },
        Case {
            name: "unreachable keeps an open one",
            last_sync: 100,
            answered: Some(102),
            updated: 131,
            reachable: false,
            now: 131,
            was_open: true,
            present: true,
        },
        Case {
            name: "open stays open between close and open",
            last_sync: 100,
            answered: Some(107),
            updated: 108,
            reachable: true,
            now: 108,
            was_open: true,
            present: true,
        },
        Case {
            name: "open closes below the close bar",
            last_sync: 100,
            answered: Some(105),
            updated: 106,
            reachable: true,
            now: 106,
            was_open: true,
            present: false,
        },
    ];
    for c in cases {
        let mut d = (*debug("a", c.last_sync, c.updated)).clone();
        d.answered_after = c.answered.map(t);
        d.reachable = c.reachable;
        let obs = Observations {
            agent_debug: vec![Arc::new(d)],
            ..Default::default()
        };
        let open = |k: &SymptomKey| c.was_open && k.kind == SymptomKind::AgentSyncStale;
        let got = control_plane(&obs, 0, &open, &th(), &hour(), t(c.now));
        assert!(
            got.iter().all(|s| s.kind == SymptomKind::AgentSyncStale),
            "{}: {got:#?}",
            c.name
        );
        assert_eq!(!got.is_empty(), c.present, "{}: {got:#?}", c.name);
        if let Some(s) = got.first() {
            let answered = c.answered.unwrap_or(c.updated - 5);
            assert_eq!(s.evidence["signal"], "agent_debug_last_sync", "{}", c.name);
            assert_eq!(
                s.evidence["confirmed_age_ms"],
                (answered - c.last_sync) * 1000,
                "{}",
                c.name
            );
            assert_eq!(
                s.evidence["age_ms"],
                (c.now - c.last_sync) * 1000,
                "{}",
                c.name
            );
        }
    }
}

#[test]
fn unreachable_debug_api_is_not_sync_staleness() {
    let mut d = (*debug("a", 0, 100)).clone();
    d.reachable = false;
    let obs = Observations {
        agent_debug: vec![Arc::new(d)],
        ..Default::default()
    };
    assert!(run(&obs, 100).is_empty());
}

#[test]
fn server_view_of_agents() {
    // TTL 1 h: renewing agents keep > 40 % (1440 s) left.
    let obs = Observations {
        agent_debug: vec![debug("a", 99, 100)],
        servers: vec![server(
            "s1",
            true,
            vec![
                listed("a", 100 + 1000, false),
                listed("b", 100 + 3000, false),
                listed("c", 100 + 3000, true),
            ],
            &["f1"],
        )],
        ..Default::default()
    };
    let got = run(&obs, 100);
    assert_eq!(
        kinds(&got),
        vec![
            (SymptomKind::AgentNotRenewing, "agent:a".into()),
            (
                SymptomKind::AgentBanned,
                "agent:spiffe://td/spire/agent/join_token/c".into()
            ),
        ]
    );
    let nr = got
        .iter()
        .find(|s| s.kind == SymptomKind::AgentNotRenewing)
        .unwrap();
    assert_eq!(nr.predicted_outage, Some(t(1100)));
}

/// `agent_ids` as the loop remembers them: SPIFFE ID of token `token` → name.
fn remembered(pairs: &[(&str, &str)]) -> Arc<std::collections::HashMap<String, String>> {
    Arc::new(
        pairs
            .iter()
            .map(|(token, name)| {
                (
                    format!("spiffe://td/spire/agent/join_token/{token}"),
                    name.to_string(),
                )
            })
            .collect(),
    )
}

#[test]
fn an_agent_that_no_longer_answers_is_still_known_by_name() {
    // agent-0's Debug API is down (its data dir was wiped); the loop
    // remembers its SPIFFE ID from before.
    let obs = Observations {
        servers: vec![server("s1", true, vec![listed("t0", 1000, false)], &["f"])],
        agent_ids: remembered(&[("t0", "agent-0")]),
        ..Default::default()
    };
    let got = run(&obs, 100);
    assert_eq!(
        kinds(&got),
        vec![(SymptomKind::AgentNotRenewing, "agent:agent-0".into())]
    );
    assert_eq!(
        got[0].evidence["spiffe_id"],
        "spiffe://td/spire/agent/join_token/t0"
    );
}

#[test]
fn an_evicted_agent_stays_unhealed_until_listed_and_renewing_again() {
    let key = |kind| SymptomKey {
        kind,
        subject: Subject::agent("agent-0"),
    };
    let open_both = |k: &SymptomKey| {
        *k == key(SymptomKind::AgentNotRenewing) || *k == key(SymptomKind::AgentBanned)
    };
    // Deleted (evicted): listed nowhere. Both incidents stay open; nothing
    // opens for an agent with no incident.
    let gone = Observations {
        servers: vec![server("s1", true, vec![listed("b", 3000, false)], &["f"])],
        agent_ids: remembered(&[("t0", "agent-0"), ("b", "agent-1")]),
        ..Default::default()
    };
    let got = control_plane(&gone, 1, &open_both, &th(), &hour(), t(100));
    assert_eq!(
        kinds(&got),
        vec![
            (SymptomKind::AgentNotRenewing, "agent:agent-0".into()),
            (SymptomKind::AgentBanned, "agent:agent-0".into()),
        ]
    );
    assert!(run(&gone, 100).is_empty());
    // No server answers: listed nowhere says nothing; still open.
    let down = Observations {
        servers: vec![server("s1", false, vec![], &[])],
        ..gone.clone()
    };
    let got = control_plane(&down, 1, &open_both, &th(), &hour(), t(100));
    assert!(
        got.iter()
            .any(|s| s.kind == SymptomKind::AgentNotRenewing
                && s.subject == Subject::agent("agent-0")),
        "{got:?}"
    );
    // Back under a new identity (a fresh token), renewing: judged by the
    // new listing only, so both close; the old identity, if still listed,
    // is ignored.
    let back = Observations {
        servers: vec![server(
            "s1",
            true,
            vec![listed("t0", 500, false), listed("t1", 3700, false)],
            &["f"],
        )],
        agent_ids: remembered(&[("t0", "agent-0"), ("t1", "agent-0")]),
        ..Default::default()
    };
    assert!(control_plane(&back, 1, &open_both, &th(), &hour(), t(100)).is_empty());
}

#[test]
fn servers_down_and_all_down() {
    let one_down = Observations {
        servers: vec![
            server("s1", false, vec![], &[]),
            server("s2", true, vec![], &["f"]),
        ],
        ..Default::default()
    };
    assert_eq!(
        kinds(&run(&one_down, 100)),
        vec![(SymptomKind::ServerUnhealthy, "server:s1".into())]
    );
    let all_down = Observations {
        servers: vec![
            server("s1", false, vec![], &[]),
            server("s2", false, vec![], &[]),
        ],
        agent_debug: vec![debug("a", 99, 100)],
        ..Default::default()
    };
    let got = run(&all_down, 100);
    let all = got
        .iter()
        .find(|s| s.kind == SymptomKind::AllServersDown)
        .unwrap();
    assert_eq!(all.subject, Subject::cluster("td"));
    assert_eq!(
        all.predicted_outage,
        Some(t(3600)),
        "earliest agent SVID expiry"
    );
    assert_eq!(all.severity, Severity::Critical);
}

#[test]
fn not_ready_server_is_unhealthy_even_if_its_admin_api_answers() {
    let obs = Observations {
        servers: vec![server("s1", true, vec![], &["f"])],
        health: vec![Arc::new(HealthView {
            target: "s1".into(),
            role: Role::Server,
            live: Some(true),
            ready: Some(false),
            last_error: None,
            updated_at: t(100),
        })],
        ..Default::default()
    };
    assert_eq!(
        kinds(&run(&obs, 100)),
        vec![(SymptomKind::ServerUnhealthy, "server:s1".into())]
    );
}

#[test]
fn ca_expiring_and_bundle_divergence() {
    let mut s1 = (*server("s1", true, vec![], &["f1", "f2"])).clone();
    s1.bundle = vec![authority("f1", 100 + 3600), authority("f2", 100 + 7200)];
    let s2 = server("s2", true, vec![], &["f1"]);
    let agent = Arc::new(AgentView {
        agent: "a".into(),
        status: StreamStatus::Up,
        status_since: t(0),
        last_error: None,
        last_message: Some(t(99)),
        svids: vec![],
        bundle_authorities: 1,
        bundle: vec!["f1".into()],
        rotations: 0,
        updated_at: t(100),
    });
    let obs = Observations {
        servers: vec![Arc::new(s1), s2],
        agents: vec![agent],
        ..Default::default()
    };
    let got = run(&obs, 100);
    assert_eq!(
        kinds(&got),
        vec![
            (SymptomKind::CaExpiring, "cluster:spire".into()),
            (SymptomKind::BundleDivergence, "agent:a".into()),
            (SymptomKind::BundleDivergence, "cluster:spire".into()),
        ]
    );
    let div = got
        .iter()
        .find(|s| s.subject == Subject::agent("a"))
        .unwrap();
    assert_eq!(div.evidence["missing"], serde_json::json!(["f2"]));
}

fn boot(agent: &str, fps: &[&str], error: Option<&str>, updated: u64) -> Arc<BootstrapBundleView> {
    Arc::new(BootstrapBundleView {
        agent: agent.into(),
        path: format!("/etc/spire/{agent}/bundle.pem"),
        read: true,
        authorities: fps.iter().map(|f| f.to_string()).collect(),
        error: error.map(str::to_string),
        updated_at: t(updated),
    })
}

fn own_bundle(agent: &str, fps: &[&str], updated: u64) -> Arc<AgentView> {
    Arc::new(AgentView {
        agent: agent.into(),
        status: StreamStatus::Up,
        status_since: t(0),
        last_error: None,
        last_message: Some(t(updated)),
        svids: vec![],
        bundle_authorities: fps.len(),
        bundle: fps.iter().map(|f| f.to_string()).collect(),
        rotations: 0,
        updated_at: t(updated),
    })
}

fn stale_boot(obs: &Observations, open: bool, now: u64) -> Vec<Symptom> {
    let is_open = |k: &SymptomKey| open && k.kind == SymptomKind::BootstrapBundleStale;
    control_plane(obs, obs.servers.len(), &is_open, &th(), &hour(), t(now))
        .into_iter()
        .filter(|s| s.kind == SymptomKind::BootstrapBundleStale)
        .collect()
}

#[test]
fn bootstrap_bundle_stale_table() {
    // Server bundle during a rotation: old (maybe tainted), new.
    let server_with = |old_tainted: bool| {
        let mut s = (*server("s1", true, vec![], &["old", "new"])).clone();
        s.bundle[0].tainted = old_tainted;
        Arc::new(s)
    };
    let revoked = server("s1", true, vec![], &["new"]);
    let down = server("s1", false, vec![], &[]);
    struct Case {
        what: &'static str,
        servers: Vec<Arc<ServerView>>,
        agents: Vec<Arc<AgentView>>,
        file: Arc<BootstrapBundleView>,
        open: bool,
        now: u64,
        // None: not reported; Some(blind).
        want: Option<bool>,
    }
    let cases = [
        Case {
            what: "the file holds the old CA, the bundle old and new",
            servers: vec![server_with(false)],
            agents: vec![],
            file: boot("a", &["old"], None, 100),
            open: false,
            now: 100,
            want: None,
        },
        Case {
            what: "old CA tainted: it no longer counts",
            servers: vec![server_with(true)],
            agents: vec![],
            file: boot("a", &["old"], None, 100),
            open: false,
            now: 100,
            want: Some(false),
        },
        Case {
            what: "old CA revoked",
            servers: vec![revoked.clone()],
            agents: vec![],
            file: boot("a", &["old"], None, 100),
            open: false,
            now: 100,
            want: Some(false),
        },
        Case {
            what: "file rewritten with the new CA: closes",
            servers: vec![revoked.clone()],
            agents: vec![],
            file: boot("a", &["old", "new"], None, 100),
            open: true,
            now: 100,
            want: None,
        },
        Case {
            what: "unreadable file, even with nothing to compare with",
            servers: vec![],
            agents: vec![],
            file: boot("a", &[], Some("missing"), 100),
            open: false,
            now: 100,
            want: Some(false),
        },
        Case {
            what: "no server bundle: the agent's own bundle is the reference",
            servers: vec![down.clone()],
            agents: vec![own_bundle("a", &["new"], 100)],
            file: boot("a", &["old"], None, 100),
            open: false,
            now: 100,
            want: Some(false),
        },
        Case {
            what: "the agent's own bundle still has it",
            servers: vec![down.clone()],
            agents: vec![own_bundle("a", &["old", "new"], 100)],
            file: boot("a", &["old"], None, 100),
            open: true,
            now: 100,
            want: None,
        },
        Case {
            what: "nothing to compare with: an open incident stays open",
            servers: vec![down.clone()],
            agents: vec![],
            file: boot("a", &["old"], None, 100),
            open: true,
            now: 100,
            want: Some(false),
        },
        Case {
            what: "nothing to compare with: nothing opens",
            servers: vec![down],
            agents: vec![],
            file: boot("a", &["old"], None, 100),
            open: false,
            now: 100,
            want: None,
        },
        Case {
            what: "an old file view is blind",
            servers: vec![revoked.clone()],
            agents: vec![],
            file: boot("a", &["old"], None, 30),
            open: false,
            now: 100,
            want: Some(true),
        },
        Case {
            what: "an old server view is blind",
            servers: vec![revoked],
            agents: vec![],
            file: boot("a", &["old"], None, 200),
            open: false,
            // The server view is from t(100).
            now: 200,
            want: Some(true),
        },
    ];
    for c in cases {
        let obs = Observations {
            servers: c.servers,
            agents: c.agents,
            bootstrap_bundles: vec![c.file],
            ..Default::default()
        };
        let got = stale_boot(&obs, c.open, c.now);
        assert_eq!(got.first().map(|s| s.blind), c.want, "{}: {got:?}", c.what);
        if let Some(s) = got.first() {
            assert_eq!(s.subject, Subject::agent("a"), "{}", c.what);
            assert_eq!(s.severity, Severity::Warning, "{}", c.what);
        }
    }
}

#[test]
fn bootstrap_bundle_stale_evidence_and_unread_files() {
    let mut s = (*server("s1", true, vec![], &["old", "new"])).clone();
    s.bundle[0].tainted = true;
    let obs = Observations {
        servers: vec![Arc::new(s)],
        bootstrap_bundles: vec![boot("a", &["old", "gone"], None, 100)],
        ..Default::default()
    };
    let got = stale_boot(&obs, false, 100);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].evidence,
        serde_json::json!({
            "path": "/etc/spire/a/bundle.pem",
            "error": null,
            "file_authorities": 2,
            "reference": "server:s1",
            "current_authorities": 1,
            "tainted_in_file": 1,
        })
    );
    assert_eq!(got[0].predicted_outage, None);
    let unreadable = Observations {
        bootstrap_bundles: vec![boot("a", &[], Some("truncated"), 100)],
        ..Default::default()
    };
    let got = stale_boot(&unreadable, false, 100);
    assert_eq!(got[0].evidence["error"], "truncated");
    assert_eq!(got[0].evidence["reference"], serde_json::Value::Null);
    // A file not read yet says nothing.
    let mut unread = (*boot("a", &[], None, 100)).clone();
    unread.read = false;
    let obs = Observations {
        bootstrap_bundles: vec![Arc::new(unread)],
        ..Default::default()
    };
    assert!(stale_boot(&obs, true, 100).is_empty());
}

#[test]
fn stale_views_are_blind() {
    let obs = Observations {
        agent_debug: vec![debug("a", 0, 50)],
        ..Default::default()
    };
    let got = run(&obs, 100);
    assert!(got.iter().all(|s| s.blind), "{got:?}");
}

#[test]
fn a_refusal_is_explained_by_what_the_servers_hold() {
    let refusal = || Symptom {
        kind: SymptomKind::IdentityNotIssued,
        subject: Subject::agent("a"),
        severity: Severity::Critical,
        predicted_outage: None,
        evidence: json!({}),
        blind: false,
    };
    let with_lookup = |entries: Option<Vec<EntrySummary>>, reachable: bool| {
        let mut s = (*server("s1", reachable, vec![], &["f"])).clone();
        s.entry_lookups = vec![EntryLookup {
            agent: "a".into(),
            spiffe_id: "spiffe://td/w".into(),
            alias: false,
            error: entries.is_none().then(|| "unavailable".into()),
            entries,
        }];
        Observations {
            servers: vec![Arc::new(s)],
            ..Default::default()
        }
    };
    let entry = EntrySummary {
        id: "e1".into(),
        parent_id: "spiffe://td/node/0".into(),
        selectors: vec!["unix:uid:1000".into()],
    };
    // (lookup, server reachable, entry, cause contains)
    for (entries, reachable, want, says) in [
        (Some(vec![]), true, "missing", "spiffe://td/w is gone"),
        (
            Some(vec![entry.clone()]),
            true,
            "not_matching",
            "unix:uid:1000",
        ),
        (None, true, "unknown", "no server lookup"),
        (Some(vec![]), false, "unknown", "no server lookup"),
    ] {
        let obs = with_lookup(entries, reachable);
        let mut s = vec![refusal()];
        explain_refusals(&obs, &mut s);
        assert_eq!(s[0].evidence["entry"], want, "{:?}", s[0].evidence);
        assert!(
            s[0].evidence["cause"].as_str().unwrap().contains(says),
            "{:?}",
            s[0].evidence
        );
    }
    // Other symptoms and other agents' lookups are left alone.
    let obs = with_lookup(Some(vec![]), true);
    let mut s = vec![Symptom {
        subject: Subject::agent("b"),
        ..refusal()
    }];
    explain_refusals(&obs, &mut s);
    assert_eq!(s[0].evidence["entry"], "unknown");
}

fn not_renewing(obs: &Observations, th: &Thresholds, ttls: &LearnedTtls, now: u64) -> Vec<Symptom> {
    control_plane(obs, obs.servers.len(), &|_| false, th, ttls, t(now))
        .into_iter()
        .filter(|s| s.kind == SymptomKind::AgentNotRenewing)
        .collect()
}

#[test]
fn not_renewing_is_judged_by_the_servers_learned_ttl() {
    // 10 min TTL, learned 599 s. A healthy agent renews with at least 45 %
    // of its 610 s lifetime (notBefore is backdated 10 s) left, 274 s; the
    // server lists the new serial a sync later: a, 265 s left, is healthy.
    // b stopped renewing and has 200 s left, c 50 s.
    let obs = Observations {
        servers: vec![server(
            "s1",
            true,
            vec![
                listed("a", 100 + 265, false),
                listed("b", 100 + 200, false),
                listed("c", 100 + 50, false),
            ],
            &["f1"],
        )],
        ..Default::default()
    };
    let ten_min = learned(599, TtlSource::Learned);
    let got = not_renewing(&obs, &th(), &ten_min, 100);
    let subjects: Vec<String> = got.iter().map(|s| s.subject.to_string()).collect();
    assert_eq!(subjects.len(), 2, "{got:#?}");
    let b = got
        .iter()
        .find(|s| s.evidence["spiffe_id"] == "spiffe://td/spire/agent/join_token/b")
        .unwrap();
    assert_eq!(b.evidence["ttl_secs"], 599);
    assert_eq!(b.evidence["ttl_source"], "learned");
    assert_eq!(b.evidence["ttl_share_left"], 0.334);
    assert_eq!(b.severity, Severity::Warning);
    let c = got
        .iter()
        .find(|s| s.evidence["spiffe_id"] == "spiffe://td/spire/agent/join_token/c")
        .unwrap();
    // Less than a tenth of the learned TTL left.
    assert_eq!(c.severity, Severity::Critical);
    // Judged by a 1 h TTL instead, the healthy agent would be flagged too.
    assert_eq!(not_renewing(&obs, &th(), &hour(), 100).len(), 3);
}

/// A 30 s agent SVID renewed with 38 % left (SPIRE's rotator looks every
/// few seconds) is healthy under the check slack; one with 5 % left is not.
#[test]
fn not_renewing_allows_the_check_slack_on_short_ttls() {
    let obs = Observations {
        servers: vec![server(
            "s1",
            true,
            vec![listed("a", 100 + 11, false), listed("b", 100 + 2, false)],
            &[],
        )],
        ..Default::default()
    };
    let thirty = learned(30, TtlSource::Learned);
    let builtin = Policy::builtin().unwrap().thresholds;
    let got = not_renewing(&obs, &builtin, &thirty, 100);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        got[0].evidence["spiffe_id"],
        "spiffe://td/spire/agent/join_token/b"
    );
    // Without the slack, both are flagged.
    assert_eq!(not_renewing(&obs, &th(), &thirty, 100).len(), 2);
}

#[test]
fn the_policy_ttl_overrides_what_is_learned() {
    let obs = Observations {
        servers: vec![server(
            "s1",
            true,
            vec![listed("a", 100 + 1000, false)],
            &[],
        )],
        ..Default::default()
    };
    let ten_min = learned(599, TtlSource::Learned);
    assert!(not_renewing(&obs, &th(), &ten_min, 100).is_empty());
    let mut th = th();
    th.agent_svid_ttl = Some(Duration::from_secs(3600));
    let got = not_renewing(&obs, &th, &ten_min, 100);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].evidence["ttl_secs"], 3600);
    assert_eq!(got[0].evidence["ttl_source"], "policy");
}

#[test]
fn an_unknown_ttl_judges_only_expired_svids() {
    let obs = Observations {
        servers: vec![server(
            "s1",
            true,
            vec![listed("a", 100 + 10, false), listed("b", 90, false)],
            &[],
        )],
        ..Default::default()
    };
    let got = not_renewing(&obs, &th(), &LearnedTtls::default(), 100);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        got[0].evidence["spiffe_id"],
        "spiffe://td/spire/agent/join_token/b"
    );
    assert_eq!(got[0].evidence["ttl_secs"], serde_json::Value::Null);
    assert_eq!(got[0].severity, Severity::Critical);
}

#[test]
fn sync_stale_severity_uses_the_listing_servers_ttl() {
    // Agent a's SVID expires in 100 s: more than a tenth of a 10 min TTL
    // (warning), less than a tenth of 1 h (critical).
    let mut d = (*debug("a", 0, 100)).clone();
    d.svid_expires_at = Some(t(200));
    let obs = Observations {
        agent_debug: vec![Arc::new(d)],
        servers: vec![server("s1", true, vec![listed("a", 1000, false)], &[])],
        ..Default::default()
    };
    let stale = |ttls: &LearnedTtls| {
        control_plane(&obs, 1, &|_| false, &th(), ttls, t(100))
            .into_iter()
            .find(|s| s.kind == SymptomKind::AgentSyncStale)
            .unwrap()
            .severity
    };
    assert_eq!(stale(&learned(600, TtlSource::Learned)), Severity::Warning);
    assert_eq!(stale(&hour()), Severity::Critical);
}

/// Agent `agent`'s metrics view: sync counters that last rose at
/// `ok_seen` and were read at `read`.
fn counters(
    agent: &str,
    ok_seen: u64,
    read: u64,
    reachable: bool,
) -> Arc<crate::model::MetricsView> {
    Arc::new(crate::model::MetricsView {
        target: agent.into(),
        role: Role::Agent,
        reachable,
        last_error: None,
        updated_at: t(read),
        samples: Vec::new(),
        sync: Some(SyncCounters {
            ok: 10.0,
            failed: 3.0,
            failed_at_ok: 1.0,
            ok_seen_at: t(ok_seen),
            read_at: t(read),
            uptime_ms: Some(1e6),
        }),
    })
}

/// The agent's sync counters open `agent_sync_stale` before its cached
/// Debug answer shows the age, and it closes only when both are fresh.
#[test]
fn sync_counters_open_sync_loss_before_the_debug_answer_and_both_close_it() {
    let open = |k: &SymptomKey| k.kind == SymptomKind::AgentSyncStale;
    let judge = |debug_sync: u64, ok_seen: u64, reachable: bool, is_open: bool| {
        // The Debug answer was computed at 100 (cached); counters read at 101.
        let obs = Observations {
            agent_debug: vec![debug("a", debug_sync, 100)],
            metrics: vec![counters("a", ok_seen, 101, reachable)],
            ..Default::default()
        };
        let none = |_: &SymptomKey| false;
        let is_open: &dyn Fn(&SymptomKey) -> bool = if is_open { &open } else { &none };
        control_plane(&obs, 0, is_open, &th(), &hour(), t(101))
    };
    // Debug says 4 s, the counters 9 s: opens, on the counters' word.
    let got = judge(96, 92, true, false);
    assert_eq!(
        kinds(&got),
        vec![(SymptomKind::AgentSyncStale, "agent:a".into())]
    );
    assert_eq!(got[0].evidence["signal"], "agent_metrics_sync_counters");
    assert_eq!(got[0].evidence["metrics_confirmed_age_ms"], 9_000);
    assert_eq!(got[0].evidence["metrics_failed_syncs"], 2.0);
    // Healthy by both: nothing.
    assert!(judge(97, 98, true, false).is_empty());
    // The counters of an endpoint that did not answer say nothing.
    assert!(judge(96, 92, false, false).is_empty());
    // Open: the Debug answer is fresh but the counters are still 7 s old
    // (between close and open): stays open; fresh counters close it.
    assert_eq!(judge(97, 94, true, true).len(), 1);
    assert!(judge(97, 97, true, true).is_empty());
    // Debug stale, counters fresh: Debug's word opens (and keeps) it.
    let got = judge(90, 100, true, false);
    assert_eq!(got[0].evidence["signal"], "agent_debug_last_sync");
}
