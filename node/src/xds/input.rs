//! What the node asks its xDS server to serve, as plain functions of the node's sources
//! (the pool it routes, policy pools when policy has any, the live nodes' ext_proc
//! addresses). No IO; the feed task calls these on every change.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use infermesh_raft_store::policy::MAX_TARGET_PORTS;
use infermesh_xds::{AppProtocol, FailureMode, InferencePoolSpec, XdsInput};

use crate::pool::PoolView;

/// Envoy-facing settings of the node's own pool when policy does not describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePoolSettings {
    /// Address the Envoy listener for the pool binds.
    pub listener: SocketAddr,
    /// What Envoy does when no picker answers.
    pub failure_mode: FailureMode,
}

/// Pool name used when the discovery file names none.
pub const UNNAMED_POOL: &str = "default";

/// The node's own pool (from its endpoints file or static config) as an xDS pool:
/// target ports are the distinct ports of its endpoints (GIE allows at most
/// [`MAX_TARGET_PORTS`]; each pod's list is checked, but pods may differ, so extra ports
/// are dropped and reported), pod IPs feed the fail-open fallback route. `None` when the
/// pool has no endpoints yet (nothing to route to, nothing to serve).
pub fn file_pool(
    view: &PoolView,
    settings: FilePoolSettings,
) -> (Option<InferencePoolSpec>, Option<String>) {
    if view.slots.is_empty() {
        return (None, None);
    }
    let ports: BTreeSet<u16> = view.slots.iter().map(|s| s.address().port()).collect();
    let ips: BTreeSet<IpAddr> = view.slots.iter().map(|s| s.address().ip()).collect();
    let mut warning = None;
    let mut target_ports: Vec<u16> = ports.iter().copied().collect();
    if target_ports.len() > MAX_TARGET_PORTS {
        warning = Some(format!(
            "pool {:?} has {} distinct endpoint ports; an InferencePool holds at most {MAX_TARGET_PORTS}, serving the first {MAX_TARGET_PORTS}",
            view.name,
            target_ports.len()
        ));
        target_ports.truncate(MAX_TARGET_PORTS);
    }
    let name = if view.name.is_empty() {
        UNNAMED_POOL.to_owned()
    } else {
        view.name.clone()
    };
    let mut spec = InferencePoolSpec::new(name, settings.listener, target_ports);
    spec.endpoints = ips.into_iter().filter(|ip| !ip.is_unspecified()).collect();
    spec.failure_mode = settings.failure_mode;
    spec.app_protocol = AppProtocol::Http;
    (Some(spec), warning)
}

/// The full input: policy pools when policy has published any (they replace the file
/// pool), else the file pool; ext_proc endpoints sorted and de-duplicated so every node
/// given the same members builds the same resources (and so the same versions).
pub fn build_input(
    file_pool: Option<&InferencePoolSpec>,
    policy_pools: Option<&[InferencePoolSpec]>,
    ext_proc: impl IntoIterator<Item = SocketAddr>,
    grpc_services: &[String],
) -> XdsInput {
    let mut pools: Vec<InferencePoolSpec> = match policy_pools {
        Some(p) => p.to_vec(),
        None => file_pool.cloned().into_iter().collect(),
    };
    // The node's own pool also has the pods of its endpoints file (fail-open fallback).
    if let (Some(own), Some(_)) = (file_pool, policy_pools)
        && let Some(p) = pools.iter_mut().find(|p| p.name == own.name)
    {
        let ips: BTreeSet<IpAddr> = p.endpoints.iter().chain(&own.endpoints).copied().collect();
        p.endpoints = ips.into_iter().collect();
    }
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let ext_proc_endpoints: BTreeSet<SocketAddr> = ext_proc.into_iter().collect();
    XdsInput {
        pools,
        ext_proc_endpoints: ext_proc_endpoints.into_iter().collect(),
        grpc_services: grpc_services.to_vec(),
    }
}

/// The address other nodes and Envoys reach this node's ext_proc server at: the explicit
/// advertise address, else the bound one when it is specific, else the bound port on the
/// mesh's advertised IP, else loopback (single node on one host).
pub fn advertised_ext_proc(
    explicit: Option<SocketAddr>,
    bound: SocketAddr,
    mesh_ip: Option<IpAddr>,
) -> SocketAddr {
    if let Some(a) = explicit {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    match mesh_ip.filter(|ip| !ip.is_unspecified()) {
        Some(ip) => SocketAddr::new(ip, bound.port()),
        None => SocketAddr::from(([127, 0, 0, 1], bound.port())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::EndpointSpec;
    use crate::pool::EndpointSlot;
    use crate::scrape::engine::Engine;
    use std::sync::Arc;

    fn view(name: &str, addrs: &[&str]) -> PoolView {
        let slots = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Arc::new(EndpointSlot::new(EndpointSpec {
                    address: a.parse().unwrap(),
                    pod: format!("p{i}"),
                    labels: Default::default(),
                    engine: Engine::Vllm,
                }))
            })
            .collect();
        PoolView::new(name.into(), slots, Default::default(), Default::default())
    }

    const SETTINGS: FilePoolSettings = FilePoolSettings {
        listener: SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10000),
        failure_mode: FailureMode::FailOpen,
    };

    #[test]
    fn file_pool_takes_distinct_ports_and_ips() {
        let v = view(
            "llama",
            &["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.2:8001"],
        );
        let (p, warn) = file_pool(&v, SETTINGS);
        let p = p.unwrap();
        assert!(warn.is_none());
        assert_eq!(p.name, "llama");
        assert_eq!(p.target_ports, vec![8000, 8001]);
        assert_eq!(p.endpoints.len(), 2);
        assert_eq!(p.failure_mode, FailureMode::FailOpen);
        assert_eq!(p.listener, SETTINGS.listener);
    }

    #[test]
    fn empty_or_unnamed_pools() {
        assert!(file_pool(&view("x", &[]), SETTINGS).0.is_none());
        let (p, _) = file_pool(&view("", &["10.0.0.1:8000"]), SETTINGS);
        assert_eq!(p.unwrap().name, UNNAMED_POOL);
        let many: Vec<String> = (0..9).map(|i| format!("10.0.0.1:{}", 8000 + i)).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let (p, warn) = file_pool(&view("x", &refs), SETTINGS);
        assert_eq!(p.unwrap().target_ports.len(), 8);
        assert!(warn.unwrap().contains("at most 8"));
    }

    #[test]
    fn input_is_the_same_whatever_the_member_order() {
        let (p, _) = file_pool(&view("llama", &["10.0.0.1:8000"]), SETTINGS);
        let a: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:9002".parse().unwrap();
        let x = build_input(p.as_ref(), None, [a, b, a], &[]);
        let y = build_input(p.as_ref(), None, [b, a], &[]);
        assert_eq!(x, y);
        assert_eq!(x.ext_proc_endpoints, vec![a, b]);
        x.validate().unwrap();
    }

    #[test]
    fn policy_pools_replace_the_file_pool() {
        let (p, _) = file_pool(&view("llama", &["10.0.0.1:8000"]), SETTINGS);
        let policy = vec![InferencePoolSpec::new(
            "other",
            "127.0.0.1:11000".parse().unwrap(),
            vec![9000],
        )];
        let x = build_input(p.as_ref(), Some(&policy), [], &[]);
        assert_eq!(x.pools, policy);
        let empty = build_input(p.as_ref(), Some(&[]), [], &[]);
        assert!(empty.pools.is_empty(), "policy with no pools serves none");
        let mut same = policy[0].clone();
        same.name = "llama".into();
        same.endpoints = vec!["10.0.0.7".parse().unwrap()];
        let x = build_input(p.as_ref(), Some(&[same]), [], &[]);
        assert_eq!(
            x.pools[0].endpoints.len(),
            2,
            "file pods join the policy pool's"
        );
    }

    #[test]
    fn advertise_address_choice() {
        let any: SocketAddr = "0.0.0.0:9002".parse().unwrap();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            advertised_ext_proc(None, any, Some(ip)),
            "10.1.2.3:9002".parse().unwrap()
        );
        assert_eq!(
            advertised_ext_proc(None, any, None),
            "127.0.0.1:9002".parse().unwrap()
        );
        let bound: SocketAddr = "10.0.0.9:9002".parse().unwrap();
        assert_eq!(advertised_ext_proc(None, bound, Some(ip)), bound);
        let explicit: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(
            advertised_ext_proc(Some(explicit), bound, Some(ip)),
            explicit
        );
    }
}
