//! The demo's tier: three infermesh nodes as real processes on 127.0.0.1 (this executable
//! run again as `infermesh-demo node serve …`), meshed and in one Raft cluster, and an
//! Envoy in front of them when one is installed. Every process is killed when the [`Tier`]
//! is dropped, and its directory (logs, Raft data, pool file) removed after.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use infermesh_node::admin::client::AdminClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The hidden first argument that makes `infermesh-demo` run as an infermesh node.
pub const NODE_ARG: &str = "node";

/// Nodes in the demo's tier: enough to lose one and keep a Raft majority.
pub const NODES: usize = 3;

/// Bearer token of the demo's admin API (written to the token file the first node reads).
const TOKEN: &str = "infermesh-demo-admin-token";

/// Longest the tier may take to come up and agree.
const START_LIMIT: Duration = Duration::from_secs(60);

/// How often start-up conditions are polled.
const POLL: Duration = Duration::from_millis(100);

/// When this process was started as a node (`infermesh-demo node ARGS…`), runs it with
/// `ARGS` as the `infermesh` command line and returns its exit code; `None` otherwise.
///
/// A node started by the demo exits by itself when the demo dies without killing it (its
/// parent changes), so not even a SIGKILLed demo leaves nodes behind.
pub fn node_process() -> Option<ExitCode> {
    use clap::Parser as _;
    let mut args = std::env::args_os();
    let _me = args.next();
    if args.next().as_deref() != Some(std::ffi::OsStr::new(NODE_ARG)) {
        return None;
    }
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(250));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(1);
            }
        }
    });
    let argv = std::iter::once(OsString::from("infermesh")).chain(args);
    Some(infermesh_node::cli::run(
        infermesh_node::cli::Cli::parse_from(argv),
    ))
}

/// A TCP port free on 127.0.0.1 a moment ago (the nodes and Envoy need numbers up front:
/// seeds, joins and the Envoy bootstrap name them).
fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A UDP port free on 127.0.0.1 a moment ago (gossip and the QUIC mesh).
fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// A child process killed (SIGKILL) and reaped when dropped, its output in a log file.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it was started, not killed, and has not exited.
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One infermesh node process and its addresses.
#[derive(Debug)]
pub struct Node {
    /// `n1`, `n2`, `n3`.
    pub name: String,
    /// Its standalone OpenAI-compatible proxy.
    pub proxy: SocketAddr,
    /// Its ext_proc and ADS gRPC server.
    pub ext_proc: SocketAddr,
    /// Its Prometheus `/metrics`.
    pub metrics: SocketAddr,
    /// Its admin API.
    pub admin: SocketAddr,
    proc: Proc,
}

/// Where the tier's clients send requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Envoy's pool listener (from the nodes over ADS), ext_proc to every node.
    Envoy(SocketAddr),
    /// The nodes' own proxies, spread over by a health-checked L4 balancer.
    Proxies(Vec<SocketAddr>),
}

/// Three nodes (and Envoy when installed) on 127.0.0.1, all killed on drop.
pub struct Tier {
    /// Nodes in start order; `nodes[0]` bootstrapped Raft, the others joined through it.
    pub nodes: Vec<Node>,
    /// Where clients send requests.
    pub entry: Entry,
    envoy: Option<Proc>,
    /// Dropped last: the processes writing into it are dead by then.
    dir: tempfile::TempDir,
}

impl Drop for Tier {
    fn drop(&mut self) {
        // Envoy first, so it does not log the nodes' deaths; fields drop after this.
        if let Some(e) = self.envoy.as_mut() {
            e.kill();
        }
        for n in &mut self.nodes {
            n.proc.kill();
        }
    }
}

/// The InferencePool file every node reads: the in-process simulated pods.
fn pool_yaml(pods: &[SocketAddr], model: &str) -> String {
    let mut s = format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata:\n  name: demo\nspec:\n  targetPorts:\n  - number: 8000\n  selector:\n    matchLabels:\n      app: sim\nmodels:\n- {model}\npods:\n"
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

/// The Envoy binary: `$ENVOY_BIN` when it names a file, else what the test kit finds (the
/// project's `.venv-test`); `None` when Envoy is not installed.
pub fn envoy_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            eprintln!(
                "ENVOY_BIN={} is not a file: going without Envoy",
                p.display()
            );
            return None;
        }
        return Some(p);
    }
    // The test kit panics when it finds no Envoy; that is an answer here, not a failure,
    // so its message stays off the terminal.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(infermesh_testkit::envoy::envoy_bin).ok();
    std::panic::set_hook(hook);
    found.filter(|p| p.is_file())
}

impl Tier {
    /// Starts the nodes (n1 bootstraps Raft, n2 and n3 join through its admin API) and,
    /// with `envoy`, an Envoy bootstrapped over ADS from all three; returns once every
    /// node sees the others, agrees on the Raft leader, has every pod up, and a request
    /// through each entry point succeeds.
    pub async fn start(
        pods: &[SocketAddr],
        model: &str,
        envoy: Option<&Path>,
    ) -> anyhow::Result<Tier> {
        let dir = tempfile::Builder::new()
            .prefix("infermesh-demo-")
            .tempdir()
            .context("creating the demo's directory")?;
        let root = dir.path().to_owned();
        std::fs::write(root.join("pool.yaml"), pool_yaml(pods, model))?;
        std::fs::write(root.join("cluster.key"), "infermesh-demo-cluster-key-0123")?;
        std::fs::write(root.join("tokens"), format!("{TOKEN}\n"))?;
        let me = std::env::current_exe().context("locating this executable")?;
        let listener = free_tcp()?;
        let mut tier = Tier {
            nodes: Vec::new(),
            entry: Entry::Proxies(Vec::new()),
            envoy: None,
            dir,
        };
        let addrs: Vec<(SocketAddr, SocketAddr)> = (0..NODES)
            .map(|_| Ok((free_udp()?, free_udp()?)))
            .collect::<anyhow::Result<_>>()?;
        let deadline = Instant::now() + START_LIMIT;
        for (i, &(gossip, mesh)) in addrs.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let (proxy, ext_proc) = (free_tcp()?, free_tcp()?);
            let (metrics, admin) = (free_tcp()?, free_tcp()?);
            let seeds: Vec<String> = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (g, _))| g.to_string())
                .collect();
            let role: Vec<OsString> = if i == 0 {
                vec![
                    "--bootstrap".into(),
                    "--admin-token-file".into(),
                    root.join("tokens").into(),
                ]
            } else {
                vec![
                    "--join".into(),
                    format!("http://{}", tier.nodes[0].admin).into(),
                ]
            };
            let mut cmd = Command::new(&me);
            cmd.args([NODE_ARG, "serve", "--node-name", &name])
                .args(["--ext-proc-addr", &ext_proc.to_string()])
                .args(["--proxy-addr", &proxy.to_string()])
                .args(["--metrics-addr", &metrics.to_string()])
                .args(["--admin-addr", &admin.to_string()])
                .args(["--gossip-addr", &gossip.to_string()])
                .args(["--mesh-addr", &mesh.to_string()])
                .args(["--seeds", &seeds.join(",")])
                .args(["--xds-listener", &listener.to_string()])
                .arg("--cluster-key-file")
                .arg(root.join("cluster.key"))
                .arg("--endpoints")
                .arg(root.join("pool.yaml"))
                .arg("--data-dir")
                .arg(root.join(&name))
                .args(role);
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
            let proc = Proc::spawn(cmd, root.join(format!("{name}.log")))?;
            tier.nodes.push(Node {
                name,
                proxy,
                ext_proc,
                metrics,
                admin,
                proc,
            });
            // n2 and n3 join through n1's admin API: it must answer first.
            tier.wait_admin(i, deadline).await?;
        }
        if let Some(bin) = envoy {
            tier.start_envoy(bin)?;
            tier.entry = Entry::Envoy(listener);
        } else {
            tier.entry = Entry::Proxies(tier.nodes.iter().map(|n| n.proxy).collect());
        }
        tier.wait_converged(pods.len(), model, deadline).await?;
        Ok(tier)
    }

    fn start_envoy(&mut self, bin: &Path) -> anyhow::Result<()> {
        let xds = self.nodes.iter().map(|n| n.ext_proc.to_string()).collect();
        let mut opts = infermesh_xds::BootstrapOptions::new("infermesh-demo", xds);
        opts.admin = free_tcp()?;
        let bootstrap = infermesh_xds::envoy_bootstrap(&opts)?;
        let path = self.dir.path().join("envoy-bootstrap.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&bootstrap)?)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&path)
            .args(["--use-dynamic-base-id", "-l", "warning"])
            .args(["--concurrency", "1", "--drain-time-s", "1"]);
        self.envoy = Some(Proc::spawn(cmd, self.dir.path().join("envoy.log"))?);
        Ok(())
    }

    /// SIGKILLs node `i` (no drain, no goodbye: its sockets just close).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].proc.kill();
    }

    /// Waits until node `i`'s admin API answers.
    async fn wait_admin(&mut self, i: usize, deadline: Instant) -> anyhow::Result<()> {
        let client = admin_client(self.nodes[i].admin)?;
        loop {
            if client
                .call(http::Method::GET, "/v1/cluster/status", None)
                .await
                .is_ok()
            {
                return Ok(());
            }
            let node = &mut self.nodes[i];
            if !node.proc.running() || Instant::now() > deadline {
                bail!(
                    "node {} did not come up; its log ends:\n{}",
                    node.name,
                    node.proc.log_tail(20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until [`Tier::disagreement`] finds nothing, or fails naming the last one.
    async fn wait_converged(
        &mut self,
        pods: usize,
        model: &str,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        loop {
            let last = match self.disagreement(pods, model).await {
                None => return Ok(()),
                Some(last) => last,
            };
            let mut dead: Vec<String> = Vec::new();
            for n in &mut self.nodes {
                if !n.proc.running() {
                    dead.push(format!("{} exited:\n{}", n.name, n.proc.log_tail(20)));
                }
            }
            if let Some(e) = self.envoy.as_mut()
                && !e.running()
            {
                dead.push(format!("Envoy exited:\n{}", e.log_tail(20)));
            }
            if !dead.is_empty() || Instant::now() > deadline {
                bail!(
                    "the tier did not come up within {START_LIMIT:?}: {last}\n{}",
                    dead.join("\n")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// What is not yet as it should be after start-up (`None`: all of it is).
    async fn disagreement(&self, pods: usize, model: &str) -> Option<String> {
        let mut leaders = BTreeSet::new();
        for n in &self.nodes {
            let name = &n.name;
            let Ok(client) = admin_client(n.admin) else {
                return Some(format!("{name}: bad admin address"));
            };
            let status = match client
                .call(http::Method::GET, "/v1/cluster/status", None)
                .await
            {
                Ok(s) => s,
                Err(e) => return Some(format!("{name}: cluster status: {e}")),
            };
            let members = status["raft"]["members"].as_array().map_or(0, Vec::len);
            if members != NODES {
                return Some(format!("{name}: {members} Raft members"));
            }
            match status["raft"]["leader"].as_u64() {
                Some(l) => leaders.insert(l),
                None => return Some(format!("{name}: no Raft leader")),
            };
            let text = match get(n.metrics, "/metrics").await {
                Some(t) => t,
                None => return Some(format!("{name}: no /metrics")),
            };
            let mesh = metric_sum(&text, "infermesh_mesh_members") as usize;
            if mesh != NODES {
                return Some(format!("{name}: {mesh} mesh members"));
            }
            let up = metric_sum(&text, "infermesh_endpoint_up") as usize;
            if up != pods {
                return Some(format!("{name}: {up} of {pods} pods up"));
            }
        }
        if leaders.len() != 1 {
            return Some(format!("nodes disagree on the Raft leader: {leaders:?}"));
        }
        let entries = match &self.entry {
            Entry::Envoy(l) => vec![*l],
            Entry::Proxies(p) => p.clone(),
        };
        for e in entries {
            if let Err(why) = completion(e, model).await {
                return Some(format!("a request through {e}: {why}"));
            }
        }
        None
    }
}

fn admin_client(addr: SocketAddr) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::new(
        &format!("http://{addr}"),
        Some(TOKEN.to_owned()),
    )?)
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    match tokio::time::timeout(
        Duration::from_secs(1),
        infermesh_testkit::net::http_get(addr, path),
    )
    .await
    {
        Ok(Ok((200, body))) => Some(body),
        _ => None,
    }
}

/// One tiny non-streamed completion over a fresh connection: `Err` says why it failed.
async fn completion(addr: SocketAddr, model: &str) -> Result<(), String> {
    let body = format!(r#"{{"model":"{model}","prompt":"ping","max_tokens":1}}"#);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: demo\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match tokio::time::timeout(Duration::from_secs(2), exchange).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no answer within 2 s".into()),
    };
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).unwrap_or("none");
    if status == "200" {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_every_series_of_one_name_only() {
        let text = "# HELP x\ninfermesh_endpoint_up{endpoint=\"a\"} 1\ninfermesh_endpoint_up{endpoint=\"b\"} 1\ninfermesh_endpoint_up_total 5\ninfermesh_mesh_members 3\n";
        assert_eq!(metric_sum(text, "infermesh_endpoint_up"), 2.0);
        assert_eq!(metric_sum(text, "infermesh_mesh_members"), 3.0);
    }

    #[test]
    fn pool_yaml_lists_every_pod_with_its_port() {
        let y = pool_yaml(
            &[
                "127.0.0.1:4001".parse().unwrap(),
                "127.0.0.1:4002".parse().unwrap(),
            ],
            "m",
        );
        assert!(y.contains("- m\n"), "{y}");
        assert!(
            y.contains("address: 127.0.0.1\n  targetPorts: [{number: 4002}]"),
            "{y}"
        );
    }
}
