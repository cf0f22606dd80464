//! Simulated pods publishing KV events (with replay) on ephemeral ports, and the follower
//! options that reach them.

use std::time::Duration;

use infermesh_node::mesh::kv_events::{KvEventsOptions, PodEventPorts};
use infermesh_sim::tokenizer::Tokenizer;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig, KvEventsConfig};

/// Starts `pods` zero-latency pods tokenizing with `tokenizer`, publishing KV events.
pub async fn fleet_with_events(pods: usize, tokenizer: Tokenizer) -> (Fleet, KvEventsOptions) {
    let mut fc = FleetConfig::new(pods);
    fc.profile = EngineProfile::instant();
    fc.tokenizer = tokenizer;
    fc.kv_events = Some(KvEventsConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        bind: true,
        ..KvEventsConfig::default()
    });
    let fleet = Fleet::start(fc).await.expect("simulated pods start");
    let mut kv = KvEventsOptions {
        reconnect_interval: Duration::from_millis(100),
        ..KvEventsOptions::default()
    };
    for (pod, ports) in fleet.addrs().iter().zip(fleet.kv_event_ports()) {
        let ports = ports.expect("pods publish");
        kv.pod_ports.insert(
            pod.to_string(),
            PodEventPorts {
                publish: ports.publish.expect("bound PUB port"),
                replay: ports.replay,
            },
        );
    }
    (fleet, kv)
}
