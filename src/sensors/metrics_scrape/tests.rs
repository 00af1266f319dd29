//! The parser on realistic SPIRE and Envoy expositions, every malformed-line
//! class and random input; the helpers; the sensor against a raw HTTP
//! server that flips between good, bad and gone. Sensor tests assert the
//! sensor's metrics.

use crate::sensors::Sensor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::ManualClock;
use crate::http_client::test_server::{Reply, TestServer};
use crate::telemetry::metrics::sample;

// === Fixtures ===

/// A SPIRE 1.15 agent as its go-metrics Prometheus sink renders it:
/// counters without `_total`, call counters with `status`, `_elapsed_time`
/// summaries with quantiles (NaN once MaxAge passes), `host` everywhere.
const AGENT: &str = r#"# HELP go_gc_duration_seconds A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0"} 2.4e-05
go_gc_duration_seconds{quantile="0.25"} 3.1e-05
go_gc_duration_seconds{quantile="1"} 0.000612
go_gc_duration_seconds_sum 0.0113
go_gc_duration_seconds_count 187
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 63
# HELP spire_agent_agent_svid_rotate spire_agent_agent_svid_rotate
# TYPE spire_agent_agent_svid_rotate counter
spire_agent_agent_svid_rotate{host="node-a",status="OK"} 4
spire_agent_agent_svid_rotate{host="node-a",status="Unavailable"} 1
# HELP spire_agent_bootstrapped spire_agent_bootstrapped
# TYPE spire_agent_bootstrapped gauge
spire_agent_bootstrapped{host="node-a"} 1
# HELP spire_agent_manager_sync_fetch_entries_updates spire_agent_manager_sync_fetch_entries_updates
# TYPE spire_agent_manager_sync_fetch_entries_updates counter
spire_agent_manager_sync_fetch_entries_updates{host="node-a",status="DeadlineExceeded"} 2
spire_agent_manager_sync_fetch_entries_updates{host="node-a",status="OK"} 100
spire_agent_manager_sync_fetch_entries_updates{host="node-a",status="Unavailable"} 7
# HELP spire_agent_manager_sync_fetch_entries_updates_elapsed_time spire_agent_manager_sync_fetch_entries_updates_elapsed_time
# TYPE spire_agent_manager_sync_fetch_entries_updates_elapsed_time summary
spire_agent_manager_sync_fetch_entries_updates_elapsed_time{host="node-a",status="OK",quantile="0.5"} 12.5
spire_agent_manager_sync_fetch_entries_updates_elapsed_time{host="node-a",status="OK",quantile="0.9"} 31
spire_agent_manager_sync_fetch_entries_updates_elapsed_time{host="node-a",status="OK",quantile="0.99"} NaN
spire_agent_manager_sync_fetch_entries_updates_elapsed_time_sum{host="node-a",status="OK"} 1534.25
spire_agent_manager_sync_fetch_entries_updates_elapsed_time_count{host="node-a",status="OK"} 100
# HELP spire_agent_rpc_workload_api_fetch_x509svid spire_agent_rpc_workload_api_fetch_x509svid
# TYPE spire_agent_rpc_workload_api_fetch_x509svid counter
spire_agent_rpc_workload_api_fetch_x509svid{host="node-a",status="PermissionDenied"} 3
# HELP spire_agent_started spire_agent_started
# TYPE spire_agent_started gauge
spire_agent_started{host="node-a",trust_domain_id="example.org",version="1.15.3"} 1
# HELP spire_agent_sync_entries_total spire_agent_sync_entries_total
# TYPE spire_agent_sync_entries_total gauge
spire_agent_sync_entries_total{host="node-a"} 12
# HELP spire_agent_uptime_in_ms spire_agent_uptime_in_ms
# TYPE spire_agent_uptime_in_ms gauge
spire_agent_uptime_in_ms{host="node-a"} 3.6e+06
# HELP spire_agent_workload_api_connections spire_agent_workload_api_connections
# TYPE spire_agent_workload_api_connections gauge
spire_agent_workload_api_connections{host="node-a"} 3
"#;

/// A SPIRE server exposition (a subset).
const SERVER: &str = r#"# TYPE spire_server_ca_manager_x509_ca_prepare counter
spire_server_ca_manager_x509_ca_prepare{host="srv-0",status="OK"} 2
# TYPE spire_server_ca_manager_x509_ca_activate counter
spire_server_ca_manager_x509_ca_activate{host="srv-0"} 2
# TYPE spire_server_manager_x509_ca_rotate_expiration gauge
spire_server_manager_x509_ca_rotate_expiration{host="srv-0",trust_domain_id="example.org"} 1.7e+09
# TYPE spire_server_datastore_bundle_fetch counter
spire_server_datastore_bundle_fetch{host="srv-0",status="OK"} 900
spire_server_datastore_bundle_fetch{host="srv-0",status="Unknown"} 5
# TYPE spire_server_datastore_bundle_fetch_elapsed_time summary
spire_server_datastore_bundle_fetch_elapsed_time{host="srv-0",status="OK",quantile="0.5"} 0.8
spire_server_datastore_bundle_fetch_elapsed_time_sum{host="srv-0",status="OK"} 700
spire_server_datastore_bundle_fetch_elapsed_time_count{host="srv-0",status="OK"} 900
# TYPE spire_server_datastore_node_list counter
spire_server_datastore_node_list{host="srv-0",status="Internal"} 1
# TYPE spire_server_rpc_agent_v1_agent_renew_agent counter
spire_server_rpc_agent_v1_agent_renew_agent{host="srv-0",status="OK"} 31
# TYPE spire_server_rpc_svid_v1_svid_batch_new_x509svid counter
spire_server_rpc_svid_v1_svid_batch_new_x509svid{host="srv-0",status="OK"} 480
# TYPE spire_server_uptime_in_ms gauge
spire_server_uptime_in_ms{host="srv-0"} 86400000
"#;

/// Envoy's `/stats/prometheus`: tag-extracted labels, `_total`-less
/// counters, a histogram with `le="+Inf"`.
const ENVOY: &str = r#"# TYPE envoy_listener_ssl_handshake counter
envoy_listener_ssl_handshake{envoy_listener_address="0.0.0.0_8443"} 1742
# TYPE envoy_cluster_ssl_fail_verify_error counter
envoy_cluster_ssl_fail_verify_error{envoy_cluster_name="backend"} 3
# TYPE envoy_listener_server_ssl_socket_factory_downstream_context_secrets_not_ready counter
envoy_listener_server_ssl_socket_factory_downstream_context_secrets_not_ready{envoy_listener_address="0.0.0.0_8443"} 0
# TYPE envoy_control_plane_connected_state gauge
envoy_control_plane_connected_state{} 1
# TYPE envoy_listener_ssl_certificate_expiration_unix_time_seconds gauge
envoy_listener_ssl_certificate_expiration_unix_time_seconds{envoy_listener_address="0.0.0.0_8443",certificate_name="spiffe://example.org/web"} 1700003600
# TYPE envoy_cluster_upstream_cx_connect_ms histogram
envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name="backend",le="0.5"} 10
envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name="backend",le="1"} 12
envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name="backend",le="+Inf"} 13
envoy_cluster_upstream_cx_connect_ms_sum{envoy_cluster_name="backend"} 9.5
envoy_cluster_upstream_cx_connect_ms_count{envoy_cluster_name="backend"} 13
"#;

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn find<'a>(samples: &'a [Sample], name: &str, pairs: &[(&str, &str)]) -> Option<&'a Sample> {
    let want = labels(pairs);
    samples.iter().find(|s| s.name == name && s.labels == want)
}

fn value(samples: &[Sample], name: &str, pairs: &[(&str, &str)]) -> f64 {
    find(samples, name, pairs)
        .unwrap_or_else(|| panic!("{name}{pairs:?} missing"))
        .value
}

// === Parser: valid input ===

#[test]
fn parses_a_spire_agent_exposition() {
    let all = parse(AGENT).expect("agent exposition parses");
    assert_eq!(all.len(), 22);
    let s = find(
        &all,
        "spire_agent_started",
        &[
            ("host", "node-a"),
            ("trust_domain_id", "example.org"),
            ("version", "1.15.3"),
        ],
    )
    .expect("started gauge");
    assert_eq!(s.value, 1.0);
    // Labels come out sorted even though `quantile` was written last.
    assert_eq!(
        value(
            &all,
            "spire_agent_manager_sync_fetch_entries_updates_elapsed_time",
            &[("host", "node-a"), ("quantile", "0.9"), ("status", "OK")]
        ),
        31.0
    );
    let p99 = value(
        &all,
        "spire_agent_manager_sync_fetch_entries_updates_elapsed_time",
        &[("host", "node-a"), ("quantile", "0.99"), ("status", "OK")],
    );
    assert!(p99.is_nan());
    assert_eq!(
        value(&all, "go_gc_duration_seconds", &[("quantile", "0")]),
        2.4e-5
    );
    assert_eq!(value(&all, "go_gc_duration_seconds_count", &[]), 187.0);
    assert_eq!(
        value(&all, "spire_agent_uptime_in_ms", &[("host", "node-a")]),
        3.6e6
    );
    for s in &all {
        assert!(s.labels.windows(2).all(|w| w[0].0 < w[1].0), "{s:?}");
    }
}

#[test]
fn agent_keep_list_and_helpers() {
    let keep = default_keep(Role::Agent);
    let kept = parse_filtered(AGENT, &|n| keeps(&keep, n)).expect("parses");
    assert!(kept.iter().all(|s| s.name.starts_with("spire_agent_")));
    assert!(find(&kept, "go_goroutines", &[]).is_none());
    assert!(
        !kept
            .iter()
            .any(|s| s.name == "spire_agent_rpc_workload_api_fetch_x509svid"
                || s.name == "spire_agent_sync_entries_total")
    );
    // The elapsed-time summary rides along with its counter's prefix.
    assert_eq!(kept.len(), 14);
    assert_eq!(sync_failures(&kept), Some(9.0));
    assert_eq!(sync_successes(&kept), Some(100.0));
    assert_eq!(agent_svid_rotate_failures(&kept), Some(1.0));
    assert_eq!(gauge(&kept, "spire_agent_bootstrapped"), Some(1.0));
    assert_eq!(uptime(&kept, Role::Agent), Some(Duration::from_secs(3600)));
    assert_eq!(
        counter_sum(
            &kept,
            "spire_agent_manager_sync_fetch_entries_updates",
            &|l| { label(l, "status") == Some("Unavailable") }
        ),
        Some(7.0)
    );
}

#[test]
fn absent_metric_is_unknown_and_no_failures_is_zero() {
    let only_ok =
        parse("spire_agent_manager_sync_fetch_entries_updates{host=\"n\",status=\"OK\"} 5\n")
            .expect("parses");
    assert_eq!(sync_failures(&only_ok), Some(0.0));
    assert_eq!(sync_failures(&[]), None);
    assert_eq!(counter_sum(&only_ok, "nope", &|_| true), None);
    assert_eq!(uptime(&only_ok, Role::Agent), None);
    assert_eq!(x509_ca_expiration(&only_ok), None);
    assert_eq!(datastore_failures(&only_ok), None);
}

#[test]
fn server_keep_list_and_helpers() {
    let keep = default_keep(Role::Server);
    let kept = parse_filtered(SERVER, &|n| keeps(&keep, n)).expect("server parses");
    assert!(
        find(
            &kept,
            "spire_server_rpc_svid_v1_svid_batch_new_x509svid",
            &[("host", "srv-0"), ("status", "OK")]
        )
        .is_none()
    );
    assert_eq!(kept.len(), 11);
    assert_eq!(
        x509_ca_expiration(&kept),
        Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    );
    // Summaries have a status label too, but only counters are summed.
    assert_eq!(datastore_failures(&kept), Some(6.0));
    assert_eq!(
        uptime(&kept, Role::Server),
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(
        counter_sum(
            &kept,
            "spire_server_rpc_agent_v1_agent_renew_agent",
            &|_| true
        ),
        Some(31.0)
    );
}

#[test]
fn parses_envoy_stats() {
    let all = parse(ENVOY).expect("envoy parses");
    assert_eq!(all.len(), 10);
    assert_eq!(
        value(
            &all,
            "envoy_cluster_ssl_fail_verify_error",
            &[("envoy_cluster_name", "backend")]
        ),
        3.0
    );
    assert_eq!(value(&all, "envoy_control_plane_connected_state", &[]), 1.0);
    assert_eq!(
        value(
            &all,
            "envoy_cluster_upstream_cx_connect_ms_bucket",
            &[("envoy_cluster_name", "backend"), ("le", "+Inf")]
        ),
        13.0
    );
    let cert = find(
        &all,
        "envoy_listener_ssl_certificate_expiration_unix_time_seconds",
        &[
            ("certificate_name", "spiffe://example.org/web"),
            ("envoy_listener_address", "0.0.0.0_8443"),
        ],
    )
    .expect("cert gauge, labels sorted");
    assert_eq!(cert.value, 1_700_003_600.0);
}

#[test]
fn label_value_escapes() {
    let all = parse(concat!(
        r#"m{a="back\\slash",b="say \"hi\"",c="two\nlines",d="\\n is not a newline",e="ünïcødé ✓",f=""} 1"#,
        "\n"
    ))
    .expect("escapes parse");
    assert_eq!(
        all[0].labels,
        labels(&[
            ("a", "back\\slash"),
            ("b", "say \"hi\""),
            ("c", "two\nlines"),
            ("d", "\\n is not a newline"),
            ("e", "ünïcødé ✓"),
            ("f", ""),
        ])
    );
}

#[test]
fn values_and_timestamps() {
    let text = "\
a 1
b -2.5
c 1e-3
d 1.5E+10
e +Inf
f -Inf
g NaN
h 0 1700000000000
i 42 -5
j .5
k +3
l inf
m 7 \t
";
    let all = parse(text).expect("values parse");
    let v: Vec<f64> = all.iter().map(|s| s.value).collect();
    assert_eq!(
        &v[..6],
        &[1.0, -2.5, 1e-3, 1.5e10, f64::INFINITY, f64::NEG_INFINITY]
    );
    assert!(v[6].is_nan());
    assert_eq!(&v[7..], &[0.0, 42.0, 0.5, 3.0, f64::INFINITY, 7.0]);
}

#[test]
fn layout_variants() {
    let text = "\r\n\
\n\
   \t\n\
# a plain comment\n\
#\n\
#HELP x doc without the space\n\
# TYPE x gauge \n\
# HELP y docs with \\\\ and \\n escapes\n\
  x 1\r\n\
y{} 2\n\
z {a=\"1\",} 3\n\
w{ a = \"1\" , b=\"2\" } 4\n\
v{a=\"1\"}5\n\
u\t6";
    let all = parse(text).expect("layout variants parse");
    let got: Vec<(&str, f64)> = all.iter().map(|s| (s.name.as_str(), s.value)).collect();
    assert_eq!(
        got,
        [
            ("x", 1.0),
            ("y", 2.0),
            ("z", 3.0),
            ("w", 4.0),
            ("v", 5.0),
            ("u", 6.0)
        ]
    );
    assert_eq!(all[3].labels, labels(&[("a", "1"), ("b", "2")]));
    assert!(parse("").expect("empty").is_empty());
    assert!(parse("\n\n# only comments\n").expect("comments").is_empty());
}

#[test]
fn colons_and_underscores_in_names() {
    let all = parse("job:rate5m:sum 1\n_private{_l=\"x\"} 2\n").expect("parses");
    assert_eq!(all[0].name, "job:rate5m:sum");
    assert_eq!(all[1].labels, labels(&[("_l", "x")]));
}

// === Parser: every malformed-line class ===

#[test]
fn malformed_lines_report_line_and_reason() {
    let cases: &[(&str, usize, &str)] = &[
        ("ok 1\n1abc 1\n", 2, "invalid metric name"),
        ("{a=\"b\"} 1", 1, "invalid metric name"),
        ("foo-bar 1", 1, "invalid character in metric name"),
        ("foo", 1, "missing value"),
        ("foo{a=\"b\"}", 1, "missing value"),
        ("foo abc", 1, "invalid value"),
        ("foo 0x10", 1, "invalid value"),
        ("foo 1,5", 1, "invalid value"),
        ("foo 1 12.5", 1, "invalid timestamp"),
        ("foo 1 99999999999999999999", 1, "invalid timestamp"),
        ("foo 1 2 3", 1, "unexpected text after the value"),
        (
            "foo{a=\"b\" 1",
            1,
            "expected ',' or '}' after a label value",
        ),
        ("foo{a=\"b\"", 1, "unterminated label set"),
        ("foo{", 1, "unterminated label set"),
        ("foo{a=\"b\",", 1, "unterminated label set"),
        ("foo{a=\"b} 1", 1, "unterminated label value"),
        ("foo{a=\"b\\", 1, "unterminated label value"),
        (
            "foo{a=\"\\t\"} 1",
            1,
            "invalid escape sequence in label value",
        ),
        ("foo{a=b} 1", 1, "label value must be quoted"),
        ("foo{a} 1", 1, "expected '=' after a label name"),
        ("foo{1a=\"b\"} 1", 1, "invalid label name"),
        ("foo{a:b=\"c\"} 1", 1, "expected '=' after a label name"),
        ("foo{,} 1", 1, "invalid label name"),
        ("foo{a=\"1\",a=\"2\"} 1", 1, "duplicate label name"),
        ("foo{__name__=\"x\"} 1", 1, "reserved label name __name__"),
        (
            "# TYPE foo gauge\n# TYPE foo counter\n",
            2,
            "second TYPE line for a metric name",
        ),
        (
            "# HELP foo a\n# HELP foo b\n",
            2,
            "second HELP line for a metric name",
        ),
        ("# TYPE foo bar", 1, "unknown metric type"),
        ("# TYPE foo", 1, "TYPE line without a type"),
        ("# TYPE foo ", 1, "TYPE line without a type"),
        ("# TYPE", 1, "TYPE line without a metric name"),
        ("# TYPE 9foo gauge", 1, "invalid metric name in TYPE line"),
        ("# TYPE foo{} gauge", 1, "invalid metric name in TYPE line"),
        (
            "# TYPE foo gauge extra",
            1,
            "unexpected text after the type",
        ),
        ("# HELP", 1, "HELP line without a metric name"),
        ("# HELP -x doc", 1, "invalid metric name in HELP line"),
        ("# HELP x\u{1} doc", 1, "invalid metric name in HELP line"),
        (
            "# HELP x bad \\t escape",
            1,
            "invalid escape sequence in HELP text",
        ),
        (
            "# HELP x trailing \\",
            1,
            "invalid escape sequence in HELP text",
        ),
        (
            "# TYPE h histogram\nh_bucket{le=\"x\"} 1\n",
            2,
            "histogram bucket without a numeric le label",
        ),
        (
            "# TYPE h histogram\nh_bucket 1\n",
            2,
            "histogram bucket without a numeric le label",
        ),
        (
            "# TYPE h histogram\nh 1\n",
            2,
            "histogram sample without a _bucket, _sum or _count suffix",
        ),
        (
            "# TYPE s summary\ns_sum 1\ns{quantile=\"p50\"} 1\n",
            3,
            "summary quantile without a numeric quantile label",
        ),
        (
            "# TYPE s summary\ns 1\n",
            2,
            "summary quantile without a numeric quantile label",
        ),
    ];
    for &(text, line, reason) in cases {
        assert_eq!(
            parse(text),
            Err(ParseError { line, reason }),
            "input {text:?}"
        );
    }
    let e = parse("x 1\ny").unwrap_err();
    assert_eq!(e.to_string(), "line 2: missing value");
    assert_eq!(e.kind(), "parse");
}

#[test]
fn family_rules_only_apply_to_declared_families() {
    // Undeclared `_bucket` and suffix-named counters are ordinary metrics.
    parse("h_bucket 1\n# TYPE c_count counter\nc_count 2\n").expect("ordinary");
    parse("# TYPE s summary\ns_bucket 1\n").expect("not a histogram");
}

#[test]
fn invalid_utf8_is_reported_on_its_line() {
    let body = b"a 1\nb{x=\"\xff\"} 2\n";
    assert_eq!(
        parse_bytes(body, &|_| true),
        Err(ParseError {
            line: 2,
            reason: "invalid UTF-8"
        })
    );
}

#[test]
fn filtered_out_lines_are_still_checked() {
    let e = parse_filtered("keep_me 1\ndrop_me{a=b} 1\n", &|n| n.starts_with("keep")).unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn keep_prefixes() {
    let keep = vec!["spire_server_ca_manager_*".to_string(), "exact".to_string()];
    assert!(keeps(&keep, "spire_server_ca_manager_x509_ca_prepare"));
    assert!(keeps(&keep, "exact_elapsed_time"));
    assert!(!keeps(&keep, "spire_server_ca"));
    assert!(keeps(&[], "anything"));
}

// === Parser: robustness ===

/// xorshift64*: deterministic, dependency-free randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Renders samples back to text (no TYPE lines), for round trips.
fn render(samples: &[Sample]) -> String {
    let mut out = String::new();
    for s in samples {
        out.push_str(&s.name);
        out.push('{');
        for (k, v) in &s.labels {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            out.push_str(&format!("{k}=\"{v}\","));
        }
        out.push_str(&format!("}} {:?}\n", s.value));
    }
    out
}

fn same(a: &[Sample], b: &[Sample]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.labels == y.labels
                && (x.value == y.value || (x.value.is_nan() && y.value.is_nan()))
        })
}

/// Whatever parses satisfies the invariants and survives a round trip.
fn check(input: &[u8]) {
    let Ok(samples) = parse_bytes(input, &|_| true) else {
        return;
    };
    for s in &samples {
        assert!(!s.name.is_empty());
        assert!(s.labels.windows(2).all(|w| w[0].0 < w[1].0), "{s:?}");
    }
    let again = parse(&render(&samples)).expect("rendered samples parse");
    assert!(same(&samples, &again), "round trip of {input:?}");
}

#[test]
fn truncations_never_panic() {
    for doc in [AGENT, SERVER, ENVOY] {
        for end in 0..=doc.len() {
            check(&doc.as_bytes()[..end]);
        }
    }
}

#[test]
fn random_token_soup_never_panics() {
    const TOKENS: &[&str] = &[
        "#",
        " ",
        "\t",
        "\n",
        "\r",
        "{",
        "}",
        "\"",
        "\\",
        "=",
        ",",
        "a",
        "_",
        ":",
        "1",
        ".",
        "e",
        "+",
        "-",
        "Inf",
        "NaN",
        "HELP",
        "TYPE",
        "counter",
        "histogram",
        "summary",
        "le",
        "quantile",
        "_bucket",
        "_sum",
        "é",
        "✓",
        "0.5",
        "foo",
        "n",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..5000 {
        let len = rng.below(60);
        let text: String = (0..len).map(|_| TOKENS[rng.below(TOKENS.len())]).collect();
        check(text.as_bytes());
    }
}

#[test]
fn random_mutations_never_panic() {
    let mut rng = Rng(42);
    let seeds = [AGENT.as_bytes(), SERVER.as_bytes(), ENVOY.as_bytes()];
    for _ in 0..3000 {
        let mut doc = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..=rng.below(8) {
            let at = rng.below(doc.len() + 1);
            match rng.below(3) {
                0 if at < doc.len() => doc[at] = rng.next() as u8,
                1 => doc.insert(at, rng.next() as u8),
                _ if at < doc.len() => {
                    doc.remove(at);
                }
                _ => {}
            }
        }
        check(&doc);
    }
}

#[test]
fn large_inputs_stay_linear() {
    // A 4 MiB exposition and a 1 MiB single line parse quickly (bounded work).
    let line = "spire_agent_manager_sync_fetch_entries_updates{host=\"node-a\",status=\"OK\"} 1\n";
    let big = line.repeat(4 * 1024 * 1024 / line.len());
    let started = tokio::time::Instant::now();
    let n = parse_filtered(&big, &|_| false).expect("big parses").len();
    assert_eq!(n, 0);
    let long_label = format!("m{{a=\"{}\"}} 1\n", "x".repeat(1024 * 1024));
    assert_eq!(parse(&long_label).expect("long line").len(), 1);
    let many_labels: String = (0..20_000).map(|i| format!("l{i}=\"v\",")).collect();
    assert_eq!(
        parse(&format!("m{{{many_labels}}} 1")).expect("many labels")[0]
            .labels
            .len(),
        20_000
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

// === Sensor ===

const WAIT: Duration = Duration::from_secs(10);
const T0: u64 = 1_700_000_000;

struct Running {
    sensor: MetricsScrapeSensor,
    metrics: Arc<Metrics>,
    clock: Arc<ManualClock>,
    wake: Arc<Notify>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

fn start(settings: Settings) -> Running {
    start_with(settings, None)
}

fn start_with(settings: Settings, handshakes: Option<Counter>) -> Running {
    let metrics = Arc::new(Metrics::new());
    let clock = Arc::new(ManualClock::at_unix(T0));
    let wake = Arc::new(Notify::new());
    let (sensor, task) = build(settings, clock.clone(), metrics.clone(), wake.clone());
    let task = match handshakes {
        Some(counter) => task.with_handshakes(counter),
        None => task,
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(task.run(token.clone()));
    Running {
        sensor,
        metrics,
        clock,
        wake,
        token,
        task,
    }
}

impl Running {
    async fn view(&self) -> Arc<MetricsView> {
        let mut readings = self.sensor.observe().await.expect("observe never fails");
        assert_eq!(readings.len(), 1);
        match readings.remove(0) {
            Reading::Metrics(v) => v,
            other => panic!("metrics_scrape produced {other:?}"),
        }
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&MetricsView) -> bool) -> Arc<MetricsView> {
        crate::sensors::wait_for_view(self.sensor.subscribe(), what, WAIT, done).await
    }

    fn errors(&self, kind: &str) -> f64 {
        let series = format!(r#"spire_healer_errors_total{{kind="{kind}",stage="sensor"}}"#);
        sample(&self.metrics.render(), &series).unwrap_or(0.0)
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("task stops on shutdown")
            .expect("task does not panic");
    }
}

fn settings(url: String, role: Role) -> Settings {
    Settings::new(
        "node-a",
        role,
        url,
        Duration::from_millis(20),
        Duration::from_millis(500),
    )
}

/// A server whose reply the test can swap.
async fn switchable(initial: Reply) -> (TestServer, Arc<Mutex<Reply>>) {
    let reply = Arc::new(Mutex::new(initial));
    let current = reply.clone();
    let server = TestServer::start(move |_| current.lock().expect("reply lock").clone()).await;
    (server, reply)
}

#[tokio::test]
async fn scrapes_filters_and_stamps_with_the_clock() {
    let (server, _) = switchable(Reply::Status(200, AGENT.as_bytes().to_vec())).await;
    let r = start(settings(server.url("/metrics"), Role::Agent));
    let before = r.view().await;
    assert!(!before.reachable && before.last_error.is_none() && before.samples.is_empty());

    r.clock.advance(Duration::from_secs(5));
    let v = r.wait_for("first scrape", |v| v.reachable).await;
    assert_eq!(v.target, "node-a");
    assert_eq!(v.role, Role::Agent);
    assert_eq!(v.last_error, None);
    assert_eq!(v.updated_at, UNIX_EPOCH + Duration::from_secs(T0 + 5));
    assert_eq!(v.samples.len(), 14);
    assert_eq!(sync_failures(&v.samples), Some(9.0));
    assert!(server.hits() >= 1);
    assert_eq!(
        r.errors("connect") + r.errors("parse") + r.errors("http_status"),
        0.0
    );
    r.stop().await;
}

#[tokio::test]
async fn failures_clear_samples_and_count_errors() {
    let (server, reply) = switchable(Reply::Status(200, SERVER.as_bytes().to_vec())).await;
    let r = start(settings(server.url("/metrics"), Role::Server));
    let v = r.wait_for("scraped", |v| v.reachable).await;
    assert_eq!(v.samples.len(), 11);

    *reply.lock().expect("lock") = Reply::Status(503, b"busy".to_vec());
    let v = r
        .wait_for("http_status", |v| {
            v.last_error.as_deref() == Some("http_status")
        })
        .await;
    assert!(!v.reachable);
    assert!(v.samples.is_empty(), "no stale counters");
    assert!(r.errors("http_status") >= 1.0);

    *reply.lock().expect("lock") = Reply::Status(
        200,
        b"spire_server_uptime_in_ms{host=\"s\"} oops\n".to_vec(),
    );
    r.wait_for("parse", |v| v.last_error.as_deref() == Some("parse"))
        .await;
    assert!(r.errors("parse") >= 1.0);

    *reply.lock().expect("lock") = Reply::Raw(b"garbage\r\n\r\n".to_vec());
    r.wait_for("protocol", |v| v.last_error.as_deref() == Some("protocol"))
        .await;
    assert!(r.errors("protocol") >= 1.0);

    *reply.lock().expect("lock") = Reply::Hang;
    r.wait_for("timeout", |v| v.last_error.as_deref() == Some("timeout"))
        .await;
    assert!(r.errors("timeout") >= 1.0);

    *reply.lock().expect("lock") = Reply::Status(200, SERVER.as_bytes().to_vec());
    let v = r.wait_for("recovered", |v| v.reachable).await;
    assert_eq!(v.last_error, None);
    assert_eq!(datastore_failures(&v.samples), Some(6.0));

    server.stop().await;
    let v = r
        .wait_for("gone", |v| v.last_error.as_deref() == Some("connect"))
        .await;
    assert!(!v.reachable && v.samples.is_empty());
    assert!(r.errors("connect") >= 1.0);
    r.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let (server, _) = switchable(Reply::Endless).await;
    let mut s = settings(server.url("/metrics"), Role::Agent);
    s.max_body = 64 * 1024;
    let r = start(s);
    r.wait_for("too_large", |v| {
        v.last_error.as_deref() == Some("too_large")
    })
    .await;
    assert!(r.errors("too_large") >= 1.0);
    r.stop().await;
}

#[tokio::test]
async fn large_bodies_parse_off_the_runtime() {
    // Over the inline threshold: parsed on the blocking pool, same result.
    let padding = "go_goroutines 1\n".repeat(2 * INLINE_PARSE_MAX / 16);
    let body = format!("{AGENT}{padding}");
    let (server, _) = switchable(Reply::Status(200, body.into_bytes())).await;
    let r = start(settings(server.url("/metrics"), Role::Agent));
    let v = r.wait_for("scraped", |v| v.reachable).await;
    assert_eq!(v.samples.len(), 14);
    assert_eq!(r.errors("parse"), 0.0);
    r.stop().await;
}

#[tokio::test]
async fn wakes_the_loop_when_reachability_changes() {
    let (server, reply) = switchable(Reply::Status(200, AGENT.as_bytes().to_vec())).await;
    let r = start(settings(server.url("/metrics"), Role::Agent));
    tokio::time::timeout(WAIT, r.wake.notified())
        .await
        .expect("woken on first success");
    *reply.lock().expect("lock") = Reply::Status(500, Vec::new());
    tokio::time::timeout(WAIT, r.wake.notified())
        .await
        .expect("woken on failure");
    assert!(r.errors("http_status") >= 1.0);
    r.stop().await;
}

#[tokio::test]
async fn invalid_url_is_counted() {
    let r = start(settings(
        "https://127.0.0.1:9988/metrics".into(),
        Role::Agent,
    ));
    let v = r.wait_for("invalid_url", |v| v.last_error.is_some()).await;
    assert_eq!(v.last_error.as_deref(), Some("invalid_url"));
    assert!(r.errors("invalid_url") >= 1.0);
    assert_eq!(r.sensor.name(), "metrics_scrape");
    assert_eq!(r.sensor.instance(), "node-a");
    r.stop().await;
}

// === Envoy: TLS counters into handshake outcomes ===

#[test]
fn envoy_keep_list() {
    let keep = default_keep(Role::Envoy);
    let kept = parse_filtered(ENVOY, &|n| keeps(&keep, n)).expect("parses");
    let names: Vec<&str> = kept.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "envoy_listener_ssl_handshake",
            "envoy_cluster_ssl_fail_verify_error",
            "envoy_listener_server_ssl_socket_factory_downstream_context_secrets_not_ready",
            "envoy_listener_ssl_certificate_expiration_unix_time_seconds",
        ]
    );
    assert_eq!(uptime(&kept, Role::Envoy), None);
}

#[tokio::test]
async fn envoy_scrapes_feed_the_handshake_counter() {
    use crate::handshake::{Counter, Reason};
    use std::collections::BTreeMap;

    let (server, reply) = switchable(Reply::Status(200, ENVOY.as_bytes().to_vec())).await;
    let counter = Counter::default();
    let r = start_with(
        settings(server.url("/metrics"), Role::Envoy),
        Some(counter.clone()),
    );
    let v = r.wait_for("baseline scrape", |v| v.reachable).await;
    assert_eq!(v.role, Role::Envoy);
    assert_eq!(v.samples.len(), 4);
    assert!(
        counter.drain().is_empty(),
        "the first scrape is only a baseline"
    );

    let later = ENVOY
        .replace("} 1742", "} 1750")
        .replace(
            "envoy_cluster_name=\"backend\"} 3",
            "envoy_cluster_name=\"backend\"} 5",
        )
        .replace(
            "downstream_context_secrets_not_ready{envoy_listener_address=\"0.0.0.0_8443\"} 0",
            "downstream_context_secrets_not_ready{envoy_listener_address=\"0.0.0.0_8443\"} 1",
        );
    assert_ne!(later, ENVOY);
    *reply.lock().expect("lock") = Reply::Status(200, later.into_bytes());

    let want: BTreeMap<(String, Reason), u64> = [
        (("node-a/listener/0.0.0.0_8443".to_string(), Reason::Ok), 8),
        (("node-a/cluster/backend".to_string(), Reason::UnknownCa), 2),
        (
            ("node-a/listener/0.0.0.0_8443".to_string(), Reason::Refused),
            1,
        ),
    ]
    .into_iter()
    .collect();
    // Each scrape counts its outcomes before it publishes its view, so
    // every published view is a moment to drain the counter.
    let mut scraped = r.sensor.subscribe();
    let mut got: BTreeMap<(String, Reason), u64> = BTreeMap::new();
    let counted = tokio::time::timeout(WAIT, async {
        while got != want {
            for (target, counts) in counter.drain() {
                assert_eq!(counts.source_names(), vec!["envoy"]);
                for reason in Reason::ALL {
                    if counts.get(reason) > 0 {
                        *got.entry((target.to_string(), reason)).or_default() += counts.get(reason);
                    }
                }
            }
            if got != want {
                scraped.changed().await.expect("the scrape task runs");
            }
        }
    })
    .await;
    assert!(
        counted.is_ok(),
        "outcomes not counted within {WAIT:?}: {got:?}"
    );
    let text = r.metrics.render();
    let total = |reason: &str| {
        sample(
            &text,
            &format!(r#"spire_healer_handshakes_total{{reason="{reason}",source="envoy"}}"#),
        )
    };
    assert_eq!(total("ok"), Some(8.0));
    assert_eq!(total("unknown_ca"), Some(2.0));
    assert_eq!(total("refused"), Some(1.0));
    let slo = |result: &str| {
        sample(
            &text,
            &format!(r#"spire_healer_slo_events_total{{result="{result}",slo="handshake"}}"#),
        )
    };
    assert_eq!(slo("good"), Some(8.0));
    assert_eq!(slo("bad"), Some(3.0));
    assert_eq!(r.errors("http_status") + r.errors("parse"), 0.0);
    r.stop().await;
}

#[tokio::test]
async fn agents_ignore_the_handshake_counter() {
    let (server, _) = switchable(Reply::Status(200, AGENT.as_bytes().to_vec())).await;
    let counter = Counter::default();
    let r = start_with(
        settings(server.url("/metrics"), Role::Agent),
        Some(counter.clone()),
    );
    r.wait_for("scraped", |v| v.reachable).await;
    assert!(counter.drain().is_empty());
    r.stop().await;
}

/// Agent sync counters from scrape to scrape: a rise is a sync seen, a
/// stall ages, a restart or an expired-then-recreated OK series starts
/// afresh, an OK series gone while failures count keeps the age.
#[test]
fn sync_counters_follow_the_agents_syncs() {
    let t = |s: u64| UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
    let sample = |status: &str, v: f64| Sample {
        name: "spire_agent_manager_sync_fetch_entries_updates".into(),
        labels: vec![
            ("host".into(), "h".into()),
            ("status".into(), status.into()),
        ],
        value: v,
    };
    let uptime = |ms: f64| Sample {
        name: "spire_agent_uptime_in_ms".into(),
        labels: vec![("host".into(), "h".into())],
        value: ms,
    };
    // No sync counted yet: unknown.
    assert_eq!(track_sync(None, &[uptime(1_000.0)], t(0)), None);
    let c = track_sync(None, &[sample("OK", 5.0), uptime(5_000.0)], t(1)).unwrap();
    assert_eq!((c.ok_seen_at, c.confirmed_stale()), (t(1), Duration::ZERO));
    // A sync: seen at the scrape that shows it.
    let c = track_sync(Some(&c), &[sample("OK", 6.0), uptime(6_000.0)], t(2)).unwrap();
    assert_eq!(c.ok_seen_at, t(2));
    // The server is lost: failures, no OK rise; the age grows.
    let failing = [
        sample("OK", 6.0),
        sample("Unavailable", 2.0),
        uptime(9_000.0),
    ];
    let c = track_sync(Some(&c), &failing, t(9)).unwrap();
    assert_eq!(c.confirmed_stale(), Duration::from_secs(7));
    assert_eq!(c.failed_since_ok(), 2.0);
    // The OK series expired (go-metrics) while failures go on: still stale.
    let expired = [sample("Unavailable", 5.0), uptime(20_000.0)];
    let c = track_sync(Some(&c), &expired, t(20)).unwrap();
    assert_eq!((c.ok, c.confirmed_stale()), (6.0, Duration::from_secs(18)));
    assert_eq!(c.failed_since_ok(), 5.0);
    // Back: the OK series starts again lower: a sync.
    let back = [
        sample("OK", 1.0),
        sample("Unavailable", 5.0),
        uptime(21_000.0),
    ];
    let c = track_sync(Some(&c), &back, t(21)).unwrap();
    assert_eq!((c.ok_seen_at, c.failed_since_ok()), (t(21), 0.0));
    // A restart (uptime dropped) with an OK count equal by chance: afresh.
    let restarted = [sample("OK", 1.0), uptime(500.0)];
    let c2 = track_sync(Some(&c), &restarted, t(40)).unwrap();
    assert_eq!(c2.ok_seen_at, t(40));
    // Without the restart, the same count at 40 is 19 s without a sync.
    let same = [sample("OK", 1.0), uptime(40_000.0)];
    let c3 = track_sync(Some(&c), &same, t(40)).unwrap();
    assert_eq!(c3.confirmed_stale(), Duration::from_secs(19));
}
