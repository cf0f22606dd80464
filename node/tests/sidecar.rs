//! `infermesh sidecar` against simulated vLLM pods: the P/D handoff, prefill failures and
//! the SSRF allowlist. Each sim sits behind a recording tap, so the tests see exactly what
//! every engine was sent and what the prefiller answered.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use infermesh_node::sidecar::{
    KvConnector, PoolSource, ServeCert, Sidecar, SidecarConfig, StageTls,
};
use infermesh_node::upstream::{HttpClient, http_client};
use infermesh_sim::{EngineProfile, Fleet, FleetConfig, PodRole};
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::{Resp, post};

/// One request a tap saw, and the JSON answer it passed back (SSE answers stream through
/// unrecorded).
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: http::HeaderMap,
    body: Value,
    answer: Option<Value>,
}

/// What a tap does with a request after recording it.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Forward to this sim.
    Forward(SocketAddr),
    /// Answer this status with an error body.
    Fail(StatusCode),
}

struct TapState {
    behaviour: Behaviour,
    client: HttpClient,
    seen: Mutex<Vec<Seen>>,
}

/// A recording HTTP server on 127.0.0.1 in front of a sim (or failing on purpose).
struct Tap {
    addr: SocketAddr,
    state: Arc<TapState>,
    server: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(behaviour: Behaviour) -> Tap {
        let state = Arc::new(TapState {
            behaviour,
            client: http_client(Duration::from_secs(2)),
            seen: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(tap_handler)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Tap {
            addr,
            state,
            server,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn tap_handler(State(s): State<Arc<TapState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let path = parts.uri.path().to_owned();
    let index = {
        let mut seen = s.seen.lock();
        seen.push(Seen {
            path: path.clone(),
            headers: parts.headers.clone(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            answer: None,
        });
        seen.len() - 1
    };
    let target = match s.behaviour {
        Behaviour::Fail(status) => {
            return (
                status,
                format!("{{\"error\": \"tap fails with {status}\"}}"),
            )
                .into_response();
        }
        Behaviour::Forward(t) => t,
    };
    let mut b = http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://{target}{path}"))
        .header("content-type", "application/json");
    if let Some(id) = parts.headers.get("x-request-id") {
        b = b.header("x-request-id", id);
    }
    let resp = s
        .client
        .request(b.body(Full::new(bytes)).unwrap())
        .await
        .unwrap();
    let (parts, incoming) = resp.into_parts();
    let json = parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json {
        return Response::from_parts(parts, Body::new(incoming));
    }
    let answer = incoming.collect().await.unwrap().to_bytes();
    s.seen.lock()[index].answer = serde_json::from_slice(&answer).ok();
    Response::from_parts(parts, Body::from(answer))
}

/// A prefill-role sim and a decode-role sim, instant.
async fn pd_fleet() -> (Fleet, SocketAddr, SocketAddr, String) {
    let mut cfg = FleetConfig::new(2);
    cfg.profile = EngineProfile::instant();
    cfg.roles = vec![PodRole::Prefill, PodRole::Decode];
    let model = cfg.model.clone();
    let fleet = Fleet::start(cfg).await.expect("sims start");
    let a = fleet.addrs();
    (fleet, a[0], a[1], model)
}

/// Writes an endpoints file for pool `llama` with `pods` (all on 127.0.0.1).
fn write_pool(path: &Path, pods: &[SocketAddr]) {
    let mut text = String::from(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: llama}\nspec:\n  targetPorts: [{number: 8000}]\n  selector: {matchLabels: {app: sim}}\npods:\n",
    );
    for (i, p) in pods.iter().enumerate() {
        text.push_str(&format!(
            "- {{name: pod-{i}, address: {}, labels: {{app: sim}}, targetPorts: [{{number: {}}}]}}\n",
            p.ip(),
            p.port()
        ));
    }
    // Write then rename, so the watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config(model_server: SocketAddr) -> SidecarConfig {
    SidecarConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        model_server,
        connector: KvConnector::Nixlv2,
        ssrf: None,
        prefill_max_retries: 0,
        prefill_retry_backoff: Duration::from_millis(10),
        prefill_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(10),
        max_body_bytes: 1 << 20,
        p2p_connector_port: 7777,
        pod_ip: None,
        tls: Default::default(),
    }
}

/// The `data:` events of an SSE body, `[DONE]` excluded, and whether `[DONE]` ended it.
fn sse_events(body: &[u8]) -> (Vec<Value>, bool) {
    let text = std::str::from_utf8(body).expect("SSE is text");
    let mut events = Vec::new();
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).expect("each event is JSON"));
        }
    }
    (events, done)
}

fn error_message(r: &Resp) -> String {
    r.json()["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {:?}", r.body))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_then_decode_hands_the_prefillers_kv_params_to_the_local_engine() {
    let (fleet, prefill_sim, decode_sim, model) = pd_fleet().await;
    let prefill = Tap::start(Behaviour::Forward(prefill_sim)).await;
    let decode = Tap::start(Behaviour::Forward(decode_sim)).await;
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    write_pool(&pool, &[prefill.addr, decode.addr]);
    let mut cfg = config(decode.addr);
    cfg.ssrf = Some(PoolSource {
        pool: "llm-d/llama".into(),
        endpoints_file: pool,
    });
    let sidecar = Sidecar::start(cfg).await.expect("sidecar starts");
    let client = http_client(Duration::from_secs(2));

    let request = json!({
        "model": model,
        "prompt": "Explain disaggregated serving in one paragraph, please.",
        "max_tokens": 7,
        "stream": true,
        "stream_options": {"include_usage": true},
        // A client naming where the engine should pull KV from: never forwarded.
        "kv_transfer_params": {"do_remote_prefill": true, "remote_host": "169.254.169.254",
            "remote_port": 80, "remote_engine_id": "evil", "remote_block_ids": [1]},
    });
    let prefiller = prefill.addr.to_string();
    let r = post(
        &client,
        sidecar.addr,
        "/v1/completions",
        request.to_string(),
        &[
            ("x-prefiller-host-port", prefiller.as_str()),
            ("x-request-id", "pd-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "the client asked for a stream: {:?}",
        r.headers
    );
    let (events, done) = sse_events(&r.body);
    assert!(done, "the stream ends with [DONE]");
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert!(!text.is_empty(), "no text streamed: {events:?}");
    let usage = events
        .iter()
        .find(|e| !e["usage"].is_null())
        .expect("usage chunk");
    assert_eq!(
        usage["usage"]["completion_tokens"], 7,
        "decode used the client's max_tokens"
    );

    let p = prefill.seen();
    assert_eq!(p.len(), 1, "one prefill");
    let pb = &p[0].body;
    assert_eq!(p[0].path, "/v1/completions");
    assert_eq!(pb["max_tokens"], 1);
    assert_eq!(pb["stream"], false);
    assert!(pb.get("stream_options").is_none());
    assert_eq!(pb["prompt"], request["prompt"]);
    assert_eq!(
        pb["kv_transfer_params"],
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null}),
        "the client's kv_transfer_params were replaced"
    );
    assert_eq!(p[0].headers["x-request-id"], "pd-1");
    assert!(p[0].headers.get("x-prefiller-host-port").is_none());
    let returned =
        p[0].answer.as_ref().expect("prefill answered JSON")["kv_transfer_params"].clone();
    assert_eq!(returned["do_remote_prefill"], true, "{returned}");
    assert_eq!(returned["remote_port"], prefill_sim.port());

    let d = decode.seen();
    assert_eq!(d.len(), 1, "one decode");
    let db = &d[0].body;
    assert_eq!(
        db["kv_transfer_params"], returned,
        "decode got exactly what the prefiller returned"
    );
    assert_eq!(db["max_tokens"], 7);
    assert_eq!(db["stream"], true);
    assert_eq!(db["stream_options"], json!({"include_usage": true}));
    assert!(d[0].headers.get("x-prefiller-host-port").is_none());

    // Chat through the same handoff, not streamed: max_completion_tokens is capped too.
    let chat = json!({"model": model, "messages": [{"role": "user", "content": "hi there"}],
        "max_completion_tokens": 5});
    let r = post(
        &client,
        sidecar.addr,
        "/v1/chat/completions",
        chat.to_string(),
        &[("x-prefiller-host-port", prefiller.as_str())],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    let p = prefill.seen();
    assert_eq!(p[1].path, "/v1/chat/completions");
    assert_eq!(p[1].body["max_completion_tokens"], 1);
    let d = decode.seen();
    assert_eq!(
        d[1].body["kv_transfer_params"],
        p[1].answer.as_ref().unwrap()["kv_transfer_params"]
    );

    sidecar.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_router_headers_the_request_passes_through_unchanged() {
    let (fleet, _, decode_sim, model) = pd_fleet().await;
    let decode = Tap::start(Behaviour::Forward(decode_sim)).await;
    let sidecar = Sidecar::start(config(decode.addr)).await.unwrap();
    let client = http_client(Duration::from_secs(2));
    let request = json!({"model": model, "prompt": "plain", "max_tokens": 3, "stream": true});
    let r = post(
        &client,
        sidecar.addr,
        "/v1/completions",
        request.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let (events, done) = sse_events(&r.body);
    assert!(done && !events.is_empty(), "{:?}", r.body);
    let d = decode.seen();
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].body, request,
        "the engine got the client's body as sent"
    );

    // GETs reach the engine too (the sidecar fronts the whole engine API).
    let r = support::get(&client, sidecar.addr, "/v1/models")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], model.as_str());

    sidecar.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}

/// A sidecar in front of `engine` serving TLS with a certificate it made itself, passing
/// requests on in plaintext: a stand-in for an engine that speaks TLS.
async fn tls_front(engine: SocketAddr) -> Sidecar {
    let mut cfg = config(engine);
    cfg.tls.serve = Some(ServeCert::SelfSigned);
    Sidecar::start(cfg).await.expect("TLS front starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handoff_reaches_prefiller_and_decoder_over_tls_when_asked() {
    let (fleet, prefill_sim, decode_sim, model) = pd_fleet().await;
    let prefill = Tap::start(Behaviour::Forward(prefill_sim)).await;
    let decode = Tap::start(Behaviour::Forward(decode_sim)).await;
    let prefill_tls = tls_front(prefill.addr).await;
    let decode_tls = tls_front(decode.addr).await;
    let client = http_client(Duration::from_secs(2));
    let request = json!({"model": model, "prompt": "over TLS, both ways", "max_tokens": 3});
    let prefiller = prefill_tls.addr.to_string();
    let headers = [("x-prefiller-host-port", prefiller.as_str())];

    // The TLS port does not answer plaintext.
    let plain = support::send(
        &client,
        http::Request::post(format!("http://{}/v1/completions", decode_tls.addr))
            .body(Full::new(request.to_string().into()))
            .unwrap(),
    )
    .await;
    assert!(plain.is_err(), "plaintext got an answer: {plain:?}");

    // One request through a sidecar started with `cfg`: its answer, or why it did not start.
    let body = request.to_string();
    let through = |cfg: SidecarConfig| {
        let (client, body) = (client.clone(), body.clone());
        async move {
            let sidecar = Sidecar::start(cfg).await?;
            let r = post(&client, sidecar.addr, "/v1/completions", body, &headers).await;
            sidecar.shutdown(Duration::from_secs(2)).await;
            Ok::<Resp, infermesh_node::sidecar::SidecarStartError>(r)
        }
    };

    // Plaintext towards a TLS prefiller: the handshake never happens, the client gets a 502.
    let mut cfg = config(decode_tls.addr);
    cfg.tls.decoder = StageTls::Unverified;
    let r = through(cfg.clone()).await.unwrap();
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert!(error_message(&r).contains(&prefiller), "{:?}", r.body);

    // Both stages over TLS, certificates not verified: the handoff completes.
    cfg.tls.prefiller = StageTls::Unverified;
    let r = through(cfg.clone()).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        prefill.seen().len(),
        1,
        "one prefill, through the TLS front"
    );
    assert_eq!(decode.seen().len(), 1, "one decode, through the TLS front");
    let kv = &decode.seen()[0].body["kv_transfer_params"];
    assert_eq!(kv["do_remote_prefill"], true, "{kv}");

    // Verified: a self-signed prefiller is refused during the handshake and named in the
    // 502. (A machine with no CA bundle cannot verify anything; the start says so.)
    cfg.tls.prefiller = StageTls::Verified;
    match through(cfg).await {
        Ok(r) => {
            assert_eq!(r.status, 502, "{:?}", r.body);
            let msg = error_message(&r);
            assert!(
                msg.contains(&prefiller) && msg.contains("certificate"),
                "{msg}"
            );
            assert_eq!(
                prefill.seen().len(),
                1,
                "nothing reached the prefill engine"
            );
        }
        Err(e) => assert!(e.to_string().contains("--enable-tls"), "{e}"),
    }

    prefill_tls.shutdown(Duration::from_secs(2)).await;
    decode_tls.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_prefiller_is_retried_then_named_in_a_502() {
    let (fleet, _, decode_sim, model) = pd_fleet().await;
    let decode = Tap::start(Behaviour::Forward(decode_sim)).await;
    let failing = Tap::start(Behaviour::Fail(StatusCode::SERVICE_UNAVAILABLE)).await;
    let mut cfg = config(decode.addr);
    cfg.prefill_max_retries = 2;
    let sidecar = Sidecar::start(cfg).await.unwrap();
    let client = http_client(Duration::from_secs(2));
    let body = json!({"model": model, "prompt": "x", "max_tokens": 3}).to_string();

    // A prefiller answering 503: three attempts (1 + 2 retries), then 502.
    let named = failing.addr.to_string();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        post(
            &client,
            sidecar.addr,
            "/v1/completions",
            body.clone(),
            &[("x-prefiller-host-port", named.as_str())],
        ),
    )
    .await
    .expect("the sidecar answers instead of hanging");
    assert_eq!(r.status, 502, "{:?}", r.body);
    let msg = error_message(&r);
    assert!(
        msg.contains(&named) && msg.contains("3 attempt") && msg.contains("503"),
        "{msg}"
    );
    assert_eq!(failing.seen().len(), 3, "1 attempt + 2 retries");

    // A prefiller nobody listens on: connect errors, same bound, same answer.
    let dead = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    let named = dead.to_string();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        post(
            &client,
            sidecar.addr,
            "/v1/completions",
            body,
            &[("x-prefiller-host-port", named.as_str())],
        ),
    )
    .await
    .expect("the sidecar answers instead of hanging");
    assert_eq!(r.status, 502, "{:?}", r.body);
    let msg = error_message(&r);
    assert!(msg.contains(&named) && msg.contains("3 attempt"), "{msg}");
    assert!(
        msg.to_lowercase().contains("connect"),
        "the connect error is named: {msg}"
    );
    assert!(decode.seen().is_empty(), "no decode without a prefill");

    sidecar.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_protection_refuses_pods_outside_the_pool_until_the_file_adds_them() {
    let (fleet, prefill_sim, decode_sim, model) = pd_fleet().await;
    let decode = Tap::start(Behaviour::Forward(decode_sim)).await;
    let outsider = Tap::start(Behaviour::Forward(prefill_sim)).await;
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    write_pool(&pool, &[decode.addr]);
    let mut cfg = config(decode.addr);
    cfg.ssrf = Some(PoolSource {
        pool: "llama".into(),
        endpoints_file: pool.clone(),
    });
    let sidecar = Sidecar::start(cfg).await.unwrap();
    let client = http_client(Duration::from_secs(2));
    let body = json!({"model": model, "prompt": "x", "max_tokens": 2}).to_string();
    let named = outsider.addr.to_string();

    for header in ["x-prefiller-host-port", "x-kv-cache-source-host-port"] {
        let r = post(
            &client,
            sidecar.addr,
            "/v1/completions",
            body.clone(),
            &[(header, named.as_str())],
        )
        .await;
        assert_eq!(r.status, 403, "{header}: {:?}", r.body);
        let msg = error_message(&r);
        assert!(
            msg.contains(&named) && msg.contains(header) && msg.contains("llama"),
            "{msg}"
        );
    }
    let metadata = "169.254.169.254:80";
    let r = post(
        &client,
        sidecar.addr,
        "/v1/completions",
        body.clone(),
        &[("x-prefiller-host-port", metadata)],
    )
    .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(error_message(&r).contains(metadata));
    assert!(
        outsider.seen().is_empty(),
        "a refused host is never contacted"
    );
    assert!(decode.seen().is_empty(), "nor is the decode sent");

    // Bad input is named, before anything is sent.
    let r = post(
        &client,
        sidecar.addr,
        "/v1/completions",
        body.clone(),
        &[("x-prefiller-host-port", "prefill-0:8000")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(error_message(&r).contains("x-prefiller-host-port"));
    let r = post(
        &client,
        sidecar.addr,
        "/v1/completions",
        "{not json",
        &[("x-prefiller-host-port", decode.addr.to_string().as_str())],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(error_message(&r).contains("not valid JSON"));
    assert!(decode.seen().is_empty());

    // The pool grows: once the file lists the pod, the sidecar uses it.
    write_pool(&pool, &[decode.addr, outsider.addr]);
    let (client2, sidecar_addr, body2) = (client.clone(), sidecar.addr, body.clone());
    let named2 = named.clone();
    infermesh_testkit::wait_until_async("the reloaded allowlist", Duration::from_secs(10), || {
        let (c, b, n) = (client2.clone(), body2.clone(), named2.clone());
        async move {
            post(
                &c,
                sidecar_addr,
                "/v1/completions",
                b,
                &[("x-prefiller-host-port", n.as_str())],
            )
            .await
            .status
                == 200
        }
    })
    .await;
    assert_eq!(outsider.seen().last().unwrap().body["max_tokens"], 1);

    // A KV source in the pool: decode-only, with kv_transfer_params rebuilt to the pull.
    let r = post(
        &client,
        sidecar.addr,
        "/v1/completions",
        json!({"model": model, "prompt": "y", "max_tokens": 2,
            "kv_transfer_params": {"do_remote_prefill": true}})
        .to_string(),
        &[("x-kv-cache-source-host-port", named.as_str())],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let last = decode.seen().last().unwrap().body.clone();
    let params = &last["kv_transfer_params"];
    assert_eq!(
        params.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["remote_kv_source"]
    );
    assert_eq!(params["remote_kv_source"]["remote_host"], "127.0.0.1");
    assert_eq!(params["remote_kv_source"]["remote_port"], 7777);

    sidecar.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_protection_with_another_pools_file_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    write_pool(&pool, &["127.0.0.1:9".parse().unwrap()]);
    let mut cfg = config("127.0.0.1:9".parse().unwrap());
    cfg.ssrf = Some(PoolSource {
        pool: "other".into(),
        endpoints_file: pool,
    });
    let e = Sidecar::start(cfg).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("other") && msg.contains("llama"), "{msg}");
}

/// The scheduler config of the P/D tests: every request is split, decode pods are the
/// primary destination, the prefill pod goes in `x-prefiller-host-port`.
const PD_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}]
";

fn pod(address: SocketAddr, name: &str, role: &str) -> infermesh_node::pool_model::EndpointSpec {
    infermesh_node::pool_model::EndpointSpec {
        address,
        pod: name.into(),
        labels: [("llm-d.ai/role".to_owned(), role.to_owned())].into(),
        engine: infermesh_node::pool_model::Engine::Vllm,
    }
}

/// A client → Envoy (ext_proc: an infermesh node picks decode and prefill pods) → the
/// decode pod's sidecar → prefill sim, then decode sim; and the same through the node's
/// own proxy. The client header naming a prefiller is the router's to set, not the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handoff_through_envoy_and_the_proxy_with_the_node_picking_both_pods() {
    let (fleet, prefill_sim, decode_sim, model) = pd_fleet().await;
    let prefill = Tap::start(Behaviour::Forward(prefill_sim)).await;
    let decode = Tap::start(Behaviour::Forward(decode_sim)).await;
    let decoy = Tap::start(Behaviour::Forward(prefill_sim)).await;
    let dir = tempfile::tempdir().unwrap();
    let pool_file = dir.path().join("pool.yaml");
    // The sidecar listens on a port chosen now, so the pool can name it.
    let sidecar_addr = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    write_pool(&pool_file, &[prefill.addr, sidecar_addr]);
    let mut cfg = config(decode.addr);
    cfg.listen = sidecar_addr;
    cfg.ssrf = Some(PoolSource {
        pool: "llama".into(),
        endpoints_file: pool_file,
    });
    let sidecar = Sidecar::start(cfg).await.expect("sidecar starts");

    let pool = infermesh_node::pool_model::PoolSpec {
        name: "llama".into(),
        endpoints: vec![
            pod(prefill.addr, "prefill-0", "prefill"),
            pod(sidecar.addr, "decode-0", "decode"),
        ],
        models: vec![model.clone()],
        ..Default::default()
    };
    let scheduler = infermesh_scheduler::load_config(PD_CONFIG).expect("P/D config loads");
    let node_cfg =
        infermesh_node::config::NodeConfig::local(pool, scheduler).expect("valid node config");
    let node = infermesh_node::app::App::start(node_cfg)
        .await
        .expect("node starts");
    assert!(
        node.wait_ready(2, Duration::from_secs(15)).await,
        "both pods (the decode one through its sidecar) answer a scrape"
    );
    let client = http_client(Duration::from_secs(2));
    let envoy = support::start_envoy(node.ext_proc_addr, &[prefill.addr, sidecar.addr]).await;

    let entries = [
        ("envoy", envoy.addr),
        ("proxy", node.proxy_addr.expect("proxy enabled")),
    ];
    let decoy_name = decoy.addr.to_string();
    for (round, (via, entry)) in entries.into_iter().enumerate() {
        let request = json!({"model": model, "prompt": format!("Round {round}: tell me about P/D."),
            "max_tokens": 6, "stream": true});
        let r = post(
            &client,
            entry,
            "/v1/completions",
            request.to_string(),
            // A client trying to choose the prefiller: the router drops it.
            &[("x-prefiller-host-port", decoy_name.as_str())],
        )
        .await;
        assert_eq!(r.status, 200, "{via}: {:?}", r.body);
        let (events, done) = sse_events(&r.body);
        assert!(done && !events.is_empty(), "{via}: {:?}", r.body);
        let served = r
            .header("x-upstream-host")
            .or_else(|| r.header("x-gateway-destination-endpoint-served"))
            .expect("the serving pod is named");
        assert_eq!(served, sidecar.addr.to_string(), "{via}: decode pod serves");

        let completions = |t: &Tap| -> Vec<Seen> {
            t.seen()
                .into_iter()
                .filter(|s| s.path == "/v1/completions")
                .collect()
        };
        let p = completions(&prefill);
        assert_eq!(p.len(), round + 1, "{via}: one prefill per request");
        let p = p.last().unwrap();
        assert_eq!(p.body["prompt"], request["prompt"]);
        assert_eq!(p.body["max_tokens"], 1);
        assert_eq!(p.body["kv_transfer_params"]["do_remote_decode"], true);
        let d = completions(&decode);
        assert_eq!(d.len(), round + 1, "{via}: one decode per request");
        assert_eq!(
            d.last().unwrap().body["kv_transfer_params"],
            p.answer.as_ref().unwrap()["kv_transfer_params"],
            "{via}: decode got the prefiller's params"
        );
        assert!(
            completions(&decoy).is_empty(),
            "{via}: the client's prefiller was never contacted"
        );
    }

    drop(envoy);
    node.shutdown(Duration::from_secs(5)).await;
    sidecar.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}

/// Two encode sims, a prefill sim and a decode sim (instant), in that order.
async fn epd_fleet() -> (Fleet, Vec<SocketAddr>, String) {
    let mut cfg = FleetConfig::new(4);
    cfg.profile = EngineProfile::instant();
    cfg.roles = vec![
        PodRole::Encode,
        PodRole::Encode,
        PodRole::Prefill,
        PodRole::Decode,
    ];
    let model = cfg.model.clone();
    let fleet = Fleet::start(cfg).await.expect("sims start");
    let addrs = fleet.addrs();
    (fleet, addrs, model)
}

/// A counter of a sim's `/metrics` (summed over label sets).
async fn sim_counter(client: &HttpClient, sim: SocketAddr, name: &str) -> f64 {
    let r = support::get(client, sim, "/metrics").await.unwrap();
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn image_chat(model: &str, urls: &[&str]) -> Value {
    let mut content = vec![json!({"type": "text", "text": "What differs between these?"})];
    content.extend(
        urls.iter()
            .map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
    );
    json!({"model": model, "max_tokens": 4, "stream": true,
        "messages": [{"role": "user", "content": content}],
        // A client claiming its images are encoded already: dropped.
        "ec_transfer_params": {"mm_hashes": ["0000000000000001"]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_prefill_decode_sends_each_image_to_an_encoder_and_their_outputs_on() {
    let (fleet, sims, model) = epd_fleet().await;
    let enc0 = Tap::start(Behaviour::Forward(sims[0])).await;
    let enc1 = Tap::start(Behaviour::Forward(sims[1])).await;
    let prefill = Tap::start(Behaviour::Forward(sims[2])).await;
    let decode = Tap::start(Behaviour::Forward(sims[3])).await;
    let outsider = Tap::start(Behaviour::Forward(sims[0])).await;
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    write_pool(&pool, &[enc0.addr, enc1.addr, prefill.addr, decode.addr]);
    let mut cfg = config(decode.addr);
    cfg.ssrf = Some(PoolSource {
        pool: "llama".into(),
        endpoints_file: pool,
    });
    let sidecar = Sidecar::start(cfg).await.expect("sidecar starts");
    let client = http_client(Duration::from_secs(2));
    let encoders = format!("{},{}", enc0.addr, enc1.addr);
    let prefiller = prefill.addr.to_string();
    let urls = ["http://img/a.png", "http://img/b.png", "http://img/c.png"];
    let request = image_chat(&model, &urls);

    // An encoder outside the pool: refused before anything is sent.
    let with_outsider = format!("{},{}", enc0.addr, outsider.addr);
    let r = post(
        &client,
        sidecar.addr,
        "/v1/chat/completions",
        request.to_string(),
        &[("x-encoder-hosts-ports", with_outsider.as_str())],
    )
    .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(error_message(&r).contains(&outsider.addr.to_string()));
    assert!(outsider.seen().is_empty() && enc0.seen().is_empty() && decode.seen().is_empty());

    let r = post(
        &client,
        sidecar.addr,
        "/v1/chat/completions",
        request.to_string(),
        &[
            ("x-encoder-hosts-ports", encoders.as_str()),
            ("x-prefiller-host-port", prefiller.as_str()),
            ("x-request-id", "epd-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let (events, done) = sse_events(&r.body);
    assert!(done && !events.is_empty(), "{:?}", r.body);

    // Items 0 and 2 went to the first encoder, item 1 to the second, one image each.
    let (e0, e1) = (enc0.seen(), enc1.seen());
    assert_eq!((e0.len(), e1.len()), (2, 1));
    let sent_url = |s: &Seen| s.body["messages"][0]["content"][0]["image_url"]["url"].clone();
    // The items are sent at once, so the first encoder may see its two in either order.
    let mut at_e0 = [sent_url(&e0[0]), sent_url(&e0[1])];
    at_e0.sort_by_key(|v| v.to_string());
    assert_eq!(at_e0, [json!(urls[0]), json!(urls[2])]);
    assert_eq!(sent_url(&e1[0]), urls[1]);
    for s in e0.iter().chain(&e1) {
        assert_eq!(s.path, "/v1/chat/completions");
        assert_eq!(s.body["messages"].as_array().unwrap().len(), 1);
        assert_eq!(
            s.body["messages"][0]["content"].as_array().unwrap().len(),
            1,
            "no text"
        );
        assert_eq!(
            (s.body["max_tokens"].clone(), s.body["stream"].clone()),
            (json!(1), json!(false))
        );
        assert!(
            s.body.get("ec_transfer_params").is_none(),
            "the client's handles are dropped"
        );
        assert!(
            s.headers["x-request-id"]
                .to_str()
                .unwrap()
                .starts_with("epd-1-enc-"),
            "{:?}",
            s.headers
        );
    }
    let mut hashes: Vec<Value> = Vec::new();
    let by_url = |u: &str| e0.iter().find(|s| sent_url(s) == u).unwrap();
    for s in [by_url(urls[0]), &e1[0], by_url(urls[2])] {
        let p = &s.answer.as_ref().expect("the encoder answered JSON")["ec_transfer_params"];
        hashes.extend(p["mm_hashes"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(hashes.len(), 3);

    // Prefill and decode got every encoder's handles, in item order.
    let (p, d) = (prefill.seen(), decode.seen());
    assert_eq!((p.len(), d.len()), (1, 1));
    assert_eq!(p[0].body["ec_transfer_params"]["mm_hashes"], json!(hashes));
    assert_eq!(
        p[0].body["ec_transfer_params"]["encoders"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        d[0].body["ec_transfer_params"],
        p[0].body["ec_transfer_params"]
    );
    assert_eq!(d[0].body["kv_transfer_params"]["do_remote_prefill"], true);

    // The encoders ran their vision encoder; the prefill pod used their output and
    // encoded nothing; the decode pod pulled the KV and had nothing to encode.
    let queries = "vllm:mm_cache_queries_total";
    let remote = "infermesh_sim:remote_encoded_images_total";
    assert_eq!(sim_counter(&client, sims[0], queries).await, 2.0);
    assert_eq!(sim_counter(&client, sims[1], queries).await, 1.0);
    assert_eq!(sim_counter(&client, sims[2], queries).await, 0.0);
    assert_eq!(sim_counter(&client, sims[2], remote).await, 3.0);
    assert_eq!(sim_counter(&client, sims[3], queries).await, 0.0);

    // E/D: no prefiller, the decode pod computes the prompt with the encoders' output.
    let r = post(
        &client,
        sidecar.addr,
        "/v1/chat/completions",
        image_chat(&model, &["http://img/d.png"]).to_string(),
        &[("x-encoder-hosts-ports", encoders.as_str())],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(sim_counter(&client, sims[3], remote).await, 1.0);
    assert_eq!(
        sim_counter(&client, sims[3], queries).await,
        0.0,
        "decode skipped encode"
    );

    // Without encoders the decode pod encodes the image itself.
    let r = post(
        &client,
        sidecar.addr,
        "/v1/chat/completions",
        image_chat(&model, &["http://img/e.png"]).to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        sim_counter(&client, sims[3], queries).await,
        1.0,
        "decode paid encode"
    );

    sidecar.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_encoder_is_retried_then_named_in_a_502() {
    let (fleet, sims, model) = epd_fleet().await;
    let good = Tap::start(Behaviour::Forward(sims[0])).await;
    let failing = Tap::start(Behaviour::Fail(StatusCode::SERVICE_UNAVAILABLE)).await;
    let prefill = Tap::start(Behaviour::Forward(sims[2])).await;
    let decode = Tap::start(Behaviour::Forward(sims[3])).await;
    let mut cfg = config(decode.addr);
    cfg.prefill_max_retries = 1;
    let sidecar = Sidecar::start(cfg).await.unwrap();
    let client = http_client(Duration::from_secs(2));
    let encoders = format!("{},{}", good.addr, failing.addr);
    let prefiller = prefill.addr.to_string();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        post(
            &client,
            sidecar.addr,
            "/v1/chat/completions",
            image_chat(&model, &["http://img/a.png", "http://img/b.png"]).to_string(),
            &[
                ("x-encoder-hosts-ports", encoders.as_str()),
                ("x-prefiller-host-port", prefiller.as_str()),
            ],
        ),
    )
    .await
    .expect("the sidecar answers instead of hanging");
    assert_eq!(r.status, 502, "{:?}", r.body);
    let msg = error_message(&r);
    let named = failing.addr.to_string();
    assert!(
        msg.contains("encode")
            && msg.contains(&named)
            && msg.contains("2 attempt")
            && msg.contains("503"),
        "{msg}"
    );
    assert_eq!(failing.seen().len(), 2, "1 attempt + 1 retry");
    assert!(
        prefill.seen().is_empty(),
        "no prefill without the encoder output"
    );
    assert!(decode.seen().is_empty(), "nor a decode");

    sidecar.shutdown(Duration::from_secs(2)).await;
    fleet.shutdown().await;
}
