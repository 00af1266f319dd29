//! The chaos benchmark: faults injected on the real-SPIRE HA lab, each
//! handled in turn by spire-healer (default policy) and by the supervision
//! operators run today — kubelet liveness, systemd `Restart=always`, and
//! none — with time to detect, time to heal, disruptive and wrong actions
//! measured per run ([`RunRecord`]) and summarised in a table, CSV files and
//! a chart ([`report`]).
//!
//! - [`supervise`]: the kubelet and systemd baselines, implemented with the
//!   semantics of their sources (documented there).
//! - [`report`]: per-(fault, supervisor) summaries, ratios against each
//!   baseline, Markdown, CSV and the SVG chart.
//! - [`run`]: the runner (`spire-lab chaos`): one fresh lab per run, the
//!   fault injected, the heal check polled ([`heal`]), the actions judged
//!   ([`faults`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod faults;
pub mod heal;
pub mod report;
pub mod run;
pub mod supervise;

/// A fault the benchmark injects on one agent (or on the servers) of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The agent is SIGKILLed.
    AgentKilled,
    /// The agent is SIGSTOPped (and stays stopped).
    AgentFrozen,
    /// The agent is cut from its servers (its connections go nowhere).
    SyncLoss,
    /// The agent's server is SIGKILLed (the other one stays up).
    ServerKilled,
    /// Both servers are SIGKILLed, then started again.
    BothServersKilled,
    /// The workload's own registration entry is deleted.
    EntryDeleted,
    /// The agent's data dir is wiped and the agent restarted; its join
    /// token is already used.
    DataDirWiped,
    /// A peer keeps serving its certificate after SPIRE rotated it.
    PeerNeverReloads,
    /// The active X.509 authority is tainted (after a new one is prepared
    /// and activated): every SVID it signed must be replaced.
    CaTaint,
}

impl Fault {
    /// Every fault, in the order tables list them.
    pub const ALL: [Fault; 9] = [
        Fault::AgentKilled,
        Fault::AgentFrozen,
        Fault::SyncLoss,
        Fault::ServerKilled,
        Fault::BothServersKilled,
        Fault::EntryDeleted,
        Fault::DataDirWiped,
        Fault::PeerNeverReloads,
        Fault::CaTaint,
    ];

    /// The snake_case name used on the command line, in CSV and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::AgentKilled => "agent_killed",
            Fault::AgentFrozen => "agent_frozen",
            Fault::SyncLoss => "sync_loss",
            Fault::ServerKilled => "server_killed",
            Fault::BothServersKilled => "both_servers_killed",
            Fault::EntryDeleted => "entry_deleted",
            Fault::DataDirWiped => "data_dir_wiped",
            Fault::PeerNeverReloads => "peer_never_reloads",
            Fault::CaTaint => "ca_taint",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fault::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Fault::ALL.iter().map(|f| f.as_str()).collect();
                format!("unknown fault {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// Who handles a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SupervisorKind {
    /// spire-healer with its built-in (default) policy.
    #[serde(rename = "spire-healer")]
    Healer,
    /// Kubernetes' defaults: liveness probe on `/live` and restart with
    /// CrashLoopBackOff ([`supervise::KubeletSettings`]).
    #[serde(rename = "kubelet")]
    Kubelet,
    /// systemd `Restart=always` with its defaults
    /// ([`supervise::SystemdSettings`]).
    #[serde(rename = "systemd")]
    Systemd,
    /// Nothing restarts anything.
    #[serde(rename = "none")]
    None,
}

impl SupervisorKind {
    /// Every supervisor, in the order tables list them (spire-healer first,
    /// the baselines after it).
    pub const ALL: [SupervisorKind; 4] = [
        SupervisorKind::Healer,
        SupervisorKind::Kubelet,
        SupervisorKind::Systemd,
        SupervisorKind::None,
    ];

    /// The name used on the command line, in CSV and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            SupervisorKind::Healer => "spire-healer",
            SupervisorKind::Kubelet => "kubelet",
            SupervisorKind::Systemd => "systemd",
            SupervisorKind::None => "none",
        }
    }
}

impl fmt::Display for SupervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SupervisorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SupervisorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = SupervisorKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown supervisor {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// One measured run: one fault injected once, handled by one supervisor.
/// Times are seconds from the injection (`f64` so that CSV and JSON carry
/// them as they are).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The fault.
    pub fault: Fault,
    /// Who handled it.
    pub supervisor: SupervisorKind,
    /// 0-based index of this run among the runs of (fault, supervisor).
    pub run: u32,
    /// Seed of the whole benchmark (the order of runs derives from it).
    pub seed: u64,
    /// Injection → the supervisor's first reaction to it (spire-healer: an
    /// incident opened; kubelet: the failure threshold reached or the exit
    /// seen; systemd: the exit seen). `None`: never noticed.
    pub detect_s: Option<f64>,
    /// Injection → healed: the workload is served a valid SVID again (not
    /// expired, chaining to the current bundle, not from a tainted
    /// authority) and a handshake with it succeeds. `None`: not healed
    /// within `window_s`.
    pub heal_s: Option<f64>,
    /// How long the run waited for healing: the SVID lifetime (or less in a
    /// smoke run).
    pub window_s: f64,
    /// Restarts, kills, evictions, failovers and pod actions taken.
    pub disruptive_actions: u32,
    /// Actions that could not help or made it worse (a restart while no
    /// server answers, an action on a component that was not faulted).
    pub wrong_actions: u32,
    /// Free text: what was seen (short; no commas needed in CSV, it is quoted).
    pub notes: String,
}

/// Settings of a chaos benchmark ([`run::benchmark`]).
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Runs per (fault, supervisor).
    pub runs: u32,
    /// Seed of the order of runs.
    pub seed: u64,
    /// Faults injected.
    pub faults: Vec<Fault>,
    /// Supervisors compared.
    pub supervisors: Vec<SupervisorKind>,
    /// The servers' `default_x509_svid_ttl` and `agent_ttl`, and the
    /// workload entries' X.509-SVID TTL.
    pub svid_ttl: Duration,
    /// How long a run waits for healing after the injection.
    pub window: Duration,
    /// How long both servers stay down in [`Fault::BothServersKilled`]
    /// before the run starts whichever is still down.
    pub servers_down: Duration,
    /// The `spire-healer` binary.
    pub healer_bin: PathBuf,
    /// The `spire-lab` binary (runs the peer of
    /// [`Fault::PeerNeverReloads`]).
    pub lab_bin: PathBuf,
    /// PostgreSQL URL with CREATEDB, for the labs' databases.
    pub postgres_url: String,
    /// Folder of `spire-server` and `spire-agent`.
    pub bin_dir: PathBuf,
    /// Where runs.csv, summary.csv, chaos.md, chaos.svg and runs.json go.
    pub out: PathBuf,
}
