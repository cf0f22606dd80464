//! Built-in filters: label selectors, P/D role filters, prefix-cache affinity, utilization caps.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use rand::{Rng, RngCore};

use super::{CycleState, Filter};
use crate::config::params::{
    ByLabelParams, LabelSelectorParams, PrefixAffinityParams, SelectorOperator,
    UtilizationFilterParams, UtilizationMetric,
};
use crate::model::{Endpoint, ROLE_LABEL};

/// `label-selector-filter` (alias `by-label-selector`): Kubernetes label selector.
#[derive(Debug, Clone)]
pub struct LabelSelectorFilter {
    params: LabelSelectorParams,
}

impl LabelSelectorFilter {
    /// A filter for this selector.
    pub fn new(params: LabelSelectorParams) -> Self {
        LabelSelectorFilter { params }
    }

    /// Whether `labels` satisfy the selector (an empty selector matches everything).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.params
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.params.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    SelectorOperator::In => value.is_some_and(|v| e.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

impl Filter for LabelSelectorFilter {
    fn filter(&self, cycle: &CycleState<'_>, _: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        candidates.retain(|&i| self.matches(&cycle.endpoints[i].labels));
    }
}

/// `by-label` and the role filters: keep pods whose label value is valid.
#[derive(Debug, Clone)]
pub struct ByLabelFilter {
    label: String,
    valid_values: Vec<String>,
    allows_no_label: bool,
}

impl ByLabelFilter {
    /// From `by-label` parameters.
    pub fn new(p: ByLabelParams) -> Self {
        ByLabelFilter {
            label: p.label,
            valid_values: p.valid_values,
            allows_no_label: p.allows_no_label,
        }
    }

    fn role(allows_no_label: bool, values: &[&str]) -> Self {
        ByLabelFilter {
            label: ROLE_LABEL.into(),
            valid_values: values.iter().map(|s| (*s).to_owned()).collect(),
            allows_no_label,
        }
    }

    /// `decode-filter`: decode-capable roles; unlabelled pods are kept.
    pub fn decode() -> Self {
        Self::role(
            true,
            &["decode", "prefill-decode", "both", "encode-prefill-decode"],
        )
    }

    /// `prefill-filter`: prefill-capable roles; unlabelled pods are dropped.
    pub fn prefill() -> Self {
        Self::role(
            false,
            &[
                "prefill",
                "encode-prefill",
                "prefill-decode",
                "both",
                "encode-prefill-decode",
            ],
        )
    }

    /// `encode-filter`: encode-capable roles; unlabelled pods are dropped.
    pub fn encode() -> Self {
        Self::role(
            false,
            &["encode", "encode-prefill", "encode-prefill-decode"],
        )
    }

    /// Whether a pod with these labels passes.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match labels.get(&self.label) {
            None => self.allows_no_label,
            Some(v) => self.valid_values.iter().any(|x| x == v),
        }
    }
}

impl Filter for ByLabelFilter {
    fn filter(&self, cycle: &CycleState<'_>, _: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        candidates.retain(|&i| self.matches(&cycle.endpoints[i].labels));
    }
}

/// `prefix-cache-affinity-filter`: keep only endpoints whose prefix score reaches the
/// threshold, unless none does or the exploration draw skips the gate.
///
/// llm-d also breaks stickiness when the best sticky endpoint's *predicted* TTFT is worse
/// than the best other one by more than `maxTTFTPenaltyMs`; infermesh has no latency
/// predictor, and with no predictions llm-d's comparison never triggers either.
#[derive(Debug, Clone)]
pub struct PrefixAffinityFilter {
    params: PrefixAffinityParams,
}

impl PrefixAffinityFilter {
    /// A filter with these parameters.
    pub fn new(params: PrefixAffinityParams) -> Self {
        PrefixAffinityFilter { params }
    }
}

impl Filter for PrefixAffinityFilter {
    fn filter(&self, cycle: &CycleState<'_>, rng: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        if candidates.len() <= 1 || self.params.affinity_threshold <= 0.0 {
            return;
        }
        if rng.random::<f64>() < self.params.exploration_probability {
            return;
        }
        let Some(prefix) = &cycle.prefix else {
            return;
        };
        let threshold = self.params.affinity_threshold;
        if !candidates.iter().any(|&i| prefix.score(i) >= threshold) {
            return;
        }
        candidates.retain(|&i| prefix.score(i) >= threshold);
    }
}

/// Request header the GIE conformance suite steers requests with: `ip` or `ip:port`
/// entries, comma-separated.
pub const TEST_ENDPOINT_SELECTION_HEADER: &str = "test-epp-endpoint-selection";

/// `header-based-testing-filter` (test only, for the GIE conformance suite): keeps the
/// candidates the `test-epp-endpoint-selection` header lists. An `ip:port` entry keeps that
/// endpoint, a bare IP (brackets allowed) every endpoint on that IP, as GIE's reference
/// picker (lwepp) does; an entry that is no address keeps nothing, and without the header
/// nothing passes (llm-d). Only a profile that lists it is steered, so a client cannot
/// pick its endpoint unless the operator configured this filter.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderBasedTestingFilter;

impl Filter for HeaderBasedTestingFilter {
    fn filter(&self, cycle: &CycleState<'_>, _: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        let Some(value) = cycle
            .request
            .headers
            .get(TEST_ENDPOINT_SELECTION_HEADER)
            .filter(|v| !v.trim().is_empty())
        else {
            candidates.clear();
            return;
        };
        let mut exact: Vec<SocketAddr> = Vec::new();
        let mut hosts: Vec<IpAddr> = Vec::new();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(a) = item.parse::<SocketAddr>() {
                exact.push(a);
            } else if let Ok(ip) = item.trim_start_matches('[').trim_end_matches(']').parse() {
                hosts.push(ip);
            }
        }
        candidates.retain(|&i| {
            let a = cycle.endpoints[i].address;
            exact.contains(&a) || hosts.contains(&a.ip())
        });
    }
}

/// `utilization-filter` (llm-d v0.10): keeps endpoints whose every configured metric is at
/// most its `maxValue`; a metric an endpoint lacks (never scraped) counts as 0. When all
/// are dropped and `fallbackOnEmpty` is set, the candidates stay as they were.
#[derive(Debug, Clone)]
pub struct UtilizationFilter {
    params: UtilizationFilterParams,
}

impl UtilizationFilter {
    /// A filter with these (validated) parameters.
    pub fn new(params: UtilizationFilterParams) -> Self {
        UtilizationFilter { params }
    }

    /// The value of `metric` for `e`, as llm-d reads it.
    pub fn metric(e: &Endpoint, metric: UtilizationMetric) -> f64 {
        let m = e.metrics.as_ref();
        match metric {
            UtilizationMetric::ActiveRequests => f64::from(e.in_flight.requests),
            UtilizationMetric::RunningRequests => m.map_or(0.0, |m| f64::from(m.running)),
            UtilizationMetric::WaitingQueue => m.map_or(0.0, |m| f64::from(m.waiting_queue)),
            UtilizationMetric::KvCacheUtilization => m.map_or(0.0, |m| m.kv_cache_usage),
        }
    }

    /// Whether `e` satisfies every condition.
    pub fn passes(&self, e: &Endpoint) -> bool {
        self.params
            .conditions
            .iter()
            .all(|c| Self::metric(e, c.metric) <= c.max_value.unwrap_or(f64::INFINITY))
    }
}

impl Filter for UtilizationFilter {
    fn filter(&self, cycle: &CycleState<'_>, _: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        if self.params.fallback_on_empty
            && !candidates.iter().any(|&i| self.passes(&cycle.endpoints[i]))
        {
            return;
        }
        candidates.retain(|&i| self.passes(&cycle.endpoints[i]));
    }
}
