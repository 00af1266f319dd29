//! Served-versus-issued drift on real SPIRE, with our test workloads as
//! child processes: `spire-lab svid-files` writes the real SVID from the real
//! agent; two `spire-lab peer`s serve it. After a real rotation the files hold a
//! new serial while the `--on-hup ignore` peer still serves the old one (and
//! shrugs off a SIGHUP); the SIGHUP that `svid-files` sends through the
//! `--on-hup reload` peer's pidfile makes that one serve the new serial.
//! `svid-files --once` writes once and exits by itself.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use spire_healer::endpoint::Endpoint;
use spire_healer::spiffe_id::SpiffeId;
use tokio::process::{Child, Command};

use crate::spire_lab::peer::{PeerAnswer, ask_serial};
use crate::spire_lab::svid_files::read_svid_files;
use crate::spire_lab::{LabOptions, SpireLab, lab_bin, log_tail};

/// X.509-SVID TTL of the entry: the agent renews at about half of it, and
/// the old certificate stays valid for the rest, long enough to be asked.
const TTL_SECS: u32 = 30;
/// Bound of each wait for a child (files written, address published, …).
const WAIT: Duration = Duration::from_secs(30);
/// Bound of the wait for a real rotation.
const ROTATION_WAIT: Duration = Duration::from_secs(90);
/// Bound of one question to a peer.
const ASK_LIMIT: Duration = Duration::from_secs(5);

/// A `spire-lab …` child; its output goes to `<name>.log`. Stopped
/// by pid (SIGTERM, then SIGKILL); `kill_on_drop` covers early returns.
pub(crate) struct Workload {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Workload {
    pub(crate) fn spawn(name: &'static str, dir: &Path, args: &[&str]) -> Result<Workload> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let child = Command::new(lab_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Workload { name, child, log })
    }

    pub(crate) fn pid(&self) -> Result<Pid> {
        let pid = self.child.id().context("child already reaped")?;
        Ok(Pid::from_raw(i32::try_from(pid)?))
    }

    fn output(&self) -> String {
        log_tail(&self.log)
    }

    /// Fails with the log when the child has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.output());
        }
        Ok(())
    }

    /// SIGTERM by pid, up to 10 s for it to exit, else SIGKILL.
    pub(crate) async fn stop(mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        kill(self.pid()?, Signal::SIGTERM)?;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = kill(self.pid()?, Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                bail!("{} ignored SIGTERM:\n{}", self.name, self.output())
            }
        }
    }
}

/// Polls `check` every 200 ms until it returns `Some`, for at most `limit`;
/// fails if a workload exits meanwhile.
pub(crate) async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    workloads: &mut [&mut Workload],
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        for w in workloads.iter_mut() {
            w.check_running()?;
        }
        if tokio::time::Instant::now() >= deadline {
            let logs: Vec<String> = workloads
                .iter()
                .map(|w| format!("--- {}:\n{}", w.name, w.output()))
                .collect();
            bail!(
                "timed out after {limit:?} waiting for {what}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serial of the leaf in `dir/svid.pem`.
pub(crate) fn file_serial(dir: &Path) -> Option<String> {
    let (chain, _, _) = read_svid_files(dir).ok()?;
    Some(spire_healer::svid::leaf_info(chain.first()?).ok()?.serial)
}

/// The endpoint a peer published.
pub(crate) fn published(addr_file: &Path) -> Option<Endpoint> {
    Endpoint::parse(std::fs::read_to_string(addr_file).ok()?.trim()).ok()
}

/// Asks a peer with the SVID of the files as client certificate. The files
/// are replaced one by one, so a read racing a rotation may pair a new
/// chain with an old key: retried a few times.
async fn ask(peer: &Endpoint, svid_dir: &Path, server_id: &SpiffeId) -> Result<PeerAnswer> {
    let mut last = None;
    for _ in 0..5 {
        let attempt = match read_svid_files(svid_dir) {
            Ok(identity) => ask_serial(peer, identity, server_id, ASK_LIMIT)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match attempt {
            Ok(answer) => return Ok(answer),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        .with_context(|| format!("asking the peer at {peer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_drift_after_a_real_rotation_until_sighup_reloads() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    let uid = nix::unistd::geteuid().as_raw();
    lab.register_entry("/peer", uid, TTL_SECS).await?;
    lab.wait_for_entry_synced("/peer").await?;
    let id = SpiffeId::parse(&lab.spiffe_id("/peer"))?;

    let work = tempfile::tempdir()?;
    let svid_dir = work.path().join("svid");
    std::fs::create_dir(&svid_dir)?;
    let path = |name: &str| work.path().join(name).display().to_string();
    let socket = format!("unix://{}", lab.workload_socket().display());
    let svid = svid_dir.display().to_string();

    let mut writer = Workload::spawn(
        "svid-files",
        work.path(),
        &[
            "svid-files",
            "--socket",
            &socket,
            "--dir",
            &svid,
            "--signal-pidfile",
            &path("reload.pid"),
            "--signal",
            "SIGHUP",
        ],
    )?;
    wait_for("the first SVID files", WAIT, &mut [&mut writer], || async {
        file_serial(&svid_dir)
    })
    .await?;

    // With --once it writes the SVID once and exits by itself.
    let once_dir = work.path().join("once");
    std::fs::create_dir(&once_dir)?;
    let mut once = Workload::spawn(
        "svid-files-once",
        work.path(),
        &[
            "svid-files",
            "--socket",
            &socket,
            "--dir",
            &once_dir.display().to_string(),
            "--once",
        ],
    )?;
    match tokio::time::timeout(WAIT, once.child.wait()).await {
        Ok(status) => assert!(status?.success(), "{}", once.output()),
        Err(_) => {
            let out = once.output();
            once.stop().await?;
            bail!("svid-files --once did not exit:\n{out}");
        }
    }
    assert_eq!(
        once.output().matches("Wrote ").count(),
        1,
        "{}",
        once.output()
    );
    assert!(file_serial(&once_dir).is_some());

    let peer_args = |mode: &'static str| {
        vec![
            "peer".to_string(),
            "--dir".into(),
            svid.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--addr-file".into(),
            path(&format!("{mode}.addr")),
            "--pidfile".into(),
            path(&format!("{mode}.pid")),
            "--on-hup".into(),
            mode.into(),
        ]
    };
    let spawn_peer = |name, mode| {
        let args = peer_args(mode);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Workload::spawn(name, work.path(), &args)
    };
    let mut ignore = spawn_peer("peer-ignore", "ignore")?;
    let mut reload = spawn_peer("peer-reload", "reload")?;
    let (ignore_addr, reload_addr) = (
        work.path().join("ignore.addr"),
        work.path().join("reload.addr"),
    );
    let ignore_at = wait_for(
        "the ignore peer's address",
        WAIT,
        &mut [&mut ignore],
        || {
            let f = ignore_addr.clone();
            async move { published(&f) }
        },
    )
    .await?;
    let reload_at = wait_for(
        "the reload peer's address",
        WAIT,
        &mut [&mut reload],
        || {
            let f = reload_addr.clone();
            async move { published(&f) }
        },
    )
    .await?;
    // The pidfile is written after the address file.
    wait_for(
        "both pidfiles",
        WAIT,
        &mut [&mut ignore, &mut reload],
        || async {
            (work.path().join("ignore.pid").exists() && work.path().join("reload.pid").exists())
                .then_some(())
        },
    )
    .await?;

    // Both serve what the files held when they started.
    let before = ask(&ignore_at, &svid_dir, &id).await?;
    assert_eq!(before.serial, before.certificate_serial);
    let old = before.serial;
    let reload_before = ask(&reload_at, &svid_dir, &id).await?;
    assert_eq!(reload_before.serial, reload_before.certificate_serial);

    // A real rotation: the agent renews, svid-files rewrites the files (and
    // signals the reload peer).
    let new = wait_for(
        "a rotated SVID in the files",
        ROTATION_WAIT,
        &mut [&mut writer, &mut ignore, &mut reload],
        || async { file_serial(&svid_dir).filter(|s| *s != old) },
    )
    .await?;

    // The ignore peer drifts: it still serves the old certificate, SIGHUP or not.
    kill(ignore.pid()?, Signal::SIGHUP)?;
    wait_for(
        "the ignore peer to log the SIGHUP",
        WAIT,
        &mut [&mut ignore],
        || async { ignore_logged(&work.path().join("peer-ignore.log")) },
    )
    .await?;
    let drifted = ask(&ignore_at, &svid_dir, &id).await?;
    assert_eq!(
        drifted.serial, old,
        "the ignore peer must keep its first certificate"
    );
    assert_eq!(drifted.certificate_serial, old);
    assert_ne!(file_serial(&svid_dir).as_deref(), Some(old.as_str()));
    ignore.check_running()?;

    // The reload peer was signalled by svid-files: it serves what the files hold.
    let healed = wait_for(
        "the reload peer to serve the rotated SVID",
        WAIT,
        &mut [&mut writer, &mut reload],
        || async {
            let answer = ask(&reload_at, &svid_dir, &id).await.ok()?;
            let current = file_serial(&svid_dir)?;
            (answer.serial != old && answer.serial == current).then_some(answer)
        },
    )
    .await?;
    assert_eq!(healed.serial, healed.certificate_serial);
    let writer_log = writer.output();
    assert!(
        writer_log.contains(&format!("serial={new}")),
        "{writer_log}"
    );
    assert!(writer_log.contains("Sent SIGHUP to pid"), "{writer_log}");
    let reload_log = reload.output();
    assert!(reload_log.contains("SIGHUP: reloaded"), "{reload_log}");

    // Clean exits on SIGTERM, by pid.
    for w in [ignore, reload, writer] {
        let name = w.name;
        let status = w.stop().await?;
        assert!(status.success(), "{name} exited with {status}");
    }
    assert!(!work.path().join("ignore.pid").exists(), "pidfile removed");
    Ok(())
}

fn ignore_logged(log: &Path) -> Option<()> {
    std::fs::read_to_string(log)
        .ok()?
        .contains("SIGHUP ignored")
        .then_some(())
}
