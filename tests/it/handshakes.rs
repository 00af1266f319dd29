//! Issue 4 scenarios on real SPIRE: handshakes, served-versus-issued drift
//! and certificate files.
//!
//! a. A peer (`lab peer --on-hup ignore`) loads the real SVID files that
//!    `spire-lab svid-files` keeps rewriting, once, and never reloads. After a real
//!    rotation the probe sees it serve the old serial → `stale_served_cert`
//!    → `reload-peer` (SIGHUP, ignored: not verified) → `restart-peer`
//!    (command) → the probe sees the new serial → verified, closed. A second
//!    file writer that stopped after one write (`--once`,
//!    spiffe-helper#367) leaves its file behind → `stale_cert_file` →
//!    `restart-helper` restarts it → verified.
//! b. A peer serves a certificate from another trust domain's CA next to a
//!    healthy peer → an `unknown_ca` burst on that peer only, reported with
//!    its cause and held back (`no_local_cause`): nothing is restarted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use spire_healer::knowledge::{ActionRecord, IncidentRecord};

use crate::helpers::{AGENT, Healer};
use crate::lab_peer::{Workload, file_serial, published, wait_for};
use crate::spire_lab::{LabOptions, SpireLab};

/// Bound of each wait for a child (files written, address published, …).
const WAIT: Duration = Duration::from_secs(30);

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The built-in policy with `thresholds` overridden and ladders replaced.
fn policy(dir: &Path, thresholds: &[(&str, toml::Value)], ladders: &str) -> Result<PathBuf> {
    let builtin = include_str!("../../policies/default.toml");
    let mut p: toml::Table = builtin.parse()?;
    let th = p
        .get_mut("thresholds")
        .and_then(|t| t.as_table_mut())
        .context("thresholds table")?;
    for (k, v) in thresholds {
        th.insert((*k).to_string(), v.clone());
    }
    let extra: toml::Table = ladders.parse()?;
    let l = p
        .get_mut("ladders")
        .and_then(|t| t.as_table_mut())
        .context("ladders table")?;
    for (k, v) in extra {
        l.insert(k, v);
    }
    let path = dir.join("policy.toml");
    std::fs::write(&path, toml::to_string(&p)?)?;
    Ok(path)
}

fn s(v: &str) -> toml::Value {
    toml::Value::String(v.to_string())
}

/// A shell command that stops the process in `pidfile` (if any) and starts
/// `args` of our binary detached, waiting until `ready` exists.
fn restart_script(pidfile: &Path, ready: Option<&Path>, args: &[String], log: &Path) -> String {
    let bin = crate::spire_lab::lab_bin().display();
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let wait_ready = ready.map_or(String::new(), |r| {
        format!(
            "rm -f '{r}'; ( setsid '{bin}' {args} >>'{log}' 2>&1 </dev/null & ); \
             i=0; while [ ! -s '{r}' ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -s '{r}' ]",
            r = r.display(),
            args = quoted.join(" "),
            log = log.display(),
        )
    });
    let start = if ready.is_some() {
        wait_ready
    } else {
        format!(
            "( setsid '{bin}' {args} >>'{log}' 2>&1 </dev/null & echo $! >'{p}' )",
            args = quoted.join(" "),
            log = log.display(),
            p = pidfile.display(),
        )
    };
    format!(
        "p=$(cat '{pf}' 2>/dev/null); if [ -n \"$p\" ]; then kill -TERM \"$p\" 2>/dev/null; \
         i=0; while kill -0 \"$p\" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; fi; {start}",
        pf = pidfile.display(),
    )
}

/// Kills whatever the pidfile names (processes the restart scripts started).
fn kill_pidfile(pidfile: &Path) {
    if let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

async fn incident(healer: &Healer, symptom: &str, limit: Duration) -> Result<IncidentRecord> {
    healer
        .wait_for(&format!("{symptom} opened"), limit, || async {
            healer
                .incidents()
                .await
                .into_iter()
                .find(|i| i.symptom == symptom)
        })
        .await
}

/// The incident's actions, once every one has been judged.
async fn actions_of(healer: &Healer, incident: &str) -> Result<Vec<ActionRecord>> {
    healer
        .wait_for("actions verified", Duration::from_secs(30), || async {
            let mut a: Vec<ActionRecord> = healer
                .actions()
                .await
                .into_iter()
                .filter(|a| a.incident_id == incident)
                .collect();
            a.sort_by_key(|a| a.started_at_ms);
            a.iter().all(|a| a.verification.is_some()).then_some(a)
        })
        .await
}

/// a. Drift of a peer that never reloads, and a file writer that stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heals_a_peer_that_never_reloads_and_a_stuck_file_writer() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    lab.register_entry("/web", uid(), 30).await?;
    lab.wait_for_entry_synced("/web").await?;
    let id = lab.spiffe_id("/web");
    let work = tempfile::tempdir()?;
    let w = work.path();
    let path = |name: &str| w.join(name);
    let socket = format!("unix://{}", lab.workload_socket().display());
    for d in ["svid", "stuck"] {
        std::fs::create_dir(path(d))?;
    }
    let svid_dir = path("svid").display().to_string();
    let stuck_dir = path("stuck").display().to_string();

    // The file writer that keeps up, and one that stops after one write.
    let mut writer = Workload::spawn(
        "svid-files",
        w,
        &["svid-files", "--socket", &socket, "--dir", &svid_dir],
    )?;
    let stuck = Workload::spawn(
        "svid-files-once",
        w,
        &[
            "svid-files",
            "--socket",
            &socket,
            "--dir",
            &stuck_dir,
            "--once",
        ],
    )?;
    wait_for("the first SVID files", WAIT, &mut [&mut writer], || async {
        file_serial(&path("svid")).zip(file_serial(&path("stuck")))
    })
    .await?;
    let _ = stuck.stop().await;

    // The peer: loads the files once, ignores SIGHUP.
    let peer_sock = format!("unix://{}", path("peer.sock").display());
    let peer_args: Vec<String> = [
        "peer",
        "--dir",
        &svid_dir,
        "--listen",
        &peer_sock,
        "--addr-file",
        &path("peer.addr").display().to_string(),
        "--pidfile",
        &path("peer.pid").display().to_string(),
        "--on-hup",
        "ignore",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let arg_refs: Vec<&str> = peer_args.iter().map(String::as_str).collect();
    let mut peer = Workload::spawn("peer", w, &arg_refs)?;
    wait_for("the peer listening", WAIT, &mut [&mut peer], || async {
        published(&path("peer.addr"))
    })
    .await?;

    let restart_peer = restart_script(
        &path("peer.pid"),
        Some(&path("peer.addr")),
        &peer_args,
        &path("peer-restarted.log"),
    );
    let helper_args: Vec<String> = ["svid-files", "--socket", &socket, "--dir", &stuck_dir]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let restart_helper = restart_script(
        &path("helper.pid"),
        None,
        &helper_args,
        &path("helper-restarted.log"),
    );
    let policy = policy(
        w,
        &[("reload_grace", s("2s")), ("probe_max_staleness", s("10s"))],
        r#"
[[stale_served_cert]]
actuator = "reload-peer"
timeout = "5s"
verify_within = "4s"

[[stale_served_cert]]
actuator = "restart-peer"
timeout = "20s"
verify_within = "15s"

[[stale_cert_file]]
actuator = "restart-helper"
timeout = "20s"
verify_within = "15s"
"#,
    )?;
    let extra = format!(
        r#"
[[probes]]
name = "web"
address = "{peer_sock}"
spiffe_id = "{id}"
agent = "{AGENT}"
interval = "1s"
timeout = "1s"

[[cert_files]]
name = "web-svid"
cert_path = "{svid_dir}/svid.pem"
bundle_path = "{svid_dir}/bundle.pem"
agent = "{AGENT}"
poll_interval = "500ms"

[[cert_files]]
name = "stuck-svid"
cert_path = "{stuck_dir}/svid.pem"
bundle_path = "{stuck_dir}/bundle.pem"
agent = "{AGENT}"
poll_interval = "500ms"

[actuators.reload-peer]
type = "signal"
signal = "SIGHUP"
pidfile = "{peer_pid}"

[actuators.restart-peer]
type = "command"
argv = ["/bin/sh", "-c", {restart_peer:?}]
timeout = "20s"

[actuators.restart-helper]
type = "command"
argv = ["/bin/sh", "-c", {restart_helper:?}]
timeout = "20s"
"#,
        peer_pid = path("peer.pid").display(),
    );
    let top = format!("policy_file = \"{}\"\n", policy.display());
    let healer = Healer::start_with(&lab, None, &top, &extra).await?;

    let result = async {
        // A real rotation: the writer follows, the peer does not.
        let drift = incident(&healer, "stale_served_cert", Duration::from_secs(90)).await?;
        assert_eq!(drift.subject, "peer:web");
        assert_ne!(
            drift.evidence["served_serial"],
            drift.evidence["expected_serial"]
        );
        assert_eq!(drift.evidence["expected_source"], "workload_api");
        let done = healer
            .wait_closed(&drift.id, Duration::from_secs(60))
            .await?;
        assert_eq!(done.resolution.as_deref(), Some("cleared"));
        let actions = actions_of(&healer, &drift.id).await?;
        let ladder: Vec<(&str, Option<&str>)> = actions
            .iter()
            .map(|a| (a.actuator.as_str(), a.verification.as_deref()))
            .collect();
        assert_eq!(
            ladder.first(),
            Some(&("reload-peer", Some("failed"))),
            "the SIGHUP is ignored: {ladder:?}"
        );
        assert_eq!(
            ladder.last(),
            Some(&("restart-peer", Some("verified"))),
            "{ladder:?}"
        );
        // The file the keeping-up writer rewrites was never stale; the
        // stuck one was, and restarting its writer healed it.
        let files = healer.incidents().await;
        assert!(
            !files
                .iter()
                .any(|i| i.symptom == "stale_cert_file" && i.subject == "cert_file:web-svid"),
            "{files:#?}"
        );
        let stuck_inc = files
            .iter()
            .find(|i| i.symptom == "stale_cert_file" && i.subject == "cert_file:stuck-svid")
            .cloned()
            .context("stale_cert_file for the stuck writer")?;
        assert_eq!(stuck_inc.evidence["problem"], "behind_issued");
        healer
            .wait_closed(&stuck_inc.id, Duration::from_secs(60))
            .await?;
        let fixed = actions_of(&healer, &stuck_inc.id).await?;
        assert_eq!(
            fixed
                .last()
                .map(|a| (a.actuator.as_str(), a.verification.as_deref())),
            Some(("restart-helper", Some("verified")))
        );
        assert!(
            healer.metric(r#"spire_healer_handshakes_total{reason="ok",source="probe"}"#) >= 2.0
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    healer.stop().await;
    kill_pidfile(&path("peer.pid"));
    kill_pidfile(&path("helper.pid"));
    let _ = peer.stop().await;
    let _ = writer.stop().await;
    result
}

/// Writes SVID files for `spiffe://other.example/web`, issued by that
/// foreign trust domain's own CA, into `dir`.
fn write_foreign_svid(dir: &Path) -> Result<()> {
    use spire_healer::clock::Clock;
    use spire_healer::proto::workload::{X509svid, X509svidResponse};
    use spire_healer::simulated::issuer::{Flavor, TestCa};
    let now = spire_healer::clock::SystemClock.now();
    let ca = TestCa::new(
        "other.example",
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )?;
    let (leaf, key, _) = ca.issue(
        "spiffe://other.example/web",
        now - Duration::from_secs(60),
        now + Duration::from_secs(1800),
        Flavor::Valid,
    )?;
    let resp = X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: "spiffe://other.example/web".into(),
            x509_svid: leaf,
            x509_svid_key: key,
            bundle: ca.der().to_vec(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: Default::default(),
    };
    crate::spire_lab::svid_files::SvidFileSet::from_response(&resp)?.write(dir)?;
    Ok(())
}

/// b. A peer presenting a certificate from another trust domain's CA, next
/// to a healthy peer: an `unknown_ca` burst on that peer only, with its
/// cause; nothing restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_burst_is_reported_without_restarting_healthy_peers() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    lab.register_entry("/web", uid(), 300).await?;
    lab.wait_for_entry_synced("/web").await?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let path = |name: &str| w.join(name);
    let socket = format!("unix://{}", lab.workload_socket().display());
    for d in ["good", "foreign"] {
        std::fs::create_dir(path(d))?;
    }
    let good_dir = path("good").display().to_string();
    let foreign_dir = path("foreign").display().to_string();
    let mut once = Workload::spawn(
        "svid-files-once",
        w,
        &[
            "svid-files",
            "--socket",
            &socket,
            "--dir",
            &good_dir,
            "--once",
        ],
    )?;
    wait_for("the SVID files", WAIT, &mut [&mut once], || async {
        file_serial(&path("good"))
    })
    .await?;
    let _ = once.stop().await;
    write_foreign_svid(&path("foreign"))?;
    let mut peers = Vec::new();
    for (name, dir) in [("good", &good_dir), ("foreign", &foreign_dir)] {
        let sock = format!("unix://{}", path(&format!("{name}.sock")).display());
        let addr = path(&format!("{name}.addr"));
        let mut p = Workload::spawn(
            if name == "good" {
                "good-peer"
            } else {
                "foreign-peer"
            },
            w,
            &[
                "peer",
                "--dir",
                dir,
                "--listen",
                &sock,
                "--addr-file",
                &addr.display().to_string(),
            ],
        )?;
        wait_for("a peer listening", WAIT, &mut [&mut p], || async {
            published(&addr)
        })
        .await?;
        peers.push((name, sock, p));
    }
    let marker = path("restarted");
    let policy = policy(w, &[("burst_open_failures", toml::Value::Integer(5))], "")?;
    let mut extra = String::new();
    for (name, sock, _) in &peers {
        extra.push_str(&format!(
            "[[probes]]\nname = \"{name}\"\naddress = \"{sock}\"\ntrust_domain = \"{td}\"\nagent = \"{AGENT}\"\ninterval = \"2s\"\ntimeout = \"1s\"\n\n",
            td = lab.trust_domain(),
        ));
    }
    for a in ["reload-peer", "restart-peer"] {
        extra.push_str(&format!(
            "[actuators.{a}]\ntype = \"command\"\nargv = [\"/bin/sh\", \"-c\", \"echo {{agent}} >> '{}'\"]\ntimeout = \"5s\"\n\n",
            marker.display()
        ));
    }
    let top = format!("policy_file = \"{}\"\n", policy.display());
    let healer = Healer::start_with(&lab, None, &top, &extra).await?;
    let result = async {
        let burst = incident(&healer, "handshake_failure_burst", Duration::from_secs(60)).await?;
        assert_eq!(burst.subject, "handshakes:foreign/unknown_ca");
        assert_eq!(burst.evidence["reason"], "unknown_ca");
        assert_eq!(
            burst.evidence["likely_cause"],
            "foreign_or_misconfigured_peer"
        );
        assert_eq!(burst.evidence["remediable"], false);
        assert_eq!(burst.evidence["sources"], serde_json::json!(["probe"]));
        let held = healer
            .wait_for("held back", Duration::from_secs(10), || async {
                healer
                    .store
                    .holds(&Default::default())
                    .await
                    .ok()?
                    .into_iter()
                    .find(|h| h.incident_id == burst.id && h.reason == "no_local_cause")
            })
            .await?;
        assert_eq!(held.target, "foreign");
        // A few more probe rounds (two of each peer, then a tick that has
        // seen them): still nothing run, nothing about the healthy peer.
        let rounds = |reason: &str| {
            healer.metric(&format!(
                r#"spire_healer_handshakes_total{{reason="{reason}",source="probe"}}"#
            ))
        };
        let (foreign, good) = (rounds("unknown_ca"), rounds("ok"));
        healer
            .wait_for("two more probe rounds", Duration::from_secs(30), || async {
                (rounds("unknown_ca") >= foreign + 2.0 && rounds("ok") >= good + 2.0).then_some(())
            })
            .await?;
        healer.wait_ticks(2).await?;
        assert!(healer.actions().await.is_empty(), "no action at all");
        assert!(!marker.exists(), "nothing restarted");
        let incidents = healer.incidents().await;
        assert!(
            incidents.iter().all(|i| !i.subject.contains("good")),
            "{incidents:#?}"
        );
        assert!(
            healer.metric(r#"spire_healer_handshakes_total{reason="unknown_ca",source="probe"}"#)
                >= 5.0
        );
        assert!(
            healer.metric(r#"spire_healer_handshakes_total{reason="ok",source="probe"}"#) >= 5.0
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    healer.stop().await;
    for (_, _, p) in peers {
        let _ = p.stop().await;
    }
    result
}

/// c. 100 reporters stream failures concurrently over the API socket → the
/// burst opens; they report successes → it closes (hysteresis: the close
/// bound is below the open one). A caller whose uid is not allowed is
/// refused and nothing it sent is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporters_open_and_close_a_burst_and_strangers_are_refused() -> Result<()> {
    use spire_healer::api::ReportClient;
    use spire_healer::api::reports::report;
    use spire_healer::handshake::Reason;
    use spire_healer::proto::healer::ReportHandshakesRequest;

    let lab = SpireLab::start(LabOptions::default()).await?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let socket = w.join("api.sock");
    let policy = policy(w, &[("burst_window", s("3s"))], "")?;
    let extra = format!(
        "[api]\nsocket = \"{}\"\nsocket_mode = 0o666\nreport_uids = [{}]\n",
        socket.display(),
        uid()
    );
    let top = format!("policy_file = \"{}\"\n", policy.display());
    let healer = Healer::start_with(&lab, None, &top, &extra).await?;

    // One round: every reporter sends its batches concurrently.
    async fn round(socket: &Path, reason: Reason, batches: usize) -> Result<u64> {
        let mut joins = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let client = ReportClient::connect_unix(socket.to_path_buf())?;
            joins.spawn(async move {
                let batches = (0..batches).map(move |_| ReportHandshakesRequest {
                    reports: vec![
                        report("api-peer", reason, 1),
                        report("api-peer", Reason::Ok, 1),
                    ],
                });
                client.report(futures::stream::iter(batches)).await
            });
        }
        let mut accepted = 0;
        while let Some(r) = joins.join_next().await {
            accepted += r??.accepted;
        }
        Ok(accepted)
    }

    let result = async {
        // 100 reporters × 5 batches: 500 unknown_ca, 500 ok.
        assert_eq!(round(&socket, Reason::UnknownCa, 5).await?, 1000);
        let burst = incident(&healer, "handshake_failure_burst", Duration::from_secs(20)).await?;
        assert_eq!(burst.subject, "handshakes:api-peer/unknown_ca");
        assert_eq!(burst.evidence["sources"], serde_json::json!(["report"]));
        assert!(burst.evidence["failures"].as_u64().unwrap_or(0) >= 10);
        // A few failures among many successes: below the open bound, above
        // the close bound while the window still holds the burst. Then only
        // successes: the window empties of failures and it closes.
        assert_eq!(round(&socket, Reason::Ok, 2).await?, 400);
        // Traffic goes on, all successful (with no traffic at all an open
        // burst stays open, blind): the window empties of failures.
        let keep_going = tokio::spawn({
            let socket = socket.clone();
            async move {
                loop {
                    let _ = round(&socket, Reason::Ok, 1).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        });
        let done = healer.wait_closed(&burst.id, Duration::from_secs(30)).await;
        keep_going.abort();
        let done = done?;
        assert_eq!(done.resolution.as_deref(), Some("cleared"));
        assert!(
            healer.metric(r#"spire_healer_handshakes_total{reason="unknown_ca",source="report"}"#)
                >= 500.0
        );

        // A stranger (another uid) is refused before anything is read.
        if uid() == 0 {
            let before = healer.metric(
                r#"spire_healer_handshakes_total{reason="expired",source="report"}"#,
            );
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
                .args(["report", "--socket"])
                .arg(&socket)
                .args(["--target", "api-peer", "--reason", "expired", "--count", "50"])
                .uid(65534)
                .gid(65534)
                .output()
                .await?;
            assert_eq!(
                out.status.code(),
                Some(77),
                "refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                healer.metric(
                    r#"spire_healer_handshakes_total{reason="expired",source="report"}"#
                ),
                before
            );
            assert!(
                healer.metric(
                    r#"spire_healer_api_requests_total{method="report_handshakes",outcome="unauthenticated"}"#
                ) >= 1.0
            );
        } else {
            eprintln!("not root: the stranger half runs in the api unit tests only");
        }
        // Our own uid through the same CLI is accepted.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
            .args(["report", "--socket"])
            .arg(&socket)
            .args(["--target", "api-peer", "--reason", "ok"])
            .output()
            .await?;
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        Ok::<_, anyhow::Error>(())
    }
    .await;
    healer.stop().await;
    result
}
