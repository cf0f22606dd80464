//! Immutable, pre-encoded snapshots of everything served, with content-hash versions and
//! the consistency check that runs before a snapshot may be published.
//!
//! Every resource is encoded once, when the snapshot is built, into the exact bytes it
//! takes inside a `DiscoveryResponse` and a `DeltaDiscoveryResponse`. Streams build their
//! responses by concatenating these shared `Bytes` and appending their own nonce, so a
//! push to N streams costs N memcpys, not N protobuf encodings.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use infermesh_proto::envoy::config::cluster::v3 as cluster;
use infermesh_proto::envoy::config::route::v3 as route;
use infermesh_proto::google::protobuf::Any;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use xxhash_rust::xxh64::xxh64;

use crate::error::Inconsistency;
use crate::resource_type::ResourceType;
use crate::translate::{TypedResources, ext_proc_cluster_of, listener_connection_manager, to_any};

/// Field numbers shared by `DiscoveryResponse` and `DeltaDiscoveryResponse`.
mod field {
    pub const VERSION_INFO: u32 = 1;
    pub const RESOURCES: u32 = 2;
    pub const TYPE_URL: u32 = 4;
    pub const NONCE: u32 = 5;
    pub const REMOVED_RESOURCES: u32 = 6;
}

/// Appends a length-delimited field to `buf`.
fn put_bytes_field(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

/// One served resource, encoded once and shared by every stream.
#[derive(Debug)]
pub struct EncodedResource {
    /// Resource name.
    pub name: String,
    /// Content hash of the resource, hex.
    pub version: String,
    /// Whether wildcard subscribers receive it (false: only when asked for by name).
    pub wildcard: bool,
    /// `resources` entry of a `DiscoveryResponse` (tag, length, `Any`).
    sotw_entry: Bytes,
    /// `resources` entry of a `DeltaDiscoveryResponse` (tag, length, `Resource`).
    delta_entry: Bytes,
}

impl EncodedResource {
    fn new(name: String, any: Any, wildcard: bool) -> Self {
        let any_bytes = any.encode_to_vec();
        let version = format!("{:016x}", xxh64(&any_bytes, 0));
        let mut sotw = BytesMut::with_capacity(any_bytes.len() + 8);
        put_bytes_field(field::RESOURCES, &any_bytes, &mut sotw);
        let resource = infermesh_proto::envoy::service::discovery::v3::Resource {
            name: name.clone(),
            version: version.clone(),
            resource: Some(any),
            ..Default::default()
        };
        let resource_bytes = resource.encode_to_vec();
        let mut delta = BytesMut::with_capacity(resource_bytes.len() + 8);
        put_bytes_field(field::RESOURCES, &resource_bytes, &mut delta);
        Self {
            name,
            version,
            wildcard,
            sotw_entry: sotw.freeze(),
            delta_entry: delta.freeze(),
        }
    }

    /// Encoded size of the resource entry, for accounting.
    pub fn encoded_len(&self) -> usize {
        self.sotw_entry.len()
    }

    /// The resource as sent, decoded again from its encoded entry (status queries only:
    /// keeping the decoded form would double every snapshot's memory).
    pub fn any(&self) -> Option<Any> {
        // The SotW entry is exactly one `resources` field of a `DiscoveryResponse`.
        infermesh_proto::envoy::service::discovery::v3::DiscoveryResponse::decode(
            self.sotw_entry.clone(),
        )
        .ok()
        .and_then(|mut r| r.resources.pop())
    }
}

/// All resources of one type in one snapshot, with the type's content-hash version.
#[derive(Debug)]
pub struct TypeSnapshot {
    /// The type.
    pub ty: ResourceType,
    /// Content hash over every (name, resource version, visibility), hex.
    pub version: String,
    /// Resources by name.
    pub resources: BTreeMap<String, Arc<EncodedResource>>,
    /// The SotW response for a pure wildcard subscriber, without nonce.
    wildcard_body: Bytes,
}

impl TypeSnapshot {
    fn new(ty: ResourceType, items: Vec<(String, Any, bool)>) -> Self {
        let resources: BTreeMap<String, Arc<EncodedResource>> = items
            .into_iter()
            .map(|(name, any, wildcard)| {
                (
                    name.clone(),
                    Arc::new(EncodedResource::new(name, any, wildcard)),
                )
            })
            .collect();
        let mut hash_input = Vec::with_capacity(64 * resources.len() + 64);
        hash_input.extend_from_slice(ty.type_url().as_bytes());
        for r in resources.values() {
            hash_input.push(0);
            hash_input.extend_from_slice(r.name.as_bytes());
            hash_input.push(0);
            hash_input.extend_from_slice(r.version.as_bytes());
            hash_input.push(u8::from(r.wildcard));
        }
        let version = format!("{:016x}", xxh64(&hash_input, 0));
        let mut snap = Self {
            ty,
            version,
            resources,
            wildcard_body: Bytes::new(),
        };
        snap.wildcard_body = snap.build_sotw_body(true, &BTreeSet::<String>::new());
        snap
    }

    /// An empty snapshot of one type (what is served before the first publish).
    pub fn empty(ty: ResourceType) -> Self {
        Self::new(ty, Vec::new())
    }

    /// The resources a subscriber sees: every wildcard resource when `wildcard`, plus the
    /// named ones that exist.
    pub fn view<'a, N: ?Sized>(
        &'a self,
        wildcard: bool,
        names: &'a N,
    ) -> impl Iterator<Item = &'a Arc<EncodedResource>> + 'a
    where
        for<'x> &'x N: IntoIterator<Item = &'x String>,
    {
        let all = wildcard.then(|| self.resources.values().filter(|r| r.wildcard));
        let named = names
            .into_iter()
            .filter_map(|n| self.resources.get(n))
            .filter(move |r| !(wildcard && r.wildcard));
        all.into_iter().flatten().chain(named)
    }

    fn build_sotw_body<N: ?Sized>(&self, wildcard: bool, names: &N) -> Bytes
    where
        for<'x> &'x N: IntoIterator<Item = &'x String>,
    {
        let mut buf = BytesMut::new();
        put_bytes_field(field::VERSION_INFO, self.version.as_bytes(), &mut buf);
        for r in self.view(wildcard, names) {
            buf.put_slice(&r.sotw_entry);
        }
        put_bytes_field(field::TYPE_URL, self.ty.type_url().as_bytes(), &mut buf);
        buf.freeze()
    }

    /// The SotW `DiscoveryResponse` for a subscriber, stamped with `nonce`.
    pub fn sotw_response<N: ?Sized>(
        &self,
        wildcard: bool,
        names: &N,
        nonce: &str,
    ) -> EncodedResponse
    where
        for<'x> &'x N: IntoIterator<Item = &'x String>,
    {
        let body = if wildcard
            && names
                .into_iter()
                .all(|n| self.resources.get(n).is_none_or(|r| r.wildcard))
        {
            self.wildcard_body.clone()
        } else {
            self.build_sotw_body(wildcard, names)
        };
        EncodedResponse::new(body, nonce)
    }
}

/// A response ready for the wire: shared pre-encoded bytes plus this stream's nonce.
/// Protobuf merges concatenated encodings, so `body ++ nonce field` is a valid message.
#[derive(Debug, Clone)]
pub struct EncodedResponse {
    body: Bytes,
    tail: Bytes,
}

impl EncodedResponse {
    fn new(body: Bytes, nonce: &str) -> Self {
        let mut tail = BytesMut::with_capacity(nonce.len() + 2);
        put_bytes_field(field::NONCE, nonce.as_bytes(), &mut tail);
        Self {
            body,
            tail: tail.freeze(),
        }
    }

    /// A `DeltaDiscoveryResponse` carrying `resources` and `removed` names.
    pub fn delta(
        ty: ResourceType,
        system_version: &str,
        resources: &[Arc<EncodedResource>],
        removed: &[String],
        nonce: &str,
    ) -> Self {
        let size: usize = resources.iter().map(|r| r.delta_entry.len()).sum::<usize>()
            + removed.iter().map(|n| n.len() + 3).sum::<usize>()
            + 128;
        let mut buf = BytesMut::with_capacity(size);
        put_bytes_field(field::VERSION_INFO, system_version.as_bytes(), &mut buf);
        for r in resources {
            buf.put_slice(&r.delta_entry);
        }
        put_bytes_field(field::TYPE_URL, ty.type_url().as_bytes(), &mut buf);
        for name in removed {
            put_bytes_field(field::REMOVED_RESOURCES, name.as_bytes(), &mut buf);
        }
        Self::new(buf.freeze(), nonce)
    }

    /// Total encoded length.
    pub fn len(&self) -> usize {
        self.body.len() + self.tail.len()
    }

    /// Whether the encoding is empty (never true for a real response).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the message bytes into `dst`.
    pub fn write_to(&self, dst: &mut impl BufMut) {
        dst.put_slice(&self.body);
        dst.put_slice(&self.tail);
    }

    /// The encoded message as one contiguous buffer (tests and tools).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.write_to(&mut v);
        v
    }
}

/// One complete, consistent set of resources of all four types.
#[derive(Debug, Clone)]
pub struct Snapshot {
    types: [Arc<TypeSnapshot>; 4],
}

impl Snapshot {
    /// The snapshot served before anything is published: every type empty.
    pub fn empty() -> Self {
        Self {
            types: ResourceType::ALL.map(|t| Arc::new(TypeSnapshot::empty(t))),
        }
    }

    /// Checks `typed` for consistency, then encodes it.
    pub fn build(typed: &TypedResources) -> Result<Self, Inconsistency> {
        check_consistency(typed)?;
        let clusters = typed
            .clusters
            .iter()
            .map(|c| (c.name.clone(), to_any(c), true))
            .collect();
        let endpoints = typed
            .endpoints
            .iter()
            .map(|e| (e.cluster_name.clone(), to_any(e), true))
            .collect();
        let listeners = typed
            .listeners
            .iter()
            .map(|(l, wildcard)| (l.name.clone(), to_any(l), *wildcard))
            .collect();
        let routes = typed
            .routes
            .iter()
            .map(|r| (r.name.clone(), to_any(r), true))
            .collect();
        Ok(Self {
            types: [
                Arc::new(TypeSnapshot::new(ResourceType::Cluster, clusters)),
                Arc::new(TypeSnapshot::new(ResourceType::Endpoint, endpoints)),
                Arc::new(TypeSnapshot::new(ResourceType::Listener, listeners)),
                Arc::new(TypeSnapshot::new(ResourceType::Route, routes)),
            ],
        })
    }

    /// The resources of one type.
    pub fn get(&self, ty: ResourceType) -> &Arc<TypeSnapshot> {
        &self.types[ty.index()]
    }

    /// The version of every type, in push order.
    pub fn versions(&self) -> [String; 4] {
        ResourceType::ALL.map(|t| self.get(t).version.clone())
    }

    /// Whether every type has the same version as in `other`.
    pub fn same_versions(&self, other: &Snapshot) -> bool {
        ResourceType::ALL
            .into_iter()
            .all(|t| self.get(t).version == other.get(t).version)
    }
}

fn check_unique<'a>(
    ty: ResourceType,
    names: impl Iterator<Item = &'a str>,
) -> Result<BTreeSet<&'a str>, Inconsistency> {
    let mut set = BTreeSet::new();
    for n in names {
        if !set.insert(n) {
            return Err(Inconsistency::DuplicateName {
                ty,
                name: n.to_string(),
            });
        }
    }
    Ok(set)
}

fn route_clusters(rc: &route::RouteConfiguration) -> impl Iterator<Item = &str> {
    rc.virtual_hosts
        .iter()
        .flat_map(|vh| vh.routes.iter())
        .filter_map(|r| match &r.action {
            Some(route::route::Action::Route(action)) => match &action.cluster_specifier {
                Some(route::route_action::ClusterSpecifier::Cluster(c)) => Some(c.as_str()),
                _ => None,
            },
            _ => None,
        })
}

/// go-control-plane's `Consistent()`, extended: LDS names only served RDS, RDS and ext_proc
/// filters name only served clusters, CDS names only served EDS, and no EDS is orphaned.
pub fn check_consistency(typed: &TypedResources) -> Result<(), Inconsistency> {
    let clusters = check_unique(
        ResourceType::Cluster,
        typed.clusters.iter().map(|c| c.name.as_str()),
    )?;
    let endpoints = check_unique(
        ResourceType::Endpoint,
        typed.endpoints.iter().map(|e| e.cluster_name.as_str()),
    )?;
    check_unique(
        ResourceType::Listener,
        typed.listeners.iter().map(|(l, _)| l.name.as_str()),
    )?;
    let routes = check_unique(
        ResourceType::Route,
        typed.routes.iter().map(|r| r.name.as_str()),
    )?;

    for (l, _) in &typed.listeners {
        let Some(manager) = listener_connection_manager(l) else {
            continue;
        };
        let manager = manager.map_err(|_| Inconsistency::UndecodableListener {
            listener: l.name.clone(),
        })?;
        if let Some(infermesh_proto::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier::Rds(rds)) = &manager.route_specifier
            && !routes.contains(rds.route_config_name.as_str())
        {
            return Err(Inconsistency::MissingRoute {
                listener: l.name.clone(),
                route: rds.route_config_name.clone(),
            });
        }
        for filter in &manager.http_filters {
            if let Some(c) = ext_proc_cluster_of(filter)
                && !clusters.contains(c.as_str())
            {
                return Err(Inconsistency::MissingCluster {
                    referrer: l.name.clone(),
                    cluster: c,
                });
            }
        }
    }
    for rc in &typed.routes {
        if let Some(c) = route_clusters(rc).find(|c| !clusters.contains(c)) {
            return Err(Inconsistency::MissingCluster {
                referrer: rc.name.clone(),
                cluster: c.to_string(),
            });
        }
    }
    let mut named_eds = BTreeSet::new();
    for c in &typed.clusters {
        let is_eds = matches!(
            c.cluster_discovery_type,
            Some(cluster::cluster::ClusterDiscoveryType::Type(t)) if t == cluster::cluster::DiscoveryType::Eds as i32
        );
        if !is_eds {
            continue;
        }
        let service = c
            .eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(c.name.as_str());
        if !endpoints.contains(service) {
            return Err(Inconsistency::MissingEndpoints {
                cluster: c.name.clone(),
                service: service.to_string(),
            });
        }
        named_eds.insert(service);
    }
    if let Some(orphan) = endpoints.iter().find(|e| !named_eds.contains(*e)) {
        return Err(Inconsistency::OrphanEndpoints {
            name: orphan.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::XdsConfig;
    use crate::input::{InferencePoolSpec, XdsInput};
    use crate::translate::translate;
    use infermesh_proto::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse,
    };

    fn input() -> XdsInput {
        XdsInput {
            pools: vec![InferencePoolSpec::new(
                "llama",
                "127.0.0.1:10000".parse().unwrap(),
                vec![8000],
            )],
            ext_proc_endpoints: vec!["127.0.0.1:9002".parse().unwrap()],
            grpc_services: vec!["infermesh-epp".into()],
        }
    }

    #[test]
    fn versions_are_content_hashes() {
        let cfg = XdsConfig::default();
        let a = Snapshot::build(&translate(&input(), &cfg)).unwrap();
        let b = Snapshot::build(&translate(&input(), &cfg)).unwrap();
        assert_eq!(a.versions(), b.versions());
        let mut changed = input();
        changed
            .ext_proc_endpoints
            .push("127.0.0.2:9002".parse().unwrap());
        let c = Snapshot::build(&translate(&changed, &cfg)).unwrap();
        assert_ne!(
            a.get(ResourceType::Endpoint).version,
            c.get(ResourceType::Endpoint).version
        );
        assert_eq!(
            a.get(ResourceType::Cluster).version,
            c.get(ResourceType::Cluster).version
        );
        assert_eq!(
            a.get(ResourceType::Listener).version,
            c.get(ResourceType::Listener).version
        );
    }

    #[test]
    fn pre_encoded_responses_decode_as_protobuf() {
        let snap = Snapshot::build(&translate(&input(), &XdsConfig::default())).unwrap();
        let lds = snap.get(ResourceType::Listener);
        let resp = DiscoveryResponse::decode(
            lds.sotw_response(true, &BTreeSet::<String>::new(), "7")
                .to_vec()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(resp.nonce, "7");
        assert_eq!(resp.version_info, lds.version);
        assert_eq!(resp.type_url, ResourceType::Listener.type_url());
        assert_eq!(
            resp.resources.len(),
            1,
            "the API listener is not served to wildcard"
        );
        let named: BTreeSet<String> = ["infermesh-epp".to_string()].into();
        let resp =
            DiscoveryResponse::decode(lds.sotw_response(false, &named, "8").to_vec().as_slice())
                .unwrap();
        assert_eq!(resp.resources.len(), 1);
        let r: Vec<_> = lds.resources.values().cloned().collect();
        let delta = EncodedResponse::delta(
            ResourceType::Listener,
            &lds.version,
            &r,
            &["gone".into()],
            "9",
        );
        let resp = DeltaDiscoveryResponse::decode(delta.to_vec().as_slice()).unwrap();
        assert_eq!(resp.resources.len(), 2);
        assert_eq!(resp.removed_resources, vec!["gone".to_string()]);
        assert_eq!(resp.nonce, "9");
        assert_eq!(resp.resources[0].version, r[0].version);
    }

    #[test]
    fn consistency_check_catches_dangling_references() {
        let cfg = XdsConfig::default();
        let good = translate(&input(), &cfg);
        let mut t = good.clone();
        t.routes.retain(|r| r.name != "infermesh/pool/llama");
        assert!(matches!(
            check_consistency(&t),
            Err(Inconsistency::MissingRoute { .. })
        ));
        let mut t = good.clone();
        t.endpoints.clear();
        assert!(matches!(
            check_consistency(&t),
            Err(Inconsistency::MissingEndpoints { .. })
        ));
        let mut t = good.clone();
        t.clusters
            .retain(|c| c.name != "infermesh/pool/llama/original-dst");
        assert!(matches!(
            check_consistency(&t),
            Err(Inconsistency::MissingCluster { .. })
        ));
        let mut t = good.clone();
        t.clusters.retain(|c| c.name != "infermesh-ext-proc");
        // The listener's ext_proc filter names it: caught before the orphaned EDS.
        assert!(matches!(
            check_consistency(&t),
            Err(Inconsistency::MissingCluster { .. })
        ));
        let mut t = good.clone();
        t.listeners.push(t.listeners[0].clone());
        assert!(matches!(
            check_consistency(&t),
            Err(Inconsistency::DuplicateName { .. })
        ));
        check_consistency(&good).unwrap();
    }
}
