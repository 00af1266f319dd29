//! spire-healer in-process against an HA lab: every server and agent of
//! the lab configured, with the actuators the control-plane ladders use.

use std::path::Path;

use anyhow::Result;

use crate::helpers::Healer;
use crate::spire_lab::HaLab;

/// The config watching every server and agent of `lab`: servers and agents
/// polled every second, a 250 ms tick, a SQLite store in `dir`, and the
/// `restart-agent`, `failover`, `evict-agent` and `entry-bump` actuators.
/// `policy_file`: `None` for the built-in policy. With `bootstrap_bundle`,
/// every agent's `trust_bundle_path` is the lab's bootstrap bundle.
pub fn ha_config(
    lab: &HaLab,
    dir: &Path,
    policy_file: Option<&Path>,
    bootstrap_bundle: bool,
) -> String {
    let a0 = lab.agent(0);
    // The lab's per-agent paths, with the agent's name as `{agent}`.
    let per_agent = |p: &Path| {
        p.to_string_lossy()
            .replace(&format!("/{}/", a0.name()), "/{agent}/")
    };
    let restart = a0.restart_command();
    let policy = policy_file
        .map(|p| format!("policy_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    let mut text = format!(
        r#"{policy}[supervisor]
tick_interval = "250ms"
[database]
url = "sqlite://{db}"
[http]
listen = "127.0.0.1:0"
[actuators.restart-agent]
type = "command"
argv = ["{sh}", "{script}"]
timeout = "20s"
[actuators.failover]
type = "server_failover"
strategy = "agent_config"
restart = "restart-agent"
repair_persisted_bundle = true
[actuators.evict-agent]
type = "agent_evict"
restart = "restart-agent"
join_token_file = "{token}"
[actuators.entry-bump]
type = "entry_bump"
"#,
        db = dir.join("healer.db").display(),
        sh = restart[0],
        script = per_agent(Path::new(&restart[1])),
        token = per_agent(a0.join_token_file()),
    );
    for s in lab.servers() {
        text += &format!(
            "[[servers]]\nname = \"{}\"\nadmin_socket = \"{}\"\naddress = \"{}\"\nhealth_url = \"{}\"\nmetrics_url = \"{}\"\npoll_interval = \"1s\"\ntimeout = \"2s\"\n",
            s.name(),
            s.socket().display(),
            s.address(),
            s.health_url().trim_end_matches("/ready"),
            s.metrics_url(),
        );
    }
    for a in lab.agents() {
        text += &format!(
            "[[agents]]\nname = \"{}\"\naddress = \"unix://{}\"\nadmin_socket = \"{}\"\nhealth_url = \"{}\"\nmetrics_url = \"{}\"\nconfig_file = \"{}\"\ndata_dir = \"{}\"\nnode_alias = \"{}\"\npoll_interval = \"1s\"\nanswer_timeout = \"2s\"\nbackoff_max = \"2s\"\n",
            a.name(),
            a.workload_socket().display(),
            a.admin_socket().display(),
            a.health_url().trim_end_matches("/ready"),
            a.metrics_url(),
            a.conf().display(),
            a.data_dir().display(),
            a.node_alias(),
        );
        if bootstrap_bundle {
            text += &format!("trust_bundle_path = \"{}\"\n", lab.bundle_path().display());
        }
    }
    text
}

/// Starts spire-healer watching `lab` with the built-in policy.
pub async fn start_builtin(lab: &HaLab) -> Result<Healer> {
    let dir = tempfile::tempdir()?;
    let text = ha_config(lab, dir.path(), None, false);
    Healer::launch(&text, dir).await
}
