//! SPIRE servers on Kubernetes: `server_unhealthy` replaces the server's
//! pod (`k8s_evict`, mapped through a `[[kubernetes.workloads]]` entry
//! named like the server), on a real API server (`SPIRE_HEALER_K8S_BIN`;
//! skipped without it) with real spire-servers (the HA lab: two servers on
//! one PostgreSQL datastore).
//!
//! The StatefulSet `spire-server` of two kwok pods stands for servers A
//! and B (kwok plays their kubelet: the pods are Ready, nothing runs in
//! them); the real processes are the lab's. The test plays the kubelet
//! for A: once the replacement of `spire-server-0` is Ready, it starts the
//! real server A again, and the step verifies by A answering.
//!
//! 1. Both servers down when the healer (`role = "cluster"`) starts: both
//!    `server_unhealthy` incidents are held `no_server_reachable`; no
//!    eviction is sent, both pods keep their UIDs.
//! 2. Server A killed while B answers: the healer evicts `spire-server-0`
//!    (a new UID; one eviction in `spire_healer_k8s_requests_total`),
//!    `spire-server-1` is untouched, the step is verified and the incident
//!    closed.
//! 3. Agent 0 killed: its `agent_unreachable` ladder's `restart-agent`
//!    rung (`k8s_delete_pod`, the agent mapped to the `spire-agent`
//!    DaemonSet's pod on its node) deletes that pod; the test starts the
//!    real agent again once the replacement is Ready; the step verifies.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use nix::sys::signal::Signal;
use spire_healer::knowledge::{Query, Store};
use spire_healer::policy::DEFAULT_POLICY;
use tokio::time::{Instant, timeout};

use crate::daemon::{Daemon, wait_until};
use crate::spire_lab::{ControlPlane, HaLab, HaOptions, test_pg_url};

const NS: &str = "spire-system";
const USER: &str = "spire-healer";
const LIMIT: Duration = Duration::from_secs(120);
const EVICTED_OK: &str = r#"spire_healer_k8s_requests_total{code="ok",verb="evict"}"#;

/// The namespace, the healer's Role there (what the pod actuators need)
/// and the StatefulSet of the two servers' pods.
fn manifests() -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{ name: {NS} }}
---
{role}---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: spire-server, namespace: {NS} }}
spec:
  replicas: 2
  serviceName: spire-server
  podManagementPolicy: Parallel
  selector: {{ matchLabels: {{ app: spire-server }} }}
  template:
    metadata: {{ labels: {{ app: spire-server }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{ name: spire-server, image: registry.invalid/spire-server:1 }}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{ name: spire-agent, namespace: {NS} }}
spec:
  selector: {{ matchLabels: {{ app: spire-agent }} }}
  template:
    metadata: {{ labels: {{ app: spire-agent }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{ name: spire-agent, image: registry.invalid/spire-agent:1 }}]
"#,
        role = crate::k8s_fixtures::actuator_role(NS, USER),
    )
}

fn ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// UIDs of the Ready server pods by name (`spire-server-0`, `-1`).
async fn server_pods(admin: &kube::Client) -> Option<Vec<(String, String)>> {
    ready_pods(admin, "app=spire-server").await
}

/// (name, UID) of the Ready pods `labels` selects, by name.
async fn ready_pods(admin: &kube::Client, labels: &str) -> Option<Vec<(String, String)>> {
    let api: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let mut out: Vec<(String, String)> = api
        .list(&ListParams::default().labels(labels))
        .await
        .ok()?
        .items
        .iter()
        .filter(|p| ready(p))
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.metadata.uid.clone().unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    Some(out)
}

/// The default policy with `server_unhealthy` replacing the server's pod.
fn policy(dir: &Path) -> Result<std::path::PathBuf> {
    ensure!(
        !DEFAULT_POLICY.contains("ladders.server_unhealthy"),
        "the default policy now has a server_unhealthy ladder"
    );
    let text = format!(
        "{DEFAULT_POLICY}\n[[ladders.server_unhealthy]]\nactuator = \"evict-server\"\ntimeout = \"60s\"\nverify_within = \"90s\"\n"
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A `role = "cluster"` healer watching both servers, with each server's pod
/// as a workload of its name.
fn config(lab: &HaLab, plane: &ControlPlane, policy: &Path, db: &Path) -> String {
    let mut text = format!(
        r#"role = "cluster"
policy_file = "{policy}"
[supervisor]
tick_interval = "250ms"
[database]
url = "sqlite://{db}"
[http]
listen = "127.0.0.1:0"
[actuators.evict-server]
type = "k8s_evict"
poll_interval = "250ms"
[kubernetes]
kubeconfig = "{kubeconfig}"
namespaces = ["{NS}"]
request_timeout = "5s"
"#,
        policy = policy.display(),
        db = db.display(),
        kubeconfig = plane.user_kubeconfig(USER).display(),
    );
    for (i, s) in lab.servers().iter().enumerate() {
        text += &format!(
            "[[kubernetes.workloads]]\nname = \"{}\"\nnamespace = \"{NS}\"\nselector = \"statefulset.kubernetes.io/pod-name=spire-server-{i}\"\n",
            s.name()
        );
    }
    for s in lab.servers() {
        text += &format!(
            "[[servers]]\nname = \"{}\"\nadmin_socket = \"{}\"\naddress = \"{}\"\nhealth_url = \"{}\"\npoll_interval = \"1s\"\ntimeout = \"2s\"\n",
            s.name(),
            s.socket().display(),
            s.address(),
            s.health_url().trim_end_matches("/ready"),
        );
    }
    text
}

/// The healer of agent 0's pod: agent 0 (its Workload API), its
/// DaemonSet pod on the lab's node as a workload of its name, and
/// `restart-agent` (the default ladder's rung) deleting that pod.
fn agent_config(lab: &HaLab, plane: &ControlPlane, policy: &Path, db: &Path) -> String {
    let a = lab.agent(0);
    format!(
        r#"role = "cluster"
policy_file = "{policy}"
[supervisor]
tick_interval = "250ms"
[database]
url = "sqlite://{db}"
[http]
listen = "127.0.0.1:0"
[actuators.restart-agent]
type = "k8s_delete_pod"
poll_interval = "250ms"
[kubernetes]
kubeconfig = "{kubeconfig}"
namespaces = ["{NS}"]
request_timeout = "5s"
[[kubernetes.workloads]]
name = "{name}"
namespace = "{NS}"
selector = "app=spire-agent"
node = "{node}"
[[agents]]
name = "{name}"
address = "unix://{socket}"
poll_interval = "1s"
answer_timeout = "2s"
backoff_max = "2s"
"#,
        policy = policy.display(),
        db = db.display(),
        kubeconfig = plane.user_kubeconfig(USER).display(),
        name = a.name(),
        node = crate::spire_lab::k8s::FIRST_NODE,
        socket = a.workload_socket().display(),
    )
}

/// A running healer: its process, store and `/metrics` address.
struct Healer {
    daemon: Daemon,
    store: Arc<dyn Store>,
    metrics: std::net::SocketAddr,
}

impl Healer {
    async fn start(dir: &Path, name: &str, config: String) -> Result<Healer> {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let mut daemon = Daemon::spawn(&path)?;
        let line = match daemon
            .wait_line("Serving /metrics", Duration::from_secs(30))
            .await
        {
            Ok(line) => line,
            Err(e) => {
                let mut log = String::new();
                while let Ok(line) = daemon.wait_line("", Duration::from_millis(200)).await {
                    log.push_str(&line);
                    log.push('\n');
                }
                anyhow::bail!("{name} serves no /metrics: {e}; it said:\n{log}");
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let metrics = v["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no addr in {line}"))?;
        let url = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
        let store = wait_until("the healer's store", LIMIT, || async {
            spire_healer::knowledge::open_existing(&url).await.ok()
        })
        .await?;
        Ok(Healer {
            daemon,
            store,
            metrics,
        })
    }

    async fn metric(&self, series: &str) -> Result<f64> {
        let resp = spire_healer::http_client::get(
            &format!("http://{}/metrics", self.metrics),
            &spire_healer::http_client::Options::new(Duration::from_secs(5)),
        )
        .await?;
        let text = String::from_utf8(resp.body)?;
        Ok(spire_healer::telemetry::metrics::sample(&text, series).unwrap_or(0.0))
    }

    async fn stop(mut self) -> Result<()> {
        self.daemon.signal(Signal::SIGTERM)?;
        let status = self.daemon.wait_exit(Duration::from_secs(30)).await?;
        ensure!(status.success(), "the healer exited {status}");
        Ok(())
    }
}

fn all() -> Query {
    Query {
        limit: 500,
        ..Query::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_agent_pods_are_replaced_never_the_last_server() -> Result<()> {
    if ControlPlane::bin_dir_from_env().is_none() {
        eprintln!(
            "skipped: SPIRE_HEALER_K8S_BIN is not set (scripts/test.sh builds the control plane)"
        );
        return Ok(());
    }
    timeout(Duration::from_secs(420), scenario())
        .await
        .context("the scenario took longer than 420 s")?
}

async fn scenario() -> Result<()> {
    let begun = Instant::now();
    let dir = tempfile::Builder::new().prefix("k8s-servers").tempdir()?;
    let plane = ControlPlane::start(&dir.path().join("plane")).await?;
    plane.apply_yaml(&manifests()).await?;
    let admin = plane.admin_client().await;
    let pods = wait_until("two Ready server pods", LIMIT, || async {
        server_pods(&admin).await.filter(|p| p.len() == 2)
    })
    .await?;
    let lab = HaLab::start(HaOptions {
        postgres_url: test_pg_url(),
        ..HaOptions::default()
    })
    .await?;
    // The healer's identity from agent 0 (its Workload API stream is up
    // only while the agent issues it one).
    lab.register_entry(0, "/healer-0", nix::unistd::geteuid().as_raw(), 600)
        .await?;
    lab.wait_fetch_has(0, "/healer-0").await?;
    let setup = begun.elapsed();
    let files = dir.path().join("healer");
    std::fs::create_dir_all(&files)?;
    let policy = policy(&files)?;

    // --- 1. both servers down: held, nothing evicted ----------------------
    tokio::try_join!(lab.kill_server(0), lab.kill_server(1))?;
    let name = "both-down";
    let healer = Healer::start(
        &files,
        name,
        config(&lab, &plane, &policy, &files.join(format!("{name}.db"))),
    )
    .await?;
    let held_at = Instant::now();
    let holds = wait_until(
        "both server_unhealthy incidents held no_server_reachable",
        LIMIT,
        || async {
            let incidents = healer.store.incidents(&all()).await.ok()?;
            let holds = healer.store.holds(&all()).await.ok()?;
            let held: Vec<_> = incidents
                .iter()
                .filter(|i| i.symptom == "server_unhealthy")
                .filter(|i| {
                    holds
                        .iter()
                        .any(|h| h.incident_id == i.id && h.reason == "no_server_reachable")
                })
                .map(|i| i.subject.clone())
                .collect();
            (held.len() == 2).then_some(holds)
        },
    )
    .await?;
    let held_after = held_at.elapsed();
    ensure!(
        healer.metric(EVICTED_OK).await? == 0.0,
        "an eviction was sent with no server answering"
    );
    ensure!(
        healer.store.actions(&all()).await?.is_empty(),
        "an action ran with no server answering: {holds:#?}"
    );
    ensure!(
        server_pods(&admin).await.as_ref() == Some(&pods),
        "a server pod was replaced with no server answering"
    );
    healer.stop().await?;

    // --- 2. server A down, B answers: A's pod is evicted -------------------
    tokio::try_join!(lab.start_server(0), lab.start_server(1))?;
    let name = "a-down";
    let healer = Healer::start(
        &files,
        name,
        config(&lab, &plane, &policy, &files.join(format!("{name}.db"))),
    )
    .await?;
    wait_until("both servers up", LIMIT, || async {
        (healer.metric("spire_healer_servers_up").await.ok()? == 2.0).then_some(())
    })
    .await?;
    let killed = Instant::now();
    lab.kill_server(0).await?;
    let (old0, old1) = (pods[0].1.clone(), pods[1].1.clone());
    // The kubelet's part: the replacement Ready, server A runs again.
    let replaced = wait_until("spire-server-0 replaced and Ready", LIMIT, || async {
        let now = server_pods(&admin).await?;
        now.iter()
            .find(|(n, uid)| n == "spire-server-0" && *uid != old0)
            .map(|(_, uid)| (uid.clone(), now.clone()))
    })
    .await?;
    let replaced_after = killed.elapsed();
    lab.start_server(0).await?;
    let action = wait_until("the eviction verified", LIMIT, || async {
        healer
            .store
            .actions(&all())
            .await
            .ok()?
            .into_iter()
            .find(|a| a.verification.as_deref() == Some("verified"))
    })
    .await?;
    let verified_after = killed.elapsed();
    ensure!(
        action.actuator == "evict-server"
            && action.target == lab.server(0).name()
            && action.outcome.as_deref() == Some("ok"),
        "{action:#?}"
    );
    let incident = healer
        .store
        .incident(&action.incident_id)
        .await?
        .context("the action's incident")?;
    ensure!(
        incident.symptom == "server_unhealthy" && incident.closed_at_ms.is_some(),
        "{incident:#?}"
    );
    ensure!(
        replaced
            .1
            .iter()
            .any(|(n, uid)| n == "spire-server-1" && *uid == old1),
        "spire-server-1 was touched: {:?}",
        replaced.1
    );
    ensure!(
        healer.metric(EVICTED_OK).await? == 1.0,
        "not exactly one eviction"
    );
    let actions = healer.store.actions(&all()).await?;
    ensure!(actions.len() == 1, "{actions:#?}");
    healer.stop().await?;

    // --- 3. agent 0 dies: its DaemonSet pod on its node is replaced --------
    let agent_pods = wait_until("one Ready agent pod", LIMIT, || async {
        ready_pods(&admin, "app=spire-agent")
            .await
            .filter(|p| p.len() == 1)
    })
    .await?;
    let name = "agent-down";
    let healer = Healer::start(
        &files,
        name,
        agent_config(&lab, &plane, &policy, &files.join(format!("{name}.db"))),
    )
    .await?;
    let stream = format!(
        "spire_healer_workload_api_stream_up{{agent=\"{}\"}}",
        lab.agent(0).name()
    );
    wait_until("agent 0 watched", LIMIT, || async {
        (healer.metric(&stream).await.ok()? == 1.0).then_some(())
    })
    .await?;
    let agent_killed = Instant::now();
    lab.kill_agent(0).await?;
    let old_agent = agent_pods[0].1.clone();
    let new_agent = wait_until("the agent pod replaced and Ready", LIMIT, || async {
        ready_pods(&admin, "app=spire-agent")
            .await?
            .into_iter()
            .find(|(_, uid)| *uid != old_agent)
            .map(|(_, uid)| uid)
    })
    .await?;
    let agent_replaced_after = agent_killed.elapsed();
    lab.start_agent(0).await?;
    let agent_action = wait_until("the pod delete verified", LIMIT, || async {
        healer
            .store
            .actions(&all())
            .await
            .ok()?
            .into_iter()
            .find(|a| a.actuator == "restart-agent" && a.verification.is_some())
    })
    .await?;
    let agent_verified_after = agent_killed.elapsed();
    ensure!(
        agent_action.target == lab.agent(0).name()
            && agent_action.outcome.as_deref() == Some("ok")
            && agent_action.verification.as_deref() == Some("verified"),
        "{agent_action:#?}"
    );
    ensure!(
        healer
            .metric(r#"spire_healer_k8s_requests_total{code="ok",verb="delete"}"#)
            .await?
            == 1.0,
        "not exactly one pod delete"
    );
    println!(
        "k8s servers: setup {:.1}s; both down: held no_server_reachable {:.1}s after the healer \
         started, nothing evicted; server A killed: spire-server-0 replaced (uid {} -> {}) and \
         Ready {:.1}s after the kill, the step verified {:.1}s after it; agent 0 killed: its pod \
         replaced ({} -> {}) {:.1}s after, verified {:.1}s after; whole scenario {:.1}s",
        setup.as_secs_f64(),
        held_after.as_secs_f64(),
        old0,
        replaced.0,
        replaced_after.as_secs_f64(),
        verified_after.as_secs_f64(),
        old_agent,
        new_agent,
        agent_replaced_after.as_secs_f64(),
        agent_verified_after.as_secs_f64(),
        begun.elapsed().as_secs_f64(),
    );
    healer.stop().await?;
    lab.stop().await?;
    drop(plane);
    Ok(())
}
