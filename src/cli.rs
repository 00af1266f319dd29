//! Command line: `run`, `check-config`, `demo`, `report`, and the
//! operator commands over the API (`status`, `incidents`, `incident`,
//! `actions`, `holds`, `approvals`, `audit`, `watch`, `approve`, `reject`,
//! `pause`, `resume`, `dry-run`, `reset-demotion`; see [`api`]). With
//! `--store URL`, `incidents`, `incident`, `actions`, `holds` and `audit`
//! read the knowledge store instead, for post-mortems with the daemon
//! down; no API is called then.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError, EXIT_CONFIG, Resolved, process_env};
use crate::knowledge::{self, Query};
use crate::telemetry::{LogFormat, Metrics, init_logging};
use crate::term::{reload_signal, shutdown_signal, table, watch_reload};

pub mod api;
pub mod render;

use render::rfc3339_millis;

use api::{ApiArgs, Call, OnOff, PageArgs};

/// Exit code when a needed service (the database) is unavailable (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code when the shutdown grace cut running actions short (they are
/// recorded as interrupted; their process groups were killed).
pub const EXIT_CUT_SHORT: i32 = 1;
/// Exit code when another instance acts on the same store or agents
/// (EX_TEMPFAIL: try again once it has stopped).
pub const EXIT_IN_USE: i32 = 75;

/// spire-healer: a self-healing supervisor for SPIFFE/SPIRE.
#[derive(Debug, Parser)]
#[command(name = "spire-healer", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the supervisor until SIGINT/SIGTERM.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "spire-healer.toml")]
        config: PathBuf,
        /// When another instance acts on this scope, wait as a standby and
        /// take over once it stops, instead of exiting 75.
        #[arg(long)]
        standby: bool,
    },
    /// Validate a configuration file and print every problem.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short, default_value = "spire-healer.toml")]
        config: PathBuf,
    },
    /// A simulated first run: a fake agent, scheduled faults, the real loop.
    Demo {
        /// Upper bound for the whole demo.
        #[arg(long, default_value = "50s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Port for /metrics during the demo (0: any free port).
        #[arg(long, default_value_t = 0)]
        metrics_port: u16,
    },
    /// What the supervisor sees now: subjects at risk, controls, pending
    /// approvals, demoted steps.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Incidents, newest first.
    Incidents {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        store: StoreFlag,
        /// Only open incidents.
        #[arg(long)]
        open: bool,
        /// Only this symptom.
        #[arg(long)]
        symptom: Option<String>,
    },
    /// One incident with its actions, holds, approvals and decisions.
    Incident {
        /// The incident's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        store: StoreFlag,
    },
    /// Remediation actions, newest first.
    Actions {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        store: StoreFlag,
        /// Only actions for this incident.
        #[arg(long)]
        incident: Option<String>,
    },
    /// "Held back, because" decisions, newest first.
    Holds {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        store: StoreFlag,
        /// Only holds of this incident.
        #[arg(long)]
        incident: Option<String>,
    },
    /// Steps waiting for (or given) a person's decision.
    Approvals {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        page: PageArgs,
        /// Only pending approvals.
        #[arg(long)]
        pending: bool,
        /// Only approvals of this incident.
        #[arg(long)]
        incident: Option<String>,
    },
    /// Every decision and who made it, newest first.
    Audit {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        store: StoreFlag,
        /// Only decisions on this incident.
        #[arg(long)]
        incident: Option<String>,
        /// Only these kinds (repeatable): acted, held, pending, approved, …
        #[arg(long = "kind")]
        kinds: Vec<String>,
    },
    /// Incident, action, hold, approval and control events as they happen.
    Watch {
        #[command(flatten)]
        api: ApiArgs,
        /// Resume after this event (the `cursor` of an earlier one).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Approve a pending step.
    Approve {
        /// The approval's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        /// Recorded with the approval.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a pending step (the ladder moves on).
    Reject {
        /// The approval's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        /// Why; recorded.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop starting actions (observation, analysis and recording go on;
    /// running actions finish). Survives restarts.
    Pause {
        #[command(flatten)]
        api: ApiArgs,
        /// Why; recorded and shown by `status`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a pause.
    Resume {
        #[command(flatten)]
        api: ApiArgs,
        /// Why; recorded.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Turn dry run on (decisions recorded, nothing executed) or off.
    DryRun {
        /// on or off.
        #[arg(value_enum)]
        state: OnOff,
        #[command(flatten)]
        api: ApiArgs,
        /// Why; recorded.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a demoted (symptom, actuator) step run again.
    ResetDemotion {
        /// The symptom, e.g. agent_unreachable.
        symptom: String,
        /// The actuator, e.g. restart-agent.
        actuator: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Report handshake outcomes to a running spire-healer over its API
    /// socket (for scripts and sidecars without a gRPC client).
    Report {
        /// The API socket (`[api] socket`).
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Target (peer) name.
        #[arg(long)]
        target: String,
        /// Outcome: ok, expired, not_yet_valid, unknown_ca, bad_spiffe_id,
        /// no_client_cert, refused, timeout or protocol.
        #[arg(long)]
        reason: String,
        /// How many such outcomes.
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Replay recorded history under another policy: what was done, and
    /// what that policy would have done, side by side.
    Replay(crate::replay::ReplayArgs),
}

/// `--store URL`: read the knowledge store instead of calling the API.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreFlag {
    /// Read this knowledge store (database URL) directly instead of
    /// calling the API: post-mortems with the daemon down.
    #[arg(long = "store", alias = "database", value_name = "URL")]
    pub url: Option<String>,
}

/// Where to read history from.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Configuration file (its `database.url` is used).
    #[arg(long, short, default_value = "spire-healer.toml")]
    pub config: PathBuf,
    /// Database URL; overrides the config file.
    #[arg(long)]
    pub database: Option<String>,
    /// Rows to show.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Output format of listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// A JSON array for scripts.
    Json,
}

/// Runs the parsed command; returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    match cli.command {
        Command::CheckConfig { config } => check_config(&config, &mut std::io::stdout()),
        Command::Run { config, standby } => run(&config, cli.log_format, standby).await,
        Command::Demo {
            duration,
            metrics_port,
        } => {
            init_logging(cli.log_format, "warn");
            crate::demo::run(duration, metrics_port, &mut std::io::stdout()).await
        }
        Command::Status { api } => run_api(&api, Call::Status).await,
        Command::Incidents {
            api,
            page,
            store,
            open,
            symptom,
        } => {
            let call = |page| Call::Incidents {
                open,
                symptom,
                page,
            };
            store_or_api(&api, page, &store, Listing::Incidents { open }, call).await
        }
        Command::Incident { id, api, store } => {
            let page = PageArgs {
                limit: 1000,
                page_token: None,
            };
            let listing = Listing::Incident { id: id.clone() };
            store_or_api(&api, page, &store, listing, |_| Call::Incident { id }).await
        }
        Command::Actions {
            api,
            page,
            store,
            incident,
        } => {
            let listing = Listing::Actions {
                incident: incident.clone(),
            };
            store_or_api(&api, page, &store, listing, |page| Call::Actions {
                incident,
                page,
            })
            .await
        }
        Command::Holds {
            api,
            page,
            store,
            incident,
        } => {
            let listing = Listing::Holds {
                incident: incident.clone(),
            };
            store_or_api(&api, page, &store, listing, |page| Call::Holds {
                incident,
                page,
            })
            .await
        }
        Command::Approvals {
            api,
            page,
            pending,
            incident,
        } => {
            run_api(
                &api,
                Call::Approvals {
                    pending,
                    incident,
                    page,
                },
            )
            .await
        }
        Command::Audit {
            api,
            page,
            store,
            incident,
            kinds,
        } => {
            let listing = Listing::Audit {
                incident: incident.clone(),
                kinds: kinds.clone(),
            };
            let call = |page| Call::Audit {
                incident,
                kinds,
                page,
            };
            store_or_api(&api, page, &store, listing, call).await
        }
        Command::Watch { api, cursor } => run_api(&api, Call::Watch { cursor }).await,
        Command::Approve { id, api, comment } => run_api(&api, Call::Approve { id, comment }).await,
        Command::Reject { id, api, reason } => run_api(&api, Call::Reject { id, reason }).await,
        Command::Pause { api, reason } => run_api(&api, Call::Pause { reason }).await,
        Command::Resume { api, reason } => run_api(&api, Call::Resume { reason }).await,
        Command::DryRun { state, api, reason } => {
            run_api(&api, Call::DryRun { state, reason }).await
        }
        Command::ResetDemotion {
            symptom,
            actuator,
            api,
        } => run_api(&api, Call::ResetDemotion { symptom, actuator }).await,
        Command::Report {
            socket,
            target,
            reason,
            count,
        } => report(&socket, &target, &reason, count).await,
        Command::Replay(args) => crate::replay::run(args).await,
    }
}

/// Parses the command line; a usage error exits 64 (help and version 0).
pub fn parse() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.exit_code() == 0 {
            0
        } else {
            api::EXIT_USAGE
        })
    })
}

async fn run_api(args: &ApiArgs, call: Call) -> i32 {
    api::run(args, call, &mut std::io::stdout()).await
}

/// Lists from the store when `--store` was given, else calls the API with
/// the call `call` makes of the paging flags.
async fn store_or_api(
    api: &ApiArgs,
    page: PageArgs,
    store: &StoreFlag,
    listing: Listing,
    call: impl FnOnce(PageArgs) -> Call,
) -> i32 {
    match store_args(api, &page, store) {
        Some(Ok(s)) => list(&s, listing).await,
        Some(Err(code)) => code,
        None => run_api(api, call(page)).await,
    }
}

/// The store reader's arguments when `--store` was given (`None`: call the
/// API); `Err(64)` when an API-only flag was given with it.
fn store_args(api: &ApiArgs, page: &PageArgs, store: &StoreFlag) -> Option<Result<StoreArgs, i32>> {
    let url = store.url.clone()?;
    if page.page_token.is_some() {
        eprintln!("error: --page-token pages through the API; with --store, use --limit");
        return Some(Err(api::EXIT_USAGE));
    }
    Some(Ok(StoreArgs {
        config: api
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("spire-healer.toml")),
        database: Some(url),
        limit: page.limit,
        output: api.output,
    }))
}

/// `spire-healer report`: one batch with one report. Exit 0 when accepted,
/// 64 on a bad argument, 65 when the server did not count the report (it
/// says why), 69 when the API is unreachable, 77 when refused.
async fn report(socket: &std::path::Path, target: &str, reason: &str, count: u64) -> i32 {
    let Some(reason) = crate::handshake::Reason::parse(reason) else {
        eprintln!("error: unknown reason {reason:?}");
        return 64;
    };
    if target.is_empty() || target.len() > crate::handshake::MAX_TARGET_LEN {
        eprintln!(
            "error: the target must be 1 to {} bytes long",
            crate::handshake::MAX_TARGET_LEN
        );
        return 64;
    }
    let client = match crate::api::ReportClient::connect_unix(socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}: {e}", socket.display());
            return 69;
        }
    };
    let batch = crate::proto::healer::ReportHandshakesRequest {
        reports: vec![crate::api::reports::report(target, reason, count)],
    };
    match client.report(futures::stream::iter([batch])).await {
        Ok(r) if r.rejected == 0 => {
            println!("accepted {}", r.accepted);
            0
        }
        Ok(r) => {
            eprintln!(
                "error: {} report(s) not counted by the server at {}: the count is over its \
                 max_count_per_report, or it already tracks its maximum number of targets \
                 (spire_healer_handshake_reports_rejected_total{{kind}} says which)",
                r.rejected,
                socket.display()
            );
            65
        }
        Err(status) => {
            eprintln!(
                "error: {}: {}: {}",
                socket.display(),
                status.code(),
                status.message()
            );
            match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => 77,
                tonic::Code::Unavailable => 69,
                _ => 1,
            }
        }
    }
}

/// Loads and validates; prints every problem. `Err(exit code)` on failure.
fn load(path: &std::path::Path, out: &mut dyn Write) -> Result<Resolved, i32> {
    Config::check_file(path, &process_env).map_err(|errors| {
        print_problems(path, &errors, out);
        EXIT_CONFIG
    })
}

/// `<file>: N problem(s):` and one item per problem; the lines of a
/// multi-line problem (a syntax error's caret diagram) stay indented under
/// it.
fn print_problems(path: &std::path::Path, errors: &[ConfigError], out: &mut dyn Write) {
    let _ = writeln!(out, "{}: {} problem(s):", path.display(), errors.len());
    for e in errors {
        let text = e.to_string();
        let mut lines = text.lines();
        let _ = writeln!(out, "  - {}", lines.next().unwrap_or(""));
        for line in lines {
            let _ = writeln!(out, "    {line}");
        }
    }
}

/// `check-config`.
pub fn check_config(path: &std::path::Path, out: &mut dyn Write) -> i32 {
    match load(path, out) {
        Ok(r) => {
            for w in &r.warnings {
                let _ = writeln!(out, "warning: {w}");
            }
            let _ = writeln!(
                out,
                "{}: OK ({} agent(s), {} actuator(s), dry_run = {})",
                path.display(),
                r.config.agents.len(),
                r.config.actuators.len() + 1,
                r.config.supervisor.dry_run
            );
            0
        }
        Err(code) => code,
    }
}

/// How long the last spans may take to reach the collector at exit.
const TRACE_FLUSH: Duration = Duration::from_secs(5);

async fn run(path: &std::path::Path, format: LogFormat, standby: bool) -> i32 {
    // Until the configuration says whether traces are exported, logs go
    // through a subscriber of this thread only (`load` does not await).
    let early = crate::telemetry::tracing::init_scoped(format, "info");
    let resolved = match format {
        LogFormat::Pretty => load(path, &mut std::io::stderr()),
        // Every line on stderr is JSON: one log event per problem.
        LogFormat::Json => Config::check_file(path, &process_env).map_err(|errors| {
            for e in &errors {
                tracing::error!(config = %path.display(), problem = %e, "Configuration problem.");
            }
            tracing::error!(config = %path.display(), problems = errors.len(), "{} problem(s) in the configuration; not starting.", errors.len());
            EXIT_CONFIG
        }),
    };
    drop(early);
    let resolved = match resolved {
        Ok(r) => r,
        Err(code) => return code,
    };
    let metrics = Arc::new(Metrics::new());
    let traces =
        match crate::telemetry::tracing::init(format, "info", resolved.otlp.as_ref(), &metrics) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "Cannot export traces.");
                return EXIT_CONFIG;
            }
        };
    if let Some(otlp) = &resolved.otlp {
        info!(endpoint = %otlp.endpoint, service = %otlp.service_name, "Exporting traces over OTLP/gRPC.");
    }
    for w in &resolved.warnings {
        warn!(warning = %w, "Configuration warning.");
    }
    let code = serve(path, &resolved, metrics, standby).await;
    // The loop has stopped and dropped its spans: they are queued now.
    traces.shutdown(TRACE_FLUSH).await;
    code
}

/// How often a standby tries to take the scope.
const STANDBY_RETRY: Duration = Duration::from_secs(5);

/// Starts the daemon from `resolved` and runs it until a signal or a
/// critical failure; returns the exit code. With `standby`, a scope held
/// by another instance is waited for rather than an exit 75.
async fn serve(
    path: &std::path::Path,
    resolved: &Resolved,
    metrics: Arc<Metrics>,
    standby: bool,
) -> i32 {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Watched before anything starts, so a HUP never terminates us.
    let mut hup = watch_reload();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut waiting = false;
    let running = loop {
        // A cluster instance stands by inside `start` until it leads: a
        // signal meanwhile ends it cleanly.
        let started = tokio::select! {
            r = crate::app::start(
                resolved,
                clock.clone(),
                metrics.clone(),
                shutdown.clone(),
                &tasks,
            ) => r,
            _ = &mut stop => {
                info!("Received shutdown signal while starting or standing by.");
                shutdown.cancel();
                return 0;
            }
        };
        match started {
            Ok(r) => break r,
            Err(crate::app::StartError::Store(crate::knowledge::StoreError::InUse(holder)))
                if standby =>
            {
                if !waiting {
                    warn!(%holder, "Standby: another instance acts on this scope; taking over once it stops.");
                    waiting = true;
                }
                tokio::select! {
                    _ = &mut stop => {
                        info!("Received shutdown signal while standing by.");
                        return 0;
                    }
                    _ = tokio::time::sleep(STANDBY_RETRY) => {}
                }
            }
            Err(e) => {
                // Logged once (stderr, in the chosen log format), not also printed.
                tracing::error!(error = %e, "Cannot start.");
                return start_exit_code(&e);
            }
        }
    };
    if waiting {
        info!("Standby over: this instance now acts on the scope.");
    }
    loop {
        tokio::select! {
            _ = &mut stop => {
                info!("Received shutdown signal.");
                break;
            }
            _ = shutdown.cancelled() => break,
            _ = reload_signal(&mut hup) => reload(path, resolved, &running.policy),
        }
    }
    shutdown.cancel();
    tasks.close();
    // The loop cuts running actions short at 3/4 of the grace; what it
    // records about them then gets a bounded flush (10 attempts of 400 ms).
    let drain = Duration::from_secs(5);
    let elapsed = tokio::time::timeout(
        resolved.config.supervisor.shutdown_grace + drain,
        tasks.wait(),
    )
    .await
    .is_err();
    if elapsed {
        warn!("Shutdown grace period elapsed.");
    }
    let cut = running
        .interrupted
        .load(std::sync::atomic::Ordering::SeqCst);
    if cut > 0 || elapsed {
        warn!(interrupted = cut, "Stopped with actions cut short.");
        return EXIT_CUT_SHORT;
    }
    if running.lock_lost.load(std::sync::atomic::Ordering::SeqCst) {
        return EXIT_UNAVAILABLE;
    }
    0
}

/// The exit code of a failed start: 75 when another instance holds the
/// store, the agents or the API socket; 64 when the database refused our
/// login or database name, or the store location is unusable (the
/// configuration must change); 69 when a dependency is unavailable.
fn start_exit_code(e: &crate::app::StartError) -> i32 {
    use crate::app::StartError;
    use crate::knowledge::StoreError;
    match e {
        StartError::Store(StoreError::InUse(_))
        | StartError::Api(crate::api::ApiError::InUse { .. }) => EXIT_IN_USE,
        StartError::Store(StoreError::Config(_)) => EXIT_CONFIG,
        _ => EXIT_UNAVAILABLE,
    }
}

/// SIGHUP: reads the configuration and policy again. A valid policy is
/// applied from the next tick; a file with problems is rejected with each
/// one logged, and the running configuration is kept. Sections that only a
/// restart applies are named.
fn reload(
    path: &std::path::Path,
    running: &Resolved,
    policy: &tokio::sync::watch::Sender<crate::policy::Policy>,
) {
    info!(config = %path.display(), "Reloading (SIGHUP).");
    let next = match Config::check_file(path, &process_env) {
        Ok(next) => next,
        Err(errors) => {
            // One line per problem: a caret diagram does not fit a log line.
            let listed: Vec<String> = errors
                .iter()
                .map(|e| e.to_string().lines().next().unwrap_or("").to_string())
                .collect();
            warn!(
                problems = %listed.join("; "),
                count = listed.len(),
                "Reload rejected; the running configuration is kept."
            );
            return;
        }
    };
    let restart = running.config.restart_needed(&next.config);
    if !restart.is_empty() {
        warn!(
            sections = %restart.join(", "),
            "These configuration changes take effect at the next restart."
        );
    }
    if *policy.borrow() == next.policy {
        info!("Policy unchanged.");
    } else {
        policy.send_replace(next.policy);
        info!("Policy reloaded; it applies from the next tick.");
    }
}

/// What [`list`] reads from the store.
pub enum Listing {
    /// Incidents.
    Incidents {
        /// Only open ones.
        open: bool,
    },
    /// One incident with its actions, holds, approvals and audit.
    Incident {
        /// Its id.
        id: String,
    },
    /// Actions.
    Actions {
        /// Only this incident's.
        incident: Option<String>,
    },
    /// Holds.
    Holds {
        /// Only this incident's.
        incident: Option<String>,
    },
    /// Audit entries.
    Audit {
        /// Only this incident's.
        incident: Option<String>,
        /// Only these kinds.
        kinds: Vec<String>,
    },
}

/// Reads `what` from the store `args` names and prints it; returns the
/// exit code (64 for an unusable store location or config, 65 for an
/// unknown incident, 69 when the store does not answer).
pub async fn list(args: &StoreArgs, what: Listing) -> i32 {
    let url = match &args.database {
        Some(u) => u.clone(),
        None => match std::fs::read_to_string(&args.config)
            .map_err(|e| {
                vec![ConfigError::Read {
                    path: args.config.display().to_string(),
                    reason: e.to_string(),
                }]
            })
            .and_then(|text| Config::parse(&text, &args.config.display().to_string()))
        {
            Ok(c) => process_env("SPIRE_HEALER_DATABASE_URL")
                .unwrap_or_else(|| c.database.url.expose_secret().to_string()),
            Err(errors) => {
                print_problems(&args.config, &errors, &mut std::io::stderr());
                return EXIT_CONFIG;
            }
        },
    };
    // Reading never creates or migrates a store.
    let store = match knowledge::open_existing(&url).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                knowledge::StoreError::Config(_) => EXIT_CONFIG,
                _ => EXIT_UNAVAILABLE,
            };
        }
    };
    let mut q = Query {
        limit: args.limit,
        ..Query::default()
    };
    let mut out = std::io::stdout();
    let res = match what {
        Listing::Incidents { open } => {
            q.open_only = open;
            store.incidents(&q).await.map(|rows| match args.output {
                Output::Json => serde_json::to_string_pretty(&rows).unwrap_or_default(),
                Output::Table => incidents_table(&rows),
            })
        }
        Listing::Actions { incident } => {
            q.incident_id = incident;
            store.actions(&q).await.map(|rows| match args.output {
                Output::Json => serde_json::to_string_pretty(&rows).unwrap_or_default(),
                Output::Table => actions_table(&rows),
            })
        }
        Listing::Holds { incident } => {
            q.incident_id = incident;
            store.holds(&q).await.map(|rows| match args.output {
                Output::Json => serde_json::to_string_pretty(&rows).unwrap_or_default(),
                Output::Table => holds_table(&rows),
            })
        }
        Listing::Audit { incident, kinds } => {
            q.incident_id = incident;
            q.kinds = kinds;
            store.audit(&q).await.map(|rows| match args.output {
                Output::Json => serde_json::to_string_pretty(&rows).unwrap_or_default(),
                Output::Table => audit_table(&rows),
            })
        }
        Listing::Incident { id } => match incident_from_store(&*store, &id, q).await {
            Ok(Some(records)) => Ok(match args.output {
                Output::Json => serde_json::to_string_pretty(&records).unwrap_or_default(),
                Output::Table => incident_store_text(&records),
            }),
            Ok(None) => {
                eprintln!("error: no incident {id:?} in the store");
                return api::EXIT_DATA;
            }
            Err(e) => Err(e),
        },
    };
    match res {
        Ok(text) => {
            let _ = writeln!(out, "{text}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_UNAVAILABLE
        }
    }
}

/// One incident and everything recorded about it, from the store.
#[derive(Debug, serde::Serialize)]
struct IncidentRecords {
    incident: knowledge::IncidentRecord,
    actions: Vec<knowledge::ActionRecord>,
    holds: Vec<knowledge::HoldRecord>,
    approvals: Vec<knowledge::ApprovalRecord>,
    timeline: Vec<knowledge::AuditRecord>,
}

async fn incident_from_store(
    store: &dyn knowledge::Store,
    id: &str,
    mut q: Query,
) -> Result<Option<IncidentRecords>, knowledge::StoreError> {
    let Some(incident) = store.incident(id).await? else {
        return Ok(None);
    };
    q.incident_id = Some(id.to_string());
    // Oldest first, as the API gives them.
    let mut actions = store.actions(&q).await?;
    actions.reverse();
    let mut holds = store.holds(&q).await?;
    holds.reverse();
    let mut approvals = store.approvals(&q).await?;
    approvals.reverse();
    let mut timeline = store.audit(&q).await?;
    timeline.reverse();
    Ok(Some(IncidentRecords {
        incident,
        actions,
        holds,
        approvals,
        timeline,
    }))
}

fn incident_store_text(r: &IncidentRecords) -> String {
    let mut out = incidents_table(std::slice::from_ref(&r.incident));
    if !r.actions.is_empty() {
        out.push_str("\n\nACTIONS\n");
        out.push_str(&actions_table(&r.actions));
    }
    if !r.holds.is_empty() {
        out.push_str("\n\nHOLDS\n");
        out.push_str(&holds_table(&r.holds));
    }
    if !r.approvals.is_empty() {
        let rows: Vec<Vec<String>> = r
            .approvals
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    a.state.clone(),
                    a.actuator.clone(),
                    a.target.clone(),
                    rfc3339_millis(a.requested_at_ms),
                    a.decided_by.clone().unwrap_or_default(),
                    a.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str("\n\nAPPROVALS\n");
        out.push_str(&table(
            &[
                "ID",
                "STATE",
                "ACTUATOR",
                "TARGET",
                "REQUESTED",
                "DECIDED BY",
                "REASON",
            ],
            &rows,
        ));
    }
    if !r.timeline.is_empty() {
        out.push_str("\n\nTIMELINE\n");
        out.push_str(&audit_table(&r.timeline));
    }
    out
}

fn holds_table(rows: &[knowledge::HoldRecord]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                rfc3339_millis(r.at_ms),
                r.incident_id.clone(),
                r.actuator.clone(),
                r.target.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    table(&["AT", "INCIDENT", "ACTUATOR", "TARGET", "REASON"], &body)
}

fn audit_table(rows: &[knowledge::AuditRecord]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                rfc3339_millis(r.at_ms),
                r.kind.clone(),
                r.actor.clone(),
                r.incident_id.clone().unwrap_or_default(),
                r.actuator.clone().unwrap_or_default(),
                r.target.clone().unwrap_or_default(),
                r.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "AT", "KIND", "ACTOR", "INCIDENT", "ACTUATOR", "TARGET", "REASON",
        ],
        &body,
    )
}

fn incidents_table(rows: &[knowledge::IncidentRecord]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.symptom.clone(),
                r.subject.clone(),
                r.severity.clone(),
                rfc3339_millis(r.opened_at_ms),
                r.closed_at_ms.map_or_else(|| "open".into(), rfc3339_millis),
                r.closed_at_ms.map_or_else(String::new, |c| {
                    format!("{:.1}s", (c - r.opened_at_ms) as f64 / 1000.0)
                }),
                // Last: a sentence, of any length.
                r.needs_operator.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SYMPTOM",
            "SUBJECT",
            "SEVERITY",
            "OPENED",
            "CLOSED",
            "DURATION",
            "NEEDS OPERATOR",
        ],
        &body,
    )
}

fn actions_table(rows: &[knowledge::ActionRecord]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.symptom.clone(),
                r.rung.to_string(),
                r.actuator.clone(),
                r.target.clone(),
                rfc3339_millis(r.started_at_ms),
                r.outcome.clone().unwrap_or_else(|| "running".into()),
                r.verification.clone().unwrap_or_default(),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "SYMPTOM", "RUNG", "ACTUATOR", "TARGET", "STARTED", "OUTCOME", "VERIFIED",
            "ERROR",
        ],
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_config_lists_every_error_and_exits_64() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[supervisor]\ntick_interval = \"0s\"\n[[agents]]\nname = \"a\"\naddress = \"unix://rel\"\n",
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(check_config(&path, &mut out), EXIT_CONFIG);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("2 problem(s)"), "{text}");
        assert!(text.contains("supervisor.tick_interval"), "{text}");
        assert!(text.contains("agents[0].address"), "{text}");
    }

    #[test]
    fn incident_listings_show_needs_operator() {
        let open = knowledge::IncidentRecord {
            id: "inc-1".into(),
            symptom: "agent_banned".into(),
            subject: "agent:node-a".into(),
            severity: "critical".into(),
            opened_at_ms: 1_700_000_000_000,
            closed_at_ms: None,
            resolution: None,
            predicted_outage_ms: None,
            evidence: serde_json::json!({}),
            next_rung: 2,
            needs_operator: Some("agent-evict futile 3 times".into()),
            needs_operator_at_ms: Some(1_700_000_060_000),
        };
        let plain = knowledge::IncidentRecord {
            id: "inc-2".into(),
            needs_operator: None,
            needs_operator_at_ms: None,
            ..open.clone()
        };
        let text = incidents_table(&[open.clone(), plain]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("NEEDS OPERATOR"), "{text}");
        assert!(lines[1].ends_with("agent-evict futile 3 times"), "{text}");
        assert!(lines[2].ends_with("open"), "{text}");

        let v = serde_json::to_value(&open).unwrap();
        assert_eq!(v["needs_operator"], "agent-evict futile 3 times");
        assert_eq!(v["needs_operator_at_ms"], 1_700_000_060_000_i64);
    }

    #[test]
    fn check_config_missing_file() {
        let mut out = Vec::new();
        assert_eq!(
            check_config(std::path::Path::new("/nonexistent/x.toml"), &mut out),
            EXIT_CONFIG
        );
        assert!(String::from_utf8(out).unwrap().contains("cannot read"));
    }
}
