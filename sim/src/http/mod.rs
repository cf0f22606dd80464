//! One pod's HTTP surface: the OpenAI API as vLLM serves it (completions, chat,
//! embeddings), `/metrics`, health, and the
//! extra endpoints peer routers call (`/server_info`, `/model_info`, `/tokenize`,
//! `/v1/completions/render`), and vLLM's `POST /reset_prefix_cache`.

pub mod error;
mod fault;
mod generate;
mod info;
pub mod openai;
mod sse;
mod submit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;

use crate::engine::SubmitError;
use crate::pod::Input;
use crate::profile::EngineProfile;
use crate::role::PodRole;
use crate::tokenizer::Tokenizer;
use error::ApiError;

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
    /// How prompts become token ids.
    pub tokenizer: Tokenizer,
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
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions/render", post(info::render_completion))
        .route("/v1/chat/completions/render", post(info::render_chat))
        .route("/v1/embeddings", post(info::embeddings))
        .route("/tokenize", post(info::tokenize))
        .route("/v1/models", get(info::models))
        .route("/health", get(info::health))
        .route("/health_generate", get(info::health))
        .route("/ping", get(info::health))
        .route("/version", get(info::version))
        .route("/metrics", get(info::metrics))
        .route("/server_info", get(info::server_info))
        .route("/get_server_info", get(info::server_info))
        .route("/model_info", get(info::model_info))
        .route("/get_model_info", get(info::model_info))
        .route("/_sim/slowdown", post(fault::slowdown))
        .route("/reset_prefix_cache", post(fault::reset_prefix_cache))
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

impl From<crate::error::TokenizeError> for ApiError {
    fn from(e: crate::error::TokenizeError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}
