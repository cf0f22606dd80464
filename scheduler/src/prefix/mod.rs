//! Prefix hashing (llm-d's approximate scheme) and the sharded prefix index.

pub mod hash;
pub mod index;

pub use hash::{AVERAGE_CHARACTERS_PER_TOKEN, hash_prompt, hash_prompt_into, seed_hash};
pub use index::{BlockHash, PrefixIndex, PrefixIndexConfig, PrefixMatches, anchor};
