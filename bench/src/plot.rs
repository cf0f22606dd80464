//! SVG plot of TTFT against offered QPS, one colour per system under test.

use std::path::Path;

use plotters::prelude::*;

use crate::error::BenchError;
use crate::report::Report;
use crate::spec::Load;

/// (offered QPS, TTFT p50 ms, TTFT p90 ms) of one sweep point.
type Point = (f64, f64, f64);

/// Draws TTFT p50 (thin, dots) and p90 (thick) against offered QPS for every label in
/// `reports` (open-loop runs only) into an SVG at `path`.
pub fn plot_ttft_vs_qps(reports: &[Report], path: &Path) -> Result<(), BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut series: Vec<(String, Vec<Point>)> = Vec::new();
    for r in reports {
        let Load::Poisson { qps } = r.load else {
            continue;
        };
        let point = (qps, r.ttft.p50_ms, r.ttft.p90_ms);
        match series.iter_mut().find(|(l, _)| *l == r.label) {
            Some((_, pts)) => pts.push(point),
            None => series.push((r.label.clone(), vec![point])),
        }
    }
    if series.is_empty() {
        return Err(err(&"no open-loop (Poisson) runs to plot"));
    }
    for (_, pts) in &mut series {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let all = series.iter().flat_map(|(_, p)| p.iter());
    let xmax = all.clone().map(|p| p.0).fold(0.0, f64::max) * 1.05;
    let ymax = all.clone().map(|p| p.2.max(p.1)).fold(1.0, f64::max) * 1.5;
    // TTFT spans milliseconds to tens of seconds across a sweep: a log axis keeps the
    // unloaded points readable. Empty summaries (0 ms) sit on the axis floor.
    let ymin = all
        .map(|p| p.1.min(p.2))
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.1, 1e9)
        / 1.5;
    let floor = |v: f64| v.max(ymin);

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("TTFT vs offered load", ("sans-serif", 22))
        .margin(18)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered QPS (Poisson)")
        .y_desc("TTFT (ms, log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, floor(p.2))),
                color.stroke_width(3),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{label} p90"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, floor(p.1))),
                color.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{label} p50"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, floor(p.1)), 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::OracleBound;
    use crate::stats::LatencySummary;

    fn report(label: &str, qps: f64, p50: f64, p90: f64) -> Report {
        Report {
            label: label.into(),
            workload: "w".into(),
            load: Load::Poisson { qps },
            seed: 1,
            model: "m".into(),
            requests_sent: 1,
            succeeded: 1,
            failed: 0,
            rejected_429: 0,
            failures: Default::default(),
            error_rate: 0.0,
            rate_429: 0.0,
            duration_s: 1.0,
            achieved_qps: qps,
            request_throughput: 1.0,
            output_tokens_per_s: 1.0,
            ttft: LatencySummary {
                count: 1,
                p50_ms: p50,
                p90_ms: p90,
                ..Default::default()
            },
            itl: LatencySummary::default(),
            e2e: LatencySummary::default(),
            ttft_slo_ms: 1000.0,
            goodput_rps: 1.0,
            slo_attainment: 1.0,
            fleet_hit_rate: None,
            fleet_query_tokens: None,
            oracle: OracleBound::default(),
            oracle_hit_rate: 0.0,
            usage_cached_rate: None,
            per_pod_requests: vec![],
            load_imbalance_cv: None,
            pods_unscraped: vec![],
            fleet_kv_capacity_tokens: None,
            reused_prefix_fill: None,
        }
    }

    #[test]
    fn sweep_plot_has_a_series_per_label() {
        let reports = [
            report("rr", 8.0, 100.0, 300.0),
            report("rr", 4.0, 50.0, 90.0),
            report("peer", 4.0, 40.0, 60.0),
            report("peer", 8.0, 45.0, 70.0),
        ];
        let path =
            std::env::temp_dir().join(format!("infermesh-bench-plot-{}.svg", std::process::id()));
        plot_ttft_vs_qps(&reports, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for label in ["rr p90", "rr p50", "peer p90", "peer p50", "offered QPS"] {
            assert!(svg.contains(label), "missing {label}");
        }
    }

    #[test]
    fn closed_loop_only_reports_cannot_be_plotted() {
        let mut r = report("x", 1.0, 1.0, 1.0);
        r.load = Load::Closed { concurrency: 4 };
        let e = plot_ttft_vs_qps(&[r], Path::new("/nonexistent/x.svg")).unwrap_err();
        assert!(e.to_string().contains("no open-loop"), "{e}");
    }
}
