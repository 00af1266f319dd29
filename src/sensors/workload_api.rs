//! `workload_api` sensor: our own SPIFFE Workload API client, one per agent.
//!
//! A background task keeps `FetchX509SVID` and `FetchX509Bundles` streams open
//! (header `workload.spiffe.io: true`), validates every SVID against the
//! X509-SVID rules, and publishes an [`AgentView`]. Reconnects follow the
//! spec's codes: after `InvalidArgument`/`Unimplemented` ("do not retry") the
//! status is `Rejected` and the next attempt waits the full `backoff_max`
//! (or a refetch); everything else is retried with capped exponential
//! backoff. A connected stream that stays silent past `answer_timeout` is
//! `Unanswered` (a frozen agent accepts connections but never answers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};
use tracing::{debug, info, warn};

use super::entry_lookups::EntryLookups;
use super::{Sensor, SensorError};
use crate::clock::Clock;
use crate::endpoint::Endpoint;
use crate::model::{AgentView, NO_IDENTITY, Reading, StreamStatus, SvidObservation};
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};
use crate::spire_api::tls::{IdentitySource, RawIdentity};
use crate::svid;
use crate::telemetry::Metrics;

/// The security header every Workload API call carries.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Settings for one agent's sensor.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Agent name.
    pub agent: String,
    /// Workload API endpoint.
    pub endpoint: Endpoint,
    /// Silence after (re)connect that counts as unanswered.
    pub answer_timeout: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
}

/// State shared by the task, the sensor and the refetch actuator.
pub struct Shared {
    /// Republished on every update, heartbeats included, so a reader can
    /// wait for the next change rather than poll.
    view: watch::Sender<AgentView>,
    reconnect: Notify,
    reconnects: AtomicU64,
    reconnected: Notify,
    /// Our own default X509-SVID as received (chain, PKCS#8 key, bundle),
    /// for [`IdentitySource`]; never part of the public view.
    identity: Mutex<Option<RawIdentity>>,
}

impl std::fmt::Debug for Shared {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("view", &*self.view.borrow())
            .field("reconnects", &self.reconnects)
            .finish_non_exhaustive()
    }
}

/// Our current SVID, for mTLS to a server's TCP admin port. The first valid
/// SVID of the last `FetchX509SVID` message (the Workload API's default);
/// kept while the stream is down, since it stays usable until it expires.
impl IdentitySource for Shared {
    fn current(&self) -> Option<RawIdentity> {
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Shared {
    fn new(agent: &str, now: std::time::SystemTime) -> Self {
        Self {
            view: watch::Sender::new(AgentView {
                agent: agent.to_string(),
                status: StreamStatus::Connecting,
                status_since: now,
                last_error: None,
                last_message: None,
                svids: Vec::new(),
                bundle_authorities: 0,
                bundle: Vec::new(),
                rotations: 0,
                updated_at: now,
            }),
            reconnect: Notify::new(),
            reconnects: AtomicU64::new(0),
            reconnected: Notify::new(),
            identity: Mutex::new(None),
        }
    }

    /// A copy of the current view.
    pub fn view(&self) -> AgentView {
        self.view.borrow().clone()
    }

    /// A receiver that sees every update of the view.
    pub fn subscribe(&self) -> watch::Receiver<AgentView> {
        self.view.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut AgentView)) {
        self.view.send_modify(f);
    }

    /// Asks the task to drop its streams and reconnect now, then waits (up
    /// to `wait`) until it has done so. Returns whether it did. Idempotent:
    /// a second request while one is pending coalesces.
    pub async fn request_reconnect(&self, wait: Duration) -> bool {
        let before = self.reconnects.load(Ordering::SeqCst);
        let done = self.reconnected.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        self.reconnect.notify_one();
        if self.reconnects.load(Ordering::SeqCst) != before {
            return true;
        }
        timeout(wait, done).await.is_ok()
    }

    /// Reconnects now if the stream is not up, instead of waiting out its
    /// backoff: an action on the agent (a restart) just returned, and its
    /// verification should see the agent as soon as it serves again. A
    /// stream that is up is left alone.
    pub fn retry_now(&self) {
        if self.view.borrow().status != StreamStatus::Up {
            self.reconnect.notify_one();
        }
    }

    /// How many times the task tore its streams down on request.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::SeqCst)
    }
}

/// The sensor half: reads the shared view.
pub struct WorkloadApiSensor {
    agent: String,
    shared: Arc<Shared>,
}

#[async_trait]
impl Sensor for WorkloadApiSensor {
    fn name(&self) -> &'static str {
        "workload_api"
    }
    fn instance(&self) -> &str {
        &self.agent
    }
    async fn observe(&self) -> Result<Vec<Reading>, SensorError> {
        Ok(vec![Reading::WorkloadApi(Arc::new(self.shared.view()))])
    }
}

/// The background task half.
pub struct WorkloadApiTask {
    settings: Settings,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    lookups: Arc<EntryLookups>,
}

/// Builds the sensor, its task and the shared handle (for `refetch`).
/// `wake` is notified on every state change so the loop can tick early.
pub fn build(
    settings: Settings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (WorkloadApiSensor, WorkloadApiTask, Arc<Shared>) {
    let shared = Arc::new(Shared::new(&settings.agent, clock.now()));
    (
        WorkloadApiSensor {
            agent: settings.agent.clone(),
            shared: shared.clone(),
        },
        WorkloadApiTask {
            settings,
            shared: shared.clone(),
            clock,
            metrics,
            wake,
            lookups: Arc::default(),
        },
        shared,
    )
}

/// Why a session ended.
enum End {
    Shutdown,
    Reconnect,
    Failed {
        code: &'static str,
        detail: String,
        retry: bool,
        unanswered: bool,
    },
}

/// Heartbeat period: the view's `updated_at` advances at least this often.
const HEARTBEAT: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Retry cap while the agent refuses us an identity: SPIRE agents sync
/// their entries every 5 s.
const REFUSED_RETRY: Duration = Duration::from_secs(5);

impl WorkloadApiTask {
    /// Asks `lookups` for the entries of the SPIFFE IDs the agent refuses
    /// us (and forgets them once it serves again).
    #[must_use]
    pub fn with_lookups(mut self, lookups: Arc<EntryLookups>) -> Self {
        self.lookups = lookups;
        self
    }

    /// Runs until `shutdown`.
    ///
    /// # Cancel safety
    /// Holds no external state; dropping it just closes the streams.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let end = self.session(&shutdown).await;
            let wait = match end {
                End::Shutdown => return,
                End::Reconnect => {
                    self.acknowledge_reconnect();
                    backoff = BACKOFF_MIN;
                    Duration::ZERO
                }
                End::Failed {
                    code,
                    detail,
                    retry,
                    unanswered,
                } => {
                    self.metrics
                        .spiffe_workload_api_errors_total
                        .with_label_values(&[&self.settings.agent, code])
                        .inc();
                    let status = if !retry {
                        StreamStatus::Rejected
                    } else if code == NO_IDENTITY {
                        StreamStatus::NoIdentity
                    } else if unanswered {
                        StreamStatus::Unanswered
                    } else {
                        StreamStatus::Down
                    };
                    let before = self.shared.view();
                    if before.status != status || before.last_error.as_deref() != Some(code) {
                        warn!(agent = %self.settings.agent, code, %detail, status = status.as_str(), "Workload API stream failed.");
                    } else {
                        debug!(agent = %self.settings.agent, code, %detail, status = status.as_str(), "Workload API stream failed again.");
                    }
                    self.set_status(status, Some(code.to_string()));
                    // A refusal is asked again at least every agent sync, so
                    // a re-created entry is seen within one more sync of
                    // being served, not a whole backoff later.
                    let cap = if status == StreamStatus::NoIdentity {
                        self.settings.backoff_max.min(REFUSED_RETRY)
                    } else {
                        self.settings.backoff_max
                    };
                    let w = if retry { backoff.min(cap) } else { cap };
                    backoff = (backoff * 2).min(cap);
                    w
                }
            };
            // Wait out the backoff, but wake for shutdown or a refetch.
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = self.shared.reconnect.notified() => {
                        self.acknowledge_reconnect();
                        backoff = BACKOFF_MIN;
                        break;
                    }
                    _ = &mut sleep => break,
                    _ = tokio::time::sleep(HEARTBEAT) => self.heartbeat(),
                }
            }
        }
    }

    fn acknowledge_reconnect(&self) {
        self.shared.reconnects.fetch_add(1, Ordering::SeqCst);
        self.shared.reconnected.notify_waiters();
    }

    fn heartbeat(&self) {
        let now = self.clock.now();
        self.shared.update(|v| v.updated_at = now);
    }

    fn set_status(&self, status: StreamStatus, error: Option<String>) {
        let now = self.clock.now();
        let up = status == StreamStatus::Up;
        // The gauge first: whoever sees the new view sees it too.
        self.metrics
            .workload_api_stream_up
            .with_label_values(&[&self.settings.agent])
            .set(i64::from(up));
        let mut changed = false;
        self.shared.update(|v| {
            if v.status != status {
                v.status = status;
                v.status_since = now;
                changed = true;
            }
            if status == StreamStatus::NoIdentity {
                // The agent has no identity for us: nothing is served. What
                // it served last is remembered, not judged (analysis judges
                // lifetimes only while the stream is up, so an open
                // lifetime incident neither clears nor worsens), and looked
                // up on the servers: gone, or no longer ours?
                self.lookups.want(
                    &self.settings.agent,
                    v.svids.iter().map(|s| s.spiffe_id.clone()),
                );
            } else if up {
                self.lookups.forget(&self.settings.agent);
            }
            if error.is_some() || up {
                v.last_error = error;
            }
            v.updated_at = now;
        });
        if changed {
            self.wake.notify_one();
        }
    }

    /// One connection: open both streams, read until something ends it.
    async fn session(&self, shutdown: &CancellationToken) -> End {
        let agent = &self.settings.agent;
        // Keep Down/Unanswered while retrying so "down since" stays true.
        let current = self.shared.view().status;
        if matches!(current, StreamStatus::Up) {
            self.set_status(StreamStatus::Connecting, None);
        }
        let channel = match self.settings.endpoint.channel(self.settings.answer_timeout) {
            Ok(c) => c,
            Err(e) => {
                return End::Failed {
                    code: "invalid_endpoint",
                    detail: e.to_string(),
                    retry: false,
                    unanswered: false,
                };
            }
        };
        let mut client =
            SpiffeWorkloadApiClient::new(channel).max_decoding_message_size(4 * 1024 * 1024);
        let answer = self.settings.answer_timeout;

        let open = async {
            let svids = client.fetch_x509svid(request(X509svidRequest {})).await?;
            let bundles = client
                .fetch_x509_bundles(request(X509BundlesRequest {}))
                .await?;
            Ok::<_, Status>((svids.into_inner(), bundles.into_inner()))
        };
        let opened = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Shutdown,
            _ = self.shared.reconnect.notified() => return End::Reconnect,
            r = timeout(answer, open) => r,
        };
        let (mut svids, mut bundles): (
            Streaming<X509svidResponse>,
            Streaming<X509BundlesResponse>,
        ) = match opened {
            Err(_) => {
                return End::Failed {
                    code: "unanswered",
                    detail: format!("no response within {answer:?}"),
                    retry: true,
                    unanswered: true,
                };
            }
            Ok(Err(status)) => return failed(&status),
            Ok(Ok(s)) => s,
        };
        debug!(agent = %agent, "Workload API streams open.");

        let started = tokio::time::Instant::now();
        let mut answered = false;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = self.shared.reconnect.notified() => return End::Reconnect,
                msg = svids.message() => match msg {
                    Ok(Some(resp)) => {
                        if !answered {
                            info!(agent = %agent, "Workload API answered.");
                        }
                        // The session's first answer lists what the agent
                        // already served: not a new issuance.
                        let first = !answered;
                        answered = true;
                        self.on_svids(resp, !first);
                    }
                    Ok(None) => return End::Failed { code: "stream_ended", detail: "server closed the X.509-SVID stream".into(), retry: true, unanswered: false },
                    Err(status) => return failed(&status),
                },
                msg = bundles.message() => match msg {
                    Ok(Some(resp)) => self.on_bundles(&resp),
                    Ok(None) => return End::Failed { code: "stream_ended", detail: "server closed the X.509 bundle stream".into(), retry: true, unanswered: false },
                    Err(status) => return failed(&status),
                },
                _ = heartbeat.tick() => {
                    if !answered && started.elapsed() >= answer {
                        return End::Failed {
                            code: "unanswered",
                            detail: format!("no X.509-SVID message within {answer:?}"),
                            retry: true,
                            unanswered: true,
                        };
                    }
                    self.heartbeat();
                }
            }
        }
    }

    /// Publishes one X.509-SVID answer. `live`: an earlier answer of the
    /// same stream came first, so a serial not in the view is a new
    /// issuance, observed as `spire_healer_slo_svid_issuance_seconds`.
    fn on_svids(&self, resp: X509svidResponse, live: bool) {
        let now = self.clock.now();
        let previous: HashMap<String, SvidObservation> = self
            .shared
            .view()
            .svids
            .into_iter()
            .map(|s| (format!("{}\u{0}{}", s.spiffe_id, s.serial), s))
            .collect();
        // Full state: an empty list means everything was redacted.
        let svids: Vec<SvidObservation> = resp
            .svids
            .iter()
            .map(|s| {
                let insp = svid::inspect(&s.spiffe_id, &s.x509_svid, &s.bundle);
                let (serial, not_before, not_after, issuer) = match &insp.leaf {
                    Some(l) => (
                        l.serial.clone(),
                        l.not_before,
                        l.not_after,
                        l.issuer.clone(),
                    ),
                    None => (
                        String::new(),
                        std::time::UNIX_EPOCH,
                        std::time::UNIX_EPOCH,
                        String::new(),
                    ),
                };
                let first_seen = previous
                    .get(&format!("{}\u{0}{}", s.spiffe_id, serial))
                    .map_or(now, |p| p.first_seen);
                SvidObservation {
                    spiffe_id: s.spiffe_id.clone(),
                    serial,
                    not_before,
                    not_after,
                    invalid: insp.problem.map(|p| p.to_string()),
                    first_seen,
                    issuer,
                }
            })
            .collect();
        let identity = resp
            .svids
            .iter()
            .zip(&svids)
            .find(|(_, o)| o.invalid.is_none())
            .and_then(|(s, _)| raw_identity(s));
        *self
            .shared
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = identity;
        if live {
            for s in svids.iter().filter(|s| {
                !s.serial.is_empty()
                    && s.invalid.is_none()
                    && !previous.contains_key(&format!("{}\u{0}{}", s.spiffe_id, s.serial))
            }) {
                self.metrics
                    .observe_svid_issuance(crate::slo::issuance_latency(now, s.not_before));
            }
        }
        for s in &svids {
            if let Some(reason) = &s.invalid {
                self.metrics
                    .spiffe_workload_api_errors_total
                    .with_label_values(&[&self.settings.agent, "invalid_svid"])
                    .inc();
                warn!(agent = %self.settings.agent, spiffe_id = %s.spiffe_id, %reason, "Agent served an invalid X.509-SVID.");
            }
        }
        self.shared.update(|v| {
            let rotated = svids
                .iter()
                .filter(|s| {
                    !s.serial.is_empty()
                        && v.svids.iter().any(|o| {
                            o.spiffe_id == s.spiffe_id
                                && !o.serial.is_empty()
                                && o.serial != s.serial
                        })
                })
                .count() as u64;
            v.rotations += rotated;
            v.svids = svids;
            v.last_message = Some(now);
            v.updated_at = now;
        });
        self.set_status(StreamStatus::Up, None);
        self.wake.notify_one();
    }

    fn on_bundles(&self, resp: &X509BundlesResponse) {
        let count: usize = resp
            .bundles
            .values()
            .map(|der| svid::split_der(der).map_or(0, |c| c.len()))
            .sum();
        let now = self.clock.now();
        self.shared.update(|v| {
            // Our own trust domain's bundle: the one keyed by the trust
            // domain of the SVIDs we hold (all bundles until we hold one).
            let own = v
                .svids
                .first()
                .and_then(|s| s.spiffe_id.strip_prefix("spiffe://"))
                .map(|rest| format!("spiffe://{}", rest.split('/').next().unwrap_or(rest)));
            let mut fingerprints: Vec<String> = resp
                .bundles
                .iter()
                .filter(|(td, _)| own.as_ref().is_none_or(|o| o == *td))
                .flat_map(|(_, der)| svid::split_der(der).unwrap_or_default())
                .map(fingerprint)
                .collect();
            fingerprints.sort();
            fingerprints.dedup();
            v.bundle_authorities = count;
            v.bundle = fingerprints;
            v.updated_at = now;
        });
    }
}

/// One `FetchX509Bundles` round trip: the DER certificates of the bundle of
/// `trust_domain` (`spiffe://td`) as the agent serves it right now.
///
/// # Errors
/// The agent does not answer within `timeout`, or sends no such bundle.
pub async fn fetch_bundle_once(
    endpoint: &Endpoint,
    trust_domain: &str,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, String> {
    let channel = endpoint.channel(timeout).map_err(|e| e.to_string())?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let fetch = async {
        let mut stream = client
            .fetch_x509_bundles(request(X509BundlesRequest {}))
            .await
            .map_err(|s| format!("FetchX509Bundles: {}", s.message()))?
            .into_inner();
        let msg = stream
            .message()
            .await
            .map_err(|s| format!("FetchX509Bundles: {}", s.message()))?
            .ok_or("the agent closed the bundle stream")?;
        let der = msg
            .bundles
            .get(trust_domain)
            .ok_or_else(|| format!("the agent serves no bundle for {trust_domain}"))?;
        let certs = svid::split_der(der).map_err(|e| e.to_string())?;
        Ok(certs.into_iter().map(<[u8]>::to_vec).collect())
    };
    timeout_or(timeout, fetch).await
}

async fn timeout_or<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// SHA-256 of a DER certificate, lower-case hex: how authorities are
/// compared across the Workload API and the servers' bundles.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// The chain, key and bundle of one `X509SVID` message, split into DER
/// certificates; `None` when the chain or bundle is not clean DER. No
/// X509-SVID rule is checked here (see [`svid::inspect`]).
pub fn raw_identity(s: &X509svid) -> Option<RawIdentity> {
    let chain = svid::split_der(&s.x509_svid).ok()?;
    let bundle = svid::split_der(&s.bundle).ok()?;
    Some((
        chain.into_iter().map(<[u8]>::to_vec).collect(),
        s.x509_svid_key.clone(),
        bundle.into_iter().map(<[u8]>::to_vec).collect(),
    ))
}

/// A Workload API request carrying the security header.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// Every error code [`failed`] and the session report (metric labels).
pub const ERROR_CODES: [&str; 13] = [
    "invalid_argument",
    "unimplemented",
    NO_IDENTITY,
    "unavailable",
    "deadline_exceeded",
    "cancelled",
    "internal",
    "unknown",
    "resource_exhausted",
    "other",
    "invalid_endpoint",
    "unanswered",
    "stream_ended",
];

/// Maps a gRPC status to how we react, per the Workload API spec.
fn failed(status: &Status) -> End {
    let (code, retry) = match status.code() {
        Code::InvalidArgument => ("invalid_argument", false),
        Code::Unimplemented => ("unimplemented", false),
        Code::PermissionDenied => (NO_IDENTITY, true),
        Code::Unavailable => ("unavailable", true),
        Code::DeadlineExceeded => ("deadline_exceeded", true),
        Code::Cancelled => ("cancelled", true),
        Code::Internal => ("internal", true),
        Code::Unknown => ("unknown", true),
        Code::ResourceExhausted => ("resource_exhausted", true),
        _ => ("other", true),
    };
    End::Failed {
        code,
        detail: status.message().to_string(),
        retry,
        unanswered: false,
    }
}

#[cfg(test)]
mod tests;
