//! `cert_files` sensor: watches one certificate file on disk (and its
//! bundle file), as spiffe-helper or a sidecar writes them for workloads
//! that cannot speak the Workload API.
//!
//! A background task stats the files every `poll_interval` and re-reads one
//! only when its metadata (mtime, size, inode) changed, or while it is in
//! error (so a half-written file is re-read until the writer finishes). The
//! content is hashed (SHA-256): a touch or a rewrite with the same bytes is
//! not a change. The certificates go through the strict PEM intake
//! ([`crate::svid::pem`]); the leaf is checked against the X509-SVID rules,
//! and against the bundle file when one is configured.
//!
//! The published [`CertFileView`] keeps the last good leaf while the file
//! is in error (`missing`, `unreadable`, or a [`PemError`] kind), so analysis
//! can still tell which certificate the workload last had. `changed_at` is
//! the clock time at which the sensor first saw the current content.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::workload_api::fingerprint;
use crate::clock::{Clock, unix_secs_f64};
use crate::model::{CertFileView, PeerCert, Reading};
use crate::svid::pem::{PemError, parse_certificates};
use crate::svid::{self, SvidError};
use crate::telemetry::Metrics;

/// Default time between polls.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default bound on a file's size: far above any real chain or bundle.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// Largest `max_bytes` accepted by [`CertFileConfig::problems`].
pub const MAX_MAX_BYTES: usize = 64 * 1024 * 1024;

/// `[[cert_files]]`: one certificate file to watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFileConfig {
    /// Name: metric label (`file`), subject and store key.
    pub name: String,
    /// The certificate chain, leaf first (spiffe-helper's `svid.pem`).
    pub cert_path: PathBuf,
    /// The trust bundle (spiffe-helper's `bundle.pem`); when set, the chain
    /// is verified against it.
    #[serde(default)]
    pub bundle_path: Option<PathBuf>,
    /// The configured agent whose Workload API issues this identity; passed
    /// through to the view so analysis can compare serials.
    #[serde(default)]
    pub agent: Option<String>,
    /// Time between polls of the files' metadata.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Largest file accepted, in bytes; bigger files read as `too_large`.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

fn default_poll_interval() -> Duration {
    DEFAULT_POLL_INTERVAL
}

fn default_max_bytes() -> usize {
    DEFAULT_MAX_BYTES
}

impl CertFileConfig {
    /// A config with the default interval and size bound.
    pub fn new(name: impl Into<String>, cert_path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            cert_path: cert_path.into(),
            bundle_path: None,
            agent: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// Every problem, as (field, problem) pairs. Whether `agent` names a
    /// configured agent is for the caller to check.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.name.trim().is_empty() {
            out.push(("name", "is empty".to_string()));
        } else if self.name.len() > crate::handshake::MAX_TARGET_LEN {
            out.push((
                "name",
                format!("is longer than {} bytes", crate::handshake::MAX_TARGET_LEN),
            ));
        }
        path_problems("cert_path", &self.cert_path, &mut out);
        if let Some(bundle) = &self.bundle_path {
            path_problems("bundle_path", bundle, &mut out);
            if *bundle == self.cert_path {
                out.push(("bundle_path", "is the same file as cert_path".to_string()));
            }
        }
        if self.agent.as_deref().is_some_and(|a| a.trim().is_empty()) {
            out.push(("agent", "is empty".to_string()));
        }
        if self.poll_interval.is_zero() {
            out.push(("poll_interval", "must be positive".to_string()));
        }
        if self.max_bytes == 0 {
            out.push(("max_bytes", "must be positive".to_string()));
        } else if self.max_bytes > MAX_MAX_BYTES {
            out.push((
                "max_bytes",
                format!("{} is above the limit of {MAX_MAX_BYTES}", self.max_bytes),
            ));
        }
        out
    }
}

/// The problems of a configured file path: empty, relative, or naming a
/// directory (shared by every setting that names a file to read).
pub(crate) fn path_problems(
    field: &'static str,
    path: &Path,
    out: &mut Vec<(&'static str, String)>,
) {
    if path.as_os_str().is_empty() {
        out.push((field, "is empty".to_string()));
    } else if !path.is_absolute() {
        out.push((
            field,
            format!("{} is relative; use an absolute path", path.display()),
        ));
    } else if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        out.push((field, format!("{} names a directory", path.display())));
    }
}

/// The sensor's settings are its configuration.
pub type Settings = CertFileConfig;

/// Why a watched file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file does not exist (yet).
    #[error("the file does not exist")]
    Missing,
    /// It exists but cannot be read (permissions, a directory, I/O).
    #[error("cannot read the file")]
    Unreadable(#[source] std::io::Error),
    /// Its content is not an acceptable certificate list.
    #[error(transparent)]
    Pem(#[from] PemError),
}

impl FileError {
    /// Closed-set label: `missing`, `unreadable` or a [`PemError::kind`].
    pub fn kind(&self) -> &'static str {
        match self {
            FileError::Missing => "missing",
            FileError::Unreadable(_) => "unreadable",
            FileError::Pem(e) => e.kind(),
        }
    }

    fn io(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            FileError::Missing
        } else {
            FileError::Unreadable(e)
        }
    }
}

// === Watched file ===

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Self {
            mtime: meta.modified().ok(),
            len: meta.len(),
            inode,
        }
    }
}

/// One file's state between polls (also the `bootstrap_bundle` sensor's).
#[derive(Debug)]
pub(super) struct Watched {
    path: PathBuf,
    /// Metadata when last read.
    stamp: Option<Stamp>,
    /// Hash of the bytes last read.
    hash: Option<[u8; 32]>,
    /// The certificates (DER) of the last good read.
    pub(super) good: Option<Vec<Vec<u8>>>,
    /// The current problem, if any.
    pub(super) error: Option<FileError>,
}

impl Watched {
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            stamp: None,
            hash: None,
            good: None,
            error: None,
        }
    }

    /// Re-reads the file if its metadata changed or it is in error. Returns
    /// whether the content differs from the last bytes read.
    pub(super) async fn poll(&mut self, max_bytes: usize) -> bool {
        let meta = match tokio::fs::metadata(&self.path).await {
            Ok(meta) => meta,
            Err(e) => {
                self.stamp = None;
                self.error = Some(FileError::io(e));
                return false;
            }
        };
        // Taken before reading: a write racing the read changes the stamp
        // again, and the next poll reads once more.
        let stamp = Stamp::of(&meta);
        if self.stamp == Some(stamp) && self.error.is_none() {
            return false;
        }
        self.stamp = Some(stamp);
        if usize::try_from(meta.len()).map_or(true, |len| len > max_bytes) {
            self.error = Some(FileError::Pem(PemError::TooLarge {
                size: usize::try_from(meta.len()).unwrap_or(usize::MAX),
                max: max_bytes,
            }));
            return false;
        }
        let bytes = match read_bounded(&self.path, max_bytes).await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.error = Some(e);
                return false;
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        let changed = self.hash != Some(hash);
        self.hash = Some(hash);
        if !changed && self.error.is_none() {
            return false;
        }
        match intake(&bytes, max_bytes) {
            Ok(certs) => {
                self.good = Some(certs);
                self.error = None;
            }
            Err(e) => self.error = Some(FileError::Pem(e)),
        }
        changed
    }

    fn error_kind(&self) -> Option<&'static str> {
        self.error.as_ref().map(FileError::kind)
    }
}

/// Reads at most `max_bytes + 1` bytes, so an oversized file costs no more
/// than the bound.
async fn read_bounded(path: &Path, max_bytes: usize) -> Result<Vec<u8>, FileError> {
    let file = tokio::fs::File::open(path).await.map_err(FileError::io)?;
    let limit = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut bytes = Vec::new();
    file.take(limit)
        .read_to_end(&mut bytes)
        .await
        .map_err(FileError::io)?;
    Ok(bytes)
}

/// PEM intake plus the leaf's own fields: a certificate whose validity
/// cannot be represented is as unusable as bad DER.
fn intake(bytes: &[u8], max_bytes: usize) -> Result<Vec<Vec<u8>>, PemError> {
    let certs = parse_certificates(bytes, max_bytes)?;
    if let Some(leaf) = certs.first() {
        svid::leaf_info(leaf).map_err(|e| PemError::BadDer {
            index: 0,
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}

// === Sensor ===

/// The sensor half: reads the published view.
pub type CertFileSensor = super::Snapshot<CertFileView>;

/// The background task half: polls the files every `poll_interval`.
pub struct CertFileTask {
    settings: Settings,
    cert: Watched,
    bundle: Option<Watched>,
    view: watch::Sender<Arc<CertFileView>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
}

/// Builds the sensor and its task. Until the first poll the view has no
/// leaf and no error. `wake` is notified whenever the view changes beyond
/// its timestamp.
pub fn build(
    settings: Settings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (CertFileSensor, CertFileTask) {
    let now = clock.now();
    let (tx, rx) = watch::channel(Arc::new(CertFileView {
        file: settings.name.clone(),
        path: settings.cert_path.display().to_string(),
        agent: settings.agent.clone(),
        error: None,
        leaf: None,
        invalid: None,
        bundle: Vec::new(),
        bundle_error: None,
        changed_at: now,
        updated_at: now,
    }));
    (
        super::Snapshot::new("cert_files", settings.name.clone(), rx, Reading::CertFile),
        CertFileTask {
            cert: Watched::new(settings.cert_path.clone()),
            bundle: settings.bundle_path.clone().map(Watched::new),
            settings,
            view: tx,
            clock,
            metrics,
            wake,
        },
    )
}

impl CertFileTask {
    /// Polls immediately, then every `poll_interval`, until `shutdown`.
    ///
    /// # Cancel safety
    /// Holds only open files while reading; dropping it closes them.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut cadence = super::Cadence::new(self.settings.poll_interval);
        while cadence.next(&shutdown).await {
            if super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "cert_files", self.poll_once()),
            )
            .await
            .is_none()
            {
                return;
            }
        }
    }

    /// One poll of both files, then publishes the view.
    pub(crate) async fn poll_once(&mut self) {
        let max = self.settings.max_bytes;
        let cert_changed = self.cert.poll(max).await;
        if let Some(bundle) = &mut self.bundle {
            bundle.poll(max).await;
        }
        self.publish(cert_changed);
    }

    fn publish(&self, cert_changed: bool) {
        let now = self.clock.now();
        let name = &self.settings.name;
        let previous = self.view.borrow().clone();
        let bundle_der = self
            .bundle
            .as_ref()
            .and_then(|b| b.good.as_ref())
            .map(|certs| certs.concat());
        let (leaf, invalid) = match &self.cert.good {
            Some(chain) => check(chain, bundle_der.as_deref()),
            None => (None, None),
        };
        let mut bundle: Vec<String> = self
            .bundle
            .as_ref()
            .and_then(|b| b.good.as_ref())
            .map(|certs| certs.iter().map(|c| fingerprint(c)).collect())
            .unwrap_or_default();
        bundle.sort();
        bundle.dedup();
        let error = self.cert.error_kind();
        let bundle_error = self.bundle.as_ref().and_then(Watched::error_kind);

        if let Some(e) = &self.cert.error {
            self.metrics.error("sensor", e.kind());
            if previous.error.as_deref() != Some(e.kind()) {
                warn!(file = %name, kind = e.kind(), error = %e, "Certificate file unusable.");
            }
        }
        if let Some(e) = self.bundle.as_ref().and_then(|b| b.error.as_ref()) {
            self.metrics.error("sensor", e.kind());
            if previous.bundle_error.as_deref() != Some(e.kind()) {
                warn!(file = %name, kind = e.kind(), error = %e, "Bundle file unusable.");
            }
        }
        if let Some(leaf) = &leaf {
            self.metrics
                .cert_file_expiration_timestamp_seconds
                .with_label_values(&[name])
                .set(unix_secs_f64(leaf.not_after));
            if cert_changed && error.is_none() {
                info!(file = %name, serial = %leaf.serial, "Certificate file changed.");
            }
        }
        let view = CertFileView {
            file: name.clone(),
            path: self.settings.cert_path.display().to_string(),
            agent: self.settings.agent.clone(),
            error: error.map(str::to_string),
            leaf,
            invalid,
            bundle,
            bundle_error: bundle_error.map(str::to_string),
            // Also when the file becomes unreadable or readable again (a
            // missing file changes no content): the grace for an unusable
            // file counts from then.
            changed_at: if cert_changed || error != previous.error.as_deref() {
                now
            } else {
                previous.changed_at
            },
            updated_at: now,
        };
        let changed = view.error != previous.error
            || view.leaf != previous.leaf
            || view.invalid != previous.invalid
            || view.bundle != previous.bundle
            || view.bundle_error != previous.bundle_error
            || view.changed_at != previous.changed_at;
        self.view.send_replace(Arc::new(view));
        if changed {
            self.wake.notify_one();
        }
    }
}

/// The leaf as a [`PeerCert`] and the first X509-SVID rule the chain
/// breaks. Without a usable bundle only the chain's own rules are checked.
fn check(chain: &[Vec<u8>], bundle: Option<&[u8]>) -> (Option<PeerCert>, Option<String>) {
    let Some(info) = chain.first().and_then(|leaf| svid::leaf_info(leaf).ok()) else {
        return (None, None);
    };
    // The file claims no SPIFFE ID of its own: the leaf's is the claim.
    let inspection = svid::inspect(&info.spiffe_id, &chain.concat(), bundle.unwrap_or(&[]));
    let problem = match inspection.problem {
        Some(SvidError::EmptyBundle) if bundle.is_none() => None,
        other => other,
    };
    let one_spiffe_uri = info.spiffe_id.starts_with("spiffe://")
        && !matches!(problem, Some(SvidError::MultipleUriSans { .. }));
    let leaf = PeerCert {
        spiffe_id: one_spiffe_uri.then(|| info.spiffe_id.clone()),
        serial: info.serial,
        not_before: info.not_before,
        not_after: info.not_after,
    };
    (Some(leaf), problem.map(|p| p.to_string()))
}

#[cfg(test)]
mod tests;
