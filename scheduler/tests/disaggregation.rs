//! Disaggregation plugins: deciders and profile handlers load with llm-d's parameters (or
//! are refused naming the field), and drive which stages a request goes through.

// The loader's own error type, returned by value as the crate does on this cold path.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use infermesh_scheduler::config::params::{PdDeciderParams, StageOrder};
use infermesh_scheduler::config::{ConfigError, PluginSpec};
use infermesh_scheduler::plugins::profiles::{ENCODERS_HEADER, PREFILLER_HEADER};
use infermesh_scheduler::{
    DecisionFamily, DisaggDecision, Endpoint, InferenceRequest, Metrics, ResolvedConfig, Scheduler,
    load_config,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

fn load(body: &str) -> Result<ResolvedConfig, ConfigError> {
    load_config(&format!("{HEAD}{body}"))
}

fn sched(body: &str) -> Scheduler {
    Scheduler::new(&load(body).unwrap_or_else(|e| panic!("{e}"))).unwrap()
}

fn ep(i: u16, role: &str, now: Instant) -> Endpoint {
    let mut labels = BTreeMap::new();
    if !role.is_empty() {
        labels.insert("llm-d.ai/role".to_owned(), role.to_owned());
    }
    let mut e = Endpoint::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i)), labels);
    e.metrics = Some(Metrics::idle(now));
    e
}

fn req(prompt_len: usize, multimodal: bool) -> InferenceRequest {
    InferenceRequest {
        id: "r".into(),
        model: "m".into(),
        target_model: "m".into(),
        prompt_bytes: (0..prompt_len).map(|i| b'a' + (i % 26) as u8).collect(),
        fairness_id: "default-flow".into(),
        multimodal,
        ..Default::default()
    }
}

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(7)
}

const PROFILES_PD: &str = "schedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}]\n";

#[test]
fn prefix_based_pd_decider_takes_both_llm_d_parameters() {
    let cfg = load(
        "plugins:\n- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 512, promptTokens: 1024}\n",
    )
    .unwrap();
    assert_eq!(
        cfg.plugin("prefix-based-pd-decider").unwrap().spec,
        PluginSpec::PrefixBasedPdDecider(PdDeciderParams {
            non_cached_tokens: 512,
            prompt_tokens: 1024,
        })
    );
    // Both default to 0 (the decider is off until nonCachedTokens is set).
    let cfg = load("plugins:\n- type: prefix-based-pd-decider\n").unwrap();
    assert_eq!(
        cfg.plugin("prefix-based-pd-decider").unwrap().spec,
        PluginSpec::PrefixBasedPdDecider(PdDeciderParams::default())
    );
    for (params, field) in [
        ("{promptTokens: -1}", "promptTokens"),
        ("{nonCachedTokens: -5}", "nonCachedTokens"),
        ("{promptTokens: many}", "promptTokens"),
        ("{nonCachedTokens: 16, minTokens: 3}", "minTokens"),
    ] {
        let e = load(&format!(
            "plugins:\n- type: prefix-based-pd-decider\n  parameters: {params}\n"
        ))
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidParameter { field: f, .. } if f == field),
            "{params}: {e}"
        );
        assert!(e.to_string().contains(field), "{e}");
    }
}

#[test]
fn always_disagg_deciders_load_and_take_no_parameters() {
    for t in [
        "always-disagg-pd-decider",
        "always-disagg-multimodal-decider",
    ] {
        let cfg = load(&format!("plugins:\n- type: {t}\n")).unwrap();
        assert_eq!(cfg.plugin(t).unwrap().spec.type_name(), t);
        let e = load(&format!(
            "plugins:\n- type: {t}\n  parameters: {{always: true}}\n"
        ))
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "always"),
            "{e}"
        );
    }
}

#[test]
fn stage_order_is_read_as_llm_d_spells_it() {
    let order = |v: &str| {
        let cfg = load(&format!(
            "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: prefix-cache-scorer\n- type: disagg-profile-handler\n  parameters: {{stageOrder: {v}}}\n{PROFILES_PD}"
        ))
        .unwrap_or_else(|e| panic!("{v}: {e}"));
        match &cfg.plugin("disagg-profile-handler").unwrap().spec {
            PluginSpec::DisaggProfileHandler(d) => d.stage_order,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(order("decode-first"), StageOrder::DecodeFirst);
    assert_eq!(order("\"\""), StageOrder::DecodeFirst);
    assert_eq!(order("prefill-first"), StageOrder::PrefillFirst);
    assert_eq!(order("Prefill_First"), StageOrder::PrefillFirst);
    assert_eq!(order("prefill"), StageOrder::PrefillFirst);
    let e = load(
        "plugins:\n- type: disagg-profile-handler\n  parameters: {stageOrder: sideways}\nschedulingProfiles:\n- name: decode\n- name: prefill\n",
    )
    .unwrap_err();
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, message, .. }
            if field == "stageOrder" && message.contains("decode-first")),
        "{e}"
    );
    // llm-d refuses a prefill decider in prefill-first: prefill always runs there.
    let e = load(
        "plugins:\n- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n  parameters: {stageOrder: prefill-first, deciders: {prefill: always-disagg-pd-decider}}\nschedulingProfiles:\n- name: decode\n- name: prefill\n",
    )
    .unwrap_err();
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "deciders.prefill"),
        "{e}"
    );
}

#[test]
fn flat_disagg_parameters_load_with_deprecation_warnings() {
    let cfg = load(
        "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n  parameters: {decodeProfile: decode, deciderPluginName: always-disagg-pd-decider}\nschedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}]\n",
    )
    .unwrap();
    assert_eq!(
        cfg.warnings,
        vec![
            "plugin `disagg-profile-handler` (disagg-profile-handler): deprecated parameter `decodeProfile`, use `profiles.decode` instead",
            "plugin `disagg-profile-handler` (disagg-profile-handler): deprecated parameter `deciderPluginName`, use `deciders.prefill` instead",
        ]
    );
}

const PD_HANDLER: &str = "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: prefix-cache-scorer\n- name: my-decider\n  type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 16}\n- type: pd-profile-handler\n  parameters:\n    decodeProfile: dec\n    prefillProfile: pre\n    deciderPluginName: my-decider\n    prefixPluginName: prefix-cache-scorer\nschedulingProfiles:\n- name: dec\n  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer}]\n- name: pre\n  plugins: [{pluginRef: prefill-filter}]\n";

#[test]
fn deprecated_pd_profile_handler_is_accepted_with_its_old_parameters() {
    let cfg = load(PD_HANDLER).unwrap();
    assert_eq!(cfg.profile_handler, "pd-profile-handler");
    match &cfg.plugin("pd-profile-handler").unwrap().spec {
        PluginSpec::PdProfileHandler(p) => {
            let d = p.to_disagg();
            assert_eq!(
                (d.profiles.decode.as_str(), d.profiles.prefill.as_str()),
                ("dec", "pre")
            );
            assert_eq!(d.deciders.prefill, "my-decider");
            assert_eq!(d.stage_order, StageOrder::DecodeFirst);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        cfg.warnings,
        vec![
            "plugin `pd-profile-handler` (pd-profile-handler): pd-profile-handler is deprecated, use disagg-profile-handler instead",
            "plugin `pd-profile-handler` (pd-profile-handler): deprecated parameter `prefixPluginName` is ignored",
        ]
    );
    // `config check` prints the configuration's Display: the warnings come first.
    let shown = cfg.to_string();
    assert!(
        shown.contains("warning: plugin `pd-profile-handler` (pd-profile-handler): pd-profile-handler is deprecated"),
        "{shown}"
    );
    assert!(shown.contains("dec (primary)"), "{shown}");

    // It runs as the disagg handler and counts into pd_decision_total.
    let s = Scheduler::new(&cfg).unwrap();
    let c = s.decision_counter().unwrap();
    assert_eq!(
        (c.family, c.plugin_name.as_str(), c.plugin_type),
        (
            DecisionFamily::Pd,
            "pd-profile-handler",
            "pd-profile-handler"
        )
    );
    let now = Instant::now();
    let eps = vec![ep(0, "prefill", now), ep(1, "decode", now)];
    let res = s.schedule(&req(400, false), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.primary_profile, "dec");
    assert_eq!(res.profiles["pre"].targets, vec![eps[0].address]);
    assert_eq!(res.decision, Some(DisaggDecision::PrefillDecode));
}

#[test]
fn pd_profile_handler_refusals_name_the_field() {
    let with = |extra: &str| {
        load(&PD_HANDLER.replace(
            "    deciderPluginName: my-decider\n",
            &format!("    deciderPluginName: my-decider\n{extra}"),
        ))
    };
    for (extra, field) in [
        ("    primaryPort: 8000\n", "primaryPort"),
        ("    primaryPort: 70000\n", "primaryPort"),
        ("    encodeProfile: e\n", "encodeProfile"),
        (
            "    prefixMatchInfoProducerName: other\n",
            "prefixMatchInfoProducerName",
        ),
    ] {
        let e = with(extra).unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidParameter { field: f, .. } if f == field),
            "{extra}: {e}"
        );
    }
    // Naming the producer that runs is fine.
    with("    prefixMatchInfoProducerName: approx-prefix-cache-producer\n").unwrap();
    // The default decider name must exist, as in llm-d.
    let e = load(
        "plugins:\n- type: pd-profile-handler\nschedulingProfiles:\n- name: decode\n- name: prefill\n",
    )
    .unwrap_err();
    assert!(
        matches!(&e, ConfigError::DanglingRef { referrer, plugin_ref, .. }
            if referrer.contains("deciderPluginName") && plugin_ref == "prefix-based-pd-decider"),
        "{e}"
    );
    let e = load(&PD_HANDLER.replace("deciderPluginName: my-decider", "deciderPluginName: \"\""))
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "deciderPluginName"),
        "{e}"
    );
}

const EPD: &str = "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: encode-filter\n- type: always-disagg-multimodal-decider\n- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n  parameters:\n    deciders: {encode: always-disagg-multimodal-decider, prefill: always-disagg-pd-decider}\nschedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}]\n- name: encode\n  plugins: [{pluginRef: encode-filter}]\n";

#[test]
fn multimodal_decider_runs_encode_only_for_multimodal_requests() {
    let now = Instant::now();
    let eps = vec![
        ep(0, "encode", now),
        ep(1, "prefill", now),
        ep(2, "decode", now),
    ];
    let s = sched(EPD);
    let res = s.schedule(&req(100, true), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.destinations(), &[eps[2].address]);
    assert_eq!(res.profiles["encode"].targets, vec![eps[0].address]);
    assert_eq!(res.decision, Some(DisaggDecision::EncodePrefillDecode));
    assert_eq!(
        res.request_headers,
        vec![
            (PREFILLER_HEADER.to_owned(), eps[1].address.to_string()),
            (ENCODERS_HEADER.to_owned(), eps[0].address.to_string()),
        ]
    );
    let res = s.schedule(&req(100, false), &eps, now, &mut rng()).unwrap();
    assert!(!res.profiles.contains_key("encode"));
    assert_eq!(res.decision, Some(DisaggDecision::PrefillDecode));
    assert!(
        res.request_headers
            .iter()
            .all(|(h, _)| h != ENCODERS_HEADER)
    );

    // Encode without a prefill stage.
    let s = sched(&EPD.replace(", prefill: always-disagg-pd-decider", ""));
    let res = s.schedule(&req(100, true), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.decision, Some(DisaggDecision::EncodeDecode));
    let res = s.schedule(&req(100, false), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.decision, Some(DisaggDecision::DecodeOnly));
}

#[test]
fn prefill_first_runs_prefill_whenever_its_profile_exists() {
    let s = sched(&EPD.replace(
        "    deciders: {encode: always-disagg-multimodal-decider, prefill: always-disagg-pd-decider}\n",
        "    stageOrder: prefill-first\n    deciders: {encode: always-disagg-multimodal-decider}\n",
    ));
    let now = Instant::now();
    let eps = vec![
        ep(0, "encode", now),
        ep(1, "prefill", now),
        ep(2, "decode", now),
    ];
    let res = s.schedule(&req(8, false), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.primary_profile, "decode");
    assert_eq!(res.destinations(), &[eps[2].address]);
    assert_eq!(res.profiles["prefill"].targets, vec![eps[1].address]);
    assert_eq!(res.decision, Some(DisaggDecision::PrefillDecode));
    // The encode decider is asked without a decode pick.
    let res = s.schedule(&req(8, true), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.decision, Some(DisaggDecision::EncodePrefillDecode));
    // No prefill pod: decode still runs, the request is decode-only.
    let res = s
        .schedule(&req(8, false), &eps[2..], now, &mut rng())
        .unwrap();
    assert_eq!(res.destinations(), &[eps[2].address]);
    assert_eq!(res.decision, Some(DisaggDecision::DecodeOnly));
}

#[test]
fn both_pods_of_a_disaggregated_pick_are_recorded_in_the_prefix_index() {
    let s = sched(&format!(
        "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: prefix-cache-scorer\n- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n  parameters: {{deciders: {{prefill: always-disagg-pd-decider}}}}\n{}",
        "schedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer}]\n"
    ));
    let now = Instant::now();
    let eps = vec![
        ep(0, "prefill", now),
        ep(1, "prefill", now),
        ep(2, "decode", now),
        ep(3, "decode", now),
    ];
    let r = req(2000, false);
    let res = s.schedule(&r, &eps, now, &mut rng()).unwrap();
    let (decode, prefill) = (res.destinations()[0], res.profiles["prefill"].targets[0]);
    assert_eq!(
        res.cache_targets
            .iter()
            .map(|(a, _)| *a)
            .collect::<Vec<_>>(),
        vec![decode, prefill]
    );
    s.pre_request(&r, &res, now);
    let idx = s.prefix_index().unwrap();
    let hashes = &res.prefix_match.as_ref().unwrap().hashes;
    for h in hashes {
        assert!(idx.contains(decode, *h) && idx.contains(prefill, *h));
    }
    for other in eps.iter().map(|e| e.address) {
        if other != decode && other != prefill {
            assert!(!idx.contains(other, hashes[0]), "{other} recorded");
        }
    }
    // The next request with the prompt scores both: the same pods win each profile.
    let res2 = s.schedule(&r, &eps, now, &mut rng()).unwrap();
    assert_eq!(res2.destinations()[0], decode);
    assert_eq!(res2.profiles["prefill"].targets[0], prefill);
    assert_eq!(
        res2.prefix_match.unwrap().matched_blocks as usize,
        hashes.len()
    );
}

#[test]
fn single_profile_handler_counts_no_decision() {
    let s = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
    assert!(s.decision_counter().is_none());
    let now = Instant::now();
    let res = s
        .schedule(&req(10, false), &[ep(0, "", now)], now, &mut rng())
        .unwrap();
    assert_eq!(res.decision, None);
}

#[test]
fn prefer_if_available_is_read_as_rfc_7240() {
    let with = |v: &str| {
        let mut r = req(1, false);
        r.headers.insert("prefer".into(), v.into());
        r.prefers_if_available()
    };
    assert!(with("if-available"));
    assert!(with("respond-async, If-Available ; x=1"));
    assert!(!with("if-availablex"));
    assert!(!with("return=minimal"));
    assert!(!req(1, false).prefers_if_available());
}
