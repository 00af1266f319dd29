//! spire-healer: a self-healing supervisor for SPIFFE/SPIRE.
//!
//! A MAPE-K loop over SPIRE agents and servers:
//!
//! - [`sensors`] (Monitor): the SPIFFE Workload API per agent; the server
//!   and agent admin APIs (Debug, Agent, Bundle); HTTP health; Prometheus
//!   metrics. Each runs as a background task publishing snapshots.
//! - [`analyze`] (Analyze, pure): observations + open incidents + `now` →
//!   symptoms (SVID lifecycle, agent connectivity, control plane), with
//!   separate open and close conditions and a predicted time to outage.
//! - [`plan`] (Plan, pure): symptoms + history + policy → steps, under
//!   cooldowns, an hourly budget, dry-run, "blind → do nothing", "no
//!   disruptive action while no server answers" and a cluster circuit breaker.
//! - [`actuators`] (Execute): `refetch`, `command`, `entry_bump`,
//!   `agent_evict`, `server_failover`, `signal`, `webhook`, and the
//!   Kubernetes `k8s_evict`, `k8s_delete_pod`, `k8s_rollout_restart` (over
//!   [`k8s`]: the API client, symptom → pods mapping, owner resolution);
//!   preconditions checked against the latest observations; idempotent,
//!   cancel-safe.
//! - [`knowledge`] (Knowledge): SQLite or PostgreSQL; incidents, actions,
//!   holds, SVID lifecycles; batched, buffered while the database is away.
//! - [`slo`]: service levels of SPIRE itself (issuance latency, renewal,
//!   handshakes, server availability) and their `[slo]` objectives.
//! - [`replay`]: observation frames recorded around incidents, and
//!   `spire-healer replay`, which runs analyze and plan over them again
//!   under another policy and sets what it would do beside what was done.
//! - [`supervisor`]: `tick(now)` wires the stages; `run(shutdown)` loops.
//!   The loop's memory is one type per concern under `supervisor/`
//!   (incidents, guards, executor, changes, handshakes, sensing, recorder);
//!   [`app`] starts everything from a validated config (sensors from
//!   [`sensors::SensorSpec`], one per configured source).
//!
//! Around them: [`config`] and [`policy`] (TOML), [`endpoint`] (SPIFFE
//! endpoint addresses), [`svid`] (X509-SVID checks), [`spiffe_id`],
//! [`spire_api`] (typed SPIRE admin API clients), [`api`] (our gRPC API on
//! a Unix socket: handshake reports), [`http_client`],
//! [`telemetry`] (metrics, logs, `/metrics` `/healthz` `/readyz`), [`clock`],
//! [`demo`] (the simulated first run), [`simulated`] (the in-process SPIRE
//! the demo, unit tests and benches run against), [`cli`], [`term`] (terminal
//! helpers shared by the front ends) and [`proto`] (generated gRPC code).
//!
//! Real SPIRE labs (process control, PostgreSQL administration, the test
//! workloads) are not part of the product: they live in the `spire-lab`
//! crate (`lab/`), which the integration tests use.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]

pub mod actuators;
pub mod analyze;
pub mod api;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod demo;
pub mod endpoint;
pub mod handshake;
pub mod http_client;
pub mod k8s;
pub mod knowledge;
pub mod leadership;
pub mod model;
pub mod plan;
pub mod policy;
pub mod replay;
pub mod sensors;
pub mod simulated;
pub mod slo;
pub mod spiffe_id;
pub mod spire_api;
pub mod supervisor;
pub mod svid;
pub mod telemetry;
pub mod term;

/// Generated gRPC code.
pub mod proto {
    /// The SPIFFE Workload API (no protobuf package: paths are
    /// `/SpiffeWorkloadAPI/<Rpc>`).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod workload {
        tonic::include_proto!("_");
    }

    /// spire-healer's own API (`spire_healer.v1`): the `Supervisor`
    /// service served by [`crate::api`].
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod healer {
        tonic::include_proto!("spire_healer.v1");
    }

    /// SPIRE's admin APIs (`spire-api-sdk`), reduced to the RPCs
    /// spire-healer calls. Modules follow the protobuf packages, which are
    /// the gRPC paths SPIRE serves (`/spire.api.server.agent.v1.Agent/…`).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod spire {
        /// `spire.api.*`.
        pub mod api {
            /// `spire.api.types`: messages shared by the services.
            pub mod types {
                tonic::include_proto!("spire.api.types");
            }

            /// Server APIs (server admin socket).
            pub mod server {
                /// `spire.api.server.agent.v1`.
                pub mod agent {
                    /// Agent service, v1.
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.agent.v1");
                    }
                }

                /// `spire.api.server.bundle.v1`.
                pub mod bundle {
                    /// Bundle service, v1.
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.bundle.v1");
                    }
                }

                /// `spire.api.server.debug.v1`.
                pub mod debug {
                    /// Debug service, v1.
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.debug.v1");
                    }
                }

                /// `spire.api.server.entry.v1`.
                pub mod entry {
                    /// Entry service, v1.
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.entry.v1");
                    }
                }
            }
        }

        /// `spire.agent.*`: agent admin socket APIs (no `api` segment).
        pub mod agent {
            /// `spire.agent.debug.v1`.
            pub mod debug {
                /// Debug service, v1.
                pub mod v1 {
                    tonic::include_proto!("spire.agent.debug.v1");
                }
            }
        }
    }
}
