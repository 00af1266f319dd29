//! A simulated spire-server admin socket: the Debug, Agent and Bundle
//! services of SPIRE's server API (same packages and paths) on a Unix
//! socket, over a synthetic fleet of agents. Used by unit tests and benches
//! of the `server_api` sensor and [`crate::spire_api`]; the real-SPIRE tests
//! use spire-server itself.
//!
//! Fault switches: [`FakeServer::set_hang`] (accept calls, never answer),
//! [`FakeServer::set_paging_fault`] (paging that never ends), and
//! [`serve_raw`] for a listener that is not a gRPC server at all.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::issuer::{MintError, TestCa};
use crate::clock::{Clock, saturating_since};
use crate::proto::spire::api::server::agent::v1 as agent;
use crate::proto::spire::api::server::agent::v1::agent_server::{Agent, AgentServer};
use crate::proto::spire::api::server::bundle::v1 as bundle;
use crate::proto::spire::api::server::bundle::v1::bundle_server::{Bundle, BundleServer};
use crate::proto::spire::api::server::debug::v1 as debug;
use crate::proto::spire::api::server::debug::v1::debug_server::{Debug, DebugServer};
use crate::proto::spire::api::types;

/// How the simulated paging misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingFault {
    /// Always a fresh `next_page_token`, wrapping around the fleet: the
    /// listing never ends and never repeats.
    Endless,
    /// The same `next_page_token` on every page.
    RepeatToken,
    /// Past the end, empty pages that still carry a token.
    EmptyPagesWithToken,
}

#[derive(Debug, Default)]
struct Faults {
    paging: Option<PagingFault>,
}

struct Inner {
    trust_domain: String,
    clock: Arc<dyn Clock>,
    started: SystemTime,
    ca: TestCa,
    ca_not_after: SystemTime,
    /// Sorted by SPIFFE ID, as SPIRE pages them (by row id, here by name).
    agents: Mutex<Vec<types::Agent>>,
    faults: Mutex<Faults>,
    /// `true` while calls must hang.
    hang: watch::Sender<bool>,
    list_calls: AtomicU64,
    bundle_sequence: AtomicU64,
}

impl Inner {
    fn agents(&self) -> MutexGuard<'_, Vec<types::Agent>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn paging_fault(&self) -> Option<PagingFault> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).paging
    }

    /// Waits while the hang switch is on.
    async fn gate(&self) {
        let mut rx = self.hang.subscribe();
        // Only errors when the sender is gone, i.e. never while `self` lives.
        let _ = rx.wait_for(|hang| !*hang).await;
    }

    fn find(&self, id: Option<&types::Spiffeid>) -> Result<usize, Status> {
        let id = id.ok_or_else(|| Status::invalid_argument("missing agent ID"))?;
        self.agents()
            .iter()
            .position(|a| a.id.as_ref() == Some(id))
            .ok_or_else(|| Status::not_found("agent not found"))
    }
}

fn unix(t: SystemTime) -> i64 {
    i64::try_from(saturating_since(t, SystemTime::UNIX_EPOCH).as_secs()).unwrap_or(i64::MAX)
}

/// The simulated server.
pub struct FakeServer {
    inner: Arc<Inner>,
    socket: PathBuf,
    running: Mutex<Option<JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeServer {
    /// A server for `trust_domain` with an empty fleet and a fresh CA (valid
    /// for a day) as its bundle, serving on `socket` once started.
    ///
    /// # Errors
    /// The CA cannot be minted.
    pub fn new(
        trust_domain: &str,
        clock: Arc<dyn Clock>,
        socket: &Path,
    ) -> Result<Self, MintError> {
        let now = clock.now();
        let ca_not_after = now + Duration::from_secs(24 * 3600);
        let ca = TestCa::new(trust_domain, now - Duration::from_secs(60), ca_not_after)?;
        Ok(Self {
            inner: Arc::new(Inner {
                trust_domain: trust_domain.to_string(),
                clock,
                started: now,
                ca,
                ca_not_after,
                agents: Mutex::new(Vec::new()),
                faults: Mutex::new(Faults::default()),
                hang: watch::channel(false).0,
                list_calls: AtomicU64::new(0),
                bundle_sequence: AtomicU64::new(1),
            }),
            socket: socket.to_path_buf(),
            running: Mutex::new(None),
            conns: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Adds `count` join-token agents named `spiffe://<td>/spire/agent/
    /// join_token/fake-<n>`, the n-th expiring at `expires_at + n s`.
    pub fn add_fleet(&self, count: usize, expires_at: SystemTime) {
        let mut agents = self.inner.agents();
        let start = agents.len();
        for n in start..start + count {
            agents.push(types::Agent {
                id: Some(types::Spiffeid {
                    trust_domain: self.inner.trust_domain.clone(),
                    path: format!("/spire/agent/join_token/fake-{n:08}"),
                }),
                attestation_type: "join_token".into(),
                // SPIRE lists serials in decimal.
                x509svid_serial_number: (0x1000 + n).to_string(),
                x509svid_expires_at: unix(expires_at + Duration::from_secs(n as u64)),
                selectors: vec![types::Selector {
                    r#type: "join_token".into(),
                    value: format!("fake-{n:08}"),
                }],
                banned: false,
                can_reattest: false,
                agent_version: "1.15.3".into(),
            });
        }
        agents.sort_by(|a, b| {
            a.id.as_ref()
                .map(|i| &i.path)
                .cmp(&b.id.as_ref().map(|i| &i.path))
        });
    }

    /// The SPIFFE ID of the `n`-th fleet agent.
    pub fn agent_id(&self, n: usize) -> String {
        format!(
            "spiffe://{}/spire/agent/join_token/fake-{n:08}",
            self.inner.trust_domain
        )
    }

    /// Agents in the fleet.
    pub fn agent_count(&self) -> usize {
        self.inner.agents().len()
    }

    /// An agent by SPIFFE ID, as stored.
    pub fn agent(&self, spiffe_id: &str) -> Option<types::Agent> {
        self.inner
            .agents()
            .iter()
            .find(|a| {
                a.id.as_ref()
                    .is_some_and(|i| format!("spiffe://{}{}", i.trust_domain, i.path) == spiffe_id)
            })
            .cloned()
    }

    /// The bundle's only CA certificate (DER).
    pub fn ca_der(&self) -> &[u8] {
        self.inner.ca.der()
    }

    /// ListAgents calls answered so far.
    pub fn list_calls(&self) -> u64 {
        self.inner.list_calls.load(Ordering::SeqCst)
    }

    /// While on, every call is accepted but not answered.
    pub fn set_hang(&self, hang: bool) {
        self.inner.hang.send_replace(hang);
    }

    /// Makes ListAgents paging misbehave (`None`: correct paging).
    pub fn set_paging_fault(&self, fault: Option<PagingFault>) {
        lock(&self.inner.faults).paging = fault;
    }

    /// Binds the socket (replacing a stale file) and serves.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn start(&self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket)?;
        let svc = Service(self.inner.clone());
        // Keep a handle on every connection so `stop` can cut them all, as
        // a crash would (tonic runs connections in their own tasks).
        let conns = self.conns.clone();
        let incoming = UnixListenerStream::new(listener).map(move |accepted| {
            let std = accepted?.into_std()?;
            lock(&conns).push(std.try_clone()?);
            tokio::net::UnixStream::from_std(std)
        });
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(DebugServer::new(svc.clone()))
                .add_service(AgentServer::new(svc.clone()))
                .add_service(BundleServer::new(svc))
                .serve_with_incoming(incoming)
                .await;
        });
        if let Some(old) = lock(&self.running).replace(server) {
            old.abort();
        }
        Ok(())
    }

    /// Crashes the server: stops serving, cuts every open connection and
    /// removes the socket.
    pub fn stop(&self) {
        if let Some(h) = lock(&self.running).take() {
            h.abort();
        }
        for conn in lock(&self.conns).drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop();
        // Release calls parked by the hang switch.
        self.inner.hang.send_replace(false);
    }
}

#[derive(Clone)]
struct Service(Arc<Inner>);

#[tonic::async_trait]
impl Debug for Service {
    async fn get_info(
        &self,
        _req: Request<debug::GetInfoRequest>,
    ) -> Result<Response<debug::GetInfoResponse>, Status> {
        self.0.gate().await;
        let inner = &self.0;
        let now = inner.clock.now();
        let uptime = i32::try_from(saturating_since(now, inner.started).as_secs()).unwrap_or(0);
        let agents = i32::try_from(inner.agents().len()).unwrap_or(i32::MAX);
        let server_id = types::Spiffeid {
            trust_domain: inner.trust_domain.clone(),
            path: "/spire/server".into(),
        };
        Ok(Response::new(debug::GetInfoResponse {
            svid_chain: vec![
                debug::get_info_response::Cert {
                    id: Some(server_id),
                    expires_at: unix(now + Duration::from_secs(3600)),
                    subject: "O=SPIRE,C=US".into(),
                },
                debug::get_info_response::Cert {
                    id: None,
                    expires_at: unix(inner.ca_not_after),
                    subject: "CN=fake CA".into(),
                },
            ],
            uptime,
            agents_count: agents,
            federated_bundles_count: 0,
            entries_count: 0,
        }))
    }
}

#[tonic::async_trait]
impl Agent for Service {
    async fn count_agents(
        &self,
        _req: Request<agent::CountAgentsRequest>,
    ) -> Result<Response<agent::CountAgentsResponse>, Status> {
        self.0.gate().await;
        let count = i32::try_from(self.0.agents().len()).unwrap_or(i32::MAX);
        Ok(Response::new(agent::CountAgentsResponse { count }))
    }

    async fn list_agents(
        &self,
        req: Request<agent::ListAgentsRequest>,
    ) -> Result<Response<agent::ListAgentsResponse>, Status> {
        self.0.gate().await;
        self.0.list_calls.fetch_add(1, Ordering::SeqCst);
        let req = req.into_inner();
        let agents = self.0.agents();
        let total = agents.len();
        let offset: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("could not parse token"))?
        };
        let size = usize::try_from(req.page_size)
            .ok()
            .filter(|s| *s > 0)
            .unwrap_or(total.max(1));
        let fault = self.0.paging_fault();
        let page: Vec<types::Agent> = match fault {
            Some(PagingFault::Endless) if total > 0 => (offset..offset.saturating_add(size))
                .map(|i| agents[i % total].clone())
                .collect(),
            _ => agents.iter().skip(offset).take(size).cloned().collect(),
        };
        let next = offset.saturating_add(size);
        let next_page_token = match fault {
            Some(PagingFault::Endless) | Some(PagingFault::EmptyPagesWithToken) => next.to_string(),
            Some(PagingFault::RepeatToken) => size.to_string(),
            // Like SPIRE: a token with every non-empty page, then an empty
            // page without one.
            None if page.is_empty() || req.page_size <= 0 => String::new(),
            None => next.to_string(),
        };
        let mask = req.output_mask;
        let page = page
            .into_iter()
            .map(|mut a| {
                if mask.as_ref().is_some_and(|m| !m.selectors) {
                    a.selectors.clear();
                }
                a
            })
            .collect();
        Ok(Response::new(agent::ListAgentsResponse {
            agents: page,
            next_page_token,
        }))
    }

    async fn get_agent(
        &self,
        req: Request<agent::GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        self.0.gate().await;
        let i = self.0.find(req.get_ref().id.as_ref())?;
        Ok(Response::new(self.0.agents()[i].clone()))
    }

    async fn delete_agent(
        &self,
        req: Request<agent::DeleteAgentRequest>,
    ) -> Result<Response<()>, Status> {
        self.0.gate().await;
        let i = self.0.find(req.get_ref().id.as_ref())?;
        self.0.agents().remove(i);
        Ok(Response::new(()))
    }

    async fn ban_agent(
        &self,
        req: Request<agent::BanAgentRequest>,
    ) -> Result<Response<()>, Status> {
        self.0.gate().await;
        let i = self.0.find(req.get_ref().id.as_ref())?;
        let mut agents = self.0.agents();
        agents[i].banned = true;
        agents[i].x509svid_serial_number.clear();
        Ok(Response::new(()))
    }

    async fn create_join_token(
        &self,
        _req: Request<agent::CreateJoinTokenRequest>,
    ) -> Result<Response<types::JoinToken>, Status> {
        Err(Status::unimplemented(
            "the simulated server issues no join tokens",
        ))
    }
}

#[tonic::async_trait]
impl Bundle for Service {
    async fn get_bundle(
        &self,
        _req: Request<bundle::GetBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        self.0.gate().await;
        Ok(Response::new(types::Bundle {
            trust_domain: self.0.trust_domain.clone(),
            x509_authorities: vec![types::X509Certificate {
                asn1: self.0.ca.der().to_vec(),
                tainted: false,
            }],
            jwt_authorities: Vec::new(),
            refresh_hint: 0,
            sequence_number: self.0.bundle_sequence.load(Ordering::SeqCst),
            wit_authorities: Vec::new(),
        }))
    }
}

// === Raw listeners ===

/// What a raw (non-gRPC) listener does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFault {
    /// Writes bytes that are not HTTP/2, then closes.
    Garbage,
    /// Accepts and holds the connection, never reading or writing.
    Silent,
}

/// Binds `socket` and serves `fault` to every connection until the returned
/// task is aborted.
///
/// # Errors
/// The socket cannot be bound.
pub fn serve_raw(socket: &Path, fault: RawFault) -> std::io::Result<JoinHandle<()>> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    Ok(tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            match fault {
                RawFault::Garbage => {
                    tokio::spawn(async move {
                        let _ = conn
                            .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n\x00\xff garbage \xde\xad")
                            .await;
                        let _ = conn.shutdown().await;
                    });
                }
                RawFault::Silent => held.push(conn),
            }
        }
    }))
}
