//! Two cluster instances (the real binary) on one PostgreSQL database,
//! active/standby by the advisory-lock backend, and again by a Lease on a
//! real Kubernetes API server (`SPIRE_HEALER_K8S_BIN`):
//! - the leader is killed with SIGKILL in the middle of a ladder; the
//!   standby takes over within the lease and the ladder continues where it
//!   stopped: every rung ran exactly once (the steps' own log and the
//!   actions table agree), the first under epoch 1, the rest under 2;
//! - a leader paused with SIGSTOP loses its session to the database's
//!   `idle_session_timeout`; the standby takes over and acts; woken with
//!   SIGCONT, the former leader acts on nothing (fenced) and exits 69.
//!
//! The agent is simulated (in this process) so the test can make it
//! unreachable at will; the ladder's steps are commands that append
//! `<rung> <pid of the healer that ran it>` to a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use spire_healer::knowledge::{self, Query, Store};
use spire_healer::simulated::agent::FakeAgent;
use tokio::time::timeout;

use crate::daemon::{Daemon, wait_until};
use crate::spire_lab::test_pg_url;

const AGENT: &str = "fleet-agent";
use spire_healer::policy::DEFAULT_POLICY;

/// The default policy with the agent_unreachable ladder replaced by three
/// recording commands (`step-a` runs 4 s: long enough to kill its healer
/// while it runs).
fn policy(dir: &Path) -> Result<PathBuf> {
    let old = "[[ladders.agent_unreachable]]\nactuator = \"refetch\"\ntimeout = \"5s\"\nverify_within = \"3s\"\n\n[[ladders.agent_unreachable]]\nactuator = \"restart-agent\"\ntimeout = \"30s\"\nverify_within = \"20s\"\n";
    ensure!(DEFAULT_POLICY.contains(old), "the default policy changed");
    let new = "[[ladders.agent_unreachable]]\nactuator = \"step-a\"\ntimeout = \"10s\"\nverify_within = \"1s\"\n\n\
               [[ladders.agent_unreachable]]\nactuator = \"step-b\"\ntimeout = \"10s\"\nverify_within = \"1s\"\n\n\
               [[ladders.agent_unreachable]]\nactuator = \"step-c\"\ntimeout = \"10s\"\nverify_within = \"10s\"\n";
    let path = dir.join("policy.toml");
    std::fs::write(&path, DEFAULT_POLICY.replace(old, new))?;
    Ok(path)
}

/// How the two instances elect their leader.
enum Elect {
    /// The advisory lock.
    Postgres,
    /// A Lease in `spire-system`, through this kubeconfig (a user whose
    /// Role grants leases there and nothing else).
    Lease(PathBuf),
}

struct Setup {
    _db: spire_lab::ScratchDatabase,
    /// `KUBECONFIG` for the instances (the Lease backend).
    kubeconfig: Option<PathBuf>,
    dir: tempfile::TempDir,
    agent: Arc<FakeAgent>,
    store: Arc<dyn Store>,
    steps: PathBuf,
}

impl Setup {
    async fn new(lease: &str, renew: &str, elect: Elect) -> Result<Setup> {
        let db = spire_lab::ScratchDatabase::create(&test_pg_url()).await?;
        let dir = tempfile::Builder::new().prefix("healer-lead").tempdir()?;
        let agent = crate::helpers::simulated_agent(dir.path(), "lead.healer")?;
        let steps = dir.path().join("steps.log");
        let policy = policy(dir.path())?;
        let store = knowledge::open(&db.url()).await?;
        for n in 0..2 {
            let step = |rung: &str, extra: &str| {
                format!(
                    "[actuators.step-{rung}]\ntype = \"command\"\nargv = [\"sh\", \"-c\", \"echo {rung} $PPID >> {log}{extra}\"]\ntimeout = \"10s\"\n",
                    log = steps.display()
                )
            };
            std::fs::write(
                dir.path().join(format!("healer-{n}.toml")),
                format!(
                    r#"role = "cluster"
policy_file = "{policy}"
[supervisor]
tick_interval = "250ms"
[database]
url = "{url}"
[leadership]
name = "fleet"
{backend}
lease_duration = "{lease}"
renew_every = "{renew}"
retry_every = "250ms"
[http]
listen = "127.0.0.1:0"
[[agents]]
name = "{AGENT}"
address = "unix://{sock}"
answer_timeout = "1s"
backoff_max = "1s"
{a}{b}{c}"#,
                    policy = policy.display(),
                    url = db.url(),
                    backend = match &elect {
                        Elect::Postgres => "backend = \"postgres\"",
                        Elect::Lease(_) => "backend = \"lease\"\nnamespace = \"spire-system\"",
                    },
                    sock = agent.socket().display(),
                    a = step("a", "; sleep 4"),
                    b = step("b", ""),
                    c = step("c", ""),
                ),
            )?;
        }
        Ok(Setup {
            _db: db,
            kubeconfig: match elect {
                Elect::Postgres => None,
                Elect::Lease(k) => Some(k),
            },
            dir,
            agent,
            store,
            steps,
        })
    }

    fn config(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("healer-{n}.toml"))
    }

    /// `(rung, pid)` per line of the steps' log.
    fn ran(&self) -> Vec<(String, u32)> {
        std::fs::read_to_string(&self.steps)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (rung, pid) = l.split_once(' ')?;
                Some((rung.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    async fn wait_ran(&self, rung: &str, limit: Duration) -> Result<u32> {
        wait_until(&format!("step {rung} to run"), limit, || async {
            self.ran()
                .into_iter()
                .find(|(r, _)| r == rung)
                .map(|(_, pid)| pid)
        })
        .await
    }

    /// `(rung, actuator, epoch)` of every action, oldest first.
    async fn actions(&self) -> Result<Vec<(i64, String, Option<i64>)>> {
        let mut rows: Vec<(i64, String, Option<i64>, i64)> = sqlx::query_as(
            "SELECT rung::bigint, actuator, epoch, started_at_ms FROM actions ORDER BY started_at_ms",
        )
        .fetch_all(&sqlx::PgPool::connect(&self._db.url()).await?)
        .await?;
        rows.sort_by_key(|r| r.3);
        Ok(rows.into_iter().map(|(r, a, e, _)| (r, a, e)).collect())
    }
}

/// Starts instance `n` and waits until it leads or stands by.
async fn spawn(setup: &Setup, n: usize, expect: &str) -> Result<Daemon> {
    let env: Vec<(&str, &Path)> = setup
        .kubeconfig
        .as_deref()
        .map(|k| ("KUBECONFIG", k))
        .into_iter()
        .collect();
    let mut d = Daemon::spawn_with_env(&setup.config(n), &env)?;
    d.wait_line(expect, Duration::from_secs(30))
        .await
        .with_context(|| format!("instance {n}"))?;
    Ok(d)
}

fn pid(d: &Daemon) -> Result<u32> {
    d.child.id().context("already reaped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leaders_ladder_continues_on_the_standby_and_no_step_runs_twice() -> Result<()> {
    timeout(
        Duration::from_secs(150),
        killed_leader(Elect::Postgres, "15s"),
    )
    .await
    .context("the scenario took longer than 150 s")?
}

/// A plane with the `spire-system` namespace and a Role granting the
/// `spire-healer` user leases there (get, create, update) and nothing
/// else; `None` (skipped) without `SPIRE_HEALER_K8S_BIN`.
async fn lease_plane(dir: &Path) -> Result<Option<(spire_lab::ControlPlane, PathBuf)>> {
    if spire_lab::ControlPlane::bin_dir_from_env().is_none() {
        eprintln!(
            "skipped: SPIRE_HEALER_K8S_BIN is not set (scripts/test.sh builds the control plane)"
        );
        return Ok(None);
    }
    let plane = spire_lab::ControlPlane::start(dir).await?;
    plane
        .apply_yaml(
            r#"apiVersion: v1
kind: Namespace
metadata: {name: spire-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: spire-healer-leader, namespace: spire-system}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: spire-healer-leader, namespace: spire-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: spire-healer-leader}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: spire-healer}
"#,
        )
        .await?;
    let kubeconfig = plane.user_kubeconfig("spire-healer");
    Ok(Some((plane, kubeconfig)))
}

/// The Lease's `leaseTransitions` and holder.
async fn lease_state(plane: &spire_lab::ControlPlane) -> Result<(i32, String)> {
    use k8s_openapi::api::coordination::v1::Lease;
    let api: kube::Api<Lease> = kube::Api::namespaced(plane.admin_client().await, "spire-system");
    let spec = api.get("fleet").await?.spec.unwrap_or_default();
    Ok((
        spec.lease_transitions.unwrap_or(0),
        spec.holder_identity.unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_lease_a_killed_leaders_ladder_continues_on_the_standby() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("k8s-lease").tempdir()?;
    let Some((plane, kubeconfig)) = lease_plane(dir.path()).await? else {
        return Ok(());
    };
    timeout(
        Duration::from_secs(150),
        killed_leader(Elect::Lease(kubeconfig), "4s"),
    )
    .await
    .context("the scenario took longer than 150 s")??;
    // One handover, as the API server recorded it.
    let (transitions, holder) = lease_state(&plane).await?;
    ensure!(
        transitions == 1,
        "leaseTransitions {transitions}, holder {holder:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_lease_a_paused_former_leader_acts_on_nothing() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("k8s-lease").tempdir()?;
    let Some((_plane, kubeconfig)) = lease_plane(dir.path()).await? else {
        return Ok(());
    };
    timeout(
        Duration::from_secs(150),
        paused_leader(Elect::Lease(kubeconfig)),
    )
    .await
    .context("the scenario took longer than 150 s")?
}

async fn killed_leader(elect: Elect, lease: &str) -> Result<()> {
    let lease_for = humantime::parse_duration(lease)?;
    let setup = Setup::new(lease, "1s", elect).await?;
    let mut a = spawn(&setup, 0, "Leading").await?;
    let mut b = spawn(&setup, 1, "Standing by").await?;
    let a_pid = pid(&a)?;
    // The agent goes away: the leader opens an incident and starts step a.
    setup.agent.stop();
    let ran_a = setup.wait_ran("a", Duration::from_secs(30)).await?;
    ensure!(
        ran_a == a_pid,
        "step a ran under pid {ran_a}, not the leader {a_pid}"
    );
    // Killed while step a runs.
    a.signal(Signal::SIGKILL)?;
    let killed_at = tokio::time::Instant::now();
    a.wait_exit(Duration::from_secs(10)).await?;
    b.wait_line("Leading", Duration::from_secs(20)).await?;
    let takeover = killed_at.elapsed();
    // Within the lease (plus a retry and the standby's start).
    ensure!(
        takeover < lease_for + Duration::from_secs(3),
        "the standby took over after {takeover:?}, more than the {lease} lease"
    );
    let b_pid = pid(&b)?;
    // The standby continues the ladder: b, then c; the agent comes back
    // once c ran, and the incident closes.
    setup.wait_ran("c", Duration::from_secs(60)).await?;
    setup.agent.restart()?;
    let store = &setup.store;
    wait_until("the incident closed", Duration::from_secs(30), || async {
        let q = Query {
            limit: 100,
            ..Query::default()
        };
        let incidents = store.incidents(&q).await.ok()?;
        (!incidents.is_empty() && incidents.iter().all(|i| i.closed_at_ms.is_some())).then_some(())
    })
    .await?;
    // Exactly once each, a by the first leader, b and c by the second.
    let ran = setup.ran();
    ensure!(
        ran == vec![
            ("a".to_string(), a_pid),
            ("b".to_string(), b_pid),
            ("c".to_string(), b_pid)
        ],
        "steps ran {ran:?} (first leader {a_pid}, second {b_pid})"
    );
    let actions = setup.actions().await?;
    ensure!(
        actions
            == vec![
                (0, "step-a".to_string(), Some(1)),
                (1, "step-b".to_string(), Some(2)),
                (2, "step-c".to_string(), Some(2))
            ],
        "actions table: {actions:?}"
    );
    let row = store
        .leadership("fleet")
        .await?
        .context("no leadership row")?;
    ensure!(row.epoch == 2, "{row:?}");
    b.signal(Signal::SIGTERM)?;
    let status = b.wait_exit(Duration::from_secs(30)).await?;
    ensure!(status.success(), "the leader exited {status} on SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_former_leader_that_wakes_up_acts_on_nothing() -> Result<()> {
    timeout(Duration::from_secs(150), paused_leader(Elect::Postgres))
        .await
        .context("the scenario took longer than 150 s")?
}

async fn paused_leader(elect: Elect) -> Result<()> {
    let setup = Setup::new("3s", "1s", elect).await?;
    let mut a = spawn(&setup, 0, "Leading").await?;
    let mut b = spawn(&setup, 1, "Standing by").await?;
    let a_pid = pid(&a)?;
    // Paused: the database ends its idle session after the 3 s lease and
    // the standby takes over.
    a.signal(Signal::SIGSTOP)?;
    b.wait_line("Leading", Duration::from_secs(30)).await?;
    let b_pid = pid(&b)?;
    // The new leader heals a failure on its own.
    setup.agent.stop();
    let ran = setup.wait_ran("a", Duration::from_secs(30)).await?;
    ensure!(
        ran == b_pid,
        "step a ran under {ran}, not the new leader {b_pid}"
    );
    // The former leader wakes up with the agent still down and its
    // memory of leading: it records nothing, starts nothing, and exits.
    a.signal(Signal::SIGCONT)?;
    let status = a.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        status.code() == Some(69),
        "the former leader exited {status}, not 69 (leadership lost)"
    );
    setup.wait_ran("c", Duration::from_secs(60)).await?;
    setup.agent.restart()?;
    let ran = setup.ran();
    ensure!(
        ran.iter().all(|(_, pid)| *pid == b_pid),
        "steps ran {ran:?}: the former leader {a_pid} acted"
    );
    let actions = setup.actions().await?;
    ensure!(
        actions.iter().all(|(_, _, e)| *e == Some(2)),
        "actions table: {actions:?}"
    );
    b.signal(Signal::SIGTERM)?;
    b.wait_exit(Duration::from_secs(30)).await?;
    Ok(())
}

/// Issue 12 c on Kubernetes actuators: the API server's own record of the
/// ladder's steps. The namespace `apps` (the healer user's Role there is
/// `k8s_fixtures::actuator_role`) and a Deployment `web` of 3 under a
/// budget allowing one disruption.
const APPS_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: apps }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: apps }
spec:
  replicas: 3
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{ name: app, image: registry.invalid/web:1 }]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: { name: web, namespace: apps }
spec:
  minAvailable: 2
  selector: { matchLabels: { app: web } }
"#;

/// The default policy with a 3 s cooldown and `stale_cert_file` handled by
/// `evict-web` (k8s_evict), then `restart-web` (k8s_rollout_restart).
fn k8s_policy(dir: &Path) -> Result<PathBuf> {
    let ladder = "[[ladders.stale_cert_file]]\nactuator = \"reload-helper\"\ntimeout = \"10s\"\nverify_within = \"20s\"\n\n[[ladders.stale_cert_file]]\nactuator = \"restart-helper\"\ntimeout = \"30s\"\nverify_within = \"30s\"\n";
    ensure!(
        DEFAULT_POLICY.contains(ladder) && DEFAULT_POLICY.contains("cooldown = \"20s\""),
        "the default policy changed"
    );
    let new = "[[ladders.stale_cert_file]]\nactuator = \"evict-web\"\ntimeout = \"60s\"\nverify_within = \"8s\"\n\n\
               [[ladders.stale_cert_file]]\nactuator = \"restart-web\"\ntimeout = \"60s\"\nverify_within = \"30s\"\n";
    let path = dir.join("policy-k8s.toml");
    std::fs::write(
        &path,
        DEFAULT_POLICY
            .replace(ladder, new)
            .replace("cooldown = \"20s\"", "cooldown = \"3s\""),
    )?;
    Ok(path)
}

/// The running (not terminating) pods of `web` in `apps`: `(uid, name)`.
async fn web_pods(admin: &kube::Client) -> Result<Vec<(String, String)>> {
    use k8s_openapi::api::core::v1::Pod;
    let api: kube::Api<Pod> = kube::Api::namespaced(admin.clone(), "apps");
    Ok(api
        .list(&kube::api::ListParams::default().labels("app=web"))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            (
                p.metadata.uid.unwrap_or_default(),
                p.metadata.name.unwrap_or_default(),
            )
        })
        .collect())
}

/// Labels pod `name` of `web` `victim=yes`: the configured workload's
/// selector (`app=web,victim=yes`) then maps to that one pod.
async fn mark_victim(admin: &kube::Client, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let api: kube::Api<Pod> = kube::Api::namespaced(admin.clone(), "apps");
    let patch = serde_json::json!({ "metadata": { "labels": { "victim": "yes" } } });
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_lease_a_killed_leaders_eviction_is_not_repeated_by_the_standby() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("k8s-lease").tempdir()?;
    let Some((plane, kubeconfig)) = lease_plane(&dir.path().join("plane")).await? else {
        return Ok(());
    };
    let result = timeout(
        Duration::from_secs(240),
        killed_leader_k8s(&plane, &kubeconfig, dir.path()),
    )
    .await
    .context("the scenario took longer than 240 s")
    .and_then(|r| r);
    if result.is_err() {
        for (name, log) in plane.logs() {
            eprintln!("--- {name}:\n{}", spire_lab::log_tail(log));
        }
    }
    result
}

async fn killed_leader_k8s(
    plane: &spire_lab::ControlPlane,
    kubeconfig: &Path,
    dir: &Path,
) -> Result<()> {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    let started = tokio::time::Instant::now();
    plane.apply_yaml(APPS_MANIFESTS).await?;
    plane
        .apply_yaml(&crate::k8s_fixtures::actuator_role("apps", "spire-healer"))
        .await?;
    plane
        .wait_deployment_ready("apps", "web", 3, Duration::from_secs(60))
        .await?;
    let admin = plane.admin_client().await;
    let first = web_pods(&admin).await?;
    ensure!(first.len() == 3, "{first:?}");
    mark_victim(&admin, &first[0].1).await?;
    // The API server's record: every pod UID `web` ever ran, polled until
    // the end (a replacement lives until the rollout replaces it, seconds
    // later; the rollout's pods stay).
    let seen: Arc<Mutex<BTreeSet<String>>> =
        Arc::new(Mutex::new(first.iter().map(|p| p.0.clone()).collect()));
    let recorder = {
        let (admin, seen) = (admin.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(pods) = web_pods(&admin).await {
                    seen.lock().unwrap().extend(pods.into_iter().map(|p| p.0));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let _stop = scopeguard_abort(recorder);

    let db = spire_lab::ScratchDatabase::create(&test_pg_url()).await?;
    let store = knowledge::open(&db.url()).await?;
    let policy = k8s_policy(dir)?;
    let cert = dir.join("web.pem");
    let id = "spiffe://healer.test/web";
    crate::k8s_fixtures::write_cert(&cert, id, false)?;
    let mut configs = Vec::new();
    for n in 0..2 {
        let path = dir.join(format!("healer-k8s-{n}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"role = "cluster"
policy_file = "{policy}"
[supervisor]
tick_interval = "250ms"
[database]
url = "{url}"
[leadership]
name = "fleet"
backend = "lease"
namespace = "spire-system"
lease_duration = "4s"
renew_every = "1s"
retry_every = "250ms"
[http]
listen = "127.0.0.1:0"
[[cert_files]]
name = "web-svid"
cert_path = "{cert}"
poll_interval = "250ms"
[kubernetes]
kubeconfig = "{kubeconfig}"
namespaces = ["apps"]
request_timeout = "5s"
[[kubernetes.workloads]]
name = "web-svid"
namespace = "apps"
selector = "app=web,victim=yes"
[actuators.evict-web]
type = "k8s_evict"
poll_interval = "200ms"
[actuators.restart-web]
type = "k8s_rollout_restart"
poll_interval = "200ms"
"#,
                policy = policy.display(),
                url = db.url(),
                cert = cert.display(),
                kubeconfig = kubeconfig.display(),
            ),
        )?;
        configs.push(path);
    }
    let env = [("KUBECONFIG", kubeconfig)];
    let mut a = Daemon::spawn_with_env(&configs[0], &env)?;
    a.wait_line("Leading", Duration::from_secs(30))
        .await
        .context("instance 0")?;
    let mut b = Daemon::spawn_with_env(&configs[1], &env)?;
    b.wait_line("Standing by", Duration::from_secs(30))
        .await
        .context("instance 1")?;
    let up = started.elapsed();

    // The certificate expires: the leader evicts the one mapped pod.
    crate::k8s_fixtures::write_cert(&cert, id, true)?;
    let limit = Duration::from_secs(90);
    let incident = wait_until("the stale_cert_file incident", limit, || async {
        store
            .incidents(&Query {
                limit: 100,
                ..Query::default()
            })
            .await
            .ok()?
            .into_iter()
            .find(|i| i.subject == "cert_file:web-svid")
    })
    .await?;
    let actions = |store: Arc<dyn Store>, id: String| async move {
        let mut a = store
            .actions(&Query {
                incident_id: Some(id),
                limit: 100,
                ..Query::default()
            })
            .await
            .unwrap_or_default();
        a.sort_by_key(|a| a.started_at_ms);
        a
    };
    let evicted = wait_until("the eviction done", limit, || async {
        actions(store.clone(), incident.id.clone())
            .await
            .into_iter()
            .find(|a| a.rung == 0 && a.outcome.as_deref() == Some("ok"))
    })
    .await?;
    let seen_ok = tokio::time::Instant::now();
    let detail = evicted.detail.clone().unwrap_or_default();
    ensure!(detail["replaced"][0]["old_uid"] == first[0].0, "{detail}");
    ensure!(
        detail["replaced"].as_array().map(Vec::len) == Some(1),
        "{detail}"
    );
    // The rollout (rung 1) maps through a pod still labelled.
    let now = web_pods(&admin).await?;
    let survivor = now
        .iter()
        .find(|p| first[1..].iter().any(|f| f.0 == p.0))
        .context("no first pod left")?;
    mark_victim(&admin, &survivor.1).await?;
    // Killed while rung 0 is being verified (8 s).
    a.signal(Signal::SIGKILL)?;
    let killed_at = tokio::time::Instant::now();
    let since_ok = killed_at - seen_ok;
    a.wait_exit(Duration::from_secs(10)).await?;
    b.wait_line("Leading", Duration::from_secs(20)).await?;
    let takeover = killed_at.elapsed();
    ensure!(
        takeover < Duration::from_secs(4 + 3),
        "the standby took over after {takeover:?}, more than the 4 s lease"
    );
    // The standby resumes rung 0's verification: the certificate is
    // still expired, so it fails (and the incident stays open) ...
    let judged = wait_until("rung 0 judged by the standby", limit, || async {
        store
            .actions(&Query {
                incident_id: Some(incident.id.clone()),
                limit: 100,
                ..Query::default()
            })
            .await
            .ok()?
            .into_iter()
            .find(|a| a.id == evicted.id && a.verification.is_some())
    })
    .await?;
    ensure!(
        judged.verification.as_deref() == Some("failed"),
        "the standby judged the eviction {:?} while the certificate is still expired \
         (before its certificate sensor's first reading?): {judged:?}",
        judged.verification
    );
    // ... and goes on: the rollout.
    let restarted = match wait_until("the rollout done", limit, || async {
        actions(store.clone(), incident.id.clone())
            .await
            .into_iter()
            .find(|a| a.rung == 1 && a.outcome.is_some())
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let all = actions(store.clone(), incident.id.clone()).await;
            let holds = store
                .holds(&Query {
                    incident_id: Some(incident.id.clone()),
                    limit: 100,
                    ..Query::default()
                })
                .await;
            bail!(
                "{e}: actions {all:#?}, holds {holds:?}, the standby said:\n{}",
                b.take_lines().join("\n")
            );
        }
    };
    ensure!(restarted.outcome.as_deref() == Some("ok"), "{restarted:?}");
    let rolled = tokio::time::Instant::now();
    crate::k8s_fixtures::write_cert(&cert, id, false)?;
    wait_until("the incident closed", limit, || async {
        store
            .incident(&incident.id)
            .await
            .ok()??
            .closed_at_ms
            .map(|_| ())
    })
    .await?;
    // Exactly once each: the table ...
    let mut rows: Vec<(i64, String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT rung::bigint, actuator, epoch, started_at_ms FROM actions ORDER BY started_at_ms",
    )
    .fetch_all(&sqlx::PgPool::connect(&db.url()).await?)
    .await?;
    rows.sort_by_key(|r| r.3);
    let rows: Vec<(i64, String, Option<i64>)> =
        rows.into_iter().map(|(r, a, e, _)| (r, a, e)).collect();
    ensure!(
        rows == vec![
            (0, "evict-web".to_string(), Some(1)),
            (1, "restart-web".to_string(), Some(2))
        ],
        "actions table: {rows:?}"
    );
    // ... and the API server: 3 first pods, 1 replacement of the evicted
    // one, 3 from the rollout; none of the pods before it runs.
    let last = web_pods(&admin).await?;
    let seen = seen.lock().unwrap().clone();
    let before_rollout: BTreeSet<String> = now.iter().map(|p| p.0.clone()).collect();
    ensure!(
        last.len() == 3 && last.iter().all(|p| !before_rollout.contains(&p.0)),
        "after the rollout {last:?}, before it {before_rollout:?}"
    );
    ensure!(
        seen.len() == 3 + 1 + 3,
        "web ran {} pods, not 7 (3, one eviction, a rollout of 3): {seen:?}",
        seen.len()
    );
    let (transitions, holder) = lease_state(plane).await?;
    ensure!(
        transitions == 1,
        "leaseTransitions {transitions}, holder {holder:?}"
    );
    eprintln!(
        "timings: workload and both instances up {up:?}; killed {since_ok:?} after the eviction was seen done; \
         takeover {takeover:?}; rollout done {:?} after the kill; closed {:?} after it; total {:?}",
        rolled - killed_at,
        rolled.elapsed(),
        started.elapsed()
    );
    b.signal(Signal::SIGTERM)?;
    let status = b.wait_exit(Duration::from_secs(30)).await?;
    ensure!(status.success(), "the leader exited {status} on SIGTERM");
    Ok(())
}

/// Aborts `task` when dropped.
fn scopeguard_abort(task: tokio::task::JoinHandle<()>) -> impl Drop {
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    Abort(task)
}
