//! The sans-IO engine of one simulated pod: vLLM V1-style continuous batching over simulated time.
//!
//! The engine is a plain struct. A driver hands it requests with [`Engine::submit`], tells it
//! the time with [`Engine::advance`], asks when to call again with [`Engine::next_wakeup`]
//! and drains [`Output`]s. Time is a [`Duration`] since the pod started; the engine never
//! reads a clock, so tests drive it by hand.
//!
//! Model: each step schedules running sequences first (one decode token each, or the next
//! chunk of their prefill), then admits waiting ones FCFS within `max_num_seqs`, the token
//! budget, the KV blocks free and the LoRA slots. A step lasts
//! `prefill_overhead + uncached_prefill_tokens × prefill_per_token` (if it prefills) plus
//! `decode_base + (seqs − 1) × decode_per_seq + context_tokens × decode_per_context_token`
//! (if it decodes), plus `encode_per_image` per image the step must encode. Prefill and
//! decode share a step, so a decode token batched with a long prefill chunk waits for that
//! chunk (the interference P/D disaggregation removes). The next step starts when the
//! previous ends, so results do not depend on how late the driver is. When a running
//! sequence needs a block and none is free, the most recently admitted sequence is
//! preempted (its blocks freed, recomputed later).
//!
//! P/D: a request with remote-prefill `kv_transfer_params` takes blocks for its whole
//! prompt, then waits while the KV is pulled (`kv_bytes_per_token × tokens ÷
//! kv_link_bytes_per_s`; transfers into one pod queue on its link one after another) and
//! computes only its last prompt token, which costs a decode slot, not a prefill.
//!
//! Images: a prompt's images are encoded in the step that first computes the prompt,
//! unless the encoder cache holds them (same content hash) or an encode pod sent their
//! encoder output. An encode-role pod takes encode-only requests ([`Engine::submit_encode`]),
//! run in the same steps.
//!
//! KV events: with [`Engine::enable_kv_events`] the engine logs every change to its prefix
//! cache as vLLM's KV events describe it (blocks stored with their tokens and parent hash,
//! hashes evicted, cache cleared) and hands them out per step with
//! [`Engine::take_kv_events`]; publishing them is the driver's job. Off by default, as
//! vLLM's `enable_kv_cache_events`; when off, the engine does no extra work beyond a
//! branch per newly full block.

mod hash;
mod kv;
mod request;
mod stats;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xxhash_rust::xxh64::Xxh64;

pub use hash::{block_hashes, chain_hash, root_hash};
pub use kv::{BlockId, BlockPool, CacheEvent};
pub use request::{
    Completion, EngineRequest, FinishReason, KvTransfer, MmItem, Output, RequestId, SubmitError,
    check_limits,
};
pub use stats::{EngineStats, Histogram};

use crate::profile::{EngineProfile, kv_transfer_time};
use crate::tokenizer::filler_id;

/// Static settings of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Capacity and timing constants.
    pub profile: EngineProfile,
    /// LoRA adapter names, indexed by [`EngineRequest::lora`].
    pub lora_adapters: Vec<String>,
    /// Seed of the step-duration jitter.
    pub seed: u64,
}

#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    /// Chained hashes of full blocks of prompt + output; extended as blocks fill.
    hashes: Vec<u64>,
    blocks: Vec<BlockId>,
    num_computed: usize,
    generated: usize,
    arrival: Duration,
    first_scheduled: Option<Duration>,
    first_token: Option<Duration>,
    last_token: Option<Duration>,
    cached_tokens: usize,
    prompt_block_ids: Vec<BlockId>,
    /// Remote KV arrives at this time (P/D decode side).
    ready_at: Duration,
    remote_loaded: bool,
    prefix_counted: bool,
    /// Its images have encoder output here (encoded, cached or received).
    encoded: bool,
    /// Ids generated tokens cycle through (`None`: the built-in filler ids).
    output_ids: Option<Arc<[u32]>>,
}

impl Seq {
    fn num_tokens(&self) -> usize {
        self.req.prompt.len() + self.generated
    }

    fn token_at(&self, pos: usize) -> u32 {
        let p = self.req.prompt.len();
        if pos < p {
            self.req.prompt[pos]
        } else {
            match &self.output_ids {
                Some(ids) => ids[(pos - p) % ids.len()],
                None => filler_id(pos - p),
            }
        }
    }

    /// Makes sure hashes of the first `n` full blocks exist.
    fn ensure_hashes(&mut self, n: usize, bs: usize) {
        while self.hashes.len() < n {
            let i = self.hashes.len();
            let parent = if i == 0 {
                root_hash(self.req.lora)
            } else {
                self.hashes[i - 1]
            };
            let mut h = Xxh64::new(parent);
            for pos in i * bs..(i + 1) * bs {
                h.update(&self.token_at(pos).to_le_bytes());
            }
            self.hashes.push(h.digest());
        }
    }
}

#[derive(Debug)]
struct Batch {
    end: Duration,
    items: Vec<(RequestId, usize)>,
    /// Encode-only requests done at `end`: (id, images, cache hits).
    encodes: Vec<(RequestId, usize, usize)>,
}

/// The cache changes of one engine step (one vLLM `KVEventBatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventStep {
    /// Simulated time at which the step ended.
    pub at: Duration,
    /// The changes, in the order the cache saw them.
    pub events: Vec<CacheEvent>,
}

/// An encode-only request waiting for a step.
#[derive(Debug)]
struct EncodeJob {
    id: RequestId,
    hashes: Vec<u64>,
}

/// One simulated vLLM engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    pool: BlockPool,
    seqs: HashMap<RequestId, Seq>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    running_loras: HashMap<u32, usize>,
    in_flight: Option<Batch>,
    /// End of the last finished step (the earliest the next can start).
    clock: Duration,
    outputs: Vec<Output>,
    stats: EngineStats,
    rng: ChaCha8Rng,
    /// Multiplies every step's duration (fault injection: a slow pod).
    slowdown: f64,
    /// Waiting sequences that already hold blocks (remote KV pulled, not yet running).
    waiting_holders: usize,
    /// Adapters in GPU slots, least recently used first (at most `max_loras`).
    gpu_loras: Vec<u32>,
    /// When the KV link is free for the next remote-prefill pull.
    link_free_at: Duration,
    /// Images with encoder output on this pod, least recently used first.
    encoder_cache: VecDeque<u64>,
    /// Encode-only requests not yet in a step.
    encode_jobs: VecDeque<EncodeJob>,
    /// Finished steps' cache changes not yet taken (only filled when events are on).
    kv_steps: Vec<KvEventStep>,
    /// Ids generated tokens cycle through (`None`: the built-in filler ids).
    output_ids: Option<Arc<[u32]>>,
}

impl Engine {
    /// A new idle engine; the profile must already be validated.
    pub fn new(cfg: EngineConfig) -> Self {
        let pool = BlockPool::new(cfg.profile.num_gpu_blocks);
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Self {
            cfg,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            running_loras: HashMap::new(),
            in_flight: None,
            clock: Duration::ZERO,
            outputs: Vec::new(),
            stats: EngineStats::default(),
            rng,
            slowdown: 1.0,
            waiting_holders: 0,
            gpu_loras: Vec::new(),
            link_free_at: Duration::ZERO,
            encoder_cache: VecDeque::new(),
            encode_jobs: VecDeque::new(),
            kv_steps: Vec::new(),
            output_ids: None,
        }
    }

    /// Gives generated token i of later requests the id `ids[i % ids.len()]` (a
    /// `tokenizer.json`'s ids of the filler words); `None` or an empty list restores the
    /// built-in filler ids.
    pub fn set_output_ids(&mut self, ids: Option<Arc<[u32]>>) {
        self.output_ids = ids.filter(|ids| !ids.is_empty());
    }

    /// Starts logging prefix-cache changes for [`Engine::take_kv_events`].
    pub fn enable_kv_events(&mut self) {
        self.pool.record_events();
    }

    /// Takes the cache changes of the steps finished since the last call, one entry per
    /// step that changed the cache. Changes made outside a step (a remote-prefill
    /// registration while nothing runs) come out as an entry of their own.
    pub fn take_kv_events(&mut self) -> Vec<KvEventStep> {
        if self.in_flight.is_none() {
            self.cut_kv_step(self.clock);
        }
        std::mem::take(&mut self.kv_steps)
    }

    /// Closes the current step's cache changes into one entry.
    fn cut_kv_step(&mut self, at: Duration) {
        if self.pool.has_events() {
            let events = self.pool.take_events();
            self.kv_steps.push(KvEventStep { at, events });
        }
    }

    /// Drops every cached prefix (vLLM's `reset_prefix_cache`); refused, changing nothing,
    /// while a sequence holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset()
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Makes every step from now on `factor` times longer (a degraded pod); 1 restores
    /// normal speed. Returns false, changing nothing, unless `factor` is finite and > 0.
    pub fn set_slowdown(&mut self, factor: f64) -> bool {
        if !(factor.is_finite() && factor > 0.0) {
            return false;
        }
        self.slowdown = factor;
        true
    }

    /// Counters and histograms since start.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The KV pool (usage, cached blocks).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Requests in the running batch (vLLM `num_requests_running`).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting, including preempted ones (vLLM `num_requests_waiting`).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Distinct LoRA adapters of running requests (sorted indexes).
    pub fn running_loras(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.running_loras.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Distinct LoRA adapters of waiting requests (sorted indexes).
    pub fn waiting_loras(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .waiting
            .iter()
            .filter_map(|id| self.seqs[id].req.lora)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Checks internal bookkeeping: every block's reference count equals the number of
    /// sequences holding it, and the running/waiting lists cover exactly the live requests.
    /// For tests and debugging; panics with a description on the first violation.
    pub fn check_invariants(&self) {
        let mut refs: HashMap<BlockId, u32> = HashMap::new();
        for s in self.seqs.values() {
            for &b in &s.blocks {
                *refs.entry(b).or_default() += 1;
            }
        }
        for (&b, &n) in &refs {
            assert_eq!(self.pool.ref_count(b), n, "block {b} refcount");
        }
        assert_eq!(refs.len(), self.pool.num_used(), "used blocks");
        assert_eq!(
            self.running.len() + self.waiting.len(),
            self.seqs.len(),
            "every live request is running or waiting"
        );
        assert!(self.running.len() <= self.cfg.profile.max_num_seqs);
        let holders = self
            .waiting
            .iter()
            .filter(|id| !self.seqs[id].blocks.is_empty())
            .count();
        assert_eq!(
            holders, self.waiting_holders,
            "waiting sequences holding blocks"
        );
        assert!(self.running_loras.len() <= self.cfg.profile.max_loras);
        assert!(self.stats.prefix_cache_hits <= self.stats.prefix_cache_queries);
    }

    /// Takes the outputs produced so far, in order.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, Output> {
        self.outputs.drain(..)
    }

    /// Queues a request that arrived at `now`; call [`Engine::advance`] with `now` first.
    pub fn submit(&mut self, now: Duration, req: EngineRequest) -> Result<(), SubmitError> {
        check_limits(&self.cfg.profile, req.prompt.len(), req.max_tokens)?;
        if self.seqs.contains_key(&req.id) {
            return Err(SubmitError::DuplicateId(req.id));
        }
        let id = req.id;
        let hashes = req.block_hashes.clone();
        self.seqs.insert(
            id,
            Seq {
                req,
                hashes,
                blocks: Vec::new(),
                num_computed: 0,
                generated: 0,
                arrival: now,
                first_scheduled: None,
                first_token: None,
                last_token: None,
                cached_tokens: 0,
                prompt_block_ids: Vec::new(),
                ready_at: Duration::ZERO,
                remote_loaded: false,
                prefix_counted: false,
                encoded: false,
                output_ids: self.output_ids.clone(),
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Queues an encode-only request (an encode-role pod's work) for images `hashes`; it
    /// ends with [`Output::Encoded`]. Call [`Engine::advance`] with the current time first.
    pub fn submit_encode(&mut self, id: RequestId, hashes: Vec<u64>) -> Result<(), SubmitError> {
        if hashes.is_empty() {
            return Err(SubmitError::NothingToEncode);
        }
        if self.seqs.contains_key(&id) || self.encode_jobs.iter().any(|j| j.id == id) {
            return Err(SubmitError::DuplicateId(id));
        }
        self.encode_jobs.push_back(EncodeJob { id, hashes });
        Ok(())
    }

    /// Whether image `hash` has encoder output here; records the query and makes it the
    /// most recently used either way (a miss is encoded now and cached).
    fn encoder_lookup(&mut self, hash: u64) -> bool {
        self.stats.encoder_cache_queries += 1;
        let hit = match self.encoder_cache.iter().position(|&h| h == hash) {
            Some(i) => {
                self.encoder_cache.remove(i);
                true
            }
            None => false,
        };
        if hit {
            self.stats.encoder_cache_hits += 1;
        } else if self.encoder_cache.len() >= self.cfg.profile.encoder_cache_items {
            self.encoder_cache.pop_front();
        }
        self.encoder_cache.push_back(hash);
        hit
    }

    /// Drops a request (client went away); frees its blocks. Unknown ids are ignored.
    pub fn abort(&mut self, id: RequestId) {
        let Some(mut seq) = self.seqs.remove(&id) else {
            // Not in a step yet: an encode-only request is simply dropped.
            if let Some(i) = self.encode_jobs.iter().position(|j| j.id == id) {
                self.encode_jobs.remove(i);
                self.stats.aborted += 1;
            }
            return;
        };
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
            self.dec_lora(seq.req.lora);
        } else if let Some(i) = self.waiting.iter().position(|&r| r == id) {
            self.waiting.remove(i);
            if !seq.blocks.is_empty() {
                self.waiting_holders -= 1;
            }
        }
        self.free_blocks(&mut seq);
        self.stats.aborted += 1;
    }

    /// When the driver should call [`Engine::advance`] next, if anything is pending.
    pub fn next_wakeup(&self) -> Option<Duration> {
        if let Some(b) = &self.in_flight {
            return Some(b.end);
        }
        if !self.encode_jobs.is_empty() {
            return Some(self.clock);
        }
        self.waiting
            .iter()
            .map(|id| self.seqs[id].ready_at)
            .filter(|&t| t > self.clock)
            .min()
    }

    /// Runs every step that ends at or before `now` and starts the next one.
    pub fn advance(&mut self, now: Duration) {
        while self.advance_one(now) {}
    }

    /// Like [`Engine::advance`] but runs at most `max_steps` steps; returns whether more
    /// steps are due at `now` (so a driver can yield between slices of zero-cost steps).
    pub fn advance_bounded(&mut self, now: Duration, max_steps: usize) -> bool {
        for _ in 0..max_steps {
            if !self.advance_one(now) {
                return false;
            }
        }
        true
    }

    /// Finishes the in-flight step if due, then starts a new one; false when nothing moved.
    fn advance_one(&mut self, now: Duration) -> bool {
        match &self.in_flight {
            Some(b) if b.end <= now => {
                let b = self.in_flight.take().expect("checked above");
                self.clock = b.end;
                self.finish_step(b);
                self.start_step(self.clock);
                true
            }
            Some(_) => false,
            None => {
                let start = self.clock.max(now);
                self.clock = start;
                self.start_step(start) && self.in_flight.as_ref().is_some_and(|b| b.end <= now)
            }
        }
    }

    /// Schedules a step starting at `start`; returns whether one was started.
    fn start_step(&mut self, start: Duration) -> bool {
        let items = self.schedule(start);
        // Encode-only requests ride along in the same step, up to a batch's worth.
        let take = self.encode_jobs.len().min(self.cfg.profile.max_num_seqs);
        let jobs: Vec<EncodeJob> = self.encode_jobs.drain(..take).collect();
        if items.is_empty() && jobs.is_empty() {
            return false;
        }
        let mut misses = 0usize;
        let mut encodes = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut hits = 0;
            for &h in &job.hashes {
                if self.encoder_lookup(h) {
                    hits += 1;
                } else {
                    misses += 1;
                }
            }
            encodes.push((job.id, job.hashes.len(), hits));
        }
        for &(id, _) in &items {
            let s = self.seqs.get_mut(&id).expect("scheduled seq exists");
            if s.encoded {
                continue;
            }
            s.encoded = true;
            // A pulled prompt's KV already holds the images: nothing to encode.
            if s.req.kv_transfer == KvTransfer::RemotePrefill {
                continue;
            }
            let mm = s.req.mm.clone();
            for item in mm {
                if item.remote {
                    self.stats.remote_encoded_images += 1;
                } else if !self.encoder_lookup(item.hash) {
                    misses += 1;
                }
            }
        }
        let mut loads = 0usize;
        for &(id, _) in &items {
            if let Some(l) = self.seqs[&id].req.lora
                && self.use_lora_slot(l)
            {
                loads += 1;
            }
        }
        self.stats.lora_loads += loads as u64;
        let p = &self.cfg.profile;
        let mut prefill_tokens = 0usize;
        let mut decode_seqs = 0usize;
        let mut context = 0usize;
        for &(id, n) in &items {
            let s = &self.seqs[&id];
            // One token at the end of the sequence is a decode: a generated token, or the
            // last prompt token after the rest of the prompt's KV was pulled.
            if (s.generated > 0 || s.remote_loaded)
                && n == 1
                && s.num_computed + 1 == s.num_tokens()
            {
                decode_seqs += 1;
                context += s.num_computed + 1;
            } else {
                prefill_tokens += n;
            }
            let s = self.seqs.get_mut(&id).expect("scheduled seq exists");
            if s.first_scheduled.is_none() {
                s.first_scheduled = Some(start);
            }
        }
        let mut d = mul(p.lora_load, loads) + mul(p.encode_per_image, misses);
        if prefill_tokens > 0 {
            d += p.prefill_overhead + mul(p.prefill_per_token, prefill_tokens);
        }
        if decode_seqs > 0 {
            d += p.decode_base
                + mul(p.decode_per_seq, decode_seqs - 1)
                + mul(p.decode_per_context_token, context);
        }
        if p.jitter > 0.0 && !d.is_zero() {
            let f: f64 = self.rng.random_range(-p.jitter..p.jitter);
            d = d.mul_f64(1.0 + f);
        }
        if self.slowdown != 1.0 {
            d = d.mul_f64(self.slowdown);
        }
        self.stats.steps += 1;
        self.in_flight = Some(Batch {
            end: start + d,
            items,
            encodes,
        });
        true
    }

    /// Marks adapter `l` most recently used; true when it had to be loaded into a slot.
    fn use_lora_slot(&mut self, l: u32) -> bool {
        if let Some(i) = self.gpu_loras.iter().position(|&x| x == l) {
            let x = self.gpu_loras.remove(i);
            self.gpu_loras.push(x);
            return false;
        }
        if self.gpu_loras.len() >= self.cfg.profile.max_loras {
            // Running adapters never exceed the slots, so an idle one exists to evict.
            if let Some(i) = self
                .gpu_loras
                .iter()
                .position(|x| !self.running_loras.contains_key(x))
            {
                self.gpu_loras.remove(i);
            }
        }
        self.gpu_loras.push(l);
        true
    }

    /// Picks the work of the next step (vLLM V1 scheduler order).
    fn schedule(&mut self, now: Duration) -> Vec<(RequestId, usize)> {
        let bs = self.cfg.profile.block_size;
        let mut budget = self.cfg.profile.max_num_batched_tokens;
        let mut items = Vec::new();
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (target, n) = {
                let s = &self.seqs[&id];
                let n = (s.num_tokens() - s.num_computed).min(budget);
                (s.num_computed + n, n)
            };
            let mut scheduled = true;
            loop {
                let s = self.seqs.get_mut(&id).expect("running seq exists");
                if grow(&mut self.pool, &mut s.blocks, target, bs) {
                    break;
                }
                let victim = self.running.pop().expect("running is not empty");
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            items.push((id, n));
            budget -= n;
            i += 1;
        }

        if !preempted {
            self.admit_waiting(now, &mut budget, &mut items);
        }
        items
    }

    fn admit_waiting(
        &mut self,
        now: Duration,
        budget: &mut usize,
        items: &mut Vec<(RequestId, usize)>,
    ) {
        let p = &self.cfg.profile;
        let bs = p.block_size;
        let max_seqs = p.max_num_seqs;
        let max_loras = p.max_loras;
        let (kv_bytes, link_bw) = (p.kv_bytes_per_token, p.kv_link_bytes_per_s);
        let mut skipped: Vec<RequestId> = Vec::new();
        // Once the head of the queue cannot get blocks, only sequences that already hold
        // theirs may pass it: they need nothing more and their finishing frees blocks, so
        // the head is not blocked forever behind KV it is itself waiting for.
        let mut kv_blocked = false;
        let mut holders_left = self.waiting_holders;
        while *budget > 0 && self.running.len() < max_seqs {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let s = self.seqs.get_mut(&id).expect("waiting seq exists");
            let holder = !s.blocks.is_empty();
            if holder {
                holders_left = holders_left.saturating_sub(1);
            } else if kv_blocked {
                skipped.push(id);
                if holders_left == 0 {
                    break;
                }
                continue;
            }
            if s.ready_at > now {
                skipped.push(id);
                continue;
            }
            if let Some(l) = s.req.lora
                && !self.running_loras.contains_key(&l)
                && self.running_loras.len() >= max_loras
            {
                skipped.push(id);
                continue;
            }

            if s.blocks.is_empty() {
                // Fresh or preempted: look the prefix up. At least one token is always
                // computed, so a fully cached prompt still recomputes its last block.
                let num_tokens = s.num_tokens();
                let max_hit_blocks = (num_tokens - 1) / bs;
                s.ensure_hashes(max_hit_blocks, bs);
                let mut hits: Vec<BlockId> = Vec::new();
                for h in &s.hashes[..max_hit_blocks] {
                    match self.pool.lookup(*h) {
                        Some(b) => hits.push(b),
                        None => break,
                    }
                }
                let hit_tokens = hits.len() * bs;
                let external = if s.req.kv_transfer == KvTransfer::RemotePrefill && !s.remote_loaded
                {
                    (s.req.prompt.len() - 1).saturating_sub(hit_tokens)
                } else {
                    0
                };
                let computed = hit_tokens + external;
                let n = if external > 0 {
                    0
                } else {
                    (num_tokens - computed).min(*budget)
                };
                // Remote KV: hold the whole prompt's blocks at once, so the sequence never
                // waits for a block while holding others (no deadlock on a full cache).
                let target = if external > 0 {
                    num_tokens
                } else {
                    computed + n
                };
                let total_blocks = target.div_ceil(bs);
                let evictable = hits.iter().filter(|&&b| self.pool.is_free(b)).count();
                let need_new = total_blocks - hits.len();
                if need_new + evictable > self.pool.num_free() {
                    if holders_left == 0 {
                        self.waiting.push_front(id);
                        break;
                    }
                    kv_blocked = true;
                    skipped.push(id);
                    continue;
                }
                for &b in &hits {
                    self.pool.touch(b);
                }
                s.blocks = hits;
                for _ in 0..need_new {
                    let b = self.pool.allocate().expect("checked free count");
                    s.blocks.push(b);
                }
                s.num_computed = computed;
                if !s.prefix_counted {
                    s.prefix_counted = true;
                    s.cached_tokens = computed;
                    self.stats.prefix_cache_queries += num_tokens as u64;
                    self.stats.prefix_cache_hits += hit_tokens as u64;
                }
                if external > 0 {
                    // The prompt's KV is pulled from the prefill pod; the sequence holds
                    // its blocks and waits for the transfer before its last-token step.
                    s.remote_loaded = true;
                    self.waiting_holders += 1;
                    let start = now.max(self.link_free_at);
                    s.ready_at = start + kv_transfer_time(kv_bytes, link_bw, external);
                    self.link_free_at = s.ready_at;
                    self.stats.remote_prefill_tokens += external as u64;
                    // The blocks are full of the remote KV now; register their hashes.
                    let full = computed / bs;
                    s.ensure_hashes(full, bs);
                    cache_full_blocks(&mut self.pool, s, 0, full, bs);
                    if s.ready_at > now {
                        skipped.push(id);
                        continue;
                    }
                }
                if n > 0 {
                    self.push_running(id, n, budget, items);
                    continue;
                }
            }
            // Holds blocks already (remote KV has arrived): compute the rest.
            let s = self.seqs.get_mut(&id).expect("waiting seq exists");
            let n = (s.num_tokens() - s.num_computed).min(*budget);
            if !grow(&mut self.pool, &mut s.blocks, s.num_computed + n, bs) {
                kv_blocked = true;
                skipped.push(id);
                continue;
            }
            self.waiting_holders -= 1;
            self.push_running(id, n, budget, items);
        }
        for id in skipped.into_iter().rev() {
            self.waiting.push_front(id);
        }
    }

    fn push_running(
        &mut self,
        id: RequestId,
        n: usize,
        budget: &mut usize,
        items: &mut Vec<(RequestId, usize)>,
    ) {
        let lora = self.seqs[&id].req.lora;
        self.running.push(id);
        if let Some(l) = lora {
            *self.running_loras.entry(l).or_default() += 1;
        }
        items.push((id, n));
        *budget -= n;
    }

    fn preempt(&mut self, id: RequestId) {
        let mut seq = self.seqs.remove(&id).expect("preempted seq exists");
        self.dec_lora(seq.req.lora);
        self.free_blocks(&mut seq);
        seq.num_computed = 0;
        self.seqs.insert(id, seq);
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
    }

    fn dec_lora(&mut self, lora: Option<u32>) {
        if let Some(l) = lora
            && let Some(c) = self.running_loras.get_mut(&l)
        {
            *c -= 1;
            if *c == 0 {
                self.running_loras.remove(&l);
            }
        }
    }

    /// Releases a sequence's blocks, tail first, so its last blocks are evicted first.
    fn free_blocks(&mut self, seq: &mut Seq) {
        for &b in seq.blocks.iter().rev() {
            self.pool.release(b);
        }
        seq.blocks.clear();
    }

    fn finish_step(&mut self, batch: Batch) {
        let bs = self.cfg.profile.block_size;
        let at = batch.end;
        for (id, images, hits) in batch.encodes {
            self.outputs.push(Output::Encoded {
                id,
                images,
                hits,
                at,
            });
        }
        let mut finished: Vec<RequestId> = Vec::new();
        for (id, n) in batch.items {
            // Aborted or preempted since scheduling: its work is lost.
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            if s.blocks.is_empty() {
                continue;
            }
            let before = s.num_computed;
            s.num_computed += n;
            let full_before = before / bs;
            let full_after = s.num_computed / bs;
            if full_after > full_before {
                s.ensure_hashes(full_after, bs);
                cache_full_blocks(&mut self.pool, s, full_before, full_after, bs);
            }
            if s.num_computed < s.num_tokens() {
                continue; // mid-prefill chunk
            }
            let index = s.generated;
            s.generated += 1;
            self.stats.generation_tokens += 1;
            if s.first_token.is_none() {
                s.first_token = Some(at);
                self.stats.ttft.observe((at - s.arrival).as_secs_f64());
                let sched = s.first_scheduled.unwrap_or(at);
                self.stats.queue.observe((sched - s.arrival).as_secs_f64());
                self.stats.prefill.observe((at - sched).as_secs_f64());
                s.prompt_block_ids =
                    s.blocks[..s.req.prompt.len().div_ceil(bs).min(s.blocks.len())].to_vec();
            } else if let Some(last) = s.last_token {
                self.stats.itl.observe((at - last).as_secs_f64());
            }
            s.last_token = Some(at);
            self.outputs.push(Output::Token { id, index, at });
            if s.generated >= s.req.max_tokens {
                finished.push(id);
            }
        }
        for id in finished {
            self.finish_seq(id, at);
        }
        // vLLM publishes once per step, after the step's output: the evictions of its
        // scheduling and the blocks it filled.
        self.cut_kv_step(at);
    }

    fn finish_seq(&mut self, id: RequestId, at: Duration) {
        let mut seq = self.seqs.remove(&id).expect("finished seq exists");
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        }
        self.dec_lora(seq.req.lora);
        self.free_blocks(&mut seq);
        let st = &mut self.stats;
        st.prompt_tokens += seq.req.prompt.len() as u64;
        match seq.req.finish {
            FinishReason::Length => st.finished_length += 1,
            FinishReason::Stop => st.finished_stop += 1,
        }
        st.e2e.observe((at - seq.arrival).as_secs_f64());
        if let Some(ft) = seq.first_token {
            st.decode.observe((at - ft).as_secs_f64());
        }
        self.outputs.push(Output::Finished {
            id,
            completion: Completion {
                prompt_tokens: seq.req.prompt.len(),
                completion_tokens: seq.generated,
                cached_tokens: seq.cached_tokens,
                finish: seq.req.finish,
                prompt_block_ids: seq.prompt_block_ids,
                at,
            },
        });
    }
}

/// Caches the hashes of `s`'s full blocks `from..to`; with events on, logs each run of
/// blocks that became cached as one `Stored` (a block whose hash another block already
/// caches changes nothing and breaks the run, as the pool itself does).
fn cache_full_blocks(pool: &mut BlockPool, s: &Seq, from: usize, to: usize, bs: usize) {
    if !pool.records_events() {
        for k in from..to {
            pool.register(s.blocks[k], s.hashes[k]);
        }
        return;
    }
    let mut run: Option<usize> = None;
    for k in from..=to {
        let cached = k < to && pool.register(s.blocks[k], s.hashes[k]);
        match (cached, run) {
            (true, None) => run = Some(k),
            (false, Some(start)) => {
                pool.push_event(CacheEvent::Stored {
                    block_hashes: s.hashes[start..k].to_vec(),
                    parent: start.checked_sub(1).map(|p| s.hashes[p]),
                    token_ids: (start * bs..k * bs).map(|pos| s.token_at(pos)).collect(),
                    lora: s.req.lora,
                });
                run = None;
            }
            _ => {}
        }
    }
}

/// Extends `blocks` to hold `tokens` tokens; false (nothing taken) when too few are free.
fn grow(pool: &mut BlockPool, blocks: &mut Vec<BlockId>, tokens: usize, bs: usize) -> bool {
    let need = tokens.div_ceil(bs).saturating_sub(blocks.len());
    if need > pool.num_free() {
        return false;
    }
    for _ in 0..need {
        blocks.push(pool.allocate().expect("checked free count"));
    }
    true
}

fn mul(d: Duration, n: usize) -> Duration {
    d * u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
