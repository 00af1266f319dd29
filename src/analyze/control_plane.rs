//! Control-plane symptoms from the server and agent admin APIs and health
//! probes. Pure: a function of the observations and `now`.
//!
//! - `agent_sync_stale`: the agent's Debug `last_sync_success` was already
//!   old when the agent computed its (cached) answer.
//! - `agent_not_renewing`: a server sees the agent's SVID with less than
//!   `not_renewing_open` of its TTL left (a healthy agent renews at half).
//!   The TTL is the server's as learned from its listing, or the policy's.
//! - `agent_banned`: a server lists the agent as banned.
//! - `server_unhealthy`: admin API unreachable or `/ready` failing.
//! - `all_servers_down`: no configured server answers.
//! - `ca_expiring`: every authority in the bundle expires soon.
//! - `bundle_divergence`: servers disagree on the bundle, or an agent's
//!   Workload API bundle differs from the servers'.
//! - `bootstrap_bundle_stale`: an agent's bootstrap bundle file holds no
//!   current authority, or cannot be read.
//!
//! Every symptom carries a predicted time to outage: the earliest expiry
//! that can no longer be renewed.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::clock::{saturating_since, unix_millis};
use crate::model::{
    AgentDebugView, AgentTtl, EntryLookup, EntrySummary, LearnedTtls, Observations, Role,
    ServerAgent, ServerView, Severity, Subject, Symptom, SymptomKey, SymptomKind, SyncCounters,
};
use crate::policy::Thresholds;

/// Control-plane symptoms present at `now`. `servers_configured` is how many
/// servers the configuration watches (0: no server-side view at all);
/// `ttls` is each server's agent SVID TTL as learned so far.
pub fn control_plane(
    obs: &Observations,
    servers_configured: usize,
    is_open: &dyn Fn(&SymptomKey) -> bool,
    th: &Thresholds,
    ttls: &LearnedTtls,
    now: SystemTime,
) -> Vec<Symptom> {
    let cx = Context::new(obs, th, ttls, now);
    let mut out = Found {
        is_open,
        symptoms: Vec::new(),
    };
    agent_sync_stale(&cx, &mut out);
    agent_not_renewing(&cx, &mut out);
    agent_banned(&cx, &mut out);
    // An agent that disappeared from the listing (deleted, evicted) keeps
    // its not-renewing or banned incident open until it is listed again.
    server_unhealthy(&cx, &mut out);
    all_servers_down(&cx, servers_configured, &mut out);
    ca_expiring(&cx, &mut out);
    bundle_divergence(&cx, &mut out);
    bootstrap_bundle_stale(&cx, &mut out);
    out.symptoms
}

/// What every control-plane symptom reads: the observations, thresholds and
/// `now`, plus the views derived from them once per tick.
struct Context<'a> {
    obs: &'a Observations,
    th: &'a Thresholds,
    now: SystemTime,
    /// Server views polled at least once. A view that was never polled (no
    /// answer, no error yet) says nothing: the sensor has just started.
    servers: Vec<&'a ServerView>,
    /// Agent SPIFFE ID → configured agent name (learned from the Debug API).
    names: HashMap<&'a str, &'a str>,
    /// Subject of the cluster-wide symptoms.
    trust_domain: String,
    /// Agents as the servers list them, by SPIFFE ID. Servers share one
    /// datastore; each agent is taken from the freshest reachable server
    /// that lists it.
    listed: HashMap<&'a str, Listed<'a>>,
    /// Per configured agent name, the SPIFFE ID it is listed under now: of
    /// several (an old identity not yet deleted, a new one after
    /// re-attestation) the one whose SVID expires last.
    current: HashMap<&'a str, &'a str>,
    /// The agent SVID TTL in effect per watched server (policy, else
    /// learned): servers are few, so a scan beats hashing a name per
    /// listed agent.
    ttls: Vec<(&'a str, Option<AgentTtl>)>,
    /// Per configured agent name, its sync counters from a metrics
    /// endpoint that answered at the last scrape.
    sync_counters: HashMap<&'a str, &'a SyncCounters>,
}

/// One agent as listed by a server.
#[derive(Clone, Copy)]
struct Listed<'a> {
    agent: &'a ServerAgent,
    server: &'a str,
    updated_at: SystemTime,
    /// The configured agent it maps to, when known.
    name: Option<&'a str>,
}

impl<'a> Context<'a> {
    fn new(
        obs: &'a Observations,
        th: &'a Thresholds,
        ttls: &'a LearnedTtls,
        now: SystemTime,
    ) -> Self {
        let servers: Vec<&ServerView> = obs
            .servers
            .iter()
            .map(|s| &**s)
            .filter(|s| s.reachable || s.last_error.is_some())
            .collect();
        // What the loop remembers, then what the Debug APIs say now.
        let names: HashMap<&str, &str> = obs
            .agent_ids
            .iter()
            .map(|(id, agent)| (id.as_str(), agent.as_str()))
            .chain(
                obs.agent_debug
                    .iter()
                    .filter_map(|d| d.spiffe_id.as_deref().map(|id| (id, d.agent.as_str()))),
            )
            .collect();
        let trust_domain = obs
            .agents
            .iter()
            .flat_map(|v| v.svids.iter())
            .find_map(|s| trust_domain_of(&s.spiffe_id))
            .or_else(|| {
                obs.agent_debug
                    .iter()
                    .find_map(|d| d.spiffe_id.as_deref().and_then(trust_domain_of))
            })
            .unwrap_or("spire")
            .to_string();
        // Sized for the longest listing: no rehash while filling it.
        let longest = servers.iter().map(|s| s.agents.len()).max().unwrap_or(0);
        let mut listed: HashMap<&str, Listed<'_>> = HashMap::with_capacity(longest);
        for s in servers.iter().filter(|s| s.reachable) {
            for a in &s.agents {
                let this = Listed {
                    agent: a,
                    server: s.server.as_str(),
                    updated_at: s.updated_at,
                    name: None,
                };
                let e = listed.entry(a.spiffe_id.as_str()).or_insert(this);
                if s.updated_at > e.updated_at {
                    *e = this;
                }
            }
        }
        // Only a mapped SPIFFE ID can share its name with another: an
        // unmapped one is its own name, and always current. Nothing is
        // hashed for names when nothing is mapped.
        let mut current: HashMap<&str, (&str, SystemTime)> = HashMap::new();
        if !names.is_empty() {
            for (id, l) in listed.iter_mut() {
                let Some(name) = names.get(id).copied() else {
                    continue;
                };
                l.name = Some(name);
                let e = current.entry(name).or_insert((id, l.agent.expires_at));
                if e.1 < l.agent.expires_at {
                    *e = (id, l.agent.expires_at);
                }
            }
        }
        let current = current.into_iter().map(|(n, (id, _))| (n, id)).collect();
        let sync_counters = obs
            .metrics
            .iter()
            .filter(|m| m.role == Role::Agent && m.reachable)
            .filter_map(|m| m.sync.as_ref().map(|c| (m.target.as_str(), c)))
            .collect();
        Self {
            obs,
            th,
            now,
            servers,
            names,
            trust_domain,
            listed,
            current,
            sync_counters,
            ttls: obs
                .servers
                .iter()
                .map(|s| {
                    (
                        s.server.as_str(),
                        th.agent_ttl(ttls.get(&s.server).copied()),
                    )
                })
                .collect(),
        }
    }

    /// The listings to judge: each agent under its current identity only.
    fn listed_now(&self) -> impl Iterator<Item = (&'a str, Listed<'a>)> + '_ {
        self.listed
            .iter()
            .filter(|(id, l)| l.name.is_none_or(|n| self.current.get(n) == Some(*id)))
            .map(|(id, l)| (*id, *l))
    }

    /// Configured agents known by a SPIFFE ID that no reachable server
    /// lists: deleted (evicted) and not yet back.
    fn unlisted(&self) -> impl Iterator<Item = &'a str> + '_ {
        let mut names: Vec<&str> = self.names.values().copied().collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().filter(|n| !self.current.contains_key(n))
    }

    /// Whether every server view is older than `max_staleness`.
    fn servers_blind(&self) -> bool {
        self.servers.iter().all(|s| self.stale(s.updated_at))
    }

    /// The agent SVID TTL of `server`'s agents: the policy's, else learned.
    fn agent_ttl(&self, server: &str) -> Option<AgentTtl> {
        match self.ttls.iter().find(|(s, _)| *s == server) {
            Some((_, ttl)) => *ttl,
            None => self.th.agent_ttl(None),
        }
    }

    /// The agent SVID TTL of an agent: that of the server listing it, else
    /// of any server (they share one datastore and normally one
    /// `agent_ttl`).
    fn agent_ttl_of(&self, spiffe_id: Option<&str>) -> Option<AgentTtl> {
        spiffe_id
            .and_then(|id| self.listed.get(id))
            .and_then(|l| self.agent_ttl(l.server))
            .or_else(|| {
                self.obs
                    .servers
                    .iter()
                    .find_map(|s| self.agent_ttl(&s.server))
            })
    }

    /// A view refreshed before this is blind.
    fn stale(&self, updated: SystemTime) -> bool {
        saturating_since(self.now, updated) > self.th.max_staleness
    }

    /// The configured agent name of a SPIFFE ID, when the Debug API told us.
    fn agent_name<'s>(&self, id: &'s str) -> &'s str
    where
        'a: 's,
    {
        self.names.get(id).copied().unwrap_or(id)
    }

    /// The agent subject of a SPIFFE ID (its configured name when known).
    fn subject_of(&self, id: &str) -> Subject {
        Subject::agent(self.agent_name(id))
    }

    /// The earliest notAfter of the SVIDs the agent's Workload API serves.
    fn workload_expiry(&self, agent: &str) -> Option<SystemTime> {
        self.obs
            .agents
            .iter()
            .filter(|v| v.agent == agent)
            .flat_map(|v| v.svids.iter())
            .filter(|s| !s.serial.is_empty())
            .map(|s| s.not_after)
            .min()
    }
}

/// The symptoms found so far, with the hysteresis every one of them obeys.
struct Found<'a> {
    is_open: &'a dyn Fn(&SymptomKey) -> bool,
    symptoms: Vec<Symptom>,
}

impl Found<'_> {
    /// Reports `symptom` when its open condition holds, or when neither
    /// condition holds and its incident is open (between the two thresholds
    /// an open incident stays open and a closed one stays closed).
    fn report(&mut self, open_if: bool, close_if: bool, symptom: Symptom) {
        if !open_if && close_if {
            return;
        }
        if open_if {
            self.symptoms.push(symptom);
            return;
        }
        let key = SymptomKey {
            kind: symptom.kind,
            subject: symptom.subject,
        };
        if (self.is_open)(&key) {
            self.symptoms.push(Symptom {
                subject: key.subject,
                ..symptom
            });
        }
    }
}

/// `agent_sync_stale`: the agent's last successful sync is old.
///
/// The age is taken when the agent computed its Debug answer
/// (`answered_after`, a lower bound), not `now`: SPIRE serves one answer
/// for 5 s, so `now − last_sync_success` of a healthy agent syncing every
/// 5 s reaches 11 s and more, while the age at the answer stays below the
/// sync interval (plus a second of truncation). The confirmed age only says
/// "no sync until then": an answer about to be recomputed cannot make it
/// smaller than the truth, so a healthy agent never opens.
///
/// When the agent's metrics endpoint is scraped, its sync counters give a
/// second confirmed age with no cache in the way ([`SyncCounters::confirmed_stale`]):
/// either one past `sync_stale_open` opens, and it closes only when the
/// Debug API's is below `sync_stale_close` and the counters' too.
fn agent_sync_stale(cx: &Context<'_>, out: &mut Found<'_>) {
    let (th, now) = (cx.th, cx.now);
    for d in &cx.obs.agent_debug {
        // The last answer is kept while the Debug API is unreachable (e.g.
        // the agent is restarting): it may keep an incident open but never
        // opens or closes one.
        let Some(last) = d.last_sync_success else {
            continue;
        };
        let answered_after = d.answered_after.unwrap_or_else(|| {
            d.updated_at
                .checked_sub(crate::model::SPIRE_DEBUG_ANSWER_CACHE)
                .unwrap_or(d.updated_at)
        });
        let confirmed = saturating_since(answered_after, last);
        let counters = cx.sync_counters.get(d.agent.as_str()).copied();
        let counted = counters.map(SyncCounters::confirmed_stale);
        let (open_if, close_if) = (
            d.reachable
                && (confirmed > th.sync_stale_open
                    || counted.is_some_and(|c| c > th.sync_stale_open)),
            d.reachable
                && confirmed < th.sync_stale_close
                && counted.is_none_or(|c| c < th.sync_stale_close),
        );
        // This runs for every agent on every tick: build nothing for the
        // healthy ones.
        if !open_if && close_if {
            continue;
        }
        let outage = earliest([d.svid_expires_at, cx.workload_expiry(&d.agent)]);
        out.report(
            open_if,
            close_if,
            Symptom {
                kind: SymptomKind::AgentSyncStale,
                subject: Subject::agent(&d.agent),
                severity: severity_for(
                    outage,
                    now,
                    cx.agent_ttl_of(d.spiffe_id.as_deref()).map(|t| t.ttl),
                ),
                predicted_outage: outage,
                evidence: json!({
                    "signal": if confirmed <= th.sync_stale_open
                        && counted.is_some_and(|c| c > th.sync_stale_open)
                    {
                        "agent_metrics_sync_counters"
                    } else {
                        "agent_debug_last_sync"
                    },
                    "metrics_confirmed_age_ms": counted.map(|c| c.as_millis() as u64),
                    "metrics_failed_syncs": counters.map(SyncCounters::failed_since_ok),
                    "last_sync_success_ms": unix_millis(last),
                    "answered_after_ms": unix_millis(answered_after),
                    "confirmed_age_ms": confirmed.as_millis() as u64,
                    "age_ms": saturating_since(now, last).as_millis() as u64,
                    "agent_svid_expires_at_ms": d.svid_expires_at.map(unix_millis),
                    "spiffe_id": d.spiffe_id,
                }),
                blind: cx.stale(d.updated_at),
            },
        );
    }
}

/// `agent_not_renewing`: a server sees the agent's SVID with less than
/// `not_renewing_open` of its TTL left. An expired SVID was not renewed
/// whatever the TTL; otherwise an agent of a server whose TTL is not known
/// yet is not judged.
fn agent_not_renewing(cx: &Context<'_>, out: &mut Found<'_>) {
    let (th, now) = (cx.th, cx.now);
    for (id, l) in cx.listed_now() {
        let a = l.agent;
        let ttl = cx.agent_ttl(l.server);
        let left = a.expires_at.duration_since(now).unwrap_or_default();
        let share = match ttl {
            _ if left.is_zero() => Some((0.0, 0.0)),
            Some(t) if !t.ttl.is_zero() => {
                // SPIRE renews only when its rotator looks: a healthy
                // renewal lands up to `rotation_check_slack` past half-life.
                let slack = th.rotation_slack_share(t.ttl);
                Some((left.as_secs_f64() / t.ttl.as_secs_f64(), slack))
            }
            // No TTL known yet: nothing opens, and nothing open clears.
            _ => None,
        };
        let (open_if, close_if) = match share {
            Some((share, slack)) => (
                !a.banned && share < th.not_renewing_open - slack,
                a.banned || share > th.not_renewing_close,
            ),
            None => (false, a.banned),
        };
        if !open_if && close_if {
            continue;
        }
        out.report(
            open_if,
            close_if,
            Symptom {
                kind: SymptomKind::AgentNotRenewing,
                subject: cx.subject_of(id),
                severity: severity_for(Some(a.expires_at), now, ttl.map(|t| t.ttl)),
                predicted_outage: Some(a.expires_at),
                evidence: json!({
                    "spiffe_id": id,
                    "server": l.server,
                    "serial": a.serial,
                    "expires_at_ms": unix_millis(a.expires_at),
                    "ttl_share_left": share.map(|(s, _)| (s * 1000.0).round() / 1000.0),
                    "ttl_secs": ttl.map(|t| t.ttl.as_secs()),
                    "ttl_source": ttl.map(|t| t.source.as_str()),
                }),
                blind: cx.stale(l.updated_at),
            },
        );
    }
    keep_unlisted_open(cx, SymptomKind::AgentNotRenewing, out);
}

/// An agent that vanished from every listing (evicted, and not yet back)
/// is not healed: its open incident stays open until the agent is listed
/// again and judged by what the listing says.
fn keep_unlisted_open(cx: &Context<'_>, kind: SymptomKind, out: &mut Found<'_>) {
    if cx.servers.iter().all(|s| !s.reachable) {
        // Nothing is listed while no server answers: that says nothing.
        return keep_open_all(cx, kind, out);
    }
    for name in cx.unlisted() {
        keep_open(cx, kind, name, json!({ "listed": false }), out);
    }
}

/// Reports `kind` on agent `name` only if its incident is open; nothing is
/// built for the (many) agents without one.
fn keep_open(
    cx: &Context<'_>,
    kind: SymptomKind,
    name: &str,
    evidence: serde_json::Value,
    out: &mut Found<'_>,
) {
    let key = SymptomKey {
        kind,
        subject: Subject::agent(name),
    };
    if !(out.is_open)(&key) {
        return;
    }
    out.symptoms.push(Symptom {
        kind,
        subject: key.subject,
        severity: Severity::Warning,
        predicted_outage: cx.workload_expiry(name),
        evidence,
        blind: cx.servers_blind(),
    });
}

/// While no server answers, every open incident of `kind` on a known agent
/// stays as it is.
fn keep_open_all(cx: &Context<'_>, kind: SymptomKind, out: &mut Found<'_>) {
    let mut names: Vec<&str> = cx.names.values().copied().collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        keep_open(cx, kind, name, json!({ "servers": "unreachable" }), out);
    }
}

/// `agent_banned`: a server lists the agent as banned. Open and close
/// conditions are disjoint: an unbanned agent never keeps a ban incident
/// open; one deleted and not yet back (evicted) keeps it open.
fn agent_banned(cx: &Context<'_>, out: &mut Found<'_>) {
    for (id, l) in cx.listed_now().filter(|(_, l)| l.agent.banned) {
        out.report(
            true,
            false,
            Symptom {
                kind: SymptomKind::AgentBanned,
                subject: cx.subject_of(id),
                severity: Severity::Critical,
                predicted_outage: cx.workload_expiry(cx.agent_name(id)),
                evidence: json!({
                    "spiffe_id": id,
                    "server": l.server,
                    "can_reattest": l.agent.can_reattest,
                }),
                blind: cx.stale(l.updated_at),
            },
        );
    }
    keep_unlisted_open(cx, SymptomKind::AgentBanned, out);
}

/// `server_unhealthy`: a polled server's admin API is unreachable or its
/// `/ready` fails.
fn server_unhealthy(cx: &Context<'_>, out: &mut Found<'_>) {
    let readiness: HashMap<&str, Option<bool>> = cx
        .obs
        .health
        .iter()
        .filter(|h| h.role == Role::Server)
        .map(|h| (h.target.as_str(), h.ready))
        .collect();
    for s in &cx.servers {
        let ready = readiness.get(s.server.as_str()).copied().flatten();
        let bad = !s.reachable || ready == Some(false);
        out.report(
            bad,
            !bad,
            Symptom {
                kind: SymptomKind::ServerUnhealthy,
                subject: Subject::server(&s.server),
                severity: Severity::Warning,
                predicted_outage: None,
                evidence: json!({
                    "admin_api": if s.reachable { "up" } else { "down" },
                    "last_error": s.last_error,
                    "since_ms": unix_millis(s.since),
                    "ready": ready,
                }),
                blind: cx.stale(s.updated_at),
            },
        );
    }
}

/// `all_servers_down`: every configured server has been polled and none
/// answers. The outage comes when the first agent SVID expires.
fn all_servers_down(cx: &Context<'_>, servers_configured: usize, out: &mut Found<'_>) {
    let servers = &cx.servers;
    if servers_configured == 0 || servers.len() != cx.obs.servers.len() || servers.is_empty() {
        return;
    }
    let earliest_agent_expiry = cx
        .obs
        .agent_debug
        .iter()
        .filter_map(|d| d.svid_expires_at)
        .chain(
            cx.listed
                .values()
                .filter(|l| !l.agent.banned)
                .map(|l| l.agent.expires_at),
        )
        .min();
    let down = servers.iter().all(|s| !s.reachable);
    out.report(
        down,
        !down,
        Symptom {
            kind: SymptomKind::AllServersDown,
            subject: Subject::cluster(&cx.trust_domain),
            severity: Severity::Critical,
            predicted_outage: earliest_agent_expiry,
            evidence: json!({
                "servers": servers.iter().map(|s| json!({
                    "server": s.server, "last_error": s.last_error, "since_ms": unix_millis(s.since),
                })).collect::<Vec<_>>(),
            }),
            blind: servers.iter().all(|s| cx.stale(s.updated_at)),
        },
    );
}

/// The servers whose bundle we can compare: reachable, with a bundle. The
/// first is the reference.
fn bundle_servers<'a>(cx: &Context<'a>) -> Vec<&'a ServerView> {
    cx.obs
        .servers
        .iter()
        .map(|s| &**s)
        .filter(|s| s.reachable && !s.bundle.is_empty())
        .collect()
}

/// `ca_expiring`: every untainted authority in the reference server's
/// bundle expires within `ca_expiring_within`.
fn ca_expiring(cx: &Context<'_>, out: &mut Found<'_>) {
    let Some(first) = bundle_servers(cx).first().copied() else {
        return;
    };
    let latest = first
        .bundle
        .iter()
        .filter(|a| !a.tainted)
        .map(|a| a.not_after)
        .max();
    let Some(latest) = latest else {
        return;
    };
    let left = latest.duration_since(cx.now).unwrap_or_default();
    let within = cx.th.ca_expiring_within;
    out.report(
        left < within,
        left >= within,
        Symptom {
            kind: SymptomKind::CaExpiring,
            subject: Subject::cluster(&cx.trust_domain),
            severity: if left.is_zero() {
                Severity::Critical
            } else {
                Severity::Warning
            },
            predicted_outage: Some(latest),
            evidence: json!({ "server": first.server, "latest_authority_not_after_ms": unix_millis(latest) }),
            blind: cx.stale(first.updated_at),
        },
    );
}

/// `bundle_divergence`: servers disagree on the bundle (cluster subject),
/// or an agent's Workload API bundle differs from the reference server's.
fn bundle_divergence(cx: &Context<'_>, out: &mut Found<'_>) {
    let reachable = bundle_servers(cx);
    let Some(first) = reachable.first().copied() else {
        return;
    };
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
    out.report(
        !servers_differ.is_empty(),
        servers_differ.is_empty(),
        Symptom {
            kind: SymptomKind::BundleDivergence,
            subject: Subject::cluster(&cx.trust_domain),
            severity: Severity::Warning,
            predicted_outage: None,
            evidence: json!({ "reference": first.server, "differing_servers": servers_differ }),
            blind: cx.stale(first.updated_at),
        },
    );
    for v in cx.obs.agents.iter().filter(|v| !v.bundle.is_empty()) {
        let theirs: BTreeSet<&str> = v.bundle.iter().map(String::as_str).collect();
        let missing: Vec<&str> = reference.difference(&theirs).copied().collect();
        let extra: Vec<&str> = theirs.difference(&reference).copied().collect();
        let differs = !missing.is_empty() || !extra.is_empty();
        out.report(
            differs,
            !differs,
            Symptom {
                kind: SymptomKind::BundleDivergence,
                subject: Subject::agent(&v.agent),
                severity: Severity::Warning,
                predicted_outage: cx.workload_expiry(&v.agent),
                evidence: json!({ "reference": first.server, "missing": missing, "extra": extra }),
                blind: cx.stale(v.updated_at) || cx.stale(first.updated_at),
            },
        );
    }
}

/// `bootstrap_bundle_stale`: an agent's bootstrap bundle (`trust_bundle_path`)
/// shares no untainted authority with the current bundle, or cannot be read.
///
/// The current bundle is the reference server's, as for `bundle_divergence`;
/// with no server bundle, the agent's own Workload API bundle (which has no
/// taint marks). A tainted authority does not count: the moment it is
/// tainted the servers re-sign their own SVIDs with the active one, so an
/// agent bootstrapping with only tainted authorities cannot verify any
/// server. An unreadable file is reported too, with its error: an agent
/// that has to bootstrap cannot read it either. With no bundle to compare
/// with, a readable file neither opens nor closes an incident.
///
/// Observe-only: the fix is rewriting the file from the current bundle, by
/// whatever distributes it; nothing done to the agent helps.
fn bootstrap_bundle_stale(cx: &Context<'_>, out: &mut Found<'_>) {
    if cx.obs.bootstrap_bundles.is_empty() {
        return;
    }
    let server = bundle_servers(cx).first().map(|s| CurrentBundle {
        source: format!("server:{}", s.server),
        untainted: s
            .bundle
            .iter()
            .filter(|a| !a.tainted)
            .map(|a| a.fingerprint.as_str())
            .collect(),
        tainted: s
            .bundle
            .iter()
            .filter(|a| a.tainted)
            .map(|a| a.fingerprint.as_str())
            .collect(),
        updated_at: s.updated_at,
    });
    for f in cx.obs.bootstrap_bundles.iter().filter(|f| f.read) {
        let own = || {
            let v = cx
                .obs
                .agents
                .iter()
                .find(|v| v.agent == f.agent && !v.bundle.is_empty())?;
            Some(CurrentBundle {
                source: "workload_api".to_string(),
                untainted: v.bundle.iter().map(String::as_str).collect(),
                tainted: BTreeSet::new(),
                updated_at: v.updated_at,
            })
        };
        let own_bundle;
        let current = match &server {
            Some(s) => Some(s),
            None => {
                own_bundle = own();
                own_bundle.as_ref()
            }
        };
        let file: BTreeSet<&str> = f.authorities.iter().map(String::as_str).collect();
        let shared = current.map(|c| file.intersection(&c.untainted).count());
        let (open_if, close_if) = match (&f.error, shared) {
            (Some(_), _) | (None, Some(0)) => (true, false),
            (None, Some(_)) => (false, true),
            // Nothing to compare with: the incident stays as it is.
            (None, None) => (false, false),
        };
        if !open_if && close_if {
            continue;
        }
        out.report(
            open_if,
            close_if,
            Symptom {
                kind: SymptomKind::BootstrapBundleStale,
                subject: Subject::agent(&f.agent),
                severity: Severity::Warning,
                predicted_outage: None,
                evidence: json!({
                    "path": f.path,
                    "error": f.error,
                    "file_authorities": f.authorities.len(),
                    "reference": current.map(|c| c.source.as_str()),
                    "current_authorities": current.map(|c| c.untainted.len()),
                    "tainted_in_file": current.map(|c| file.intersection(&c.tainted).count()),
                }),
                blind: cx.stale(f.updated_at) || current.is_some_and(|c| cx.stale(c.updated_at)),
            },
        );
    }
}

/// The bundle a bootstrap bundle file is compared with.
struct CurrentBundle<'a> {
    /// `server:<name>` or `workload_api` (the agent's own bundle), for evidence.
    source: String,
    /// Fingerprints of the untainted authorities: the current ones.
    untainted: BTreeSet<&'a str>,
    /// Fingerprints of the tainted authorities (being phased out).
    tainted: BTreeSet<&'a str>,
    /// When the view it comes from was refreshed.
    updated_at: SystemTime,
}

/// Adds to every `identity_not_issued` what the servers hold for the SPIFFE
/// IDs the agent refuses us (their entry lookups): `entry` is `missing`
/// when no reachable server has an entry for any of them (deleted), or
/// `not_matching` when one exists but is no longer issued to us (its
/// selectors or parent changed); `unknown` without an answer. Pure.
pub fn explain_refusals(obs: &Observations, symptoms: &mut [Symptom]) {
    let lookups: Vec<&EntryLookup> = obs
        .servers
        .iter()
        .filter(|s| s.reachable)
        .flat_map(|s| s.entry_lookups.iter())
        .filter(|l| l.entries.is_some() && !l.alias)
        .collect();
    for s in symptoms
        .iter_mut()
        .filter(|s| s.kind == SymptomKind::IdentityNotIssued)
    {
        let agent = s.subject.agent_name();
        let mine: Vec<&EntryLookup> = lookups
            .iter()
            .copied()
            .filter(|l| l.agent == agent)
            .collect();
        let existing: Vec<&EntrySummary> = mine
            .iter()
            .flat_map(|l| l.entries.iter().flatten())
            .collect();
        let (entry, cause) = match (mine.is_empty(), existing.first()) {
            (true, _) => (
                "unknown",
                "no registration entry matches our selectors (no server lookup)".to_string(),
            ),
            (false, None) => (
                "missing",
                format!(
                    "the registration entry for {} is gone",
                    spiffe_ids(&mine).join(", ")
                ),
            ),
            (false, Some(e)) => (
                "not_matching",
                format!(
                    "an entry for {} exists (parent {}, selectors {}) but is no longer issued to us: its selectors or parent no longer match",
                    spiffe_ids(&mine).join(", "),
                    e.parent_id,
                    e.selectors.join(" ")
                ),
            ),
        };
        s.evidence["entry"] = json!(entry);
        s.evidence["cause"] = json!(cause);
        if !mine.is_empty() {
            s.evidence["entries"] = json!(existing);
        }
    }
}

fn spiffe_ids<'a>(lookups: &[&'a EntryLookup]) -> Vec<&'a str> {
    let mut ids: Vec<&str> = lookups.iter().map(|l| l.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Earliest of the known instants.
fn earliest<const N: usize>(ts: [Option<SystemTime>; N]) -> Option<SystemTime> {
    ts.into_iter().flatten().min()
}

/// Critical when the outage is less than a tenth of the agent SVID TTL
/// away (or past, when the TTL is not known).
fn severity_for(outage: Option<SystemTime>, now: SystemTime, ttl: Option<Duration>) -> Severity {
    let within = ttl.map_or(Duration::ZERO, |t| t / 10);
    match outage.map(|t| t.duration_since(now).unwrap_or_default()) {
        Some(left) if left.is_zero() || left < within => Severity::Critical,
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
