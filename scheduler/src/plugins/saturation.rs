//! Saturation detectors (`utilization-detector`, `concurrency-detector`): pool saturation
//! for admission, and over-limit filters.

use std::time::Instant;

use rand::RngCore;

use super::{CycleState, Filter};
use crate::config::params::{ConcurrencyMode, ConcurrencyParams, UtilizationParams};
use crate::model::{Endpoint, Metrics};

/// llm-d's utilization detector.
#[derive(Debug, Clone)]
pub struct UtilizationDetector {
    params: UtilizationParams,
}

impl UtilizationDetector {
    /// A detector with these thresholds.
    pub fn new(params: UtilizationParams) -> Self {
        UtilizationDetector { params }
    }

    fn fresh<'e>(&self, e: &'e Endpoint, now: Instant) -> Option<&'e Metrics> {
        let m = e.metrics.as_ref()?;
        (now.saturating_duration_since(m.scraped_at) <= self.params.metrics_staleness_threshold)
            .then_some(m)
    }

    /// Average over endpoints of `max(queue/qT, kv/kvT)`; missing or stale metrics count
    /// as 1.0; no endpoints = 1.0.
    pub fn saturation(&self, endpoints: &[Endpoint], now: Instant) -> f64 {
        if endpoints.is_empty() {
            return 1.0;
        }
        let q_t = self.params.queue_depth_threshold as f64;
        let kv_t = self.params.kv_cache_util_threshold;
        let total: f64 = endpoints
            .iter()
            .map(|e| match self.fresh(e, now) {
                None => 1.0,
                Some(m) => (f64::from(m.waiting_queue) / q_t).max(m.kv_cache_usage / kv_t),
            })
            .sum();
        total / endpoints.len() as f64
    }
}

impl Filter for UtilizationDetector {
    /// Drops stale or over-limit endpoints; keeps everything when that would drop all.
    fn filter(&self, cycle: &CycleState<'_>, _: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        let q_limit = self.params.queue_depth_threshold as f64 * (1.0 + self.params.headroom);
        let kv_limit = self.params.kv_cache_util_threshold * (1.0 + self.params.headroom);
        let ok = |i: usize| {
            self.fresh(&cycle.endpoints[i], cycle.now).is_some_and(|m| {
                f64::from(m.waiting_queue) < q_limit && m.kv_cache_usage < kv_limit
            })
        };
        if candidates.iter().any(|&i| ok(i)) {
            candidates.retain(|&i| ok(i));
        }
    }
}

/// Load over capacity; no capacity counts as full.
fn ratio((load, cap): (f64, f64)) -> f64 {
    if cap <= 0.0 { 1.0 } else { load / cap }
}

/// llm-d's concurrency detector, over the in-flight load the caller reports.
#[derive(Debug, Clone)]
pub struct ConcurrencyDetector {
    params: ConcurrencyParams,
}

impl ConcurrencyDetector {
    /// A detector with these limits.
    pub fn new(params: ConcurrencyParams) -> Self {
        ConcurrencyDetector { params }
    }

    fn requests(&self, e: &Endpoint) -> (f64, f64) {
        (
            f64::from(e.in_flight.requests),
            self.params.max_concurrency as f64,
        )
    }

    fn tokens(&self, e: &Endpoint) -> (f64, f64) {
        (
            e.in_flight.tokens as f64,
            self.params.max_token_concurrency as f64,
        )
    }

    fn prefilling(&self, e: &Endpoint) -> Option<(f64, f64)> {
        let cap = self.params.max_prefill_concurrency?;
        Some((f64::from(e.in_flight.prefilling), cap as f64))
    }

    /// One endpoint's load: the larger of its ratios in the counted measures (hybrid: both)
    /// and, with `maxPrefillConcurrency`, in prefilling requests.
    fn endpoint_load(&self, e: &Endpoint) -> f64 {
        let counted = match self.params.concurrency_mode {
            ConcurrencyMode::Requests => ratio(self.requests(e)),
            ConcurrencyMode::Tokens => ratio(self.tokens(e)),
            ConcurrencyMode::Hybrid => ratio(self.requests(e)).max(ratio(self.tokens(e))),
        };
        counted.max(self.prefilling(e).map_or(0.0, ratio))
    }

    /// Total in-flight over total capacity (hybrid, or with `maxPrefillConcurrency`: the
    /// mean over endpoints of each one's load); no endpoints = 1.0.
    pub fn saturation(&self, endpoints: &[Endpoint]) -> f64 {
        if endpoints.is_empty() {
            return 1.0;
        }
        let total = |f: &dyn Fn(&Endpoint) -> (f64, f64)| {
            ratio(endpoints.iter().fold((0.0, 0.0), |(l, c), e| {
                let (x, y) = f(e);
                (l + x, c + y)
            }))
        };
        match (
            self.params.concurrency_mode,
            self.params.max_prefill_concurrency,
        ) {
            (ConcurrencyMode::Requests, None) => total(&|e| self.requests(e)),
            (ConcurrencyMode::Tokens, None) => total(&|e| self.tokens(e)),
            _ => {
                endpoints.iter().map(|e| self.endpoint_load(e)).sum::<f64>()
                    / endpoints.len() as f64
            }
        }
    }

    /// Whether `e` is under `limit × (1 + headroom)` in the counted measure (hybrid: in
    /// both), and in prefilling requests when `maxPrefillConcurrency` is set.
    fn has_room(&self, e: &Endpoint) -> bool {
        let under =
            |(load, limit): (f64, f64)| load < (limit * (1.0 + self.params.headroom)).trunc();
        let counted = match self.params.concurrency_mode {
            ConcurrencyMode::Requests => under(self.requests(e)),
            ConcurrencyMode::Tokens => under(self.tokens(e)),
            ConcurrencyMode::Hybrid => under(self.requests(e)) && under(self.tokens(e)),
        };
        counted && self.prefilling(e).is_none_or(under)
    }
}

impl Filter for ConcurrencyDetector {
    /// Keeps endpoints under `limit × (1 + headroom)` (llm-d does not fail open here).
    fn filter(&self, cycle: &CycleState<'_>, _: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        candidates.retain(|&i| self.has_room(&cycle.endpoints[i]));
    }
}

/// The configured saturation detector.
#[derive(Debug, Clone)]
pub enum SaturationDetector {
    /// `utilization-detector`
    Utilization(UtilizationDetector),
    /// `concurrency-detector`
    Concurrency(ConcurrencyDetector),
}

impl SaturationDetector {
    /// Pool saturation; >= 1.0 means saturated.
    pub fn saturation(&self, endpoints: &[Endpoint], now: Instant) -> f64 {
        match self {
            SaturationDetector::Utilization(d) => d.saturation(endpoints, now),
            SaturationDetector::Concurrency(d) => d.saturation(endpoints),
        }
    }
}
