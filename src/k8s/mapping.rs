//! From a symptom to the pods that run its workload.
//!
//! Two ways, tried in order:
//!
//! 1. **A configured workload** (`[[kubernetes.workloads]]`) whose `name` is
//!    the step's target (a peer, certificate-file, server or agent name),
//!    or whose `spiffe_id` is the SPIFFE ID the symptom names: its label
//!    selector in its namespace (and its `node`, when set).
//! 2. **The registration entries of the symptom's SPIFFE ID**, read over
//!    the SPIRE server's Entry API: the `k8s:` selectors SPIRE's Kubernetes
//!    workload attestor matches (`k8s:ns`, `k8s:sa`, `k8s:pod-label:K:V`,
//!    `k8s:pod-name`, `k8s:pod-uid`, `k8s:node-name`,
//!    `k8s:container-name`). One entry's selectors are ANDed; several
//!    entries are ORed.
//!
//! The outcome is the pods (at most `max_pods`, all in allowed namespaces,
//! none terminating or finished) or a closed-set [`Refusal`], which the
//! actuators turn into a recorded hold.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;

use super::client::{K8sError, Kube};
use super::selector::LabelSelector;
use super::{KubernetesConfig, WorkloadConfig};

/// Why a symptom maps to no pods the healer may act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The selectors match no (running) pod.
    NoPodsMatched,
    /// They match more than `max_pods`.
    TooManyPods,
    /// They name a namespace outside `[kubernetes] namespaces`.
    NamespaceNotAllowed,
    /// Nothing says which pods: no configured workload, and no
    /// registration entry of the SPIFFE ID with `k8s:` selectors.
    NoK8sSelectors,
}

impl Refusal {
    /// Every refusal.
    pub const ALL: [Refusal; 4] = [
        Refusal::NoPodsMatched,
        Refusal::TooManyPods,
        Refusal::NamespaceNotAllowed,
        Refusal::NoK8sSelectors,
    ];

    /// Closed-set name: the hold reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoPodsMatched => "no_pods_matched",
            Refusal::TooManyPods => "too_many_pods",
            Refusal::NamespaceNotAllowed => "namespace_not_allowed",
            Refusal::NoK8sSelectors => "no_k8s_selectors",
        }
    }
}

/// The `k8s:` selectors of one registration entry: all must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodSelector {
    /// `k8s:ns`.
    pub namespace: Option<String>,
    /// `k8s:sa`.
    pub service_account: Option<String>,
    /// `k8s:pod-label:K:V`, each.
    pub labels: BTreeMap<String, String>,
    /// `k8s:pod-name`.
    pub pod_name: Option<String>,
    /// `k8s:pod-uid`.
    pub pod_uid: Option<String>,
    /// `k8s:node-name`.
    pub node_name: Option<String>,
    /// `k8s:container-name`, each: the pod has a container of that name.
    pub containers: BTreeSet<String>,
    /// Two different values for one single-valued selector (two `k8s:ns`,
    /// or a label twice): no pod can match.
    pub contradictory: bool,
}

/// What one entry's selectors say about pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryPods {
    /// Its `k8s:` selectors.
    Selector(PodSelector),
    /// It has no `k8s:` selector (a `unix:` or `docker:` entry).
    NotKubernetes,
    /// A `k8s:` selector this mapping cannot evaluate (`k8s:pod-image`,
    /// `k8s:pod-owner`, …): the entry is left out rather than guessed
    /// wider than SPIRE would match.
    Unsupported(String),
}

fn set_once(slot: &mut Option<String>, value: &str, contradictory: &mut bool) {
    match slot {
        Some(v) if v != value => *contradictory = true,
        _ => *slot = Some(value.to_string()),
    }
}

/// Reads one entry's selectors, as (type, value) pairs the way the Entry
/// API returns them (`("k8s", "ns:apps")`).
pub fn entry_pods<'a>(selectors: impl IntoIterator<Item = (&'a str, &'a str)>) -> EntryPods {
    let mut s = PodSelector::default();
    let mut any = false;
    for (kind, value) in selectors {
        if kind != "k8s" {
            continue;
        }
        any = true;
        let c = &mut s.contradictory;
        let Some((what, rest)) = value.split_once(':') else {
            return EntryPods::Unsupported(format!("k8s:{value}"));
        };
        match what {
            "ns" => set_once(&mut s.namespace, rest, c),
            "sa" => set_once(&mut s.service_account, rest, c),
            "pod-name" => set_once(&mut s.pod_name, rest, c),
            "pod-uid" => set_once(&mut s.pod_uid, rest, c),
            "node-name" => set_once(&mut s.node_name, rest, c),
            "container-name" => {
                s.containers.insert(rest.to_string());
            }
            "pod-label" => {
                let Some((k, v)) = rest.split_once(':') else {
                    return EntryPods::Unsupported(format!("k8s:{value}"));
                };
                match s.labels.get(k) {
                    Some(old) if old != v => *c = true,
                    _ => {
                        s.labels.insert(k.to_string(), v.to_string());
                    }
                }
            }
            _ => return EntryPods::Unsupported(format!("k8s:{value}")),
        }
    }
    if any {
        EntryPods::Selector(s)
    } else {
        EntryPods::NotKubernetes
    }
}

impl PodSelector {
    /// Its labels as a server-side label selector; `None` without labels.
    pub fn label_selector(&self) -> Option<LabelSelector> {
        LabelSelector::from_pairs(self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// Whether `pod` matches every selector.
    pub fn matches(&self, pod: &Pod) -> bool {
        if self.contradictory {
            return false;
        }
        let m = &pod.metadata;
        let spec = pod.spec.as_ref();
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        let labels = m.labels.as_ref();
        eq(&self.namespace, m.namespace.as_deref())
            && eq(&self.pod_name, m.name.as_deref())
            && eq(&self.pod_uid, m.uid.as_deref())
            // As SPIRE's attestor reads it: the field as set (admission
            // sets `default` when a pod names none).
            && eq(
                &self.service_account,
                Some(
                    spec.and_then(|s| s.service_account_name.as_deref())
                        .unwrap_or_default(),
                ),
            )
            && eq(&self.node_name, spec.and_then(|s| s.node_name.as_deref()))
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            && self
                .containers
                .iter()
                .all(|c| spec.is_some_and(|s| s.containers.iter().any(|x| &x.name == c)))
    }
}

/// The namespaces to read for `selectors`: each one's `k8s:ns`, or every
/// allowed namespace for a selector without one.
///
/// # Errors
/// [`Refusal::NamespaceNotAllowed`] when a selector names a namespace
/// outside `allowed`: the identity runs (also) where the healer may not
/// look, so it does not act on part of it.
pub fn namespaces_for(
    selectors: &[PodSelector],
    allowed: &[String],
) -> Result<Vec<String>, Refusal> {
    let mut out = BTreeSet::new();
    for s in selectors {
        match &s.namespace {
            Some(ns) if !allowed.contains(ns) => return Err(Refusal::NamespaceNotAllowed),
            Some(ns) => {
                out.insert(ns.clone());
            }
            None => out.extend(allowed.iter().cloned()),
        }
    }
    Ok(out.into_iter().collect())
}

/// The decision over the pods the selectors matched: running ones only
/// (not terminating, not finished), each once, ordered by namespace and
/// name; between 1 and `max_pods` of them.
///
/// # Errors
/// [`Refusal::NoPodsMatched`] or [`Refusal::TooManyPods`].
pub fn decide(matched: Vec<Pod>, max_pods: usize) -> Result<Vec<Pod>, Refusal> {
    let mut by_key: BTreeMap<(String, String), Pod> = BTreeMap::new();
    for p in matched {
        let finished = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
        if finished || super::owner::terminating(&p) {
            continue;
        }
        let key = (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        );
        by_key.insert(key, p);
    }
    match by_key.len() {
        0 => Err(Refusal::NoPodsMatched),
        n if n > max_pods => Err(Refusal::TooManyPods),
        _ => Ok(by_key.into_values().collect()),
    }
}

/// Where a mapping came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum Source {
    /// A `[[kubernetes.workloads]]` entry.
    Workload {
        /// Its name.
        name: String,
        /// Its namespace.
        namespace: String,
        /// Its selector.
        selector: String,
    },
    /// Registration entries of a SPIFFE ID.
    Entries {
        /// The SPIFFE ID.
        spiffe_id: String,
        /// Ids of the entries with `k8s:` selectors that were used.
        entry_ids: Vec<String>,
    },
    /// Nothing to map from.
    Nothing,
}

/// A mapping's result.
#[derive(Debug, Clone)]
pub struct Mapped {
    /// How it was found.
    pub source: Source,
    /// The pods, or why none are acted on.
    pub pods: Result<Vec<Pod>, Refusal>,
}

/// Registration entries by SPIFFE ID: (entry id, its selectors as (type,
/// value) pairs).
#[async_trait]
pub trait Entries: Send + Sync {
    /// The entries of `spiffe_id`.
    ///
    /// # Errors
    /// No server answered; the message says why.
    async fn entries(
        &self,
        spiffe_id: &str,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, String>;
}

/// Errors of a mapping (not refusals: the mapping could not be done).
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The SPIRE Entry API could not be read.
    #[error("reading the registration entries of {spiffe_id}: {reason}")]
    Entries {
        /// The SPIFFE ID.
        spiffe_id: String,
        /// Why.
        reason: String,
    },
    /// A Kubernetes call failed.
    #[error(transparent)]
    Kube(#[from] K8sError),
}

/// The configured workload for `target` (by name) or `spiffe_id`.
pub fn configured<'c>(
    config: &'c KubernetesConfig,
    target: &str,
    spiffe_id: Option<&str>,
) -> Option<&'c WorkloadConfig> {
    config
        .workloads
        .iter()
        .find(|w| w.name == target)
        .or_else(|| {
            let id = spiffe_id?;
            config
                .workloads
                .iter()
                .find(|w| w.spiffe_id.as_deref() == Some(id))
        })
}

/// Whether `pod` runs on `node` (any node when `None`).
pub fn on_node(pod: &Pod, node: Option<&str>) -> bool {
    node.is_none_or(|n| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(n))
}

/// Maps a step's target and SPIFFE ID to pods (see the module docs).
///
/// # Errors
/// [`MapError`] when SPIRE or Kubernetes could not be read.
pub async fn map(
    kube: &Kube,
    entries: &dyn Entries,
    target: &str,
    spiffe_id: Option<&str>,
) -> Result<Mapped, MapError> {
    let config = kube.config();
    if let Some(w) = configured(config, target, spiffe_id) {
        let source = Source::Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            selector: w.selector.clone(),
        };
        if !config.allows(&w.namespace) {
            return Ok(Mapped {
                source,
                pods: Err(Refusal::NamespaceNotAllowed),
            });
        }
        // Checked when the config loaded.
        let Ok(selector) = LabelSelector::parse(&w.selector) else {
            return Ok(Mapped {
                source,
                pods: Err(Refusal::NoK8sSelectors),
            });
        };
        let pods = kube.list_pods(&w.namespace, Some(&selector)).await?;
        let pods = pods
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| selector.matches(l))
                    && on_node(p, w.node.as_deref())
            })
            .collect();
        return Ok(Mapped {
            source,
            pods: decide(pods, config.max_pods),
        });
    }
    let Some(id) = spiffe_id else {
        return Ok(Mapped {
            source: Source::Nothing,
            pods: Err(Refusal::NoK8sSelectors),
        });
    };
    let found = entries
        .entries(id)
        .await
        .map_err(|reason| MapError::Entries {
            spiffe_id: id.to_string(),
            reason,
        })?;
    let mut selectors = Vec::new();
    let mut entry_ids = Vec::new();
    for (entry_id, sels) in &found {
        if let EntryPods::Selector(s) =
            entry_pods(sels.iter().map(|(t, v)| (t.as_str(), v.as_str())))
        {
            selectors.push(s);
            entry_ids.push(entry_id.clone());
        }
    }
    let source = Source::Entries {
        spiffe_id: id.to_string(),
        entry_ids,
    };
    if selectors.is_empty() {
        return Ok(Mapped {
            source,
            pods: Err(Refusal::NoK8sSelectors),
        });
    }
    let namespaces = match namespaces_for(&selectors, &config.namespaces) {
        Ok(ns) => ns,
        Err(refusal) => {
            return Ok(Mapped {
                source,
                pods: Err(refusal),
            });
        }
    };
    let mut matched = Vec::new();
    for ns in &namespaces {
        let here: Vec<&PodSelector> = selectors
            .iter()
            .filter(|s| s.namespace.as_ref().is_none_or(|n| n == ns))
            .collect();
        // One selector with labels: let the server narrow the list.
        let server_side = match here.as_slice() {
            [one] => one.label_selector(),
            _ => None,
        };
        for p in kube.list_pods(ns, server_side.as_ref()).await? {
            if here.iter().any(|s| s.matches(&p)) {
                matched.push(p);
            }
        }
    }
    Ok(Mapped {
        source,
        pods: decide(matched, config.max_pods),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};

    use super::*;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some("web-sa".into()),
                node_name: Some("node-1".into()),
                containers: vec![Container {
                    name: "app".into(),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn selector(pairs: &[(&str, &str)]) -> PodSelector {
        match entry_pods(pairs.iter().copied()) {
            EntryPods::Selector(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn entry_selectors_parse() {
        let s = selector(&[
            ("k8s", "ns:apps"),
            ("k8s", "sa:web-sa"),
            ("k8s", "pod-label:app:web"),
            ("k8s", "pod-label:app.kubernetes.io/part-of:shop"),
            ("k8s", "pod-name:web-1"),
            ("k8s", "pod-uid:uid-web-1"),
            ("k8s", "node-name:node-1"),
            ("k8s", "container-name:app"),
            ("unix", "uid:1000"),
        ]);
        assert_eq!(s.namespace.as_deref(), Some("apps"));
        assert_eq!(s.service_account.as_deref(), Some("web-sa"));
        assert_eq!(s.labels.len(), 2);
        assert_eq!(s.labels["app.kubernetes.io/part-of"], "shop");
        assert!(!s.contradictory);
        assert_eq!(
            s.label_selector().unwrap().to_string(),
            "app=web,app.kubernetes.io/part-of=shop"
        );
        assert_eq!(entry_pods([("unix", "uid:0")]), EntryPods::NotKubernetes);
        assert_eq!(entry_pods([]), EntryPods::NotKubernetes);
        assert_eq!(
            entry_pods([("k8s", "ns:apps"), ("k8s", "pod-image:x")]),
            EntryPods::Unsupported("k8s:pod-image:x".into())
        );
        assert_eq!(
            entry_pods([("k8s", "pod-label:novalue")]),
            EntryPods::Unsupported("k8s:pod-label:novalue".into())
        );
        assert!(selector(&[("k8s", "ns:a"), ("k8s", "ns:b")]).contradictory);
        assert!(selector(&[("k8s", "pod-label:a:1"), ("k8s", "pod-label:a:2")]).contradictory);
        assert!(!selector(&[("k8s", "ns:a"), ("k8s", "ns:a")]).contradictory);
    }

    #[test]
    fn an_entry_selects_pods_by_every_selector() {
        let web1 = pod("apps", "web-1", &[("app", "web")]);
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("k8s", "ns:apps")], true),
            (&[("k8s", "ns:other")], false),
            (&[("k8s", "ns:apps"), ("k8s", "pod-label:app:web")], true),
            (&[("k8s", "ns:apps"), ("k8s", "pod-label:app:api")], false),
            (&[("k8s", "pod-label:tier:x")], false),
            (&[("k8s", "sa:web-sa")], true),
            (&[("k8s", "sa:default")], false),
            (&[("k8s", "pod-name:web-1")], true),
            (&[("k8s", "pod-name:web-2")], false),
            (&[("k8s", "pod-uid:uid-web-1")], true),
            (&[("k8s", "pod-uid:other")], false),
            (&[("k8s", "node-name:node-1")], true),
            (&[("k8s", "node-name:node-2")], false),
            (&[("k8s", "container-name:app")], true),
            (&[("k8s", "container-name:sidecar")], false),
            (&[("k8s", "ns:apps"), ("k8s", "ns:other")], false),
        ];
        for (sels, want) in cases {
            assert_eq!(selector(sels).matches(&web1), *want, "{sels:?}");
        }
        // The field as set, as SPIRE's attestor reads it.
        let mut bare = web1.clone();
        bare.spec.as_mut().unwrap().service_account_name = None;
        assert!(!selector(&[("k8s", "sa:default")]).matches(&bare));
        assert!(selector(&[("k8s", "sa:")]).matches(&bare));
    }

    #[test]
    fn namespaces_come_from_the_selectors_within_the_allow_list() {
        let allowed = vec!["apps".to_string(), "web".to_string()];
        let ns = |n: Option<&str>| PodSelector {
            namespace: n.map(str::to_string),
            ..PodSelector::default()
        };
        assert_eq!(
            namespaces_for(&[ns(Some("web"))], &allowed),
            Ok(vec!["web".to_string()])
        );
        assert_eq!(namespaces_for(&[ns(None)], &allowed), Ok(allowed.clone()));
        assert_eq!(
            namespaces_for(&[ns(Some("web")), ns(Some("kube-system"))], &allowed),
            Err(Refusal::NamespaceNotAllowed)
        );
    }

    #[test]
    fn the_decision_counts_running_pods_once() {
        let a = pod("apps", "a", &[]);
        let b = pod("apps", "b", &[]);
        let c = pod("apps", "c", &[]);
        assert_eq!(decide(vec![], 5).unwrap_err(), Refusal::NoPodsMatched);
        let got = decide(vec![b.clone(), a.clone(), a.clone()], 2).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"], "once each, by name");
        assert_eq!(
            decide(vec![a.clone(), b.clone(), c], 2).unwrap_err(),
            Refusal::TooManyPods
        );
        let mut done = b.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut going = a;
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(
            decide(vec![done, going], 5).unwrap_err(),
            Refusal::NoPodsMatched
        );
        assert_eq!(
            Refusal::ALL.map(Refusal::as_str),
            [
                "no_pods_matched",
                "too_many_pods",
                "namespace_not_allowed",
                "no_k8s_selectors"
            ]
        );
    }

    #[test]
    fn a_configured_workload_is_found_by_name_then_by_spiffe_id() {
        let config = KubernetesConfig {
            namespaces: vec!["apps".into()],
            workloads: vec![
                WorkloadConfig {
                    name: "web".into(),
                    namespace: "apps".into(),
                    selector: "app=web".into(),
                    spiffe_id: Some("spiffe://td/web".into()),
                    node: None,
                },
                WorkloadConfig {
                    name: "api".into(),
                    namespace: "apps".into(),
                    selector: "app=api".into(),
                    spiffe_id: None,
                    node: None,
                },
            ],
            ..KubernetesConfig::default()
        };
        let name = |t, id| configured(&config, t, id).map(|w| w.name.as_str());
        assert_eq!(name("api", Some("spiffe://td/web")), Some("api"));
        assert_eq!(name("web-svid", Some("spiffe://td/web")), Some("web"));
        assert_eq!(name("web-svid", Some("spiffe://td/other")), None);
        assert_eq!(name("web-svid", None), None);
    }
}
