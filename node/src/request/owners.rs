//! The request path's view of shared prefix state: who answers "which endpoints hold this
//! chain?" and where picks are recorded. The mesh implements it (`crate::mesh::prefix`);
//! the request path depends only on this trait, so it can be driven without sockets.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use infermesh_scheduler::PrefixMatches;

/// What an owner lookup returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixAnswer {
    /// No shared prefix state: the scheduler matches against its own index.
    Local,
    /// The owner's matches (merged with this node's recent picks).
    Matched(PrefixMatches),
    /// The owner did not answer within the budget: scored without prefix data.
    Unavailable,
    /// The precise producer's answer: the chain keyed from the tokens, and the owner's
    /// matches (`None`: the owner did not answer).
    Precise {
        /// Request keys of the prompt's full blocks.
        chain: infermesh_scheduler::PrefixChain,
        /// The prompt's token ids.
        tokens: std::sync::Arc<[u32]>,
        /// The owner's matches.
        matches: Option<PrefixMatches>,
    },
}

/// An owner lookup in flight (`'static`: it owns its inputs).
pub type PrefixLookup = Pin<Box<dyn Future<Output = PrefixAnswer> + Send>>;

/// Shared prefix state, owned by the anchors' owners.
pub trait PrefixOwners: Send + Sync + std::fmt::Debug {
    /// Matches `hashes` (anchor first) at the anchor's owner.
    fn lookup(&self, anchor: u64, hashes: &[u64]) -> PrefixLookup;
    /// Records that each of `endpoints` now holds the chain.
    fn record(&self, anchor: u64, hashes: &[u64], endpoints: &[SocketAddr]);
    /// Precise `speculativeIndexing`: this node counts the chain as held by `endpoints`
    /// for `ttl`, until the engines' events confirm it (nothing is sent to the owners).
    fn speculate(&self, anchor: u64, hashes: &[u64], endpoints: &[SocketAddr], ttl: Duration);
}
