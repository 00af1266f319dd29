//! Traces end to end: `spire-healer run` (the binary, `--log-format json`)
//! exports over OTLP/gRPC to a real OpenTelemetry Collector, and the test
//! asserts on what the collector received, never on the exporter's
//! results: one incident's trace holds the incident span (opened →
//! closed, with its attributes) and, as its children, the spans of the
//! ladder it climbed (refetch, then restart-agent, with outcome and
//! verification); a JSON log line carries the ids of a received span.
//!
//! The collector is the binary named by `SPIRE_HEALER_OTELCOL_BIN`
//! (`scripts/test.sh` builds it with `scripts/install-otelcol.sh`): an
//! OTLP receiver on a free port of 127.0.0.1 and the `jsonfile` exporter,
//! which appends every batch it receives to a file as a line of OTLP JSON.
//! The fault comes from a simulated agent ([`FakeAgent`]) of this process,
//! stopped; the `restart-agent` command touches a flag file that a task of
//! this test turns into `FakeAgent::restart`, as in `prometheus.rs`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::time::{Instant, sleep};

/// The whole test.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// One wait: the collector ready, the spans received, the healer gone.
const WAIT_LIMIT: Duration = Duration::from_secs(45);
const AGENT: &str = "trace-agent";
const SERVICE: &str = "healer-trace-test";

/// The collector binary: `SPIRE_HEALER_OTELCOL_BIN`, which must name an
/// existing file (a missing binary is a failure with directions, not a
/// skip).
fn otelcol_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("SPIRE_HEALER_OTELCOL_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .context(
            "SPIRE_HEALER_OTELCOL_BIN is not set; run scripts/test.sh (it builds the collector \
             with scripts/install-otelcol.sh and sets it), or set it to the path \
             scripts/install-otelcol.sh prints",
        )?;
    ensure!(
        bin.is_file(),
        "{} not found; run scripts/install-otelcol.sh and set SPIRE_HEALER_OTELCOL_BIN to the \
         path it prints",
        bin.display()
    );
    Ok(bin)
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child in its own process group, SIGKILLed (the group) and reaped on
/// drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        for _ in 0..500 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// === the collector ===

struct Collector {
    child: Group,
    port: u16,
    log: PathBuf,
    spans: PathBuf,
}

impl Collector {
    async fn start(bin: &Path, dir: &Path) -> Result<Collector> {
        let port = spire_lab::free_port()?;
        let spans = dir.join("spans.jsonl");
        let config = dir.join("otelcol.yaml");
        // Internal metrics off: they would listen on :8888.
        fs::write(
            &config,
            format!(
                "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:{port}\n\
                 processors:\n  batch:\n    timeout: 100ms\n\
                 exporters:\n  jsonfile:\n    path: {spans}\n  debug:\n    verbosity: basic\n\
                 service:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    traces:\n      \
                 receivers: [otlp]\n      processors: [batch]\n      exporters: [jsonfile, debug]\n",
                spans = spans.display()
            ),
        )?;
        let log = dir.join("otelcol.log");
        let out = fs::File::create(&log)?;
        let child = std::process::Command::new(bin)
            .arg(format!("--config=file:{}", config.display()))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut c = Collector {
            child: Group(child),
            port,
            log,
            spans,
        };
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            if let Some(status) = c.child.0.try_wait()? {
                bail!(
                    "the collector exited ({status}); its log:\n{}",
                    tail(&c.log, 30)
                );
            }
            if fs::read_to_string(&c.log)?.contains("Everything is ready")
                && tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            {
                return Ok(c);
            }
            ensure!(
                Instant::now() < deadline,
                "the collector is not ready after {WAIT_LIMIT:?}; its log:\n{}",
                tail(&c.log, 30)
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every span received so far, with its service name.
    fn spans(&self) -> Result<Vec<Span>> {
        let text = fs::read_to_string(&self.spans).unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let batch: Value = serde_json::from_str(line).context("a jsonfile line")?;
            for rs in batch["resourceSpans"].as_array().into_iter().flatten() {
                let service = attributes(&rs["resource"]["attributes"])
                    .remove("service.name")
                    .unwrap_or_default();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        out.push(Span {
                            service: service.clone(),
                            name: s["name"].as_str().unwrap_or_default().into(),
                            trace_id: s["traceId"].as_str().unwrap_or_default().into(),
                            span_id: s["spanId"].as_str().unwrap_or_default().into(),
                            parent: s["parentSpanId"].as_str().unwrap_or_default().into(),
                            attributes: attributes(&s["attributes"]),
                            links: s["links"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(|l| {
                                    (
                                        l["traceId"].as_str().unwrap_or_default().into(),
                                        l["spanId"].as_str().unwrap_or_default().into(),
                                    )
                                })
                                .collect(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One span as the collector received it; attribute values as text.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root.
    parent: String,
    attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
}

impl Span {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

/// OTLP/JSON attributes as key → text (`intValue`s are strings there).
fn attributes(list: &Value) -> BTreeMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            let key = kv["key"].as_str()?.to_string();
            let v = kv["value"].as_object()?.values().next()?;
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((key, text))
        })
        .collect()
}

// === the test ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_trace_holds_its_ladder_in_the_collector() -> Result<()> {
    let bin = otelcol_bin()?;
    let started = Instant::now();
    tokio::time::timeout(TEST_LIMIT, scenario(&bin))
        .await
        .with_context(|| format!("the trace scenario took longer than {TEST_LIMIT:?}"))??;
    println!("trace scenario: {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn scenario(bin: &Path) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("healer-traces").tempdir()?;
    let collector = Collector::start(bin, dir.path()).await?;

    let agent = crate::helpers::simulated_agent(dir.path(), "traces.healer")?;
    let socket = agent.socket().to_path_buf();
    let flag = dir.path().join("restart-flag");
    let config = dir.path().join("healer.toml");
    fs::write(
        &config,
        format!(
            r#"
[supervisor]
tick_interval = "250ms"

[database]
url = "sqlite://{db}"

[http]
enabled = false

[telemetry.otlp]
endpoint = "http://127.0.0.1:{port}"
timeout = "5s"
batch_delay = "200ms"

[[agents]]
name = "{AGENT}"
address = "unix://{sock}"
answer_timeout = "1s"
backoff_max = "1s"

[actuators.restart-agent]
type = "command"
argv = ["touch", "{flag}"]
timeout = "5s"
"#,
            db = dir.path().join("healer.db").display(),
            port = collector.port,
            sock = socket.display(),
            flag = flag.display(),
        ),
    )?;
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

    let log = dir.path().join("healer.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"));
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .env("RUST_LOG", "info")
        // The service name through the standard variable.
        .env("OTEL_SERVICE_NAME", SERVICE)
        .process_group(0);
    for var in [
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_BSP_MAX_QUEUE_SIZE",
    ] {
        cmd.env_remove(var);
    }
    let mut healer = Group(cmd.spawn().context("spawning spire-healer")?);

    // Healthy for a moment (its Workload API stream up), then the fault.
    wait_for("the healer's first ticks", || {
        Ok(fs::read_to_string(&log)?
            .contains("Exporting traces over OTLP/gRPC.")
            .then_some(()))
    })
    .await
    .with_context(|| format!("healer log:\n{}", tail(&log, 20)))?;
    sleep(Duration::from_secs(1)).await;
    agent.stop();

    // The incident closed, and the restart that healed it verified: both
    // spans end then, so the collector has them.
    let (incident, restart) = wait_for("the incident and its verified restart", || {
        let spans = collector.spans()?;
        let incident = spans.iter().find(|s| {
            s.name == "incident"
                && s.attr("symptom") == "agent_unreachable"
                && !s.attr("resolution").is_empty()
        });
        let Some(incident) = incident else {
            return Ok(None);
        };
        Ok(spans
            .iter()
            .find(|s| {
                s.name == "action"
                    && s.attr("incident.id") == incident.attr("incident.id")
                    && s.attr("actuator") == "restart-agent"
                    && !s.attr("verification").is_empty()
            })
            .map(|a| (incident.clone(), a.clone())))
    })
    .await
    .with_context(|| {
        format!(
            "collector log:\n{}\nhealer log:\n{}",
            tail(&collector.log, 20),
            tail(&log, 30)
        )
    })?;

    // A graceful stop flushes what is left (exit 0).
    kill(Pid::from_raw(healer.0.id() as i32), Signal::SIGTERM)?;
    let status = wait_for("the healer to exit", || Ok(healer.0.try_wait()?)).await?;
    ensure!(
        status.success(),
        "spire-healer exited with {status}; its log:\n{}",
        tail(&log, 30)
    );
    restarter.abort();

    let spans = collector.spans()?;
    println!("the collector received {} span(s):", spans.len());
    for s in &spans {
        println!(
            "  {} trace={} span={} parent={} links={} {:?}",
            s.name,
            s.trace_id,
            s.span_id,
            if s.parent.is_empty() { "-" } else { &s.parent },
            s.links.len(),
            s.attributes
        );
    }

    // The incident span: a root, with what it was about and how it ended.
    ensure!(incident.service == SERVICE, "service.name: {incident:?}");
    ensure!(
        incident.parent.is_empty(),
        "the incident span is a root: {incident:?}"
    );
    ensure!(
        incident.trace_id.len() == 32 && incident.span_id.len() == 16,
        "ids: {incident:?}"
    );
    for (key, want) in [
        ("symptom", "agent_unreachable"),
        ("resolution", "cleared"),
        ("resumed", "false"),
    ] {
        ensure!(incident.attr(key) == want, "{key} of {incident:?}");
    }
    ensure!(
        incident.attr("subject").contains(AGENT),
        "subject of {incident:?}"
    );
    ensure!(!incident.attr("incident.id").is_empty(), "{incident:?}");
    ensure!(!incident.attr("severity").is_empty(), "{incident:?}");
    // It links to the tick that opened it, a tick the collector received.
    ensure!(
        incident.links.iter().any(|(t, s)| spans
            .iter()
            .any(|x| x.name == "tick" && &x.trace_id == t && &x.span_id == s)),
        "the incident span links to no received tick: {incident:?}"
    );

    // Its ladder: every action of the incident is a child of its span, in
    // its trace; refetch first, then the restart that healed it.
    let actions: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "action" && s.attr("incident.id") == incident.attr("incident.id"))
        .collect();
    for a in &actions {
        ensure!(
            a.trace_id == incident.trace_id && a.parent == incident.span_id,
            "the action span is not a child of the incident span: {a:?}"
        );
        ensure!(!a.attr("action.id").is_empty(), "{a:?}");
        ensure!(a.attr("target") == AGENT, "target of {a:?}");
        ensure!(!a.attr("outcome").is_empty(), "outcome of {a:?}");
    }
    let ladder: Vec<(&str, &str)> = actions
        .iter()
        .map(|a| (a.attr("rung"), a.attr("actuator")))
        .collect();
    ensure!(
        ladder.contains(&("0", "refetch")) && ladder.contains(&("1", "restart-agent")),
        "the ladder refetch → restart-agent: {ladder:?}"
    );
    ensure!(
        restart.attr("outcome") == "ok" && restart.attr("verification") == "verified",
        "the restart: {restart:?}"
    );

    // A JSON log line carries the ids of a span the collector received:
    // "Incident opened." those of the incident span.
    let text = fs::read_to_string(&log)?;
    let lines: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("every log line is JSON")?;
    let opened = lines
        .iter()
        .find(|l| {
            l["message"] == "Incident opened." && l["incident"] == incident.attr("incident.id")
        })
        .context("no \"Incident opened.\" log line")?;
    ensure!(
        opened["trace_id"] == incident.trace_id.as_str()
            && opened["span_id"] == incident.span_id.as_str(),
        "the log line {opened} does not carry the incident span's ids"
    );
    let verified = lines
        .iter()
        .find(|l| l["message"] == "Action verified." && l["span_id"] == restart.span_id.as_str())
        .with_context(|| {
            format!(
                "no \"Action verified.\" log line of span {}",
                restart.span_id
            )
        })?;
    ensure!(
        verified["trace_id"] == incident.trace_id.as_str(),
        "{verified}"
    );
    // Every id a log line carries is one the collector received (idle ticks
    // are not exported, and no line names one).
    for l in lines.iter().filter(|l| l.get("span_id").is_some()) {
        ensure!(
            spans
                .iter()
                .any(|s| l["span_id"] == s.span_id.as_str() && l["trace_id"] == s.trace_id.as_str()),
            "the log line {l} names a span the collector did not receive"
        );
    }
    drop(collector);
    Ok(())
}

/// Polls `f` every 100 ms until it yields something (bounded).
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        ensure!(
            Instant::now() < deadline,
            "timed out after {WAIT_LIMIT:?} waiting for {what}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}
