//! Built-in scorers; every score is in [0, 1] (llm-d formulas).

use std::net::SocketAddr;
use std::time::Instant;

use hashbrown::HashMap;
use parking_lot::Mutex;

use super::{CycleState, PreRequest, PrefixCycle, Scorer};
use crate::config::params::{
    ActiveRequestParams, HeaderLabelAffinityParams, LoadAwareParams, NoHitLruParams,
    PrefixScorerParams, TokenLoadParams,
};
use crate::model::{Endpoint, InferenceRequest};

fn queue(e: &Endpoint) -> u32 {
    e.metrics.as_ref().map_or(0, |m| m.waiting_queue)
}

fn running(e: &Endpoint) -> u32 {
    e.metrics.as_ref().map_or(0, |m| m.running)
}

/// Min-max normalisation: lowest value → 1.0, highest → 0.0; all equal → 1.0.
fn min_max_low_is_best(
    cycle: &CycleState<'_>,
    candidates: &[usize],
    out: &mut [f64],
    f: fn(&Endpoint) -> u32,
) {
    let (mut lo, mut hi) = (u32::MAX, 0u32);
    for &i in candidates {
        let v = f(&cycle.endpoints[i]);
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi <= lo {
        out.fill(1.0);
        return;
    }
    let span = f64::from(hi - lo);
    for (o, &i) in out.iter_mut().zip(candidates) {
        *o = f64::from(hi - f(&cycle.endpoints[i])) / span;
    }
}

/// `prefix-cache-scorer`: `w·min(1, matchedTokens/scale)² + (1−w)·matchBlocks/totalBlocks`
/// from the prefix producer, where matched tokens are matched blocks × block size
/// (llm-d v0.10). The default `w = 0` scores the match ratio alone.
#[derive(Debug, Clone, Copy)]
pub struct PrefixCacheScorer {
    match_length_weight: f64,
    match_length_scale_tokens: f64,
    /// Reads `burst-prefix-cache-producer`'s data (named by `prefixMatchInfoProducerName`).
    burst: bool,
}

impl Default for PrefixCacheScorer {
    fn default() -> Self {
        PrefixCacheScorer::new(&PrefixScorerParams::default())
    }
}

impl PrefixCacheScorer {
    /// From validated parameters.
    pub fn new(p: &PrefixScorerParams) -> Self {
        PrefixCacheScorer {
            match_length_weight: p.match_length_weight,
            match_length_scale_tokens: p.match_length_scale_tokens as f64,
            burst: false,
        }
    }

    /// Scores from the burst producer's placement instead of the prefix index.
    pub fn reading_burst(mut self, burst: bool) -> Self {
        self.burst = burst;
        self
    }

    fn score_one(&self, p: &PrefixCycle, i: usize) -> f64 {
        let ratio = p.score(i);
        let w = self.match_length_weight;
        // Without the length term the score is the ratio exactly (no float blend).
        if w <= 0.0 || p.block_size_tokens == 0 || p.hashes.is_empty() {
            return ratio;
        }
        let matched = f64::from(p.matched.get(i).copied().unwrap_or(0));
        let length =
            (matched * p.block_size_tokens as f64 / self.match_length_scale_tokens).min(1.0);
        w * length * length + (1.0 - w) * ratio
    }
}

impl Scorer for PrefixCacheScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        let source = if self.burst {
            &cycle.burst
        } else {
            &cycle.prefix
        };
        match source {
            Some(p) => {
                for (o, &i) in out.iter_mut().zip(candidates) {
                    *o = self.score_one(p, i);
                }
            }
            None => out.fill(0.0),
        }
    }
}

/// `kv-cache-utilization-scorer`: `1 - kvCacheUsage`.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvCacheUtilizationScorer;

impl Scorer for KvCacheUtilizationScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        for (o, &i) in out.iter_mut().zip(candidates) {
            let usage = cycle.endpoints[i]
                .metrics
                .as_ref()
                .map_or(0.0, |m| m.kv_cache_usage);
            // NaN (a broken scrape) scores as full.
            *o = if usage.is_nan() {
                0.0
            } else {
                1.0 - usage.clamp(0.0, 1.0)
            };
        }
    }
}

/// `queue-scorer`: min-max normalised waiting queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueScorer;

impl Scorer for QueueScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        min_max_low_is_best(cycle, candidates, out, queue);
    }
}

/// `running-requests-size-scorer`: min-max normalised running requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunningRequestsScorer;

impl Scorer for RunningRequestsScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        min_max_low_is_best(cycle, candidates, out, running);
    }
}

/// `prefill-load-scorer` (infermesh's own, not an llm-d type): min-max normalised count of
/// the endpoint's in-flight requests still waiting for their first token. A request sent
/// to an endpoint that is prefilling another prompt waits for that step first; one sent
/// to an endpoint that is only decoding starts its prefill at the next step, so in-flight
/// requests count only until they answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefillLoadScorer;

impl Scorer for PrefillLoadScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        min_max_low_is_best(cycle, candidates, out, |e| e.in_flight.prefilling);
    }
}

/// `lora-affinity-scorer`: 1.0 adapter active, 0.8 free slot, 0.6 adapter waiting, else 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoraAffinityScorer;

impl Scorer for LoraAffinityScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        let model = cycle.request.target_model.as_str();
        for (o, &i) in out.iter_mut().zip(candidates) {
            let lora = cycle.endpoints[i]
                .metrics
                .as_ref()
                .and_then(|m| m.lora.as_ref());
            *o = match lora {
                None => 0.0,
                Some(l) => {
                    if l.running.iter().any(|a| a == model) {
                        1.0
                    } else if l.running.len() + l.waiting.len() < l.max_lora as usize {
                        0.8
                    } else if l.waiting.iter().any(|a| a == model) {
                        0.6
                    } else {
                        0.0
                    }
                }
            };
        }
    }
}

/// `load-aware-scorer`: empty queue 0.5, falling linearly to 0 at `threshold`.
#[derive(Debug, Clone, Copy)]
pub struct LoadAwareScorer {
    threshold: f64,
}

impl LoadAwareScorer {
    /// From parameters (threshold <= 0 → 128, as llm-d).
    pub fn new(p: &LoadAwareParams) -> Self {
        let t = if p.threshold <= 0 { 128 } else { p.threshold };
        LoadAwareScorer {
            threshold: t as f64,
        }
    }
}

impl Scorer for LoadAwareScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        for (o, &i) in out.iter_mut().zip(candidates) {
            let q = f64::from(queue(&cycle.endpoints[i]));
            *o = if q == 0.0 {
                0.5
            } else {
                0.5 * (1.0 - q.min(self.threshold) / self.threshold)
            };
        }
    }
}

/// `active-request-scorer`: idle endpoints 1.0, else `(max - n) / max × maxBusyScore`
/// over the in-flight request counts the caller reports.
#[derive(Debug, Clone, Copy)]
pub struct ActiveRequestScorer {
    idle_threshold: u32,
    max_busy_score: f64,
}

impl ActiveRequestScorer {
    /// From parameters.
    pub fn new(p: &ActiveRequestParams) -> Self {
        ActiveRequestScorer {
            idle_threshold: u32::try_from(p.idle_threshold.max(0)).unwrap_or(u32::MAX),
            max_busy_score: p.max_busy_score,
        }
    }
}

impl Scorer for ActiveRequestScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        let max = candidates
            .iter()
            .map(|&i| cycle.endpoints[i].in_flight.requests)
            .max()
            .unwrap_or(0);
        for (o, &i) in out.iter_mut().zip(candidates) {
            let n = cycle.endpoints[i].in_flight.requests;
            *o = if n <= self.idle_threshold || max == 0 {
                1.0
            } else {
                f64::from(max - n) / f64::from(max) * self.max_busy_score
            };
        }
    }
}

/// `token-load-scorer`: `1 - min(1, inFlightTokens / queueThresholdTokens)`.
#[derive(Debug, Clone, Copy)]
pub struct TokenLoadScorer {
    threshold: f64,
}

impl TokenLoadScorer {
    /// From parameters (threshold <= 0 → default, as llm-d).
    pub fn new(p: &TokenLoadParams) -> Self {
        let t = if p.queue_threshold_tokens <= 0 {
            TokenLoadParams::default().queue_threshold_tokens
        } else {
            p.queue_threshold_tokens
        };
        TokenLoadScorer {
            threshold: t as f64,
        }
    }
}

impl Scorer for TokenLoadScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        for (o, &i) in out.iter_mut().zip(candidates) {
            let t = cycle.endpoints[i].in_flight.tokens as f64;
            *o = if t <= 0.0 {
                1.0
            } else {
                1.0 - t.min(self.threshold) / self.threshold
            };
        }
    }
}

pub use super::session::{SESSION_TOKEN_HEADER, SessionAffinityScorer, session_token};

/// `header-label-affinity-scorer`: 1 for endpoints whose `labelKey` label equals the
/// request's `headerName` header, else 0 (also 0 for all when the header is absent or empty).
#[derive(Debug, Clone)]
pub struct HeaderLabelAffinityScorer {
    params: HeaderLabelAffinityParams,
}

impl HeaderLabelAffinityScorer {
    /// A scorer for one header-to-label mapping (header name already lower-cased).
    pub fn new(params: HeaderLabelAffinityParams) -> Self {
        HeaderLabelAffinityScorer { params }
    }
}

impl Scorer for HeaderLabelAffinityScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        out.fill(0.0);
        let Some(wanted) = cycle
            .request
            .headers
            .get(&self.params.header_name)
            .filter(|v| !v.is_empty())
        else {
            return;
        };
        for (o, &i) in out.iter_mut().zip(candidates) {
            if cycle.endpoints[i].labels.get(&self.params.label_key) == Some(wanted) {
                *o = 1.0;
            }
        }
    }
}

/// `no-hit-lru-scorer`: cold requests (no prefix hit anywhere) prefer endpoints that have
/// not served a cold request recently; warm requests get 0.5 everywhere.
///
/// Scoring judges coldness over the profile's filtered candidates, as llm-d does; the
/// LRU update after the pick uses the cycle-wide coldness (no candidate matched at all),
/// where llm-d reuses the last profile's judgement.
#[derive(Debug)]
pub struct NoHitLruScorer {
    capacity: usize,
    /// Oldest first.
    order: Mutex<Vec<SocketAddr>>,
}

impl NoHitLruScorer {
    /// From parameters.
    pub fn new(p: &NoHitLruParams) -> Self {
        NoHitLruScorer {
            capacity: usize::try_from(p.lru_size.max(1)).unwrap_or(1024),
            order: Mutex::new(Vec::new()),
        }
    }

    fn is_cold(cycle: &CycleState<'_>, candidates: &[usize]) -> bool {
        match &cycle.prefix {
            None => true,
            Some(p) => candidates
                .iter()
                .all(|&i| p.matched.get(i).copied().unwrap_or(0) == 0),
        }
    }

    /// Marks `addr` as most recently used by a cold request.
    pub fn touch(&self, addr: SocketAddr) {
        let mut order = self.order.lock();
        if let Some(pos) = order.iter().position(|a| *a == addr) {
            order.remove(pos);
        }
        order.push(addr);
        if order.len() > self.capacity {
            order.remove(0);
        }
    }
}

impl Scorer for NoHitLruScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        if !Self::is_cold(cycle, candidates) {
            out.fill(0.5);
            return;
        }
        let n = candidates.len();
        if n <= 1 {
            out.fill(1.0);
            return;
        }
        let positions: HashMap<SocketAddr, usize> = {
            let order = self.order.lock();
            order.iter().enumerate().map(|(p, a)| (*a, p)).collect()
        };
        let never_used = candidates
            .iter()
            .filter(|&&i| !positions.contains_key(&cycle.endpoints[i].address))
            .count();
        let denom = (n - 1) as f64;
        let mut next_never = 0usize;
        for (o, &i) in out.iter_mut().zip(candidates) {
            let rank = match positions.get(&cycle.endpoints[i].address) {
                Some(p) => never_used + p,
                None => {
                    next_never += 1;
                    next_never - 1
                }
            };
            *o = (1.0 - rank as f64 / denom).max(0.0);
        }
    }
}

impl PreRequest for NoHitLruScorer {
    fn pre_request(
        &self,
        _: &InferenceRequest,
        primary: SocketAddr,
        also_cached: &[SocketAddr],
        cold: bool,
        _: Instant,
    ) {
        if !cold {
            return;
        }
        self.touch(primary);
        for a in also_cached {
            self.touch(*a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InferenceRequest;

    fn scores(scorer: &PrefixCacheScorer, prefix: PrefixCycle) -> Vec<f64> {
        let req = InferenceRequest::default();
        let n = prefix.matched.len();
        let cycle = CycleState {
            request: &req,
            endpoints: &[],
            now: std::time::Instant::now(),
            prefix: Some(prefix),
            burst: None,
            cold: false,
            peer: None,
        };
        let cands: Vec<usize> = (0..n).collect();
        let mut out = vec![f64::NAN; n];
        scorer.score(&cycle, &cands, &mut out);
        out
    }

    fn cycle(total: usize, block_size_tokens: usize, matched: &[u32]) -> PrefixCycle {
        PrefixCycle {
            hashes: (0..total as u64).collect(),
            block_size_tokens,
            matched: matched.to_vec(),
        }
    }

    #[test]
    fn zero_weight_scores_the_match_ratio_exactly() {
        let c = cycle(7, 64, &[0, 1, 3, 7]);
        let want: Vec<f64> = (0..4).map(|i| c.score(i)).collect();
        assert_eq!(scores(&PrefixCacheScorer::default(), c), want);
    }

    #[test]
    fn weight_blends_the_squared_match_length() {
        let s = PrefixCacheScorer::new(&PrefixScorerParams {
            match_length_weight: 0.5,
            match_length_scale_tokens: 100,
            ..PrefixScorerParams::default()
        });
        // 1 of 2 blocks of 64 tokens: 0.5·(64/100)² + 0.5·0.5; 2 blocks saturate at 1.
        let got = scores(&s, cycle(2, 64, &[1, 2, 0]));
        let want = [0.5 * 0.64 * 0.64 + 0.25, 1.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        // No blocks at all: 0, as llm-d scores an empty prompt.
        assert_eq!(scores(&s, cycle(0, 64, &[0])), vec![0.0]);
    }
}
