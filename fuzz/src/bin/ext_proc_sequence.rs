//! A sequence of ext_proc ProcessingRequests on one stream (headers, body chunks, trailers,
//! in any order), through the node's protocol state machine with an empty pool.
use std::sync::Arc;

use arc_swap::ArcSwap;
use infermesh_node::extproc::message::Inbound;
use infermesh_node::extproc::stream::ExtProcStream;
use infermesh_node::metrics::NodeMetrics;
use infermesh_node::policy::Policy;
use infermesh_node::pool::PoolView;
use infermesh_node::request::{DispatchConfig, Dispatcher};
use infermesh_proto::envoy::service::ext_proc::v3::ProcessingRequest;
use prost::Message;

fn main() {
    let policy = Policy::new(&infermesh_scheduler::ResolvedConfig::builtin_default()).expect("policy");
    let dispatcher = Dispatcher::new(
        Arc::new(ArcSwap::from_pointee(PoolView::default())),
        Arc::new(ArcSwap::from_pointee(policy)),
        Arc::new(NodeMetrics::new()),
        DispatchConfig {
            max_body_bytes: 1 << 20,
            staleness: std::time::Duration::from_secs(2),
            emit_endpoint_scores: true,
        },
    );
    // The dispatcher is rebuilt per input only in spirit: each input gets a fresh stream, and
    // nothing a stream does leaves state behind that a later input could trip on.
    let dispatcher = std::panic::AssertUnwindSafe(dispatcher);
    afl::fuzz!(|data: &[u8]| {
        // Bound whole, so the closure captures the unwind-safe wrapper, not its field.
        let wrapped: &std::panic::AssertUnwindSafe<Dispatcher> = &dispatcher;
        let mut stream = ExtProcStream::new(wrapped.0.clone());
        for c in infermesh_fuzz::chunks(data) {
            let Ok(msg) = ProcessingRequest::decode(c) else { continue };
            let Ok(inbound) = Inbound::try_from(msg) else { break };
            if stream.on_message(inbound).is_err() {
                break;
            }
        }
    });
}
