//! What the xDS server is asked to serve: a plain description of inference pools and the
//! live infermesh nodes, validated before anything is translated.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use infermesh_raft_store::policy::validate_target_ports;
use serde::{Deserialize, Serialize};

use crate::error::InvalidInput;

/// Everything the xDS server serves, as plain data. Built by the node from policy
/// (InferencePools), live membership (ext_proc addresses) and endpoint discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct XdsInput {
    /// Inference pools; each becomes a listener, a route and its clusters on every Envoy.
    #[serde(default)]
    pub pools: Vec<InferencePoolSpec>,
    /// ext_proc (EPP) addresses of every live infermesh node: the ext_proc cluster's endpoints.
    #[serde(default)]
    pub ext_proc_endpoints: Vec<SocketAddr>,
    /// Names a proxyless gRPC client resolves as `xds:///NAME` to reach the ext_proc service
    /// on the live nodes (an API listener per name, served only when asked for by name).
    #[serde(default)]
    pub grpc_services: Vec<String>,
}

/// One InferencePool as Envoy needs it (GIE `InferencePool` fields, already resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Pool name (`metadata.name`): lower-case letters, digits, '-' and '.'.
    pub name: String,
    /// Address and port the Envoy listener for this pool binds.
    pub listener: SocketAddr,
    /// `spec.targetPorts`: 1 to `MAX_TARGET_PORTS` unique model-server ports; each
    /// `podIP:port` is an endpoint.
    pub target_ports: Vec<u16>,
    /// Model-server pod addresses, already resolved from `spec.selector` or static
    /// endpoints; used for the fail-open fallback route when the picker is unreachable.
    #[serde(default)]
    pub endpoints: Vec<IpAddr>,
    /// `spec.endpointPickerRef.failureMode`.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// `spec.appProtocol`: how Envoy speaks to the model servers.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// ext_proc `message_timeout`: how long Envoy waits for each picker reply.
    #[serde(default = "default_message_timeout")]
    pub message_timeout: Duration,
}

/// GIE `endpointPickerRef.failureMode`: what Envoy does when the picker is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureMode {
    /// Requests fail when the picker cannot be reached (GIE default).
    #[default]
    FailClose,
    /// Requests go on without a pick (to the pool's endpoints, round robin).
    FailOpen,
}

/// GIE `spec.appProtocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppProtocol {
    /// HTTP/1.1 to the model servers (GIE default `http`).
    #[default]
    #[serde(rename = "http")]
    Http,
    /// Cleartext HTTP/2 (`kubernetes.io/h2c`).
    #[serde(rename = "kubernetes.io/h2c")]
    H2c,
}

/// Default ext_proc message timeout: generous, because in FULL_DUPLEX_STREAMED mode the
/// picker holds its headers reply until the whole request body has arrived.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest `message_timeout` Envoy accepts (the field is bounded at one hour).
pub const MAX_MESSAGE_TIMEOUT: Duration = Duration::from_secs(3600);

fn default_message_timeout() -> Duration {
    DEFAULT_MESSAGE_TIMEOUT
}

impl InferencePoolSpec {
    /// A pool with GIE defaults (FailClose, http, 10 s message timeout) and no endpoints.
    pub fn new(name: impl Into<String>, listener: SocketAddr, target_ports: Vec<u16>) -> Self {
        Self {
            name: name.into(),
            listener,
            target_ports,
            endpoints: Vec::new(),
            failure_mode: FailureMode::default(),
            app_protocol: AppProtocol::default(),
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
        }
    }
}

/// Longest accepted pool or service name (a Kubernetes object name).
const MAX_NAME_LEN: usize = 253;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl XdsInput {
    /// Checks every field; the first problem found is returned and nothing is served from it.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let mut names = BTreeSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            if !valid_name(&pool.name) {
                return Err(InvalidInput::PoolName {
                    name: pool.name.clone(),
                });
            }
            if !names.insert(pool.name.as_str()) {
                return Err(InvalidInput::DuplicatePool {
                    name: pool.name.clone(),
                });
            }
            if pool.listener.port() == 0 {
                return Err(InvalidInput::ListenerPortZero {
                    pool: pool.name.clone(),
                });
            }
            if let Some(other) = self.pools[..i]
                .iter()
                .find(|o| listeners_overlap(o.listener, pool.listener))
            {
                return Err(InvalidInput::ListenerConflict {
                    pool: pool.name.clone(),
                    other: other.name.clone(),
                    address: pool.listener,
                });
            }
            validate_target_ports(pool.target_ports.iter().map(|&p| i64::from(p))).map_err(
                |reason| InvalidInput::TargetPorts {
                    pool: pool.name.clone(),
                    ports: pool.target_ports.clone(),
                    reason,
                },
            )?;
            if pool.message_timeout.is_zero() || pool.message_timeout > MAX_MESSAGE_TIMEOUT {
                return Err(InvalidInput::MessageTimeout {
                    pool: pool.name.clone(),
                    timeout: pool.message_timeout,
                });
            }
            let endpoints: BTreeSet<IpAddr> = pool.endpoints.iter().copied().collect();
            if endpoints.len() != pool.endpoints.len() {
                return Err(InvalidInput::DuplicateEndpoint {
                    pool: pool.name.clone(),
                });
            }
            if let Some(ip) = pool.endpoints.iter().find(|ip| ip.is_unspecified()) {
                return Err(InvalidInput::UnspecifiedEndpoint {
                    pool: pool.name.clone(),
                    ip: *ip,
                });
            }
        }
        let mut seen = BTreeSet::new();
        for addr in &self.ext_proc_endpoints {
            if addr.port() == 0 || addr.ip().is_unspecified() {
                return Err(InvalidInput::ExtProcEndpoint { address: *addr });
            }
            if !seen.insert(*addr) {
                return Err(InvalidInput::DuplicateExtProcEndpoint { address: *addr });
            }
        }
        let mut services = BTreeSet::new();
        for name in &self.grpc_services {
            if !valid_name(name) {
                return Err(InvalidInput::GrpcServiceName { name: name.clone() });
            }
            if !services.insert(name.as_str()) {
                return Err(InvalidInput::DuplicateGrpcService { name: name.clone() });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_raft_store::policy::MAX_TARGET_PORTS;

    fn pool(name: &str, port: u16) -> InferencePoolSpec {
        InferencePoolSpec::new(name, SocketAddr::from(([127, 0, 0, 1], port)), vec![8000])
    }

    #[test]
    fn accepts_a_plain_pool() {
        let input = XdsInput {
            pools: vec![pool("llama", 10000)],
            ext_proc_endpoints: vec!["127.0.0.1:9002".parse().unwrap()],
            grpc_services: vec!["infermesh-epp".into()],
        };
        input.validate().unwrap();
    }

    #[test]
    fn rejects_each_bad_field_by_name() {
        let bad = |f: &dyn Fn(&mut XdsInput)| {
            let mut input = XdsInput {
                pools: vec![pool("llama", 10000)],
                ..Default::default()
            };
            f(&mut input);
            input.validate().unwrap_err()
        };
        assert!(matches!(
            bad(&|i| i.pools[0].name = "Bad_Name".into()),
            InvalidInput::PoolName { .. }
        ));
        assert!(matches!(
            bad(&|i| i.pools.push(pool("llama", 10001))),
            InvalidInput::DuplicatePool { .. }
        ));
        assert!(matches!(
            bad(&|i| i.pools.push(pool("other", 10000))),
            InvalidInput::ListenerConflict { .. }
        ));
        assert!(matches!(
            bad(&|i| i.pools.push(InferencePoolSpec::new(
                "any",
                "0.0.0.0:10000".parse().unwrap(),
                vec![1]
            ))),
            InvalidInput::ListenerConflict { .. }
        ));
        assert!(matches!(
            bad(&|i| i.pools[0].listener.set_port(0)),
            InvalidInput::ListenerPortZero { .. }
        ));
        assert!(matches!(
            bad(&|i| i.pools[0].target_ports = vec![]),
            InvalidInput::TargetPorts { .. }
        ));
        assert!(matches!(
            bad(&|i| i.pools[0].target_ports = vec![1, 1]),
            InvalidInput::TargetPorts { .. }
        ));
        let nine = bad(&|i| i.pools[0].target_ports = (1..=9).collect());
        assert!(matches!(nine, InvalidInput::TargetPorts { .. }));
        assert!(
            nine.to_string().contains("must list 1 to 8 ports, got 9"),
            "{nine}"
        );
        assert!(matches!(
            bad(&|i| i.pools[0].target_ports = vec![8000, 0]),
            InvalidInput::TargetPorts { .. }
        ));
        // The limit is the policy store's: as many ports as an InferencePool may list pass.
        let mut most = XdsInput {
            pools: vec![pool("llama", 10000)],
            ..Default::default()
        };
        most.pools[0].target_ports = (1..=MAX_TARGET_PORTS as u16).collect();
        most.validate().unwrap();
        assert!(matches!(
            bad(&|i| i.pools[0].message_timeout = Duration::ZERO),
            InvalidInput::MessageTimeout { .. }
        ));
        assert!(matches!(
            bad(&|i| i.ext_proc_endpoints = vec!["127.0.0.1:1".parse().unwrap(); 2]),
            InvalidInput::DuplicateExtProcEndpoint { .. }
        ));
        assert!(matches!(
            bad(&|i| i.ext_proc_endpoints = vec!["0.0.0.0:1".parse().unwrap()]),
            InvalidInput::ExtProcEndpoint { .. }
        ));
        assert!(matches!(
            bad(&|i| i.grpc_services = vec!["".into()]),
            InvalidInput::GrpcServiceName { .. }
        ));
    }

    #[test]
    fn deserializes_gie_spellings_and_rejects_unknown_fields() {
        let json = r#"{"pools":[{"name":"p","listener":"127.0.0.1:8080","targetPorts":[8000],
            "failureMode":"FailOpen","appProtocol":"kubernetes.io/h2c"}]}"#;
        let input: XdsInput = serde_json::from_str(json).unwrap();
        assert_eq!(input.pools[0].failure_mode, FailureMode::FailOpen);
        assert_eq!(input.pools[0].app_protocol, AppProtocol::H2c);
        assert_eq!(input.pools[0].message_timeout, DEFAULT_MESSAGE_TIMEOUT);
        assert!(serde_json::from_str::<XdsInput>(r#"{"pool":[]}"#).is_err());
    }
}
