//! Scheduling-cycle and prefix-index benchmarks.
//!
//! `cargo bench -p infermesh-scheduler` measures one full `Scheduler::schedule` cycle with
//! the built-in default profile (queue 2, kv-cache-utilization 2, prefix 3) on a warm
//! index, for 8/64/512 endpoints × 1k/8k/32k-token prompts, measures index memory per
//! (block, endpoint) entry, and writes the table to `bench/results/scheduler.md` from
//! criterion's own estimates.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use infermesh_scheduler::prefix::{PrefixIndex, hash_prompt};
use infermesh_scheduler::{Endpoint, InferenceRequest, Metrics, ResolvedConfig, Scheduler};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ENDPOINTS: [usize; 3] = [8, 64, 512];
/// Prompt sizes in tokens (× 4 bytes).
const TOKENS: [usize; 3] = [1024, 8192, 32768];
const GROUP: &str = "schedule_default";

fn endpoints(n: usize, now: Instant, rng: &mut ChaCha8Rng) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 8) as u8, (i & 0xff) as u8, 1], 8000));
            let mut labels = BTreeMap::new();
            labels.insert("app".to_owned(), "vllm".to_owned());
            let mut e = Endpoint::new(addr, labels);
            let mut m = Metrics::idle(now);
            m.waiting_queue = rng.random_range(0..8);
            m.running = rng.random_range(0..32);
            m.kv_cache_usage = rng.random_range(0.0..0.9);
            e.metrics = Some(m);
            e.in_flight.requests = rng.random_range(0..16);
            e
        })
        .collect()
}

fn text(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the ", "model ", "routes ", "tokens ", "cache ", "prefix ", "pod ", "fleet ",
    ];
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
    }
    out.truncate(len);
    out
}

fn request(prompt: Vec<u8>) -> InferenceRequest {
    InferenceRequest {
        id: "bench".into(),
        model: "meta-llama/Llama-3.1-8B".into(),
        target_model: "meta-llama/Llama-3.1-8B".into(),
        prompt_bytes: prompt,
        fairness_id: "default-flow".into(),
        ..InferenceRequest::default()
    }
}

/// A scheduler whose index holds 64 recorded conversations spread over the endpoints
/// (8 shared system prompts), plus background blocks on every endpoint.
fn warm(n: usize, tokens: usize) -> (Scheduler, Vec<Endpoint>, InferenceRequest) {
    let now = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let eps = endpoints(n, now, &mut rng);
    let s = Scheduler::new(&ResolvedConfig::builtin_default()).expect("default config");
    let bytes = tokens * 4;
    let systems: Vec<Vec<u8>> = (0..8).map(|_| text(&mut rng, bytes / 2)).collect();
    let mut prompts = Vec::new();
    for i in 0..64 {
        let mut p = systems[i % 8].clone();
        p.extend(text(&mut rng, bytes - p.len()));
        let req = request(p.clone());
        let r = s.schedule(&req, &eps, now, &mut rng).expect("schedule");
        s.pre_request(&req, &r, now);
        prompts.push(p);
    }
    let index = s.prefix_index().expect("prefix index");
    let background_per_endpoint = (1_000_000 / n).min(4000);
    for e in &eps {
        let chain: Vec<u64> = (0..background_per_endpoint)
            .map(|_| rng.next_u64())
            .collect();
        index.record(e.address, 31250, &chain);
    }
    // The measured request shares its first 3/4 with a recorded conversation.
    let mut p = prompts[5].clone();
    let cut = bytes * 3 / 4;
    p.truncate(cut);
    p.extend(text(&mut rng, bytes - cut));
    (s, eps, request(p))
}

fn bench_schedule(c: &mut Criterion) {
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(40)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    for &n in &ENDPOINTS {
        for &t in &TOKENS {
            let (s, eps, req) = warm(n, t);
            let now = Instant::now();
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            g.bench_with_input(
                BenchmarkId::new(format!("{n}ep"), format!("{}k", t / 1024)),
                &(),
                |b, _| {
                    b.iter(|| {
                        black_box(
                            s.schedule(black_box(&req), &eps, now, &mut rng)
                                .expect("pick"),
                        )
                    })
                },
            );
        }
    }
    g.finish();
}

fn bench_parts(c: &mut Criterion) {
    let mut g = c.benchmark_group("parts");
    g.sample_size(40)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let prompt = text(&mut rng, 16 * 1024);
    g.bench_function("hash_16KiB_256_blocks", |b| {
        b.iter(|| black_box(hash_prompt("m", None, black_box(&prompt), 16, 256)))
    });
    let index = PrefixIndex::default();
    let chain = hash_prompt("m", None, &prompt, 16, 256);
    for i in 0..8u16 {
        index.record(
            SocketAddr::from(([10, 0, 0, 1], 9000 + i)),
            31250,
            &chain[..chain.len() / (i as usize + 1)],
        );
    }
    g.bench_function("match_256_blocks_8_holders", |b| {
        b.iter(|| black_box(index.match_prefix(black_box(&chain))))
    });
    g.finish();
}

/// Index bytes per (block, endpoint) entry at ~1M entries.
fn memory_rows() -> Vec<(String, usize, usize, usize)> {
    let mut rows = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // 64 endpoints, each with a full LRU of 15625 distinct blocks.
    let idx = PrefixIndex::default();
    for i in 0..64u16 {
        let chain: Vec<u64> = (0..15_625).map(|_| rng.next_u64()).collect();
        idx.record(SocketAddr::from(([10, 1, 0, 1], 8000 + i)), 15_625, &chain);
    }
    rows.push((
        "distinct blocks, 1 endpoint each (64 × 15,625)".into(),
        idx.entries(),
        idx.distinct_blocks(),
        idx.memory_bytes(),
    ));
    // Every block on two endpoints (prefix shared by a pair).
    let idx = PrefixIndex::default();
    for pair in 0..32u16 {
        let chain: Vec<u64> = (0..15_625).map(|_| rng.next_u64()).collect();
        for k in 0..2u16 {
            idx.record(
                SocketAddr::from(([10, 2, 0, 1], 8000 + pair * 2 + k)),
                15_625,
                &chain,
            );
        }
    }
    rows.push((
        "every block on 2 endpoints (32 pairs × 15,625)".into(),
        idx.entries(),
        idx.distinct_blocks(),
        idx.memory_bytes(),
    ));
    // LRU churn: capacity 31250 per endpoint, 2× that many blocks recorded (evictions).
    let idx = PrefixIndex::default();
    for i in 0..16u16 {
        let chain: Vec<u64> = (0..62_500).map(|_| rng.next_u64()).collect();
        idx.record(SocketAddr::from(([10, 3, 0, 1], 8000 + i)), 31_250, &chain);
    }
    rows.push((
        "after eviction churn (16 × 62,500 into LRU 31,250)".into(),
        idx.entries(),
        idx.distinct_blocks(),
        idx.memory_bytes(),
    ));
    rows
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Median and 95% CI (ns) from criterion's estimates.json.
fn estimate(parts: &[&str]) -> Option<(f64, f64, f64)> {
    let mut p = target_dir().join("criterion");
    for x in parts {
        p.push(x);
    }
    p.push("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
    let m = &v["median"];
    Some((
        m["point_estimate"].as_f64()?,
        m["confidence_interval"]["lower_bound"].as_f64()?,
        m["confidence_interval"]["upper_bound"].as_f64()?,
    ))
}

fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

fn write_report(mem: &[(String, usize, usize, usize)]) {
    let mut md = String::new();
    let _ = writeln!(md, "# infermesh-scheduler benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo bench -p infermesh-scheduler` (scheduler/benches/schedule.rs) from criterion's estimates; do not edit by hand.\n"
    );
    let _ = writeln!(
        md,
        "Machine: {} logical CPUs, shared with other work; load average when the report was written: {}. Numbers from a loaded machine are upper bounds.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into())
    );
    let _ = writeln!(md, "## One scheduling cycle, default profile, warm index\n");
    let _ = writeln!(
        md,
        "`Scheduler::schedule` with the built-in default (queue-scorer 2, kv-cache-utilization-scorer 2, prefix-cache-scorer 3, max-score-picker). The index holds 64 recorded conversations plus up to 4,000 background blocks per endpoint; the request shares 3/4 of its bytes with a recorded one. llm-d's defaults hash at most 256 blocks of 64 bytes (16 KiB), so 32k- and 128k-byte prompts hash the same 256 blocks. Median with criterion's 95% confidence interval, in µs.\n"
    );
    let _ = writeln!(
        md,
        "| endpoints | prompt | bytes | median µs | 95% CI µs | target |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---|");
    for &n in &ENDPOINTS {
        for &t in &TOKENS {
            let id_n = format!("{n}ep");
            let id_t = format!("{}k", t / 1024);
            let target = match (n, t) {
                (64, 8192) => "≤ 20 µs",
                (512, 32768) => "≤ 200 µs",
                _ => "",
            };
            match estimate(&[GROUP, &id_n, &id_t]) {
                Some((m, lo, hi)) => {
                    let verdict = match (n, t) {
                        (64, 8192) => {
                            if m <= 20_000.0 {
                                " (met)"
                            } else {
                                " (missed)"
                            }
                        }
                        (512, 32768) => {
                            if m <= 200_000.0 {
                                " (met)"
                            } else {
                                " (missed)"
                            }
                        }
                        _ => "",
                    };
                    let _ = writeln!(
                        md,
                        "| {n} | {}k tokens | {} KiB | {} | {}–{} | {target}{verdict} |",
                        t / 1024,
                        t * 4 / 1024,
                        us(m),
                        us(lo),
                        us(hi)
                    );
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| {n} | {}k tokens | {} KiB | not measured | | {target} |",
                        t / 1024,
                        t * 4 / 1024
                    );
                }
            }
        }
    }
    let _ = writeln!(md, "\n## Parts\n");
    let _ = writeln!(md, "| part | median µs |");
    let _ = writeln!(md, "|---|---:|");
    for id in ["hash_16KiB_256_blocks", "match_256_blocks_8_holders"] {
        if let Some((m, _, _)) = estimate(&["parts", id]) {
            let _ = writeln!(md, "| {id} | {} |", us(m));
        }
    }
    let _ = writeln!(md, "\n## Prefix index memory\n");
    let _ = writeln!(
        md,
        "Heap bytes held by the index structures (`PrefixIndex::memory_bytes`: hash tables by allocated capacity, overflow lists, LRU slabs, endpoint table), divided by the (block, endpoint) entries. Target: < 64 bytes per entry.\n"
    );
    let _ = writeln!(
        md,
        "| layout | entries | distinct blocks | MiB | bytes / entry | MiB per million entries |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for (name, entries, blocks, bytes) in mem {
        let per = *bytes as f64 / (*entries).max(1) as f64;
        let _ = writeln!(
            md,
            "| {name} | {entries} | {blocks} | {:.1} | {:.1} | {:.1} |",
            *bytes as f64 / 1048576.0,
            per,
            per * 1e6 / 1048576.0
        );
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results/scheduler.md");
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&out, &md) {
        Ok(()) => println!("\nwrote {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
    println!("\n{md}");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_schedule(&mut c);
    bench_parts(&mut c);
    c.final_summary();
    if !writes_report(std::env::args()) {
        return;
    }
    let mem = memory_rows();
    write_report(&mem);
}

/// Whether this run measured and may write the report. Only `cargo bench` passes `--bench`;
/// `cargo test --benches` / `--all-targets` runs this harness without it (criterion's test
/// mode: each benchmark once, no estimates), and `--list` / `--test` measure nothing.
fn writes_report(args: impl IntoIterator<Item = String>) -> bool {
    let mut bench = false;
    for a in args {
        match a.as_str() {
            "--list" | "--test" => return false,
            "--bench" => bench = true,
            _ => {}
        }
    }
    bench
}
