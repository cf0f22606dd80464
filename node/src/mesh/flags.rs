//! `infermesh serve` flags that start the mesh (none given = single-node mode).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use infermesh_gossip::{ClusterKey, MeshConfig};

use super::MeshOptions;

/// Environment variable read for the cluster key when no key flag is given.
pub const CLUSTER_KEY_ENV: &str = "INFERMESH_CLUSTER_KEY";

/// One `--seeds` entry: an address, or a `HOST:PORT` name resolved by DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedArg {
    /// An `IP:PORT` literal.
    Addr(SocketAddr),
    /// A `HOST:PORT` name.
    Host(String),
}

impl std::str::FromStr for SeedArg {
    type Err = String;

    fn from_str(s: &str) -> Result<SeedArg, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(SeedArg::Addr(a));
        }
        infermesh_gossip::check_host_port(s).map_err(|e| format!("seed {s:?}: {e}"))?;
        Ok(SeedArg::Host(s.to_owned()))
    }
}

impl From<SocketAddr> for SeedArg {
    fn from(a: SocketAddr) -> SeedArg {
        SeedArg::Addr(a)
    }
}

/// Mesh flags of `infermesh serve`. The mesh starts when `--gossip-addr` or `--seeds` is
/// given; without them the node runs alone, exactly as before.
#[derive(Debug, Clone, Default, Args)]
pub struct MeshArgs {
    /// This node's stable name in the mesh (default: $HOSTNAME, else derived from --gossip-addr).
    #[arg(long)]
    pub node_name: Option<String>,
    /// UDP address of SWIM gossip (enables the mesh), e.g. 10.0.0.5:7946.
    #[arg(long)]
    pub gossip_addr: Option<SocketAddr>,
    /// UDP address of mesh RPC over QUIC (default: the gossip IP, any free port).
    #[arg(long)]
    pub mesh_addr: Option<SocketAddr>,
    /// Gossip addresses of nodes to join through (comma-separated): `IP:PORT`, or
    /// `HOST:PORT` names (e.g. StatefulSet pods on a headless Service) resolved again on
    /// every join attempt until one answers.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<SeedArg>,
    /// File holding the shared cluster key (at least 16 bytes; surrounding whitespace ignored).
    #[arg(long, conflicts_with = "cluster_key")]
    pub cluster_key_file: Option<PathBuf>,
    /// The shared cluster key itself (prefer --cluster-key-file or $INFERMESH_CLUSTER_KEY).
    #[arg(long)]
    pub cluster_key: Option<String>,
    /// A file holding a further key whose gossip is accepted but never sent (repeatable):
    /// the other key while the cluster key is rotated. Rotate in three rolling restarts:
    /// accept the new key; make it the cluster key and accept the old one; drop the old.
    #[arg(long)]
    pub cluster_key_accept_file: Vec<PathBuf>,
    /// Secure the mesh's QUIC with certificates a cluster CA issued (mutual TLS, each side
    /// verifying the chain) instead of self-signed ones pinned through gossip: the CA file.
    #[arg(long, requires_all = ["mesh_cert_file", "mesh_key_file", "mesh_server_name"])]
    pub mesh_ca_file: Option<PathBuf>,
    /// This node's mesh certificate chain (PEM), issued by --mesh-ca-file's CA.
    #[arg(long, requires = "mesh_ca_file")]
    pub mesh_cert_file: Option<PathBuf>,
    /// This node's mesh private key (PEM).
    #[arg(long, requires = "mesh_ca_file")]
    pub mesh_key_file: Option<PathBuf>,
    /// The DNS name every node's mesh certificate carries (used as SNI and checked).
    #[arg(long, requires = "mesh_ca_file")]
    pub mesh_server_name: Option<String>,
    /// Longest a prefix lookup at the anchor's owner may take before scoring without prefix data.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    pub prefix_lookup_budget: Duration,
    /// Owners per prefix anchor (R).
    #[arg(long, default_value_t = 2)]
    pub prefix_replicas: usize,
    /// Join the mesh but route as an independent replica: no shared load, no prefix lookups.
    #[arg(long)]
    pub no_mesh_sharing: bool,
    /// With the flowControl gate, keep one queue per node that divides the dispatch budget
    /// by the live node count, instead of one queue for the tier held by the owner of a
    /// rendezvous key (the default with a sharing mesh).
    #[arg(long)]
    pub flow_control_per_node: bool,
    /// With the flowControl gate, the longest a dispatch waits for the pod pick of the
    /// dispatch before it, so that picks made on different nodes see each other (0s: no
    /// wait; a pick is reported within a round trip, so this only bounds a lost report).
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pub flow_control_pick_fence: Duration,
}

/// The mesh flags cannot be used; nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum InvalidMeshFlags {
    /// No cluster key was given although the mesh is enabled.
    #[error(
        "the mesh needs a cluster key: give --cluster-key-file, --cluster-key or ${CLUSTER_KEY_ENV}"
    )]
    NoKey,
    /// The key file could not be read.
    #[error("cannot read cluster key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The key is unusable (too short).
    #[error("cluster key: {0}")]
    Key(#[from] infermesh_gossip::auth::InvalidClusterKey),
    /// A flag has an unusable value.
    #[error("--{flag}: {reason}")]
    Flag {
        /// Flag name.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The resulting mesh configuration is invalid.
    #[error(transparent)]
    Config(#[from] infermesh_gossip::InvalidMeshConfig),
}

impl MeshArgs {
    /// Whether any flag asks for the mesh.
    pub fn enabled(&self) -> bool {
        self.gossip_addr.is_some() || !self.seeds.is_empty()
    }

    /// The mesh options these flags describe; `Ok(None)` = single-node mode.
    pub fn options(&self) -> Result<Option<MeshOptions>, InvalidMeshFlags> {
        if !self.enabled() {
            if self.node_name.is_some() || self.mesh_addr.is_some() {
                return Err(InvalidMeshFlags::Flag {
                    flag: "gossip-addr",
                    reason: "--node-name/--mesh-addr need --gossip-addr or --seeds".into(),
                });
            }
            return Ok(None);
        }
        let key = self.key()?;
        let gossip = self
            .gossip_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let name = self
            .node_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("infermesh-{gossip}"));
        let mut config = MeshConfig::loopback(name, key);
        config.accepted_keys = self.accepted_keys()?;
        if let (Some(ca), Some(cert), Some(key), Some(name)) = (
            &self.mesh_ca_file,
            &self.mesh_cert_file,
            &self.mesh_key_file,
            &self.mesh_server_name,
        ) {
            config.tls = infermesh_gossip::TlsConfig::ClusterCa {
                ca_cert: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: name.clone(),
            };
        }
        config.gossip_bind = gossip;
        config.rpc_bind = self
            .mesh_addr
            .unwrap_or_else(|| SocketAddr::new(gossip.ip(), 0));
        for seed in &self.seeds {
            match seed {
                SeedArg::Addr(a) => config.seeds.push(*a),
                SeedArg::Host(h) => config.seed_hosts.push(h.clone()),
            }
        }
        config.prefix.lookup_budget = self.prefix_lookup_budget;
        config.prefix.replicas =
            std::num::NonZeroUsize::new(self.prefix_replicas).ok_or(InvalidMeshFlags::Flag {
                flag: "prefix-replicas",
                reason: "must be at least 1".into(),
            })?;
        config.validate()?;
        Ok(Some(MeshOptions {
            config,
            sharing: !self.no_mesh_sharing,
        }))
    }

    fn accepted_keys(&self) -> Result<Vec<ClusterKey>, InvalidMeshFlags> {
        self.cluster_key_accept_file
            .iter()
            .map(|path| {
                let raw =
                    std::fs::read_to_string(path).map_err(|source| InvalidMeshFlags::KeyFile {
                        path: path.clone(),
                        source,
                    })?;
                Ok(ClusterKey::new(raw.trim().as_bytes().to_vec())?)
            })
            .collect()
    }

    fn key(&self) -> Result<ClusterKey, InvalidMeshFlags> {
        let raw = if let Some(path) = &self.cluster_key_file {
            std::fs::read_to_string(path).map_err(|source| InvalidMeshFlags::KeyFile {
                path: path.clone(),
                source,
            })?
        } else if let Some(k) = &self.cluster_key {
            k.clone()
        } else {
            std::env::var(CLUSTER_KEY_ENV).map_err(|_| InvalidMeshFlags::NoKey)?
        };
        Ok(ClusterKey::new(raw.trim().as_bytes().to_vec())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_means_single_node() {
        assert!(MeshArgs::default().options().unwrap().is_none());
        let lone = MeshArgs {
            node_name: Some("n".into()),
            ..MeshArgs::default()
        };
        assert!(lone.options().is_err());
    }

    #[test]
    fn gossip_flags_build_a_mesh_config() {
        let args = MeshArgs {
            node_name: Some("node-a".into()),
            gossip_addr: Some("127.0.0.1:0".parse().unwrap()),
            seeds: vec![
                "127.0.0.1:7946".parse().unwrap(),
                "infermesh-0.infermesh-mesh.ns.svc:7946".parse().unwrap(),
            ],
            cluster_key: Some("  0123456789abcdef \n".into()),
            prefix_lookup_budget: Duration::from_millis(3),
            prefix_replicas: 2,
            ..MeshArgs::default()
        };
        let o = args.options().unwrap().unwrap();
        assert!(o.sharing);
        assert_eq!(o.config.node_id.as_str(), "node-a");
        assert_eq!(o.config.prefix.lookup_budget, Duration::from_millis(3));
        assert_eq!(o.config.seeds.len(), 1);
        assert_eq!(
            o.config.seed_hosts,
            vec!["infermesh-0.infermesh-mesh.ns.svc:7946".to_string()]
        );
        for bad in ["nohost", ":7946", "host:0", "host:port", "a b:1"] {
            assert!(bad.parse::<SeedArg>().is_err(), "{bad} accepted");
        }
        let short = MeshArgs {
            cluster_key: Some("short".into()),
            ..args.clone()
        };
        assert!(short.options().unwrap_err().to_string().contains("16"));
        let wildcard = MeshArgs {
            gossip_addr: Some("0.0.0.0:7946".parse().unwrap()),
            ..args
        };
        assert!(
            wildcard
                .options()
                .unwrap_err()
                .to_string()
                .contains("advertise")
        );
    }

    #[test]
    fn rotation_keys_and_the_cluster_ca_come_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let accept = dir.path().join("old.key");
        std::fs::write(&accept, "the-previous-cluster-key\n").unwrap();
        let args = MeshArgs {
            gossip_addr: Some("127.0.0.1:0".parse().unwrap()),
            cluster_key: Some("the-current-cluster-key".into()),
            cluster_key_accept_file: vec![accept.clone()],
            mesh_ca_file: Some("/ca.pem".into()),
            mesh_cert_file: Some("/node.pem".into()),
            mesh_key_file: Some("/node.key".into()),
            mesh_server_name: Some("mesh.infermesh".into()),
            prefix_lookup_budget: Duration::from_millis(2),
            prefix_replicas: 2,
            ..MeshArgs::default()
        };
        let o = args.options().unwrap().unwrap();
        assert_eq!(
            o.config.accepted_keys,
            vec![ClusterKey::new(b"the-previous-cluster-key".to_vec()).unwrap()]
        );
        assert!(matches!(
            o.config.tls,
            infermesh_gossip::TlsConfig::ClusterCa { ref server_name, .. } if server_name == "mesh.infermesh"
        ));
        let missing = MeshArgs {
            cluster_key_accept_file: vec![dir.path().join("absent")],
            ..args
        };
        assert!(
            missing
                .options()
                .unwrap_err()
                .to_string()
                .contains("absent")
        );
    }
}
