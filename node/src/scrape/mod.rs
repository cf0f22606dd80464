//! The data layer's metrics fetcher: one task per endpoint scrapes `/metrics` every
//! `refresh_metrics_interval`, writes the result into the endpoint's slot, and reads the
//! pod's `/v1/models` when it comes up (and every `models_refresh` after).

pub mod engine;
pub mod prom_text;
pub mod runtime;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::metrics::{NodeMetrics, ScrapeOutcome};
use crate::pool::EndpointSlot;
use crate::pool_model::PoolInput;
use crate::upstream::HttpClient;

/// Scrape timing.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeConfig {
    /// Time between scrapes of one endpoint (llm-d `--refresh-metrics-interval`, 50 ms).
    pub interval: Duration,
    /// Longest a scrape may take before it counts as failed.
    pub timeout: Duration,
    /// How often to re-read `/v1/models` from a pod that is up.
    pub models_refresh: Duration,
}

/// What a scrape attempt found, as handed to a [`ScrapeSink`].
#[derive(Debug, Clone, Copy)]
pub enum ScrapeReport<'a> {
    /// The endpoint answered with these metrics.
    Up(&'a infermesh_scheduler::Metrics),
    /// The endpoint did not answer (or answered garbage) at this time; its slot was marked
    /// down.
    Down(Instant),
}

/// Where a scraper sends the models a pod serves, and whether anyone wants them: a pool
/// whose file (or policy) lists its models never asks the pods.
#[derive(Debug, Clone)]
pub struct ModelsFeed {
    /// The pool task's input.
    pub tx: mpsc::Sender<PoolInput>,
    /// True while the pool's models come from the pods' `/v1/models`.
    pub wanted: Arc<AtomicBool>,
}

impl ModelsFeed {
    /// A feed that always asks the pods.
    pub fn always(tx: mpsc::Sender<PoolInput>) -> ModelsFeed {
        ModelsFeed {
            tx,
            wanted: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// Where and how pods' metrics are read: llm-d's `metrics-data-source` (path) and
/// `core-metrics-extractor` (engine label, default engine, metric names per engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSource {
    /// `scheme: https`: pods are scraped over TLS.
    pub https: bool,
    /// `insecureSkipVerify` (llm-d's default true): any pod certificate is accepted.
    pub insecure_skip_verify: bool,
    /// Path of the metrics page.
    pub path: String,
    /// Metric names per engine.
    pub engines: engine::EngineTable,
    /// Pod label naming the engine (`engineLabelKey`).
    pub engine_label: String,
    /// Engine of a pod without the label (`defaultEngine`).
    pub default_engine: engine::Engine,
}

/// A metrics-source configuration infermesh cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMetricsSource {
    /// A scheme other than `http` and `https`.
    #[error("metrics-data-source scheme {0:?} is not supported: http or https")]
    Scheme(String),
    /// `defaultEngine` names an engine whose metric names the fetcher does not know.
    #[error(
        "core-metrics-extractor defaultEngine {0:?} is not a known engine (vllm, sglang, trtllm-serve, triton-tensorrt-llm)"
    )]
    DefaultEngine(String),
    /// An `engineConfigs` entry does not compile.
    #[error(transparent)]
    Engine(#[from] engine::InvalidEngine),
}

impl Default for MetricsSource {
    fn default() -> Self {
        MetricsSource {
            https: false,
            insecure_skip_verify: true,
            path: "/metrics".into(),
            engines: engine::EngineTable::builtin().clone(),
            engine_label: engine::ENGINE_LABEL.into(),
            default_engine: engine::Engine::Vllm,
        }
    }
}

impl MetricsSource {
    /// The source an EndpointPickerConfig describes (llm-d's defaults without one).
    pub fn from_config(
        cfg: &infermesh_scheduler::ResolvedConfig,
    ) -> Result<MetricsSource, InvalidMetricsSource> {
        let Some((src, extractor)) = cfg.metrics_source() else {
            return Ok(MetricsSource::default());
        };
        if src.scheme != "http" && src.scheme != "https" {
            return Err(InvalidMetricsSource::Scheme(src.scheme.clone()));
        }
        let mut out = MetricsSource {
            https: src.scheme == "https",
            insecure_skip_verify: src.insecure_skip_verify,
            path: src.path.clone(),
            ..MetricsSource::default()
        };
        if let Some(x) = extractor {
            out.engines = engine::EngineTable::from_params(x)?;
            out.engine_label = x.engine_label_key.clone();
            if !x.default_engine.is_empty() {
                out.default_engine = engine::Engine::named(&x.default_engine)
                    .ok_or_else(|| InvalidMetricsSource::DefaultEngine(x.default_engine.clone()))?;
            }
        }
        Ok(out)
    }

    /// The engine of a pod: its `engineLabelKey` label, else the engine discovery found
    /// (from llm-d's standard labels), else `defaultEngine`.
    pub fn engine_of(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
        found: engine::Engine,
    ) -> engine::Engine {
        if let Some(e) = labels
            .get(&self.engine_label)
            .and_then(|v| engine::Engine::named(v))
        {
            return e;
        }
        let labelled = labels.contains_key(engine::ENGINE_LABEL)
            || labels.contains_key(engine::LEGACY_ENGINE_LABEL);
        if labelled { found } else { self.default_engine }
    }
}

/// Everything a scraper needs besides its endpoint.
#[derive(Clone)]
pub struct Scraping {
    /// The scrape runtime's HTTP client.
    pub client: ScrapeClient,
    /// Timing.
    pub cfg: ScrapeConfig,
    /// Where pod model lists go.
    pub models: ModelsFeed,
    /// Scrape counters.
    pub metrics: Arc<NodeMetrics>,
    /// Metrics path and names.
    pub source: Arc<MetricsSource>,
    /// Called with every attempt's outcome (mesh mode).
    pub sink: Option<ScrapeSink>,
}

/// The scrape client: plain HTTP, or HTTPS for `metrics-data-source` `scheme: https`.
#[derive(Clone, Debug)]
pub enum ScrapeClient {
    /// Plain HTTP.
    Http(HttpClient),
    /// HTTPS (verifying, or not with `insecureSkipVerify`).
    Https(crate::upstream::HttpsClient),
}

impl ScrapeClient {
    /// The client `source` asks for (`http` shares `plain`).
    pub fn for_source(
        source: &MetricsSource,
        plain: HttpClient,
        connect_timeout: Duration,
    ) -> Result<ScrapeClient, crate::upstream::PodTlsError> {
        Ok(if source.https {
            ScrapeClient::Https(crate::upstream::https_client(
                connect_timeout,
                source.insecure_skip_verify,
            )?)
        } else {
            ScrapeClient::Http(plain)
        })
    }

    fn scheme(&self) -> &'static str {
        match self {
            ScrapeClient::Http(_) => "http",
            ScrapeClient::Https(_) => "https",
        }
    }

    async fn request(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        match self {
            ScrapeClient::Http(c) => c.request(req).await,
            ScrapeClient::Https(c) => c.request(req).await,
        }
    }
}

/// Called with every scrape attempt's outcome (the mesh publishes it on the load board, so
/// other nodes drop a dead endpoint as soon as its scraper does).
pub type ScrapeSink = Arc<dyn Fn(&EndpointSlot, ScrapeReport<'_>) + Send + Sync>;

/// Starts the scrape loop of one endpoint on `rt`; abort the handle to stop it.
pub fn spawn_scraper(
    rt: &tokio::runtime::Handle,
    slot: Arc<EndpointSlot>,
    scraping: Scraping,
) -> JoinHandle<()> {
    let Scraping {
        client,
        cfg,
        models,
        metrics,
        source,
        sink,
    } = scraping;
    rt.spawn(async move {
        let addr = slot.address();
        let engine = source.engine_of(&slot.spec.labels, slot.spec.engine);
        let scheme = client.scheme();
        let metrics_uri: http::Uri = format!("{scheme}://{addr}{}", source.path)
            .parse()
            .expect("an ip:port and a checked absolute path make a valid URI");
        let models_uri: http::Uri = format!("{scheme}://{addr}/v1/models")
            .parse()
            .expect("an ip:port makes a valid URI");
        // Scrape at once, then on a per-endpoint phase: pods found together would otherwise
        // be scraped in one burst every interval, and requests landing in the burst wait.
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + scrape_phase(addr, cfg.interval),
            cfg.interval,
        );
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut models_read: Option<Instant> = None;
        let mut was_up = false;
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                ticker.tick().await;
            }
            let result =
                scrape_metrics(&client, &metrics_uri, &source, engine, cfg.timeout).await;
            match result {
                Ok((m, _)) => {
                    if let Some(sink) = &sink {
                        sink(&slot, ScrapeReport::Up(&m));
                    }
                    slot.record_scrape(m);
                    metrics.count_scrape(ScrapeOutcome::Ok);
                    if !was_up {
                        tracing::info!(endpoint = %addr, pod = %slot.spec.pod, "endpoint is up");
                        was_up = true;
                        models_read = None;
                    }
                }
                Err((reason, scraped_at)) => {
                    slot.mark_down();
                    if let Some(sink) = &sink {
                        sink(&slot, ScrapeReport::Down(scraped_at));
                    }
                    metrics.count_scrape(reason.outcome());
                    if was_up {
                        tracing::warn!(endpoint = %addr, pod = %slot.spec.pod, %reason, "endpoint left the candidate set");
                    } else if models_read.is_none() {
                        tracing::debug!(endpoint = %addr, %reason, "endpoint not reachable yet");
                    }
                    was_up = false;
                    continue;
                }
            }
            if models.wanted.load(Ordering::Relaxed)
                && models_read.is_none_or(|t| t.elapsed() >= cfg.models_refresh)
            {
                models_read = Some(Instant::now());
                match tokio::time::timeout(cfg.timeout, get(&client, models_uri.clone())).await {
                    Ok(Ok(body)) => match parse_model_list(&body) {
                        Ok(list) => {
                            let input = PoolInput::Models { addr, models: list };
                            let _ = models.tx.send(input).await;
                        }
                        Err(e) => {
                            tracing::warn!(endpoint = %addr, error = %e, "cannot read /v1/models")
                        }
                    },
                    Ok(Err(e)) => {
                        tracing::debug!(endpoint = %addr, error = %e, "/v1/models failed")
                    }
                    Err(_) => tracing::debug!(endpoint = %addr, "/v1/models timed out"),
                }
            }
        }
    })
}

/// Where in each interval `addr` is scraped: spread by a hash of the address.
fn scrape_phase(addr: std::net::SocketAddr, interval: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    addr.hash(&mut h);
    let nanos = u64::try_from(interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_nanos(h.finish() % nanos)
}

/// Why one scrape (of `/metrics` or `/v1/models`) produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request could not be sent or the connection failed.
    #[error("request to {uri} failed: {source}")]
    Request {
        /// What was asked.
        uri: String,
        /// The client error.
        source: hyper_util::client::legacy::Error,
    },
    /// The body broke off.
    #[error("reading the body of {uri} failed: {source}")]
    Body {
        /// What was asked.
        uri: String,
        /// The transport error.
        source: hyper::Error,
    },
    /// The pod answered with an error status.
    #[error("{uri} answered HTTP {status}")]
    Status {
        /// What was asked.
        uri: String,
        /// The status.
        status: http::StatusCode,
    },
    /// No answer within the scrape timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The metrics page is not UTF-8 text.
    #[error("metrics page is not UTF-8")]
    NotUtf8,
    /// The metrics page could not be read as the pod's engine's metrics.
    #[error(transparent)]
    Extract(#[from] engine::ExtractError),
    /// The `/v1/models` answer is not an OpenAI model list.
    #[error("bad /v1/models JSON: {0}")]
    ModelList(#[from] serde_json::Error),
}

impl ScrapeError {
    /// How the scrape is counted in `infermesh_scrapes_total`.
    pub fn outcome(&self) -> ScrapeOutcome {
        match self {
            ScrapeError::Request { .. }
            | ScrapeError::Body { .. }
            | ScrapeError::Status { .. }
            | ScrapeError::Timeout(_) => ScrapeOutcome::Unreachable,
            ScrapeError::NotUtf8 | ScrapeError::Extract(_) | ScrapeError::ModelList(_) => {
                ScrapeOutcome::Invalid
            }
        }
    }
}

async fn get(client: &ScrapeClient, uri: http::Uri) -> Result<Bytes, ScrapeError> {
    let req = http::Request::get(uri.clone())
        .body(Full::new(Bytes::new()))
        .expect("a GET with an empty body and a parsed URI is a valid request");
    let resp = client
        .request(req)
        .await
        .map_err(|source| ScrapeError::Request {
            uri: uri.to_string(),
            source,
        })?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|source| ScrapeError::Body {
            uri: uri.to_string(),
            source,
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(ScrapeError::Status {
            uri: uri.to_string(),
            status,
        });
    }
    Ok(body)
}

/// One `/metrics` scrape, turned into the scheduler's view of the pod.
async fn scrape_metrics(
    client: &ScrapeClient,
    uri: &http::Uri,
    source: &MetricsSource,
    engine: engine::Engine,
    timeout: Duration,
) -> Result<(infermesh_scheduler::Metrics, Instant), (ScrapeError, Instant)> {
    let page = tokio::time::timeout(timeout, get(client, uri.clone())).await;
    let at = Instant::now();
    let body = match page {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => return Err((e, at)),
        Err(_) => return Err((ScrapeError::Timeout(timeout), at)),
    };
    let text = std::str::from_utf8(&body).map_err(|_| (ScrapeError::NotUtf8, at))?;
    source
        .engines
        .extract(engine, text, at)
        .map(|m| (m, at))
        .map_err(|e| (e.into(), at))
}

/// Reads the model ids of an OpenAI `/v1/models` answer (`{"data":[{"id":…},…]}`).
pub fn parse_model_list(body: &[u8]) -> Result<Vec<String>, ScrapeError> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        id: String,
    }
    let list: List = serde_json::from_slice(body)?;
    let mut ids: Vec<String> = list.data.into_iter().map(|i| i.id).collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_errors_name_the_problem_and_count_by_kind() {
        let e = parse_model_list(b"{\"data\": 5}").unwrap_err();
        assert!(e.to_string().starts_with("bad /v1/models JSON"), "{e}");
        assert_eq!(e.outcome(), ScrapeOutcome::Invalid);
        let e = ScrapeError::Status {
            uri: "http://10.0.0.1:8000/metrics".into(),
            status: http::StatusCode::SERVICE_UNAVAILABLE,
        };
        assert_eq!(
            e.to_string(),
            "http://10.0.0.1:8000/metrics answered HTTP 503 Service Unavailable"
        );
        assert_eq!(e.outcome(), ScrapeOutcome::Unreachable);
        assert_eq!(
            ScrapeError::Timeout(Duration::from_millis(500)).outcome(),
            ScrapeOutcome::Unreachable
        );
        assert_eq!(
            parse_model_list(br#"{"data":[{"id":"b"},{"id":"a"},{"id":"b"}]}"#).unwrap(),
            vec!["a".to_owned(), "b".to_owned()]
        );
    }

    #[test]
    fn scrape_phases_spread_over_the_interval() {
        let interval = Duration::from_millis(50);
        let phases: Vec<Duration> = (0..64)
            .map(|i| scrape_phase(std::net::SocketAddr::from(([10, 0, 0, i], 8000)), interval))
            .collect();
        assert!(phases.iter().all(|p| *p < interval));
        // 64 pods over 10 buckets of 5 ms: a burst would put them all in one.
        let mut buckets = [0usize; 10];
        for p in &phases {
            buckets[(p.as_millis() / 5) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| n < 20),
            "phases bunch up: {buckets:?}"
        );
    }

    fn source(yaml_tail: &str) -> Result<MetricsSource, InvalidMetricsSource> {
        let mut yaml_tail = yaml_tail.to_owned();
        for t in ["metrics-data-source", "core-metrics-extractor"] {
            if !yaml_tail.contains(&format!("type: {t}")) {
                yaml_tail.push_str(&format!("- type: {t}\n"));
            }
        }
        let yaml = format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
             - type: queue-scorer\n{yaml_tail}\
             schedulingProfiles:\n- name: default\n  plugins: [{{pluginRef: queue-scorer}}]\n\
             dataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    \
             extractors: [{{pluginRef: core-metrics-extractor}}]\n"
        );
        MetricsSource::from_config(&infermesh_scheduler::load_config(&yaml).expect("valid config"))
    }

    #[test]
    fn metrics_source_parameters_take_effect() {
        // Bug: path, engineConfigs and defaultEngine were parsed and then ignored.
        let s = source(
            "- type: metrics-data-source\n  parameters: {path: /stats}\n\
             - type: core-metrics-extractor\n  parameters:\n    engineLabelKey: example.com/engine\n    \
             defaultEngine: sglang\n    engineConfigs:\n    - name: vllm\n      \
             queuedRequestsSpec: my_waiting\n      runningRequestsSpec: my_running\n      \
             kvUsageSpec: my_kv\n",
        )
        .unwrap();
        assert_eq!(s.path, "/stats");
        let page = "my_waiting 4\nmy_running 2\nmy_kv 0.5\n";
        let m = s
            .engines
            .extract(engine::Engine::Vllm, page, Instant::now())
            .unwrap();
        assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (4, 2, 0.5));
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let found = engine::Engine::Vllm;
        assert_eq!(s.engine_of(&labels(&[]), found), engine::Engine::Sglang);
        assert_eq!(
            s.engine_of(&labels(&[("example.com/engine", "trtllm-serve")]), found),
            engine::Engine::TrtllmServe
        );
        assert_eq!(
            s.engine_of(&labels(&[(engine::ENGINE_LABEL, "vllm")]), found),
            engine::Engine::Vllm
        );
        let https = source("- type: metrics-data-source\n  parameters: {scheme: https}\n").unwrap();
        assert!(https.https && https.insecure_skip_verify, "{https:?}");
        let verified = source(
            "- type: metrics-data-source\n  parameters: {scheme: https, insecureSkipVerify: false}\n",
        )
        .unwrap();
        assert!(verified.https && !verified.insecure_skip_verify);
        assert_eq!(source("").unwrap(), MetricsSource::default());
    }

    #[test]
    fn trtllm_serve_and_triton_pods_are_scraped_with_their_own_names() {
        let table = engine::EngineTable::builtin();
        let trt = engine::Engine::from_labels(
            &[(engine::ENGINE_LABEL.to_owned(), "trtllm-serve".to_owned())].into(),
        )
        .expect("a trtllm-serve pod is accepted");
        let page = "trtllm_num_requests_waiting 3\ntrtllm_num_requests_running 5\n\
                    trtllm_kv_cache_utilization 0.25\ntrtllm_kv_cache_tokens_per_block 32\n\
                    trtllm_kv_cache_max_blocks 4096\n";
        let m = table.extract(trt, page, Instant::now()).unwrap();
        assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (3, 5, 0.25));
        assert_eq!(
            (m.cache_block_size, m.cache_num_blocks),
            (Some(32), Some(4096))
        );
        let triton = engine::Engine::named("triton-tensorrt-llm").unwrap();
        let page = "nv_trt_llm_request_metrics{request_type=\"waiting\"} 2\n\
                    nv_trt_llm_request_metrics{request_type=\"scheduled\"} 7\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.5\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"} 100\n";
        let m = table.extract(triton, page, Instant::now()).unwrap();
        assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (2, 7, 0.5));
        assert_eq!(m.cache_num_blocks, Some(100));
    }

    #[test]
    fn model_list() {
        let ids = parse_model_list(
            br#"{"object":"list","data":[{"id":"b","object":"model"},{"id":"a"}]}"#,
        )
        .unwrap();
        assert_eq!(ids, ["a", "b"]);
        assert!(parse_model_list(b"{}").is_err());
    }
}

#[cfg(test)]
mod fetch_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::Router;
    use axum::routing::get;
    use tokio::net::TcpListener;

    use super::*;
    use crate::discovery::EndpointSpec;
    use crate::scrape::engine::Engine;
    use crate::upstream::http_client;

    const PAGE: &str =
        "vllm:num_requests_waiting 2\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.25\n";

    fn scraping(cfg: ScrapeConfig, models: ModelsFeed, metrics: Arc<NodeMetrics>) -> Scraping {
        Scraping {
            client: ScrapeClient::Http(http_client(Duration::from_millis(200))),
            cfg,
            models,
            metrics,
            source: Arc::new(MetricsSource::default()),
            sink: None,
        }
    }

    async fn serve(listener: TcpListener) -> tokio::task::JoinHandle<()> {
        serve_counting(listener, Arc::default(), Arc::default()).await
    }

    /// A pod whose `/metrics` and `/v1/models` answers are counted.
    async fn serve_counting(
        listener: TcpListener,
        metrics_reads: Arc<std::sync::atomic::AtomicUsize>,
        models_reads: Arc<std::sync::atomic::AtomicUsize>,
    ) -> tokio::task::JoinHandle<()> {
        // `connection: close` so that stopping the listener stops the pod (no kept-alive socket).
        let close = || [(http::header::CONNECTION, "close")];
        let app = Router::new()
            .route(
                "/metrics",
                get(move || async move {
                    metrics_reads.fetch_add(1, Ordering::Relaxed);
                    (close(), PAGE)
                }),
            )
            .route(
                "/v1/models",
                get(move || async move {
                    models_reads.fetch_add(1, Ordering::Relaxed);
                    (close(), r#"{"data":[{"id":"m"}]}"#)
                }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn pods_are_not_asked_for_models_the_pool_file_lists() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = serve_counting(listener, scrapes.clone(), reads.clone()).await;
        let slot = Arc::new(EndpointSlot::new(EndpointSpec {
            address: addr,
            pod: "p".into(),
            labels: Default::default(),
            engine: Engine::Vllm,
        }));
        let (tx, _rx) = mpsc::channel(8);
        let feed = ModelsFeed {
            tx,
            wanted: Arc::new(AtomicBool::new(false)),
        };
        let metrics = Arc::new(NodeMetrics::new());
        let cfg = ScrapeConfig {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(500),
            // Re-read at every scrape if reads were wanted.
            models_refresh: Duration::ZERO,
        };
        let task = spawn_scraper(
            &tokio::runtime::Handle::current(),
            slot.clone(),
            scraping(cfg, feed.clone(), metrics.clone()),
        );
        wait_until("five scrapes", || scrapes.load(Ordering::Relaxed) >= 5).await;
        assert_eq!(
            reads.load(Ordering::Relaxed),
            0,
            "models listed: never asked"
        );
        // The file stops listing models: the pods are asked.
        feed.wanted.store(true, Ordering::Relaxed);
        wait_until("the pod is asked", || reads.load(Ordering::Relaxed) > 0).await;
        task.abort();
        server.abort();
    }

    #[tokio::test]
    async fn a_pod_that_stops_answering_goes_down_and_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve(listener).await;
        let slot = Arc::new(EndpointSlot::new(EndpointSpec {
            address: addr,
            pod: "p".into(),
            labels: Default::default(),
            engine: Engine::Vllm,
        }));
        let (tx, mut rx) = mpsc::channel(8);
        let cfg = ScrapeConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            models_refresh: Duration::from_secs(60),
        };
        let task = spawn_scraper(
            &tokio::runtime::Handle::current(),
            slot.clone(),
            scraping(cfg, ModelsFeed::always(tx), Arc::new(NodeMetrics::new())),
        );
        wait_until("the pod is up", || slot.is_up()).await;
        let m = slot.metrics().unwrap();
        assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (2, 1, 0.25));
        match rx.recv().await {
            Some(PoolInput::Models { addr: a, models }) => {
                assert_eq!((a, models), (addr, vec!["m".to_owned()]))
            }
            other => panic!("expected the pod's models, got {other:?}"),
        }

        server.abort();
        let _ = server.await;
        wait_until("the pod is down", || !slot.is_up()).await;

        let server = serve(TcpListener::bind(addr).await.unwrap()).await;
        wait_until("the pod is back", || slot.is_up()).await;
        task.abort();
        server.abort();
    }
}

#[cfg(test)]
mod https_tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::discovery::EndpointSpec;
    use crate::scrape::engine::Engine;
    use crate::upstream::http_client;

    /// A pod serving its metrics page over TLS only (a certificate from a private CA), and
    /// counting the plaintext requests it refuses.
    async fn tls_pod() -> SocketAddr {
        let ca = infermesh_testkit::certs::TestCa::new("pod-ca");
        let leaf = ca.leaf("pod", false);
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let body = "vllm:num_requests_waiting 3\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    fn slot(addr: SocketAddr) -> Arc<EndpointSlot> {
        Arc::new(EndpointSlot::new(EndpointSpec {
            address: addr,
            pod: "p".into(),
            labels: Default::default(),
            engine: Engine::Vllm,
        }))
    }

    fn scraping(
        client: ScrapeClient,
        source: MetricsSource,
        metrics: Arc<NodeMetrics>,
    ) -> Scraping {
        let (tx, _rx) = mpsc::channel(8);
        Scraping {
            client,
            cfg: ScrapeConfig {
                interval: Duration::from_millis(20),
                timeout: Duration::from_millis(500),
                models_refresh: Duration::from_secs(3600),
            },
            models: ModelsFeed {
                tx,
                wanted: Arc::new(AtomicBool::new(false)),
            },
            metrics,
            source: Arc::new(source),
            sink: None,
        }
    }

    async fn scrapes(source: MetricsSource, addr: SocketAddr) -> (bool, Arc<NodeMetrics>) {
        let metrics = Arc::new(NodeMetrics::new());
        let client = ScrapeClient::for_source(
            &source,
            http_client(Duration::from_millis(500)),
            Duration::from_millis(500),
        )
        .expect("client builds");
        let s = slot(addr);
        let task = spawn_scraper(
            &tokio::runtime::Handle::current(),
            s.clone(),
            scraping(client, source, metrics.clone()),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !s.is_up() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        let up = s.is_up() && s.metrics().is_some_and(|m| m.waiting_queue == 3);
        (up, metrics)
    }

    #[tokio::test]
    async fn https_pods_are_scraped_with_insecure_skip_verify_and_refused_without_a_trusted_ca() {
        let addr = tls_pod().await;
        let https = |insecure| MetricsSource {
            https: true,
            insecure_skip_verify: insecure,
            ..MetricsSource::default()
        };
        let (up, _) = scrapes(https(true), addr).await;
        assert!(
            up,
            "insecureSkipVerify: the self-signed pod is scraped over TLS"
        );
        // Verifying against the platform's roots: the private CA is unknown, never up.
        // (Skipped where the machine has no CA bundle: then the client cannot be built.)
        if rustls_native_certs::load_native_certs().certs.is_empty() {
            return;
        }
        let (up, metrics) = scrapes(https(false), addr).await;
        assert!(!up, "an untrusted pod certificate is refused");
        let text = metrics.render(&crate::pool::PoolView::default(), std::time::Instant::now());
        assert!(
            !text.contains(
                "llm_d_epp_datalayer_poll_errors_total{source_type=\"metrics-data-source\"} 0"
            ),
            "the refusals are counted"
        );
        // Plain HTTP to a TLS-only pod fails too (what scheme: http would do).
        let (up, _) = scrapes(MetricsSource::default(), addr).await;
        assert!(!up);
    }
}
