//! Which metric names a pod's engine uses, and turning one metrics page into
//! [`Metrics`] (llm-d's `core-metrics-extractor`, reference §3).

use std::time::Instant;

use infermesh_scheduler::config::params::{CoreMetricsExtractorParams, EngineConfig, MetricSpec};
use infermesh_scheduler::{LoraState, Metrics};

use super::prom_text::{self, InvalidExposition, Sample};

pub use crate::pool_model::{ENGINE_LABEL, Engine, LEGACY_ENGINE_LABEL, UnknownEngine};

/// One metric an engine exports: a family name and the labels a sample must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    name: String,
    labels: Vec<(String, String)>,
}

impl Spec {
    fn parse(engine: &str, field: &'static str, text: &str) -> Result<Option<Spec>, InvalidEngine> {
        let spec = MetricSpec::parse(text).map_err(|reason| InvalidEngine {
            engine: engine.to_owned(),
            field,
            reason,
        })?;
        Ok(spec.map(|s| Spec {
            name: s.name,
            labels: s.labels.into_iter().collect(),
        }))
    }

    fn matches(&self, s: &Sample<'_>) -> bool {
        s.name == self.name
            && self
                .labels
                .iter()
                .all(|(k, v)| s.label(k).is_some_and(|got| got == v.as_str()))
    }
}

/// One engine's metric names (llm-d `engineConfigs[]`), compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMetrics {
    name: String,
    waiting: Spec,
    running: Spec,
    // Preferred first: vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (V1);
    // llm-d reads the new name, older servers still export the old one.
    kv_usage: Vec<Spec>,
    lora: Option<Spec>,
    cache_info: Option<Spec>,
    block_size_label: String,
    num_blocks_label: String,
    block_size: Option<Spec>,
    num_blocks: Option<Spec>,
}

/// An `engineConfigs` entry the extractor cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("engine {engine:?}: {field}: {reason}")]
pub struct InvalidEngine {
    /// The engine's name.
    pub engine: String,
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl EngineMetrics {
    fn compile(c: &EngineConfig) -> Result<EngineMetrics, InvalidEngine> {
        let n = c.name.as_str();
        let required = |field: &'static str, text: &str| -> Result<Spec, InvalidEngine> {
            Spec::parse(n, field, text)?.ok_or_else(|| InvalidEngine {
                engine: n.to_owned(),
                field,
                reason: "is required".into(),
            })
        };
        let mut kv_usage = vec![required("kvUsageSpec", &c.kv_usage_spec)?];
        if c.kv_usage_spec == "vllm:kv_cache_usage_perc" {
            kv_usage.push(Spec {
                name: "vllm:gpu_cache_usage_perc".into(),
                labels: Vec::new(),
            });
        }
        Ok(EngineMetrics {
            name: n.to_owned(),
            waiting: required("queuedRequestsSpec", &c.queued_requests_spec)?,
            running: required("runningRequestsSpec", &c.running_requests_spec)?,
            kv_usage,
            lora: Spec::parse(n, "loraSpec", &c.lora_spec)?,
            cache_info: Spec::parse(n, "cacheInfoSpec", &c.cache_info_spec)?,
            block_size_label: if c.cache_block_size_label_name.is_empty() {
                "block_size".into()
            } else {
                c.cache_block_size_label_name.clone()
            },
            num_blocks_label: if c.cache_num_blocks_label_name.is_empty() {
                "num_gpu_blocks".into()
            } else {
                c.cache_num_blocks_label_name.clone()
            },
            block_size: Spec::parse(n, "cacheBlockSizeSpec", &c.cache_block_size_spec)?,
            num_blocks: Spec::parse(n, "cacheNumBlocksSpec", &c.cache_num_blocks_spec)?,
        })
    }
}

/// The metric names of every engine the extractor knows: llm-d's built-ins (vllm, sglang,
/// trtllm-serve, triton-tensorrt-llm), each replaceable through `core-metrics-extractor`'s
/// `engineConfigs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTable {
    engines: Vec<EngineMetrics>,
}

impl EngineTable {
    /// llm-d's built-in engines (compiled once per process).
    pub fn builtin() -> &'static EngineTable {
        static BUILTIN: std::sync::LazyLock<EngineTable> = std::sync::LazyLock::new(|| {
            EngineTable::from_params(&CoreMetricsExtractorParams::default())
                .expect("the built-in engine configs compile")
        });
        &BUILTIN
    }

    /// The engines of a `core-metrics-extractor` (built-ins merged in, as llm-d does).
    pub fn from_params(p: &CoreMetricsExtractorParams) -> Result<EngineTable, InvalidEngine> {
        let mut p = p.clone();
        if let Err((field, reason)) = p.normalize() {
            return Err(InvalidEngine {
                engine: p.default_engine.clone(),
                field: "engineConfigs",
                reason: format!("{field}: {reason}"),
            });
        }
        let engines = p
            .engine_configs
            .iter()
            .map(EngineMetrics::compile)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EngineTable { engines })
    }

    /// The metric names of `engine`.
    pub fn get(&self, engine: Engine) -> &EngineMetrics {
        self.engines
            .iter()
            .find(|e| e.name == engine.name())
            .expect("the table holds every built-in engine")
    }

    /// Extracts the scheduler's view of a pod running `engine` from one metrics page.
    pub fn extract(
        &self,
        engine: Engine,
        page: &str,
        scraped_at: Instant,
    ) -> Result<Metrics, ExtractError> {
        extract_with(self.get(engine), page, scraped_at)
    }
}

/// Why a metrics page could not be turned into [`Metrics`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// The page is not valid exposition text.
    #[error("metrics page is malformed: {0}")]
    Malformed(#[from] InvalidExposition),
    /// A required family is absent (wrong engine label, or not a model server).
    #[error("metrics page has no {0} series")]
    Missing(String),
}

/// Extracts the scheduler's view of a pod from one metrics page, with llm-d's built-in
/// metric names for `engine`.
pub fn extract(engine: Engine, page: &str, scraped_at: Instant) -> Result<Metrics, ExtractError> {
    EngineTable::builtin().extract(engine, page, scraped_at)
}

fn extract_with(
    names: &EngineMetrics,
    page: &str,
    scraped_at: Instant,
) -> Result<Metrics, ExtractError> {
    let mut waiting: Option<f64> = None;
    let mut running: Option<f64> = None;
    // (priority index in `kv_usage`, value): the preferred name wins over fallbacks.
    let mut kv: Option<(usize, f64)> = None;
    let mut lora: Option<(f64, LoraState)> = None;
    let mut block_size = None;
    let mut num_blocks = None;
    prom_text::parse(page, |s: Sample<'_>| {
        if names.waiting.matches(&s) {
            *waiting.get_or_insert(0.0) += s.value;
        } else if names.running.matches(&s) {
            *running.get_or_insert(0.0) += s.value;
        } else if let Some(rank) = names.kv_usage.iter().position(|n| n.matches(&s)) {
            // Several engines (data parallel) in one server: the fullest one limits it.
            kv = match kv {
                Some((r, v)) if r < rank => Some((r, v)),
                Some((r, v)) if r == rank => Some((r, v.max(s.value))),
                _ => Some((rank, s.value)),
            };
        } else if names.lora.as_ref().is_some_and(|l| l.matches(&s)) {
            // The value is a timestamp; the newest series is the current state.
            if lora.as_ref().is_none_or(|(ts, _)| s.value >= *ts) {
                lora = Some((s.value, lora_state(&s)));
            }
        } else if names.cache_info.as_ref().is_some_and(|c| c.matches(&s)) {
            block_size = s
                .label(&names.block_size_label)
                .and_then(|v| v.parse::<u32>().ok());
            num_blocks = s
                .label(&names.num_blocks_label)
                .and_then(|v| v.parse::<u64>().ok());
        } else if names.block_size.as_ref().is_some_and(|c| c.matches(&s)) {
            block_size = Some(clamp_count(s.value));
        } else if names.num_blocks.as_ref().is_some_and(|c| c.matches(&s)) {
            num_blocks = Some(u64::from(clamp_count(s.value)));
        }
    })?;
    let missing = |spec: &Spec| ExtractError::Missing(spec.name.clone());
    let waiting = waiting.ok_or_else(|| missing(&names.waiting))?;
    let running = running.ok_or_else(|| missing(&names.running))?;
    let (_, kv_usage) = kv.ok_or_else(|| missing(&names.kv_usage[0]))?;
    Ok(Metrics {
        scraped_at,
        waiting_queue: clamp_count(waiting),
        running: clamp_count(running),
        kv_cache_usage: if kv_usage.is_finite() {
            kv_usage.clamp(0.0, 1.0)
        } else {
            1.0
        },
        lora: lora.map(|(_, l)| l),
        cache_block_size: block_size,
        cache_num_blocks: num_blocks,
    })
}

fn clamp_count(v: f64) -> u32 {
    if v.is_finite() && v > 0.0 {
        v.min(u32::MAX as f64) as u32
    } else {
        0
    }
}

fn lora_state(s: &Sample<'_>) -> LoraState {
    let list = |name: &str| -> Vec<String> {
        s.label(name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    LoraState {
        running: list("running_lora_adapters"),
        waiting: list("waiting_lora_adapters"),
        max_lora: s
            .label("max_lora")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const VLLM_PAGE: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.375
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,tweet",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="x"} 1.6e9
vllm:cache_config_info{block_size="16",num_gpu_blocks="31250",cache_dtype="auto"} 1.0
vllm:prompt_tokens_total{model_name="m"} 12345
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 10
"#;

    #[test]
    fn extracts_vllm_page() {
        let now = Instant::now();
        let m = extract(Engine::Vllm, VLLM_PAGE, now).unwrap();
        assert_eq!(m.waiting_queue, 2);
        assert_eq!(m.running, 4);
        assert_eq!(m.kv_cache_usage, 0.375);
        assert_eq!(m.cache_block_size, Some(16));
        assert_eq!(m.cache_num_blocks, Some(31250));
        let lora = m.lora.unwrap();
        assert_eq!(lora.running, vec!["sql-lora", "tweet"]);
        assert!(lora.waiting.is_empty());
        assert_eq!(lora.max_lora, 4);
        assert_eq!(m.scraped_at, now);
    }

    #[test]
    fn old_vllm_kv_name_is_a_fallback_only() {
        let page = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n\
                    vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.1\n";
        let m = extract(Engine::Vllm, page, Instant::now()).unwrap();
        assert_eq!(m.kv_cache_usage, 0.1);
        let old = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.9\n";
        assert_eq!(
            extract(Engine::Vllm, old, Instant::now())
                .unwrap()
                .kv_cache_usage,
            0.9
        );
    }

    #[test]
    fn extracts_sglang_page_by_label() {
        let labels = BTreeMap::from([(ENGINE_LABEL.to_owned(), "sglang".to_owned())]);
        let engine = Engine::from_labels(&labels).unwrap();
        assert_eq!(engine, Engine::Sglang);
        let page = "sglang:num_queue_reqs{model_name=\"m\"} 7\nsglang:num_running_reqs{model_name=\"m\"} 3\n\
                    sglang:token_usage{model_name=\"m\"} 0.5\nsglang:cache_config_info{page_size=\"64\",num_pages=\"1000\"} 1\n";
        let m = extract(engine, page, Instant::now()).unwrap();
        assert_eq!((m.waiting_queue, m.running), (7, 3));
        assert_eq!(m.kv_cache_usage, 0.5);
        assert_eq!(m.cache_block_size, Some(64));
        assert_eq!(m.cache_num_blocks, Some(1000));
        // A vLLM page read with SGLang names names the missing family.
        assert_eq!(
            extract(engine, VLLM_PAGE, Instant::now()).unwrap_err(),
            ExtractError::Missing("sglang:num_queue_reqs".into())
        );
    }

    #[test]
    fn unknown_engine_label_is_an_error() {
        let labels = BTreeMap::from([(ENGINE_LABEL.to_owned(), "tgi".to_owned())]);
        assert_eq!(
            Engine::from_labels(&labels).unwrap_err(),
            UnknownEngine("tgi".into())
        );
        assert_eq!(Engine::from_labels(&BTreeMap::new()).unwrap(), Engine::Vllm);
    }

    #[test]
    fn data_parallel_engines_sum_queues_and_take_the_fullest_cache() {
        let page = "vllm:num_requests_running{engine=\"0\"} 1\nvllm:num_requests_running{engine=\"1\"} 2\n\
                    vllm:num_requests_waiting{engine=\"0\"} 3\nvllm:num_requests_waiting{engine=\"1\"} 4\n\
                    vllm:kv_cache_usage_perc{engine=\"0\"} 0.2\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.6\n";
        let m = extract(Engine::Vllm, page, Instant::now()).unwrap();
        assert_eq!((m.running, m.waiting_queue), (3, 7));
        assert_eq!(m.kv_cache_usage, 0.6);
    }

    #[test]
    fn malformed_page_is_rejected() {
        assert!(matches!(
            extract(Engine::Vllm, "vllm:num_requests_running{ 1", Instant::now()),
            Err(ExtractError::Malformed(_))
        ));
    }
}
