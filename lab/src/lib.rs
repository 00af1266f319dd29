//! spire-lab: real-SPIRE labs, for spire-healer's integration tests and for
//! operators. Process control and PostgreSQL administration live here, not
//! in the product crate; this crate uses spire-healer's types (endpoints,
//! SVID checks, the Workload API, TLS) and is a dev-dependency of its tests.
//!
//! - [`SpireLab`]: one `spire-server` (sqlite3 datastore) and one
//!   `spire-agent` in a private temporary directory.
//! - [`HaLab`]: an HA pair (or more) of `spire-server`s sharing one
//!   PostgreSQL database created for the lab, and several `spire-agent`s,
//!   each attested with its own join token under a node alias
//!   `spiffe://<td>/node/<j>`, or with `k8s_psat` against a
//!   [`ControlPlane`] ([`psat`]: [`K8sPsat`], one kwok node, pod and bound
//!   token per agent) with the same node aliases.
//! - [`ControlPlane`] ([`k8s`]): a real, kubelet-less Kubernetes control
//!   plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//!   kwok) on 127.0.0.1, from the binaries `scripts/install-k8s.sh` builds
//!   (`SPIRE_HEALER_K8S_BIN`); `spire-lab k8s` runs one for operators.
//! - [`cmd`]: the `spire-lab` binary. `up|down|status` runs an [`HaLab`] in
//!   a directory the operator keeps, describes it in `lab.json`
//!   ([`LabManifest`]) and writes a ready `spire-healer.toml` for it
//!   ([`healer_config`]); `scripts/lab.sh` wraps it. `soak` ([`soak`])
//!   watches a healthy lab with the real spire-healer binary for a long time.
//!
//! # SPIRE behaviour the HA lab relies on
//! An agent persists the bundle it got at attestation, and v1.15.3 does not
//! persist a bundle change that arrives with its very first sync (the bundle
//! observer subscribes only afterwards). So [`HaLab`] lets agents attest only
//! once every server serves every server's CA, and checks that each agent
//! persisted all of them; otherwise an agent restarted against the other
//! server fails with "certificate signed by unknown authority".
//!
//! Both labs run the binaries built by `scripts/install-spire.sh`
//! ([`default_bin_dir`]), on free ports of 127.0.0.1, with every path short
//! enough for a Unix socket.
//!
//! # Guarantees
//! - Every wait is bounded; a timeout error carries the tail of the relevant
//!   log ([`LabError::NotReady`], [`LabError::Exited`]).
//! - Each agent can be restarted by any program through its restart script
//!   (`restart_command()`); the current agent pid always lives in its
//!   pidfile, and every control method reads that pidfile, so kill, freeze,
//!   thaw and `Drop` act on whichever agent is current. A pid only counts
//!   when the process is alive (not a zombie) and its command line names the
//!   agent's own config file, so a recycled pid is never signalled.
//! - Starting a lab makes this process a child subreaper
//!   (`PR_SET_CHILD_SUBREAPER`): agents started by a restart script, whose
//!   parent shell exits at once, are re-parented here and reaped by the lab
//!   rather than left as zombies where init does not reap.
//! - Dropping a lab SIGKILLs and reaps every process it started or adopted
//!   (and, for [`HaLab`], drops its database). `Drop` blocks for up to a few
//!   seconds.
//!
//! # Errors
//! This is lab infrastructure, but it is a library, so it follows the
//! product's rule (one `thiserror` enum per boundary): every fallible call
//! returns [`LabError`]. Callers that use `anyhow` convert with `?`.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;
use tokio::time::timeout;

pub mod chaos;
pub mod cmd;
mod conf;
mod database;
mod ha;
pub mod k8s;
mod manifest;
pub mod peer;
mod process;
pub mod psat;
mod single;
pub mod soak;
pub mod svid_files;

pub use database::{ScratchDatabase, database_exists};
pub use ha::{HaAgent, HaLab, HaOptions, HaServer, ListedAgent};
pub use k8s::ControlPlane;
pub use manifest::{AgentManifest, DatabaseManifest, LabManifest, ServerManifest, healer_config};
pub use psat::{K8sPsat, NodeAttestation, PsatNode};
pub use single::{LabOptions, SpireLab};

/// How long any single readiness or sync wait may take.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// Deadline of one CLI call (server CLI calls have no RPC deadline of their own).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period of the waits.
const POLL: Duration = Duration::from_millis(250);
/// Lines of log quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// Default trust domain of the labs.
pub const DEFAULT_TRUST_DOMAIN: &str = "healer.test";

/// Everything that can go wrong in a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A SPIRE binary is missing.
    #[error(
        "{} not found; run scripts/install-spire.sh (or set SPIRE_HEALER_SPIRE_BIN to a folder holding spire-server and spire-agent)",
        path.display()
    )]
    MissingBinary {
        /// The expected binary.
        path: PathBuf,
    },
    /// The options are inconsistent.
    #[error("invalid lab options: {0}")]
    Options(String),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A command or request did not finish in time.
    #[error("{what} did not finish within {limit:?}")]
    Timeout {
        /// The command or request.
        what: String,
        /// Its deadline.
        limit: Duration,
    },
    /// A wait for a condition ran out.
    #[error("{what} after {limit:?}; last lines of {}:\n{tail}", log.display())]
    NotReady {
        /// The condition not reached.
        what: String,
        /// The bound of the wait.
        limit: Duration,
        /// The log quoted.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// A process exited while it was expected to run.
    #[error("{what} ({status}); last lines of {}:\n{tail}", log.display())]
    Exited {
        /// Which process, doing what.
        what: String,
        /// Its exit status.
        status: String,
        /// Its log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// A command exited non-zero, or reported a failure in its output.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status or reported status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// A command's output is not what was expected.
    #[error("unexpected output of {command}: {reason}: {output}")]
    Output {
        /// The command line.
        command: String,
        /// What is missing or malformed.
        reason: String,
        output: String,
    },
    /// A PostgreSQL operation failed.
    #[error("{what}: {source}")]
    Database {
        /// What was being done.
        what: String,
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// A signal could not be sent.
    #[error("cannot send {signal} to pid {pid}: {source}")]
    Signal {
        /// Target.
        pid: i32,
        /// Signal name.
        signal: &'static str,
        /// OS error.
        #[source]
        source: nix::Error,
    },
    /// The lab is not in a state that allows the operation.
    #[error("{0}")]
    State(String),
    /// `lab.json` is unreadable.
    #[error("cannot parse {}: {source}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// `SPIRE_HEALER_K8S_BIN` is not set: the Kubernetes tests skip.
    #[error(
        "SPIRE_HEALER_K8S_BIN is not set; run scripts/install-k8s.sh and set it to the folder it prints last (scripts/test.sh does both)"
    )]
    K8sBinDirUnset,
    /// A Kubernetes control-plane binary is missing.
    #[error(
        "{} not found; run scripts/install-k8s.sh and set SPIRE_HEALER_K8S_BIN to the folder it prints last",
        path.display()
    )]
    MissingK8sBinary {
        /// The expected binary.
        path: PathBuf,
    },
    /// A kubeconfig is unreadable or cannot make a client.
    #[error("kubeconfig {}: {reason}", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// The call.
        what: String,
        /// The client's error (`kube::Error::Api` carries the HTTP status).
        #[source]
        source: Box<kube::Error>,
    },
}

impl LabError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            LabError::MissingBinary { .. } => "missing_binary",
            LabError::Options(_) => "options",
            LabError::Io { .. } => "io",
            LabError::Timeout { .. } => "timeout",
            LabError::NotReady { .. } => "not_ready",
            LabError::Exited { .. } => "exited",
            LabError::Command { .. } => "command",
            LabError::Output { .. } => "output",
            LabError::Database { .. } => "database",
            LabError::Signal { .. } => "signal",
            LabError::State(_) => "state",
            LabError::Manifest { .. } => "manifest",
            LabError::K8sBinDirUnset => "k8s_bin_dir_unset",
            LabError::MissingK8sBinary { .. } => "missing_k8s_binary",
            LabError::Kubeconfig { .. } => "kubeconfig",
            LabError::Kube { .. } => "kube",
        }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Io { what, source }
    }

    pub(crate) fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Kube {
            what,
            source: Box::new(source),
        }
    }

    /// The HTTP status of a refused Kubernetes API call (403, 404, 429, …).
    pub fn http_status(&self) -> Option<u16> {
        match self {
            LabError::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            },
            _ => None,
        }
    }

    pub(crate) fn not_ready(what: impl Into<String>, limit: Duration, log: &Path) -> LabError {
        LabError::NotReady {
            what: what.into(),
            limit,
            log: log.to_path_buf(),
            tail: log_tail(log),
        }
    }
}

/// `SPIRE_HEALER_SPIRE_BIN`, else `.spire/bin` at the root of the source
/// tree (where `scripts/install-spire.sh` puts the binaries).
pub fn default_bin_dir() -> PathBuf {
    match std::env::var_os("SPIRE_HEALER_SPIRE_BIN") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.spire/bin"),
    }
}

/// `spiffe://<trust domain><path>`; `path` may omit its leading `/`.
pub fn spiffe_id(trust_domain: &str, path: &str) -> String {
    let sep = if path.starts_with('/') { "" } else { "/" };
    format!("spiffe://{trust_domain}{sep}{path}")
}

/// Runs `bin args`, killing it when it exceeds `limit`.
///
/// # Errors
/// [`LabError::Io`] when it cannot be spawned, [`LabError::Timeout`].
pub async fn run_bounded(bin: &Path, args: &[String], limit: Duration) -> Result<Output, LabError> {
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(LabError::io(format!("spawning {}", bin.display())))?;
    match timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.map_err(LabError::io(format!("running {}", bin.display()))),
        Err(_) => Err(LabError::Timeout {
            what: format!("{} {}", bin.display(), args.join(" ")),
            limit,
        }),
    }
}

/// A minimal HTTP/1.0 GET against 127.0.0.1 (3 s deadline); returns the
/// status code.
///
/// # Errors
/// Connection errors, [`LabError::Timeout`], or a malformed answer.
pub async fn http_get_status(port: u16, path: &str) -> Result<u16, LabError> {
    let what = format!("GET 127.0.0.1:{port}{path}");
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<Vec<u8>, std::io::Error>(buf)
    };
    let limit = Duration::from_secs(3);
    let buf = timeout(limit, fut)
        .await
        .map_err(|_| LabError::Timeout {
            what: what.clone(),
            limit,
        })?
        .map_err(LabError::io(what.clone()))?;
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| LabError::Output {
            command: what,
            reason: "no HTTP status line".into(),
            output: head.chars().take(80).collect(),
        })
}

/// A port that was free on 127.0.0.1 a moment ago.
///
/// # Errors
/// The OS refused to bind.
pub fn free_port() -> Result<u16, LabError> {
    Ok(free_ports(1)?.first().copied().unwrap_or_default())
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago (all are
/// held at once while picking, so they differ from each other).
///
/// # Errors
/// The OS refused to bind.
pub fn free_ports(n: usize) -> Result<Vec<u16>, LabError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(LabError::io("binding 127.0.0.1:0")))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(LabError::io("reading a bound port"))
        })
        .collect()
}

/// True when `pid` exists and is neither a zombie nor dead.
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// True when `pid` is alive and one of its command-line arguments is exactly
/// `arg` (e.g. the config file of a lab process).
pub fn process_has_arg(pid: i32, arg: &Path) -> bool {
    if !process_alive(pid) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = arg.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|a| a == want)
}

/// Live processes (other than this one) with `arg` among their arguments.
pub fn pids_with_arg(arg: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && process_has_arg(pid, arg))
        .collect()
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Makes this process a child subreaper (see the module docs); best effort.
fn adopt_orphans() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

fn check_binaries(bin_dir: &Path) -> Result<(PathBuf, PathBuf), LabError> {
    let server = bin_dir.join("spire-server");
    let agent = bin_dir.join("spire-agent");
    for bin in [&server, &agent] {
        if !bin.is_file() {
            return Err(LabError::MissingBinary { path: bin.clone() });
        }
    }
    Ok((server, agent))
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), LabError> {
    fs::write(path, contents).map_err(LabError::io(format!("writing {}", path.display())))
}

fn open_append(path: &Path) -> Result<fs::File, LabError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(LabError::io(format!("opening {}", path.display())))
}

/// Creates `path` (and parents) with mode 0755, so that workloads of other
/// uids can reach sockets below it.
fn make_dir(path: &Path) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(path).map_err(LabError::io(format!("creating {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(LabError::io(format!("chmod {}", path.display())))
}

/// Decodes a JSON CLI answer.
fn parse_json(command: &str, out: &Output) -> Result<serde_json::Value, LabError> {
    serde_json::from_slice(&out.stdout).map_err(|e| LabError::Output {
        command: command.to_owned(),
        reason: format!("not JSON ({e})"),
        output: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_join_paths() {
        assert_eq!(spiffe_id("td", "/a"), "spiffe://td/a");
        assert_eq!(spiffe_id("td", "a/b"), "spiffe://td/a/b");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(8).unwrap();
        let set: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(set.len(), 8);
    }

    #[test]
    fn own_process_is_alive_and_has_its_args() {
        let me = std::process::id() as i32;
        assert!(process_alive(me));
        assert!(!process_has_arg(me, Path::new("/no/such/arg")));
    }
}
