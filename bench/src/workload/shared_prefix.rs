//! Shared-prefix workload (after sglang's `generated-shared-prefix` dataset): `groups`
//! system prompts, each followed by unique questions.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

use super::text::stream_id;
use super::{PlannedRequest, Role, Segment, kind, positive};
use crate::error::BenchError;

/// How often each group is picked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Popularity {
    /// Every group equally: shuffled passes of `groups × prompts_per_group` requests.
    Uniform,
    /// Group of rank k (1-based) drawn with probability ∝ 1/k^alpha.
    Zipf {
        /// The Zipf exponent (> 0).
        alpha: f64,
    },
}

/// Shape of a shared-prefix workload. Defaults are sglang's `--gsp-*` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedPrefixSpec {
    /// Distinct system prompts.
    pub groups: usize,
    /// Requests per group in one uniform pass.
    pub prompts_per_group: usize,
    /// Shared system prompt length, tokens.
    pub system_prompt_tokens: usize,
    /// Unique question length, tokens.
    pub question_tokens: usize,
    /// Output tokens asked for.
    pub output_tokens: usize,
    /// Group popularity.
    pub popularity: Popularity,
    /// Distinct images attached to each request's question (chat API only; 0 = text only).
    pub images_per_request: usize,
}

impl Default for SharedPrefixSpec {
    fn default() -> Self {
        SharedPrefixSpec {
            groups: 64,
            prompts_per_group: 16,
            system_prompt_tokens: 2048,
            question_tokens: 128,
            output_tokens: 256,
            popularity: Popularity::Uniform,
            images_per_request: 0,
        }
    }
}

impl SharedPrefixSpec {
    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        positive("groups", self.groups)?;
        positive("prompts_per_group", self.prompts_per_group)?;
        positive("system_prompt_tokens", self.system_prompt_tokens)?;
        positive("question_tokens", self.question_tokens)?;
        positive("output_tokens", self.output_tokens)?;
        if let Popularity::Zipf { alpha } = self.popularity
            && !(alpha.is_finite() && alpha > 0.0)
        {
            return Err(BenchError::InvalidSpec {
                field: "zipf_alpha",
                problem: format!("must be a positive number, got {alpha}"),
            });
        }
        Ok(())
    }

    pub(crate) fn describe(&self) -> String {
        let pop = match self.popularity {
            Popularity::Uniform => "uniform".to_string(),
            Popularity::Zipf { alpha } => format!("zipf({alpha})"),
        };
        let images = match self.images_per_request {
            0 => String::new(),
            n => format!(" images={n}"),
        };
        format!(
            "shared-prefix {}x{} sys={} q={} out={} {pop}{images}",
            self.groups,
            self.prompts_per_group,
            self.system_prompt_tokens,
            self.question_tokens,
            self.output_tokens
        )
    }

    pub(crate) fn plan(&self, seed: u64, n: usize) -> Vec<PlannedRequest> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(kind::PLAN);
        let groups: Vec<u64> = match self.popularity {
            Popularity::Uniform => {
                let mut out = Vec::with_capacity(n);
                while out.len() < n {
                    let mut pass: Vec<u64> = (0..self.groups as u64)
                        .flat_map(|g| std::iter::repeat_n(g, self.prompts_per_group))
                        .collect();
                    pass.shuffle(&mut rng);
                    out.extend(pass.into_iter().take(n - out.len()));
                }
                out
            }
            Popularity::Zipf { alpha } => match Zipf::new(self.groups as f64, alpha) {
                Ok(z) => (0..n).map(|_| z.sample(&mut rng) as u64 - 1).collect(),
                // validate() rejects the parameters Zipf::new refuses.
                Err(_) => vec![0; n],
            },
        };
        groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| PlannedRequest {
                segments: vec![
                    Segment {
                        role: Role::System,
                        stream: stream_id(kind::SYSTEM, g, 0),
                        tokens: self.system_prompt_tokens as u32,
                    },
                    Segment {
                        role: Role::User,
                        stream: stream_id(kind::QUESTION, i as u64, 0),
                        tokens: self.question_tokens as u32,
                    },
                ],
                max_tokens: self.output_tokens as u32,
                key: g,
                // Every request its own images: no encoder-cache hits across requests.
                images: (0..self.images_per_request as u64)
                    .map(|k| stream_id(kind::IMAGE, i as u64, k))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_pass_sends_every_group_equally() {
        let s = SharedPrefixSpec {
            groups: 5,
            prompts_per_group: 3,
            ..Default::default()
        };
        let plan = s.plan(9, 15);
        let mut counts = [0; 5];
        for r in &plan {
            counts[r.key as usize] += 1;
        }
        assert_eq!(counts, [3; 5]);
        assert!(plan.iter().all(|r| r.prompt_tokens() == 2048 + 128));
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let s = SharedPrefixSpec {
            groups: 50,
            popularity: Popularity::Zipf { alpha: 1.2 },
            ..Default::default()
        };
        let plan = s.plan(3, 2000);
        let first = plan.iter().filter(|r| r.key == 0).count();
        let last = plan.iter().filter(|r| r.key == 49).count();
        assert!(plan.iter().all(|r| r.key < 50));
        assert!(first > 5 * last.max(1), "rank 1: {first}, rank 50: {last}");
    }

    #[test]
    fn images_are_distinct_per_request_and_only_when_asked() {
        let s = SharedPrefixSpec {
            groups: 2,
            prompts_per_group: 2,
            images_per_request: 3,
            ..Default::default()
        };
        let plan = s.plan(5, 4);
        let urls: std::collections::HashSet<String> =
            plan.iter().flat_map(|r| r.image_urls(5)).collect();
        assert_eq!(urls.len(), 12, "{urls:?}");
        assert!(urls.iter().all(|u| u.starts_with("http://")));
        assert_eq!(plan[1].image_urls(5), s.plan(5, 4)[1].image_urls(5));
        let text_only = SharedPrefixSpec::default().plan(5, 4);
        assert!(text_only.iter().all(|r| r.images.is_empty()));
    }

    #[test]
    fn bad_alpha_is_named() {
        let s = SharedPrefixSpec {
            popularity: Popularity::Zipf { alpha: 0.0 },
            ..Default::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("zipf_alpha"), "{e}");
    }
}
