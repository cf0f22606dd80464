//! Driving one run: scrape, dispatch (open or closed loop), drain, scrape, summarise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::{FailureKind, HttpClient, Record};
use crate::error::BenchError;
use crate::health::{self, Health};
use crate::oracle::{BLOCK_TOKENS, oracle_bound};
use crate::report::Report;
use crate::scrape::{PodCounters, parse_counters};
use crate::spec::{Api, Load, RunSpec, Target};
use crate::timeline::{RequestTiming, Timeline};
use crate::workload::PlannedRequest;

/// RNG stream for arrival times, apart from the workload's streams.
const ARRIVAL_STREAM: u64 = 0x4152_5249_5645;
/// RNG stream for random target picks.
const SPREAD_STREAM: u64 = 0x5350_5245_4144;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

struct Shared {
    client: HttpClient,
    targets: Vec<Uri>,
    /// Index into `targets` for each request of the plan (the preferred one under
    /// `Target::Balanced`, which skips URLs that are down).
    target_of: Vec<u32>,
    /// Health of each target under `Target::Balanced`.
    health: Option<Health>,
    /// Per request of the plan: the bits of its `sent_at` once sent, so a request still
    /// in flight when the run is cut off keeps its real send time.
    sent_at: Vec<AtomicU64>,
    /// Per request of the plan: the URL it went to, once sent.
    sent_to: Vec<AtomicUsize>,
    plan: Vec<PlannedRequest>,
    spec: RunSpec,
    start: Instant,
    records: mpsc::UnboundedSender<Record>,
    bar: ProgressBar,
}

impl Shared {
    fn body(&self, req: &PlannedRequest) -> Bytes {
        let seed = self.spec.seed;
        let mut v = json!({
            "model": self.spec.model,
            "max_tokens": req.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0.0,
            "ignore_eos": true,
        });
        match self.spec.api {
            Api::Completions => v["prompt"] = json!(req.render_prompt(seed)),
            Api::Chat => {
                let mut messages: Vec<serde_json::Value> = req
                    .render_messages(seed)
                    .into_iter()
                    .map(|(role, content)| json!({"role": role.as_str(), "content": content}))
                    .collect();
                // Images ride on the last message as `image_url` parts after its text.
                if let Some(last) = messages.last_mut()
                    && !req.images.is_empty()
                {
                    let mut parts = vec![json!({"type": "text", "text": last["content"].take()})];
                    parts.extend(
                        req.image_urls(seed)
                            .into_iter()
                            .map(|url| json!({"type": "image_url", "image_url": {"url": url}})),
                    );
                    last["content"] = json!(parts);
                }
                v["messages"] = json!(messages);
            }
        }
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }

    async fn send(&self, index: usize) {
        let req = &self.plan[index];
        let body = self.body(req);
        let preferred = self.target_of[index] as usize;
        let target = self
            .health
            .as_ref()
            .map_or(preferred, |h| h.pick(preferred));
        let uri = self.targets[target].clone();
        let sent_at = self.start.elapsed().as_secs_f64();
        self.sent_at[index].store(sent_at.to_bits(), Ordering::Relaxed);
        self.sent_to[index].store(target, Ordering::Relaxed);
        let result = self
            .client
            .stream(uri, body, &[], self.spec.request_timeout)
            .await;
        if let (Some(h), Err(FailureKind::Connect)) = (&self.health, &result) {
            h.handle_connect_failure(target, self.start.elapsed().as_millis() as u64);
        }
        let done_at = self.start.elapsed().as_secs_f64();
        self.bar.inc(1);
        let _ = self.records.send(Record {
            index,
            target,
            sent_at,
            done_at,
            result,
        });
    }
}

fn endpoint(base: &str, api: Api) -> Result<Uri, BenchError> {
    let path = match api {
        Api::Completions => "/v1/completions",
        Api::Chat => "/v1/chat/completions",
    };
    let url = format!("{}{path}", base.trim_end_matches('/'));
    url.parse()
        .map_err(|source| BenchError::InvalidUrl { url, source })
}

fn metrics_uri(base: &str) -> Result<Uri, BenchError> {
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    url.parse()
        .map_err(|source| BenchError::InvalidUrl { url, source })
}

async fn scrape_all(client: &HttpClient, bases: &[String]) -> Vec<Result<PodCounters, BenchError>> {
    let futs = bases.iter().map(|base| async move {
        let uri = metrics_uri(base)?;
        let text = client
            .get_text(uri, SCRAPE_TIMEOUT)
            .await
            .map_err(|source| BenchError::Scrape {
                url: base.clone(),
                source,
            })?;
        parse_counters(&text).map_err(|source| BenchError::Scrape {
            url: base.clone(),
            source,
        })
    });
    futures::future::join_all(futs).await
}

/// Which target each of `n` requests goes to: request i to i mod k under round robin, a
/// seeded uniform pick under random spread.
fn spread(target: &Target, seed: u64, n: usize) -> Vec<u32> {
    let k = target.base_urls().len().max(1) as u32;
    match target {
        Target::Random(_) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(SPREAD_STREAM);
            (0..n).map(|_| rng.random_range(0..k)).collect()
        }
        Target::Url(_) | Target::RoundRobin(_) | Target::Balanced(_) => {
            (0..n as u32).map(|i| i % k).collect()
        }
    }
}

fn progress_bar(enabled: bool, len: usize) -> ProgressBar {
    if !(enabled && std::io::stderr().is_terminal()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// Runs one benchmark and returns its report. Always stops: at most `max_requests` are
/// sent, none after `max_duration`, and in-flight ones are abandoned after
/// `drain_timeout`.
pub async fn run(spec: RunSpec) -> Result<Report, BenchError> {
    run_with_timeline(spec).await.map(|(report, _)| report)
}

/// [`run`], also returning every request's send time, end time, URL and outcome.
pub async fn run_with_timeline(spec: RunSpec) -> Result<(Report, Timeline), BenchError> {
    spec.validate()?;
    let targets = spec
        .target
        .base_urls()
        .iter()
        .map(|b| endpoint(b, spec.api))
        .collect::<Result<Vec<_>, _>>()?;
    let client = HttpClient::new();
    let before: Vec<PodCounters> = scrape_all(&client, &spec.pod_metrics)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let plan = spec.workload.plan(spec.seed, spec.max_requests);
    let n = plan.len();
    let target_of = spread(&spec.target, spec.seed, n);
    let health = matches!(spec.target, Target::Balanced(_)).then(|| Health::new(targets.len()));
    let authorities: Vec<String> = targets
        .iter()
        .map(|u| u.authority().map(|a| a.to_string()).unwrap_or_default())
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let bar = progress_bar(spec.progress, n);
    bar.set_message(spec.label.clone());
    let start = Instant::now();
    let deadline = start + spec.max_duration;
    let shared = Arc::new(Shared {
        client: client.clone(),
        targets,
        target_of,
        health,
        sent_at: (0..n).map(|_| AtomicU64::new(u64::MAX)).collect(),
        sent_to: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        plan,
        spec,
        start,
        records: tx,
        bar: bar.clone(),
    });
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    // The balanced target's health checker lives as long as requests may be in flight.
    let checker = shared.health.is_some().then(|| {
        let s = shared.clone();
        let until = deadline + s.spec.drain_timeout;
        tokio::spawn(async move {
            if let Some(h) = &s.health {
                health::check_loop(h, &authorities, s.start, until).await;
            }
        })
    });

    match shared.spec.load {
        Load::Poisson { qps } => {
            let mut rng = ChaCha8Rng::seed_from_u64(shared.spec.seed);
            rng.set_stream(ARRIVAL_STREAM);
            // validate() guarantees qps > 0 and finite, which is all Exp::new checks.
            let exp = Exp::new(qps).map_err(|e| BenchError::InvalidSpec {
                field: "qps",
                problem: e.to_string(),
            })?;
            let mut t = 0.0f64;
            for i in 0..n {
                if i > 0 {
                    t += exp.sample(&mut rng);
                }
                let at = start + Duration::from_secs_f64(t);
                if at >= deadline {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                sent.fetch_add(1, Ordering::Relaxed);
                let s = shared.clone();
                tasks.spawn(async move { s.send(i).await });
            }
        }
        Load::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..concurrency.min(n) {
                let (s, next, sent) = (shared.clone(), next.clone(), sent.clone());
                tasks.spawn(async move {
                    loop {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        s.send(i).await;
                    }
                });
            }
        }
    }
    // Closed-loop workers stop sending at the deadline by themselves; whatever is still
    // in flight `drain_timeout` after the deadline is abandoned.
    let _ = tokio::time::timeout_at((deadline + shared.spec.drain_timeout).into(), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(c) = checker {
        c.abort();
        let _ = c.await;
    }
    bar.finish_and_clear();

    let spec = shared.spec.clone();
    let sent = sent.load(Ordering::Relaxed);
    let mut records = Vec::with_capacity(sent);
    while let Ok(r) = rx.try_recv() {
        records.push(r);
    }
    // Requests abandoned in flight: every index below `sent` without a record was
    // started (or about to be), in plan order under both loads.
    let elapsed = start.elapsed().as_secs_f64();
    let mut finished = vec![false; n];
    for r in &records {
        finished[r.index] = true;
    }
    for index in (0..sent.min(n)).filter(|&i| !finished[i]) {
        let bits = shared.sent_at[index].load(Ordering::Relaxed);
        records.push(Record {
            index,
            target: shared.sent_to[index].load(Ordering::Relaxed),
            sent_at: if bits == u64::MAX {
                elapsed
            } else {
                f64::from_bits(bits)
            },
            done_at: elapsed,
            result: Err(FailureKind::Unfinished),
        });
    }
    drop(shared);
    records.sort_by(|a, b| a.sent_at.total_cmp(&b.sent_at));
    let timeline = Timeline {
        start,
        requests: records
            .iter()
            .map(|r| RequestTiming {
                sent_at: r.sent_at,
                done_at: r.done_at,
                target: r.target,
                failure: r.result.as_ref().err().copied(),
            })
            .collect(),
    };

    let after = scrape_all(&client, &spec.pod_metrics).await;
    let plan_sent = spec.workload.plan(spec.seed, sent);
    let seed = spec.seed;
    let oracle = tokio::task::spawn_blocking(move || oracle_bound(seed, &plan_sent, BLOCK_TOKENS))
        .await
        .unwrap_or_default();
    let report = Report::build(&spec, &records, &before, &after, oracle);
    Ok((report, timeline))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_round_robin_or_a_seeded_random_pick() {
        let urls = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(
            spread(&Target::RoundRobin(urls.clone()), 1, 5),
            [0, 1, 2, 0, 1]
        );
        assert_eq!(spread(&Target::Url("a".into()), 1, 3), [0, 0, 0]);
        let r = spread(&Target::Random(urls.clone()), 9, 3000);
        assert_eq!(r, spread(&Target::Random(urls.clone()), 9, 3000));
        for t in 0..3 {
            let c = r.iter().filter(|&&x| x == t).count();
            assert!((800..1200).contains(&c), "target {t} got {c} of 3000");
        }
    }
}
