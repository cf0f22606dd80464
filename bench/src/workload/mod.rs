//! Workloads: seeded plans of requests, rendered to prompt text at send time.

mod long_context;
mod multi_turn;
mod shared_prefix;
pub mod text;

pub use long_context::LongContextSpec;
pub use multi_turn::MultiTurnSpec;
pub use shared_prefix::{Popularity, SharedPrefixSpec};

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// The kind of prompts a run sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Groups of prompts sharing a long system prompt, each with a unique question.
    SharedPrefix(SharedPrefixSpec),
    /// Users chatting over several rounds with a growing history.
    MultiTurn(MultiTurnSpec),
    /// Agents re-sending ~100k-token contexts that grow by a step each turn, mixed with
    /// short unique requests.
    LongContext(LongContextSpec),
}

impl Workload {
    /// The first `n` requests of this workload for `seed`, in send order.
    pub fn plan(&self, seed: u64, n: usize) -> Vec<PlannedRequest> {
        match self {
            Workload::SharedPrefix(s) => s.plan(seed, n),
            Workload::MultiTurn(s) => s.plan(seed, n),
            Workload::LongContext(s) => s.plan(seed, n),
        }
    }

    /// Checks the spec, naming the first bad field.
    pub fn validate(&self) -> Result<(), BenchError> {
        match self {
            Workload::SharedPrefix(s) => s.validate(),
            Workload::MultiTurn(s) => s.validate(),
            Workload::LongContext(s) => s.validate(),
        }
    }

    /// A short human description for reports, e.g. `shared-prefix 64x16 sys=2048 q=128`.
    pub fn describe(&self) -> String {
        match self {
            Workload::SharedPrefix(s) => s.describe(),
            Workload::MultiTurn(s) => s.describe(),
            Workload::LongContext(s) => s.describe(),
        }
    }
}

/// Who speaks a segment (matters only for the chat API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A system message.
    System,
    /// A user message.
    User,
    /// An earlier assistant reply replayed as history.
    Assistant,
}

impl Role {
    /// The OpenAI role name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A run of deterministic words: its text is `push_words(seed, stream, tokens)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Who speaks it.
    pub role: Role,
    /// Which text: equal streams give equal text, so shared segments share a prefix.
    pub stream: u64,
    /// Length in tokens (4 bytes each).
    pub tokens: u32,
}

/// One request of a plan: its prompt as segments plus the output length asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedRequest {
    /// The prompt, in order.
    pub segments: Vec<Segment>,
    /// `max_tokens` (with `ignore_eos`, the exact output length).
    pub max_tokens: u32,
    /// The group, user or agent the request belongs to (for reports and debugging).
    pub key: u64,
    /// Image ids attached to the last message, in order (chat API only; each id gives one
    /// distinct `image_url`, see [`PlannedRequest::image_urls`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<u64>,
}

impl PlannedRequest {
    /// Prompt length in generated text tokens (images not counted: their size is the
    /// server's, e.g. the sim's `image_tokens`).
    pub fn prompt_tokens(&self) -> usize {
        self.segments.iter().map(|s| s.tokens as usize).sum()
    }

    /// The whole prompt as one string (completions API).
    pub fn render_prompt(&self, seed: u64) -> String {
        let mut out = String::with_capacity(self.prompt_tokens() * text::BYTES_PER_TOKEN);
        for s in &self.segments {
            text::push_words(seed, s.stream, s.tokens as usize, &mut out);
        }
        out
    }

    /// The `image_url` URLs of this request's images: `http://` URLs that name the seed
    /// and the image id, so equal ids give equal URLs (and equal content hashes on a server
    /// that hashes the URL, as infermesh-sim does) and nothing is ever fetched from them.
    pub fn image_urls(&self, seed: u64) -> Vec<String> {
        self.images
            .iter()
            .map(|id| format!("http://images.bench.invalid/{seed:x}/{id:016x}.png"))
            .collect()
    }

    /// The prompt as chat messages, consecutive segments of one role merged.
    pub fn render_messages(&self, seed: u64) -> Vec<(Role, String)> {
        let mut out: Vec<(Role, String)> = Vec::new();
        for s in &self.segments {
            match out.last_mut() {
                Some((role, buf)) if *role == s.role => {
                    text::push_words(seed, s.stream, s.tokens as usize, buf)
                }
                _ => {
                    let mut buf = String::new();
                    text::push_words(seed, s.stream, s.tokens as usize, &mut buf);
                    out.push((s.role, buf));
                }
            }
        }
        out
    }
}

pub(crate) fn positive(field: &'static str, v: usize) -> Result<(), BenchError> {
    if v == 0 {
        return Err(BenchError::InvalidSpec {
            field,
            problem: "must be at least 1".into(),
        });
    }
    if v > u32::MAX as usize {
        return Err(BenchError::InvalidSpec {
            field,
            problem: format!("is too large ({v})"),
        });
    }
    Ok(())
}

pub(crate) fn fraction(field: &'static str, v: f64) -> Result<(), BenchError> {
    if !(0.0..=1.0).contains(&v) {
        return Err(BenchError::InvalidSpec {
            field,
            problem: format!("must be in [0, 1], got {v}"),
        });
    }
    Ok(())
}

/// Segment kinds, mixed into stream ids so different kinds never share text.
pub(crate) mod kind {
    pub const SYSTEM: u8 = 1;
    pub const QUESTION: u8 = 2;
    pub const ANSWER: u8 = 3;
    pub const USER_HISTORY: u8 = 4;
    pub const CONTEXT: u8 = 5;
    pub const STEP: u8 = 6;
    pub const SHORT: u8 = 7;
    pub const IMAGE: u8 = 8;
    pub const PLAN: u64 = 0x504c_414e;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_deterministic_from_the_seed() {
        let workloads = [
            Workload::SharedPrefix(SharedPrefixSpec {
                popularity: Popularity::Zipf { alpha: 1.1 },
                ..SharedPrefixSpec::default()
            }),
            Workload::SharedPrefix(SharedPrefixSpec::default()),
            Workload::MultiTurn(MultiTurnSpec::default()),
            Workload::LongContext(LongContextSpec {
                context_tokens: 2000,
                ..LongContextSpec::default()
            }),
        ];
        for w in workloads {
            let a = w.plan(42, 300);
            let b = w.plan(42, 300);
            let c = w.plan(43, 300);
            assert_eq!(a, b, "{}", w.describe());
            assert_eq!(a.len(), 300);
            assert_eq!(a[5].render_prompt(42), b[5].render_prompt(42));
            let differs = a != c || a[0].render_prompt(42) != c[0].render_prompt(43);
            assert!(differs, "seed must matter for {}", w.describe());
        }
    }

    #[test]
    fn chat_rendering_merges_roles_and_keeps_the_text() {
        let w = Workload::MultiTurn(MultiTurnSpec {
            users: 1,
            rounds: 3,
            ..MultiTurnSpec::default()
        });
        let plan = w.plan(1, 3);
        let msgs = plan[2].render_messages(1);
        let roles: Vec<_> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant,
                Role::User
            ]
        );
        let joined: String = msgs.iter().map(|m| m.1.as_str()).collect();
        assert_eq!(joined, plan[2].render_prompt(1));
    }
}
