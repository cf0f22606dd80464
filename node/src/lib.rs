//! The infermesh node: wiring around the IO-free scheduler.
//!
//! Contract: a node discovers a pool's endpoints (a watched file), scrapes each one's
//! `/metrics` (vLLM or SGLang names), and routes requests two ways through one shared
//! request path ([`dispatch`]): as an Envoy ext_proc Endpoint Picker speaking the Gateway
//! API Inference Extension protocol ([`extproc`]), and as a standalone OpenAI-compatible
//! proxy ([`proxy`]). Request handlers read immutable snapshots (pool, policy); each piece
//! of mutable state has one owning task. Algorithms live in `infermesh-scheduler`.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod exit;
pub mod extproc;
pub mod file_discovery;
pub mod k8s;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod policy_store;
pub mod pool;
pub mod pool_model;
pub mod pool_task;
pub mod proxy;
pub mod request;
pub mod restore;
pub mod scrape;
pub mod serve;
pub mod sidecar;
pub mod status_page;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod usage;
pub mod xds;
