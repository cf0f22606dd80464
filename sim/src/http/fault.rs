//! Fault injection for chaos tests: `POST /_sim/slowdown {"factor": F}` makes this pod's
//! engine F times slower (1 restores it). Not a vLLM endpoint; namespaced so it cannot
//! collide with one.

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
