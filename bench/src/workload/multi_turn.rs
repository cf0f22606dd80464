//! Multi-turn chat (after production-stack's `multi-round-qa`): each user's request in
//! round r replays the shared system prompt, the user's own context and all earlier
//! questions and answers. Answers are generated from the seed, not taken from the server,
//! so the workload does not depend on what the system under test returns.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::text::stream_id;
use super::{PlannedRequest, Role, Segment, kind, positive};
use crate::error::BenchError;

/// Shape of a multi-turn chat workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiTurnSpec {
    /// Concurrent conversations.
    pub users: usize,
    /// Rounds per conversation.
    pub rounds: usize,
    /// System prompt shared by every user, tokens.
    pub shared_system_prompt_tokens: usize,
    /// Per-user context sent from the first round on, tokens.
    pub user_history_tokens: usize,
    /// Each question, tokens.
    pub question_tokens: usize,
    /// Each replayed answer in the history, tokens.
    pub answer_tokens: usize,
    /// Output tokens asked for.
    pub output_tokens: usize,
}

impl Default for MultiTurnSpec {
    fn default() -> Self {
        MultiTurnSpec {
            users: 16,
            rounds: 8,
            shared_system_prompt_tokens: 1000,
            user_history_tokens: 2000,
            question_tokens: 100,
            answer_tokens: 100,
            output_tokens: 100,
        }
    }
}

impl MultiTurnSpec {
    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        positive("users", self.users)?;
        positive("rounds", self.rounds)?;
        positive("question_tokens", self.question_tokens)?;
        positive("answer_tokens", self.answer_tokens)?;
        positive("output_tokens", self.output_tokens)
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "multi-turn {}x{} sys={} hist={} q={} a={} out={}",
            self.users,
            self.rounds,
            self.shared_system_prompt_tokens,
            self.user_history_tokens,
            self.question_tokens,
            self.answer_tokens,
            self.output_tokens
        )
    }

    /// Round-major order (every user's round r before anyone's round r+1), users shuffled
    /// within a round; after the last round the conversations restart with new users.
    pub(crate) fn plan(&self, seed: u64, n: usize) -> Vec<PlannedRequest> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(kind::PLAN);
        let mut out = Vec::with_capacity(n);
        let mut generation = 0u64;
        'outer: loop {
            for round in 0..self.rounds as u64 {
                let mut users: Vec<u64> = (0..self.users as u64)
                    .map(|u| u + generation * self.users as u64)
                    .collect();
                users.shuffle(&mut rng);
                for user in users {
                    if out.len() == n {
                        break 'outer;
                    }
                    out.push(self.request(user, round));
                }
            }
            generation += 1;
        }
        out
    }

    fn request(&self, user: u64, round: u64) -> PlannedRequest {
        let mut segments = Vec::with_capacity(3 + 2 * round as usize);
        if self.shared_system_prompt_tokens > 0 {
            segments.push(Segment {
                role: Role::System,
                stream: stream_id(kind::SYSTEM, u64::MAX, 0),
                tokens: self.shared_system_prompt_tokens as u32,
            });
        }
        if self.user_history_tokens > 0 {
            segments.push(Segment {
                role: Role::System,
                stream: stream_id(kind::USER_HISTORY, user, 0),
                tokens: self.user_history_tokens as u32,
            });
        }
        for r in 0..=round {
            segments.push(Segment {
                role: Role::User,
                stream: stream_id(kind::QUESTION, user, r),
                tokens: self.question_tokens as u32,
            });
            if r < round {
                segments.push(Segment {
                    role: Role::Assistant,
                    stream: stream_id(kind::ANSWER, user, r),
                    tokens: self.answer_tokens as u32,
                });
            }
        }
        PlannedRequest {
            segments,
            max_tokens: self.output_tokens as u32,
            key: user,
            images: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_grows_by_one_exchange_per_round() {
        let s = MultiTurnSpec {
            users: 2,
            rounds: 3,
            ..Default::default()
        };
        let plan = s.plan(1, 8);
        let per_round = s.question_tokens + s.answer_tokens;
        let base = s.shared_system_prompt_tokens + s.user_history_tokens + s.question_tokens;
        for (i, r) in plan.iter().enumerate().take(6) {
            let round = i / 2;
            assert_eq!(r.prompt_tokens(), base + round * per_round);
        }
        // Round r+1 of a user extends round r's prompt exactly.
        let u = plan[0].key;
        let later = plan[2..4].iter().find(|r| r.key == u).unwrap();
        assert!(
            later
                .render_prompt(1)
                .starts_with(&plan[0].render_prompt(1))
        );
        // After the last round, new users start.
        assert!(plan[6].key >= 2 && plan[7].key >= 2);
    }
}
