//! A fleet of simulated pods in one process: configuration, start, per-pod stop, shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::engine::{Engine, EngineConfig};
use crate::error::SimError;
use crate::http::{PodState, router};
use crate::metrics::MetricsLabels;
use infermesh_kvevents::{Encoding, HashFormat, Publisher, PublisherConfig, Topic};

use crate::pod::{Input, KvEventSink, SimClock, run_engine};
use crate::profile::EngineProfile;
use crate::role::PodRole;
use crate::tokenizer::Tokenizer;

/// The model name pods serve unless told otherwise.
pub const DEFAULT_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// KV-event publishing of every pod, vLLM's `KVEventsConfig` with its defaults.
///
/// Pod i publishes on `endpoint`'s port + i and answers replays on `replay_endpoint`'s
/// port + i (vLLM offsets ports by data-parallel rank the same way); port 0 gives every
/// pod an ephemeral port. The topic is `kv@<pod-ip>:<http-port>@<model>`, what llm-d reads.
#[derive(Debug, Clone)]
pub struct KvEventsConfig {
    /// PUB endpoint of pod 0 (vLLM default `tcp://*:5557`); bound when it holds `*` or
    /// `::` (or `bind` is set), else connected, as vLLM does.
    pub endpoint: String,
    /// ROUTER endpoint of pod 0 for replay requests; `None` (vLLM's default) disables replay.
    pub replay_endpoint: Option<String>,
    /// Batches each pod keeps for replay (vLLM default 10 000).
    pub buffer_steps: usize,
    /// Event layout: vLLM's positional arrays or PR #42892's maps.
    pub encoding: Encoding,
    /// Block hashes as integers (vLLM's default) or bytes.
    pub hash_format: HashFormat,
    /// Bind the PUB endpoint even without a wildcard host.
    pub bind: bool,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            endpoint: infermesh_kvevents::publisher::DEFAULT_ENDPOINT.to_owned(),
            replay_endpoint: None,
            buffer_steps: infermesh_kvevents::publisher::DEFAULT_BUFFER_STEPS,
            encoding: Encoding::Array,
            hash_format: HashFormat::Int,
            bind: false,
        }
    }
}

/// `endpoint`'s TCP port, if it ends in one.
fn endpoint_port(endpoint: &str) -> Option<u16> {
    endpoint.rsplit_once(':')?.1.parse().ok()
}

/// Pod `index`'s endpoint: the port moved up by the index, port 0 left ephemeral.
fn pod_endpoint(endpoint: &str, index: usize) -> Option<String> {
    match endpoint_port(endpoint)? {
        0 => Some(endpoint.to_owned()),
        _ => infermesh_kvevents::publisher::offset_port(endpoint, u16::try_from(index).ok()?),
    }
}

impl KvEventsConfig {
    fn validate(&self, pods: usize) -> Result<(), SimError> {
        let bad =
            |field: &'static str, reason: String| Err(SimError::InvalidConfig { field, reason });
        let mut ranges = Vec::new();
        for (field, ep) in [
            ("kv_events.endpoint", Some(&self.endpoint)),
            ("kv_events.replay_endpoint", self.replay_endpoint.as_ref()),
        ] {
            let Some(ep) = ep else { continue };
            if !ep.starts_with("tcp://") {
                return bad(
                    field,
                    format!("`{ep}`: only tcp:// endpoints are supported"),
                );
            }
            let Some(port) = endpoint_port(ep) else {
                return bad(field, format!("`{ep}` has no port"));
            };
            if pod_endpoint(ep, pods - 1).is_none() {
                return bad(field, format!("`{ep}` + {pods} pods runs past port 65535"));
            }
            if port != 0 {
                ranges.push((usize::from(port), usize::from(port) + pods));
            }
        }
        if let [a, b] = ranges[..]
            && a.0 < b.1
            && b.0 < a.1
        {
            return bad(
                "kv_events.replay_endpoint",
                format!(
                    "its ports {}..{} overlap the PUB ports {}..{}",
                    b.0, b.1, a.0, a.1
                ),
            );
        }
        if self.replay_endpoint.is_some() && self.buffer_steps == 0 {
            return bad("kv_events.buffer_steps", "replay needs at least 1".into());
        }
        Ok(())
    }
}

/// Where a pod's KV events can be read (bound ports; `None` for a connecting endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvEventPorts {
    /// Port of the PUB socket.
    pub publish: Option<u16>,
    /// Port of the replay ROUTER socket.
    pub replay: Option<u16>,
}

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Number of pods.
    pub pods: usize,
    /// Address every pod binds (127.0.0.1 by default).
    pub host: IpAddr,
    /// Port of pod 0; pod i binds `base_port + i`. 0 = every pod binds an ephemeral port.
    pub base_port: u16,
    /// Served model name.
    pub model: String,
    /// LoRA adapters every pod serves (requests name them in `model`).
    pub lora_adapters: Vec<String>,
    /// Engine constants of every pod.
    pub profile: EngineProfile,
    /// Simulated seconds per real second (10 = ten times faster than real time).
    pub time_scale: f64,
    /// Seed of the per-pod randomness (pod i uses `seed + i`).
    pub seed: u64,
    /// Role of pod i; pods past the end of the list are `both`.
    pub roles: Vec<PodRole>,
    /// KV-event publishing; off (`None`) by default, as in vLLM.
    pub kv_events: Option<KvEventsConfig>,
    /// How every pod turns text into token ids (prompts, `/tokenize`, render, KV events);
    /// the built-in tokenizer by default, or a loaded `tokenizer.json`.
    pub tokenizer: Tokenizer,
}

impl FleetConfig {
    /// `pods` pods of Llama-3.1-8B on H100 on ephemeral 127.0.0.1 ports, real time, seed 0.
    pub fn new(pods: usize) -> Self {
        Self {
            pods,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            base_port: 0,
            model: DEFAULT_MODEL.to_owned(),
            lora_adapters: Vec::new(),
            profile: EngineProfile::llama_8b_h100(),
            time_scale: 1.0,
            seed: 0,
            roles: Vec::new(),
            kv_events: None,
            tokenizer: Tokenizer::Builtin,
        }
    }

    /// Role of pod `index`.
    pub fn role_of(&self, index: usize) -> PodRole {
        self.roles.get(index).copied().unwrap_or_default()
    }

    /// Checks every setting; names the first bad one.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad =
            |field: &'static str, reason: String| Err(SimError::InvalidConfig { field, reason });
        if self.pods == 0 {
            return bad("pods", "must be at least 1".into());
        }
        if self.base_port != 0
            && usize::from(self.base_port) + self.pods - 1 > usize::from(u16::MAX)
        {
            return bad(
                "base_port",
                format!(
                    "{} + {} pods runs past port 65535",
                    self.base_port, self.pods
                ),
            );
        }
        if self.model.is_empty() {
            return bad("model", "must not be empty".into());
        }
        if let Some(l) = self
            .lora_adapters
            .iter()
            .find(|l| **l == self.model || l.is_empty())
        {
            return bad(
                "lora_adapters",
                format!("adapter name `{l}` is empty or equals the model name"),
            );
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return bad(
                "time_scale",
                format!("must be a positive number, got {}", self.time_scale),
            );
        }
        if self.roles.len() > self.pods {
            return bad(
                "roles",
                format!("{} roles given for {} pods", self.roles.len(), self.pods),
            );
        }
        if let Some(kv) = &self.kv_events {
            kv.validate(self.pods)?;
        }
        self.profile.validate()
    }
}

struct PodHandle {
    addr: SocketAddr,
    kv_ports: Option<KvEventPorts>,
    role: PodRole,
    shutdown: parking_lot::Mutex<watch::Sender<bool>>,
    server: parking_lot::Mutex<Option<JoinHandle<()>>>,
    engine: parking_lot::Mutex<Option<JoinHandle<()>>>,
    /// Fleet-side handle to the engine task; dropped on stop so the task can end.
    input: parking_lot::Mutex<Option<mpsc::UnboundedSender<Input>>>,
}

/// Running simulated pods.
pub struct Fleet {
    pods: Vec<PodHandle>,
    /// What the fleet was started with, to start a pod again the same way.
    cfg: FleetConfig,
    clock: SimClock,
    created: u64,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("addrs", &self.addrs())
            .finish()
    }
}

impl Fleet {
    /// Binds and starts every pod; on error nothing is left running.
    pub async fn start(cfg: FleetConfig) -> Result<Fleet, SimError> {
        cfg.validate()?;
        let clock = SimClock::new(cfg.time_scale);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut listeners = Vec::with_capacity(cfg.pods);
        for i in 0..cfg.pods {
            let port = if cfg.base_port == 0 {
                0
            } else {
                cfg.base_port + i as u16
            };
            let addr = SocketAddr::new(cfg.host, port);
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| SimError::Bind {
                    pod: i,
                    addr,
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| SimError::Bind {
                pod: i,
                addr,
                source,
            })?;
            listeners.push((l, bound));
        }
        // Publishers next, also before any task runs, so a taken event port fails the start.
        let mut sinks = Vec::with_capacity(cfg.pods);
        for (i, (_, addr)) in listeners.iter().enumerate() {
            sinks.push(start_publisher(&cfg, i, *addr, None).await?);
        }
        let mut pods = Vec::with_capacity(cfg.pods);
        for (i, ((listener, addr), sink)) in listeners.into_iter().zip(sinks).enumerate() {
            let kv_ports = sink.as_ref().map(|s| KvEventPorts {
                publish: s.publisher.port(),
                replay: s.publisher.replay_port(),
            });
            let t = spawn_pod(&cfg, clock, created, i, listener, addr, sink);
            pods.push(PodHandle {
                addr,
                kv_ports,
                role: cfg.role_of(i),
                shutdown: parking_lot::Mutex::new(t.shutdown),
                server: parking_lot::Mutex::new(Some(t.server)),
                engine: parking_lot::Mutex::new(Some(t.engine)),
                input: parking_lot::Mutex::new(Some(t.input)),
            });
        }
        Ok(Fleet {
            pods,
            cfg,
            clock,
            created,
        })
    }

    /// Bound address of every pod, in pod order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.pods.iter().map(|p| p.addr).collect()
    }

    /// Base URLs (`http://ip:port`) of every pod, in pod order.
    pub fn urls(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|p| format!("http://{}", p.addr))
            .collect()
    }

    /// KV-event ports of every pod, in pod order (`None` when events are off).
    pub fn kv_event_ports(&self) -> Vec<Option<KvEventPorts>> {
        self.pods.iter().map(|p| p.kv_ports).collect()
    }

    /// The block hashes pod `index`'s prefix cache holds now, sorted (what a KV-event
    /// consumer's view of the pod should converge to).
    pub async fn cached_hashes(&self, index: usize) -> Result<Vec<u64>, SimError> {
        let (reply, rx) = oneshot::channel();
        self.send(index, Input::CachedHashes(reply))?;
        let mut v = rx.await.map_err(|_| SimError::NoSuchPod { index })?;
        v.sort_unstable();
        Ok(v)
    }

    /// Drops pod `index`'s prefix cache (vLLM's `reset_prefix_cache`); false, changing
    /// nothing, while requests hold blocks.
    pub async fn reset_prefix_cache(&self, index: usize) -> Result<bool, SimError> {
        let (reply, rx) = oneshot::channel();
        self.send(index, Input::ResetPrefixCache(reply))?;
        rx.await.map_err(|_| SimError::NoSuchPod { index })
    }

    fn send(&self, index: usize, msg: Input) -> Result<(), SimError> {
        self.pods
            .get(index)
            .and_then(|p| p.input.lock().clone())
            .ok_or(SimError::NoSuchPod { index })?
            .send(msg)
            .map_err(|_| SimError::NoSuchPod { index })
    }

    /// Role of every pod, in pod order.
    pub fn roles(&self) -> Vec<PodRole> {
        self.pods.iter().map(|p| p.role).collect()
    }

    /// Stops one pod: its listener closes and open connections are dropped mid-request.
    /// Returns once the port no longer accepts. Unknown or already stopped pods are ignored.
    pub async fn stop_pod(&self, index: usize) {
        let Some(p) = self.pods.get(index) else {
            return;
        };
        let _ = p.shutdown.lock().send(true);
        drop(p.input.lock().take());
        let server = p.server.lock().take();
        if let Some(h) = server {
            let _ = h.await;
        }
        let engine = p.engine.lock().take();
        if let Some(h) = engine {
            let _ = h.await;
        }
    }

    /// Restarts pod `index` as a new vLLM process would come back: stopped (requests in
    /// flight are cut), then a fresh engine with an empty prefix cache and zeroed counters
    /// on the same HTTP address and the same KV-event ports, its event numbering from 0
    /// again (what a subscriber sees as a publisher restart). A stopped pod is started.
    pub async fn restart_pod(&self, index: usize) -> Result<(), SimError> {
        let p = self.pods.get(index).ok_or(SimError::NoSuchPod { index })?;
        self.stop_pod(index).await;
        // The old sockets close asynchronously; give the OS a moment before giving up.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(p.addr).await {
                Ok(l) => break l,
                Err(source) if tries >= 50 => {
                    return Err(SimError::Bind {
                        pod: index,
                        addr: p.addr,
                        source,
                    });
                }
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        };
        let sink = start_publisher(&self.cfg, index, p.addr, p.kv_ports).await?;
        let t = spawn_pod(
            &self.cfg,
            self.clock,
            self.created,
            index,
            listener,
            p.addr,
            sink,
        );
        *p.shutdown.lock() = t.shutdown;
        *p.server.lock() = Some(t.server);
        *p.engine.lock() = Some(t.engine);
        *p.input.lock() = Some(t.input);
        Ok(())
    }

    /// Makes pod `index` `factor` times slower from now on (1 restores it): a degraded pod
    /// whose queue grows while it keeps answering.
    pub async fn set_slowdown(&self, index: usize, factor: f64) -> Result<(), SimError> {
        let tx = self
            .pods
            .get(index)
            .and_then(|p| p.input.lock().clone())
            .ok_or(SimError::NoSuchPod { index })?;
        let (reply, accepted) = oneshot::channel();
        tx.send(Input::Slowdown(factor, reply))
            .map_err(|_| SimError::NoSuchPod { index })?;
        match accepted.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(SimError::InvalidConfig {
                field: "slowdown",
                reason: format!("must be a positive number, got {factor}"),
            }),
            Err(_) => Err(SimError::NoSuchPod { index }),
        }
    }

    /// Stops every pod.
    pub async fn shutdown(self) {
        for p in &self.pods {
            let _ = p.shutdown.lock().send(true);
        }
        for i in 0..self.pods.len() {
            self.stop_pod(i).await;
        }
    }
}

impl Drop for Fleet {
    /// A dropped fleet closes its listeners and connections (in the background) instead of
    /// serving until the runtime ends.
    fn drop(&mut self) {
        for p in &self.pods {
            let _ = p.shutdown.lock().send(true);
        }
    }
}

/// The tasks and handles of one running pod.
struct PodTasks {
    server: JoinHandle<()>,
    engine: JoinHandle<()>,
    input: mpsc::UnboundedSender<Input>,
    shutdown: watch::Sender<bool>,
}

/// Starts pod `i`'s KV-event publisher, if events are on. `ports` pins the ports (a
/// restarted pod keeps the ones it had, even if they were ephemeral).
async fn start_publisher(
    cfg: &FleetConfig,
    i: usize,
    addr: SocketAddr,
    ports: Option<KvEventPorts>,
) -> Result<Option<KvEventSink>, SimError> {
    let Some(kv) = &cfg.kv_events else {
        return Ok(None);
    };
    let invalid = |reason: String| SimError::InvalidConfig {
        field: "kv_events",
        reason,
    };
    let endpoint_of = |ep: &str, pinned: Option<u16>| {
        match pinned {
            Some(port) => with_port(ep, port),
            None => pod_endpoint(ep, i),
        }
        .ok_or_else(|| invalid(format!("no endpoint for pod {i} from `{ep}`")))
    };
    let topic = Topic::for_pod(addr, cfg.model.clone()).map_err(|e| invalid(e.to_string()))?;
    let mut pc = PublisherConfig::new(
        endpoint_of(&kv.endpoint, ports.and_then(|p| p.publish))?,
        topic.to_string(),
    );
    pc.replay_endpoint = match &kv.replay_endpoint {
        Some(ep) => Some(endpoint_of(ep, ports.and_then(|p| p.replay))?),
        None => None,
    };
    pc.buffer_steps = kv.buffer_steps;
    pc.encoding = kv.encoding;
    pc.hash_format = kv.hash_format;
    pc.force_bind = kv.bind;
    let publisher = Publisher::start(pc)
        .await
        .map_err(|source| SimError::KvEvents { pod: i, source })?;
    Ok(Some(KvEventSink {
        publisher,
        lora_adapters: cfg.lora_adapters.clone(),
        block_size: u32::try_from(cfg.profile.block_size).unwrap_or(u32::MAX),
    }))
}

/// `endpoint` with its port replaced by `port`.
fn with_port(endpoint: &str, port: u16) -> Option<String> {
    let (host, _) = endpoint.rsplit_once(':')?;
    Some(format!("{host}:{port}"))
}

/// Spawns pod `i`'s engine and HTTP server: a fresh engine (empty cache, counters at 0).
fn spawn_pod(
    cfg: &FleetConfig,
    clock: SimClock,
    created: u64,
    i: usize,
    listener: TcpListener,
    addr: SocketAddr,
    sink: Option<KvEventSink>,
) -> PodTasks {
    let mut engine = Engine::new(EngineConfig {
        profile: cfg.profile.clone(),
        lora_adapters: cfg.lora_adapters.clone(),
        seed: cfg.seed.wrapping_add(i as u64),
    });
    engine.set_output_ids(cfg.tokenizer.output_ids());
    let (tx, rx) = mpsc::unbounded_channel();
    let labels = MetricsLabels {
        model: cfg.model.clone(),
        lora_adapters: cfg.lora_adapters.clone(),
    };
    let engine_task = tokio::spawn(run_engine(engine, rx, clock, labels, sink));
    let state = Arc::new(PodState {
        index: i,
        addr,
        model: cfg.model.clone(),
        lora_adapters: cfg.lora_adapters.clone(),
        profile: cfg.profile.clone(),
        role: cfg.role_of(i),
        tokenizer: cfg.tokenizer.clone(),
        engine: tx.clone(),
        next_id: AtomicU64::new(0),
        created,
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(serve_pod(listener, router(state), shutdown_rx));
    PodTasks {
        server,
        engine: engine_task,
        input: tx,
        shutdown,
    }
}

async fn serve_pod(listener: TcpListener, app: axum::Router, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let svc = TowerToHyperService::new(app.clone());
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Parses `--roles`: comma-separated `role` or `role=count` items assigned to pods in order
/// (`prefill=2,decode=6`); an empty string means every pod is `both`.
pub fn parse_roles(spec: &str, pods: usize) -> Result<Vec<PodRole>, SimError> {
    let mut roles = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, count) = match item.split_once('=') {
            Some((n, c)) => {
                let c: usize = c.trim().parse().map_err(|_| SimError::InvalidConfig {
                    field: "roles",
                    reason: format!("`{item}`: count `{c}` is not a number"),
                })?;
                (n.trim(), c)
            }
            None => (item, 1),
        };
        let role: PodRole = name.parse().map_err(|reason| SimError::InvalidConfig {
            field: "roles",
            reason,
        })?;
        roles.extend(std::iter::repeat_n(role, count));
    }
    if roles.len() > pods {
        return Err(SimError::InvalidConfig {
            field: "roles",
            reason: format!("{} roles given for {pods} pods", roles.len()),
        });
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_in_order_and_reject_mistakes() {
        assert_eq!(
            parse_roles("prefill=2, decode", 4).unwrap(),
            vec![PodRole::Prefill, PodRole::Prefill, PodRole::Decode]
        );
        assert!(parse_roles("", 2).unwrap().is_empty());
        assert!(parse_roles("prefil=1", 2).is_err());
        assert!(parse_roles("decode=3", 2).is_err());
        assert!(parse_roles("decode=x", 2).is_err());
    }

    #[test]
    fn config_validation_names_the_field() {
        let mut c = FleetConfig::new(2);
        c.time_scale = 0.0;
        assert!(matches!(
            c.validate(),
            Err(SimError::InvalidConfig {
                field: "time_scale",
                ..
            })
        ));
        let mut c = FleetConfig::new(2);
        c.base_port = 65535;
        assert!(matches!(
            c.validate(),
            Err(SimError::InvalidConfig {
                field: "base_port",
                ..
            })
        ));
        assert!(FleetConfig::new(1).validate().is_ok());
    }
}
