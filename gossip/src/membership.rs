//! SWIM membership: the foca state machine driven by one task over an authenticated UDP socket.
//!
//! The task owns foca, the socket and the timer queue; other tasks talk to it with
//! [`Input`] over a channel and read the result as a [`MemberSet`] snapshot (`watch`) or as
//! [`MembershipEvent`]s (`broadcast`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use foca::{
    AccumulatingRuntime, Foca, Identity, NoCustomBroadcast, OwnedNotification, PostcardCodec,
    State, Timer,
};
use rand_foca::SeedableRng;
use rand_foca::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::auth::{Keyring, Rejected};
use crate::ring::{NodeId, Ring};
use crate::stats::Stats;
use crate::tls::Fingerprint;

/// A node's identity in gossip: name, addresses, certificate fingerprint, incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberId {
    /// Stable node name.
    pub node: NodeId,
    /// Gossip (UDP) address.
    pub gossip: SocketAddr,
    /// Mesh RPC (QUIC) address.
    pub rpc: SocketAddr,
    /// SHA-256 of the node's TLS certificate.
    pub fingerprint: Fingerprint,
    /// Bumped on restart and on rejoin after being declared down; the larger wins.
    pub incarnation: u64,
}

impl Identity for MemberId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        // Rejoin automatically after a false "down" verdict.
        Some(MemberId {
            incarnation: self.incarnation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

impl MemberId {
    /// Stand-in identity for a seed whose real identity we learn from its reply.
    fn seed(addr: SocketAddr) -> MemberId {
        MemberId {
            node: NodeId::new(""),
            gossip: addr,
            rpc: addr,
            fingerprint: Fingerprint([0; 32]),
            incarnation: 0,
        }
    }
}

/// Runs SWIM's decoder and state machine on one authenticated packet, on a throwaway
/// member: what a peer holding the cluster key can make a node do with one datagram. For
/// the fuzzer (`fuzz/`); errors are what a node counts and drops.
#[doc(hidden)]
pub fn handle_untrusted_packet(packet: &[u8]) -> Result<(), String> {
    let me = MemberId {
        node: NodeId::new("fuzz"),
        gossip: SocketAddr::from(([127, 0, 0, 1], 7946)),
        rpc: SocketAddr::from(([127, 0, 0, 1], 7947)),
        fingerprint: Fingerprint([0; 32]),
        incarnation: 1,
    };
    let mut foca: Swim = Foca::new(
        me,
        foca::Config::simple(),
        StdRng::seed_from_u64(1),
        PostcardCodec,
    );
    let mut runtime = AccumulatingRuntime::new();
    foca.handle_data(packet, &mut runtime)
        .map_err(|e| e.to_string())
}

/// Liveness of an active member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Answering probes.
    Alive,
    /// Missed a probe; still counted as live until declared down.
    Suspect,
}

/// One live member as the rest of the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Identity as gossiped.
    pub id: MemberId,
    /// Alive or suspect.
    pub liveness: Liveness,
}

/// Live members (including this node) and the ring over them.
#[derive(Debug, Clone)]
pub struct MemberSet {
    /// This node.
    pub me: NodeId,
    /// Live members by node id (this node included).
    pub members: BTreeMap<NodeId, MemberInfo>,
    /// Rendezvous ring over `members`.
    pub ring: Arc<Ring>,
}

impl MemberSet {
    fn new(me: MemberId, others: BTreeMap<NodeId, MemberInfo>) -> MemberSet {
        let mut members = others;
        let node = me.node.clone();
        members.insert(
            node.clone(),
            MemberInfo {
                id: me,
                liveness: Liveness::Alive,
            },
        );
        let ring = Arc::new(Ring::new(members.keys().cloned()));
        MemberSet {
            me: node,
            members,
            ring,
        }
    }

    /// A live member's info.
    pub fn get(&self, node: &NodeId) -> Option<&MemberInfo> {
        self.members.get(node)
    }

    /// The live member presenting certificate `fp`, if any.
    pub fn by_fingerprint(&self, fp: &Fingerprint) -> Option<&MemberInfo> {
        self.members.values().find(|m| m.id.fingerprint == *fp)
    }

    /// Live members other than this node.
    pub fn peers(&self) -> impl Iterator<Item = &MemberInfo> {
        self.members.values().filter(|m| m.id.node != self.me)
    }
}

/// A change in membership, in the order this node observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node became live (joined, or rejoined with a new incarnation).
    Up(MemberId),
    /// A live node missed a probe.
    Suspect(NodeId),
    /// A suspect node proved it is alive.
    Alive(NodeId),
    /// A node was declared down (failed or left).
    Down(NodeId),
}

/// Requests to the membership task.
#[derive(Debug)]
pub(crate) enum Input {
    /// Announce departure, then stop.
    Leave(oneshot::Sender<()>),
}

type Swim = Foca<MemberId, PostcardCodec, StdRng, NoCustomBroadcast>;

/// Channels and state the membership task publishes into.
pub(crate) struct Outputs {
    pub members: watch::Sender<Arc<MemberSet>>,
    pub events: broadcast::Sender<MembershipEvent>,
    pub stats: Arc<Stats>,
}

/// Where a node looks for the cluster while it knows no member.
pub(crate) struct Seeds {
    /// Seeds given as addresses.
    pub(crate) fixed: Vec<SocketAddr>,
    /// Addresses of the seeds given by name, as last resolved.
    pub(crate) resolved: watch::Receiver<Vec<SocketAddr>>,
}

/// Resolves seed host names every `every` while this node knows no other member (the only
/// time seeds are used), publishing the addresses found; names that do not resolve yet are
/// retried on the next round. Ends when the driver is gone.
pub(crate) async fn resolve_seed_hosts(
    hosts: Vec<String>,
    every: Duration,
    members: watch::Receiver<Arc<MemberSet>>,
    out: watch::Sender<Vec<SocketAddr>>,
) {
    if hosts.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = out.closed() => return,
        }
        if members.borrow().members.len() > 1 {
            continue;
        }
        let mut found = Vec::new();
        for host in &hosts {
            match tokio::net::lookup_host(host.as_str()).await {
                Ok(addrs) => found.extend(addrs),
                Err(e) => {
                    tracing::debug!(seed = %host, error = %e, "seed name does not resolve yet")
                }
            }
        }
        found.sort();
        found.dedup();
        out.send_if_modified(|cur| {
            let changed = *cur != found;
            if changed {
                cur.clone_from(&found);
            }
            changed
        });
    }
}

/// The membership task.
pub(crate) struct Driver {
    foca: Swim,
    runtime: AccumulatingRuntime<MemberId>,
    socket: UdpSocket,
    key: Keyring,
    seeds: Seeds,
    join_retry: Duration,
    timers: BinaryHeap<Reverse<(Instant, Timer<MemberId>)>>,
    out: Outputs,
    seal_buf: Vec<u8>,
    last: BTreeMap<NodeId, MemberInfo>,
}

impl Driver {
    pub(crate) fn new(
        identity: MemberId,
        config: foca::Config,
        socket: UdpSocket,
        key: Keyring,
        seeds: Seeds,
        join_retry: Duration,
        out: Outputs,
    ) -> Driver {
        let seed = rand_seed(&identity);
        let foca = Foca::new(identity, config, StdRng::seed_from_u64(seed), PostcardCodec);
        Driver {
            foca,
            runtime: AccumulatingRuntime::new(),
            socket,
            key,
            seeds,
            join_retry,
            timers: BinaryHeap::new(),
            out,
            seal_buf: Vec::with_capacity(1500),
            last: BTreeMap::new(),
        }
    }

    pub(crate) async fn run(mut self, mut inputs: mpsc::Receiver<Input>) {
        let mut buf = vec![0u8; 2048];
        let mut join_tick = tokio::time::interval(self.join_retry);
        join_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(Input::Leave(done)) => {
                        let _ = self.foca.leave_cluster(&mut self.runtime);
                        self.flush().await;
                        let _ = done.send(());
                        return;
                    }
                    // The Mesh handle is gone: stop like a crashed node would.
                    None => return,
                },
                recv = self.socket.recv_from(&mut buf) => {
                    if let Ok((len, _from)) = recv {
                        self.handle_datagram(len, &buf);
                    }
                }
                () = sleep_until_opt(next_timer) => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        let Some(Reverse((_, timer))) = self.timers.pop() else { break };
                        let _ = self.foca.handle_timer(timer, &mut self.runtime);
                    }
                }
                _ = join_tick.tick() => {
                    if self.foca.num_members() == 0 {
                        let resolved = self.seeds.resolved.borrow().clone();
                        for seed in self.seeds.fixed.clone().into_iter().chain(resolved) {
                            if seed != self.foca.identity().gossip {
                                let _ = self.foca.announce(MemberId::seed(seed), &mut self.runtime);
                            }
                        }
                    }
                }
            }
            self.flush().await;
        }
    }

    fn handle_datagram(&mut self, len: usize, buf: &[u8]) {
        match self.key.open(&buf[..len]) {
            Ok(packet) => {
                Stats::add(&self.out.stats.gossip_packets_in, 1);
                match self.foca.handle_data(packet, &mut self.runtime) {
                    Ok(()) => {}
                    Err(
                        foca::Error::Decode(_)
                        | foca::Error::MalformedPacket
                        | foca::Error::DataTooBig,
                    ) => Stats::add(&self.out.stats.gossip_rejected_malformed, 1),
                    Err(e) => tracing::trace!(error = ?e, "foca ignored a packet"),
                }
            }
            Err(Rejected::BadTag) => Stats::add(&self.out.stats.gossip_rejected_auth, 1),
            Err(Rejected::Malformed) => Stats::add(&self.out.stats.gossip_rejected_malformed, 1),
        }
    }

    /// Sends what foca queued, schedules its timers and publishes membership changes.
    async fn flush(&mut self) {
        while let Some((dst, data)) = self.runtime.to_send() {
            self.key.seal(&data, &mut self.seal_buf);
            if self
                .socket
                .send_to(&self.seal_buf, dst.gossip)
                .await
                .is_ok()
            {
                Stats::add(&self.out.stats.gossip_packets_out, 1);
                Stats::add(&self.out.stats.gossip_bytes_out, self.seal_buf.len() as u64);
            }
        }
        let now = Instant::now();
        while let Some((delay, timer)) = self.runtime.to_schedule() {
            self.timers.push(Reverse((now + delay, timer)));
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::Defunct => {
                    tracing::warn!("declared down by the cluster; rejoining")
                }
                OwnedNotification::Idle => tracing::debug!("no live peers"),
                _ => {}
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let mut now: BTreeMap<NodeId, MemberInfo> = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            let liveness = match m.state() {
                State::Alive => Liveness::Alive,
                State::Suspect => Liveness::Suspect,
                State::Down => continue,
            };
            let id = m.id();
            if id.node.as_str().is_empty() {
                continue;
            }
            let info = MemberInfo {
                id: id.clone(),
                liveness,
            };
            // Two identities with one node name (a restart on a new address): newest wins.
            match now.get(&id.node) {
                Some(prev) if prev.id.incarnation >= id.incarnation => {}
                _ => {
                    now.insert(id.node.clone(), info);
                }
            }
        }
        let me = self.foca.identity().clone();
        now.remove(&me.node);
        if now == self.last {
            return;
        }
        let events = diff(&self.last, &now);
        self.last = now.clone();
        let _ = self.out.members.send(Arc::new(MemberSet::new(me, now)));
        for e in events {
            let _ = self.out.events.send(e);
        }
    }
}

fn diff(
    before: &BTreeMap<NodeId, MemberInfo>,
    after: &BTreeMap<NodeId, MemberInfo>,
) -> Vec<MembershipEvent> {
    let mut out = Vec::new();
    for (node, b) in before {
        if !after.contains_key(node) {
            let _ = b;
            out.push(MembershipEvent::Down(node.clone()));
        }
    }
    for (node, a) in after {
        match before.get(node) {
            None => out.push(MembershipEvent::Up(a.id.clone())),
            Some(b) if b.id != a.id => out.push(MembershipEvent::Up(a.id.clone())),
            Some(b) if b.liveness != a.liveness => out.push(match a.liveness {
                Liveness::Suspect => MembershipEvent::Suspect(node.clone()),
                Liveness::Alive => MembershipEvent::Alive(node.clone()),
            }),
            Some(_) => {}
        }
    }
    out
}

/// Initial member set holding only this node.
pub(crate) fn solo(me: MemberId) -> MemberSet {
    MemberSet::new(me, BTreeMap::new())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn rand_seed(id: &MemberId) -> u64 {
    // Distinct per node and per start; foca only needs it to pick probe targets.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    xxhash_rust::xxh64::xxh64(id.node.as_str().as_bytes(), nanos ^ id.incarnation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mid(name: &str, inc: u64) -> MemberId {
        MemberId {
            node: NodeId::new(name),
            gossip: "127.0.0.1:1".parse().unwrap(),
            rpc: "127.0.0.1:2".parse().unwrap(),
            fingerprint: Fingerprint([1; 32]),
            incarnation: inc,
        }
    }

    fn info(name: &str, inc: u64, l: Liveness) -> (NodeId, MemberInfo) {
        (
            NodeId::new(name),
            MemberInfo {
                id: mid(name, inc),
                liveness: l,
            },
        )
    }

    #[test]
    fn diff_reports_up_suspect_alive_down_and_rejoin() {
        let a: BTreeMap<_, _> =
            [info("x", 1, Liveness::Alive), info("y", 1, Liveness::Alive)].into();
        let b: BTreeMap<_, _> = [
            info("x", 1, Liveness::Suspect),
            info("z", 1, Liveness::Alive),
        ]
        .into();
        assert_eq!(
            diff(&a, &b),
            vec![
                MembershipEvent::Down(NodeId::new("y")),
                MembershipEvent::Suspect(NodeId::new("x")),
                MembershipEvent::Up(mid("z", 1)),
            ]
        );
        let c: BTreeMap<_, _> =
            [info("x", 2, Liveness::Alive), info("z", 1, Liveness::Alive)].into();
        assert_eq!(diff(&b, &c), vec![MembershipEvent::Up(mid("x", 2))]);
        let d: BTreeMap<_, _> = [
            info("x", 2, Liveness::Suspect),
            info("z", 1, Liveness::Alive),
        ]
        .into();
        assert_eq!(diff(&d, &c), vec![MembershipEvent::Alive(NodeId::new("x"))]);
    }

    #[test]
    fn identity_renews_and_newest_incarnation_wins() {
        let a = mid("x", 5);
        let b = a.renew().unwrap();
        assert_eq!(b.incarnation, 6);
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
    }

    /// Deterministic SWIM simulation: real foca instances, our config, a virtual clock and an
    /// in-memory network (no sockets, no sleeps). Checks the detection arithmetic.
    mod sim {
        use super::*;
        use crate::config::SwimConfig;
        use std::collections::HashMap;

        enum Event {
            Deliver { to: usize, data: Vec<u8> },
            Timer { node: usize, timer: Timer<MemberId> },
        }

        struct Sim {
            nodes: Vec<Option<Swim>>,
            ids: Vec<MemberId>,
            queue: BinaryHeap<Reverse<(Duration, u64)>>,
            events: HashMap<u64, Event>,
            seq: u64,
            now: Duration,
            latency: Duration,
            /// A node whose datagrams, both ways, are dropped.
            blackholed: Option<usize>,
        }

        impl Sim {
            fn new(n: usize, config: &SwimConfig, seed: u64) -> Sim {
                let ids: Vec<MemberId> = (0..n)
                    .map(|i| MemberId {
                        node: NodeId::new(format!("n{i}")),
                        gossip: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
                        rpc: SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16)),
                        fingerprint: Fingerprint([i as u8; 32]),
                        incarnation: 1,
                    })
                    .collect();
                let nodes = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let rng =
                            StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(i as u64));
                        Some(Foca::new(
                            id.clone(),
                            config.foca_config(),
                            rng,
                            PostcardCodec,
                        ))
                    })
                    .collect();
                Sim {
                    nodes,
                    ids,
                    queue: BinaryHeap::new(),
                    events: HashMap::new(),
                    seq: 0,
                    now: Duration::ZERO,
                    latency: Duration::from_micros(300),
                    blackholed: None,
                }
            }

            fn push(&mut self, at: Duration, e: Event) {
                self.seq += 1;
                self.queue.push(Reverse((at, self.seq)));
                self.events.insert(self.seq, e);
            }

            fn drain(&mut self, node: usize, rt: &mut AccumulatingRuntime<MemberId>) {
                while let Some((dst, data)) = rt.to_send() {
                    let to = self
                        .ids
                        .iter()
                        .position(|id| id.gossip == dst.gossip)
                        .unwrap();
                    if self.blackholed.is_some_and(|b| b == node || b == to) {
                        continue;
                    }
                    self.push(
                        self.now + self.latency,
                        Event::Deliver {
                            to,
                            data: data.to_vec(),
                        },
                    );
                }
                while let Some((delay, timer)) = rt.to_schedule() {
                    self.push(self.now + delay, Event::Timer { node, timer });
                }
                while rt.to_notify().is_some() {}
            }

            fn join_all(&mut self) {
                for i in 1..self.ids.len() {
                    let mut rt = AccumulatingRuntime::new();
                    let dst = self.ids[0].clone();
                    self.nodes[i]
                        .as_mut()
                        .unwrap()
                        .announce(dst, &mut rt)
                        .unwrap();
                    self.drain(i, &mut rt);
                }
            }

            /// Runs until `until` or until `stop` holds (checked after each event).
            fn run(
                &mut self,
                until: Duration,
                mut stop: impl FnMut(&Sim) -> bool,
            ) -> Option<Duration> {
                while let Some(Reverse((at, seq))) = self.queue.pop() {
                    if at > until {
                        self.queue.push(Reverse((at, seq)));
                        self.now = until;
                        return None;
                    }
                    self.now = at;
                    let event = self.events.remove(&seq).unwrap();
                    let mut rt = AccumulatingRuntime::new();
                    let node = match event {
                        Event::Deliver { to, data } => {
                            if let Some(f) = self.nodes[to].as_mut() {
                                let _ = f.handle_data(&data, &mut rt);
                            }
                            to
                        }
                        Event::Timer { node, timer } => {
                            if let Some(f) = self.nodes[node].as_mut() {
                                let _ = f.handle_timer(timer, &mut rt);
                            }
                            node
                        }
                    };
                    self.drain(node, &mut rt);
                    if stop(self) {
                        return Some(self.now);
                    }
                }
                None
            }

            fn live_view(&self, node: usize) -> Vec<String> {
                let mut v: Vec<String> = self.nodes[node]
                    .as_ref()
                    .unwrap()
                    .iter_members()
                    .map(|m| m.id().node.to_string())
                    .collect();
                v.sort();
                v
            }
        }

        #[test]
        fn the_two_sides_of_a_healed_blackhole_find_each_other_again() {
            let config = SwimConfig::default();
            let n = 3;
            for seed in 0..5u64 {
                let mut sim = Sim::new(n, &config, seed);
                sim.join_all();
                let formed = sim.run(Duration::from_secs(5), |s| {
                    (0..n).all(|i| s.live_view(i).len() == n - 1)
                });
                assert!(formed.is_some(), "seed {seed}: cluster did not form");
                // Node 0 is the one every other node joined through: no one has a seed
                // to announce to afterwards, only the down members.
                let victim = 0;
                sim.blackholed = Some(victim);
                let split = sim.run(sim.now + Duration::from_secs(20), |s| {
                    s.live_view(victim).is_empty() && (1..n).all(|i| s.live_view(i).len() == n - 2)
                });
                assert!(
                    split.is_some(),
                    "seed {seed}: the blackhole was not noticed"
                );
                sim.blackholed = None;
                let healed_at = sim.now;
                let healed = sim.run(healed_at + Duration::from_secs(10), |s| {
                    (0..n).all(|i| s.live_view(i).len() == n - 1)
                });
                assert!(
                    healed.is_some(),
                    "seed {seed}: still split 10 s after the blackhole healed"
                );
            }
        }

        #[test]
        fn default_config_detects_a_killed_node_within_the_bound_and_never_falsely() {
            let config = SwimConfig::default();
            let n = config.expected_cluster_size.get() as usize;
            let bound = config.detection_bound();
            let mut worst = Duration::ZERO;
            for seed in 0..20u64 {
                let mut sim = Sim::new(n, &config, seed);
                sim.join_all();
                let joined = sim.run(Duration::from_secs(5), |s| {
                    (0..n).all(|i| s.live_view(i).len() == n - 1)
                });
                assert!(joined.is_some(), "seed {seed}: cluster did not form");
                // Steady state with a lossless network: nobody is ever declared down.
                let false_down = sim.run(sim.now + Duration::from_secs(10), |s| {
                    (0..n).any(|i| s.live_view(i).len() != n - 1)
                });
                assert!(
                    false_down.is_none(),
                    "seed {seed}: false positive at {false_down:?}"
                );

                let victim = (seed as usize) % n;
                sim.nodes[victim] = None;
                let killed_at = sim.now;
                let victim_name = sim.ids[victim].node.to_string();
                let detected = sim.run(killed_at + Duration::from_secs(10), |s| {
                    (0..n)
                        .filter(|i| *i != victim)
                        .all(|i| !s.live_view(i).contains(&victim_name))
                });
                let took = detected.expect("detected") - killed_at;
                assert!(
                    took <= bound,
                    "seed {seed}: detection took {took:?} > bound {bound:?}"
                );
                worst = worst.max(took);
                // Survivors keep each other.
                for i in (0..n).filter(|i| *i != victim) {
                    assert_eq!(sim.live_view(i).len(), n - 2, "seed {seed}");
                }
            }
            eprintln!("worst simulated detection over 20 seeds: {worst:?} (bound {bound:?})");
            assert!(worst > Duration::ZERO);
        }
    }
}
