//! Who may call what: every RPC belongs to one [`Role`], every caller is a
//! [`Principal`] named by its transport (never by anything it sends), and
//! [`Authorized`] refuses a caller without the role before tonic reads the
//! request body or any handler runs.
//!
//! - Over the Unix socket the principal is `uid:<n>`, from the kernel's
//!   peer credentials ([`UdsConnectInfo`]); roles come from `report_uids`,
//!   `read_uids` and `operator_uids`.
//! - Over TCP with mTLS it is the SPIFFE ID of the caller's X509-SVID
//!   ([`TcpConnectInfo`], set by the acceptor after verifying the chain);
//!   roles come from `[api.authz]`, and an ID outside the trust domain
//!   those lists name is refused whatever its path.
//!
//! Operators may do everything (they read and may report too). A caller
//! without credentials is `UNAUTHENTICATED`; any other refusal is
//! `PERMISSION_DENIED`. Each refusal is logged at debug (any local process
//! can cause one at will) and counted by method and [`Denial`] reason.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Status};
use tracing::debug;

use super::tcp::TcpConnectInfo;
use super::watch::Watchers;
use super::{ApiConfig, Method, Outcome};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::telemetry::metrics::Metrics;

/// Who is calling, as its transport vouches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A local process, by the uid the kernel reports for the socket peer.
    Uid(u32),
    /// A TCP caller, by the SPIFFE ID of its verified X509-SVID.
    Spiffe(SpiffeId),
}

impl fmt::Display for Principal {
    /// `uid:<n>` or the SPIFFE ID: what mutating calls record as `by`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Uid(uid) => write!(f, "uid:{uid}"),
            Principal::Spiffe(id) => f.write_str(id.as_str()),
        }
    }
}

/// What an RPC requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `ReportHandshakes`.
    Reporter,
    /// `GetStatus`, the `List*` calls, `GetIncident`, `Watch`.
    Reader,
    /// Approve, reject, pause, resume, dry run, reset a demotion; and
    /// everything a reader or reporter may do.
    Operator,
}

impl Role {
    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reporter => "reporter",
            Role::Reader => "reader",
            Role::Operator => "operator",
        }
    }
}

/// Why a call was refused: the `reason` label of
/// `spire_healer_api_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// The connection carries no credentials (`UNAUTHENTICATED`).
    NoCredentials,
    /// A uid in none of the uid lists.
    Uid,
    /// A SPIFFE ID in our trust domain that no list names, or a peer ID
    /// that does not parse.
    UnknownId,
    /// A SPIFFE ID of another trust domain.
    ForeignTrustDomain,
    /// A known caller (uid or SPIFFE ID) without the role this RPC needs.
    Role,
}

impl Denial {
    /// Every reason.
    pub const ALL: [Denial; 5] = [
        Denial::NoCredentials,
        Denial::Uid,
        Denial::UnknownId,
        Denial::ForeignTrustDomain,
        Denial::Role,
    ];

    /// Snake-case name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::NoCredentials => "no_credentials",
            Denial::Uid => "uid",
            Denial::UnknownId => "unknown_id",
            Denial::ForeignTrustDomain => "foreign_trust_domain",
            Denial::Role => "role",
        }
    }

    /// The status a caller refused for this reason gets.
    pub fn code(self) -> Code {
        match self {
            Denial::NoCredentials => Code::Unauthenticated,
            _ => Code::PermissionDenied,
        }
    }
}

/// The callers of one kind (uids or SPIFFE IDs) each role admits.
#[derive(Debug, Clone)]
struct Grants<T> {
    reporters: HashSet<T>,
    readers: HashSet<T>,
    operators: HashSet<T>,
}

impl<T> Default for Grants<T> {
    fn default() -> Self {
        Self {
            reporters: HashSet::new(),
            readers: HashSet::new(),
            operators: HashSet::new(),
        }
    }
}

impl<T: Eq + std::hash::Hash> Grants<T> {
    /// Admits `who` to `role` (operators to every role), or says why not:
    /// [`Denial::Role`] for a caller listed in another role, `unlisted`
    /// for one listed nowhere.
    fn check(&self, who: &T, role: Role, unlisted: Denial) -> Result<(), Denial> {
        let (op, read, report) = (
            self.operators.contains(who),
            self.readers.contains(who),
            self.reporters.contains(who),
        );
        let allowed = op
            || match role {
                Role::Reporter => report,
                Role::Reader => read,
                Role::Operator => false,
            };
        if allowed {
            Ok(())
        } else if read || report {
            Err(Denial::Role)
        } else {
            Err(unlisted)
        }
    }
}

/// The callers each role admits, from [`ApiConfig`].
#[derive(Debug, Clone, Default)]
pub struct Policy {
    uids: Grants<u32>,
    /// The trust domain `[api.authz]` names (`None` when it lists nobody).
    trust_domain: Option<TrustDomain>,
    ids: Grants<SpiffeId>,
}

impl Policy {
    /// The policy `cfg` describes. Entries that do not parse, or name
    /// another trust domain than the first that parses, are left out:
    /// [`ApiConfig::problems`] reports them, so a validated config loses
    /// nothing.
    pub fn new(cfg: &ApiConfig) -> Self {
        let a = &cfg.authz;
        let trust_domain = a
            .operators
            .iter()
            .chain(&a.readers)
            .chain(&a.reporters)
            .find_map(|s| SpiffeId::parse(s).ok())
            .map(|id| id.trust_domain().clone());
        let ids = |list: &[String]| -> HashSet<SpiffeId> {
            list.iter()
                .filter_map(|s| SpiffeId::parse(s).ok())
                .filter(|id| Some(id.trust_domain()) == trust_domain.as_ref())
                .collect()
        };
        Self {
            uids: Grants {
                reporters: cfg.report_uids.iter().copied().collect(),
                readers: cfg.read_uids.iter().copied().collect(),
                operators: cfg.operator_uids.iter().copied().collect(),
            },
            ids: Grants {
                reporters: ids(&a.reporters),
                readers: ids(&a.readers),
                operators: ids(&a.operators),
            },
            trust_domain,
        }
    }

    /// Admits `principal` to `role`, or says why not.
    ///
    /// # Errors
    /// The [`Denial`] reason.
    pub fn check(&self, principal: &Principal, role: Role) -> Result<(), Denial> {
        match principal {
            Principal::Uid(uid) => self.uids.check(uid, role, Denial::Uid),
            Principal::Spiffe(id) => {
                match &self.trust_domain {
                    Some(td) if td == id.trust_domain() => {}
                    Some(_) => return Err(Denial::ForeignTrustDomain),
                    None => return Err(Denial::UnknownId),
                }
                self.ids.check(id, role, Denial::UnknownId)
            }
        }
    }
}

/// The caller of a request, from what its transport put in the request's
/// extensions: peer credentials on the Unix socket, the verified SPIFFE ID
/// on TCP.
///
/// # Errors
/// [`Denial::NoCredentials`] when neither is there (or the kernel did not
/// tell the uid), [`Denial::UnknownId`] for a peer ID that does not parse.
pub fn principal(extensions: &http::Extensions) -> Result<Principal, Denial> {
    if let Some(info) = extensions.get::<UdsConnectInfo>() {
        return info
            .peer_cred
            .map(|cred| Principal::Uid(cred.uid()))
            .ok_or(Denial::NoCredentials);
    }
    if let Some(info) = extensions.get::<TcpConnectInfo>() {
        let id = info
            .peer_spiffe_id
            .as_deref()
            .ok_or(Denial::NoCredentials)?;
        return SpiffeId::parse(id)
            .map(Principal::Spiffe)
            .map_err(|_| Denial::UnknownId);
    }
    Err(Denial::NoCredentials)
}

// === Authorized ===

/// The service wrapper that authorizes every call and counts it in
/// `spire_healer_api_requests_total{method,outcome}`.
///
/// A refused call is answered at once (trailers-only), its body unread; an
/// admitted one carries its [`Principal`] in the request extensions for
/// the handler. A request over `max_message_bytes` is answered
/// `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`) and one that does not
/// decode `INVALID_ARGUMENT` (tonic says `INTERNAL`), as the report
/// stream's are.
#[derive(Clone)]
pub struct Authorized<S> {
    inner: S,
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
    watchers: Arc<Watchers>,
}

impl<S> Authorized<S> {
    pub(super) fn new(
        inner: S,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
        watchers: Arc<Watchers>,
    ) -> Self {
        Self {
            inner,
            policy,
            metrics,
            watchers,
        }
    }

    /// Waits until every `Watch` subscriber's task has ended (they end at
    /// shutdown, or when their client goes away). Call after the server
    /// stopped.
    pub async fn drained(&self) {
        self.watchers.drained().await;
    }
}

impl<S> fmt::Debug for Authorized<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorized")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<S: NamedService> NamedService for Authorized<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Fail closed: a path no `Method` names (an RPC added to the proto
        // but not here) is answered UNIMPLEMENTED without reaching a
        // handler, and not counted (the `method` label stays a closed set).
        let Some(method) = Method::from_path(req.uri().path()) else {
            let resp = Status::unimplemented(format!("no RPC {}", req.uri().path())).into_http();
            return Box::pin(async move { Ok(resp) });
        };
        let decided = principal(req.extensions())
            .map_err(|denial| (None, denial))
            .and_then(|p| match self.policy.check(&p, method.role()) {
                Ok(()) => Ok(p),
                Err(denial) => Err((Some(p), denial)),
            });
        let metrics = self.metrics.clone();
        match decided {
            Err((who, denial)) => {
                let who = who.map(|p| p.to_string());
                debug!(
                    method = method.as_str(),
                    principal = who.as_deref().unwrap_or("unknown"),
                    reason = denial.as_str(),
                    "API call refused."
                );
                metrics
                    .api_denied_total
                    .with_label_values(&[method.as_str(), denial.as_str()])
                    .inc();
                count(&metrics, method, denial.code());
                let message = match (denial, who) {
                    (Denial::NoCredentials, _) => "caller credentials unknown".to_string(),
                    (_, Some(who)) => format!(
                        "{who} may not call {} ({})",
                        method.as_str(),
                        denial.as_str()
                    ),
                    (_, None) => format!(
                        "the caller may not call {} ({})",
                        method.as_str(),
                        denial.as_str()
                    ),
                };
                let resp = Status::new(denial.code(), message).into_http();
                Box::pin(async move { Ok(resp) })
            }
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                // The clone that was polled ready is the one to call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let resp = inner.call(req).await?;
                    Ok(settle(&metrics, method, resp))
                })
            }
        }
    }
}

/// Counts an admitted call by the status its response carries
/// (trailers-only errors carry it in their extensions; a response that
/// streams on is counted as `ok` when it starts) and rewrites tonic's
/// message-size error.
fn settle(
    metrics: &Metrics,
    method: Method,
    resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let Some(status) = resp.extensions().get::<Status>() else {
        count(metrics, method, Code::Ok);
        return resp;
    };
    // tonic's own refusals, before the handler: the caller's doing, so
    // not OUT_OF_RANGE and INTERNAL (our handlers never answer either).
    let rewritten = match status.code() {
        Code::OutOfRange
            if status
                .message()
                .starts_with("Error, decoded message length too large") =>
        {
            Some(Status::resource_exhausted(format!(
                "request message too large: {}",
                status.message()
            )))
        }
        Code::Internal if status.message().starts_with("failed to decode") => {
            Some(Status::invalid_argument(format!(
                "request message does not decode: {}",
                status.message()
            )))
        }
        _ => None,
    };
    if let Some(status) = rewritten {
        count(metrics, method, status.code());
        return status.into_http();
    }
    count(metrics, method, status.code());
    resp
}

fn count(metrics: &Metrics, method: Method, code: Code) {
    metrics
        .api_requests_total
        .with_label_values(&[method.as_str(), Outcome::of(code).as_str()])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Principal {
        Principal::Spiffe(SpiffeId::parse(s).unwrap())
    }

    #[test]
    fn roles_by_uid_and_spiffe_id_with_the_reason_for_each_refusal() {
        let cfg = ApiConfig {
            report_uids: vec![10],
            read_uids: vec![20],
            operator_uids: vec![30],
            authz: super::super::AuthzConfig {
                operators: vec!["spiffe://td/ops".into()],
                readers: vec!["spiffe://td/ro".into()],
                reporters: vec!["spiffe://td/rep".into()],
            },
            ..ApiConfig::default()
        };
        let p = Policy::new(&cfg);
        use Denial as D;
        use Role as R;
        let cases: &[(Principal, R, Result<(), D>)] = &[
            (Principal::Uid(10), R::Reporter, Ok(())),
            (Principal::Uid(10), R::Reader, Err(D::Role)),
            (Principal::Uid(20), R::Reader, Ok(())),
            (Principal::Uid(20), R::Operator, Err(D::Role)),
            (Principal::Uid(30), R::Reporter, Ok(())),
            (Principal::Uid(30), R::Reader, Ok(())),
            (Principal::Uid(30), R::Operator, Ok(())),
            (Principal::Uid(40), R::Reader, Err(D::Uid)),
            (id("spiffe://td/rep"), R::Reporter, Ok(())),
            (id("spiffe://td/rep"), R::Reader, Err(D::Role)),
            (id("spiffe://td/ro"), R::Reader, Ok(())),
            (id("spiffe://td/ro"), R::Operator, Err(D::Role)),
            (id("spiffe://td/ops"), R::Operator, Ok(())),
            (id("spiffe://td/ops"), R::Reporter, Ok(())),
            (id("spiffe://td/ops/other"), R::Reader, Err(D::UnknownId)),
            (
                id("spiffe://td2/ops"),
                R::Reader,
                Err(D::ForeignTrustDomain),
            ),
        ];
        for (who, role, want) in cases {
            assert_eq!(&p.check(who, *role), want, "{who} as {}", role.as_str());
        }
        assert_eq!(Principal::Uid(0).to_string(), "uid:0");
        assert_eq!(id("spiffe://td/ops").to_string(), "spiffe://td/ops");
    }

    #[test]
    fn the_principal_comes_from_the_transport_only() {
        let mut ext = http::Extensions::new();
        assert_eq!(principal(&ext), Err(Denial::NoCredentials));
        ext.insert(TcpConnectInfo {
            remote: "192.0.2.1:1".parse().unwrap(),
            peer_spiffe_id: Some("spiffe://td/ops".into()),
        });
        assert_eq!(principal(&ext), Ok(id("spiffe://td/ops")));
        ext.insert(TcpConnectInfo {
            remote: "192.0.2.1:1".parse().unwrap(),
            peer_spiffe_id: Some("not an id".into()),
        });
        assert_eq!(principal(&ext), Err(Denial::UnknownId));
        assert_eq!(Denial::NoCredentials.code(), Code::Unauthenticated);
        assert_eq!(Denial::Role.code(), Code::PermissionDenied);
    }
}
