//! A real SPIRE lab for integration tests: one `spire-server` (sqlite3
//! datastore, disk KeyManager, join-token attestation) and one `spire-agent`
//! (disk KeyManager, unix WorkloadAttestor), both running from the binaries
//! built by `scripts/install-spire.sh`, in a private temporary directory with
//! free ports.
//!
//! The current agent pid always lives in `<dir>/agent.pid`. The agent can be
//! restarted by another program through [`SpireLab::restart_command`]; every
//! control method reads the pidfile, so kill/freeze/thaw and `Drop` act on
//! whichever agent is current. Every wait is bounded; a timeout error carries
//! the tail of the relevant log.
//!
//! Starting a lab makes the test process a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so agents started by the restart script, whose
//! parent shell exits at once, are re-parented to the test process and can be
//! reaped here rather than left as zombies where init does not reap.
#![allow(dead_code)]

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

/// How long any single readiness or sync wait may take.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// Deadline for one CLI call (server CLI calls have no RPC deadline of their own).
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period of the waits.
const POLL: Duration = Duration::from_millis(250);
/// Lines of log quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// The node alias every agent of the lab is attested under: `spiffe://<td>/node/a`.
const NODE_ALIAS_PATH: &str = "/node/a";
/// Written to the agent log before every agent start (by the harness and the restart script).
const AGENT_START_MARKER: &str = "---- spire-lab: starting spire-agent ----";

/// Settings of a lab. `Default` gives a trust domain `healer.test`, 1 h SVIDs,
/// a 24 h CA and a 1 s agent sync interval.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub trust_domain: String,
    pub default_x509_svid_ttl: String,
    pub agent_ttl: String,
    pub ca_ttl: String,
    /// The agent's `experimental { sync_interval }`.
    pub sync_interval: String,
    /// Folder holding `spire-server` and `spire-agent`.
    pub bin_dir: PathBuf,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            trust_domain: "healer.test".into(),
            default_x509_svid_ttl: "1h".into(),
            agent_ttl: "1h".into(),
            ca_ttl: "24h".into(),
            sync_interval: "1s".into(),
            bin_dir: default_bin_dir(),
        }
    }
}

/// `SPIRE_HEALER_SPIRE_BIN`, else `<crate>/.spire/bin`.
pub fn default_bin_dir() -> PathBuf {
    match std::env::var_os("SPIRE_HEALER_SPIRE_BIN") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(".spire/bin"),
    }
}

/// A running SPIRE server and agent. Dropping it kills both.
pub struct SpireLab {
    opts: LabOptions,
    dir: TempDir,
    server_bin: PathBuf,
    agent_bin: PathBuf,
    server_port: u16,
    server_health_port: u16,
    agent_health_port: u16,
    server: Mutex<Option<Child>>,
    /// The agent this harness spawned last (it may since have been killed by
    /// the restart script; it is reaped whenever that is noticed).
    agent_child: Mutex<Option<Child>>,
    /// Agent pids read from the pidfile that may still need reaping.
    seen_agent_pids: Mutex<Vec<i32>>,
}

impl SpireLab {
    /// Starts a server, waits until it is healthy, attests an agent with a
    /// fresh join token and waits until the agent serves the Workload API.
    pub async fn start(opts: LabOptions) -> Result<SpireLab> {
        let server_bin = opts.bin_dir.join("spire-server");
        let agent_bin = opts.bin_dir.join("spire-agent");
        for bin in [&server_bin, &agent_bin] {
            ensure!(
                bin.is_file(),
                "{} not found; run scripts/install-spire.sh (or set SPIRE_HEALER_SPIRE_BIN \
                 to a folder holding spire-server and spire-agent)",
                bin.display()
            );
        }

        // Adopt orphaned agents (see the module docs); best effort.
        let _ = nix::sys::prctl::set_child_subreaper(true);

        // Short path: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("sl")
            .tempdir_in("/tmp")
            .context("creating the lab directory")?;
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
            let p = root.join(sub);
            fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod {}", p.display()))?;
        }

        let server_port = free_port()?;
        let server_health_port = free_port()?;
        let agent_health_port = free_port()?;

        let lab = SpireLab {
            opts,
            dir,
            server_bin,
            agent_bin,
            server_port,
            server_health_port,
            agent_health_port,
            server: Mutex::new(None),
            agent_child: Mutex::new(None),
            seen_agent_pids: Mutex::new(Vec::new()),
        };
        lab.write_server_conf()?;
        lab.start_server().await?;

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

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn trust_domain(&self) -> &str {
        &self.opts.trust_domain
    }
    pub fn options(&self) -> &LabOptions {
        &self.opts
    }
    /// `spiffe://<trust domain><path>`; `path` may omit its leading `/`.
    pub fn spiffe_id(&self, path: &str) -> String {
        let sep = if path.starts_with('/') { "" } else { "/" };
        format!("spiffe://{}{}{}", self.opts.trust_domain, sep, path)
    }
    /// The node alias all lab entries are parented to (`spiffe://<td>/node/a`).
    pub fn node_alias(&self) -> String {
        self.spiffe_id(NODE_ALIAS_PATH)
    }
    pub fn workload_socket(&self) -> PathBuf {
        self.dir().join("public/api.sock")
    }
    pub fn agent_admin_socket(&self) -> PathBuf {
        self.dir().join("admin/admin.sock")
    }
    pub fn server_socket(&self) -> PathBuf {
        self.dir().join("server/api.sock")
    }
    pub fn server_port(&self) -> u16 {
        self.server_port
    }
    pub fn server_bin(&self) -> &Path {
        &self.server_bin
    }
    pub fn agent_bin(&self) -> &Path {
        &self.agent_bin
    }
    pub fn server_conf(&self) -> PathBuf {
        self.dir().join("server.conf")
    }
    pub fn agent_conf(&self) -> PathBuf {
        self.dir().join("agent.conf")
    }
    pub fn server_log(&self) -> PathBuf {
        self.dir().join("server.log")
    }
    /// All agent runs append to this file; each run starts with a marker line.
    pub fn agent_log(&self) -> PathBuf {
        self.dir().join("agent.log")
    }
    pub fn agent_pidfile(&self) -> PathBuf {
        self.dir().join("agent.pid")
    }
    pub fn agent_data_dir(&self) -> PathBuf {
        self.dir().join("agent/data")
    }
    pub fn bundle_path(&self) -> PathBuf {
        self.dir().join("bundle.pem")
    }
    fn token_path(&self) -> PathBuf {
        self.dir().join("agent-token")
    }
    fn restart_script(&self) -> PathBuf {
        self.dir().join("restart-agent.sh")
    }
    pub fn agent_health_port(&self) -> u16 {
        self.agent_health_port
    }
    /// The agent's readiness endpoint (`/ready`; `/live` is on the same port).
    pub fn agent_health_url(&self) -> String {
        format!("http://127.0.0.1:{}/ready", self.agent_health_port)
    }
    pub fn agent_live_url(&self) -> String {
        format!("http://127.0.0.1:{}/live", self.agent_health_port)
    }
    pub fn server_health_url(&self) -> String {
        format!("http://127.0.0.1:{}/ready", self.server_health_port)
    }

    /// The pid in the pidfile, if that process is a live spire-agent of this
    /// lab (a zombie or a recycled pid does not count).
    pub fn agent_pid(&self) -> Option<i32> {
        let pid = self.pidfile_pid()?;
        self.is_our_agent(pid).then_some(pid)
    }

    fn pidfile_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.agent_pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let mut seen = self
            .seen_agent_pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !seen.contains(&pid) {
            seen.push(pid);
        }
        Some(pid)
    }

    fn is_our_agent(&self, pid: i32) -> bool {
        if !process_alive(pid) {
            return false;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let conf = self.agent_conf();
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == conf.as_os_str().as_encoded_bytes())
    }

    /// An argv that restarts the agent when run by any program: it SIGKILLs
    /// the agent in the pidfile (stopped or not), starts a new detached
    /// `spire-agent run` with the same config and data dir (output appended to
    /// the agent log), writes its pid to the pidfile and exits 0 at once,
    /// without waiting for the agent to become ready.
    pub fn restart_command(&self) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            self.restart_script().to_string_lossy().into_owned(),
        ]
    }

    // ----- agent control ------------------------------------------------

    /// SIGKILLs the current agent and waits until it is gone (reaped when it
    /// is our child).
    pub async fn kill_agent(&self) -> Result<()> {
        self.reap_stale_child();
        if let Some(pid) = self.agent_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            self.wait_agent_gone(pid).await?;
        }
        self.reap_stale_child();
        Ok(())
    }

    /// SIGSTOPs the current agent.
    pub fn freeze_agent(&self) -> Result<()> {
        let pid = self
            .agent_pid()
            .ok_or_else(|| anyhow!("no running agent to freeze"))?;
        kill(Pid::from_raw(pid), Signal::SIGSTOP).context("SIGSTOP agent")
    }

    /// SIGCONTs the current agent.
    pub fn thaw_agent(&self) -> Result<()> {
        let pid = self
            .agent_pid()
            .ok_or_else(|| anyhow!("no running agent to thaw"))?;
        kill(Pid::from_raw(pid), Signal::SIGCONT).context("SIGCONT agent")
    }

    /// Kills the current agent if any, starts a new one with the same config
    /// and data dir, and waits until it serves the Workload API. With a stored,
    /// unexpired SVID the agent does not attest again; a join token is passed
    /// only when one is pending (first start, or after [`Self::new_join_token`]).
    pub async fn start_agent(&self) -> Result<()> {
        self.spawn_agent().await?;
        self.wait_agent_ready().await
    }

    /// Like [`Self::start_agent`] but does not wait for readiness.
    pub async fn spawn_agent(&self) -> Result<i32> {
        self.kill_agent().await?;
        let log = self.open_agent_log_with_marker()?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("run").arg("-config").arg(self.agent_conf());
        if let Ok(token) = fs::read_to_string(self.token_path()) {
            cmd.arg("-joinToken").arg(token.trim());
        }
        cmd.current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("spawning spire-agent")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("spire-agent exited at once"))? as i32;
        write_file(&self.agent_pidfile(), format!("{pid}\n").as_bytes())?;
        *self
            .agent_child
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(child);
        Ok(pid)
    }

    /// Waits (bounded) until the current agent is healthy (its Workload API
    /// answers `spire-agent healthcheck`). Fails early if the agent process
    /// has died.
    pub async fn wait_agent_ready(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut gone_since: Option<Instant> = None;
        loop {
            self.reap_stale_child();
            if self.agent_pid().is_none() {
                // A restart in progress may leave the pidfile naming the old
                // agent for a moment; only a lasting absence is an error.
                let since = *gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    bail!(
                        "spire-agent is not running (pidfile {:?}); last agent log lines:\n{}",
                        self.pidfile_pid(),
                        log_tail(&self.agent_log())
                    );
                }
            } else {
                gone_since = None;
            }
            if self.agent_healthcheck().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "spire-agent not ready after {WAIT_LIMIT:?}; last agent log lines:\n{}",
                    log_tail(&self.agent_log())
                );
            }
            sleep(POLL).await;
        }
    }

    /// `spire-agent healthcheck` against the Workload API socket, bounded.
    pub async fn agent_healthcheck(&self) -> bool {
        let args = [
            "healthcheck",
            "-socketPath",
            &self.workload_socket().to_string_lossy(),
        ]
        .map(String::from);
        matches!(
            run_bounded(&self.agent_bin, &args, Duration::from_secs(3)).await,
            Ok(out) if out.status.success()
        )
    }

    /// GETs the agent's `/ready` endpoint; true on HTTP 200.
    pub async fn agent_health_ok(&self) -> bool {
        matches!(
            http_get_status(self.agent_health_port, "/ready").await,
            Ok(200)
        )
    }

    /// Runs `spire-agent api fetch x509 -output json` as this process's uid.
    pub async fn fetch_x509(&self, fetch_timeout: Duration) -> Result<Output> {
        let secs = fetch_timeout.as_secs().max(1);
        let args = [
            "api",
            "fetch",
            "x509",
            "-socketPath",
            &self.workload_socket().to_string_lossy(),
            "-timeout",
            &format!("{secs}s"),
            "-output",
            "json",
        ]
        .map(String::from);
        run_bounded(
            &self.agent_bin,
            &args,
            fetch_timeout + Duration::from_secs(5),
        )
        .await
    }

    /// The SPIFFE IDs of the X.509-SVIDs the Workload API gives this
    /// process's uid; an error when the fetch fails.
    pub async fn fetch_x509_ids(&self, fetch_timeout: Duration) -> Result<Vec<String>> {
        let out = self.fetch_x509(fetch_timeout).await?;
        ensure!(
            out.status.success(),
            "spire-agent api fetch x509 failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "fetch x509 output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        Ok(v["svids"]
            .as_array()
            .map(|svids| {
                svids
                    .iter()
                    .filter_map(|s| s["spiffe_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Issues a new join token for the node alias and keeps it for the next
    /// agent start (needed after the agent lost its SVID, e.g. eviction).
    pub async fn new_join_token(&self) -> Result<String> {
        let out = self
            .server_cli(&[
                "token",
                "generate",
                "-spiffeID",
                &self.node_alias(),
                "-ttl",
                "600",
                "-output",
                "json",
            ])
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "token generate output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let token = v["value"]
            .as_str()
            .ok_or_else(|| anyhow!("token generate: no .value in {v}"))?
            .to_owned();
        write_file(&self.token_path(), token.as_bytes())?;
        Ok(token)
    }

    // ----- entries --------------------------------------------------------

    /// Creates an entry `spiffe://<td><spiffe_id_path>` for `unix:uid:<uid>`,
    /// parented to the node alias, and returns its id.
    pub async fn register_entry(
        &self,
        spiffe_id_path: &str,
        uid: u32,
        x509_svid_ttl_secs: u32,
    ) -> Result<String> {
        let out = self
            .server_cli(&[
                "entry",
                "create",
                "-parentID",
                &self.node_alias(),
                "-spiffeID",
                &self.spiffe_id(spiffe_id_path),
                "-selector",
                &format!("unix:uid:{uid}"),
                "-x509SVIDTTL",
                &x509_svid_ttl_secs.to_string(),
                "-output",
                "json",
            ])
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "entry create output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let result = &v["results"][0];
        // The CLI exits 0 on failure with -output json: check the status.
        let code = result["status"]["code"].as_i64().unwrap_or(0);
        ensure!(code == 0, "entry create failed: {}", result["status"]);
        result["entry"]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("entry create: no entry id in {v}"))
    }

    /// Waits (bounded) until the current agent run has cached an SVID for
    /// the entry: its log (from the last start on) has `Creating X509-SVID`
    /// (or `Renewing X509-SVID`) with that `spiffe_id`. The agent does this for every entry parented to
    /// it, whatever the uid. New entries take up to ~5 s (server cache reload).
    pub async fn wait_for_entry_synced(&self, spiffe_id_path: &str) -> Result<()> {
        let id = self.spiffe_id(spiffe_id_path);
        let logged = format!("spiffe_id=\"{id}\"");
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let log = self.current_agent_log();
            if log
                .lines()
                .any(|l| l.contains("X509-SVID") && l.contains(&logged))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "entry {id} not synced to the agent after {WAIT_LIMIT:?}; last agent log lines:\n{}",
                    log_tail(&self.agent_log())
                );
            }
            sleep(POLL).await;
        }
    }

    /// Runs `spire-server <args> -socketPath <server socket>`, bounded; fails
    /// on a non-zero exit.
    pub async fn server_cli(&self, args: &[&str]) -> Result<Output> {
        let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // Subcommand flags must follow the subcommand words.
        let pos = argv
            .iter()
            .position(|a| a.starts_with('-'))
            .unwrap_or(argv.len());
        argv.insert(pos, "-socketPath".into());
        argv.insert(pos + 1, self.server_socket().to_string_lossy().into_owned());
        let out = run_bounded(&self.server_bin, &argv, CLI_TIMEOUT).await?;
        ensure!(
            out.status.success(),
            "spire-server {} failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    // ----- internals ------------------------------------------------------

    fn write_server_conf(&self) -> Result<()> {
        let d = self.dir().display();
        let o = &self.opts;
        let conf = format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/server/api.sock"
    trust_domain = "{td}"
    data_dir = "{d}/server/data"
    log_level = "DEBUG"
    ca_ttl = "{ca_ttl}"
    default_x509_svid_ttl = "{svid_ttl}"
    agent_ttl = "{agent_ttl}"
    ratelimit {{
        attestation = false
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/server/data/datastore.sqlite3"
        }}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{d}/server/data/keys.json"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}

health_checks {{
    listener_enabled = true
    bind_address = "127.0.0.1"
    bind_port = "{health}"
}}
"#,
            port = self.server_port,
            td = o.trust_domain,
            ca_ttl = o.ca_ttl,
            svid_ttl = o.default_x509_svid_ttl,
            agent_ttl = o.agent_ttl,
            health = self.server_health_port,
        );
        write_file(&self.server_conf(), conf.as_bytes())
    }

    fn write_agent_conf(&self) -> Result<()> {
        let d = self.dir().display();
        let o = &self.opts;
        let conf = format!(
            r#"agent {{
    data_dir = "{d}/agent/data"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{d}/public/api.sock"
    admin_socket_path = "{d}/admin/admin.sock"
    trust_bundle_path = "{d}/bundle.pem"
    trust_domain = "{td}"
    experimental {{
        sync_interval = "{sync}"
    }}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{d}/agent/keys"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}

health_checks {{
    listener_enabled = true
    bind_address = "127.0.0.1"
    bind_port = "{health}"
}}
"#,
            port = self.server_port,
            td = o.trust_domain,
            sync = o.sync_interval,
            health = self.agent_health_port,
        );
        write_file(&self.agent_conf(), conf.as_bytes())
    }

    fn write_restart_script(&self) -> Result<()> {
        let script = format!(
            r#"#!/bin/sh
# Restarts this lab's spire-agent: SIGKILLs the agent in the pidfile (even a
# stopped one), starts a new detached one with the same config and data dir
# (output appended to the agent log), records its pid and exits at once.
dir={dir}
agent={agent}
pidfile="$dir/agent.pid"
log="$dir/agent.log"
conf="$dir/agent.conf"

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
if [ -s "$dir/agent-token" ]; then
  set -- -joinToken "$(cat "$dir/agent-token")"
fi
cd "$dir" || exit 1
echo "{marker}" >> "$log"
if command -v setsid >/dev/null 2>&1; then
  setsid "$agent" run -config "$conf" "$@" </dev/null >>"$log" 2>&1 &
else
  nohup "$agent" run -config "$conf" "$@" </dev/null >>"$log" 2>&1 &
fi
new=$!
echo "$new" > "$pidfile.tmp" && mv -f "$pidfile.tmp" "$pidfile"
echo "restarted spire-agent: pid $new (was ${{old:-none}})"
exit 0
"#,
            dir = sh_quote(&self.dir().to_string_lossy()),
            agent = sh_quote(&self.agent_bin.to_string_lossy()),
            marker = AGENT_START_MARKER,
        );
        let path = self.restart_script();
        write_file(&path, script.as_bytes())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    async fn start_server(&self) -> Result<()> {
        let log = open_append(&self.server_log())?;
        let child = Command::new(&self.server_bin)
            .arg("run")
            .arg("-config")
            .arg(self.server_conf())
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning spire-server")?;
        *self.server.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);

        let deadline = Instant::now() + WAIT_LIMIT;
        let args = [
            "healthcheck",
            "-socketPath",
            &self.server_socket().to_string_lossy(),
        ]
        .map(String::from);
        loop {
            let exited = {
                let mut guard = self.server.lock().unwrap_or_else(PoisonError::into_inner);
                guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
            };
            if let Some(status) = exited {
                bail!(
                    "spire-server exited during startup ({status}); last server log lines:\n{}",
                    log_tail(&self.server_log())
                );
            }
            let started = fs::read_to_string(self.server_log())
                .map(|l| l.matches("Starting Server APIs").count() >= 2)
                .unwrap_or(false);
            if started
                && let Ok(out) = run_bounded(&self.server_bin, &args, Duration::from_secs(3)).await
                && out.status.success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "spire-server not ready after {WAIT_LIMIT:?}; last server log lines:\n{}",
                    log_tail(&self.server_log())
                );
            }
            sleep(POLL).await;
        }
    }

    /// The agent log from the last start marker on (the current run).
    fn current_agent_log(&self) -> String {
        let text = fs::read(self.agent_log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        match text.rfind(AGENT_START_MARKER) {
            Some(i) => text[i..].to_owned(),
            None => text,
        }
    }

    fn open_agent_log_with_marker(&self) -> Result<fs::File> {
        let mut log = open_append(&self.agent_log())?;
        writeln!(log, "{AGENT_START_MARKER}")?;
        Ok(log)
    }

    /// Reaps dead agents: the child we spawned once it is no longer current
    /// or has exited (e.g. killed by the restart script), and agents started
    /// by the restart script that were re-parented to this process.
    fn reap_stale_child(&self) {
        let own = self.reap_own_child();
        self.reap_adopted(own);
    }

    /// Reaps exited agents among the pids seen in the pidfile, except `own`
    /// (our tokio child, reaped through its handle).
    fn reap_adopted(&self, own: Option<i32>) {
        let mut seen = self
            .seen_agent_pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        seen.retain(|&pid| {
            if Some(pid) == own {
                return true;
            }
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => true,
                Ok(_) => false,
                // Not (yet) our child: keep watching while it lives.
                Err(Errno::ECHILD) => process_alive(pid),
                Err(_) => false,
            }
        });
    }

    /// Returns the pid of our agent child if it is still unreaped.
    fn reap_own_child(&self) -> Option<i32> {
        let mut guard = self
            .agent_child
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(child) = guard.as_mut() {
            let current = self.pidfile_pid();
            let exited = matches!(child.try_wait(), Ok(Some(_)) | Err(_));
            if exited {
                *guard = None;
            } else if child.id().map(|p| p as i32) != current {
                // Superseded but still running: it must not linger.
                let _ = child.start_kill();
                for _ in 0..100 {
                    if !matches!(child.try_wait(), Ok(None)) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                *guard = None;
            }
        }
        guard.as_ref().and_then(|c| c.id()).map(|p| p as i32)
    }

    async fn wait_agent_gone(&self, pid: i32) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.reap_stale_child();
            if !process_alive(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("spire-agent pid {pid} still alive 10 s after SIGKILL");
            }
            sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SpireLab {
    fn drop(&mut self) {
        // The current agent, possibly started by the restart script (not our child).
        if let Some(pid) = self.agent_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let children = [
            self.agent_child
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
            self.server
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        ];
        for mut child in children.into_iter().flatten() {
            let _ = child.start_kill();
            for _ in 0..500 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(pid) = self.pidfile_pid() {
            for _ in 0..500 {
                self.reap_adopted(None);
                if !process_alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.reap_adopted(None);
    }
}

// ----- helpers ---------------------------------------------------------------

/// Runs `bin args`, killing it when it exceeds `limit`.
pub async fn run_bounded(bin: &Path, args: &[String], limit: Duration) -> Result<Output> {
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    match timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("running {}", bin.display())),
        Err(_) => Err(anyhow!(
            "{} {} did not finish within {limit:?}",
            bin.display(),
            args.join(" ")
        )),
    }
}

/// A minimal HTTP/1.0 GET against 127.0.0.1; returns the status code.
pub async fn http_get_status(port: u16, path: &str) -> Result<u16> {
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        let head = String::from_utf8_lossy(&buf);
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP response: {head:.80}"))?;
        Ok::<u16, anyhow::Error>(code)
    };
    timeout(Duration::from_secs(3), fut)
        .await
        .map_err(|_| anyhow!("GET 127.0.0.1:{port}{path} timed out"))?
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// True when `pid` exists and is neither a zombie nor dead.
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn open_append(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
