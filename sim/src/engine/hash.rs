//! Chained block hashes: the identity of a KV block in the prefix cache.

use xxhash_rust::xxh64::{Xxh64, xxh64};

/// Hash that roots a chain: the LoRA adapter is part of the key, as in vLLM.
pub fn root_hash(lora: Option<u32>) -> u64 {
    xxh64(
        &lora.map_or(0u64, |l| u64::from(l) + 1).to_le_bytes(),
        0x5eed,
    )
}

/// Hash of one full block given its parent's hash.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = Xxh64::new(parent);
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.digest()
}

/// Chained hashes of every full block of `tokens`.
pub fn block_hashes(tokens: &[u32], lora: Option<u32>, block_size: usize) -> Vec<u64> {
    let mut parent = root_hash(lora);
    tokens
        .chunks_exact(block_size)
        .map(|b| {
            parent = chain_hash(parent, b);
            parent
        })
        .collect()
}
