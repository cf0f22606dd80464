//! Request keys for precise (KV-event driven) prefix matching.
//!
//! llm-d's dual-key design: the index never reproduces the engine's block hashes. It keeps
//! its own *request keys*, a chain over token ids seeded from the model (and LoRA adapter),
//! and learns engine key → request key from each `BlockStored` event (which carries the
//! blocks' tokens). So vLLM's hash algorithm (SHA-256 over pickle by default), its seed
//! (`PYTHONHASHSEED`) and its byte format need not match anything here: both the request
//! path and the event applier compute keys with the functions below.
//!
//! Scheme (xxh64 with seed 0, like the approximate chain in [`super::hash`]):
//! - `model_seed = xxh64(model)`;
//! - with a LoRA adapter, `seed = xxh64(LE64(model_seed) ‖ adapter)`, without,
//!   `seed = model_seed`;
//! - `k_i = xxh64(LE64(k_{i-1}) ‖ LE32(t) for each token t of block i)`, `k_{-1} = seed`;
//! - only full blocks get keys (an engine only publishes full blocks); the anchor is `k_0`.

use xxhash_rust::xxh64::{Xxh64, xxh64};

use super::index::BlockHash;

/// The chain's seed for a model without an adapter: `xxh64(model)`.
pub fn model_seed(model: &str) -> BlockHash {
    xxh64(model.as_bytes(), 0)
}

/// The chain's seed for blocks computed under `lora` (if any) on top of `model_seed`.
pub fn lora_seed(model_seed: BlockHash, lora: Option<&str>) -> BlockHash {
    match lora {
        None => model_seed,
        Some(name) => {
            let mut h = Xxh64::new(0);
            h.update(&model_seed.to_le_bytes());
            h.update(name.as_bytes());
            h.digest()
        }
    }
}

/// The chain's seed for a request to `model` with the optional LoRA adapter `lora`.
pub fn request_seed(model: &str, lora: Option<&str>) -> BlockHash {
    lora_seed(model_seed(model), lora)
}

/// The key of one full block given its parent's key (or the seed for the first block).
pub fn block_key(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = Xxh64::new(0);
    h.update(&parent.to_le_bytes());
    // One update per block rather than per token: the streaming state buffers anyway, but
    // a byte buffer keeps the per-call overhead off the hot path for 16-token blocks.
    let mut buf = [0u8; 4 * 64];
    for chunk in tokens.chunks(64) {
        for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    h.digest()
}

/// Keys of the first `max_blocks` full blocks of `tokens` (a trailing partial block has
/// none), appended to `out` after clearing it.
pub fn request_keys_into(
    seed: BlockHash,
    tokens: &[u32],
    block_size: usize,
    max_blocks: usize,
    out: &mut Vec<BlockHash>,
) {
    out.clear();
    if block_size == 0 {
        return;
    }
    let n = (tokens.len() / block_size).min(max_blocks);
    out.reserve(n);
    let mut parent = seed;
    for block in tokens.chunks_exact(block_size).take(n) {
        parent = block_key(parent, block);
        out.push(parent);
    }
}

/// [`request_keys_into`] returning a fresh vector.
pub fn request_keys(
    seed: BlockHash,
    tokens: &[u32],
    block_size: usize,
    max_blocks: usize,
) -> Vec<BlockHash> {
    let mut out = Vec::new();
    request_keys_into(seed, tokens, block_size, max_blocks, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn hand_computed_chain() {
        let seed = request_seed("m", None);
        assert_eq!(seed, xxh64(b"m", 0));
        let mut b0 = seed.to_le_bytes().to_vec();
        for t in [1u32, 2] {
            b0.extend_from_slice(&t.to_le_bytes());
        }
        let k0 = xxh64(&b0, 0);
        let mut b1 = k0.to_le_bytes().to_vec();
        for t in [3u32, 4] {
            b1.extend_from_slice(&t.to_le_bytes());
        }
        let k1 = xxh64(&b1, 0);
        // The trailing partial block [5] has no key.
        assert_eq!(request_keys(seed, &[1, 2, 3, 4, 5], 2, 256), vec![k0, k1]);
        assert_eq!(request_keys(seed, &[1, 2, 3, 4, 5], 2, 1), vec![k0]);
    }

    #[test]
    fn long_blocks_hash_like_one_buffer() {
        // Blocks longer than the internal 64-token buffer must hash as one byte string.
        let tokens: Vec<u32> = (0..200).collect();
        let mut bytes = 9u64.to_le_bytes().to_vec();
        for t in &tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(block_key(9, &tokens), xxh64(&bytes, 0));
    }

    #[test]
    fn degenerate_sizes_give_nothing() {
        let seed = request_seed("m", None);
        assert!(request_keys(seed, &[1, 2, 3], 4, 256).is_empty());
        assert!(request_keys(seed, &[1, 2, 3, 4], 0, 256).is_empty());
        assert!(request_keys(seed, &[1, 2, 3, 4], 4, 0).is_empty());
    }

    #[test]
    fn model_and_adapter_change_every_key() {
        let tokens: Vec<u32> = (0..64).collect();
        let a = request_keys(request_seed("a", None), &tokens, 16, 256);
        let b = request_keys(request_seed("b", None), &tokens, 16, 256);
        let c = request_keys(request_seed("a", Some("lora")), &tokens, 16, 256);
        assert_eq!(a.len(), 4);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert!(a.iter().zip(&c).all(|(x, y)| x != y));
        assert_eq!(
            lora_seed(model_seed("a"), Some("lora")),
            request_seed("a", Some("lora"))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// A longer token prefix extends the shorter one's keys; the anchor is shared.
        #[test]
        fn longer_prefix_extends_keys(
            tokens in proptest::collection::vec(any::<u32>(), 0..300),
            cut in 0usize..300,
            block_size in 1usize..20,
        ) {
            let seed = request_seed("model", None);
            let cut = cut.min(tokens.len());
            let short = request_keys(seed, &tokens[..cut], block_size, usize::MAX);
            let long = request_keys(seed, &tokens, block_size, usize::MAX);
            prop_assert_eq!(short.len(), cut / block_size);
            prop_assert_eq!(&long[..short.len()], &short[..]);
            // Each key depends only on its parent and its own block.
            for (i, k) in long.iter().enumerate() {
                let parent = if i == 0 { seed } else { long[i - 1] };
                let block = &tokens[i * block_size..(i + 1) * block_size];
                prop_assert_eq!(*k, block_key(parent, block));
            }
        }
    }
}
