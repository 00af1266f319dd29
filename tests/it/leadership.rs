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

use anyhow::{Context, Result, ensure};
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
