//! Flow control (llm-d's `flowControl` feature gate) as a sans-IO state machine.
//!
//! A request that passes admission waits here until the pool has room. Three tiers decide
//! what leaves next, as in llm-d (`pkg/epp/flowcontrol`):
//!
//! 1. **Priority bands**, strictly: a band is served only when every higher band is empty
//!    (or gated by the usage limit). Priority is the InferenceObjective's; unknown
//!    priorities get a band made on the fly from `defaultPriorityBand`
//!    (`defaultNegativePriorityBand` for priority < 0, when set).
//! 2. **Fairness across flows** (flow = fairness id) inside a band:
//!    `global-strict-fairness-policy`, `round-robin-fairness-policy` or
//!    `program-aware-fairness` (least attained service, see [`programs`]).
//! 3. **Ordering within a flow**: `fcfs-ordering-policy`, `edf-ordering-policy` or
//!    `slo-deadline-ordering-policy`.
//!
//! Capacity is checked at enqueue (per band: `maxRequests` 5000 and `maxBytes` 1 G by
//! default; globally: unlimited unless set). A request waits at most its TTL
//! (`defaultRequestTTL` 60 s while the pool has endpoints, `noEndpointRequestTTL` 60 s while
//! it has none; a regime change starts a fresh budget) or its own deadline. Dispatch happens
//! only while the pool has endpoints and its saturation is below the band's usage-limit
//! ceiling: one threshold for every band (`static-usage-limit-policy`, 1.0), or per-band
//! ceilings that keep headroom free for higher bands (`priority-holdback-policy`,
//! `soft-reflective-ceiling-policy`). infermesh's `fair-share-holdback-policy` adds one
//! thing to the holdback ceilings: in a `program-aware-fairness` band, a flow whose attained
//! service is below `underShare` of the mean of the band's queued flows may dispatch up to
//! the next higher band's ceiling, so a light tenant is not held back with a heavy one.
//!
//! With `enableEviction`, dispatched requests hold leases the driver ends with
//! [`FlowController::handle_lease_end`]; a band blocked with queued requests revokes running
//! sheddable leases of lower priority ([`FlowController::poll_revocation`], see
//! [`reclaim`]). Queued requests are never displaced: a full queue refuses with 429.
//!
//! Every operation costs O(log n) in the queued requests (plus O(bands) to find the
//! highest band, and bands are few); nothing reads a clock, sleeps, spawns or locks.
//!
//! # Driving it
//!
//! One task owns the [`FlowController`] (like `gossip`'s load board) and receives an
//! `enum Input` over a channel; request tasks never touch it directly.
//!
//! - A request task sends `Enqueue { request, reply }`. The owner calls
//!   [`FlowController::handle_enqueue`]; on `Err(Rejection)` it answers at once with
//!   [`Rejection::reason`] ([`DropReason::status`] and
//!   [`DropReason::header_value`] in `x-llm-d-request-dropped-reason`); on `Ok(ticket)` it
//!   keeps `ticket → reply` and then polls (the new request may be dispatchable now).
//! - When a request task's client goes away (ext_proc stream or connection closed), it sends
//!   `Cancel(ticket)`; the owner calls [`FlowController::handle_cancel`], which frees the
//!   place at once.
//! - On every load-board change (and after each dispatch, when the driver raises its
//!   estimate of saturation), the owner calls [`FlowController::handle_pool`].
//! - After any input, and when the timer set to [`FlowController::next_deadline`] fires, the
//!   owner drains [`FlowController::poll_decision`] until it returns `None` (or calls
//!   [`FlowController::dispatch`] with a batch limit), sending each [`Decision`] to its
//!   ticket's task: dispatched requests go on to scheduling, the others get
//!   [`Decision::reason`] as their immediate response.
//! - For a dispatch from a `program-aware-fairness` band ([`FlowController::wants_usage`]),
//!   the driver reports the request's token usage when it ends with
//!   [`FlowController::handle_served`]; it feeds the program's attained service.
//! - When the configuration changes at runtime (a new EndpointPickerConfig), the owner
//!   calls [`FlowController::handle_reconfigure`]: queued requests stay, under the new
//!   bands and policies. When the `flowControl` gate is turned off, it calls
//!   [`FlowController::handle_release_all`] and lets later requests bypass the controller.
//! - Metrics: [`FlowController::len`], [`FlowController::bytes`],
//!   [`FlowController::bands`], [`FlowController::global_utilization`] and
//!   [`FlowController::outcome_total`] feed the `flow_control_*` gauges and counters;
//!   [`Decision::waited`] feeds the queue-duration histogram.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use infermesh_scheduler::flow::*;
//!
//! let t0 = Instant::now();
//! let mut fc = FlowController::new(FlowConfig::default(), t0)?;
//! let ticket = fc
//!     .handle_enqueue(&FlowRequest::new(0, "default-flow", 512, t0), t0)
//!     .expect("there is room");
//! fc.handle_pool(PoolStatus::serving(1.2), t0); // saturated: it waits
//! assert_eq!(fc.poll_decision(t0), None);
//! fc.handle_pool(PoolStatus::serving(0.5), t0 + Duration::from_secs(1));
//! let d = fc.poll_decision(t0 + Duration::from_secs(1)).expect("dispatched");
//! assert_eq!((d.ticket, d.outcome), (ticket, Outcome::Dispatched));
//! # Ok::<(), InvalidFlowConfig>(())
//! ```

mod band;
pub mod config;
mod controller;
pub mod outcome;
pub mod programs;
pub mod reclaim;

pub use config::{
    BandConfig, FairnessPolicy, FlowConfig, HoldbackDomain, InvalidFlowConfig, LasParams,
    OrderingPolicy, UsageLimitPolicy,
};
pub use controller::{BandStats, FlowController, FlowRequest, PoolStatus};
pub use outcome::{DROPPED_REASON_HEADER, Decision, DropReason, Outcome, Rejection, Ticket};

#[cfg(test)]
mod tests;
