use proptest::prelude::*;
use rmp::encode as w;

use super::*;

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: 4,
        lora_id: None,
        medium: Some(MEDIUM_GPU.into()),
        lora_name: None,
        extra_keys: None,
        group_idx: None,
        kv_cache_spec_kind: None,
        kv_cache_spec_sliding_window: None,
    }
}

/// A batch as vLLM's msgspec writes it before PR #42892, built by hand with rmp so the
/// test does not share code with the encoder: `[ts, [events], dp_rank]`, events
/// `[tag, fields…]`, an i64 hash, a u64 hash above i64::MAX.
fn vllm_array_batch() -> Vec<u8> {
    let mut b = Vec::new();
    w::write_array_len(&mut b, 3).unwrap();
    w::write_f64(&mut b, 1_700_000_000.25).unwrap();
    w::write_array_len(&mut b, 3).unwrap();
    // BlockStored: 8 positional elements, no defaulted tail.
    w::write_array_len(&mut b, 8).unwrap();
    w::write_str(&mut b, "BlockStored").unwrap();
    w::write_array_len(&mut b, 2).unwrap();
    w::write_uint(&mut b, u64::MAX - 1).unwrap();
    w::write_sint(&mut b, -2).unwrap();
    w::write_nil(&mut b).unwrap(); // parent_block_hash
    w::write_array_len(&mut b, 4).unwrap();
    for t in [1u64, 2, 128_000, 4] {
        w::write_uint(&mut b, t).unwrap();
    }
    w::write_uint(&mut b, 2).unwrap(); // block_size
    w::write_uint(&mut b, 3).unwrap(); // lora_id
    w::write_str(&mut b, "GPU").unwrap();
    w::write_str(&mut b, "sql-lora").unwrap();
    // BlockRemoved with group_idx present.
    w::write_array_len(&mut b, 4).unwrap();
    w::write_str(&mut b, "BlockRemoved").unwrap();
    w::write_array_len(&mut b, 1).unwrap();
    w::write_uint(&mut b, 7).unwrap();
    w::write_nil(&mut b).unwrap();
    w::write_uint(&mut b, 1).unwrap();
    w::write_array_len(&mut b, 1).unwrap();
    w::write_str(&mut b, "AllBlocksCleared").unwrap();
    w::write_uint(&mut b, 0).unwrap(); // data_parallel_rank
    b
}

#[test]
fn decodes_vllm_positional_layout() {
    let d = decode(&vllm_array_batch()).unwrap();
    assert!(d.skipped.is_empty());
    assert_eq!(d.batch.ts, 1_700_000_000.25);
    assert_eq!(d.batch.data_parallel_rank, Some(0));
    assert_eq!(
        d.batch.events,
        vec![
            KvEvent::BlockStored {
                block_hashes: vec![u64::MAX - 1, (-2i64) as u64],
                parent_block_hash: None,
                token_ids: vec![1, 2, 128_000, 4],
                block_size: 2,
                lora_id: Some(3),
                medium: Some("GPU".into()),
                lora_name: Some("sql-lora".into()),
                extra_keys: None,
                group_idx: None,
                kv_cache_spec_kind: None,
                kv_cache_spec_sliding_window: None,
            },
            KvEvent::BlockRemoved {
                block_hashes: vec![7],
                medium: None,
                group_idx: Some(1),
            },
            KvEvent::AllBlocksCleared,
        ]
    );
}

/// PR #42892's layout, by hand: events are maps with `"type"`; here the batch is a map too
/// (msgspec without `array_like`), keys in a different order than vLLM's fields, byte
/// hashes of 32 and 3 bytes, one unknown event type and one unknown key.
#[test]
fn decodes_vllm_map_layout_with_byte_hashes_and_skips_unknown_events() {
    let mut h32 = [0u8; 32];
    h32[24..].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    h32[0] = 0xaa; // ignored: only the last 8 bytes count
    let mut b = Vec::new();
    w::write_map_len(&mut b, 2).unwrap();
    w::write_str(&mut b, "events").unwrap();
    w::write_array_len(&mut b, 3).unwrap();
    w::write_map_len(&mut b, 6).unwrap();
    w::write_str(&mut b, "token_ids").unwrap();
    w::write_array_len(&mut b, 2).unwrap();
    w::write_uint(&mut b, 9).unwrap();
    w::write_uint(&mut b, 10).unwrap();
    w::write_str(&mut b, "type").unwrap();
    w::write_str(&mut b, "BlockStored").unwrap();
    w::write_str(&mut b, "block_hashes").unwrap();
    w::write_array_len(&mut b, 1).unwrap();
    w::write_bin(&mut b, &h32).unwrap();
    w::write_str(&mut b, "parent_block_hash").unwrap();
    w::write_bin(&mut b, &[1, 2, 3]).unwrap();
    w::write_str(&mut b, "block_size").unwrap();
    w::write_uint(&mut b, 2).unwrap();
    w::write_str(&mut b, "something_new").unwrap();
    w::write_bool(&mut b, true).unwrap();
    w::write_map_len(&mut b, 1).unwrap();
    w::write_str(&mut b, "type").unwrap();
    w::write_str(&mut b, "BlockPinned").unwrap();
    w::write_array_len(&mut b, 2).unwrap(); // positional, mixed into the same batch
    w::write_str(&mut b, "BlockRemoved").unwrap();
    w::write_array_len(&mut b, 1).unwrap();
    w::write_bin(&mut b, &h32).unwrap();
    w::write_str(&mut b, "ts").unwrap();
    w::write_f64(&mut b, 2.5).unwrap();
    let d = decode(&b).unwrap();
    assert_eq!(
        d.skipped,
        vec![SkippedEvent {
            index: 1,
            tag: "BlockPinned".into()
        }]
    );
    assert_eq!(d.batch.ts, 2.5);
    assert_eq!(d.batch.data_parallel_rank, None);
    let KvEvent::BlockStored {
        block_hashes,
        parent_block_hash,
        token_ids,
        lora_id,
        medium,
        ..
    } = &d.batch.events[0]
    else {
        panic!("not stored: {:?}", d.batch.events[0]);
    };
    assert_eq!(block_hashes, &vec![0x0102_0304_0506_0708]);
    assert_eq!(*parent_block_hash, Some(0x01_0203));
    assert_eq!(token_ids, &vec![9, 10]);
    assert_eq!((*lora_id, medium.as_deref()), (None, None));
    assert_eq!(
        d.batch.events[1],
        KvEvent::BlockRemoved {
            block_hashes: vec![0x0102_0304_0506_0708],
            medium: None,
            group_idx: None
        }
    );
}

#[test]
fn array_encoding_is_vllms_positional_layout() {
    let batch = EventBatch {
        ts: 1.0,
        events: vec![
            stored(vec![5], Some(4), vec![1, 2, 3, 4]),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: None,
    };
    let v = rmpv::decode::read_value(&mut &encode(&batch, Encoding::Array)[..]).unwrap();
    let outer = v.as_array().unwrap();
    // No rank: omitted, as msgspec's omit_defaults does.
    assert_eq!(outer.len(), 2);
    let ev = outer[1].as_array().unwrap()[0].as_array().unwrap();
    // tag + the 7 fields without defaults; the defaulted tail is omitted.
    assert_eq!(ev.len(), 8);
    assert_eq!(ev[0].as_str(), Some("BlockStored"));
    assert_eq!(ev[2].as_u64(), Some(4));
    assert!(ev[5].is_nil());
    assert_eq!(ev[6].as_str(), Some("GPU"));
    let cleared = outer[1].as_array().unwrap()[1].as_array().unwrap();
    assert_eq!(cleared.len(), 1);

    let v = rmpv::decode::read_value(&mut &encode(&batch, Encoding::Map)[..]).unwrap();
    let outer = v.as_array().unwrap();
    let ev = outer[1].as_array().unwrap()[0].as_map().unwrap();
    assert_eq!(ev[0].0.as_str(), Some("type"));
    assert_eq!(ev[0].1.as_str(), Some("BlockStored"));
    let keys: Vec<&str> = ev.iter().map(|(k, _)| k.as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "type",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name"
        ]
    );
}

#[test]
fn a_set_middle_default_keeps_the_nils_before_it() {
    let mut e = stored(vec![1], None, vec![1, 2, 3, 4]);
    if let KvEvent::BlockStored {
        kv_cache_spec_kind, ..
    } = &mut e
    {
        *kv_cache_spec_kind = Some("full_attention".into());
    }
    let batch = EventBatch {
        ts: 0.0,
        events: vec![e],
        data_parallel_rank: Some(2),
    };
    let v = rmpv::decode::read_value(&mut &encode(&batch, Encoding::Array)[..]).unwrap();
    let ev = v.as_array().unwrap()[1].as_array().unwrap()[0]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(ev.len(), 11); // up to kv_cache_spec_kind
    assert!(ev[8].is_nil() && ev[9].is_nil());
    assert_eq!(
        decode(&encode(&batch, Encoding::Array)).unwrap().batch,
        batch
    );
}

#[test]
fn byte_hashes_decode_to_the_same_keys() {
    let batch = EventBatch {
        ts: 3.0,
        events: vec![
            stored(vec![u64::MAX, 0, 1 << 63], Some(42), vec![7; 12]),
            KvEvent::BlockRemoved {
                block_hashes: vec![u64::MAX],
                medium: Some("CPU".into()),
                group_idx: None,
            },
        ],
        data_parallel_rank: Some(0),
    };
    for enc in [Encoding::Array, Encoding::Map] {
        let bytes = encode_with(&batch, enc, HashFormat::Bytes);
        assert_eq!(decode(&bytes).unwrap().batch, batch);
        assert_ne!(bytes, encode(&batch, enc));
    }
    assert_eq!(hash_from_bytes(&[0xff]), 0xff);
    assert_eq!(hash_from_bytes(&[1; 40]), 0x0101_0101_0101_0101);
}

#[test]
fn malformed_payloads_are_typed_errors() {
    let good = vllm_array_batch();
    for cut in 0..good.len() {
        assert!(
            matches!(decode(&good[..cut]), Err(DecodeError::Msgpack(_))),
            "truncated at {cut}"
        );
    }
    let mut extra = good.clone();
    extra.push(0xc0);
    assert!(matches!(decode(&extra), Err(DecodeError::TrailingBytes(1))));
    let value = |v: Value| {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &v).unwrap();
        decode(&b)
    };
    assert!(matches!(value(Value::from(5)), Err(DecodeError::NotABatch)));
    assert!(matches!(
        value(Value::Array(vec![])),
        Err(DecodeError::MissingField { field: "ts", .. })
    ));
    assert!(matches!(
        value(Value::Array(vec![Value::from("x"), Value::Array(vec![])])),
        Err(DecodeError::WrongType { field: "ts", .. })
    ));
    assert!(matches!(
        value(Value::Array(vec![Value::F64(1.0), Value::from(3)])),
        Err(DecodeError::WrongType {
            field: "events",
            ..
        })
    ));
    let batch_of = |ev: Value| Value::Array(vec![Value::F64(1.0), Value::Array(vec![ev])]);
    assert!(matches!(
        value(batch_of(Value::Array(vec![Value::from(1)]))),
        Err(DecodeError::MissingTag { index: 0 })
    ));
    assert!(matches!(
        value(batch_of(Value::Map(vec![]))),
        Err(DecodeError::MissingTag { index: 0 })
    ));
    assert!(matches!(
        value(batch_of(Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(vec![Value::from("not a hash")]),
        ]))),
        Err(DecodeError::WrongType {
            field: "block_hashes",
            ..
        })
    ));
    assert!(matches!(
        value(batch_of(Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(vec![Value::Binary(vec![])]),
        ]))),
        Err(DecodeError::WrongType {
            field: "block_hashes",
            ..
        })
    ));
    assert!(matches!(
        value(batch_of(Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(vec![]),
            Value::Nil,
            Value::Array(vec![Value::from(-1)]),
            Value::from(4),
        ]))),
        Err(DecodeError::WrongType {
            field: "token_ids",
            ..
        })
    ));
    assert!(matches!(
        value(batch_of(Value::Array(vec![Value::from("BlockRemoved")]))),
        Err(DecodeError::MissingField {
            field: "block_hashes",
            ..
        })
    ));
    // An unknown event alone is skipped, not an error.
    let d = value(batch_of(Value::Array(vec![Value::from("Future")]))).unwrap();
    assert!(d.batch.events.is_empty());
    assert_eq!(d.skipped.len(), 1);
}

fn arb_opt_str() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-zA-Z0-9@/_-]{0,12}")
}

fn arb_event() -> impl Strategy<Value = KvEvent> {
    let stored = (
        (
            proptest::collection::vec(any::<u64>(), 0..4),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec(any::<u32>(), 0..20),
            any::<u32>(),
            proptest::option::of(any::<i64>()),
            arb_opt_str(),
        ),
        (
            arb_opt_str(),
            proptest::option::of(proptest::collection::vec(any::<i32>(), 0..3)),
            proptest::option::of(any::<i64>()),
            arb_opt_str(),
            proptest::option::of(any::<i64>()),
        ),
    )
        .prop_map(
            |(
                (block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium),
                (lora_name, extra, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window),
            )| KvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys: extra.map(|v| {
                    Value::Array(
                        v.into_iter()
                            .map(|x| Value::Array(vec![Value::from(x)]))
                            .collect(),
                    )
                }),
                group_idx,
                kv_cache_spec_kind,
                kv_cache_spec_sliding_window,
            },
        );
    let removed = (
        proptest::collection::vec(any::<u64>(), 0..4),
        arb_opt_str(),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(block_hashes, medium, group_idx)| KvEvent::BlockRemoved {
            block_hashes,
            medium,
            group_idx,
        });
    prop_oneof![stored, removed, Just(KvEvent::AllBlocksCleared)]
}

fn arb_batch() -> impl Strategy<Value = EventBatch> {
    (
        -1e12f64..1e12,
        proptest::collection::vec(arb_event(), 0..6),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
}

proptest! {
    #[test]
    fn round_trips_in_every_encoding(batch in arb_batch()) {
        for enc in [Encoding::Array, Encoding::Map] {
            for hf in [HashFormat::Int, HashFormat::Bytes] {
                let d = decode(&encode_with(&batch, enc, hf)).unwrap();
                prop_assert!(d.skipped.is_empty());
                prop_assert_eq!(&d.batch, &batch);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn corrupted_payloads_never_panic(batch in arb_batch(), pos in any::<usize>(), byte in any::<u8>()) {
        let mut b = encode(&batch, Encoding::Map);
        let i = pos % b.len();
        b[i] = byte;
        let _ = decode(&b);
        b.truncate(i);
        let _ = decode(&b);
    }
}
