//! The ext_proc exchange in the machine's own terms: what Envoy sends ([`Inbound`]) and
//! what the machine answers ([`Reply`]). A leaf: the protobuf edge converts to and from
//! these types, the state machine reads and writes nothing else.

use std::collections::BTreeSet;
use std::net::SocketAddr;

/// How Envoy sends a body (Envoy's `ProcessingMode.BodySendMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// The body is not sent.
    None,
    /// Chunks as they arrive, each answered.
    Streamed,
    /// The whole body in one message.
    Buffered,
    /// As much as fits Envoy's buffer, in one message.
    BufferedPartial,
    /// Chunks both ways without per-chunk answers (the only mode GIE supports).
    FullDuplexStreamed,
    /// gRPC messages (not used by the EPP protocol).
    Grpc,
}

/// Body modes announced by Envoy's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    /// How the request body is sent.
    pub request: BodyMode,
    /// How the response body is sent.
    pub response: BodyMode,
}

/// Request headers: the text pairs, the path, the gateway's subset hint.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestHead {
    /// Every header (pseudo-headers included) as text.
    pub headers: Vec<(String, String)>,
    /// `:path` (`/` when absent).
    pub path: String,
    /// `envoy.lb.subset_hint`: `Some(empty)` when present but empty or unreadable.
    pub subset: Option<BTreeSet<SocketAddr>>,
    /// No body follows.
    pub end_of_stream: bool,
}

/// Response headers: status, content type, the endpoint that served.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseHead {
    /// `:status` (0 when absent).
    pub status: u16,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `envoy.lb` served endpoint, when Envoy reports it.
    pub served: Option<SocketAddr>,
    /// What `envoy.lb` says about the served endpoint, verbatim (for the conformance echo).
    pub served_metadata: ServedMetadata,
    /// No body follows.
    pub end_of_stream: bool,
}

/// What the response's `envoy.lb` metadata says about the endpoint that served the
/// request, as llm-d's `destination-endpoint-served-verifier` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ServedMetadata {
    /// No `envoy.lb` namespace.
    #[default]
    NoLbMetadata,
    /// `envoy.lb` without a string `x-gateway-destination-endpoint-served`.
    NoServedKey,
    /// The served value, verbatim.
    Value(String),
}

impl ServedMetadata {
    /// The `x-conformance-test-served-endpoint` value llm-d's verifier writes for it.
    pub fn conformance_header_value(&self) -> &str {
        match self {
            ServedMetadata::NoLbMetadata => "fail: missing envoy lb metadata",
            ServedMetadata::NoServedKey => "fail: missing destination endpoint served metadata",
            ServedMetadata::Value(v) => v,
        }
    }
}

/// A piece of a request or response body.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyChunk {
    /// The bytes.
    pub body: Vec<u8>,
    /// The last piece.
    pub end_of_stream: bool,
}

/// One message from Envoy, in the machine's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Request headers.
    RequestHeaders(RequestHead),
    /// A request body chunk.
    RequestBody(BodyChunk),
    /// Request trailers (the request has ended).
    RequestTrailers,
    /// Response headers.
    ResponseHeaders(ResponseHead),
    /// A response body chunk.
    ResponseBody(BodyChunk),
    /// Response trailers (the response has ended).
    ResponseTrailers,
}

/// A converted `ProcessingRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// Body modes, when this message announces them (normally the first).
    pub modes: Option<Modes>,
    /// The message.
    pub message: Message,
}

/// The exchange step a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Request headers.
    RequestHeaders,
    /// A request body chunk (or the buffered body).
    RequestBody,
    /// Request trailers.
    RequestTrailers,
    /// Response headers.
    ResponseHeaders,
    /// A response body chunk.
    ResponseBody,
    /// Response trailers.
    ResponseTrailers,
}

/// One answer to Envoy, in the EPP contract's terms; the edge turns it into protobuf.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Go on with this step unchanged.
    Continue(Step),
    /// The pick: headers to set (overwriting) and to remove, the route cache cleared, the
    /// destination also in `envoy.lb` dynamic metadata, and, in buffered mode, the body
    /// Envoy forwards instead of the client's.
    Route {
        /// Request headers, or the request body in buffered mode.
        step: Step,
        /// Headers to set.
        set: Vec<(String, String)>,
        /// Headers to remove.
        remove: Vec<String>,
        /// `x-gateway-destination-endpoint` for the `envoy.lb` metadata.
        destination: String,
        /// Scheduler scores for `envoy.lb` → `x-gateway-destination-endpoint-scores`
        /// (`--emit-endpoint-scores`); empty: the key is left out, as llm-d does.
        scores: Vec<(SocketAddr, f64)>,
        /// A replacement body (buffered mode only).
        body: Option<Vec<u8>>,
    },
    /// Response headers changed: set (overwriting) and removed.
    Mutate {
        /// Headers to set.
        set: Vec<(String, String)>,
        /// Headers to remove.
        remove: Vec<String>,
    },
    /// A body piece sent on in full-duplex mode.
    Chunk {
        /// A request (or else response) body piece.
        request: bool,
        /// The bytes.
        body: Vec<u8>,
        /// The last piece.
        end_of_stream: bool,
    },
    /// Answer the client at once, without a pod.
    Immediate {
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: Vec<(String, String)>,
        /// Response body.
        body: Vec<u8>,
        /// Why, for Envoy's logs.
        details: String,
    },
}
