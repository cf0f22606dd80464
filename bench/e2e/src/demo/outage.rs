//! What killing a node cost the clients, read off the run's request timeline.
//!
//! Definitions (the report prints them):
//! - *around the kill*: requests in flight at the kill (sent before it, ended after it)
//!   or sent within [`WINDOW`] after it: the ones a dying node and the failure
//!   detection in front of it may cost;
//! - *after*: requests sent later than that; a tier that absorbed the kill fails none;
//! - *time to recover*: from the kill to the end of the last failed request that ended
//!   after the kill; from then on every request succeeded. Zero when none failed.

use std::time::Duration;

use infermesh_bench::RequestTiming;

/// After the kill, how long failures are attributed to it.
pub const WINDOW: Duration = Duration::from_secs(2);

/// Failures of one run split around a node kill, and the time to recover.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    /// Seconds from the run's start to the kill.
    pub kill_at: f64,
    /// Requests in flight at the kill.
    pub in_flight: usize,
    /// Requests that failed before the kill (neither in flight at it nor after it).
    pub failed_before: usize,
    /// Requests in flight at the kill or sent within [`WINDOW`] after it that failed.
    pub failed_around: usize,
    /// Requests sent more than [`WINDOW`] after the kill that failed.
    pub failed_after: usize,
    /// Seconds from the kill to the end of the last failure after it (0: none failed).
    pub recovery: f64,
    /// Requests sent after the recovery point (all of them succeeded, by definition).
    pub sent_after_recovery: usize,
}

impl Outage {
    /// Splits `requests` (offsets in seconds from the run's start) around a kill at
    /// `kill_at`.
    pub fn from_timeline(requests: &[RequestTiming], kill_at: f64) -> Outage {
        let window_end = kill_at + WINDOW.as_secs_f64();
        let mut o = Outage {
            kill_at,
            in_flight: 0,
            failed_before: 0,
            failed_around: 0,
            failed_after: 0,
            recovery: 0.0,
            sent_after_recovery: 0,
        };
        let mut last_failure_end = None::<f64>;
        for r in requests {
            let in_flight = r.sent_at < kill_at && r.done_at >= kill_at;
            o.in_flight += usize::from(in_flight);
            if r.failure.is_none() {
                continue;
            }
            if r.done_at >= kill_at {
                last_failure_end = Some(last_failure_end.map_or(r.done_at, |t| t.max(r.done_at)));
            }
            if r.sent_at < kill_at && !in_flight {
                o.failed_before += 1;
            } else if r.sent_at <= window_end {
                o.failed_around += 1;
            } else {
                o.failed_after += 1;
            }
        }
        let recovered_at = last_failure_end.unwrap_or(kill_at);
        o.recovery = recovered_at - kill_at;
        o.sent_after_recovery = requests.iter().filter(|r| r.sent_at > recovered_at).count();
        o
    }
}

#[cfg(test)]
mod tests {
    use infermesh_bench::FailureKind;

    use super::*;

    fn req(sent_at: f64, done_at: f64, failure: Option<FailureKind>) -> RequestTiming {
        RequestTiming {
            sent_at,
            done_at,
            target: 0,
            failure,
        }
    }

    #[test]
    fn failures_are_split_around_the_kill_and_recovery_ends_at_the_last_one() {
        let stream = Some(FailureKind::Stream);
        let connect = Some(FailureKind::Connect);
        let requests = [
            req(1.0, 2.0, Some(FailureKind::Timeout)), // before the kill
            req(4.0, 6.0, None),                       // in flight, survived
            req(4.5, 5.0, stream),                     // in flight, cut off
            req(5.5, 5.5, connect),                    // sent within the window
            req(6.9, 7.2, connect),                    // the window's last moment
            req(7.5, 8.0, None),
            req(9.0, 9.5, None),
        ];
        let o = Outage::from_timeline(&requests, 5.0);
        assert_eq!(o.in_flight, 2);
        assert_eq!(o.failed_before, 1);
        assert_eq!(o.failed_around, 3);
        assert_eq!(o.failed_after, 0);
        assert!((o.recovery - 2.2).abs() < 1e-9, "{}", o.recovery);
        assert_eq!(o.sent_after_recovery, 2);
    }

    #[test]
    fn a_late_failure_counts_after_and_stretches_recovery() {
        let requests = [
            req(4.0, 5.5, Some(FailureKind::Stream)),
            req(8.0, 8.1, Some(FailureKind::Status(503))),
            req(9.0, 9.5, None),
        ];
        let o = Outage::from_timeline(&requests, 5.0);
        assert_eq!((o.failed_around, o.failed_after), (1, 1));
        assert!((o.recovery - 3.1).abs() < 1e-9);
        assert_eq!(o.sent_after_recovery, 1);
    }

    #[test]
    fn no_failure_means_no_recovery_time() {
        let o = Outage::from_timeline(&[req(4.0, 6.0, None), req(6.0, 6.5, None)], 5.0);
        assert_eq!((o.failed_around, o.failed_after, o.recovery), (0, 0, 0.0));
        assert_eq!(o.sent_after_recovery, 1);
    }
}
