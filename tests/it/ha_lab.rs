//! The HA lab on real SPIRE: two servers sharing one PostgreSQL database,
//! two agents. Failover by re-pointing an agent, ban and re-admission, and
//! `spire-lab up|down`. Needs `SPIRE_HEALER_TEST_PG_URL`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use spire_healer::config::Config;
use tokio::time::{Instant, sleep, timeout};

use crate::spire_lab::{
    HaLab, HaOptions, LabManifest, WAIT_LIMIT, database_exists, http_get_status, lab_bin, log_tail,
    pids_with_arg, process_alive, run_bounded, test_pg_url,
};

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn port_of(url: &str) -> Result<u16> {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("no port in {url}"))
}

fn path_of(url: &str) -> &str {
    let rest = url.trim_start_matches("http://");
    rest.find('/').map_or("/", |i| &rest[i..])
}

async fn http_ok(url: &str) -> Result<bool> {
    Ok(http_get_status(port_of(url)?, path_of(url)).await.ok() == Some(200))
}

/// Polls `check` every 500 ms until it returns true, or fails after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = check().await;
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what} (last check: {last:?})");
        }
        sleep(Duration::from_millis(500)).await;
    }
}

/// A number in a `spire-agent debug getinfo` answer (protojson writes
/// 64-bit integers as strings).
fn debug_field(answer: &serde_json::Value, field: &str) -> Result<i64> {
    let v = &answer[field];
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .or_else(|| v.is_null().then_some(0))
        .with_context(|| format!("no {field} in {answer}"))
}

fn last_sync(answer: &serde_json::Value) -> Result<i64> {
    debug_field(answer, "last_sync_success")
}

/// Agent `j`'s first Debug answer computed after `served`. The agent caches
/// its answer for 5 s with `uptime` frozen in it, so a new `uptime` is a new
/// answer; polled (bounded), as nothing announces it.
async fn next_debug_answer(
    lab: &HaLab,
    j: usize,
    served: &serde_json::Value,
) -> Result<serde_json::Value> {
    let uptime = debug_field(served, "uptime")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = lab.agent_debug_info(j).await?;
        if debug_field(&answer, "uptime")? != uptime {
            return Ok(answer);
        }
        if Instant::now() >= deadline {
            bail!("agent {j}'s Debug answer did not change in 30 s: {answer}");
        }
        sleep(Duration::from_millis(250)).await;
    }
}

fn took(label: &str, since: Instant) {
    println!("ha_lab: {label} at {:.1}s", since.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_failover_ban_and_readmission() -> Result<()> {
    let url = test_pg_url();
    let t0 = Instant::now();
    let lab = HaLab::start(HaOptions {
        postgres_url: url.clone(),
        ..HaOptions::default()
    })
    .await?;
    took("2 servers + 2 agents ready", t0);
    ensure!(database_exists(&url, lab.database_name()).await?);
    ensure!(
        lab.spire_connection_string()
            .ends_with(&format!("/{}?sslmode=disable", lab.database_name()))
    );

    // Both servers healthy (CLI and HTTP) and serving Prometheus metrics.
    for (i, s) in lab.servers().iter().enumerate() {
        ensure!(lab.server_healthcheck(i).await, "{} unhealthy", s.name());
        ensure!(http_ok(&s.health_url()).await?, "{} /ready", s.name());
        ensure!(http_ok(&s.metrics_url()).await?, "{} /metrics", s.name());
        ensure!(s.pid().is_some());
    }
    assert_eq!(lab.server(0).name(), "server-a");
    assert_eq!(lab.server(1).name(), "server-b");
    assert_eq!(lab.agent(0).server(), 0, "agent-0 starts on server-a");
    assert_eq!(lab.agent(1).server(), 1, "agent-1 starts on server-b");
    for a in lab.agents() {
        ensure!(http_ok(&a.health_url()).await?, "{} /ready", a.name());
        ensure!(http_ok(&a.metrics_url()).await?, "{} /metrics", a.name());
        ensure!(
            a.spiffe_id()
                .starts_with("spiffe://healer.test/spire/agent/join_token/")
        );
        ensure!(
            a.stored_bundle_cas() == Some(2),
            "{} persisted {:?} CAs",
            a.name(),
            a.stored_bundle_cas()
        );
    }

    // Each agent serves the entry registered under its own node alias.
    for j in 0..2 {
        lab.register_entry(j, &format!("/ha/w{j}"), uid(), 300)
            .await?;
    }
    for j in 0..2 {
        lab.wait_for_entry_synced(j, &format!("/ha/w{j}")).await?;
        lab.wait_fetch_has(j, &format!("/ha/w{j}")).await?;
    }
    let ids0 = lab.fetch_x509_ids(0, Duration::from_secs(3)).await?;
    ensure!(
        !ids0.contains(&lab.spiffe_id("/ha/w1")),
        "agent-0 got agent-1's entry: {ids0:?}"
    );
    took("both agents serve their SVIDs", t0);

    // Both servers list both agents.
    for i in 0..2 {
        let listed = lab.list_agents(i).await?;
        for a in lab.agents() {
            ensure!(
                listed
                    .iter()
                    .any(|l| l.spiffe_id == a.spiffe_id() && !l.banned),
                "{} does not list {}: {listed:?}",
                lab.server(i).name(),
                a.spiffe_id()
            );
        }
    }
    let authorities = lab.x509_authorities(1).await?.len();
    ensure!(authorities == 2, "one CA per server: {authorities}");

    // Kill server A: agent-0 (on A) stops syncing, agent-1 (on B) goes on.
    lab.kill_server(0).await?;
    ensure!(lab.server(0).pid().is_none());
    // Compare each agent's first Debug answer computed after the kill with
    // its next one (at least one 5 s cache period later).
    let settled = |j: usize| {
        let lab = &lab;
        async move {
            let served = lab.agent_debug_info(j).await?;
            let after_kill = next_debug_answer(lab, j, &served).await?;
            let later = next_debug_answer(lab, j, &after_kill).await?;
            anyhow::Ok((last_sync(&after_kill)?, last_sync(&later)?))
        }
    };
    let ((a0, b0), (a1, b1)) = tokio::try_join!(settled(0), settled(1))?;
    println!("ha_lab: last_sync_success agent-0 {a0} -> {b0}, agent-1 {a1} -> {b1}");
    ensure!(
        b0 == a0,
        "agent-0 kept syncing without server-a: {a0} -> {b0}"
    );
    ensure!(b1 > a1, "agent-1 stopped syncing: {a1} -> {b1}");
    ensure!(
        lab.agent_healthcheck(0).await,
        "agent-0 still serves from its cache"
    );
    took("server-a killed; agent-0 stale, agent-1 syncing", t0);

    // Re-point agent-0 at B and restart it through its script: it resumes
    // with its stored SVID (no attestation) and syncs via B.
    let id0 = lab.agent(0).spiffe_id();
    let old_pid = lab.agent(0).pid();
    lab.set_agent_server(0, 1)?;
    let conf = std::fs::read_to_string(lab.agent(0).conf())?;
    ensure!(conf.contains(&format!("server_port = \"{}\"", lab.server(1).bind_port())));
    let out = lab.run_restart_command(0).await?;
    println!(
        "ha_lab: restart agent-0: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    lab.wait_agent_ready(0).await?;
    ensure!(lab.agent(0).pid().is_some() && lab.agent(0).pid() != old_pid);
    if let Some(pid) = old_pid {
        ensure!(!process_alive(pid), "old agent-0 survived its restart");
    }
    let run = lab.agent(0).current_log();
    ensure!(
        run.contains("SVID loaded") && !run.contains("Node attestation was successful"),
        "agent-0 attested again:\n{}",
        log_tail(lab.agent(0).log())
    );
    ensure!(run.contains(&id0), "agent-0 changed identity");
    eventually("agent-0 syncing via server-b", WAIT_LIMIT, || async {
        Ok(lab.last_sync_success(0).await? > b0)
    })
    .await?;
    lab.wait_fetch_has(0, "/ha/w0").await?;
    let chain_path = lab.agent_debug_info(0).await?["svid_chain"][0]["id"]["path"]
        .as_str()
        .map(str::to_owned);
    ensure!(
        chain_path.is_some_and(|p| id0.ends_with(&p)),
        "debug svid_chain names another agent"
    );
    took("agent-0 failed over to server-b", t0);

    // Ban agent-1: it exits; B (the only server) shows it banned.
    let id1 = lab.agent(1).spiffe_id();
    lab.ban_agent(1).await?;
    lab.wait_agent_exited(1, WAIT_LIMIT).await?;
    ensure!(
        lab.agent(1).current_log().contains("Agent is banned"),
        "{}",
        log_tail(lab.agent(1).log())
    );
    let listed = lab.list_agents(1).await?;
    ensure!(
        listed.iter().any(|l| l.spiffe_id == id1 && l.banned),
        "{listed:?}"
    );
    took("agent-1 banned and exited", t0);

    // Re-admit agent-1: a new token for the same alias, evict the banned
    // record, restart through the script.
    let token = lab.new_join_token_for(1).await?;
    ensure!(lab.agent(1).join_token_file().exists());
    ensure!(
        lab.agent(1).spiffe_id() == id1,
        "a pending token does not change the ID"
    );
    lab.evict_agent(1).await?;
    eventually("the banned agent-1 evicted", WAIT_LIMIT, || async {
        Ok(!lab.list_agents(1).await?.iter().any(|l| l.spiffe_id == id1))
    })
    .await?;
    lab.run_restart_command(1).await?;
    ensure!(
        !lab.agent(1).join_token_file().exists(),
        "the restart script consumes the token"
    );
    lab.wait_agent_ready(1).await?;
    let new_id1 = lab.agent(1).spiffe_id();
    ensure!(
        new_id1.ends_with(&token) && new_id1 != id1,
        "{new_id1} vs {id1}"
    );
    ensure!(
        lab.agent(1)
            .current_log()
            .contains("Node attestation was successful")
    );
    lab.wait_fetch_has(1, "/ha/w1").await?;
    let listed = lab.list_agents(1).await?;
    ensure!(
        listed.iter().any(|l| l.spiffe_id == new_id1 && !l.banned),
        "{listed:?}"
    );
    took("agent-1 re-admitted and serving again", t0);

    // Server A comes back with the same CA (same data dir and keys).
    lab.start_server(0).await?;
    let after = lab.x509_authorities(0).await?.len();
    ensure!(
        after == authorities,
        "server-a minted a new CA on restart: {authorities} -> {after}"
    );
    // A frozen server answers nothing; thawed, it is healthy again.
    lab.freeze_server(0)?;
    ensure!(lab.server(0).frozen());
    let frozen_ok = lab.server_healthcheck(0).await;
    lab.thaw_server(0)?;
    ensure!(!frozen_ok, "a frozen server passed healthcheck");
    ensure!(lab.server_healthcheck(0).await);
    took("server-a restarted, frozen and thawed", t0);

    // Stop: every process gone, database dropped.
    let pids: Vec<i32> = lab
        .servers()
        .iter()
        .filter_map(|s| s.pid())
        .chain(lab.agents().iter().filter_map(|a| a.pid()))
        .collect();
    ensure!(pids.len() == 4, "{pids:?}");
    let db = lab.database_name().to_owned();
    lab.stop().await?;
    for pid in pids {
        ensure!(!process_alive(pid), "pid {pid} survived stop");
    }
    ensure!(!database_exists(&url, &db).await?, "{db} not dropped");
    took("stopped", t0);
    Ok(())
}

/// Takes the lab down when dropped: `spire-lab down --dir <dir>`
/// (bounded internally, harmless when the lab is already down), or SIGTERM
/// to a `lab up` that has not written `lab.json` yet.
struct DownOnDrop {
    bin: PathBuf,
    dir: PathBuf,
    pid: Option<u32>,
}

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if self.dir.join(LabManifest::FILE).exists() {
            let _ = std::process::Command::new(&self.bin)
                .args(["down", "--dir"])
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        } else if let Some(pid) = self.pid {
            // Still starting: SIGTERM makes it stop what it started.
            let pid = pid as i32;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            for _ in 0..300 {
                if !process_alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `spire-lab up` in the background, then `lab down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_up_then_down() -> Result<()> {
    let url = test_pg_url();
    let t0 = Instant::now();
    let tmp = tempfile::Builder::new().prefix("lu").tempdir_in("/tmp")?;
    let dir = tmp.path().join("lab");
    let console = tmp.path().join("up.log");
    let log = std::fs::File::create(&console)?;
    let bin = lab_bin().to_path_buf();
    let mut up = tokio::process::Command::new(&bin)
        .args(["up", "--dir"])
        .arg(&dir)
        .args(["--servers", "2", "--agents", "2", "--postgres-url", &url])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    // Whatever happens below, the lab is taken down (a SIGKILLed `lab up`
    // would orphan its servers and agents).
    let _down = DownOnDrop {
        bin: bin.clone(),
        dir: dir.clone(),
        pid: up.id(),
    };
    let manifest_path = dir.join(LabManifest::FILE);
    let deadline = Instant::now() + Duration::from_secs(120);
    let m = loop {
        if let Ok(m) = LabManifest::read(&manifest_path)
            && m.state == "running"
        {
            break m;
        }
        if let Ok(Some(status)) = up.try_wait() {
            bail!("lab up exited ({status}):\n{}", log_tail(&console));
        }
        ensure!(
            Instant::now() < deadline,
            "no lab.json after 120 s:\n{}",
            log_tail(&console)
        );
        sleep(Duration::from_millis(250)).await;
    };
    took("lab up wrote lab.json", t0);

    assert_eq!(m.owner_pid, up.id().context("lab up pid")?);
    assert_eq!(m.servers.len(), 2);
    assert_eq!(m.agents.len(), 2);
    for s in &m.servers {
        ensure!(s.pid.is_some_and(process_alive), "{} not running", s.name);
        ensure!(s.socket.exists());
    }
    for a in &m.agents {
        ensure!(a.pid.is_some_and(process_alive), "{} not running", a.name);
        ensure!(a.workload_socket.exists() && a.admin_socket.exists());
        ensure!(a.restart_command.len() == 2);
        // spire-healer (this uid) gets its SVID from every agent at once.
        let want = format!("spiffe://healer.test/healer/{}", a.name);
        ensure!(a.entries == [want.clone()], "{:?}", a.entries);
        let args = [
            "api",
            "fetch",
            "x509",
            "-socketPath",
            &a.workload_socket.to_string_lossy(),
            "-output",
            "json",
        ]
        .map(String::from);
        let out = run_bounded(
            &m.bin_dir.join("spire-agent"),
            &args,
            Duration::from_secs(10),
        )
        .await?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains(&want),
            "{} does not serve {want}: {}{}",
            a.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(database_exists(&url, &m.database.name).await?);
    let summary = std::fs::read_to_string(&console)?;
    ensure!(summary.contains("spire-healer run --config"), "{summary}");

    // The written config is valid for spire-healer as it is today.
    let toml_path = dir.join("spire-healer.toml");
    let text = std::fs::read_to_string(&toml_path)?;
    let resolved = Config::from_toml(&text, "spire-healer.toml")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .validate(&|_| None)
        .map_err(|e| anyhow::anyhow!("{e:?}\n{text}"))?;
    assert_eq!(resolved.config.agents.len(), 2);
    ensure!(
        !resolved
            .warnings
            .iter()
            .any(|w| w.contains("\"restart-agent\"")),
        "the built-in policy's restart-agent is not configured: {:?}",
        resolved.warnings
    );
    for a in &m.agents {
        ensure!(
            resolved
                .config
                .actuators
                .contains_key(&format!("restart-{}", a.name))
        );
    }

    // An agent restarted by its script is stopped by `lab down` too.
    let argv = &m.agents[0].restart_command;
    let out = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .await?;
    ensure!(out.status.success());

    // A second `lab up` on the same directory refuses.
    let again = timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&bin)
            .args(["up", "--dir"])
            .arg(&dir)
            .args(["--postgres-url", &url])
            .output(),
    )
    .await??;
    ensure!(!again.status.success());
    ensure!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let down = timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&bin)
            .args(["down", "--dir"])
            .arg(&dir)
            .output(),
    )
    .await??;
    println!(
        "ha_lab: lab down: {}{}",
        String::from_utf8_lossy(&down.stdout),
        String::from_utf8_lossy(&down.stderr)
    );
    ensure!(down.status.success(), "lab down failed");
    let status = timeout(Duration::from_secs(30), up.wait()).await??;
    ensure!(
        status.success(),
        "lab up exited with {status}:\n{}",
        log_tail(&console)
    );
    for conf in m
        .servers
        .iter()
        .map(|s| &s.conf)
        .chain(m.agents.iter().map(|a| &a.conf))
    {
        let left = pids_with_arg(conf);
        ensure!(left.is_empty(), "{} still runs: {left:?}", conf.display());
    }
    ensure!(!database_exists(&url, &m.database.name).await?);
    ensure!(LabManifest::read(&manifest_path)?.state == "stopped");
    took("lab down stopped everything", t0);
    Ok(())
}
