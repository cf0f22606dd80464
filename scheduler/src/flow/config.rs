//! The flow controller's typed configuration, with llm-d's defaults
//! (`pkg/epp/flowcontrol/{registry,controller}/config.go`).

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::time::Duration;

/// Per-band request cap when none is configured (llm-d `defaultPriorityBandMaxRequests`).
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5000;
/// Per-band byte cap when none is configured: 1 G (llm-d `defaultPriorityBandMaxBytes`).
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
/// Queue-wait budget while the pool has endpoints (llm-d `defaultRequestTTL`).
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);
/// Queue-wait budget while the pool has no endpoints (llm-d `defaultNoEndpointRequestTTL`).
pub const DEFAULT_NO_ENDPOINT_REQUEST_TTL: Duration = Duration::from_secs(60);
/// `static-usage-limit-policy` threshold when none is given (1.0: gate at saturation).
pub const DEFAULT_USAGE_THRESHOLD: f64 = 1.0;

/// `program-aware-fairness` weight on attained service when none is given (llm-d).
pub const DEFAULT_LAS_WEIGHT_SERVICE: f64 = 0.8;
/// `program-aware-fairness` weight on head-of-queue wait when none is given (llm-d).
pub const DEFAULT_LAS_WEIGHT_HEAD_WAIT: f64 = 0.2;
/// `program-aware-fairness` half-life of attained service (llm-d `lasHalfLifeSeconds` 60).
pub const DEFAULT_LAS_HALF_LIFE: Duration = Duration::from_secs(60);
/// `program-aware-fairness` idle time after which a program is forgotten (llm-d 3600 s).
pub const DEFAULT_LAS_EVICTION_TTL: Duration = Duration::from_secs(3600);
/// `program-aware-fairness` interval between eviction sweeps (llm-d 300 s).
pub const DEFAULT_LAS_EVICTION_SWEEP: Duration = Duration::from_secs(300);

/// `program-aware-fairness` (least attained service) parameters; see [`super::programs`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LasParams {
    /// Weight on the inverted, normalised attained service (`lasWeightService`).
    pub weight_service: f64,
    /// Weight on the normalised head-of-queue wait (`lasWeightHeadWait`).
    pub weight_head_wait: f64,
    /// Half-life of attained service (`None`: no decay, `lasHalfLifeSeconds: 0`).
    pub half_life: Option<Duration>,
    /// Idle time after the last completion before a program is forgotten (`None`: never,
    /// `evictionTtlSeconds: 0`).
    pub eviction_ttl: Option<Duration>,
    /// Interval between eviction sweeps (`evictionSweepSeconds`, > 0).
    pub eviction_sweep: Duration,
}

impl Default for LasParams {
    fn default() -> Self {
        LasParams {
            weight_service: DEFAULT_LAS_WEIGHT_SERVICE,
            weight_head_wait: DEFAULT_LAS_WEIGHT_HEAD_WAIT,
            half_life: Some(DEFAULT_LAS_HALF_LIFE),
            eviction_ttl: Some(DEFAULT_LAS_EVICTION_TTL),
            eviction_sweep: DEFAULT_LAS_EVICTION_SWEEP,
        }
    }
}

/// How a band chooses which flow (fairness id) to serve next.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FairnessPolicy {
    /// `global-strict-fairness-policy`: the best head across all flows, ignoring flow boundaries.
    #[default]
    GlobalStrict,
    /// `round-robin-fairness-policy`: flows take turns, one request each.
    RoundRobin,
    /// `program-aware-fairness`: the flow with the least attained service (decayed
    /// weighted tokens) goes first, head-of-queue wait breaking ties.
    ProgramAware(LasParams),
}

impl FairnessPolicy {
    /// The llm-d plugin type.
    pub fn type_name(self) -> &'static str {
        match self {
            FairnessPolicy::GlobalStrict => "global-strict-fairness-policy",
            FairnessPolicy::RoundRobin => "round-robin-fairness-policy",
            FairnessPolicy::ProgramAware(_) => "program-aware-fairness",
        }
    }
}

/// How requests are ordered within one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingPolicy {
    /// `fcfs-ordering-policy`: exact arrival (enqueue) order.
    #[default]
    Fcfs,
    /// `edf-ordering-policy`: earliest of enqueue + TTL and the request's own deadline first;
    /// requests with neither go last, in arrival order.
    Edf,
    /// `slo-deadline-ordering-policy`: earliest `received + x-llm-d-slo-ttft-ms` first;
    /// requests without the header go last, in arrival order.
    SloDeadline,
}

impl OrderingPolicy {
    /// The llm-d plugin type.
    pub fn type_name(self) -> &'static str {
        match self {
            OrderingPolicy::Fcfs => "fcfs-ordering-policy",
            OrderingPolicy::Edf => "edf-ordering-policy",
            OrderingPolicy::SloDeadline => "slo-deadline-ordering-policy",
        }
    }
}

/// How `priority-holdback-policy` places each band on its ceiling range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldbackDomain {
    /// Equal steps by rank among the known priorities (numeric values ignored).
    #[default]
    Rank,
    /// Proportional to the priority value within the known range.
    Value,
}

/// When a band may dispatch, given the pool's saturation. Ceilings never rise as priority
/// falls, so the dispatch loop stops at the first gated band (as llm-d's does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UsageLimitPolicy {
    /// `static-usage-limit-policy`: every band dispatches while saturation < `threshold`.
    Static {
        /// The ceiling (default 1.0).
        threshold: f64,
    },
    /// `priority-holdback-policy`: the highest band's ceiling is `max_ceiling`, the
    /// lowest's `min_ceiling`, the others linearly between (by rank or by value), so
    /// headroom above each lower band's ceiling stays free for higher bands.
    PriorityHoldback {
        /// How bands map onto `[min_ceiling, max_ceiling]`.
        domain: HoldbackDomain,
        /// The lowest band's ceiling, in `[0, 1)`.
        min_ceiling: f64,
        /// The highest band's ceiling, in `(0, 1]` (default 1.0).
        max_ceiling: f64,
        /// `fair-share-holdback-policy` (infermesh's): a flow of a `program-aware-fairness`
        /// band whose attained service is below this share of the mean of the band's queued
        /// flows may dispatch up to the next higher band's ceiling, so a light tenant is
        /// not held back with a heavy one. `None`: `priority-holdback-policy` (no lift).
        lift_under_share: Option<f64>,
    },
    /// `soft-reflective-ceiling-policy`: band `i` of `N` has ceiling `1 - i·sat/(N-1)`;
    /// past it (and below saturation 1) the band is open on one call in
    /// `round(sat/(1-sat))`, so its dispatch rate falls continuously as saturation rises.
    SoftReflective,
}

impl Default for UsageLimitPolicy {
    fn default() -> Self {
        UsageLimitPolicy::Static {
            threshold: DEFAULT_USAGE_THRESHOLD,
        }
    }
}

impl UsageLimitPolicy {
    /// The llm-d plugin type.
    pub fn type_name(&self) -> &'static str {
        match self {
            UsageLimitPolicy::Static { .. } => "static-usage-limit-policy",
            UsageLimitPolicy::PriorityHoldback {
                lift_under_share: None,
                ..
            } => "priority-holdback-policy",
            UsageLimitPolicy::PriorityHoldback { .. } => "fair-share-holdback-policy",
            UsageLimitPolicy::SoftReflective => "soft-reflective-ceiling-policy",
        }
    }

    /// The saturation ceiling of the band at `rank` (0 = highest) among `priorities`, every
    /// band the controller knows in descending order, at pool `saturation`.
    pub fn ceiling(&self, rank: usize, priorities: &[i32], saturation: f64) -> f64 {
        let n = priorities.len();
        let steps = n.saturating_sub(1);
        match *self {
            UsageLimitPolicy::Static { threshold } => threshold,
            UsageLimitPolicy::PriorityHoldback {
                domain,
                min_ceiling,
                max_ceiling,
                ..
            } => {
                let span = max_ceiling - min_ceiling;
                let position = match domain {
                    // 1.0 for the highest band, 0.0 for the lowest.
                    HoldbackDomain::Rank if steps == 0 => 1.0,
                    HoldbackDomain::Rank => 1.0 - rank.min(steps) as f64 / steps as f64,
                    HoldbackDomain::Value => {
                        let (hi, lo) = (priorities[0], priorities[n - 1]);
                        let p = priorities.get(rank).copied().unwrap_or(lo);
                        if hi == lo {
                            1.0
                        } else {
                            (f64::from(p) - f64::from(lo)) / (f64::from(hi) - f64::from(lo))
                        }
                    }
                };
                min_ceiling + position * span
            }
            UsageLimitPolicy::SoftReflective if steps == 0 => 1.0,
            UsageLimitPolicy::SoftReflective => {
                1.0 - rank.min(steps) as f64 * saturation / steps as f64
            }
        }
    }

    /// The ceiling an under-served flow of the band at `rank` may dispatch up to (the next
    /// higher band's), with the share of the band's mean attained service below which a
    /// flow counts as under-served; `None` when the policy lifts no flow or the band is
    /// the highest.
    pub fn lift(&self, rank: usize, priorities: &[i32], saturation: f64) -> Option<(f64, f64)> {
        match *self {
            UsageLimitPolicy::PriorityHoldback {
                lift_under_share: Some(share),
                ..
            } if rank > 0 => Some((self.ceiling(rank - 1, priorities, saturation), share)),
            _ => None,
        }
    }

    /// Whether the band at `rank` among `priorities` (as for [`ceiling`](Self::ceiling))
    /// may dispatch at `saturation`. `tick` counts the policy's calls; the soft-reflective
    /// policy alternates on it. NaN saturation fails closed.
    pub fn allows(&self, rank: usize, priorities: &[i32], saturation: f64, tick: u64) -> bool {
        if saturation.is_nan() {
            return false;
        }
        if saturation < self.ceiling(rank, priorities, saturation) {
            return true;
        }
        match self {
            UsageLimitPolicy::SoftReflective if saturation < 1.0 => {
                // Rounded half away from zero, as Go's math.Round.
                let period = (saturation / (1.0 - saturation)).round().max(1.0);
                let period = if period >= u64::MAX as f64 {
                    u64::MAX
                } else {
                    period as u64
                };
                tick.is_multiple_of(period)
            }
            _ => false,
        }
    }
}

/// One priority band's capacity and policies (also the shape of the band templates).
#[derive(Debug, Clone, PartialEq)]
pub struct BandConfig {
    /// Most requests queued in the band.
    pub max_requests: NonZeroU64,
    /// Most request bytes queued in the band.
    pub max_bytes: NonZeroU64,
    /// Which flow is served next.
    pub fairness: FairnessPolicy,
    /// Order within a flow.
    pub ordering: OrderingPolicy,
}

impl Default for BandConfig {
    fn default() -> Self {
        BandConfig {
            max_requests: NonZeroU64::new(DEFAULT_BAND_MAX_REQUESTS).expect("non-zero"),
            max_bytes: NonZeroU64::new(DEFAULT_BAND_MAX_BYTES).expect("non-zero"),
            fairness: FairnessPolicy::default(),
            ordering: OrderingPolicy::default(),
        }
    }
}

/// Everything the flow controller needs; [`FlowConfig::default`] is llm-d's default.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowConfig {
    /// Global cap on queued requests across bands (`None`: unlimited).
    pub max_requests: Option<NonZeroU64>,
    /// Global cap on queued bytes across bands (`None`: unlimited).
    pub max_bytes: Option<NonZeroU64>,
    /// Queue-wait budget while the pool has endpoints (`None`: no expiry, `"0s"` in YAML).
    pub default_request_ttl: Option<Duration>,
    /// Queue-wait budget while the pool has no endpoints (`None`: no expiry).
    pub no_endpoint_request_ttl: Option<Duration>,
    /// Explicitly configured bands by priority. Band 0 is always provisioned (from
    /// `default_band` when not listed), as llm-d does.
    pub priority_bands: BTreeMap<i32, BandConfig>,
    /// Template for bands created on the fly.
    pub default_band: BandConfig,
    /// Template for bands created on the fly with priority < 0 (falls back to `default_band`).
    pub default_negative_band: Option<BandConfig>,
    /// When bands may dispatch.
    pub usage_limit: UsageLimitPolicy,
    /// In-flight eviction (llm-d `enableEviction`): while a band with queued requests is
    /// blocked by saturation, running sheddable (priority < 0) requests of lower priority
    /// are revoked with 429 (`sheddable-eviction-filter`; lowest priority, then newest first,
    /// as `priority-then-time-eviction-order-policy`).
    pub enable_eviction: bool,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            max_requests: None,
            max_bytes: None,
            default_request_ttl: Some(DEFAULT_REQUEST_TTL),
            no_endpoint_request_ttl: Some(DEFAULT_NO_ENDPOINT_REQUEST_TTL),
            priority_bands: BTreeMap::new(),
            default_band: BandConfig::default(),
            default_negative_band: None,
            usage_limit: UsageLimitPolicy::default(),
            enable_eviction: false,
        }
    }
}

/// Why a [`FlowConfig`] is unusable. Nothing was built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidFlowConfig {
    /// The usage-limit threshold is NaN, infinite or negative.
    #[error("usage limit threshold must be a finite number >= 0, got {threshold}")]
    Threshold {
        /// The value given.
        threshold: f64,
    },
    /// A `program-aware-fairness` parameter is out of range (weights and the half-life
    /// must be finite and >= 0, the sweep interval > 0).
    #[error("program-aware-fairness {field} is out of range: {value}")]
    ProgramAware {
        /// The llm-d parameter name.
        field: &'static str,
        /// The value given (seconds for durations).
        value: f64,
    },
    /// The holdback ceilings are out of range or inverted.
    #[error(
        "priority-holdback-policy needs 0 <= minCeiling < 1, 0 < maxCeiling <= 1 and minCeiling <= maxCeiling, got minCeiling {min_ceiling} and maxCeiling {max_ceiling}"
    )]
    HoldbackCeilings {
        /// The lowest band's ceiling given.
        min_ceiling: f64,
        /// The highest band's ceiling given.
        max_ceiling: f64,
    },
    /// `fair-share-holdback-policy`'s `underShare` is outside `(0, 1]`.
    #[error("fair-share-holdback-policy underShare must be in (0.0, 1.0], got {share}")]
    UnderShare {
        /// The value given.
        share: f64,
    },
    /// `fair-share-holdback-policy` measures flows by attained service, which only
    /// `program-aware-fairness` keeps.
    #[error(
        "fair-share-holdback-policy needs a band (or band template) whose fairnessPolicyRef is a program-aware-fairness plugin: it measures each flow's share by attained service"
    )]
    LiftWithoutProgramAware,
}

impl LasParams {
    /// Checks the values a caller could have built by hand.
    pub fn validate(&self) -> Result<(), InvalidFlowConfig> {
        let bad = |field, value: f64| InvalidFlowConfig::ProgramAware { field, value };
        for (field, w) in [
            ("lasWeightService", self.weight_service),
            ("lasWeightHeadWait", self.weight_head_wait),
        ] {
            if !w.is_finite() || w < 0.0 {
                return Err(bad(field, w));
            }
        }
        if self.eviction_sweep.is_zero() {
            return Err(bad("evictionSweepSeconds", 0.0));
        }
        Ok(())
    }
}

impl FlowConfig {
    /// The configuration of the band for `priority`: the explicit one, else the negative
    /// template (priority < 0, when set), else the default template.
    pub fn band_config(&self, priority: i32) -> &BandConfig {
        if let Some(b) = self.priority_bands.get(&priority) {
            return b;
        }
        match &self.default_negative_band {
            Some(neg) if priority < 0 => neg,
            _ => &self.default_band,
        }
    }

    /// Checks the values a caller could have built by hand.
    pub fn validate(&self) -> Result<(), InvalidFlowConfig> {
        match self.usage_limit {
            UsageLimitPolicy::Static { threshold } => {
                if !threshold.is_finite() || threshold < 0.0 {
                    return Err(InvalidFlowConfig::Threshold { threshold });
                }
            }
            UsageLimitPolicy::PriorityHoldback {
                min_ceiling,
                max_ceiling,
                lift_under_share,
                ..
            } => {
                let ok = (0.0..1.0).contains(&min_ceiling)
                    && max_ceiling > 0.0
                    && max_ceiling <= 1.0
                    && min_ceiling <= max_ceiling;
                if !ok {
                    return Err(InvalidFlowConfig::HoldbackCeilings {
                        min_ceiling,
                        max_ceiling,
                    });
                }
                if let Some(share) = lift_under_share {
                    if !(share > 0.0 && share <= 1.0) {
                        return Err(InvalidFlowConfig::UnderShare { share });
                    }
                    if self.las_params().is_none() {
                        return Err(InvalidFlowConfig::LiftWithoutProgramAware);
                    }
                }
            }
            UsageLimitPolicy::SoftReflective => {}
        }
        let bands = self
            .priority_bands
            .values()
            .chain([&self.default_band])
            .chain(&self.default_negative_band);
        for band in bands {
            if let FairnessPolicy::ProgramAware(p) = band.fairness {
                p.validate()?;
            }
        }
        Ok(())
    }

    /// The parameters of the `program-aware-fairness` state shared by every band using
    /// it: the highest explicit band's, else the default template's, else the negative
    /// template's (`None`: no band uses it).
    pub fn las_params(&self) -> Option<LasParams> {
        self.priority_bands
            .values()
            .rev()
            .chain([&self.default_band])
            .chain(&self.default_negative_band)
            .find_map(|b| match b.fairness {
                FairnessPolicy::ProgramAware(p) => Some(p),
                _ => None,
            })
    }

    /// The longest wait any request can have before a TTL expiry (`None`: unbounded).
    pub(crate) fn wait_bound(&self) -> Option<Duration> {
        match (self.default_request_ttl, self.no_endpoint_request_ttl) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        }
    }
}
