//! The standalone OpenAI-compatible proxy. POST bodies are routed through the same
//! two-phase path as the ext_proc server ([`Dispatcher::route`]) with the configured
//! parser the path resolves to (`requestHandler.parsers`; by default openai, anthropic,
//! vllmhttp, then passthrough for any other path, routed by load; a path no configured
//! parser takes gets 400); `GET /v1/models` lists the pool's models. Requests are forwarded with
//! the pooled client, falling back to the next endpoint on connect failure. Every request
//! ends as a response to the client and one counted outcome.

pub mod body;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use infermesh_scheduler::ApiKind;

use crate::request::{Dispatcher, Rejection, RequestMeta, Ticket};
use crate::telemetry::OTEL_TARGET;
use crate::upstream::HttpClient;
use body::TrackedBody;
use tracing::Instrument as _;

/// Header on proxy responses naming the endpoint that served the request.
pub const SERVED_HEADER: &str = "x-gateway-destination-endpoint-served";

/// Forwarding limits.
#[derive(Debug, Clone, Copy)]
pub struct ProxyConfig {
    /// Longest wait for a model server's response headers.
    pub response_timeout: Duration,
    /// Most endpoints tried for one request (connect failures only).
    pub max_attempts: usize,
}

#[derive(Debug, Clone)]
struct ProxyState {
    dispatcher: Dispatcher,
    client: HttpClient,
    cfg: ProxyConfig,
}

/// The proxy's routes.
pub fn router(dispatcher: Dispatcher, client: HttpClient, cfg: ProxyConfig) -> Router {
    // One handler that matches the two GET paths itself: a path router's lookup on every
    // inference request cost more than the match below.
    Router::new()
        .fallback(entry)
        // One Arc clone per request instead of cloning every handle inside the state.
        .with_state(Arc::new(ProxyState {
            dispatcher,
            client,
            cfg,
        }))
}

async fn entry(state: State<Arc<ProxyState>>, req: Request) -> Response {
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/v1/models") => models(state).await,
        (&http::Method::GET, "/health") => "ok".into_response(),
        (_, "/v1/models" | "/health") => StatusCode::METHOD_NOT_ALLOWED.into_response(),
        _ => inference(state, req).await,
    }
}

/// Every POST path goes to the configured parser its path resolves to; other methods are
/// not routed.
async fn inference(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    if req.method() != http::Method::POST {
        let mut resp = Response::new(Body::from(format!(
            "{} {} is not routed: the proxy routes POST requests and GET /v1/models\n",
            req.method(),
            req.uri().path()
        )));
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return resp;
    }
    let kind = match s.dispatcher.parser_for(req.uri().path()) {
        Ok(kind) => kind,
        Err(r) => {
            let meta = RequestMeta::from_http(req.headers());
            s.dispatcher.count_rejection(&meta, "", &r);
            return error_response(&r, &meta.request_id);
        }
    };
    handle(s, kind, req).await
}

async fn models(State(s): State<Arc<ProxyState>>) -> Response {
    let pool = s.dispatcher.pool().load();
    let mut ids: Vec<&String> = pool.models.iter().collect();
    ids.sort();
    let data: Vec<serde_json::Value> = ids
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "owned_by": "infermesh"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

fn error_response(r: &Rejection, request_id: &str) -> Response {
    r.to_http(request_id).map(Body::from)
}

async fn handle(s: Arc<ProxyState>, kind: ApiKind, req: Request) -> Response {
    let span = tracing::span!(
        target: OTEL_TARGET,
        tracing::Level::TRACE,
        "infermesh.request",
        otel.kind = "server",
        url.path = %req.uri().path(),
        request_id = tracing::field::Empty,
    );
    crate::telemetry::adopt_parent(&span, req.headers());
    handle_in(s, kind, req).instrument(span).await
}

async fn handle_in(s: Arc<ProxyState>, kind: ApiKind, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let meta = RequestMeta::from_http(&parts.headers);
    tracing::Span::current().record("request_id", meta.request_id.as_str());
    let request_id = meta.request_id.clone();
    let limit = s.dispatcher.config().max_body_bytes;
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let r = if e.downcast_ref::<LengthLimitError>().is_some() {
                Rejection::TooLarge { limit }
            } else {
                Rejection::UnreadableBody(e.to_string())
            };
            s.dispatcher.count_rejection(&meta, "", &r);
            return error_response(&r, &request_id);
        }
    };
    let ticket = match s.dispatcher.route(kind, &bytes, meta, &[]).await {
        Ok(t) => t,
        Err(r) => return error_response(&r, &request_id),
    };
    // An InferenceModelRewrite replaced the model: the pod gets the rewritten body.
    let bytes = ticket.rewrite_body(&bytes).map_or(bytes, Bytes::from);
    forward(&s, ticket, &parts.uri, &parts.headers, bytes, &request_id).await
}

/// Headers that describe one connection, never forwarded.
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
];

/// The headers a pod gets: the client's, minus hop-by-hop ones, the length (the body may
/// be rewritten) and router-only ones (those come from the pick alone, so no client
/// chooses a prefiller or a destination), plus the request id and the pick's headers.
fn upstream_headers(
    client: &HeaderMap,
    request_id: &str,
    picked: &[(String, String)],
    out: &mut HeaderMap,
) {
    for (k, v) in client {
        if !HOP_BY_HOP.contains(&k.as_str())
            && k != header::CONTENT_LENGTH
            && !crate::request::router_only(k.as_str())
        {
            out.append(k, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        out.insert("x-request-id", v);
    }
    for (k, v) in picked {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            out.insert(k, v);
        }
    }
}

async fn forward(
    s: &ProxyState,
    mut ticket: Ticket,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: Bytes,
    request_id: &str,
) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut next = 0usize;
    loop {
        let dest = ticket.destinations()[next];
        let span = tracing::span!(
            target: OTEL_TARGET,
            tracing::Level::TRACE,
            "forward",
            otel.kind = "client",
            server.address = %dest,
        );
        let mut req = http::Request::post(format!("http://{dest}{path}"));
        let h = req.headers_mut().expect("builder without errors");
        upstream_headers(headers, request_id, ticket.extra_headers(), h);
        // The pod continues the trace from this attempt's span.
        crate::telemetry::inject(&span, h);
        let req = req
            .body(Full::new(body.clone()))
            .expect("valid request parts");
        let send =
            tokio::time::timeout(s.cfg.response_timeout, s.client.request(req)).instrument(span);
        let sent = match ticket.revoked() {
            // In-flight eviction before the pod answered: 429 `evicted`, upstream dropped.
            Some(revoked) => tokio::select! {
                r = send => r,
                () = revoked => {
                    let r = Rejection::Flow(infermesh_scheduler::flow::DropReason::Evicted);
                    ticket.finish(Some(dest), r.outcome(), None);
                    return error_response(&r, request_id);
                }
            },
            None => send.await,
        };
        match sent {
            Err(_) => {
                let r = Rejection::Timeout {
                    endpoint: dest,
                    timeout: s.cfg.response_timeout,
                };
                ticket.finish(Some(dest), r.outcome(), None);
                return error_response(&r, request_id);
            }
            Ok(Ok(resp)) => return respond(resp, ticket, dest, request_id).await,
            Ok(Err(e)) if e.is_connect() => {
                tracing::warn!(request_id, endpoint = %dest, error = %e, "cannot connect to endpoint, trying another");
                if let Some(slot) = s.dispatcher.pool().load().slot(dest) {
                    slot.mark_down(); // until its scraper reaches it again
                }
                tried.push(dest);
                if tried.len() >= s.cfg.max_attempts {
                    return unreachable(ticket, &tried, request_id);
                }
                s.dispatcher.metrics().retries.inc();
                next += 1;
                if let Some(&fallback) = ticket.destinations().get(next) {
                    ticket.retarget(fallback);
                } else {
                    if ticket.reschedule(&tried).is_err() {
                        return unreachable(ticket, &tried, request_id);
                    }
                    next = 0;
                }
            }
            Ok(Err(e)) => {
                let r = Rejection::Upstream {
                    endpoint: dest,
                    reason: e.to_string(),
                };
                ticket.finish(Some(dest), r.outcome(), None);
                return error_response(&r, request_id);
            }
        }
    }
}

fn unreachable(ticket: Ticket, tried: &[SocketAddr], request_id: &str) -> Response {
    let r = Rejection::Unreachable {
        tried: tried.to_vec(),
    };
    ticket.finish(tried.last().copied(), r.outcome(), None);
    error_response(&r, request_id)
}

async fn respond(
    resp: http::Response<hyper::body::Incoming>,
    ticket: Ticket,
    served: SocketAddr,
    request_id: &str,
) -> Response {
    let (mut parts, mut incoming) = resp.into_parts();
    // A request that may still be evicted holds the pod's headers until its first body
    // frame: evicted while the pod prefills, the client gets 429 `evicted`, which it can
    // act on, instead of a 200 whose stream breaks off before any token.
    let mut first = None;
    if parts.status.is_success()
        && !incoming.is_end_stream()
        && let Some(revoked) = ticket.revoked()
    {
        tokio::select! {
            frame = incoming.frame() => first = frame,
            () = revoked => {
                let r = Rejection::Flow(infermesh_scheduler::flow::DropReason::Evicted);
                ticket.finish(Some(served), r.outcome(), None);
                return error_response(&r, request_id);
            }
        }
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    for h in HOP_BY_HOP {
        parts.headers.remove(h);
    }
    if let Ok(v) = HeaderValue::from_str(&served.to_string()) {
        // The proxy is its own gateway: the endpoint it forwarded to is the served one,
        // which a destination-endpoint-served-verifier also reports (GIE conformance).
        if ticket.echoes_served_endpoint() {
            parts
                .headers
                .insert(crate::extproc::stream::CONFORMANCE_SERVED_HEADER, v.clone());
        }
        parts.headers.insert(SERVED_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        parts.headers.insert("x-request-id", v);
    }
    if ticket.model_restore().is_some() {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    for (k, v) in ticket.response_headers() {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            parts.headers.insert(k, v);
        }
    }
    let success = parts.status.is_success();
    let body = TrackedBody::new(
        incoming,
        first,
        ticket,
        content_type.as_deref(),
        served,
        success,
    );
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_never_see_router_only_headers_from_the_client() {
        let mut client = HeaderMap::new();
        client.insert(
            "x-prefiller-host-port",
            HeaderValue::from_static("169.254.169.254:80"),
        );
        client.insert(
            "x-encoder-hosts-ports",
            HeaderValue::from_static("10.0.0.1:1"),
        );
        client.insert(
            "x-gateway-destination-endpoint",
            HeaderValue::from_static("1.2.3.4:5"),
        );
        client.insert("content-type", HeaderValue::from_static("application/json"));
        client.insert("connection", HeaderValue::from_static("keep-alive"));
        let picked = vec![(
            "x-prefiller-host-port".to_owned(),
            "10.0.0.7:8000".to_owned(),
        )];
        let mut out = HeaderMap::new();
        upstream_headers(&client, "r-1", &picked, &mut out);
        let all =
            |k: &str| -> Vec<&str> { out.get_all(k).iter().map(|v| v.to_str().unwrap()).collect() };
        assert_eq!(all("x-prefiller-host-port"), ["10.0.0.7:8000"]);
        assert!(all("x-encoder-hosts-ports").is_empty());
        assert!(all("x-gateway-destination-endpoint").is_empty());
        assert!(all("connection").is_empty());
        assert_eq!(all("content-type"), ["application/json"]);
        assert_eq!(all("x-request-id"), ["r-1"]);
    }
}
