//! One pod's HTTP surface: the OpenAI API as vLLM serves it, `/metrics`, health, and the
//! extra endpoints peer routers call (`/server_info`, `/model_info`, `/tokenize`,
//! `/v1/completions/render`).

pub mod error;
pub mod openai;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{
    Completion, EngineRequest, FinishReason, KvTransfer, PodRole, SubmitError, check_limits,
};
use crate::pod::{Event, Input};
use crate::profile::EngineProfile;
use crate::tokenizer::{self, filler_range, filler_text};
use error::ApiError;
use openai::*;

/// What every handler of one pod shares.
#[derive(Debug)]
pub struct PodState {
    /// Pod index in the fleet.
    pub index: usize,
    /// Bound address.
    pub addr: SocketAddr,
    /// Served model name.
    pub model: String,
    /// LoRA adapters served next to the base model.
    pub lora_adapters: Vec<String>,
    /// The pod's constants.
    pub profile: EngineProfile,
    /// P/D role.
    pub role: PodRole,
    /// Channel to the engine task.
    pub engine: mpsc::UnboundedSender<Input>,
    /// Next request id.
    pub next_id: AtomicU64,
    /// Unix seconds at start (`created` fields).
    pub created: u64,
}

impl PodState {
    /// The engine id reported in `kv_transfer_params` (one per pod).
    pub fn engine_id(&self) -> String {
        format!("infermesh-sim-pod-{}", self.index)
    }
}

/// Largest request body accepted (long-context prompts are hundreds of KB).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// The pod's routes.
pub fn router(state: Arc<PodState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions/render", post(render_completion))
        .route("/v1/chat/completions/render", post(render_chat))
        .route("/tokenize", post(tokenize))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/health_generate", get(health))
        .route("/ping", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/server_info", get(server_info))
        .route("/get_server_info", get(server_info))
        .route("/model_info", get(model_info))
        .route("/get_model_info", get(model_info))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"detail": "Not Found"})),
    )
        .into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn version() -> Response {
    axum::Json(serde_json::json!({"version": concat!("infermesh-sim-", env!("CARGO_PKG_VERSION"))}))
        .into_response()
}

async fn metrics(State(pod): State<Arc<PodState>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if pod.engine.send(Input::Metrics(tx)).is_err() {
        return ApiError::unavailable("engine stopped").into_response();
    }
    match rx.await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::unavailable("engine stopped").into_response(),
    }
}

async fn models(State(pod): State<Arc<PodState>>) -> Response {
    let mut data = vec![serde_json::json!({
        "id": pod.model, "object": "model", "created": pod.created, "owned_by": "vllm",
        "root": pod.model, "parent": null, "max_model_len": pod.profile.max_model_len,
    })];
    for l in &pod.lora_adapters {
        data.push(serde_json::json!({
            "id": l, "object": "model", "created": pod.created, "owned_by": "vllm",
            "root": l, "parent": pod.model, "max_model_len": null,
        }));
    }
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn server_info(State(pod): State<Arc<PodState>>) -> Response {
    let p = &pod.profile;
    axum::Json(serde_json::json!({
        "model_path": pod.model,
        "served_model_name": pod.model,
        "tokenizer_path": pod.model,
        "block_size": p.block_size,
        "page_size": p.block_size,
        "num_gpu_blocks": p.num_gpu_blocks,
        "max_num_seqs": p.max_num_seqs,
        "max_num_batched_tokens": p.max_num_batched_tokens,
        "max_model_len": p.max_model_len,
        "context_length": p.max_model_len,
        "max_loras": p.max_loras,
        "lora_adapters": pod.lora_adapters,
        "role": pod.role.as_str(),
        "profile": p.name,
        "engine_id": pod.engine_id(),
        "dp_size": 1,
        "tp_size": 1,
        "version": concat!("infermesh-sim-", env!("CARGO_PKG_VERSION")),
    }))
    .into_response()
}

async fn model_info(State(pod): State<Arc<PodState>>) -> Response {
    axum::Json(serde_json::json!({
        "model_path": pod.model,
        "tokenizer_path": pod.model,
        "is_generation": true,
        "preferred_sampling_params": null,
        "weight_version": "default",
        "has_image_understanding": false,
        "has_audio_understanding": false,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "max_model_len": pod.profile.max_model_len,
    }))
    .into_response()
}

/// Resolves the requested model to the base model or a LoRA adapter index.
fn resolve_model(
    pod: &PodState,
    model: &Option<String>,
) -> Result<(String, Option<u32>), ApiError> {
    match model {
        None => Ok((pod.model.clone(), None)),
        Some(m) if *m == pod.model => Ok((m.clone(), None)),
        Some(m) => match pod.lora_adapters.iter().position(|l| l == m) {
            Some(i) => Ok((m.clone(), Some(i as u32))),
            None => Err(ApiError::not_found(format!(
                "The model `{m}` does not exist."
            ))),
        },
    }
}

/// A request ready for the engine plus what the response needs.
struct Prepared {
    req: EngineRequest,
    model: String,
    stream: bool,
    include_usage: bool,
    chat: bool,
}

/// The parts of a completion or chat request the engine and response need.
struct Ask<'a> {
    model: &'a Option<String>,
    prompt: Vec<u32>,
    max_tokens: Option<i64>,
    n: Option<i64>,
    kv: &'a Option<serde_json::Value>,
    stream: Option<bool>,
    stream_options: &'a Option<StreamOptions>,
    chat: bool,
}

fn prepare(pod: &PodState, ask: Ask<'_>) -> Result<Prepared, ApiError> {
    let Ask {
        model,
        prompt,
        max_tokens,
        n,
        kv,
        stream,
        stream_options,
        chat,
    } = ask;
    let (model, lora) = resolve_model(pod, model)?;
    check_n(n)?;
    let p = &pod.profile;
    let room = p.max_model_len.saturating_sub(prompt.len());
    let (max_tokens, finish) = resolve_max_tokens(max_tokens, p.default_max_tokens, room)?;
    let kv_transfer = parse_kv_transfer(kv)?;
    check_limits(p, prompt.len(), max_tokens).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let stream = stream.unwrap_or(false);
    let include_usage = stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    if !stream && stream_options.is_some() {
        return Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let id = pod.next_id.fetch_add(1, Ordering::Relaxed);
    let req = EngineRequest::new(
        id,
        prompt,
        max_tokens,
        finish,
        lora,
        kv_transfer,
        p.block_size,
    );
    Ok(Prepared {
        req,
        model,
        stream,
        include_usage,
        chat,
    })
}

async fn completions(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: CompletionRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prepared = r.prompt_tokens().and_then(|prompt| {
        prepare(
            &pod,
            Ask {
                model: &r.model,
                prompt,
                max_tokens: r.max_tokens,
                n: r.n,
                kv: &r.kv_transfer_params,
                stream: r.stream,
                stream_options: &r.stream_options,
                chat: false,
            },
        )
    });
    match prepared {
        Ok(p) => serve(pod, p).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: ChatRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prepared = r.prompt_text().and_then(|text| {
        prepare(
            &pod,
            Ask {
                model: &r.model,
                prompt: tokenizer::tokenize(&text),
                max_tokens: r.max_completion_tokens.or(r.max_tokens),
                n: r.n,
                kv: &r.kv_transfer_params,
                stream: r.stream,
                stream_options: &r.stream_options,
                chat: true,
            },
        )
    });
    match prepared {
        Ok(p) => serve(pod, p).await,
        Err(e) => e.into_response(),
    }
}

/// Tells the engine to drop a request whose client went away before it finished.
struct AbortOnDrop {
    id: u64,
    engine: mpsc::UnboundedSender<Input>,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.engine.send(Input::Abort(self.id));
        }
    }
}

fn submit(
    pod: &PodState,
    req: EngineRequest,
) -> Result<(mpsc::UnboundedReceiver<Event>, AbortOnDrop), ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let id = req.id;
    pod.engine
        .send(Input::Submit { req, events: tx })
        .map_err(|_| ApiError::unavailable("engine stopped"))?;
    Ok((
        rx,
        AbortOnDrop {
            id,
            engine: pod.engine.clone(),
            armed: true,
        },
    ))
}

fn kv_params(pod: &PodState, kv: KvTransfer, c: &Completion) -> Option<serde_json::Value> {
    (kv == KvTransfer::RemoteDecode).then(|| {
        serde_json::json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": c.prompt_block_ids,
            "remote_engine_id": pod.engine_id(),
            "remote_host": pod.addr.ip().to_string(),
            "remote_port": pod.addr.port(),
            "tp_size": 1,
        })
    })
}

async fn serve(pod: Arc<PodState>, p: Prepared) -> Response {
    let kv = p.req.kv_transfer;
    let max_tokens = p.req.max_tokens;
    let finish_at_end = p.req.finish;
    let (rx, guard) = match submit(&pod, p.req) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let prefix = if p.chat { "chatcmpl" } else { "cmpl" };
    let id = format!("{prefix}-{:08x}{:016x}", pod.index, guard.id);
    if p.stream {
        let stream = SseStream {
            rx,
            guard,
            id,
            model: p.model,
            created: pod.created,
            chat: p.chat,
            include_usage: p.include_usage,
            max_tokens,
            finish: finish_at_end,
            done: false,
        };
        let body = Body::from_stream(futures::stream::unfold(stream, |mut s| async move {
            s.next_chunk().await.map(|b| (Ok::<_, Infallible>(b), s))
        }));
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let mut rx = rx;
    let mut guard = guard;
    loop {
        match rx.recv().await {
            Some(Event::Token { .. }) => {}
            Some(Event::Done(c)) => {
                guard.armed = false;
                let text = filler_range(0, c.completion_tokens);
                let usage = Usage::new(c.prompt_tokens, c.completion_tokens, c.cached_tokens);
                let kvp = kv_params(&pod, kv, &c);
                let body = if p.chat {
                    serde_json::to_vec(&ChatBody {
                        id: &id,
                        object: "chat.completion",
                        created: pod.created,
                        model: &p.model,
                        choices: vec![ChatChoice {
                            index: 0,
                            message: Some(ChatMessageOut {
                                role: Some("assistant"),
                                content: Some(&text),
                            }),
                            delta: None,
                            logprobs: None,
                            finish_reason: Some(c.finish.as_str()),
                        }],
                        usage: Some(usage),
                        kv_transfer_params: kvp.as_ref(),
                    })
                } else {
                    serde_json::to_vec(&CompletionBody {
                        id: &id,
                        object: "text_completion",
                        created: pod.created,
                        model: &p.model,
                        choices: vec![CompletionChoice {
                            index: 0,
                            text: &text,
                            logprobs: None,
                            finish_reason: Some(c.finish.as_str()),
                            stop_reason: None,
                        }],
                        usage: Some(usage),
                        kv_transfer_params: kvp.as_ref(),
                    })
                };
                return match body {
                    Ok(b) => (
                        [(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        )],
                        b,
                    )
                        .into_response(),
                    Err(e) => ApiError {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        message: e.to_string(),
                    }
                    .into_response(),
                };
            }
            Some(Event::Rejected(e)) => {
                guard.armed = false;
                return ApiError::bad_request(e.to_string()).into_response();
            }
            None => return ApiError::unavailable("engine stopped").into_response(),
        }
    }
}

/// State of one SSE response.
struct SseStream {
    rx: mpsc::UnboundedReceiver<Event>,
    guard: AbortOnDrop,
    id: String,
    model: String,
    created: u64,
    chat: bool,
    include_usage: bool,
    max_tokens: usize,
    finish: FinishReason,
    done: bool,
}

impl SseStream {
    /// The next body frame: every event already delivered, so a burst of tokens (a fast
    /// pod) goes out in one write while a slow pod still streams token by token.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let first = self.rx.recv().await?;
        let mut out = Vec::with_capacity(256);
        self.render(first, &mut out);
        while !self.done {
            match self.rx.try_recv() {
                Ok(ev) => self.render(ev, &mut out),
                Err(_) => break,
            }
        }
        Some(Bytes::from(out))
    }

    fn render(&mut self, ev: Event, out: &mut Vec<u8>) {
        match ev {
            Event::Token { index } => {
                let last = index + 1 >= self.max_tokens;
                let finish = last.then(|| self.finish.as_str());
                if self.chat && index == 0 {
                    // vLLM sends the role with the first output, not before it.
                    self.chat_chunk(out, Some("assistant"), Some(""), None);
                }
                if self.chat {
                    self.chat_chunk(out, None, Some(filler_text(index)), finish);
                } else {
                    self.completion_chunk(out, filler_text(index), finish);
                }
            }
            Event::Done(c) => {
                self.guard.armed = false;
                self.done = true;
                if self.include_usage {
                    let usage = Usage::new(c.prompt_tokens, c.completion_tokens, c.cached_tokens);
                    let r = if self.chat {
                        serde_json::to_writer(
                            sse_start(out),
                            &ChatBody {
                                id: &self.id,
                                object: "chat.completion.chunk",
                                created: self.created,
                                model: &self.model,
                                choices: vec![],
                                usage: Some(usage),
                                kv_transfer_params: None,
                            },
                        )
                    } else {
                        serde_json::to_writer(
                            sse_start(out),
                            &CompletionBody {
                                id: &self.id,
                                object: "text_completion",
                                created: self.created,
                                model: &self.model,
                                choices: vec![],
                                usage: Some(usage),
                                kv_transfer_params: None,
                            },
                        )
                    };
                    if r.is_ok() {
                        out.extend_from_slice(b"\n\n");
                    }
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            Event::Rejected(e) => {
                self.guard.armed = false;
                self.done = true;
                let err = ApiError::bad_request(e.to_string());
                if serde_json::to_writer(sse_start(out), &serde_json::json!({"error": err.body()}))
                    .is_ok()
                {
                    out.extend_from_slice(b"\n\n");
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
        }
    }

    fn completion_chunk(&self, out: &mut Vec<u8>, text: &str, finish: Option<&'static str>) {
        let body = CompletionBody {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish,
                stop_reason: None,
            }],
            usage: None,
            kv_transfer_params: None,
        };
        if serde_json::to_writer(sse_start(out), &body).is_ok() {
            out.extend_from_slice(b"\n\n");
        }
    }

    fn chat_chunk(
        &self,
        out: &mut Vec<u8>,
        role: Option<&'static str>,
        content: Option<&str>,
        finish: Option<&'static str>,
    ) {
        let body = ChatBody {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChatChoice {
                index: 0,
                message: None,
                delta: Some(ChatMessageOut { role, content }),
                logprobs: None,
                finish_reason: finish,
            }],
            usage: None,
            kv_transfer_params: None,
        };
        if serde_json::to_writer(sse_start(out), &body).is_ok() {
            out.extend_from_slice(b"\n\n");
        }
    }
}

fn sse_start(out: &mut Vec<u8>) -> &mut Vec<u8> {
    out.extend_from_slice(b"data: ");
    out
}

/// Body of /tokenize: a completion-style `prompt` or chat `messages`.
#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<PromptInput>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
}

fn tokens_of(pod: &PodState, body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let r: TokenizeRequest = parse_json(body)?;
    resolve_model(pod, &r.model)?;
    if r.messages.is_some() {
        let chat = ChatRequest {
            model: None,
            messages: r.messages,
            max_tokens: None,
            max_completion_tokens: None,
            stream: None,
            stream_options: None,
            n: None,
            kv_transfer_params: None,
        };
        return Ok(tokenizer::tokenize(&chat.prompt_text()?));
    }
    let c = CompletionRequest {
        model: None,
        prompt: r.prompt,
        max_tokens: None,
        stream: None,
        stream_options: None,
        n: None,
        kv_transfer_params: None,
    };
    c.prompt_tokens()
}

async fn tokenize(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    match tokens_of(&pod, &body) {
        Ok(tokens) => axum::Json(serde_json::json!({
            "count": tokens.len(),
            "max_model_len": pod.profile.max_model_len,
            "tokens": tokens,
            "token_strs": null,
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn render_completion(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: CompletionRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = resolve_model(&pod, &r.model) {
        return e.into_response();
    }
    match r.prompt_tokens() {
        Ok(tokens) => rendered(&pod, &r.model, tokens),
        Err(e) => e.into_response(),
    }
}

async fn render_chat(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: ChatRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = resolve_model(&pod, &r.model) {
        return e.into_response();
    }
    match r.prompt_text() {
        Ok(text) => {
            axum::Json(serde_json::json!([{"prompt_token_ids": tokenizer::tokenize(&text)}]))
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The render answer: vLLM's generate-request shape (`token_ids`, which vllm-router reads)
/// plus `prompt_token_ids` for clients of the older shape.
fn rendered(pod: &PodState, model: &Option<String>, tokens: Vec<u32>) -> Response {
    let model = model.as_deref().unwrap_or(&pod.model);
    axum::Json(serde_json::json!([{
        "model": model,
        "token_ids": tokens,
        "prompt_token_ids": tokens,
    }]))
    .into_response()
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}
