//! What the per-stream state machines ([`SotwStream`](crate::SotwStream),
//! [`DeltaStream`](crate::DeltaStream)) share: the events they report and the per-node
//! memory of accepted and rejected configuration that outlives a stream.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::resource_type::ResourceType;
use crate::snapshot::{EncodedResource, TypeSnapshot};
use crate::vec_map::VecMap;

/// Why a client rejected a response (the `error_detail` of a NACK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NackDetail {
    /// Version of the rejected response.
    pub version: String,
    /// Nonce of the rejected response.
    pub nonce: String,
    /// gRPC status code the client gave.
    pub code: i32,
    /// The client's reason, verbatim.
    pub message: String,
}

/// Something a stream state machine did or saw, for sync status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A response was handed out for sending.
    Sent {
        /// Type of the response.
        ty: ResourceType,
        /// Version it carries.
        version: String,
        /// Its nonce.
        nonce: String,
        /// Number of resources in it.
        resources: usize,
        /// Number of removals in it (Delta only).
        removed: usize,
    },
    /// The client accepted a response.
    Acked {
        /// Type.
        ty: ResourceType,
        /// Accepted version.
        version: String,
        /// Nonce of the accepted response.
        nonce: String,
    },
    /// The client rejected a response; it keeps its previous configuration.
    Nacked {
        /// Type.
        ty: ResourceType,
        /// What was rejected and why.
        detail: NackDetail,
    },
    /// A request answered an older response than the latest one sent, and was ignored as
    /// an ACK/NACK.
    StaleNonce {
        /// Type.
        ty: ResourceType,
        /// The stale nonce.
        nonce: String,
    },
    /// A request for a type this server does not serve (ignored).
    UnknownType {
        /// The requested type URL.
        type_url: String,
    },
}

/// What one Envoy node has accepted and rejected for one type. Kept per node across
/// streams, so a client that reconnects (to this node or, after a restart, at all) is
/// served its last accepted configuration instead of a version it already rejected.
#[derive(Debug, Clone, Default)]
pub struct TypeMemory {
    /// SotW: the last accepted snapshot of this type.
    pub last_acked: Option<Arc<TypeSnapshot>>,
    /// SotW: a version the client rejected; not offered again until another is accepted.
    pub rejected_version: Option<String>,
    /// Delta: the resources the client has accepted, by name.
    pub acked_resources: VecMap<String, Arc<EncodedResource>>,
    /// Delta: resource versions the client rejected ("" marks a rejected removal).
    pub rejected_resources: BTreeMap<String, String>,
}

/// Per-type memory of one node, indexed by [`ResourceType::index`].
pub type NodeMemory = [TypeMemory; 4];

/// Per-stream nonce source: a counter, unique within the stream, which is all the
/// protocol asks for.
#[derive(Debug, Default)]
pub(crate) struct NonceCounter(u64);

impl NonceCounter {
    pub(crate) fn next(&mut self) -> String {
        self.0 += 1;
        self.0.to_string()
    }
}
