//! `utilization-detector`: pool saturation for admission, and an over-limit filter.

use std::time::Instant;

use rand::RngCore;

use super::{CycleState, Filter};
use crate::config::params::UtilizationParams;
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
