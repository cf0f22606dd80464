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
    let ymax = all.map(|p| p.2.max(p.1)).fold(1.0, f64::max) * 1.1;

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("TTFT vs offered load", ("sans-serif", 22))
        .margin(18)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered QPS (Poisson)")
        .y_desc("TTFT (ms)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.2)),
                color.stroke_width(3),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{label} p90"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
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
                    .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
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
