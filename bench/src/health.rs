//! What a [`Target::Balanced`](crate::Target::Balanced) run knows about each URL's health,
//! as an L4 balancer in front of router replicas would: a connection that fails takes the
//! URL out for at least [`HOLD_DOWN`], and it comes back once a TCP connect to it succeeds.
//!
//! The state takes `now` (milliseconds from the run's start) and holds no clock, so the
//! rules are tested without sockets; [`check_loop`] is the thin driver that probes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::spec::{HEALTH_CHECK_INTERVAL, HOLD_DOWN};

/// Marks a URL as up in [`Health::down_since`].
const UP: u64 = u64::MAX;

/// Up/down state of every URL of a balanced run, shared by the senders and the checker.
#[derive(Debug)]
pub(crate) struct Health {
    /// Per URL: [`UP`], or the millisecond (from the run's start) it was marked down.
    down_since: Vec<AtomicU64>,
}

impl Health {
    /// Every one of `n` URLs up.
    pub(crate) fn new(n: usize) -> Self {
        Health {
            down_since: (0..n).map(|_| AtomicU64::new(UP)).collect(),
        }
    }

    /// Whether URL `i` is taking requests.
    pub(crate) fn is_up(&self, i: usize) -> bool {
        self.down_since[i].load(Ordering::Relaxed) == UP
    }

    /// The first URL at or after `preferred` (cyclically) that is up; `preferred` when
    /// none is (a balancer with no healthy backend still tries one).
    pub(crate) fn pick(&self, preferred: usize) -> usize {
        let n = self.down_since.len();
        (0..n)
            .map(|step| (preferred + step) % n)
            .find(|&i| self.is_up(i))
            .unwrap_or(preferred)
    }

    /// A connection to URL `i` failed at `now_ms`: no requests to it for a while. A URL
    /// already down keeps its first mark, so failures of requests that were in flight do
    /// not extend the hold-down.
    pub(crate) fn handle_connect_failure(&self, i: usize, now_ms: u64) {
        let _ = self.down_since[i].compare_exchange(
            UP,
            now_ms.min(UP - 1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// URLs the checker should probe at `now_ms`: down for at least [`HOLD_DOWN`].
    pub(crate) fn poll_probes(&self, now_ms: u64) -> Vec<usize> {
        let hold = HOLD_DOWN.as_millis() as u64;
        (0..self.down_since.len())
            .filter(|&i| {
                let since = self.down_since[i].load(Ordering::Relaxed);
                since != UP && now_ms.saturating_sub(since) >= hold
            })
            .collect()
    }

    /// A probe of URL `i` connected: it takes requests again.
    pub(crate) fn handle_probe_ok(&self, i: usize) {
        self.down_since[i].store(UP, Ordering::Relaxed);
    }
}

/// Probes held-down URLs (`authorities[i]` is URL `i`'s `host:port`) every
/// [`HEALTH_CHECK_INTERVAL`] until `until`, bringing back those that accept a connection.
pub(crate) async fn check_loop(
    health: &Health,
    authorities: &[String],
    start: Instant,
    until: Instant,
) {
    while Instant::now() < until {
        tokio::time::sleep(HEALTH_CHECK_INTERVAL).await;
        let now_ms = start.elapsed().as_millis() as u64;
        for i in health.poll_probes(now_ms) {
            let connect = tokio::net::TcpStream::connect(authorities[i].as_str());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(250), connect).await {
                health.handle_probe_ok(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_url_is_skipped_until_held_down_long_enough_and_probed() {
        let h = Health::new(3);
        assert_eq!((h.pick(0), h.pick(1), h.pick(2)), (0, 1, 2));
        h.handle_connect_failure(1, 1000);
        assert_eq!(h.pick(1), 2, "a down URL hands its turn to the next");
        assert_eq!(h.pick(0), 0);
        // A second failure (a request that was in flight) does not restart the hold-down.
        h.handle_connect_failure(1, 1500);
        let hold = HOLD_DOWN.as_millis() as u64;
        assert!(h.poll_probes(1000 + hold - 1).is_empty());
        assert_eq!(h.poll_probes(1000 + hold), [1]);
        // The probe failed (nothing called): still down.
        assert_eq!(h.pick(1), 2);
        h.handle_probe_ok(1);
        assert_eq!(h.pick(1), 1);
        assert!(h.poll_probes(1000 + 10 * hold).is_empty());
    }

    #[test]
    fn with_every_url_down_the_preferred_one_is_still_tried() {
        let h = Health::new(2);
        h.handle_connect_failure(0, 0);
        h.handle_connect_failure(1, 0);
        assert_eq!((h.pick(0), h.pick(1)), (0, 1));
    }
}
