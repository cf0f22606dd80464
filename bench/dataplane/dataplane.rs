//! Data-plane benchmark of one infermesh node on this machine (run by `bench/dataplane/run.sh`).
//!
//! Measures, against zero-latency simulated vLLM pods served from this process:
//! 1. the latency the ext_proc hop adds: Envoy + ext_proc → infermesh vs Envoy with a
//!    static route to the same pods (one connection, so no queueing: p50/p99 per request),
//!    next to the same exchange with a processor that does no work (`extproc-null`), over
//!    several rounds that interleave the paths;
//! 2. the most requests/s one node schedules through Envoy and through the standalone
//!    proxy, next to `sglang-router` and `vllm-router` (cache_aware) on the same pods in
//!    the same run, with each router's CPU per request from /proc;
//! 3. the CPU the metrics fetcher costs with 100 pods scraped every 50 ms (idle node).
//!
//! Load comes from `wrk`; every figure in the report is measured in this run.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};

#[derive(Debug, Parser)]
struct Args {
    /// Seconds of load per measurement (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// wrk connections for the throughput runs.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Simulated pods for the latency and throughput runs.
    #[arg(long, default_value_t = 8)]
    pods: usize,
    /// Pods for the scrape-cost run.
    #[arg(long, default_value_t = 100)]
    scrape_pods: usize,
    /// Seconds the idle node is watched for the scrape-cost run.
    #[arg(long, default_value_t = 20)]
    scrape_window: u64,
    /// Envoy binary.
    #[arg(long)]
    envoy: PathBuf,
    /// Directory with `sglang-router` and `vllm-router` (a venv's bin/); absent = skip peers.
    #[arg(long)]
    routers: Option<PathBuf>,
    /// Rounds of the latency runs (each round measures every path once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the markdown report goes.
    #[arg(long)]
    out: PathBuf,
    /// Measure only the standalone proxy against the do-nothing forwarder (`--rounds`
    /// alternated rounds) and print the ratio; no report is written. For iterating on the
    /// proxy's cost.
    #[arg(long)]
    only_proxy: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn repo_root() -> PathBuf {
    // This program is built by bench/e2e: the repository is two levels up.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("bench/e2e sits two levels below the repository root")
        .to_path_buf()
}

/// A child process killed (with its process group) on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(log)?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole group: console scripts may have started the real binary as a child.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &group])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &group])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("{} needed SIGKILL", self.name);
    }
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) used so far by `pid` and its direct children.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |p: &str| -> Option<(u64, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ppid: u32 = f.get(1)?.parse().ok()?;
        Some((
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
            ppid,
        ))
    };
    let mut total = ticks(&pid.to_string()).map_or(0, |t| t.0);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.bytes().all(|b| b.is_ascii_digit())
                && let Some((t, ppid)) = ticks(&name)
                && ppid == pid
            {
                total += t;
            }
        }
    }
    total as f64 / clk_tck()
}

/// What one wrk run measured.
#[derive(Debug, Clone, Default)]
struct WrkResult {
    rps: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
    cpu_us_per_req: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `median (min–max)` of per-round figures in µs.
fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} µs ({lo:.0}–{hi:.0})", median(v))
}

/// Each round's requests/s, in order.
fn rounds_rps(runs: &[WrkResult]) -> String {
    let v: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.rps)).collect();
    v.join(", ")
}

/// Field-wise median of several runs of one path.
fn median_result(runs: &[WrkResult]) -> WrkResult {
    let m = |f: fn(&WrkResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let cpu: Vec<f64> = runs.iter().filter_map(|r| r.cpu_us_per_req).collect();
    WrkResult {
        rps: m(|r| r.rps),
        p50_us: m(|r| r.p50_us),
        p90_us: m(|r| r.p90_us),
        p99_us: m(|r| r.p99_us),
        requests: runs.iter().map(|r| r.requests).sum(),
        non_2xx: runs.iter().map(|r| r.non_2xx).sum(),
        socket_errors: runs.iter().map(|r| r.socket_errors).sum(),
        cpu_us_per_req: (!cpu.is_empty()).then(|| median(&cpu)),
    }
}

fn parse_latency(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut in_dist = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let parts: Vec<&str> = t.split_whitespace().collect();
            match parts.as_slice() {
                ["50%", v] => r.p50_us = parse_latency(v).unwrap_or(f64::NAN),
                ["90%", v] => r.p90_us = parse_latency(v).unwrap_or(f64::NAN),
                ["99%", v] => {
                    r.p99_us = parse_latency(v).unwrap_or(f64::NAN);
                    in_dist = false;
                }
                ["75%", _] => {}
                _ => in_dist = false,
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse()?;
        }
        if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse()?;
        }
        if let Some(v) = t.strip_prefix("Socket errors:") {
            r.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
        if t.contains("requests in") {
            r.requests = t
                .split_whitespace()
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0);
        }
    }
    if r.rps == 0.0 {
        bail!("wrk reported no throughput:\n{out}");
    }
    Ok(r)
}

fn wrk_script(dir: &Path, model: &str) -> anyhow::Result<PathBuf> {
    // 64 distinct ~4 KB prompts in 16 shared-prefix groups, like a multi-tenant fleet.
    let script = format!(
        r#"local bodies = {{}}
local n = 64
local i = 0
init = function(args)
  for k = 1, n do
    local prefix = string.rep("tenant " .. (k % 16) .. " shared instructions. ", 130)
    bodies[k] = '{{"model":"{model}","prompt":"' .. prefix .. 'question ' .. k .. '","max_tokens":1}}'
  end
end
request = function()
  i = i % n + 1
  return wrk.format("POST", "/v1/completions", {{["Content-Type"] = "application/json"}}, bodies[i])
end
"#
    );
    let p = dir.join("completions.lua");
    std::fs::write(&p, script)?;
    Ok(p)
}

fn run_wrk(
    script: &Path,
    target: SocketAddr,
    threads: usize,
    connections: usize,
    secs: u64,
    cpu_pid: Option<u32>,
) -> anyhow::Result<WrkResult> {
    let url = format!("http://{target}");
    let args = |d: u64| {
        let mut c = Command::new("wrk");
        c.args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{d}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(&url);
        c
    };
    // Warm-up: connections, pools and caches.
    let warm = args(2)
        .output()
        .context("running wrk (apt-get install -y wrk)")?;
    if !warm.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&warm.stderr));
    }
    let cpu0 = cpu_pid.map(cpu_seconds);
    let out = args(secs).output()?;
    let cpu1 = cpu_pid.map(cpu_seconds);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = parse_wrk(&text)?;
    eprintln!(
        "  {target} c={connections}: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs",
        r.rps, r.p50_us, r.p99_us
    );
    if let (Some(a), Some(b)) = (cpu0, cpu1)
        && r.requests > 0
    {
        r.cpu_us_per_req = Some((b - a) * 1e6 / r.requests as f64);
    }
    Ok(r)
}

async fn post_ok(addr: SocketAddr, model: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(r#"{{"model":"{model}","prompt":"ready?","max_tokens":1}}"#);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

async fn wait_serving(
    addr: SocketAddr,
    model: &str,
    limit: Duration,
    proc_: &mut Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !proc_.alive() {
            bail!("{} exited", proc_.name);
        }
        if post_ok(addr, model).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{} did not serve a completion within {limit:?}", proc_.name)
}

fn pool_file(dir: &Path, addrs: &[SocketAddr], model: &str) -> anyhow::Result<PathBuf> {
    let mut y = format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {{name: bench}}\n\
         spec: {{selector: {{matchLabels: {{app: sim}}}}, targetPorts: [{{number: 8000}}]}}\n\
         models: [\"{model}\"]\npods:\n"
    );
    for (i, a) in addrs.iter().enumerate() {
        let _ = writeln!(
            y,
            "- {{name: sim-{i}, address: {}, labels: {{app: sim}}, targetPorts: [{{number: {}}}]}}",
            a.ip(),
            a.port()
        );
    }
    let p = dir.join(format!("pool-{}.yaml", addrs.len()));
    std::fs::write(&p, y)?;
    Ok(p)
}

struct Node {
    proc_: Proc,
    ext_proc: SocketAddr,
    proxy: SocketAddr,
}

fn start_node(bin: &Path, pool: &Path, dir: &Path, tag: &str) -> anyhow::Result<Node> {
    let ext_proc = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(bin);
    cmd.env("RUST_LOG", "warn")
        .arg("serve")
        .arg("--endpoints")
        .arg(pool)
        .args([
            "--ext-proc-addr",
            &ext_proc.to_string(),
            "--proxy-addr",
            &proxy.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
        ]);
    let proc_ = Proc::spawn(
        "infermesh",
        &mut cmd,
        &dir.join(format!("infermesh-{tag}.log")),
    )?;
    Ok(Node {
        proc_,
        ext_proc,
        proxy,
    })
}

fn envoy_config(template: &str, listen: u16, admin: u16) -> String {
    template
        .replace("${LISTEN_PORT}", &listen.to_string())
        .replace("${ADMIN_PORT}", &admin.to_string())
}

fn start_envoy(
    bin: &Path,
    cfg: String,
    dir: &Path,
    tag: &str,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let listen = free_port();
    let text = envoy_config(&cfg, listen, free_port());
    let path = dir.join(format!("envoy-{tag}.yaml"));
    std::fs::write(&path, text)?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "--use-dynamic-base-id",
        "--log-level",
        "error",
        "--concurrency",
        "2",
        "-c",
    ])
    .arg(&path);
    let p = Proc::spawn(
        &format!("envoy ({tag})"),
        &mut cmd,
        &dir.join(format!("envoy-{tag}.log")),
    )?;
    Ok((p, SocketAddr::from(([127, 0, 0, 1], listen))))
}

fn fmt_us(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0} µs")
    } else {
        "n/a".into()
    }
}

fn row(name: &str, r: &WrkResult) -> String {
    format!(
        "| {name} | {:.0} | {} | {} | {} | {} | {} |",
        r.rps,
        fmt_us(r.p50_us),
        fmt_us(r.p99_us),
        r.cpu_us_per_req
            .map_or("–".into(), |c| format!("{c:.0} µs")),
        r.non_2xx,
        r.socket_errors
    )
}

/// The proxy against its ceiling: a do-nothing forwarder on the same pods, alternated with
/// the proxy over `rounds` rounds so drift in the machine's load lands on both. Returns the
/// forwarder's runs and the proxy's.
async fn proxy_vs_forwarder(
    bin_dir: &Path,
    pods: &[SocketAddr],
    model: &str,
    script: &Path,
    (proxy, proxy_pid): (SocketAddr, u32),
    (secs, connections, rounds): (u64, usize, usize),
    logs: &Path,
) -> anyhow::Result<(Vec<WrkResult>, Vec<WrkResult>)> {
    let fwd_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let fwd_bin = bin_dir.join("forwarder");
    anyhow::ensure!(
        fwd_bin.exists(),
        "{} missing: build it with cargo build --release -p infermesh-e2e --bin forwarder",
        fwd_bin.display()
    );
    let pod_list: Vec<String> = pods.iter().map(ToString::to_string).collect();
    let mut fwd_cmd = Command::new(&fwd_bin);
    fwd_cmd
        .arg("--listen")
        .arg(fwd_addr.to_string())
        .arg("--pods")
        .arg(pod_list.join(","));
    let mut fwd_proc = Proc::spawn("forwarder", &mut fwd_cmd, &logs.join("forwarder.log"))?;
    wait_serving(fwd_addr, model, Duration::from_secs(30), &mut fwd_proc).await?;
    let mut fwd_runs = Vec::new();
    let mut proxy_runs = Vec::new();
    for _ in 0..rounds {
        let (s, c) = (secs, connections);
        fwd_runs.push(run_wrk(script, fwd_addr, 2, c, s, Some(fwd_proc.pid()))?);
        proxy_runs.push(run_wrk(script, proxy, 2, c, s, Some(proxy_pid))?);
    }
    Ok((fwd_runs, proxy_runs))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let load_before = loadavg();
    let dir = tempfile::Builder::new()
        .prefix("infermesh-dataplane-")
        .tempdir()?;
    let logs = dir.path();
    let exe = std::env::current_exe()?;
    // infermesh and extproc-null are built next to this program (target/release).
    let bin_dir = exe.parent().context("the program's path has a parent")?;
    let infermesh = bin_dir.join("infermesh");
    anyhow::ensure!(
        infermesh.exists(),
        "{} missing: build it with cargo build --release -p infermesh-node",
        infermesh.display()
    );

    let mut cfg = FleetConfig::new(args.pods);
    cfg.profile = EngineProfile::instant();
    let model = cfg.model.clone();
    let fleet = Fleet::start(cfg).await.context("starting simulated pods")?;
    let pods = fleet.addrs();
    let pool = pool_file(logs, &pods, &model)?;
    let script = wrk_script(logs, &model)?;
    let secs = args.duration;

    let mut node = start_node(&infermesh, &pool, logs, "main")?;
    wait_serving(node.proxy, &model, Duration::from_secs(30), &mut node.proc_).await?;
    if args.only_proxy {
        let (fwd, proxy) = proxy_vs_forwarder(
            bin_dir,
            &pods,
            &model,
            &script,
            (node.proxy, node.proc_.pid()),
            (secs, args.connections, args.rounds.max(1)),
            logs,
        )
        .await?;
        let (f, p) = (median_result(&fwd), median_result(&proxy));
        let cpu = |r: &WrkResult| {
            r.cpu_us_per_req
                .map_or("-".into(), |c| format!("{c:.1} µs"))
        };
        println!(
            "forwarder {:.0} req/s ({}; CPU/req {}), proxy {:.0} req/s ({}; CPU/req {}): \
             proxy/forwarder {:.2}× (median of {} alternated rounds; no report written)",
            f.rps,
            rounds_rps(&fwd),
            cpu(&f),
            p.rps,
            rounds_rps(&proxy),
            cpu(&p),
            p.rps / f.rps,
            fwd.len()
        );
        return Ok(());
    }
    let root = repo_root();
    let lb_endpoints = infermesh_testkit::envoy::lb_endpoints(&pods);
    let extproc_tpl = std::fs::read_to_string(root.join("deploy/envoy/envoy-extproc.yaml"))?
        .replace("${EXT_PROC_HOST}", "127.0.0.1")
        .replace("${EXT_PROC_PORT}", &node.ext_proc.port().to_string())
        .replace("${LB_ENDPOINTS}", &lb_endpoints);
    let static_tpl = std::fs::read_to_string(root.join("deploy/envoy/envoy-static.yaml"))?
        .replace("${LB_ENDPOINTS}", &lb_endpoints);
    let (mut envoy_x, envoy_x_addr) =
        start_envoy(&args.envoy, extproc_tpl.clone(), logs, "extproc")?;
    wait_serving(envoy_x_addr, &model, Duration::from_secs(30), &mut envoy_x).await?;
    // Control: the cheapest ext_proc exchange (headers only, one message, no body).
    let headers_only_tpl = extproc_tpl
        .replace(
            "request_body_mode: FULL_DUPLEX_STREAMED",
            "request_body_mode: NONE",
        )
        .replace(
            "response_body_mode: FULL_DUPLEX_STREAMED",
            "response_body_mode: NONE",
        )
        .replace("response_header_mode: SEND", "response_header_mode: SKIP")
        .replace("request_trailer_mode: SEND", "request_trailer_mode: SKIP")
        .replace("response_trailer_mode: SEND", "response_trailer_mode: SKIP");
    let (mut envoy_h, envoy_h_addr) =
        start_envoy(&args.envoy, headers_only_tpl, logs, "headers-only")?;
    wait_serving(envoy_h_addr, &model, Duration::from_secs(30), &mut envoy_h).await?;
    let (mut envoy_s, envoy_s_addr) = start_envoy(&args.envoy, static_tpl, logs, "static")?;
    wait_serving(envoy_s_addr, &model, Duration::from_secs(30), &mut envoy_s).await?;

    // The protocol's floor: Envoy + the cheapest full-duplex processor (bench/dataplane/null_extproc.rs).
    let null_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let null_bin = bin_dir.join("extproc-null");
    anyhow::ensure!(
        null_bin.exists(),
        "{} missing: build it with cargo build --release -p infermesh-e2e --bin extproc-null",
        null_bin.display()
    );
    let pod_list: Vec<String> = pods.iter().map(ToString::to_string).collect();
    let mut null_cmd = Command::new(&null_bin);
    null_cmd
        .arg("--listen")
        .arg(null_addr.to_string())
        .arg("--pods")
        .arg(pod_list.join(","));
    let null_proc = Proc::spawn(
        "extproc-null",
        &mut null_cmd,
        &logs.join("extproc-null.log"),
    )?;
    let null_tpl = std::fs::read_to_string(root.join("deploy/envoy/envoy-extproc.yaml"))?
        .replace("${EXT_PROC_HOST}", "127.0.0.1")
        .replace("${EXT_PROC_PORT}", &null_addr.port().to_string())
        .replace("${LB_ENDPOINTS}", &lb_endpoints);
    let (mut envoy_n, envoy_n_addr) = start_envoy(&args.envoy, null_tpl, logs, "null")?;
    wait_serving(envoy_n_addr, &model, Duration::from_secs(30), &mut envoy_n).await?;

    // 1. Latency, one connection. Every path is measured once per round, in turn, so drift in
    // the machine's other load lands on all of them alike; figures are medians over rounds.
    let rounds = args.rounds.max(1);
    eprintln!("latency: {rounds} rounds of 6 paths, {secs} s each ...");
    let im_pid = node.proc_.pid();
    let lat_paths: [(&str, SocketAddr, Option<u32>); 6] = [
        ("pod directly", pods[0], None),
        ("Envoy, static route", envoy_s_addr, None),
        (
            "Envoy + ext_proc → infermesh (FULL_DUPLEX_STREAMED)",
            envoy_x_addr,
            Some(im_pid),
        ),
        (
            "baseline: Envoy + ext_proc → minimal full-duplex processor (`extproc-null`)",
            envoy_n_addr,
            Some(null_proc.pid()),
        ),
        (
            "control: Envoy + ext_proc, headers only (1 message, random pick)",
            envoy_h_addr,
            Some(im_pid),
        ),
        ("infermesh standalone proxy", node.proxy, Some(im_pid)),
    ];
    let mut lat: Vec<Vec<WrkResult>> = vec![Vec::new(); lat_paths.len()];
    for _ in 0..rounds {
        for (i, (_, addr, pid)) in lat_paths.iter().enumerate() {
            lat[i].push(run_wrk(&script, *addr, 1, 1, secs, *pid)?);
        }
    }
    drop(envoy_h);
    drop(envoy_n);
    drop(null_proc);
    let [
        lat_pod,
        lat_static,
        lat_extproc,
        lat_null,
        lat_headers_only,
        lat_proxy,
    ] = std::array::from_fn(|i| median_result(&lat[i]));
    // Per round, against the static route measured in the same round.
    // Per-round differences between two paths (path minus base, same round).
    const STATIC: usize = 1;
    const INFERMESH: usize = 2;
    const NULL: usize = 3;
    const HEADERS_ONLY: usize = 4;
    let diff = |path: usize, base: usize, pick: fn(&WrkResult) -> f64| -> Vec<f64> {
        lat[path]
            .iter()
            .zip(&lat[base])
            .map(|(a, b)| pick(a) - pick(b))
            .collect()
    };
    let p50: fn(&WrkResult) -> f64 = |r| r.p50_us;
    let p99: fn(&WrkResult) -> f64 = |r| r.p99_us;
    let (add_x50, add_x99) = (diff(INFERMESH, STATIC, p50), diff(INFERMESH, STATIC, p99));
    let (add_n50, add_n99) = (diff(NULL, STATIC, p50), diff(NULL, STATIC, p99));
    let (add_h50, add_h99) = (
        diff(HEADERS_ONLY, STATIC, p50),
        diff(HEADERS_ONLY, STATIC, p99),
    );
    let (own50, own99) = (diff(INFERMESH, NULL, p50), diff(INFERMESH, NULL, p99));

    // 2. Throughput.
    eprintln!(
        "throughput runs ({secs} s each, {} connections) ...",
        args.connections
    );
    let c = args.connections;
    let tp_pods_direct = run_wrk(&script, pods[0], 2, c, secs, None)?;
    let tp_static = run_wrk(&script, envoy_s_addr, 2, c, secs, Some(envoy_s.pid()))?;
    let tp_extproc = run_wrk(&script, envoy_x_addr, 2, c, secs, Some(node.proc_.pid()))?;
    let tp_extproc_envoy_cpu = {
        // Envoy's own share in the ext_proc setup, measured in a second run.
        run_wrk(&script, envoy_x_addr, 2, c, secs, Some(envoy_x.pid()))?
    };
    // The proxy against its ceiling: a do-nothing forwarder on the same pods, alternated
    // with the proxy over two rounds so drift in the machine's load lands on both.
    let (tp_fwd_runs, tp_proxy_runs) = proxy_vs_forwarder(
        bin_dir,
        &pods,
        &model,
        &script,
        (node.proxy, node.proc_.pid()),
        (secs, c, 2),
        logs,
    )
    .await?;
    let tp_fwd = median_result(&tp_fwd_runs);
    let tp_proxy = median_result(&tp_proxy_runs);
    drop(envoy_x);
    drop(envoy_s);

    let worker_urls: Vec<String> = pods.iter().map(|a| format!("http://{a}")).collect();
    let mut peers: Vec<(String, Result<WrkResult, String>)> = Vec::new();
    if let Some(bin) = &args.routers {
        for (name, exe, sub) in [
            (
                "sglang-router (cache_aware)",
                "sglang-router",
                Some("launch"),
            ),
            ("vllm-router (cache_aware)", "vllm-router", None),
        ] {
            let port = free_port();
            let mut cmd = Command::new(bin.join(exe));
            if let Some(s) = sub {
                cmd.arg(s);
            }
            cmd.arg("--worker-urls").args(&worker_urls).args([
                "--policy",
                "cache_aware",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--prometheus-port",
                &free_port().to_string(),
                "--worker-startup-check-interval",
                "1",
            ]);
            eprintln!("{name} ...");
            let result = async {
                let mut p = Proc::spawn(exe, &mut cmd, &logs.join(format!("{exe}.log")))
                    .map_err(|e| e.to_string())?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                wait_serving(addr, &model, Duration::from_secs(90), &mut p)
                    .await
                    .map_err(|e| {
                        let log = std::fs::read_to_string(logs.join(format!("{exe}.log")))
                            .unwrap_or_default();
                        format!(
                            "{e}; log tail: {}",
                            log.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
                        )
                    })?;
                run_wrk(&script, addr, 2, c, secs, Some(p.pid())).map_err(|e| e.to_string())
            }
            .await;
            peers.push((name.to_owned(), result));
        }
    }
    drop(node);
    fleet.shutdown().await;

    // 3. Scrape cost: an idle node scraping many pods.
    eprintln!(
        "scrape cost: {} pods, {} s window ...",
        args.scrape_pods, args.scrape_window
    );
    let mut cfg = FleetConfig::new(args.scrape_pods);
    cfg.profile = EngineProfile::instant();
    let big = Fleet::start(cfg)
        .await
        .context("starting the scrape fleet")?;
    let big_pool = pool_file(logs, &big.addrs(), &model)?;
    let mut idle = start_node(&infermesh, &big_pool, logs, "scrape")?;
    wait_serving(idle.proxy, &model, Duration::from_secs(30), &mut idle.proc_).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let every scraper reach its steady period
    let (c0, t0) = (cpu_seconds(idle.proc_.pid()), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.scrape_window)).await;
    let (c1, wall) = (cpu_seconds(idle.proc_.pid()), t0.elapsed().as_secs_f64());
    let scrape_cores = (c1 - c0) / wall;
    let scrapes_per_s = args.scrape_pods as f64 / 0.05;
    drop(idle);
    big.shutdown().await;

    // Report.
    let load_after = loadavg();
    let mut md = String::new();
    let _ = writeln!(md, "# Data-plane benchmark: one infermesh node\n");
    let _ = writeln!(
        md,
        "Generated by `bench/dataplane/run.sh` (program `bench/dataplane/dataplane.rs`) on {} — {} cores, {}. \
         Every process (wrk, Envoy, infermesh, the peer routers, and the {} zero-latency simulated vLLM pods \
         (`infermesh-sim` profile `instant`, in the benchmark process)) shares this machine. \
         Requests: `POST /v1/completions`, 64 distinct ~4 KB prompts in 16 shared-prefix groups, `max_tokens: 1`. \
         {secs} s per measurement after a 2 s warm-up; run took {:.0} s. Load average (1/5/15 min) before the run: \
         {load_before}; after: {load_after} (other work on the machine inflates tail latencies).\n",
        utc_now(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        envoy_version(&args.envoy),
        args.pods,
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        md,
        "## 1. Latency added by the ext_proc hop (1 connection, no queueing)\n\n\
         Each figure is the median over {rounds} rounds; a round measures every path once, in this order.\n"
    );
    let _ = writeln!(
        md,
        "| path | req/s | p50 | p99 | processor CPU / req | non-2xx | socket errors |\n|---|---|---|---|---|---|---|"
    );
    for (name, r) in [
        ("pod directly", &lat_pod),
        ("Envoy, static route", &lat_static),
        (lat_paths[INFERMESH].0, &lat_extproc),
        (lat_paths[NULL].0, &lat_null),
        (lat_paths[HEADERS_ONLY].0, &lat_headers_only),
        ("infermesh standalone proxy", &lat_proxy),
    ] {
        let _ = writeln!(md, "{}", row(name, r));
    }
    let _ = writeln!(
        md,
        "\nAdded over the static route, per round (each path minus the static route measured in the same round), \
         median and range over {rounds} rounds:\n"
    );
    let _ = writeln!(md, "| hop | p50 added | p99 added |\n|---|---|---|");
    for (name, a50, a99) in [
        ("ext_proc → infermesh", &add_x50, &add_x99),
        (
            "ext_proc → minimal full-duplex processor",
            &add_n50,
            &add_n99,
        ),
        ("ext_proc, headers only → infermesh", &add_h50, &add_h99),
    ] {
        let _ = writeln!(md, "| {name} | {} | {} |", spread(a50), spread(a99));
    }
    let add99 = median(&add_x99);
    let _ = writeln!(
        md,
        "\n**Added by the ext_proc hop** (Envoy + ext_proc → infermesh minus Envoy static route): p50 **{:.0} µs**, \
         p99 **{add99:.0} µs** (median of {rounds} rounds; worst round {:.0} µs; target ≤ 1 ms p99: {}).\n",
        median(&add_x50),
        add_x99.iter().copied().fold(f64::MIN, f64::max),
        if add99 <= 1000.0 { "met" } else { "NOT met" }
    );
    let _ = writeln!(
        md,
        "The baseline row is the same full-duplex exchange (request body buffered and echoed, response \
         headers and body passed back) answered by a processor that parses nothing and picks pods \
         round-robin: the EPP protocol through Envoy costs that much by itself on this machine. \
         infermesh's own share — parsing, prefix hashing, scheduling, metadata — is the difference, \
         per round: **{} at p50, {} at p99** (median and range; the p99 difference is within the \
         rounds' noise when its range spans zero). The control row is the cheapest exchange Envoy's \
         ext_proc filter allows (one headers message, no body, no response processing).\n",
        spread(&own50),
        spread(&own99),
    );
    let _ = writeln!(md, "## 2. Throughput ({c} connections, 2 wrk threads)\n");
    let _ = writeln!(
        md,
        "| path | req/s | p50 | p99 | router CPU / req | non-2xx | socket errors |\n|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "{}",
        row("one pod directly (reference)", &tp_pods_direct)
    );
    let _ = writeln!(
        md,
        "{}",
        row("Envoy, static round-robin (CPU = Envoy)", &tp_static)
    );
    let _ = writeln!(
        md,
        "{}",
        row(
            "Envoy + ext_proc → infermesh (CPU = infermesh)",
            &tp_extproc
        )
    );
    let _ = writeln!(
        md,
        "{}",
        row(
            "Envoy + ext_proc → infermesh, 2nd run (CPU = Envoy)",
            &tp_extproc_envoy_cpu
        )
    );
    let _ = writeln!(
        md,
        "{}",
        row(
            "do-nothing forwarder: read body, round-robin, pooled connections (CPU = forwarder; median of 2)",
            &tp_fwd
        )
    );
    let _ = writeln!(
        md,
        "{}",
        row(
            "infermesh standalone proxy (CPU = infermesh; median of 2)",
            &tp_proxy
        )
    );
    let mut best_peer: Option<f64> = None;
    for (name, r) in &peers {
        match r {
            Ok(r) => {
                let _ = writeln!(md, "{}", row(name, r));
                best_peer = Some(best_peer.map_or(r.rps, |b: f64| b.max(r.rps)));
            }
            Err(e) => {
                let _ = writeln!(md, "| {name} | failed: {} | | | | | |", e.replace('|', "/"));
            }
        }
    }
    if args.routers.is_none() {
        let _ = writeln!(md, "\nPeer routers were not run (no `--routers`).");
    }
    if tp_fwd.rps > 0.0 {
        let ratio = tp_proxy.rps / tp_fwd.rps;
        let _ = writeln!(
            md,
            "\nStandalone proxy vs the do-nothing forwarder on the same pods: **{ratio:.2}×** the requests/s \
             (rounds: proxy {} req/s, forwarder {} req/s; target ≥ 0.8×: {}).",
            rounds_rps(&tp_proxy_runs),
            rounds_rps(&tp_fwd_runs),
            if ratio >= 0.8 { "met" } else { "NOT met" }
        );
    }
    if let Some(peer) = best_peer {
        let ratio = tp_proxy.rps / peer;
        let _ = writeln!(
            md,
            "\nStandalone proxy vs the faster peer router: **{ratio:.2}×** the requests/s (target ≥ 2×: {}).",
            if ratio >= 2.0 { "met" } else { "NOT met" }
        );
    }
    let _ = writeln!(md, "\n## 3. Scrape cost\n");
    let _ = writeln!(
        md,
        "An idle node scraping {} pods every 50 ms ({scrapes_per_s:.0} scrapes/s, real HTTP + Prometheus text parsing) used \
         **{scrape_cores:.3} cores** (process CPU from /proc over {wall:.1} s; target ≤ 0.2; for scale, not measured here: llm-d-router's `docs/operations.md` gives ~7.5 cores for an idle EPP at 100 pods).",
        args.scrape_pods
    );
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn envoy_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            // "…/envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            let v = s.split("version:").nth(1)?;
            v.trim().split('/').nth(1).map(|v| format!("Envoy {v}"))
        })
        .unwrap_or_else(|| "Envoy".into())
}
