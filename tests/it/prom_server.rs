//! A real Prometheus for the tests: started on a free port of 127.0.0.1
//! with a private data directory, scraping spire-healer every second as
//! `job="spire-healer"` (the job the shipped alert rules and dashboard
//! select), optionally evaluating rule files. Used by `prometheus.rs` and
//! `dashboard_live.rs`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use spire_healer::http_client::{self, Options};
use tokio::time::{Instant, sleep};

/// One wait for a fact in Prometheus.
pub const WAIT_LIMIT: Duration = Duration::from_secs(45);
/// Scrape and rule-evaluation interval.
pub const SCRAPE_INTERVAL: &str = "1s";
/// The scrape job of spire-healer.
pub const JOB: &str = "spire-healer";

/// The prometheus binary: `SPIRE_HEALER_PROMETHEUS_BIN`, which must name an
/// existing file (the convention of `SPIRE_HEALER_SPIRE_BIN`: a missing
/// binary is a failure with directions, not a skip).
pub fn prometheus_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("SPIRE_HEALER_PROMETHEUS_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .context(
            "SPIRE_HEALER_PROMETHEUS_BIN is not set; run scripts/test.sh (it installs \
             Debian's prometheus package and sets it), or set it to a prometheus binary",
        )?;
    if !bin.is_file() {
        bail!(
            "{} not found; run scripts/test.sh (it installs Debian's prometheus package), \
             or set SPIRE_HEALER_PROMETHEUS_BIN to a prometheus binary",
            bin.display()
        );
    }
    Ok(bin)
}

/// The last `n` lines of `path`, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One series of an instant query: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// One alert as `/api/v1/alerts` lists it.
#[derive(Debug, Clone)]
pub struct Alert {
    pub name: String,
    /// `pending` or `firing`.
    pub state: String,
}

// === impl Prometheus ===

/// A Prometheus server on a free port of 127.0.0.1 with a private data
/// directory, scraping one target every second. It runs in its own process
/// group, which `Drop` SIGKILLs and reaps.
pub struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`, path `/metrics`)
    /// and waits (bounded) until it is ready.
    pub async fn start(bin: &Path, target: &str) -> Result<Prometheus> {
        Self::start_with_rules(bin, target, &[]).await
    }

    /// As [`start`](Self::start), evaluating the rule files `rules` (each
    /// a file's text) every second.
    pub async fn start_with_rules(
        bin: &Path,
        target: &str,
        rules: &[String],
    ) -> Result<Prometheus> {
        let dir = tempfile::Builder::new().prefix("healer-prom").tempdir()?;
        let mut rule_files = String::new();
        for (i, text) in rules.iter().enumerate() {
            let path = dir.path().join(format!("rules-{i}.yaml"));
            fs::write(&path, text)?;
            rule_files += &format!("  - {}\n", path.display());
        }
        if !rule_files.is_empty() {
            rule_files = format!("rule_files:\n{rule_files}");
        }
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n  \
                 evaluation_interval: {SCRAPE_INTERVAL}\n\
                 {rule_files}\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n"
            ),
        )?;
        let port = spire_lab::free_port()?;
        let log = dir.path().join("prometheus.log");
        let out = fs::File::create(&log)?;
        let child = std::process::Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut prom = Prometheus {
            child,
            port,
            log,
            _dir: dir,
        };
        prom.wait_ready().await?;
        Ok(prom)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "prometheus exited ({status}) before it was ready; its log:\n{}",
                    tail(&self.log, 30)
                );
            }
            if spire_lab::http_get_status(self.port, "/-/ready").await.ok() == Some(200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus not ready on 127.0.0.1:{} after {WAIT_LIMIT:?}; its log:\n{}",
                    self.port,
                    tail(&self.log, 30)
                );
            }
            sleep(Duration::from_millis(200)).await;
        }
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer.
    async fn api(&self, path: &str) -> Result<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        let resp = http_client::get(&url, &Options::new(Duration::from_secs(5)))
            .await
            .with_context(|| format!("GET /api/v1/{path}"))?;
        let body: serde_json::Value = serde_json::from_slice(&resp.body)
            .with_context(|| format!("answer to /api/v1/{path} is not JSON"))?;
        if resp.status != 200 || body["status"] != "success" {
            bail!("/api/v1/{path} failed ({}): {body}", resp.status);
        }
        Ok(body["data"].clone())
    }

    /// An instant query at the current time: each series' labels and value.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let data = self
            .api(&format!(
                "query?query={}",
                utf8_percent_encode(promql, NON_ALPHANUMERIC)
            ))
            .await
            .with_context(|| format!("querying {promql}"))?;
        let result = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            // A scalar (e.g. `time()`) is one unlabelled sample.
            Some("scalar") => vec![serde_json::json!({ "metric": {}, "value": data["result"] })],
            _ => bail!("query {promql}: not a vector or scalar: {data}"),
        };
        result
            .iter()
            .map(|s| {
                let labels = serde_json::from_value(s["metric"].clone())?;
                let value = s["value"][1]
                    .as_str()
                    .context("sample value")?
                    .parse::<f64>()?;
                Ok((labels, value))
            })
            .collect()
    }

    /// The single value `promql` yields, or `None` when it yields nothing.
    ///
    /// # Errors
    /// The query fails, or yields more than one series.
    pub async fn value(&self, promql: &str) -> Result<Option<f64>> {
        let r = self.query(promql).await?;
        if r.len() > 1 {
            bail!("query {promql} yields {} series: {r:?}", r.len());
        }
        Ok(r.first().map(|(_, v)| *v))
    }

    /// Polls `promql` every 250 ms until its single value satisfies `ok`.
    pub async fn wait_value(
        &self,
        what: &str,
        promql: &str,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let last = self.value(promql).await?;
            if let Some(v) = last.filter(|v| ok(*v)) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {WAIT_LIMIT:?} waiting for {what} ({promql} = {last:?}); \
                     prometheus log:\n{}",
                    tail(&self.log, 20)
                );
            }
            sleep(Duration::from_millis(250)).await;
        }
    }

    /// Alerts now pending or firing (`/api/v1/alerts`).
    pub async fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.api("alerts").await?;
        let list = data["alerts"].as_array().cloned().unwrap_or_default();
        list.iter()
            .map(|a| {
                let labels: BTreeMap<String, String> = serde_json::from_value(a["labels"].clone())?;
                Ok(Alert {
                    name: labels.get("alertname").cloned().unwrap_or_default(),
                    state: a["state"].as_str().unwrap_or_default().to_string(),
                })
            })
            .collect()
    }

    /// Every metric name Prometheus has stored so far (`__name__` values):
    /// what the scraped `/metrics` exported at some point, and recording
    /// rules' outputs.
    pub async fn metric_names(&self) -> Result<Vec<String>> {
        let data = self.api("label/__name__/values").await?;
        Ok(serde_json::from_value(data)?)
    }

    /// Alerting and recording rules loaded, with their health: each rule's
    /// name and `lastError`, if any.
    pub async fn rule_errors(&self) -> Result<Vec<(String, String)>> {
        let data = self.api("rules").await?;
        let mut bad = Vec::new();
        for g in data["groups"].as_array().cloned().unwrap_or_default() {
            for r in g["rules"].as_array().cloned().unwrap_or_default() {
                if r["health"] == "err" {
                    bad.push((
                        r["name"].as_str().unwrap_or_default().to_string(),
                        r["lastError"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
        }
        Ok(bad)
    }

    /// How many rules (alerting and recording) are loaded.
    pub async fn rule_count(&self) -> Result<usize> {
        let data = self.api("rules").await?;
        Ok(data["groups"]
            .as_array()
            .map(|gs| {
                gs.iter()
                    .map(|g| g["rules"].as_array().map_or(0, Vec::len))
                    .sum()
            })
            .unwrap_or(0))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGKILL);
        for _ in 0..500 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
