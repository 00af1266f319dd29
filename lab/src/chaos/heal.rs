//! The heal check of a chaos run: is the workload served a valid X.509-SVID
//! again, and does a handshake with it succeed?
//!
//! Validity ([`judge`]): the SVID follows the X509-SVID rules
//! ([`svid::inspect`]) with its chain verified against the servers' current
//! bundle (not the bundle the agent hands out, which may be stale), it is
//! within its validity period, and its issuing authority (the leaf's
//! authority key id, which is SPIRE's X.509 authority id) is not tainted.
//! The handshake is mutual TLS with that SVID as client certificate against
//! a reference peer ([`RefPeer`]: a [`Peer`] that reloads, fed by agent 1),
//! or, for [`super::Fault::PeerNeverReloads`], against the faulted peer, which
//! must then serve the serial currently issued.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use spire_healer::clock::{Clock as _, SystemClock};
use spire_healer::endpoint::Endpoint;
use spire_healer::proto::workload::X509svidRequest;
use spire_healer::proto::workload::X509svidResponse;
use spire_healer::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spire_healer::sensors::server_api::error_chain;
use spire_healer::sensors::workload_api::{raw_identity, request};
use spire_healer::spiffe_id::SpiffeId;
use spire_healer::spire_api::tls::RawIdentity;
use spire_healer::svid::{self, Inspection, LeafInfo};

use crate::LabError;
use crate::peer::{OnHup, Peer, PeerAnswer, ask_serial};
use crate::svid_files::SvidFileSet;

/// Bound of one Workload API fetch (dial + first message).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound of one handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the workload is not healed (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotHealed {
    /// The Workload API did not answer.
    NoAnswer(String),
    /// It answered without an SVID for the workload.
    NoSvid(String),
    /// The SVID breaks an X509-SVID rule or does not chain to the servers'
    /// current bundle.
    Invalid(String),
    /// Outside its validity period.
    Expired,
    /// Signed by a tainted authority.
    Tainted(String),
    /// The handshake failed.
    Handshake(String),
    /// The peer serves another serial than the one issued.
    StaleServed {
        /// Served.
        served: String,
        /// Issued.
        issued: String,
    },
    /// The agent has not synced with a server since the injection.
    NotSynced,
}

impl fmt::Display for NotHealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotHealed::NoAnswer(e) => write!(f, "workload API: {e}"),
            NotHealed::NoSvid(e) => write!(f, "no SVID: {e}"),
            NotHealed::Invalid(e) => write!(f, "invalid SVID: {e}"),
            NotHealed::Expired => f.write_str("SVID expired"),
            NotHealed::Tainted(a) => write!(f, "SVID from tainted authority {a}"),
            NotHealed::Handshake(e) => write!(f, "handshake: {e}"),
            NotHealed::StaleServed { served, issued } => {
                write!(f, "peer serves {served}, issued {issued}")
            }
            NotHealed::NotSynced => f.write_str("agent not synced since the injection"),
        }
    }
}

/// The validity rules (see the module docs) on an inspection made against
/// the servers' current bundle.
///
/// # Errors
/// The first rule broken.
pub fn judge(
    inspection: &Inspection,
    now: SystemTime,
    tainted: &BTreeSet<String>,
) -> Result<LeafInfo, NotHealed> {
    let leaf = inspection
        .leaf
        .clone()
        .ok_or_else(|| NotHealed::Invalid("unparsable leaf".into()))?;
    if let Some(p) = &inspection.problem {
        return Err(NotHealed::Invalid(p.to_string()));
    }
    if now < leaf.not_before || now >= leaf.not_after {
        return Err(NotHealed::Expired);
    }
    if tainted.contains(&leaf.issuer.to_ascii_lowercase()) {
        return Err(NotHealed::Tainted(leaf.issuer));
    }
    Ok(leaf)
}

/// A valid SVID as fetched.
#[derive(Clone)]
pub struct Fetched {
    /// Its leaf.
    pub leaf: LeafInfo,
    /// Chain, key and (agent) bundle, for TLS.
    pub identity: RawIdentity,
    /// The message, to write files from.
    pub response: X509svidResponse,
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("leaf", &self.leaf)
            .finish_non_exhaustive()
    }
}

/// The first `FetchX509SVID` message of the agent at `socket`.
///
/// # Errors
/// [`NotHealed::NoAnswer`].
pub async fn fetch_message(socket: &Path) -> Result<X509svidResponse, NotHealed> {
    let endpoint = Endpoint::Unix(socket.to_path_buf());
    let once = async {
        let channel = endpoint
            .channel(FETCH_TIMEOUT)
            .map_err(|e| error_chain(&e))?;
        let mut client =
            SpiffeWorkloadApiClient::new(channel).max_decoding_message_size(4 * 1024 * 1024);
        let mut stream = client
            .fetch_x509svid(request(X509svidRequest {}))
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        stream
            .message()
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .ok_or_else(|| "stream ended".to_string())
    };
    timeout(FETCH_TIMEOUT, once)
        .await
        .map_err(|_| NotHealed::NoAnswer(format!("no answer within {FETCH_TIMEOUT:?}")))?
        .map_err(NotHealed::NoAnswer)
}

/// Fetches `wanted`'s SVID from the agent at `socket` and [`judge`]s it
/// against `server_bundle` (concatenated DER).
///
/// # Errors
/// The first reason it is not healed.
pub async fn fetch_valid(
    socket: &Path,
    wanted: &str,
    server_bundle: &[u8],
    tainted: &BTreeSet<String>,
) -> Result<Fetched, NotHealed> {
    let response = fetch_message(socket).await?;
    let s = response
        .svids
        .iter()
        .find(|s| s.spiffe_id == wanted)
        .ok_or_else(|| {
            let ids: Vec<&str> = response
                .svids
                .iter()
                .map(|s| s.spiffe_id.as_str())
                .collect();
            NotHealed::NoSvid(format!("{wanted} not among {ids:?}"))
        })?;
    let inspection = svid::inspect(&s.spiffe_id, &s.x509_svid, server_bundle);
    let leaf = judge(&inspection, SystemClock.now(), tainted)?;
    let identity =
        raw_identity(s).ok_or_else(|| NotHealed::Invalid("unparsable chain or bundle".into()))?;
    let only = X509svidResponse {
        svids: vec![s.clone()],
        ..X509svidResponse::default()
    };
    Ok(Fetched {
        leaf,
        identity,
        response: only,
    })
}

/// A handshake with `identity` against the peer at `endpoint`, which must
/// present `server_id`.
///
/// # Errors
/// [`NotHealed::Handshake`].
pub async fn handshake(
    endpoint: &Endpoint,
    identity: RawIdentity,
    server_id: &str,
) -> Result<PeerAnswer, NotHealed> {
    let id = SpiffeId::parse(server_id).map_err(|e| NotHealed::Handshake(e.to_string()))?;
    ask_serial(endpoint, identity, &id, HANDSHAKE_TIMEOUT)
        .await
        .map_err(|e| NotHealed::Handshake(error_chain(&e)))
}

/// The servers' bundle, as `spire-server bundle show` prints it (PEM), as
/// concatenated DER for [`svid::inspect`].
///
/// # Errors
/// [`LabError::Output`] when it holds no certificate.
pub fn bundle_der(pem: &[u8]) -> Result<Vec<u8>, LabError> {
    let certs = svid::pem::parse_certificates(pem, 1 << 20).map_err(|e| LabError::Output {
        command: "spire-server bundle show".into(),
        reason: e.to_string(),
        output: String::new(),
    })?;
    if certs.is_empty() {
        return Err(LabError::Output {
            command: "spire-server bundle show".into(),
            reason: "no certificate".into(),
            output: String::from_utf8_lossy(pem).chars().take(80).collect(),
        });
    }
    Ok(certs.concat())
}

// === Reference peer ===

/// A peer that reloads, with an SVID from agent 1 kept current: the other
/// end of every heal-check handshake (agent 1 stays out of agent faults).
pub struct RefPeer {
    peer: Arc<Peer>,
    endpoint: Endpoint,
    spiffe_id: String,
    shutdown: CancellationToken,
}

impl fmt::Debug for RefPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefPeer")
            .field("endpoint", &self.endpoint)
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

impl RefPeer {
    /// Waits (bounded by `limit`) for `spiffe_id`'s SVID on the agent at
    /// `socket`, writes its files in `dir`, serves them on `dir/ref.sock`
    /// and keeps them current (checked every second; reloaded on change).
    ///
    /// # Errors
    /// No SVID within `limit`, or the peer cannot start.
    pub async fn start(
        socket: &Path,
        spiffe_id: &str,
        dir: &Path,
        limit: Duration,
    ) -> Result<RefPeer, LabError> {
        let deadline = tokio::time::Instant::now() + limit;
        let files = loop {
            let last = match fetch_message(socket).await {
                Ok(resp) => match pick(&resp, spiffe_id) {
                    Some(f) => break f,
                    None => format!("no {spiffe_id} yet"),
                },
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(LabError::State(format!(
                    "the reference peer's SVID never came: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        files
            .write(dir)
            .map_err(|e| LabError::State(error_chain(&e)))?;
        let listen = Endpoint::Unix(dir.join("ref.sock"));
        let peer = Peer::bind(dir, &listen, OnHup::Reload)
            .await
            .map_err(|e| LabError::State(format!("reference peer: {}", error_chain(&e))))?;
        let peer = Arc::new(peer);
        let shutdown = CancellationToken::new();
        let serving = peer.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { serving.serve(stop).await });
        let keeper = peer.clone();
        let stop = shutdown.clone();
        let (socket, id, dir): (PathBuf, String, PathBuf) = (
            socket.to_path_buf(),
            spiffe_id.to_string(),
            dir.to_path_buf(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let Ok(resp) = fetch_message(&socket).await else {
                    continue;
                };
                if let Some(f) = pick(&resp, &id)
                    && f.serial != keeper.serial()
                    && f.write(&dir).is_ok()
                {
                    let _ = keeper.hangup();
                }
            }
        });
        Ok(RefPeer {
            peer,
            endpoint: listen,
            spiffe_id: spiffe_id.to_string(),
            shutdown,
        })
    }

    /// Where it listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The SPIFFE ID it presents.
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// The serial it serves.
    pub fn serial(&self) -> String {
        self.peer.serial()
    }
}

impl Drop for RefPeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `spiffe_id`'s SVID of a message, as files.
pub fn pick(resp: &X509svidResponse, spiffe_id: &str) -> Option<SvidFileSet> {
    let only = X509svidResponse {
        svids: resp
            .svids
            .iter()
            .filter(|s| s.spiffe_id == spiffe_id)
            .cloned()
            .collect(),
        ..X509svidResponse::default()
    };
    SvidFileSet::from_response(&only).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use spire_healer::svid::SvidError;
    use std::time::UNIX_EPOCH;

    fn leaf(issuer: &str, from: u64, to: u64) -> LeafInfo {
        LeafInfo {
            spiffe_id: "spiffe://healer.test/workload".into(),
            serial: "1f".into(),
            not_before: UNIX_EPOCH + Duration::from_secs(from),
            not_after: UNIX_EPOCH + Duration::from_secs(to),
            issuer: issuer.into(),
        }
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn validity_rules() {
        let none = BTreeSet::new();
        let ok = Inspection {
            leaf: Some(leaf("ab01", 100, 200)),
            problem: None,
        };
        assert_eq!(
            judge(&ok, at(150), &none).map(|l| l.serial),
            Ok("1f".into())
        );
        // Expired, and not yet valid.
        assert_eq!(judge(&ok, at(200), &none), Err(NotHealed::Expired));
        assert_eq!(judge(&ok, at(99), &none), Err(NotHealed::Expired));
        // Signed by a tainted authority (ids compare case-insensitively).
        let tainted: BTreeSet<String> = ["ab01".to_string()].into();
        assert_eq!(
            judge(&ok, at(150), &tainted),
            Err(NotHealed::Tainted("ab01".into()))
        );
        let upper = Inspection {
            leaf: Some(leaf("AB01", 100, 200)),
            problem: None,
        };
        assert!(matches!(
            judge(&upper, at(150), &tainted),
            Err(NotHealed::Tainted(_))
        ));
        // Not chaining to the current bundle (or any rule broken).
        let untrusted = Inspection {
            leaf: Some(leaf("cd02", 100, 200)),
            problem: Some(SvidError::UntrustedChain),
        };
        assert!(matches!(
            judge(&untrusted, at(150), &none),
            Err(NotHealed::Invalid(_))
        ));
        let unparsable = Inspection {
            leaf: None,
            problem: Some(SvidError::EmptyChain),
        };
        assert!(matches!(
            judge(&unparsable, at(150), &none),
            Err(NotHealed::Invalid(_))
        ));
    }

    #[test]
    fn bundles_parse_from_pem() {
        assert!(bundle_der(b"").is_err());
        assert!(bundle_der(b"not pem").is_err());
    }
}
