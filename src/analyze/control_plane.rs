//! Control-plane symptoms from the server and agent admin APIs and health
//! probes. Pure: a function of the observations and `now`.
//!
//! - `agent_sync_stale`: the agent's Debug `last_sync_success` is old.
//! - `agent_not_renewing`: a server sees the agent's SVID with less than
//!   `not_renewing_open` of its TTL left (a healthy agent renews at half).
//! - `agent_banned`: a server lists the agent as banned.
//! - `server_unhealthy`: admin API unreachable or `/ready` failing.
//! - `all_servers_down`: no configured server answers.
//! - `ca_expiring`: every authority in the bundle expires soon.
//! - `bundle_divergence`: servers disagree on the bundle, or an agent's
//!   Workload API bundle differs from the servers'.
//!
//! Every symptom carries a predicted time to outage: the earliest expiry
//! that can no longer be renewed.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use serde_json::json;

use crate::clock::{saturating_since, unix_millis};
use crate::model::{
    AgentDebugView, Observations, Role, ServerAgent, ServerView, Severity, Subject, Symptom,
    SymptomKey, SymptomKind,
};
use crate::policy::Thresholds;

/// Control-plane symptoms present at `now`. `servers_configured` is how many
/// servers the configuration watches (0: no server-side view at all).
pub fn control_plane(
    obs: &Observations,
    servers_configured: usize,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    now: SystemTime,
) -> Vec<Symptom> {
    let mut out = Vec::new();
    // A server view that was never polled (no answer, no error yet) says
    // nothing: the sensor has just started.
    let servers: Vec<&ServerView> = obs
        .servers
        .iter()
        .map(|s| &**s)
        .filter(|s| s.reachable || s.last_error.is_some())
        .collect();
    let stale = |updated: SystemTime| saturating_since(now, updated) > th.max_staleness;
    // Agent SPIFFE ID → configured agent name (learned from the Debug API).
    let names: HashMap<&str, &str> = obs
        .agent_debug
        .iter()
        .filter_map(|d| d.spiffe_id.as_deref().map(|id| (id, d.agent.as_str())))
        .collect();
    let subject_of = |id: &str| Subject::agent(names.get(id).copied().unwrap_or(id));
    let workload_expiry = |agent: &str| {
        obs.agents
            .iter()
            .filter(|v| v.agent == agent)
            .flat_map(|v| v.svids.iter())
            .filter(|s| !s.serial.is_empty())
            .map(|s| s.not_after)
            .min()
    };
    let trust_domain = obs
        .agents
        .iter()
        .flat_map(|v| v.svids.iter())
        .chain(std::iter::empty())
        .find_map(|s| trust_domain_of(&s.spiffe_id))
        .or_else(|| {
            obs.agent_debug
                .iter()
                .find_map(|d| d.spiffe_id.as_deref().and_then(trust_domain_of))
        })
        .unwrap_or("spire")
        .to_string();
    let mut push = |kind: SymptomKind,
                    subject: Subject,
                    open_if: bool,
                    close_if: bool,
                    severity: Severity,
                    predicted_outage: Option<SystemTime>,
                    evidence: serde_json::Value,
                    blind: bool| {
        if !open_if && close_if {
            return;
        }
        let key = SymptomKey { kind, subject };
        if !open_if && !is_open(&key) {
            return;
        }
        out.push(Symptom {
            kind,
            subject: key.subject,
            severity,
            predicted_outage,
            evidence,
            blind,
        });
    };

    // --- agent_sync_stale -------------------------------------------------
    for d in &obs.agent_debug {
        // The last answer is kept while the Debug API is unreachable (e.g.
        // the agent is restarting): it may keep an incident open but never
        // opens or closes one.
        let Some(last) = d.last_sync_success else {
            continue;
        };
        let age = saturating_since(now, last);
        let (open_if, close_if) = (
            d.reachable && age > th.sync_stale_open,
            d.reachable && age < th.sync_stale_close,
        );
        // This runs for every agent on every tick: build nothing for the
        // healthy ones.
        if !open_if && close_if {
            continue;
        }
        let outage = earliest([d.svid_expires_at, workload_expiry(&d.agent)]);
        push(
            SymptomKind::AgentSyncStale,
            Subject::agent(&d.agent),
            open_if,
            close_if,
            severity_for(outage, now, th),
            outage,
            json!({
                "last_sync_success_ms": unix_millis(last),
                "age_ms": age.as_millis() as u64,
                "agent_svid_expires_at_ms": d.svid_expires_at.map(unix_millis),
                "spiffe_id": d.spiffe_id,
            }),
            stale(d.updated_at),
        );
    }

    // --- per-agent server view: not renewing, banned ----------------------
    // Servers share one datastore; take each agent from the freshest
    // reachable server that lists it.
    let mut listed: HashMap<&str, (&ServerAgent, &str, SystemTime)> = HashMap::new();
    for s in servers.iter().filter(|s| s.reachable) {
        for a in &s.agents {
            let e =
                listed
                    .entry(a.spiffe_id.as_str())
                    .or_insert((a, s.server.as_str(), s.updated_at));
            if s.updated_at > e.2 {
                *e = (a, s.server.as_str(), s.updated_at);
            }
        }
    }
    let ttl = th.agent_svid_ttl.as_secs_f64();
    for (id, (a, server, updated)) in &listed {
        let left = a
            .expires_at
            .duration_since(now)
            .map_or(0.0, |d| d.as_secs_f64());
        let share = left / ttl;
        let (nr_open, nr_close) = (
            !a.banned && share < th.not_renewing_open,
            a.banned || share > th.not_renewing_close,
        );
        if nr_open || !nr_close {
            push(
                SymptomKind::AgentNotRenewing,
                subject_of(id),
                nr_open,
                nr_close,
                severity_for(Some(a.expires_at), now, th),
                Some(a.expires_at),
                json!({
                    "spiffe_id": id,
                    "server": server,
                    "serial": a.serial,
                    "expires_at_ms": unix_millis(a.expires_at),
                    "ttl_share_left": (share * 1000.0).round() / 1000.0,
                }),
                stale(*updated),
            );
        }
        // Open and close conditions are disjoint: an unbanned agent never
        // keeps a ban incident open.
        if !a.banned {
            continue;
        }
        push(
            SymptomKind::AgentBanned,
            subject_of(id),
            a.banned,
            !a.banned,
            Severity::Critical,
            workload_expiry(names.get(*id).copied().unwrap_or(id)),
            json!({ "spiffe_id": id, "server": server, "can_reattest": a.can_reattest }),
            stale(*updated),
        );
    }
    // A banned agent that disappeared from the listing (deleted) is no
    // longer banned: its open incident closes because it is absent.

    // --- servers ----------------------------------------------------------
    let ready: HashMap<&str, Option<bool>> = obs
        .health
        .iter()
        .filter(|h| h.role == Role::Server)
        .map(|h| (h.target.as_str(), h.ready))
        .collect();
    let earliest_agent_expiry = obs
        .agent_debug
        .iter()
        .filter_map(|d| d.svid_expires_at)
        .chain(
            listed
                .values()
                .filter(|(a, ..)| !a.banned)
                .map(|(a, ..)| a.expires_at),
        )
        .min();
    for s in &servers {
        let not_ready = ready.get(s.server.as_str()).copied().flatten() == Some(false);
        let bad = !s.reachable || not_ready;
        push(
            SymptomKind::ServerUnhealthy,
            Subject::server(&s.server),
            bad,
            !bad,
            Severity::Warning,
            None,
            json!({
                "admin_api": if s.reachable { "up" } else { "down" },
                "last_error": s.last_error,
                "since_ms": unix_millis(s.since),
                "ready": ready.get(s.server.as_str()).copied().flatten(),
            }),
            stale(s.updated_at),
        );
    }
    if servers_configured > 0 && servers.len() == obs.servers.len() && !servers.is_empty() {
        let down = servers.iter().all(|s| !s.reachable);
        push(
            SymptomKind::AllServersDown,
            Subject::cluster(&trust_domain),
            down,
            !down,
            Severity::Critical,
            earliest_agent_expiry,
            json!({
                "servers": servers.iter().map(|s| json!({
                    "server": s.server, "last_error": s.last_error, "since_ms": unix_millis(s.since),
                })).collect::<Vec<_>>(),
            }),
            servers.iter().all(|s| stale(s.updated_at)),
        );
    }

    // --- trust bundle -----------------------------------------------------
    let reachable: Vec<_> = obs
        .servers
        .iter()
        .filter(|s| s.reachable && !s.bundle.is_empty())
        .collect();
    if let Some(first) = reachable.first() {
        let latest = first
            .bundle
            .iter()
            .filter(|a| !a.tainted)
            .map(|a| a.not_after)
            .max();
        if let Some(latest) = latest {
            let left = latest.duration_since(now).unwrap_or_default();
            push(
                SymptomKind::CaExpiring,
                Subject::cluster(&trust_domain),
                left < th.ca_expiring_within,
                left >= th.ca_expiring_within,
                if left.is_zero() {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                Some(latest),
                json!({ "server": first.server, "latest_authority_not_after_ms": unix_millis(latest) }),
                stale(first.updated_at),
            );
        }
        let reference: BTreeSet<&str> = first
            .bundle
            .iter()
            .map(|a| a.fingerprint.as_str())
            .collect();
        let servers_differ: Vec<&str> = reachable
            .iter()
            .filter(|s| {
                s.bundle
                    .iter()
                    .map(|a| a.fingerprint.as_str())
                    .collect::<BTreeSet<_>>()
                    != reference
            })
            .map(|s| s.server.as_str())
            .collect();
        push(
            SymptomKind::BundleDivergence,
            Subject::cluster(&trust_domain),
            !servers_differ.is_empty(),
            servers_differ.is_empty(),
            Severity::Warning,
            None,
            json!({ "reference": first.server, "differing_servers": servers_differ }),
            stale(first.updated_at),
        );
        for v in obs.agents.iter().filter(|v| !v.bundle.is_empty()) {
            let theirs: BTreeSet<&str> = v.bundle.iter().map(String::as_str).collect();
            let missing: Vec<&str> = reference.difference(&theirs).copied().collect();
            let extra: Vec<&str> = theirs.difference(&reference).copied().collect();
            let differs = !missing.is_empty() || !extra.is_empty();
            push(
                SymptomKind::BundleDivergence,
                Subject::agent(&v.agent),
                differs,
                !differs,
                Severity::Warning,
                workload_expiry(&v.agent),
                json!({ "reference": first.server, "missing": missing, "extra": extra }),
                stale(v.updated_at) || stale(first.updated_at),
            );
        }
    }
    out
}

/// Earliest of the known instants.
fn earliest<const N: usize>(ts: [Option<SystemTime>; N]) -> Option<SystemTime> {
    ts.into_iter().flatten().min()
}

/// Critical when the outage is less than a tenth of the agent TTL away.
fn severity_for(outage: Option<SystemTime>, now: SystemTime, th: &Thresholds) -> Severity {
    match outage.map(|t| t.duration_since(now).unwrap_or_default()) {
        Some(left) if left < th.agent_svid_ttl / 10 => Severity::Critical,
        _ => Severity::Warning,
    }
}

fn trust_domain_of(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://")?
        .split('/')
        .next()
        .filter(|s| !s.is_empty())
}

/// The agent debug view by agent name.
pub fn debug_view<'a>(obs: &'a Observations, agent: &str) -> Option<&'a AgentDebugView> {
    obs.agent_debug
        .iter()
        .find(|d| d.agent == agent)
        .map(|d| &**d)
}

#[cfg(test)]
mod tests;
