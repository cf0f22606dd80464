//! The deterministic tokenizer: about 4 bytes per token, prefix-stable, no vocabulary files.
//!
//! Text is cut into fixed 4-byte pieces from its start, so two prompts that share a byte
//! prefix share a token prefix (what prefix caching needs), and token counts match the
//! "4 characters per token" estimate routers use. Ids are a hash of the piece folded into a
//! Llama-3-sized vocabulary.

use xxhash_rust::xxh64::xxh64;

/// Size of the id space (Llama-3 vocabulary).
pub const VOCAB_SIZE: u32 = 128_256;
/// Bytes per token.
pub const BYTES_PER_TOKEN: usize = 4;

/// Tokenizes `text` into ids; the same text always gives the same ids.
pub fn tokenize(text: &str) -> Vec<u32> {
    text.as_bytes()
        .chunks(BYTES_PER_TOKEN)
        .map(piece_id)
        .collect()
}

/// Number of tokens [`tokenize`] would return, without building them.
pub fn count_tokens(text: &str) -> usize {
    text.len().div_ceil(BYTES_PER_TOKEN)
}

fn piece_id(piece: &[u8]) -> u32 {
    (xxh64(piece, 0) % u64::from(VOCAB_SIZE)) as u32
}

/// Filler words of the generated text; each is one token of [`tokenize`] (4 bytes).
const FILLER: &[&str] = &[
    " the", " sim", " kv ", " pod", " and", " one", " two", " yes", " for", " its", " new", " way",
    " all", " can", " see", " use",
];

/// Text of the `index`-th generated token (deterministic filler).
pub fn filler_text(index: usize) -> &'static str {
    FILLER[index % FILLER.len()]
}

/// Id of the `index`-th generated token, consistent with [`tokenize`] of its text.
pub fn filler_id(index: usize) -> u32 {
    piece_id(filler_text(index).as_bytes())
}

/// Concatenated text of generated tokens `from..to`.
pub fn filler_range(from: usize, to: usize) -> String {
    let mut s = String::with_capacity((to.saturating_sub(from)) * BYTES_PER_TOKEN);
    for i in from..to {
        s.push_str(filler_text(i));
    }
    s
}

/// Renders chat messages with a Llama-3 style template, ending with the assistant header.
///
/// The template puts every message after the previous ones verbatim, so a multi-turn
/// conversation's prompt extends the previous turn's prompt (prefix caching works across
/// turns as in vLLM).
pub fn chat_prompt<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = String::from("<|begin_of_text|>");
    for (role, content) in messages {
        s.push_str("<|start_header_id|>");
        s.push_str(role);
        s.push_str("<|end_header_id|>\n\n");
        s.push_str(content);
        s.push_str("<|eot_id|>");
    }
    s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_four_bytes_per_token_and_prefix_stable() {
        let a = tokenize("hello world, this is a prompt");
        assert_eq!(a.len(), count_tokens("hello world, this is a prompt"));
        assert_eq!(a.len(), 8); // 29 bytes
        let b = tokenize("hello world, this is a prompt with more");
        assert_eq!(&b[..7], &a[..7]);
        assert_eq!(tokenize(""), Vec::<u32>::new());
        assert!(a.iter().all(|&t| t < VOCAB_SIZE));
    }

    #[test]
    fn filler_words_are_single_tokens() {
        for i in 0..FILLER.len() {
            assert_eq!(tokenize(filler_text(i)), vec![filler_id(i)]);
        }
        assert_eq!(filler_range(0, 2), " the sim");
    }

    #[test]
    fn chat_prompt_of_a_longer_conversation_extends_the_shorter() {
        let short = chat_prompt([("user", "hi")]);
        let long = chat_prompt([("user", "hi"), ("assistant", "yo"), ("user", "more")]);
        let stem = short.trim_end_matches("<|start_header_id|>assistant<|end_header_id|>\n\n");
        assert!(long.starts_with(stem));
    }
}
