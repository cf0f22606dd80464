//! Policy objects in kubectl form, with the upstream (GIE / llm-d) field names.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `apiVersion` of InferencePool (GIE v1).
pub const POOL_API_VERSION: &str = "inference.networking.k8s.io/v1";
/// `apiVersion` of InferenceObjective and InferenceModelRewrite in llm-d's group (v0.10).
pub const LLMD_API_VERSION: &str = "llm-d.ai/v1alpha2";
/// `apiVersion` of InferenceObjective and InferenceModelRewrite in the older GIE x-k8s
/// group, still served by llm-d.
pub const XK8S_API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha2";
/// Both groups' spellings, llm-d's first.
pub const OBJECTIVE_API_VERSIONS: [&str; 2] = [LLMD_API_VERSION, XK8S_API_VERSION];
/// `apiVersion` of the kinds infermesh adds (InferenceEndpoints, InfermeshNode).
pub const INFERMESH_API_VERSION: &str = "infermesh.io/v1alpha1";
/// `apiVersion`s accepted for EndpointPickerConfig (llm-d and GIE spellings).
pub const EPP_CONFIG_API_VERSIONS: [&str; 2] = [
    "llm-d.ai/v1alpha1",
    "inference.networking.x-k8s.io/v1alpha1",
];

/// Namespace used when a document gives none (as kubectl does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds of object the policy store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A pool of model-server pods (`InferencePool`).
    InferencePool,
    /// Priority for requests naming it (`InferenceObjective`).
    InferenceObjective,
    /// Model-name rewrites with weighted targets (`InferenceModelRewrite`).
    InferenceModelRewrite,
    /// Scheduler plugin configuration (`EndpointPickerConfig`).
    EndpointPickerConfig,
    /// A static list of endpoints (infermesh kind, for fleets without Kubernetes).
    InferenceEndpoints,
    /// A node's advertised addresses (infermesh kind; the node registry).
    InfermeshNode,
}

impl Kind {
    /// Every kind, in key order.
    pub const ALL: [Kind; 6] = [
        Kind::InferencePool,
        Kind::InferenceObjective,
        Kind::InferenceModelRewrite,
        Kind::EndpointPickerConfig,
        Kind::InferenceEndpoints,
        Kind::InfermeshNode,
    ];

    /// The `kind:` string of a document.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InferencePool => "InferencePool",
            Kind::InferenceObjective => "InferenceObjective",
            Kind::InferenceModelRewrite => "InferenceModelRewrite",
            Kind::EndpointPickerConfig => "EndpointPickerConfig",
            Kind::InferenceEndpoints => "InferenceEndpoints",
            Kind::InfermeshNode => "InfermeshNode",
        }
    }

    /// Parses a kind name case-insensitively, also accepting kubectl-style plurals
    /// (`inferencepools`) so `policy get` reads naturally.
    pub fn parse(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        Kind::ALL.into_iter().find(|k| {
            let name = k.as_str().to_ascii_lowercase();
            name == lower || name == singular
        })
    }

    /// The `apiVersion`s a document of this kind may carry.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::InferencePool => &[POOL_API_VERSION],
            Kind::InferenceObjective | Kind::InferenceModelRewrite => &OBJECTIVE_API_VERSIONS,
            Kind::EndpointPickerConfig => &EPP_CONFIG_API_VERSIONS,
            Kind::InferenceEndpoints | Kind::InfermeshNode => &[INFERMESH_API_VERSION],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an object: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    /// Object kind.
    pub kind: Kind,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key.
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// `metadata` of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// Object namespace (`default` when absent).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// On input: apply only if the stored version equals this (optimistic concurrency).
    /// On output: the Raft log index that last wrote the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// `spec.selector` of an InferencePool: matchLabels only (GIE v1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels a pod must carry, all of them.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A port number wrapper, as GIE spells ports (`{number: 8000}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortNumber {
    /// The port.
    pub number: i64,
}

/// `spec.appProtocol` of an InferencePool. `H2c` is refused on input (the node's proxy
/// speaks HTTP/1.1 only) and kept so objects stored before that still read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppProtocol {
    /// HTTP/1.1 (the default).
    #[default]
    #[serde(rename = "http")]
    Http,
    /// Cleartext HTTP/2.
    #[serde(rename = "kubernetes.io/h2c")]
    H2c,
}

/// What Envoy does when the endpoint picker cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureMode {
    /// Reject the request (the upstream default).
    #[default]
    FailClose,
    /// Route without the picker.
    FailOpen,
}

fn default_epp_kind() -> String {
    "Service".to_string()
}

/// `spec.endpointPickerRef` of an InferencePool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPickerRef {
    /// API group of the referent (`""` for a core Service).
    #[serde(default)]
    pub group: String,
    /// Kind of the referent (`Service` by default).
    #[serde(default = "default_epp_kind")]
    pub kind: String,
    /// Name of the referent.
    pub name: String,
    /// Port of the referent; required when kind is Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortNumber>,
    /// Fail open or closed when the picker is unavailable (FailClose by default).
    #[serde(default)]
    pub failure_mode: FailureMode,
}

/// `spec` of an InferencePool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferencePoolSpec {
    /// Which pods belong to the pool.
    pub selector: LabelSelector,
    /// 1–8 unique ports; each `podIP:port` is a separate endpoint.
    pub target_ports: Vec<PortNumber>,
    /// Protocol spoken to the pods.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// The endpoint picker serving this pool (infermesh itself when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker_ref: Option<EndpointPickerRef>,
}

impl InferencePoolSpec {
    /// The failure mode in force (FailClose when no endpointPickerRef is given).
    pub fn failure_mode(&self) -> FailureMode {
        self.endpoint_picker_ref
            .as_ref()
            .map(|r| r.failure_mode)
            .unwrap_or_default()
    }
}

fn default_pool_group() -> String {
    "inference.networking.k8s.io".to_string()
}

fn default_pool_kind() -> String {
    "InferencePool".to_string()
}

/// `spec.poolRef`: a reference to an InferencePool in the same namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolRef {
    /// API group (`inference.networking.k8s.io` by default).
    #[serde(default = "default_pool_group")]
    pub group: String,
    /// Kind (`InferencePool` by default).
    #[serde(default = "default_pool_kind")]
    pub kind: String,
    /// Pool name.
    pub name: String,
}

/// `spec` of an InferenceObjective.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceObjectiveSpec {
    /// Priority; unset means 0, higher is more important, negative is sheddable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// The pool this objective applies to.
    pub pool_ref: PoolRef,
}

impl InferenceObjectiveSpec {
    /// The priority in force (0 when unset, as upstream).
    pub fn effective_priority(&self) -> i32 {
        self.priority.unwrap_or(0)
    }
}

/// How a rewrite rule matches the model name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatchType {
    /// The model name equals the value.
    #[default]
    Exact,
}

/// `matches[].model` of a rewrite rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelMatch {
    /// Match type (only Exact upstream).
    #[serde(default, rename = "type")]
    pub match_type: MatchType,
    /// The model name to match.
    pub value: String,
}

/// One entry of `rules[].matches`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteMatch {
    /// The model condition.
    pub model: ModelMatch,
}

/// One entry of `rules[].targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteTarget {
    /// The model name the request is rewritten to.
    pub model_rewrite: String,
    /// Relative weight 1..=1,000,000; if one target has a weight, all must.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// One rule of an InferenceModelRewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteRule {
    /// Conditions (any may match); empty means a catch-all rule.
    #[serde(default)]
    pub matches: Vec<RewriteMatch>,
    /// Weighted targets; the split is weight/sum.
    pub targets: Vec<RewriteTarget>,
}

/// `spec` of an InferenceModelRewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceModelRewriteSpec {
    /// The pool the rewrite applies to.
    pub pool_ref: PoolRef,
    /// Ordered rules.
    pub rules: Vec<RewriteRule>,
}

/// One static endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticEndpoint {
    /// `ip:port` of the model server.
    pub address: SocketAddr,
    /// Labels matched by pool selectors (e.g. `llm-d.ai/role: decode`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `spec` of an InferenceEndpoints list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceEndpointsSpec {
    /// The pool these endpoints feed, if any (otherwise pools select them by labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_ref: Option<PoolRef>,
    /// The endpoints; addresses must be unique.
    pub endpoints: Vec<StaticEndpoint>,
}

/// `spec` of an InfermeshNode: what a node advertises to Envoys and clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InfermeshNodeSpec {
    /// The node's Raft id.
    pub raft_id: u64,
    /// Envoy ext_proc gRPC address.
    pub ext_proc_address: SocketAddr,
    /// xDS (ADS) gRPC address.
    pub xds_address: SocketAddr,
    /// Standalone OpenAI-compatible proxy address, if the node runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_address: Option<SocketAddr>,
    /// Mesh (QUIC) RPC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_address: Option<SocketAddr>,
}

/// A typed kubectl-style document: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Document<S> {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata`.
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: S,
}

/// An EndpointPickerConfig document: kept whole, since the scheduler owns its schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointPickerConfigDoc {
    /// `metadata` (optional upstream; name `default` when absent).
    pub metadata: ObjectMeta,
    /// The document without `metadata`, as the scheduler's loader reads it.
    pub config: serde_json::Value,
}

impl EndpointPickerConfigDoc {
    /// The config (without `metadata`) as YAML text, the form the scheduler's loader reads.
    pub fn config_text(&self) -> String {
        // A JSON value always renders as YAML; JSON text (also valid YAML) is the fallback.
        serde_yaml_ng::to_string(&self.config).unwrap_or_else(|_| self.config.to_string())
    }
}

/// Any policy object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PolicyObject {
    /// An InferencePool.
    InferencePool(Document<InferencePoolSpec>),
    /// An InferenceObjective.
    InferenceObjective(Document<InferenceObjectiveSpec>),
    /// An InferenceModelRewrite.
    InferenceModelRewrite(Document<InferenceModelRewriteSpec>),
    /// An EndpointPickerConfig.
    EndpointPickerConfig(EndpointPickerConfigDoc),
    /// A static endpoint list.
    InferenceEndpoints(Document<InferenceEndpointsSpec>),
    /// A node registration.
    InfermeshNode(Document<InfermeshNodeSpec>),
}

impl PolicyObject {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            PolicyObject::InferencePool(_) => Kind::InferencePool,
            PolicyObject::InferenceObjective(_) => Kind::InferenceObjective,
            PolicyObject::InferenceModelRewrite(_) => Kind::InferenceModelRewrite,
            PolicyObject::EndpointPickerConfig(_) => Kind::EndpointPickerConfig,
            PolicyObject::InferenceEndpoints(_) => Kind::InferenceEndpoints,
            PolicyObject::InfermeshNode(_) => Kind::InfermeshNode,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            PolicyObject::InferencePool(d) => &d.metadata,
            PolicyObject::InferenceObjective(d) => &d.metadata,
            PolicyObject::InferenceModelRewrite(d) => &d.metadata,
            PolicyObject::EndpointPickerConfig(d) => &d.metadata,
            PolicyObject::InferenceEndpoints(d) => &d.metadata,
            PolicyObject::InfermeshNode(d) => &d.metadata,
        }
    }

    /// Mutable metadata.
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            PolicyObject::InferencePool(d) => &mut d.metadata,
            PolicyObject::InferenceObjective(d) => &mut d.metadata,
            PolicyObject::InferenceModelRewrite(d) => &mut d.metadata,
            PolicyObject::EndpointPickerConfig(d) => &mut d.metadata,
            PolicyObject::InferenceEndpoints(d) => &mut d.metadata,
            PolicyObject::InfermeshNode(d) => &mut d.metadata,
        }
    }

    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        let m = self.metadata();
        ObjectKey::new(self.kind(), m.namespace.clone(), m.name.clone())
    }

    /// The object as a kubectl-style JSON document.
    pub fn to_document(&self) -> serde_json::Value {
        let to = |v: Result<serde_json::Value, serde_json::Error>| {
            // Serialising these plain structs cannot fail (string keys only).
            v.unwrap_or(serde_json::Value::Null)
        };
        match self {
            PolicyObject::InferencePool(d) => to(serde_json::to_value(d)),
            PolicyObject::InferenceObjective(d) => to(serde_json::to_value(d)),
            PolicyObject::InferenceModelRewrite(d) => to(serde_json::to_value(d)),
            PolicyObject::InferenceEndpoints(d) => to(serde_json::to_value(d)),
            PolicyObject::InfermeshNode(d) => to(serde_json::to_value(d)),
            PolicyObject::EndpointPickerConfig(d) => {
                let mut doc = d.config.clone();
                if let serde_json::Value::Object(map) = &mut doc {
                    map.insert("metadata".into(), to(serde_json::to_value(&d.metadata)));
                }
                doc
            }
        }
    }
}
