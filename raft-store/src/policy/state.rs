//! The policy state machine: plain data driven by `handle_*` calls, no IO.
//!
//! A [`PolicyRequest`] is one client write. It applies whole or not at all: every
//! precondition is checked before the first change, so readers of a published
//! [`PolicyState`] never see half of a multi-document apply.
//!
//! One Raft log entry carries either one request or, when the leader groups concurrent
//! writes, a batch of them ([`PolicyOp::Batch`]). Each request of a batch applies or is
//! rejected on its own, in batch order, and gets its own [`PolicyResponse`].
//!
//! Resource versions are *revisions*: every applied request takes the next revision,
//! `max(previous revision + 1, log index)`. A request alone in its entry therefore usually
//! gets its log index (as before batching), while requests sharing an entry get distinct,
//! increasing revisions, so an object's version rises with every change and a conditional
//! write made against a version seen earlier in the same batch is still refused.

use std::collections::BTreeSet;
use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::object::{
    Document, EndpointPickerConfigDoc, InferenceEndpointsSpec, InferenceModelRewriteSpec,
    InferenceObjectiveSpec, InferencePoolSpec, InfermeshNodeSpec, Kind, ObjectKey, PolicyObject,
};

/// SHA-256 of a bearer token; only hashes are replicated and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes a bearer token.
    pub fn of(token: &str) -> Self {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// The hash as `sha256:<64 hex digits>`, the form the admin API lists and takes.
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256:");
        for b in self.0 {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Reads `sha256:<64 hex digits>` (the form [`TokenHash::to_text`] writes).
    pub fn parse(text: &str) -> Result<TokenHash, String> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{text:?}: expected sha256:<64 hex digits>"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{text:?}: expected sha256:<64 hex digits>"));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("{text:?}: {e}"))?;
        }
        Ok(TokenHash(out))
    }
}

/// What an admin bearer token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TokenRole {
    /// Policy writes, member removal, compaction, token changes, and every read.
    Write,
    /// Reads only (policy, cluster status, xDS status); asked for once any read token exists.
    Read,
}

impl TokenRole {
    /// The role's name in the admin API and CLI (`write`, `read`).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Write => "write",
            TokenRole::Read => "read",
        }
    }
}

/// One change to the accepted tokens of a role: hashes added and removed, all or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenChange {
    /// Which role's set changes.
    pub role: TokenRole,
    /// Hashes to accept from now on.
    pub add: Vec<TokenHash>,
    /// Hashes to stop accepting (each must be accepted now).
    pub remove: Vec<TokenHash>,
}

/// One change in a write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PolicyOp {
    /// Create or replace an object, optionally only if its version is `expected_version`.
    Put {
        /// The object (carried as JSON text so the log codec stays compact and schema-free).
        #[serde(with = "json_text")]
        object: Box<PolicyObject>,
        /// Required current resource version (`None`: unconditional).
        expected_version: Option<u64>,
    },
    /// Delete an object, optionally only if its version is `expected_version`.
    Delete {
        /// Which object.
        key: ObjectKey,
        /// Required current resource version (`None`: unconditional).
        expected_version: Option<u64>,
    },
    /// Add bearer-token hashes accepted for writes.
    AddTokens(Vec<TokenHash>),
    /// Several independent requests grouped into one log entry by the leader's batcher.
    ///
    /// Why an op and not a new log type: log entries are postcard without a format
    /// version, and postcard encodes an enum variant by its position. Appending a variant
    /// here leaves the bytes of every entry written before batching unchanged (they still
    /// decode as one request), whereas replacing the entry type with an enum would shift
    /// them. A batch is only meaningful as the single op of an entry and never nests; any
    /// other placement is refused with [`Rejection::MisplacedBatch`].
    Batch(Vec<PolicyRequest>),
    /// Adds and removes accepted token hashes of one role (appended last: see `Batch`).
    Tokens(TokenChange),
}

/// The application data of one Raft log entry: one client request whose ops apply
/// atomically, or (as its only op) a [`PolicyOp::Batch`] of such requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// The ops, all or none.
    pub ops: Vec<PolicyOp>,
}

impl PolicyRequest {
    /// The requests of a batch entry, or `None` when this is a single request.
    pub fn batch(&self) -> Option<&[PolicyRequest]> {
        match self.ops.as_slice() {
            [PolicyOp::Batch(requests)] => Some(requests),
            _ => None,
        }
    }

    /// The client requests this entry carries: those of a batch, or itself.
    pub fn into_requests(self) -> Vec<PolicyRequest> {
        match <[PolicyOp; 1]>::try_from(self.ops) {
            Ok([PolicyOp::Batch(requests)]) => requests,
            Ok([op]) => vec![PolicyRequest { ops: vec![op] }],
            Err(ops) => vec![PolicyRequest { ops }],
        }
    }

    /// Whether any op is a batch (a client request must not carry one).
    pub fn has_batch_op(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, PolicyOp::Batch(_)))
    }
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectChange {
    /// Which object.
    pub key: ObjectKey,
    /// What happened.
    pub action: ChangeAction,
    /// Its resource version afterwards (`None` when deleted).
    pub resource_version: Option<u64>,
}

/// The kubectl-style outcome of one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeAction {
    /// The object did not exist.
    Created,
    /// The object existed and changed.
    Configured,
    /// The object existed and was identical; its version is kept.
    Unchanged,
    /// The object was removed.
    Deleted,
}

/// Why a request was refused at apply time; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// A conditional write found another version (HTTP 409).
    #[error("conflict on {key}: expected resourceVersion {expected}, found {}", actual.map_or("none".to_string(), |v| v.to_string()))]
    Conflict {
        /// Which object.
        key: ObjectKey,
        /// The version the writer expected.
        expected: u64,
        /// The version stored (`None`: absent).
        actual: Option<u64>,
    },
    /// A delete named an object that does not exist (HTTP 404).
    #[error("{key} not found")]
    NotFound {
        /// Which object.
        key: ObjectKey,
    },
    /// A batch op appeared inside a client request or another batch (HTTP 400).
    #[error("a batch op is only allowed as the single op of a log entry")]
    MisplacedBatch,
    /// A token change would leave no write token, locking every writer out (HTTP 409).
    #[error("the change would remove the last write token; add its replacement first")]
    LastWriteToken,
    /// A token to remove is not accepted in that role (HTTP 404).
    #[error("{hash} is not a {role} token", hash = hash.to_text(), role = role.as_str())]
    UnknownToken {
        /// The role named.
        role: TokenRole,
        /// The hash named.
        hash: TokenHash,
    },
    /// A token to add is already accepted in the other role (HTTP 409).
    #[error("{hash} is already a {role} token; remove it there first", hash = hash.to_text(), role = role.as_str())]
    TokenInOtherRole {
        /// The role that holds it.
        role: TokenRole,
        /// The hash named.
        hash: TokenHash,
    },
}

/// The state machine's answer to one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyResponse {
    /// All ops applied at `index`.
    Applied {
        /// Log index of the entry (shared by the requests of a batch; each changed
        /// object's new resource version is in its [`ObjectChange`]).
        index: u64,
        /// One change per op that touched an object, in op order.
        changes: Vec<ObjectChange>,
    },
    /// Nothing applied.
    Rejected(Rejection),
    /// A blank or membership entry (no policy change).
    Noop,
    /// One answer per request of a [`PolicyOp::Batch`] entry, in batch order.
    Batch(Vec<PolicyResponse>),
}

/// An object with its bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    /// Revision that last wrote it (see the module doc).
    pub resource_version: u64,
    /// Revision that created it (oldest resource wins rewrite precedence ties).
    pub created_index: u64,
    /// The object (its `metadata.resourceVersion` is left empty; see `to_document`).
    pub object: PolicyObject,
}

impl StoredObject {
    /// The kubectl-style document with `metadata.resourceVersion` filled in.
    pub fn to_document(&self) -> serde_json::Value {
        let mut o = self.object.clone();
        o.metadata_mut().resource_version = Some(self.resource_version.to_string());
        o.to_document()
    }
}

/// The applied policy: what readers see, and what snapshots hold.
///
/// The objects live in a persistent ordered map: cloning the state to publish it after
/// every apply costs O(1) and each change O(log n), where a `BTreeMap` clone cost O(n) per
/// apply on every node (the largest cost of a write once writes are batched).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    applied_index: u64,
    /// The last revision handed out (0 before any write).
    #[serde(default)]
    revision: u64,
    objects: OrdMap<ObjectKey, Arc<StoredObject>>,
    /// Write-token hashes.
    tokens: BTreeSet<TokenHash>,
    /// Read-only-token hashes (absent in state written before read tokens existed).
    #[serde(default)]
    read_tokens: BTreeSet<TokenHash>,
}

/// The write-token and read-token hashes, in that order.
type TokenSets = (BTreeSet<TokenHash>, BTreeSet<TokenHash>);

/// Keys of objects a `handle_*` call changed, so a persistent store writes only those.
#[derive(Debug, Default)]
pub struct Touched {
    /// Objects created, changed or deleted.
    pub keys: BTreeSet<ObjectKey>,
    /// Whether either token set changed.
    pub tokens: bool,
}

macro_rules! typed_getters {
    ($($(#[$doc:meta])* $fn_one:ident, $fn_all:ident, $variant:ident, $ty:ty;)*) => {$(
        $(#[$doc])*
        pub fn $fn_one(&self, namespace: &str, name: &str) -> Option<&$ty> {
            match self.objects.get(&ObjectKey::new(Kind::$variant, namespace, name)).map(|s| &s.object) {
                Some(PolicyObject::$variant(d)) => Some(d),
                _ => None,
            }
        }

        $(#[$doc])*
        /// (all of this kind, in key order)
        pub fn $fn_all(&self) -> impl Iterator<Item = &$ty> + '_ {
            self.list(Kind::$variant).filter_map(|s| match &s.object {
                PolicyObject::$variant(d) => Some(d),
                _ => None,
            })
        }
    )*};
}

impl PolicyState {
    /// Builds a state from parts (used when loading from disk or a snapshot). The
    /// revision starts at the highest of the objects' versions; restore the stored one with
    /// [`PolicyState::with_revision`].
    pub fn from_parts(
        applied_index: u64,
        objects: impl IntoIterator<Item = StoredObject>,
        tokens: impl IntoIterator<Item = TokenHash>,
    ) -> Self {
        let objects: OrdMap<ObjectKey, Arc<StoredObject>> = objects
            .into_iter()
            .map(|o| (o.object.key(), Arc::new(o)))
            .collect();
        let newest = objects.values().map(|o| o.resource_version).max();
        PolicyState {
            applied_index,
            revision: newest.unwrap_or(0),
            objects,
            tokens: tokens.into_iter().collect(),
            read_tokens: BTreeSet::new(),
        }
    }

    /// Restores the read-only-token hashes (loaded beside the write hashes).
    pub fn with_read_tokens(mut self, hashes: impl IntoIterator<Item = TokenHash>) -> Self {
        self.read_tokens = hashes.into_iter().collect();
        self
    }

    /// Restores the last revision handed out (never below the objects' versions). For state
    /// written before revisions existed pass its applied index: every version handed out
    /// then was a log index at or below it.
    pub fn with_revision(mut self, revision: u64) -> Self {
        self.revision = self.revision.max(revision);
        self
    }

    /// Log index of the last entry applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The last revision handed out: at least every resource version any write produced,
    /// including objects since deleted (0 before any write).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// One object by key.
    pub fn get(&self, key: &ObjectKey) -> Option<&Arc<StoredObject>> {
        self.objects.get(key)
    }

    /// All objects of a kind, in (namespace, name) order.
    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Arc<StoredObject>> + '_ {
        let lo = ObjectKey::new(kind, "", "");
        self.objects
            .range(lo..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, v)| v)
    }

    /// Every object, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<StoredObject>> + '_ {
        self.objects.values()
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether there are no objects.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The stored write-token hashes.
    pub fn token_hashes(&self) -> impl Iterator<Item = &TokenHash> + '_ {
        self.tokens.iter()
    }

    /// The stored read-only-token hashes.
    pub fn read_token_hashes(&self) -> impl Iterator<Item = &TokenHash> + '_ {
        self.read_tokens.iter()
    }

    /// Whether any write token is configured.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether any read-only token is configured (reads then need a token too).
    pub fn has_read_tokens(&self) -> bool {
        !self.read_tokens.is_empty()
    }

    /// Whether `token` is one of the configured write tokens.
    pub fn verify_token(&self, token: &str) -> bool {
        self.tokens.contains(&TokenHash::of(token))
    }

    /// What `token` allows: `Write`, `Read`, or nothing (`None`).
    pub fn token_role(&self, token: &str) -> Option<TokenRole> {
        let h = TokenHash::of(token);
        if self.tokens.contains(&h) {
            Some(TokenRole::Write)
        } else if self.read_tokens.contains(&h) {
            Some(TokenRole::Read)
        } else {
            None
        }
    }

    /// The token sets after `req`'s token ops, or why they are refused; `None` when the
    /// request changes no token.
    fn token_sets_after(&self, req: &PolicyRequest) -> Result<Option<TokenSets>, Rejection> {
        let mut sets: Option<TokenSets> = None;
        let mut removed_any = false;
        for op in &req.ops {
            let legacy;
            let change = match op {
                PolicyOp::Tokens(c) => c,
                // The bootstrap's op: write hashes added, nothing removed.
                PolicyOp::AddTokens(add) => {
                    legacy = TokenChange {
                        role: TokenRole::Write,
                        add: add.clone(),
                        remove: Vec::new(),
                    };
                    &legacy
                }
                _ => continue,
            };
            let (write, read) =
                sets.get_or_insert_with(|| (self.tokens.clone(), self.read_tokens.clone()));
            let (mine, other, other_role) = match change.role {
                TokenRole::Write => (write, read, TokenRole::Read),
                TokenRole::Read => (read, write, TokenRole::Write),
            };
            for h in &change.remove {
                if !mine.remove(h) {
                    return Err(Rejection::UnknownToken {
                        role: change.role,
                        hash: *h,
                    });
                }
                removed_any = true;
            }
            for h in &change.add {
                if other.contains(h) {
                    return Err(Rejection::TokenInOtherRole {
                        role: other_role,
                        hash: *h,
                    });
                }
                mine.insert(*h);
            }
        }
        if let Some((write, _)) = &sets
            && removed_any
            && write.is_empty()
        {
            return Err(Rejection::LastWriteToken);
        }
        Ok(sets)
    }

    typed_getters! {
        /// InferencePool by namespace and name.
        pool, pools, InferencePool, Document<InferencePoolSpec>;
        /// InferenceObjective by namespace and name.
        objective, objectives, InferenceObjective, Document<InferenceObjectiveSpec>;
        /// InferenceModelRewrite by namespace and name.
        model_rewrite, model_rewrites, InferenceModelRewrite, Document<InferenceModelRewriteSpec>;
        /// EndpointPickerConfig by namespace and name.
        epp_config, epp_configs, EndpointPickerConfig, EndpointPickerConfigDoc;
        /// InferenceEndpoints by namespace and name.
        endpoints, endpoint_lists, InferenceEndpoints, Document<InferenceEndpointsSpec>;
        /// InfermeshNode (node registry entry) by namespace and name.
        node, nodes, InfermeshNode, Document<InfermeshNodeSpec>;
    }

    /// Records a log entry that carries no policy (blank or membership).
    pub fn handle_noop(&mut self, index: u64) {
        self.applied_index = self.applied_index.max(index);
    }

    /// Applies one log entry at `index`: a single request, or each request of a batch in
    /// order, each on its own (a rejected request does not affect its batch-mates).
    pub fn handle_request(
        &mut self,
        index: u64,
        req: &PolicyRequest,
        touched: &mut Touched,
    ) -> PolicyResponse {
        self.applied_index = self.applied_index.max(index);
        match req.batch() {
            Some(requests) => PolicyResponse::Batch(
                requests
                    .iter()
                    .map(|r| self.handle_one(index, r, touched))
                    .collect(),
            ),
            None => self.handle_one(index, req, touched),
        }
    }

    /// Applies one client request carried by the entry at `index`: every precondition
    /// first, then all ops under the next revision.
    fn handle_one(
        &mut self,
        index: u64,
        req: &PolicyRequest,
        touched: &mut Touched,
    ) -> PolicyResponse {
        if req.has_batch_op() {
            return PolicyResponse::Rejected(Rejection::MisplacedBatch);
        }
        for op in &req.ops {
            let (key, expected) = match op {
                PolicyOp::Put {
                    object,
                    expected_version,
                } => (object.key(), *expected_version),
                PolicyOp::Delete {
                    key,
                    expected_version,
                } => {
                    if !self.objects.contains_key(key) {
                        return PolicyResponse::Rejected(Rejection::NotFound { key: key.clone() });
                    }
                    (key.clone(), *expected_version)
                }
                PolicyOp::AddTokens(_) | PolicyOp::Tokens(_) | PolicyOp::Batch(_) => continue,
            };
            if let Some(expected) = expected {
                let actual = self.objects.get(&key).map(|o| o.resource_version);
                if actual != Some(expected) {
                    return PolicyResponse::Rejected(Rejection::Conflict {
                        key,
                        expected,
                        actual,
                    });
                }
            }
        }
        let tokens = match self.token_sets_after(req) {
            Ok(t) => t,
            Err(r) => return PolicyResponse::Rejected(r),
        };
        let revision = self.revision.saturating_add(1).max(index);
        self.revision = revision;
        let mut changes = Vec::with_capacity(req.ops.len());
        for op in &req.ops {
            match op {
                PolicyOp::Put { object, .. } => {
                    let mut object = (**object).clone();
                    object.metadata_mut().resource_version = None;
                    let key = object.key();
                    let (action, stored) = match self.objects.get(&key) {
                        Some(old) if old.object == object => (ChangeAction::Unchanged, old.clone()),
                        Some(old) => (
                            ChangeAction::Configured,
                            Arc::new(StoredObject {
                                resource_version: revision,
                                created_index: old.created_index,
                                object,
                            }),
                        ),
                        None => (
                            ChangeAction::Created,
                            Arc::new(StoredObject {
                                resource_version: revision,
                                created_index: revision,
                                object,
                            }),
                        ),
                    };
                    changes.push(ObjectChange {
                        key: key.clone(),
                        action,
                        resource_version: Some(stored.resource_version),
                    });
                    if action != ChangeAction::Unchanged {
                        touched.keys.insert(key.clone());
                        self.objects.insert(key, stored);
                    }
                }
                PolicyOp::Delete { key, .. } => {
                    // A second delete of the same key in one request finds it gone: it was
                    // checked present above, so the first delete removed it.
                    if self.objects.remove(key).is_some() {
                        touched.keys.insert(key.clone());
                        changes.push(ObjectChange {
                            key: key.clone(),
                            action: ChangeAction::Deleted,
                            resource_version: None,
                        });
                    }
                }
                // Computed whole above, set below.
                PolicyOp::AddTokens(_) | PolicyOp::Tokens(_) => {}
                // Refused before any change above.
                PolicyOp::Batch(_) => {}
            }
        }
        if let Some((write, read)) = tokens
            && (write != self.tokens || read != self.read_tokens)
        {
            self.tokens = write;
            self.read_tokens = read;
            touched.tokens = true;
        }
        PolicyResponse::Applied { index, changes }
    }
}

mod json_text {
    //! Serde adapter: a PolicyObject travels as JSON text inside the binary log codec,
    //! because the EndpointPickerConfig body is schema-free JSON that postcard cannot carry.

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::policy::object::PolicyObject;

    pub fn serialize<S: Serializer>(v: &PolicyObject, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(v).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<PolicyObject>, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}
