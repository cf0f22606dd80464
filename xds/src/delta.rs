//! The incremental (Delta) ADS stream as a plain state machine: per-resource versions,
//! subscriptions with wildcard rules, removals, and ACK/NACK per response.

use std::collections::BTreeSet;
use std::sync::Arc;

use infermesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use crate::resource_type::ResourceType;
use crate::snapshot::{EncodedResource, EncodedResponse};
use crate::stream::TypeMemory;
use crate::stream_core::{self, Answer, SentResources, StreamCore};
use crate::vec_map::{VecMap, VecSet};

/// The wildcard resource name of the xDS protocol.
const WILDCARD: &str = "*";

/// Marks a rejected removal in [`TypeMemory::rejected_resources`].
const REJECTED_REMOVAL: &str = "";

#[derive(Debug)]
struct InFlight {
    nonce: String,
    system_version: String,
    /// Resources sent, to record as accepted or rejected.
    sent: Vec<Arc<EncodedResource>>,
    /// Names the client held and was told to remove.
    removed: Vec<String>,
    /// Subscribed names reported as not existing.
    absent: Vec<String>,
    /// What the client held before this response, to restore on NACK.
    previous: Vec<(String, Option<String>)>,
}

impl stream_core::InFlight for InFlight {
    fn nonce(&self) -> &str {
        &self.nonce
    }
}

#[derive(Debug, Default)]
struct TypeState {
    /// A request for this type has arrived.
    subscribed: bool,
    wildcard: bool,
    names: VecSet<String>,
    /// Resource name → version the client holds, as far as this stream knows.
    known: VecMap<String, String>,
    /// Explicitly subscribed names already reported as not existing.
    told_absent: BTreeSet<String>,
    last_nonce: String,
    in_flight: Option<InFlight>,
}

/// What a type needs sent to bring the client up to the published snapshot.
struct Diff {
    version: String,
    send: Vec<Arc<EncodedResource>>,
    removed: Vec<String>,
    absent: Vec<String>,
    /// Some published resource version is withheld because the client rejected it.
    held_back: bool,
}

/// One Delta ADS stream (`DeltaAggregatedResources`).
#[derive(Debug)]
pub struct DeltaStream {
    types: [TypeState; 4],
    core: StreamCore,
}

impl DeltaStream {
    stream_core::common_stream_api!();

    /// Feeds one request from the client. Subscription changes always apply; the nonce
    /// decides only whether it is an ACK/NACK of the response in flight.
    pub fn handle_request(&mut self, req: &DeltaDiscoveryRequest) {
        let Some(ty) = self.core.request_type(&req.type_url) else {
            return;
        };
        let st = &mut self.types[ty.index()];
        let first = !st.subscribed;
        if first {
            st.subscribed = true;
            st.wildcard = ty.legacy_wildcard() && req.resource_names_subscribe.is_empty();
            st.known = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        for name in &req.resource_names_subscribe {
            if name == WILDCARD {
                st.wildcard = true;
                continue;
            }
            st.names.insert(name.clone());
            st.told_absent.remove(name);
            if !first {
                // A client subscribing to a name does not hold it: send it even if an
                // earlier subscription had delivered the same version.
                st.known.remove(name);
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == WILDCARD {
                st.wildcard = false;
                continue;
            }
            st.names.remove(name);
            st.told_absent.remove(name);
            let via_wildcard = st.wildcard
                && self
                    .core
                    .snapshot
                    .as_ref()
                    .and_then(|s| s.get(ty).resources.get(name))
                    .is_some_and(|r| r.wildcard);
            if !via_wildcard && st.known.remove(name).is_some() {
                self.core.dropped(ty, name.clone());
            }
        }

        let Answer::Answers(inflight) =
            self.core
                .answer(ty, &mut st.in_flight, &st.last_nonce, &req.response_nonce)
        else {
            return;
        };
        let mem = &mut self.core.memory[ty.index()];
        if req.error_detail.is_some() {
            for (name, prev) in inflight.previous {
                match prev {
                    Some(v) => st.known.insert(name, v),
                    None => st.known.remove(&name),
                };
            }
            for r in &inflight.sent {
                mem.rejected_resources
                    .insert(r.name.clone(), r.version.clone());
            }
            for name in &inflight.removed {
                mem.rejected_resources
                    .insert(name.clone(), REJECTED_REMOVAL.to_string());
            }
        } else {
            for r in inflight.sent {
                if mem.rejected_resources.get(&r.name) != Some(&r.version) {
                    mem.rejected_resources.remove(&r.name);
                }
                mem.acked_resources.insert(r.name.clone(), r);
            }
            for name in inflight.removed.iter().chain(&inflight.absent) {
                mem.acked_resources.remove(name);
                mem.rejected_resources.remove(name);
            }
        }
        self.core.verdict(
            ty,
            inflight.system_version,
            inflight.nonce,
            req.error_detail.as_ref(),
        );
    }

    /// Computes what `ty` needs: (resources to send, names to remove, absent names to
    /// report). A resource version the client rejected is replaced by the one it last
    /// accepted, or left as the client has it.
    fn diff(&self, ty: ResourceType) -> Option<Diff> {
        let snap = self.core.snapshot.as_ref()?.get(ty);
        let st = &self.types[ty.index()];
        let mem: &TypeMemory = self.core.memory(ty);
        let mut send = Vec::new();
        let mut held_back = false;
        let mut in_view = BTreeSet::new();
        for current in snap.view(st.wildcard, &st.names) {
            in_view.insert(current.name.as_str());
            let chosen = if mem.rejected_resources.get(&current.name) == Some(&current.version) {
                held_back = true;
                // Fall back to the last accepted version, unless that is the very version
                // rejected since (then there is nothing acceptable to send).
                match mem.acked_resources.get(&current.name) {
                    Some(accepted) if accepted.version != current.version => accepted,
                    _ => continue,
                }
            } else {
                current
            };
            if st.known.get(&chosen.name) != Some(&chosen.version) {
                send.push(Arc::clone(chosen));
            }
        }
        let removed: Vec<String> = st
            .known
            .keys()
            .filter(|n| !in_view.contains(n.as_str()))
            .filter(|n| {
                mem.rejected_resources.get(*n).map(String::as_str) != Some(REJECTED_REMOVAL)
            })
            .cloned()
            .collect();
        let absent: Vec<String> = st
            .names
            .iter()
            .filter(|n| {
                !in_view.contains(n.as_str())
                    && !st.known.contains_key(*n)
                    && !st.told_absent.contains(*n)
            })
            .cloned()
            .collect();
        Some(Diff {
            version: snap.version.clone(),
            send,
            removed,
            absent,
            held_back,
        })
    }

    /// Whether LDS or RDS has a response in flight or changes to send.
    fn listeners_or_routes_pending(&self) -> bool {
        [ResourceType::Listener, ResourceType::Route]
            .into_iter()
            .any(|t| {
                let st = &self.types[t.index()];
                st.in_flight.is_some()
                    || (st.subscribed
                        && self.diff(t).is_some_and(|d| {
                            !d.send.is_empty() || !d.removed.is_empty() || !d.absent.is_empty()
                        }))
            })
    }

    /// The next response to send, if any; make-before-break order as in SotW, and
    /// removals of clusters and endpoints held until listeners and routes are updated.
    pub fn poll_response(&mut self) -> Option<(ResourceType, EncodedResponse)> {
        for ty in ResourceType::ALL {
            let st = &self.types[ty.index()];
            if st.in_flight.is_some() {
                return None;
            }
            if !st.subscribed {
                continue;
            }
            let Some(Diff {
                version: system_version,
                send,
                mut removed,
                absent,
                ..
            }) = self.diff(ty)
            else {
                continue;
            };
            // Break after make: clusters and endpoints are removed only once listeners and
            // routes no longer name them (their pending changes are out and ACKed).
            if matches!(ty, ResourceType::Cluster | ResourceType::Endpoint)
                && !removed.is_empty()
                && self.listeners_or_routes_pending()
            {
                removed.clear();
            }
            if send.is_empty() && removed.is_empty() && absent.is_empty() {
                continue;
            }
            let st = &mut self.types[ty.index()];
            let mut previous = Vec::with_capacity(send.len() + removed.len());
            for r in &send {
                previous.push((
                    r.name.clone(),
                    st.known.insert(r.name.clone(), r.version.clone()),
                ));
                st.told_absent.remove(&r.name);
            }
            for name in &removed {
                previous.push((name.clone(), st.known.remove(name)));
            }
            for name in &absent {
                st.told_absent.insert(name.clone());
            }
            let gone: Vec<String> = removed.iter().chain(&absent).cloned().collect();
            let nonce = self.core.sent(
                ty,
                &system_version,
                SentResources {
                    resources: send.clone(),
                    removed: gone.clone(),
                },
            );
            let response = EncodedResponse::delta(ty, &system_version, &send, &gone, &nonce);
            st.last_nonce.clone_from(&nonce);
            st.in_flight = Some(InFlight {
                nonce,
                system_version,
                sent: send,
                removed,
                absent,
                previous,
            });
            return Some((ty, response));
        }
        None
    }

    /// The published version the client holds in full when nothing for `ty` is pending
    /// or in flight.
    pub fn synced_version(&self, ty: ResourceType) -> Option<String> {
        if self.types[ty.index()].in_flight.is_some() {
            return None;
        }
        let d = self.diff(ty)?;
        (d.send.is_empty() && d.removed.is_empty() && d.absent.is_empty() && !d.held_back)
            .then_some(d.version)
    }
}
