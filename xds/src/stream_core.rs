//! The bookkeeping both ADS stream state machines ([`SotwStream`](crate::SotwStream),
//! [`DeltaStream`](crate::DeltaStream)) do the same way: the snapshot served, the node's
//! memory, nonces, the event queue, and what a request's type URL and `response_nonce`
//! say about the response in flight (unknown type, stale nonce, ACK, NACK). What a
//! protocol remembers per type, and what an ACK or NACK changes in it, stays with it.

use std::collections::VecDeque;
use std::sync::Arc;

use infermesh_proto::google::rpc::Status;

use crate::resource_type::ResourceType;
use crate::snapshot::{EncodedResource, Snapshot};
use crate::stream::{NackDetail, NodeMemory, NonceCounter, StreamEvent, TypeMemory};

/// The contents of the latest response of one type, kept until the status registry takes
/// it, so CSDS can report every resource a client was sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct SentResources {
    /// Resources in the response.
    pub(crate) resources: Vec<Arc<EncodedResource>>,
    /// Names the response removed (Delta only).
    pub(crate) removed: Vec<String>,
}

/// A response sent and not yet ACKed or NACKed.
pub(crate) trait InFlight {
    /// The nonce it was sent with.
    fn nonce(&self) -> &str;
}

/// What a request's `response_nonce` says about the response in flight for its type.
pub(crate) enum Answer<F> {
    /// No nonce: the request answers no response.
    NoNonce,
    /// It answers an older response than the latest one sent: not an ACK/NACK (the client
    /// will answer the latest one too, with its full state; go-control-plane's rule).
    Stale,
    /// It answers the response in flight, which is taken out.
    Answers(F),
    /// It answers the latest response, already settled.
    Settled,
}

/// The state a stream machine shares with the other protocol's.
#[derive(Debug)]
pub(crate) struct StreamCore {
    /// `None` until the first publish: nothing is served before the node knows its
    /// policy, so a reconnecting Envoy is never handed an empty configuration.
    pub(crate) snapshot: Option<Arc<Snapshot>>,
    pub(crate) memory: NodeMemory,
    nonces: NonceCounter,
    events: VecDeque<StreamEvent>,
    /// Per type, what the latest response sent (taken by the status registry).
    sent: [SentResources; 4],
    /// Per type, names the client stopped holding without a response (Delta
    /// unsubscribes), taken by the status registry.
    dropped: [Vec<String>; 4],
}

impl StreamCore {
    pub(crate) fn new(snapshot: Option<Arc<Snapshot>>, memory: NodeMemory) -> Self {
        Self {
            snapshot,
            memory,
            nonces: NonceCounter::default(),
            events: VecDeque::new(),
            sent: Default::default(),
            dropped: Default::default(),
        }
    }

    /// The type a request is for; an unknown one is reported and `None`.
    pub(crate) fn request_type(&mut self, type_url: &str) -> Option<ResourceType> {
        let ty = ResourceType::from_type_url(type_url);
        if ty.is_none() {
            self.events.push_back(StreamEvent::UnknownType {
                type_url: type_url.to_owned(),
            });
        }
        ty
    }

    /// Matches `response_nonce` against the response in flight (whose nonce is always
    /// `last_nonce`, the latest sent), reporting a stale nonce.
    pub(crate) fn answer<F: InFlight>(
        &mut self,
        ty: ResourceType,
        in_flight: &mut Option<F>,
        last_nonce: &str,
        response_nonce: &str,
    ) -> Answer<F> {
        if response_nonce.is_empty() {
            return Answer::NoNonce;
        }
        if let Some(f) = in_flight.take_if(|f| f.nonce() == response_nonce) {
            return Answer::Answers(f);
        }
        if response_nonce != last_nonce {
            self.events.push_back(StreamEvent::StaleNonce {
                ty,
                nonce: response_nonce.to_owned(),
            });
            return Answer::Stale;
        }
        Answer::Settled
    }

    /// Reports the client's verdict on the response `version`/`nonce`: a NACK when it
    /// gave `error_detail`, else an ACK.
    pub(crate) fn verdict(
        &mut self,
        ty: ResourceType,
        version: String,
        nonce: String,
        error_detail: Option<&Status>,
    ) {
        self.events.push_back(match error_detail {
            Some(status) => StreamEvent::Nacked {
                ty,
                detail: NackDetail {
                    version,
                    nonce,
                    code: status.code,
                    message: status.message.clone(),
                },
            },
            None => StreamEvent::Acked { ty, version, nonce },
        });
    }

    /// Reports a response of `ty` handed out for sending and returns its fresh nonce.
    pub(crate) fn sent(&mut self, ty: ResourceType, version: &str, sent: SentResources) -> String {
        let nonce = self.nonces.next();
        self.events.push_back(StreamEvent::Sent {
            ty,
            version: version.to_owned(),
            nonce: nonce.clone(),
            resources: sent.resources.len(),
            removed: sent.removed.len(),
        });
        self.sent[ty.index()] = sent;
        nonce
    }

    /// Notes that the client no longer holds `name` of `ty`.
    pub(crate) fn dropped(&mut self, ty: ResourceType, name: String) {
        self.dropped[ty.index()].push(name);
    }

    /// Takes the names of `ty` the client stopped holding since the last call.
    pub(crate) fn take_dropped(&mut self, ty: ResourceType) -> Vec<String> {
        std::mem::take(&mut self.dropped[ty.index()])
    }

    /// Takes what the latest response of `ty` sent.
    pub(crate) fn take_sent(&mut self, ty: ResourceType) -> SentResources {
        std::mem::take(&mut self.sent[ty.index()])
    }

    /// The next event to report.
    pub(crate) fn poll_event(&mut self) -> Option<StreamEvent> {
        self.events.pop_front()
    }

    /// What the stream has learned about its node for `ty`.
    pub(crate) fn memory(&self, ty: ResourceType) -> &TypeMemory {
        &self.memory[ty.index()]
    }
}

/// The public API both stream types have in common, written once over their `core`
/// field and their per-type `types` array (each entry with `subscribed`, `wildcard` and
/// `names`).
macro_rules! common_stream_api {
    () => {
        /// A stream serving `snapshot`, seeded with what this client's node accepted and
        /// rejected on earlier streams.
        pub fn new(
            snapshot: Option<::std::sync::Arc<$crate::snapshot::Snapshot>>,
            memory: $crate::stream::NodeMemory,
        ) -> Self {
            Self {
                types: Default::default(),
                core: $crate::stream_core::StreamCore::new(snapshot, memory),
            }
        }

        /// Replaces the snapshot being served.
        pub fn handle_snapshot(&mut self, snapshot: ::std::sync::Arc<$crate::snapshot::Snapshot>) {
            self.core.snapshot = Some(snapshot);
        }

        /// The next event to report.
        pub fn poll_event(&mut self) -> Option<$crate::stream::StreamEvent> {
            self.core.poll_event()
        }

        /// What this stream has learned about its node for `ty` (to keep across streams).
        pub fn memory(&self, ty: $crate::ResourceType) -> &$crate::stream::TypeMemory {
            self.core.memory(ty)
        }

        /// Takes what the latest response of `ty` sent, for the status registry.
        pub(crate) fn take_sent(
            &mut self,
            ty: $crate::ResourceType,
        ) -> $crate::stream_core::SentResources {
            self.core.take_sent(ty)
        }

        /// Takes the names of `ty` the client stopped holding, for the status registry.
        pub(crate) fn take_dropped(&mut self, ty: $crate::ResourceType) -> Vec<String> {
            self.core.take_dropped(ty)
        }

        /// Whether the client has subscribed to `ty`.
        pub fn is_subscribed(&self, ty: $crate::ResourceType) -> bool {
            self.types[ty.index()].subscribed
        }

        /// The subscription for `ty`: wildcard flag and explicit names.
        pub fn subscription(&self, ty: $crate::ResourceType) -> (bool, &$crate::VecSet<String>) {
            let st = &self.types[ty.index()];
            (st.wildcard, &st.names)
        }
    };
}
pub(crate) use common_stream_api;
