//! The plots of `warmvm bench reboot`, as SVG and PNG, after the research's figures:
//! downtime against the number of VMs, downtime against the RAM per VM (both log scale,
//! one line per mode), and each mode's phases as stacked bars.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench_reboot::Cell;

/// DejaVu Sans Mono (assets/FONT-LICENSE): text without system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

type Res = Result<(), String>;

/// The QEMU peer's series (`bench_peer::plot_cells`) in the downtime plots.
pub const QEMU_CPR: &str = "QEMU cpr-transfer";
pub const QEMU_FILE: &str = "QEMU migrate to file";

fn mode_color(mode: &str) -> RGBColor {
    match mode {
        "warm" => RGBColor(0xd6, 0x27, 0x28),
        "saved" => RGBColor(0x1f, 0x77, 0xb4),
        QEMU_CPR => RGBColor(0x94, 0x67, 0xbd),
        QEMU_FILE => RGBColor(0x8c, 0x56, 0x4b),
        _ => RGBColor(0x2c, 0xa0, 0x2c),
    }
}

/// Write downtime-vs-vms, downtime-vs-ram and phases, each as .svg and .png, into `dir`.
/// `peer` (QEMU's cells, modes `QEMU_CPR` and `QEMU_FILE`) join the two downtime plots.
pub fn write_all(dir: &Path, cells: &[Cell], peer: &[Cell]) -> Res {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    // Registering twice (a second call in one process) is harmless.
    let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    let base_mib = cells
        .iter()
        .filter(|c| c.vms > 1)
        .map(|c| c.memory_mib)
        .next()
        .or_else(|| cells.first().map(|c| c.memory_mib))
        .unwrap_or(256);
    let all: Vec<&Cell> = cells.iter().chain(peer).collect();
    let by_vms: Vec<&Cell> = all
        .iter()
        .copied()
        .filter(|c| c.memory_mib == base_mib)
        .collect();
    let by_ram: Vec<&Cell> = all.iter().copied().filter(|c| c.vms == 1).collect();
    let phase_bars: Vec<&Cell> = cells.iter().filter(|c| c.vms == 1).collect();
    let size = (900, 560);
    for chart in [Chart::DowntimeVsVms, Chart::DowntimeVsRam, Chart::Phases] {
        let name = chart.file_name();
        let svg = dir.join(format!("{name}.svg"));
        let png = dir.join(format!("{name}.png"));
        chart.draw(
            &SVGBackend::new(&svg, size).into_drawing_area(),
            &by_vms,
            &by_ram,
            &phase_bars,
            base_mib,
        )?;
        chart.draw(
            &BitMapBackend::new(&png, size).into_drawing_area(),
            &by_vms,
            &by_ram,
            &phase_bars,
            base_mib,
        )?;
    }
    Ok(())
}

/// The three figures, each written once as SVG and once as PNG.
#[derive(Clone, Copy)]
enum Chart {
    DowntimeVsVms,
    DowntimeVsRam,
    Phases,
}

impl Chart {
    fn file_name(self) -> &'static str {
        match self {
            Chart::DowntimeVsVms => "downtime-vs-vms",
            Chart::DowntimeVsRam => "downtime-vs-ram",
            Chart::Phases => "phases",
        }
    }

    /// `by_vms`: the cells of `base_mib` MiB per VM; `by_ram`: the cells of one VM (both
    /// with the peer's); `phase_bars`: warmvm's own cells of one VM.
    fn draw<DB: DrawingBackend>(
        self,
        root: &DrawingArea<DB, Shift>,
        by_vms: &[&Cell],
        by_ram: &[&Cell],
        phase_bars: &[&Cell],
        base_mib: u64,
    ) -> Res {
        match self {
            Chart::DowntimeVsVms => lines(
                root,
                by_vms,
                |c| f64::from(c.vms),
                "VMs",
                &format!("host-wide downtime against the number of VMs ({base_mib} MiB each)"),
            ),
            Chart::DowntimeVsRam => lines(
                root,
                by_ram,
                |c| c.memory_mib as f64,
                "RAM per VM (MiB)",
                "downtime against RAM size (1 VM)",
            ),
            Chart::Phases => phases(root, phase_bars),
        }
    }
}

fn lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    cells: &[&Cell],
    x_of: impl Fn(&Cell) -> f64,
    x_desc: &str,
    title: &str,
) -> Res {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let pts: Vec<(f64, f64)> = cells
        .iter()
        .filter_map(|c| Some((x_of(c), c.host_p50()?)))
        .collect();
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if pts.is_empty() {
        return Ok(());
    }
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            ((x0 * 0.8)..(x1 * 1.25)).log_scale(),
            // Headroom above the data (log scale) for the legend in the upper left.
            ((y0.max(0.01) * 0.5)..(y1 * 30.0)).log_scale(),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("downtime, ms (median, log scale)")
        .label_style((FAMILY, 13))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(e)?;
    for mode in ["warm", "saved", "cold", QEMU_CPR, QEMU_FILE] {
        let mut series: Vec<(f64, f64)> = cells
            .iter()
            .filter(|c| c.mode == mode)
            .filter_map(|c| Some((x_of(c), c.host_p50()?)))
            .collect();
        if series.is_empty() {
            continue;
        }
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = mode_color(mode);
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(mode)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(series.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// One stacked bar per (mode, RAM size): the median of each phase.
fn phases<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, cells: &[&Cell]) -> Res {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let bars: Vec<&Cell> = cells
        .iter()
        .copied()
        .filter(|c| !c.phases_ms.is_empty())
        .collect();
    if bars.is_empty() {
        return Ok(());
    }
    let top = bars
        .iter()
        .map(|c| c.phases_ms.iter().map(|p| p.1).sum::<f64>())
        .fold(0.0, f64::max)
        * 1.1;
    let mut names: Vec<String> = Vec::new();
    for c in &bars {
        for (n, _) in &c.phases_ms {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let labels: Vec<String> = bars
        .iter()
        .map(|c| format!("{} {}M", c.mode, c.memory_mib))
        .collect();
    let mut chart = ChartBuilder::on(root)
        .caption("phases of one reboot (1 VM, median)", (FAMILY, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(bars.len() as f64 - 0.5), 0f64..top.max(0.001))
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ms")
        .label_style((FAMILY, 12))
        .draw()
        .map_err(e)?;
    for (k, name) in names.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let rects: Vec<Rectangle<(f64, f64)>> = bars
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let pos = c.phases_ms.iter().position(|p| &p.0 == name)?;
                let below: f64 = c.phases_ms[..pos].iter().map(|p| p.1).sum();
                let x = i as f64;
                Some(Rectangle::new(
                    [(x - 0.35, below), (x + 0.35, below + c.phases_ms[pos].1)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(e)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(mode: &'static str, vms: u32, mib: u64, ms: f64) -> Cell {
        Cell {
            mode,
            vms,
            memory_mib: mib,
            runs: 1,
            host_ms: vec![ms],
            vm_ms: vec![ms],
            phases_ms: vec![("a".into(), ms / 2.0), ("b".into(), ms / 2.0)],
            save_mib_s: None,
            restore_mib_s: None,
            error: None,
        }
    }

    #[test]
    fn every_plot_is_written_as_svg_and_png_with_text() {
        let dir = std::env::temp_dir().join(format!("warmvm-plots-{}", std::process::id()));
        let cells = vec![
            cell("warm", 1, 256, 1.2),
            cell("warm", 2, 256, 2.0),
            cell("saved", 1, 256, 900.0),
            cell("saved", 2, 256, 1800.0),
            cell("warm", 1, 1024, 1.3),
            cell("saved", 1, 1024, 3000.0),
        ];
        let peer = vec![cell(QEMU_CPR, 1, 256, 5.0), cell(QEMU_CPR, 2, 256, 9.0)];
        write_all(&dir, &cells, &peer).unwrap();
        for name in ["downtime-vs-vms", "downtime-vs-ram", "phases"] {
            let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).unwrap();
            assert!(svg.contains("<svg") && svg.contains("saved"), "{name}");
            // QEMU's series beside warmvm's in the downtime plots, not among the phases.
            assert_eq!(svg.contains(QEMU_CPR), name != "phases", "{name}");
            let png = std::fs::read(dir.join(format!("{name}.png"))).unwrap();
            assert_eq!(&png[1..4], b"PNG", "{name}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
