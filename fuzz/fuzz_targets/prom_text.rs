//! Fuzzes the Prometheus text parser: no input may panic, and whatever
//! parses must satisfy the invariants, survive a render/parse round trip
//! and filter consistently.
//!
//! Run: `cargo +nightly fuzz run prom_text fuzz/corpus fuzz/seeds -- -dict=fuzz/prom_text.dict`

#![no_main]

use libfuzzer_sys::fuzz_target;
use spire_healer::model::Sample;
use spire_healer::sensors::metrics_scrape::{parse, parse_bytes};

fuzz_target!(|data: &[u8]| {
    let Ok(samples) = parse_bytes(data, &|_| true) else {
        return;
    };
    for s in &samples {
        assert!(valid_name(&s.name), "{s:?}");
        assert!(s.labels.windows(2).all(|w| w[0].0 < w[1].0), "{s:?}");
    }
    let again = parse(&render(&samples)).expect("rendered samples parse");
    assert!(same(&samples, &again), "round trip");
    let even = |n: &str| n.len() % 2 == 0;
    let kept = parse_bytes(data, &even).expect("the same input parses");
    let want: Vec<Sample> = samples.iter().filter(|s| even(&s.name)).cloned().collect();
    assert!(same(&kept, &want), "filter");
});

fn valid_name(n: &str) -> bool {
    let mut bytes = n.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

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
                && (x.value.to_bits() == y.value.to_bits()
                    || (x.value.is_nan() && y.value.is_nan()))
        })
}
