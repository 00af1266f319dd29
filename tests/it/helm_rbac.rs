//! The Helm chart (`deploy/helm/spire-healer`) on a real API server: its RBAC
//! is enough for what spire-healer does and not more.
//!
//! A kubelet-less control plane ([`ControlPlane`], from the binaries named by
//! `SPIRE_HEALER_K8S_BIN`; skipped when unset) gets the committed plain
//! manifests, `deploy/kubernetes/spire-healer.yaml` (the chart with its
//! default values; `scripts/check-helm.sh` keeps them equal to a fresh
//! render), and a second render of the chart by its helm with other values
//! (two allowed namespaces, the postgres leadership backend, pod reads for
//! the node role). Then, for each role's ServiceAccount:
//! - a `kubectl auth can-i` matrix, asked twice: by the admin impersonating
//!   the ServiceAccount (`kubectl auth can-i … --as=system:serviceaccount:NS:SA`)
//!   and by the ServiceAccount itself, with a token from TokenRequest
//!   (SelfSubjectAccessReview, what `kubectl auth can-i` sends). Every verb the
//!   healer needs is yes in the allowed namespaces; what it must never do is
//!   no (secrets, pods outside the allow-list, its own namespace's pods,
//!   exec, logs, nodes, deleting Deployments, RBAC objects, other Leases,
//!   minting tokens, impersonation);
//! - the calls the cluster role really makes, with its own token and a
//!   client without retries: evicting a pod in an allowed namespace (201),
//!   creating, reading and replacing its Lease with a resourceVersion
//!   precondition (the `lease` backend's calls), and being refused (403) an
//!   eviction outside the allow-list, another namespace's Lease and a
//!   deletion of its own Lease;
//! - the Pod Security admission of the API server (`warn=restricted` on the
//!   release namespace): the cluster Deployment meets the `restricted`
//!   standard, the node DaemonSet misses it by its hostPath volume only.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, EvictParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use spire_lab::k8s::ControlPlane;
use tokio::time::timeout;

/// The whole test: the plane's start (≤ 60 s) and some 600 kubectl calls.
const TEST_LIMIT: Duration = Duration::from_secs(300);
/// One kubectl or API call.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// The release of the committed manifests.
const NS: &str = "spire-healer";
const CLUSTER_SA: &str = "spire-healer-cluster";
const NODE_SA: &str = "spire-healer-node";
const LEASE: &str = "spire-healer-cluster";
/// `kubernetes.namespaces` of the default values.
const ALLOWED: &str = "spire-system";

/// The second release, rendered here by helm.
const NS2: &str = "ops";
const RELEASE2: &str = "healer";
const CLUSTER_SA2: &str = "healer-spire-healer-cluster";
const NODE_SA2: &str = "healer-spire-healer-node";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One question to the authorizer: `kubectl auth can-i VERB RESOURCE
/// [--subresource SUB] [-n NS]`, and the answer the chart must give.
#[derive(Debug, Clone, Copy)]
struct Ask {
    verb: &'static str,
    /// `TYPE` or `TYPE/NAME`, as kubectl takes it.
    resource: &'static str,
    subresource: Option<&'static str>,
    /// `None`: cluster-scoped.
    ns: Option<&'static str>,
    allowed: bool,
}

const fn yes(verb: &'static str, resource: &'static str, ns: &'static str) -> Ask {
    Ask {
        verb,
        resource,
        subresource: None,
        ns: Some(ns),
        allowed: true,
    }
}

const fn no(verb: &'static str, resource: &'static str, ns: &'static str) -> Ask {
    Ask {
        verb,
        resource,
        subresource: None,
        ns: Some(ns),
        allowed: false,
    }
}

const fn sub(mut a: Ask, subresource: &'static str) -> Ask {
    a.subresource = Some(subresource);
    a
}

const fn cluster_scoped(verb: &'static str, resource: &'static str) -> Ask {
    Ask {
        verb,
        resource,
        subresource: None,
        ns: None,
        allowed: false,
    }
}

/// What no spire-healer ServiceAccount may do: in each of `namespaces`,
/// and cluster-wide.
fn never(namespaces: &[&'static str]) -> Vec<Ask> {
    let mut v = Vec::new();
    for &ns in namespaces {
        v.extend([
            no("get", "secrets", ns),
            no("list", "secrets", ns),
            no("create", "pods", ns),
            no("patch", "pods", ns),
            sub(no("create", "pods", ns), "exec"),
            sub(no("create", "pods", ns), "portforward"),
            sub(no("get", "pods", ns), "log"),
            sub(no("update", "pods", ns), "status"),
            no("delete", "deployments.apps", ns),
            no("update", "deployments.apps", ns),
            no("delete", "statefulsets.apps", ns),
            no("delete", "daemonsets.apps", ns),
            no("patch", "replicasets.apps", ns),
            no("get", "configmaps", ns),
            no("create", "rolebindings.rbac.authorization.k8s.io", ns),
            no("escalate", "roles.rbac.authorization.k8s.io", ns),
            sub(no("create", "serviceaccounts", ns), "token"),
            no("delete", "leases.coordination.k8s.io", ns),
            no("list", "leases.coordination.k8s.io", ns),
            no("patch", "poddisruptionbudgets.policy", ns),
        ]);
    }
    v.extend([
        cluster_scoped("get", "nodes"),
        cluster_scoped("delete", "nodes"),
        cluster_scoped("list", "namespaces"),
        cluster_scoped("list", "clusterroles.rbac.authorization.k8s.io"),
        cluster_scoped("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        cluster_scoped("impersonate", "users"),
        cluster_scoped("create", "certificatesigningrequests.certificates.k8s.io"),
    ]);
    v
}

/// Pods and owners in `ns`, as the cluster role acts on them.
fn cluster_acts_in(ns: &'static str) -> Vec<Ask> {
    vec![
        yes("get", "pods", ns),
        yes("list", "pods", ns),
        yes("watch", "pods", ns),
        yes("delete", "pods", ns),
        sub(yes("create", "pods", ns), "eviction"),
        yes("get", "deployments.apps", ns),
        yes("patch", "deployments.apps", ns),
        yes("get", "daemonsets.apps", ns),
        yes("patch", "daemonsets.apps", ns),
        yes("get", "statefulsets.apps", ns),
        yes("patch", "statefulsets.apps", ns),
        yes("get", "replicasets.apps", ns),
    ]
}

/// Nothing on the pods and owners of `ns`.
fn untouched(ns: &'static str) -> Vec<Ask> {
    vec![
        no("get", "pods", ns),
        no("list", "pods", ns),
        no("watch", "pods", ns),
        no("delete", "pods", ns),
        sub(no("create", "pods", ns), "eviction"),
        no("get", "deployments.apps", ns),
        no("patch", "deployments.apps", ns),
        no("patch", "daemonsets.apps", ns),
        no("patch", "statefulsets.apps", ns),
        no("get", "replicasets.apps", ns),
    ]
}

/// No Lease of `ns` at all.
fn no_leases(ns: &'static str) -> Vec<Ask> {
    vec![
        no("create", "leases.coordination.k8s.io", ns),
        no("get", "leases.coordination.k8s.io/spire-healer-cluster", ns),
        no(
            "update",
            "leases.coordination.k8s.io/spire-healer-cluster",
            ns,
        ),
    ]
}

/// The cluster role of the committed manifests.
fn cluster_matrix() -> Vec<Ask> {
    let mut v = cluster_acts_in(ALLOWED);
    v.extend([
        // Its Lease, in its own namespace, and only that one.
        yes("create", "leases.coordination.k8s.io", NS),
        yes("get", "leases.coordination.k8s.io/spire-healer-cluster", NS),
        yes(
            "update",
            "leases.coordination.k8s.io/spire-healer-cluster",
            NS,
        ),
        no(
            "get",
            "leases.coordination.k8s.io/kube-controller-manager",
            NS,
        ),
        no("update", "leases.coordination.k8s.io/another", NS),
        // Reading pods in the allowed namespace is not writing them.
        no("list", "deployments.apps", ALLOWED),
        no("list", "replicasets.apps", ALLOWED),
    ]);
    for ns in [NS, "default", "kube-system"] {
        v.extend(untouched(ns));
    }
    for ns in [ALLOWED, "default", "kube-node-lease"] {
        v.extend(no_leases(ns));
    }
    v.extend(never(&[ALLOWED, NS, "default"]));
    v
}

/// The node role of the committed manifests: nothing at all.
fn node_matrix() -> Vec<Ask> {
    let mut v = Vec::new();
    for ns in [ALLOWED, NS, "default"] {
        v.extend(untouched(ns));
        v.extend(no_leases(ns));
    }
    v.extend(never(&[ALLOWED, NS]));
    v
}

/// The second release's cluster role: two allowed namespaces, no Lease.
fn cluster_matrix2() -> Vec<Ask> {
    let mut v = cluster_acts_in("apps");
    v.extend(cluster_acts_in("web"));
    for ns in [ALLOWED, NS2, "default"] {
        v.extend(untouched(ns));
    }
    for ns in [NS2, "apps"] {
        v.extend(no_leases(ns));
    }
    v.extend(never(&["apps", NS2]));
    v
}

/// The second release's node role: pods read in the allowed namespaces.
fn node_matrix2() -> Vec<Ask> {
    let mut v = Vec::new();
    for ns in ["apps", "web"] {
        v.extend([
            yes("get", "pods", ns),
            yes("list", "pods", ns),
            yes("watch", "pods", ns),
            no("delete", "pods", ns),
            sub(no("create", "pods", ns), "eviction"),
            no("get", "deployments.apps", ns),
            no("patch", "deployments.apps", ns),
        ]);
    }
    for ns in [ALLOWED, NS2] {
        v.extend(untouched(ns));
        v.extend(no_leases(ns));
    }
    v.extend(never(&["apps", NS2]));
    v
}

/// kubectl, bounded, returning (status success, stdout, stderr).
async fn run(cmd: std::process::Command) -> Result<(bool, String, String)> {
    let what = format!("{cmd:?}");
    let out = timeout(
        CALL_LIMIT,
        tokio::process::Command::from(cmd)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{what}: no answer within {CALL_LIMIT:?}"))?
    .with_context(|| format!("running {what}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

impl Ask {
    /// `(group, resource, name)` of `TYPE[.GROUP][/NAME]`.
    fn parts(&self) -> (&'static str, &'static str, Option<&'static str>) {
        let (ty, name) = match self.resource.split_once('/') {
            Some((ty, name)) => (ty, Some(name)),
            None => (self.resource, None),
        };
        match ty.split_once('.') {
            Some((resource, group)) => (group, resource, name),
            None => ("", ty, name),
        }
    }

    /// A wrong answer, as one line.
    fn wrong(&self, who: &str, answer: bool) -> String {
        let word = |b: bool| if b { "yes" } else { "no" };
        format!(
            "{who}: can-i {} {}{} in {} = {}, expected {}",
            self.verb,
            self.resource,
            self.subresource
                .map(|s| format!(" --subresource={s}"))
                .unwrap_or_default(),
            self.ns.unwrap_or("(cluster)"),
            word(answer),
            word(self.allowed),
        )
    }
}

/// Parallel kubectl calls (each is a process start; the machine has few
/// cores).
const KUBECTL_PARALLEL: usize = 4;

/// The matrix as `kubectl auth can-i … --as=system:serviceaccount:NS:SA`
/// from the admin; one line per wrong answer.
async fn ask_kubectl_as(
    plane: &ControlPlane,
    ns: &str,
    sa: &str,
    matrix: &[Ask],
) -> Result<Vec<String>> {
    use futures::stream::{self, StreamExt as _, TryStreamExt as _};
    let who = format!("--as=system:serviceaccount:{ns}:{sa}");
    let who = who.as_str();
    let answers: Vec<bool> = stream::iter(matrix.iter().map(|a| {
        let mut cmd = plane.kubectl();
        cmd.args(["auth", "can-i", a.verb, a.resource]);
        if let Some(s) = a.subresource {
            cmd.arg(format!("--subresource={s}"));
        }
        if let Some(ns) = a.ns {
            cmd.args(["-n", ns]);
        }
        cmd.arg(who);
        async move {
            let (_, stdout, stderr) = run(cmd).await?;
            match stdout.trim() {
                "yes" => Ok(true),
                "no" => Ok(false),
                other => bail!(
                    "kubectl auth can-i {} {} {who} answered {other:?}: {}",
                    a.verb,
                    a.resource,
                    stderr.trim()
                ),
            }
        }
    }))
    .buffered(KUBECTL_PARALLEL)
    .try_collect()
    .await?;
    Ok(matrix
        .iter()
        .zip(answers)
        .filter(|(a, answer)| *answer != a.allowed)
        .map(|(a, answer)| a.wrong(who, answer))
        .collect())
}

/// The matrix asked by the ServiceAccount itself, with its own token
/// (SelfSubjectAccessReview, what `kubectl auth can-i` sends); one line per
/// wrong answer.
async fn ask_as_itself(
    plane: &ControlPlane,
    ns: &str,
    sa: &str,
    matrix: &[Ask],
) -> Result<Vec<String>> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let client = service_account_client(plane, ns, sa).await?;
    let api = Api::<SelfSubjectAccessReview>::all(client);
    let who = format!("token of {ns}/{sa}");
    let mut wrong = Vec::new();
    for a in matrix {
        let (group, resource, name) = a.parts();
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource: a.subresource.map(Into::into),
                    name: name.map(Into::into),
                    namespace: a.ns.map(Into::into),
                    verb: Some(a.verb.into()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = timeout(CALL_LIMIT, api.create(&PostParams::default(), &review))
            .await
            .context("SelfSubjectAccessReview: no answer in time")?
            .with_context(|| format!("SelfSubjectAccessReview as {who}"))?
            .status
            .map(|s| s.allowed)
            .context("a SelfSubjectAccessReview without status")?;
        if answer != a.allowed {
            wrong.push(a.wrong(&who, answer));
        }
    }
    Ok(wrong)
}

/// The matrix asked both ways.
async fn check_matrix(
    plane: &ControlPlane,
    ns: &str,
    sa: &str,
    matrix: &[Ask],
) -> Result<Vec<String>> {
    let mut wrong = ask_kubectl_as(plane, ns, sa, matrix).await?;
    wrong.extend(ask_as_itself(plane, ns, sa, matrix).await?);
    Ok(wrong)
}

/// `kubectl apply -f -` of `yaml` as the admin; returns stderr (warnings).
async fn apply(plane: &ControlPlane, yaml: &str) -> Result<String> {
    let mut cmd = tokio::process::Command::from(plane.kubectl());
    cmd.args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning kubectl")?;
    let mut stdin = child.stdin.take().context("kubectl's stdin")?;
    let out = timeout(CALL_LIMIT, async {
        tokio::io::AsyncWriteExt::write_all(&mut stdin, yaml.as_bytes()).await?;
        drop(stdin);
        child.wait_with_output().await
    })
    .await
    .context("kubectl apply: no answer in time")??;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "kubectl apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr
    );
    Ok(stderr)
}

/// The documents of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<&str> {
    yaml.split("\n---\n")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
        })
        .collect()
}

fn kind_of(doc: &str) -> Option<&str> {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .map(str::trim)
}

/// A client acting as `ns/sa` with its own token, without retries (a 403
/// or 429 is an answer).
async fn service_account_client(plane: &ControlPlane, ns: &str, sa: &str) -> Result<kube::Client> {
    let path = plane.service_account_kubeconfig(ns, sa).await?;
    let kubeconfig = Kubeconfig::read_from(&path)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

fn forbidden<T: std::fmt::Debug>(r: kube::Result<T>, what: &str) -> Result<()> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(()),
        other => bail!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// The cluster role's real calls, with its own token.
async fn cluster_calls(plane: &ControlPlane) -> Result<()> {
    let admin = plane.admin_client().await;
    let healer = service_account_client(plane, NS, CLUSTER_SA).await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "victim"},
        "spec": {"containers": [{"name": "c", "image": "example.org/none:1"}]}
    }))?;
    for ns in [ALLOWED, "default"] {
        timeout(
            CALL_LIMIT,
            Api::<Pod>::namespaced(admin.clone(), ns).create(&PostParams::default(), &pod),
        )
        .await
        .context("creating a pod")?
        .with_context(|| format!("creating pod {ns}/victim"))?;
    }
    let evict = |ns: &str| {
        let api = Api::<Pod>::namespaced(healer.clone(), ns);
        async move { timeout(CALL_LIMIT, api.evict("victim", &EvictParams::default())).await }
    };
    evict(ALLOWED)
        .await?
        .context("the cluster role evicting a pod in its allowed namespace")?;
    forbidden(
        evict("default").await?,
        "evicting a pod outside the allow-list",
    )?;

    // The lease backend's calls: get (absent), create, get, replace with
    // the resourceVersion just read.
    let leases = Api::<Lease>::namespaced(healer.clone(), NS);
    let absent = timeout(CALL_LIMIT, leases.get_opt(LEASE)).await??;
    ensure!(
        absent.is_none(),
        "the Lease exists before anyone took it: {absent:?}"
    );
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(LEASE.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("helm-rbac-test".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    timeout(CALL_LIMIT, leases.create(&PostParams::default(), &lease))
        .await?
        .context("the cluster role creating its Lease")?;
    let mut held = timeout(CALL_LIMIT, leases.get(LEASE)).await??;
    if let Some(spec) = held.spec.as_mut() {
        spec.lease_transitions = Some(1);
    }
    let replaced = timeout(
        CALL_LIMIT,
        leases.replace(LEASE, &PostParams::default(), &held),
    )
    .await?
    .context("the cluster role replacing its Lease")?;
    ensure!(
        replaced.spec.and_then(|s| s.lease_transitions) == Some(1),
        "the replaced Lease does not hold the change"
    );
    forbidden(
        timeout(CALL_LIMIT, leases.delete(LEASE, &DeleteParams::default())).await?,
        "deleting its own Lease",
    )?;
    let elsewhere = Api::<Lease>::namespaced(healer, ALLOWED);
    forbidden(
        timeout(CALL_LIMIT, elsewhere.create(&PostParams::default(), &lease)).await?,
        "creating a Lease outside the release namespace",
    )?;
    Ok(())
}

/// The second release: the chart rendered by the helm next to the plane's
/// binaries.
async fn render_second_release(bin_dir: &Path) -> Result<String> {
    let mut cmd = std::process::Command::new(bin_dir.join("helm"));
    cmd.args(["template", RELEASE2])
        .arg(root().join("deploy/helm/spire-healer"))
        .args(["--namespace", NS2])
        .args(["--set-json", r#"kubernetes.namespaces=["apps","web"]"#])
        .args(["--set", "leadership.backend=postgres"])
        .args(["--set", "node.kubernetesAccess=true"]);
    let (ok, stdout, stderr) = run(cmd).await?;
    ensure!(ok, "helm template failed: {stderr}");
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_rbac_is_enough_and_not_more() -> Result<()> {
    let Some(bin_dir) = ControlPlane::bin_dir_from_env() else {
        eprintln!(
            "skipping helm_rbac: SPIRE_HEALER_K8S_BIN is not set (scripts/test.sh sets it to the \
             folder scripts/install-k8s.sh prints)"
        );
        return Ok(());
    };
    timeout(TEST_LIMIT, run_test(&bin_dir))
        .await
        .context("the test did not finish in time")?
}

async fn run_test(bin_dir: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plane = ControlPlane::start(dir.path()).await?;

    // Namespaces; the release namespace warns about the restricted Pod
    // Security Standard (warnings only: the API server reports, admits).
    let mut namespaces = String::new();
    for ns in [NS, ALLOWED, NS2, "apps", "web"] {
        namespaces.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    \
             pod-security.kubernetes.io/warn: restricted\n---\n"
        ));
    }
    apply(&plane, &namespaces).await?;

    // The committed manifests: everything but the workloads, then each
    // workload alone so that its Pod Security warnings are its own.
    let manifests = std::fs::read_to_string(root().join("deploy/kubernetes/spire-healer.yaml"))?;
    let docs = documents(&manifests);
    let (workloads, rest): (Vec<&str>, Vec<&str>) = docs
        .iter()
        .partition(|d| matches!(kind_of(d), Some("DaemonSet" | "Deployment")));
    ensure!(
        workloads.len() == 2,
        "expected a DaemonSet and a Deployment, found {}",
        workloads.len()
    );
    let warned = apply(&plane, &rest.join("\n---\n")).await?;
    ensure!(
        !warned.contains("PodSecurity"),
        "Pod Security warnings for non-workloads: {warned}"
    );
    for w in &workloads {
        let kind = kind_of(w).unwrap_or_default();
        let stderr = apply(&plane, w).await?;
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("PodSecurity"))
            .collect();
        match kind {
            "Deployment" => ensure!(
                warnings.is_empty(),
                "the cluster Deployment does not meet the restricted standard: {warnings:?}"
            ),
            _ => ensure!(
                warnings.len() == 1
                    && warnings[0].ends_with(
                        r#""restricted:latest": restricted volume types (volume "agent-socket" uses restricted volume type "hostPath")"#,
                    ),
                "the node DaemonSet should miss the restricted standard by its hostPath volume \
                 only, warned: {warnings:?}"
            ),
        }
    }

    let mut wrong = check_matrix(&plane, NS, CLUSTER_SA, &cluster_matrix()).await?;
    wrong.extend(check_matrix(&plane, NS, NODE_SA, &node_matrix()).await?);
    ensure!(
        wrong.is_empty(),
        "wrong RBAC answers for deploy/kubernetes/spire-healer.yaml:\n{}",
        wrong.join("\n")
    );
    cluster_calls(&plane).await?;

    // The second release, from the chart with other values.
    apply(&plane, &render_second_release(bin_dir).await?).await?;
    let mut wrong = check_matrix(&plane, NS2, CLUSTER_SA2, &cluster_matrix2()).await?;
    wrong.extend(check_matrix(&plane, NS2, NODE_SA2, &node_matrix2()).await?);
    ensure!(
        wrong.is_empty(),
        "wrong RBAC answers for the chart rendered with two allowed namespaces:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// The block scalar `  <key>: |` of the committed manifests' ConfigMap,
/// unindented.
fn config_map_entry(manifests: &str, key: &str) -> Option<String> {
    let mut lines = manifests
        .lines()
        .skip_while(|l| *l != format!("  {key}: |"));
    lines.next()?;
    let mut text = String::new();
    for line in lines {
        if line.is_empty() {
            text.push('\n');
        } else if let Some(rest) = line.strip_prefix("    ") {
            text.push_str(rest);
            text.push('\n');
        } else {
            break;
        }
    }
    Some(text)
}

/// Each role's configuration as the chart renders it is a valid
/// configuration of this build (`Config::check`, as `check-config` and
/// `run` do), with the pod's environment: the database URL from the
/// Secret, the node's name from `spec.nodeName`, the spool directory (an
/// emptyDir) here a temporary one.
fn rendered_config(role: &str) -> Result<spire_healer::config::Resolved> {
    let manifests = std::fs::read_to_string(root().join("deploy/kubernetes/spire-healer.yaml"))?;
    let key = format!("{role}.toml");
    let text =
        config_map_entry(&manifests, &key).with_context(|| format!("no {key} in the ConfigMap"))?;
    ensure!(
        text.contains(&format!("role = \"{role}\"\n")),
        "{key} names another role:\n{text}"
    );
    let dir = tempfile::tempdir()?;
    let text = text.replace(
        "\"/var/lib/spire-healer/",
        &format!("\"{}/", dir.path().display()),
    );
    let env = |k: &str| match k {
        "SPIRE_HEALER_DATABASE_URL" => {
            Some("postgres://spire_healer:secret@127.0.0.1:5432/spire_healer".to_string())
        }
        "SPIRE_HEALER_NODE_NAME" => Some("kwok-node-0.example".to_string()),
        _ => None,
    };
    spire_healer::config::Config::check(&text, &key, &env).map_err(|problems| {
        anyhow::anyhow!(
            "the chart's {key} is refused:\n{}\n{text}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

#[test]
fn the_rendered_node_configuration_passes_check_config() -> Result<()> {
    let resolved = rendered_config("node")?;
    ensure!(resolved.config.role == spire_healer::leadership::Role::Node);
    // One agent name per node.
    let names: Vec<&str> = resolved
        .config
        .agents
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    ensure!(names == ["kwok-node-0_example"], "agent names {names:?}");
    Ok(())
}

#[test]
fn the_rendered_cluster_configuration_passes_check_config() -> Result<()> {
    let resolved = rendered_config("cluster")?;
    let c = &resolved.config;
    ensure!(c.role == spire_healer::leadership::Role::Cluster);
    ensure!(
        c.agents.is_empty(),
        "the cluster instance watches no local agent"
    );
    let lead = spire_healer::leadership::of(c, "postgres://x/y").context("no leadership")?;
    ensure!(
        lead.backend == spire_healer::leadership::Backend::Lease,
        "{lead:?}"
    );
    let k = c.kubernetes.as_ref().context("no [kubernetes]")?;
    ensure!(!k.namespaces.is_empty());
    ensure!(
        c.actuators.values().all(|a| a.is_kubernetes()),
        "the cluster role's actuators are the Kubernetes ones"
    );
    Ok(())
}
