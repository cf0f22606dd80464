//! Profile handlers (single, disaggregated P/D/E) and disaggregation deciders.

use std::sync::Arc;

use super::{CycleState, Decider, NextProfile, ProfileHandler, ProfileRun};
pub use crate::config::params::StageOrder;
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
    fn decision(&self, _: &[ProfileRun]) -> Option<DisaggDecision> {
        None
    }
}

/// Which stages a disaggregated request went through (llm-d's `decision_type` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisaggDecision {
    /// Decode only.
    DecodeOnly,
    /// Prefill on a prefill pod, then decode.
    PrefillDecode,
    /// Encode on encode pods, then decode (which also prefills).
    EncodeDecode,
    /// Encode, prefill, decode.
    EncodePrefillDecode,
}

impl DisaggDecision {
    /// From the stages that ran with a target.
    pub fn from_stages(encode: bool, prefill: bool) -> DisaggDecision {
        match (encode, prefill) {
            (true, true) => DisaggDecision::EncodePrefillDecode,
            (true, false) => DisaggDecision::EncodeDecode,
            (false, true) => DisaggDecision::PrefillDecode,
            (false, false) => DisaggDecision::DecodeOnly,
        }
    }

    /// llm-d's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DisaggDecision::DecodeOnly => "decode-only",
            DisaggDecision::PrefillDecode => "prefill-decode",
            DisaggDecision::EncodeDecode => "encode-decode",
            DisaggDecision::EncodePrefillDecode => "encode-prefill-decode",
        }
    }
}

/// `disagg-profile-handler` (and the deprecated `pd-profile-handler`): decode is primary;
/// encode and prefill run when their deciders say so, in `stage_order`.
#[derive(Debug, Clone)]
pub struct DisaggProfileHandler {
    /// Decode profile index.
    pub decode: usize,
    /// Prefill profile index, when such a profile exists.
    pub prefill: Option<usize>,
    /// Encode profile index, when such a profile exists.
    pub encode: Option<usize>,
    /// Prefill decider (none = never prefill in decode-first).
    pub prefill_decider: Option<Arc<dyn Decider>>,
    /// Encode decider (none = never encode).
    pub encode_decider: Option<Arc<dyn Decider>>,
    /// Decode-first (deciders see the decode pick) or prefill-first.
    pub stage_order: StageOrder,
    /// `pd-profile-handler`: llm-d counts a decision only when a prefill profile exists.
    pub pd_only: bool,
}

impl DisaggProfileHandler {
    fn stage(
        &self,
        cycle: &CycleState<'_>,
        runs: &[ProfileRun],
        profile: Option<usize>,
        decider: &Option<Arc<dyn Decider>>,
        decode_target: Option<usize>,
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

    fn used(runs: &[ProfileRun], profile: Option<usize>) -> bool {
        profile.is_some_and(|p| {
            runs.iter()
                .any(|r| r.profile == p && !r.skipped && !r.targets.is_empty())
        })
    }

    fn next_decode_first(&self, cycle: &CycleState<'_>, runs: &[ProfileRun]) -> NextProfile {
        let Some(decode) = runs.iter().find(|r| r.profile == self.decode) else {
            return NextProfile::Run(self.decode);
        };
        let Some(&decode_target) = decode.targets.first() else {
            return NextProfile::Done;
        };
        let target = Some(decode_target);
        if let Some(n) = self.stage(cycle, runs, self.encode, &self.encode_decider, target) {
            return n;
        }
        if let Some(n) = self.stage(cycle, runs, self.prefill, &self.prefill_decider, target) {
            return n;
        }
        NextProfile::Done
    }

    fn next_prefill_first(&self, cycle: &CycleState<'_>, runs: &[ProfileRun]) -> NextProfile {
        if runs.iter().any(|r| r.profile == self.decode) {
            return NextProfile::Done;
        }
        // llm-d runs prefill whenever its profile exists here: no decider is allowed.
        if let Some(p) = self.prefill
            && !runs.iter().any(|r| r.profile == p)
        {
            return NextProfile::Run(p);
        }
        if let Some(n) = self.stage(cycle, runs, self.encode, &self.encode_decider, None) {
            return n;
        }
        NextProfile::Run(self.decode)
    }
}

impl ProfileHandler for DisaggProfileHandler {
    fn next(&self, cycle: &CycleState<'_>, runs: &[ProfileRun]) -> NextProfile {
        match self.stage_order {
            StageOrder::DecodeFirst => self.next_decode_first(cycle, runs),
            StageOrder::PrefillFirst => self.next_prefill_first(cycle, runs),
        }
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
        // The prefill pod computed the prompt's KV, so it caches the prefix too.
        self.prefill.into_iter().collect()
    }

    fn peer(&self, runs: &[ProfileRun], next: usize) -> Option<usize> {
        let first = |p: usize| {
            runs.iter()
                .find(|r| r.profile == p && !r.skipped)
                .and_then(|r| r.targets.first().copied())
        };
        // llm-d publishes the decode pick before prefill runs (decode-first) and the
        // prefill pick before decode runs (prefill-first); encode sees no peer.
        match self.stage_order {
            StageOrder::DecodeFirst if Some(next) == self.prefill => first(self.decode),
            StageOrder::PrefillFirst if next == self.decode => self.prefill.and_then(first),
            _ => None,
        }
    }

    fn decision(&self, runs: &[ProfileRun]) -> Option<DisaggDecision> {
        if self.pd_only && self.prefill.is_none() {
            return None;
        }
        Some(DisaggDecision::from_stages(
            Self::used(runs, self.encode),
            Self::used(runs, self.prefill),
        ))
    }
}

/// `prefix-based-pd-decider`: split prefill off when the decode endpoint would still have
/// to compute at least `nonCachedTokens` tokens (0 disables), for prompts of at least
/// `promptTokens` tokens (0 = any length).
#[derive(Debug, Clone, Copy)]
pub struct PrefixBasedPdDecider {
    non_cached_tokens: usize,
    prompt_tokens: usize,
}

impl PrefixBasedPdDecider {
    /// From `nonCachedTokens` and `promptTokens`.
    pub fn new(non_cached_tokens: usize, prompt_tokens: usize) -> Self {
        PrefixBasedPdDecider {
            non_cached_tokens,
            prompt_tokens,
        }
    }
}

impl Decider for PrefixBasedPdDecider {
    fn disaggregate(&self, cycle: &CycleState<'_>, decode_target: Option<usize>) -> bool {
        if self.non_cached_tokens == 0 {
            return false;
        }
        let Some(decode_target) = decode_target else {
            return false;
        };
        let input_tokens = cycle.request.prompt_bytes.len() / AVERAGE_CHARACTERS_PER_TOKEN;
        if self.prompt_tokens > 0 && input_tokens < self.prompt_tokens {
            return false;
        }
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
    fn disaggregate(&self, _: &CycleState<'_>, _: Option<usize>) -> bool {
        true
    }
}

/// `always-disagg-multimodal-decider`: run encode when the request carries multimodal
/// items (image, video or audio parts).
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysDisaggMultimodalDecider;

impl Decider for AlwaysDisaggMultimodalDecider {
    fn disaggregate(&self, cycle: &CycleState<'_>, _: Option<usize>) -> bool {
        cycle.request.multimodal
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::model::InferenceRequest;
    use crate::plugins::PrefixCycle;

    /// Whether the decider splits a prompt of `prompt_bytes` (4 bytes a token) whose
    /// decode pod holds `hit_blocks` blocks of 10 tokens.
    fn decide(d: &PrefixBasedPdDecider, prompt_bytes: usize, hit_blocks: u32) -> bool {
        let request = InferenceRequest {
            prompt_bytes: vec![b'x'; prompt_bytes],
            ..Default::default()
        };
        let cycle = CycleState {
            request: &request,
            endpoints: &[],
            now: Instant::now(),
            prefix: Some(PrefixCycle {
                hashes: Vec::new(),
                block_size_tokens: 10,
                matched: vec![hit_blocks],
            }),
            burst: None,
            cold: hit_blocks == 0,
            peer: None,
        };
        d.disaggregate(&cycle, Some(0))
    }

    #[test]
    fn non_cached_tokens_threshold_is_inclusive() {
        let d = PrefixBasedPdDecider::new(100, 0);
        // Prompt length alone: 99 tokens never split, 100 uncached tokens do.
        assert!(!decide(&d, 396, 0));
        assert!(!decide(&d, 399, 0), "399 bytes are 99 tokens");
        assert!(decide(&d, 400, 0));
        // 200 tokens with 100 cached leave exactly 100: split; 110 cached leave 90: not.
        assert!(decide(&d, 800, 10));
        assert!(!decide(&d, 800, 11));
        // Fully cached prompts never split.
        assert!(!decide(&d, 800, 20));
        assert!(!decide(&d, 800, 25), "more cached than the prompt");
    }

    #[test]
    fn prompt_tokens_gates_short_prompts_only() {
        let d = PrefixBasedPdDecider::new(100, 200);
        assert!(!decide(&d, 796, 0), "199 tokens are under promptTokens");
        assert!(decide(&d, 800, 0));
        // The gate never overrides the non-cached check.
        assert!(!decide(&d, 800, 11));
        // promptTokens below nonCachedTokens: the non-cached check still decides.
        let d = PrefixBasedPdDecider::new(100, 50);
        assert!(!decide(&d, 396, 0));
        assert!(decide(&d, 400, 0));
    }

    #[test]
    fn disabled_or_without_data_the_decider_declines() {
        assert!(!decide(&PrefixBasedPdDecider::new(0, 0), 1 << 20, 0));
        let d = PrefixBasedPdDecider::new(16, 0);
        let request = InferenceRequest {
            prompt_bytes: vec![b'x'; 4000],
            ..Default::default()
        };
        let mut cycle = CycleState {
            request: &request,
            endpoints: &[],
            now: Instant::now(),
            prefix: None,
            burst: None,
            cold: true,
            peer: None,
        };
        assert!(!d.disaggregate(&cycle, Some(0)), "no prefix match data");
        cycle.prefix = Some(PrefixCycle {
            hashes: Vec::new(),
            block_size_tokens: 16,
            matched: vec![0],
        });
        assert!(d.disaggregate(&cycle, Some(0)));
        assert!(!d.disaggregate(&cycle, None), "no decode pick");
    }

    #[test]
    fn multimodal_decider_follows_the_request() {
        let mut request = InferenceRequest::default();
        let cycle = |r: &InferenceRequest| {
            let c = CycleState {
                request: r,
                endpoints: &[],
                now: Instant::now(),
                prefix: None,
                burst: None,
                cold: true,
                peer: None,
            };
            AlwaysDisaggMultimodalDecider.disaggregate(&c, None)
        };
        assert!(!cycle(&request));
        request.multimodal = true;
        assert!(cycle(&request));
    }

    #[test]
    fn decision_labels_are_llm_d_s() {
        let all = [(false, false), (false, true), (true, false), (true, true)]
            .map(|(e, p)| DisaggDecision::from_stages(e, p).as_str());
        assert_eq!(
            all,
            [
                "decode-only",
                "prefill-decode",
                "encode-decode",
                "encode-prefill-decode"
            ]
        );
    }
}
