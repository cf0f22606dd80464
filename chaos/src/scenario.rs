//! The faults the suite knows and the named scenarios that string them together.

use std::fmt;
use std::time::Duration;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL a node; restart it on its data after the hold.
    Kill,
    /// SIGSTOP a node (sockets stay open); SIGCONT after the hold.
    Pause,
    /// SIGSTOP the node that holds Envoy's ADS stream.
    PauseAds,
    /// Drop everything between a node and the other nodes, both ways.
    Partition,
    /// Drop what the other nodes send a node; it still sends.
    OneWay,
    /// Drop everything to and from a node, Envoy and pods included.
    Blackhole,
    /// Drop 30 % of a node's packets at random, both ways.
    Loss,
    /// Delay everything between Envoy and one node's ext_proc server by 400 ms (userspace
    /// relay).
    Delay,
    /// Fill the Raft leader's data directory (a small tmpfs) while writes flow.
    DiskFull,
    /// SIGKILL a pod; restart it after the hold.
    PodKill,
    /// SIGSTOP a pod: connections open, nothing answers (a hung engine).
    PodHang,
    /// Stutter a pod (stopped 80 % of every second): slow answers and slow /metrics.
    PodSlow,
    /// Kill Envoy and start it again.
    EnvoyRestart,
    /// SIGTERM and restart every node in turn, each after the previous one rejoined.
    RollingRestart,
    /// SIGKILL the Raft leader while writes flow; restart it after the hold.
    LeaderKill,
    /// Cut the Raft leader off from the other nodes while writes flow through every node.
    LeaderPartition,
}

impl FaultKind {
    /// Every kind, in report order.
    pub const ALL: [FaultKind; 16] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::PauseAds,
        FaultKind::Partition,
        FaultKind::OneWay,
        FaultKind::Blackhole,
        FaultKind::Loss,
        FaultKind::Delay,
        FaultKind::DiskFull,
        FaultKind::PodKill,
        FaultKind::PodHang,
        FaultKind::PodSlow,
        FaultKind::EnvoyRestart,
        FaultKind::RollingRestart,
        FaultKind::LeaderKill,
        FaultKind::LeaderPartition,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::PauseAds => "pause-ads",
            FaultKind::Partition => "partition",
            FaultKind::OneWay => "one-way",
            FaultKind::Blackhole => "blackhole",
            FaultKind::Loss => "loss",
            FaultKind::Delay => "delay",
            FaultKind::DiskFull => "disk-full",
            FaultKind::PodKill => "pod-kill",
            FaultKind::PodHang => "pod-hang",
            FaultKind::PodSlow => "pod-slow",
            FaultKind::EnvoyRestart => "envoy-restart",
            FaultKind::RollingRestart => "rolling-restart",
            FaultKind::LeaderKill => "leader-kill",
            FaultKind::LeaderPartition => "leader-partition",
        }
    }

    /// Whether it needs namespace mode (nftables between hosts).
    pub fn needs_netns(self) -> bool {
        matches!(
            self,
            FaultKind::Partition
                | FaultKind::OneWay
                | FaultKind::Blackhole
                | FaultKind::Loss
                | FaultKind::LeaderPartition
        )
    }

    /// Whether it needs Envoy.
    pub fn needs_envoy(self) -> bool {
        matches!(
            self,
            FaultKind::PauseAds | FaultKind::Delay | FaultKind::EnvoyRestart
        )
    }

    /// Whether it strikes an infermesh node (as opposed to a pod or Envoy).
    pub fn strikes_node(self) -> bool {
        !matches!(
            self,
            FaultKind::PodKill | FaultKind::PodHang | FaultKind::PodSlow | FaultKind::EnvoyRestart
        )
    }

    /// How long the fault is held before it is healed.
    pub fn hold(self) -> Duration {
        match self {
            FaultKind::EnvoyRestart | FaultKind::RollingRestart => Duration::ZERO,
            // Longer than Envoy's ext_proc message timeout (10 s): a stream stuck on the
            // victim would fail inside the hold, not be rescued by the heal.
            FaultKind::Pause
            | FaultKind::PauseAds
            | FaultKind::Partition
            | FaultKind::OneWay
            | FaultKind::Blackhole
            | FaultKind::LeaderPartition => Duration::from_secs(12),
            _ => Duration::from_secs(5),
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A named list of faults, each repeated `rounds` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// Faults in order.
    pub faults: Vec<FaultKind>,
    /// Rounds of each fault.
    pub rounds: usize,
}

/// Named scenarios besides the single faults.
pub const GROUPS: [(&str, &str); 4] = [
    (
        "ci",
        "kill, pause-ads and partition, two rounds each (a few minutes)",
    ),
    (
        "all",
        "every fault kind once (network faults only in namespace mode)",
    ),
    (
        "failover",
        "kill and pause, ten rounds each: failover time p50/p99",
    ),
    (
        "policy",
        "leader kill and leader partition, five rounds each, while writes flow",
    ),
];

/// The scenario called `name` (a group or a single fault kind), with `rounds` overriding
/// its default.
pub fn scenario(name: &str, rounds: Option<usize>) -> Option<Scenario> {
    let (faults, default_rounds) = match name {
        "ci" => (
            vec![FaultKind::Kill, FaultKind::PauseAds, FaultKind::Partition],
            2,
        ),
        "all" => (FaultKind::ALL.to_vec(), 1),
        "failover" => (vec![FaultKind::Kill, FaultKind::Pause], 10),
        "policy" => (vec![FaultKind::LeaderKill, FaultKind::LeaderPartition], 5),
        other => (vec![FaultKind::parse(other)?], 3),
    };
    Some(Scenario {
        name: name.to_owned(),
        faults,
        rounds: rounds.unwrap_or(default_rounds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_groups_resolve() {
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
        }
        assert_eq!(scenario("ci", None).unwrap().faults.len(), 3);
        assert_eq!(scenario("pause", Some(10)).unwrap().rounds, 10);
        assert!(scenario("nonsense", None).is_none());
    }
}
