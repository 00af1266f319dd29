//! Starting spire-healer in-process against a lab, and reading its results.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use spire_healer::clock::{Clock, SystemClock, unix_millis};
use spire_healer::config::Config;
use spire_healer::knowledge::{ActionRecord, IncidentRecord, Query, Store, SvidRecord};
use spire_healer::telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::spire_lab::SpireLab;

/// A supervisor running in this process.
pub struct Healer {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// Where `/metrics` is served, when `[http]` is enabled.
    pub http_addr: Option<SocketAddr>,
    /// Where the API's mTLS listener is, when `[api.tcp]` is set.
    pub api_tcp_addr: Option<SocketAddr>,
    /// The configuration it runs with, as a file (for CLI commands that
    /// read it, such as `replay`).
    pub config: std::path::PathBuf,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    _dir: tempfile::TempDir,
}

/// The agent name used in configs.
pub const AGENT: &str = "lab-agent";

impl Healer {
    /// Starts spire-healer watching the lab's agent, with the lab's restart
    /// script as the `restart-agent` command and the built-in policy.
    pub async fn start(lab: &SpireLab, database_url: Option<String>) -> Result<Healer> {
        Self::start_with(lab, database_url, "", "").await
    }

    /// As [`start`](Self::start), with `top` (top-level keys such as
    /// `policy_file`) put first and `extra` (tables: `[[probes]]`,
    /// `[actuators.*]`, …) appended to the config.
    pub async fn start_with(
        lab: &SpireLab,
        database_url: Option<String>,
        top: &str,
        extra: &str,
    ) -> Result<Healer> {
        let dir = tempfile::tempdir()?;
        let url = database_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("healer.db").display()));
        let argv = lab
            .restart_command()
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            r#"
{top}
[supervisor]
tick_interval = "250ms"

[database]
url = "{url}"

[http]
listen = "127.0.0.1:0"

[[agents]]
name = "{AGENT}"
address = "unix://{sock}"
answer_timeout = "2s"
backoff_max = "2s"

[actuators.restart-agent]
type = "command"
argv = [{argv}]
timeout = "20s"
{extra}
"#,
            sock = lab.workload_socket().display(),
        );
        Self::launch(&text, dir).await
    }

    /// Starts spire-healer with the config `text`; `dir` holds its files
    /// and lives as long as the healer.
    pub async fn launch(text: &str, dir: tempfile::TempDir) -> Result<Healer> {
        let config = dir.path().join("healer.toml");
        std::fs::write(&config, text)?;
        let resolved = Config::from_toml(text, "test.toml")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .validate(&|_| None)
            .map_err(|e| anyhow::anyhow!("{e:?}\n{text}"))?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let running = spire_healer::app::start(
            &resolved,
            clock.clone(),
            metrics.clone(),
            shutdown.clone(),
            &tasks,
        )
        .await
        .context("starting spire-healer")?;
        Ok(Healer {
            store: running.store,
            metrics,
            clock,
            http_addr: running.http_addr,
            api_tcp_addr: running.api_tcp_addr,
            config,
            shutdown,
            tasks,
            _dir: dir,
        })
    }

    /// Stops the loop and waits (bounded) for its tasks.
    pub async fn stop(self) {
        self.stop_keeping_files().await;
    }

    /// Stops as [`stop`](Self::stop) does and hands over its directory
    /// (store, config), which lives as long as the returned value.
    pub async fn stop_keeping_files(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
        self._dir
    }

    pub async fn incidents(&self) -> Vec<IncidentRecord> {
        self.store
            .incidents(&Query {
                limit: 500,
                ..Query::default()
            })
            .await
            .unwrap_or_default()
    }

    pub async fn actions(&self) -> Vec<ActionRecord> {
        self.store
            .actions(&Query {
                limit: 500,
                ..Query::default()
            })
            .await
            .unwrap_or_default()
    }

    pub async fn svids(&self) -> Vec<SvidRecord> {
        self.store
            .svids(&Query {
                limit: 500,
                ..Query::default()
            })
            .await
            .unwrap_or_default()
    }

    /// Value of one metric series, or 0.
    pub fn metric(&self, series: &str) -> f64 {
        spire_healer::telemetry::metrics::sample(&self.metrics.render(), series).unwrap_or(0.0)
    }

    /// Polls `check` every 200 ms until it returns `Some`, or fails after `limit`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, limit: Duration, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(v) = check().await {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {limit:?} waiting for {what}\nincidents: {:#?}\nactions: {:#?}",
                    self.incidents().await,
                    self.actions().await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Supervisor ticks completed so far.
    pub fn ticks(&self) -> u64 {
        self.metrics.tick_duration_seconds.get_sample_count()
    }

    /// Waits until incident `id` is closed, and returns it.
    pub async fn wait_closed(&self, id: &str, limit: Duration) -> Result<IncidentRecord> {
        self.wait_for("incident closed", limit, || async {
            self.incidents()
                .await
                .into_iter()
                .find(|i| i.id == id && i.closed_at_ms.is_some())
        })
        .await
    }

    /// Waits until the supervisor has completed `n` more ticks: the clock
    /// for asserting that nothing happened.
    pub async fn wait_ticks(&self, n: u64) -> Result<()> {
        let until = self.ticks() + n;
        self.wait_for(&format!("{n} ticks"), Duration::from_secs(60), || async {
            (self.ticks() >= until).then_some(())
        })
        .await
    }

    /// Waits until the Workload API stream of the lab's agent is up.
    pub async fn wait_stream_up(&self) -> Result<()> {
        let series = format!(r#"spire_healer_workload_api_stream_up{{agent="{AGENT}"}}"#);
        self.wait_for("stream up", Duration::from_secs(20), || async {
            (self.metric(&series) == 1.0).then_some(())
        })
        .await
    }

    /// Waits for the agent's stream, kills the agent, and waits up to
    /// `limit` for the `agent_unreachable` incident opened since. Returns
    /// the incident and when the agent was killed (unix ms).
    pub async fn kill_agent_and_wait_open(
        &self,
        lab: &SpireLab,
        limit: Duration,
    ) -> Result<(IncidentRecord, i64)> {
        self.wait_stream_up().await?;
        let killed_at = self.now_ms();
        lab.kill_agent().await?;
        let incident = self
            .wait_for("agent_unreachable opened", limit, || async {
                self.incidents()
                    .await
                    .into_iter()
                    .find(|i| i.symptom == "agent_unreachable" && i.opened_at_ms >= killed_at)
            })
            .await?;
        Ok((incident, killed_at))
    }

    /// Waits until incident `id` has actions and every one is verified
    /// (or found not to have helped), and returns them.
    pub async fn wait_actions_verified(
        &self,
        id: &str,
        limit: Duration,
    ) -> Result<Vec<ActionRecord>> {
        self.wait_for("actions verified", limit, || async {
            let a: Vec<_> = self
                .actions()
                .await
                .into_iter()
                .filter(|a| a.incident_id == id)
                .collect();
            (!a.is_empty() && a.iter().all(|a| a.verification.is_some())).then_some(a)
        })
        .await
    }

    pub fn now_ms(&self) -> i64 {
        unix_millis(self.clock.now())
    }
}

/// Milliseconds between two unix-ms instants, as seconds.
pub fn secs(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms) as f64 / 1000.0
}

/// A simulated agent serving `spiffe://<trust_domain>/workload/web` with
/// hour-long SVIDs (no rotation during a test but the ones it causes) from a
/// CA valid for two hours, started on `<dir>/agent.sock`.
///
/// # Errors
/// The CA cannot be made or the socket bound.
pub fn simulated_agent(
    dir: &std::path::Path,
    trust_domain: &str,
) -> Result<Arc<spire_healer::simulated::agent::FakeAgent>> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    let ca = spire_healer::simulated::issuer::TestCa::new(
        trust_domain,
        now - Duration::from_secs(60),
        now + Duration::from_secs(7200),
    )?;
    let agent = Arc::new(spire_healer::simulated::agent::FakeAgent::new(
        ca,
        &format!("spiffe://{trust_domain}/workload/web"),
        Duration::from_secs(3600),
        clock,
        &dir.join("agent.sock"),
    ));
    agent.start()?;
    Ok(agent)
}
