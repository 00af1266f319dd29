//! Fixtures shared by the tests against the real Kubernetes control plane
//! (`k8s`, `k8s_storm`): certificate files as SPIRE's helpers write them,
//! and the `spire-healer run` binary read back through its store and
//! `/metrics`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use spire_healer::knowledge::{ActionRecord, IncidentRecord, Query, Store};
use spire_healer::model::SymptomKind;

use crate::daemon::{Daemon, wait_until};

/// The Role the pod actuators need in `ns` (pods get/list/delete,
/// evictions, ReplicaSets get, owners get/patch: what the Helm chart
/// grants, less `watch`) and its binding to `user`, as YAML documents.
pub fn actuator_role(ns: &str, user: &str) -> String {
    format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{ name: spire-healer-actuators, namespace: {ns} }}
rules:
- {{ apiGroups: [""], resources: [pods], verbs: [get, list, delete] }}
- {{ apiGroups: [""], resources: [pods/eviction], verbs: [create] }}
- {{ apiGroups: [apps], resources: [replicasets], verbs: [get] }}
- {{ apiGroups: [apps], resources: [deployments, statefulsets, daemonsets], verbs: [get, patch] }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{ name: spire-healer-actuators, namespace: {ns} }}
roleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: Role, name: spire-healer-actuators }}
subjects: [{{ apiGroup: rbac.authorization.k8s.io, kind: User, name: {user} }}]
"#
    )
}

/// How long one fact may take to appear.
const LIMIT: Duration = Duration::from_secs(90);

/// A leaf as SPIRE issues it, for `id`; expired (2020) or valid to 2099.
/// Written whole, then renamed into place (as spiffe-helper does).
pub fn write_cert(path: &Path, id: &str, expired: bool) -> Result<()> {
    use rcgen::{
        CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair, KeyUsagePurpose as Ku,
        SanType, date_time_ymd,
    };
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.subject_alt_names = vec![SanType::URI(id.try_into()?)];
    p.key_usages = vec![Ku::DigitalSignature];
    p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    (p.not_before, p.not_after) = if expired {
        (date_time_ymd(2020, 1, 1), date_time_ymd(2020, 1, 2))
    } else {
        (date_time_ymd(2024, 1, 1), date_time_ymd(2099, 1, 1))
    };
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    let tmp = path.with_extension("tmp");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.der());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line)?);
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    std::fs::write(&tmp, pem)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `spire-healer run` with its SQLite store and `/metrics`.
pub struct Healer {
    pub daemon: Daemon,
    pub store: Arc<dyn Store>,
    metrics_url: String,
}

impl Healer {
    /// Starts the binary on `config` (with `{url}` and `{port}` filled in)
    /// and waits until its store can be read.
    pub async fn start(dir: &Path, name: &str, config: &str) -> Result<Healer> {
        let port = spire_lab::free_port()?;
        let db = dir.join(format!("{name}.db"));
        let url = format!("sqlite://{}", db.display());
        let text = config
            .replace("{url}", &url)
            .replace("{port}", &port.to_string());
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        let mut daemon = Daemon::spawn(&path)?;
        let store = match wait_until("the healer's store", LIMIT, || async {
            spire_healer::knowledge::open_existing(&url).await.ok()
        })
        .await
        {
            Ok(store) => store,
            Err(e) => {
                let mut log = String::new();
                while let Ok(line) = daemon.wait_line("", Duration::from_millis(200)).await {
                    log.push_str(&line);
                    log.push('\n');
                }
                bail!("{e}; the healer said:\n{log}");
            }
        };
        Ok(Healer {
            daemon,
            store,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
        })
    }

    pub async fn metrics(&self) -> Result<String> {
        let resp = spire_healer::http_client::get(
            &self.metrics_url,
            &spire_healer::http_client::Options::new(Duration::from_secs(5)),
        )
        .await?;
        Ok(String::from_utf8(resp.body)?)
    }

    pub async fn metric(&self, series: &str) -> Result<f64> {
        Ok(spire_healer::telemetry::metrics::sample(&self.metrics().await?, series).unwrap_or(0.0))
    }

    /// The `stale_cert_file` incident of certificate file `file` (the
    /// newest).
    pub async fn incident(&self, file: &str) -> Option<IncidentRecord> {
        let subject = format!("cert_file:{file}");
        self.store
            .incidents(&Query {
                limit: 500,
                ..Query::default()
            })
            .await
            .ok()?
            .into_iter()
            .find(|i| i.subject == subject && i.symptom == SymptomKind::StaleCertFile.as_str())
    }

    /// The actions of an incident, oldest first.
    pub async fn actions(&self, incident: &str) -> Vec<ActionRecord> {
        let mut a = self
            .store
            .actions(&Query {
                incident_id: Some(incident.to_string()),
                limit: 500,
                ..Query::default()
            })
            .await
            .unwrap_or_default();
        a.sort_by_key(|a| a.started_at_ms);
        a
    }

    pub async fn wait_incident(&self, file: &str) -> Result<IncidentRecord> {
        wait_until(&format!("an incident for {file}"), LIMIT, || {
            self.incident(file)
        })
        .await
    }

    /// The first action of `incident` with outcome `outcome`.
    pub async fn wait_outcome(&self, incident: &str, outcome: &str) -> Result<ActionRecord> {
        wait_until(&format!("a {outcome} action"), LIMIT, || async {
            self.actions(incident)
                .await
                .into_iter()
                .find(|a| a.outcome.as_deref() == Some(outcome))
        })
        .await
    }

    /// Waits until `incident` is closed and `action` verified.
    pub async fn wait_verified(&self, incident: &str, action: &str) -> Result<()> {
        wait_until(
            "the step verified and the incident closed",
            LIMIT,
            || async {
                let closed = self
                    .store
                    .incident(incident)
                    .await
                    .ok()??
                    .closed_at_ms
                    .is_some();
                let verified = self
                    .actions(incident)
                    .await
                    .iter()
                    .any(|a| a.id == action && a.verification.as_deref() == Some("verified"));
                (closed && verified).then_some(())
            },
        )
        .await
    }

    /// The daemon's process id (for its resident memory).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.child.id()
    }
}

/// The resident set size of process `pid` in KiB (`VmRSS`), if readable.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
