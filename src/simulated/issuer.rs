//! A throwaway X.509 CA minting SPIFFE SVIDs (rcgen), for the demo's
//! simulated agent and for tests. Never used against real SPIRE.

use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// How to spoil an SVID on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Spec-conformant.
    Valid,
    /// Leaf with `cA=true`.
    CaLeaf,
    /// Two URI SANs.
    TwoUriSans,
    /// Not a certificate at all: DER-looking garbage in place of the chain.
    GarbageDer,
}

/// Errors minting certificates.
#[derive(Debug, thiserror::Error)]
#[error("cannot mint certificate: {0}")]
pub struct MintError(#[from] rcgen::Error);

/// A CA for one trust domain.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
    trust_domain: String,
    next_serial: std::sync::atomic::AtomicU64,
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl TestCa {
    /// A self-signed CA valid from `not_before` to `not_after`.
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn new(
        trust_domain: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, MintError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{trust_domain} demo CA"));
        p.distinguished_name = dn;
        p.not_before = offset(not_before);
        p.not_after = offset(not_after);
        let cert = p.self_signed(&key)?;
        Ok(Self {
            der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
            trust_domain: trust_domain.to_string(),
            next_serial: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The CA certificate (DER): the trust bundle.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Mints an SVID for `spiffe_id`; returns (leaf DER, PKCS#8 key DER, serial).
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn issue(
        &self,
        spiffe_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
        flavor: Flavor,
    ) -> Result<(Vec<u8>, Vec<u8>, u64), MintError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 0x1000;
        p.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
        p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        if flavor == Flavor::TwoUriSans {
            p.subject_alt_names.push(SanType::URI(
                format!("spiffe://{}/second", self.trust_domain).try_into()?,
            ));
        }
        p.is_ca = if flavor == Flavor::CaLeaf {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIRE");
        p.distinguished_name = dn;
        p.not_before = offset(not_before);
        p.not_after = offset(not_after);
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.der().to_vec(), key.serialize_der(), serial))
    }
}
