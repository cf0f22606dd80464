//! Writes the binary seed inputs (mesh frames, xDS request sequences, ext_proc message
//! sequences) into `fuzz/corpus/<target>/`, built the way the tests build such messages.
//! Text targets are seeded from the repository's own fixtures by `scripts/fuzz.sh`.
//! Run as a plain program: `make_seeds <corpus dir>`.
use std::path::Path;

use infermesh_gossip::NodeId;
use infermesh_gossip::wire::{self, OneWay, PrefixRecord, Request};
use infermesh_proto::envoy::config::core::v3::{HeaderMap, HeaderValue, Node};
use infermesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use infermesh_proto::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, processing_request,
};
use prost::Message;

fn chunked(msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        // Seeds keep each message under 256 bytes so the length byte holds it whole.
        let n = m.len().min(255);
        out.push(n as u8);
        out.extend_from_slice(&m[..n]);
    }
    out
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(name), bytes).expect("seed");
}

fn headers(pairs: &[(&str, &str)]) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream: false,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn body(b: &str, end: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestBody(HttpBody {
            body: b.as_bytes().to_vec(),
            end_of_stream: end,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: make_seeds <corpus dir>");
    let dir = Path::new(&dir);
    let me = NodeId::new("n1");

    let lookup = Request::PrefixLookup { anchor: 7, hashes: vec![7, 8, 9] };
    write(dir, "mesh_frame", "lookup", &wire::encode(&me, &lookup));
    let records = OneWay::PrefixRecords(vec![PrefixRecord {
        anchor: 7,
        hashes: vec![7, 8],
        endpoint: infermesh_gossip::PodId::new("10.0.0.1:8000"),
    }]);
    write(dir, "mesh_frame", "records", &wire::encode(&me, &records));
    let svc = Request::Service { channel: 1, payload: b"raft".to_vec() };
    write(dir, "mesh_frame", "service", &wire::encode(&me, &svc));

    let node = Some(Node { id: "envoy-1".into(), cluster: "gw".into(), ..Default::default() });
    let types = [
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    ];
    let mut sotw = vec![0u8];
    let mut msgs = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let first = DiscoveryRequest { node: (i == 0).then(|| node.clone()).flatten(), type_url: (*t).into(), ..Default::default() };
        msgs.push(first.encode_to_vec());
        let ack = DiscoveryRequest { type_url: (*t).into(), version_info: "1".into(), response_nonce: "1".into(), ..Default::default() };
        msgs.push(ack.encode_to_vec());
    }
    sotw.extend(chunked(&msgs));
    write(dir, "xds_requests", "sotw-subscribe-ack", &sotw);
    let mut delta = vec![1u8];
    let d = DeltaDiscoveryRequest { node: node.clone(), type_url: types[1].into(), resource_names_subscribe: vec!["*".into()], ..Default::default() };
    let ack = DeltaDiscoveryRequest { type_url: types[1].into(), response_nonce: "1".into(), ..Default::default() };
    delta.extend(chunked(&[d.encode_to_vec(), ack.encode_to_vec()]));
    write(dir, "xds_requests", "delta-subscribe-ack", &delta);

    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let seq = [
        headers(&[(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json"), ("x-request-id", "r1")]),
        body(&chat[..20], false),
        body(&chat[20..], true),
    ];
    write(dir, "ext_proc_sequence", "chat", &chunked(&seq.iter().map(|m| m.encode_to_vec()).collect::<Vec<_>>()));
    let bad = [headers(&[(":path", "/v1/completions")]), body("{\"prompt\":", true)];
    write(dir, "ext_proc_sequence", "truncated", &chunked(&bad.iter().map(|m| m.encode_to_vec()).collect::<Vec<_>>()));

    write(dir, "gossip_datagram", "short", &[1u8; 40]);
}
