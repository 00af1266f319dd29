//! Table tests of the converter: baseline, increments, restarts, unknown
//! series, the series bound.

use super::*;

fn s(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    labels.sort();
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

const L: &str = "envoy_listener_address";
const C: &str = "envoy_cluster_name";

fn listener(metric: &str, value: f64) -> Sample {
    s(
        &format!("envoy_listener_{metric}"),
        &[(L, "0.0.0.0_8443")],
        value,
    )
}

fn cluster(metric: &str, value: f64) -> Sample {
    s(&format!("envoy_cluster_{metric}"), &[(C, "backend")], value)
}

fn d(target: &str, reason: Reason, n: u64) -> (String, Reason, u64) {
    (target.to_string(), reason, n)
}

const LT: &str = "edge/listener/0.0.0.0_8443";
const CT: &str = "edge/cluster/backend";

#[test]
fn first_scrape_is_only_the_baseline() {
    let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
    let first = [
        listener("ssl_handshake", 1742.0),
        cluster("ssl_fail_verify_error", 3.0),
    ];
    assert!(e.deltas(&first).is_empty());
    assert_eq!(e.tracked(), 2);
    // Same values again: nothing happened.
    assert!(e.deltas(&first).is_empty());
}

#[test]
fn every_mapped_counter_and_its_reason() {
    let table: [(Sample, &str, Reason); 14] = [
        (listener("ssl_handshake", 5.0), LT, Reason::Ok),
        (cluster("ssl_handshake", 5.0), CT, Reason::Ok),
        (listener("ssl_connection_error", 5.0), LT, Reason::Protocol),
        (cluster("ssl_connection_error", 5.0), CT, Reason::Protocol),
        (
            listener("ssl_fail_verify_error", 5.0),
            LT,
            Reason::UnknownCa,
        ),
        (cluster("ssl_fail_verify_error", 5.0), CT, Reason::UnknownCa),
        (
            listener("ssl_fail_verify_san", 5.0),
            LT,
            Reason::BadSpiffeId,
        ),
        (cluster("ssl_fail_verify_san", 5.0), CT, Reason::BadSpiffeId),
        (
            listener("ssl_fail_verify_cert_hash", 5.0),
            LT,
            Reason::BadSpiffeId,
        ),
        (
            cluster("ssl_fail_verify_cert_hash", 5.0),
            CT,
            Reason::BadSpiffeId,
        ),
        (
            listener("ssl_fail_verify_no_cert", 5.0),
            LT,
            Reason::NoClientCert,
        ),
        (
            cluster("ssl_fail_verify_no_cert", 5.0),
            CT,
            Reason::NoClientCert,
        ),
        (
            listener(
                "server_ssl_socket_factory_downstream_context_secrets_not_ready",
                5.0,
            ),
            LT,
            Reason::Refused,
        ),
        (
            cluster(
                "client_ssl_socket_factory_upstream_context_secrets_not_ready",
                5.0,
            ),
            CT,
            Reason::Refused,
        ),
    ];
    for (sample, target, reason) in table {
        let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
        let mut base = sample.clone();
        base.value = 2.0;
        assert!(e.deltas(&[base]).is_empty());
        assert_eq!(
            e.deltas(std::slice::from_ref(&sample)),
            vec![d(target, reason, 3)],
            "{}",
            sample.name
        );
    }
}

#[test]
fn increments_are_summed_per_target_and_reason() {
    let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
    e.deltas(&[
        listener("ssl_handshake", 100.0),
        listener("ssl_fail_verify_san", 1.0),
        listener("ssl_fail_verify_cert_hash", 0.0),
        cluster("ssl_fail_verify_error", 3.0),
    ]);
    let got = e.deltas(&[
        listener("ssl_handshake", 150.0),
        listener("ssl_fail_verify_san", 3.0),
        listener("ssl_fail_verify_cert_hash", 4.0),
        cluster("ssl_fail_verify_error", 3.0),
    ]);
    assert_eq!(
        got,
        vec![d(LT, Reason::Ok, 50), d(LT, Reason::BadSpiffeId, 6)],
        "the unchanged cluster counter adds nothing"
    );
}

#[test]
fn a_counter_going_down_is_an_envoy_restart() {
    let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
    e.deltas(&[listener("ssl_handshake", 1000.0)]);
    assert_eq!(
        e.deltas(&[listener("ssl_handshake", 7.0)]),
        vec![d(LT, Reason::Ok, 7)]
    );
    assert_eq!(
        e.deltas(&[listener("ssl_handshake", 9.0)]),
        vec![d(LT, Reason::Ok, 2)]
    );
}

#[test]
fn new_series_after_the_baseline_are_baselined_and_gone_ones_are_forgotten() {
    let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
    e.deltas(&[listener("ssl_handshake", 10.0)]);
    // A series first seen now may carry a long history (it was over the
    // bound, or absent from a scrape): baselined, never one big burst.
    assert!(
        e.deltas(&[
            listener("ssl_handshake", 10.0),
            cluster("ssl_fail_verify_error", 4000.0),
        ])
        .is_empty()
    );
    assert_eq!(
        e.deltas(&[
            listener("ssl_handshake", 10.0),
            cluster("ssl_fail_verify_error", 4004.0),
        ]),
        vec![d(CT, Reason::UnknownCa, 4)]
    );
    // The cluster disappears, then comes back: baselined again.
    assert!(e.deltas(&[listener("ssl_handshake", 10.0)]).is_empty());
    assert_eq!(e.tracked(), 1);
    assert!(
        e.deltas(&[
            listener("ssl_handshake", 10.0),
            cluster("ssl_fail_verify_error", 1.0),
        ])
        .is_empty()
    );
    assert_eq!(e.tracked(), 2);
}

#[test]
fn unknown_and_unusable_samples_are_ignored() {
    let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
    let noise = |v: f64| {
        vec![
            // Not an outcome, or a success already in `ssl_handshake`.
            listener("ssl_session_reused", v),
            listener("ssl_no_certificate", v),
            s(
                "envoy_listener_ssl_ciphers",
                &[(L, "0.0.0.0_8443"), ("envoy_ssl_cipher", "AES")],
                v,
            ),
            s(
                "envoy_listener_ssl_certificate_expiration_unix_time_seconds",
                &[(L, "0.0.0.0_8443")],
                v,
            ),
            s("envoy_control_plane_connected_state", &[], v),
            // Mapped name without its scope label, or an empty one.
            s("envoy_listener_ssl_handshake", &[], v),
            s("envoy_cluster_ssl_handshake", &[(C, "")], v),
            // A listener counter with a cluster label.
            s("envoy_listener_ssl_handshake", &[(C, "backend")], v),
            // Not a number or negative.
            listener("ssl_fail_verify_error", f64::NAN),
            cluster("ssl_fail_verify_error", -v),
        ]
    };
    assert!(e.deltas(&noise(1.0)).is_empty());
    assert!(e.deltas(&noise(100.0)).is_empty());
    assert_eq!(e.tracked(), 0);
}

#[test]
fn extra_labels_are_summed_into_one_series() {
    let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
    let scrape = |a: f64, b: f64| {
        vec![
            s(
                "envoy_listener_ssl_handshake",
                &[(L, "0.0.0.0_8443"), ("worker", "0")],
                a,
            ),
            s(
                "envoy_listener_ssl_handshake",
                &[(L, "0.0.0.0_8443"), ("worker", "1")],
                b,
            ),
        ]
    };
    e.deltas(&scrape(1.0, 2.0));
    assert_eq!(e.deltas(&scrape(2.0, 4.0)), vec![d(LT, Reason::Ok, 3)]);
    assert_eq!(e.tracked(), 1);
}

#[test]
fn the_series_bound_keeps_known_series_and_drops_new_ones() {
    let mut e = EnvoyTls::new("edge", 2);
    let lst = |addr: &str, v: f64| s("envoy_listener_ssl_handshake", &[(L, addr)], v);
    e.deltas(&[lst("b", 1.0), lst("c", 1.0), lst("a", 1.0)]);
    // Stable order: `a` and `b` are kept, `c` is dropped.
    assert_eq!(e.tracked(), 2);
    assert_eq!(e.dropped(), 1);
    assert_eq!(
        e.deltas(&[lst("a", 2.0), lst("b", 3.0), lst("c", 9.0)]),
        vec![
            d("edge/listener/a", Reason::Ok, 1),
            d("edge/listener/b", Reason::Ok, 2),
        ]
    );
    assert_eq!(e.dropped(), 2);
    // A new series sorting first does not evict a known one.
    assert_eq!(
        e.deltas(&[lst("0", 5.0), lst("a", 3.0), lst("b", 3.0)]),
        vec![d("edge/listener/a", Reason::Ok, 1)]
    );
    assert_eq!(e.tracked(), 2);
    // Room frees up when a known series goes away; the newcomer is
    // baselined first, then counted.
    assert!(e.deltas(&[lst("0", 6.0), lst("a", 3.0)]).is_empty());
    assert_eq!(
        e.deltas(&[lst("0", 8.0), lst("a", 3.0)]),
        vec![d("edge/listener/0", Reason::Ok, 2)]
    );
}

#[test]
fn parses_the_envoy_seed_and_keep_list_matches() {
    let text = include_str!("../../../fuzz/seeds/envoy.prom");
    let keep: Vec<String> = ENVOY_KEEP.iter().map(|s| (*s).to_string()).collect();
    let samples = crate::sensors::metrics_scrape::parse_filtered(text, &|n| {
        crate::sensors::metrics_scrape::keeps(&keep, n)
    })
    .expect("seed parses");
    let names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "envoy_listener_ssl_handshake",
            "envoy_cluster_ssl_fail_verify_error",
            "envoy_listener_server_ssl_socket_factory_downstream_context_secrets_not_ready",
            "envoy_listener_ssl_certificate_expiration_unix_time_seconds",
        ]
    );
    let mut e = EnvoyTls::new("edge", DEFAULT_MAX_SERIES);
    assert!(e.deltas(&samples).is_empty());
    assert_eq!(e.tracked(), 3);
}
