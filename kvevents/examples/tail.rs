//! Prints a KV-event stream: `tail <endpoint> [replay-endpoint] [start-seq] [count]`.
//!
//! One line per update, then the subscriber's counters; stops after `count` batches
//! (default: never). Useful against a real vLLM pod or `infermesh-sim
//! --enable-kv-cache-events`.

use std::sync::atomic::Ordering;

use infermesh_kvevents::{KvEvent, Subscriber, SubscriberConfig, Update};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(endpoint) = args.first() else {
        anyhow::bail!("usage: tail <endpoint> [replay-endpoint|-] [start-seq|-] [count]");
    };
    let mut cfg = SubscriberConfig::new(endpoint.clone());
    cfg.replay_endpoint = args.get(1).filter(|s| *s != "-").cloned();
    cfg.start_seq = match args.get(2).filter(|s| *s != "-") {
        Some(s) => Some(s.parse()?),
        None => None,
    };
    let count: Option<u64> = args.get(3).map(|s| s.parse()).transpose()?;
    let (sub, mut rx) = Subscriber::spawn(cfg);
    let mut batches = 0u64;
    while let Some(u) = rx.recv().await {
        match u {
            Update::Batch {
                topic,
                seq,
                batch,
                replayed,
            } => {
                let kinds: Vec<String> = batch
                    .events
                    .iter()
                    .map(|e| match e {
                        KvEvent::BlockStored {
                            block_hashes,
                            parent_block_hash,
                            token_ids,
                            ..
                        } => format!(
                            "stored{block_hashes:x?}<-{parent_block_hash:x?} tokens={}",
                            token_ids.len()
                        ),
                        KvEvent::BlockRemoved { block_hashes, .. } => {
                            format!("removed{block_hashes:x?}")
                        }
                        KvEvent::AllBlocksCleared => "cleared".to_owned(),
                    })
                    .collect();
                let how = if replayed { "replay" } else { "live" };
                println!("{topic} seq={seq} {how} {}", kinds.join(" "));
                batches += 1;
                if count.is_some_and(|c| batches >= c) {
                    break;
                }
            }
            other => println!("{other:?}"),
        }
    }
    let s = sub.stats();
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "stats messages={} batches={} replays={} replayed={} duplicates={} gaps={} lost={} decode_errors={} bad_frames={} unknown_events={}",
        n(&s.messages),
        n(&s.batches),
        n(&s.replays),
        n(&s.replayed),
        n(&s.duplicates),
        n(&s.gaps),
        n(&s.lost),
        n(&s.decode_errors),
        n(&s.bad_frames),
        n(&s.unknown_events)
    );
    Ok(())
}
