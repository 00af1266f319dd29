//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and tonic.
//!
//! `proto/spiffe/workload` is the SPIFFE Workload API (no package);
//! `proto/spire` holds the parts of SPIRE's admin APIs spire-healer calls,
//! under the packages SPIRE serves them with. `proto/spire_healer` is our
//! own API (`spire_healer.v1`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/spiffe/workload/workload.proto",
        "proto/spire/api/types/agent.proto",
        "proto/spire/api/types/bundle.proto",
        "proto/spire/api/types/entry.proto",
        "proto/spire/api/types/federateswith.proto",
        "proto/spire/api/types/jointoken.proto",
        "proto/spire/api/types/selector.proto",
        "proto/spire/api/types/spiffeid.proto",
        "proto/spire/api/types/status.proto",
        "proto/spire/api/server/agent/v1/agent.proto",
        "proto/spire/api/server/bundle/v1/bundle.proto",
        "proto/spire/api/server/debug/v1/debug.proto",
        "proto/spire/api/server/entry/v1/entry.proto",
        "proto/spire/api/agent/debug/v1/debug.proto",
        "proto/spire_healer/v1/healer.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
