//! A byte-level BPE `tokenizer.json` the project trains itself, so nothing is downloaded.
//!
//! The corpus is generated here from a fixed seed (English words, the sim's filler words,
//! the chat template, made-up words, numbers, punctuation and hex strings) and trained
//! with the `tokenizers` crate's own [`BpeTrainer`](tokenizers::models::bpe::BpeTrainer):
//! ByteLevel pre-tokenizer and decoder, no normalizer, the chat template markers as
//! special tokens. The trainer breaks every tie by the pair's ids and the serializer
//! orders vocabulary, merges and added tokens by id, so the output is the same bytes on
//! every call and every run.

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::FILLER;

/// Vocabulary size of the generated tokenizer, special tokens included.
pub const GENERATED_VOCAB_SIZE: usize = 4096;

/// The chat template's markers (see [`super::chat_prompt`]) and the media placeholders of
/// the chat renderer; special tokens of the generated tokenizer, ids 0 to 5 in this order.
pub const SPECIAL_TOKENS: &[&str] = &[
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|image|>",
    "<|media|>",
];

/// Plain English words, the most frequent part of the corpus.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "I",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "hot",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "write",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "number",
    "sound",
    "no",
    "most",
    "people",
    "my",
    "over",
    "know",
    "water",
    "than",
    "call",
    "first",
    "who",
    "may",
    "down",
    "side",
    "been",
    "now",
    "find",
    "any",
    "new",
    "work",
    "part",
    "take",
    "get",
    "place",
    "made",
    "live",
    "where",
    "after",
    "back",
    "little",
    "only",
    "round",
    "man",
    "year",
    "came",
    "show",
    "every",
    "good",
    "me",
    "give",
    "our",
    "under",
    "name",
    "very",
    "through",
    "just",
    "form",
    "sentence",
    "great",
    "think",
    "say",
    "help",
    "low",
    "line",
    "differ",
    "turn",
    "cause",
    "much",
    "mean",
    "before",
    "move",
    "right",
    "boy",
    "old",
    "too",
    "same",
    "tell",
    "does",
    "set",
    "three",
    "want",
    "air",
    "well",
    "also",
    "play",
    "small",
    "end",
    "put",
    "home",
    "read",
    "hand",
    "port",
    "large",
    "spell",
    "add",
    "even",
    "land",
    "here",
    "must",
    "big",
    "high",
    "such",
    "follow",
    "act",
    "why",
    "ask",
    "men",
    "change",
    "went",
    "light",
    "kind",
    "off",
    "need",
    "house",
    "picture",
    "try",
    "us",
    "again",
    "animal",
    "point",
    "mother",
    "world",
    "near",
    "build",
    "self",
    "earth",
    "father",
    "head",
    "stand",
    "own",
    "page",
    "should",
    "country",
    "found",
    "answer",
    "school",
    "grow",
    "study",
    "still",
    "learn",
    "plant",
    "cover",
    "food",
    "sun",
    "four",
    "between",
    "state",
    "keep",
    "eye",
    "never",
    "last",
    "let",
    "thought",
    "city",
    "tree",
    "cross",
    "farm",
    "hard",
    "start",
    "might",
    "story",
    "saw",
    "far",
    "sea",
    "draw",
    "left",
    "late",
    "run",
    "while",
    "press",
    "close",
    "night",
    "real",
    "life",
    "few",
    "north",
    "open",
    "seem",
    "together",
    "next",
    "white",
    "children",
    "begin",
    "got",
    "walk",
    "example",
    "ease",
    "paper",
    "group",
    "always",
    "music",
    "those",
    "both",
    "mark",
    "often",
    "letter",
    "until",
    "mile",
    "river",
    "car",
    "feet",
    "care",
    "second",
    "book",
    "carry",
    "took",
    "science",
    "eat",
    "room",
    "friend",
    "began",
    "idea",
    "fish",
    "mountain",
    "stop",
    "once",
    "base",
    "hear",
    "horse",
    "cut",
    "sure",
    "watch",
    "color",
    "face",
    "wood",
    "main",
    "enough",
    "plain",
    "girl",
    "usual",
    "young",
    "ready",
    "above",
    "ever",
    "red",
    "list",
    "though",
    "feel",
    "talk",
    "bird",
    "soon",
    "body",
    "dog",
    "family",
    "direct",
    "pose",
    "leave",
    "song",
    "measure",
    "door",
    "product",
    "black",
    "short",
    "numeral",
    "class",
    "wind",
    "question",
    "happen",
    "complete",
    "ship",
    "area",
    "half",
    "rock",
    "order",
    "fire",
    "south",
    "problem",
    "piece",
    "told",
    "knew",
    "pass",
    "since",
    "top",
    "whole",
    "king",
    "space",
    "heard",
    "best",
    "hour",
    "better",
    "true",
    "during",
    "hundred",
    "five",
    "remember",
    "step",
    "early",
    "hold",
    "west",
    "ground",
    "interest",
    "reach",
    "fast",
    "verb",
    "sing",
    "listen",
    "six",
    "table",
    "travel",
    "less",
    "morning",
    "ten",
    "simple",
    "several",
    "vowel",
    "toward",
    "war",
    "lay",
    "against",
    "pattern",
    "slow",
    "center",
    "love",
    "person",
    "money",
    "serve",
    "appear",
    "road",
    "map",
    "rain",
    "rule",
    "govern",
    "pull",
    "cold",
    "notice",
    "voice",
    "unit",
    "power",
    "town",
    "fine",
    "certain",
    "fly",
    "fall",
    "lead",
    "cry",
    "dark",
    "machine",
    "note",
    "wait",
    "plan",
    "figure",
    "star",
    "box",
    "noun",
    "field",
    "rest",
    "correct",
    "able",
    "pound",
    "done",
    "beauty",
    "drive",
    "stood",
    "contain",
    "front",
    "teach",
    "week",
    "final",
    "gave",
    "green",
    "quick",
    "develop",
    "ocean",
    "warm",
    "free",
    "minute",
    "strong",
    "special",
    "mind",
    "behind",
    "clear",
    "tail",
    "produce",
    "fact",
    "street",
    "inch",
    "multiply",
    "nothing",
    "course",
    "stay",
    "wheel",
    "full",
    "force",
    "blue",
    "object",
    "decide",
    "surface",
    "deep",
    "moon",
    "island",
    "foot",
    "system",
    "busy",
    "test",
    "record",
    "boat",
    "common",
    "gold",
    "possible",
    "plane",
    "stead",
    "dry",
    "wonder",
    "laugh",
    "thousand",
    "ago",
    "ran",
    "check",
    "game",
    "shape",
    "equate",
    "miss",
    "brought",
    "heat",
    "snow",
    "tire",
    "bring",
    "yes",
    "distant",
    "fill",
    "east",
    "paint",
    "language",
    "among",
    "model",
    "server",
    "request",
    "token",
    "cache",
    "prefix",
    "router",
    "latency",
    "block",
    "prompt",
    "assistant",
    "user",
    "tool",
    "developer",
    "engine",
    "batch",
    "queue",
    "memory",
    "fleet",
    "node",
    "cluster",
    "metric",
    "event",
    "stream",
    "reply",
    "chat",
    "completion",
    "brown",
    "fox",
    "jumps",
    "lazy",
    "hello",
    "careful",
    "tell",
    "brief",
    "there",
    "hi",
];

/// Syllable parts of the made-up words (they give the trainer varied subword merges).
const ONSETS: &[&str] = &[
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
    "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str", "th", "tr", "",
];
const NUCLEI: &[&str] = &[
    "a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y",
];
const CODAS: &[&str] = &[
    "", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rt", "st", "ck", "ll", "x",
];

/// Punctuation that follows words in the corpus.
const PUNCT: &[&str] = &[
    ",", ".", "!", "?", ":", ";", "...", ")", "\"", "'s", "-", "%",
];

/// splitmix64: a fixed generator, so the corpus does not depend on any crate's RNG.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    /// An index skewed toward 0 (a rough Zipf law over a ranked list).
    fn skewed(&mut self, n: usize) -> usize {
        let a = self.below(n);
        let b = self.below(n);
        a.min(b).min(self.below(n))
    }
}

/// The training corpus, one line per item; the same on every call.
fn corpus() -> Vec<String> {
    let mut rng = Mix(0x1f_e5_ed_70_c3);
    let made_up: Vec<String> = (0..3000)
        .map(|_| {
            let syllables = 1 + rng.below(3);
            let mut w = String::new();
            for _ in 0..syllables {
                w.push_str(rng.pick(ONSETS));
                w.push_str(rng.pick(NUCLEI));
                w.push_str(rng.pick(CODAS));
            }
            w
        })
        .collect();
    let mut lines = Vec::new();
    // Prose: mostly common words, some made-up ones, numbers and punctuation.
    for _ in 0..6000 {
        let n = 6 + rng.below(14);
        let mut line = String::new();
        for i in 0..n {
            if i > 0 {
                line.push(' ');
            }
            let word = match rng.below(10) {
                0..=5 => WORDS[rng.skewed(WORDS.len())].to_owned(),
                6..=8 => made_up[rng.skewed(made_up.len())].clone(),
                _ => match rng.below(3) {
                    0 => rng.below(100).to_string(),
                    1 => (1900 + rng.below(130)).to_string(),
                    _ => format!("{}.{}", rng.below(1000), rng.below(100)),
                },
            };
            if i == 0 {
                let mut c = word.chars();
                if let Some(f) = c.next() {
                    line.extend(f.to_uppercase());
                    line.push_str(c.as_str());
                }
            } else {
                line.push_str(&word);
            }
            if rng.below(6) == 0 {
                line.push_str(rng.pick(PUNCT));
            }
        }
        line.push('.');
        lines.push(line);
    }
    // The sim's generated text: runs of its filler words.
    for start in 0..FILLER.len() {
        let run: String = (start..start + 64)
            .map(|i| FILLER[i % FILLER.len()])
            .collect();
        lines.push(run);
    }
    // Chat prompts as the sim renders them.
    for i in 0..400 {
        let user = lines[i].clone();
        let reply = lines[i + 400].clone();
        lines.push(super::chat_prompt([
            ("system", "You are a helpful assistant."),
            ("user", user.as_str()),
            ("assistant", reply.as_str()),
        ]));
    }
    // Hex strings, as image placeholders are.
    for _ in 0..200 {
        lines.push(format!("<|image|>{:016x}{:016x}", rng.next(), rng.next()));
    }
    lines
}

/// Trains the byte-level BPE tokenizer on the generated corpus and returns its
/// `tokenizer.json` (pretty-printed); byte-for-byte the same on every call and run.
pub fn generate_tokenizer_json() -> String {
    // Nothing here depends on input: every failure is a bug in this function.
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::new(false, true, true)));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(GENERATED_VOCAB_SIZE)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tok.train(&mut trainer, corpus().into_iter())
        .expect("training on an in-memory corpus cannot fail");
    tok.to_string(true)
        .expect("a trained tokenizer serializes to JSON")
}
