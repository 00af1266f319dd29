//! [`K8sPsat`]: SPIRE's `k8s_psat` node attestation against a lab
//! [`ControlPlane`], for the [`HaLab`](super::HaLab) (through
//! [`HaOptions::node_attestation`](super::HaOptions::node_attestation)).
//!
//! [`K8sPsat::provision`] prepares what an operator of a real cluster
//! would, with the simulated nodes of kwok standing in for machines:
//! - the namespace [`NAMESPACE`] with the ServiceAccounts
//!   [`AGENT_SERVICE_ACCOUNT`] (whose tokens agents present) and
//!   [`SERVER_SERVICE_ACCOUNT`] (who the servers are to the API server);
//! - RBAC for the servers with exactly the calls the server-side `k8s_psat`
//!   plugin of SPIRE v1.15.3 makes ([`SERVER_RBAC`]): `tokenreviews`
//!   create (is the agent's token valid, for the audience
//!   [`AUDIENCE`], and whose is it), `pods` get in [`NAMESPACE`] (the pod
//!   the token is bound to: its node, host IP and labels) and `nodes` get
//!   (the node's UID, the last segment of the agent's SPIFFE ID);
//! - per agent `j`: a kwok node `spire-node-<j>`, a pod `spire-agent-<j>`
//!   in [`NAMESPACE`] bound to it and running as [`AGENT_SERVICE_ACCOUNT`]
//!   (kwok reports it Running), and a token for that ServiceAccount from
//!   TokenRequest, audience [`AUDIENCE`], bound to the pod, so its claims
//!   name the pod and the node: what the kubelet would project into the
//!   agent's pod. It is written to `<dir>/agent-<j>.token`, the agent's
//!   `token_path`;
//! - a kubeconfig for [`SERVER_SERVICE_ACCOUNT`] (a TokenRequest token),
//!   the servers' `kube_config_file`.
//!
//! Agent `j` then attests as
//! `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<UID of spire-node-<j>>`
//! ([`K8sPsat::agent_id`]); the HA lab registers the node alias
//! `spiffe://<td>/node/<j>` for the selectors [`K8sPsat::alias_selectors`]
//! (the cluster and the node's UID), so entries parented to the alias
//! reach the agent as with join tokens.
//!
//! # Facts (measured with this lab and SPIRE v1.15.3)
//! - The plugin takes the pod name and UID from the TokenReview's `extra`
//!   fields, which the API server fills only for a token bound to a pod:
//!   an unbound token is refused ("fail to get pod name from token review
//!   status …: missing pod name").
//! - Each of the three grants is needed: without `pods` get attestation
//!   fails with "fail to get pod from k8s API server", without `nodes` get
//!   with "fail to get node", without `tokenreviews` create with "unable to
//!   validate token with TokenReview API" (each a 403 quoted in the agent's
//!   log).
//! - Agents attest with `can_reattest` true: unlike a join-token agent, an
//!   evicted k8s_psat agent may attest again by itself, so
//!   [`HaLab::new_join_token_for`](super::HaLab::new_join_token_for) is
//!   refused under `k8s_psat`.
//! - A bound token is valid only while its pod exists (Kubernetes
//!   invalidates it with the pod); the lab never deletes the pods.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use tokio::time::{Instant, sleep, timeout};

use super::k8s::{ControlPlane, write_private};
use super::{LabError, POLL, WAIT_LIMIT, make_dir};

/// The namespace of the agents' pods and of both ServiceAccounts.
pub const NAMESPACE: &str = "spire-system";
/// The ServiceAccount agents run as; the servers allow only it
/// (`service_account_allow_list = ["spire-system:spire-agent"]`).
pub const AGENT_SERVICE_ACCOUNT: &str = "spire-agent";
/// The ServiceAccount the servers call the API server as.
pub const SERVER_SERVICE_ACCOUNT: &str = "spire-server";
/// The agents' token audience: the plugin's default `audience`.
pub const AUDIENCE: &str = "spire-server";
/// The cluster name [`HaOptions`](super::HaOptions) users usually pass.
pub const DEFAULT_CLUSTER: &str = "kwok-lab";
/// Lifetime of the agents' tokens. The agent reads its token only to
/// attest, so it outlives any test; a real kubelet rotates it.
pub const AGENT_TOKEN_SECONDS: i64 = 24 * 3600;

/// The objects and RBAC [`K8sPsat::provision`] applies (before the nodes,
/// pods and tokens): the namespace, both ServiceAccounts, and for
/// `spire-server` a ClusterRole (`tokenreviews` create, `nodes` get) and a
/// Role in the namespace (`pods` get), each bound to it. Nothing else:
/// no list, no watch, no other namespace.
pub const SERVER_RBAC: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: spire-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: spire-agent, namespace: spire-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: spire-server, namespace: spire-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: spire-server-k8s-psat}
rules:
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: spire-server-k8s-psat}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: spire-server-k8s-psat}
subjects:
- {kind: ServiceAccount, name: spire-server, namespace: spire-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: spire-server-k8s-psat, namespace: spire-system}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: spire-server-k8s-psat, namespace: spire-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: spire-server-k8s-psat}
subjects:
- {kind: ServiceAccount, name: spire-server, namespace: spire-system}
"#;

/// Bound of one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How the HA lab's agents attest.
#[derive(Debug, Clone, Default)]
pub enum NodeAttestation {
    /// Each agent with a join token of its own (the default).
    #[default]
    JoinToken,
    /// `k8s_psat` against a lab control plane.
    K8sPsat(K8sPsat),
}

/// One simulated node of an agent: its kwok node, its pod and its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsatNode {
    /// The kwok node (`spire-node-<j>`).
    pub node: String,
    /// Its UID: the last segment of the agent's SPIFFE ID.
    pub node_uid: String,
    /// The agent's pod in [`NAMESPACE`] (`spire-agent-<j>`), bound to the
    /// node.
    pub pod: String,
    /// The pod's UID (the token is valid while this pod exists).
    pub pod_uid: String,
    /// The token bound to the pod: the agent's `token_path`.
    pub token_path: PathBuf,
}

/// `k8s_psat` settings of an HA lab: one cluster, one [`PsatNode`] per
/// agent (in agent order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPsat {
    /// The cluster name: the servers' `clusters` key, the agents'
    /// `cluster`, and a segment of every agent ID.
    pub cluster: String,
    /// The servers' `kube_config_file` (a [`SERVER_SERVICE_ACCOUNT`]
    /// kubeconfig).
    pub kube_config_file: PathBuf,
    /// The servers' `service_account_allow_list`.
    pub service_account_allow_list: Vec<String>,
    /// Agent `j` runs on `nodes[j]`.
    pub nodes: Vec<PsatNode>,
}

impl K8sPsat {
    /// Applies [`SERVER_RBAC`] to `plane`, creates `agents` kwok nodes and
    /// agent pods, requests one bound token per pod (written below `dir`,
    /// created if needed) and a kubeconfig for the servers; see the module
    /// docs. Bounded: each node and pod must be Ready or Running within
    /// [`WAIT_LIMIT`].
    ///
    /// # Errors
    /// [`LabError::Kube`] when the API server refuses a call (the error
    /// names it), [`LabError::NotReady`] for a node or pod that kwok does
    /// not bring up in time, file errors.
    pub async fn provision(
        plane: &ControlPlane,
        cluster: &str,
        agents: usize,
        dir: &Path,
    ) -> Result<K8sPsat, LabError> {
        if cluster.is_empty() || cluster.contains('/') {
            return Err(LabError::Options(format!(
                "{cluster:?} is not a usable k8s_psat cluster name (it is a segment of every agent ID)"
            )));
        }
        make_dir(dir)?;
        plane.apply_yaml(SERVER_RBAC).await?;
        let admin = plane.admin_client().await;
        let nodes_api: Api<Node> = Api::all(admin.clone());
        let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
        let mut nodes = Vec::with_capacity(agents);
        for j in 0..agents {
            let node = format!("spire-node-{j}");
            let pod = format!("spire-agent-{j}");
            plane.create_node(&node).await?;
            let node_uid = bounded(&format!("get node {node}"), nodes_api.get(&node))
                .await?
                .metadata
                .uid
                .filter(|u| !u.is_empty())
                .ok_or_else(|| LabError::State(format!("node {node} has no UID")))?;
            bounded(
                &format!("create pod {NAMESPACE}/{pod}"),
                pods.create(&PostParams::default(), &agent_pod(&pod, &node)?),
            )
            .await?;
            let pod_uid = wait_running(plane, &pods, &pod).await?;
            let token = request_agent_token(plane, &pod, &pod_uid).await?;
            let token_path = dir.join(format!("agent-{j}.token"));
            write_private(&token_path, token.as_bytes())?;
            nodes.push(PsatNode {
                node,
                node_uid,
                pod,
                pod_uid,
                token_path,
            });
        }
        let kube_config_file = plane
            .service_account_kubeconfig(NAMESPACE, SERVER_SERVICE_ACCOUNT)
            .await?;
        Ok(K8sPsat {
            cluster: cluster.to_owned(),
            kube_config_file,
            service_account_allow_list: vec![format!("{NAMESPACE}:{AGENT_SERVICE_ACCOUNT}")],
            nodes,
        })
    }

    /// Agent `j`'s SPIFFE ID:
    /// `spiffe://<trust_domain>/spire/agent/k8s_psat/<cluster>/<node UID>`.
    ///
    /// # Panics
    /// When `j` is out of range, like slice indexing.
    pub fn agent_id(&self, trust_domain: &str, j: usize) -> String {
        format!(
            "spiffe://{trust_domain}/spire/agent/k8s_psat/{}/{}",
            self.cluster, self.nodes[j].node_uid
        )
    }

    /// The selectors of agent `j`'s node alias entry: its cluster and its
    /// node's UID (the plugin gives every agent these, among others).
    ///
    /// # Panics
    /// When `j` is out of range, like slice indexing.
    pub fn alias_selectors(&self, j: usize) -> Vec<String> {
        vec![
            format!("k8s_psat:cluster:{}", self.cluster),
            format!("k8s_psat:agent_node_uid:{}", self.nodes[j].node_uid),
        ]
    }
}

/// A token for [`AGENT_SERVICE_ACCOUNT`] from TokenRequest, audience
/// [`AUDIENCE`], valid [`AGENT_TOKEN_SECONDS`], bound to the pod `pod`
/// (UID `pod_uid`) in [`NAMESPACE`].
///
/// # Errors
/// [`LabError::Kube`] (e.g. 404 when the pod or the ServiceAccount is
/// gone, or a UID that no longer matches), [`LabError::Timeout`].
pub async fn request_agent_token(
    plane: &ControlPlane,
    pod: &str,
    pod_uid: &str,
) -> Result<String, LabError> {
    let api: Api<ServiceAccount> = Api::namespaced(plane.admin_client().await, NAMESPACE);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![AUDIENCE.to_owned()]),
            expiration_seconds: Some(AGENT_TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.to_owned()),
                uid: Some(pod_uid.to_owned()),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let what = format!(
        "TokenRequest for {NAMESPACE}/{AGENT_SERVICE_ACCOUNT} bound to pod {pod} (audience {AUDIENCE})"
    );
    bounded(
        &what,
        api.create_token_request(AGENT_SERVICE_ACCOUNT, &PostParams::default(), &request),
    )
    .await?
    .status
    .and_then(|s| s.token)
    .filter(|t| !t.is_empty())
    .ok_or_else(|| LabError::State(format!("{what}: no token in the answer")))
}

/// The agent pod `name` on `node`: ServiceAccount
/// [`AGENT_SERVICE_ACCOUNT`], no token mounted (the lab hands the token to
/// the agent process itself), tolerating every taint like a DaemonSet pod.
fn agent_pod(name: &str, node: &str) -> Result<Pod, LabError> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": { "app": "spire-agent" },
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": AGENT_SERVICE_ACCOUNT,
            "automountServiceAccountToken": false,
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{ "name": "spire-agent", "image": "ghcr.io/spiffe/spire-agent:1.15.3" }],
        },
    }))
    .map_err(|e| LabError::State(format!("pod object for {name}: {e}")))
}

/// Waits (bounded by [`WAIT_LIMIT`]) until kwok reports the pod `name`
/// Running; returns its UID.
async fn wait_running(
    plane: &ControlPlane,
    pods: &Api<Pod>,
    name: &str,
) -> Result<String, LabError> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let last;
        plane.check_running()?;
        match timeout(CALL_TIMEOUT, pods.get_opt(name)).await {
            Ok(Ok(Some(pod))) => {
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                match (phase.as_deref(), pod.metadata.uid) {
                    (Some("Running"), Some(uid)) => return Ok(uid),
                    (phase, _) => last = format!("phase {phase:?}"),
                }
            }
            Ok(Ok(None)) => last = "no such pod".into(),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {CALL_TIMEOUT:?}"),
        }
        if Instant::now() >= deadline {
            return Err(LabError::not_ready(
                format!("pod {NAMESPACE}/{name} Running (kwok) not reached (last: {last})"),
                WAIT_LIMIT,
                &plane.work_dir().join("kwok.log"),
            ));
        }
        sleep(POLL).await;
    }
}

/// `call` bounded by [`CALL_TIMEOUT`], its error naming `what`.
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, LabError> {
    timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| LabError::Timeout {
            what: what.to_owned(),
            limit: CALL_TIMEOUT,
        })?
        .map_err(LabError::kube(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psat() -> K8sPsat {
        K8sPsat {
            cluster: "c".into(),
            kube_config_file: "/k".into(),
            service_account_allow_list: vec!["spire-system:spire-agent".into()],
            nodes: vec![PsatNode {
                node: "spire-node-0".into(),
                node_uid: "u-0".into(),
                pod: "spire-agent-0".into(),
                pod_uid: "p-0".into(),
                token_path: "/t".into(),
            }],
        }
    }

    #[test]
    fn agent_ids_and_alias_selectors() {
        let p = psat();
        assert_eq!(
            p.agent_id("td", 0),
            "spiffe://td/spire/agent/k8s_psat/c/u-0"
        );
        assert_eq!(
            p.alias_selectors(0),
            ["k8s_psat:cluster:c", "k8s_psat:agent_node_uid:u-0"]
        );
    }

    #[test]
    fn the_agent_pod_runs_as_the_allowed_service_account() {
        let pod = agent_pod("spire-agent-0", "spire-node-0").unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("spire-node-0"));
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some(AGENT_SERVICE_ACCOUNT)
        );
        assert_eq!(pod.metadata.namespace.as_deref(), Some(NAMESPACE));
    }

    #[test]
    fn the_rbac_grants_only_what_the_plugin_calls() {
        let verbs: Vec<&str> = SERVER_RBAC
            .lines()
            .filter_map(|l| l.trim().strip_prefix("verbs: "))
            .collect();
        assert_eq!(verbs, ["[create]", "[get]", "[get]"]);
    }
}
