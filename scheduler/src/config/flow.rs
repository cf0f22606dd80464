//! The `flowControl` section (llm-d's exact field names) and its resolution into a
//! [`FlowConfig`], following `pkg/epp/config/loader/flowcontrol.go`: policy references name
//! plugin instances; the default policies are added as plugins when absent; a quantity or
//! cap of 0 means "use the default".

use std::num::NonZeroU64;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::error::{ConfigError, Location};
use super::registry::{PluginKind, PluginSpec};
use super::{ResolvedPlugin, add_default, find, locate, params};
use crate::flow::config::{
    BandConfig, DEFAULT_BAND_MAX_BYTES, DEFAULT_BAND_MAX_REQUESTS, DEFAULT_NO_ENDPOINT_REQUEST_TTL,
    DEFAULT_REQUEST_TTL, FairnessPolicy, FlowConfig, InvalidFlowConfig, OrderingPolicy,
    UsageLimitPolicy,
};

/// The `flowControl` section as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFlowControl {
    max_bytes: Option<Value>,
    max_requests: Option<Value>,
    #[serde(rename = "defaultRequestTTL")]
    default_request_ttl: Option<String>,
    #[serde(rename = "noEndpointRequestTTL")]
    no_endpoint_request_ttl: Option<String>,
    default_priority_band: Option<RawBand>,
    default_negative_priority_band: Option<RawBand>,
    priority_bands: Option<Vec<RawBand>>,
    usage_limit_policy_plugin_ref: Option<String>,
    pub(super) saturation_detector: Option<RawSaturationRef>,
    enable_eviction: Option<bool>,
}

/// `flowControl.saturationDetector`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSaturationRef {
    pub(super) plugin_ref: Option<String>,
}

/// One `priorityBands[]` entry or band template.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBand {
    #[serde(default)]
    priority: i32,
    max_bytes: Option<Value>,
    max_requests: Option<Value>,
    fairness_policy_ref: Option<String>,
    ordering_policy_ref: Option<String>,
}

/// The default policy plugins llm-d registers when flow control is on.
const DEFAULT_ORDERING: &str = "fcfs-ordering-policy";
const DEFAULT_FAIRNESS: &str = "global-strict-fairness-policy";
const DEFAULT_USAGE_LIMIT: &str = "static-usage-limit-policy";

/// A Kubernetes resource quantity (`"1Gi"`, `"500M"`, `"1k"`, `1e9`, or a plain number) as
/// an integer, rounded up as `Quantity.Value()` does.
pub fn parse_quantity(v: &Value) -> Result<u64, String> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        other => {
            return Err(format!(
                "must be a quantity like \"1Gi\" or 5000, got {other:?}"
            ));
        }
    };
    let bad = || {
        format!(
            "invalid quantity {text:?}: expected a number with an optional suffix (k, M, G, Ki, Mi, Gi, …)"
        )
    };
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(&text)),
    };
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (digits, suffix) = body.split_at(num_end);
    if digits.is_empty() || digits == "." || digits.matches('.').count() > 1 {
        return Err(bad());
    }
    // mantissa × 10^exp10 × 2^exp2
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    let mantissa: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| bad())?;
    let mut exp10: i32 = -i32::try_from(frac_part.len()).map_err(|_| bad())?;
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        s if s.starts_with(['e', 'E']) => {
            exp10 += s[1..].parse::<i32>().map_err(|_| bad())?;
        }
        _ => return Err(bad()),
    }
    if negative && mantissa != 0 {
        return Err(format!("must be non-negative, got {text:?}"));
    }
    let too_big = || format!("quantity {text:?} is too large");
    let mut value = mantissa.checked_mul(1u128 << exp2).ok_or_else(too_big)?;
    if exp10 >= 0 {
        let scale = 10u128
            .checked_pow(exp10.unsigned_abs())
            .ok_or_else(too_big)?;
        value = value.checked_mul(scale).ok_or_else(too_big)?;
    } else {
        let scale = 10u128
            .checked_pow(exp10.unsigned_abs())
            .unwrap_or(u128::MAX);
        value = value.div_ceil(scale);
    }
    u64::try_from(value).map_err(|_| too_big())
}

struct Resolver<'a, 'y> {
    yaml: &'y str,
    plugins: &'a mut Vec<ResolvedPlugin>,
    section: Option<Location>,
}

impl Resolver<'_, '_> {
    fn field_error(&self, field: &str, message: String, anchor: Option<Location>) -> ConfigError {
        let location = anchor
            .or(self.section)
            .map(|l| locate::find_field_after(self.yaml, "flowControl", l, field));
        ConfigError::Field {
            field: format!("flowControl.{field}"),
            message,
            location,
        }
    }

    fn quantity(
        &self,
        v: Option<&Value>,
        field: &str,
        anchor: Option<Location>,
    ) -> Result<Option<NonZeroU64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(v) => parse_quantity(v)
                .map(NonZeroU64::new)
                .map_err(|m| self.field_error(field, m, anchor)),
        }
    }

    fn ttl(
        &self,
        v: Option<&str>,
        field: &str,
        default: Duration,
    ) -> Result<Option<Duration>, ConfigError> {
        match v {
            None => Ok(Some(default)),
            Some(s) => {
                let d =
                    params::go_duration::parse(s).map_err(|m| self.field_error(field, m, None))?;
                Ok((!d.is_zero()).then_some(d))
            }
        }
    }

    /// The plugin named `name`, checked to be of kind `want`.
    fn policy(
        &self,
        name: &str,
        referrer: &str,
        want: PluginKind,
        anchor: Option<Location>,
    ) -> Result<&PluginSpec, ConfigError> {
        let location = anchor
            .or(self.section)
            .map(|l| locate::find_field_after(self.yaml, "flowControl", l, referrer));
        match find(self.plugins, name) {
            None => Err(ConfigError::DanglingRef {
                referrer: format!("flowControl.{referrer}"),
                plugin_ref: name.to_owned(),
                location,
            }),
            Some(i) if self.plugins[i].spec.kind() != want => Err(ConfigError::WrongKind {
                referrer: format!("flowControl.{referrer}"),
                plugin: name.to_owned(),
                type_name: self.plugins[i].spec.type_name().into(),
                actual: self.plugins[i].spec.kind().as_str(),
                expected: want.as_str(),
                location,
            }),
            Some(i) => Ok(&self.plugins[i].spec),
        }
    }

    fn band(
        &self,
        raw: Option<&RawBand>,
        base: &BandConfig,
        path: &str,
        anchor: Option<Location>,
    ) -> Result<BandConfig, ConfigError> {
        let mut band = base.clone();
        let Some(raw) = raw else { return Ok(band) };
        let default_requests = NonZeroU64::new(DEFAULT_BAND_MAX_REQUESTS).expect("non-zero");
        let default_bytes = NonZeroU64::new(DEFAULT_BAND_MAX_BYTES).expect("non-zero");
        if raw.max_requests.is_some() {
            band.max_requests = self
                .quantity(
                    raw.max_requests.as_ref(),
                    &format!("{path}.maxRequests"),
                    anchor,
                )?
                .unwrap_or(default_requests);
        }
        if raw.max_bytes.is_some() {
            band.max_bytes = self
                .quantity(raw.max_bytes.as_ref(), &format!("{path}.maxBytes"), anchor)?
                .unwrap_or(default_bytes);
        }
        if let Some(r) = raw.fairness_policy_ref.as_deref().filter(|r| !r.is_empty()) {
            let field = format!("{path}.fairnessPolicyRef");
            band.fairness = match self.policy(r, &field, PluginKind::FairnessPolicy, anchor)? {
                PluginSpec::RoundRobinFairnessPolicy => FairnessPolicy::RoundRobin,
                PluginSpec::ProgramAwareFairness(p) => FairnessPolicy::ProgramAware(p.las()),
                _ => FairnessPolicy::GlobalStrict,
            };
        }
        if let Some(r) = raw.ordering_policy_ref.as_deref().filter(|r| !r.is_empty()) {
            let field = format!("{path}.orderingPolicyRef");
            band.ordering = match self.policy(r, &field, PluginKind::OrderingPolicy, anchor)? {
                PluginSpec::EdfOrderingPolicy => OrderingPolicy::Edf,
                PluginSpec::SloDeadlineOrderingPolicy => OrderingPolicy::SloDeadline,
                _ => OrderingPolicy::Fcfs,
            };
        }
        Ok(band)
    }
}

/// Resolves the section when the `flowControl` gate is on: adds the default policy
/// plugins, checks every reference and quantity, and fills in llm-d's defaults.
pub(super) fn resolve(
    yaml: &str,
    plugins: &mut Vec<ResolvedPlugin>,
    raw: Option<&RawFlowControl>,
) -> Result<FlowConfig, ConfigError> {
    for t in [DEFAULT_ORDERING, DEFAULT_FAIRNESS, DEFAULT_USAGE_LIMIT] {
        add_default(plugins, t);
    }
    let empty = RawFlowControl::default();
    let raw = raw.unwrap_or(&empty);
    let r = Resolver {
        yaml,
        plugins,
        section: locate::top_level(yaml, "flowControl"),
    };
    let default_request_ttl = r.ttl(
        raw.default_request_ttl.as_deref(),
        "defaultRequestTTL",
        DEFAULT_REQUEST_TTL,
    )?;
    let no_endpoint_request_ttl = match raw.no_endpoint_request_ttl.as_deref() {
        Some(v) => r.ttl(
            Some(v),
            "noEndpointRequestTTL",
            DEFAULT_NO_ENDPOINT_REQUEST_TTL,
        )?,
        // llm-d: unset follows a set defaultRequestTTL, else 60 s.
        None => Some(
            default_request_ttl
                .filter(|_| raw.default_request_ttl.is_some())
                .unwrap_or(DEFAULT_NO_ENDPOINT_REQUEST_TTL),
        ),
    };
    let mut cfg = FlowConfig {
        max_requests: r.quantity(raw.max_requests.as_ref(), "maxRequests", None)?,
        max_bytes: r.quantity(raw.max_bytes.as_ref(), "maxBytes", None)?,
        default_request_ttl,
        no_endpoint_request_ttl,
        enable_eviction: raw.enable_eviction.unwrap_or(false),
        ..FlowConfig::default()
    };
    // Policies named by the band defaults are the plugins of the default types.
    let base = r.band(None, &BandConfig::default(), "", None)?;
    let template_anchor = |key: &str| {
        r.section
            .map(|l| locate::find_field_after(yaml, "flowControl", l, key))
    };
    cfg.default_band = r.band(
        raw.default_priority_band.as_ref(),
        &base,
        "defaultPriorityBand",
        template_anchor("defaultPriorityBand"),
    )?;
    if let Some(neg) = &raw.default_negative_priority_band {
        cfg.default_negative_band = Some(r.band(
            Some(neg),
            &base,
            "defaultNegativePriorityBand",
            template_anchor("defaultNegativePriorityBand"),
        )?);
    }
    let mut seen = std::collections::BTreeMap::new();
    for (i, b) in raw.priority_bands.iter().flatten().enumerate() {
        let nth = *seen
            .entry(b.priority)
            .and_modify(|n| *n += 1)
            .or_insert(0usize);
        let anchor = locate::find_value(
            yaml,
            "flowControl",
            "priority",
            &b.priority.to_string(),
            nth,
        )
        .or(r.section);
        let path = format!("priorityBands[{i}]");
        if cfg.priority_bands.contains_key(&b.priority) {
            return Err(r.field_error(
                &format!("{path}.priority"),
                format!("duplicate priority level {}", b.priority),
                anchor,
            ));
        }
        let band = r.band(Some(b), &base, &path, anchor)?;
        cfg.priority_bands.insert(b.priority, band);
    }
    let usage_ref = raw
        .usage_limit_policy_plugin_ref
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_USAGE_LIMIT);
    cfg.usage_limit = match r.policy(
        usage_ref,
        "usageLimitPolicyPluginRef",
        PluginKind::UsageLimitPolicy,
        None,
    )? {
        PluginSpec::StaticUsageLimitPolicy(p) => UsageLimitPolicy::Static {
            threshold: p.threshold,
        },
        PluginSpec::PriorityHoldbackPolicy(p) => UsageLimitPolicy::PriorityHoldback {
            domain: p.domain,
            min_ceiling: p.min_ceiling.unwrap_or_default(),
            max_ceiling: p.max_ceiling,
            lift_under_share: None,
        },
        PluginSpec::FairShareHoldbackPolicy(p) => UsageLimitPolicy::PriorityHoldback {
            domain: p.domain,
            min_ceiling: p.min_ceiling.unwrap_or_default(),
            max_ceiling: p.max_ceiling,
            lift_under_share: Some(p.under_share),
        },
        PluginSpec::SoftReflectiveCeilingPolicy => UsageLimitPolicy::SoftReflective,
        _ => UsageLimitPolicy::default(),
    };
    // Band 0 always exists: it takes requests without an objective.
    let zero = cfg.default_band.clone();
    cfg.priority_bands.entry(0).or_insert(zero);
    if let Err(e @ InvalidFlowConfig::LiftWithoutProgramAware) = cfg.validate() {
        return Err(r.field_error("usageLimitPolicyPluginRef", e.to_string(), None));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<u64, String> {
        parse_quantity(&serde_yaml_ng::from_str(s).unwrap())
    }

    #[test]
    fn kubernetes_quantities() {
        assert_eq!(q("5000"), Ok(5000));
        assert_eq!(q("\"1k\""), Ok(1000));
        assert_eq!(q("\"1Gi\""), Ok(1 << 30));
        assert_eq!(q("\"500M\""), Ok(500_000_000));
        assert_eq!(q("\"1.5Ki\""), Ok(1536));
        assert_eq!(q("\"1e9\""), Ok(1_000_000_000));
        assert_eq!(q("\"1E3\""), Ok(1000));
        assert_eq!(q("\"1E\""), Ok(1_000_000_000_000_000_000));
        assert_eq!(q("\"100m\""), Ok(1), "rounded up like Quantity.Value()");
        assert_eq!(q("\"0\""), Ok(0));
        assert!(q("\"-1\"").unwrap_err().contains("non-negative"));
        assert!(q("\"1GB\"").is_err());
        assert!(q("\"abc\"").is_err());
        assert!(q("\"100Ei\"").unwrap_err().contains("too large"));
        assert!(q("[1]").is_err());
    }
}
