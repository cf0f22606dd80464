//! Policy in Raft across real `infermesh` processes on loopback: acknowledged writes
//! survive a leader SIGKILL and a full restart from disk (3 and 5 nodes); a minority cannot
//! commit; a new node catches up by snapshot; writes need a token; an invalid multi-doc
//! apply changes nothing; an EndpointPickerConfig change reroutes without a restart.
//!
//! The tests run one at a time (a process-wide lock): each starts several node processes
//! and the machine may have only two cores.

mod policy_cluster;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use http::{Method, StatusCode};
use policy_cluster::{Cluster, client, objective, run, signal, wait_for};

/// A write acknowledged to the client is on every node after the leader is SIGKILLed, and
/// after every node is SIGKILLed and restarted from its data dir.
async fn acknowledged_writes_survive(n: usize) -> Result<()> {
    let mut c = Cluster::start(n).await?;
    let leader = c.wait_leader().await?;
    let follower = (leader + 1) % n;

    // Acknowledged through a follower (forwarded to the leader), then through the leader.
    c.apply_retrying(follower, &objective("acked", 5)).await?;
    c.apply_retrying(leader, &objective("second", 6)).await?;

    c.kill(leader);
    let survivor = c.running()[0];
    // The survivors elect a leader and take writes again.
    c.apply_retrying(survivor, &objective("after-kill", 7))
        .await?;
    c.wait_everywhere("acked", 5).await?;
    c.wait_everywhere("second", 6).await?;
    c.wait_everywhere("after-kill", 7).await?;

    for i in c.running() {
        c.kill(i);
    }
    for i in 0..n {
        c.restart(i)?;
    }
    c.wait_leader().await?;
    for (name, p) in [("acked", 5), ("second", 6), ("after-kill", 7)] {
        c.wait_everywhere(name, p).await?;
    }
    // And the restarted cluster still commits.
    c.apply_retrying(0, &objective("after-restart", 8)).await?;
    c.wait_everywhere("after-restart", 8).await
}

#[test]
fn three_nodes_keep_acknowledged_writes_through_leader_kill_and_full_restart() -> Result<()> {
    run(acknowledged_writes_survive(3))
}

#[test]
fn five_nodes_keep_acknowledged_writes_through_leader_kill_and_full_restart() -> Result<()> {
    run(acknowledged_writes_survive(5))
}

/// Writes without a valid token are refused with 401, invalid multi-document files with 400
/// naming the document and field; neither changes anything on any node.
#[test]
fn unauthorized_and_invalid_writes_change_nothing() -> Result<()> {
    run(async {
        let c = Cluster::start(3).await?;
        let yaml = objective("sneaky", 1);
        for token in [None, Some("wrong-token")] {
            let cl = infermesh_node::admin::client::AdminClient::new(
                &c.nodes[1].admin,
                token.map(str::to_owned),
            )?;
            let err = cl
                .call(Method::POST, "/v1/policy", Some(yaml.clone().into_bytes()))
                .await
                .expect_err("a write without a valid token must fail");
            ensure!(err.status() == Some(StatusCode::UNAUTHORIZED), "{err}");
            let err = cl
                .call(Method::DELETE, "/v1/policy/InferenceObjective/x", None)
                .await
                .expect_err("a delete without a valid token must fail");
            ensure!(err.status() == Some(StatusCode::UNAUTHORIZED), "{err}");
        }

        // Document 1 is valid, document 2 has a priority of the wrong type.
        let bad = format!(
            "{}---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             metadata: {{name: broken}}\nspec: {{priority: high, poolRef: {{name: pool}}}}\n",
            objective("valid-but-not-applied", 3)
        );
        let err = c
            .admin(2)
            .call(Method::POST, "/v1/policy", Some(bad.into_bytes()))
            .await
            .expect_err("an invalid document must fail the apply");
        ensure!(err.status() == Some(StatusCode::BAD_REQUEST), "{err}");
        let infermesh_node::admin::client::ClientError::Api { body, .. } = &err else {
            unreachable!()
        };
        ensure!(body["error"]["document"] == 2, "{body}");
        ensure!(
            body["error"]["field"].as_str() == Some("spec.priority"),
            "{body}"
        );
        // An invalid EndpointPickerConfig is refused by the scheduler's loader.
        let bad_epp = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n\
                       plugins:\n- type: no-such-scorer\n";
        let err = c
            .admin(0)
            .call(
                Method::POST,
                "/v1/policy",
                Some(bad_epp.as_bytes().to_vec()),
            )
            .await
            .expect_err("an invalid EndpointPickerConfig must fail");
        ensure!(err.status() == Some(StatusCode::BAD_REQUEST), "{err}");
        ensure!(err.to_string().contains("no-such-scorer"), "{err}");

        // A committed write after all that proves the refused ones were not just slow.
        c.apply_retrying(0, &objective("marker", 1)).await?;
        c.wait_everywhere("marker", 1).await?;
        for i in c.running() {
            for name in ["sneaky", "valid-but-not-applied", "broken"] {
                ensure!(
                    c.priority(i, name).await?.is_none(),
                    "{name} applied on node {i}"
                );
            }
        }
        // The only policy object written is the marker (node registry entries aside).
        for i in c.running() {
            let list = c
                .admin(i)
                .call(Method::GET, "/v1/policy/InferenceObjective", None)
                .await?;
            let names: Vec<&str> = list["items"]
                .as_array()
                .context("items")?
                .iter()
                .filter_map(|o| o["metadata"]["name"].as_str())
                .collect();
            ensure!(names == ["marker"], "node {i} holds {names:?}");
        }
        Ok(())
    })
}

/// A leader cut off from both followers (they are SIGSTOPped: the majority is gone)
/// cannot commit: its writes are answered 503 and nothing is applied; once the majority
/// is back, writes commit everywhere.
#[test]
fn a_minority_cannot_commit() -> Result<()> {
    run(async {
        let c = Cluster::start(3).await?;
        let leader = c.wait_leader().await?;
        c.apply_retrying(leader, &objective("base", 1)).await?;
        c.wait_everywhere("base", 1).await?;
        let majority: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        for i in &majority {
            signal(c.nodes[*i].pid().context("running")?, "STOP");
        }
        let applied_before = c.status(leader).await?["raft"]["applied_index"].clone();
        let err = c
            .admin(leader)
            .call(
                Method::POST,
                "/v1/policy",
                Some(objective("minority", 2).into_bytes()),
            )
            .await
            .expect_err("a minority must not acknowledge a write");
        ensure!(
            err.status() == Some(StatusCode::SERVICE_UNAVAILABLE),
            "expected 503, got {err}"
        );
        ensure!(c.priority(leader, "minority").await?.is_none());
        ensure!(
            c.status(leader).await?["raft"]["applied_index"] == applied_before,
            "the minority applied something"
        );
        for i in &majority {
            signal(c.nodes[*i].pid().context("running")?, "CONT");
        }
        c.apply_retrying(majority[0], &objective("healed", 3))
            .await?;
        c.wait_everywhere("healed", 3).await?;
        c.wait_everywhere("base", 1).await
    })
}

/// After the leader compacts its log, a new node can only catch up by installing the
/// snapshot; it then has every object. Then it is removed from the cluster again.
#[test]
fn a_new_node_catches_up_by_snapshot() -> Result<()> {
    run(async {
        let mut c = Cluster::start(3).await?;
        for i in 0..20 {
            c.apply_retrying(i % 3, &objective(&format!("o{i}"), i as i32))
                .await?;
        }
        let compacted = c
            .admin(1)
            .call(Method::POST, "/v1/cluster/compact", None)
            .await?["snapshotIndex"]
            .as_u64()
            .context("snapshotIndex")?;
        let leader = c.wait_leader().await?;
        let purged = c.status(leader).await?["raft"]["purged_index"].as_u64();
        ensure!(
            purged >= Some(compacted),
            "log not purged: {purged:?} < {compacted}"
        );

        let new = c.join(0, &[])?;
        c.wait_converged(4).await?;
        let s = c.status(new).await?;
        let snap = s["raft"]["snapshot_index"].as_u64();
        ensure!(
            snap >= Some(compacted),
            "the new node has no snapshot at or past {compacted}: {s}"
        );
        for i in [0, 7, 19] {
            c.wait_everywhere(&format!("o{i}"), i).await?;
        }

        // Removing the new member through another node (forwarded to the leader).
        let id = s["raft"]["id"].as_u64().context("raft id")?;
        c.admin(1)
            .call(Method::DELETE, &format!("/v1/cluster/members/{id}"), None)
            .await?;
        wait_for("the member to be removed", || async {
            let s = c.status(0).await.ok()?;
            let members = s["raft"]["members"].as_array()?;
            (members.len() == 3 && members.iter().all(|m| m["id"] != id)).then_some(())
        })
        .await?;
        Ok(())
    })
}

/// Routing follows a new EndpointPickerConfig as soon as it is applied: a label-selector
/// filter sends every request to pod `a`; after applying one selecting `b`, every request
/// goes to `b`, with no restart.
#[test]
fn an_endpoint_picker_config_change_reroutes_without_restart() -> Result<()> {
    run(async {
        let mut cfg = infermesh_sim::FleetConfig::new(2);
        cfg.profile = infermesh_sim::EngineProfile::instant();
        let model = cfg.model.clone();
        let fleet = infermesh_sim::Fleet::start(cfg).await?;
        let pods = fleet.addrs();
        let c = Cluster::start(1).await?;
        let endpoints = format!(
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
             metadata: {{name: pool}}\nspec: {{selector: {{matchLabels: {{app: sim}}}}, targetPorts: [{{number: 8000}}]}}\n---\n\
             apiVersion: infermesh.io/v1alpha1\nkind: InferenceEndpoints\nmetadata: {{name: sims}}\n\
             spec:\n  poolRef: {{name: pool}}\n  endpoints:\n  \
             - {{address: '{}', labels: {{app: sim, slot: a}}}}\n  - {{address: '{}', labels: {{app: sim, slot: b}}}}\n",
            pods[0], pods[1]
        );
        c.apply_retrying(0, &endpoints).await?;
        let info = client(&c.nodes[0].admin, false)
            .call(Method::GET, "/v1/node", None)
            .await?;
        let proxy = info["proxyAddress"].as_str().context("proxy")?.to_owned();
        let http = infermesh_node::upstream::http_client(Duration::from_secs(2));
        let served_by = |prompt: String| {
            let http = http.clone();
            let proxy = proxy.clone();
            let model = model.clone();
            async move {
                let body = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 1});
                let req = http::Request::post(format!("http://{proxy}/v1/completions"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        body.to_string(),
                    )))
                    .ok()?;
                let resp = http.request(req).await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                resp.headers()
                    .get(infermesh_node::proxy::SERVED_HEADER)?
                    .to_str()
                    .ok()?
                    .parse::<std::net::SocketAddr>()
                    .ok()
            }
        };
        let epp = |slot: &str| {
            format!(
                "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nmetadata: {{name: default}}\n\
                 plugins:\n- name: only\n  type: label-selector-filter\n  parameters:\n    \
                 matchLabels: {{slot: {slot}}}\n- type: queue-scorer\n- type: max-score-picker\n\
                 schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: only\n  \
                 - pluginRef: queue-scorer\n  - pluginRef: max-score-picker\n"
            )
        };
        for (slot, pod) in [("a", pods[0]), ("b", pods[1]), ("a", pods[0])] {
            c.apply_retrying(0, &epp(slot)).await?;
            // The config is applied asynchronously after the commit: wait for the
            // switch, then require every further request to follow it.
            wait_for(&format!("routing to {pod}"), || async {
                (served_by(format!("probe {slot}")).await? == pod).then_some(())
            })
            .await?;
            for k in 0..20 {
                let got = served_by(format!("request {k} for {slot}"))
                    .await
                    .context("request failed")?;
                ensure!(
                    got == pod,
                    "slot {slot}: request {k} went to {got}, not {pod}"
                );
            }
        }
        Ok(())
    })
}

/// SIGTERM on the leader hands leadership to another voter before the process exits: the
/// moment it is gone, a survivor already reports a new leader (an election after a crash
/// would only start once the survivors' election timeout ran out).
#[test]
fn graceful_shutdown_hands_leadership_off() -> Result<()> {
    run(async {
        let mut c = Cluster::start(3).await?;
        let leader = c.wait_leader().await?;
        let old = c.status(leader).await?["raft"]["id"].as_u64();
        ensure!(c.terminate(leader)?, "the leader did not exit cleanly");
        let mut leaders = Vec::new();
        for i in c.running() {
            leaders.push(c.status(i).await?["raft"]["leader"].as_u64());
        }
        ensure!(
            leaders.iter().any(|l| l.is_some() && *l != old),
            "no survivor knew a new leader when the old one exited: {leaders:?} (old {old:?})"
        );
        let survivor = c.running()[0];
        c.apply_retrying(survivor, &objective("after-handoff", 4))
            .await?;
        c.wait_everywhere("after-handoff", 4).await
    })
}

/// A randomized history: clients write unique objects through different nodes while the
/// leader is SIGKILLed and restarted; after every acknowledged write a consistent read
/// (`?consistent=true`, served by the leader) started after the ack must see it, and at
/// the end every acknowledged write is on every node.
#[test]
fn acknowledged_writes_survive_a_history_of_leader_kills() -> Result<()> {
    use rand::{Rng, SeedableRng};
    run(async {
        let mut c = Cluster::start(3).await?;
        let admins: Vec<String> = c.nodes.iter().map(|n| n.admin.clone()).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = tokio::task::JoinSet::new();
        for id in 0..3usize {
            let admins = admins.clone();
            let stop = stop.clone();
            clients.spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(id as u64);
                let mut acked = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(40);
                for k in 0..200 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed)
                        || std::time::Instant::now() > deadline
                    {
                        break;
                    }
                    let name = format!("h{id}-{k}");
                    let prio = rng.random_range(0..100);
                    let via = &admins[rng.random_range(0..admins.len())];
                    let cl = infermesh_node::admin::client::AdminClient::new(
                        via,
                        Some(policy_cluster::TOKEN.to_owned()),
                    )?;
                    match cl
                        .call(
                            Method::POST,
                            "/v1/policy",
                            Some(objective(&name, prio).into_bytes()),
                        )
                        .await
                    {
                        Ok(_) => {}
                        // Unknown outcome (no leader, node down): not acknowledged.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                    acked.push((name.clone(), prio));
                    // A consistent read through some live node must see the write.
                    let reader = &admins[rng.random_range(0..admins.len())];
                    let rc = policy_cluster::client(reader, false);
                    let path = format!("/v1/policy/InferenceObjective/{name}?consistent=true");
                    match rc.call(Method::GET, &path, None).await {
                        Ok(v) => ensure!(
                            v["spec"]["priority"].as_i64() == Some(i64::from(prio)),
                            "consistent read of {name} after its ack returned {v}"
                        ),
                        Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                            anyhow::bail!("consistent read missed acknowledged write {name}")
                        }
                        // The reader or the leader is down right now: no answer, no verdict.
                        Err(_) => {}
                    }
                }
                Ok::<_, anyhow::Error>(acked)
            });
        }
        // Two rounds: kill the leader, let the clients run on the survivors, restart it.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let leader = c.wait_leader().await?;
            c.kill(leader);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c.restart(leader)?;
            c.wait_converged(3).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut acked = Vec::new();
        while let Some(r) = clients.join_next().await {
            acked.extend(r??);
        }
        ensure!(
            acked.len() >= 10,
            "too few writes acknowledged: {}",
            acked.len()
        );
        eprintln!("{} acknowledged writes; checking every node", acked.len());
        for (name, prio) in &acked {
            c.wait_everywhere(name, i64::from(*prio)).await?;
        }
        Ok(())
    })
}

/// The CLI against a live node: apply a file, read it back as a table and as JSON, see the
/// cluster status; a write without --token-file and an invalid file fail with a message.
#[test]
fn cli_applies_reads_and_reports_status() -> Result<()> {
    run(async {
        let c = Cluster::start(1).await?;
        let server = format!("http://{}", c.nodes[0].admin);
        let dir = tempfile::tempdir()?;
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{}\n", policy_cluster::TOKEN))?;
        let file = dir.path().join("policy.yaml");
        std::fs::write(
            &file,
            format!("{}---\n{}", objective("chat", 5), objective("batch", -1)),
        )?;
        let cli = |args: &[&str]| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_infermesh"))
                .args(args)
                .args(["--server", &server])
                .output()
                .expect("run infermesh");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let f = file.to_str().context("utf-8 path")?;
        let t = token.to_str().context("utf-8 path")?;
        let (ok, out, err) = cli(&["policy", "apply", "-f", f, "--token-file", t]);
        ensure!(ok, "{out}{err}");
        ensure!(
            out.contains("inferenceobjective/default/chat created"),
            "{out}"
        );
        let (ok, out, err) = cli(&["policy", "get", "inferenceobjectives"]);
        ensure!(
            ok && out.contains("priority=-1") && out.contains("chat"),
            "{out}{err}"
        );
        let (ok, out, err) = cli(&["policy", "get", "InferenceObjective", "chat", "-o", "json"]);
        ensure!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(v["spec"]["priority"] == 5, "{v}");
        let (ok, out, err) = cli(&["cluster", "status"]);
        ensure!(
            ok && out.contains("is Leader") && out.contains("n1"),
            "{out}{err}"
        );
        let (ok, _, err) = cli(&["policy", "delete", "InferenceObjective", "chat"]);
        ensure!(!ok && err.contains("--token-file"), "{err}");
        std::fs::write(&file, "kind: Nonsense\nmetadata: {name: x}\n")?;
        let (ok, _, err) = cli(&["policy", "apply", "-f", f, "--token-file", t]);
        ensure!(
            !ok && err.contains("400") && err.contains("Nonsense"),
            "{err}"
        );
        let (ok, out, err) = cli(&[
            "policy",
            "delete",
            "InferenceObjective",
            "chat",
            "--token-file",
            t,
        ]);
        ensure!(ok && out.contains("deleted"), "{out}{err}");
        Ok(())
    })
}
