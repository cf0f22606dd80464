//! Reading the pods' vLLM `/metrics`: prefix-cache counters, request counts and KV
//! capacity, before and after a run.

use serde::{Deserialize, Serialize};

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request could not be sent or the body not read.
    #[error("request failed: {0}")]
    Http(String),
    /// The pod answered with a non-200 status.
    #[error("status {0}")]
    Status(u16),
    /// The pod did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The body is not UTF-8 text.
    #[error("body is not UTF-8")]
    NotText,
    /// The exposition has no prefix-cache query counter.
    #[error("no vllm:prefix_cache_queries counter in the exposition")]
    NoPrefixCounters,
}

/// The counters the benchmark reads from one pod at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PodCounters {
    /// `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_hits: f64,
    /// `vllm:prefix_cache_queries_total` (tokens).
    pub prefix_queries: f64,
    /// Finished requests: `vllm:request_success_total` summed over labels, else the
    /// count of `vllm:e2e_request_latency_seconds`.
    pub requests: Option<f64>,
    /// `vllm:cache_config_info{num_gpu_blocks}`.
    pub num_gpu_blocks: Option<u64>,
    /// `vllm:cache_config_info{block_size}`.
    pub block_size: Option<u64>,
}

impl PodCounters {
    /// KV capacity in tokens, when the pod exposes its cache config.
    pub fn kv_capacity_tokens(&self) -> Option<u64> {
        Some(self.num_gpu_blocks? * self.block_size?)
    }
}

/// One sample line: metric name, raw label text (without braces) and value.
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            let close = line.rfind('}')?;
            (&line[name_end + 1..close], &line[close + 1..])
        } else {
            ("", &line[name_end..])
        };
        let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
        Some((name, labels, value))
    })
}

/// The value of label `key` in raw label text like `a="1",b="2"`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// Extracts the counters from a Prometheus text exposition.
pub fn parse_counters(text: &str) -> Result<PodCounters, ScrapeError> {
    let mut c = PodCounters::default();
    let (mut saw_queries, mut success, mut e2e_count) = (false, None::<f64>, None::<f64>);
    for (name, labels, value) in samples(text) {
        match name {
            "vllm:prefix_cache_hits_total"
            | "vllm:prefix_cache_hits"
            | "vllm:gpu_prefix_cache_hits_total" => c.prefix_hits += value,
            "vllm:prefix_cache_queries_total"
            | "vllm:prefix_cache_queries"
            | "vllm:gpu_prefix_cache_queries_total" => {
                saw_queries = true;
                c.prefix_queries += value
            }
            "vllm:request_success_total" => *success.get_or_insert(0.0) += value,
            "vllm:e2e_request_latency_seconds_count" => *e2e_count.get_or_insert(0.0) += value,
            "vllm:cache_config_info" => {
                c.num_gpu_blocks = label(labels, "num_gpu_blocks").and_then(|v| v.parse().ok());
                c.block_size = label(labels, "block_size").and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }
    if !saw_queries {
        return Err(ScrapeError::NoPrefixCounters);
    }
    c.requests = success.or(e2e_count);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# HELP vllm:prefix_cache_queries_total Prefix cache queries, in tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 800
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 7
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3
vllm:e2e_request_latency_seconds_count{model_name="m"} 99
vllm:cache_config_info{block_size="16",num_gpu_blocks="4096",enable_prefix_caching="True"} 1.0
"#;

    #[test]
    fn counters_are_summed_over_labels() {
        let c = parse_counters(EXPOSITION).unwrap();
        assert_eq!(c.prefix_queries, 1200.0);
        assert_eq!(c.prefix_hits, 800.0);
        assert_eq!(c.requests, Some(10.0));
        assert_eq!(c.kv_capacity_tokens(), Some(4096 * 16));
    }

    #[test]
    fn missing_counters_are_an_error() {
        assert!(matches!(
            parse_counters("up 1\n"),
            Err(ScrapeError::NoPrefixCounters)
        ));
    }
}
