//! infermesh-bench: end-to-end benchmarks of OpenAI-compatible LLM endpoints.
//!
//! Contract: [`run`] sends a seeded, deterministic workload ([`Workload`]) to a
//! [`Target`] (a router URL, client-side round robin over pods, or a spread over router
//! replicas, health-checked as an L4 balancer would) as open-loop Poisson
//! or closed-loop load, bounded by a request count and a duration so it always stops,
//! and returns a [`Report`]: TTFT / ITL / E2E percentiles from streamed responses (TTFT
//! is the first SSE chunk with content), throughput, goodput under a TTFT SLO, error and
//! 429 rates, the fleet prefix-cache hit rate from the pods' vLLM counters, the spread
//! of requests over pods, and the oracle bound of the hit rate for the requests sent.
//! Every figure is measured or computed from the workload; none is configured.

pub mod classes;
mod cli;
mod client;
mod error;
mod health;
pub mod ideal;
pub mod oracle;
mod plot;
mod report;
mod run;
pub mod scrape;
mod spec;
pub mod sse;
pub mod stats;
mod timeline;
pub mod workload;

pub use cli::{ApiArg, Cli, Command, RunArgs, WorkloadKind, run_cli};
pub use client::FailureKind;
pub use error::BenchError;
pub use oracle::{BLOCK_TOKENS, OracleBound, oracle_bound};
pub use plot::plot_ttft_vs_qps;
pub use report::{Report, load_reports, markdown_table, save_reports};
pub use run::{run, run_with_timeline};
pub use spec::{Api, HEALTH_CHECK_INTERVAL, HOLD_DOWN, Load, RunSpec, Target};
pub use stats::LatencySummary;
pub use timeline::{RequestTiming, Timeline};
pub use workload::{
    LongContextSpec, MultiTurnSpec, PlannedRequest, Popularity, SharedPrefixSpec, Workload,
};
