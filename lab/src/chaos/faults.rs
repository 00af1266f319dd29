//! The pieces of a chaos run that need no SPIRE: the seeded order of runs
//! ([`Xorshift64`], [`plan`]), what counts as a disruptive or a wrong action
//! ([`Scope`], [`classify`]), and the cut-able TCP proxy that produces
//! [`Fault::SyncLoss`] ([`CutProxy`]).
//!
//! # Wrong actions
//!
//! A *disruptive* action restarts, kills, evicts or fails over a
//! component: spire-healer actions whose actuator is a restart command
//! (`restart-*`), `failover` or `evict-agent`; a baseline's liveness kill
//! (`LivenessFailed`, counted once however many signals follow) or start
//! (`Started`). Refetches, SIGHUPs and entry bumps are not disruptive.
//!
//! A disruptive action is *wrong* when
//! 1. its unit is outside the fault's [`Scope`]: the faulted component and
//!    the agent that serves the workload (e.g. restarting `agent-1` after
//!    `agent-0` was killed, or restarting a server after an entry was
//!    deleted); or
//! 2. it restarts (or starts) an agent in place while the server that
//!    agent is configured for did not answer it (the last sample before the
//!    action: that server's `/ready`, and for agent 0 also the path through
//!    its proxy): the new agent can neither attest nor sync, and it drops
//!    the workload SVIDs it still had cached; or
//! 3. it fails over or evicts an agent while no server answered at all:
//!    there is nowhere to go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Fault, SupervisorKind};
use crate::LabError;

// === PRNG and plan ===

/// xorshift64* (Marsaglia; Vigna's multiplier): a small, fixed generator,
/// so that a seed gives the same order of runs on every machine and
/// version. Not for anything secret.
#[derive(Debug, Clone)]
pub struct Xorshift64 {
    state: u64,
}

impl Xorshift64 {
    /// A generator for `seed` (0 is mapped to a fixed non-zero state, as
    /// xorshift has no zero state).
    pub fn new(seed: u64) -> Self {
        // One SplitMix64 step spreads small seeds over the state.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self {
            state: if z == 0 { 0x2545_F491_4F6C_DD1D } else { z },
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`; 0 for `n == 0`). The modulo bias is
    /// negligible for the list sizes used here.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// One planned run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRun {
    /// The fault to inject.
    pub fault: Fault,
    /// Who handles it.
    pub supervisor: SupervisorKind,
    /// 0-based index among the runs of (fault, supervisor).
    pub run: u32,
}

/// Every (fault, supervisor, run) of the selection, shuffled with `seed`:
/// the same seed gives the same order.
pub fn plan(
    faults: &[Fault],
    supervisors: &[SupervisorKind],
    runs: u32,
    seed: u64,
) -> Vec<PlannedRun> {
    let mut list = Vec::new();
    for &fault in faults {
        for &supervisor in supervisors {
            for run in 0..runs {
                list.push(PlannedRun {
                    fault,
                    supervisor,
                    run,
                });
            }
        }
    }
    Xorshift64::new(seed).shuffle(&mut list);
    list
}

// === Scope and classification ===

/// Unit name of agent 0 (serves the workload).
pub const AGENT_0: &str = "agent-0";
/// Unit name of agent 1 (serves the reference peer).
pub const AGENT_1: &str = "agent-1";
/// Unit name of agent 0's server.
pub const SERVER_A: &str = "server-a";
/// Unit name of the other server.
pub const SERVER_B: &str = "server-b";
/// Unit name of the peer of [`Fault::PeerNeverReloads`].
pub const PEER: &str = "peer";

/// The units a fault concerns: the faulted component and the agent that
/// serves the workload. A disruptive action elsewhere is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope(pub Vec<&'static str>);

impl Scope {
    /// The scope of `fault`.
    pub fn of(fault: Fault) -> Scope {
        Scope(match fault {
            Fault::AgentKilled
            | Fault::AgentFrozen
            | Fault::SyncLoss
            | Fault::EntryDeleted
            | Fault::DataDirWiped
            | Fault::CaTaint => vec![AGENT_0],
            Fault::ServerKilled => vec![SERVER_A, AGENT_0],
            Fault::BothServersKilled => vec![SERVER_A, SERVER_B, AGENT_0, AGENT_1],
            Fault::PeerNeverReloads => vec![PEER],
        })
    }

    /// Whether `unit` is in scope.
    pub fn contains(&self, unit: &str) -> bool {
        self.0.contains(&unit)
    }
}

/// What kind of disruptive action was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disruption {
    /// A (re)start of the unit.
    Restart,
    /// A kill (baseline liveness failure).
    Kill,
    /// An agent evicted (and restarted with a new token).
    Evict,
    /// An agent pointed at another server (and restarted).
    Failover,
}

/// How a spire-healer actuator disrupts, by its configured name; `None`
/// for the gentle ones (refetch, signals, entry bumps).
pub fn healer_disruption(actuator: &str) -> Option<Disruption> {
    if actuator.starts_with("restart") {
        Some(Disruption::Restart)
    } else if actuator.contains("failover") {
        Some(Disruption::Failover)
    } else if actuator.contains("evict") {
        Some(Disruption::Evict)
    } else if actuator.contains("kill") {
        Some(Disruption::Kill)
    } else {
        None
    }
}

/// The unit an action's target names (`agent:agent-0` → `agent-0`);
/// the target itself when it names none of the lab's units.
pub fn unit_of_target(target: &str) -> String {
    for unit in [AGENT_0, AGENT_1, SERVER_A, SERVER_B, PEER] {
        let named = target == unit
            || target.ends_with(&format!(":{unit}"))
            || target.ends_with(&format!("/{unit}"));
        if named {
            return unit.to_string();
        }
    }
    if target.starts_with("peer") {
        return PEER.to_string();
    }
    target.to_string()
}

/// One disruptive action seen during a run.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenAction {
    /// Seconds from the injection.
    pub at_s: f64,
    /// The unit acted on.
    pub unit: String,
    /// What was done.
    pub kind: Disruption,
    /// Whether some server answered `/ready` at the last sample before it.
    pub server_answered: bool,
    /// For an agent: whether the server its config names answered it at
    /// the last sample before the action (`true` for other units).
    pub own_server_answered: bool,
    /// Who did it (actuator or event name), for the notes.
    pub by: String,
}

/// Why `action` is wrong for `fault` (see the module docs), or `None`.
pub fn classify(fault: Fault, action: &SeenAction) -> Option<&'static str> {
    if !Scope::of(fault).contains(&action.unit) {
        return Some("outside the fault's scope");
    }
    if !action.unit.starts_with("agent-") {
        return None;
    }
    match action.kind {
        Disruption::Restart if !action.own_server_answered => {
            Some("agent restarted while its server did not answer it")
        }
        Disruption::Failover | Disruption::Evict if !action.server_answered => {
            Some("agent failed over or evicted while no server answered")
        }
        _ => None,
    }
}

/// One sample of which servers answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Reach {
    /// Some server answered `/ready`.
    pub any: bool,
    /// Per agent (`agent-<j>`): the server its config names answered it.
    pub agents: Vec<bool>,
}

/// Samples of [`Reach`] over time, to judge actions after the fact.
#[derive(Debug, Clone, Default)]
pub struct ServerTimeline {
    samples: Vec<(f64, Reach)>,
}

impl ServerTimeline {
    /// Records a sample at `at_s` (seconds from the injection; may be
    /// negative), in time order.
    pub fn record(&mut self, at_s: f64, reach: Reach) {
        self.samples.push((at_s, reach));
    }

    fn last(&self, at_s: f64) -> Option<&Reach> {
        self.samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= at_s)
            .map(|(_, r)| r)
    }

    /// Whether some server answered at the last sample at or before
    /// `at_s`; `true` before the first one.
    pub fn answered_at(&self, at_s: f64) -> bool {
        self.last(at_s).is_none_or(|r| r.any)
    }

    /// Whether `unit`'s own server answered it at the last sample at or
    /// before `at_s`; `true` for units that are not agents and before the
    /// first sample.
    pub fn own_answered_at(&self, at_s: f64, unit: &str) -> bool {
        let Some(j) = unit
            .strip_prefix("agent-")
            .and_then(|j| j.parse::<usize>().ok())
        else {
            return true;
        };
        self.last(at_s)
            .is_none_or(|r| r.agents.get(j).copied().unwrap_or(true))
    }
}

// === Cut-able proxy ===

/// A TCP proxy from a local port to one server, which can be cut: every
/// open connection is dropped and new ones are closed at once, until it is
/// restored. How [`Fault::SyncLoss`] separates agent 0 from its server
/// while the other server stays reachable.
#[derive(Debug)]
pub struct CutProxy {
    local: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_tx: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `target`.
    ///
    /// # Errors
    /// [`LabError::Io`] when it cannot bind.
    pub async fn start(target: SocketAddr) -> Result<CutProxy, LabError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(LabError::io("binding the sync proxy"))?;
        let local = listener
            .local_addr()
            .map_err(LabError::io("reading the sync proxy's address"))?;
        let cut = Arc::new(AtomicBool::new(false));
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                if flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut generation = cut_rx.clone();
                generation.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = generation.changed() => {}
                    }
                });
            }
        });
        Ok(CutProxy {
            local,
            cut,
            cut_tx,
            task,
        })
    }

    /// The port agents connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_tx.send_modify(|g| *g += 1);
    }

    /// Whether it is cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn the_order_is_fixed_for_a_seed() {
        let faults = [Fault::AgentKilled, Fault::ServerKilled, Fault::CaTaint];
        let sups = SupervisorKind::ALL;
        let a = plan(&faults, &sups, 3, 42);
        let b = plan(&faults, &sups, 3, 42);
        assert_eq!(a, b);
        assert_eq!(a.len(), 3 * 4 * 3);
        let c = plan(&faults, &sups, 3, 43);
        assert_ne!(a, c, "another seed, another order");
        // A shuffle, not a filter: every (fault, supervisor, run) once.
        let mut sorted: Vec<_> = a.iter().map(|p| (p.fault, p.supervisor, p.run)).collect();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), a.len());
        // The generator itself is pinned: changing it changes every
        // published order.
        let mut g = Xorshift64::new(1);
        let first: Vec<u64> = (0..3).map(|_| g.next_u64()).collect();
        let mut h = Xorshift64::new(1);
        assert_eq!(first, (0..3).map(|_| h.next_u64()).collect::<Vec<_>>());
        assert!(first.iter().all(|&x| x != 0));
        assert_eq!(Xorshift64::new(0).below(0), 0);
    }

    fn act(unit: &str, kind: Disruption, any: bool, own: bool) -> SeenAction {
        SeenAction {
            at_s: 1.0,
            unit: unit.into(),
            kind,
            server_answered: any,
            own_server_answered: own,
            by: "test".into(),
        }
    }

    #[test]
    fn wrong_actions_are_classified() {
        use Disruption::*;
        let right = |f, a: SeenAction| assert_eq!(classify(f, &a), None, "{f} {a:?}");
        let wrong = |f, a: SeenAction| assert!(classify(f, &a).is_some(), "{f} {a:?}");
        // In scope, its server answering: right.
        right(Fault::AgentKilled, act(AGENT_0, Restart, true, true));
        // Another agent: out of scope.
        wrong(Fault::AgentKilled, act(AGENT_1, Restart, true, true));
        // A server restarted for an agent fault.
        wrong(Fault::EntryDeleted, act(SERVER_A, Restart, true, true));
        // Agent 0's server died: failing over is right, restarting it in
        // place (still pointed at the dead server) is wrong.
        right(Fault::ServerKilled, act(AGENT_0, Failover, true, false));
        wrong(Fault::ServerKilled, act(AGENT_0, Restart, true, false));
        // Cut from its server: the same.
        wrong(Fault::SyncLoss, act(AGENT_0, Restart, true, false));
        right(Fault::SyncLoss, act(AGENT_0, Failover, true, false));
        // Both servers down: restarting or failing over agents is wrong;
        // once they answer again, a restart is not.
        wrong(
            Fault::BothServersKilled,
            act(AGENT_1, Restart, false, false),
        );
        wrong(
            Fault::BothServersKilled,
            act(AGENT_0, Failover, false, false),
        );
        right(Fault::BothServersKilled, act(AGENT_1, Restart, true, true));
        // Restarting a server while none answers is what heals it.
        right(
            Fault::BothServersKilled,
            act(SERVER_A, Restart, false, true),
        );
        // A kill alone is judged by scope only.
        right(Fault::BothServersKilled, act(AGENT_0, Kill, false, false));
        wrong(Fault::PeerNeverReloads, act(AGENT_0, Restart, true, true));
        right(Fault::PeerNeverReloads, act(PEER, Restart, true, true));
    }

    #[test]
    fn healer_actuators_and_targets() {
        assert_eq!(
            healer_disruption("restart-agent"),
            Some(Disruption::Restart)
        );
        assert_eq!(healer_disruption("restart-peer"), Some(Disruption::Restart));
        assert_eq!(healer_disruption("failover"), Some(Disruption::Failover));
        assert_eq!(healer_disruption("evict-agent"), Some(Disruption::Evict));
        for gentle in ["refetch", "reload-peer", "entry-bump"] {
            assert_eq!(healer_disruption(gentle), None, "{gentle}");
        }
        assert_eq!(unit_of_target("agent-0"), AGENT_0);
        assert_eq!(unit_of_target("agent:agent-1"), AGENT_1);
        assert_eq!(unit_of_target("peer:web"), PEER);
        assert_eq!(unit_of_target("other"), "other");
    }

    #[test]
    fn the_timeline_answers_for_the_last_sample() {
        let r = |any, a0, a1| Reach {
            any,
            agents: vec![a0, a1],
        };
        let mut t = ServerTimeline::default();
        assert!(t.answered_at(0.0), "no sample: assume answering");
        assert!(t.own_answered_at(0.0, AGENT_0));
        t.record(-1.0, r(true, true, true));
        t.record(0.5, r(true, false, true));
        t.record(20.0, r(false, false, false));
        assert!(t.answered_at(0.0));
        assert!(t.own_answered_at(0.0, AGENT_0));
        assert!(!t.own_answered_at(10.0, AGENT_0));
        assert!(t.own_answered_at(10.0, AGENT_1));
        assert!(!t.answered_at(21.0));
        assert!(t.own_answered_at(21.0, SERVER_A), "not an agent");
    }

    #[tokio::test]
    async fn the_proxy_forwards_until_cut() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 5];
                    while s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                    }
                });
            }
        });
        let proxy = CutProxy::start(target).await.unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        proxy.cut();
        assert!(proxy.is_cut());
        // The open connection is dropped: the read ends.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        // New connections are closed at once.
        let mut d = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let _ = d.write_all(b"hello").await;
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), d.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
        proxy.restore();
        assert!(!proxy.is_cut());
        let mut e = TcpStream::connect(proxy.local_addr()).await.unwrap();
        e.write_all(b"again").await.unwrap();
        e.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
    }
}
