//! Health, models, metrics and the endpoints peer routers call to learn about a pod.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::openai::{ChatMessage, ChatRequest, CompletionRequest, PromptInput, parse_json};
use super::{PodState, resolve_model};
use crate::pod::Input;

pub(super) async fn health() -> StatusCode {
    StatusCode::OK
}

pub(super) async fn version() -> Response {
    axum::Json(serde_json::json!({"version": concat!("infermesh-sim-", env!("CARGO_PKG_VERSION"))}))
        .into_response()
}

pub(super) async fn metrics(State(pod): State<Arc<PodState>>) -> Response {
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

pub(super) async fn models(State(pod): State<Arc<PodState>>) -> Response {
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

pub(super) async fn server_info(State(pod): State<Arc<PodState>>) -> Response {
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

pub(super) async fn model_info(State(pod): State<Arc<PodState>>) -> Response {
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
            ec_transfer_params: None,
        };
        return Ok(pod
            .tokenizer
            .tokenize(&chat.render(pod.profile.image_tokens)?.text)?);
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
    c.prompt_tokens_with(&pod.tokenizer)
}

pub(super) async fn tokenize(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
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

pub(super) async fn render_completion(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: CompletionRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = resolve_model(&pod, &r.model) {
        return e.into_response();
    }
    match r.prompt_tokens_with(&pod.tokenizer) {
        Ok(tokens) => rendered(&pod, &r.model, tokens),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn render_chat(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: ChatRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = resolve_model(&pod, &r.model) {
        return e.into_response();
    }
    let tokens = r
        .render(pod.profile.image_tokens)
        .and_then(|chat| Ok(pod.tokenizer.tokenize(&chat.text)?));
    match tokens {
        Ok(tokens) => rendered(&pod, &r.model, tokens),
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

/// `POST /v1/embeddings` body (the fields the simulator reads).
#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    #[serde(default)]
    model: Option<String>,
    input: PromptInput,
}

/// A deterministic 8-dimensional embedding per input (from its token ids), so routers can
/// be tested on the embeddings path; no KV cache is involved.
pub(super) async fn embeddings(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: EmbeddingRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let model = match resolve_model(&pod, &r.model) {
        Ok((m, _)) => m,
        Err(e) => return e.into_response(),
    };
    let inputs: Result<Vec<Vec<u32>>, _> = match r.input {
        PromptInput::Text(s) => pod.tokenizer.tokenize(&s).map(|t| vec![t]),
        PromptInput::Texts(v) => v.iter().map(|s| pod.tokenizer.tokenize(s)).collect(),
        PromptInput::Tokens(t) => Ok(vec![t]),
        PromptInput::TokenLists(v) => Ok(v),
    };
    let inputs = match inputs {
        Ok(i) => i,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let data: Vec<serde_json::Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, tokens)| {
            let mut v = [0f32; 8];
            for (j, t) in tokens.iter().enumerate() {
                v[j % 8] += (*t % 1000) as f32 / 1000.0;
            }
            serde_json::json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    axum::Json(serde_json::json!({
        "object": "list",
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response()
}
