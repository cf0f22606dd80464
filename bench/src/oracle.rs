//! The oracle bound of the fleet prefix-cache hit rate for a workload.
//!
//! The oracle is one cache of unbounded size that sees every request in send order: a
//! request hits on the leading full 16-token blocks whose chained hash was seen before.
//! No router over any number of finite pods can do better, because cold misses (the first
//! time a prefix is seen) and unique suffixes (questions, partial last blocks) can never
//! hit. Like vLLM, at least the last prompt token is always computed, so a prompt of `T`
//! tokens hits on at most `(T - 1) / 16` blocks.
//!
//! The bound is exact for the completions API, where the prompt is sent as rendered here.
//! With the chat API the server's chat template adds tokens around each message, which
//! shifts block boundaries, so the bound is then an approximation.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::workload::PlannedRequest;
use crate::workload::text::BYTES_PER_TOKEN;

/// vLLM's default KV block size in tokens.
pub const BLOCK_TOKENS: usize = 16;

/// The oracle's token counts for a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OracleBound {
    /// Prompt tokens sent (what vLLM counts as prefix-cache queries).
    pub query_tokens: u64,
    /// Tokens an unbounded cache would have served.
    pub hit_tokens: u64,
    /// Tokens in distinct full blocks that more than one request uses: the KV a fleet
    /// must hold to serve every reuse (compare with the fleet's KV capacity).
    pub reused_block_tokens: u64,
}

impl OracleBound {
    /// `hit_tokens / query_tokens` (0 for an empty plan).
    pub fn hit_rate(&self) -> f64 {
        if self.query_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.query_tokens as f64
        }
    }
}

/// Computes the oracle bound over `plan` rendered with `seed`, with `block_tokens`-token
/// blocks.
pub fn oracle_bound(seed: u64, plan: &[PlannedRequest], block_tokens: usize) -> OracleBound {
    let block_bytes = block_tokens.max(1) * BYTES_PER_TOKEN;
    let mut uses: HashMap<u64, u32> = HashMap::new();
    let mut out = OracleBound::default();
    let mut hashes = Vec::new();
    for req in plan {
        let prompt = req.render_prompt(seed);
        let tokens = prompt.len() / BYTES_PER_TOKEN;
        hashes.clear();
        let mut parent = 0u64;
        for block in prompt.as_bytes().chunks_exact(block_bytes) {
            parent = xxhash_rust::xxh64::xxh64(block, parent);
            hashes.push(parent);
        }
        let cap = tokens.saturating_sub(1) / block_tokens.max(1);
        let hit_blocks = hashes
            .iter()
            .take(cap)
            .take_while(|h| uses.contains_key(h))
            .count();
        out.query_tokens += tokens as u64;
        out.hit_tokens += (hit_blocks * block_tokens) as u64;
        for h in &hashes {
            let n = uses.entry(*h).or_insert(0);
            *n += 1;
            if *n == 2 {
                out.reused_block_tokens += block_tokens as u64;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Popularity, SharedPrefixSpec};

    #[test]
    fn tiny_shared_prefix_matches_hand_count() {
        // 2 groups x 3 prompts, system 40 tokens (2 full blocks + 8), question 20 tokens.
        // Each prompt: 60 tokens = 3 full blocks + 12 tokens. Block 0,1 are pure system
        // prompt; block 2 mixes the system tail with the unique question, so never hits.
        // First prompt of each group: 0 hits; the other 2 per group: 2 blocks = 32 tokens.
        let s = SharedPrefixSpec {
            groups: 2,
            prompts_per_group: 3,
            system_prompt_tokens: 40,
            question_tokens: 20,
            output_tokens: 1,
            popularity: Popularity::Uniform,
            images_per_request: 0,
        };
        let plan = s.plan(11, 6);
        let b = oracle_bound(11, &plan, 16);
        assert_eq!(b.query_tokens, 6 * 60);
        assert_eq!(b.hit_tokens, 2 * 2 * 32);
        assert_eq!(b.reused_block_tokens, 2 * 2 * 16);
        assert!((b.hit_rate() - 128.0 / 360.0).abs() < 1e-12);
    }

    #[test]
    fn the_last_token_is_never_a_hit() {
        // A repeated prompt of exactly 2 blocks hits on 1 block only: (32 - 1) / 16 = 1.
        let s = SharedPrefixSpec {
            groups: 1,
            prompts_per_group: 2,
            system_prompt_tokens: 32,
            question_tokens: 1,
            output_tokens: 1,
            popularity: Popularity::Uniform,
            images_per_request: 0,
        };
        let mut plan = s.plan(1, 2);
        for r in &mut plan {
            r.segments.truncate(1);
        }
        let b = oracle_bound(1, &plan, 16);
        assert_eq!((b.query_tokens, b.hit_tokens), (64, 16));
    }
}
