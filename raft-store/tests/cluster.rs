//! Multi-node policy-store tests on in-process clusters: each node has its own runtime and
//! redb file in a tempdir; the network is the in-process MemNetwork.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use infermesh_raft_store::policy::{
    Kind, ObjectKey, PolicyState, Rejection, TokenChange, TokenHash, TokenRole,
};
use infermesh_raft_store::testing::{TestCluster, mem_node};
use infermesh_raft_store::{ClusterError, Role, Route, StoreConfig, WriteError};

const WAIT: Duration = Duration::from_secs(10);

fn objective_yaml(name: &str, priority: i32) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {name}}}\nspec:\n  priority: {priority}\n  poolRef: {{name: pool}}\n"
    )
}

fn priority_of(state: &PolicyState, name: &str) -> Option<i32> {
    state
        .objective("default", name)
        .map(|o| o.spec.effective_priority())
}

/// A write acknowledged to the client survives an abrupt leader kill and a restart of every
/// node from its redb file.
async fn acknowledged_write_survives(voters: &[u64]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 7);
    c.start_bootstrapped(voters, &["t0ken".to_string()]).await?;
    let leader = c.wait_leader(voters, WAIT).await?;
    let follower = *voters.iter().find(|v| **v != leader).unwrap();

    // Write through a follower, forwarded to the leader.
    let applied = c
        .store(follower)?
        .apply_yaml(&objective_yaml("chat", 5), Route::ViaLeader)
        .await?;
    let mut last = applied.index;
    for i in 0..10 {
        last = c
            .store(leader)?
            .apply_yaml(&objective_yaml(&format!("o{i}"), i), Route::Local)
            .await?
            .index;
    }

    c.kill(leader).await;
    let rest: Vec<u64> = voters.iter().copied().filter(|v| *v != leader).collect();
    let new_leader = c.wait_leader(&rest, WAIT).await?;
    assert_ne!(new_leader, leader);
    for id in &rest {
        c.wait_applied(*id, last, WAIT).await?;
        let p = c.store(*id)?.policy();
        assert_eq!(priority_of(&p, "chat"), Some(5), "node {id}");
        assert_eq!(priority_of(&p, "o9"), Some(9), "node {id}");
        assert!(p.verify_token("t0ken"));
    }
    // The new leader takes writes.
    let after = c
        .store(new_leader)?
        .apply_yaml(&objective_yaml("after", 1), Route::Local)
        .await?;

    c.kill_all().await;
    for id in voters {
        c.start(*id).await?;
    }
    c.wait_leader(voters, WAIT).await?;
    for id in voters {
        c.wait_applied(*id, after.index, WAIT).await?;
        let p = c.store(*id)?.policy();
        assert_eq!(priority_of(&p, "chat"), Some(5), "node {id} after restart");
        assert_eq!(priority_of(&p, "after"), Some(1), "node {id} after restart");
        assert_eq!(p.objectives().count(), 12, "node {id}");
        assert!(p.verify_token("t0ken"));
        assert!(!p.verify_token("wrong"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_acknowledged_writes_through_leader_kill_and_restart() -> Result<()> {
    acknowledged_write_survives(&[1, 2, 3]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_keep_acknowledged_writes_through_leader_kill_and_restart() -> Result<()> {
    acknowledged_write_survives(&[1, 2, 3, 4, 5]).await
}

/// The minority side of a partition cannot commit; the majority can; after healing, the
/// majority's writes are everywhere and the minority's attempt is nowhere.
async fn minority_cannot_commit(voters: &[u64]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 11);
    c.start_bootstrapped(voters, &[]).await?;
    let leader = c.wait_leader(voters, WAIT).await?;
    c.store(leader)?
        .apply_yaml(&objective_yaml("base", 1), Route::Local)
        .await?;

    let minority_size = (voters.len() - 1) / 2;
    let mut minority = vec![leader];
    minority.extend(
        voters
            .iter()
            .copied()
            .filter(|v| *v != leader)
            .take(minority_size - 1),
    );
    let majority: Vec<u64> = voters
        .iter()
        .copied()
        .filter(|v| !minority.contains(v))
        .collect();
    c.net.partition(&[&minority, &majority]);

    let old = c.store(leader)?;
    let attempt = tokio::time::timeout(
        Duration::from_secs(2),
        old.apply_yaml(&objective_yaml("minority", 2), Route::Local),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "minority committed: {attempt:?}"
    );

    let new_leader = c.wait_leader(&majority, WAIT).await?;
    let ok = c
        .store(new_leader)?
        .apply_yaml(&objective_yaml("majority", 3), Route::Local)
        .await?;

    c.net.heal();
    c.wait_leader(voters, WAIT).await?;
    for id in voters {
        c.wait_applied(*id, ok.index, WAIT).await?;
        let p = c.store(*id)?.policy();
        assert_eq!(priority_of(&p, "majority"), Some(3), "node {id}");
        assert_eq!(priority_of(&p, "minority"), None, "node {id}");
        assert_eq!(priority_of(&p, "base"), Some(1), "node {id}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_minority_partition_cannot_commit() -> Result<()> {
    minority_cannot_commit(&[1, 2, 3]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_node_minority_partition_cannot_commit() -> Result<()> {
    minority_cannot_commit(&[1, 2, 3, 4, 5]).await
}

fn small_snapshots(c: StoreConfig) -> StoreConfig {
    StoreConfig {
        snapshot_after_entries: 10,
        keep_entries_after_snapshot: 0,
        ..c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_nodes_catch_up_by_snapshot_then_become_voters() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 3).with_config(small_snapshots);
    c.start_bootstrapped(&[1, 2, 3], &[]).await?;
    let leader = c.wait_leader(&[1, 2, 3], WAIT).await?;
    let store = c.store(leader)?;
    for i in 0..40 {
        store
            .apply_yaml(&objective_yaml(&format!("o{i}"), i), Route::Local)
            .await?;
    }
    let snap = store.compact().await?;
    let status = store.status();
    assert!(
        status.purged_index.is_some_and(|p| p >= snap),
        "log purged: {status:?}"
    );
    assert!(
        status.purged_index.unwrap() > 1,
        "the first entries are gone"
    );

    for id in [4, 5] {
        c.start(id).await?;
        store.add_learner(id, mem_node(id)).await?;
        let learner = c.store(id)?;
        c.wait_applied(id, snap, WAIT).await?;
        let s = learner.status();
        assert_eq!(s.role, Role::Learner);
        assert!(
            s.snapshot_index.is_some_and(|i| i >= snap),
            "learner {id} was sent a snapshot: {s:?}"
        );
        let p = learner.policy();
        assert_eq!(p.objectives().count(), 40);
        assert_eq!(priority_of(&p, "o0"), Some(0));
    }
    store.promote(BTreeSet::from([4, 5])).await?;
    let s = store.status();
    assert_eq!(s.members.iter().filter(|m| m.voter).count(), 5);
    assert!(
        s.members.iter().all(|m| m.lag.is_some()),
        "leader sees every member's lag: {s:?}"
    );

    // A 4-voter cluster is refused.
    c.start(6).await?;
    store.add_learner(6, mem_node(6)).await?;
    assert!(matches!(
        store.promote(BTreeSet::from([6])).await,
        Err(ClusterError::VoterCount { voters: 6 })
    ));
    store.remove_node(6).await?;
    assert!(store.status().members.iter().all(|m| m.id != 6));
    Ok(())
}

/// Token roles and a rotation reach every node, a learner that catches up by snapshot,
/// and survive a restart of every node from disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rotation_replicates_and_survives_snapshot_and_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 11).with_config(small_snapshots);
    c.start_bootstrapped(&[1, 2, 3], &["w0".to_string()])
        .await?;
    let leader = c.wait_leader(&[1, 2, 3], WAIT).await?;
    let follower = [1, 2, 3].into_iter().find(|v| *v != leader).unwrap();
    let change = |role, add: &[&str], remove: &[&str]| TokenChange {
        role,
        add: add.iter().map(|t| TokenHash::of(t)).collect(),
        remove: remove.iter().map(|t| TokenHash::of(t)).collect(),
    };
    // Through a follower: a read token and the replacement write token, then the old one out.
    c.store(follower)?
        .change_tokens(
            vec![
                change(TokenRole::Read, &["r1"], &[]),
                change(TokenRole::Write, &["w1"], &[]),
            ],
            Route::ViaLeader,
        )
        .await?;
    let dropped = c
        .store(follower)?
        .change_tokens(
            vec![change(TokenRole::Write, &[], &["w0"])],
            Route::ViaLeader,
        )
        .await?;
    // The last write token cannot go.
    match c
        .store(leader)?
        .change_tokens(vec![change(TokenRole::Write, &[], &["w1"])], Route::Local)
        .await
    {
        Err(WriteError::Rejected(Rejection::LastWriteToken)) => {}
        other => bail!("expected LastWriteToken, got {other:?}"),
    }
    let check = |p: &PolicyState, who: &str| {
        assert_eq!(p.token_role("w1"), Some(TokenRole::Write), "{who}");
        assert_eq!(p.token_role("r1"), Some(TokenRole::Read), "{who}");
        assert_eq!(p.token_role("w0"), None, "{who}: the rotated-out token");
    };
    for id in [1, 2, 3] {
        c.wait_applied(id, dropped.index, WAIT).await?;
        check(&c.store(id)?.policy(), &format!("node {id}"));
    }

    // Enough writes for a snapshot, the log purged, and a learner fed by the snapshot.
    let store = c.store(leader)?;
    for i in 0..20 {
        store
            .apply_yaml(&objective_yaml(&format!("o{i}"), i), Route::Local)
            .await?;
    }
    let snap = store.compact().await?;
    c.start(4).await?;
    store.add_learner(4, mem_node(4)).await?;
    c.wait_applied(4, snap, WAIT).await?;
    let s = c.store(4)?.status();
    assert!(s.snapshot_index.is_some_and(|i| i >= snap), "{s:?}");
    check(&c.store(4)?.policy(), "learner");

    c.kill_all().await;
    for id in [1, 2, 3, 4] {
        c.start(id).await?;
    }
    c.wait_leader(&[1, 2, 3], WAIT).await?;
    for id in [1, 2, 3, 4] {
        check(&c.store(id)?.policy(), &format!("node {id} after restart"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_refuse_or_forward_writes_and_leadership_hands_off() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 5);
    c.start_bootstrapped(&[1, 2, 3], &[]).await?;
    let leader = c.wait_leader(&[1, 2, 3], WAIT).await?;
    let follower = [1, 2, 3].into_iter().find(|v| *v != leader).unwrap();

    match c
        .store(follower)?
        .apply_yaml(&objective_yaml("x", 1), Route::Local)
        .await
    {
        Err(WriteError::NotLeader {
            leader: Some(l), ..
        }) => assert_eq!(l, leader),
        other => bail!("expected NotLeader, got {other:?}"),
    }
    assert!(matches!(
        c.store(follower)?.read_linearizable().await,
        Err(infermesh_raft_store::ReadError::NotLeader { .. })
    ));
    let a = c
        .store(follower)?
        .apply_yaml(&objective_yaml("x", 1), Route::ViaLeader)
        .await?;
    assert_eq!(a.changes[0].resource_version, Some(a.index));

    // Conditional writes through the API: a stale resourceVersion is a conflict.
    let stale = objective_yaml("x", 2).replace(
        "{name: x}",
        &format!("{{name: x, resourceVersion: '{}'}}", a.index - 1),
    );
    assert!(matches!(
        c.store(leader)?.apply_yaml(&stale, Route::Local).await,
        Err(WriteError::Rejected(
            infermesh_raft_store::policy::Rejection::Conflict { .. }
        ))
    ));
    let fresh = objective_yaml("x", 2).replace(
        "{name: x}",
        &format!("{{name: x, resourceVersion: '{}'}}", a.index),
    );
    c.store(leader)?.apply_yaml(&fresh, Route::Local).await?;

    // Invalid multi-doc: nothing applied.
    let before = c.store(leader)?.policy();
    let bad = format!(
        "{}---\n{}",
        objective_yaml("y", 1),
        objective_yaml("z", 1).replace("poolRef", "poolRefs")
    );
    match c.store(leader)?.apply_yaml(&bad, Route::Local).await {
        Err(WriteError::Invalid(e)) => assert_eq!(e.document, 2),
        other => bail!("expected Invalid, got {other:?}"),
    }
    assert_eq!(
        c.store(leader)?.policy().applied_index(),
        before.applied_index()
    );

    // Graceful hand-off to a chosen voter.
    let target = [1, 2, 3]
        .into_iter()
        .find(|v| *v != leader && *v != follower)
        .unwrap();
    let new_leader = c.store(leader)?.transfer_leadership(Some(target)).await?;
    assert_eq!(new_leader, target);
    c.wait_leader(&[1, 2, 3], WAIT).await?;
    let read = c.store(target)?.read_linearizable().await?;
    assert_eq!(priority_of(&read, "x"), Some(2));

    // Shutdown with hand-off moves leadership off the stopping node.
    c.store(target)?.shutdown(true).await?;
    c.kill(target).await;
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|v| *v != target).collect();
    let l = c.wait_leader(&rest, WAIT).await?;
    let s = c.store(l)?.status();
    assert_eq!(s.role, Role::Leader);
    assert!(s.committed_index >= a.index, "{s:?}");

    // Deletes, conditional on the version.
    let key = ObjectKey::new(Kind::InferenceObjective, "default", "x");
    let v = c
        .store(l)?
        .policy()
        .get(&key)
        .map(|o| o.resource_version)
        .context("x present")?;
    c.store(l)?
        .delete(vec![(key.clone(), Some(v))], Route::Local)
        .await?;
    assert!(c.store(l)?.policy().get(&key).is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_whole_applies_through_the_watch() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 9);
    c.start_bootstrapped(&[1], &[]).await?;
    c.wait_leader(&[1], WAIT).await?;
    let store = c.store(1)?;
    let mut rx = store.subscribe();
    let docs: Vec<String> = (0..5)
        .map(|i| objective_yaml(&format!("m{i}"), i))
        .collect();
    let reader = tokio::spawn(async move {
        // Every published state holds either none or all five of the batch.
        loop {
            if rx.changed().await.is_err() {
                return Ok::<_, anyhow::Error>(());
            }
            let p = rx.borrow_and_update().clone();
            let n = (0..5)
                .filter(|i| priority_of(&p, &format!("m{i}")).is_some())
                .count();
            if n != 0 && n != 5 {
                bail!("half an apply was visible: {n} of 5");
            }
            if n == 5 {
                return Ok(());
            }
        }
    });
    store.apply_yaml(&docs.join("---\n"), Route::Local).await?;
    reader.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_through_any_member_and_voters_grow_to_three_then_five() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 13);
    c.start_bootstrapped(&[1], &["tok".to_string()]).await?;
    c.wait_leader(&[1], WAIT).await?;
    c.store(1)?
        .apply_yaml(&objective_yaml("early", 4), Route::Local)
        .await?;

    let voters = |c: &TestCluster| -> Result<usize> {
        let l = c.current_leader()?;
        Ok(c.store(l)?
            .status()
            .members
            .iter()
            .filter(|m| m.voter)
            .count())
    };
    c.start(2).await?;
    c.store(2)?.join(mem_node(1), mem_node(2)).await?;
    assert_eq!(voters(&c)?, 1, "two members: the second stays a learner");
    c.start(3).await?;
    c.store(3)?.join(mem_node(1), mem_node(3)).await?;
    assert_eq!(voters(&c)?, 3);
    // Join through a follower: redirected to the leader.
    let leader = c.wait_leader(&[1, 2, 3], WAIT).await?;
    let follower = [1, 2, 3].into_iter().find(|v| *v != leader).unwrap();
    for id in [4, 5] {
        c.start(id).await?;
        c.store(id)?.join(mem_node(follower), mem_node(id)).await?;
    }
    assert_eq!(voters(&c)?, 5);
    for id in 1..=5 {
        let p = c.store(id)?.policy();
        assert_eq!(priority_of(&p, "early"), Some(4), "node {id}");
        assert!(p.verify_token("tok"), "node {id}");
    }

    // Replace a dead voter: remove it (4 voters for a moment), then a new node joins and
    // voters are rebalanced back to 5.
    let leader = c.current_leader()?;
    let dead = (1..=5).rev().find(|v| *v != leader).unwrap();
    c.kill(dead).await;
    c.store(leader)?.remove_node(dead).await?;
    assert_eq!(voters(&c)?, 4);
    c.start(6).await?;
    c.store(6)?.join(mem_node(leader), mem_node(6)).await?;
    let s = c.store(leader)?.status();
    assert_eq!(s.members.iter().filter(|m| m.voter).count(), 5, "{s:?}");
    assert!(s.members.iter().any(|m| m.id == 6 && m.voter));
    assert!(s.members.iter().all(|m| m.id != dead));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot_after_compaction() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 17).with_config(small_snapshots);
    c.start_bootstrapped(&[1, 2, 3], &[]).await?;
    let leader = c.wait_leader(&[1, 2, 3], WAIT).await?;
    let lagging = [1, 2, 3].into_iter().find(|v| *v != leader).unwrap();
    c.net.isolate(lagging);
    let store = c.store(leader)?;
    let mut last = 0;
    for i in 0..30 {
        last = store
            .apply_yaml(&objective_yaml(&format!("o{i}"), i), Route::Local)
            .await?
            .index;
    }
    let snap = store.compact().await?;
    assert!(store.status().purged_index.is_some_and(|p| p >= snap));
    let before = c.store(lagging)?.status();
    assert!(
        before.applied_index.unwrap_or(0) < snap,
        "the follower really lags: {before:?}"
    );

    c.net.heal();
    c.wait_applied(lagging, last, WAIT).await?;
    let s = c.store(lagging)?.status();
    assert!(
        s.snapshot_index.is_some_and(|i| i >= snap),
        "caught up by snapshot: {s:?}"
    );
    assert_eq!(c.store(lagging)?.policy().objectives().count(), 30);
    // And it keeps what it installed across a restart.
    c.kill(lagging).await;
    c.start(lagging).await?;
    c.wait_applied(lagging, last, WAIT).await?;
    assert_eq!(c.store(lagging)?.policy().objectives().count(), 30);
    Ok(())
}

/// Concurrent writes through every node (the leader groups them into shared log entries):
/// each gets its own answer, one conflict or miss does not reject its entry-mates, all
/// acknowledged versions are distinct, and versions keep rising across a full restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_answered_each_on_their_own() -> Result<()> {
    use infermesh_raft_store::policy::{PolicyOp, PolicyRequest, Rejection};

    const EACH: usize = 20;
    let dir = tempfile::tempdir()?;
    let mut c = TestCluster::new(dir.path(), 11);
    let voters = [1, 2, 3];
    c.start_bootstrapped(&voters, &[]).await?;
    let leader = c.wait_leader(&voters, WAIT).await?;
    let base = c
        .store(leader)?
        .apply_yaml(&objective_yaml("shared", 0), Route::Local)
        .await?;
    let base_version = base.changes[0].resource_version.context("version")?;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..EACH * 3 {
        let store = c.store(voters[i % 3])?;
        tasks.spawn(async move {
            let r = match i % 3 {
                // All race for the same version of one object: exactly one may win.
                0 => {
                    let doc = objective_yaml("shared", i as i32 + 1).replace(
                        "{name: shared}",
                        &format!("{{name: shared, resourceVersion: '{base_version}'}}"),
                    );
                    store.apply_yaml(&doc, Route::ViaLeader).await
                }
                // Independent creates: all must apply.
                1 => {
                    store
                        .apply_yaml(&objective_yaml(&format!("o{i}"), 1), Route::ViaLeader)
                        .await
                }
                // Deletes of missing objects: all must miss.
                _ => {
                    let key =
                        ObjectKey::new(Kind::InferenceObjective, "default", format!("none{i}"));
                    store.delete(vec![(key, None)], Route::ViaLeader).await
                }
            };
            (i, r)
        });
    }
    let (mut won, mut conflicts, mut created, mut missing) = (0, 0, 0, 0);
    let mut versions = BTreeSet::new();
    let mut entries = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined?;
        match (i % 3, r) {
            (0, Ok(a)) => {
                won += 1;
                assert!(versions.insert(a.changes[0].resource_version.unwrap()));
                entries.insert(a.index);
            }
            (0, Err(WriteError::Rejected(Rejection::Conflict { expected, .. }))) => {
                assert_eq!(expected, base_version);
                conflicts += 1;
            }
            (1, Ok(a)) => {
                created += 1;
                assert!(versions.insert(a.changes[0].resource_version.unwrap()));
                entries.insert(a.index);
            }
            (2, Err(WriteError::Rejected(Rejection::NotFound { .. }))) => missing += 1,
            (kind, other) => bail!("write {i} (kind {kind}): unexpected {other:?}"),
        }
    }
    assert_eq!((won, conflicts), (1, EACH - 1));
    assert_eq!((created, missing), (EACH, EACH));
    eprintln!(
        "{} applied writes in {} log entries",
        versions.len(),
        entries.len()
    );
    let newest = *versions.last().unwrap();
    let p = c.store(leader)?.policy();
    assert!(
        versions.iter().all(|v| *v > base_version),
        "versions rise after the base write"
    );
    assert_eq!(p.revision(), newest);

    // A client may not smuggle a batch in.
    let smuggled = PolicyRequest {
        ops: vec![PolicyOp::Batch(vec![])],
    };
    assert!(matches!(
        c.store(leader)?.submit(smuggled, Route::ViaLeader).await,
        Err(WriteError::Rejected(Rejection::MisplacedBatch))
    ));

    // Every node restarts from its file; new versions stay above every one handed out.
    c.kill_all().await;
    for id in voters {
        c.start(id).await?;
    }
    // The first leader after a full restart may be deposed by a later election before
    // the write lands: retry (bounded) until one leader takes it.
    let deadline = std::time::Instant::now() + WAIT;
    let after = loop {
        let leader = c.wait_leader(&voters, WAIT).await?;
        match c
            .store(leader)?
            .apply_yaml(&objective_yaml("after", 1), Route::ViaLeader)
            .await
        {
            Ok(a) => break a,
            Err(WriteError::NotLeader { .. } | WriteError::Unavailable(_))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    assert!(after.changes[0].resource_version.unwrap() > newest);
    Ok(())
}

/// A leader cut off from its quorum keeps its uncommitted entries pending; its writer must
/// still answer every write (Unavailable, as they may commit later) instead of letting the
/// stuck entries hold its in-flight slots forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stuck_on_a_leader_without_quorum_do_not_block_later_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let voters = [1, 2, 3];
    let mut c = TestCluster::new(dir.path(), 13).with_config(|c| StoreConfig {
        write_timeout: Duration::from_millis(300),
        batch_max_in_flight: std::num::NonZeroUsize::MIN,
        ..c
    });
    c.start_bootstrapped(&voters, &[]).await?;
    let leader = c.wait_leader(&voters, WAIT).await?;
    c.net.isolate(leader);
    let store = c.store(leader)?;
    // More writes, one after another, than there are in-flight slots: each is answered.
    for i in 0..3 {
        let doc = objective_yaml(&format!("stuck{i}"), 1);
        let r = tokio::time::timeout(WAIT, store.apply_yaml(&doc, Route::Local))
            .await
            .context("a write to a leader without quorum was never answered")?;
        assert!(
            matches!(
                r,
                Err(WriteError::Unavailable(_) | WriteError::NotLeader { .. })
            ),
            "{r:?}"
        );
    }
    c.net.heal();
    let leader = c.wait_leader(&voters, WAIT).await?;
    c.store(leader)?
        .apply_yaml(&objective_yaml("after", 1), Route::ViaLeader)
        .await?;
    Ok(())
}
