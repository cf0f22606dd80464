//! Renders a pod's engine state as vLLM's Prometheus `/metrics` text.
//!
//! Written by hand rather than through a registry: the names, labels and the
//! `lora_requests_info` timestamp-valued gauge must match vLLM exactly, and a 100-pod
//! process renders on every scrape (50 ms per pod from each router) without allocating a
//! registry per pod.

use std::fmt::Write;

use crate::engine::{Engine, Histogram};

/// Static labels of a pod's metrics.
#[derive(Debug, Clone)]
pub struct MetricsLabels {
    /// Served model name (`model_name` label).
    pub model: String,
    /// LoRA adapter names by index.
    pub lora_adapters: Vec<String>,
}

/// Prometheus text of the engine's state; `wall_secs` is the Unix time used as the value of
/// `vllm:lora_requests_info` (vLLM's convention: the newest series wins).
pub fn render(engine: &Engine, labels: &MetricsLabels, wall_secs: f64) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let l = format!("engine=\"0\",model_name=\"{}\"", escape(&labels.model));
    let p = &engine.config().profile;
    let st = engine.stats();

    gauge(
        &mut out,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        &l,
        engine.num_running() as f64,
    );
    gauge(
        &mut out,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        &l,
        engine.num_waiting() as f64,
    );
    let usage = engine.pool().usage();
    gauge(
        &mut out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        &l,
        usage,
    );
    gauge(
        &mut out,
        "vllm:gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage (deprecated name).",
        &l,
        usage,
    );

    let names = |ids: Vec<u32>| {
        ids.iter()
            .map(|&i| labels.lora_adapters[i as usize].as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let _ = writeln!(
        out,
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
        p.max_loras,
        escape(&names(engine.running_loras())),
        escape(&names(engine.waiting_loras())),
        wall_secs
    );
    let _ = writeln!(
        out,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"0\",num_gpu_blocks=\"{}\",prefix_caching_hash_algo=\"sha256\"}} 1.0",
        p.block_size, p.num_gpu_blocks
    );

    counter(
        &mut out,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        &l,
        st.prefix_cache_queries,
    );
    counter(
        &mut out,
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        &l,
        st.prefix_cache_hits,
    );
    counter(
        &mut out,
        "vllm:mm_cache_queries",
        "Multi-modal cache queries, in terms of number of queried items.",
        &l,
        st.encoder_cache_queries,
    );
    counter(
        &mut out,
        "vllm:mm_cache_hits",
        "Multi-modal cache hits, in terms of number of cached items.",
        &l,
        st.encoder_cache_hits,
    );
    // Not a vLLM metric: images whose encoder output an encode pod sent (E/P/D).
    counter(
        &mut out,
        "infermesh_sim:remote_encoded_images",
        "Images whose encoder output came from an encode pod.",
        &l,
        st.remote_encoded_images,
    );
    counter(
        &mut out,
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        &l,
        st.preemptions,
    );
    counter(
        &mut out,
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        &l,
        st.prompt_tokens,
    );
    counter(
        &mut out,
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        &l,
        st.generation_tokens,
    );
    let _ = writeln!(
        out,
        "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter\nvllm:request_success_total{{{l},finished_reason=\"length\"}} {}\nvllm:request_success_total{{{l},finished_reason=\"stop\"}} {}\nvllm:request_success_total{{{l},finished_reason=\"abort\"}} {}",
        st.finished_length, st.finished_stop, st.aborted
    );

    histogram(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &l,
        &st.ttft,
    );
    histogram(
        &mut out,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &l,
        &st.itl,
    );
    histogram(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &l,
        &st.e2e,
    );
    histogram(
        &mut out,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &l,
        &st.queue,
    );
    histogram(
        &mut out,
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        &l,
        &st.prefill,
    );
    histogram(
        &mut out,
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        &l,
        &st.decode,
    );
    out
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {v:?}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, labels: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name}_total {help}\n# TYPE {name}_total counter\n{name}_total{{{labels}}} {v}.0"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cum = h.cumulative();
    for b in h.bounds() {
        let c = cum.next().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {c}.0");
    }
    let inf = cum.next().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {inf}.0");
    let _ = writeln!(out, "{name}_count{{{labels}}} {}.0", h.count());
    let _ = writeln!(out, "{name}_sum{{{labels}}} {:?}", h.sum());
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineConfig, EngineRequest, FinishReason, KvTransfer};
    use crate::profile::EngineProfile;
    use std::time::Duration;

    #[test]
    fn exposes_vllm_names_and_labels() {
        let mut e = Engine::new(EngineConfig {
            profile: EngineProfile::instant(),
            lora_adapters: vec!["sql-lora".into()],
            seed: 1,
        });
        let r = EngineRequest::new(
            1,
            (0..40).collect(),
            3,
            FinishReason::Length,
            Some(0),
            KvTransfer::None,
            16,
        );
        e.submit(Duration::ZERO, r).unwrap();
        let text = render(
            &e,
            &MetricsLabels {
                model: "m".into(),
                lora_adapters: vec!["sql-lora".into()],
            },
            1.5,
        );
        for needle in [
            "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 0.0",
            "vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 1.0",
            "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.0",
            "vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"\",waiting_lora_adapters=\"sql-lora\"} 1.5",
            "block_size=\"16\"",
            "num_gpu_blocks=\"31250\"",
            "vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 0.0",
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"m\",le=\"+Inf\"} 0.0",
            "# TYPE vllm:inter_token_latency_seconds histogram",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        e.advance(Duration::ZERO);
        let text = render(
            &e,
            &MetricsLabels {
                model: "m".into(),
                lora_adapters: vec!["sql-lora".into()],
            },
            1.5,
        );
        assert!(
            text.contains("vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 40.0")
        );
        assert!(text.contains("vllm:generation_tokens_total{engine=\"0\",model_name=\"m\"} 3.0"));
    }
}
