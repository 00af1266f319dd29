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

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use spire_healer::sensors::workload_api::ERROR_CODES;
use tokio::time::{Instant, sleep};

use crate::helpers::Healer;
use crate::prom_server::{JOB, Prometheus, WAIT_LIMIT, prometheus_bin};

/// The whole test, Prometheus start to last query.
const TEST_LIMIT: Duration = Duration::from_secs(150);
/// Range of every `increase()`: longer than the whole test, so it spans
/// every sample since the first scrape.
const RANGE: &str = "5m";
const AGENT: &str = "prom-agent";
const SYMPTOM: &str = "agent_unreachable";
const ACTUATOR: &str = "restart-agent";

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
    let agent = crate::helpers::simulated_agent(dir.path(), "prom.healer")?;
    let socket = agent.socket().to_path_buf();

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
