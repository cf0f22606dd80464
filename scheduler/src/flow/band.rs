//! One priority band: its flows (one queue per fairness id) and the fairness policy that
//! picks the next request across them.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::config::{BandConfig, FairnessPolicy};

/// A request's place in its queues: (ordering value, arrival sequence). The sequence is
/// unique, so keys never collide and ties fall back to arrival order.
pub(crate) type OrderKey = (u64, u64);

/// The queue of one flow (fairness id) inside a band.
#[derive(Default)]
struct FlowQueue {
    /// The fairness id (empty while the slot is free).
    id: Box<str>,
    items: BTreeSet<OrderKey>,
}

/// A priority band's queued requests and counters.
pub(crate) struct Band {
    pub(crate) cfg: BandConfig,
    pub(crate) len: u64,
    pub(crate) bytes: u64,
    /// Flow slots; a freed slot is reused by the next new flow.
    flows: Vec<FlowQueue>,
    free: Vec<u32>,
    /// Live flows by fairness id, in id order: round-robin turns go in this order.
    index: BTreeMap<Box<str>, u32>,
    /// The fairness id round-robin served last (llm-d's cursor); the next turn goes to the
    /// first live flow after it in id order, wrapping around. Kept when that flow empties,
    /// so a flow that comes back later does not lose its place in the cycle.
    cursor: String,
    /// Every queued key of the band, for global-strict fairness.
    all: BTreeSet<OrderKey>,
}

impl Band {
    pub(crate) fn new(cfg: BandConfig) -> Self {
        Band {
            cfg,
            len: 0,
            bytes: 0,
            flows: Vec::new(),
            free: Vec::new(),
            index: BTreeMap::new(),
            cursor: String::new(),
            all: BTreeSet::new(),
        }
    }

    /// Whether one more request of `bytes` fits under the band's caps.
    pub(crate) fn fits(&self, bytes: u64) -> bool {
        self.len < self.cfg.max_requests.get()
            && self.bytes.saturating_add(bytes) <= self.cfg.max_bytes.get()
    }

    /// Number of live flows (non-empty queues).
    pub(crate) fn flow_count(&self) -> usize {
        self.index.len()
    }

    /// The fairness id of flow `slot` (a slot of a queued request).
    pub(crate) fn flow_id(&self, slot: u32) -> &str {
        &self.flows[slot as usize].id
    }

    /// Queues `key` in the flow `fairness_id`; returns the flow slot.
    pub(crate) fn push(&mut self, fairness_id: &str, key: OrderKey, bytes: u64) -> u32 {
        let slot = match self.index.get(fairness_id) {
            Some(&s) => s,
            None => {
                let s = match self.free.pop() {
                    Some(s) => s,
                    None => {
                        self.flows.push(FlowQueue::default());
                        u32::try_from(self.flows.len() - 1).expect("fewer than 2^32 flows")
                    }
                };
                self.flows[s as usize].id = fairness_id.into();
                self.index.insert(fairness_id.into(), s);
                s
            }
        };
        self.flows[slot as usize].items.insert(key);
        self.all.insert(key);
        self.len += 1;
        self.bytes += bytes;
        slot
    }

    /// Removes `key` from flow `slot` (dispatch, expiry, cancel or eviction). An emptied
    /// flow is forgotten at once, so idle fairness ids cost nothing.
    pub(crate) fn remove(&mut self, slot: u32, key: OrderKey, bytes: u64) {
        let flow = &mut self.flows[slot as usize];
        flow.items.remove(&key);
        if flow.items.is_empty() {
            let id = std::mem::take(&mut flow.id);
            self.index.remove(&id);
            self.free.push(slot);
        }
        self.all.remove(&key);
        self.len -= 1;
        self.bytes -= bytes;
    }

    /// Every live flow with its head (its first key under the band's ordering).
    pub(crate) fn heads(&self) -> impl Iterator<Item = (&str, OrderKey)> + '_ {
        self.index.iter().filter_map(|(id, &slot)| {
            let head = self.flows[slot as usize].items.first()?;
            Some((&**id, *head))
        })
    }

    /// The key the fairness policy serves next (the caller then removes it). Round-robin
    /// serves the first flow after the last one served, in fairness-id order (llm-d's
    /// `round-robin-fairness-policy`: flow keys sorted, cursor at the last selected), and
    /// moves the cursor to it.
    pub(crate) fn pick(&mut self) -> Option<OrderKey> {
        match self.cfg.fairness {
            // The controller picks for program-aware bands from `heads`, as it holds the
            // program table; arrival order is what this band alone can offer.
            FairnessPolicy::GlobalStrict | FairnessPolicy::ProgramAware(_) => {
                self.all.first().copied()
            }
            FairnessPolicy::RoundRobin => {
                // Every indexed flow has requests: an emptied flow leaves the index.
                let after = (Bound::Excluded(self.cursor.as_str()), Bound::Unbounded);
                let (id, &slot) = self
                    .index
                    .range::<str, _>(after)
                    .next()
                    .or_else(|| self.index.iter().next())?;
                let key = self.flows[slot as usize].items.first().copied()?;
                self.cursor.clear();
                self.cursor.push_str(id);
                Some(key)
            }
        }
    }
}
