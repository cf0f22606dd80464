//! Completions and chat completions: validation, submission to the engine, JSON answers.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openai::*;
use super::sse::SseStream;
use super::submit::{AbortOnDrop, submit};
use super::{PodState, resolve_model};
use crate::engine::{Completion, EngineRequest, KvTransfer, MmItem, check_limits};
use crate::pod::{Event, Input};
use crate::role::PodRole;
use crate::tokenizer::filler_range;

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
    mm: Vec<MmItem>,
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
        mm,
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
    )
    .with_mm(mm);
    Ok(Prepared {
        req,
        model,
        stream,
        include_usage,
        chat,
    })
}

pub(super) async fn completions(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: CompletionRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prepared = r.prompt_tokens_with(&pod.tokenizer).and_then(|prompt| {
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
                mm: Vec::new(),
            },
        )
    });
    match prepared {
        Ok(p) => serve(pod, p).await,
        Err(e) => e.into_response(),
    }
}

pub(super) async fn chat(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: ChatRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let rendered = match r.render(pod.profile.image_tokens) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if pod.role == PodRole::Encode {
        return encode(pod, &r, rendered.images).await;
    }
    let prepared = parse_ec_transfer(&r.ec_transfer_params).and_then(|remote| {
        let mm = rendered
            .images
            .iter()
            .map(|&hash| MmItem {
                hash,
                remote: remote.contains(&hash),
            })
            .collect();
        let prompt = pod.tokenizer.tokenize(&rendered.text)?;
        prepare(
            &pod,
            Ask {
                model: &r.model,
                prompt,
                max_tokens: r.max_completion_tokens.or(r.max_tokens),
                n: r.n,
                kv: &r.kv_transfer_params,
                stream: r.stream,
                stream_options: &r.stream_options,
                chat: true,
                mm,
            },
        )
    });
    match prepared {
        Ok(p) => serve(pod, p).await,
        Err(e) => e.into_response(),
    }
}

/// An encode-role pod's answer to a chat request: it runs only its vision encoder over
/// the request's images (no prompt, no tokens) and answers a chat completion without
/// text whose `ec_transfer_params` names the images it holds encoder output for and where
/// (vLLM's EC connector keys encoder outputs by `mm_hash`). Never streamed.
async fn encode(pod: Arc<PodState>, r: &ChatRequest, images: Vec<u64>) -> Response {
    let model = match resolve_model(&pod, &r.model) {
        Ok((m, _)) => m,
        Err(e) => return e.into_response(),
    };
    if images.is_empty() {
        return ApiError::bad_request(
            "this pod only encodes images: the request has no image_url part",
        )
        .into_response();
    }
    let id = pod.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hashes: Vec<String> = images.iter().map(|&h| mm_hash_hex(h)).collect();
    if pod
        .engine
        .send(Input::SubmitEncode {
            id,
            hashes: images.clone(),
            events: tx,
        })
        .is_err()
    {
        return ApiError::unavailable("engine stopped").into_response();
    }
    let mut guard = AbortOnDrop::new(id, pod.engine.clone());
    let (n, hits) = match rx.recv().await {
        Some(Event::Encoded { images, hits }) => (images, hits),
        Some(Event::Rejected(e)) => {
            guard.armed = false;
            return ApiError::bad_request(e.to_string()).into_response();
        }
        Some(Event::Token { .. } | Event::Done(_)) | None => {
            return ApiError::unavailable("engine stopped").into_response();
        }
    };
    guard.armed = false;
    let prompt_tokens = n * pod.profile.image_tokens;
    let body = serde_json::json!({
        "id": format!("chatcmpl-{:08x}{:016x}", pod.index, id),
        "object": "chat.completion",
        "created": pod.created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
            "total_tokens": prompt_tokens, "prompt_tokens_details": {"cached_tokens": 0}},
        "ec_transfer_params": {
            "mm_hashes": hashes,
            "encoder_cache_hits": hits,
            "remote_engine_id": pod.engine_id(),
            "remote_host": pod.addr.ip().to_string(),
            "remote_port": pod.addr.port(),
        },
    });
    axum::Json(body).into_response()
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
            // Only encode-only requests end this way; this one was not.
            Some(Event::Encoded { .. }) | None => {
                return ApiError::unavailable("engine stopped").into_response();
            }
        }
    }
}
