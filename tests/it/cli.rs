//! The binary's command line: exit codes, every config error at once, the
//! store readers, one instance per store, and a graceful stop on SIGTERM.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use spire_healer::knowledge;
use spire_healer::model::{Event, Incident, Severity, Step, Subject, SymptomKind};
use tokio::io::AsyncBufReadExt;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spire-healer"))
}

#[test]
fn check_config_reports_every_error_with_exit_64() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let regular = dir.path().join("not-a-socket");
    std::fs::write(&regular, "x")?;
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[supervisor]
tick_interval = "0s"
[[agents]]
name = "a"
address = "unix://relative/api.sock"
[[agents]]
name = "b"
address = "tcp://127.0.0.1:8081/path"
[[agents]]
name = "c"
address = "unix://{}"
"#,
            regular.display()
        ),
    )?;
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "4 problem(s)",
        "supervisor.tick_interval",
        "agents[0].address",
        "agents[1].address",
        "agents[2].address",
        "regular file",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Unknown keys are a parse error, also 64.
    std::fs::write(&cfg, "[supervisor]\ntick = \"1s\"\n")?;
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stdout).contains("tick"));
    // `run` refuses the same config with the same code.
    let out = bin().args(["run", "--config"]).arg(&cfg).output()?;
    assert_eq!(out.status.code(), Some(64));
    Ok(())
}

#[test]
fn check_config_lists_all_eight_problems_with_their_positions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let regular = dir.path().join("api.sock");
    std::fs::write(&regular, "not a socket")?;
    let cfg = dir.path().join("eight.toml");
    std::fs::write(
        &cfg,
        include_str!("../fixtures/eight-errors.toml")
            .replace("{api_socket}", &regular.display().to_string()),
    )?;
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(64), "{text}");
    for want in [
        "8 problem(s)",
        "supervisor.tick_interval (line 2, column 17): ",
        "supervisor.shutdown_grace (line 3, column 18): ",
        "supervisor.tick (line 4, column 1): unknown key",
        "database.url (line 7, column 7): not a valid PostgreSQL URL",
        "http.listen (line 10, column 10): ",
        "agents[0].answer_timeout (line 15, column 18): ",
        "agents[1].name (line 18, column 8): ",
        "api.socket (line 22, column 10): ",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("secret-pw"), "password leaked:\n{text}");
    // `run` refuses it the same way, before touching any database.
    let out = bin().args(["run", "--config"]).arg(&cfg).output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("8 problem(s)"));
    // In JSON mode too, every line of it JSON.
    let out = bin()
        .args(["--log-format", "json", "run", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a line of the JSON log is not JSON")?;
    let problems = lines
        .iter()
        .filter(|l| l["message"] == "Configuration problem.")
        .count();
    assert_eq!(problems, 8, "{lines:?}");

    // A syntax error: its line, column and a caret under it, over several
    // lines, not squashed into one.
    std::fs::write(&cfg, "[supervisor]\ntick_interval = \"1s\n")?;
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("line 2, column 20"), "{text}");
    assert!(text.contains("\n    2 | tick_interval = \"1s\n"), "{text}");
    assert!(text.contains("\n      |                    ^\n"), "{text}");
    Ok(())
}

#[tokio::test]
async fn run_with_a_wrong_database_password_says_so_once_and_exits_64() -> Result<()> {
    let good = crate::spire_lab::test_pg_url();
    let (scheme, rest) = good.split_once("://").context("scheme")?;
    let (userinfo, rest) = rest.split_once('@').context("userinfo")?;
    let user = userinfo.split(':').next().unwrap_or(userinfo);
    let secret = "definitely-not-the-password";
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{scheme}://{user}:{secret}@{rest}\"\nspool = \"{}\"\n\
             [http]\nenabled = false\n[[agents]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:1\"\n",
            dir.path().join("s.spool").display()
        ),
    )?;
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .context("still running: the server accepted a wrong password (trust authentication?)")??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let want = format!("refused the login for user \"{user}\": password authentication failed");
    assert_eq!(err.matches(&want).count(), 1, "said once:\n{err}");
    assert!(
        !err.contains("at line"),
        "PostgreSQL's source position:\n{err}"
    );
    assert!(!err.contains(secret), "password leaked:\n{err}");
    Ok(())
}

#[test]
fn run_fails_clearly_when_the_database_is_unreachable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[database]\nurl = \"postgres://u:secret-pw@127.0.0.1:1/db\"\n[http]\nenabled = false\n[[agents]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:1\"\n",
    )?;
    let out = bin().args(["run", "--config"]).arg(&cfg).output()?;
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("secret-pw"), "password leaked: {err}");
    Ok(())
}

#[tokio::test]
async fn incidents_and_actions_read_the_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("h.db").display());
    let store = knowledge::open(&url).await?;
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let incident = Incident {
        id: "inc-1".into(),
        kind: SymptomKind::AgentUnreachable,
        subject: Subject::agent("node-a"),
        severity: Severity::Warning,
        opened_at: t,
        predicted_outage: Some(t + Duration::from_secs(600)),
        evidence: serde_json::json!({"stream": "down"}),
        next_rung: 0,
        needs_operator: None,
    };
    let step = Step {
        action_id: "act-1".into(),
        incident_id: "inc-1".into(),
        symptom: SymptomKind::AgentUnreachable,
        rung: 0,
        actuator: "refetch".into(),
        target: "node-a".into(),
        params: serde_json::json!({}),
        timeout: Duration::from_secs(5),
        verify_within: Duration::from_secs(3),
        dry_run: false,
    };
    store
        .apply(&[
            Event::IncidentOpened { incident },
            Event::ActionStarted { step, at: t },
        ])
        .await?;
    drop(store);

    let out = bin()
        .args(["incidents", "--database", &url, "--output", "json"])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v[0]["id"], "inc-1");
    assert_eq!(v[0]["symptom"], "agent_unreachable");

    let out = bin().args(["incidents", "--database", &url]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ID"), "{text}");
    assert!(
        text.contains("agent:node-a") && text.contains("open"),
        "{text}"
    );

    let out = bin()
        .args([
            "actions",
            "--database",
            &url,
            "--incident",
            "inc-1",
            "-o",
            "json",
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v[0]["actuator"], "refetch");
    assert!(v[0]["outcome"].is_null());
    Ok(())
}

#[tokio::test]
async fn run_stops_gracefully_on_sigterm_and_a_standby_takes_over() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"sqlite://{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[agents]]\nname = \"a\"\naddress = \"unix://{}\"\n",
            dir.path().join("h.db").display(),
            dir.path().join("missing.sock").display()
        ),
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // Stop once the loop has opened the incident for the unreachable agent.
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let opened = async {
        while let Some(line) = lines.next_line().await? {
            eprintln!("{line}");
            if line.contains("Incident opened.") && line.contains("agent_unreachable") {
                return Ok(());
            }
        }
        anyhow::bail!("the daemon's log ended before the incident opened")
    };
    tokio::time::timeout(Duration::from_secs(30), opened)
        .await
        .context("waiting for the incident to open")??;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
        }
    });
    // A second instance on the same store refuses to act, naming the first.
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["run", "--config"])
        .arg(&cfg)
        .kill_on_drop(true)
        .output();
    let second = tokio::time::timeout(Duration::from_secs(30), second).await??;
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(75), "{err}");
    assert!(
        err.contains(&format!("pid {}", child.id().unwrap_or(0))) && err.contains("h.db.lock"),
        "{err}"
    );
    // With --standby it waits instead, and takes over once the first stops.
    let mut standby = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["run", "--standby", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut standby_log =
        tokio::io::BufReader::new(standby.stderr.take().context("stderr")?).lines();
    let mut wait_line = async |needle: &str| -> Result<()> {
        let found = async {
            while let Some(line) = standby_log.next_line().await? {
                eprintln!("standby: {line}");
                if line.contains(needle) {
                    return Ok(());
                }
            }
            anyhow::bail!("the standby's log ended before {needle:?}")
        };
        tokio::time::timeout(Duration::from_secs(30), found)
            .await
            .with_context(|| format!("waiting for {needle:?}"))?
    };
    wait_line("Standby: another instance acts on this scope").await?;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap_or(0) as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    assert_eq!(status.code(), Some(0));
    wait_line("Store lock taken").await?;
    wait_line("Standby over").await?;
    let pid = nix::unistd::Pid::from_raw(standby.id().unwrap_or(0) as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(15), standby.wait()).await??;
    assert_eq!(status.code(), Some(0));
    // The loop ran and recorded the agent it could not reach.
    let store = knowledge::open(&format!("sqlite://{}", dir.path().join("h.db").display())).await?;
    let incidents = store.incidents(&knowledge::Query::default()).await?;
    assert!(
        incidents.iter().any(|i| i.symptom == "agent_unreachable"),
        "{incidents:?}"
    );
    Ok(())
}

#[test]
fn demo_heals_every_fault_and_exits_0() -> Result<()> {
    let out = bin()
        .args(["demo", "--duration", "60s"])
        .env("RUST_LOG", "error")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("SIMULATION"), "{text}");
    for fault in ["rotation stuck", "agent down", "invalid SVID"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(fault))
            .unwrap_or_else(|| panic!("no row for {fault}:\n{text}"));
        assert!(row.contains(" yes "), "{row}");
    }
    assert!(text.contains("Every fault was detected, healed and verified."));
    Ok(())
}

/// Reads the daemon's log lines until one contains `want` (bounded).
async fn until_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    want: &str,
) -> Result<String> {
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            eprintln!("{line}");
            if line.contains(want) {
                return Ok(line);
            }
        }
        anyhow::bail!("the daemon's log ended before {want:?}")
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .with_context(|| format!("waiting for {want:?}"))?
}

#[tokio::test]
async fn sighup_reloads_the_policy_and_a_bad_file_is_rejected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, spire_healer::policy::DEFAULT_POLICY)?;
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "policy_file = \"{}\"\n[database]\nurl = \"sqlite://{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[agents]]\nname = \"a\"\naddress = \"unix://{}\"\n",
            policy.display(),
            dir.path().join("h.db").display(),
            dir.path().join("missing.sock").display()
        ),
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
    until_line(&mut lines, "Serving /metrics").await?;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap_or(0) as i32);
    let hup = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);

    // A valid change: applied, the process goes on.
    std::fs::write(
        &policy,
        spire_healer::policy::DEFAULT_POLICY.replace("cooldown = \"20s\"", "cooldown = \"25s\""),
    )?;
    hup()?;
    until_line(&mut lines, "Policy reloaded").await?;
    // A broken file: every problem logged, the running policy kept.
    std::fs::write(&policy, "[thresholds]\nmax_staleness = \"soon\"\n")?;
    hup()?;
    let rejected = until_line(&mut lines, "Reload rejected").await?;
    assert!(
        rejected.contains("max_staleness") || rejected.contains("policy"),
        "{rejected}"
    );
    // A change only a restart applies is named.
    std::fs::write(
        &policy,
        spire_healer::policy::DEFAULT_POLICY.replace("cooldown = \"20s\"", "cooldown = \"25s\""),
    )?;
    let text = std::fs::read_to_string(&cfg)?.replace("name = \"a\"", "name = \"b\"");
    std::fs::write(&cfg, text)?;
    hup()?;
    let restart = until_line(&mut lines, "next restart").await?;
    assert!(restart.contains("agents"), "{restart}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(
        child.try_wait()?.is_none(),
        "still running after three HUPs"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    assert_eq!(status.code(), Some(0));
    Ok(())
}

/// A JSON value whose objects never repeat a key (serde_json would keep
/// the last one silently).
struct Strict;

impl<'de> serde::de::DeserializeSeed<'de> for Strict {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Strict)
    }
}

impl<'de> serde::de::Visitor<'de> for Strict {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        while a.next_element_seed(Strict)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(k) = a.next_key::<String>()? {
            if !keys.insert(k.clone()) {
                return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
            }
            a.next_value_seed(Strict)?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn json_logs_are_strict_json_with_unique_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"sqlite://{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[agents]]\nname = \"a\"\naddress = \"unix://{}\"\n[actuators.restart-agent]\ntype = \"command\"\nargv = [\"true\"]\ntimeout = \"5s\"\n",
            dir.path().join("h.db").display(),
            dir.path().join("missing.sock").display()
        ),
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
    // Through an incident, its actions and their holds.
    let mut seen = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            let mut de = serde_json::Deserializer::from_str(&line);
            serde::de::DeserializeSeed::deserialize(Strict, &mut de)
                .with_context(|| format!("not strict JSON: {line}"))?;
            de.end().with_context(|| format!("trailing text: {line}"))?;
            assert!(!line.contains('\u{1b}'), "ANSI escape in {line}");
            let done = line.contains("Starting action.") && line.contains("restart-agent");
            seen.push(line);
            if done {
                return Ok(());
            }
        }
        anyhow::bail!("the log ended first")
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .context("waiting for a restart to start")??;
    let action = seen.last().cloned().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&action)?;
    assert_eq!(v["target_name"], "a", "{action}");
    assert!(
        v["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("spire_healer")),
        "{action}"
    );
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap_or(0) as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    Ok(())
}

#[test]
fn report_names_what_is_wrong() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("absent.sock");
    let run = |target: &str| {
        bin()
            .args(["report", "--socket"])
            .arg(&socket)
            .args(["--target", target, "--reason", "unknown_ca"])
            .output()
    };
    let out = run("")?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("target must be"));
    let out = run("web")?;
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("absent.sock"), "{err}");
    Ok(())
}

#[test]
fn reading_a_missing_store_creates_nothing_and_exits_64() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("typo.db");
    let out = bin()
        .args(["incidents", "--database"])
        .arg(format!("sqlite://{}", db.display()))
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("typo.db"));
    assert!(!db.exists(), "the reader created the store");
    Ok(())
}

#[tokio::test]
async fn sigterm_past_the_grace_interrupts_the_action_and_kills_its_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pidfile = dir.path().join("grandchild.pid");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[supervisor]\nshutdown_grace = \"3s\"\n[database]\nurl = \"sqlite://{db}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[agents]]\nname = \"a\"\naddress = \"unix://{sock}\"\n[actuators.restart-agent]\ntype = \"command\"\nargv = [\"/bin/sh\", \"-c\", \"sleep 60 & echo $! > {pid}; wait\"]\ntimeout = \"60s\"\n",
            db = dir.path().join("h.db").display(),
            sock = dir.path().join("missing.sock").display(),
            pid = pidfile.display(),
        ),
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spire-healer"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
    // refetch fails its verification, then the hanging restart starts.
    loop {
        let line = until_line(&mut lines, "Starting action.").await?;
        if line.contains("restart-agent") {
            break;
        }
    }
    let grandchild = async {
        loop {
            if let Ok(t) = std::fs::read_to_string(&pidfile)
                && let Ok(pid) = t.trim().parse::<i32>()
            {
                return nix::unistd::Pid::from_raw(pid);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let grandchild = tokio::time::timeout(Duration::from_secs(10), grandchild).await?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap_or(0) as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    assert_eq!(status.code(), Some(1), "cut short: non-zero");
    // Nothing the action started lives on. Dead means gone or a zombie:
    // once a lab test has made this process a child subreaper, a killed
    // orphan is reparented here and waits, unreaped, as a zombie.
    let alive = |pid: nix::unistd::Pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    let gone = async {
        while alive(grandchild) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .context("the action's child outlived spire-healer")?;
    // Recorded as interrupted, having started.
    let store = knowledge::open(&format!("sqlite://{}", dir.path().join("h.db").display())).await?;
    let actions = store.actions(&knowledge::Query::default()).await?;
    let restart = actions
        .iter()
        .find(|a| a.actuator == "restart-agent")
        .context("restart recorded")?;
    assert_eq!(restart.outcome.as_deref(), Some("error"), "{restart:?}");
    let detail = restart.detail.clone().unwrap_or_default();
    assert_eq!(detail["interrupted"], true, "{restart:?}");
    assert_eq!(detail["started"], true, "{restart:?}");
    Ok(())
}

// === Operator commands over the API ===

pub(crate) mod over_api {
    //! The operator commands against a `Supervisor` served in this process
    //! on TCP with mTLS (`serve_tcp`), by a scripted service: the binary
    //! authenticates with PEM files, prints tables and JSON, and turns the
    //! statuses into exit codes.

    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::Output;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use anyhow::Result;
    use spire_healer::api::tcp::{TcpConfig, TcpConnectInfo, serve_tcp};
    use spire_healer::clock::{Clock, SystemClock};
    use spire_healer::proto::healer::supervisor_server::{Supervisor, SupervisorServer};
    use spire_healer::proto::healer::{self as pb};
    use spire_healer::simulated::issuer::{Flavor, TestCa};
    use spire_healer::spire_api::tls::StaticIdentity;
    use spire_healer::svid::pem::encode;
    use spire_healer::telemetry::Metrics;
    use tokio_util::sync::CancellationToken;
    use tonic::service::Routes;
    use tonic::{Request, Response, Status, Streaming};

    use super::bin;

    const TD: &str = "td.test";
    const SERVER_ID: &str = "spiffe://td.test/healer";
    const OPERATOR_ID: &str = "spiffe://td.test/operator";
    const HOUR: Duration = Duration::from_secs(3600);

    /// Answers from a script; `GetStatus` says who called (as `version`).
    pub(crate) struct Scripted;

    fn caller<T>(req: &Request<T>) -> String {
        req.extensions()
            .get::<TcpConnectInfo>()
            .and_then(|i| i.peer_spiffe_id.clone())
            .unwrap_or_default()
    }

    fn ms(t: SystemTime) -> i64 {
        spire_healer::clock::unix_millis(t)
    }

    #[tonic::async_trait]
    impl Supervisor for Scripted {
        async fn report_handshakes(
            &self,
            _: Request<Streaming<pb::ReportHandshakesRequest>>,
        ) -> Result<Response<pb::ReportHandshakesResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        async fn get_status(
            &self,
            req: Request<pb::GetStatusRequest>,
        ) -> Result<Response<pb::GetStatusResponse>, Status> {
            Ok(Response::new(pb::GetStatusResponse {
                version: caller(&req),
                paused: true,
                paused_by: "uid:0".into(),
                pause_reason: "db migration".into(),
                last_tick_unix_ms: ms(SystemClock.now()),
                store_up: true,
                ..Default::default()
            }))
        }
        async fn list_incidents(
            &self,
            req: Request<pb::ListIncidentsRequest>,
        ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
            let r = req.into_inner();
            if r.page_token == "garbage" {
                return Err(Status::invalid_argument("malformed page token"));
            }
            Ok(Response::new(pb::ListIncidentsResponse {
                incidents: vec![pb::Incident {
                    id: format!("inc-{}", r.page_size),
                    symptom: "agent_unreachable".into(),
                    subject: "agent:node-a".into(),
                    severity: "critical".into(),
                    opened_at_unix_ms: ms(SystemClock.now()) - 90_000,
                    evidence_json: "{\"stream\":\"down\"}".into(),
                    ..Default::default()
                }],
                next_page_token: "next-1".into(),
            }))
        }
        async fn get_incident(
            &self,
            req: Request<pb::GetIncidentRequest>,
        ) -> Result<Response<pb::GetIncidentResponse>, Status> {
            Err(Status::not_found(format!(
                "no incident {:?}",
                req.into_inner().id
            )))
        }
        async fn list_actions(
            &self,
            _: Request<pb::ListActionsRequest>,
        ) -> Result<Response<pb::ListActionsResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        async fn list_holds(
            &self,
            _: Request<pb::ListHoldsRequest>,
        ) -> Result<Response<pb::ListHoldsResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        async fn list_approvals(
            &self,
            _: Request<pb::ListApprovalsRequest>,
        ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        async fn list_audit(
            &self,
            _: Request<pb::ListAuditRequest>,
        ) -> Result<Response<pb::ListAuditResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        async fn approve(
            &self,
            req: Request<pb::ApproveRequest>,
        ) -> Result<Response<pb::Approval>, Status> {
            let by = caller(&req);
            let r = req.into_inner();
            match r.approval_id.as_str() {
                "apr-1" => Ok(Response::new(pb::Approval {
                    id: r.approval_id,
                    state: pb::ApprovalState::Approved as i32,
                    actuator: "restart-agent".into(),
                    decided_by: by,
                    reason: r.comment,
                    ..Default::default()
                })),
                "apr-done" => Err(Status::failed_precondition(
                    "apr-done was rejected by uid:0 at 2026-01-01T00:00:00Z",
                )),
                other => Err(Status::not_found(format!("no approval {other:?}"))),
            }
        }
        async fn reject(
            &self,
            _: Request<pb::RejectRequest>,
        ) -> Result<Response<pb::Approval>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        async fn pause(
            &self,
            req: Request<pb::PauseRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Ok(Response::new(pb::ControlResponse {
                paused: true,
                dry_run: false,
                changed: true,
                by: caller(&req),
            }))
        }
        async fn resume(
            &self,
            _: Request<pb::ResumeRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::permission_denied(format!(
                "{OPERATOR_ID} may not call resume"
            )))
        }
        async fn set_dry_run(
            &self,
            _: Request<pb::SetDryRunRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        async fn reset_demotion(
            &self,
            _: Request<pb::ResetDemotionRequest>,
        ) -> Result<Response<pb::ResetDemotionResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }
        type WatchStream = futures::stream::BoxStream<'static, Result<pb::WatchEvent, Status>>;
        async fn watch(
            &self,
            req: Request<pb::WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            if req.get_ref().cursor == "old" {
                return Err(Status::out_of_range("cursor old is gone"));
            }
            let at = ms(SystemClock.now());
            let event = |seq: u32, kind: &str| pb::WatchEvent {
                cursor: format!("run-1:{seq}"),
                at_unix_ms: at,
                kind: kind.into(),
                incident_id: "inc-1".into(),
                reason: "paused".into(),
                ..Default::default()
            };
            let events = vec![Ok(event(1, "incident_opened")), Ok(event(2, "held"))];
            Ok(Response::new(Box::pin(futures::stream::iter(events))))
        }
    }

    /// PEM files of an SVID: (svid, key, bundle).
    fn write_identity(
        dir: &Path,
        name: &str,
        ca: &TestCa,
        id: &str,
        bundle: &TestCa,
    ) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let now = SystemClock.now();
        let (leaf, key, _) = ca.issue(id, now - HOUR, now + HOUR, Flavor::Valid)?;
        let paths = (
            dir.join(format!("{name}.svid.pem")),
            dir.join(format!("{name}.key.pem")),
            dir.join(format!("{name}.bundle.pem")),
        );
        std::fs::write(&paths.0, encode("CERTIFICATE", &leaf))?;
        std::fs::write(&paths.1, encode("PRIVATE KEY", &key))?;
        std::fs::write(&paths.2, encode("CERTIFICATE", bundle.der()))?;
        Ok(paths)
    }

    struct Server {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    fn serve(ca: &TestCa) -> Result<Server> {
        let now = SystemClock.now();
        let (leaf, key, _) = ca.issue(SERVER_ID, now - HOUR, now + HOUR, Flavor::Valid)?;
        let identity = Arc::new(StaticIdentity(Some((
            vec![leaf],
            key,
            vec![ca.der().to_vec()],
        ))));
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let (addr, fut) = serve_tcp(
            &TcpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), "unix:///unused"),
            identity,
            Routes::new(SupervisorServer::new(Scripted)),
            metrics.clone(),
            shutdown.clone(),
        )?;
        tokio::spawn(fut);
        Ok(Server {
            addr,
            metrics,
            shutdown,
        })
    }

    /// Runs the binary with `args` and the identity files, off the runtime.
    async fn cli(args: Vec<String>, env: Vec<(&'static str, String)>) -> Result<Output> {
        Ok(tokio::task::spawn_blocking(move || {
            let mut cmd = bin();
            cmd.args(&args).env_remove("SPIRE_HEALER_ADDR");
            cmd.env_remove("SPIFFE_ENDPOINT_SOCKET");
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.output()
        })
        .await??)
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn operator_commands_over_mtls_print_and_exit_by_status() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new(TD, SystemClock.now() - HOUR, SystemClock.now() + 24 * HOUR)?;
        let server = serve(&ca)?;
        let (svid, key, bundle) = write_identity(dir.path(), "op", &ca, OPERATOR_ID, &ca)?;
        let addr = format!("tcp://{}", server.addr);
        let with = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            v.extend(
                [
                    "--svid".into(),
                    svid.display().to_string(),
                    "--svid-key".into(),
                    key.display().to_string(),
                    "--bundle".into(),
                    bundle.display().to_string(),
                ]
                .into_iter(),
            );
            v
        };

        // status: a table naming us as the server saw us; the address from
        // the environment.
        let out = cli(with(&["status"]), vec![("SPIRE_HEALER_ADDR", addr.clone())]).await?;
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            stdout.contains("PAUSED by uid:0") && stdout.contains("db migration"),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("Version            {OPERATOR_ID}")),
            "{stdout}"
        );
        assert!(stdout.contains("s ago)"), "{stdout}");

        // incidents -o json: one document, the page size passed, the next token.
        let out = cli(
            with(&["incidents", "--addr", &addr, "--limit", "7", "-o", "json"]),
            vec![],
        )
        .await?;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(v["incidents"][0]["id"], "inc-7");
        assert_eq!(v["incidents"][0]["evidence"]["stream"], "down");
        assert_eq!(v["next_page_token"], "next-1");
        // As a table, the next page's token goes to stderr.
        let out = cli(with(&["incidents", "--addr", &addr]), vec![]).await?;
        assert_eq!(out.status.code(), Some(0));
        assert!(
            text(&out.stdout).starts_with("ID "),
            "{}",
            text(&out.stdout)
        );
        assert!(text(&out.stderr).contains("--page-token next-1"));
        let out = cli(
            with(&["incidents", "--addr", &addr, "--page-token", "garbage"]),
            vec![],
        )
        .await?;
        assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));

        // approve: ok, not found (65), already decided (65).
        let out = cli(
            with(&[
                "approve",
                "apr-1",
                "--comment",
                "go",
                "--addr",
                &addr,
                "-o",
                "json",
            ]),
            vec![],
        )
        .await?;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(v["state"], "approved");
        assert_eq!(v["decided_by"], OPERATOR_ID);
        assert_eq!(v["reason"], "go");
        let out = cli(with(&["approve", "apr-404", "--addr", &addr]), vec![]).await?;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(65), "{err}");
        assert!(
            err.contains(&addr) && err.contains("NotFound") && err.contains("apr-404"),
            "{err}"
        );
        let out = cli(with(&["approve", "apr-done", "--addr", &addr]), vec![]).await?;
        assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("FailedPrecondition"));
        let out = cli(with(&["incident", "inc-9", "--addr", &addr]), vec![]).await?;
        assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));

        // pause: recorded as our SPIFFE ID; resume: refused (77).
        let out = cli(with(&["pause", "--reason", "x", "--addr", &addr]), vec![]).await?;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(&format!("paused (recorded as {OPERATOR_ID})")),
            "{}",
            text(&out.stdout)
        );
        let out = cli(with(&["resume", "--addr", &addr]), vec![]).await?;
        assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("may not call resume"));

        // watch -o json: one object per line, until the stream ends.
        let out = cli(with(&["watch", "--addr", &addr, "-o", "json"]), vec![]).await?;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let lines: Vec<serde_json::Value> = text(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["cursor"], "run-1:2");
        assert_eq!(lines[1]["kind"], "held");
        let out = cli(with(&["watch", "--addr", &addr, "--cursor", "old"]), vec![]).await?;
        assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));

        // An unscripted call is UNIMPLEMENTED: unreachable (69), said so.
        let out = cli(with(&["holds", "--addr", &addr]), vec![]).await?;
        assert_eq!(out.status.code(), Some(69));
        assert!(text(&out.stderr).contains("Unimplemented"));
        assert_eq!(handshake_failures(&server), 0);
        Ok(())
    }

    fn handshake_failures(server: &Server) -> u64 {
        server
            .metrics
            .api_tls_handshake_failures_total
            .with_label_values(&["unknown_ca"])
            .get()
            + server
                .metrics
                .api_tls_handshake_failures_total
                .with_label_values(&["client_refused"])
                .get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_and_unreachable_addresses_exit_77_69_and_64() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let now = SystemClock.now();
        let ca = TestCa::new(TD, now - HOUR, now + 24 * HOUR)?;
        let foreign = TestCa::new("other.test", now - HOUR, now + 24 * HOUR)?;
        let server = serve(&ca)?;
        let addr = format!("tcp://{}", server.addr);
        let files = |(s, k, b): &(PathBuf, PathBuf, PathBuf)| {
            vec![
                "--svid".to_string(),
                s.display().to_string(),
                "--svid-key".into(),
                k.display().to_string(),
                "--bundle".into(),
                b.display().to_string(),
            ]
        };
        // An SVID of a foreign CA: the server refuses it.
        let stranger = write_identity(
            dir.path(),
            "stranger",
            &foreign,
            "spiffe://other.test/x",
            &ca,
        )?;
        let mut args = vec!["status".to_string(), "--addr".into(), addr.clone()];
        args.extend(files(&stranger));
        args.extend(["--server-id".to_string(), SERVER_ID.to_string()]);
        let out = cli(args, vec![]).await?;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{err}");
        assert!(
            err.contains("refused our X509-SVID") && err.contains(&addr),
            "{err}"
        );

        // A server that is not the one expected: we refuse it.
        let op = write_identity(dir.path(), "op", &ca, OPERATOR_ID, &ca)?;
        let mut args = vec!["status".to_string(), "--addr".into(), addr.clone()];
        args.extend(files(&op));
        args.extend(["--server-id".into(), "spiffe://td.test/not-it".into()]);
        let out = cli(args, vec![]).await?;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{err}");
        assert!(
            err.contains("is not trusted") && err.contains(SERVER_ID),
            "{err}"
        );
        assert_eq!(handshake_failures(&server), 2);

        // Nothing listens: 69, naming the address.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut args = vec![
            "status".to_string(),
            "--addr".into(),
            format!("tcp://{closed}"),
        ];
        args.extend(files(&op));
        let out = cli(args, vec![]).await?;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{err}");
        assert!(err.contains(&closed.to_string()), "{err}");
        let sock = dir.path().join("absent.sock");
        let out = cli(
            vec![
                "approvals".into(),
                "--addr".into(),
                format!("unix://{}", sock.display()),
            ],
            vec![],
        )
        .await?;
        assert_eq!(out.status.code(), Some(69));
        assert!(text(&out.stderr).contains("absent.sock"));

        // No Workload API where we were told: 69, naming both addresses.
        let agent = dir.path().join("agent.sock");
        let out = cli(
            vec![
                "status".into(),
                "--addr".into(),
                addr.clone(),
                "--workload-api".into(),
                format!("unix://{}", agent.display()),
            ],
            vec![],
        )
        .await?;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{err}");
        assert!(err.contains(&addr) && err.contains("agent.sock"), "{err}");

        // Usage: a TCP address without an identity, a bad address, a bad
        // argument, --page-token with --store.
        let out = cli(vec!["status".into(), "--addr".into(), addr.clone()], vec![]).await?;
        assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("needs an identity"));
        let out = cli(
            vec!["pause".into(), "--addr".into(), "http://x".into()],
            vec![],
        )
        .await?;
        assert_eq!(out.status.code(), Some(64));
        assert!(text(&out.stderr).contains("http://x"));
        let out = cli(vec!["dry-run".into(), "maybe".into()], vec![]).await?;
        assert_eq!(out.status.code(), Some(64));
        let out = cli(
            vec![
                "holds".into(),
                "--store".into(),
                "sqlite:///nonexistent/x.db".into(),
                "--page-token".into(),
                "t".into(),
            ],
            vec![],
        )
        .await?;
        assert_eq!(out.status.code(), Some(64));
        assert!(text(&out.stderr).contains("--page-token"));
        // Help is not an error.
        let out = cli(vec!["status".into(), "--help".into()], vec![]).await?;
        assert_eq!(out.status.code(), Some(0));
        assert!(text(&out.stdout).contains("--addr"));
        Ok(())
    }
}
