//! Kubernetes actuators: `k8s_evict` (the Eviction API, under the
//! workload's PodDisruptionBudget), `k8s_delete_pod` (a delete with
//! preconditions) and `k8s_rollout_restart` (the `restartedAt` annotation
//! on the owning Deployment, DaemonSet or StatefulSet).
//!
//! Each maps its step to pods at execute time ([`crate::k8s::mapping`]):
//! a mapping that matches nothing, too much, or reaches outside the
//! namespace allow-list is a *hold* ([`Outcome::held`]), as is an eviction
//! a PodDisruptionBudget refuses (HTTP 429, `pdb_blocked`): the loop records
//! the reason, re-arms the same rung and lets the cooldown decide when it
//! is tried again. Nothing is retried here.
//!
//! Then each waits, within the step's timeout, for the owner's
//! replacement pods: evict and delete until the pod is gone and a new pod
//! of its owner (a new UID) is Ready; rollout until every pod the owner had
//! before is gone and it has as many Ready pods as it wants. The outcome
//! detail names the old and new UIDs. Whether the symptom cleared is the
//! loop's verification, as for every step.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Actuator, ActuatorError, Class, Prepared};
use crate::k8s::Kube;
use crate::k8s::client::{Eviction, K8sError, PodRef};
use crate::k8s::mapping::{self, Entries, Mapped};
use crate::k8s::owner::{self, Owner, OwnerKind, Resolution, Workload};
use crate::model::{Observations, Outcome, Step, Subject};

/// Annotation `kubectl rollout restart` sets on the pod template.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// Annotation naming the action that restarted the template.
pub const ACTION_ID: &str = "spire-healer.io/action-id";
/// The execute-time hold of an eviction a PodDisruptionBudget refused.
pub const PDB_BLOCKED: &str = "pdb_blocked";

/// `[actuators.<name>] type = "k8s_evict"` or `"k8s_delete_pod"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPodConfig {
    /// The pod's termination grace period; unset: its own
    /// (`terminationGracePeriodSeconds`).
    #[serde(default, with = "humantime_serde")]
    pub grace_period: Option<Duration>,
    /// Time between reads while waiting for the replacement.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

/// `[actuators.<name>] type = "k8s_rollout_restart"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sRolloutConfig {
    /// Time between reads while waiting for the rollout.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

fn default_poll() -> Duration {
    Duration::from_millis(500)
}

fn poll_problems(poll: Duration) -> Vec<(&'static str, String)> {
    if poll.is_zero() || poll > Duration::from_secs(60) {
        vec![(
            "poll_interval",
            "must be greater than zero and at most 1m".to_string(),
        )]
    } else {
        Vec::new()
    }
}

impl K8sPodConfig {
    /// (field, problem) pairs; empty when valid.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        poll_problems(self.poll_interval)
    }
}

impl K8sRolloutConfig {
    /// (field, problem) pairs; empty when valid.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        poll_problems(self.poll_interval)
    }
}

/// What a Kubernetes actuator does to the mapped pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `k8s_evict`.
    Evict,
    /// `k8s_delete_pod`.
    Delete,
    /// `k8s_rollout_restart`.
    RolloutRestart,
}

impl Mode {
    /// The actuator type.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Evict => "k8s_evict",
            Mode::Delete => "k8s_delete_pod",
            Mode::RolloutRestart => "k8s_rollout_restart",
        }
    }
}

/// One of the three Kubernetes actuators.
pub struct PodActuator {
    mode: Mode,
    grace_period: Option<Duration>,
    poll: Duration,
    kube: Arc<Kube>,
    entries: Arc<dyn Entries>,
}

impl PodActuator {
    /// `k8s_evict` or `k8s_delete_pod`.
    pub fn pods(
        mode: Mode,
        config: &K8sPodConfig,
        kube: Arc<Kube>,
        entries: Arc<dyn Entries>,
    ) -> Self {
        Self {
            mode,
            grace_period: config.grace_period,
            poll: config.poll_interval,
            kube,
            entries,
        }
    }

    /// `k8s_rollout_restart`.
    pub fn rollout(config: &K8sRolloutConfig, kube: Arc<Kube>, entries: Arc<dyn Entries>) -> Self {
        Self {
            mode: Mode::RolloutRestart,
            grace_period: None,
            poll: config.poll_interval,
            kube,
            entries,
        }
    }
}

#[async_trait]
impl Actuator for PodActuator {
    fn name(&self) -> &'static str {
        self.mode.as_str()
    }

    fn class(&self) -> Class {
        Class::Workload
    }

    /// Workloads, and the pods of servers and agents configured as
    /// workloads by name (`[[kubernetes.workloads]]`); any other agent,
    /// server or cluster incident is not about pods this mapping can find.
    /// Notes the SPIFFE ID the symptom names (the incident's evidence, or
    /// the SVID subject) for the mapping; an SVID's pods are found by that
    /// ID only, never by the name of the agent it lives on.
    ///
    /// A server's pod only while another configured server answers
    /// ([`server_precondition`]): never the last one.
    fn prepare(&self, step: &mut Step, obs: &Observations) -> Prepared {
        let subject = step.params["subject"].as_str().and_then(Subject::parse);
        let named = || mapping::configured(self.kube.config(), &step.target, None).is_some();
        let id = match &subject {
            Some(Subject::Server { server }) => {
                if !named() {
                    return Prepared::Skip("no_server_workload");
                }
                if let Some(wait) = server_precondition(server, obs) {
                    return Prepared::Wait(wait);
                }
                None
            }
            Some(Subject::Agent { .. }) => {
                if !named() {
                    return Prepared::Skip("not_a_workload");
                }
                None
            }
            Some(Subject::Cluster { .. }) => return Prepared::Skip("not_a_workload"),
            Some(Subject::Svid { spiffe_id, .. }) => {
                step.params["by_identity"] = json!(true);
                Some(spiffe_id.clone())
            }
            _ => step.params["evidence_spiffe_id"]
                .as_str()
                .map(str::to_string),
        };
        if let Some(id) = id {
            step.params["spiffe_id"] = json!(id);
        }
        Prepared::Ready
    }

    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let deadline = tokio::time::Instant::now() + step.timeout * 9 / 10;
        let spiffe_id = step.params["spiffe_id"].as_str();
        // An SVID's target is the agent it lives on, not its workload.
        let target = if step.params["by_identity"] == json!(true) {
            ""
        } else {
            step.target.as_str()
        };
        let Mapped { source, pods } = mapping::map(&self.kube, &*self.entries, target, spiffe_id)
            .await
            .map_err(|e| ActuatorError::Failed(e.to_string()))?;
        let source = json!(source);
        let pods = match pods {
            Ok(pods) => pods,
            Err(refusal) => {
                return Ok(Outcome::held(
                    refusal.as_str(),
                    json!({ "mapping": source }),
                ));
            }
        };
        let run = Run {
            actuator: self,
            step,
            deadline,
        };
        match self.mode {
            Mode::Evict | Mode::Delete => run.replace_pods(&pods, source).await,
            Mode::RolloutRestart => run.restart_owners(&pods, source).await,
        }
    }
}

/// Why a server's pod must not be replaced now (`None`: it may): as for
/// `server_failover`, never the last server. `last_server`: no other
/// server is watched; `no_other_server_reachable`: none of the others
/// answered on the last poll (with no server answering, the plan holds
/// every workload step as `no_server_reachable` before this is asked).
pub fn server_precondition(server: &str, obs: &Observations) -> Option<&'static str> {
    let mut others = obs.servers.iter().filter(|v| v.server != server).peekable();
    if others.peek().is_none() {
        return Some("last_server");
    }
    if !others.any(|v| v.reachable) {
        return Some("no_other_server_reachable");
    }
    None
}

/// One execution: the actuator, its step and its deadline.
struct Run<'a> {
    actuator: &'a PodActuator,
    step: &'a Step,
    deadline: tokio::time::Instant,
}

fn failed(e: impl std::fmt::Display) -> ActuatorError {
    ActuatorError::Failed(e.to_string())
}

impl Run<'_> {
    fn kube(&self) -> &Kube {
        &self.actuator.kube
    }

    /// Evicts or deletes each pod in turn, waiting for its replacement
    /// before the next.
    async fn replace_pods(&self, pods: &[Pod], source: Value) -> Result<Outcome, ActuatorError> {
        let mode = self.actuator.mode;
        let mut replaced = Vec::new();
        for pod in pods {
            let p = PodRef::of(pod)
                .ok_or_else(|| failed("a listed pod has no name, UID or resourceVersion"))?;
            let workload = match owner::resolve(self.kube(), pod).await.map_err(failed)? {
                Resolution::Owned(o) => owner::workload(self.kube(), &o).await.map_err(failed)?,
                Resolution::Bare | Resolution::Other(..) => None,
            };
            let before: HashSet<String> = match &workload {
                Some(w) => owner::pods_of(self.kube(), w)
                    .await
                    .map_err(failed)?
                    .iter()
                    .map(|p| owner::uid(p).to_string())
                    .collect(),
                None => HashSet::from([p.uid.clone()]),
            };
            let sent = match mode {
                Mode::Evict => self.kube().evict(&p, self.actuator.grace_period).await,
                _ => self
                    .kube()
                    .delete_pod(&p, self.actuator.grace_period)
                    .await
                    .map(|()| Eviction::Accepted),
            };
            match sent {
                Ok(Eviction::Accepted) => {}
                Ok(Eviction::Blocked(message)) => {
                    return Ok(Outcome::held(
                        PDB_BLOCKED,
                        json!({
                            "mapping": source,
                            "pod": p,
                            "message": message,
                            "replaced": replaced,
                        }),
                    ));
                }
                // Gone already (a run before this one, or its owner):
                // what is left is to wait for the replacement.
                Err(e) if e.status() == Some(404) => {}
                Err(e) if e.status() == Some(409) => {
                    return Err(ActuatorError::Failed(format!(
                        "pod {}/{} changed since it was mapped (UID {} at resourceVersion {} no longer holds); it was not {}: {e}",
                        p.namespace,
                        p.name,
                        p.uid,
                        p.resource_version,
                        if mode == Mode::Evict {
                            "evicted"
                        } else {
                            "deleted"
                        },
                    )));
                }
                Err(e) => return Err(failed(e)),
            }
            let new_uid = self.wait_replaced(&p, workload.as_ref(), &before).await?;
            replaced.push(json!({
                "pod": format!("{}/{}", p.namespace, p.name),
                "owner": workload.as_ref().map(|w| w.owner.to_string()),
                "old_uid": p.uid,
                "new_uid": new_uid,
            }));
        }
        Ok(Outcome::ok(json!({
            "mapping": source,
            "replaced": replaced,
        })))
    }

    /// Until the pod `p` is gone and its owner has a Ready pod whose UID
    /// was not among `before`. Returns that UID (`None` for a pod no owner
    /// replaces).
    async fn wait_replaced(
        &self,
        p: &PodRef,
        workload: Option<&Workload>,
        before: &HashSet<String>,
    ) -> Result<Option<String>, ActuatorError> {
        loop {
            let now = self
                .kube()
                .get::<Pod>(&p.namespace, &p.name)
                .await
                .map_err(failed)?;
            let gone = now.is_none_or(|n| owner::uid(&n) != p.uid);
            let new = match workload {
                Some(w) => owner::pods_of(self.kube(), w)
                    .await
                    .map_err(failed)?
                    .into_iter()
                    .find(|n| !before.contains(owner::uid(n)) && owner::ready(n))
                    .map(|n| Some(owner::uid(&n).to_string())),
                None => Some(None),
            };
            if gone && let Some(new) = new {
                return Ok(new);
            }
            self.sleep_or_give_up(|| {
                format!(
                    "pod {}/{} (UID {}) was {} but {} within the step's timeout",
                    p.namespace,
                    p.name,
                    p.uid,
                    if self.actuator.mode == Mode::Evict {
                        "evicted"
                    } else {
                        "deleted"
                    },
                    if gone {
                        "no new pod of its owner became Ready"
                    } else {
                        "it was not gone"
                    }
                )
            })
            .await?;
        }
    }

    async fn sleep_or_give_up(&self, why: impl FnOnce() -> String) -> Result<(), ActuatorError> {
        let next = tokio::time::Instant::now() + self.actuator.poll;
        if next >= self.deadline {
            return Err(ActuatorError::Failed(why()));
        }
        tokio::time::sleep_until(next).await;
        Ok(())
    }

    /// Restarts each distinct owner of `pods` and waits until every pod it
    /// had is replaced.
    async fn restart_owners(&self, pods: &[Pod], source: Value) -> Result<Outcome, ActuatorError> {
        let mut owners: Vec<Owner> = Vec::new();
        for pod in pods {
            let name = pod.metadata.name.clone().unwrap_or_default();
            match owner::resolve(self.kube(), pod).await.map_err(failed)? {
                Resolution::Owned(o) => {
                    if !owners.contains(&o) {
                        owners.push(o);
                    }
                }
                Resolution::Bare => {
                    return Err(ActuatorError::Failed(format!(
                        "pod {name} has no controller: no Deployment, DaemonSet or StatefulSet to restart"
                    )));
                }
                Resolution::Other(kind, owner) => {
                    return Err(ActuatorError::Failed(format!(
                        "pod {name} is controlled by {kind} {owner}, not by a Deployment, DaemonSet or StatefulSet: nothing to restart"
                    )));
                }
            }
        }
        let mut restarted = Vec::new();
        for o in &owners {
            let w = owner::workload(self.kube(), o)
                .await
                .map_err(failed)?
                .ok_or_else(|| ActuatorError::Failed(format!("{o} is gone")))?;
            let old: Vec<String> = owner::pods_of(self.kube(), &w)
                .await
                .map_err(failed)?
                .iter()
                .map(|p| owner::uid(p).to_string())
                .collect();
            let at = crate::clock::rfc3339(self.kube().now());
            let patch = restart_patch(&w.resource_version, &at, &self.step.action_id);
            let patched = match o.kind {
                OwnerKind::Deployment => self.patch::<Deployment>(o, &patch).await,
                OwnerKind::StatefulSet => self.patch::<StatefulSet>(o, &patch).await,
                OwnerKind::DaemonSet => self.patch::<DaemonSet>(o, &patch).await,
            };
            match patched {
                Ok(()) => {}
                Err(e) if e.status() == Some(409) => {
                    return Err(ActuatorError::Failed(format!(
                        "{o} changed since it was read (resourceVersion {} no longer holds): not restarted: {e}",
                        w.resource_version
                    )));
                }
                Err(e) => return Err(failed(e)),
            }
            let new = self.wait_rolled(&w, &old).await?;
            restarted.push(json!({
                "owner": o.to_string(),
                "restarted_at": at,
                "old_uids": old,
                "new_uids": new,
            }));
        }
        Ok(Outcome::ok(json!({
            "mapping": source,
            "restarted": restarted,
        })))
    }

    async fn patch<K>(&self, o: &Owner, patch: &Value) -> Result<(), K8sError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        self.kube()
            .merge_patch::<K>(&o.namespace, &o.name, patch)
            .await
            .map(|_| ())
    }

    /// Until none of `old` is left and the owner has as many Ready pods
    /// as it wants. Returns the Ready pods' UIDs.
    async fn wait_rolled(
        &self,
        w: &Workload,
        old: &[String],
    ) -> Result<Vec<String>, ActuatorError> {
        loop {
            let pods = owner::pods_of(self.kube(), w).await.map_err(failed)?;
            let left = pods
                .iter()
                .filter(|p| old.iter().any(|u| u == owner::uid(p)))
                .count();
            let ready: Vec<String> = pods
                .iter()
                .filter(|p| owner::ready(p))
                .map(|p| owner::uid(p).to_string())
                .collect();
            if left == 0 && ready.len() >= w.desired as usize {
                return Ok(ready);
            }
            self.sleep_or_give_up(|| {
                format!(
                    "{} was restarted but {left} of its {} old pods remain and {} of {} pods are Ready within the step's timeout",
                    w.owner,
                    old.len(),
                    ready.len(),
                    w.desired
                )
            })
            .await?;
        }
    }
}

/// The merge patch `kubectl rollout restart` makes, conditional on the
/// owner's `resourceVersion`, naming the action too.
pub fn restart_patch(resource_version: &str, at: &str, action_id: &str) -> Value {
    json!({
        "metadata": { "resourceVersion": resource_version },
        "spec": { "template": { "metadata": { "annotations": {
            RESTARTED_AT: at,
            ACTION_ID: action_id,
        } } } },
    })
}

// === Registration entries over the SPIRE server Entry API ===

#[async_trait]
impl Entries for super::spire::Topology {
    async fn entries(
        &self,
        spiffe_id: &str,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, String> {
        let (_, entries) = super::spire::on_any_server(self, Duration::from_secs(5), |c| {
            let id = spiffe_id.to_string();
            async move { c.list_entries_by_spiffe_id(&id).await }
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let sels = e
                    .selectors
                    .into_iter()
                    .map(|s| (s.r#type, s.value))
                    .collect();
                (e.id, sels)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::KubernetesConfig;
    use crate::model::{OutcomeKind, SymptomKind};
    use crate::telemetry::Metrics;

    struct NoEntries;

    #[async_trait]
    impl Entries for NoEntries {
        async fn entries(
            &self,
            _spiffe_id: &str,
        ) -> Result<Vec<(String, Vec<(String, String)>)>, String> {
            Ok(vec![(
                "e1".into(),
                vec![("k8s".into(), "ns:kube-system".into())],
            )])
        }
    }

    fn actuator(mode: Mode) -> PodActuator {
        let kube = Arc::new(Kube::new(
            KubernetesConfig {
                namespaces: vec!["apps".into()],
                kubeconfig: Some("/nonexistent/kubeconfig".into()),
                ..KubernetesConfig::default()
            },
            Arc::new(Metrics::new()),
            Arc::new(crate::clock::ManualClock::at_unix(0)),
        ));
        let config = K8sPodConfig {
            grace_period: None,
            poll_interval: default_poll(),
        };
        PodActuator::pods(mode, &config, kube, Arc::new(NoEntries))
    }

    fn step(subject: &str) -> Step {
        Step {
            action_id: "a1".into(),
            incident_id: "i1".into(),
            symptom: SymptomKind::StaleCertFile,
            rung: 0,
            actuator: "evict".into(),
            target: "web-svid".into(),
            params: json!({ "subject": subject, "evidence_spiffe_id": "spiffe://td/web" }),
            timeout: Duration::from_secs(5),
            verify_within: Duration::from_secs(5),
            dry_run: false,
        }
    }

    #[test]
    fn prepare_takes_the_spiffe_id_and_skips_agents() {
        let a = actuator(Mode::Evict);
        assert_eq!(a.name(), "k8s_evict");
        assert_eq!(a.class(), Class::Workload);
        let obs = Observations::default();
        let mut s = step("cert_file:web-svid");
        assert_eq!(a.prepare(&mut s, &obs), Prepared::Ready);
        assert_eq!(s.params["spiffe_id"], "spiffe://td/web");
        let mut s = step("svid:node-a/spiffe://td/api");
        assert_eq!(a.prepare(&mut s, &obs), Prepared::Ready);
        assert_eq!(s.params["spiffe_id"], "spiffe://td/api");
        assert_eq!(
            a.prepare(&mut step("agent:node-a"), &obs),
            Prepared::Skip("not_a_workload")
        );
        assert_eq!(
            a.prepare(&mut step("cluster:td"), &obs),
            Prepared::Skip("not_a_workload")
        );
    }

    #[tokio::test]
    async fn an_entry_outside_the_allow_list_is_held_without_a_call() {
        // The entry names kube-system: refused before any client is built
        // (the kubeconfig does not exist), as a hold, not an error.
        let a = actuator(Mode::Delete);
        let mut s = step("cert_file:web-svid");
        a.prepare(&mut s, &Observations::default());
        let out = a.execute(&s).await.unwrap();
        assert_eq!(out.kind, OutcomeKind::Held, "{out:?}");
        assert_eq!(out.detail["held"], "namespace_not_allowed");
        assert_eq!(out.detail["mapping"]["via"], "entries");
        assert_eq!(out.detail["mapping"]["entry_ids"], json!(["e1"]));
    }

    #[test]
    fn every_refusal_and_the_budget_are_execute_time_hold_reasons() {
        for r in crate::k8s::Refusal::ALL {
            assert!(super::super::HELD_REASONS.contains(&r.as_str()), "{r:?}");
        }
        assert!(super::super::HELD_REASONS.contains(&PDB_BLOCKED));
        assert_eq!(
            Outcome::held(PDB_BLOCKED, json!({})).held_reason(),
            "pdb_blocked"
        );
    }

    fn view(name: &str, reachable: bool) -> Arc<crate::model::ServerView> {
        let t = std::time::UNIX_EPOCH;
        Arc::new(crate::model::ServerView {
            server: name.into(),
            reachable,
            last_error: (!reachable).then(|| "unavailable".into()),
            since: t,
            updated_at: t,
            uptime_secs: 1,
            svid_expires_at: None,
            agents_count: 0,
            entries_count: 0,
            agents: vec![],
            agents_truncated: false,
            bundle: vec![],
            bundle_sequence: 0,
            entry_lookups: vec![],
            address_reachable: None,
            address_error: None,
        })
    }

    /// Server `server-a` and agent `agent-a` configured as workloads.
    fn named_actuator() -> PodActuator {
        let w = |name: &str, selector: &str, node: Option<&str>| crate::k8s::WorkloadConfig {
            name: name.into(),
            namespace: "spire".into(),
            selector: selector.into(),
            spiffe_id: None,
            node: node.map(str::to_string),
        };
        let kube = Arc::new(Kube::new(
            KubernetesConfig {
                namespaces: vec!["spire".into()],
                kubeconfig: Some("/nonexistent/kubeconfig".into()),
                workloads: vec![
                    w(
                        "server-a",
                        "statefulset.kubernetes.io/pod-name=spire-server-0",
                        None,
                    ),
                    w("agent-a", "app=spire-agent", Some("node-a")),
                ],
                ..KubernetesConfig::default()
            },
            Arc::new(Metrics::new()),
            Arc::new(crate::clock::ManualClock::at_unix(0)),
        ));
        let config = K8sPodConfig {
            grace_period: None,
            poll_interval: default_poll(),
        };
        PodActuator::pods(Mode::Evict, &config, kube, Arc::new(NoEntries))
    }

    fn on(target: &str, subject: &str) -> Step {
        Step {
            target: target.into(),
            params: json!({ "subject": subject }),
            ..step(subject)
        }
    }

    #[test]
    fn a_server_pod_is_never_the_last_server() {
        let a = named_actuator();
        let obs = |views: Vec<Arc<crate::model::ServerView>>| Observations {
            servers: views,
            ..Observations::default()
        };
        let prep = |target: &str, o: &Observations| {
            a.prepare(&mut on(target, &format!("server:{target}")), o)
        };
        let both = obs(vec![view("server-a", false), view("server-b", true)]);
        assert_eq!(prep("server-a", &both), Prepared::Ready);
        assert_eq!(
            prep("server-a", &obs(vec![view("server-a", false)])),
            Prepared::Wait("last_server")
        );
        assert_eq!(
            prep(
                "server-a",
                &obs(vec![view("server-a", false), view("server-b", false)])
            ),
            Prepared::Wait("no_other_server_reachable")
        );
        // A server not configured as a workload has no pod to replace.
        assert_eq!(
            prep("server-b", &both),
            Prepared::Skip("no_server_workload")
        );
    }

    #[test]
    fn an_agent_pod_needs_its_workload_and_an_svid_maps_by_identity() {
        let a = named_actuator();
        let obs = Observations::default();
        assert_eq!(
            a.prepare(&mut on("agent-a", "agent:agent-a"), &obs),
            Prepared::Ready
        );
        assert_eq!(
            a.prepare(&mut on("agent-b", "agent:agent-b"), &obs),
            Prepared::Skip("not_a_workload")
        );
        let mut s = on("agent-a", "svid:agent-a/spiffe://td/web");
        assert_eq!(a.prepare(&mut s, &obs), Prepared::Ready);
        assert_eq!(s.params["by_identity"], true);
        assert_eq!(s.params["spiffe_id"], "spiffe://td/web");
    }

    #[test]
    fn a_workload_node_narrows_to_pods_on_it() {
        let pod = |node: Option<&str>| Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: node.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(mapping::on_node(&pod(Some("node-a")), Some("node-a")));
        assert!(!mapping::on_node(&pod(Some("node-b")), Some("node-a")));
        assert!(!mapping::on_node(&pod(None), Some("node-a")));
        assert!(mapping::on_node(&pod(None), None));
    }

    #[test]
    fn the_restart_patch_is_conditional() {
        assert_eq!(
            restart_patch("17", "2025-01-01T00:00:00Z", "act-1"),
            json!({
                "metadata": { "resourceVersion": "17" },
                "spec": { "template": { "metadata": { "annotations": {
                    "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
                    "spire-healer.io/action-id": "act-1",
                } } } },
            })
        );
    }
}
