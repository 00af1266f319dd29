//! Fuzzes the PEM intake for certificate files: no input may panic; what
//! parses is a list of whole DER certificates that `leaf_info` can read
//! (or reject cleanly) and that survives a render/parse round trip.
//!
//! Run: `cargo +nightly fuzz run pem_intake fuzz/corpus/pem_intake fuzz/pem_seeds -- -dict=fuzz/pem.dict`

#![no_main]

use libfuzzer_sys::fuzz_target;
use spire_healer::svid::leaf_info;
use spire_healer::svid::pem::parse_certificates;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let certs = match parse_certificates(data, MAX) {
        Ok(certs) => certs,
        Err(e) => {
            // Every error has a label from the closed set.
            assert!(!e.kind().is_empty());
            return;
        }
    };
    assert!(!certs.is_empty());
    for der in &certs {
        assert!(!der.is_empty());
        let _ = leaf_info(der);
    }
    let again = parse_certificates(render(&certs).as_bytes(), usize::MAX)
        .expect("rendered certificates parse");
    assert_eq!(again, certs, "round trip");
});

fn render(certs: &[Vec<u8>]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for der in certs {
        let b64 = encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\r\n");
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", std::str::from_utf8(line).unwrap_or(""));
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Standard base64 with padding, written here so the target checks the
/// parser against an independent encoder.
fn encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
