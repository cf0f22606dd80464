//! A sequence of DiscoveryRequests (SotW) and DeltaDiscoveryRequests on one ADS stream each,
//! against a served snapshot: ACKs, NACKs, unknown types, stale nonces, resubscriptions.
use infermesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use infermesh_xds::{DeltaStream, NodeMemory, Snapshot, SotwStream, XdsConfig, XdsInput};
use prost::Message;

fn main() {
    let mut input = XdsInput::default();
    input.ext_proc_endpoints = vec!["127.0.0.1:9002".parse().expect("addr")];
    let typed = infermesh_xds::translate::translate(&input, &XdsConfig::default());
    let snapshot = std::sync::Arc::new(Snapshot::build(&typed).expect("snapshot"));
    afl::fuzz!(|data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        if mode % 2 == 0 {
            let mut s = SotwStream::new(Some(snapshot.clone()), NodeMemory::default());
            for c in infermesh_fuzz::chunks(rest) {
                if let Ok(req) = DiscoveryRequest::decode(c) {
                    s.handle_request(&req);
                    while s.poll_event().is_some() {}
                }
            }
        } else {
            let mut s = DeltaStream::new(Some(snapshot.clone()), NodeMemory::default());
            for c in infermesh_fuzz::chunks(rest) {
                if let Ok(req) = DeltaDiscoveryRequest::decode(c) {
                    s.handle_request(&req);
                    while s.poll_event().is_some() {}
                }
            }
        }
    });
}
