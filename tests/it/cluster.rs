//! The HA lab (two spire-servers sharing one PostgreSQL datastore, two
//! agents: agent-0 on server A, agent-1 on server B) with spire-healer
//! running in-process and watching all of it: the rig of the control-plane
//! and CA-rotation scenarios.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use spire_healer::clock::{Clock, SystemClock, unix_millis};
use spire_healer::config::{Config, Resolved};
use spire_healer::knowledge::{ActionRecord, HoldRecord, IncidentRecord, Query, Store};
use spire_healer::telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ha_healer::ha_config;
use crate::spire_lab::{HaLab, HaOptions};

fn pg_url() -> Result<String> {
    std::env::var("SPIRE_HEALER_TEST_PG_URL").context(
        "SPIRE_HEALER_TEST_PG_URL is not set: run scripts/test.sh (it provisions PostgreSQL)",
    )
}

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

pub struct Cluster {
    pub lab: HaLab,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Where `/metrics` is served.
    pub http_addr: Option<SocketAddr>,
    resolved: Resolved,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the lab, registers `/healer-<j>` for our uid on each agent
    /// (X509-SVID TTL `ttl` seconds) and waits until both agents have it,
    /// then starts spire-healer with the built-in policy, rewritten by
    /// `policy_overrides` (`(from, to)` text replacements) when there are
    /// any. With `bootstrap_bundle`, every agent's `trust_bundle_path` is
    /// the lab's bootstrap bundle.
    pub async fn start(
        ttl: u32,
        policy_overrides: &[(&str, &str)],
        bootstrap_bundle: bool,
    ) -> Result<Cluster> {
        Self::start_with(ttl, policy_overrides, bootstrap_bundle, "1h").await
    }

    /// [`Cluster::start`] with servers whose agent SVIDs live `agent_ttl`
    /// (an HCL duration).
    pub async fn start_with(
        ttl: u32,
        policy_overrides: &[(&str, &str)],
        bootstrap_bundle: bool,
        agent_ttl: &str,
    ) -> Result<Cluster> {
        let lab = Self::start_lab(ttl, agent_ttl).await?;
        Self::watch(lab, policy_overrides, bootstrap_bundle, "").await
    }

    /// The lab half of [`Cluster::start_with`]: servers whose agent SVIDs
    /// live `agent_ttl`, and `/healer-<j>` (X509-SVID TTL `ttl` seconds)
    /// synced to each agent. For tests that start workloads on the lab
    /// before spire-healer watches it ([`Cluster::watch`]).
    pub async fn start_lab(ttl: u32, agent_ttl: &str) -> Result<HaLab> {
        let lab = HaLab::start(HaOptions {
            postgres_url: pg_url()?,
            agent_ttl: agent_ttl.into(),
            ..HaOptions::default()
        })
        .await?;
        for j in 0..lab.agents().len() {
            lab.register_entry(j, &format!("/healer-{j}"), uid(), ttl)
                .await?;
        }
        for j in 0..lab.agents().len() {
            lab.wait_for_entry_synced(j, &format!("/healer-{j}"))
                .await?;
        }
        Ok(lab)
    }

    /// Starts spire-healer watching `lab` (see [`Cluster::start`]), with
    /// `extra` (TOML: `[api]`, `[[probes]]`, …) appended to its config.
    pub async fn watch(
        lab: HaLab,
        policy_overrides: &[(&str, &str)],
        bootstrap_bundle: bool,
        extra: &str,
    ) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let policy_path = dir.path().join("policy.toml");
        let policy_file = if policy_overrides.is_empty() {
            None
        } else {
            let policy = policy_overrides.iter().fold(
                spire_healer::policy::DEFAULT_POLICY.to_string(),
                |p, (from, to)| p.replace(from, to),
            );
            std::fs::write(&policy_path, policy)?;
            Some(policy_path.as_path())
        };
        let text = ha_config(&lab, dir.path(), policy_file, bootstrap_bundle) + extra;
        let resolved = Config::from_toml(&text, "ha-test.toml")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .validate(&|_| None)
            .map_err(|e| anyhow::anyhow!("{e:?}\n{text}"))?;
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let running = spire_healer::app::start(
            &resolved,
            Arc::new(SystemClock),
            metrics.clone(),
            shutdown.clone(),
            &tasks,
        )
        .await?;
        Ok(Cluster {
            lab,
            store: running.store,
            metrics,
            http_addr: running.http_addr,
            resolved,
            shutdown,
            tasks,
            _dir: dir,
        })
    }

    /// Stops spire-healer (as SIGTERM does) and starts it again on the same
    /// store and config: what it knows after a restart is what it recorded.
    pub async fn restart_healer(&mut self) -> Result<()> {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(30), self.tasks.wait())
            .await
            .context("spire-healer did not stop within 30 s")?;
        self.shutdown = CancellationToken::new();
        self.tasks = TaskTracker::new();
        self.metrics = Arc::new(Metrics::new());
        let running = spire_healer::app::start(
            &self.resolved,
            Arc::new(SystemClock),
            self.metrics.clone(),
            self.shutdown.clone(),
            &self.tasks,
        )
        .await?;
        self.store = running.store;
        self.http_addr = running.http_addr;
        Ok(())
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
        let _ = self.lab.stop().await;
    }

    pub fn now_ms(&self) -> i64 {
        unix_millis(SystemClock.now())
    }

    pub fn metric(&self, series: &str) -> f64 {
        spire_healer::telemetry::metrics::sample(&self.metrics.render(), series).unwrap_or(0.0)
    }

    /// Supervisor ticks completed so far.
    pub fn ticks(&self) -> u64 {
        self.metrics.tick_duration_seconds.get_sample_count()
    }

    /// Waits until the supervisor has completed `n` more ticks.
    pub async fn wait_ticks(&self, n: u64) -> Result<()> {
        let until = self.ticks() + n;
        self.wait_for(&format!("{n} ticks"), Duration::from_secs(60), || async {
            (self.ticks() >= until).then_some(())
        })
        .await
    }

    pub async fn incidents(&self) -> Vec<IncidentRecord> {
        let q = Query {
            limit: 500,
            ..Query::default()
        };
        self.store.incidents(&q).await.unwrap_or_default()
    }

    pub async fn actions(&self) -> Vec<ActionRecord> {
        let q = Query {
            limit: 500,
            ..Query::default()
        };
        self.store.actions(&q).await.unwrap_or_default()
    }

    pub async fn holds(&self) -> Vec<HoldRecord> {
        let q = Query {
            limit: 500,
            ..Query::default()
        };
        self.store.holds(&q).await.unwrap_or_default()
    }

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
                anyhow::bail!(
                    "timed out after {limit:?} waiting for {what}\nincidents: {:#?}\nactions: {:#?}\nholds: {:#?}",
                    self.incidents().await,
                    self.actions().await,
                    self.holds().await,
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn incident(
        &self,
        symptom: &str,
        subject: &str,
        since: i64,
    ) -> Option<IncidentRecord> {
        self.incidents()
            .await
            .into_iter()
            .find(|i| i.symptom == symptom && i.subject == subject && i.opened_at_ms >= since)
    }

    /// Waits (up to `limit`) until `actuator`'s action for `incident` has a
    /// verification, and returns it.
    pub async fn wait_judged(
        &self,
        incident: &str,
        actuator: &str,
        limit: Duration,
    ) -> Result<ActionRecord> {
        let what = format!("{actuator} for {incident} judged");
        self.wait_for(&what, limit, || async {
            self.actions().await.into_iter().find(|a| {
                a.incident_id == incident && a.actuator == actuator && a.verification.is_some()
            })
        })
        .await
    }

    pub async fn closed(&self, id: &str) -> Option<IncidentRecord> {
        self.incidents()
            .await
            .into_iter()
            .find(|i| i.id == id && i.closed_at_ms.is_some())
    }
}
