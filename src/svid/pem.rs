//! Strict PEM intake for certificate files on disk, as spiffe-helper and
//! similar tools write them: `svid.pem` (the chain, leaf first) and
//! `bundle.pem` (the trust bundle).
//!
//! Only `CERTIFICATE` blocks (RFC 7468 §5) are accepted. Text outside the
//! blocks (comments, `openssl x509 -text` output) is ignored, and CRLF line
//! ends are fine. Everything else is rejected with one error from a closed
//! set. A file a writer has not finished (`BEGIN` with no `END`) reads as
//! [`PemError::Truncated`], so a reader racing a non-atomic write sees an
//! error, not a shorter chain.
//!
//! This module is policy, not a second PEM decoder: it finds the blocks,
//! checks their labels and framing, and hands each body to the PEM reader of
//! `rustls-pki-types` (the one PEM library in the crate), which only skips
//! what it does not know and so cannot say why a file is wrong. It works on
//! bytes, never panics and allocates a small multiple of the input's size.
//!
//! [`encode`] writes the same format, for the files and bundles the crate
//! produces itself.

use base64::Engine;
use rustls_pki_types::pem::{PemObject, SectionKind};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

const BEGIN: &[u8] = b"-----BEGIN ";
const END: &[u8] = b"-----END ";
const DASHES: &[u8] = b"-----";
const CERTIFICATE: &[u8] = b"CERTIFICATE";

/// Longest block label kept in an error message.
const LABEL_MAX: usize = 40;

/// Why a certificate file was rejected. Block indexes count `BEGIN` lines
/// from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// No bytes, or only whitespace.
    #[error("the file is empty")]
    Empty,
    /// Larger than the configured bound; nothing was parsed.
    #[error("the file has {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Size found.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// No PEM block at all, or a malformed `BEGIN`/`END` line.
    #[error("not PEM: {reason}")]
    NotPem {
        /// What was wrong.
        reason: &'static str,
    },
    /// A block starts but does not end: the file is cut short, typically
    /// half-written.
    #[error("PEM block {index} has no END line (the file is truncated)")]
    Truncated {
        /// The unfinished block.
        index: usize,
    },
    /// A block that is not a certificate, e.g. a private key.
    #[error("PEM block {index} is a {label:?}, not a CERTIFICATE")]
    NotACertificate {
        /// The block.
        index: usize,
        /// Its label (shortened, printable ASCII only).
        label: String,
    },
    /// The block body is not valid base64.
    #[error("PEM block {index} is not valid base64: {reason}")]
    BadBase64 {
        /// The block.
        index: usize,
        /// Decoder message.
        reason: String,
    },
    /// The block decodes, but not to exactly one DER X.509 certificate.
    #[error("PEM block {index} is not a DER certificate: {reason}")]
    BadDer {
        /// The block.
        index: usize,
        /// Parser message.
        reason: String,
    },
}

impl PemError {
    /// Stable snake_case label for metrics and views.
    pub fn kind(&self) -> &'static str {
        match self {
            PemError::Empty => "empty",
            PemError::TooLarge { .. } => "too_large",
            PemError::NotPem { .. } => "not_pem",
            PemError::Truncated { .. } => "truncated",
            PemError::NotACertificate { .. } => "not_a_certificate",
            PemError::BadBase64 { .. } => "bad_base64",
            PemError::BadDer { .. } => "bad_der",
        }
    }
}

/// Parses every `CERTIFICATE` block of `bytes` into its DER, in file order.
///
/// # Errors
///
/// The first problem found, in this order: [`PemError::TooLarge`] when
/// `bytes` exceeds `max_bytes`, [`PemError::Empty`], then per block
/// [`PemError::Truncated`] / [`PemError::NotPem`] (framing),
/// [`PemError::NotACertificate`], [`PemError::BadBase64`],
/// [`PemError::BadDer`]; finally [`PemError::NotPem`] if there was no block.
pub fn parse_certificates(bytes: &[u8], max_bytes: usize) -> Result<Vec<Vec<u8>>, PemError> {
    if bytes.len() > max_bytes {
        return Err(PemError::TooLarge {
            size: bytes.len(),
            max: max_bytes,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(PemError::Empty);
    }
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(at) = find(rest, BEGIN) {
        let index = out.len();
        let Block { label, body, after } = block(&rest[at + BEGIN.len()..], index)?;
        if label != CERTIFICATE {
            return Err(PemError::NotACertificate {
                index,
                label: printable(label),
            });
        }
        out.push(decode(body, index)?);
        rest = after;
    }
    if out.is_empty() {
        return Err(PemError::NotPem {
            reason: "no BEGIN line",
        });
    }
    Ok(out)
}

/// One PEM block: its label, its body and the input after its END line.
struct Block<'a> {
    label: &'a [u8],
    body: &'a [u8],
    after: &'a [u8],
}

/// Splits one block off `input`, which starts right after `-----BEGIN `.
fn block(input: &[u8], index: usize) -> Result<Block<'_>, PemError> {
    let Some(label_end) = find(input, DASHES) else {
        return Err(PemError::Truncated { index });
    };
    let label = &input[..label_end];
    if label.is_empty() || label.iter().any(|b| !b.is_ascii_graphic() && *b != b' ') {
        return Err(PemError::NotPem {
            reason: "malformed BEGIN line",
        });
    }
    let body_and_rest = &input[label_end + DASHES.len()..];
    let Some(body_end) = find(body_and_rest, DASHES) else {
        return Err(PemError::Truncated { index });
    };
    let body = &body_and_rest[..body_end];
    let tail = &body_and_rest[body_end..];
    let end_line = [END, label, DASHES].concat();
    if let Some(after) = tail.strip_prefix(end_line.as_slice()) {
        return Ok(Block { label, body, after });
    }
    // A writer cut short inside the END line, or a new block before this one
    // ended: both are an unfinished block.
    if end_line.starts_with(tail) || tail.starts_with(BEGIN) {
        return Err(PemError::Truncated { index });
    }
    Err(PemError::NotPem {
        reason: "END line does not match its BEGIN line",
    })
}

/// Decodes a block body (base64 with any line breaks and whitespace) and
/// checks it is exactly one DER certificate.
///
/// The body is put back on lines of its own between a canonical
/// `BEGIN`/`END` pair, so a single-line block decodes like any other. It
/// holds no `-----` (the framing stopped at the first), so the reader sees
/// exactly one `CERTIFICATE` section and can only fail on its base64.
fn decode(body: &[u8], index: usize) -> Result<Vec<u8>, PemError> {
    // The reader also takes base64 without its `=` padding; a PEM body is
    // padded to whole 4-character groups (RFC 7468 §3), so anything else is
    // refused as base64, not left to fail later as DER.
    let chars = body.iter().filter(|b| !b.is_ascii_whitespace()).count();
    if chars % 4 != 0 {
        return Err(PemError::BadBase64 {
            index,
            reason: format!("{chars} base64 characters: not padded to whole 4-character groups"),
        });
    }
    let framed = [
        b"-----BEGIN CERTIFICATE-----\n".as_slice(),
        body,
        b"\n-----END CERTIFICATE-----\n",
    ]
    .concat();
    let (_, der) =
        <(SectionKind, Vec<u8>)>::from_pem_slice(&framed).map_err(|e| PemError::BadBase64 {
            index,
            reason: e.to_string(),
        })?;
    match X509Certificate::from_der(&der) {
        Ok(([], _)) => Ok(der),
        Ok((trailing, _)) => Err(PemError::BadDer {
            index,
            reason: format!("{} trailing bytes after the certificate", trailing.len()),
        }),
        Err(e) => Err(PemError::BadDer {
            index,
            reason: e.to_string(),
        }),
    }
}

/// One PEM block with `label` around `der`: standard base64 on 64-column
/// lines, LF line ends, as RFC 7468 writes it and [`parse_certificates`]
/// reads it.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn printable(label: &[u8]) -> String {
    label
        .iter()
        .take(LABEL_MAX)
        .map(|&b| char::from(b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulated::issuer::{Flavor, TestCa};
    use std::time::{Duration, UNIX_EPOCH};

    const MAX: usize = 1 << 20;

    fn ca() -> TestCa {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        TestCa::new("example.org", t0, t0 + Duration::from_secs(86_400)).expect("ca")
    }

    fn leaf(ca: &TestCa) -> Vec<u8> {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        ca.issue(
            "spiffe://example.org/web",
            t0,
            t0 + Duration::from_secs(3600),
            Flavor::Valid,
        )
        .expect("leaf")
        .0
    }

    /// PEM with 64-column lines and the given line end.
    fn pem(label: &str, der: &[u8], eol: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut s = format!("-----BEGIN {label}-----{eol}");
        for chunk in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(chunk).expect("ascii"));
            s.push_str(eol);
        }
        s.push_str(&format!("-----END {label}-----{eol}"));
        s
    }

    fn kind(bytes: &[u8]) -> &'static str {
        parse_certificates(bytes, MAX).expect_err("rejected").kind()
    }

    #[test]
    fn chain_with_crlf_and_text_between_blocks() {
        let ca = ca();
        let leaf = leaf(&ca);
        let text = format!(
            "subject=O = SPIRE\r\n{}Bag Attributes: none\n\n{}trailing words\n",
            pem("CERTIFICATE", &leaf, "\r\n"),
            pem("CERTIFICATE", ca.der(), "\n"),
        );
        let certs = parse_certificates(text.as_bytes(), MAX).expect("parses");
        assert_eq!(certs, vec![leaf, ca.der().to_vec()]);
    }

    #[test]
    fn single_line_body_is_fine() {
        let ca = ca();
        let b64 = base64::engine::general_purpose::STANDARD.encode(ca.der());
        let text = format!("-----BEGIN CERTIFICATE-----{b64}-----END CERTIFICATE-----");
        assert_eq!(
            parse_certificates(text.as_bytes(), MAX).expect("parses"),
            vec![ca.der().to_vec()]
        );
    }

    #[test]
    fn every_error_kind() {
        let ca = ca();
        let good = pem("CERTIFICATE", ca.der(), "\n");
        // Cut inside the body, inside the END line, inside the BEGIN line.
        for cut in [good.len() / 2, good.len() - 5, 15] {
            assert_eq!(kind(&good.as_bytes()[..cut]), "truncated", "cut at {cut}");
        }
        // The first block unfinished, a second one after it.
        let half = &good[..good.len() / 2];
        assert_eq!(kind(format!("{half}\n{good}").as_bytes()), "truncated");
        // A second, half-written certificate after a good one.
        assert_eq!(kind(format!("{good}{half}").as_bytes()), "truncated");

        assert_eq!(kind(b""), "empty");
        assert_eq!(kind(b" \r\n\t\n"), "empty");
        assert_eq!(
            parse_certificates(good.as_bytes(), 10),
            Err(PemError::TooLarge {
                size: good.len(),
                max: 10
            })
        );
        assert_eq!(kind(b"hello world\n"), "not_pem");
        assert_eq!(kind(ca.der()), "not_pem", "raw DER is not PEM");
        assert_eq!(
            kind(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            "not_pem"
        );
        assert_eq!(kind(b"-----BEGIN \n-----END -----"), "not_pem");

        let key = pem("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00], "\n");
        assert_eq!(
            parse_certificates(key.as_bytes(), MAX),
            Err(PemError::NotACertificate {
                index: 0,
                label: "PRIVATE KEY".into()
            })
        );
        // A key after the chain is refused too: the file is not a chain.
        assert_eq!(kind(format!("{good}{key}").as_bytes()), "not_a_certificate");

        assert_eq!(
            kind(b"-----BEGIN CERTIFICATE-----\nnot*base64!\n-----END CERTIFICATE-----\n"),
            "bad_base64"
        );
        assert_eq!(
            kind(b"-----BEGIN CERTIFICATE-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END CERTIFICATE-----\n"),
            "bad_base64"
        );
        assert_eq!(
            kind(pem("CERTIFICATE", b"garbage bytes", "\n").as_bytes()),
            "bad_der"
        );
        // Unpadded base64 is refused as base64, whatever the reader allows.
        let unpadded = pem("CERTIFICATE", b"garbage bytes", "\n").replace('=', "");
        assert_eq!(kind(unpadded.as_bytes()), "bad_base64");
        assert_eq!(kind(pem("CERTIFICATE", &[], "\n").as_bytes()), "bad_der");
        let mut two = ca.der().to_vec();
        two.extend_from_slice(ca.der());
        assert_eq!(kind(pem("CERTIFICATE", &two, "\n").as_bytes()), "bad_der");
    }

    #[test]
    fn labels_in_errors_are_short_and_printable() {
        let long = format!(
            "-----BEGIN {}-----\n-----END {}-----\n",
            "K".repeat(500),
            "K".repeat(500)
        );
        match parse_certificates(long.as_bytes(), MAX) {
            Err(PemError::NotACertificate { label, .. }) => assert_eq!(label.len(), LABEL_MAX),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn random_input_never_panics() {
        let ca = ca();
        let good = pem("CERTIFICATE", ca.der(), "\r\n").into_bytes();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bytes = good.clone();
            let at = (x as usize) % bytes.len();
            bytes[at] = (x >> 32) as u8;
            bytes.truncate(bytes.len() - (x >> 40) as usize % 8);
            let _ = parse_certificates(&bytes, MAX);
        }
    }
}
