//! `spire-lab svid-files`: a stand-in for spiffe-helper, which cannot
//! be built here. It streams `FetchX509SVID` from an agent and writes the
//! default X509-SVID into a directory on every update:
//!
//! - `svid.pem`: the certificate chain, leaf first (mode 0644);
//! - `svid_key.pem`: the leaf's PKCS#8 private key (mode 0600);
//! - `bundle.pem`: the trust bundle of the SVID's trust domain (mode 0644).
//!
//! Guarantees:
//! - Each file is replaced atomically (a temporary file in the same
//!   directory, fsynced, then renamed over the old one): a reader never sees
//!   a half-written file. The three files are not replaced as one unit; a
//!   reader racing a rotation may pair a new chain with an old key, which
//!   rustls refuses, so readers retry or wait for the signal.
//! - After all three files are written, the process named by the pidfile
//!   (if any) is signalled, but only when that pid is a live process other
//!   than pid 1 and this one; otherwise the refusal is logged and the writer
//!   carries on (the target may simply not have started yet).
//! - A failed or ended stream is retried with capped exponential backoff
//!   ([`BACKOFF_MIN`] doubling up to [`BACKOFF_MAX`]); a stream that
//!   delivered an SVID resets the backoff.
//! - `--once` writes the first SVID and exits, like a helper that stops
//!   rewriting: the source of the served-versus-issued drift it helps test.

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls_pki_types::pem::{PemObject, SectionKind};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use spire_healer::actuators::signal::parse_signal;
use spire_healer::endpoint::{Endpoint, EndpointError};
use spire_healer::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spire_healer::proto::workload::{X509svidRequest, X509svidResponse};
use spire_healer::sensors::server_api::error_chain;
use spire_healer::sensors::workload_api::{raw_identity, request};
use spire_healer::spire_api::tls::RawIdentity;
use spire_healer::svid;

/// The certificate chain, leaf first.
pub const SVID_FILE: &str = "svid.pem";
/// The leaf's private key, PKCS#8.
pub const KEY_FILE: &str = "svid_key.pem";
/// The trust bundle of the SVID's trust domain.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// First retry delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bound of one dial plus the agent's first answer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

const CERTIFICATE_TAG: &str = "CERTIFICATE";
const KEY_TAG: &str = "PRIVATE KEY";

/// `spire-lab svid-files`.
#[derive(Debug, clap::Args)]
pub struct SvidFilesArgs {
    /// Workload API endpoint of the agent: `unix:///path` or `tcp://IP:port`.
    #[arg(long)]
    pub socket: String,
    /// Directory receiving svid.pem, svid_key.pem and bundle.pem (must exist).
    #[arg(long)]
    pub dir: PathBuf,
    /// Write the first SVID, then exit (a helper that stops rewriting).
    #[arg(long)]
    pub once: bool,
    /// After every write, signal the process whose pid this file holds.
    #[arg(long)]
    pub signal_pidfile: Option<PathBuf>,
    /// The signal sent to the pidfile's process.
    #[arg(long, default_value = "SIGHUP", requires = "signal_pidfile")]
    pub signal: String,
}

/// What [`run`] does, parsed.
#[derive(Debug, Clone)]
pub struct SvidFilesOptions {
    /// The agent's Workload API.
    pub endpoint: Endpoint,
    /// Where the files go.
    pub dir: PathBuf,
    /// Stop after the first write.
    pub once: bool,
    /// Pidfile and signal to send after each write.
    pub signal: Option<(PathBuf, Signal)>,
}

impl SvidFilesArgs {
    /// Parses the endpoint and signal.
    ///
    /// # Errors
    /// [`SvidFilesError::Endpoint`] or [`SvidFilesError::UnknownSignal`].
    pub fn options(&self) -> Result<SvidFilesOptions, SvidFilesError> {
        let endpoint = Endpoint::parse(&self.socket)?;
        let signal = match &self.signal_pidfile {
            Some(pidfile) => {
                let sig = parse_signal(&self.signal)
                    .ok_or_else(|| SvidFilesError::UnknownSignal(self.signal.clone()))?;
                Some((pidfile.clone(), sig))
            }
            None => None,
        };
        Ok(SvidFilesOptions {
            endpoint,
            dir: self.dir.clone(),
            once: self.once,
            signal,
        })
    }
}

// === Errors ===

/// Why SVID files could not be fetched, written, read or announced.
#[derive(Debug, thiserror::Error)]
pub enum SvidFilesError {
    /// The endpoint address is unusable.
    #[error("invalid Workload API endpoint")]
    Endpoint(#[from] EndpointError),
    /// Not a signal name we send.
    #[error("unknown signal {0:?}; expected e.g. SIGHUP, SIGUSR1, SIGTERM")]
    UnknownSignal(String),
    /// The Workload API call failed.
    #[error("Workload API: {}: {}", .0.code(), .0.message())]
    Api(#[source] Box<tonic::Status>),
    /// The agent did not answer in time.
    #[error("the agent did not answer within {0:?}")]
    Unanswered(Duration),
    /// The agent closed the stream.
    #[error("the agent closed the X.509-SVID stream")]
    StreamEnded,
    /// The message held no SVID that follows the X509-SVID rules.
    #[error("the agent sent no usable X509-SVID: {0}")]
    NoUsableSvid(String),
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A PEM file is garbled or holds the wrong things.
    #[error("{}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The pidfile names no process we may signal.
    #[error("pidfile {}: {reason}", path.display())]
    Pidfile {
        /// The pidfile.
        path: PathBuf,
        /// Why the pid was refused.
        reason: String,
    },
    /// `kill(2)` failed.
    #[error("cannot send {signal} to pid {pid}")]
    Signal {
        /// Target.
        pid: i32,
        /// Signal name.
        signal: &'static str,
        /// OS error.
        #[source]
        source: nix::Error,
    },
}

impl SvidFilesError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Endpoint(_) => "endpoint",
            Self::UnknownSignal(_) => "unknown_signal",
            Self::Api(_) => "api",
            Self::Unanswered(_) => "unanswered",
            Self::StreamEnded => "stream_ended",
            Self::NoUsableSvid(_) => "no_usable_svid",
            Self::Io { .. } => "io",
            Self::Pem { .. } => "pem",
            Self::Pidfile { .. } => "pidfile",
            Self::Signal { .. } => "signal",
        }
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }

    fn pem(path: &Path, reason: impl Into<String>) -> Self {
        Self::Pem {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl From<tonic::Status> for SvidFilesError {
    fn from(status: tonic::Status) -> Self {
        Self::Api(Box::new(status))
    }
}

// === impl SvidFileSet ===

/// One X509-SVID encoded as the three PEM files.
#[derive(Clone)]
pub struct SvidFileSet {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// The leaf's serial, lower-case hex ([`svid::LeafInfo::serial`]).
    pub serial: String,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    chain: String,
    key: String,
    bundle: String,
}

impl fmt::Debug for SvidFileSet {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidFileSet")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl SvidFileSet {
    /// The default SVID of a `FetchX509SVID` message: the first one that
    /// follows the X509-SVID rules ([`svid::inspect`]).
    ///
    /// # Errors
    /// [`SvidFilesError::NoUsableSvid`] naming the first SVID's problem (or
    /// that the message is empty).
    pub fn from_response(resp: &X509svidResponse) -> Result<Self, SvidFilesError> {
        let mut first_problem = None;
        for s in &resp.svids {
            let insp = svid::inspect(&s.spiffe_id, &s.x509_svid, &s.bundle);
            match (insp.problem, insp.leaf, raw_identity(s)) {
                (None, Some(leaf), Some(identity)) => return Ok(Self::encode(&identity, leaf)),
                (Some(p), _, _) => {
                    first_problem.get_or_insert_with(|| format!("{}: {p}", s.spiffe_id));
                }
                _ => {
                    first_problem.get_or_insert_with(|| format!("{}: unparsable", s.spiffe_id));
                }
            }
        }
        Err(SvidFilesError::NoUsableSvid(
            first_problem.unwrap_or_else(|| "the message lists no SVID".into()),
        ))
    }

    fn encode(identity: &RawIdentity, leaf: svid::LeafInfo) -> Self {
        let (chain, key, bundle) = identity;
        Self {
            spiffe_id: leaf.spiffe_id,
            serial: leaf.serial,
            not_after: leaf.not_after,
            chain: pem_blocks(CERTIFICATE_TAG, chain),
            key: pem_blocks(KEY_TAG, std::slice::from_ref(key)),
            bundle: pem_blocks(CERTIFICATE_TAG, bundle),
        }
    }

    /// Writes the three files into `dir`, each atomically, chain first.
    ///
    /// # Errors
    /// [`SvidFilesError::Io`] when a file cannot be written or renamed.
    pub fn write(&self, dir: &Path) -> Result<(), SvidFilesError> {
        write_atomic(&dir.join(SVID_FILE), self.chain.as_bytes(), 0o644)?;
        write_atomic(&dir.join(KEY_FILE), self.key.as_bytes(), 0o600)?;
        write_atomic(&dir.join(BUNDLE_FILE), self.bundle.as_bytes(), 0o644)
    }
}

fn pem_blocks(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter().map(|der| svid::pem::encode(tag, der)).collect()
}

/// Replaces `path` atomically with `contents` at `mode`: a temporary file
/// in the same directory, written, fsynced, then renamed over `path`.
///
/// # Errors
/// [`SvidFilesError::Io`] naming the step that failed.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), SvidFilesError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)
        .map_err(SvidFilesError::io("creating a temporary file for", path))?;
    // Set the mode before any secret is written.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
        .map_err(SvidFilesError::io("setting the mode of", path))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(SvidFilesError::io("writing", path))?;
    tmp.persist(path)
        .map_err(|e| SvidFilesError::io("renaming into place", path)(e.error))?;
    Ok(())
}

/// Reads the three files of `dir` back: (chain, PKCS#8 key, bundle) as DER.
///
/// # Errors
/// [`SvidFilesError::Io`] for a missing or unreadable file,
/// [`SvidFilesError::Pem`] for garbled PEM, an empty chain or bundle, or a
/// key that is not exactly one PKCS#8 `PRIVATE KEY`.
pub fn read_svid_files(dir: &Path) -> Result<RawIdentity, SvidFilesError> {
    let chain = read_pem(&dir.join(SVID_FILE), CERTIFICATE_TAG)?;
    let mut keys = read_pem(&dir.join(KEY_FILE), KEY_TAG)?;
    let bundle = read_pem(&dir.join(BUNDLE_FILE), CERTIFICATE_TAG)?;
    if keys.len() != 1 {
        return Err(SvidFilesError::pem(
            &dir.join(KEY_FILE),
            format!("expected one {KEY_TAG}, found {}", keys.len()),
        ));
    }
    Ok((chain, keys.remove(0), bundle))
}

/// The contents of the PEM blocks of `path`, all of which must carry `tag`;
/// at least one.
fn read_pem(path: &Path, tag: &str) -> Result<Vec<Vec<u8>>, SvidFilesError> {
    let text = std::fs::read(path).map_err(SvidFilesError::io("reading", path))?;
    let want = SectionKind::try_from(tag.as_bytes()).ok();
    let blocks = <(SectionKind, Vec<u8>)>::pem_slice_iter(&text)
        .map(|block| match block {
            Ok((kind, der)) if Some(kind) == want => Ok(der),
            Ok((kind, _)) => Err(SvidFilesError::pem(
                path,
                format!("found a {kind:?} PEM block, expected {tag}"),
            )),
            Err(e) => Err(SvidFilesError::pem(path, e.to_string())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if blocks.is_empty() {
        return Err(SvidFilesError::pem(path, format!("no {tag} PEM block")));
    }
    Ok(blocks)
}

/// Sends `signal` to the pid in `pidfile`; returns the pid.
///
/// # Errors
/// [`SvidFilesError::Pidfile`] when the file is unreadable or garbled, or
/// names pid ≤ 1, this process, or a process that is not alive (absent or a
/// zombie); [`SvidFilesError::Signal`] when `kill(2)` fails.
pub fn signal_pidfile(pidfile: &Path, signal: Signal) -> Result<i32, SvidFilesError> {
    let refuse = |reason: String| SvidFilesError::Pidfile {
        path: pidfile.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(pidfile).map_err(|e| refuse(format!("unreadable: {e}")))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| refuse(format!("does not hold a pid: {:?}", text.trim())))?;
    if pid <= 1 {
        return Err(refuse(format!("names pid {pid}, which is never signalled")));
    }
    if u32::try_from(pid).is_ok_and(|p| p == std::process::id()) {
        return Err(refuse(format!("names pid {pid}, this very process")));
    }
    if !super::process_alive(pid) {
        return Err(refuse(format!("names pid {pid}, which is not running")));
    }
    kill(Pid::from_raw(pid), signal).map_err(|source| SvidFilesError::Signal {
        pid,
        signal: signal.as_str(),
        source,
    })?;
    Ok(pid)
}

/// The retry delay after `current`: doubled, capped at [`BACKOFF_MAX`].
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

// === run ===

/// Streams SVIDs into `opts.dir` until `shutdown` (or, with `once`, until
/// the first write); prints one line per write and per signal to `out`.
/// Returns the number of writes.
///
/// # Errors
/// [`SvidFilesError::Io`] when the files cannot be written (not retried).
/// Agent and signalling errors are logged and retried or skipped.
///
/// # Cancel safety
/// Each file is replaced atomically, so dropping the future mid-write
/// leaves at worst a stray temporary file, never a torn one.
pub async fn run(
    opts: &SvidFilesOptions,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<u64, SvidFilesError> {
    let mut writes = 0;
    let mut backoff = BACKOFF_MIN;
    loop {
        let before = writes;
        let ended = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(writes),
            r = session(opts, &mut writes, out) => r,
        };
        match ended {
            Ok(()) => return Ok(writes),
            Err(e @ SvidFilesError::Io { .. }) => return Err(e),
            Err(e) => {
                let error = error_chain(&e);
                warn!(%error, kind = e.kind(), retry_in = ?backoff, "Workload API stream failed.");
            }
        }
        if writes > before {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(writes),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = next_backoff(backoff);
    }
}

/// One stream: `Ok` only when `once` is set and the first write is done.
async fn session(
    opts: &SvidFilesOptions,
    writes: &mut u64,
    out: &mut (dyn Write + Send),
) -> Result<(), SvidFilesError> {
    let channel = opts.endpoint.channel(OPEN_TIMEOUT)?;
    let mut client =
        SpiffeWorkloadApiClient::new(channel).max_decoding_message_size(4 * 1024 * 1024);
    let mut stream = timeout(
        OPEN_TIMEOUT,
        client.fetch_x509svid(request(X509svidRequest {})),
    )
    .await
    .map_err(|_| SvidFilesError::Unanswered(OPEN_TIMEOUT))??
    .into_inner();
    loop {
        let resp = stream.message().await?.ok_or(SvidFilesError::StreamEnded)?;
        let files = match SvidFileSet::from_response(&resp) {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %error_chain(&e), "Skipped an update.");
                continue;
            }
        };
        files.write(&opts.dir)?;
        *writes += 1;
        let _ = writeln!(
            out,
            "Wrote {SVID_FILE}, {KEY_FILE}, {BUNDLE_FILE}: spiffe_id={} serial={} not_after={}",
            files.spiffe_id,
            files.serial,
            humantime::format_rfc3339_seconds(files.not_after)
        );
        if let Some((pidfile, sig)) = &opts.signal {
            match signal_pidfile(pidfile, *sig) {
                Ok(pid) => {
                    let _ = writeln!(out, "Sent {} to pid {pid}.", sig.as_str());
                }
                Err(e) => warn!(error = %error_chain(&e), "Not signalled."),
            }
        }
        let _ = out.flush();
        if opts.once {
            return Ok(());
        }
    }
}

/// `spire-lab svid-files`: runs until SIGINT/SIGTERM (or the first write with
/// `--once`); returns the exit code (64 for bad arguments, 1 when the files
/// cannot be written).
pub async fn main(args: SvidFilesArgs, out: &mut (dyn Write + Send)) -> i32 {
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return 64;
        }
    };
    if !opts.dir.is_dir() {
        eprintln!("error: {} is not a directory", opts.dir.display());
        return 64;
    }
    let shutdown = CancellationToken::new();
    let running = run(&opts, shutdown.clone(), out);
    tokio::pin!(running);
    let result = tokio::select! {
        r = &mut running => r,
        _ = spire_healer::term::shutdown_signal() => {
            shutdown.cancel();
            running.await
        }
    };
    match result {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            1
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
