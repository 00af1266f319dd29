//! One Kubernetes API client and every call the healer makes through it.
//!
//! The client is built on first use from `[kubernetes]` (a kubeconfig file
//! and context, or the pod's service account), always with
//! `default_retry = false`: kube's default retries a 429 up to 15 times
//! with backoff, and an eviction blocked by a PodDisruptionBudget then
//! took 243 s to return instead of 5 ms. Each call is bounded by
//! `request_timeout`, refused without being sent when its namespace is not
//! allow-listed, and counted in `spire_healer_k8s_requests_total{verb,code}`.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

use super::{KubernetesConfig, LabelSelector};
use crate::clock::Clock;
use crate::telemetry::Metrics;

/// What a call does: the `verb` label of `spire_healer_k8s_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// GET one object.
    Get,
    /// LIST a collection.
    List,
    /// POST an Eviction.
    Evict,
    /// DELETE a pod.
    Delete,
    /// PATCH an object.
    Patch,
}

impl Verb {
    /// Every verb.
    pub const ALL: [Verb; 5] = [
        Verb::Get,
        Verb::List,
        Verb::Evict,
        Verb::Delete,
        Verb::Patch,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Evict => "evict",
            Verb::Delete => "delete",
            Verb::Patch => "patch",
        }
    }
}

/// The `code` label of `spire_healer_k8s_requests_total`: `ok` for a
/// success, the HTTP status of a refusal (`5xx` for server errors, `other`
/// for the rest), `transport` when no answer came, `timeout` past
/// `request_timeout`.
pub const CODES: [&str; 12] = [
    "ok",
    "400",
    "401",
    "403",
    "404",
    "409",
    "422",
    "429",
    "5xx",
    "other",
    "transport",
    "timeout",
];

fn code_label(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        422 => "422",
        429 => "429",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Errors of a Kubernetes call.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The client could not be built (kubeconfig, context, service account).
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
    /// The namespace is not in `[kubernetes] namespaces`: nothing was sent.
    #[error("namespace {0:?} is not in [kubernetes] namespaces: not touched")]
    NamespaceNotAllowed(String),
    /// The API server refused the call.
    #[error("{verb} {what}: {code} {reason}: {message}")]
    Api {
        /// Verb label.
        verb: &'static str,
        /// What was called (`pod apps/web-1`).
        what: String,
        /// HTTP status.
        code: u16,
        /// Kubernetes reason (`TooManyRequests`, `Conflict`, …).
        reason: String,
        /// The server's message.
        message: String,
    },
    /// No answer (connection, TLS, decoding).
    #[error("{verb} {what}: {source}")]
    Transport {
        /// Verb label.
        verb: &'static str,
        /// What was called.
        what: String,
        /// kube's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// No answer within `request_timeout`.
    #[error("{verb} {what}: no answer within {after:?}")]
    Timeout {
        /// Verb label.
        verb: &'static str,
        /// What was called.
        what: String,
        /// The bound.
        after: Duration,
    },
}

impl K8sError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            K8sError::Client(_) => "client",
            K8sError::NamespaceNotAllowed(_) => "namespace_not_allowed",
            K8sError::Api { code: 403, .. } => "forbidden",
            K8sError::Api { code: 404, .. } => "not_found",
            K8sError::Api { code: 409, .. } => "conflict",
            K8sError::Api { code: 429, .. } => "too_many_requests",
            K8sError::Api { .. } => "api",
            K8sError::Transport { .. } => "transport",
            K8sError::Timeout { .. } => "timeout",
        }
    }

    /// The HTTP status when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            K8sError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A pod as it was read: what preconditions name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// `metadata.resourceVersion` when read.
    pub resource_version: String,
}

impl PodRef {
    /// The pod's identity as read; `None` when the server left out a field.
    pub fn of(pod: &Pod) -> Option<Self> {
        let m = &pod.metadata;
        Some(Self {
            namespace: m.namespace.clone()?,
            name: m.name.clone()?,
            uid: m.uid.clone()?,
            resource_version: m.resource_version.clone()?,
        })
    }
}

/// What an eviction request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// Accepted: the pod is being deleted.
    Accepted,
    /// 429: a PodDisruptionBudget allows no disruption now (the server's
    /// message says which).
    Blocked(String),
}

/// The Kubernetes API as the healer uses it (see the module docs).
pub struct Kube {
    config: KubernetesConfig,
    client: OnceCell<kube::Client>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

impl Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("namespaces", &self.config.namespaces)
            .finish_non_exhaustive()
    }
}

impl Kube {
    /// A handle that builds its client on first use (so a config that
    /// names no reachable cluster costs nothing until an action runs).
    pub fn new(config: KubernetesConfig, metrics: Arc<Metrics>, clock: Arc<dyn Clock>) -> Self {
        Self {
            config,
            client: OnceCell::new(),
            metrics,
            clock,
        }
    }

    /// A handle over an existing client (tests). The client should have
    /// been built with `default_retry = false`.
    pub fn with_client(
        config: KubernetesConfig,
        client: kube::Client,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            config,
            client: OnceCell::new_with(Some(client)),
            metrics,
            clock,
        }
    }

    /// The settings.
    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// The injected clock's time (for `restartedAt`).
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    async fn client(&self) -> Result<kube::Client, K8sError> {
        self.client
            .get_or_try_init(|| build_client(&self.config))
            .await
            .cloned()
    }

    fn check_namespace(&self, ns: &str) -> Result<(), K8sError> {
        if self.config.allows(ns) {
            Ok(())
        } else {
            Err(K8sError::NamespaceNotAllowed(ns.to_string()))
        }
    }

    async fn api<K>(&self, ns: &str) -> Result<Api<K>, K8sError>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        self.check_namespace(ns)?;
        Ok(Api::namespaced(self.client().await?, ns))
    }

    /// Runs one call under `request_timeout` and counts it.
    async fn call<T>(
        &self,
        verb: Verb,
        what: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, K8sError> {
        let after = self.config.request_timeout;
        let (code, result) = match tokio::time::timeout(after, fut).await {
            Ok(Ok(v)) => ("ok", Ok(v)),
            Ok(Err(kube::Error::Api(s))) => (
                code_label(s.code),
                Err(K8sError::Api {
                    verb: verb.as_str(),
                    what: what(),
                    code: s.code,
                    reason: s.reason.clone(),
                    message: s.message.clone(),
                }),
            ),
            Ok(Err(e)) => (
                "transport",
                Err(K8sError::Transport {
                    verb: verb.as_str(),
                    what: what(),
                    source: Box::new(e),
                }),
            ),
            Err(_) => (
                "timeout",
                Err(K8sError::Timeout {
                    verb: verb.as_str(),
                    what: what(),
                    after,
                }),
            ),
        };
        self.metrics
            .k8s_requests_total
            .with_label_values(&[verb.as_str(), code])
            .inc();
        result
    }

    /// Pods of `ns`, selected server-side by `selector` when given.
    ///
    /// # Errors
    /// [`K8sError`]; `NamespaceNotAllowed` before anything is sent.
    pub async fn list_pods(
        &self,
        ns: &str,
        selector: Option<&LabelSelector>,
    ) -> Result<Vec<Pod>, K8sError> {
        self.list(ns, selector).await
    }

    /// Objects of kind `K` in `ns`, selected server-side by `selector`.
    ///
    /// # Errors
    /// [`K8sError`]; `NamespaceNotAllowed` before anything is sent.
    pub async fn list<K>(
        &self,
        ns: &str,
        selector: Option<&LabelSelector>,
    ) -> Result<Vec<K>, K8sError>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api = self.api::<K>(ns).await?;
        let mut lp = ListParams::default();
        if let Some(s) = selector {
            lp = lp.labels(&s.to_string());
        }
        let what = || format!("{} in {ns}", K::plural(&()));
        let list = self.call(Verb::List, what, api.list(&lp)).await?;
        Ok(list.items)
    }

    /// One object of kind `K`; `None` when it does not exist.
    ///
    /// # Errors
    /// [`K8sError`]; `NamespaceNotAllowed` before anything is sent.
    pub async fn get<K>(&self, ns: &str, name: &str) -> Result<Option<K>, K8sError>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api = self.api::<K>(ns).await?;
        let what = || format!("{} {ns}/{name}", K::kind(&()));
        self.call(Verb::Get, what, api.get_opt(name)).await
    }

    /// Evicts `pod` through the Eviction API (policy/v1), with its UID and
    /// resourceVersion as preconditions. A PodDisruptionBudget's 429 is
    /// [`Eviction::Blocked`], not an error: it is not retried here.
    ///
    /// # Errors
    /// [`K8sError`]: a 409 when the pod changed since it was read, a 404
    /// when it is gone, a 403 without `pods/eviction` create.
    pub async fn evict(
        &self,
        pod: &PodRef,
        grace_period: Option<Duration>,
    ) -> Result<Eviction, K8sError> {
        let api = self.api::<Pod>(&pod.namespace).await?;
        let body = serde_json::json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": { "name": pod.name, "namespace": pod.namespace },
            "deleteOptions": delete_options(pod, grace_period),
        });
        let what = || format!("pod {}/{}", pod.namespace, pod.name);
        let pp = PostParams::default();
        let call =
            api.create_subresource::<_, serde_json::Value>("eviction", &pod.name, &pp, &body);
        match self.call(Verb::Evict, what, call).await {
            Ok(_) => Ok(Eviction::Accepted),
            Err(K8sError::Api {
                code: 429, message, ..
            }) => Ok(Eviction::Blocked(message)),
            Err(e) => Err(e),
        }
    }

    /// Deletes `pod` with its UID and resourceVersion as preconditions.
    ///
    /// # Errors
    /// [`K8sError`]: a 409 when the pod changed since it was read (another
    /// UID under the name, or a newer resourceVersion), a 404 when gone.
    pub async fn delete_pod(
        &self,
        pod: &PodRef,
        grace_period: Option<Duration>,
    ) -> Result<(), K8sError> {
        let api = self.api::<Pod>(&pod.namespace).await?;
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(pod.uid.clone()),
                resource_version: Some(pod.resource_version.clone()),
            }),
            grace_period_seconds: grace_period
                .map(|g| u32::try_from(g.as_secs()).unwrap_or(u32::MAX)),
            ..DeleteParams::default()
        };
        let what = || format!("pod {}/{}", pod.namespace, pod.name);
        self.call(Verb::Delete, what, api.delete(&pod.name, &dp))
            .await
            .map(|_| ())
    }

    /// A JSON merge patch of one object of kind `K`. Put
    /// `metadata.resourceVersion` in the patch to make it conditional (a
    /// 409 when the object changed).
    ///
    /// # Errors
    /// [`K8sError`]; `NamespaceNotAllowed` before anything is sent.
    pub async fn merge_patch<K>(
        &self,
        ns: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<K, K8sError>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api = self.api::<K>(ns).await?;
        let what = || format!("{} {ns}/{name}", K::kind(&()));
        let pp = PatchParams::default();
        self.call(
            Verb::Patch,
            what,
            api.patch(name, &pp, &Patch::Merge(patch)),
        )
        .await
    }
}

fn delete_options(pod: &PodRef, grace_period: Option<Duration>) -> serde_json::Value {
    let mut o = serde_json::json!({
        "preconditions": { "uid": pod.uid, "resourceVersion": pod.resource_version },
    });
    if let Some(g) = grace_period {
        o["gracePeriodSeconds"] = serde_json::json!(g.as_secs());
    }
    o
}

/// The client `[kubernetes]` describes: its kubeconfig and context, or the
/// in-cluster service account; retries off; every timeout at
/// `request_timeout`.
///
/// # Errors
/// `K8sError::Client` naming what could not be read or used.
pub async fn build_client(config: &KubernetesConfig) -> Result<kube::Client, K8sError> {
    let client_err =
        |what: &str, e: &dyn std::fmt::Display| K8sError::Client(format!("{what}: {e}"));
    let mut c = match &config.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| client_err(&format!("reading {}", path.display()), &e))?;
            let opts = kube::config::KubeConfigOptions {
                context: config.context.clone(),
                cluster: None,
                user: None,
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| client_err(&format!("using {}", path.display()), &e))?
        }
        None => kube::Config::incluster()
            .map_err(|e| client_err("the in-cluster service account", &e))?,
    };
    c.default_retry = false;
    c.connect_timeout = Some(config.request_timeout);
    c.read_timeout = Some(config.request_timeout);
    c.write_timeout = Some(config.request_timeout);
    // A read timeout counts from the request, not from when a pooled
    // connection went idle.
    c.reset_reader_on_write = true;
    // kube's TLS takes rustls' process default; ring is the one built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_from(c).map_err(|e| client_err("building the client", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_a_closed_set() {
        for status in [200, 201, 400, 401, 403, 404, 409, 410, 422, 429, 500, 503] {
            assert!(CODES.contains(&code_label(status)), "{status}");
        }
        assert_eq!(code_label(201), "ok");
        assert_eq!(code_label(410), "other");
        assert_eq!(code_label(504), "5xx");
    }

    #[test]
    fn eviction_preconditions_name_uid_and_resource_version() {
        let pod = PodRef {
            namespace: "apps".into(),
            name: "web-1".into(),
            uid: "u-1".into(),
            resource_version: "42".into(),
        };
        assert_eq!(
            delete_options(&pod, None),
            serde_json::json!({ "preconditions": { "uid": "u-1", "resourceVersion": "42" } })
        );
        assert_eq!(
            delete_options(&pod, Some(Duration::from_secs(5)))["gracePeriodSeconds"],
            5
        );
    }

    #[tokio::test]
    async fn a_namespace_outside_the_allow_list_is_never_sent() {
        let kube = Kube::new(
            KubernetesConfig {
                namespaces: vec!["apps".into()],
                // Would fail if a client were built: none is.
                kubeconfig: Some("/nonexistent/kubeconfig".into()),
                ..KubernetesConfig::default()
            },
            Arc::new(Metrics::new()),
            Arc::new(crate::clock::ManualClock::at_unix(0)),
        );
        let err = kube.list_pods("kube-system", None).await.unwrap_err();
        assert_eq!(err.kind(), "namespace_not_allowed");
        let pod = PodRef {
            namespace: "kube-system".into(),
            name: "x".into(),
            uid: "u".into(),
            resource_version: "1".into(),
        };
        assert_eq!(
            kube.evict(&pod, None).await.unwrap_err().kind(),
            "namespace_not_allowed"
        );
        assert_eq!(
            kube.delete_pod(&pod, None).await.unwrap_err().kind(),
            "namespace_not_allowed"
        );
        // An allowed namespace gets as far as building the client.
        let err = kube.list_pods("apps", None).await.unwrap_err();
        assert_eq!(err.kind(), "client", "{err}");
        assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
    }
}
