//! Translation of an [`XdsInput`] into Envoy resources, one listener + route + clusters per
//! InferencePool, following the GIE EPP contract as Envoy 1.40 runs it.
//!
//! Deterministic by construction: pools, services and addresses are sorted first and only
//! ordered containers are encoded, so every node produces byte-identical resources (and so
//! identical content-hash versions) for the same input.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use infermesh_proto::envoy::config::cluster::v3 as cluster;
use infermesh_proto::envoy::config::core::v3 as core;
use infermesh_proto::envoy::config::endpoint::v3 as endpoint;
use infermesh_proto::envoy::config::listener::v3 as listener;
use infermesh_proto::envoy::config::route::v3 as route;
use infermesh_proto::envoy::extensions::filters::http::ext_proc::v3 as ext_proc;
use infermesh_proto::envoy::extensions::filters::http::router::v3 as router;
use infermesh_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use infermesh_proto::envoy::extensions::upstreams::http::v3 as upstream_http;
use infermesh_proto::envoy::r#type::v3::Percent;
use infermesh_proto::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};

use crate::config::XdsConfig;
use crate::input::{AppProtocol, FailureMode, InferencePoolSpec, XdsInput};

/// Header (and `envoy.lb` metadata key) the picker sets to the chosen `ip:port`s, primary
/// first; the override-host policy reads it (the ORIGINAL_DST cluster, the primary only).
pub const DESTINATION_ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";
/// `envoy.lb` metadata key where the override-host policy reports the endpoint that served.
pub const SERVED_ENDPOINT_KEY: &str = "x-gateway-destination-endpoint-served";
/// Name of the HTTP connection manager network filter.
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
/// Name of the ext_proc HTTP filter.
const EXT_PROC_FILTER: &str = "envoy.filters.http.ext_proc";
/// Name of the router HTTP filter.
const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// Key of the upstream HTTP protocol options extension.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Typed Envoy resources translated from one input, before encoding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypedResources {
    /// CDS resources.
    pub clusters: Vec<cluster::Cluster>,
    /// EDS resources.
    pub endpoints: Vec<endpoint::ClusterLoadAssignment>,
    /// LDS resources, each with whether it is served to wildcard subscribers.
    pub listeners: Vec<(listener::Listener, bool)>,
    /// RDS resources.
    pub routes: Vec<route::RouteConfiguration>,
}

/// Listener and route configuration name of a pool.
pub fn pool_listener_name(pool: &str) -> String {
    format!("infermesh/pool/{pool}")
}

/// ORIGINAL_DST cluster name of a pool.
pub fn pool_original_dst_cluster(pool: &str) -> String {
    format!("infermesh/pool/{pool}/original-dst")
}

/// Fail-open fallback cluster (and load assignment) name of a pool.
pub fn pool_fallback_cluster(pool: &str) -> String {
    format!("infermesh/pool/{pool}/endpoints")
}

/// Packs a message into a `google.protobuf.Any`.
pub fn to_any<M: Message + Name>(msg: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: msg.encode_to_vec(),
    }
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn u32_value(v: u32) -> UInt32Value {
    UInt32Value { value: v }
}

fn socket_address(ip: IpAddr, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                port,
            ))),
            ..Default::default()
        })),
    }
}

fn ads_config_source() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn http2_options() -> std::collections::HashMap<String, Any> {
    let opts = upstream_http::HttpProtocolOptions {
        upstream_protocol_options: Some(
            upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                upstream_http::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            core::Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    // A single entry, so the map's iteration order cannot make encodings differ.
    std::iter::once((HTTP_PROTOCOL_OPTIONS.to_string(), to_any(&opts))).collect()
}

fn load_assignment(
    name: &str,
    addrs: impl Iterator<Item = SocketAddr>,
) -> endpoint::ClusterLoadAssignment {
    let lb_endpoints = addrs
        .map(|a| endpoint::LbEndpoint {
            host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                endpoint::Endpoint {
                    address: Some(socket_address(a.ip(), a.port())),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .collect();
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints,
            // gRPC rejects localities without a locality and ignores those without a weight.
            locality: Some(core::Locality::default()),
            load_balancing_weight: Some(u32_value(1)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn eds_cluster(name: &str, connect_timeout: Duration) -> cluster::Cluster {
    cluster::Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: name.to_string(),
        }),
        connect_timeout: Some(pb_duration(connect_timeout)),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

fn ext_proc_cluster(cfg: &XdsConfig) -> cluster::Cluster {
    let mut c = eds_cluster(&cfg.ext_proc_cluster, cfg.ext_proc_connect_timeout);
    c.typed_extension_protocol_options = http2_options();
    c.health_checks = vec![core::HealthCheck {
        timeout: Some(pb_duration(cfg.health_check_timeout)),
        interval: Some(pb_duration(cfg.health_check_interval)),
        unhealthy_threshold: Some(u32_value(cfg.unhealthy_threshold.get())),
        healthy_threshold: Some(u32_value(cfg.healthy_threshold.get())),
        health_checker: Some(core::health_check::HealthChecker::GrpcHealthCheck(
            core::health_check::GrpcHealthCheck {
                service_name: cfg.health_check_service.clone(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }];
    c.outlier_detection = Some(cluster::OutlierDetection {
        consecutive_gateway_failure: Some(u32_value(cfg.outlier_consecutive_gateway_failure.get())),
        enforcing_consecutive_gateway_failure: Some(u32_value(100)),
        base_ejection_time: Some(pb_duration(cfg.outlier_base_ejection_time)),
        max_ejection_percent: Some(u32_value(cfg.outlier_max_ejection_percent)),
        ..Default::default()
    });
    // A node that leaves the membership leaves Envoy at once, even while it still passes
    // health checks (Envoy would otherwise keep a removed host that is healthy).
    c.ignore_health_on_host_removal = true;
    c.transport_socket = cfg.ext_proc_tls.as_ref().map(|f| core::TransportSocket {
        name: crate::upstream_tls::TLS_SOCKET.into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(to_any(
            &crate::upstream_tls::tls_context(f),
        ))),
    });
    // A dead picker is never worth trying: no panic routing to unhealthy nodes.
    c.common_lb_config = Some(cluster::cluster::CommonLbConfig {
        healthy_panic_threshold: Some(Percent { value: 0.0 }),
        ..Default::default()
    });
    c
}

fn original_dst_cluster(pool: &InferencePoolSpec, cfg: &XdsConfig) -> cluster::Cluster {
    let mut c = cluster::Cluster {
        name: pool_original_dst_cluster(&pool.name),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
        lb_config: Some(cluster::cluster::LbConfig::OriginalDstLbConfig(
            cluster::cluster::OriginalDstLbConfig {
                use_http_header: true,
                http_header_name: DESTINATION_ENDPOINT_HEADER.to_string(),
                ..Default::default()
            },
        )),
        connect_timeout: Some(pb_duration(cfg.upstream_connect_timeout)),
        ..Default::default()
    };
    if pool.app_protocol == AppProtocol::H2c {
        c.typed_extension_protocol_options = http2_options();
    }
    c
}

/// The override-host load-balancing policy (GIE's EPP contract): the picked endpoints
/// come from the `x-gateway-destination-endpoint` header or the same key in `envoy.lb`
/// metadata, primary first, later ones used on retries; the endpoint that served is
/// written back to `envoy.lb`; with no pick, round robin.
fn override_host_policy() -> cluster::LoadBalancingPolicy {
    use infermesh_proto::envoy::extensions::load_balancing_policies::override_host::v3 as oh;
    use infermesh_proto::envoy::extensions::load_balancing_policies::round_robin::v3 as rr;
    use infermesh_proto::envoy::r#type::metadata::v3::{MetadataKey, metadata_key};
    let lb_key = |key: &str| MetadataKey {
        key: "envoy.lb".into(),
        path: vec![metadata_key::PathSegment {
            segment: Some(metadata_key::path_segment::Segment::Key(key.into())),
        }],
    };
    let policy = |name: &str, config: Any| cluster::load_balancing_policy::Policy {
        typed_extension_config: Some(core::TypedExtensionConfig {
            name: name.into(),
            typed_config: Some(config),
        }),
    };
    let override_host = oh::OverrideHost {
        override_host_sources: vec![
            oh::override_host::OverrideHostSource {
                header: DESTINATION_ENDPOINT_HEADER.into(),
                metadata: None,
            },
            oh::override_host::OverrideHostSource {
                header: String::new(),
                metadata: Some(lb_key(DESTINATION_ENDPOINT_HEADER)),
            },
        ],
        selected_host_key: Some(lb_key(SERVED_ENDPOINT_KEY)),
        fallback_policy: Some(cluster::LoadBalancingPolicy {
            policies: vec![policy(
                "envoy.load_balancing_policies.round_robin",
                to_any(&rr::RoundRobin::default()),
            )],
        }),
    };
    cluster::LoadBalancingPolicy {
        policies: vec![policy(
            "envoy.load_balancing_policies.override_host",
            to_any(&override_host),
        )],
    }
}

/// The pool's endpoints (EDS) behind the override-host policy: the pick and its fallbacks
/// when a request carries one, round robin when the pool fails open without one.
fn fallback_cluster(pool: &InferencePoolSpec, cfg: &XdsConfig) -> cluster::Cluster {
    let mut c = eds_cluster(
        &pool_fallback_cluster(&pool.name),
        cfg.upstream_connect_timeout,
    );
    c.load_balancing_policy = Some(override_host_policy());
    if pool.app_protocol == AppProtocol::H2c {
        c.typed_extension_protocol_options = http2_options();
    }
    c
}

fn http_filter(name: &str, config: Any) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.to_string(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// A stream to a picker that refused or reset the connection before anything was
/// processed goes to another picker: between a node's death and its removal from EDS (a
/// few hundred milliseconds) new requests would otherwise fail on it.
fn ext_proc_retry() -> core::RetryPolicy {
    use core::retry_policy::{RetryHostPredicate, retry_host_predicate::ConfigType};
    use infermesh_proto::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
    core::RetryPolicy {
        num_retries: Some(u32_value(2)),
        retry_on: "connect-failure,refused-stream".into(),
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(ConfigType::TypedConfig(to_any(&PreviousHostsPredicate {}))),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}

fn ext_proc_filter(pool: &InferencePoolSpec, cfg: &XdsConfig) -> hcm::HttpFilter {
    use ext_proc::processing_mode::{BodySendMode, HeaderSendMode};
    let filter = ext_proc::ExternalProcessor {
        grpc_service: Some(core::GrpcService {
            target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                core::grpc_service::EnvoyGrpc {
                    cluster_name: cfg.ext_proc_cluster.clone(),
                    ..Default::default()
                },
            )),
            initial_metadata: vec![core::HeaderValue {
                key: cfg.pool_header.clone(),
                value: pool.name.clone(),
                ..Default::default()
            }],
            retry_policy: Some(ext_proc_retry()),
            ..Default::default()
        }),
        failure_mode_allow: pool.failure_mode == FailureMode::FailOpen,
        processing_mode: Some(ext_proc::ProcessingMode {
            request_header_mode: HeaderSendMode::Send as i32,
            response_header_mode: HeaderSendMode::Send as i32,
            request_body_mode: BodySendMode::FullDuplexStreamed as i32,
            response_body_mode: BodySendMode::FullDuplexStreamed as i32,
            // Envoy requires trailers to be sent in FULL_DUPLEX_STREAMED mode.
            request_trailer_mode: HeaderSendMode::Send as i32,
            response_trailer_mode: HeaderSendMode::Send as i32,
        }),
        allow_mode_override: true,
        message_timeout: Some(pb_duration(pool.message_timeout)),
        ..Default::default()
    };
    http_filter(EXT_PROC_FILTER, to_any(&filter))
}

fn router_filter() -> hcm::HttpFilter {
    http_filter(ROUTER_FILTER, to_any(&router::Router::default()))
}

fn connection_manager(
    stat_prefix: &str,
    route_name: &str,
    filters: Vec<hcm::HttpFilter>,
) -> hcm::HttpConnectionManager {
    hcm::HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads_config_source()),
                route_config_name: route_name.to_string(),
            },
        )),
        http_filters: filters,
        ..Default::default()
    }
}

fn pool_listener(pool: &InferencePoolSpec, cfg: &XdsConfig) -> listener::Listener {
    let name = pool_listener_name(&pool.name);
    let manager = connection_manager(
        &pool.name,
        &name,
        vec![ext_proc_filter(pool, cfg), router_filter()],
    );
    listener::Listener {
        name,
        address: Some(socket_address(pool.listener.ip(), pool.listener.port())),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: HCM_FILTER.to_string(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(to_any(&manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn prefix_match(prefix: &str, headers: Vec<route::HeaderMatcher>) -> route::RouteMatch {
    route::RouteMatch {
        path_specifier: Some(route::route_match::PathSpecifier::Prefix(
            prefix.to_string(),
        )),
        headers,
        ..Default::default()
    }
}

fn route_to(cluster: String, timeout: Option<Duration>) -> route::route::Action {
    route::route::Action::Route(route::RouteAction {
        cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(cluster)),
        timeout: timeout.map(pb_duration),
        ..Default::default()
    })
}

fn pool_route(pool: &InferencePoolSpec, cfg: &XdsConfig) -> route::RouteConfiguration {
    let name = pool_listener_name(&pool.name);
    // Zero disables Envoy's default 15 s route timeout, which would cut long generations.
    let timeout = Some(cfg.route_timeout);
    let picked = route::Route {
        name: "picked-endpoint".into(),
        r#match: Some(prefix_match(
            "/",
            vec![route::HeaderMatcher {
                name: DESTINATION_ENDPOINT_HEADER.to_string(),
                header_match_specifier: Some(
                    route::header_matcher::HeaderMatchSpecifier::PresentMatch(true),
                ),
                ..Default::default()
            }],
        )),
        action: Some(if pool.endpoints.is_empty() {
            // Endpoints unknown to xDS: the ORIGINAL_DST cluster reaches the primary only.
            route_to(pool_original_dst_cluster(&pool.name), timeout)
        } else {
            let mut action = route_to(pool_fallback_cluster(&pool.name), timeout);
            if let route::route::Action::Route(r) = &mut action {
                // A refused or reset connection is retried on the next picked endpoint.
                r.retry_policy = Some(route::RetryPolicy {
                    retry_on: "connect-failure,refused-stream,reset".into(),
                    num_retries: Some(u32_value(2)),
                    ..Default::default()
                });
            }
            action
        }),
        ..Default::default()
    };
    // No pick: the picker was unreachable and the pool fails open (round robin over the
    // pool's endpoints), or there is nowhere to send the request.
    let unpicked_action = if pool.failure_mode == FailureMode::FailOpen
        && !pool.endpoints.is_empty()
    {
        route_to(pool_fallback_cluster(&pool.name), timeout)
    } else {
        route::route::Action::DirectResponse(route::DirectResponseAction {
            status: 503,
            body: Some(core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(format!(
                    "{{\"error\":{{\"message\":\"no endpoint was picked for pool {}\",\"type\":\"service_unavailable\"}}}}",
                    pool.name
                ))),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let unpicked = route::Route {
        name: "unpicked".into(),
        r#match: Some(prefix_match("/", Vec::new())),
        action: Some(unpicked_action),
        ..Default::default()
    };
    route::RouteConfiguration {
        name,
        virtual_hosts: vec![route::VirtualHost {
            name: pool.name.clone(),
            domains: vec!["*".into()],
            routes: vec![picked, unpicked],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn grpc_service_listener(name: &str) -> listener::Listener {
    let manager = connection_manager(name, name, vec![router_filter()]);
    listener::Listener {
        name: name.to_string(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(to_any(&manager)),
        }),
        ..Default::default()
    }
}

fn grpc_service_route(name: &str, cfg: &XdsConfig) -> route::RouteConfiguration {
    route::RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![route::VirtualHost {
            name: name.to_string(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                r#match: Some(prefix_match("", Vec::new())),
                action: Some(route_to(cfg.ext_proc_cluster.clone(), None)),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Translates a validated input into Envoy resources.
pub fn translate(input: &XdsInput, cfg: &XdsConfig) -> TypedResources {
    let mut pools: Vec<&InferencePoolSpec> = input.pools.iter().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let mut nodes = input.ext_proc_endpoints.clone();
    nodes.sort();
    let mut services: Vec<&String> = input.grpc_services.iter().collect();
    services.sort();

    let mut out = TypedResources::default();
    out.clusters.push(ext_proc_cluster(cfg));
    out.endpoints
        .push(load_assignment(&cfg.ext_proc_cluster, nodes.into_iter()));
    for pool in pools {
        out.clusters.push(original_dst_cluster(pool, cfg));
        if !pool.endpoints.is_empty() {
            out.clusters.push(fallback_cluster(pool, cfg));
            let mut ips = pool.endpoints.clone();
            ips.sort();
            let mut ports = pool.target_ports.clone();
            ports.sort_unstable();
            let addrs = ips
                .iter()
                .flat_map(|ip| ports.iter().map(move |p| SocketAddr::new(*ip, *p)));
            out.endpoints
                .push(load_assignment(&pool_fallback_cluster(&pool.name), addrs));
        }
        out.listeners.push((pool_listener(pool, cfg), true));
        out.routes.push(pool_route(pool, cfg));
    }
    for name in services {
        // Envoy cannot add an API listener over LDS, so these are served by name only.
        out.listeners.push((grpc_service_listener(name), false));
        out.routes.push(grpc_service_route(name, cfg));
    }
    out
}

/// Decodes the HTTP connection manager of a listener (socket or API listener).
pub(crate) fn listener_connection_manager(
    l: &listener::Listener,
) -> Option<Result<hcm::HttpConnectionManager, prost::DecodeError>> {
    let any = if let Some(api) = &l.api_listener {
        api.api_listener.as_ref()
    } else {
        l.filter_chains
            .iter()
            .flat_map(|fc| fc.filters.iter())
            .find(|f| f.name == HCM_FILTER)
            .and_then(|f| match &f.config_type {
                Some(listener::filter::ConfigType::TypedConfig(any)) => Some(any),
                _ => None,
            })
    }?;
    Some(hcm::HttpConnectionManager::decode(any.value.as_slice()))
}

/// The ext_proc cluster an HTTP filter names, if it is an ext_proc filter.
pub(crate) fn ext_proc_cluster_of(filter: &hcm::HttpFilter) -> Option<String> {
    let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        return None;
    };
    if any.type_url != ext_proc::ExternalProcessor::type_url() {
        return None;
    }
    let ep = ext_proc::ExternalProcessor::decode(any.value.as_slice()).ok()?;
    match ep.grpc_service?.target_specifier? {
        core::grpc_service::TargetSpecifier::EnvoyGrpc(g) => Some(g.cluster_name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> XdsInput {
        let mut pool = InferencePoolSpec::new(
            "llama",
            "127.0.0.1:10000".parse().unwrap(),
            vec![8000, 8001],
        );
        pool.endpoints = vec!["10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        XdsInput {
            pools: vec![pool],
            ext_proc_endpoints: vec![
                "127.0.0.2:9002".parse().unwrap(),
                "127.0.0.1:9002".parse().unwrap(),
            ],
            grpc_services: vec!["infermesh-epp".into()],
        }
    }

    fn decode_filter(l: &listener::Listener) -> ext_proc::ExternalProcessor {
        let manager = listener_connection_manager(l).unwrap().unwrap();
        let Some(hcm::http_filter::ConfigType::TypedConfig(any)) =
            &manager.http_filters[0].config_type
        else {
            panic!("no typed config")
        };
        assert_eq!(
            manager.http_filters[1].name, ROUTER_FILTER,
            "router must come last"
        );
        ext_proc::ExternalProcessor::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn pool_listener_carries_the_gie_ext_proc_contract() {
        let cfg = XdsConfig::default();
        let res = translate(&input(), &cfg);
        let (l, wildcard) = &res.listeners[0];
        assert!(wildcard);
        assert_eq!(l.name, "infermesh/pool/llama");
        let ep = decode_filter(l);
        let mode = ep.processing_mode.unwrap();
        assert_eq!(
            mode.request_body_mode,
            ext_proc::processing_mode::BodySendMode::FullDuplexStreamed as i32
        );
        assert_eq!(
            mode.response_body_mode,
            ext_proc::processing_mode::BodySendMode::FullDuplexStreamed as i32
        );
        assert_eq!(
            mode.request_header_mode,
            ext_proc::processing_mode::HeaderSendMode::Send as i32
        );
        assert!(ep.allow_mode_override);
        assert!(
            !ep.failure_mode_allow,
            "FailClose is the default and means not allowed"
        );
        assert_eq!(ep.message_timeout.unwrap().seconds, 10);
        // A dead picker's refused connection is retried on another picker.
        let retry = ep.grpc_service.unwrap().retry_policy.unwrap();
        assert_eq!(retry.retry_on, "connect-failure,refused-stream");
        assert_eq!(
            retry.retry_host_predicate[0].name,
            "envoy.retry_host_predicates.previous_hosts"
        );
        let mut open = input();
        open.pools[0].failure_mode = FailureMode::FailOpen;
        assert!(decode_filter(&translate(&open, &cfg).listeners[0].0).failure_mode_allow);
    }

    #[test]
    fn original_dst_cluster_reads_the_destination_header() {
        let res = translate(&input(), &XdsConfig::default());
        let c = res
            .clusters
            .iter()
            .find(|c| c.name == "infermesh/pool/llama/original-dst")
            .unwrap();
        let Some(cluster::cluster::LbConfig::OriginalDstLbConfig(cfg)) = &c.lb_config else {
            panic!("no original_dst_lb_config")
        };
        assert!(cfg.use_http_header);
        assert_eq!(cfg.http_header_name, DESTINATION_ENDPOINT_HEADER);
    }

    #[test]
    fn picked_requests_go_through_the_override_host_policy_with_retries() {
        use infermesh_proto::envoy::extensions::load_balancing_policies::override_host::v3::OverrideHost;
        let res = translate(&input(), &XdsConfig::default());
        let c = res
            .clusters
            .iter()
            .find(|c| c.name == "infermesh/pool/llama/endpoints")
            .unwrap();
        let policy = &c
            .load_balancing_policy
            .as_ref()
            .expect("an LB policy")
            .policies[0];
        let ext = policy.typed_extension_config.as_ref().unwrap();
        assert_eq!(ext.name, "envoy.load_balancing_policies.override_host");
        let oh = OverrideHost::decode(ext.typed_config.as_ref().unwrap().value.as_slice()).unwrap();
        assert_eq!(
            oh.override_host_sources[0].header,
            DESTINATION_ENDPOINT_HEADER
        );
        let md = oh.override_host_sources[1].metadata.as_ref().unwrap();
        assert_eq!(md.key, "envoy.lb");
        assert!(oh.fallback_policy.is_some(), "round robin without a pick");
        let route = &res.routes[0].virtual_hosts[0].routes[0];
        let Some(route::route::Action::Route(r)) = &route.action else {
            panic!("{route:?}")
        };
        assert_eq!(
            r.cluster_specifier,
            Some(route::route_action::ClusterSpecifier::Cluster(
                "infermesh/pool/llama/endpoints".into()
            ))
        );
        let retry = r
            .retry_policy
            .as_ref()
            .expect("retries reach the fallbacks");
        assert!(
            retry.retry_on.contains("connect-failure"),
            "{}",
            retry.retry_on
        );
        // A pool whose endpoints xDS does not know keeps the ORIGINAL_DST route.
        let mut i = input();
        i.pools[0].endpoints.clear();
        let res = translate(&i, &XdsConfig::default());
        let Some(route::route::Action::Route(r)) = &res.routes[0].virtual_hosts[0].routes[0].action
        else {
            panic!()
        };
        assert_eq!(
            r.cluster_specifier,
            Some(route::route_action::ClusterSpecifier::Cluster(
                "infermesh/pool/llama/original-dst".into()
            ))
        );
    }

    #[test]
    fn h2c_pools_speak_http2_upstream() {
        let mut i = input();
        let res = translate(&i, &XdsConfig::default());
        let od = |r: &TypedResources| {
            r.clusters
                .iter()
                .find(|c| c.name == "infermesh/pool/llama/original-dst")
                .unwrap()
                .typed_extension_protocol_options
                .contains_key(HTTP_PROTOCOL_OPTIONS)
        };
        assert!(!od(&res), "http pools use HTTP/1.1");
        i.pools[0].app_protocol = AppProtocol::H2c;
        assert!(od(&translate(&i, &XdsConfig::default())));
    }

    #[test]
    fn fail_open_routes_unpicked_requests_to_the_pool_endpoints() {
        let unpicked = |i: &XdsInput| {
            let res = translate(i, &XdsConfig::default());
            res.routes[0].virtual_hosts[0].routes[1]
                .action
                .clone()
                .unwrap()
        };
        let mut i = input();
        assert!(
            matches!(unpicked(&i), route::route::Action::DirectResponse(ref d) if d.status == 503)
        );
        i.pools[0].failure_mode = FailureMode::FailOpen;
        let route::route::Action::Route(action) = unpicked(&i) else {
            panic!("fail-open pools route unpicked requests")
        };
        assert_eq!(
            action.cluster_specifier,
            Some(route::route_action::ClusterSpecifier::Cluster(
                "infermesh/pool/llama/endpoints".into()
            ))
        );
    }

    #[test]
    fn ext_proc_endpoints_are_every_node_sorted() {
        let res = translate(&input(), &XdsConfig::default());
        let cla = &res.endpoints[0];
        assert_eq!(cla.cluster_name, "infermesh-ext-proc");
        let addrs: Vec<String> = cla.endpoints[0]
            .lb_endpoints
            .iter()
            .map(|e| match &e.host_identifier {
                Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                    match &ep.address.as_ref().unwrap().address {
                        Some(core::address::Address::SocketAddress(sa)) => {
                            format!("{}:{:?}", sa.address, sa.port_specifier)
                        }
                        _ => unreachable!(),
                    }
                }
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(addrs.len(), 2);
        assert!(addrs[0] < addrs[1]);
        let fallback = &res.endpoints[1];
        assert_eq!(
            fallback.endpoints[0].lb_endpoints.len(),
            4,
            "2 pods x 2 target ports"
        );
    }

    #[test]
    fn translation_is_independent_of_input_order() {
        let a = input();
        let mut b = input();
        b.ext_proc_endpoints.reverse();
        b.pools[0].endpoints.reverse();
        b.pools[0].target_ports.reverse();
        assert_eq!(
            translate(&a, &XdsConfig::default()),
            translate(&b, &XdsConfig::default())
        );
    }

    #[test]
    fn grpc_services_are_named_only_api_listeners() {
        let res = translate(&input(), &XdsConfig::default());
        let (l, wildcard) = res
            .listeners
            .iter()
            .find(|(l, _)| l.name == "infermesh-epp")
            .unwrap();
        assert!(!wildcard);
        assert!(l.api_listener.is_some());
    }
}
