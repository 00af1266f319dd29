//! Replay: what another policy would have done over recorded history.
//!
//! The loop records observation frames around incidents ([`frames`]). A
//! replay runs the real [`Supervisor`] over them again, one tick per frame
//! at the frame's time, under the other policy: its sensor is a frame
//! player, its clock a [`ManualClock`] set to each frame's time, every
//! step a dry run (nothing is executed; actuators lend only their class
//! and precondition), and its store a scratch in-memory SQLite. What it
//! decided (actions it would start, holds) is then set beside what the
//! recorded store says was done ([`compare`]).
//!
//! The replay's memory (open incidents, cooldowns, the ladder position,
//! handshake history) is rebuilt from the frames, so it starts empty at
//! the first frame of each stretch of consecutive frames (a
//! [`Segment`]): frames are recorded around incidents only, and a gap
//! (nothing recorded, frames dropped) starts a new segment with a fresh
//! supervisor. The report names every segment and why it started.
//!
//! What a replay cannot know: the effect its own different actions would
//! have had. The frames show the world as the recorded actions left it,
//! so a replayed incident closes when the recorded one did.

pub mod cli;
pub mod compare;
pub mod config;
pub mod frames;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::Notify;

use crate::actuators::{Actuator, ActuatorError, Class, Prepared, Registry};
use crate::clock::{ManualClock, unix_millis};
use crate::handshake::Counter;
use crate::knowledge::frames::{FrameKey, FrameStore};
use crate::knowledge::{Buffer, Knowledge, SqliteStore, Store, StoreError};
use crate::model::{AgentIdentity, IdentitySource, Observations, Outcome, Reading, Step};
use crate::policy::Policy;
use crate::sensors::{Sensor, SensorError};
use crate::supervisor::{Operator, Parts, Supervisor, Targets};
use crate::telemetry::{Health, Metrics};

pub use cli::{ReplayArgs, run};
pub use compare::{Decision, DecisionKind, Report, Row};
pub use config::ReplayConfig;
pub use frames::{Frame, FrameRecorder, FrameWriter};

/// Frames read per store call.
const FRAME_PAGE: u32 = 256;

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The recorded store could not be read.
    #[error("cannot read the recorded store: {0}")]
    Store(#[from] StoreError),
    /// The replay's own scratch store failed.
    #[error("the replay's scratch store failed: {0}")]
    Scratch(#[source] StoreError),
}

/// What a replay runs with besides the frames: the policy to replay under,
/// and the configuration the recorded loop ran with.
pub struct Setup {
    /// The other policy.
    pub policy: Policy,
    /// Actuators by instance name. Only their [`Actuator::class`] and
    /// [`Actuator::prepare`] are used: every replayed step is a dry run.
    pub actuators: Registry,
    /// The configured `[[agents]]` names.
    pub agents: Vec<String>,
    /// Peers actions may target (probe names).
    pub peers: Vec<String>,
}

/// Why a segment's replay starts with an empty memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SegmentStart {
    /// The first frame of its run within the replayed interval.
    First,
    /// Frames of this run are missing before it: not recorded (no symptom
    /// for longer than the post- and pre-roll), dropped, or unreadable.
    Gap {
        /// Ticks missing.
        missing_ticks: u64,
        /// The last frame before the gap (unix ms).
        after_ms: i64,
    },
}

/// A stretch of consecutive frames of one run, replayed with one memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// The recording process.
    pub run_id: String,
    /// First and last frame (unix ms).
    pub from_ms: i64,
    pub to_ms: i64,
    /// Frames replayed.
    pub frames: u64,
    /// Why the memory starts afresh here.
    pub start: SegmentStart,
}

/// What the replay decided.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    /// The segments, in the order they started.
    pub segments: Vec<Segment>,
    /// Actions it would have started and holds, in time order.
    pub decisions: Vec<Decision>,
    /// Frames that could not be read (each ends its segment).
    pub unreadable: u64,
}

/// Replays the frames recorded in `[since, until)` under `setup`.
///
/// # Errors
/// [`ReplayError::Store`] when the frames cannot be read,
/// [`ReplayError::Scratch`] when the scratch store fails.
pub async fn replay(
    frames: &FrameStore,
    setup: &Setup,
    since: SystemTime,
    until: SystemTime,
) -> Result<Replayed, ReplayError> {
    let scratch: Arc<dyn Store> = Arc::new(
        SqliteStore::open(std::path::Path::new(":memory:"))
            .await
            .map_err(ReplayError::Scratch)?,
    );
    let metrics = Arc::new(Metrics::new());
    let mut runs: HashMap<String, RunState> = HashMap::new();
    let mut out = Replayed::default();
    let (since_ms, until_ms) = (unix_millis(since), unix_millis(until));
    let mut after: Option<FrameKey> = None;
    loop {
        let page = frames
            .read(since_ms, until_ms, after.as_ref(), FRAME_PAGE)
            .await?;
        let done = page.len() < FRAME_PAGE as usize;
        after = page.last().map(|f| f.key());
        for stored in page {
            let frame = serde_json::from_str::<Frame>(&stored.frame)
                .ok()
                .filter(|f| f.format <= frames::FORMAT);
            let Some(frame) = frame else {
                // Not this build's format: its run continues after a gap.
                out.unreadable += 1;
                continue;
            };
            let seq = u64::try_from(stored.seq).unwrap_or(0);
            let start = match runs.get(&stored.run_id) {
                None => Some(SegmentStart::First),
                Some(r) if r.last_seq.checked_add(1) == Some(seq) => None,
                Some(r) => Some(SegmentStart::Gap {
                    missing_ticks: seq.saturating_sub(r.last_seq.saturating_add(1)),
                    after_ms: r.last_ms,
                }),
            };
            if let Some(start) = start {
                // A fresh memory: the old supervisor (if any) is dropped.
                out.segments.push(Segment {
                    run_id: stored.run_id.clone(),
                    from_ms: stored.at_ms,
                    to_ms: stored.at_ms,
                    frames: 0,
                    start,
                });
                let state = RunState {
                    replayer: Replayer::new(setup, scratch.clone(), metrics.clone(), &frame),
                    segment: out.segments.len() - 1,
                    last_seq: seq,
                    last_ms: stored.at_ms,
                };
                runs.insert(stored.run_id.clone(), state);
            }
            let Some(run) = runs.get_mut(&stored.run_id) else {
                continue;
            };
            run.replayer.tick(frame).await;
            run.last_seq = seq;
            run.last_ms = stored.at_ms;
            let seg = &mut out.segments[run.segment];
            seg.to_ms = stored.at_ms;
            seg.frames += 1;
        }
        if done {
            break;
        }
    }
    // Everything the supervisors recorded has been flushed tick by tick.
    drop(runs);
    out.decisions = compare::replayed_decisions(&*scratch)
        .await
        .map_err(ReplayError::Scratch)?;
    Ok(out)
}

/// One run's replay in progress.
struct RunState {
    replayer: Replayer,
    /// Its segment in [`Replayed::segments`].
    segment: usize,
    last_seq: u64,
    last_ms: i64,
}

// === impl Replayer ===

/// A supervisor fed frame by frame.
struct Replayer {
    supervisor: Supervisor,
    clock: Arc<ManualClock>,
    readings: Arc<Mutex<Vec<Reading>>>,
    handshakes: Counter,
}

impl Replayer {
    /// A fresh supervisor (an empty memory but for the agent identities
    /// the recorded loop knew at `first`) writing to `scratch`.
    fn new(setup: &Setup, scratch: Arc<dyn Store>, metrics: Arc<Metrics>, first: &Frame) -> Self {
        let clock = Arc::new(ManualClock::new(first.at));
        let readings = Arc::new(Mutex::new(Vec::new()));
        let handshakes = Counter::default();
        let actuators: Registry = setup
            .actuators
            .iter()
            .map(|(name, a)| {
                (
                    name.clone(),
                    Arc::new(NeverRun(a.clone())) as Arc<dyn Actuator>,
                )
            })
            .collect();
        let parts = Parts {
            clock: clock.clone(),
            sensors: vec![Box::new(FramePlayer {
                readings: readings.clone(),
            })],
            actuators,
            policy: setup.policy.clone(),
            // Every step a dry run; nobody pauses or approves.
            operator: Operator::detached(true),
            buffer: Buffer::new(scratch, 100_000),
            metrics,
            health: Arc::new(Health::new(Duration::from_secs(3600))),
            wake: Arc::new(Notify::new()),
            tick_interval: Duration::from_secs(1),
            handshakes: handshakes.clone(),
            targets: Targets::new(
                setup.agents.iter().cloned(),
                setup.peers.iter().cloned(),
                HashMap::new(),
            ),
        };
        let knowledge = Knowledge {
            agent_identities: first
                .observations
                .agent_ids
                .iter()
                .map(|(spiffe_id, agent)| AgentIdentity {
                    agent: agent.clone(),
                    spiffe_id: spiffe_id.clone(),
                    source: IdentitySource::DebugApi,
                    at: first.at,
                })
                .collect(),
            ..Knowledge::default()
        };
        Self {
            supervisor: Supervisor::new(parts, knowledge),
            clock,
            readings,
            handshakes,
        }
    }

    /// One tick at the frame's time, sensing the frame.
    async fn tick(&mut self, frame: Frame) {
        *self.readings.lock().unwrap_or_else(|p| p.into_inner()) = readings(frame.observations);
        for h in &frame.handshakes {
            // Refused only past the counter's target bound, as live.
            let _ = self
                .handshakes
                .add_counts(std::iter::once((h.target.as_str(), h.to_counts())));
        }
        self.clock.set(frame.at);
        self.supervisor.tick(frame.at).await;
    }
}

/// The readings of a frame, in the order sensing filed them.
fn readings(obs: Observations) -> Vec<Reading> {
    let Observations {
        agents,
        servers,
        agent_debug,
        health,
        metrics,
        probes,
        cert_files,
        bootstrap_bundles,
        agent_ids: _,
    } = obs;
    let mut out = Vec::new();
    out.extend(agents.into_iter().map(Reading::WorkloadApi));
    out.extend(servers.into_iter().map(Reading::Server));
    out.extend(agent_debug.into_iter().map(Reading::AgentDebug));
    out.extend(health.into_iter().map(Reading::Health));
    out.extend(metrics.into_iter().map(Reading::Metrics));
    out.extend(probes.into_iter().map(Reading::Probe));
    out.extend(cert_files.into_iter().map(Reading::CertFile));
    out.extend(bootstrap_bundles.into_iter().map(Reading::BootstrapBundle));
    out
}

/// The replay's one sensor: the current frame's readings.
struct FramePlayer {
    readings: Arc<Mutex<Vec<Reading>>>,
}

#[async_trait]
impl Sensor for FramePlayer {
    fn name(&self) -> &'static str {
        "replay_frames"
    }
    fn instance(&self) -> &str {
        "replay"
    }
    async fn observe(&self) -> Result<Vec<Reading>, SensorError> {
        Ok(self
            .readings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
}

/// An actuator lending its class and precondition, never its action.
struct NeverRun(Arc<dyn Actuator>);

#[async_trait]
impl Actuator for NeverRun {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn class(&self) -> Class {
        self.0.class()
    }
    fn prepare(&self, step: &mut Step, obs: &Observations) -> Prepared {
        self.0.prepare(step, obs)
    }
    async fn execute(&self, _step: &Step) -> Result<Outcome, ActuatorError> {
        // Unreachable while every step is a dry run; refuse all the same.
        Err(ActuatorError::Failed(
            "a replay never executes actions".into(),
        ))
    }
}

/// What the built-in `refetch` checks before it runs, for a replay that
/// has no Workload API streams: it applies to configured agents only.
pub struct RefetchPrecondition {
    agents: HashSet<String>,
}

impl RefetchPrecondition {
    /// For the configured `agents`.
    pub fn new(agents: impl IntoIterator<Item = String>) -> Self {
        Self {
            agents: agents.into_iter().collect(),
        }
    }
}

#[async_trait]
impl Actuator for RefetchPrecondition {
    fn name(&self) -> &'static str {
        "refetch"
    }
    fn class(&self) -> Class {
        Class::Gentle
    }
    /// As [`crate::actuators::RefetchActuator`]: only agents have streams.
    fn prepare(&self, step: &mut Step, _obs: &Observations) -> Prepared {
        if self.agents.contains(&step.target) {
            Prepared::Ready
        } else {
            Prepared::Skip("not_an_agent")
        }
    }
    async fn execute(&self, _step: &Step) -> Result<Outcome, ActuatorError> {
        Err(ActuatorError::Failed(
            "a replay never executes actions".into(),
        ))
    }
}
