//! The model-rewrite table built from InferenceModelRewrite objects: model name → weighted
//! targets, looked up per request with the request's RNG.
//!
//! Precedence follows GIE: the oldest InferenceModelRewrite wins a model name claimed by
//! several; within one, the first rule that matches wins; a rule without `matches` is a
//! catch-all used when no exact rule matches. Weights split traffic as weight/sum; targets
//! without weights split evenly.

use std::collections::HashMap;

use infermesh_raft_store::policy::{Document, InferenceModelRewriteSpec};
use rand::Rng;

/// Weighted targets of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Targets {
    models: Vec<String>,
    /// Running sum of weights, one per model.
    cumulative: Vec<u64>,
}

impl Targets {
    fn new(rule: &infermesh_raft_store::policy::RewriteRule) -> Option<Targets> {
        let mut models = Vec::with_capacity(rule.targets.len());
        let mut cumulative = Vec::with_capacity(rule.targets.len());
        let mut sum = 0u64;
        for t in &rule.targets {
            // The store validated weights (1..=1e6, all or none); unset means equal shares.
            sum += t.weight.map_or(1, |w| w.max(0) as u64);
            models.push(t.model_rewrite.clone());
            cumulative.push(sum);
        }
        (sum > 0).then_some(Targets { models, cumulative })
    }

    fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> &str {
        let total = *self.cumulative.last().expect("non-empty");
        let x = rng.random_range(0..total);
        let i = self.cumulative.partition_point(|c| *c <= x);
        &self.models[i]
    }
}

/// Model name → rewrite targets, immutable once built (swapped whole on policy change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRewrites {
    exact: HashMap<String, Targets>,
    catch_all: Option<Targets>,
}

impl ModelRewrites {
    /// Builds the table from `(created_index, rewrite)` pairs in any order.
    pub fn from_policy<'a>(
        rewrites: impl IntoIterator<Item = (u64, &'a Document<InferenceModelRewriteSpec>)>,
    ) -> ModelRewrites {
        let mut all: Vec<_> = rewrites.into_iter().collect();
        all.sort_by(|a, b| {
            (a.0, &a.1.metadata.namespace, &a.1.metadata.name).cmp(&(
                b.0,
                &b.1.metadata.namespace,
                &b.1.metadata.name,
            ))
        });
        let mut table = ModelRewrites::default();
        for (_, doc) in all {
            for rule in &doc.spec.rules {
                let Some(targets) = Targets::new(rule) else {
                    continue;
                };
                if rule.matches.is_empty() {
                    table.catch_all.get_or_insert(targets);
                    continue;
                }
                for m in &rule.matches {
                    table
                        .exact
                        .entry(m.model.value.clone())
                        .or_insert_with(|| targets.clone());
                }
            }
        }
        table
    }

    /// Whether no rewrite is configured.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.catch_all.is_none()
    }

    /// The model a request for `model` is sent as, or `None` when no rule applies.
    pub fn target<R: Rng + ?Sized>(&self, model: &str, rng: &mut R) -> Option<&str> {
        self.exact
            .get(model)
            .or(self.catch_all.as_ref())
            .map(|t| t.pick(rng))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_raft_store::policy::{PolicyObject, accept_any_epp_config, parse_documents};
    use rand::SeedableRng;

    fn docs(yaml: &str) -> Vec<Document<InferenceModelRewriteSpec>> {
        parse_documents(yaml, &accept_any_epp_config())
            .unwrap()
            .into_iter()
            .map(|o| match o {
                PolicyObject::InferenceModelRewrite(d) => d,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    const HEAD: &str =
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n";

    #[test]
    fn weighted_split_follows_the_weights() {
        let d = docs(&format!(
            "{HEAD}metadata: {{name: canary}}\nspec:\n  poolRef: {{name: p}}\n  rules:\n  \
             - matches: [{{model: {{value: llama}}}}]\n    targets:\n    \
             - {{modelRewrite: llama-v1, weight: 90}}\n    - {{modelRewrite: llama-v2, weight: 10}}\n"
        ));
        let t = ModelRewrites::from_policy(d.iter().map(|d| (1, d)));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let n = 10_000;
        let v2 = (0..n)
            .filter(|_| t.target("llama", &mut rng) == Some("llama-v2"))
            .count();
        assert!(
            (800..1200).contains(&v2),
            "{v2} of {n} went to the 10% target"
        );
        assert_eq!(t.target("other", &mut rng), None);
    }

    #[test]
    fn the_oldest_rewrite_wins_and_catch_all_applies_last() {
        let new = docs(&format!(
            "{HEAD}metadata: {{name: a-new}}\nspec:\n  poolRef: {{name: p}}\n  rules:\n  \
             - matches: [{{model: {{value: m}}}}]\n    targets: [{{modelRewrite: from-new}}]\n  \
             - targets: [{{modelRewrite: fallback}}]\n"
        ));
        let old = docs(&format!(
            "{HEAD}metadata: {{name: z-old}}\nspec:\n  poolRef: {{name: p}}\n  rules:\n  \
             - matches: [{{model: {{value: m}}}}]\n    targets: [{{modelRewrite: from-old}}]\n"
        ));
        let t = ModelRewrites::from_policy([(5, &new[0]), (2, &old[0])]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert_eq!(t.target("m", &mut rng), Some("from-old"));
        assert_eq!(t.target("anything", &mut rng), Some("fallback"));
    }
}
