//! llm-d v0.10's new plugins (issue 19): `utilization-filter`, `topology-extractor` with
//! `topology-affinity-filter` / `topology-affinity-scorer`, `header-label-affinity-scorer`.
//! Fixtures from llm-d's documentation load with llm-d's resolved parameters; the tests
//! check which endpoints pass, how they rank, and that bad input names its field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use infermesh_scheduler::config::params::{
    TopologyExtractorParams, TopologyLevel, UtilizationCondition, UtilizationMetric,
};
use infermesh_scheduler::config::{ConfigError, NameStatus, PluginSpec, name_status};
use infermesh_scheduler::{
    Endpoint, InferenceRequest, Metrics, ResolvedConfig, ScheduleError, Scheduler, load_config,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

#[allow(clippy::result_large_err)] // the loader's own error type, matched by the tests
fn load(body: &str) -> Result<ResolvedConfig, ConfigError> {
    load_config(&format!("{HEAD}{body}"))
}

fn fixture(name: &str) -> ResolvedConfig {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let cfg =
        load_config(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    Scheduler::new(&cfg).unwrap();
    cfg
}

fn sched(body: &str) -> Scheduler {
    Scheduler::new(&load(body).unwrap_or_else(|e| panic!("{e}"))).unwrap()
}

/// The field an `InvalidParameter` error names (panics on any other outcome).
fn bad_field(body: &str) -> String {
    match load(body) {
        Err(ConfigError::InvalidParameter { field, .. }) => field,
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
}

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 8000 + i))
}

fn ep(i: u16, labels: &[(&str, &str)], now: Instant) -> Endpoint {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut e = Endpoint::new(addr(i), labels);
    e.metrics = Some(Metrics::idle(now));
    e
}

fn req(prompt_len: usize) -> InferenceRequest {
    InferenceRequest {
        id: "r".into(),
        model: "m".into(),
        target_model: "m".into(),
        prompt_bytes: (0..prompt_len).map(|i| b'a' + (i % 26) as u8).collect(),
        fairness_id: "default-flow".into(),
        ..Default::default()
    }
}

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(7)
}

/// The addresses that passed the primary profile's filters.
fn passed(s: &Scheduler, r: &InferenceRequest, eps: &[Endpoint]) -> Vec<SocketAddr> {
    let res = s.schedule(r, eps, Instant::now(), &mut rng()).unwrap();
    let mut v: Vec<SocketAddr> = res.primary_scores.by_address(eps).map(|(a, _)| a).collect();
    v.sort();
    v
}

// ---- utilization-filter ----

#[test]
fn utilization_filter_fixture_loads_as_llm_d_resolves_it() {
    let cfg = fixture("v010-utilization-filter.yaml");
    let Some(PluginSpec::UtilizationFilter(p)) =
        cfg.plugin("drop-overloaded-endpoints").map(|p| &p.spec)
    else {
        panic!("utilization-filter missing");
    };
    let c = |metric, v: f64| UtilizationCondition {
        metric,
        max_value: Some(v),
    };
    assert_eq!(
        p.conditions,
        vec![
            c(UtilizationMetric::RunningRequests, 40.0),
            c(UtilizationMetric::WaitingQueue, 0.0),
            c(UtilizationMetric::KvCacheUtilization, 0.8),
        ]
    );
    assert!(p.fallback_on_empty);
    assert!(p.in_flight_load_producer_name.is_empty());
    assert_eq!(cfg.profiles[0].filters, vec!["drop-overloaded-endpoints"]);
}

fn loaded(now: Instant, i: u16, running: u32, queue: u32, kv: f64) -> Endpoint {
    let mut e = ep(i, &[], now);
    let m = e.metrics.as_mut().unwrap();
    m.running = running;
    m.waiting_queue = queue;
    m.kv_cache_usage = kv;
    e
}

#[test]
fn utilization_filter_drops_an_endpoint_over_any_cap() {
    let cfg = fixture("v010-utilization-filter.yaml");
    let s = Scheduler::new(&cfg).unwrap();
    let now = Instant::now();
    let mut never_scraped = ep(5, &[], now);
    never_scraped.metrics = None;
    let eps = vec![
        loaded(now, 0, 40, 0, 0.8), // exactly at every cap: kept
        loaded(now, 1, 41, 0, 0.1), // running over
        loaded(now, 2, 1, 1, 0.1),  // queue over
        loaded(now, 3, 1, 0, 0.81), // KV over
        loaded(now, 4, 0, 0, 0.0),
        never_scraped, // missing metrics count as 0: kept
    ];
    assert_eq!(passed(&s, &req(10), &eps), vec![addr(0), addr(4), addr(5)]);
}

#[test]
fn utilization_filter_falls_back_to_every_candidate_only_when_asked() {
    let now = Instant::now();
    let eps = vec![loaded(now, 0, 50, 3, 0.9), loaded(now, 1, 60, 0, 0.1)];
    let s = Scheduler::new(&fixture("v010-utilization-filter.yaml")).unwrap();
    assert_eq!(passed(&s, &req(10), &eps), vec![addr(0), addr(1)]);

    let strict = sched(
        "plugins:\n- type: utilization-filter\n  parameters:\n    conditions: [{metric: running-requests, maxValue: 40}]\n",
    );
    assert_eq!(
        strict
            .schedule(&req(10), &eps, now, &mut rng())
            .unwrap_err(),
        ScheduleError::NoEndpoints,
        "fallbackOnEmpty defaults to false"
    );
}

#[test]
fn utilization_filter_active_requests_reads_the_fleet_in_flight_count() {
    let now = Instant::now();
    let s = sched(
        "plugins:\n- type: utilization-filter\n  parameters:\n    conditions: [{metric: active-requests, maxValue: 2}]\n",
    );
    let mut eps: Vec<Endpoint> = (0..3).map(|i| ep(i, &[], now)).collect();
    eps[0].in_flight.requests = 2;
    eps[1].in_flight.requests = 3;
    // Running and queued count too: the scrape does not matter for this metric.
    eps[2].metrics.as_mut().unwrap().running = 99;
    assert_eq!(passed(&s, &req(10), &eps), vec![addr(0), addr(2)]);
}

#[test]
fn utilization_filter_refuses_bad_input_naming_the_field() {
    let f = |params: &str| {
        bad_field(&format!(
            "plugins:\n- type: utilization-filter\n  parameters: {params}\n"
        ))
    };
    assert_eq!(
        bad_field("plugins:\n- type: utilization-filter\n"),
        "conditions"
    );
    assert_eq!(f("{conditions: []}"), "conditions");
    assert_eq!(
        f("{conditions: [{metric: gpu-temp, maxValue: 1}]}"),
        "conditions[0].metric"
    );
    assert_eq!(
        f("{conditions: [{metric: waiting-queue}]}"),
        "conditions[0].maxValue"
    );
    assert_eq!(
        f(
            "{conditions: [{metric: waiting-queue, maxValue: 1}, {metric: running-requests, maxValue: -1}]}"
        ),
        "conditions[1].maxValue"
    );
    assert_eq!(
        f("{conditions: [{metric: kv-cache-utilization, maxValue: 80}]}"),
        "conditions[0].maxValue",
        "a KV fraction above 1"
    );
    assert_eq!(
        f("{conditions: [{metric: waiting-queue, maxValue: 1, op: le}]}"),
        "conditions[0].op"
    );
    assert_eq!(
        f("{conditions: [{metric: waiting-queue, maxValue: 1}], fallback: true}"),
        "fallback"
    );
    assert_eq!(
        f("{conditions: [{metric: active-requests, maxValue: 1}], inFlightLoadProducerName: nope}"),
        "inFlightLoadProducerName"
    );
    // Naming a configured producer is fine.
    load("plugins:\n- type: inflight-load-producer\n  name: ifl\n- type: utilization-filter\n  parameters: {conditions: [{metric: active-requests, maxValue: 1}], inFlightLoadProducerName: ifl}\n").unwrap();
}

#[test]
fn active_request_filter_is_refused_pointing_at_its_new_name() {
    let e = load("plugins:\n- type: active-request-filter\n").unwrap_err();
    let ConfigError::UnsupportedPlugin { reason, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(reason.contains("utilization-filter"), "{reason}");
    assert!(matches!(
        name_status("active-request-filter"),
        NameStatus::Refused(_)
    ));
}

// ---- topology ----

const HOST: &str = "kubernetes.io/hostname";
const RACK: &str = "topology.kubernetes.io/rack";
const ZONE: &str = "topology.kubernetes.io/zone";
const REGION: &str = "topology.kubernetes.io/region";
const ROLE: &str = "llm-d.ai/role";

#[test]
fn pd_topology_fixture_loads_with_llm_d_defaults() {
    let cfg = fixture("v010-pd-topology.yaml");
    let Some(PluginSpec::TopologyExtractor(x)) = cfg.plugin("topology-extractor").map(|p| &p.spec)
    else {
        panic!("topology-extractor missing");
    };
    assert_eq!(
        (
            x.hostname.as_str(),
            x.rack.as_str(),
            x.zone.as_str(),
            x.region.as_str()
        ),
        (HOST, RACK, ZONE, REGION)
    );
    let Some(PluginSpec::TopologyAffinityFilter(f)) =
        cfg.plugin("topology-affinity-filter").map(|p| &p.spec)
    else {
        panic!("topology-affinity-filter missing");
    };
    assert_eq!(f.min_affinity, TopologyLevel::Host, "llm-d's default");
    assert_eq!(f.labels.as_ref(), Some(x));
    let Some(PluginSpec::TopologyAffinityScorer(sc)) =
        cfg.plugin("topology-affinity-scorer").map(|p| &p.spec)
    else {
        panic!("topology-affinity-scorer missing");
    };
    assert_eq!(sc.labels.as_ref(), Some(x));
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    // An empty label name takes the default, as llm-d's factory does.
    let cfg =
        load("plugins:\n- type: topology-extractor\n  parameters: {hostname: '', zone: my/zone}\n")
            .unwrap();
    let Some(PluginSpec::TopologyExtractor(x)) = cfg.plugin("topology-extractor").map(|p| &p.spec)
    else {
        panic!()
    };
    assert_eq!(x.hostname, HOST);
    assert_eq!(x.zone, "my/zone");
    assert_eq!(x.rack, TopologyExtractorParams::DEFAULT_RACK);
}

/// A long uncached prompt: the fixture's prefix-based-pd-decider (16 tokens) splits it.
fn pd_req() -> InferenceRequest {
    req(4000)
}

fn prefill_pick(s: &Scheduler, eps: &[Endpoint]) -> SocketAddr {
    let res = s
        .schedule(&pd_req(), eps, Instant::now(), &mut rng())
        .unwrap();
    assert_eq!(res.destinations(), &[addr(0)], "decode pick");
    res.profiles["prefill"].targets[0]
}

#[test]
fn topology_filter_keeps_the_prefill_pods_on_the_decode_pods_host() {
    let now = Instant::now();
    let s = Scheduler::new(&fixture("v010-pd-topology.yaml")).unwrap();
    let mut eps = vec![
        ep(
            0,
            &[(ROLE, "decode"), (HOST, "h1"), (RACK, "r1"), (ZONE, "z1")],
            now,
        ),
        ep(
            1,
            &[(ROLE, "prefill"), (HOST, "h2"), (RACK, "r1"), (ZONE, "z1")],
            now,
        ),
        ep(
            2,
            &[(ROLE, "prefill"), (HOST, "h1"), (RACK, "r1"), (ZONE, "z1")],
            now,
        ),
        ep(3, &[(ROLE, "prefill"), (ZONE, "z1")], now),
    ];
    // The co-located prefill pod is the busiest; the filter still keeps only it.
    eps[2].metrics.as_mut().unwrap().waiting_queue = 9;
    assert_eq!(prefill_pick(&s, &eps), addr(2));
}

#[test]
fn topology_filter_fails_open_and_the_scorer_prefers_the_tightest_tier() {
    let now = Instant::now();
    let s = Scheduler::new(&fixture("v010-pd-topology.yaml")).unwrap();
    // No prefill pod shares the decode pod's host: every candidate stays, and the scorer
    // ranks rack (0.2) over zone (0.05) over region (0.02) over nothing.
    let decode = ep(
        0,
        &[
            (ROLE, "decode"),
            (HOST, "h1"),
            (RACK, "r1"),
            (ZONE, "z1"),
            (REGION, "g1"),
        ],
        now,
    );
    let region = ep(
        1,
        &[
            (ROLE, "prefill"),
            (HOST, "h4"),
            (RACK, "r4"),
            (ZONE, "z4"),
            (REGION, "g1"),
        ],
        now,
    );
    let zone = ep(
        2,
        &[
            (ROLE, "prefill"),
            (HOST, "h3"),
            (RACK, "r3"),
            (ZONE, "z1"),
            (REGION, "g1"),
        ],
        now,
    );
    let rack = ep(
        3,
        &[
            (ROLE, "prefill"),
            (HOST, "h2"),
            (RACK, "r1"),
            (ZONE, "z1"),
            (REGION, "g1"),
        ],
        now,
    );
    let far = ep(4, &[(ROLE, "prefill"), (HOST, "h5")], now);
    let eps = vec![
        decode.clone(),
        region.clone(),
        zone.clone(),
        rack,
        far.clone(),
    ];
    assert_eq!(prefill_pick(&s, &eps), addr(3));
    let eps = vec![decode.clone(), region.clone(), zone, far.clone()];
    assert_eq!(prefill_pick(&s, &eps), addr(2));
    let eps = vec![decode.clone(), far.clone(), region];
    assert_eq!(prefill_pick(&s, &eps), addr(1));
    // The peer's host is unknown and so is every candidate's: empty never matches empty.
    let bare_decode = ep(0, &[(ROLE, "decode"), (ZONE, "z9")], now);
    let mut a = ep(1, &[(ROLE, "prefill")], now);
    a.metrics.as_mut().unwrap().waiting_queue = 1;
    let b = ep(2, &[(ROLE, "prefill")], now);
    assert_eq!(
        prefill_pick(&s, &[bare_decode, a, b]),
        addr(2),
        "queue decides"
    );
}

#[test]
fn topology_filter_min_affinity_zone_keeps_rack_and_zone_mates_only() {
    let now = Instant::now();
    let s = sched(
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: always-disagg-pd-decider\n- type: topology-extractor\n- type: random-picker\n- type: topology-affinity-filter\n  parameters: {minAffinity: zone}\n- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\nschedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: topology-affinity-filter}, {pluginRef: random-picker}]\n",
    );
    let eps = vec![
        ep(
            0,
            &[
                (ROLE, "decode"),
                (HOST, "h1"),
                (RACK, "r1"),
                (ZONE, "z1"),
                (REGION, "g1"),
            ],
            now,
        ),
        ep(1, &[(ROLE, "prefill"), (HOST, "h2"), (RACK, "r1")], now),
        ep(2, &[(ROLE, "prefill"), (HOST, "h3"), (ZONE, "z1")], now),
        ep(
            3,
            &[
                (ROLE, "prefill"),
                (HOST, "h4"),
                (ZONE, "z2"),
                (REGION, "g1"),
            ],
            now,
        ),
        ep(4, &[(ROLE, "prefill")], now), // no topology: dropped when others qualify
    ];
    let mut picked = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let res = s
            .schedule(&req(100), &eps, now, &mut ChaCha8Rng::seed_from_u64(seed))
            .unwrap();
        picked.insert(res.profiles["prefill"].targets[0]);
    }
    assert_eq!(picked, [addr(1), addr(2)].into_iter().collect());
}

#[test]
fn topology_prefill_first_places_decode_against_the_prefill_pick() {
    let now = Instant::now();
    let s = sched(
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: queue-scorer\n- type: topology-extractor\n  name: topo\n  parameters: {hostname: node}\n- type: topology-affinity-scorer\n  parameters: {topologyProducerName: topo}\n- type: disagg-profile-handler\n  parameters: {stageOrder: prefill-first}\nschedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: topology-affinity-scorer, weight: 5}, {pluginRef: queue-scorer}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]\n",
    );
    let mut eps = vec![
        ep(0, &[(ROLE, "prefill"), ("node", "n2")], now),
        ep(1, &[(ROLE, "decode"), ("node", "n1")], now),
        ep(2, &[(ROLE, "decode"), ("node", "n2")], now),
        ep(3, &[(ROLE, "prefill"), ("node", "n1")], now),
    ];
    // The prefill pod on n1 is busier, so prefill picks n2; decode follows it to n2 even
    // though that decode pod is the busier one.
    eps[3].metrics.as_mut().unwrap().waiting_queue = 4;
    eps[2].metrics.as_mut().unwrap().waiting_queue = 4;
    let res = s.schedule(&req(100), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.profiles["prefill"].targets[0], addr(0));
    assert_eq!(res.destinations()[0], addr(2));
    let scores: BTreeMap<SocketAddr, f64> = res.primary_scores.by_address(&eps).collect();
    assert_eq!(scores[&addr(2)], 5.0, "host match (1.0 × 5), queue 0");
    assert_eq!(scores[&addr(1)], 1.0, "no tier shared, lowest queue");
}

#[test]
fn topology_plugins_without_an_extractor_warn_and_see_no_topology() {
    let now = Instant::now();
    let cfg = load(
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: random-picker\n- type: always-disagg-pd-decider\n- type: topology-affinity-filter\n- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\nschedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: topology-affinity-filter}, {pluginRef: random-picker}]\n",
    )
    .unwrap();
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].contains("no topology-extractor named `topology-extractor`"));
    let s = Scheduler::new(&cfg).unwrap();
    let eps = vec![
        ep(0, &[(ROLE, "decode"), (HOST, "h1")], now),
        ep(1, &[(ROLE, "prefill"), (HOST, "h1")], now),
        ep(2, &[(ROLE, "prefill"), (HOST, "h2")], now),
    ];
    let mut picked = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let res = s
            .schedule(&req(100), &eps, now, &mut ChaCha8Rng::seed_from_u64(seed))
            .unwrap();
        picked.insert(res.profiles["prefill"].targets[0]);
    }
    assert_eq!(picked.len(), 2, "no extractor, no restriction");
}

#[test]
fn topology_bad_input_names_the_field() {
    assert_eq!(
        bad_field(
            "plugins:\n- type: topology-affinity-filter\n  parameters: {minAffinity: galaxy}\n"
        ),
        "minAffinity"
    );
    assert_eq!(
        bad_field(
            "plugins:\n- type: topology-affinity-scorer\n  parameters: {minAffinity: host}\n"
        ),
        "minAffinity",
        "the scorer has no minAffinity"
    );
    assert_eq!(
        bad_field("plugins:\n- type: topology-extractor\n  parameters: {datacenter: dc}\n"),
        "datacenter"
    );
}

// ---- header-label-affinity-scorer ----

#[test]
fn header_label_affinity_fixture_scores_label_matches_by_weight() {
    let cfg = fixture("v010-header-label-affinity.yaml");
    let Some(PluginSpec::HeaderLabelAffinityScorer(p)) =
        cfg.plugin("slice-affinity").map(|p| &p.spec)
    else {
        panic!("slice-affinity missing");
    };
    assert_eq!(p.header_name, "x-disagg-slice");
    assert_eq!(p.label_key, "disaggregatedset.x-k8s.io/slice");
    let s = Scheduler::new(&cfg).unwrap();
    let now = Instant::now();
    let slice = "disaggregatedset.x-k8s.io/slice";
    let eps = vec![
        ep(0, &[(slice, "0"), (ZONE, "a")], now),
        ep(1, &[(slice, "1"), (ZONE, "a")], now),
        ep(2, &[(slice, "1"), (ZONE, "b")], now),
        ep(3, &[], now),
    ];
    let mut r = req(10);
    r.headers.insert("x-disagg-slice".into(), "1".into());
    r.headers.insert("x-preferred-zone".into(), "a".into());
    let res = s.schedule(&r, &eps, now, &mut rng()).unwrap();
    let scores: BTreeMap<SocketAddr, f64> = res.primary_scores.by_address(&eps).collect();
    assert_eq!(
        scores,
        [
            (addr(0), 1.0),
            (addr(1), 4.0),
            (addr(2), 3.0),
            (addr(3), 0.0)
        ]
        .into_iter()
        .collect()
    );
    // No header, or a value no endpoint has: every endpoint scores 0 and stays eligible.
    let res = s.schedule(&req(10), &eps, now, &mut rng()).unwrap();
    assert!(res.primary_scores.by_address(&eps).all(|(_, v)| v == 0.0));
    assert_eq!(res.primary_scores.len(), 4);
}

#[test]
fn header_label_affinity_header_name_is_case_insensitive_and_both_fields_required() {
    let s = sched(
        "plugins:\n- type: header-label-affinity-scorer\n  parameters: {headerName: X-Preferred-Zone, labelKey: zone}\n",
    );
    let now = Instant::now();
    let eps = vec![ep(0, &[("zone", "b")], now), ep(1, &[("zone", "a")], now)];
    let mut r = req(10);
    r.headers.insert("x-preferred-zone".into(), "a".into());
    let res = s.schedule(&r, &eps, now, &mut rng()).unwrap();
    assert_eq!(res.destinations(), &[addr(1)]);
    assert_eq!(
        bad_field("plugins:\n- type: header-label-affinity-scorer\n"),
        "headerName"
    );
    assert_eq!(
        bad_field(
            "plugins:\n- type: header-label-affinity-scorer\n  parameters: {headerName: x}\n"
        ),
        "labelKey"
    );
    assert_eq!(
        bad_field(
            "plugins:\n- type: header-label-affinity-scorer\n  parameters: {headerName: x, labelKey: y, weight: 2}\n"
        ),
        "weight"
    );
}

// ---- stability ----

#[test]
fn alpha_plugins_are_named_for_the_experimental_flag() {
    let cfg = fixture("v010-pd-topology.yaml");
    let alpha: Vec<&str> = cfg
        .experimental_plugins()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        alpha,
        vec![
            "topology-extractor",
            "topology-affinity-filter",
            "topology-affinity-scorer"
        ]
    );
    let e = cfg.check_stability(false).unwrap_err();
    // llm-d reports the first by name.
    assert_eq!(
        e,
        ConfigError::ExperimentalPlugin {
            plugin: "topology-affinity-filter".into(),
            type_name: "topology-affinity-filter".into()
        }
    );
    assert!(e.to_string().contains("--allow-experimental-plugins"));
    cfg.check_stability(true).unwrap();
    // A default config has no Alpha plugin.
    ResolvedConfig::builtin_default()
        .check_stability(false)
        .unwrap();
}

// ---- file-discovery ----

#[test]
fn file_discovery_fixture_names_the_discovery_plugin() {
    let cfg = fixture("v010-file-discovery.yaml");
    assert_eq!(cfg.discovery.as_deref(), Some("file-discovery"));
    let (name, p) = cfg.file_discovery().expect("file-discovery in force");
    assert_eq!(name, "file-discovery");
    assert_eq!(p.path, "/etc/epp/endpoints.yaml");
    assert!(p.watch_file);
    // The metrics data layer is still injected, and no Alpha plugin is involved.
    assert!(!cfg.data_layer.is_empty());
    cfg.check_stability(false).unwrap();
    // watchFile defaults to false; without dataLayer.discovery nothing is in force.
    let cfg = load("plugins:\n- type: file-discovery\n  parameters: {path: e.yaml}\ndataLayer:\n  discovery: {pluginRef: file-discovery}\n").unwrap();
    assert!(!cfg.file_discovery().unwrap().1.watch_file);
    let cfg = load("plugins:\n- type: file-discovery\n  parameters: {path: e.yaml}\n").unwrap();
    assert_eq!(cfg.file_discovery(), None);
}

#[test]
fn file_discovery_refusals_name_the_field_or_reference() {
    assert_eq!(bad_field("plugins:\n- type: file-discovery\n"), "path");
    assert_eq!(
        bad_field("plugins:\n- type: file-discovery\n  parameters: {path: e.yaml, watch: true}\n"),
        "watch"
    );
    let e = load("plugins:\n- type: queue-scorer\ndataLayer:\n  discovery: {pluginRef: nope}\n")
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::DanglingRef { referrer, .. } if referrer == "dataLayer.discovery.pluginRef"),
        "{e:?}"
    );
    let e = load(
        "plugins:\n- type: queue-scorer\ndataLayer:\n  discovery: {pluginRef: queue-scorer}\n",
    )
    .unwrap_err();
    assert!(
        matches!(&e, ConfigError::WrongKind { expected, .. } if *expected == "endpoint discovery plugin"),
        "{e:?}"
    );
    let e = load("plugins:\n- type: file-discovery\n  parameters: {path: e}\ndataLayer:\n  discovery: {pluginRef: file-discovery, extra: 1}\n")
        .unwrap_err();
    assert!(e.to_string().contains("extra"), "{e}");
}
