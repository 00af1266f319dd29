//! Rendering of `server.conf`, `agent.conf` and the agent restart script.
//!
//! Only keys documented for SPIRE v1.15.3 appear: unknown keys are fatal to
//! both binaries.

use std::path::{Path, PathBuf};

use super::process::AGENT_START_MARKER;

/// Where a server keeps its data.
pub(crate) enum Datastore {
    /// A sqlite3 file.
    Sqlite(PathBuf),
    /// A lib/pq connection string.
    Postgres(String),
}

/// The servers' `NodeAttestor`.
pub(crate) enum ServerAttestor<'a> {
    /// `join_token`.
    JoinToken,
    /// `k8s_psat` for one cluster, outside Kubernetes (through
    /// `kube_config_file`).
    K8sPsat {
        /// The key of `clusters`.
        cluster: &'a str,
        /// `service_account_allow_list` (`namespace:name`).
        service_account_allow_list: &'a [String],
        /// `kube_config_file`.
        kube_config_file: &'a Path,
    },
}

impl ServerAttestor<'_> {
    fn render(&self) -> String {
        match self {
            ServerAttestor::JoinToken => r#"NodeAttestor "join_token" {
        plugin_data {}
    }"#
            .to_owned(),
            ServerAttestor::K8sPsat {
                cluster,
                service_account_allow_list,
                kube_config_file,
            } => {
                let allowed: Vec<String> = service_account_allow_list
                    .iter()
                    .map(|s| hcl_str(s))
                    .collect();
                format!(
                    r#"NodeAttestor "k8s_psat" {{
        plugin_data {{
            clusters = {{
                {cluster} = {{
                    service_account_allow_list = [{allowed}]
                    kube_config_file = {kubeconfig}
                }}
            }}
        }}
    }}"#,
                    cluster = hcl_str(cluster),
                    allowed = allowed.join(", "),
                    kubeconfig = hcl_str(&kube_config_file.display().to_string()),
                )
            }
        }
    }
}

/// The agents' `NodeAttestor`.
pub(crate) enum AgentAttestor<'a> {
    /// `join_token` (the token is passed with `-joinToken`).
    JoinToken,
    /// `k8s_psat`: the projected-style token in `token_path`.
    K8sPsat {
        /// `cluster` (a key of the servers' `clusters`).
        cluster: &'a str,
        /// `token_path`.
        token_path: &'a Path,
    },
}

impl AgentAttestor<'_> {
    fn render(&self) -> String {
        match self {
            AgentAttestor::JoinToken => r#"NodeAttestor "join_token" {
        plugin_data {}
    }"#
            .to_owned(),
            AgentAttestor::K8sPsat {
                cluster,
                token_path,
            } => format!(
                r#"NodeAttestor "k8s_psat" {{
        plugin_data {{
            cluster = {cluster}
            token_path = {token}
        }}
    }}"#,
                cluster = hcl_str(cluster),
                token = hcl_str(&token_path.display().to_string()),
            ),
        }
    }
}

/// One `server.conf`.
pub(crate) struct ServerConf<'a> {
    pub bind_port: u16,
    pub socket: &'a Path,
    pub data_dir: &'a Path,
    pub keys_path: &'a Path,
    pub trust_domain: &'a str,
    pub ca_ttl: &'a str,
    pub default_x509_svid_ttl: &'a str,
    pub agent_ttl: &'a str,
    pub datastore: Datastore,
    pub health_port: u16,
    pub telemetry_port: Option<u16>,
    pub node_attestor: ServerAttestor<'a>,
}

impl ServerConf<'_> {
    pub fn render(&self) -> String {
        self.render_with_admin_ids(&[])
    }

    /// As [`ServerConf::render`], with `admin_ids` (left out when empty).
    pub fn render_with_admin_ids(&self, admin_ids: &[String]) -> String {
        let admin_ids = if admin_ids.is_empty() {
            String::new()
        } else {
            let ids: Vec<String> = admin_ids.iter().map(|id| hcl_str(id)).collect();
            format!("\n    admin_ids = [{}]", ids.join(", "))
        };
        let (db_type, conn) = match &self.datastore {
            Datastore::Sqlite(p) => ("sqlite3", p.display().to_string()),
            Datastore::Postgres(url) => ("postgres", url.clone()),
        };
        format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = {socket}
    trust_domain = {td}
    data_dir = {data}
    log_level = "DEBUG"
    ca_ttl = {ca_ttl}
    default_x509_svid_ttl = {svid_ttl}
    agent_ttl = {agent_ttl}{admin_ids}
    ratelimit {{
        attestation = false
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "{db_type}"
            connection_string = {conn}
        }}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = {keys}
        }}
    }}
    {attestor}
}}

{health}{telemetry}"#,
            port = self.bind_port,
            socket = hcl_str(&self.socket.display().to_string()),
            td = hcl_str(self.trust_domain),
            data = hcl_str(&self.data_dir.display().to_string()),
            ca_ttl = hcl_str(self.ca_ttl),
            svid_ttl = hcl_str(self.default_x509_svid_ttl),
            agent_ttl = hcl_str(self.agent_ttl),
            conn = hcl_str(&conn),
            keys = hcl_str(&self.keys_path.display().to_string()),
            attestor = self.node_attestor.render(),
            health = health_block(self.health_port),
            telemetry = telemetry_block(self.telemetry_port),
        )
    }
}

/// One `agent.conf`.
pub(crate) struct AgentConf<'a> {
    pub data_dir: &'a Path,
    pub server_port: u16,
    pub socket: &'a Path,
    pub admin_socket: &'a Path,
    pub trust_bundle: &'a Path,
    pub trust_domain: &'a str,
    pub sync_interval: &'a str,
    pub keys_dir: &'a Path,
    pub health_port: u16,
    pub telemetry_port: Option<u16>,
    pub node_attestor: AgentAttestor<'a>,
}

impl AgentConf<'_> {
    pub fn render(&self) -> String {
        format!(
            r#"agent {{
    data_dir = {data}
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = {socket}
    admin_socket_path = {admin}
    trust_bundle_path = {bundle}
    trust_domain = {td}
    experimental {{
        sync_interval = {sync}
    }}
}}

plugins {{
    {attestor}
    KeyManager "disk" {{
        plugin_data {{
            directory = {keys}
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}

{health}{telemetry}"#,
            data = hcl_str(&self.data_dir.display().to_string()),
            port = self.server_port,
            socket = hcl_str(&self.socket.display().to_string()),
            admin = hcl_str(&self.admin_socket.display().to_string()),
            bundle = hcl_str(&self.trust_bundle.display().to_string()),
            td = hcl_str(self.trust_domain),
            sync = hcl_str(self.sync_interval),
            keys = hcl_str(&self.keys_dir.display().to_string()),
            attestor = self.node_attestor.render(),
            health = health_block(self.health_port),
            telemetry = telemetry_block(self.telemetry_port),
        )
    }
}

fn health_block(port: u16) -> String {
    format!(
        r#"health_checks {{
    listener_enabled = true
    bind_address = "127.0.0.1"
    bind_port = "{port}"
}}
"#
    )
}

fn telemetry_block(port: Option<u16>) -> String {
    match port {
        None => String::new(),
        Some(port) => format!(
            r#"
telemetry {{
    Prometheus {{
        host = "127.0.0.1"
        port = {port}
    }}
}}
"#
        ),
    }
}

/// An HCL string literal.
fn hcl_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', r"\\").replace('"', "\\\""))
}

/// A single-quoted shell word.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The agent restart script.
pub(crate) struct RestartScript<'a> {
    /// Working directory of the agent.
    pub cwd: &'a Path,
    pub agent_bin: &'a Path,
    pub conf: &'a Path,
    pub pidfile: &'a Path,
    pub log: &'a Path,
    /// A pending join token: passed with `-joinToken`, then deleted.
    pub token_file: &'a Path,
}

impl RestartScript<'_> {
    pub fn render(&self) -> String {
        let q = |p: &Path| sh_quote(&p.to_string_lossy());
        format!(
            r#"#!/bin/sh
# Restarts one lab spire-agent: SIGKILLs the agent in the pidfile (even a
# stopped one), starts a new detached `spire-agent run -config <agent.conf>`
# (so edits to agent.conf, e.g. server_port, take effect; output appended to
# the agent log), records its pid and exits at once without waiting for the
# agent to become ready. A pending join token file is passed with -joinToken
# and deleted: that is how a banned or evicted agent is admitted again.
cwd={cwd}
agent={agent}
conf={conf}
pidfile={pidfile}
log={log}
token_file={token}

is_lab_agent() {{
  [ -r "/proc/$1/cmdline" ] || return 1
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ] || return 1
  tr '\000' '\n' < "/proc/$1/cmdline" | grep -qxF "$conf"
}}

old=$(cat "$pidfile" 2>/dev/null)
case "$old" in ''|*[!0-9]*) old= ;; esac
if [ -n "$old" ] && is_lab_agent "$old"; then
  kill -KILL "$old" 2>/dev/null
  i=0
  while is_lab_agent "$old" && [ $i -lt 40 ]; do sleep 0.05; i=$((i + 1)); done
fi

set --
if [ -s "$token_file" ]; then
  set -- -joinToken "$(cat "$token_file")"
fi
cd "$cwd" || exit 1
echo "{marker}" >> "$log"
if command -v setsid >/dev/null 2>&1; then
  setsid "$agent" run -config "$conf" "$@" </dev/null >>"$log" 2>&1 &
else
  nohup "$agent" run -config "$conf" "$@" </dev/null >>"$log" 2>&1 &
fi
new=$!
echo "$new" > "$pidfile.tmp" && mv -f "$pidfile.tmp" "$pidfile"
if [ $# -gt 0 ]; then
  rm -f "$token_file"
fi
echo "restarted spire-agent: pid $new (was ${{old:-none}})"
exit 0
"#,
            cwd = q(self.cwd),
            agent = q(self.agent_bin),
            conf = q(self.conf),
            pidfile = q(self.pidfile),
            log = q(self.log),
            token = q(self.token_file),
            marker = AGENT_START_MARKER,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(hcl_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn server_conf_has_postgres_and_telemetry() {
        let p = Path::new("/l/s");
        let text = ServerConf {
            bind_port: 1,
            socket: p,
            data_dir: p,
            keys_path: p,
            trust_domain: "td",
            ca_ttl: "24h",
            default_x509_svid_ttl: "1h",
            agent_ttl: "1h",
            datastore: Datastore::Postgres("postgres://u:p@h:1/d?sslmode=disable".into()),
            health_port: 2,
            telemetry_port: Some(3),
            node_attestor: ServerAttestor::JoinToken,
        }
        .render();
        assert!(text.contains(r#"database_type = "postgres""#), "{text}");
        assert!(
            text.contains(r#"connection_string = "postgres://u:p@h:1/d?sslmode=disable""#),
            "{text}"
        );
        assert!(text.contains("port = 3"), "{text}");
        assert!(text.contains(r#"bind_port = "2""#), "{text}");
        assert!(!text.contains("admin_ids"), "{text}");
        assert!(text.contains(r#"NodeAttestor "join_token""#), "{text}");
    }

    #[test]
    fn k8s_psat_attestors() {
        let p = Path::new("/l/s");
        let allowed = ["spire-system:spire-agent".to_owned()];
        let server = ServerConf {
            bind_port: 1,
            socket: p,
            data_dir: p,
            keys_path: p,
            trust_domain: "td",
            ca_ttl: "24h",
            default_x509_svid_ttl: "1h",
            agent_ttl: "1h",
            datastore: Datastore::Sqlite(p.into()),
            health_port: 2,
            telemetry_port: None,
            node_attestor: ServerAttestor::K8sPsat {
                cluster: "kwok",
                service_account_allow_list: &allowed,
                kube_config_file: Path::new("/l/server.kubeconfig"),
            },
        }
        .render();
        let want = r#"    NodeAttestor "k8s_psat" {
        plugin_data {
            clusters = {
                "kwok" = {
                    service_account_allow_list = ["spire-system:spire-agent"]
                    kube_config_file = "/l/server.kubeconfig"
                }
            }
        }
    }"#;
        assert!(server.contains(want), "{server}");
        assert!(!server.contains("join_token"), "{server}");
        let agent = AgentConf {
            data_dir: p,
            server_port: 1,
            socket: p,
            admin_socket: p,
            trust_bundle: p,
            trust_domain: "td",
            sync_interval: "1s",
            keys_dir: p,
            health_port: 2,
            telemetry_port: None,
            node_attestor: AgentAttestor::K8sPsat {
                cluster: "kwok",
                token_path: Path::new("/l/agent-0.token"),
            },
        }
        .render();
        let want = r#"    NodeAttestor "k8s_psat" {
        plugin_data {
            cluster = "kwok"
            token_path = "/l/agent-0.token"
        }
    }"#;
        assert!(agent.contains(want), "{agent}");
        assert!(!agent.contains("join_token"), "{agent}");
    }

    #[test]
    fn server_conf_admin_ids() {
        let p = Path::new("/l/s");
        let text = ServerConf {
            bind_port: 1,
            socket: p,
            data_dir: p,
            keys_path: p,
            trust_domain: "td",
            ca_ttl: "24h",
            default_x509_svid_ttl: "1h",
            agent_ttl: "1h",
            datastore: Datastore::Sqlite(p.into()),
            health_port: 2,
            telemetry_port: None,
            node_attestor: ServerAttestor::JoinToken,
        }
        .render_with_admin_ids(&["spiffe://td/a".into(), "spiffe://td/b".into()]);
        assert!(
            text.contains(r#"admin_ids = ["spiffe://td/a", "spiffe://td/b"]"#),
            "{text}"
        );
    }
}
