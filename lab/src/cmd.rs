//! The `spire-lab` command line. `up|down|status`: an [`HaLab`] for
//! operators; `k8s`: a Kubernetes control plane ([`ControlPlane`]) in the
//! foreground; `svid-files` and `peer` are test workloads (see
//! [`super::svid_files`], [`super::peer`]).
//!
//! `up` starts the lab in a directory the operator keeps (configs, logs,
//! sockets), writes `lab.json` ([`LabManifest`]) and a ready
//! `spire-healer.toml`, prints a summary and stays in the foreground until
//! SIGINT or SIGTERM, then stops the lab (kills its processes, drops its
//! database). `down` stops a lab whose `up` runs elsewhere (e.g. in the
//! background): it asks the owner to stop, then kills whatever still runs
//! one of the lab's config files and drops the database. `status` shows
//! which of the lab's processes live.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use spire_healer::telemetry::LogFormat;
use tokio::time::{Instant, sleep};

use super::database::{drop_database, redact};
use super::manifest::healer_config;
use super::{
    ControlPlane, DEFAULT_TRUST_DOMAIN, HaLab, HaOptions, LabError, LabManifest, default_bin_dir,
    free_port, pids_with_arg, process_alive, process_has_arg,
};

/// Exit code for bad arguments (EX_USAGE).
const EXIT_USAGE: i32 = 64;
/// Exit code when the lab cannot start (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: i32 = 69;
/// The database URL `scripts/lab.sh` and `scripts/test.sh` provision.
pub const DEFAULT_POSTGRES_URL: &str =
    "postgres://spire_healer:spire_healer@127.0.0.1:5432/spire_healer";
/// How long `down` waits for the owner to stop the lab itself.
const OWNER_GRACE: Duration = Duration::from_secs(30);

/// spire-lab: real SPIRE labs for trying spire-healer out, and the test
/// workloads its integration tests run.
#[derive(Debug, Parser)]
#[command(name = "spire-lab", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: LabCommand,
}

/// `spire-lab …`.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Start an HA SPIRE lab (servers sharing one PostgreSQL database, and
    /// agents) in DIR; stay in the foreground until SIGINT/SIGTERM.
    Up(UpArgs),
    /// Stop a lab started by `up` (e.g. in the background).
    Down(DownArgs),
    /// Show a lab's processes (alive or not), sockets and URLs.
    Status(DownArgs),
    /// Stream X.509-SVIDs from an agent into svid.pem, svid_key.pem and
    /// bundle.pem (like spiffe-helper); optionally signal a process after
    /// each write.
    SvidFiles(super::svid_files::SvidFilesArgs),
    /// An mTLS server that loads its SVID files once and answers each
    /// connection with its serving serial (a workload that never reloads).
    Peer(super::peer::PeerArgs),
    /// Start a kubelet-less Kubernetes control plane (etcd, kube-apiserver,
    /// kube-controller-manager, kube-scheduler, kwok) on 127.0.0.1 in DIR;
    /// print its admin kubeconfig and URL; stay in the foreground until
    /// SIGINT/SIGTERM.
    K8s(K8sArgs),
    /// Run the chaos benchmark: faults injected on fresh HA labs, handled
    /// by spire-healer and by the kubelet, systemd and no-supervision
    /// baselines; writes runs.csv, summary.csv, chaos.md, chaos.svg and
    /// runs.json.
    Chaos(super::chaos::run::ChaosArgs),
    /// Watch a healthy HA lab with the real spire-healer for a long time,
    /// through SVID and CA rotations; write samples.csv, soak.json and
    /// soak.md; exit 1 on any incident or action.
    Soak(super::soak::SoakArgs),
}

/// `spire-lab k8s`.
#[derive(Debug, Args)]
pub struct K8sArgs {
    /// Folder for the plane's files and logs (kept; a previous plane's
    /// state there is wiped at start).
    #[arg(long)]
    pub dir: PathBuf,
    /// Folder holding kube-apiserver, kube-controller-manager,
    /// kube-scheduler, etcd and kwok (the last line `scripts/install-k8s.sh`
    /// prints).
    #[arg(long, env = super::k8s::K8S_BIN_ENV)]
    pub bin_dir: PathBuf,
}

/// `spire-lab up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Lab directory (kept: configs, logs, sockets, lab.json).
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of spire-servers.
    #[arg(long, default_value_t = 2)]
    pub servers: usize,
    /// Number of spire-agents.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// PostgreSQL URL of a role with CREATEDB; the lab creates (and at the
    /// end drops) its own database through it.
    #[arg(long, env = "SPIRE_HEALER_LAB_PG_URL", default_value = DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,
    /// Folder holding spire-server and spire-agent (default: .spire/bin of
    /// the source tree).
    #[arg(long, env = "SPIRE_HEALER_SPIRE_BIN")]
    pub bin_dir: Option<PathBuf>,
    /// Trust domain.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// X.509-SVID TTL, in seconds, of the entries registered for spire-healer
    /// (`spiffe://<td>/healer/<agent>`, selector `unix:uid:<your uid>`, one
    /// per agent).
    #[arg(long, default_value_t = 300)]
    pub svid_ttl: u32,
}

/// `spire-lab down` and `spire-lab status`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Lab directory given to `up`.
    #[arg(long)]
    pub dir: PathBuf,
}

/// Runs a subcommand; returns the process exit code.
pub async fn run(cmd: LabCommand) -> i32 {
    let mut out = std::io::stdout();
    match cmd {
        LabCommand::Up(args) => up(args, &mut out).await,
        LabCommand::Down(args) => match down(&args.dir, &mut out).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        LabCommand::SvidFiles(args) => super::svid_files::main(args, &mut out).await,
        LabCommand::Peer(args) => super::peer::main(args, &mut out).await,
        LabCommand::K8s(args) => k8s(args, &mut out).await,
        LabCommand::Chaos(args) => super::chaos::run::main(args, &mut out).await,
        LabCommand::Soak(args) => super::soak::main(args, &mut out).await,
        LabCommand::Status(args) => match status(&args.dir, &mut out) {
            Ok(true) => 0,
            // Like `systemctl status`: 3 when not (fully) running.
            Ok(false) => 3,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
    }
}

/// Prints the lab's state; true when the owner and every process run.
///
/// # Errors
/// No readable `lab.json`.
pub fn status(dir: &Path, out: &mut dyn Write) -> Result<bool, LabError> {
    let dir =
        std::fs::canonicalize(dir).map_err(LabError::io(format!("resolving {}", dir.display())))?;
    let m = LabManifest::read(&dir.join(LabManifest::FILE))?;
    let live = |conf: &Path, pidfile: &Path| -> Option<i32> {
        std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| process_has_arg(p, conf))
            .or_else(|| pids_with_arg(conf).first().copied())
    };
    let state = |pid: Option<i32>| match pid {
        Some(p) => format!("running (pid {p})"),
        None => "not running".to_owned(),
    };
    let owner = owner_alive(m.owner_pid, &dir);
    let mut all = owner;
    let _ = writeln!(
        out,
        "lab {} ({}; trust domain {}; database {})",
        m.dir.display(),
        m.state,
        m.trust_domain,
        m.database.name
    );
    let _ = writeln!(
        out,
        "  owner     {}",
        state(owner.then_some(m.owner_pid as i32))
    );
    for s in &m.servers {
        let pid = live(&s.conf, &s.pidfile);
        all &= pid.is_some();
        let _ = writeln!(
            out,
            "  {:<9} {:<22} {}  socket {}
            health {}  metrics {}",
            s.name,
            state(pid),
            s.address,
            s.socket.display(),
            s.health_url,
            s.metrics_url
        );
    }
    for a in &m.agents {
        let pid = live(&a.conf, &a.pidfile);
        all &= pid.is_some();
        let _ = writeln!(
            out,
            "  {:<9} {:<22} -> {}  workload {}
            admin {}
            health {}  metrics {}
            restart: {}",
            a.name,
            state(pid),
            a.server,
            a.workload_socket.display(),
            a.admin_socket.display(),
            a.health_url,
            a.metrics_url,
            a.restart_command.join(" ")
        );
    }
    let _ = writeln!(
        out,
        "  config    {}",
        dir.join("spire-healer.toml").display()
    );
    Ok(all)
}

async fn up(args: UpArgs, out: &mut dyn Write) -> i32 {
    if args.servers == 0 || args.agents == 0 {
        eprintln!("error: --servers and --agents must be at least 1");
        return EXIT_USAGE;
    }
    let dir = match absolute(&args.dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let manifest_path = dir.join(LabManifest::FILE);
    if let Ok(old) = LabManifest::read(&manifest_path) {
        if owner_alive(old.owner_pid, &dir) {
            eprintln!(
                "error: a lab is already running in {} (pid {}); stop it with `spire-lab down --dir {}`",
                dir.display(),
                old.owner_pid,
                dir.display()
            );
            return 1;
        }
        let _ = writeln!(out, "Cleaning up the previous lab in {}.", dir.display());
        if let Err(e) = sweep(&old, out).await {
            let _ = writeln!(out, "warning: {e}");
        }
    }

    let opts = HaOptions {
        servers: args.servers,
        agents: args.agents,
        postgres_url: args.postgres_url,
        trust_domain: args.trust_domain,
        bin_dir: args.bin_dir.unwrap_or_else(default_bin_dir),
        dir: Some(dir.clone()),
        ..HaOptions::default()
    };
    let _ = writeln!(
        out,
        "Starting {} spire-server(s) on {} and {} spire-agent(s) in {}.",
        opts.servers,
        redact(&opts.postgres_url),
        opts.agents,
        dir.display()
    );
    let _ = out.flush();
    let lab = tokio::select! {
        lab = HaLab::start(opts) => lab,
        _ = spire_healer::term::shutdown_signal() => {
            eprintln!("Interrupted while starting; stopped.");
            return 130;
        }
    };
    let lab = match lab {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("error: cannot start the lab: {e}");
            return EXIT_UNAVAILABLE;
        }
    };

    let mut manifest = lab.manifest();
    match register_healer_entries(&lab, args.svid_ttl).await {
        Ok(ids) => {
            for (a, id) in manifest.agents.iter_mut().zip(ids) {
                a.entries.push(id);
            }
        }
        Err(e) => {
            eprintln!("error: cannot register the spire-healer entries: {e}");
            let _ = lab.stop().await;
            return EXIT_UNAVAILABLE;
        }
    }
    let healer_toml = dir.join("spire-healer.toml");
    let written = free_port().and_then(|port| {
        manifest.write(&manifest_path)?;
        let text = healer_config(
            &manifest,
            &format!("sqlite://{}", dir.join("spire-healer.db").display()),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        );
        super::write_file(&healer_toml, text.as_bytes())
    });
    if let Err(e) = written {
        eprintln!("error: {e}");
        let _ = lab.stop().await;
        return 1;
    }
    let _ = write!(out, "{}", summary(&manifest, &healer_toml));
    let _ = out.flush();

    spire_healer::term::shutdown_signal().await;
    let _ = writeln!(out, "Stopping the lab.");
    let result = lab.stop().await;
    let mut stopped = manifest;
    stopped.state = "stopped".into();
    let _ = stopped.write(&manifest_path);
    match result {
        Ok(()) => {
            let _ = writeln!(out, "Stopped; database {} dropped.", lab.database_name());
            0
        }
        Err(e) => {
            eprintln!("error while stopping: {e}");
            1
        }
    }
}

/// `spire-lab k8s`: starts a [`ControlPlane`] in `args.dir`, prints how to
/// reach it and keeps it until SIGINT/SIGTERM.
async fn k8s(args: K8sArgs, out: &mut dyn Write) -> i32 {
    let dir = match absolute(&args.dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let _ = writeln!(
        out,
        "Starting a Kubernetes control plane in {} (binaries from {}).",
        dir.display(),
        args.bin_dir.display()
    );
    let _ = out.flush();
    let plane = tokio::select! {
        plane = ControlPlane::start_with(&args.bin_dir, &dir) => plane,
        _ = spire_healer::term::shutdown_signal() => {
            eprintln!("Interrupted while starting; stopped.");
            return 130;
        }
    };
    let plane = match plane {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot start the control plane: {e}");
            return EXIT_UNAVAILABLE;
        }
    };
    let _ = write!(out, "{}", k8s_summary(&plane));
    let _ = out.flush();
    spire_healer::term::shutdown_signal().await;
    let _ = writeln!(out, "Stopping the control plane.");
    drop(plane);
    let _ = writeln!(out, "Stopped.");
    0
}

fn k8s_summary(plane: &ControlPlane) -> String {
    let admin = plane.admin_kubeconfig().display().to_string();
    let mut s = format!(
        "\nKubernetes control plane up in {:.1} s (nodes are simulated by kwok; containers never run).\n\n",
        plane.started_in().as_secs_f64()
    );
    s += &format!("  server      {}\n", plane.server_url());
    s += &format!("  kubeconfig  {admin}  (system:masters)\n");
    s += &format!("  CA          {}\n", plane.ca_pem().display());
    for user in super::k8s::USERS {
        s += &format!(
            "  user        {user}: {}  (no rights until RBAC grants some)\n",
            plane.user_kubeconfig(user).display()
        );
    }
    for (name, log) in plane.logs() {
        s += &format!("  log         {name}: {}\n", log.display());
    }
    s += &format!(
        "\nTry:\n  export KUBECONFIG={admin}\n  kubectl get nodes\n\nCtrl-C stops it (every process is killed).\n"
    );
    s
}

/// Registers `spiffe://<td>/healer/<agent>` for this process's euid under
/// every agent's node alias and waits until each agent has it; returns the
/// IDs in agent order.
async fn register_healer_entries(lab: &HaLab, ttl: u32) -> Result<Vec<String>, LabError> {
    let uid = nix::unistd::geteuid().as_raw();
    let mut ids = Vec::new();
    for (j, a) in lab.agents().iter().enumerate() {
        let path = format!("/healer/{}", a.name());
        lab.register_entry(j, &path, uid, ttl).await?;
        ids.push(lab.spiffe_id(&path));
    }
    for (j, a) in lab.agents().iter().enumerate() {
        lab.wait_for_entry_synced(j, &format!("/healer/{}", a.name()))
            .await?;
    }
    Ok(ids)
}

/// Stops the lab described by `DIR/lab.json`.
///
/// # Errors
/// No readable `lab.json`, processes that survive SIGKILL, or the database
/// cannot be dropped.
pub async fn down(dir: &Path, out: &mut dyn Write) -> Result<(), LabError> {
    let dir = absolute(dir)?;
    let path = dir.join(LabManifest::FILE);
    let mut m = LabManifest::read(&path)?;
    if owner_alive(m.owner_pid, &dir) {
        let _ = writeln!(out, "Asking the lab owner (pid {}) to stop.", m.owner_pid);
        let _ = kill(Pid::from_raw(m.owner_pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + OWNER_GRACE;
        while owner_alive(m.owner_pid, &dir) && Instant::now() < deadline {
            sleep(Duration::from_millis(100)).await;
        }
        if owner_alive(m.owner_pid, &dir) {
            let _ = writeln!(
                out,
                "The owner did not stop within {OWNER_GRACE:?}; killing its processes."
            );
        }
    }
    // The owner may have rewritten lab.json on its way out.
    if let Ok(fresh) = LabManifest::read(&path) {
        m = fresh;
    }
    sweep(&m, out).await?;
    m.state = "stopped".into();
    m.write(&path)?;
    let _ = writeln!(out, "Lab in {} is down.", dir.display());
    Ok(())
}

/// Kills every process running one of the lab's config files and drops the
/// lab database if it still exists.
async fn sweep(m: &LabManifest, out: &mut dyn Write) -> Result<(), LabError> {
    let confs: Vec<(&str, &Path, &Path)> = m
        .servers
        .iter()
        .map(|s| (s.name.as_str(), s.conf.as_path(), s.pidfile.as_path()))
        .chain(
            m.agents
                .iter()
                .map(|a| (a.name.as_str(), a.conf.as_path(), a.pidfile.as_path())),
        )
        .collect();
    let mut killed = Vec::new();
    for (name, conf, pidfile) in &confs {
        let mut pids = pids_with_arg(conf);
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            && process_has_arg(pid, conf)
            && !pids.contains(&pid)
        {
            pids.push(pid);
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.push((name.to_string(), pid));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while killed.iter().any(|(_, p)| process_alive(*p)) && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    for (name, pid) in &killed {
        let _ = writeln!(out, "Killed {name} (pid {pid}).");
    }
    if let Some((name, pid)) = killed.iter().find(|(_, p)| process_alive(*p)) {
        return Err(LabError::State(format!(
            "{name} (pid {pid}) survived SIGKILL"
        )));
    }
    if drop_database(&m.database.admin_url, &m.database.name).await? {
        let _ = writeln!(out, "Dropped database {}.", m.database.name);
    }
    Ok(())
}

/// Whether `pid` is a live `spire-lab up` for `dir`.
fn owner_alive(pid: u32, dir: &Path) -> bool {
    let pid = pid as i32;
    if pid <= 0 || pid == std::process::id() as i32 || !process_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let is_up = args.iter().skip(1).any(|a| a == "up");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    let its_dir = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--dir=")
            .map(str::to_owned)
            .or_else(|| (a == "--dir").then(|| args.get(i + 1).cloned()).flatten())
    });
    let same_dir = its_dir.is_some_and(|d| {
        let d = cwd.join(d);
        std::fs::canonicalize(&d).unwrap_or(d) == dir
    });
    is_up && same_dir
}

/// `dir` made absolute (created when missing), without symlinks.
fn absolute(dir: &Path) -> Result<PathBuf, LabError> {
    std::fs::create_dir_all(dir).map_err(LabError::io(format!("creating {}", dir.display())))?;
    std::fs::canonicalize(dir).map_err(LabError::io(format!("resolving {}", dir.display())))
}

fn summary(m: &LabManifest, healer_toml: &Path) -> String {
    let mut s = format!(
        "\nSPIRE lab up in {} (trust domain {}, database {}).\n\n",
        m.dir.display(),
        m.trust_domain,
        m.database.name
    );
    for srv in &m.servers {
        s += &format!(
            "  {:<9} pid {:<7} {}  socket {}\n            health {}  metrics {}\n",
            srv.name,
            srv.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            srv.address,
            srv.socket.display(),
            srv.health_url,
            srv.metrics_url
        );
    }
    for a in &m.agents {
        s += &format!(
            "  {:<9} pid {:<7} -> {}  workload {}\n            admin {}\n            health {}  metrics {}\n            restart: {}\n            entries: {}\n",
            a.name,
            a.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            a.server,
            a.workload_socket.display(),
            a.admin_socket.display(),
            a.health_url,
            a.metrics_url,
            a.restart_command.join(" "),
            a.entries.join(" ")
        );
    }
    s += &format!(
        "\nDescription: {}\nspire-healer config: {}\n  spire-healer run --config {}\nStop with Ctrl-C, SIGTERM, or `spire-lab down --dir {}`.\n",
        m.dir.join(LabManifest::FILE).display(),
        healer_toml.display(),
        healer_toml.display(),
        m.dir.display()
    );
    s
}
