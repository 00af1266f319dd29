//! A crash during a database outage: the `spire-healer` binary on a fresh
//! PostgreSQL database reached through a proxy the test can cut. The agent
//! (simulated) fails while the database is away; the healer acts (the
//! first rung, a refetch), is
//! killed with SIGKILL, and the next start replays its spool: every event
//! of the outage is then in the database, and the verification the kill
//! cut short is resumed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use spire_healer::knowledge::{self, Query};
use spire_healer::simulated::agent::FakeAgent;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::daemon::{Daemon, wait_until};
use crate::spire_lab::test_pg_url;

const AGENT: &str = "spool-agent";

/// A TCP proxy to PostgreSQL that can be cut (open connections dropped,
/// new ones closed at once) and restored.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    links: Arc<std::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let links = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let (up2, links2) = (up.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let target = target.clone();
                links2.lock().unwrap().spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Proxy {
            port,
            up,
            links,
            accept,
        })
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.links.lock().unwrap().abort_all();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.links.lock().unwrap().abort_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_database_outage_loses_nothing_acted_on() -> Result<()> {
    timeout(Duration::from_secs(150), scenario())
        .await
        .context("the scenario took longer than 150 s")?
}

/// A fresh database behind a cuttable proxy, a healthy simulated agent,
/// and a config for the binary using both (the spool in the temp dir).
struct Setup {
    db: spire_lab::ScratchDatabase,
    proxy: Proxy,
    dir: tempfile::TempDir,
    agent: Arc<FakeAgent>,
    config: std::path::PathBuf,
    spool: std::path::PathBuf,
    store: Arc<dyn knowledge::Store>,
}

async fn setup() -> Result<Setup> {
    let db = spire_lab::ScratchDatabase::create(&test_pg_url()).await?;
    let direct = db.url();
    let (host_port, _) = direct
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(_, rest)| rest.split_once('/'))
        .context("test URL is postgres://user:pw@host:port/db")?;
    let proxy = Proxy::start(host_port.to_string()).await?;
    let via_proxy = direct.replacen(host_port, &format!("127.0.0.1:{}", proxy.port), 1);

    let dir = tempfile::Builder::new().prefix("healer-spool").tempdir()?;
    let agent = crate::helpers::simulated_agent(dir.path(), "spool.healer")?;
    let socket = agent.socket().to_path_buf();
    let spool = dir.path().join("healer.spool");
    let config = dir.path().join("healer.toml");
    std::fs::write(
        &config,
        format!(
            r#"[supervisor]
tick_interval = "250ms"
[database]
url = "{via_proxy}"
spool = "{spool}"
[http]
listen = "127.0.0.1:0"
[[agents]]
name = "{AGENT}"
address = "unix://{sock}"
answer_timeout = "1s"
backoff_max = "1s"
[actuators.restart-agent]
type = "command"
argv = ["true"]
timeout = "5s"
"#,
            spool = spool.display(),
            sock = socket.display(),
        ),
    )?;
    let store = knowledge::open(&direct).await?;
    Ok(Setup {
        db,
        proxy,
        dir,
        agent,
        config,
        spool,
        store,
    })
}

fn all() -> Query {
    Query {
        limit: 1000,
        ..Query::default()
    }
}

async fn scenario() -> Result<()> {
    let Setup {
        db,
        proxy,
        dir: _dir,
        agent,
        config,
        spool,
        store,
    } = setup().await?;
    let all = all();
    let mut healer = Daemon::spawn(&config)?;
    // Healthy and recorded: the agent's SVID reached the database.
    wait_until(
        "the agent's SVID in the store",
        Duration::from_secs(30),
        || async { store.svids(&all).await.ok().filter(|s| !s.is_empty()) },
    )
    .await?;

    // The database goes away; then the agent fails.
    proxy.cut();
    agent.stop();
    let has = |what: &'static str| {
        let spool = spool.clone();
        move || {
            let bytes = std::fs::read(&spool).unwrap_or_default();
            let found = String::from_utf8_lossy(&bytes).contains(what);
            async move { found.then_some(()) }
        }
    };
    // Recorded before acting, then its result: both on disk.
    wait_until(
        "the first action's start and finish in the spool",
        Duration::from_secs(30),
        has(r#""event":"action_finished""#),
    )
    .await?;
    assert!(
        has(r#""event":"action_started""#)().await.is_some(),
        "the start precedes the finish"
    );
    healer.signal(Signal::SIGKILL)?;
    let status = healer.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed, not exited on its own: {status}"
    );
    assert!(
        store.actions(&all).await?.is_empty(),
        "the outage kept every action from the database"
    );

    // The database is back; the next start replays the spool first.
    proxy.restore();
    let mut healer = Daemon::spawn(&config)?;
    let line = healer
        .wait_line("Replayed the spool", Duration::from_secs(30))
        .await?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let replayed = v["events"].as_u64().unwrap_or(0);
    assert!(replayed >= 3, "{line}");
    // The verification the kill cut short is taken up again: the agent is
    // still down, so the refetch did not help.
    let judged = wait_until(
        "the first action's verdict",
        Duration::from_secs(30),
        || async {
            let actions = store.actions(&all).await.ok()?;
            actions
                .into_iter()
                .find(|a| a.rung == 0 && a.verification.is_some())
        },
    )
    .await?;
    assert_eq!(judged.verification.as_deref(), Some("failed"), "{judged:?}");
    healer.signal(Signal::SIGTERM)?;
    healer.wait_exit(Duration::from_secs(20)).await?;

    let incidents = store.incidents(&all).await?;
    let unreachable: Vec<_> = incidents
        .iter()
        .filter(|i| i.symptom == "agent_unreachable")
        .collect();
    assert_eq!(unreachable.len(), 1, "{incidents:?}");
    let actions = store.actions(&all).await?;
    let first = actions
        .iter()
        .find(|a| a.incident_id == unreachable[0].id && a.rung == 0)
        .with_context(|| format!("no action on the outage's incident in {actions:?}"))?;
    assert_eq!(first.outcome.as_deref(), Some("ok"), "{first:?}");
    assert!(
        first.error.is_none(),
        "recorded as it ran, not abandoned: {first:?}"
    );
    // The spool is empty again.
    let (_, replay) = knowledge::Spool::open(&spool, 1 << 20)?;
    assert!(replay.events.is_empty());
    drop(db);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_session_stops_with_69_and_spools_what_is_left() -> Result<()> {
    timeout(Duration::from_secs(120), async {
        let s = setup().await?;
        let mut healer = Daemon::spawn(&s.config)?;
        wait_until(
            "the agent's SVID in the store",
            Duration::from_secs(30),
            || async { s.store.svids(&all()).await.ok().filter(|v| !v.is_empty()) },
        )
        .await?;
        // The database session holding the scope is gone: another instance
        // may act now, so this one stops, and says so by its exit status.
        s.proxy.cut();
        s.agent.stop();
        healer
            .wait_line("The store lock was lost", Duration::from_secs(40))
            .await?;
        let status = healer.wait_exit(Duration::from_secs(40)).await?;
        assert_eq!(status.code(), Some(69), "{status}");
        // What happened meanwhile waits in the spool for the next start.
        let (_, replay) = knowledge::Spool::open(&s.spool, 1 << 20)?;
        assert!(
            replay
                .events
                .iter()
                .any(|e| matches!(e, spire_healer::model::Event::IncidentOpened { .. })),
            "{:?}",
            replay.events
        );
        drop(s.db);
        Ok(())
    })
    .await
    .context("the scenario took longer than 120 s")?
}
