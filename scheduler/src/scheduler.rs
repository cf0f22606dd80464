//! The scheduler facade: built once per configuration, shared, driven by method calls.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;

use crate::config::params::{BurstPrefixParams, InflightLoadParams};
use crate::config::{ConfigError, PluginSpec, ResolvedConfig};
use crate::model::{Endpoint, InferenceRequest};
use crate::parsers::RequestParsers;
use crate::plugins::filters::{
    ByLabelFilter, HeaderBasedTestingFilter, LabelSelectorFilter, PrefixAffinityFilter,
    UtilizationFilter,
};
use crate::plugins::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use crate::plugins::prefix::spread_matches;
use crate::plugins::prefix::{ApproxPrefixProducer, PrecisePrefixProducer, PrefixProducer};
use crate::plugins::profiles::{
    AlwaysDisaggDecider, AlwaysDisaggMultimodalDecider, DisaggDecision, DisaggProfileHandler,
    PrefixBasedPdDecider, SingleProfileHandler,
};
use crate::plugins::saturation::{ConcurrencyDetector, SaturationDetector, UtilizationDetector};
use crate::plugins::scorers::{
    ActiveRequestScorer, HeaderLabelAffinityScorer, KvCacheUtilizationScorer, LoadAwareScorer,
    LoraAffinityScorer, NoHitLruScorer, PrefillLoadScorer, PrefixCacheScorer, QueueScorer,
    RunningRequestsScorer, SessionAffinityScorer, TokenLoadScorer,
};
use crate::plugins::topology::{TopologyAffinityFilter, TopologyAffinityScorer};
use crate::plugins::{
    CycleState, DataProducer, Decider, Filter, NextProfile, Picker, PreRequest, PrefixCycle,
    ProfileHandler, ProfileRun, ResponseComplete, Scorer,
};
use crate::prefix::hash::hash_prompt_into;
use crate::prefix::{BlockHash, PrefixIndex, PrefixMatches, anchor};

/// A request's prefix chain, for matching at the prefix owner instead of locally.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrefixChain {
    /// Chained block hashes, anchor first.
    pub hashes: Vec<BlockHash>,
    /// Tokens per block used.
    pub block_size_tokens: usize,
}

impl PrefixChain {
    /// The anchor (first block hash), which picks the chain's owners.
    pub fn anchor(&self) -> Option<BlockHash> {
        anchor(&self.hashes)
    }
}

/// Where a cycle's prefix-match data comes from.
#[derive(Debug, Clone, Copy)]
pub enum PrefixSource<'a> {
    /// Hash the prompt and match it against this scheduler's own index.
    Local,
    /// Matches computed elsewhere (the chain's owner) for `chain` (from
    /// [`Scheduler::prefix_chain`] with the same candidates).
    Remote {
        /// The chain that was matched.
        chain: &'a PrefixChain,
        /// Matched leading blocks per endpoint.
        matches: &'a PrefixMatches,
    },
    /// No prefix data this time (e.g. the owner did not answer in budget): prefix scorers
    /// score 0 and the request counts as cold.
    Unavailable,
}

/// Why a request could not be scheduled (→ HTTP 503). Nothing was recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// No candidate endpoint, or none survived the primary profile's filters.
    #[error("no ready endpoint available for this request")]
    NoEndpoints,
}

/// Why admission refused a request (→ HTTP 429). Nothing was recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejected {
    /// The pool is saturated and the request is sheddable (priority < 0).
    #[error("system saturated (saturation {saturation:.2}), sheddable request dropped")]
    Saturated {
        /// The pool saturation that triggered the rejection (>= 1.0).
        saturation: f64,
    },
}

/// One profile's picks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProfileResult {
    /// Primary first, then fallbacks.
    pub targets: Vec<SocketAddr>,
}

/// The weighted score (the sum of weight × scorer score) the primary profile gave each
/// candidate that passed its filters: llm-d's `ScoredCandidates`, which
/// `--emit-endpoint-scores` reports. Kept as indices into the candidate slice the cycle
/// ran over (the profile's own buffers, moved), so a caller that does not report them
/// pays nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CandidateScores {
    indices: Vec<usize>,
    scores: Vec<f64>,
}

impl CandidateScores {
    /// Each scored candidate's address and weighted score; `candidates` must be the slice
    /// the scheduling cycle ran over.
    pub fn by_address<'a>(
        &'a self,
        candidates: &'a [Endpoint],
    ) -> impl Iterator<Item = (SocketAddr, f64)> + 'a {
        self.indices
            .iter()
            .zip(&self.scores)
            .filter_map(|(&i, &s)| Some((candidates.get(i)?.address, s)))
    }

    /// How many candidates were scored.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether no candidate was scored.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Prefix-match facts of a scheduled request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrefixMatchSummary {
    /// The chain's anchor (first block hash), when the prompt produced blocks.
    pub anchor: Option<BlockHash>,
    /// The whole chain (recorded at the picked endpoints by `pre_request`).
    pub hashes: Vec<BlockHash>,
    /// Tokens per block used.
    pub block_size_tokens: usize,
    /// Blocks the primary target already held.
    pub matched_blocks: u32,
}

impl PrefixMatchSummary {
    /// Total blocks in the chain.
    pub fn total_blocks(&self) -> usize {
        self.hashes.len()
    }
}

/// The outcome of one scheduling cycle.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SchedulingResult {
    /// Name of the primary profile.
    pub primary_profile: String,
    /// Every profile that ran (skipped stages are absent).
    pub profiles: BTreeMap<String, ProfileResult>,
    /// Prefix data, when a prefix producer ran.
    pub prefix_match: Option<PrefixMatchSummary>,
    /// Request headers for the model server (e.g. `x-prefiller-host-port`).
    pub request_headers: Vec<(String, String)>,
    /// Response headers for the client (e.g. `x-session-token`).
    pub response_headers: Vec<(String, String)>,
    /// No candidate matched any prefix block.
    pub cold: bool,
    /// Endpoints that will cache the prompt, with their LRU capacity in blocks.
    pub cache_targets: Vec<(SocketAddr, usize)>,
    /// The prefix data came from this scheduler's index, so `pre_request` records there.
    pub prefix_local: bool,
    /// The disaggregation decision, when the profile handler counts one.
    pub decision: Option<DisaggDecision>,
    /// The primary profile's score of every candidate it scored.
    pub primary_scores: CandidateScores,
    /// How long each filter, scorer and picker call took.
    pub plugin_timings: Vec<PluginTiming>,
}

impl SchedulingResult {
    /// The primary profile's targets: the destination first, then fallbacks.
    pub fn destinations(&self) -> &[SocketAddr] {
        self.profiles
            .get(&self.primary_profile)
            .map_or(&[], |p| p.targets.as_slice())
    }

    /// `x-gateway-destination-endpoint` value: `ip:port[,ip:port…]`.
    pub fn header_value(&self) -> String {
        let mut s = String::new();
        for (i, a) in self.destinations().iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&a.to_string());
        }
        s
    }

    /// Extra request headers for the model server (`x-prefiller-host-port`, …).
    pub fn extra_headers(&self) -> Vec<(String, String)> {
        self.request_headers.clone()
    }

    /// Whether the primary target already holds at least one of the prompt's blocks
    /// (llm-d's `Prefer: if-available` test: no match data counts as no).
    pub fn primary_has_cached_prefix(&self) -> bool {
        self.prefix_match
            .as_ref()
            .is_some_and(|m| m.matched_blocks > 0)
    }
}

/// Which counter a profile handler's decisions go to, with llm-d's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionCounter {
    /// `disagg_decision_total` or the deprecated handler's `pd_decision_total`.
    pub family: DecisionFamily,
    /// The handler's plugin name (`plugin_name` label).
    pub plugin_name: String,
    /// The handler's type (`plugin_type` label).
    pub plugin_type: &'static str,
}

/// A disaggregation decision counter family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionFamily {
    /// `llm_d_epp_disagg_decision_total` (disagg-profile-handler).
    Disagg,
    /// `llm_d_epp_pd_decision_total` (the deprecated pd-profile-handler).
    Pd,
}

#[derive(Debug)]
struct Profile {
    name: String,
    filters: Vec<Arc<dyn Filter>>,
    scorers: Vec<(Arc<dyn Scorer>, f64)>,
    picker: Arc<dyn Picker>,
    /// Indexes into [`Scheduler::plugin_labels`] of the filters, scorers and picker.
    filter_ids: Vec<u16>,
    scorer_ids: Vec<u16>,
    picker_id: u16,
}

/// Who a plugin timing belongs to (llm-d's `plugin_duration_seconds` labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginLabel {
    /// `Filter`, `Scorer` or `Picker`.
    pub extension_point: &'static str,
    /// The llm-d type name.
    pub plugin_type: &'static str,
    /// The configured name.
    pub plugin_name: String,
}

/// How long one plugin call of a cycle took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginTiming {
    /// Index into [`Scheduler::plugin_label`].
    pub plugin: u16,
    /// Nanoseconds.
    pub nanos: u32,
}

/// A built plugin instance (shared between profiles that reference it).
#[derive(Debug, Clone)]
enum Instance {
    Filter(Arc<dyn Filter>),
    Scorer(Arc<dyn Scorer>),
    Picker(Arc<dyn Picker>),
    Decider(Arc<dyn Decider>),
    Other,
}

/// The IO-free scheduler: filters → scorers → picker per profile, driven by a handler.
#[derive(Debug)]
pub struct Scheduler {
    profiles: Vec<Profile>,
    plugin_labels: Vec<PluginLabel>,
    handler: Box<dyn ProfileHandler>,
    prefix: Option<PrefixProducer>,
    pre_request_hooks: Vec<Arc<dyn PreRequest>>,
    response_hooks: Vec<Arc<dyn ResponseComplete>>,
    saturation: SaturationDetector,
    inflight_load: InflightLoadParams,
    /// Every configured `session-affinity-scorer` (response headers, session bindings).
    session_affinity: Vec<Arc<SessionAffinityScorer>>,
    decision_counter: Option<DecisionCounter>,
    parsers: RequestParsers,
    echo_served_endpoint: bool,
    /// `burst-prefix-cache-producer`'s parameters: the caller holds requests for the
    /// window and passes each one's placement to [`Scheduler::schedule_with_burst`].
    burst: Option<BurstPrefixParams>,
    /// `token-producer`'s parameters when the precise producer runs.
    token_producer: Option<crate::config::precise::TokenProducerParams>,
}

fn build(
    spec: &PluginSpec,
    pre: &mut Vec<Arc<dyn PreRequest>>,
    sessions: &mut Vec<Arc<SessionAffinityScorer>>,
    burst_producer: Option<&str>,
) -> Instance {
    use PluginSpec as S;
    let n = |p: &crate::config::params::PickerParams| {
        usize::try_from(p.max_num_of_endpoints).unwrap_or(1)
    };
    match spec {
        S::LabelSelectorFilter(p) => {
            Instance::Filter(Arc::new(LabelSelectorFilter::new(p.clone())))
        }
        S::ByLabel(p) => Instance::Filter(Arc::new(ByLabelFilter::new(p.clone()))),
        S::DecodeFilter => Instance::Filter(Arc::new(ByLabelFilter::decode())),
        S::PrefillFilter => Instance::Filter(Arc::new(ByLabelFilter::prefill())),
        S::EncodeFilter => Instance::Filter(Arc::new(ByLabelFilter::encode())),
        S::HeaderBasedTestingFilter => Instance::Filter(Arc::new(HeaderBasedTestingFilter)),
        S::PrefixCacheAffinityFilter(p) => {
            Instance::Filter(Arc::new(PrefixAffinityFilter::new(p.clone())))
        }
        S::UtilizationDetector(p) => {
            Instance::Filter(Arc::new(UtilizationDetector::new(p.clone())))
        }
        S::UtilizationFilter(p) => Instance::Filter(Arc::new(UtilizationFilter::new(p.clone()))),
        S::TopologyAffinityFilter(p) => {
            Instance::Filter(Arc::new(TopologyAffinityFilter::new(p.clone())))
        }
        S::TopologyAffinityScorer(p) => {
            Instance::Scorer(Arc::new(TopologyAffinityScorer::new(p.clone())))
        }
        S::HeaderLabelAffinityScorer(p) => {
            Instance::Scorer(Arc::new(HeaderLabelAffinityScorer::new(p.clone())))
        }
        S::ConcurrencyDetector(p) => {
            Instance::Filter(Arc::new(ConcurrencyDetector::new(p.clone())))
        }
        S::PrefixCacheScorer(p) => {
            let reads_burst = burst_producer == Some(p.prefix_match_info_producer_name.as_str());
            Instance::Scorer(Arc::new(
                PrefixCacheScorer::new(p).reading_burst(reads_burst),
            ))
        }
        // The deprecated wrapper scores as a default prefix-cache-scorer over the precise
        // producer the loader added for it.
        S::PrecisePrefixCacheScorer(_) => Instance::Scorer(Arc::new(PrefixCacheScorer::new(
            &crate::config::params::PrefixScorerParams::default(),
        ))),
        S::KvCacheUtilizationScorer => Instance::Scorer(Arc::new(KvCacheUtilizationScorer)),
        S::QueueScorer => Instance::Scorer(Arc::new(QueueScorer)),
        S::RunningRequestsSizeScorer => Instance::Scorer(Arc::new(RunningRequestsScorer)),
        S::PrefillLoadScorer => Instance::Scorer(Arc::new(PrefillLoadScorer)),
        S::LoraAffinityScorer => Instance::Scorer(Arc::new(LoraAffinityScorer)),
        S::LoadAwareScorer(p) => Instance::Scorer(Arc::new(LoadAwareScorer::new(p))),
        S::ActiveRequestScorer(p) => Instance::Scorer(Arc::new(ActiveRequestScorer::new(p))),
        S::SessionAffinityScorer(p) => {
            let s = Arc::new(SessionAffinityScorer::new(p));
            sessions.push(s.clone());
            Instance::Scorer(s)
        }
        S::NoHitLruScorer(p) => {
            let s = Arc::new(NoHitLruScorer::new(p));
            pre.push(s.clone());
            Instance::Scorer(s)
        }
        S::TokenLoadScorer(p) => Instance::Scorer(Arc::new(TokenLoadScorer::new(p))),
        S::MaxScorePicker(p) => Instance::Picker(Arc::new(MaxScorePicker::new(n(p)))),
        S::RandomPicker(p) => Instance::Picker(Arc::new(RandomPicker::new(n(p)))),
        S::WeightedRandomPicker(p) => Instance::Picker(Arc::new(WeightedRandomPicker::new(n(p)))),
        S::PrefixBasedPdDecider(p) => Instance::Decider(Arc::new(PrefixBasedPdDecider::new(
            usize::try_from(p.non_cached_tokens).unwrap_or(0),
            usize::try_from(p.prompt_tokens).unwrap_or(0),
        ))),
        S::AlwaysDisaggPdDecider => Instance::Decider(Arc::new(AlwaysDisaggDecider)),
        S::AlwaysDisaggMultimodalDecider => {
            Instance::Decider(Arc::new(AlwaysDisaggMultimodalDecider))
        }
        S::SingleProfileHandler
        | S::DisaggProfileHandler(_)
        | S::PdProfileHandler(_)
        | S::ApproxPrefixCacheProducer(_)
        | S::InflightLoadProducer(_)
        | S::BurstPrefixCacheProducer(_)
        | S::PrecisePrefixCacheProducer(_)
        | S::TokenProducer(_)
        | S::EndpointNotificationSource
        | S::MetricsDataSource(_)
        | S::CoreMetricsExtractor(_)
        | S::TopologyExtractor(_)
        | S::FileDiscovery(_)
        | S::Parser(_)
        | S::DestinationEndpointServedVerifier
        | S::GlobalStrictFairnessPolicy
        | S::RoundRobinFairnessPolicy
        | S::ProgramAwareFairness(_)
        | S::FcfsOrderingPolicy
        | S::EdfOrderingPolicy
        | S::SloDeadlineOrderingPolicy
        | S::StaticUsageLimitPolicy(_)
        | S::PriorityHoldbackPolicy(_)
        | S::FairShareHoldbackPolicy(_)
        | S::SoftReflectiveCeilingPolicy
        | S::SheddableEvictionFilter
        | S::PriorityThenTimeEvictionOrderPolicy => Instance::Other,
    }
}

fn internal(message: String) -> ConfigError {
    ConfigError::Field {
        field: "plugins".into(),
        message,
        location: None,
    }
}

impl Scheduler {
    /// Builds the plugin instances of a resolved configuration.
    #[allow(clippy::result_large_err)] // cold path; the error is the loader's own type
    pub fn new(cfg: &ResolvedConfig) -> Result<Scheduler, ConfigError> {
        let mut pre_request_hooks: Vec<Arc<dyn PreRequest>> = Vec::new();
        let mut session_affinity = Vec::new();
        let mut instances: Vec<(String, Instance)> = Vec::with_capacity(cfg.plugins.len());
        let burst_producer = crate::config::burst_producer(&cfg.plugins);
        for p in &cfg.plugins {
            let built = build(
                &p.spec,
                &mut pre_request_hooks,
                &mut session_affinity,
                burst_producer,
            );
            instances.push((p.name.clone(), built));
        }
        let get = |name: &str| -> Result<&Instance, ConfigError> {
            instances
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| i)
                .ok_or_else(|| internal(format!("plugin `{name}` is referenced but not defined")))
        };
        let mut profiles = Vec::with_capacity(cfg.profiles.len());
        let mut plugin_labels: Vec<PluginLabel> = Vec::new();
        let mut label_id = |point: &'static str, name: &str| -> u16 {
            let plugin_type = cfg.plugin(name).map_or("", |p| p.spec.type_name());
            let label = PluginLabel {
                extension_point: point,
                plugin_type,
                plugin_name: name.to_owned(),
            };
            let i = match plugin_labels.iter().position(|l| *l == label) {
                Some(i) => i,
                None => {
                    plugin_labels.push(label);
                    plugin_labels.len() - 1
                }
            };
            u16::try_from(i).unwrap_or(u16::MAX)
        };
        for rp in &cfg.profiles {
            let mut filters = Vec::new();
            for f in &rp.filters {
                match get(f)? {
                    Instance::Filter(x) => filters.push(x.clone()),
                    _ => {
                        return Err(internal(format!(
                            "plugin `{f}` in profile `{}` is not a filter",
                            rp.name
                        )));
                    }
                }
            }
            let mut scorers = Vec::new();
            for s in &rp.scorers {
                match get(&s.plugin)? {
                    Instance::Scorer(x) => scorers.push((x.clone(), s.weight)),
                    _ => {
                        return Err(internal(format!(
                            "plugin `{}` in profile `{}` is not a scorer",
                            s.plugin, rp.name
                        )));
                    }
                }
            }
            let picker = match get(&rp.picker)? {
                Instance::Picker(x) => x.clone(),
                _ => {
                    return Err(internal(format!(
                        "plugin `{}` in profile `{}` is not a picker",
                        rp.picker, rp.name
                    )));
                }
            };
            profiles.push(Profile {
                name: rp.name.clone(),
                filters,
                scorers,
                picker,
                filter_ids: rp.filters.iter().map(|f| label_id("Filter", f)).collect(),
                scorer_ids: rp
                    .scorers
                    .iter()
                    .map(|s| label_id("Scorer", &s.plugin))
                    .collect(),
                picker_id: label_id("Picker", &rp.picker),
            });
        }
        let index_of = |name: &str| profiles.iter().position(|p: &Profile| p.name == name);
        let handler_spec = cfg.plugin(&cfg.profile_handler).map(|p| &p.spec);
        let (disagg, family) = match handler_spec {
            Some(PluginSpec::DisaggProfileHandler(d)) => (Some(d.clone()), DecisionFamily::Disagg),
            Some(PluginSpec::PdProfileHandler(p)) => (Some(p.to_disagg()), DecisionFamily::Pd),
            _ => (None, DecisionFamily::Disagg),
        };
        let handler: Box<dyn ProfileHandler> = match disagg {
            Some(d) => {
                let decider = |name: &str| -> Result<Option<Arc<dyn Decider>>, ConfigError> {
                    if name.is_empty() {
                        return Ok(None);
                    }
                    match get(name)? {
                        Instance::Decider(d) => Ok(Some(d.clone())),
                        _ => Err(internal(format!("plugin `{name}` is not a decider"))),
                    }
                };
                Box::new(DisaggProfileHandler {
                    decode: index_of(&d.profiles.decode).ok_or_else(|| {
                        internal(format!(
                            "no scheduling profile named `{}`",
                            d.profiles.decode
                        ))
                    })?,
                    prefill: index_of(&d.profiles.prefill),
                    encode: index_of(&d.profiles.encode),
                    prefill_decider: decider(&d.deciders.prefill)?,
                    encode_decider: decider(&d.deciders.encode)?,
                    stage_order: d.stage_order,
                    pd_only: family == DecisionFamily::Pd,
                })
            }
            None if profiles.len() == 1 => Box::new(SingleProfileHandler),
            None => return Err(internal("a profile handler is required".into())),
        };
        let decision_counter = handler_spec.and_then(|spec| match spec {
            PluginSpec::DisaggProfileHandler(_) | PluginSpec::PdProfileHandler(_) => {
                Some(DecisionCounter {
                    family,
                    plugin_name: cfg.profile_handler.clone(),
                    plugin_type: spec.type_name(),
                })
            }
            _ => None,
        });
        let prefix =
            cfg.prefix_producer
                .as_deref()
                .and_then(|n| match cfg.plugin(n).map(|p| &p.spec) {
                    Some(PluginSpec::ApproxPrefixCacheProducer(p)) => {
                        Some(PrefixProducer::Approx(ApproxPrefixProducer::new(p.clone())))
                    }
                    Some(PluginSpec::PrecisePrefixCacheProducer(p)) => Some(
                        PrefixProducer::Precise(PrecisePrefixProducer::new(p.clone())),
                    ),
                    _ => None,
                });
        let token_producer = cfg
            .token_producer
            .as_deref()
            .and_then(|n| match cfg.plugin(n).map(|p| &p.spec) {
                Some(PluginSpec::TokenProducer(x)) => Some(x.clone()),
                _ => None,
            })
            .filter(|_| prefix.as_ref().is_some_and(|p| p.precise().is_some()));
        Ok(Scheduler {
            profiles,
            plugin_labels,
            handler,
            prefix,
            pre_request_hooks,
            response_hooks: Vec::new(),
            saturation: match cfg.saturation_spec() {
                Some(PluginSpec::ConcurrencyDetector(p)) => {
                    SaturationDetector::Concurrency(ConcurrencyDetector::new(p.clone()))
                }
                _ => SaturationDetector::Utilization(UtilizationDetector::new(cfg.utilization())),
            },
            inflight_load: cfg
                .plugins
                .iter()
                .find_map(|p| match &p.spec {
                    PluginSpec::InflightLoadProducer(x) => Some(x.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            session_affinity,
            decision_counter,
            parsers: cfg.request_parsers(),
            echo_served_endpoint: cfg
                .plugins
                .iter()
                .any(|p| matches!(p.spec, PluginSpec::DestinationEndpointServedVerifier)),
            burst: cfg.plugins.iter().find_map(|p| match &p.spec {
                PluginSpec::BurstPrefixCacheProducer(x) => Some(x.clone()),
                _ => None,
            }),
            token_producer,
        })
    }

    /// The `burst-prefix-cache-producer` parameters, when one is configured: the caller
    /// must then hold each request for the window and place the batch with
    /// [`crate::plugins::burst::assign`].
    pub fn burst(&self) -> Option<&BurstPrefixParams> {
        self.burst.as_ref()
    }

    /// The request's prefix blocks as the burst producer hashes them (its
    /// `blockSizeTokens`, cut to its block cap); empty without a burst producer.
    pub fn burst_hashes(&self, req: &InferenceRequest) -> Vec<BlockHash> {
        let mut out = Vec::new();
        if let Some(b) = &self.burst {
            hash_prompt_into(
                &req.target_model,
                req.cache_salt.as_deref(),
                &req.prompt_bytes,
                usize::try_from(b.block_size_tokens).unwrap_or(0),
                b.max_blocks(),
                &mut out,
            );
        }
        out
    }

    /// Whether a `destination-endpoint-served-verifier` is configured: the endpoint that
    /// served a request (as the gateway reports it) goes back to the client in
    /// `x-conformance-test-served-endpoint`.
    pub fn echoes_served_endpoint(&self) -> bool {
        self.echo_served_endpoint
    }

    /// The request parsers in force: which parser (and so which body reading) a request
    /// path gets, or why it is refused.
    pub fn parsers(&self) -> &RequestParsers {
        &self.parsers
    }

    /// In-flight tokens `request` adds to the endpoint it is dispatched to, until it
    /// completes: its prompt tokens (4 bytes a token), plus the output estimate when
    /// `inflight-load-producer.addEstimatedOutputTokens` is on. The caller's load board
    /// counts this; the token-load scorer and the concurrency detector read the sum.
    pub fn in_flight_tokens(&self, request: &InferenceRequest) -> u64 {
        let prompt = (request.prompt_bytes.len() / 4) as u64;
        self.inflight_load
            .request_tokens(prompt, request.max_tokens)
    }

    /// Where this scheduler's disaggregation decisions are counted (`None`: the profile
    /// handler counts none, e.g. single-profile-handler).
    pub fn decision_counter(&self) -> Option<&DecisionCounter> {
        self.decision_counter.as_ref()
    }

    /// The precise prefix producer, when that is the configured one.
    pub fn precise_prefix(&self) -> Option<&PrecisePrefixProducer> {
        self.prefix.as_ref().and_then(|p| p.precise())
    }

    /// The token producer's parameters, when requests are tokenized (precise only).
    pub fn token_producer(&self) -> Option<&crate::config::precise::TokenProducerParams> {
        self.token_producer.as_ref()
    }

    /// The prefix index, when a prefix producer is configured.
    pub fn prefix_index(&self) -> Option<&PrefixIndex> {
        self.prefix.as_ref().and_then(|p| p.index())
    }

    /// The labels of timing `plugin` of a [`SchedulingResult::plugin_timings`] entry.
    pub fn plugin_label(&self, plugin: u16) -> Option<&PluginLabel> {
        self.plugin_labels.get(usize::from(plugin))
    }

    /// Runs profile `i`: its picks, and the weighted score of every candidate it scored.
    /// Each plugin call's duration goes to `timings`.
    fn run_profile(
        &self,
        i: usize,
        cycle: &CycleState<'_>,
        rng: &mut dyn RngCore,
        timings: &mut Vec<PluginTiming>,
    ) -> (Vec<usize>, CandidateScores) {
        let p = &self.profiles[i];
        let mut timed = |plugin: u16, since: std::time::Instant| {
            timings.push(PluginTiming {
                plugin,
                nanos: u32::try_from(since.elapsed().as_nanos()).unwrap_or(u32::MAX),
            });
        };
        let mut cands: Vec<usize> = (0..cycle.endpoints.len()).collect();
        for (f, &id) in p.filters.iter().zip(&p.filter_ids) {
            let t = std::time::Instant::now();
            f.filter(cycle, rng, &mut cands);
            timed(id, t);
            if cands.is_empty() {
                return (Vec::new(), CandidateScores::default());
            }
        }
        let mut total = vec![0.0f64; cands.len()];
        let mut one = vec![0.0f64; cands.len()];
        for ((s, w), &id) in p.scorers.iter().zip(&p.scorer_ids) {
            let t = std::time::Instant::now();
            s.score(cycle, &cands, &mut one);
            timed(id, t);
            for (t, v) in total.iter_mut().zip(&one) {
                *t += w * v;
            }
        }
        let mut out = Vec::with_capacity(1);
        let t = std::time::Instant::now();
        p.picker.pick(&cands, &total, rng, &mut out);
        timed(p.picker_id, t);
        (
            out,
            CandidateScores {
                indices: cands,
                scores: total,
            },
        )
    }

    /// Runs one scheduling cycle over `candidates` (the request's eligible endpoints),
    /// matching prefixes against this scheduler's own index.
    pub fn schedule(
        &self,
        req: &InferenceRequest,
        candidates: &[Endpoint],
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Result<SchedulingResult, ScheduleError> {
        self.schedule_with_prefix(req, candidates, now, rng, PrefixSource::Local)
    }

    /// The request's prefix chain (hashing only), when a prefix producer is configured.
    pub fn prefix_chain(
        &self,
        req: &InferenceRequest,
        candidates: &[Endpoint],
    ) -> Option<PrefixChain> {
        let p = self.prefix.as_ref()?;
        let mut pc = PrefixCycle::default();
        p.hash_into(req, candidates, &mut pc);
        Some(PrefixChain {
            hashes: pc.hashes,
            block_size_tokens: pc.block_size_tokens,
        })
    }

    /// [`Self::schedule`] with prefix data from `source`.
    pub fn schedule_with_prefix(
        &self,
        req: &InferenceRequest,
        candidates: &[Endpoint],
        now: Instant,
        rng: &mut dyn RngCore,
        source: PrefixSource<'_>,
    ) -> Result<SchedulingResult, ScheduleError> {
        self.schedule_with_burst(req, candidates, now, rng, source, None)
    }

    /// [`Self::schedule_with_prefix`] with the burst producer's placement of this request
    /// (`None`: it got none). Like llm-d's producer, the placed endpoint matches the whole
    /// prefix and every other endpoint none, for a `prefix-cache-scorer` that reads it.
    pub fn schedule_with_burst(
        &self,
        req: &InferenceRequest,
        candidates: &[Endpoint],
        now: Instant,
        rng: &mut dyn RngCore,
        source: PrefixSource<'_>,
        placed: Option<SocketAddr>,
    ) -> Result<SchedulingResult, ScheduleError> {
        if candidates.is_empty() {
            return Err(ScheduleError::NoEndpoints);
        }
        let mut cycle = CycleState {
            request: req,
            endpoints: candidates,
            now,
            prefix: None,
            burst: None,
            cold: true,
            peer: None,
        };
        if let Some(b) = &self.burst {
            let hashes = self.burst_hashes(req);
            let total = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
            cycle.burst = Some(PrefixCycle {
                matched: candidates
                    .iter()
                    .map(|e| if Some(e.address) == placed { total } else { 0 })
                    .collect(),
                hashes,
                block_size_tokens: usize::try_from(b.block_size_tokens).unwrap_or(0),
            });
        }
        match (&self.prefix, source) {
            (None, _) => {}
            (Some(p), PrefixSource::Local) => DataProducer::produce(p, &mut cycle),
            (Some(_), PrefixSource::Remote { chain, matches }) => {
                let mut pc = PrefixCycle {
                    hashes: chain.hashes.clone(),
                    block_size_tokens: chain.block_size_tokens,
                    matched: vec![0; candidates.len()],
                };
                spread_matches(matches, candidates, &mut pc.matched);
                // A remote answer can never credit more blocks than the chain has.
                let total = u32::try_from(chain.hashes.len()).unwrap_or(u32::MAX);
                for m in &mut pc.matched {
                    *m = (*m).min(total);
                }
                cycle.cold = pc.matched.iter().all(|&m| m == 0);
                cycle.prefix = Some(pc);
            }
            (Some(p), PrefixSource::Unavailable) => {
                let mut pc = PrefixCycle::default();
                p.hash_into(req, candidates, &mut pc);
                cycle.prefix = Some(pc);
            }
        }
        let mut runs: Vec<ProfileRun> = Vec::with_capacity(self.profiles.len());
        let primary = self.handler.primary();
        let mut primary_scores = CandidateScores::default();
        let mut plugin_timings = Vec::with_capacity(8);
        // Each profile runs or is skipped at most once; the bound guards a faulty handler.
        for _ in 0..=2 * self.profiles.len() {
            match self.handler.next(&cycle, &runs) {
                NextProfile::Run(i)
                    if i < self.profiles.len() && !runs.iter().any(|r| r.profile == i) =>
                {
                    cycle.peer = self.handler.peer(&runs, i);
                    let (targets, scores) = self.run_profile(i, &cycle, rng, &mut plugin_timings);
                    if i == primary {
                        primary_scores = scores;
                    }
                    runs.push(ProfileRun {
                        profile: i,
                        targets,
                        skipped: false,
                    });
                }
                NextProfile::Skip(i) if !runs.iter().any(|r| r.profile == i) => {
                    runs.push(ProfileRun {
                        profile: i,
                        targets: Vec::new(),
                        skipped: true,
                    });
                }
                _ => break,
            }
        }
        let Some(primary_run) = runs
            .iter()
            .find(|r| r.profile == primary && !r.targets.is_empty())
        else {
            return Err(ScheduleError::NoEndpoints);
        };
        let addr = |i: usize| candidates[i].address;
        let mut profiles = BTreeMap::new();
        for r in runs.iter().filter(|r| !r.skipped && !r.targets.is_empty()) {
            profiles.insert(
                self.profiles[r.profile].name.clone(),
                ProfileResult {
                    targets: r.targets.iter().map(|&i| addr(i)).collect(),
                },
            );
        }
        let primary_target = primary_run.targets[0];
        let mut cache_targets = Vec::with_capacity(2);
        if let Some(p) = &self.prefix {
            cache_targets.push((
                addr(primary_target),
                p.capacity_for(&candidates[primary_target]),
            ));
            for cp in self.handler.cache_profiles() {
                if let Some(&t) = runs
                    .iter()
                    .find(|r| r.profile == cp && !r.skipped)
                    .and_then(|r| r.targets.first())
                {
                    cache_targets.push((addr(t), p.capacity_for(&candidates[t])));
                }
            }
        }
        let request_headers = self.handler.headers(&cycle, &runs);
        let decision = self.handler.decision(&runs);
        // Each encoded-endpoint-header instance writes its header naming its profile's pick
        // (the primary one by default; nothing when that profile did not run).
        let response_headers = self
            .session_affinity
            .iter()
            .filter_map(|s| {
                let target = match s.profile() {
                    None => Some(addr(primary_target)),
                    Some(name) => profiles
                        .get(name)
                        .and_then(|p: &ProfileResult| p.targets.first().copied()),
                };
                s.response_header(target?)
            })
            .collect();
        let prefix_match = cycle.prefix.take().map(|pc| PrefixMatchSummary {
            anchor: anchor(&pc.hashes),
            matched_blocks: pc.matched.get(primary_target).copied().unwrap_or(0),
            block_size_tokens: pc.block_size_tokens,
            hashes: pc.hashes,
        });
        Ok(SchedulingResult {
            primary_profile: self.profiles[primary].name.clone(),
            profiles,
            prefix_match,
            request_headers,
            response_headers,
            cold: cycle.cold,
            cache_targets,
            prefix_local: matches!(source, PrefixSource::Local),
            decision,
            primary_scores,
            plugin_timings,
        })
    }

    /// Records the pick before forwarding: prefix blocks at the primary (and prefill)
    /// endpoint in the local index (only when the prefix data was local; otherwise the
    /// caller sends `result.prefix_match` and `cache_targets` to the chain's owners), and
    /// the plugins' pre-request hooks.
    pub fn pre_request(&self, req: &InferenceRequest, result: &SchedulingResult, now: Instant) {
        if let (Some(p), Some(m), true) = (&self.prefix, &result.prefix_match, result.prefix_local)
        {
            for &(addr, cap) in &result.cache_targets {
                p.record(addr, cap, &m.hashes);
            }
        }
        let Some(&primary) = result.destinations().first() else {
            return;
        };
        let also: Vec<SocketAddr> = result
            .cache_targets
            .iter()
            .skip(1)
            .map(|(a, _)| *a)
            .collect();
        for h in &self.pre_request_hooks {
            h.pre_request(req, primary, &also, result.cold, now);
        }
        for s in &self.session_affinity {
            let target = match s.profile() {
                None => Some(primary),
                Some(name) => result
                    .profiles
                    .get(name)
                    .and_then(|p| p.targets.first().copied()),
            };
            s.bind(req, target, now);
        }
    }

    /// Response finished at `served`: runs the plugins' completion hooks. (No built-in
    /// plugin keeps per-request state past `pre_request`; in-flight counts are the caller's.)
    pub fn response_complete(&self, req: &InferenceRequest, served: SocketAddr, now: Instant) {
        for h in &self.response_hooks {
            h.response_complete(req, served, now);
        }
    }

    /// The endpoint left the pool: forget its prefix state.
    pub fn remove_endpoint(&self, addr: SocketAddr) {
        if let Some(ix) = self.prefix.as_ref().and_then(|p| p.index()) {
            ix.remove_endpoint(addr);
        }
    }

    /// Pool saturation from the configured detector (>= 1.0 = saturated).
    pub fn saturation(&self, candidates: &[Endpoint], now: Instant) -> f64 {
        self.saturation.saturation(candidates, now)
    }

    /// Admission (llm-d's legacy admission controller): a sheddable request (priority < 0)
    /// is rejected when saturation >= 1.0; other requests are always admitted.
    pub fn admit(
        &self,
        req: &InferenceRequest,
        candidates: &[Endpoint],
        now: Instant,
    ) -> Result<(), Rejected> {
        if !req.is_sheddable() {
            return Ok(());
        }
        let saturation = self.saturation(candidates, now);
        if saturation >= 1.0 {
            return Err(Rejected::Saturated { saturation });
        }
        Ok(())
    }
}
