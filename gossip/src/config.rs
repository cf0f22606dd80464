//! Typed mesh configuration with validation and presets that say where their numbers come from.

use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{ClusterKey, ENVELOPE_OVERHEAD};
use crate::ring::NodeId;
use crate::tls::TlsConfig;

/// Everything `Mesh::start` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// This node's stable name; the ring hashes it.
    pub node_id: NodeId,
    /// UDP address foca listens on.
    pub gossip_bind: SocketAddr,
    /// UDP address QUIC mesh RPC listens on.
    pub rpc_bind: SocketAddr,
    /// Gossip address other nodes reach us at (needed when binding a wildcard address).
    #[serde(default)]
    pub advertise_gossip: Option<SocketAddr>,
    /// RPC address other nodes reach us at (needed when binding a wildcard address).
    #[serde(default)]
    pub advertise_rpc: Option<SocketAddr>,
    /// Gossip addresses of nodes to join through.
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// Seeds named `HOST:PORT` (e.g. a StatefulSet pod's DNS name on a headless Service),
    /// resolved again on every join attempt while no member is known, so a seed whose name
    /// does not resolve yet (its pod is still starting) is found once it does.
    #[serde(default)]
    pub seed_hosts: Vec<String>,
    /// Shared secret authenticating every gossip datagram.
    pub cluster_key: ClusterKey,
    /// Further keys whose datagrams are accepted (never used to seal): the other key of a
    /// cluster-key rotation in progress.
    #[serde(default)]
    pub accepted_keys: Vec<ClusterKey>,
    /// SWIM timing.
    #[serde(default)]
    pub swim: SwimConfig,
    /// How mesh RPC is secured.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Mesh RPC limits.
    #[serde(default)]
    pub rpc: RpcConfig,
    /// Load board timing.
    #[serde(default)]
    pub load: LoadConfig,
    /// Prefix ownership.
    #[serde(default)]
    pub prefix: PrefixConfig,
}

impl MeshConfig {
    /// A node bound to `127.0.0.1:0` for both gossip and RPC, defaults elsewhere.
    pub fn loopback(node_id: impl Into<String>, cluster_key: ClusterKey) -> MeshConfig {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        MeshConfig {
            node_id: NodeId::new(node_id),
            gossip_bind: any,
            rpc_bind: any,
            advertise_gossip: None,
            advertise_rpc: None,
            seeds: Vec::new(),
            seed_hosts: Vec::new(),
            cluster_key,
            accepted_keys: Vec::new(),
            swim: SwimConfig::default(),
            tls: TlsConfig::default(),
            rpc: RpcConfig::default(),
            load: LoadConfig::default(),
            prefix: PrefixConfig::default(),
        }
    }

    /// Checks every field; the first problem found is returned with its field name.
    pub fn validate(&self) -> Result<(), InvalidMeshConfig> {
        let bad = |field: &'static str, reason: String| Err(InvalidMeshConfig { field, reason });
        if self.node_id.as_str().is_empty() {
            return bad("node_id", "must not be empty".into());
        }
        if self.gossip_bind.ip().is_unspecified() && self.advertise_gossip.is_none() {
            return bad(
                "advertise_gossip",
                format!(
                    "required when gossip_bind is the wildcard {}",
                    self.gossip_bind
                ),
            );
        }
        if self.rpc_bind.ip().is_unspecified() && self.advertise_rpc.is_none() {
            return bad(
                "advertise_rpc",
                format!("required when rpc_bind is the wildcard {}", self.rpc_bind),
            );
        }
        for host in &self.seed_hosts {
            if let Err(reason) = check_host_port(host) {
                return bad("seed_hosts", format!("{host:?}: {reason}"));
            }
        }
        self.swim.validate()?;
        self.rpc.validate()?;
        self.load.validate()?;
        self.prefix.validate()
    }
}

/// Checks a `HOST:PORT` seed name: a non-empty host and a port number.
pub fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("expected HOST:PORT".into());
    };
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err("the host part is not a host name".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{port:?} is not a port number (1-65535)")),
    }
}

/// A configuration value that cannot be used; nothing was started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mesh config `{field}`: {reason}")]
pub struct InvalidMeshConfig {
    /// Offending field (dotted path).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn nonzero(field: &'static str, d: Duration) -> Result<(), InvalidMeshConfig> {
    if d.is_zero() {
        return Err(InvalidMeshConfig {
            field,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(())
}

/// SWIM (foca) timing.
///
/// Derived from foca's `Config::new_lan` (itself memberlist's `DefaultLANConfig`), scaled
/// down for a LAN/loopback routing tier where detection must be ≤ 2 s:
/// - `probe_period` 200 ms (LAN preset: 1 s), `probe_rtt` 100 ms (preset: 500 ms).
/// - `suspect_to_down_after` = max(1, log10(N)) × `suspicion_multiplier` × `probe_period`
///   (preset multiplier 4; ours 3): 0.6 s for N ≤ 10.
/// - periodic gossip every 100 ms to 3 members (preset: 200 ms).
///
/// Detection of a killed node = waiting until some survivor probes it, plus the failed probe
/// cycle, plus the suspicion timeout, plus a gossip round to spread the verdict. Each node
/// probes its members in a shuffled round robin, one per period, so the wait is usually
/// under one period with several probers but at worst N−1 periods. For N = 5:
/// typical 0.2 + 0.2 + 0.6 + 0.1 ≈ 1.1 s, worst 0.8 + 0.2 + 0.6 + 0.1 = 1.7 s
/// ([`SwimConfig::detection_bound`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwimConfig {
    /// How often each node probes one member.
    #[serde(with = "humantime_serde")]
    pub probe_period: Duration,
    /// How long to wait for a direct ack before indirect probes.
    #[serde(with = "humantime_serde")]
    pub probe_rtt: Duration,
    /// Multiplier in the suspicion timeout formula (foca's LAN preset uses 4).
    pub suspicion_multiplier: f64,
    /// Expected number of nodes (sets retransmissions and suspicion timeout).
    pub expected_cluster_size: NonZeroU32,
    /// Interval of periodic gossip of membership updates.
    #[serde(with = "humantime_serde")]
    pub gossip_interval: Duration,
    /// Interval of periodic announces that discover the full member list.
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
    /// How often to retry announcing to seeds while no member is known.
    #[serde(with = "humantime_serde")]
    pub join_retry: Duration,
    /// Interval of announces to members declared down, so the two sides of a healed
    /// partition (or blackhole) find each other again without a restart.
    #[serde(with = "humantime_serde")]
    pub down_announce_interval: Duration,
}

impl Default for SwimConfig {
    fn default() -> Self {
        SwimConfig {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(100),
            suspicion_multiplier: 3.0,
            expected_cluster_size: NonZeroU32::new(5).expect("nonzero"),
            gossip_interval: Duration::from_millis(100),
            announce_interval: Duration::from_secs(5),
            join_retry: Duration::from_millis(250),
            down_announce_interval: Duration::from_secs(1),
        }
    }
}

impl SwimConfig {
    fn validate(&self) -> Result<(), InvalidMeshConfig> {
        nonzero("swim.probe_period", self.probe_period)?;
        nonzero("swim.probe_rtt", self.probe_rtt)?;
        nonzero("swim.gossip_interval", self.gossip_interval)?;
        nonzero("swim.announce_interval", self.announce_interval)?;
        nonzero("swim.down_announce_interval", self.down_announce_interval)?;
        nonzero("swim.join_retry", self.join_retry)?;
        if self.probe_rtt >= self.probe_period {
            return Err(InvalidMeshConfig {
                field: "swim.probe_rtt",
                reason: format!(
                    "{:?} must be smaller than swim.probe_period {:?}",
                    self.probe_rtt, self.probe_period
                ),
            });
        }
        if !(self.suspicion_multiplier.is_finite() && self.suspicion_multiplier >= 1.0) {
            return Err(InvalidMeshConfig {
                field: "swim.suspicion_multiplier",
                reason: format!("{} must be a finite number ≥ 1", self.suspicion_multiplier),
            });
        }
        Ok(())
    }

    /// How long a suspect stays active before being declared down.
    pub fn suspect_to_down_after(&self) -> Duration {
        let n = f64::from(self.expected_cluster_size.get());
        self.probe_period
            .mul_f64(n.log10().max(1.0) * self.suspicion_multiplier)
    }

    /// Worst-case time from a node's death to every node seeing it down, for a cluster of
    /// `expected_cluster_size`: (N−1) periods until probed + 1 failed probe period +
    /// suspicion + one gossip round.
    pub fn detection_bound(&self) -> Duration {
        self.probe_period * self.expected_cluster_size.get()
            + self.suspect_to_down_after()
            + self.gossip_interval
    }

    /// The foca configuration these settings produce.
    pub fn foca_config(&self) -> foca::Config {
        let mut c = foca::Config::new_lan(self.expected_cluster_size);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down_after();
        c.max_packet_size = NonZeroUsize::new(1400 - ENVELOPE_OVERHEAD).expect("nonzero");
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_interval,
            num_members: NonZeroUsize::new(3).expect("nonzero"),
        });
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.announce_interval,
            num_members: NonZeroUsize::new(1).expect("nonzero"),
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.down_announce_interval,
            num_members: NonZeroUsize::new(2).expect("nonzero"),
        });
        c
    }
}

/// Mesh RPC (QUIC) limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// Bound on establishing a connection to a peer.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Default bound on a request/response exchange and on a one-way send.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A connection with no traffic for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long an accepted connection may wait for its certificate to appear in membership.
    #[serde(with = "humantime_serde")]
    pub admission_timeout: Duration,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            admission_timeout: Duration::from_secs(3),
        }
    }
}

impl RpcConfig {
    fn validate(&self) -> Result<(), InvalidMeshConfig> {
        nonzero("rpc.connect_timeout", self.connect_timeout)?;
        nonzero("rpc.request_timeout", self.request_timeout)?;
        nonzero("rpc.idle_timeout", self.idle_timeout)?;
        nonzero("rpc.admission_timeout", self.admission_timeout)
    }
}

/// Load board timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// How often changed scrapes are pushed to the other nodes (bounds their added
    /// latency); changed in-flight counts go out at once, at most one batch per millisecond.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How often a node re-sends its whole table (repairs divergence, feeds newcomers).
    #[serde(with = "humantime_serde")]
    pub full_sync_interval: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            flush_interval: Duration::from_millis(10),
            full_sync_interval: Duration::from_secs(1),
        }
    }
}

impl LoadConfig {
    fn validate(&self) -> Result<(), InvalidMeshConfig> {
        nonzero("load.flush_interval", self.flush_interval)?;
        nonzero("load.full_sync_interval", self.full_sync_interval)
    }
}

/// Prefix ownership settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixConfig {
    /// Owners per anchor (R).
    pub replicas: NonZeroUsize,
    /// Budget for a remote lookup before scoring without prefix data.
    #[serde(with = "humantime_serde")]
    pub lookup_budget: Duration,
    /// How long records wait to be batched before sending.
    #[serde(with = "humantime_serde")]
    pub record_flush_interval: Duration,
    /// Records per batch that trigger an early send.
    pub record_batch_max: NonZeroUsize,
    /// Block entries the built-in index holds on this node (all shards together).
    pub capacity_blocks: NonZeroUsize,
    /// Independently locked index shards (by anchor).
    pub shards: NonZeroUsize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            replicas: NonZeroUsize::new(2).expect("nonzero"),
            lookup_budget: Duration::from_millis(2),
            record_flush_interval: Duration::from_millis(5),
            record_batch_max: NonZeroUsize::new(256).expect("nonzero"),
            capacity_blocks: NonZeroUsize::new(1_000_000).expect("nonzero"),
            shards: NonZeroUsize::new(16).expect("nonzero"),
        }
    }
}

impl PrefixConfig {
    fn validate(&self) -> Result<(), InvalidMeshConfig> {
        nonzero("prefix.lookup_budget", self.lookup_budget)?;
        nonzero("prefix.record_flush_interval", self.record_flush_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::new(b"0123456789abcdef".to_vec()).unwrap()
    }

    #[test]
    fn defaults_validate_and_detect_within_two_seconds() {
        let c = MeshConfig::loopback("n1", key());
        c.validate().unwrap();
        assert_eq!(c.swim.suspect_to_down_after(), Duration::from_millis(600));
        assert_eq!(c.swim.detection_bound(), Duration::from_millis(1700));
        let f = c.swim.foca_config();
        assert_eq!(f.probe_period, Duration::from_millis(200));
        assert_eq!(f.max_packet_size.get(), 1400 - ENVELOPE_OVERHEAD);
    }

    #[test]
    fn invalid_values_name_their_field() {
        let mut c = MeshConfig::loopback("n1", key());
        c.swim.probe_rtt = Duration::from_secs(1);
        assert_eq!(c.validate().unwrap_err().field, "swim.probe_rtt");
        let mut c = MeshConfig::loopback("n1", key());
        c.rpc_bind = "0.0.0.0:7000".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().field, "advertise_rpc");
        let mut c = MeshConfig::loopback("", key());
        c.node_id = NodeId::new("");
        assert_eq!(c.validate().unwrap_err().field, "node_id");
    }

    #[test]
    fn parses_from_yaml_like_json_with_humane_durations() {
        let json = r#"{
            "node_id": "n1", "gossip_bind": "127.0.0.1:0", "rpc_bind": "127.0.0.1:0",
            "seeds": ["127.0.0.1:7946"], "cluster_key": "a-long-enough-secret",
            "swim": {"probe_period": "500ms"}, "prefix": {"replicas": 3, "lookup_budget": "3ms"}
        }"#;
        let c: MeshConfig = serde_json_like(json);
        assert_eq!(c.swim.probe_period, Duration::from_millis(500));
        assert_eq!(c.swim.probe_rtt, Duration::from_millis(100));
        assert_eq!(c.prefix.replicas.get(), 3);
        c.validate().unwrap();
        let unknown = r#"{"node_id":"n","gossip_bind":"127.0.0.1:0","rpc_bind":"127.0.0.1:0","cluster_key":"a-long-enough-secret","bogus":1}"#;
        assert!(postcard_free_parse(unknown).is_err());
        let short = r#"{"node_id":"n","gossip_bind":"127.0.0.1:0","rpc_bind":"127.0.0.1:0","cluster_key":"short"}"#;
        assert!(
            postcard_free_parse(short)
                .unwrap_err()
                .contains("at least 16")
        );
    }

    fn serde_json_like(s: &str) -> MeshConfig {
        postcard_free_parse(s).unwrap()
    }

    fn postcard_free_parse(s: &str) -> Result<MeshConfig, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }
}
