//! The trust bundle a spire-agent persisted in `<data_dir>/agent-data.json`
//! (loaded on restart in preference to `trust_bundle_path`).
//!
//! Why it matters: SPIRE v1.15.3 stores the bundle before the agent's first
//! sync and then only on later bundle *changes* (its bundle observer
//! subscribes after that first sync), so an agent that attested while a
//! server's CA was not yet in the bundle keeps serving the full bundle live
//! but has persisted an older one. Restarting it onto that server then fails
//! with "certificate signed by unknown authority". A failover must check the
//! persisted bundle, not only the live one, and may repair it.
//!
//! The format is SPIRE's: JSON with `"bundle": [base64(PEM of one
//! certificate), …]`. Only `bundle` is rewritten; every other field is kept.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::sensors::workload_api::fingerprint;

/// File name inside the agent's `data_dir`.
pub const FILE: &str = "agent-data.json";

/// Problems with the persisted agent data.
#[derive(Debug, thiserror::Error)]
pub enum AgentDataError {
    /// Read or write failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not the expected JSON shape.
    #[error("{path}: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn format_err(path: &Path, reason: impl Into<String>) -> AgentDataError {
    AgentDataError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// DER certificates of the persisted bundle.
///
/// # Errors
/// Unreadable file, not JSON, or `bundle` entries that are not base64 PEM
/// certificates.
pub fn persisted_bundle(data_dir: &Path) -> Result<Vec<Vec<u8>>, AgentDataError> {
    let path = data_dir.join(FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| AgentDataError::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(&path, e.to_string()))?;
    let list = v
        .get("bundle")
        .and_then(|b| b.as_array())
        .ok_or_else(|| format_err(&path, "no \"bundle\" array"))?;
    list.iter()
        .map(|e| {
            let b64 = e
                .as_str()
                .ok_or_else(|| format_err(&path, "bundle entry is not a string"))?;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format_err(&path, format!("bundle entry is not base64: {e}")))?;
            pem_to_der(&pem)
                .ok_or_else(|| format_err(&path, "bundle entry is not a PEM certificate"))
        })
        .collect()
}

/// Fingerprints of the persisted bundle.
///
/// # Errors
/// As [`persisted_bundle`].
pub fn persisted_fingerprints(data_dir: &Path) -> Result<BTreeSet<String>, AgentDataError> {
    Ok(persisted_bundle(data_dir)?
        .iter()
        .map(|d| fingerprint(d))
        .collect())
}

/// Adds `extra` certificates (DER) missing from the persisted bundle,
/// atomically (temp file, fsync, rename, mode 0600). Returns how many were
/// added; 0 leaves the file untouched.
///
/// # Errors
/// As [`persisted_bundle`], or the write failed (the original is kept).
pub fn add_to_persisted_bundle(
    data_dir: &Path,
    extra: &[Vec<u8>],
) -> Result<usize, AgentDataError> {
    let path = data_dir.join(FILE);
    let io = |source| AgentDataError::Io {
        path: path.clone(),
        source,
    };
    let have = persisted_fingerprints(data_dir)?;
    let text = std::fs::read_to_string(&path).map_err(io)?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(&path, e.to_string()))?;
    let list = v
        .get_mut("bundle")
        .and_then(|b| b.as_array_mut())
        .ok_or_else(|| format_err(&path, "no \"bundle\" array"))?;
    let mut added = 0;
    let mut seen = have;
    for der in extra {
        if seen.insert(fingerprint(der)) {
            let pem = der_to_pem(der);
            list.push(serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(pem),
            ));
            added += 1;
        }
    }
    if added == 0 {
        return Ok(0);
    }
    let out = serde_json::to_vec(&v).map_err(|e| format_err(&path, e.to_string()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(data_dir).map_err(io)?;
    tmp.write_all(&out).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    tmp.persist(&path).map_err(|e| io(e.error))?;
    Ok(added)
}

fn pem_to_der(pem: &[u8]) -> Option<Vec<u8>> {
    let der = CertificateDer::from_pem_slice(pem).ok()?.to_vec();
    x509_parser::parse_x509_certificate(&der)
        .is_ok()
        .then_some(der)
}

fn der_to_pem(der: &[u8]) -> String {
    crate::svid::pem::encode("CERTIFICATE", der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulated::issuer::TestCa;
    use std::time::{Duration, UNIX_EPOCH};

    fn ca(td: &str) -> Vec<u8> {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        TestCa::new(td, t, t + Duration::from_secs(3600))
            .unwrap()
            .der()
            .to_vec()
    }

    fn write(dir: &Path, certs: &[&[u8]]) {
        let bundle: Vec<String> = certs
            .iter()
            .map(|d| base64::engine::general_purpose::STANDARD.encode(der_to_pem(d)))
            .collect();
        let v = serde_json::json!({
            "svid": ["c3ZpZA=="], "bundle": bundle, "reattestable": false,
            "bootstrap_use": 0, "bootstrap_start_time": "0001-01-01T00:00:00Z", "connection_attempts": 0
        });
        std::fs::write(dir.join(FILE), serde_json::to_vec(&v).unwrap()).unwrap();
    }

    #[test]
    fn reads_and_repairs_the_persisted_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (ca("td"), ca("td"));
        write(dir.path(), &[&a]);
        let before = persisted_fingerprints(dir.path()).unwrap();
        assert_eq!(before, BTreeSet::from([fingerprint(&a)]));
        assert_eq!(
            add_to_persisted_bundle(dir.path(), &[a.clone(), b.clone()]).unwrap(),
            1
        );
        assert_eq!(
            persisted_fingerprints(dir.path()).unwrap(),
            BTreeSet::from([fingerprint(&a), fingerprint(&b)])
        );
        assert_eq!(persisted_bundle(dir.path()).unwrap()[1], b);
        // Other fields kept; idempotent.
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        assert_eq!(v["svid"][0], "c3ZpZA==");
        assert_eq!(add_to_persisted_bundle(dir.path(), &[b]).unwrap(), 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn malformed_files_are_errors_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            persisted_bundle(dir.path()),
            Err(AgentDataError::Io { .. })
        ));
        for bad in [
            "not json",
            "{}",
            r#"{"bundle": [1]}"#,
            r#"{"bundle": ["!!"]}"#,
            r#"{"bundle": ["aGVsbG8="]}"#,
        ] {
            std::fs::write(dir.path().join(FILE), bad).unwrap();
            assert!(persisted_bundle(dir.path()).is_err(), "{bad}");
            assert!(add_to_persisted_bundle(dir.path(), &[ca("td")]).is_err());
            assert_eq!(std::fs::read_to_string(dir.path().join(FILE)).unwrap(), bad);
        }
    }
}
