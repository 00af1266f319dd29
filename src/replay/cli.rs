//! `spire-healer replay --store URL --since T [--until T] --policy other.toml`:
//! runs analyze and plan over the recorded frames under another policy and
//! prints, side by side, what was done and what that policy would have
//! done.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use secrecy::ExposeSecret;

use super::compare::{Report, recorded_decisions};
use super::{RefetchPrecondition, ReplayError, Setup, replay};
use crate::actuators::{self, REFETCH, Registry};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError, EXIT_CONFIG, process_env};
use crate::knowledge::{self, StoreError};
use crate::policy::Policy;

/// Exit code when the store cannot be reached (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code when the replay itself fails.
const EXIT_FAILED: i32 = 1;

/// `replay`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The recorded knowledge store (`sqlite://PATH` or `postgres://…`);
    /// default: `SPIRE_HEALER_DATABASE_URL`, else the configuration's
    /// `database.url`.
    #[arg(long)]
    pub store: Option<String>,
    /// The configuration the recorded loop ran with: its agents, probes and
    /// actuators (their classes and preconditions; nothing is executed).
    #[arg(long, short, default_value = "spire-healer.toml")]
    pub config: PathBuf,
    /// Start of the interval: an RFC 3339 time (`2025-01-31T12:00:00Z`)
    /// or how long ago (`2h`, `7d`).
    #[arg(long)]
    pub since: String,
    /// End of the interval (exclusive), in the same forms; default: now.
    #[arg(long)]
    pub until: Option<String>,
    /// The policy to replay under.
    #[arg(long)]
    pub policy: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// How the report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The side-by-side table for people.
    Table,
    /// The whole report as JSON.
    Json,
}

/// Runs `replay`; returns the exit code: 0 done, 64 a bad argument,
/// configuration or policy, 69 the store cannot be read, 1 the replay
/// failed.
pub async fn run(args: ReplayArgs) -> i32 {
    crate::telemetry::init_logging(crate::telemetry::LogFormat::Pretty, "warn");
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    run_with(&args, &process_env, &SystemClock, &mut out, &mut err).await
}

/// [`run`] with its environment, clock and outputs injected.
pub(super) async fn run_with(
    args: &ReplayArgs,
    env: crate::config::Env<'_>,
    clock: &dyn Clock,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> i32 {
    let now = clock.now();
    let since = match when(&args.since, now) {
        Ok(t) => t,
        Err(e) => return usage(err, &format!("--since: {e}")),
    };
    let until = match args.until.as_deref().map(|u| when(u, now)).transpose() {
        Ok(t) => t.unwrap_or(now),
        Err(e) => return usage(err, &format!("--until: {e}")),
    };
    if since >= until {
        return usage(err, "--since must be before --until");
    }
    let config = match read_config(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            let _ = writeln!(
                err,
                "{}: {} problem(s):",
                args.config.display(),
                errors.len()
            );
            for e in errors {
                let _ = writeln!(err, "  - {e}");
            }
            return EXIT_CONFIG;
        }
    };
    let policy = match Policy::load(&args.policy) {
        Ok(p) => p,
        Err(e) => return usage(err, &e.to_string()),
    };
    let problems = policy.problems();
    if !problems.is_empty() {
        let _ = writeln!(
            err,
            "{}: {} problem(s):",
            args.policy.display(),
            problems.len()
        );
        for p in problems {
            let _ = writeln!(err, "  - {p}");
        }
        return EXIT_CONFIG;
    }
    let url = args
        .store
        .clone()
        .or_else(|| env("SPIRE_HEALER_DATABASE_URL"))
        .unwrap_or_else(|| config.database.url.expose_secret().to_string());
    // Reading never creates or migrates a store.
    let (store, frames) = match knowledge::frames::open_existing(&url).await {
        Ok(s) => s,
        Err(e) => return store_failed(err, &e),
    };
    let setup = setup(&config, policy);
    let replayed = match replay(&frames, &setup, since, until).await {
        Ok(r) => r,
        Err(ReplayError::Store(e)) => return store_failed(err, &e),
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return EXIT_FAILED;
        }
    };
    let recorded = recorded_decisions(
        &*store,
        crate::clock::unix_millis(since),
        crate::clock::unix_millis(until),
    )
    .await;
    let (recorded, complete) = match recorded {
        Ok(r) => r,
        Err(e) => return store_failed(err, &e),
    };
    let report = Report::new(
        &args.policy.display().to_string(),
        since,
        until,
        replayed,
        recorded,
        complete,
    );
    let text = match args.output {
        Format::Table => report.table(),
        Format::Json => match serde_json::to_string_pretty(&report) {
            Ok(j) => j + "\n",
            Err(e) => {
                let _ = writeln!(err, "error: cannot encode the report: {e}");
                return EXIT_FAILED;
            }
        },
    };
    let _ = out.write_all(text.as_bytes());
    0
}

fn usage(err: &mut dyn std::io::Write, problem: &str) -> i32 {
    let _ = writeln!(err, "error: {problem}");
    EXIT_CONFIG
}

fn store_failed(err: &mut dyn std::io::Write, e: &StoreError) -> i32 {
    let _ = writeln!(err, "error: {e}");
    match e {
        StoreError::Config(_) => EXIT_CONFIG,
        _ => EXIT_UNAVAILABLE,
    }
}

/// An RFC 3339 time, or a duration before `now`.
fn when(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    match humantime::parse_duration(text) {
        Ok(d) => now
            .checked_sub(d)
            .ok_or_else(|| format!("{text:?} reaches before 1970")),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2025-01-31T12:00:00Z) nor a duration ago (2h)"
        )),
    }
}

/// The configuration file, parsed but not validated: a post-mortem may run
/// where its sockets and files do not exist.
fn read_config(path: &std::path::Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        }]
    })?;
    Config::parse(&text, &path.display().to_string())
}

/// The replay's setup from the recorded loop's configuration: its agents,
/// probes (the peers) and actuators (built as the daemon builds them; the
/// built-in refetch, which needs live streams, by its precondition only).
pub fn setup(config: &Config, policy: Policy) -> Setup {
    let agents: Vec<String> = config.agents.iter().map(|a| a.name.clone()).collect();
    let topo = Arc::new(actuators::spire::Topology {
        servers: config
            .servers
            .iter()
            .map(|s| (s.name.clone(), s.admin_socket.clone(), s.address.clone()))
            .collect(),
        agents: config
            .agents
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    actuators::spire::AgentInfo {
                        config_file: a.config_file.clone(),
                        node_alias: a.node_alias.clone(),
                        data_dir: a.data_dir.clone(),
                        endpoint: None,
                    },
                )
            })
            .collect(),
    });
    // Every replayed step is a dry run: the Kubernetes client is never
    // built (it is built on first use), but its actuators are there to
    // be planned with.
    let kube = config.kubernetes.clone().map(|k| {
        Arc::new(crate::k8s::Kube::new(
            k,
            Arc::new(crate::telemetry::Metrics::new()),
            Arc::new(crate::clock::SystemClock),
        ))
    });
    let mut registry: Registry = actuators::registry(&config.actuators, topo, HashMap::new(), kube);
    registry.insert(
        REFETCH.to_string(),
        Arc::new(RefetchPrecondition::new(agents.iter().cloned())),
    );
    Setup {
        policy,
        actuators: registry,
        agents,
        peers: config
            .probes
            .iter()
            .map(|p| p.name.clone())
            .chain(
                config
                    .kubernetes
                    .iter()
                    .flat_map(|k| k.workloads.iter().map(|w| w.name.clone())),
            )
            .collect(),
    }
}
