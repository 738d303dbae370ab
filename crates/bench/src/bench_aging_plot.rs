//! The plots of `warmvm bench aging`, each as SVG and PNG, drawn with `plotters`. Text needs
//! a TrueType font: DejaVu Sans from Debian's fonts-dejavu-core (README's requirements).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Register the font plotters draws text with (once per process).
pub fn register_font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONT_PATHS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                "no DejaVuSans.ttf for the plots' text: install fonts-dejavu-core".to_string()
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps fonts for the process's lifetime.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable TrueType font"))
    })
    .clone()
}

/// One line of a chart: its label and (x, y) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with optional horizontal reference lines (limits) and marked points
/// (triggers).
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    pub hlines: &'a [(String, f64)],
    pub marks: &'a [(f64, f64)],
    pub log_x: bool,
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &Chart) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in pts.chain(c.marks.iter()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    for (_, y) in c.hlines {
        y1 = y1.max(*y);
    }
    if !x0.is_finite() || !x1.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.08 } else { 1.0 };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(c.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(c.x_label)
                .y_desc(c.y_label)
                .draw()
                .map_err(err)?;
            for (i, s) in c.series.iter().enumerate() {
                let color = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), color))
                    .map_err(err)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            }
            for (label, y) in c.hlines {
                chart
                    .draw_series(LineSeries::new(
                        vec![(x0, *y), (x1, *y)],
                        BLACK.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(label.clone())
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            }
            chart
                .draw_series(
                    c.marks
                        .iter()
                        .map(|&(x, y)| Cross::new((x, y), 6, RED.stroke_width(2))),
                )
                .map_err(err)?;
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)?;
        }};
    }
    if c.log_x {
        let x0 = x0.max(1e-3);
        body!(builder
            .build_cartesian_2d((x0..x1).log_scale(), 0.0..y1)
            .map_err(err)?);
    } else {
        body!(builder.build_cartesian_2d(x0..x1, 0.0..y1).map_err(err)?);
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Draw `chart` into `<dir>/<name>.svg` and `<dir>/<name>.png`; returns both paths.
pub fn save(dir: &Path, name: &str, chart: &Chart) -> Result<Vec<PathBuf>, String> {
    register_font()?;
    let svg = dir.join(format!("{name}.svg"));
    let png = dir.join(format!("{name}.png"));
    draw(SVGBackend::new(&svg, (900, 540)).into_drawing_area(), chart)?;
    draw(
        BitMapBackend::new(&png, (900, 540)).into_drawing_area(),
        chart,
    )?;
    Ok(vec![svg, png])
}
