//! `infermesh-sim`: serves N simulated vLLM pods from one process until interrupted, or
//! (`infermesh-sim generate-tokenizer --out PATH`) writes the project's generated
//! `tokenizer.json`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use infermesh_kvevents::{Encoding, HashFormat};
use infermesh_sim::fleet::parse_roles;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig, KvEventsConfig, Tokenizer};

/// Simulated vLLM pods (OpenAI API, vLLM /metrics), many per process.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Something else than serving pods (without one, the flags below serve pods).
    #[command(subcommand)]
    command: Option<Command>,
    /// Number of pods.
    #[arg(long, default_value_t = 4)]
    pods: usize,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of pod 0 (pod i gets base-port + i); 0 = ephemeral ports.
    #[arg(long, default_value_t = 8100)]
    base_port: u16,
    /// Served model name.
    #[arg(long, default_value = infermesh_sim::DEFAULT_MODEL)]
    model: String,
    /// LoRA adapter names served by every pod (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    lora: Vec<String>,
    /// Engine profile: llama-8b-h100, llama-70b-h100-tp4 or instant.
    #[arg(long, default_value = "llama-8b-h100")]
    profile: String,
    /// Simulated seconds per real second.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Seed of per-pod randomness.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pod roles in order, e.g. `prefill=2,decode=6` (remaining pods are `both`).
    #[arg(long, default_value = "")]
    roles: String,
    /// Tokens per KV block.
    #[arg(long)]
    block_size: Option<usize>,
    /// KV capacity in blocks.
    #[arg(long)]
    num_gpu_blocks: Option<usize>,
    /// Most sequences per batch.
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// Token budget per engine step.
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Longest prompt + completion.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Fixed cost of a step with prefill work, milliseconds.
    #[arg(long)]
    prefill_overhead_ms: Option<f64>,
    /// Prefill cost per uncached token, microseconds.
    #[arg(long)]
    prefill_per_token_us: Option<f64>,
    /// Decode step cost at batch size 1, milliseconds.
    #[arg(long)]
    decode_base_ms: Option<f64>,
    /// Extra decode step cost per additional sequence, microseconds.
    #[arg(long)]
    decode_per_seq_us: Option<f64>,
    /// Extra decode step cost per context token in the batch, nanoseconds.
    #[arg(long)]
    decode_per_context_token_ns: Option<f64>,
    /// KV bytes per token pulled by a P/D decode pod.
    #[arg(long)]
    kv_bytes_per_token: Option<u64>,
    /// Bandwidth of a pod's KV link, GB/s (10^9 bytes per second).
    #[arg(long)]
    kv_link_gb_per_s: Option<f64>,
    /// Vision-encoder time per uncached image, milliseconds.
    #[arg(long)]
    encode_per_image_ms: Option<f64>,
    /// Prompt tokens one image occupies.
    #[arg(long)]
    image_tokens: Option<usize>,
    /// Images whose encoder output a pod caches.
    #[arg(long)]
    encoder_cache_items: Option<usize>,
    /// Most distinct LoRA adapters per batch (and GPU adapter slots).
    #[arg(long)]
    max_loras: Option<usize>,
    /// Time to load a LoRA adapter into a GPU slot, milliseconds.
    #[arg(long)]
    lora_load_ms: Option<f64>,
    /// Relative uniform jitter of step durations, in [0, 1).
    #[arg(long)]
    jitter: Option<f64>,
    /// Completion length when a request sets no max_tokens.
    #[arg(long)]
    default_max_tokens: Option<usize>,
    /// Publish prefix-cache changes as vLLM KV events over ZMQ (vLLM's
    /// `enable_kv_cache_events`, off by default). The topic of pod i is
    /// `kv@<host>:<http-port>@<model>`, the form llm-d reads.
    #[arg(long)]
    enable_kv_cache_events: bool,
    /// KV-event PUB endpoint of pod 0; pod i uses its port + i (as vLLM offsets by
    /// data-parallel rank), port 0 gives each pod an ephemeral port. Bound when the host is
    /// `*` or `::`, else connected (vLLM's rule; see --kv-events-bind).
    #[arg(long, default_value = infermesh_kvevents::publisher::DEFAULT_ENDPOINT)]
    kv_events_endpoint: String,
    /// KV-event replay ROUTER endpoint of pod 0 (pod i: port + i); unset disables replay.
    #[arg(long)]
    kv_events_replay_endpoint: Option<String>,
    /// Event batches each pod keeps for replay (vLLM's `buffer_steps`).
    #[arg(long, default_value_t = infermesh_kvevents::publisher::DEFAULT_BUFFER_STEPS)]
    kv_events_buffer_steps: usize,
    /// KV-event layout: `array` (vLLM's positional msgspec arrays) or `map` (vLLM PR #42892).
    #[arg(long, default_value = "array")]
    kv_events_encoding: Encoding,
    /// Block hashes as integers (vLLM's default, `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`);
    /// `false` sends them as bytes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kv_events_int_hashes: bool,
    /// Bind the KV-event PUB endpoint even without a wildcard host (e.g.
    /// `tcp://127.0.0.1:5557`, to listen on loopback only).
    #[arg(long)]
    kv_events_bind: bool,
    /// Tokenize with this HuggingFace tokenizer.json instead of the built-in tokenizer
    /// (prompts, /tokenize, render endpoints and KV-event token ids), e.g. the one
    /// `generate-tokenizer` writes.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Write the project's generated byte-level BPE tokenizer.json (trained here, the same
    /// bytes on every run).
    GenerateTokenizer {
        /// Where to write it (`-` for standard output).
        #[arg(long)]
        out: PathBuf,
    },
}

fn duration(field: &str, v: f64, unit: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v * unit)
        .map_err(|e| anyhow::anyhow!("--{field}: {v} is not a valid duration ({e})"))
}

fn config(a: Args) -> anyhow::Result<FleetConfig> {
    let mut p = EngineProfile::named(&a.profile)?;
    macro_rules! set {
        ($field:ident) => {
            if let Some(v) = a.$field {
                p.$field = v;
            }
        };
        ($flag:ident => $field:ident, $unit:expr) => {
            if let Some(v) = a.$flag {
                p.$field = duration(&stringify!($flag).replace('_', "-"), v, $unit)?;
            }
        };
    }
    set!(block_size);
    set!(num_gpu_blocks);
    set!(max_num_seqs);
    set!(max_num_batched_tokens);
    set!(max_model_len);
    set!(max_loras);
    set!(jitter);
    set!(default_max_tokens);
    set!(prefill_overhead_ms => prefill_overhead, 1e-3);
    set!(prefill_per_token_us => prefill_per_token, 1e-6);
    set!(decode_base_ms => decode_base, 1e-3);
    set!(decode_per_seq_us => decode_per_seq, 1e-6);
    set!(decode_per_context_token_ns => decode_per_context_token, 1e-9);
    set!(kv_bytes_per_token);
    set!(image_tokens);
    set!(encoder_cache_items);
    set!(encode_per_image_ms => encode_per_image, 1e-3);
    if let Some(gb) = a.kv_link_gb_per_s {
        if !(gb.is_finite() && gb > 0.0) {
            anyhow::bail!("--kv-link-gb-per-s: {gb} must be a positive number");
        }
        p.kv_link_bytes_per_s = (gb * 1e9) as u64;
    }
    set!(lora_load_ms => lora_load, 1e-3);
    let mut cfg = FleetConfig::new(a.pods);
    cfg.host = a.host;
    cfg.base_port = a.base_port;
    cfg.model = a.model;
    cfg.lora_adapters = a.lora;
    cfg.profile = p;
    cfg.time_scale = a.time_scale;
    cfg.seed = a.seed;
    cfg.roles = parse_roles(&a.roles, a.pods)?;
    if let Some(path) = &a.tokenizer {
        cfg.tokenizer = Tokenizer::from_file(path)?;
    }
    if a.enable_kv_cache_events {
        cfg.kv_events = Some(KvEventsConfig {
            endpoint: a.kv_events_endpoint,
            replay_endpoint: a.kv_events_replay_endpoint,
            buffer_steps: a.kv_events_buffer_steps,
            encoding: a.kv_events_encoding,
            hash_format: if a.kv_events_int_hashes {
                HashFormat::Int
            } else {
                HashFormat::Bytes
            },
            bind: a.kv_events_bind,
        });
    }
    cfg.validate()?;
    Ok(cfg)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(Command::GenerateTokenizer { out }) = &args.command {
        return generate_tokenizer(out);
    }
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("infermesh-sim: bad configuration: {e:#}");
            return ExitCode::from(64);
        }
    };
    let profile = cfg.profile.name.clone();
    let fleet = match Fleet::start(cfg).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("infermesh-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kv_ports = fleet.kv_event_ports();
    for (i, (url, role)) in fleet.urls().iter().zip(fleet.roles()).enumerate() {
        let kv = match kv_ports[i] {
            Some(p) => format!(
                " kv_events_port={} kv_events_replay_port={}",
                p.publish.map_or("connect".to_owned(), |v| v.to_string()),
                p.replay.map_or("-".to_owned(), |v| v.to_string()),
            ),
            None => String::new(),
        };
        println!("pod {i} {url} role={} profile={profile}{kv}", role.as_str());
    }
    println!("ready: {} pods", fleet.addrs().len());
    wait_for_signal().await;
    fleet.shutdown().await;
    ExitCode::SUCCESS
}

fn generate_tokenizer(out: &std::path::Path) -> ExitCode {
    let json = infermesh_sim::generate_tokenizer_json();
    let written = if out.as_os_str() == "-" {
        use std::io::Write;
        std::io::stdout().lock().write_all(json.as_bytes())
    } else {
        std::fs::write(out, json.as_bytes())
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infermesh-sim: cannot write {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
