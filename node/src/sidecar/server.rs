//! The sidecar's HTTP side: reads the router headers, checks them against the allowlist,
//! sends the request's images to the named encoders, runs the prefill step on the named
//! pod (each with bounded retries and timeouts) and the decode step on the local engine,
//! whose answer streams straight back to the client.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};

use super::allowlist::{Allowlist, NotInPool};
use super::rewrite::{
    self, ENCODE_PATH, ENCODERS_HEADER, InvalidEncodeResponse, InvalidPrefillResponse,
    InvalidRequest, KV_SOURCE_HEADER, KvConnector, PREFILLER_HEADER,
};
use super::{SidecarConfig, StageTls, TlsStage};
use crate::proxy::HOP_BY_HOP;
use crate::request::{REQUEST_ID_HEADER, router_only};

/// How the sidecar reaches one stage: a pooled client, speaking TLS or not.
#[derive(Debug, Clone)]
enum Link {
    /// Plain HTTP.
    Plain(Client<HttpConnector, Body>),
    /// HTTPS, verifying as the stage's TLS setting says.
    Tls(Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>),
}

impl Link {
    fn new(tls: StageTls, connect_timeout: Duration) -> Result<Link, crate::upstream::PodTlsError> {
        let skip_verify = match tls {
            StageTls::Plain => {
                return Ok(Link::Plain(crate::upstream::pooled_client(connect_timeout)));
            }
            StageTls::Verified => false,
            StageTls::Unverified => true,
        };
        let cfg = crate::upstream::pod_tls_config(skip_verify)?;
        Ok(Link::Tls(crate::upstream::https_client_with(
            cfg,
            connect_timeout,
        )))
    }

    fn scheme(&self) -> &'static str {
        match self {
            Link::Plain(_) => "http",
            Link::Tls(_) => "https",
        }
    }

    fn request(&self, req: http::Request<Body>) -> ResponseFuture {
        match self {
            Link::Plain(c) => c.request(req),
            Link::Tls(c) => c.request(req),
        }
    }
}

/// Why a request was not served; each maps to one status and a JSON body.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The body or a router header is malformed; nothing was sent.
    #[error("{0}")]
    BadRequest(#[from] InvalidRequest),
    /// The body is larger than `--max-body-bytes`; nothing was sent.
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client's body broke off; nothing was sent.
    #[error("cannot read the request body: {0}")]
    UnreadableBody(String),
    /// A header named a pod outside the pool; nothing was sent to it.
    #[error("refused: {0}")]
    NotInPool(#[from] NotInPool),
    /// Every prefill attempt failed (transport error, timeout or 5xx); no decode was sent.
    #[error("prefill on {prefiller} failed after {attempts} attempt(s); last error: {last}")]
    PrefillFailed {
        /// The prefill pod.
        prefiller: SocketAddr,
        /// Attempts made.
        attempts: u32,
        /// What the last attempt ended with.
        last: String,
    },
    /// The prefiller refused the request (4xx); its answer goes to the client as is.
    #[error("prefill on {prefiller} answered {status}")]
    PrefillRejected {
        /// The prefill pod.
        prefiller: SocketAddr,
        /// Its status.
        status: StatusCode,
        /// Its body.
        body: Bytes,
    },
    /// The prefiller's 2xx answer is unusable; no decode was sent.
    #[error("prefill on {prefiller}: {source}")]
    BadPrefillAnswer {
        /// The prefill pod.
        prefiller: SocketAddr,
        /// What is wrong with it.
        source: InvalidPrefillResponse,
    },
    /// Every attempt to encode an item failed (transport error, timeout or 5xx); no
    /// prefill or decode was sent.
    #[error(
        "encode of multimodal item {item} on encoder {encoder} failed after {attempts} attempt(s); last error: {last}"
    )]
    EncodeFailed {
        /// The encode pod.
        encoder: SocketAddr,
        /// 0-based index of the item among the request's multimodal parts.
        item: usize,
        /// Attempts made.
        attempts: u32,
        /// What the last attempt ended with.
        last: String,
    },
    /// An encoder refused an item (4xx); its answer goes to the client as is.
    #[error("encode on {encoder} answered {status}")]
    EncodeRejected {
        /// The encode pod.
        encoder: SocketAddr,
        /// Its status.
        status: StatusCode,
        /// Its body.
        body: Bytes,
    },
    /// An encoder's 2xx answer does not say where its output is; nothing more was sent.
    #[error("encode on {encoder}: {source}")]
    BadEncodeAnswer {
        /// The encode pod.
        encoder: SocketAddr,
        /// What is wrong with it.
        source: InvalidEncodeResponse,
    },
    /// The local engine could not be reached or broke off before answering.
    #[error("the local model server {addr} cannot be reached: {reason}")]
    LocalEngine {
        /// The engine.
        addr: SocketAddr,
        /// The transport error.
        reason: String,
    },
    /// The local engine sent no response headers in time.
    #[error("the local model server {addr} did not answer within {timeout:?}")]
    LocalTimeout {
        /// The engine.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
}

impl Refusal {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) | Refusal::UnreadableBody(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::NotInPool(_) => StatusCode::FORBIDDEN,
            Refusal::PrefillRejected { status, .. } | Refusal::EncodeRejected { status, .. } => {
                *status
            }
            Refusal::PrefillFailed { .. }
            | Refusal::BadPrefillAnswer { .. }
            | Refusal::EncodeFailed { .. }
            | Refusal::BadEncodeAnswer { .. }
            | Refusal::LocalEngine { .. } => StatusCode::BAD_GATEWAY,
            Refusal::LocalTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The client's response: an OpenAI-style JSON error (a prefiller's own 4xx verbatim).
    pub fn into_response(self, request_id: &str) -> Response {
        let status = self.status();
        let body = match self {
            Refusal::PrefillRejected { body, .. } | Refusal::EncodeRejected { body, .. } => body,
            other => {
                let kind = match status {
                    StatusCode::BAD_REQUEST => "BadRequestError",
                    StatusCode::FORBIDDEN => "PermissionDeniedError",
                    StatusCode::PAYLOAD_TOO_LARGE => "RequestTooLargeError",
                    StatusCode::GATEWAY_TIMEOUT => "GatewayTimeoutError",
                    _ => "BadGatewayError",
                };
                Bytes::from(
                    serde_json::json!({"error": {
                        "message": other.to_string(), "type": kind, "code": status.as_u16()
                    }})
                    .to_string(),
                )
            }
        };
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert(REQUEST_ID_HEADER, v);
        }
        resp
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct SidecarState {
    prefiller: Link,
    decoder: Link,
    encoder: Link,
    allow: Arc<ArcSwap<Allowlist>>,
    model_server: SocketAddr,
    connector: KvConnector,
    max_retries: u32,
    backoff: Duration,
    prefill_timeout: Duration,
    response_timeout: Duration,
    max_body_bytes: usize,
    p2p_port: u16,
    self_addr: Option<SocketAddr>,
}

impl SidecarState {
    /// The state for `cfg`, checking addresses against `allow` (swapped on reloads); fails
    /// when a stage to be verified has no trust roots.
    pub fn new(
        cfg: &SidecarConfig,
        allow: Arc<ArcSwap<Allowlist>>,
    ) -> Result<SidecarState, crate::upstream::PodTlsError> {
        Ok(SidecarState {
            prefiller: Link::new(cfg.tls.prefiller, cfg.connect_timeout)?,
            decoder: Link::new(cfg.tls.decoder, cfg.connect_timeout)?,
            encoder: Link::new(cfg.tls.encoder, cfg.connect_timeout)?,
            allow,
            model_server: cfg.model_server,
            connector: cfg.connector,
            max_retries: cfg.prefill_max_retries,
            backoff: cfg.prefill_retry_backoff,
            prefill_timeout: cfg.prefill_timeout,
            response_timeout: cfg.response_timeout,
            max_body_bytes: cfg.max_body_bytes,
            p2p_port: cfg.p2p_connector_port,
            self_addr: cfg
                .pod_ip
                .map(|ip: IpAddr| SocketAddr::new(ip, cfg.listen.port())),
        })
    }
}

/// The sidecar's routes: every method and path goes through [`handle`].
pub fn router(state: SidecarState) -> Router {
    Router::new().fallback(handle).with_state(Arc::new(state))
}

/// A fresh random id (v4 UUID) for a request or a KV pull.
fn fresh_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

async fn handle(State(s): State<Arc<SidecarState>>, req: Request) -> Response {
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map_or_else(fresh_id, str::to_owned);
    match route(&s, req, &request_id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(request_id, error = %e, "sidecar refused a request");
            e.into_response(&request_id)
        }
    }
}

/// The text of router header `name`, if it is present.
fn header_text<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<Option<&'h str>, InvalidRequest> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| InvalidRequest::BadAddress {
                header: name,
                value: String::from_utf8_lossy(v.as_bytes()).into_owned(),
            })
        })
        .transpose()
}

/// The addresses a router header lists (comma-separated), if it is present.
fn addresses(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<Vec<SocketAddr>>, InvalidRequest> {
    header_text(headers, name)?
        .map(|text| rewrite::parse_addresses(name, text))
        .transpose()
}

/// The address a router header names, if it is present.
fn address(headers: &HeaderMap, name: &'static str) -> Result<Option<SocketAddr>, InvalidRequest> {
    header_text(headers, name)?
        .map(|text| rewrite::parse_address(name, text))
        .transpose()
}

async fn route(s: &SidecarState, req: Request, request_id: &str) -> Result<Response, Refusal> {
    let prefiller = address(req.headers(), PREFILLER_HEADER)?;
    let source = address(req.headers(), KV_SOURCE_HEADER)?;
    let encoders = addresses(req.headers(), ENCODERS_HEADER)?;
    let (parts, body) = req.into_parts();
    if (prefiller.is_none() && source.is_none() && encoders.is_none())
        || parts.method != Method::POST
    {
        return s.to_engine(&parts, Body::new(body), request_id).await;
    }
    // Before the body is read or anything is sent: a refused address is never contacted.
    let allow = s.allow.load();
    if let Some(p) = prefiller {
        allow.check(PREFILLER_HEADER, p)?;
    }
    if let Some(src) = source {
        allow.check(KV_SOURCE_HEADER, src)?;
    }
    for &e in encoders.iter().flatten() {
        allow.check(ENCODERS_HEADER, e)?;
    }
    let bytes = match Limited::new(body, s.max_body_bytes).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Refusal::TooLarge {
                limit: s.max_body_bytes,
            });
        }
        Err(e) => return Err(Refusal::UnreadableBody(e.to_string())),
    };
    // A client's own encoder handles never reach an engine; ours replace them.
    let mut client = rewrite::without_ec_params(&rewrite::parse_body(&bytes)?);
    if let Some(encoders) = &encoders {
        let items = rewrite::mm_items(&client);
        if !items.is_empty() {
            let outputs = s.encode(encoders, &items, &client, request_id).await?;
            client = rewrite::with_encoder_outputs(&client, outputs);
        }
    }
    // Nothing to pull from oneself: the prefiller (or this pod) computes that prefix anyway.
    let source = source.filter(|src| Some(*src) != prefiller && Some(*src) != s.self_addr);
    let pull = source.map(|src| rewrite::kv_source_params(src, s.p2p_port, &fresh_id()));
    let Some(prefiller) = prefiller else {
        let body = match pull {
            Some(p) => rewrite::decode_with_kv_source(&client, p),
            None => rewrite::without_kv_params(&client),
        };
        return s.decode(&parts, &body, request_id).await;
    };
    match s.connector {
        KvConnector::Nixlv2 => {
            let prefill = rewrite::nixl_prefill(&client, pull);
            let answer = s.prefill(prefiller, &parts, &prefill, request_id).await?;
            let params = rewrite::prefill_params(&answer)
                .map_err(|source| Refusal::BadPrefillAnswer { prefiller, source })?;
            if params.is_none() {
                // llm-d decodes anyway: the engine then computes the prompt itself.
                tracing::warn!(request_id, %prefiller, "prefill answer has no kv_transfer_params; decoding without them");
            }
            s.decode(&parts, &rewrite::nixl_decode(&client, params), request_id)
                .await
        }
        KvConnector::SharedStorage => {
            let prefill = rewrite::shared_storage_prefill(&client);
            s.prefill(prefiller, &parts, &prefill, request_id).await?;
            s.decode(&parts, &rewrite::shared_storage_decode(&client), request_id)
                .await
        }
        KvConnector::Sglang => {
            // Both at once: SGLang's prefill waits at its bootstrap server for the decoder,
            // so a prefill sent first would hold until it timed out. One attempt only; the
            // decoder has already joined the room, a retry would need a new one.
            let room = rand::random::<i64>() & i64::MAX;
            let (prefill, decode) = rewrite::sglang_pair(&client, prefiller, room);
            let prefill = Bytes::from(rewrite::to_bytes(&prefill));
            let headers = engine_headers(&parts.headers, request_id);
            let (link, path, timeout) = (
                s.prefiller.clone(),
                path_of(&parts).to_owned(),
                s.prefill_timeout,
            );
            let rid = request_id.to_owned();
            tokio::spawn(async move {
                let r = prefill_once(&link, prefiller, &path, &headers, prefill, timeout).await;
                match r {
                    Ok((st, _)) if st.is_success() => {}
                    Ok((st, body)) => {
                        tracing::warn!(request_id = rid, %prefiller, status = %st, body = %snippet(&body), "SGLang prefill failed")
                    }
                    Err(e) => {
                        tracing::warn!(request_id = rid, %prefiller, error = e, "SGLang prefill failed")
                    }
                }
            });
            s.decode(&parts, &decode, request_id).await
        }
    }
}

fn path_of(parts: &Parts) -> &str {
    parts.uri.path_and_query().map_or("/", |p| p.as_str())
}

/// The headers an engine gets: the client's minus hop-by-hop ones, the length (bodies are
/// rewritten) and the router's headers (they are for this sidecar alone), plus the id.
fn engine_headers(client: &HeaderMap, request_id: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in client {
        if !HOP_BY_HOP.contains(&k.as_str())
            && k != header::CONTENT_LENGTH
            && !router_only(k.as_str())
        {
            out.append(k, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        out.insert(REQUEST_ID_HEADER, v);
    }
    out
}

/// An error and its causes on one line (hyper's own message alone says "client error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The start of an error body, for messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.trim().to_owned()
}

fn build(
    method: Method,
    scheme: &str,
    addr: SocketAddr,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> http::Request<Body> {
    let mut req = http::Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = format!("{scheme}://{addr}{path}")
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    *req.headers_mut() = headers.clone();
    req
}

/// One prefill attempt, bounded as a whole (connect, headers and body) by `timeout`.
async fn prefill_once(
    link: &Link,
    prefiller: SocketAddr,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let attempt = async {
        let req = build(
            Method::POST,
            link.scheme(),
            prefiller,
            path,
            headers,
            Body::from(body),
        );
        let resp = link.request(req).await.map_err(|e| error_chain(&e))?;
        let status = resp.status();
        // A prefill answer is one token of JSON; anything huge is not one.
        let body = Limited::new(resp.into_body(), 16 << 20)
            .collect()
            .await
            .map_err(|e| format!("the answer broke off: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no complete answer within {timeout:?}")),
    }
}

/// How a request to another pod, retried, ended.
enum Retried {
    /// A 2xx answer's body.
    Answer(Bytes),
    /// A 4xx answer: the pod refused the request itself, so it is not retried.
    Refused(StatusCode, Bytes),
    /// Every attempt failed (transport error, timeout or 5xx).
    Failed {
        /// Attempts made.
        attempts: u32,
        /// What the last attempt ended with.
        last: String,
    },
}

impl SidecarState {
    /// POSTs `body` to `target`, retrying transport errors, timeouts and 5xx up to
    /// `--prefill-max-retries` times (encoders share the prefill flags: llm-d has no
    /// encoder-specific ones).
    async fn post_retrying(
        &self,
        to: TlsStage,
        target: SocketAddr,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        request_id: &str,
    ) -> Retried {
        let (link, stage) = match to {
            TlsStage::Prefiller => (&self.prefiller, "prefill"),
            TlsStage::Encoder => (&self.encoder, "encode"),
            TlsStage::Decoder => (&self.decoder, "decode"),
        };
        let attempts = self.max_retries.saturating_add(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(self.backoff).await;
            }
            match prefill_once(
                link,
                target,
                path,
                headers,
                body.clone(),
                self.prefill_timeout,
            )
            .await
            {
                Ok((status, answer)) if status.is_success() => return Retried::Answer(answer),
                Ok((status, answer)) if status.is_server_error() => {
                    last = format!("status {status}: {}", snippet(&answer));
                }
                Ok((status, body)) => return Retried::Refused(status, body),
                Err(e) => last = e,
            }
            tracing::warn!(request_id, stage, %target, attempt, attempts, error = %last, "attempt failed");
        }
        Retried::Failed { attempts, last }
    }

    /// Runs the prefill on `prefiller`, retrying transport errors, timeouts and 5xx.
    async fn prefill(
        &self,
        prefiller: SocketAddr,
        parts: &Parts,
        body: &rewrite::Body,
        request_id: &str,
    ) -> Result<Bytes, Refusal> {
        let bytes = Bytes::from(rewrite::to_bytes(body));
        let headers = engine_headers(&parts.headers, request_id);
        let path = path_of(parts);
        match self
            .post_retrying(
                TlsStage::Prefiller,
                prefiller,
                path,
                &headers,
                bytes,
                request_id,
            )
            .await
        {
            Retried::Answer(a) => Ok(a),
            Retried::Refused(status, body) => Err(Refusal::PrefillRejected {
                prefiller,
                status,
                body,
            }),
            Retried::Failed { attempts, last } => Err(Refusal::PrefillFailed {
                prefiller,
                attempts,
                last,
            }),
        }
    }

    /// Sends each multimodal item to an encoder, all at once, item `i` to encoder
    /// `i mod n` (llm-d's spread), and returns each encoder's `ec_transfer_params` in item
    /// order. The first item that cannot be encoded fails the request.
    async fn encode(
        &self,
        encoders: &[SocketAddr],
        items: &[serde_json::Value],
        client: &rewrite::Body,
        request_id: &str,
    ) -> Result<Vec<serde_json::Value>, Refusal> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let calls = items.iter().enumerate().map(|(i, item)| {
            let encoder = encoders[i % encoders.len()];
            let body = Bytes::from(rewrite::to_bytes(&rewrite::encoder_request(client, item)));
            // Each item is its own request to the encoder, with a derived id as llm-d does.
            let mut headers = headers.clone();
            let id = format!("{request_id}-enc-{i}");
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID_HEADER, v);
            }
            async move {
                let r = self
                    .post_retrying(TlsStage::Encoder, encoder, ENCODE_PATH, &headers, body, &id)
                    .await;
                match r {
                    Retried::Answer(a) => rewrite::encoder_params(&a)
                        .map_err(|source| Refusal::BadEncodeAnswer { encoder, source }),
                    Retried::Refused(status, body) => Err(Refusal::EncodeRejected {
                        encoder,
                        status,
                        body,
                    }),
                    Retried::Failed { attempts, last } => Err(Refusal::EncodeFailed {
                        encoder,
                        item: i,
                        attempts,
                        last,
                    }),
                }
            }
        });
        futures::future::try_join_all(calls).await
    }

    /// Sends the decode request to the local engine; its answer streams through.
    async fn decode(
        &self,
        parts: &Parts,
        body: &rewrite::Body,
        request_id: &str,
    ) -> Result<Response, Refusal> {
        let mut headers = engine_headers(&parts.headers, request_id);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let req = build(
            Method::POST,
            self.decoder.scheme(),
            self.model_server,
            path_of(parts),
            &headers,
            Body::from(rewrite::to_bytes(body)),
        );
        self.send_local(req).await
    }

    /// Forwards a request to the local engine as it came (its body streamed, not read).
    async fn to_engine(
        &self,
        parts: &Parts,
        body: Body,
        request_id: &str,
    ) -> Result<Response, Refusal> {
        let mut headers = engine_headers(&parts.headers, request_id);
        // The body is unchanged, so its length still holds (engine_headers drops it).
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
            headers.insert(header::CONTENT_LENGTH, len.clone());
        }
        let req = build(
            parts.method.clone(),
            self.decoder.scheme(),
            self.model_server,
            path_of(parts),
            &headers,
            body,
        );
        self.send_local(req).await
    }

    async fn send_local(&self, req: http::Request<Body>) -> Result<Response, Refusal> {
        let addr = self.model_server;
        let resp =
            match tokio::time::timeout(self.response_timeout, self.decoder.request(req)).await {
                Err(_) => {
                    return Err(Refusal::LocalTimeout {
                        addr,
                        timeout: self.response_timeout,
                    });
                }
                Ok(Err(e)) => {
                    return Err(Refusal::LocalEngine {
                        addr,
                        reason: error_chain(&e),
                    });
                }
                Ok(Ok(r)) => r,
            };
        let (mut parts, incoming) = resp.into_parts();
        for h in HOP_BY_HOP {
            parts.headers.remove(h);
        }
        // Frames go out as they arrive: SSE is never buffered here.
        Ok(Response::from_parts(parts, Body::new(incoming)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_never_see_router_headers_or_hop_by_hop_ones() {
        let mut client = HeaderMap::new();
        client.insert(PREFILLER_HEADER, HeaderValue::from_static("10.0.0.1:1"));
        client.insert(KV_SOURCE_HEADER, HeaderValue::from_static("10.0.0.2:2"));
        client.insert(ENCODERS_HEADER, HeaderValue::from_static("10.0.0.3:3"));
        client.insert("connection", HeaderValue::from_static("close"));
        client.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        client.insert("authorization", HeaderValue::from_static("Bearer t"));
        let out = engine_headers(&client, "r-1");
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(out["authorization"], "Bearer t");
        assert_eq!(out[REQUEST_ID_HEADER], "r-1");
    }

    #[test]
    fn refusals_map_to_statuses_and_name_the_problem() {
        let p: SocketAddr = "10.0.0.7:8000".parse().unwrap();
        let cases = [
            (
                Refusal::PrefillFailed {
                    prefiller: p,
                    attempts: 3,
                    last: "connection refused".into(),
                },
                502,
                "10.0.0.7:8000",
            ),
            (
                Refusal::NotInPool(NotInPool {
                    addr: p,
                    header: PREFILLER_HEADER,
                    pool: "llama".into(),
                }),
                403,
                "not a pod of inference pool",
            ),
            (
                Refusal::BadRequest(InvalidRequest::NotObject),
                400,
                "JSON object",
            ),
        ];
        for (r, status, needle) in cases {
            assert_eq!(r.status().as_u16(), status);
            let msg = r.to_string();
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn a_header_that_is_not_one_address_is_a_bad_request() {
        let mut h = HeaderMap::new();
        assert_eq!(address(&h, PREFILLER_HEADER), Ok(None));
        h.insert(PREFILLER_HEADER, HeaderValue::from_static("pod-0:8000"));
        assert!(address(&h, PREFILLER_HEADER).is_err());
        h.insert(
            PREFILLER_HEADER,
            HeaderValue::from_bytes(b"\xff:1").unwrap(),
        );
        assert!(address(&h, PREFILLER_HEADER).is_err());
    }
}
