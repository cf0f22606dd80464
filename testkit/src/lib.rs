//! Helpers for infermesh's tests and benchmarks, written once: start a real Envoy
//! (`--use-dynamic-base-id`, bootstrapped with ADS only, or from the ext_proc templates in
//! `deploy/envoy/` in front of an EPP server, plaintext or mTLS) and wait for its admin,
//! find the Envoy binary (`$ENVOY_BIN` or the `.venv-test` that
//! `scripts/setup-test-deps.sh` installs; a missing Envoy is a panic naming the fix, never
//! a skip), open an ADS stream and read an Envoy's sync status, a minimal full-duplex
//! ext_proc processor, test certificate authorities ([`certs`]), an in-process Kubernetes
//! API server for controller tests ([`kube_api`]), condition waits, killable runtimes.
//! Everything listens on 127.0.0.1 only. Not published.

pub mod ads;
pub mod certs;
pub mod envoy;
pub mod extproc;
pub mod kube_api;
pub mod net;
pub mod runtime;

pub use net::{free_port, http_get, wait_for, wait_until, wait_until_async, workspace_dir};
pub use runtime::{Isolated, block_on};
