//! Mesh RPC frames as a peer sends them over QUIC: requests, responses and one-way casts.
use infermesh_gossip::wire::{self, OneWay, Request, Response};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = wire::decode::<Request>(data);
        let _ = wire::decode::<Response>(data);
        let _ = wire::decode::<OneWay>(data);
    });
}
