//! `spire-lab chaos`: the benchmark runner.
//!
//! For each planned (fault, supervisor, run), in the seeded order of
//! [`faults::plan`]: a fresh [`HaLab`] (2 servers on PostgreSQL, 2 agents,
//! SPIRE's default agent `sync_interval` of 5 s, SVID and agent TTLs of
//! `--svid-ttl`), agent 0 routed to server A through a [`CutProxy`], a
//! workload entry on agent 0 and a reference peer's entry on agent 1; then
//! the supervisor under test starts (spire-healer as a child process in its
//! own process group with the built-in policy; the kubelet or systemd
//! baseline over both agents and both servers; or nothing), the run waits
//! until the workload is healthy, injects the fault, and polls the heal
//! check ([`heal`]) every 250 ms until healed or `--window` passes. Every
//! process a run starts is killed at its end.
//!
//! Injection: the moment the fault is made, except where the fault only
//! takes effect at the agent's next sync: for `entry_deleted` the moment
//! agent 0 stops serving the workload's SVID, for `peer_never_reloads` the
//! moment it serves the new SVID after the entry bump (the rotation the
//! peer misses). `both_servers_killed` starts whichever server is still
//! down after `--servers-down` (an operator bringing them back).
//!
//! Timing: `detect_s` is the first incident spire-healer opened after the
//! injection, or a baseline's first `LivenessFailed`/`Exited` event on a
//! unit in the fault's scope; `heal_s` is the first passing heal check.
//! Actions are judged by [`faults::classify`].

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use spire_healer::clock::{Clock as _, SystemClock};
use spire_healer::endpoint::Endpoint;
use spire_healer::knowledge::{ActionRecord, IncidentRecord, Query, Store};
use spire_healer::sensors::server_api::error_chain;
use spire_healer::spire_api::ServerAdminClient;

use super::faults::{
    self, AGENT_0, CutProxy, PEER, PlannedRun, Reach, Scope, SeenAction, ServerTimeline,
};
use super::heal::{self, Fetched, NotHealed, RefPeer};
use super::supervise::{self, Baseline, Event, EventKind, KubeletSettings, SystemdSettings, Unit};
use super::{ChaosOptions, Fault, RunRecord, SupervisorKind, report};
use crate::{HaLab, HaOptions, LabError, default_bin_dir, http_get_status, write_file};

/// Heal-check period.
const POLL: Duration = Duration::from_millis(250);
/// How long a run waits for the lab to be healthy before the injection.
const HEALTHY_LIMIT: Duration = Duration::from_secs(90);
/// How often spire-healer's store and the servers' bundle are re-read.
const SLOW_POLL: Duration = Duration::from_secs(1);
/// Path of the workload's entry.
const WORKLOAD_PATH: &str = "/workload";
/// Path of the reference peer's entry (on agent 1).
const REF_PATH: &str = "/reference";

/// `spire-lab chaos`.
#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// Runs per (fault, supervisor).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Seed of the order of runs (the same seed, the same order).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Faults to inject, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<Fault>,
    /// Supervisors to compare, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub supervisors: Vec<SupervisorKind>,
    /// SVID and agent TTL of the labs (e.g. `120s`).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub svid_ttl: Duration,
    /// How long each run waits for healing (default: the SVID TTL).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub window: Option<Duration>,
    /// How long both servers stay down in both_servers_killed.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub servers_down: Duration,
    /// The spire-healer binary (default: `spire-healer` next to this one).
    #[arg(long)]
    pub healer_bin: Option<PathBuf>,
    /// PostgreSQL URL of a role with CREATEDB.
    #[arg(long, env = "SPIRE_HEALER_TEST_PG_URL")]
    pub postgres_url: String,
    /// Folder holding spire-server and spire-agent.
    #[arg(long, env = "SPIRE_HEALER_SPIRE_BIN")]
    pub bin_dir: Option<PathBuf>,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
}

impl ChaosArgs {
    /// The options these arguments select.
    ///
    /// # Errors
    /// [`LabError::Options`]: no runs, an empty window, or no way to find
    /// this program.
    pub fn options(&self) -> Result<ChaosOptions, LabError> {
        let exe = std::env::current_exe()
            .map_err(|e| LabError::Options(format!("cannot locate this program: {e}")))?;
        if self.runs == 0 {
            return Err(LabError::Options("--runs must be at least 1".into()));
        }
        let window = self.window.unwrap_or(self.svid_ttl);
        if window.is_zero() || self.svid_ttl < Duration::from_secs(10) {
            return Err(LabError::Options(
                "--window must be positive and --svid-ttl at least 10s".into(),
            ));
        }
        let healer_bin = self
            .healer_bin
            .clone()
            .unwrap_or_else(|| exe.with_file_name("spire-healer"));
        if !healer_bin.is_file() {
            return Err(LabError::Options(format!(
                "no spire-healer binary at {} (build it, or pass --healer-bin)",
                healer_bin.display()
            )));
        }
        let or_all = |v: &Vec<Fault>| {
            if v.is_empty() {
                Fault::ALL.to_vec()
            } else {
                v.clone()
            }
        };
        Ok(ChaosOptions {
            runs: self.runs,
            seed: self.seed,
            faults: or_all(&self.faults),
            supervisors: if self.supervisors.is_empty() {
                SupervisorKind::ALL.to_vec()
            } else {
                self.supervisors.clone()
            },
            svid_ttl: self.svid_ttl,
            window,
            servers_down: self.servers_down,
            healer_bin,
            lab_bin: exe,
            postgres_url: self.postgres_url.clone(),
            bin_dir: self.bin_dir.clone().unwrap_or_else(default_bin_dir),
            out: self.out.clone(),
        })
    }
}

/// `spire-lab chaos`: runs the benchmark, writes its files and prints the
/// Markdown table; returns the exit code (64 for bad arguments, 1 when the
/// output cannot be written).
pub async fn main(args: ChaosArgs, out: &mut (dyn Write + Send)) -> i32 {
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return 64;
        }
    };
    match benchmark(&opts, out).await {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Runs every planned run in order, writing `runs.json` after each, then
/// the report files; prints one line per run and the Markdown table to
/// `out`. A run whose setup fails is recorded (not healed, the error in its
/// notes) and the benchmark goes on. SIGINT or SIGTERM ends the current
/// run (its lab and processes are stopped) and reports the runs done.
///
/// # Errors
/// [`LabError::Io`] when the output directory or a file cannot be written.
pub async fn benchmark(
    opts: &ChaosOptions,
    out: &mut (dyn Write + Send),
) -> Result<Vec<RunRecord>, LabError> {
    crate::make_dir(&opts.out)?;
    let planned = faults::plan(&opts.faults, &opts.supervisors, opts.runs, opts.seed);
    let started = Instant::now();
    let mut records = Vec::with_capacity(planned.len());
    for (k, p) in planned.iter().enumerate() {
        let _ = writeln!(
            out,
            "[{}/{}] {} under {} (run {}) …",
            k + 1,
            planned.len(),
            p.fault,
            p.supervisor,
            p.run
        );
        let _ = out.flush();
        let outcome = tokio::select! {
            r = run_one(opts, *p) => r,
            _ = spire_healer::term::shutdown_signal() => {
                // The run's future is dropped: its lab and processes with it.
                let _ = writeln!(out, "Interrupted: {} runs recorded in runs.json.", records.len());
                break;
            }
        };
        let record = match outcome {
            Ok(r) => r,
            Err(e) => RunRecord {
                fault: p.fault,
                supervisor: p.supervisor,
                run: p.run,
                seed: opts.seed,
                detect_s: None,
                heal_s: None,
                window_s: opts.window.as_secs_f64(),
                disruptive_actions: 0,
                wrong_actions: 0,
                notes: format!("run failed: {}", one_line(&e.to_string())),
            },
        };
        let _ = writeln!(
            out,
            "    detect {} heal {} disruptive {} wrong {} — {}",
            secs(record.detect_s),
            secs(record.heal_s),
            record.disruptive_actions,
            record.wrong_actions,
            record.notes
        );
        records.push(record);
        write_json(&opts.out.join("runs.json"), &records)?;
    }
    let summaries = report::summarize(&records);
    write_file(
        &opts.out.join("runs.csv"),
        report::records_csv(&records).as_bytes(),
    )?;
    write_file(
        &opts.out.join("summary.csv"),
        report::summary_csv(&summaries).as_bytes(),
    )?;
    let md = report::markdown(&summaries);
    write_file(&opts.out.join("chaos.md"), md.as_bytes())?;
    report::svg_chart(&summaries, &opts.out.join("chaos.svg"))?;
    let _ = writeln!(
        out,
        "\n{md}\n{} runs in {:.0} s; files in {}",
        records.len(),
        started.elapsed().as_secs_f64(),
        opts.out.display()
    );
    Ok(records)
}

fn write_json(path: &Path, records: &[RunRecord]) -> Result<(), LabError> {
    let text = serde_json::to_string_pretty(records)
        .map_err(|e| LabError::State(format!("encoding runs.json: {e}")))?;
    write_file(path, text.as_bytes())
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{s:.1}s"))
}

fn one_line(s: &str) -> String {
    let line: String = s
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    line.replace(',', ";")
}

fn unix_ms() -> i64 {
    SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// === One run ===

/// What a run started that must be stopped at its end.
struct Cleanup {
    shutdown: CancellationToken,
    healer_pgid: Option<i32>,
    healer: Option<tokio::process::Child>,
    pidfiles: Vec<PathBuf>,
    baseline: Option<tokio::task::JoinHandle<()>>,
}

impl Cleanup {
    fn run(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.baseline.take() {
            h.abort();
        }
        if let Some(pg) = self.healer_pgid.take() {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
        }
        // Dropped with kill_on_drop: tokio reaps it.
        self.healer.take();
        for pf in &self.pidfiles {
            if let Some(pid) = std::fs::read_to_string(pf)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(|p| *p > 1)
            {
                // The peer runs in its own session (setsid): its group.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// The peer of [`Fault::PeerNeverReloads`]: files following agent 0's
/// workload SVID, and a `spire-lab peer --on-hup ignore` serving them.
struct FaultedPeer {
    endpoint: Endpoint,
    pidfile: PathBuf,
    restart: String,
}

/// Runs one planned run on a fresh lab.
///
/// # Errors
/// The lab, the supervisor or the injection cannot be set up, or the lab
/// never becomes healthy before the injection.
pub async fn run_one(opts: &ChaosOptions, p: PlannedRun) -> Result<RunRecord, LabError> {
    let work = tempfile::Builder::new()
        .prefix("chaos")
        .tempdir_in("/tmp")
        .map_err(LabError::io("creating the run directory"))?;
    let w = work.path().to_path_buf();
    let ttl = opts.svid_ttl.as_secs().max(10);
    let ttl_s = format!("{ttl}s");
    let lab = Arc::new(
        HaLab::start(HaOptions {
            postgres_url: opts.postgres_url.clone(),
            bin_dir: opts.bin_dir.clone(),
            default_x509_svid_ttl: ttl_s.clone(),
            agent_ttl: ttl_s,
            // SPIRE's default.
            sync_interval: "5s".into(),
            ..HaOptions::default()
        })
        .await?,
    );
    let result = run_on(opts, p, &lab, &w, ttl as u32).await;
    let _ = lab.thaw_agent(0);
    let _ = lab.stop().await;
    result
}

async fn run_on(
    opts: &ChaosOptions,
    p: PlannedRun,
    lab: &Arc<HaLab>,
    w: &Path,
    ttl: u32,
) -> Result<RunRecord, LabError> {
    let mut cleanup = Cleanup {
        shutdown: CancellationToken::new(),
        healer_pgid: None,
        healer: None,
        pidfiles: Vec::new(),
        baseline: None,
    };
    // Agent 0 reaches server A through the proxy.
    let server_a: SocketAddr = lab
        .server(0)
        .address()
        .parse()
        .map_err(|e| LabError::State(format!("server address: {e}")))?;
    let proxy = CutProxy::start(server_a).await?;
    route_agent(lab, 0, lab.server(0).bind_port(), proxy.local_addr().port())?;
    lab.start_agent(0).await?;

    let uid = nix::unistd::geteuid().as_raw();
    let entry_id = lab.register_entry(0, WORKLOAD_PATH, uid, ttl).await?;
    lab.register_entry(1, REF_PATH, uid, ttl).await?;
    let workload_id = lab.spiffe_id(WORKLOAD_PATH);
    let ref_dir = w.join("ref");
    crate::make_dir(&ref_dir)?;
    let reference = RefPeer::start(
        lab.agent(1).workload_socket(),
        &lab.spiffe_id(REF_PATH),
        &ref_dir,
        HEALTHY_LIMIT,
    )
    .await?;

    let faulted_peer = if p.fault == Fault::PeerNeverReloads {
        let fp = start_faulted_peer(opts, lab, w, &workload_id, &cleanup.shutdown).await?;
        cleanup.pidfiles.push(fp.pidfile.clone());
        Some(fp)
    } else {
        None
    };

    // The supervisor.
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Event>();
    let mut store: Option<Arc<dyn Store>> = None;
    match p.supervisor {
        SupervisorKind::Healer => {
            let text = healer_toml(lab, w, proxy.local_addr(), faulted_peer.as_ref());
            let config = w.join("spire-healer.toml");
            write_file(&config, text.as_bytes())?;
            let log = std::fs::File::create(w.join("healer.log"))
                .map_err(LabError::io("creating healer.log"))?;
            let err = log
                .try_clone()
                .map_err(LabError::io("duplicating healer.log"))?;
            let child = tokio::process::Command::new(&opts.healer_bin)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(err)
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(LabError::io(format!(
                    "starting {}",
                    opts.healer_bin.display()
                )))?;
            cleanup.healer_pgid = child.id().map(|p| p as i32);
            // Killed by group in Cleanup.
            cleanup.healer = Some(child);
            store = Some(open_store(&w.join("healer.db"), &w.join("healer.log")).await?);
        }
        SupervisorKind::Kubelet | SupervisorKind::Systemd => {
            let baseline = if p.supervisor == SupervisorKind::Kubelet {
                Baseline::Kubelet(KubeletSettings::default())
            } else {
                Baseline::Systemd(SystemdSettings::default())
            };
            cleanup.baseline = Some(supervise::spawn(
                baseline,
                units(lab),
                events_tx.clone(),
                cleanup.shutdown.clone(),
            ));
        }
        SupervisorKind::None => {}
    }

    // Healthy before the injection.
    let mut bundle = fresh_bundle(lab).await?;
    let none = BTreeSet::new();
    let deadline = Instant::now() + HEALTHY_LIMIT;
    loop {
        let last = check(
            lab,
            &workload_id,
            &bundle,
            &none,
            &reference,
            faulted_peer.as_ref(),
            None,
        )
        .await;
        match last {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(LabError::State(format!(
                    "the lab never became healthy before the injection: {e}"
                )));
            }
            Err(_) => {
                sleep(POLL).await;
                if let Ok(b) = fresh_bundle(lab).await {
                    bundle = b;
                }
            }
        }
    }

    // Preparation that is not part of the fault.
    let mut tainted = BTreeSet::new();
    let old_authorities = if p.fault == Fault::CaTaint {
        Some(prepare_rotation(lab).await?)
    } else {
        None
    };

    // Inject.
    let mut t0 = Instant::now();
    let mut t0_ms = unix_ms();
    let mut notes = Vec::new();
    match p.fault {
        Fault::AgentKilled => lab.kill_agent(0).await?,
        Fault::AgentFrozen => lab.freeze_agent(0)?,
        Fault::SyncLoss => proxy.cut(),
        Fault::ServerKilled => lab.kill_server(0).await?,
        Fault::BothServersKilled => {
            lab.kill_server(0).await?;
            lab.kill_server(1).await?;
            let lab = lab.clone();
            let down = opts.servers_down;
            let stop = cleanup.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = sleep(down) => {}
                }
                for i in 0..2 {
                    if lab.server(i).pid().is_none() {
                        let _ = lab.start_server(i).await;
                    }
                }
            });
        }
        Fault::EntryDeleted => {
            lab.server_cli(1, &["entry", "delete", "-entryID", &entry_id])
                .await?;
            // The fault starts when the agent stops serving the SVID (at
            // its next sync).
            let deadline = Instant::now() + Duration::from_secs(60);
            while issued_serial(lab, &workload_id).await.is_some() {
                if Instant::now() >= deadline {
                    return Err(LabError::State(
                        "agent 0 kept serving the deleted entry's SVID".into(),
                    ));
                }
                sleep(POLL).await;
            }
            t0 = Instant::now();
            t0_ms = unix_ms();
        }
        Fault::DataDirWiped => {
            lab.kill_agent(0).await?;
            let data = lab.agent(0).data_dir();
            std::fs::remove_dir_all(&data)
                .map_err(LabError::io(format!("wiping {}", data.display())))?;
            crate::make_dir(&data)?;
            let id = lab.agent(0).spiffe_id();
            let spent = id.rsplit('/').next().unwrap_or_default().to_string();
            write_file(lab.agent(0).join_token_file(), spent.as_bytes())?;
            lab.run_restart_command(0).await?;
        }
        Fault::PeerNeverReloads => {
            let client = ServerAdminClient::new(lab.server(1).socket(), Duration::from_secs(5))
                .map_err(|e| LabError::State(error_chain(&e)))?;
            let before = issued_serial(lab, &workload_id).await;
            client
                .bump_entry(&entry_id)
                .await
                .map_err(|e| LabError::State(format!("entry bump: {}", error_chain(&e))))?;
            // The fault is the rotation the peer misses: it starts when
            // the agent issues the new SVID.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let now = issued_serial(lab, &workload_id).await;
                if now.is_some() && now != before {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LabError::State(
                        "the entry bump never rotated the workload SVID".into(),
                    ));
                }
                sleep(POLL).await;
            }
            t0 = Instant::now();
            t0_ms = unix_ms();
        }
        Fault::CaTaint => {
            for (i, id) in old_authorities.iter().flatten().enumerate() {
                lab.server_cli(i, &["localauthority", "x509", "taint", "-authorityID", id])
                    .await?;
                tainted.insert(id.to_ascii_lowercase());
            }
        }
    }

    let t0_unix = t0_ms / 1000;
    // Poll until healed or the window ends.
    let end = t0 + opts.window;
    let mut timeline = ServerTimeline::default();
    let mut events: Vec<Event> = Vec::new();
    let mut incidents: Vec<IncidentRecord> = Vec::new();
    let mut actions: Vec<ActionRecord> = Vec::new();
    let mut slow_at = Instant::now();
    let mut last_reason = String::new();
    let mut heal_s = None;
    let sync_fault = matches!(
        p.fault,
        Fault::SyncLoss | Fault::ServerKilled | Fault::BothServersKilled
    );
    loop {
        let now = Instant::now();
        let at_s = now.duration_since(t0).as_secs_f64();
        timeline.record(at_s, reach(lab, &proxy).await);
        while let Ok(e) = events_rx.try_recv() {
            events.push(e);
        }
        if now >= slow_at {
            slow_at = now + SLOW_POLL;
            if let Ok(b) = fresh_bundle(lab).await {
                bundle = b;
            }
            if let Some(s) = &store {
                read_store(s.as_ref(), t0_ms, &mut incidents, &mut actions).await;
            }
        }
        let since = sync_fault.then_some(t0_unix);
        match check(
            lab,
            &workload_id,
            &bundle,
            &tainted,
            &reference,
            faulted_peer.as_ref(),
            since,
        )
        .await
        {
            Ok(()) => {
                heal_s = Some(Instant::now().duration_since(t0).as_secs_f64());
                break;
            }
            Err(e) => last_reason = e.to_string(),
        }
        if Instant::now() >= end {
            break;
        }
        sleep(POLL).await;
    }
    while let Ok(e) = events_rx.try_recv() {
        events.push(e);
    }
    if let Some(s) = &store {
        read_store(s.as_ref(), t0_ms, &mut incidents, &mut actions).await;
    }
    cleanup.run();
    drop(proxy);

    // Judge.
    let scope = Scope::of(p.fault);
    let (detect_s, seen) = match p.supervisor {
        SupervisorKind::Healer => healer_view(&incidents, &actions, t0_ms, &timeline),
        SupervisorKind::Kubelet | SupervisorKind::Systemd => {
            baseline_view(&events, t0, &scope, &timeline)
        }
        SupervisorKind::None => (None, Vec::new()),
    };
    let wrong: Vec<(&SeenAction, &'static str)> = seen
        .iter()
        .filter_map(|a| faults::classify(p.fault, a).map(|why| (a, why)))
        .collect();
    if let Some(first) = incidents.iter().min_by_key(|i| i.opened_at_ms) {
        notes.push(format!(
            "first incident {} on {}",
            first.symptom, first.subject
        ));
    }
    if !seen.is_empty() {
        let list: Vec<String> = seen
            .iter()
            .take(4)
            .map(|a| format!("{} {} at {:.1}s", a.by, a.unit, a.at_s))
            .collect();
        notes.push(format!("actions: {}", list.join("; ")));
    }
    for (a, why) in &wrong {
        notes.push(format!("wrong: {} {} ({why})", a.by, a.unit));
    }
    if heal_s.is_none() {
        notes.push(format!("not healed: {last_reason}"));
    }
    Ok(RunRecord {
        fault: p.fault,
        supervisor: p.supervisor,
        run: p.run,
        seed: opts.seed,
        detect_s,
        heal_s,
        window_s: opts.window.as_secs_f64(),
        disruptive_actions: seen.len() as u32,
        wrong_actions: wrong.len() as u32,
        notes: one_line(&notes.join(" | ")),
    })
}

/// The heal check: a valid SVID for the workload, a handshake with it, the
/// faulted peer serving the issued serial (when there is one), and with
/// `synced_after`, a sync of agent 0 after that Unix second.
async fn check(
    lab: &HaLab,
    workload_id: &str,
    bundle: &[u8],
    tainted: &BTreeSet<String>,
    reference: &RefPeer,
    faulted_peer: Option<&FaultedPeer>,
    synced_after: Option<i64>,
) -> Result<(), NotHealed> {
    let Fetched { leaf, identity, .. } =
        heal::fetch_valid(lab.agent(0).workload_socket(), workload_id, bundle, tainted).await?;
    match faulted_peer {
        Some(fp) => {
            let answer = heal::handshake(&fp.endpoint, identity, workload_id).await?;
            if answer.serial != leaf.serial {
                return Err(NotHealed::StaleServed {
                    served: answer.serial,
                    issued: leaf.serial,
                });
            }
        }
        None => {
            heal::handshake(reference.endpoint(), identity, reference.spiffe_id()).await?;
        }
    }
    if let Some(after) = synced_after {
        let last = lab.last_sync_success(0).await.unwrap_or(0);
        if last <= after {
            return Err(NotHealed::NotSynced);
        }
    }
    Ok(())
}

/// The serial agent 0 currently issues for `workload_id`.
async fn issued_serial(lab: &HaLab, workload_id: &str) -> Option<String> {
    let resp = heal::fetch_message(lab.agent(0).workload_socket())
        .await
        .ok()?;
    heal::pick(&resp, workload_id).map(|f| f.serial)
}

/// Points agent `j`'s `agent.conf` from `from` to `to` (`server_port`).
fn route_agent(lab: &HaLab, j: usize, from: u16, to: u16) -> Result<(), LabError> {
    let conf = lab.agent(j).conf();
    let text = std::fs::read_to_string(conf)
        .map_err(LabError::io(format!("reading {}", conf.display())))?;
    let mut found = 0;
    let rewritten: String = text
        .lines()
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with("server_port") && t.contains(&from.to_string()) {
                found += 1;
                line.replace(&from.to_string(), &to.to_string())
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if found != 1 {
        return Err(LabError::State(format!(
            "{} has {found} server_port lines for port {from}",
            conf.display()
        )));
    }
    write_file(conf, format!("{rewritten}\n").as_bytes())
}

/// The servers' current bundle as DER, from the first server that answers.
async fn fresh_bundle(lab: &HaLab) -> Result<Vec<u8>, LabError> {
    let mut last = None;
    for i in 0..lab.servers().len() {
        if lab.server(i).pid().is_none() || lab.server(i).frozen() {
            continue;
        }
        match lab.server_cli(i, &["bundle", "show"]).await {
            Ok(out) => return heal::bundle_der(&out.stdout),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| LabError::State("no server runs".into())))
}

/// Which servers answer `/ready`, and whether each agent's configured
/// server answers it (agent 0's through the proxy while its config names
/// the proxy).
async fn reach(lab: &HaLab, proxy: &CutProxy) -> Reach {
    let mut ready = Vec::with_capacity(lab.servers().len());
    for s in lab.servers() {
        ready.push(
            s.pid().is_some()
                && matches!(http_get_status(s.health_port(), "/ready").await, Ok(200)),
        );
    }
    let agents = lab
        .agents()
        .iter()
        .map(|a| {
            let port = std::fs::read_to_string(a.conf())
                .ok()
                .and_then(|t| configured_port(&t));
            let Some(port) = port else {
                return false;
            };
            if port == proxy.local_addr().port() {
                return !proxy.is_cut() && ready.first().copied().unwrap_or(false);
            }
            lab.servers()
                .iter()
                .position(|s| s.bind_port() == port)
                .is_some_and(|i| ready[i])
        })
        .collect();
    Reach {
        any: ready.iter().any(|r| *r),
        agents,
    }
}

/// The `server_port` an agent config names.
fn configured_port(conf: &str) -> Option<u16> {
    conf.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix("server_port")?;
        rest.trim_start()
            .strip_prefix('=')?
            .trim()
            .trim_matches('"')
            .parse()
            .ok()
    })
}

/// `localauthority x509 prepare` then `activate` on every server, once
/// every agent has persisted the prepared authorities; returns the old
/// active authority ids (to taint), per server.
async fn prepare_rotation(lab: &HaLab) -> Result<Vec<String>, LabError> {
    let show = |i: usize| async move {
        let out = lab
            .server_cli(i, &["localauthority", "x509", "show", "-output", "json"])
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| LabError::Output {
                command: "spire-server localauthority x509 show".into(),
                reason: e.to_string(),
                output: String::from_utf8_lossy(&out.stdout).into_owned(),
            })?;
        let id = |slot: &str| {
            v[slot]["authority_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        Ok::<_, LabError>((id("active"), id("prepared")))
    };
    let n = lab.servers().len();
    let mut old = Vec::new();
    let mut prepared = Vec::new();
    for i in 0..n {
        old.push(show(i).await?.0);
        lab.server_cli(i, &["localauthority", "x509", "prepare"])
            .await?;
        prepared.push(show(i).await?.1);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(0..lab.agents().len()).all(|j| lab.agent(j).stored_bundle_cas() == Some(2 * n)) {
        if Instant::now() >= deadline {
            return Err(LabError::State(
                "the prepared authorities never reached every agent's bundle".into(),
            ));
        }
        sleep(POLL).await;
    }
    for (i, id) in prepared.iter().enumerate() {
        lab.server_cli(
            i,
            &["localauthority", "x509", "activate", "-authorityID", id],
        )
        .await?;
    }
    Ok(old)
}

/// Starts the peer of [`Fault::PeerNeverReloads`] and a task keeping its
/// files on agent 0's current workload SVID.
async fn start_faulted_peer(
    opts: &ChaosOptions,
    lab: &HaLab,
    w: &Path,
    workload_id: &str,
    shutdown: &CancellationToken,
) -> Result<FaultedPeer, LabError> {
    let dir = w.join("peer");
    crate::make_dir(&dir)?;
    let socket = lab.agent(0).workload_socket().to_path_buf();
    let deadline = Instant::now() + HEALTHY_LIMIT;
    let mut serial = loop {
        if let Ok(resp) = heal::fetch_message(&socket).await
            && let Some(f) = heal::pick(&resp, workload_id)
        {
            f.write(&dir)
                .map_err(|e| LabError::State(error_chain(&e)))?;
            break f.serial;
        }
        if Instant::now() >= deadline {
            return Err(LabError::State("the workload SVID never came".into()));
        }
        sleep(POLL).await;
    };
    // The file writer (a spiffe-helper that keeps up).
    let (id, files_dir, stop) = (workload_id.to_string(), dir.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sleep(Duration::from_millis(500)) => {}
            }
            if let Ok(resp) = heal::fetch_message(&socket).await
                && let Some(f) = heal::pick(&resp, &id)
                && f.serial != serial
                && f.write(&files_dir).is_ok()
            {
                serial = f.serial;
            }
        }
    });
    let sock = w.join("peer.sock");
    let pidfile = w.join("peer.pid");
    let addr = w.join("peer.addr");
    let log = w.join("peer.log");
    let q = |p: &Path| format!("'{}'", p.display());
    let start = format!(
        "rm -f {addr}; ( setsid {bin} peer --dir {dir} --listen {listen} --addr-file {addr} --pidfile {pid} --on-hup ignore >>{log} 2>&1 </dev/null & ); \
         i=0; while [ ! -s {addr} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -s {addr} ]",
        addr = q(&addr),
        bin = q(&opts.lab_bin),
        dir = q(&dir),
        listen = q(Path::new(&format!("unix://{}", sock.display()))),
        pid = q(&pidfile),
        log = q(&log),
    );
    let restart = format!(
        "p=$(cat {pf} 2>/dev/null); if [ -n \"$p\" ]; then kill -TERM \"$p\" 2>/dev/null; \
         i=0; while kill -0 \"$p\" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; fi; {start}",
        pf = q(&pidfile),
    );
    let out = crate::run_bounded(
        Path::new("/bin/sh"),
        &["-c".to_string(), restart.clone()],
        Duration::from_secs(15),
    )
    .await?;
    if !out.status.success() {
        return Err(LabError::State(format!(
            "the peer did not start: {}",
            crate::log_tail(&log)
        )));
    }
    Ok(FaultedPeer {
        endpoint: Endpoint::Unix(sock),
        pidfile,
        restart,
    })
}

/// Opens spire-healer's SQLite store once it exists (bounded).
async fn open_store(db: &Path, log: &Path) -> Result<Arc<dyn Store>, LabError> {
    let url = format!("sqlite://{}", db.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if db.exists()
            && let Ok(s) = spire_healer::knowledge::open_existing(&url).await
        {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(LabError::State(format!(
                "spire-healer never created its store; its log:\n{}",
                crate::log_tail(log)
            )));
        }
        sleep(POLL).await;
    }
}

async fn read_store(
    store: &dyn Store,
    since_ms: i64,
    incidents: &mut Vec<IncidentRecord>,
    actions: &mut Vec<ActionRecord>,
) {
    let q = Query {
        limit: 500,
        since_ms: Some(since_ms),
        ..Query::default()
    };
    if let Ok(i) = store.incidents(&q).await {
        *incidents = i;
    }
    if let Ok(a) = store.actions(&q).await {
        *actions = a;
    }
}

/// spire-healer's detection time and disruptive actions after `t0_ms`.
fn healer_view(
    incidents: &[IncidentRecord],
    actions: &[ActionRecord],
    t0_ms: i64,
    timeline: &ServerTimeline,
) -> (Option<f64>, Vec<SeenAction>) {
    let detect = incidents
        .iter()
        .filter(|i| i.opened_at_ms >= t0_ms)
        .map(|i| i.opened_at_ms)
        .min()
        .map(|ms| (ms - t0_ms) as f64 / 1000.0);
    let mut seen: Vec<SeenAction> = actions
        .iter()
        .filter(|a| a.started_at_ms >= t0_ms && !a.dry_run)
        .filter_map(|a| {
            let kind = faults::healer_disruption(&a.actuator)?;
            let at_s = (a.started_at_ms - t0_ms) as f64 / 1000.0;
            Some(SeenAction {
                at_s,
                unit: faults::unit_of_target(&a.target),
                kind,
                server_answered: timeline.answered_at(at_s),
                own_server_answered: timeline
                    .own_answered_at(at_s, &faults::unit_of_target(&a.target)),
                by: a.actuator.clone(),
            })
        })
        .collect();
    seen.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    (detect, seen)
}

/// A baseline's detection time and disruptive actions after `t0`.
fn baseline_view(
    events: &[Event],
    t0: Instant,
    scope: &Scope,
    timeline: &ServerTimeline,
) -> (Option<f64>, Vec<SeenAction>) {
    let after: Vec<(f64, &Event)> = events
        .iter()
        .filter(|e| e.at >= t0)
        .map(|e| (e.at.duration_since(t0).as_secs_f64(), e))
        .collect();
    let detect = after
        .iter()
        .filter(|(_, e)| {
            scope.contains(&e.unit)
                && matches!(e.kind, EventKind::LivenessFailed | EventKind::Exited)
        })
        .map(|(t, _)| *t)
        .reduce(f64::min);
    let seen = after
        .iter()
        .filter_map(|(t, e)| {
            let (kind, by) = match e.kind {
                EventKind::LivenessFailed => (faults::Disruption::Kill, "liveness-kill"),
                EventKind::Started => (faults::Disruption::Restart, "start"),
                _ => return None,
            };
            Some(SeenAction {
                at_s: *t,
                unit: e.unit.clone(),
                kind,
                server_answered: timeline.answered_at(*t),
                own_server_answered: timeline.own_answered_at(*t, &e.unit),
                by: by.into(),
            })
        })
        .collect();
    (detect, seen)
}

/// Both agents (started by their restart command) and both servers.
fn units(lab: &Arc<HaLab>) -> Vec<Unit> {
    let mut out = Vec::new();
    for j in 0..lab.agents().len() {
        let (l1, l2) = (lab.clone(), lab.clone());
        out.push(Unit {
            name: lab.agent(j).name().to_string(),
            start: Arc::new(move || {
                let lab = l1.clone();
                Box::pin(async move {
                    lab.run_restart_command(j)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            }),
            pid: Arc::new(move || l2.agent(j).pid()),
            live_url: Some(lab.agent(j).live_url()),
        });
    }
    for i in 0..lab.servers().len() {
        let (l1, l2) = (lab.clone(), lab.clone());
        out.push(Unit {
            name: lab.server(i).name().to_string(),
            // Returns once the process runs; readiness is the baseline's
            // business (the start goes on waiting for it in the background).
            start: Arc::new(move || {
                let lab = l1.clone();
                Box::pin(async move {
                    let starting = lab.clone();
                    let task = tokio::spawn(async move { starting.start_server(i).await });
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while lab.server(i).pid().is_none() {
                        if task.is_finished() {
                            return match task.await {
                                Ok(Err(e)) => Err(e.to_string()),
                                _ if lab.server(i).pid().is_some() => Ok(()),
                                _ => Err(format!("{} did not start", lab.server(i).name())),
                            };
                        }
                        if Instant::now() >= deadline {
                            return Err(format!(
                                "{} has no process 10 s after its start",
                                lab.server(i).name()
                            ));
                        }
                        sleep(Duration::from_millis(20)).await;
                    }
                    Ok(())
                })
            }),
            pid: Arc::new(move || l2.server(i).pid()),
            live_url: Some(lab.server(i).live_url()),
        });
    }
    out
}

/// spire-healer's config for a run: every server and agent, the actuators
/// an operator configures for the built-in policy, server A's address as
/// agent 0 reaches it (the proxy), and the faulted peer's probe.
fn healer_toml(lab: &HaLab, w: &Path, proxy: SocketAddr, peer: Option<&FaultedPeer>) -> String {
    let a0 = lab.agent(0);
    let per_agent = |p: &Path| {
        p.to_string_lossy()
            .replace(&format!("/{}/", a0.name()), "/{agent}/")
    };
    let restart = a0.restart_command();
    let mut t = format!(
        "[supervisor]\ntick_interval = \"250ms\"\n[database]\nurl = \"sqlite://{db}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [actuators.restart-agent]\ntype = \"command\"\nargv = [{sh:?}, {script:?}]\ntimeout = \"20s\"\n\
         [actuators.failover]\ntype = \"server_failover\"\nstrategy = \"agent_config\"\nrestart = \"restart-agent\"\nrepair_persisted_bundle = true\n\
         [actuators.evict-agent]\ntype = \"agent_evict\"\nrestart = \"restart-agent\"\njoin_token_file = {token:?}\n\
         [actuators.entry-bump]\ntype = \"entry_bump\"\n",
        db = w.join("healer.db").display(),
        sh = restart.first().cloned().unwrap_or_default(),
        script = per_agent(Path::new(
            restart.get(1).map(String::as_str).unwrap_or_default()
        )),
        token = per_agent(a0.join_token_file()),
    );
    for (i, s) in lab.servers().iter().enumerate() {
        let address = if i == 0 {
            proxy.to_string()
        } else {
            s.address()
        };
        t += &format!(
            "[[servers]]\nname = {:?}\nadmin_socket = {:?}\naddress = {:?}\nhealth_url = {:?}\nmetrics_url = {:?}\npoll_interval = \"1s\"\ntimeout = \"2s\"\n",
            s.name(),
            s.socket().display().to_string(),
            address,
            s.health_url().trim_end_matches("/ready"),
            s.metrics_url(),
        );
    }
    for a in lab.agents() {
        t += &format!(
            "[[agents]]\nname = {:?}\naddress = {:?}\nadmin_socket = {:?}\nhealth_url = {:?}\nmetrics_url = {:?}\nconfig_file = {:?}\ndata_dir = {:?}\nnode_alias = {:?}\npoll_interval = \"1s\"\nanswer_timeout = \"2s\"\nbackoff_max = \"2s\"\n",
            a.name(),
            format!("unix://{}", a.workload_socket().display()),
            a.admin_socket().display().to_string(),
            a.health_url().trim_end_matches("/ready"),
            a.metrics_url(),
            a.conf().display().to_string(),
            a.data_dir().display().to_string(),
            a.node_alias(),
        );
    }
    if let Some(fp) = peer {
        t += &format!(
            "[[probes]]\nname = \"{PEER}\"\naddress = {:?}\nspiffe_id = {:?}\nagent = {AGENT_0:?}\ninterval = \"1s\"\ntimeout = \"1s\"\n\
             [actuators.reload-peer]\ntype = \"signal\"\nsignal = \"SIGHUP\"\npidfile = {:?}\n\
             [actuators.restart-peer]\ntype = \"command\"\nargv = [\"/bin/sh\", \"-c\", {:?}]\ntimeout = \"20s\"\n",
            fp.endpoint.to_string(),
            lab.spiffe_id(WORKLOAD_PATH),
            fp.pidfile.display().to_string(),
            fp.restart,
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_port_is_read() {
        assert_eq!(
            configured_port(
                "agent {\n    server_address = \"127.0.0.1\"\n    server_port = \"8081\"\n}"
            ),
            Some(8081)
        );
        assert_eq!(configured_port("  server_port = 9\n"), Some(9));
        assert_eq!(configured_port("server_address = 1"), None);
    }

    #[test]
    fn one_line_keeps_csv_fields_whole() {
        assert_eq!(one_line("a, b\nc"), "a; b");
        assert_eq!(secs(None), "-");
        assert_eq!(secs(Some(1.26)), "1.3s");
    }

    #[test]
    fn baseline_detection_and_actions() {
        let t0 = Instant::now();
        let ev = |ms: u64, unit: &str, kind: EventKind| Event {
            at: t0 + Duration::from_millis(ms),
            unit: unit.into(),
            kind,
        };
        let events = vec![
            ev(500, "agent-1", EventKind::Exited),
            ev(1500, "agent-0", EventKind::Exited),
            ev(1600, "agent-0", EventKind::Started),
            ev(1700, "agent-1", EventKind::Started),
        ];
        let mut tl = ServerTimeline::default();
        tl.record(
            0.0,
            Reach {
                any: true,
                agents: vec![true, true],
            },
        );
        let (detect, seen) = baseline_view(&events, t0, &Scope::of(Fault::AgentKilled), &tl);
        assert_eq!(detect, Some(1.5));
        assert_eq!(seen.len(), 2);
        let wrong: Vec<_> = seen
            .iter()
            .filter(|a| faults::classify(Fault::AgentKilled, a).is_some())
            .collect();
        assert_eq!(wrong.len(), 1);
        assert_eq!(wrong[0].unit, "agent-1");
    }
}
