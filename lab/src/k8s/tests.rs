//! Unit tests of the plane's files, and the control plane itself (skipped,
//! with a message, when `SPIRE_HEALER_K8S_BIN` is unset).

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{EvictParams, ListParams};

use super::*;

// --- files ---

#[test]
fn boolean_flags_take_the_equals_form_and_paths_stand_alone() {
    let argv = args(&[("--data-dir", "/x/etcd"), ("--leader-elect", "false")]);
    assert_eq!(argv, ["--data-dir", "/x/etcd", "--leader-elect=false"]);
}

#[test]
fn token_file_puts_admin_and_components_in_system_masters_only() {
    let tokens = new_tokens();
    assert_eq!(tokens.len(), 1 + USERS.len() + COMPONENT_USERS.len());
    let distinct: std::collections::BTreeSet<_> = tokens.values().collect();
    assert_eq!(distinct.len(), tokens.len(), "tokens are distinct");
    let text = token_file(&tokens);
    let line = |user: &str| {
        text.lines()
            .find(|l| l.split(',').nth(1) == Some(user))
            .unwrap_or_else(|| panic!("no line for {user} in {text}"))
            .to_owned()
    };
    assert!(line(ADMIN_USER).ends_with(",\"system:masters\""));
    assert!(line("kwok").ends_with(",\"system:masters\""));
    assert_eq!(
        line("spire-healer"),
        format!(
            "{},spire-healer,spire-healer,\"spire-healer\"",
            tokens["spire-healer"]
        )
    );
    assert!(!line("viewer").contains("system:masters"));
}

#[test]
fn the_ca_is_the_last_certificate_of_the_bundle() {
    let leaf = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
    let ca = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
    assert_eq!(
        last_certificate(&format!("{leaf}{ca}")).as_deref(),
        Some(ca)
    );
    assert_eq!(last_certificate(leaf).as_deref(), Some(leaf));
    assert_eq!(last_certificate("junk"), None);
    assert_eq!(last_certificate("-----BEGIN CERTIFICATE-----\ncut"), None);
}

#[test]
fn kubeconfigs_are_read_by_the_client() {
    let text = kubeconfig_json(
        "https://127.0.0.1:6443",
        Path::new("/lab/pki/ca.pem"),
        "spire-healer",
        "t0k3n",
        "default",
    );
    let kc = Kubeconfig::from_yaml(&text).unwrap();
    assert_eq!(kc.current_context.as_deref(), Some("spire-lab"));
    let cluster = kc.clusters[0].cluster.as_ref().unwrap();
    assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
    assert_eq!(
        cluster.certificate_authority.as_deref(),
        Some("/lab/pki/ca.pem")
    );
    assert_eq!(kc.auth_infos[0].name, "spire-healer");
}

#[test]
fn the_stages_cover_nodes_and_pods() {
    for stage in [
        "node-initialize",
        "node-heartbeat-with-lease",
        "pod-ready",
        "pod-complete",
        "pod-delete",
    ] {
        assert!(
            KWOK_STAGES.contains(&format!("name: {stage}\n")),
            "stage {stage} missing"
        );
    }
    assert_eq!(KWOK_STAGES.matches("kind: Stage\n").count(), 5);
}

#[tokio::test]
async fn start_without_binaries_names_the_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = match ControlPlane::start_with(dir.path(), &dir.path().join("plane")).await {
        Ok(_) => panic!("started without binaries"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), "missing_k8s_binary", "{err}");
    assert!(err.to_string().contains("install-k8s.sh"), "{err}");
}

#[tokio::test]
async fn a_process_that_exits_fails_the_start_with_its_log() {
    let Some(real) = ControlPlane::bin_dir_from_env() else {
        eprintln!("skipped: {K8S_BIN_ENV} is not set");
        return;
    };
    // The real binaries, but an etcd that fails at once.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    for name in BINARIES {
        std::os::unix::fs::symlink(real.join(name), bin.join(name)).unwrap();
    }
    fs::remove_file(bin.join("etcd")).unwrap();
    fs::write(
        bin.join("etcd"),
        "#!/bin/sh\necho 'etcd: broken on purpose' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(bin.join("etcd"), fs::Permissions::from_mode(0o755)).unwrap();

    let err = match ControlPlane::start_with(&bin, &dir.path().join("plane")).await {
        Ok(_) => panic!("started with a broken etcd"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), "exited", "{err}");
    let text = err.to_string();
    assert!(text.contains("etcd exited"), "{text}");
    assert!(text.contains("broken on purpose"), "{text}");
}

// --- the real control plane ---

/// Starts a plane in a fresh folder, or None (test skipped) without
/// binaries.
/// The folder comes first so that it is dropped after the plane.
async fn start_plane() -> Option<(tempfile::TempDir, ControlPlane)> {
    if ControlPlane::bin_dir_from_env().is_none() {
        eprintln!(
            "skipped: {K8S_BIN_ENV} is not set (run scripts/install-k8s.sh and set it to the \
             folder it prints last; scripts/test.sh does both)"
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path())
        .await
        .unwrap_or_else(|e| panic!("control plane did not start: {e}"));
    Some((dir, plane))
}

fn deployment_yaml(ns: &str, name: &str, replicas: i32) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: main
        image: registry.invalid/{name}:1
"#
    )
}

/// One plane, every scenario in turn (a plane costs ~600 MiB and a few CPU
/// seconds; the scenarios do not disturb each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_runs_deployments_rbac_and_pdb_evictions() {
    let Some((_dir, plane)) = start_plane().await else {
        return;
    };
    let rss: u64 = plane.resident_memory().iter().map(|(_, b)| b).sum();
    eprintln!(
        "control plane started in {:?}; resident memory {} MiB ({})",
        plane.started_in(),
        rss / (1 << 20),
        plane
            .resident_memory()
            .iter()
            .map(|(n, b)| format!("{n} {} MiB", b / (1 << 20)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(plane.server_url().starts_with("https://127.0.0.1:"));
    assert!(plane.started_in() <= START_LIMIT);

    nodes_become_ready(&plane).await;
    deployment_becomes_ready(&plane).await;
    rbac_grants_the_healer_user(&plane).await;
    service_account_token_works(&plane).await;
    pdb_blocks_eviction_with_429(&plane).await;
    kubectl_reaches_the_server(&plane).await;

    let rss: u64 = plane.resident_memory().iter().map(|(_, b)| b).sum();
    eprintln!(
        "resident memory after the scenarios: {} MiB",
        rss / (1 << 20)
    );
    plane.check_running().unwrap();

    // Dropping kills every process group at once (no 20-30 s SIGTERM wait).
    let leaders: Vec<i32> = plane.components.iter().map(|c| c.pgid).collect();
    assert_eq!(leaders.len(), BINARIES.len());
    let begun = Instant::now();
    drop(plane);
    eprintln!("dropped in {:?}", begun.elapsed());
    for pid in leaders {
        assert!(
            !super::super::process_alive(pid),
            "pid {pid} survived the drop"
        );
    }
}

async fn nodes_become_ready(plane: &ControlPlane) {
    plane.create_node("kwok-node-1").await.unwrap();
    // Idempotent.
    plane.create_node("kwok-node-1").await.unwrap();
    let nodes: Api<Node> = Api::all(plane.admin_client().await);
    let names: Vec<String> = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(names, [FIRST_NODE, "kwok-node-1"]);
}

async fn deployment_becomes_ready(plane: &ControlPlane) {
    let begun = Instant::now();
    plane
        .apply_yaml(&deployment_yaml("web", "web", 3))
        .await
        .unwrap();
    plane
        .wait_deployment_ready("web", "web", 3, Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!(
        "Deployment of 3 Ready in {:?} (kubectl apply included)",
        begun.elapsed()
    );
    let pods: Api<Pod> = Api::namespaced(plane.admin_client().await, "web");
    let pods = pods.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(pods.len(), 3);
    for p in &pods {
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.pod_ip.as_deref().unwrap().starts_with("10.244.0."));
        assert!(p.spec.as_ref().unwrap().node_name.is_some(), "scheduled");
    }
}

async fn rbac_grants_the_healer_user(plane: &ControlPlane) {
    let pods: Api<Pod> = Api::namespaced(plane.user_client("spire-healer").await, "web");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 before RBAC, got {other:?}"),
    }
    plane
        .apply_yaml(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: web}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: spire-healer-pod-reader, namespace: web}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: spire-healer}
"#,
        )
        .await
        .unwrap();
    // The authorizer sees RBAC objects through an informer: poll briefly.
    let listed = plane
        .wait_for(
            "spire-healer may list pods",
            Instant::now() + WAIT_LIMIT,
            "kube-apiserver",
            || async {
                match pods.list(&ListParams::default()).await {
                    Ok(list) => Ok(Some(list.items.len())),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(listed, 3);
    // Still nothing elsewhere, and the other users got nothing.
    let default_pods: Api<Pod> =
        Api::namespaced(plane.user_client("spire-healer").await, "default");
    assert!(matches!(
        default_pods.list(&ListParams::default()).await,
        Err(kube::Error::Api(s)) if s.code == 403
    ));
    let viewer: Api<Pod> = Api::namespaced(plane.user_client("viewer").await, "web");
    assert!(matches!(
        viewer.list(&ListParams::default()).await,
        Err(kube::Error::Api(s)) if s.code == 403
    ));
}

async fn service_account_token_works(plane: &ControlPlane) {
    plane
        .apply_yaml(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: healer, namespace: web}\n",
        )
        .await
        .unwrap();
    let kubeconfig = plane
        .service_account_kubeconfig("web", "healer")
        .await
        .unwrap();
    let client = client_from_kubeconfig(&kubeconfig).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "web");
    // Authenticated as the ServiceAccount (not anonymous): forbidden by
    // RBAC, with the ServiceAccount's name in the message.
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message.contains("system:serviceaccount:web:healer"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 403 for the ServiceAccount, got {other:?}"),
    }
    let missing = plane.service_account_kubeconfig("web", "nobody").await;
    assert_eq!(missing.unwrap_err().http_status(), Some(404));
}

async fn pdb_blocks_eviction_with_429(plane: &ControlPlane) {
    plane
        .apply_yaml(
            r#"
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: web, namespace: web}
spec:
  maxUnavailable: 0
  selector:
    matchLabels: {app: web}
"#,
        )
        .await
        .unwrap();
    let admin = plane.admin_client().await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), "web");
    plane
        .wait_for(
            "PDB web/web processed",
            Instant::now() + WAIT_LIMIT,
            "kube-controller-manager",
            || async {
                let pdb = pdbs.get("web").await.map_err(|e| e.to_string())?;
                let generation = pdb.metadata.generation.unwrap_or_default();
                let s = pdb.status.unwrap_or_default();
                let done = s.observed_generation.unwrap_or_default() >= generation
                    && s.current_healthy == Some(3)
                    && s.disruptions_allowed == Some(0);
                Ok(done.then_some(()))
            },
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin, "web");
    let victim = pods.list(&ListParams::default()).await.unwrap().items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    // Bounded well below kube's default retry schedule (minutes): the
    // client must hand the 429 back, not retry it.
    let begun = Instant::now();
    let answer = timeout(
        Duration::from_secs(20),
        pods.evict(&victim, &EvictParams::default()),
    )
    .await
    .expect("evict returned (no client-side retries)");
    let took = begun.elapsed();
    match answer {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 429, "{s:?}");
            eprintln!("evict {victim}: 429 in {took:?}: {}", s.message);
        }
        other => panic!("expected 429 from the PDB, got {other:?}"),
    }
    assert!(pods.get_opt(&victim).await.unwrap().is_some(), "pod kept");
}

async fn kubectl_reaches_the_server(plane: &ControlPlane) {
    let out = Command::from(plane.kubectl())
        .args(["get", "nodes", "-o", "name"])
        .output();
    let out = timeout(KUBECTL_TIMEOUT, out).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", super::super::output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node/kwok-node-0"), "{text}");
}
