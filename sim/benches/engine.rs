//! In-process cost of the simulator's hot paths: engine steps, tokenizing, rendering /metrics.
#![allow(missing_docs)] // criterion_group! generates an undocumented public function.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use infermesh_sim::EngineProfile;
use infermesh_sim::engine::{Engine, EngineConfig, EngineRequest, FinishReason, KvTransfer};
use infermesh_sim::metrics::{MetricsLabels, render};
use infermesh_sim::tokenizer::tokenize;

/// 256 requests (16 shared 1,024-token system prompts + 64-token questions, 16 output
/// tokens) through a zero-cost engine until idle.
fn engine_requests(c: &mut Criterion) {
    let prompts: Vec<Vec<u32>> = (0..256u32)
        .map(|i| {
            let mut p: Vec<u32> = (0..1024).map(|t| (i % 16) * 10_000 + t).collect();
            p.extend((0..64).map(|t| 1_000_000 + i * 100 + t));
            p
        })
        .collect();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(prompts.len() as u64));
    // Off is the default and must cost what the engine cost before KV events existed; on
    // adds the event log (taken once at the end, as a driver would between steps).
    for (name, events) in [
        ("256_requests_instant", false),
        ("256_requests_instant_kv_events", true),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut e = Engine::new(EngineConfig {
                    profile: EngineProfile::instant(),
                    lora_adapters: vec![],
                    seed: 0,
                });
                if events {
                    e.enable_kv_events();
                }
                for (i, p) in prompts.iter().enumerate() {
                    let r = EngineRequest::new(
                        i as u64,
                        p.clone(),
                        16,
                        FinishReason::Length,
                        None,
                        KvTransfer::None,
                        16,
                    );
                    e.submit(Duration::ZERO, r).unwrap();
                }
                e.advance(Duration::ZERO);
                black_box(e.take_kv_events().len());
                black_box(e.drain_outputs().count())
            })
        });
    }
    g.finish();
}

fn tokenizer(c: &mut Criterion) {
    let text = "the quick brown fox jumps over the lazy dog ".repeat(100);
    let mut g = c.benchmark_group("tokenizer");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("4kB", |b| b.iter(|| black_box(tokenize(black_box(&text)))));
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let e = Engine::new(EngineConfig {
        profile: EngineProfile::llama_8b_h100(),
        lora_adapters: vec!["a".into()],
        seed: 0,
    });
    let labels = MetricsLabels {
        model: "meta-llama/Llama-3.1-8B-Instruct".into(),
        lora_adapters: vec!["a".into()],
    };
    c.bench_function("metrics/render", |b| {
        b.iter(|| black_box(render(&e, &labels, 1.0)))
    });
}

criterion_group!(benches, engine_requests, tokenizer, metrics);
criterion_main!(benches);
