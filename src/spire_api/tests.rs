//! The clients against the simulated server ([`FakeServer`]), a minimal
//! Entry service, raw listeners that hang or speak garbage, and paths that
//! are not sockets. Conversions are tested with literals.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::*;
use crate::clock::{Clock, SystemClock};
use crate::proto::spire::api::server::entry::v1::entry_server::{Entry, EntryServer};
use crate::simulated::issuer::TestCa;
use crate::simulated::server::{FakeServer, PagingFault, RawFault, serve_raw};

const TD: &str = "example.org";
const TIMEOUT: Duration = Duration::from_millis(500);

fn fake(dir: &TempDir, agents: usize) -> (FakeServer, ServerAdminClient) {
    let socket = dir.path().join("server.sock");
    let server = FakeServer::new(TD, Arc::new(SystemClock), &socket).expect("fake server");
    server.add_fleet(agents, SystemClock.now() + Duration::from_secs(3600));
    server.start().expect("bind");
    let client = ServerAdminClient::new(&socket, TIMEOUT).expect("client");
    (server, client)
}

// === Conversions ===

#[test]
fn spiffe_ids_from_parts() {
    let id = |td: &str, path: &str| types::Spiffeid {
        trust_domain: td.into(),
        path: path.into(),
    };
    assert_eq!(
        spiffe_id_from_proto(&id(TD, "/spire/agent/x")).as_deref(),
        Ok("spiffe://example.org/spire/agent/x")
    );
    assert_eq!(
        spiffe_id_from_proto(&id(TD, "w")).as_deref(),
        Ok("spiffe://example.org/w")
    );
    assert_eq!(
        spiffe_id_from_proto(&id(TD, "")).as_deref(),
        Ok("spiffe://example.org")
    );
    assert!(spiffe_id_from_proto(&id("", "/x")).is_err());
    assert!(spiffe_id_from_proto(&id("Bad TD", "/x")).is_err());
    assert!(spiffe_id_from_proto(&id(TD, "/a/../b")).is_err());

    let p = spiffe_id_to_proto("spiffe://example.org/a/b").expect("valid");
    assert_eq!((p.trust_domain.as_str(), p.path.as_str()), (TD, "/a/b"));
    let e = spiffe_id_to_proto("http://x").expect_err("invalid");
    assert_eq!(e.kind(), "invalid_spiffe_id");
}

#[test]
fn times_and_counts() {
    assert_eq!(unix_secs(-5), UNIX_EPOCH);
    assert_eq!(unix_secs(10), UNIX_EPOCH + Duration::from_secs(10));
    // Go's zero time, as an agent that never synced reports it.
    assert_eq!(unix_secs_opt(-62_135_596_800), None);
    assert_eq!(unix_secs_opt(0), None);
    assert_eq!(count(-1), 0);
}

#[test]
fn decimal_serials_become_hex() {
    let hex = |s| decimal_serial_to_hex(s);
    // A serial spire-server v1.15.3 listed.
    assert_eq!(
        hex("117864368112167264582107277578103711268").as_deref(),
        Some("58abda01f4ce0f5cdbb06f5538946624")
    );
    assert_eq!(hex("0").as_deref(), Some("0"));
    assert_eq!(hex("000255").as_deref(), Some("ff"));
    assert_eq!(hex("4294967296").as_deref(), Some("100000000"));
    // 2^160 - 1: the largest serial RFC 5280 allows.
    assert_eq!(
        hex("1461501637330902918203684832716283019655932542975").as_deref(),
        Some("ffffffffffffffffffffffffffffffffffffffff")
    );
    assert_eq!(hex(""), None);
    assert_eq!(hex("12ab"), None);
    assert_eq!(hex("-1"), None);
}

#[test]
fn agent_conversion() {
    let a = types::Agent {
        id: Some(types::Spiffeid {
            trust_domain: TD.into(),
            path: "/spire/agent/join_token/t".into(),
        }),
        attestation_type: "join_token".into(),
        x509svid_serial_number: "255".into(),
        x509svid_expires_at: 100,
        selectors: vec![],
        banned: true,
        can_reattest: true,
        agent_version: String::new(),
    };
    let s = server_agent_from_proto(&a).expect("converts");
    assert_eq!(s.spiffe_id, "spiffe://example.org/spire/agent/join_token/t");
    assert_eq!(s.expires_at, UNIX_EPOCH + Duration::from_secs(100));
    assert_eq!(s.serial, "ff");
    assert!(s.banned && s.can_reattest);
    assert!(server_agent_from_proto(&types::Agent::default()).is_err());
}

#[test]
fn authority_fingerprint_and_key_id() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let ca = TestCa::new(TD, now, now + Duration::from_secs(3600)).expect("ca");
    let a = authority_from_der(ca.der(), true).expect("parses");
    assert_eq!(a.fingerprint, hex::encode(Sha256::digest(ca.der())));
    assert_eq!(a.fingerprint.len(), 64);
    assert_eq!(a.not_after, now + Duration::from_secs(3600));
    assert!(a.tainted);
    // rcgen writes a subject key identifier on CA certificates.
    assert!(!a.key_id.is_empty() && a.key_id.chars().all(|c| c.is_ascii_hexdigit()));

    assert!(authority_from_der(b"\x30\x03abc", false).is_err());
    let mut trailing = ca.der().to_vec();
    trailing.push(0);
    assert!(authority_from_der(&trailing, false).is_err());
}

#[test]
fn chain_expiry_and_identity() {
    let t = |s| UNIX_EPOCH + Duration::from_secs(s);
    let info = AgentDebugInfo {
        uptime_secs: 1,
        last_sync_success: None,
        cached_x509_svids: 0,
        cached_jwt_svids: 0,
        cached_svidstore_x509_svids: 0,
        svid_chain: vec![
            ChainCert {
                spiffe_id: Some("spiffe://example.org/agent".into()),
                expires_at: t(300),
                subject: String::new(),
            },
            ChainCert {
                spiffe_id: None,
                expires_at: t(200),
                subject: String::new(),
            },
        ],
    };
    assert_eq!(info.spiffe_id(), Some("spiffe://example.org/agent"));
    assert_eq!(info.svid_expires_at(), Some(t(200)));
}

// === Against the simulated server ===

#[tokio::test]
async fn debug_info_and_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 3);
    let info = client.server_debug_info().await.expect("debug info");
    assert_eq!(info.agents_count, 3);
    assert_eq!(info.svid_chain.len(), 2);
    assert_eq!(
        info.svid_chain[0].spiffe_id.as_deref(),
        Some("spiffe://example.org/spire/server")
    );
    assert!(info.svid_expires_at().is_some());

    let (authorities, sequence) = client.get_bundle().await.expect("bundle");
    assert_eq!(sequence, 1);
    assert_eq!(authorities.len(), 1);
    assert_eq!(
        authorities[0].fingerprint,
        hex::encode(Sha256::digest(server.ca_der()))
    );
}

#[tokio::test]
async fn paging_reads_every_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 25);
    let (agents, truncated) = client.list_agents_paged(10, 100).await.expect("list");
    assert_eq!(agents.len(), 25);
    assert!(!truncated);
    // 10 + 10 + 5, then SPIRE's empty last page without a token.
    assert_eq!(server.list_calls(), 4);
    assert_eq!(agents[0].spiffe_id, server.agent_id(0));
    assert_eq!(agents[24].spiffe_id, server.agent_id(24));
    assert!(
        agents
            .iter()
            .all(|a| !a.banned && a.attestation_type == "join_token")
    );

    // An exact multiple of the page size.
    let (agents, truncated) = client.list_agents_paged(5, 100).await.expect("list");
    assert_eq!((agents.len(), truncated), (25, false));
}

#[tokio::test]
async fn paging_stops_at_max_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 25);
    let (agents, truncated) = client.list_agents_paged(10, 2).await.expect("list");
    assert_eq!((agents.len(), truncated), (20, true));
    assert_eq!(server.list_calls(), 2);
}

#[tokio::test]
async fn endless_paging_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 3);
    server.set_paging_fault(Some(PagingFault::Endless));
    let (agents, truncated) = client.list_agents_paged(2, 50).await.expect("list");
    assert!(truncated);
    assert_eq!(agents.len(), 100);
    assert_eq!(server.list_calls(), 50);
}

#[tokio::test]
async fn repeated_token_stops_paging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 10);
    server.set_paging_fault(Some(PagingFault::RepeatToken));
    let (agents, truncated) = client.list_agents_paged(3, 1000).await.expect("list");
    assert!(truncated);
    assert_eq!(agents.len(), 6);
    assert_eq!(server.list_calls(), 2);
}

#[tokio::test]
async fn empty_page_with_token_stops_paging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 4);
    server.set_paging_fault(Some(PagingFault::EmptyPagesWithToken));
    let (agents, truncated) = client.list_agents_paged(3, 1000).await.expect("list");
    assert!(truncated);
    assert_eq!(agents.len(), 4);
    assert_eq!(server.list_calls(), 3);
}

#[tokio::test]
async fn zero_paging_bounds_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, client) = fake(&dir, 1);
    for (size, pages) in [(0, 1), (1, 0)] {
        let e = client
            .list_agents_paged(size, pages)
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), "invalid_argument");
    }
}

#[tokio::test]
async fn ban_get_and_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 3);
    let id = server.agent_id(1);
    client.ban_agent(&id).await.expect("ban");
    let a = client.get_agent(&id).await.expect("get");
    assert!(a.banned);
    assert!(a.serial.is_empty());
    client.delete_agent(&id).await.expect("delete");
    assert!(server.agent(&id).is_none());
    let e = client.delete_agent(&id).await.expect_err("gone");
    assert_eq!(e.kind(), "not_found");
    assert!(e.to_string().contains("NotFound"), "{e}");

    let e = client.ban_agent("not an id").await.expect_err("bad id");
    assert_eq!(e.kind(), "invalid_spiffe_id");
    let e = client
        .create_join_token(Duration::ZERO, None)
        .await
        .expect_err("ttl");
    assert_eq!(e.kind(), "invalid_argument");
    let e = client
        .create_join_token(Duration::from_secs(60), None)
        .await
        .expect_err("not simulated");
    assert_eq!(e.kind(), "unimplemented");
}

// === Bad peers ===

/// Asserts the call failed with `kind` well within `limit`.
async fn fails_with<T: std::fmt::Debug>(
    kind: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, SpireApiError>>,
) -> SpireApiError {
    let started = tokio::time::Instant::now();
    let e = tokio::time::timeout(limit, call)
        .await
        .expect("the client bounds its own calls")
        .expect_err("the call must fail");
    assert_eq!(e.kind(), kind, "{e:?}");
    assert!(started.elapsed() < limit);
    e
}

#[tokio::test]
async fn hung_server_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, client) = fake(&dir, 3);
    server.set_hang(true);
    let limit = TIMEOUT * 4;
    fails_with("timeout", limit, client.server_debug_info()).await;
    fails_with("timeout", limit, client.list_agents_paged(1, 10)).await;
    fails_with("timeout", limit, client.get_bundle()).await;
    server.set_hang(false);
    client.get_bundle().await.expect("answers again");
}

#[tokio::test]
async fn silent_listener_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("silent.sock");
    let task = serve_raw(&socket, RawFault::Silent).expect("bind");
    let client = ServerAdminClient::new(&socket, TIMEOUT).expect("client");
    fails_with("timeout", TIMEOUT * 4, client.server_debug_info()).await;
    task.abort();
}

#[tokio::test]
async fn garbage_listener_is_a_protocol_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("garbage.sock");
    let task = serve_raw(&socket, RawFault::Garbage).expect("bind");
    let client = ServerAdminClient::new(&socket, TIMEOUT).expect("client");
    fails_with("protocol", TIMEOUT * 4, client.server_debug_info()).await;
    let agent = AgentAdminClient::new(&socket, TIMEOUT).expect("client");
    fails_with("protocol", TIMEOUT * 4, agent.agent_debug_info()).await;
    task.abort();
}

#[tokio::test]
async fn missing_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = ServerAdminClient::new(&dir.path().join("none.sock"), TIMEOUT).expect("client");
    fails_with("socket_missing", TIMEOUT * 4, client.server_debug_info()).await;
}

#[tokio::test]
async fn stale_socket_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("stale.sock");
    drop(UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let client = ServerAdminClient::new(&socket, TIMEOUT).expect("client");
    fails_with("connection_refused", TIMEOUT * 4, client.get_bundle()).await;
}

#[tokio::test]
async fn not_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let e = fails_with(
        "not_a_socket",
        TIMEOUT * 4,
        ServerAdminClient::new(&file, TIMEOUT)
            .expect("client")
            .server_debug_info(),
    )
    .await;
    assert!(e.to_string().contains("admin socket"), "{e}");
    let agent = AgentAdminClient::new(dir.path(), TIMEOUT).expect("client");
    fails_with("not_a_socket", TIMEOUT * 4, agent.agent_debug_info()).await;
}

/// Runs `f` on this thread with filesystem uid and gid `nobody` when we are
/// root (both are per thread; the fsuid change drops `CAP_DAC_OVERRIDE`), so permission
/// checks apply as they would to an unprivileged supervisor. Needs a
/// current-thread runtime so the connect happens on this thread.
async fn as_unprivileged<T>(f: impl Future<Output = T>) -> T {
    let root = nix::unistd::geteuid().is_root();
    if root {
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(65534));
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(65534));
    }
    let out = f.await;
    if root {
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn socket_without_permission() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (_server, _) = fake(&dir, 1);
    let socket = dir.path().join("server.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    // connect(2) needs write permission on the socket file: EACCES.
    let client = ServerAdminClient::new(&socket, TIMEOUT).expect("client");
    let e = as_unprivileged(client.server_debug_info())
        .await
        .expect_err("EACCES");
    assert_eq!(e.kind(), "permission_denied", "{e:?}");
    assert!(matches!(e, SpireApiError::Connect { .. }), "{e:?}");

    // A directory we may not search: stat fails before anything is dialled.
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let client = ServerAdminClient::new(&locked.join("api.sock"), TIMEOUT).expect("client");
    let e = as_unprivileged(client.get_bundle())
        .await
        .expect_err("EACCES");
    assert_eq!(e.kind(), "permission_denied", "{e:?}");
    assert!(matches!(e, SpireApiError::Endpoint { .. }), "{e:?}");
}

// === bump_entry against a minimal Entry service ===

/// Stores one entry; every update raises its revision, like SPIRE's
/// datastore. `refuse` answers the update with a per-entry NotFound.
struct Entries {
    entry: Mutex<types::Entry>,
    revision: AtomicI64,
    refuse: bool,
    masks: Mutex<Vec<Option<types::EntryMask>>>,
}

#[tonic::async_trait]
impl Entry for Arc<Entries> {
    async fn count_entries(
        &self,
        _r: Request<entry::CountEntriesRequest>,
    ) -> Result<Response<entry::CountEntriesResponse>, Status> {
        Ok(Response::new(entry::CountEntriesResponse { count: 1 }))
    }
    async fn list_entries(
        &self,
        r: Request<entry::ListEntriesRequest>,
    ) -> Result<Response<entry::ListEntriesResponse>, Status> {
        let e = self.entry.lock().expect("lock").clone();
        let wanted = r.into_inner().filter.and_then(|f| f.by_spiffe_id);
        let entries = if wanted == e.spiffe_id {
            vec![e]
        } else {
            vec![]
        };
        Ok(Response::new(entry::ListEntriesResponse {
            entries,
            next_page_token: String::new(),
        }))
    }
    async fn get_entry(
        &self,
        r: Request<entry::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let e = self.entry.lock().expect("lock").clone();
        if r.get_ref().id != e.id {
            return Err(Status::not_found("entry not found"));
        }
        Ok(Response::new(e))
    }
    async fn batch_update_entry(
        &self,
        r: Request<entry::BatchUpdateEntryRequest>,
    ) -> Result<Response<entry::BatchUpdateEntryResponse>, Status> {
        let r = r.into_inner();
        self.masks.lock().expect("lock").push(r.input_mask);
        let results = r
            .entries
            .into_iter()
            .map(|e| {
                if self.refuse {
                    return entry::batch_update_entry_response::Result {
                        status: Some(types::Status {
                            code: 5,
                            message: "entry not found".into(),
                        }),
                        entry: None,
                    };
                }
                let mut stored = self.entry.lock().expect("lock");
                assert_eq!(e.hint, stored.hint, "the bump must not change the entry");
                stored.revision_number = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
                entry::batch_update_entry_response::Result {
                    status: Some(types::Status {
                        code: 0,
                        message: "OK".into(),
                    }),
                    entry: Some(types::Entry {
                        id: stored.id.clone(),
                        revision_number: stored.revision_number,
                        ..Default::default()
                    }),
                }
            })
            .collect();
        Ok(Response::new(entry::BatchUpdateEntryResponse { results }))
    }
}

fn serve_entries(socket: &Path, refuse: bool) -> (Arc<Entries>, tokio::task::JoinHandle<()>) {
    let entries = Arc::new(Entries {
        entry: Mutex::new(types::Entry {
            id: "e1".into(),
            spiffe_id: Some(spiffe_id_to_proto("spiffe://example.org/w").expect("id")),
            hint: "web".into(),
            ..Default::default()
        }),
        revision: AtomicI64::new(0),
        refuse,
        masks: Mutex::new(Vec::new()),
    });
    let listener = UnixListener::bind(socket).expect("bind");
    let svc = EntryServer::new(entries.clone());
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
    });
    (entries, task)
}

#[tokio::test]
async fn bump_entry_raises_the_revision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("entries.sock");
    let (entries, task) = serve_entries(&socket, false);
    let client = ServerAdminClient::new(&socket, TIMEOUT).expect("client");
    assert_eq!(client.bump_entry("e1").await.expect("bump"), 1);
    assert_eq!(client.bump_entry("e1").await.expect("bump"), 2);
    let masks = entries.masks.lock().expect("lock").clone();
    assert_eq!(
        masks[0],
        Some(types::EntryMask {
            hint: true,
            ..Default::default()
        })
    );
    assert_eq!(
        client.get_entry("e1").await.expect("get").revision_number,
        2
    );
    let listed = client
        .list_entries_by_spiffe_id("spiffe://example.org/w")
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    let e = client.bump_entry("nope").await.expect_err("unknown");
    assert_eq!(e.kind(), "not_found");
    task.abort();
}

#[tokio::test]
async fn bump_entry_reports_a_refused_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("entries.sock");
    let (_entries, task) = serve_entries(&socket, true);
    let client = ServerAdminClient::new(&socket, TIMEOUT).expect("client");
    let e = client.bump_entry("e1").await.expect_err("refused");
    assert_eq!(e.kind(), "rejected");
    let text = e.to_string();
    assert!(
        text.contains("NotFound") && text.contains("entry not found"),
        "{text}"
    );
    task.abort();
}
