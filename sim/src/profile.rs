//! Engine profiles: the capacity and timing constants of one simulated pod.

use std::time::Duration;

use crate::error::SimError;

/// Capacity and timing constants of a simulated vLLM engine; every field is also a CLI flag.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineProfile {
    /// Profile name reported in `/server_info` (e.g. `llama-8b-h100`).
    pub name: String,
    /// Tokens per KV block (vLLM `--block-size`).
    pub block_size: usize,
    /// KV capacity in blocks (vLLM's `num_gpu_blocks`).
    pub num_gpu_blocks: usize,
    /// Most sequences in one batch (vLLM `--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Token budget of one engine step, prefill chunks plus decode tokens (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Longest prompt + completion accepted (`--max-model-len`).
    pub max_model_len: usize,
    /// Fixed cost of a step that contains prefill work.
    pub prefill_overhead: Duration,
    /// Cost of prefilling one uncached prompt token.
    pub prefill_per_token: Duration,
    /// Cost of a decode step with one sequence in the batch.
    pub decode_base: Duration,
    /// Extra decode-step cost per additional sequence in the batch.
    pub decode_per_seq: Duration,
    /// Extra decode-step cost per context token read (KV bandwidth), summed over the batch.
    pub decode_per_context_token: Duration,
    /// Bytes of KV one token occupies (all layers, K and V): what a P/D decode pod pulls.
    pub kv_bytes_per_token: u64,
    /// Bandwidth of the pod's KV link to prefill pods (NIXL over RDMA), bytes per second;
    /// transfers into one pod share it one after another.
    pub kv_link_bytes_per_s: u64,
    /// GPU time to encode one image (vision encoder) when it is not in the encoder cache.
    pub encode_per_image: Duration,
    /// Prompt tokens one image occupies after encoding (its embedding positions).
    pub image_tokens: usize,
    /// Images whose encoder output a pod keeps (least recently used dropped first); an
    /// image seen again while cached costs no encoding.
    pub encoder_cache_items: usize,
    /// Most distinct LoRA adapters in one batch, and GPU adapter slots (`--max-loras`).
    pub max_loras: usize,
    /// Added to a step that brings an adapter into a GPU slot it did not occupy (the least
    /// recently used idle adapter is evicted).
    pub lora_load: Duration,
    /// Relative uniform jitter applied to each step's duration (0 = exact).
    pub jitter: f64,
    /// Completion length when a request gives no `max_tokens` (stands in for the EOS token).
    pub default_max_tokens: usize,
}

/// The names accepted by [`EngineProfile::named`].
pub const PROFILE_NAMES: &[&str] = &["llama-8b-h100", "llama-70b-h100-tp4", "instant"];

impl EngineProfile {
    /// Llama-3.1-8B (BF16) on one H100 80GB with vLLM V1 defaults.
    ///
    /// Where the numbers come from (first-principles estimates, not measurements):
    /// - KV: 64 GB left for KV after weights at `gpu_memory_utilization=0.9`; 128 KiB of KV
    ///   per token (32 layers × 8 KV heads × 128 dims × 2 (K,V) × 2 bytes) → 500k tokens →
    ///   31,250 blocks of 16 (the same derivation as llm-d's `lruCapacityPerServer`).
    /// - Prefill: 2 × 8e9 FLOP/token at ~35% of 989 TFLOPS ≈ 20k tokens/s → 50 µs/token, plus
    ///   ~5 ms of per-step scheduling/launch overhead.
    /// - Decode: reading 16 GB of weights at 3.35 TB/s ≈ 4.8 ms → ~6 ms per step at batch 1;
    ///   each context token adds its 128 KiB of KV reads (≈ 40 ns at 3.35 TB/s); sampling and
    ///   per-sequence work ≈ 30 µs.
    /// - KV transfer (P/D): the 128 KiB of KV per token over one 400 Gb/s RDMA NIC per GPU
    ///   (ConnectX-7, ~50 GB/s) ≈ 2.6 µs per token, ~13 ms for a 5,000-token prompt.
    /// - Images: a ~600M-parameter ViT over a ~900×900 image (4,096 patches of 14 px, merged
    ///   2×2 into 1,024 prompt tokens): 2 × 0.6e9 × 4,096 ≈ 5 TFLOP at ~35% of 989 TFLOPS ≈
    ///   14 ms, plus pre-processing ≈ 20 ms; the encoder cache keeps 4,096 images' outputs.
    /// - LoRA: a rank-16 adapter is ~60 MB in BF16; copying it from host memory at ~20 GB/s
    ///   plus setup ≈ 5 ms per load into a GPU slot.
    /// - Scheduler: vLLM V1 defaults for ≥70 GB GPUs in the API server: `max_num_seqs=1024`,
    ///   `max_num_batched_tokens=8192`; `max_loras=1`; Llama-3.1 context 131072.
    pub fn llama_8b_h100() -> Self {
        Self {
            name: "llama-8b-h100".to_owned(),
            block_size: 16,
            num_gpu_blocks: 31_250,
            max_num_seqs: 1024,
            max_num_batched_tokens: 8192,
            max_model_len: 131_072,
            prefill_overhead: Duration::from_millis(5),
            prefill_per_token: Duration::from_micros(50),
            decode_base: Duration::from_millis(6),
            decode_per_seq: Duration::from_micros(30),
            decode_per_context_token: Duration::from_nanos(40),
            kv_bytes_per_token: 128 * 1024,
            kv_link_bytes_per_s: 50_000_000_000,
            encode_per_image: Duration::from_millis(20),
            image_tokens: 1024,
            encoder_cache_items: 4096,
            max_loras: 1,
            lora_load: Duration::from_millis(5),
            jitter: 0.0,
            default_max_tokens: 128,
        }
    }

    /// Llama-3.1-70B (BF16) on four H100 80GB with tensor parallelism 4.
    ///
    /// Where the numbers come from: 4 × 80 GB × 0.9 − 140 GB weights ≈ 140 GB of KV; 320 KiB of
    /// KV per token (80 layers × 8 KV heads × 128 × 2 × 2 bytes) → ~450k tokens → 28,000
    /// blocks. Prefill 2 × 70e9 FLOP/token at ~35% of 4 × 989 TFLOPS ≈ 10k tokens/s → 100 µs;
    /// decode reads 35 GB of weights per GPU at 3.35 TB/s ≈ 10.5 ms plus all-reduce → 12 ms.
    /// KV moves over the four GPUs' NICs at once: 4 × 50 GB/s. The 8B profile's vision
    /// encoder and image size are kept.
    pub fn llama_70b_h100_tp4() -> Self {
        Self {
            name: "llama-70b-h100-tp4".to_owned(),
            num_gpu_blocks: 28_000,
            prefill_overhead: Duration::from_millis(8),
            prefill_per_token: Duration::from_micros(100),
            decode_base: Duration::from_millis(12),
            decode_per_seq: Duration::from_micros(60),
            decode_per_context_token: Duration::from_nanos(25),
            kv_bytes_per_token: 320 * 1024,
            kv_link_bytes_per_s: 200_000_000_000,
            ..Self::llama_8b_h100()
        }
    }

    /// A pod with zero compute cost: measures a router's own overhead ("zero-latency pods").
    /// Capacity is the 8B/H100 one so cache accounting still behaves like a real pod.
    pub fn instant() -> Self {
        Self {
            name: "instant".to_owned(),
            prefill_overhead: Duration::ZERO,
            prefill_per_token: Duration::ZERO,
            decode_base: Duration::ZERO,
            decode_per_seq: Duration::ZERO,
            decode_per_context_token: Duration::ZERO,
            kv_bytes_per_token: 0,
            encode_per_image: Duration::ZERO,
            lora_load: Duration::ZERO,
            ..Self::llama_8b_h100()
        }
    }

    /// Time to pull `tokens` tokens' KV over the KV link (bytes × tokens ÷ bandwidth).
    pub fn kv_transfer_time(&self, tokens: usize) -> Duration {
        kv_transfer_time(self.kv_bytes_per_token, self.kv_link_bytes_per_s, tokens)
    }

    /// Looks a profile up by name (see [`PROFILE_NAMES`]).
    pub fn named(name: &str) -> Result<Self, SimError> {
        match name {
            "llama-8b-h100" => Ok(Self::llama_8b_h100()),
            "llama-70b-h100-tp4" => Ok(Self::llama_70b_h100_tp4()),
            "instant" => Ok(Self::instant()),
            other => Err(SimError::UnknownProfile {
                name: other.to_owned(),
                known: PROFILE_NAMES.join(", "),
            }),
        }
    }

    /// Checks the constants are usable; names the first bad field.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |field: &'static str, reason: &str| {
            Err(SimError::InvalidProfile {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.block_size == 0 {
            return bad("block_size", "must be at least 1");
        }
        if self.num_gpu_blocks == 0 {
            return bad("num_gpu_blocks", "must be at least 1");
        }
        if self.num_gpu_blocks >= u32::MAX as usize {
            return bad("num_gpu_blocks", "must be below 2^32 - 1");
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs", "must be at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens", "must be at least 1");
        }
        if self.max_model_len < 2 {
            return bad("max_model_len", "must be at least 2");
        }
        if self.kv_link_bytes_per_s == 0 {
            return bad("kv_link_bytes_per_s", "must be at least 1");
        }
        if self.encoder_cache_items == 0 {
            return bad("encoder_cache_items", "must be at least 1");
        }
        if self.max_loras == 0 {
            return bad("max_loras", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return bad("jitter", "must be in [0, 1)");
        }
        if self.default_max_tokens == 0 {
            return bad("default_max_tokens", "must be at least 1");
        }
        Ok(())
    }
}

impl Default for EngineProfile {
    fn default() -> Self {
        Self::llama_8b_h100()
    }
}

/// Time to move `tokens` tokens' KV of `bytes_per_token` each over a `bytes_per_s` link
/// (here, in the leaf, so the engine and the profile share it without a module circle).
pub fn kv_transfer_time(bytes_per_token: u64, bytes_per_s: u64, tokens: usize) -> Duration {
    let bytes = bytes_per_token as f64 * tokens as f64;
    Duration::from_secs_f64(bytes / bytes_per_s.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_profile_resolves_and_validates() {
        for name in PROFILE_NAMES {
            let p = EngineProfile::named(name).unwrap();
            assert_eq!(p.name, *name);
            p.validate().unwrap();
        }
        assert!(matches!(
            EngineProfile::named("nope"),
            Err(SimError::UnknownProfile { .. })
        ));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let p = EngineProfile {
            block_size: 0,
            ..EngineProfile::instant()
        };
        match p.validate() {
            Err(SimError::InvalidProfile { field, .. }) => assert_eq!(field, "block_size"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn kv_transfer_time_is_bytes_over_bandwidth() {
        let p = EngineProfile::llama_8b_h100();
        // 5,000 tokens × 128 KiB = 655 MB over 50 GB/s = 13.1 ms.
        let t = p.kv_transfer_time(5000);
        assert_eq!(t.as_micros(), 13_107);
        assert_eq!(
            EngineProfile::instant().kv_transfer_time(5000),
            Duration::ZERO
        );
    }
}
