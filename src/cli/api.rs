//! The operator commands over the API (`status`, `incidents`, `approve`,
//! `watch`, …): where the API is, how to authenticate, one call per
//! command, its answer printed, and its status turned into an exit code.
//!
//! Exit codes: 0 ok, 64 usage (a bad argument, address, identity file or
//! request), 65 not found or failed precondition (unknown or already
//! decided approval, a cursor too old), 69 unreachable, 77 permission
//! denied or unauthenticated, 70 anything else the server got wrong.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde_json::Value;
use tonic::{Code, Request, Status};

use super::Output;
use super::render;
use crate::api::{ApiAddr, ClientError, ClientIdentity, SupervisorClient, TlsSettings};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, EXIT_CONFIG};
use crate::endpoint::Endpoint;
use crate::proto::healer as pb;
use crate::spiffe_id::SpiffeId;

/// Exit code: usage (EX_USAGE).
pub const EXIT_USAGE: i32 = EXIT_CONFIG;
/// Exit code: not found, already decided, expired (EX_DATAERR).
pub const EXIT_DATA: i32 = 65;
/// Exit code: the API is unreachable (EX_UNAVAILABLE).
pub const EXIT_UNREACHABLE: i32 = 69;
/// Exit code: the server failed (EX_SOFTWARE).
pub const EXIT_SOFTWARE: i32 = 70;
/// Exit code: refused (EX_NOPERM).
pub const EXIT_NOPERM: i32 = 77;

/// The environment variable naming the API address.
pub const ADDR_ENV: &str = "SPIRE_HEALER_ADDR";

/// How long connecting (identity, dial, handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// === Arguments ===

/// Where the API is, how to authenticate, how to print.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// API address: unix:///path or tcp://host:port. Default:
    /// $SPIRE_HEALER_ADDR, else the [api] socket of --config, else
    /// unix:///run/spire-healer/api.sock.
    #[arg(long, env = ADDR_ENV)]
    pub addr: Option<String>,
    /// Configuration file whose [api] socket is the default address.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Workload API our SVID comes from, for tcp:// addresses (default:
    /// $SPIFFE_ENDPOINT_SOCKET).
    #[arg(long, env = crate::endpoint::SOCKET_ENV)]
    pub workload_api: Option<String>,
    /// Which of the SVIDs the Workload API hands out to present (default:
    /// the first).
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Our X509-SVID chain as a PEM file, instead of the Workload API.
    #[arg(long, requires_all = ["svid_key", "bundle"])]
    pub svid: Option<PathBuf>,
    /// The SVID's private key, PKCS#8 PEM.
    #[arg(long, requires = "svid")]
    pub svid_key: Option<PathBuf>,
    /// Our trust bundle as a PEM file.
    #[arg(long, requires = "svid")]
    pub bundle: Option<PathBuf>,
    /// SPIFFE ID the server must present (default: any ID in our trust
    /// domain).
    #[arg(long)]
    pub server_id: Option<String>,
    /// Deadline of each call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Paging of list commands.
#[derive(Debug, Clone, clap::Args)]
pub struct PageArgs {
    /// Rows per page (the server allows at most 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Where to continue: the token the previous page ended with.
    #[arg(long)]
    pub page_token: Option<String>,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enable.
    On,
    /// Disable.
    Off,
}

/// A call over the API.
#[derive(Debug, Clone)]
pub enum Call {
    /// `status`.
    Status,
    /// `incidents`.
    Incidents {
        /// Only open ones.
        open: bool,
        /// Only this symptom.
        symptom: Option<String>,
        /// Paging.
        page: PageArgs,
    },
    /// `incident ID`.
    Incident {
        /// Its id.
        id: String,
    },
    /// `actions`.
    Actions {
        /// Only this incident's.
        incident: Option<String>,
        /// Paging.
        page: PageArgs,
    },
    /// `holds`.
    Holds {
        /// Only this incident's.
        incident: Option<String>,
        /// Paging.
        page: PageArgs,
    },
    /// `approvals`.
    Approvals {
        /// Only pending ones.
        pending: bool,
        /// Only this incident's.
        incident: Option<String>,
        /// Paging.
        page: PageArgs,
    },
    /// `audit`.
    Audit {
        /// Only this incident's.
        incident: Option<String>,
        /// Only these kinds.
        kinds: Vec<String>,
        /// Paging.
        page: PageArgs,
    },
    /// `watch`.
    Watch {
        /// Resume after this event.
        cursor: Option<String>,
    },
    /// `approve ID`.
    Approve {
        /// The approval.
        id: String,
        /// Recorded with it.
        comment: Option<String>,
    },
    /// `reject ID`.
    Reject {
        /// The approval.
        id: String,
        /// Why; recorded.
        reason: Option<String>,
    },
    /// `pause`.
    Pause {
        /// Why; recorded.
        reason: Option<String>,
    },
    /// `resume`.
    Resume {
        /// Why; recorded.
        reason: Option<String>,
    },
    /// `dry-run on|off`.
    DryRun {
        /// On or off.
        state: OnOff,
        /// Why; recorded.
        reason: Option<String>,
    },
    /// `reset-demotion SYMPTOM ACTUATOR`.
    ResetDemotion {
        /// The symptom.
        symptom: String,
        /// The actuator.
        actuator: String,
    },
}

// === Failures ===

/// Why a command failed: the exit code and what stderr says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// One line naming the problem.
    pub message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
}

/// The exit code of a call that ended with `code`.
pub fn exit_code(code: Code) -> i32 {
    match code {
        Code::Ok => 0,
        Code::InvalidArgument => EXIT_USAGE,
        Code::NotFound
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::Aborted => EXIT_DATA,
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Unimplemented => EXIT_UNREACHABLE,
        Code::PermissionDenied | Code::Unauthenticated => EXIT_NOPERM,
        Code::Unknown | Code::Internal | Code::DataLoss => EXIT_SOFTWARE,
    }
}

/// A call's error status as a failure naming the address.
pub fn status_failure(addr: &ApiAddr, status: &Status) -> Failure {
    let hint = match status.code() {
        Code::OutOfRange => " (list what you need, then watch from now without --cursor)",
        Code::Unimplemented => " (this daemon does not offer that call: a different version?)",
        _ => "",
    };
    Failure {
        code: exit_code(status.code()),
        message: format!(
            "{addr}: {:?}: {}{hint}",
            status.code(),
            if status.message().is_empty() {
                status.code().description()
            } else {
                status.message()
            }
        ),
    }
}

/// A failed connect as a failure.
pub fn client_failure(e: &ClientError) -> Failure {
    let code = match e.kind() {
        "usage" => EXIT_USAGE,
        "unauthenticated" => EXIT_NOPERM,
        _ => EXIT_UNREACHABLE,
    };
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    Failure { code, message }
}

// === Connecting ===

/// The address to use: `--addr` (or its environment variable), else the
/// `[api] socket` of `--config`, else the default socket.
///
/// # Errors
/// A usage failure for an address that does not parse or a configuration
/// that cannot be read.
pub fn resolve_addr(args: &ApiArgs) -> Result<ApiAddr, Failure> {
    if let Some(addr) = &args.addr {
        return ApiAddr::parse(addr).map_err(|e| Failure::usage(e.to_string()));
    }
    let socket = match &args.config {
        Some(path) => config_socket(path)?,
        None => crate::api::ApiConfig::default().socket,
    };
    Ok(ApiAddr::Unix(socket))
}

fn config_socket(path: &Path) -> Result<PathBuf, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
    let cfg = Config::parse(&text, &path.display().to_string()).map_err(|errors| {
        let first = errors.first().map(ToString::to_string).unwrap_or_default();
        Failure::usage(format!(
            "{}: {} problem(s), first: {}",
            path.display(),
            errors.len(),
            first.lines().next().unwrap_or("")
        ))
    })?;
    cfg.api.map(|api| api.socket).ok_or_else(|| {
        Failure::usage(format!(
            "{} has no [api] section: that daemon serves no API; pass --addr",
            path.display()
        ))
    })
}

/// The TLS settings for a TCP address; `None` when neither files nor a
/// Workload API were given.
///
/// # Errors
/// A usage failure for an unparsable endpoint or SPIFFE ID.
pub fn tls_settings(args: &ApiArgs) -> Result<Option<TlsSettings>, Failure> {
    let id = |flag: &str, s: &Option<String>| {
        s.as_deref()
            .map(|s| {
                SpiffeId::parse(s)
                    .map_err(|e| Failure::usage(format!("--{flag} {s:?} is not a SPIFFE ID: {e}")))
            })
            .transpose()
    };
    let server_id = id("server-id", &args.server_id)?;
    let identity = match (&args.svid, &args.svid_key, &args.bundle) {
        (Some(svid), Some(key), Some(bundle)) => ClientIdentity::Files {
            svid: svid.clone(),
            key: key.clone(),
            bundle: bundle.clone(),
        },
        (Some(_), _, _) => {
            return Err(Failure::usage(
                "--svid needs --svid-key and --bundle as well",
            ));
        }
        _ => match &args.workload_api {
            Some(endpoint) => ClientIdentity::WorkloadApi {
                endpoint: Endpoint::parse(endpoint)
                    .map_err(|e| Failure::usage(format!("--workload-api {endpoint:?}: {e}")))?,
                spiffe_id: id("spiffe-id", &args.spiffe_id)?,
            },
            None => return Ok(None),
        },
    };
    Ok(Some(TlsSettings {
        identity,
        server_id,
    }))
}

/// Connects as `args` say.
///
/// # Errors
/// The failure to print.
pub async fn connect(args: &ApiArgs) -> Result<SupervisorClient, Failure> {
    let addr = resolve_addr(args)?;
    let tls = match addr {
        ApiAddr::Tcp { .. } => tls_settings(args)?,
        ApiAddr::Unix(_) => None,
    };
    SupervisorClient::connect(&addr, tls.as_ref(), CONNECT_TIMEOUT)
        .await
        .map_err(|e| {
            let mut f = client_failure(&e);
            // Identity problems name the Workload API or the file; say
            // which API it was for too.
            let name = addr.to_string();
            if !f.message.contains(&name) {
                f.message = format!("{name}: {}", f.message);
            }
            f
        })
}

// === Running ===

/// Runs `call` over the API and prints its answer to `out`; returns the
/// exit code (the problem on stderr).
pub async fn run(args: &ApiArgs, call: Call, out: &mut dyn Write) -> i32 {
    let result = async {
        let client = connect(args).await?;
        execute(&client, args, call, out).await
    }
    .await;
    match result {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    }
}

fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(timeout);
    req
}

fn print(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    writeln!(out, "{text}").map_err(|e| Failure {
        code: EXIT_SOFTWARE,
        message: format!("cannot write the output: {e}"),
    })
}

fn print_json(out: &mut dyn Write, v: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    print(out, &text)
}

/// A table, then where the next page starts (on stderr: the table stays
/// clean for pipes).
fn print_page(out: &mut dyn Write, text: &str, next: &str) -> Result<(), Failure> {
    print(out, text)?;
    if !next.is_empty() {
        eprintln!("(more: --page-token {next})");
    }
    Ok(())
}

/// One answer: as JSON, or as text.
fn print_one<T>(
    out: &mut dyn Write,
    json: bool,
    r: &T,
    to_json: impl FnOnce(&T) -> Value,
    text: impl FnOnce(&T) -> String,
) -> Result<(), Failure> {
    if json {
        print_json(out, &to_json(r))
    } else {
        print(out, &text(r))
    }
}

/// A page of a listing (`(key, rows, next page token)`): as JSON, the rows
/// under `key` beside the token, or as a table then where the next page
/// starts.
fn print_listing<T>(
    out: &mut dyn Write,
    json: bool,
    (key, rows, next): (&str, &[T], &str),
    to_json: impl FnMut(&T) -> Value,
    table: impl FnOnce(&[T]) -> String,
) -> Result<(), Failure> {
    if json {
        let items = rows.iter().map(to_json).collect();
        print_json(out, &render::page_json(key, items, next))
    } else {
        print_page(out, &table(rows), next)
    }
}

async fn execute(
    client: &SupervisorClient,
    args: &ApiArgs,
    call: Call,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let mut rpc = client.rpc();
    let addr = client.addr();
    let fail = |s: Status| status_failure(addr, &s);
    let t = args.timeout;
    let json = args.output == Output::Json;
    // Read when the answer is there: ages are measured from then.
    let now = || SystemClock.now();
    match call {
        Call::Status => {
            let r = rpc
                .get_status(request(pb::GetStatusRequest {}, t))
                .await
                .map_err(fail)?
                .into_inner();
            print_one(out, json, &r, render::status_json, |r| {
                render::status_text(r, now())
            })
        }
        Call::Incidents {
            open,
            symptom,
            page,
        } => {
            let r = rpc
                .list_incidents(request(
                    pb::ListIncidentsRequest {
                        page_size: page.limit,
                        page_token: page.page_token.unwrap_or_default(),
                        open_only: open,
                        symptom: symptom.unwrap_or_default(),
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            print_listing(
                out,
                json,
                ("incidents", &r.incidents, &r.next_page_token),
                render::incident_json,
                |rows| render::incidents_table(rows, now()),
            )
        }
        Call::Incident { id } => {
            let r = rpc
                .get_incident(request(pb::GetIncidentRequest { id }, t))
                .await
                .map_err(fail)?
                .into_inner();
            print_one(out, json, &r, render::incident_detail_json, |r| {
                render::incident_text(r, now())
            })
        }
        Call::Actions { incident, page } => {
            let r = rpc
                .list_actions(request(
                    pb::ListActionsRequest {
                        page_size: page.limit,
                        page_token: page.page_token.unwrap_or_default(),
                        incident_id: incident.unwrap_or_default(),
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            print_listing(
                out,
                json,
                ("actions", &r.actions, &r.next_page_token),
                render::action_json,
                |rows| render::actions_table(rows, now()),
            )
        }
        Call::Holds { incident, page } => {
            let r = rpc
                .list_holds(request(
                    pb::ListHoldsRequest {
                        page_size: page.limit,
                        page_token: page.page_token.unwrap_or_default(),
                        incident_id: incident.unwrap_or_default(),
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            print_listing(
                out,
                json,
                ("holds", &r.holds, &r.next_page_token),
                render::hold_json,
                |rows| render::holds_table(rows, now()),
            )
        }
        Call::Approvals {
            pending,
            incident,
            page,
        } => {
            let r = rpc
                .list_approvals(request(
                    pb::ListApprovalsRequest {
                        page_size: page.limit,
                        page_token: page.page_token.unwrap_or_default(),
                        pending_only: pending,
                        incident_id: incident.unwrap_or_default(),
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            print_listing(
                out,
                json,
                ("approvals", &r.approvals, &r.next_page_token),
                render::approval_json,
                |rows| render::approvals_table(rows, now()),
            )
        }
        Call::Audit {
            incident,
            kinds,
            page,
        } => {
            let r = rpc
                .list_audit(request(
                    pb::ListAuditRequest {
                        page_size: page.limit,
                        page_token: page.page_token.unwrap_or_default(),
                        incident_id: incident.unwrap_or_default(),
                        kinds,
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            print_listing(
                out,
                json,
                ("entries", &r.entries, &r.next_page_token),
                render::audit_json,
                |rows| render::audit_table(rows, now()),
            )
        }
        Call::Watch { cursor } => watch(client, cursor, json, out).await,
        Call::Approve { id, comment } => {
            let r = rpc
                .approve(request(
                    pb::ApproveRequest {
                        approval_id: id,
                        comment: comment.unwrap_or_default(),
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            print_one(out, json, &r, render::approval_json, |r| {
                render::approval_text(r, now())
            })
        }
        Call::Reject { id, reason } => {
            let r = rpc
                .reject(request(
                    pb::RejectRequest {
                        approval_id: id,
                        reason: reason.unwrap_or_default(),
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            print_one(out, json, &r, render::approval_json, |r| {
                render::approval_text(r, now())
            })
        }
        Call::Pause { reason } => {
            let r = rpc
                .pause(request(
                    pb::PauseRequest {
                        reason: reason.unwrap_or_default(),
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            control(out, json, "paused", &r)
        }
        Call::Resume { reason } => {
            let r = rpc
                .resume(request(
                    pb::ResumeRequest {
                        reason: reason.unwrap_or_default(),
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            control(out, json, "resumed", &r)
        }
        Call::DryRun { state, reason } => {
            let r = rpc
                .set_dry_run(request(
                    pb::SetDryRunRequest {
                        enabled: state == OnOff::On,
                        reason: reason.unwrap_or_default(),
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            let what = match state {
                OnOff::On => "dry run on",
                OnOff::Off => "dry run off",
            };
            control(out, json, what, &r)
        }
        Call::ResetDemotion { symptom, actuator } => {
            let r = rpc
                .reset_demotion(request(
                    pb::ResetDemotionRequest {
                        symptom: symptom.clone(),
                        actuator: actuator.clone(),
                    },
                    t,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            if json {
                print_json(
                    out,
                    &serde_json::json!({"symptom": symptom, "actuator": actuator, "by": r.by}),
                )
            } else {
                print(
                    out,
                    &format!(
                        "demotion of {actuator} for {symptom} reset (recorded as {})",
                        r.by
                    ),
                )
            }
        }
    }
}

fn control(
    out: &mut dyn Write,
    json: bool,
    what: &str,
    r: &pb::ControlResponse,
) -> Result<(), Failure> {
    if json {
        print_json(out, &render::control_json(r))
    } else {
        print(out, &render::control_text(what, r))
    }
}

/// Streams events until the server ends the stream, it fails, or
/// SIGINT/SIGTERM (exit 0). One line per event, flushed at once.
async fn watch(
    client: &SupervisorClient,
    cursor: Option<String>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let addr = client.addr();
    let mut stream = client
        .rpc()
        .watch(pb::WatchRequest {
            cursor: cursor.unwrap_or_default(),
        })
        .await
        .map_err(|s| status_failure(addr, &s))?
        .into_inner();
    let stop = crate::term::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let next = tokio::select! {
            _ = &mut stop => return Ok(()),
            next = stream.message() => next,
        };
        match next {
            Ok(Some(e)) => {
                let line = if json {
                    render::watch_json(&e).to_string()
                } else {
                    render::watch_line(&e)
                };
                print(out, &line)?;
                let _ = out.flush();
            }
            Ok(None) => return Ok(()),
            Err(s) => return Err(status_failure(addr, &s)),
        }
    }
}

#[cfg(test)]
mod tests;
