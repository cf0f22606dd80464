//! Pods that tokenize with a `tokenizer.json` (the generated one): every endpoint that
//! turns text into ids, the engine's cache and the published KV events carry exactly the
//! ids `tokenizers` gives for that file, as a router holding the same file computes them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use infermesh_kvevents::{KvEvent, Subscriber, SubscriberConfig, Update};
use infermesh_sim::engine::block_hashes;
use infermesh_sim::tokenizer::{chat_prompt, filler_text, tokenize};
use infermesh_sim::{
    EngineProfile, Fleet, FleetConfig, KvEventsConfig, Tokenizer, generate_tokenizer_json,
};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn post(c: &HttpClient, addr: SocketAddr, path: &str, body: Value) -> Value {
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// What the router side computes: `encode(text, add_special_tokens = false)`.
fn reference_ids(json: &str, text: &str) -> Vec<u32> {
    tokenizers::Tokenizer::from_str(json)
        .unwrap()
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

const BS: usize = 16;

fn config(json: &str) -> FleetConfig {
    let mut cfg = FleetConfig::new(1);
    cfg.profile = EngineProfile {
        block_size: BS,
        ..EngineProfile::instant()
    };
    cfg.tokenizer = Tokenizer::from_json_str(json).unwrap();
    cfg
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog. Zwölf Boxkämpfer jagen \
    Viktor quer über den großen Sylter Deich; 東京 🚀 3.14159 and the sim kv pod.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_render_give_the_tokenizer_json_ids() {
    let json = generate_tokenizer_json();
    let fleet = Fleet::start(config(&json)).await.unwrap();
    let a = fleet.addrs()[0];
    let c = client();
    let want = reference_ids(&json, TEXT);
    // Not what the built-in tokenizer would give: the pod really uses the file.
    assert_ne!(want, tokenize(TEXT));

    let v = post(&c, a, "/tokenize", json!({"prompt": TEXT})).await;
    assert_eq!(v["tokens"], json!(want));
    assert_eq!(v["count"], want.len());

    let v = post(&c, a, "/v1/completions/render", json!({"prompt": TEXT})).await;
    assert_eq!(v[0]["token_ids"], json!(want));
    assert_eq!(v[0]["prompt_token_ids"], json!(want));

    // Token-id prompts are passed through untouched.
    let v = post(
        &c,
        a,
        "/v1/completions/render",
        json!({"prompt": [5, 6, 7]}),
    )
    .await;
    assert_eq!(v[0]["token_ids"], json!([5, 6, 7]));

    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": TEXT}]},
    ]);
    let chat_want = reference_ids(
        &json,
        &chat_prompt([("system", "Be brief."), ("user", TEXT)]),
    );
    let v = post(&c, a, "/tokenize", json!({"messages": messages})).await;
    assert_eq!(v["tokens"], json!(chat_want));
    let v = post(
        &c,
        a,
        "/v1/chat/completions/render",
        json!({"messages": messages}),
    )
    .await;
    assert_eq!(v[0]["token_ids"], json!(chat_want));
    // The template markers are the file's special tokens, one id each.
    assert_eq!(chat_want[0], 0, "<|begin_of_text|>");

    // Completions and chat prefill the same ids (usage counts them).
    let v = post(
        &c,
        a,
        "/v1/completions",
        json!({"prompt": TEXT, "max_tokens": 3}),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], want.len());
    assert_eq!(
        v["choices"][0]["text"],
        format!("{}{}{}", filler_text(0), filler_text(1), filler_text(2))
    );
    let v = post(
        &c,
        a,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 2}),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], chat_want.len());
    let v = post(
        &c,
        a,
        "/v1/embeddings",
        json!({"input": [TEXT, "hi there"]}),
    )
    .await;
    assert_eq!(
        v["usage"]["prompt_tokens"],
        want.len() + reference_ids(&json, "hi there").len()
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_and_the_cache_carry_the_tokenizer_json_ids() {
    let json = generate_tokenizer_json();
    let mut cfg = config(&json);
    cfg.kv_events = Some(KvEventsConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        bind: true,
        ..KvEventsConfig::default()
    });
    let fleet = Fleet::start(cfg).await.unwrap();
    let a = fleet.addrs()[0];
    let ports = fleet.kv_event_ports()[0].unwrap();
    let mut sc = SubscriberConfig::new(format!("tcp://127.0.0.1:{}", ports.publish.unwrap()));
    sc.replay_endpoint = Some(format!("tcp://127.0.0.1:{}", ports.replay.unwrap()));
    sc.start_seq = Some(0);
    sc.reconnect_interval = Duration::from_millis(100);
    let (_sub, mut rx) = Subscriber::spawn(sc);

    let prompt = TEXT.repeat(3);
    let ids = reference_ids(&json, &prompt);
    let full = ids.len() / BS;
    assert!(full >= 3, "{} tokens", ids.len());
    let c = client();
    let v = post(
        &c,
        a,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 2 * BS}),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());

    // The cache holds the blocks a router hashes from the same ids.
    let cached = fleet.cached_hashes(0).await.unwrap();
    for h in block_hashes(&ids, None, BS) {
        assert!(cached.contains(&h), "prompt block {h:x} cached");
    }

    // The events announce those ids, then the generated tokens' ids.
    let out = Tokenizer::from_json_str(&json).unwrap();
    let mut expected = ids.clone();
    expected.extend((0..2 * BS).map(|i| out.output_id(i)));
    let mut stored: Vec<u32> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stored.len() < (expected.len() - 1) / BS * BS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} stored tokens",
            stored.len()
        );
        let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await else {
            continue;
        };
        if let Update::Batch { batch, .. } = u {
            for e in batch.events {
                if let KvEvent::BlockStored {
                    token_ids,
                    block_size,
                    ..
                } = e
                {
                    assert_eq!(block_size as usize, BS);
                    stored.extend(token_ids);
                }
            }
        }
    }
    assert_eq!(stored[..full * BS], ids[..full * BS], "prompt blocks");
    assert_eq!(
        stored[..],
        expected[..stored.len()],
        "prompt and output blocks"
    );
    fleet.shutdown().await;
}

/// The binary's `generate-tokenizer` subcommand, `--tokenizer` flag and plain invocation.
#[test]
fn the_binary_writes_the_tokenizer_and_serves_with_it() {
    let bin = env!("CARGO_BIN_EXE_infermesh-sim");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sim-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    let st = Command::new(bin)
        .args(["generate-tokenizer", "--out"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(written, generate_tokenizer_json());

    // A missing or broken file stops the start, naming the file.
    let bad = dir.join("broken.json");
    std::fs::write(&bad, "{\"model\": 1}").unwrap();
    for (file, what) in [
        (dir.join("missing.json"), "missing.json"),
        (bad, "broken.json"),
    ] {
        let out = Command::new(bin)
            .args(["--pods", "1", "--base-port", "0", "--tokenizer"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what), "{err}");
    }

    // Serving with the file, and without it as before.
    for with_file in [true, false] {
        let mut cmd = Command::new(bin);
        cmd.args(["--pods", "1", "--base-port", "0", "--profile", "instant"]);
        if with_file {
            cmd.arg("--tokenizer").arg(&path);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut url = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with("pod 0 ") {
                url = line.split(' ').nth(2).map(str::to_owned);
            }
            if line.starts_with("ready: 1 pods") {
                break;
            }
        }
        let url = url.expect("pod 0 line");
        let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let v = rt
            .block_on(async { post(&client(), addr, "/tokenize", json!({"prompt": TEXT})).await });
        let want = if with_file {
            reference_ids(&written, TEXT)
        } else {
            tokenize(TEXT)
        };
        assert_eq!(v["tokens"], json!(want), "with file: {with_file}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
