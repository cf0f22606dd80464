//! Policy InferencePools as xDS pools: each stored InferencePool becomes an Envoy listener,
//! route and clusters. GIE's InferencePool has no listener (that is the Gateway's), so the
//! listener comes from the pool's `infermesh.io/envoy-listener` annotation (`IP:PORT`, or
//! `PORT` on the `--xds-listener` IP); a pool without it gets `--xds-listener` when it is the
//! only pool, and is skipped with a warning otherwise (two pools cannot share a port).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use infermesh_raft_store::PolicyState;
use infermesh_raft_store::policy::{
    AppProtocol as PolicyAppProtocol, FailureMode as PolicyFailureMode,
};
use infermesh_xds::{AppProtocol, FailureMode, InferencePoolSpec};
use tokio::sync::watch;

use super::XdsFeed;
use super::input::FilePoolSettings;

/// Annotation on an InferencePool naming its Envoy listener address.
pub const LISTENER_ANNOTATION: &str = "infermesh.io/envoy-listener";

fn listener_of(value: &str, fallback: SocketAddr) -> Result<SocketAddr, String> {
    let v = value.trim();
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    match v.parse::<u16>() {
        Ok(port) if port > 0 => Ok(SocketAddr::new(fallback.ip(), port)),
        _ => Err(format!(
            "annotation {LISTENER_ANNOTATION}={value:?} is neither IP:PORT nor a port"
        )),
    }
}

/// The xDS pools policy describes (`None` when policy holds no InferencePool: the node
/// serves its own pool), and a warning per pool left out.
pub fn pools_from_policy(
    state: &PolicyState,
    settings: FilePoolSettings,
) -> (Option<Vec<InferencePoolSpec>>, Vec<String>) {
    let stored: Vec<_> = state.pools().collect();
    if stored.is_empty() {
        return (None, Vec::new());
    }
    let only = stored.len() == 1;
    let mut warnings = Vec::new();
    let mut out = Vec::new();
    for doc in stored {
        let name = &doc.metadata.name;
        let listener = match doc.metadata.annotations.get(LISTENER_ANNOTATION) {
            Some(v) => match listener_of(v, settings.listener) {
                Ok(a) => a,
                Err(e) => {
                    warnings.push(format!("InferencePool {name}: {e}; not served to Envoy"));
                    continue;
                }
            },
            None if only => settings.listener,
            None => {
                warnings.push(format!(
                    "InferencePool {name}: no {LISTENER_ANNOTATION} annotation and several pools; not served to Envoy"
                ));
                continue;
            }
        };
        let ports: Result<Vec<u16>, _> = doc
            .spec
            .target_ports
            .iter()
            .map(|p| u16::try_from(p.number))
            .collect();
        let Ok(target_ports) = ports else {
            warnings.push(format!(
                "InferencePool {name}: a target port is out of range; not served to Envoy"
            ));
            continue;
        };
        let (pool, _) = crate::policy::derive::pool_spec(state, Some(name), None);
        let ips: BTreeSet<IpAddr> = pool.endpoints.iter().map(|e| e.address.ip()).collect();
        let mut spec = InferencePoolSpec::new(name.clone(), listener, target_ports);
        spec.endpoints = ips.into_iter().filter(|ip| !ip.is_unspecified()).collect();
        spec.failure_mode = match doc.spec.failure_mode() {
            PolicyFailureMode::FailClose => FailureMode::FailClose,
            PolicyFailureMode::FailOpen => FailureMode::FailOpen,
        };
        spec.app_protocol = match doc.spec.app_protocol {
            PolicyAppProtocol::Http => AppProtocol::Http,
            PolicyAppProtocol::H2c => AppProtocol::H2c,
        };
        out.push(spec);
    }
    (Some(out), warnings)
}

/// Feeds applied policy's pools into `feed` until `shutdown` turns true.
pub async fn feed_policy_pools(
    feed: XdsFeed,
    mut policy: watch::Receiver<Arc<PolicyState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let state = policy.borrow_and_update().clone();
        let (pools, warnings) = pools_from_policy(&state, feed.file_pool_settings());
        for w in warnings {
            tracing::warn!("xds: {w}");
        }
        feed.set_policy_pools(pools);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = policy.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::derive::state_from_yaml as state;

    const SETTINGS: FilePoolSettings = FilePoolSettings {
        listener: SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10000),
        failure_mode: FailureMode::FailClose,
    };

    #[test]
    fn no_pools_in_policy_means_the_file_pool() {
        assert_eq!(pools_from_policy(&PolicyState::default(), SETTINGS).0, None);
    }

    #[test]
    fn a_pool_with_annotation_failure_mode_and_endpoints() {
        use infermesh_raft_store::policy::{
            PolicyObject, PolicyOp, PolicyRequest, Touched, accept_any_epp_config, parse_documents,
        };
        let mut objects = parse_documents(
            "apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llama, annotations: {infermesh.io/envoy-listener: '12000'}}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp, port: {number: 9002}, failureMode: FailOpen}
---
apiVersion: infermesh.io/v1alpha1
kind: InferenceEndpoints
metadata: {name: fleet}
spec:
  endpoints:
  - {address: '10.0.0.1:8000', labels: {app: vllm}}
  - {address: '10.0.0.2:8000', labels: {app: other}}
",
            &accept_any_epp_config(),
        )
        .unwrap();
        // h2c is refused on input now; a pool stored before that still maps to h2c.
        let PolicyObject::InferencePool(pool) = &mut objects[0] else {
            panic!("the first document is the pool");
        };
        pool.spec.app_protocol = PolicyAppProtocol::H2c;
        let ops = objects
            .into_iter()
            .map(|o| PolicyOp::Put {
                object: Box::new(o),
                expected_version: None,
            })
            .collect();
        let mut s = PolicyState::default();
        s.handle_request(1, &PolicyRequest { ops }, &mut Touched::default());
        let (pools, warnings) = pools_from_policy(&s, SETTINGS);
        assert!(warnings.is_empty(), "{warnings:?}");
        let p = &pools.unwrap()[0];
        assert_eq!(p.listener, "127.0.0.1:12000".parse().unwrap());
        assert_eq!(p.failure_mode, FailureMode::FailOpen);
        assert_eq!(p.app_protocol, AppProtocol::H2c);
        assert_eq!(p.target_ports, vec![8000]);
        assert_eq!(p.endpoints, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn several_pools_need_their_own_listener() {
        let s = state(
            "kind: InferencePool
apiVersion: inference.networking.k8s.io/v1
metadata: {name: a}
spec: {selector: {matchLabels: {app: a}}, targetPorts: [{number: 8000}]}
---
kind: InferencePool
apiVersion: inference.networking.k8s.io/v1
metadata: {name: b, annotations: {infermesh.io/envoy-listener: '127.0.0.2:9000'}}
spec: {selector: {matchLabels: {app: b}}, targetPorts: [{number: 8000}]}
---
kind: InferencePool
apiVersion: inference.networking.k8s.io/v1
metadata: {name: c, annotations: {infermesh.io/envoy-listener: 'nope'}}
spec: {selector: {matchLabels: {app: c}}, targetPorts: [{number: 8000}]}
",
        );
        let (pools, warnings) = pools_from_policy(&s, SETTINGS);
        let pools = pools.unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].name, "b");
        assert_eq!(pools[0].listener, "127.0.0.2:9000".parse().unwrap());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("InferencePool a")));
        assert!(warnings.iter().any(|w| w.contains("\"nope\"")));
    }
}
