//! Built-in pickers. All randomness comes from the caller's RNG.

use std::cmp::Ordering;

use rand::seq::index::sample;
use rand::{Rng, RngCore};

use super::Picker;

fn desc(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a).unwrap_or(Ordering::Equal)
}

/// `max-score-picker`: highest scores first, ties broken at random (llm-d shuffles, then
/// stable-sorts; drawing a random tie key per candidate gives the same distribution).
#[derive(Debug, Clone, Copy)]
pub struct MaxScorePicker {
    max: usize,
}

impl MaxScorePicker {
    /// Returns up to `max_num_of_endpoints` targets.
    pub fn new(max_num_of_endpoints: usize) -> Self {
        MaxScorePicker {
            max: max_num_of_endpoints.max(1),
        }
    }
}

impl Picker for MaxScorePicker {
    fn pick(
        &self,
        candidates: &[usize],
        scores: &[f64],
        rng: &mut dyn RngCore,
        out: &mut Vec<usize>,
    ) {
        if candidates.is_empty() {
            return;
        }
        if self.max == 1 {
            // One pass; reservoir-sample uniformly among the tied best.
            let mut best = 0usize;
            let mut ties = 1u32;
            for k in 1..candidates.len() {
                match desc(scores[k], scores[best]) {
                    Ordering::Less => {
                        best = k;
                        ties = 1;
                    }
                    Ordering::Equal => {
                        ties += 1;
                        if rng.random_range(0..ties) == 0 {
                            best = k;
                        }
                    }
                    Ordering::Greater => {}
                }
            }
            out.push(candidates[best]);
            return;
        }
        let mut keyed: Vec<(f64, u64, usize)> = candidates
            .iter()
            .zip(scores)
            .map(|(&c, &s)| (s, rng.next_u64(), c))
            .collect();
        let cmp = |a: &(f64, u64, usize), b: &(f64, u64, usize)| desc(a.0, b.0).then(a.1.cmp(&b.1));
        let k = self.max.min(keyed.len());
        if k < keyed.len() {
            keyed.select_nth_unstable_by(k - 1, cmp);
            keyed.truncate(k);
        }
        keyed.sort_unstable_by(cmp);
        out.extend(keyed.iter().map(|x| x.2));
    }
}

/// `random-picker`: uniformly random, ignores scores.
#[derive(Debug, Clone, Copy)]
pub struct RandomPicker {
    max: usize,
}

impl RandomPicker {
    /// Returns up to `max_num_of_endpoints` distinct targets.
    pub fn new(max_num_of_endpoints: usize) -> Self {
        RandomPicker {
            max: max_num_of_endpoints.max(1),
        }
    }
}

impl Picker for RandomPicker {
    fn pick(&self, candidates: &[usize], _: &[f64], rng: &mut dyn RngCore, out: &mut Vec<usize>) {
        let k = self.max.min(candidates.len());
        if k == 0 {
            return;
        }
        let mut r = rng;
        for i in sample(&mut r, candidates.len(), k) {
            out.push(candidates[i]);
        }
    }
}

/// `weighted-random-picker`: A-Res reservoir sampling, key = U^(1/score); falls back to
/// random when no score is positive.
#[derive(Debug, Clone, Copy)]
pub struct WeightedRandomPicker {
    max: usize,
}

impl WeightedRandomPicker {
    /// Returns up to `max_num_of_endpoints` distinct targets.
    pub fn new(max_num_of_endpoints: usize) -> Self {
        WeightedRandomPicker {
            max: max_num_of_endpoints.max(1),
        }
    }
}

impl Picker for WeightedRandomPicker {
    fn pick(
        &self,
        candidates: &[usize],
        scores: &[f64],
        rng: &mut dyn RngCore,
        out: &mut Vec<usize>,
    ) {
        if !scores.iter().any(|&s| s > 0.0) {
            RandomPicker::new(self.max).pick(candidates, scores, rng, out);
            return;
        }
        let mut keyed: Vec<(f64, usize)> = candidates
            .iter()
            .zip(scores)
            .map(|(&c, &s)| {
                if s > 0.0 {
                    let mut u: f64 = rng.random();
                    if u == 0.0 {
                        u = 1e-10;
                    }
                    (u.powf(1.0 / s), c)
                } else {
                    (0.0, c)
                }
            })
            .collect();
        keyed.sort_by(|a, b| desc(a.0, b.0));
        out.extend(keyed.iter().take(self.max).map(|x| x.1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn max_score_returns_best_and_breaks_ties_randomly() {
        let p = MaxScorePicker::new(1);
        let cands = [10, 11, 12, 13];
        let scores = [0.1, 0.9, 0.9, 0.2];
        let mut seen = [0u32; 2];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..400 {
            let mut out = vec![];
            p.pick(&cands, &scores, &mut rng, &mut out);
            assert_eq!(out.len(), 1);
            assert!(out[0] == 11 || out[0] == 12);
            seen[out[0] - 11] += 1;
        }
        assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
    }

    #[test]
    fn max_score_fallbacks_are_sorted() {
        let p = MaxScorePicker::new(3);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut out = vec![];
        p.pick(
            &[0, 1, 2, 3, 4],
            &[0.5, 0.1, 0.9, 0.7, 0.2],
            &mut rng,
            &mut out,
        );
        assert_eq!(out, vec![2, 3, 0]);
    }

    #[test]
    fn weighted_random_prefers_heavier() {
        let p = WeightedRandomPicker::new(1);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut heavy = 0;
        for _ in 0..1000 {
            let mut out = vec![];
            p.pick(&[0, 1], &[0.9, 0.1], &mut rng, &mut out);
            if out[0] == 0 {
                heavy += 1;
            }
        }
        // P(pick 0) = 0.9 for two items under A-Res.
        assert!((850..=950).contains(&heavy), "{heavy}");
        let mut out = vec![];
        p.pick(&[4, 5], &[0.0, 0.0], &mut rng, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn random_picker_returns_distinct_candidates() {
        let p = RandomPicker::new(3);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut out = vec![];
        p.pick(&[7, 8, 9, 10], &[0.0; 4], &mut rng, &mut out);
        out.sort_unstable();
        out.dedup();
        assert_eq!(out.len(), 3);
    }
}
