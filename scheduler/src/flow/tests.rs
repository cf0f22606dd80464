//! Engine tests: feed enqueues, cancels and pool changes with explicit times; check decisions.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap()
}

fn ctl(cfg: FlowConfig) -> (FlowController, Instant) {
    let t0 = Instant::now();
    (FlowController::new(cfg, t0).unwrap(), t0)
}

fn enq(fc: &mut FlowController, p: i32, flow: &str, bytes: u64, now: Instant) -> Ticket {
    fc.handle_enqueue(&FlowRequest::new(p, flow, bytes, now), now)
        .unwrap()
}

fn drain(fc: &mut FlowController, now: Instant) -> Vec<Decision> {
    std::iter::from_fn(|| fc.poll_decision(now)).collect()
}

fn dispatched(ds: &[Decision]) -> Vec<Ticket> {
    ds.iter()
        .filter(|d| d.is_dispatched())
        .map(|d| d.ticket)
        .collect()
}

#[test]
fn ttl_expiry_evicts_with_429_ttl_expired() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let a = enq(&mut fc, 0, "f", 10, t0);
    let b = enq(&mut fc, 0, "f", 10, t0 + secs(5));
    fc.handle_pool(PoolStatus::serving(1.0), t0);
    assert_eq!(fc.next_deadline(), Some(t0 + secs(60)));
    assert!(drain(&mut fc, t0 + secs(59)).is_empty());
    let ds = drain(&mut fc, t0 + secs(60));
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].ticket, a);
    assert_eq!(ds[0].outcome, Outcome::EvictedTtl);
    assert_eq!(ds[0].waited, secs(60));
    let r = ds[0].reason.unwrap();
    assert_eq!(
        (r.status(), r.header_value()),
        (429, "rejected-ttl-expired")
    );
    assert_eq!(fc.next_deadline(), Some(t0 + secs(65)));
    assert_eq!(drain(&mut fc, t0 + secs(65))[0].ticket, b);
    assert!(fc.is_empty());
    assert_eq!(fc.outcome_total(Outcome::EvictedTtl), 2);
    assert_eq!(fc.next_deadline(), None);
}

#[test]
fn zero_ttl_disables_expiry() {
    let cfg = FlowConfig {
        default_request_ttl: None,
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    enq(&mut fc, 0, "f", 10, t0);
    assert_eq!(fc.next_deadline(), None);
    assert!(drain(&mut fc, t0 + secs(100_000)).is_empty());
    assert_eq!(fc.len(), 1);
}

#[test]
fn own_deadline_evicts_before_ttl() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let mut r = FlowRequest::new(0, "f", 1, t0);
    r.deadline = Some(t0 + secs(3));
    let t = fc.handle_enqueue(&r, t0).unwrap();
    assert_eq!(fc.next_deadline(), Some(t0 + secs(3)));
    let ds = drain(&mut fc, t0 + secs(3));
    assert_eq!((ds[0].ticket, ds[0].outcome), (t, Outcome::EvictedTtl));
}

#[test]
fn no_endpoints_regime_uses_its_own_budget_and_503() {
    let cfg = FlowConfig {
        default_request_ttl: Some(secs(10)),
        no_endpoint_request_ttl: Some(secs(100)),
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    fc.handle_pool(PoolStatus::empty(), t0);
    let a = enq(&mut fc, 0, "f", 1, t0);
    assert_eq!(fc.next_deadline(), Some(t0 + secs(100)));
    // Nothing is dispatched to an empty pool, even at low saturation.
    fc.handle_pool(
        PoolStatus {
            saturation: 0.0,
            has_endpoints: false,
        },
        t0,
    );
    assert!(drain(&mut fc, t0 + secs(50)).is_empty());
    let ds = drain(&mut fc, t0 + secs(100));
    assert_eq!(
        (ds[0].ticket, ds[0].outcome),
        (a, Outcome::EvictedNoEndpoints)
    );
    let r = ds[0].reason.unwrap();
    assert_eq!(
        (r.status(), r.header_value()),
        (503, "rejected-no-endpoints")
    );
}

#[test]
fn regime_change_grants_a_fresh_budget_bounded_by_the_longer_one() {
    let cfg = FlowConfig {
        default_request_ttl: Some(secs(10)),
        no_endpoint_request_ttl: Some(secs(100)),
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    fc.handle_pool(PoolStatus::empty(), t0);
    let a = enq(&mut fc, 0, "f", 1, t0);
    let b = enq(&mut fc, 0, "f", 1, t0 + secs(50));
    // An endpoint appears at 95 s, but the pool is saturated: the 10 s budget starts now.
    fc.handle_pool(PoolStatus::serving(2.0), t0 + secs(95));
    // a: min(95 + 10, 0 + 100) = 100; b: min(105, 150) = 105.
    assert_eq!(fc.next_deadline(), Some(t0 + secs(100)));
    let ds = drain(&mut fc, t0 + secs(104));
    assert_eq!(
        (ds.len(), ds[0].ticket, ds[0].outcome),
        (1, a, Outcome::EvictedTtl)
    );
    assert_eq!(drain(&mut fc, t0 + secs(105))[0].ticket, b);
}

#[test]
fn band_request_capacity_rejects_with_429() {
    let mut cfg = FlowConfig::default();
    cfg.priority_bands.insert(
        0,
        BandConfig {
            max_requests: nz(2),
            ..BandConfig::default()
        },
    );
    let (mut fc, t0) = ctl(cfg);
    enq(&mut fc, 0, "a", 1, t0);
    enq(&mut fc, 0, "b", 1, t0);
    let r = fc
        .handle_enqueue(&FlowRequest::new(0, "c", 1, t0), t0)
        .unwrap_err();
    assert_eq!(r.outcome, Outcome::RejectedCapacity);
    assert_eq!(
        (r.reason.status(), r.reason.header_value()),
        (429, "rejected-saturated")
    );
    // Another band is not affected.
    enq(&mut fc, 5, "c", 1, t0);
    assert_eq!(fc.outcome_total(Outcome::RejectedCapacity), 1);
}

#[test]
fn band_byte_capacity_rejects() {
    let mut cfg = FlowConfig::default();
    cfg.default_band.max_bytes = nz(100);
    let (mut fc, t0) = ctl(cfg);
    enq(&mut fc, 3, "a", 60, t0);
    assert!(
        fc.handle_enqueue(&FlowRequest::new(3, "a", 41, t0), t0)
            .is_err()
    );
    enq(&mut fc, 3, "a", 40, t0);
    assert_eq!(fc.bands().find(|b| b.priority == 3).unwrap().bytes, 100);
}

#[test]
fn global_capacity_in_requests_and_bytes() {
    let cfg = FlowConfig {
        max_requests: Some(nz(3)),
        max_bytes: Some(nz(1000)),
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    enq(&mut fc, 0, "a", 1, t0);
    enq(&mut fc, 1, "a", 1, t0);
    enq(&mut fc, 2, "a", 1, t0);
    let r = fc.handle_enqueue(&FlowRequest::new(3, "a", 1, t0), t0);
    assert_eq!(r.unwrap_err().outcome, Outcome::RejectedCapacity);
    assert_eq!(fc.global_utilization().0, Some(1.0));

    let (mut fc, t0) = ctl(FlowConfig {
        max_bytes: Some(nz(1000)),
        ..FlowConfig::default()
    });
    enq(&mut fc, 0, "a", 600, t0);
    assert!(
        fc.handle_enqueue(&FlowRequest::new(1, "a", 401, t0), t0)
            .is_err()
    );
    enq(&mut fc, 1, "a", 400, t0);
}

#[test]
fn capacity_rejection_without_endpoints_is_503() {
    let cfg = FlowConfig {
        max_requests: Some(nz(1)),
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    fc.handle_pool(PoolStatus::empty(), t0);
    enq(&mut fc, 0, "a", 1, t0);
    let r = fc
        .handle_enqueue(&FlowRequest::new(0, "a", 1, t0), t0)
        .unwrap_err();
    assert_eq!(r.outcome, Outcome::RejectedNoEndpoints);
    assert_eq!(
        (r.reason.status(), r.reason.header_value()),
        (503, "rejected-no-endpoints")
    );
}

#[test]
fn cancel_frees_the_slot_at_once() {
    let cfg = FlowConfig {
        max_requests: Some(nz(1)),
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    let a = enq(&mut fc, 0, "a", 7, t0);
    assert!(
        fc.handle_enqueue(&FlowRequest::new(0, "b", 1, t0), t0)
            .is_err()
    );
    let d = fc.handle_cancel(a, t0 + secs(2)).unwrap();
    assert_eq!(d.outcome, Outcome::EvictedContextCancelled);
    assert_eq!(d.waited, secs(2));
    assert_eq!((fc.len(), fc.bytes()), (0, 0));
    assert!(
        fc.handle_cancel(a, t0).is_none(),
        "second cancel is a no-op"
    );
    let b = enq(&mut fc, 0, "b", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    assert_eq!(dispatched(&drain(&mut fc, t0)), vec![b]);
    assert_eq!(fc.outcome_total(Outcome::EvictedContextCancelled), 1);
    assert_eq!(fc.next_deadline(), None);
}

#[test]
fn round_robin_alternates_between_flows() {
    let mut cfg = FlowConfig::default();
    cfg.priority_bands.insert(
        0,
        BandConfig {
            fairness: FairnessPolicy::RoundRobin,
            ..BandConfig::default()
        },
    );
    let (mut fc, t0) = ctl(cfg);
    let a: Vec<Ticket> = (0..4).map(|_| enq(&mut fc, 0, "a", 1, t0)).collect();
    let b: Vec<Ticket> = (0..2).map(|_| enq(&mut fc, 0, "b", 1, t0)).collect();
    let c = enq(&mut fc, 0, "c", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    let got = dispatched(&drain(&mut fc, t0));
    assert_eq!(got, vec![a[0], b[0], c, a[1], b[1], a[2], a[3]]);
}

/// llm-d's cursor: a flow that emptied and comes back is served right after the flow
/// served last, not behind a turn of every busy flow (a light tenant waits one dispatch).
#[test]
fn round_robin_serves_a_returning_flow_after_the_last_one_served() {
    let mut cfg = FlowConfig::default();
    cfg.default_band.fairness = FairnessPolicy::RoundRobin;
    let (mut fc, t0) = ctl(cfg);
    let a: Vec<Ticket> = (0..4).map(|_| enq(&mut fc, 0, "a", 1, t0)).collect();
    let b0 = enq(&mut fc, 0, "b", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    let next = |fc: &mut FlowController| fc.poll_decision(t0).map(|d| d.ticket);
    assert_eq!(next(&mut fc), Some(a[0]));
    assert_eq!(next(&mut fc), Some(b0));
    assert_eq!(next(&mut fc), Some(a[1]));
    assert_eq!(next(&mut fc), Some(a[2]));
    let b1 = enq(&mut fc, 0, "b", 1, t0);
    assert_eq!(next(&mut fc), Some(b1));
    assert_eq!(next(&mut fc), Some(a[3]));
    assert_eq!(next(&mut fc), None);
}

#[test]
fn global_strict_ignores_flow_boundaries() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let a0 = enq(&mut fc, 0, "a", 1, t0);
    let a1 = enq(&mut fc, 0, "a", 1, t0);
    let b0 = enq(&mut fc, 0, "b", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    assert_eq!(dispatched(&drain(&mut fc, t0)), vec![a0, a1, b0]);
}

#[test]
fn edf_orders_by_deadline() {
    let mut cfg = FlowConfig::default();
    cfg.default_band.ordering = OrderingPolicy::Edf;
    let (mut fc, t0) = ctl(cfg);
    let mut r = FlowRequest::new(1, "f", 1, t0);
    r.deadline = Some(t0 + secs(30));
    let late = fc.handle_enqueue(&r, t0).unwrap(); // deadline 30
    let ttl = enq(&mut fc, 1, "f", 1, t0); // deadline 60 (TTL)
    r.deadline = Some(t0 + secs(5));
    let soon = fc.handle_enqueue(&r, t0 + secs(1)).unwrap(); // deadline 5
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(2));
    assert_eq!(
        dispatched(&drain(&mut fc, t0 + secs(2))),
        vec![soon, late, ttl]
    );
}

#[test]
fn slo_deadline_orders_by_ttft_header() {
    let mut cfg = FlowConfig::default();
    cfg.default_band.ordering = OrderingPolicy::SloDeadline;
    let (mut fc, t0) = ctl(cfg);
    let none = enq(&mut fc, 2, "f", 1, t0);
    let mut r = FlowRequest::new(2, "g", 1, t0);
    r.slo_ttft = Some(Duration::from_millis(900));
    let loose = fc.handle_enqueue(&r, t0).unwrap();
    r.slo_ttft = Some(Duration::from_millis(200));
    r.received = t0 + Duration::from_millis(100);
    let tight = fc
        .handle_enqueue(&r, t0 + Duration::from_millis(100))
        .unwrap();
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(1));
    assert_eq!(
        dispatched(&drain(&mut fc, t0 + secs(1))),
        vec![tight, loose, none]
    );
}

#[test]
fn saturation_gates_dispatch_until_it_drops() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let ts: Vec<Ticket> = (0..5).map(|i| enq(&mut fc, i % 2, "f", 1, t0)).collect();
    for sat in [1.0, 1.5, f64::NAN] {
        fc.handle_pool(PoolStatus::serving(sat), t0);
        assert!(drain(&mut fc, t0).is_empty(), "saturation {sat}");
    }
    let mut out = Vec::new();
    fc.dispatch(t0, PoolStatus::serving(0.99), 2, &mut out);
    assert_eq!(out.len(), 2);
    fc.dispatch(t0, PoolStatus::serving(0.5), usize::MAX, &mut out);
    let mut got = dispatched(&out);
    got.sort();
    assert_eq!(got, ts);
    assert_eq!(fc.outcome_total(Outcome::Dispatched), 5);
}

#[test]
fn static_threshold_below_one() {
    let cfg = FlowConfig {
        usage_limit: UsageLimitPolicy::Static { threshold: 0.8 },
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    enq(&mut fc, 0, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.8), t0);
    assert!(drain(&mut fc, t0).is_empty());
    fc.handle_pool(PoolStatus::serving(0.79), t0);
    assert_eq!(drain(&mut fc, t0).len(), 1);
}

/// Dispatches `n` requests of `priority` at `at` on an open pool; returns their tickets.
fn dispatch_n(fc: &mut FlowController, priority: i32, n: usize, at: Instant) -> Vec<Ticket> {
    let ts: Vec<Ticket> = (0..n).map(|_| enq(fc, priority, "f", 1, at)).collect();
    fc.handle_pool(PoolStatus::serving(0.0), at);
    let got = dispatched(&drain(fc, at));
    assert_eq!(got, ts);
    ts
}

fn eviction_on() -> FlowConfig {
    FlowConfig {
        enable_eviction: true,
        ..FlowConfig::default()
    }
}

#[test]
fn in_flight_eviction_revokes_newest_lowest_priority_sheddable_leases() {
    let (mut fc, t0) = ctl(eviction_on());
    let m1 = dispatch_n(&mut fc, -1, 2, t0);
    let m5 = dispatch_n(&mut fc, -5, 1, t0 + secs(1));
    let keep = dispatch_n(&mut fc, 0, 1, t0 + secs(1));
    assert_eq!(fc.leases(), (4, 0));
    // Saturated with standard demand queued: the deficit 1.2 - 1.0 at a mean footprint of
    // 1.2 / 4 is one lease; the victim is the lowest priority.
    let waiting = enq(&mut fc, 0, "f", 1, t0 + secs(2));
    fc.handle_pool(PoolStatus::serving(1.2), t0 + secs(2));
    assert!(drain(&mut fc, t0 + secs(2)).is_empty());
    assert_eq!(fc.poll_revocation(), Some(m5[0]));
    assert_eq!(fc.poll_revocation(), None);
    // Paced: nothing more while the revocation is outstanding...
    assert!(drain(&mut fc, t0 + secs(3)).is_empty());
    assert_eq!(fc.poll_revocation(), None);
    // ...nor within the grace after it ended.
    fc.handle_lease_end(m5[0], t0 + secs(3));
    assert_eq!(fc.leases(), (3, 0));
    let grace = reclaim::CONFIRMATION_GRACE;
    assert_eq!(fc.next_deadline(), Some(t0 + secs(3) + grace));
    assert!(drain(&mut fc, t0 + secs(3)).is_empty());
    assert_eq!(fc.poll_revocation(), None);
    // After it, the newest of the -1 leases goes; never the priority-0 one.
    assert!(drain(&mut fc, t0 + secs(3) + grace).is_empty());
    assert_eq!(fc.poll_revocation(), Some(m1[1]));
    fc.handle_lease_end(m1[1], t0 + secs(4));
    assert!(drain(&mut fc, t0 + secs(5)).is_empty());
    assert_eq!(fc.poll_revocation(), Some(m1[0]));
    fc.handle_lease_end(m1[0], t0 + secs(5));
    assert!(drain(&mut fc, t0 + secs(6)).is_empty());
    assert_eq!(
        fc.poll_revocation(),
        None,
        "only {keep:?} is left, and it is not sheddable"
    );
    assert_eq!(fc.revocations_total(), (3, 0));
    // Room at last: the waiting request goes.
    fc.handle_pool(PoolStatus::serving(0.5), t0 + secs(6));
    assert_eq!(dispatched(&drain(&mut fc, t0 + secs(6))), vec![waiting]);
}

#[test]
fn eviction_needs_blocked_demand_of_higher_priority() {
    let (mut fc, t0) = ctl(eviction_on());
    dispatch_n(&mut fc, -1, 3, t0);
    // Saturated, but only sheddable demand of the same priority waits: no churn.
    enq(&mut fc, -1, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    assert!(drain(&mut fc, t0).is_empty());
    assert_eq!(fc.poll_revocation(), None);
    // Higher demand but the pool not blocked: nothing either.
    let (mut fc, t0) = ctl(eviction_on());
    dispatch_n(&mut fc, -1, 3, t0);
    fc.handle_pool(PoolStatus::serving(0.5), t0);
    enq(&mut fc, 0, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(1.0), t0);
    // Saturation 1.0 blocks (the gate is `saturation >= ceiling`): one revocation.
    assert!(drain(&mut fc, t0).is_empty());
    assert!(fc.poll_revocation().is_some());
    // Sized by the deficit: at 2.0 over a ceiling of 1.0 with 3 leases (mean footprint
    // 2/3) two are needed, the per-decision cap.
    let (mut fc, t0) = ctl(eviction_on());
    dispatch_n(&mut fc, -1, 3, t0);
    enq(&mut fc, 5, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(2.0), t0);
    drain(&mut fc, t0);
    let n = std::iter::from_fn(|| fc.poll_revocation()).count();
    assert_eq!(n, 2);
}

#[test]
fn without_eviction_nothing_is_revoked_and_a_hung_revocation_times_out() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    dispatch_n(&mut fc, -1, 2, t0);
    enq(&mut fc, 0, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    assert!(drain(&mut fc, t0).is_empty());
    assert_eq!(fc.poll_revocation(), None);
    assert_eq!(
        fc.leases(),
        (0, 0),
        "leases are tracked only with eviction on"
    );

    let (mut fc, t0) = ctl(eviction_on());
    let leases = dispatch_n(&mut fc, -1, 2, t0);
    enq(&mut fc, 0, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(1.1), t0);
    drain(&mut fc, t0);
    assert_eq!(fc.poll_revocation(), Some(leases[1]));
    // The revoked request never reports its end: after the timeout (and the grace) the
    // next lease goes anyway, and the hung one is counted.
    let late = t0 + reclaim::CONFIRMATION_TIMEOUT;
    drain(&mut fc, late);
    assert_eq!(
        fc.poll_revocation(),
        None,
        "the grace runs from the timeout"
    );
    drain(&mut fc, late + reclaim::CONFIRMATION_GRACE);
    assert_eq!(fc.poll_revocation(), Some(leases[0]));
    assert_eq!(fc.revocations_total(), (2, 1));
}

#[test]
fn capacity_is_refused_even_with_eviction_on() {
    let cfg = FlowConfig {
        max_requests: Some(nz(1)),
        enable_eviction: true,
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    let s = enq(&mut fc, -1, "s", 1, t0);
    let r = fc.handle_enqueue(&FlowRequest::new(5, "k", 1, t0), t0);
    assert_eq!(r.unwrap_err().outcome, Outcome::RejectedCapacity);
    assert!(fc.contains(s), "queued requests are never displaced");
}

#[test]
fn bands_are_created_from_templates() {
    let mut cfg = FlowConfig::default();
    cfg.default_band.max_requests = nz(7);
    cfg.default_negative_band = Some(BandConfig {
        max_requests: nz(2),
        ..BandConfig::default()
    });
    let (mut fc, t0) = ctl(cfg);
    enq(&mut fc, 4, "f", 1, t0);
    enq(&mut fc, -3, "f", 1, t0);
    let caps: Vec<(i32, u64)> = fc.bands().map(|b| (b.priority, b.max_requests)).collect();
    assert_eq!(caps, vec![(-3, 2), (0, 7), (4, 7)]);
}

#[test]
fn shutdown_evicts_everything_and_refuses_more() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    enq(&mut fc, 0, "f", 1, t0);
    enq(&mut fc, 1, "g", 1, t0);
    let mut out = Vec::new();
    fc.handle_shutdown(t0, &mut out);
    assert_eq!(out.len(), 2);
    assert!(
        out.iter()
            .all(|d| d.reason == Some(DropReason::ShuttingDown))
    );
    let r = fc.handle_enqueue(&FlowRequest::new(0, "f", 1, t0), t0);
    assert_eq!(r.unwrap_err().outcome, Outcome::RejectedOther);
}

#[test]
fn outcome_labels_match_llm_d() {
    let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(
        labels,
        [
            "Dispatched",
            "RejectedCapacity",
            "RejectedNoEndpoints",
            "RejectedOther",
            "EvictedTTL",
            "EvictedNoEndpoints",
            "EvictedContextCancelled",
            "EvictedOther"
        ]
    );
    assert_eq!(Outcome::Dispatched.default_reason(), None);
}

/// An operation in a random schedule.
#[derive(Debug, Clone)]
enum Op {
    Enqueue { priority: i32, flow: u8, bytes: u64 },
    Cancel(usize),
    Poll { saturation_low: bool },
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (-2i32..3, 0u8..4, 1u64..50).prop_map(|(priority, flow, bytes)| Op::Enqueue { priority, flow, bytes }),
        1 => (0usize..64).prop_map(Op::Cancel),
        2 => any::<bool>().prop_map(|saturation_low| Op::Poll { saturation_low }),
        1 => (0u64..30_000).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every ticket ends exactly once; dispatch follows strict priority between bands and
    /// arrival order within a flow; counters match the queue; nothing dispatches when
    /// saturated; once saturation drops everything left is dispatched.
    #[test]
    fn schedule_invariants(ops in proptest::collection::vec(op(), 1..120), fair_rr in any::<bool>()) {
        let mut cfg = FlowConfig {
            max_requests: Some(nz(40)),
            max_bytes: Some(nz(900)),
            default_request_ttl: Some(secs(20)),
            ..FlowConfig::default()
        };
        cfg.default_band.max_requests = nz(15);
        if fair_rr {
            cfg.default_band.fairness = FairnessPolicy::RoundRobin;
        }
        let t0 = Instant::now();
        let mut now = t0;
        let mut fc = FlowController::new(cfg, t0).unwrap();
        // ticket -> (priority, flow, bytes, arrival index, ended)
        let mut issued: Vec<(Ticket, i32, u8, u64, bool)> = Vec::new();
        let ended = |issued: &mut Vec<(Ticket, i32, u8, u64, bool)>, d: &Decision| {
            let e = issued.iter_mut().find(|e| e.0 == d.ticket).expect("known ticket");
            assert!(!e.4, "ticket {:?} ended twice", d.ticket);
            e.4 = true;
            (e.1, e.2)
        };
        for op in ops {
            match op {
                Op::Enqueue { priority, flow, bytes } => {
                    let id = format!("flow-{flow}");
                    if let Ok(t) = fc.handle_enqueue(&FlowRequest::new(priority, &id, bytes, now), now) {
                        issued.push((t, priority, flow, bytes, false));
                    }
                }
                Op::Cancel(i) => {
                    if let Some(&(t, ..)) = issued.get(i)
                        && let Some(d) = fc.handle_cancel(t, now)
                    {
                        prop_assert_eq!(d.outcome, Outcome::EvictedContextCancelled);
                        ended(&mut issued, &d);
                    }
                }
                Op::Advance(ms) => now += Duration::from_millis(ms),
                Op::Poll { saturation_low } => {
                    fc.handle_pool(PoolStatus::serving(if saturation_low { 0.2 } else { 1.3 }), now);
                    while let Some(d) = fc.poll_decision(now) {
                        if d.is_dispatched() {
                            prop_assert!(saturation_low, "dispatched while saturated");
                            // Strict priority: nothing queued in a higher band.
                            let higher = fc.bands().any(|b| b.priority > d.priority && b.len > 0);
                            prop_assert!(!higher, "a higher band was waiting");
                        } else {
                            prop_assert_eq!(d.outcome, Outcome::EvictedTtl);
                            prop_assert!(d.waited >= secs(20));
                        }
                        let (p, flow) = ended(&mut issued, &d);
                        if d.is_dispatched() {
                            // FCFS within the flow: no earlier request of the same flow and band is still queued.
                            let pos = issued.iter().position(|e| e.0 == d.ticket).unwrap();
                            let earlier = issued[..pos].iter().any(|e| e.1 == p && e.2 == flow && !e.4);
                            prop_assert!(!earlier, "overtook an earlier request of its flow");
                        }
                    }
                }
            }
            let live: Vec<_> = issued.iter().filter(|e| !e.4).collect();
            prop_assert_eq!(fc.len(), live.len() as u64);
            prop_assert_eq!(fc.bytes(), live.iter().map(|e| e.3).sum::<u64>());
            prop_assert!(fc.len() <= 40 && fc.bytes() <= 900);
            for b in fc.bands() {
                prop_assert!(b.len <= 15);
            }
            if let Some(d) = fc.next_deadline() {
                prop_assert!(!live.is_empty());
                prop_assert!(d <= now + secs(20) || d >= t0);
            }
        }
        // Saturation drops: everything still queued is dispatched.
        let mut out = Vec::new();
        fc.dispatch(now, PoolStatus::serving(0.0), usize::MAX, &mut out);
        for d in &out {
            prop_assert!(d.is_dispatched() || (d.outcome == Outcome::EvictedTtl && d.waited >= secs(20)));
            ended(&mut issued, d);
        }
        prop_assert!(issued.iter().all(|e| e.4), "a ticket never ended");
        prop_assert!(fc.is_empty());
        prop_assert_eq!(fc.next_deadline(), None);
        let total: u64 = Outcome::ALL
            .iter()
            .filter(|o| !matches!(o, Outcome::RejectedCapacity | Outcome::RejectedNoEndpoints | Outcome::RejectedOther))
            .map(|o| fc.outcome_total(*o))
            .sum();
        prop_assert_eq!(total, issued.len() as u64);
    }

    /// Round-robin: while two flows both have requests queued, neither gets two dispatches
    /// in a row.
    #[test]
    fn round_robin_is_fair(counts in proptest::collection::vec(1usize..8, 2..5)) {
        let mut cfg = FlowConfig::default();
        cfg.priority_bands.insert(0, BandConfig { fairness: FairnessPolicy::RoundRobin, ..BandConfig::default() });
        let t0 = Instant::now();
        let mut fc = FlowController::new(cfg, t0).unwrap();
        let mut owner = std::collections::HashMap::new();
        let mut left = counts.clone();
        for (f, n) in counts.iter().enumerate() {
            for _ in 0..*n {
                owner.insert(enq(&mut fc, 0, &format!("f{f}"), 1, t0), f);
            }
        }
        fc.handle_pool(PoolStatus::serving(0.0), t0);
        let mut last: Option<usize> = None;
        while let Some(d) = fc.poll_decision(t0) {
            let f = owner[&d.ticket];
            let others_waiting = left.iter().enumerate().any(|(g, n)| g != f && *n > 0);
            if others_waiting {
                prop_assert_ne!(Some(f), last);
            }
            left[f] -= 1;
            last = Some(f);
        }
        prop_assert!(left.iter().all(|n| *n == 0));
    }
}

const BANDS: [i32; 3] = [10, 0, -1];

fn holdback(domain: HoldbackDomain, min_ceiling: f64) -> FlowConfig {
    let mut cfg = FlowConfig {
        usage_limit: UsageLimitPolicy::PriorityHoldback {
            domain,
            min_ceiling,
            max_ceiling: 1.0,
            lift_under_share: None,
        },
        ..FlowConfig::default()
    };
    for p in BANDS {
        cfg.priority_bands.insert(p, BandConfig::default());
    }
    cfg
}

#[test]
fn holdback_ceilings_by_rank_and_by_value() {
    let rank = holdback(HoldbackDomain::Rank, 0.4).usage_limit;
    let got: Vec<f64> = (0..3).map(|i| rank.ceiling(i, &BANDS, 0.0)).collect();
    assert!(
        got.iter()
            .zip([1.0, 0.7, 0.4])
            .all(|(g, w)| (g - w).abs() < 1e-12),
        "{got:?}"
    );
    // Value: priority 0 sits 1/11 of the way from -1 to 10, so it is held back almost as
    // early as -1.
    let value = holdback(HoldbackDomain::Value, 0.4).usage_limit;
    let c0 = value.ceiling(1, &BANDS, 0.0);
    assert!((c0 - (0.4 + 0.6 / 11.0)).abs() < 1e-12, "{c0}");
    assert_eq!(value.ceiling(2, &BANDS, 0.0), 0.4);
    // One band: the highest ceiling.
    assert_eq!(rank.ceiling(0, &[0], 0.9), 1.0);
    assert_eq!(value.ceiling(0, &[0], 0.9), 1.0);
}

#[test]
fn holdback_keeps_headroom_for_higher_bands() {
    let (mut fc, t0) = ctl(holdback(HoldbackDomain::Rank, 0.5));
    let shed = enq(&mut fc, -1, "s", 1, t0);
    let std0 = enq(&mut fc, 0, "a", 1, t0);
    // Saturation 0.6: above sheddable's 0.5, below standard's 0.75.
    fc.handle_pool(PoolStatus::serving(0.6), t0);
    assert_eq!(dispatched(&drain(&mut fc, t0)), vec![std0]);
    assert!(fc.contains(shed), "sheddable held back at 0.6");
    // At 0.8 standard is held back too, but critical still goes.
    let std1 = enq(&mut fc, 0, "a", 1, t0);
    let crit = enq(&mut fc, 10, "c", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.8), t0);
    assert_eq!(dispatched(&drain(&mut fc, t0)), vec![crit]);
    // Below every ceiling both go, highest first.
    fc.handle_pool(PoolStatus::serving(0.4), t0);
    assert_eq!(dispatched(&drain(&mut fc, t0)), vec![std1, shed]);
    let ceilings: Vec<(i32, f64)> = fc.bands().map(|b| (b.priority, b.ceiling)).collect();
    assert_eq!(ceilings, vec![(-1, 0.5), (0, 0.75), (10, 1.0)]);
}

#[test]
fn a_gated_band_stops_lower_bands() {
    // Static 0.8: a queued band-0 request gated at 0.9 keeps a sheddable one waiting too.
    let cfg = FlowConfig {
        usage_limit: UsageLimitPolicy::Static { threshold: 0.8 },
        ..FlowConfig::default()
    };
    let (mut fc, t0) = ctl(cfg);
    enq(&mut fc, 0, "a", 1, t0);
    enq(&mut fc, -1, "s", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.9), t0);
    assert!(drain(&mut fc, t0).is_empty());
}

#[test]
fn soft_reflective_alternates_past_the_ceiling() {
    let policy = UsageLimitPolicy::SoftReflective;
    // N = 3 at saturation 0.6: ceilings 1.0, 0.7, 0.4.
    let c: Vec<f64> = (0..3).map(|i| policy.ceiling(i, &BANDS, 0.6)).collect();
    assert!(
        (c[1] - 0.7).abs() < 1e-12 && (c[2] - 0.4).abs() < 1e-12,
        "{c:?}"
    );
    assert!((0..4).all(|t| policy.allows(0, &BANDS, 0.6, t)));
    assert!((0..4).all(|t| policy.allows(1, &BANDS, 0.6, t)));
    // Past its ceiling (0.3 at saturation 0.7): period round(0.7/0.3) = 2, open on every
    // other call.
    let open: Vec<bool> = (0..4).map(|t| policy.allows(2, &BANDS, 0.7, t)).collect();
    assert_eq!(open, vec![true, false, true, false]);
    // Saturation 0.9: period 9.
    let opens = (0..90)
        .filter(|t| policy.allows(2, &BANDS, 0.9, *t))
        .count();
    assert_eq!(opens, 10);
    // At saturation 1 every band halts, band 0 included; NaN fails closed.
    assert!((0..3).all(|i| !policy.allows(i, &BANDS, 1.0, 0)));
    assert!(!policy.allows(0, &BANDS, f64::NAN, 0));
    // One band: always open below 1.
    assert!(policy.allows(0, &[0], 0.99, 1));

    // Driven through the controller: the sheddable band drains at every other dispatch
    // call while saturation stays at 0.7.
    let mut cfg = holdback(HoldbackDomain::Rank, 0.5);
    cfg.usage_limit = policy;
    let (mut fc, t0) = ctl(cfg);
    for _ in 0..4 {
        enq(&mut fc, -1, "s", 1, t0);
    }
    fc.handle_pool(PoolStatus::serving(0.7), t0);
    let per_call: Vec<bool> = (0..4).map(|_| fc.poll_dispatch(t0).is_some()).collect();
    assert_eq!(per_call, vec![true, false, true, false]);
}

#[test]
fn bad_holdback_ceilings_are_refused() {
    for (min, max) in [(1.0, 1.0), (-0.1, 1.0), (0.5, 0.0), (0.5, 1.1), (0.8, 0.6)] {
        let mut cfg = holdback(HoldbackDomain::Rank, min);
        if let UsageLimitPolicy::PriorityHoldback { max_ceiling, .. } = &mut cfg.usage_limit {
            *max_ceiling = max;
        }
        let err = FlowController::new(cfg, Instant::now()).unwrap_err();
        assert!(
            matches!(err, InvalidFlowConfig::HoldbackCeilings { .. }),
            "{min} {max}: {err}"
        );
    }
}

/// Rank holdback with ceilings 1.0, 0.75, 0.5 over bands 10, 0, -1, every band
/// program-aware; `share` lifts under-served flows (`None`: plain priority-holdback).
fn fair_share(share: Option<f64>) -> FlowConfig {
    let mut cfg = holdback(HoldbackDomain::Rank, 0.5);
    if let UsageLimitPolicy::PriorityHoldback {
        lift_under_share, ..
    } = &mut cfg.usage_limit
    {
        *lift_under_share = share;
    }
    for band in cfg.priority_bands.values_mut() {
        band.fairness = FairnessPolicy::ProgramAware(LasParams::default());
    }
    cfg
}

/// Serves one request of `program` in band `p` with `tokens` input tokens at saturation 0.
fn serve_in(fc: &mut FlowController, p: i32, program: &str, tokens: u64, at: Instant) {
    let t = enq(fc, p, program, 1, at);
    fc.handle_pool(PoolStatus::serving(0.0), at);
    assert_eq!(fc.poll_decision(at).map(|d| d.ticket), Some(t));
    fc.handle_served(t, tokens, 0, at);
}

#[test]
fn fair_share_holdback_lifts_only_the_under_served_flow() {
    for share in [None, Some(0.5)] {
        let (mut fc, t0) = ctl(fair_share(share));
        serve_in(&mut fc, 0, "heavy", 10_000, t0);
        serve_in(&mut fc, 0, "light", 1_000, t0);
        let heavy = enq(&mut fc, 0, "heavy", 1, t0);
        let light = enq(&mut fc, 0, "light", 1, t0);
        // 0.8: past band 0's 0.75, below band 10's 1.0. Light's service is 1,000 against a
        // mean of 5,500: under half, so it is lifted; heavy is not.
        fc.handle_pool(PoolStatus::serving(0.8), t0);
        let got = dispatched(&drain(&mut fc, t0));
        match share {
            None => assert!(got.is_empty(), "priority-holdback lifts nobody: {got:?}"),
            Some(_) => assert_eq!(got, vec![light]),
        }
        assert_eq!(fc.lifted_dispatches(), u64::from(share.is_some()));
        assert!(fc.contains(heavy), "heavy stays held back at 0.8");
        // Past the next higher band's ceiling nothing is lifted.
        let light2 = enq(&mut fc, 0, "light", 1, t0);
        fc.handle_pool(PoolStatus::serving(1.0), t0);
        assert!(dispatched(&drain(&mut fc, t0)).is_empty());
        // Below band 0's ceiling both go, the lighter first.
        fc.handle_pool(PoolStatus::serving(0.7), t0);
        let got = dispatched(&drain(&mut fc, t0));
        let want = match share {
            None => vec![light, light2, heavy],
            Some(_) => vec![light2, heavy],
        };
        assert_eq!(got, want);
        assert_eq!(
            fc.lifted_dispatches(),
            u64::from(share.is_some()),
            "below the band's own ceiling nothing counts as lifted"
        );
    }
}

#[test]
fn fair_share_holdback_keeps_equal_flows_and_strict_priority() {
    let (mut fc, t0) = ctl(fair_share(Some(0.5)));
    serve_in(&mut fc, -1, "s-heavy", 10_000, t0);
    // Equal service: nobody is under half the mean, so nobody is lifted.
    serve_in(&mut fc, 0, "a", 1_000, t0);
    serve_in(&mut fc, 0, "b", 1_000, t0);
    let a = enq(&mut fc, 0, "a", 1, t0);
    enq(&mut fc, 0, "b", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.8), t0);
    assert!(dispatched(&drain(&mut fc, t0)).is_empty());
    // A flow alone in its band is its own mean: never lifted.
    let (mut solo, t0) = ctl(fair_share(Some(0.5)));
    enq(&mut solo, 0, "a", 1, t0);
    solo.handle_pool(PoolStatus::serving(0.8), t0);
    assert!(dispatched(&drain(&mut solo, t0)).is_empty());
    // The sheddable band's lift is band 0's ceiling (0.75): at 0.8 a new (never served)
    // sheddable flow stays queued while band 0 is held back.
    let s_new = enq(&mut fc, -1, "s-new", 1, t0);
    enq(&mut fc, -1, "s-heavy", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.8), t0);
    assert!(dispatched(&drain(&mut fc, t0)).is_empty());
    // At 0.6 band 0 goes first (strict priority), then the lifted sheddable flow.
    fc.handle_pool(PoolStatus::serving(0.6), t0);
    let got = dispatched(&drain(&mut fc, t0));
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0], a);
    assert_eq!(got[2], s_new);
}

#[test]
fn fair_share_holdback_is_refused_without_program_aware_bands_or_with_a_bad_share() {
    let mut cfg = fair_share(Some(0.5));
    for band in cfg.priority_bands.values_mut() {
        band.fairness = FairnessPolicy::GlobalStrict;
    }
    let err = FlowController::new(cfg, Instant::now()).unwrap_err();
    assert!(
        matches!(err, InvalidFlowConfig::LiftWithoutProgramAware),
        "{err}"
    );
    for share in [0.0, 1.5, f64::NAN] {
        let err = FlowController::new(fair_share(Some(share)), Instant::now()).unwrap_err();
        assert!(matches!(err, InvalidFlowConfig::UnderShare { .. }), "{err}");
        assert!(err.to_string().contains("underShare"), "{err}");
    }
}

// ---- Reconfiguration at runtime ----

fn slo_req(flow: &str, slo_ms: u64, now: Instant) -> FlowRequest<'_> {
    let mut r = FlowRequest::new(0, flow, 1, now);
    r.slo_ttft = Some(Duration::from_millis(slo_ms));
    r
}

#[test]
fn reconfigure_keeps_every_queued_request_and_its_ticket() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let a = enq(&mut fc, 5, "f", 10, t0);
    let b = enq(&mut fc, 0, "g", 20, t0);
    let c = enq(&mut fc, -3, "f", 30, t0);
    let cfg = FlowConfig {
        max_requests: Some(nz(100)),
        default_request_ttl: Some(secs(120)),
        ..FlowConfig::default()
    };
    fc.handle_reconfigure(cfg.clone()).unwrap();
    assert_eq!((fc.len(), fc.bytes()), (3, 60));
    assert!(fc.contains(a) && fc.contains(b) && fc.contains(c));
    assert_eq!(fc.config().default_request_ttl, Some(secs(120)));
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(1));
    let ds = drain(&mut fc, t0 + secs(1));
    assert_eq!(
        dispatched(&ds),
        vec![a, b, c],
        "strict priority still holds"
    );
    assert!(ds.iter().all(|d| d.waited == secs(1)));
    assert!(fc.is_empty());
}

#[test]
fn a_band_no_longer_listed_takes_the_template_a_new_request_would_get() {
    let mut cfg = FlowConfig::default();
    cfg.priority_bands.insert(
        5,
        BandConfig {
            max_requests: nz(2),
            ..BandConfig::default()
        },
    );
    let (mut fc, t0) = ctl(cfg);
    // Global-strict: arrival order across flows.
    let a1 = enq(&mut fc, 5, "a", 1, t0);
    let a2 = enq(&mut fc, 5, "a", 1, t0);
    assert!(
        fc.handle_enqueue(&FlowRequest::new(5, "b", 1, t0), t0)
            .is_err(),
        "band 5 holds 2"
    );
    let mut cfg = FlowConfig::default();
    cfg.default_band.fairness = FairnessPolicy::RoundRobin;
    cfg.default_band.max_requests = nz(10);
    fc.handle_reconfigure(cfg).unwrap();
    let band5 = fc
        .bands()
        .find(|b| b.priority == 5)
        .expect("kept: it has requests");
    assert_eq!((band5.len, band5.max_requests), (2, 10));
    let b1 = enq(&mut fc, 5, "b", 1, t0 + secs(1));
    // Round-robin now alternates flows: a, b, a.
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(2));
    assert_eq!(dispatched(&drain(&mut fc, t0 + secs(2))), vec![a1, b1, a2]);
}

#[test]
fn empty_on_the_fly_bands_are_forgotten_and_made_again_from_the_new_template() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    enq(&mut fc, 7, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    assert_eq!(drain(&mut fc, t0).len(), 1);
    let mut cfg = FlowConfig::default();
    cfg.default_band.max_requests = nz(3);
    fc.handle_reconfigure(cfg).unwrap();
    assert_eq!(
        fc.bands().map(|b| b.priority).collect::<Vec<_>>(),
        vec![0],
        "only band 0 is always provisioned"
    );
    enq(&mut fc, 7, "f", 1, t0);
    let band7 = fc.bands().find(|b| b.priority == 7).unwrap();
    assert_eq!(band7.max_requests, 3);
}

#[test]
fn smaller_caps_refuse_new_requests_but_evict_nothing() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let ts: Vec<Ticket> = (0..4).map(|_| enq(&mut fc, 0, "f", 100, t0)).collect();
    let mut cfg = FlowConfig {
        max_bytes: Some(nz(250)),
        ..FlowConfig::default()
    };
    cfg.default_band.max_requests = nz(2);
    fc.handle_reconfigure(cfg).unwrap();
    assert_eq!(fc.len(), 4);
    assert!(ts.iter().all(|t| fc.contains(*t)));
    assert_eq!(fc.global_utilization().1, Some(400.0 / 250.0));
    let refused = fc
        .handle_enqueue(&FlowRequest::new(0, "g", 1, t0), t0)
        .unwrap_err();
    assert_eq!(refused.outcome, Outcome::RejectedCapacity);
    // Draining below both caps lets new requests in again.
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    let first_three: Vec<_> = (0..3)
        .map(|_| fc.poll_decision(t0).unwrap().ticket)
        .collect();
    assert_eq!(first_three, ts[..3].to_vec(), "FCFS order kept");
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    assert!(
        fc.handle_enqueue(&FlowRequest::new(0, "g", 100, t0), t0)
            .is_ok()
    );
    assert_eq!(fc.len(), 2);
}

#[test]
fn a_new_ttl_counts_from_the_original_enqueue_time() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let a = enq(&mut fc, 0, "f", 1, t0);
    let b = enq(&mut fc, 0, "f", 1, t0 + secs(15));
    fc.handle_pool(PoolStatus::serving(1.0), t0);
    assert_eq!(fc.next_deadline(), Some(t0 + secs(60)));
    fc.handle_reconfigure(FlowConfig {
        default_request_ttl: Some(secs(30)),
        no_endpoint_request_ttl: Some(secs(30)),
        ..FlowConfig::default()
    })
    .unwrap();
    assert_eq!(fc.next_deadline(), Some(t0 + secs(30)));
    let ds = drain(&mut fc, t0 + secs(30));
    assert_eq!(ds.len(), 1);
    assert_eq!((ds[0].ticket, ds[0].outcome), (a, Outcome::EvictedTtl));
    assert_eq!(ds[0].waited, secs(30));
    assert_eq!(fc.next_deadline(), Some(t0 + secs(45)));
    // A longer TTL also counts from arrival, and "0s" (None) stops expiry.
    fc.handle_reconfigure(FlowConfig {
        default_request_ttl: None,
        ..FlowConfig::default()
    })
    .unwrap();
    assert_eq!(fc.next_deadline(), None);
    assert!(drain(&mut fc, t0 + secs(500)).is_empty());
    assert!(fc.contains(b));
}

#[test]
fn a_new_ordering_policy_rekeys_queued_requests() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    // FCFS: arrival order, whatever the SLOs say.
    let loose = fc.handle_enqueue(&slo_req("f", 900, t0), t0).unwrap();
    let tight = fc.handle_enqueue(&slo_req("f", 100, t0), t0).unwrap();
    let none = enq(&mut fc, 0, "f", 1, t0);
    let mid = fc.handle_enqueue(&slo_req("f", 500, t0), t0).unwrap();
    let mut cfg = FlowConfig::default();
    cfg.default_band.ordering = OrderingPolicy::SloDeadline;
    fc.handle_reconfigure(cfg).unwrap();
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    assert_eq!(
        dispatched(&drain(&mut fc, t0)),
        vec![tight, mid, loose, none],
        "earliest SLO deadline first; no header last"
    );
}

#[test]
fn a_refused_reconfiguration_changes_nothing() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let a = enq(&mut fc, 0, "f", 1, t0);
    let before = fc.config().clone();
    let err = fc
        .handle_reconfigure(FlowConfig {
            usage_limit: UsageLimitPolicy::Static {
                threshold: f64::NAN,
            },
            default_request_ttl: Some(secs(1)),
            ..FlowConfig::default()
        })
        .unwrap_err();
    assert!(matches!(err, InvalidFlowConfig::Threshold { .. }));
    assert_eq!(fc.config(), &before);
    assert!(fc.contains(a));
    assert_eq!(fc.next_deadline(), Some(t0 + secs(60)));
}

#[test]
fn a_new_usage_limit_decides_the_next_poll() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let a = enq(&mut fc, 0, "f", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.7), t0);
    fc.handle_reconfigure(FlowConfig {
        usage_limit: UsageLimitPolicy::Static { threshold: 0.5 },
        ..FlowConfig::default()
    })
    .unwrap();
    assert_eq!(
        fc.poll_decision(t0),
        None,
        "0.7 is past the new 0.5 ceiling"
    );
    fc.handle_reconfigure(FlowConfig::default()).unwrap();
    assert_eq!(fc.poll_decision(t0).map(|d| d.ticket), Some(a));
}

#[test]
fn release_all_dispatches_everything_at_once_whatever_the_saturation() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    let low = enq(&mut fc, -1, "f", 1, t0);
    let mid1 = enq(&mut fc, 0, "f", 1, t0);
    let high = enq(&mut fc, 3, "g", 1, t0);
    let mid2 = enq(&mut fc, 0, "g", 1, t0 + secs(1));
    fc.handle_pool(PoolStatus::serving(5.0), t0);
    assert!(drain(&mut fc, t0 + secs(2)).is_empty(), "saturated");
    let mut out = Vec::new();
    fc.handle_release_all(t0 + secs(2), &mut out);
    assert!(out.iter().all(Decision::is_dispatched));
    assert_eq!(dispatched(&out), vec![high, mid1, mid2, low]);
    assert_eq!(out[2].waited, secs(1));
    assert!(fc.is_empty());
    assert_eq!(fc.next_deadline(), None);
    assert_eq!(fc.outcome_total(Outcome::Dispatched), 4);
    // Still usable afterwards.
    let again = enq(&mut fc, 0, "f", 1, t0 + secs(3));
    assert!(fc.contains(again));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    /// Reconfiguring between two configurations at random points never loses, duplicates or
    /// reorders (within a flow, FCFS) a queued request, keeps the counters true, and leaves
    /// a controller that dispatches everything once the pool has room.
    #[test]
    fn reconfiguration_keeps_every_ticket(
        ops in proptest::collection::vec(op(), 1..100),
        flips in proptest::collection::vec(any::<bool>(), 100),
    ) {
        let small = {
            let mut c = FlowConfig {
                max_requests: Some(nz(6)),
                default_request_ttl: Some(secs(20)),
                ..FlowConfig::default()
            };
            c.default_band.max_requests = nz(3);
            c.default_band.fairness = FairnessPolicy::RoundRobin;
            c
        };
        let large = {
            let mut c = FlowConfig {
                default_request_ttl: Some(secs(40)),
                ..FlowConfig::default()
            };
            c.priority_bands.insert(1, BandConfig { max_requests: nz(30), ..BandConfig::default() });
            c
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut fc = FlowController::new(large.clone(), t0).unwrap();
        let mut issued: Vec<(Ticket, i32, u8, bool)> = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            if flips[i % flips.len()] {
                let cfg = if fc.config().max_requests.is_some() { large.clone() } else { small.clone() };
                fc.handle_reconfigure(cfg).unwrap();
            }
            let mut decisions = Vec::new();
            match op {
                Op::Enqueue { priority, flow, bytes } => {
                    let id = format!("flow-{flow}");
                    if let Ok(t) = fc.handle_enqueue(&FlowRequest::new(priority, &id, bytes, now), now) {
                        issued.push((t, priority, flow, false));
                    }
                }
                Op::Cancel(i) => {
                    if let Some(&(t, ..)) = issued.get(i) {
                        decisions.extend(fc.handle_cancel(t, now));
                    }
                }
                Op::Advance(ms) => now += Duration::from_millis(ms),
                Op::Poll { saturation_low } => {
                    fc.handle_pool(PoolStatus::serving(if saturation_low { 0.2 } else { 1.3 }), now);
                    decisions.extend(std::iter::from_fn(|| fc.poll_decision(now)));
                }
            }
            for d in decisions {
                let pos = issued.iter().position(|e| e.0 == d.ticket).expect("known ticket");
                prop_assert!(!issued[pos].3, "ended twice");
                if d.is_dispatched() {
                    let (p, f) = (issued[pos].1, issued[pos].2);
                    let earlier = issued[..pos].iter().any(|e| e.1 == p && e.2 == f && !e.3);
                    prop_assert!(!earlier, "overtook an earlier request of its flow");
                }
                issued[pos].3 = true;
            }
            let live = issued.iter().filter(|e| !e.3).count() as u64;
            prop_assert_eq!(fc.len(), live);
            prop_assert_eq!(fc.bands().map(|b| b.len).sum::<u64>(), live);
        }
        let mut out = Vec::new();
        fc.handle_release_all(now, &mut out);
        for d in &out {
            let e = issued.iter_mut().find(|e| e.0 == d.ticket).expect("known ticket");
            prop_assert!(!e.3);
            e.3 = true;
        }
        prop_assert!(issued.iter().all(|e| e.3), "a ticket never ended");
        prop_assert!(fc.is_empty());
    }
}

// ---- program-aware-fairness (least attained service) ----

fn las(params: LasParams) -> FlowConfig {
    let mut cfg = FlowConfig::default();
    cfg.default_band.fairness = FairnessPolicy::ProgramAware(params);
    cfg
}

/// Dispatches one request of `program` at `at` and reports it finished with `input` and
/// `output` tokens: its program gains that much attained service.
fn serve(fc: &mut FlowController, program: &str, input: u64, output: u64, at: Instant) {
    let t = enq(fc, 0, program, 1, at);
    fc.handle_pool(PoolStatus::serving(0.0), at);
    let d = fc.poll_decision(at).expect("dispatched");
    assert_eq!(d.ticket, t);
    assert!(fc.wants_usage(t));
    fc.handle_served(t, input, output, at);
    assert!(!fc.wants_usage(t));
}

#[test]
fn the_program_with_less_attained_service_goes_first() {
    let (mut fc, t0) = ctl(las(LasParams::default()));
    serve(&mut fc, "heavy", 1000, 500, t0);
    serve(&mut fc, "light", 10, 5, t0);
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    // heavy arrives first and has waited longest, yet light is served first.
    let h1 = enq(&mut fc, 0, "heavy", 1, t0 + secs(1));
    let h2 = enq(&mut fc, 0, "heavy", 1, t0 + secs(1));
    let l1 = enq(&mut fc, 0, "light", 1, t0 + secs(2));
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(3));
    assert_eq!(dispatched(&drain(&mut fc, t0 + secs(3))), vec![l1, h1, h2]);
}

#[test]
fn head_wait_breaks_the_tie_between_equal_service() {
    let (mut fc, t0) = ctl(las(LasParams::default()));
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    let b = enq(&mut fc, 0, "b", 1, t0 + secs(2));
    let a = enq(&mut fc, 0, "a", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(3));
    assert_eq!(dispatched(&drain(&mut fc, t0 + secs(3))), vec![a, b]);
    // With no weight on service, a long wait beats a small service.
    let params = LasParams {
        weight_service: 0.0,
        weight_head_wait: 1.0,
        ..LasParams::default()
    };
    let (mut fc, t0) = ctl(las(params));
    serve(&mut fc, "heavy", 5000, 0, t0);
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    let heavy = enq(&mut fc, 0, "heavy", 1, t0);
    let fresh = enq(&mut fc, 0, "fresh", 1, t0 + secs(1));
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(2));
    assert_eq!(
        dispatched(&drain(&mut fc, t0 + secs(2))),
        vec![heavy, fresh]
    );
}

#[test]
fn output_tokens_weigh_twice_input_tokens() {
    let (mut fc, t0) = ctl(las(LasParams {
        half_life: None,
        ..LasParams::default()
    }));
    serve(&mut fc, "in", 100, 0, t0);
    serve(&mut fc, "out", 0, 50, t0);
    serve(&mut fc, "both", 30, 20, t0);
    assert_eq!(fc.attained_service("in", t0 + secs(100)), Some(100.0));
    assert_eq!(fc.attained_service("out", t0 + secs(100)), Some(100.0));
    assert_eq!(fc.attained_service("both", t0), Some(70.0));
    assert_eq!(fc.attained_service("nobody", t0), None);
}

#[test]
fn attained_service_halves_every_half_life() {
    let (mut fc, t0) = ctl(las(LasParams::default()));
    serve(&mut fc, "p", 1000, 0, t0);
    let at = |s| fc.attained_service("p", t0 + secs(s)).unwrap();
    assert!((at(60) - 500.0).abs() < 1e-9, "{}", at(60));
    assert!((at(120) - 250.0).abs() < 1e-9, "{}", at(120));
    assert!((at(30) - 1000.0 / 2f64.sqrt()).abs() < 1e-9);
    // New service adds to the decayed amount.
    serve(&mut fc, "p", 100, 0, t0 + secs(60));
    let now = fc.attained_service("p", t0 + secs(60)).unwrap();
    assert!((now - 600.0).abs() < 1e-9, "{now}");
    let later = fc.attained_service("p", t0 + secs(120)).unwrap();
    assert!((later - 300.0).abs() < 1e-9, "{later}");
    // So a heavy program that went idle ends up competing again: after ten half-lives
    // its 1000 tokens weigh less than a steady program's recent 10.
    let (mut fc, t0) = ctl(las(LasParams::default()));
    serve(&mut fc, "was-heavy", 1000, 0, t0);
    serve(&mut fc, "steady", 10, 0, t0 + secs(600));
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    let steady = enq(&mut fc, 0, "steady", 1, t0 + secs(600));
    let back = enq(&mut fc, 0, "was-heavy", 1, t0 + secs(600));
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(600));
    assert_eq!(
        dispatched(&drain(&mut fc, t0 + secs(600))),
        vec![back, steady]
    );
}

#[test]
fn idle_programs_are_forgotten_after_the_ttl_but_not_while_in_flight() {
    let params = LasParams {
        eviction_ttl: Some(secs(100)),
        eviction_sweep: secs(10),
        ..LasParams::default()
    };
    let (mut fc, t0) = ctl(las(params));
    serve(&mut fc, "done", 10, 10, t0);
    let running = enq(&mut fc, 0, "running", 1, t0);
    assert!(fc.poll_decision(t0).unwrap().is_dispatched());
    assert_eq!(fc.programs_tracked(), 2);
    // Within the TTL: kept.
    assert!(fc.poll_decision(t0 + secs(100)).is_none());
    assert_eq!(fc.programs_tracked(), 2);
    // Past it: the idle one goes at the next sweep; the one in flight stays.
    assert!(fc.poll_decision(t0 + secs(111)).is_none());
    assert_eq!(fc.programs_tracked(), 1);
    assert_eq!(fc.attained_service("done", t0 + secs(111)), None);
    fc.handle_served(running, 5, 5, t0 + secs(120));
    assert!(fc.attained_service("running", t0 + secs(120)).is_some());
    assert!(fc.poll_decision(t0 + secs(215)).is_none());
    assert_eq!(fc.programs_tracked(), 1, "completed 95 s ago: kept");
    assert!(fc.poll_decision(t0 + secs(231)).is_none());
    assert_eq!(fc.programs_tracked(), 0);
    // No TTL: never forgotten.
    let (mut fc, t0) = ctl(las(LasParams {
        eviction_ttl: None,
        ..LasParams::default()
    }));
    serve(&mut fc, "p", 1, 1, t0);
    assert!(fc.poll_decision(t0 + secs(1_000_000)).is_none());
    assert_eq!(fc.programs_tracked(), 1);
}

#[test]
fn jains_index_over_mean_queue_waits() {
    let (mut fc, t0) = ctl(FlowConfig::default());
    assert_eq!(fc.program_fairness_index(), None, "no band uses the policy");
    let (mut fc2, _) = ctl(las(LasParams::default()));
    std::mem::swap(&mut fc, &mut fc2);
    assert_eq!(fc.program_fairness_index(), Some(1.0), "nobody waited yet");
    fc.handle_pool(PoolStatus::serving(1.5), t0);
    enq(&mut fc, 0, "a", 1, t0 + secs(2));
    enq(&mut fc, 0, "b", 1, t0);
    fc.handle_pool(PoolStatus::serving(0.0), t0 + secs(3));
    // Waits: a 1 s, b 3 s: (1 + 3)² / (2 × (1 + 9)) = 0.8.
    assert_eq!(drain(&mut fc, t0 + secs(3)).len(), 2);
    let j = fc.program_fairness_index().unwrap();
    assert!((j - 0.8).abs() < 1e-12, "{j}");
}

#[test]
fn only_program_aware_dispatches_await_usage_and_reconfiguration_keeps_or_drops_the_table() {
    let mut cfg = las(LasParams::default());
    cfg.priority_bands.insert(
        5,
        BandConfig {
            fairness: FairnessPolicy::RoundRobin,
            ..BandConfig::default()
        },
    );
    let (mut fc, t0) = ctl(cfg.clone());
    fc.handle_pool(PoolStatus::serving(0.0), t0);
    let rr = enq(&mut fc, 5, "p", 1, t0);
    assert_eq!(fc.poll_decision(t0).unwrap().ticket, rr);
    assert!(!fc.wants_usage(rr));
    serve(&mut fc, "p", 10, 0, t0);
    // A reconfiguration that keeps a program-aware band keeps what programs attained.
    fc.handle_reconfigure(cfg).unwrap();
    assert_eq!(fc.attained_service("p", t0), Some(10.0));
    // One without it forgets them.
    fc.handle_reconfigure(FlowConfig::default()).unwrap();
    assert_eq!(fc.programs_tracked(), 0);
    assert_eq!(fc.program_fairness_index(), None);
}

#[test]
fn bad_program_aware_params_are_refused() {
    for (params, field) in [
        (
            LasParams {
                weight_service: -0.1,
                ..LasParams::default()
            },
            "lasWeightService",
        ),
        (
            LasParams {
                weight_head_wait: f64::NAN,
                ..LasParams::default()
            },
            "lasWeightHeadWait",
        ),
        (
            LasParams {
                eviction_sweep: Duration::ZERO,
                ..LasParams::default()
            },
            "evictionSweepSeconds",
        ),
    ] {
        let err = FlowController::new(las(params), Instant::now()).unwrap_err();
        assert!(
            matches!(err, InvalidFlowConfig::ProgramAware { field: f, .. } if f == field),
            "{err}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// With heads that waited equally long, programs are served in ascending order of
    /// attained service (equal service: arrival order), whatever the amounts and the
    /// weights (as long as service has some weight).
    #[test]
    fn less_attained_service_is_served_first(
        tokens in proptest::collection::vec((0u64..5000, 0u64..5000), 2..6),
        weight_service in 0.05f64..1.0,
        elapsed in 0u64..600,
    ) {
        let params = LasParams { weight_service, weight_head_wait: 1.0 - weight_service, ..LasParams::default() };
        let (mut fc, t0) = ctl(las(params));
        for (i, (input, output)) in tokens.iter().enumerate() {
            serve(&mut fc, &format!("p{i}"), *input, *output, t0);
        }
        let at = t0 + secs(elapsed);
        fc.handle_pool(PoolStatus::serving(1.5), at);
        let tickets: Vec<Ticket> = (0..tokens.len()).map(|i| enq(&mut fc, 0, &format!("p{i}"), 1, at)).collect();
        fc.handle_pool(PoolStatus::serving(0.0), at);
        let order: Vec<usize> = dispatched(&drain(&mut fc, at))
            .iter()
            .map(|t| tickets.iter().position(|x| x == t).unwrap())
            .collect();
        let cost = |i: usize| tokens[i].0 + 2 * tokens[i].1;
        let mut want: Vec<usize> = (0..tokens.len()).collect();
        want.sort_by_key(|&i| (cost(i), i));
        prop_assert_eq!(order, want);
    }
}
