//! The authorization matrix: every RPC × every kind of caller, with the
//! exact status of each cell, and proof that a refused call changed
//! nothing.
//!
//! SPIFFE callers reach the service in-process with a hand-made
//! [`TcpConnectInfo`] (what the mTLS acceptor sets once it verified the
//! chain; the acceptor is tested with the transport). Uid callers come
//! over the socket: our own uid, a uid no list names, and a real process
//! running as uid 65534.

use std::fmt;

use tonic::Code;

use super::*;
use crate::api::authz::Role;
use crate::api::tcp::TcpConnectInfo;
use crate::control::Pause;
use crate::model::{Approval, ApprovalState, Event, Incident, Severity, Subject, SymptomKind};
use crate::proto::healer as pb;

const OPERATOR: &str = "spiffe://td.test/ops/alice";
const READER: &str = "spiffe://td.test/dash";
const REPORTER: &str = "spiffe://td.test/sidecar";
const UNKNOWN: &str = "spiffe://td.test/stranger";
/// An operator's path, in another trust domain.
const FOREIGN: &str = "spiffe://other.test/ops/alice";

/// A caller in the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// In-process, without connect info.
    NoCredentials,
    /// Over the socket, our uid in no list.
    OtherUid,
    /// In-process, SPIFFE IDs.
    UnknownId,
    ForeignTrustDomain,
    Reader,
    Reporter,
    Operator,
    /// Over the socket, our uid an operator (the default).
    OurUid,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Caller {
    const ALL: [Caller; 8] = [
        Caller::NoCredentials,
        Caller::OtherUid,
        Caller::UnknownId,
        Caller::ForeignTrustDomain,
        Caller::Reader,
        Caller::Reporter,
        Caller::Operator,
        Caller::OurUid,
    ];

    fn spiffe_id(self) -> Option<&'static str> {
        match self {
            Caller::UnknownId => Some(UNKNOWN),
            Caller::ForeignTrustDomain => Some(FOREIGN),
            Caller::Reader => Some(READER),
            Caller::Reporter => Some(REPORTER),
            Caller::Operator => Some(OPERATOR),
            _ => None,
        }
    }

    /// The status this caller gets from `m`, and the denial reason.
    fn expected(self, m: Method) -> (Code, Option<&'static str>) {
        let role = m.role();
        let allowed = match self {
            Caller::Operator | Caller::OurUid => true,
            Caller::Reader => role == Role::Reader,
            Caller::Reporter => role == Role::Reporter,
            _ => false,
        };
        if allowed {
            return (Code::Ok, None);
        }
        match self {
            Caller::NoCredentials => (Code::Unauthenticated, Some("no_credentials")),
            Caller::OtherUid => (Code::PermissionDenied, Some("uid")),
            Caller::UnknownId => (Code::PermissionDenied, Some("unknown_id")),
            Caller::ForeignTrustDomain => (Code::PermissionDenied, Some("foreign_trust_domain")),
            _ => (Code::PermissionDenied, Some("role")),
        }
    }
}

/// Either kind of client, so one `call` serves both.
pub(super) enum Client {
    Socket(SupervisorClient<Channel>),
    Direct(SupervisorClient<Service>),
}

/// Calls `$rpc` on either client; the response is dropped.
macro_rules! rpc {
    ($client:expr, $rpc:ident, $req:expr) => {
        match $client {
            Client::Socket(c) => c.$rpc($req).await.map(drop),
            Client::Direct(c) => c.$rpc($req).await.map(drop),
        }
    };
}

/// A request, with the connect info `spiffe_id` gives (none: no
/// credentials, or the transport's own on the socket).
pub(super) fn with<T>(msg: T, spiffe_id: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(id) = spiffe_id {
        req.extensions_mut().insert(TcpConnectInfo {
            remote: "192.0.2.7:50000".parse().unwrap(),
            peer_spiffe_id: Some(id.to_string()),
        });
    }
    req
}

/// What the calls name: an incident in the store, and per call a fresh
/// pending approval and a demoted step.
pub(super) struct Fixture {
    pub incident_id: String,
}

pub(super) async fn fixture(api: &TestApi) -> Fixture {
    let incident = Incident {
        id: "inc-1".into(),
        kind: SymptomKind::AgentUnreachable,
        subject: Subject::agent("node-a"),
        severity: Severity::Critical,
        opened_at: api.clock.now(),
        predicted_outage: None,
        evidence: serde_json::json!({}),
        next_rung: 0,
        needs_operator: None,
    };
    api.backend
        .store
        .apply(&[Event::IncidentOpened { incident }])
        .await
        .unwrap();
    Fixture {
        incident_id: "inc-1".into(),
    }
}

/// A new pending approval in the controls.
pub(super) fn pending(api: &TestApi, id: &str) -> Approval {
    let now = api.clock.now();
    let approval = Approval {
        id: id.into(),
        incident_id: "inc-1".into(),
        symptom: SymptomKind::AgentUnreachable,
        rung: 1,
        actuator: "restart-agent".into(),
        target: "node-a".into(),
        requested_at: now,
        expires_at: now + Duration::from_secs(600),
    };
    api.backend.controls.request(approval.clone());
    approval
}

/// A demoted step in the controls.
pub(super) fn demote(api: &TestApi) {
    api.backend.controls.demote(crate::control::DemotedStep {
        symptom: SymptomKind::AgentUnreachable,
        actuator: "restart-agent".into(),
        verified: 1,
        runs: 10,
        at: api.clock.now(),
    });
}

/// Calls `m` with arguments that succeed for a caller allowed to.
pub(super) async fn call(
    client: &mut Client,
    m: Method,
    spiffe_id: Option<&str>,
    fx: &Fixture,
    approval_id: &str,
) -> Result<(), Status> {
    match m {
        Method::ReportHandshakes => {
            let batches = futures::stream::iter(vec![batch(vec![report("db", Reason::Ok, 1)])]);
            rpc!(client, report_handshakes, with(batches, spiffe_id))
        }
        Method::GetStatus => rpc!(client, get_status, with(pb::GetStatusRequest {}, spiffe_id)),
        Method::ListIncidents => rpc!(
            client,
            list_incidents,
            with(pb::ListIncidentsRequest::default(), spiffe_id)
        ),
        Method::GetIncident => rpc!(
            client,
            get_incident,
            with(
                pb::GetIncidentRequest {
                    id: fx.incident_id.clone()
                },
                spiffe_id
            )
        ),
        Method::ListActions => rpc!(
            client,
            list_actions,
            with(pb::ListActionsRequest::default(), spiffe_id)
        ),
        Method::ListHolds => rpc!(
            client,
            list_holds,
            with(pb::ListHoldsRequest::default(), spiffe_id)
        ),
        Method::ListApprovals => rpc!(
            client,
            list_approvals,
            with(pb::ListApprovalsRequest::default(), spiffe_id)
        ),
        Method::ListAudit => rpc!(
            client,
            list_audit,
            with(pb::ListAuditRequest::default(), spiffe_id)
        ),
        Method::Watch => rpc!(client, watch, with(pb::WatchRequest::default(), spiffe_id)),
        Method::Approve => rpc!(
            client,
            approve,
            with(
                pb::ApproveRequest {
                    approval_id: approval_id.into(),
                    comment: "looks right".into()
                },
                spiffe_id
            )
        ),
        Method::Reject => rpc!(
            client,
            reject,
            with(
                pb::RejectRequest {
                    approval_id: approval_id.into(),
                    reason: "not now".into()
                },
                spiffe_id
            )
        ),
        Method::Pause => rpc!(
            client,
            pause,
            with(
                pb::PauseRequest {
                    reason: "matrix".into()
                },
                spiffe_id
            )
        ),
        Method::Resume => rpc!(
            client,
            resume,
            with(pb::ResumeRequest::default(), spiffe_id)
        ),
        Method::SetDryRun => rpc!(
            client,
            set_dry_run,
            with(
                pb::SetDryRunRequest {
                    enabled: true,
                    reason: String::new()
                },
                spiffe_id
            )
        ),
        Method::ResetDemotion => rpc!(
            client,
            reset_demotion,
            with(
                pb::ResetDemotionRequest {
                    symptom: "agent_unreachable".into(),
                    actuator: "restart-agent".into()
                },
                spiffe_id
            )
        ),
    }
}

/// What a refused call must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    pause: Option<Pause>,
    dry_run: bool,
    approval: Option<ApprovalState>,
    demoted: usize,
}

fn snapshot(api: &TestApi, approval_id: &str) -> Snapshot {
    let c = &api.backend.controls;
    Snapshot {
        pause: c.paused(),
        dry_run: c.dry_run(),
        approval: c.approval(approval_id).map(|a| a.state),
        demoted: c.demoted().len(),
    }
}

/// Puts the controls back: no pause, no dry run, one demoted step, and
/// nothing in the outbox.
fn reset(api: &TestApi) {
    let c = &api.backend.controls;
    c.resume_actions("test", None, api.clock.now());
    c.set_dry_run(false, "test", None, api.clock.now());
    demote(api);
    let _ = c.take();
}

fn matrix_config(c: &mut ApiConfig) {
    c.authz = AuthzConfig {
        operators: vec![OPERATOR.into()],
        readers: vec![READER.into()],
        reporters: vec![REPORTER.into()],
    };
}

#[tokio::test]
async fn every_rpc_for_every_caller_gets_its_exact_status() {
    let api = TestApi::start(matrix_config).await;
    // Our uid is in no list here.
    let stranger_api = TestApi::start(|c| {
        matrix_config(c);
        c.report_uids = vec![our_uid().wrapping_add(1)];
        c.read_uids = vec![our_uid().wrapping_add(1)];
        c.operator_uids = vec![our_uid().wrapping_add(1)];
    })
    .await;
    let fx = fixture(&api).await;
    fixture(&stranger_api).await;
    let mut failures = Vec::new();
    let mut cells = 0;
    for caller in Caller::ALL {
        let on = if caller == Caller::OtherUid {
            &stranger_api
        } else {
            &api
        };
        let mut client = match caller {
            Caller::OtherUid | Caller::OurUid => Client::Socket(on.grpc()),
            _ => Client::Direct(on.direct()),
        };
        for m in Method::ALL {
            reset(on);
            let approval_id = format!("{caller}-{}", m.as_str());
            pending(on, &approval_id);
            let before = snapshot(on, &approval_id);
            let denied_before = on.metric(&format!(
                r#"spire_healer_api_denied_total{{method="{}",reason="{}"}}"#,
                m.as_str(),
                caller.expected(m).1.unwrap_or("none")
            ));
            let got = call(&mut client, m, caller.spiffe_id(), &fx, &approval_id)
                .await
                .map_or_else(|s| s.code(), |()| Code::Ok);
            cells += 1;
            let (want, reason) = caller.expected(m);
            if got != want {
                failures.push(format!(
                    "{caller} × {}: got {got:?}, want {want:?}",
                    m.as_str()
                ));
                continue;
            }
            let Some(reason) = reason else {
                let _ = on.backend.controls.take();
                let _ = on.counter.drain();
                continue;
            };
            // Refused: nothing changed, nothing queued for the store,
            // nothing counted, and the refusal counted by its reason.
            if snapshot(on, &approval_id) != before {
                failures.push(format!("{caller} × {}: the controls changed", m.as_str()));
            }
            let (events, resets) = on.backend.controls.take();
            if !events.is_empty() || !resets.is_empty() {
                failures.push(format!("{caller} × {}: queued {events:?}", m.as_str()));
            }
            if !on.counter.drain().is_empty() {
                failures.push(format!("{caller} × {}: reports counted", m.as_str()));
            }
            if on.denied(m.as_str(), reason) != denied_before + 1.0 {
                failures.push(format!(
                    "{caller} × {}: denial not counted as {reason}",
                    m.as_str()
                ));
            }
        }
    }
    assert_eq!(cells, Caller::ALL.len() * Method::ALL.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every call was counted once under its method.
    for m in Method::ALL {
        let total: f64 = Outcome::ALL
            .iter()
            .map(|o| api.calls(m.as_str(), o.as_str()))
            .sum();
        assert_eq!(total, (Caller::ALL.len() - 1) as f64, "{}", m.as_str());
        assert_eq!(
            stranger_api.calls(m.as_str(), "unauthenticated"),
            1.0,
            "{}",
            m.as_str()
        );
    }
    api.stop().await;
    stranger_api.stop().await;
}

#[tokio::test]
async fn mutating_calls_record_the_callers_principal() {
    let api = TestApi::start(matrix_config).await;
    let fx = fixture(&api).await;
    for (mut client, spiffe_id, principal) in [
        (
            Client::Socket(api.grpc()),
            None,
            format!("uid:{}", our_uid()),
        ),
        (
            Client::Direct(api.direct()),
            Some(OPERATOR),
            OPERATOR.to_string(),
        ),
    ] {
        for m in Method::ALL.into_iter().filter(|m| m.mutates()) {
            reset(&api);
            let id = format!("{principal}-{}", m.as_str());
            pending(&api, &id);
            call(&mut client, m, spiffe_id, &fx, &id).await.unwrap();
            let (events, _) = api.backend.controls.take();
            let by: Vec<Option<String>> = events
                .iter()
                .map(|e| match e {
                    Event::ApprovalDecided { by, .. } => by.clone(),
                    Event::ControlChanged { by, .. } | Event::DemotionReset { by, .. } => {
                        Some(by.clone())
                    }
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            // Resume and dry run off from a clean state change nothing.
            let want = match m {
                Method::Resume => vec![],
                _ => vec![Some(principal.clone())],
            };
            assert_eq!(by, want, "{}", m.as_str());
        }
    }
    api.stop().await;
}

#[tokio::test]
async fn a_peer_id_that_does_not_parse_or_is_missing_is_refused() {
    let api = TestApi::start(matrix_config).await;
    let mut direct = api.direct();
    let mut req = Request::new(pb::GetStatusRequest {});
    req.extensions_mut().insert(TcpConnectInfo {
        remote: "192.0.2.7:50000".parse().unwrap(),
        peer_spiffe_id: Some("spiffe://td.test/../ops".into()),
    });
    let err = direct.get_status(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let mut req = Request::new(pb::GetStatusRequest {});
    req.extensions_mut().insert(TcpConnectInfo {
        remote: "192.0.2.7:50000".parse().unwrap(),
        peer_spiffe_id: None,
    });
    let err = direct.get_status(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert_eq!(api.denied("get_status", "unknown_id"), 1.0);
    assert_eq!(api.denied("get_status", "no_credentials"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn without_spiffe_lists_every_spiffe_caller_is_unknown() {
    let api = TestApi::start(|_| {}).await;
    let err = api
        .direct()
        .get_status(with(pb::GetStatusRequest {}, Some(OPERATOR)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_eq!(api.denied("get_status", "unknown_id"), 1.0);
    api.stop().await;
}

#[tokio::test]
async fn a_path_no_rpc_names_is_unimplemented_and_reaches_no_handler() {
    let api = TestApi::start(|_| {}).await;
    let channel = crate::endpoint::Endpoint::Unix(api.socket.clone())
        .channel(Duration::from_secs(5))
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            Request::new(vec![]),
            PathAndQuery::from_static("/spire_healer.v1.Supervisor/DropTables"),
            super::RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    api.stop().await;
}

// === A real other uid ===

/// Set in the re-executed test binary: the socket to dial as a stranger.
const STRANGER_SOCKET: &str = "SPIRE_HEALER_TEST_API_STRANGER_SOCKET";

/// Runs the test binary again as uid 65534, calling every RPC over the
/// socket; the child asserts each is `PERMISSION_DENIED`.
#[tokio::test]
async fn a_process_of_another_uid_is_refused_every_rpc() {
    if let Ok(socket) = std::env::var(STRANGER_SOCKET) {
        return stranger(PathBuf::from(socket)).await;
    }
    if our_uid() != 0 {
        eprintln!("not root: cannot run a client as uid 65534; covered by the config-based cell");
        return;
    }
    // The socket is open to everyone; only the uid check stands between.
    let api = TestApi::start(|c| c.socket_mode = 0o666).await;
    fixture(&api).await;
    pending(&api, "for-the-stranger");
    demote(&api);
    let before = snapshot(&api, "for-the-stranger");
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "api::tests::matrix::a_process_of_another_uid_is_refused_every_rpc",
            "--nocapture",
        ])
        .env(STRANGER_SOCKET, &api.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("refused {n}/{n}", n = Method::ALL.len())),
        "{stdout}"
    );
    for m in Method::ALL {
        assert_eq!(api.denied(m.as_str(), "uid"), 1.0, "{}", m.as_str());
    }
    assert_eq!(snapshot(&api, "for-the-stranger"), before);
    assert!(api.backend.controls.take().0.is_empty());
    assert!(api.drain().is_empty());
    api.stop().await;
}

/// The child's half: every RPC must be refused.
async fn stranger(socket: PathBuf) {
    assert_eq!(our_uid(), 65534);
    let mut client = Client::Socket(grpc_at(&socket));
    let fx = Fixture {
        incident_id: "inc-1".into(),
    };
    let mut refused = 0;
    for m in Method::ALL {
        let err = call(&mut client, m, None, &fx, "for-the-stranger")
            .await
            .expect_err(m.as_str());
        assert_eq!(err.code(), Code::PermissionDenied, "{}: {err}", m.as_str());
        assert!(err.message().contains("uid:65534"), "{err}");
        refused += 1;
    }
    println!("refused {refused}/{}", Method::ALL.len());
}
