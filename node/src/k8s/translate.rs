//! What the Kubernetes objects the controller watches mean for policy, as plain functions:
//! InferencePools, the pods their selectors pick, objectives, model rewrites and the
//! EndpointPickerConfig ConfigMap become policy objects ([`desired`]); the difference to the
//! policy in force becomes one all-or-nothing write ([`plan`]). No IO, no clock.
//!
//! Every object the controller writes carries the annotation [`MANAGED_BY`], so [`plan`]
//! deletes only what it created and never an object an operator applied by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use infermesh_raft_store::PolicyState;
use infermesh_raft_store::policy::{
    EppConfigValidator, InferenceEndpointsSpec, Kind, ObjectKey, ObjectMeta, PolicyObject,
    PolicyOp, PoolRef, StaticEndpoint, parse_value, validate_object,
};
use serde_json::{Value, json};

/// Annotation on every policy object the controller owns.
pub const MANAGED_BY: &str = "infermesh.io/managed-by";
/// Its value.
pub const MANAGED_BY_VALUE: &str = "kubernetes";

/// A custom resource as the controller read it (either objective group, or InferencePool).
#[derive(Debug, Clone, PartialEq)]
pub struct CustomObject {
    /// `apiVersion` as served.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.generation` (echoed in status conditions).
    pub generation: Option<i64>,
    /// `spec`, as served.
    pub spec: Value,
}

/// What the controller needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `status.podIP`, once assigned.
    pub ip: Option<IpAddr>,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set: the pod is going away and gets no new requests.
    pub terminating: bool,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// The EndpointPickerConfig ConfigMap, when the node was given one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapConfig {
    /// Namespace of the ConfigMap.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The data key holding the config.
    pub key: String,
    /// The key's text (`None`: the ConfigMap or the key does not exist).
    pub text: Option<String>,
}

/// Everything the controller has read, at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// InferencePools.
    pub pools: Vec<CustomObject>,
    /// Pods in the watched namespace.
    pub pods: Vec<PodView>,
    /// InferenceObjectives of the group in force.
    pub objectives: Vec<CustomObject>,
    /// InferenceModelRewrites of the group in force.
    pub rewrites: Vec<CustomObject>,
    /// The EndpointPickerConfig source.
    pub config: Option<ConfigMapConfig>,
}

/// Whether an object was taken into policy, and if not, which field is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Mirrored into policy.
    Accepted,
    /// Refused; nothing of it reached policy.
    Invalid {
        /// The offending field, as a path (`spec.targetPorts[0].number`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The verdict on one custom resource, for its status condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    /// `apiVersion` of the object reviewed.
    pub api_version: String,
    /// Its kind.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The generation the verdict is about.
    pub generation: Option<i64>,
    /// The verdict.
    pub verdict: Verdict,
}

/// The policy the cluster asks for, and a verdict per custom resource.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Policy objects, all annotated [`MANAGED_BY`].
    pub objects: Vec<PolicyObject>,
    /// One per custom resource read.
    pub reviews: Vec<Review>,
    /// A problem with the EndpointPickerConfig ConfigMap (the node keeps the config in
    /// force), for the log.
    pub config_problem: Option<String>,
}

fn managed_meta(namespace: &str, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": namespace,
        "annotations": {MANAGED_BY: MANAGED_BY_VALUE},
    })
}

/// Reads one custom resource into a policy object through the node's own validation.
fn convert(o: &CustomObject, validator: &EppConfigValidator) -> Result<PolicyObject, Verdict> {
    let doc = json!({
        "apiVersion": o.api_version,
        "kind": o.kind,
        "metadata": managed_meta(&o.namespace, &o.name),
        "spec": o.spec,
    });
    let invalid = |e: infermesh_raft_store::policy::InvalidDocument| Verdict::Invalid {
        field: if e.field.is_empty() || e.field == "." {
            "spec".into()
        } else if e.field.starts_with("spec") || e.field.starts_with("metadata") {
            e.field
        } else {
            format!("spec.{}", e.field)
        },
        reason: e.reason,
    };
    let object = parse_value(1, doc).map_err(invalid)?;
    validate_object(1, &object, validator).map_err(invalid)?;
    Ok(object)
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pool's endpoints: every ready, non-terminating pod with an IP that the selector
/// picks, at each target port, with its labels (roles, engine type).
fn pool_endpoints(
    pool: &PolicyObject,
    pods: &[PodView],
) -> Option<infermesh_raft_store::policy::Document<InferenceEndpointsSpec>> {
    let PolicyObject::InferencePool(p) = pool else {
        return None;
    };
    let mut endpoints = Vec::new();
    for pod in pods {
        if pod.namespace != p.metadata.namespace
            || !pod.ready
            || pod.terminating
            || !selects(&p.spec.selector.match_labels, &pod.labels)
        {
            continue;
        }
        let Some(ip) = pod.ip else { continue };
        for port in &p.spec.target_ports {
            let Ok(port) = u16::try_from(port.number) else {
                continue;
            };
            endpoints.push(StaticEndpoint {
                address: SocketAddr::new(ip, port),
                labels: pod.labels.clone(),
            });
        }
    }
    endpoints.sort_by_key(|e| e.address);
    let meta = ObjectMeta {
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::from([(MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned())]),
        resource_version: None,
    };
    Some(infermesh_raft_store::policy::Document {
        api_version: infermesh_raft_store::policy::INFERMESH_API_VERSION.into(),
        kind: Kind::InferenceEndpoints.to_string(),
        metadata: meta,
        spec: InferenceEndpointsSpec {
            pool_ref: Some(PoolRef {
                group: "inference.networking.k8s.io".into(),
                kind: "InferencePool".into(),
                name: p.metadata.name.clone(),
            }),
            endpoints,
        },
    })
}

fn config_object(
    c: &ConfigMapConfig,
    validator: &EppConfigValidator,
) -> Result<Option<PolicyObject>, String> {
    let Some(text) = &c.text else {
        return Err(format!(
            "ConfigMap {}/{} has no key {:?}: the node keeps the config in force",
            c.namespace, c.name, c.key
        ));
    };
    let bad = |reason: String| {
        format!(
            "ConfigMap {}/{} key {:?}: {reason}; the node keeps the config in force",
            c.namespace, c.name, c.key
        )
    };
    let mut doc: Value = serde_yaml_ng::from_str(text).map_err(|e| bad(e.to_string()))?;
    let Value::Object(map) = &mut doc else {
        return Err(bad("not a mapping".into()));
    };
    map.insert(
        "metadata".into(),
        managed_meta(&c.namespace, crate::policy::derive::DEFAULT_EPP_CONFIG_NAME),
    );
    let object = parse_value(1, doc).map_err(|e| bad(e.to_string()))?;
    validate_object(1, &object, validator).map_err(|e| bad(e.to_string()))?;
    Ok(Some(object))
}

/// The policy the cluster describes. Invalid objects are left out (with a verdict naming
/// the field); everything valid is kept, so one bad objective does not stall the others.
pub fn desired(view: &ClusterView, validator: &EppConfigValidator) -> Desired {
    let mut out = Desired::default();
    let review = |o: &CustomObject, verdict: Verdict| Review {
        api_version: o.api_version.clone(),
        kind: o.kind.clone(),
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        generation: o.generation,
        verdict,
    };
    for o in view
        .pools
        .iter()
        .chain(&view.objectives)
        .chain(&view.rewrites)
    {
        match convert(o, validator) {
            Ok(object) => {
                if let Some(eps) = pool_endpoints(&object, &view.pods) {
                    out.objects.push(PolicyObject::InferenceEndpoints(eps));
                }
                out.objects.push(object);
                out.reviews.push(review(o, Verdict::Accepted));
            }
            Err(v) => out.reviews.push(review(o, v)),
        }
    }
    if let Some(c) = &view.config {
        match config_object(c, validator) {
            Ok(Some(o)) => out.objects.push(o),
            Ok(None) => {}
            Err(problem) => out.config_problem = Some(problem),
        }
    }
    out
}

/// Whether a stored object is the controller's.
pub fn is_managed(o: &PolicyObject) -> bool {
    o.metadata().annotations.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE)
}

/// The write that turns the policy in force into `desired`: puts for new and changed
/// objects, deletes for the controller's objects the cluster no longer has. Conditional on
/// the versions read, so a write racing another one is refused rather than lost. A
/// ConfigMap that cannot be read leaves the stored config alone; an object an operator
/// applied by hand under the same key is replaced (the cluster is the source of truth for
/// what it names) but never deleted.
pub fn plan(desired: &Desired, current: &PolicyState) -> Vec<PolicyOp> {
    let mut ops = Vec::new();
    let mut wanted = BTreeSet::new();
    for o in &desired.objects {
        let key = o.key();
        wanted.insert(key.clone());
        let stored = current.get(&key);
        let same = stored.is_some_and(|s| {
            let mut a = s.object.clone();
            a.metadata_mut().resource_version = None;
            a == *o
        });
        if !same {
            ops.push(PolicyOp::Put {
                object: Box::new(o.clone()),
                // A create is unconditional: the state machine has no "must not exist".
                expected_version: stored.map(|s| s.resource_version),
            });
        }
    }
    let keep_config = desired.config_problem.is_some();
    for s in current.iter() {
        let key: ObjectKey = s.object.key();
        if wanted.contains(&key) || !is_managed(&s.object) {
            continue;
        }
        if keep_config && key.kind == Kind::EndpointPickerConfig {
            continue;
        }
        ops.push(PolicyOp::Delete {
            key,
            expected_version: Some(s.resource_version),
        });
    }
    ops
}

#[cfg(test)]
mod tests;
