//! A simulated SPIRE, in process: what `spire-healer demo` runs against, and
//! the fixtures of unit tests and benches that need a SPIRE to talk to
//! without installing one.
//!
//! - [`agent`]: a Workload API server ([`agent::FakeAgent`]) minting
//!   short-lived SVIDs, with switchable faults.
//! - [`server`]: a spire-server admin socket ([`server::FakeServer`]: the
//!   Debug, Agent and Bundle services) over a synthetic fleet.
//! - [`issuer`]: a throwaway X.509 CA ([`issuer::TestCa`]) minting SVIDs.
//!
//! Each speaks the real protocol on a Unix socket, and each is a simulation
//! that says so: the real-SPIRE integration tests run spire-server and
//! spire-agent themselves (the lab crate).

pub mod agent;
pub mod issuer;
pub mod server;
