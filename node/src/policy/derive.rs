//! What a node derives from applied policy, as plain functions of a [`PolicyState`]: the
//! EndpointPickerConfig in force, the pool (endpoints and objective priorities) and the
//! model-rewrite table. No IO; the feed task applies the results to the running node.

use std::collections::{BTreeSet, HashMap};

use infermesh_raft_store::PolicyState;
use infermesh_raft_store::policy::{Kind, ObjectKey};

use crate::policy::rewrite::ModelRewrites;
use crate::pool_model::Engine;
use crate::pool_model::{EndpointSpec, PoolSpec};

/// Name of the EndpointPickerConfig preferred when several are stored.
pub const DEFAULT_EPP_CONFIG_NAME: &str = "default";

/// The EndpointPickerConfig a node runs: which object, at which version, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EppChoice {
    /// The stored object.
    pub key: ObjectKey,
    /// Its resource version (a new version means a new scheduler).
    pub resource_version: u64,
    /// The config without `metadata`, as the scheduler's loader reads it.
    pub text: String,
}

/// Picks the EndpointPickerConfig in force: the one named `default` (any namespace,
/// `default` namespace first), else the first by namespace and name; `None` when policy
/// holds none (the node keeps its `--config-file` or built-in config).
pub fn epp_choice(state: &PolicyState) -> Option<EppChoice> {
    let mut all = state.list(Kind::EndpointPickerConfig).peekable();
    all.peek()?;
    let stored: Vec<_> = all.collect();
    let chosen = stored
        .iter()
        .find(|s| {
            let m = s.object.metadata();
            m.name == DEFAULT_EPP_CONFIG_NAME && m.namespace == "default"
        })
        .or_else(|| {
            stored
                .iter()
                .find(|s| s.object.metadata().name == DEFAULT_EPP_CONFIG_NAME)
        })
        .unwrap_or(&stored[0]);
    let infermesh_raft_store::policy::PolicyObject::EndpointPickerConfig(doc) = &chosen.object
    else {
        return None;
    };
    Some(EppChoice {
        key: chosen.object.key(),
        resource_version: chosen.resource_version,
        text: doc.config_text(),
    })
}

/// The pool name a node serves: `--pool`, else the endpoints file's pool, else the only
/// InferencePool in policy.
pub fn pool_name(
    state: &PolicyState,
    flag: Option<&str>,
    base: Option<&PoolSpec>,
) -> Option<String> {
    if let Some(f) = flag {
        return Some(f.to_owned());
    }
    if let Some(b) = base.filter(|b| !b.name.is_empty()) {
        return Some(b.name.clone());
    }
    let mut pools = state.pools();
    match (pools.next(), pools.next()) {
        (Some(p), None) => Some(p.metadata.name.clone()),
        _ => None,
    }
}

/// The pool the node schedules over: the endpoints file's pool (if any) plus, for pool
/// `name`, every policy InferenceEndpoints entry that names the pool in `poolRef` (or has
/// no `poolRef` and matches the stored InferencePool's selector), and the priorities of the
/// InferenceObjectives whose `poolRef` names it (policy overrides the file). Endpoints are
/// unique by address; the file's entry wins. Endpoints with an unknown engine label are
/// skipped (and returned so the caller can log them).
pub fn pool_spec(
    state: &PolicyState,
    name: Option<&str>,
    base: Option<&PoolSpec>,
) -> (PoolSpec, Vec<String>) {
    let mut spec = base.cloned().unwrap_or_default();
    let mut skipped = Vec::new();
    let Some(name) = name else {
        return (spec, skipped);
    };
    spec.name = name.to_owned();
    let pool = state
        .pools()
        .find(|p| p.metadata.name == name)
        .map(|p| p.spec.selector.match_labels.clone());
    let mut seen: BTreeSet<_> = spec.endpoints.iter().map(|e| e.address).collect();
    for list in state.endpoint_lists() {
        let selected = match &list.spec.pool_ref {
            Some(r) => r.name == name,
            None => pool.is_some(),
        };
        if !selected {
            continue;
        }
        for (i, ep) in list.spec.endpoints.iter().enumerate() {
            if list.spec.pool_ref.is_none()
                && let Some(sel) = &pool
                && !sel.iter().all(|(k, v)| ep.labels.get(k) == Some(v))
            {
                continue;
            }
            let engine = match Engine::from_labels(&ep.labels) {
                Ok(e) => e,
                Err(e) => {
                    skipped.push(format!(
                        "InferenceEndpoints {}/{} endpoint {} ({}): unknown engine type {:?}",
                        list.metadata.namespace, list.metadata.name, i, ep.address, e.0
                    ));
                    continue;
                }
            };
            if !seen.insert(ep.address) {
                continue;
            }
            spec.endpoints.push(EndpointSpec {
                address: ep.address,
                pod: format!("{}-{i}", list.metadata.name),
                labels: ep.labels.clone(),
                engine,
            });
        }
    }
    let mut objectives: HashMap<String, i32> = spec.objectives.clone();
    for o in state.objectives() {
        if o.spec.pool_ref.name == name {
            objectives.insert(o.metadata.name.clone(), o.spec.effective_priority());
        }
    }
    spec.objectives = objectives;
    (spec, skipped)
}

/// The model rewrites of pool `name` (all rewrites when the node has no pool name).
pub fn rewrites(state: &PolicyState, name: Option<&str>) -> ModelRewrites {
    ModelRewrites::from_policy(state.list(Kind::InferenceModelRewrite).filter_map(|s| {
        match &s.object {
            infermesh_raft_store::policy::PolicyObject::InferenceModelRewrite(d)
                if name.is_none_or(|n| d.spec.pool_ref.name == n) =>
            {
                Some((s.created_index, d))
            }
            _ => None,
        }
    }))
}

/// Test helper: applies a multi-document YAML to `state` as one Raft entry at `index`.
#[cfg(test)]
pub(crate) fn apply_yaml(state: &mut PolicyState, index: u64, yaml: &str) {
    use infermesh_raft_store::policy::{
        PolicyOp, PolicyRequest, Touched, accept_any_epp_config, parse_documents,
    };
    let ops = parse_documents(yaml, &accept_any_epp_config())
        .unwrap()
        .into_iter()
        .map(|o| PolicyOp::Put {
            object: Box::new(o),
            expected_version: None,
        })
        .collect();
    state.handle_request(index, &PolicyRequest { ops }, &mut Touched::default());
}

/// Test helper: the policy state after applying a multi-document YAML at index 1.
#[cfg(test)]
pub(crate) fn state_from_yaml(yaml: &str) -> PolicyState {
    let mut s = PolicyState::default();
    apply_yaml(&mut s, 1, yaml);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> PolicyState {
        state_from_yaml(yaml)
    }

    const POLICY: &str = "\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llama}
spec: {selector: {matchLabels: {app: vllm}}, targetPorts: [{number: 8000}]}
---
apiVersion: infermesh.io/v1alpha1
kind: InferenceEndpoints
metadata: {name: fleet}
spec:
  endpoints:
  - {address: '10.0.0.1:8000', labels: {app: vllm}}
  - {address: '10.0.0.2:8000', labels: {app: other}}
---
apiVersion: infermesh.io/v1alpha1
kind: InferenceEndpoints
metadata: {name: pinned}
spec:
  poolRef: {name: llama}
  endpoints:
  - {address: '10.0.0.3:8000'}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: llama}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: elsewhere}
spec: {priority: 9, poolRef: {name: other-pool}}
---
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
metadata: {name: zz}
plugins: [{type: queue-scorer}]
---
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
metadata: {name: default}
plugins: [{type: kv-cache-utilization-scorer}]
";

    #[test]
    fn pool_takes_selected_endpoints_and_its_own_objectives() {
        let s = state(POLICY);
        let name = pool_name(&s, None, None);
        assert_eq!(name.as_deref(), Some("llama"));
        let (spec, skipped) = pool_spec(&s, name.as_deref(), None);
        assert!(skipped.is_empty());
        let addrs: Vec<String> = spec
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.1:8000", "10.0.0.3:8000"]);
        assert_eq!(spec.objectives.get("batch"), Some(&-1));
        assert!(!spec.objectives.contains_key("elsewhere"));
    }

    #[test]
    fn the_file_pool_is_kept_and_policy_adds_to_it() {
        let s = state(POLICY);
        let base = crate::discovery::parse_pool(
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
             metadata: {name: llama}\n\
             spec: {selector: {matchLabels: {app: vllm}}, targetPorts: [{number: 8000}]}\n\
             pods:\n- {address: 10.0.0.3, labels: {app: vllm}}\n\
             - {address: 10.0.0.9, labels: {app: vllm}}\n---\n\
             apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             metadata: {name: batch}\nspec: {priority: 3, poolRef: {name: llama}}\n",
        )
        .unwrap();
        let (spec, _) = pool_spec(&s, pool_name(&s, None, Some(&base)).as_deref(), Some(&base));
        let addrs: Vec<String> = spec
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.3:8000", "10.0.0.9:8000", "10.0.0.1:8000"]);
        assert_eq!(
            spec.objectives.get("batch"),
            Some(&-1),
            "policy overrides the file"
        );
    }

    #[test]
    fn the_default_named_epp_config_wins() {
        let s = state(POLICY);
        let c = epp_choice(&s).unwrap();
        assert_eq!(c.key.name, "default");
        assert!(c.text.contains("kv-cache-utilization-scorer"), "{}", c.text);
        assert!(!c.text.contains("metadata"), "{}", c.text);
        assert_eq!(epp_choice(&PolicyState::default()), None);
    }
}
