//! GIE conformance hooks as llm-d configures them: `header-based-testing-filter` steers by
//! the `test-epp-endpoint-selection` request header; `destination-endpoint-served-verifier`
//! turns on the served-endpoint echo.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use infermesh_scheduler::config::{PluginKind, PluginSpec};
use infermesh_scheduler::plugins::filters::TEST_ENDPOINT_SELECTION_HEADER;
use infermesh_scheduler::{
    Endpoint, InferenceRequest, Metrics, ResolvedConfig, Scheduler, load_config,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
    - type: header-based-testing-filter\n- type: queue-scorer\n\
    - type: destination-endpoint-served-verifier\n";

fn endpoints(now: Instant) -> Vec<Endpoint> {
    // Two ports on one IP (data-parallel ranks) and a second pod.
    ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000"]
        .iter()
        .map(|a| {
            let mut e = Endpoint::new(a.parse().unwrap(), BTreeMap::new());
            e.metrics = Some(Metrics::idle(now));
            e
        })
        .collect()
}

/// Every endpoint the scheduler may pick for a request carrying `selection`.
fn reachable(s: &Scheduler, selection: Option<&str>) -> Vec<SocketAddr> {
    let now = Instant::now();
    let eps = endpoints(now);
    let mut req = InferenceRequest {
        id: "c".into(),
        model: "m".into(),
        target_model: "m".into(),
        ..InferenceRequest::default()
    };
    if let Some(v) = selection {
        req.headers
            .insert(TEST_ENDPOINT_SELECTION_HEADER.into(), v.into());
    }
    let mut seen: Vec<SocketAddr> = Vec::new();
    for seed in 0..40 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        if let Ok(r) = s.schedule(&req, &eps, now, &mut rng) {
            for a in r.destinations() {
                if !seen.contains(a) {
                    seen.push(*a);
                }
            }
        }
    }
    seen.sort();
    seen
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = list.iter().map(|a| a.parse().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn the_selection_header_restricts_the_candidates() {
    let cfg = load_config(CONFIG).unwrap();
    let s = Scheduler::new(&cfg).unwrap();
    // The default profile takes the filter.
    assert_eq!(cfg.profiles[0].filters, ["header-based-testing-filter"]);
    assert_eq!(reachable(&s, Some("10.0.0.2")), addrs(&["10.0.0.2:8000"]));
    // A bare IP keeps every endpoint on it; ip:port only that one.
    assert_eq!(
        reachable(&s, Some("10.0.0.1")),
        addrs(&["10.0.0.1:8000", "10.0.0.1:8001"])
    );
    assert_eq!(
        reachable(&s, Some(" 10.0.0.1:8001 , 10.0.0.2 ")),
        addrs(&["10.0.0.1:8001", "10.0.0.2:8000"])
    );
    // Nothing listed that exists, or no header at all: no candidate (llm-d's filter).
    assert_eq!(reachable(&s, Some("256.256.256.256")), vec![]);
    assert_eq!(reachable(&s, Some("10.0.0.9:8000")), vec![]);
    assert_eq!(reachable(&s, None), vec![]);
}

#[test]
fn the_verifier_turns_on_the_served_endpoint_echo() {
    let cfg = load_config(CONFIG).unwrap();
    let v = cfg.plugin("destination-endpoint-served-verifier").unwrap();
    assert_eq!(v.spec, PluginSpec::DestinationEndpointServedVerifier);
    assert_eq!(v.spec.kind(), PluginKind::ResponseProcessor);
    assert!(Scheduler::new(&cfg).unwrap().echoes_served_endpoint());
    let default = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
    assert!(!default.echoes_served_endpoint());
    // Neither is steered without the filter.
    assert_eq!(
        reachable(&default, Some("10.0.0.2")),
        addrs(&["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000"])
    );
}
