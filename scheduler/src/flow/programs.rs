//! `program-aware-fairness` (llm-d's LAS, least attained service): a band using it serves
//! next the flow (program = fairness id) that has received the least service lately.
//!
//! Each program's attained service is the weighted tokens of its finished requests
//! (input × 1 + output × 2: output tokens cost more to generate), decayed continuously
//! with a half-life so a program that went idle competes on near-equal terms when it
//! returns. A pick scores every flow with queued requests:
//!
//! ```text
//! score = lasWeightService × (1 − norm(service)) + lasWeightHeadWait × norm(head wait)
//! norm(x) = (x − min) / (max − min) over the band's flows, 0.5 when max = min
//! ```
//!
//! and serves the head of the highest-scoring flow (ties: the oldest arrival). The head
//! wait breaks the tie between programs with equal service (a cold start). Programs whose
//! last completion is older than the eviction TTL and that have nothing in flight are
//! forgotten on a periodic sweep, so state stays bounded by the programs seen lately.
//! Jain's fairness index over the programs' mean queue waits measures the result.
//!
//! State is per controller: every band using the policy shares one table (as llm-d shares
//! one plugin instance), and decay and eviction follow the first such band's parameters.

use std::time::Duration;

use hashbrown::HashMap;

use super::band::OrderKey;
use super::config::LasParams;

/// Weight of one input (prompt) token in attained service.
pub const INPUT_TOKEN_WEIGHT: f64 = 1.0;
/// Weight of one output (completion) token in attained service (llm-d: twice an input one).
pub const OUTPUT_TOKEN_WEIGHT: f64 = 2.0;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One program's accounting.
#[derive(Debug, Clone)]
struct Program {
    /// Attained service in weighted tokens, decayed up to `anchor_ns`.
    service: f64,
    anchor_ns: u64,
    /// Dispatched from a program-aware band and not yet reported finished.
    in_flight: u64,
    /// Dispatches whose queue wait is in `wait_sum_ms`.
    waits: u64,
    wait_sum_ms: f64,
    /// The last completion, or when the program was first seen (so a program that never
    /// completes still becomes evictable).
    last_completion_ns: u64,
}

impl Program {
    fn new(now_ns: u64) -> Self {
        Program {
            service: 0.0,
            anchor_ns: now_ns,
            in_flight: 0,
            waits: 0,
            wait_sum_ms: 0.0,
            last_completion_ns: now_ns,
        }
    }

    /// Folds the decay since the anchor into `service` (continuous, in flight or not).
    fn decay_to(&mut self, now_ns: u64, half_life: Option<Duration>) {
        let elapsed = now_ns.saturating_sub(self.anchor_ns);
        if elapsed == 0 {
            return;
        }
        if let Some(h) = half_life {
            self.service *= (-(elapsed as f64) / h.as_nanos() as f64).exp2();
        }
        self.anchor_ns = now_ns;
    }

    /// The service at `now_ns` without folding it in.
    fn service_at(&self, now_ns: u64, half_life: Option<Duration>) -> f64 {
        let elapsed = now_ns.saturating_sub(self.anchor_ns);
        match half_life {
            Some(h) if elapsed > 0 => {
                self.service * (-(elapsed as f64) / h.as_nanos() as f64).exp2()
            }
            _ => self.service,
        }
    }
}

/// A flow with queued requests, as a program-aware pick sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head<'a> {
    /// The flow's fairness id.
    pub(super) program: &'a str,
    /// Its head request's key.
    pub(super) key: OrderKey,
    /// When its head request was enqueued (ns on the controller's clock).
    pub(super) enqueued_ns: u64,
}

/// The per-program table of every program-aware band of one controller.
#[derive(Debug, Default)]
pub(super) struct Programs {
    /// Decay and eviction parameters (`None`: no band uses the policy; the table is empty).
    params: Option<LasParams>,
    table: HashMap<Box<str>, Program>,
    /// Requests dispatched from a program-aware band, by ticket sequence, awaiting their
    /// usage report.
    dispatched: HashMap<u64, Box<str>>,
    next_sweep_ns: u64,
    /// Scratch space for one pick: (service, head wait ms, key).
    scratch: Vec<(f64, f64, OrderKey)>,
}

impl Programs {
    /// Puts `params` in force; `None` forgets every program.
    pub(super) fn set_params(&mut self, params: Option<LasParams>) {
        if params.is_none() {
            self.table.clear();
            self.dispatched.clear();
        }
        self.params = params;
    }

    /// Whether some band uses the policy.
    pub(super) fn active(&self) -> bool {
        self.params.is_some()
    }

    fn half_life(&self) -> Option<Duration> {
        self.params.and_then(|p| p.half_life)
    }

    /// The head to serve next among `heads` (one per flow with queued requests), scored
    /// with the band's weights `w`; with `under_share`, only a flow whose service is below
    /// that share of the mean over `heads` may be served (none may when all are equal).
    pub(super) fn pick<'a>(
        &mut self,
        w: &LasParams,
        now_ns: u64,
        heads: impl Iterator<Item = Head<'a>>,
        under_share: Option<f64>,
    ) -> Option<OrderKey> {
        let half_life = self.half_life();
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        for h in heads {
            let program = self
                .table
                .entry_ref(h.program)
                .or_insert_with(|| Program::new(now_ns));
            program.decay_to(now_ns, half_life);
            let wait_ms = now_ns.saturating_sub(h.enqueued_ns) as f64 / 1e6;
            scratch.push((program.service, wait_ms, h.key));
        }
        let range = |f: fn(&(f64, f64, OrderKey)) -> f64| {
            scratch
                .iter()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                    (lo.min(x), hi.max(x))
                })
        };
        let (s_lo, s_hi) = range(|e| e.0);
        let (w_lo, w_hi) = range(|e| e.1);
        let norm = |x: f64, lo: f64, hi: f64| if hi > lo { (x - lo) / (hi - lo) } else { 0.5 };
        let below = match under_share {
            Some(share) if !scratch.is_empty() => {
                let mean = scratch.iter().map(|e| e.0).sum::<f64>() / scratch.len() as f64;
                share * mean
            }
            _ => f64::INFINITY,
        };
        let mut best: Option<(f64, OrderKey)> = None;
        for &(service, wait, key) in scratch.iter().filter(|e| e.0 < below) {
            let score = w.weight_service * (1.0 - norm(service, s_lo, s_hi))
                + w.weight_head_wait * norm(wait, w_lo, w_hi);
            let better = match best {
                None => true,
                Some((b, bkey)) => score > b || (score == b && key.1 < bkey.1),
            };
            if better {
                best = Some((score, key));
            }
        }
        self.scratch = scratch;
        best.map(|(_, key)| key)
    }

    /// A request of `program` (ticket sequence `seq`) left a program-aware band after
    /// waiting `waited`.
    pub(super) fn on_dispatch(&mut self, seq: u64, program: &str, waited: Duration, now_ns: u64) {
        let p = self
            .table
            .entry_ref(program)
            .or_insert_with(|| Program::new(now_ns));
        p.in_flight += 1;
        p.waits += 1;
        p.wait_sum_ms += waited.as_secs_f64() * 1e3;
        self.dispatched.insert(seq, program.into());
    }

    /// The request dispatched as `seq` finished having used these tokens; returns whether
    /// it was one of this table's.
    pub(super) fn on_served(&mut self, seq: u64, input: u64, output: u64, now_ns: u64) -> bool {
        let Some(id) = self.dispatched.remove(&seq) else {
            return false;
        };
        let half_life = self.half_life();
        // An entry evicted meanwhile (idle past the TTL before this report) starts again.
        let p = self.table.entry(id).or_insert_with(|| Program::new(now_ns));
        p.decay_to(now_ns, half_life);
        p.service += INPUT_TOKEN_WEIGHT * input as f64 + OUTPUT_TOKEN_WEIGHT * output as f64;
        p.in_flight = p.in_flight.saturating_sub(1);
        p.last_completion_ns = p.last_completion_ns.max(now_ns);
        true
    }

    /// Runs the eviction sweep when one is due at `now_ns`: programs with nothing in
    /// flight whose last completion is older than the TTL are forgotten.
    pub(super) fn poll_sweep(&mut self, now_ns: u64) {
        let Some(p) = self.params else { return };
        if now_ns < self.next_sweep_ns {
            return;
        }
        self.next_sweep_ns = now_ns.saturating_add(nanos(p.eviction_sweep));
        let Some(ttl) = p.eviction_ttl else { return };
        let ttl = nanos(ttl);
        self.table.retain(|_, prog| {
            prog.in_flight > 0 || now_ns.saturating_sub(prog.last_completion_ns) <= ttl
        });
    }

    /// Whether the request dispatched as `seq` awaits its usage report.
    pub(super) fn awaits(&self, seq: u64) -> bool {
        self.dispatched.contains_key(&seq)
    }

    /// Programs tracked.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// A program's attained service at `now_ns`, in weighted tokens.
    pub(super) fn service(&self, program: &str, now_ns: u64) -> Option<f64> {
        let half_life = self.half_life();
        self.table
            .get(program)
            .map(|p| p.service_at(now_ns, half_life))
    }

    /// Jain's fairness index over the programs' mean queue waits (programs that never
    /// waited are left out); 1.0 with fewer than two such programs or all waits zero.
    pub(super) fn jains_index(&self) -> f64 {
        let (mut sum, mut sum_sq, mut n) = (0.0, 0.0, 0.0);
        for p in self.table.values().filter(|p| p.waits > 0) {
            let x = p.wait_sum_ms / p.waits as f64;
            sum += x;
            sum_sq += x * x;
            n += 1.0;
        }
        if n <= 1.0 || sum_sq == 0.0 {
            1.0
        } else {
            sum * sum / (n * sum_sq)
        }
    }
}
