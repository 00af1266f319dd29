//! [`ControlPlane`]: a real, kubelet-less Kubernetes control plane on
//! 127.0.0.1 for the Kubernetes tests and for trying the healer out
//! (`spire-lab k8s`).
//!
//! # What runs
//! The binaries `scripts/install-k8s.sh` builds (kube-apiserver,
//! kube-controller-manager and kube-scheduler v1.37.2, etcd v3.7.3, kwok
//! v0.8.0), from the folder named by `SPIRE_HEALER_K8S_BIN`
//! ([`ControlPlane::bin_dir_from_env`]), each in its own process group:
//!
//! | process | how |
//! | --- | --- |
//! | etcd | loopback client and peer ports, `--unsafe-no-fsync` (test data) |
//! | kube-apiserver | `--bind-address`/`--advertise-address` 127.0.0.1 with `--endpoint-reconciler-type=none` (it refuses 127.0.0.1 otherwise); a self-signed serving certificate in `--cert-dir` (SAN 127.0.0.1), whose CA the lab copies to [`ControlPlane::ca_pem`]; ServiceAccount tokens signed with an RSA key generated per start (`openssl genrsa`); `--service-cluster-ip-range=10.0.0.0/24`; `--authorization-mode=Node,RBAC`; static tokens (`--token-auth-file`); `--disable-admission-plugins=ServiceAccount` (pods get no token volume) |
//! | kube-controller-manager | `--leader-elect=false`, loopback secure port, only the controllers in [`CONTROLLERS`] |
//! | kube-scheduler | `--leader-elect=false`, loopback secure port |
//! | kwok | simulated kubelets for every node (`--manage-all-nodes=true`), with the Stages of `lab/k8s/kwok-stages.yaml` (after kwok's own `node-fast`, `node-heartbeat-with-lease` and `pod-fast`): nodes become Ready, bound pods Running and Ready (containers never run), deleted pods go at once |
//!
//! # Users
//! Static bearer tokens ([`ControlPlane::admin_kubeconfig`],
//! [`ControlPlane::user_kubeconfig`]); everyone also gets
//! `system:authenticated`, which grants discovery and nothing else.
//!
//! | user | groups | may |
//! | --- | --- | --- |
//! | `lab-admin` | `system:masters` | everything |
//! | `spire-healer` | `spire-healer` | nothing until RBAC grants it |
//! | `spire-healer-node` | `spire-healer-node` | nothing until RBAC grants it |
//! | `viewer` | `viewer` | nothing until RBAC grants it |
//!
//! The controller-manager, the scheduler and kwok run as their own users in
//! `system:masters`. A ServiceAccount's kubeconfig comes from a TokenRequest
//! ([`ControlPlane::service_account_kubeconfig`]).
//!
//! # Facts the tests rely on (measured with this lab)
//! - Evicting a Running and Ready pod under a PodDisruptionBudget that allows
//!   no disruption answers 429 (also before the disruption controller has
//!   processed the budget); kube's default client would retry it for minutes,
//!   so every client made here has `default_retry = false`.
//! - A pod with a finalizer stays Terminating until the finalizer goes (kwok
//!   deletes only what the API server lets go): the fixture for "stuck
//!   terminating".
//! - Nothing needing a real kubelet (`:10250`, exec, logs) works.
//!
//! # Files in the work directory
//! `etcd/` (data), `pki/` (`ca.pem`, `sa.key`, `sa.pub`, `serving/`),
//! `tokens.csv`, `kwok-stages.yaml`, `kubeconfigs/<user>.kubeconfig`, and one
//! log per process (`etcd.log`, `kube-apiserver.log`,
//! `kube-controller-manager.log`, `kube-scheduler.log`, `kwok.log`). A start
//! wipes the previous cluster's state there (and SIGKILLs processes still
//! running on its files, left by an owner that was killed).
//!
//! # Guarantees
//! - [`ControlPlane::start`] is bounded by [`START_LIMIT`]; it returns once
//!   the API server is ready (`/readyz`), the `default` namespace has its
//!   `default` ServiceAccount (the controller-manager works) and the node
//!   [`FIRST_NODE`] is Ready and untainted (kwok and node lifecycle work).
//!   A failure names what was not reached and quotes the log of the process
//!   concerned.
//! - Dropping a [`ControlPlane`] SIGKILLs every process group it started
//!   (the API server takes 20–30 s to honour SIGTERM) and reaps the leaders;
//!   `Drop` blocks for at most a few seconds. Processes outlive a test
//!   process that is itself SIGKILLed; the next start in the same folder
//!   kills them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt as _;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use super::process::kill_child_blocking;
use super::{LabError, WAIT_LIMIT, free_ports, log_tail, open_append, pids_with_arg, write_file};

/// The environment variable naming the folder of control-plane binaries
/// (the last line `scripts/install-k8s.sh` prints).
pub const K8S_BIN_ENV: &str = "SPIRE_HEALER_K8S_BIN";
/// Bound of [`ControlPlane::start`] (about 4 s when the machine is idle).
pub const START_LIMIT: Duration = Duration::from_secs(60);
/// Bound of one `kubectl` call made by the lab.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);
/// `--request-timeout` of [`ControlPlane::kubectl`].
pub const KUBECTL_REQUEST_TIMEOUT: &str = "20s";
/// The unprivileged users, each in a group of its own name.
pub const USERS: [&str; 3] = ["spire-healer", "spire-healer-node", "viewer"];
/// The admin user (in `system:masters`).
pub const ADMIN_USER: &str = "lab-admin";
/// The node [`ControlPlane::start`] creates and waits for.
pub const FIRST_NODE: &str = "kwok-node-0";
/// The `--service-account-issuer` (and so the default token audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The controllers the controller-manager runs: what Deployments,
/// ReplicaSets, StatefulSets, DaemonSets, Jobs, PodDisruptionBudgets,
/// garbage collection, namespaces, Services and ServiceAccounts need, the
/// aggregation of the `admin`/`edit`/`view` ClusterRoles, and node
/// lifecycle (it lifts the `node.kubernetes.io/not-ready` taint the API
/// server puts on every new node once kwok reports it Ready, and taints a
/// node whose kwok Lease lapses; without the taint-eviction controller its
/// pods stay bound).
pub const CONTROLLERS: &[&str] = &[
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "job-controller",
    "disruption-controller",
    "garbage-collector-controller",
    "pod-garbage-collector-controller",
    "namespace-controller",
    "node-lifecycle-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "endpointslice-controller",
    "service-cidr-controller",
];
/// The kwok Stages (see the file's header).
pub const KWOK_STAGES: &str = include_str!("../k8s/kwok-stages.yaml");

/// The binaries expected in the bin folder.
const BINARIES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
];
/// Components in system:masters besides the admin: (user, kubeconfig name).
const COMPONENT_USERS: [(&str, &str); 3] = [
    ("system:kube-controller-manager", "kube-controller-manager"),
    ("system:kube-scheduler", "kube-scheduler"),
    ("kwok", "kwok"),
];
/// The taint the API server puts on new nodes until node lifecycle sees
/// them Ready.
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// Pod IPs kwok hands out, and its nodes' InternalIP.
const KWOK_CIDR: &str = "10.244.0.1/24";
const KWOK_NODE_IP: &str = "10.244.0.1";
/// Bound of one API call made while waiting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll period of the waits.
const POLL: Duration = Duration::from_millis(100);
/// Lifetime of the ServiceAccount tokens the lab requests.
const SA_TOKEN_SECONDS: i64 = 24 * 3600;

// === Component ===

/// One process of the plane, leader of its own process group.
struct Component {
    name: &'static str,
    log: PathBuf,
    /// The process group (the leader's pid).
    pgid: i32,
    state: Mutex<ProcState>,
}

enum ProcState {
    Running(Child),
    /// Reaped: the group id may be reused from now on, so it is never
    /// signalled again.
    Exited(ExitStatus),
}

impl Component {
    /// Spawns `bin args` in a new process group, stdout and stderr appended
    /// to `log`.
    fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Component, LabError> {
        let out = open_append(&log)?;
        let err = out
            .try_clone()
            .map_err(LabError::io(format!("opening {}", log.display())))?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(LabError::io(format!("spawning {}", bin.display())))?;
        let pgid = child
            .id()
            .ok_or_else(|| LabError::State(format!("{name} exited at once")))?
            as i32;
        Ok(Component {
            name,
            log,
            pgid,
            state: Mutex::new(ProcState::Running(child)),
        })
    }

    /// Ok while the leader runs; [`LabError::Exited`] with its log tail once
    /// it has exited.
    fn check(&self) -> Result<(), LabError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let ProcState::Running(child) = &mut *state
            && let Ok(Some(status)) = child.try_wait()
        {
            *state = ProcState::Exited(status);
        }
        match &*state {
            ProcState::Running(_) => Ok(()),
            ProcState::Exited(status) => Err(LabError::Exited {
                what: format!("{} exited", self.name),
                status: status.to_string(),
                log: self.log.clone(),
                tail: log_tail(&self.log),
            }),
        }
    }

    /// Resident memory of the leader, in bytes (0 once it is gone).
    fn rss_bytes(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pgid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024)
    }

    /// SIGKILLs the whole group (while the leader is unreaped, so the id is
    /// still ours) and reaps the leader, blocking for a few seconds at most.
    fn kill_blocking(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let ProcState::Running(child) = &mut *state {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            kill_child_blocking(child);
        }
    }
}

// === ControlPlane ===

/// A running control plane. Dropping it SIGKILLs every process it started.
pub struct ControlPlane {
    work_dir: PathBuf,
    port: u16,
    ca_pem: PathBuf,
    kubeconfig_dir: PathBuf,
    admin_kubeconfig: PathBuf,
    /// `user -> token` of every static user.
    tokens: BTreeMap<String, String>,
    /// In start order; killed in reverse.
    components: Vec<Component>,
    started_in: Duration,
}

impl ControlPlane {
    /// `SPIRE_HEALER_K8S_BIN` when set and not empty: tests skip without it.
    pub fn bin_dir_from_env() -> Option<PathBuf> {
        std::env::var_os(K8S_BIN_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    }

    /// Starts a plane from the binaries in `SPIRE_HEALER_K8S_BIN`, with its
    /// files and logs in `work_dir` (created if needed; a previous plane's
    /// state there is wiped). See the module docs for what "started" means.
    ///
    /// # Errors
    /// [`LabError::K8sBinDirUnset`] when the variable is unset (callers
    /// skip), [`LabError::MissingK8sBinary`], file or spawn errors, a process
    /// that exits ([`LabError::Exited`]) or a condition not reached within
    /// [`START_LIMIT`] ([`LabError::NotReady`]), each with a log tail.
    pub async fn start(work_dir: &Path) -> Result<ControlPlane, LabError> {
        let bin_dir = Self::bin_dir_from_env().ok_or(LabError::K8sBinDirUnset)?;
        Self::start_with(&bin_dir, work_dir).await
    }

    /// [`ControlPlane::start`] with the binaries of `bin_dir`.
    ///
    /// # Errors
    /// As [`ControlPlane::start`], except the unset variable.
    pub async fn start_with(bin_dir: &Path, work_dir: &Path) -> Result<ControlPlane, LabError> {
        let begun = Instant::now();
        let deadline = begun + START_LIMIT;
        let bin = |name: &str| bin_dir.join(name);
        for name in BINARIES {
            if !bin(name).is_file() {
                return Err(LabError::MissingK8sBinary { path: bin(name) });
            }
        }
        let work_dir = std::path::absolute(work_dir)
            .map_err(LabError::io(format!("resolving {}", work_dir.display())))?;
        let layout = Layout::new(&work_dir);
        layout.prepare()?;

        let ports = free_ports(5)?;
        let (etcd_port, peer_port, port, cm_port, sched_port) =
            (ports[0], ports[1], ports[2], ports[3], ports[4]);
        generate_sa_key(&layout.sa_key, &layout.sa_pub).await?;
        let tokens = new_tokens();
        write_private(&layout.tokens, token_file(&tokens).as_bytes())?;
        write_file(&layout.stages, KWOK_STAGES.as_bytes())?;

        let mut plane = ControlPlane {
            work_dir: work_dir.clone(),
            port,
            ca_pem: layout.pki.join("ca.pem"),
            kubeconfig_dir: layout.kubeconfigs.clone(),
            admin_kubeconfig: layout.kubeconfig(ADMIN_USER),
            tokens,
            components: Vec::new(),
            started_in: Duration::ZERO,
        };

        // etcd
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = args(&[
            ("--name", "lab"),
            ("--data-dir", &layout.etcd_data.to_string_lossy()),
            ("--listen-client-urls", &etcd_url),
            ("--advertise-client-urls", &etcd_url),
            ("--listen-peer-urls", &peer_url),
            ("--initial-advertise-peer-urls", &peer_url),
            ("--initial-cluster", &format!("lab={peer_url}")),
            ("--unsafe-no-fsync", "true"),
        ]);
        plane.spawn("etcd", &bin("etcd"), &etcd_args, &work_dir)?;
        plane
            .wait_for("etcd /health", deadline, "etcd", || async {
                match super::http_get_status(etcd_port, "/health").await {
                    Ok(200) => Ok(Some(())),
                    Ok(code) => Err(format!("HTTP {code}")),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await?;

        // kube-apiserver
        let apiserver_args = args(&[
            ("--etcd-servers", &etcd_url),
            ("--bind-address", "127.0.0.1"),
            ("--advertise-address", "127.0.0.1"),
            ("--secure-port", &port.to_string()),
            ("--endpoint-reconciler-type", "none"),
            ("--cert-dir", &layout.serving.to_string_lossy()),
            ("--service-account-issuer", SERVICE_ACCOUNT_ISSUER),
            (
                "--service-account-key-file",
                &layout.sa_pub.to_string_lossy(),
            ),
            (
                "--service-account-signing-key-file",
                &layout.sa_key.to_string_lossy(),
            ),
            ("--service-cluster-ip-range", "10.0.0.0/24"),
            ("--authorization-mode", "Node,RBAC"),
            ("--token-auth-file", &layout.tokens.to_string_lossy()),
            ("--disable-admission-plugins", "ServiceAccount"),
            ("--allow-privileged", "true"),
        ]);
        plane.spawn(
            "kube-apiserver",
            &bin("kube-apiserver"),
            &apiserver_args,
            &work_dir,
        )?;
        let serving_key = layout.serving.join("apiserver.key");
        let serving_crt = layout.serving.join("apiserver.crt");
        // The serving certificate is written before its key: once the key is
        // there, the certificate file is complete.
        let ca = plane
            .wait_for(
                "kube-apiserver serving certificate",
                deadline,
                "kube-apiserver",
                || async {
                    if !serving_key.is_file() {
                        return Err(format!("no {}", serving_key.display()));
                    }
                    let pem = fs::read_to_string(&serving_crt).map_err(|e| e.to_string())?;
                    last_certificate(&pem)
                        .map(Some)
                        .ok_or_else(|| format!("no certificate in {}", serving_crt.display()))
                },
            )
            .await?;
        write_file(&plane.ca_pem, ca.as_bytes())?;
        plane.write_kubeconfigs()?;
        // /readyz over a bare TLS connection: kube's client logs every 5xx
        // (what /readyz answers while starting) as an error.
        let tls = tls_connector(&ca)?;
        let admin_token = plane.token(ADMIN_USER)?.to_owned();
        plane
            .wait_for(
                "kube-apiserver /readyz",
                deadline,
                "kube-apiserver",
                || async {
                    match timeout(
                        PROBE_TIMEOUT,
                        https_get(&tls, port, "/readyz", &admin_token),
                    )
                    .await
                    {
                        Ok(Ok((200, _))) => Ok(Some(())),
                        Ok(Ok((code, body))) => {
                            Err(format!("HTTP {code}: {}", failed_checks(&body)))
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                    }
                },
            )
            .await?;
        let admin = client_from_kubeconfig(&plane.admin_kubeconfig).await?;

        // controller-manager, scheduler, kwok
        let cm_args = args(&[
            (
                "--kubeconfig",
                &layout
                    .kubeconfig("kube-controller-manager")
                    .to_string_lossy(),
            ),
            ("--leader-elect", "false"),
            ("--bind-address", "127.0.0.1"),
            ("--secure-port", &cm_port.to_string()),
            ("--authentication-skip-lookup", "true"),
            (
                "--service-account-private-key-file",
                &layout.sa_key.to_string_lossy(),
            ),
            ("--root-ca-file", &plane.ca_pem.to_string_lossy()),
            ("--use-service-account-credentials", "false"),
            ("--controllers", &CONTROLLERS.join(",")),
        ]);
        plane.spawn(
            "kube-controller-manager",
            &bin("kube-controller-manager"),
            &cm_args,
            &work_dir,
        )?;
        let sched_args = args(&[
            (
                "--kubeconfig",
                &layout.kubeconfig("kube-scheduler").to_string_lossy(),
            ),
            ("--leader-elect", "false"),
            ("--bind-address", "127.0.0.1"),
            ("--secure-port", &sched_port.to_string()),
            ("--authentication-skip-lookup", "true"),
        ]);
        plane.spawn(
            "kube-scheduler",
            &bin("kube-scheduler"),
            &sched_args,
            &work_dir,
        )?;
        let kwok_args = args(&[
            ("--kubeconfig", &layout.kubeconfig("kwok").to_string_lossy()),
            ("--manage-all-nodes", "true"),
            ("--cidr", KWOK_CIDR),
            ("--node-ip", KWOK_NODE_IP),
            ("--node-lease-duration-seconds", "40"),
            ("--config", &layout.stages.to_string_lossy()),
        ]);
        plane.spawn("kwok", &bin("kwok"), &kwok_args, &work_dir)?;

        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
        plane
            .wait_for(
                "ServiceAccount default/default (kube-controller-manager)",
                deadline,
                "kube-controller-manager",
                || async {
                    match timeout(PROBE_TIMEOUT, sas.get_opt("default")).await {
                        Ok(Ok(Some(_))) => Ok(Some(())),
                        Ok(Ok(None)) => Err("not created yet".into()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                    }
                },
            )
            .await?;
        plane.create_node_until(FIRST_NODE, deadline).await?;
        plane.started_in = begun.elapsed();
        Ok(plane)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA of the API server's serving certificate (PEM), for clients.
    pub fn ca_pem(&self) -> &Path {
        &self.ca_pem
    }

    /// A kubeconfig for [`ADMIN_USER`] (`system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The work directory (files and logs, see the module docs).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// How long [`ControlPlane::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// `(process, log file)` of every process, in start order.
    pub fn logs(&self) -> Vec<(&'static str, &Path)> {
        self.components
            .iter()
            .map(|c| (c.name, c.log.as_path()))
            .collect()
    }

    /// `(process, resident memory in bytes)` of every process, in start
    /// order (0 for one that is gone).
    pub fn resident_memory(&self) -> Vec<(&'static str, u64)> {
        self.components
            .iter()
            .map(|c| (c.name, c.rss_bytes()))
            .collect()
    }

    /// Ok while every process of the plane runs.
    ///
    /// # Errors
    /// [`LabError::Exited`] for the first process found gone, with its log
    /// tail.
    pub fn check_running(&self) -> Result<(), LabError> {
        self.components.iter().try_for_each(Component::check)
    }

    /// An admin client (`system:masters`), with `default_retry = false`.
    ///
    /// # Panics
    /// When the lab's own kubeconfig cannot make a client (a broken lab).
    pub async fn admin_client(&self) -> kube::Client {
        client_from_kubeconfig(&self.admin_kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("admin client of the lab: {e}"))
    }

    /// The kubeconfig of the static-token user `user`, one of [`USERS`]
    /// (username and group both `user`; no permissions until RBAC grants
    /// some).
    ///
    /// # Panics
    /// When `user` is not one of [`USERS`] (the token file is fixed at
    /// start).
    pub fn user_kubeconfig(&self, user: &str) -> PathBuf {
        assert!(
            USERS.contains(&user),
            "no static user {user:?} in the lab; the users are {USERS:?}"
        );
        self.kubeconfig_path(user)
    }

    /// A client for `user` (see [`ControlPlane::user_kubeconfig`]), with
    /// `default_retry = false`.
    ///
    /// # Panics
    /// When `user` is not one of [`USERS`], or the kubeconfig cannot make a
    /// client.
    pub async fn user_client(&self, user: &str) -> kube::Client {
        let path = self.user_kubeconfig(user);
        client_from_kubeconfig(&path)
            .await
            .unwrap_or_else(|e| panic!("client of lab user {user}: {e}"))
    }

    /// A kubeconfig for the ServiceAccount `ns/sa`, with a token obtained
    /// through TokenRequest (default audience: [`SERVICE_ACCOUNT_ISSUER`];
    /// valid 24 h). Written to `kubeconfigs/sa-<ns>-<sa>.kubeconfig`.
    ///
    /// # Errors
    /// [`LabError::Kube`] (e.g. 404 when the ServiceAccount does not exist),
    /// file errors.
    pub async fn service_account_kubeconfig(
        &self,
        ns: &str,
        sa: &str,
    ) -> Result<PathBuf, LabError> {
        let admin = client_from_kubeconfig(&self.admin_kubeconfig).await?;
        let api: Api<ServiceAccount> = Api::namespaced(admin, ns);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(SA_TOKEN_SECONDS),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let what = format!("TokenRequest for ServiceAccount {ns}/{sa}");
        let answer = timeout(
            PROBE_TIMEOUT,
            api.create_token_request(sa, &PostParams::default(), &request),
        )
        .await
        .map_err(|_| LabError::Timeout {
            what: what.clone(),
            limit: PROBE_TIMEOUT,
        })?
        .map_err(LabError::kube(what.clone()))?;
        let token = answer
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| LabError::State(format!("{what}: no token in the answer")))?;
        let path = self.kubeconfig_path(&format!("sa-{ns}-{sa}"));
        let user = format!("system:serviceaccount:{ns}:{sa}");
        write_private(&path, self.kubeconfig_text(&user, &token, ns).as_bytes())?;
        Ok(path)
    }

    /// `kubectl --kubeconfig <admin> --request-timeout 20s`, to which callers
    /// add arguments. Tests and scripts only; bound its run yourself.
    pub fn kubectl(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .arg("--request-timeout")
            .arg(KUBECTL_REQUEST_TIMEOUT);
        cmd
    }

    /// Creates the node `name` (kwok makes it Ready; an existing node is
    /// kept) and waits until it is Ready and no longer tainted not-ready
    /// (pods can be scheduled on it), within [`WAIT_LIMIT`].
    ///
    /// # Errors
    /// [`LabError::Kube`] when the API refuses the node,
    /// [`LabError::NotReady`] with kwok's log tail.
    pub async fn create_node(&self, name: &str) -> Result<(), LabError> {
        self.create_node_until(name, Instant::now() + WAIT_LIMIT)
            .await
    }

    /// Waits until the Deployment `ns/name` has rolled out `replicas` pods
    /// that are all updated, Ready and available (and no others), within
    /// `within`.
    ///
    /// # Errors
    /// [`LabError::NotReady`] with the last status seen and the
    /// controller-manager's log tail; [`LabError::Exited`] when a process of
    /// the plane is gone.
    pub async fn wait_deployment_ready(
        &self,
        ns: &str,
        name: &str,
        replicas: i32,
        within: Duration,
    ) -> Result<(), LabError> {
        let api: Api<Deployment> = Api::namespaced(self.admin_client().await, ns);
        let what = format!("Deployment {ns}/{name} with {replicas} Ready replicas");
        self.wait_for(&what, Instant::now() + within, "kube-controller-manager", || async {
            let d = match timeout(PROBE_TIMEOUT, api.get_opt(name)).await {
                Ok(Ok(Some(d))) => d,
                Ok(Ok(None)) => return Err("no such Deployment".into()),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            };
            let generation = d.metadata.generation.unwrap_or_default();
            let s = d.status.unwrap_or_default();
            let counts = [
                s.replicas,
                s.updated_replicas,
                s.ready_replicas,
                s.available_replicas,
            ];
            if s.observed_generation.unwrap_or_default() >= generation
                && counts.iter().all(|c| c.unwrap_or_default() == replicas)
            {
                Ok(Some(()))
            } else {
                Err(format!(
                    "generation {generation} observed {:?}; replicas {:?} updated {:?} ready {:?} available {:?}",
                    s.observed_generation, counts[0], counts[1], counts[2], counts[3]
                ))
            }
        })
        .await
    }

    /// `kubectl apply -f -` of `yaml` as the admin, bounded by
    /// [`KUBECTL_TIMEOUT`].
    ///
    /// # Errors
    /// [`LabError::Command`] with kubectl's output when it fails,
    /// [`LabError::Timeout`], spawn errors.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<(), LabError> {
        let what = "kubectl apply -f -";
        let mut child = Command::from(self.kubectl())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(LabError::io("spawning kubectl (is it installed?)"))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| LabError::State("kubectl has no stdin".into()))?;
        let run = async {
            stdin.write_all(yaml.as_bytes()).await?;
            drop(stdin);
            child.wait_with_output().await
        };
        let out = timeout(KUBECTL_TIMEOUT, run)
            .await
            .map_err(|_| LabError::Timeout {
                what: what.into(),
                limit: KUBECTL_TIMEOUT,
            })?
            .map_err(LabError::io(what))?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: what.into(),
                status: out.status.to_string(),
                output: super::output_text(&out),
            });
        }
        Ok(())
    }

    // --- internals ---

    fn spawn(
        &mut self,
        name: &'static str,
        bin: &Path,
        args: &[String],
        work_dir: &Path,
    ) -> Result<(), LabError> {
        let log = work_dir.join(format!("{name}.log"));
        // A fresh log per start: the tails quoted in errors are this run's.
        let _ = fs::remove_file(&log);
        self.components
            .push(Component::spawn(name, bin, args, log)?);
        Ok(())
    }

    fn token(&self, user: &str) -> Result<&str, LabError> {
        self.tokens
            .get(user)
            .map(String::as_str)
            .ok_or_else(|| LabError::State(format!("no token for {user} (a broken lab invariant)")))
    }

    fn kubeconfig_path(&self, name: &str) -> PathBuf {
        self.kubeconfig_dir.join(format!("{name}.kubeconfig"))
    }

    /// A kubeconfig (JSON, which every client reads as YAML) for a bearer
    /// token.
    fn kubeconfig_text(&self, user: &str, token: &str, namespace: &str) -> String {
        kubeconfig_json(&self.server_url(), &self.ca_pem, user, token, namespace)
    }

    /// One kubeconfig per static user and component.
    fn write_kubeconfigs(&self) -> Result<(), LabError> {
        let files = std::iter::once((ADMIN_USER, ADMIN_USER))
            .chain(USERS.iter().map(|u| (*u, *u)))
            .chain(COMPONENT_USERS);
        for (user, file) in files {
            let token = self.token(user)?;
            write_private(
                &self.kubeconfig_path(file),
                self.kubeconfig_text(user, token, "default").as_bytes(),
            )?;
        }
        Ok(())
    }

    /// The log of the component `name` (the work directory when unknown).
    fn log_of(&self, name: &str) -> PathBuf {
        self.components
            .iter()
            .find(|c| c.name == name)
            .map_or_else(|| self.work_dir.clone(), |c| c.log.clone())
    }

    /// Polls `probe` until it returns `Ok(Some(_))`, every process of the
    /// plane still running, until `deadline`. `Err(note)` and `Ok(None)`
    /// mean "not yet"; the last note goes into the timeout error, with the
    /// log of `log_of`.
    async fn wait_for<T, F, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        log_of: &str,
        mut probe: F,
    ) -> Result<T, LabError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, String>>,
    {
        let begun = Instant::now();
        let mut last = String::new();
        loop {
            self.check_running()?;
            match probe().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(note) => last = note,
            }
            if Instant::now() >= deadline {
                let what = if last.is_empty() {
                    format!("{what} not reached")
                } else {
                    format!("{what} not reached (last: {last})")
                };
                return Err(LabError::not_ready(
                    what,
                    begun.elapsed(),
                    &self.log_of(log_of),
                ));
            }
            sleep(POLL).await;
        }
    }

    async fn create_node_until(&self, name: &str, deadline: Instant) -> Result<(), LabError> {
        let api: Api<Node> = Api::all(client_from_kubeconfig(&self.admin_kubeconfig).await?);
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                },
                "annotations": {
                    "kwok.x-k8s.io/node": "fake",
                    "node.alpha.kubernetes.io/ttl": "0",
                },
            },
        }))
        .map_err(|e| LabError::State(format!("node object for {name}: {e}")))?;
        let what = format!("creating node {name}");
        match timeout(PROBE_TIMEOUT, api.create(&PostParams::default(), &node)).await {
            Ok(Ok(_)) => {}
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {}
            Ok(Err(e)) => return Err(LabError::kube(what)(e)),
            Err(_) => {
                return Err(LabError::Timeout {
                    what,
                    limit: PROBE_TIMEOUT,
                });
            }
        }
        let what = format!("node {name} Ready (kwok) and schedulable (node lifecycle)");
        self.wait_for(&what, deadline, "kwok", || async {
            let node = match timeout(PROBE_TIMEOUT, api.get_opt(name)).await {
                Ok(Ok(Some(n))) => n,
                Ok(Ok(None)) => return Err("node gone".into()),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            };
            let tainted = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == NOT_READY_TAINT));
            let ready = node
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status);
            match ready.as_deref() {
                Some("True") if !tainted => Ok(Some(())),
                Some("True") => Err(format!("Ready but still tainted {NOT_READY_TAINT}")),
                other => Err(format!("Ready condition {other:?}")),
            }
        })
        .await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in self.components.iter().rev() {
            c.kill_blocking();
        }
    }
}

// === helpers ===

/// A kube client from a kubeconfig file, with `default_retry = false`: a
/// 429 (e.g. a PodDisruptionBudget refusing an eviction) comes back at once.
///
/// # Errors
/// [`LabError::Kubeconfig`] when the file is unreadable or the client cannot
/// be built.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, LabError> {
    let err = |reason: String| LabError::Kubeconfig {
        path: path.to_path_buf(),
        reason,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?;
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// The files of a plane below its work directory.
struct Layout {
    etcd_data: PathBuf,
    pki: PathBuf,
    serving: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
    tokens: PathBuf,
    stages: PathBuf,
    kubeconfigs: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        let pki = dir.join("pki");
        Self {
            etcd_data: dir.join("etcd"),
            serving: pki.join("serving"),
            sa_key: pki.join("sa.key"),
            sa_pub: pki.join("sa.pub"),
            pki,
            tokens: dir.join("tokens.csv"),
            stages: dir.join("kwok-stages.yaml"),
            kubeconfigs: dir.join("kubeconfigs"),
        }
    }

    fn kubeconfig(&self, name: &str) -> PathBuf {
        self.kubeconfigs.join(format!("{name}.kubeconfig"))
    }

    /// Kills processes left on this folder's files by an owner that was
    /// itself killed, wipes the previous cluster state, creates the folders.
    fn prepare(&self) -> Result<(), LabError> {
        let mut stale = pids_with_arg(&self.etcd_data);
        stale.extend(pids_with_arg(&self.tokens));
        for name in ["kube-controller-manager", "kube-scheduler", "kwok"] {
            stale.extend(pids_with_arg(&self.kubeconfig(name)));
        }
        for pid in stale {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for dir in [&self.etcd_data, &self.pki, &self.kubeconfigs] {
            match fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LabError::Io {
                        what: format!("removing {}", dir.display()),
                        source: e,
                    });
                }
            }
        }
        for dir in [&self.serving, &self.kubeconfigs] {
            fs::create_dir_all(dir).map_err(LabError::io(format!("creating {}", dir.display())))?;
        }
        // etcd insists on 0700 for its data directory.
        make_private_dir(&self.etcd_data)
    }
}

fn make_private_dir(path: &Path) -> Result<(), LabError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(LabError::io(format!("creating {}", path.display())))
}

/// Writes a file readable by its owner only (tokens, keys).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), LabError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let what = || format!("writing {}", path.display());
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(LabError::io(what()))?;
    f.write_all(contents).map_err(LabError::io(what()))
}

/// `--flag value` pairs as separate arguments, so that a path is an
/// argument of its own (which [`pids_with_arg`] finds); booleans as
/// `--flag=value`, the only form Go's flag packages read for them.
fn args(pairs: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::with_capacity(pairs.len() * 2);
    for (flag, value) in pairs {
        if matches!(*value, "true" | "false") {
            out.push(format!("{flag}={value}"));
        } else {
            out.push((*flag).to_owned());
            out.push((*value).to_owned());
        }
    }
    out
}

/// A random bearer token per static user and component.
fn new_tokens() -> BTreeMap<String, String> {
    std::iter::once(ADMIN_USER)
        .chain(USERS)
        .chain(COMPONENT_USERS.iter().map(|(u, _)| *u))
        .map(|u| {
            let token = uuid::Uuid::now_v7().simple().to_string();
            (u.to_owned(), token)
        })
        .collect()
}

/// `--token-auth-file` lines: `token,user,uid,"groups"`.
fn token_file(tokens: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (user, token) in tokens {
        let group = if user == ADMIN_USER || COMPONENT_USERS.iter().any(|(u, _)| u == user) {
            "system:masters"
        } else {
            user.as_str()
        };
        let _ = writeln!(out, "{token},{user},{user},\"{group}\"");
    }
    out
}

fn kubeconfig_json(server: &str, ca: &Path, user: &str, token: &str, namespace: &str) -> String {
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "spire-lab",
            "cluster": { "server": server, "certificate-authority": ca },
        }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{
            "name": "spire-lab",
            "context": { "cluster": "spire-lab", "user": user, "namespace": namespace },
        }],
        "current-context": "spire-lab",
    });
    format!("{v:#}\n")
}

/// The last PEM certificate of a bundle: the CA in the API server's
/// self-signed `apiserver.crt` (serving certificate, then its CA).
fn last_certificate(pem: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.rfind(BEGIN)?;
    let len = pem[start..].find(END)? + END.len();
    Some(format!("{}\n", &pem[start..start + len]))
}

/// A TLS connector trusting only the PEM certificate `ca`.
fn tls_connector(ca: &str) -> Result<tokio_rustls::TlsConnector, LabError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let bad = |e: String| LabError::State(format!("the API server's CA: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots
            .add(der.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// `GET path` (HTTP/1.0, bearer `token`) on https://127.0.0.1:`port`;
/// returns the status code and the body.
async fn https_get(
    tls: &tokio_rustls::TlsConnector,
    port: u16,
    path: &str,
    token: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::AsyncReadExt as _;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut stream = tls.connect(name, tcp).await?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    // The server may close without close_notify after an HTTP/1.0 answer.
    match stream.read_to_end(&mut buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_owned()))
}

/// The failing checks of a `/readyz` answer (`[-]name failed: …` lines).
fn failed_checks(body: &str) -> String {
    let failed: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("[-]"))
        .map(|l| l.split_whitespace().next().unwrap_or(l))
        .collect();
    if failed.is_empty() {
        body.trim().chars().take(200).collect()
    } else {
        format!("failing {}", failed.join(", "))
    }
}

/// An RSA key pair for ServiceAccount tokens (`openssl genrsa`, then the
/// public half).
async fn generate_sa_key(key: &Path, public: &Path) -> Result<(), LabError> {
    let openssl = Path::new("openssl");
    let limit = Duration::from_secs(30);
    let runs = [
        vec![
            "genrsa".to_owned(),
            "-out".into(),
            path_arg(key),
            "2048".into(),
        ],
        vec![
            "rsa".to_owned(),
            "-in".into(),
            path_arg(key),
            "-pubout".into(),
            "-out".into(),
            path_arg(public),
        ],
    ];
    for argv in runs {
        let out = super::run_bounded(openssl, &argv, limit).await?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("openssl {}", argv.join(" ")),
                status: out.status.to_string(),
                output: super::output_text(&out),
            });
        }
    }
    Ok(())
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests;
