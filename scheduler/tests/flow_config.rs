//! The `flowControl` gate and section: llm-d's field names and defaults, and bad values
//! refused with the field named.

use std::num::NonZeroU64;
use std::time::Duration;

use infermesh_scheduler::config::ConfigError;
use infermesh_scheduler::flow::{
    FairnessPolicy, FlowConfig, HoldbackDomain, OrderingPolicy, UsageLimitPolicy,
};
use infermesh_scheduler::{ResolvedConfig, load_config};

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

#[allow(clippy::result_large_err)] // the loader's own error type, as in the other config tests
fn load(body: &str) -> Result<ResolvedConfig, ConfigError> {
    load_config(&format!("{HEAD}{body}"))
}

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap()
}

#[test]
fn gate_alone_gives_llm_d_defaults() {
    let cfg = load("featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n").unwrap();
    let fc = cfg.flow_control.as_ref().expect("gate on");
    let mut want = FlowConfig::default();
    want.priority_bands.insert(0, want.default_band.clone());
    assert_eq!(fc, &want);
    assert_eq!(fc.default_request_ttl, Some(Duration::from_secs(60)));
    assert_eq!(fc.band_config(0).max_requests, nz(5000));
    assert_eq!(fc.band_config(0).max_bytes, nz(1_000_000_000));
    assert_eq!(fc.max_requests, None);
    for t in [
        "fcfs-ordering-policy",
        "global-strict-fairness-policy",
        "static-usage-limit-policy",
    ] {
        assert!(cfg.plugin(t).is_some_and(|p| p.defaulted), "{t} added");
    }
    let shown = cfg.to_string();
    assert!(shown.contains("flowControl:"), "{shown}");
    assert!(
        shown.contains("band 0: maxRequests 5000, maxBytes 1000000000"),
        "{shown}"
    );
}

#[test]
fn without_the_gate_nothing_changes() {
    let plain = load("plugins:\n- type: queue-scorer\n").unwrap();
    assert_eq!(plain.flow_control, None);
    // The section is read strictly but otherwise ignored, as llm-d does.
    let ignored = load(
        "plugins:\n- type: queue-scorer\nflowControl:\n  maxRequests: 10\n  defaultRequestTTL: 5s\n",
    )
    .unwrap();
    assert_eq!(ignored, plain);
    let off = load(
        "featureGates: [\"flowControl=false\"]\nplugins:\n- type: queue-scorer\nflowControl:\n  maxRequests: 10\n",
    )
    .unwrap();
    assert_eq!(off.flow_control, None);
    assert!(!off.feature_enabled("flowControl"));
    let on =
        load("featureGates: [\"flowControl=TRUE\"]\nplugins:\n- type: queue-scorer\n").unwrap();
    assert!(on.feature_enabled("flowControl") && on.flow_control.is_some());
}

#[test]
fn no_endpoint_ttl_follows_a_set_default_ttl_else_a_minute() {
    let ttls = |section: &str| {
        let cfg = load(&format!(
            "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nflowControl:\n{section}"
        ))
        .unwrap();
        let fc = cfg.flow_control.unwrap();
        (fc.default_request_ttl, fc.no_endpoint_request_ttl)
    };
    let s = Duration::from_secs;
    assert_eq!(ttls("  defaultRequestTTL: 5s\n"), (Some(s(5)), Some(s(5))));
    assert_eq!(ttls("  maxRequests: 10\n"), (Some(s(60)), Some(s(60))));
    assert_eq!(ttls("  defaultRequestTTL: 0s\n"), (None, Some(s(60))));
    assert_eq!(
        ttls("  defaultRequestTTL: 5s\n  noEndpointRequestTTL: 20s\n"),
        (Some(s(5)), Some(s(20)))
    );
}

#[test]
fn full_section_resolves() {
    let cfg = load(
        r#"featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: round-robin-fairness-policy
- name: edf
  type: edf-ordering-policy
- type: slo-deadline-ordering-policy
- name: gate
  type: static-usage-limit-policy
  parameters:
    threshold: 0.8
- type: concurrency-detector
flowControl:
  maxBytes: 2Gi
  maxRequests: "1k"
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 0s
  enableEviction: true
  usageLimitPolicyPluginRef: gate
  saturationDetector:
    pluginRef: concurrency-detector
  defaultPriorityBand:
    maxRequests: 100
    fairnessPolicyRef: round-robin-fairness-policy
  defaultNegativePriorityBand:
    maxRequests: 10
    maxBytes: 0
  priorityBands:
  - priority: 10
    maxBytes: 500M
    orderingPolicyRef: edf
  - priority: -1
    orderingPolicyRef: slo-deadline-ordering-policy
    maxRequests: 0
"#,
    )
    .unwrap();
    let fc = cfg.flow_control.as_ref().unwrap();
    assert_eq!(fc.max_bytes, Some(nz(2 << 30)));
    assert_eq!(fc.max_requests, Some(nz(1000)));
    assert_eq!(fc.default_request_ttl, Some(Duration::from_secs(30)));
    assert_eq!(fc.no_endpoint_request_ttl, None, "0s disables");
    assert!(fc.enable_eviction);
    assert_eq!(fc.usage_limit, UsageLimitPolicy::Static { threshold: 0.8 });
    assert_eq!(cfg.saturation_detector, "concurrency-detector");
    assert_eq!(fc.default_band.max_requests, nz(100));
    assert_eq!(fc.default_band.fairness, FairnessPolicy::RoundRobin);
    let neg = fc.default_negative_band.as_ref().unwrap();
    assert_eq!(
        (neg.max_requests, neg.max_bytes),
        (nz(10), nz(1_000_000_000))
    );
    let b10 = &fc.priority_bands[&10];
    assert_eq!(b10.max_bytes, nz(500_000_000));
    assert_eq!(b10.ordering, OrderingPolicy::Edf);
    assert_eq!(
        b10.max_requests,
        nz(5000),
        "explicit bands start from system defaults"
    );
    assert_eq!(b10.fairness, FairnessPolicy::GlobalStrict);
    let m1 = &fc.priority_bands[&-1];
    assert_eq!(m1.ordering, OrderingPolicy::SloDeadline);
    assert_eq!(m1.max_requests, nz(5000), "0 means default");
    assert_eq!(
        fc.priority_bands[&0].max_requests,
        nz(100),
        "band 0 from the template"
    );
    // Templates apply to bands made on the fly.
    assert_eq!(fc.band_config(3).max_requests, nz(100));
    assert_eq!(fc.band_config(-7).max_requests, nz(10));
}

#[test]
fn top_level_saturation_detector_still_read_and_nested_wins() {
    let base = "plugins:\n- type: queue-scorer\n- type: concurrency-detector\n- name: other\n  type: utilization-detector\n";
    let old = load(&format!(
        "{base}saturationDetector:\n  pluginRef: concurrency-detector\n"
    ))
    .unwrap();
    assert_eq!(old.saturation_detector, "concurrency-detector");
    let both = load(&format!(
        "{base}saturationDetector:\n  pluginRef: concurrency-detector\nflowControl:\n  saturationDetector:\n    pluginRef: other\n"
    ))
    .unwrap();
    assert_eq!(both.saturation_detector, "other");
    let err = load(&format!(
        "{base}flowControl:\n  saturationDetector:\n    pluginRef: nope\n"
    ))
    .unwrap_err();
    assert!(
        matches!(&err, ConfigError::DanglingRef { referrer, .. } if referrer == "flowControl.saturationDetector.pluginRef"),
        "{err}"
    );
}

fn gated_err(section: &str) -> ConfigError {
    load(&format!(
        "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- name: rr\n  type: round-robin-fairness-policy\nflowControl:\n{section}"
    ))
    .unwrap_err()
}

fn field_of(e: &ConfigError) -> String {
    match e {
        ConfigError::Field { field, .. } => field.clone(),
        ConfigError::DanglingRef { referrer, .. } | ConfigError::WrongKind { referrer, .. } => {
            referrer.clone()
        }
        ConfigError::Yaml { path, .. } => path.clone(),
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn bad_flow_control_config_names_the_field() {
    let cases = [
        ("  maxBytes: 1GB\n", "flowControl.maxBytes"),
        ("  maxRequests: \"-5\"\n", "flowControl.maxRequests"),
        ("  defaultRequestTTL: 5\n", "flowControl.defaultRequestTTL"),
        (
            "  noEndpointRequestTTL: soon\n",
            "flowControl.noEndpointRequestTTL",
        ),
        (
            "  priorityBands:\n  - priority: 1\n    maxBytes: lots\n",
            "flowControl.priorityBands[0].maxBytes",
        ),
        (
            "  priorityBands:\n  - priority: 1\n  - priority: 1\n",
            "flowControl.priorityBands[1].priority",
        ),
        (
            "  priorityBands:\n  - priority: 2\n    fairnessPolicyRef: missing\n",
            "flowControl.priorityBands[0].fairnessPolicyRef",
        ),
        (
            "  defaultPriorityBand:\n    orderingPolicyRef: rr\n",
            "flowControl.defaultPriorityBand.orderingPolicyRef",
        ),
        (
            "  usageLimitPolicyPluginRef: queue-scorer\n",
            "flowControl.usageLimitPolicyPluginRef",
        ),
        ("  maxQueue: 3\n", "flowControl"),
    ];
    for (section, field) in cases {
        let e = gated_err(section);
        assert!(field_of(&e).starts_with(field), "{section}: {e}");
        assert!(
            e.to_string().contains(field) || field == "flowControl",
            "{e}"
        );
        assert!(e.location().is_some(), "{section}: {e} has no location");
    }
    // The unknown-field error names the field.
    let e = gated_err("  maxQueue: 3\n");
    assert!(e.to_string().contains("maxQueue"), "{e}");
}

#[test]
fn bad_gates_and_policy_params_are_refused() {
    let e = load("featureGates: [\"flowControl=maybe\"]\nplugins:\n- type: queue-scorer\n")
        .unwrap_err();
    assert_eq!(field_of(&e), "featureGates[0]");
    let e = load("featureGates: [fastLane]\nplugins:\n- type: queue-scorer\n").unwrap_err();
    assert_eq!(field_of(&e), "featureGates[0]");
    let e = load("plugins:\n- type: static-usage-limit-policy\n  parameters:\n    threshold: -1\n")
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "threshold"),
        "{e}"
    );
    let e = load("plugins:\n- type: fcfs-ordering-policy\n  parameters:\n    x: 1\n").unwrap_err();
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "x"),
        "{e}"
    );
}

#[test]
fn policy_plugins_load_without_the_gate_and_stay_out_of_profiles() {
    let cfg = load(
        "plugins:\n- type: queue-scorer\n- type: edf-ordering-policy\n- type: sheddable-eviction-filter\n- type: priority-then-time-eviction-order-policy\n",
    )
    .unwrap();
    assert_eq!(cfg.profiles[0].filters, Vec::<String>::new());
    assert_eq!(cfg.profiles[0].scorers.len(), 1);
    infermesh_scheduler::Scheduler::new(&cfg).unwrap();
    let e = load(
        "plugins:\n- type: queue-scorer\n- type: edf-ordering-policy\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: edf-ordering-policy\n",
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::WrongKind { .. }), "{e}");
}

#[test]
fn holdback_and_soft_reflective_usage_limits_load_from_llm_d_config() {
    // The example in llm-d's priority-holdback-policy README.
    let cfg = load(
        "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: priority-holdback-policy\n  name: my-holdback-policy\n  parameters:\n    shape: linear\n    domain: rank\n    minCeiling: 0.4\n    maxCeiling: 0.9\nflowControl:\n  usageLimitPolicyPluginRef: my-holdback-policy\n",
    )
    .unwrap();
    let fc = cfg.flow_control.as_ref().unwrap();
    assert_eq!(
        fc.usage_limit,
        UsageLimitPolicy::PriorityHoldback {
            domain: HoldbackDomain::Rank,
            min_ceiling: 0.4,
            max_ceiling: 0.9,
            lift_under_share: None,
        }
    );
    assert!(
        cfg.to_string()
            .contains("priority-holdback-policy domain rank")
    );
    // Defaults: linear, rank, maxCeiling 1.0.
    let cfg = load(
        "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: priority-holdback-policy\n  parameters:\n    minCeiling: 0.3\n    domain: value\nflowControl:\n  usageLimitPolicyPluginRef: priority-holdback-policy\n",
    )
    .unwrap();
    assert_eq!(
        cfg.flow_control.unwrap().usage_limit,
        UsageLimitPolicy::PriorityHoldback {
            domain: HoldbackDomain::Value,
            min_ceiling: 0.3,
            max_ceiling: 1.0,
            lift_under_share: None,
        }
    );
    let cfg = load(
        "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: soft-reflective-ceiling-policy\nflowControl:\n  usageLimitPolicyPluginRef: soft-reflective-ceiling-policy\n",
    )
    .unwrap();
    assert_eq!(
        cfg.flow_control.unwrap().usage_limit,
        UsageLimitPolicy::SoftReflective
    );
}

#[test]
fn fair_share_holdback_loads_and_needs_a_program_aware_band() {
    let yaml = |fairness: &str| {
        format!(
            "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: program-aware-fairness\n\
             - type: fair-share-holdback-policy\n  name: lift\n  parameters:\n    minCeiling: 0.3\n    domain: value\n\
             flowControl:\n  usageLimitPolicyPluginRef: lift\n  priorityBands:\n  - priority: 0\n    fairnessPolicyRef: {fairness}\n"
        )
    };
    let cfg = load(&yaml("program-aware-fairness")).unwrap();
    let fc = cfg.flow_control.as_ref().unwrap();
    assert_eq!(
        fc.usage_limit,
        UsageLimitPolicy::PriorityHoldback {
            domain: HoldbackDomain::Value,
            min_ceiling: 0.3,
            max_ceiling: 1.0,
            lift_under_share: Some(0.9),
        }
    );
    assert_eq!(fc.usage_limit.type_name(), "fair-share-holdback-policy");
    assert!(
        cfg.to_string()
            .contains("fair-share-holdback-policy domain value"),
        "{cfg}"
    );
    let e = load(&yaml("global-strict-fairness-policy")).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Field { field, .. } if field == "flowControl.usageLimitPolicyPluginRef"),
        "{e}"
    );
    assert!(e.to_string().contains("program-aware-fairness"), "{e}");
}

#[test]
fn bad_holdback_and_soft_reflective_params_name_the_field() {
    let cases = [
        ("type: priority-holdback-policy\n", "minCeiling"),
        (
            "type: priority-holdback-policy\n  parameters:\n    minCeiling: 1.0\n",
            "minCeiling",
        ),
        (
            "type: priority-holdback-policy\n  parameters:\n    minCeiling: 0.5\n    maxCeiling: 0\n",
            "maxCeiling",
        ),
        (
            "type: priority-holdback-policy\n  parameters:\n    minCeiling: 0.8\n    maxCeiling: 0.6\n",
            "minCeiling",
        ),
        (
            "type: priority-holdback-policy\n  parameters:\n    minCeiling: 0.5\n    shape: cubic\n",
            "shape",
        ),
        (
            "type: priority-holdback-policy\n  parameters:\n    minCeiling: 0.5\n    domain: order\n",
            "domain",
        ),
        (
            "type: priority-holdback-policy\n  parameters:\n    minCeiling: 0.5\n    floor: 0.1\n",
            "floor",
        ),
        (
            "type: soft-reflective-ceiling-policy\n  parameters:\n    period: 2\n",
            "period",
        ),
        ("type: fair-share-holdback-policy\n", "minCeiling"),
        (
            "type: fair-share-holdback-policy\n  parameters:\n    minCeiling: 0.5\n    underShare: 0\n",
            "underShare",
        ),
        (
            "type: fair-share-holdback-policy\n  parameters:\n    minCeiling: 0.5\n    underShare: 1.5\n",
            "underShare",
        ),
    ];
    for (plugin, field) in cases {
        let e = load(&format!("plugins:\n- type: queue-scorer\n- {plugin}")).unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidParameter { field: f, .. } if f == field),
            "{plugin}: {e}"
        );
        assert!(e.to_string().contains(field), "{e}");
    }
}

#[test]
fn program_aware_fairness_loads_with_llm_d_names_and_defaults() {
    use infermesh_scheduler::flow::LasParams;
    let cfg = load(
        "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: program-aware-fairness\n\
         flowControl:\n  defaultPriorityBand:\n    fairnessPolicyRef: program-aware-fairness\n",
    )
    .unwrap();
    let fc = cfg.flow_control.as_ref().unwrap();
    let want = LasParams {
        weight_service: 0.8,
        weight_head_wait: 0.2,
        half_life: Some(Duration::from_secs(60)),
        eviction_ttl: Some(Duration::from_secs(3600)),
        eviction_sweep: Duration::from_secs(300),
    };
    assert_eq!(fc.default_band.fairness, FairnessPolicy::ProgramAware(want));
    assert_eq!(fc.las_params(), Some(want));
    assert!(cfg.to_string().contains("program-aware-fairness"));
    let cfg = load(
        "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: program-aware-fairness\n  name: las\n  parameters:\n    strategy: las\n    lasWeightService: 0.7\n    lasWeightHeadWait: 0.3\n    lasHalfLifeSeconds: 0\n    evictionTtlSeconds: 0\n    evictionSweepSeconds: 1.5\n\
         flowControl:\n  priorityBands:\n  - priority: 3\n    fairnessPolicyRef: las\n",
    )
    .unwrap();
    let fc = cfg.flow_control.as_ref().unwrap();
    assert_eq!(
        fc.band_config(3).fairness,
        FairnessPolicy::ProgramAware(LasParams {
            weight_service: 0.7,
            weight_head_wait: 0.3,
            half_life: None,
            eviction_ttl: None,
            eviction_sweep: Duration::from_millis(1500),
        })
    );
    assert_eq!(fc.band_config(0).fairness, FairnessPolicy::GlobalStrict);
}

#[test]
fn bad_program_aware_params_name_the_field() {
    for (params, field) in [
        ("lasWeightService: -0.1", "lasWeightService"),
        ("lasWeightHeadWait: .nan", "lasWeightHeadWait"),
        ("lasHalfLifeSeconds: -1", "lasHalfLifeSeconds"),
        ("evictionTtlSeconds: -1", "evictionTtlSeconds"),
        ("evictionSweepSeconds: 0", "evictionSweepSeconds"),
        ("strategy: wfq", "strategy"),
        ("lasDecay: 0.5", "lasDecay"),
    ] {
        let e = load(&format!(
            "plugins:\n- type: program-aware-fairness\n  parameters:\n    {params}\n"
        ))
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidParameter { field: f, .. } if f == field),
            "{params}: {e}"
        );
    }
}
