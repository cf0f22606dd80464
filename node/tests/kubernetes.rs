//! The Kubernetes controller against an in-process API server (testkit's `KubeApiServer`,
//! which lists, watches with resourceVersions and bookmarks, answers 410 Gone after a
//! compaction and 409 on stale status writes), with a 3-node policy cluster of real
//! `infermesh` processes, each running the controller:
//! pods becoming Ready and unready move the pool's endpoints on every node; an objective
//! created, changed and deleted reaches every node; the EndpointPickerConfig ConfigMap
//! becomes every node's config; llm-d's group wins over the x-k8s one;
//! a watch broken with 410 resumes without losing a change; only the Raft leader writes,
//! and after it is killed the new leader carries on; a bad object gets an `Accepted=False`
//! condition naming the field; status conflicts are retried.

mod policy_cluster;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use http::Method;
use infermesh_testkit::kube_api::KubeApiServer;
use policy_cluster::{Cluster, wait_for};
use serde_json::{Value, json};

const POOLS: &str = "inference.networking.k8s.io/v1";
const LLMD: &str = "llm-d.ai/v1alpha2";
const XK8S: &str = "inference.networking.x-k8s.io/v1alpha2";

fn pod(name: &str, ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "vllm", "llm-d.ai/role": "decode"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

fn objective(api_version: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": api_version, "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

/// Node `i`'s endpoints of pool `pool`, from its applied policy.
async fn endpoints(c: &Cluster, i: usize) -> Option<Vec<String>> {
    let v = c
        .admin(i)
        .call(Method::GET, "/v1/policy/InferenceEndpoints/pool", None)
        .await
        .ok()?;
    Some(
        v["spec"]["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e["address"].as_str().map(str::to_owned))
            .collect(),
    )
}

async fn endpoints_everywhere(c: &Cluster, want: &[&str]) -> Result<()> {
    for i in c.running() {
        wait_for(&format!("node {i} to have endpoints {want:?}"), || async {
            (endpoints(c, i).await? == want).then_some(())
        })
        .await?;
    }
    Ok(())
}

async fn gone_everywhere(c: &Cluster, name: &str) -> Result<()> {
    for i in c.running() {
        wait_for(&format!("node {i} to drop {name}"), || async {
            match c.priority(i, name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        })
        .await?;
    }
    Ok(())
}

/// The `Accepted` condition on a stored objective, once written.
fn accepted(api: &KubeApiServer, version: &str, name: &str) -> Option<Value> {
    let o = api.get(version, "inferenceobjectives", "default", name)?;
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

/// Policy writes node `i`'s controller attempted (followers must attempt none).
fn mirrored_lines(c: &Cluster, i: usize) -> usize {
    c.log(i)
        .matches("writing the cluster's changes to policy")
        .count()
}

#[test]
fn the_controller_mirrors_the_cluster_through_the_leader() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(scenario())
}

async fn scenario() -> Result<()> {
    let api = KubeApiServer::start().await?;
    api.install("inference.networking.k8s.io", "v1", "inferencepools");
    for g in ["llm-d.ai", "inference.networking.x-k8s.io"] {
        api.install(g, "v1alpha2", "inferenceobjectives");
        api.install(g, "v1alpha2", "inferencemodelrewrites");
    }
    let dir = tempfile::tempdir()?;
    let kubeconfig = api.write_kubeconfig(dir.path(), "default")?;
    let kubeconfig = kubeconfig.display().to_string();
    let flags = [
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--kubernetes-config-map",
        "epp",
    ];

    api.apply(
        "inferencepools",
        json!({
            "apiVersion": POOLS, "kind": "InferencePool",
            "metadata": {"name": "pool", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "vllm"}},
                "targetPorts": [{"number": 8000}],
                "endpointPickerRef": {"name": "infermesh", "port": {"number": 9002}},
            },
        }),
    );
    api.apply("pods", pod("p1", "10.0.0.1", true));
    api.apply("pods", pod("p2", "10.0.0.2", false));

    let mut c = Cluster::new()?;
    c.bootstrap(&flags)?;
    c.join(0, &flags)?;
    c.join(0, &flags)?;
    c.wait_converged(3).await?;

    // Readiness moves the candidate set on every node.
    endpoints_everywhere(&c, &["10.0.0.1:8000"]).await?;
    api.apply("pods", pod("p2", "10.0.0.2", true));
    endpoints_everywhere(&c, &["10.0.0.1:8000", "10.0.0.2:8000"]).await?;
    api.apply("pods", pod("p1", "10.0.0.1", false));
    endpoints_everywhere(&c, &["10.0.0.2:8000"]).await?;

    // The EndpointPickerConfig ConfigMap becomes the config every node runs.
    api.apply(
        "configmaps",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "epp", "namespace": "default"},
            "data": {"epp-config.yaml": "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n"},
        }),
    );
    for i in c.running() {
        wait_for(
            &format!("node {i} to store the ConfigMap's config"),
            || async {
                let v = c
                    .admin(i)
                    .call(Method::GET, "/v1/policy/EndpointPickerConfig/default", None)
                    .await
                    .ok()?;
                (v.to_string().contains("queue-scorer")).then_some(())
            },
        )
        .await?;
    }

    // An objective created, changed, deleted. The x-k8s copy is ignored: llm-d's group is
    // installed, and llm-d reads only that one then.
    api.apply(
        "inferenceobjectives",
        objective(
            XK8S,
            "shadow",
            json!({"priority": 1, "poolRef": {"name": "pool"}}),
        ),
    );
    api.apply(
        "inferenceobjectives",
        objective(
            LLMD,
            "chat",
            json!({"priority": 5, "poolRef": {"name": "pool"}}),
        ),
    );
    c.wait_everywhere("chat", 5).await?;
    api.apply(
        "inferenceobjectives",
        objective(
            LLMD,
            "chat",
            json!({"priority": 7, "poolRef": {"name": "pool"}}),
        ),
    );
    c.wait_everywhere("chat", 7).await?;
    for i in c.running() {
        ensure!(
            c.priority(i, "shadow").await?.is_none(),
            "node {i} took the x-k8s objective"
        );
    }
    let cond = wait_for("chat's Accepted condition", || async {
        accepted(&api, LLMD, "chat").filter(|c| c["observedGeneration"] == 2)
    })
    .await?;
    ensure!(cond["status"] == "True", "{cond}");
    ensure!(api.delete(LLMD, "inferenceobjectives", "default", "chat"));
    gone_everywhere(&c, "chat").await?;

    // A bad object: refused with a condition naming the field; nothing reaches policy.
    api.apply(
        "inferenceobjectives",
        objective(
            LLMD,
            "typo",
            json!({"priorty": 3, "poolRef": {"name": "pool"}}),
        ),
    );
    let cond = wait_for("typo's Accepted condition", || async {
        accepted(&api, LLMD, "typo")
    })
    .await?;
    ensure!(
        cond["status"] == "False" && cond["reason"] == "Invalid",
        "{cond}"
    );
    ensure!(
        cond["message"].as_str().unwrap_or("").contains("priorty"),
        "{cond}"
    );
    for i in c.running() {
        ensure!(
            c.priority(i, "typo").await?.is_none(),
            "node {i} took the bad objective"
        );
    }

    // History compacted and every watch cut: the watches get 410, relist, and a change made
    // meanwhile is not lost.
    api.compact();
    api.cut_watches();
    api.apply(
        "inferenceobjectives",
        objective(
            LLMD,
            "after-gone",
            json!({"priority": 4, "poolRef": {"name": "pool"}}),
        ),
    );
    c.wait_everywhere("after-gone", 4).await?;
    let (_, expired, _, _) = api.counters();
    ensure!(
        expired > 0,
        "no watch resumed from a compacted resourceVersion"
    );

    // Status writes that meet conflicts are retried on a fresh read.
    api.inject_status_conflicts(2);
    api.apply(
        "inferenceobjectives",
        objective(
            LLMD,
            "after-gone",
            json!({"priority": 6, "poolRef": {"name": "pool"}}),
        ),
    );
    c.wait_everywhere("after-gone", 6).await?;
    wait_for("after-gone's condition at generation 2", || async {
        accepted(&api, LLMD, "after-gone").filter(|c| c["observedGeneration"] == 2)
    })
    .await?;
    let (conflicts, _, _, _) = api.counters();
    ensure!(conflicts >= 2, "only {conflicts} conflicts were sent");

    // Only the leader wrote.
    let leader = c.wait_leader().await?;
    for i in c.running() {
        let n = mirrored_lines(&c, i);
        if i == leader {
            ensure!(n > 0, "the leader never wrote");
        } else {
            ensure!(n == 0, "follower {i} wrote {n} times:\n{}", c.log(i));
        }
    }
    // The leader dies; the new one carries on from its warm cache.
    c.kill(leader);
    let new_leader = c.wait_leader().await.context("no new leader")?;
    api.apply(
        "inferenceobjectives",
        objective(
            LLMD,
            "after-kill",
            json!({"priority": 9, "poolRef": {"name": "pool"}}),
        ),
    );
    c.wait_everywhere("after-kill", 9).await?;
    ensure!(
        mirrored_lines(&c, new_leader) > 0,
        "the new leader did not write"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
