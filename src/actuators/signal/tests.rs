use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::*;
use crate::model::SymptomKind;

fn step() -> Step {
    Step {
        action_id: "a1".into(),
        incident_id: "i1".into(),
        symptom: SymptomKind::AgentUnreachable,
        rung: 1,
        actuator: "reload".into(),
        target: "node-a".into(),
        params: json!({}),
        timeout: Duration::from_secs(5),
        verify_within: Duration::from_secs(1),
        dry_run: false,
    }
}

fn config(toml_text: &str) -> SignalConfig {
    toml::from_str(toml_text).unwrap()
}

fn by_pidfile(pidfile: &Path, extra: &str) -> SignalActuator {
    let pidfile = pidfile.to_str().unwrap();
    SignalActuator::new(config(&format!("pidfile = {pidfile:?}\n{extra}")))
}

fn write_pid(dir: &Path, name: &str, pid: impl std::fmt::Display) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("{pid}\n")).unwrap();
    path
}

fn spawn(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn pid_of(child: &Child) -> i32 {
    child.id().unwrap() as i32
}

async fn exit_signal(child: &mut Child) -> Option<i32> {
    tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap()
        .signal()
}

/// Polls until `f` holds (bounded). Only for kernel state that no event
/// announces: `spawn` can return while the child is still inside `execve`,
/// a moment before the kernel renames it.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
    }
}

/// The child's next line of output (bounded).
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>, what: &str) -> String {
    tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .unwrap_or_else(|| panic!("output ended before {what}"))
}

fn error_of(out: &Outcome) -> &str {
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    out.error.as_deref().unwrap()
}

// === config ===

#[test]
fn defaults_to_sighup_and_validates() {
    let c = config(r#"pidfile = "/run/envoy-{agent}.pid""#);
    assert_eq!(c.signal, "SIGHUP");
    assert_eq!(c.timeout, Duration::from_secs(10));
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    let c = config(
        r#"
        signal = "SIGUSR1"
        process_name = "envoy"
        match_arg = "/etc/envoy/{agent}.yaml"
        timeout = "2s"
        "#,
    );
    assert!(c.problems().is_empty(), "{:?}", c.problems());
}

#[test]
fn problems() {
    let fields = |t: &str| -> Vec<&'static str> {
        config(t).problems().into_iter().map(|(f, _)| f).collect()
    };
    assert_eq!(
        fields("signal = \"SIGFOO\"\npidfile = \"/p\""),
        vec!["signal"]
    );
    assert_eq!(fields("signal = \"HUP\"\npidfile = \"/p\""), vec!["signal"]);
    assert_eq!(
        fields("signal = \"SIGSTOP\"\npidfile = \"/p\""),
        vec!["signal"]
    );
    assert_eq!(fields(""), vec!["pidfile"]);
    assert_eq!(
        fields("pidfile = \"/p\"\nprocess_name = \"envoy\""),
        vec!["pidfile"]
    );
    assert_eq!(
        fields("process_name = \"a-very-long-process-name\""),
        vec!["process_name"]
    );
    assert_eq!(
        fields("process_name = \"/usr/bin/envoy\""),
        vec!["process_name"]
    );
    assert_eq!(
        fields("pidfile = \"/p\"\nmatch_arg = \"\""),
        vec!["match_arg"]
    );
    assert_eq!(
        fields("pidfile = \"/p\"\ntimeout = \"0s\""),
        vec!["timeout"]
    );
    let msg = &config("signal = \"SIGFOO\"\npidfile = \"/p\"").problems()[0].1;
    assert!(msg.contains("SIGFOO") && msg.contains("SIGHUP"), "{msg}");
    assert!(toml::from_str::<SignalConfig>("pid_file = \"/p\"").is_err());
}

#[test]
fn class_follows_the_signal() {
    let class =
        |s: &str| SignalActuator::new(config(&format!("signal = {s:?}\npidfile = \"/p\""))).class();
    assert_eq!(class("SIGHUP"), Class::Gentle);
    assert_eq!(class("SIGUSR1"), Class::Gentle);
    assert_eq!(class("SIGUSR2"), Class::Gentle);
    assert_eq!(class("SIGTERM"), Class::AgentLocal);
    assert_eq!(class("SIGKILL"), Class::AgentLocal);
    assert_eq!(class("SIGINT"), Class::AgentLocal);
    assert_eq!(class("SIGQUIT"), Class::AgentLocal);
    assert_eq!(class("SIGNOPE"), Class::AgentLocal);
}

#[tokio::test]
async fn unknown_signal_is_an_actuator_error() {
    let e = SignalActuator::new(config("signal = \"SIGNOPE\"\npidfile = \"/p\""))
        .execute(&step())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "failed");
}

// === pidfile ===

#[tokio::test]
async fn sighup_is_delivered_and_safe_to_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let script = "trap 'echo got-hup' HUP; echo ready; while :; do sleep 0.1; done";
    // A shell started with SIGHUP ignored (the suite run under `nohup`)
    // may not trap it: start it with the default disposition (`env` then
    // execs the shell, same pid).
    let mut child = Command::new("env")
        .args(["--default-signal=HUP", "/bin/sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = pid_of(&child);
    write_pid(dir.path(), "node-a.pid", pid);
    let mut said = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut said, "the trap").await, "ready");

    let pidfile = dir.path().join("{agent}.pid");
    let a = by_pidfile(&pidfile, "process_name = \"sh\"\nmatch_arg = \"-c\"");
    assert_eq!(a.class(), Class::Gentle);
    let out = a.execute(&step()).await.unwrap();
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert_eq!(out.detail["signal"], "SIGHUP");
    assert_eq!(out.detail["pids"], json!([pid]));
    assert_eq!(
        out.detail["pidfile"],
        dir.path().join("node-a.pid").to_str().unwrap()
    );
    assert_eq!(next_line(&mut said, "the first SIGHUP").await, "got-hup");

    let again = a.execute(&step()).await.unwrap();
    assert_eq!(again.kind, OutcomeKind::Ok, "{again:?}");
    assert_eq!(next_line(&mut said, "the second SIGHUP").await, "got-hup");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP killed the shell"
    );
}

#[tokio::test]
async fn sigterm_stops_a_matching_pid() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn("sleep", &["30"]);
    let pidfile = write_pid(dir.path(), "sleep.pid", pid_of(&child));
    let a = by_pidfile(
        &pidfile,
        "signal = \"SIGTERM\"\nprocess_name = \"sleep\"\nmatch_arg = \"30\"",
    );
    let out = a.execute(&step()).await.unwrap();
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert_eq!(out.detail["signal"], "SIGTERM");
    assert_eq!(exit_signal(&mut child).await, Some(Signal::SIGTERM as i32));
}

#[tokio::test]
async fn dead_pid_is_refused_as_stale() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn("sleep", &["30"]);
    let pid = pid_of(&child);
    child.kill().await.unwrap();
    let pidfile = write_pid(dir.path(), "dead.pid", pid);
    let out = by_pidfile(&pidfile, "").execute(&step()).await.unwrap();
    let why = error_of(&out);
    assert!(
        why.contains(&format!("names pid {pid}, which is not running")),
        "{why}"
    );
    assert!(out.detail.get("pids").is_none());
}

#[tokio::test]
async fn zombie_is_refused_as_stale() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn("sleep", &["30"]);
    let pid = pid_of(&child);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    // Not reaped until we wait: it lingers as a zombie. Wait for its exit
    // without reaping it.
    let exited = tokio::task::spawn_blocking(move || {
        use nix::sys::wait::{Id, WaitPidFlag, waitid};
        waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        )
    });
    tokio::time::timeout(Duration::from_secs(5), exited)
        .await
        .expect("the killed child exits")
        .unwrap()
        .unwrap();
    assert_eq!(proc_state(pid), Some('Z'), "the zombie");
    let pidfile = write_pid(dir.path(), "zombie.pid", pid);
    let out = by_pidfile(&pidfile, "process_name = \"sleep\"")
        .execute(&step())
        .await
        .unwrap();
    let why = error_of(&out);
    assert!(why.contains("which is not running (state Z)"), "{why}");
    child.wait().await.unwrap();
}

#[tokio::test]
async fn garbage_or_missing_pidfile_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = write_pid(dir.path(), "garbage.pid", "not a pid");
    let out = by_pidfile(&garbage, "").execute(&step()).await.unwrap();
    assert!(error_of(&out).contains("does not hold a pid"), "{out:?}");

    let empty = write_pid(dir.path(), "empty.pid", "");
    let out = by_pidfile(&empty, "").execute(&step()).await.unwrap();
    assert!(error_of(&out).contains("does not hold a pid"), "{out:?}");

    let missing = dir.path().join("missing.pid");
    let out = by_pidfile(&missing, "").execute(&step()).await.unwrap();
    assert!(error_of(&out).contains("cannot read pidfile"), "{out:?}");
}

#[tokio::test]
async fn recycled_pid_with_another_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn("sleep", &["30"]);
    let pid = pid_of(&child);
    let pidfile = write_pid(dir.path(), "envoy.pid", pid);
    let out = by_pidfile(&pidfile, "signal = \"SIGKILL\"\nprocess_name = \"envoy\"")
        .execute(&step())
        .await
        .unwrap();
    let why = error_of(&out);
    assert!(
        why.contains(&format!(
            "names pid {pid}, which is now `sleep`, not `envoy`"
        )),
        "{why}"
    );
    assert!(child.try_wait().unwrap().is_none(), "it was signalled");
}

#[tokio::test]
async fn pid_without_the_argument_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn("sleep", &["30"]);
    let pidfile = write_pid(dir.path(), "sleep.pid", pid_of(&child));
    let out = by_pidfile(
        &pidfile,
        "signal = \"SIGKILL\"\nprocess_name = \"sleep\"\nmatch_arg = \"/etc/{agent}.conf\"",
    )
    .execute(&step())
    .await
    .unwrap();
    let why = error_of(&out);
    assert!(
        why.contains("without the argument \"/etc/node-a.conf\""),
        "{why}"
    );
    assert!(child.try_wait().unwrap().is_none(), "it was signalled");
}

#[tokio::test]
async fn pid_1_ours_and_process_groups_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, pid, expect) in [
        ("init.pid", 1, "refusing to signal pid 1"),
        ("self.pid", own_pid(), "refusing to signal our own process"),
        ("zero.pid", 0, "not a process id"),
        ("group.pid", -1, "not a process id"),
    ] {
        let pidfile = write_pid(dir.path(), name, pid);
        let out = by_pidfile(&pidfile, "signal = \"SIGTERM\"")
            .execute(&step())
            .await
            .unwrap();
        let why = error_of(&out);
        assert!(why.contains(expect), "{name}: {why}");
    }
}

// === by name ===

/// `sleep` under a name no other process has (at most 15 bytes, the length
/// of /proc/<pid>/comm): a symlink, since the kernel names a process after
/// the path it was started by. Never opened for writing, so it cannot be
/// busy (ETXTBSY) when started.
fn unique_sleep(dir: &Path) -> (String, PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "sigt{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    assert!(name.len() <= COMM_MAX);
    let path = dir.join(&name);
    let sleep = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    std::os::unix::fs::symlink(sleep, &path).unwrap();
    (name, path)
}

#[tokio::test]
async fn exact_name_lookup_signals_every_match() {
    let dir = tempfile::tempdir().unwrap();
    let (name, path) = unique_sleep(dir.path());
    let mut a = spawn(&path, &["30"]);
    let mut b = spawn(&path, &["31"]);
    let (pa, pb) = (pid_of(&a), pid_of(&b));
    eventually("the comm", || {
        proc_comm(pa).as_deref() == Some(&name) && proc_comm(pb).as_deref() == Some(&name)
    })
    .await;

    // match_arg narrows the set to one.
    let one = SignalActuator::new(config(&format!(
        "signal = \"SIGTERM\"\nprocess_name = {name:?}\nmatch_arg = \"30\""
    )));
    let out = one.execute(&step()).await.unwrap();
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert_eq!(out.detail["pids"], json!([pa]));
    assert_eq!(exit_signal(&mut a).await, Some(Signal::SIGTERM as i32));
    assert!(
        b.try_wait().unwrap().is_none(),
        "the other one was signalled"
    );

    // Without it, every live process of that name.
    let all = SignalActuator::new(config(&format!(
        "signal = \"SIGTERM\"\nprocess_name = {name:?}"
    )));
    let out = all.execute(&step()).await.unwrap();
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert_eq!(out.detail["pids"], json!([pb]));
    assert_eq!(exit_signal(&mut b).await, Some(Signal::SIGTERM as i32));

    // Nothing left: an error, not a silent success.
    let out = all.execute(&step()).await.unwrap();
    let why = error_of(&out);
    assert_eq!(why, format!("no live process named `{name}`"));
}

#[tokio::test]
async fn no_process_of_that_name_is_an_error() {
    let a = SignalActuator::new(config(
        "process_name = \"no-such-proc\"\nmatch_arg = \"/etc/{agent}.yaml\"",
    ));
    let out = a.execute(&step()).await.unwrap();
    let why = error_of(&out);
    assert_eq!(
        why,
        "no live process named `no-such-proc` with the argument \"/etc/node-a.yaml\""
    );
}

#[test]
fn name_lookup_skips_pid_1_and_ourselves() {
    let me = own_pid();
    let comm = proc_comm(me).unwrap();
    let t = Target {
        pidfile: None,
        process_name: Some(comm.clone()),
        match_arg: None,
    };
    if let Ok(pids) = t.by_name(&comm, me) {
        assert!(!pids.contains(&me) && !pids.contains(&1), "{pids:?}");
    }
    let init = proc_comm(1).unwrap_or_default();
    let t = Target {
        pidfile: None,
        process_name: Some(init.clone()),
        match_arg: None,
    };
    if let Ok(pids) = t.by_name(&init, me) {
        assert!(!pids.contains(&1), "{pids:?}");
    }
}

#[test]
fn reads_state_past_a_tricky_comm() {
    assert_eq!(stat_state("42 (a) Z (b)) S 1 42 42 0"), Some('S'));
    assert_eq!(stat_state("42 (sleep) Z 1 42 42 0"), Some('Z'));
    assert_eq!(stat_state("42 (sleep"), None);
    assert!(proc_state(own_pid()).is_some_and(|s| !is_dead(s)));
    assert_eq!(proc_state(-5), None);
}
