//! Analyze and full-tick cost at fleet scale: 10,000 agents serving 10 SVIDs
//! each (100,000 SVIDs), a tenth of them past the overdue threshold so
//! incidents open and steps are planned (dry run, no I/O), plus a server
//! admin-API view listing all 10,000 agents (every twentieth not renewing),
//! analysed by the control-plane rules in the same tick.
//!
//! Targets (DESIGN.md §4): a tick over 100,000 SVIDs < 50 ms on 2 cores.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spire_healer::analyze::analyze;
use spire_healer::clock::{Clock, ManualClock};
use spire_healer::knowledge::{
    ActionRecord, ApprovalRecord, AuditRecord, Buffer, HoldRecord, IncidentRecord, Knowledge,
    Query, Store, StoreError, SvidRecord,
};
use spire_healer::model::{
    AgentView, Event, Reading, ServerAgent, ServerView, StreamStatus, SvidObservation,
};
use spire_healer::policy::Policy;
use spire_healer::sensors::{Sensor, SensorError};
use spire_healer::supervisor::{Parts, Supervisor, Targets};
use spire_healer::telemetry::{Health, Metrics};

const AGENTS: usize = 10_000;
const SVIDS_PER_AGENT: usize = 10;

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Agent `i`'s view at `now`: SVIDs of 1 h; every tenth agent's first SVID
/// is at 70 % of its life (overdue), the rest at 20 %.
fn views(now: SystemTime) -> Vec<AgentView> {
    (0..AGENTS)
        .map(|i| {
            let svids = (0..SVIDS_PER_AGENT)
                .map(|j| {
                    let age = if i % 10 == 0 && j == 0 { 2520 } else { 720 };
                    let nb = now - Duration::from_secs(age);
                    SvidObservation {
                        spiffe_id: format!("spiffe://bench.test/ns/n{i}/sa/w{j}"),
                        serial: format!("{i:x}{j:04x}"),
                        not_before: nb,
                        not_after: nb + Duration::from_secs(3600),
                        invalid: None,
                        first_seen: nb,
                        issuer: String::new(),
                    }
                })
                .collect();
            AgentView {
                agent: format!("agent-{i}"),
                status: StreamStatus::Up,
                status_since: now - Duration::from_secs(600),
                last_error: None,
                last_message: Some(now),
                svids,
                bundle_authorities: 1,
                bundle: Vec::new(),
                rotations: 0,
                updated_at: now,
            }
        })
        .collect()
}

/// The server's view of the fleet, as `Agent.ListAgents` pages it: every
/// agent renewing normally except every twentieth, which is not renewing.
fn server_view(now: SystemTime) -> ServerView {
    ServerView {
        server: "server-a".into(),
        reachable: true,
        last_error: None,
        since: now - Duration::from_secs(3600),
        updated_at: now,
        uptime_secs: 3600,
        svid_expires_at: Some(now + Duration::from_secs(86_400)),
        agents_count: AGENTS as u64,
        entries_count: (AGENTS * SVIDS_PER_AGENT) as u64,
        agents: (0..AGENTS)
            .map(|i| ServerAgent {
                spiffe_id: format!("spiffe://bench.test/spire/agent/k8s_psat/c/{i}"),
                attestation_type: "k8s_psat".into(),
                serial: format!("{i:x}"),
                expires_at: now + Duration::from_secs(if i % 20 == 0 { 900 } else { 2700 }),
                banned: false,
                can_reattest: true,
            })
            .collect(),
        agents_truncated: false,
        bundle: Vec::new(),
        bundle_sequence: 1,
        entry_lookups: Vec::new(),
        address_reachable: None,
        address_error: None,
    }
}

/// One sensor serving every agent's view (as a fleet-wide sensor would).
struct FleetSensor(Vec<Arc<AgentView>>, Arc<ServerView>);

#[async_trait]
impl Sensor for FleetSensor {
    fn name(&self) -> &'static str {
        "bench"
    }
    fn instance(&self) -> &str {
        "fleet"
    }
    async fn observe(&self) -> Result<Vec<Reading>, SensorError> {
        let mut out: Vec<Reading> = self.0.iter().cloned().map(Reading::WorkloadApi).collect();
        out.push(Reading::Server(self.1.clone()));
        Ok(out)
    }
}

/// Accepts and discards writes: measures the loop, not the database.
struct NullStore;

#[async_trait]
impl Store for NullStore {
    fn backend(&self) -> &'static str {
        "null"
    }
    async fn apply(&self, _: &[Event]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn load_knowledge(&self, _: SystemTime) -> Result<Knowledge, StoreError> {
        Ok(Knowledge::default())
    }
    async fn incidents(&self, _: &Query) -> Result<Vec<IncidentRecord>, StoreError> {
        Ok(vec![])
    }
    async fn actions(&self, _: &Query) -> Result<Vec<ActionRecord>, StoreError> {
        Ok(vec![])
    }
    async fn svids(&self, _: &Query) -> Result<Vec<SvidRecord>, StoreError> {
        Ok(vec![])
    }
    async fn holds(&self, _: &Query) -> Result<Vec<HoldRecord>, StoreError> {
        Ok(vec![])
    }
    async fn incident(&self, _: &str) -> Result<Option<IncidentRecord>, StoreError> {
        Ok(None)
    }
    async fn approvals(&self, _: &Query) -> Result<Vec<ApprovalRecord>, StoreError> {
        Ok(vec![])
    }
    async fn audit(&self, _: &Query) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(vec![])
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let now = t0();
    let fleet = views(now);
    let policy = Policy::builtin().expect("built-in policy parses");

    let mut g = c.benchmark_group("analyze");
    g.throughput(Throughput::Elements((AGENTS * SVIDS_PER_AGENT) as u64));
    g.sample_size(20);
    g.bench_function("100k_svids", |b| {
        b.iter(|| {
            analyze(
                &fleet,
                &Default::default(),
                &|_| false,
                &policy.thresholds,
                now,
            )
        })
    });
    g.finish();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let clock = Arc::new(ManualClock::new(now));
    let metrics = Arc::new(Metrics::new());
    let mut supervisor = Supervisor::new(
        Parts {
            clock: clock.clone() as Arc<dyn Clock>,
            sensors: vec![Box::new(FleetSensor(
                fleet.into_iter().map(Arc::new).collect(),
                Arc::new(server_view(now)),
            ))],
            actuators: Default::default(),
            policy,
            operator: spire_healer::supervisor::Operator::detached(true),
            buffer: Buffer::new(Arc::new(NullStore), 1_000_000),
            metrics,
            health: Arc::new(Health::new(Duration::from_secs(10))),
            wake: Arc::new(tokio::sync::Notify::new()),
            tick_interval: Duration::from_secs(1),
            handshakes: Default::default(),
            targets: Targets::new(
                (0..AGENTS).map(|i| format!("agent-{i}")),
                [],
                Default::default(),
            ),
        },
        Knowledge::default(),
    );
    // First tick opens the incidents and records every SVID once.
    rt.block_on(supervisor.tick(now));
    let mut g = c.benchmark_group("tick");
    g.throughput(Throughput::Elements((AGENTS * SVIDS_PER_AGENT) as u64));
    g.sample_size(20);
    g.bench_function("10k_agents_100k_svids_steady", |b| {
        b.iter(|| {
            clock.advance(Duration::from_millis(1));
            rt.block_on(supervisor.tick(clock.now()))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
