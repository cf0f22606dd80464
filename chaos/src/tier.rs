//! The system under test: infermesh nodes meshed and in one Raft cluster, simulated vLLM
//! pods (one process each, so one can be killed or hung alone) and an Envoy that takes
//! its listener and ext_proc cluster from the nodes over ADS. Every process is on its own
//! [`Host`], with fixed ports, so a restarted process comes back at the same address.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use infermesh_node::admin::client::AdminClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::net::{Host, Network};

/// Port of every node's ext_proc + ADS gRPC server.
pub const EXT_PROC_PORT: u16 = 9002;
/// Port of every node's admin API.
pub const ADMIN_PORT: u16 = 9191;
/// Port of every node's standalone proxy.
pub const PROXY_PORT: u16 = 8080;
/// Port of every node's /metrics.
pub const METRICS_PORT: u16 = 9090;
/// UDP port of gossip.
pub const GOSSIP_PORT: u16 = 7946;
/// UDP port of the QUIC mesh.
pub const MESH_PORT: u16 = 7947;
/// Port of every simulated pod.
pub const POD_PORT: u16 = 8000;
/// Port of Envoy's pool listener.
pub const LISTENER_PORT: u16 = 10000;
/// Admin-API bearer token of the run.
pub const TOKEN: &str = "chaos-admin-token-0123";
/// Model the pods serve.
pub const MODEL: &str = "chaos-model";

/// Binaries the suite starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `infermesh`.
    pub infermesh: PathBuf,
    /// `infermesh-sim`.
    pub sim: PathBuf,
    /// Envoy, if installed.
    pub envoy: Option<PathBuf>,
}

impl Binaries {
    /// `infermesh` and `infermesh-sim` next to this executable; Envoy from `$ENVOY_BIN` or
    /// the project's test venv.
    pub fn beside_self() -> Result<Binaries> {
        let me = std::env::current_exe()?;
        let dir = me.parent().context("executable directory")?;
        let infermesh = dir.join("infermesh");
        let sim = dir.join("infermesh-sim");
        for b in [&infermesh, &sim] {
            if !b.is_file() {
                bail!(
                    "{} not found: build it first (cargo build --release -p infermesh-node -p infermesh-sim)",
                    b.display()
                );
            }
        }
        let envoy = std::panic::catch_unwind(infermesh_testkit::envoy::envoy_bin).ok();
        Ok(Binaries {
            infermesh,
            sim,
            envoy,
        })
    }
}

/// One process of the tier.
#[derive(Debug)]
pub struct Proc {
    /// Host it runs on.
    pub host: Host,
    child: Option<Child>,
    paused: bool,
    log: PathBuf,
}

impl Proc {
    fn spawn(host: &Host, mut cmd: std::process::Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc {
            host: host.clone(),
            child: Some(child),
            paused: false,
            log,
        })
    }

    /// Whether it is started and not killed.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it was started and has exited on its own.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Whether it is stopped by SIGSTOP.
    pub fn paused(&self) -> bool {
        self.paused
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGTERM, then reap within `grace` (SIGKILL after).
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Some(c) = self.child.as_mut()
                    && matches!(c.try_wait(), Ok(Some(_)))
                {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// SIGSTOP: the process stops answering, its sockets stay open.
    pub fn pause(&mut self) -> Result<()> {
        let pid = self
            .pid()
            .context("pausing a process that is not running")?;
        kill(pid, Signal::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> Result<()> {
        let pid = self
            .pid()
            .context("resuming a process that is not running")?;
        kill(pid, Signal::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
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

/// An infermesh node of the tier.
#[derive(Debug)]
pub struct NodeProc {
    /// `n1`, `n2`, …
    pub name: String,
    /// The process (restartable).
    pub proc: Proc,
    /// Its Raft data directory.
    pub data_dir: PathBuf,
    /// Address Envoy is given for its ext_proc (a delay relay, when one is in front).
    pub advertise: SocketAddr,
}

impl NodeProc {
    /// Its IP.
    pub fn ip(&self) -> IpAddr {
        self.proc.host.ip
    }
    /// Its admin API.
    pub fn admin(&self) -> String {
        format!("http://{}", SocketAddr::new(self.ip(), ADMIN_PORT))
    }
    /// Its proxy.
    pub fn proxy(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), PROXY_PORT)
    }
    /// Its /metrics.
    pub fn metrics(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), METRICS_PORT)
    }
    /// Its ext_proc / ADS address.
    pub fn grpc(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), EXT_PROC_PORT)
    }
    /// An admin client with the run's token.
    pub fn client(&self) -> AdminClient {
        AdminClient::new(&self.admin(), Some(TOKEN.to_owned())).expect("valid admin address")
    }
}

/// One simulated pod on `host` (seconds of simulated work take 1/20 s).
fn spawn_pod(bins: &Binaries, host: &Host, i: usize, dir: &Path) -> Result<Proc> {
    let mut cmd = host.command(&bins.sim);
    cmd.args(["--pods", "1", "--host"])
        .arg(host.ip.to_string())
        .args(["--base-port", &POD_PORT.to_string()])
        .args(["--model", MODEL, "--profile", "llama-8b-h100"])
        .args(["--time-scale", "20", "--seed", &i.to_string()]);
    Proc::spawn(host, cmd, dir.join(format!("pod{i}.log")))
}

/// The whole tier of one run.
pub struct Tier {
    /// Binaries.
    pub bins: Binaries,
    /// Run directory (logs, data, config).
    pub dir: PathBuf,
    /// Nodes in start order; `nodes[0]` bootstrapped Raft.
    pub nodes: Vec<NodeProc>,
    /// Pods.
    pub pods: Vec<Proc>,
    /// The Envoys (none when Envoy is not installed).
    pub envoys: Vec<Proc>,
    envoy_hosts: Vec<Host>,
    /// The Envoy listener address the nodes serve over LDS.
    listener: SocketAddr,
    /// Envoy gets the plain ADS bootstrap (no keepalives or health checks): the baseline.
    pub plain_ads: bool,
}

/// Sizes of a tier.
#[derive(Debug, Clone, Copy)]
pub struct TierSize {
    /// infermesh nodes.
    pub nodes: usize,
    /// Simulated pods.
    pub pods: usize,
    /// Envoys (one on loopback: they would share the listener port).
    pub envoys: usize,
}

impl TierSize {
    /// Host names a tier of this size needs (plus the driver's `client`).
    pub fn host_names(&self) -> Vec<String> {
        let mut v: Vec<String> = (1..=self.nodes).map(|i| format!("n{i}")).collect();
        v.extend((0..self.pods).map(|i| format!("pod{i}")));
        v.extend((1..=self.envoys).map(|i| format!("envoy{i}")));
        v.push("client".into());
        v
    }
}

impl Tier {
    /// Starts pods, nodes (Raft bootstrapped on the first, the rest joined) and Envoy, and
    /// waits until the mesh, Raft and Envoy's listener are all up.
    pub async fn start(
        bins: Binaries,
        net: &Network,
        size: TierSize,
        dir: &Path,
        plain_ads: bool,
        advertise: impl Fn(usize) -> Option<SocketAddr>,
    ) -> Result<Tier> {
        std::fs::write(dir.join("key"), "chaos-cluster-key-0123456789abcdef")?;
        std::fs::write(dir.join("tokens"), format!("{TOKEN}\n"))?;
        let mut pods = Vec::new();
        let mut pool = format!(
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata:\n  name: chaos\nspec:\n  targetPorts:\n  - number: {POD_PORT}\n  selector:\n    matchLabels:\n      app: sim\nmodels:\n- {MODEL}\npods:\n"
        );
        for i in 0..size.pods {
            let host = net.host(&format!("pod{i}"));
            pods.push(spawn_pod(&bins, host, i, dir)?);
            pool.push_str(&format!(
                "- name: pod{i}\n  address: {}\n  targetPorts: [{{number: {POD_PORT}}}]\n  labels: {{app: sim}}\n",
                host.ip
            ));
        }
        std::fs::write(dir.join("pool.yaml"), pool)?;
        let envoy_hosts: Vec<Host> = (1..=size.envoys)
            .map(|i| net.host(&format!("envoy{i}")).clone())
            .collect();
        // One LDS listener serves every Envoy: on the wildcard address when each has its
        // own namespace, on the only Envoy's address on loopback.
        let listener = match net.mode {
            crate::net::Mode::Netns => SocketAddr::from(([0, 0, 0, 0], LISTENER_PORT)),
            crate::net::Mode::Loopback => SocketAddr::new(envoy_hosts[0].ip, LISTENER_PORT),
        };
        let mut tier = Tier {
            bins,
            dir: dir.to_owned(),
            nodes: Vec::new(),
            pods,
            envoys: Vec::new(),
            envoy_hosts,
            listener,
            plain_ads,
        };
        for i in 0..size.nodes {
            let name = format!("n{}", i + 1);
            let host = net.host(&name).clone();
            let advertise = advertise(i).unwrap_or(SocketAddr::new(host.ip, EXT_PROC_PORT));
            let data_dir = dir.join(&name).join("data");
            std::fs::create_dir_all(dir.join(&name))?;
            let role = if i == 0 {
                vec![
                    "--bootstrap".to_owned(),
                    "--admin-token-file".to_owned(),
                    dir.join("tokens").display().to_string(),
                ]
            } else {
                vec!["--join".to_owned(), tier.nodes[0].admin()]
            };
            let proc = tier.spawn_node(&host, &name, &data_dir, advertise, &role)?;
            tier.nodes.push(NodeProc {
                name,
                proc,
                data_dir,
                advertise,
            });
            // Joins go through the first node's admin API: wait for it before the next.
            tier.wait_admin(i, Duration::from_secs(60)).await?;
        }
        if let Some(envoy) = tier.bins.envoy.clone() {
            for i in 0..size.envoys {
                tier.start_envoy(i, &envoy)?;
            }
        }
        Ok(tier)
    }

    fn spawn_node(
        &self,
        host: &Host,
        name: &str,
        data_dir: &Path,
        advertise: SocketAddr,
        role: &[String],
    ) -> Result<Proc> {
        let ip = host.ip;
        let seeds: Vec<String> = (1..=8)
            .map(|j| format!("n{j}"))
            .filter(|n| n != name)
            .filter_map(|n| self.nodes.iter().find(|x| x.name == n))
            .map(|x| SocketAddr::new(x.ip(), GOSSIP_PORT).to_string())
            .collect();
        let mut cmd = host.command(&self.bins.infermesh);
        cmd.args(["serve", "--node-name", name])
            .arg("--ext-proc-addr")
            .arg(SocketAddr::new(ip, EXT_PROC_PORT).to_string())
            .arg("--advertise-ext-proc-addr")
            .arg(advertise.to_string())
            .arg("--proxy-addr")
            .arg(SocketAddr::new(ip, PROXY_PORT).to_string())
            .arg("--metrics-addr")
            .arg(SocketAddr::new(ip, METRICS_PORT).to_string())
            .arg("--admin-addr")
            .arg(SocketAddr::new(ip, ADMIN_PORT).to_string())
            .arg("--gossip-addr")
            .arg(SocketAddr::new(ip, GOSSIP_PORT).to_string())
            .arg("--mesh-addr")
            .arg(SocketAddr::new(ip, MESH_PORT).to_string())
            .arg("--xds-listener")
            .arg(self.listener.to_string())
            .arg("--endpoints")
            .arg(self.dir.join("pool.yaml"))
            .arg("--cluster-key-file")
            .arg(self.dir.join("key"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(role)
            .env("RUST_LOG", "warn");
        if !seeds.is_empty() {
            cmd.arg("--seeds").arg(seeds.join(","));
        }
        Proc::spawn(host, cmd, self.dir.join(format!("{name}.log")))
    }

    /// Restarts pod `i` (killed before).
    pub fn restart_pod(&mut self, i: usize) -> Result<()> {
        let host = self.pods[i].host.clone();
        self.pods[i] = spawn_pod(&self.bins, &host, i, &self.dir)?;
        Ok(())
    }

    /// Restarts node `i` (killed or terminated before) on its data directory.
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let proc = self.spawn_node(&n.proc.host, &n.name, &n.data_dir, n.advertise, &[])?;
        self.nodes[i].proc = proc;
        self.wait_admin(i, Duration::from_secs(60)).await
    }

    /// Waits until node `i`'s admin API answers.
    pub async fn wait_admin(&self, i: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let client = self.nodes[i].client();
        loop {
            if client
                .call(http::Method::GET, "/v1/cluster/status", None)
                .await
                .is_ok()
            {
                return Ok(());
            }
            if !self.nodes[i].proc.running() || Instant::now() > deadline {
                bail!(
                    "node {} did not come up:\n{}",
                    self.nodes[i].name,
                    self.nodes[i].proc.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts (or restarts) Envoy `i` with the tier's ADS bootstrap.
    pub fn start_envoy(&mut self, i: usize, bin: &Path) -> Result<()> {
        let host = self.envoy_hosts[i].clone();
        let xds: Vec<String> = self.nodes.iter().map(|n| n.grpc().to_string()).collect();
        let mut opts = infermesh_xds::BootstrapOptions::new(format!("chaos-{}", host.name), xds);
        opts.admin = SocketAddr::new(host.ip, 9901);
        opts.stall_detection = !self.plain_ads;
        let bootstrap = infermesh_xds::envoy_bootstrap(&opts)?;
        let path = self.dir.join(format!("{}-bootstrap.json", host.name));
        std::fs::write(&path, serde_json::to_vec_pretty(&bootstrap)?)?;
        let mut cmd = host.command(bin);
        cmd.arg("-c")
            .arg(&path)
            .args(["--use-dynamic-base-id", "-l", "warning"])
            .args(["--concurrency", "1", "--drain-time-s", "1"]);
        let proc = Proc::spawn(&host, cmd, self.dir.join(format!("{}.log", host.name)))?;
        if i < self.envoys.len() {
            self.envoys[i] = proc;
        } else {
            self.envoys.push(proc);
        }
        Ok(())
    }

    /// Every Envoy's pool listener.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        self.envoys
            .iter()
            .map(|e| SocketAddr::new(e.host.ip, LISTENER_PORT))
            .collect()
    }

    /// Node ids of the Envoys.
    pub fn envoy_ids(&self) -> Vec<String> {
        self.envoy_hosts
            .iter()
            .take(self.envoys.len())
            .map(|h| format!("chaos-{}", h.name))
            .collect()
    }

    /// Index of the node named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }
}
