//! Unit tests of parsing and validation.

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

/// The key of every problem `validate` finds in `text` (the text of other
/// problems), in order; empty when it is valid.
fn problem_keys(text: &str) -> Vec<String> {
    match Config::from_toml(text, "t.toml").unwrap().validate(&no_env) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| match e {
                ConfigError::Invalid { key, .. } => key.clone(),
                other => other.to_string(),
            })
            .collect(),
    }
}

const GOOD: &str = r#"
[supervisor]
tick_interval = "500ms"

[database]
url = "sqlite://healer.db"

[[agents]]
name = "node-a"
address = "unix:///run/spire/agent.sock"

[actuators.restart-agent]
type = "command"
argv = ["systemctl", "restart", "spire-agent"]
timeout = "20s"
"#;

#[test]
fn good_config_validates() {
    let c = Config::from_toml(GOOD, "t.toml").unwrap();
    let r = c.validate(&no_env).unwrap();
    assert_eq!(c.supervisor.tick_interval, Duration::from_millis(500));
    assert_eq!(r.endpoints.len(), 1);
    // Only the rungs whose actuators this config leaves out are warned about.
    assert!(
        r.warnings.iter().all(|w| !w.contains("\"restart-agent\"")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn unknown_key_is_rejected() {
    let e = Config::from_toml("[supervisor]\ntick = \"1s\"\n", "t.toml").unwrap_err();
    assert_eq!(e.kind(), "unknown_key");
    assert!(e.to_string().contains("tick"), "{e}");
}

#[test]
fn absurd_durations_are_rejected_with_their_bound() {
    let text = GOOD.replace(
        "tick_interval = \"500ms\"",
        "tick_interval = \"1y\"\nshutdown_grace = \"2h\"",
    );
    let errors = Config::from_toml(&text, "t.toml")
        .unwrap()
        .validate(&no_env)
        .unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 2, "{text:?}");
    assert!(
        text[0].contains("tick_interval") && text[0].contains("at most 1m"),
        "{text:?}"
    );
    assert!(
        text[1].contains("shutdown_grace") && text[1].contains("at most 10m"),
        "{text:?}"
    );
}

#[test]
fn bad_duration_is_rejected() {
    let e = Config::from_toml("[supervisor]\ntick_interval = \"soon\"\n", "t.toml").unwrap_err();
    assert!(e.to_string().contains("tick_interval"), "{e}");
}

#[test]
fn handshake_sources_are_checked_together() {
    let text = format!(
        r#"{GOOD}
[[probes]]
name = "node-a"
address = "nowhere"
agent = "ghost"
cert_file = "missing"

[[probes]]
name = "web"
address = "127.0.0.1:8443"
trust_domain = "example.org"
agent = "node-a"

[[cert_files]]
name = "web"
cert_path = "relative/svid.pem"
agent = "ghost"

[[envoys]]
name = "front"
metrics_url = "ftp://x"
poll_interval = "0s"

[api]
socket = "relative.sock"
"#
    );
    let keys = problem_keys(&text);
    for want in [
        "probes[0].name",
        "probes[0].address",
        "probes[0].agent",
        "probes[0].cert_file",
        "cert_files[0].name",
        "cert_files[0].cert_path",
        "cert_files[0].agent",
        "envoys[0].metrics_url",
        "envoys[0]",
        "api.socket",
    ] {
        assert!(keys.iter().any(|k| k == want), "missing {want} in {keys:?}");
    }
    assert!(
        !keys.iter().any(|k| k.starts_with("probes[1]")),
        "the good probe is fine: {keys:?}"
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let text = r#"
[supervisor]
tick_interval = "0s"
[database]
url = "mysql://x"
[[agents]]
name = "Bad Name"
address = "unix://relative/path"
[[agents]]
name = "b"
address = "tcp://127.0.0.1:8081/path"
[[agents]]
name = "b"
address = "tcp://localhost:1"
[actuators.restart]
type = "command"
argv = []
"#;
    let keys = problem_keys(text);
    for want in [
        "supervisor.tick_interval",
        "database.url",
        "agents[0].name",
        "agents[0].address",
        "agents[1].address",
        "agents[2].name",
        "agents[2].address",
        "actuators.restart.argv",
    ] {
        assert!(keys.iter().any(|k| k == want), "missing {want} in {keys:?}");
    }
}

#[test]
fn address_falls_back_to_spiffe_endpoint_socket() {
    let text = "[[agents]]\nname = \"a\"\n";
    let c = Config::from_toml(text, "t.toml").unwrap();
    let env =
        |k: &str| (k == "SPIFFE_ENDPOINT_SOCKET").then(|| "unix:///run/x/api.sock".to_string());
    let r = c.validate(&env).unwrap();
    assert_eq!(r.endpoints[0].to_string(), "unix:///run/x/api.sock");
    let errors = c.validate(&no_env).unwrap_err();
    assert!(errors[0].to_string().contains("agents[0].address"));
}

#[test]
fn regular_file_as_socket_is_rejected() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let text = format!(
        "[[agents]]\nname = \"a\"\naddress = \"unix://{}\"\n",
        f.path().display()
    );
    let errors = Config::from_toml(&text, "t.toml")
        .unwrap()
        .validate(&no_env)
        .unwrap_err();
    assert!(
        errors[0].to_string().contains("regular file"),
        "{}",
        errors[0]
    );
}

#[test]
fn database_url_env_override() {
    let c = Config::from_toml(GOOD, "t.toml").unwrap();
    let env = |k: &str| (k == "SPIRE_HEALER_DATABASE_URL").then(|| "ftp://x".to_string());
    let errors = c.validate(&env).unwrap_err();
    assert!(errors[0].to_string().starts_with("database.url"));
}

#[test]
fn signal_and_webhook_actuators_validate() {
    let text = format!(
        "{GOOD}\n[actuators.reload-envoy]\ntype = \"signal\"\nsignal = \"SIGHUP\"\npidfile = \"/run/envoy-{{agent}}.pid\"\n\n[actuators.page]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\n"
    );
    let r = Config::from_toml(&text, "t.toml")
        .unwrap()
        .validate(&no_env)
        .unwrap();
    assert_eq!(r.config.actuators.len(), 3);
    let bad = format!(
        "{GOOD}\n[actuators.x]\ntype = \"signal\"\nsignal = \"SIGNOPE\"\npidfile = \"/p\"\n"
    );
    let errors = Config::from_toml(&bad, "t.toml")
        .unwrap()
        .validate(&no_env)
        .unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.to_string().starts_with("actuators.x.")),
        "{errors:?}"
    );
}

#[test]
fn unconfigured_policy_actuator_is_a_warning() {
    let text = "[[agents]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:1\"\n";
    let r = Config::from_toml(text, "t.toml")
        .unwrap()
        .validate(&no_env)
        .unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("restart-agent")));
}

#[test]
fn sensors_follow_the_config_sections_in_start_order() {
    let text = r#"
[[agents]]
name = "node-a"
address = "unix:///run/spire/agent.sock"
admin_socket = "/nonexistent/agent-admin.sock"
metrics_url = "http://127.0.0.1:9988/metrics"
trust_bundle_path = "/etc/spire/bootstrap.crt"

[[servers]]
name = "s1"
admin_address = "127.0.0.1:8081"
admin_via_agent = "node-a"
health_url = "http://127.0.0.1:8080"

[[envoys]]
name = "front"
metrics_url = "http://127.0.0.1:9901/stats/prometheus"
"#;
    let r = Config::from_toml(text, "t.toml")
        .unwrap()
        .validate(&no_env)
        .unwrap();
    let kinds: Vec<String> = r
        .sensors()
        .iter()
        .map(|spec| match spec {
            SensorSpec::WorkloadApi(s) => format!("workload_api {}", s.agent),
            SensorSpec::ServerApi(s) => format!("server_api {}", s.server),
            SensorSpec::ServerApiTcp {
                settings,
                via_agent,
                ..
            } => format!("server_api_tcp {} via {via_agent}", settings.server),
            SensorSpec::AgentDebug(s) => format!("agent_debug {}", s.agent),
            SensorSpec::Health(s) => format!("health {}", s.target),
            SensorSpec::MetricsScrape(s) => format!("metrics_scrape {} {:?}", s.target, s.role),
            SensorSpec::HandshakeProbe(p) => format!("handshake_probe {}", p.name),
            SensorSpec::CertFile(f) => format!("cert_files {}", f.name),
            SensorSpec::BootstrapBundle(b) => {
                format!("bootstrap_bundle {} {}", b.agent, b.path.display())
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "workload_api node-a",
            "server_api_tcp s1 via node-a",
            "health s1",
            "agent_debug node-a",
            "metrics_scrape node-a Agent",
            "bootstrap_bundle node-a /etc/spire/bootstrap.crt",
            "metrics_scrape front Envoy",
        ]
    );
}

/// [`problem_keys`] of a valid configuration with `extra` appended.
fn invalid_keys(extra: &str) -> Vec<String> {
    problem_keys(&format!("{GOOD}{extra}"))
}

#[test]
fn server_admin_over_tcp() {
    let ok = "[[servers]]\nname = \"s1\"\nadmin_address = \"127.0.0.1:8081\"\n\
              admin_via_agent = \"node-a\"\nadmin_server_id = \"spiffe://td/spire/server\"\n";
    assert_eq!(invalid_keys(ok), Vec::<String>::new());
    let c = Config::from_toml(&format!("{GOOD}{ok}"), "t.toml").unwrap();
    assert_eq!(c.servers[0].admin_via_agent.as_deref(), Some("node-a"));

    for (extra, want) in [
        // Not IP:port.
        (
            "admin_address = \"spire:8081\"\nadmin_via_agent = \"node-a\"",
            vec!["servers[0].admin_address"],
        ),
        // Both transports.
        (
            "admin_socket = \"/run/s.sock\"\nadmin_address = \"127.0.0.1:1\"\nadmin_via_agent = \"node-a\"",
            vec!["servers[0].admin_address"],
        ),
        // No agent for our SVID, or an unknown one.
        (
            "admin_address = \"127.0.0.1:1\"",
            vec!["servers[0].admin_via_agent"],
        ),
        (
            "admin_address = \"127.0.0.1:1\"\nadmin_via_agent = \"nope\"",
            vec!["servers[0].admin_via_agent"],
        ),
        // TCP-only settings without an address.
        (
            "admin_via_agent = \"node-a\"\nadmin_server_id = \"spiffe://td/spire/server\"",
            vec!["servers[0].admin_via_agent", "servers[0].admin_server_id"],
        ),
        (
            "admin_address = \"127.0.0.1:1\"\nadmin_via_agent = \"node-a\"\nadmin_server_id = \"td/server\"",
            vec!["servers[0].admin_server_id"],
        ),
    ] {
        let keys = invalid_keys(&format!("[[servers]]\nname = \"s1\"\n{extra}\n"));
        assert_eq!(keys, want, "{extra}");
    }
}

#[test]
fn trust_bundle_path_must_name_an_absolute_file() {
    let agent = |path: &str| {
        format!(
            "[[agents]]\nname = \"node-b\"\naddress = \"unix:///run/b.sock\"\ntrust_bundle_path = \"{path}\"\n"
        )
    };
    assert_eq!(
        invalid_keys(&agent("/etc/spire/bootstrap.crt")),
        Vec::<String>::new()
    );
    for bad in ["", "bootstrap.crt", "/etc/spire/"] {
        assert_eq!(
            invalid_keys(&agent(bad)),
            vec!["agents[1].trust_bundle_path"],
            "{bad:?}"
        );
    }
}

// === Every problem at once, with its position ===

/// `(key, line, column)` of each problem, in the order reported.
fn located(errors: &[ConfigError]) -> Vec<(String, usize, usize)> {
    errors
        .iter()
        .map(|e| {
            let at = e.location().unwrap_or(Location { line: 0, column: 0 });
            (e.key().unwrap_or("").to_string(), at.line, at.column)
        })
        .collect()
}

#[test]
fn a_config_with_eight_errors_lists_all_eight() {
    let dir = tempfile::tempdir().unwrap();
    let regular = dir.path().join("api.sock");
    std::fs::write(&regular, "not a socket").unwrap();
    // Type errors, an unknown key, a bad address, a bad URL, an absurd
    // duration and semantic errors, in one file (shared with the CLI test).
    let text = include_str!("../../tests/fixtures/eight-errors.toml")
        .replace("{api_socket}", &regular.display().to_string());
    let errors = Config::check(&text, "eight.toml", &no_env).unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        located(&errors),
        [
            ("supervisor.tick_interval", 2, 17),
            ("supervisor.shutdown_grace", 3, 18),
            ("supervisor.tick", 4, 1),
            ("database.url", 7, 7),
            ("http.listen", 10, 10),
            ("agents[0].answer_timeout", 15, 18),
            ("agents[1].name", 18, 8),
            ("api.socket", 22, 10),
        ]
        .map(|(k, l, c)| (k.to_string(), l, c)),
        "{text:#?}"
    );
    let kinds: Vec<&str> = errors.iter().map(ConfigError::kind).collect();
    assert_eq!(
        kinds,
        [
            "value",
            "value",
            "unknown_key",
            "invalid",
            "value",
            "invalid",
            "invalid",
            "invalid"
        ]
    );
    assert!(
        text[0].contains("\"-5s\"") && text[0].contains("duration"),
        "{text:#?}"
    );
    assert!(
        text[2].contains("tick_interval"),
        "names what is allowed: {text:#?}"
    );
    assert!(text[3].contains("PostgreSQL URL"), "{text:#?}");
    assert!(text[5].contains("at most 5m"), "{text:#?}");
    assert!(text[7].contains("regular file"), "{text:#?}");
    assert!(
        text.iter().all(|t| !t.contains("secret-pw")),
        "password leaked: {text:#?}"
    );
}

#[test]
fn syntax_errors_name_line_and_column_with_a_caret_diagram() {
    let text = "[supervisor]\ntick_interval = \"1s\ndry_run = true\n[http]\nlisten = = \"x\"\n";
    let errors = Config::check(text, "s.toml", &no_env).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors.iter().all(|e| e.kind() == "parse"));
    let first = errors[0].to_string();
    let lines: Vec<&str> = first.lines().collect();
    assert!(
        lines[0].starts_with("s.toml, line 2, column 20: "),
        "{first}"
    );
    assert_eq!(lines[2], "2 | tick_interval = \"1s", "{first}");
    assert_eq!(lines[3], "  |                    ^", "{first}");
    assert_eq!(
        errors[1].location(),
        Some(Location {
            line: 5,
            column: 10
        })
    );
}

#[test]
fn an_element_that_fails_keeps_the_indexes_of_the_others() {
    let text = r#"
[[agents]]
address = "unix:///run/a.sock"
answer_timeout = 3

[[agents]]
name = "b"
address = "unix://relative"
"#;
    let errors = Config::check(text, "t.toml", &no_env).unwrap_err();
    assert_eq!(
        located(&errors),
        [
            ("agents[0].name", 2, 1),
            ("agents[0].answer_timeout", 4, 18),
            ("agents[1].address", 8, 11),
        ]
        .map(|(k, l, c)| (k.to_string(), l, c)),
        "{errors:#?}"
    );
    assert!(errors[0].to_string().contains("is required"), "{errors:#?}");
}

#[test]
fn unknown_sections_and_actuator_keys_are_named() {
    let text = format!(
        "{GOOD}\n[supervisr]\ndry_run = true\n\n[actuators.page]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\nretry = 3\n"
    );
    let errors = Config::check(&text, "t.toml", &no_env).unwrap_err();
    let keys: Vec<(String, usize, usize)> = located(&errors);
    assert!(
        keys.iter().any(|k| k.0 == "supervisr" && k.2 == 2),
        "{errors:#?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.0 == "actuators.page.retry" && k.2 == 1),
        "{errors:#?}"
    );
    assert!(
        errors.iter().all(|e| e.kind() == "unknown_key"),
        "{errors:#?}"
    );
}

#[test]
fn postgres_urls_are_parsed_without_connecting() {
    for good in [
        "postgres://healer:pw@db.internal:5432/healer",
        "postgresql://healer@10.0.0.5/healer?sslmode=require",
    ] {
        assert_eq!(check_database_url(good), Ok(()), "{good}");
    }
    for bad in [
        "postgres://healer:pw@db:notaport/healer",
        "postgres://healer:pw@db:5432/healer?sslmode=sometimes",
        "postgres://healer:pw@db:5432",
        "postgres://healer:pw@[::1/healer",
    ] {
        let reason = check_database_url(bad).unwrap_err();
        assert!(!reason.contains("pw@"), "{reason}");
    }
}

#[test]
fn relative_sqlite_path_is_a_warning_naming_the_absolute_file() {
    let r = Config::check(GOOD, "t.toml", &no_env).unwrap();
    let want = std::env::current_dir().unwrap().join("healer.db");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("relative to the working directory")
                && w.contains(&want.display().to_string())),
        "{:?}",
        r.warnings
    );
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace(
        "sqlite://healer.db",
        &format!("sqlite://{}", dir.path().join("h.db").display()),
    );
    let r = Config::check(&text, "t.toml", &no_env).unwrap();
    assert!(
        r.warnings.iter().all(|w| !w.contains("working directory")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn api_socket_is_checked_as_the_server_will_bind_it() {
    let dir = tempfile::tempdir().unwrap();
    let api =
        |socket: &std::path::Path| format!("{GOOD}\n[api]\nsocket = \"{}\"\n", socket.display());
    assert!(Config::check(&api(&dir.path().join("api.sock")), "t.toml", &no_env).is_ok());
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    for (socket, want) in [
        (file.clone(), "regular file"),
        (dir.path().join("missing/api.sock"), "does not exist"),
        (dir.path().to_path_buf(), "directory"),
    ] {
        let errors = Config::check(&api(&socket), "t.toml", &no_env).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let text = errors[0].to_string();
        assert!(text.starts_with("api.socket (line "), "{text}");
        assert!(text.contains(want), "{text}");
    }
}

#[test]
fn sensor_durations_have_upper_bounds() {
    let keys = invalid_keys(
        "[[servers]]\nname = \"s1\"\nadmin_socket = \"/run/s.sock\"\npoll_interval = \"2h\"\ntimeout = \"1h\"\n\
         [[envoys]]\nname = \"e\"\nmetrics_url = \"http://127.0.0.1:9901/stats/prometheus\"\npoll_interval = \"1d\"\n",
    );
    assert_eq!(
        keys,
        [
            "servers[0].poll_interval",
            "servers[0].timeout",
            "envoys[0].poll_interval"
        ]
    );
}

#[test]
fn agent_identity_paths_are_checked() {
    let agent = |extra: &str| {
        format!("[[agents]]\nname = \"node-b\"\naddress = \"unix:///run/b.sock\"\n{extra}\n")
    };
    assert_eq!(
        invalid_keys(&agent(
            "data_dir = \"/var/lib/spire/agent\"\nnode_alias = \"spiffe://td/node/b\""
        )),
        Vec::<String>::new()
    );
    assert_eq!(
        invalid_keys(&agent("data_dir = \"data\"\nnode_alias = \"node-b\"")),
        ["agents[1].data_dir", "agents[1].node_alias"]
    );
}

#[test]
fn policy_parse_errors_have_a_position() {
    let e = Policy::from_toml("[thresholds]\nmax_staleness = \"soon\"\n", "p.toml").unwrap_err();
    assert_eq!(
        e.location(),
        Some(Location {
            line: 2,
            column: 17
        }),
        "{e}"
    );
    assert!(e.to_string().contains("p.toml, line 2, column 17"), "{e}");
}

#[test]
fn actuator_errors_are_placed_though_tagged_enums_lose_positions() {
    let text = "[actuators.x]\ntype = \"command\"\nargv = 3\nextra = 1\n\n[[agents]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:1\"\n";
    let errors = Config::check(text, "t.toml", &no_env).unwrap_err();
    assert_eq!(
        located(&errors),
        [("actuators.x.argv", 3, 8), ("actuators.x.extra", 4, 1)].map(|(k, l, c)| (
            k.to_string(),
            l,
            c
        )),
        "{errors:#?}"
    );
    // A section of the wrong type says what was expected, in TOML terms.
    let errors = Config::check("supervisor = 5\n", "t.toml", &no_env).unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "supervisor (line 1, column 14): invalid type: integer `5`, expected a table"
    );
}

/// [`problem_keys`] of the valid configuration with `top` (top-level keys)
/// before it, its database URL replaced by `url`, and `extra` after it.
fn role_keys(top: &str, url: &str, extra: &str) -> Vec<String> {
    let good = GOOD.replace("sqlite://healer.db", url);
    problem_keys(&format!("{top}\n{good}{extra}"))
}

#[test]
fn roles_and_leadership_validate() {
    const PG: &str = "postgres://u:p@127.0.0.1/db";
    let c = Config::from_toml(GOOD, "t.toml").unwrap();
    assert_eq!(c.role, crate::leadership::Role::All);
    assert!(crate::leadership::of(&c, "sqlite://x").is_none());
    // A cluster instance on PostgreSQL leads by the postgres backend by
    // default; on SQLite it is the only actor (its lock file).
    let cluster = Config::from_toml(&format!("role = \"cluster\"\n{GOOD}"), "t.toml").unwrap();
    let l = crate::leadership::of(&cluster, PG).unwrap();
    assert_eq!(l.backend, crate::leadership::Backend::Postgres);
    assert_eq!(l.name, "spire-healer-cluster");
    assert!(crate::leadership::of(&cluster, "sqlite://x").is_none());
    assert!(role_keys("role = \"cluster\"", PG, "").is_empty());
    assert!(
        role_keys(
            "role = \"cluster\"",
            PG,
            "[leadership]\nbackend = \"lease\"\nnamespace = \"spire-system\"\nlease_duration = \"10s\"\n"
        )
        .is_empty()
    );
    // Leadership needs the cluster role and PostgreSQL; its fields are
    // checked.
    assert_eq!(
        role_keys("", PG, "[leadership]\nname = \"x\"\n"),
        ["leadership"]
    );
    assert_eq!(
        role_keys("role = \"cluster\"", "sqlite://healer.db", "[leadership]\n"),
        ["leadership"]
    );
    assert_eq!(
        role_keys(
            "role = \"cluster\"",
            PG,
            "[leadership]\nbackend = \"lease\"\nrenew_every = \"30s\"\n"
        ),
        ["leadership.renew_every", "leadership.namespace"]
    );
    // A node instance watches no servers and moves no agents.
    assert_eq!(
        role_keys(
            "role = \"node\"",
            PG,
            "[[servers]]\nname = \"s1\"\nadmin_socket = \"/run/spire/server/api.sock\"\n"
        ),
        ["servers"]
    );
    let err = Config::from_toml(&format!("role = \"edge\"\n{GOOD}"), "t.toml").unwrap_err();
    assert!(err.to_string().contains("unknown variant `edge`"), "{err}");
}

#[test]
fn a_node_instance_leaves_the_agent_server_symptoms_to_the_cluster() {
    use crate::model::SymptomKind;
    let resolve = |top: &str| {
        Config::from_toml(&format!("{top}\n{GOOD}"), "t.toml")
            .unwrap()
            .validate(&no_env)
            .unwrap()
    };
    let node = resolve("role = \"node\"");
    assert_eq!(
        node.policy.left_to_cluster,
        crate::leadership::CLUSTER_SYMPTOMS
    );
    assert!(
        !node
            .policy
            .left_to_cluster
            .contains(&SymptomKind::AgentUnreachable)
    );
    // No warning about a failover it could never run.
    assert!(
        node.warnings.iter().all(|w| !w.contains("\"failover\"")),
        "{:?}",
        node.warnings
    );
    for top in ["", "role = \"cluster\"", "role = \"all\""] {
        let r = resolve(top);
        assert!(r.policy.left_to_cluster.is_empty(), "{top}");
        // GOOD configures no failover: the rung is warned about.
        assert!(
            r.warnings.iter().any(|w| w.contains("\"failover\"")),
            "{top}: {:?}",
            r.warnings
        );
    }
}

#[test]
fn kubernetes_actuators_need_an_allow_list() {
    let evict = "\n[actuators.evict]\ntype = \"k8s_evict\"\n";
    assert_eq!(invalid_keys(evict), ["actuators.evict"], "no [kubernetes]");
    assert_eq!(
        invalid_keys(&format!("{evict}\n[kubernetes]\n")),
        ["kubernetes.namespaces"]
    );
    let ok = format!(
        "{evict}\n[actuators.restart]\ntype = \"k8s_rollout_restart\"\npoll_interval = \"1s\"\n\n\
         [actuators.delete]\ntype = \"k8s_delete_pod\"\ngrace_period = \"5s\"\n\n\
         [kubernetes]\nnamespaces = [\"apps\"]\n\n\
         [[kubernetes.workloads]]\nname = \"web\"\nnamespace = \"apps\"\nselector = \"app=web\"\n"
    );
    assert_eq!(invalid_keys(&ok), Vec::<String>::new());
    let c = Config::from_toml(&format!("{GOOD}{ok}"), "t.toml").unwrap();
    let k = c.kubernetes.as_ref().unwrap();
    assert_eq!(k.namespaces, ["apps"]);
    assert!(c.actuators["delete"].is_kubernetes());
    // A workload is a peer or file: not an agent's name; its namespace is
    // allowed and its selector parses.
    let bad = format!(
        "{evict}\n[actuators.slow]\ntype = \"k8s_evict\"\npoll_interval = \"0s\"\n\n\
         [kubernetes]\nnamespaces = [\"apps\"]\n\n\
         [[kubernetes.workloads]]\nname = \"node-a\"\nnamespace = \"kube-system\"\nselector = \"app in (web\"\n"
    );
    assert_eq!(
        invalid_keys(&bad),
        [
            "actuators.slow.poll_interval",
            "kubernetes.workloads[0].namespace",
            "kubernetes.workloads[0].selector",
            "kubernetes.workloads[0].name",
        ]
    );
    // [kubernetes] alone (no actuator) needs no namespaces.
    assert_eq!(invalid_keys("\n[kubernetes]\n"), Vec::<String>::new());
    // Pods are the cluster instance's: a node instance does not evict.
    assert_eq!(
        role_keys("role = \"node\"", "postgres://u:p@127.0.0.1/db", &ok),
        ["actuators.delete", "actuators.evict", "actuators.restart"]
    );
}

#[test]
fn node_placeholder_names_the_agent_after_the_node_and_cluster_needs_no_agent() {
    let text = GOOD.replace("name = \"node-a\"", "name = \"{node}\"");
    let env = |k: &str| (k == NODE_NAME_ENV).then(|| "Ip-10-0-1-7.EC2.internal".to_string());
    let r = Config::from_toml(&text, "t.toml")
        .unwrap()
        .validate(&env)
        .unwrap();
    assert_eq!(r.config.agents[0].name, "ip-10-0-1-7_ec2_internal");
    // Without the variable: an error naming it.
    assert_eq!(problem_keys(&text), ["agents[0].name"]);
    // A cluster instance may watch no local agent; the others may not.
    let none = "[database]\nurl = \"postgres://u:p@127.0.0.1/db\"\n";
    assert!(problem_keys(&format!("role = \"cluster\"\n{none}")).is_empty());
    assert_eq!(
        problem_keys(&format!("role = \"node\"\n{none}")),
        ["agents"]
    );
}

#[test]
fn slo_objectives_default_and_parse() {
    let c = Config::from_toml(GOOD, "t.toml").unwrap();
    assert_eq!(c.slo, crate::slo::SloConfig::default());
    assert_eq!(c.slo.issuance_latency, Duration::from_millis(100));
    assert_eq!(c.slo.renewal_objective, 0.999);
    let text =
        format!("{GOOD}\n[slo]\nissuance_latency = \"250ms\"\nhandshake_objective = 0.999\n");
    let c = Config::from_toml(&text, "t.toml").unwrap();
    assert!(c.validate(&no_env).is_ok());
    assert_eq!(c.slo.issuance_latency, Duration::from_millis(250));
    assert_eq!(c.slo.handshake_objective, 0.999);
    assert_eq!(c.slo.server_availability_objective, 0.9999);
}

#[test]
fn every_invalid_slo_objective_is_listed() {
    assert_eq!(
        invalid_keys(
            "\n[slo]\nissuance_latency = \"0s\"\nissuance_objective = 0\nrenewal_objective = 1.01\nhandshake_objective = 1.0\nserver_availability_objective = -0.5\n"
        ),
        [
            "slo.issuance_objective",
            "slo.renewal_objective",
            "slo.server_availability_objective",
            "slo.issuance_latency",
        ]
    );
    let e = Config::from_toml(&format!("{GOOD}\n[slo]\nobjective = 0.9\n"), "t.toml").unwrap_err();
    assert_eq!(e.kind(), "unknown_key");
}
