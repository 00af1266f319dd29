//! X509-SVID checks: pure functions over the DER bytes the Workload API
//! sends.
//!
//! [`inspect`] applies the rules of the X509-SVID standard (`spiffe/spiffe`
//! `standards/X509-SVID.md`) in a fixed order and reports the first one that
//! is broken. It never reads the clock: expiry is judged elsewhere from
//! [`LeafInfo::not_before`] and [`LeafInfo::not_after`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::spiffe_id::{SpiffeId, SpiffeIdError};

pub mod pem;
#[cfg(test)]
mod tests;

/// Why an X509-SVID (or a certificate list) is not acceptable.
///
/// Certificate indexes count from 0 in the list they come from: in the chain,
/// 0 is the leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The SVID carries no certificate.
    #[error("the SVID certificate chain is empty")]
    EmptyChain,
    /// Bytes that are not a DER certificate, or a truncated one.
    #[error("certificate {index} is not a valid DER certificate: {reason}")]
    Malformed {
        /// Position of the bad certificate.
        index: usize,
        /// What the parser found wrong.
        reason: String,
    },
    /// The leaf has no URI SAN, so it names no SPIFFE ID.
    #[error("the leaf certificate has no URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN, which validators must reject.
    #[error("the leaf certificate has {count} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans {
        /// Number of URI SANs found.
        count: usize,
    },
    /// The leaf's URI SAN is not a SPIFFE ID.
    #[error("the leaf certificate's URI SAN {uri:?} is not a valid SPIFFE ID")]
    InvalidSpiffeId {
        /// The URI SAN as found.
        uri: String,
        /// The SPIFFE ID rule it breaks.
        #[source]
        source: SpiffeIdError,
    },
    /// The leaf's SPIFFE ID has an empty path, which only signing
    /// certificates may have.
    #[error("the leaf certificate's SPIFFE ID {id:?} has no path; leaf IDs must not be root IDs")]
    RootSpiffeId {
        /// The SPIFFE ID found.
        id: String,
    },
    /// The leaf names another SPIFFE ID than the response claims.
    #[error("the response claims SPIFFE ID {claimed:?} but the leaf certificate is for {actual:?}")]
    IdMismatch {
        /// The response's `spiffe_id` field.
        claimed: String,
        /// The leaf's URI SAN.
        actual: String,
    },
    /// The leaf has `basicConstraints cA=true`.
    #[error("the leaf certificate is a CA (basicConstraints cA=true)")]
    CaLeaf,
    /// The leaf has no keyUsage extension.
    #[error("the leaf certificate has no keyUsage extension")]
    NoKeyUsage,
    /// The leaf's keyUsage extension is not marked critical.
    #[error("the leaf certificate's keyUsage extension is not critical")]
    KeyUsageNotCritical,
    /// The leaf's keyUsage lacks `digitalSignature`.
    #[error("the leaf certificate's keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    /// The leaf's keyUsage allows signing certificates or CRLs.
    #[error(
        "the leaf certificate's keyUsage sets {usage}, which only signing certificates may set"
    )]
    LeafCanSign {
        /// `keyCertSign` or `cRLSign`.
        usage: &'static str,
    },
    /// The leaf has an extendedKeyUsage extension without both
    /// `serverAuth` and `clientAuth`.
    #[error("the leaf certificate's extendedKeyUsage lacks {missing}")]
    IncompleteEku {
        /// `serverAuth`, `clientAuth` or `serverAuth and clientAuth`.
        missing: &'static str,
    },
    /// An intermediate certificate is not a CA.
    #[error("chain certificate {index} is not a CA (basicConstraints cA=true missing)")]
    IntermediateNotCa {
        /// Position in the chain.
        index: usize,
    },
    /// An intermediate certificate's keyUsage is missing or lacks
    /// `keyCertSign`.
    #[error("chain certificate {index} may not sign certificates (keyUsage keyCertSign missing)")]
    IntermediateCannotSign {
        /// Position in the chain.
        index: usize,
    },
    /// The trust bundle carries no certificate.
    #[error("the trust bundle is empty")]
    EmptyBundle,
    /// The trust bundle holds bytes that are not DER certificates.
    #[error("bundle certificate {index} is not a valid DER certificate: {reason}")]
    MalformedBundle {
        /// Position in the bundle.
        index: usize,
        /// What the parser found wrong.
        reason: String,
    },
    /// A chain certificate is not signed by the next one.
    #[error("chain certificate {index} is not signed by chain certificate {}", index + 1)]
    BrokenChain {
        /// Position of the certificate whose signature fails.
        index: usize,
    },
    /// The chain does not lead to a certificate of the trust bundle.
    #[error("the certificate chain is not signed by any certificate of the trust bundle")]
    UntrustedChain,
}

impl SvidError {
    /// Stable snake_case label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::EmptyChain => "empty_chain",
            Self::Malformed { .. } => "malformed",
            Self::NoUriSan => "no_uri_san",
            Self::MultipleUriSans { .. } => "multiple_uri_sans",
            Self::InvalidSpiffeId { .. } => "invalid_spiffe_id",
            Self::RootSpiffeId { .. } => "root_spiffe_id",
            Self::IdMismatch { .. } => "id_mismatch",
            Self::CaLeaf => "ca_leaf",
            Self::NoKeyUsage => "no_key_usage",
            Self::KeyUsageNotCritical => "key_usage_not_critical",
            Self::NoDigitalSignature => "no_digital_signature",
            Self::LeafCanSign { .. } => "leaf_can_sign",
            Self::IncompleteEku { .. } => "incomplete_eku",
            Self::IntermediateNotCa { .. } => "intermediate_not_ca",
            Self::IntermediateCannotSign { .. } => "intermediate_cannot_sign",
            Self::EmptyBundle => "empty_bundle",
            Self::MalformedBundle { .. } => "malformed_bundle",
            Self::BrokenChain { .. } => "broken_chain",
            Self::UntrustedChain => "untrusted_chain",
        }
    }
}

/// What a certificate says about itself; nothing here is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// The first URI SAN, as found (not necessarily a valid SPIFFE ID);
    /// empty when the certificate has none.
    pub spiffe_id: String,
    /// The serial number's value in lower-case hex, without separators or
    /// leading zeros (`0` for zero), as Go's `big.Int.Text(16)` prints it.
    /// It equals `openssl x509 -serial` compared case-insensitively after
    /// stripping that output's leading zeros.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Which CA key signed it: the authority key identifier (hex) when
    /// present, else the SHA-256 (hex) of the issuer name. SPIRE CAs share
    /// their subject name across rotations, so only the key id tells a new
    /// CA from the old one.
    pub issuer: String,
}

/// The result of [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The leaf's details whenever the leaf parses, even if the SVID is
    /// invalid.
    pub leaf: Option<LeafInfo>,
    /// The first X509-SVID rule the SVID breaks; `None` when valid.
    pub problem: Option<SvidError>,
}

impl Inspection {
    /// Whether no rule is broken.
    pub fn is_valid(&self) -> bool {
        self.problem.is_none()
    }
}

/// Splits concatenated DER certificates (as the Workload API sends chains and
/// bundles) into one slice per certificate.
///
/// Only the outer DER framing is read: each element must be a definite-length
/// SEQUENCE that fits in the input. Empty input gives an empty list.
///
/// # Errors
///
/// [`SvidError::Malformed`] with the index of the first element that is not a
/// complete SEQUENCE (garbage, truncation, trailing bytes).
pub fn split_der(bytes: &[u8]) -> Result<Vec<&[u8]>, SvidError> {
    match split_prefix(bytes) {
        (certs, None) => Ok(certs),
        (_, Some(e)) => Err(e),
    }
}

/// Splits as much as possible: the complete elements before the first bad
/// one, and the error for that one.
fn split_prefix(mut bytes: &[u8]) -> (Vec<&[u8]>, Option<SvidError>) {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        match next_sequence(bytes) {
            Ok((one, rest)) => {
                out.push(one);
                bytes = rest;
            }
            Err(reason) => {
                let index = out.len();
                return (out, Some(SvidError::Malformed { index, reason }));
            }
        }
    }
    (out, None)
}

/// Reads one DER SEQUENCE (tag, length, content) off the front of `bytes`.
fn next_sequence(bytes: &[u8]) -> Result<(&[u8], &[u8]), String> {
    const SEQUENCE: u8 = 0x30;
    let Some((&tag, rest)) = bytes.split_first() else {
        return Err("no bytes".into());
    };
    if tag != SEQUENCE {
        return Err(format!(
            "expected a SEQUENCE (tag 0x30), found tag {tag:#04x}"
        ));
    }
    let Some((&first, rest)) = rest.split_first() else {
        return Err("truncated before the length".into());
    };
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 {
            return Err("indefinite length is not allowed in DER".into());
        }
        if n > 4 {
            return Err(format!("a {n}-byte length field is too large"));
        }
        if rest.len() < n {
            return Err("truncated inside the length".into());
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return Err(format!(
            "truncated: the header announces {len} bytes but only {} remain",
            rest.len()
        ));
    }
    let total = bytes.len() - rest.len() + len;
    Ok(bytes.split_at(total))
}

/// Leaf info of the first certificate, for bundles and peers: parse only, no
/// X509-SVID rule is checked. Bytes after the first certificate are ignored.
///
/// # Errors
///
/// [`SvidError::Malformed`] (index 0) if the bytes do not start with a
/// certificate, or its validity cannot be represented as a [`SystemTime`].
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| malformed(0, e))?;
    info_of(&cert)
}

/// Checks one `X509SVID` message: `claimed_id` is the response's `spiffe_id`
/// field, `chain` the DER chain (leaf first), `bundle` the DER certificates of
/// the trust bundle.
///
/// The rules, checked in this order (the first broken one is reported):
///
/// 1. the chain is non-empty and every element is one DER certificate;
/// 2. the leaf has exactly one URI SAN, a SPIFFE ID with a non-root path,
///    equal to `claimed_id`;
/// 3. the leaf is not a CA; its keyUsage is present, critical, has
///    `digitalSignature` and neither `keyCertSign` nor `cRLSign`; an
///    extendedKeyUsage, if present, has both `serverAuth` and `clientAuth`
///    (`anyExtendedKeyUsage` does not count);
/// 4. every further chain certificate is a CA with `keyCertSign`;
/// 5. the bundle is non-empty and made of DER certificates;
/// 6. each chain certificate is signed by the next, until one is itself in
///    the bundle, or the last is signed by a bundle certificate.
///
/// No validity period is checked.
pub fn inspect(claimed_id: &str, chain: &[u8], bundle: &[u8]) -> Inspection {
    let (ders, split_problem) = split_prefix(chain);
    let mut certs = Vec::with_capacity(ders.len());
    let mut problem = None;
    for (index, der) in ders.into_iter().enumerate() {
        match parse_whole(der) {
            Ok(cert) => certs.push(cert),
            Err(reason) => {
                problem = Some(SvidError::Malformed { index, reason });
                break;
            }
        }
    }
    let problem = problem.or(split_problem);

    let mut leaf = None;
    let problem = match certs.first().map(info_of) {
        None => Some(problem.unwrap_or(SvidError::EmptyChain)),
        Some(Err(e)) => Some(e),
        Some(Ok(info)) => {
            leaf = Some(info);
            problem.or_else(|| check(claimed_id, &certs, bundle).err())
        }
    };
    Inspection { leaf, problem }
}

/// Parses exactly one certificate from `der`.
fn parse_whole(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!("{} trailing bytes", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

fn malformed(index: usize, e: impl std::fmt::Display) -> SvidError {
    SvidError::Malformed {
        index,
        reason: e.to_string(),
    }
}

fn info_of(cert: &X509Certificate<'_>) -> Result<LeafInfo, SvidError> {
    let validity = cert.validity();
    let time = |t: ASN1Time| {
        to_system_time(t).ok_or_else(|| malformed(0, "validity date outside the supported range"))
    };
    Ok(LeafInfo {
        spiffe_id: uri_sans(cert)
            .ok()
            .and_then(|uris| uris.first().map(|u| (*u).to_owned()))
            .unwrap_or_default(),
        serial: serial_hex(cert.raw_serial()),
        not_before: time(validity.not_before)?,
        not_after: time(validity.not_after)?,
        issuer: issuer_id(cert),
    })
}

fn issuer_id(cert: &X509Certificate<'_>) -> String {
    use sha2::Digest;
    use x509_parser::extensions::ParsedExtension;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        })
        .unwrap_or_else(|| hex::encode(sha2::Sha256::digest(cert.issuer().as_raw())))
}

fn to_system_time(t: ASN1Time) -> Option<SystemTime> {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH.checked_add(Duration::from_secs(s)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())),
    }
}

fn serial_hex(raw: &[u8]) -> String {
    let digits: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    match digits.trim_start_matches('0') {
        "" => "0".to_owned(),
        s => s.to_owned(),
    }
}

/// Every URI SAN of a parsed certificate (none without the extension).
pub(crate) fn uri_sans<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, SvidError> {
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| malformed(0, e))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect())
}

/// Rules 2 to 6 of [`inspect`], on a fully parsed, non-empty chain.
fn check(claimed_id: &str, chain: &[X509Certificate<'_>], bundle: &[u8]) -> Result<(), SvidError> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(SvidError::EmptyChain);
    };
    check_leaf_id(leaf, claimed_id)?;
    check_leaf_usage(leaf)?;
    for (i, cert) in intermediates.iter().enumerate() {
        check_intermediate(cert, i + 1)?;
    }
    let bundle = parse_bundle(bundle)?;
    verify_path(chain, &bundle)
}

fn check_leaf_id(leaf: &X509Certificate<'_>, claimed_id: &str) -> Result<(), SvidError> {
    let uri = match uri_sans(leaf)?.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [uri] => *uri,
        many => return Err(SvidError::MultipleUriSans { count: many.len() }),
    };
    let id = SpiffeId::parse(uri).map_err(|source| SvidError::InvalidSpiffeId {
        uri: uri.to_owned(),
        source,
    })?;
    if id.is_root() {
        return Err(SvidError::RootSpiffeId { id: id.to_string() });
    }
    if id.as_str() != claimed_id {
        return Err(SvidError::IdMismatch {
            claimed: claimed_id.to_owned(),
            actual: id.to_string(),
        });
    }
    Ok(())
}

fn check_leaf_usage(leaf: &X509Certificate<'_>) -> Result<(), SvidError> {
    let bc = leaf.basic_constraints().map_err(|e| malformed(0, e))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::CaLeaf);
    }
    let ku = leaf
        .key_usage()
        .map_err(|e| malformed(0, e))?
        .ok_or(SvidError::NoKeyUsage)?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::LeafCanSign {
            usage: "keyCertSign",
        });
    }
    if ku.value.crl_sign() {
        return Err(SvidError::LeafCanSign { usage: "cRLSign" });
    }
    if let Some(eku) = leaf.extended_key_usage().map_err(|e| malformed(0, e))? {
        let missing = match (eku.value.server_auth, eku.value.client_auth) {
            (true, true) => None,
            (false, true) => Some("serverAuth"),
            (true, false) => Some("clientAuth"),
            (false, false) => Some("serverAuth and clientAuth"),
        };
        if let Some(missing) = missing {
            return Err(SvidError::IncompleteEku { missing });
        }
    }
    Ok(())
}

fn check_intermediate(cert: &X509Certificate<'_>, index: usize) -> Result<(), SvidError> {
    let bc = cert.basic_constraints().map_err(|e| malformed(index, e))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::IntermediateNotCa { index });
    }
    let ku = cert.key_usage().map_err(|e| malformed(index, e))?;
    if !ku.is_some_and(|ku| ku.value.key_cert_sign()) {
        return Err(SvidError::IntermediateCannotSign { index });
    }
    Ok(())
}

fn parse_bundle(bundle: &[u8]) -> Result<Vec<X509Certificate<'_>>, SvidError> {
    let bad = |e: SvidError| match e {
        SvidError::Malformed { index, reason } => SvidError::MalformedBundle { index, reason },
        other => other,
    };
    let ders = split_der(bundle).map_err(bad)?;
    if ders.is_empty() {
        return Err(SvidError::EmptyBundle);
    }
    ders.into_iter()
        .enumerate()
        .map(|(index, der)| {
            parse_whole(der).map_err(|reason| SvidError::MalformedBundle { index, reason })
        })
        .collect()
}

fn verify_path(
    chain: &[X509Certificate<'_>],
    bundle: &[X509Certificate<'_>],
) -> Result<(), SvidError> {
    for (index, cert) in chain.iter().enumerate() {
        if index > 0 && bundle.iter().any(|b| b.as_raw() == cert.as_raw()) {
            return Ok(());
        }
        match chain.get(index + 1) {
            Some(issuer) => {
                if cert.verify_signature(Some(issuer.public_key())).is_err() {
                    return Err(SvidError::BrokenChain { index });
                }
            }
            None => {
                let trusted = bundle
                    .iter()
                    .any(|b| cert.verify_signature(Some(b.public_key())).is_ok());
                return if trusted {
                    Ok(())
                } else {
                    Err(SvidError::UntrustedChain)
                };
            }
        }
    }
    Err(SvidError::EmptyChain)
}
