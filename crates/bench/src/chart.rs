//! The matrix chart (plotters, bitmap backend): two panels side by side over the
//! simulated latencies — throughput per runner (log scale), and the percentage of the
//! ideal throughput each runner reaches (runners without an ideal, such as
//! `rdkafka-raw`, and latency 0 have no point there).

use std::path::Path;

use plotters::prelude::*;

use crate::matrix::MatrixReport;
use crate::BenchError;

const SIZE: (u32, u32) = (1400, 640);
const LEGEND_HEIGHT: u32 = 70;
const FONT: &str = "sans-serif";

/// Distinct, readable-on-white series colours (ColorBrewer Set1 without its yellow).
const COLORS: [RGBColor; 8] = [
    RGBColor(228, 26, 28),
    RGBColor(55, 126, 184),
    RGBColor(77, 175, 74),
    RGBColor(152, 78, 163),
    RGBColor(255, 127, 0),
    RGBColor(166, 86, 40),
    RGBColor(247, 129, 191),
    RGBColor(60, 60, 60),
];

fn color(i: usize) -> RGBColor {
    COLORS
        .get(i % COLORS.len())
        .copied()
        .unwrap_or(RGBColor(0, 0, 0))
}

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Chart(e.to_string())
}

/// One series: a runner's points (latency index, value).
struct Series {
    label: String,
    throughput: Vec<(f64, f64)>,
    pct: Vec<(f64, f64)>,
}

fn series(report: &MatrixReport) -> Vec<Series> {
    report
        .runners
        .iter()
        .map(|label| {
            let mut s = Series {
                label: label.clone(),
                throughput: Vec::new(),
                pct: Vec::new(),
            };
            for (i, &lat) in report.latencies_ms.iter().enumerate() {
                if let Some(e) = report.entry(label, lat) {
                    s.throughput.push((i as f64, e.summary.throughput_per_sec));
                    if let Some(p) = e.summary.pct_of_ideal {
                        s.pct.push((i as f64, p));
                    }
                }
            }
            s
        })
        .collect()
}

/// Draws `report` into a PNG at `path`.
pub(crate) fn render(report: &MatrixReport, path: &Path) -> Result<(), BenchError> {
    let series = series(report);
    // The x axis is the latency's index (evenly spaced whatever the values); labels sit
    // on the integer positions only.
    let n = report.latencies_ms.len().max(1);
    let x_range = -0.5..(n as f64 - 0.5);
    let latencies = report.latencies_ms.clone();
    let x_label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            latencies
                .get(i as usize)
                .map(|l| format!("{l} ms"))
                .unwrap_or_default()
        } else {
            String::new()
        }
    };

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let first = report.entries.first();
    let title = match first {
        Some(e) => format!(
            "decaton bench matrix — {} tasks, {} partitions, {}",
            e.workload.tasks,
            e.workload.partitions,
            e.workload.keys.describe()
        ),
        None => "decaton bench matrix".into(),
    };
    let root = root.titled(&title, (FONT, 24)).map_err(err)?;
    let (charts, legend) = root.split_vertically(SIZE.1 - LEGEND_HEIGHT - 40);
    let (left, right) = charts.split_horizontally(SIZE.0 / 2);

    // Throughput, log scale.
    let values = series
        .iter()
        .flat_map(|s| s.throughput.iter().map(|p| p.1))
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 {
        (lo / 2.0, hi * 2.0)
    } else {
        (0.1, 10.0)
    };
    let mut chart = ChartBuilder::on(&left)
        .caption("throughput (tasks/s, log scale)", (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.clone(), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("simulated latency")
        .y_desc("tasks/s")
        .x_labels(4 * n + 2)
        .disable_x_mesh()
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = color(i);
        let points = s.throughput.clone();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(err)?;
    }

    // Percentage of the ideal throughput.
    let top = series
        .iter()
        .flat_map(|s| s.pct.iter().map(|p| p.1))
        .fold(100.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption("% of ideal (lanes × partitions / latency)", (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("simulated latency")
        .y_desc("% of ideal")
        .x_labels(4 * n + 2)
        .disable_x_mesh()
        .x_label_formatter(&x_label)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            vec![(-0.5, 100.0), (n as f64 - 0.5, 100.0)],
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        if s.pct.is_empty() {
            continue;
        }
        let color = color(i);
        let points = s.pct.clone();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(err)?;
    }
    // One legend for both panels, in rows under them.
    let (mut x, mut y) = (100i32, 10i32);
    for (i, s) in series.iter().enumerate() {
        let width = 40 + 8 * s.label.chars().count() as i32;
        if x + width > SIZE.0 as i32 - 20 {
            (x, y) = (100, y + 24);
        }
        legend
            .draw(&PathElement::new(
                vec![(x, y + 8), (x + 28, y + 8)],
                color(i).stroke_width(3),
            ))
            .map_err(err)?;
        legend
            .draw(&Text::new(s.label.clone(), (x + 36, y), (FONT, 16)))
            .map_err(err)?;
        x += width + 20;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RunnerKind, RunnerSpec, Workload};
    use crate::figures::Figures;
    use crate::report::BenchReport;

    fn entry(spec: &RunnerSpec, lat: u64, tput: f64, pct: Option<f64>) -> BenchReport {
        let f = Figures {
            tasks: 10,
            throughput_per_sec: tput,
            pct_of_ideal: pct,
            ..Figures::default()
        };
        BenchReport::new(
            spec.label(),
            Some(spec.clone()),
            None,
            Some((lat, Some(1))),
            Workload::default(),
            "x".into(),
            "cmd".into(),
            vec![f],
        )
    }

    #[test]
    fn renders_a_chart_with_text() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let serial = RunnerSpec::new(RunnerKind::RdkafkaSerial);
        let raw = RunnerSpec::new(RunnerKind::RdkafkaRaw);
        for lats in [vec![0u64, 1, 10], vec![5]] {
            let mut entries = Vec::new();
            for (i, &l) in lats.iter().enumerate() {
                entries.push(entry(
                    &serial,
                    l,
                    1000.0 / (i + 1) as f64,
                    (l > 0).then_some(90.0),
                ));
                entries.push(entry(&raw, l, 50_000.0, None));
            }
            let report = MatrixReport {
                command: "cmd".into(),
                latencies_ms: lats.clone(),
                runners: vec![serial.label(), raw.label()],
                entries,
                json_path: dir.path().join("m.json"),
                chart_path: dir.path().join(format!("m{}.png", lats.len())),
            };
            render(&report, &report.chart_path)?;
            assert!(std::fs::metadata(&report.chart_path)?.len() > 1000);
        }
        Ok(())
    }
}
