//! What `warmvm bench aging` shows of its results: the tables it prints and the plots it
//! writes (drawn by bench_aging_plot).

use std::path::PathBuf;

use serde_json::Value;
use warmvm_api::aging::Metric;

use crate::bench_aging::{
    AgingArgs, LeakRow, LiveRun, PolicyRow, LIVE_BUDGET_MIB, LIVE_HORIZON_SECS,
};
use crate::bench_aging_plot::{self as plot, Chart, Series};
use crate::bench_aging_sim::Recording;

fn human(metric: Metric, v: f64) -> String {
    if metric.name().ends_with("_bytes") {
        format!("{:.0} MiB", v / (1u64 << 20) as f64)
    } else {
        format!("{v:.0}")
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

pub(crate) fn print_tables(
    doc: &Value,
    rows: &[LeakRow],
    policies: &[PolicyRow],
    live: &[LiveRun],
) {
    let t = warmvm_cli_common::output::table;
    println!(
        "warm reboot blackout (measured once): {:.3} ms",
        doc["warm_reboot_blackout_ms"].as_f64().unwrap_or(0.0)
    );
    if live.is_empty() {
        println!(
            "live leaks: {}",
            doc["live_note"].as_str().unwrap_or("none asked for")
        );
    } else {
        println!("\nlive leaks (monitor every 200 ms, horizon {LIVE_HORIZON_SECS} s, budget {LIVE_BUDGET_MIB} MiB):");
        let r = live
            .iter()
            .map(|l| {
                vec![
                    format!("{} MiB/s", l.heap_mib_per_sec),
                    format!("{:.1}", l.delay_secs),
                    format!("{:.0}", l.lead_secs),
                    l.reason.clone(),
                    l.baseline_after_ratio
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.3}x"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    l.growth_shed
                        .values()
                        .map(|v| format!("{:.1}%", v * 100.0))
                        .collect::<Vec<_>>()
                        .join(" "),
                    if l.vms_verified { "yes" } else { "NO" }.into(),
                ]
            })
            .collect();
        println!(
            "{}",
            t(
                &[
                    "LEAK",
                    "DELAY S",
                    "LEAD S",
                    "TRIGGER",
                    "BASELINE AFTER/BEFORE",
                    "GROWTH SHED",
                    "VMS OK"
                ],
                r,
                &[1, 2]
            )
        );
    }
    let sim = &doc["simulation"];
    println!(
        "\nsimulated (recorded noise replayed, monitor every {} s, horizon {} s, budget {} MiB, {} fds):",
        sim["period_secs"], sim["config"]["horizon_secs"], sim["budget_mib"], sim["fd_limit"]
    );
    let r = rows
        .iter()
        .map(|l| {
            vec![
                l.metric.name().to_string(),
                format!("{}/h", human(l.metric, l.per_hour)),
                opt(l.delay_hours, 2),
                opt(l.lead_hours, 1),
                format!("{:.1}", l.horizon_hours),
                l.reason.clone().unwrap_or_else(|| "-".into()),
                format!("{:.2}", l.reboots_per_day),
                l.exhaustions.to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        t(
            &[
                "LEAK OF",
                "RATE",
                "DELAY H",
                "LEAD H",
                "HORIZON H",
                "TRIGGER",
                "AFTER/BEFORE",
                "REBOOTS/DAY",
                "EXHAUSTED"
            ],
            r,
            &[2, 3, 4, 6, 7, 8]
        )
    );
    let fp = &doc["false_positives"];
    println!(
        "\nfalse positives: {} rejuvenations in {} simulated days without aging ({:.2} per 30 days)",
        fp["rejuvenations"], fp["days"], fp["per_30_days"].as_f64().unwrap_or(0.0)
    );
    println!("\nagainst time-based rejuvenation:");
    let r = policies
        .iter()
        .map(|p| {
            vec![
                format!("{} {}/h", p.metric.name(), human(p.metric, p.per_hour)),
                p.policy.clone(),
                format!("{:.2}", p.reboots_per_day),
                format!("{:.2}", p.blackout_ms_per_day),
                format!("{:.2}", p.exhaustions_per_day),
            ]
        })
        .collect();
    println!(
        "{}",
        t(
            &[
                "LEAK",
                "POLICY",
                "REBOOTS/DAY",
                "BLACKOUT MS/DAY",
                "EXHAUSTIONS/DAY"
            ],
            r,
            &[2, 3, 4]
        )
    );
    println!("\ngoals: {}", doc["goals"]);
    if let Some(p) = doc["plots"].as_array() {
        println!("plots:");
        for f in p {
            println!("  {}", f.as_str().unwrap_or(""));
        }
    }
}

pub(crate) fn draw_plots(
    a: &AgingArgs,
    rec: &Recording,
    rows: &[LeakRow],
    policies: &[PolicyRow],
    live: &[LiveRun],
) -> Result<Vec<PathBuf>, String> {
    let _ = live;
    let mut files = Vec::new();
    for (metric, name, unit, scale) in [
        (
            Metric::HeapInUseBytes,
            "aging-heap-leaks",
            "heap in use (MiB)",
            (1u64 << 20) as f64,
        ),
        (Metric::OpenFds, "aging-fd-leaks", "open fds", 1.0),
    ] {
        let rs: Vec<&LeakRow> = rows.iter().filter(|r| r.metric == metric).collect();
        if rs.is_empty() {
            continue;
        }
        let window = 48.0f64.min(a.leak_days * 24.0);
        let series: Vec<Series> = rs
            .iter()
            .map(|r| Series {
                label: format!("{}/h", human(metric, r.per_hour)),
                points: r
                    .trace
                    .iter()
                    .filter(|p| p.0 <= window)
                    .map(|&(t, v)| (t, v / scale))
                    .collect(),
            })
            .collect();
        let marks: Vec<(f64, f64)> = rs
            .iter()
            .filter_map(|r| r.first_mark)
            .map(|(t, v)| (t, v / scale))
            .collect();
        let limit = rs[0].limit / scale;
        files.extend(plot::save(
            &a.out,
            name,
            &Chart {
                title: &format!(
                    "{} leaks: warm reboots (x: first) before the limit",
                    metric.name()
                ),
                x_label: "simulated hours (leak from 1 h)",
                y_label: unit,
                series: &series,
                hlines: &[("limit".to_string(), limit)],
                marks: &marks,
                log_x: false,
            },
        )?);
    }
    let noise: Vec<Series> = [Metric::HeapInUseBytes, Metric::RssAnonBytes]
        .into_iter()
        .filter_map(|m| {
            let s = rec.series.get(&m)?;
            Some(Series {
                label: format!("{} (KiB)", m.name()),
                points: s
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64 * rec.period_ms as f64 / 1000.0, v / 1024.0))
                    .collect(),
            })
        })
        .collect();
    files.extend(plot::save(
        &a.out,
        "aging-recorded-noise",
        &Chart {
            title: "the daemon's memory under load, as recorded",
            x_label: "seconds",
            y_label: "KiB",
            series: &noise,
            hlines: &[],
            marks: &[],
            log_x: false,
        },
    )?);
    let names: Vec<String> = {
        let mut v: Vec<String> = policies.iter().map(|p| p.policy.clone()).collect();
        v.dedup();
        let mut seen = Vec::new();
        v.retain(|p| {
            let new = !seen.contains(p);
            seen.push(p.clone());
            new
        });
        v
    };
    for (name, title, y, value) in [
        (
            "aging-reboots-per-day",
            "warm reboots per day against heap leak rate",
            "reboots per day",
            (|p: &PolicyRow| p.reboots_per_day) as fn(&PolicyRow) -> f64,
        ),
        (
            "aging-exhaustions-per-day",
            "exhaustions (lost process) per day against heap leak rate",
            "exhaustions per day",
            |p: &PolicyRow| p.exhaustions_per_day,
        ),
    ] {
        let series: Vec<Series> = names
            .iter()
            .map(|n| Series {
                label: n.clone(),
                points: policies
                    .iter()
                    .filter(|p| &p.policy == n && p.metric == Metric::HeapInUseBytes)
                    .map(|p| (p.per_hour / (1u64 << 20) as f64, value(p)))
                    .collect(),
            })
            .collect();
        files.extend(plot::save(
            &a.out,
            name,
            &Chart {
                title,
                x_label: "heap leak, MiB per hour (log)",
                y_label: y,
                series: &series,
                hlines: &[],
                marks: &[],
                log_x: true,
            },
        )?);
    }
    Ok(files)
}
