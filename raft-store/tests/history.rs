//! Randomized history test: concurrent clients write and read through different nodes
//! while a nemesis kills, restarts and isolates nodes and drops messages. Afterwards the
//! recorded history is checked: no acknowledged write is lost, nothing unwritten appears,
//! and reads through the leader are linearizable (register per key).
//!
//! The seed is printed first (shown when the test fails); rerun one with
//! `RAFT_HISTORY_SEED=<seed> cargo test -p infermesh-raft-store --test history`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use infermesh_raft_store::policy::{Kind, ObjectKey, PolicyState};
use infermesh_raft_store::testing::TestCluster;
use infermesh_raft_store::{NodeId, PolicyStore, ReadError, Route, StoreConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NODES: [NodeId; 3] = [1, 2, 3];
const KEYS: usize = 4;
const CLIENTS: u64 = 3;
/// Extra clients that write back to back, so concurrent writes share log entries (the
/// leader batches them) and two of them may touch the same key in one entry.
const BURST_CLIENTS: u64 = 3;
/// Upper bound on ops per client; clients also stop when the nemesis is done.
const OPS_PER_CLIENT: u32 = 300;
const NEMESIS_STEPS: u32 = 8;
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(15);

type Directory = Arc<Mutex<BTreeMap<NodeId, PolicyStore>>>;

#[derive(Debug, Clone)]
enum Outcome {
    /// Acknowledged with this resource version: the write's place in the total order of
    /// writes (revisions rise with the log, and within a batched entry in batch order).
    /// The second number is the log index of the entry that carried it.
    WriteOk(u64, u64),
    /// Lost answer: may or may not have been applied.
    WriteUnknown,
    /// Read value and the object's resource version (0 = absent).
    Read(Option<i32>, u64),
    ReadFailed,
}

#[derive(Debug, Clone)]
struct Event {
    client: u64,
    key: usize,
    /// Written value (unique per write), or None for reads.
    value: Option<i32>,
    invoke: Instant,
    complete: Instant,
    outcome: Outcome,
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

fn objective_yaml(name: &str, priority: i32) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {name}}}\nspec:\n  priority: {priority}\n  poolRef: {{name: pool}}\n"
    )
}

fn read_key(state: &PolicyState, k: usize) -> (Option<i32>, u64) {
    let key = ObjectKey::new(Kind::InferenceObjective, "default", key_name(k));
    match state.get(&key) {
        Some(o) => (
            state
                .objective("default", &key_name(k))
                .map(|d| d.spec.effective_priority()),
            o.resource_version,
        ),
        None => (None, 0),
    }
}

fn pick(dir: &Directory, rng: &mut ChaCha8Rng) -> Option<PolicyStore> {
    let d = dir.lock().unwrap();
    if d.is_empty() {
        return None;
    }
    let i = rng.random_range(0..d.len());
    d.values().nth(i).cloned()
}

async fn client(id: u64, seed: u64, dir: Directory, stop: Arc<AtomicBool>) -> Vec<Event> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (id << 32));
    let mut events = Vec::new();
    for seq in 0..OPS_PER_CLIENT {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let burst = id >= CLIENTS;
        if !burst {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
        }
        let key = rng.random_range(0..KEYS);
        let Some(store) = pick(&dir, &mut rng) else {
            continue;
        };
        let invoke = Instant::now();
        if burst || rng.random_bool(0.5) {
            let value = (id * 100_000 + u64::from(seq) + 1) as i32;
            let doc = objective_yaml(&key_name(key), value);
            let fut = store.apply_yaml(&doc, Route::ViaLeader);
            let outcome = match tokio::time::timeout(OP_TIMEOUT, fut).await {
                // Each write carries a unique value, so it is never "unchanged".
                Ok(Ok(a)) => match a.changes.first().and_then(|c| c.resource_version) {
                    Some(version) => Outcome::WriteOk(version, a.index),
                    None => Outcome::WriteUnknown,
                },
                Ok(Err(_)) | Err(_) => Outcome::WriteUnknown,
            };
            events.push(Event {
                client: id,
                key,
                value: Some(value),
                invoke,
                complete: Instant::now(),
                outcome,
            });
        } else {
            let mut target = store;
            let mut outcome = Outcome::ReadFailed;
            for _ in 0..2 {
                match tokio::time::timeout(OP_TIMEOUT, target.read_linearizable()).await {
                    Ok(Ok(state)) => {
                        let (v, ver) = read_key(&state, key);
                        outcome = Outcome::Read(v, ver);
                        break;
                    }
                    Ok(Err(ReadError::NotLeader {
                        leader: Some(l), ..
                    })) => match dir.lock().unwrap().get(&l).cloned() {
                        Some(s) => target = s,
                        None => break,
                    },
                    _ => break,
                }
            }
            events.push(Event {
                client: id,
                key,
                value: None,
                invoke,
                complete: Instant::now(),
                outcome,
            });
        }
    }
    events
}

async fn nemesis(c: &mut TestCluster, dir: &Directory, seed: u64) -> Result<Vec<String>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31));
    let mut down: Vec<NodeId> = Vec::new();
    let mut log = Vec::new();
    c.net.set_drop_rate(0.01);
    for _ in 0..NEMESIS_STEPS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        match rng.random_range(0..4) {
            // Kill one node (never two: a majority stays up so progress is possible).
            0 | 1 if down.is_empty() => {
                let victim = NODES[rng.random_range(0..NODES.len())];
                dir.lock().unwrap().remove(&victim);
                c.kill(victim).await;
                down.push(victim);
                log.push(format!("kill {victim}"));
            }
            0 | 1 => {
                let back = down.remove(0);
                let s = c.start(back).await?;
                dir.lock().unwrap().insert(back, s);
                log.push(format!("restart {back}"));
            }
            2 => {
                let cut = NODES[rng.random_range(0..NODES.len())];
                c.net.isolate(cut);
                log.push(format!("isolate {cut}"));
            }
            _ => {
                c.net.heal();
                log.push("heal".into());
            }
        }
    }
    c.net.heal();
    c.net.set_drop_rate(0.0);
    for back in down {
        let s = c.start(back).await?;
        dir.lock().unwrap().insert(back, s);
        log.push(format!("restart {back}"));
    }
    Ok(log)
}

/// Checks the history against the final state. Writes are totally ordered by resource
/// version (Raft's log order, refined by batch order inside an entry); each value is
/// written once, so a read's value names the write it observed.
fn check(events: &[Event], final_state: &PolicyState) -> Result<()> {
    let writes: BTreeMap<i32, &Event> = events
        .iter()
        .filter_map(|e| e.value.map(|v| (v, e)))
        .collect();
    let acked = |k: usize| {
        events.iter().filter_map(move |e| match e.outcome {
            Outcome::WriteOk(i, _) if e.key == k => Some((e, i)),
            _ => None,
        })
    };
    // Acknowledged writes respect real-time order.
    let all_acked: Vec<(&Event, u64)> = (0..KEYS).flat_map(acked).collect();
    for (a, ia) in &all_acked {
        for (b, ib) in &all_acked {
            if a.complete < b.invoke {
                ensure!(
                    ia < ib,
                    "write {:?} acked at {ia} before write {:?} began, yet got index {ib}",
                    a.value,
                    b.value
                );
            }
        }
    }
    let observe =
        |k: usize, value: Option<i32>, version: u64, before: Instant, what: &str| -> Result<()> {
            match value {
                None => ensure!(version == 0, "{what}: key {k} absent but version {version}"),
                Some(v) => {
                    let Some(w) = writes.get(&v) else {
                        bail!("{what}: key {k} has value {v} nobody wrote")
                    };
                    ensure!(
                        w.key == k,
                        "{what}: value {v} was written to key {}, seen on key {k}",
                        w.key
                    );
                    ensure!(
                        w.invoke < before,
                        "{what}: value {v} seen before its write began"
                    );
                    if let Outcome::WriteOk(i, _) = w.outcome {
                        ensure!(
                            i == version,
                            "{what}: value {v} acked at {i} but seen at version {version}"
                        );
                    }
                }
            }
            Ok(())
        };
    for r in events {
        let Outcome::Read(value, version) = r.outcome else {
            continue;
        };
        let what = format!("read by client {} of key {}", r.client, r.key);
        observe(r.key, value, version, r.complete, &what)?;
        // Not stale: every write acknowledged before the read began is at or below it.
        for (w, i) in acked(r.key) {
            if w.complete < r.invoke {
                ensure!(
                    i <= version,
                    "{what} saw version {version} after write {:?} was acked at {i}",
                    w.value
                );
            }
        }
        // Reads never go back in real time.
        for r2 in events.iter().filter(|e| e.key == r.key) {
            if let Outcome::Read(_, v2) = r2.outcome
                && r.complete < r2.invoke
            {
                ensure!(
                    version <= v2,
                    "{what} saw {version}, a later read saw older {v2}"
                );
            }
        }
    }
    // Nothing acknowledged is lost.
    for k in 0..KEYS {
        let (value, version) = read_key(final_state, k);
        // The final state is read after every op completed.
        let after_all = events
            .iter()
            .map(|e| e.complete)
            .max()
            .unwrap_or_else(Instant::now)
            + Duration::from_millis(1);
        observe(
            k,
            value,
            version,
            after_all,
            &format!("final state of key {k}"),
        )?;
        if let Some((w, i)) = acked(k).max_by_key(|(_, i)| *i) {
            ensure!(
                version >= i,
                "key {k}: acked write {:?} at {i} lost; final version {version}",
                w.value
            );
        }
    }
    Ok(())
}

async fn run(seed: u64) -> Result<()> {
    let dir_path = tempfile::tempdir()?;
    // Small snapshot thresholds so restarted or isolated nodes also catch up by snapshot.
    let mut c = TestCluster::new(dir_path.path(), seed).with_config(|c| StoreConfig {
        snapshot_after_entries: 20,
        keep_entries_after_snapshot: 5,
        ..c
    });
    c.start_bootstrapped(&NODES, &[]).await?;
    c.wait_leader(&NODES, WAIT).await?;
    let dir: Directory = Arc::new(Mutex::new(
        NODES
            .iter()
            .map(|id| (*id, c.store(*id).unwrap()))
            .collect(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS + BURST_CLIENTS)
        .map(|id| tokio::spawn(client(id, seed, dir.clone(), stop.clone())))
        .collect();
    let faults = nemesis(&mut c, &dir, seed).await;
    stop.store(true, Ordering::Relaxed);
    let faults = faults?;
    let mut events = Vec::new();
    for h in clients {
        events.extend(h.await?);
    }
    let acked = events
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::WriteOk(..)))
        .count();
    let mut per_entry: BTreeMap<u64, usize> = BTreeMap::new();
    for e in &events {
        if let Outcome::WriteOk(_, index) = e.outcome {
            *per_entry.entry(index).or_default() += 1;
        }
    }
    let batched: usize = per_entry.values().filter(|n| **n > 1).sum();
    let reads = events
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Read(..)))
        .count();
    eprintln!(
        "faults: {faults:?}; {} ops, {acked} acked writes ({batched} shared a log entry), \
         {reads} reads",
        events.len()
    );
    ensure!(
        acked > 0 && reads > 0,
        "history too thin to check (acked {acked}, reads {reads})"
    );

    let leader = c.wait_leader(&NODES, WAIT).await?;
    let final_state = c.store(leader)?.read_linearizable().await?;
    for id in NODES {
        c.wait_applied(id, final_state.applied_index(), WAIT)
            .await?;
        let p = c.store(id)?.policy();
        for k in 0..KEYS {
            ensure!(
                read_key(&p, k) == read_key(&final_state, k),
                "node {id} disagrees with the leader on key {k}"
            );
        }
    }
    check(&events, &final_state)?;
    let snapshots: Vec<(NodeId, Option<u64>)> = NODES
        .iter()
        .map(|id| Ok((*id, c.store(*id)?.status().snapshot_index)))
        .collect::<Result<_>>()?;
    eprintln!("snapshot index per node: {snapshots:?}");

    // And all of it is still there after every node restarts from disk.
    c.kill_all().await;
    for id in NODES {
        c.start(id).await?;
    }
    let leader = c.wait_leader(&NODES, WAIT).await?;
    let reread = c.store(leader)?.read_linearizable().await?;
    for k in 0..KEYS {
        ensure!(
            read_key(&reread, k) == read_key(&final_state, k),
            "key {k} changed across a full restart"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_history_is_linearizable_and_loses_no_acknowledged_write() -> Result<()> {
    let seeds: Vec<u64> = match std::env::var("RAFT_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => vec![0x5eed_2026, 7, 1234],
    };
    for seed in seeds {
        eprintln!("RAFT_HISTORY_SEED={seed}");
        let started = Instant::now();
        let r = run(seed).await;
        eprintln!("history run took {:?}", started.elapsed());
        r.map_err(|e| e.context(format!("RAFT_HISTORY_SEED={seed}")))?;
    }
    Ok(())
}

#[test]
fn the_checker_catches_a_lost_write_and_a_stale_read() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let w = |value: i32, i: u64, a: u64, b: u64| Event {
        client: 0,
        key: 0,
        value: Some(value),
        invoke: at(a),
        complete: at(b),
        outcome: Outcome::WriteOk(i, i),
    };
    let r = |value: Option<i32>, ver: u64, a: u64, b: u64| Event {
        client: 1,
        key: 0,
        value: None,
        invoke: at(a),
        complete: at(b),
        outcome: Outcome::Read(value, ver),
    };
    let state_with = |value: i32, version: u64| {
        let objects = infermesh_raft_store::parse_documents(
            &objective_yaml("k0", value),
            &infermesh_raft_store::policy::accept_any_epp_config(),
        )
        .unwrap();
        PolicyState::from_parts(
            version,
            objects
                .into_iter()
                .map(|o| infermesh_raft_store::policy::StoredObject {
                    resource_version: version,
                    created_index: version,
                    object: o,
                }),
            [],
        )
    };
    // A consistent history passes.
    let good = vec![w(1, 5, 0, 10), r(Some(1), 5, 20, 30), w(2, 7, 40, 50)];
    check(&good, &state_with(2, 7)).expect("consistent history");
    // The final state lost the last acknowledged write.
    assert!(check(&good, &state_with(1, 5)).is_err());
    // A read that began after write 2 was acked but still saw write 1 is stale.
    let stale = vec![w(1, 5, 0, 10), w(2, 7, 20, 30), r(Some(1), 5, 40, 50)];
    assert!(check(&stale, &state_with(2, 7)).is_err());
    // A value nobody wrote.
    let phantom = vec![w(1, 5, 0, 10), r(Some(9), 6, 20, 30)];
    assert!(check(&phantom, &state_with(1, 5)).is_err());
}
