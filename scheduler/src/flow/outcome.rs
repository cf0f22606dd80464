//! What became of a request in flow control: llm-d's outcomes (the `outcome` label of
//! `flow_control_requests_total`) and the HTTP answer each one calls for.

use std::time::Duration;

/// A caller-held handle to one queued request; unique for the controller's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub(crate) u64);

impl Ticket {
    /// The raw number (for logs and maps).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// A terminal outcome, named as llm-d's `QueueOutcome` (`pkg/epp/flowcontrol/types/outcomes.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Released to the scheduler.
    Dispatched,
    /// Refused at enqueue: band or global capacity full while the pool has endpoints.
    RejectedCapacity,
    /// Refused at enqueue: capacity full while the pool has no endpoints.
    RejectedNoEndpoints,
    /// Refused at enqueue for another reason (the controller is shutting down).
    RejectedOther,
    /// Removed from the queue: its wait budget or own deadline passed while the pool had endpoints.
    EvictedTtl,
    /// Removed from the queue: its wait budget passed while the pool had no endpoints.
    EvictedNoEndpoints,
    /// Removed from the queue: the client went away.
    EvictedContextCancelled,
    /// Removed from the queue for another reason (displaced by a higher priority, shutdown).
    EvictedOther,
}

impl Outcome {
    /// Every outcome, in label order (for exporting counters).
    pub const ALL: [Outcome; 8] = [
        Outcome::Dispatched,
        Outcome::RejectedCapacity,
        Outcome::RejectedNoEndpoints,
        Outcome::RejectedOther,
        Outcome::EvictedTtl,
        Outcome::EvictedNoEndpoints,
        Outcome::EvictedContextCancelled,
        Outcome::EvictedOther,
    ];

    /// The metric label value, exactly as llm-d prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Dispatched => "Dispatched",
            Outcome::RejectedCapacity => "RejectedCapacity",
            Outcome::RejectedNoEndpoints => "RejectedNoEndpoints",
            Outcome::RejectedOther => "RejectedOther",
            Outcome::EvictedTtl => "EvictedTTL",
            Outcome::EvictedNoEndpoints => "EvictedNoEndpoints",
            Outcome::EvictedContextCancelled => "EvictedContextCancelled",
            Outcome::EvictedOther => "EvictedOther",
        }
    }

    /// Position in [`Outcome::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The answer llm-d gives for this outcome when nothing more specific is known
    /// (§1.5: 429 for capacity and TTL, 503 when the pool has no endpoints).
    pub fn default_reason(self) -> Option<DropReason> {
        match self {
            Outcome::Dispatched => None,
            Outcome::RejectedCapacity => Some(DropReason::Saturated),
            Outcome::RejectedNoEndpoints | Outcome::EvictedNoEndpoints => {
                Some(DropReason::NoEndpoints)
            }
            Outcome::RejectedOther => Some(DropReason::Internal),
            Outcome::EvictedTtl => Some(DropReason::TtlExpired),
            Outcome::EvictedContextCancelled => Some(DropReason::ContextCancelled),
            Outcome::EvictedOther => Some(DropReason::Evicted),
        }
    }
}

/// Why a request was dropped: the value of `x-llm-d-request-dropped-reason`
/// (`pkg/common/error/error.go`) with its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Capacity full (429, `rejected-saturated`).
    Saturated,
    /// The pool has no endpoints (503, `rejected-no-endpoints`).
    NoEndpoints,
    /// The queue-wait budget ran out (429, `rejected-ttl-expired`).
    TtlExpired,
    /// The client went away (503, `rejected-context-cancelled`; usually nobody reads it).
    ContextCancelled,
    /// The controller is shutting down (503, `rejected-shutting-down`).
    ShuttingDown,
    /// An internal failure (503, `rejected-internal`).
    Internal,
    /// Displaced by higher-priority work (429, `evicted-priority`).
    EvictedPriority,
    /// Evicted for an unspecified reason (429, `evicted`).
    Evicted,
}

/// The header that carries a [`DropReason`].
pub const DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";

impl DropReason {
    /// The HTTP status of the immediate response.
    pub fn status(self) -> u16 {
        match self {
            DropReason::Saturated
            | DropReason::TtlExpired
            | DropReason::EvictedPriority
            | DropReason::Evicted => 429,
            DropReason::NoEndpoints
            | DropReason::ContextCancelled
            | DropReason::ShuttingDown
            | DropReason::Internal => 503,
        }
    }

    /// The value of `x-llm-d-request-dropped-reason`.
    pub fn header_value(self) -> &'static str {
        match self {
            DropReason::Saturated => "rejected-saturated",
            DropReason::NoEndpoints => "rejected-no-endpoints",
            DropReason::TtlExpired => "rejected-ttl-expired",
            DropReason::ContextCancelled => "rejected-context-cancelled",
            DropReason::ShuttingDown => "rejected-shutting-down",
            DropReason::Internal => "rejected-internal",
            DropReason::EvictedPriority => "evicted-priority",
            DropReason::Evicted => "evicted",
        }
    }
}

/// A request refused at enqueue; it never took a place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flow control refused the request: {} ({})", outcome.as_str(), reason.header_value())]
pub struct Rejection {
    /// `RejectedCapacity`, `RejectedNoEndpoints` or `RejectedOther`.
    pub outcome: Outcome,
    /// What to answer.
    pub reason: DropReason,
}

/// A queued request's terminal outcome, returned by the controller's poll methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Which request.
    pub ticket: Ticket,
    /// What became of it.
    pub outcome: Outcome,
    /// What to answer when it was not dispatched (`None` when dispatched).
    pub reason: Option<DropReason>,
    /// Its band's priority (a metric label).
    pub priority: i32,
    /// How long it waited (for `flow_control_request_queue_duration_seconds`).
    pub waited: Duration,
}

impl Decision {
    /// Whether the request may now be scheduled.
    pub fn is_dispatched(&self) -> bool {
        self.outcome == Outcome::Dispatched
    }
}
