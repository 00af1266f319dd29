//! Exit codes from statuses and connect errors, the address and identity
//! precedence, and the command line's shape.

use clap::{CommandFactory, Parser};

use super::*;
use crate::cli::{Cli, Command};

fn args(extra: &[&str]) -> ApiArgs {
    let mut argv = vec!["spire-healer", "status"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("parses").command {
        Command::Status { api } => api,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_command_line_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn exit_codes_follow_the_status() {
    let all = [
        (Code::Ok, 0),
        (Code::InvalidArgument, 64),
        (Code::NotFound, 65),
        (Code::FailedPrecondition, 65),
        (Code::OutOfRange, 65),
        (Code::AlreadyExists, 65),
        (Code::Aborted, 65),
        (Code::Unavailable, 69),
        (Code::DeadlineExceeded, 69),
        (Code::Cancelled, 69),
        (Code::ResourceExhausted, 69),
        (Code::Unimplemented, 69),
        (Code::PermissionDenied, 77),
        (Code::Unauthenticated, 77),
        (Code::Unknown, 70),
        (Code::Internal, 70),
        (Code::DataLoss, 70),
    ];
    for (code, want) in all {
        assert_eq!(exit_code(code), want, "{code:?}");
    }
}

#[test]
fn a_failure_names_the_address_the_code_and_the_message() {
    let addr = ApiAddr::Unix("/run/spire-healer/api.sock".into());
    let f = status_failure(
        &addr,
        &Status::permission_denied("uid 1000 may not call approve"),
    );
    assert_eq!(f.code, 77);
    assert_eq!(
        f.message,
        "unix:///run/spire-healer/api.sock: PermissionDenied: uid 1000 may not call approve"
    );
    let f = status_failure(&addr, &Status::out_of_range("cursor run-1:3 is gone"));
    assert_eq!(f.code, 65);
    assert!(f.message.contains("watch from now"), "{}", f.message);
    let f = status_failure(&addr, &Status::not_found(""));
    assert!(
        f.message
            .ends_with("NotFound: Some requested entity was not found"),
        "{}",
        f.message
    );
}

#[test]
fn connect_errors_map_to_usage_unreachable_or_refused() {
    let usage = ApiAddr::parse("nope").expect_err("bad");
    assert_eq!(client_failure(&usage).code, 64);
    let down = ClientError::Unreachable {
        addr: "tcp://h:1".into(),
        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    };
    let f = client_failure(&down);
    assert_eq!(f.code, 69);
    assert!(
        f.message.starts_with("cannot connect to tcp://h:1"),
        "{}",
        f.message
    );
    let refused = ClientError::Refused {
        addr: "tcp://h:1".into(),
        reason: "TLS alert UnknownCA".into(),
    };
    assert_eq!(client_failure(&refused).code, 77);
    let forbidden = ClientError::Forbidden {
        addr: "unix:///s".into(),
        source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    };
    assert_eq!(client_failure(&forbidden).code, 77);
}

#[test]
fn the_address_comes_from_the_flag_then_the_config_then_the_default() {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[api]\nsocket = \"/run/x/api.sock\"\n").expect("write");
    let cfg_arg = cfg.display().to_string();
    assert_eq!(
        resolve_addr(&args(&["--addr", "tcp://h:8443", "--config", &cfg_arg])),
        Ok(ApiAddr::Tcp {
            host: "h".into(),
            port: 8443
        })
    );
    assert_eq!(
        resolve_addr(&args(&["--config", &cfg_arg])),
        Ok(ApiAddr::Unix("/run/x/api.sock".into()))
    );
    // The environment variable is read by clap; without it, the default.
    if std::env::var_os(ADDR_ENV).is_none() {
        assert_eq!(
            resolve_addr(&args(&[])),
            Ok(ApiAddr::Unix("/run/spire-healer/api.sock".into()))
        );
    }
    let f = resolve_addr(&args(&["--addr", "http://x"])).expect_err("bad addr");
    assert_eq!(f.code, 64);
    std::fs::write(&cfg, "[http]\nenabled = false\n").expect("write");
    let f = resolve_addr(&args(&["--config", &cfg_arg])).expect_err("no [api]");
    assert!(f.message.contains("no [api] section"), "{}", f.message);
    let f = resolve_addr(&args(&["--config", "/nonexistent/c.toml"])).expect_err("missing");
    assert_eq!(f.code, 64);
    assert!(f.message.contains("/nonexistent/c.toml"), "{}", f.message);
}

#[test]
fn files_win_over_the_workload_api_and_ids_must_parse() {
    let files = args(&[
        "--svid",
        "/s.pem",
        "--svid-key",
        "/k.pem",
        "--bundle",
        "/b.pem",
        "--workload-api",
        "unix:///agent.sock",
        "--server-id",
        "spiffe://example.org/healer",
    ]);
    let tls = tls_settings(&files).expect("ok").expect("some");
    assert!(
        matches!(tls.identity, ClientIdentity::Files { .. }),
        "{tls:?}"
    );
    assert_eq!(
        tls.server_id.as_ref().map(SpiffeId::as_str),
        Some("spiffe://example.org/healer")
    );
    let wl = args(&[
        "--workload-api",
        "unix:///agent.sock",
        "--spiffe-id",
        "spiffe://example.org/ops",
    ]);
    match tls_settings(&wl).expect("ok").expect("some").identity {
        ClientIdentity::WorkloadApi { spiffe_id, .. } => {
            assert_eq!(spiffe_id.expect("id").as_str(), "spiffe://example.org/ops");
        }
        other => panic!("{other:?}"),
    }
    let bad = args(&["--workload-api", "unix:///a.sock", "--spiffe-id", "ops"]);
    assert_eq!(tls_settings(&bad).expect_err("bad id").code, 64);
    let bad = args(&["--workload-api", "unix://relative"]);
    assert_eq!(tls_settings(&bad).expect_err("bad endpoint").code, 64);
    // --svid alone is a usage error already at parse time.
    assert!(Cli::try_parse_from(["spire-healer", "status", "--svid", "/s.pem"]).is_err());
}

#[test]
fn every_operator_command_parses() {
    let parse = |argv: &[&str]| {
        let mut full = vec!["spire-healer"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).map(|c| c.command)
    };
    assert!(matches!(
        parse(&["dry-run", "on", "--reason", "x"]),
        Ok(Command::DryRun {
            state: OnOff::On,
            ..
        })
    ));
    assert!(parse(&["dry-run", "maybe"]).is_err());
    assert!(matches!(
        parse(&["reset-demotion", "agent_unreachable", "restart-agent"]),
        Ok(Command::ResetDemotion { .. })
    ));
    assert!(matches!(
        parse(&["audit", "--kind", "approved", "--kind", "rejected", "-o", "json"]),
        Ok(Command::Audit { ref kinds, .. }) if kinds.len() == 2
    ));
    assert!(matches!(
        parse(&["incidents", "--database", "sqlite:///x.db"]),
        Ok(Command::Incidents { ref store, .. }) if store.url.as_deref() == Some("sqlite:///x.db")
    ));
    assert!(matches!(
        parse(&["watch", "--cursor", "r:1"]),
        Ok(Command::Watch {
            cursor: Some(_),
            ..
        })
    ));
    assert!(parse(&["approve"]).is_err(), "the id is required");
    for argv in [
        &["status"][..],
        &["incidents", "--open", "--limit", "5", "--page-token", "t"],
        &["incident", "inc-1"],
        &["actions", "--incident", "inc-1"],
        &["holds"],
        &["approvals", "--pending"],
        &["approve", "apr-1", "--comment", "ok"],
        &["reject", "apr-1", "--reason", "no"],
        &["pause", "--reason", "db migration"],
        &["resume"],
    ] {
        assert!(parse(argv).is_ok(), "{argv:?}");
    }
}
