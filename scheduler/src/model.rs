//! The facts a scheduling cycle reads: endpoints with their metrics snapshots, and requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// The pod label llm-d reads the P/D role from.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

/// An endpoint's disaggregation role, from the `llm-d.ai/role` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// No role label: the pod serves everything.
    #[default]
    Unset,
    /// `prefill`
    Prefill,
    /// `decode`
    Decode,
    /// `prefill-decode`
    PrefillDecode,
    /// `both`
    Both,
    /// `encode`
    Encode,
    /// `encode-prefill`
    EncodePrefill,
    /// `encode-prefill-decode`
    EncodePrefillDecode,
    /// Any other label value (kept so filters can report it).
    Other(String),
}

impl Role {
    /// Parses a role label value the way llm-d spells them.
    pub fn parse(value: &str) -> Role {
        match value {
            "prefill" => Role::Prefill,
            "decode" => Role::Decode,
            "prefill-decode" => Role::PrefillDecode,
            "both" => Role::Both,
            "encode" => Role::Encode,
            "encode-prefill" => Role::EncodePrefill,
            "encode-prefill-decode" => Role::EncodePrefillDecode,
            "" => Role::Unset,
            other => Role::Other(other.to_owned()),
        }
    }

    /// Reads the role from a pod's labels (`llm-d.ai/role`).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Role {
        labels
            .get(ROLE_LABEL)
            .map_or(Role::Unset, |v| Role::parse(v))
    }
}

/// LoRA adapter state from `vllm:lora_requests_info`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoraState {
    /// Adapters currently loaded and running.
    pub running: Vec<String>,
    /// Adapters requested but waiting for a slot.
    pub waiting: Vec<String>,
    /// Maximum adapters the server holds at once (`max_lora`).
    pub max_lora: u32,
}

/// One scrape of a pod's `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// When the scrape completed (staleness is measured from here).
    pub scraped_at: Instant,
    /// `vllm:num_requests_waiting`
    pub waiting_queue: u32,
    /// `vllm:num_requests_running`
    pub running: u32,
    /// `vllm:kv_cache_usage_perc`, 0.0..=1.0
    pub kv_cache_usage: f64,
    /// LoRA state, when the server reports it.
    pub lora: Option<LoraState>,
    /// Tokens per KV block (`vllm:cache_config_info` `block_size`).
    pub cache_block_size: Option<u32>,
    /// KV blocks on the GPU (`vllm:cache_config_info` `num_gpu_blocks`).
    pub cache_num_blocks: Option<u64>,
}

impl Metrics {
    /// A zeroed snapshot taken at `now` (handy for tests and simulators).
    pub fn idle(now: Instant) -> Metrics {
        Metrics {
            scraped_at: now,
            waiting_queue: 0,
            running: 0,
            kv_cache_usage: 0.0,
            lora: None,
            cache_block_size: None,
            cache_num_blocks: None,
        }
    }
}

/// Requests dispatched to an endpoint and not yet completed (kept by the caller's load board).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InFlight {
    /// Number of requests in flight.
    pub requests: u32,
    /// Estimated prompt tokens of those requests.
    pub tokens: u64,
    /// Those requests whose first token has not come back yet: they are in the model
    /// server's queue or prefill, and a request added now waits behind their prefill.
    pub prefilling: u32,
}

/// A model-server endpoint as a scheduling cycle sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// `ip:port` — the endpoint's identity.
    pub address: SocketAddr,
    /// Pod labels, shared with the pool's record of the pod: every request builds its
    /// candidates, and cloning a map per candidate per request was the proxy's top allocation.
    pub labels: Arc<BTreeMap<String, String>>,
    /// P/D role from `llm-d.ai/role`.
    pub role: Role,
    /// Latest scrape; `None` = never scraped.
    pub metrics: Option<Metrics>,
    /// Fleet-wide in-flight load.
    pub in_flight: InFlight,
}

impl Endpoint {
    /// An endpoint with the given address and labels (role derived), no metrics.
    pub fn new(address: SocketAddr, labels: BTreeMap<String, String>) -> Endpoint {
        let role = Role::from_labels(&labels);
        Endpoint {
            address,
            labels: Arc::new(labels),
            role,
            metrics: None,
            in_flight: InFlight::default(),
        }
    }
}

/// The fairness id llm-d uses when a request names none.
pub const DEFAULT_FAIRNESS_ID: &str = "default-flow";

/// A request to schedule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InferenceRequest {
    /// `x-request-id` (or a generated id).
    pub id: String,
    /// The model as the client sent it.
    pub model: String,
    /// The model after rewrite (equals `model` when none applies); seeds the prefix hash.
    pub target_model: String,
    /// Exactly the bytes llm-d hashes: the completions prompt text, or the chat messages' JSON.
    pub prompt_bytes: Vec<u8>,
    /// Whether the client asked for SSE streaming.
    pub stream: bool,
    /// `max_tokens` / `max_completion_tokens`.
    pub max_tokens: Option<u32>,
    /// Request headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// Priority from the InferenceObjective (0 when none); negative = sheddable.
    pub priority: i32,
    /// Flow-control fairness key.
    pub fairness_id: String,
    /// OpenAI `cache_salt`, folded into the first prefix hash.
    pub cache_salt: Option<String>,
    /// The prompt carries multimodal items (read by `always-disagg-multimodal-decider`).
    pub multimodal: bool,
    /// The prompt's token ids from the token producer (precise prefix matching only).
    pub prompt_tokens: Option<std::sync::Arc<[u32]>>,
}

impl InferenceRequest {
    /// Whether the request may be shed under saturation (llm-d: priority < 0).
    pub fn is_sheddable(&self) -> bool {
        self.priority < 0
    }

    /// Whether the client sent `Prefer: if-available` (RFC 7240): the bare token, in any
    /// case, among comma-separated preferences, ignoring `;` parameters, as llm-d reads it.
    pub fn prefers_if_available(&self) -> bool {
        self.headers.get(PREFER_HEADER).is_some_and(|v| {
            v.split(',').any(|pref| {
                let token = pref.split(';').next().unwrap_or("");
                token.trim().eq_ignore_ascii_case(PREFER_IF_AVAILABLE)
            })
        })
    }
}

/// The RFC 7240 `Prefer` request header (lower case, as headers are stored).
pub const PREFER_HEADER: &str = "prefer";
/// The preference asking for a decode pod that already caches the prompt, else 412.
pub const PREFER_IF_AVAILABLE: &str = "if-available";
