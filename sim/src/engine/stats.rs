//! Counters and histograms an engine accumulates (rendered as vLLM `/metrics`).

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's `vllm:inter_token_latency_seconds` buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request-latency buckets (e2e, queue, prefill, decode).
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram with fixed upper bounds (non-cumulative counts inside).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending, `+Inf` implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value in seconds.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    /// Upper bounds (without `+Inf`).
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Cumulative counts per bound, the last one being `+Inf`.
    pub fn cumulative(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts.iter().scan(0u64, |acc, c| {
            *acc += c;
            Some(*acc)
        })
    }

    /// Sum of observed values.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Everything an engine counts since start.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Prompt tokens looked up in the prefix cache (first schedule of each request).
    pub prefix_cache_queries: u64,
    /// Of those, tokens found in the prefix cache.
    pub prefix_cache_hits: u64,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub generation_tokens: u64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: u64,
    /// Requests finished because they reached `max_tokens`.
    pub finished_length: u64,
    /// Requests finished at their natural end (no `max_tokens` given).
    pub finished_stop: u64,
    /// Requests aborted (client went away).
    pub aborted: u64,
    /// Prompt tokens whose KV came from a remote prefill pod.
    pub remote_prefill_tokens: u64,
    /// LoRA adapters loaded into a GPU slot.
    pub lora_loads: u64,
    /// Images this pod had to have encoder output for (encode requests and prompts).
    pub encoder_cache_queries: u64,
    /// Of those, images found in the encoder cache (not encoded again).
    pub encoder_cache_hits: u64,
    /// Images whose encoder output came from an encode pod (never counted as queries).
    pub remote_encoded_images: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between consecutive tokens of a sequence.
    pub itl: Histogram,
    /// Arrival to finish.
    pub e2e: Histogram,
    /// Arrival to first schedule.
    pub queue: Histogram,
    /// First schedule to first token.
    pub prefill: Histogram,
    /// First token to finish.
    pub decode: Histogram,
}

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            preemptions: 0,
            finished_length: 0,
            finished_stop: 0,
            aborted: 0,
            remote_prefill_tokens: 0,
            lora_loads: 0,
            encoder_cache_queries: 0,
            encoder_cache_hits: 0,
            remote_encoded_images: 0,
            steps: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(REQUEST_BUCKETS),
            queue: Histogram::new(REQUEST_BUCKETS),
            prefill: Histogram::new(REQUEST_BUCKETS),
            decode: Histogram::new(REQUEST_BUCKETS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_inclusive_and_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.1);
        h.observe(0.5);
        h.observe(3.0);
        assert_eq!(h.cumulative().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(h.count(), 3);
        assert!((h.sum() - 3.6).abs() < 1e-9);
    }
}
