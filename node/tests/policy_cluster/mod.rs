//! Harness for the policy tests: real `infermesh serve` processes on loopback forming a
//! policy cluster over the mesh, each with its own temp data dir, all ports chosen at
//! runtime; killed (SIGKILL), paused (SIGSTOP) and restarted from disk.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http::Method;
use infermesh_node::admin::client::{AdminClient, AdminTls, ClientError};
use serde_json::Value;

/// The write token every test cluster is bootstrapped with.
pub const TOKEN: &str = "test-token-0123";
/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// One node process.
pub struct NodeProc {
    /// Mesh node name.
    pub name: String,
    /// Admin API address of the running process.
    pub admin: String,
    /// Gossip address (kept across restarts so peers find it again).
    pub gossip: Option<SocketAddr>,
    data_dir: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl NodeProc {
    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A policy cluster of `infermesh` processes.
pub struct Cluster {
    /// The nodes, in start order (index = node number - 1).
    pub nodes: Vec<NodeProc>,
    dir: tempfile::TempDir,
    key: PathBuf,
    tokens: PathBuf,
    /// How the test reaches admin APIs that serve https (`None`: they serve http).
    admin_tls: Option<AdminTls>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                signal(c.id(), "CONT");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Sends a signal by name with `kill(1)`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// An admin client for `admin`, with or without the token.
pub fn client(admin: &str, token: bool) -> AdminClient {
    AdminClient::new(admin, token.then(|| TOKEN.to_owned())).expect("valid admin address")
}

/// An InferenceObjective document.
pub fn objective(name: &str, priority: i32) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {name}}}\nspec: {{priority: {priority}, poolRef: {{name: pool}}}}\n"
    )
}

impl Cluster {
    /// An empty cluster (no process yet) with its key and token files.
    pub fn new() -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("cluster.key");
        std::fs::write(&key, "policy-test-cluster-key-0123456789")?;
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, format!("# write tokens\n{TOKEN}\n"))?;
        Ok(Cluster {
            nodes: Vec::new(),
            dir,
            key,
            tokens,
            admin_tls: None,
        })
    }

    /// An empty cluster whose nodes serve their admin API over https, reached with `tls`.
    pub fn with_admin_tls(tls: AdminTls) -> Result<Cluster> {
        let mut c = Cluster::new()?;
        c.admin_tls = Some(tls);
        Ok(c)
    }

    /// Node `i`'s admin API URL.
    pub fn url(&self, i: usize) -> String {
        match self.admin_tls {
            Some(_) => format!("https://{}", self.nodes[i].admin),
            None => self.nodes[i].admin.clone(),
        }
    }

    /// Node `i`'s admin client sending `token` (or none).
    pub fn client_as(&self, i: usize, token: Option<&str>) -> AdminClient {
        AdminClient::with_tls(
            &self.url(i),
            token.map(str::to_owned),
            &self.admin_tls.clone().unwrap_or_default(),
        )
        .expect("valid admin address")
    }

    /// The directory the cluster's files live in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Starts `n` nodes: the first bootstraps, the rest join through it; returns once every
    /// node reports `n` members, a leader, and the expected voter count.
    pub async fn start(n: usize) -> Result<Cluster> {
        let mut c = Cluster::new()?;
        c.bootstrap(&[])?;
        for _ in 1..n {
            c.join(0, &[])?;
        }
        c.wait_converged(n).await?;
        Ok(c)
    }

    fn spawn(&self, i: usize, role: &[String]) -> Result<(Child, String)> {
        let n = &self.nodes[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", n.name)))?;
        let gossip = n.gossip.map_or("127.0.0.1:0".to_owned(), |g| g.to_string());
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter_map(|(_, o)| o.gossip.map(|g| g.to_string()))
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermesh"));
        cmd.args(["serve", "--node-name", &n.name])
            .args(["--ext-proc-addr", "127.0.0.1:0"])
            .args(["--proxy-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--gossip-addr", &gossip])
            .arg("--cluster-key-file")
            .arg(&self.key)
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(role)
            .args(&n.extra)
            .env("RUST_LOG", "warn,infermesh_node=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if !seeds.is_empty() {
            cmd.arg("--seeds").arg(seeds.join(","));
        }
        let mut child = cmd.spawn().context("spawn infermesh")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("infermesh admin API listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(WAIT) {
            Ok(admin) => Ok((child, admin)),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not start; log:\n{}", n.name, self.log(i))
            }
        }
    }

    /// The node's log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }

    fn add(&mut self, extra: &[&str]) -> usize {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        self.nodes.push(NodeProc {
            data_dir: self.dir.path().join(&name),
            name,
            admin: String::new(),
            gossip: None,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        });
        i
    }

    fn launched(&mut self, i: usize, child: Child, admin: String) -> Result<usize> {
        self.nodes[i].child = Some(child);
        self.nodes[i].admin = admin;
        if self.nodes[i].gossip.is_none() {
            let info = block(self.client_as(i, None).call(Method::GET, "/v1/node", None))?;
            self.nodes[i].gossip = Some(info["gossipAddress"].as_str().context("gossip")?.parse()?);
        }
        Ok(i)
    }

    /// Starts a new node that forms the cluster.
    pub fn bootstrap(&mut self, extra: &[&str]) -> Result<usize> {
        let i = self.add(extra);
        let role = vec![
            "--bootstrap".to_owned(),
            "--admin-token-file".to_owned(),
            self.tokens.display().to_string(),
        ];
        let (child, admin) = self.spawn(i, &role)?;
        self.launched(i, child, admin)
    }

    /// Starts a new node that joins through node `via`.
    pub fn join(&mut self, via: usize, extra: &[&str]) -> Result<usize> {
        let i = self.add(extra);
        let role = vec!["--join".to_owned(), self.url(via)];
        let (child, admin) = self.spawn(i, &role)?;
        self.launched(i, child, admin)
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs node `i` and waits (bounded) for it to exit; returns whether it exited 0.
    pub fn terminate(&mut self, i: usize) -> Result<bool> {
        let mut c = self.nodes[i].child.take().context("not running")?;
        signal(c.id(), "TERM");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not exit after SIGTERM", self.nodes[i].name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Restarts node `i` from its data dir, on its old gossip address.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let (child, admin) = self.spawn(i, &[])?;
        self.launched(i, child, admin).map(|_| ())
    }

    /// Indexes of running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some())
            .collect()
    }

    /// Node `i`'s admin client (with the token).
    pub fn admin(&self, i: usize) -> AdminClient {
        self.client_as(i, Some(TOKEN))
    }

    /// `GET /v1/cluster/status` on node `i`.
    pub async fn status(&self, i: usize) -> Result<Value> {
        Ok(self
            .admin(i)
            .call(Method::GET, "/v1/cluster/status", None)
            .await?)
    }

    /// Waits until every running node reports `n` members, the same leader, and the voter
    /// count Raft rebalances to (1, 3 or 5).
    pub async fn wait_converged(&self, n: usize) -> Result<usize> {
        let voters = if n >= 5 {
            5
        } else if n >= 3 {
            3
        } else {
            1
        };
        wait_for(&format!("{n} members with {voters} voters"), || async {
            let mut leaders = Vec::new();
            for i in self.running() {
                let s = self.status(i).await.ok()?;
                let members = s["raft"]["members"].as_array()?;
                let v = members.iter().filter(|m| m["voter"] == true).count();
                if members.len() != n || v != voters {
                    return None;
                }
                leaders.push(s["raft"]["leader"].as_u64()?);
            }
            leaders.dedup();
            (leaders.len() == 1).then(|| leaders[0])
        })
        .await
        .map(|_| ())?;
        self.wait_leader().await
    }

    /// Waits until the running nodes agree on a leader among them; returns its index.
    pub async fn wait_leader(&self) -> Result<usize> {
        wait_for("a leader among the running nodes", || async {
            let mut leader = None;
            for i in self.running() {
                let s = self.status(i).await.ok()?;
                let l = s["raft"]["leader"].as_u64()?;
                if leader.is_some_and(|x| x != l) {
                    return None;
                }
                leader = Some(l);
            }
            let leader = leader?;
            for i in self.running() {
                let s = self.status(i).await.ok()?;
                if s["raft"]["id"].as_u64() == Some(leader) && s["raft"]["role"] == "Leader" {
                    return Some(i);
                }
            }
            None
        })
        .await
    }

    /// Applies `yaml` through node `i`, retrying while the cluster answers 503 (no leader
    /// yet); returns the committed answer.
    pub async fn apply_retrying(&self, i: usize, yaml: &str) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .admin(i)
                .call(Method::POST, "/v1/policy", Some(yaml.as_bytes().to_vec()))
                .await
            {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.status() == Some(http::StatusCode::SERVICE_UNAVAILABLE)
                        || matches!(e, ClientError::Unreachable { .. }) =>
                {
                    if Instant::now() > deadline {
                        bail!("write through {} never committed: {e}", self.nodes[i].name);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The priority of objective `name` in node `i`'s applied (local) state.
    pub async fn priority(&self, i: usize, name: &str) -> Result<Option<i64>> {
        match self
            .admin(i)
            .call(
                Method::GET,
                &format!("/v1/policy/InferenceObjective/{name}"),
                None,
            )
            .await
        {
            Ok(v) => Ok(v["spec"]["priority"].as_i64()),
            Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until every running node has applied objective `name` with `priority`.
    pub async fn wait_everywhere(&self, name: &str, priority: i64) -> Result<()> {
        for i in self.running() {
            wait_for(
                &format!("{} to apply {name}={priority}", self.nodes[i].name),
                || async { (self.priority(i, name).await.ok()? == Some(priority)).then_some(()) },
            )
            .await?;
        }
        Ok(())
    }
}

/// Runs one test on a fresh two-worker runtime, one test at a time in this binary: each
/// starts several node processes and the machine may have only two cores.
pub fn run(test: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(test)
}

/// Polls `probe` (every 50 ms, bounded by [`WAIT`]) until it yields a value.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a future to completion on a fresh current-thread runtime (for sync helpers).
fn block<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => tokio::task::block_in_place(|| h.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f),
    }
}
