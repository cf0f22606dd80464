//! Typed parameters of every built-in plugin, with llm-d's defaults.
//!
//! Each struct rejects unknown fields; a value that is out of range is reported by
//! `validate` with the field's name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A range/consistency problem in one parameter: (field, reason).
pub type ParamProblem = (String, String);

fn problem(field: &str, reason: impl Into<String>) -> ParamProblem {
    (field.to_owned(), reason.into())
}

/// `label-selector-filter` / `by-label-selector`: a Kubernetes label selector.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LabelSelectorParams {
    /// Labels that must be present with exactly these values.
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// Values for `In` / `NotIn`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// A label selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is not in `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelectorParams {
    /// Kubernetes rules: In/NotIn need values; Exists/DoesNotExist must have none.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        for (i, e) in self.match_expressions.iter().enumerate() {
            let field = format!("matchExpressions[{i}].values");
            match e.operator {
                SelectorOperator::In | SelectorOperator::NotIn if e.values.is_empty() => {
                    return Err(problem(&field, "must be non-empty for In/NotIn"));
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !e.values.is_empty() =>
                {
                    return Err(problem(&field, "must be empty for Exists/DoesNotExist"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `by-label` (deprecated): exact-match label filter.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ByLabelParams {
    /// Label key (required).
    pub label: String,
    /// Accepted values.
    pub valid_values: Vec<String>,
    /// Keep pods that do not carry the label.
    pub allows_no_label: bool,
}

impl ByLabelParams {
    /// llm-d: `label` is required; `validValues` must be non-empty unless `allowsNoLabel`.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.label.is_empty() {
            return Err(problem("label", "must be specified"));
        }
        if self.valid_values.is_empty() && !self.allows_no_label {
            return Err(problem(
                "validValues",
                "must be non-empty unless allowsNoLabel is true",
            ));
        }
        Ok(())
    }
}

/// `prefix-cache-affinity-filter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PrefixAffinityParams {
    /// Minimum prefix score for an endpoint to count as sticky.
    pub affinity_threshold: f64,
    /// Probability of skipping the gate (exploration).
    pub exploration_probability: f64,
    /// TTFT penalty (ms) beyond which stickiness is broken (needs latency predictions).
    #[serde(rename = "maxTTFTPenaltyMs")]
    pub max_ttft_penalty_ms: f64,
}

impl Default for PrefixAffinityParams {
    fn default() -> Self {
        PrefixAffinityParams {
            affinity_threshold: 0.80,
            exploration_probability: 0.01,
            max_ttft_penalty_ms: 5000.0,
        }
    }
}

impl PrefixAffinityParams {
    /// llm-d's ranges.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.affinity_threshold.is_nan() || self.affinity_threshold > 1.0 {
            return Err(problem("affinityThreshold", "must be <= 1.0"));
        }
        if !(0.0..=1.0).contains(&self.exploration_probability) {
            return Err(problem("explorationProbability", "must be in [0, 1]"));
        }
        if self.max_ttft_penalty_ms.is_nan() || self.max_ttft_penalty_ms < 0.0 {
            return Err(problem("maxTTFTPenaltyMs", "must be >= 0"));
        }
        Ok(())
    }
}

/// `approx-prefix-cache-producer` (also accepted on `prefix-cache-scorer`, GIE 1.x style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ApproxPrefixParams {
    /// Take block size and LRU capacity from the endpoints' cache info.
    pub auto_tune: bool,
    /// Tokens per block (× 4 bytes per token).
    pub block_size_tokens: i64,
    /// Most blocks hashed per request.
    pub max_prefix_blocks_to_match: i64,
    /// When > 0, overrides `maxPrefixBlocksToMatch` as `tokens / blockSizeTokens`.
    pub max_prefix_tokens_to_match: i64,
    /// Blocks remembered per endpoint when autoTune has no cache info.
    pub lru_capacity_per_server: i64,
    /// Deprecated block size in characters (rejected unless blockSizeTokens is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<i64>,
}

impl Default for ApproxPrefixParams {
    fn default() -> Self {
        ApproxPrefixParams {
            auto_tune: true,
            block_size_tokens: 16,
            max_prefix_blocks_to_match: 256,
            max_prefix_tokens_to_match: 0,
            lru_capacity_per_server: 31250,
            block_size: None,
        }
    }
}

impl ApproxPrefixParams {
    /// llm-d's checks (`newDataProducer`) plus non-negativity.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.block_size.is_some_and(|b| b > 0) && self.block_size_tokens <= 0 {
            return Err(problem(
                "blockSize",
                "is deprecated; use blockSizeTokens to set the block size in tokens",
            ));
        }
        if !self.auto_tune && self.block_size_tokens <= 0 {
            return Err(problem(
                "blockSizeTokens",
                "must be > 0 when autoTune is disabled",
            ));
        }
        if self.block_size_tokens < 0 {
            return Err(problem("blockSizeTokens", "must be >= 0"));
        }
        if self.max_prefix_blocks_to_match < 0 {
            return Err(problem("maxPrefixBlocksToMatch", "must be >= 0"));
        }
        if self.max_prefix_tokens_to_match < 0 {
            return Err(problem("maxPrefixTokensToMatch", "must be >= 0"));
        }
        if self.lru_capacity_per_server <= 0 {
            return Err(problem("lruCapacityPerServer", "must be > 0"));
        }
        Ok(())
    }
}

/// `prefix-cache-scorer` (llm-d v0.10): how the match ratio and the absolute match length
/// combine into the score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PrefixScorerParams {
    /// Weight of `min(1, matchedTokens / matchLengthScaleTokens)²` in the score, in [0, 1];
    /// the rest goes to `matchBlocks / totalBlocks`. 0 (the default) scores the ratio only.
    pub match_length_weight: f64,
    /// Matched tokens at which the length term saturates (llm-d suggests the P95 prompt
    /// length); must be > 0 when `matchLengthWeight` > 0.
    pub match_length_scale_tokens: i64,
    /// The prefix producer whose match data is scored (empty: the one configured).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix_match_info_producer_name: String,
    /// GIE 1.x producer parameters written on the scorer (the loader moves them to the
    /// producer it adds).
    #[serde(skip)]
    pub producer: Option<ApproxPrefixParams>,
}

impl Default for PrefixScorerParams {
    fn default() -> Self {
        PrefixScorerParams {
            match_length_weight: 0.0,
            match_length_scale_tokens: 8192,
            prefix_match_info_producer_name: String::new(),
            producer: None,
        }
    }
}

impl PrefixScorerParams {
    /// The YAML keys this struct owns (the rest of a `prefix-cache-scorer` mapping are
    /// GIE 1.x producer parameters).
    pub const FIELDS: [&'static str; 3] = [
        "matchLengthWeight",
        "matchLengthScaleTokens",
        "prefixMatchInfoProducerName",
    ];

    /// llm-d's checks: the weight in [0, 1]; the scale positive whenever the weight is.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if !(0.0..=1.0).contains(&self.match_length_weight) {
            return Err(problem("matchLengthWeight", "must be in [0, 1]"));
        }
        if self.match_length_weight > 0.0 && self.match_length_scale_tokens <= 0 {
            return Err(problem(
                "matchLengthScaleTokens",
                "must be > 0 when matchLengthWeight is > 0",
            ));
        }
        Ok(())
    }
}

/// `inflight-load-producer` (llm-d v0.10): what a dispatched request adds to its
/// endpoint's in-flight token count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct InflightLoadParams {
    /// Also count an estimate of the request's output tokens.
    pub add_estimated_output_tokens: bool,
    /// Estimated output tokens per prompt token (`round(prompt × outputRatio)`), >= 0.
    pub output_ratio: f64,
    /// Upper bound on the output estimate, >= 0 (unset: no bound beyond `max_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_estimated_output_tokens: Option<i64>,
    /// The prefix producer whose match data the producer reads (empty: the one configured).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix_match_info_producer_name: String,
}

impl Default for InflightLoadParams {
    fn default() -> Self {
        InflightLoadParams {
            add_estimated_output_tokens: false,
            output_ratio: 1.5,
            max_estimated_output_tokens: None,
            prefix_match_info_producer_name: String::new(),
        }
    }
}

impl InflightLoadParams {
    /// llm-d's checks: a finite, non-negative ratio and a non-negative cap.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if !self.output_ratio.is_finite() || self.output_ratio < 0.0 {
            return Err(problem("outputRatio", "must be a finite number >= 0"));
        }
        if self.max_estimated_output_tokens.is_some_and(|m| m < 0) {
            return Err(problem("maxEstimatedOutputTokens", "must be >= 0"));
        }
        Ok(())
    }

    /// Estimated output tokens for a prompt of `prompt_tokens`: `round(prompt ×
    /// outputRatio)`, bounded by the client's `max_tokens` and `maxEstimatedOutputTokens`
    /// (llm-d `SimpleTokenEstimator.EstimateOutput`).
    pub fn estimated_output_tokens(&self, prompt_tokens: u64, max_tokens: Option<u32>) -> u64 {
        if prompt_tokens == 0 {
            return 0;
        }
        // Saturating float-to-int cast: a huge ratio cannot wrap.
        let mut est = (prompt_tokens as f64 * self.output_ratio).round() as u64;
        if let Some(m) = max_tokens {
            est = est.min(u64::from(m));
        }
        if let Some(cap) = self.max_estimated_output_tokens {
            est = est.min(u64::try_from(cap).unwrap_or(0));
        }
        est
    }

    /// In-flight tokens a request adds to its endpoint: its prompt tokens, plus the output
    /// estimate when `addEstimatedOutputTokens` is on.
    pub fn request_tokens(&self, prompt_tokens: u64, max_tokens: Option<u32>) -> u64 {
        if self.add_estimated_output_tokens {
            prompt_tokens.saturating_add(self.estimated_output_tokens(prompt_tokens, max_tokens))
        } else {
            prompt_tokens
        }
    }
}

/// `load-aware-scorer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LoadAwareParams {
    /// Queue length at which the score reaches 0 (<= 0 falls back to 128, as llm-d).
    pub threshold: i64,
}

impl Default for LoadAwareParams {
    fn default() -> Self {
        LoadAwareParams { threshold: 128 }
    }
}

/// `active-request-scorer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ActiveRequestParams {
    /// In-flight count at or below which an endpoint scores 1.0.
    pub idle_threshold: i64,
    /// Score ceiling for busy endpoints, in [0, 1].
    pub max_busy_score: f64,
    /// Deprecated and ignored by llm-d; accepted for compatibility.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
}

impl Default for ActiveRequestParams {
    fn default() -> Self {
        ActiveRequestParams {
            idle_threshold: 0,
            max_busy_score: 1.0,
            request_timeout: None,
        }
    }
}

impl ActiveRequestParams {
    /// Ranges (llm-d silently falls back; a typo should not go unnoticed here).
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.idle_threshold < 0 {
            return Err(problem("idleThreshold", "must be >= 0"));
        }
        if !(0.0..=1.0).contains(&self.max_busy_score) {
            return Err(problem("maxBusyScore", "must be in [0, 1]"));
        }
        Ok(())
    }
}

/// `no-hit-lru-scorer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct NoHitLruParams {
    /// Type of the prefix plugin whose match data marks a request warm.
    pub prefix_plugin_type: String,
    /// Name of that plugin.
    pub prefix_plugin_name: String,
    /// Endpoints remembered in the LRU.
    pub lru_size: i64,
}

impl Default for NoHitLruParams {
    fn default() -> Self {
        NoHitLruParams {
            prefix_plugin_type: "prefix-cache-scorer".into(),
            prefix_plugin_name: "prefix-cache-scorer".into(),
            lru_size: 1024,
        }
    }
}

impl NoHitLruParams {
    /// `lruSize` must be positive.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.lru_size <= 0 {
            return Err(problem("lruSize", "must be > 0"));
        }
        Ok(())
    }
}

/// `token-load-scorer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenLoadParams {
    /// In-flight tokens at which the score reaches 0.
    pub queue_threshold_tokens: i64,
}

impl Default for TokenLoadParams {
    fn default() -> Self {
        TokenLoadParams {
            queue_threshold_tokens: 4_194_304,
        }
    }
}

/// Parameters every picker takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PickerParams {
    /// Endpoints returned: the primary plus fallbacks.
    pub max_num_of_endpoints: i64,
}

impl Default for PickerParams {
    fn default() -> Self {
        PickerParams {
            max_num_of_endpoints: 1,
        }
    }
}

impl PickerParams {
    /// Must be >= 1 (llm-d silently resets <= 0 to 1; we say so instead).
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.max_num_of_endpoints < 1 {
            return Err(problem("maxNumOfEndpoints", "must be >= 1"));
        }
        Ok(())
    }
}

/// `disagg-profile-handler` profile names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisaggProfiles {
    /// Decode profile (always runs; primary).
    pub decode: String,
    /// Prefill profile.
    pub prefill: String,
    /// Encode profile.
    pub encode: String,
}

impl Default for DisaggProfiles {
    fn default() -> Self {
        DisaggProfiles {
            decode: "decode".into(),
            prefill: "prefill".into(),
            encode: "encode".into(),
        }
    }
}

/// `disagg-profile-handler` decider plugin names.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisaggDeciders {
    /// Decider for running the prefill profile (none = never).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefill: String,
    /// Decider for running the encode profile (none = never).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encode: String,
}

/// `disagg-profile-handler` `stageOrder`: which stage runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum StageOrder {
    /// Decode → encode → prefill: the prefill decider sees the chosen decode endpoint.
    #[default]
    #[serde(rename = "decode-first")]
    DecodeFirst,
    /// Prefill (whenever its profile exists) → encode → decode.
    #[serde(rename = "prefill-first")]
    PrefillFirst,
}

impl StageOrder {
    /// llm-d's lenient spelling: case, `-` and `_` are ignored; "" and `decode` mean
    /// decode-first, `prefill` means prefill-first.
    pub fn parse(s: &str) -> Result<StageOrder, String> {
        let folded: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_lowercase();
        match folded.as_str() {
            "" | "decodefirst" | "decode" => Ok(StageOrder::DecodeFirst),
            "prefillfirst" | "prefill" => Ok(StageOrder::PrefillFirst),
            _ => Err(format!(
                "invalid stage order {s:?}, must be \"decode-first\" or \"prefill-first\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for StageOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StageOrder::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `disagg-profile-handler` (nested form, or llm-d's deprecated flat form).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DisaggParams {
    /// Stage order (default decode-first).
    pub stage_order: StageOrder,
    /// Profile names.
    pub profiles: DisaggProfiles,
    /// Decider plugin names.
    pub deciders: DisaggDeciders,
    /// Deprecated: `profiles.decode`.
    #[serde(skip_serializing)]
    pub decode_profile: Option<String>,
    /// Deprecated: `profiles.prefill`.
    #[serde(skip_serializing)]
    pub prefill_profile: Option<String>,
    /// Deprecated: `profiles.encode`.
    #[serde(skip_serializing)]
    pub encode_profile: Option<String>,
    /// Deprecated: `deciders.prefill`.
    #[serde(skip_serializing)]
    pub prefill_decider_plugin_name: Option<String>,
    /// Deprecated: `deciders.encode`.
    #[serde(skip_serializing)]
    pub encode_decider_plugin_name: Option<String>,
    /// Deprecated: `deciders.prefill`.
    #[serde(skip_serializing)]
    pub decider_plugin_name: Option<String>,
}

impl DisaggParams {
    /// Folds the deprecated flat fields into the nested ones (mixing both is an error) and
    /// returns a deprecation warning per flat field used, worded as llm-d logs it.
    pub fn normalize(&mut self, nested_given: bool) -> Result<Vec<String>, ParamProblem> {
        let legacy = [
            (
                "decodeProfile",
                "profiles.decode",
                self.decode_profile.take(),
            ),
            (
                "prefillProfile",
                "profiles.prefill",
                self.prefill_profile.take(),
            ),
            (
                "encodeProfile",
                "profiles.encode",
                self.encode_profile.take(),
            ),
            (
                "prefillDeciderPluginName",
                "deciders.prefill",
                self.prefill_decider_plugin_name.take(),
            ),
            (
                "encodeDeciderPluginName",
                "deciders.encode",
                self.encode_decider_plugin_name.take(),
            ),
            (
                "deciderPluginName",
                "deciders.prefill",
                self.decider_plugin_name.take(),
            ),
        ];
        let any_legacy = legacy
            .iter()
            .any(|(_, _, v)| v.as_deref().is_some_and(|s| !s.is_empty()));
        if any_legacy && nested_given {
            let field = legacy
                .iter()
                .find(|(_, _, v)| v.is_some())
                .map_or("profiles", |(f, _, _)| f);
            return Err(problem(
                field,
                "cannot mix deprecated flat parameters with nested profiles/deciders",
            ));
        }
        let mut warnings = Vec::new();
        for (field, replacement, value) in legacy {
            let Some(v) = value.filter(|s| !s.is_empty()) else {
                continue;
            };
            let target = match field {
                "decodeProfile" => &mut self.profiles.decode,
                "prefillProfile" => &mut self.profiles.prefill,
                "encodeProfile" => &mut self.profiles.encode,
                "prefillDeciderPluginName" => &mut self.deciders.prefill,
                "encodeDeciderPluginName" => &mut self.deciders.encode,
                // The lower-priority alias: prefillDeciderPluginName wins over it.
                _ if !self.deciders.prefill.is_empty() => continue,
                _ => &mut self.deciders.prefill,
            };
            *target = v;
            warnings.push(format!(
                "deprecated parameter `{field}`, use `{replacement}` instead"
            ));
        }
        for (field, v) in [
            ("profiles.decode", &mut self.profiles.decode),
            ("profiles.prefill", &mut self.profiles.prefill),
            ("profiles.encode", &mut self.profiles.encode),
        ] {
            if v.is_empty() {
                *v = field.trim_start_matches("profiles.").to_owned();
            }
        }
        if self.stage_order == StageOrder::PrefillFirst && !self.deciders.prefill.is_empty() {
            return Err(problem(
                "deciders.prefill",
                "prefill decider is not supported in prefill-first stage order",
            ));
        }
        Ok(warnings)
    }
}

/// The deprecated `pd-profile-handler`: P/D only, run on the disagg handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PdProfileParams {
    /// Decode profile name.
    pub decode_profile: String,
    /// Prefill profile name.
    pub prefill_profile: String,
    /// Deprecated in llm-d and never used there; accepted with a warning.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix_plugin_type: String,
    /// Deprecated in llm-d and never used there; accepted with a warning.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix_plugin_name: String,
    /// Data-parallel port rewrite (0 = off); infermesh refuses any other value.
    pub primary_port: i64,
    /// The prefill decider plugin (required).
    pub decider_plugin_name: String,
    /// Which prefix producer's match data the decider reads ("" = the one configured).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix_match_info_producer_name: String,
}

impl Default for PdProfileParams {
    fn default() -> Self {
        PdProfileParams {
            decode_profile: "decode".into(),
            prefill_profile: "prefill".into(),
            prefix_plugin_type: String::new(),
            prefix_plugin_name: String::new(),
            primary_port: 0,
            decider_plugin_name: "prefix-based-pd-decider".into(),
            prefix_match_info_producer_name: String::new(),
        }
    }
}

impl PdProfileParams {
    /// llm-d's checks, plus a refusal of `primaryPort` (infermesh has no data-parallel
    /// port rewrite); returns the deprecation warnings.
    pub fn validate(&self) -> Result<Vec<String>, ParamProblem> {
        if self.primary_port != 0 {
            if !(1..=65535).contains(&self.primary_port) {
                return Err(problem(
                    "primaryPort",
                    format!("must be between 1 and 65535, got {}", self.primary_port),
                ));
            }
            return Err(problem(
                "primaryPort",
                "data-parallel port rewriting is not supported by infermesh (deprecated in llm-d; not needed with Istio >= 1.28.1); remove it",
            ));
        }
        if self.decider_plugin_name.is_empty() {
            return Err(problem(
                "deciderPluginName",
                "decider plugin name is not defined",
            ));
        }
        for (field, v) in [
            ("decodeProfile", &self.decode_profile),
            ("prefillProfile", &self.prefill_profile),
        ] {
            if v.is_empty() {
                return Err(problem(field, "must not be empty"));
            }
        }
        let mut warnings =
            vec!["pd-profile-handler is deprecated, use disagg-profile-handler instead".to_owned()];
        for (field, v) in [
            ("prefixPluginType", &self.prefix_plugin_type),
            ("prefixPluginName", &self.prefix_plugin_name),
        ] {
            if !v.is_empty() {
                warnings.push(format!("deprecated parameter `{field}` is ignored"));
            }
        }
        Ok(warnings)
    }

    /// The equivalent `disagg-profile-handler` parameters (decode-first, no encode stage).
    pub fn to_disagg(&self) -> DisaggParams {
        DisaggParams {
            profiles: DisaggProfiles {
                decode: self.decode_profile.clone(),
                prefill: self.prefill_profile.clone(),
                ..DisaggProfiles::default()
            },
            deciders: DisaggDeciders {
                prefill: self.decider_plugin_name.clone(),
                encode: String::new(),
            },
            ..DisaggParams::default()
        }
    }
}

/// `prefix-based-pd-decider`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PdDeciderParams {
    /// Non-cached prompt tokens at which prefill is split off (0 = never).
    pub non_cached_tokens: i64,
    /// Prompts shorter than this many tokens never split (0 = no minimum).
    pub prompt_tokens: i64,
}

impl PdDeciderParams {
    /// Neither may be negative.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.non_cached_tokens < 0 {
            return Err(problem("nonCachedTokens", "cannot be negative"));
        }
        if self.prompt_tokens < 0 {
            return Err(problem("promptTokens", "cannot be negative"));
        }
        Ok(())
    }
}

/// `utilization-detector` (also GIE 1.x's `saturationDetector:` fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct UtilizationParams {
    /// Waiting-queue depth counted as full.
    pub queue_depth_threshold: i64,
    /// KV-cache usage counted as full, in (0, 1].
    pub kv_cache_util_threshold: f64,
    /// Metrics older than this count as saturated (Go duration, e.g. `200ms`).
    #[serde(with = "go_duration")]
    pub metrics_staleness_threshold: Duration,
    /// Extra room above the thresholds for the filter role.
    pub headroom: f64,
}

impl Default for UtilizationParams {
    fn default() -> Self {
        UtilizationParams {
            queue_depth_threshold: 5,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

impl UtilizationParams {
    /// llm-d's `validateConfig`.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.queue_depth_threshold <= 0 {
            return Err(problem("queueDepthThreshold", "must be strictly positive"));
        }
        if !(self.kv_cache_util_threshold > 0.0 && self.kv_cache_util_threshold <= 1.0) {
            return Err(problem("kvCacheUtilThreshold", "must be in (0.0, 1.0]"));
        }
        if self.metrics_staleness_threshold.is_zero() {
            return Err(problem(
                "metricsStalenessThreshold",
                "must be strictly positive",
            ));
        }
        if self.headroom.is_nan() || self.headroom < 0.0 {
            return Err(problem("headroom", "must be a non-negative value"));
        }
        Ok(())
    }
}

/// What `concurrency-detector` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    /// In-flight requests.
    #[default]
    Requests,
    /// In-flight tokens.
    Tokens,
    /// Both: an endpoint's load is the larger of its request and token ratios, and the
    /// pool's saturation is their mean over endpoints (llm-d v0.10).
    Hybrid,
}

/// `concurrency-detector`: saturation from in-flight load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConcurrencyParams {
    /// Count requests or tokens.
    pub concurrency_mode: ConcurrencyMode,
    /// In-flight requests an endpoint takes (requests mode).
    pub max_concurrency: i64,
    /// In-flight tokens an endpoint takes (tokens mode).
    pub max_token_concurrency: i64,
    /// Extra room above the limit for the filter role.
    pub headroom: f64,
    /// infermesh's own: requests still before their first token that an endpoint takes.
    /// A request that reaches a pod mid-prefill waits for that prefill, while decoding
    /// requests cost a new one little; when set, an endpoint's load is the larger of its
    /// counted ratio and its prefilling ratio, and the pool's saturation their mean.
    pub max_prefill_concurrency: Option<i64>,
}

impl Default for ConcurrencyParams {
    fn default() -> Self {
        ConcurrencyParams {
            concurrency_mode: ConcurrencyMode::Requests,
            max_concurrency: 100,
            max_token_concurrency: 1_000_000,
            headroom: 0.0,
            max_prefill_concurrency: None,
        }
    }
}

impl ConcurrencyParams {
    /// llm-d's `validateConfig`.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.max_concurrency <= 0 {
            return Err(problem("maxConcurrency", "must be strictly positive"));
        }
        if self.max_token_concurrency <= 0 {
            return Err(problem("maxTokenConcurrency", "must be strictly positive"));
        }
        if self.max_prefill_concurrency.is_some_and(|m| m <= 0) {
            return Err(problem(
                "maxPrefillConcurrency",
                "must be strictly positive",
            ));
        }
        if self.headroom.is_nan() || self.headroom < 0.0 {
            return Err(problem("headroom", "must be a non-negative value"));
        }
        Ok(())
    }
}

/// `metrics-data-source`: where the node's fetcher scrapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MetricsDataSourceParams {
    /// `http` or `https`.
    pub scheme: String,
    /// Metrics path.
    pub path: String,
    /// Skip TLS verification for https.
    pub insecure_skip_verify: bool,
}

impl Default for MetricsDataSourceParams {
    fn default() -> Self {
        MetricsDataSourceParams {
            scheme: "http".into(),
            path: "/metrics".into(),
            insecure_skip_verify: true,
        }
    }
}

impl MetricsDataSourceParams {
    /// Scheme must be http/https; path must be absolute.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.scheme != "http" && self.scheme != "https" {
            return Err(problem("scheme", "must be \"http\" or \"https\""));
        }
        if !self.path.starts_with('/') {
            return Err(problem("path", "must start with '/'"));
        }
        Ok(())
    }
}

/// One engine's metric names in `core-metrics-extractor`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct EngineConfig {
    /// Engine name, matched against the engine label.
    pub name: String,
    /// Waiting-queue metric spec.
    pub queued_requests_spec: String,
    /// Running-requests metric spec.
    pub running_requests_spec: String,
    /// KV usage metric spec.
    #[serde(rename = "kvUsageSpec")]
    pub kv_usage_spec: String,
    /// LoRA info metric spec.
    #[serde(rename = "loraSpec")]
    pub lora_spec: String,
    /// Cache info metric spec (labels carry block size and count).
    pub cache_info_spec: String,
    /// Label holding the block size on the cache info metric.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cache_block_size_label_name: String,
    /// Label holding the block count on the cache info metric.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cache_num_blocks_label_name: String,
    /// Metric whose value is the block size.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cache_block_size_spec: String,
    /// Metric whose value is the block count.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cache_num_blocks_spec: String,
}

/// `core-metrics-extractor`: metric names per engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CoreMetricsExtractorParams {
    /// Pod label naming the engine.
    pub engine_label_key: String,
    /// Engine assumed when the label is absent.
    pub default_engine: String,
    /// Engine configs; the built-in vllm/sglang/trtllm-serve/triton ones are appended
    /// unless overridden by name.
    pub engine_configs: Vec<EngineConfig>,
}

impl Default for CoreMetricsExtractorParams {
    fn default() -> Self {
        CoreMetricsExtractorParams {
            engine_label_key: "llm-d.ai/engine-type".into(),
            default_engine: "vllm".into(),
            engine_configs: Vec::new(),
        }
    }
}

/// llm-d's built-in engine metric names.
pub fn default_engine_configs() -> Vec<EngineConfig> {
    let e = |name: &str, q: &str, r: &str, kv: &str, lora: &str, ci: &str| EngineConfig {
        name: name.into(),
        queued_requests_spec: q.into(),
        running_requests_spec: r.into(),
        kv_usage_spec: kv.into(),
        lora_spec: lora.into(),
        cache_info_spec: ci.into(),
        ..EngineConfig::default()
    };
    let mut sglang = e(
        "sglang",
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        "",
        "sglang:cache_config_info",
    );
    sglang.cache_block_size_label_name = "page_size".into();
    sglang.cache_num_blocks_label_name = "num_pages".into();
    let mut trt = e(
        "trtllm-serve",
        "trtllm_num_requests_waiting",
        "trtllm_num_requests_running",
        "trtllm_kv_cache_utilization",
        "",
        "",
    );
    trt.cache_block_size_spec = "trtllm_kv_cache_tokens_per_block".into();
    trt.cache_num_blocks_spec = "trtllm_kv_cache_max_blocks".into();
    let mut triton = e(
        "triton-tensorrt-llm",
        "nv_trt_llm_request_metrics{request_type=waiting}",
        "nv_trt_llm_request_metrics{request_type=scheduled}",
        "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
        "",
        "",
    );
    triton.cache_block_size_spec =
        "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}".into();
    triton.cache_num_blocks_spec =
        "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}".into();
    vec![
        e(
            "vllm",
            "vllm:num_requests_waiting",
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            "vllm:lora_requests_info",
            "vllm:cache_config_info",
        ),
        sglang,
        trt,
        triton,
    ]
}

/// A parsed metric spec: `name` or `name{label=value,...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    /// Metric family name.
    pub name: String,
    /// Required label values.
    pub labels: BTreeMap<String, String>,
}

impl MetricSpec {
    /// Parses a spec string; `None` for the empty string (metric not provided).
    pub fn parse(spec: &str) -> Result<Option<MetricSpec>, String> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Ok(None);
        }
        let (name, rest) = match spec.find('{') {
            Some(i) => (&spec[..i], Some(&spec[i + 1..])),
            None => (spec, None),
        };
        let valid_name = !name.is_empty()
            && name.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            });
        if !valid_name {
            return Err(format!("invalid metric name {name:?} in spec {spec:?}"));
        }
        let mut labels = BTreeMap::new();
        if let Some(rest) = rest {
            let Some(body) = rest.strip_suffix('}') else {
                return Err(format!("missing '}}' in spec {spec:?}"));
            };
            for pair in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let Some((k, v)) = pair.split_once('=') else {
                    return Err(format!(
                        "label matcher {pair:?} in spec {spec:?} needs key=value"
                    ));
                };
                labels.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
            }
        }
        Ok(Some(MetricSpec {
            name: name.to_owned(),
            labels,
        }))
    }
}

impl CoreMetricsExtractorParams {
    /// Merges in llm-d's default engines and checks every spec and the default engine.
    pub fn normalize(&mut self) -> Result<(), ParamProblem> {
        if self.default_engine.is_empty() {
            self.default_engine = "vllm".into();
        }
        if self.engine_label_key.is_empty() {
            self.engine_label_key = "llm-d.ai/engine-type".into();
        }
        for d in default_engine_configs() {
            if !self.engine_configs.iter().any(|e| e.name == d.name) {
                self.engine_configs.push(d);
            }
        }
        for (i, e) in self.engine_configs.iter().enumerate() {
            if e.name.is_empty() {
                return Err(problem(
                    &format!("engineConfigs[{i}].name"),
                    "cannot be empty",
                ));
            }
            if e.name == "default" {
                return Err(problem(
                    &format!("engineConfigs[{i}].name"),
                    "\"default\" is reserved",
                ));
            }
            for (field, spec) in [
                ("queuedRequestsSpec", &e.queued_requests_spec),
                ("runningRequestsSpec", &e.running_requests_spec),
                ("kvUsageSpec", &e.kv_usage_spec),
                ("loraSpec", &e.lora_spec),
                ("cacheInfoSpec", &e.cache_info_spec),
                ("cacheBlockSizeSpec", &e.cache_block_size_spec),
                ("cacheNumBlocksSpec", &e.cache_num_blocks_spec),
            ] {
                MetricSpec::parse(spec)
                    .map_err(|r| problem(&format!("engineConfigs[{i}].{field}"), r))?;
            }
        }
        if !self
            .engine_configs
            .iter()
            .any(|e| e.name == self.default_engine)
        {
            return Err(problem(
                "defaultEngine",
                format!("{:?} not found in engineConfigs", self.default_engine),
            ));
        }
        Ok(())
    }
}

/// `program-aware-fairness`'s scoring strategy (llm-d supports only `las`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgramAwareStrategy {
    /// Least attained service.
    #[default]
    Las,
}

/// `program-aware-fairness`: least-attained-service fairness across programs (fairness
/// ids), llm-d's names and defaults; seconds as numbers, 0 meaning "off" for the
/// half-life and the eviction TTL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProgramAwareFairnessParams {
    /// The scoring strategy (`las`).
    pub strategy: ProgramAwareStrategy,
    /// Weight on the inverted attained service (0.8).
    pub las_weight_service: f64,
    /// Weight on the head-of-queue wait (0.2).
    pub las_weight_head_wait: f64,
    /// Half-life of attained service in seconds (60; 0: no decay).
    pub las_half_life_seconds: f64,
    /// Seconds after its last completion before an idle program is forgotten (3600; 0: never).
    pub eviction_ttl_seconds: f64,
    /// Seconds between eviction sweeps (300; must be > 0).
    pub eviction_sweep_seconds: f64,
}

impl Default for ProgramAwareFairnessParams {
    fn default() -> Self {
        let d = crate::flow::LasParams::default();
        let secs = |v: Option<std::time::Duration>| v.map_or(0.0, |d| d.as_secs_f64());
        ProgramAwareFairnessParams {
            strategy: ProgramAwareStrategy::Las,
            las_weight_service: d.weight_service,
            las_weight_head_wait: d.weight_head_wait,
            las_half_life_seconds: secs(d.half_life),
            eviction_ttl_seconds: secs(d.eviction_ttl),
            eviction_sweep_seconds: d.eviction_sweep.as_secs_f64(),
        }
    }
}

impl ProgramAwareFairnessParams {
    /// Weights, half-life and TTL finite and >= 0; the sweep interval finite and > 0.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        for (field, v) in [
            ("lasWeightService", self.las_weight_service),
            ("lasWeightHeadWait", self.las_weight_head_wait),
            ("lasHalfLifeSeconds", self.las_half_life_seconds),
            ("evictionTtlSeconds", self.eviction_ttl_seconds),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(problem(field, "must be a finite number >= 0"));
            }
        }
        if !self.eviction_sweep_seconds.is_finite() || self.eviction_sweep_seconds <= 0.0 {
            return Err(problem(
                "evictionSweepSeconds",
                "must be a finite number of seconds > 0",
            ));
        }
        // Durations past this overflow `Duration`; nobody means them.
        const MAX_SECS: f64 = 1e12;
        for (field, v) in [
            ("lasHalfLifeSeconds", self.las_half_life_seconds),
            ("evictionTtlSeconds", self.eviction_ttl_seconds),
            ("evictionSweepSeconds", self.eviction_sweep_seconds),
        ] {
            if v > MAX_SECS {
                return Err(problem(field, "is too large"));
            }
        }
        Ok(())
    }

    /// The flow controller's form (after [`validate`](Self::validate)).
    pub fn las(&self) -> crate::flow::LasParams {
        let positive = |s: f64| (s > 0.0).then(|| std::time::Duration::from_secs_f64(s));
        crate::flow::LasParams {
            weight_service: self.las_weight_service,
            weight_head_wait: self.las_weight_head_wait,
            half_life: positive(self.las_half_life_seconds),
            eviction_ttl: positive(self.eviction_ttl_seconds),
            eviction_sweep: std::time::Duration::from_secs_f64(self.eviction_sweep_seconds),
        }
    }
}

/// `static-usage-limit-policy`: one saturation ceiling for every priority band.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct StaticUsageLimitParams {
    /// Bands dispatch while pool saturation is below this (1.0: gate at saturation).
    pub threshold: f64,
}

impl Default for StaticUsageLimitParams {
    fn default() -> Self {
        StaticUsageLimitParams { threshold: 1.0 }
    }
}

impl StaticUsageLimitParams {
    /// A usable ceiling: finite and non-negative.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if !self.threshold.is_finite() || self.threshold < 0.0 {
            return Err(problem("threshold", "must be a finite number >= 0"));
        }
        Ok(())
    }
}

/// `priority-holdback-policy`'s interpolation curve (llm-d supports only `linear`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldbackShape {
    /// Ceilings evenly spaced between `minCeiling` and `maxCeiling`.
    #[default]
    Linear,
}

/// `priority-holdback-policy`: per-band ceilings from `maxCeiling` (highest priority) down
/// to `minCeiling` (lowest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PriorityHoldbackParams {
    /// Interpolation curve (`linear`).
    pub shape: HoldbackShape,
    /// `rank` (equal steps by rank) or `value` (proportional to the priority value).
    pub domain: crate::flow::HoldbackDomain,
    /// The lowest band's ceiling in `[0, 1)`; required, as in llm-d.
    pub min_ceiling: Option<f64>,
    /// The highest band's ceiling in `(0, 1]`.
    pub max_ceiling: f64,
}

impl Default for PriorityHoldbackParams {
    fn default() -> Self {
        PriorityHoldbackParams {
            shape: HoldbackShape::Linear,
            domain: crate::flow::HoldbackDomain::Rank,
            min_ceiling: None,
            max_ceiling: 1.0,
        }
    }
}

/// The default `underShare` of `fair-share-holdback-policy`.
pub const DEFAULT_UNDER_SHARE: f64 = 0.9;

/// `fair-share-holdback-policy` (infermesh's, not llm-d's): `priority-holdback-policy`'s
/// ceilings, and a flow of a `program-aware-fairness` band whose attained service is below
/// `underShare` of the mean of the band's queued flows may dispatch up to the next higher
/// band's ceiling. llm-d's usage limits see only a band's priority, so with one ceiling
/// per band a light tenant waits behind the heavy tenant's holdback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FairShareHoldbackParams {
    /// Interpolation curve (`linear`).
    pub shape: HoldbackShape,
    /// `rank` (equal steps by rank) or `value` (proportional to the priority value).
    pub domain: crate::flow::HoldbackDomain,
    /// The lowest band's ceiling in `[0, 1)`; required.
    pub min_ceiling: Option<f64>,
    /// The highest band's ceiling in `(0, 1]`.
    pub max_ceiling: f64,
    /// A flow is lifted while its attained service is below this share of its band's
    /// mean, in `(0, 1]`.
    pub under_share: f64,
}

impl Default for FairShareHoldbackParams {
    fn default() -> Self {
        let h = PriorityHoldbackParams::default();
        FairShareHoldbackParams {
            shape: h.shape,
            domain: h.domain,
            min_ceiling: h.min_ceiling,
            max_ceiling: h.max_ceiling,
            under_share: DEFAULT_UNDER_SHARE,
        }
    }
}

impl FairShareHoldbackParams {
    /// The ceilings as for `priority-holdback-policy`, and `underShare` in range.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        PriorityHoldbackParams {
            shape: self.shape,
            domain: self.domain,
            min_ceiling: self.min_ceiling,
            max_ceiling: self.max_ceiling,
        }
        .validate()?;
        if !(self.under_share > 0.0 && self.under_share <= 1.0) {
            return Err(problem("underShare", "must be in (0.0, 1.0]"));
        }
        Ok(())
    }
}

impl PriorityHoldbackParams {
    /// Both ceilings present, in range and in order.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        let Some(min) = self.min_ceiling else {
            return Err(problem(
                "minCeiling",
                "is required (the lowest priority's ceiling, in [0.0, 1.0))",
            ));
        };
        if !(0.0..1.0).contains(&min) {
            return Err(problem("minCeiling", "must be in [0.0, 1.0)"));
        }
        if !(self.max_ceiling > 0.0 && self.max_ceiling <= 1.0) {
            return Err(problem("maxCeiling", "must be in (0.0, 1.0]"));
        }
        if min > self.max_ceiling {
            return Err(problem(
                "minCeiling",
                "must not be above maxCeiling (the lowest priority would get the most room)",
            ));
        }
        Ok(())
    }
}

/// Go `time.Duration` strings (`300ms`, `1.5s`, `2m30s`) in YAML.
pub mod go_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses a Go duration string.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        if s.is_empty() || s.starts_with('-') {
            return Err(format!(
                "invalid duration {s:?}: must be like \"200ms\" or \"2s\""
            ));
        }
        let mut total = 0f64;
        let mut rest = s;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("invalid duration {s:?}: missing unit"))?;
            let value: f64 = rest[..num_end]
                .parse()
                .map_err(|_| format!("invalid duration {s:?}"))?;
            rest = &rest[num_end..];
            let unit_end = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_end] {
                "ns" => 1e-9,
                "us" | "µs" | "μs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                u => return Err(format!("invalid duration {s:?}: unknown unit {u:?}")),
            };
            total += value * scale;
            rest = &rest[unit_end..];
        }
        Duration::try_from_secs_f64(total).map_err(|_| format!("invalid duration {s:?}"))
    }

    /// Serializes as Go would print it, in milliseconds when whole.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_nanos().is_multiple_of(1_000_000) {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        } else {
            s.serialize_str(&format!("{}ns", d.as_nanos()))
        }
    }

    /// Deserializes a Go duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(
            go_duration::parse("200ms").unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(
            go_duration::parse("1m30s").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            go_duration::parse("1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(go_duration::parse("5").is_err());
        assert!(go_duration::parse("-1s").is_err());
        assert!(go_duration::parse("3d").is_err());
    }

    #[test]
    fn metric_specs() {
        let s = MetricSpec::parse("nv_trt{request_type=waiting}")
            .unwrap()
            .unwrap();
        assert_eq!(s.name, "nv_trt");
        assert_eq!(s.labels["request_type"], "waiting");
        assert_eq!(MetricSpec::parse("").unwrap(), None);
        assert!(MetricSpec::parse("bad name").is_err());
        assert!(MetricSpec::parse("x{a}").is_err());
    }
}

/// A `utilization-filter` condition's metric (llm-d's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UtilizationMetric {
    /// Requests the fleet routed to the endpoint and has not seen complete (running and
    /// queued: llm-d's `inflight-load-producer` count; here the load board's).
    ActiveRequests,
    /// `vllm:num_requests_running` from the last scrape.
    RunningRequests,
    /// `vllm:num_requests_waiting` from the last scrape.
    WaitingQueue,
    /// `vllm:kv_cache_usage_perc` from the last scrape, a fraction in [0, 1].
    KvCacheUtilization,
}

/// One cap of `utilization-filter`: an endpoint passes when `metric <= maxValue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UtilizationCondition {
    /// The signal compared.
    pub metric: UtilizationMetric,
    /// The largest value that still passes (required).
    #[serde(default)]
    pub max_value: Option<f64>,
}

/// `utilization-filter` (llm-d v0.10; the renamed `active-request-filter`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct UtilizationFilterParams {
    /// Caps an endpoint must all satisfy; at least one.
    pub conditions: Vec<UtilizationCondition>,
    /// When every endpoint is dropped, keep them all instead.
    pub fallback_on_empty: bool,
    /// `active-requests` only: the `inflight-load-producer` instance counted.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub in_flight_load_producer_name: String,
}

impl UtilizationFilterParams {
    /// llm-d's `NewUtilizationFilter` checks.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.conditions.is_empty() {
            return Err(problem("conditions", "at least one condition is required"));
        }
        for (i, c) in self.conditions.iter().enumerate() {
            let field = format!("conditions[{i}].maxValue");
            let Some(v) = c.max_value else {
                return Err((field, "is required".into()));
            };
            if v.is_nan() || v < 0.0 {
                return Err((field, format!("must be non-negative, got {v}")));
            }
            if c.metric == UtilizationMetric::KvCacheUtilization && v > 1.0 {
                return Err((
                    field,
                    format!("kv-cache-utilization is a fraction and must be at most 1, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// The pod label keys `topology-extractor` reads (llm-d's defaults: the Kubernetes
/// well-known topology labels; an empty value means the default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TopologyExtractorParams {
    /// Label holding the host name (`kubernetes.io/hostname`).
    pub hostname: String,
    /// Label holding the rack (`topology.kubernetes.io/rack`).
    pub rack: String,
    /// Label holding the zone (`topology.kubernetes.io/zone`).
    pub zone: String,
    /// Label holding the region (`topology.kubernetes.io/region`).
    pub region: String,
}

impl TopologyExtractorParams {
    /// `kubernetes.io/hostname`
    pub const DEFAULT_HOSTNAME: &'static str = "kubernetes.io/hostname";
    /// `topology.kubernetes.io/rack`
    pub const DEFAULT_RACK: &'static str = "topology.kubernetes.io/rack";
    /// `topology.kubernetes.io/zone`
    pub const DEFAULT_ZONE: &'static str = "topology.kubernetes.io/zone";
    /// `topology.kubernetes.io/region`
    pub const DEFAULT_REGION: &'static str = "topology.kubernetes.io/region";

    /// Empty label names take their defaults (llm-d's factory does the same).
    pub fn normalize(&mut self) {
        for (v, d) in [
            (&mut self.hostname, Self::DEFAULT_HOSTNAME),
            (&mut self.rack, Self::DEFAULT_RACK),
            (&mut self.zone, Self::DEFAULT_ZONE),
            (&mut self.region, Self::DEFAULT_REGION),
        ] {
            if v.is_empty() {
                d.clone_into(v);
            }
        }
    }
}

impl Default for TopologyExtractorParams {
    fn default() -> Self {
        let mut p = TopologyExtractorParams {
            hostname: String::new(),
            rack: String::new(),
            zone: String::new(),
            region: String::new(),
        };
        p.normalize();
        p
    }
}

/// A topology tier, tightest first (same host implies same rack, zone and region).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyLevel {
    /// Same host.
    #[default]
    Host,
    /// Same rack.
    Rack,
    /// Same zone.
    Zone,
    /// Same region.
    Region,
}

impl<'de> Deserialize<'de> for TopologyLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // llm-d reads an empty string as the default (`host`).
        match String::deserialize(d)?.as_str() {
            "" | "host" => Ok(TopologyLevel::Host),
            "rack" => Ok(TopologyLevel::Rack),
            "zone" => Ok(TopologyLevel::Zone),
            "region" => Ok(TopologyLevel::Region),
            other => Err(serde::de::Error::custom(format!(
                "invalid topology level `{other}`, must be one of host, rack, zone, region"
            ))),
        }
    }
}

/// `topology-affinity-filter`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TopologyAffinityFilterParams {
    /// The loosest tier a candidate may share with the peer pick and still pass.
    pub min_affinity: TopologyLevel,
    /// The `topology-extractor` instance read (empty: the one named `topology-extractor`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub topology_producer_name: String,
    /// The extractor's label keys, filled in by the loader (`None`: no such extractor,
    /// so no endpoint has a topology and the filter passes everything).
    #[serde(skip)]
    pub labels: Option<TopologyExtractorParams>,
}

/// `topology-affinity-scorer`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TopologyAffinityScorerParams {
    /// The `topology-extractor` instance read (empty: the one named `topology-extractor`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub topology_producer_name: String,
    /// The extractor's label keys, filled in by the loader (`None`: every score is 0).
    #[serde(skip)]
    pub labels: Option<TopologyExtractorParams>,
}

/// `header-label-affinity-scorer`: both fields are required.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HeaderLabelAffinityParams {
    /// The request header holding the preferred label value (matched case-insensitively).
    pub header_name: String,
    /// The endpoint label compared with it.
    pub label_key: String,
}

impl HeaderLabelAffinityParams {
    /// Both names are required; the header name is lower-cased (headers are stored so).
    pub fn normalize(&mut self) -> Result<(), ParamProblem> {
        if self.header_name.is_empty() {
            return Err(problem("headerName", "is required"));
        }
        if self.label_key.is_empty() {
            return Err(problem("labelKey", "is required"));
        }
        self.header_name.make_ascii_lowercase();
        Ok(())
    }
}

/// How `session-affinity-scorer` finds a session's endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SessionStrategy {
    /// Stateless: the client echoes a header naming the endpoint (written on responses).
    #[default]
    #[serde(rename = "encoded_endpoint_header")]
    EncodedEndpointHeader,
    /// Stateful: a client-chosen session id is bound to the endpoint that served it.
    #[serde(rename = "session_id")]
    SessionId,
}

/// `encodedEndpointHeaderConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct EncodedEndpointHeaderConfig {
    /// Request and response header carrying the base64 endpoint token.
    pub header: String,
}

impl Default for EncodedEndpointHeaderConfig {
    fn default() -> Self {
        EncodedEndpointHeaderConfig {
            header: "x-session-token".into(),
        }
    }
}

/// One `sessionIdConfig.sources` entry: exactly one of `header` or `attribute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SessionIdSource {
    /// A request header holding the session id.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub header: String,
    /// A request attribute published by an upstream plugin.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub attribute: String,
    /// The attribute's producer (with `attribute`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub producer: String,
}

/// `sessionIdConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SessionIdConfig {
    /// Where the session id is read, first non-empty wins (default: header `x-session-id`).
    pub sources: Vec<SessionIdSource>,
    /// How long an unused binding lives, seconds.
    pub eviction_ttl_seconds: f64,
    /// How often expired bindings are swept, seconds.
    pub eviction_sweep_seconds: f64,
}

impl Default for SessionIdConfig {
    fn default() -> Self {
        SessionIdConfig {
            sources: vec![SessionIdSource {
                header: "x-session-id".into(),
                ..SessionIdSource::default()
            }],
            eviction_ttl_seconds: 300.0,
            eviction_sweep_seconds: 10.0,
        }
    }
}

/// `session-affinity-scorer` (llm-d v0.10: a strategy with one config block each).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SessionAffinityParams {
    /// `encoded_endpoint_header` (default) or `session_id`.
    pub strategy: SessionStrategy,
    /// The profile whose pick is pinned (empty: the primary profile's).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub profile_name: String,
    /// Used with `encoded_endpoint_header`.
    pub encoded_endpoint_header_config: EncodedEndpointHeaderConfig,
    /// Used with `session_id`.
    pub session_id_config: SessionIdConfig,
}

impl SessionAffinityParams {
    /// llm-d's defaulting (empty values take defaults; header names are trimmed and
    /// lower-cased) and validation. `attribute` sources are refused: request attributes
    /// come from plugins infermesh does not run (e.g. `agent-identity`), so the source
    /// would never yield an id.
    pub fn normalize(&mut self) -> Result<(), ParamProblem> {
        let norm = |h: &str| {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty() { None } else { Some(h) }
        };
        let e = &mut self.encoded_endpoint_header_config;
        e.header = norm(&e.header).unwrap_or_else(|| EncodedEndpointHeaderConfig::default().header);
        if self.strategy != SessionStrategy::SessionId {
            return Ok(());
        }
        let c = &mut self.session_id_config;
        let d = SessionIdConfig::default();
        if c.sources.is_empty() {
            c.sources = d.sources;
        }
        if c.eviction_ttl_seconds == 0.0 {
            c.eviction_ttl_seconds = d.eviction_ttl_seconds;
        }
        if c.eviction_sweep_seconds == 0.0 {
            c.eviction_sweep_seconds = d.eviction_sweep_seconds;
        }
        for (i, s) in c.sources.iter_mut().enumerate() {
            if s.header.is_empty() == s.attribute.is_empty() {
                return Err((
                    format!("sessionIdConfig.sources[{i}]"),
                    "exactly one of header or attribute must be set".into(),
                ));
            }
            if !s.attribute.is_empty() {
                return Err((
                    format!("sessionIdConfig.sources[{i}].attribute"),
                    "request attributes come from plugins infermesh does not run (e.g. agent-identity); read the session id from a header".into(),
                ));
            }
            s.header = norm(&s.header).unwrap_or_default();
        }
        if !(c.eviction_ttl_seconds.is_finite() && c.eviction_ttl_seconds > 0.0) {
            return Err(problem(
                "sessionIdConfig.evictionTtlSeconds",
                format!("must be > 0, got {}", c.eviction_ttl_seconds),
            ));
        }
        if !(c.eviction_sweep_seconds.is_finite() && c.eviction_sweep_seconds > 0.0) {
            return Err(problem(
                "sessionIdConfig.evictionSweepSeconds",
                format!("must be > 0, got {}", c.eviction_sweep_seconds),
            ));
        }
        Ok(())
    }
}

/// `file-discovery` (llm-d v0.10, `dataLayer.discovery.pluginRef`): endpoints from a file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FileDiscoveryParams {
    /// The endpoints file (YAML or JSON: `endpoints: [{name, namespace, address, port,
    /// labels}]`); required.
    pub path: String,
    /// Re-read the file when it changes.
    pub watch_file: bool,
}

impl FileDiscoveryParams {
    /// `path` is required.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if self.path.is_empty() {
            return Err(problem("path", "is required"));
        }
        Ok(())
    }
}

/// What `burst-prefix-cache-producer` balances across replicas within one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BalanceBy {
    /// Request count.
    #[default]
    Requests,
    /// Prefix blocks a replica must prefill (a prefix already placed there is free).
    Tokens,
}

/// `burst-prefix-cache-producer` (llm-d v0.10, Alpha): requests arriving within one window
/// are placed jointly so those sharing a prompt land on the same replica(s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BurstPrefixParams {
    /// Batch window in milliseconds, `1..=10000`.
    pub window_duration_ms: i64,
    /// Most requests of one group per replica; -1 is unlimited.
    pub max_per_replica: i64,
    /// Tokens per prefix block.
    pub block_size_tokens: i64,
    /// Cap on matched prefix tokens; 0 uses the default cap of 2048 blocks.
    pub max_prefix_tokens_to_match: i64,
    /// Leading blocks two different prompts must share to be co-located; 0 disables it.
    pub min_colocate_blocks: i64,
    /// Most requests one window may hold; -1 is unlimited.
    pub max_batch_size: i64,
    /// The quantity balanced across replicas.
    pub balance_by: BalanceBy,
}

impl Default for BurstPrefixParams {
    fn default() -> Self {
        BurstPrefixParams {
            window_duration_ms: 100,
            max_per_replica: -1,
            block_size_tokens: 64,
            max_prefix_tokens_to_match: 0,
            min_colocate_blocks: 0,
            max_batch_size: 1000,
            balance_by: BalanceBy::Requests,
        }
    }
}

impl BurstPrefixParams {
    /// Leading blocks that form a group key when `maxPrefixTokensToMatch` is 0 (llm-d's).
    pub const DEFAULT_MAX_PREFIX_BLOCKS: usize = 2048;

    /// llm-d's construction checks, each naming its field.
    pub fn validate(&self) -> Result<(), ParamProblem> {
        if !(1..=10_000).contains(&self.window_duration_ms) {
            return Err(problem("windowDurationMs", "must be in 1..=10000"));
        }
        if self.max_per_replica != -1 && self.max_per_replica < 1 {
            return Err(problem("maxPerReplica", "must be -1 (unlimited) or >= 1"));
        }
        if self.block_size_tokens <= 0 {
            return Err(problem("blockSizeTokens", "must be > 0"));
        }
        if self.max_prefix_tokens_to_match < 0 {
            return Err(problem("maxPrefixTokensToMatch", "must be >= 0"));
        }
        if self.max_prefix_tokens_to_match > 0
            && self.max_prefix_tokens_to_match < self.block_size_tokens
        {
            return Err(problem(
                "maxPrefixTokensToMatch",
                "must be 0 or >= blockSizeTokens (a smaller value yields no prefix blocks)",
            ));
        }
        if self.min_colocate_blocks < 0 {
            return Err(problem("minColocateBlocks", "must be >= 0"));
        }
        if self.max_batch_size != -1 && self.max_batch_size < 1 {
            return Err(problem("maxBatchSize", "must be -1 (unlimited) or >= 1"));
        }
        Ok(())
    }

    /// The window as a duration (after `validate`).
    pub fn window(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.window_duration_ms).unwrap_or(1))
    }

    /// Leading blocks kept per request.
    pub fn max_blocks(&self) -> usize {
        if self.max_prefix_tokens_to_match > 0 {
            usize::try_from(self.max_prefix_tokens_to_match / self.block_size_tokens.max(1))
                .unwrap_or(0)
        } else {
            Self::DEFAULT_MAX_PREFIX_BLOCKS
        }
    }

    /// The per-replica cap per group, `None` when unlimited.
    pub fn per_replica_cap(&self) -> Option<usize> {
        usize::try_from(self.max_per_replica).ok()
    }

    /// The per-window cap, `None` when unlimited.
    pub fn batch_cap(&self) -> Option<usize> {
        usize::try_from(self.max_batch_size).ok()
    }
}
