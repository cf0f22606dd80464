//! What a run showed: per fault window, how many requests failed and when, how long
//! routing took to recover and the tier to converge; writes acknowledged and lost; a
//! Markdown report and an SVG timeline (requests/s, errors/s, members, Raft leader).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::run::{RunResult, Window};
use crate::scenario::FaultKind;
use crate::traffic::Record;
use crate::writes::WriteOutcome;

/// Figures of one fault window.
#[derive(Debug, Clone)]
pub struct WindowFigures {
    /// Requests started in the window.
    pub sent: usize,
    /// Of them, failed.
    pub failed: usize,
    /// Failed requests that were in flight when an event (injection, step, heal) happened.
    pub failed_in_flight: usize,
    /// Failed requests neither in flight at an event nor started within the detection
    /// window after one: the failures the tier should not have had.
    pub failed_after_window: usize,
    /// From the injection to the start of the last request that failed before the heal
    /// (zero when none failed).
    pub failover: Duration,
    /// Longest stretch without a successful response, from the injection to the end of
    /// the window.
    pub longest_gap: Duration,
    /// Policy writes acknowledged between injection and heal.
    pub writes_acked: usize,
    /// From the heal to convergence.
    pub converge: Option<Duration>,
}

/// Computes a window's figures.
pub fn figures(
    w: &Window,
    records: &[Record],
    result: &RunResult,
    detection: Duration,
) -> WindowFigures {
    let start = w.inject.saturating_sub(crate::run::PRE);
    let end = w.end;
    let in_win: Vec<&Record> = records
        .iter()
        .filter(|r| r.start >= start && r.start < end)
        .collect();
    let failed: Vec<&&Record> = in_win.iter().filter(|r| r.failed()).collect();
    let in_flight = |r: &Record| w.events.iter().any(|&e| r.start < e && r.end >= e);
    let explained = |r: &Record| {
        in_flight(r)
            || w.events
                .iter()
                .any(|&e| r.start >= e && r.start < e + detection)
    };
    let failed_in_flight = failed.iter().filter(|r| in_flight(r)).count();
    let failed_after_window = failed.iter().filter(|r| !explained(r)).count();
    let failover = failed
        .iter()
        .filter(|r| r.start >= w.inject && r.start < w.heal)
        .map(|r| r.start - w.inject)
        .max()
        .unwrap_or_default();
    let mut ok_ends: Vec<Duration> = records
        .iter()
        .filter(|r| !r.failed() && r.end >= w.inject && r.end < end)
        .map(|r| r.end)
        .collect();
    ok_ends.sort();
    let mut longest_gap = Duration::ZERO;
    let mut prev = w.inject;
    for e in ok_ends
        .iter()
        .chain(std::iter::once(&end.min(result.elapsed)))
    {
        longest_gap = longest_gap.max(e.saturating_sub(prev));
        prev = prev.max(*e);
    }
    let writes_acked = result
        .writes
        .iter()
        .filter(|x| matches!(x.outcome, WriteOutcome::Acked(_)))
        .filter(|x| {
            let at = x.complete.saturating_duration_since(result.t0);
            at >= w.inject && at < w.heal
        })
        .count();
    WindowFigures {
        sent: in_win.len(),
        failed: failed.len(),
        failed_in_flight,
        failed_after_window,
        failover,
        longest_gap,
        writes_acked,
        converge: w.converged.map(|c| c.saturating_sub(w.heal)),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The run's verdict on the invariants that must hold.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Broken invariants, each named.
    pub broken: Vec<String>,
}

/// Checks the invariants: no acknowledged write lost, the tier converged after every
/// fault and at the end, and (for faults the tier is built to absorb) no request failed
/// after the detection window.
pub fn verdict(result: &RunResult) -> Verdict {
    let mut broken = Vec::new();
    match &result.write_check {
        Ok(s) if s.lost > 0 => broken.push(format!("{} acknowledged writes lost", s.lost)),
        Ok(_) => {}
        Err(e) => broken.push(format!("write history check failed: {e}")),
    }
    if !result.final_converged {
        broken.push("the tier did not converge at the end".into());
    }
    for w in &result.windows {
        if w.converged.is_none() {
            broken.push(format!(
                "{} round {}: no convergence after the heal",
                w.kind, w.round
            ));
        }
        // Routing quality: a node fault leaves the pods' caches alone, so the hit rate must
        // come back to within 2 points of what it was before.
        if w.kind.strikes_node()
            && absorbed(w.kind)
            && let (Some(b), Some(a)) = (w.hit_before, w.hit_after)
            && a < b - 0.02
        {
            broken.push(format!(
                "{} round {}: prefix-cache hit rate {:.1}% after recovery, {:.1}% before",
                w.kind,
                w.round,
                a * 100.0,
                b * 100.0
            ));
        }
        let f = figures(w, &result.records, result, result.opts.detection);
        if absorbed(w.kind) && f.failed_after_window > 0 {
            broken.push(format!(
                "{} round {}: {} requests failed after the detection window",
                w.kind, w.round, f.failed_after_window
            ));
        }
    }
    Verdict { broken }
}

/// Faults the tier is built to absorb without failures past the detection window (a
/// dead Envoy or a lost majority is outside what the tier can hide).
pub fn absorbed(kind: FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::Kill
            | FaultKind::Pause
            | FaultKind::PauseAds
            | FaultKind::Partition
            | FaultKind::Blackhole
            | FaultKind::PodKill
            | FaultKind::RollingRestart
            | FaultKind::LeaderKill
            | FaultKind::LeaderPartition
    )
}

/// Renders the Markdown report.
pub fn markdown(result: &RunResult, svg_name: Option<&str>) -> String {
    let o = &result.opts;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Chaos run: scenario `{}`, seed {}\n\nGenerated by `infermesh-chaos run --scenario {} --seed {}{}{}` ({} mode, {} nodes, {} pods, traffic {} at {} req/s, {} policy writers, detection window {} ms; run took {:.0} s; load average before {}, after {}; 2 CPUs shared by every process of the tier and the driver).\n",
        o.scenario.name,
        o.seed,
        o.scenario.name,
        o.seed,
        match result.mode {
            crate::net::Mode::Netns => " --mode netns",
            crate::net::Mode::Loopback => " --mode loopback",
        },
        if o.plain_ads {
            " --plain-ads-bootstrap"
        } else {
            ""
        },
        match result.mode {
            crate::net::Mode::Netns => "network-namespace",
            crate::net::Mode::Loopback => "loopback",
        },
        o.size.nodes,
        o.size.pods,
        if result.envoy {
            format!("spread over {} Envoys (ADS from the tier)", result.envoys)
        } else {
            "spread over the nodes' proxies".to_owned()
        },
        o.rate,
        o.writers,
        o.detection.as_millis(),
        result.elapsed.as_secs_f64(),
        result.load.0,
        result.load.1
    );
    let v = verdict(result);
    if v.broken.is_empty() {
        s.push_str("**Invariants held**: no acknowledged write lost, the tier converged after every fault, no request failed after the detection window where the tier should absorb the fault, and after every node fault the prefix-cache hit rate came back to within 2 points.\n\n");
    } else {
        s.push_str("**Invariants broken:**\n");
        for b in &v.broken {
            let _ = writeln!(s, "- {b}");
        }
        s.push('\n');
    }
    s.push_str("| fault | round | victim | sent | failed | in flight at an event | failed after window | out of rotation ms | last failure ms | longest gap ms | writes acked | converge ms | hit before | hit after | note |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for w in &result.windows {
        let f = figures(w, &result.records, result, o.detection);
        let pct = |h: Option<f64>| h.map_or("–".into(), |h| format!("{:.1}%", h * 100.0));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            w.kind,
            w.round,
            w.victim,
            f.sent,
            f.failed,
            f.failed_in_flight,
            f.failed_after_window,
            w.detected.map_or("–".into(), ms),
            ms(f.failover),
            ms(f.longest_gap),
            f.writes_acked,
            f.converge.map_or("never".into(), ms),
            pct(w.hit_before),
            pct(w.hit_after),
            w.note
        );
    }
    // Per kind: failover distribution.
    s.push_str("\n| fault | rounds | failed (sum) | failed after window (sum) | out of rotation p50 ms | out of rotation p99 ms | last failure p50 ms | last failure p99 ms | converge p50 ms | converge p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for kind in FaultKind::ALL {
        let ws: Vec<&Window> = result.windows.iter().filter(|w| w.kind == kind).collect();
        if ws.is_empty() {
            continue;
        }
        let figs: Vec<WindowFigures> = ws
            .iter()
            .map(|w| figures(w, &result.records, result, o.detection))
            .collect();
        let mut fo: Vec<Duration> = figs.iter().map(|f| f.failover).collect();
        fo.sort();
        let mut cv: Vec<Duration> = figs.iter().filter_map(|f| f.converge).collect();
        cv.sort();
        let mut det: Vec<Duration> = ws.iter().filter_map(|w| w.detected).collect();
        det.sort();
        let det_cell = |p: f64| {
            if det.is_empty() {
                "–".to_owned()
            } else {
                ms(percentile(&det, p))
            }
        };
        let _ = writeln!(
            s,
            "| {kind} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ws.len(),
            figs.iter().map(|f| f.failed).sum::<usize>(),
            figs.iter().map(|f| f.failed_after_window).sum::<usize>(),
            det_cell(0.5),
            det_cell(0.99),
            ms(percentile(&fo, 0.5)),
            ms(percentile(&fo, 0.99)),
            ms(percentile(&cv, 0.5)),
            ms(percentile(&cv, 0.99)),
        );
    }
    let total = result.records.len();
    let failed = result.records.iter().filter(|r| r.failed()).count();
    let _ = writeln!(
        s,
        "\nRequests: {total} sent, {failed} failed over the whole run."
    );
    match &result.write_check {
        Ok(w) => {
            let _ = writeln!(
                s,
                "Policy writes: {} sent, {} acknowledged, **{} acknowledged writes lost** (history checked against every node's final state; all nodes hold the same objects).",
                w.sent, w.acked, w.lost
            );
        }
        Err(e) => {
            let _ = writeln!(s, "Policy writes: the history check failed: {e}");
        }
    }
    let _ = writeln!(
        s,
        "Final convergence (members, Raft leader and applied index, xDS versions, Envoy in sync): {}.",
        if result.final_converged {
            "yes"
        } else {
            "**no**"
        }
    );
    for k in &result.skipped {
        let _ = writeln!(s, "Skipped: {k}.");
    }
    s.push_str("\nColumns: *failed after window* counts failed requests that were neither in flight at an event (injection, intermediate step, heal) nor started within the detection window after one. *out of rotation*: injection → every other node has dropped the victim from the ext_proc endpoints it serves Envoy (the failover time). *last failure*: injection → start of the last request that failed before the heal (0 when none did). *longest gap*: longest stretch with no successful response from the injection to the next fault. *converge*: heal → every node agrees on members, Raft leader and what it serves Envoy, and Envoy holds it. *hit*: pods' prefix-cache hit rate over 4 s before the fault and 4 s starting 1 s after convergence.\n");
    s.push_str("\nDelay is injected by a userspace TCP relay in front of the victim's ext_proc server (the kernel has no netem qdisc); loss and partitions are nftables drops in the victim's namespace.\n");
    if let Some(svg) = svg_name {
        let _ = writeln!(s, "\n![timeline]({svg})");
    }
    s
}

/// Draws the timeline: successes and errors per second, members seen, Raft leader, and
/// shaded fault windows.
pub fn timeline(result: &RunResult, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let secs = result.elapsed.as_secs_f64().max(1.0);
    let buckets = (secs * 2.0).ceil() as usize + 1;
    let mut ok = vec![0u32; buckets];
    let mut bad = vec![0u32; buckets];
    for r in &result.records {
        let b = ((r.end.as_secs_f64() * 2.0) as usize).min(buckets - 1);
        if r.failed() {
            bad[b] += 1;
        } else {
            ok[b] += 1;
        }
    }
    let ymax = ok.iter().chain(&bad).copied().max().unwrap_or(1) as f64 * 2.0 * 1.1 + 1.0;
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(380);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "chaos: {} (seed {})",
                result.opts.scenario.name, result.opts.seed
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..secs, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .y_desc("responses/s")
        .draw()
        .map_err(|e| err(&e))?;
    for w in &result.windows {
        let a = w.inject.as_secs_f64();
        let b = w.heal.as_secs_f64().max(a + 0.2);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b, ymax)],
                RGBColor(255, 200, 120).mix(0.35).filled(),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                w.kind.name().to_owned(),
                (a, ymax * 0.97),
                ("sans-serif", 11),
            )))
            .map_err(|e| err(&e))?;
    }
    let series = |v: &[u32]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, c)| (i as f64 / 2.0, *c as f64 * 2.0))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(series(&ok), BLUE.stroke_width(1)))
        .map_err(|e| err(&e))?
        .label("ok/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(LineSeries::new(series(&bad), RED.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("errors/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    let lmax = result
        .samples
        .iter()
        .filter_map(|s| s.leader.max(s.members))
        .max()
        .unwrap_or(3) as f64
        + 1.0;
    let mut low = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..secs, 0f64..lmax)
        .map_err(|e| err(&e))?;
    low.configure_mesh()
        .x_desc("seconds")
        .y_desc("members / leader id")
        .draw()
        .map_err(|e| err(&e))?;
    let pts = |f: &dyn Fn(&crate::run::Sample) -> Option<u64>| -> Vec<(f64, f64)> {
        result
            .samples
            .iter()
            .map(|s| (s.at.as_secs_f64(), f(s).map_or(0.0, |v| v as f64)))
            .collect()
    };
    low.draw_series(LineSeries::new(pts(&|s| s.members), GREEN.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("fewest mesh members seen")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
    low.draw_series(LineSeries::new(pts(&|s| s.leader), MAGENTA.stroke_width(1)))
        .map_err(|e| err(&e))?
        .label("Raft leader id (0: none)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], MAGENTA));
    low.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Mode;
    use crate::run::{RunOptions, RunResult, Window};
    use crate::scenario::scenario;
    use crate::tier::TierSize;
    use crate::traffic::{Outcome, Record};
    use std::time::Instant;

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn rec(start: u64, end: u64, ok: bool) -> Record {
        Record {
            start: s(start),
            end: s(end),
            outcome: if ok {
                Outcome::Ok
            } else {
                Outcome::Error("reset".into())
            },
        }
    }

    fn result(records: Vec<Record>) -> RunResult {
        RunResult {
            opts: RunOptions {
                scenario: scenario("kill", Some(1)).unwrap(),
                seed: 1,
                size: TierSize {
                    nodes: 3,
                    pods: 2,
                    envoys: 1,
                },
                rate: 10.0,
                writers: 0,
                detection: s(2000),
                converge_limit: s(1000),
                via_proxies: false,
                plain_ads: false,
                dir: std::env::temp_dir(),
            },
            mode: Mode::Loopback,
            envoy: true,
            envoys: 1,
            windows: vec![Window {
                kind: FaultKind::Kill,
                round: 1,
                victim: "n1".into(),
                events: vec![s(10_000), s(15_000)],
                inject: s(10_000),
                heal: s(15_000),
                converged: Some(s(15_500)),
                end: s(30_000),
                hit_before: None,
                hit_after: None,
                detected: None,
                note: String::new(),
            }],
            records,
            writes: Vec::new(),
            write_check: Ok(Default::default()),
            samples: Vec::new(),
            skipped: Vec::new(),
            final_converged: true,
            elapsed: s(30_000),
            t0: Instant::now(),
            load: Default::default(),
        }
    }

    #[test]
    fn failures_are_split_by_the_detection_window() {
        let records = vec![
            rec(9_000, 9_100, true),
            // In flight at the kill.
            rec(9_900, 10_050, false),
            // Within the detection window after the kill.
            rec(11_000, 11_010, false),
            // After it, before the heal: the tier should have absorbed this.
            rec(12_500, 12_600, false),
            rec(13_000, 13_100, true),
            // Right after the heal: expected.
            rec(15_100, 15_200, false),
            rec(20_000, 20_100, true),
        ];
        let r = result(records);
        let f = figures(&r.windows[0], &r.records, &r, r.opts.detection);
        assert_eq!(f.sent, 7);
        assert_eq!(f.failed, 4);
        assert_eq!(f.failed_in_flight, 1);
        assert_eq!(f.failed_after_window, 1);
        assert_eq!(f.failover, s(2_500));
        assert_eq!(f.longest_gap, s(9_900));
        let v = verdict(&r);
        assert_eq!(v.broken.len(), 1, "{:?}", v.broken);
        assert!(v.broken[0].contains("failed after the detection window"));
        // Without the stray failure, the run is clean.
        let mut clean = r.records.clone();
        clean.retain(|x| x.start != s(12_500));
        assert!(verdict(&result(clean)).broken.is_empty());
    }
}
