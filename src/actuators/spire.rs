//! Actuators that use the SPIRE admin APIs: `entry_bump` (force a new SVID
//! without a restart), `agent_evict` (DeleteAgent, a fresh join token, then
//! a restart so the agent re-attests) and `server_failover` (point the agent
//! at another HA server, then restart it).
//!
//! Each checks its precondition against the latest observations in
//! [`Actuator::prepare`]; the supervisor records a failed precondition as a
//! hold with its reason.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::{Actuator, ActuatorError, Class, Prepared, agent_config, agent_data};
use crate::model::{Observations, Outcome, Step, Subject};
use crate::spire_api::ServerAdminClient;

/// What the SPIRE actuators know about the deployment (from the config).
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Servers in config order: (name, admin socket, `host:port` agents dial).
    pub servers: Vec<(String, Option<PathBuf>, Option<String>)>,
    /// Agents by name.
    pub agents: HashMap<String, AgentInfo>,
}

/// What the SPIRE actuators know about one agent.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    /// Its config file (rewritten by failover).
    pub config_file: Option<PathBuf>,
    /// Node alias a fresh join token is aliased to.
    pub node_alias: Option<String>,
    /// Its `data_dir` (persisted bundle).
    pub data_dir: Option<PathBuf>,
    /// Its Workload API.
    pub endpoint: Option<crate::endpoint::Endpoint>,
}

impl Topology {
    /// Admin clients of every server with an admin socket, in config order,
    /// reachable ones first per the latest observations.
    fn admin_clients(&self, timeout: Duration) -> Vec<(String, ServerAdminClient)> {
        self.servers
            .iter()
            .filter_map(|(name, sock, _)| {
                let c = ServerAdminClient::new(sock.as_deref()?, timeout).ok()?;
                Some((name.clone(), c))
            })
            .collect()
    }
}

/// Runs `f` against each server until one succeeds.
pub(crate) async fn on_any_server<T, F, Fut>(
    topo: &Topology,
    timeout: Duration,
    mut f: F,
) -> Result<(String, T), ActuatorError>
where
    F: FnMut(ServerAdminClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::spire_api::SpireApiError>>,
{
    let mut last = String::from("no server with an admin socket is configured");
    for (name, c) in topo.admin_clients(timeout) {
        match f(c).await {
            Ok(v) => return Ok((name, v)),
            Err(e) => last = format!("{name}: {e}"),
        }
    }
    Err(ActuatorError::Failed(last))
}

// === entry_bump ===

/// `[actuators.<name>] type = "entry_bump"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryBumpConfig {
    /// Per-call deadline.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Raises the revision of every entry for the SVID's SPIFFE ID, so the agent
/// re-signs it (a reconnect would only return the cached SVID).
pub struct EntryBump {
    config: EntryBumpConfig,
    topo: Arc<Topology>,
}

impl EntryBump {
    pub fn new(config: EntryBumpConfig, topo: Arc<Topology>) -> Self {
        Self { config, topo }
    }
}

#[async_trait]
impl Actuator for EntryBump {
    fn name(&self) -> &'static str {
        "entry_bump"
    }
    fn class(&self) -> Class {
        Class::Gentle
    }
    fn prepare(&self, step: &mut Step, _obs: &Observations) -> Prepared {
        match subject_of(step) {
            Some(Subject::Svid { spiffe_id, .. }) => {
                step.params["spiffe_id"] = json!(spiffe_id);
                Prepared::Ready
            }
            _ => Prepared::Skip("not_an_svid"),
        }
    }
    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let id = step.params["spiffe_id"]
            .as_str()
            .ok_or_else(|| ActuatorError::Failed("step has no spiffe_id".into()))?
            .to_string();
        let t = self.config.call_timeout;
        let (server, revisions) = on_any_server(&self.topo, t, |c| {
            let id = id.clone();
            async move {
                let entries = c.list_entries_by_spiffe_id(&id).await?;
                let mut revs = Vec::new();
                for e in entries {
                    revs.push((e.id.clone(), c.bump_entry(&e.id).await?));
                }
                Ok(revs)
            }
        })
        .await?;
        if revisions.is_empty() {
            return Err(ActuatorError::Failed(format!(
                "no registration entry for {id}"
            )));
        }
        Ok(Outcome::ok(json!({
            "server": server,
            "entries": revisions.iter().map(|(e, r)| json!({"entry_id": e, "revision": r})).collect::<Vec<_>>(),
        })))
    }
}

// === agent_evict ===

/// `[actuators.<name>] type = "agent_evict"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEvictConfig {
    /// The `command` actuator that restarts the agent afterwards.
    pub restart: String,
    /// Where to write a fresh join token for the agent's next start
    /// (`{agent}` is substituted); none: the agent re-attests by itself
    /// (x509pop, k8s_psat, …).
    #[serde(default)]
    pub join_token_file: Option<String>,
    /// Join token lifetime.
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub join_token_ttl: Duration,
    /// Per-call deadline.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(600)
}

/// DeleteAgent (which also lifts a ban), a new join token if configured,
/// then the restart command: the agent attests again (spiffe/spire#2910).
pub struct AgentEvict {
    config: AgentEvictConfig,
    topo: Arc<Topology>,
    restart: Arc<dyn Actuator>,
}

impl AgentEvict {
    /// New; `restart` is the configured restart actuator.
    pub fn new(config: AgentEvictConfig, topo: Arc<Topology>, restart: Arc<dyn Actuator>) -> Self {
        Self {
            config,
            topo,
            restart,
        }
    }
}

#[async_trait]
impl Actuator for AgentEvict {
    fn name(&self) -> &'static str {
        "agent_evict"
    }
    fn prepare(&self, step: &mut Step, obs: &Observations) -> Prepared {
        // The agent's SPIFFE ID: from the incident evidence (server view)
        // or the agent's Debug API.
        let from_debug = obs
            .agent_debug
            .iter()
            .find(|d| d.agent == step.target)
            .and_then(|d| d.spiffe_id.clone());
        let id = step.params["evidence_spiffe_id"]
            .as_str()
            .map(str::to_string)
            .or(from_debug);
        match id {
            Some(id) => {
                step.params["spiffe_id"] = json!(id);
                Prepared::Ready
            }
            None => Prepared::Wait("agent_id_unknown"),
        }
    }
    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let id = step.params["spiffe_id"]
            .as_str()
            .ok_or_else(|| ActuatorError::Failed("step has no spiffe_id".into()))?
            .to_string();
        let t = self.config.call_timeout;
        let alias = self
            .topo
            .agents
            .get(&step.target)
            .and_then(|a| a.node_alias.clone());
        let token_file = self
            .config
            .join_token_file
            .as_ref()
            .map(|f| f.replace("{agent}", &step.target));
        let ttl = self.config.join_token_ttl;
        let (server, token) = on_any_server(&self.topo, t, |c| {
            let id = id.clone();
            let alias = alias.clone();
            let want_token = token_file.is_some();
            async move {
                match c.delete_agent(&id).await {
                    Ok(()) => {}
                    // Already gone: a second run after a cancelled one.
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(e),
                }
                if want_token {
                    Ok(Some(
                        c.create_join_token(ttl, alias.as_deref()).await?.value,
                    ))
                } else {
                    Ok(None)
                }
            }
        })
        .await?;
        if let (Some(file), Some(token)) = (&token_file, &token) {
            write_secret(file, token)?;
        }
        let restarted = self.restart.execute(step).await?;
        if restarted.kind != crate::model::OutcomeKind::Ok {
            return Ok(Outcome {
                detail: json!({ "deleted_on": server, "restart": restarted.detail }),
                ..restarted
            });
        }
        Ok(Outcome::ok(json!({
            "deleted": id,
            "deleted_on": server,
            "join_token_file": token_file,
            "restart": restarted.detail,
        })))
    }
}

/// Writes a secret file (0600) atomically.
fn write_secret(path: &str, value: &str) -> Result<(), ActuatorError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let p = std::path::Path::new(path);
    let err = |e: std::io::Error| ActuatorError::Failed(format!("writing {path}: {e}"));
    let dir = p.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.write_all(value.as_bytes()).map_err(err)?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    tmp.persist(p).map_err(|e| err(e.error))?;
    Ok(())
}

// === server_failover ===

/// `[actuators.<name>] type = "server_failover"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// How to re-point the agent. `agent_config`: rewrite `server_address`
    /// and `server_port` in the agent's config file, then restart it.
    /// (Kubernetes Service/EndpointSlice strategies come later.)
    pub strategy: FailoverStrategy,
    /// The `command` actuator that restarts the agent.
    pub restart: String,
    /// When the agent's persisted bundle (in its `data_dir`) lacks the
    /// target server's CA but its live bundle has it, add the missing
    /// authorities to the persisted bundle before the restart (what SPIRE's
    /// own bundle observer would have written). Off: such a failover is held
    /// with reason `target_ca_not_in_persisted_bundle`.
    #[serde(default)]
    pub repair_persisted_bundle: bool,
}

/// Failover strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverStrategy {
    /// Rewrite the agent's config file and restart it.
    AgentConfig,
}

/// Moves an agent whose server is down to a healthy one.
pub struct Failover {
    config: FailoverConfig,
    topo: Arc<Topology>,
    restart: Arc<dyn Actuator>,
}

impl Failover {
    pub fn new(config: FailoverConfig, topo: Arc<Topology>, restart: Arc<dyn Actuator>) -> Self {
        Self {
            config,
            topo,
            restart,
        }
    }
}

#[async_trait]
impl Actuator for Failover {
    fn name(&self) -> &'static str {
        "server_failover"
    }
    fn class(&self) -> Class {
        Class::Failover
    }
    /// Preconditions: the agent's config names a watched server that is
    /// unhealthy (its admin API fails, or its agent-facing address is known
    /// unreachable from this node: a partition the admin API cannot see);
    /// another watched server answers on its admin API and, when its address
    /// is checked, there too ([`crate::model::ServerView::serves_agents`]);
    /// every authority in that
    /// server's bundle is in the agent's own bundle (else the agent would
    /// refuse it and exit: "Synchronize failed, non-recoverable error").
    fn prepare(&self, step: &mut Step, obs: &Observations) -> Prepared {
        let Some(info) = self.topo.agents.get(&step.target) else {
            return Prepared::Skip("no_agent_config_file");
        };
        let Some(conf) = &info.config_file else {
            return Prepared::Skip("no_agent_config_file");
        };
        let Ok(text) = std::fs::read_to_string(conf) else {
            return Prepared::Skip("agent_config_unreadable");
        };
        let Ok((addr, port)) = agent_config::current_server(&text, conf) else {
            return Prepared::Skip("agent_config_unparsable");
        };
        let current_addr = format!("{addr}:{port}");
        let view = |name: &str| obs.servers.iter().find(|s| s.server == name);
        let current = self
            .topo
            .servers
            .iter()
            .find(|(_, _, a)| a.as_deref() == Some(current_addr.as_str()));
        if let Some((name, ..)) = current
            && view(name).is_some_and(|v| v.serves_agents())
        {
            return Prepared::Skip("current_server_healthy");
        }
        let agent_view = obs.agents.iter().find(|v| v.agent == step.target);
        let agent_bundle = agent_view.map(|v| v.bundle.clone()).unwrap_or_default();
        // `spiffe://td` of the agent's own SVIDs: the bundle key to repair from.
        let trust_domain = agent_view
            .and_then(|v| v.svids.first())
            .and_then(|s| s.spiffe_id.strip_prefix("spiffe://"))
            .and_then(|rest| rest.split('/').next())
            .map(|td| format!("spiffe://{td}"))
            .unwrap_or_default();
        let mut reason = "no_ready_target";
        for (name, _, target_addr) in &self.topo.servers {
            let Some(target_addr) = target_addr else {
                continue;
            };
            if *target_addr == current_addr {
                continue;
            }
            let Some(v) = view(name).filter(|v| v.serves_agents()) else {
                continue;
            };
            if agent_bundle.is_empty() {
                reason = "agent_bundle_unknown";
                continue;
            }
            let missing = v
                .bundle
                .iter()
                .filter(|a| !a.tainted && !agent_bundle.contains(&a.fingerprint))
                .count();
            if missing > 0 {
                reason = "target_ca_not_in_agent_bundle";
                continue;
            }
            // What the agent will trust after the restart.
            let mut repair = false;
            if let Some(dir) = &info.data_dir {
                let Ok(persisted) = agent_data::persisted_fingerprints(dir) else {
                    reason = "agent_data_unreadable";
                    continue;
                };
                let lacking = v
                    .bundle
                    .iter()
                    .any(|a| !a.tainted && !persisted.contains(&a.fingerprint));
                if lacking && !self.config.repair_persisted_bundle {
                    reason = "target_ca_not_in_persisted_bundle";
                    continue;
                }
                repair = lacking;
            }
            step.params["repair_persisted_bundle"] = json!(repair);
            step.params["trust_domain"] = json!(trust_domain);
            step.params["from"] = json!(current_addr);
            step.params["from_server"] = json!(current.map(|c| c.0.clone()));
            step.params["to"] = json!(target_addr);
            step.params["to_server"] = json!(name);
            step.params["config_file"] = json!(conf);
            return Prepared::Ready;
        }
        Prepared::Wait(reason)
    }
    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let conf = step.params["config_file"]
            .as_str()
            .ok_or_else(|| ActuatorError::Failed("step has no config_file".into()))?;
        let to = step.params["to"]
            .as_str()
            .ok_or_else(|| ActuatorError::Failed("step has no target".into()))?;
        let (host, port) = to
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| ActuatorError::Failed(format!("bad target address {to:?}")))?;
        let mut repaired = 0;
        if step.params["repair_persisted_bundle"] == json!(true) {
            let info = self
                .topo
                .agents
                .get(&step.target)
                .ok_or_else(|| ActuatorError::UnknownTarget(step.target.clone()))?;
            let (Some(dir), Some(endpoint)) = (&info.data_dir, &info.endpoint) else {
                return Err(ActuatorError::Failed(
                    "no data_dir or Workload API endpoint to repair the bundle from".into(),
                ));
            };
            let td = step.params["trust_domain"].as_str().unwrap_or_default();
            let live = crate::sensors::workload_api::fetch_bundle_once(
                endpoint,
                td,
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| ActuatorError::Failed(format!("reading the agent's live bundle: {e}")))?;
            repaired = agent_data::add_to_persisted_bundle(dir, &live)
                .map_err(|e| ActuatorError::Failed(e.to_string()))?;
        }
        let before = agent_config::rewrite_file(std::path::Path::new(conf), host, port)
            .map_err(|e| ActuatorError::Failed(e.to_string()))?;
        let restarted = self.restart.execute(step).await?;
        Ok(Outcome {
            detail: json!({
                "from": format!("{}:{}", before.0, before.1),
                "to": to,
                "to_server": step.params["to_server"],
                "persisted_bundle_authorities_added": repaired,
                "restart": restarted.detail,
            }),
            ..restarted
        })
    }
}

fn not_found(e: &crate::spire_api::SpireApiError) -> bool {
    matches!(e, crate::spire_api::SpireApiError::Status { status, .. } if status.code() == tonic::Code::NotFound)
}

fn subject_of(step: &Step) -> Option<Subject> {
    step.params["subject"].as_str().and_then(Subject::parse)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::actuators::{CommandActuator, CommandConfig};
    use crate::model::{AgentView, Authority, ServerView, StreamStatus, SymptomKind};

    fn t() -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn server(name: &str, reachable: bool, fps: &[&str]) -> Arc<ServerView> {
        Arc::new(ServerView {
            server: name.into(),
            reachable,
            last_error: (!reachable).then(|| "unavailable".into()),
            since: t(),
            updated_at: t(),
            uptime_secs: 1,
            svid_expires_at: None,
            agents_count: 1,
            entries_count: 1,
            agents: vec![],
            agents_truncated: false,
            bundle: fps
                .iter()
                .map(|f| Authority {
                    fingerprint: f.to_string(),
                    key_id: String::new(),
                    not_after: t() + Duration::from_secs(86_400),
                    tainted: false,
                })
                .collect(),
            bundle_sequence: 1,
            entry_lookups: Vec::new(),
            address_reachable: None,
            address_error: None,
        })
    }

    /// `server` whose admin API answers (or not) and whose agent-facing
    /// address was checked with `address` (`None`: not checked).
    fn server_at(name: &str, admin: bool, address: Option<bool>) -> Arc<ServerView> {
        let mut v = (*server(name, admin, &["ca-a", "ca-b"])).clone();
        v.address_reachable = address;
        v.address_error = (address == Some(false)).then(|| "timeout".into());
        Arc::new(v)
    }

    fn agent(bundle: &[&str]) -> Arc<AgentView> {
        Arc::new(AgentView {
            agent: "a".into(),
            status: StreamStatus::Up,
            status_since: t(),
            last_error: None,
            last_message: Some(t()),
            svids: vec![],
            bundle_authorities: bundle.len(),
            bundle: bundle.iter().map(|s| s.to_string()).collect(),
            rotations: 0,
            updated_at: t(),
        })
    }

    fn step() -> Step {
        Step {
            action_id: "x".into(),
            incident_id: "i".into(),
            symptom: SymptomKind::AgentSyncStale,
            rung: 0,
            actuator: "failover".into(),
            target: "a".into(),
            params: json!({ "subject": "agent:a" }),
            timeout: Duration::from_secs(5),
            verify_within: Duration::from_secs(5),
            dry_run: false,
        }
    }

    fn failover(conf: Option<PathBuf>) -> Failover {
        let topo = Topology {
            servers: vec![
                ("s-a".into(), None, Some("127.0.0.1:8081".into())),
                ("s-b".into(), None, Some("127.0.0.1:8082".into())),
            ],
            agents: HashMap::from([(
                "a".to_string(),
                AgentInfo {
                    config_file: conf,
                    ..AgentInfo::default()
                },
            )]),
        };
        let restart = Arc::new(CommandActuator::new(CommandConfig {
            argv: vec!["true".into()],
            timeout: Duration::from_secs(5),
        }));
        Failover::new(
            FailoverConfig {
                strategy: FailoverStrategy::AgentConfig,
                restart: "restart".into(),
                repair_persisted_bundle: false,
            },
            Arc::new(topo),
            restart,
        )
    }

    fn conf_file(dir: &std::path::Path) -> PathBuf {
        let p = dir.join("agent.conf");
        std::fs::write(
            &p,
            "agent {\n    server_address = \"127.0.0.1\"\n    server_port = \"8081\"\n}\n",
        )
        .unwrap();
        p
    }

    #[test]
    fn failover_preconditions() {
        let dir = tempfile::tempdir().unwrap();
        let f = failover(Some(conf_file(dir.path())));
        let obs = |a_up: bool, b_up: bool, agent_bundle: &[&str]| Observations {
            servers: vec![
                server("s-a", a_up, &["ca-a", "ca-b"]),
                server("s-b", b_up, &["ca-a", "ca-b"]),
            ],
            agents: vec![agent(agent_bundle)],
            ..Default::default()
        };
        // Current server fine: not applicable, next rung.
        let mut s = step();
        assert_eq!(
            f.prepare(&mut s, &obs(true, true, &["ca-a", "ca-b"])),
            Prepared::Skip("current_server_healthy")
        );
        // Both down: wait.
        assert_eq!(
            f.prepare(&mut step(), &obs(false, false, &["ca-a", "ca-b"])),
            Prepared::Wait("no_ready_target")
        );
        // The agent does not trust B's CA: wait (a restart would break it).
        assert_eq!(
            f.prepare(&mut step(), &obs(false, true, &["ca-a"])),
            Prepared::Wait("target_ca_not_in_agent_bundle")
        );
        // Ready: target recorded in the step.
        let mut s = step();
        assert_eq!(
            f.prepare(&mut s, &obs(false, true, &["ca-a", "ca-b"])),
            Prepared::Ready
        );
        assert_eq!(s.params["to"], "127.0.0.1:8082");
        assert_eq!(s.params["to_server"], "s-b");
        assert_eq!(s.params["from_server"], "s-a");
        // No config file known: skip.
        let none = failover(None);
        assert_eq!(
            none.prepare(&mut step(), &obs(false, true, &["ca-a", "ca-b"])),
            Prepared::Skip("no_agent_config_file")
        );
        // Unparsable config: skip, file untouched.
        std::fs::write(dir.path().join("agent.conf"), "agent { }\n").unwrap();
        assert_eq!(
            f.prepare(&mut step(), &obs(false, true, &["ca-a", "ca-b"])),
            Prepared::Skip("agent_config_unparsable")
        );
    }

    /// The agent's server answers on its admin socket but not on the address
    /// agents dial (a partition between this node and it): the agent is moved.
    #[test]
    fn failover_judges_servers_by_the_address_agents_dial() {
        let dir = tempfile::tempdir().unwrap();
        let f = failover(Some(conf_file(dir.path())));
        type Case = (
            (bool, Option<bool>),
            (bool, Option<bool>),
            Prepared,
            Option<&'static str>,
        );
        let cases: [Case; 7] = [
            // Admin ok, address unreachable: failover to B.
            (
                (true, Some(false)),
                (true, Some(true)),
                Prepared::Ready,
                Some("s-b"),
            ),
            // B's address not checked: its admin API is enough.
            (
                (true, Some(false)),
                (true, None),
                Prepared::Ready,
                Some("s-b"),
            ),
            // Admin ok, address ok (or not checked): nothing to do.
            (
                (true, Some(true)),
                (true, Some(true)),
                Prepared::Skip("current_server_healthy"),
                None,
            ),
            (
                (true, None),
                (true, Some(true)),
                Prepared::Skip("current_server_healthy"),
                None,
            ),
            // B's address unreachable too: B is no target.
            (
                (true, Some(false)),
                (true, Some(false)),
                Prepared::Wait("no_ready_target"),
                None,
            ),
            (
                (false, None),
                (true, Some(false)),
                Prepared::Wait("no_ready_target"),
                None,
            ),
            // B's address answers but its admin API does not: no target.
            (
                (true, Some(false)),
                (false, Some(true)),
                Prepared::Wait("no_ready_target"),
                None,
            ),
        ];
        for ((a_admin, a_addr), (b_admin, b_addr), want, to) in cases {
            let obs = Observations {
                servers: vec![
                    server_at("s-a", a_admin, a_addr),
                    server_at("s-b", b_admin, b_addr),
                ],
                agents: vec![agent(&["ca-a", "ca-b"])],
                ..Default::default()
            };
            let mut s = step();
            let got = f.prepare(&mut s, &obs);
            let case = format!(
                "A admin {a_admin} address {a_addr:?}, B admin {b_admin} address {b_addr:?}"
            );
            assert_eq!(got, want, "{case}");
            if let Some(to) = to {
                assert_eq!(s.params["to_server"], to, "{case}");
                assert_eq!(s.params["from_server"], "s-a", "{case}");
                assert_eq!(s.params["to"], "127.0.0.1:8082", "{case}");
            }
        }
    }

    #[tokio::test]
    async fn failover_rewrites_then_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let conf = conf_file(dir.path());
        let f = failover(Some(conf.clone()));
        let obs = Observations {
            servers: vec![server("s-a", false, &["ca"]), server("s-b", true, &["ca"])],
            agents: vec![agent(&["ca"])],
            ..Default::default()
        };
        let mut s = step();
        assert_eq!(f.prepare(&mut s, &obs), Prepared::Ready);
        let out = f.execute(&s).await.unwrap();
        assert_eq!(out.kind, crate::model::OutcomeKind::Ok);
        assert_eq!(out.detail["from"], "127.0.0.1:8081");
        assert_eq!(out.detail["to"], "127.0.0.1:8082");
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(text.contains("server_port = \"8082\""), "{text}");
        // Idempotent: a second run finds it already pointing at B.
        let again = f.execute(&s).await.unwrap();
        assert_eq!(again.detail["from"], "127.0.0.1:8082");
    }

    #[test]
    fn entry_bump_needs_an_svid_subject() {
        let b = EntryBump::new(
            EntryBumpConfig {
                call_timeout: Duration::from_secs(1),
            },
            Arc::new(Topology::default()),
        );
        let mut s = step();
        assert_eq!(
            b.prepare(&mut s, &Observations::default()),
            Prepared::Skip("not_an_svid")
        );
        s.params = json!({ "subject": "svid:a/spiffe://td/w" });
        assert_eq!(b.prepare(&mut s, &Observations::default()), Prepared::Ready);
        assert_eq!(s.params["spiffe_id"], "spiffe://td/w");
    }
}
