//! Server admin API paging: one full `Agent.ListAgents` listing of a
//! 10,000-agent fleet through [`ServerAdminClient::list_agents_paged`],
//! against the simulated server on a Unix socket, at several page sizes
//! (the sensor's default is 500). Also one whole `server_api` poll's worth of
//! calls (Debug.GetInfo + full listing + Bundle.GetBundle, concurrently).
//!
//! Criterion reports agents/s as `elem/s`; the time per iteration is the
//! time per full listing.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use spire_healer::clock::{Clock, SystemClock};
use spire_healer::simulated::server::FakeServer;
use spire_healer::spire_api::ServerAdminClient;
use tokio::runtime::Runtime;

const FLEET: usize = 10_000;

fn paging(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let clock = Arc::new(SystemClock);
    let (server, client) = rt.block_on(async {
        let server = FakeServer::new("bench.example", clock.clone(), &socket).expect("fake");
        server.add_fleet(FLEET, clock.now() + Duration::from_secs(3600));
        server.start().expect("bind");
        let client = ServerAdminClient::new(&socket, Duration::from_secs(10)).expect("client");
        // Connect once outside the measurement.
        client.server_debug_info().await.expect("server answers");
        (server, client)
    });

    let mut group = c.benchmark_group("list_agents_10k");
    group.throughput(Throughput::Elements(FLEET as u64));
    group.sample_size(20);
    for page_size in [100u32, 500, 2_000] {
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("page_{page_size}")),
            &page_size,
            |b, &page_size| {
                b.iter(|| {
                    let (agents, truncated) = rt
                        .block_on(client.list_agents_paged(page_size, 1_000))
                        .expect("listing");
                    assert_eq!(agents.len(), FLEET);
                    assert!(!truncated);
                    agents
                });
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("server_api_poll_10k");
    group.throughput(Throughput::Elements(FLEET as u64));
    group.sample_size(20);
    group.bench_function("debug_list_bundle", |b| {
        b.iter(|| {
            rt.block_on(async {
                tokio::try_join!(
                    client.server_debug_info(),
                    client.list_agents_paged(500, 1_000),
                    client.get_bundle(),
                )
            })
            .expect("poll")
        });
    });
    group.finish();
    drop(server);
}

criterion_group!(benches, paging);
criterion_main!(benches);
