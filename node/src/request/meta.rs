//! What the request path knows before the body: the gateway headers and the subset hint.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use infermesh_scheduler::model::DEFAULT_FAIRNESS_ID;

/// Header naming the InferenceObjective of a request (llm-d v0.10's name).
pub const OBJECTIVE_HEADER: &str = "x-llm-d-inference-objective";
/// The deprecated alias of [`OBJECTIVE_HEADER`], still read.
pub const OBJECTIVE_HEADER_ALIAS: &str = "x-gateway-inference-objective";
/// Header carrying the flow-control fairness id.
pub const FAIRNESS_HEADER: &str = "x-llm-d-inference-fairness-id";
/// The deprecated alias of [`FAIRNESS_HEADER`], still read.
pub const FAIRNESS_HEADER_ALIAS: &str = "x-gateway-inference-fairness-id";
/// Header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header (and `envoy.lb` metadata key) with the picked endpoints, primary first.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// Headers only the router may set: what a client sends under these names is dropped
/// before scheduling and never reaches a pod (a sidecar trusting a client-chosen
/// `x-prefiller-host-port` would fetch from wherever the client says).
pub const ROUTER_ONLY_HEADERS: [&str; 5] = [
    DESTINATION_HEADER,
    "x-gateway-destination-endpoint-served",
    "x-prefiller-host-port",
    "x-encoder-hosts-ports",
    "x-kv-cache-source-host-port",
];

/// Whether `name` (lower case) is one of [`ROUTER_ONLY_HEADERS`].
pub fn router_only(name: &str) -> bool {
    ROUTER_ONLY_HEADERS.contains(&name)
}

/// Request facts known before the body: id, headers, objective, fairness id, subset hint.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// `x-request-id`, or a generated UUID.
    pub request_id: String,
    /// All request headers with lower-case names (pseudo-headers excluded).
    pub headers: BTreeMap<String, String>,
    /// `x-llm-d-inference-objective` or its alias ("" when absent).
    pub objective: String,
    /// `x-llm-d-inference-fairness-id` or its alias (default `default-flow`).
    pub fairness_id: String,
    /// Endpoints the gateway allows (`envoy.lb.subset_hint`); `None` = no restriction.
    pub subset: Option<BTreeSet<SocketAddr>>,
    /// Router-only headers the client sent (dropped from `headers`), so the edge can
    /// remove them from what it forwards.
    pub stripped: Vec<&'static str>,
}

impl RequestMeta {
    /// Builds the metadata from request headers (names in any case).
    pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> RequestMeta {
        let mut map = BTreeMap::new();
        let mut stripped = Vec::new();
        for (k, v) in headers {
            if k.starts_with(':') {
                continue;
            }
            let k = k.to_ascii_lowercase();
            if let Some(h) = ROUTER_ONLY_HEADERS.iter().find(|h| **h == k) {
                if !stripped.contains(h) {
                    stripped.push(*h);
                }
                continue;
            }
            map.insert(k, v.to_owned());
        }
        let request_id = match map.get(REQUEST_ID_HEADER) {
            Some(id) if !id.is_empty() => id.clone(),
            _ => {
                // A v4 UUID from the thread's RNG: `Uuid::new_v4` asks the kernel each time.
                let id = uuid::Builder::from_random_bytes(rand::random())
                    .into_uuid()
                    .to_string();
                map.insert(REQUEST_ID_HEADER.to_owned(), id.clone());
                id
            }
        };
        let objective = [OBJECTIVE_HEADER, OBJECTIVE_HEADER_ALIAS]
            .iter()
            .find_map(|h| map.get(*h).filter(|o| !o.is_empty()))
            .cloned()
            .unwrap_or_default();
        let fairness_id = [FAIRNESS_HEADER, FAIRNESS_HEADER_ALIAS]
            .iter()
            .find_map(|h| map.get(*h).filter(|f| !f.is_empty()))
            .cloned()
            .unwrap_or_else(|| DEFAULT_FAIRNESS_ID.to_owned());
        RequestMeta {
            request_id,
            headers: map,
            objective,
            fairness_id,
            subset: None,
            stripped,
        }
    }

    /// Builds the metadata from an `http` header map (values that are not text are skipped).
    pub fn from_http(headers: &http::HeaderMap) -> RequestMeta {
        RequestMeta::from_headers(
            headers
                .iter()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_only_headers_never_reach_the_scheduler() {
        let m = RequestMeta::from_headers([
            ("X-Prefiller-Host-Port", "169.254.169.254:80"),
            ("x-gateway-destination-endpoint", "10.0.0.9:8000"),
            ("x-encoder-hosts-ports", "10.0.0.1:1"),
            ("x-kv-cache-source-host-port", "10.0.0.2:2"),
            ("content-type", "application/json"),
        ]);
        for h in ROUTER_ONLY_HEADERS
            .iter()
            .filter(|h| !h.ends_with("-served"))
        {
            assert!(!m.headers.contains_key(*h), "{h} kept");
            assert!(m.stripped.contains(h), "{h} not recorded");
        }
        assert_eq!(m.headers["content-type"], "application/json");
    }

    #[test]
    fn request_meta_reads_headers_case_insensitively() {
        let m = RequestMeta::from_headers([(OBJECTIVE_HEADER, "chat"), ("X-Request-Id", "id-1")]);
        assert_eq!(m.request_id, "id-1");
        assert_eq!(m.objective, "chat");
        assert_eq!(m.fairness_id, "default-flow");
        let m = RequestMeta::from_headers([(FAIRNESS_HEADER, "tenant-a"), (":path", "/x")]);
        assert_eq!(m.fairness_id, "tenant-a");
        let m = RequestMeta::from_headers([(FAIRNESS_HEADER_ALIAS, "tenant-b")]);
        assert_eq!(
            m.fairness_id, "tenant-b",
            "the deprecated name is still read"
        );
        let m =
            RequestMeta::from_headers([(FAIRNESS_HEADER_ALIAS, "old"), (FAIRNESS_HEADER, "new")]);
        assert_eq!(m.fairness_id, "new", "the current name wins");
        let m = RequestMeta::from_headers([(OBJECTIVE_HEADER_ALIAS, "batch")]);
        assert_eq!(
            m.objective, "batch",
            "the deprecated objective header is still read"
        );
        let m = RequestMeta::from_headers([
            (OBJECTIVE_HEADER_ALIAS, "old"),
            ("X-LLM-D-Inference-Objective", "new"),
        ]);
        assert_eq!(m.objective, "new", "the current name wins");
        assert!(!m.headers.contains_key(":path"));
        assert_eq!(
            m.headers[REQUEST_ID_HEADER], m.request_id,
            "the generated id is forwarded"
        );
    }
}
