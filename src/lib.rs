//! spire-healer: a self-healing supervisor for SPIFFE/SPIRE.
//!
//! A MAPE-K loop over SPIRE agents:
//!
//! - [`sensors`] (Monitor): readings from the SPIFFE Workload API, per agent.
//! - [`analyze`] (Analyze, pure): readings + open incidents + `now` → symptoms,
//!   with separate open and close conditions and a predicted time to outage.
//! - [`plan`] (Plan, pure): symptoms + history + policy → steps, under
//!   cooldowns, an hourly budget, dry-run and the "blind → do nothing" rule.
//! - [`actuators`] (Execute): `refetch`, `command`; idempotent, cancel-safe.
//! - [`knowledge`] (Knowledge): SQLite or PostgreSQL; incidents, actions,
//!   SVID lifecycles; batched, buffered while the database is away.
//! - [`supervisor`]: `tick(now)` wires the stages; `run(shutdown)` loops.
//!
//! Around them: [`config`] and [`policy`] (TOML), [`endpoint`] (SPIFFE
//! endpoint addresses), [`svid`] (X509-SVID checks), [`spiffe_id`],
//! [`telemetry`] (metrics, logs, `/metrics` `/healthz` `/readyz`), [`clock`],
//! [`demo`] (the simulated first run) and [`proto`] (generated gRPC code).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]

pub mod actuators;
pub mod analyze;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod endpoint;
pub mod knowledge;
pub mod model;
pub mod plan;
pub mod policy;
pub mod sensors;
pub mod spiffe_id;
pub mod supervisor;
pub mod svid;
pub mod telemetry;

/// Generated gRPC code.
pub mod proto {
    /// The SPIFFE Workload API (no protobuf package: paths are
    /// `/SpiffeWorkloadAPI/<Rpc>`).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod workload {
        tonic::include_proto!("_");
    }
}
