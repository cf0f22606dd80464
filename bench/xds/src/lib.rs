//! ADS load benchmark. `run` starts `serve` as a child process (so its RSS is the
//! server's alone), opens N ADS streams from N simulated Envoys (one HTTP/2 connection
//! each, ACKing every response like Envoy), then times publishes until every stream has
//! received and ACKed them. Every loop is bounded in count and time. `fleet` does the same
//! against several server processes at once (see [`fleet`]).

mod fleet;

pub use fleet::{FLEET_OUT, FleetArgs, fleet};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use infermesh_proto::envoy::config::core::v3::Node;
use infermesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use infermesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use infermesh_xds::translate::pool_listener_name;
use infermesh_xds::{FailureMode, InferencePoolSpec, ResourceType, XdsConfig, XdsInput, XdsServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "ADS load benchmark for the infermesh xDS server")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the benchmark (starts `serve` as a child process).
    Run(RunArgs),
    /// Serve ADS on 127.0.0.1:0 and publish on command from stdin (used by `run`).
    Serve(ServeArgs),
    /// Fleet-scale run: several server processes, streams spread evenly over them.
    Fleet(FleetArgs),
}

/// ADS flavour to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// State of the world.
    Sotw,
    /// Incremental.
    Delta,
}

/// Where `run` writes its report unless `--out` says otherwise: `bench/results/xds.md`.
pub const DEFAULT_OUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../results/xds.md");

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Concurrent ADS streams (one connection and one Envoy node id each).
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Publishes to time per mode (alternating membership and policy changes).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Modes to run.
    #[arg(long, value_enum, num_args = 1.., default_values_t = [Mode::Sotw, Mode::Delta])]
    pub modes: Vec<Mode>,
    /// Server debounce window in milliseconds (the server default is 50).
    #[arg(long, default_value_t = 50)]
    pub debounce_ms: u64,
    /// Give up on a round (or on the initial sync) after this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
    /// Markdown file the report is written to.
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Debounce window in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub debounce_ms: u64,
}

/// The input published in round `n`: odd rounds change membership (the ext_proc EDS),
/// even rounds change policy (listener port and failure mode: LDS and RDS).
fn input_for(round: usize) -> XdsInput {
    let membership_changes = round.div_ceil(2);
    let policy_changes = round / 2;
    let mut pool = InferencePoolSpec::new(
        "bench",
        ([127, 0, 0, 1], 20000 + (policy_changes % 1000) as u16).into(),
        vec![8000],
    );
    pool.endpoints = (1..=8u8).map(|i| [10, 0, 0, i].into()).collect();
    pool.failure_mode = if policy_changes.is_multiple_of(2) {
        FailureMode::FailClose
    } else {
        FailureMode::FailOpen
    };
    let shift = (membership_changes % 2) as u16 * 100;
    XdsInput {
        pools: vec![pool],
        ext_proc_endpoints: (0..3u16)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9002 + i + shift)))
            .collect(),
        grpc_services: vec![],
    }
}

/// `serve`: the server process.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // A fleet run puts thousands of connections on each server process.
    raise_fd_limit(0)?;
    let config = XdsConfig {
        debounce: Duration::from_millis(args.debounce_ms),
        ..Default::default()
    };
    let server = XdsServer::new(config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener, std::future::pending()).await });
    println!("listening {addr}");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("publish"), Some(n)) => {
                let receipt = server.publish(&input_for(n.parse()?))?;
                let versions: Vec<String> =
                    receipt.versions.iter().map(|(_, v)| v.clone()).collect();
                println!("published {}", versions.join(" "));
            }
            (Some("quit"), _) | (None, _) => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    Ok(())
}

/// One ACK a simulated Envoy sent.
#[derive(Debug)]
struct Ack {
    stream: usize,
    ty: ResourceType,
    version: String,
    at: Instant,
}

fn node(stream: usize) -> Node {
    Node {
        id: format!("bench-envoy-{stream}"),
        cluster: "bench".into(),
        user_agent_name: "infermesh-xds-bench".into(),
        ..Default::default()
    }
}

fn subscriptions() -> [(ResourceType, Vec<String>); 4] {
    [
        (ResourceType::Cluster, vec![]),
        (
            ResourceType::Endpoint,
            vec![XdsConfig::default().ext_proc_cluster],
        ),
        (ResourceType::Listener, vec![]),
        (ResourceType::Route, vec![pool_listener_name("bench")]),
    ]
}

async fn sotw_stream(
    stream: usize,
    addr: SocketAddr,
    acks: mpsc::UnboundedSender<Ack>,
    connect_limit: Option<Arc<Semaphore>>,
) -> anyhow::Result<()> {
    // Held until the stream is open, so at most that many handshakes run at once.
    let permit = match connect_limit {
        Some(s) => Some(s.acquire_owned().await?),
        None => None,
    };
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await?;
    let (tx, rx) = mpsc::channel(8);
    let subs = subscriptions();
    for (i, (ty, names)) in subs.iter().enumerate() {
        tx.send(DiscoveryRequest {
            node: (i == 0).then(|| node(stream)),
            type_url: ty.type_url().into(),
            resource_names: names.clone(),
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    drop(permit);
    while let Some(resp) = inbound.message().await? {
        let ty = ResourceType::from_type_url(&resp.type_url).context("unknown type in response")?;
        tx.send(DiscoveryRequest {
            version_info: resp.version_info.clone(),
            type_url: resp.type_url,
            resource_names: subs[ty.index()].1.clone(),
            response_nonce: resp.nonce,
            ..Default::default()
        })
        .await?;
        let _ = acks.send(Ack {
            stream,
            ty,
            version: resp.version_info,
            at: Instant::now(),
        });
    }
    Ok(())
}

async fn delta_stream(
    stream: usize,
    addr: SocketAddr,
    acks: mpsc::UnboundedSender<Ack>,
    connect_limit: Option<Arc<Semaphore>>,
) -> anyhow::Result<()> {
    // Held until the stream is open, so at most that many handshakes run at once.
    let permit = match connect_limit {
        Some(s) => Some(s.acquire_owned().await?),
        None => None,
    };
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await?;
    let (tx, rx) = mpsc::channel(8);
    for (i, (ty, names)) in subscriptions().into_iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(stream)),
            type_url: ty.type_url().into(),
            resource_names_subscribe: names,
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    drop(permit);
    while let Some(resp) = inbound.message().await? {
        let ty = ResourceType::from_type_url(&resp.type_url).context("unknown type in response")?;
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        })
        .await?;
        let _ = acks.send(Ack {
            stream,
            ty,
            version: resp.system_version_info,
            at: Instant::now(),
        });
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit; fails naming the limit if the
/// result is below `needed`.
fn raise_fd_limit(needed: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    ensure!(
        soft >= needed,
        "the open-file limit (RLIMIT_NOFILE, `ulimit -n`) is {soft} (hard limit {hard}), \
         but this run needs about {needed}: raise the hard limit or run fewer streams"
    );
    Ok(soft)
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: indexes 11 and 12 after the name.
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("no CLK_TCK")?;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("no value")?
        .parse()?)
}

/// The child server process and its command pipe.
struct Child {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    addr: SocketAddr,
}

impl Child {
    async fn start(debounce_ms: u64) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--debounce-ms", &debounce_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = stdout.next_line().await?.context("server exited")?;
        let addr = line
            .strip_prefix("listening ")
            .context("unexpected server output")?
            .parse()?;
        Ok(Self {
            child,
            stdin,
            stdout,
            addr,
        })
    }

    /// Publishes round `n`; returns the versions (push order) once `publish` returned.
    async fn publish(&mut self, n: usize) -> anyhow::Result<Vec<String>> {
        self.stdin
            .write_all(format!("publish {n}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let line = self.stdout.next_line().await?.context("server exited")?;
        let versions = line
            .strip_prefix("published ")
            .context("unexpected server output")?;
        Ok(versions.split_whitespace().map(str::to_string).collect())
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// Waits until every stream has ACKed `target` (per type, `None` = don't care); returns
/// each stream's latency from `t0`.
async fn wait_acked(
    acks: &mut mpsc::UnboundedReceiver<Ack>,
    held: &mut [[String; 4]],
    target: &[Option<String>; 4],
    t0: Instant,
    timeout: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let n = held.len();
    let mut done: Vec<Option<Duration>> = (0..n)
        .map(|s| {
            ResourceType::ALL
                .iter()
                .all(|t| {
                    target[t.index()]
                        .as_ref()
                        .is_none_or(|v| &held[s][t.index()] == v)
                })
                .then_some(Duration::ZERO)
        })
        .collect();
    let mut remaining = done.iter().filter(|d| d.is_none()).count();
    let deadline = tokio::time::Instant::now() + timeout;
    while remaining > 0 {
        let ack = tokio::time::timeout_at(deadline, acks.recv())
            .await
            .with_context(|| {
                format!("{remaining} of {n} streams had not ACKed within {timeout:?}")
            })?
            .context("all streams ended")?;
        held[ack.stream][ack.ty.index()] = ack.version;
        if done[ack.stream].is_none()
            && ResourceType::ALL.iter().all(|t| {
                target[t.index()]
                    .as_ref()
                    .is_none_or(|v| &held[ack.stream][t.index()] == v)
            })
        {
            done[ack.stream] = Some(ack.at.saturating_duration_since(t0));
            remaining -= 1;
        }
    }
    Ok(done.into_iter().map(|d| d.unwrap_or_default()).collect())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Results of one mode.
#[derive(Debug)]
struct ModeResult {
    mode: Mode,
    streams: usize,
    rss_before_kib: u64,
    rss_streams_kib: u64,
    connect_and_sync: Duration,
    /// Per kind ("membership", "policy"): per-stream latencies and per-round all-ACKed times.
    kinds: Vec<(&'static str, Vec<Duration>, Vec<Duration>)>,
}

async fn run_mode(mode: Mode, args: &RunArgs) -> anyhow::Result<ModeResult> {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut child = Child::start(args.debounce_ms).await?;
    let base = child.publish(0).await?;
    // Let the debounce task serve the first snapshot before measuring the baseline.
    let probe_deadline = Instant::now() + timeout;
    let rss_before = loop {
        tokio::time::sleep(Duration::from_millis(args.debounce_ms + 50)).await;
        let rss = rss_kib(child.pid())?;
        if Instant::now() > probe_deadline || rss > 0 {
            break rss;
        }
    };

    let (ack_tx, mut acks) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..args.streams {
        let tx = ack_tx.clone();
        let addr = child.addr;
        tasks.spawn(async move {
            let r = match mode {
                Mode::Sotw => sotw_stream(s, addr, tx, None).await,
                Mode::Delta => delta_stream(s, addr, tx, None).await,
            };
            if let Err(e) = r {
                tracing::warn!(stream = s, "stream ended: {e:#}");
            }
        });
    }
    drop(ack_tx);
    let mut held = vec![<[String; 4]>::default(); args.streams];
    let target: [Option<String>; 4] = [0, 1, 2, 3].map(|i| Some(base[i].clone()));
    wait_acked(&mut acks, &mut held, &target, t0, timeout).await?;
    let connect_and_sync = t0.elapsed();
    // Settle: let allocator and connection buffers reach steady state before reading RSS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_streams = rss_kib(child.pid())?;

    let mut previous = base;
    let mut kinds: Vec<(&'static str, Vec<Duration>, Vec<Duration>)> = vec![
        ("membership (EDS)", vec![], vec![]),
        ("policy (LDS+RDS)", vec![], vec![]),
    ];
    for round in 1..=args.rounds {
        let t0 = Instant::now();
        let versions = child.publish(round).await?;
        let target: [Option<String>; 4] =
            [0, 1, 2, 3].map(|i| (versions[i] != previous[i]).then(|| versions[i].clone()));
        ensure!(
            target.iter().any(Option::is_some),
            "round {round} changed nothing"
        );
        let lat = wait_acked(&mut acks, &mut held, &target, t0, timeout).await?;
        let all = lat.iter().copied().max().unwrap_or_default();
        let kind = &mut kinds[if round % 2 == 1 { 0 } else { 1 }];
        kind.1.extend(lat);
        kind.2.push(all);
        previous = versions;
    }
    child.stdin.write_all(b"quit\n").await?;
    tasks.abort_all();
    Ok(ModeResult {
        mode,
        streams: args.streams,
        rss_before_kib: rss_before,
        rss_streams_kib: rss_streams,
        connect_and_sync,
        kinds,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn table(results: &[ModeResult], args: &RunArgs) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Streams: {} concurrent ADS streams, one HTTP/2 connection and one node id each, ACKing every response. \
         Rounds: {} publishes per mode, alternating a membership change (ext_proc EDS) and a policy change \
         (listener port + failure mode: LDS and RDS). Server debounce: {} ms (included in the latencies). \
         Latency: from the publish call until a stream has ACKed every changed type.\n\n",
        args.streams, args.rounds, args.debounce_ms
    ));
    out.push_str("| mode | streams | server RSS before (MiB) | with streams (MiB) | per stream (KiB) | connect + initial sync (ms) |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for r in results {
        let per = (r.rss_streams_kib.saturating_sub(r.rss_before_kib)) as f64 / r.streams as f64;
        out.push_str(&format!(
            "| {:?} | {} | {:.1} | {:.1} | {:.1} | {} |\n",
            r.mode,
            r.streams,
            r.rss_before_kib as f64 / 1024.0,
            r.rss_streams_kib as f64 / 1024.0,
            per,
            ms(r.connect_and_sync)
        ));
    }
    out.push_str("\n| mode | change | rounds | per-stream p50 (ms) | per-stream p99 (ms) | all ACKed, median round (ms) | all ACKed, worst round (ms) |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for r in results {
        for (kind, lat, all) in &r.kinds {
            let mut lat = lat.clone();
            lat.sort();
            let mut all = all.clone();
            all.sort();
            out.push_str(&format!(
                "| {:?} | {} | {} | {} | {} | {} | {} |\n",
                r.mode,
                kind,
                all.len(),
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                ms(percentile(&all, 0.5)),
                ms(all.last().copied().unwrap_or_default()),
            ));
        }
    }
    out
}

/// `run`: the benchmark.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    ensure!(
        args.streams > 0 && args.rounds >= 2,
        "need at least one stream and two rounds"
    );
    let mut results = Vec::new();
    for mode in &args.modes {
        eprintln!("running {mode:?} with {} streams...", args.streams);
        results.push(run_mode(*mode, &args).await?);
    }
    let table = table(&results, &args);
    println!("{table}");
    let modes: Vec<&str> = args
        .modes
        .iter()
        .map(|m| match m {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        })
        .collect();
    let mut doc = format!("# xDS server: {} concurrent ADS streams\n\n", args.streams);
    doc.push_str(&format!(
        "Generated by `cargo run --release -p infermesh-xds-bench -- run --streams {} --rounds {} --modes {} --debounce-ms {}`.\n",
        args.streams,
        args.rounds,
        modes.join(" "),
        args.debounce_ms
    ));
    doc.push_str("Targets: every stream ACKed within 1 s of a publish; at most 50 KiB of server memory per stream.\n");
    doc.push_str(&format!(
        "Machine: {} CPUs, shared by the load client and the server process.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    doc.push_str(&table);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, doc).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
