//! Long-context agentic mix: agents whose ~100k-token context (code base, documents)
//! is re-sent every turn with one more tool step appended, mixed with short unique
//! requests. Routing an agent's turns to one pod saves re-prefilling its whole context.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::text::stream_id;
use super::{PlannedRequest, Role, Segment, fraction, kind, positive};
use crate::error::BenchError;

/// Shape of a long-context agentic workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LongContextSpec {
    /// Agents working at once.
    pub agents: usize,
    /// Turns before an agent's session ends and a new one (new context) starts.
    pub turns: usize,
    /// The context every turn of a session re-sends, tokens.
    pub context_tokens: usize,
    /// Tokens each turn appends (tool output, next instruction).
    pub step_tokens: usize,
    /// Output tokens asked for by agent turns.
    pub output_tokens: usize,
    /// Share of requests that are short unique prompts instead of agent turns.
    pub short_fraction: f64,
    /// Short prompt length, tokens.
    pub short_prompt_tokens: usize,
    /// Output tokens asked for by short requests.
    pub short_output_tokens: usize,
}

impl Default for LongContextSpec {
    fn default() -> Self {
        LongContextSpec {
            agents: 4,
            turns: 8,
            context_tokens: 100_000,
            step_tokens: 1000,
            output_tokens: 128,
            short_fraction: 0.5,
            short_prompt_tokens: 512,
            short_output_tokens: 128,
        }
    }
}

impl LongContextSpec {
    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        positive("agents", self.agents)?;
        positive("turns", self.turns)?;
        positive("context_tokens", self.context_tokens)?;
        positive("step_tokens", self.step_tokens)?;
        positive("output_tokens", self.output_tokens)?;
        positive("short_prompt_tokens", self.short_prompt_tokens)?;
        positive("short_output_tokens", self.short_output_tokens)?;
        fraction("short_fraction", self.short_fraction)?;
        let longest = self.context_tokens + self.turns * self.step_tokens;
        if longest > u32::MAX as usize {
            return Err(BenchError::InvalidSpec {
                field: "context_tokens",
                problem: format!("plus turns x step_tokens is too large ({longest})"),
            });
        }
        Ok(())
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "long-context {} agents x {} turns ctx={} step={} short={:.0}%x{}",
            self.agents,
            self.turns,
            self.context_tokens,
            self.step_tokens,
            self.short_fraction * 100.0,
            self.short_prompt_tokens
        )
    }

    /// Agent turns go round-robin over agents; each request is short with probability
    /// `short_fraction`.
    pub(crate) fn plan(&self, seed: u64, n: usize) -> Vec<PlannedRequest> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(kind::PLAN);
        let mut turn_of = vec![0u64; self.agents];
        let mut next_agent = 0usize;
        (0..n as u64)
            .map(|i| {
                if rng.random_bool(self.short_fraction) {
                    return PlannedRequest {
                        segments: vec![Segment {
                            role: Role::User,
                            stream: stream_id(kind::SHORT, i, 0),
                            tokens: self.short_prompt_tokens as u32,
                        }],
                        max_tokens: self.short_output_tokens as u32,
                        key: u64::MAX,
                        images: Vec::new(),
                    };
                }
                let a = next_agent;
                next_agent = (next_agent + 1) % self.agents;
                let turn = turn_of[a];
                turn_of[a] += 1;
                let session = turn / self.turns as u64;
                let session_id = session * self.agents as u64 + a as u64;
                let step = turn % self.turns as u64;
                let mut segments = vec![Segment {
                    role: Role::System,
                    stream: stream_id(kind::CONTEXT, session_id, 0),
                    tokens: self.context_tokens as u32,
                }];
                segments.extend((0..=step).map(|k| Segment {
                    role: Role::User,
                    stream: stream_id(kind::STEP, session_id, k),
                    tokens: self.step_tokens as u32,
                }));
                PlannedRequest {
                    segments,
                    max_tokens: self.output_tokens as u32,
                    key: session_id,
                    images: Vec::new(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_turns_extend_the_context_and_sessions_restart() {
        let s = LongContextSpec {
            agents: 2,
            turns: 2,
            short_fraction: 0.0,
            ..Default::default()
        };
        let plan = s.plan(5, 6);
        let lens: Vec<_> = plan.iter().map(|r| r.prompt_tokens()).collect();
        assert_eq!(lens, [101_000, 101_000, 102_000, 102_000, 101_000, 101_000]);
        assert_eq!(plan[0].key, plan[2].key);
        assert_ne!(plan[0].key, plan[4].key);
    }
}
