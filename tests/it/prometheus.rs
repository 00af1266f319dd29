//! `/metrics` scraped into a real Prometheus: the first incident and the
//! first action are increases PromQL can see, because every labelled series
//! whose labels are known at start is exported at zero before its first
//! event (`Metrics::init_series`). Without that, a counter's first sample is
//! already 1, and `increase()` over the first event finds nothing to
//! compare it with.
//!
//! The fault comes from a simulated agent ([`FakeAgent`]) stopped in
//! process; the `restart-agent` command actuator touches a flag file that a
//! task of this test turns into `FakeAgent::restart`, as `spire-healer demo`
//! does. Prometheus is the binary named by `SPIRE_HEALER_PROMETHEUS_BIN`
//! (`scripts/test.sh` installs Debian's `prometheus` and sets it); the test
//! fails when it is not there.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use spire_healer::clock::{Clock, SystemClock};
use spire_healer::http_client::{self, Options};
use spire_healer::sensors::workload_api::ERROR_CODES;
use spire_healer::simulated::agent::FakeAgent;
use spire_healer::simulated::issuer::TestCa;
use tokio::time::{Instant, sleep};

use crate::helpers::Healer;

/// The whole test, Prometheus start to last query.
const TEST_LIMIT: Duration = Duration::from_secs(150);
/// One wait for a fact in Prometheus or the store.
const WAIT_LIMIT: Duration = Duration::from_secs(45);
/// Scrape and rule-evaluation interval of our Prometheus.
const SCRAPE_INTERVAL: &str = "1s";
/// Range of every `increase()`: longer than the whole test, so it spans
/// every sample since the first scrape.
const RANGE: &str = "5m";
const JOB: &str = "spire-healer";
const AGENT: &str = "prom-agent";
const SYMPTOM: &str = "agent_unreachable";
const ACTUATOR: &str = "restart-agent";

/// The prometheus binary: `SPIRE_HEALER_PROMETHEUS_BIN`, which must name an
/// existing file (the convention of `SPIRE_HEALER_SPIRE_BIN`: a missing
/// binary is a failure with directions, not a skip).
pub(crate) fn prometheus_bin() -> Result<PathBuf> {
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
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// === impl Prometheus ===

/// A Prometheus server on a free port of 127.0.0.1 with a private data
/// directory, scraping one target every second. It runs in its own process
/// group, which `Drop` SIGKILLs and reaps.
struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`, path `/metrics`)
    /// and waits (bounded) until it is ready.
    async fn start(bin: &Path, target: &str) -> Result<Prometheus> {
        let dir = tempfile::Builder::new().prefix("healer-prom").tempdir()?;
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n  \
                 evaluation_interval: {SCRAPE_INTERVAL}\n\
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

    /// An instant query at the current time: each series' labels and value.
    async fn query(&self, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            utf8_percent_encode(promql, NON_ALPHANUMERIC)
        );
        let resp = http_client::get(&url, &Options::new(Duration::from_secs(5)))
            .await
            .with_context(|| format!("querying {promql}"))?;
        let body: serde_json::Value = serde_json::from_slice(&resp.body)
            .with_context(|| format!("answer to {promql} is not JSON"))?;
        if resp.status != 200 || body["status"] != "success" {
            bail!("query {promql} failed ({}): {body}", resp.status);
        }
        let Some(result) = body["data"]["result"].as_array() else {
            bail!("query {promql}: not a vector: {body}");
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
    async fn value(&self, promql: &str) -> Result<Option<f64>> {
        let r = self.query(promql).await?;
        if r.len() > 1 {
            bail!("query {promql} yields {} series: {r:?}", r.len());
        }
        Ok(r.first().map(|(_, v)| *v))
    }

    /// Polls `promql` every 250 ms until its single value satisfies `ok`.
    async fn wait_value(&self, what: &str, promql: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
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

// === the test ===

/// Failed checks, all reported at the end, so one run shows every check
/// that does not hold (e.g. all those that need zero-initialised series).
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn expect(&mut self, ok: bool, what: &str, promql: &str, got: impl std::fmt::Debug) {
        println!(
            "{} {what}: {promql} = {got:?}",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            self.0.push(format!("{what}: {promql} = {got:?}"));
        }
    }

    /// `promql` yields exactly one series, of value 0.
    async fn zero(&mut self, prom: &Prometheus, what: &str, promql: &str) -> Result<()> {
        let got = prom.query(promql).await?;
        self.expect(
            got.len() == 1 && got[0].1 == 0.0,
            what,
            promql,
            got.iter().map(|(_, v)| v).collect::<Vec<_>>(),
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_incident_and_action_are_increases_in_prometheus() -> Result<()> {
    let bin = prometheus_bin()?;
    let started = Instant::now();
    tokio::time::timeout(TEST_LIMIT, scenario(&bin))
        .await
        .with_context(|| format!("the Prometheus scenario took longer than {TEST_LIMIT:?}"))??;
    println!(
        "prometheus scenario: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn scenario(bin: &Path) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("healer-prom").tempdir()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    // An hour-long SVID: no rotation during the test but the one the
    // restart causes.
    let ca = TestCa::new(
        "prom.healer",
        now - Duration::from_secs(60),
        now + Duration::from_secs(7200),
    )?;
    let socket = dir.path().join("agent.sock");
    let agent = Arc::new(FakeAgent::new(
        ca,
        "spiffe://prom.healer/workload/web",
        Duration::from_secs(3600),
        clock,
        &socket,
    ));
    agent.start()?;

    let flag = dir.path().join("restart-flag");
    let text = format!(
        r#"
[supervisor]
tick_interval = "250ms"

[database]
url = "sqlite://{db}"

[http]
listen = "127.0.0.1:0"

[[agents]]
name = "{AGENT}"
address = "unix://{sock}"
answer_timeout = "1s"
backoff_max = "1s"

[actuators.{ACTUATOR}]
type = "command"
argv = ["touch", "{flag}"]
timeout = "5s"
"#,
        db = dir.path().join("healer.db").display(),
        sock = socket.display(),
        flag = flag.display(),
    );
    let healer = Healer::launch(&text, tempfile::tempdir()?).await?;
    // The simulated `systemctl restart spire-agent`.
    let restarter = {
        let agent = agent.clone();
        let flag = flag.clone();
        tokio::spawn(async move {
            loop {
                sleep(Duration::from_millis(50)).await;
                if fs::remove_file(&flag).is_ok() {
                    let _ = agent.restart();
                }
            }
        })
    };
    let addr = healer.http_addr.context("the healer serves no /metrics")?;
    let prom = Prometheus::start(bin, &addr.to_string()).await?;

    healer
        .wait_for("stream up", WAIT_LIMIT, || async {
            (healer.metric(&format!(
                r#"spire_healer_workload_api_stream_up{{agent="{AGENT}"}}"#
            )) == 1.0)
                .then_some(())
        })
        .await?;
    // Two scrapes of a healthy healer before the fault: every series below
    // has had a sample at 0 for `increase()` to start from.
    prom.wait_value("the target up", &format!(r#"up{{job="{JOB}"}}"#), |v| {
        v == 1.0
    })
    .await?;
    prom.wait_value(
        "two scrapes",
        &format!(r#"count_over_time(up{{job="{JOB}"}}[{RANGE}])"#),
        |v| v >= 2.0,
    )
    .await?;
    let mut checks = Checks::default();
    println!("before the first event:");
    checks
        .zero(
            &prom,
            "rotation counter of an agent that has not rotated",
            &format!(r#"spiffe_certificate_rotation_total{{agent="{AGENT}"}}"#),
        )
        .await?;
    let codes = prom
        .query(&format!(
            r#"spiffe_workload_api_errors_total{{agent="{AGENT}"}} == 0"#
        ))
        .await?;
    checks.expect(
        codes.len() == ERROR_CODES.len(),
        "Workload API error counters at 0, one per code",
        "spiffe_workload_api_errors_total == 0",
        codes.len(),
    );
    for (what, promql) in [
        (
            "incident counter",
            format!(r#"spire_healer_incidents_opened_total{{symptom="{SYMPTOM}"}}"#),
        ),
        (
            "action counter",
            format!(r#"spire_healer_actions_total{{actuator="{ACTUATOR}",outcome="ok"}}"#),
        ),
        (
            "MTTR histogram",
            format!(r#"spire_healer_incident_duration_seconds_count{{symptom="{SYMPTOM}"}}"#),
        ),
        (
            "action duration histogram",
            format!(r#"spire_healer_action_duration_seconds_count{{actuator="{ACTUATOR}"}}"#),
        ),
    ] {
        checks.zero(&prom, what, &promql).await?;
    }

    // The first incident: the agent goes away; the built-in ladder tries
    // refetch, then restart-agent brings it back.
    let fault_at = healer.now_ms();
    agent.stop();
    let incident = healer
        .wait_for("the first incident", WAIT_LIMIT, || async {
            healer
                .incidents()
                .await
                .into_iter()
                .find(|i| i.symptom == SYMPTOM && i.opened_at_ms >= fault_at)
        })
        .await?;
    let closed = healer.wait_closed(&incident.id, WAIT_LIMIT).await?;
    healer
        .wait_for("a verified restart-agent", WAIT_LIMIT, || async {
            healer
                .actions()
                .await
                .into_iter()
                .find(|a| {
                    a.incident_id == incident.id
                        && a.actuator == ACTUATOR
                        && a.verification.as_deref() == Some("verified")
                })
                .map(|_| ())
        })
        .await?;
    let mttr = (closed.closed_at_ms.unwrap_or_default() - incident.opened_at_ms) as f64 / 1000.0;
    println!("incident {SYMPTOM} healed in {mttr:.2}s");

    // Wait until Prometheus has scraped what the healer now exports: facts
    // that hold with or without zero-initialised series.
    for series in [
        format!(r#"spire_healer_incidents_opened_total{{symptom="{SYMPTOM}"}}"#),
        format!(r#"spire_healer_incident_duration_seconds_count{{symptom="{SYMPTOM}"}}"#),
        format!(r#"spire_healer_actions_total{{actuator="{ACTUATOR}",outcome="ok"}}"#),
        format!(r#"spire_healer_action_duration_seconds_count{{actuator="{ACTUATOR}"}}"#),
        // The restarted agent serves a new serial: its first rotation.
        format!(r#"spiffe_certificate_rotation_total{{agent="{AGENT}"}}"#),
    ] {
        let exported = healer.metric(&series);
        assert!(exported >= 1.0, "the healer exports {series} = {exported}");
        prom.wait_value(&format!("{series} scraped"), &series, |v| v >= exported)
            .await?;
    }

    println!("after the first event:");
    for (what, promql) in [
        (
            "increase over the first incident",
            format!(
                r#"increase(spire_healer_incidents_opened_total{{symptom="{SYMPTOM}"}}[{RANGE}])"#
            ),
        ),
        (
            "increase over the first action",
            format!(
                r#"increase(spire_healer_actions_total{{actuator="{ACTUATOR}",outcome="ok"}}[{RANGE}])"#
            ),
        ),
        (
            "increase over the agent's first rotation",
            format!(r#"increase(spiffe_certificate_rotation_total{{agent="{AGENT}"}}[{RANGE}])"#),
        ),
    ] {
        let got = prom.value(&promql).await?;
        checks.expect(got.is_some_and(|v| v >= 1.0), what, &promql, got);
    }
    for (what, promql) in [
        (
            "median MTTR over the first incident",
            format!(
                r#"histogram_quantile(0.5, sum by (le) (increase(spire_healer_incident_duration_seconds_bucket{{symptom="{SYMPTOM}"}}[{RANGE}])))"#
            ),
        ),
        (
            "median action duration over the first action",
            format!(
                r#"histogram_quantile(0.5, sum by (le) (increase(spire_healer_action_duration_seconds_bucket{{actuator="{ACTUATOR}"}}[{RANGE}])))"#
            ),
        ),
    ] {
        let got = prom.value(&promql).await?;
        checks.expect(got.is_some_and(f64::is_finite), what, &promql, got);
    }

    restarter.abort();
    healer.stop().await;
    drop(prom);
    if !checks.0.is_empty() {
        bail!(
            "{} PromQL check(s) failed:\n  {}",
            checks.0.len(),
            checks.0.join("\n  ")
        );
    }
    Ok(())
}
