//! A pod with KV events on, served over HTTP under cache pressure, read by a real
//! subscriber: the events re-hash to what they announce and rebuild the pod's cache.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use infermesh_kvevents::{
    Encoding, HashFormat, KvEvent, Subscriber, SubscriberConfig, Topic, Update,
};
use infermesh_sim::engine::{chain_hash, root_hash};
use infermesh_sim::{EngineProfile, Fleet, FleetConfig, KvEventsConfig};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(c: &HttpClient, addr: SocketAddr, path: &str, body: Value) -> (u16, String) {
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

const BS: usize = 16;

/// What a subscriber-side index of one pod would hold, checked event by event.
#[derive(Default)]
struct Mirror {
    hashes: HashSet<u64>,
    stored: usize,
    removed: usize,
    cleared: usize,
    lora_stored: usize,
    last_seq: Option<u64>,
    restarts_allowed: usize,
}

impl Mirror {
    fn apply(&mut self, u: Update, topic: &str) {
        let (t, seq, batch) = match u {
            Update::Batch {
                topic, seq, batch, ..
            } => (topic, seq, batch),
            // A new process: its cache starts empty and its numbering at 0.
            Update::Restarted { topic: t } if self.restarts_allowed > 0 => {
                assert_eq!(t, topic);
                self.restarts_allowed -= 1;
                self.hashes.clear();
                self.last_seq = None;
                return;
            }
            other => panic!("no loss or unexpected restart: {other:?}"),
        };
        assert_eq!(t, topic);
        assert_eq!(seq, self.last_seq.map_or(0, |s| s + 1), "in order, from 0");
        self.last_seq = Some(seq);
        assert_eq!(batch.data_parallel_rank, Some(0));
        for e in batch.events {
            match e {
                KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                    medium,
                    lora_name,
                    ..
                } => {
                    self.stored += 1;
                    assert_eq!(block_size as usize, BS);
                    assert_eq!(medium.as_deref(), Some("GPU"));
                    assert_eq!(token_ids.len(), block_hashes.len() * BS);
                    // The adapter is part of the chain's root, as the sim hashes it.
                    let lora = match (lora_id, lora_name.as_deref()) {
                        (None, None) => None,
                        (Some(1), Some("sql-lora")) => {
                            self.lora_stored += 1;
                            Some(0)
                        }
                        other => panic!("unexpected adapter {other:?}"),
                    };
                    let mut h = parent_block_hash.unwrap_or_else(|| root_hash(lora));
                    for (i, want) in block_hashes.iter().enumerate() {
                        h = chain_hash(h, &token_ids[i * BS..(i + 1) * BS]);
                        assert_eq!(h, *want, "announced hash re-hashes from its tokens");
                        assert!(self.hashes.insert(h), "stored twice");
                    }
                }
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium,
                    ..
                } => {
                    assert_eq!(medium.as_deref(), Some("GPU"));
                    for h in block_hashes {
                        self.removed += 1;
                        assert!(self.hashes.remove(&h), "removed but never stored");
                    }
                }
                KvEvent::AllBlocksCleared => {
                    self.cleared += 1;
                    self.hashes.clear();
                }
            }
        }
    }

    fn sorted(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.hashes.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Applies updates until the mirror equals the pod's cache (and `done` holds).
    async fn converge(
        &mut self,
        rx: &mut mpsc::Receiver<Update>,
        fleet: &Fleet,
        topic: &str,
        done: impl Fn(&Mirror) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            while let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await
            {
                self.apply(u, topic);
            }
            let pod = fleet.cached_hashes(0).await.unwrap();
            if pod == self.sorted() && done(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mirror {} hashes, pod {}; only in mirror {:?}, only in pod {:?}, last seq {:?}",
                self.hashes.len(),
                pod.len(),
                self.hashes
                    .iter()
                    .filter(|h| !pod.contains(h))
                    .collect::<Vec<_>>(),
                pod.iter()
                    .filter(|h| !self.hashes.contains(h))
                    .collect::<Vec<_>>(),
                self.last_seq,
            );
        }
    }
}

fn events_config(encoding: Encoding, hash_format: HashFormat) -> FleetConfig {
    let mut cfg = FleetConfig::new(1);
    cfg.profile = EngineProfile {
        block_size: BS,
        // About four requests' worth: later requests evict earlier prefixes.
        num_gpu_blocks: 24,
        max_num_seqs: 2,
        ..EngineProfile::instant()
    };
    cfg.lora_adapters = vec!["sql-lora".into()];
    cfg.kv_events = Some(KvEventsConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        encoding,
        hash_format,
        bind: true,
        ..KvEventsConfig::default()
    });
    cfg
}

/// A subscriber to pod 0 that replays from seq 0.
fn subscribe(fleet: &Fleet) -> (Subscriber, mpsc::Receiver<Update>) {
    let ports = fleet.kv_event_ports()[0].unwrap();
    let mut sc = SubscriberConfig::new(format!("tcp://127.0.0.1:{}", ports.publish.unwrap()));
    sc.replay_endpoint = Some(format!("tcp://127.0.0.1:{}", ports.replay.unwrap()));
    // Replay from the first batch: whatever the subscription missed while connecting.
    sc.start_seq = Some(0);
    sc.reconnect_interval = Duration::from_millis(100);
    Subscriber::spawn(sc)
}

async fn complete(c: &HttpClient, addr: SocketAddr, model: &str, prompt: String) {
    let (s, body) = post(
        c,
        addr,
        "/v1/completions",
        json!({"model": model, "prompt": prompt, "max_tokens": 20}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
}

async fn run(encoding: Encoding, hash_format: HashFormat) {
    let fleet = Fleet::start(events_config(encoding, hash_format))
        .await
        .unwrap();
    let addr = fleet.addrs()[0];
    let topic = Topic::for_pod(addr, infermesh_sim::DEFAULT_MODEL)
        .unwrap()
        .to_string();
    let (sub, mut rx) = subscribe(&fleet);

    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut m = Mirror::default();
    // Shared system prompt + distinct questions: hits on the shared blocks, and the cache
    // (24 blocks, ~6 per request) evicts older questions' blocks.
    let system = "You are a careful assistant. ".repeat(6);
    for i in 0..14 {
        let model = if i % 5 == 4 {
            "sql-lora"
        } else {
            infermesh_sim::DEFAULT_MODEL
        };
        let prompt = format!("{system} Question {i}: {}", "tell me more ".repeat(5 + i));
        complete(&c, addr, model, prompt).await;
    }
    m.converge(&mut rx, &fleet, &topic, |m| m.removed > 0).await;
    assert!(
        m.stored > 0 && m.lora_stored > 0,
        "{} {}",
        m.stored,
        m.lora_stored
    );

    // A reset empties the cache and says so.
    let (s, body) = post(&c, addr, "/reset_prefix_cache", json!({})).await;
    assert_eq!(s, 200, "{body}");
    m.converge(&mut rx, &fleet, &topic, |m| m.cleared == 1)
        .await;
    assert!(m.hashes.is_empty());

    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let st = sub.stats();
    assert_eq!(
        get(&st.decode_errors) + get(&st.bad_frames) + get(&st.lost),
        0
    );
    assert_eq!(get(&st.unknown_events), 0);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_rebuild_the_pods_cache_array_encoding_int_hashes() {
    run(Encoding::Array, HashFormat::Int).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_rebuild_the_pods_cache_map_encoding_byte_hashes() {
    run(Encoding::Map, HashFormat::Bytes).await;
}

/// A restarted pod is a new publisher on the same ports: the subscriber reports the
/// restart, the mirror starts over, and it converges on the new process's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pod_is_a_new_stream_on_the_same_ports() {
    let fleet = Fleet::start(events_config(Encoding::Array, HashFormat::Int))
        .await
        .unwrap();
    let addr = fleet.addrs()[0];
    let ports = fleet.kv_event_ports()[0];
    let topic = Topic::for_pod(addr, infermesh_sim::DEFAULT_MODEL)
        .unwrap()
        .to_string();
    let (sub, mut rx) = subscribe(&fleet);
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut m = Mirror::default();
    let model = infermesh_sim::DEFAULT_MODEL;
    for i in 0..6 {
        complete(
            &c,
            addr,
            model,
            format!("before the restart {i} {}", "x".repeat(300)),
        )
        .await;
    }
    m.converge(&mut rx, &fleet, &topic, |m| m.hashes.len() > 8)
        .await;
    let before = m.last_seq.unwrap();

    fleet.restart_pod(0).await.unwrap();
    assert_eq!(fleet.kv_event_ports()[0], ports);
    assert!(fleet.cached_hashes(0).await.unwrap().is_empty());
    m.restarts_allowed = 1;
    // The SUB reconnects on its own schedule and misses what the new process publishes
    // meanwhile; the next batch it does see reveals the restart and replays the new run
    // from 0. So: traffic until the restart is seen, as a live pod would have.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while m.restarts_allowed > 0 {
        assert!(tokio::time::Instant::now() < deadline, "restart never seen");
        let prompt = format!("after the restart {i} {}", "y".repeat(300));
        complete(&c, addr, model, prompt).await;
        i += 1;
        while let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            m.apply(u, &topic);
        }
    }
    m.converge(&mut rx, &fleet, &topic, |m| {
        m.restarts_allowed == 0 && !m.hashes.is_empty()
    })
    .await;
    assert!(m.last_seq.unwrap() < before, "numbering started over");
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&sub.stats().restarts), 1);
    assert_eq!(get(&sub.stats().lost), 0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn event_ports_follow_the_pod_index_and_bad_endpoints_are_refused() {
    let mut cfg = FleetConfig::new(2);
    cfg.profile = EngineProfile::instant();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = probe.local_addr().unwrap().port();
    drop(probe);
    cfg.kv_events = Some(KvEventsConfig {
        endpoint: format!("tcp://127.0.0.1:{base}"),
        bind: true,
        ..KvEventsConfig::default()
    });
    match Fleet::start(cfg.clone()).await {
        Ok(fleet) => {
            let ports = fleet.kv_event_ports();
            assert_eq!(ports[0].unwrap().publish, Some(base));
            assert_eq!(ports[1].unwrap().publish, Some(base + 1));
            assert_eq!(ports[0].unwrap().replay, None);
            fleet.shutdown().await;
        }
        // base + 1 was taken by someone else meanwhile: the start fails cleanly.
        Err(e) => assert!(
            matches!(e, infermesh_sim::SimError::KvEvents { pod: 1, .. }),
            "{e}"
        ),
    }
    for (endpoint, replay) in [
        ("tcp://*:5557", Some("tcp://*:5558")), // pod 1's PUB port is pod 0's replay port
        ("ipc:///tmp/kv", None),
        ("tcp://*", None),
        ("tcp://*:65535", None),
    ] {
        cfg.kv_events = Some(KvEventsConfig {
            endpoint: endpoint.into(),
            replay_endpoint: replay.map(Into::into),
            ..KvEventsConfig::default()
        });
        assert!(
            matches!(
                cfg.validate(),
                Err(infermesh_sim::SimError::InvalidConfig { .. })
            ),
            "{endpoint}"
        );
    }
}
