//! Concurrent policy writes through any node while faults happen, and the check that no
//! acknowledged write was lost: writers put InferenceObjectives with unique priorities on a
//! few keys through random nodes' admin APIs; afterwards every node's state is read and
//! checked against the history (acknowledged writes in real-time order get increasing
//! versions; every value seen was written; no key is older than its last acknowledged
//! write; all nodes agree).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use infermesh_node::admin::client::{AdminClient, ClientError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Keys (objective names) the writers share.
pub const KEYS: usize = 4;

/// How one write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Acknowledged at this resource version.
    Acked(u64),
    /// No answer, or an answer that does not say (timeout, 503): may or may not apply.
    Unknown,
}

/// One write.
#[derive(Debug, Clone)]
pub struct Write {
    /// Key index.
    pub key: usize,
    /// The unique value written (the objective's priority).
    pub value: i32,
    /// When it was sent.
    pub invoke: Instant,
    /// When its answer came.
    pub complete: Instant,
    /// How it ended.
    pub outcome: WriteOutcome,
}

/// Objective name of key `k`.
pub fn key_name(k: usize) -> String {
    format!("chaos-k{k}")
}

fn objective(k: usize, value: i32) -> Vec<u8> {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {}}}\nspec: {{priority: {value}, poolRef: {{name: chaos}}}}\n",
        key_name(k)
    )
    .into_bytes()
}

/// One writer: sequential writes through random nodes until `stop` or `limit` writes.
pub async fn writer(
    id: u32,
    seed: u64,
    nodes: Vec<AdminClient>,
    limit: u32,
    stop: Arc<AtomicBool>,
) -> Vec<Write> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(id) << 40));
    let mut out = Vec::new();
    for seq in 0..limit {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = rng.random_range(0..KEYS);
        // Unique across writers: id in the high bits (priorities are i32).
        let value = (id as i32) * 100_000 + seq as i32 + 1;
        let node = &nodes[rng.random_range(0..nodes.len())];
        let invoke = Instant::now();
        let res = node
            .call(
                http::Method::POST,
                "/v1/policy",
                Some(objective(key, value)),
            )
            .await;
        let outcome = match res {
            Ok(v) => match v["changes"][0]["resourceVersion"]
                .as_str()
                .and_then(|s| s.parse().ok())
            {
                Some(rv) => WriteOutcome::Acked(rv),
                None => WriteOutcome::Unknown,
            },
            Err(ClientError::Api { status, .. }) if status.is_client_error() => {
                // A refusal names a bug in the writer, not a fault: keep it visible.
                WriteOutcome::Unknown
            }
            Err(_) => WriteOutcome::Unknown,
        };
        let failed = outcome == WriteOutcome::Unknown;
        out.push(Write {
            key,
            value,
            invoke,
            complete: Instant::now(),
            outcome,
        });
        if failed {
            // Do not spin on a dead node.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

/// One key as a node holds it: the value and its resource version (`None`: absent).
pub type KeyState = Option<(i32, u64)>;

/// Reads every key from a node (stale reads allowed: this runs after convergence).
pub async fn read_keys(node: &AdminClient) -> Result<Vec<KeyState>, ClientError> {
    let mut v = Vec::with_capacity(KEYS);
    for k in 0..KEYS {
        let path = format!("/v1/policy/InferenceObjective/{}", key_name(k));
        match node.call(http::Method::GET, &path, None).await {
            Ok(doc) => {
                let value = doc["spec"]["priority"].as_i64().unwrap_or(i64::MIN) as i32;
                let rv = doc["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                v.push(Some((value, rv)));
            }
            Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => v.push(None),
            Err(e) => return Err(e),
        }
    }
    Ok(v)
}

/// What the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Writes sent.
    pub sent: usize,
    /// Acknowledged.
    pub acked: usize,
    /// Acknowledged and then missing from the final state.
    pub lost: usize,
}

/// Checks a write history against the final state of every node.
pub fn check(writes: &[Write], finals: &[Vec<KeyState>]) -> Result<WriteSummary> {
    let by_value: BTreeMap<i32, &Write> = writes.iter().map(|w| (w.value, w)).collect();
    ensure!(
        by_value.len() == writes.len(),
        "write values are not unique"
    );
    let acked: Vec<(&Write, u64)> = writes
        .iter()
        .filter_map(|w| match w.outcome {
            WriteOutcome::Acked(rv) => Some((w, rv)),
            WriteOutcome::Unknown => None,
        })
        .collect();
    for (a, ra) in &acked {
        for (b, rb) in &acked {
            if a.complete < b.invoke && ra >= rb {
                bail!(
                    "write {} acked at version {ra} before write {} began, which got version {rb}",
                    a.value,
                    b.value
                );
            }
        }
    }
    let mut lost = 0;
    if let Some(first) = finals.first() {
        for (i, f) in finals.iter().enumerate() {
            ensure!(
                f == first,
                "node {i} holds {f:?}, node 0 holds {first:?}: the nodes did not converge"
            );
        }
        for (k, state) in first.iter().enumerate() {
            let last_acked = acked
                .iter()
                .filter(|(w, _)| w.key == k)
                .max_by_key(|(_, rv)| *rv);
            match (state, last_acked) {
                (None, Some(_)) => lost += 1,
                (None, None) => {}
                (Some((value, rv)), last) => {
                    let Some(w) = by_value.get(value) else {
                        bail!("key {k} holds value {value}, which nobody wrote");
                    };
                    ensure!(
                        w.key == k,
                        "value {value} was written to key {}, found on key {k}",
                        w.key
                    );
                    if let WriteOutcome::Acked(a) = w.outcome {
                        ensure!(
                            a == *rv,
                            "value {value} acked at {a} but held at version {rv}"
                        );
                    }
                    if let Some((_, lrv)) = last
                        && rv < lrv
                    {
                        lost += 1;
                    }
                }
            }
        }
    }
    Ok(WriteSummary {
        sent: writes.len(),
        acked: acked.len(),
        lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(key: usize, value: i32, at: u64, dur: u64, outcome: WriteOutcome) -> Write {
        let t0 = Instant::now();
        Write {
            key,
            value,
            invoke: t0 + Duration::from_millis(at),
            complete: t0 + Duration::from_millis(at + dur),
            outcome,
        }
    }

    #[test]
    fn the_check_finds_lost_and_invented_writes() {
        let h = vec![
            w(0, 1, 0, 5, WriteOutcome::Acked(10)),
            w(0, 2, 10, 5, WriteOutcome::Acked(11)),
            w(1, 3, 10, 5, WriteOutcome::Unknown),
        ];
        let good = vec![Some((2, 11)), Some((3, 12)), None, None];
        assert_eq!(check(&h, &[good.clone(), good.clone()]).unwrap().lost, 0);
        // The last acknowledged write on key 0 is gone.
        let lost = vec![Some((1, 10)), None, None, None];
        assert_eq!(check(&h, std::slice::from_ref(&lost)).unwrap().lost, 1);
        // A value nobody wrote.
        let invented = vec![Some((9, 11)), None, None, None];
        assert!(check(&h, &[invented]).is_err());
        // Nodes that disagree.
        assert!(check(&h, &[good, lost]).is_err());
        // Versions against real time.
        let bad_order = vec![
            w(0, 1, 0, 5, WriteOutcome::Acked(11)),
            w(0, 2, 10, 5, WriteOutcome::Acked(10)),
        ];
        assert!(check(&bad_order, &[vec![None; KEYS]]).is_err());
    }
}
