//! Typed clients for SPIRE's admin APIs on Unix sockets.
//!
//! - [`ServerAdminClient`]: a spire-server's local admin socket
//!   (`socket_path`), which serves Agent, Entry, Bundle and Debug to any local
//!   caller that can open the socket.
//! - [`AgentAdminClient`]: a spire-agent's admin socket
//!   (`admin_socket_path`, off by default), which serves Debug.
//!
//! [`ServerAdminClient::tcp_mtls`] reaches a server's TCP port instead,
//! over mTLS with our own X509-SVID ([`tls`]): Agent, Entry and Bundle for
//! IDs in the server's `admin_ids`, never Debug.
//!
//! Every call carries a deadline: the `grpc-timeout` header (so SPIRE can
//! give up too) and a local timer, so a server that accepts the connection but
//! never answers (SIGSTOPped, wedged) costs at most the timeout. Paging is
//! bounded by a page count and stops on a repeated or empty-page token. All
//! answers are converted into domain types ([`crate::model`]); anything we
//! cannot read is a [`SpireApiError::Decode`], never a panic.
//!
//! Errors carry a closed-set [`SpireApiError::kind`] for metric labels.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Status};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use crate::endpoint::{Endpoint, EndpointError};
use crate::model::{Authority, ServerAgent};
use crate::proto::spire::agent::debug::v1 as agent_debug;
use crate::proto::spire::api::server::agent::v1 as agent;
use crate::proto::spire::api::server::bundle::v1 as bundle;
use crate::proto::spire::api::server::debug::v1 as server_debug;
use crate::proto::spire::api::server::entry::v1 as entry;
use crate::proto::spire::api::types;
use crate::spiffe_id::{SpiffeId, SpiffeIdError};

pub mod tls;

/// Largest answer we accept (a 500-agent page with selectors is ~100 KiB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Page size used where we need a complete answer (entry listings).
const ENTRY_PAGE_SIZE: i32 = 200;
/// Page bound for entry listings filtered by SPIFFE ID.
const ENTRY_MAX_PAGES: u32 = 50;

// === Errors ===

/// Why an admin API call failed.
#[derive(Debug, thiserror::Error)]
pub enum SpireApiError {
    /// The socket path holds something other than a socket, or cannot be
    /// inspected.
    #[error("admin socket {}", path.display())]
    Endpoint {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: EndpointError,
    },
    /// No connection could be made (no socket, permission denied, nobody
    /// listening, not HTTP/2).
    #[error("{rpc}: cannot reach the admin socket ({kind})")]
    Connect {
        /// The RPC attempted.
        rpc: &'static str,
        /// Closed-set class (see [`SpireApiError::kind`]).
        kind: &'static str,
        /// The transport's error.
        #[source]
        source: Status,
    },
    /// No answer within the deadline.
    #[error("{rpc}: no answer within {after:?}")]
    Timeout {
        /// The RPC attempted.
        rpc: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The server answered with a non-OK gRPC status.
    #[error("{rpc}: the server answered {code:?}: {message}", code = .status.code(), message = .status.message())]
    Status {
        /// The RPC attempted.
        rpc: &'static str,
        #[source]
        status: Status,
    },
    /// The answer arrived but is not usable (missing ID, bad certificate,
    /// invalid SPIFFE ID).
    #[error("{rpc}: unusable answer: {detail}")]
    Decode {
        /// The RPC whose answer it was.
        rpc: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A listing that must be complete did not end within the page bound.
    #[error("{rpc}: still paging after {pages} pages")]
    PagingLimit {
        rpc: &'static str,
        /// Pages read.
        pages: u32,
    },
    /// A batch call answered OK overall but refused the item.
    #[error("{rpc}: the server refused entry {entry_id:?}: {code:?}: {message}")]
    Rejected {
        rpc: &'static str,
        /// The entry concerned.
        entry_id: String,
        /// The per-item status code.
        code: Code,
        /// The per-item status message.
        message: String,
    },
    /// A caller-supplied SPIFFE ID is not valid.
    #[error("{id:?} is not a valid SPIFFE ID")]
    InvalidSpiffeId {
        /// The ID as given.
        id: String,
        /// Why.
        #[source]
        source: SpiffeIdError,
    },
    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
}

impl SpireApiError {
    /// Stable snake_case label: `not_a_socket`, `inspect`,
    /// `invalid_endpoint`, `socket_missing`,
    /// `permission_denied`, `connection_refused`, `unavailable`, `protocol`,
    /// `timeout`, `unauthenticated`, `not_found`, `invalid_argument`,
    /// `unimplemented`, `internal`, `resource_exhausted`,
    /// `failed_precondition`, `cancelled`, `unknown`, `other`, `decode`,
    /// `paging_limit`, `rejected`, `invalid_spiffe_id`; over TCP also
    /// `no_identity`, `bad_server_id`, `tls` (see [`tls::TlsError::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Endpoint { source, .. } => match source {
                EndpointError::NotASocket { .. } => "not_a_socket",
                EndpointError::Inspect { source, .. }
                    if source.kind() == io::ErrorKind::PermissionDenied =>
                {
                    "permission_denied"
                }
                EndpointError::Inspect { .. } => "inspect",
                _ => "invalid_endpoint",
            },
            Self::Connect { kind, .. } => kind,
            Self::Timeout { .. } => "timeout",
            Self::Status { status, .. } => code_kind(status.code()),
            Self::Decode { .. } => "decode",
            Self::PagingLimit { .. } => "paging_limit",
            Self::Rejected { .. } => "rejected",
            Self::InvalidSpiffeId { .. } => "invalid_spiffe_id",
            Self::InvalidArgument(_) => "invalid_argument",
        }
    }
}

fn code_kind(code: Code) -> &'static str {
    match code {
        Code::Unavailable => "unavailable",
        Code::PermissionDenied => "permission_denied",
        Code::Unauthenticated => "unauthenticated",
        Code::NotFound => "not_found",
        Code::InvalidArgument => "invalid_argument",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::DeadlineExceeded => "timeout",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        _ => "other",
    }
}

/// Classifies a failed call: our deadline, a connection failure (by the
/// `io::Error` underneath), an HTTP/2 failure, or the server's own status.
fn classify(rpc: &'static str, after: Duration, status: Status) -> SpireApiError {
    let mut io_kind = None;
    let mut timed_out = false;
    let mut transport = false;
    let mut tls_kind = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&status);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            timed_out = true;
        }
        if let Some(e) = err.downcast_ref::<io::Error>() {
            io_kind.get_or_insert(e.kind());
        }
        if let Some(kind) = err
            .downcast_ref::<tls::TlsError>()
            .and_then(tls::TlsError::kind)
        {
            tls_kind.get_or_insert(kind);
        }
        if err.is::<tonic::transport::Error>() || err.is::<hyper::Error>() {
            transport = true;
        }
        source = err.source();
    }
    if timed_out || status.code() == Code::DeadlineExceeded {
        return SpireApiError::Timeout { rpc, after };
    }
    if let Some(kind) = tls_kind {
        return SpireApiError::Connect {
            rpc,
            kind,
            source: status,
        };
    }
    let kind = match io_kind {
        Some(io::ErrorKind::PermissionDenied) => Some("permission_denied"),
        Some(io::ErrorKind::NotFound) => Some("socket_missing"),
        Some(io::ErrorKind::ConnectionRefused) => Some("connection_refused"),
        Some(io::ErrorKind::TimedOut) => return SpireApiError::Timeout { rpc, after },
        Some(_) => Some("unavailable"),
        // A peer that is not an HTTP/2 gRPC server (garbage, early close).
        None if transport => Some("protocol"),
        None => None,
    };
    match kind {
        Some(kind) => SpireApiError::Connect {
            rpc,
            kind,
            source: status,
        },
        None => SpireApiError::Status { rpc, status },
    }
}

/// Runs one RPC future under the deadline `after`.
async fn deadline<T>(
    rpc: &'static str,
    after: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, SpireApiError> {
    match tokio::time::timeout(after, call).await {
        Err(_) => Err(SpireApiError::Timeout { rpc, after }),
        Ok(Err(status)) => Err(classify(rpc, after, status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

/// A request carrying the `grpc-timeout` header.
fn request<T>(msg: T, after: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(after);
    req
}

// === Conversions ===

/// `spiffe://<trust_domain><path>`, validated. A path without a leading `/`
/// gets one.
///
/// # Errors
/// The parts do not form a valid SPIFFE ID (the reason as text).
fn spiffe_id_from_proto(id: &types::Spiffeid) -> Result<String, String> {
    let sep = if id.path.is_empty() || id.path.starts_with('/') {
        ""
    } else {
        "/"
    };
    let s = format!("spiffe://{}{sep}{}", id.trust_domain, id.path);
    SpiffeId::parse(&s)
        .map(|_| s.clone())
        .map_err(|e| format!("{s:?}: {e}"))
}

/// The proto form of a SPIFFE ID string.
///
/// # Errors
/// [`SpireApiError::InvalidSpiffeId`] when `id` is not a SPIFFE ID.
pub fn spiffe_id_to_proto(id: &str) -> Result<types::Spiffeid, SpireApiError> {
    let parsed = SpiffeId::parse(id).map_err(|source| SpireApiError::InvalidSpiffeId {
        id: id.to_string(),
        source,
    })?;
    Ok(types::Spiffeid {
        trust_domain: parsed.trust_domain().as_str().to_string(),
        path: parsed.path().to_string(),
    })
}

/// Unix seconds to a `SystemTime`; negative values clamp to the epoch.
fn unix_secs(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Unix seconds, `None` for zero or negative (Go's zero time is negative).
fn unix_secs_opt(secs: i64) -> Option<SystemTime> {
    (secs > 0).then(|| unix_secs(secs))
}

fn count(n: i32) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A decimal serial number (as SPIRE's ListAgents prints it, Go's
/// `big.Int.String()`) in lower-case hex without leading zeros, the form the
/// Workload API sensor uses ([`crate::svid::LeafInfo::serial`]). `None` when
/// `dec` is empty or not all ASCII digits.
pub fn decimal_serial_to_hex(dec: &str) -> Option<String> {
    if dec.is_empty() || !dec.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Little-endian base-2^32 limbs; multiply by 10 and add each digit.
    let mut limbs: Vec<u32> = vec![0];
    for d in dec.bytes().map(|b| u64::from(b - b'0')) {
        let mut carry = d;
        for limb in &mut limbs {
            let v = u64::from(*limb) * 10 + carry;
            *limb = (v & 0xffff_ffff) as u32;
            carry = v >> 32;
        }
        if carry > 0 {
            limbs.push(carry as u32);
        }
    }
    let mut hex: String = limbs.iter().rev().map(|l| format!("{l:08x}")).collect();
    let digits = hex.trim_start_matches('0').len();
    hex.drain(..hex.len() - digits.max(1));
    Some(hex)
}

/// One listed agent as a [`ServerAgent`]. The serial, which SPIRE sends in
/// decimal, is converted to lower-case hex (kept as sent if not decimal).
///
/// # Errors
/// The agent has no ID or an invalid one.
fn server_agent_from_proto(a: &types::Agent) -> Result<ServerAgent, String> {
    let id = a.id.as_ref().ok_or("an agent has no id")?;
    let serial = &a.x509svid_serial_number;
    Ok(ServerAgent {
        spiffe_id: spiffe_id_from_proto(id)?,
        attestation_type: a.attestation_type.clone(),
        serial: decimal_serial_to_hex(serial).unwrap_or_else(|| serial.clone()),
        expires_at: unix_secs(a.x509svid_expires_at),
        banned: a.banned,
        can_reattest: a.can_reattest,
    })
}

/// One X.509 authority of a bundle as an [`Authority`]: SHA-256 of the DER
/// as the fingerprint, the subject key identifier (hex) as the key id (empty
/// when absent), notAfter.
///
/// # Errors
/// The bytes are not one DER certificate.
fn authority_from_der(der: &[u8], tainted: bool) -> Result<Authority, String> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("an X.509 authority does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "an X.509 authority has {} trailing bytes",
            rest.len()
        ));
    }
    let key_id = cert
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ki) => Some(hex::encode(ki.0)),
            _ => None,
        })
        .unwrap_or_default();
    let not_after = unix_secs(cert.validity().not_after.timestamp());
    Ok(Authority {
        fingerprint: hex::encode(Sha256::digest(der)),
        key_id,
        not_after,
        tainted,
    })
}

// === Answers ===

/// One certificate of a SPIRE process's own SVID chain (Debug.GetInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCert {
    /// Its SPIFFE ID; `None` for certificates without one (CAs).
    pub spiffe_id: Option<String>,
    /// notAfter.
    pub expires_at: SystemTime,
    /// Subject DN as SPIRE prints it.
    pub subject: String,
}

/// Earliest notAfter of a chain.
fn earliest(chain: &[ChainCert]) -> Option<SystemTime> {
    chain.iter().map(|c| c.expires_at).min()
}

fn chain_from_proto(
    rpc: &'static str,
    certs: impl Iterator<Item = (Option<types::Spiffeid>, i64, String)>,
) -> Result<Vec<ChainCert>, SpireApiError> {
    certs
        .map(|(id, expires_at, subject)| {
            let spiffe_id = id
                .as_ref()
                .map(spiffe_id_from_proto)
                .transpose()
                .map_err(|detail| SpireApiError::Decode { rpc, detail })?;
            Ok(ChainCert {
                spiffe_id,
                expires_at: unix_secs(expires_at),
                subject,
            })
        })
        .collect()
}

/// Server Debug.GetInfo. SPIRE caches this answer for 5 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDebugInfo {
    /// Server uptime, seconds.
    pub uptime_secs: u64,
    /// Attested agents.
    pub agents_count: u64,
    /// Registration entries.
    pub entries_count: u64,
    /// Federated bundles.
    pub federated_bundles_count: u64,
    /// The server's own SVID chain, leaf first.
    pub svid_chain: Vec<ChainCert>,
}

impl ServerDebugInfo {
    /// Earliest notAfter in the server's SVID chain.
    pub fn svid_expires_at(&self) -> Option<SystemTime> {
        earliest(&self.svid_chain)
    }
}

/// Agent Debug.GetInfo. SPIRE caches this answer for 5 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDebugInfo {
    /// Agent uptime, seconds.
    pub uptime_secs: u64,
    /// Last successful sync with a server; `None` before the first.
    pub last_sync_success: Option<SystemTime>,
    /// Cached X.509-SVIDs.
    pub cached_x509_svids: u64,
    /// Cached JWT-SVIDs.
    pub cached_jwt_svids: u64,
    /// Cached SVIDStore X.509-SVIDs.
    pub cached_svidstore_x509_svids: u64,
    /// The agent's own SVID chain, leaf first, up to its root.
    pub svid_chain: Vec<ChainCert>,
}

impl AgentDebugInfo {
    /// The agent's own SPIFFE ID (the leaf's).
    pub fn spiffe_id(&self) -> Option<&str> {
        self.svid_chain.first().and_then(|c| c.spiffe_id.as_deref())
    }

    /// Earliest notAfter in the agent's SVID chain.
    pub fn svid_expires_at(&self) -> Option<SystemTime> {
        earliest(&self.svid_chain)
    }
}

/// A join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The token.
    pub value: String,
    /// When it expires.
    pub expires_at: SystemTime,
}

// === impl ServerAdminClient ===

/// A client for a spire-server's local admin socket.
///
/// Cheap to clone; the channel connects lazily and reconnects on demand, so
/// one client survives server restarts.
#[derive(Debug, Clone)]
pub struct ServerAdminClient {
    /// Empty for a TCP client (nothing to precheck).
    socket: PathBuf,
    channel: Channel,
    timeout: Duration,
    tcp: Option<SocketAddr>,
}

/// Builds a lazy channel to a Unix socket.
fn unix_channel(socket: &Path, timeout: Duration) -> Result<Channel, SpireApiError> {
    Endpoint::Unix(socket.to_path_buf())
        .channel(timeout)
        .map_err(|source| SpireApiError::Endpoint {
            path: socket.to_path_buf(),
            source,
        })
}

/// Fails fast when something other than a socket sits at `socket`. An
/// empty path (a TCP client) passes.
fn precheck(socket: &Path) -> Result<(), SpireApiError> {
    if socket.as_os_str().is_empty() {
        return Ok(());
    }
    Endpoint::Unix(socket.to_path_buf())
        .check()
        .map_err(|source| SpireApiError::Endpoint {
            path: socket.to_path_buf(),
            source,
        })
}

impl ServerAdminClient {
    /// A client for the admin socket at `socket`; every call is bounded by
    /// `timeout`. Nothing is dialled yet.
    ///
    /// # Errors
    /// [`SpireApiError::Endpoint`] if tonic rejects the address.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(socket: &Path, timeout: Duration) -> Result<Self, SpireApiError> {
        Ok(Self {
            socket: socket.to_path_buf(),
            channel: unix_channel(socket, timeout)?,
            timeout,
            tcp: None,
        })
    }

    /// A client for the server's TCP port `addr` over mTLS. Each new
    /// connection presents the X509-SVID `identity` holds at that moment and
    /// accepts only a server whose certificate chains to that SVID's bundle
    /// and names `server_id` (default `spiffe://<our trust
    /// domain>/spire/server`). Every call is bounded by `timeout`, and so is
    /// each dial plus handshake. Nothing is dialled yet. SPIRE answers only
    /// callers in its `admin_ids` (others get `PermissionDenied`) and does not
    /// serve Debug here.
    ///
    /// # Errors
    /// [`SpireApiError::InvalidSpiffeId`] for a bad `server_id`;
    /// [`SpireApiError::Endpoint`] if tonic rejects the address.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn tcp_mtls(
        addr: SocketAddr,
        server_id: Option<&str>,
        identity: Arc<dyn tls::IdentitySource>,
        timeout: Duration,
    ) -> Result<Self, SpireApiError> {
        let server_id = server_id
            .map(|id| {
                SpiffeId::parse(id).map_err(|source| SpireApiError::InvalidSpiffeId {
                    id: id.to_string(),
                    source,
                })
            })
            .transpose()?;
        let connector = tls::MtlsConnector::new(addr, server_id, identity);
        let channel =
            tls::channel(connector, timeout).map_err(|source| SpireApiError::Endpoint {
                path: PathBuf::from(addr.to_string()),
                source: EndpointError::Channel { source },
            })?;
        Ok(Self {
            socket: PathBuf::new(),
            channel,
            timeout,
            tcp: Some(addr),
        })
    }

    /// The socket path; empty for a TCP client.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's TCP address for a [`ServerAdminClient::tcp_mtls`]
    /// client; `None` for the local socket.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    fn agents(&self) -> agent::agent_client::AgentClient<Channel> {
        agent::agent_client::AgentClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
    }

    fn entries(&self) -> entry::entry_client::EntryClient<Channel> {
        entry::entry_client::EntryClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
    }

    /// Debug.GetInfo.
    ///
    /// # Errors
    /// Any [`SpireApiError`]; `Decode` when a chain certificate carries an
    /// invalid SPIFFE ID.
    pub async fn server_debug_info(&self) -> Result<ServerDebugInfo, SpireApiError> {
        const RPC: &str = "Debug.GetInfo";
        precheck(&self.socket)?;
        let mut client = server_debug::debug_client::DebugClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        let r = deadline(
            RPC,
            self.timeout,
            client.get_info(request(server_debug::GetInfoRequest {}, self.timeout)),
        )
        .await?;
        Ok(ServerDebugInfo {
            uptime_secs: count(r.uptime),
            agents_count: count(r.agents_count),
            entries_count: count(r.entries_count),
            federated_bundles_count: count(r.federated_bundles_count),
            svid_chain: chain_from_proto(
                RPC,
                r.svid_chain
                    .into_iter()
                    .map(|c| (c.id, c.expires_at, c.subject)),
            )?,
        })
    }

    /// Agent.ListAgents page by page (`page_size` agents each), reading at
    /// most `max_pages` pages. Returns the agents and whether the listing is
    /// incomplete: true when `max_pages` was reached with more to come, or
    /// when the server repeated a page token or sent an empty page with a
    /// token (paging that would never end).
    ///
    /// # Errors
    /// Any failed page fails the listing; `Decode` for an agent without a
    /// valid ID; `InvalidArgument` for a zero `page_size` or `max_pages`.
    pub async fn list_agents_paged(
        &self,
        page_size: u32,
        max_pages: u32,
    ) -> Result<(Vec<ServerAgent>, bool), SpireApiError> {
        const RPC: &str = "Agent.ListAgents";
        if page_size == 0 || max_pages == 0 {
            return Err(SpireApiError::InvalidArgument(
                "page_size and max_pages must be at least 1",
            ));
        }
        let page_size = i32::try_from(page_size).unwrap_or(i32::MAX);
        precheck(&self.socket)?;
        let mut client = self.agents();
        // Selectors are not needed and make pages several times larger.
        let mask = types::AgentMask {
            attestation_type: true,
            x509svid_serial_number: true,
            x509svid_expires_at: true,
            selectors: false,
            banned: true,
            can_reattest: true,
            agent_version: true,
        };
        let mut out = Vec::new();
        let mut token = String::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..max_pages {
            let req = agent::ListAgentsRequest {
                filter: None,
                output_mask: Some(mask),
                page_size,
                page_token: token.clone(),
            };
            let page = deadline(
                RPC,
                self.timeout,
                client.list_agents(request(req, self.timeout)),
            )
            .await?;
            for a in &page.agents {
                out.push(
                    server_agent_from_proto(a)
                        .map_err(|detail| SpireApiError::Decode { rpc: RPC, detail })?,
                );
            }
            if page.next_page_token.is_empty() {
                return Ok((out, false));
            }
            if page.agents.is_empty() || !seen.insert(page.next_page_token.clone()) {
                tracing::warn!(
                    socket = %self.socket.display(),
                    "Agent listing stopped: the server's paging does not advance."
                );
                return Ok((out, true));
            }
            token = page.next_page_token;
        }
        Ok((out, true))
    }

    /// Bundle.GetBundle: the X.509 authorities and the sequence number.
    ///
    /// # Errors
    /// Any [`SpireApiError`]; `Decode` when an authority is not a DER
    /// certificate.
    pub async fn get_bundle(&self) -> Result<(Vec<Authority>, u64), SpireApiError> {
        const RPC: &str = "Bundle.GetBundle";
        precheck(&self.socket)?;
        let mut client = bundle::bundle_client::BundleClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        let mask = types::BundleMask {
            x509_authorities: true,
            sequence_number: true,
            ..Default::default()
        };
        let b = deadline(
            RPC,
            self.timeout,
            client.get_bundle(request(
                bundle::GetBundleRequest {
                    output_mask: Some(mask),
                },
                self.timeout,
            )),
        )
        .await?;
        let authorities = b
            .x509_authorities
            .iter()
            .map(|c| authority_from_der(&c.asn1, c.tainted))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|detail| SpireApiError::Decode { rpc: RPC, detail })?;
        Ok((authorities, b.sequence_number))
    }

    /// Agent.GetAgent for one agent.
    ///
    /// # Errors
    /// `Status` with `NotFound` for an unknown agent; any other
    /// [`SpireApiError`].
    pub async fn get_agent(&self, spiffe_id: &str) -> Result<ServerAgent, SpireApiError> {
        const RPC: &str = "Agent.GetAgent";
        let id = spiffe_id_to_proto(spiffe_id)?;
        precheck(&self.socket)?;
        let a = deadline(
            RPC,
            self.timeout,
            self.agents().get_agent(request(
                agent::GetAgentRequest {
                    id: Some(id),
                    output_mask: None,
                },
                self.timeout,
            )),
        )
        .await?;
        server_agent_from_proto(&a).map_err(|detail| SpireApiError::Decode { rpc: RPC, detail })
    }

    /// Agent.DeleteAgent (evict): the agent may attest again.
    ///
    /// # Errors
    /// `Status` with `NotFound` for an unknown agent; any other
    /// [`SpireApiError`].
    pub async fn delete_agent(&self, spiffe_id: &str) -> Result<(), SpireApiError> {
        const RPC: &str = "Agent.DeleteAgent";
        let id = spiffe_id_to_proto(spiffe_id)?;
        precheck(&self.socket)?;
        deadline(
            RPC,
            self.timeout,
            self.agents().delete_agent(request(
                agent::DeleteAgentRequest { id: Some(id) },
                self.timeout,
            )),
        )
        .await
    }

    /// Agent.BanAgent: evicts and blocks re-attestation until deleted.
    ///
    /// # Errors
    /// `Status` with `NotFound` for an unknown agent; any other
    /// [`SpireApiError`].
    pub async fn ban_agent(&self, spiffe_id: &str) -> Result<(), SpireApiError> {
        const RPC: &str = "Agent.BanAgent";
        let id = spiffe_id_to_proto(spiffe_id)?;
        precheck(&self.socket)?;
        deadline(
            RPC,
            self.timeout,
            self.agents().ban_agent(request(
                agent::BanAgentRequest { id: Some(id) },
                self.timeout,
            )),
        )
        .await
    }

    /// Agent.CreateJoinToken valid for `ttl` (whole seconds, at least 1),
    /// optionally aliased to `agent_id`.
    ///
    /// # Errors
    /// `InvalidArgument` for a TTL under a second or over `i32::MAX`
    /// seconds; `InvalidSpiffeId`; any other [`SpireApiError`].
    pub async fn create_join_token(
        &self,
        ttl: Duration,
        agent_id: Option<&str>,
    ) -> Result<JoinToken, SpireApiError> {
        const RPC: &str = "Agent.CreateJoinToken";
        let ttl = i32::try_from(ttl.as_secs()).ok().filter(|s| *s > 0).ok_or(
            SpireApiError::InvalidArgument("join token TTL must be 1 s to i32::MAX s"),
        )?;
        let agent_id = agent_id.map(spiffe_id_to_proto).transpose()?;
        precheck(&self.socket)?;
        let t = deadline(
            RPC,
            self.timeout,
            self.agents().create_join_token(request(
                agent::CreateJoinTokenRequest {
                    ttl,
                    token: String::new(),
                    agent_id,
                },
                self.timeout,
            )),
        )
        .await?;
        Ok(JoinToken {
            value: t.value,
            expires_at: unix_secs(t.expires_at),
        })
    }

    /// Entry.GetEntry, every field.
    ///
    /// # Errors
    /// `Status` with `NotFound` for an unknown entry; any other
    /// [`SpireApiError`].
    pub async fn get_entry(&self, entry_id: &str) -> Result<types::Entry, SpireApiError> {
        const RPC: &str = "Entry.GetEntry";
        precheck(&self.socket)?;
        deadline(
            RPC,
            self.timeout,
            self.entries().get_entry(request(
                entry::GetEntryRequest {
                    id: entry_id.to_string(),
                    output_mask: None,
                },
                self.timeout,
            )),
        )
        .await
    }

    /// Entry.ListEntries filtered by SPIFFE ID, every page.
    ///
    /// # Errors
    /// `PagingLimit` when the listing does not end within a fixed page
    /// bound; `InvalidSpiffeId`; any other [`SpireApiError`].
    pub async fn list_entries_by_spiffe_id(
        &self,
        spiffe_id: &str,
    ) -> Result<Vec<types::Entry>, SpireApiError> {
        const RPC: &str = "Entry.ListEntries";
        let id = spiffe_id_to_proto(spiffe_id)?;
        precheck(&self.socket)?;
        let mut client = self.entries();
        let mut out = Vec::new();
        let mut token = String::new();
        for _ in 0..ENTRY_MAX_PAGES {
            let req = entry::ListEntriesRequest {
                filter: Some(entry::list_entries_request::Filter {
                    by_spiffe_id: Some(id.clone()),
                    ..Default::default()
                }),
                output_mask: None,
                page_size: ENTRY_PAGE_SIZE,
                page_token: token,
            };
            let page = deadline(
                RPC,
                self.timeout,
                client.list_entries(request(req, self.timeout)),
            )
            .await?;
            let empty = page.entries.is_empty();
            out.extend(page.entries);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            if empty {
                break;
            }
            token = page.next_page_token;
        }
        Err(SpireApiError::PagingLimit {
            rpc: RPC,
            pages: ENTRY_MAX_PAGES,
        })
    }

    /// Makes SPIRE raise the entry's `revision_number` without changing it:
    /// reads the entry, then writes it back through Entry.BatchUpdateEntry
    /// with an input mask of `hint` alone (set to its current value). Every
    /// update raises the revision, and agents re-sign an entry's SVID when its
    /// revision changes, so this forces a fresh SVID. Returns the new
    /// revision.
    ///
    /// # Errors
    /// `Rejected` naming the per-entry status when the server refuses the
    /// update; `Decode` when the answer has no entry; any other
    /// [`SpireApiError`].
    pub async fn bump_entry(&self, entry_id: &str) -> Result<i64, SpireApiError> {
        const RPC: &str = "Entry.BatchUpdateEntry";
        let current = self.get_entry(entry_id).await?;
        let mask = types::EntryMask {
            hint: true,
            ..Default::default()
        };
        let out_mask = types::EntryMask {
            revision_number: true,
            ..Default::default()
        };
        let resp = deadline(
            RPC,
            self.timeout,
            self.entries().batch_update_entry(request(
                entry::BatchUpdateEntryRequest {
                    entries: vec![current],
                    input_mask: Some(mask),
                    output_mask: Some(out_mask),
                },
                self.timeout,
            )),
        )
        .await?;
        let result = resp
            .results
            .into_iter()
            .next()
            .ok_or_else(|| SpireApiError::Decode {
                rpc: RPC,
                detail: "no result for the entry".into(),
            })?;
        let status = result.status.unwrap_or_default();
        if status.code != 0 {
            return Err(SpireApiError::Rejected {
                rpc: RPC,
                entry_id: entry_id.to_string(),
                code: Code::from_i32(status.code),
                message: status.message,
            });
        }
        result
            .entry
            .map(|e| e.revision_number)
            .ok_or_else(|| SpireApiError::Decode {
                rpc: RPC,
                detail: "an OK result without the entry".into(),
            })
    }
}

// === impl AgentAdminClient ===

/// A client for a spire-agent's admin socket.
///
/// Cheap to clone; connects lazily and reconnects on demand.
#[derive(Debug, Clone)]
pub struct AgentAdminClient {
    socket: PathBuf,
    channel: Channel,
    timeout: Duration,
}

impl AgentAdminClient {
    /// A client for the admin socket at `socket`; every call is bounded by
    /// `timeout`. Nothing is dialled yet.
    ///
    /// # Errors
    /// [`SpireApiError::Endpoint`] if tonic rejects the address.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(socket: &Path, timeout: Duration) -> Result<Self, SpireApiError> {
        Ok(Self {
            socket: socket.to_path_buf(),
            channel: unix_channel(socket, timeout)?,
            timeout,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Debug.GetInfo (`/spire.agent.debug.v1.Debug/GetInfo`).
    ///
    /// # Errors
    /// Any [`SpireApiError`]; `Decode` when a chain certificate carries an
    /// invalid SPIFFE ID.
    pub async fn agent_debug_info(&self) -> Result<AgentDebugInfo, SpireApiError> {
        const RPC: &str = "Debug.GetInfo";
        precheck(&self.socket)?;
        let mut client = agent_debug::debug_client::DebugClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        let r = deadline(
            RPC,
            self.timeout,
            client.get_info(request(agent_debug::GetInfoRequest {}, self.timeout)),
        )
        .await?;
        Ok(AgentDebugInfo {
            uptime_secs: count(r.uptime),
            last_sync_success: unix_secs_opt(r.last_sync_success),
            cached_x509_svids: count(r.cached_x509_svids_count),
            cached_jwt_svids: count(r.cached_jwt_svids_count),
            cached_svidstore_x509_svids: count(r.cached_svidstore_x509_svids_count),
            svid_chain: chain_from_proto(
                RPC,
                r.svid_chain
                    .into_iter()
                    .map(|c| (c.id, c.expires_at, c.subject)),
            )?,
        })
    }
}

#[cfg(test)]
mod tests;
