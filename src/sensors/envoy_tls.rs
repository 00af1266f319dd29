//! Envoy TLS counters → handshake outcomes.
//!
//! Envoy counts TLS results per listener (`listener.<address>.ssl.*`) and
//! per upstream cluster (`cluster.<name>.ssl.*`), plus connections reset
//! because SDS had not delivered a certificate yet
//! (`*_ssl_socket_factory.*_context_secrets_not_ready`). In Prometheus form
//! (`/stats/prometheus`) these are `envoy_listener_ssl_handshake
//! {envoy_listener_address="0.0.0.0_8443"}` and the like (envoyproxy/envoy
//! `docs/root/_include/ssl_stats.rst`, `configuration/security/secret.rst`).
//!
//! [`EnvoyTls`] is a pure converter: it keeps the previous cumulative value
//! of each series and turns a scrape into per-target deltas by
//! [`Reason`]. It never reads the clock; the caller adds the deltas to the
//! shared [`Counter`](crate::handshake::Counter).

use std::collections::{BTreeMap, HashMap};

use crate::handshake::Reason;
use crate::model::Sample;

/// Name prefixes of the Envoy series the converter reads: the default
/// `keep` list of an Envoy `metrics_scrape` target.
pub const ENVOY_KEEP: &[&str] = &[
    "envoy_listener_ssl_",
    "envoy_cluster_ssl_",
    "envoy_listener_server_ssl_socket_factory_",
    "envoy_cluster_client_ssl_socket_factory_",
];

/// Default bound on series tracked per Envoy.
pub const DEFAULT_MAX_SERIES: usize = 4096;

/// Which Envoy scope a series belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Scope {
    Listener,
    Cluster,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Listener => "listener",
            Scope::Cluster => "cluster",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Scope::Listener => "envoy_listener_address",
            Scope::Cluster => "envoy_cluster_name",
        }
    }
}

/// The series the converter maps, by exact metric name.
///
/// Not mapped on purpose:
/// - `ssl_no_certificate` counts *successful* connections whose client sent
///   no certificate (where the listener does not require one); they are
///   already in `ssl_handshake`, so mapping them to a failure would count
///   each such connection twice, once as a failure.
/// - `ssl_session_reused`, ciphers, curves, versions: not outcomes.
const MAPPING: &[(&str, Scope, Reason)] = &[
    ("envoy_listener_ssl_handshake", Scope::Listener, Reason::Ok),
    ("envoy_cluster_ssl_handshake", Scope::Cluster, Reason::Ok),
    // TLS errors "not including failed certificate verifications".
    (
        "envoy_listener_ssl_connection_error",
        Scope::Listener,
        Reason::Protocol,
    ),
    (
        "envoy_cluster_ssl_connection_error",
        Scope::Cluster,
        Reason::Protocol,
    ),
    // "Failed CA verification": Envoy lumps expired and not-yet-valid
    // certificates in with unknown CAs here, so an expiry shows up as
    // `unknown_ca`; probes tell them apart.
    (
        "envoy_listener_ssl_fail_verify_error",
        Scope::Listener,
        Reason::UnknownCa,
    ),
    (
        "envoy_cluster_ssl_fail_verify_error",
        Scope::Cluster,
        Reason::UnknownCa,
    ),
    (
        "envoy_listener_ssl_fail_verify_san",
        Scope::Listener,
        Reason::BadSpiffeId,
    ),
    (
        "envoy_cluster_ssl_fail_verify_san",
        Scope::Cluster,
        Reason::BadSpiffeId,
    ),
    (
        "envoy_listener_ssl_fail_verify_cert_hash",
        Scope::Listener,
        Reason::BadSpiffeId,
    ),
    (
        "envoy_cluster_ssl_fail_verify_cert_hash",
        Scope::Cluster,
        Reason::BadSpiffeId,
    ),
    (
        "envoy_listener_ssl_fail_verify_no_cert",
        Scope::Listener,
        Reason::NoClientCert,
    ),
    (
        "envoy_cluster_ssl_fail_verify_no_cert",
        Scope::Cluster,
        Reason::NoClientCert,
    ),
    // Connections reset because SDS had not delivered a certificate.
    (
        "envoy_listener_server_ssl_socket_factory_downstream_context_secrets_not_ready",
        Scope::Listener,
        Reason::Refused,
    ),
    (
        "envoy_cluster_client_ssl_socket_factory_upstream_context_secrets_not_ready",
        Scope::Cluster,
        Reason::Refused,
    ),
];

/// One tracked series: metric (index into [`MAPPING`]) and listener address
/// or cluster name.
type SeriesKey = (usize, String);

/// Turns successive scrapes of one Envoy into handshake-outcome deltas.
#[derive(Debug, Clone)]
pub struct EnvoyTls {
    envoy: String,
    previous: HashMap<SeriesKey, f64>,
    baselined: bool,
    max_series: usize,
    dropped: u64,
}

impl EnvoyTls {
    /// A converter for the Envoy configured as `envoy`, tracking at most
    /// `max_series` series (at least 1).
    pub fn new(envoy: impl Into<String>, max_series: usize) -> Self {
        Self {
            envoy: envoy.into(),
            previous: HashMap::new(),
            baselined: false,
            max_series: max_series.max(1),
            dropped: 0,
        }
    }

    /// Outcomes since the previous scrape, as (target, reason, count) with
    /// target `<envoy>/listener/<address>` or `<envoy>/cluster/<name>`,
    /// sorted, zero counts left out.
    ///
    /// - The first call only records the baseline and returns nothing: a
    ///   restart of spire-healer must not count Envoy's history as a burst.
    /// - A series first seen later counts from 0 (Envoy creates counters
    ///   at 0 when a listener or cluster appears).
    /// - A counter that went down means Envoy restarted: its delta is the
    ///   new value.
    /// - Series missing from `samples` are forgotten, so removed listeners
    ///   and clusters do not pin memory; when they come back they count
    ///   from 0.
    /// - Beyond `max_series` tracked series, new series are ignored (and
    ///   counted in [`dropped`](Self::dropped)), never guessed at.
    /// - Unmapped names, samples without the scope label, and values that
    ///   are negative or not finite are ignored.
    pub fn deltas(&mut self, samples: &[Sample]) -> Vec<(String, Reason, u64)> {
        // Every mapped series in this scrape (bounded by the scrape's size),
        // samples of one series with extra labels summed.
        let mut seen: BTreeMap<SeriesKey, f64> = BTreeMap::new();
        for s in samples {
            let Some(index) = MAPPING.iter().position(|(n, _, _)| *n == s.name) else {
                continue;
            };
            let Some(name) = label(&s.labels, MAPPING[index].1.label()) else {
                continue;
            };
            if !s.value.is_finite() || s.value < 0.0 {
                continue;
            }
            *seen.entry((index, name.to_string())).or_default() += s.value;
        }
        // Series already tracked keep their place; new ones get what room
        // is left, in a stable order.
        let known = seen
            .keys()
            .filter(|k| self.previous.contains_key(*k))
            .count();
        let mut room = self.max_series.saturating_sub(known);
        let mut current: HashMap<SeriesKey, f64> = HashMap::with_capacity(seen.len());
        for (key, value) in seen {
            if !self.previous.contains_key(&key) {
                if room == 0 {
                    self.dropped = self.dropped.saturating_add(1);
                    continue;
                }
                room -= 1;
            }
            current.insert(key, value);
        }

        let mut out: BTreeMap<(String, Reason), u64> = BTreeMap::new();
        if self.baselined {
            for (key, now) in &current {
                let delta = match self.previous.get(key) {
                    Some(before) if now >= before => now - before,
                    // Went down: Envoy restarted and has counted `now` since.
                    Some(_) => *now,
                    // New series (a new listener, or one dropped or absent
                    // before): baselined like the first scrape, so a
                    // series' whole history never lands as one burst.
                    None => 0.0,
                };
                let delta = to_count(delta);
                if delta == 0 {
                    continue;
                }
                let (index, name) = key;
                let (_, scope, reason) = MAPPING[*index];
                let target = format!("{}/{}/{}", self.envoy, scope.as_str(), name);
                let c = out.entry((target, reason)).or_default();
                *c = c.saturating_add(delta);
            }
        }
        self.previous = current;
        self.baselined = true;
        out.into_iter().map(|((t, r), n)| (t, r, n)).collect()
    }

    /// Samples of new series ignored so far (once per scrape) because
    /// `max_series` series were already tracked.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Series currently tracked.
    pub fn tracked(&self) -> usize {
        self.previous.len()
    }
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// A non-negative finite delta as a whole count (Envoy counters are
/// integers; fractions are dropped).
fn to_count(delta: f64) -> u64 {
    if delta >= u64::MAX as f64 {
        u64::MAX
    } else {
        delta as u64
    }
}

#[cfg(test)]
mod tests;
