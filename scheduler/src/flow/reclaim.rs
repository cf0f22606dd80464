//! In-flight eviction (llm-d's `enableEviction`): every dispatched request holds a lease on
//! pool capacity until the driver reports that it ended; when a band with queued requests
//! is blocked by saturation and a sheddable lease (priority < 0,
//! `sheddable-eviction-filter`) of lower priority is running, leases are revoked, lowest
//! priority first and newest first within a priority
//! (`priority-then-time-eviction-order-policy`).
//!
//! Sizing and pacing follow llm-d's reclamation controller: the deficit
//! `saturation − ceiling` of the blocked band is covered at the mean lease footprint
//! `saturation / leases` (at least one, at most [`MAX_REVOCATIONS_PER_DECISION`] per
//! decision), and no new decision is taken until every revoked lease has ended (or
//! [`CONFIRMATION_TIMEOUT`] passed) and [`CONFIRMATION_GRACE`] has passed since, so a
//! saturation signal that has not yet seen the freed room is never acted on twice.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::time::Duration;

use hashbrown::HashMap;

/// Most leases revoked by one decision (llm-d `maxRevocationsPerDecision`).
pub const MAX_REVOCATIONS_PER_DECISION: usize = 2;
/// Wait after the last confirmed revocation before the next decision (llm-d's eviction
/// grace): the engine frees the request's KV and the next measurement shows it.
pub const CONFIRMATION_GRACE: Duration = Duration::from_millis(500);
/// A revoked lease that has not ended after this counts as confirmed (a hung stream must
/// not stop eviction for good).
pub const CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(10);

struct Lease {
    priority: i32,
    dispatched_ns: u64,
}

/// The lease tracker and reclamation pacing; driven by the flow controller.
#[derive(Default)]
pub(super) struct Reclaimer {
    leases: HashMap<u64, Lease>,
    /// Revocable leases in revocation order: (priority, newest dispatch first, newest
    /// sequence first).
    victims: BTreeSet<(i32, Reverse<u64>, Reverse<u64>)>,
    /// Revoked leases not yet ended: seq → issued at (ns).
    outstanding: HashMap<u64, u64>,
    /// When the last revocation was confirmed (ended or timed out), in ns.
    last_confirmed_ns: Option<u64>,
    /// Leases revoked so far.
    pub(super) revoked: u64,
    /// Revocations confirmed by timeout instead of by the lease ending.
    pub(super) timed_out: u64,
}

impl Reclaimer {
    /// Starts tracking a dispatched request.
    pub(super) fn track(&mut self, seq: u64, priority: i32, now_ns: u64) {
        self.leases.insert(
            seq,
            Lease {
                priority,
                dispatched_ns: now_ns,
            },
        );
        if priority < 0 {
            self.victims
                .insert((priority, Reverse(now_ns), Reverse(seq)));
        }
    }

    /// A lease ended (the request finished, failed or was revoked and torn down). Returns
    /// whether it was tracked.
    pub(super) fn end(&mut self, seq: u64, now_ns: u64) -> bool {
        let Some(lease) = self.leases.remove(&seq) else {
            return false;
        };
        self.victims
            .remove(&(lease.priority, Reverse(lease.dispatched_ns), Reverse(seq)));
        if self.outstanding.remove(&seq).is_some() {
            self.last_confirmed_ns = Some(now_ns);
        }
        true
    }

    /// Leases being tracked.
    pub(super) fn len(&self) -> usize {
        self.leases.len()
    }

    /// Revoked leases that have not ended yet.
    pub(super) fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// The priority of the lease that would be revoked next.
    pub(super) fn next_victim_priority(&self) -> Option<i32> {
        self.victims.first().map(|v| v.0)
    }

    /// Whether a new decision may be taken at `now_ns`: nothing outstanding (after timing
    /// out hung revocations) and the grace since the last confirmation over.
    pub(super) fn may_decide(&mut self, now_ns: u64) -> bool {
        let timeout = CONFIRMATION_TIMEOUT.as_nanos() as u64;
        let before = self.outstanding.len();
        self.outstanding
            .retain(|_, issued| now_ns.saturating_sub(*issued) < timeout);
        let expired = before - self.outstanding.len();
        if expired > 0 {
            self.timed_out += expired as u64;
            self.last_confirmed_ns = Some(now_ns);
        }
        if !self.outstanding.is_empty() {
            return false;
        }
        self.last_confirmed_ns
            .is_none_or(|t| now_ns.saturating_sub(t) >= CONFIRMATION_GRACE.as_nanos() as u64)
    }

    /// When a decision blocked only by the grace (or a hung revocation) may be taken.
    pub(super) fn next_decision_ns(&self) -> Option<u64> {
        if let Some(first) = self.outstanding.values().min() {
            return Some(first.saturating_add(CONFIRMATION_TIMEOUT.as_nanos() as u64));
        }
        self.last_confirmed_ns
            .map(|t| t.saturating_add(CONFIRMATION_GRACE.as_nanos() as u64))
    }

    /// Revokes up to `n` leases of priority below `demand_priority`, in revocation order;
    /// returns them.
    pub(super) fn revoke(&mut self, n: usize, demand_priority: i32, now_ns: u64) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(&v) = self.victims.first() else {
                break;
            };
            if v.0 >= demand_priority {
                break;
            }
            self.victims.remove(&v);
            self.outstanding.insert(v.2.0, now_ns);
            out.push(v.2.0);
        }
        self.revoked += out.len() as u64;
        out
    }
}

/// How many leases to revoke for a band blocked at `ceiling` under `saturation`, with
/// `leases` tracked (llm-d's sizing: the deficit over the mean lease footprint, at least
/// one, at most the cap; [`Reclaimer::revoke`] stops early when victims run out).
pub(super) fn revocations(saturation: f64, ceiling: f64, leases: usize) -> usize {
    if leases == 0 || !saturation.is_finite() {
        return 0;
    }
    let deficit = (saturation - ceiling).max(0.0);
    let credit = saturation / leases as f64;
    let n = if credit > 0.0 {
        (deficit / credit).ceil() as usize
    } else {
        1
    };
    n.clamp(1, MAX_REVOCATIONS_PER_DECISION)
}
