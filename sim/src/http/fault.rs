//! Fault injection for chaos tests: `POST /_sim/slowdown {"factor": F}` makes this pod's
//! engine F times slower (1 restores it). Not a vLLM endpoint; namespaced so it cannot
//! collide with one. Also vLLM's own `POST /reset_prefix_cache`, which empties the prefix
//! cache (an `AllBlocksCleared` KV event).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::PodState;
use super::error::ApiError;
use super::openai::parse_json;
use crate::pod::Input;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlowdownRequest {
    factor: f64,
}

pub(super) async fn slowdown(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let r: SlowdownRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = oneshot::channel();
    if pod.engine.send(Input::Slowdown(r.factor, tx)).is_err() {
        return ApiError::unavailable("engine stopped").into_response();
    }
    match rx.await {
        Ok(true) => axum::Json(serde_json::json!({"factor": r.factor})).into_response(),
        Ok(false) => ApiError::bad_request(format!(
            "`factor` must be a positive number, got {}",
            r.factor
        ))
        .into_response(),
        Err(_) => ApiError::unavailable("engine stopped").into_response(),
    }
}

/// vLLM's `POST /reset_prefix_cache`: 200 when the cache was emptied. vLLM's engine refuses
/// (logs and keeps the cache) while requests hold blocks; the simulator says so with a 409
/// instead of a silent 200, so a test cannot mistake a refused reset for a done one.
pub(super) async fn reset_prefix_cache(State(pod): State<Arc<PodState>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if pod.engine.send(Input::ResetPrefixCache(tx)).is_err() {
        return ApiError::unavailable("engine stopped").into_response();
    }
    match rx.await {
        Ok(true) => axum::http::StatusCode::OK.into_response(),
        Ok(false) => {
            ApiError::conflict("the prefix cache is in use by running requests").into_response()
        }
        Err(_) => ApiError::unavailable("engine stopped").into_response(),
    }
}
