//! The shipped alert rules hang together: the PrometheusRule holds the same
//! groups as the rules file, every alert links a runbook section that
//! exists, and every alert has a firing and a silent case in the
//! `promtool test rules` files. (`scripts/test.sh` runs `promtool check
//! rules` and `promtool test rules` on them.)

use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The alert names of the rules file, in order.
fn alerts(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|a| a.trim().to_string())
        .collect()
}

/// The PrometheusRule `scripts/prometheusrule.sh` writes: its header, then
/// everything from `groups:` on, indented under `spec:`.
fn prometheus_rule(rules: &str, script: &str) -> String {
    let header = script
        .split_once("<<'HEAD'\n")
        .and_then(|(_, rest)| rest.split_once("\nHEAD\n"))
        .map(|(h, _)| h)
        .expect("the script's HEAD document");
    let groups = &rules[rules.find("\ngroups:").expect("a groups: key") + 1..];
    let mut out = format!("{header}\n");
    for line in groups.lines() {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn the_prometheus_rule_holds_the_groups_of_the_rules_file() {
    let rules = read("deploy/prometheus/spire-healer.rules.yaml");
    let want = prometheus_rule(&rules, &read("scripts/prometheusrule.sh"));
    let got = read("deploy/prometheus/spire-healer.prometheusrule.yaml");
    assert!(
        got == want,
        "deploy/prometheus/spire-healer.prometheusrule.yaml differs from the rules file; \
         run scripts/prometheusrule.sh"
    );
}

#[test]
fn every_alert_links_its_runbook_section() {
    let rules = read("deploy/prometheus/spire-healer.rules.yaml");
    let runbooks = read("docs/runbooks.md");
    let names = alerts(&rules);
    assert_eq!(names.len(), 31, "{names:?}");
    for name in &names {
        let url = format!("runbook_url: \"docs/runbooks.md#{}\"", name.to_lowercase());
        let block = rules
            .split("- alert: ")
            .find(|b| b.starts_with(&format!("{name}\n")))
            .expect("the alert's block");
        assert!(block.contains(&url), "{name} has no {url}");
        for key in ["summary:", "description:", "severity:", "for:"] {
            assert!(block.contains(key), "{name} has no {key}");
        }
        assert!(
            runbooks.lines().any(|l| l == format!("## {name}")),
            "docs/runbooks.md has no section ## {name}"
        );
    }
}

#[test]
fn every_alert_has_a_firing_and_a_silent_test_case() {
    let rules = read("deploy/prometheus/spire-healer.rules.yaml");
    let dir = root().join("deploy/prometheus/tests");
    let mut tests = String::new();
    for entry in fs::read_dir(&dir).expect("deploy/prometheus/tests") {
        let path: PathBuf = entry.expect("a test file").path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            tests.push_str(&fs::read_to_string(Path::new(&path)).expect("readable"));
        }
    }
    for name in alerts(&rules) {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|c| c.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{name} has no case where it must stay silent"
        );
        assert!(
            cases.iter().any(|c| c.contains("- exp_labels:")),
            "{name} has no case where it fires"
        );
    }
}
