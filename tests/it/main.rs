//! Integration tests: one binary. Real SPIRE (spire-server + spire-agent
//! v1.15.3, installed by scripts/install-spire.sh) runs as child processes in
//! temporary directories; spire-healer runs in-process against them.

mod agent_ttl;
mod alert_rules;
mod api_tcp;
mod ca_rotation;
mod chaos;
mod cli;
mod cluster;
mod control_plane;
mod daemon;
mod dashboard;
mod dashboard_live;
mod frozen_agent;
mod ha_healer;
mod ha_lab;
mod handshakes;
mod healing;
mod helm_rbac;
mod helpers;
mod idle;
mod k8s;
mod k8s_fixtures;
mod k8s_servers;
mod k8s_spire;
mod k8s_storm;
mod lab_peer;
mod lab_smoke;
mod leadership;
mod metrics_lint;
mod operate;
mod partition_failover;
mod prom_server;
mod prometheus;
mod replay;
mod soak;
mod spire_api;
mod spire_api_tls;
mod spire_lab;
mod spool;
mod stuck_agent;
mod sync_loss;
mod traces;
