//! Which pods the sidecar may send work to: with SSRF protection on, only the pool's own
//! pods (`ip:port`, from the endpoints file the node reads); off, anything (llm-d's default).
//! A router header is client-reachable whenever the gateway in front is misconfigured, so a
//! sidecar that trusts it blindly fetches from wherever a client says.

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::pool_model::PoolSpec;

/// The set of addresses the sidecar may contact besides its local engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowlist {
    /// SSRF protection off: every address is allowed.
    Open,
    /// Only these pods of the named pool.
    Pool {
        /// The pool's name (for error messages).
        name: String,
        /// The pool's endpoints.
        addrs: HashSet<SocketAddr>,
    },
}

/// An address outside the pool was named; nothing was sent to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{addr} (from {header}) is not a pod of inference pool {pool:?}")]
pub struct NotInPool {
    /// The refused address.
    pub addr: SocketAddr,
    /// The header that named it.
    pub header: &'static str,
    /// The pool it is not in.
    pub pool: String,
}

impl Allowlist {
    /// The allowlist of a pool as the endpoints file describes it.
    pub fn from_pool(spec: &PoolSpec) -> Allowlist {
        Allowlist::Pool {
            name: spec.name.clone(),
            addrs: spec.endpoints.iter().map(|e| e.address).collect(),
        }
    }

    /// Whether `addr`, named by `header`, may be contacted.
    pub fn check(&self, header: &'static str, addr: SocketAddr) -> Result<(), NotInPool> {
        match self {
            Allowlist::Open => Ok(()),
            Allowlist::Pool { addrs, .. } if addrs.contains(&addr) => Ok(()),
            Allowlist::Pool { name, .. } => Err(NotInPool {
                addr,
                header,
                pool: name.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool_model::fleet_pool;

    #[test]
    fn only_the_pools_own_ip_and_port_pass() {
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8000".parse().unwrap();
        let list = Allowlist::from_pool(&fleet_pool(&[a, b], "m"));
        assert!(list.check("x-prefiller-host-port", a).is_ok());
        assert!(list.check("x-prefiller-host-port", b).is_ok());
        let e = list
            .check("x-prefiller-host-port", "10.0.0.1:22".parse().unwrap())
            .unwrap_err();
        assert_eq!(e.pool, "demo");
        assert!(
            e.to_string().contains("10.0.0.1:22"),
            "another port of a pod is refused: {e}"
        );
        assert!(
            list.check("x", "169.254.169.254:80".parse().unwrap())
                .is_err()
        );
        assert!(
            Allowlist::Open
                .check("x", "169.254.169.254:80".parse().unwrap())
                .is_ok()
        );
    }
}
