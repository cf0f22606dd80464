//! Why a request was answered by the node itself: one typed enum, one status and outcome
//! per variant, one JSON error body. The proxy turns it into an HTTP response
//! ([`Rejection::to_http`]) and the ext_proc edge into an ImmediateResponse from the same
//! status and body.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use infermesh_scheduler::flow::{DROPPED_REASON_HEADER, DropReason};
use infermesh_scheduler::{InvalidRequest, NoParser, Rejected};

use crate::metrics::Outcome;

/// Why no endpoint was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoEndpoint {
    /// Every endpoint is stale, down or excluded.
    #[error("no ready endpoint in the pool")]
    Pool,
    /// None of the gateway's subset hint is ready.
    #[error("no ready endpoint in the gateway's subset hint")]
    Subset,
    /// A retry found no endpoint it had not tried.
    #[error("no other ready endpoint to retry on")]
    Retry,
    /// The scheduler's filters left nothing.
    #[error("no ready endpoint passed the scheduler's filters")]
    Filtered,
}

/// Why a request was answered by the node instead of a model server.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// 413: the body is over the limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// `maxBodyBytes` in force.
        limit: usize,
    },
    /// 400: the body could not be read off the connection.
    #[error("cannot read the request body: {0}")]
    UnreadableBody(String),
    /// 400: the body is not a valid request for its path.
    #[error(transparent)]
    BadRequest(#[from] InvalidRequest),
    /// 400: no configured request parser takes the path (`requestHandler.parsers` without
    /// `passthrough-parser`); llm-d answers the same.
    #[error(transparent)]
    NoParser(#[from] NoParser),
    /// 404: the pool does not serve the model.
    #[error("model {model:?} is not served by this pool (served: {served})")]
    UnknownModel {
        /// The model the client asked for.
        model: String,
        /// The pool's models, comma-separated.
        served: String,
    },
    /// 404: an InferenceModelRewrite sends the model to one the pool does not serve.
    #[error(
        "model {model:?} is rewritten to {target:?}, which is not served by this pool (served: {served})"
    )]
    RewriteTargetNotServed {
        /// The model the client asked for.
        model: String,
        /// The rewrite's target.
        target: String,
        /// The pool's models, comma-separated.
        served: String,
    },
    /// 503: nothing to schedule on.
    #[error("{0}")]
    NoEndpoint(NoEndpoint),
    /// 429: sheddable and the pool is saturated.
    #[error("{0}")]
    Shed(Rejected),
    /// 412: the client sent `Prefer: if-available` and the chosen decode endpoint holds
    /// none of the prompt's blocks (llm-d's conditional decode; its message).
    #[error("no decode worker has the requested KV cache")]
    DecodeCacheMiss,
    /// 429 or 503: flow control dropped the request (capacity, TTL, no endpoints);
    /// answered with `x-llm-d-request-dropped-reason`.
    #[error("request dropped by flow control: {}", .0.header_value())]
    Flow(DropReason),
    /// 504 (proxy): the model server did not send response headers in time.
    #[error("model server {endpoint} did not answer within {timeout:?}")]
    Timeout {
        /// The endpoint that was waited on.
        endpoint: SocketAddr,
        /// The response timeout.
        timeout: Duration,
    },
    /// 502 (proxy): no endpoint accepted a connection.
    #[error("no model server could be reached (tried {})", list(tried))]
    Unreachable {
        /// Endpoints tried, in order.
        tried: Vec<SocketAddr>,
    },
    /// 502 (proxy): the request to the model server failed after connecting.
    #[error("request to model server {endpoint} failed: {reason}")]
    Upstream {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The client error.
        reason: String,
    },
}

fn list(tried: &[SocketAddr]) -> String {
    let names: Vec<String> = tried.iter().map(ToString::to_string).collect();
    names.join(", ")
}

impl Rejection {
    /// The HTTP status the client gets.
    pub fn status(&self) -> u16 {
        match self {
            Rejection::TooLarge { .. } => 413,
            Rejection::UnreadableBody(_) | Rejection::BadRequest(_) | Rejection::NoParser(_) => 400,
            Rejection::UnknownModel { .. } | Rejection::RewriteTargetNotServed { .. } => 404,
            Rejection::NoEndpoint(_) => 503,
            Rejection::Shed(_) => 429,
            Rejection::DecodeCacheMiss => 412,
            Rejection::Flow(reason) => reason.status(),
            Rejection::Timeout { .. } => 504,
            Rejection::Unreachable { .. } | Rejection::Upstream { .. } => 502,
        }
    }

    /// The outcome counted in `infermesh_requests_total`.
    pub fn outcome(&self) -> Outcome {
        match self {
            Rejection::TooLarge { .. } => Outcome::TooLarge,
            Rejection::UnreadableBody(_) | Rejection::BadRequest(_) | Rejection::NoParser(_) => {
                Outcome::BadRequest
            }
            Rejection::UnknownModel { .. } | Rejection::RewriteTargetNotServed { .. } => {
                Outcome::UnknownModel
            }
            Rejection::NoEndpoint(_) => Outcome::NoEndpoint,
            Rejection::Shed(_) => Outcome::Shed,
            Rejection::DecodeCacheMiss => Outcome::CacheMiss,
            Rejection::Flow(reason) => match reason {
                DropReason::NoEndpoints => Outcome::NoEndpoint,
                DropReason::ContextCancelled => Outcome::Cancelled,
                DropReason::ShuttingDown | DropReason::Internal => Outcome::Internal,
                DropReason::Saturated
                | DropReason::TtlExpired
                | DropReason::EvictedPriority
                | DropReason::Evicted => Outcome::Shed,
            },
            Rejection::Timeout { .. } => Outcome::Timeout,
            Rejection::Unreachable { .. } => Outcome::UpstreamUnreachable,
            Rejection::Upstream { .. } => Outcome::UpstreamError,
        }
    }

    /// `(x-llm-d-request-dropped-reason, value)` when flow control dropped the request.
    pub fn dropped_reason(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Rejection::Flow(r) => Some((DROPPED_REASON_HEADER, r.header_value())),
            _ => None,
        }
    }

    /// The OpenAI-style JSON error body a client can read.
    pub fn json_body(&self) -> Vec<u8> {
        let kind = match self.status() {
            400 => "BadRequestError",
            404 => "NotFoundError",
            412 => "PreconditionFailedError",
            413 => "RequestTooLargeError",
            429 => "RateLimitError",
            503 => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        serde_json::to_vec(&serde_json::json!({
            "error": {"message": self.to_string(), "type": kind, "code": self.status()}
        }))
        .expect("a JSON value always serializes")
    }

    /// The HTTP response: status, JSON body, `content-type` and `x-request-id`.
    pub fn to_http(&self, request_id: &str) -> http::Response<Bytes> {
        let mut resp = http::Response::new(Bytes::from(self.json_body()));
        *resp.status_mut() = http::StatusCode::from_u16(self.status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = http::HeaderValue::from_str(request_id) {
            h.insert(super::REQUEST_ID_HEADER, v);
        }
        if let Some((name, value)) = self.dropped_reason() {
            h.insert(name, http::HeaderValue::from_static(value));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_maps_to_one_status_outcome_and_readable_body() {
        let cases = [
            (Rejection::TooLarge { limit: 10 }, 413, Outcome::TooLarge),
            (
                Rejection::BadRequest(InvalidRequest::MissingModel),
                400,
                Outcome::BadRequest,
            ),
            (
                Rejection::UnknownModel {
                    model: "x".into(),
                    served: "m".into(),
                },
                404,
                Outcome::UnknownModel,
            ),
            (
                Rejection::NoEndpoint(NoEndpoint::Subset),
                503,
                Outcome::NoEndpoint,
            ),
            (
                Rejection::Shed(Rejected::Saturated { saturation: 1.5 }),
                429,
                Outcome::Shed,
            ),
            (Rejection::DecodeCacheMiss, 412, Outcome::CacheMiss),
            (
                Rejection::NoParser(NoParser {
                    path: "/tokenize".into(),
                    parsers: vec!["openai-parser".into()],
                }),
                400,
                Outcome::BadRequest,
            ),
        ];
        for (r, status, outcome) in cases {
            assert_eq!(r.dropped_reason(), None);
            assert_eq!((r.status(), r.outcome()), (status, outcome), "{r}");
            let resp = r.to_http("rid");
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()["x-request-id"], "rid");
            let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
            assert_eq!(body["error"]["message"], r.to_string());
            assert_eq!(body["error"]["code"], status);
        }
    }

    #[test]
    fn flow_control_drops_answer_as_llm_d_does() {
        for (reason, status, header) in [
            (DropReason::Saturated, 429, "rejected-saturated"),
            (DropReason::TtlExpired, 429, "rejected-ttl-expired"),
            (DropReason::NoEndpoints, 503, "rejected-no-endpoints"),
        ] {
            let r = Rejection::Flow(reason);
            let resp = r.to_http("rid");
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()["x-llm-d-request-dropped-reason"], header);
            let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
            assert_eq!(body["error"]["code"], status);
            assert!(body["error"]["message"].as_str().unwrap().contains(header));
        }
        assert_eq!(
            Rejection::Flow(DropReason::TtlExpired).outcome(),
            Outcome::Shed
        );
    }
}
