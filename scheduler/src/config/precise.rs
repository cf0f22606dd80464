//! Parameters of precise prefix routing: `token-producer` (alias `tokenizer`) and
//! `precise-prefix-cache-producer` (also the deprecated `precise-prefix-cache-scorer`),
//! with llm-d v0.10's names and defaults (`llm-d-kv-cache docs/configuration.md`,
//! `.../dataproducer/tokenizer/README.md`, `.../preciseprefixcache/README.md`).
//!
//! What infermesh does differently is refused by name rather than ignored: an external
//! index backend (Redis, Valkey), the global-socket subscription mode, SGLang's event
//! format, the UDS tokenizer sidecar and the indexer's own tokenizer pool.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::params::{ParamProblem, go_duration};

fn problem(field: &str, reason: impl Into<String>) -> ParamProblem {
    (field.to_owned(), reason.into())
}

/// `token-producer`: where the prompt's token ids come from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenProducerParams {
    /// Model whose tokenizer is used (sent in render requests); selects the `vllm` backend.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model_name: String,
    /// vLLM's render endpoints (`/v1/completions/render`, `/v1/chat/completions/render`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vllm: Option<VllmRenderParams>,
    /// A local HuggingFace `tokenizer.json` (infermesh extension): completions are
    /// tokenized in-process; chat requests are rendered by the model server (the chat
    /// template belongs to the model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalTokenizerParams>,
    /// The tokenizer-free `estimate` backend's multimodal settings (accepted; infermesh
    /// estimates text only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<serde_json::Value>,
    /// The deprecated UDS tokenizer sidecar (refused).
    #[serde(skip_serializing)]
    pub uds_tokenizer_config: Option<serde_json::Value>,
}

/// `token-producer.vllm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct VllmRenderParams {
    /// Base URL of a render endpoint. llm-d defaults to `http://localhost:8000` (a render
    /// sidecar); infermesh, which knows the pool, asks one of the request's candidate pods
    /// when this is unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Older spelling of `url` in llm-d examples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Per-request timeout for text requests (Go duration).
    #[serde(with = "go_duration")]
    pub timeout: Duration,
    /// Per-request timeout for multimodal requests (Go duration).
    #[serde(with = "go_duration")]
    pub mm_timeout: Duration,
    /// How chat messages are rendered (`native` is the only mode vLLM's render offers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_render_mode: Option<String>,
}

impl Default for VllmRenderParams {
    fn default() -> Self {
        VllmRenderParams {
            url: None,
            http: None,
            timeout: Duration::from_secs(5),
            mm_timeout: Duration::from_secs(30),
            messages_render_mode: None,
        }
    }
}

impl VllmRenderParams {
    /// The configured base URL (`url`, else `http`), without a trailing slash.
    pub fn base_url(&self) -> Option<&str> {
        self.url
            .as_deref()
            .or(self.http.as_deref())
            .map(|u| u.trim_end_matches('/'))
    }
}

/// `token-producer.local` (infermesh extension).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LocalTokenizerParams {
    /// Path of the model's `tokenizer.json`.
    pub tokenizer_path: String,
}

/// Which token-producer backend a configuration selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenBackend {
    /// Byte packing, about 4 bytes per token; the ids match no engine's.
    Estimate,
    /// vLLM's render endpoints.
    VllmRender,
    /// A local `tokenizer.json`, with render for chat.
    Local,
}

impl TokenBackend {
    /// The backend's name (a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenBackend::Estimate => "estimate",
            TokenBackend::VllmRender => "render",
            TokenBackend::Local => "local",
        }
    }
}

impl TokenProducerParams {
    /// The selected backend (llm-d: `vllm` or `modelName` → render, else `estimate`).
    pub fn backend(&self) -> TokenBackend {
        if self.local.is_some() {
            TokenBackend::Local
        } else if self.vllm.is_some() || !self.model_name.is_empty() {
            TokenBackend::VllmRender
        } else {
            TokenBackend::Estimate
        }
    }

    /// The render settings (llm-d's defaults when no `vllm` block is given).
    pub fn render(&self) -> VllmRenderParams {
        self.vllm.clone().unwrap_or_default()
    }

    /// llm-d's checks plus what infermesh refuses.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.uds_tokenizer_config.is_some() {
            return Err(problem(
                "udsTokenizerConfig",
                "the UDS tokenizer sidecar is deprecated in llm-d and not supported; use vllm.url (a render endpoint) or local.tokenizerPath",
            ));
        }
        if let Some(v) = &self.vllm {
            if v.url.is_some() && v.http.is_some() {
                return Err(problem("vllm.http", "set url or http, not both"));
            }
            if let Some(u) = v.base_url()
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                return Err(problem(
                    "vllm.url",
                    format!("{u:?} is not an http:// or https:// URL"),
                ));
            }
            if v.timeout.is_zero() {
                return Err(problem("vllm.timeout", "must be > 0"));
            }
            if let Some(m) = &v.messages_render_mode
                && m != "native"
            {
                return Err(problem(
                    "vllm.messagesRenderMode",
                    format!("{m:?} is not supported; the only mode is \"native\""),
                ));
            }
        }
        if let Some(l) = &self.local
            && l.tokenizer_path.trim().is_empty()
        {
            return Err(problem(
                "local.tokenizerPath",
                "must name a tokenizer.json file",
            ));
        }
        Ok(())
    }
}

/// `precise-prefix-cache-producer` (and what the deprecated `precise-prefix-cache-scorer`
/// wraps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PrecisePrefixParams {
    /// How tokens become block keys.
    pub token_processor_config: TokenProcessorConfig,
    /// The index (infermesh: the mesh's prefix store, sharded by anchor owner).
    pub indexer_config: IndexerConfig,
    /// Where events come from.
    pub kv_events_config: KvEventsConfig,
    /// Seed the picked endpoint's entries right after a pick, before the engine confirms.
    pub speculative_indexing: bool,
    /// How long speculative entries live (Go duration).
    #[serde(with = "go_duration")]
    #[serde(rename = "speculativeTTL")]
    pub speculative_ttl: Duration,
}

impl Default for PrecisePrefixParams {
    fn default() -> Self {
        PrecisePrefixParams {
            token_processor_config: TokenProcessorConfig::default(),
            indexer_config: IndexerConfig::default(),
            kv_events_config: KvEventsConfig::default(),
            speculative_indexing: false,
            speculative_ttl: Duration::from_secs(2),
        }
    }
}

impl PrecisePrefixParams {
    /// Tokens per block (the engine's block size).
    pub fn block_size(&self) -> usize {
        usize::try_from(self.token_processor_config.block_size).unwrap_or(0)
    }

    /// Checks every field; infermesh's refusals name the field and say why.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        let t = &self.token_processor_config;
        if t.block_size <= 0 {
            return Err(problem("tokenProcessorConfig.blockSize", "must be > 0"));
        }
        if t.max_prefix_blocks_to_match < 0 {
            return Err(problem(
                "tokenProcessorConfig.maxPrefixBlocksToMatch",
                "must be >= 0",
            ));
        }
        let i = &self.indexer_config;
        if i.tokenizers_pool_config.is_some() {
            return Err(problem(
                "indexerConfig.tokenizersPoolConfig",
                "is not supported; configure a token-producer plugin instead",
            ));
        }
        if let Some(k) = &i.kv_block_index_config
            && let Some(m) = &k.in_memory_config
            && (m.size < 0 || m.pod_cache_size < 0)
        {
            return Err(problem(
                "indexerConfig.kvBlockIndexConfig.inMemoryConfig",
                "size and podCacheSize must be >= 0",
            ));
        }
        for (n, b) in i.kv_cache_backend_configs.iter().enumerate() {
            let field = format!("indexerConfig.kvCacheBackendConfigs[{n}]");
            if !b.weight.is_finite() || b.weight < 0.0 {
                return Err(problem(&field, "weight must be a finite number >= 0"));
            }
            match b.name.as_str() {
                "gpu" => {}
                "cpu" if b.weight == 0.0 => {}
                "cpu" => {
                    return Err(problem(
                        &field,
                        "infermesh indexes GPU blocks only (CPU-offload events carry no tokens); the cpu weight must be 0",
                    ));
                }
                other => {
                    return Err(problem(
                        &field,
                        format!("unknown backend {other:?}; known: gpu, cpu"),
                    ));
                }
            }
        }
        let e = &self.kv_events_config;
        if !e.zmq_endpoint.is_empty() {
            return Err(problem(
                "kvEventsConfig.zmqEndpoint",
                "the global-socket mode is not supported: infermesh subscribes to each pod (discoverPods: true)",
            ));
        }
        if !e.discover_pods {
            return Err(problem(
                "kvEventsConfig.discoverPods",
                "must be true: infermesh subscribes to each pod of the pool",
            ));
        }
        if e.engine_type != "vllm" {
            return Err(problem(
                "kvEventsConfig.engineType",
                format!(
                    "{:?} is not supported; infermesh decodes vLLM's KV events",
                    e.engine_type
                ),
            ));
        }
        if e.concurrency <= 0 {
            return Err(problem("kvEventsConfig.concurrency", "must be > 0"));
        }
        let port = e.pod_discovery_config.socket_port;
        if !(1..=65535).contains(&port) {
            return Err(problem(
                "kvEventsConfig.podDiscoveryConfig.socketPort",
                format!("{port} is not a TCP port"),
            ));
        }
        if self.speculative_ttl.is_zero() && self.speculative_indexing {
            return Err(problem("speculativeTTL", "must be > 0"));
        }
        Ok(())
    }

    /// Parameters accepted with a different effect than in llm-d (shown by
    /// `config check` and logged at load).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let e = &self.kv_events_config;
        if e.concurrency != KvEventsConfig::default().concurrency {
            w.push(
                "kvEventsConfig.concurrency: infermesh applies each pod's events on its own task; the value is not used".into(),
            );
        }
        if e.pod_discovery_config.pod_label_selector
            != PodDiscoveryConfig::default().pod_label_selector
            || !e.pod_discovery_config.pod_namespace.is_empty()
        {
            w.push(
                "kvEventsConfig.podDiscoveryConfig: infermesh follows the pods of its own pool; podLabelSelector and podNamespace are not used".into(),
            );
        }
        if !self.token_processor_config.hash_seed.is_empty() {
            w.push(
                "tokenProcessorConfig.hashSeed: request keys are computed by infermesh on both sides (events and requests), so the seed changes no match; it is not used".into(),
            );
        }
        w
    }
}

/// `tokenProcessorConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenProcessorConfig {
    /// Tokens per block; must equal the engines' block size (vLLM: 16).
    #[serde(alias = "blockSizeTokens")]
    pub block_size: i64,
    /// llm-d's key-chain seed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hash_seed: String,
    /// Most blocks looked up per request (infermesh bound; 0 = no bound).
    pub max_prefix_blocks_to_match: i64,
}

impl Default for TokenProcessorConfig {
    fn default() -> Self {
        TokenProcessorConfig {
            block_size: 16,
            hash_seed: String::new(),
            max_prefix_blocks_to_match: 2048,
        }
    }
}

/// `indexerConfig`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct IndexerConfig {
    /// The block index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_block_index_config: Option<KvBlockIndexConfig>,
    /// Per-medium weights of a cached block.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kv_cache_backend_configs: Vec<BackendWeight>,
    /// The indexer's own tokenizer pool (refused: use a token-producer).
    #[serde(skip_serializing)]
    pub tokenizers_pool_config: Option<serde_json::Value>,
}

/// `indexerConfig.kvBlockIndexConfig`: the in-memory index only.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KvBlockIndexConfig {
    /// Sizes of the in-memory index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_memory_config: Option<InMemoryIndexConfig>,
    /// Export index metrics.
    pub enable_metrics: bool,
    /// Log index metrics this often (nanoseconds, as llm-d writes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_logging_interval: Option<i64>,
}

/// `inMemoryConfig`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct InMemoryIndexConfig {
    /// Keys held (llm-d default 1e8).
    pub size: i64,
    /// Pods per key (llm-d default 10).
    pub pod_cache_size: i64,
}

/// One `kvCacheBackendConfigs` entry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BackendWeight {
    /// `gpu` or `cpu`.
    pub name: String,
    /// Score weight of a block cached there.
    pub weight: f64,
}

/// `kvEventsConfig` (llm-d-kv-cache `kvevents.Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KvEventsConfig {
    /// Global-socket endpoint (refused when set).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zmq_endpoint: String,
    /// ZMQ topic prefix subscribed to.
    pub topic_filter: String,
    /// llm-d's worker count.
    pub concurrency: i64,
    /// Subscribe to every pod (the only mode infermesh has).
    pub discover_pods: bool,
    /// Where each pod publishes.
    pub pod_discovery_config: PodDiscoveryConfig,
    /// Event format (`vllm`).
    pub engine_type: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            zmq_endpoint: String::new(),
            topic_filter: "kv@".into(),
            concurrency: 4,
            discover_pods: true,
            pod_discovery_config: PodDiscoveryConfig::default(),
            engine_type: "vllm".into(),
        }
    }
}

/// `kvEventsConfig.podDiscoveryConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PodDiscoveryConfig {
    /// Pods whose events are read (llm-d's Kubernetes selector).
    pub pod_label_selector: String,
    /// Namespace of those pods (empty: the EPP's).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod_namespace: String,
    /// The pods' KV-event PUB port.
    pub socket_port: i64,
}

impl Default for PodDiscoveryConfig {
    fn default() -> Self {
        PodDiscoveryConfig {
            pod_label_selector: "llm-d.ai/inference-serving=true".into(),
            pod_namespace: String::new(),
            socket_port: 5557,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_yaml_ng::from_str(s).unwrap()
    }

    #[test]
    fn llm_d_defaults() {
        let p = PrecisePrefixParams::default();
        assert_eq!(p.block_size(), 16);
        assert_eq!(p.kv_events_config.pod_discovery_config.socket_port, 5557);
        assert_eq!(p.kv_events_config.topic_filter, "kv@");
        assert_eq!(p.speculative_ttl, Duration::from_secs(2));
        assert!(!p.speculative_indexing);
        assert!(p.validate().is_ok());
        assert_eq!(
            TokenProducerParams::default().backend(),
            TokenBackend::Estimate
        );
    }

    #[test]
    fn llm_d_guide_config_parses() {
        let p: PrecisePrefixParams = yaml(
            "tokenProcessorConfig: {blockSize: 64}\nspeculativeIndexing: true\nspeculativeTTL: 500ms\nindexerConfig: {kvBlockIndexConfig: {enableMetrics: true, inMemoryConfig: {podCacheSize: 128}}, kvCacheBackendConfigs: [{name: gpu, weight: 1.0}, {name: cpu, weight: 0.0}]}\nkvEventsConfig: {topicFilter: 'kv@', engineType: vllm, concurrency: 8, discoverPods: true, podDiscoveryConfig: {socketPort: 5556}}",
        );
        assert!(p.validate().is_ok());
        assert_eq!(p.block_size(), 64);
        assert_eq!(p.speculative_ttl, Duration::from_millis(500));
        assert_eq!(p.kv_events_config.pod_discovery_config.socket_port, 5556);
        assert_eq!(p.warnings().len(), 1, "{:?}", p.warnings());
        let alias: PrecisePrefixParams =
            yaml("tokenProcessorConfig: {blockSizeTokens: 16, hashSeed: '42'}");
        assert_eq!(alias.block_size(), 16);
        assert!(alias.warnings()[0].contains("hashSeed"));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                "indexerConfig: {tokenizersPoolConfig: {modelName: m}}",
                "indexerConfig.tokenizersPoolConfig",
            ),
            (
                "kvEventsConfig: {zmqEndpoint: 'tcp://*:5557'}",
                "kvEventsConfig.zmqEndpoint",
            ),
            (
                "kvEventsConfig: {discoverPods: false}",
                "kvEventsConfig.discoverPods",
            ),
            (
                "kvEventsConfig: {engineType: sglang}",
                "kvEventsConfig.engineType",
            ),
            (
                "kvEventsConfig: {podDiscoveryConfig: {socketPort: 70000}}",
                "kvEventsConfig.podDiscoveryConfig.socketPort",
            ),
            (
                "tokenProcessorConfig: {blockSize: 0}",
                "tokenProcessorConfig.blockSize",
            ),
            (
                "indexerConfig: {kvCacheBackendConfigs: [{name: cpu, weight: 0.5}]}",
                "indexerConfig.kvCacheBackendConfigs[0]",
            ),
        ];
        for (src, field) in cases {
            let p: PrecisePrefixParams = yaml(src);
            assert_eq!(p.validate().unwrap_err().0, field, "{src}");
        }
        let redis: Result<PrecisePrefixParams, _> =
            serde_yaml_ng::from_str("indexerConfig: {kvBlockIndexConfig: {redisConfig: {}}}");
        assert!(redis.unwrap_err().to_string().contains("redisConfig"));
    }

    #[test]
    fn token_producer_backends() {
        let render: TokenProducerParams = yaml("modelName: m\nvllm: {url: 'http://render:8000/'}");
        assert_eq!(render.backend(), TokenBackend::VllmRender);
        assert_eq!(render.render().base_url(), Some("http://render:8000"));
        assert!(render.validate().is_ok());
        let model_only: TokenProducerParams = yaml("modelName: m");
        assert_eq!(model_only.backend(), TokenBackend::VllmRender);
        assert_eq!(model_only.render().timeout, Duration::from_secs(5));
        let local: TokenProducerParams = yaml("local: {tokenizerPath: /t/tokenizer.json}");
        assert_eq!(local.backend(), TokenBackend::Local);
        let uds: TokenProducerParams = yaml("udsTokenizerConfig: {socketFile: /tmp/s}");
        assert_eq!(uds.validate().unwrap_err().0, "udsTokenizerConfig");
        let bad_url: TokenProducerParams = yaml("vllm: {url: 'render:8000'}");
        assert_eq!(bad_url.validate().unwrap_err().0, "vllm.url");
    }
}

#[cfg(test)]
mod loader_tests {
    use crate::config::load_config;
    use crate::config::registry::PluginSpec;
    use crate::{InferenceRequest, Scheduler};

    const PRECISE: &str = r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: m
    vllm: {url: "http://render:8000"}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSize: 4}
    kvEventsConfig: {podDiscoveryConfig: {socketPort: 5600}}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
"#;

    #[test]
    fn precise_config_resolves_and_keys_tokens() {
        let cfg = load_config(PRECISE).unwrap();
        assert_eq!(
            cfg.prefix_producer.as_deref(),
            Some("precise-prefix-cache-producer")
        );
        assert_eq!(cfg.token_producer.as_deref(), Some("token-producer"));
        let s = Scheduler::new(&cfg).unwrap();
        let p = s.precise_prefix().expect("precise producer");
        assert_eq!(
            p.params().kv_events_config.pod_discovery_config.socket_port,
            5600
        );
        assert!(s.prefix_index().is_none());
        assert!(s.token_producer().is_some());
        let req = InferenceRequest {
            target_model: "m".into(),
            prompt_tokens: Some((1..=10).collect::<Vec<u32>>().into()),
            ..Default::default()
        };
        let chain = s.prefix_chain(&req, &[]).unwrap();
        let seed = crate::prefix::request_seed("m", None);
        let tokens: Vec<u32> = (1..=10).collect();
        assert_eq!(
            chain.hashes,
            crate::prefix::request_keys(seed, &tokens, 4, 99)
        );
        assert_eq!(chain.block_size_tokens, 4);
        // Without tokens there is nothing to key.
        let bare = InferenceRequest::default();
        assert!(s.prefix_chain(&bare, &[]).unwrap().hashes.is_empty());
    }

    #[test]
    fn deprecated_scorer_expands_to_producer_and_scorer() {
        let yaml = r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {tokenProcessorConfig: {blockSize: 16}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
    weight: 10
  - pluginRef: max-score-picker
"#;
        let cfg = load_config(yaml).unwrap();
        assert_eq!(
            cfg.prefix_producer.as_deref(),
            Some("precise-prefix-cache-producer")
        );
        assert!(matches!(
            cfg.plugin("precise-prefix-cache-producer").unwrap().spec,
            PluginSpec::PrecisePrefixCacheProducer(_)
        ));
        // No token-producer: the estimate backend is added, with a warning.
        assert_eq!(cfg.token_producer.as_deref(), Some("token-producer"));
        assert!(cfg.warnings.iter().any(|w| w.contains("deprecated")));
        assert!(cfg.warnings.iter().any(|w| w.contains("estimate")));
        assert!(Scheduler::new(&cfg).unwrap().precise_prefix().is_some());
    }

    #[test]
    fn one_prefix_producer() {
        let both = PRECISE.replace(
            "- type: max-score-picker",
            "- type: approx-prefix-cache-producer\n- type: max-score-picker",
        );
        let e = load_config(&both).unwrap_err().to_string();
        assert!(e.contains("one prefix producer"), "{e}");
        let wrong_name = PRECISE.replace(
            "prefixMatchInfoProducerName: precise-prefix-cache-producer",
            "prefixMatchInfoProducerName: nope",
        );
        let e = load_config(&wrong_name).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let two_tokenizers = PRECISE.replace(
            "- type: endpoint-notification-source",
            "- type: tokenizer\n  name: second",
        );
        let e = load_config(&two_tokenizers).unwrap_err().to_string();
        assert!(e.contains("second token-producer"), "{e}");
    }
}
