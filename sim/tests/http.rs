//! A 2-pod fleet on ephemeral ports, driven over real HTTP.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(
    c: &HttpClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_serve_completions_metrics_and_stop() {
    let mut cfg = FleetConfig::new(2);
    cfg.profile = EngineProfile::instant();
    cfg.lora_adapters = vec!["sql-lora".into()];
    let fleet = Fleet::start(cfg).await.unwrap();
    let addrs = fleet.addrs();
    assert_eq!(addrs.len(), 2);
    assert_ne!(addrs[0], addrs[1]);
    let c = client();
    let a = addrs[0];

    for addr in &addrs {
        assert_eq!(call(&c, "GET", *addr, "/health", None).await.0, 200);
    }
    let (s, models) = call(&c, "GET", a, "/v1/models", None).await;
    assert_eq!(s, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], infermesh_sim::DEFAULT_MODEL);
    assert_eq!(models["data"][1]["id"], "sql-lora");

    // Non-streaming completion; 200 bytes = 50 tokens = 3 full blocks of 16.
    let prompt = "x".repeat(200);
    let body = json!({"model": infermesh_sim::DEFAULT_MODEL, "prompt": prompt, "max_tokens": 5});
    let (s, text) = call(&c, "POST", a, "/v1/completions", Some(body.clone())).await;
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["text"], " the sim kv  pod and");
    assert_eq!(v["usage"]["prompt_tokens"], 50);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // The same prompt again hits the 3 cached blocks.
    let (_, text) = call(&c, "POST", a, "/v1/completions", Some(body)).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 48);

    // Streaming chat with a usage chunk.
    let body = json!({
        "model": infermesh_sim::DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true},
    });
    let (s, text) = call(&c, "POST", a, "/v1/chat/completions", Some(body)).await;
    assert_eq!(s, 200);
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("SSE data line"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, " the sim kv ");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    let usage = &chunks[chunks.len() - 1]["usage"];
    assert_eq!(usage["completion_tokens"], 3);
    assert_eq!(chunks[chunks.len() - 1]["choices"], json!([]));

    // Streaming completion without usage.
    let body = json!({"prompt": "abcdefgh", "max_tokens": 2, "stream": true});
    let (_, text) = call(&c, "POST", a, "/v1/completions", Some(body)).await;
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(!text.contains("usage"));
    assert_eq!(text.matches("text_completion").count(), 2);

    // vLLM-shaped errors.
    let (s, text) = call(
        &c,
        "POST",
        a,
        "/v1/completions",
        Some(json!({"prompt": "hi", "max_tokens": 0})),
    )
    .await;
    assert_eq!(s, 400);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "error");
    assert_eq!(v["type"], "BadRequestError");
    assert_eq!(v["code"], 400);
    assert_eq!(v["message"], "max_tokens must be at least 1, got 0.");
    let (s, text) = call(
        &c,
        "POST",
        a,
        "/v1/completions",
        Some(json!({"model": "nope", "prompt": "hi"})),
    )
    .await;
    assert_eq!(s, 404);
    assert!(text.contains("The model `nope` does not exist."));

    // Router helper endpoints.
    let (s, text) = call(
        &c,
        "POST",
        a,
        "/v1/completions/render",
        Some(json!({"prompt": "abcdefgh"})),
    )
    .await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v[0]["prompt_token_ids"].as_array().unwrap().len(), 2);
    assert_eq!(v[0]["token_ids"], v[0]["prompt_token_ids"]);
    let (s, text) = call(
        &c,
        "POST",
        a,
        "/tokenize",
        Some(json!({"prompt": "abcdefgh"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["count"], 2);

    // Metrics with vLLM names.
    let (s, m) = call(&c, "GET", a, "/metrics", None).await;
    assert_eq!(s, 200);
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
    ] {
        assert!(m.contains(name), "missing {name}");
    }
    assert_eq!(metric(&m, "vllm:prefix_cache_hits_total"), 48.0);
    assert_eq!(metric(&m, "vllm:num_requests_running"), 0.0);

    // Stopping pod 1 closes its port; pod 0 keeps serving.
    fleet.stop_pod(1).await;
    assert!(tokio::net::TcpStream::connect(addrs[1]).await.is_err());
    assert_eq!(call(&c, "GET", a, "/health", None).await.0, 200);
    fleet.shutdown().await;
    assert!(tokio::net::TcpStream::connect(a).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_decode_handoff_and_lora_over_http() {
    let mut cfg = FleetConfig::new(2);
    cfg.profile = EngineProfile::instant();
    cfg.lora_adapters = vec!["sql-lora".into()];
    cfg.roles = vec![
        infermesh_sim::PodRole::Prefill,
        infermesh_sim::PodRole::Decode,
    ];
    let fleet = Fleet::start(cfg).await.unwrap();
    let [prefill, decode] = fleet.addrs()[..] else {
        panic!("two pods")
    };
    let c = client();
    let prompt = "p".repeat(400); // 100 tokens

    // The prefill pod computes the prompt and hands back where its KV lives.
    let body = json!({"prompt": prompt, "max_tokens": 1,
                      "kv_transfer_params": {"do_remote_decode": true}});
    let (s, text) = call(&c, "POST", prefill, "/v1/completions", Some(body)).await;
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let kv = v["kv_transfer_params"].clone();
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["remote_port"], prefill.port());
    assert_eq!(kv["remote_block_ids"].as_array().unwrap().len(), 7);

    // The decode pod takes the KV instead of computing it: all but the last token count as cached.
    let body = json!({"prompt": prompt, "max_tokens": 4, "kv_transfer_params": kv});
    let (s, text) = call(&c, "POST", decode, "/v1/completions", Some(body)).await;
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 99);
    assert!(v.get("kv_transfer_params").is_none());
    let (_, m) = call(&c, "GET", decode, "/metrics", None).await;
    assert_eq!(metric(&m, "vllm:prefix_cache_hits_total"), 0.0);

    // Roles are visible to routers.
    let (_, info) = call(&c, "GET", prefill, "/server_info", None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&info).unwrap()["role"],
        "prefill"
    );

    // A LoRA adapter is a model name; its cache is separate from the base model's.
    let body = json!({"model": "sql-lora", "prompt": prompt, "max_tokens": 2});
    let (s, text) = call(&c, "POST", prefill, "/v1/completions", Some(body)).await;
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["model"], "sql-lora");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, m) = call(&c, "GET", prefill, "/metrics", None).await;
    assert!(m.contains("max_lora=\"1\""));

    // Contradictory P/D flags are a client error.
    let body = json!({"prompt": "abcd", "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": true}});
    assert_eq!(
        call(&c, "POST", prefill, "/v1/completions", Some(body))
            .await
            .0,
        400
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_stream_frees_its_sequence() {
    // Real-time 8B profile: 1000 tokens take ~6 s, so the request is surely still running.
    let fleet = Fleet::start(FleetConfig::new(1)).await.unwrap();
    let a = fleet.addrs()[0];
    let c = client();
    let body = json!({"prompt": "hello", "max_tokens": 1000, "stream": true});
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{a}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let mut resp = c.request(req).await.unwrap();
    let first = resp.body_mut().frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: "));
    let (_, m) = call(&c, "GET", a, "/metrics", None).await;
    assert_eq!(metric(&m, "vllm:num_requests_running"), 1.0);
    drop(resp);

    // Wait (bounded) for the engine to notice and abort the sequence.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, m) = call(&c, "GET", a, "/metrics", None).await;
        if metric(&m, "vllm:num_requests_running") == 0.0 {
            assert!(m.contains("finished_reason=\"abort\"} 1"));
            assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sequence never aborted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowdown_is_validated_and_refused_for_stopped_pods() {
    let mut cfg = FleetConfig::new(2);
    cfg.profile = EngineProfile::instant();
    let fleet = Fleet::start(cfg).await.unwrap();
    let a = fleet.addrs()[0];
    assert!(fleet.set_slowdown(0, 4.0).await.is_ok());
    assert!(matches!(
        fleet.set_slowdown(0, -1.0).await,
        Err(infermesh_sim::SimError::InvalidConfig {
            field: "slowdown",
            ..
        })
    ));
    assert!(matches!(
        fleet.set_slowdown(9, 2.0).await,
        Err(infermesh_sim::SimError::NoSuchPod { index: 9 })
    ));
    let c = client();
    let (s, _) = call(
        &c,
        "POST",
        a,
        "/_sim/slowdown",
        Some(json!({"factor": 1.0})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, text) = call(&c, "POST", a, "/_sim/slowdown", Some(json!({"factor": 0}))).await;
    assert_eq!(s, 400, "{text}");
    let (s, _) = call(&c, "POST", a, "/_sim/slowdown", Some(json!({"speed": 2}))).await;
    assert_eq!(s, 400);
    // A slowed pod still serves.
    let (s, _) = call(
        &c,
        "POST",
        a,
        "/v1/completions",
        Some(json!({"prompt": "hi", "max_tokens": 2})),
    )
    .await;
    assert_eq!(s, 200);
    fleet.stop_pod(1).await;
    assert!(matches!(
        fleet.set_slowdown(1, 2.0).await,
        Err(infermesh_sim::SimError::NoSuchPod { index: 1 })
    ));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_fleet_closes_its_ports() {
    let mut cfg = FleetConfig::new(2);
    cfg.profile = EngineProfile::instant();
    let fleet = Fleet::start(cfg).await.unwrap();
    let addrs = fleet.addrs();
    drop(fleet);
    for a in addrs {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while tokio::net::TcpStream::connect(a).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "{a} still accepts");
            tokio::task::yield_now().await;
        }
    }
}

/// vLLM's `POST /tokenize`: a completion prompt or chat messages (rendered with the chat
/// template, ending with the assistant header) give `{count, max_model_len, tokens}` from
/// the pod's own tokenizer, the same ids a completion would prefill, so a router can use
/// it as its tokenization fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_answers_as_vllm_with_the_pods_tokenizer_and_template() {
    use infermesh_sim::tokenizer::{chat_prompt, tokenize};
    let mut cfg = FleetConfig::new(1);
    cfg.profile = EngineProfile::instant();
    cfg.lora_adapters = vec!["sql-lora".into()];
    let fleet = Fleet::start(cfg).await.unwrap();
    let a = fleet.addrs()[0];
    let c = client();
    let max_len = EngineProfile::instant().max_model_len;

    let text = "The quick brown fox jumps over the lazy dog";
    let (s, body) = call(
        &c,
        "POST",
        a,
        "/tokenize",
        Some(json!({"model": infermesh_sim::DEFAULT_MODEL, "prompt": text})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let want = tokenize(text);
    assert_eq!(v["count"], want.len());
    assert_eq!(v["max_model_len"], max_len);
    assert_eq!(v["tokens"], json!(want));

    let (s, body) = call(
        &c,
        "POST",
        a,
        "/tokenize",
        Some(json!({"model": "sql-lora", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ]})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let want = tokenize(&chat_prompt([
        ("system", "Be brief."),
        ("user", "hi there"),
    ]));
    assert_eq!(v["tokens"], json!(want));
    assert_eq!(v["count"], want.len());

    // The prompt a chat completion prefills is the same: its usage counts the same tokens.
    let (s, body) = call(
        &c,
        "POST",
        a,
        "/v1/chat/completions",
        Some(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi there"},
        ], "max_tokens": 1})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], want.len());

    for bad in [
        json!({"model": "nope", "prompt": "x"}),
        json!({"messages": "not a list"}),
    ] {
        let (s, _) = call(&c, "POST", a, "/tokenize", Some(bad.clone())).await;
        assert!(s == 400 || s == 404, "{bad}: {s}");
    }
    fleet.shutdown().await;
}
