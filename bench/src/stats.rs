//! Latency summaries: percentiles by linear interpolation between closest ranks (the
//! same definition as numpy's default), so figures compare with Python harnesses.

use serde::{Deserialize, Serialize};

/// The `q`-th percentile (0..=100) of ascending `sorted` samples; `None` when empty.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Summary of one latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples summarised.
    pub count: usize,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises samples given in seconds (any order); all zero when empty.
    pub fn from_secs(mut samples: Vec<f64>) -> Self {
        samples.retain(|s| s.is_finite());
        if samples.is_empty() {
            return LatencySummary::default();
        }
        samples.sort_by(f64::total_cmp);
        let ms = |v: Option<f64>| v.unwrap_or(0.0) * 1000.0;
        LatencySummary {
            count: samples.len(),
            mean_ms: samples.iter().sum::<f64>() / samples.len() as f64 * 1000.0,
            p50_ms: ms(percentile(&samples, 50.0)),
            p90_ms: ms(percentile(&samples, 90.0)),
            p99_ms: ms(percentile(&samples, 99.0)),
            max_ms: ms(samples.last().copied()),
        }
    }
}

/// Coefficient of variation (population stddev / mean) of `values`; `None` when empty or
/// the mean is 0.
pub fn coefficient_of_variation(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if mean == 0.0 {
        return None;
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Some(var.sqrt() / mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_hand_computed_values() {
        let s = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        // rank = q/100 * 9: p50 -> 4.5 -> 5.5; p90 -> 8.1 -> 9.1; p99 -> 8.91 -> 9.91.
        assert_eq!(percentile(&s, 50.0), Some(5.5));
        assert!((percentile(&s, 90.0).unwrap() - 9.1).abs() < 1e-12);
        assert!((percentile(&s, 99.0).unwrap() - 9.91).abs() < 1e-12);
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&s, 100.0), Some(10.0));
        assert_eq!(percentile(&[42.0], 99.0), Some(42.0));
        assert_eq!(percentile(&[], 50.0), None);
        // Odd count: the median is the middle sample.
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
    }

    #[test]
    fn summary_sorts_converts_to_ms_and_drops_non_finite() {
        let s = LatencySummary::from_secs(vec![0.3, 0.1, f64::NAN, 0.2]);
        assert_eq!(s.count, 3);
        assert!((s.p50_ms - 200.0).abs() < 1e-9);
        assert!((s.mean_ms - 200.0).abs() < 1e-9);
        assert!((s.max_ms - 300.0).abs() < 1e-9);
        // p90 of [0.1, 0.2, 0.3]: rank 1.8 -> 0.2 + 0.8 * 0.1 = 0.28 s.
        assert!((s.p90_ms - 280.0).abs() < 1e-9);
        assert_eq!(LatencySummary::from_secs(vec![]).count, 0);
    }

    #[test]
    fn cv_of_even_and_uneven_spreads() {
        assert_eq!(coefficient_of_variation(&[5.0, 5.0, 5.0]), Some(0.0));
        // mean 2, population stddev 1 -> 0.5.
        assert_eq!(coefficient_of_variation(&[1.0, 3.0]), Some(0.5));
        assert_eq!(coefficient_of_variation(&[0.0, 0.0]), None);
        assert_eq!(coefficient_of_variation(&[]), None);
    }
}
