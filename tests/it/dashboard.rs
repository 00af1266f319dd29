//! Our lint of the shipped Grafana dashboard (`deploy/grafana/spire-healer.json`),
//! in the spirit of Grafana's dashboard-linter; the SDK's schema check is
//! `scripts/check-dashboard.sh`. Rules:
//!
//! - panel ids (rows included) are unique;
//! - every `gridPos` lies within the 24 columns, and no two overlap;
//! - every panel, query and query variable uses the `datasource` variable
//!   (`${datasource}`, type prometheus), which exists, as do the `agent` and
//!   `trust_domain` variables;
//! - every panel sets a unit;
//! - every query (panels and annotations) parses as PromQL once Grafana's
//!   `$__rate_interval`, `$__interval`, `$__range` and our variables are
//!   substituted, and every metric it (or a `label_values` variable) names
//!   is declared in `src/telemetry/metrics.rs`, is a recording rule of
//!   `deploy/prometheus/spire-healer.rules.yaml`, or is one Prometheus makes
//!   itself (`up`, `ALERTS`).
//!
//! `dashboard_live.rs` checks the same queries against a real Prometheus
//! scraping a healer driven through real incidents: each returns data, and
//! each metric name was scraped from a live `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Context, Result};
use promql_parser::parser::{self, Expr};
use serde_json::Value;

/// Metric and recording-rule names panels use that this build does not
/// export or define yet. Queries naming one are linted for syntax but not
/// for existence, and `dashboard_live` does not require them to return
/// data. A name listed here that the build does provide fails the lint, so
/// the list only ever shrinks.
pub const PENDING: &[&str] = &[];

/// Series Prometheus makes itself, which queries may use.
pub const PROMETHEUS_SERIES: &[&str] = &["up", "ALERTS", "ALERTS_FOR_STATE"];

/// The dashboard's variables other than `datasource`; each stands for a
/// regex (Grafana's "All" is `.*`, several values an alternation).
const VARIABLES: &[&str] = &["agent", "trust_domain"];

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The shipped dashboard.
pub fn load() -> Result<Value> {
    let path = repo_file("deploy/grafana/spire-healer.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// The shipped alert and recording rules, when the file exists.
pub fn rules_text() -> Option<String> {
    std::fs::read_to_string(repo_file("deploy/prometheus/spire-healer.rules.yaml")).ok()
}

/// Names of the recording rules (`record: NAME`) in a rules file.
pub fn recording_rules(text: &str) -> BTreeSet<String> {
    yaml_values(text, "record")
}

/// Names of the alerts (`alert: NAME`) in a rules file.
pub fn alert_names(text: &str) -> BTreeSet<String> {
    yaml_values(text, "alert")
}

/// The values of `key: VALUE` lines (list items too), unquoted. Enough for
/// rule files, whose names are plain scalars.
fn yaml_values(text: &str, key: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("- ").trim_start();
            let v = l.strip_prefix(key)?.strip_prefix(':')?;
            let v = v.split(" #").next()?.trim().trim_matches(['"', '\'']);
            (!v.is_empty()).then(|| v.to_string())
        })
        .collect()
}

/// Metric names declared in `src/telemetry/metrics.rs` (string literals
/// naming one of ours), with the `_bucket`, `_sum` and `_count` series of
/// each.
pub fn declared_metrics() -> Result<BTreeSet<String>> {
    let path = repo_file("src/telemetry/metrics.rs");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut out = BTreeSet::new();
    for lit in text.split('"').skip(1).step_by(2) {
        let ours = lit.starts_with("spire_healer_") || lit.starts_with("spiffe_");
        if ours
            && lit
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            for suffix in ["", "_bucket", "_sum", "_count"] {
                out.insert(format!("{lit}{suffix}"));
            }
        }
    }
    Ok(out)
}

/// One PromQL query of the dashboard.
#[derive(Debug, Clone)]
pub struct Query {
    /// Where it is, e.g. `panel 2 "Agents healthy" A`.
    pub place: String,
    /// As written, with Grafana variables.
    pub expr: String,
}

/// Every panel, rows and the panels of collapsed rows included.
pub fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every PromQL query: panel targets and Prometheus annotations.
pub fn queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                place: format!(
                    "panel {} {} {}",
                    p["id"],
                    p["title"],
                    t["refId"].as_str().unwrap_or("?")
                ),
                expr: t["expr"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push(Query {
                place: format!("annotation {}", a["name"]),
                expr: expr.to_string(),
            });
        }
    }
    out
}

/// The expression with Grafana's interval variables set to the given
/// values and every template variable to `.*` (its "All").
pub fn substitute(expr: &str, rate_interval: &str, interval: &str, range: &str) -> String {
    let mut s = expr
        .replace("$__rate_interval", rate_interval)
        .replace("${__rate_interval}", rate_interval)
        .replace("$__interval", interval)
        .replace("${__interval}", interval)
        .replace("$__range", range)
        .replace("${__range}", range);
    for v in VARIABLES {
        s = s
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("[[{v}]]"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    s
}

/// Metric names an expression selects.
pub fn metric_names(e: &Expr, out: &mut BTreeSet<String>) {
    match e {
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::VectorSelector(v) => out.extend(v.name.clone()),
        Expr::MatrixSelector(m) => out.extend(m.vs.name.clone()),
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The metric of a `label_values(METRIC, label)` variable query.
fn label_values_metric(q: &str) -> Option<&str> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (metric, _label) = inner.rsplit_once(',')?;
    Some(metric.trim())
}

/// What one lint run found.
#[derive(Debug, Default)]
pub struct Findings {
    /// Broken rules, one line each.
    pub problems: Vec<String>,
    /// Every metric name used, with the places using it.
    pub metrics: BTreeMap<String, Vec<String>>,
}

/// Lints `d`; `known` says whether a metric name exists. Names in
/// [`PENDING`] are not judged by `known` (the caller decides).
pub fn lint(d: &Value, known: &dyn Fn(&str) -> bool) -> Findings {
    let mut f = Findings::default();
    let is_var_ds = |ds: &Value| ds["uid"] == "${datasource}" && ds["type"] == "prometheus";

    // Variables.
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    match var("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => f
            .problems
            .push("no `datasource` variable of type datasource (prometheus)".into()),
    }
    for name in VARIABLES {
        if var(name).is_none() {
            f.problems.push(format!("no `{name}` variable"));
        }
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let name = &v["name"];
        if !is_var_ds(&v["datasource"]) {
            f.problems.push(format!(
                "variable {name}: datasource is not ${{datasource}}"
            ));
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        match q.and_then(label_values_metric) {
            Some(m) => match parser::parse(m) {
                Ok(e) => {
                    let mut names = BTreeSet::new();
                    metric_names(&e, &mut names);
                    for n in names {
                        f.metrics
                            .entry(n)
                            .or_default()
                            .push(format!("variable {name}"));
                    }
                }
                Err(e) => f
                    .problems
                    .push(format!("variable {name}: {m:?} is not PromQL: {e}")),
            },
            None => f.problems.push(format!(
                "variable {name}: query {q:?} is not label_values(metric, label)"
            )),
        }
    }

    // Panels: ids, grid, datasource, unit.
    let all = panels(d);
    let mut ids = BTreeMap::new();
    let mut rects = Vec::new();
    for p in &all {
        let title = &p["title"];
        let id = p["id"].as_u64();
        match id {
            None => f.problems.push(format!("panel {title}: no id")),
            Some(id) => {
                if let Some(other) = ids.insert(id, title.clone()) {
                    f.problems
                        .push(format!("panel id {id} is used by {other} and {title}"));
                }
            }
        }
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().unwrap_or(-1),
            g["y"].as_i64().unwrap_or(-1),
            g["w"].as_i64().unwrap_or(0),
            g["h"].as_i64().unwrap_or(0),
        );
        if x < 0 || y < 0 || w < 1 || h < 1 || x + w > 24 {
            f.problems.push(format!(
                "panel {title}: gridPos {g} is not within 24 columns"
            ));
        }
        for (other, (ox, oy, ow, oh)) in &rects {
            let (ox, oy, ow, oh): (i64, i64, i64, i64) = (*ox, *oy, *ow, *oh);
            if x < ox + ow && ox < x + w && y < oy + oh && oy < y + h {
                f.problems
                    .push(format!("panel {title} overlaps panel {other}"));
            }
        }
        rects.push((title.clone(), (x, y, w, h)));
        if p["type"] == "row" {
            continue;
        }
        if !is_var_ds(&p["datasource"]) {
            f.problems
                .push(format!("panel {title}: datasource is not ${{datasource}}"));
        }
        if p["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            f.problems.push(format!("panel {title}: no unit"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            f.problems.push(format!("panel {title}: no query"));
        }
        for t in &targets {
            if !is_var_ds(&t["datasource"]) {
                f.problems.push(format!(
                    "panel {title} query {}: datasource is not ${{datasource}}",
                    t["refId"]
                ));
            }
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if a["builtIn"] != 1 && !is_var_ds(&a["datasource"]) {
            f.problems.push(format!(
                "annotation {}: datasource is not ${{datasource}}",
                a["name"]
            ));
        }
    }

    // Queries: PromQL and metric names.
    for q in queries(d) {
        if q.expr.trim().is_empty() {
            f.problems.push(format!("{}: empty query", q.place));
            continue;
        }
        let expr = substitute(&q.expr, "1m", "15s", "6h");
        match parser::parse(&expr) {
            Ok(e) => {
                let mut names = BTreeSet::new();
                metric_names(&e, &mut names);
                if names.is_empty() {
                    f.problems
                        .push(format!("{}: selects no metric: {expr}", q.place));
                }
                for n in names {
                    f.metrics.entry(n).or_default().push(q.place.clone());
                }
            }
            Err(e) => f
                .problems
                .push(format!("{}: not PromQL: {e}\n    {expr}", q.place)),
        }
    }
    for (name, places) in &f.metrics {
        if !PENDING.contains(&name.as_str()) && !known(name) {
            f.problems.push(format!(
                "metric {name} (used by {}) is not exported by spire-healer, not a recording rule \
                 of deploy/prometheus/spire-healer.rules.yaml and not a Prometheus series",
                places.join(", ")
            ));
        }
    }
    f
}

/// The names this build provides: declared metrics, recording rules of
/// the shipped rules file, and Prometheus' own series.
pub fn known_names() -> Result<BTreeSet<String>> {
    let mut known = declared_metrics()?;
    known.extend(
        rules_text()
            .map(|t| recording_rules(&t))
            .unwrap_or_default(),
    );
    known.extend(PROMETHEUS_SERIES.iter().map(|s| s.to_string()));
    Ok(known)
}

/// The shipped dashboard passes every rule; [`PENDING`] lists only names
/// still missing.
#[test]
fn the_dashboard_passes_our_lint() -> Result<()> {
    let d = load()?;
    let known = known_names()?;
    let f = lint(&d, &|n| known.contains(n));
    let mut problems = f.problems;
    let pending_used: Vec<_> = PENDING
        .iter()
        .filter(|n| f.metrics.contains_key(**n))
        .collect();
    for n in PENDING {
        if known.contains(*n) {
            problems.push(format!(
                "{n} is provided now: remove it from dashboard::PENDING, so it is checked"
            ));
        }
    }
    println!(
        "{} panels, {} queries, {} metric names",
        panels(&d).len(),
        queries(&d).len(),
        f.metrics.len()
    );
    if !pending_used.is_empty() {
        println!(
            "NOT YET CHECKED for existence (not provided by this build; dashboard::PENDING): {pending_used:?}"
        );
    }
    assert!(
        problems.is_empty(),
        "{} dashboard problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    Ok(())
}

/// Each rule catches what it is for.
#[test]
fn the_lint_reports_each_broken_rule() -> Result<()> {
    let mut d = load()?;
    let ps = d["panels"].as_array_mut().context("panels")?;
    // Panel 0 is the first row, 1 to 6 its stat panels.
    ps[2]["id"] = ps[1]["id"].clone();
    ps[2]["gridPos"]["x"] = 22.into();
    ps[3]["datasource"]["uid"] = "prometheus-uid".into();
    ps[3]["fieldConfig"]["defaults"]
        .as_object_mut()
        .context("defaults")?
        .remove("unit");
    ps[4]["targets"][0]["expr"] = "sum(rate(spire_healer_tick_duration_seconds_count[5m])".into();
    ps[5]["targets"][0]["expr"] = "spire_healer_no_such_metric".into();
    d["templating"]["list"]
        .as_array_mut()
        .context("variables")?
        .retain(|v| v["name"] != "datasource");
    let known = known_names()?;
    let f = lint(&d, &|n| known.contains(n));
    let all = f.problems.join("\n");
    for expected in [
        "no `datasource` variable",
        "is used by",
        "is not within 24 columns",
        "overlaps",
        "datasource is not ${datasource}",
        "no unit",
        "not PromQL",
        "metric spire_healer_no_such_metric",
    ] {
        assert!(
            all.contains(expected),
            "{expected:?} not reported in:\n{all}"
        );
    }
    Ok(())
}

#[test]
fn substitution_covers_grafana_and_our_variables() {
    assert_eq!(
        substitute(
            r#"increase(x{agent=~"$agent", s=~"spiffe://(${trust_domain})/.*"}[$__rate_interval]) / $__range"#,
            "1m",
            "15s",
            "6h"
        ),
        r#"increase(x{agent=~".*", s=~"spiffe://(.*)/.*"}[1m]) / 6h"#
    );
    assert_eq!(
        label_values_metric("label_values(spire_healer_workload_api_stream_up, agent)"),
        Some("spire_healer_workload_api_stream_up")
    );
    let rules = "groups:\n- name: g\n  rules:\n  - record: a:b:1h\n    expr: x\n  - alert: Foo\n    for: 5m\n";
    assert_eq!(
        recording_rules(rules),
        BTreeSet::from(["a:b:1h".to_string()])
    );
    assert_eq!(alert_names(rules), BTreeSet::from(["Foo".to_string()]));
}
