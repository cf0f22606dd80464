//! Topology affinity (llm-d v0.10): `topology-affinity-filter` and `topology-affinity-scorer`
//! compare each candidate's locality with the peer pick of an earlier disaggregated stage.
//!
//! llm-d's `topology-extractor` stamps endpoints with a hostname, rack, zone and region read
//! from pod labels; here the same labels are read from the candidate's labels when a cycle
//! runs (the extractor's parameters travel with the filter and scorer). llm-d falls back to
//! the pod's `spec.hostname` when the hostname label is absent; infermesh's pool records
//! carry no pod spec, so the hostname comes from the label only.

use std::collections::BTreeMap;

use rand::RngCore;

use super::{CycleState, Filter, Scorer};
use crate::config::params::{
    TopologyAffinityFilterParams, TopologyAffinityScorerParams, TopologyExtractorParams,
    TopologyLevel,
};

/// An endpoint's locality (llm-d's `Topology` attribute); empty fields are unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Topology<'a> {
    /// Host name.
    pub hostname: &'a str,
    /// Rack.
    pub rack: &'a str,
    /// Zone.
    pub zone: &'a str,
    /// Region.
    pub region: &'a str,
}

impl<'a> Topology<'a> {
    /// Reads the extractor's labels; `None` when none of them is set (llm-d stamps no
    /// attribute then).
    pub fn from_labels(
        keys: &TopologyExtractorParams,
        labels: &'a BTreeMap<String, String>,
    ) -> Option<Topology<'a>> {
        let get = |k: &str| labels.get(k).map_or("", String::as_str);
        let t = Topology {
            hostname: get(&keys.hostname),
            rack: get(&keys.rack),
            zone: get(&keys.zone),
            region: get(&keys.region),
        };
        (t != Topology::default()).then_some(t)
    }

    /// The tightest tier at which both share a non-empty equal value (`None`: no tier).
    /// An empty value never matches, not even another empty one.
    pub fn common_level(&self, other: &Topology<'_>) -> Option<TopologyLevel> {
        let same = |a: &str, b: &str| !a.is_empty() && a == b;
        if same(self.hostname, other.hostname) {
            Some(TopologyLevel::Host)
        } else if same(self.rack, other.rack) {
            Some(TopologyLevel::Rack)
        } else if same(self.zone, other.zone) {
            Some(TopologyLevel::Zone)
        } else if same(self.region, other.region) {
            Some(TopologyLevel::Region)
        } else {
            None
        }
    }
}

/// The peer pick's topology, when the cycle has a peer with a known topology.
fn peer<'a>(
    cycle: &'a CycleState<'_>,
    keys: Option<&TopologyExtractorParams>,
) -> Option<Topology<'a>> {
    let keys = keys?;
    let p = cycle.peer?;
    Topology::from_labels(keys, &cycle.endpoints.get(p)?.labels)
}

/// llm-d's fixed proximity curve, shaped by KV-transfer bandwidth (NVLink, one switch,
/// several hops, inter-datacenter).
pub fn level_score(level: Option<TopologyLevel>) -> f64 {
    match level {
        Some(TopologyLevel::Host) => 1.0,
        Some(TopologyLevel::Rack) => 0.2,
        Some(TopologyLevel::Zone) => 0.05,
        Some(TopologyLevel::Region) => 0.02,
        None => 0.0,
    }
}

/// `topology-affinity-filter`: keeps candidates co-located with the peer pick at
/// `minAffinity` or tighter. Fails open (keeps all) when there is no peer topology or no
/// candidate qualifies; a candidate without topology never qualifies.
#[derive(Debug, Clone)]
pub struct TopologyAffinityFilter {
    params: TopologyAffinityFilterParams,
}

impl TopologyAffinityFilter {
    /// A filter with these (loader-resolved) parameters.
    pub fn new(params: TopologyAffinityFilterParams) -> Self {
        TopologyAffinityFilter { params }
    }
}

impl Filter for TopologyAffinityFilter {
    fn filter(&self, cycle: &CycleState<'_>, _: &mut dyn RngCore, candidates: &mut Vec<usize>) {
        let keys = self.params.labels.as_ref();
        let Some(peer) = peer(cycle, keys) else {
            return;
        };
        let Some(keys) = keys else { return };
        let min = self.params.min_affinity;
        let passes = |i: usize| {
            Topology::from_labels(keys, &cycle.endpoints[i].labels)
                .and_then(|t| peer.common_level(&t))
                .is_some_and(|l| l <= min)
        };
        if candidates.iter().any(|&i| passes(i)) {
            candidates.retain(|&i| passes(i));
        }
    }
}

/// `topology-affinity-scorer`: 1 / 0.2 / 0.05 / 0.02 / 0 for a candidate sharing the
/// host / rack / zone / region / nothing with the peer pick; all 0 without a peer topology.
#[derive(Debug, Clone)]
pub struct TopologyAffinityScorer {
    params: TopologyAffinityScorerParams,
}

impl TopologyAffinityScorer {
    /// A scorer with these (loader-resolved) parameters.
    pub fn new(params: TopologyAffinityScorerParams) -> Self {
        TopologyAffinityScorer { params }
    }
}

impl Scorer for TopologyAffinityScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        out.fill(0.0);
        let keys = self.params.labels.as_ref();
        let (Some(peer), Some(keys)) = (peer(cycle, keys), keys) else {
            return;
        };
        for (o, &i) in out.iter_mut().zip(candidates) {
            *o = level_score(
                Topology::from_labels(keys, &cycle.endpoints[i].labels)
                    .and_then(|t| peer.common_level(&t)),
            );
        }
    }
}
