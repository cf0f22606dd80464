//! infermesh-sim: simulated vLLM model servers, many pods per process.
//!
//! Contract: every pod speaks the OpenAI HTTP API the way vLLM does (completions, chat,
//! streaming, `usage` with cached tokens, vLLM-shaped errors) and exports vLLM's Prometheus
//! metric names, so routers and the benchmark cannot tell it from a real pod except by
//! speed. Behaviour comes from a sans-IO engine per pod ([`engine::Engine`]): continuous
//! batching, KV blocks with a prefix cache, chunked prefill, preemption, LoRA slots and
//! P/D `kv_transfer_params`, timed by an [`EngineProfile`]. The same seed and the same
//! request sequence give the same cache behaviour. [`Fleet`] runs many pods in one process.
//! With [`KvEventsConfig`] each pod publishes its prefix-cache changes as vLLM's KV events
//! (ZMQ, msgpack, with a replay socket), taken from the engine's real cache state.
//! Pods tokenize with a built-in deterministic tokenizer or, on request
//! ([`FleetConfig::tokenizer`]), a HuggingFace `tokenizer.json`, such as the one
//! [`generate_tokenizer_json`] trains.

pub mod engine;
pub mod error;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod pod;
pub mod profile;
pub mod role;
pub mod tokenizer;

pub use error::{SimError, TokenizeError, TokenizerError};
pub use fleet::{DEFAULT_MODEL, Fleet, FleetConfig, KvEventPorts, KvEventsConfig};
pub use profile::EngineProfile;
pub use role::PodRole;
pub use tokenizer::{Tokenizer, generate_tokenizer_json};
