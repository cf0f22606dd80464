//! llm-d example configs load (or are refused clearly), defaults are applied, and bad
//! input gets an error naming the plugin, field and location.

use infermesh_scheduler::config::params::ApproxPrefixParams;
use infermesh_scheduler::config::{ConfigError, PluginSpec};
use infermesh_scheduler::{ResolvedConfig, Scheduler, load_config};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn load_ok(name: &str) -> ResolvedConfig {
    let cfg = load_config(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    Scheduler::new(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
    cfg
}

#[test]
fn default_fixture_equals_builtin_default() {
    let cfg = load_ok("default-config.yaml");
    assert_eq!(cfg, ResolvedConfig::builtin_default());
    let p = &cfg.profiles[0];
    let weights: Vec<(&str, f64)> = p
        .scorers
        .iter()
        .map(|s| (s.plugin.as_str(), s.weight))
        .collect();
    assert_eq!(
        weights,
        vec![
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0)
        ]
    );
    assert_eq!(p.picker, "max-score-picker");
    assert_eq!(cfg.profile_handler, "single-profile-handler");
    assert_eq!(cfg.saturation_detector, "utilization-detector");
    assert_eq!(
        cfg.prefix_producer.as_deref(),
        Some("approx-prefix-cache-producer")
    );
    let (src, ext) = cfg.metrics_source().unwrap();
    assert_eq!(src.path, "/metrics");
    assert_eq!(ext.unwrap().engine_configs.len(), 4);
    let shown = cfg.to_string();
    for needle in [
        "queue-scorer  weight 2",
        "prefix-cache-scorer  weight 3",
        "picker  max-score-picker",
        "\"blockSizeTokens\":16",
        "\"lruCapacityPerServer\":31250",
        "\"maxNumOfEndpoints\":1",
        "\"metricsStalenessThreshold\":\"200ms\"",
        "[added by default]",
    ] {
        assert!(shown.contains(needle), "missing {needle:?} in:\n{shown}");
    }
}

#[test]
fn empty_document_is_the_builtin_default() {
    assert_eq!(
        load_config("# nothing\n").unwrap(),
        ResolvedConfig::builtin_default()
    );
}

#[test]
fn pd_fixture_resolves_disaggregation() {
    let cfg = load_ok("pd-epp-config.yaml");
    assert_eq!(cfg.profile_handler, "disagg-profile-handler");
    assert_eq!(cfg.profiles.len(), 2);
    match &cfg.plugin("disagg-profile-handler").unwrap().spec {
        PluginSpec::DisaggProfileHandler(d) => {
            assert_eq!(d.profiles.decode, "decode");
            assert_eq!(d.profiles.prefill, "prefill");
            assert_eq!(d.deciders.prefill, "prefix-based-pd-decider");
        }
        other => panic!("{other:?}"),
    }
    // The GIE 1.x parameters on prefix-cache-scorer configure the implicit producer.
    match &cfg.plugin("approx-prefix-cache-producer").unwrap().spec {
        PluginSpec::ApproxPrefixCacheProducer(p) => assert_eq!(
            p,
            &ApproxPrefixParams {
                max_prefix_blocks_to_match: 256,
                lru_capacity_per_server: 31250,
                ..ApproxPrefixParams::default()
            }
        ),
        other => panic!("{other:?}"),
    }
    let shown = cfg.to_string();
    assert!(shown.contains("decode (primary)"), "{shown}");
}

#[test]
fn other_llm_d_fixtures_load() {
    let c = load_ok("epp-config.yaml");
    assert_eq!(c.profiles[0].filters, vec!["decode-filter"]);
    let c = load_ok("epp-estimate-prefix-cache-config.yaml");
    assert_eq!(c.api_version, "inference.networking.x-k8s.io/v1alpha1");
    assert_eq!(c.profiles[0].scorers.len(), 2);
    let c = load_ok("sim-epp-no-hit-lru.yaml");
    assert_eq!(
        c.prefix_producer.as_deref(),
        Some("approx-prefix-cache-producer")
    );
    assert!(!c.plugin("approx-prefix-cache-producer").unwrap().defaulted);
}

#[test]
fn label_selector_fixture_accepts_the_old_alias() {
    let c = load_ok("label-selector-config.yaml");
    let p = c.plugin("not-canary").unwrap();
    assert_eq!(p.written_type, "by-label-selector");
    assert!(matches!(p.spec, PluginSpec::LabelSelectorFilter(_)));
    assert_eq!(c.profiles[0].filters, vec!["gpu-h100", "not-canary"]);
    assert_eq!(c.profiles[0].scorers.last().unwrap().weight, 1.0);
    let u = c.utilization();
    assert_eq!(u.queue_depth_threshold, 8);
    assert_eq!(
        u.metrics_staleness_threshold,
        std::time::Duration::from_millis(500)
    );
    assert!(c.to_string().contains("written as by-label-selector"));
}

#[test]
fn precise_prefix_fixture_loads_as_producer_and_scorer() {
    let cfg = load_config(&fixture("epp-precise-prefix-cache-config.yaml")).unwrap();
    assert_eq!(
        cfg.prefix_producer.as_deref(),
        Some("precise-prefix-cache-producer")
    );
    // No token-producer in the file: llm-d's estimate backend is added, and both that
    // and the deprecation are reported.
    assert_eq!(cfg.token_producer.as_deref(), Some("token-producer"));
    assert!(
        cfg.warnings.iter().any(|w| w.contains("deprecated")),
        "{:?}",
        cfg.warnings
    );
    let s = infermesh_scheduler::Scheduler::new(&cfg).unwrap();
    assert_eq!(s.precise_prefix().unwrap().params().block_size(), 64);
}

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

fn err(body: &str) -> ConfigError {
    load_config(&format!("{HEAD}{body}")).unwrap_err()
}

#[test]
fn unknown_type_names_the_plugin_and_line() {
    let e = err("plugins:\n- type: queue-scorer\n- name: mine\n  type: fancy-scorer\n");
    assert_eq!(
        e.to_string(),
        "plugin `mine`: unknown plugin type `fancy-scorer` (at line 6, column 3)"
    );
}

#[test]
fn unknown_and_ill_typed_parameters_name_the_field() {
    let e = err("plugins:\n- type: load-aware-scorer\n  parameters:\n    threshhold: 3\n");
    match &e {
        ConfigError::InvalidParameter {
            plugin,
            field,
            location,
            ..
        } => {
            assert_eq!(plugin, "load-aware-scorer");
            assert_eq!(field, "threshhold");
            assert_eq!(location.unwrap().line, 6);
        }
        other => panic!("{other:?}"),
    }
    let e = err("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: many}\n");
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "maxNumOfEndpoints"),
        "{e}"
    );
    let e = err("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 0}\n");
    assert!(e.to_string().contains("must be >= 1"), "{e}");
    let e = err("plugins:\n- type: queue-scorer\n  parameters:\n    anything: 1\n");
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "anything"),
        "{e}"
    );
    let e = err(
        "plugins:\n- type: utilization-detector\n  parameters:\n    metricsStalenessThreshold: soon\n",
    );
    assert!(e.to_string().contains("metricsStalenessThreshold"), "{e}");
    let e = err(
        "plugins:\n- type: label-selector-filter\n  parameters:\n    matchExpressions:\n    - {key: a, operator: Maybe}\n",
    );
    assert!(
        e.to_string().contains("matchExpressions[0].operator"),
        "{e}"
    );
}

#[test]
fn dangling_and_wrong_kind_refs() {
    let e = err(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n  - pluginRef: ghost\n",
    );
    assert_eq!(
        e.to_string(),
        "schedulingProfiles[a].plugins[1].pluginRef: references undefined plugin `ghost` (at line 9, column 5)"
    );
    let e = err(
        "plugins:\n- type: metrics-data-source\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: metrics-data-source\n",
    );
    assert!(matches!(e, ConfigError::WrongKind { .. }), "{e}");
    let e = err(
        "plugins:\n- type: disagg-profile-handler\n  parameters:\n    deciders: {prefill: nope}\nschedulingProfiles:\n- name: decode\n- name: prefill\n",
    );
    assert!(
        e.to_string().contains("deciders.prefill") && e.to_string().contains("nope"),
        "{e}"
    );
    let e = err("plugins:\n- type: queue-scorer\nsaturationDetector:\n  pluginRef: queue-scorer\n");
    assert!(matches!(e, ConfigError::WrongKind { .. }), "{e}");
}

#[test]
fn header_and_shape_errors() {
    let e = load_config("apiVersion: v1\nkind: EndpointPickerConfig\n").unwrap_err();
    assert!(e.to_string().starts_with("field `apiVersion`"), "{e}");
    let e = load_config("apiVersion: llm-d.ai/v1alpha1\nkind: Pod\n").unwrap_err();
    assert!(e.to_string().starts_with("field `kind`"), "{e}");
    let e = err("plugin:\n- type: queue-scorer\n");
    match &e {
        ConfigError::Yaml {
            message, location, ..
        } => {
            assert!(message.contains("unknown field `plugin`"), "{message}");
            assert_eq!(location.unwrap().line, 3);
        }
        other => panic!("{other:?}"),
    }
    let e = err(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: heavy\n",
    );
    assert_eq!(
        e.to_string(),
        "invalid YAML at `schedulingProfiles[0].plugins[0].weight`: invalid type: string \"heavy\", expected f64 (at line 9, column 13)"
    );
    let e = err(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -1\n",
    );
    assert!(e.to_string().contains("weight must be"), "{e}");
    let e = err("plugins:\n- type: queue-scorer\n- type: queue-scorer\n");
    assert!(matches!(e, ConfigError::DuplicatePlugin { .. }), "{e}");
    let e = err("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n- name: b\n");
    assert!(e.to_string().contains("profile handler"), "{e}");
    let e = err("featureGates: [warpDrive]\n");
    assert!(e.to_string().contains("warpDrive"), "{e}");
    let e = err(": : :\n");
    assert!(matches!(e, ConfigError::Yaml { .. }), "{e}");
}

#[test]
fn defaulting_rules() {
    // No profiles: a default profile with every filter, scorer and picker.
    let c = load_config(&format!(
        "{HEAD}plugins:\n- type: decode-filter\n- type: queue-scorer\n- type: random-picker\n"
    ))
    .unwrap();
    assert_eq!(c.profiles.len(), 1);
    assert_eq!(c.profiles[0].name, "default");
    assert_eq!(c.profiles[0].filters, vec!["decode-filter"]);
    assert_eq!(c.profiles[0].scorers[0].weight, 1.0);
    assert_eq!(c.profiles[0].picker, "random-picker");
    // No picker anywhere: max-score-picker is added.
    let c = load_config(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: x\n  plugins:\n  - pluginRef: queue-scorer\n"
    ))
    .unwrap();
    assert_eq!(c.profiles[0].picker, "max-score-picker");
    assert!(c.plugin("max-score-picker").unwrap().defaulted);
    assert_eq!(c.prefix_producer, None);
    // GIE 1.x saturationDetector thresholds.
    let c = load_config(&format!(
        "{HEAD}saturationDetector:\n  queueDepthThreshold: 9\n  metricsStalenessThreshold: 1s\n"
    ))
    .unwrap();
    assert_eq!(c.utilization().queue_depth_threshold, 9);
}
