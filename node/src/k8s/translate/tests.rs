use std::sync::Arc;

use infermesh_raft_store::PolicyState;
use infermesh_raft_store::policy::{
    Kind, ObjectKey, PolicyObject, PolicyOp, PolicyRequest, PolicyResponse, accept_any_epp_config,
};
use serde_json::json;

use super::*;

fn pool(name: &str, spec: serde_json::Value) -> CustomObject {
    CustomObject {
        api_version: "inference.networking.k8s.io/v1".into(),
        kind: "InferencePool".into(),
        namespace: "ns".into(),
        name: name.into(),
        generation: Some(1),
        spec,
    }
}

fn llama() -> CustomObject {
    pool(
        "llama",
        json!({
            "selector": {"matchLabels": {"app": "vllm"}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "infermesh", "port": {"number": 9002}},
        }),
    )
}

fn objective(group: &str, name: &str, spec: serde_json::Value) -> CustomObject {
    CustomObject {
        api_version: format!("{group}/v1alpha2"),
        kind: "InferenceObjective".into(),
        namespace: "ns".into(),
        name: name.into(),
        generation: Some(3),
        spec,
    }
}

fn pod(name: &str, ip: &str, ready: bool, labels: &[(&str, &str)]) -> PodView {
    PodView {
        name: name.into(),
        namespace: "ns".into(),
        ip: Some(ip.parse().unwrap()),
        ready,
        terminating: false,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn endpoints_of(d: &Desired, pool: &str) -> Vec<String> {
    d.objects
        .iter()
        .find_map(|o| match o {
            PolicyObject::InferenceEndpoints(e) if e.metadata.name == pool => Some(
                e.spec
                    .endpoints
                    .iter()
                    .map(|e| e.address.to_string())
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// Applies `ops` to `state` the way the Raft state machine does.
fn apply(state: &mut PolicyState, ops: Vec<PolicyOp>, index: u64) {
    if ops.is_empty() {
        return;
    }
    let mut touched = infermesh_raft_store::policy::Touched::default();
    let resp = state.handle_request(index, &PolicyRequest { ops }, &mut touched);
    assert!(
        matches!(resp, PolicyResponse::Applied { .. }),
        "write refused: {resp:?}"
    );
}

#[test]
fn ready_pods_picked_by_the_selector_are_the_pools_endpoints() {
    let mut view = ClusterView {
        pools: vec![llama()],
        pods: vec![
            pod(
                "a",
                "10.0.0.1",
                true,
                &[("app", "vllm"), ("llm-d.ai/role", "decode")],
            ),
            pod("b", "10.0.0.2", false, &[("app", "vllm")]),
            pod("c", "10.0.0.3", true, &[("app", "other")]),
        ],
        ..ClusterView::default()
    };
    let v = accept_any_epp_config();
    assert_eq!(
        endpoints_of(&desired(&view, &v), "llama"),
        vec!["10.0.0.1:8000"]
    );

    // b becomes ready, a starts terminating.
    view.pods[1].ready = true;
    view.pods[0].terminating = true;
    let d = desired(&view, &v);
    assert_eq!(endpoints_of(&d, "llama"), vec!["10.0.0.2:8000"]);
    assert!(d.objects.iter().all(is_managed));
}

#[test]
fn an_invalid_object_gets_a_verdict_naming_the_field_and_the_rest_goes_through() {
    let view = ClusterView {
        pools: vec![
            llama(),
            pool(
                "broken",
                json!({
                    "selector": {"matchLabels": {"app": "vllm"}},
                    "targetPorts": [{"number": 70000}],
                    "endpointPickerRef": {"name": "infermesh"},
                }),
            ),
        ],
        objectives: vec![
            objective(
                "llm-d.ai",
                "chat",
                json!({"priority": 5, "poolRef": {"name": "llama"}}),
            ),
            objective(
                "llm-d.ai",
                "typo",
                json!({"priorty": 5, "poolRef": {"name": "llama"}}),
            ),
        ],
        ..ClusterView::default()
    };
    let d = desired(&view, &accept_any_epp_config());
    let verdict = |name: &str| {
        d.reviews
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.verdict.clone())
            .unwrap()
    };
    assert_eq!(verdict("llama"), Verdict::Accepted);
    assert_eq!(verdict("chat"), Verdict::Accepted);
    match verdict("broken") {
        Verdict::Invalid { field, .. } => assert!(field.contains("targetPorts"), "{field}"),
        v => panic!("{v:?}"),
    }
    match verdict("typo") {
        Verdict::Invalid { field, reason } => {
            assert!(field.starts_with("spec"), "{field}");
            assert!(reason.contains("priorty"), "{reason}");
        }
        v => panic!("{v:?}"),
    }
    let keys: Vec<ObjectKey> = d.objects.iter().map(PolicyObject::key).collect();
    assert!(keys.contains(&ObjectKey::new(Kind::InferenceObjective, "ns", "chat")));
    assert!(!keys.iter().any(|k| k.name == "typo" || k.name == "broken"));
}

#[test]
fn plan_creates_changes_and_deletes_only_its_own_objects() {
    let v = accept_any_epp_config();
    let mut state = PolicyState::default();
    // An operator's hand-applied objective, not the controller's.
    let by_hand = infermesh_raft_store::policy::parse_documents(
        "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: manual, namespace: ns}\nspec: {poolRef: {name: llama}}\n",
        &v,
    )
    .unwrap();
    apply(
        &mut state,
        by_hand
            .into_iter()
            .map(|o| PolicyOp::Put {
                object: Box::new(o),
                expected_version: None,
            })
            .collect(),
        1,
    );

    let mut view = ClusterView {
        pools: vec![llama()],
        pods: vec![pod("a", "10.0.0.1", true, &[("app", "vllm")])],
        objectives: vec![objective(
            "llm-d.ai",
            "chat",
            json!({"priority": 5, "poolRef": {"name": "llama"}}),
        )],
        ..ClusterView::default()
    };
    let ops = plan(&desired(&view, &v), &state);
    assert_eq!(ops.len(), 3, "pool, its endpoints, the objective: {ops:?}");
    apply(&mut state, ops, 2);
    assert!(
        plan(&desired(&view, &v), &state).is_empty(),
        "nothing changed, nothing written"
    );

    // Changed priority: one conditional put.
    view.objectives[0].spec = json!({"priority": 9, "poolRef": {"name": "llama"}});
    let ops = plan(&desired(&view, &v), &state);
    assert!(
        matches!(
            &ops[..],
            [PolicyOp::Put {
                expected_version: Some(_),
                ..
            }]
        ),
        "{ops:?}"
    );
    apply(&mut state, ops, 3);
    let stored = state.objective("ns", "chat").unwrap();
    assert_eq!(stored.spec.priority, Some(9));

    // Deleted from the cluster: deleted from policy; the hand-applied one stays.
    view.objectives.clear();
    let ops = plan(&desired(&view, &v), &state);
    assert!(
        matches!(&ops[..], [PolicyOp::Delete { key, .. }] if key.name == "chat"),
        "{ops:?}"
    );
    apply(&mut state, ops, 4);
    assert!(state.objective("ns", "manual").is_some());
    assert!(state.objective("ns", "chat").is_none());
}

#[test]
fn the_config_map_becomes_the_default_config_and_a_broken_one_keeps_the_old() {
    let v = accept_any_epp_config();
    let mut state = PolicyState::default();
    let mut view = ClusterView {
        config: Some(ConfigMapConfig {
            namespace: "ns".into(),
            name: "epp".into(),
            key: "epp-config.yaml".into(),
            text: Some(
                "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
                    .into(),
            ),
        }),
        ..ClusterView::default()
    };
    let ops = plan(&desired(&view, &v), &state);
    apply(&mut state, ops, 1);
    assert_eq!(
        crate::policy::derive::epp_choice(&state).unwrap().key.name,
        "default"
    );
    // The key disappears: nothing is deleted, the problem is reported.
    view.config.as_mut().unwrap().text = None;
    let d = desired(&view, &v);
    assert!(
        d.config_problem
            .as_deref()
            .unwrap()
            .contains("epp-config.yaml")
    );
    assert!(plan(&d, &state).is_empty());
    let _ = Arc::new(state);
}
