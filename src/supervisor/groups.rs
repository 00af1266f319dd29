//! Which server each agent is behind: the blast-radius group "agents behind
//! one server". Read from each agent's config file (`server_address`,
//! `server_port`), matched against the configured servers' `address`, and
//! read again at most every [`REFRESH`] (a failover rewrites the file).
//! Agents without a config file, or pointing at no configured server, are
//! in no server group.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tracing::debug;

use crate::actuators::agent_config::current_server;
use crate::clock::saturating_since;

/// How often the agents' config files are read again.
pub const REFRESH: Duration = Duration::from_secs(30);

/// Agent → server, from the agents' config files.
#[derive(Debug, Default, Clone)]
pub struct AgentServers {
    /// (agent, config file).
    files: Vec<(String, PathBuf)>,
    /// (server name, `host:port`).
    servers: Vec<(String, String)>,
    map: HashMap<String, String>,
    read_at: Option<SystemTime>,
}

impl AgentServers {
    /// Groups for `files` (agent, config file) among `servers` (name,
    /// `host:port`).
    pub fn new(files: Vec<(String, PathBuf)>, servers: Vec<(String, String)>) -> Self {
        Self {
            files,
            servers,
            ..Self::default()
        }
    }

    /// Agent → server name, read again when older than [`REFRESH`].
    pub fn current(&mut self, now: SystemTime) -> &HashMap<String, String> {
        let stale = self
            .read_at
            .is_none_or(|at| saturating_since(now, at) >= REFRESH);
        if stale && !self.files.is_empty() && !self.servers.is_empty() {
            self.map = self.read();
            self.read_at = Some(now);
        }
        &self.map
    }

    fn read(&self) -> HashMap<String, String> {
        let mut map = HashMap::with_capacity(self.files.len());
        for (agent, path) in &self.files {
            let found = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| current_server(&text, path).map_err(|e| e.to_string()));
            match found {
                Ok((host, port)) => {
                    let addr = format!("{host}:{port}");
                    if let Some((name, _)) = self.servers.iter().find(|(_, a)| *a == addr) {
                        map.insert(agent.clone(), name.clone());
                    }
                }
                Err(error) => {
                    debug!(agent, %error, "No server group for the agent.");
                }
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn agents_are_grouped_by_the_server_their_config_names_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.conf");
        let b = dir.path().join("b.conf");
        let conf = |port: u16| {
            format!(
                "agent {{\n    server_address = \"127.0.0.1\"\n    server_port = \"{port}\"\n}}\n"
            )
        };
        std::fs::write(&a, conf(8081)).unwrap();
        std::fs::write(&b, conf(9999)).unwrap();
        let mut g = AgentServers::new(
            vec![
                ("a".into(), a.clone()),
                ("b".into(), b),
                ("c".into(), dir.path().join("none")),
            ],
            vec![
                ("s1".into(), "127.0.0.1:8081".into()),
                ("s2".into(), "127.0.0.1:8082".into()),
            ],
        );
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            g.current(t0).clone(),
            HashMap::from([("a".to_string(), "s1".to_string())])
        );
        std::fs::write(&a, conf(8082)).unwrap();
        assert_eq!(g.current(t0 + Duration::from_secs(1))["a"], "s1", "cached");
        assert_eq!(g.current(t0 + REFRESH)["a"], "s2", "read again");
    }
}
