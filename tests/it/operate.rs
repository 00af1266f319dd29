//! Operating spire-healer safely, on real SPIRE, through the real binary's
//! CLI: a disruptive step that needs approval waits, is refused to a
//! read-only SPIFFE ID and approved over mTLS by an operator SPIFFE ID that
//! SPIRE issued; a pause during a fault holds every action and resume heals
//! it; a step that keeps failing verification is demoted and the ladder
//! moves on.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use spire_healer::policy::DEFAULT_POLICY;

use crate::helpers::Healer;
use crate::spire_lab::{LabOptions, SpireLab};

/// Uids the operator's and the reader's SVIDs are issued to (`unix:uid`
/// selectors); the tests run as root and fetch as these.
const OPERATOR_UID: u32 = 64_101;
const READER_UID: u32 = 64_102;

fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A lab with our entry and, when `people`, an operator's and a reader's.
async fn lab(people: bool) -> Result<SpireLab> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    lab.register_entry("/healer", own_uid(), 300).await?;
    if people {
        lab.register_entry("/ops/operator", OPERATOR_UID, 300)
            .await?;
        lab.register_entry("/ops/reader", READER_UID, 300).await?;
    }
    lab.wait_for_entry_synced("/healer").await?;
    if people {
        lab.wait_for_entry_synced("/ops/operator").await?;
        lab.wait_for_entry_synced("/ops/reader").await?;
    }
    Ok(lab)
}

/// The built-in policy with `edit` applied to its text.
fn policy_file(dir: &Path, edit: impl FnOnce(String) -> String) -> Result<PathBuf> {
    let path = dir.join("policy.toml");
    std::fs::write(&path, edit(DEFAULT_POLICY.to_string()))?;
    Ok(path)
}

/// Lets other uids reach the agent's Workload API socket (the lab's
/// directories are private to us).
fn open_path_to(socket: &Path) -> Result<()> {
    let mut dir = socket.parent();
    while let Some(d) = dir {
        if d == Path::new("/") || d == std::env::temp_dir() {
            break;
        }
        let mode = std::fs::metadata(d)?.permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o711))?;
        dir = d.parent();
    }
    Ok(())
}

/// The SVID files SPIRE hands `uid` (`spire-agent api fetch x509 -write`):
/// (chain, key, bundle).
async fn svid_files(lab: &SpireLab, uid: u32, dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(lab.agent_bin())
            .args(["api", "fetch", "x509", "-socketPath"])
            .arg(lab.workload_socket())
            .arg("-write")
            .arg(dir)
            .uid(uid)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("spire-agent api fetch x509 timed out")??;
    ensure!(
        out.status.success(),
        "fetch as uid {uid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        dir.join("svid.0.pem"),
        dir.join("svid.0.key"),
        dir.join("bundle.0.pem"),
    ))
}

/// Runs the CLI with `args`; returns its output.
async fn cli(args: &[&str]) -> Result<Output> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("CLI timed out")??;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// CLI arguments reaching the mTLS listener as the holder of `files`.
fn over_tls(addr: &str, files: &(PathBuf, PathBuf, PathBuf)) -> Vec<String> {
    vec![
        "--addr".into(),
        addr.into(),
        "--svid".into(),
        files.0.display().to_string(),
        "--svid-key".into(),
        files.1.display().to_string(),
        "--bundle".into(),
        files.2.display().to_string(),
    ]
}

async fn cli_as(who: &[String], cmd: &[&str]) -> Result<Output> {
    let mut args: Vec<&str> = cmd.to_vec();
    args.extend(who.iter().map(String::as_str));
    cli(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_waits_is_refused_to_a_reader_and_granted_over_mtls_by_an_operator()
-> Result<()> {
    let lab = lab(true).await?;
    open_path_to(&lab.workload_socket())?;
    let files = tempfile::tempdir()?;
    let operator = svid_files(&lab, OPERATOR_UID, &files.path().join("operator")).await?;
    let reader = svid_files(&lab, READER_UID, &files.path().join("reader")).await?;
    let policy = policy_file(files.path(), |p| {
        p.replace(
            "[[ladders.agent_unreachable]]\nactuator = \"restart-agent\"\n",
            "[[ladders.agent_unreachable]]\nactuator = \"restart-agent\"\napproval = \"required\"\n",
        )
    })?;
    ensure!(std::fs::read_to_string(&policy)?.contains("approval = \"required\""));
    let socket = files.path().join("api.sock");
    let extra = format!(
        r#"
[api]
socket = "{socket}"

[api.tcp]
listen = "127.0.0.1:0"
workload_api = "unix://{workload}"
spiffe_id = "{healer}"

[api.authz]
operators = ["{op}"]
readers = ["{ro}"]
"#,
        socket = socket.display(),
        workload = lab.workload_socket().display(),
        healer = lab.spiffe_id("/healer"),
        op = lab.spiffe_id("/ops/operator"),
        ro = lab.spiffe_id("/ops/reader"),
    );
    let top = format!("policy_file = \"{}\"", policy.display());
    let healer = Healer::start_with(&lab, None, &top, &extra).await?;
    let addr = format!("tcp://{}", healer.api_tcp_addr.context("mTLS listener")?);
    let as_operator = over_tls(&addr, &operator);
    let as_reader = over_tls(&addr, &reader);

    let (incident, _) = healer
        .kill_agent_and_wait_open(&lab, Duration::from_secs(15))
        .await?;
    // refetch runs (gentle) and fails; the restart waits for a person.
    let approval = healer
        .wait_for("a pending approval", Duration::from_secs(30), || async {
            let out = cli_as(&as_reader, &["approvals", "--pending", "-o", "json"])
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            v["approvals"].as_array()?.first().cloned()
        })
        .await?;
    let id = approval["id"].as_str().context("approval id")?.to_string();
    assert_eq!(approval["incident_id"], incident.id.as_str());
    assert_eq!(approval["actuator"], "restart-agent");
    // Nothing restarts while it waits.
    healer.wait_ticks(8).await?;
    assert!(
        healer
            .actions()
            .await
            .iter()
            .all(|a| a.actuator != "restart-agent"),
        "the restart waited for approval"
    );

    // A read-only ID may look but not approve; its refusal changes nothing.
    let refused = cli_as(&as_reader, &["approve", &id]).await?;
    assert_eq!(refused.status.code(), Some(77), "{}", text(&refused));
    assert!(
        healer.metric(r#"spire_healer_api_denied_total{method="approve",reason="role"}"#) >= 1.0
    );

    // The operator approves over mTLS: the restart runs and heals.
    let approved = cli_as(&as_operator, &["approve", &id, "--comment", "go"]).await?;
    assert_eq!(approved.status.code(), Some(0), "{}", text(&approved));
    // Approving again says who did it first.
    let twice = cli_as(&as_operator, &["approve", &id]).await?;
    assert_eq!(twice.status.code(), Some(65), "{}", text(&twice));
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains(&lab.spiffe_id("/ops/operator")),
        "{}",
        text(&twice)
    );
    healer
        .wait_closed(&incident.id, Duration::from_secs(60))
        .await?;
    let restart = healer
        .wait_for("the restart verified", Duration::from_secs(30), || async {
            healer.actions().await.into_iter().find(|a| {
                a.incident_id == incident.id
                    && a.actuator == "restart-agent"
                    && a.verification.is_some()
            })
        })
        .await?;
    assert_eq!(restart.params["approval_id"], id.as_str());
    assert_eq!(restart.verification.as_deref(), Some("verified"));
    assert!(lab.agent_pid().is_some(), "the agent runs again");

    // The audit names the operator.
    let audit = cli(&[
        "audit",
        "--addr",
        &format!("unix://{}", socket.display()),
        "-o",
        "json",
    ])
    .await?;
    assert_eq!(audit.status.code(), Some(0), "{}", text(&audit));
    let rows: Value = serde_json::from_slice(&audit.stdout)?;
    let rows = rows["entries"].as_array().context("audit rows")?;
    let approved_row = rows
        .iter()
        .find(|r| r["kind"] == "approved")
        .context("an approved row")?;
    assert_eq!(
        approved_row["actor"],
        lab.spiffe_id("/ops/operator").as_str()
    );
    for kind in ["pending", "acted"] {
        ensure!(
            rows.iter().any(|r| r["kind"] == kind),
            "no {kind} row in {rows:#?}"
        );
    }
    healer.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_during_a_fault_holds_every_action_and_resume_heals_it() -> Result<()> {
    let lab = lab(false).await?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("api.sock");
    let extra = format!("\n[api]\nsocket = \"{}\"\n", socket.display());
    let healer = Healer::start_with(&lab, None, "", &extra).await?;
    let addr = format!("unix://{}", socket.display());

    let paused = cli(&["pause", "--reason", "change freeze", "--addr", &addr]).await?;
    assert_eq!(paused.status.code(), Some(0), "{}", text(&paused));
    let (incident, _) = healer
        .kill_agent_and_wait_open(&lab, Duration::from_secs(15))
        .await?;
    healer
        .wait_for("a paused hold", Duration::from_secs(10), || async {
            let holds = healer
                .store
                .holds(&spire_healer::knowledge::Query {
                    incident_id: Some(incident.id.clone()),
                    limit: 50,
                    ..Default::default()
                })
                .await
                .ok()?;
            holds.into_iter().find(|h| h.reason == "paused")
        })
        .await?;
    healer.wait_ticks(12).await?;
    assert!(
        healer
            .actions()
            .await
            .iter()
            .all(|a| a.incident_id != incident.id),
        "nothing ran while paused"
    );
    let status = cli(&["status", "--addr", &addr, "-o", "json"]).await?;
    let status: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(status["paused"], true, "{status:#}");
    assert_eq!(status["pause_reason"], "change freeze", "{status:#}");

    let resumed = cli(&["resume", "--addr", &addr]).await?;
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    healer
        .wait_closed(&incident.id, Duration::from_secs(60))
        .await?;
    assert!(lab.agent_pid().is_some(), "healed after resume");
    healer.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_keeps_failing_verification_is_demoted_and_the_ladder_moves_on() -> Result<()> {
    let lab = lab(false).await?;
    let dir = tempfile::tempdir()?;
    // A first rung that never helps (it runs and returns ok), before the
    // restart that does; demoted after two failed verifications.
    let policy = policy_file(dir.path(), |p| {
        let p = p.replace(
            "[[ladders.agent_unreachable]]\nactuator = \"refetch\"\ntimeout = \"5s\"\nverify_within = \"3s\"\n",
            "[[ladders.agent_unreachable]]\nactuator = \"noop\"\ntimeout = \"5s\"\nverify_within = \"2s\"\n",
        );
        p.replace("cooldown = \"20s\"", "cooldown = \"1s\"")
            .replace(
                "window = 5\nmin_success_ratio = 0.4",
                "window = 2\nmin_success_ratio = 0.5",
            )
    })?;
    let text_policy = std::fs::read_to_string(&policy)?;
    ensure!(
        text_policy.contains("actuator = \"noop\"") && text_policy.contains("window = 2\n"),
        "policy edited"
    );
    let top = format!("policy_file = \"{}\"", policy.display());
    let socket = dir.path().join("api.sock");
    let extra = format!(
        "\n[actuators.noop]\ntype = \"command\"\nargv = [\"/bin/true\"]\ntimeout = \"5s\"\n\n[api]\nsocket = \"{}\"\n",
        socket.display()
    );
    let healer = Healer::start_with(&lab, None, &top, &extra).await?;

    for round in 1..=2 {
        let (incident, _) = healer
            .kill_agent_and_wait_open(&lab, Duration::from_secs(15))
            .await?;
        healer
            .wait_closed(&incident.id, Duration::from_secs(60))
            .await
            .with_context(|| format!("round {round}"))?;
        lab.wait_agent_ready().await?;
    }
    let demoted = healer
        .wait_for("noop demoted", Duration::from_secs(10), || async {
            let out = cli(&[
                "status",
                "--addr",
                &format!("unix://{}", socket.display()),
                "-o",
                "json",
            ])
            .await
            .ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            let d = v["demoted"].as_array()?.first()?.clone();
            Some(d)
        })
        .await?;
    assert_eq!(demoted["actuator"], "noop");
    assert_eq!(demoted["symptom"], "agent_unreachable");

    // Third fault: the demoted step is passed over, the restart heals.
    let (incident, _) = healer
        .kill_agent_and_wait_open(&lab, Duration::from_secs(15))
        .await?;
    healer
        .wait_closed(&incident.id, Duration::from_secs(60))
        .await?;
    let actions: Vec<_> = healer
        .actions()
        .await
        .into_iter()
        .filter(|a| a.incident_id == incident.id)
        .collect();
    if actions.iter().any(|a| a.actuator == "noop") {
        bail!("the demoted step ran: {actions:#?}");
    }
    assert!(
        actions
            .iter()
            .any(|a| a.actuator == "restart-agent" && a.verification.as_deref() == Some("verified")),
        "{actions:#?}"
    );
    let holds = healer
        .store
        .holds(&spire_healer::knowledge::Query {
            incident_id: Some(incident.id.clone()),
            limit: 50,
            ..Default::default()
        })
        .await?;
    assert!(
        holds
            .iter()
            .any(|h| h.reason == "demoted" && h.actuator == "noop"),
        "{holds:#?}"
    );
    healer.stop().await;
    Ok(())
}
