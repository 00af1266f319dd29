//! Which workload a pod belongs to, through ownerReferences: a pod's
//! controller is a ReplicaSet (whose controller is a Deployment), a
//! DaemonSet or a StatefulSet. Only those three are restarted or waited on
//! as owners; a pod with no controller, or with another (a Job, a bare
//! ReplicaSet, a custom controller), has none the healer knows.
//!
//! Every hop checks the UID its reference names: an object re-created
//! under the same name is another object, not the owner.

use std::collections::HashSet;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector as K8sLabelSelector, ObjectMeta, OwnerReference,
};

use super::client::{K8sError, Kube};
use super::selector::{LabelSelector, Requirement};

/// The kinds of owner the healer restarts and waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum OwnerKind {
    /// apps/v1 Deployment (through its ReplicaSets).
    Deployment,
    /// apps/v1 DaemonSet.
    DaemonSet,
    /// apps/v1 StatefulSet.
    StatefulSet,
}

impl OwnerKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::Deployment => "Deployment",
            OwnerKind::DaemonSet => "DaemonSet",
            OwnerKind::StatefulSet => "StatefulSet",
        }
    }
}

/// A pod's top-level owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Owner {
    /// Its kind.
    pub kind: OwnerKind,
    /// Namespace (the pod's).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, as the reference names it.
    pub uid: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// What a pod's controller chain resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A Deployment, DaemonSet or StatefulSet.
    Owned(Owner),
    /// No controller: nothing replaces the pod.
    Bare,
    /// A controller the healer does not restart (a Job, a ReplicaSet with
    /// no Deployment, a custom resource), or one that is gone: (kind, name).
    Other(String, String),
}

/// The reference marked `controller: true`, if any.
pub fn controller(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_deref()?
        .iter()
        .find(|r| r.controller == Some(true))
}

/// The UID of the object's controller, if any.
pub fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    controller(meta).map(|r| r.uid.as_str())
}

/// Reads the objects owner resolution hops through.
#[async_trait]
pub trait Lookup: Send + Sync {
    /// The ReplicaSet `ns/name`; `None` when it does not exist.
    async fn replica_set(&self, ns: &str, name: &str) -> Result<Option<ReplicaSet>, K8sError>;
}

#[async_trait]
impl Lookup for Kube {
    async fn replica_set(&self, ns: &str, name: &str) -> Result<Option<ReplicaSet>, K8sError> {
        self.get::<ReplicaSet>(ns, name).await
    }
}

fn apps_v1(r: &OwnerReference) -> bool {
    r.api_version == "apps/v1"
}

/// The owner of `pod` through its controller references.
///
/// # Errors
/// A failed read of a ReplicaSet.
pub async fn resolve(lookup: &dyn Lookup, pod: &Pod) -> Result<Resolution, K8sError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let Some(r) = controller(&pod.metadata) else {
        return Ok(Resolution::Bare);
    };
    let owned = |kind, r: &OwnerReference| {
        Resolution::Owned(Owner {
            kind,
            namespace: ns.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        })
    };
    let other = |r: &OwnerReference| Resolution::Other(r.kind.clone(), r.name.clone());
    if !apps_v1(r) {
        return Ok(other(r));
    }
    match r.kind.as_str() {
        "DaemonSet" => Ok(owned(OwnerKind::DaemonSet, r)),
        "StatefulSet" => Ok(owned(OwnerKind::StatefulSet, r)),
        "ReplicaSet" => {
            let rs = lookup.replica_set(&ns, &r.name).await?;
            let Some(rs) = rs.filter(|rs| rs.metadata.uid.as_deref() == Some(r.uid.as_str()))
            else {
                // Gone, or another ReplicaSet under the name.
                return Ok(other(r));
            };
            match controller(&rs.metadata) {
                Some(d) if apps_v1(d) && d.kind == "Deployment" => {
                    Ok(owned(OwnerKind::Deployment, d))
                }
                _ => Ok(other(r)),
            }
        }
        _ => Ok(other(r)),
    }
}

/// Our selector from a Kubernetes one (`matchLabels` and
/// `matchExpressions`); `None` when it selects nothing expressible or
/// everything (an empty selector).
pub fn selector_of(s: &K8sLabelSelector) -> Option<LabelSelector> {
    let mut reqs = Vec::new();
    for (k, v) in s.match_labels.iter().flatten() {
        reqs.push(Requirement::Equals(k.clone(), v.clone()));
    }
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        reqs.push(match e.operator.as_str() {
            "In" => Requirement::In(e.key.clone(), values),
            "NotIn" => Requirement::NotIn(e.key.clone(), values),
            "Exists" => Requirement::Exists(e.key.clone()),
            "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
            _ => return None,
        });
    }
    LabelSelector::from_requirements(reqs)
}

/// An owner as read now: what its pods must come to.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Which owner.
    pub owner: Owner,
    /// Its pod selector.
    pub selector: LabelSelector,
    /// How many Ready pods it wants (Deployment and StatefulSet
    /// `spec.replicas`, DaemonSet `status.desiredNumberScheduled`).
    pub desired: u32,
    /// `metadata.resourceVersion` when read (a patch's precondition).
    pub resource_version: String,
}

/// Reads `owner`; `None` when it is gone (or another object has its name).
///
/// # Errors
/// A failed read.
pub async fn workload(kube: &Kube, owner: &Owner) -> Result<Option<Workload>, K8sError> {
    let (ns, name) = (&owner.namespace, &owner.name);
    let (meta, selector, desired) = match owner.kind {
        OwnerKind::Deployment => {
            let Some(d) = kube.get::<Deployment>(ns, name).await? else {
                return Ok(None);
            };
            (d.metadata, d.spec.selector, d.spec.replicas.unwrap_or(1))
        }
        OwnerKind::StatefulSet => {
            let Some(s) = kube.get::<StatefulSet>(ns, name).await? else {
                return Ok(None);
            };
            (s.metadata, s.spec.selector, s.spec.replicas.unwrap_or(1))
        }
        OwnerKind::DaemonSet => {
            let Some(d) = kube.get::<DaemonSet>(ns, name).await? else {
                return Ok(None);
            };
            let desired = d.status.map_or(0, |s| s.desired_number_scheduled);
            (d.metadata, d.spec.selector, desired)
        }
    };
    if meta.uid.as_deref() != Some(owner.uid.as_str()) {
        return Ok(None);
    }
    let Some(selector) = selector_of(&selector) else {
        return Ok(None);
    };
    Ok(Some(Workload {
        owner: owner.clone(),
        selector,
        desired: u32::try_from(desired).unwrap_or(0),
        resource_version: meta.resource_version.unwrap_or_default(),
    }))
}

/// The pods `w`'s owner controls now (terminating ones included): for a
/// Deployment, those whose ReplicaSet it controls (each ReplicaSet read
/// once per call, by name: a rollout makes a new one, and `get` is all the
/// Role needs on ReplicaSets).
///
/// # Errors
/// A failed list or read.
pub async fn pods_of(kube: &Kube, w: &Workload) -> Result<Vec<Pod>, K8sError> {
    let ns = &w.owner.namespace;
    let pods = kube.list_pods(ns, Some(&w.selector)).await?;
    if w.owner.kind != OwnerKind::Deployment {
        return Ok(owned_by(pods, &HashSet::from([w.owner.uid.clone()])));
    }
    let mut controllers = HashSet::new();
    let mut seen = HashSet::new();
    for p in &pods {
        let Some(r) = controller(&p.metadata).filter(|r| apps_v1(r) && r.kind == "ReplicaSet")
        else {
            continue;
        };
        if !seen.insert(r.uid.clone()) {
            continue;
        }
        let mine = kube
            .get::<ReplicaSet>(ns, &r.name)
            .await?
            .is_some_and(|rs| {
                rs.metadata.uid.as_deref() == Some(r.uid.as_str())
                    && controller_uid(&rs.metadata) == Some(w.owner.uid.as_str())
            });
        if mine {
            controllers.insert(r.uid.clone());
        }
    }
    Ok(owned_by(pods, &controllers))
}

/// The pods whose controller is one of `controllers` (by UID).
pub fn owned_by(pods: Vec<Pod>, controllers: &HashSet<String>) -> Vec<Pod> {
    pods.into_iter()
        .filter(|p| controller_uid(&p.metadata).is_some_and(|u| controllers.contains(u)))
        .collect()
}

/// Whether the pod is being deleted.
pub fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Whether the pod is Ready (condition `Ready=True`) and not terminating.
pub fn ready(pod: &Pod) -> bool {
    !terminating(pod)
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's UID ("" when the server left it out).
pub fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashMap};

    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    pub(crate) fn oref(kind: &str, name: &str, uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: if kind == "Job" { "batch/v1" } else { "apps/v1" }.into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    pub(crate) fn meta(name: &str, uid: &str, owners: Vec<OwnerReference>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("apps".into()),
            uid: Some(uid.into()),
            resource_version: Some("1".into()),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..ObjectMeta::default()
        }
    }

    pub(crate) fn pod(name: &str, uid: &str, owners: Vec<OwnerReference>) -> Pod {
        Pod {
            metadata: meta(name, uid, owners),
            ..Pod::default()
        }
    }

    /// ReplicaSets by name.
    struct Fake(HashMap<String, ReplicaSet>);

    #[async_trait]
    impl Lookup for Fake {
        async fn replica_set(&self, _ns: &str, name: &str) -> Result<Option<ReplicaSet>, K8sError> {
            Ok(self.0.get(name).cloned())
        }
    }

    fn rs(name: &str, uid: &str, owners: Vec<OwnerReference>) -> (String, ReplicaSet) {
        (
            name.to_string(),
            ReplicaSet {
                metadata: meta(name, uid, owners),
                ..ReplicaSet::default()
            },
        )
    }

    fn owner(kind: OwnerKind, name: &str, uid: &str) -> Resolution {
        Resolution::Owned(Owner {
            kind,
            namespace: "apps".into(),
            name: name.into(),
            uid: uid.into(),
        })
    }

    #[tokio::test]
    async fn resolution_table() {
        let fake = Fake(HashMap::from([
            rs(
                "web-rs",
                "rs-1",
                vec![oref("Deployment", "web", "d-1", true)],
            ),
            rs("bare-rs", "rs-2", vec![]),
            rs(
                "adopted-rs",
                "rs-3",
                vec![oref("Deployment", "x", "d-9", false)],
            ),
        ]));
        let cases = [
            (
                "pod -> replicaset -> deployment",
                pod("p", "u", vec![oref("ReplicaSet", "web-rs", "rs-1", true)]),
                owner(OwnerKind::Deployment, "web", "d-1"),
            ),
            (
                "daemonset",
                pod("p", "u", vec![oref("DaemonSet", "agent", "ds-1", true)]),
                owner(OwnerKind::DaemonSet, "agent", "ds-1"),
            ),
            (
                "statefulset",
                pod("p", "u", vec![oref("StatefulSet", "db", "ss-1", true)]),
                owner(OwnerKind::StatefulSet, "db", "ss-1"),
            ),
            ("no owner", pod("p", "u", vec![]), Resolution::Bare),
            (
                "an owner that is not the controller does not count",
                pod("p", "u", vec![oref("StatefulSet", "db", "ss-1", false)]),
                Resolution::Bare,
            ),
            (
                "a job",
                pod("p", "u", vec![oref("Job", "batch", "j-1", true)]),
                Resolution::Other("Job".into(), "batch".into()),
            ),
            (
                "a replicaset with no deployment",
                pod("p", "u", vec![oref("ReplicaSet", "bare-rs", "rs-2", true)]),
                Resolution::Other("ReplicaSet".into(), "bare-rs".into()),
            ),
            (
                "a replicaset whose deployment is not its controller",
                pod(
                    "p",
                    "u",
                    vec![oref("ReplicaSet", "adopted-rs", "rs-3", true)],
                ),
                Resolution::Other("ReplicaSet".into(), "adopted-rs".into()),
            ),
            (
                "a replicaset re-created under the same name is not the owner",
                pod("p", "u", vec![oref("ReplicaSet", "web-rs", "rs-old", true)]),
                Resolution::Other("ReplicaSet".into(), "web-rs".into()),
            ),
            (
                "a replicaset that is gone",
                pod("p", "u", vec![oref("ReplicaSet", "gone", "rs-x", true)]),
                Resolution::Other("ReplicaSet".into(), "gone".into()),
            ),
        ];
        for (what, p, want) in cases {
            assert_eq!(resolve(&fake, &p).await.unwrap(), want, "{what}");
        }
    }

    #[test]
    fn kubernetes_selectors_convert() {
        let s = K8sLabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "legacy".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(
            selector_of(&s).unwrap().to_string(),
            "app=web,tier in (a,b),!legacy"
        );
        assert_eq!(selector_of(&K8sLabelSelector::default()), None);
        let odd = K8sLabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "x".into(),
                operator: "Gt".into(),
                values: None,
            }]),
            ..K8sLabelSelector::default()
        };
        assert_eq!(selector_of(&odd), None);
    }

    #[test]
    fn ownership_and_readiness() {
        let mine = pod("a", "ua", vec![oref("ReplicaSet", "r", "rs-1", true)]);
        let theirs = pod("b", "ub", vec![oref("ReplicaSet", "r2", "rs-2", true)]);
        let orphan = pod("c", "uc", vec![]);
        let kept = owned_by(
            vec![mine.clone(), theirs, orphan],
            &HashSet::from(["rs-1".to_string()]),
        );
        assert_eq!(kept, vec![mine.clone()]);
        assert!(!ready(&mine));
        let mut r = mine;
        r.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        assert!(ready(&r));
        r.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(terminating(&r) && !ready(&r));
        assert_eq!(uid(&r), "ua");
    }
}
