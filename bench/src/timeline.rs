//! Every request of a run on one clock: for analyses over time, such as what a fault
//! injected mid-run cost and how long the system took to recover.

use std::time::Instant;

use crate::client::FailureKind;

/// One sent request as the client saw it: when, where, and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestTiming {
    /// Seconds from [`Timeline::start`] to the send.
    pub sent_at: f64,
    /// Seconds from [`Timeline::start`] to its end (success, failure or abandonment).
    pub done_at: f64,
    /// Index into the target's [`base_urls`](crate::Target::base_urls) it was sent to.
    pub target: usize,
    /// `None` when it succeeded, else why it failed.
    pub failure: Option<FailureKind>,
}

/// The requests of one run in send order, and the instant their offsets count from.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// The run's start (just before the first send).
    pub start: Instant,
    /// Every request sent, ordered by `sent_at`.
    pub requests: Vec<RequestTiming>,
}

impl Timeline {
    /// Seconds from the run's start to `at` (negative when `at` came before it).
    pub fn offset(&self, at: Instant) -> f64 {
        match at.checked_duration_since(self.start) {
            Some(d) => d.as_secs_f64(),
            None => -self.start.duration_since(at).as_secs_f64(),
        }
    }
}
