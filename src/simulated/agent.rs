//! A simulated SPIRE agent: a Workload API server speaking the real protocol
//! (no package, `workload.spiffe.io` header enforced, full-state streams) on
//! a Unix socket, minting short-lived SVIDs with [`TestCa`] and rotating them
//! at half-life. Faults are switched on and off by the demo and tests. It is
//! a simulation and says so; the real-SPIRE tests use spire-agent itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use super::issuer::{Flavor, TestCa};
use crate::clock::Clock;
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use crate::sensors::workload_api::SECURITY_HEADER;

#[derive(Debug, Clone)]
struct Current {
    chain: Vec<u8>,
    key: Vec<u8>,
    serial: u64,
    not_before: SystemTime,
    not_after: SystemTime,
}

#[derive(Debug, Default)]
struct Faults {
    rotation_stuck: bool,
    silent: bool,
    /// Our registration entry is gone: the agent refuses us an identity.
    no_identity: bool,
    flavor: Option<Flavor>,
}

struct Inner {
    ca: TestCa,
    spiffe_id: String,
    ttl: Duration,
    clock: Arc<dyn Clock>,
    current: Mutex<Option<Current>>,
    faults: Mutex<Faults>,
    generation: watch::Sender<u64>,
    /// Bumped on every stop: streams opened in an older epoch end with
    /// `Unavailable`, as a crashed agent's connections would.
    epoch: std::sync::atomic::AtomicU64,
}

impl Inner {
    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn lock_faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mints a new SVID (backdated 10 s like SPIRE) and publishes it.
    fn rotate(&self) -> Result<(), Status> {
        let now = self.clock.now();
        let flavor = self.lock_faults().flavor.unwrap_or(Flavor::Valid);
        let not_before = now - Duration::from_secs(10).min(self.ttl / 4);
        let not_after = now + self.ttl;
        let (mut chain, key, serial) = self
            .ca
            .issue(&self.spiffe_id, not_before, not_after, flavor)
            .map_err(|e| Status::internal(e.to_string()))?;
        if flavor == Flavor::GarbageDer {
            // A SEQUENCE header claiming more bytes than follow.
            chain = vec![0x30, 0x82, 0x04, 0x00, 0xde, 0xad, 0xbe, 0xef];
        }
        *self.lock_current() = Some(Current {
            chain,
            key,
            serial,
            not_before,
            not_after,
        });
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Rotates when past half-life, unless stuck.
    fn maybe_rotate(&self) {
        if self.lock_faults().rotation_stuck {
            return;
        }
        let due = match &*self.lock_current() {
            None => true,
            Some(c) => {
                let life = c.not_after.duration_since(c.not_before).unwrap_or_default();
                self.clock.now() >= c.not_before + life / 2
            }
        };
        if due {
            let _ = self.rotate();
        }
    }

    fn svid_response(&self) -> X509svidResponse {
        let svids = self
            .lock_current()
            .as_ref()
            .map(|c| X509svid {
                spiffe_id: self.spiffe_id.clone(),
                x509_svid: c.chain.clone(),
                x509_svid_key: c.key.clone(),
                bundle: self.ca.der().to_vec(),
                hint: String::new(),
            })
            .into_iter()
            .collect();
        X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        }
    }

    fn bundles_response(&self) -> X509BundlesResponse {
        X509BundlesResponse {
            crl: Vec::new(),
            bundles: HashMap::from([(
                format!("spiffe://{}", self.ca.trust_domain()),
                self.ca.der().to_vec(),
            )]),
        }
    }
}

/// The simulated agent.
pub struct FakeAgent {
    inner: Arc<Inner>,
    socket: PathBuf,
    running: Mutex<Vec<JoinHandle<()>>>,
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

struct Service(Arc<Inner>);

/// What SPIRE answers a caller no registration entry matches.
fn no_identity() -> Status {
    Status::permission_denied("no identity issued")
}

/// Streams `make()` on every generation change until the client goes away.
fn stream<T: Send + 'static>(
    inner: Arc<Inner>,
    make: fn(&Inner) -> T,
    identity: bool,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(4);
    let mut generation = inner.generation.subscribe();
    let epoch = inner.epoch.load(std::sync::atomic::Ordering::SeqCst);
    tokio::spawn(async move {
        loop {
            if inner.epoch.load(std::sync::atomic::Ordering::SeqCst) != epoch {
                let _ = tx.send(Err(Status::unavailable("agent stopped"))).await;
                return;
            }
            if identity && inner.lock_faults().no_identity {
                let _ = tx.send(Err(no_identity())).await;
                return;
            }
            if !inner.lock_faults().silent && tx.send(Ok(make(&inner))).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                r = generation.changed() => if r.is_err() { return },
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        if self.0.lock_faults().no_identity {
            return Err(no_identity());
        }
        Ok(Response::new(stream(
            self.0.clone(),
            Inner::svid_response,
            true,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        Ok(Response::new(stream(
            self.0.clone(),
            Inner::bundles_response,
            false,
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "the simulated agent serves X.509-SVIDs only",
        ))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "the simulated agent serves X.509-SVIDs only",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "the simulated agent serves X.509-SVIDs only",
        ))
    }
}

impl FakeAgent {
    /// An agent serving `spiffe_id` with SVIDs of `ttl`, on `socket` once started.
    pub fn new(
        ca: TestCa,
        spiffe_id: &str,
        ttl: Duration,
        clock: Arc<dyn Clock>,
        socket: &Path,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                spiffe_id: spiffe_id.to_string(),
                ttl,
                clock,
                current: Mutex::new(None),
                faults: Mutex::new(Faults::default()),
                generation: watch::channel(0).0,
                epoch: std::sync::atomic::AtomicU64::new(0),
            }),
            socket: socket.to_path_buf(),
            running: Mutex::new(Vec::new()),
        }
    }

    /// Binds the socket and serves; rotates at half-life every 100 ms check.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn start(&self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket)?;
        self.inner.maybe_rotate();
        let svc = SpiffeWorkloadApiServer::new(Service(self.inner.clone()));
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        let inner = self.inner.clone();
        let rotator = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                inner.maybe_rotate();
            }
        });
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.push(server);
        running.push(rotator);
        Ok(())
    }

    /// Crashes the agent: every connection drops, the socket disappears.
    pub fn stop(&self) {
        for h in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
        self.inner
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.generation.send_modify(|g| *g += 1);
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Restarts like a real agent: faults cleared, a fresh SVID minted.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn restart(&self) -> std::io::Result<()> {
        self.stop();
        *self.inner.lock_faults() = Faults::default();
        let _ = self.inner.rotate();
        self.start()
    }

    /// Stops rotating (the SVID ages past half-life unrenewed).
    pub fn set_rotation_stuck(&self, stuck: bool) {
        self.inner.lock_faults().rotation_stuck = stuck;
    }

    /// Refuses us an identity (`PermissionDenied`, as SPIRE does once our
    /// registration entry is deleted), ending the open SVID streams; `false`
    /// issues it again.
    pub fn set_no_identity(&self, denied: bool) {
        self.inner.lock_faults().no_identity = denied;
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Accepts streams but never sends on them (a hung agent).
    pub fn set_silent(&self, silent: bool) {
        self.inner.lock_faults().silent = silent;
    }

    /// Serves an SVID of this flavor from now on (minted at once).
    pub fn serve_flavor(&self, flavor: Flavor) {
        self.inner.lock_faults().flavor = Some(flavor);
        let _ = self.inner.rotate();
    }

    /// Serial of the SVID currently served.
    pub fn serial(&self) -> Option<u64> {
        self.inner.lock_current().as_ref().map(|c| c.serial)
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop();
    }
}
