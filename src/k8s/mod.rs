//! Kubernetes: the `[kubernetes]` settings, one API client (no automatic
//! retries: a PodDisruptionBudget's 429 is a decision to record, not a
//! transient error to hammer), the mapping from a symptom to the pods that
//! run its workload ([`mapping`]) and owner resolution through
//! ownerReferences ([`owner`]). The actuators that use them are in
//! [`crate::actuators::k8s`].
//!
//! Namespaces are allow-listed: every call goes through [`Kube`], which
//! refuses (without sending anything) a namespace outside
//! `[kubernetes] namespaces`.

pub mod client;
pub mod mapping;
pub mod owner;
pub mod selector;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use client::{Kube, Verb};
pub use mapping::{Mapped, Refusal};
pub use owner::{Owner, OwnerKind};
pub use selector::{LabelSelector, SelectorError};

/// Default bound of one API call.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on the pods one mapping may name.
pub const DEFAULT_MAX_PODS: usize = 5;
/// Largest `max_pods` accepted.
pub const MAX_MAX_PODS: usize = 100;
/// Longest `request_timeout` accepted.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// `[kubernetes]`: how to reach the API server and what may be touched.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; unset: the pod's service account (in-cluster).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use; unset: its current context. Only
    /// with `kubeconfig`.
    #[serde(default)]
    pub context: Option<String>,
    /// The only namespaces read or changed. Required (non-empty) when a
    /// Kubernetes actuator is configured: nothing outside is ever read or
    /// touched, whatever a registration entry or a selector says.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Bound of one API call (connect, write and read).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A mapping that names more pods than this is refused as
    /// `too_many_pods`.
    #[serde(default = "default_max_pods")]
    pub max_pods: usize,
    /// Workloads by name (`[[kubernetes.workloads]]`): how a configured
    /// peer or certificate file maps to pods without asking SPIRE.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            context: None,
            namespaces: Vec::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_pods: DEFAULT_MAX_PODS,
            workloads: Vec::new(),
        }
    }
}

fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}

fn default_max_pods() -> usize {
    DEFAULT_MAX_PODS
}

/// `[[kubernetes.workloads]]`: the pods of one named workload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// A peer or certificate-file name as the config's `[[probes]]`,
    /// `[[cert_files]]` or handshake reports name it: a symptom about it
    /// maps to this workload's pods. Also a peer actions may target.
    ///
    /// Or a `[[servers]]` name (the server's own pod: `server_unhealthy`
    /// evicts it so its StatefulSet replaces it), or an `[[agents]]` name
    /// with `node` (that agent's DaemonSet pod on its node).
    pub name: String,
    /// Its namespace (one of `[kubernetes] namespaces`).
    pub namespace: String,
    /// A label selector of its pods (`app=web,tier=front`).
    pub selector: String,
    /// Its SPIFFE ID, when symptoms may name it by identity only (an SVID,
    /// a handshake report): such a symptom maps to this workload's pods.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Only its pods on this node (`spec.nodeName`): how a spire-agent
    /// DaemonSet's pod on one agent's node is named.
    #[serde(default)]
    pub node: Option<String>,
}

impl KubernetesConfig {
    /// Every problem as (field, problem) pairs; empty when valid.
    /// `actuated`: a Kubernetes actuator is configured (then the namespace
    /// allow-list is required).
    pub fn problems(&self, actuated: bool) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut push = |field: String, problem: String| out.push((field, problem));
        if self.context.is_some() && self.kubeconfig.is_none() {
            push(
                "context".into(),
                "needs kubeconfig (the in-cluster service account has no contexts)".into(),
            );
        }
        if let Some(p) = &self.kubeconfig {
            let mut path = Vec::new();
            crate::sensors::cert_files::path_problems("kubeconfig", p, &mut path);
            for (f, why) in path {
                push(f.into(), why);
            }
        }
        if actuated && self.namespaces.is_empty() {
            push(
                "namespaces".into(),
                "must list at least one namespace when a Kubernetes actuator is configured (nothing outside it is touched)".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !selector::valid_namespace(ns) {
                push(
                    format!("namespaces[{i}]"),
                    format!("{ns:?} is not a namespace name (a DNS label: a-z, 0-9, '-')"),
                );
            } else if !seen.insert(ns.as_str()) {
                push(
                    format!("namespaces[{i}]"),
                    format!("{ns:?} is listed twice"),
                );
            }
        }
        if self.request_timeout.is_zero() {
            push("request_timeout".into(), "must be greater than zero".into());
        } else if self.request_timeout > MAX_REQUEST_TIMEOUT {
            push(
                "request_timeout".into(),
                format!(
                    "{} is too long (at most {})",
                    humantime::format_duration(self.request_timeout),
                    humantime::format_duration(MAX_REQUEST_TIMEOUT)
                ),
            );
        }
        if self.max_pods == 0 || self.max_pods > MAX_MAX_PODS {
            push(
                "max_pods".into(),
                format!("must be between 1 and {MAX_MAX_PODS}"),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let key = format!("workloads[{i}]");
            if w.name.trim().is_empty() || w.name.len() > crate::handshake::MAX_TARGET_LEN {
                push(
                    format!("{key}.name"),
                    format!("must be 1-{} bytes", crate::handshake::MAX_TARGET_LEN),
                );
            } else if !names.insert(w.name.as_str()) {
                push(
                    format!("{key}.name"),
                    format!("{:?} is configured twice", w.name),
                );
            }
            if !self.namespaces.contains(&w.namespace) {
                push(
                    format!("{key}.namespace"),
                    format!(
                        "{:?} is not in [kubernetes] namespaces {:?}",
                        w.namespace, self.namespaces
                    ),
                );
            }
            if let Err(e) = LabelSelector::parse(&w.selector) {
                push(format!("{key}.selector"), e.to_string());
            }
            if let Some(id) = &w.spiffe_id
                && let Err(e) = crate::spiffe_id::SpiffeId::parse(id)
            {
                push(format!("{key}.spiffe_id"), format!("{id:?}: {e}"));
            }
            if let Some(node) = &w.node
                && (node.is_empty() || node.len() > 253)
            {
                push(
                    format!("{key}.node"),
                    format!("{node:?} is not a node name (1-253 bytes)"),
                );
            }
        }
        out
    }

    /// Whether `ns` is in the allow-list.
    pub fn allows(&self, ns: &str) -> bool {
        self.namespaces.iter().any(|n| n == ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> KubernetesConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_a_full_section() {
        let c = parse("");
        assert_eq!(c, KubernetesConfig::default());
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.max_pods, 5);
        assert!(c.problems(false).is_empty());
        let c = parse(
            r#"
kubeconfig = "/etc/healer/kubeconfig"
context = "lab"
namespaces = ["apps", "spire"]
request_timeout = "3s"
max_pods = 2

[[workloads]]
name = "web"
namespace = "apps"
selector = "app=web,tier=front"
spiffe_id = "spiffe://td/web"
"#,
        );
        assert!(c.problems(true).is_empty(), "{:?}", c.problems(true));
        assert!(c.allows("apps") && !c.allows("kube-system"));
        assert_eq!(c.workloads[0].selector, "app=web,tier=front");
    }

    #[test]
    fn every_problem_is_named() {
        let c = parse(
            r#"
context = "lab"
namespaces = ["apps", "Apps", "apps"]
request_timeout = "0s"
max_pods = 0

[[workloads]]
name = "web"
namespace = "other"
selector = ""
spiffe_id = "http://x"

[[workloads]]
name = "web"
namespace = "apps"
selector = "app=web"
"#,
        );
        let fields: Vec<String> = c.problems(true).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "context",
                "namespaces[1]",
                "namespaces[2]",
                "request_timeout",
                "max_pods",
                "workloads[0].namespace",
                "workloads[0].selector",
                "workloads[0].spiffe_id",
                "workloads[1].name",
            ]
        );
        let empty = KubernetesConfig::default();
        assert_eq!(
            empty.problems(true).first().map(|(f, _)| f.as_str()),
            Some("namespaces")
        );
        assert!(empty.problems(false).is_empty());
    }
}
