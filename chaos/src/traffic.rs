//! Bounded client traffic: an open loop at a fixed rate for a fixed time, every request
//! recorded with its start, its end and how it ended. Prompts share per-tenant prefixes so
//! routing quality (prefix-cache hit rate) means something.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Mutex;

use crate::tier::MODEL;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx response, fully read.
    Ok,
    /// A response with another status.
    Status(u16),
    /// No response: connect error, reset or the client timeout.
    Error(String),
}

/// One request's record.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was sent, from the run's start.
    pub start: Duration,
    /// When it ended, from the run's start.
    pub end: Duration,
    /// How it ended.
    pub outcome: Outcome,
}

impl Record {
    /// Whether it failed.
    pub fn failed(&self) -> bool {
        self.outcome != Outcome::Ok
    }
}

/// Where traffic goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// One address (Envoy's listener).
    One(SocketAddr),
    /// The nodes' proxies, spread round robin; a proxy that refused a connection is skipped
    /// until a TCP health check (every 250 ms) connects again, as an L4 balancer with
    /// health checks would.
    Spread(Vec<SocketAddr>),
}

/// Traffic shape.
#[derive(Debug, Clone)]
pub struct Load {
    /// Requests per second.
    pub rate: f64,
    /// Most requests in flight (beyond it a send is counted as failed: client overload).
    pub max_in_flight: usize,
    /// Per-request deadline.
    pub timeout: Duration,
    /// Tenants (distinct shared prefixes).
    pub tenants: usize,
}

/// A body whose prompt starts with tenant `t`'s shared prefix.
pub fn prompt(t: usize, q: u64) -> String {
    let mut p = format!("System prompt of tenant {t}. ");
    for i in 0..40 {
        p.push_str(&format!("Rule {i} of tenant {t}: be exact and brief. "));
    }
    p.push_str(&format!("Question {q}: what is {q} plus {t}?"));
    serde_json::json!({"model": MODEL, "prompt": p, "max_tokens": 4, "stream": false}).to_string()
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(c)
}

async fn one(c: &HttpClient, addr: SocketAddr, body: String, timeout: Duration) -> Outcome {
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let fut = async {
        match c.request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.into_body().collect().await {
                    Ok(_) if (200..300).contains(&status) => Outcome::Ok,
                    Ok(_) => Outcome::Status(status),
                    Err(e) => Outcome::Error(format!("body: {e}")),
                }
            }
            Err(e) => Outcome::Error(format!("{e:?}").chars().take(120).collect()),
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Outcome::Error("client timeout".into()))
}

/// Runs traffic from `t0` until `until` (or `stop` is set), then waits for every request
/// still in flight (each bounded by the timeout). Returns every record, in start order.
pub async fn run(
    target: Target,
    load: Load,
    seed: u64,
    t0: Instant,
    until: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Record> {
    let c = client();
    let records = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let down: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(match &target {
        Target::One(_) => vec![None],
        Target::Spread(v) => vec![None; v.len()],
    }));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let period = Duration::from_secs_f64(1.0 / load.rate.max(0.1));
    let mut next = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut k: usize = 0;
    while t0.elapsed() < until && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next.into()).await;
        next += period;
        let start = t0.elapsed();
        if in_flight.load(Ordering::Relaxed) >= load.max_in_flight {
            records.lock().await.push(Record {
                start,
                end: start,
                outcome: Outcome::Error("client overloaded".into()),
            });
            continue;
        }
        let tenant = rng.random_range(0..load.tenants.max(1));
        let body = prompt(tenant, rng.random());
        let addr = match &target {
            Target::One(a) => *a,
            Target::Spread(v) => {
                let d = down.lock().await;
                let mut pick = k % v.len();
                for step in 0..v.len() {
                    let i = (k + step) % v.len();
                    if d[i].is_none() {
                        pick = i;
                        break;
                    }
                }
                k += 1;
                v[pick]
            }
        };
        let (c, records, in_flight, down, target, stop) = (
            c.clone(),
            records.clone(),
            in_flight.clone(),
            down.clone(),
            target.clone(),
            stop.clone(),
        );
        in_flight.fetch_add(1, Ordering::Relaxed);
        let timeout = load.timeout;
        tasks.spawn(async move {
            let outcome = one(&c, addr, body, timeout).await;
            if let (Target::Spread(v), Outcome::Error(e)) = (&target, &outcome)
                && e.contains("Connect")
                && let Some(i) = v.iter().position(|a| *a == addr)
            {
                let mut d = down.lock().await;
                if d[i].is_none() {
                    d[i] = Some(Instant::now());
                    drop(d);
                    // The health check that puts it back: bounded by the run's stop flag
                    // and an hour.
                    let (down, stop) = (down.clone(), stop.clone());
                    tokio::spawn(async move {
                        let t = Instant::now();
                        while !stop.load(Ordering::Relaxed)
                            && t.elapsed() < Duration::from_secs(3600)
                        {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            let probe = tokio::time::timeout(
                                Duration::from_millis(200),
                                tokio::net::TcpStream::connect(addr),
                            )
                            .await;
                            if matches!(probe, Ok(Ok(_))) {
                                down.lock().await[i] = None;
                                return;
                            }
                        }
                    });
                }
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
            records.lock().await.push(Record {
                start,
                end: t0.elapsed(),
                outcome,
            });
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut v = std::mem::take(&mut *records.lock().await);
    v.sort_by_key(|r| r.start);
    v
}
