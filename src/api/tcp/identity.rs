//! Our own X509-SVID for the API over TCP, from the Workload API: a
//! watcher for the server (every rotation applies from the next
//! handshake) and a one-shot fetch for clients. Both pick the same SVID
//! ([`pick_svid`]): the one named, or the first valid one.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::endpoint::{Endpoint, EndpointError};
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::workload::{X509svidRequest, X509svidResponse};
use crate::sensors::workload_api::{raw_identity, request};
use crate::spiffe_id::SpiffeId;
use crate::spire_api::tls::{IdentitySource, RawIdentity};
use crate::svid;

/// How long one dial of the Workload API may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

// === Picking ===

/// Why no SVID of a `FetchX509SVID` message can be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The message holds no SVID at all.
    #[error("the Workload API handed out no X509-SVID")]
    Empty,
    /// The SVID asked for is not among those handed out.
    #[error("the Workload API did not hand out {want} (it handed out {offered:?})")]
    NotOffered {
        /// The SPIFFE ID asked for.
        want: String,
        /// The SPIFFE IDs handed out.
        offered: Vec<String>,
    },
    /// The only candidates break the X509-SVID rules.
    #[error("the X509-SVID of {spiffe_id} is invalid: {problem}")]
    Invalid {
        /// The candidate's SPIFFE ID.
        spiffe_id: String,
        /// The first rule it breaks.
        problem: String,
    },
}

/// The SVID to use from one `FetchX509SVID` message: the one for `want`,
/// or the first valid one (the Workload API's default comes first).
///
/// # Errors
/// [`PickError`] when there is none, the one asked for is missing, or the
/// candidates are invalid (see [`svid::inspect`]).
pub fn pick_svid(
    resp: &X509svidResponse,
    want: Option<&SpiffeId>,
) -> Result<RawIdentity, PickError> {
    if resp.svids.is_empty() {
        return Err(PickError::Empty);
    }
    let mut first_problem = None;
    for s in resp
        .svids
        .iter()
        .filter(|s| want.is_none_or(|w| w.as_str() == s.spiffe_id))
    {
        let inspection = svid::inspect(&s.spiffe_id, &s.x509_svid, &s.bundle);
        let found = match inspection.problem {
            None => raw_identity(s).ok_or_else(|| "the chain or bundle is not DER".to_string()),
            Some(problem) => Err(problem.to_string()),
        };
        match found {
            Ok(identity) => return Ok(identity),
            Err(problem) => {
                first_problem.get_or_insert(PickError::Invalid {
                    spiffe_id: s.spiffe_id.clone(),
                    problem,
                });
            }
        }
    }
    Err(first_problem.unwrap_or_else(|| PickError::NotOffered {
        want: want.map(|w| w.as_str().to_string()).unwrap_or_default(),
        offered: resp.svids.iter().map(|s| s.spiffe_id.clone()).collect(),
    }))
}

// === One-shot fetch ===

/// Why no SVID could be fetched.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The endpoint is unusable.
    #[error("Workload API endpoint {endpoint}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why.
        #[source]
        source: EndpointError,
    },
    /// The Workload API did not answer (not running, wrong path, timeout).
    #[error("the Workload API at {endpoint} is unreachable: {status}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// The call's status.
        status: String,
    },
    /// The agent answered but has no SVID for this process (no
    /// registration entry matches it).
    #[error("the Workload API at {endpoint} has no X509-SVID for this process: {message}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The agent's message.
        message: String,
    },
    /// None of the SVIDs handed out can be used.
    #[error("Workload API at {endpoint}: {source}")]
    Pick {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: PickError,
    },
}

impl IdentityError {
    /// Whether the Workload API refused us an identity (rather than not
    /// being there): an authentication problem, not an outage.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. } | Self::Pick { .. })
    }
}

/// One `FetchX509SVID` round trip: our SVID (see [`pick_svid`]) as the
/// agent at `endpoint` hands it out now.
///
/// # Errors
/// [`IdentityError`]: the endpoint is unusable or does not answer within
/// `timeout`, or the agent has no usable SVID for us.
pub async fn fetch_once(
    endpoint: &Endpoint,
    want: Option<&SpiffeId>,
    timeout: Duration,
) -> Result<RawIdentity, IdentityError> {
    let name = endpoint.to_string();
    let channel = endpoint
        .channel(timeout)
        .map_err(|source| IdentityError::Endpoint {
            endpoint: name.clone(),
            source,
        })?;
    let unreachable = |status: String| IdentityError::Unreachable {
        endpoint: name.clone(),
        status,
    };
    let fetch = async {
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut stream = client
            .fetch_x509svid(request(X509svidRequest {}))
            .await
            .map_err(|s| status_error(&name, &s))?
            .into_inner();
        stream
            .message()
            .await
            .map_err(|s| status_error(&name, &s))?
            .ok_or_else(|| unreachable("the agent closed the stream".into()))
    };
    let resp = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))??;
    pick_svid(&resp, want).map_err(|source| IdentityError::Pick {
        endpoint: name.clone(),
        source,
    })
}

fn status_error(endpoint: &str, s: &Status) -> IdentityError {
    match s.code() {
        Code::PermissionDenied => IdentityError::Refused {
            endpoint: endpoint.to_string(),
            message: s.message().to_string(),
        },
        code => IdentityError::Unreachable {
            endpoint: endpoint.to_string(),
            status: format!("{code}: {}", s.message()),
        },
    }
}

// === impl WorkloadIdentity ===

/// Our SVID as the Workload API streams it: [`run`](Self::run) keeps a
/// `FetchX509SVID` stream open (reconnecting with capped backoff) and
/// keeps the SVID [`pick_svid`] chooses from each message. The last good
/// SVID is kept while the stream is down or a message has none usable: it
/// stays valid until it expires.
pub struct WorkloadIdentity {
    endpoint: Endpoint,
    want: Option<SpiffeId>,
    current: Mutex<Option<RawIdentity>>,
    /// Counts the SVIDs taken, so a reader can wait for the next one.
    taken: watch::Sender<u64>,
}

impl fmt::Debug for WorkloadIdentity {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("endpoint", &self.endpoint)
            .field("want", &self.want)
            .field("taken", &*self.taken.borrow())
            .finish_non_exhaustive()
    }
}

impl IdentitySource for WorkloadIdentity {
    fn current(&self) -> Option<RawIdentity> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl WorkloadIdentity {
    /// A watcher of `endpoint` keeping the SVID of `want` (default: the
    /// first valid one). Holds nothing until [`run`](Self::run) receives it.
    pub fn new(endpoint: Endpoint, want: Option<SpiffeId>) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            want,
            current: Mutex::new(None),
            taken: watch::Sender::new(0),
        })
    }

    /// A receiver whose value counts the SVIDs taken so far (0 until the
    /// first arrives).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.taken.subscribe()
    }

    /// Streams until `shutdown`.
    ///
    /// # Cancel safety
    /// Holds nothing but the stream; dropping it closes it.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut last_error = String::new();
        loop {
            let (error, got_any) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                ended = self.session() => ended,
            };
            if got_any {
                backoff = BACKOFF_MIN;
            }
            if error != last_error {
                warn!(endpoint = %self.endpoint, %error, retry_in = ?backoff, "Workload API stream for our API identity failed.");
                last_error = error;
            } else {
                debug!(endpoint = %self.endpoint, error = %last_error, "Workload API stream for our API identity failed again.");
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream, until it breaks: (why, whether any message came).
    async fn session(&self) -> (String, bool) {
        let channel = match self.endpoint.channel(CONNECT_TIMEOUT) {
            Ok(c) => c,
            Err(e) => return (e.to_string(), false),
        };
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut stream = match client.fetch_x509svid(request(X509svidRequest {})).await {
            Ok(s) => s.into_inner(),
            Err(s) => return (format!("{}: {}", s.code(), s.message()), false),
        };
        let mut got_any = false;
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    got_any = true;
                    self.take(&resp);
                }
                Ok(None) => return ("the agent closed the stream".into(), got_any),
                Err(s) => return (format!("{}: {}", s.code(), s.message()), got_any),
            }
        }
    }

    fn take(&self, resp: &X509svidResponse) {
        match pick_svid(resp, self.want.as_ref()) {
            Ok(identity) => {
                let leaf = identity.0.first().and_then(|l| svid::leaf_info(l).ok());
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity);
                self.taken.send_modify(|n| *n += 1);
                if let Some(l) = leaf {
                    info!(spiffe_id = %l.spiffe_id, serial = %l.serial, "API identity updated.");
                }
            }
            Err(error) => {
                warn!(endpoint = %self.endpoint, %error, "No usable X509-SVID for the API; keeping the last one.");
            }
        }
    }
}
