//! Issue scenarios a–c on real SPIRE: spire-healer observes our own SVID
//! through the real agent's Workload API and heals a killed and a frozen
//! agent, asserted through the store and the metrics.

use std::time::Duration;

use anyhow::Result;

use crate::helpers::{AGENT, Healer, secs};
use crate::spire_lab::{LabOptions, SpireLab};

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

async fn lab_with_entry(ttl_secs: u32) -> Result<SpireLab> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    lab.register_entry("/healer", uid(), ttl_secs).await?;
    lab.wait_for_entry_synced("/healer").await?;
    Ok(lab)
}

/// a. Our SVID is observed and at least two real rotations are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observes_real_rotations() -> Result<()> {
    let lab = lab_with_entry(20).await?;
    let healer = Healer::start(&lab, None).await?;
    let id = lab.spiffe_id("/healer");
    let rotations = healer
        .wait_for(
            "two rotations of our SVID",
            Duration::from_secs(90),
            || async {
                let rows = healer.svids().await;
                let replaced = rows
                    .iter()
                    .filter(|r| r.spiffe_id == id && r.replaced_at_ms.is_some())
                    .count();
                (replaced >= 2).then_some(rows)
            },
        )
        .await?;
    let mine: Vec<_> = rotations.iter().filter(|r| r.spiffe_id == id).collect();
    assert!(mine.len() >= 3, "three serials expected: {mine:#?}");
    for r in &mine {
        assert_eq!(r.agent, AGENT);
        assert!(r.not_after_ms > r.not_before_ms);
        assert!(!r.serial.is_empty());
    }
    let serials: std::collections::HashSet<_> = mine.iter().map(|r| &r.serial).collect();
    assert_eq!(serials.len(), mine.len(), "serials are distinct");
    assert!(
        healer.metric(&format!(
            r#"spiffe_certificate_rotation_total{{agent="{AGENT}"}}"#
        )) >= 2.0
    );
    assert_eq!(
        healer.metric(&format!(
            r#"spire_healer_workload_api_stream_up{{agent="{AGENT}"}}"#
        )),
        1.0
    );
    let expiry = healer.metric(&format!(
        r#"spiffe_svid_expiry_seconds{{agent="{AGENT}",spiffe_id="{id}"}}"#
    ));
    assert!(expiry > 0.0 && expiry <= 30.0, "expiry gauge {expiry}");
    healer.stop().await;
    Ok(())
}

/// b. The agent is killed → agent_unreachable at once → the `command`
/// actuator restarts it → healed, verified, incident closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heals_a_killed_agent() -> Result<()> {
    let lab = lab_with_entry(300).await?;
    let healer = Healer::start(&lab, None).await?;
    let old_pid = lab.agent_pid();
    let (incident, killed_at) = healer
        .kill_agent_and_wait_open(&lab, Duration::from_secs(10))
        .await?;
    let detect = secs(killed_at, incident.opened_at_ms);
    let closed = healer
        .wait_closed(&incident.id, Duration::from_secs(60))
        .await?;
    let actions = healer
        .wait_actions_verified(&incident.id, Duration::from_secs(30))
        .await?;
    let restart = actions
        .iter()
        .find(|a| a.actuator == "restart-agent")
        .expect("the restart-agent command ran");
    assert_eq!(restart.outcome.as_deref(), Some("ok"));
    assert_eq!(restart.verification.as_deref(), Some("verified"));
    assert_eq!(restart.detail.as_ref().unwrap()["exit_code"], 0);
    assert!(incident.predicted_outage_ms.is_some());
    assert_ne!(lab.agent_pid(), old_pid, "a new agent process runs");
    assert!(lab.agent_pid().is_some());
    let mttr = secs(incident.opened_at_ms, closed.closed_at_ms.unwrap());
    println!(
        "scenario b: detected after {detect:.2}s, healed (MTTR) {mttr:.2}s, actions {:?}",
        actions
            .iter()
            .map(|a| (&a.actuator, &a.verification))
            .collect::<Vec<_>>()
    );
    assert!(detect < 5.0, "detection took {detect}s");
    assert_eq!(
        healer
            .metric(r#"spire_healer_incident_duration_seconds_count{symptom="agent_unreachable"}"#),
        1.0
    );
    assert!(
        healer.metric(r#"spire_healer_actions_total{actuator="restart-agent",outcome="ok"}"#)
            >= 1.0
    );
    healer.stop().await;
    Ok(())
}

/// c. The agent is frozen (SIGSTOP): no error, rotations just stop →
/// svid_rotation_overdue before expiry → the ladder escalates (refetch, then
/// restart) → a new serial → healed and verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heals_a_frozen_agent_before_expiry() -> Result<()> {
    let ttl = 40;
    let lab = lab_with_entry(ttl).await?;
    let healer = Healer::start(&lab, None).await?;
    let id = lab.spiffe_id("/healer");
    // Freeze right after a rotation, so the overdue point is well ahead.
    let first = healer
        .wait_for("first serial", Duration::from_secs(30), || async {
            healer.svids().await.into_iter().find(|r| r.spiffe_id == id)
        })
        .await?;
    let rotated = healer
        .wait_for("a rotation", Duration::from_secs(60), || async {
            healer.svids().await.into_iter().find(|r| {
                r.spiffe_id == id && r.serial != first.serial && r.replaced_at_ms.is_none()
            })
        })
        .await?;
    lab.freeze_agent()?;
    let frozen_at = healer.now_ms();

    let incident =
        healer
            .wait_for(
                "svid_rotation_overdue opened",
                Duration::from_secs(60),
                || async {
                    healer.incidents().await.into_iter().find(|i| {
                        i.symptom == "svid_rotation_overdue" && i.opened_at_ms >= frozen_at
                    })
                },
            )
            .await?;
    assert!(
        incident.opened_at_ms < rotated.not_after_ms,
        "overdue detected before expiry"
    );
    let closed = healer
        .wait_closed(&incident.id, Duration::from_secs(60))
        .await?;
    // With a 40 s SVID the check slack puts the overdue point (0.9) past
    // the expiring one (0.85): both may open at one tick, and the ladder
    // runs on whichever the plan picks. The actions of every incident
    // opened since the freeze are the ladder.
    let since_freeze: Vec<String> = healer
        .incidents()
        .await
        .into_iter()
        .filter(|i| i.opened_at_ms >= frozen_at)
        .map(|i| i.id)
        .collect();
    let actions = healer
        .wait_for("actions settled", Duration::from_secs(30), || async {
            let a: Vec<_> = healer
                .actions()
                .await
                .into_iter()
                .filter(|a| since_freeze.contains(&a.incident_id))
                .collect();
            (!a.is_empty() && a.iter().all(|a| a.verification.is_some())).then_some(a)
        })
        .await?;
    let mut ladder: Vec<_> = actions
        .iter()
        .map(|a| (a.rung, a.actuator.clone(), a.verification.clone()))
        .collect();
    ladder.sort();
    assert_eq!(ladder[0].1, "refetch", "{ladder:?}");
    assert_eq!(ladder[0].2.as_deref(), Some("failed"), "{ladder:?}");
    let last = ladder.last().unwrap();
    assert_eq!(last.1, "restart-agent", "{ladder:?}");
    assert_eq!(last.2.as_deref(), Some("verified"), "{ladder:?}");
    let fresh = healer
        .svids()
        .await
        .into_iter()
        .find(|r| r.spiffe_id == id && r.first_seen_ms > frozen_at)
        .expect("a new serial after the restart");
    assert!(
        fresh.first_seen_ms < rotated.not_after_ms,
        "healed before the SVID expired"
    );
    let mttr = secs(incident.opened_at_ms, closed.closed_at_ms.unwrap());
    println!(
        "scenario c: overdue detected {:.2}s after freeze, {:.2}s before expiry; healed (MTTR) {mttr:.2}s; ladder {ladder:?}",
        secs(frozen_at, incident.opened_at_ms),
        secs(incident.opened_at_ms, rotated.not_after_ms),
    );
    healer.stop().await;
    Ok(())
}

/// d. Our own registration entry is deleted: the agent answers
/// `PermissionDenied` ("no identity issued"). `identity_not_issued` opens,
/// nothing is restarted, no lifetime or reachability incident opens; the
/// entry re-created, the incident closes with no action credited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_entry_is_reported_not_restarted() -> Result<()> {
    let lab = SpireLab::start(LabOptions::default()).await?;
    let entry = lab.register_entry("/healer", uid(), 300).await?;
    lab.wait_for_entry_synced("/healer").await?;
    // The server's admin API too: the diagnosis says whether the entry is
    // gone or no longer matches.
    let server = format!(
        "[[servers]]\nname = \"server\"\nadmin_socket = \"{}\"\npoll_interval = \"1s\"\n",
        lab.server_socket().display()
    );
    let healer = Healer::start_with(&lab, None, "", &server).await?;
    healer.wait_stream_up().await?;
    let deleted_at = healer.now_ms();
    lab.server_cli(&["entry", "delete", "-entryID", &entry])
        .await?;
    let incident = healer
        .wait_for(
            "identity_not_issued opened",
            Duration::from_secs(30),
            || async {
                healer
                    .incidents()
                    .await
                    .into_iter()
                    .find(|i| i.symptom == "identity_not_issued")
            },
        )
        .await?;
    let detect = secs(deleted_at, incident.opened_at_ms);
    assert_eq!(incident.subject, format!("agent:{AGENT}"));
    assert_eq!(incident.evidence["entry"], "missing", "{incident:#?}");
    assert!(
        incident.evidence["cause"]
            .as_str()
            .is_some_and(|c| c.contains(&lab.spiffe_id("/healer"))),
        "{incident:#?}"
    );
    // A dozen more ticks of the agent refusing us: still nothing else.
    healer.wait_ticks(12).await?;

    lab.register_entry("/healer", uid(), 300).await?;
    // When the agent serves it again (spire-agent api fetch, every 250 ms).
    let id = lab.spiffe_id("/healer");
    let served_ms = healer
        .wait_for("served again", Duration::from_secs(30), || async {
            let ids = lab.fetch_x509_ids(Duration::from_secs(2)).await.ok()?;
            ids.contains(&id).then(|| healer.now_ms())
        })
        .await?;
    let closed = healer
        .wait_closed(&incident.id, Duration::from_secs(60))
        .await?;
    let kinds: Vec<String> = healer
        .incidents()
        .await
        .into_iter()
        .map(|i| i.symptom)
        .collect();
    assert_eq!(kinds, ["identity_not_issued"], "no other incident opened");
    assert!(healer.actions().await.is_empty(), "nothing restarted");
    println!(
        "scenario a: identity_not_issued after {detect:.2}s, closed {:.2}s after it opened and {:.2}s after the SVID was served again, no action",
        secs(incident.opened_at_ms, closed.closed_at_ms.unwrap()),
        secs(served_ms, closed.closed_at_ms.unwrap())
    );
    healer.stop().await;
    Ok(())
}
