//! Typed errors of the xDS crate.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use infermesh_raft_store::policy::InvalidTargetPorts;

use crate::resource_type::ResourceType;

/// Why an [`XdsInput`](crate::XdsInput) was refused. Nothing was published: the
/// previous snapshot keeps being served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// A pool name is empty, too long or not lower-case DNS characters.
    #[error(
        "pool name {name:?} must be 1-253 lower-case letters, digits, '-' or '.', starting and ending alphanumeric"
    )]
    PoolName {
        /// The offending name.
        name: String,
    },
    /// Two pools have the same name.
    #[error("pool {name:?} appears twice")]
    DuplicatePool {
        /// The repeated name.
        name: String,
    },
    /// A pool's listener has port 0 (Envoy needs a fixed port).
    #[error("pool {pool:?}: listener port must not be 0")]
    ListenerPortZero {
        /// The pool.
        pool: String,
    },
    /// Two pools would bind the same listener address.
    #[error("pool {pool:?}: listener {address} overlaps pool {other:?}")]
    ListenerConflict {
        /// The later pool.
        pool: String,
        /// The pool already holding the address.
        other: String,
        /// The contested address.
        address: SocketAddr,
    },
    /// `targetPorts` breaks the InferencePool rule the policy store checks (1 to
    /// `MAX_TARGET_PORTS` unique non-zero ports).
    #[error("pool {pool:?}: targetPorts {ports:?}: {reason}")]
    TargetPorts {
        /// The pool.
        pool: String,
        /// The ports given.
        ports: Vec<u16>,
        /// Which part of the rule they break.
        reason: InvalidTargetPorts,
    },
    /// The ext_proc message timeout is zero or above Envoy's one-hour bound.
    #[error("pool {pool:?}: message timeout {timeout:?} must be above 0 and at most 1h")]
    MessageTimeout {
        /// The pool.
        pool: String,
        /// The timeout given.
        timeout: Duration,
    },
    /// A pool lists the same endpoint twice.
    #[error("pool {pool:?}: an endpoint address is listed twice")]
    DuplicateEndpoint {
        /// The pool.
        pool: String,
    },
    /// A pool lists an unspecified (0.0.0.0 / ::) endpoint address.
    #[error("pool {pool:?}: endpoint {ip} is not a routable address")]
    UnspecifiedEndpoint {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
    },
    /// An ext_proc endpoint has port 0 or an unspecified address.
    #[error("ext_proc endpoint {address} must have a routable address and a non-zero port")]
    ExtProcEndpoint {
        /// The address.
        address: SocketAddr,
    },
    /// An ext_proc endpoint is listed twice.
    #[error("ext_proc endpoint {address} is listed twice")]
    DuplicateExtProcEndpoint {
        /// The address.
        address: SocketAddr,
    },
    /// A proxyless gRPC service name is not a valid name.
    #[error("gRPC service name {name:?} must be 1-253 lower-case letters, digits, '-' or '.'")]
    GrpcServiceName {
        /// The name.
        name: String,
    },
    /// A proxyless gRPC service name is listed twice.
    #[error("gRPC service name {name:?} is listed twice")]
    DuplicateGrpcService {
        /// The name.
        name: String,
    },
}

/// A translated snapshot that would leave an Envoy with a dangling reference. Nothing was
/// published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistency {
    /// Two resources of one type share a name.
    #[error("{ty} resource {name:?} appears twice")]
    DuplicateName {
        /// The type.
        ty: ResourceType,
        /// The name.
        name: String,
    },
    /// A listener's connection manager names a route configuration that is not served.
    #[error(
        "listener {listener:?} names route configuration {route:?}, which is not in the snapshot"
    )]
    MissingRoute {
        /// The listener.
        listener: String,
        /// The missing route configuration.
        route: String,
    },
    /// A listener or route names a cluster that is not served.
    #[error("{referrer:?} names cluster {cluster:?}, which is not in the snapshot")]
    MissingCluster {
        /// The listener or route configuration holding the reference.
        referrer: String,
        /// The missing cluster.
        cluster: String,
    },
    /// An EDS cluster names a load assignment that is not served.
    #[error("cluster {cluster:?} names endpoints {service:?}, which are not in the snapshot")]
    MissingEndpoints {
        /// The cluster.
        cluster: String,
        /// The missing load assignment.
        service: String,
    },
    /// A load assignment that no EDS cluster names.
    #[error("endpoints {name:?} are named by no EDS cluster")]
    OrphanEndpoints {
        /// The load assignment.
        name: String,
    },
    /// A listener's HTTP connection manager could not be decoded.
    #[error("listener {listener:?} carries an undecodable connection manager")]
    UndecodableListener {
        /// The listener.
        listener: String,
    },
}

/// Why [`XdsServer::publish`](crate::XdsServer::publish) refused an input. Nothing was
/// published: the previous snapshot keeps being served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The input failed validation.
    #[error("invalid xDS input: {0}")]
    Invalid(#[from] InvalidInput),
    /// The translated resources failed the consistency check.
    #[error("inconsistent xDS snapshot: {0}")]
    Inconsistent(#[from] Inconsistency),
    /// The server's background task is gone (the runtime is shutting down).
    #[error("the xDS server has shut down")]
    ShutDown,
}
