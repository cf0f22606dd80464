//! `infermesh sidecar`: the P/D routing sidecar beside a decode pod, compatible with
//! llm-d's routing sidecar where it has an equivalent.
//!
//! Contract: a request without router headers goes to the local engine unchanged and
//! streams back. With `x-prefiller-host-port` the sidecar runs the prefill on the named pod
//! (shape per `--kv-connector`, see [`rewrite`]), retrying transport failures and 5xx
//! answers up to `--prefill-max-retries`, then decodes locally and streams the answer
//! through; when the prefill cannot be had the client gets a 502 naming the prefiller and
//! the last error. With `--enable-ssrf-protection` only the pool's pods (from the
//! endpoints file, reloaded on change) may be named, else 403. A client-supplied
//! `kv_transfer_params` never reaches an engine.
//!
//! E/P/D: with `x-encoder-hosts-ports` (comma-separated `ip:port`, allowlisted like the
//! prefiller) each multimodal part of a chat request goes, alone, to an encoder (item `i`
//! to encoder `i mod n`, all at once, as llm-d's sidecar sends them); the encoders'
//! `ec_transfer_params` (which images they hold encoder output for, and where) travel on
//! in the prefill and decode bodies, so those engines skip encoding them. Encoder
//! failures are retried with the prefill flags, then answered with a 502 naming the
//! encoder. A client-supplied `ec_transfer_params` never reaches an engine either.
//! There is no `--ec-connector`: the handles travel in the body whatever moves the
//! encoder outputs, so the flag would change nothing here.
//!
//! TLS, with llm-d's flags: `--secure-proxy` serves the client-facing port over TLS (with
//! `--cert-path`'s `tls.crt`/`tls.key`, else a self-signed certificate made at start);
//! `--enable-tls` names the stages (prefiller, decoder, encoder) reached over TLS, verified
//! against the platform's roots unless `--tls-insecure-skip-verify` names the stage too.

pub mod allowlist;
pub mod rewrite;
pub mod server;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::discovery::{InvalidPoolFile, load_pool_file, watch_pool_file};
use crate::pool_model::{PoolInput, PoolSpec};
pub use allowlist::{Allowlist, NotInPool};
pub use rewrite::KvConnector;

/// Where SSRF protection learns the pool's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSource {
    /// The InferencePool name (`name` or `namespace/name`; the file has no namespace).
    pub pool: String,
    /// The endpoints file (the node's `--endpoints`), watched for changes.
    pub endpoints_file: PathBuf,
}

/// A stage of the handoff the sidecar calls out to (llm-d's `--enable-tls` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsStage {
    /// The prefill pod named by `x-prefiller-host-port`.
    Prefiller,
    /// The local engine (the decoder).
    Decoder,
    /// The encoders named by `x-encoder-hosts-ports`.
    Encoder,
}

/// How the sidecar reaches one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StageTls {
    /// Plain HTTP.
    #[default]
    Plain,
    /// TLS, the certificate verified against the platform's roots.
    Verified,
    /// TLS, any certificate accepted (`--tls-insecure-skip-verify`).
    Unverified,
}

/// The certificate the client-facing port presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeCert {
    /// `tls.crt` and `tls.key` in this directory (`--cert-path`).
    Dir(PathBuf),
    /// One made and signed by the sidecar at start.
    SelfSigned,
}

/// The sidecar's TLS: its own port and each stage it calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarTls {
    /// `Some`: the client-facing port speaks TLS only.
    pub serve: Option<ServeCert>,
    /// Towards prefill pods.
    pub prefiller: StageTls,
    /// Towards the local engine.
    pub decoder: StageTls,
    /// Towards encoders.
    pub encoder: StageTls,
}

/// The sidecar's validated settings.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// Client-facing listen address.
    pub listen: SocketAddr,
    /// The local engine (decode vLLM).
    pub model_server: SocketAddr,
    /// How prefill and decode exchange KV.
    pub connector: KvConnector,
    /// SSRF protection: `Some` allows only the pool's pods.
    pub ssrf: Option<PoolSource>,
    /// Prefill retries after the first attempt.
    pub prefill_max_retries: u32,
    /// Wait between prefill attempts.
    pub prefill_retry_backoff: Duration,
    /// Longest one prefill attempt may take (connect, answer and body).
    pub prefill_timeout: Duration,
    /// Connect timeout towards any engine.
    pub connect_timeout: Duration,
    /// Longest wait for the local engine's response headers.
    pub response_timeout: Duration,
    /// Largest client body read when a handoff needs it whole.
    pub max_body_bytes: usize,
    /// The engines' P2P KV connector port, for `x-kv-cache-source-host-port` pulls.
    pub p2p_connector_port: u16,
    /// This pod's IP (`POD_IP`): a KV source naming this sidecar is not pulled from.
    pub pod_ip: Option<IpAddr>,
    /// TLS on the client-facing port and towards each stage.
    pub tls: SidecarTls,
}

/// The sidecar could not start; nothing was left running.
#[derive(Debug, thiserror::Error)]
pub enum SidecarStartError {
    /// The endpoints file is unreadable or invalid.
    #[error("--enable-ssrf-protection: {0}")]
    PoolFile(#[from] InvalidPoolFile),
    /// The endpoints file describes another pool than `--inference-pool`.
    #[error(
        "--enable-ssrf-protection: --inference-pool is {wanted:?} but the endpoints file describes pool {found:?}"
    )]
    PoolMismatch {
        /// The pool named on the command line.
        wanted: String,
        /// The pool the file describes.
        found: String,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// The endpoints file could not be watched.
    #[error("cannot watch the endpoints file: {0}")]
    Watch(#[from] notify::Error),
    /// The serving certificate is unusable.
    #[error("--secure-proxy: {0}")]
    ServeTls(#[from] crate::tls::TlsConfigError),
    /// A stage to be verified has no roots to verify against.
    #[error("--enable-tls: {0}")]
    StageTls(#[from] crate::upstream::PodTlsError),
}

/// Whether the pool named `wanted` (`name` or `namespace/name`) is the file's pool.
fn same_pool(wanted: &str, spec: &PoolSpec) -> bool {
    let name = wanted.rsplit('/').next().unwrap_or(wanted);
    name == spec.name
}

/// Loads the pool's allowlist and checks it is the pool the command line names.
pub fn load_allowlist(src: &PoolSource) -> Result<(Allowlist, PoolSpec), SidecarStartError> {
    let spec = load_pool_file(&src.endpoints_file)?;
    if !same_pool(&src.pool, &spec) {
        return Err(SidecarStartError::PoolMismatch {
            wanted: src.pool.clone(),
            found: spec.name,
        });
    }
    Ok((Allowlist::from_pool(&spec), spec))
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    /// The bound client-facing address.
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Sidecar {
    /// Loads the allowlist (before binding, so a bad file fails fast), binds and serves.
    pub async fn start(cfg: SidecarConfig) -> Result<Sidecar, SidecarStartError> {
        let loaded = cfg.ssrf.as_ref().map(load_allowlist).transpose()?;
        // Certificates and trust roots are read before binding, so a bad one fails the start.
        let serve_tls = match &cfg.tls.serve {
            None => None,
            Some(ServeCert::SelfSigned) => Some(crate::tls::TlsReloader::fixed(
                crate::tls::self_signed_server_config(vec!["localhost".to_owned()])?,
            )),
            Some(ServeCert::Dir(dir)) => Some(crate::tls::TlsReloader::new(
                crate::tls::ServerTlsSettings {
                    cert: dir.join("tls.crt"),
                    key: dir.join("tls.key"),
                    client_ca: None,
                    min_version: crate::tls::TlsVersion::Tls12,
                    cipher_suites: Vec::new(),
                    reload: false,
                    alpn: crate::tls::Alpn::Http,
                },
            )?),
        };
        let allow = Arc::new(ArcSwap::from_pointee(Allowlist::Open));
        let state = server::SidecarState::new(&cfg, Arc::clone(&allow))?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| SidecarStartError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SidecarStartError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (shutdown, sd_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut watcher = None;
        if let (Some(src), Some((list, spec))) = (cfg.ssrf.clone(), loaded) {
            allow.store(Arc::new(list));
            // The node's own watcher, feeding a channel that only this task reads.
            let (tx, mut rx) = mpsc::channel::<PoolInput>(4);
            let (w, task) = watch_pool_file(src.endpoints_file.clone(), spec, tx, sd_rx.clone())?;
            watcher = Some(w);
            let allow = Arc::clone(&allow);
            tasks.spawn(async move {
                while let Some(input) = rx.recv().await {
                    let PoolInput::Spec(spec) = input else {
                        continue;
                    };
                    if !same_pool(&src.pool, &spec) {
                        tracing::error!(wanted = %src.pool, found = %spec.name, "endpoints file now describes another pool; keeping the previous allowlist");
                        continue;
                    }
                    tracing::info!(pool = %spec.name, pods = spec.endpoints.len(), "sidecar allowlist reloaded");
                    allow.store(Arc::new(Allowlist::from_pool(&spec)));
                }
                task.abort();
            });
        }
        let app = server::router(state);
        match serve_tls {
            None => crate::serve::spawn_http(&mut tasks, "sidecar", listener, app, sd_rx),
            Some(tls) => {
                let listener = crate::tls::TlsListener::new(listener, tls, sd_rx.clone()).map_err(
                    |source| SidecarStartError::Bind {
                        addr: cfg.listen,
                        source,
                    },
                )?;
                crate::serve::spawn_http(&mut tasks, "sidecar", listener, app, sd_rx);
            }
        }
        Ok(Sidecar {
            addr,
            shutdown,
            tasks,
            _watcher: watcher,
        })
    }

    /// Stops accepting, waits up to `grace` for open requests, then stops everything.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_matched_by_name_with_or_without_namespace() {
        let spec = crate::pool_model::fleet_pool(&[], "m");
        assert!(same_pool("demo", &spec));
        assert!(same_pool("llm-d/demo", &spec));
        assert!(!same_pool("other", &spec));
    }
}
