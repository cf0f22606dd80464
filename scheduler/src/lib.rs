//! infermesh-scheduler: the IO-free Endpoint Picker core.
//!
//! Contract: given a request, candidate endpoint snapshots, the time (`now`) and a
//! caller-owned RNG, [`Scheduler::schedule`] decides — the same inputs and seed give the
//! same pick. The crate does no IO, spawns nothing and never reads a clock. Plugin names,
//! parameters, defaults and formulas follow llm-d's EPP, so an llm-d `EndpointPickerConfig`
//! loads with [`load_config`] and routes the same way. State that outlives a cycle (the
//! prefix index, no-hit LRU) lives inside the [`Scheduler`] behind per-shard locks and is
//! updated by [`Scheduler::pre_request`].

pub mod config;
pub mod model;
pub mod openai;
pub mod plugins;
pub mod prefix;
pub mod scheduler;

pub use config::{ConfigError, Location, ResolvedConfig, load_config};
pub use model::{Endpoint, InFlight, InferenceRequest, LoraState, Metrics, Role};
pub use openai::{ApiKind, InvalidRequest, ParsedBody, parse_openai};
pub use prefix::PrefixMatches;
pub use scheduler::{
    PrefixChain, PrefixMatchSummary, PrefixSource, ProfileResult, Rejected, ScheduleError,
    Scheduler, SchedulingResult,
};
