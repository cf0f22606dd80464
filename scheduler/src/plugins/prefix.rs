//! The prefix producers. `approx-prefix-cache-producer` hashes the prompt's bytes,
//! matches them against its index and records the picked endpoints' blocks after a pick.
//! `precise-prefix-cache-producer` keys the prompt's token ids (from the token producer)
//! as the KV-event applier keys the engines' blocks; its index is the mesh's prefix store,
//! fed by the engines' events, so it records nothing after a pick.

use std::net::SocketAddr;

use hashbrown::HashMap;

use super::{CycleState, DataProducer, PrefixCycle};
use crate::config::params::ApproxPrefixParams;
use crate::config::precise::PrecisePrefixParams;
use crate::model::{Endpoint, InferenceRequest};
use crate::prefix::{
    PrefixIndex, PrefixMatches, hash_prompt_into, request_keys_into, request_seed,
};

/// The smallest block size autoTune indexes at (llm-d PR #1160): the index keeps one
/// entry per (endpoint, block), so vLLM's 16-token blocks are matched as 64-token ones to
/// bound its memory. An explicit `blockSizeTokens` with autoTune off is used as written.
pub const MIN_AUTOTUNE_BLOCK_SIZE_TOKENS: usize = 64;

/// The approximate prefix producer and its index.
#[derive(Debug)]
pub struct ApproxPrefixProducer {
    params: ApproxPrefixParams,
    index: PrefixIndex,
}

impl ApproxPrefixProducer {
    /// A producer with an empty index.
    pub fn new(params: ApproxPrefixParams) -> Self {
        ApproxPrefixProducer {
            params,
            index: PrefixIndex::default(),
        }
    }

    /// The index (for inspection and for sharing prefix state).
    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    /// Block size in tokens (llm-d `GetBlockSize`): the configured `blockSizeTokens`
    /// verbatim without autoTune; under autoTune endpoints[0]'s cache block size (else
    /// the configured value), raised to at least [`MIN_AUTOTUNE_BLOCK_SIZE_TOKENS`].
    pub fn block_size_tokens(&self, endpoints: &[Endpoint]) -> usize {
        let configured = usize::try_from(self.params.block_size_tokens).unwrap_or(0);
        if !self.params.auto_tune {
            return configured;
        }
        endpoints
            .first()
            .and_then(|e| e.metrics.as_ref())
            .and_then(|m| m.cache_block_size)
            .filter(|b| *b > 0)
            .map_or(configured, |b| b as usize)
            .max(MIN_AUTOTUNE_BLOCK_SIZE_TOKENS)
    }

    /// Most blocks hashed for this block size.
    pub fn max_blocks(&self, block_size_tokens: usize) -> usize {
        if self.params.max_prefix_tokens_to_match > 0 && block_size_tokens > 0 {
            self.params.max_prefix_tokens_to_match as usize / block_size_tokens
        } else {
            usize::try_from(self.params.max_prefix_blocks_to_match).unwrap_or(0)
        }
    }

    /// LRU capacity for an endpoint: its KV block count under autoTune, else
    /// `lruCapacityPerServer`.
    pub fn capacity_for(&self, e: &Endpoint) -> usize {
        let configured = usize::try_from(self.params.lru_capacity_per_server).unwrap_or(1);
        if self.params.auto_tune
            && let Some(n) = e
                .metrics
                .as_ref()
                .and_then(|m| m.cache_num_blocks)
                .filter(|n| *n > 0)
        {
            return usize::try_from(n).unwrap_or(usize::MAX);
        }
        configured
    }

    /// Hashes the request and fills `out` with one match count per endpoint.
    pub fn produce(
        &self,
        request: &InferenceRequest,
        endpoints: &[Endpoint],
        out: &mut PrefixCycle,
    ) {
        self.hash_into(request, endpoints, out);
        if out.hashes.is_empty() {
            return;
        }
        let mut m = PrefixMatches::default();
        self.index.match_prefix_into(&out.hashes, &mut m);
        spread_matches(&m, endpoints, &mut out.matched);
    }

    /// Hashes the request into `out` (match counts all zero).
    pub fn hash_into(
        &self,
        request: &InferenceRequest,
        endpoints: &[Endpoint],
        out: &mut PrefixCycle,
    ) {
        let bst = self.block_size_tokens(endpoints);
        out.block_size_tokens = bst;
        hash_prompt_into(
            &request.target_model,
            request.cache_salt.as_deref(),
            &request.prompt_bytes,
            bst,
            self.max_blocks(bst),
            &mut out.hashes,
        );
        out.matched.clear();
        out.matched.resize(endpoints.len(), 0);
    }

    /// Records the chain at `addr` (after a pick).
    pub fn record(&self, addr: SocketAddr, capacity: usize, hashes: &[u64]) {
        self.index.record(addr, capacity, hashes);
    }
}

/// The precise producer: request keys over the prompt's tokens; matches come from the
/// owners of the KV-event index, never from a local one.
#[derive(Debug)]
pub struct PrecisePrefixProducer {
    // Boxed: the parameters are large and the producer is built once per policy.
    params: Box<PrecisePrefixParams>,
}

impl PrecisePrefixProducer {
    /// A producer with `params`.
    pub fn new(params: PrecisePrefixParams) -> Self {
        PrecisePrefixProducer {
            params: Box::new(params),
        }
    }

    /// The producer's parameters (the node reads the event and speculation settings).
    pub fn params(&self) -> &PrecisePrefixParams {
        &self.params
    }

    /// Request keys of `tokens` for `model` (empty when no token ids are known).
    pub fn keys_into(&self, model: &str, tokens: &[u32], out: &mut Vec<u64>) {
        let max = match self
            .params
            .token_processor_config
            .max_prefix_blocks_to_match
        {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        request_keys_into(
            request_seed(model, None),
            tokens,
            self.params.block_size(),
            max,
            out,
        );
    }

    /// Keys the request's tokens into `out` (match counts all zero).
    pub fn hash_into(
        &self,
        request: &InferenceRequest,
        endpoints: &[Endpoint],
        out: &mut PrefixCycle,
    ) {
        out.block_size_tokens = self.params.block_size();
        match &request.prompt_tokens {
            Some(tokens) => self.keys_into(&request.target_model, tokens, &mut out.hashes),
            None => out.hashes.clear(),
        }
        out.matched.clear();
        out.matched.resize(endpoints.len(), 0);
    }
}

/// The one prefix producer a scheduler runs.
#[derive(Debug)]
pub enum PrefixProducer {
    /// `approx-prefix-cache-producer`.
    Approx(ApproxPrefixProducer),
    /// `precise-prefix-cache-producer`.
    Precise(PrecisePrefixProducer),
}

impl PrefixProducer {
    /// The local index (the approximate producer's only).
    pub fn index(&self) -> Option<&PrefixIndex> {
        match self {
            PrefixProducer::Approx(p) => Some(p.index()),
            PrefixProducer::Precise(_) => None,
        }
    }

    /// The precise producer, when that is the one.
    pub fn precise(&self) -> Option<&PrecisePrefixProducer> {
        match self {
            PrefixProducer::Precise(p) => Some(p),
            PrefixProducer::Approx(_) => None,
        }
    }

    /// Hashes (or keys) the request into `out`, match counts all zero.
    pub fn hash_into(
        &self,
        request: &InferenceRequest,
        endpoints: &[Endpoint],
        out: &mut PrefixCycle,
    ) {
        match self {
            PrefixProducer::Approx(p) => p.hash_into(request, endpoints, out),
            PrefixProducer::Precise(p) => p.hash_into(request, endpoints, out),
        }
    }

    /// Blocks an endpoint's entry may hold in the local index (0 for precise: none kept).
    pub fn capacity_for(&self, e: &Endpoint) -> usize {
        match self {
            PrefixProducer::Approx(p) => p.capacity_for(e),
            PrefixProducer::Precise(_) => 0,
        }
    }

    /// Records a pick in the local index (the precise index learns from events only).
    pub fn record(&self, addr: SocketAddr, capacity: usize, hashes: &[u64]) {
        if let PrefixProducer::Approx(p) = self {
            p.record(addr, capacity, hashes);
        }
    }
}

impl DataProducer for PrefixProducer {
    /// Approx: hashes and matches locally. Precise: keys only (no local index), so the
    /// cycle is cold unless the caller brought the owners' matches.
    fn produce(&self, cycle: &mut CycleState<'_>) {
        match self {
            PrefixProducer::Approx(p) => DataProducer::produce(p, cycle),
            PrefixProducer::Precise(p) => {
                let mut pc = cycle.prefix.take().unwrap_or_default();
                p.hash_into(cycle.request, cycle.endpoints, &mut pc);
                cycle.cold = true;
                cycle.prefix = Some(pc);
            }
        }
    }
}

/// Copies per-address match counts onto the candidate positions.
pub fn spread_matches(m: &PrefixMatches, endpoints: &[Endpoint], matched: &mut [u32]) {
    if m.entries.is_empty() {
        return;
    }
    if m.entries.len() * endpoints.len() <= 4096 {
        for (i, e) in endpoints.iter().enumerate() {
            if let Some((_, c)) = m.entries.iter().find(|(a, _)| *a == e.address) {
                matched[i] = *c;
            }
        }
    } else {
        let map: HashMap<SocketAddr, u32> = m.entries.iter().copied().collect();
        for (i, e) in endpoints.iter().enumerate() {
            if let Some(c) = map.get(&e.address) {
                matched[i] = *c;
            }
        }
    }
}

impl DataProducer for ApproxPrefixProducer {
    /// Hashes the prompt, matches it locally and marks the cycle cold when nothing matched.
    fn produce(&self, cycle: &mut CycleState<'_>) {
        let mut pc = cycle.prefix.take().unwrap_or_default();
        ApproxPrefixProducer::produce(self, cycle.request, cycle.endpoints, &mut pc);
        cycle.cold = pc.matched.iter().all(|&m| m == 0);
        cycle.prefix = Some(pc);
    }
}
