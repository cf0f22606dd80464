//! The plugin registry: llm-d type names (and old aliases) → typed, validated parameters.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::params::*;
use super::precise::{PrecisePrefixParams, TokenProducerParams};
use crate::parsers::ParserType;

/// What a plugin is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// `scheduling.Filter`
    Filter,
    /// `scheduling.Scorer`
    Scorer,
    /// `scheduling.Picker`
    Picker,
    /// `scheduling.ProfileHandler`
    ProfileHandler,
    /// A disaggregation decider.
    Decider,
    /// A request-control data producer.
    DataProducer,
    /// A data-layer source (configures the node's fetcher).
    DataSource,
    /// A data-layer extractor (configures the node's fetcher).
    DataExtractor,
    /// A saturation detector (also usable as a filter).
    SaturationDetector,
    /// A request parser.
    Parser,
    /// A flow-control fairness policy (which flow of a band goes next).
    FairnessPolicy,
    /// A flow-control ordering policy (order within a flow).
    OrderingPolicy,
    /// A flow-control usage limit policy (saturation ceiling per band).
    UsageLimitPolicy,
    /// A flow-control eviction filter (which requests may be evicted).
    EvictionFilter,
    /// A flow-control eviction order (which evictable request goes first).
    EvictionOrdering,
    /// A response-header processor (runs when the model server's headers arrive).
    ResponseProcessor,
    /// Endpoint discovery (`dataLayer.discovery.pluginRef`).
    Discovery,
}

impl PluginKind {
    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Filter => "filter",
            PluginKind::Scorer => "scorer",
            PluginKind::Picker => "picker",
            PluginKind::ProfileHandler => "profile handler",
            PluginKind::Decider => "decider",
            PluginKind::DataProducer => "data producer",
            PluginKind::DataSource => "data source",
            PluginKind::DataExtractor => "data extractor",
            PluginKind::SaturationDetector => "saturation detector",
            PluginKind::Parser => "parser",
            PluginKind::FairnessPolicy => "fairness policy",
            PluginKind::OrderingPolicy => "ordering policy",
            PluginKind::UsageLimitPolicy => "usage limit policy",
            PluginKind::EvictionFilter => "eviction filter",
            PluginKind::EvictionOrdering => "eviction ordering policy",
            PluginKind::ResponseProcessor => "response processor",
            PluginKind::Discovery => "endpoint discovery plugin",
        }
    }
}

/// A plugin's type with its typed, defaulted parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginSpec {
    /// `label-selector-filter`
    LabelSelectorFilter(LabelSelectorParams),
    /// `by-label`
    ByLabel(ByLabelParams),
    /// `decode-filter`
    DecodeFilter,
    /// `prefill-filter`
    PrefillFilter,
    /// `encode-filter`
    EncodeFilter,
    /// `prefix-cache-affinity-filter`
    PrefixCacheAffinityFilter(PrefixAffinityParams),
    /// `header-based-testing-filter` (GIE conformance: `test-epp-endpoint-selection`).
    HeaderBasedTestingFilter,
    /// `destination-endpoint-served-verifier` (GIE conformance: the served endpoint is
    /// echoed in `x-conformance-test-served-endpoint`).
    DestinationEndpointServedVerifier,
    /// `utilization-filter`
    UtilizationFilter(UtilizationFilterParams),
    /// `topology-affinity-filter`
    TopologyAffinityFilter(TopologyAffinityFilterParams),
    /// `topology-affinity-scorer`
    TopologyAffinityScorer(TopologyAffinityScorerParams),
    /// `header-label-affinity-scorer`
    HeaderLabelAffinityScorer(HeaderLabelAffinityParams),
    /// `file-discovery`
    FileDiscovery(FileDiscoveryParams),
    /// `topology-extractor` (its label keys are read by the topology affinity plugins)
    TopologyExtractor(TopologyExtractorParams),
    /// `prefix-cache-scorer` (with any GIE 1.x producer parameters in `producer`).
    PrefixCacheScorer(PrefixScorerParams),
    /// `kv-cache-utilization-scorer`
    KvCacheUtilizationScorer,
    /// `queue-scorer`
    QueueScorer,
    /// `running-requests-size-scorer`
    RunningRequestsSizeScorer,
    /// `lora-affinity-scorer`
    LoraAffinityScorer,
    /// `load-aware-scorer`
    LoadAwareScorer(LoadAwareParams),
    /// `active-request-scorer`
    ActiveRequestScorer(ActiveRequestParams),
    /// `session-affinity-scorer`
    SessionAffinityScorer(SessionAffinityParams),
    /// `no-hit-lru-scorer`
    NoHitLruScorer(NoHitLruParams),
    /// `token-load-scorer`
    TokenLoadScorer(TokenLoadParams),
    /// `prefill-load-scorer` (infermesh's own: in-flight requests before their first token)
    PrefillLoadScorer,
    /// `max-score-picker`
    MaxScorePicker(PickerParams),
    /// `random-picker`
    RandomPicker(PickerParams),
    /// `weighted-random-picker`
    WeightedRandomPicker(PickerParams),
    /// `single-profile-handler`
    SingleProfileHandler,
    /// `disagg-profile-handler`
    DisaggProfileHandler(DisaggParams),
    /// `pd-profile-handler` (deprecated in llm-d; runs as `disagg-profile-handler`)
    PdProfileHandler(PdProfileParams),
    /// `prefix-based-pd-decider`
    PrefixBasedPdDecider(PdDeciderParams),
    /// `always-disagg-pd-decider`
    AlwaysDisaggPdDecider,
    /// `always-disagg-multimodal-decider`
    AlwaysDisaggMultimodalDecider,
    /// `approx-prefix-cache-producer`
    ApproxPrefixCacheProducer(ApproxPrefixParams),
    /// `precise-prefix-cache-producer`: prefix matches from the engines' KV events.
    PrecisePrefixCacheProducer(PrecisePrefixParams),
    /// `precise-prefix-cache-scorer` (deprecated in llm-d): a `precise-prefix-cache-producer`
    /// with these parameters plus a `prefix-cache-scorer` reading it.
    PrecisePrefixCacheScorer(PrecisePrefixParams),
    /// `token-producer` (alias `tokenizer`): the prompt's token ids, for the precise
    /// producer (the node runs the backend).
    TokenProducer(TokenProducerParams),
    /// `endpoint-notification-source`: tells the precise producer which pods exist (the
    /// node's pool does this; the plugin is accepted so llm-d configs load).
    EndpointNotificationSource,
    /// `burst-prefix-cache-producer` (the node holds each request for the window; the
    /// scheduler turns the batch's placement into prefix-match data).
    BurstPrefixCacheProducer(BurstPrefixParams),
    /// `inflight-load-producer` (counts come from the caller's load board; the
    /// parameters decide what a request adds to them).
    InflightLoadProducer(InflightLoadParams),
    /// `metrics-data-source`
    MetricsDataSource(MetricsDataSourceParams),
    /// `core-metrics-extractor`
    CoreMetricsExtractor(CoreMetricsExtractorParams),
    /// `utilization-detector`
    UtilizationDetector(UtilizationParams),
    /// `concurrency-detector`
    ConcurrencyDetector(ConcurrencyParams),
    /// A request parser (`openai-parser`, `anthropic-parser`, `vllmhttp-parser`,
    /// `passthrough-parser`).
    Parser(ParserType),
    /// `global-strict-fairness-policy`
    GlobalStrictFairnessPolicy,
    /// `round-robin-fairness-policy`
    RoundRobinFairnessPolicy,
    /// `program-aware-fairness`
    ProgramAwareFairness(ProgramAwareFairnessParams),
    /// `fcfs-ordering-policy`
    FcfsOrderingPolicy,
    /// `edf-ordering-policy`
    EdfOrderingPolicy,
    /// `slo-deadline-ordering-policy`
    SloDeadlineOrderingPolicy,
    /// `static-usage-limit-policy`
    StaticUsageLimitPolicy(StaticUsageLimitParams),
    /// `priority-holdback-policy`
    PriorityHoldbackPolicy(PriorityHoldbackParams),
    /// `fair-share-holdback-policy` (infermesh's)
    FairShareHoldbackPolicy(FairShareHoldbackParams),
    /// `soft-reflective-ceiling-policy`
    SoftReflectiveCeilingPolicy,
    /// `sheddable-eviction-filter`
    SheddableEvictionFilter,
    /// `priority-then-time-eviction-order-policy`
    PriorityThenTimeEvictionOrderPolicy,
}

impl PluginSpec {
    /// The canonical llm-d type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            PluginSpec::LabelSelectorFilter(_) => "label-selector-filter",
            PluginSpec::ByLabel(_) => "by-label",
            PluginSpec::DecodeFilter => "decode-filter",
            PluginSpec::PrefillFilter => "prefill-filter",
            PluginSpec::EncodeFilter => "encode-filter",
            PluginSpec::PrefixCacheAffinityFilter(_) => "prefix-cache-affinity-filter",
            PluginSpec::HeaderBasedTestingFilter => "header-based-testing-filter",
            PluginSpec::DestinationEndpointServedVerifier => "destination-endpoint-served-verifier",
            PluginSpec::UtilizationFilter(_) => "utilization-filter",
            PluginSpec::TopologyAffinityFilter(_) => "topology-affinity-filter",
            PluginSpec::TopologyAffinityScorer(_) => "topology-affinity-scorer",
            PluginSpec::HeaderLabelAffinityScorer(_) => "header-label-affinity-scorer",
            PluginSpec::TopologyExtractor(_) => "topology-extractor",
            PluginSpec::FileDiscovery(_) => "file-discovery",
            PluginSpec::PrefixCacheScorer(_) => "prefix-cache-scorer",
            PluginSpec::KvCacheUtilizationScorer => "kv-cache-utilization-scorer",
            PluginSpec::QueueScorer => "queue-scorer",
            PluginSpec::RunningRequestsSizeScorer => "running-requests-size-scorer",
            PluginSpec::LoraAffinityScorer => "lora-affinity-scorer",
            PluginSpec::LoadAwareScorer(_) => "load-aware-scorer",
            PluginSpec::ActiveRequestScorer(_) => "active-request-scorer",
            PluginSpec::SessionAffinityScorer(_) => "session-affinity-scorer",
            PluginSpec::NoHitLruScorer(_) => "no-hit-lru-scorer",
            PluginSpec::TokenLoadScorer(_) => "token-load-scorer",
            PluginSpec::PrefillLoadScorer => "prefill-load-scorer",
            PluginSpec::MaxScorePicker(_) => "max-score-picker",
            PluginSpec::RandomPicker(_) => "random-picker",
            PluginSpec::WeightedRandomPicker(_) => "weighted-random-picker",
            PluginSpec::SingleProfileHandler => "single-profile-handler",
            PluginSpec::DisaggProfileHandler(_) => "disagg-profile-handler",
            PluginSpec::PdProfileHandler(_) => "pd-profile-handler",
            PluginSpec::PrefixBasedPdDecider(_) => "prefix-based-pd-decider",
            PluginSpec::AlwaysDisaggPdDecider => "always-disagg-pd-decider",
            PluginSpec::AlwaysDisaggMultimodalDecider => "always-disagg-multimodal-decider",
            PluginSpec::ApproxPrefixCacheProducer(_) => "approx-prefix-cache-producer",
            PluginSpec::InflightLoadProducer(_) => "inflight-load-producer",
            PluginSpec::BurstPrefixCacheProducer(_) => "burst-prefix-cache-producer",
            PluginSpec::PrecisePrefixCacheProducer(_) => "precise-prefix-cache-producer",
            PluginSpec::PrecisePrefixCacheScorer(_) => "precise-prefix-cache-scorer",
            PluginSpec::TokenProducer(_) => "token-producer",
            PluginSpec::EndpointNotificationSource => "endpoint-notification-source",
            PluginSpec::MetricsDataSource(_) => "metrics-data-source",
            PluginSpec::CoreMetricsExtractor(_) => "core-metrics-extractor",
            PluginSpec::UtilizationDetector(_) => "utilization-detector",
            PluginSpec::ConcurrencyDetector(_) => "concurrency-detector",
            PluginSpec::Parser(p) => p.type_name(),
            PluginSpec::GlobalStrictFairnessPolicy => "global-strict-fairness-policy",
            PluginSpec::RoundRobinFairnessPolicy => "round-robin-fairness-policy",
            PluginSpec::ProgramAwareFairness(_) => "program-aware-fairness",
            PluginSpec::FcfsOrderingPolicy => "fcfs-ordering-policy",
            PluginSpec::EdfOrderingPolicy => "edf-ordering-policy",
            PluginSpec::SloDeadlineOrderingPolicy => "slo-deadline-ordering-policy",
            PluginSpec::StaticUsageLimitPolicy(_) => "static-usage-limit-policy",
            PluginSpec::PriorityHoldbackPolicy(_) => "priority-holdback-policy",
            PluginSpec::FairShareHoldbackPolicy(_) => "fair-share-holdback-policy",
            PluginSpec::SoftReflectiveCeilingPolicy => "soft-reflective-ceiling-policy",
            PluginSpec::SheddableEvictionFilter => "sheddable-eviction-filter",
            PluginSpec::PriorityThenTimeEvictionOrderPolicy => {
                "priority-then-time-eviction-order-policy"
            }
        }
    }

    /// What the plugin is.
    pub fn kind(&self) -> PluginKind {
        use PluginSpec::*;
        match self {
            LabelSelectorFilter(_)
            | ByLabel(_)
            | DecodeFilter
            | PrefillFilter
            | EncodeFilter
            | PrefixCacheAffinityFilter(_)
            | UtilizationFilter(_)
            | TopologyAffinityFilter(_)
            | HeaderBasedTestingFilter => PluginKind::Filter,
            DestinationEndpointServedVerifier => PluginKind::ResponseProcessor,
            FileDiscovery(_) => PluginKind::Discovery,
            PrefixCacheScorer(_)
            | KvCacheUtilizationScorer
            | QueueScorer
            | RunningRequestsSizeScorer
            | LoraAffinityScorer
            | LoadAwareScorer(_)
            | ActiveRequestScorer(_)
            | SessionAffinityScorer(_)
            | NoHitLruScorer(_)
            | TopologyAffinityScorer(_)
            | HeaderLabelAffinityScorer(_)
            | TokenLoadScorer(_)
            | PrefillLoadScorer
            | PrecisePrefixCacheScorer(_) => PluginKind::Scorer,
            MaxScorePicker(_) | RandomPicker(_) | WeightedRandomPicker(_) => PluginKind::Picker,
            SingleProfileHandler | DisaggProfileHandler(_) | PdProfileHandler(_) => {
                PluginKind::ProfileHandler
            }
            PrefixBasedPdDecider(_) | AlwaysDisaggPdDecider | AlwaysDisaggMultimodalDecider => {
                PluginKind::Decider
            }
            ApproxPrefixCacheProducer(_)
            | InflightLoadProducer(_)
            | BurstPrefixCacheProducer(_)
            | PrecisePrefixCacheProducer(_)
            | TokenProducer(_) => PluginKind::DataProducer,
            MetricsDataSource(_) | EndpointNotificationSource => PluginKind::DataSource,
            CoreMetricsExtractor(_) | TopologyExtractor(_) => PluginKind::DataExtractor,
            UtilizationDetector(_) | ConcurrencyDetector(_) => PluginKind::SaturationDetector,
            Parser(_) => PluginKind::Parser,
            GlobalStrictFairnessPolicy | RoundRobinFairnessPolicy | ProgramAwareFairness(_) => {
                PluginKind::FairnessPolicy
            }
            FcfsOrderingPolicy | EdfOrderingPolicy | SloDeadlineOrderingPolicy => {
                PluginKind::OrderingPolicy
            }
            StaticUsageLimitPolicy(_)
            | PriorityHoldbackPolicy(_)
            | FairShareHoldbackPolicy(_)
            | SoftReflectiveCeilingPolicy => PluginKind::UsageLimitPolicy,
            SheddableEvictionFilter => PluginKind::EvictionFilter,
            PriorityThenTimeEvictionOrderPolicy => PluginKind::EvictionOrdering,
        }
    }

    /// Whether a scheduling profile may list it as a filter.
    pub fn is_filter(&self) -> bool {
        matches!(
            self.kind(),
            PluginKind::Filter | PluginKind::SaturationDetector
        )
    }

    /// The parameters with defaults filled in, as compact JSON (for `config check`).
    pub fn params_json(&self) -> String {
        fn j<T: Serialize>(t: &T) -> String {
            serde_json::to_string(t).unwrap_or_else(|e| format!("<{e}>"))
        }
        use PluginSpec::*;
        match self {
            LabelSelectorFilter(p) => j(p),
            ByLabel(p) => j(p),
            PrefixCacheAffinityFilter(p) => j(p),
            UtilizationFilter(p) => j(p),
            TopologyAffinityFilter(p) => j(p),
            TopologyAffinityScorer(p) => j(p),
            HeaderLabelAffinityScorer(p) => j(p),
            TopologyExtractor(p) => j(p),
            SessionAffinityScorer(p) => j(p),
            FileDiscovery(p) => j(p),
            PrefixCacheScorer(p) => prefix_scorer_json(p),
            ApproxPrefixCacheProducer(p) => j(p),
            InflightLoadProducer(p) => j(p),
            BurstPrefixCacheProducer(p) => j(p),
            PrecisePrefixCacheProducer(p) | PrecisePrefixCacheScorer(p) => j(p),
            TokenProducer(p) => j(p),
            LoadAwareScorer(p) => j(p),
            ActiveRequestScorer(p) => j(p),
            NoHitLruScorer(p) => j(p),
            TokenLoadScorer(p) => j(p),
            MaxScorePicker(p) | RandomPicker(p) | WeightedRandomPicker(p) => j(p),
            DisaggProfileHandler(p) => j(p),
            PdProfileHandler(p) => j(p),
            PrefixBasedPdDecider(p) => j(p),
            MetricsDataSource(p) => j(p),
            CoreMetricsExtractor(p) => j(p),
            UtilizationDetector(p) => j(p),
            ConcurrencyDetector(p) => j(p),
            StaticUsageLimitPolicy(p) => j(p),
            PriorityHoldbackPolicy(p) => j(p),
            FairShareHoldbackPolicy(p) => j(p),
            ProgramAwareFairness(p) => j(p),
            DecodeFilter
            | PrefillFilter
            | EncodeFilter
            | KvCacheUtilizationScorer
            | QueueScorer
            | RunningRequestsSizeScorer
            | PrefillLoadScorer
            | LoraAffinityScorer
            | SingleProfileHandler
            | AlwaysDisaggPdDecider
            | AlwaysDisaggMultimodalDecider
            | Parser(_)
            | HeaderBasedTestingFilter
            | DestinationEndpointServedVerifier
            | SoftReflectiveCeilingPolicy
            | GlobalStrictFairnessPolicy
            | RoundRobinFairnessPolicy
            | FcfsOrderingPolicy
            | EdfOrderingPolicy
            | SloDeadlineOrderingPolicy
            | SheddableEvictionFilter
            | EndpointNotificationSource
            | PriorityThenTimeEvictionOrderPolicy => "{}".into(),
        }
    }
}

/// Why parsing one plugin failed (the loader adds the plugin name and location).
#[derive(Debug, Clone, PartialEq)]
pub enum SpecError {
    /// Unknown type name.
    UnknownType,
    /// Known llm-d type that infermesh does not implement.
    Unsupported(String),
    /// A parameter problem: (field path, message).
    Param(String, String),
}

fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Mapping(m)) => m.is_empty(),
        _ => false,
    }
}

fn parse<T: DeserializeOwned + Default>(v: Option<&Value>) -> Result<T, SpecError> {
    if is_empty(v) {
        return Ok(T::default());
    }
    let v = v.cloned().unwrap_or(Value::Null);
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let mut path = e.path().to_string();
        let msg = e.inner().to_string();
        if let Some(rest) = msg.strip_prefix("unknown field `")
            && let Some(end) = rest.find('`')
        {
            let field = &rest[..end];
            if path == "." {
                path = field.to_owned();
            } else if !path.ends_with(field) {
                path = format!("{path}.{field}");
            }
        }
        if path == "." {
            path = "parameters".into();
        }
        SpecError::Param(path, msg)
    })
}

/// Splits a `prefix-cache-scorer` mapping into the scorer's own keys and the rest (GIE 1.x
/// producer parameters), each `None` when empty; a non-mapping value gives `(None, None)`.
fn split_prefix_scorer(v: Option<&Value>) -> (Option<Value>, Option<Value>) {
    let Some(Value::Mapping(m)) = v else {
        return (None, None);
    };
    let (mut own, mut rest) = (serde_yaml_ng::Mapping::new(), serde_yaml_ng::Mapping::new());
    for (k, val) in m {
        let mine = k
            .as_str()
            .is_some_and(|k| PrefixScorerParams::FIELDS.contains(&k));
        if mine { &mut own } else { &mut rest }.insert(k.clone(), val.clone());
    }
    let some = |m: serde_yaml_ng::Mapping| (!m.is_empty()).then_some(Value::Mapping(m));
    (some(own), some(rest))
}

/// The scorer's parameters with any GIE 1.x producer parameters beside them.
fn prefix_scorer_json(p: &PrefixScorerParams) -> String {
    let Some(pp) = &p.producer else {
        return serde_json::to_string(p).unwrap_or_else(|e| format!("<{e}>"));
    };
    let mut v = serde_json::to_value(p).unwrap_or_default();
    if let (Some(obj), Ok(serde_json::Value::Object(extra))) =
        (v.as_object_mut(), serde_json::to_value(pp))
    {
        obj.extend(extra);
    }
    v.to_string()
}

fn none(v: Option<&Value>) -> Result<(), SpecError> {
    parse::<NoParamsDefault>(v).map(|_| ())
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoParamsDefault {}

fn check(r: Result<(), ParamProblem>) -> Result<(), SpecError> {
    r.map_err(|(f, m)| SpecError::Param(f, m))
}

/// llm-d plugin types infermesh knows but does not implement, with the reason.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "k8s-notification-source",
        "infermesh takes endpoints from its own pool configuration",
    ),
    ("models-data-source", "not implemented"),
    ("models-data-extractor", "not implemented"),
    ("latency-scorer", "it needs the latency-predictor sidecar"),
    (
        "predicted-latency-producer",
        "it needs the latency-predictor sidecar",
    ),
    (
        "slo-headroom-tier-filter",
        "it needs the latency-predictor sidecar",
    ),
    (
        "latency-slo-admitter",
        "it needs the latency-predictor sidecar",
    ),
    ("probabilistic-admitter", "not implemented"),
    ("context-length-aware", "not implemented"),
    (
        "disagg-headers-handler",
        "deprecated in llm-d; use disagg-profile-handler",
    ),
    (
        "prefill-header-handler",
        "deprecated in llm-d; use disagg-profile-handler",
    ),
    (
        "data-parallel-profile-handler",
        "deprecated in llm-d; use single-profile-handler",
    ),
    ("request-attribute-reporter", "not implemented"),
    (
        "vllmgrpc-parser",
        "infermesh reads HTTP bodies only (openai, anthropic, vllmhttp, passthrough parsers)",
    ),
    (
        "vertexai-parser",
        "infermesh reads HTTP bodies only (openai, anthropic, vllmhttp, passthrough parsers)",
    ),
    (
        "sglanghttp-parser",
        "not implemented (SGLang's /generate body is not read); passthrough-parser routes it by load",
    ),
    (
        "active-request-filter",
        "renamed utilization-filter in llm-d v0.10 (PR #2218, before any release shipped the old name); write utilization-filter with conditions: [{metric: active-requests, maxValue: N}]",
    ),
    (
        "session-affinity-filter",
        "not implemented; session-affinity-scorer gives the soft preference",
    ),
    ("session-id-producer", "not implemented"),
    ("endpoint-attribute-filter", "not implemented"),
    ("endpoint-attribute-scorer", "not implemented"),
    ("header-profile-handler", "not implemented"),
    ("disaggregatedset-rollout-screener", "not implemented"),
    ("disaggregatedset-rollout-pod-extractor", "not implemented"),
    ("p2p-source-producer", "not implemented"),
    ("agent-identity", "not implemented"),
    ("mm-embeddings-cache-producer", "not implemented"),
    ("mm-embeddings-cache-scorer", "not implemented"),
    (
        "dcgm-data-source",
        "infermesh scrapes only the model servers' /metrics",
    ),
    (
        "dcgm-extractor",
        "infermesh scrapes only the model servers' /metrics",
    ),
    (
        "local-syncer",
        "infermesh replicas share state over their own gossip mesh",
    ),
    (
        "multicluster-queue-scorer",
        "multicluster routing is not implemented",
    ),
    (
        "multicluster-kv-cache-utilization-scorer",
        "multicluster routing is not implemented",
    ),
    (
        "multicluster-prefix-cache-scorer",
        "multicluster routing is not implemented",
    ),
    (
        "multicluster-session-affinity-filter",
        "multicluster routing is not implemented",
    ),
    (
        "multicluster-approx-prefix-cache-producer",
        "multicluster routing is not implemented",
    ),
    (
        "multicluster-file-discovery",
        "multicluster routing is not implemented",
    ),
    (
        "multicluster-metrics-data-source",
        "multicluster routing is not implemented",
    ),
    (
        "multicluster-metrics-extractor",
        "multicluster routing is not implemented",
    ),
];

/// llm-d types registered at Alpha stability (`cmd/epp/runner/runner.go`) that infermesh
/// implements: llm-d refuses them unless `--allow-experimental-plugins` is set, and so does
/// the node.
pub const ALPHA_TYPES: &[&str] = &[
    "utilization-filter",
    "topology-affinity-filter",
    "topology-affinity-scorer",
    "topology-extractor",
    "header-label-affinity-scorer",
    "session-affinity-scorer",
    "sheddable-eviction-filter",
    "priority-then-time-eviction-order-policy",
    "priority-holdback-policy",
    "soft-reflective-ceiling-policy",
    "burst-prefix-cache-producer",
];

/// Old type names still accepted, with the current name and the llm-d release that
/// deprecated them.
pub const DEPRECATED_ALIASES: &[(&str, &str, &str)] = &[
    ("by-label-selector", "label-selector-filter", "v0.9.0"),
    ("by-label", "label-selector-filter", "v0.9.0"),
    ("pd-profile-handler", "disagg-profile-handler", "v0.7.0"),
    ("tokenizer", "token-producer", "v0.9.0"),
    (
        "precise-prefix-cache-scorer",
        "precise-prefix-cache-producer + prefix-cache-scorer",
        "v0.9.0",
    ),
];

/// What the registry makes of a type name (for `config check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameStatus {
    /// A current llm-d v0.10 name; `alpha` when llm-d needs `--allow-experimental-plugins`.
    Current {
        /// Registered at Alpha stability.
        alpha: bool,
    },
    /// An older name still accepted.
    Alias {
        /// The current name.
        current: &'static str,
        /// The llm-d release that deprecated it.
        since: &'static str,
    },
    /// A type infermesh adds; llm-d has none of this name.
    Own,
    /// A known llm-d name infermesh refuses, with the reason.
    Refused(&'static str),
    /// No llm-d type of this name is known.
    Unknown,
}

impl std::fmt::Display for NameStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameStatus::Current { alpha: false } => write!(f, "v0.10 name"),
            NameStatus::Current { alpha: true } => write!(
                f,
                "v0.10 name, Alpha in llm-d: needs --allow-experimental-plugins"
            ),
            NameStatus::Alias { current, since } => write!(
                f,
                "accepted older alias of `{current}` (deprecated in llm-d {since})"
            ),
            NameStatus::Own => write!(f, "infermesh's own type (not an llm-d name)"),
            NameStatus::Refused(why) => write!(f, "refused: {why}"),
            NameStatus::Unknown => write!(f, "refused: no llm-d plugin type has this name"),
        }
    }
}

/// Classifies a type name.
pub fn name_status(type_name: &str) -> NameStatus {
    if let Some((_, current, since)) = DEPRECATED_ALIASES.iter().find(|(t, ..)| *t == type_name) {
        return NameStatus::Alias { current, since };
    }
    if OWN_TYPES.contains(&type_name) {
        return NameStatus::Own;
    }
    if KNOWN_TYPES.contains(&type_name) {
        return NameStatus::Current {
            alpha: is_alpha(type_name),
        };
    }
    match UNSUPPORTED.iter().find(|(t, _)| *t == type_name) {
        Some((_, reason)) => NameStatus::Refused(reason),
        None => NameStatus::Unknown,
    }
}

/// Whether llm-d registers the type at Alpha stability.
pub fn is_alpha(type_name: &str) -> bool {
    ALPHA_TYPES.contains(&type_name)
}

/// Every llm-d type name the registry knows, accepted or refused, sorted.
pub fn all_names() -> Vec<(&'static str, NameStatus)> {
    let mut v: Vec<(&'static str, NameStatus)> = KNOWN_TYPES
        .iter()
        .chain(UNSUPPORTED.iter().map(|(t, _)| t))
        .map(|t| (*t, name_status(t)))
        .collect();
    v.sort_by_key(|(t, _)| *t);
    v
}

/// Accepted types that are infermesh's own, not llm-d's (a config using them runs on
/// infermesh only).
pub const OWN_TYPES: &[&str] = &["prefill-load-scorer", "fair-share-holdback-policy"];

/// All type names the registry accepts (canonical names and aliases).
pub const KNOWN_TYPES: &[&str] = &[
    "label-selector-filter",
    "by-label-selector",
    "by-label",
    "decode-filter",
    "prefill-filter",
    "encode-filter",
    "prefix-cache-affinity-filter",
    "utilization-filter",
    "topology-affinity-filter",
    "topology-affinity-scorer",
    "header-label-affinity-scorer",
    "topology-extractor",
    "file-discovery",
    "header-based-testing-filter",
    "destination-endpoint-served-verifier",
    "prefix-cache-scorer",
    "kv-cache-utilization-scorer",
    "queue-scorer",
    "running-requests-size-scorer",
    "lora-affinity-scorer",
    "load-aware-scorer",
    "active-request-scorer",
    "session-affinity-scorer",
    "no-hit-lru-scorer",
    "token-load-scorer",
    "prefill-load-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "disagg-profile-handler",
    "pd-profile-handler",
    "prefix-based-pd-decider",
    "always-disagg-pd-decider",
    "always-disagg-multimodal-decider",
    "approx-prefix-cache-producer",
    "inflight-load-producer",
    "burst-prefix-cache-producer",
    "precise-prefix-cache-producer",
    "precise-prefix-cache-scorer",
    "token-producer",
    "tokenizer",
    "endpoint-notification-source",
    "metrics-data-source",
    "core-metrics-extractor",
    "utilization-detector",
    "concurrency-detector",
    "openai-parser",
    "anthropic-parser",
    "vllmhttp-parser",
    "passthrough-parser",
    "global-strict-fairness-policy",
    "round-robin-fairness-policy",
    "program-aware-fairness",
    "fcfs-ordering-policy",
    "edf-ordering-policy",
    "slo-deadline-ordering-policy",
    "static-usage-limit-policy",
    "priority-holdback-policy",
    "fair-share-holdback-policy",
    "soft-reflective-ceiling-policy",
    "sheddable-eviction-filter",
    "priority-then-time-eviction-order-policy",
];

/// Parses one plugin's type and parameters.
pub fn parse_spec(type_name: &str, params: Option<&Value>) -> Result<PluginSpec, SpecError> {
    parse_spec_with_warnings(type_name, params).map(|(spec, _)| spec)
}

/// [`parse_spec`], also returning deprecation warnings (llm-d logs them and goes on).
pub fn parse_spec_with_warnings(
    type_name: &str,
    params: Option<&Value>,
) -> Result<(PluginSpec, Vec<String>), SpecError> {
    use PluginSpec as S;
    let mut warnings = Vec::new();
    let spec = match type_name {
        "label-selector-filter" | "by-label-selector" => {
            let p: LabelSelectorParams = parse(params)?;
            check(p.validate())?;
            S::LabelSelectorFilter(p)
        }
        "by-label" => {
            let p: ByLabelParams = parse(params)?;
            check(p.validate())?;
            S::ByLabel(p)
        }
        "decode-filter" => none(params).map(|_| S::DecodeFilter)?,
        "prefill-filter" => none(params).map(|_| S::PrefillFilter)?,
        "encode-filter" => none(params).map(|_| S::EncodeFilter)?,
        "header-based-testing-filter" => none(params).map(|_| S::HeaderBasedTestingFilter)?,
        "destination-endpoint-served-verifier" => {
            none(params).map(|_| S::DestinationEndpointServedVerifier)?
        }
        "prefix-cache-affinity-filter" => {
            let p: PrefixAffinityParams = parse(params)?;
            check(p.validate())?;
            S::PrefixCacheAffinityFilter(p)
        }
        "prefix-cache-scorer" => {
            let (own, producer) = split_prefix_scorer(params);
            // A non-mapping value goes to the scorer's parser, which names the problem.
            let whole = !matches!(params, Some(Value::Mapping(_)));
            let mut p: PrefixScorerParams = parse(if whole { params } else { own.as_ref() })?;
            check(p.validate())?;
            if let Some(rest) = producer {
                let pp: ApproxPrefixParams = parse(Some(&rest))?;
                check(pp.validate())?;
                p.producer = Some(pp);
            }
            S::PrefixCacheScorer(p)
        }
        "utilization-filter" => {
            let p: UtilizationFilterParams = parse(params)?;
            check(p.validate())?;
            S::UtilizationFilter(p)
        }
        "topology-affinity-filter" => S::TopologyAffinityFilter(parse(params)?),
        "topology-affinity-scorer" => S::TopologyAffinityScorer(parse(params)?),
        "header-label-affinity-scorer" => {
            let mut p: HeaderLabelAffinityParams = parse(params)?;
            check(p.normalize())?;
            S::HeaderLabelAffinityScorer(p)
        }
        "file-discovery" => {
            let p: FileDiscoveryParams = parse(params)?;
            check(p.validate())?;
            S::FileDiscovery(p)
        }
        "topology-extractor" => {
            let mut p: TopologyExtractorParams = parse(params)?;
            p.normalize();
            S::TopologyExtractor(p)
        }
        "kv-cache-utilization-scorer" => none(params).map(|_| S::KvCacheUtilizationScorer)?,
        "queue-scorer" => none(params).map(|_| S::QueueScorer)?,
        "running-requests-size-scorer" => none(params).map(|_| S::RunningRequestsSizeScorer)?,
        "prefill-load-scorer" => none(params).map(|_| S::PrefillLoadScorer)?,
        "lora-affinity-scorer" => none(params).map(|_| S::LoraAffinityScorer)?,
        "load-aware-scorer" => S::LoadAwareScorer(parse(params)?),
        "active-request-scorer" => {
            let p: ActiveRequestParams = parse(params)?;
            check(p.validate())?;
            S::ActiveRequestScorer(p)
        }
        "session-affinity-scorer" => {
            let mut p: SessionAffinityParams = parse(params)?;
            check(p.normalize())?;
            S::SessionAffinityScorer(p)
        }
        "no-hit-lru-scorer" => {
            let p: NoHitLruParams = parse(params)?;
            check(p.validate())?;
            S::NoHitLruScorer(p)
        }
        "token-load-scorer" => S::TokenLoadScorer(parse(params)?),
        "max-score-picker" | "random-picker" | "weighted-random-picker" => {
            let p: PickerParams = parse(params)?;
            check(p.validate())?;
            match type_name {
                "max-score-picker" => S::MaxScorePicker(p),
                "random-picker" => S::RandomPicker(p),
                _ => S::WeightedRandomPicker(p),
            }
        }
        "single-profile-handler" => none(params).map(|_| S::SingleProfileHandler)?,
        "disagg-profile-handler" => {
            let mut p: DisaggParams = parse(params)?;
            let nested_given = match params {
                Some(Value::Mapping(m)) => m.contains_key("profiles") || m.contains_key("deciders"),
                _ => false,
            };
            warnings = p
                .normalize(nested_given)
                .map_err(|(f, m)| SpecError::Param(f, m))?;
            S::DisaggProfileHandler(p)
        }
        "pd-profile-handler" => {
            let p: PdProfileParams = parse(params)?;
            warnings = p.validate().map_err(|(f, m)| SpecError::Param(f, m))?;
            S::PdProfileHandler(p)
        }
        "prefix-based-pd-decider" => {
            let p: PdDeciderParams = parse(params)?;
            check(p.validate())?;
            S::PrefixBasedPdDecider(p)
        }
        "always-disagg-pd-decider" => none(params).map(|_| S::AlwaysDisaggPdDecider)?,
        "always-disagg-multimodal-decider" => {
            none(params).map(|_| S::AlwaysDisaggMultimodalDecider)?
        }
        "approx-prefix-cache-producer" => {
            let p: ApproxPrefixParams = parse(params)?;
            check(p.validate())?;
            S::ApproxPrefixCacheProducer(p)
        }
        "precise-prefix-cache-producer" | "precise-prefix-cache-scorer" => {
            let p: PrecisePrefixParams = parse(params)?;
            check(p.validate())?;
            warnings.extend(p.warnings());
            if type_name == "precise-prefix-cache-scorer" {
                warnings.push(
                    "precise-prefix-cache-scorer is deprecated in llm-d: write a precise-prefix-cache-producer and a prefix-cache-scorer with prefixMatchInfoProducerName".into(),
                );
                S::PrecisePrefixCacheScorer(p)
            } else {
                S::PrecisePrefixCacheProducer(p)
            }
        }
        "token-producer" | "tokenizer" => {
            let p: TokenProducerParams = parse(params)?;
            check(p.validate())?;
            if type_name == "tokenizer" {
                warnings.push("tokenizer is deprecated in llm-d; use token-producer".into());
            }
            S::TokenProducer(p)
        }
        "endpoint-notification-source" => none(params).map(|_| S::EndpointNotificationSource)?,
        "burst-prefix-cache-producer" => {
            let p: BurstPrefixParams = parse(params)?;
            check(p.validate())?;
            S::BurstPrefixCacheProducer(p)
        }
        "inflight-load-producer" => {
            let p: InflightLoadParams = parse(params)?;
            check(p.validate())?;
            if !p.prefix_match_info_producer_name.is_empty() {
                warnings.push(
                    "prefixMatchInfoProducerName: infermesh counts the whole prompt as in-flight tokens (no cached-prefix discount); the name is only checked against the prefix producer".into(),
                );
            }
            S::InflightLoadProducer(p)
        }
        "metrics-data-source" => {
            let p: MetricsDataSourceParams = parse(params)?;
            check(p.validate())?;
            S::MetricsDataSource(p)
        }
        "core-metrics-extractor" => {
            let mut p: CoreMetricsExtractorParams = parse(params)?;
            check(p.normalize())?;
            S::CoreMetricsExtractor(p)
        }
        "utilization-detector" => {
            let p: UtilizationParams = parse(params)?;
            check(p.validate())?;
            S::UtilizationDetector(p)
        }
        "concurrency-detector" => {
            let p: ConcurrencyParams = parse(params)?;
            check(p.validate())?;
            S::ConcurrencyDetector(p)
        }
        "openai-parser" => none(params).map(|_| S::Parser(ParserType::OpenAi))?,
        "anthropic-parser" => none(params).map(|_| S::Parser(ParserType::Anthropic))?,
        "vllmhttp-parser" => none(params).map(|_| S::Parser(ParserType::VllmHttp))?,
        "passthrough-parser" => none(params).map(|_| S::Parser(ParserType::Passthrough))?,
        "global-strict-fairness-policy" => none(params).map(|_| S::GlobalStrictFairnessPolicy)?,
        "round-robin-fairness-policy" => none(params).map(|_| S::RoundRobinFairnessPolicy)?,
        "program-aware-fairness" => {
            let p: ProgramAwareFairnessParams = parse(params)?;
            check(p.validate())?;
            S::ProgramAwareFairness(p)
        }
        "fcfs-ordering-policy" => none(params).map(|_| S::FcfsOrderingPolicy)?,
        "edf-ordering-policy" => none(params).map(|_| S::EdfOrderingPolicy)?,
        "slo-deadline-ordering-policy" => none(params).map(|_| S::SloDeadlineOrderingPolicy)?,
        "static-usage-limit-policy" => {
            let p: StaticUsageLimitParams = parse(params)?;
            check(p.validate())?;
            S::StaticUsageLimitPolicy(p)
        }
        "priority-holdback-policy" => {
            let p: PriorityHoldbackParams = parse(params)?;
            check(p.validate())?;
            S::PriorityHoldbackPolicy(p)
        }
        "fair-share-holdback-policy" => {
            let p: FairShareHoldbackParams = parse(params)?;
            check(p.validate())?;
            S::FairShareHoldbackPolicy(p)
        }
        "soft-reflective-ceiling-policy" => none(params).map(|_| S::SoftReflectiveCeilingPolicy)?,
        "sheddable-eviction-filter" => none(params).map(|_| S::SheddableEvictionFilter)?,
        "priority-then-time-eviction-order-policy" => {
            none(params).map(|_| S::PriorityThenTimeEvictionOrderPolicy)?
        }
        other => {
            return Err(match UNSUPPORTED.iter().find(|(t, _)| *t == other) {
                Some((_, reason)) => SpecError::Unsupported((*reason).to_owned()),
                None => SpecError::UnknownType,
            });
        }
    };
    Ok((spec, warnings))
}

/// The default spec of a type (used when the loader adds a plugin by default).
pub fn default_spec(type_name: &str) -> Option<PluginSpec> {
    parse_spec(type_name, None).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_type_parses_with_defaults() {
        for t in KNOWN_TYPES {
            let r = parse_spec(t, None);
            // by-label needs a label, priority-holdback-policy its minCeiling,
            // utilization-filter a condition and header-label-affinity-scorer its header
            // (llm-d requires them all); everything else has usable defaults.
            if *t == "by-label" {
                assert!(matches!(r, Err(SpecError::Param(ref f, _)) if f == "label"));
            } else if *t == "file-discovery" {
                assert!(matches!(r, Err(SpecError::Param(ref f, _)) if f == "path"));
            } else if *t == "utilization-filter" {
                assert!(matches!(r, Err(SpecError::Param(ref f, _)) if f == "conditions"));
            } else if *t == "header-label-affinity-scorer" {
                assert!(matches!(r, Err(SpecError::Param(ref f, _)) if f == "headerName"));
            } else if *t == "priority-holdback-policy" || *t == "fair-share-holdback-policy" {
                assert!(matches!(r, Err(SpecError::Param(ref f, _)) if f == "minCeiling"));
            } else {
                let s = r.unwrap_or_else(|e| panic!("{t}: {e:?}"));
                if *t != "by-label-selector" && *t != "tokenizer" {
                    assert_eq!(s.type_name(), *t);
                }
            }
        }
    }

    #[test]
    fn infermesh_types_are_not_reported_as_llm_d_names() {
        for t in OWN_TYPES {
            assert!(KNOWN_TYPES.contains(t), "{t} is accepted");
            assert_eq!(name_status(t), NameStatus::Own, "{t}");
            assert!(
                !is_alpha(t),
                "{t}: llm-d's Alpha flag is for llm-d's plugins"
            );
        }
        assert_eq!(
            name_status("priority-holdback-policy"),
            NameStatus::Current { alpha: true }
        );
        assert!(NameStatus::Own.to_string().contains("not an llm-d name"));
    }

    #[test]
    fn unknown_field_is_named() {
        let v: Value = serde_yaml_ng::from_str("{threshold: 3, bogus: 1}").unwrap();
        assert_eq!(
            parse_spec("load-aware-scorer", Some(&v)).unwrap_err(),
            SpecError::Param(
                "bogus".into(),
                "unknown field `bogus`, expected `threshold`".into()
            )
        );
        let v: Value = serde_yaml_ng::from_str("{threshold: abc}").unwrap();
        assert!(
            matches!(parse_spec("load-aware-scorer", Some(&v)), Err(SpecError::Param(f, _)) if f == "threshold")
        );
        let v: Value = serde_yaml_ng::from_str("{x: 1}").unwrap();
        assert!(
            matches!(parse_spec("queue-scorer", Some(&v)), Err(SpecError::Param(f, _)) if f == "x")
        );
    }
}
