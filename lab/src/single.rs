//! [`SpireLab`]: one `spire-server` (sqlite3 datastore, disk KeyManager,
//! join-token attestation) and one `spire-agent` (disk KeyManager, unix
//! WorkloadAttestor), in a private temporary directory with free ports.
//!
//! The current agent pid always lives in `<dir>/agent.pid`; the agent can be
//! restarted by another program through [`SpireLab::restart_command`].

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use tempfile::TempDir;

use super::conf::{AgentAttestor, AgentConf, Datastore, RestartScript, ServerAttestor, ServerConf};
use super::process::{AgentPaths, AgentProc, ServerProc};
use super::{
    DEFAULT_TRUST_DOMAIN, LabError, WAIT_LIMIT, adopt_orphans, check_binaries, default_bin_dir,
    free_ports, http_get_status, make_dir, parse_json, write_file,
};

/// The node alias every agent of the lab is attested under: `spiffe://<td>/node/a`.
const NODE_ALIAS_PATH: &str = "/node/a";

/// Settings of a [`SpireLab`]. `Default` gives a trust domain `healer.test`,
/// 1 h SVIDs, a 24 h CA and a 1 s agent sync interval.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Trust domain of server and agent.
    pub trust_domain: String,
    /// The server's `default_x509_svid_ttl`.
    pub default_x509_svid_ttl: String,
    /// The server's `agent_ttl`.
    pub agent_ttl: String,
    /// The server's `ca_ttl`.
    pub ca_ttl: String,
    /// The agent's `experimental { sync_interval }`.
    pub sync_interval: String,
    /// Folder holding `spire-server` and `spire-agent`.
    pub bin_dir: PathBuf,
    /// The server's `admin_ids`: SPIFFE IDs allowed to call the admin APIs
    /// on its TCP port. Empty (the default) leaves the key out.
    pub admin_ids: Vec<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            default_x509_svid_ttl: "1h".into(),
            agent_ttl: "1h".into(),
            ca_ttl: "24h".into(),
            sync_interval: "1s".into(),
            bin_dir: default_bin_dir(),
            admin_ids: Vec::new(),
        }
    }
}

/// A running SPIRE server and agent. Dropping it kills both.
pub struct SpireLab {
    opts: LabOptions,
    /// Removed after `Drop::drop` has killed the processes.
    dir: TempDir,
    server_port: u16,
    server_health_port: u16,
    agent_health_port: u16,
    server: ServerProc,
    agent: AgentProc,
}

impl SpireLab {
    /// Starts a server, waits until it is healthy, attests an agent with a
    /// fresh join token and waits until the agent serves the Workload API.
    ///
    /// # Errors
    /// Missing binaries, file errors, or a process that does not become
    /// ready within [`WAIT_LIMIT`] (with its log tail).
    pub async fn start(opts: LabOptions) -> Result<SpireLab, LabError> {
        let (server_bin, agent_bin) = check_binaries(&opts.bin_dir)?;
        adopt_orphans();

        // Short path: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("sl")
            .tempdir_in("/tmp")
            .map_err(LabError::io("creating the lab directory"))?;
        let root = dir.path().to_path_buf();
        for sub in [
            "",
            "server",
            "server/data",
            "agent",
            "agent/data",
            "agent/keys",
            "public",
            "admin",
        ] {
            make_dir(&root.join(sub))?;
        }

        let ports = free_ports(3)?;
        let server = ServerProc::new(
            server_bin,
            root.clone(),
            root.join("server.conf"),
            root.join("server.log"),
            None,
            root.join("server/api.sock"),
        );
        let agent = AgentProc::new(AgentPaths {
            bin: agent_bin,
            cwd: root.clone(),
            conf: root.join("agent.conf"),
            log: root.join("agent.log"),
            pidfile: root.join("agent.pid"),
            token_file: root.join("agent-token"),
            restart_script: root.join("restart-agent.sh"),
            workload_socket: root.join("public/api.sock"),
            admin_socket: root.join("admin/admin.sock"),
        });
        let lab = SpireLab {
            opts,
            dir,
            server_port: ports[0],
            server_health_port: ports[1],
            agent_health_port: ports[2],
            server,
            agent,
        };
        lab.write_server_conf()?;
        lab.server.start(WAIT_LIMIT).await?;

        lab.new_join_token().await?;
        let bundle = lab.server_cli(&["bundle", "show"]).await?;
        write_file(&lab.bundle_path(), &bundle.stdout)?;
        lab.write_agent_conf()?;
        lab.write_restart_script()?;
        lab.start_agent().await?;
        // Attested: later starts reuse the stored SVID, no token needed.
        let _ = fs::remove_file(lab.token_path());
        Ok(lab)
    }

    // ----- paths and accessors -------------------------------------------

    /// The lab's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.opts.trust_domain
    }
    /// The options the lab was started with.
    pub fn options(&self) -> &LabOptions {
        &self.opts
    }
    /// `spiffe://<trust domain><path>`; `path` may omit its leading `/`.
    pub fn spiffe_id(&self, path: &str) -> String {
        super::spiffe_id(&self.opts.trust_domain, path)
    }
    /// The node alias all lab entries are parented to (`spiffe://<td>/node/a`).
    pub fn node_alias(&self) -> String {
        self.spiffe_id(NODE_ALIAS_PATH)
    }
    /// The agent's Workload API socket.
    pub fn workload_socket(&self) -> PathBuf {
        self.agent.workload_socket.clone()
    }
    /// The agent's admin socket (Debug API).
    pub fn agent_admin_socket(&self) -> PathBuf {
        self.agent.admin_socket.clone()
    }
    /// The server's admin socket.
    pub fn server_socket(&self) -> PathBuf {
        self.server.socket.clone()
    }
    /// The server's `bind_port`.
    pub fn server_port(&self) -> u16 {
        self.server_port
    }
    /// `spire-server`.
    pub fn server_bin(&self) -> &Path {
        &self.server.bin
    }
    /// `spire-agent`.
    pub fn agent_bin(&self) -> &Path {
        &self.agent.bin
    }
    /// `server.conf`.
    pub fn server_conf(&self) -> PathBuf {
        self.server.conf.clone()
    }
    /// `agent.conf`.
    pub fn agent_conf(&self) -> PathBuf {
        self.agent.conf.clone()
    }
    /// The server's log.
    pub fn server_log(&self) -> PathBuf {
        self.server.log.clone()
    }
    /// All agent runs append to this file; each run starts with a marker line.
    pub fn agent_log(&self) -> PathBuf {
        self.agent.log.clone()
    }
    /// Holds the current agent's pid.
    pub fn agent_pidfile(&self) -> PathBuf {
        self.agent.pidfile.clone()
    }
    /// The agent's `data_dir`.
    pub fn agent_data_dir(&self) -> PathBuf {
        self.dir().join("agent/data")
    }
    /// The bootstrap bundle (`trust_bundle_path`).
    pub fn bundle_path(&self) -> PathBuf {
        self.dir().join("bundle.pem")
    }
    fn token_path(&self) -> PathBuf {
        self.agent.token_file.clone()
    }
    /// The agent's health port.
    pub fn agent_health_port(&self) -> u16 {
        self.agent_health_port
    }
    /// The agent's readiness endpoint (`/ready`; `/live` is on the same port).
    pub fn agent_health_url(&self) -> String {
        format!("http://127.0.0.1:{}/ready", self.agent_health_port)
    }
    /// The agent's liveness endpoint.
    pub fn agent_live_url(&self) -> String {
        format!("http://127.0.0.1:{}/live", self.agent_health_port)
    }
    /// The server's readiness endpoint.
    pub fn server_health_url(&self) -> String {
        format!("http://127.0.0.1:{}/ready", self.server_health_port)
    }

    /// The pid in the pidfile, if that process is a live spire-agent of this
    /// lab (a zombie or a recycled pid does not count).
    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.pid()
    }

    /// An argv that restarts the agent when run by any program: it SIGKILLs
    /// the agent in the pidfile (stopped or not), starts a new detached
    /// `spire-agent run` with the same config and data dir (output appended to
    /// the agent log), writes its pid to the pidfile and exits 0 at once,
    /// without waiting for the agent to become ready.
    pub fn restart_command(&self) -> Vec<String> {
        self.agent.restart_command()
    }

    // ----- agent control ------------------------------------------------

    /// SIGKILLs the current agent and waits until it is gone (reaped when it
    /// is our child).
    ///
    /// # Errors
    /// The agent survives SIGKILL for 10 s.
    pub async fn kill_agent(&self) -> Result<(), LabError> {
        self.agent.kill().await
    }

    /// SIGSTOPs the current agent.
    ///
    /// # Errors
    /// No agent runs.
    pub fn freeze_agent(&self) -> Result<(), LabError> {
        self.agent.freeze()
    }

    /// SIGCONTs the current agent.
    ///
    /// # Errors
    /// No agent runs.
    pub fn thaw_agent(&self) -> Result<(), LabError> {
        self.agent.thaw()
    }

    /// Kills the current agent if any, starts a new one with the same config
    /// and data dir, and waits until it serves the Workload API. With a stored,
    /// unexpired SVID the agent does not attest again; a join token is passed
    /// only when one is pending (first start, or after [`Self::new_join_token`]).
    ///
    /// # Errors
    /// The agent does not become ready within [`WAIT_LIMIT`].
    pub async fn start_agent(&self) -> Result<(), LabError> {
        self.spawn_agent().await?;
        self.wait_agent_ready().await
    }

    /// Like [`Self::start_agent`] but does not wait for readiness.
    ///
    /// # Errors
    /// The agent cannot be spawned.
    pub async fn spawn_agent(&self) -> Result<i32, LabError> {
        self.agent.spawn().await
    }

    /// Waits (bounded) until the current agent is healthy (its Workload API
    /// answers `spire-agent healthcheck`). Fails early if the agent process
    /// has died.
    ///
    /// # Errors
    /// Not ready within [`WAIT_LIMIT`], or no agent runs for 3 s.
    pub async fn wait_agent_ready(&self) -> Result<(), LabError> {
        self.agent.wait_ready(WAIT_LIMIT).await
    }

    /// `spire-agent healthcheck` against the Workload API socket, bounded.
    pub async fn agent_healthcheck(&self) -> bool {
        self.agent.healthcheck().await
    }

    /// GETs the agent's `/ready` endpoint; true on HTTP 200.
    pub async fn agent_health_ok(&self) -> bool {
        matches!(
            http_get_status(self.agent_health_port, "/ready").await,
            Ok(200)
        )
    }

    /// Runs `spire-agent api fetch x509 -output json` as this process's uid.
    ///
    /// # Errors
    /// The command cannot run or exceeds `fetch_timeout` + 5 s.
    pub async fn fetch_x509(&self, fetch_timeout: Duration) -> Result<Output, LabError> {
        self.agent.fetch_x509(fetch_timeout).await
    }

    /// The SPIFFE IDs of the X.509-SVIDs the Workload API gives this
    /// process's uid; an error when the fetch fails.
    ///
    /// # Errors
    /// The fetch fails or its output is not JSON.
    pub async fn fetch_x509_ids(&self, fetch_timeout: Duration) -> Result<Vec<String>, LabError> {
        self.agent.fetch_x509_ids(fetch_timeout).await
    }

    /// Issues a new join token for the node alias and keeps it for the next
    /// agent start (needed after the agent lost its SVID, e.g. eviction).
    ///
    /// # Errors
    /// The CLI fails.
    pub async fn new_join_token(&self) -> Result<String, LabError> {
        let token = generate_token(&self.server, &self.node_alias()).await?;
        write_file(&self.token_path(), token.as_bytes())?;
        Ok(token)
    }

    // ----- entries --------------------------------------------------------

    /// Creates an entry `spiffe://<td><spiffe_id_path>` for `unix:uid:<uid>`,
    /// parented to the node alias, and returns its id.
    ///
    /// # Errors
    /// The CLI fails or reports a failed creation.
    pub async fn register_entry(
        &self,
        spiffe_id_path: &str,
        uid: u32,
        x509_svid_ttl_secs: u32,
    ) -> Result<String, LabError> {
        create_entry(
            &self.server,
            &self.node_alias(),
            &self.spiffe_id(spiffe_id_path),
            uid,
            x509_svid_ttl_secs,
        )
        .await
    }

    /// Waits (bounded) until the current agent run has cached an SVID for
    /// the entry: its log (from the last start on) has `Creating X509-SVID`
    /// (or `Renewing X509-SVID`) with that `spiffe_id`. The agent does this
    /// for every entry parented to it, whatever the uid. New entries take up
    /// to ~5 s (server cache reload).
    ///
    /// # Errors
    /// Not synced within [`WAIT_LIMIT`].
    pub async fn wait_for_entry_synced(&self, spiffe_id_path: &str) -> Result<(), LabError> {
        self.agent
            .wait_for_svid_logged(&self.spiffe_id(spiffe_id_path), WAIT_LIMIT)
            .await
    }

    /// Runs `spire-server <args> -socketPath <server socket>`, bounded; fails
    /// on a non-zero exit.
    ///
    /// # Errors
    /// The CLI fails or exceeds its deadline.
    pub async fn server_cli(&self, args: &[&str]) -> Result<Output, LabError> {
        self.server.cli(args).await
    }

    // ----- internals ------------------------------------------------------

    fn write_server_conf(&self) -> Result<(), LabError> {
        let d = self.dir();
        let o = &self.opts;
        let conf = ServerConf {
            bind_port: self.server_port,
            socket: &self.server.socket,
            data_dir: &d.join("server/data"),
            keys_path: &d.join("server/data/keys.json"),
            trust_domain: &o.trust_domain,
            ca_ttl: &o.ca_ttl,
            default_x509_svid_ttl: &o.default_x509_svid_ttl,
            agent_ttl: &o.agent_ttl,
            datastore: Datastore::Sqlite(d.join("server/data/datastore.sqlite3")),
            health_port: self.server_health_port,
            telemetry_port: None,
            node_attestor: ServerAttestor::JoinToken,
        }
        .render_with_admin_ids(&o.admin_ids);
        write_file(&self.server.conf, conf.as_bytes())
    }

    fn write_agent_conf(&self) -> Result<(), LabError> {
        let d = self.dir();
        let o = &self.opts;
        let conf = AgentConf {
            data_dir: &d.join("agent/data"),
            server_port: self.server_port,
            socket: &self.agent.workload_socket,
            admin_socket: &self.agent.admin_socket,
            trust_bundle: &self.bundle_path(),
            trust_domain: &o.trust_domain,
            sync_interval: &o.sync_interval,
            keys_dir: &d.join("agent/keys"),
            health_port: self.agent_health_port,
            telemetry_port: None,
            node_attestor: AgentAttestor::JoinToken,
        }
        .render();
        write_file(&self.agent.conf, conf.as_bytes())
    }

    fn write_restart_script(&self) -> Result<(), LabError> {
        write_restart_script(&self.agent)
    }
}

impl Drop for SpireLab {
    fn drop(&mut self) {
        self.agent.kill_blocking();
        self.server.kill_blocking();
    }
}

// ----- helpers shared with the HA lab -------------------------------------

pub(crate) fn write_restart_script(agent: &AgentProc) -> Result<(), LabError> {
    let script = RestartScript {
        cwd: &agent.cwd,
        agent_bin: &agent.bin,
        conf: &agent.conf,
        pidfile: &agent.pidfile,
        log: &agent.log,
        token_file: &agent.token_file,
    }
    .render();
    write_file(&agent.restart_script, script.as_bytes())?;
    fs::set_permissions(&agent.restart_script, fs::Permissions::from_mode(0o755)).map_err(
        LabError::io(format!("chmod {}", agent.restart_script.display())),
    )
}

/// `token generate -spiffeID <alias> -ttl 600`; returns the token.
pub(crate) async fn generate_token(server: &ServerProc, alias: &str) -> Result<String, LabError> {
    let out = server
        .cli(&[
            "token",
            "generate",
            "-spiffeID",
            alias,
            "-ttl",
            "600",
            "-output",
            "json",
        ])
        .await?;
    let command = "spire-server token generate";
    let v = parse_json(command, &out)?;
    v["value"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| LabError::Output {
            command: command.into(),
            reason: "no .value".into(),
            output: v.to_string(),
        })
}

/// `entry create` for `unix:uid:<uid>`; returns the entry id.
pub(crate) async fn create_entry(
    server: &ServerProc,
    parent: &str,
    id: &str,
    uid: u32,
    x509_svid_ttl_secs: u32,
) -> Result<String, LabError> {
    let out = server
        .cli(&[
            "entry",
            "create",
            "-parentID",
            parent,
            "-spiffeID",
            id,
            "-selector",
            &format!("unix:uid:{uid}"),
            "-x509SVIDTTL",
            &x509_svid_ttl_secs.to_string(),
            "-output",
            "json",
        ])
        .await?;
    let command = "spire-server entry create";
    let v = parse_json(command, &out)?;
    let result = &v["results"][0];
    // The CLI exits 0 on failure with -output json: check the status.
    let code = result["status"]["code"].as_i64().unwrap_or(0);
    if code != 0 {
        return Err(LabError::Command {
            command: command.into(),
            status: format!("code {code}"),
            output: result["status"].to_string(),
        });
    }
    result["entry"]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| LabError::Output {
            command: command.into(),
            reason: "no entry id".into(),
            output: v.to_string(),
        })
}
