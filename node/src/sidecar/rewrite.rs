//! The sidecar's request rewriting, free of IO: from the client's body and the router's
//! headers to the request(s) the prefiller and the local engine get, as llm-d's routing
//! sidecar builds them per KV connector. Randomness (SGLang's bootstrap room, a P2P pull's
//! request id) is passed in, so every function here is a plain function of its inputs.

use std::net::SocketAddr;

use serde_json::{Map, Value, json};

/// Header naming the prefill pod (`ip:port`), set by the router's P/D profile handler.
pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";
/// Header naming the encode pods (`ip:port,…`), set by the router for E/P/D.
pub const ENCODERS_HEADER: &str = "x-encoder-hosts-ports";
/// Header naming a pod holding the prompt's KV cache, to pull it from (P2P pull).
pub const KV_SOURCE_HEADER: &str = "x-kv-cache-source-host-port";
/// The port of SGLang's disaggregation bootstrap server on the prefill pod (SGLang's
/// `--disaggregation-bootstrap-port` default, the value llm-d's sidecar sends).
pub const SGLANG_BOOTSTRAP_PORT: u16 = 8998;

const KV_PARAMS: &str = "kv_transfer_params";
/// Where encoder outputs of the request's images are (E/P/D); only the sidecar writes it.
pub const EC_PARAMS: &str = "ec_transfer_params";
/// The path encoders are sent their items on (llm-d sends every item as a chat request).
pub const ENCODE_PATH: &str = "/v1/chat/completions";
/// Content-part types that go to an encoder (llm-d's list).
const MM_TYPES: &[&str] = &["image_url", "audio_url", "input_audio"];

/// How prefill and decode engines exchange KV (llm-d `--kv-connector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvConnector {
    /// vLLM's NixlConnector: prefill returns `kv_transfer_params`, decode pulls the blocks.
    Nixlv2,
    /// vLLM's shared-storage connectors (llm-d's former `lmcache`): prefill writes the KV
    /// to shared storage, decode reads it; no parameters travel.
    SharedStorage,
    /// SGLang's disaggregation: prefill and decode meet at the prefiller's bootstrap server.
    Sglang,
}

/// A client request the sidecar cannot handle; nothing was sent anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The body does not parse as JSON.
    #[error("the request body is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not an object.
    #[error("the request body must be a JSON object")]
    NotObject,
    /// A router header is not a single `ip:port`.
    #[error("header {header}: {value:?} is not an ip:port address")]
    BadAddress {
        /// The header.
        header: &'static str,
        /// What it held.
        value: String,
    },
}

/// A prefiller's 2xx answer the decode step cannot use; the decode was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPrefillResponse {
    /// The body does not parse as a JSON object.
    #[error("the prefill response is not a JSON object: {0}")]
    NotJson(String),
}

/// An encoder's 2xx answer that does not say where its output is; nothing more was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEncodeResponse {
    /// The body does not parse as a JSON object.
    #[error("the encode response is not a JSON object: {0}")]
    NotJson(String),
    /// The answer has no `ec_transfer_params.mm_hashes` list.
    #[error("the encode response has no ec_transfer_params.mm_hashes list")]
    NoHandles,
}

/// A JSON request body as an object, the only shape the OpenAI APIs take.
pub type Body = Map<String, Value>;

/// Parses a client body.
pub fn parse_body(bytes: &[u8]) -> Result<Body, InvalidRequest> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(InvalidRequest::NotObject),
        Err(e) => Err(InvalidRequest::NotJson(e.to_string())),
    }
}

/// Parses a router header naming one pod. Only literal addresses are taken: the router
/// always sends `ip:port`, and a name would need a DNS lookup the allowlist cannot vouch for.
pub fn parse_address(header: &'static str, value: &str) -> Result<SocketAddr, InvalidRequest> {
    value
        .trim()
        .parse()
        .map_err(|_| InvalidRequest::BadAddress {
            header,
            value: value.to_owned(),
        })
}

/// Parses a router header naming several pods (`ip:port,ip:port`); at least one.
pub fn parse_addresses(
    header: &'static str,
    value: &str,
) -> Result<Vec<SocketAddr>, InvalidRequest> {
    let addrs = value
        .split(',')
        .map(|part| parse_address(header, part))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| InvalidRequest::BadAddress {
            header,
            value: value.to_owned(),
        })?;
    if addrs.is_empty() {
        return Err(InvalidRequest::BadAddress {
            header,
            value: value.to_owned(),
        });
    }
    Ok(addrs)
}

/// Serializes a body (a `Map` of JSON values always serializes).
pub fn to_bytes(body: &Body) -> Vec<u8> {
    serde_json::to_vec(body).expect("a JSON object always serializes")
}

/// The body without client-supplied `kv_transfer_params`: that field tells an engine where
/// to pull KV from or push it to, so only the sidecar may write it.
pub fn without_kv_params(client: &Body) -> Body {
    let mut b = client.clone();
    b.remove(KV_PARAMS);
    b
}

/// The body without a client-supplied `ec_transfer_params`: it tells an engine that an
/// encoder already produced an image's output, so only the sidecar may write it.
pub fn without_ec_params(client: &Body) -> Body {
    let mut b = client.clone();
    b.remove(EC_PARAMS);
    b
}

/// The multimodal content parts of a chat body's messages, in order (a completions body
/// has none).
pub fn mm_items(client: &Body) -> Vec<Value> {
    let Some(Value::Array(messages)) = client.get("messages") else {
        return Vec::new();
    };
    messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|part| {
            part.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| MM_TYPES.contains(&t))
        })
        .cloned()
        .collect()
}

/// The request an encoder gets for one item, as llm-d's sidecar builds it: the client's
/// body with a single user message holding only that item (no text), one token, not
/// streamed, and no transfer parameters.
pub fn encoder_request(client: &Body, item: &Value) -> Body {
    let mut b = prefill_base(&without_ec_params(client));
    b.insert(
        "messages".into(),
        json!([{"role": "user", "content": [item]}]),
    );
    b
}

/// The `ec_transfer_params` of an encoder's answer: which items it holds output for.
pub fn encoder_params(response: &[u8]) -> Result<Value, InvalidEncodeResponse> {
    let mut m = match serde_json::from_slice::<Value>(response) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(InvalidEncodeResponse::NotJson("not an object".into())),
        Err(e) => return Err(InvalidEncodeResponse::NotJson(e.to_string())),
    };
    match m.remove(EC_PARAMS) {
        Some(p) if p.get("mm_hashes").is_some_and(Value::is_array) => Ok(p),
        _ => Err(InvalidEncodeResponse::NoHandles),
    }
}

/// The client's body carrying every encoder's output handles for prefill and decode:
/// `ec_transfer_params {mm_hashes: all items, encoders: each encoder's own params}`; the
/// client's own `ec_transfer_params` is replaced.
pub fn with_encoder_outputs(client: &Body, outputs: Vec<Value>) -> Body {
    let mut b = without_ec_params(client);
    let hashes: Vec<Value> = outputs
        .iter()
        .filter_map(|o| o.get("mm_hashes").and_then(Value::as_array))
        .flatten()
        .cloned()
        .collect();
    b.insert(
        EC_PARAMS.into(),
        json!({"mm_hashes": hashes, "encoders": outputs}),
    );
    b
}

/// The prefill request shared by every connector: one token, not streamed.
fn prefill_base(client: &Body) -> Body {
    let mut b = without_kv_params(client);
    b.insert("stream".into(), Value::Bool(false));
    b.remove("stream_options");
    b.insert("max_tokens".into(), json!(1));
    // Chat requests may bound the output with the newer name only; an engine that reads
    // it first would otherwise prefill and then generate the client's whole answer.
    if b.contains_key("max_completion_tokens") {
        b.insert("max_completion_tokens".into(), json!(1));
    }
    b
}

/// NIXL v2 prefill request: the client's body, one token, not streamed, with
/// `kv_transfer_params` asking the prefiller to keep the KV for a remote decode.
/// `kv_source` (from [`kv_source_params`]) makes the prefiller pull a cached prefix first.
pub fn nixl_prefill(client: &Body, kv_source: Option<Value>) -> Body {
    let mut b = prefill_base(client);
    let mut params = json!({
        "do_remote_decode": true,
        "do_remote_prefill": false,
        "remote_engine_id": null,
        "remote_block_ids": null,
        "remote_host": null,
        "remote_port": null,
    });
    if let Some(src) = kv_source {
        params[REMOTE_KV_SOURCE] = src;
    }
    b.insert(KV_PARAMS.into(), params);
    b
}

/// The `kv_transfer_params` a NIXL prefiller answered with (`None` when it sent none,
/// as an engine without a KV connector does; the decode then computes the prompt itself).
pub fn prefill_params(response: &[u8]) -> Result<Option<Value>, InvalidPrefillResponse> {
    match serde_json::from_slice::<Value>(response) {
        Ok(Value::Object(mut m)) => Ok(m.remove(KV_PARAMS).filter(|v| !v.is_null())),
        Ok(_) => Err(InvalidPrefillResponse::NotJson("not an object".into())),
        Err(e) => Err(InvalidPrefillResponse::NotJson(e.to_string())),
    }
}

/// NIXL v2 decode request: the client's own body (its stream flag and token limits) with
/// the prefiller's `kv_transfer_params` in place of anything the client sent.
pub fn nixl_decode(client: &Body, params: Option<Value>) -> Body {
    let mut b = without_kv_params(client);
    if let Some(p) = params {
        b.insert(KV_PARAMS.into(), p);
    }
    b
}

/// Shared-storage prefill request: one token, not streamed, no parameters (the engines
/// find the KV in storage by the prompt's block hashes).
pub fn shared_storage_prefill(client: &Body) -> Body {
    prefill_base(client)
}

/// Shared-storage decode request: the client's body.
pub fn shared_storage_decode(client: &Body) -> Body {
    without_kv_params(client)
}

/// SGLang requests, sent to prefiller and decoder at once: both carry the same bootstrap
/// host, port and room, where the two engines meet to move the KV.
pub fn sglang_pair(client: &Body, prefiller: SocketAddr, room: i64) -> (Body, Body) {
    let mut b = without_kv_params(client);
    b.insert(
        "bootstrap_host".into(),
        Value::String(prefiller.ip().to_string()),
    );
    b.insert("bootstrap_port".into(), json!(SGLANG_BOOTSTRAP_PORT));
    b.insert("bootstrap_room".into(), json!(room));
    (b.clone(), b)
}

/// The `kv_transfer_params` key of a P2P pull (renamed from the older `p2p_*` keys).
pub const REMOTE_KV_SOURCE: &str = "remote_kv_source";

/// The `remote_kv_source` block: pull cached blocks from `source`'s P2P connector port.
/// `kv_request_id` is fresh per request (the consumer side uses it alone).
pub fn kv_source_params(source: SocketAddr, p2p_port: u16, kv_request_id: &str) -> Value {
    json!({
        "kv_request_id": kv_request_id,
        "remote_host": source.ip().to_string(),
        "remote_port": p2p_port,
    })
}

/// A decode-only request that pulls its cached prefix from a peer: `kv_transfer_params` is
/// rebuilt to hold only the pull.
pub fn decode_with_kv_source(client: &Body, source: Value) -> Body {
    let mut b = without_kv_params(client);
    b.insert(KV_PARAMS.into(), json!({ REMOTE_KV_SOURCE: source }));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Body {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test bodies are objects"),
        }
    }

    fn client() -> Body {
        body(json!({
            "model": "m",
            "prompt": "hello",
            "max_tokens": 50,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0.5,
            "kv_transfer_params": {"do_remote_prefill": true, "remote_host": "169.254.169.254", "remote_port": 80},
        }))
    }

    #[test]
    fn nixl_prefill_asks_for_one_unstreamed_token_and_a_remote_decode() {
        let p = nixl_prefill(&client(), None);
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["stream"], false);
        assert!(!p.contains_key("stream_options"));
        assert!(
            !p.contains_key("max_completion_tokens"),
            "not added when absent"
        );
        assert_eq!(p["temperature"], 0.5, "other fields travel unchanged");
        assert_eq!(p["prompt"], "hello");
        assert_eq!(
            p["kv_transfer_params"],
            json!({
                "do_remote_decode": true, "do_remote_prefill": false,
                "remote_engine_id": null, "remote_block_ids": null,
                "remote_host": null, "remote_port": null,
            }),
            "the client's params are replaced, not merged"
        );
    }

    #[test]
    fn prefill_caps_max_completion_tokens_when_the_client_used_it() {
        let mut c = client();
        c.insert("max_completion_tokens".into(), json!(70));
        for p in [nixl_prefill(&c, None), shared_storage_prefill(&c)] {
            assert_eq!(p["max_completion_tokens"], 1);
            assert_eq!(p["max_tokens"], 1);
        }
    }

    #[test]
    fn nixl_decode_keeps_the_clients_request_and_takes_the_prefillers_params() {
        let answer = json!({
            "choices": [{"text": "x"}],
            "kv_transfer_params": {"do_remote_prefill": true, "remote_block_ids": [3, 4],
                "remote_engine_id": "e-1", "remote_host": "10.0.0.5", "remote_port": 8200},
        });
        let params = prefill_params(answer.to_string().as_bytes()).unwrap();
        let d = nixl_decode(&client(), params);
        assert_eq!(d["max_tokens"], 50);
        assert_eq!(d["stream"], true);
        assert_eq!(d["stream_options"], json!({"include_usage": true}));
        assert_eq!(d["kv_transfer_params"], answer["kv_transfer_params"]);
    }

    #[test]
    fn a_prefill_answer_without_params_decodes_without_any() {
        assert_eq!(prefill_params(br#"{"choices": []}"#).unwrap(), None);
        assert_eq!(
            prefill_params(br#"{"kv_transfer_params": null}"#).unwrap(),
            None
        );
        let d = nixl_decode(&client(), None);
        assert!(
            !d.contains_key("kv_transfer_params"),
            "the client's params never reach the engine"
        );
        assert!(prefill_params(b"data: {}\n\n").is_err());
        assert!(prefill_params(b"[1]").is_err());
    }

    #[test]
    fn shared_storage_sends_no_params_either_way() {
        let p = shared_storage_prefill(&client());
        assert!(!p.contains_key("kv_transfer_params"));
        assert_eq!(
            (p["max_tokens"].clone(), p["stream"].clone()),
            (json!(1), json!(false))
        );
        let d = shared_storage_decode(&client());
        assert!(!d.contains_key("kv_transfer_params"));
        assert_eq!(d["max_tokens"], 50);
        assert_eq!(d["stream"], true);
    }

    #[test]
    fn sglang_pair_shares_one_bootstrap_room() {
        let prefiller: SocketAddr = "10.1.2.3:8000".parse().unwrap();
        let (p, d) = sglang_pair(&client(), prefiller, 42);
        for b in [&p, &d] {
            assert_eq!(b["bootstrap_host"], "10.1.2.3");
            assert_eq!(b["bootstrap_port"], 8998);
            assert_eq!(b["bootstrap_room"], 42);
            assert_eq!(
                b["max_tokens"], 50,
                "SGLang's prefill takes the request as is"
            );
            assert!(!b.contains_key("kv_transfer_params"));
        }
    }

    #[test]
    fn kv_source_pull_is_injected_into_prefill_or_decode() {
        let src: SocketAddr = "10.0.0.9:8000".parse().unwrap();
        let pull = kv_source_params(src, 7777, "id-1");
        assert_eq!(
            pull,
            json!({"kv_request_id": "id-1", "remote_host": "10.0.0.9", "remote_port": 7777})
        );
        let p = nixl_prefill(&client(), Some(pull.clone()));
        assert_eq!(p["kv_transfer_params"]["remote_kv_source"], pull);
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        let d = decode_with_kv_source(&client(), pull.clone());
        assert_eq!(
            d["kv_transfer_params"],
            json!({"remote_kv_source": pull}),
            "rebuilt: the client's keys are gone"
        );
        assert_eq!(d["stream"], true);
    }

    #[test]
    fn encoders_get_one_item_each_and_their_handles_travel_on() {
        let mut c = body(json!({
            "model": "m", "max_completion_tokens": 9, "stream": true,
            "stream_options": {"include_usage": true},
            "ec_transfer_params": {"mm_hashes": ["forged"]},
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": "http://img/a"}},
                    {"type": "image_url", "image_url": {"url": "http://img/b"}},
                ]},
            ],
        }));
        let items = mm_items(&c);
        assert_eq!(items.len(), 2);
        let e = encoder_request(&c, &items[1]);
        assert_eq!(
            e["messages"],
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://img/b"}}]}])
        );
        assert_eq!(
            (e["max_tokens"].clone(), e["max_completion_tokens"].clone()),
            (json!(1), json!(1))
        );
        assert_eq!(e["stream"], false);
        assert!(!e.contains_key("stream_options") && !e.contains_key(EC_PARAMS));

        let answer =
            json!({"choices": [], "ec_transfer_params": {"mm_hashes": ["00ab"], "remote_port": 1}});
        let p = encoder_params(answer.to_string().as_bytes()).unwrap();
        assert_eq!(
            encoder_params(br#"{"choices": []}"#),
            Err(InvalidEncodeResponse::NoHandles)
        );
        let p2 = json!({"mm_hashes": ["00cd"], "remote_port": 2});
        c = with_encoder_outputs(&c, vec![p.clone(), p2.clone()]);
        assert_eq!(
            c[EC_PARAMS],
            json!({"mm_hashes": ["00ab", "00cd"], "encoders": [p, p2]}),
            "the client's forged handles are gone"
        );
        assert_eq!(
            nixl_prefill(&c, None)[EC_PARAMS],
            c[EC_PARAMS],
            "prefill gets them"
        );
        assert_eq!(nixl_decode(&c, None)[EC_PARAMS], c[EC_PARAMS], "decode too");
        assert!(mm_items(&body(json!({"prompt": "text"}))).is_empty());
    }

    #[test]
    fn encoder_lists_are_comma_separated_addresses() {
        let a = parse_addresses(ENCODERS_HEADER, "10.0.0.1:8000, 10.0.0.2:8001").unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].port(), 8001);
        for bad in ["", "10.0.0.1:8000,", "enc-0:8000", "10.0.0.1"] {
            let e = parse_addresses(ENCODERS_HEADER, bad).unwrap_err();
            assert!(e.to_string().contains(ENCODERS_HEADER), "{e}");
        }
    }

    #[test]
    fn bad_bodies_and_headers_are_named() {
        assert!(matches!(parse_body(b"{"), Err(InvalidRequest::NotJson(_))));
        assert_eq!(parse_body(b"[1,2]"), Err(InvalidRequest::NotObject));
        assert!(parse_body(br#"{"a":1}"#).is_ok());
        assert_eq!(
            parse_address(PREFILLER_HEADER, " 10.0.0.1:8000").unwrap(),
            "10.0.0.1:8000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_address(PREFILLER_HEADER, "[::1]:80").unwrap().port(),
            80
        );
        for bad in [
            "prefill-0:8000",
            "10.0.0.1",
            "10.0.0.1:8000,10.0.0.2:8000",
            "",
        ] {
            let e = parse_address(PREFILLER_HEADER, bad).unwrap_err();
            assert!(e.to_string().contains(PREFILLER_HEADER), "{e}");
        }
    }
}
