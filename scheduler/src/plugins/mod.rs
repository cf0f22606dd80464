//! Plugin traits and the per-cycle state they read.
//!
//! A scheduling cycle works on indices into the caller's candidate slice: filters shrink
//! an index list, scorers write one score in [0, 1] per listed index, pickers choose
//! indices. Nothing here allocates per endpoint beyond those lists.

pub mod burst;
pub mod filters;
pub mod pickers;
pub mod prefix;
pub mod profiles;
pub mod saturation;
pub mod scorers;
pub mod session;
pub mod topology;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Instant;

use rand::RngCore;

use crate::model::{Endpoint, InferenceRequest};
use crate::prefix::BlockHash;

/// Prefix-match data produced once per cycle (llm-d's `PrefixCacheMatchInfo`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefixCycle {
    /// The request's chained block hashes.
    pub hashes: Vec<BlockHash>,
    /// Tokens per block used for this request.
    pub block_size_tokens: usize,
    /// Matched leading blocks, one per candidate (same order as `CycleState::endpoints`).
    pub matched: Vec<u32>,
}

impl PrefixCycle {
    /// `matchBlocks / totalBlocks` for candidate `i` (0 when there are no blocks).
    pub fn score(&self, i: usize) -> f64 {
        if self.hashes.is_empty() {
            0.0
        } else {
            f64::from(self.matched.get(i).copied().unwrap_or(0)) / self.hashes.len() as f64
        }
    }
}

/// What every plugin may read during one scheduling cycle.
#[derive(Debug)]
pub struct CycleState<'a> {
    /// The request being scheduled.
    pub request: &'a InferenceRequest,
    /// All candidates the caller offered; plugins refer to them by index.
    pub endpoints: &'a [Endpoint],
    /// The caller's clock reading for this cycle.
    pub now: Instant,
    /// Prefix data, when a prefix producer is configured.
    pub prefix: Option<PrefixCycle>,
    /// The burst producer's placement as prefix data, when one is configured.
    pub burst: Option<PrefixCycle>,
    /// Whether no candidate matched any prefix block (no-hit-lru's "cold request").
    pub cold: bool,
    /// The pick of an earlier disaggregated stage that the running profile is placed
    /// against (llm-d's `peer-endpoint` request attribute: the decode pick while prefill
    /// runs decode-first, the prefill pick while decode runs prefill-first).
    pub peer: Option<usize>,
}

/// Keeps the candidates that pass (llm-d `scheduling.Filter`).
pub trait Filter: Send + Sync + Debug {
    /// Retains the passing indices in `candidates` (order kept).
    fn filter(&self, cycle: &CycleState<'_>, rng: &mut dyn RngCore, candidates: &mut Vec<usize>);
}

/// Scores candidates in [0, 1] (llm-d `scheduling.Scorer`); the profile sums weight × score.
pub trait Scorer: Send + Sync + Debug {
    /// Writes one score per entry of `candidates` into `out` (same length).
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]);
}

/// Chooses targets from scored candidates (llm-d `scheduling.Picker`).
pub trait Picker: Send + Sync + Debug {
    /// Pushes chosen candidate indices into `out`, best first; `scores[i]` belongs to
    /// `candidates[i]`.
    fn pick(
        &self,
        candidates: &[usize],
        scores: &[f64],
        rng: &mut dyn RngCore,
        out: &mut Vec<usize>,
    );
}

/// Produces per-cycle data before the profiles run (llm-d `DataProducer`).
pub trait DataProducer: Send + Sync + Debug {
    /// Fills its part of `cycle` (e.g. `cycle.prefix`) from the request and endpoints.
    fn produce(&self, cycle: &mut CycleState<'_>);
}

/// Decides whether a disaggregated stage (prefill, encode) runs for this request.
pub trait Decider: Send + Sync + Debug {
    /// `decode_target` is the candidate the decode profile chose (`None` when decode has
    /// not run yet: the encode stage of prefill-first).
    fn disaggregate(&self, cycle: &CycleState<'_>, decode_target: Option<usize>) -> bool;
}

/// A finished or skipped profile run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRun {
    /// Index of the profile in the scheduler's profile list.
    pub profile: usize,
    /// Chosen candidate indices, primary first; empty when skipped.
    pub targets: Vec<usize>,
    /// The handler decided not to run this profile.
    pub skipped: bool,
}

/// What the profile handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextProfile {
    /// Run the profile with this index.
    Run(usize),
    /// Record this profile as skipped and ask again.
    Skip(usize),
    /// The cycle is complete.
    Done,
}

/// Chooses which profiles run and which result is primary (llm-d `ProfileHandler`).
pub trait ProfileHandler: Send + Sync + Debug {
    /// The next step, given the runs so far.
    fn next(&self, cycle: &CycleState<'_>, runs: &[ProfileRun]) -> NextProfile;
    /// Index of the primary profile (its targets are the destination).
    fn primary(&self) -> usize;
    /// Extra request headers for the model server (e.g. `x-prefiller-host-port`).
    fn headers(&self, cycle: &CycleState<'_>, runs: &[ProfileRun]) -> Vec<(String, String)>;
    /// Profiles whose first target also caches the prompt (prefix recording).
    fn cache_profiles(&self) -> Vec<usize>;
    /// The disaggregation decision of a finished cycle, for handlers that count one.
    fn decision(&self, runs: &[ProfileRun]) -> Option<profiles::DisaggDecision>;
    /// The peer pick published before profile `next` runs (see [`CycleState::peer`]).
    fn peer(&self, _runs: &[ProfileRun], _next: usize) -> Option<usize> {
        None
    }
}

/// Hook run after a pick, before the request is forwarded (llm-d `PreRequest`).
pub trait PreRequest: Send + Sync + Debug {
    /// `primary` is the primary target; `also_cached` are other targets that cache the prompt.
    fn pre_request(
        &self,
        request: &InferenceRequest,
        primary: SocketAddr,
        also_cached: &[SocketAddr],
        cold: bool,
        now: Instant,
    );
}

/// Hook run when a response completes (llm-d `ResponseComplete`).
pub trait ResponseComplete: Send + Sync + Debug {
    /// `served` is the endpoint that actually served the request.
    fn response_complete(&self, request: &InferenceRequest, served: SocketAddr, now: Instant);
}
