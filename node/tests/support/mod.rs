//! Test harness: simulated pods, an in-process node, and a real Envoy, all on loopback
//! with ports chosen at runtime.
#![allow(dead_code)]

pub mod browser;
pub mod kv;
pub mod tier;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::upstream::{HttpClient, http_client};
use infermesh_scheduler::ResolvedConfig;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use infermesh_testkit::envoy::envoy_bin;

/// A TCP port free on 127.0.0.1 a moment ago (for listeners a config must name).
pub fn free_port() -> u16 {
    infermesh_testkit::free_port()
}

/// A running Envoy in front of a node's ext_proc server, killed on drop.
pub use infermesh_testkit::envoy::ExtProcEnvoy as Envoy;

/// Starts Envoy with `deploy/envoy/envoy-extproc.yaml` pointed at `ext_proc`, with `pods`
/// as the pool cluster's endpoints (panics naming the cause when it cannot).
pub async fn start_envoy(ext_proc: SocketAddr, pods: &[SocketAddr]) -> Envoy {
    Envoy::start(&envoy_bin(), ext_proc, pods)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// An HTTP response read whole.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// GET a path.
pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Result<Resp, String> {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(client, req).await
}

/// POST a body with extra headers.
pub async fn post(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut b = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).expect("request");
    tokio::time::timeout(Duration::from_secs(30), send(client, req))
        .await
        .expect("request finished within 30 s")
        .expect("request sent")
}

/// Sends one request and reads the whole answer.
pub async fn send(client: &HttpClient, req: http::Request<Full<Bytes>>) -> Result<Resp, String> {
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// A completions body whose prompt starts with group `group`'s shared prefix.
pub fn prefixed_prompt(model: &str, group: usize, question: usize) -> String {
    let mut prompt = format!("System prompt of tenant {group}. ");
    for i in 0..60 {
        prompt.push_str(&format!(
            "Rule {i} for tenant {group}: answer precisely and cite sources. "
        ));
    }
    prompt.push_str(&format!(
        "Question {question}: what is {question} + {group}?"
    ));
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 4, "stream": false})
        .to_string()
}

/// Pods, a node (proxy + ext_proc) and optionally Envoy.
pub struct Harness {
    /// The simulated pods.
    pub fleet: Fleet,
    /// Their addresses, in pod order.
    pub pods: Vec<SocketAddr>,
    /// The node under test.
    pub node: App,
    /// Envoy in front of the node's ext_proc server.
    pub envoy: Option<Envoy>,
    /// A client for the test's own requests.
    pub client: HttpClient,
    /// The model the pods serve.
    pub model: String,
}

impl Harness {
    /// Starts `pods` zero-latency simulated pods and a node; Envoy too when `with_envoy`.
    pub async fn start(pods: usize, with_envoy: bool) -> Harness {
        Harness::start_with(pods, with_envoy, |_| {}).await
    }

    /// Like [`Harness::start`], with the node config adjusted by `tweak`.
    pub async fn start_with(
        pods: usize,
        with_envoy: bool,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Harness {
        Harness::start_with_profile(pods, with_envoy, EngineProfile::instant(), tweak).await
    }

    /// Like [`Harness::start_with`], with pods simulating `profile`.
    pub async fn start_with_profile(
        pods: usize,
        with_envoy: bool,
        profile: EngineProfile,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Harness {
        let mut cfg = FleetConfig::new(pods);
        cfg.profile = profile;
        let model = cfg.model.clone();
        let fleet = Fleet::start(cfg).await.expect("simulated pods start");
        let addrs = fleet.addrs();
        let mut node_cfg = NodeConfig::local(
            fleet_pool(&addrs, &model),
            ResolvedConfig::builtin_default(),
        )
        .expect("valid node config");
        tweak(&mut node_cfg);
        let node = App::start(node_cfg).await.expect("node starts");
        assert!(
            node.wait_ready(pods, Duration::from_secs(15)).await,
            "pods did not all answer their first scrape"
        );
        let client = http_client(Duration::from_secs(2));
        let envoy = if with_envoy {
            Some(start_envoy(node.ext_proc_addr, &addrs).await)
        } else {
            None
        };
        Harness {
            fleet,
            pods: addrs,
            node,
            envoy,
            client,
            model,
        }
    }

    /// One simulated llama-8b pod behind a node (no Envoy) running `scheduler`, whose
    /// scrapes, and so flow control's saturation refreshes, come `refresh` apart.
    pub async fn one_pod_refreshing_every(scheduler: ResolvedConfig, refresh: Duration) -> Harness {
        Harness::start_with_profile(1, false, EngineProfile::llama_8b_h100(), |c| {
            c.scheduler = scheduler;
            c.scrape.interval = refresh;
            c.staleness = refresh * 12;
        })
        .await
    }

    /// Where client requests go: Envoy when present, else the node's proxy.
    pub fn entry(&self) -> SocketAddr {
        self.envoy
            .as_ref()
            .map(|e| e.addr)
            .unwrap_or_else(|| self.node.proxy_addr.expect("proxy enabled"))
    }

    /// The pod that served a response (Envoy's upstream host or the proxy's served header).
    pub fn served(&self, r: &Resp) -> SocketAddr {
        let h = r
            .header("x-upstream-host")
            .or_else(|| r.header("x-gateway-destination-endpoint-served"))
            .unwrap_or_else(|| panic!("response names no serving pod: {:?}", r.headers));
        h.parse()
            .unwrap_or_else(|_| panic!("bad served address {h:?}"))
    }

    /// Waits (bounded) until the node sees pod `i` as down.
    pub async fn wait_pod_down(&self, i: usize) {
        let addr = self.pods[i];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let pool = self.node.pool();
            if pool.slot(addr).is_some_and(|s| !s.is_up()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pod {addr} still up 10 s after it stopped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops everything.
    pub async fn stop(self) {
        drop(self.envoy);
        self.node.shutdown(Duration::from_secs(5)).await;
        self.fleet.shutdown().await;
    }
}

/// Flow control gated by the router's own in-flight count, one request per pod, with
/// `flow` (lines of the `flowControl` section) added.
pub fn one_slot_per_pod(flow: &str) -> infermesh_scheduler::ResolvedConfig {
    concurrency_gated("{maxConcurrency: 1}", flow)
}

/// Flow control gated by one prefill per pod (`maxPrefillConcurrency` 1, room for 10
/// requests), with `flow` (lines of the `flowControl` section) added.
pub fn one_prefill_per_pod(flow: &str) -> infermesh_scheduler::ResolvedConfig {
    concurrency_gated("{maxConcurrency: 10, maxPrefillConcurrency: 1}", flow)
}

/// Flow control gated by a concurrency-detector with `params` (a YAML flow mapping).
fn concurrency_gated(params: &str, flow: &str) -> infermesh_scheduler::ResolvedConfig {
    infermesh_scheduler::load_config(&format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {params}
flowControl:
  saturationDetector: {{pluginRef: concurrency-detector}}
  {flow}
"
    ))
    .expect("valid config")
}

/// Starts a streamed completion of about 3,000 decode steps (seconds on a simulated
/// llama-8b pod) through `addr` and returns its body once the first token is in.
pub async fn past_first_token(
    client: &HttpClient,
    addr: SocketAddr,
    model: &str,
) -> hyper::body::Incoming {
    let long = serde_json::json!({"model": model, "prompt": "long job", "max_tokens": 3000, "stream": true});
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(long.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut running = resp.into_body();
    let first = running
        .frame()
        .await
        .expect("a first frame")
        .expect("a readable frame");
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    running
}
