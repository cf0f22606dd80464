//! Policy model tests: parse, validate and apply by feeding the state machine.

use super::*;

const ALL_KINDS: &str = r#"
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: llama
spec:
  selector:
    matchLabels:
      app: vllm-llama
  targetPorts:
    - number: 8000
  endpointPickerRef:
    name: infermesh
    port:
      number: 9002
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata:
  name: chat
  namespace: prod
spec:
  priority: 10
  poolRef:
    name: llama
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata:
  name: canary
spec:
  poolRef:
    name: llama
  rules:
    - matches:
        - model:
            type: Exact
            value: llama-3
      targets:
        - modelRewrite: llama-3-a
          weight: 90
        - modelRewrite: llama-3-b
          weight: 10
---
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: prefix-cache-scorer
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: prefix-cache-scorer
---
apiVersion: infermesh.io/v1alpha1
kind: InferenceEndpoints
metadata:
  name: static
spec:
  endpoints:
    - address: 127.0.0.1:8001
      labels:
        app: vllm-llama
    - address: 127.0.0.1:8002
---
apiVersion: infermesh.io/v1alpha1
kind: InfermeshNode
metadata:
  name: node-1
spec:
  raftId: 1
  extProcAddress: 127.0.0.1:9002
  xdsAddress: 127.0.0.1:18000
  proxyAddress: 127.0.0.1:8080
"#;

fn parse(text: &str) -> Result<Vec<PolicyObject>, InvalidDocument> {
    parse_documents(text, &accept_any_epp_config())
}

fn put_all(objects: Vec<PolicyObject>) -> PolicyRequest {
    PolicyRequest {
        ops: objects
            .into_iter()
            .map(|o| PolicyOp::Put {
                object: Box::new(o),
                expected_version: None,
            })
            .collect(),
    }
}

#[test]
fn parses_every_kind_with_upstream_defaults() {
    let objects = parse(ALL_KINDS).expect("valid");
    assert_eq!(objects.len(), 6);
    let PolicyObject::InferencePool(pool) = &objects[0] else {
        panic!("first is a pool")
    };
    assert_eq!(pool.metadata.namespace, "default");
    assert_eq!(pool.spec.app_protocol, AppProtocol::Http);
    assert_eq!(pool.spec.failure_mode(), FailureMode::FailClose);
    assert_eq!(
        pool.spec
            .endpoint_picker_ref
            .as_ref()
            .map(|r| r.kind.as_str()),
        Some("Service")
    );
    let PolicyObject::InferenceObjective(obj) = &objects[1] else {
        panic!("second is an objective")
    };
    assert_eq!(obj.spec.effective_priority(), 10);
    assert_eq!(obj.spec.pool_ref.kind, "InferencePool");
    let PolicyObject::EndpointPickerConfig(epp) = &objects[3] else {
        panic!("fourth is an EPP config")
    };
    assert_eq!(epp.metadata.name, "default");
    assert!(epp.config.get("metadata").is_none());
    assert!(epp.config_text().contains("prefix-cache-scorer"));
}

fn expect_err(text: &str) -> InvalidDocument {
    parse(text).expect_err("must be rejected")
}

#[test]
fn errors_name_document_and_field() {
    let pool = |ports: &str| {
        format!(
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {{name: p}}\n\
             spec:\n  selector: {{matchLabels: {{a: b}}}}\n  targetPorts: {ports}\n"
        )
    };
    let nine: Vec<String> = (1..=9)
        .map(|p| format!("{{number: {}}}", 8000 + p))
        .collect();
    let e = expect_err(&pool(&format!("[{}]", nine.join(","))));
    assert_eq!((e.document, e.field.as_str()), (1, "spec.targetPorts"));
    let e = expect_err(&pool("[{number: 8000}, {number: 8000}]"));
    assert_eq!(e.field, "spec.targetPorts[1].number");
    let e = expect_err(&pool("[{number: 70000}]"));
    assert_eq!(e.field, "spec.targetPorts[0].number");
    let e = expect_err(&pool("[]"));
    assert_eq!(e.field, "spec.targetPorts");

    // The second document is bad: the error says so and nothing from the first is returned.
    let text = format!(
        "{}---\n{}",
        pool("[{number: 1}]"),
        pool("[{number: 1}]").replace("targetPorts", "targetPortz")
    );
    let e = expect_err(&text);
    assert_eq!(e.document, 2);
    assert!(e.reason.contains("targetPortz"), "{e}");

    let e = expect_err("apiVersion: v1\nkind: InferencePool\nmetadata: {name: p}\nspec: {}\n");
    assert_eq!(e.field, "apiVersion");
    let e = expect_err("apiVersion: v1\nkind: Gadget\nmetadata: {name: p}\n");
    assert_eq!(e.field, "kind");
    let e = expect_err(&pool("[{number: 1}]").replace("name: p", "name: Bad_Name"));
    assert_eq!(e.field, "metadata.name");
    let e = expect_err(&pool("[{number: 1}]").replace("{a: b}", "{}"));
    assert_eq!(e.field, "spec.selector.matchLabels");
    let e = expect_err(&format!(
        "{}  endpointPickerRef: {{name: epp}}\n",
        pool("[{number: 1}]")
    ));
    assert_eq!(e.field, "spec.endpointPickerRef.port");
    let e = expect_err(&format!(
        "{}  endpointPickerRef: {{name: epp, port: {{number: 9002}}, failureMode: FailSideways}}\n",
        pool("[{number: 1}]")
    ));
    assert_eq!(e.field, "spec.endpointPickerRef.failureMode");
    let e = expect_err(&format!(
        "{}---\n{}",
        pool("[{number: 1}]"),
        pool("[{number: 2}]")
    ));
    assert_eq!((e.document, e.field.as_str()), (2, "metadata.name"));
}

#[test]
fn h2c_pools_are_refused_with_the_reason() {
    let text = "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
        metadata: {name: p}\nspec:\n  selector: {matchLabels: {a: b}}\n  \
        targetPorts: [{number: 1}]\n  appProtocol: kubernetes.io/h2c\n";
    let e = expect_err(text);
    assert_eq!(e.field, "spec.appProtocol");
    assert!(e.reason.contains("HTTP/1.1"), "{e}");
    let http = text.replace("kubernetes.io/h2c", "http");
    assert!(parse(&http).is_ok());
}

#[test]
fn target_port_rule_is_one_function() {
    assert_eq!(validate_target_ports([8000, 8001]), Ok(()));
    assert_eq!(validate_target_ports([]), Err(InvalidTargetPorts::Count(0)));
    assert_eq!(
        validate_target_ports(1..=9),
        Err(InvalidTargetPorts::Count(9))
    );
    assert_eq!(validate_target_ports(1..=MAX_TARGET_PORTS as i64), Ok(()));
    let e = validate_target_ports([1, 0]).unwrap_err();
    assert_eq!(
        e,
        InvalidTargetPorts::OutOfRange {
            index: 1,
            number: 0
        }
    );
    assert_eq!(
        e.field("pods[3].targetPorts"),
        "pods[3].targetPorts[1].number"
    );
    let e = validate_target_ports([7, 65536]).unwrap_err();
    assert_eq!(e.field("x"), "x[1].number");
    let e = validate_target_ports([7, 7]).unwrap_err();
    assert_eq!(e.to_string(), "port 7 is listed twice");
    assert_eq!(e.field("x"), "x[1].number");
}

#[test]
fn documents_keep_their_position_across_empty_ones() {
    // The leading `---` opens document 1 (empty); `kind: X` is document 2.
    let docs = read_documents("---\n---\nkind: X\n---\n").unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].0, 2);
    let e = parse_document_values(docs, &accept_any_epp_config()).unwrap_err();
    assert_eq!((e.document, e.field.as_str()), (2, "kind"));
}

#[test]
fn rewrite_weights_follow_upstream_rules() {
    let rewrite = |targets: &str| {
        format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n\
             metadata: {{name: r}}\nspec:\n  poolRef: {{name: p}}\n  rules:\n  - targets: {targets}\n"
        )
    };
    assert!(parse(&rewrite("[{modelRewrite: a}, {modelRewrite: b}]")).is_ok());
    assert!(
        parse(&rewrite(
            "[{modelRewrite: a, weight: 1}, {modelRewrite: b, weight: 1000000}]"
        ))
        .is_ok()
    );
    let e = expect_err(&rewrite(
        "[{modelRewrite: a, weight: 5}, {modelRewrite: b}]",
    ));
    assert_eq!(e.field, "spec.rules[0].targets[1].weight");
    let e = expect_err(&rewrite("[{modelRewrite: a, weight: 0}]"));
    assert_eq!(e.field, "spec.rules[0].targets[0].weight");
    let e = expect_err(&rewrite("[{modelRewrite: a, weight: 1000001}]"));
    assert_eq!(e.field, "spec.rules[0].targets[0].weight");
    let e = expect_err(&rewrite("[]"));
    assert_eq!(e.field, "spec.rules[0].targets");
    let e = expect_err(&rewrite("[{modelRewrite: a}]").replace(
        "- targets",
        "- matches: [{model: {type: Prefix, value: x}}]\n    targets",
    ));
    assert!(
        e.field.starts_with("spec.rules[0].matches[0].model.type"),
        "{e}"
    );
}

#[test]
fn epp_config_goes_through_the_callers_validator() {
    #[derive(Debug, thiserror::Error)]
    #[error("unknown plugin type bogus-scorer")]
    struct Bad;
    let validator: EppConfigValidator = std::sync::Arc::new(|text: &str| {
        if text.contains("bogus-scorer") {
            Err(Box::new(Bad))
        } else {
            Ok(())
        }
    });
    let doc = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: bogus-scorer\n";
    let e = parse_documents(doc, &validator).expect_err("rejected");
    assert_eq!(e.kind, "EndpointPickerConfig");
    assert!(e.reason.contains("unknown plugin type bogus-scorer"), "{e}");
    assert!(parse_documents(&doc.replace("bogus", "queue"), &validator).is_ok());
}

#[test]
fn endpoints_must_be_unique_addresses() {
    let doc = "apiVersion: infermesh.io/v1alpha1\nkind: InferenceEndpoints\nmetadata: {name: s}\n\
               spec:\n  endpoints: [{address: '10.0.0.1:8000'}, {address: '10.0.0.1:8000'}]\n";
    assert_eq!(expect_err(doc).field, "spec.endpoints[1].address");
    let e = expect_err(&doc.replace("10.0.0.1:8000'}]", "not-an-address'}]"));
    assert!(e.field.starts_with("spec.endpoints[1].address"), "{e}");
}

#[test]
fn state_applies_versions_and_reports_kubectl_actions() {
    let objects = parse(ALL_KINDS).unwrap();
    let mut st = PolicyState::default();
    let mut touched = Touched::default();
    let r = st.handle_request(5, &put_all(objects.clone()), &mut touched);
    let PolicyResponse::Applied { index: 5, changes } = r else {
        panic!("{r:?}")
    };
    assert!(
        changes
            .iter()
            .all(|c| c.action == ChangeAction::Created && c.resource_version == Some(5))
    );
    assert_eq!(touched.keys.len(), 6);
    assert_eq!(st.applied_index(), 5);
    assert_eq!(
        st.objective("prod", "chat")
            .map(|o| o.spec.effective_priority()),
        Some(10)
    );
    assert_eq!(st.pools().count(), 1);

    // Same content again: unchanged, versions kept, nothing to persist.
    let mut touched = Touched::default();
    let PolicyResponse::Applied { changes, .. } =
        st.handle_request(6, &put_all(objects.clone()), &mut touched)
    else {
        panic!()
    };
    assert!(
        changes
            .iter()
            .all(|c| c.action == ChangeAction::Unchanged && c.resource_version == Some(5))
    );
    assert!(touched.keys.is_empty());

    // Changed content: configured at the new index, creation index kept.
    let mut changed = objects[1].clone();
    if let PolicyObject::InferenceObjective(d) = &mut changed {
        d.spec.priority = Some(-1);
    }
    let PolicyResponse::Applied { changes, .. } =
        st.handle_request(7, &put_all(vec![changed]), &mut Touched::default())
    else {
        panic!()
    };
    assert_eq!(changes[0].action, ChangeAction::Configured);
    let stored = st
        .get(&ObjectKey::new(Kind::InferenceObjective, "prod", "chat"))
        .unwrap();
    assert_eq!((stored.resource_version, stored.created_index), (7, 5));
    assert_eq!(stored.to_document()["metadata"]["resourceVersion"], "7");
}

#[test]
fn conditional_writes_apply_all_or_nothing() {
    let objects = parse(ALL_KINDS).unwrap();
    let mut st = PolicyState::default();
    st.handle_request(3, &put_all(objects.clone()), &mut Touched::default());
    let before = st.clone();
    let pool_key = objects[0].key();
    let obj_key = objects[1].key();
    // First op would succeed, second conflicts: nothing at all changes.
    let req = PolicyRequest {
        ops: vec![
            PolicyOp::Delete {
                key: pool_key.clone(),
                expected_version: Some(3),
            },
            PolicyOp::Put {
                object: Box::new(objects[1].clone()),
                expected_version: Some(2),
            },
        ],
    };
    let mut touched = Touched::default();
    let r = st.handle_request(4, &req, &mut touched);
    assert_eq!(
        r,
        PolicyResponse::Rejected(Rejection::Conflict {
            key: obj_key.clone(),
            expected: 2,
            actual: Some(3)
        })
    );
    assert!(touched.keys.is_empty());
    assert_eq!(st.get(&pool_key), before.get(&pool_key));
    assert_eq!(st.len(), before.len());

    let missing = ObjectKey::new(Kind::InferencePool, "default", "nope");
    let r = st.handle_request(
        5,
        &PolicyRequest {
            ops: vec![PolicyOp::Delete {
                key: missing.clone(),
                expected_version: None,
            }],
        },
        &mut Touched::default(),
    );
    assert_eq!(
        r,
        PolicyResponse::Rejected(Rejection::NotFound { key: missing })
    );

    // Creating with an expected version when absent is a conflict, not a create.
    let mut fresh = objects[0].clone();
    fresh.metadata_mut().name = "fresh".into();
    let r = st.handle_request(
        6,
        &PolicyRequest {
            ops: vec![PolicyOp::Put {
                object: Box::new(fresh.clone()),
                expected_version: Some(1),
            }],
        },
        &mut Touched::default(),
    );
    assert!(matches!(
        r,
        PolicyResponse::Rejected(Rejection::Conflict { actual: None, .. })
    ));

    // Matching version: applied.
    let req = PolicyRequest {
        ops: vec![PolicyOp::Delete {
            key: pool_key.clone(),
            expected_version: Some(3),
        }],
    };
    let r = st.handle_request(7, &req, &mut Touched::default());
    assert!(matches!(r, PolicyResponse::Applied { index: 7, .. }));
    assert!(st.get(&pool_key).is_none());
}

#[test]
fn tokens_are_stored_hashed_and_verified() {
    let mut st = PolicyState::default();
    assert!(!st.verify_token("secret"));
    let mut touched = Touched::default();
    st.handle_request(
        1,
        &PolicyRequest {
            ops: vec![PolicyOp::AddTokens(vec![TokenHash::of("secret")])],
        },
        &mut touched,
    );
    assert!(touched.tokens);
    assert!(st.verify_token("secret"));
    assert!(!st.verify_token("secret2"));
    assert!(!st.verify_token(""));
    let stored: Vec<_> = st.token_hashes().collect();
    assert_eq!(stored.len(), 1);
    assert_ne!(&stored[0].0[..6], b"secret");
}

fn token_req(changes: Vec<TokenChange>) -> PolicyRequest {
    PolicyRequest {
        ops: changes.into_iter().map(PolicyOp::Tokens).collect(),
    }
}

fn change(role: TokenRole, add: &[&str], remove: &[&str]) -> TokenChange {
    TokenChange {
        role,
        add: add.iter().map(|t| TokenHash::of(t)).collect(),
        remove: remove.iter().map(|t| TokenHash::of(t)).collect(),
    }
}

#[test]
fn read_and_write_tokens_are_kept_apart() {
    let mut st = PolicyState::default();
    let mut touched = Touched::default();
    let r = st.handle_request(
        1,
        &token_req(vec![
            change(TokenRole::Write, &["w1"], &[]),
            change(TokenRole::Read, &["r1"], &[]),
        ]),
        &mut touched,
    );
    assert!(matches!(r, PolicyResponse::Applied { .. }), "{r:?}");
    assert!(touched.tokens);
    assert_eq!(st.token_role("w1"), Some(TokenRole::Write));
    assert_eq!(st.token_role("r1"), Some(TokenRole::Read));
    assert_eq!(st.token_role("nope"), None);
    assert!(st.verify_token("w1"));
    assert!(
        !st.verify_token("r1"),
        "a read token must not pass as a write token"
    );
    assert!(st.has_read_tokens());

    // A hash may hold one role only.
    let before = st.clone();
    let r = st.handle_request(
        2,
        &token_req(vec![change(TokenRole::Write, &["r1"], &[])]),
        &mut Touched::default(),
    );
    assert_eq!(
        r,
        PolicyResponse::Rejected(Rejection::TokenInOtherRole {
            role: TokenRole::Read,
            hash: TokenHash::of("r1"),
        })
    );
    // Moving it is one request: removed from read, added to write.
    let r = st.handle_request(
        3,
        &token_req(vec![
            change(TokenRole::Read, &[], &["r1"]),
            change(TokenRole::Write, &["r1"], &[]),
        ]),
        &mut Touched::default(),
    );
    assert!(matches!(r, PolicyResponse::Applied { .. }), "{r:?}");
    assert_eq!(st.token_role("r1"), Some(TokenRole::Write));
    assert!(!st.has_read_tokens());
    assert_ne!(st, before);
}

#[test]
fn rotation_keeps_a_write_token_and_refuses_unknown_hashes_whole() {
    let mut st = PolicyState::default();
    st.handle_request(
        1,
        &PolicyRequest {
            ops: vec![PolicyOp::AddTokens(vec![TokenHash::of("old")])],
        },
        &mut Touched::default(),
    );
    // Removing the only write token locks everyone out: refused, nothing changes.
    let r = st.handle_request(
        2,
        &token_req(vec![change(TokenRole::Write, &[], &["old"])]),
        &mut Touched::default(),
    );
    assert_eq!(r, PolicyResponse::Rejected(Rejection::LastWriteToken));
    assert!(st.verify_token("old"));

    // An unknown hash in the same request as a valid add: nothing applies.
    let mut touched = Touched::default();
    let r = st.handle_request(
        3,
        &token_req(vec![change(TokenRole::Write, &["new"], &["typo"])]),
        &mut touched,
    );
    assert_eq!(
        r,
        PolicyResponse::Rejected(Rejection::UnknownToken {
            role: TokenRole::Write,
            hash: TokenHash::of("typo"),
        })
    );
    assert!(!touched.tokens);
    assert!(!st.verify_token("new"));

    // The rotation: add the new one (both accepted), then drop the old one.
    st.handle_request(
        4,
        &token_req(vec![change(TokenRole::Write, &["new"], &[])]),
        &mut Touched::default(),
    );
    assert!(st.verify_token("old") && st.verify_token("new"));
    let mut touched = Touched::default();
    let r = st.handle_request(
        5,
        &token_req(vec![change(TokenRole::Write, &[], &["old"])]),
        &mut touched,
    );
    assert!(matches!(r, PolicyResponse::Applied { .. }), "{r:?}");
    assert!(touched.tokens);
    assert!(!st.verify_token("old") && st.verify_token("new"));
    // Swapping in one request is fine too: the set is never empty after it.
    let r = st.handle_request(
        6,
        &token_req(vec![change(TokenRole::Write, &["newer"], &["new"])]),
        &mut Touched::default(),
    );
    assert!(matches!(r, PolicyResponse::Applied { .. }), "{r:?}");
    assert!(st.verify_token("newer") && !st.verify_token("new"));
    // Re-adding an accepted hash changes nothing on disk.
    let mut touched = Touched::default();
    st.handle_request(
        7,
        &token_req(vec![change(TokenRole::Write, &["newer"], &[])]),
        &mut touched,
    );
    assert!(!touched.tokens);
}

#[test]
fn token_hashes_read_back_from_text() {
    let h = TokenHash::of("secret");
    let text = h.to_text();
    assert!(text.starts_with("sha256:") && text.len() == 71, "{text}");
    assert_eq!(TokenHash::parse(&text), Ok(h));
    assert_eq!(
        TokenHash::parse(&text.to_uppercase().replace("SHA256", "sha256")),
        Ok(h)
    );
    for bad in [
        "",
        "sha256:",
        "md5:00",
        &text[..70],
        &format!("{text}0"),
        &text.replace('a', "g"),
    ] {
        assert!(TokenHash::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn the_token_op_is_appended_after_batch() {
    // Put 0, Delete 1, AddTokens 2, Batch 3: the new op must take position 4.
    let bytes = postcard::to_stdvec(&token_req(vec![change(TokenRole::Read, &[], &[])])).unwrap();
    assert_eq!(bytes, [1u8, 4, 1, 0, 0]);
}

fn objective_named(name: &str, priority: i32) -> PolicyObject {
    parse(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {name}}}\nspec:\n  priority: {priority}\n  poolRef: {{name: p}}\n"
    ))
    .unwrap()
    .remove(0)
}

fn put(object: PolicyObject, expected_version: Option<u64>) -> PolicyRequest {
    PolicyRequest {
        ops: vec![PolicyOp::Put {
            object: Box::new(object),
            expected_version,
        }],
    }
}

fn batch(requests: Vec<PolicyRequest>) -> PolicyRequest {
    PolicyRequest {
        ops: vec![PolicyOp::Batch(requests)],
    }
}

fn versions(r: &PolicyResponse) -> Vec<Option<u64>> {
    match r {
        PolicyResponse::Applied { changes, .. } => {
            changes.iter().map(|c| c.resource_version).collect()
        }
        other => panic!("not applied: {other:?}"),
    }
}

#[test]
fn batched_requests_are_answered_and_rejected_each_on_its_own() {
    let mut st = PolicyState::default();
    st.handle_request(
        1,
        &put(objective_named("b", 1), None),
        &mut Touched::default(),
    );
    let b_key = objective_named("b", 1).key();
    let missing = ObjectKey::new(Kind::InferenceObjective, "default", "gone");
    let entry = batch(vec![
        put(objective_named("a", 1), None),
        // Stale conditional write: b is at version 1.
        put(objective_named("b", 2), Some(7)),
        PolicyRequest {
            ops: vec![
                PolicyOp::Put {
                    object: Box::new(objective_named("c", 1)),
                    expected_version: None,
                },
                PolicyOp::Delete {
                    key: missing.clone(),
                    expected_version: None,
                },
            ],
        },
        put(objective_named("d", 1), None),
    ]);
    let mut touched = Touched::default();
    let PolicyResponse::Batch(answers) = st.handle_request(5, &entry, &mut touched) else {
        panic!("a batch entry gets a batch answer");
    };
    assert_eq!(answers.len(), 4);
    assert_eq!(versions(&answers[0]), vec![Some(5)]);
    assert_eq!(
        answers[1],
        PolicyResponse::Rejected(Rejection::Conflict {
            key: b_key.clone(),
            expected: 7,
            actual: Some(1)
        })
    );
    assert_eq!(
        answers[2],
        PolicyResponse::Rejected(Rejection::NotFound { key: missing }),
        "all or none within its own request: c is not created"
    );
    assert_eq!(versions(&answers[3]), vec![Some(6)], "next revision");
    for a in &answers {
        if let PolicyResponse::Applied { index, .. } = a {
            assert_eq!(*index, 5, "batch-mates share the log index");
        }
    }
    assert!(st.objective("default", "a").is_some());
    assert!(st.objective("default", "c").is_none());
    assert!(st.objective("default", "d").is_some());
    assert_eq!(st.get(&b_key).unwrap().resource_version, 1);
    assert_eq!(st.revision(), 6);
    assert_eq!(st.applied_index(), 5);
    assert_eq!(touched.keys.len(), 2);
}

#[test]
fn two_requests_on_one_object_in_one_batch_get_distinct_rising_versions() {
    let mut st = PolicyState::default();
    st.handle_request(
        1,
        &put(objective_named("x", 0), None),
        &mut Touched::default(),
    );
    let key = objective_named("x", 0).key();
    let entry = batch(vec![
        // Both read x at version 1; the first wins, the second is now stale.
        put(objective_named("x", 1), Some(1)),
        put(objective_named("x", 2), Some(1)),
        // A writer that saw the first one's answer (version 4) may go on.
        put(objective_named("x", 3), Some(4)),
        // Unconditional writes still apply, each under its own version.
        put(objective_named("x", 4), None),
        PolicyRequest {
            ops: vec![PolicyOp::Delete {
                key: key.clone(),
                expected_version: Some(6),
            }],
        },
        put(objective_named("x", 5), None),
    ]);
    let PolicyResponse::Batch(answers) = st.handle_request(4, &entry, &mut Touched::default())
    else {
        panic!("batch answer");
    };
    assert_eq!(versions(&answers[0]), vec![Some(4)]);
    assert_eq!(
        answers[1],
        PolicyResponse::Rejected(Rejection::Conflict {
            key: key.clone(),
            expected: 1,
            actual: Some(4)
        })
    );
    assert_eq!(versions(&answers[2]), vec![Some(5)]);
    assert_eq!(versions(&answers[3]), vec![Some(6)]);
    assert_eq!(versions(&answers[4]), vec![None]);
    assert_eq!(versions(&answers[5]), vec![Some(8)]);
    let x = st.get(&key).unwrap();
    assert_eq!(x.resource_version, 8);
    assert_eq!(x.created_index, 8, "recreated after the delete");
    assert_eq!(
        st.objective("default", "x")
            .unwrap()
            .spec
            .effective_priority(),
        5
    );
    // The next entry continues above the batch's revisions, not at its own index.
    let r = st.handle_request(
        5,
        &put(objective_named("x", 6), Some(8)),
        &mut Touched::default(),
    );
    assert_eq!(versions(&r), vec![Some(9)]);
    // And once the log index catches up again, versions are log indexes again.
    st.handle_noop(20);
    let r = st.handle_request(
        21,
        &put(objective_named("x", 7), None),
        &mut Touched::default(),
    );
    assert_eq!(versions(&r), vec![Some(21)]);
}

#[test]
fn a_deleted_objects_version_is_never_handed_out_again_after_a_restore() {
    let mut st = PolicyState::default();
    let entry = batch(vec![
        put(objective_named("y", 0), None),
        put(objective_named("y", 1), None),
        put(objective_named("z", 1), None),
    ]);
    st.handle_request(2, &entry, &mut Touched::default());
    let y = objective_named("y", 0).key();
    assert_eq!(st.get(&y).unwrap().resource_version, 3);
    st.handle_request(
        3,
        &PolicyRequest {
            ops: vec![PolicyOp::Delete {
                key: y.clone(),
                expected_version: None,
            }],
        },
        &mut Touched::default(),
    );
    assert_eq!(st.revision(), 5);
    let restored = PolicyState::from_parts(
        st.applied_index(),
        st.iter().map(|o| o.as_ref().clone()),
        st.token_hashes().copied(),
    )
    .with_revision(st.revision());
    assert_eq!(restored, st);
    let mut restored = restored;
    let r = restored.handle_request(
        4,
        &put(objective_named("y", 2), None),
        &mut Touched::default(),
    );
    assert_eq!(versions(&r), vec![Some(6)]);
}

#[test]
fn batch_ops_are_refused_anywhere_but_alone_at_the_top() {
    let mut st = PolicyState::default();
    let mixed = PolicyRequest {
        ops: vec![
            PolicyOp::AddTokens(vec![TokenHash::of("t")]),
            PolicyOp::Batch(vec![put(objective_named("a", 1), None)]),
        ],
    };
    assert_eq!(
        st.handle_request(1, &mixed, &mut Touched::default()),
        PolicyResponse::Rejected(Rejection::MisplacedBatch)
    );
    assert!(!st.has_tokens());
    let nested = batch(vec![
        batch(vec![put(objective_named("a", 1), None)]),
        put(objective_named("b", 1), None),
    ]);
    let PolicyResponse::Batch(answers) = st.handle_request(2, &nested, &mut Touched::default())
    else {
        panic!("batch answer");
    };
    assert_eq!(
        answers[0],
        PolicyResponse::Rejected(Rejection::MisplacedBatch)
    );
    assert!(matches!(answers[1], PolicyResponse::Applied { .. }));
    assert!(st.objective("default", "a").is_none());
}

#[test]
fn an_entry_yields_the_client_requests_it_carries() {
    let a = put(objective_named("a", 1), None);
    let b = put(objective_named("b", 1), None);
    assert_eq!(a.clone().into_requests(), vec![a.clone()]);
    assert_eq!(
        batch(vec![a.clone(), b.clone()]).into_requests(),
        vec![a.clone(), b.clone()]
    );
    let two_ops = PolicyRequest {
        ops: vec![a.ops[0].clone(), b.ops[0].clone()],
    };
    assert_eq!(two_ops.clone().into_requests(), vec![two_ops]);
}

#[test]
fn entries_written_before_batching_keep_their_bytes() {
    // postcard encodes a variant by position: Put 0, Delete 1, AddTokens 2 must stay put
    // so log entries written before the Batch variant existed still decode.
    let req = PolicyRequest {
        ops: vec![PolicyOp::AddTokens(vec![TokenHash([7; 32])])],
    };
    let bytes = postcard::to_stdvec(&req).unwrap();
    let mut expected = vec![1u8, 2, 1];
    expected.extend([7u8; 32]);
    assert_eq!(bytes, expected);
    let delete = PolicyRequest {
        ops: vec![PolicyOp::Delete {
            key: ObjectKey::new(Kind::InferencePool, "ns", "n"),
            expected_version: None,
        }],
    };
    assert_eq!(postcard::to_stdvec(&delete).unwrap()[..2], [1u8, 1]);
    let back: PolicyRequest = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, req);
    assert!(back.batch().is_none());
}

#[test]
fn requests_survive_the_binary_log_codec() {
    let req = put_all(parse(ALL_KINDS).unwrap());
    let bytes = postcard::to_stdvec(&req).unwrap();
    let back: PolicyRequest = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, req);
}

#[test]
fn kind_names_parse_like_kubectl() {
    assert_eq!(Kind::parse("inferencepools"), Some(Kind::InferencePool));
    assert_eq!(
        Kind::parse("InferenceObjective"),
        Some(Kind::InferenceObjective)
    );
    assert_eq!(Kind::parse("infermeshnodes"), Some(Kind::InfermeshNode));
    assert_eq!(Kind::parse("pods"), None);
}

mod properties {
    use proptest::prelude::*;

    use super::super::*;

    fn objective(name: u8, priority: i32) -> PolicyObject {
        let text = format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             metadata: {{name: k{name}}}\nspec:\n  priority: {priority}\n  poolRef: {{name: p}}\n"
        );
        parse_documents(&text, &accept_any_epp_config())
            .unwrap()
            .remove(0)
    }

    fn key(name: u8) -> ObjectKey {
        ObjectKey::new(Kind::InferenceObjective, "default", format!("k{name}"))
    }

    fn op() -> impl Strategy<Value = PolicyOp> {
        let version = prop::option::of(0u64..12);
        prop_oneof![
            (0u8..4, -3i32..3, version.clone()).prop_map(|(n, p, v)| PolicyOp::Put {
                object: Box::new(objective(n, p)),
                expected_version: v,
            }),
            (0u8..4, version).prop_map(|(n, v)| PolicyOp::Delete {
                key: key(n),
                expected_version: v,
            }),
        ]
    }

    fn requests() -> impl Strategy<Value = Vec<PolicyRequest>> {
        prop::collection::vec(
            prop::collection::vec(op(), 1..4).prop_map(|ops| PolicyRequest { ops }),
            1..12,
        )
    }

    proptest! {
        /// A request applies whole or not at all, versions are the applying index, and the
        /// same log gives the same state (every node converges).
        #[test]
        fn requests_apply_atomically_and_deterministically(reqs in requests()) {
            let mut a = PolicyState::default();
            let mut b = PolicyState::default();
            for (i, req) in reqs.iter().enumerate() {
                let index = i as u64 + 1;
                let before = a.clone();
                let ra = a.handle_request(index, req, &mut Touched::default());
                let rb = b.handle_request(index, req, &mut Touched::default());
                prop_assert_eq!(&ra, &rb);
                match ra {
                    PolicyResponse::Rejected(_) => {
                        let same = before.iter().zip(a.iter()).all(|(x, y)| x == y);
                        prop_assert!(same && before.len() == a.len(), "a rejected request changed state");
                    }
                    PolicyResponse::Applied { changes, .. } => {
                        for c in changes {
                            match c.action {
                                ChangeAction::Deleted => prop_assert!(a.get(&c.key).is_none() || req.ops.len() > 1),
                                ChangeAction::Unchanged => prop_assert!(c.resource_version <= Some(index)),
                                _ => prop_assert_eq!(c.resource_version, Some(index)),
                            }
                        }
                    }
                    PolicyResponse::Noop | PolicyResponse::Batch(_) => {
                        prop_assert!(false, "a single request is answered singly")
                    }
                }
                prop_assert_eq!(&a, &b);
            }
            // The snapshot form restores the same state.
            let restored = PolicyState::from_parts(
                a.applied_index(),
                a.iter().map(|o| o.as_ref().clone()),
                a.token_hashes().copied(),
            )
            .with_revision(a.revision());
            prop_assert_eq!(&restored, &a);
        }

        /// A batch entry is its requests applied one after another: each answered on its
        /// own (a rejection leaves its batch-mates alone), every applied request under a
        /// new, higher revision, and the same final state as applying them one by one.
        #[test]
        fn a_batch_is_its_requests_in_order_each_on_its_own(
            before in requests(),
            batch in requests(),
        ) {
            let mut st = PolicyState::default();
            for (i, req) in before.iter().enumerate() {
                st.handle_request(i as u64 + 1, req, &mut Touched::default());
            }
            let index = before.len() as u64 + 1;
            let mut one_by_one = st.clone();
            let mut batched = st.clone();
            let mut expected = Vec::new();
            let mut last_revision = st.revision();
            for req in &batch {
                let r = one_by_one.handle_request(index, req, &mut Touched::default());
                if let PolicyResponse::Applied { changes, .. } = &r {
                    prop_assert!(one_by_one.revision() > last_revision);
                    last_revision = one_by_one.revision();
                    for c in changes {
                        if matches!(c.action, ChangeAction::Created | ChangeAction::Configured) {
                            prop_assert_eq!(c.resource_version, Some(last_revision));
                        }
                    }
                } else {
                    prop_assert_eq!(one_by_one.revision(), last_revision, "a rejection hands out no revision");
                }
                expected.push(r);
            }
            let entry = PolicyRequest { ops: vec![PolicyOp::Batch(batch.clone())] };
            let mut touched = Touched::default();
            let answer = batched.handle_request(index, &entry, &mut touched);
            prop_assert_eq!(answer, PolicyResponse::Batch(expected));
            prop_assert_eq!(&batched, &one_by_one);
            // The batch survives the log codec.
            let back: PolicyRequest = postcard::from_bytes(&postcard::to_stdvec(&entry).unwrap()).unwrap();
            prop_assert_eq!(back, entry);
        }
    }
}

#[test]
fn objectives_and_rewrites_are_read_in_both_groups() {
    for group in [
        "llm-d.ai/v1alpha2",
        "inference.networking.x-k8s.io/v1alpha2",
    ] {
        let text = format!(
            "apiVersion: {group}\nkind: InferenceObjective\nmetadata: {{name: chat}}\n\
             spec: {{priority: 5, poolRef: {{name: llama}}}}\n---\n\
             apiVersion: {group}\nkind: InferenceModelRewrite\nmetadata: {{name: canary}}\n\
             spec:\n  poolRef: {{name: llama}}\n  rules:\n  - targets: [{{modelRewrite: b}}]\n"
        );
        let objects = parse_documents(&text, &accept_any_epp_config())
            .unwrap_or_else(|e| panic!("{group}: {e}"));
        assert_eq!(objects.len(), 2, "{group}");
    }
    let err = parse_documents(
        "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: chat}\n\
         spec: {poolRef: {name: llama}}\n",
        &accept_any_epp_config(),
    )
    .unwrap_err();
    assert_eq!(err.field, "apiVersion");
    assert!(err.reason.contains("llm-d.ai/v1alpha2"), "{}", err.reason);
}
