//! The identity of a model-server pod across the mesh.

use std::borrow::Borrow;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A pod as every node names it: its `ip:port` endpoint, as text. The same text keys the
/// load board, pod ownership and the prefix index, so all nodes agree on it; on the wire
/// it is a plain string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PodId(String);

impl PodId {
    /// A pod named `id` (normally `ip:port`).
    pub fn new(id: impl Into<String>) -> PodId {
        PodId(id.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The endpoint address, when the name is an `ip:port`.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.0.parse().ok()
    }
}

impl From<SocketAddr> for PodId {
    fn from(a: SocketAddr) -> PodId {
        PodId(a.to_string())
    }
}

impl From<&str> for PodId {
    fn from(s: &str) -> PodId {
        PodId(s.to_owned())
    }
}

impl From<String> for PodId {
    fn from(s: String) -> PodId {
        PodId(s)
    }
}

impl Borrow<str> for PodId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for PodId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_id_is_its_endpoint_text_on_the_wire() {
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let p = PodId::from(a);
        assert_eq!(p.as_str(), "10.0.0.1:8000");
        assert_eq!(p.addr(), Some(a));
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"10.0.0.1:8000\"");
        assert_eq!(PodId::new("pod-a").addr(), None);
    }
}
