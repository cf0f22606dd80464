//! Prefix ownership on both request paths (the proxy layer here, and the ext_proc stream
//! through [`PrefixSharing::prepare`] / [`PrefixSharing::record`]): before the node
//! schedules a request, the request's block-hash chain is matched at the anchor's owner (locally when this node owns it,
//! else over QUIC within the lookup budget), and after the pick the chain is recorded at
//! the owners (batched by the mesh).
//!
//! Why this runs before the dispatcher rather than inside it: the
//! dispatcher (`crate::dispatch`) schedules synchronously with `PrefixSource::Local`, and
//! has no asynchronous hook where a remote match could be passed as
//! `PrefixSource::Remote`. So [`PrefixSharing::prepare`] merges the owner's answer into this node's own
//! prefix index (`Scheduler::prefix_index().record`) just before the dispatcher matches
//! against it: the local match then equals the union of the owner's answer and what this
//! node recorded itself. The owner's index stays the fleet's source of truth; each node's
//! index acts as a cache of the answers it asked for. When the owner does not answer in
//! budget, the request is scheduled on local data only (counted as a fallback).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use infermesh_gossip::Mesh;
use infermesh_scheduler::config::PluginSpec;
use infermesh_scheduler::{ApiKind, Endpoint, InferenceRequest, ResolvedConfig, parse_openai};

use crate::dispatch::{Dispatcher, Rejection, RequestMeta};
use crate::policy::SharedPolicy;
use crate::pool::SharedPool;
use crate::proxy::SERVED_HEADER;

/// How the scheduler sizes an endpoint's prefix LRU (mirrors the approximate prefix
/// producer's `capacity_for`, so merged entries never resize the LRU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityRule {
    /// `autoTune`: use the endpoint's KV block count when it reports one.
    pub auto_tune: bool,
    /// `lruCapacityPerServer`.
    pub per_server: usize,
}

impl CapacityRule {
    /// The rule of `cfg`'s prefix producer; `None` when no prefix producer is configured.
    pub fn of(cfg: &ResolvedConfig) -> Option<CapacityRule> {
        let name = cfg.prefix_producer.as_deref()?;
        match &cfg.plugin(name)?.spec {
            PluginSpec::ApproxPrefixCacheProducer(p) => Some(CapacityRule {
                auto_tune: p.auto_tune,
                per_server: usize::try_from(p.lru_capacity_per_server).unwrap_or(1),
            }),
            _ => None,
        }
    }

    /// LRU capacity for `e`.
    pub fn capacity(&self, e: &Endpoint) -> usize {
        if self.auto_tune
            && let Some(n) = e
                .metrics
                .as_ref()
                .and_then(|m| m.cache_num_blocks)
                .filter(|n| *n > 0)
        {
            return usize::try_from(n).unwrap_or(usize::MAX);
        }
        self.per_server
    }
}

/// What the layer needs.
#[derive(Clone)]
pub struct PrefixSharing {
    // Weak: open client connections must not keep a stopped node's mesh alive.
    mesh: Weak<Mesh>,
    dispatcher: Dispatcher,
    pool: SharedPool,
    policy: SharedPolicy,
    rule: CapacityRule,
    staleness: Duration,
}

impl std::fmt::Debug for PrefixSharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixSharing")
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

/// A chain matched before scheduling, to record at its owners after the pick.
#[derive(Debug)]
pub struct Pending {
    anchor: u64,
    hashes: Vec<u64>,
}

impl PrefixSharing {
    /// Sharing state over the node's pool and policy.
    pub fn new(
        mesh: Arc<Mesh>,
        dispatcher: Dispatcher,
        policy: SharedPolicy,
        rule: CapacityRule,
    ) -> PrefixSharing {
        PrefixSharing {
            mesh: Arc::downgrade(&mesh),
            pool: dispatcher.pool().clone(),
            staleness: dispatcher.config().staleness,
            dispatcher,
            policy,
            rule,
        }
    }

    /// Wraps the proxy's routes.
    pub fn wrap(self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self, layer))
    }

    /// Records `p`'s chain at its owners as served by `served` (batched by the mesh).
    pub fn record(&self, p: Pending, served: String) {
        if let Some(mesh) = self.mesh.upgrade() {
            mesh.prefix_record(p.anchor, p.hashes, served);
        }
    }

    /// Looks the request's chain up at its owner (within the mesh's lookup budget) and
    /// merges the answer into the local index; `None` when there is no chain to share.
    pub async fn prepare(&self, kind: ApiKind, body: &[u8]) -> Option<Pending> {
        let parsed = parse_openai(kind, body).ok()?;
        let pool = self.pool.load_full();
        let now = Instant::now();
        let candidates = pool.candidates(now, self.staleness, None, &[]);
        if candidates.is_empty() {
            return None;
        }
        let req = InferenceRequest {
            target_model: parsed.model.clone(),
            model: parsed.model,
            prompt_bytes: parsed.prompt_bytes,
            cache_salt: parsed.cache_salt,
            ..InferenceRequest::default()
        };
        let policy = self.policy.load_full();
        let chain = policy.scheduler.prefix_chain(&req, &candidates)?;
        let anchor = chain.anchor()?;
        let mesh = self.mesh.upgrade()?;
        if let Some(found) = mesh.prefix_lookup(anchor, &chain.hashes).await
            && let Some(index) = policy.scheduler.prefix_index()
        {
            for m in &found.endpoints {
                let Ok(addr) = m.endpoint.parse::<SocketAddr>() else {
                    continue;
                };
                let blocks = (m.blocks as usize).min(chain.hashes.len());
                let Some(e) = candidates.iter().find(|e| e.address == addr) else {
                    continue;
                };
                if blocks > 0 {
                    index.record(addr, self.rule.capacity(e), &chain.hashes[..blocks]);
                }
            }
        }
        Some(Pending {
            anchor,
            hashes: chain.hashes,
        })
    }
}

fn api_kind(path: &str) -> Option<ApiKind> {
    match path {
        "/v1/completions" => Some(ApiKind::Completions),
        "/v1/chat/completions" => Some(ApiKind::ChatCompletions),
        _ => None,
    }
}

async fn layer(State(s): State<PrefixSharing>, req: Request, next: Next) -> Response {
    let Some(kind) = api_kind(req.uri().path()).filter(|_| req.method() == http::Method::POST)
    else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let limit = s.dispatcher.config().max_body_bytes;
    let bytes: Bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            // The same answer the proxy gives; the body is consumed, so answer here.
            let meta = RequestMeta::from_headers(
                parts
                    .headers
                    .iter()
                    .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v))),
            );
            let r = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Rejection::too_large(limit)
            } else {
                Rejection {
                    status: 400,
                    outcome: crate::metrics::Outcome::BadRequest,
                    message: format!("cannot read the request body: {e}"),
                }
            };
            s.dispatcher.count_rejection(&meta, &r);
            let mut resp = Response::new(Body::from(r.json_body()));
            *resp.status_mut() = http::StatusCode::from_u16(r.status)
                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return resp;
        }
    };
    let pending = s.prepare(kind, &bytes).await;
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if let Some(p) = pending
        && resp.status().is_success()
        && let Some(served) = resp
            .headers()
            .get(SERVED_HEADER)
            .and_then(|v| v.to_str().ok())
    {
        s.record(p, served.to_owned());
    }
    resp
}
