use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::handshake::{Counts, Source};
use crate::model::{ProbeResult, StreamStatus, SvidObservation};
use crate::policy::Policy;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn th() -> Thresholds {
    Policy::builtin().unwrap().thresholds
}

fn counts(pairs: &[(Reason, u64)]) -> Counts {
    let mut c = Counts::default();
    for (r, n) in pairs {
        c.add(*r, *n, Source::Report);
    }
    c
}

fn window(recent: &[(Reason, u64)], baseline: &[(Reason, u64)], span: u64) -> Window {
    Window {
        recent: counts(recent),
        baseline: counts(baseline),
        baseline_span: Duration::from_secs(span),
    }
}

fn run(
    windows: &HashMap<Arc<str>, Window>,
    probes: &[Arc<ProbeView>],
    files: &[Arc<CertFileView>],
    agents: &[Arc<AgentView>],
    bundle_change: Option<SystemTime>,
    open: &[SymptomKey],
    now: SystemTime,
) -> Vec<Symptom> {
    let open: HashSet<SymptomKey> = open.iter().cloned().collect();
    let input = HandshakeInput {
        windows,
        probes,
        cert_files: files,
        agents,
        last_bundle_change: bundle_change,
        last_rotation: None,
        last_issuer_change: None,
    };
    handshakes(&input, &|k| open.contains(k), &th(), now)
}

fn burst_key(peer: &str, reason: Reason) -> SymptomKey {
    SymptomKey {
        kind: SymptomKind::HandshakeFailureBurst,
        subject: Subject::handshakes(peer, reason),
    }
}

#[test]
fn burst_opens_and_closes_with_hysteresis() {
    use Reason::*;
    let k = burst_key("web", UnknownCa);
    // (recent, baseline, open before?, active after?)
    type Case<'a> = (&'a [(Reason, u64)], &'a [(Reason, u64)], bool, bool);
    let cases: &[Case<'_>] = &[
        // Quiet traffic: nothing.
        (&[(Ok, 100)], &[(Ok, 2000)], false, false),
        // 50 of 150 fail, baseline clean: opens.
        (&[(Ok, 100), (UnknownCa, 50)], &[(Ok, 2000)], false, true),
        // Too few failures to open…
        (&[(Ok, 10), (UnknownCa, 9)], &[(Ok, 200)], false, false),
        // … but enough to stay open (above the close bound).
        (&[(Ok, 10), (UnknownCa, 9)], &[(Ok, 200)], true, true),
        // Small share: does not open.
        (&[(Ok, 1000), (UnknownCa, 50)], &[(Ok, 20000)], false, false),
        // Chronic failures at the same rate as the baseline: no burst.
        (
            &[(Ok, 100), (UnknownCa, 50)],
            &[(Ok, 2000), (UnknownCa, 1000)],
            false,
            false,
        ),
        // Open, failures down to the close bound: closes.
        (&[(Ok, 100), (UnknownCa, 2)], &[(Ok, 2000)], true, false),
        // Open, share down to 5 %: closes.
        (&[(Ok, 1000), (UnknownCa, 50)], &[(Ok, 2000)], true, false),
    ];
    for (i, (recent, baseline, was_open, want)) in cases.iter().enumerate() {
        let w = HashMap::from([(Arc::from("web"), window(recent, baseline, 600))]);
        let open: Vec<SymptomKey> = if *was_open { vec![k.clone()] } else { vec![] };
        let got = run(&w, &[], &[], &[], None, &open, t(1000));
        assert_eq!(got.iter().any(|s| s.key() == k), *want, "case {i}");
    }
}

#[test]
fn burst_reason_and_cause_are_in_the_evidence() {
    let w = HashMap::from([(
        Arc::from("web"),
        window(&[(Reason::Ok, 10), (Reason::UnknownCa, 40)], &[], 0),
    )]);
    // No rotation behind it: foreign or misconfigured, not remediable.
    let s = run(&w, &[], &[], &[], None, &[], t(1000));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].subject, Subject::handshakes("web", Reason::UnknownCa));
    assert_eq!(s[0].severity, Severity::Critical);
    assert_eq!(s[0].evidence["reason"], "unknown_ca");
    assert_eq!(s[0].evidence["correlated_with_rotation"], false);
    assert_eq!(
        s[0].evidence["likely_cause"],
        "foreign_or_misconfigured_peer"
    );
    assert_eq!(s[0].evidence["remediable"], false);
    assert_eq!(s[0].evidence["sources"], json!(["report"]));
    // A bundle change two minutes before: a peer holds a stale bundle.
    let s = run(&w, &[], &[], &[], Some(t(880)), &[], t(1000));
    assert_eq!(s[0].evidence["correlated_with_rotation"], true);
    assert_eq!(s[0].evidence["likely_cause"], "peer_holds_stale_bundle");
    assert_eq!(s[0].evidence["remediable"], true);
    // A bundle change long ago (an hour, past correlate_within) explains
    // nothing.
    let s = run(&w, &[], &[], &[], Some(t(1)), &[], t(3700));
    assert_eq!(s[0].evidence["remediable"], false);
}

#[test]
fn each_failing_reason_is_its_own_symptom() {
    let w = HashMap::from([(
        Arc::from("web"),
        window(&[(Reason::Timeout, 20), (Reason::Expired, 20)], &[], 0),
    )]);
    let s = run(&w, &[], &[], &[], None, &[], t(1000));
    let subjects: Vec<_> = s.iter().map(|s| s.subject.to_string()).collect();
    assert_eq!(
        subjects,
        vec!["handshakes:web/expired", "handshakes:web/timeout"]
    );
}

fn peer_cert(serial: &str, nb: u64, na: u64) -> PeerCert {
    PeerCert {
        spiffe_id: Some("spiffe://td/web".into()),
        serial: serial.into(),
        not_before: t(nb),
        not_after: t(na),
    }
}

fn probe(served: Option<PeerCert>, at: u64, cert_file: Option<&str>) -> Arc<ProbeView> {
    let result = ProbeResult {
        reason: Reason::Ok,
        at: t(at),
        latency: Duration::from_millis(3),
        peer: served,
        detail: None,
        peer_refused: false,
    };
    Arc::new(ProbeView {
        target: "web".into(),
        address: "127.0.0.1:8443".into(),
        expected_id: None,
        cert_file: cert_file.map(str::to_string),
        last: Some(result.clone()),
        last_peer: Some(result),
        updated_at: t(at),
    })
}

fn agent_serving(serial: &str, nb: u64, na: u64, first_seen: u64) -> Arc<AgentView> {
    Arc::new(AgentView {
        agent: "a".into(),
        status: StreamStatus::Up,
        status_since: t(0),
        last_error: None,
        last_message: Some(t(first_seen)),
        svids: vec![SvidObservation {
            spiffe_id: "spiffe://td/web".into(),
            serial: serial.into(),
            not_before: t(nb),
            not_after: t(na),
            invalid: None,
            first_seen: t(first_seen),
            issuer: String::new(),
        }],
        bundle_authorities: 1,
        bundle: Vec::new(),
        rotations: 1,
        updated_at: t(first_seen),
    })
}

#[test]
fn stale_served_cert_against_the_workload_api() {
    let key = SymptomKey {
        kind: SymptomKind::StaleServedCert,
        subject: Subject::peer("web"),
    };
    let agents = [agent_serving("0b", 500, 1500, 510)];
    let old = probe(Some(peer_cert("0a", 0, 1000)), 600, None);
    // Issued at 510; within the reload grace (30 s) nothing yet.
    let s = run(
        &HashMap::new(),
        std::slice::from_ref(&old),
        &[],
        &agents,
        None,
        &[],
        t(530),
    );
    assert!(s.is_empty(), "{s:?}");
    // Past the grace: stale, predicted outage at the served notAfter.
    let s = run(
        &HashMap::new(),
        std::slice::from_ref(&old),
        &[],
        &agents,
        None,
        &[],
        t(600),
    );
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].key(), key);
    assert_eq!(s[0].predicted_outage, Some(t(1000)));
    assert_eq!(s[0].evidence["served_serial"], "0a");
    assert_eq!(s[0].evidence["expected_serial"], "0b");
    assert_eq!(s[0].evidence["expected_source"], "workload_api");
    assert_eq!(s[0].severity, Severity::Warning);
    assert!(!s[0].blind);
    // Served cert expired: critical.
    let s = run(
        &HashMap::new(),
        std::slice::from_ref(&old),
        &[],
        &agents,
        None,
        &[],
        t(1001),
    );
    assert_eq!(s[0].severity, Severity::Critical);
    // Probe too old: blind.
    let s = run(&HashMap::new(), &[old], &[], &agents, None, &[], t(700));
    assert!(s[0].blind);
    // The peer reloaded: clears, open or not.
    let new = probe(Some(peer_cert("0b", 500, 1500)), 620, None);
    let s = run(&HashMap::new(), &[new], &[], &agents, None, &[key], t(620));
    assert!(s.is_empty());
    // A peer we cannot match to an issued identity says nothing.
    let mut other = peer_cert("0a", 0, 1000);
    other.spiffe_id = Some("spiffe://td/other".into());
    let s = run(
        &HashMap::new(),
        &[probe(Some(other), 600, None)],
        &[],
        &agents,
        None,
        &[],
        t(600),
    );
    assert!(s.is_empty());
}

fn file(
    leaf: Option<PeerCert>,
    error: Option<&str>,
    changed: u64,
    updated: u64,
) -> Arc<CertFileView> {
    Arc::new(CertFileView {
        file: "web-svid".into(),
        path: "/run/web/svid.pem".into(),
        agent: Some("a".into()),
        error: error.map(str::to_string),
        leaf,
        invalid: None,
        bundle: Vec::new(),
        bundle_error: None,
        changed_at: t(changed),
        updated_at: t(updated),
    })
}

#[test]
fn stale_served_cert_against_a_cert_file() {
    // The file was rewritten at 550 with 0b; the peer still serves 0a.
    let files = [file(Some(peer_cert("0b", 500, 1500)), None, 550, 600)];
    let p = probe(Some(peer_cert("0a", 0, 1000)), 600, Some("web-svid"));
    let s = run(
        &HashMap::new(),
        std::slice::from_ref(&p),
        &files,
        &[],
        None,
        &[],
        t(600),
    );
    let served: Vec<_> = s
        .iter()
        .filter(|s| s.kind == SymptomKind::StaleServedCert)
        .collect();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].evidence["expected_source"], "cert_file");
    // A half-written file is no reference.
    let files = [file(
        Some(peer_cert("0b", 500, 1500)),
        Some("truncated"),
        550,
        600,
    )];
    let s = run(&HashMap::new(), &[p], &files, &[], None, &[], t(600));
    assert!(s.iter().all(|s| s.kind != SymptomKind::StaleServedCert));
}

#[test]
fn stale_cert_file_cases() {
    let key = SymptomKey {
        kind: SymptomKind::StaleCertFile,
        subject: Subject::cert_file("web-svid"),
    };
    let agents = [agent_serving("0b", 500, 1500, 510)];
    let problem = |s: &[Symptom]| {
        s.iter()
            .find(|s| s.key() == key)
            .map(|s| s.evidence["problem"].as_str().unwrap_or("").to_string())
    };
    // Up to date.
    let f = file(Some(peer_cert("0b", 500, 1500)), None, 520, 600);
    assert_eq!(
        problem(&run(&HashMap::new(), &[], &[f], &agents, None, &[], t(600))),
        None
    );
    // Behind what the agent issued, past the grace.
    let f = file(Some(peer_cert("0a", 0, 1000)), None, 10, 600);
    assert_eq!(
        problem(&run(
            &HashMap::new(),
            &[],
            std::slice::from_ref(&f),
            &agents,
            None,
            &[],
            t(600)
        ))
        .as_deref(),
        Some("behind_issued")
    );
    // … within the grace, not yet.
    assert_eq!(
        problem(&run(&HashMap::new(), &[], &[f], &agents, None, &[], t(520))),
        None
    );
    // Expired, even with no issued view.
    let f = file(Some(peer_cert("0a", 0, 1000)), None, 10, 1100);
    assert_eq!(
        problem(&run(&HashMap::new(), &[], &[f], &[], None, &[], t(1100))).as_deref(),
        Some("expired")
    );
    // Half-written: only once it stays so past the grace.
    let f = file(
        Some(peer_cert("0b", 500, 1500)),
        Some("truncated"),
        590,
        600,
    );
    assert_eq!(
        problem(&run(
            &HashMap::new(),
            &[],
            std::slice::from_ref(&f),
            &agents,
            None,
            &[],
            t(600)
        )),
        None
    );
    assert_eq!(
        problem(&run(&HashMap::new(), &[], &[f], &agents, None, &[], t(640))).as_deref(),
        Some("unreadable")
    );
    // Another agent's issuance does not count when the file names its agent.
    let mut other = (*agents[0]).clone();
    other.agent = "b".into();
    let f = file(Some(peer_cert("0a", 0, 1000)), None, 10, 600);
    assert_eq!(
        problem(&run(
            &HashMap::new(),
            &[],
            &[f],
            &[Arc::new(other)],
            None,
            &[],
            t(600)
        )),
        None
    );
}

#[test]
fn an_unverified_leaf_never_makes_a_peer_stale() {
    let agents = [agent_serving("0b", 500, 1500, 510)];
    let mut p = (*probe(Some(peer_cert("0a", 0, 1000)), 600, None)).clone();
    if let Some(r) = p.last_peer.as_mut() {
        r.reason = Reason::UnknownCa;
    }
    let s = run(
        &HashMap::new(),
        &[Arc::new(p)],
        &[],
        &agents,
        None,
        &[],
        t(600),
    );
    assert!(s.is_empty(), "{s:?}");
}

#[test]
fn a_peer_serving_another_nodes_current_svid_is_not_stale() {
    // The same ID on two nodes: node b rotated later than node a.
    let a = agent_serving("0b", 500, 1500, 510);
    let mut b = (*agent_serving("0c", 550, 1550, 560)).clone();
    b.agent = "b".into();
    let agents = [a, Arc::new(b)];
    let p = probe(Some(peer_cert("0b", 500, 1500)), 700, None);
    let s = run(&HashMap::new(), &[p], &[], &agents, None, &[], t(700));
    assert!(s.is_empty(), "{s:?}");
    // Older than both: stale, the newest is what it should serve.
    let p = probe(Some(peer_cert("0a", 0, 1000)), 700, None);
    let s = run(&HashMap::new(), &[p], &[], &agents, None, &[], t(700));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].evidence["expected_serial"], "0c");
}

#[test]
fn an_open_burst_with_no_traffic_stays_blind() {
    let k = burst_key("web", Reason::UnknownCa);
    let w = HashMap::from([(
        Arc::from("web"),
        window(&[], &[(Reason::UnknownCa, 50)], 600),
    )]);
    let s = run(&w, &[], &[], &[], None, std::slice::from_ref(&k), t(1000));
    assert_eq!(s.len(), 1);
    assert!(s[0].blind);
    assert_eq!(s[0].evidence["no_traffic"], true);
    // Not open: nothing.
    assert!(run(&w, &[], &[], &[], None, &[], t(1000)).is_empty());
}

#[test]
fn a_peer_refusing_our_current_certificate_holds_a_stale_bundle() {
    let w = HashMap::from([(
        Arc::from("web"),
        window(&[(Reason::Ok, 10), (Reason::UnknownCa, 40)], &[], 0),
    )]);
    let mut p = (*probe(None, 1000, None)).clone();
    p.last = Some(ProbeResult {
        reason: Reason::UnknownCa,
        at: t(1000),
        latency: Duration::from_millis(2),
        peer: None,
        detail: Some("the peer refused the handshake: alert BadCertificate".into()),
        peer_refused: true,
    });
    // No bundle change anywhere near: the CA was prepared hours ago.
    let s = run(&w, &[Arc::new(p)], &[], &[], Some(t(1)), &[], t(9000));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].evidence["likely_cause"], "peer_holds_stale_bundle");
    assert_eq!(s[0].evidence["peer_refused_us"], true);
    assert_eq!(s[0].evidence["remediable"], true);
}

#[test]
fn a_ca_activation_explains_an_unknown_ca_burst() {
    let w = HashMap::from([(
        Arc::from("web"),
        window(&[(Reason::Ok, 10), (Reason::UnknownCa, 40)], &[], 0),
    )]);
    let input = HandshakeInput {
        windows: &w,
        probes: &[],
        cert_files: &[],
        agents: &[],
        // The bundle changed hours ago, when the CA was prepared …
        last_bundle_change: Some(t(1)),
        last_rotation: Some(t(8900)),
        // … and our SVIDs started chaining to it a few minutes ago.
        last_issuer_change: Some(t(8900)),
    };
    let s = handshakes(&input, &|_| false, &th(), t(9000));
    assert_eq!(s[0].evidence["likely_cause"], "peer_holds_stale_bundle");
    assert_eq!(s[0].evidence["remediable"], true);
}
