//! [`HaLab`]: several `spire-server`s sharing one PostgreSQL database (an HA
//! "pair"), and several `spire-agent`s, each attested with its own join
//! token under the node alias `spiffe://<td>/node/<j>` and pointed at one
//! server.
//!
//! With [`NodeAttestation::K8sPsat`] ([`HaOptions::node_attestation`]) the
//! servers run the `k8s_psat` node attestor against a lab control plane
//! instead of `join_token`, and agent `j` attests with the token bound to
//! its own kwok pod ([`super::psat`]); its node alias is then an entry
//! matching its cluster and node UID, so entries parented to
//! `spiffe://<td>/node/<j>` work the same.
//!
//! Layout of the lab directory:
//!
//! ```text
//! bundle.pem                 bootstrap bundle (every server's CA)
//! server-a/                  server.conf server.log server.pid api.sock data/
//! agent-0/                   agent.conf agent.log agent.pid restart.sh
//!                            join_token (pending only) data/ keys/
//!                            public/api.sock admin/admin.sock
//! ```
//!
//! # Panics
//! Every method that takes a server index `i` or an agent index `j` panics
//! when it is out of range, like slice indexing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::{Instant, sleep};

use super::conf::{AgentAttestor, ServerAttestor};
use super::conf::{AgentConf, Datastore, ServerConf};
use super::database::LabDatabase;
use super::manifest::{AgentManifest, DatabaseManifest, LabManifest, ServerManifest};
use super::process::{AgentPaths, AgentProc, ServerProc};
use super::psat::{K8sPsat, NodeAttestation};
use super::single::{create_entry, generate_token, write_restart_script};
use super::{
    DEFAULT_TRUST_DOMAIN, LabError, POLL, WAIT_LIMIT, adopt_orphans, check_binaries,
    default_bin_dir, free_ports, make_dir, parse_json, pids_with_arg, run_bounded, write_file,
};

/// Longest Unix socket path we create (the kernel limit is 108 bytes).
const MAX_SOCKET_PATH: usize = 100;

/// Settings of an [`HaLab`]. `Default` gives 2 servers, 2 agents, trust
/// domain `healer.test`, a 24 h CA, 1 h SVIDs and a 1 s agent sync
/// interval; `postgres_url` must be set.
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// Number of servers (1 to 26: `server-a` …).
    pub servers: usize,
    /// Number of agents (`agent-0` …).
    pub agents: usize,
    /// A PostgreSQL URL whose role may `CREATE DATABASE`
    /// (`postgres://user:password@host:port/db`); the lab creates its own
    /// database through it and drops it at the end.
    pub postgres_url: String,
    /// Trust domain of every server and agent.
    pub trust_domain: String,
    /// The servers' `ca_ttl`.
    pub ca_ttl: String,
    /// The servers' `default_x509_svid_ttl`.
    pub default_x509_svid_ttl: String,
    /// The servers' `agent_ttl`.
    pub agent_ttl: String,
    /// The agents' `experimental { sync_interval }`.
    pub sync_interval: String,
    /// Folder holding `spire-server` and `spire-agent`.
    pub bin_dir: PathBuf,
    /// Server index each agent starts with; empty: agent `j` uses server
    /// `j % servers`.
    pub agent_server: Vec<usize>,
    /// Where to put the lab; `None`: a temporary directory, removed on drop.
    /// A given directory is kept, but its `server-*`, `agent-*` and
    /// `bundle.pem` are replaced.
    pub dir: Option<PathBuf>,
    /// How agents attest: join tokens (the default) or `k8s_psat`, with one
    /// provisioned node per agent.
    pub node_attestation: NodeAttestation,
}

impl Default for HaOptions {
    fn default() -> Self {
        Self {
            servers: 2,
            agents: 2,
            postgres_url: String::new(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            ca_ttl: "24h".into(),
            default_x509_svid_ttl: "1h".into(),
            agent_ttl: "1h".into(),
            sync_interval: "1s".into(),
            bin_dir: default_bin_dir(),
            agent_server: Vec::new(),
            dir: None,
            node_attestation: NodeAttestation::JoinToken,
        }
    }
}

impl HaOptions {
    fn check(&self) -> Result<(), LabError> {
        let bad = |m: String| Err(LabError::Options(m));
        if self.servers == 0 || self.servers > 26 {
            return bad(format!("servers must be 1 to 26, not {}", self.servers));
        }
        if self.postgres_url.trim().is_empty() {
            return bad("postgres_url is empty (a PostgreSQL URL with CREATEDB is needed)".into());
        }
        if !self.agent_server.is_empty() && self.agent_server.len() != self.agents {
            return bad(format!(
                "agent_server has {} entries for {} agents",
                self.agent_server.len(),
                self.agents
            ));
        }
        if let Some(i) = self.agent_server.iter().find(|&&i| i >= self.servers) {
            return bad(format!(
                "agent_server names server {i}, but there are {} servers",
                self.servers
            ));
        }
        if let Some(p) = self.psat()
            && p.nodes.len() != self.agents
        {
            return bad(format!(
                "k8s_psat attestation has {} nodes for {} agents (one node per agent)",
                p.nodes.len(),
                self.agents
            ));
        }
        Ok(())
    }

    fn psat(&self) -> Option<&K8sPsat> {
        match &self.node_attestation {
            NodeAttestation::K8sPsat(p) => Some(p),
            NodeAttestation::JoinToken => None,
        }
    }

    fn server_of(&self, j: usize) -> usize {
        self.agent_server
            .get(j)
            .copied()
            .unwrap_or(j % self.servers.max(1))
    }
}

/// One agent as `spire-server agent list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedAgent {
    /// `spiffe://<td>/spire/agent/join_token/<token>` (or
    /// `…/k8s_psat/<cluster>/<node UID>`).
    pub spiffe_id: String,
    /// Banned agents stay listed until evicted.
    pub banned: bool,
    /// Whether the agent may attest again by itself.
    pub can_re_attest: bool,
}

// === impl HaServer ===

/// One server of an [`HaLab`].
pub struct HaServer {
    name: String,
    dir: PathBuf,
    bind_port: u16,
    health_port: u16,
    metrics_port: u16,
    proc_: ServerProc,
}

impl HaServer {
    /// `server-a`, `server-b`, …
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Its admin socket (`-socketPath` of the server CLI).
    pub fn socket(&self) -> &Path {
        &self.proc_.socket
    }
    /// `bind_port` (agents' `server_port`).
    pub fn bind_port(&self) -> u16 {
        self.bind_port
    }
    /// `127.0.0.1:<bind_port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.bind_port)
    }
    /// Readiness endpoint (`/ready`).
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/ready", self.health_port)
    }
    /// Liveness endpoint (`/live`).
    pub fn live_url(&self) -> String {
        format!("http://127.0.0.1:{}/live", self.health_port)
    }
    /// The health listener's port.
    pub fn health_port(&self) -> u16 {
        self.health_port
    }
    /// Prometheus endpoint.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }
    /// The Prometheus listener's port.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }
    /// `server.conf`.
    pub fn conf(&self) -> &Path {
        &self.proc_.conf
    }
    /// Its log (every run appends, after a marker line).
    pub fn log(&self) -> &Path {
        &self.proc_.log
    }
    /// Holds the pid of the current run.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("server.pid")
    }
    /// The running server's pid.
    pub fn pid(&self) -> Option<i32> {
        self.proc_.pid()
    }
    /// Whether it is SIGSTOPped by [`HaLab::freeze_server`].
    pub fn frozen(&self) -> bool {
        self.proc_.frozen()
    }
}

// === impl HaAgent ===

/// One agent of an [`HaLab`].
pub struct HaAgent {
    name: String,
    dir: PathBuf,
    health_port: u16,
    metrics_port: u16,
    node_alias: String,
    trust_domain: String,
    /// Index of the server named in `agent.conf`.
    server: AtomicUsize,
    /// The join token the agent attested with.
    token: Mutex<String>,
    /// A token issued by [`HaLab::new_join_token_for`], not yet consumed.
    pending_token: Mutex<Option<String>>,
    /// The agent's SPIFFE ID under `k8s_psat` (fixed by its node).
    psat_id: Option<String>,
    proc_: AgentProc,
}

impl HaAgent {
    /// `agent-0`, `agent-1`, …
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Its `data_dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// Workload API socket.
    pub fn workload_socket(&self) -> &Path {
        &self.proc_.workload_socket
    }
    /// Admin socket (Debug API), outside the public socket's directory.
    pub fn admin_socket(&self) -> &Path {
        &self.proc_.admin_socket
    }
    /// Readiness endpoint (`/ready`).
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/ready", self.health_port)
    }
    /// Liveness endpoint (`/live`).
    pub fn live_url(&self) -> String {
        format!("http://127.0.0.1:{}/live", self.health_port)
    }
    /// The health listener's port.
    pub fn health_port(&self) -> u16 {
        self.health_port
    }
    /// Prometheus endpoint.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }
    /// The Prometheus listener's port.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }
    /// `agent.conf`; the restart script reads it at every start.
    pub fn conf(&self) -> &Path {
        &self.proc_.conf
    }
    /// Its log (every run appends, after a marker line).
    pub fn log(&self) -> &Path {
        &self.proc_.log
    }
    /// Holds the current agent's pid.
    pub fn pidfile(&self) -> &Path {
        &self.proc_.pidfile
    }
    /// A pending join token, consumed (and deleted) by the next start.
    pub fn join_token_file(&self) -> &Path {
        &self.proc_.token_file
    }
    /// An argv that restarts the agent when run by any program: it SIGKILLs
    /// the agent in the pidfile (stopped or not), starts a new detached
    /// `spire-agent run -config <agent.conf>` (passing and deleting a pending
    /// join token), records its pid and exits 0 at once.
    pub fn restart_command(&self) -> Vec<String> {
        self.proc_.restart_command()
    }
    /// The pid in the pidfile, if that process is a live agent with this
    /// agent's config (a zombie or a recycled pid does not count).
    pub fn pid(&self) -> Option<i32> {
        self.proc_.pid()
    }
    /// The node alias entries for this agent are parented to:
    /// `spiffe://<td>/node/<j>`.
    pub fn node_alias(&self) -> &str {
        &self.node_alias
    }
    /// The agent's own SPIFFE ID, `spiffe://<td>/spire/agent/join_token/<token>`,
    /// for the token it attested with. A token from
    /// [`HaLab::new_join_token_for`] counts once a start has consumed it.
    /// Under `k8s_psat`:
    /// `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node UID>`.
    pub fn spiffe_id(&self) -> String {
        if let Some(id) = &self.psat_id {
            return id.clone();
        }
        let token = self.promote_token();
        format!(
            "spiffe://{}/spire/agent/join_token/{token}",
            self.trust_domain
        )
    }
    /// Index of the server its `agent.conf` points at.
    pub fn server(&self) -> usize {
        self.server.load(Ordering::SeqCst)
    }
    /// The log of the current run (from the last start marker on).
    pub fn current_log(&self) -> String {
        self.proc_.current_log()
    }
    /// How many X.509 authorities the agent has persisted in its data dir
    /// (`agent-data.json`); the bundle it trusts after a restart. `None`
    /// when the file is missing or unreadable.
    pub fn stored_bundle_cas(&self) -> Option<usize> {
        let bytes = fs::read(self.data_dir().join("agent-data.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        v["bundle"].as_array().map(Vec::len)
    }

    fn promote_token(&self) -> String {
        let mut pending = self
            .pending_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut token = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.is_some()
            && !self.proc_.token_file.exists()
            && let Some(p) = pending.take()
        {
            *token = p;
        }
        token.clone()
    }
}

// === impl HaLab ===

/// A running HA lab. Dropping it kills every process (including agents
/// restarted by their scripts) and drops its database; [`HaLab::stop`] does
/// the same asynchronously and reports errors.
pub struct HaLab {
    opts: HaOptions,
    root: PathBuf,
    servers: Vec<HaServer>,
    agents: Vec<HaAgent>,
    db: LabDatabase,
    stopped: AtomicBool,
    /// Removed after `Drop::drop` has killed the processes.
    _temp: Option<TempDir>,
}

impl HaLab {
    /// Creates the database, starts the servers one after the other (each
    /// ready before the next: schema creation takes no lock), attests every
    /// agent with its own join token and waits until each serves the
    /// Workload API.
    ///
    /// # Errors
    /// Bad options, missing binaries, PostgreSQL errors, or a process that
    /// does not become ready within [`WAIT_LIMIT`] (with its log tail).
    /// Whatever was started is stopped again.
    pub async fn start(opts: HaOptions) -> Result<HaLab, LabError> {
        opts.check()?;
        let (server_bin, agent_bin) = check_binaries(&opts.bin_dir)?;
        adopt_orphans();

        let (root, temp) = match &opts.dir {
            Some(dir) => {
                make_dir(dir)?;
                let root = fs::canonicalize(dir)
                    .map_err(LabError::io(format!("resolving {}", dir.display())))?;
                clear_lab_files(&root)?;
                (root, None)
            }
            None => {
                // Short path: Unix socket paths are limited to 108 bytes.
                let t = tempfile::Builder::new()
                    .prefix("ha")
                    .tempdir_in("/tmp")
                    .map_err(LabError::io("creating the lab directory"))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        make_dir(&root)?;
        let longest = root
            .join(format!("agent-{}/public/api.sock", opts.agents.max(1) - 1))
            .as_os_str()
            .len();
        if longest > MAX_SOCKET_PATH {
            return Err(LabError::Options(format!(
                "{} is too long a path for Unix sockets below it; use a shorter directory",
                root.display()
            )));
        }

        let db = LabDatabase::create(&opts.postgres_url).await?;
        let mut ports = free_ports(3 * opts.servers + 2 * opts.agents)?.into_iter();
        let mut next_port = || ports.next().unwrap_or_default();

        let mut servers = Vec::with_capacity(opts.servers);
        for i in 0..opts.servers {
            let name = server_name(i);
            let dir = root.join(&name);
            make_dir(&dir.join("data"))?;
            servers.push(HaServer {
                bind_port: next_port(),
                health_port: next_port(),
                metrics_port: next_port(),
                proc_: ServerProc::new(
                    server_bin.clone(),
                    dir.clone(),
                    dir.join("server.conf"),
                    dir.join("server.log"),
                    Some(dir.join("server.pid")),
                    dir.join("api.sock"),
                ),
                name,
                dir,
            });
        }
        let mut agents = Vec::with_capacity(opts.agents);
        for j in 0..opts.agents {
            let name = format!("agent-{j}");
            let dir = root.join(&name);
            for sub in ["data", "keys", "public", "admin"] {
                make_dir(&dir.join(sub))?;
            }
            agents.push(HaAgent {
                health_port: next_port(),
                metrics_port: next_port(),
                node_alias: super::spiffe_id(&opts.trust_domain, &format!("/node/{j}")),
                trust_domain: opts.trust_domain.clone(),
                server: AtomicUsize::new(opts.server_of(j)),
                token: Mutex::new(String::new()),
                pending_token: Mutex::new(None),
                psat_id: opts.psat().map(|p| p.agent_id(&opts.trust_domain, j)),
                proc_: AgentProc::new(AgentPaths {
                    bin: agent_bin.clone(),
                    cwd: dir.clone(),
                    conf: dir.join("agent.conf"),
                    log: dir.join("agent.log"),
                    pidfile: dir.join("agent.pid"),
                    token_file: dir.join("join_token"),
                    restart_script: dir.join("restart.sh"),
                    workload_socket: dir.join("public/api.sock"),
                    admin_socket: dir.join("admin/admin.sock"),
                }),
                name,
                dir,
            });
        }

        // From here on, dropping `lab` (on error or cancellation) cleans up.
        let lab = HaLab {
            opts,
            root,
            servers,
            agents,
            db,
            stopped: AtomicBool::new(false),
            _temp: temp,
        };
        lab.boot().await?;
        Ok(lab)
    }

    async fn boot(&self) -> Result<(), LabError> {
        for i in 0..self.servers.len() {
            self.write_server_conf(i)?;
            self.servers[i].proc_.start(WAIT_LIMIT).await?;
        }
        self.write_bundle().await?;
        for j in 0..self.agents.len() {
            let a = &self.agents[j];
            if let Some(p) = self.opts.psat() {
                create_node_alias(self.cli_server()?, &a.node_alias, &p.alias_selectors(j)).await?;
            } else {
                let token = generate_token(self.cli_server()?, &a.node_alias).await?;
                write_file(&a.proc_.token_file, token.as_bytes())?;
                *a.token.lock().unwrap_or_else(PoisonError::into_inner) = token;
            }
            self.write_agent_conf(j)?;
            write_restart_script(&a.proc_)?;
        }
        for a in &self.agents {
            a.proc_.spawn().await?;
        }
        for a in &self.agents {
            a.proc_.wait_ready(WAIT_LIMIT).await?;
        }
        self.wait_bundles_persisted().await
    }

    /// Kills every process and drops the database. Idempotent.
    ///
    /// # Errors
    /// A process survives SIGKILL, or the database cannot be dropped; the
    /// remaining steps are still taken.
    pub async fn stop(&self) -> Result<(), LabError> {
        let mut first_error = None;
        for a in &self.agents {
            if let Err(e) = a.proc_.kill().await {
                first_error.get_or_insert(e);
            }
        }
        for s in &self.servers {
            let _ = s.proc_.thaw();
            if let Err(e) = s.proc_.kill().await {
                first_error.get_or_insert(e);
            }
        }
        // Stragglers (e.g. agents started by a script after our kill).
        for a in &self.agents {
            a.proc_.kill_blocking();
        }
        if let Err(e) = self.db.drop_now().await {
            first_error.get_or_insert(e);
        }
        self.stopped.store(true, Ordering::SeqCst);
        first_error.map_or(Ok(()), Err)
    }

    // ----- accessors ---------------------------------------------------------

    /// The lab directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }
    /// The options it was started with.
    pub fn options(&self) -> &HaOptions {
        &self.opts
    }
    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.opts.trust_domain
    }
    /// `spiffe://<trust domain><path>`; `path` may omit its leading `/`.
    pub fn spiffe_id(&self, path: &str) -> String {
        super::spiffe_id(&self.opts.trust_domain, path)
    }
    /// The bootstrap bundle given to the agents.
    pub fn bundle_path(&self) -> PathBuf {
        self.root.join("bundle.pem")
    }
    /// The `k8s_psat` settings the agents attest with; `None` for join
    /// tokens.
    pub fn psat(&self) -> Option<&K8sPsat> {
        self.opts.psat()
    }
    /// The lab's PostgreSQL database.
    pub fn database_name(&self) -> &str {
        &self.db.name
    }
    /// The servers' `connection_string`.
    pub fn spire_connection_string(&self) -> &str {
        &self.db.spire_url
    }
    /// All servers, `server-a` first.
    pub fn servers(&self) -> &[HaServer] {
        &self.servers
    }
    /// All agents, `agent-0` first.
    pub fn agents(&self) -> &[HaAgent] {
        &self.agents
    }
    /// Server `i`.
    pub fn server(&self, i: usize) -> &HaServer {
        &self.servers[i]
    }
    /// Agent `j`.
    pub fn agent(&self, j: usize) -> &HaAgent {
        &self.agents[j]
    }

    // ----- servers -----------------------------------------------------------

    /// SIGKILLs server `i` and waits until it is reaped.
    ///
    /// # Errors
    /// It survives SIGKILL for 10 s.
    pub async fn kill_server(&self, i: usize) -> Result<(), LabError> {
        self.servers[i].proc_.kill().await
    }

    /// (Re)starts server `i` with its data dir and keys, so it resumes its CA
    /// through the journal in the shared database, and waits until it is
    /// ready.
    ///
    /// # Errors
    /// Not ready within [`WAIT_LIMIT`].
    pub async fn start_server(&self, i: usize) -> Result<(), LabError> {
        self.servers[i].proc_.start(WAIT_LIMIT).await
    }

    /// SIGSTOPs server `i`.
    ///
    /// # Errors
    /// It is not running.
    pub fn freeze_server(&self, i: usize) -> Result<(), LabError> {
        self.servers[i].proc_.freeze()
    }

    /// SIGCONTs server `i`.
    ///
    /// # Errors
    /// It is not running.
    pub fn thaw_server(&self, i: usize) -> Result<(), LabError> {
        self.servers[i].proc_.thaw()
    }

    /// `spire-server healthcheck` against server `i`, bounded (3 s).
    pub async fn server_healthcheck(&self, i: usize) -> bool {
        self.servers[i].proc_.healthcheck().await
    }

    /// Runs `spire-server <args> -socketPath <server i's socket>`, bounded
    /// by [`CLI_TIMEOUT`](super::CLI_TIMEOUT); fails on a non-zero exit.
    ///
    /// # Errors
    /// The CLI fails or exceeds its deadline.
    pub async fn server_cli(&self, i: usize, args: &[&str]) -> Result<Output, LabError> {
        self.servers[i].proc_.cli(args).await
    }

    /// `agent list` on server `i`.
    ///
    /// # Errors
    /// The CLI fails or its output is not the expected JSON.
    pub async fn list_agents(&self, i: usize) -> Result<Vec<ListedAgent>, LabError> {
        let out = self
            .server_cli(i, &["agent", "list", "-output", "json"])
            .await?;
        let v = parse_json("spire-server agent list", &out)?;
        Ok(v["agents"]
            .as_array()
            .map(|agents| {
                agents
                    .iter()
                    .map(|a| ListedAgent {
                        spiffe_id: format!(
                            "spiffe://{}{}",
                            a["id"]["trust_domain"].as_str().unwrap_or_default(),
                            a["id"]["path"].as_str().unwrap_or_default()
                        ),
                        banned: a["banned"].as_bool().unwrap_or(false),
                        can_re_attest: a["can_reattest"].as_bool().unwrap_or(false),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The X.509 authorities (base64 DER) of the trust bundle, as server `i`
    /// serves it (`bundle show -output json`).
    ///
    /// # Errors
    /// The CLI fails or its output is not the expected JSON.
    pub async fn x509_authorities(&self, i: usize) -> Result<Vec<String>, LabError> {
        let out = self
            .server_cli(i, &["bundle", "show", "-output", "json"])
            .await?;
        let v = parse_json("spire-server bundle show", &out)?;
        Ok(v["x509_authorities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["asn1"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    // ----- agents ------------------------------------------------------------

    /// SIGKILLs agent `j` (whichever process is current) and waits until it
    /// is gone.
    ///
    /// # Errors
    /// It survives SIGKILL for 10 s.
    pub async fn kill_agent(&self, j: usize) -> Result<(), LabError> {
        self.agents[j].proc_.kill().await
    }

    /// SIGSTOPs agent `j`.
    ///
    /// # Errors
    /// It is not running.
    pub fn freeze_agent(&self, j: usize) -> Result<(), LabError> {
        self.agents[j].proc_.freeze()
    }

    /// SIGCONTs agent `j`.
    ///
    /// # Errors
    /// It is not running.
    pub fn thaw_agent(&self, j: usize) -> Result<(), LabError> {
        self.agents[j].proc_.thaw()
    }

    /// Kills agent `j` if it runs, starts it again from its `agent.conf`
    /// (passing and deleting a pending join token) and waits until it serves
    /// the Workload API.
    ///
    /// # Errors
    /// Not ready within [`WAIT_LIMIT`], or it exits.
    pub async fn start_agent(&self, j: usize) -> Result<(), LabError> {
        self.agents[j].proc_.spawn().await?;
        self.agents[j].proc_.wait_ready(WAIT_LIMIT).await
    }

    /// Runs agent `j`'s restart command (as an external program would),
    /// bounded; does not wait for readiness.
    ///
    /// # Errors
    /// The script fails or takes more than 10 s.
    pub async fn run_restart_command(&self, j: usize) -> Result<Output, LabError> {
        let argv = self.agents[j].restart_command();
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| LabError::State("empty restart command".into()))?;
        let out = run_bounded(Path::new(prog), args, Duration::from_secs(10)).await?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: argv.join(" "),
                status: out.status.to_string(),
                output: super::output_text(&out),
            });
        }
        Ok(out)
    }

    /// Waits (bounded) until agent `j` answers `spire-agent healthcheck`.
    ///
    /// # Errors
    /// Not ready within [`WAIT_LIMIT`], or no agent runs for 3 s.
    pub async fn wait_agent_ready(&self, j: usize) -> Result<(), LabError> {
        self.agents[j].proc_.wait_ready(WAIT_LIMIT).await
    }

    /// Waits (bounded by `limit`) until no process runs agent `j`.
    ///
    /// # Errors
    /// It still runs after `limit`.
    pub async fn wait_agent_exited(&self, j: usize, limit: Duration) -> Result<(), LabError> {
        self.agents[j].proc_.wait_exited(limit).await
    }

    /// `spire-agent healthcheck` against agent `j`'s Workload API, bounded.
    pub async fn agent_healthcheck(&self, j: usize) -> bool {
        self.agents[j].proc_.healthcheck().await
    }

    /// Points agent `j`'s `agent.conf` at server `i` (`server_port`). Takes
    /// effect at the agent's next start (e.g. its restart command).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn set_agent_server(&self, j: usize, i: usize) -> Result<(), LabError> {
        let _ = &self.servers[i];
        self.agents[j].server.store(i, Ordering::SeqCst);
        self.write_agent_conf(j)
    }

    /// `spire-agent api fetch x509 -output json` on agent `j`, as this
    /// process's uid.
    ///
    /// # Errors
    /// The command cannot run or exceeds `fetch_timeout` + 5 s.
    pub async fn fetch_x509(&self, j: usize, fetch_timeout: Duration) -> Result<Output, LabError> {
        self.agents[j].proc_.fetch_x509(fetch_timeout).await
    }

    /// The SPIFFE IDs agent `j`'s Workload API gives this process's uid.
    ///
    /// # Errors
    /// The fetch fails or its output is not JSON.
    pub async fn fetch_x509_ids(
        &self,
        j: usize,
        fetch_timeout: Duration,
    ) -> Result<Vec<String>, LabError> {
        self.agents[j].proc_.fetch_x509_ids(fetch_timeout).await
    }

    /// `spire-agent debug getinfo -output json` on agent `j`'s admin socket
    /// (`uptime`, `last_sync_success`, `cached_x509_svids_count`,
    /// `svid_chain`, …).
    ///
    /// # Errors
    /// The agent does not answer within 5 s, or the output is not JSON.
    pub async fn agent_debug_info(&self, j: usize) -> Result<serde_json::Value, LabError> {
        self.agents[j].proc_.debug_info().await
    }

    /// Agent `j`'s Debug `last_sync_success`, in Unix seconds (0: never).
    ///
    /// # Errors
    /// As [`Self::agent_debug_info`], or the field is missing.
    pub async fn last_sync_success(&self, j: usize) -> Result<i64, LabError> {
        let v = self.agent_debug_info(j).await?;
        let field = &v["last_sync_success"];
        field
            .as_i64()
            .or_else(|| field.as_str().and_then(|s| s.parse().ok()))
            .or_else(|| field.is_null().then_some(0))
            .ok_or_else(|| LabError::Output {
                command: "spire-agent debug getinfo".into(),
                reason: "no last_sync_success".into(),
                output: v.to_string(),
            })
    }

    // ----- registration and admission -----------------------------------------

    /// Creates the entry `spiffe://<td><path>` for `unix:uid:<uid>`, parented
    /// to agent `parent_agent`'s node alias, through the first available
    /// server; returns its id. The other servers see it within ~5 s.
    ///
    /// # Errors
    /// No server is available, or the CLI fails.
    pub async fn register_entry(
        &self,
        parent_agent: usize,
        path: &str,
        uid: u32,
        x509_svid_ttl_secs: u32,
    ) -> Result<String, LabError> {
        let parent = self.agents[parent_agent].node_alias.clone();
        create_entry(
            self.cli_server()?,
            &parent,
            &self.spiffe_id(path),
            uid,
            x509_svid_ttl_secs,
        )
        .await
    }

    /// Waits (bounded) until agent `j`'s current run has cached an SVID for
    /// `spiffe://<td><path>` (its log names it with `X509-SVID`).
    ///
    /// # Errors
    /// Not synced within [`WAIT_LIMIT`].
    pub async fn wait_for_entry_synced(&self, j: usize, path: &str) -> Result<(), LabError> {
        self.agents[j]
            .proc_
            .wait_for_svid_logged(&self.spiffe_id(path), WAIT_LIMIT)
            .await
    }

    /// Polls (bounded) until agent `j`'s Workload API gives this process's
    /// uid an SVID for `spiffe://<td><path>`.
    ///
    /// # Errors
    /// Not served within [`WAIT_LIMIT`]; the error quotes the last attempt.
    pub async fn wait_fetch_has(&self, j: usize, path: &str) -> Result<(), LabError> {
        let id = self.spiffe_id(path);
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let last = self.fetch_x509_ids(j, Duration::from_secs(3)).await;
            if matches!(&last, Ok(ids) if ids.contains(&id)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::not_ready(
                    format!("agent-{j} never served {id} (last fetch: {last:?})"),
                    WAIT_LIMIT,
                    self.agents[j].log(),
                ));
            }
            sleep(Duration::from_millis(500)).await;
        }
    }

    /// Bans agent `j`'s current SPIFFE ID (`agent ban`); the agent exits at
    /// its next sync. Applies on every server at once.
    ///
    /// # Errors
    /// No server is available, or the CLI fails.
    pub async fn ban_agent(&self, j: usize) -> Result<(), LabError> {
        let id = self.agents[j].spiffe_id();
        self.cli_server()?
            .cli(&["agent", "ban", "-spiffeID", &id])
            .await
            .map(|_| ())
    }

    /// Evicts agent `j`'s current SPIFFE ID (`agent evict`, i.e.
    /// DeleteAgent); this also deletes its node-alias entry. A join-token
    /// agent then cannot attest again by itself and exits.
    ///
    /// # Errors
    /// No server is available, or the CLI fails.
    pub async fn evict_agent(&self, j: usize) -> Result<(), LabError> {
        let id = self.agents[j].spiffe_id();
        self.cli_server()?
            .cli(&["agent", "evict", "-spiffeID", &id])
            .await
            .map(|_| ())
    }

    /// Issues a join token for agent `j`'s node alias and writes it to
    /// `<agent dir>/join_token`, so the next start (its restart command or
    /// [`Self::start_agent`]) attests with it: how a banned or evicted agent
    /// is admitted again, with entries parented to the alias applying again.
    /// [`HaAgent::spiffe_id`] switches to the new token once a start has
    /// consumed the file.
    ///
    /// # Errors
    /// The agents attest with `k8s_psat` (they attest again by themselves),
    /// no server is available, or the CLI fails.
    pub async fn new_join_token_for(&self, j: usize) -> Result<String, LabError> {
        if self.opts.psat().is_some() {
            return Err(LabError::Options(
                "the agents attest with k8s_psat: there is no join token to issue (a k8s_psat agent attests again by itself)".into(),
            ));
        }
        let a = &self.agents[j];
        let token = generate_token(self.cli_server()?, &a.node_alias).await?;
        write_file(&a.proc_.token_file, token.as_bytes())?;
        *a.pending_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(token.clone());
        Ok(token)
    }

    /// A description of the lab for other programs (`lab.json`).
    pub fn manifest(&self) -> LabManifest {
        LabManifest {
            version: LabManifest::VERSION,
            state: "running".into(),
            dir: self.root.clone(),
            owner_pid: std::process::id(),
            trust_domain: self.opts.trust_domain.clone(),
            bin_dir: self.opts.bin_dir.clone(),
            bundle_path: self.bundle_path(),
            database: DatabaseManifest {
                name: self.db.name.clone(),
                admin_url: self.db.admin_url.clone(),
                spire_connection_string: self.db.spire_url.clone(),
            },
            servers: self
                .servers
                .iter()
                .map(|s| ServerManifest {
                    name: s.name.clone(),
                    dir: s.dir.clone(),
                    conf: s.conf().to_path_buf(),
                    log: s.log().to_path_buf(),
                    pidfile: s.pidfile(),
                    pid: s.pid(),
                    socket: s.socket().to_path_buf(),
                    address: s.address(),
                    bind_port: s.bind_port,
                    health_url: s.health_url(),
                    live_url: s.live_url(),
                    metrics_url: s.metrics_url(),
                })
                .collect(),
            agents: self
                .agents
                .iter()
                .map(|a| AgentManifest {
                    name: a.name.clone(),
                    dir: a.dir.clone(),
                    conf: a.conf().to_path_buf(),
                    log: a.log().to_path_buf(),
                    pidfile: a.pidfile().to_path_buf(),
                    pid: a.pid(),
                    workload_socket: a.workload_socket().to_path_buf(),
                    admin_socket: a.admin_socket().to_path_buf(),
                    health_url: a.health_url(),
                    live_url: a.live_url(),
                    metrics_url: a.metrics_url(),
                    restart_command: a.restart_command(),
                    join_token_file: a.join_token_file().to_path_buf(),
                    server: self.servers[a.server()].name.clone(),
                    server_port: self.servers[a.server()].bind_port,
                    node_alias: a.node_alias.clone(),
                    spiffe_id: a.spiffe_id(),
                    entries: Vec::new(),
                })
                .collect(),
        }
    }

    // ----- internals ------------------------------------------------------------

    /// The first server that runs and is not frozen.
    fn cli_server(&self) -> Result<&ServerProc, LabError> {
        self.servers
            .iter()
            .map(|s| &s.proc_)
            .find(|s| s.available())
            .ok_or_else(|| LabError::State("no server is running (or all are frozen)".into()))
    }

    /// Waits (bounded) until every server serves a bundle with every
    /// server's CA, then writes it to `bundle.pem`.
    ///
    /// Agents must not attest before that: an agent persists the bundle it
    /// got at attestation, and SPIRE v1.15.3 does not persist a bundle change
    /// delivered by its very first sync (the bundle observer subscribes only
    /// after it). An agent that attested to server A while A still served
    /// only its own CA keeps B's CA in memory but not on disk, so after a
    /// restart pointed at B it fails with "certificate signed by unknown
    /// authority".
    async fn write_bundle(&self) -> Result<(), LabError> {
        let want = self.servers.len();
        let deadline = Instant::now() + WAIT_LIMIT;
        for s in &self.servers {
            loop {
                let out = s.proc_.cli(&["bundle", "show"]).await?;
                let cas = String::from_utf8_lossy(&out.stdout)
                    .matches("BEGIN CERTIFICATE")
                    .count();
                if cas >= want {
                    write_file(&self.bundle_path(), &out.stdout)?;
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LabError::not_ready(
                        format!(
                            "{} serves a bundle with {cas} CA(s), not one per server ({want})",
                            s.name
                        ),
                        WAIT_LIMIT,
                        s.log(),
                    ));
                }
                sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// Waits (bounded) until every agent has persisted a bundle with every
    /// server's CA (see [`Self::write_bundle`]), so that each can be
    /// restarted against any server.
    async fn wait_bundles_persisted(&self) -> Result<(), LabError> {
        let want = self.servers.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        for a in &self.agents {
            loop {
                let have = a.stored_bundle_cas().unwrap_or(0);
                if have >= want {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LabError::not_ready(
                        format!(
                            "{} persisted a bundle with {have} of {want} server CAs (failover would fail)",
                            a.name
                        ),
                        Duration::from_secs(10),
                        a.log(),
                    ));
                }
                sleep(POLL).await;
            }
        }
        Ok(())
    }

    fn write_server_conf(&self, i: usize) -> Result<(), LabError> {
        let s = &self.servers[i];
        let o = &self.opts;
        let conf = ServerConf {
            bind_port: s.bind_port,
            socket: s.socket(),
            data_dir: &s.dir.join("data"),
            keys_path: &s.dir.join("data/keys.json"),
            trust_domain: &o.trust_domain,
            ca_ttl: &o.ca_ttl,
            default_x509_svid_ttl: &o.default_x509_svid_ttl,
            agent_ttl: &o.agent_ttl,
            datastore: Datastore::Postgres(self.db.spire_url.clone()),
            health_port: s.health_port,
            telemetry_port: Some(s.metrics_port),
            node_attestor: match o.psat() {
                None => ServerAttestor::JoinToken,
                Some(p) => ServerAttestor::K8sPsat {
                    cluster: &p.cluster,
                    service_account_allow_list: &p.service_account_allow_list,
                    kube_config_file: &p.kube_config_file,
                },
            },
        }
        .render();
        write_file(s.conf(), conf.as_bytes())
    }

    fn write_agent_conf(&self, j: usize) -> Result<(), LabError> {
        let a = &self.agents[j];
        let o = &self.opts;
        let conf = AgentConf {
            data_dir: &a.data_dir(),
            server_port: self.servers[a.server()].bind_port,
            socket: a.workload_socket(),
            admin_socket: a.admin_socket(),
            trust_bundle: &self.bundle_path(),
            trust_domain: &o.trust_domain,
            sync_interval: &o.sync_interval,
            keys_dir: &a.dir.join("keys"),
            health_port: a.health_port,
            telemetry_port: Some(a.metrics_port),
            node_attestor: match o.psat() {
                None => AgentAttestor::JoinToken,
                Some(p) => AgentAttestor::K8sPsat {
                    cluster: &p.cluster,
                    token_path: &p.nodes[j].token_path,
                },
            },
        }
        .render();
        write_file(a.conf(), conf.as_bytes())
    }
}

impl Drop for HaLab {
    fn drop(&mut self) {
        for a in &self.agents {
            a.proc_.kill_blocking();
        }
        for s in &self.servers {
            s.proc_.kill_blocking();
        }
        if !self.stopped.load(Ordering::SeqCst) {
            self.db.drop_blocking();
        }
    }
}

/// `entry create -node` of `alias` for agents with every one of
/// `selectors` (a node alias).
async fn create_node_alias(
    server: &ServerProc,
    alias: &str,
    selectors: &[String],
) -> Result<(), LabError> {
    let mut args = vec!["entry", "create", "-node", "-spiffeID", alias];
    for s in selectors {
        args.extend(["-selector", s.as_str()]);
    }
    args.extend(["-output", "json"]);
    let out = server.cli(&args).await?;
    let command = "spire-server entry create -node";
    let v = parse_json(command, &out)?;
    // The CLI exits 0 on failure with -output json: check the status.
    let status = &v["results"][0]["status"];
    if status["code"].as_i64().unwrap_or(0) != 0 {
        return Err(LabError::Command {
            command: format!("{command} -spiffeID {alias}"),
            status: status["code"].to_string(),
            output: status["message"].as_str().unwrap_or_default().to_owned(),
        });
    }
    Ok(())
}

/// `server-a`, `server-b`, …
fn server_name(i: usize) -> String {
    let letter = char::from(b'a' + (i % 26) as u8);
    format!("server-{letter}")
}

/// Removes what an earlier lab left in `root`: `server-<letter>`,
/// `agent-<n>` (after SIGKILLing any process still running their configs)
/// and `bundle.pem`. Other files are kept.
fn clear_lab_files(root: &Path) -> Result<(), LabError> {
    let entries =
        fs::read_dir(root).map_err(LabError::io(format!("reading {}", root.display())))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = name
            .strip_prefix("server-")
            .is_some_and(|s| s.len() == 1 && s.bytes().all(|b| b.is_ascii_lowercase()))
            || name
                .strip_prefix("agent-")
                .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        let path = e.path();
        if ours && path.is_dir() {
            // A process of an earlier lab still running this config would
            // collide with the new one (ports, sockets): end it first.
            for conf in [path.join("server.conf"), path.join("agent.conf")] {
                for pid in pids_with_arg(&conf) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            fs::remove_dir_all(&path)
                .map_err(LabError::io(format!("removing {}", path.display())))?;
        } else if name == "bundle.pem" {
            fs::remove_file(&path).map_err(LabError::io(format!("removing {}", path.display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(server_name(0), "server-a");
        assert_eq!(server_name(1), "server-b");
    }

    #[test]
    fn options_are_checked() {
        let ok = HaOptions {
            postgres_url: "postgres://u@h/db".into(),
            ..HaOptions::default()
        };
        assert!(ok.check().is_ok());
        assert_eq!(ok.server_of(0), 0);
        assert_eq!(ok.server_of(3), 1);
        assert!(HaOptions::default().check().is_err(), "empty URL");
        let pinned = HaOptions {
            agent_server: vec![1, 1],
            ..ok.clone()
        };
        assert_eq!(pinned.server_of(0), 1);
        for bad in [
            HaOptions {
                servers: 0,
                ..ok.clone()
            },
            HaOptions {
                agent_server: vec![0],
                ..ok.clone()
            },
            HaOptions {
                agent_server: vec![0, 2],
                ..ok.clone()
            },
            HaOptions {
                node_attestation: NodeAttestation::K8sPsat(K8sPsat {
                    cluster: "c".into(),
                    kube_config_file: "/k".into(),
                    service_account_allow_list: vec!["ns:sa".into()],
                    nodes: Vec::new(),
                }),
                ..ok.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn clears_only_lab_files() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["server-a", "agent-12", "agent-x", "keep"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        fs::write(dir.path().join("bundle.pem"), "x").unwrap();
        fs::write(dir.path().join("lab.pid"), "1").unwrap();
        clear_lab_files(dir.path()).unwrap();
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["agent-x", "keep", "lab.pid"]);
    }
}
