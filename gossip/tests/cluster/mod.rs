//! Test support: loopback clusters and bounded condition waits.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use infermesh_gossip::{ClusterKey, Mesh, MeshConfig};

/// Upper bound for any condition a test waits on (generous: CI machines are shared).
pub const DEADLINE: Duration = Duration::from_secs(40);

pub fn key() -> ClusterKey {
    ClusterKey::new(b"test-cluster-key-0123456789".to_vec()).unwrap()
}

pub fn config(name: &str) -> MeshConfig {
    let mut c = MeshConfig::loopback(name, key());
    // Tests check behaviour, not latency. Many nodes share one 2-thread runtime on a
    // machine shared with compilers, so use slower SWIM timing than production (fewer
    // false suspicions) and give remote lookups room. The bench measures the defaults.
    c.prefix.lookup_budget = Duration::from_secs(2);
    c.swim.probe_period = Duration::from_millis(400);
    c.swim.probe_rtt = Duration::from_millis(200);
    c.swim.suspicion_multiplier = 4.0;
    c
}

/// Starts `n` nodes named `node-0..`, all seeded at node-0, and waits until all see all.
pub async fn cluster(n: usize) -> Vec<Mesh> {
    cluster_with(n, |_| {}).await
}

pub async fn cluster_with(n: usize, tweak: impl Fn(&mut MeshConfig)) -> Vec<Mesh> {
    let mut nodes: Vec<Mesh> = Vec::new();
    for i in 0..n {
        let mut c = config(&format!("node-{i}"));
        if let Some(first) = nodes.first() {
            c.seeds = vec![first.gossip_addr()];
        }
        tweak(&mut c);
        nodes.push(Mesh::start(c).await.expect("mesh starts"));
    }
    wait_for("all nodes see all members", || {
        nodes
            .iter()
            .all(|m| m.members().borrow().members.len() == n)
    })
    .await;
    nodes
}

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    infermesh_testkit::wait_until(what, DEADLINE, cond).await
}

/// Like [`wait_for`] for async conditions.
pub async fn wait_for_async<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    infermesh_testkit::wait_until_async(what, DEADLINE, cond).await
}
