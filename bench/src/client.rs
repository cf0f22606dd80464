//! The HTTP side: one pooled hyper-util client, streamed completions timed chunk by
//! chunk, and metric scrapes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::scrape::ScrapeError;
use crate::sse::{SseDecoder, parse_chunk};

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// A pooled HTTP/1.1 client shared by every request of a run.
#[derive(Clone)]
pub(crate) struct HttpClient {
    inner: Client<HttpConnector, Body>,
}

/// Timings of one successful streamed request, in seconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Success {
    /// To the first SSE chunk carrying content.
    pub ttft: f64,
    /// Gaps between successive content chunks.
    pub itls: Vec<f64>,
    /// To the end of the stream.
    pub e2e: f64,
    /// `usage.completion_tokens`, else the number of content chunks.
    pub output_tokens: u64,
    /// `usage.prompt_tokens`, when reported.
    pub prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`, when reported.
    pub cached_tokens: Option<u64>,
}

/// Why a request did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Connecting or sending failed.
    Connect,
    /// A non-200 status (429 is counted apart in reports).
    Status(u16),
    /// No complete answer within the request timeout.
    Timeout,
    /// The stream broke or ended without `[DONE]`.
    Stream,
    /// The stream finished without any content.
    NoContent,
    /// Still in flight when the drain timeout ended the run.
    Unfinished,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureKind::Status(s) => write!(f, "status_{s}"),
            other => write!(
                f,
                "{}",
                serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        }
    }
}

impl HttpClient {
    pub(crate) fn new() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build(conn);
        HttpClient { inner }
    }

    /// GETs `uri` and returns the body as text.
    pub(crate) async fn get_text(
        &self,
        uri: Uri,
        timeout: Duration,
    ) -> Result<String, ScrapeError> {
        let fut = async {
            let req = Request::get(uri)
                .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
                .map_err(|e| ScrapeError::Http(e.to_string()))?;
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| ScrapeError::Http(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ScrapeError::Http(e.to_string()))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(ScrapeError::Status(status.as_u16()));
            }
            String::from_utf8(body.to_vec()).map_err(|_| ScrapeError::NotText)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or(Err(ScrapeError::Timeout))
    }

    /// POSTs a streaming completion (with `headers` added) and times its chunks.
    pub(crate) async fn stream(
        &self,
        uri: Uri,
        body: Bytes,
        headers: &[(http::HeaderName, http::HeaderValue)],
        timeout: Duration,
    ) -> Result<Success, FailureKind> {
        let start = Instant::now();
        match tokio::time::timeout(timeout, self.stream_inner(uri, body, headers, start)).await {
            Ok(r) => r,
            Err(_) => Err(FailureKind::Timeout),
        }
    }

    async fn stream_inner(
        &self,
        uri: Uri,
        body: Bytes,
        headers: &[(http::HeaderName, http::HeaderValue)],
        start: Instant,
    ) -> Result<Success, FailureKind> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream")
            .body(Full::new(body).map_err(|e| match e {}).boxed())
            .map_err(|_| FailureKind::Connect)?;
        for (k, v) in headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let resp = self
            .inner
            .request(req)
            .await
            .map_err(|_| FailureKind::Connect)?;
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            // Drain so the connection goes back to the pool.
            let _ = body.collect().await;
            return Err(FailureKind::Status(status.as_u16()));
        }
        let mut decoder = SseDecoder::default();
        let mut out = Success::default();
        let mut first: Option<Instant> = None;
        let mut last = start;
        let mut content_chunks = 0u64;
        let mut done = false;
        let mut usage_tokens = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| FailureKind::Stream)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            decoder.push(&data, |payload| {
                if payload.trim() == "[DONE]" {
                    done = true;
                    return;
                }
                let Some(chunk) = parse_chunk(payload) else {
                    return;
                };
                if chunk.content_chars > 0 {
                    content_chunks += 1;
                    match first {
                        None => {
                            first = Some(now);
                            out.ttft = (now - start).as_secs_f64();
                        }
                        Some(_) => out.itls.push((now - last).as_secs_f64()),
                    }
                    last = now;
                }
                if chunk.completion_tokens.is_some() {
                    usage_tokens = chunk.completion_tokens;
                    out.prompt_tokens = chunk.prompt_tokens;
                    out.cached_tokens = chunk.cached_tokens;
                }
            });
        }
        out.e2e = start.elapsed().as_secs_f64();
        if !done {
            return Err(FailureKind::Stream);
        }
        if first.is_none() {
            return Err(FailureKind::NoContent);
        }
        out.output_tokens = usage_tokens.unwrap_or(content_chunks);
        Ok(out)
    }
}

/// What happened to one sent request.
#[derive(Debug)]
pub(crate) struct Record {
    /// Index of the request in the plan.
    pub index: usize,
    /// Index of the URL it went to.
    pub target: usize,
    /// Seconds from the run start to the send.
    pub sent_at: f64,
    /// Seconds from the run start to the end (success or failure).
    pub done_at: f64,
    /// Timings or the failure.
    pub result: Result<Success, FailureKind>,
}
