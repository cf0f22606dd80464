//! The mesh through the real binary: three `infermesh serve` processes joined by the
//! mesh flags; one is SIGKILLed and the survivors drop it, take over its pods' scraping
//! and keep routing.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infermesh_node::upstream::http_client;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use support::{free_port, get, post, prefixed_prompt};

struct Node {
    child: Child,
    proxy: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind udp 127.0.0.1:0")
}

fn pool_yaml(pods: &[SocketAddr], model: &str) -> String {
    let mut s = format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata:\n  name: sim\nspec:\n  targetPorts:\n  - number: 8000\n  selector:\n    matchLabels:\n      app: sim\nmodels:\n- {model}\npods:\n"
    );
    for (i, p) in pods.iter().enumerate() {
        s.push_str(&format!(
            "- name: sim-{i}\n  address: {}\n  targetPorts: [{{number: {}}}]\n  labels: {{app: sim}}\n",
            p.ip(),
            p.port()
        ));
    }
    s
}

fn spawn(dir: &std::path::Path, name: &str, gossip: SocketAddr, seeds: &[SocketAddr]) -> Node {
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermesh"));
    cmd.args(["serve", "--node-name", name])
        .args([
            "--ext-proc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args(["--proxy-addr", &proxy.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--gossip-addr", &gossip.to_string()])
        .arg("--endpoints")
        .arg(dir.join("pool.yaml"))
        .arg("--cluster-key-file")
        .arg(dir.join("key"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if !seeds.is_empty() {
        let s: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        cmd.arg("--seeds").arg(s.join(","));
    }
    Node {
        child: cmd.spawn().expect("spawn infermesh"),
        proxy,
        metrics,
    }
}

/// Values of a metric family on a node's /metrics page (empty if unreachable).
async fn samples(client: &infermesh_node::upstream::HttpClient, n: &Node, name: &str) -> Vec<f64> {
    let Ok(page) = get(client, n.metrics, "/metrics").await else {
        return Vec::new();
    };
    String::from_utf8_lossy(&page.body)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// Scrapes this node has made itself (every outcome): it scrapes only the pods it owns.
async fn own_scrapes(client: &infermesh_node::upstream::HttpClient, n: &Node) -> f64 {
    samples(client, n, "infermesh_scrapes_total")
        .await
        .iter()
        .sum()
}

/// Waits (bounded: 30 s) until `ok` holds.
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, ok: impl FnMut() -> F) {
    infermesh_testkit::wait_until_async(what, Duration::from_secs(30), ok).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_node_is_dropped_and_its_pods_rescraped() {
    let mut fc = FleetConfig::new(4);
    fc.profile = EngineProfile::instant();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.expect("pods start");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pool.yaml"),
        pool_yaml(&fleet.addrs(), &model),
    )
    .unwrap();
    std::fs::write(dir.path().join("key"), "process-test-cluster-key\n").unwrap();
    let client = http_client(Duration::from_secs(2));

    let seed = free_udp();
    let mut nodes = vec![spawn(dir.path(), "node-0", seed, &[])];
    for i in 1..3 {
        nodes.push(spawn(dir.path(), &format!("node-{i}"), free_udp(), &[seed]));
    }
    wait_until("3 members on every node, every pod fresh", || async {
        for n in &nodes {
            if samples(&client, n, "infermesh_mesh_members").await != [3.0] {
                return false;
            }
            let ages = samples(&client, n, "infermesh_endpoint_metrics_age_seconds").await;
            if ages.len() != 4 || ages.iter().any(|a| *a > 0.5) {
                return false;
            }
        }
        true
    })
    .await;

    // Kill a node that owns pods: a node scrapes only the pods it owns on the ring, so its
    // own scrape counter grows exactly when it owns at least one. Killing a node that owns
    // none would leave every pod fresh without any take-over, and the test would prove nothing.
    let mut before = Vec::new();
    for n in &nodes {
        before.push(own_scrapes(&client, n).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let owner = 'found: loop {
        for (i, n) in nodes.iter().enumerate() {
            // 50 ms scrapes: 10 more is at least half a second of owning a pod.
            if own_scrapes(&client, n).await >= before[i] + 10.0 {
                break 'found i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until a node's own scrape counter grows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("killing node-{owner}, which scrapes pods (scrape counters before: {before:?})");
    let mut victim = nodes.remove(owner);
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();
    let killed = Instant::now();
    wait_until("survivors drop the killed node", || async {
        for n in &nodes {
            if samples(&client, n, "infermesh_mesh_members").await != [2.0] {
                return false;
            }
        }
        true
    })
    .await;
    // Fresh metrics one second after the kill can only come from the survivors' scrapes.
    wait_until("every pod scraped again by a survivor", || async {
        if killed.elapsed() < Duration::from_secs(1) {
            return false;
        }
        for n in &nodes {
            let ages = samples(&client, n, "infermesh_endpoint_metrics_age_seconds").await;
            if ages.len() != 4 || ages.iter().any(|a| *a > 0.5) {
                return false;
            }
        }
        true
    })
    .await;
    for (i, n) in nodes.iter().enumerate() {
        let r = post(
            &client,
            n.proxy,
            "/v1/completions",
            prefixed_prompt(&model, 1, i),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "survivor {i} routes: {:?}", r.body);
    }
    drop(nodes);
    drop(victim);
    fleet.shutdown().await;
}
