//! The Kubernetes actuators against a real API server (the lab's
//! kubelet-less control plane, `SPIRE_HEALER_K8S_BIN`; skipped without
//! it) and a real SPIRE server, driven through the `spire-healer run`
//! binary and read back from its store and `/metrics`.
//!
//! The symptom comes from a real sensor: a `[[cert_files]]` file holding an
//! expired X509-SVID opens `stale_cert_file`, and the incident's SPIFFE ID
//! maps to pods through the `k8s:` selectors of its registration entry on
//! the SPIRE server (or, for the rollout, through a configured workload).
//! The test then plays the replacement pod's certificate writer: once the
//! action has returned, it writes a fresh certificate, and the loop
//! verifies the step by the incident closing.
//!
//! The healer acts as the unprivileged user `spire-healer`, whose Role in
//! `apps` grants what the actuators need and nothing else; the namespace
//! `other` runs the same Deployment and is not in the allow-list.
//!
//! Scenarios (issue 12 a and b):
//! 1. A Deployment of 3 Ready pods under a PodDisruptionBudget allowing one
//!    disruption: `k8s_evict` evicts the mapped pod, its replacement is
//!    Ready, the step is verified.
//! 2. With no disruption allowed: every attempt is held as `pdb_blocked` in
//!    milliseconds, one eviction call per cooldown, the rung is re-armed;
//!    once the budget allows, the next attempt evicts and is verified.
//! 3. An identity whose entry names a namespace outside the allow-list is
//!    held as `namespace_not_allowed`; nothing there is read or touched
//!    (no 403 ever, the pods there keep their UIDs).
//! 4. `k8s_rollout_restart` of the owning Deployment (mapped through a
//!    configured workload): every pod replaced, the step verified.
//! 5. In-process: `k8s_delete_pod` through the same mapping, a delete with a
//!    stale resourceVersion or UID refused with 409, the mapping refusals.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use spire_healer::actuators::Actuator;
use spire_healer::actuators::k8s::{K8sPodConfig, Mode, PodActuator};
use spire_healer::actuators::spire::Topology;
use spire_healer::k8s::client::PodRef;
use spire_healer::k8s::mapping::{self, Refusal};
use spire_healer::k8s::{Kube, KubernetesConfig};
use spire_healer::knowledge::{ActionRecord, Query};
use spire_healer::model::{Observations, OutcomeKind, Step, SymptomKind};
use spire_healer::policy::DEFAULT_POLICY;
use spire_healer::telemetry::Metrics;
use tokio::time::Instant;

use crate::daemon::wait_until;
use crate::k8s_fixtures::{Healer, write_cert};
use crate::spire_lab::{LabOptions, SpireLab};

const NS: &str = "apps";
const OTHER_NS: &str = "other";
const USER: &str = "spire-healer";
/// The policy's cooldown (guards.cooldown) in this test.
const COOLDOWN: Duration = Duration::from_secs(3);
const LIMIT: Duration = Duration::from_secs(90);

/// Namespaces, the healer's Role (pods get/list/delete, evictions,
/// ReplicaSets get, owners get/patch: what the Helm chart grants, less
/// `watch`) in `apps` only, the same
/// Deployment of 3 in both namespaces, and a budget of 2 in `apps`.
fn manifests() -> String {
    let deployment = |ns: &str| {
        format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: web, namespace: {ns} }}
spec:
  replicas: 3
  selector: {{ matchLabels: {{ app: web }} }}
  template:
    metadata: {{ labels: {{ app: web }} }}
    spec:
      terminationGracePeriodSeconds: 1
      serviceAccountName: default
      containers: [{{ name: app, image: registry.invalid/web:1 }}]
"#
        )
    };
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{ name: {NS} }}
---
apiVersion: v1
kind: Namespace
metadata: {{ name: {OTHER_NS} }}
---
{role}---
{}
---
{}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {{ name: web, namespace: {NS} }}
spec:
  minAvailable: 2
  selector: {{ matchLabels: {{ app: web }} }}
"#,
        deployment(NS),
        deployment(OTHER_NS),
        role = crate::k8s_fixtures::actuator_role(NS, USER),
    )
}

/// An entry for `spiffe://healer.test/<path>` under the lab's node alias
/// with `selectors` (`k8s:ns:apps`, …).
async fn create_entry(lab: &SpireLab, path: &str, selectors: &[String]) -> Result<()> {
    let id = lab.spiffe_id(path);
    let alias = lab.node_alias();
    let mut args = vec!["entry", "create", "-parentID", &alias, "-spiffeID", &id];
    for s in selectors {
        args.extend(["-selector", s.as_str()]);
    }
    let out = lab.server_cli(&args).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("Entry ID"), "entry create said: {text}");
    Ok(())
}

/// The pods of `web` in `ns` that run (not terminating), by name.
async fn running_pods(admin: &kube::Client, ns: &str) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let mut pods: Vec<Pod> = api
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(pods)
}

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Sets the budget's `minAvailable` and waits until the disruption
/// controller allows exactly `allowed` disruptions for it.
async fn set_budget(admin: &kube::Client, min_available: i32, allowed: i32) -> Result<()> {
    let api: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), NS);
    let patch = json!({ "spec": { "minAvailable": min_available } });
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_until(
        &format!("the budget to allow {allowed} disruption(s)"),
        LIMIT,
        || async {
            let pdb = api.get("web").await.ok()?;
            let s = pdb.status?;
            (s.observed_generation == pdb.metadata.generation
                && s.disruptions_allowed == Some(allowed))
            .then_some(())
        },
    )
    .await
}

/// The default policy with a 3 s cooldown and `stale_cert_file` handled by
/// one rung of `actuator`.
fn policy(dir: &Path, actuator: &str) -> Result<PathBuf> {
    let ladder = "[[ladders.stale_cert_file]]\nactuator = \"reload-helper\"\ntimeout = \"10s\"\nverify_within = \"20s\"\n\n[[ladders.stale_cert_file]]\nactuator = \"restart-helper\"\ntimeout = \"30s\"\nverify_within = \"30s\"\n";
    ensure!(
        DEFAULT_POLICY.contains(ladder) && DEFAULT_POLICY.contains("cooldown = \"20s\""),
        "the default policy changed"
    );
    let text = DEFAULT_POLICY
        .replace(
            ladder,
            &format!(
                "[[ladders.stale_cert_file]]\nactuator = \"{actuator}\"\ntimeout = \"60s\"\nverify_within = \"30s\"\n"
            ),
        )
        .replace(
            "cooldown = \"20s\"",
            &format!("cooldown = \"{}s\"", COOLDOWN.as_secs()),
        );
    let path = dir.join(format!("policy-{actuator}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The healer's config: the lab's server (entries, reachability), the
/// certificate files, the user's kubeconfig and `extra` (actuators,
/// workloads).
fn config(
    lab: &SpireLab,
    kubeconfig: &Path,
    policy: &Path,
    files: &[(&str, &Path)],
    extra: &str,
) -> String {
    let mut text = format!(
        r#"
policy_file = "{policy}"

[supervisor]
tick_interval = "250ms"

[database]
url = "{{url}}"

[http]
listen = "127.0.0.1:{{port}}"

[[agents]]
name = "lab-agent"
address = "unix://{agent}"

[[servers]]
name = "lab-server"
admin_socket = "{socket}"
poll_interval = "1s"
"#,
        policy = policy.display(),
        agent = lab.workload_socket().display(),
        socket = lab.server_socket().display(),
    );
    for (name, path) in files {
        text.push_str(&format!(
            "\n[[cert_files]]\nname = \"{name}\"\ncert_path = \"{}\"\npoll_interval = \"250ms\"\n",
            path.display()
        ));
    }
    text.push_str(&format!(
        r#"
[kubernetes]
kubeconfig = "{}"
namespaces = ["{NS}"]
request_timeout = "5s"
{extra}
"#,
        kubeconfig.display()
    ));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_restart_and_delete_on_a_real_api_server() -> Result<()> {
    if spire_lab::ControlPlane::bin_dir_from_env().is_none() {
        eprintln!(
            "skipped: SPIRE_HEALER_K8S_BIN is not set (scripts/test.sh builds the control plane)"
        );
        return Ok(());
    }
    let dir = tempfile::Builder::new().prefix("healer-k8s").tempdir()?;
    let plane = spire_lab::ControlPlane::start(&dir.path().join("plane")).await?;
    let lab = SpireLab::start(LabOptions::default()).await?;
    // The healer's own identity from the lab's agent (it watches that
    // agent; without an entry it would report identity_not_issued).
    lab.register_entry("/healer", nix::unistd::getuid().as_raw(), 3600)
        .await?;
    plane.apply_yaml(&manifests()).await?;
    for ns in [NS, OTHER_NS] {
        plane
            .wait_deployment_ready(ns, "web", 3, Duration::from_secs(60))
            .await?;
    }
    let admin = plane.admin_client().await;
    set_budget(&admin, 2, 1).await?;
    let kubeconfig = plane.user_kubeconfig(USER);
    let others: Vec<String> = running_pods(&admin, OTHER_NS)
        .await?
        .iter()
        .map(uid)
        .collect();
    ensure!(others.len() == 3, "{others:?}");

    let result = async {
        let healer = evict_under_a_budget(&lab, &admin, &kubeconfig, dir.path()).await?;
        // Nothing forbidden was ever attempted: the Role was enough, and the
        // namespace outside the allow-list was never asked.
        let text = healer.metrics().await?;
        for verb in ["get", "list", "evict", "delete", "patch"] {
            let series = format!(r#"spire_healer_k8s_requests_total{{code="403",verb="{verb}"}}"#);
            ensure!(
                spire_healer::telemetry::metrics::sample(&text, &series) == Some(0.0),
                "{series} is not 0:\n{text}"
            );
        }
        drop(healer);
        rollout_restart(&lab, &admin, &kubeconfig, dir.path()).await?;
        delete_and_refusals(&lab, &admin, &kubeconfig).await?;
        // The other namespace's pods are the ones it started with.
        let now: Vec<String> = running_pods(&admin, OTHER_NS)
            .await?
            .iter()
            .map(uid)
            .collect();
        ensure!(
            now == others,
            "pods in {OTHER_NS} changed: {others:?} -> {now:?}"
        );
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        for (name, log) in plane.logs() {
            eprintln!("--- {name}:\n{}", spire_lab::log_tail(log));
        }
    }
    result
}

/// Scenarios 1-3 through one healer evicting with `k8s_evict`.
async fn evict_under_a_budget(
    lab: &SpireLab,
    admin: &kube::Client,
    kubeconfig: &Path,
    dir: &Path,
) -> Result<Healer> {
    let pods = running_pods(admin, NS).await?;
    let (first, second) = (&pods[0], &pods[1]);
    let before: Vec<String> = pods.iter().map(uid).collect();
    // One pod per identity, by the selectors SPIRE's k8s attestor matches.
    create_entry(
        lab,
        "/web",
        &[
            format!("k8s:ns:{NS}"),
            format!("k8s:pod-name:{}", name(first)),
        ],
    )
    .await?;
    create_entry(
        lab,
        "/web2",
        &[
            format!("k8s:ns:{NS}"),
            "k8s:sa:default".into(),
            format!("k8s:pod-uid:{}", uid(second)),
        ],
    )
    .await?;
    create_entry(
        lab,
        "/other",
        &[format!("k8s:ns:{OTHER_NS}"), "k8s:pod-label:app:web".into()],
    )
    .await?;
    let file = |n: &str| dir.join(format!("{n}.pem"));
    write_cert(&file("web"), &lab.spiffe_id("/web"), true)?;
    write_cert(&file("web2"), &lab.spiffe_id("/web2"), false)?;
    write_cert(&file("other"), &lab.spiffe_id("/other"), true)?;
    let policy = policy(dir, "evict-pod")?;
    let text = config(
        lab,
        kubeconfig,
        &policy,
        &[
            ("web-svid", &file("web")),
            ("web2-svid", &file("web2")),
            ("other-svid", &file("other")),
        ],
        "\n[actuators.evict-pod]\ntype = \"k8s_evict\"\npoll_interval = \"200ms\"\n",
    );
    let healer = Healer::start(dir, "evict", &text).await?;

    // 1. One disruption allowed: evicted, replaced, verified.
    let inc = healer.wait_incident("web-svid").await?;
    ensure!(
        inc.evidence["spiffe_id"] == lab.spiffe_id("/web"),
        "{inc:?}"
    );
    let done = healer.wait_outcome(&inc.id, "ok").await?;
    let detail = done.detail.clone().context("detail")?;
    let replaced = &detail["replaced"][0];
    ensure!(replaced["old_uid"] == uid(first), "{detail}");
    let new_uid = replaced["new_uid"].as_str().context("new uid")?.to_string();
    ensure!(!before.contains(&new_uid), "{detail}");
    ensure!(detail["mapping"]["via"] == "entries", "{detail}");
    ensure!(
        replaced["owner"] == format!("Deployment {NS}/web"),
        "{detail}"
    );
    let now = running_pods(admin, NS).await?;
    ensure!(
        !now.iter().any(|p| uid(p) == uid(first)),
        "the evicted pod is gone"
    );
    ensure!(
        now.iter().any(|p| uid(p) == new_uid),
        "its replacement runs"
    );
    // The replacement's certificate writer catches up: verified.
    write_cert(&file("web"), &lab.spiffe_id("/web"), false)?;
    healer.wait_verified(&inc.id, &done.id).await?;

    // 3. An identity outside the allow-list: held, nothing read there.
    let other = healer.wait_incident("other-svid").await?;
    let held = healer.wait_outcome(&other.id, "held").await?;
    let d = held.detail.clone().unwrap_or_default();
    ensure!(d["held"] == "namespace_not_allowed", "{d}");
    ensure!(
        held.verification.as_deref() == Some("skipped") || held.verification.is_none(),
        "{held:?}"
    );
    write_cert(&file("other"), &lab.spiffe_id("/other"), false)?;

    // 2. No disruption allowed: held as pdb_blocked, once per cooldown.
    let pods = running_pods(admin, NS).await?;
    ensure!(
        pods.iter().any(|p| uid(p) == uid(second)),
        "the second pod still runs"
    );
    set_budget(admin, 3, 0).await?;
    let evictions_before = healer
        .metric(r#"spire_healer_k8s_requests_total{code="ok",verb="evict"}"#)
        .await?;
    write_cert(&file("web2"), &lab.spiffe_id("/web2"), true)?;
    let inc2 = healer.wait_incident("web2-svid").await?;
    let attempts = 3;
    let held = wait_until("three attempts held by the budget", LIMIT, || async {
        let held: Vec<ActionRecord> = healer
            .actions(&inc2.id)
            .await
            .into_iter()
            .filter(|a| a.outcome.as_deref() == Some("held"))
            .collect();
        (held.len() >= attempts).then_some(held)
    })
    .await?;
    // Read at once: the next attempt is a cooldown away.
    let blocked_calls = healer
        .metric(r#"spire_healer_k8s_requests_total{code="429",verb="evict"}"#)
        .await?;
    ensure!(
        blocked_calls == held.len() as f64,
        "one eviction call per attempt: {blocked_calls} calls, {} held attempts",
        held.len()
    );
    for a in &held {
        let d = a.detail.clone().unwrap_or_default();
        ensure!(d["held"] == "pdb_blocked", "{d}");
        ensure!(d["pod"]["uid"] == uid(second), "{d}");
        ensure!(a.rung == 0, "the same rung: {a:?}");
        // Mapping and eviction call together: milliseconds, not the minutes
        // of kube's default retries.
        let took = a.finished_at_ms.unwrap_or(i64::MAX) - a.started_at_ms;
        ensure!(took < 1_000, "held after {took} ms: {a:?}");
    }
    eprintln!(
        "pdb_blocked attempts (start ms, took ms): {:?}",
        held.iter()
            .map(|a| (
                a.started_at_ms,
                a.finished_at_ms.unwrap_or_default() - a.started_at_ms
            ))
            .collect::<Vec<_>>()
    );
    for w in held.windows(2) {
        let gap = w[1].started_at_ms - w[0].started_at_ms;
        ensure!(
            gap >= COOLDOWN.as_millis() as i64,
            "attempts {gap} ms apart, under the cooldown"
        );
    }
    let holds = healer
        .store
        .holds(&Query {
            incident_id: Some(inc2.id.clone()),
            limit: 500,
            ..Query::default()
        })
        .await?;
    ensure!(holds.iter().any(|h| h.reason == "pdb_blocked"), "{holds:?}");
    let open = healer.store.incident(&inc2.id).await?.context("incident")?;
    ensure!(
        open.closed_at_ms.is_none() && open.needs_operator.is_none(),
        "{open:?}"
    );
    ensure!(
        healer
            .metric(r#"spire_healer_k8s_requests_total{code="ok",verb="evict"}"#)
            .await?
            == evictions_before,
        "nothing was evicted while the budget allowed none"
    );
    // The budget allows one again: the next attempt (after the cooldown)
    // evicts, and the step is verified.
    set_budget(admin, 2, 1).await?;
    let done = healer.wait_outcome(&inc2.id, "ok").await?;
    let detail = done.detail.clone().unwrap_or_default();
    ensure!(detail["replaced"][0]["old_uid"] == uid(second), "{detail}");
    ensure!(done.rung == 0, "{done:?}");
    write_cert(&file("web2"), &lab.spiffe_id("/web2"), false)?;
    healer.wait_verified(&inc2.id, &done.id).await?;
    let all = healer.actions(&inc2.id).await;
    ensure!(
        all.iter()
            .all(|a| a.verification.as_deref() != Some("failed")),
        "no held attempt counts as a failed verification: {all:#?}"
    );
    Ok(healer)
}

/// Scenario 4: `k8s_rollout_restart` through a configured workload.
async fn rollout_restart(
    lab: &SpireLab,
    admin: &kube::Client,
    kubeconfig: &Path,
    dir: &Path,
) -> Result<()> {
    let cert = dir.join("web3.pem");
    let id = lab.spiffe_id("/web3");
    write_cert(&cert, &id, false)?;
    let policy = policy(dir, "restart-web")?;
    let text = config(
        lab,
        kubeconfig,
        &policy,
        &[("web3-svid", &cert)],
        &format!(
            "\n[[kubernetes.workloads]]\nname = \"web3-svid\"\nnamespace = \"{NS}\"\nselector = \"app=web\"\n\n[actuators.restart-web]\ntype = \"k8s_rollout_restart\"\npoll_interval = \"200ms\"\n"
        ),
    );
    let healer = Healer::start(dir, "rollout", &text).await?;
    plane_settled(admin).await?;
    let old: Vec<String> = running_pods(admin, NS).await?.iter().map(uid).collect();
    ensure!(old.len() == 3, "{old:?}");
    write_cert(&cert, &id, true)?;
    let inc = healer.wait_incident("web3-svid").await?;
    let done = healer.wait_outcome(&inc.id, "ok").await?;
    let detail = done.detail.clone().unwrap_or_default();
    ensure!(detail["mapping"]["via"] == "workload", "{detail}");
    let restarted = &detail["restarted"][0];
    ensure!(
        restarted["owner"] == format!("Deployment {NS}/web"),
        "{detail}"
    );
    let mut reported_old: Vec<String> = serde_json::from_value(restarted["old_uids"].clone())?;
    reported_old.sort();
    let mut want_old = old.clone();
    want_old.sort();
    ensure!(reported_old == want_old, "{detail}");
    let new: Vec<String> = serde_json::from_value(restarted["new_uids"].clone())?;
    ensure!(
        new.len() == 3 && new.iter().all(|u| !old.contains(u)),
        "{detail}"
    );
    // Every pod replaced, and the template says by which action.
    let now: Vec<String> = running_pods(admin, NS).await?.iter().map(uid).collect();
    ensure!(now.iter().all(|u| !old.contains(u)), "{old:?} -> {now:?}");
    let d = Api::<Deployment>::namespaced(admin.clone(), NS)
        .get("web")
        .await?;
    let annotations = d
        .spec
        .template
        .metadata
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    ensure!(
        annotations.get("spire-healer.io/action-id") == Some(&done.id)
            && annotations.contains_key("kubectl.kubernetes.io/restartedAt"),
        "{annotations:?}"
    );
    write_cert(&cert, &id, false)?;
    healer.wait_verified(&inc.id, &done.id).await?;
    Ok(())
}

/// Waits until `web` in `apps` has 3 Ready pods and no terminating one.
async fn plane_settled(admin: &kube::Client) -> Result<()> {
    wait_until("3 Ready pods of web", LIMIT, || async {
        let api: Api<Pod> = Api::namespaced(admin.clone(), NS);
        let pods = api
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?
            .items;
        let ready = pods
            .iter()
            .filter(|p| spire_healer::k8s::owner::ready(p))
            .count();
        (pods.len() == 3 && ready == 3).then_some(())
    })
    .await
}

/// Scenario 5, in process: `k8s_delete_pod` as the user, deletes with
/// stale preconditions, and the mapping's refusals.
async fn delete_and_refusals(
    lab: &SpireLab,
    admin: &kube::Client,
    kubeconfig: &Path,
) -> Result<()> {
    plane_settled(admin).await?;
    let metrics = Arc::new(Metrics::new());
    let kube = |max_pods| {
        Arc::new(Kube::new(
            KubernetesConfig {
                kubeconfig: Some(kubeconfig.to_path_buf()),
                namespaces: vec![NS.into()],
                request_timeout: Duration::from_secs(5),
                max_pods,
                ..KubernetesConfig::default()
            },
            metrics.clone(),
            Arc::new(spire_healer::clock::SystemClock),
        ))
    };
    let topo = Arc::new(Topology {
        servers: vec![("lab-server".into(), Some(lab.server_socket()), None)],
        ..Topology::default()
    });
    let k = kube(5);

    // A delete whose preconditions no longer hold is refused (409).
    let pods = running_pods(admin, NS).await?;
    let target = &pods[0];
    let stale = PodRef::of(target).context("pod ref")?;
    Api::<Pod>::namespaced(admin.clone(), NS)
        .patch(
            &stale.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "touched": "yes" } } })),
        )
        .await?;
    let err = k.delete_pod(&stale, None).await.unwrap_err();
    ensure!(err.status() == Some(409), "stale resourceVersion: {err}");
    let fresh = PodRef::of(
        &Api::<Pod>::namespaced(admin.clone(), NS)
            .get(&stale.name)
            .await?,
    )
    .context("pod ref")?;
    let wrong_uid = PodRef {
        uid: "00000000-0000-0000-0000-000000000000".into(),
        ..fresh.clone()
    };
    let err = k.delete_pod(&wrong_uid, None).await.unwrap_err();
    ensure!(err.status() == Some(409), "another UID: {err}");
    let still = Api::<Pod>::namespaced(admin.clone(), NS)
        .get(&stale.name)
        .await?;
    ensure!(uid(&still) == stale.uid && still.metadata.deletion_timestamp.is_none());
    // An eviction with stale preconditions too.
    let err = k.evict(&stale, None).await.unwrap_err();
    ensure!(err.status() == Some(409), "stale eviction: {err}");

    // k8s_delete_pod through the entry mapping: deleted, replaced.
    create_entry(
        lab,
        "/web4",
        &[
            format!("k8s:ns:{NS}"),
            format!("k8s:pod-name:{}", stale.name),
        ],
    )
    .await?;
    let delete = PodActuator::pods(
        Mode::Delete,
        &K8sPodConfig {
            grace_period: None,
            poll_interval: Duration::from_millis(200),
        },
        k.clone(),
        topo.clone(),
    );
    let mut step = Step {
        action_id: "act-delete".into(),
        incident_id: "inc".into(),
        symptom: SymptomKind::StaleCertFile,
        rung: 0,
        actuator: "delete-pod".into(),
        target: "web4-svid".into(),
        params: json!({ "subject": "cert_file:web4-svid", "evidence_spiffe_id": lab.spiffe_id("/web4") }),
        timeout: Duration::from_secs(60),
        verify_within: Duration::from_secs(10),
        dry_run: false,
    };
    delete.prepare(&mut step, &Observations::default());
    let started = Instant::now();
    let out = delete.execute(&step).await?;
    ensure!(out.kind == OutcomeKind::Ok, "{out:?}");
    let r = &out.detail["replaced"][0];
    ensure!(r["old_uid"] == stale.uid, "{}", out.detail);
    let new_uid = r["new_uid"].as_str().context("new uid")?;
    let now = running_pods(admin, NS).await?;
    ensure!(now.iter().all(|p| uid(p) != stale.uid), "deleted");
    ensure!(
        now.iter()
            .any(|p| uid(p) == new_uid && spire_healer::k8s::owner::ready(p)),
        "replaced by a Ready pod"
    );
    eprintln!(
        "k8s_delete_pod: deleted and replaced in {:?}",
        started.elapsed()
    );

    // Mapping refusals.
    create_entry(
        lab,
        "/all",
        &[format!("k8s:ns:{NS}"), "k8s:pod-label:app:web".into()],
    )
    .await?;
    create_entry(
        lab,
        "/ghost",
        &[format!("k8s:ns:{NS}"), "k8s:pod-name:nope".into()],
    )
    .await?;
    create_entry(lab, "/unix", &["unix:uid:1000".into()]).await?;
    let cases = [
        ("/all", 2, Refusal::TooManyPods),
        ("/ghost", 5, Refusal::NoPodsMatched),
        ("/unix", 5, Refusal::NoK8sSelectors),
        ("/other", 5, Refusal::NamespaceNotAllowed),
    ];
    for (path, max_pods, want) in cases {
        let id = lab.spiffe_id(path);
        let m = mapping::map(&kube(max_pods), &*topo, "nobody", Some(&id)).await?;
        match m.pods {
            Err(r) if r == want => {}
            other => bail!("{path}: {:?}, not {want:?}", other.map(|p| p.len())),
        }
    }
    let all = mapping::map(&kube(5), &*topo, "nobody", Some(&lab.spiffe_id("/all"))).await?;
    ensure!(
        all.pods.map(|p| p.len()).ok() == Some(3),
        "three pods within max_pods 5"
    );
    // Nothing outside the allow-list is sent.
    let err = k.list_pods(OTHER_NS, None).await.unwrap_err();
    ensure!(err.kind() == "namespace_not_allowed", "{err}");
    let text = metrics.render();
    ensure!(
        !text.contains(r#"code="403""#),
        "a call was forbidden:\n{text}"
    );
    Ok(())
}
