//! Gossip datagrams: the authenticated envelope (a wrong or forged tag must be refused
//! without panicking), then SWIM's decoder and state machine on the packet inside, as
//! a peer holding the cluster key could send it.
use infermesh_gossip::{ClusterKey, Keyring};

fn main() {
    let ring = Keyring::new(
        ClusterKey::new(b"fuzz-cluster-key-0123".to_vec()).expect("key"),
        vec![ClusterKey::new(b"fuzz-previous-key-0123".to_vec()).expect("key")],
    );
    afl::fuzz!(|data: &[u8]| {
        let _ = ring.open(data);
        let _ = infermesh_gossip::membership::handle_untrusted_packet(data);
    });
}
