//! The Envoy bootstrap that connects an Envoy to the tier over ADS.
//!
//! Its only static resource is the ADS cluster, listing every infermesh node. What it adds
//! to a plain ADS bootstrap is what moves an Envoy off a node that stalls without closing
//! its sockets (SIGSTOP, a hung process, a network blackhole), where TCP alone would keep
//! the ADS stream on the dead node forever:
//! - HTTP/2 keepalive PINGs on the ADS connection, so a silent peer is dropped within
//!   `keepalive_interval + keepalive_timeout` and the stream reconnects;
//! - gRPC health checks of every node, so the reconnect (and every later one) picks a
//!   node that answers;
//!
//! Envoy reconnects a failed ADS stream after its own back-off (0.5 s base with jitter).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

/// Name of the static ADS cluster in the generated bootstrap.
pub const ADS_CLUSTER: &str = "infermesh-xds";

/// gRPC health-check service name of the ADS service (served by every node).
pub const ADS_HEALTH_SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// ADS flavour an Envoy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsApi {
    /// State of the World (`GRPC`).
    Sotw,
    /// Incremental (`DELTA_GRPC`).
    Delta,
}

impl AdsApi {
    fn api_type(self) -> &'static str {
        match self {
            AdsApi::Sotw => "GRPC",
            AdsApi::Delta => "DELTA_GRPC",
        }
    }
}

/// What an Envoy bootstrap for the tier says.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Envoy's node id (what `infermesh xds status` lists it as).
    pub node_id: String,
    /// Envoy's node cluster.
    pub node_cluster: String,
    /// ADS address of every infermesh node, `HOST:PORT` (IP literals give a STATIC
    /// cluster, host names a STRICT_DNS one, e.g. a headless Service).
    pub xds: Vec<String>,
    /// SotW or Delta.
    pub api: AdsApi,
    /// Envoy's admin listener.
    pub admin: SocketAddr,
    /// Connect timeout to a node.
    pub connect_timeout: Duration,
    /// HTTP/2 PING period on the ADS connection.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// Interval of the ADS cluster's health checks.
    pub health_check_interval: Duration,
    /// Timeout of one health check.
    pub health_check_timeout: Duration,
    /// Failed checks before a node is avoided.
    pub unhealthy_threshold: u32,
    /// Keepalives and health checks on the ADS cluster; off gives the plain ADS bootstrap
    /// most examples ship, kept as the baseline the chaos suite compares against.
    pub stall_detection: bool,
    /// mTLS to the nodes' ADS port; `None` = plaintext.
    pub tls: Option<crate::upstream_tls::UpstreamTlsFiles>,
}

impl BootstrapOptions {
    /// Options with the defaults: detection of a silent node within about 2 s.
    pub fn new(node_id: impl Into<String>, xds: Vec<String>) -> Self {
        BootstrapOptions {
            node_id: node_id.into(),
            node_cluster: "infermesh-gateway".into(),
            xds,
            api: AdsApi::Sotw,
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            connect_timeout: Duration::from_millis(500),
            keepalive_interval: Duration::from_millis(500),
            keepalive_timeout: Duration::from_secs(1),
            health_check_interval: Duration::from_secs(1),
            health_check_timeout: Duration::from_millis(800),
            unhealthy_threshold: 2,
            stall_detection: true,
            tls: None,
        }
    }
}

/// A bootstrap that cannot be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// No ADS address was given.
    #[error("the bootstrap needs at least one infermesh ADS address")]
    NoServers,
    /// An address is not `HOST:PORT`.
    #[error("ADS address {0:?} is not HOST:PORT with a port in 1..=65535")]
    BadAddress(String),
    /// A duration that must be positive is zero.
    #[error("bootstrap {0} must be above zero")]
    Zero(&'static str),
}

/// Envoy's JSON duration spelling.
fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// Splits `HOST:PORT` (with `[v6]:PORT`), or names the bad address.
fn host_port(a: &str) -> Result<(String, u16), BootstrapError> {
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let bad = || BootstrapError::BadAddress(a.to_owned());
    let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains([':', '[', ']', '/']) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Builds the bootstrap (Envoy accepts it as JSON or YAML).
pub fn envoy_bootstrap(o: &BootstrapOptions) -> Result<Value, BootstrapError> {
    if o.xds.is_empty() {
        return Err(BootstrapError::NoServers);
    }
    for (name, d) in [
        ("connect timeout", o.connect_timeout),
        ("keepalive interval", o.keepalive_interval),
        ("keepalive timeout", o.keepalive_timeout),
        ("health check interval", o.health_check_interval),
        ("health check timeout", o.health_check_timeout),
    ] {
        if d.is_zero() {
            return Err(BootstrapError::Zero(name));
        }
    }
    let mut all_ips = true;
    let mut endpoints = Vec::with_capacity(o.xds.len());
    for a in &o.xds {
        let (host, port) = host_port(a)?;
        all_ips &= host.parse::<std::net::IpAddr>().is_ok();
        endpoints.push(json!({"endpoint": {"address": {"socket_address": {
            "address": host, "port_value": port}}}}));
    }
    let mut cluster = json!({
        "name": ADS_CLUSTER,
        "type": if all_ips { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": secs(o.connect_timeout),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": ADS_CLUSTER, "endpoints": [{"lb_endpoints": endpoints}]}
    });
    if o.stall_detection {
        cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["explicit_http_config"]["http2_protocol_options"] = json!({"connection_keepalive": {
            "interval": secs(o.keepalive_interval),
            "timeout": secs(o.keepalive_timeout)
        }});
        cluster["health_checks"] = json!([{
            "timeout": secs(o.health_check_timeout),
            "interval": secs(o.health_check_interval),
            "no_traffic_interval": secs(o.health_check_interval),
            "unhealthy_threshold": o.unhealthy_threshold.max(1),
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": ADS_HEALTH_SERVICE}
        }]);
        cluster["ignore_health_on_host_removal"] = json!(true);
    }
    if let Some(t) = &o.tls {
        cluster["transport_socket"] = crate::upstream_tls::transport_socket_json(t);
    }
    Ok(json!({
        "node": {"id": o.node_id, "cluster": o.node_cluster},
        "dynamic_resources": {
            "ads_config": {
                "api_type": o.api.api_type(),
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": ADS_CLUSTER}}],
                "set_node_on_first_message_only": true
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {"clusters": [cluster]},
        "admin": {"address": {"socket_address": {
            "address": o.admin.ip().to_string(), "port_value": o.admin.port()}}}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_node_detection_is_in_the_ads_cluster() {
        let o = BootstrapOptions::new("gw-1", vec!["127.0.0.1:9002".into(), "[::1]:9003".into()]);
        let b = envoy_bootstrap(&o).unwrap();
        let c = &b["static_resources"]["clusters"][0];
        assert_eq!(c["type"], "STATIC");
        let h2 = &c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["explicit_http_config"]["http2_protocol_options"];
        assert_eq!(h2["connection_keepalive"]["interval"], "0.5s");
        assert_eq!(
            c["health_checks"][0]["grpc_health_check"]["service_name"],
            ADS_HEALTH_SERVICE
        );
        let eps = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap();
        assert_eq!(
            eps[1]["endpoint"]["address"]["socket_address"]["address"],
            "::1"
        );
        assert_eq!(
            b["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            ADS_CLUSTER
        );
        let plain = envoy_bootstrap(&BootstrapOptions {
            stall_detection: false,
            ..o
        })
        .unwrap();
        assert!(plain["static_resources"]["clusters"][0]["health_checks"].is_null());
    }

    #[test]
    fn host_names_give_a_dns_cluster_and_bad_input_is_named() {
        let o = BootstrapOptions::new("gw", vec!["infermesh-0.infermesh:9002".into()]);
        let b = envoy_bootstrap(&o).unwrap();
        assert_eq!(b["static_resources"]["clusters"][0]["type"], "STRICT_DNS");
        for bad in ["nohost", "h:0", ":9002", "h:99999", "a:b:c"] {
            let o = BootstrapOptions::new("gw", vec![bad.into()]);
            assert_eq!(
                envoy_bootstrap(&o),
                Err(BootstrapError::BadAddress(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            envoy_bootstrap(&BootstrapOptions::new("gw", vec![])),
            Err(BootstrapError::NoServers)
        );
        let mut o = BootstrapOptions::new("gw", vec!["127.0.0.1:1".into()]);
        o.keepalive_timeout = Duration::ZERO;
        assert_eq!(
            envoy_bootstrap(&o),
            Err(BootstrapError::Zero("keepalive timeout"))
        );
    }
}
