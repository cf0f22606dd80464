//! The deterministic tokenizer: about 4 bytes per token, prefix-stable, no vocabulary files.
//!
//! Text is cut into fixed 4-byte pieces from its start, so two prompts that share a byte
//! prefix share a token prefix (what prefix caching needs), and token counts match the
//! "4 characters per token" estimate routers use. Ids are a hash of the piece folded into a
//! Llama-3-sized vocabulary.
//!
//! A pod can instead tokenize with a HuggingFace `tokenizer.json` ([`Tokenizer::Json`]), as
//! a router with the same file does; [`generate_tokenizer_json`] makes one without any
//! download.

mod generate;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

use crate::error::{SimError, TokenizeError, TokenizerError};
pub use generate::{GENERATED_VOCAB_SIZE, SPECIAL_TOKENS, generate_tokenizer_json};

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

/// A pod's tokenizer: the built-in one or a HuggingFace `tokenizer.json`.
#[derive(Clone, Default)]
pub enum Tokenizer {
    /// The deterministic built-in tokenizer ([`tokenize`]).
    #[default]
    Builtin,
    /// A loaded `tokenizer.json`.
    Json(Arc<JsonTokenizer>),
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Builtin => f.write_str("Builtin"),
            Self::Json(j) => f
                .debug_struct("Json")
                .field("vocab_size", &j.inner.get_vocab_size(true))
                .finish(),
        }
    }
}

/// A `tokenizer.json` ready to encode, with the ids of the sim's generated tokens.
pub struct JsonTokenizer {
    inner: tokenizers::Tokenizer,
    /// Id of generated token i is `output_ids[i % len]`, one per filler word.
    output_ids: Arc<[u32]>,
}

impl JsonTokenizer {
    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl Tokenizer {
    /// Parses a `tokenizer.json` document.
    pub fn from_json_str(json: &str) -> Result<Self, TokenizerError> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(TokenizerError::Parse)?;
        // Generated token i has the id of the first token of `filler_text(i)`'s encoding:
        // a filler word may encode to several ids, but each output position is one token.
        let mut output_ids = Vec::with_capacity(FILLER.len());
        for &word in FILLER {
            let enc = inner
                .encode(word, false)
                .map_err(|error| TokenizerError::Filler { word, error })?;
            let Some(&first) = enc.get_ids().first() else {
                return Err(TokenizerError::EmptyFiller { word });
            };
            output_ids.push(first);
        }
        Ok(Self::Json(Arc::new(JsonTokenizer {
            inner,
            output_ids: output_ids.into(),
        })))
    }

    /// Loads a `tokenizer.json` file; the error names the file.
    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        let err = |reason| SimError::Tokenizer {
            path: path.to_owned(),
            reason,
        };
        let json = std::fs::read_to_string(path).map_err(|e| err(TokenizerError::Read(e)))?;
        Self::from_json_str(&json).map_err(err)
    }

    /// Token ids of `text`, without added special tokens (the text already holds the
    /// template markers): `encode(text, false)` for a `tokenizer.json`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        match self {
            Self::Builtin => Ok(tokenize(text)),
            Self::Json(j) => j
                .inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(TokenizeError),
        }
    }

    /// Number of tokens [`Tokenizer::tokenize`] returns.
    pub fn count_tokens(&self, text: &str) -> Result<usize, TokenizeError> {
        match self {
            Self::Builtin => Ok(count_tokens(text)),
            Self::Json(_) => self.tokenize(text).map(|t| t.len()),
        }
    }

    /// Id of the `index`-th generated token: [`filler_id`] for the built-in tokenizer, the
    /// first id of `filler_text(index)`'s encoding for a `tokenizer.json`.
    pub fn output_id(&self, index: usize) -> u32 {
        match self {
            Self::Builtin => filler_id(index),
            Self::Json(j) => j.output_ids[index % j.output_ids.len()],
        }
    }

    /// The ids of generated tokens an engine cycles through (`None`: the built-in ones).
    pub fn output_ids(&self) -> Option<Arc<[u32]>> {
        match self {
            Self::Builtin => None,
            Self::Json(j) => Some(j.output_ids.clone()),
        }
    }
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

    /// The generated tokenizer, trained once for the tests of this module.
    fn generated() -> &'static str {
        static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        JSON.get_or_init(generate_tokenizer_json)
    }

    #[test]
    fn the_generated_tokenizer_is_the_same_bytes_every_time() {
        let a = generate_tokenizer_json();
        assert_eq!(a, generate_tokenizer_json());
        // Pinned across runs and machines: a change here means every router holding the
        // old file would tokenize differently from the sim.
        assert_eq!(xxh64(a.as_bytes(), 0), PINNED_JSON_HASH, "{}", a.len());
        let t: tokenizers::Tokenizer = a.parse().unwrap();
        assert_eq!(t.get_vocab_size(true), GENERATED_VOCAB_SIZE);
        for (id, marker) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(t.token_to_id(marker), Some(id as u32), "{marker}");
        }
        assert!(t.get_normalizer().is_none());
        // Words of the corpus became single tokens, the filler words too except " kv ",
        // whose trailing space the ByteLevel split makes a token of its own.
        assert_eq!(t.encode(" assistant", false).unwrap().get_ids().len(), 1);
        for w in FILLER {
            let n = t.encode(*w, false).unwrap().get_ids().len();
            assert_eq!(n, if *w == " kv " { 2 } else { 1 }, "{w:?}");
        }
    }

    /// xxh64 of [`generate_tokenizer_json`]'s output.
    const PINNED_JSON_HASH: u64 = 13_545_490_259_126_450_614;

    #[test]
    fn the_generated_tokenizer_round_trips_any_text_without_unknown_tokens() {
        let t: tokenizers::Tokenizer = generated().parse().unwrap();
        let chat = chat_prompt([("system", "Be brief."), ("user", "Zwölf Boxkämpfer?")]);
        for text in [
            "The quick brown fox jumps over the lazy dog.",
            "  leading and trailing spaces \t\n\n",
            "numbers 3.14159 and 2026-12-06, punctuation!?;:",
            "unicode: 東京 ½ ñ Ω 🚀🦀 \u{0}\u{7f}",
            "xqzvjk wwwwww uncommonwordsrunningtogether",
            chat.as_str(),
            filler_range(0, 40).as_str(),
        ] {
            let ids = t.encode(text, false).unwrap().get_ids().to_vec();
            assert!(!ids.is_empty());
            assert!(ids.iter().all(|&i| (i as usize) < GENERATED_VOCAB_SIZE));
            assert_eq!(t.decode(&ids, false).unwrap(), text);
            let ours = Tokenizer::from_json_str(generated()).unwrap();
            assert_eq!(ours.tokenize(text).unwrap(), ids);
            assert_eq!(ours.count_tokens(text).unwrap(), ids.len());
        }
        // The template markers are single special tokens.
        let ids = t.encode(chat.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ids[0], 0, "<|begin_of_text|>");
        assert_eq!(ids.iter().filter(|&&i| i == 3).count(), 2, "two <|eot_id|>");
    }

    #[test]
    fn generated_tokens_take_the_first_id_of_their_filler_word() {
        let t = Tokenizer::from_json_str(generated()).unwrap();
        let inner: tokenizers::Tokenizer = generated().parse().unwrap();
        let ids = t.output_ids().unwrap();
        assert_eq!(ids.len(), FILLER.len());
        for i in 0..3 * FILLER.len() {
            let enc = inner.encode(filler_text(i), false).unwrap();
            assert_eq!(t.output_id(i), enc.get_ids()[0], "{i}");
            assert_eq!(ids[i % ids.len()], t.output_id(i));
        }
        // The built-in tokenizer keeps its own ids.
        assert_eq!(Tokenizer::Builtin.output_ids(), None);
        assert_eq!(Tokenizer::Builtin.output_id(5), filler_id(5));
        assert_eq!(
            Tokenizer::Builtin.tokenize("abcdefgh").unwrap(),
            tokenize("abcdefgh")
        );
        assert_eq!(Tokenizer::Builtin.count_tokens("abcdefghi").unwrap(), 3);
    }

    #[test]
    fn bad_tokenizer_files_are_refused_naming_the_file() {
        assert!(matches!(
            Tokenizer::from_json_str("{\"model\": 1}"),
            Err(TokenizerError::Parse(_))
        ));
        let dir = std::env::temp_dir().join(format!("infermesh-sim-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.json");
        let e = Tokenizer::from_file(&missing).unwrap_err();
        assert!(
            matches!(&e, SimError::Tokenizer { path, reason: TokenizerError::Read(_) } if *path == missing)
        );
        assert!(e.to_string().contains("missing.json"), "{e}");
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "not json").unwrap();
        let e = Tokenizer::from_file(&bad).unwrap_err();
        assert!(e.to_string().contains("bad.json"), "{e}");
        assert!(
            matches!(
                &e,
                SimError::Tokenizer {
                    reason: TokenizerError::Parse(_),
                    ..
                }
            ),
            "{e}"
        );
        let good = dir.join("good.json");
        std::fs::write(&good, generated()).unwrap();
        assert!(matches!(
            Tokenizer::from_file(&good),
            Ok(Tokenizer::Json(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chat_prompt_of_a_longer_conversation_extends_the_shorter() {
        let short = chat_prompt([("user", "hi")]);
        let long = chat_prompt([("user", "hi"), ("assistant", "yo"), ("user", "more")]);
        let stem = short.trim_end_matches("<|start_header_id|>assistant<|end_header_id|>\n\n");
        assert!(long.starts_with(stem));
    }
}
