//! infermesh-scheduler: the IO-free Endpoint Picker core.
//!
//! Contract: given a request, candidate endpoint snapshots, the time (`now`) and a
//! caller-owned RNG, [`Scheduler::schedule`] decides — the same inputs and seed give the
//! same pick. The crate does no IO, spawns nothing and never reads a clock. Plugin names,
//! parameters, defaults and formulas follow llm-d's EPP, so an llm-d `EndpointPickerConfig`
//! loads with [`load_config`] and routes the same way. State that outlives a cycle (the
//! prefix index, no-hit LRU) lives inside the [`Scheduler`] behind per-shard locks and is
//! updated by [`Scheduler::pre_request`].
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Instant;
//! use infermesh_scheduler::*;
//! use rand::SeedableRng;
//!
//! let cfg = load_config("")?; // empty = llm-d's built-in default profile
//! let scheduler = Scheduler::new(&cfg)?;
//! let body = parse_openai(ApiKind::Completions, br#"{"model":"m","prompt":"hello"}"#)?;
//! let req = InferenceRequest {
//!     id: "r1".into(),
//!     target_model: body.model.clone(),
//!     model: body.model,
//!     prompt_bytes: body.prompt_bytes,
//!     fairness_id: model::DEFAULT_FAIRNESS_ID.into(),
//!     ..InferenceRequest::default()
//! };
//! let now = Instant::now();
//! let mut pod = Endpoint::new("10.0.0.7:8000".parse()?, BTreeMap::new());
//! pod.metrics = Some(Metrics::idle(now));
//! let pods = vec![pod];
//! scheduler.admit(&req, &pods, now)?;
//! let mut rng = rand::rngs::StdRng::seed_from_u64(1);
//! let result = scheduler.schedule(&req, &pods, now, &mut rng)?;
//! assert_eq!(result.header_value(), "10.0.0.7:8000");
//! scheduler.pre_request(&req, &result, now); // record the prefix at the picked pod
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod flow;
pub mod model;
pub mod openai;
pub mod parsers;
pub mod plugins;
pub mod prefix;
pub mod scheduler;

pub use config::{ConfigError, Location, ResolvedConfig, load_config};
pub use model::{Endpoint, InFlight, InferenceRequest, LoraState, Metrics, Role};
pub use openai::{
    ApiKind, InvalidRequest, ParsedBody, body_parses_on_this_thread, parse_openai, replace_model,
};
pub use parsers::{NoParser, ParserType, RequestParsers};
pub use plugins::profiles::DisaggDecision;
pub use prefix::PrefixMatches;
pub use scheduler::{
    CandidateScores, DecisionCounter, DecisionFamily, PrefixChain, PrefixMatchSummary,
    PrefixSource, ProfileResult, Rejected, ScheduleError, Scheduler, SchedulingResult,
};
