//! Multi-class open-loop load for priority and fairness benchmarks: request classes with
//! their own objective and fairness-id headers and share of the load, each request
//! streamed and timed; per class, what was sent, served and rejected, TTFT percentiles and
//! goodput (served within a TTFT SLO, per second).
//!
//! Arrivals are one Poisson process at the total rate; each arrival draws its class by
//! share from a seeded RNG, so two runs with the same seed send the same sequence. Every
//! prompt is distinct (no shared prefixes): the benchmark is about admission, not caching.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::{FailureKind, HttpClient};
use crate::error::BenchError;
use crate::stats::percentile;
use crate::workload::text::{push_words, stream_id};

/// Header naming a request's InferenceObjective (llm-d).
pub const OBJECTIVE_HEADER: &str = "x-llm-d-inference-objective";
/// Header naming a request's fairness id (llm-d flow control).
pub const FAIRNESS_HEADER: &str = "x-llm-d-inference-fairness-id";

/// One class of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSpec {
    /// Name in reports.
    pub name: String,
    /// Objective header value (none: the header is not sent).
    pub objective: Option<String>,
    /// Fairness-id header value (none: not sent).
    pub fairness: Option<String>,
    /// Relative share of the load.
    pub weight: f64,
}

impl std::str::FromStr for ClassSpec {
    type Err = String;

    /// `name:objective:fairness:weight`, `-` for an absent header.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [name, objective, fairness, weight] = parts[..] else {
            return Err(format!(
                "class {s:?}: expected name:objective:fairness:weight (- for no header)"
            ));
        };
        let weight: f64 = weight
            .parse()
            .map_err(|_| format!("class {s:?}: weight {weight:?} is not a number"))?;
        if !(weight.is_finite() && weight > 0.0) {
            return Err(format!("class {s:?}: weight must be positive"));
        }
        if name.is_empty() {
            return Err(format!("class {s:?}: empty name"));
        }
        let opt = |v: &str| (v != "-" && !v.is_empty()).then(|| v.to_owned());
        Ok(ClassSpec {
            name: name.to_owned(),
            objective: opt(objective),
            fairness: opt(fairness),
            weight,
        })
    }
}

/// What one multi-class run does.
#[derive(Debug, Clone)]
pub struct ClassesSpec {
    /// Router base URLs; requests are spread over them at random (seeded).
    pub targets: Vec<String>,
    /// Model name in every body.
    pub model: String,
    /// The classes (at least one).
    pub classes: Vec<ClassSpec>,
    /// Total arrival rate, requests/s.
    pub qps: f64,
    /// Arrivals stop after this long.
    pub duration: Duration,
    /// Prompt length, tokens (4-byte words).
    pub prompt_tokens: usize,
    /// `max_tokens` of every request.
    pub output_tokens: usize,
    /// A served request counts toward goodput when its TTFT is at most this.
    pub ttft_slo: Duration,
    /// Longest a request may take.
    pub request_timeout: Duration,
    /// RNG seed (arrivals, classes, targets, prompt text).
    pub seed: u64,
    /// Label in reports.
    pub label: String,
}

/// Per-class results of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassResult {
    /// Class name.
    pub name: String,
    /// Requests sent.
    pub sent: u64,
    /// Requests answered with a complete stream.
    pub served: u64,
    /// Non-200 answers by status (429, 503, ...).
    pub rejected: BTreeMap<u16, u64>,
    /// Connect errors, timeouts, broken streams.
    pub failed: u64,
    /// TTFT of served requests, p50 (ms).
    pub ttft_p50_ms: Option<f64>,
    /// TTFT of served requests, p99 (ms).
    pub ttft_p99_ms: Option<f64>,
    /// Served within the TTFT SLO, per second of the run.
    pub goodput_rps: f64,
}

/// The report of one multi-class run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassesReport {
    /// Router label.
    pub label: String,
    /// Offered total rate, requests/s.
    pub qps: f64,
    /// Arrival window, s.
    pub duration_s: f64,
    /// TTFT SLO, ms.
    pub ttft_slo_ms: f64,
    /// Per class, in the order given.
    pub classes: Vec<ClassResult>,
    /// Every request in order of sending (written by `--trace`, not kept in the JSON).
    #[serde(skip)]
    pub requests: Vec<RequestRecord>,
}

impl ClassesReport {
    /// Served requests of every class.
    pub fn served(&self) -> u64 {
        self.classes.iter().map(|c| c.served).sum()
    }

    /// Goodput of every class together, requests/s.
    pub fn goodput_rps(&self) -> f64 {
        self.classes.iter().map(|c| c.goodput_rps).sum()
    }

    /// The class named `name`.
    pub fn class(&self, name: &str) -> Option<&ClassResult> {
        self.classes.iter().find(|c| c.name == name)
    }
}

/// Validates `spec` before anything is sent.
fn validate(spec: &ClassesSpec) -> Result<(), BenchError> {
    let bad = |field: &'static str, reason: String| BenchError::InvalidSpec {
        field,
        problem: reason,
    };
    if spec.targets.is_empty() {
        return Err(bad("targets", "give at least one router URL".into()));
    }
    if spec.classes.is_empty() {
        return Err(bad("classes", "give at least one class".into()));
    }
    if !(spec.qps.is_finite() && spec.qps > 0.0) {
        return Err(bad("qps", format!("must be positive, got {}", spec.qps)));
    }
    if spec.prompt_tokens == 0 {
        return Err(bad("prompt-tokens", "must be positive".into()));
    }
    if spec.output_tokens == 0 {
        return Err(bad("output-tokens", "must be positive".into()));
    }
    Ok(())
}

struct Outcome {
    class: usize,
    sent: Duration,
    result: Result<f64, FailureKind>,
}

/// One request of a run, for `--trace`: when it was sent and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Index of its class in the spec.
    pub class: usize,
    /// Seconds after the run's start at which it was sent.
    pub sent_s: f64,
    /// TTFT in ms when served.
    pub ttft_ms: Option<f64>,
    /// HTTP status when refused; `None` when served or failed otherwise.
    pub status: Option<u16>,
}

/// Runs the load and returns per-class results. Always stops: arrivals end after
/// `duration` and every request is bounded by `request_timeout`.
pub async fn run_classes(spec: ClassesSpec) -> Result<ClassesReport, BenchError> {
    validate(&spec)?;
    let uris: Vec<Uri> = spec
        .targets
        .iter()
        .map(|base| {
            let url = format!("{}/v1/completions", base.trim_end_matches('/'));
            url.parse()
                .map_err(|source| BenchError::InvalidUrl { url, source })
        })
        .collect::<Result<_, _>>()?;
    let headers: Vec<Vec<(HeaderName, HeaderValue)>> = spec
        .classes
        .iter()
        .map(|c| {
            let mut h = Vec::new();
            for (name, v) in [
                (OBJECTIVE_HEADER, &c.objective),
                (FAIRNESS_HEADER, &c.fairness),
            ] {
                if let Some(v) = v {
                    let value = HeaderValue::from_str(v).map_err(|_| BenchError::InvalidSpec {
                        field: "classes",
                        problem: format!("{v:?} is not a valid header value"),
                    })?;
                    h.push((HeaderName::from_static(name), value));
                }
            }
            Ok(h)
        })
        .collect::<Result<_, BenchError>>()?;
    let total: f64 = spec.classes.iter().map(|c| c.weight).sum();
    let client = HttpClient::new();
    let headers = Arc::new(headers);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let gap = Exp::new(spec.qps).map_err(|e| BenchError::InvalidSpec {
        field: "qps",
        problem: e.to_string(),
    })?;
    let start = Instant::now();
    let mut next = Duration::ZERO;
    let mut i: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while next < spec.duration {
        tokio::time::sleep_until((start + next).into()).await;
        let mut pick = rng.random_range(0.0..total);
        let class = spec
            .classes
            .iter()
            .position(|c| {
                pick -= c.weight;
                pick < 0.0
            })
            .unwrap_or(spec.classes.len() - 1);
        let uri = uris[rng.random_range(0..uris.len())].clone();
        let mut prompt = String::new();
        push_words(
            spec.seed,
            stream_id(7, i, class as u64),
            spec.prompt_tokens,
            &mut prompt,
        );
        let body = Bytes::from(
            serde_json::to_vec(&json!({
                "model": spec.model,
                "prompt": prompt,
                "max_tokens": spec.output_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
                "temperature": 0.0,
                "ignore_eos": true,
            }))
            .unwrap_or_default(),
        );
        let (client, headers, tx) = (client.clone(), Arc::clone(&headers), tx.clone());
        let timeout = spec.request_timeout;
        let sent = next;
        tasks.spawn(async move {
            let result = client
                .stream(uri, body, &headers[class], timeout)
                .await
                .map(|s| s.ttft);
            let _ = tx.send(Outcome {
                class,
                sent,
                result,
            });
        });
        i += 1;
        next += Duration::from_secs_f64(gap.sample(&mut rng));
    }
    drop(tx);
    while tasks.join_next().await.is_some() {}
    let mut per: Vec<(ClassResult, Vec<f64>)> = spec
        .classes
        .iter()
        .map(|c| {
            (
                ClassResult {
                    name: c.name.clone(),
                    ..ClassResult::default()
                },
                Vec::new(),
            )
        })
        .collect();
    let slo = spec.ttft_slo.as_secs_f64();
    let secs = spec.duration.as_secs_f64();
    let mut requests = Vec::new();
    while let Some(o) = rx.recv().await {
        let (r, ttfts) = &mut per[o.class];
        r.sent += 1;
        let mut record = RequestRecord {
            class: o.class,
            sent_s: o.sent.as_secs_f64(),
            ttft_ms: None,
            status: None,
        };
        match o.result {
            Ok(ttft) => {
                r.served += 1;
                if ttft <= slo {
                    r.goodput_rps += 1.0 / secs;
                }
                ttfts.push(ttft * 1e3);
                record.ttft_ms = Some(ttft * 1e3);
            }
            Err(FailureKind::Status(s)) => {
                *r.rejected.entry(s).or_default() += 1;
                record.status = Some(s);
            }
            Err(_) => r.failed += 1,
        }
        requests.push(record);
    }
    requests.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    let classes = per
        .into_iter()
        .map(|(mut r, mut t)| {
            t.sort_by(f64::total_cmp);
            r.ttft_p50_ms = percentile(&t, 50.0);
            r.ttft_p99_ms = percentile(&t, 99.0);
            r
        })
        .collect();
    Ok(ClassesReport {
        label: spec.label,
        qps: spec.qps,
        duration_s: secs,
        ttft_slo_ms: spec.ttft_slo.as_secs_f64() * 1e3,
        classes,
        requests,
    })
}

/// Every request of `r` as CSV: class name, seconds sent after the start, TTFT ms (empty
/// unless served), refusal status (empty unless refused).
pub fn trace_csv(r: &ClassesReport) -> String {
    let mut out = String::from("class,sent_s,ttft_ms,status\n");
    for q in &r.requests {
        let name = r.classes.get(q.class).map_or("?", |c| c.name.as_str());
        let ttft = q.ttft_ms.map(|t| format!("{t:.1}")).unwrap_or_default();
        let status = q.status.map(|s| s.to_string()).unwrap_or_default();
        out.push_str(&format!("{name},{:.4},{ttft},{status}\n", q.sent_s));
    }
    out
}

/// One markdown row per class of `r`.
pub fn class_rows(r: &ClassesReport) -> String {
    let ms = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.0}"));
    let mut out = String::new();
    for c in &r.classes {
        let rejected: Vec<String> = c.rejected.iter().map(|(s, n)| format!("{n}×{s}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            r.label,
            c.name,
            c.sent,
            c.served,
            if rejected.is_empty() {
                "0".to_owned()
            } else {
                rejected.join(", ")
            },
            c.failed,
            ms(c.ttft_p50_ms),
            ms(c.ttft_p99_ms),
            c.goodput_rps
        );
    }
    out
}

/// Class names the priority targets refer to.
#[derive(Debug, Clone, Copy)]
pub struct PriorityNames<'a> {
    /// The critical objective's class.
    pub critical: &'a str,
    /// The light tenant's class (standard objective).
    pub light: &'a str,
    /// The sheddable objective's class.
    pub sheddable: &'a str,
}

fn rejected(c: &ClassResult) -> u64 {
    c.rejected.values().sum::<u64>()
}

/// The overload-priority table: every leg's rows, then each target checked against the
/// figures (met / NOT met, with the numbers). `unloaded` is infermesh at low load.
pub fn priority_table(
    unloaded: &ClassesReport,
    one: &ClassesReport,
    three: &[ClassesReport],
    peers: &[ClassesReport],
    names: &PriorityNames<'_>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| router | class | sent | served | rejected (count×status) | other failures | TTFT p50 ms | TTFT p99 ms | goodput req/s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for r in std::iter::once(unloaded)
        .chain(std::iter::once(one))
        .chain(three.iter())
        .chain(peers)
    {
        out.push_str(&class_rows(r));
    }
    let _ = writeln!(out);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let p99 = |r: &ClassesReport, class: &str| r.class(class).and_then(|c| c.ttft_p99_ms);
    let legs: Vec<&ClassesReport> = std::iter::once(one).chain(three.iter()).collect();
    for class in [names.critical, names.light] {
        let Some(base) = p99(unloaded, class) else {
            let _ = writeln!(
                out,
                "- {class}: no unloaded TTFT p99 (no request served at low load)"
            );
            continue;
        };
        for leg in &legs {
            match p99(leg, class) {
                Some(v) => {
                    let _ = writeln!(
                        out,
                        "- {class} TTFT p99 under overload, {}: {v:.0} ms = {:.2}× its unloaded p99 ({base:.0} ms); target ≤ 1.5×: {}",
                        leg.label,
                        v / base,
                        verdict(v <= 1.5 * base)
                    );
                }
                None => {
                    let _ = writeln!(out, "- {class}, {}: no request served: NOT met", leg.label);
                }
            }
        }
    }
    for leg in &legs {
        let total_rejected: u64 = leg.classes.iter().map(rejected).sum();
        let shed = leg.class(names.sheddable).map_or(0, rejected);
        let share = if total_rejected == 0 {
            1.0
        } else {
            shed as f64 / total_rejected as f64
        };
        let crit = leg.class(names.critical).map_or(0, rejected);
        let _ = writeln!(
            out,
            "- rejections, {}: {shed} of {total_rejected} ({:.0}%) were sheddable; critical rejected {crit}; target: sheddable takes the rejections: {}",
            leg.label,
            share * 100.0,
            verdict(crit == 0 && (total_rejected == 0 || shed > 0))
        );
    }
    match peers
        .iter()
        .max_by(|a, b| a.goodput_rps().total_cmp(&b.goodput_rps()))
    {
        Some(best) => {
            for leg in &legs {
                let ratio = leg.goodput_rps() / best.goodput_rps();
                let _ = writeln!(
                    out,
                    "- goodput (served with TTFT ≤ {:.0} ms), {}: {:.2} req/s vs the best peer setting ({}: {:.2} req/s) = {ratio:.2}×; target ≥ 1.5×: {}",
                    leg.ttft_slo_ms,
                    leg.label,
                    leg.goodput_rps(),
                    best.label,
                    best.goodput_rps(),
                    verdict(ratio >= 1.5)
                );
            }
        }
        None => {
            let _ = writeln!(out, "- goodput against a peer: no peer leg ran");
        }
    }
    for three in three {
        let ratio = three.served() as f64 / one.served().max(1) as f64;
        let _ = writeln!(
            out,
            "- admitted and served, {} vs 1 node: {} vs {} = {ratio:.2}×; target ≤ 1.1×: {}",
            three.label,
            three.served(),
            one.served(),
            verdict(ratio <= 1.1)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_specs_parse_and_bad_ones_are_named() {
        let c: ClassSpec = "light:standard:tenant-b:1".parse().unwrap();
        assert_eq!(c.objective.as_deref(), Some("standard"));
        assert_eq!(c.fairness.as_deref(), Some("tenant-b"));
        let c: ClassSpec = "plain:-:-:2.5".parse().unwrap();
        assert_eq!((c.objective, c.fairness, c.weight), (None, None, 2.5));
        for (bad, want) in [
            ("a:b:c", "expected name:objective:fairness:weight"),
            ("a:b:c:x", "is not a number"),
            ("a:b:c:0", "must be positive"),
            (":b:c:1", "empty name"),
        ] {
            let e = bad.parse::<ClassSpec>().unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn report_totals_add_up_over_classes() {
        let r = ClassesReport {
            classes: vec![
                ClassResult {
                    name: "a".into(),
                    served: 3,
                    goodput_rps: 1.5,
                    ..Default::default()
                },
                ClassResult {
                    name: "b".into(),
                    served: 2,
                    goodput_rps: 0.5,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(r.served(), 5);
        assert_eq!(r.goodput_rps(), 2.0);
        assert_eq!(r.class("b").unwrap().served, 2);
        assert!(r.class("c").is_none());
    }

    #[test]
    fn the_trace_names_each_request_and_how_it_ended() {
        let r = ClassesReport {
            classes: vec![ClassResult {
                name: "light".into(),
                ..Default::default()
            }],
            requests: vec![
                RequestRecord {
                    class: 0,
                    sent_s: 0.5,
                    ttft_ms: Some(210.04),
                    status: None,
                },
                RequestRecord {
                    class: 0,
                    sent_s: 1.25,
                    ttft_ms: None,
                    status: Some(429),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            trace_csv(&r),
            "class,sent_s,ttft_ms,status\nlight,0.5000,210.0,\nlight,1.2500,,429\n"
        );
    }

    fn leg(label: &str, crit_p99: f64, shed_rejected: u64, goodput: f64) -> ClassesReport {
        let class = |name: &str, p99: f64, rej: u64, good: f64| ClassResult {
            name: name.into(),
            sent: 10,
            served: 10 - rej,
            rejected: if rej > 0 {
                BTreeMap::from([(429, rej)])
            } else {
                BTreeMap::new()
            },
            ttft_p99_ms: Some(p99),
            goodput_rps: good,
            ..Default::default()
        };
        ClassesReport {
            label: label.into(),
            ttft_slo_ms: 1000.0,
            classes: vec![
                class("critical", crit_p99, 0, goodput),
                class("light", 100.0, 0, 0.0),
                class("sheddable", 100.0, shed_rejected, 0.0),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn priority_targets_are_judged_from_the_figures() {
        let names = PriorityNames {
            critical: "critical",
            light: "light",
            sheddable: "sheddable",
        };
        let unloaded = leg("unloaded", 100.0, 0, 1.0);
        let good = leg("im", 140.0, 5, 3.0);
        let peer = leg("peer", 900.0, 0, 1.0);
        let t = priority_table(&unloaded, &good, &[], std::slice::from_ref(&peer), &names);
        assert!(
            t.contains("critical TTFT p99 under overload, im: 140 ms = 1.40×"),
            "{t}"
        );
        assert!(t.contains("= 3.00×; target ≥ 1.5×: met"), "{t}");
        assert!(!t.contains("NOT met"), "{t}");
        let slow = leg("im", 160.0, 5, 1.2);
        let t = priority_table(&unloaded, &slow, &[], &[peer], &names);
        assert!(
            t.contains("1.60× its unloaded p99 (100 ms); target ≤ 1.5×: NOT met"),
            "{t}"
        );
        assert!(t.contains("= 1.20×; target ≥ 1.5×: NOT met"), "{t}");
    }
}
