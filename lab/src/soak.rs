//! `spire-lab soak`: the real spire-healer binary watching a healthy HA lab
//! for a long time, through real SVID rotations and a real CA rotation; it
//! must open no incident, run no action, stay up, and cost little.
//!
//! The lab: an [`HaLab`] (2 servers on PostgreSQL, 2 agents) with SPIRE's
//! default agent `sync_interval` (5 s), `default_x509_svid_ttl` and
//! `agent_ttl` = `--svid-ttl`. Per agent, one workload entry, a
//! `spire-lab svid-files` writer that signals a `spire-lab peer
//! --on-hup reload` (a well-behaved workload) after each write. The healer
//! runs in its own process group with the built-in policy and the config
//! [`healer_config`] writes for the lab, plus a handshake probe per peer and
//! a certificate-file sensor per writer; its store is SQLite in `--out`.
//!
//! At `--ca-rotation-at` each server runs `localauthority x509 prepare`,
//! then (once every agent has persisted the grown bundle) `activate`.
//! Every `--sample-every`: the healer's CPU seconds and RSS (from `/proc`),
//! incidents opened and actions run (its `/metrics`), SVID rotations seen
//! (distinct serials the writers wrote) and `/healthz`. Results in `--out`:
//! `samples.csv`, `soak.json` ([`SoakSummary`]) and `soak.md`.
//!
//! Exit 0 only with zero incidents, zero actions, the healer up throughout
//! and at least one rotation seen; 1 otherwise (the reasons are printed and
//! in `soak.json`); SIGINT/SIGTERM end it early with what was measured.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use super::cmd::DEFAULT_POSTGRES_URL;
use super::manifest::healer_config;
use super::{HaLab, HaOptions, LabError, default_bin_dir, free_port, http_get_status};

/// Exit code for bad arguments (EX_USAGE).
const EXIT_USAGE: i32 = 64;
/// Exit code when the lab cannot start (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: i32 = 69;
/// Bound of each wait for a child (files written, address published, ready).
const WAIT: Duration = Duration::from_secs(60);
/// Bound of the CA rotation (prepare, propagation, activate).
const ROTATION_WAIT: Duration = Duration::from_secs(120);

/// `spire-lab soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// How long to watch (e.g. `1h`, `90s`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub duration: Duration,
    /// X.509-SVID TTL of the workloads and the agents (`default_x509_svid_ttl`
    /// and `agent_ttl`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub svid_ttl: Duration,
    /// The agents' SVID TTL (`agent_ttl`; default: `--svid-ttl`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub agent_ttl: Option<Duration>,
    /// When to rotate the servers' X.509 CAs (default: half the duration).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ca_rotation_at: Option<Duration>,
    /// The spire-healer binary (default: `spire-healer` next to this one).
    #[arg(long)]
    pub healer_bin: Option<PathBuf>,
    /// Folder for the results, the lab and the healer's files.
    #[arg(long)]
    pub out: PathBuf,
    /// PostgreSQL URL of a role with CREATEDB (the lab creates and drops its
    /// own database).
    #[arg(long, env = "SPIRE_HEALER_LAB_PG_URL", default_value = DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,
    /// Folder holding spire-server and spire-agent.
    #[arg(long, env = "SPIRE_HEALER_SPIRE_BIN")]
    pub bin_dir: Option<PathBuf>,
    /// Sampling period.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub sample_every: Duration,
}

/// One row of `samples.csv`.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the healer was ready.
    pub elapsed_s: f64,
    /// The healer's user + system CPU seconds so far.
    pub cpu_s: f64,
    /// The healer's resident set, KiB.
    pub rss_kib: u64,
    /// Incidents opened so far (`spire_healer_incidents_opened_total`).
    pub incidents: u64,
    /// Actions run so far (`spire_healer_actions_total`).
    pub actions: u64,
    /// SVID rotations the writers saw so far (new serials after the first).
    pub rotations: u64,
    /// Whether `/healthz` answered 200.
    pub healthz: bool,
}

/// An incident as the healer's store lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    /// Symptom (incidents) or actuator (actions).
    pub kind: String,
    /// Subject.
    pub subject: String,
    /// The rest of the record, as the healer printed it.
    pub record: serde_json::Value,
}

/// Resource use over one wall-clock hour of the soak (the last may be
/// partial).
#[derive(Debug, Clone, Serialize)]
pub struct HourFigures {
    /// Hour index (0 = first).
    pub hour: u32,
    /// CPU seconds per wall second ×100 over the samples of this hour.
    pub cpu_percent: f64,
    /// Largest RSS sampled, KiB.
    pub rss_max_kib: u64,
    /// Last RSS sampled, KiB.
    pub rss_last_kib: u64,
}

/// `soak.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSummary {
    /// Planned duration, seconds.
    pub planned_s: u64,
    /// Measured (healer ready to last sample), seconds.
    pub measured_s: f64,
    /// Workload SVID TTL, seconds.
    pub svid_ttl_s: u64,
    /// Agent SVID TTL, seconds.
    pub agent_ttl_s: u64,
    /// Agent sync interval.
    pub sync_interval: String,
    /// SVID rotations seen by the writers (all agents).
    pub rotations_seen: u64,
    /// Of those, rotations first seen after the CA rotation.
    pub rotations_after_ca: u64,
    /// Seconds after start when the CA rotation was activated on every
    /// server (`None`: not done).
    pub ca_rotation_done_at_s: Option<f64>,
    /// The activated authority IDs, one per server.
    pub ca_authorities: Vec<String>,
    /// Incidents the healer opened.
    pub incidents: Vec<Found>,
    /// Actions the healer ran.
    pub actions: Vec<Found>,
    /// Resource figures per hour.
    pub hours: Vec<HourFigures>,
    /// Healer restarts (the soak never restarts it: 0, or the soak fails).
    pub healer_restarts: u32,
    /// Whether the healer stayed up and answered `/healthz` at every sample.
    pub healer_up: bool,
    /// Whether SIGINT/SIGTERM ended the soak early.
    pub interrupted: bool,
    /// Why it failed (empty: passed).
    pub problems: Vec<String>,
}

impl SoakSummary {
    /// Whether the soak passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A child in its own process group, killed (group-wide) on drop.
struct Group {
    name: String,
    child: Child,
    pgid: Option<i32>,
    log: PathBuf,
}

impl Group {
    fn spawn(name: &str, bin: &Path, args: &[String], log: PathBuf) -> Result<Self, LabError> {
        let out = std::fs::File::create(&log)
            .map_err(LabError::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(LabError::io(format!("opening {}", log.display())))?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(LabError::io(format!("starting {}", bin.display())))?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        Ok(Self {
            name: name.to_owned(),
            child,
            pgid,
            log,
        })
    }

    fn pid(&self) -> Option<i32> {
        self.pgid
    }

    /// `None` while running; the exit status text once it has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM to the group, up to 5 s, then SIGKILL.
    async fn stop(&mut self) {
        let Some(pg) = self.pgid else { return };
        let _ = killpg(Pid::from_raw(pg), Signal::SIGTERM);
        if timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
            let _ = timeout(Duration::from_secs(5), self.child.wait()).await;
        }
        // Whatever the group still holds (e.g. a restart script's child).
        let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
        self.pgid = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pg) = self.pgid {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
        }
    }
}

/// Polls `check` every 250 ms until it yields, `limit` passes (error naming
/// `what`) or `stop` fires.
async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    stop: &CancellationToken,
    mut check: F,
) -> Result<T, LabError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if stop.is_cancelled() {
            return Err(LabError::State(format!(
                "interrupted while waiting for {what}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: what.to_owned(),
                limit,
            });
        }
        tokio::select! {
            _ = sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0, 5 s deadline): the body.
async fn http_get_body(port: u16, path: &str) -> Option<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = timeout(Duration::from_secs(5), fut).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.split_whitespace()
        .nth(1)
        .is_some_and(|c| c == "200")
        .then(|| body.to_owned())
}

/// Sum of every sample of `family` in a Prometheus text exposition.
pub fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when unknown).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in ticks, from `/proc/PID/stat`.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// utime + stime from the text of a `/proc/PID/stat`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The serials a writer's log reports (`… serial=<hex> …`), in order.
pub fn logged_serials(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.starts_with("Wrote "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("serial="))
                .map(str::to_owned)
        })
        .collect()
}

/// One agent's workload: its entry, file writer and peer.
struct Workload {
    agent: String,
    spiffe_id: String,
    svid_dir: PathBuf,
    peer_addr: String,
    writer: Group,
    peer: Group,
}

impl Workload {
    fn serials(&self) -> BTreeSet<String> {
        let log = std::fs::read_to_string(&self.writer.log).unwrap_or_default();
        logged_serials(&log).into_iter().collect()
    }
}

/// `spire-lab soak`: returns the exit code.
pub async fn main(args: SoakArgs, out: &mut dyn Write) -> i32 {
    let rotation_at = args.ca_rotation_at.unwrap_or(args.duration / 2);
    let problem = if args.duration.is_zero() {
        Some("--duration must be positive".to_owned())
    } else if args.svid_ttl.min(args.agent_ttl.unwrap_or(args.svid_ttl)) < Duration::from_secs(10) {
        Some("--svid-ttl and --agent-ttl must be at least 10s".to_owned())
    } else if args.sample_every.is_zero() {
        Some("--sample-every must be positive".to_owned())
    } else if rotation_at >= args.duration {
        Some("--ca-rotation-at must come before the end of --duration".to_owned())
    } else {
        None
    };
    if let Some(p) = problem {
        eprintln!("error: {p}");
        return EXIT_USAGE;
    }
    let healer_bin = match args.healer_bin.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("spire-healer")))
    }) {
        Some(b) if b.is_file() => b,
        other => {
            eprintln!(
                "error: spire-healer binary not found ({}); pass --healer-bin",
                other.map_or_else(|| "no path".into(), |b| b.display().to_string())
            );
            return EXIT_USAGE;
        }
    };
    let dir =
        match std::fs::create_dir_all(&args.out).and_then(|()| std::fs::canonicalize(&args.out)) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: cannot use {}: {e}", args.out.display());
                return EXIT_USAGE;
            }
        };
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            spire_healer::term::shutdown_signal().await;
            stop.cancel();
        });
    }
    let lab_bin = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot find this executable: {e}");
            return 1;
        }
    };

    let ttl = args.svid_ttl.as_secs();
    let opts = HaOptions {
        postgres_url: args.postgres_url.clone(),
        bin_dir: args.bin_dir.clone().unwrap_or_else(default_bin_dir),
        dir: Some(dir.join("lab")),
        sync_interval: "5s".into(),
        default_x509_svid_ttl: format!("{ttl}s"),
        agent_ttl: format!("{}s", args.agent_ttl.unwrap_or(args.svid_ttl).as_secs()),
        // Long enough that SPIRE never rotates the CA by itself mid-soak.
        ca_ttl: format!("{}s", (args.duration.as_secs() * 10).max(24 * 3600)),
        ..HaOptions::default()
    };
    let _ = writeln!(
        out,
        "Soak: {} with {ttl} s SVIDs, CA rotation at {}; results in {}.",
        humantime::format_duration(args.duration),
        humantime::format_duration(rotation_at),
        dir.display()
    );
    let _ = out.flush();
    let lab = tokio::select! {
        lab = HaLab::start(opts) => lab,
        _ = stop.cancelled() => {
            eprintln!("Interrupted while starting; stopped.");
            return 130;
        }
    };
    let lab = match lab {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot start the lab: {e}");
            return EXIT_UNAVAILABLE;
        }
    };
    let code = match run(
        &args,
        rotation_at,
        &healer_bin,
        &lab_bin,
        &dir,
        &lab,
        &stop,
        out,
    )
    .await
    {
        Ok(summary) => {
            let passed = summary.passed();
            if let Err(e) = write_results(&dir, &summary) {
                eprintln!("error: {e}");
            }
            let _ = write!(out, "{}", markdown(&summary));
            if passed { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    if let Err(e) = lab.stop().await {
        eprintln!("error while stopping the lab: {e}");
    }
    code
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &SoakArgs,
    rotation_at: Duration,
    healer_bin: &Path,
    lab_bin: &Path,
    dir: &Path,
    lab: &HaLab,
    stop: &CancellationToken,
    out: &mut dyn Write,
) -> Result<SoakSummary, LabError> {
    let ttl = u32::try_from(args.svid_ttl.as_secs()).unwrap_or(u32::MAX);
    let uid = nix::unistd::geteuid().as_raw();
    for (j, a) in lab.agents().iter().enumerate() {
        lab.register_entry(j, &format!("/soak/{}", a.name()), uid, ttl)
            .await?;
    }
    for (j, a) in lab.agents().iter().enumerate() {
        lab.wait_for_entry_synced(j, &format!("/soak/{}", a.name()))
            .await?;
    }

    // The workloads: a writer that signals its peer after each write, and
    // a peer that reloads on SIGHUP.
    let mut workloads = Vec::new();
    for a in lab.agents() {
        let w = dir.join("workloads").join(a.name());
        let svid_dir = w.join("svid");
        std::fs::create_dir_all(&svid_dir)
            .map_err(LabError::io(format!("creating {}", svid_dir.display())))?;
        let p = |f: &str| w.join(f).display().to_string();
        let writer = Group::spawn(
            &format!("svid-files {}", a.name()),
            lab_bin,
            &[
                "svid-files".into(),
                "--socket".into(),
                format!("unix://{}", a.workload_socket().display()),
                "--dir".into(),
                svid_dir.display().to_string(),
                "--signal-pidfile".into(),
                p("peer.pid"),
            ],
            w.join("svid-files.log"),
        )?;
        let cert = svid_dir.join("svid.pem");
        wait_for("the first SVID files", WAIT, stop, || async {
            cert.is_file().then_some(())
        })
        .await?;
        let peer = Group::spawn(
            &format!("peer {}", a.name()),
            lab_bin,
            &[
                "peer".into(),
                "--dir".into(),
                svid_dir.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--addr-file".into(),
                p("peer.addr"),
                "--pidfile".into(),
                p("peer.pid"),
                "--on-hup".into(),
                "reload".into(),
            ],
            w.join("peer.log"),
        )?;
        let addr_file = w.join("peer.addr");
        let peer_addr = wait_for("the peer's address", WAIT, stop, || async {
            std::fs::read_to_string(&addr_file)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .await?;
        workloads.push(Workload {
            agent: a.name().to_owned(),
            spiffe_id: lab.spiffe_id(&format!("/soak/{}", a.name())),
            svid_dir,
            peer_addr,
            writer,
            peer,
        });
    }

    // The healer.
    let port = free_port()?;
    let db = dir.join("healer.db");
    let store = format!("sqlite://{}", db.display());
    let mut config = healer_config(
        &lab.manifest(),
        &store,
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
    );
    for w in &workloads {
        let _ = writeln!(
            config,
            "[[probes]]\nname = {n:?}\naddress = {addr:?}\nspiffe_id = {id:?}\nagent = {agent:?}\n\n\
             [[cert_files]]\nname = {f:?}\ncert_path = {cert:?}\nbundle_path = {bundle:?}\nagent = {agent:?}\n",
            n = format!("peer-{}", w.agent),
            f = format!("svid-{}", w.agent),
            addr = w.peer_addr,
            id = w.spiffe_id,
            agent = w.agent,
            cert = w.svid_dir.join("svid.pem").display().to_string(),
            bundle = w.svid_dir.join("bundle.pem").display().to_string(),
        );
    }
    let config_path = dir.join("spire-healer.toml");
    super::write_file(&config_path, config.as_bytes())?;
    let mut healer = Group::spawn(
        "spire-healer",
        healer_bin,
        &[
            "run".into(),
            "--config".into(),
            config_path.display().to_string(),
        ],
        dir.join("healer.log"),
    )?;
    let mut early_exit = None;
    let ready = wait_for("spire-healer's /healthz", WAIT, stop, || {
        if early_exit.is_none() {
            early_exit = healer.exited();
        }
        let gone = early_exit.is_some();
        async move {
            if gone {
                return Some(false);
            }
            (http_get_status(port, "/healthz").await.ok() == Some(200)).then_some(true)
        }
    })
    .await;
    let ready = match ready {
        Ok(false) => Err(LabError::State("spire-healer exited".into())),
        Ok(true) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = ready {
        let status = healer.exited().unwrap_or_else(|| "running".into());
        return Err(LabError::State(format!(
            "spire-healer not ready ({status}): {e}\n{}",
            healer.tail()
        )));
    }
    let healer_pid = healer.pid().unwrap_or_default();
    let _ = writeln!(
        out,
        "spire-healer (pid {healer_pid}) ready on 127.0.0.1:{port}; config {}.",
        config_path.display()
    );
    let _ = out.flush();

    let ticks = clock_ticks();
    let start = Instant::now();
    let end = start + args.duration;
    let rotate_at = start + rotation_at;
    let first_serials: u64 = workloads.iter().map(|w| w.serials().len() as u64).sum();
    let mut csv = String::from("elapsed_s,cpu_s,rss_kib,incidents,actions,rotations,healthz\n");
    let mut samples: Vec<Sample> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut healer_up = true;
    let mut ca_done_at = None;
    let mut ca_ids = Vec::new();
    let mut serials_at_ca: Option<u64> = None;
    let mut next_sample = start;
    let mut rotated = false;
    let interrupted = loop {
        if stop.is_cancelled() {
            break true;
        }
        let now = Instant::now();
        if !rotated && now >= rotate_at {
            rotated = true;
            let _ = writeln!(out, "Rotating the X.509 CAs.");
            let _ = out.flush();
            serials_at_ca = Some(workloads.iter().map(|w| w.serials().len() as u64).sum());
            match rotate_ca(lab, stop).await {
                Ok(ids) => {
                    let at = start.elapsed().as_secs_f64();
                    let _ = writeln!(out, "CA rotation done at {at:.0} s: {}", ids.join(", "));
                    ca_done_at = Some(at);
                    ca_ids = ids;
                }
                Err(e) => problems.push(format!("the CA rotation failed: {e}")),
            }
            continue;
        }
        if now >= next_sample || now >= end {
            let s = sample(
                start,
                healer_pid,
                port,
                ticks,
                &workloads,
                first_serials,
                samples.last(),
            )
            .await;
            let _ = writeln!(
                csv,
                "{:.1},{:.2},{},{},{},{},{}",
                s.elapsed_s, s.cpu_s, s.rss_kib, s.incidents, s.actions, s.rotations, s.healthz
            );
            super::write_file(&dir.join("samples.csv"), csv.as_bytes())?;
            let _ = writeln!(
                out,
                "{:>7.0} s  cpu {:.2} s  rss {} KiB  incidents {}  actions {}  rotations {}  healthz {}",
                s.elapsed_s, s.cpu_s, s.rss_kib, s.incidents, s.actions, s.rotations, s.healthz
            );
            let _ = out.flush();
            if !s.healthz && healer_up {
                healer_up = false;
                problems.push(format!(
                    "spire-healer did not answer /healthz at {:.0} s",
                    s.elapsed_s
                ));
            }
            samples.push(s);
            while next_sample <= now {
                next_sample += args.sample_every;
            }
            if now >= end {
                break false;
            }
        }
        if let Some(status) = healer.exited() {
            healer_up = false;
            problems.push(format!(
                "spire-healer exited ({status}) at {:.0} s:\n{}",
                start.elapsed().as_secs_f64(),
                healer.tail()
            ));
            break false;
        }
        for w in &mut workloads {
            for g in [&mut w.writer, &mut w.peer] {
                if let Some(status) = g.exited() {
                    problems.push(format!("{} exited ({status}):\n{}", g.name, g.tail()));
                }
            }
        }
        if problems.iter().any(|p| p.contains(" exited (")) {
            break false;
        }
        let mut wake = next_sample.min(end);
        if !rotated {
            wake = wake.min(rotate_at);
        }
        // Check the children at least every 5 s.
        wake = wake.min(Instant::now() + Duration::from_secs(5));
        tokio::select! {
            _ = sleep_until(wake) => {}
            _ = stop.cancelled() => {}
        }
    };
    if interrupted {
        let s = sample(
            start,
            healer_pid,
            port,
            ticks,
            &workloads,
            first_serials,
            samples.last(),
        )
        .await;
        let _ = writeln!(
            csv,
            "{:.1},{:.2},{},{},{},{},{}",
            s.elapsed_s, s.cpu_s, s.rss_kib, s.incidents, s.actions, s.rotations, s.healthz
        );
        let _ = super::write_file(&dir.join("samples.csv"), csv.as_bytes());
        samples.push(s);
        problems.push("interrupted (SIGINT/SIGTERM) before the end".into());
    }

    // What the healer recorded, from its store.
    let incidents = listing(healer_bin, "incidents", &store, "symptom").await;
    let actions = listing(healer_bin, "actions", &store, "actuator").await;
    healer.stop().await;
    for w in &mut workloads {
        w.peer.stop().await;
        w.writer.stop().await;
    }

    let total_serials: u64 = workloads.iter().map(|w| w.serials().len() as u64).sum();
    let rotations_seen = total_serials.saturating_sub(first_serials);
    let rotations_after_ca = serials_at_ca.map_or(0, |at| total_serials.saturating_sub(at));
    let (incidents, actions) = match (incidents, actions) {
        (Ok(i), Ok(a)) => (i, a),
        (i, a) => {
            for e in [i.as_ref().err(), a.as_ref().err()].into_iter().flatten() {
                problems.push(format!("cannot read the healer's store: {e}"));
            }
            (i.unwrap_or_default(), a.unwrap_or_default())
        }
    };
    let last = samples.last();
    let counted_incidents = last.map_or(0, |s| s.incidents);
    let counted_actions = last.map_or(0, |s| s.actions);
    if !incidents.is_empty() || counted_incidents > 0 {
        let list: Vec<String> = incidents
            .iter()
            .map(|f| format!("{} on {}", f.kind, f.subject))
            .collect();
        problems.push(format!(
            "{} incident(s) opened: {}",
            incidents.len().max(counted_incidents as usize),
            list.join("; ")
        ));
    }
    if !actions.is_empty() || counted_actions > 0 {
        let list: Vec<String> = actions
            .iter()
            .map(|f| format!("{} on {}", f.kind, f.subject))
            .collect();
        problems.push(format!(
            "{} action(s) run: {}",
            actions.len().max(counted_actions as usize),
            list.join("; ")
        ));
    }
    if rotations_seen == 0 && !interrupted {
        problems.push("no SVID rotation seen".into());
    }
    if ca_done_at.is_none() && !interrupted && !problems.iter().any(|p| p.contains("CA rotation")) {
        problems.push("the CA rotation did not happen".into());
    }
    Ok(SoakSummary {
        planned_s: args.duration.as_secs(),
        measured_s: last.map_or(0.0, |s| s.elapsed_s),
        svid_ttl_s: args.svid_ttl.as_secs(),
        agent_ttl_s: args.agent_ttl.unwrap_or(args.svid_ttl).as_secs(),
        sync_interval: "5s".into(),
        rotations_seen,
        rotations_after_ca,
        ca_rotation_done_at_s: ca_done_at,
        ca_authorities: ca_ids,
        incidents,
        actions,
        hours: per_hour(&samples),
        healer_restarts: 0,
        healer_up,
        interrupted,
        problems,
    })
}

/// One sample. `/healthz` and `/metrics` get three tries, 1 s apart (a
/// loaded machine may miss one deadline); counters `/metrics` did not give
/// carry `prev`'s values.
async fn sample(
    start: Instant,
    pid: i32,
    port: u16,
    ticks: f64,
    workloads: &[Workload],
    first_serials: u64,
    prev: Option<&Sample>,
) -> Sample {
    let mut metrics = None;
    let mut healthz = false;
    for attempt in 0..3 {
        if attempt > 0 {
            sleep(Duration::from_secs(1)).await;
        }
        if metrics.is_none() {
            metrics = http_get_body(port, "/metrics").await;
        }
        healthz = healthz || http_get_status(port, "/healthz").await.ok() == Some(200);
        if healthz && metrics.is_some() {
            break;
        }
    }
    let serials: u64 = workloads.iter().map(|w| w.serials().len() as u64).sum();
    let (incidents, actions) = match &metrics {
        Some(m) => (
            metric_sum(m, "spire_healer_incidents_opened_total") as u64,
            metric_sum(m, "spire_healer_actions_total") as u64,
        ),
        None => prev.map_or((0, 0), |p| (p.incidents, p.actions)),
    };
    Sample {
        elapsed_s: start.elapsed().as_secs_f64(),
        cpu_s: cpu_ticks(pid).map_or(0.0, |t| t as f64 / ticks),
        rss_kib: rss_kib(pid).unwrap_or(0),
        incidents,
        actions,
        rotations: serials.saturating_sub(first_serials),
        healthz,
    }
}

/// CPU % and RSS per wall-clock hour of samples.
pub fn per_hour(samples: &[Sample]) -> Vec<HourFigures> {
    let mut hours = Vec::new();
    let mut prev: Option<&Sample> = None;
    let mut hour_start: Option<&Sample> = None;
    let mut cur: Option<HourFigures> = None;
    for s in samples {
        let h = (s.elapsed_s / 3600.0) as u32;
        if cur.as_ref().is_some_and(|c| c.hour != h) {
            hours.extend(cur.take());
            hour_start = prev;
        }
        let base = hour_start.or(samples.first()).unwrap_or(s);
        let wall = s.elapsed_s - base.elapsed_s;
        let cpu_percent = if wall > 0.0 {
            (s.cpu_s - base.cpu_s) / wall * 100.0
        } else {
            0.0
        };
        let c = cur.get_or_insert(HourFigures {
            hour: h,
            cpu_percent: 0.0,
            rss_max_kib: 0,
            rss_last_kib: 0,
        });
        c.cpu_percent = (cpu_percent * 1000.0).round() / 1000.0;
        c.rss_max_kib = c.rss_max_kib.max(s.rss_kib);
        c.rss_last_kib = s.rss_kib;
        prev = Some(s);
    }
    hours.extend(cur);
    hours
}

/// `prepare` on every server, wait until every agent has persisted the
/// grown bundle, then `activate` each prepared authority; returns their IDs.
async fn rotate_ca(lab: &HaLab, stop: &CancellationToken) -> Result<Vec<String>, LabError> {
    let servers = lab.servers().len();
    let mut prepared = Vec::new();
    for i in 0..servers {
        lab.server_cli(i, &["localauthority", "x509", "prepare"])
            .await?;
        let show = lab
            .server_cli(i, &["localauthority", "x509", "show", "-output", "json"])
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&show.stdout).map_err(|e| LabError::Output {
                command: "spire-server localauthority x509 show".into(),
                reason: e.to_string(),
                output: String::from_utf8_lossy(&show.stdout).into_owned(),
            })?;
        let id = v["prepared"]["authority_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if id.is_empty() {
            return Err(LabError::State(format!(
                "server {i} shows no prepared authority after prepare"
            )));
        }
        prepared.push(id);
    }
    let agents = lab.agents().len();
    wait_for(
        "the prepared CAs in every agent's bundle",
        ROTATION_WAIT,
        stop,
        || async {
            (0..agents)
                .all(|j| {
                    lab.agent(j)
                        .stored_bundle_cas()
                        .is_some_and(|n| n >= 2 * servers)
                })
                .then_some(())
        },
    )
    .await?;
    for (i, id) in prepared.iter().enumerate() {
        lab.server_cli(
            i,
            &["localauthority", "x509", "activate", "-authorityID", id],
        )
        .await?;
    }
    Ok(prepared)
}

/// `spire-healer <what> -o json --store URL --limit 1000`: each row's
/// `key` field and subject.
async fn listing(bin: &Path, what: &str, store: &str, key: &str) -> Result<Vec<Found>, LabError> {
    let cmd = format!("spire-healer {what} -o json --store {store}");
    let o = timeout(
        Duration::from_secs(30),
        Command::new(bin)
            .args([what, "-o", "json", "--store", store, "--limit", "1000"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| LabError::Timeout {
        what: cmd.clone(),
        limit: Duration::from_secs(30),
    })?
    .map_err(LabError::io(cmd.clone()))?;
    if !o.status.success() {
        return Err(LabError::Output {
            command: cmd,
            reason: o.status.to_string(),
            output: String::from_utf8_lossy(&o.stderr).into_owned(),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| LabError::Output {
        command: cmd.clone(),
        reason: e.to_string(),
        output: String::from_utf8_lossy(&o.stdout)
            .chars()
            .take(200)
            .collect(),
    })?;
    let rows = match &v {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Object(m) => m
            .values()
            .find_map(|x| x.as_array().cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(rows
        .into_iter()
        .map(|r| {
            let subject = [&r["subject"], &r["params"]["subject"], &r["target"]]
                .into_iter()
                .find_map(|v| v.as_str().filter(|s| !s.is_empty()))
                .unwrap_or_default()
                .to_owned();
            Found {
                kind: r[key].as_str().unwrap_or_default().to_owned(),
                subject,
                record: r,
            }
        })
        .collect())
}

fn write_results(dir: &Path, s: &SoakSummary) -> Result<(), LabError> {
    let json = serde_json::to_string_pretty(s).map_err(|e| LabError::State(e.to_string()))?;
    super::write_file(&dir.join("soak.json"), json.as_bytes())?;
    super::write_file(&dir.join("soak.md"), markdown(s).as_bytes())
}

/// `soak.md`: the summary for people.
pub fn markdown(s: &SoakSummary) -> String {
    let mut t = String::new();
    let verdict = if s.passed() { "PASSED" } else { "FAILED" };
    let _ = writeln!(t, "# spire-healer soak: {verdict}\n");
    let _ = writeln!(t, "| | |\n|---|---|");
    let _ = writeln!(
        t,
        "| duration | {:.0} s measured of {} s planned{} |",
        s.measured_s,
        s.planned_s,
        if s.interrupted { " (interrupted)" } else { "" }
    );
    let _ = writeln!(
        t,
        "| SVID / agent TTL | {} s / {} s (agent sync interval {}) |",
        s.svid_ttl_s, s.agent_ttl_s, s.sync_interval
    );
    let _ = writeln!(
        t,
        "| SVID rotations seen | {} ({} after the CA rotation) |",
        s.rotations_seen, s.rotations_after_ca
    );
    let _ = writeln!(
        t,
        "| CA rotation | {} |",
        s.ca_rotation_done_at_s.map_or_else(
            || "not done".to_owned(),
            |at| format!("activated at {at:.0} s ({})", s.ca_authorities.join(", "))
        )
    );
    let _ = writeln!(t, "| incidents | {} |", s.incidents.len());
    let _ = writeln!(t, "| actions | {} |", s.actions.len());
    let _ = writeln!(
        t,
        "| healer up / restarts | {} / {} |",
        if s.healer_up { "yes" } else { "no" },
        s.healer_restarts
    );
    let _ = writeln!(
        t,
        "\n| hour | CPU % | RSS max (MiB) | RSS last (MiB) |\n|---|---|---|---|"
    );
    for h in &s.hours {
        let _ = writeln!(
            t,
            "| {} | {:.3} | {:.1} | {:.1} |",
            h.hour,
            h.cpu_percent,
            h.rss_max_kib as f64 / 1024.0,
            h.rss_last_kib as f64 / 1024.0
        );
    }
    for (title, list) in [("Incidents", &s.incidents), ("Actions", &s.actions)] {
        if !list.is_empty() {
            let _ = writeln!(t, "\n{title}:");
            for f in list {
                let _ = writeln!(t, "- {} on {}: {}", f.kind, f.subject, f.record);
            }
        }
    }
    if !s.problems.is_empty() {
        let _ = writeln!(t, "\nProblems:");
        for p in &s.problems {
            let _ = writeln!(t, "- {p}");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_from_stat() {
        let stat =
            "1234 (spire healer) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn metric_sums_every_series_of_a_family() {
        let text = "# HELP x\nspire_healer_actions_total{actuator=\"a\",outcome=\"ok\"} 2\n\
                    spire_healer_actions_total{actuator=\"b\",outcome=\"ok\"} 1\n\
                    spire_healer_actions_total_other 9\n";
        assert_eq!(metric_sum(text, "spire_healer_actions_total"), 3.0);
        assert_eq!(metric_sum(text, "spire_healer_incidents_opened_total"), 0.0);
    }

    #[test]
    fn serials_from_writer_log() {
        let log = "Wrote svid.pem, svid_key.pem, bundle.pem: spiffe_id=spiffe://t/w serial=ab not_after=1\n\
                   Signalled pid 3\nWrote svid.pem, svid_key.pem, bundle.pem: spiffe_id=spiffe://t/w serial=cd not_after=2\n";
        assert_eq!(logged_serials(log), vec!["ab", "cd"]);
    }

    #[test]
    fn cpu_percent_per_hour() {
        let s = |elapsed_s: f64, cpu_s: f64, rss_kib: u64| Sample {
            elapsed_s,
            cpu_s,
            rss_kib,
            incidents: 0,
            actions: 0,
            rotations: 0,
            healthz: true,
        };
        let h = per_hour(&[
            s(0.0, 1.0, 10),
            s(1800.0, 10.0, 30),
            s(3600.0, 19.0, 20),
            s(7200.0, 55.0, 5),
        ]);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].cpu_percent, 0.5);
        assert_eq!((h[0].rss_max_kib, h[0].rss_last_kib), (30, 30));
        assert_eq!(h[2].cpu_percent, 1.0);
    }
}
