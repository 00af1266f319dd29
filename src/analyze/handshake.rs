//! Where users feel mTLS breaking: handshakes and the certificates peers
//! actually hold. Pure: a function of the inputs and `now`.
//!
//! - `handshake_failure_burst` (subject `handshakes:<peer>/<reason>`): in
//!   the recent window one failure reason is frequent, a large share of all
//!   outcomes, and well above its own baseline rate. It closes once the
//!   reason is rare again (weaker condition: hysteresis). The evidence says
//!   whether a bundle change, a CA activation (SVIDs newly signed by another
//!   CA key) or an SVID rotation came shortly before: an `unknown_ca` burst
//!   right after one of the first two means a peer holds a stale bundle
//!   (reload it), as does our own probe being refused by the peer; the same
//!   burst with nothing behind it is a foreign or misconfigured peer, which
//!   no restart here fixes.
//! - `stale_served_cert` (subject `peer:<name>`): a probed peer presents an
//!   older certificate than the newest one SPIRE issued for its SPIFFE ID
//!   (our Workload API view) or than its configured certificate file, well
//!   after that was issued: the process never reloaded.
//! - `stale_cert_file` (subject `cert_file:<name>`): a certificate file is
//!   older than what the agent issued, expired, or unreadable for longer
//!   than a reload takes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;

use crate::clock::{saturating_since, unix_millis};
use crate::handshake::{Reason, Window};
use crate::model::{
    AgentView, CertFileView, PeerCert, ProbeView, Severity, Subject, Symptom, SymptomKey,
    SymptomKind,
};
use crate::policy::Thresholds;

/// What the handshake analysis looks at.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeInput<'a> {
    /// Outcome windows per target (from every source).
    pub windows: &'a HashMap<Arc<str>, Window>,
    /// Active probe views.
    pub probes: &'a [Arc<ProbeView>],
    /// Certificate-file views.
    pub cert_files: &'a [Arc<CertFileView>],
    /// Workload API views: what SPIRE issued.
    pub agents: &'a [Arc<AgentView>],
    /// Last time a trust bundle was seen to change (any agent or server).
    pub last_bundle_change: Option<SystemTime>,
    /// Last time a new SVID serial replaced an old one (any agent).
    pub last_rotation: Option<SystemTime>,
    /// Last time a rotation brought an SVID signed by another CA key (a CA
    /// activation: SVIDs peers see start chaining to the new CA).
    pub last_issuer_change: Option<SystemTime>,
}

/// Handshake, served-certificate and certificate-file symptoms at `now`.
pub fn handshakes(
    input: &HandshakeInput<'_>,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
) -> Vec<Symptom> {
    let mut out = Vec::new();
    bursts(input, is_open, th, now, &mut out);
    // Only the SPIFFE IDs a peer serves or a file holds are looked up, so
    // only those are indexed: an instance watching no peer and no file
    // touches no SVID here.
    let wanted: HashSet<&str> = input
        .probes
        .iter()
        .filter_map(|p| p.last_peer.as_ref()?.peer.as_ref()?.spiffe_id.as_deref())
        .chain(
            input
                .cert_files
                .iter()
                .filter_map(|f| f.leaf.as_ref()?.spiffe_id.as_deref()),
        )
        .collect();
    let issued = newest_issued(input.agents, &wanted);
    let files: HashMap<&str, &CertFileView> = input
        .cert_files
        .iter()
        .map(|f| (f.file.as_str(), &**f))
        .collect();
    for p in input.probes {
        if let Some(s) = stale_served(p, &issued, &files, is_open, th, now) {
            out.push(s);
        }
    }
    for f in input.cert_files {
        if let Some(s) = stale_file(f, &issued, is_open, th, now) {
            out.push(s);
        }
    }
    out
}

// === handshake_failure_burst ===

fn bursts(
    input: &HandshakeInput<'_>,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
    out: &mut Vec<Symptom>,
) {
    let window_secs = th.burst_window.as_secs_f64().max(1e-3);
    let recently = |t: Option<SystemTime>| {
        t.is_some_and(|t| t <= now && saturating_since(now, t) <= th.correlate_within)
    };
    // The bundle changes when SPIRE prepares a CA, hours before it signs;
    // peers holding the old bundle fail once SVIDs signed by the new CA
    // reach them, which our own SVIDs show as an issuer change.
    let bundle_changed = recently(input.last_bundle_change) || recently(input.last_issuer_change);
    let rotated = recently(input.last_rotation);
    // Probes whose last failure was the peer refusing *us*.
    let refused_us: HashMap<&str, Reason> = input
        .probes
        .iter()
        .filter_map(|p| {
            let last = p.last.as_ref()?;
            (last.peer_refused && last.reason.is_failure())
                .then_some((p.target.as_str(), last.reason))
        })
        .collect();
    let mut targets: Vec<(&Arc<str>, &Window)> = input.windows.iter().collect();
    targets.sort_by(|a, b| a.0.cmp(b.0));
    for (target, w) in targets {
        let attempts = w.recent.total();
        for reason in Reason::ALL.into_iter().filter(|r| r.is_failure()) {
            let failures = w.recent.get(reason);
            let key = SymptomKey {
                kind: SymptomKind::HandshakeFailureBurst,
                subject: Subject::handshakes(&**target, reason),
            };
            // No outcomes at all in the window says nothing (the reporters
            // stopped dialling): an open burst stays, blind, rather than
            // "clearing" and verifying whatever ran last.
            let quiet = attempts == 0 && is_open(&key);
            if failures == 0 && !quiet {
                continue;
            }
            let share = failures as f64 / attempts.max(1) as f64;
            let rate = failures as f64 / window_secs;
            let baseline_rate = if w.baseline_span.is_zero() {
                0.0
            } else {
                w.baseline.get(reason) as f64 / w.baseline_span.as_secs_f64()
            };
            let active = if quiet {
                true
            } else if is_open(&key) {
                failures > th.burst_close_failures && share > th.burst_close_share
            } else {
                failures >= th.burst_open_failures
                    && share >= th.burst_open_share
                    && rate >= th.burst_factor * baseline_rate
            };
            if !active {
                continue;
            }
            let peer_refused_us = refused_us.get(&**target) == Some(&reason);
            let (correlated, cause) =
                if peer_refused_us && matches!(reason, Reason::UnknownCa | Reason::BadSpiffeId) {
                    // Our probe's chain is current (it comes from the agent):
                    // a peer that rejects it lacks our CA, whenever the bundle
                    // changed (CAs are prepared hours before they sign).
                    (bundle_changed, "peer_holds_stale_bundle")
                } else {
                    cause_of(reason, bundle_changed, rotated)
                };
            out.push(Symptom {
                kind: key.kind,
                subject: key.subject,
                severity: if share >= 0.5 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                predicted_outage: None,
                evidence: json!({
                    "peer": &**target,
                    "reason": reason.as_str(),
                    "failures": failures,
                    "attempts": attempts,
                    "share": share,
                    "rate_per_s": rate,
                    "baseline_rate_per_s": baseline_rate,
                    "sources": w.recent.source_names(),
                    "last_bundle_change_ms": input.last_bundle_change.map(unix_millis),
                    "last_rotation_ms": input.last_rotation.map(unix_millis),
                    "last_issuer_change_ms": input.last_issuer_change.map(unix_millis),
                    "correlated_with_rotation": correlated,
                    "peer_refused_us": peer_refused_us,
                    "likely_cause": cause,
                    "remediable": remediable(cause),
                    "no_traffic": quiet,
                }),
                blind: quiet,
            });
        }
    }
}

/// Whether a recent rotation explains a burst of `reason`, and the likely
/// cause (a closed set, recorded as evidence and read by `plan`).
fn cause_of(reason: Reason, bundle_changed: bool, rotated: bool) -> (bool, &'static str) {
    match reason {
        Reason::UnknownCa | Reason::BadSpiffeId if bundle_changed => {
            (true, "peer_holds_stale_bundle")
        }
        Reason::UnknownCa | Reason::BadSpiffeId => (false, "foreign_or_misconfigured_peer"),
        Reason::Expired | Reason::NotYetValid => (rotated, "peer_serves_stale_certificate"),
        Reason::NoClientCert => (rotated, "peer_holds_no_certificate"),
        Reason::Refused | Reason::Timeout | Reason::Protocol | Reason::Ok => {
            (false, "peer_unavailable")
        }
    }
}

/// Whether reloading or restarting the peer can fix that cause. A foreign
/// CA or an unavailable peer is reported, never "healed" by restarts of
/// processes that are fine.
pub fn remediable(cause: &str) -> bool {
    matches!(
        cause,
        "peer_holds_stale_bundle" | "peer_serves_stale_certificate" | "peer_holds_no_certificate"
    )
}

// === served versus issued ===

/// The newest SVID issued per SPIFFE ID (latest notBefore), with when it
/// was first delivered and by which agent.
struct Issued<'a> {
    serial: &'a str,
    not_before: SystemTime,
    first_seen: SystemTime,
    agent: &'a str,
}

/// Every SVID currently served per SPIFFE ID, one per agent serving it
/// (the same ID may be registered on several nodes, each rotating on its
/// own schedule).
fn newest_issued<'a>(
    agents: &'a [Arc<AgentView>],
    wanted: &HashSet<&str>,
) -> HashMap<&'a str, Vec<Issued<'a>>> {
    let mut out: HashMap<&str, Vec<Issued<'_>>> = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    for v in agents {
        for s in v.svids.iter().filter(|s| !s.serial.is_empty()) {
            if !wanted.contains(s.spiffe_id.as_str()) {
                continue;
            }
            out.entry(&s.spiffe_id).or_default().push(Issued {
                serial: &s.serial,
                not_before: s.not_before,
                first_seen: s.first_seen,
                agent: &v.agent,
            });
        }
    }
    out
}

/// What a peer or file should hold: serial, notBefore, since when, where from.
struct Expected<'a> {
    serial: &'a str,
    not_before: SystemTime,
    since: SystemTime,
    source: &'static str,
    from: &'a str,
}

fn stale_served(
    p: &ProbeView,
    issued: &HashMap<&str, Vec<Issued<'_>>>,
    files: &HashMap<&str, &CertFileView>,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
) -> Option<Symptom> {
    let seen = p.last_peer.as_ref()?;
    // Only a certificate that verified (or did, but for its dates) says what
    // the peer serves; an impostor's or a foreign CA's leaf never drives
    // actions on the peer (that is a burst, held as `no_local_cause`).
    if !matches!(seen.reason, Reason::Ok | Reason::Expired) {
        return None;
    }
    let served = seen.peer.as_ref()?;
    let expected = match p.cert_file.as_deref() {
        Some(name) => {
            let f = files.get(name)?;
            let leaf = f.leaf.as_ref().filter(|_| f.error.is_none())?;
            Expected {
                serial: &leaf.serial,
                not_before: leaf.not_before,
                since: f.changed_at,
                source: "cert_file",
                from: &f.file,
            }
        }
        None => {
            // Behind only if it serves none of the current SVIDs of its ID
            // and is older than every one of them (any node's may be it).
            let all = issued.get(served.spiffe_id.as_deref()?)?;
            if all.iter().any(|i| i.serial == served.serial) {
                return None;
            }
            let newest = all.iter().max_by_key(|i| i.not_before)?;
            let oldest = all.iter().min_by_key(|i| i.not_before)?;
            Expected {
                serial: newest.serial,
                not_before: oldest.not_before,
                since: all.iter().map(|i| i.first_seen).max()?,
                source: "workload_api",
                from: newest.agent,
            }
        }
    };
    let key = SymptomKey {
        kind: SymptomKind::StaleServedCert,
        subject: Subject::peer(&p.target),
    };
    let behind = served.serial != expected.serial && served.not_before < expected.not_before;
    let active = if is_open(&key) {
        behind
    } else {
        behind && saturating_since(now, expected.since) >= th.reload_grace
    };
    if !active {
        return None;
    }
    Some(Symptom {
        kind: key.kind,
        subject: key.subject,
        severity: expiry_severity(served, now),
        predicted_outage: Some(served.not_after),
        evidence: json!({
            "peer": p.target,
            "address": p.address,
            "spiffe_id": served.spiffe_id,
            "served_serial": served.serial,
            "served_not_after_ms": unix_millis(served.not_after),
            "expected_serial": expected.serial,
            "expected_source": expected.source,
            "expected_from": expected.from,
            "issued_since_ms": unix_millis(expected.since),
            "probed_ms": unix_millis(seen.at),
        }),
        blind: saturating_since(now, p.updated_at) > th.probe_max_staleness,
    })
}

fn expiry_severity(cert: &PeerCert, now: SystemTime) -> Severity {
    if cert.not_after <= now {
        Severity::Critical
    } else {
        Severity::Warning
    }
}

fn stale_file(
    f: &CertFileView,
    issued: &HashMap<&str, Vec<Issued<'_>>>,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
) -> Option<Symptom> {
    let key = SymptomKey {
        kind: SymptomKind::StaleCertFile,
        subject: Subject::cert_file(&f.file),
    };
    let settled = saturating_since(now, f.changed_at) >= th.reload_grace;
    // The newest SVID of the file's identity, from the file's own agent
    // when it names one.
    let newest = f
        .leaf
        .as_ref()
        .and_then(|l| l.spiffe_id.as_deref())
        .and_then(|id| issued.get(id))
        .and_then(|all| {
            all.iter()
                .filter(|i| f.agent.as_deref().is_none_or(|a| a == i.agent))
                .max_by_key(|i| i.not_before)
        });
    // Problems, most serious first.
    let problem = match (&f.error, &f.leaf) {
        (Some(e), _) if settled || is_open(&key) => Some(("unreadable", Some(e.as_str()))),
        (Some(_), _) => None,
        (None, None) => None,
        (None, Some(leaf)) if leaf.not_after <= now => Some(("expired", None)),
        (None, Some(leaf)) => match newest {
            Some(i) if i.serial != leaf.serial && leaf.not_before < i.not_before => {
                let waited = saturating_since(now, i.first_seen) >= th.reload_grace;
                (waited || is_open(&key)).then_some(("behind_issued", None))
            }
            _ => None,
        },
    };
    let (problem, error) = problem?;
    let leaf = f.leaf.as_ref();
    Some(Symptom {
        kind: key.kind,
        subject: key.subject,
        severity: match leaf {
            Some(l) => expiry_severity(l, now),
            None => Severity::Warning,
        },
        predicted_outage: leaf.map(|l| l.not_after),
        evidence: json!({
            "file": f.file,
            "path": f.path,
            "problem": problem,
            "error": error,
            "spiffe_id": leaf.and_then(|l| l.spiffe_id.clone()),
            "file_serial": leaf.map(|l| l.serial.clone()),
            "file_not_after_ms": leaf.map(|l| unix_millis(l.not_after)),
            "issued_serial": newest.map(|i| i.serial),
            "issued_by": newest.map(|i| i.agent),
            "changed_ms": unix_millis(f.changed_at),
        }),
        blind: saturating_since(now, f.updated_at) > th.probe_max_staleness,
    })
}

#[cfg(test)]
mod tests;
