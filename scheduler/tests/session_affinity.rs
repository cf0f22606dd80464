//! `session-affinity-scorer` with llm-d v0.10's parameters: `strategy`
//! (`encoded_endpoint_header` / `session_id`), `encodedEndpointHeaderConfig.header`,
//! `sessionIdConfig{sources, evictionTtlSeconds, evictionSweepSeconds}` and `profileName`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infermesh_scheduler::config::params::{SessionIdSource, SessionStrategy};
use infermesh_scheduler::config::{ConfigError, PluginSpec};
use infermesh_scheduler::plugins::session::session_token;
use infermesh_scheduler::{
    Endpoint, InferenceRequest, Metrics, ResolvedConfig, Scheduler, load_config,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

#[allow(clippy::result_large_err)] // the loader's own error type, matched by the tests
fn load(body: &str) -> Result<ResolvedConfig, ConfigError> {
    load_config(&format!("{HEAD}{body}"))
}

fn bad_field(body: &str) -> String {
    match load(body) {
        Err(ConfigError::InvalidParameter { field, .. }) => field,
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
}

fn fixture() -> ResolvedConfig {
    let path = format!(
        "{}/tests/fixtures/v010-session-affinity.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    load_config(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{e}"))
}

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 8000 + i))
}

fn ep(i: u16, role: &str, queue: u32, now: Instant) -> Endpoint {
    let mut labels = BTreeMap::new();
    if !role.is_empty() {
        labels.insert("llm-d.ai/role".to_owned(), role.to_owned());
    }
    let mut e = Endpoint::new(addr(i), labels);
    let mut m = Metrics::idle(now);
    m.waiting_queue = queue;
    e.metrics = Some(m);
    e
}

fn req(id: &str, headers: &[(&str, &str)]) -> InferenceRequest {
    InferenceRequest {
        id: id.into(),
        model: "m".into(),
        target_model: "m".into(),
        prompt_bytes: b"hello".to_vec(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(3)
}

#[test]
fn fixture_resolves_each_strategy_with_llm_d_defaults() {
    let cfg = fixture();
    Scheduler::new(&cfg).unwrap();
    let spec = |n: &str| match cfg.plugin(n).map(|p| &p.spec) {
        Some(PluginSpec::SessionAffinityScorer(p)) => p.clone(),
        other => panic!("{n}: {other:?}"),
    };
    let id = spec("by-session-id");
    assert_eq!(id.strategy, SessionStrategy::SessionId);
    assert_eq!(
        id.session_id_config.sources,
        vec![SessionIdSource {
            header: "x-session-id".into(),
            ..Default::default()
        }]
    );
    assert_eq!(id.session_id_config.eviction_ttl_seconds, 300.0);
    assert_eq!(id.session_id_config.eviction_sweep_seconds, 10.0);
    let decode = spec("session-affinity-decode");
    assert_eq!(
        decode.strategy,
        SessionStrategy::EncodedEndpointHeader,
        "the default"
    );
    assert_eq!(
        decode.encoded_endpoint_header_config.header,
        "x-session-token"
    );
    assert!(decode.profile_name.is_empty());
    let prefill = spec("session-affinity-prefill");
    assert_eq!(prefill.profile_name, "prefill");
    assert_eq!(
        prefill.encoded_endpoint_header_config.header,
        "x-session-token-prefill"
    );
    // Unset blocks take their defaults.
    let cfg =
        load("plugins:\n- type: session-affinity-scorer\n  parameters: {strategy: session_id}\n")
            .unwrap();
    let Some(PluginSpec::SessionAffinityScorer(p)) =
        cfg.plugin("session-affinity-scorer").map(|p| &p.spec)
    else {
        panic!()
    };
    assert_eq!(p.session_id_config.sources[0].header, "x-session-id");
    assert_eq!(p.session_id_config.eviction_ttl_seconds, 300.0);
}

#[test]
fn pd_instances_pin_decode_and_prefill_in_their_own_headers() {
    let s = Scheduler::new(&fixture()).unwrap();
    let now = Instant::now();
    let eps = vec![
        ep(0, "decode", 0, now),
        ep(1, "decode", 3, now),
        ep(2, "prefill", 0, now),
        ep(3, "prefill", 3, now),
    ];
    let res = s.schedule(&req("a", &[]), &eps, now, &mut rng()).unwrap();
    assert_eq!(res.destinations(), &[addr(0)]);
    let headers: BTreeMap<String, String> = res.response_headers.iter().cloned().collect();
    assert_eq!(
        headers,
        [
            ("x-session-token".to_owned(), session_token(addr(0))),
            ("x-session-token-prefill".to_owned(), session_token(addr(2))),
        ]
        .into_iter()
        .collect(),
        "session_id writes nothing back"
    );
    // The client echoes both: each profile goes back to its pod although it is busier.
    let tokens = [
        ("x-session-token", session_token(addr(1))),
        ("x-session-token-prefill", session_token(addr(3))),
    ];
    let r = req(
        "b",
        &[(tokens[0].0, &tokens[0].1), (tokens[1].0, &tokens[1].1)],
    );
    let res = s.schedule(&r, &eps, now, &mut rng()).unwrap();
    assert_eq!(res.destinations(), &[addr(1)]);
    assert_eq!(res.profiles["prefill"].targets, vec![addr(3)]);
}

#[test]
fn encoded_header_name_is_configurable_and_normalized() {
    let s = Scheduler::new(
        &load("plugins:\n- type: queue-scorer\n- type: session-affinity-scorer\n  parameters: {encodedEndpointHeaderConfig: {header: ' X-My-Session '}}\nschedulingProfiles:\n- name: default\n  plugins: [{pluginRef: queue-scorer}, {pluginRef: session-affinity-scorer, weight: 10}]\n")
            .unwrap(),
    )
    .unwrap();
    let now = Instant::now();
    let eps = vec![ep(0, "", 0, now), ep(1, "", 5, now)];
    let token = session_token(addr(1));
    let res = s
        .schedule(
            &req("a", &[("x-my-session", &token)]),
            &eps,
            now,
            &mut rng(),
        )
        .unwrap();
    assert_eq!(res.destinations(), &[addr(1)]);
    assert_eq!(
        res.response_headers,
        vec![("x-my-session".to_owned(), token.clone())]
    );
    // The default header means nothing to this instance.
    let res = s
        .schedule(
            &req("b", &[("x-session-token", &token)]),
            &eps,
            now,
            &mut rng(),
        )
        .unwrap();
    assert_eq!(res.destinations(), &[addr(0)]);
}

const SESSION_ID: &str = "plugins:\n- type: queue-scorer\n- type: session-affinity-scorer\n  parameters: {strategy: session_id, sessionIdConfig: {sources: [{header: x-agent}, {header: x-session-id}], evictionTtlSeconds: 60}}\nschedulingProfiles:\n- name: default\n  plugins: [{pluginRef: queue-scorer, weight: 1}, {pluginRef: session-affinity-scorer, weight: 10}]\n";

#[test]
fn session_id_binds_the_served_endpoint_and_keeps_it_until_ttl() {
    let s = Scheduler::new(&load(SESSION_ID).unwrap()).unwrap();
    let t0 = Instant::now();
    let mut eps = vec![ep(0, "", 1, t0), ep(1, "", 0, t0), ep(2, "", 2, t0)];
    let run = |s: &Scheduler, id: &str, hdrs: &[(&str, &str)], eps: &[Endpoint], now| {
        let r = req(id, hdrs);
        let res = s.schedule(&r, eps, now, &mut rng()).unwrap();
        s.pre_request(&r, &res, now);
        res
    };
    // Unbound: no preference, the queue decides; the pick is bound.
    let res = run(&s, "r1", &[("x-session-id", "s1")], &eps, t0);
    assert_eq!(res.destinations(), &[addr(1)]);
    assert!(
        res.response_headers.is_empty(),
        "session_id writes nothing back"
    );
    // Now endpoint 1 is the busiest; the session still goes there.
    eps[1].metrics.as_mut().unwrap().waiting_queue = 9;
    let t1 = t0 + Duration::from_secs(30);
    assert_eq!(
        run(&s, "r2", &[("x-session-id", "s1")], &eps, t1).destinations(),
        &[addr(1)]
    );
    // The first source that is set wins: x-agent names another (unbound) session.
    assert_eq!(
        run(
            &s,
            "r3",
            &[("x-agent", "a9"), ("x-session-id", "s1")],
            &eps,
            t1
        )
        .destinations(),
        &[addr(0)]
    );
    // Unused for longer than evictionTtlSeconds: the binding is gone.
    let t2 = t1 + Duration::from_secs(61);
    assert_eq!(
        run(&s, "r4", &[("x-session-id", "s1")], &eps, t2).destinations(),
        &[addr(0)]
    );
}

#[test]
fn session_id_moves_only_when_its_endpoint_was_not_a_candidate() {
    // A plain weight: the session (weight 1) can be outweighed by the queue (weight 5).
    let body = SESSION_ID.replace(
        "weight: 1}, {pluginRef: session-affinity-scorer, weight: 10}",
        "weight: 5}, {pluginRef: session-affinity-scorer, weight: 1}",
    );
    let s = Scheduler::new(&load(&body).unwrap()).unwrap();
    let now = Instant::now();
    let scorer_bound = |s: &Scheduler, r: &InferenceRequest, eps: &[Endpoint]| {
        let res = s.schedule(r, eps, now, &mut rng()).unwrap();
        s.pre_request(r, &res, now);
        res.destinations()[0]
    };
    let eps = vec![ep(0, "", 0, now), ep(1, "", 4, now)];
    let r = req("r1", &[("x-session-id", "s")]);
    assert_eq!(scorer_bound(&s, &r, &eps), addr(0));
    // Endpoint 0 busier now: the queue outweighs the session, but 0 was a candidate, so
    // the binding stays on 0 (the next request still prefers it when loads even out).
    let busy = vec![ep(0, "", 8, now), ep(1, "", 0, now)];
    assert_eq!(
        scorer_bound(&s, &req("r2", &[("x-session-id", "s")]), &busy),
        addr(1)
    );
    let even = vec![ep(0, "", 0, now), ep(1, "", 0, now)];
    assert_eq!(
        scorer_bound(&s, &req("r3", &[("x-session-id", "s")]), &even),
        addr(0)
    );
    // Endpoint 0 gone from the candidates: the session moves to the pick.
    let without = vec![ep(1, "", 0, now), ep(2, "", 3, now)];
    assert_eq!(
        scorer_bound(&s, &req("r4", &[("x-session-id", "s")]), &without),
        addr(1)
    );
    let back = vec![ep(0, "", 0, now), ep(1, "", 0, now)];
    assert_eq!(
        scorer_bound(&s, &req("r5", &[("x-session-id", "s")]), &back),
        addr(1)
    );
}

#[test]
fn bad_session_parameters_name_the_field() {
    let f = |params: &str| {
        bad_field(&format!(
            "plugins:\n- type: session-affinity-scorer\n  parameters: {params}\n"
        ))
    };
    assert_eq!(f("{strategy: cookie}"), "strategy");
    assert_eq!(
        f("{strategy: session_id, sessionIdConfig: {sources: [{header: a, attribute: b}]}}"),
        "sessionIdConfig.sources[0]"
    );
    assert_eq!(
        f("{strategy: session_id, sessionIdConfig: {sources: [{}]}}"),
        "sessionIdConfig.sources[0]"
    );
    assert_eq!(
        f("{strategy: session_id, sessionIdConfig: {sources: [{attribute: agent-identity}]}}"),
        "sessionIdConfig.sources[0].attribute"
    );
    assert_eq!(
        f("{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: -1}}"),
        "sessionIdConfig.evictionTtlSeconds"
    );
    assert_eq!(
        f("{strategy: session_id, sessionIdConfig: {evictionSweepSeconds: -2}}"),
        "sessionIdConfig.evictionSweepSeconds"
    );
    // v0.10 has no top-level headerName (the per-strategy block replaced it).
    assert_eq!(f("{headerName: x-s}"), "headerName");
    assert_eq!(
        f("{encodedEndpointHeaderConfig: {name: x}}"),
        "encodedEndpointHeaderConfig.name"
    );
}
