//! `spire-healer demo`: the newcomer's first run, with no SPIRE installed.
//!
//! **A simulation**: an in-process Workload API server ([`crate::simulated::agent`])
//! speaking the real protocol on a temporary Unix socket, with rcgen-issued
//! SVIDs of a few seconds' lifetime. Faults are injected on a schedule; the
//! real supervisor (sensors, analyze, plan, actuators, SQLite store, HTTP)
//! runs against it. The "restart the agent" actuator is the real `command`
//! actuator running `touch <dir>/restart-<agent>`, which the simulation
//! treats as `systemctl restart spire-agent`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, SystemClock, saturating_since, unix_millis};
use crate::config::Config;
use crate::knowledge::{ActionRecord, IncidentRecord, Query, Store};
use crate::simulated::agent::FakeAgent;
use crate::simulated::issuer::{Flavor, TestCa};
use crate::telemetry::Metrics;

const AGENT: &str = "demo-agent";
const SPIFFE_ID: &str = "spiffe://demo.healer/workload/web";
const SVID_TTL: Duration = Duration::from_secs(8);

/// Demo policy: the default ladders with timings scaled to 8-second SVIDs.
const DEMO_POLICY: &str = r#"
[thresholds]
rotation_overdue_open = 0.65
rotation_overdue_close = 0.6
# The simulated agent rotates the moment it is told (no sync period).
rotation_check_slack = "0s"
expiring_open = 0.85
expiring_close = 0.8
unreachable_after = "0s"
max_staleness = "5s"

[guards]
cooldown = "2s"
budget_per_hour = 60

[[ladders.svid_rotation_overdue]]
actuator = "refetch"
timeout = "2s"
verify_within = "1s"
[[ladders.svid_rotation_overdue]]
actuator = "restart-agent"
timeout = "5s"
verify_within = "4s"

[[ladders.svid_expiring]]
actuator = "restart-agent"
timeout = "5s"
verify_within = "4s"

[[ladders.svid_expired]]
actuator = "restart-agent"
timeout = "5s"
verify_within = "4s"

[[ladders.svid_invalid]]
actuator = "refetch"
timeout = "2s"
verify_within = "1s"
[[ladders.svid_invalid]]
actuator = "restart-agent"
timeout = "5s"
verify_within = "4s"

[[ladders.agent_unreachable]]
actuator = "refetch"
timeout = "2s"
verify_within = "1s"
[[ladders.agent_unreachable]]
actuator = "restart-agent"
timeout = "5s"
verify_within = "4s"
"#;

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    RotationStuck,
    AgentDown,
    InvalidSvid,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::RotationStuck => "rotation stuck",
            Fault::AgentDown => "agent down",
            Fault::InvalidSvid => "invalid SVID (cA=true leaf)",
        }
    }
    fn symptom(self) -> &'static str {
        match self {
            Fault::RotationStuck => "svid_rotation_overdue",
            Fault::AgentDown => "agent_unreachable",
            Fault::InvalidSvid => "svid_invalid",
        }
    }
    fn inject(self, agent: &FakeAgent) {
        match self {
            Fault::RotationStuck => agent.set_rotation_stuck(true),
            Fault::AgentDown => agent.stop(),
            Fault::InvalidSvid => agent.serve_flavor(Flavor::CaLeaf),
        }
    }
}

/// Result of one fault.
#[derive(Debug, Clone)]
struct FaultResult {
    fault: Fault,
    detected: Option<Duration>,
    healed: Option<Duration>,
    verified: bool,
    actions: Vec<String>,
}

/// Runs the demo, writing the timeline and the final table to `out`.
/// Returns 0 only if every fault was healed and verified.
pub async fn run(duration: Duration, metrics_port: u16, out: &mut dyn Write) -> i32 {
    match run_inner(duration, metrics_port, out).await {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            let _ = writeln!(out, "demo failed to start: {e}");
            1
        }
    }
}

async fn run_inner(
    duration: Duration,
    metrics_port: u16,
    out: &mut dyn Write,
) -> anyhow::Result<bool> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let start = clock.now();
    let deadline = tokio::time::Instant::now() + duration;
    let dir = tempfile::Builder::new().prefix("healer-demo").tempdir()?;
    let socket = dir.path().join("agent.sock");
    let db = dir.path().join("healer.db");
    let restart_flag = dir.path().join(format!("restart-{AGENT}"));
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, DEMO_POLICY)?;
    let config_text = format!(
        r#"policy_file = "{policy}"

[supervisor]
tick_interval = "250ms"

[database]
url = "sqlite://{db}"

[http]
listen = "127.0.0.1:{metrics_port}"

[[agents]]
name = "{AGENT}"
address = "unix://{socket}"
answer_timeout = "1s"
backoff_max = "1s"

[actuators.restart-agent]
type = "command"
argv = ["touch", "{flag}"]
timeout = "5s"
"#,
        policy = policy_path.display(),
        db = db.display(),
        socket = socket.display(),
        flag = restart_flag.display(),
    );
    let config_path = dir.path().join("spire-healer.toml");
    std::fs::write(&config_path, &config_text)?;

    let _ = writeln!(
        out,
        "spire-healer demo: SIMULATION. No SPIRE is involved: an in-process fake agent\n\
         speaks the real Workload API on {socket} with {ttl}s SVIDs;\n\
         the real supervisor watches it and heals scheduled faults.\n\
         config: {config}\nstore:  {db}",
        socket = socket.display(),
        ttl = SVID_TTL.as_secs(),
        config = config_path.display(),
        db = db.display(),
    );

    let ca = TestCa::new(
        "demo.healer",
        start - Duration::from_secs(60),
        start + Duration::from_secs(3600),
    )?;
    let agent = Arc::new(FakeAgent::new(
        ca,
        SPIFFE_ID,
        SVID_TTL,
        clock.clone(),
        &socket,
    ));
    agent.start()?;

    let resolved = Config::from_toml(&config_text, &config_path.display().to_string())
        .map_err(|e| anyhow::anyhow!(e))?
        .validate(&|_| None)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let running = crate::app::start(
        &resolved,
        clock.clone(),
        metrics.clone(),
        shutdown.clone(),
        &tasks,
    )
    .await?;
    if let Some(addr) = running.http_addr {
        let _ = writeln!(out, "metrics: http://{addr}/metrics\n");
    }

    // The simulated "systemctl restart spire-agent".
    let ctl_agent = agent.clone();
    let ctl_flag = restart_flag.clone();
    let ctl_stop = shutdown.child_token();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = ctl_stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if std::fs::remove_file(&ctl_flag).is_ok() {
                let _ = ctl_agent.restart();
            }
        }
    });

    let mut timeline = Timeline::new(start);
    let store = running.store.clone();
    let mut results = Vec::new();
    // Let the first rotation happen before the first fault.
    sleep_watching(
        &mut timeline,
        &*store,
        out,
        Duration::from_secs(4),
        deadline,
    )
    .await;
    for fault in [Fault::RotationStuck, Fault::AgentDown, Fault::InvalidSvid] {
        if tokio::time::Instant::now() >= deadline {
            results.push(FaultResult {
                fault,
                detected: None,
                healed: None,
                verified: false,
                actions: vec![],
            });
            continue;
        }
        let injected = clock.now();
        timeline.say(
            out,
            injected,
            &format!(">>> inject fault: {}", fault.label()),
        );
        fault.inject(&agent);
        let r = watch_fault(fault, injected, &mut timeline, &*store, out, deadline).await;
        results.push(r);
        sleep_watching(
            &mut timeline,
            &*store,
            out,
            Duration::from_secs(2),
            deadline,
        )
        .await;
    }

    shutdown.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    agent.stop();

    let ok = results.iter().all(|r| r.healed.is_some() && r.verified);
    let fmt = |d: Option<Duration>| {
        d.map_or_else(|| "-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()))
    };
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.fault.label().to_string(),
                r.fault.symptom().to_string(),
                fmt(r.detected),
                fmt(r.healed),
                if r.verified { "yes" } else { "no" }.to_string(),
                r.actions.join(" → "),
            ]
        })
        .collect();
    let _ = writeln!(
        out,
        "\n{}\n",
        crate::term::table(
            &[
                "FAULT",
                "SYMPTOM",
                "DETECTED AFTER",
                "HEALED AFTER",
                "VERIFIED",
                "ACTIONS"
            ],
            &rows
        )
    );
    let _ = writeln!(
        out,
        "{}",
        if ok {
            "Every fault was detected, healed and verified."
        } else {
            "Some faults were not healed and verified within the demo's time."
        }
    );
    Ok(ok)
}

/// Prints store changes as they happen.
struct Timeline {
    start: SystemTime,
    /// Per incident: when it closed and when it was last found to need an
    /// operator, as already told.
    incidents: std::collections::HashMap<String, (Option<i64>, Option<i64>)>,
    actions: std::collections::HashMap<String, (Option<String>, Option<String>)>,
}

impl Timeline {
    fn new(start: SystemTime) -> Self {
        Self {
            start,
            incidents: Default::default(),
            actions: Default::default(),
        }
    }

    fn say(&self, out: &mut dyn Write, at: SystemTime, msg: &str) {
        let t = saturating_since(at, self.start).as_secs_f64();
        let _ = writeln!(out, "[{t:6.2}s] {msg}");
    }

    fn at(&self, ms: i64) -> SystemTime {
        crate::clock::from_unix_millis(ms)
    }

    async fn poll(
        &mut self,
        store: &dyn Store,
        out: &mut dyn Write,
    ) -> (Vec<IncidentRecord>, Vec<ActionRecord>) {
        let q = Query {
            limit: 200,
            ..Query::default()
        };
        let mut incidents = store.incidents(&q).await.unwrap_or_default();
        let mut actions = store.actions(&q).await.unwrap_or_default();
        incidents.reverse();
        actions.reverse();
        for i in &incidents {
            let prev = self.incidents.get(&i.id).copied();
            let (prev_closed, prev_operator) = prev.unwrap_or_default();
            if prev.is_none() {
                self.say(
                    out,
                    self.at(i.opened_at_ms),
                    &format!(
                        "incident opened: {} on {} ({})",
                        i.symptom, i.subject, i.severity
                    ),
                );
            }
            if let (Some(t), Some(reason)) = (i.needs_operator_at_ms, &i.needs_operator)
                && prev_operator != Some(t)
            {
                self.say(
                    out,
                    self.at(t),
                    &format!(
                        "incident needs an operator: {} on {}: {reason}",
                        i.symptom, i.subject
                    ),
                );
            }
            if let Some(c) = i.closed_at_ms
                && prev_closed.is_none()
            {
                self.say(
                    out,
                    self.at(c),
                    &format!(
                        "incident closed: {} after {:.2}s",
                        i.symptom,
                        (c - i.opened_at_ms) as f64 / 1000.0
                    ),
                );
            }
            self.incidents
                .insert(i.id.clone(), (i.closed_at_ms, i.needs_operator_at_ms));
        }
        for a in &actions {
            let prev = self.actions.get(&a.id).cloned();
            if prev.is_none() {
                self.say(
                    out,
                    self.at(a.started_at_ms),
                    &format!(
                        "action: {} on {} (rung {} for {})",
                        a.actuator, a.target, a.rung, a.symptom
                    ),
                );
            }
            let (po, pv) = prev.unwrap_or((None, None));
            if a.outcome.is_some() && po.is_none() {
                self.say(
                    out,
                    self.at(a.finished_at_ms.unwrap_or(a.started_at_ms)),
                    &format!(
                        "  {} finished: {}",
                        a.actuator,
                        a.outcome.as_deref().unwrap_or("")
                    ),
                );
            }
            if a.verification.is_some() && pv.is_none() {
                self.say(
                    out,
                    self.at(a.verified_at_ms.unwrap_or(a.started_at_ms)),
                    &format!(
                        "  {} verification: {}",
                        a.actuator,
                        a.verification.as_deref().unwrap_or("")
                    ),
                );
            }
            self.actions
                .insert(a.id.clone(), (a.outcome.clone(), a.verification.clone()));
        }
        (incidents, actions)
    }
}

async fn sleep_watching(
    timeline: &mut Timeline,
    store: &dyn Store,
    out: &mut dyn Write,
    d: Duration,
    deadline: tokio::time::Instant,
) {
    let until = (tokio::time::Instant::now() + d).min(deadline);
    while tokio::time::Instant::now() < until {
        timeline.poll(store, out).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the fault's incident opened after `injected` is closed and
/// its actions are verified (or the deadline).
async fn watch_fault(
    fault: Fault,
    injected: SystemTime,
    timeline: &mut Timeline,
    store: &dyn Store,
    out: &mut dyn Write,
    deadline: tokio::time::Instant,
) -> FaultResult {
    let mut r = FaultResult {
        fault,
        detected: None,
        healed: None,
        verified: false,
        actions: vec![],
    };
    let since = unix_millis(injected);
    loop {
        let (incidents, actions) = timeline.poll(store, out).await;
        let mine: Vec<&IncidentRecord> = incidents
            .iter()
            .filter(|i| i.symptom == fault.symptom() && i.opened_at_ms >= since)
            .collect();
        if let Some(first) = mine.first() {
            r.detected = Some(Duration::from_millis(
                (first.opened_at_ms - since).max(0) as u64
            ));
            let ids: Vec<&str> = mine.iter().map(|i| i.id.as_str()).collect();
            let acts: Vec<&ActionRecord> = actions
                .iter()
                .filter(|a| ids.contains(&a.incident_id.as_str()))
                .collect();
            r.actions = acts.iter().map(|a| a.actuator.clone()).collect();
            let all_closed = mine.iter().all(|i| i.closed_at_ms.is_some());
            let verified = acts
                .iter()
                .any(|a| a.verification.as_deref() == Some("verified"));
            let settled = acts.iter().all(|a| a.verification.is_some());
            if all_closed && settled {
                let closed = mine
                    .iter()
                    .filter_map(|i| i.closed_at_ms)
                    .max()
                    .unwrap_or(since);
                r.healed = Some(Duration::from_millis((closed - since).max(0) as u64));
                r.verified = verified;
                return r;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
