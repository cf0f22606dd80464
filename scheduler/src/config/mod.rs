//! EndpointPickerConfig loading: parse, apply llm-d's defaulting rules, validate, resolve.
//!
//! Both apiVersions are accepted (`llm-d.ai/v1alpha1`, `inference.networking.x-k8s.io/v1alpha1`).
//! Defaulting follows `pkg/epp/config/loader/defaults.go`: unnamed plugins take their type
//! as name; no profiles → a `default` profile with every filter, scorer and picker; a
//! profile without a picker gets the first declared picker, else an added
//! `max-score-picker`; one profile and no handler → `single-profile-handler`; scorer
//! weight defaults to 1; a utilization-detector and the metrics data layer are added when
//! absent; without `requestHandler.parsers` (or the deprecated top-level `parser`) the
//! openai, anthropic, vllmhttp and passthrough parsers run; a consumer of prefix data with no
//! `approx-prefix-cache-producer` gets one added (taking GIE 1.x parameters written on
//! `prefix-cache-scorer`).

// Configuration loading is a cold path; its errors carry names and locations by value.
#![allow(clippy::result_large_err)]

pub mod error;
pub mod flow;
mod locate;
pub mod params;
pub mod precise;
pub mod registry;

use std::fmt;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::flow::FlowConfig;
use crate::parsers::{ConfiguredParser, DEFAULT_PARSERS, ParserType, RequestParsers};
pub use error::{ConfigError, Location};
use params::{CoreMetricsExtractorParams, MetricsDataSourceParams, UtilizationParams};
pub use registry::{NameStatus, PluginKind, PluginSpec, all_names, is_alpha, name_status};
use registry::{SpecError, parse_spec_with_warnings};

/// The llm-d apiVersion.
pub const API_VERSION_LLMD: &str = "llm-d.ai/v1alpha1";
/// The GIE apiVersion.
pub const API_VERSION_GIE: &str = "inference.networking.x-k8s.io/v1alpha1";
/// The only accepted kind.
pub const KIND: &str = "EndpointPickerConfig";

/// llm-d's built-in default configuration.
pub const BUILTIN_DEFAULT_YAML: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
";

/// Feature gates llm-d registers.
const KNOWN_FEATURE_GATES: &[&str] = &["dataLayer", "enableLegacyMetrics", "flowControl"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    feature_gates: Option<Vec<String>>,
    plugins: Option<Vec<RawPlugin>>,
    scheduling_profiles: Option<Vec<RawProfile>>,
    saturation_detector: Option<RawSaturation>,
    data_layer: Option<RawDataLayer>,
    flow_control: Option<flow::RawFlowControl>,
    request_handler: Option<RawRequestHandler>,
    parser: Option<RawRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequestHandler {
    parsers: Option<Vec<RawRef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Option<String>,
    #[serde(rename = "type")]
    type_name: String,
    parameters: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: Option<String>,
    plugins: Option<Vec<RawProfilePlugin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProfilePlugin {
    plugin_ref: Option<String>,
    weight: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSaturation {
    plugin_ref: Option<String>,
    queue_depth_threshold: Option<i64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<String>,
    headroom: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDataLayer {
    inject_defaults: Option<bool>,
    sources: Option<Vec<RawSource>>,
    discovery: Option<RawRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    plugin_ref: String,
    extractors: Option<Vec<RawRef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRef {
    plugin_ref: String,
}

/// A configured plugin instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPlugin {
    /// Instance name (`name`, or the type when unnamed).
    pub name: String,
    /// The type name as written (may be an alias such as `by-label-selector`).
    pub written_type: String,
    /// Type and parameters with defaults filled in.
    pub spec: PluginSpec,
    /// Added by a defaulting rule rather than written in the file.
    pub defaulted: bool,
}

/// A scorer in a profile with its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedRef {
    /// Plugin name.
    pub plugin: String,
    /// Weight (default 1).
    pub weight: f64,
}

/// A resolved scheduling profile.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedProfile {
    /// Profile name.
    pub name: String,
    /// Filters in order.
    pub filters: Vec<String>,
    /// Scorers with weights.
    pub scorers: Vec<WeightedRef>,
    /// The picker.
    pub picker: String,
}

/// A data-layer source with its extractors.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSourceRef {
    /// Source plugin name.
    pub source: String,
    /// Extractor plugin names.
    pub extractors: Vec<String>,
}

/// A validated configuration with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    /// The apiVersion the file used.
    pub api_version: String,
    /// Feature gates.
    pub feature_gates: Vec<String>,
    /// All plugins, declared first, then the ones added by defaulting.
    pub plugins: Vec<ResolvedPlugin>,
    /// Profiles in declaration order.
    pub profiles: Vec<ResolvedProfile>,
    /// Name of the profile handler plugin.
    pub profile_handler: String,
    /// Name of the saturation detector plugin.
    pub saturation_detector: String,
    /// Names of the request parser plugins in force, in resolution order (llm-d's
    /// registration rules applied: see [`crate::parsers`]).
    pub parsers: Vec<String>,
    /// Name of the prefix producer (approx or precise), when one runs.
    pub prefix_producer: Option<String>,
    /// Name of the token producer the precise producer reads, when it runs.
    pub token_producer: Option<String>,
    /// Data-layer sources (they configure the node's metrics fetcher).
    pub data_layer: Vec<DataSourceRef>,
    /// `dataLayer.discovery.pluginRef`: the endpoint discovery plugin, when set (the node
    /// then takes its endpoints from it instead of `--endpoints`).
    pub discovery: Option<String>,
    /// The flow controller's configuration, when the `flowControl` gate is on.
    pub flow_control: Option<FlowConfig>,
    /// Deprecations found while loading (llm-d logs these and loads anyway).
    pub warnings: Vec<String>,
}

impl ResolvedConfig {
    /// llm-d's built-in default (queue 2, kv-cache-utilization 2, prefix 3).
    pub fn builtin_default() -> Self {
        load_config(BUILTIN_DEFAULT_YAML).expect("the built-in default configuration is valid")
    }

    /// Whether feature gate `gate` is on (`name` or `name=true`, the last mention wins).
    pub fn feature_enabled(&self, gate: &str) -> bool {
        gate_enabled(&self.feature_gates, gate)
    }

    /// The precise prefix producer's parameters, when that is the prefix producer.
    pub fn precise_prefix(&self) -> Option<&precise::PrecisePrefixParams> {
        match self
            .plugin(self.prefix_producer.as_deref()?)
            .map(|p| &p.spec)
        {
            Some(PluginSpec::PrecisePrefixCacheProducer(p)) => Some(p),
            _ => None,
        }
    }

    /// The plugin named `name`.
    pub fn plugin(&self, name: &str) -> Option<&ResolvedPlugin> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// Utilization-detector thresholds (for admission).
    pub fn utilization(&self) -> UtilizationParams {
        match self.plugin(&self.saturation_detector).map(|p| &p.spec) {
            Some(PluginSpec::UtilizationDetector(p)) => p.clone(),
            _ => UtilizationParams::default(),
        }
    }

    /// The request parsers in force, for picking a parser by request path.
    pub fn request_parsers(&self) -> RequestParsers {
        let configured = self
            .parsers
            .iter()
            .filter_map(|n| match self.plugin(n)?.spec {
                PluginSpec::Parser(parser) => Some(ConfiguredParser {
                    name: n.clone(),
                    parser,
                }),
                _ => None,
            });
        RequestParsers::new(configured).0
    }

    /// The written plugins llm-d registers at Alpha stability (in file order).
    pub fn experimental_plugins(&self) -> impl Iterator<Item = &ResolvedPlugin> {
        self.plugins
            .iter()
            .filter(|p| !p.defaulted && registry::is_alpha(&p.written_type))
    }

    /// llm-d's `ValidatePluginStability`: without `allow_experimental`, the first Alpha
    /// plugin (by name, as llm-d sorts them) is refused.
    pub fn check_stability(&self, allow_experimental: bool) -> Result<(), ConfigError> {
        if allow_experimental {
            return Ok(());
        }
        match self
            .experimental_plugins()
            .min_by(|a, b| a.name.cmp(&b.name))
        {
            None => Ok(()),
            Some(p) => Err(ConfigError::ExperimentalPlugin {
                plugin: p.name.clone(),
                type_name: p.written_type.clone(),
            }),
        }
    }

    /// The `file-discovery` plugin `dataLayer.discovery` names, with its parameters.
    pub fn file_discovery(&self) -> Option<(&str, &params::FileDiscoveryParams)> {
        let name = self.discovery.as_deref()?;
        match &self.plugin(name)?.spec {
            PluginSpec::FileDiscovery(p) => Some((name, p)),
            _ => None,
        }
    }

    /// The saturation detector's spec.
    pub fn saturation_spec(&self) -> Option<&PluginSpec> {
        self.plugin(&self.saturation_detector).map(|p| &p.spec)
    }

    /// The first metrics data source and its core-metrics extractor, for the node's fetcher.
    pub fn metrics_source(
        &self,
    ) -> Option<(
        &MetricsDataSourceParams,
        Option<&CoreMetricsExtractorParams>,
    )> {
        self.data_layer.iter().find_map(|s| {
            let src = match self.plugin(&s.source).map(|p| &p.spec) {
                Some(PluginSpec::MetricsDataSource(p)) => p,
                _ => return None,
            };
            let ext = s
                .extractors
                .iter()
                .find_map(|e| match self.plugin(e).map(|p| &p.spec) {
                    Some(PluginSpec::CoreMetricsExtractor(x)) => Some(x),
                    _ => None,
                });
            Some((src, ext))
        })
    }
}

/// One entry of `plugins:` as written, with what the registry makes of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginNameReport {
    /// Instance name (the type when unnamed).
    pub name: String,
    /// The type as written.
    pub type_name: String,
    /// Current name, older alias or refused.
    pub status: NameStatus,
}

/// Classifies every `plugins[]` entry of a config without loading it, so a report can
/// name every refused plugin, not only the first one the loader stops at. Entries without
/// a string `type` are skipped (the loader reports them).
pub fn plugin_name_report(yaml: &str) -> Vec<PluginNameReport> {
    let Ok(doc) = serde_yaml_ng::from_str::<Value>(yaml) else {
        return Vec::new();
    };
    let Some(Value::Sequence(plugins)) = doc.get("plugins") else {
        return Vec::new();
    };
    plugins
        .iter()
        .filter_map(|p| {
            let type_name = p.get("type")?.as_str()?.to_owned();
            let name = p
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or(&type_name)
                .to_owned();
            Some(PluginNameReport {
                status: name_status(&type_name),
                name,
                type_name,
            })
        })
        .collect()
}

fn yaml_error(e: serde_path_to_error::Error<serde_yaml_ng::Error>) -> ConfigError {
    let location = e.inner().location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut path = e.path().to_string();
    if path == "?" || path == "." {
        path.clear();
    }
    // serde_yaml_ng repeats the path and the position inside its message; keep them once.
    let mut message = e.inner().to_string();
    if let Some(l) = location {
        let suffix = format!(" at line {} column {}", l.line, l.column);
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
    }
    if !path.is_empty()
        && let Some(stripped) = message.strip_prefix(&format!("{path}: "))
    {
        message = stripped.to_owned();
    }
    ConfigError::Yaml {
        path,
        message,
        location,
    }
}

/// Parses, defaults and validates an EndpointPickerConfig. An empty document yields the
/// built-in default, as llm-d does without `--config-file`.
pub fn load_config(yaml: &str) -> Result<ResolvedConfig, ConfigError> {
    let meaningful = yaml
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "---");
    if !meaningful {
        return load_config(BUILTIN_DEFAULT_YAML);
    }
    let de = serde_yaml_ng::Deserializer::from_str(yaml);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(yaml_error)?;
    Loader { yaml }.resolve(raw)
}

struct Loader<'y> {
    yaml: &'y str,
}

impl Loader<'_> {
    fn plugin_location(&self, plugins: &[ResolvedPlugin], idx: usize) -> Option<Location> {
        let p = &plugins[idx];
        let nth = plugins[..idx]
            .iter()
            .filter(|q| !q.defaulted && q.written_type == p.written_type)
            .count();
        locate::find_value(self.yaml, "plugins", "type", &p.written_type, nth)
    }

    fn ref_location(&self, section: &str, name: &str, nth: usize) -> Option<Location> {
        locate::find_value(self.yaml, section, "pluginRef", name, nth)
    }

    fn resolve(&self, raw: RawConfig) -> Result<ResolvedConfig, ConfigError> {
        let api_version = self.header(raw.api_version, raw.kind)?;
        let feature_gates = self.feature_gates(raw.feature_gates)?;
        let mut warnings = Vec::new();
        let mut plugins = self.plugins(raw.plugins.unwrap_or_default(), &mut warnings)?;
        self.topology_labels(&mut plugins, &mut warnings);
        self.in_flight_producer_names(&plugins)?;
        let profiles = self.profiles(&mut plugins, raw.scheduling_profiles.unwrap_or_default())?;
        let profile_handler = self.profile_handler(&mut plugins, &profiles)?;
        // `flowControl.saturationDetector` wins over the deprecated top-level section, and
        // is read with or without the gate, as llm-d does.
        let nested_detector = raw
            .flow_control
            .as_ref()
            .and_then(|fc| fc.saturation_detector.as_ref())
            .map(|sd| RawSaturation {
                plugin_ref: sd.plugin_ref.clone(),
                queue_depth_threshold: None,
                kv_cache_util_threshold: None,
                metrics_staleness_threshold: None,
                headroom: None,
            });
        let saturation_detector = match nested_detector {
            Some(sd) => self.saturation_detector(
                &mut plugins,
                Some(sd),
                "flowControl.saturationDetector",
                locate::top_level(self.yaml, "flowControl"),
            )?,
            None => self.saturation_detector(
                &mut plugins,
                raw.saturation_detector,
                "saturationDetector",
                locate::top_level(self.yaml, "saturationDetector"),
            )?,
        };
        // Without the gate llm-d ignores the rest of the section.
        let flow_control = if gate_enabled(&feature_gates, "flowControl") {
            Some(flow::resolve(
                self.yaml,
                &mut plugins,
                raw.flow_control.as_ref(),
            )?)
        } else {
            None
        };
        let parsers = self.parsers(&mut plugins, raw.request_handler, raw.parser, &mut warnings)?;
        let prefix_producer = self.prefix_producer(&mut plugins)?;
        let token_producer = self.token_producer(&mut plugins, &mut warnings)?;
        self.pd_producer_name(&plugins, &profile_handler, prefix_producer.as_deref())?;
        self.consumer_producer_names(&plugins, prefix_producer.as_deref())?;
        self.one_inflight_load(&plugins)?;
        self.one_burst_producer(&plugins)?;
        let inject_metrics = !feature_gates.iter().any(|g| g == "enableLegacyMetrics");
        let discovery = self.discovery(&plugins, raw.data_layer.as_ref())?;
        let data_layer = self.data_layer(&mut plugins, raw.data_layer, inject_metrics)?;
        Ok(ResolvedConfig {
            api_version,
            feature_gates,
            plugins,
            profiles,
            profile_handler,
            saturation_detector,
            parsers,
            prefix_producer,
            token_producer,
            data_layer,
            discovery,
            flow_control,
            warnings,
        })
    }

    /// The topology affinity plugins read the labels of the `topology-extractor` their
    /// `topologyProducerName` names (empty: the one named `topology-extractor`). llm-d
    /// declares the attribute optional: a missing extractor is a warning, and the plugins
    /// then see no topology (the filter keeps everything, the scorer gives 0).
    fn topology_labels(&self, plugins: &mut [ResolvedPlugin], warnings: &mut Vec<String>) {
        let extractor = |plugins: &[ResolvedPlugin], named: &str| {
            let want = if named.is_empty() {
                "topology-extractor"
            } else {
                named
            };
            plugins.iter().find_map(|p| match &p.spec {
                PluginSpec::TopologyExtractor(x) if p.name == want => Some(x.clone()),
                _ => None,
            })
        };
        for i in 0..plugins.len() {
            let (named, found) = match &plugins[i].spec {
                PluginSpec::TopologyAffinityFilter(x) => {
                    let f = extractor(plugins, &x.topology_producer_name);
                    (x.topology_producer_name.clone(), f)
                }
                PluginSpec::TopologyAffinityScorer(x) => {
                    let f = extractor(plugins, &x.topology_producer_name);
                    (x.topology_producer_name.clone(), f)
                }
                _ => continue,
            };
            if found.is_none() {
                let want = if named.is_empty() {
                    "topology-extractor"
                } else {
                    named.as_str()
                };
                warnings.push(format!(
                    "plugin `{}` ({}): no topology-extractor named `{want}` is configured, so no endpoint has a topology (the filter keeps every candidate, the scorer gives 0)",
                    plugins[i].name,
                    plugins[i].spec.type_name()
                ));
            }
            match &mut plugins[i].spec {
                PluginSpec::TopologyAffinityFilter(x) => x.labels = found,
                PluginSpec::TopologyAffinityScorer(x) => x.labels = found,
                _ => {}
            }
        }
    }

    /// `dataLayer.discovery.pluginRef` must name a discovery plugin (`file-discovery`).
    fn discovery(
        &self,
        plugins: &[ResolvedPlugin],
        raw: Option<&RawDataLayer>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(r) = raw.and_then(|dl| dl.discovery.as_ref()) else {
            return Ok(None);
        };
        let referrer = "dataLayer.discovery.pluginRef".to_owned();
        let location = self.ref_location("dataLayer", &r.plugin_ref, 0);
        match find(plugins, &r.plugin_ref) {
            None => Err(ConfigError::DanglingRef {
                referrer,
                plugin_ref: r.plugin_ref.clone(),
                location,
            }),
            Some(i) if plugins[i].spec.kind() != PluginKind::Discovery => {
                Err(ConfigError::WrongKind {
                    referrer,
                    plugin: r.plugin_ref.clone(),
                    type_name: plugins[i].spec.type_name().into(),
                    actual: plugins[i].spec.kind().as_str(),
                    expected: PluginKind::Discovery.as_str(),
                    location,
                })
            }
            Some(_) => Ok(Some(r.plugin_ref.clone())),
        }
    }

    /// `utilization-filter.inFlightLoadProducerName`, when set, must name an
    /// `inflight-load-producer` (llm-d fails a required dependency with no producer).
    fn in_flight_producer_names(&self, plugins: &[ResolvedPlugin]) -> Result<(), ConfigError> {
        for (i, p) in plugins.iter().enumerate() {
            let PluginSpec::UtilizationFilter(x) = &p.spec else {
                continue;
            };
            let named = x.in_flight_load_producer_name.as_str();
            if named.is_empty()
                || plugins.iter().any(|q| {
                    q.name == named && matches!(q.spec, PluginSpec::InflightLoadProducer(_))
                })
            {
                continue;
            }
            return Err(ConfigError::InvalidParameter {
                plugin: p.name.clone(),
                type_name: p.spec.type_name().into(),
                field: "inFlightLoadProducerName".into(),
                message: format!("names `{named}`, but no inflight-load-producer has that name"),
                location: self.plugin_location(plugins, i),
            });
        }
        Ok(())
    }

    /// `pd-profile-handler.prefixMatchInfoProducerName`, when set, must name the one
    /// prefix producer infermesh runs.
    fn pd_producer_name(
        &self,
        plugins: &[ResolvedPlugin],
        handler: &str,
        producer: Option<&str>,
    ) -> Result<(), ConfigError> {
        let Some(hi) = find(plugins, handler) else {
            return Ok(());
        };
        let PluginSpec::PdProfileHandler(p) = &plugins[hi].spec else {
            return Ok(());
        };
        let named = p.prefix_match_info_producer_name.as_str();
        if named.is_empty() || Some(named) == producer {
            return Ok(());
        }
        Err(ConfigError::InvalidParameter {
            plugin: handler.to_owned(),
            type_name: "pd-profile-handler".into(),
            field: "prefixMatchInfoProducerName".into(),
            message: match producer {
                Some(pp) => format!(
                    "names `{named}`, but the prefix producer is `{pp}` (infermesh runs one)"
                ),
                None => format!("names `{named}`, but no prefix producer is configured"),
            },
            location: self.plugin_location(plugins, hi),
        })
    }

    /// `prefixMatchInfoProducerName` on `prefix-cache-scorer` and `inflight-load-producer`,
    /// when set, must name the one prefix producer infermesh runs (llm-d fails the same
    /// config when the named producer's data is missing).
    fn consumer_producer_names(
        &self,
        plugins: &[ResolvedPlugin],
        producer: Option<&str>,
    ) -> Result<(), ConfigError> {
        for (i, p) in plugins.iter().enumerate() {
            let named = match &p.spec {
                PluginSpec::PrefixCacheScorer(x) => x.prefix_match_info_producer_name.as_str(),
                PluginSpec::InflightLoadProducer(x) => x.prefix_match_info_producer_name.as_str(),
                _ => continue,
            };
            if named.is_empty() || Some(named) == producer {
                continue;
            }
            // A prefix-cache-scorer may read the burst producer's placement instead.
            if matches!(p.spec, PluginSpec::PrefixCacheScorer(_))
                && burst_producer(plugins) == Some(named)
            {
                continue;
            }
            return Err(ConfigError::InvalidParameter {
                plugin: p.name.clone(),
                type_name: p.spec.type_name().into(),
                field: "prefixMatchInfoProducerName".into(),
                message: match producer {
                    Some(pp) => format!(
                        "names `{named}`, but the prefix producer is `{pp}` (infermesh runs one)"
                    ),
                    None => format!("names `{named}`, but no prefix producer is configured"),
                },
                location: self.plugin_location(plugins, i),
            });
        }
        Ok(())
    }

    /// infermesh holds requests in one batch window per policy, so at most one
    /// `burst-prefix-cache-producer`.
    fn one_burst_producer(&self, plugins: &[ResolvedPlugin]) -> Result<(), ConfigError> {
        let mut seen = plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.spec, PluginSpec::BurstPrefixCacheProducer(_)));
        if let (Some(_), Some((i, p))) = (seen.next(), seen.next()) {
            return Err(ConfigError::InvalidParameter {
                plugin: p.name.clone(),
                type_name: "burst-prefix-cache-producer".into(),
                field: "type".into(),
                message: "a second burst-prefix-cache-producer; infermesh holds requests in one batch window".into(),
                location: self.plugin_location(plugins, i),
            });
        }
        Ok(())
    }

    /// infermesh keeps one in-flight count per endpoint, so every `inflight-load-producer`
    /// must count a request the same way.
    fn one_inflight_load(&self, plugins: &[ResolvedPlugin]) -> Result<(), ConfigError> {
        let mut first: Option<&params::InflightLoadParams> = None;
        for (i, p) in plugins.iter().enumerate() {
            let PluginSpec::InflightLoadProducer(x) = &p.spec else {
                continue;
            };
            match first {
                None => first = Some(x),
                Some(f) if f == x => {}
                Some(_) => {
                    return Err(ConfigError::InvalidParameter {
                        plugin: p.name.clone(),
                        type_name: "inflight-load-producer".into(),
                        field: "parameters".into(),
                        message: "two inflight-load-producers set different parameters; infermesh keeps one in-flight count per endpoint".into(),
                        location: self.plugin_location(plugins, i),
                    });
                }
            }
        }
        Ok(())
    }

    /// `apiVersion` (returned) and `kind`.
    fn header(
        &self,
        api_version: Option<String>,
        kind: Option<String>,
    ) -> Result<String, ConfigError> {
        let api_version = api_version.unwrap_or_default();
        if api_version != API_VERSION_LLMD && api_version != API_VERSION_GIE {
            return Err(ConfigError::Field {
                field: "apiVersion".into(),
                message: format!(
                    "must be `{API_VERSION_LLMD}` or `{API_VERSION_GIE}`, got {api_version:?}"
                ),
                location: locate::top_level(self.yaml, "apiVersion"),
            });
        }
        let kind = kind.unwrap_or_default();
        if kind != KIND {
            return Err(ConfigError::Field {
                field: "kind".into(),
                message: format!("must be `{KIND}`, got {kind:?}"),
                location: locate::top_level(self.yaml, "kind"),
            });
        }
        Ok(api_version)
    }

    /// `featureGates`: known gates, each `name`, `name=true` or `name=false`.
    fn feature_gates(
        &self,
        feature_gates: Option<Vec<String>>,
    ) -> Result<Vec<String>, ConfigError> {
        let feature_gates = feature_gates.unwrap_or_default();
        for (i, g) in feature_gates.iter().enumerate() {
            let error = |message: String| ConfigError::Field {
                field: format!("featureGates[{i}]"),
                message,
                location: locate::top_level(self.yaml, "featureGates"),
            };
            let (name, value) = split_gate(g);
            if !KNOWN_FEATURE_GATES.contains(&name) {
                return Err(error(format!("feature gate `{name}` is unknown")));
            }
            if value.is_none() {
                return Err(error(format!(
                    "`{g}`: the value after `=` must be true or false"
                )));
            }
        }

        Ok(feature_gates)
    }

    /// `plugins`: names defaulted to types, unique, parameters parsed by type.
    fn plugins(
        &self,
        raw: Vec<RawPlugin>,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<ResolvedPlugin>, ConfigError> {
        let mut plugins: Vec<ResolvedPlugin> = Vec::new();
        for (i, rp) in raw.into_iter().enumerate() {
            let name = rp
                .name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| rp.type_name.clone());
            let tmp = ResolvedPlugin {
                name: name.clone(),
                written_type: rp.type_name.clone(),
                spec: PluginSpec::QueueScorer,
                defaulted: false,
            };
            plugins.push(tmp);
            let loc = || self.plugin_location(&plugins, i);
            if rp.type_name.is_empty() {
                return Err(ConfigError::Field {
                    field: format!("plugins[{i}].type"),
                    message: "is required".into(),
                    location: loc(),
                });
            }
            if plugins[..i].iter().any(|p| p.name == name) {
                return Err(ConfigError::DuplicatePlugin {
                    plugin: name,
                    location: loc(),
                });
            }
            match parse_spec_with_warnings(&rp.type_name, rp.parameters.as_ref()) {
                Ok((spec, w)) => {
                    plugins[i].spec = spec;
                    warnings.extend(
                        w.into_iter()
                            .map(|w| format!("plugin `{name}` ({}): {w}", rp.type_name)),
                    );
                }
                Err(SpecError::UnknownType) => {
                    return Err(ConfigError::UnknownPluginType {
                        plugin: name,
                        type_name: rp.type_name,
                        location: loc(),
                    });
                }
                Err(SpecError::Unsupported(reason)) => {
                    return Err(ConfigError::UnsupportedPlugin {
                        plugin: name,
                        type_name: rp.type_name,
                        reason,
                        location: loc(),
                    });
                }
                Err(SpecError::Param(field, message)) => {
                    let location =
                        loc().map(|l| locate::find_field_after(self.yaml, "plugins", l, &field));
                    return Err(ConfigError::InvalidParameter {
                        plugin: name,
                        type_name: rp.type_name,
                        field,
                        message,
                        location,
                    });
                }
            }
        }

        Ok(plugins)
    }

    /// `schedulingProfiles`, or the `default` profile taking every filter, scorer and
    /// picker; a profile without a picker gets the first declared one, else an added
    /// `max-score-picker`.
    fn profiles(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
        raw_profiles: Vec<RawProfile>,
    ) -> Result<Vec<ResolvedProfile>, ConfigError> {
        let mut profiles: Vec<ResolvedProfile> = Vec::new();
        let mut ref_seen: Vec<(String, usize)> = Vec::new();
        let mut ref_nth = |name: &str| -> usize {
            match ref_seen.iter_mut().find(|(n, _)| n == name) {
                Some((_, c)) => {
                    *c += 1;
                    *c - 1
                }
                None => {
                    ref_seen.push((name.to_owned(), 1));
                    0
                }
            }
        };
        let default_picker = plugins
            .iter()
            .find(|p| p.spec.kind() == PluginKind::Picker)
            .map(|p| p.name.clone());
        if raw_profiles.is_empty() {
            let mut prof = ResolvedProfile {
                name: "default".into(),
                filters: vec![],
                scorers: vec![],
                picker: String::new(),
            };
            for p in plugins.iter() {
                match p.spec.kind() {
                    PluginKind::Filter => prof.filters.push(p.name.clone()),
                    PluginKind::Scorer => prof.scorers.push(WeightedRef {
                        plugin: p.name.clone(),
                        weight: 1.0,
                    }),
                    PluginKind::Picker if prof.picker.is_empty() => prof.picker = p.name.clone(),
                    PluginKind::Picker => {
                        return Err(ConfigError::Profile {
                            profile: "default".into(),
                            message: format!(
                                "no schedulingProfiles were given, so the default profile takes every picker, but there are two (`{}` and `{}`); write the profiles explicitly",
                                prof.picker, p.name
                            ),
                            location: None,
                        });
                    }
                    _ => {}
                }
            }
            profiles.push(prof);
        }
        for (i, rp) in raw_profiles.into_iter().enumerate() {
            let pname = rp
                .name
                .filter(|n| !n.is_empty())
                .ok_or_else(|| ConfigError::Profile {
                    profile: format!("schedulingProfiles[{i}]"),
                    message: "is missing a name".into(),
                    location: locate::top_level(self.yaml, "schedulingProfiles"),
                })?;
            if profiles.iter().any(|p| p.name == pname) {
                return Err(ConfigError::Profile {
                    profile: pname.clone(),
                    message: "duplicate profile name".into(),
                    location: locate::find_value(
                        self.yaml,
                        "schedulingProfiles",
                        "name",
                        &pname,
                        1,
                    ),
                });
            }
            let mut prof = ResolvedProfile {
                name: pname.clone(),
                filters: vec![],
                scorers: vec![],
                picker: String::new(),
            };
            for (j, e) in rp.plugins.unwrap_or_default().into_iter().enumerate() {
                let referrer = format!("schedulingProfiles[{pname}].plugins[{j}]");
                let r =
                    e.plugin_ref
                        .filter(|r| !r.is_empty())
                        .ok_or_else(|| ConfigError::Profile {
                            profile: pname.clone(),
                            message: format!("plugins[{j}] is missing a `pluginRef`"),
                            location: locate::find_value(
                                self.yaml,
                                "schedulingProfiles",
                                "name",
                                &pname,
                                0,
                            ),
                        })?;
                let nth = ref_nth(&r);
                let loc = self.ref_location("schedulingProfiles", &r, nth);
                let Some(pi) = find(plugins, &r) else {
                    return Err(ConfigError::DanglingRef {
                        referrer: format!("{referrer}.pluginRef"),
                        plugin_ref: r,
                        location: loc,
                    });
                };
                let spec = &plugins[pi].spec;
                if let Some(w) = e.weight
                    && (!w.is_finite() || w < 0.0)
                {
                    return Err(ConfigError::Profile {
                        profile: pname.clone(),
                        message: format!(
                            "plugins[{j}] (`{r}`): weight must be a finite number >= 0, got {w}"
                        ),
                        location: loc,
                    });
                }
                match spec.kind() {
                    PluginKind::Scorer => prof.scorers.push(WeightedRef {
                        plugin: r,
                        weight: e.weight.unwrap_or(1.0),
                    }),
                    PluginKind::Picker => {
                        if !prof.picker.is_empty() {
                            return Err(ConfigError::Profile {
                                profile: pname.clone(),
                                message: format!("has two pickers (`{}` and `{r}`)", prof.picker),
                                location: loc,
                            });
                        }
                        prof.picker = r;
                    }
                    _ if spec.is_filter() => prof.filters.push(r),
                    // llm-d lets producers sit in a profile's list; they run once per cycle.
                    PluginKind::DataProducer => {}
                    other => {
                        return Err(ConfigError::WrongKind {
                            referrer: format!("{referrer}.pluginRef"),
                            plugin: r,
                            type_name: spec.type_name().into(),
                            actual: other.as_str(),
                            expected: "filter, scorer or picker",
                            location: loc,
                        });
                    }
                }
            }
            profiles.push(prof);
        }
        let picker_name = match default_picker {
            Some(p) => p,
            None if profiles.iter().any(|p| p.picker.is_empty()) => {
                add_default(plugins, "max-score-picker")
            }
            None => String::new(),
        };
        for p in &mut profiles {
            if p.picker.is_empty() {
                p.picker = picker_name.clone();
            }
        }

        Ok(profiles)
    }

    /// The one profile handler (`single-profile-handler` added for one profile), checked
    /// against the profiles and deciders it names.
    fn profile_handler(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
        profiles: &[ResolvedProfile],
    ) -> Result<String, ConfigError> {
        let handlers: Vec<usize> = plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.spec.kind() == PluginKind::ProfileHandler)
            .map(|(i, _)| i)
            .collect();
        let profile_handler = match handlers.as_slice() {
            [] if profiles.len() == 1 => add_default(plugins, "single-profile-handler"),
            [] => {
                return Err(ConfigError::Field {
                    field: "plugins".into(),
                    message: format!(
                        "{} scheduling profiles need a profile handler plugin (e.g. disagg-profile-handler)",
                        profiles.len()
                    ),
                    location: locate::top_level(self.yaml, "plugins"),
                });
            }
            [h] => plugins[*h].name.clone(),
            [_, second, ..] => {
                return Err(ConfigError::DuplicatePlugin {
                    plugin: format!("{} (a second profile handler)", plugins[*second].name),
                    location: self.plugin_location(plugins, *second),
                });
            }
        };
        let hi = find(plugins, &profile_handler).unwrap_or(0);
        match &plugins[hi].spec {
            PluginSpec::SingleProfileHandler if profiles.len() != 1 => {
                return Err(ConfigError::Profile {
                    profile: profiles
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    message: format!(
                        "single-profile-handler `{profile_handler}` needs exactly one scheduling profile, found {}",
                        profiles.len()
                    ),
                    location: self.plugin_location(plugins, hi),
                });
            }
            spec => {
                // The deprecated handler's fields keep their old names in messages.
                let (d, decode_field, prefill_field) = match spec {
                    PluginSpec::PdProfileHandler(p) => {
                        (p.to_disagg(), "decodeProfile", "deciderPluginName")
                    }
                    PluginSpec::DisaggProfileHandler(d) => {
                        (d.clone(), "profiles.decode", "deciders.prefill")
                    }
                    _ => return Ok(profile_handler),
                };
                let loc = self.plugin_location(plugins, hi);
                let type_name = spec.type_name();
                if !profiles.iter().any(|p| p.name == d.profiles.decode) {
                    return Err(ConfigError::InvalidParameter {
                        plugin: profile_handler.clone(),
                        type_name: type_name.into(),
                        field: decode_field.into(),
                        message: format!("no scheduling profile named `{}`", d.profiles.decode),
                        location: loc,
                    });
                }
                for (field, r) in [
                    (prefill_field, &d.deciders.prefill),
                    ("deciders.encode", &d.deciders.encode),
                ] {
                    if r.is_empty() {
                        continue;
                    }
                    match find(plugins, r) {
                        None => {
                            return Err(ConfigError::DanglingRef {
                                referrer: format!("plugin `{profile_handler}` parameter `{field}`"),
                                plugin_ref: r.clone(),
                                location: loc.map(|l| {
                                    locate::find_field_after(self.yaml, "plugins", l, field)
                                }),
                            });
                        }
                        Some(di) if plugins[di].spec.kind() != PluginKind::Decider => {
                            return Err(ConfigError::WrongKind {
                                referrer: format!("plugin `{profile_handler}` parameter `{field}`"),
                                plugin: r.clone(),
                                type_name: plugins[di].spec.type_name().into(),
                                actual: plugins[di].spec.kind().as_str(),
                                expected: "decider",
                                location: loc,
                            });
                        }
                        Some(_) => {}
                    }
                }
            }
        }

        Ok(profile_handler)
    }

    /// The saturation detector (llm-d `flowControl.saturationDetector.pluginRef`, the
    /// deprecated top-level `saturationDetector.pluginRef`, or GIE 1.x threshold fields);
    /// `section` names where it was written, for errors.
    fn saturation_detector(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
        raw: Option<RawSaturation>,
        section: &str,
        loc: Option<Location>,
    ) -> Result<String, ConfigError> {
        let saturation_detector = match raw {
            None => add_default(plugins, "utilization-detector"),
            Some(sd) => {
                let legacy = sd.queue_depth_threshold.is_some()
                    || sd.kv_cache_util_threshold.is_some()
                    || sd.metrics_staleness_threshold.is_some()
                    || sd.headroom.is_some();
                match sd.plugin_ref.filter(|r| !r.is_empty()) {
                    Some(_) if legacy => {
                        return Err(ConfigError::Field {
                            field: section.into(),
                            message: "set either `pluginRef` or the threshold fields, not both"
                                .into(),
                            location: loc,
                        });
                    }
                    Some(r) => match find(plugins, &r) {
                        None => {
                            return Err(ConfigError::DanglingRef {
                                referrer: format!("{section}.pluginRef"),
                                plugin_ref: r,
                                location: loc,
                            });
                        }
                        Some(i) if plugins[i].spec.kind() != PluginKind::SaturationDetector => {
                            return Err(ConfigError::WrongKind {
                                referrer: format!("{section}.pluginRef"),
                                plugin: r,
                                type_name: plugins[i].spec.type_name().into(),
                                actual: plugins[i].spec.kind().as_str(),
                                expected: "saturation detector",
                                location: loc,
                            });
                        }
                        Some(_) => r,
                    },
                    None => {
                        let mut p = UtilizationParams::default();
                        if let Some(v) = sd.queue_depth_threshold {
                            p.queue_depth_threshold = v;
                        }
                        if let Some(v) = sd.kv_cache_util_threshold {
                            p.kv_cache_util_threshold = v;
                        }
                        if let Some(v) = sd.headroom {
                            p.headroom = v;
                        }
                        if let Some(v) = sd.metrics_staleness_threshold {
                            p.metrics_staleness_threshold = params::go_duration::parse(&v)
                                .map_err(|m| ConfigError::Field {
                                    field: format!("{section}.metricsStalenessThreshold"),
                                    message: m,
                                    location: loc,
                                })?;
                        }
                        if let Err((f, m)) = p.validate() {
                            return Err(ConfigError::Field {
                                field: format!("{section}.{f}"),
                                message: m,
                                location: loc,
                            });
                        }
                        if find(plugins, "utilization-detector").is_some() {
                            return Err(ConfigError::DuplicatePlugin {
                                plugin: "utilization-detector (also defined by saturationDetector thresholds)".into(),
                                location: loc,
                            });
                        }
                        plugins.push(ResolvedPlugin {
                            name: "utilization-detector".into(),
                            written_type: "utilization-detector".into(),
                            spec: PluginSpec::UtilizationDetector(p),
                            defaulted: true,
                        });
                        "utilization-detector".into()
                    }
                }
            }
        };

        Ok(saturation_detector)
    }

    /// The request parsers: `requestHandler.parsers`, else the deprecated top-level
    /// `parser`, else llm-d's default list. A reference to an undeclared plugin named after
    /// a parser type adds that parser, as llm-d does; the list is then registered by llm-d's
    /// rules (duplicate types and parsers after the fallback skipped, with a warning).
    fn parsers(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
        handler: Option<RawRequestHandler>,
        legacy: Option<RawRef>,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<String>, ConfigError> {
        let listed = handler.and_then(|h| h.parsers).filter(|l| !l.is_empty());
        // (plugin name, referrer for errors, where it was written)
        let refs: Vec<(String, String, Option<Location>)> = match (listed, legacy) {
            (Some(list), legacy) => {
                if legacy.is_some() {
                    warnings.push(
                        "top-level `parser` is deprecated and ignored: `requestHandler.parsers` is also set and wins".into(),
                    );
                }
                let mut seen: Vec<&str> = Vec::new();
                let mut refs = Vec::with_capacity(list.len());
                for (i, r) in list.iter().enumerate() {
                    let nth = seen.iter().filter(|n| **n == r.plugin_ref).count();
                    seen.push(&r.plugin_ref);
                    refs.push((
                        r.plugin_ref.clone(),
                        format!("requestHandler.parsers[{i}].pluginRef"),
                        self.ref_location("requestHandler", &r.plugin_ref, nth)
                            .or_else(|| locate::top_level(self.yaml, "requestHandler")),
                    ));
                }
                refs
            }
            (None, Some(r)) => {
                warnings
                    .push("top-level `parser` is deprecated: use `requestHandler.parsers`".into());
                vec![(
                    r.plugin_ref,
                    "parser.pluginRef".into(),
                    locate::top_level(self.yaml, "parser"),
                )]
            }
            (None, None) => DEFAULT_PARSERS
                .iter()
                .map(|p| {
                    let referrer = "requestHandler.parsers (llm-d's default list)".to_owned();
                    (p.type_name().to_owned(), referrer, None)
                })
                .collect(),
        };
        let mut configured = Vec::with_capacity(refs.len());
        for (name, referrer, location) in refs {
            if find(plugins, &name).is_none() {
                // llm-d instantiates an undeclared reference as the type of that name.
                match registry::parse_spec(&name, None) {
                    Ok(PluginSpec::Parser(_)) => {
                        add_default(plugins, &name);
                    }
                    Ok(spec) => {
                        return Err(ConfigError::WrongKind {
                            referrer,
                            plugin: name,
                            type_name: spec.type_name().into(),
                            actual: spec.kind().as_str(),
                            expected: "parser",
                            location,
                        });
                    }
                    Err(SpecError::Unsupported(reason)) => {
                        return Err(ConfigError::UnsupportedPlugin {
                            plugin: name.clone(),
                            type_name: name,
                            reason,
                            location,
                        });
                    }
                    Err(_) => {
                        return Err(ConfigError::DanglingRef {
                            referrer,
                            plugin_ref: name,
                            location,
                        });
                    }
                }
            }
            let i = find(plugins, &name).expect("declared or just added");
            match plugins[i].spec {
                PluginSpec::Parser(parser) => configured.push(ConfiguredParser { name, parser }),
                ref spec => {
                    return Err(ConfigError::WrongKind {
                        referrer,
                        plugin: name,
                        type_name: spec.type_name().into(),
                        actual: spec.kind().as_str(),
                        expected: "parser",
                        location,
                    });
                }
            }
        }
        let (table, skipped) = RequestParsers::new(configured);
        warnings.extend(skipped);
        Ok(table.parsers().map(|p| p.name.clone()).collect())
    }

    /// The prefix producer: the configured one, or one added for prefix consumers (taking
    /// GIE 1.x parameters written on `prefix-cache-scorer`).
    fn prefix_producer(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
    ) -> Result<Option<String>, ConfigError> {
        let approx = plugins
            .iter()
            .position(|p| matches!(p.spec, PluginSpec::ApproxPrefixCacheProducer(_)));
        if let Some(name) = self.precise_producer(plugins, approx)? {
            let gie = plugins.iter().position(|p| {
                matches!(
                    &p.spec,
                    PluginSpec::PrefixCacheScorer(params::PrefixScorerParams {
                        producer: Some(_),
                        ..
                    })
                )
            });
            if let Some(si) = gie {
                return Err(ConfigError::InvalidParameter {
                    plugin: plugins[si].name.clone(),
                    type_name: "prefix-cache-scorer".into(),
                    field: "parameters".into(),
                    message: format!(
                        "approximate prefix parameters do not apply: the prefix producer is the precise-prefix-cache-producer `{name}`"
                    ),
                    location: self.plugin_location(plugins, si),
                });
            }
            return Ok(Some(name));
        }
        let consumer_scorer_params: Vec<(usize, &params::ApproxPrefixParams)> = plugins
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match &p.spec {
                PluginSpec::PrefixCacheScorer(params::PrefixScorerParams {
                    producer: Some(x),
                    ..
                }) => Some((i, x)),
                _ => None,
            })
            .collect();
        let explicit_producer = plugins
            .iter()
            .position(|p| matches!(p.spec, PluginSpec::ApproxPrefixCacheProducer(_)));

        let burst = burst_producer(plugins).map(str::to_owned);
        let needs_prefix = plugins.iter().any(|p| match &p.spec {
            // A scorer reading the burst producer's placement needs no prefix index.
            PluginSpec::PrefixCacheScorer(x) => {
                burst.is_none() || burst.as_deref() != Some(&x.prefix_match_info_producer_name)
            }
            PluginSpec::PrefixCacheAffinityFilter(_)
            | PluginSpec::NoHitLruScorer(_)
            | PluginSpec::PrefixBasedPdDecider(_) => true,
            _ => false,
        });
        let prefix_producer = match explicit_producer {
            Some(i) => {
                if let Some((si, _)) = consumer_scorer_params.first() {
                    return Err(ConfigError::InvalidParameter {
                        plugin: plugins[*si].name.clone(),
                        type_name: "prefix-cache-scorer".into(),
                        field: "parameters".into(),
                        message: format!(
                            "prefix parameters belong on the approx-prefix-cache-producer `{}` that is also configured",
                            plugins[i].name
                        ),
                        location: self.plugin_location(plugins, *si),
                    });
                }
                Some(plugins[i].name.clone())
            }
            None if needs_prefix => {
                let p = match consumer_scorer_params.as_slice() {
                    [] => params::ApproxPrefixParams::default(),
                    [(_, first), rest @ ..] => {
                        if let Some((si, _)) = rest.iter().find(|(_, x)| x != first) {
                            return Err(ConfigError::InvalidParameter {
                                plugin: plugins[*si].name.clone(),
                                type_name: "prefix-cache-scorer".into(),
                                field: "parameters".into(),
                                message: "two prefix-cache-scorers set different prefix parameters; one index serves them all".into(),
                                location: self.plugin_location(plugins, *si),
                            });
                        }
                        (*first).clone()
                    }
                };
                plugins.push(ResolvedPlugin {
                    name: "approx-prefix-cache-producer".into(),
                    written_type: "approx-prefix-cache-producer".into(),
                    spec: PluginSpec::ApproxPrefixCacheProducer(p),
                    defaulted: true,
                });
                Some("approx-prefix-cache-producer".into())
            }
            None => None,
        };

        Ok(prefix_producer)
    }

    /// The precise producer, when one runs: the one declared, or the one a deprecated
    /// `precise-prefix-cache-scorer` stands for (added here). infermesh runs one prefix
    /// producer, so an approx producer beside it is refused.
    fn precise_producer(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
        approx: Option<usize>,
    ) -> Result<Option<String>, ConfigError> {
        let declared: Vec<usize> = (0..plugins.len())
            .filter(|&i| matches!(plugins[i].spec, PluginSpec::PrecisePrefixCacheProducer(_)))
            .collect();
        let wrappers: Vec<usize> = (0..plugins.len())
            .filter(|&i| matches!(plugins[i].spec, PluginSpec::PrecisePrefixCacheScorer(_)))
            .collect();
        let refuse = |i: usize, field: &str, message: String| ConfigError::InvalidParameter {
            plugin: plugins[i].name.clone(),
            type_name: plugins[i].spec.type_name().into(),
            field: field.into(),
            message,
            location: self.plugin_location(plugins, i),
        };
        let first = match (declared.as_slice(), wrappers.as_slice()) {
            ([], []) => return Ok(None),
            ([_, second, ..], _) => {
                return Err(refuse(
                    *second,
                    "type",
                    "a second precise-prefix-cache-producer: infermesh runs one prefix producer"
                        .into(),
                ));
            }
            ([d], [w, ..]) => {
                return Err(refuse(
                    *w,
                    "type",
                    format!(
                        "the deprecated precise-prefix-cache-scorer runs its own producer, and precise-prefix-cache-producer `{}` is also configured; keep the producer and use prefix-cache-scorer",
                        plugins[*d].name
                    ),
                ));
            }
            ([d], []) => *d,
            ([], [w, rest @ ..]) => {
                if let Some(other) = rest.iter().find(|&&o| plugins[o].spec != plugins[*w].spec) {
                    return Err(refuse(
                        *other,
                        "parameters",
                        "two precise-prefix-cache-scorers set different parameters; one index serves them all".into(),
                    ));
                }
                *w
            }
        };
        if let Some(a) = approx {
            return Err(refuse(
                a,
                "type",
                format!(
                    "infermesh runs one prefix producer, and `{}` ({}) is also configured",
                    plugins[first].name,
                    plugins[first].spec.type_name()
                ),
            ));
        }
        if let PluginSpec::PrecisePrefixCacheScorer(p) = &plugins[first].spec {
            let name = "precise-prefix-cache-producer";
            if find(plugins, name).is_some() {
                return Err(refuse(
                    first,
                    "name",
                    format!(
                        "the deprecated scorer adds a producer named `{name}`, and a plugin of that name exists"
                    ),
                ));
            }
            let spec = PluginSpec::PrecisePrefixCacheProducer(p.clone());
            plugins.push(ResolvedPlugin {
                name: name.into(),
                written_type: name.into(),
                spec,
                defaulted: true,
            });
            return Ok(Some(name.into()));
        }
        Ok(Some(plugins[first].name.clone()))
    }

    /// The token producer the precise producer reads: the one declared, else llm-d's
    /// auto-created `estimate` producer (with a warning: estimated ids match no engine's).
    fn token_producer(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
        warnings: &mut Vec<String>,
    ) -> Result<Option<String>, ConfigError> {
        let declared: Vec<usize> = (0..plugins.len())
            .filter(|&i| matches!(plugins[i].spec, PluginSpec::TokenProducer(_)))
            .collect();
        if let [_, second, ..] = declared.as_slice() {
            return Err(ConfigError::InvalidParameter {
                plugin: plugins[*second].name.clone(),
                type_name: "token-producer".into(),
                field: "type".into(),
                message: "a second token-producer: one tokenizes every request".into(),
                location: self.plugin_location(plugins, *second),
            });
        }
        let precise = plugins
            .iter()
            .any(|p| matches!(p.spec, PluginSpec::PrecisePrefixCacheProducer(_)));
        if let Some(&i) = declared.first() {
            if !precise {
                warnings.push(format!(
                    "token-producer `{}`: no precise-prefix-cache-producer reads its tokens, so requests are not tokenized",
                    plugins[i].name
                ));
            }
            return Ok(Some(plugins[i].name.clone()));
        }
        if !precise {
            return Ok(None);
        }
        warnings.push(
            "precise-prefix-cache-producer without a token-producer: llm-d's `estimate` backend is used, whose token ids match no engine's, so precise prefix matches will not be found; configure token-producer with vllm.url or local.tokenizerPath".into(),
        );
        let name = "token-producer";
        if find(plugins, name).is_some() {
            return Err(ConfigError::Field {
                field: "plugins".into(),
                message: format!(
                    "the precise producer needs a token-producer; `{name}` names another plugin"
                ),
                location: None,
            });
        }
        plugins.push(ResolvedPlugin {
            name: name.into(),
            written_type: name.into(),
            spec: PluginSpec::TokenProducer(Default::default()),
            defaulted: true,
        });
        Ok(Some(name.into()))
    }

    /// `dataLayer` sources and extractors, with the metrics source added unless
    /// `injectDefaults: false` or the legacy-metrics gate.
    fn data_layer(
        &self,
        plugins: &mut Vec<ResolvedPlugin>,
        raw: Option<RawDataLayer>,
        inject_metrics: bool,
    ) -> Result<Vec<DataSourceRef>, ConfigError> {
        let mut data_layer = Vec::new();
        let mut inject = inject_metrics;
        if let Some(dl) = raw {
            if dl.inject_defaults == Some(false) {
                inject = false;
            }
            let mut nth_seen: Vec<(String, usize)> = Vec::new();
            let mut nth = |name: &str| -> usize {
                match nth_seen.iter_mut().find(|(n, _)| n == name) {
                    Some((_, c)) => {
                        *c += 1;
                        *c - 1
                    }
                    None => {
                        nth_seen.push((name.to_owned(), 1));
                        0
                    }
                }
            };
            for (i, s) in dl.sources.unwrap_or_default().into_iter().enumerate() {
                let mut check =
                    |r: &str, referrer: String, want: PluginKind| -> Result<(), ConfigError> {
                        let location = self.ref_location("dataLayer", r, nth(r));
                        match find(plugins, r) {
                            None => Err(ConfigError::DanglingRef {
                                referrer,
                                plugin_ref: r.to_owned(),
                                location,
                            }),
                            Some(pi) if plugins[pi].spec.kind() != want => {
                                Err(ConfigError::WrongKind {
                                    referrer,
                                    plugin: r.to_owned(),
                                    type_name: plugins[pi].spec.type_name().into(),
                                    actual: plugins[pi].spec.kind().as_str(),
                                    expected: want.as_str(),
                                    location,
                                })
                            }
                            Some(_) => Ok(()),
                        }
                    };
                check(
                    &s.plugin_ref,
                    format!("dataLayer.sources[{i}].pluginRef"),
                    PluginKind::DataSource,
                )?;
                let mut extractors = Vec::new();
                for (j, e) in s.extractors.unwrap_or_default().into_iter().enumerate() {
                    check(
                        &e.plugin_ref,
                        format!("dataLayer.sources[{i}].extractors[{j}].pluginRef"),
                        PluginKind::DataExtractor,
                    )?;
                    extractors.push(e.plugin_ref);
                }
                data_layer.push(DataSourceRef {
                    source: s.plugin_ref,
                    extractors,
                });
            }
        }
        let has_metrics_source = data_layer.iter().any(|s| {
            matches!(
                find(plugins, &s.source).map(|i| &plugins[i].spec),
                Some(PluginSpec::MetricsDataSource(_))
            )
        });
        if inject && !has_metrics_source {
            let source = add_default(plugins, "metrics-data-source");
            let extractor = add_default(plugins, "core-metrics-extractor");
            data_layer.push(DataSourceRef {
                source,
                extractors: vec![extractor],
            });
        }

        Ok(data_layer)
    }
}

/// Splits a feature gate entry into its name and value (`name` alone means true; the
/// value is read as Go's `strconv.ParseBool` after trimming and lower-casing, as llm-d does).
fn split_gate(g: &str) -> (&str, Option<bool>) {
    match g.split_once('=') {
        None => (g, Some(true)),
        Some((name, v)) => {
            let v = match v.trim().to_ascii_lowercase().as_str() {
                "1" | "t" | "true" => Some(true),
                "0" | "f" | "false" => Some(false),
                _ => None,
            };
            (name, v)
        }
    }
}

/// Whether `gate` is on in `gates` (the last mention wins).
fn gate_enabled(gates: &[String], gate: &str) -> bool {
    gates
        .iter()
        .rev()
        .map(|g| split_gate(g))
        .find(|(name, _)| *name == gate)
        .and_then(|(_, v)| v)
        .unwrap_or(false)
}

/// Index of the plugin named `name`.
/// The name of the configured `burst-prefix-cache-producer`, if any.
pub(crate) fn burst_producer(plugins: &[ResolvedPlugin]) -> Option<&str> {
    plugins
        .iter()
        .find(|p| matches!(p.spec, PluginSpec::BurstPrefixCacheProducer(_)))
        .map(|p| p.name.as_str())
}

fn find(plugins: &[ResolvedPlugin], name: &str) -> Option<usize> {
    plugins.iter().position(|p| p.name == name)
}

/// Adds the registry's default plugin of `type_name` (named after it) unless a plugin of
/// that name exists; returns the name.
fn add_default(plugins: &mut Vec<ResolvedPlugin>, type_name: &str) -> String {
    if find(plugins, type_name).is_none()
        && let Some(spec) = registry::default_spec(type_name)
    {
        plugins.push(ResolvedPlugin {
            name: type_name.to_owned(),
            written_type: type_name.to_owned(),
            spec,
            defaulted: true,
        });
    }
    type_name.to_owned()
}

impl fmt::Display for ResolvedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "EndpointPickerConfig ({})", self.api_version)?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if !self.feature_gates.is_empty() {
            writeln!(f, "featureGates: {}", self.feature_gates.join(", "))?;
        }
        writeln!(f, "plugins:")?;
        for p in &self.plugins {
            let alias = if p.written_type != p.spec.type_name() {
                format!(", written as {}", p.written_type)
            } else {
                String::new()
            };
            writeln!(
                f,
                "  {}  ({} {}{}){}",
                p.name,
                p.spec.kind().as_str(),
                p.spec.type_name(),
                alias,
                if p.defaulted {
                    "  [added by default]"
                } else {
                    ""
                },
            )?;
            match &p.spec {
                PluginSpec::CoreMetricsExtractor(x) => {
                    writeln!(
                        f,
                        "      engineLabelKey {:?}, defaultEngine {:?}",
                        x.engine_label_key, x.default_engine
                    )?;
                    for e in &x.engine_configs {
                        writeln!(
                            f,
                            "      engine {}",
                            serde_json::to_string(e).unwrap_or_default()
                        )?;
                    }
                }
                spec => writeln!(f, "      {}", spec.params_json())?,
            }
        }
        writeln!(f, "schedulingProfiles:")?;
        let primary = match self.plugin(&self.profile_handler).map(|p| &p.spec) {
            Some(PluginSpec::DisaggProfileHandler(d)) => d.profiles.decode.clone(),
            Some(PluginSpec::PdProfileHandler(p)) => p.decode_profile.clone(),
            _ => self
                .profiles
                .first()
                .map(|p| p.name.clone())
                .unwrap_or_default(),
        };
        for p in &self.profiles {
            writeln!(
                f,
                "  {}{}",
                p.name,
                if p.name == primary { " (primary)" } else { "" }
            )?;
            for flt in &p.filters {
                writeln!(f, "    filter  {flt}")?;
            }
            for s in &p.scorers {
                writeln!(f, "    scorer  {}  weight {}", s.plugin, s.weight)?;
            }
            writeln!(f, "    picker  {}", p.picker)?;
        }
        writeln!(f, "profileHandler: {}", self.profile_handler)?;
        writeln!(f, "saturationDetector: {}", self.saturation_detector)?;
        write_parsers(f, &self.request_parsers())?;
        if let Some(p) = &self.prefix_producer {
            writeln!(f, "prefixProducer: {p}")?;
        }
        if let Some(p) = &self.token_producer {
            writeln!(f, "tokenProducer: {p}")?;
        }
        writeln!(f, "dataLayer:")?;
        for s in &self.data_layer {
            writeln!(
                f,
                "  source {} -> extractors [{}]",
                s.source,
                s.extractors.join(", ")
            )?;
        }
        if let Some((name, p)) = self.file_discovery() {
            writeln!(
                f,
                "  discovery {name} (file-discovery {}, watchFile {})",
                p.path, p.watch_file
            )?;
        }
        if let Some(fc) = &self.flow_control {
            write_flow_control(f, fc)?;
        }
        Ok(())
    }
}

fn write_parsers(f: &mut fmt::Formatter<'_>, parsers: &RequestParsers) -> fmt::Result {
    writeln!(
        f,
        "requestHandler.parsers (the longest claimed path suffix wins):"
    )?;
    for p in parsers.parsers() {
        let type_name = p.parser.type_name();
        let alias = if p.name == type_name {
            String::new()
        } else {
            format!(" ({type_name})")
        };
        if p.parser == ParserType::Passthrough {
            writeln!(
                f,
                "  {}{alias}  takes every path no other parser claims, unread",
                p.name
            )?;
        } else {
            writeln!(
                f,
                "  {}{alias}  claims {}",
                p.name,
                p.parser.claims().join(", ")
            )?;
        }
    }
    if !parsers.has_fallback() {
        writeln!(f, "  a path no parser claims is refused with 400")?;
    }
    Ok(())
}

fn write_flow_control(f: &mut fmt::Formatter<'_>, fc: &FlowConfig) -> fmt::Result {
    let cap = |v: Option<std::num::NonZeroU64>| v.map_or("unlimited".to_owned(), |n| n.to_string());
    let ttl = |v: Option<std::time::Duration>| v.map_or("none".to_owned(), |d| format!("{d:?}"));
    let band = |b: &crate::flow::BandConfig| {
        format!(
            "maxRequests {}, maxBytes {}, {}, {}",
            b.max_requests,
            b.max_bytes,
            b.fairness.type_name(),
            b.ordering.type_name()
        )
    };
    writeln!(f, "flowControl:")?;
    writeln!(
        f,
        "  maxRequests {}, maxBytes {}",
        cap(fc.max_requests),
        cap(fc.max_bytes)
    )?;
    writeln!(
        f,
        "  defaultRequestTTL {}, noEndpointRequestTTL {}",
        ttl(fc.default_request_ttl),
        ttl(fc.no_endpoint_request_ttl)
    )?;
    match fc.usage_limit {
        crate::flow::UsageLimitPolicy::Static { threshold } => writeln!(
            f,
            "  usageLimit static-usage-limit-policy threshold {threshold}"
        )?,
        crate::flow::UsageLimitPolicy::PriorityHoldback {
            domain,
            min_ceiling,
            max_ceiling,
            lift_under_share,
        } => {
            write!(
                f,
                "  usageLimit {} domain {} ceilings {max_ceiling} (highest) to {min_ceiling} (lowest)",
                fc.usage_limit.type_name(),
                match domain {
                    crate::flow::HoldbackDomain::Rank => "rank",
                    crate::flow::HoldbackDomain::Value => "value",
                }
            )?;
            match lift_under_share {
                Some(share) => writeln!(
                    f,
                    "; a flow under {share} of its band's mean attained service may use the next higher band's ceiling"
                )?,
                None => writeln!(f)?,
            }
        }
        crate::flow::UsageLimitPolicy::SoftReflective => writeln!(
            f,
            "  usageLimit soft-reflective-ceiling-policy (band i of N: 1 - i*saturation/(N-1))"
        )?,
    }
    writeln!(
        f,
        "  eviction {}",
        if fc.enable_eviction {
            "on (sheddable-eviction-filter, priority-then-time-eviction-order-policy)"
        } else {
            "off"
        }
    )?;
    writeln!(f, "  defaultPriorityBand: {}", band(&fc.default_band))?;
    if let Some(b) = &fc.default_negative_band {
        writeln!(f, "  defaultNegativePriorityBand: {}", band(b))?;
    }
    for (p, b) in &fc.priority_bands {
        writeln!(f, "  band {p}: {}", band(b))?;
    }
    Ok(())
}
