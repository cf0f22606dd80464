//! The report of one run: latency summaries, throughput, goodput, failures, fleet cache
//! hit rate against the oracle bound, and load spread over pods; as JSON and markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::FailureKind;
use crate::client::Record;
use crate::error::BenchError;
use crate::oracle::OracleBound;
use crate::scrape::PodCounters;
use crate::spec::{Load, RunSpec};
use crate::stats::{LatencySummary, coefficient_of_variation};

/// Everything one run measured. Every figure is computed from what was observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The system under test.
    pub label: String,
    /// Workload description.
    pub workload: String,
    /// How requests were offered.
    pub load: Load,
    /// Workload and arrival seed.
    pub seed: u64,
    /// The model name sent.
    pub model: String,
    /// Requests sent.
    pub requests_sent: usize,
    /// Requests that streamed to `[DONE]` with content.
    pub succeeded: usize,
    /// Requests that failed, 429s included.
    pub failed: usize,
    /// Requests answered 429.
    pub rejected_429: usize,
    /// Failures by kind (`connect`, `status_503`, `timeout`, `unfinished`...).
    pub failures: BTreeMap<String, usize>,
    /// `failed / requests_sent`.
    pub error_rate: f64,
    /// `rejected_429 / requests_sent`.
    pub rate_429: f64,
    /// From the first send to the last completion, seconds.
    pub duration_s: f64,
    /// Requests sent per second over the send window.
    pub achieved_qps: f64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Output tokens per second (successful requests).
    pub output_tokens_per_s: f64,
    /// Time to first content chunk.
    pub ttft: LatencySummary,
    /// Gaps between content chunks.
    pub itl: LatencySummary,
    /// Whole-request latency.
    pub e2e: LatencySummary,
    /// The TTFT SLO for goodput, ms.
    pub ttft_slo_ms: f64,
    /// Successful requests within the TTFT SLO, per second.
    pub goodput_rps: f64,
    /// Share of sent requests that succeeded within the TTFT SLO.
    pub slo_attainment: f64,
    /// Fleet prefix-cache hit rate from the pods' counter deltas.
    pub fleet_hit_rate: Option<f64>,
    /// Prefix-cache query tokens the pods counted during the run.
    pub fleet_query_tokens: Option<f64>,
    /// The oracle bound for the requests sent.
    pub oracle: OracleBound,
    /// `oracle.hit_rate()`, for tables.
    pub oracle_hit_rate: f64,
    /// Cached-token share from the responses' `usage` (when servers report it).
    pub usage_cached_rate: Option<f64>,
    /// Finished requests per pod during the run (pods in `pod_metrics` order).
    pub per_pod_requests: Vec<f64>,
    /// Coefficient of variation of `per_pod_requests` (0 = perfectly even).
    pub load_imbalance_cv: Option<f64>,
    /// Pods whose after-run scrape failed (left out of hit rate and spread).
    pub pods_unscraped: Vec<String>,
    /// Sum of the pods' KV capacity, tokens.
    pub fleet_kv_capacity_tokens: Option<u64>,
    /// `oracle.reused_block_tokens / fleet_kv_capacity_tokens`: how full the reused
    /// prefixes would make the fleet if each were held once.
    pub reused_prefix_fill: Option<f64>,
}

impl Report {
    pub(crate) fn build(
        spec: &RunSpec,
        records: &[Record],
        before: &[PodCounters],
        after: &[Result<PodCounters, BenchError>],
        oracle: OracleBound,
    ) -> Report {
        let sent = records.len();
        let mut failures: BTreeMap<String, usize> = BTreeMap::new();
        let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        let (mut out_tokens, mut good, mut rejected_429) = (0u64, 0usize, 0usize);
        let (mut usage_prompt, mut usage_cached, mut usage_seen) = (0u64, 0u64, false);
        let slo = spec.ttft_slo.as_secs_f64();
        for r in records {
            match &r.result {
                Ok(s) => {
                    ttft.push(s.ttft);
                    itl.extend_from_slice(&s.itls);
                    e2e.push(s.e2e);
                    out_tokens += s.output_tokens;
                    good += usize::from(s.ttft <= slo);
                    if let (Some(p), Some(c)) = (s.prompt_tokens, s.cached_tokens) {
                        usage_seen = true;
                        usage_prompt += p;
                        usage_cached += c;
                    }
                }
                Err(kind) => {
                    rejected_429 += usize::from(*kind == FailureKind::Status(429));
                    *failures.entry(kind.to_string()).or_default() += 1;
                }
            }
        }
        let succeeded = ttft.len();
        let failed = sent - succeeded;
        let first_send = records
            .iter()
            .map(|r| r.sent_at)
            .fold(f64::INFINITY, f64::min);
        let last_send = records.iter().map(|r| r.sent_at).fold(0.0, f64::max);
        let last_done = records.iter().map(|r| r.done_at).fold(0.0, f64::max);
        let duration_s = if sent == 0 {
            0.0
        } else {
            (last_done - first_send).max(1e-9)
        };
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let ratio = |a: usize| {
            if sent == 0 {
                0.0
            } else {
                a as f64 / sent as f64
            }
        };

        let mut pods_unscraped = Vec::new();
        let (mut hits, mut queries) = (0.0, 0.0);
        let mut per_pod_requests = Vec::new();
        let mut all_have_requests = true;
        let mut capacity: Option<u64> = Some(0);
        for (i, (b, a)) in before.iter().zip(after).enumerate() {
            match a {
                Ok(a) => {
                    hits += a.prefix_hits - b.prefix_hits;
                    queries += a.prefix_queries - b.prefix_queries;
                    match (a.requests, b.requests) {
                        (Some(x), Some(y)) => per_pod_requests.push(x - y),
                        _ => all_have_requests = false,
                    }
                    capacity = capacity.zip(a.kv_capacity_tokens()).map(|(s, c)| s + c);
                }
                Err(_) => pods_unscraped.push(spec.pod_metrics.get(i).cloned().unwrap_or_default()),
            }
        }
        let scraped = before.len() > pods_unscraped.len();
        let fleet_kv_capacity_tokens = capacity.filter(|c| scraped && *c > 0);
        if !all_have_requests {
            per_pod_requests.clear();
        }
        Report {
            label: spec.label.clone(),
            workload: spec.workload.describe(),
            load: spec.load,
            seed: spec.seed,
            model: spec.model.clone(),
            requests_sent: sent,
            succeeded,
            failed,
            rejected_429,
            failures,
            error_rate: ratio(failed),
            rate_429: ratio(rejected_429),
            duration_s,
            achieved_qps: if last_send > first_send {
                (sent - 1) as f64 / (last_send - first_send)
            } else {
                0.0
            },
            request_throughput: per_s(succeeded as f64),
            output_tokens_per_s: per_s(out_tokens as f64),
            ttft: LatencySummary::from_secs(ttft),
            itl: LatencySummary::from_secs(itl),
            e2e: LatencySummary::from_secs(e2e),
            ttft_slo_ms: slo * 1000.0,
            goodput_rps: per_s(good as f64),
            slo_attainment: ratio(good),
            fleet_hit_rate: (scraped && queries > 0.0).then(|| hits / queries),
            fleet_query_tokens: scraped.then_some(queries),
            oracle,
            oracle_hit_rate: oracle.hit_rate(),
            usage_cached_rate: (usage_seen && usage_prompt > 0)
                .then(|| usage_cached as f64 / usage_prompt as f64),
            load_imbalance_cv: coefficient_of_variation(&per_pod_requests),
            per_pod_requests,
            pods_unscraped,
            fleet_kv_capacity_tokens,
            reused_prefix_fill: fleet_kv_capacity_tokens
                .map(|c| oracle.reused_block_tokens as f64 / c as f64),
        }
    }

    /// The report as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The header (two lines) of the markdown table whose rows are `to_markdown_row`.
    pub fn markdown_header() -> String {
        "| system | load | sent | ok | err % | 429 % | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p50 ms | E2E p50 ms | out tok/s | goodput req/s | SLO % | hit rate | oracle | pod CV |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            .to_string()
    }

    /// One markdown table row.
    pub fn to_markdown_row(&self) -> String {
        let load = load_text(self.load);
        let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.1}%", v * 100.0));
        format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {:.2} | {:.0} | {} | {} | {} |\n",
            self.label,
            load,
            self.requests_sent,
            self.succeeded,
            self.error_rate * 100.0,
            self.rate_429 * 100.0,
            self.ttft.p50_ms,
            self.ttft.p90_ms,
            self.ttft.p99_ms,
            self.itl.p50_ms,
            self.e2e.p50_ms,
            self.output_tokens_per_s,
            self.goodput_rps,
            self.slo_attainment * 100.0,
            pct(self.fleet_hit_rate),
            pct(Some(self.oracle_hit_rate)),
            self.load_imbalance_cv
                .map_or("–".to_string(), |v| format!("{v:.2}")),
        )
    }

    /// Saves `<dir>/<stem>.json` and `<dir>/<stem>.md`; returns the JSON path.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<PathBuf, BenchError> {
        save_reports(std::slice::from_ref(self), dir, stem)
    }
}

fn load_text(load: Load) -> String {
    match load {
        Load::Poisson { qps } => format!("{qps} qps"),
        Load::Closed { concurrency } => format!("c={concurrency}"),
    }
}

/// A markdown table of reports, with a workload line and notes under it.
pub fn markdown_table(reports: &[Report]) -> String {
    let mut out = String::new();
    let mut workloads: Vec<&str> = reports.iter().map(|r| r.workload.as_str()).collect();
    workloads.dedup();
    for w in workloads {
        let _ = writeln!(out, "Workload: {w}\n");
    }
    out.push_str(&Report::markdown_header());
    for r in reports {
        out.push_str(&r.to_markdown_row());
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.failures.is_empty())
        .map(|r| {
            let kinds: Vec<String> = r.failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("{} at {}: {}", r.label, load_text(r.load), kinds.join(", "))
        })
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(
            out,
            "
Failures by kind ({}).",
            failed.join("; ")
        );
    }
    if let Some(r) = reports.first() {
        let _ = writeln!(
            out,
            "\nTTFT SLO for goodput: {:.0} ms. Hit rate: fleet `vllm:prefix_cache_hits_total / queries_total` deltas; \
             oracle: unbounded cache over the same requests, 16-token blocks. Pod CV: stddev/mean of requests per pod.",
            r.ttft_slo_ms
        );
        if let (Some(fill), Some(cap)) = (r.reused_prefix_fill, r.fleet_kv_capacity_tokens) {
            let _ = writeln!(
                out,
                "Reused prefixes (first row): {} tokens = {:.1}% of the fleet's KV capacity ({cap} tokens).",
                r.oracle.reused_block_tokens,
                fill * 100.0
            );
        }
    }
    out
}

/// Saves several reports as one JSON array and one markdown table.
pub fn save_reports(reports: &[Report], dir: &Path, stem: &str) -> Result<PathBuf, BenchError> {
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let json_path = dir.join(format!("{stem}.json"));
    let md_path = dir.join(format!("{stem}.md"));
    let json = serde_json::to_string_pretty(reports).unwrap_or_default();
    std::fs::write(&json_path, json).map_err(|source| BenchError::Io {
        path: json_path.clone(),
        source,
    })?;
    std::fs::write(&md_path, markdown_table(reports)).map_err(|source| BenchError::Io {
        path: md_path,
        source,
    })?;
    Ok(json_path)
}

/// Reads reports saved by `save`/`save_reports` (a JSON array or a single report).
pub fn load_reports(path: &Path) -> Result<Vec<Report>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| BenchError::ReadReport {
            path: path.to_path_buf(),
            source,
        })?;
    let parsed = if value.is_array() {
        serde_json::from_value(value)
    } else {
        serde_json::from_value(value).map(|r: Report| vec![r])
    };
    parsed.map_err(|source| BenchError::ReadReport {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::Success;
    use crate::spec::Target;
    use crate::workload::{SharedPrefixSpec, Workload};

    fn ok(sent_at: f64, ttft: f64, e2e: f64, tokens: u64) -> Record {
        Record {
            index: 0,
            target: 0,
            sent_at,
            done_at: sent_at + e2e,
            result: Ok(Success {
                ttft,
                itls: vec![0.01, 0.03],
                e2e,
                output_tokens: tokens,
                ..Success::default()
            }),
        }
    }

    #[test]
    fn build_counts_goodput_failures_hit_rate_and_spread() {
        let mut spec = RunSpec::new(
            Target::RoundRobin(vec![
                "http://127.0.0.1:1".into(),
                "http://127.0.0.1:2".into(),
            ]),
            Workload::SharedPrefix(SharedPrefixSpec::default()),
        );
        spec.ttft_slo = Duration::from_millis(500);
        spec.pod_metrics = spec.target.base_urls();
        let records = vec![
            ok(0.0, 0.1, 1.0, 10),
            ok(1.0, 0.4, 2.0, 10),
            ok(2.0, 0.9, 2.0, 20), // succeeded, but misses the SLO
            Record {
                index: 0,
                target: 0,
                sent_at: 3.0,
                done_at: 3.1,
                result: Err(FailureKind::Status(429)),
            },
            Record {
                index: 0,
                target: 0,
                sent_at: 3.0,
                done_at: 3.5,
                result: Err(FailureKind::Timeout),
            },
        ];
        let pod = |hits: f64, queries: f64, requests: f64| PodCounters {
            prefix_hits: hits,
            prefix_queries: queries,
            requests: Some(requests),
            num_gpu_blocks: Some(100),
            block_size: Some(16),
        };
        let before = [pod(10.0, 100.0, 5.0), pod(0.0, 0.0, 0.0)];
        let after = [Ok(pod(70.0, 200.0, 7.0)), Ok(pod(0.0, 100.0, 1.0))];
        let oracle = OracleBound {
            query_tokens: 200,
            hit_tokens: 100,
            reused_block_tokens: 320,
        };
        let r = Report::build(&spec, &records, &before, &after, oracle);
        assert_eq!(
            (r.requests_sent, r.succeeded, r.failed, r.rejected_429),
            (5, 3, 2, 1)
        );
        assert_eq!(r.failures.get("status_429"), Some(&1));
        assert_eq!(r.failures.get("timeout"), Some(&1));
        assert!((r.error_rate - 0.4).abs() < 1e-12 && (r.rate_429 - 0.2).abs() < 1e-12);
        // From the first send (0.0) to the last completion (4.0).
        assert!((r.duration_s - 4.0).abs() < 1e-12);
        assert!((r.goodput_rps - 0.5).abs() < 1e-12, "2 within SLO over 4 s");
        assert!((r.slo_attainment - 0.4).abs() < 1e-12);
        assert!((r.output_tokens_per_s - 10.0).abs() < 1e-12);
        assert_eq!(r.itl.count, 6);
        // (60 + 0) / (100 + 100)
        assert_eq!(r.fleet_hit_rate, Some(0.3));
        assert_eq!(r.per_pod_requests, [2.0, 1.0]);
        // mean 1.5, stddev 0.5
        assert!((r.load_imbalance_cv.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.fleet_kv_capacity_tokens, Some(3200));
        assert_eq!(r.reused_prefix_fill, Some(0.1));
        assert_eq!(r.oracle_hit_rate, 0.5);

        let dir =
            std::env::temp_dir().join(format!("infermesh-bench-report-{}", std::process::id()));
        let path = r.save(&dir, "unit").unwrap();
        assert_eq!(load_reports(&path).unwrap(), vec![r.clone()]);
        let md = std::fs::read_to_string(dir.join("unit.md")).unwrap();
        assert!(
            md.contains("| target | 4 qps | 5 | 3 | 40.0 | 20.0 |"),
            "{md}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pod_lost_after_the_run_is_left_out_and_named() {
        let mut spec = RunSpec::new(
            Target::Url("http://127.0.0.1:1".into()),
            Workload::SharedPrefix(SharedPrefixSpec::default()),
        );
        spec.pod_metrics = vec!["http://127.0.0.1:2".into(), "http://127.0.0.1:3".into()];
        let c = PodCounters {
            prefix_hits: 5.0,
            prefix_queries: 10.0,
            requests: Some(1.0),
            ..Default::default()
        };
        let after = [
            Ok(PodCounters {
                prefix_hits: 10.0,
                prefix_queries: 20.0,
                requests: Some(3.0),
                ..Default::default()
            }),
            Err(BenchError::InvalidSpec {
                field: "x",
                problem: "gone".into(),
            }),
        ];
        let r = Report::build(
            &spec,
            &[ok(0.0, 0.1, 0.2, 1)],
            &[c, c],
            &after,
            OracleBound::default(),
        );
        assert_eq!(r.pods_unscraped, ["http://127.0.0.1:3"]);
        assert_eq!(r.fleet_hit_rate, Some(0.5));
        assert_eq!(r.per_pod_requests, [2.0]);
        assert_eq!(r.fleet_kv_capacity_tokens, None);
    }
}
