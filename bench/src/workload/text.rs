//! Deterministic prompt text: every token is exactly 4 bytes (three letters and a space).
//!
//! The sim's tokenizer counts about 4 bytes per token, so a segment of `n` tokens here is
//! `4n` bytes and block boundaries (16 tokens = 64 bytes) land where the workload put
//! them. Text depends only on `(seed, stream)`, so it can be rebuilt at send time instead
//! of being held in memory for the whole run.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bytes per generated token.
pub const BYTES_PER_TOKEN: usize = 4;

/// Appends `tokens` deterministic words for `(seed, stream)` to `out`.
pub fn push_words(seed: u64, stream: u64, tokens: usize, out: &mut String) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    out.reserve(tokens * BYTES_PER_TOKEN);
    for _ in 0..tokens {
        let w: u32 = rng.random_range(0..26 * 26 * 26);
        out.push(char::from(b'a' + (w % 26) as u8));
        out.push(char::from(b'a' + (w / 26 % 26) as u8));
        out.push(char::from(b'a' + (w / 676) as u8));
        out.push(' ');
    }
}

/// The stream id of one segment kind and its two indices (group, request, user, round...).
pub fn stream_id(kind: u8, a: u64, b: u64) -> u64 {
    let mut bytes = [0u8; 17];
    bytes[0] = kind;
    bytes[1..9].copy_from_slice(&a.to_le_bytes());
    bytes[9..17].copy_from_slice(&b.to_le_bytes());
    xxhash_rust::xxh64::xxh64(&bytes, 0x1be5_c0de)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_stream_give_the_same_words() {
        let (mut a, mut b, mut c) = (String::new(), String::new(), String::new());
        push_words(7, 3, 50, &mut a);
        push_words(7, 3, 50, &mut b);
        push_words(8, 3, 50, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 50 * BYTES_PER_TOKEN);
        assert!(a.split(' ').filter(|w| !w.is_empty()).all(|w| w.len() == 3));
    }

    #[test]
    fn stream_ids_differ_by_kind_and_index() {
        assert_ne!(stream_id(1, 0, 0), stream_id(2, 0, 0));
        assert_ne!(stream_id(1, 1, 0), stream_id(1, 0, 1));
    }
}
