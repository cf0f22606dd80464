//! The State-of-the-World ADS stream as a plain state machine: feed it requests and
//! snapshots, poll it for responses. No IO, no clock; the tonic handler drives it.

use std::sync::Arc;

use infermesh_proto::envoy::service::discovery::v3::DiscoveryRequest;

use crate::resource_type::ResourceType;
use crate::snapshot::{EncodedResponse, TypeSnapshot};
use crate::stream::TypeMemory;
use crate::stream_core::{self, Answer, SentResources, StreamCore};
use crate::vec_map::VecSet;

/// The wildcard resource name of the xDS protocol.
const WILDCARD: &str = "*";

#[derive(Debug)]
struct InFlight {
    nonce: String,
    snapshot: Arc<TypeSnapshot>,
}

impl stream_core::InFlight for InFlight {
    fn nonce(&self) -> &str {
        &self.nonce
    }
}

#[derive(Debug, Default)]
struct TypeState {
    /// The client has asked for this type and not unsubscribed from everything.
    subscribed: bool,
    wildcard: bool,
    names: VecSet<String>,
    /// The subscription changed since the last response.
    names_dirty: bool,
    /// The version the client says it holds (its last `version_info`).
    client_version: String,
    /// Nonce of the latest response sent; requests answering older nonces are stale.
    last_nonce: String,
    /// The response sent and not yet ACKed or NACKed (at most one per type).
    in_flight: Option<InFlight>,
}

/// One SotW ADS stream (`StreamAggregatedResources`).
#[derive(Debug)]
pub struct SotwStream {
    types: [TypeState; 4],
    core: StreamCore,
}

impl SotwStream {
    stream_core::common_stream_api!();

    /// Feeds one request from the client.
    pub fn handle_request(&mut self, req: &DiscoveryRequest) {
        let Some(ty) = self.core.request_type(&req.type_url) else {
            return;
        };
        let st = &mut self.types[ty.index()];
        match self
            .core
            .answer(ty, &mut st.in_flight, &st.last_nonce, &req.response_nonce)
        {
            Answer::Stale => return,
            Answer::Answers(inflight) => {
                let mem = &mut self.core.memory[ty.index()];
                let version = inflight.snapshot.version.clone();
                if req.error_detail.is_some() {
                    mem.rejected_version = Some(version.clone());
                } else {
                    if mem.rejected_version.as_ref() != Some(&version) {
                        mem.rejected_version = None;
                    }
                    mem.last_acked = Some(inflight.snapshot);
                }
                self.core
                    .verdict(ty, version, inflight.nonce, req.error_detail.as_ref());
            }
            Answer::NoNonce | Answer::Settled => {}
        }
        st.client_version.clone_from(&req.version_info);
        let wildcard = req.resource_names.iter().any(|n| n == WILDCARD)
            || (ty.legacy_wildcard() && req.resource_names.is_empty());
        let names: VecSet<String> = req
            .resource_names
            .iter()
            .filter(|n| *n != WILDCARD)
            .cloned()
            .collect();
        let first = !st.subscribed && st.last_nonce.is_empty();
        if wildcard != st.wildcard || names != st.names {
            // A first request that states a version claims the client already holds it
            // for exactly this subscription (a reconnect): nothing to resend.
            st.names_dirty = !first || req.version_info.is_empty();
            st.wildcard = wildcard;
            st.names = names;
        }
        st.subscribed = st.wildcard || !st.names.is_empty();
    }

    /// The snapshot of `ty` this client should hold: the current one, unless the client
    /// rejected exactly that version, in which case the last one it accepted (if any).
    fn effective(&self, ty: ResourceType) -> Option<Arc<TypeSnapshot>> {
        let current = self.core.snapshot.as_ref()?.get(ty);
        let mem: &TypeMemory = self.core.memory(ty);
        if mem.rejected_version.as_deref() == Some(current.version.as_str()) {
            mem.last_acked.clone()
        } else {
            Some(Arc::clone(current))
        }
    }

    /// The next response to send, if any. Make-before-break: a type is held back while an
    /// earlier type (CDS before EDS before LDS before RDS) has a response in flight.
    pub fn poll_response(&mut self) -> Option<(ResourceType, EncodedResponse)> {
        for ty in ResourceType::ALL {
            let st = &self.types[ty.index()];
            if st.in_flight.is_some() {
                return None;
            }
            if !st.subscribed {
                continue;
            }
            let Some(snap) = self.effective(ty) else {
                continue;
            };
            let st = &mut self.types[ty.index()];
            if snap.version == st.client_version && !st.names_dirty {
                continue;
            }
            let resources = snap.view(st.wildcard, &st.names).cloned().collect();
            let nonce = self.core.sent(
                ty,
                &snap.version,
                SentResources {
                    resources,
                    removed: Vec::new(),
                },
            );
            let response = snap.sotw_response(st.wildcard, &st.names, &nonce);
            st.last_nonce.clone_from(&nonce);
            st.names_dirty = false;
            st.in_flight = Some(InFlight {
                nonce,
                snapshot: snap,
            });
            return Some((ty, response));
        }
        None
    }

    /// The published version of `ty`, when the client holds it in full and nothing is
    /// pending or in flight.
    pub fn synced_version(&self, ty: ResourceType) -> Option<String> {
        let st = &self.types[ty.index()];
        if st.in_flight.is_some() || st.names_dirty {
            return None;
        }
        // Only the published version counts: holding the last accepted one instead of a
        // rejected one is not being in sync.
        let current = self.core.snapshot.as_ref()?.get(ty);
        let effective = self.effective(ty)?;
        (Arc::ptr_eq(current, &effective) && effective.version == st.client_version)
            .then(|| effective.version.clone())
    }
}
