//! The sensor against real files in a temp directory, polled one step at a
//! time (`poll_once`), plus one run of the task itself. Each test asserts
//! the sensor's metrics.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use futures::FutureExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::ManualClock;
use crate::sensors::Sensor;
use crate::simulated::issuer::{Flavor, TestCa};
use crate::telemetry::metrics::sample;

const T0: u64 = 1_700_000_000;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn new_ca(td: &str) -> TestCa {
    TestCa::new(td, t(T0 - 3600), t(T0 + 86_400)).expect("ca")
}

/// An SVID chain (leaf only) as PEM and its serial in hex.
fn svid_pem(ca: &TestCa, not_after: u64) -> (String, String) {
    let (der, _key, serial) = ca
        .issue(
            "spiffe://example.org/web",
            t(T0 - 60),
            t(not_after),
            Flavor::Valid,
        )
        .expect("leaf");
    (pem("CERTIFICATE", &der), format!("{serial:x}"))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).expect("ascii"));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

struct Rig {
    dir: tempfile::TempDir,
    task: CertFileTask,
    sensor: CertFileSensor,
    metrics: Arc<Metrics>,
    clock: Arc<ManualClock>,
    wake: Arc<Notify>,
}

impl Rig {
    fn new(with_bundle: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = CertFileConfig::new("web", dir.path().join("svid.pem"));
        if with_bundle {
            cfg.bundle_path = Some(dir.path().join("bundle.pem"));
        }
        cfg.agent = Some("node-a".into());
        let metrics = Arc::new(Metrics::new());
        let clock = Arc::new(ManualClock::at_unix(T0));
        let wake = Arc::new(Notify::new());
        let (sensor, task) = build(cfg, clock.clone(), metrics.clone(), wake.clone());
        Self {
            dir,
            task,
            sensor,
            metrics,
            clock,
            wake,
        }
    }

    fn write(&self, file: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.dir.path().join(file), bytes).expect("write");
    }

    /// Advances the clock by a second, polls once, returns the view and
    /// whether `wake` was notified.
    async fn poll(&mut self) -> (Arc<CertFileView>, bool) {
        self.clock.advance(Duration::from_secs(1));
        self.task.poll_once().await;
        let woke = self.wake.notified().now_or_never().is_some();
        let mut readings = self.sensor.observe().await.expect("observe");
        match readings.remove(0) {
            Reading::CertFile(v) => {
                assert_eq!(v.updated_at, self.clock.now());
                (v, woke)
            }
            other => panic!("cert_files produced {other:?}"),
        }
    }

    fn errors(&self, kind: &str) -> f64 {
        let series = format!(r#"spire_healer_errors_total{{kind="{kind}",stage="sensor"}}"#);
        sample(&self.metrics.render(), &series).unwrap_or(0.0)
    }

    fn expiry(&self) -> Option<f64> {
        sample(
            &self.metrics.render(),
            r#"spire_healer_cert_file_expiration_timestamp_seconds{file="web"}"#,
        )
    }
}

#[tokio::test]
async fn valid_file_and_bundle() {
    let ca = new_ca("example.org");
    let mut r = Rig::new(true);
    let (svid, serial) = svid_pem(&ca, T0 + 3600);
    r.write("svid.pem", &svid);
    r.write("bundle.pem", pem("CERTIFICATE", ca.der()));
    let (v, woke) = r.poll().await;
    assert!(woke);
    assert_eq!(v.file, "web");
    assert_eq!(v.agent.as_deref(), Some("node-a"));
    assert!(v.path.ends_with("svid.pem"));
    assert_eq!(v.error, None);
    assert_eq!(v.bundle_error, None);
    assert_eq!(v.invalid, None);
    let leaf = v.leaf.as_ref().expect("leaf");
    assert_eq!(leaf.serial, serial);
    assert_eq!(leaf.spiffe_id.as_deref(), Some("spiffe://example.org/web"));
    assert_eq!(leaf.not_after, t(T0 + 3600));
    assert_eq!(v.bundle, vec![fingerprint(ca.der())]);
    assert_eq!(v.changed_at, t(T0 + 1));
    assert_eq!(r.expiry(), Some((T0 + 3600) as f64));
    assert_eq!(r.errors("missing") + r.errors("truncated"), 0.0);

    // Nothing changed: no wake, changed_at stays.
    let (v, woke) = r.poll().await;
    assert!(!woke);
    assert_eq!(v.changed_at, t(T0 + 1));
}

#[tokio::test]
async fn rewrite_with_new_serial_is_detected_and_a_touch_is_not() {
    let ca = new_ca("example.org");
    let mut r = Rig::new(false);
    let (first, serial1) = svid_pem(&ca, T0 + 3600);
    r.write("svid.pem", &first);
    let (v, _) = r.poll().await;
    assert_eq!(v.leaf.as_ref().expect("leaf").serial, serial1);
    assert_eq!(v.invalid, None, "leaf-only checks pass without a bundle");
    assert!(v.bundle.is_empty() && v.bundle_error.is_none());

    // Same bytes rewritten (new mtime): not a change.
    r.write("svid.pem", &first);
    let (v, woke) = r.poll().await;
    assert!(!woke);
    assert_eq!(v.changed_at, t(T0 + 1));

    let (second, serial2) = svid_pem(&ca, T0 + 7200);
    assert_ne!(serial1, serial2);
    r.write("svid.pem", &second);
    let (v, woke) = r.poll().await;
    assert!(woke);
    assert_eq!(v.leaf.as_ref().expect("leaf").serial, serial2);
    assert_eq!(v.changed_at, t(T0 + 3));
    assert_eq!(r.expiry(), Some((T0 + 7200) as f64));
}

#[tokio::test]
async fn half_written_file_keeps_the_last_good_leaf() {
    let ca = new_ca("example.org");
    let mut r = Rig::new(false);
    let (first, serial1) = svid_pem(&ca, T0 + 3600);
    r.write("svid.pem", &first);
    r.poll().await;

    let (second, serial2) = svid_pem(&ca, T0 + 7200);
    r.write("svid.pem", &second[..second.len() / 2]);
    let (v, woke) = r.poll().await;
    assert!(woke);
    assert_eq!(v.error.as_deref(), Some("truncated"));
    assert_eq!(v.leaf.as_ref().expect("kept").serial, serial1);
    assert_eq!(r.errors("truncated"), 1.0);
    assert_eq!(
        r.expiry(),
        Some((T0 + 3600) as f64),
        "gauge keeps the old leaf"
    );

    // Still half-written: re-read, still an error, counted again.
    r.poll().await;
    assert_eq!(r.errors("truncated"), 2.0);

    // The writer finishes.
    r.write("svid.pem", &second);
    let (v, woke) = r.poll().await;
    assert!(woke);
    assert_eq!(v.error, None);
    assert_eq!(v.leaf.as_ref().expect("leaf").serial, serial2);
    assert_eq!(r.expiry(), Some((T0 + 7200) as f64));
}

#[tokio::test]
async fn bad_contents_are_classified() {
    let ca = new_ca("example.org");
    let mut r = Rig::new(false);
    let key = pem("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
    let (svid, _) = svid_pem(&ca, T0 + 3600);
    let big = format!("{}{svid}", " ".repeat(DEFAULT_MAX_BYTES));
    let cases: [(&[u8], &str); 5] = [
        (key.as_bytes(), "not_a_certificate"),
        (b"", "empty"),
        (b"\x00\x01garbage\xff", "not_pem"),
        (ca.der(), "not_pem"),
        (big.as_bytes(), "too_large"),
    ];
    for (bytes, kind) in cases {
        r.write("svid.pem", bytes);
        let (v, _) = r.poll().await;
        assert_eq!(v.error.as_deref(), Some(kind));
        assert_eq!(v.leaf, None, "never had a good leaf");
    }
    assert_eq!(r.errors("not_pem"), 2.0);
    assert_eq!(r.errors("too_large"), 1.0);
    assert_eq!(r.errors("empty"), 1.0);
    assert_eq!(r.errors("not_a_certificate"), 1.0);
    assert_eq!(r.expiry(), None, "no leaf, no gauge");
}

#[tokio::test]
async fn missing_then_created() {
    let ca = new_ca("example.org");
    let mut r = Rig::new(false);
    let (v, woke) = r.poll().await;
    assert!(woke);
    assert_eq!(v.error.as_deref(), Some("missing"));
    assert_eq!(v.leaf, None);
    assert_eq!(r.errors("missing"), 1.0);

    let (svid, serial) = svid_pem(&ca, T0 + 3600);
    r.write("svid.pem", &svid);
    let (v, woke) = r.poll().await;
    assert!(woke);
    assert_eq!(v.error, None);
    assert_eq!(v.leaf.as_ref().expect("leaf").serial, serial);
    assert_eq!(v.changed_at, t(T0 + 2));

    // Removed again: the leaf is kept, the error says why.
    std::fs::remove_file(r.dir.path().join("svid.pem")).expect("rm");
    let (v, _) = r.poll().await;
    assert_eq!(v.error.as_deref(), Some("missing"));
    assert_eq!(v.leaf.as_ref().expect("kept").serial, serial);
    assert_eq!(r.errors("missing"), 2.0);
}

#[cfg(unix)]
#[tokio::test]
async fn a_directory_is_unreadable() {
    let mut r = Rig::new(false);
    std::fs::create_dir(r.dir.path().join("svid.pem")).expect("mkdir");
    let (v, _) = r.poll().await;
    assert_eq!(v.error.as_deref(), Some("unreadable"));
    assert_eq!(r.errors("unreadable"), 1.0);
}

#[tokio::test]
async fn bundle_parsing_and_verification() {
    let ca = new_ca("example.org");
    let other = new_ca("other.org");
    let mut r = Rig::new(true);
    let (svid, _) = svid_pem(&ca, T0 + 3600);
    r.write(
        "svid.pem",
        format!("{svid}{}", pem("CERTIFICATE", ca.der())),
    );

    // Bundle missing: chain rules only, bundle_error says why.
    let (v, _) = r.poll().await;
    assert_eq!(v.error, None);
    assert_eq!(v.bundle_error.as_deref(), Some("missing"));
    assert_eq!(v.invalid, None);
    assert_eq!(r.errors("missing"), 1.0);

    // A foreign bundle: the chain does not verify.
    r.write("bundle.pem", pem("CERTIFICATE", other.der()));
    let (v, woke) = r.poll().await;
    assert!(woke);
    assert_eq!(v.bundle_error, None);
    assert_eq!(v.bundle, vec![fingerprint(other.der())]);
    let invalid = v.invalid.as_deref().expect("untrusted");
    assert!(
        invalid.contains("not signed by any certificate"),
        "{invalid}"
    );

    // Both CAs, repeated and out of order: sorted, deduplicated, verifies.
    let both = [other.der(), ca.der(), other.der()]
        .map(|d| pem("CERTIFICATE", d))
        .concat();
    r.write("bundle.pem", both);
    let (v, _) = r.poll().await;
    let mut want = vec![fingerprint(ca.der()), fingerprint(other.der())];
    want.sort();
    assert_eq!(v.bundle, want);
    assert_eq!(v.invalid, None);

    // A bad bundle rewrite keeps the last good bundle.
    r.write("bundle.pem", "-----BEGIN CERTIFICATE-----\nMII");
    let (v, _) = r.poll().await;
    assert_eq!(v.bundle_error.as_deref(), Some("truncated"));
    assert_eq!(v.bundle, want);
    assert_eq!(v.invalid, None);
    assert_eq!(v.error, None);
    assert_eq!(r.errors("truncated"), 1.0);
}

#[tokio::test]
async fn svid_rule_violations_are_reported() {
    let ca = new_ca("example.org");
    let mut r = Rig::new(false);
    let (der, _, _) = ca
        .issue(
            "spiffe://example.org/web",
            t(T0),
            t(T0 + 60),
            Flavor::TwoUriSans,
        )
        .expect("leaf");
    r.write("svid.pem", pem("CERTIFICATE", &der));
    let (v, _) = r.poll().await;
    assert_eq!(v.error, None, "it is a certificate");
    let leaf = v.leaf.as_ref().expect("leaf");
    assert_eq!(leaf.spiffe_id, None, "two URI SANs name no single identity");
    assert!(
        v.invalid
            .as_deref()
            .expect("invalid")
            .contains("2 URI SANs")
    );
    assert_eq!(r.expiry(), Some((T0 + 60) as f64));
}

#[tokio::test]
async fn task_runs_until_shutdown() {
    let ca = new_ca("example.org");
    let dir = tempfile::tempdir().expect("tempdir");
    let (svid, serial) = svid_pem(&ca, T0 + 3600);
    std::fs::write(dir.path().join("svid.pem"), svid).expect("write");
    let mut cfg = CertFileConfig::new("web", dir.path().join("svid.pem"));
    cfg.poll_interval = Duration::from_millis(10);
    let metrics = Arc::new(Metrics::new());
    let clock = Arc::new(ManualClock::at_unix(T0));
    let (sensor, task) = build(cfg, clock, metrics.clone(), Arc::new(Notify::new()));
    assert_eq!(sensor.name(), "cert_files");
    assert_eq!(sensor.instance(), "web");
    let mut views = sensor.subscribe();
    let token = CancellationToken::new();
    let handle = tokio::spawn(task.run(token.clone()));
    let wait = Duration::from_secs(10);
    tokio::time::timeout(wait, views.wait_for(|v| v.leaf.is_some()))
        .await
        .expect("a view with a leaf")
        .expect("sender alive");
    assert_eq!(sensor.view().leaf.as_ref().expect("leaf").serial, serial);
    assert_eq!(
        sample(
            &metrics.render(),
            r#"spire_healer_cert_file_expiration_timestamp_seconds{file="web"}"#
        ),
        Some((T0 + 3600) as f64)
    );
    token.cancel();
    tokio::time::timeout(wait, handle)
        .await
        .expect("stops on shutdown")
        .expect("no panic");
}

#[test]
fn config_defaults_and_problems() {
    let cfg: CertFileConfig = toml::from_str(
        r#"
name = "web"
cert_path = "/run/svid/svid.pem"
"#,
    )
    .expect("parses");
    assert_eq!(cfg, CertFileConfig::new("web", "/run/svid/svid.pem"));
    assert_eq!(cfg.poll_interval, Duration::from_secs(2));
    assert_eq!(cfg.max_bytes, 1024 * 1024);
    assert!(cfg.problems().is_empty());

    let full: CertFileConfig = toml::from_str(
        r#"
name = "web"
cert_path = "/run/svid/svid.pem"
bundle_path = "/run/svid/bundle.pem"
agent = "node-a"
poll_interval = "500ms"
max_bytes = 4096
"#,
    )
    .expect("parses");
    assert_eq!(full.poll_interval, Duration::from_millis(500));
    assert_eq!(full.agent.as_deref(), Some("node-a"));
    assert!(full.problems().is_empty());

    assert!(
        toml::from_str::<CertFileConfig>("name = \"a\"\ncert_path = \"/a\"\nkey_path = \"/b\"\n")
            .is_err(),
        "unknown fields are rejected"
    );

    let bad = CertFileConfig {
        name: " ".into(),
        cert_path: "svid.pem".into(),
        bundle_path: Some("svid.pem".into()),
        agent: Some(String::new()),
        poll_interval: Duration::ZERO,
        max_bytes: 0,
    };
    let fields: Vec<&str> = bad.problems().into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        [
            "name",
            "cert_path",
            "bundle_path",
            "bundle_path",
            "agent",
            "poll_interval",
            "max_bytes"
        ]
    );
    let mut other = CertFileConfig::new("w", "");
    other.bundle_path = Some("/dir/".into());
    other.max_bytes = MAX_MAX_BYTES + 1;
    let fields: Vec<&str> = other.problems().into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["cert_path", "bundle_path", "max_bytes"]);
}
