//! The Gateway API Inference Extension conformance cases that concern an EPP
//! (`conformance/tests/*.go` in kubernetes-sigs/gateway-api-inference-extension), run
//! through a real Envoy: ext_proc to an infermesh node configured as llm-d's conformance
//! EPP (`header-based-testing-filter`, `destination-endpoint-served-verifier`), simulated
//! pods as the pool. Each pod gets its own loopback IP (127.0.N.i) so that the
//! `test-epp-endpoint-selection` header names pods by bare IP, as the suite does.
//!
//! The suite retries a request while the gateway converges (404/503); here everything is
//! ready before the first request (the node has scraped every pod, Envoy answers
//! `/ready`), so a request is sent once, except after the EPP is stopped, where the wait
//! for Envoy to notice is bounded.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::upstream::{HttpClient, http_client};
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use infermesh_testkit::envoy::envoy_bin;
use support::{Envoy, Resp, post};
use tokio::task::JoinSet;

/// llm-d's conformance EPP: the header picks the candidates, queue depth ranks them, the
/// served endpoint is echoed back.
const EPP_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
- type: header-based-testing-filter\n- type: queue-scorer\n\
- type: destination-endpoint-served-verifier\n";

/// The suite's header names.
const SELECTION: &str = "test-epp-endpoint-selection";
const SERVED: &str = "x-conformance-test-served-endpoint";

/// A pool of simulated pods on 127.0.`net`.1.. and the node that is its EPP.
struct Pool {
    fleets: Vec<Fleet>,
    pods: Vec<SocketAddr>,
    node: Option<App>,
    model: String,
}

impl Pool {
    async fn start(net: u8, n: u8) -> Pool {
        Pool::start_ranks(net, n, 1).await
    }

    /// `n` pods of `ranks` data-parallel ranks each: every rank is an endpoint on its pod's
    /// IP (its own port), as a DP pod's targetPorts are.
    async fn start_ranks(net: u8, n: u8, ranks: usize) -> Pool {
        let mut fleets = Vec::new();
        let mut pods = Vec::new();
        let mut model = String::new();
        for i in 1..=n {
            let mut cfg = FleetConfig::new(ranks);
            cfg.host = IpAddr::V4(Ipv4Addr::new(127, 0, net, i));
            cfg.profile = EngineProfile::instant();
            model.clone_from(&cfg.model);
            let fleet = Fleet::start(cfg).await.expect("simulated pod starts");
            pods.extend(fleet.addrs());
            fleets.push(fleet);
        }
        let scheduler = infermesh_scheduler::load_config(EPP_CONFIG).expect("valid config");
        let cfg = NodeConfig::local(fleet_pool(&pods, &model), scheduler).expect("node config");
        let node = App::start(cfg).await.expect("node starts");
        assert!(
            node.wait_ready(pods.len(), Duration::from_secs(15)).await,
            "pods did not all answer their first scrape"
        );
        Pool {
            fleets,
            pods,
            node: Some(node),
            model,
        }
    }

    fn ext_proc(&self) -> SocketAddr {
        self.node.as_ref().expect("EPP running").ext_proc_addr
    }

    /// The suite's request body.
    fn body(&self) -> String {
        serde_json::json!({
            "model": self.model,
            "prompt": "Write as if you were a critic: San Francisco",
        })
        .to_string()
    }

    async fn stop_epp(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown(Duration::from_secs(5)).await;
        }
    }

    async fn stop(mut self) {
        self.stop_epp().await;
        for f in self.fleets {
            f.shutdown().await;
        }
    }
}

fn ip(a: SocketAddr) -> String {
    a.ip().to_string()
}

/// The pod Envoy sent the request to (`x-upstream-host`, added by the route).
fn upstream(r: &Resp) -> SocketAddr {
    let h = r
        .header("x-upstream-host")
        .unwrap_or_else(|| panic!("no x-upstream-host in {:?}", r.headers));
    h.parse()
        .unwrap_or_else(|_| panic!("bad upstream address {h:?}"))
}

async fn request(client: &HttpClient, envoy: &Envoy, body: &str, selection: &str) -> Resp {
    post(
        client,
        envoy.addr,
        "/v1/completions",
        body.to_owned(),
        &[(SELECTION, selection)],
    )
    .await
}

/// Sends `total` requests with at most `limit` in flight and returns the responses.
async fn concurrent(
    client: &HttpClient,
    envoy: &Envoy,
    body: &str,
    selection: &str,
    total: usize,
    limit: usize,
) -> Vec<Resp> {
    let (client, addr) = (client.clone(), envoy.addr);
    let (body, selection): (Arc<str>, Arc<str>) = (body.into(), selection.into());
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(total);
    for _ in 0..total {
        if set.len() >= limit
            && let Some(r) = set.join_next().await
        {
            out.push(r.expect("request task"));
        }
        let (client, body, selection) = (client.clone(), body.clone(), selection.clone());
        set.spawn(async move {
            post(
                &client,
                addr,
                "/v1/completions",
                body.to_string(),
                &[(SELECTION, &*selection)],
            )
            .await
        });
    }
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out
}

/// The deploy template's Envoy; with `health_checked_epp`, the ext_proc cluster is TCP
/// health-checked with no panic routing, so a stopped EPP leaves it without a healthy
/// endpoint, as the suite's `MakeServiceUnavailable` leaves the EPP Service without
/// endpoints. (Envoy fails a FULL_DUPLEX_STREAMED ext_proc open only until the first body
/// chunk is sent to the processor; a connection refused is learned after that.)
async fn envoy_with(pool: &Pool, fail_open: bool, health_checked_epp: bool) -> Envoy {
    let mut config = Envoy::template(pool.ext_proc(), &pool.pods).expect("template");
    if fail_open {
        assert!(config.contains("failure_mode_allow: false"));
        config = config.replace("failure_mode_allow: false", "failure_mode_allow: true");
    }
    if health_checked_epp {
        let cluster = "  - name: infermesh_ext_proc\n    type: STATIC\n    connect_timeout: 1s\n";
        assert!(config.contains(cluster));
        config = config.replace(
            cluster,
            &format!(
                "{cluster}    health_checks:\n    - {{timeout: 1s, interval: 0.2s, no_traffic_interval: 0.2s, reuse_connection: false, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{}}}}\n    common_lb_config: {{healthy_panic_threshold: {{value: 0}}}}\n"
            ),
        );
    }
    Envoy::start_config(&envoy_bin(), &config)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn envoy_for(pool: &Pool, fail_open: bool) -> Envoy {
    envoy_with(pool, fail_open, false).await
}

/// `GatewayDestinationEndpointServed`: a request steered to each pod in turn is served by
/// that pod, and `x-conformance-test-served-endpoint` names it as `ip:port`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_destination_endpoint_served() {
    let pool = Pool::start(11, 3).await;
    let envoy = envoy_for(&pool, false).await;
    let client = http_client(Duration::from_secs(2));
    for &pod in &pool.pods {
        let r = request(&client, &envoy, &pool.body(), &ip(pod)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(upstream(&r), pod, "served by the selected pod");
        assert_eq!(r.header(SERVED), Some(pod.to_string()), "{:?}", r.headers);
    }
    drop(envoy);
    pool.stop().await;
}

/// `GatewayFollowingEPPRouting`: each pod is reachable alone; then 100 requests (10 in
/// flight) per selection of one, two and three pods all land within the selection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_following_epp_routing() {
    let pool = Pool::start(12, 3).await;
    let envoy = envoy_for(&pool, false).await;
    let client = http_client(Duration::from_secs(2));
    for &pod in &pool.pods {
        let r = request(&client, &envoy, &pool.body(), &ip(pod)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(upstream(&r), pod);
    }
    let p = &pool.pods;
    for selected in [vec![p[2]], vec![p[0], p[1]], vec![p[0], p[1], p[2]]] {
        let header = selected
            .iter()
            .map(|&a| ip(a))
            .collect::<Vec<_>>()
            .join(",");
        let expected: BTreeSet<SocketAddr> = selected.iter().copied().collect();
        let responses = concurrent(&client, &envoy, &pool.body(), &header, 100, 10).await;
        assert_eq!(responses.len(), 100);
        for r in &responses {
            assert_eq!(r.status, 200, "{header}: {:?}", r.body);
            let served = upstream(r);
            assert!(
                expected.contains(&served),
                "{header}: served by {served}, outside the selection"
            );
            assert_eq!(
                r.header(SERVED),
                Some(served.to_string()),
                "Envoy followed the pick"
            );
        }
    }
    drop(envoy);
    pool.stop().await;
}

/// `EppUnAvailableFailOpen`: with the EPP up, the selected pod serves; with the EPP down,
/// an Envoy whose ext_proc filter fails open still routes to a pool pod (and, for
/// contrast, the same Envoy failing closed answers 5xx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_unavailable_fail_open() {
    let mut pool = Pool::start(13, 3).await;
    let open = envoy_with(&pool, true, true).await;
    let closed = envoy_with(&pool, false, true).await;
    let client = http_client(Duration::from_secs(2));
    let target = pool.pods[0];
    let body = pool.body();

    // Phase 1: the EPP is up; the request goes to the selected pod.
    let r = request(&client, &open, &body, &ip(target)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(upstream(&r), target);

    // Phase 2: the EPP is gone. Envoy may still hold the old stream's connection for a
    // moment; wait (bounded) for the first answer without it.
    pool.stop_epp().await;
    let pods: BTreeSet<SocketAddr> = pool.pods.iter().copied().collect();
    let mut first = None;
    for _ in 0..100 {
        let r = request(&client, &open, &body, &ip(target)).await;
        if r.status == 200 && r.header(SERVED).is_none() {
            first = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("fail-open Envoy answered 200 without the EPP within 100 tries");
    assert!(pods.contains(&upstream(&first)));
    for _ in 0..10 {
        let r = request(&client, &open, &body, &ip(target)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert!(
            pods.contains(&upstream(&r)),
            "served outside the pool: {:?}",
            r.headers
        );
    }
    // Fail-closed: never routed without the EPP; 5xx once Envoy sees it gone.
    let mut refused = false;
    for _ in 0..100 {
        let r = request(&client, &closed, &body, &ip(target)).await;
        if r.status >= 500 {
            refused = true;
            break;
        }
        assert!(
            r.status == 200 && r.header(SERVED).is_some(),
            "a fail-closed Envoy routed without the EPP: {} {:?}",
            r.status,
            r.headers
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "the fail-closed Envoy never refused within 100 tries"
    );
    drop((open, closed));
    pool.stop().await;
}

/// `GatewayFollowingEPPRoutingWithDataParallelism`: three pods of three DP ranks (ports);
/// each pod is reachable by its IP; then 100 requests (10 in flight) per selection mixing
/// whole pods (bare IP: any rank) and single ranks (`ip:port`) land only on selected ranks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_following_epp_routing_dp() {
    let pool = Pool::start_ranks(16, 3, 3).await;
    let envoy = envoy_for(&pool, false).await;
    let client = http_client(Duration::from_secs(2));
    let ranks = |pod: usize| -> Vec<SocketAddr> { pool.pods[pod * 3..pod * 3 + 3].to_vec() };
    for pod in 0..3 {
        let ip_of = ip(ranks(pod)[0]);
        let r = request(&client, &envoy, &pool.body(), &ip_of).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert!(ranks(pod).contains(&upstream(&r)), "pod {pod} by its IP");
    }
    // (selected entries, the ranks they allow)
    let cases: Vec<(Vec<String>, Vec<SocketAddr>)> = vec![
        (vec![ip(ranks(1)[0])], ranks(1)),
        (
            vec![ip(ranks(0)[0]), ranks(2)[1].to_string()],
            [ranks(0), vec![ranks(2)[1]]].concat(),
        ),
        (
            vec![
                ip(ranks(0)[0]),
                ranks(1)[0].to_string(),
                ranks(1)[2].to_string(),
                ip(ranks(2)[0]),
            ],
            [ranks(0), vec![ranks(1)[0], ranks(1)[2]], ranks(2)].concat(),
        ),
    ];
    for (selection, allowed) in cases {
        let header = selection.join(",");
        let allowed: BTreeSet<SocketAddr> = allowed.into_iter().collect();
        let responses = concurrent(&client, &envoy, &pool.body(), &header, 100, 10).await;
        assert_eq!(responses.len(), 100);
        for r in &responses {
            assert_eq!(r.status, 200, "{header}: {:?}", r.body);
            let served = upstream(r);
            assert!(
                allowed.contains(&served),
                "{header}: served by {served}, outside the selected ranks"
            );
        }
    }
    drop(envoy);
    pool.stop().await;
}

/// An Envoy whose route splits 70/30 between two pools, each with its own EPP: the
/// weighted cluster's per-route ext_proc override names the pool's EPP, and the route
/// cache is retained so the EPP's header cannot re-roll the weighted choice.
fn two_pool_config(a: &Pool, b: &Pool, weights: (u32, u32)) -> String {
    let cluster = |name: &str, pods: &[SocketAddr]| {
        format!(
            "  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints: {eps}
    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources:
            - header: x-gateway-destination-endpoint
            - metadata: {{key: envoy.lb, path: [{{key: x-gateway-destination-endpoint}}]}}
            selected_host_key: {{key: envoy.lb, path: [{{key: x-gateway-destination-endpoint-served}}]}}
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
",
            eps = infermesh_testkit::envoy::lb_endpoints(pods)
        )
    };
    let epp = |name: &str, addr: SocketAddr| {
        format!(
            "  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
",
            ip = addr.ip(),
            port = addr.port()
        )
    };
    let per_route = |cluster: &str| {
        format!(
            "{{envoy.filters.http.ext_proc: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute, overrides: {{grpc_service: {{envoy_grpc: {{cluster_name: {cluster}}}, timeout: 10s}}}}}}}}"
        )
    };
    format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: ${{ADMIN_PORT}}}}}}
static_resources:
  listeners:
  - name: inference
    address: {{socket_address: {{address: 127.0.0.1, port_value: ${{LISTEN_PORT}}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inference
          route_config:
            name: inference
            virtual_hosts:
            - name: pools
              domains: [\"*\"]
              routes:
              - match: {{prefix: /}}
                route:
                  timeout: 30s
                  weighted_clusters:
                    clusters:
                    - name: pool_a
                      weight: {wa}
                      typed_per_filter_config: {pa}
                    - name: pool_b
                      weight: {wb}
                      typed_per_filter_config: {pb}
                response_headers_to_add:
                - header: {{key: x-upstream-host, value: \"%UPSTREAM_HOST%\"}}
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {{cluster_name: epp_a}}
                timeout: 10s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: FULL_DUPLEX_STREAMED
                response_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
                response_trailer_mode: SEND
              message_timeout: 5s
              allow_mode_override: true
              failure_mode_allow: false
              route_cache_action: RETAIN
              metadata_options:
                forwarding_namespaces:
                  untyped: [envoy.lb, envoy.lb.subset_hint]
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{ca}{cb}{ea}{eb}",
        wa = weights.0,
        wb = weights.1,
        pa = per_route("epp_a"),
        pb = per_route("epp_b"),
        ca = cluster("pool_a", &a.pods),
        cb = cluster("pool_b", &b.pods),
        ea = epp("epp_a", a.ext_proc()),
        eb = epp("epp_b", b.ext_proc()),
    )
}

/// `GatewayWeightedAcrossTwoInferencePools`: every pod warms up alone (selected by
/// `ip:port`); then 200 requests (5 in flight) whose header lists all six pods split
/// between the pools as weighted, 70/30, within max(0.10, 4.5σ) as the suite allows, and
/// each is served by the pod its pool's EPP picked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_weighted_two_pools() {
    const TOTAL: usize = 200;
    const WEIGHTS: (u32, u32) = (70, 30);
    let a = Pool::start(14, 3).await;
    let b = Pool::start(15, 3).await;
    let envoy = Envoy::start_config(&envoy_bin(), &two_pool_config(&a, &b, WEIGHTS))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let client = http_client(Duration::from_secs(2));
    let body = a.body();

    // Warm-up: a pod selected alone is reached through whichever pool the route draws;
    // the other pool's EPP has no such candidate and answers 503, which the suite retries.
    for &pod in a.pods.iter().chain(&b.pods) {
        let mut ok = false;
        for _ in 0..50 {
            let r = request(&client, &envoy, &body, &pod.to_string()).await;
            if r.status == 200 {
                assert_eq!(upstream(&r), pod);
                ok = true;
                break;
            }
            assert_eq!(r.status, 503, "{:?}", r.body);
        }
        assert!(ok, "{pod} never reached in 50 tries");
    }

    let all = a
        .pods
        .iter()
        .chain(&b.pods)
        .map(|&p| ip(p))
        .collect::<Vec<_>>()
        .join(",");
    let responses = concurrent(&client, &envoy, &body, &all, TOTAL, 5).await;
    let (in_a, in_b): (BTreeSet<_>, BTreeSet<_>) = (
        a.pods.iter().copied().collect(),
        b.pods.iter().copied().collect(),
    );
    let (mut hits_a, mut hits_b) = (0usize, 0usize);
    for r in &responses {
        assert_eq!(r.status, 200, "{:?}", r.body);
        let served = upstream(r);
        if in_a.contains(&served) {
            hits_a += 1;
        } else if in_b.contains(&served) {
            hits_b += 1;
        } else {
            panic!("served by {served}, in neither pool");
        }
        assert_eq!(
            r.header(SERVED),
            Some(served.to_string()),
            "Envoy followed the pick"
        );
    }
    assert_eq!(hits_a + hits_b, TOTAL);
    let total = TOTAL as f64;
    let observed = hits_a as f64 / total;
    let expected = f64::from(WEIGHTS.0) / f64::from(WEIGHTS.0 + WEIGHTS.1);
    let sigma = (expected * (1.0 - expected) / total).sqrt();
    let tolerance = f64::max(0.10, 4.5 * sigma);
    assert!(
        (observed - expected).abs() <= tolerance,
        "weighted split out of bounds: primary {observed:.3} ({hits_a}/{TOTAL}), expected {expected:.3} ± {tolerance:.3}"
    );
    drop(envoy);
    a.stop().await;
    b.stop().await;
}
