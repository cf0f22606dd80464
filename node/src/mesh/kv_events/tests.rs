use infermesh_kvevents::EventBatch;
use infermesh_scheduler::prefix::{request_keys, request_seed};

use super::*;

fn stored(keys: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: keys,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: 2,
        lora_id: None,
        medium: Some("GPU".into()),
        lora_name: None,
        extra_keys: None,
        group_idx: None,
        kv_cache_spec_kind: None,
        kv_cache_spec_sliding_window: None,
    }
}

fn batch(topic: &str, events: Vec<KvEvent>) -> Update {
    Update::Batch {
        topic: topic.into(),
        seq: 0,
        batch: EventBatch {
            ts: 0.0,
            events,
            data_parallel_rank: None,
        },
        replayed: false,
    }
}

#[test]
fn topic_names_the_model_and_ops_use_its_keys() {
    let stats = KvEventStats::default();
    let mut a = PodApplier::new("10.0.0.1:8000", None, 100);
    let mut ops = Vec::new();
    a.handle_update(
        &batch(
            "kv@10.0.0.1:8000@llama",
            vec![stored(vec![7, 8], None, vec![1, 2, 3, 4])],
        ),
        &stats,
        &mut ops,
    );
    let keys = request_keys(request_seed("llama", None), &[1, 2, 3, 4], 2, 8);
    assert_eq!(
        ops,
        vec![IndexOp::Record {
            anchor: keys[0],
            parent: None,
            keys: keys.clone(),
            endpoint: "10.0.0.1:8000".into(),
        }]
    );
    assert_eq!(a.state("llama").map(PodEventState::len), Some(2));
}

#[test]
fn no_model_extra_keys_clears_and_losses() {
    let stats = KvEventStats::default();
    let mut ops = Vec::new();
    // vLLM's default empty topic and no configured model: skipped.
    let mut a = PodApplier::new("p", None, 100);
    a.handle_update(
        &batch("", vec![stored(vec![1], None, vec![1, 2])]),
        &stats,
        &mut ops,
    );
    assert!(ops.is_empty());
    assert_eq!(stats.batches_without_model.load(Ordering::Relaxed), 1);
    // With a default model the same batch applies.
    let mut a = PodApplier::new("p", Some("m".into()), 100);
    a.handle_update(
        &batch("", vec![stored(vec![1], None, vec![1, 2])]),
        &stats,
        &mut ops,
    );
    assert_eq!(ops.len(), 1);
    ops.clear();
    // A salted/multimodal block cannot be keyed by tokens alone.
    let mut salted = stored(vec![2], None, vec![1, 2]);
    if let KvEvent::BlockStored { extra_keys, .. } = &mut salted {
        *extra_keys = Some(vec![rmpv::Value::from("salt")].into());
    }
    a.handle_update(&batch("", vec![salted]), &stats, &mut ops);
    assert!(ops.is_empty());
    assert_eq!(stats.extra_keys_skipped.load(Ordering::Relaxed), 1);
    // AllBlocksCleared, a loss and a restart each clear the pod once.
    a.handle_update(
        &batch("", vec![KvEvent::AllBlocksCleared]),
        &stats,
        &mut ops,
    );
    a.handle_update(
        &Update::Lost {
            topic: String::new(),
            from: 3,
            to: 5,
        },
        &stats,
        &mut ops,
    );
    a.handle_update(
        &Update::Restarted {
            topic: String::new(),
        },
        &stats,
        &mut ops,
    );
    assert_eq!(
        ops,
        vec![
            IndexOp::Clear {
                endpoint: "p".into()
            };
            3
        ],
        "one clear each"
    );
    assert!(a.state("m").is_none());
}

#[test]
fn applier_counters_add_up_across_pods_and_render() {
    let stats = KvEventStats::default();
    let mut ops = Vec::new();
    for pod in ["a", "b"] {
        let mut a = PodApplier::new(pod, Some("m".into()), 100);
        // An orphan, then a removal of a block never stored.
        a.handle_update(
            &batch("", vec![stored(vec![1], Some(9), vec![1, 2])]),
            &stats,
            &mut ops,
        );
        let removed = KvEvent::BlockRemoved {
            block_hashes: vec![5],
            medium: None,
            group_idx: None,
        };
        a.handle_update(&batch("", vec![removed]), &stats, &mut ops);
    }
    assert_eq!(stats.orphans.load(Ordering::Relaxed), 2);
    assert_eq!(stats.unknown_removed.load(Ordering::Relaxed), 2);
    let mut text = String::new();
    stats.render(&mut text);
    assert!(
        text.contains("infermesh_kv_events_orphans_total 2\n"),
        "{text}"
    );
    assert!(
        text.contains("infermesh_kv_events_batches_total 4\n"),
        "{text}"
    );
}

#[test]
fn subscriber_config_uses_defaults_and_per_pod_ports() {
    let mut opts = KvEventsOptions::default();
    let c = opts.subscriber_config("10.0.0.1:8000").unwrap();
    assert_eq!(c.endpoint, "tcp://10.0.0.1:5557");
    assert_eq!(c.replay_endpoint, None);
    assert_eq!(c.start_seq, Some(0));
    opts.pod_ports.insert(
        "127.0.0.1:9000".into(),
        PodEventPorts {
            publish: 7001,
            replay: Some(7002),
        },
    );
    let c = opts.subscriber_config("127.0.0.1:9000").unwrap();
    assert_eq!(c.endpoint, "tcp://127.0.0.1:7001");
    assert_eq!(c.replay_endpoint.as_deref(), Some("tcp://127.0.0.1:7002"));
    assert!(opts.subscriber_config("no-port").is_none());
}
