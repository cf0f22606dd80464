//! Prefix hashing (llm-d's approximate scheme), the sharded prefix index, and request keys
//! plus the KV-event applier for precise mode.

pub mod events;
pub mod hash;
pub mod index;
pub mod precise;

pub use events::{BlockEvent, EventCounters, IndexOp, PodEventState};
pub use hash::{AVERAGE_CHARACTERS_PER_TOKEN, hash_prompt, hash_prompt_into, seed_hash};
pub use index::{BlockHash, PrefixIndex, PrefixIndexConfig, PrefixMatches, anchor};
pub use precise::{
    block_key, lora_seed, model_seed, request_keys, request_keys_into, request_seed,
};
