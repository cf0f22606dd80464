//! Multi-node tests on loopback: membership, load board, prefix ownership, service RPC, auth.

mod cluster;

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use cluster::{cluster, cluster_with, config, wait_for, wait_for_async};
use infermesh_gossip::{
    ClusterKey, InFlightDelta, MembershipEvent, Mesh, NodeId, PodId, PodMetrics, Ring,
};

fn pods(n: usize) -> Vec<PodId> {
    (0..n)
        .map(|i| PodId::new(format!("10.1.0.{i}:8000")))
        .collect()
}

fn owned_partition_ok(nodes: &[&Mesh], all: &[PodId]) -> bool {
    let mut seen: Vec<PodId> = nodes
        .iter()
        .flat_map(|m| m.owned_pods().borrow().as_ref().clone())
        .collect();
    seen.sort();
    let mut expected = all.to_vec();
    expected.sort();
    seen == expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_derive_the_same_ring() {
    let nodes = cluster(3).await;
    let rings: Vec<Ring> = nodes.iter().map(|m| (*m.ring()).clone()).collect();
    assert!(rings.windows(2).all(|w| w[0] == w[1]));
    let names: BTreeSet<String> = rings[0].nodes().map(|n| n.to_string()).collect();
    assert_eq!(
        names,
        ["node-0", "node-1", "node-2"].map(String::from).into()
    );
    for anchor in [1u64, 99, u64::MAX] {
        let owners: Vec<Vec<NodeId>> = nodes.iter().map(|m| m.prefix_owners(anchor)).collect();
        assert!(owners.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(owners[0].len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_detected_and_its_pods_are_reowned() {
    let mut nodes = cluster(4).await;
    let all = pods(40);
    for m in &nodes {
        m.set_pods(all.clone());
    }
    wait_for("pods partitioned over 4 nodes", || {
        owned_partition_ok(&nodes.iter().collect::<Vec<_>>(), &all)
    })
    .await;
    let mut events = nodes[0].events();
    let victim = nodes.pop().unwrap();
    let victim_id = victim.node_id().clone();
    let victim_pods = victim.owned_pods().borrow().clone();
    assert!(!victim_pods.is_empty());
    drop(victim); // kill: no leave message

    wait_for("survivors drop the killed node", || {
        nodes
            .iter()
            .all(|m| m.members().borrow().members.len() == 3)
    })
    .await;
    wait_for("pods partitioned over 3 survivors", || {
        owned_partition_ok(&nodes.iter().collect::<Vec<_>>(), &all)
    })
    .await;
    // The killed node was reported down (possibly after being suspected).
    let mut saw_down = false;
    while let Ok(e) = events.try_recv() {
        if e == MembershipEvent::Down(victim_id.clone()) {
            saw_down = true;
        }
    }
    assert!(saw_down, "node-0 emitted Down for the killed node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_node_is_removed_and_a_new_node_can_join() {
    let mut nodes = cluster(3).await;
    let leaver = nodes.pop().unwrap();
    leaver.leave(Duration::from_secs(2)).await;
    wait_for("others see the departure", || {
        nodes
            .iter()
            .all(|m| m.members().borrow().members.len() == 2)
    })
    .await;
    let mut c = config("node-9");
    c.seeds = vec![nodes[1].gossip_addr()];
    nodes.push(Mesh::start(c).await.unwrap());
    wait_for("newcomer joins through a non-first seed", || {
        nodes
            .iter()
            .all(|m| m.members().borrow().members.len() == 3)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_converges_on_every_node() {
    let nodes = cluster(3).await;
    let all = pods(6);
    for m in &nodes {
        m.set_pods(all.clone());
    }
    wait_for("pods partitioned", || {
        owned_partition_ok(&nodes.iter().collect::<Vec<_>>(), &all)
    })
    .await;

    // Each owner publishes a scrape for its pods; each node has its own in-flight work.
    for m in &nodes {
        for pod in m.owned_pods().borrow().iter() {
            let metrics = PodMetrics {
                waiting_queue: 3,
                running: 5,
                kv_cache_usage: 0.25,
                ..PodMetrics::default()
            };
            m.publish_scrape(pod, metrics, Instant::now());
        }
    }
    for (i, m) in nodes.iter().enumerate() {
        let delta = InFlightDelta {
            requests: (i + 1) as i64,
            tokens: 100,
            prefilling: 1,
        };
        m.add_in_flight(&all[0], delta);
    }
    // Fleet in-flight for pod 0 = 1 + 2 + 3 (one prefilling per node); every pod's
    // metrics visible everywhere.
    wait_for("all views converge", || {
        nodes.iter().all(|m| {
            let v = m.load_view();
            v.pod(&all[0]).is_some_and(|p| {
                p.in_flight.requests == 6
                    && p.in_flight.tokens == 300
                    && p.in_flight.prefilling == 3
            }) && all.iter().all(|pod| {
                v.pod(pod)
                    .and_then(|p| p.metrics.as_ref())
                    .is_some_and(|x| x.running == 5 && x.waiting_queue == 3)
            })
        })
    })
    .await;
    // Releases propagate too.
    let release = InFlightDelta {
        requests: -3,
        tokens: -100,
        prefilling: -1,
    };
    nodes[2].add_in_flight(&all[0], release);
    wait_for("release converges", || {
        nodes.iter().all(|m| {
            m.load_view()
                .pod(&all[0])
                .is_some_and(|p| p.in_flight.requests == 3 && p.in_flight.prefilling == 2)
        })
    })
    .await;
    let v = nodes[0].load_view();
    let scraper = v.pod(&all[0]).unwrap().scraped_by.clone().unwrap();
    let expected = nodes[0]
        .ring()
        .owner(infermesh_gossip::ring::key_of_str(all[0].as_str()))
        .cloned();
    assert_eq!(
        Some(scraper),
        expected,
        "the pod's rendezvous owner scraped it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_changes_do_not_wait_for_the_flush_tick() {
    // Ticks and full syncs an hour apart: only the in-flight push can carry the counts.
    let hour = Duration::from_secs(3600);
    let nodes = cluster_with(2, |c| {
        c.load.flush_interval = hour;
        c.load.full_sync_interval = hour;
    })
    .await;
    let all = pods(1);
    for m in &nodes {
        m.set_pods(all.clone());
    }
    let sees = |requests: u32, prefilling: u32| {
        let v = nodes[1].load_view();
        v.pod(&all[0]).is_some_and(|p| {
            p.in_flight.requests == requests && p.in_flight.prefilling == prefilling
        })
    };
    let dispatched = InFlightDelta {
        requests: 1,
        tokens: 4000,
        prefilling: 1,
    };
    nodes[0].add_in_flight(&all[0], dispatched);
    wait_for("the dispatch reaches the peer", || sees(1, 1)).await;
    // The next change comes within the push gap of the first and still goes out.
    let first_token = InFlightDelta {
        prefilling: -1,
        ..InFlightDelta::default()
    };
    nodes[0].add_in_flight(&all[0], first_token);
    wait_for("the first token reaches the peer", || sees(1, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_lookups_match_wherever_the_request_lands_and_survive_owner_loss() {
    let mut nodes = cluster(5).await;
    // Chains under several anchors, recorded from different nodes.
    let chains: Vec<Vec<u64>> = (0..20u64)
        .map(|i| {
            let anchor = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            vec![anchor, anchor ^ 1, anchor ^ 2, anchor ^ 3]
        })
        .collect();
    for (i, chain) in chains.iter().enumerate() {
        let via = &nodes[i % nodes.len()];
        via.prefix_record(
            chain[0],
            chain.clone(),
            PodId::new(format!("10.2.0.{}:8000", i % 3)),
        );
        // A shorter pick on a second endpoint.
        via.prefix_record(chain[0], chain[..2].to_vec(), "10.2.0.9:8000".into());
    }
    wait_for_async("every node gets the same match for every chain", || {
        all_match(&nodes, &chains)
    })
    .await;
    let stats: Vec<_> = nodes.iter().map(|m| m.stats()).collect();
    assert!(
        stats.iter().any(|s| s.prefix_lookups_remote > 0),
        "some lookups were remote"
    );
    assert!(
        stats.iter().any(|s| s.prefix_lookups_local > 0),
        "some lookups were local"
    );

    // Kill the first owner of chain 0; the replica answers, and handoff restores R copies.
    let owner = nodes[0].prefix_owners(chains[0][0])[0].clone();
    let idx = nodes.iter().position(|m| *m.node_id() == owner).unwrap();
    drop(nodes.remove(idx));
    wait_for("survivors see 4 members", || {
        nodes
            .iter()
            .all(|m| m.members().borrow().members.len() == 4)
    })
    .await;
    wait_for_async("matches survive the loss of an owner", || {
        all_match(&nodes, &chains)
    })
    .await;
    // Every anchor is held by both of its new owners (handoff re-replicated it).
    wait_for("R copies restored", || {
        chains.iter().all(|c| {
            let owners = nodes[0].prefix_owners(c[0]);
            owners.iter().all(|o| {
                let m = nodes.iter().find(|m| m.node_id() == o).unwrap();
                m.prefix_index_blocks() > 0
            })
        })
    })
    .await;
    assert!(
        nodes
            .iter()
            .map(|m| m.stats().prefix_handoff_anchors_in)
            .sum::<u64>()
            > 0
    );
}

/// KV-event removals and endpoint clears reach the anchors' owners from any node, and a
/// record followed by its removal through one node applies in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_removals_and_endpoint_clears_reach_every_owner() {
    let nodes = cluster(3).await;
    let chains: Vec<Vec<u64>> = (0..12u64)
        .map(|i| {
            let anchor = (i + 101).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            vec![anchor, anchor ^ 1, anchor ^ 2, anchor ^ 3]
        })
        .collect();
    let (evicts, cleared, kept) = ("10.3.0.1:8000", "10.3.0.2:8000", "10.3.0.3:8000");
    for (i, c) in chains.iter().enumerate() {
        let via = &nodes[i % 3];
        for ep in [evicts, cleared, kept] {
            via.prefix_record(c[0], c.clone(), ep.into());
        }
    }
    let expect = |e: u32, c: u32, k: u32| {
        move |m: &infermesh_gossip::PrefixMatch| {
            m.blocks_for(evicts) == e && m.blocks_for(cleared) == c && m.blocks_for(kept) == k
        }
    };
    wait_for_async("records reach every owner", || {
        every_lookup(&nodes, &chains, expect(4, 4, 4))
    })
    .await;

    // The pod evicts the two tail blocks of every chain; the removal is sent from a node
    // other than the one that recorded, so most go to remote owners.
    for (i, c) in chains.iter().enumerate() {
        nodes[(i + 1) % 3].prefix_remove(c[0], c[2..].to_vec(), evicts.into());
    }
    // A block stored and evicted again in quick succession ends up removed.
    for c in &chains {
        nodes[0].prefix_record(c[0], c[..3].to_vec(), evicts.into());
        nodes[0].prefix_remove(c[0], vec![c[2]], evicts.into());
    }
    nodes[2].prefix_forget_endpoint(cleared.into());
    wait_for_async("removals and the clear apply everywhere", || {
        every_lookup(&nodes, &chains, expect(2, 0, 4))
    })
    .await;
    let stats: Vec<_> = nodes.iter().map(|m| m.stats()).collect();
    assert!(stats.iter().any(|s| s.prefix_removals_out > 0));
    assert!(stats.iter().map(|s| s.prefix_removals_applied).sum::<u64>() >= 2 * 12);
    assert!(
        stats.iter().all(|s| s.prefix_forgets_applied == 1),
        "every node forgot once"
    );
}

/// Every node's lookup of every chain satisfies `ok`.
async fn every_lookup(
    nodes: &[Mesh],
    chains: &[Vec<u64>],
    ok: impl Fn(&infermesh_gossip::PrefixMatch) -> bool + Copy,
) -> bool {
    let lookups = nodes.iter().flat_map(|m| {
        chains
            .iter()
            .map(move |c| async move { m.prefix_lookup(c[0], c).await.is_some_and(|r| ok(&r)) })
    });
    futures::future::join_all(lookups)
        .await
        .into_iter()
        .all(|ok| ok)
}

/// Every node's lookup of every chain returns the recorded match.
async fn all_match(nodes: &[Mesh], chains: &[Vec<u64>]) -> bool {
    let lookups = nodes.iter().flat_map(|m| {
        chains.iter().enumerate().map(move |(i, c)| async move {
            m.prefix_lookup(c[0], c).await.is_some_and(|r| {
                r.total_blocks == 4
                    && r.blocks_for(&format!("10.2.0.{}:8000", i % 3)) == 4
                    && r.blocks_for("10.2.0.9:8000") == 2
            })
        })
    });
    futures::future::join_all(lookups)
        .await
        .into_iter()
        .all(|ok| ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_falls_back_to_none_when_the_owner_does_not_answer() {
    let mut nodes = cluster_with(2, |c| c.prefix.replicas = NonZeroUsize::new(1).unwrap()).await;
    let owner = nodes[1].node_id().clone();
    let anchor = (1..100_000u64)
        .find(|a| nodes[0].prefix_owners(*a) == vec![owner.clone()])
        .unwrap();
    nodes[1].prefix_record(anchor, vec![anchor], "ep".into());
    let m = nodes[0]
        .prefix_lookup_within(anchor, &[anchor], Duration::from_secs(5))
        .await
        .expect("owner answers");
    assert_eq!(m.blocks_for("ep"), 1);
    assert!(nodes[1].stats().prefix_lookups_served >= 1);
    assert_eq!(nodes[0].stats().prefix_lookup_fallbacks, 0);

    // The owner dies; until failure detection catches up it is still on node-0's ring, and
    // lookups must give up within their budget instead of waiting on it.
    drop(nodes.pop());
    assert!(
        nodes[0].ring().contains(&owner),
        "detection cannot have happened yet"
    );
    let started = tokio::time::Instant::now();
    let r = nodes[0]
        .prefix_lookup_within(anchor, &[anchor], Duration::from_millis(200))
        .await;
    assert!(r.is_none());
    assert_eq!(nodes[0].stats().prefix_lookup_fallbacks, 1);
    assert!(
        started.elapsed() < cluster::DEADLINE,
        "bounded by the budget, not hung"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_and_garbage_datagrams_are_counted_and_dropped() {
    let good = Mesh::start(config("good")).await.unwrap();
    let mut c = config("intruder");
    c.cluster_key = ClusterKey::new(b"another-key-entirely-000".to_vec()).unwrap();
    c.seeds = vec![good.gossip_addr()];
    let intruder = Mesh::start(c).await.unwrap();
    wait_for("wrong-key announces rejected", || {
        good.stats().gossip_rejected_auth >= 2
    })
    .await;
    assert_eq!(good.members().borrow().members.len(), 1);
    assert_eq!(intruder.members().borrow().members.len(), 1);

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(b"\x01short", good.gossip_addr())
        .await
        .unwrap();
    sock.send_to(&[7u8; 100], good.gossip_addr()).await.unwrap();
    wait_for("garbage counted as malformed", || {
        good.stats().gossip_rejected_malformed >= 2
    })
    .await;
    assert_eq!(good.members().borrow().members.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_channels_carry_opaque_requests_and_casts() {
    let nodes = cluster(2).await;
    let mut rx = nodes[1].register_service(7, 16).unwrap();
    assert!(nodes[1].register_service(7, 16).is_err());
    tokio::spawn(async move {
        while let Some(call) = rx.recv().await {
            if call.expects_reply() {
                let mut out = call.payload.to_vec();
                out.reverse();
                call.respond(out);
            }
        }
    });
    let answer = nodes[0]
        .call_service(
            nodes[1].node_id(),
            7,
            b"abc".to_vec(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(&answer[..], b"cba");
    let err = nodes[0]
        .call_service(nodes[1].node_id(), 8, b"x".to_vec(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        infermesh_gossip::RpcError::Remote(infermesh_gossip::wire::RemoteError::UnknownChannel(8))
    ));
    let unknown = nodes[0]
        .call_service(&NodeId::new("nobody"), 7, vec![], Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(
        unknown,
        infermesh_gossip::RpcError::UnknownPeer(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_named_by_host_name_is_resolved_and_joined() {
    let first = Mesh::start(config("node-0")).await.unwrap();
    let mut c = config("node-1");
    // A name that never resolves sits beside the good one: it must not stop the join.
    c.seed_hosts = vec![
        "no-such-seed.invalid:7946".to_string(),
        format!("localhost:{}", first.gossip_addr().port()),
    ];
    c.validate().unwrap();
    let second = Mesh::start(c).await.unwrap();
    wait_for("joined through the resolved name", || {
        [&first, &second]
            .iter()
            .all(|m| m.members().borrow().members.len() == 2)
    })
    .await;
}

#[test]
fn seed_host_names_are_checked() {
    let mut c = config("node-0");
    c.seed_hosts = vec!["missing-port".to_string()];
    let err = c.validate().unwrap_err();
    assert_eq!(err.field, "seed_hosts");
    assert!(err.reason.contains("missing-port"), "{err}");
}

/// A cluster-key rotation's middle step: nodes on the old key (accepting the new) and nodes
/// on the new key (accepting the old) form one cluster; a node with only the new key and
/// none accepted cannot join the old-key node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_cluster_key_keeps_old_and_new_nodes_in_one_cluster() {
    let old = ClusterKey::new(b"rotation-old-key-0000".to_vec()).unwrap();
    let new = ClusterKey::new(b"rotation-new-key-1111".to_vec()).unwrap();
    let mut a = config("old-a");
    a.cluster_key = old.clone();
    a.accepted_keys = vec![new.clone()];
    let a = Mesh::start(a).await.unwrap();
    let mut b = config("new-b");
    b.cluster_key = new.clone();
    b.accepted_keys = vec![old.clone()];
    b.seeds = vec![a.gossip_addr()];
    let b = Mesh::start(b).await.unwrap();
    let mut c = config("old-c");
    c.cluster_key = old.clone();
    c.seeds = vec![b.gossip_addr()];
    let c = Mesh::start(c).await.unwrap();
    wait_for("old and new nodes see each other", || {
        [&a, &b, &c]
            .iter()
            .all(|m| m.members().borrow().members.len() == 3)
    })
    .await;

    // Without the accepted old key, the new key alone does not open old-key gossip.
    let mut d = config("new-only");
    d.cluster_key = new.clone();
    d.seeds = vec![c.gossip_addr()];
    let d = Mesh::start(d).await.unwrap();
    wait_for("the old-key node rejects the new-only node", || {
        c.stats().gossip_rejected_auth >= 2
    })
    .await;
    assert_eq!(d.members().borrow().members.len(), 1);
}
