use std::collections::HashSet;
use std::time::{Duration, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose as Eku,
    IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku, SanType, SerialNumber, date_time_ymd,
};

use super::*;

// === fixtures ===

/// A signing authority of trust domain `td`: a self-signed root, or an
/// intermediate below one.
struct TestCa {
    td: String,
    issuer: Issuer<'static, KeyPair>,
    /// DER of this CA and the intermediates above it (root excluded): what a
    /// leaf's chain carries after the leaf.
    chain: Vec<u8>,
    /// DER of the root: the trust bundle.
    bundle: Vec<u8>,
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("URI SAN is IA5"))
}

fn ca_params(td: &str, name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
    params.subject_alt_names = vec![uri_san(&format!("spiffe://{td}"))];
    params
}

impl TestCa {
    fn new(td: &str) -> Self {
        let params = ca_params(td, "root");
        let key = KeyPair::generate().expect("key");
        let root = params.self_signed(&key).expect("self-signed root");
        Self {
            td: td.to_owned(),
            issuer: Issuer::new(params, key),
            chain: Vec::new(),
            bundle: root.der().to_vec(),
        }
    }

    fn intermediate(&self) -> Self {
        self.intermediate_with(|_| {})
    }

    fn intermediate_with(&self, tweak: impl FnOnce(&mut CertificateParams)) -> Self {
        let mut params = ca_params(&self.td, "intermediate");
        tweak(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("intermediate");
        let mut chain = cert.der().to_vec();
        chain.extend_from_slice(&self.chain);
        Self {
            td: self.td.clone(),
            issuer: Issuer::new(params, key),
            chain,
            bundle: self.bundle.clone(),
        }
    }

    /// A leaf shaped as SPIRE issues it: one URI SAN, cA=false, critical
    /// keyUsage digitalSignature, EKU serverAuth + clientAuth.
    fn leaf(&self, id: &str) -> LeafBuilder<'_> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.subject_alt_names = vec![uri_san(id)];
        params.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment, Ku::KeyAgreement];
        params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        LeafBuilder {
            ca: self,
            signer: self,
            params,
        }
    }
}

struct LeafBuilder<'a> {
    ca: &'a TestCa,
    signer: &'a TestCa,
    params: CertificateParams,
}

impl LeafBuilder<'_> {
    fn with_ca_true(mut self) -> Self {
        self.params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        self
    }

    fn with_uri_sans(mut self, uris: &[&str]) -> Self {
        self.params.subject_alt_names = uris.iter().map(|u| uri_san(u)).collect();
        self
    }

    fn with_two_uri_sans(mut self) -> Self {
        let other = format!("spiffe://{}/other", self.ca.td);
        self.params.subject_alt_names.push(uri_san(&other));
        self
    }

    fn with_key_usages(mut self, usages: Vec<Ku>) -> Self {
        self.params.key_usages = usages;
        self
    }

    /// keyUsage digitalSignature, but not marked critical.
    fn with_non_critical_key_usage(mut self) -> Self {
        self.params.key_usages = Vec::new();
        let bits = vec![0x03, 0x02, 0x07, 0x80]; // BIT STRING, bit 0 set
        let ext = CustomExtension::from_oid_content(&[2, 5, 29, 15], bits);
        self.params.custom_extensions.push(ext);
        self
    }

    fn with_eku(mut self, eku: Vec<Eku>) -> Self {
        self.params.extended_key_usages = eku;
        self
    }

    fn with_serial(mut self, serial: &[u8]) -> Self {
        self.params.serial_number = Some(SerialNumber::from_slice(serial));
        self
    }

    fn valid_between(mut self, from: (i32, u8, u8), to: (i32, u8, u8)) -> Self {
        self.params.not_before = date_time_ymd(from.0, from.1, from.2);
        self.params.not_after = date_time_ymd(to.0, to.1, to.2);
        self
    }

    /// Signs with another CA while keeping this CA's chain and bundle.
    fn signed_by<'b>(self, signer: &'b TestCa) -> LeafBuilder<'b>
    where
        Self: 'b,
    {
        LeafBuilder {
            ca: self.ca,
            signer,
            params: self.params,
        }
    }

    /// Returns `(chain_der, bundle_der)`.
    fn build(self) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().expect("key");
        let leaf = self
            .params
            .signed_by(&key, &self.signer.issuer)
            .expect("leaf");
        let mut chain = leaf.der().to_vec();
        chain.extend_from_slice(&self.ca.chain);
        (chain, self.ca.bundle.clone())
    }
}

const ID: &str = "spiffe://td/w";

fn problem(chain: &[u8], bundle: &[u8]) -> Option<SvidError> {
    inspect(ID, chain, bundle).problem
}

// === valid SVIDs ===

#[test]
fn valid_svid_passes() {
    let ca = TestCa::new("td");
    let (chain, bundle) = ca
        .leaf(ID)
        .with_serial(&[0x00, 0x01, 0xab])
        .valid_between((2030, 1, 1), (2030, 1, 2))
        .build();
    let got = inspect(ID, &chain, &bundle);
    assert_eq!(got.problem, None);
    assert!(got.is_valid());
    let leaf = got.leaf.expect("leaf info");
    assert_eq!(leaf.spiffe_id, ID);
    assert_eq!(leaf.serial, "1ab");
    assert_eq!(
        leaf.not_before,
        UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    );
    assert_eq!(
        leaf.not_after,
        UNIX_EPOCH + Duration::from_secs(1_893_542_400)
    );
}

#[test]
fn valid_svid_through_intermediates_passes() {
    let root = TestCa::new("td");
    let one = root.intermediate();
    let two = one.intermediate();
    for (ca, certs) in [(&one, 2), (&two, 3)] {
        let (chain, bundle) = ca.leaf(ID).build();
        assert_eq!(split_der(&chain).map(|c| c.len()), Ok(certs));
        assert_eq!(problem(&chain, &bundle), None);
    }
    // A chain that carries the root too stops at the bundle's copy.
    let (mut chain, bundle) = one.leaf(ID).build();
    chain.extend_from_slice(&bundle);
    assert_eq!(problem(&chain, &bundle), None);
    // An intermediate may itself be in the bundle.
    let (chain, _) = one.leaf(ID).build();
    assert_eq!(problem(&chain, &one.chain), None);
}

#[test]
fn leaf_without_eku_passes() {
    let ca = TestCa::new("td");
    let (chain, bundle) = ca.leaf(ID).with_eku(Vec::new()).build();
    assert_eq!(problem(&chain, &bundle), None);
}

// === each rule ===

#[test]
fn each_leaf_rule_has_its_error() {
    type Tweak = fn(LeafBuilder<'_>) -> LeafBuilder<'_>;
    let cases: Vec<(&str, Tweak, SvidError)> = vec![
        ("no URI SAN", |l| l.with_uri_sans(&[]), SvidError::NoUriSan),
        (
            "two URI SANs",
            |l| l.with_two_uri_sans(),
            SvidError::MultipleUriSans { count: 2 },
        ),
        (
            "not a SPIFFE ID",
            |l| l.with_uri_sans(&["https://td/w"]),
            SvidError::InvalidSpiffeId {
                uri: "https://td/w".into(),
                source: SpiffeIdError::WrongScheme,
            },
        ),
        (
            "root ID",
            |l| l.with_uri_sans(&["spiffe://td"]),
            SvidError::RootSpiffeId {
                id: "spiffe://td".into(),
            },
        ),
        (
            "other ID",
            |l| l.with_uri_sans(&["spiffe://td/x"]),
            SvidError::IdMismatch {
                claimed: ID.into(),
                actual: "spiffe://td/x".into(),
            },
        ),
        ("cA=true", |l| l.with_ca_true(), SvidError::CaLeaf),
        (
            "no keyUsage",
            |l| l.with_key_usages(Vec::new()),
            SvidError::NoKeyUsage,
        ),
        (
            "non-critical keyUsage",
            |l| l.with_non_critical_key_usage(),
            SvidError::KeyUsageNotCritical,
        ),
        (
            "no digitalSignature",
            |l| l.with_key_usages(vec![Ku::KeyEncipherment]),
            SvidError::NoDigitalSignature,
        ),
        (
            "keyCertSign",
            |l| l.with_key_usages(vec![Ku::DigitalSignature, Ku::KeyCertSign]),
            SvidError::LeafCanSign {
                usage: "keyCertSign",
            },
        ),
        (
            "cRLSign",
            |l| l.with_key_usages(vec![Ku::DigitalSignature, Ku::CrlSign]),
            SvidError::LeafCanSign { usage: "cRLSign" },
        ),
        (
            "serverAuth only",
            |l| l.with_eku(vec![Eku::ServerAuth]),
            SvidError::IncompleteEku {
                missing: "clientAuth",
            },
        ),
        (
            "clientAuth only",
            |l| l.with_eku(vec![Eku::ClientAuth]),
            SvidError::IncompleteEku {
                missing: "serverAuth",
            },
        ),
        (
            "codeSigning",
            |l| l.with_eku(vec![Eku::CodeSigning]),
            SvidError::IncompleteEku {
                missing: "serverAuth and clientAuth",
            },
        ),
        (
            "anyExtendedKeyUsage",
            |l| l.with_eku(vec![Eku::Any]),
            SvidError::IncompleteEku {
                missing: "serverAuth and clientAuth",
            },
        ),
    ];
    let ca = TestCa::new("td");
    for (name, tweak, want) in cases {
        let (chain, bundle) = tweak(ca.leaf(ID)).build();
        let got = inspect(ID, &chain, &bundle);
        assert_eq!(got.problem.as_ref(), Some(&want), "{name}");
        assert!(
            got.leaf.is_some(),
            "{name}: the leaf parses, so its info is kept"
        );
    }
}

#[test]
fn first_broken_rule_wins() {
    let ca = TestCa::new("td");
    let (chain, bundle) = ca.leaf(ID).with_two_uri_sans().with_ca_true().build();
    assert_eq!(
        problem(&chain, &bundle),
        Some(SvidError::MultipleUriSans { count: 2 })
    );
    let (chain, _) = ca.leaf(ID).with_ca_true().build();
    assert_eq!(problem(&chain, b""), Some(SvidError::CaLeaf));
}

#[test]
fn intermediates_must_be_signing_cas() {
    let root = TestCa::new("td");
    let not_ca = root.intermediate_with(|p| p.is_ca = IsCa::ExplicitNoCa);
    let (chain, bundle) = not_ca.leaf(ID).build();
    assert_eq!(
        problem(&chain, &bundle),
        Some(SvidError::IntermediateNotCa { index: 1 })
    );

    let no_sign = root.intermediate_with(|p| p.key_usages = vec![Ku::DigitalSignature]);
    let (chain, bundle) = no_sign.leaf(ID).build();
    assert_eq!(
        problem(&chain, &bundle),
        Some(SvidError::IntermediateCannotSign { index: 1 })
    );

    let no_ku = root.intermediate_with(|p| p.key_usages = Vec::new());
    let (chain, bundle) = no_ku.leaf(ID).build();
    assert_eq!(
        problem(&chain, &bundle),
        Some(SvidError::IntermediateCannotSign { index: 1 })
    );
}

#[test]
fn chain_must_lead_to_the_bundle() {
    let ca = TestCa::new("td");
    let stranger = TestCa::new("td");
    let (chain, bundle) = ca.leaf(ID).signed_by(&stranger).build();
    assert_eq!(problem(&chain, &bundle), Some(SvidError::UntrustedChain));

    let (chain, _) = ca.leaf(ID).build();
    assert_eq!(
        problem(&chain, &stranger.bundle),
        Some(SvidError::UntrustedChain)
    );

    // Intermediate of another root: the path inside the chain holds.
    let (chain, _) = stranger.intermediate().leaf(ID).build();
    assert_eq!(problem(&chain, &ca.bundle), Some(SvidError::UntrustedChain));

    // Leaf signed by one intermediate, chain carrying a sibling.
    let a = ca.intermediate();
    let b = ca.intermediate();
    let (chain, bundle) = b.leaf(ID).signed_by(&a).build();
    assert_eq!(
        problem(&chain, &bundle),
        Some(SvidError::BrokenChain { index: 0 })
    );
}

#[test]
fn bundle_must_hold_certificates() {
    let ca = TestCa::new("td");
    let (chain, bundle) = ca.leaf(ID).build();
    assert_eq!(problem(&chain, b""), Some(SvidError::EmptyBundle));
    assert!(matches!(
        problem(&chain, b"garbage"),
        Some(SvidError::MalformedBundle { index: 0, .. })
    ));
    let mut two = bundle.clone();
    two.extend_from_slice(&bundle[..bundle.len() / 2]);
    assert!(matches!(
        problem(&chain, &two),
        Some(SvidError::MalformedBundle { index: 1, .. })
    ));
    // Several roots: any one may sign.
    let mut roots = TestCa::new("td").bundle;
    roots.extend_from_slice(&bundle);
    assert_eq!(problem(&chain, &roots), None);
}

// === bad bytes ===

#[test]
fn garbage_and_truncated_chains_are_malformed() {
    let ca = TestCa::new("td");
    let (chain, bundle) = ca.leaf(ID).build();

    let empty = inspect(ID, b"", &bundle);
    assert_eq!(
        (empty.leaf, empty.problem),
        (None, Some(SvidError::EmptyChain))
    );

    for bad in [
        &b"not a certificate"[..],
        &chain[..chain.len() - 1],
        &chain[..10],
        &[0x30, 0x80][..],
    ] {
        let got = inspect(ID, bad, &bundle);
        assert_eq!(got.leaf, None);
        assert!(
            matches!(got.problem, Some(SvidError::Malformed { index: 0, .. })),
            "{:?}",
            got.problem
        );
    }

    // A well-framed SEQUENCE that is not a certificate.
    let got = inspect(ID, &[0x30, 0x03, 0x02, 0x01, 0x00], &bundle);
    assert!(matches!(
        got.problem,
        Some(SvidError::Malformed { index: 0, .. })
    ));

    // Trailing bytes after a good leaf: the leaf is still reported.
    let mut trailing = chain.clone();
    trailing.extend_from_slice(&[0x30, 0x05, 0x00]);
    let got = inspect(ID, &trailing, &bundle);
    assert_eq!(got.leaf.map(|l| l.spiffe_id), Some(ID.to_owned()));
    assert!(matches!(
        got.problem,
        Some(SvidError::Malformed { index: 1, .. })
    ));
}

#[test]
fn split_der_frames_certificates() {
    let ca = TestCa::new("td");
    let inter = ca.intermediate();
    let (chain, _) = inter.leaf(ID).build();
    let parts = split_der(&chain).expect("split");
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[1], &inter.chain[..]);
    assert_eq!(parts.concat(), chain);

    assert_eq!(split_der(b""), Ok(Vec::new()));
    assert_eq!(
        split_der(&[0x30, 0x00, 0x30, 0x01, 0x05]),
        Ok(vec![&[0x30, 0x00][..], &[0x30, 0x01, 0x05][..]])
    );
    let long = [&[0x30, 0x81, 0x80][..], &[0u8; 0x80]].concat();
    assert_eq!(split_der(&long).map(|p| p.len()), Ok(1));
    for bad in [
        &[0x31, 0x00][..],
        &[0x30][..],
        &[0x30, 0x85, 1, 1, 1, 1, 1][..],
        &[0x30, 0x82, 0x01][..],
    ] {
        assert!(
            matches!(split_der(bad), Err(SvidError::Malformed { index: 0, .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        split_der(&[0x30, 0x00, 0xff]),
        Err(SvidError::Malformed { index: 1, .. })
    ));
}

#[test]
fn leaf_info_reads_the_first_certificate() {
    let ca = TestCa::new("td");
    let (chain, _) = ca.leaf(ID).with_serial(&[0x7f, 0x00]).build();
    let info = leaf_info(&chain).expect("leaf info");
    assert_eq!(
        (info.spiffe_id.as_str(), info.serial.as_str()),
        (ID, "7f00")
    );

    let mut bundle = ca.bundle.clone();
    bundle.extend_from_slice(&TestCa::new("other").bundle);
    assert_eq!(
        leaf_info(&bundle).map(|i| i.spiffe_id),
        Ok("spiffe://td".to_owned())
    );

    let (chain, _) = ca.leaf(ID).with_uri_sans(&[]).build();
    assert_eq!(leaf_info(&chain).map(|i| i.spiffe_id), Ok(String::new()));
    assert!(matches!(
        leaf_info(b"junk"),
        Err(SvidError::Malformed { index: 0, .. })
    ));
    assert!(matches!(
        leaf_info(b""),
        Err(SvidError::Malformed { index: 0, .. })
    ));
}

#[test]
fn serial_hex_strips_leading_zeros() {
    let cases: [(&[u8], &str); 5] = [
        (&[], "0"),
        (&[0], "0"),
        (&[0x0f], "f"),
        (&[0x00, 0x80, 0x01], "8001"),
        (&[0xde, 0xad], "dead"),
    ];
    for (raw, want) in cases {
        assert_eq!(serial_hex(raw), want, "{raw:?}");
    }
}

#[test]
fn kinds_are_distinct_snake_case() {
    let all = [
        SvidError::EmptyChain,
        SvidError::Malformed {
            index: 0,
            reason: String::new(),
        },
        SvidError::NoUriSan,
        SvidError::MultipleUriSans { count: 2 },
        SvidError::InvalidSpiffeId {
            uri: String::new(),
            source: SpiffeIdError::Empty,
        },
        SvidError::RootSpiffeId { id: String::new() },
        SvidError::IdMismatch {
            claimed: String::new(),
            actual: String::new(),
        },
        SvidError::CaLeaf,
        SvidError::NoKeyUsage,
        SvidError::KeyUsageNotCritical,
        SvidError::NoDigitalSignature,
        SvidError::LeafCanSign { usage: "cRLSign" },
        SvidError::IncompleteEku {
            missing: "clientAuth",
        },
        SvidError::IntermediateNotCa { index: 1 },
        SvidError::IntermediateCannotSign { index: 1 },
        SvidError::EmptyBundle,
        SvidError::MalformedBundle {
            index: 0,
            reason: String::new(),
        },
        SvidError::BrokenChain { index: 0 },
        SvidError::UntrustedChain,
    ];
    let kinds: HashSet<_> = all.iter().map(SvidError::kind).collect();
    assert_eq!(kinds.len(), all.len());
    assert!(
        kinds
            .iter()
            .all(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    );
}

// === robustness ===

/// xorshift64*: deterministic, no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("fits")
    }
}

#[test]
fn random_and_damaged_bytes_never_panic() {
    let ca = TestCa::new("td");
    let (chain, bundle) = ca.intermediate().leaf(ID).build();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // Every truncation of a valid chain is reported, never accepted.
    for cut in 0..chain.len() {
        let _ = split_der(&chain[..cut]);
        let _ = leaf_info(&chain[..cut]);
        assert!(
            inspect(ID, &chain[..cut], &bundle).problem.is_some(),
            "cut at {cut}"
        );
        let _ = inspect(ID, &chain, &bundle[..cut.min(bundle.len())]);
    }
    // Random bytes, with and without a SEQUENCE header.
    for _ in 0..2000 {
        let len = rng.below(64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 && !bytes.is_empty() {
            bytes[0] = 0x30;
        }
        let _ = split_der(&bytes);
        let _ = leaf_info(&bytes);
        assert!(inspect(ID, &bytes, &bundle).problem.is_some());
        let _ = inspect(ID, &chain, &bytes);
    }
    // Bit flips anywhere in a valid chain.
    for _ in 0..2000 {
        let mut bytes = chain.clone();
        let at = rng.below(bytes.len());
        bytes[at] ^= 1 << rng.below(8);
        let _ = split_der(&bytes);
        let _ = leaf_info(&bytes);
        let _ = inspect(ID, &bytes, &bundle);
    }
}

#[test]
fn issuer_tells_ca_keys_apart_even_with_the_same_name() {
    // Two CAs of the same trust domain (same subject name), as SPIRE
    // rotates them: their leaves name different issuers.
    let a = TestCa::new("td");
    let b = TestCa::new("td");
    // As SPIRE (Go) issues them: with an authority key identifier.
    let leaf = |ca: &TestCa, serial: u8| {
        let mut l = ca.leaf(ID).with_serial(&[serial]);
        l.params.use_authority_key_identifier_extension = true;
        l.build().0
    };
    let issuer = |c: &[u8]| leaf_info(c).expect("leaf").issuer;
    assert!(!issuer(&leaf(&a, 1)).is_empty());
    assert_eq!(issuer(&leaf(&a, 1)), issuer(&leaf(&a, 2)));
    assert_ne!(issuer(&leaf(&a, 1)), issuer(&leaf(&b, 3)));
    // Without one, only the issuer name is left: the same for both.
    let (plain_a, _) = a.leaf(ID).build();
    let (plain_b, _) = b.leaf(ID).build();
    assert_eq!(issuer(&plain_a), issuer(&plain_b));
}
