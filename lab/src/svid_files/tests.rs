use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt as _;
use std::sync::{Arc, Mutex};

use super::*;
use spire_healer::clock::{Clock, SystemClock};
use spire_healer::proto::workload::X509svid;
use spire_healer::simulated::agent::FakeAgent;
use spire_healer::simulated::issuer::{Flavor, TestCa};

pub(crate) const TD: &str = "healer.test";
const ID: &str = "spiffe://healer.test/workload";
const LIMIT: Duration = Duration::from_secs(10);

// === Fixtures (also used by the peer's tests) ===

/// A CA valid from a minute ago for an hour.
pub(crate) fn test_ca(trust_domain: &str) -> TestCa {
    let now = SystemClock.now();
    TestCa::new(
        trust_domain,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
    .unwrap()
}

/// (leaf DER, PKCS#8 key DER, serial as `LeafInfo` prints it), valid now.
pub(crate) fn issue(ca: &TestCa, spiffe_id: &str) -> (Vec<u8>, Vec<u8>, String) {
    let now = SystemClock.now();
    let (leaf, key, serial) = ca
        .issue(
            spiffe_id,
            now - Duration::from_secs(10),
            now + Duration::from_secs(600),
            Flavor::Valid,
        )
        .unwrap();
    (leaf, key, format!("{serial:x}"))
}

/// A `FetchX509SVID` message holding one fresh SVID of `ca`.
pub(crate) fn svid_response(ca: &TestCa, spiffe_id: &str) -> (X509svidResponse, String) {
    let (leaf, key, serial) = issue(ca, spiffe_id);
    let resp = X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: spiffe_id.to_string(),
            x509_svid: leaf,
            x509_svid_key: key,
            bundle: ca.der().to_vec(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    };
    (resp, serial)
}

/// Writes a fresh SVID of `ca` into `dir`; returns its serial.
pub(crate) fn write_svid(dir: &Path, ca: &TestCa, spiffe_id: &str) -> String {
    let (resp, serial) = svid_response(ca, spiffe_id);
    let files = SvidFileSet::from_response(&resp).unwrap();
    assert_eq!(files.serial, serial);
    files.write(dir).unwrap();
    serial
}

/// A `Write` whose bytes stay readable after being moved into a task.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Notified on each "Skipped an update." logged on this thread while the
/// guard lives (the test runtime runs `run` on this thread).
fn skipped_updates() -> (Arc<tokio::sync::Notify>, tracing::subscriber::DefaultGuard) {
    let notify = Arc::new(tokio::sync::Notify::new());
    let guard = tracing::subscriber::set_default(Skips(notify.clone()));
    (notify, guard)
}

struct Skips(Arc<tokio::sync::Notify>);

impl tracing::Subscriber for Skips {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                if field.name() == "message" {
                    self.0 |= format!("{value:?}") == "Skipped an update.";
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        if m.0 {
            self.0.notify_one();
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn started_agent(dir: &Path) -> (FakeAgent, Vec<u8>) {
    let ca = test_ca(TD);
    let bundle = ca.der().to_vec();
    let agent = FakeAgent::new(
        ca,
        ID,
        Duration::from_secs(600),
        Arc::new(SystemClock),
        &dir.join("agent.sock"),
    );
    agent.start().unwrap();
    (agent, bundle)
}

fn options(agent: &FakeAgent, dir: &Path, once: bool) -> SvidFilesOptions {
    SvidFilesOptions {
        endpoint: Endpoint::Unix(agent.socket().to_path_buf()),
        dir: dir.to_path_buf(),
        once,
        signal: None,
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn file_serial(dir: &Path) -> Option<String> {
    let (chain, _, _) = read_svid_files(dir).ok()?;
    Some(svid::leaf_info(chain.first()?).ok()?.serial)
}

async fn wait_for_serial(dir: &Path, want: &str) {
    let waited = timeout(LIMIT, async {
        while file_serial(dir).as_deref() != Some(want) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "svid.pem never held serial {want} (holds {:?})",
        file_serial(dir)
    );
}

// === Tests ===

#[tokio::test]
async fn once_writes_the_three_files_with_their_modes_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let (agent, bundle) = started_agent(tmp.path());
    let serial = format!("{:x}", agent.serial().unwrap());

    let mut out = Vec::new();
    let writes = timeout(
        LIMIT,
        run(
            &options(&agent, &out_dir, true),
            CancellationToken::new(),
            &mut out,
        ),
    )
    .await
    .expect("--once returns after the first write")
    .unwrap();
    assert_eq!(writes, 1);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches("Wrote ").count(), 1, "{text}");
    assert!(text.contains(&format!("serial={serial}")), "{text}");
    assert!(text.contains(&format!("spiffe_id={ID}")), "{text}");

    // Exactly the three files: no temporary file is left behind.
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [BUNDLE_FILE, SVID_FILE, KEY_FILE]);
    assert_eq!(mode(&out_dir.join(KEY_FILE)), 0o600);
    assert_eq!(mode(&out_dir.join(SVID_FILE)), 0o644);
    assert_eq!(mode(&out_dir.join(BUNDLE_FILE)), 0o644);

    let key_pem = std::fs::read_to_string(out_dir.join(KEY_FILE)).unwrap();
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "{key_pem}"
    );
    let cert_pem = std::fs::read_to_string(out_dir.join(SVID_FILE)).unwrap();
    assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(!cert_pem.contains('\r'));

    let (chain, key, read_bundle) = read_svid_files(&out_dir).unwrap();
    assert_eq!(chain.len(), 1);
    assert_eq!(svid::leaf_info(&chain[0]).unwrap().serial, serial);
    assert_eq!(read_bundle, vec![bundle]);
    // The key is the leaf's: rustls accepts the pair.
    spire_healer::spire_api::tls::client_config((chain, key, read_bundle), None).unwrap();
}

#[tokio::test]
async fn rewrites_on_every_update_and_after_a_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let (agent, _) = started_agent(tmp.path());
    let opts = options(&agent, &out_dir, false);
    let out = Shared::default();
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let (token, mut out) = (token.clone(), out.clone());
        async move { run(&opts, token, &mut out).await }
    });

    let first = format!("{:x}", agent.serial().unwrap());
    wait_for_serial(&out_dir, &first).await;
    // A rotation on the open stream.
    agent.serve_flavor(Flavor::Valid);
    let second = format!("{:x}", agent.serial().unwrap());
    assert_ne!(first, second);
    wait_for_serial(&out_dir, &second).await;
    // The agent crashes and comes back with a new SVID: reconnect.
    agent.restart().unwrap();
    let third = format!("{:x}", agent.serial().unwrap());
    wait_for_serial(&out_dir, &third).await;

    token.cancel();
    let writes = timeout(LIMIT, task).await.unwrap().unwrap().unwrap();
    assert!(writes >= 3, "{writes} writes");
    let text = out.text();
    for serial in [&first, &second, &third] {
        assert!(text.contains(&format!("serial={serial} ")), "{text}");
    }
}

#[tokio::test]
async fn an_unusable_update_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let (agent, _) = started_agent(tmp.path());
    let opts = options(&agent, tmp.path(), false);
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let token = token.clone();
        async move { run(&opts, token, &mut io::sink()).await }
    });
    let good = format!("{:x}", agent.serial().unwrap());
    wait_for_serial(tmp.path(), &good).await;
    let (skipped, _guard) = skipped_updates();
    agent.serve_flavor(Flavor::CaLeaf);
    // Then a valid one again: the files only ever held valid SVIDs.
    timeout(LIMIT, skipped.notified())
        .await
        .expect("the unusable update was never skipped");
    assert_eq!(file_serial(tmp.path()).as_deref(), Some(good.as_str()));
    agent.serve_flavor(Flavor::Valid);
    let next = format!("{:x}", agent.serial().unwrap());
    wait_for_serial(tmp.path(), &next).await;
    token.cancel();
    timeout(LIMIT, task).await.unwrap().unwrap().unwrap();
}

#[test]
fn a_concurrent_reader_never_sees_a_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = test_ca(TD);
    let sets: Vec<SvidFileSet> = (0..4)
        .map(|_| SvidFileSet::from_response(&svid_response(&ca, ID).0).unwrap())
        .collect();
    sets[0].write(tmp.path()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = std::thread::spawn({
        let (dir, stop) = (tmp.path().to_path_buf(), stop.clone());
        move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (name, tag) in [(SVID_FILE, CERTIFICATE_TAG), (KEY_FILE, KEY_TAG)] {
                    let blocks = read_pem(&dir.join(name), tag).unwrap();
                    assert_eq!(blocks.len(), 1, "{name}");
                }
                reads += 1;
            }
            reads
        }
    });
    for i in 0..40 {
        sets[i % sets.len()].write(tmp.path()).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

#[test]
fn from_response_takes_the_first_valid_svid() {
    let ca = test_ca(TD);
    let empty = X509svidResponse {
        svids: Vec::new(),
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    };
    assert!(matches!(
        SvidFileSet::from_response(&empty),
        Err(SvidFilesError::NoUsableSvid(_))
    ));
    let (mut resp, _) = svid_response(&ca, ID);
    let (second, serial) = svid_response(&ca, "spiffe://healer.test/second");
    resp.svids[0].x509_svid = vec![0x30, 0x82, 0x04, 0x00];
    resp.svids.extend(second.svids);
    let files = SvidFileSet::from_response(&resp).unwrap();
    assert_eq!(files.serial, serial);
    assert_eq!(files.spiffe_id, "spiffe://healer.test/second");
    assert!(!format!("{files:?}").contains("PRIVATE"));
}

#[test]
fn read_rejects_missing_and_garbled_files() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        read_svid_files(tmp.path()),
        Err(SvidFilesError::Io { .. })
    ));
    write_svid(tmp.path(), &test_ca(TD), ID);
    read_svid_files(tmp.path()).unwrap();
    std::fs::write(tmp.path().join(SVID_FILE), "not pem").unwrap();
    assert!(matches!(
        read_svid_files(tmp.path()),
        Err(SvidFilesError::Pem { .. })
    ));
    // A key where the chain belongs.
    std::fs::copy(tmp.path().join(KEY_FILE), tmp.path().join(SVID_FILE)).unwrap();
    let err = read_svid_files(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("expected CERTIFICATE"), "{err}");
}

#[test]
fn signal_pidfile_refuses_what_is_not_a_live_process() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("p.pid");
    let refused = |text: &str| {
        std::fs::write(&pidfile, text).unwrap();
        let e = signal_pidfile(&pidfile, Signal::SIGHUP).unwrap_err();
        assert!(matches!(e, SvidFilesError::Pidfile { .. }), "{e}");
        e.to_string()
    };
    let missing = signal_pidfile(&tmp.path().join("none"), Signal::SIGHUP).unwrap_err();
    assert_eq!(missing.kind(), "pidfile");
    assert!(refused("garbage").contains("does not hold a pid"));
    assert!(refused("1").contains("never signalled"));
    assert!(refused(&std::process::id().to_string()).contains("this very process"));
    let mut done = std::process::Command::new("true").spawn().unwrap();
    done.wait().unwrap();
    assert!(refused(&done.id().to_string()).contains("not running"));
}

#[test]
fn signal_pidfile_signals_a_live_process() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("p.pid");
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    std::fs::write(&pidfile, format!("{}\n", child.id())).unwrap();
    let sent = signal_pidfile(&pidfile, Signal::SIGHUP);
    let mut status = None;
    for _ in 0..100 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(sent.unwrap(), child.id() as i32);
    assert_eq!(status.and_then(|s| s.signal()), Some(Signal::SIGHUP as i32));
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let mut b = BACKOFF_MIN;
    let mut seen = vec![b];
    for _ in 0..8 {
        b = next_backoff(b);
        seen.push(b);
    }
    assert_eq!(seen[1], Duration::from_millis(400));
    assert_eq!(*seen.last().unwrap(), BACKOFF_MAX);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn arguments_parse() {
    use clap::Parser as _;
    let parse = |args: &[&str]| {
        crate::cmd::Cli::try_parse_from(["spire-lab", "svid-files"].iter().chain(args).copied())
    };
    let cli = parse(&[
        "--socket",
        "unix:///tmp/a.sock",
        "--dir",
        "/tmp",
        "--signal-pidfile",
        "/tmp/p.pid",
    ])
    .unwrap();
    let crate::cmd::LabCommand::SvidFiles(args) = cli.command else {
        panic!("not svid-files");
    };
    let opts = args.options().unwrap();
    assert_eq!(
        opts.signal,
        Some((PathBuf::from("/tmp/p.pid"), Signal::SIGHUP))
    );
    assert!(!opts.once);
    // --signal needs --signal-pidfile.
    assert!(
        parse(&[
            "--socket",
            "unix:///a",
            "--dir",
            "/tmp",
            "--signal",
            "SIGHUP"
        ])
        .is_err()
    );
    let bad = SvidFilesArgs {
        socket: "unix:///a".into(),
        dir: "/tmp".into(),
        once: true,
        signal_pidfile: Some("/p".into()),
        signal: "SIGNOPE".into(),
    };
    assert_eq!(bad.options().unwrap_err().kind(), "unknown_signal");
    let relative = SvidFilesArgs {
        socket: "unix://rel".into(),
        signal_pidfile: None,
        ..bad
    };
    assert_eq!(relative.options().unwrap_err().kind(), "endpoint");
}
