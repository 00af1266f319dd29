//! The live `/metrics` of a healer with an open incident passes `promtool
//! check metrics` (naming, units, help text, types) with no complaint, and
//! carries the series the alert rules and the catalogue rely on.
//!
//! promtool is the one beside the Prometheus binary named by
//! `SPIRE_HEALER_PROMETHEUS_BIN` (`scripts/test.sh` sets it).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use spire_healer::http_client::{self, Options};

use crate::helpers::Healer;
use crate::prom_server::prometheus_bin;

const AGENT: &str = "lint-agent";
const WAIT_LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_check_metrics() -> Result<()> {
    let prometheus = prometheus_bin()?;
    let promtool = prometheus.with_file_name("promtool");
    if !promtool.is_file() {
        bail!(
            "{} not found: promtool sits beside the prometheus binary that \
             SPIRE_HEALER_PROMETHEUS_BIN names",
            promtool.display()
        );
    }
    let dir = tempfile::Builder::new().prefix("healer-lint").tempdir()?;
    let agent = crate::helpers::simulated_agent(dir.path(), "lint.healer")?;
    let socket = agent.socket().to_path_buf();
    // The actuator does nothing: the incident stays open while we look.
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

[actuators.restart-agent]
type = "command"
argv = ["true"]
timeout = "5s"
"#,
        db = dir.path().join("healer.db").display(),
        sock = socket.display(),
    );
    let healer = Healer::launch(&text, tempfile::tempdir()?).await?;
    let addr = healer.http_addr.context("the healer serves no /metrics")?;
    healer
        .wait_for("stream up", WAIT_LIMIT, || async {
            (healer.metric(&format!(
                r#"spire_healer_workload_api_stream_up{{agent="{AGENT}"}}"#
            )) == 1.0)
                .then_some(())
        })
        .await?;
    agent.stop();
    let open = format!(
        r#"spire_healer_open_incident{{severity="warning",symptom="agent_unreachable",target="{AGENT}"}}"#
    );
    let open_critical = open.replace("warning", "critical");
    healer
        .wait_for("an open agent_unreachable incident", WAIT_LIMIT, || async {
            (healer.metric(&open) == 1.0 || healer.metric(&open_critical) == 1.0).then_some(())
        })
        .await?;

    let resp = http_client::get(
        &format!("http://{addr}/metrics"),
        &Options::new(Duration::from_secs(5)),
    )
    .await?;
    let body = String::from_utf8(resp.body.to_vec())?;
    healer.stop().await;
    agent.stop();
    for name in [
        "spire_healer_build_info{",
        "spire_healer_open_incident{",
        "spire_healer_sensor_blind{sensor=\"workload_api\"}",
        "spire_healer_sensor_last_success_timestamp_seconds{sensor=\"workload_api\"}",
        "spire_healer_incidents_held{",
        "spire_healer_workloads_at_risk",
    ] {
        assert!(body.contains(name), "/metrics has no {name}:\n{body}");
    }

    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", promtool.display()))?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics ({}) complains:\n{complaints}",
        out.status
    );
    Ok(())
}
