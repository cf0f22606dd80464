//! The admin HTTP/JSON API every Raft-enabled node serves: policy apply / get / list /
//! delete, cluster status and member removal, this node's identity.
//!
//! Reads are local (the applied snapshot) unless `?consistent=true`, which confirms
//! leadership with a quorum (served by the leader; followers forward over HTTP). Writes go
//! to the leader through the store's Raft forwarding. Errors map as: invalid document 400
//! (naming document and field), not found 404, conflict 409, no leader / no quorum 503.
//!
//! Authorization ([`authorize`], one layer in front of every route): tokens are replicated
//! as SHA-256 hashes in two roles. A write token may do anything; a read token may only
//! read. Everything but a read needs a write token (401 without a valid one, 403 with a
//! read token). Reads are open until the first read token is added, and need a read or
//! write token from then on; `GET /v1/node` (the join handshake) stays open. Tokens are
//! added and removed through policy (`/v1/tokens`), so a rotation is: add the new token,
//! move clients to it, remove the old one; the last write token cannot be removed.

pub mod client;
pub mod commands;
mod errors;
mod tokens;

use std::net::SocketAddr;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use http_body_util::{BodyExt, Full};
use infermesh_raft_store::policy::TokenRole;
use infermesh_raft_store::policy::{DEFAULT_NAMESPACE, Kind, ObjectKey, StoredObject};
use infermesh_raft_store::{PolicyState, PolicyStore, Route};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use errors::ApiError;

use self::client::{AdminTls, Transport};

/// Annotation on a node's InfermeshNode entry holding its admin API address (how a
/// follower reaches the leader's admin API to forward leader-only operations).
pub const ADMIN_ADDRESS_ANNOTATION: &str = "infermesh.io/admin-address";
/// Annotation on a node's InfermeshNode entry holding its admin API's URL scheme
/// (`https` when it serves TLS; absent means `http`).
pub const ADMIN_SCHEME_ANNOTATION: &str = "infermesh.io/admin-scheme";
/// Annotation on a node's InfermeshNode entry holding its gossip (SWIM) address.
pub const GOSSIP_ADDRESS_ANNOTATION: &str = "infermesh.io/gossip-address";

/// What `GET /v1/node` reports: this node's identity and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Mesh node name (also the node's Raft address).
    pub name: String,
    /// Raft id.
    pub raft_id: u64,
    /// Admin API address.
    pub admin_address: SocketAddr,
    /// ext_proc gRPC address.
    pub ext_proc_address: SocketAddr,
    /// xDS (ADS) gRPC address.
    pub xds_address: SocketAddr,
    /// Standalone proxy address.
    pub proxy_address: Option<SocketAddr>,
    /// Gossip (SWIM, UDP) address.
    pub gossip_address: SocketAddr,
    /// Mesh RPC (QUIC) address.
    pub mesh_address: SocketAddr,
}

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct AdminState {
    store: PolicyStore,
    node: NodeInfo,
    peer_tls: AdminTls,
}

impl AdminState {
    /// State over `store` for the node described by `node`; `peer_tls` is what it presents
    /// and trusts when it forwards to the leader's admin API over https.
    pub fn new(store: PolicyStore, node: NodeInfo, peer_tls: AdminTls) -> AdminState {
        AdminState {
            store,
            node,
            peer_tls,
        }
    }
}

/// The admin API: its routes plus `extra` (other modules' routes, e.g. xDS status), all
/// behind [`authorize`].
pub fn router(state: AdminState, extra: Router) -> Router {
    Router::new()
        .route("/v1/node", get(node_info))
        .route("/v1/policy", get(list_all).post(apply))
        .route("/v1/policy/{kind}", get(list_kind))
        .route("/v1/policy/{kind}/{name}", get(get_one).delete(delete_one))
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/cluster/compact", axum::routing::post(compact))
        .route(tokens::PATH, get(tokens::list).post(tokens::change))
        .with_state(state.clone())
        .merge(extra)
        .layer(axum::middleware::from_fn_with_state(state, authorize))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// What a request needs: nothing, a read token (or write), or a write token.
fn required_role(state: &AdminState, method: &Method, path: &str) -> Option<TokenRole> {
    let read = matches!(*method, Method::GET | Method::HEAD);
    if path.starts_with(tokens::PATH) || !read {
        return Some(TokenRole::Write);
    }
    // The join handshake: a joining node holds no token.
    if path == "/v1/node" || !state.store.policy().has_read_tokens() {
        return None;
    }
    Some(TokenRole::Read)
}

/// Lets a request through only with a token of the role it needs (see the module doc);
/// a refused request changes nothing.
async fn authorize(
    State(state): State<AdminState>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let Some(needed) = required_role(&state, req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let what = match needed {
        TokenRole::Write => "a write token",
        TokenRole::Read => "a read or write token",
    };
    let held = match bearer(req.headers()) {
        None => {
            return ApiError::unauthorized(format!(
                "{} {} needs `Authorization: Bearer <token>` ({what})",
                req.method(),
                req.uri().path()
            ))
            .into_response();
        }
        Some(t) => state.store.token_role(t),
    };
    match (needed, held) {
        (_, None) => ApiError::unauthorized("the bearer token is not valid").into_response(),
        (TokenRole::Write, Some(TokenRole::Read)) => ApiError::forbidden(format!(
            "a read token cannot {} {}: use a write token",
            req.method(),
            req.uri().path()
        ))
        .into_response(),
        _ => next.run(req).await,
    }
}

fn kind(s: &str) -> Result<Kind, ApiError> {
    Kind::parse(s).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        ApiError::bad_request(format!("unknown kind {s:?}; known: {}", known.join(", ")))
    })
}

/// Query of reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadQuery {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    consistent: bool,
}

/// Query of deletes.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    resource_version: Option<u64>,
}

/// The method, URI and headers of a request, kept so the leader can be asked the same.
struct Incoming {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
}

impl<S: Send + Sync> FromRequestParts<S> for Incoming {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Incoming {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        })
    }
}

impl Incoming {
    /// Sends this (bodiless) request to the leader's admin API and relays its answer.
    async fn forward(self, state: &AdminState) -> Result<Response, ApiError> {
        forward_to_leader(state, self.method, &self.uri, self.headers, Bytes::new()).await
    }
}

/// Answers a read from the state to read: local, or confirmed by a quorum at the leader
/// (`consistent`); on a follower asked for a consistent read, the leader's answer.
async fn read(
    state: &AdminState,
    consistent: bool,
    incoming: Incoming,
    answer: impl FnOnce(&PolicyState) -> Result<Response, ApiError>,
) -> Result<Response, ApiError> {
    if !consistent {
        return answer(&state.store.policy());
    }
    match state.store.read_linearizable().await {
        Ok(s) => answer(&s),
        Err(infermesh_raft_store::ReadError::NotLeader {
            leader: Some(_), ..
        }) => incoming.forward(state).await,
        Err(e) => Err(ApiError::from(e)),
    }
}

/// The documents of `objects` in `namespace` (all namespaces when `None`).
fn documents<'a>(
    objects: impl Iterator<Item = &'a Arc<StoredObject>>,
    namespace: Option<&str>,
) -> Vec<Value> {
    objects
        .filter(|o| namespace.is_none_or(|n| o.object.metadata().namespace == n))
        .map(|o| o.to_document())
        .collect()
}

/// The namespace a request names, or the default one.
fn namespace_or_default(namespace: Option<String>) -> String {
    namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

async fn node_info(State(state): State<AdminState>) -> Response {
    Json(&state.node).into_response()
}

struct Json<T>(T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec_pretty(&self.0) {
            Ok(body) => ([(http::header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => ApiError::internal(e.to_string()).into_response(),
        }
    }
}

async fn list_all(
    State(state): State<AdminState>,
    Query(q): Query<ReadQuery>,
    incoming: Incoming,
) -> Result<Response, ApiError> {
    read(&state, q.consistent, incoming, |policy| {
        let items = documents(policy.iter(), q.namespace.as_deref());
        Ok(Json(json!({"appliedIndex": policy.applied_index(), "items": items})).into_response())
    })
    .await
}

async fn list_kind(
    State(state): State<AdminState>,
    Path(k): Path<String>,
    Query(q): Query<ReadQuery>,
    incoming: Incoming,
) -> Result<Response, ApiError> {
    let kind = kind(&k)?;
    read(&state, q.consistent, incoming, |policy| {
        let items = documents(policy.list(kind), q.namespace.as_deref());
        Ok(Json(json!({
            "kind": kind.as_str(),
            "appliedIndex": policy.applied_index(),
            "items": items,
        }))
        .into_response())
    })
    .await
}

async fn get_one(
    State(state): State<AdminState>,
    Path((k, name)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
    incoming: Incoming,
) -> Result<Response, ApiError> {
    let kind = kind(&k)?;
    let key = ObjectKey::new(kind, namespace_or_default(q.namespace), name);
    read(&state, q.consistent, incoming, |policy| {
        match policy.get(&key) {
            Some(o) => Ok(Json(o.to_document()).into_response()),
            None => Err(ApiError::not_found(format!("{key} not found"))),
        }
    })
    .await
}

async fn apply(State(state): State<AdminState>, body: Bytes) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not UTF-8 text: {e}")))?;
    let applied = bounded(state.store.apply_yaml(text, Route::ViaLeader)).await?;
    Ok(Json(errors::applied_json(&applied)).into_response())
}

async fn delete_one(
    State(state): State<AdminState>,
    Path((k, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let key = ObjectKey::new(kind(&k)?, namespace_or_default(q.namespace), name);
    let applied = bounded(
        state
            .store
            .delete(vec![(key, q.resource_version)], Route::ViaLeader),
    )
    .await?;
    Ok(Json(errors::applied_json(&applied)).into_response())
}

async fn cluster_status(State(state): State<AdminState>) -> Response {
    let status = state.store.status();
    let policy = state.store.policy();
    let names: serde_json::Map<String, Value> = policy
        .nodes()
        .map(|n| {
            (
                n.spec.raft_id.to_string(),
                json!({
                    "name": n.metadata.name,
                    "adminAddress": n.metadata.annotations.get(ADMIN_ADDRESS_ANNOTATION),
                    "extProcAddress": n.spec.ext_proc_address,
                    "proxyAddress": n.spec.proxy_address,
                }),
            )
        })
        .collect();
    Json(json!({"node": state.node, "raft": status, "registry": names})).into_response()
}

async fn remove_member(
    State(state): State<AdminState>,
    Path(id): Path<u64>,
    incoming: Incoming,
) -> Result<Response, ApiError> {
    match state.store.remove_node(id).await {
        Ok(()) => Ok(Json(json!({"removed": id})).into_response()),
        Err(infermesh_raft_store::ClusterError::NotLeader {
            leader: Some(_), ..
        }) => incoming.forward(&state).await,
        Err(e) => Err(ApiError::from(e)),
    }
}

/// Longest a write waits to commit. A leader cut off from its quorum would otherwise hold
/// the request open indefinitely.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Bounds a write by [`WRITE_TIMEOUT`]; past it the answer is 503 (outcome unknown).
async fn bounded<T>(
    write: impl std::future::Future<Output = Result<T, infermesh_raft_store::WriteError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(_) => Err(ApiError::unavailable(format!(
            "the write was not committed within {WRITE_TIMEOUT:?} (no quorum reachable?); \
             it may still commit later: re-read before retrying"
        ))),
    }
}

/// Builds a snapshot on the leader and purges the log it covers (members that lag behind
/// it then catch up by snapshot).
async fn compact(
    State(state): State<AdminState>,
    incoming: Incoming,
) -> Result<Response, ApiError> {
    let status = state.store.status();
    if status.leader != Some(state.node.raft_id) {
        return incoming.forward(&state).await;
    }
    let index = state.store.compact().await?;
    Ok(Json(json!({"snapshotIndex": index})).into_response())
}

/// The leader's admin URL (`scheme://host:port`), from its node registry entry.
fn leader_admin(state: &AdminState) -> Result<String, ApiError> {
    let status = state.store.status();
    let leader = status
        .leader
        .ok_or_else(|| ApiError::unavailable("no leader is known right now; retry shortly"))?;
    if leader == state.node.raft_id {
        return Err(ApiError::unavailable(
            "this node just became leader; retry the request",
        ));
    }
    let policy = state.store.policy();
    let entry = policy.nodes().find(|n| n.spec.raft_id == leader);
    entry
        .and_then(|n| {
            let address = n.metadata.annotations.get(ADMIN_ADDRESS_ANNOTATION)?;
            let scheme = n
                .metadata
                .annotations
                .get(ADMIN_SCHEME_ANNOTATION)
                .map_or("http", String::as_str);
            Some(format!("{scheme}://{address}"))
        })
        .ok_or_else(|| {
            ApiError::unavailable(format!(
                "leader {leader} has not registered its admin address yet; retry shortly"
            ))
        })
}

/// Sends the same request to the leader's admin API (one hop) and relays its answer.
async fn forward_to_leader(
    state: &AdminState,
    method: Method,
    uri: &http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let admin = leader_admin(state)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let target: http::Uri = format!("{admin}{path}")
        .parse()
        .map_err(|e| ApiError::internal(format!("leader address {admin:?}: {e}")))?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(target)
        .header(FORWARDED_HEADER, &state.node.name);
    if headers.contains_key(FORWARDED_HEADER) {
        return Err(ApiError::unavailable(
            "leadership moved while forwarding; retry the request",
        ));
    }
    if let Some(a) = headers.get(http::header::AUTHORIZATION) {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // Built per forward (forwards are rare), so a rotated client certificate is used at once.
    let client = Transport::for_scheme(
        if admin.starts_with("https://") {
            "https"
        } else {
            "http"
        },
        &state.peer_tls,
        std::time::Duration::from_secs(2),
    )
    .map_err(|e| ApiError::unavailable(format!("cannot reach the leader at {admin}: {e}")))?;
    let resp = tokio::time::timeout(FORWARD_TIMEOUT, client.request(req))
        .await
        .map_err(|_| {
            ApiError::unavailable(format!("the leader at {admin} did not answer in time"))
        })?
        .map_err(|e| ApiError::unavailable(format!("cannot reach the leader at {admin}: {e}")))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| ApiError::unavailable(format!("the leader's answer broke off: {e}")))?
        .to_bytes();
    let mut out = (parts.status, body).into_response();
    if let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) {
        out.headers_mut()
            .insert(http::header::CONTENT_TYPE, ct.clone());
    }
    Ok(out)
}

/// Marks a request already forwarded once (so it is never forwarded twice).
const FORWARDED_HEADER: &str = "x-infermesh-forwarded-by";
/// Bound on a forwarded admin request.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app` on `listener` (TCP, or TLS) until `shutdown` fires.
pub async fn serve<L>(listener: L, app: Router, mut shutdown: tokio::sync::watch::Receiver<bool>)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "admin server failed");
    }
}
