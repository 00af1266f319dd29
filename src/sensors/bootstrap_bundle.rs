//! `bootstrap_bundle` sensor: reads one agent's bootstrap trust bundle, the
//! PEM file its `trust_bundle_path` names.
//!
//! An agent reads that file only when it has no bundle of its own: at its
//! first start, and after losing its `data_dir`. Until then nothing shows
//! that the file went stale (e.g. after a CA rotation that revoked every
//! authority it holds), so the file is watched here and compared with the
//! current bundle by analysis (`bootstrap_bundle_stale`).
//!
//! A background task stats the file every `poll_interval` and re-reads it
//! when its metadata changed or while it is in error (the same watched-file
//! logic as [`super::cert_files`]). Its certificates go through the strict
//! PEM intake ([`crate::svid::pem`]) and are published as SHA-256
//! fingerprints of their DER, the form the server views carry
//! ([`crate::model::Authority::fingerprint`]). An unusable file publishes no
//! authorities and a closed-set error kind, and counts an error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::cert_files::{DEFAULT_MAX_BYTES, Watched};
use super::workload_api::fingerprint;
use crate::clock::Clock;
use crate::model::{BootstrapBundleView, Reading};
use crate::telemetry::Metrics;

/// Settings for one agent's bootstrap bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Configured agent name.
    pub agent: String,
    /// The agent's `trust_bundle_path`.
    pub path: PathBuf,
    /// Time between polls of the file's metadata.
    pub poll_interval: Duration,
    /// Largest file accepted, in bytes.
    pub max_bytes: usize,
}

impl Settings {
    /// Settings polling every `poll_interval`, with the default size bound.
    pub fn new(
        agent: impl Into<String>,
        path: impl Into<PathBuf>,
        poll_interval: Duration,
    ) -> Self {
        Self {
            agent: agent.into(),
            path: path.into(),
            poll_interval,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// The sensor half: reads the published view.
pub type BootstrapBundleSensor = super::Snapshot<BootstrapBundleView>;

/// The background task half.
pub struct BootstrapBundleTask {
    settings: Settings,
    file: Watched,
    view: watch::Sender<Arc<BootstrapBundleView>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
}

/// Builds the sensor and its task. Until the first poll the view is not
/// `read`. `wake` is notified whenever the view changes beyond its
/// timestamp.
pub fn build(
    settings: Settings,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> (BootstrapBundleSensor, BootstrapBundleTask) {
    let (tx, rx) = watch::channel(Arc::new(BootstrapBundleView {
        agent: settings.agent.clone(),
        path: settings.path.display().to_string(),
        read: false,
        authorities: Vec::new(),
        error: None,
        updated_at: clock.now(),
    }));
    (
        super::Snapshot::new(
            "bootstrap_bundle",
            settings.agent.clone(),
            rx,
            Reading::BootstrapBundle,
        ),
        BootstrapBundleTask {
            file: Watched::new(settings.path.clone()),
            settings,
            view: tx,
            clock,
            metrics,
            wake,
        },
    )
}

impl BootstrapBundleTask {
    /// Polls immediately, then every `poll_interval`, until `shutdown`.
    ///
    /// # Cancel safety
    /// Holds only the open file while reading; dropping it closes it.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut cadence = super::Cadence::new(self.settings.poll_interval);
        while cadence.next(&shutdown).await {
            if super::until_shutdown(
                &shutdown,
                super::timed(self.metrics.clone(), "bootstrap_bundle", self.poll_once()),
            )
            .await
            .is_none()
            {
                return;
            }
        }
    }

    /// One poll of the file, then publishes the view.
    pub(crate) async fn poll_once(&mut self) {
        self.file.poll(self.settings.max_bytes).await;
        let previous = self.view.borrow().clone();
        let error = self.file.error.as_ref().map(|e| e.kind());
        let authorities = match (&self.file.error, &self.file.good) {
            (None, Some(certs)) => {
                let mut fps: Vec<String> = certs.iter().map(|c| fingerprint(c)).collect();
                fps.sort();
                fps.dedup();
                fps
            }
            _ => Vec::new(),
        };
        let agent = &self.settings.agent;
        if let Some(e) = &self.file.error {
            self.metrics.error("sensor", e.kind());
            if previous.error.as_deref() != Some(e.kind()) {
                warn!(agent = %agent, kind = e.kind(), error = %e, "Bootstrap bundle unusable.");
            }
        } else if authorities != previous.authorities {
            info!(agent = %agent, authorities = authorities.len(), "Bootstrap bundle read.");
        }
        let view = BootstrapBundleView {
            agent: agent.clone(),
            path: previous.path.clone(),
            read: true,
            authorities,
            error: error.map(str::to_string),
            updated_at: self.clock.now(),
        };
        let changed = !previous.read
            || view.error != previous.error
            || view.authorities != previous.authorities;
        self.view.send_replace(Arc::new(view));
        if changed {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use futures::FutureExt;

    use super::*;
    use crate::clock::ManualClock;
    use crate::sensors::Sensor;
    use crate::simulated::issuer::TestCa;
    use crate::svid::pem::encode;
    use crate::telemetry::metrics::sample;

    const T0: u64 = 1_700_000_000;

    fn ca() -> TestCa {
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        TestCa::new("example.org", t(T0 - 3600), t(T0 + 86_400)).expect("ca")
    }

    struct Rig {
        dir: tempfile::TempDir,
        task: BootstrapBundleTask,
        sensor: BootstrapBundleSensor,
        metrics: Arc<Metrics>,
        clock: Arc<ManualClock>,
        wake: Arc<Notify>,
    }

    impl Rig {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let settings = Settings::new(
                "node-a",
                dir.path().join("bundle.pem"),
                Duration::from_secs(1),
            );
            let metrics = Arc::new(Metrics::new());
            let clock = Arc::new(ManualClock::at_unix(T0));
            let wake = Arc::new(Notify::new());
            let (sensor, task) = build(settings, clock.clone(), metrics.clone(), wake.clone());
            Self {
                dir,
                task,
                sensor,
                metrics,
                clock,
                wake,
            }
        }

        fn write(&self, pem: &str) {
            std::fs::write(self.dir.path().join("bundle.pem"), pem).expect("write");
        }

        /// Advances the clock, polls once; the view and whether `wake` fired.
        async fn poll(&mut self) -> (Arc<BootstrapBundleView>, bool) {
            self.clock.advance(Duration::from_secs(1));
            self.task.poll_once().await;
            let woke = self.wake.notified().now_or_never().is_some();
            match self.sensor.observe().await.expect("observe").remove(0) {
                Reading::BootstrapBundle(v) => {
                    assert_eq!(v.updated_at, self.clock.now());
                    (v, woke)
                }
                other => panic!("bootstrap_bundle produced {other:?}"),
            }
        }

        fn errors(&self, kind: &str) -> f64 {
            let series = format!(r#"spire_healer_errors_total{{kind="{kind}",stage="sensor"}}"#);
            sample(&self.metrics.render(), &series).unwrap_or(0.0)
        }
    }

    #[tokio::test]
    async fn not_read_until_the_first_poll() {
        let r = Rig::new();
        let v = r.sensor.view();
        assert!(!v.read && v.error.is_none() && v.authorities.is_empty());
        assert_eq!(r.sensor.name(), "bootstrap_bundle");
        assert_eq!(r.sensor.instance(), "node-a");
    }

    #[tokio::test]
    async fn fingerprints_every_certificate_like_the_server_views() {
        let (a, b) = (ca(), ca());
        let mut r = Rig::new();
        // Twice the same CA counts once.
        r.write(
            &[
                encode("CERTIFICATE", b.der()),
                encode("CERTIFICATE", a.der()),
            ]
            .concat(),
        );
        let (v, woke) = r.poll().await;
        assert!(v.read && woke);
        assert_eq!(v.error, None);
        let mut want = vec![fingerprint(a.der()), fingerprint(b.der())];
        want.sort();
        assert_eq!(v.authorities, want);
        assert_eq!(v.authorities[0].len(), 64);
        // Unchanged: no wake, no error counted.
        let (_, woke) = r.poll().await;
        assert!(!woke);
        assert_eq!(r.errors("missing"), 0.0);
        r.write(&encode("CERTIFICATE", a.der()));
        // A rewrite within the same second may keep the mtime: the size
        // differs, so it is re-read.
        let (v, woke) = r.poll().await;
        assert!(woke);
        assert_eq!(v.authorities, vec![fingerprint(a.der())]);
    }

    #[tokio::test]
    async fn missing_or_garbled_file_is_an_error_with_no_authorities() {
        let mut r = Rig::new();
        let (v, woke) = r.poll().await;
        assert!(v.read && woke);
        assert_eq!(v.error.as_deref(), Some("missing"));
        assert!(v.authorities.is_empty());
        assert_eq!(r.errors("missing"), 1.0);
        r.write(&encode("CERTIFICATE", ca().der()));
        let (v, _) = r.poll().await;
        assert_eq!((v.error.as_deref(), v.authorities.len()), (None, 1));
        r.write("-----BEGIN CERTIFICATE-----\nMIIB\n");
        let (v, woke) = r.poll().await;
        assert!(woke);
        assert_eq!(v.error.as_deref(), Some("truncated"));
        assert!(v.authorities.is_empty());
        let (_, woke) = r.poll().await;
        assert!(!woke);
        assert_eq!(r.errors("truncated"), 2.0);
    }

    #[tokio::test]
    async fn the_task_polls_until_shutdown() {
        let r = Rig::new();
        r.write(&encode("CERTIFICATE", ca().der()));
        let stop = CancellationToken::new();
        let handle = tokio::spawn(r.task.run(stop.clone()));
        let v = crate::sensors::wait_for_view(
            r.sensor.subscribe(),
            "first read",
            Duration::from_secs(10),
            |v| v.read,
        )
        .await;
        assert_eq!(v.authorities.len(), 1);
        stop.cancel();
        handle.await.expect("task");
    }
}
