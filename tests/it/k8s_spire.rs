//! Real SPIRE attested by `k8s_psat` against a real Kubernetes API server
//! (`SPIRE_HEALER_K8S_BIN`; skipped without it), healed by node and
//! cluster instances of spire-healer side by side on one PostgreSQL.
//!
//! - The control plane of the lab ([`ControlPlane`]); for each agent a kwok
//!   node, a pod of ServiceAccount `spire-system/spire-agent` on it and a
//!   token for that ServiceAccount from TokenRequest (audience
//!   `spire-server`, bound to the pod) ([`K8sPsat`]).
//! - The HA lab: two spire-servers sharing one PostgreSQL datastore, each
//!   with the `k8s_psat` node attestor calling the API server as
//!   `spire-system/spire-server`, whose RBAC is exactly tokenreviews
//!   create, nodes get and pods get in `spire-system` (checked with
//!   `kubectl auth can-i`); agent-0 on server A, agent-1 on server B.
//! - spire-healer, the real binary, three times on one PostgreSQL database:
//!   one `role = "node"` instance per agent (that agent only, the
//!   `restart-agent` command) and one `role = "cluster"` instance (both
//!   servers, both agents, `failover`), leading by the advisory lock.
//!
//! Server A is killed: agent-0's sync goes stale. The cluster instance
//! fails agent-0 over to B under epoch 1, and agent-0 serves SVIDs again
//! under the same k8s_psat ID; the node instance of agent-0 records the
//! same symptom in the same database and leaves it to the cluster
//! instance; nobody else acts on any agent.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use spire_healer::clock::{Clock, SystemClock, unix_millis};
use spire_healer::knowledge::{self, Query};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, timeout};

use crate::daemon::{Daemon, wait_until};
use crate::spire_lab::{
    ControlPlane, HaLab, HaOptions, K8sPsat, NodeAttestation, ScratchDatabase, test_pg_url,
};

/// The `k8s_psat` cluster name.
const CLUSTER: &str = "kwok-lab";
/// X.509-SVID TTL of the test entries (seconds).
const SVID_TTL: u32 = 600;

fn now_ms() -> i64 {
    unix_millis(SystemClock.now())
}

fn secs(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms) as f64 / 1000.0
}

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_psat_agents_fail_over_with_node_and_cluster_instances_on_one_database() -> Result<()> {
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
    let dir = tempfile::Builder::new().prefix("k8s-spire").tempdir()?;
    let plane = ControlPlane::start(&dir.path().join("plane")).await?;
    let plane_up = begun.elapsed();

    // --- SPIRE on k8s_psat ------------------------------------------------
    let psat = K8sPsat::provision(&plane, CLUSTER, 2, &dir.path().join("psat")).await?;
    check_server_rbac(&plane).await?;
    let lab = HaLab::start(HaOptions {
        postgres_url: test_pg_url(),
        node_attestation: NodeAttestation::K8sPsat(psat.clone()),
        ..HaOptions::default()
    })
    .await?;
    let spire_up = begun.elapsed();
    check_attested(&lab, &psat).await?;
    // Workload entries under each agent's node alias (selected by its
    // k8s_psat cluster and node UID), and one parented to agent-0's own
    // k8s_psat ID.
    let direct = lab.spiffe_id("/direct-0");
    let agent0_id = lab.agent(0).spiffe_id();
    lab.server_cli(
        1,
        &[
            "entry",
            "create",
            "-parentID",
            &agent0_id,
            "-spiffeID",
            &direct,
            "-selector",
            &format!("unix:uid:{}", uid()),
            "-x509SVIDTTL",
            &SVID_TTL.to_string(),
        ],
    )
    .await?;
    for j in 0..2 {
        lab.register_entry(j, &format!("/healer-{j}"), uid(), SVID_TTL)
            .await?;
    }
    for j in 0..2 {
        lab.wait_fetch_has(j, &format!("/healer-{j}")).await?;
    }
    lab.wait_fetch_has(0, "/direct-0").await?;

    // --- spire-healer: two node instances and a cluster instance ----------
    let db = ScratchDatabase::create(&test_pg_url()).await?;
    // Migrated once here, before three processes open it.
    let store = knowledge::open(&db.url()).await?;
    let files = dir.path().join("healer");
    std::fs::create_dir_all(&files)?;
    let policy = policy_file(&files, "policy.toml", &[])?;
    // The cluster instance judges sync loss 4 s later than the nodes, so a
    // node instance has opened (and held) its own incident before the
    // cluster's failover makes the agent sync again: at the same threshold
    // the two race, and a node that loses sees nothing stale.
    let cluster_policy = policy_file(
        &files,
        "cluster-policy.toml",
        &[("sync_stale_open = \"8s\"", "sync_stale_open = \"12s\"")],
    )?;
    let cluster_conf = files.join("cluster.toml");
    std::fs::write(
        &cluster_conf,
        cluster_config(&lab, &db.url(), &cluster_policy, &files),
    )?;
    let mut cluster = Daemon::spawn(&cluster_conf)?;
    let cluster_http = http_addr(&mut cluster, "cluster").await?;
    cluster
        .wait_line("Leading", Duration::from_secs(30))
        .await
        .context("the cluster instance never led")?;
    let mut nodes = Vec::new();
    for j in 0..2 {
        let conf = files.join(format!("node-{j}.toml"));
        std::fs::write(&conf, node_config(&lab, j, &db.url(), &policy, &files))?;
        let mut d = Daemon::spawn(&conf)?;
        let http = http_addr(&mut d, &format!("node-{j}")).await?;
        d.wait_line("Store locks taken", Duration::from_secs(30))
            .await
            .with_context(|| format!("node instance {j}"))?;
        nodes.push((d, http));
    }
    // Everyone sees what it watches: the cluster both servers and both
    // agents, each node instance its agent.
    wait_until(
        "the cluster instance up",
        Duration::from_secs(30),
        || async {
            let m = scrape(cluster_http).await.ok()?;
            let v = |s: &str| spire_healer::telemetry::metrics::sample(&m, s);
            (v("spire_healer_servers_up") == Some(2.0)
                && (0..2).all(|j| {
                    v(&format!(
                        "spire_healer_workload_api_stream_up{{agent=\"agent-{j}\"}}"
                    )) == Some(1.0)
                }))
            .then_some(())
        },
    )
    .await?;
    for (j, (_, http)) in nodes.iter().enumerate() {
        let series = format!("spire_healer_workload_api_stream_up{{agent=\"agent-{j}\"}}");
        wait_until(
            &format!("node instance {j} up"),
            Duration::from_secs(30),
            || async {
                let m = scrape(*http).await.ok()?;
                (spire_healer::telemetry::metrics::sample(&m, &series) == Some(1.0)).then_some(())
            },
        )
        .await?;
    }
    let healers_up = begun.elapsed();

    // --- server A dies ------------------------------------------------------
    let killed = now_ms();
    println!("server A killed at {killed}");
    lab.kill_server(0).await?;
    let all = Query {
        limit: 500,
        ..Query::default()
    };
    let failover = wait_until(
        "agent-0 failed over and verified",
        Duration::from_secs(120),
        || async {
            actions(&db)
                .await
                .ok()?
                .into_iter()
                .find(|a| a.actuator == "failover" && a.verification.is_some())
        },
    )
    .await?;
    ensure!(
        failover.target == "agent-0"
            && failover.outcome.as_deref() == Some("ok")
            && failover.verification.as_deref() == Some("verified"),
        "{failover:#?}"
    );
    // Fenced: recorded under the leader's epoch 1.
    ensure!(failover.epoch == Some(1), "{failover:#?}");
    let leader = store
        .leadership("spire-healer-cluster")
        .await?
        .context("no leadership row")?;
    ensure!(
        leader.epoch == 1
            && leader
                .holder
                .contains(&format!("pid={}", cluster.child.id().unwrap_or(0))),
        "{leader:?}"
    );
    // agent-0 runs against B and serves SVIDs again, same identity.
    let conf = std::fs::read_to_string(lab.agent(0).conf())?;
    ensure!(
        conf.contains(&format!("server_port = \"{}\"", lab.server(1).bind_port())),
        "{conf}"
    );
    lab.wait_agent_ready(0).await?;
    lab.wait_fetch_has(0, "/healer-0").await?;
    lab.wait_fetch_has(0, "/direct-0").await?;
    let served_again = now_ms();
    let listed: BTreeSet<String> = lab
        .list_agents(1)
        .await?
        .into_iter()
        .map(|a| a.spiffe_id)
        .collect();
    let want: BTreeSet<String> = (0..2)
        .map(|j| psat.agent_id(lab.trust_domain(), j))
        .collect();
    ensure!(
        listed == want,
        "agents listed on B: {listed:?}, want {want:?}"
    );

    // Both instances watching agent-0 recorded its stale sync in the same
    // database: the cluster's incident is the one it acted on; agent-0's
    // node instance opened its own and only held it.
    let node0_incident = node_incident(&mut nodes[0].0, "agent_sync_stale").await?;
    ensure!(
        node0_incident != failover.incident_id,
        "one incident id for two instances"
    );
    let incidents = wait_until(
        "both sync-stale incidents closed",
        Duration::from_secs(60),
        || async {
            let rows = store.incidents(&all).await.ok()?;
            let stale: Vec<_> = rows
                .into_iter()
                .filter(|i| {
                    i.symptom == "agent_sync_stale"
                        && i.subject == "agent:agent-0"
                        && i.opened_at_ms >= killed
                })
                .collect();
            (stale.len() == 2 && stale.iter().all(|i| i.closed_at_ms.is_some())).then_some(stale)
        },
    )
    .await?;
    let ids: BTreeSet<&str> = incidents.iter().map(|i| i.id.as_str()).collect();
    ensure!(
        ids == BTreeSet::from([failover.incident_id.as_str(), node0_incident.as_str()]),
        "{incidents:#?}"
    );
    let cluster_incident = incidents
        .iter()
        .find(|i| i.id == failover.incident_id)
        .context("the cluster's incident")?;
    let holds = store.holds(&all).await?;
    ensure!(
        holds
            .iter()
            .any(|h| h.incident_id == node0_incident && h.reason == "left_to_cluster"),
        "the node instance did not hold its incident: {holds:#?}"
    );

    // Nobody acts twice: the failover is the only disruptive action, it was
    // the cluster leader's (a node instance's has no epoch), and no two
    // disruptive actions were ever in flight on one agent at once. A
    // `refetch` only reconnects the acting instance's own Workload API
    // stream and disrupts nothing: the leader may follow its failover with
    // one, and agent-0's node instance may reconnect its stream while the
    // failover's restart is verified (instances do not see each other's
    // actions in flight).
    let acted = actions(&db).await?;
    let context = || format!("actions: {acted:#?}");
    let disruptive: Vec<_> = acted.iter().filter(|a| a.actuator != "refetch").collect();
    ensure!(
        disruptive.iter().map(|a| a.id.as_str()).collect::<Vec<_>>() == [failover.id.as_str()],
        "{}",
        context()
    );
    ensure!(
        disruptive.iter().all(|a| a.epoch == Some(1)),
        "{}",
        context()
    );
    for (i, a) in disruptive.iter().enumerate() {
        for b in &disruptive[i + 1..] {
            let a_done = a.verified_at_ms.or(a.finished_at_ms).unwrap_or(i64::MAX);
            ensure!(
                a.target != b.target || a_done <= b.started_at_ms,
                "two actions in flight on {} at once: {}",
                a.target,
                context()
            );
        }
    }
    ensure!(
        !lab.list_agents(1).await?.iter().any(|a| a.banned),
        "an agent was banned"
    );

    println!(
        "k8s_psat scenario: control plane {:.1}s, SPIRE (2 servers, 2 k8s_psat agents) {:.1}s, \
         3 healer instances {:.1}s after the start; server A killed: agent_sync_stale opened \
         after {:.1}s, failover started after {:.1}s, incident closed (MTTR) {:.1}s after it \
         opened, SVIDs served again {:.1}s after the kill; whole scenario {:.1}s; actions {:?}",
        plane_up.as_secs_f64(),
        spire_up.as_secs_f64(),
        healers_up.as_secs_f64(),
        secs(killed, cluster_incident.opened_at_ms),
        secs(killed, failover.started_at_ms),
        secs(
            cluster_incident.opened_at_ms,
            cluster_incident.closed_at_ms.unwrap_or(0)
        ),
        secs(killed, served_again),
        begun.elapsed().as_secs_f64(),
        acted
            .iter()
            .map(|a| format!("{} {} epoch {:?}", a.actuator, a.target, a.epoch))
            .collect::<Vec<_>>(),
    );

    cluster.signal(Signal::SIGTERM)?;
    for (d, _) in &nodes {
        d.signal(Signal::SIGTERM)?;
    }
    let status = cluster.wait_exit(Duration::from_secs(30)).await?;
    ensure!(status.success(), "the cluster instance exited {status}");
    for (j, (d, _)) in nodes.iter_mut().enumerate() {
        let status = d.wait_exit(Duration::from_secs(30)).await?;
        ensure!(status.success(), "node instance {j} exited {status}");
    }
    lab.stop().await?;
    drop(plane);
    Ok(())
}

/// The servers' ServiceAccount may make exactly the calls of the
/// `k8s_psat` plugin, nothing more.
async fn check_server_rbac(plane: &ControlPlane) -> Result<()> {
    let as_server = "--as=system:serviceaccount:spire-system:spire-server";
    let allowed: &[&[&str]] = &[
        &["create", "tokenreviews.authentication.k8s.io"],
        &["get", "nodes"],
        &["get", "pods", "-n", "spire-system"],
    ];
    let denied: &[&[&str]] = &[
        &["list", "pods", "-n", "spire-system"],
        &["watch", "pods", "-n", "spire-system"],
        &["get", "pods", "-n", "default"],
        &["list", "nodes"],
        &["get", "secrets", "-n", "spire-system"],
        &["create", "serviceaccounts/token", "-n", "spire-system"],
        &["delete", "pods", "-n", "spire-system"],
    ];
    for (want, cases) in [("yes", allowed), ("no", denied)] {
        for case in cases {
            let mut cmd = tokio::process::Command::from(plane.kubectl());
            cmd.args(["auth", "can-i"]).args(*case).arg(as_server);
            let out = timeout(Duration::from_secs(30), cmd.output())
                .await
                .context("kubectl auth can-i")??;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            ensure!(
                answer == want,
                "spire-server may {case:?}: {answer:?}, want {want:?} ({})",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Every agent attested through `k8s_psat` as its node: the servers list
/// the k8s_psat IDs of the nodes' UIDs (as the API server has them), with
/// the selectors the plugin derives from the token and the pod.
async fn check_attested(lab: &HaLab, psat: &K8sPsat) -> Result<()> {
    let listed: BTreeSet<String> = lab
        .list_agents(0)
        .await?
        .into_iter()
        .map(|a| a.spiffe_id)
        .collect();
    let want: BTreeSet<String> = (0..2).map(|j| lab.agent(j).spiffe_id()).collect();
    ensure!(listed == want, "listed {listed:?}, want {want:?}");
    for (j, node) in psat.nodes.iter().enumerate() {
        let id = lab.agent(j).spiffe_id();
        ensure!(
            id == format!(
                "spiffe://{}/spire/agent/k8s_psat/{CLUSTER}/{}",
                lab.trust_domain(),
                node.node_uid
            ),
            "{id}"
        );
        let out = lab
            .server_cli(0, &["agent", "show", "-spiffeID", &id, "-output", "json"])
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stdout).to_string())?;
        let selectors: BTreeSet<String> = v["selectors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        format!(
                            "{}:{}",
                            s["type"].as_str().unwrap_or_default(),
                            s["value"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for want in [
            format!("k8s_psat:cluster:{CLUSTER}"),
            "k8s_psat:agent_ns:spire-system".to_string(),
            "k8s_psat:agent_sa:spire-agent".to_string(),
            format!("k8s_psat:agent_pod_name:{}", node.pod),
            format!("k8s_psat:agent_pod_uid:{}", node.pod_uid),
            format!("k8s_psat:agent_node_name:{}", node.node),
            format!("k8s_psat:agent_node_uid:{}", node.node_uid),
        ] {
            ensure!(
                selectors.contains(&want),
                "{id}: no {want} in {selectors:?}"
            );
        }
        ensure!(
            v["attestation_type"] == "k8s_psat" && v["can_reattest"] == true,
            "{v}"
        );
    }
    Ok(())
}

/// The default policy with the thresholds scaled to a 1 s sync interval,
/// as in the control-plane scenarios, with `more` replacements on top,
/// written to `dir/name`.
///
/// # Errors
/// When a replacement's text is not in the policy, or the file cannot be
/// written.
fn policy_file(dir: &Path, name: &str, more: &[(&str, &str)]) -> Result<PathBuf> {
    let mut text = crate::control_plane::POLICY_OVERRIDES.iter().fold(
        spire_healer::policy::DEFAULT_POLICY.to_string(),
        |p, (from, to)| p.replace(from, to),
    );
    for (from, to) in more {
        ensure!(text.contains(from), "{from:?} is not in the default policy");
        text = text.replace(from, to);
    }
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `[supervisor]`, `[database]` (with a spool file of its own) and `[http]`
/// of one instance.
fn common(url: &str, policy: &Path, spool: &Path) -> String {
    format!(
        r#"policy_file = "{policy}"
[supervisor]
tick_interval = "250ms"
[database]
url = "{url}"
spool = "{spool}"
[http]
listen = "127.0.0.1:0"
"#,
        policy = policy.display(),
        spool = spool.display(),
    )
}

/// One `[[agents]]` table for agent `j` of `lab`.
fn agent_table(lab: &HaLab, j: usize) -> String {
    let a = lab.agent(j);
    format!(
        "[[agents]]\nname = \"{}\"\naddress = \"unix://{}\"\nadmin_socket = \"{}\"\nhealth_url = \"{}\"\nmetrics_url = \"{}\"\nconfig_file = \"{}\"\ndata_dir = \"{}\"\nnode_alias = \"{}\"\npoll_interval = \"1s\"\nanswer_timeout = \"2s\"\nbackoff_max = \"2s\"\n",
        a.name(),
        a.workload_socket().display(),
        a.admin_socket().display(),
        a.health_url().trim_end_matches("/ready"),
        a.metrics_url(),
        a.conf().display(),
        a.data_dir().display(),
        a.node_alias(),
    )
}

/// The restart command of agent `j`, as a TOML array.
fn restart_argv(lab: &HaLab, j: usize) -> String {
    let argv: Vec<String> = lab
        .agent(j)
        .restart_command()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect();
    format!("[{}]", argv.join(", "))
}

/// The cluster instance: both servers and both agents, failover (which
/// rewrites an agent's config and restarts it), leading on PostgreSQL.
fn cluster_config(lab: &HaLab, url: &str, policy: &Path, dir: &Path) -> String {
    // The restart script of the target: `{agent}` is the target's name.
    let a0 = lab.agent(0).name().to_string();
    let restart = restart_argv(lab, 0).replace(&format!("/{a0}/"), "/{agent}/");
    let mut text = format!(
        "role = \"cluster\"\n{}",
        common(url, policy, &dir.join("cluster.spool"))
    );
    text += &format!(
        r#"[leadership]
backend = "postgres"
lease_duration = "5s"
renew_every = "1s"
retry_every = "500ms"
[actuators.restart-agent]
type = "command"
argv = {restart}
timeout = "20s"
[actuators.failover]
type = "server_failover"
strategy = "agent_config"
restart = "restart-agent"
repair_persisted_bundle = true
"#
    );
    for s in lab.servers() {
        text += &format!(
            "[[servers]]\nname = \"{}\"\nadmin_socket = \"{}\"\naddress = \"{}\"\nhealth_url = \"{}\"\nmetrics_url = \"{}\"\npoll_interval = \"1s\"\ntimeout = \"2s\"\n",
            s.name(),
            s.socket().display(),
            s.address(),
            s.health_url().trim_end_matches("/ready"),
            s.metrics_url(),
        );
    }
    for j in 0..lab.agents().len() {
        text += &agent_table(lab, j);
    }
    text
}

/// The node instance of agent `j`: that agent only, restarted by its own
/// script.
fn node_config(lab: &HaLab, j: usize, url: &str, policy: &Path, dir: &Path) -> String {
    format!(
        "role = \"node\"\n{}[actuators.restart-agent]\ntype = \"command\"\nargv = {}\ntimeout = \"20s\"\n{}",
        common(url, policy, &dir.join(format!("node-{j}.spool"))),
        restart_argv(lab, j),
        agent_table(lab, j),
    )
}

/// The address an instance serves `/metrics` on, from its log.
async fn http_addr(d: &mut Daemon, who: &str) -> Result<SocketAddr> {
    let line = d
        .wait_line("Serving /metrics", Duration::from_secs(30))
        .await
        .with_context(|| format!("{who} serves no /metrics"))?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    v["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no addr in {line}"))
}

/// `GET /metrics` (HTTP/1.0), bounded.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    timeout(Duration::from_secs(3), fetch)
        .await
        .context("/metrics did not answer")?
}

/// The id of the first incident of `symptom` the instance logs as opened.
async fn node_incident(d: &mut Daemon, symptom: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = d.wait_line("Incident opened", left).await?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if v["symptom"] == symptom {
            return v["incident"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("no incident id in {line}"));
        }
        if left.is_zero() {
            bail!("no {symptom} incident opened");
        }
    }
}

/// One row of the actions table, with the epoch it was started under.
#[derive(Debug)]
struct Action {
    id: String,
    incident_id: String,
    actuator: String,
    target: String,
    started_at_ms: i64,
    finished_at_ms: Option<i64>,
    outcome: Option<String>,
    verification: Option<String>,
    verified_at_ms: Option<i64>,
    epoch: Option<i64>,
}

/// Every action, oldest first.
async fn actions(db: &ScratchDatabase) -> Result<Vec<Action>> {
    type Row = (
        String,
        String,
        String,
        String,
        i64,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
    );
    let pool = sqlx::PgPool::connect(&db.url()).await?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, incident_id, actuator, target, started_at_ms, finished_at_ms, outcome, \
         verification, verified_at_ms, epoch FROM actions ORDER BY started_at_ms",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                incident_id,
                actuator,
                target,
                started_at_ms,
                finished_at_ms,
                outcome,
                verification,
                verified_at_ms,
                epoch,
            )| Action {
                id,
                incident_id,
                actuator,
                target,
                started_at_ms,
                finished_at_ms,
                outcome,
                verification,
                verified_at_ms,
                epoch,
            },
        )
        .collect())
}
