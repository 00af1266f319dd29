//! `lab.json`, the description of a lab started by `spire-lab up`,
//! and the `spire-healer.toml` written next to it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{LabError, write_file};

/// Everything another program needs to use or stop a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabManifest {
    /// Format version ([`LabManifest::VERSION`]).
    pub version: u32,
    /// `running` or `stopped`.
    pub state: String,
    /// The lab directory (absolute).
    pub dir: PathBuf,
    /// The process that owns the lab (`spire-lab up`).
    pub owner_pid: u32,
    /// Trust domain.
    pub trust_domain: String,
    /// Folder of `spire-server` and `spire-agent`.
    pub bin_dir: PathBuf,
    /// The agents' bootstrap bundle.
    pub bundle_path: PathBuf,
    /// The shared datastore.
    pub database: DatabaseManifest,
    /// Servers, `server-a` first.
    pub servers: Vec<ServerManifest>,
    /// Agents, `agent-0` first.
    pub agents: Vec<AgentManifest>,
}

/// The lab's PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseManifest {
    /// Database name (`spire_lab_…`).
    pub name: String,
    /// The URL it was created through; used to drop it.
    pub admin_url: String,
    /// The servers' `connection_string`.
    pub spire_connection_string: String,
}

/// One server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerManifest {
    /// `server-a`, …
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// `server.conf` (every process of this server has it on its command line).
    pub conf: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Holds the current pid.
    pub pidfile: PathBuf,
    /// Pid when the manifest was written.
    pub pid: Option<i32>,
    /// Admin socket.
    pub socket: PathBuf,
    /// `127.0.0.1:<bind_port>`.
    pub address: String,
    /// Agents' `server_port`.
    pub bind_port: u16,
    /// `/ready`.
    pub health_url: String,
    /// `/live`.
    pub live_url: String,
    /// Prometheus `/metrics`.
    pub metrics_url: String,
}

/// One agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentManifest {
    /// `agent-0`, …
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// `agent.conf` (every process of this agent has it on its command line).
    pub conf: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Holds the current pid (the restart script updates it).
    pub pidfile: PathBuf,
    /// Pid when the manifest was written.
    pub pid: Option<i32>,
    /// Workload API socket.
    pub workload_socket: PathBuf,
    /// Admin socket (Debug API).
    pub admin_socket: PathBuf,
    /// `/ready`.
    pub health_url: String,
    /// `/live`.
    pub live_url: String,
    /// Prometheus `/metrics`.
    pub metrics_url: String,
    /// Restarts the agent from its `agent.conf`.
    pub restart_command: Vec<String>,
    /// A pending join token here is used (and deleted) by the next start.
    pub join_token_file: PathBuf,
    /// The server its `agent.conf` points at.
    pub server: String,
    /// That server's port.
    pub server_port: u16,
    /// `spiffe://<td>/node/<j>`: parent for this agent's entries.
    pub node_alias: String,
    /// The agent's own SPIFFE ID.
    pub spiffe_id: String,
    /// Workload entries `spire-lab up` registered under the node alias (for the
    /// uid that ran it), so that spire-healer gets SVIDs from this agent.
    #[serde(default)]
    pub entries: Vec<String>,
}

impl LabManifest {
    /// Current format version.
    pub const VERSION: u32 = 1;
    /// File name in the lab directory.
    pub const FILE: &'static str = "lab.json";

    /// Reads `path`.
    ///
    /// # Errors
    /// Unreadable or not a manifest.
    pub fn read(path: &Path) -> Result<Self, LabError> {
        let text =
            std::fs::read(path).map_err(LabError::io(format!("reading {}", path.display())))?;
        serde_json::from_slice(&text).map_err(|source| LabError::Manifest {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes `path` atomically (temporary file, then rename).
    ///
    /// # Errors
    /// File errors.
    pub fn write(&self, path: &Path) -> Result<(), LabError> {
        let text = serde_json::to_vec_pretty(self).map_err(|source| LabError::Manifest {
            path: path.to_path_buf(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        write_file(&tmp, &text)?;
        std::fs::rename(&tmp, path).map_err(LabError::io(format!("renaming {}", tmp.display())))
    }
}

/// A `spire-healer.toml` watching the lab's agents: one `[[agents]]` per
/// agent (Workload API socket), `restart-agent` (the built-in policy's
/// actuator; `{agent}` picks the agent's own restart script) and one
/// `restart-<agent>` per agent. Control-plane settings are written as
/// comments until the configuration supports them.
pub fn healer_config(m: &LabManifest, database_url: &str, listen: SocketAddr) -> String {
    let dir = m.dir.display().to_string();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# spire-healer configuration for the SPIRE lab in {dir},\n\
         # written by `spire-lab up`. Run it with:\n\
         #   spire-healer run --config {}\n",
        m.dir.join("spire-healer.toml").display()
    );
    let _ = writeln!(
        t,
        "[supervisor]\ntick_interval = \"1s\"\n\n[database]\nurl = {}\nspool = {}\n\n[http]\nlisten = {}\n",
        toml_str(database_url),
        toml_str(&m.dir.join("spire-healer.spool").display().to_string()),
        toml_str(&listen.to_string())
    );
    for s in &m.servers {
        let _ = writeln!(
            t,
            "[[servers]]\nname = {}\nadmin_socket = {}\naddress = {}\nhealth_url = {}\nmetrics_url = {}\n",
            toml_str(&s.name),
            toml_str(&s.socket.display().to_string()),
            toml_str(&s.address),
            toml_str(s.health_url.trim_end_matches("/ready")),
            toml_str(&s.metrics_url)
        );
    }
    for a in &m.agents {
        let _ = writeln!(
            t,
            "[[agents]]\nname = {}\naddress = {}\nadmin_socket = {}\nhealth_url = {}\nmetrics_url = {}\nconfig_file = {}\ndata_dir = {}\nnode_alias = {}\n",
            toml_str(&a.name),
            toml_str(&format!("unix://{}", a.workload_socket.display())),
            toml_str(&a.admin_socket.display().to_string()),
            toml_str(a.health_url.trim_end_matches("/ready")),
            toml_str(&a.metrics_url),
            toml_str(&a.conf.display().to_string()),
            toml_str(&a.dir.join("data").display().to_string()),
            toml_str(&a.node_alias),
        );
    }
    let per_agent = |p: &str, name: &str| p.replace(&format!("/{name}/"), "/{agent}/");
    if let Some(a) = m.agents.first() {
        let generic: Vec<String> = a
            .restart_command
            .iter()
            .map(|arg| per_agent(arg, &a.name))
            .collect();
        let _ = writeln!(
            t,
            "# The built-in policy's actuators; {{agent}} is the target agent's name.\n\
             [actuators.restart-agent]\ntype = \"command\"\nargv = {}\ntimeout = \"20s\"\n\n\
             [actuators.failover]\ntype = \"server_failover\"\nstrategy = \"agent_config\"\n\
             restart = \"restart-agent\"\nrepair_persisted_bundle = true\n\n\
             [actuators.evict-agent]\ntype = \"agent_evict\"\nrestart = \"restart-agent\"\n\
             join_token_file = {}\n\n\
             [actuators.entry-bump]\ntype = \"entry_bump\"\n",
            toml_array(&generic),
            toml_str(&per_agent(
                &a.join_token_file.display().to_string(),
                &a.name
            )),
        );
    }
    for a in &m.agents {
        let _ = writeln!(
            t,
            "[actuators.restart-{}]\ntype = \"command\"\nargv = {}\ntimeout = \"20s\"\n",
            a.name,
            toml_array(&a.restart_command)
        );
    }
    t
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_array(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", inner.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> LabManifest {
        let agent = |j: usize| AgentManifest {
            name: format!("agent-{j}"),
            dir: format!("/l/agent-{j}").into(),
            conf: format!("/l/agent-{j}/agent.conf").into(),
            log: format!("/l/agent-{j}/agent.log").into(),
            pidfile: format!("/l/agent-{j}/agent.pid").into(),
            pid: Some(10 + j as i32),
            workload_socket: format!("/l/agent-{j}/public/api.sock").into(),
            admin_socket: format!("/l/agent-{j}/admin/admin.sock").into(),
            health_url: "http://127.0.0.1:1/ready".into(),
            live_url: "http://127.0.0.1:1/live".into(),
            metrics_url: "http://127.0.0.1:2/metrics".into(),
            restart_command: vec!["/bin/sh".into(), format!("/l/agent-{j}/restart.sh")],
            join_token_file: format!("/l/agent-{j}/join_token").into(),
            server: "server-a".into(),
            server_port: 3,
            node_alias: format!("spiffe://td/node/{j}"),
            spiffe_id: "spiffe://td/spire/agent/join_token/x".into(),
            entries: vec![format!("spiffe://td/healer/agent-{j}")],
        };
        LabManifest {
            version: LabManifest::VERSION,
            state: "running".into(),
            dir: "/l".into(),
            owner_pid: 1,
            trust_domain: "td".into(),
            bin_dir: "/b".into(),
            bundle_path: "/l/bundle.pem".into(),
            database: DatabaseManifest {
                name: "spire_lab_1_a".into(),
                admin_url: "postgres://u:p@h/db".into(),
                spire_connection_string: "postgres://u:p@h/spire_lab_1_a?sslmode=disable".into(),
            },
            servers: vec![ServerManifest {
                name: "server-a".into(),
                dir: "/l/server-a".into(),
                conf: "/l/server-a/server.conf".into(),
                log: "/l/server-a/server.log".into(),
                pidfile: "/l/server-a/server.pid".into(),
                pid: None,
                socket: "/l/server-a/api.sock".into(),
                address: "127.0.0.1:3".into(),
                bind_port: 3,
                health_url: "http://127.0.0.1:4/ready".into(),
                live_url: "http://127.0.0.1:4/live".into(),
                metrics_url: "http://127.0.0.1:5/metrics".into(),
            }],
            agents: vec![agent(0), agent(1)],
        }
    }

    #[test]
    fn manifest_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LabManifest::FILE);
        let m = sample();
        m.write(&path).unwrap();
        assert_eq!(LabManifest::read(&path).unwrap(), m);
    }

    #[test]
    fn healer_config_parses() {
        let text = healer_config(
            &sample(),
            "sqlite:///l/spire-healer.db",
            "127.0.0.1:9".parse().unwrap(),
        );
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["agents"].as_array().unwrap().len(), 2);
        assert_eq!(
            v["agents"][0]["address"].as_str(),
            Some("unix:///l/agent-0/public/api.sock")
        );
        let acts = v["actuators"].as_table().unwrap();
        assert_eq!(
            acts["restart-agent"]["argv"][1].as_str(),
            Some("/l/{agent}/restart.sh")
        );
        assert_eq!(
            acts["restart-agent-1"]["argv"][1].as_str(),
            Some("/l/agent-1/restart.sh")
        );
        let parsed = spire_healer::config::Config::from_toml(&text, "lab.toml").unwrap();
        assert_eq!(parsed.agents.len(), 2);
        assert_eq!(parsed.servers.len(), sample().servers.len());
        assert!(parsed.agents.iter().all(|a| a.admin_socket.is_some()
            && a.config_file.is_some()
            && a.data_dir.is_some()
            && a.node_alias.is_some()));
        // restart-agent, one per agent, failover, evict-agent, entry-bump.
        assert_eq!(parsed.actuators.len(), 1 + 2 + 3);
        for name in ["failover", "evict-agent", "entry-bump"] {
            assert!(parsed.actuators.contains_key(name), "{name}");
        }
    }

    #[test]
    fn toml_strings_escape() {
        assert_eq!(toml_str("a\"b\\c\n"), r#""a\"b\\c\u000A""#);
    }
}
