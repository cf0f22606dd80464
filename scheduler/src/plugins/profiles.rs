//! Profile handlers (single, disaggregated P/D/E) and disaggregation deciders.

use std::sync::Arc;

use super::{CycleState, Decider, NextProfile, ProfileHandler, ProfileRun};
use crate::prefix::AVERAGE_CHARACTERS_PER_TOKEN;

/// Header naming the prefill endpoint for the decode pod's sidecar.
pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";
/// Header naming the encode endpoints.
pub const ENCODERS_HEADER: &str = "x-encoder-hosts-ports";

/// `single-profile-handler`: run the one profile; it is primary.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProfileHandler;

impl ProfileHandler for SingleProfileHandler {
    fn next(&self, _: &CycleState<'_>, runs: &[ProfileRun]) -> NextProfile {
        if runs.is_empty() {
            NextProfile::Run(0)
        } else {
            NextProfile::Done
        }
    }
    fn primary(&self) -> usize {
        0
    }
    fn headers(&self, _: &CycleState<'_>, _: &[ProfileRun]) -> Vec<(String, String)> {
        Vec::new()
    }
    fn cache_profiles(&self) -> Vec<usize> {
        Vec::new()
    }
}

/// `disagg-profile-handler`: decode always, then encode and prefill when their deciders
/// say so (decided on the chosen decode endpoint). Decode is primary.
#[derive(Debug, Clone)]
pub struct DisaggProfileHandler {
    /// Decode profile index.
    pub decode: usize,
    /// Prefill profile index, when such a profile exists.
    pub prefill: Option<usize>,
    /// Encode profile index, when such a profile exists.
    pub encode: Option<usize>,
    /// Prefill decider (none = never prefill).
    pub prefill_decider: Option<Arc<dyn Decider>>,
    /// Encode decider (none = never encode).
    pub encode_decider: Option<Arc<dyn Decider>>,
}

impl DisaggProfileHandler {
    fn stage(
        &self,
        cycle: &CycleState<'_>,
        runs: &[ProfileRun],
        profile: Option<usize>,
        decider: &Option<Arc<dyn Decider>>,
        decode_target: usize,
    ) -> Option<NextProfile> {
        let p = profile?;
        if runs.iter().any(|r| r.profile == p) {
            return None;
        }
        match decider {
            Some(d) if d.disaggregate(cycle, decode_target) => Some(NextProfile::Run(p)),
            _ => Some(NextProfile::Skip(p)),
        }
    }
}

impl ProfileHandler for DisaggProfileHandler {
    fn next(&self, cycle: &CycleState<'_>, runs: &[ProfileRun]) -> NextProfile {
        let Some(decode) = runs.iter().find(|r| r.profile == self.decode) else {
            return NextProfile::Run(self.decode);
        };
        let Some(&decode_target) = decode.targets.first() else {
            return NextProfile::Done;
        };
        if let Some(n) = self.stage(
            cycle,
            runs,
            self.encode,
            &self.encode_decider,
            decode_target,
        ) {
            return n;
        }
        if let Some(n) = self.stage(
            cycle,
            runs,
            self.prefill,
            &self.prefill_decider,
            decode_target,
        ) {
            return n;
        }
        NextProfile::Done
    }

    fn primary(&self) -> usize {
        self.decode
    }

    fn headers(&self, cycle: &CycleState<'_>, runs: &[ProfileRun]) -> Vec<(String, String)> {
        let mut h = Vec::new();
        let targets = |p: Option<usize>| {
            p.and_then(|p| runs.iter().find(|r| r.profile == p && !r.skipped))
                .map(|r| r.targets.as_slice())
                .unwrap_or(&[])
        };
        if let Some(&t) = targets(self.prefill).first() {
            h.push((
                PREFILLER_HEADER.to_owned(),
                cycle.endpoints[t].address.to_string(),
            ));
        }
        let enc = targets(self.encode);
        if !enc.is_empty() {
            let v: Vec<String> = enc
                .iter()
                .map(|&t| cycle.endpoints[t].address.to_string())
                .collect();
            h.push((ENCODERS_HEADER.to_owned(), v.join(",")));
        }
        h
    }

    fn cache_profiles(&self) -> Vec<usize> {
        self.prefill.into_iter().collect()
    }
}

/// `prefix-based-pd-decider`: split prefill off when the decode endpoint would still have
/// to compute at least `nonCachedTokens` tokens (0 disables).
#[derive(Debug, Clone, Copy)]
pub struct PrefixBasedPdDecider {
    non_cached_tokens: usize,
}

impl PrefixBasedPdDecider {
    /// From `nonCachedTokens`.
    pub fn new(non_cached_tokens: usize) -> Self {
        PrefixBasedPdDecider { non_cached_tokens }
    }
}

impl Decider for PrefixBasedPdDecider {
    fn disaggregate(&self, cycle: &CycleState<'_>, decode_target: usize) -> bool {
        if self.non_cached_tokens == 0 {
            return false;
        }
        let input_tokens = cycle.request.prompt_bytes.len() / AVERAGE_CHARACTERS_PER_TOKEN;
        if input_tokens < self.non_cached_tokens {
            return false;
        }
        // Without prefix-match data llm-d skips P/D.
        let Some(prefix) = &cycle.prefix else {
            return false;
        };
        let hit = prefix.matched.get(decode_target).copied().unwrap_or(0) as usize
            * prefix.block_size_tokens;
        input_tokens.saturating_sub(hit) >= self.non_cached_tokens
    }
}

/// `always-disagg-pd-decider`: always run prefill separately.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysDisaggDecider;

impl Decider for AlwaysDisaggDecider {
    fn disaggregate(&self, _: &CycleState<'_>, _: usize) -> bool {
        true
    }
}
