//! The part of `warmvm bench reboot` that compares warmvm with a peer: the guest-visible
//! pause of warmvm's warm and saved reboots (`bench_pause`), QEMU's cpr-transfer and
//! migrate-to-file on the same guest (`bench_qemu`), and the ratios between them.

use std::path::Path;

use serde_json::{json, Value};

use crate::bench_reboot::{Cell, RebootBenchArgs};
use crate::cli::RebootMode;
use crate::progress::Progress;

/// The RAM sizes (one VM each) the pause and the peer are measured at.
pub fn sizes(args: &RebootBenchArgs) -> Vec<u64> {
    let mut v: Vec<u64> = args
        .memory_mib
        .iter()
        .copied()
        .filter(|&m| m <= args.max_total_mib)
        .collect();
    v.dedup();
    v
}

/// Steps this part adds to the progress count.
pub fn steps(args: &RebootBenchArgs) -> usize {
    let pause_modes = pause_modes(args).len();
    let qemu = usize::from(!args.no_qemu);
    sizes(args).len() * (pause_modes + qemu)
}

fn pause_modes(args: &RebootBenchArgs) -> Vec<RebootMode> {
    args.modes
        .iter()
        .copied()
        .filter(|m| matches!(m, RebootMode::Warm | RebootMode::Saved))
        .collect()
}

/// Measure everything; returns (`guest_pause`, `qemu_peer`, `peer_ratios`) for the JSON.
pub fn run(
    exe: &Path,
    root: &Path,
    args: &RebootBenchArgs,
    cells: &[Cell],
    progress: &mut Progress,
) -> (Value, Value, Value) {
    let mut pause_cells = Vec::new();
    for mib in sizes(args) {
        let mut c = json!({ "vms": 1, "memory_mib": mib });
        for mode in pause_modes(args) {
            progress.step(&format!(
                "guest pause: {} reboot, 1 VM x {mib} MiB",
                mode.name()
            ));
            c[mode.name()] = crate::bench_pause::warmvm_pause(exe, root, mode, mib, args.runs);
            progress.done();
        }
        pause_cells.push(c);
    }
    let guest_pause = json!({
        "method": "longest gap between the guest's heartbeat port writes (every ~0.1 ms) in the host's KVM trace (kvm:kvm_pio, trace_clock mono), in a window from 50 ms before the reboot request to 50 ms after the guest is seen running again (warmvm: its verified-page counter moves; QEMU: the new QEMU's RESUME event); noise: the same in an equal window just before, without a reboot",
        "heartbeat_us": crate::bench_pause::HEARTBEAT_US,
        "guest_cmdline": crate::bench_pause::guest_cmdline(),
        "cells": pause_cells,
    });

    let qemu_peer = if args.no_qemu {
        json!({ "skipped": "--no-qemu" })
    } else {
        match crate::bench_qemu::version() {
            Err(why) => {
                for _ in sizes(args) {
                    progress.step("QEMU peer: skipped");
                    progress.done();
                }
                json!({ "skipped": why })
            }
            Ok(version) => {
                let mut out = Vec::new();
                for mib in sizes(args) {
                    progress.step(&format!(
                        "QEMU peer: cpr-transfer and migrate to a file, 1 VM x {mib} MiB"
                    ));
                    out.push(crate::bench_qemu::run(root, mib, args.runs));
                    progress.done();
                }
                json!({ "qemu": version, "skipped": null, "cells": out })
            }
        }
    };
    let ratios = ratios(cells, &guest_pause, &qemu_peer);
    (guest_pause, qemu_peer, ratios)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b.filter(|b| *b > 0.0)).map(|(a, b)| a / b)
}

fn ratios(cells: &[Cell], pause: &Value, qemu: &Value) -> Value {
    let mut out = Vec::new();
    for q in qemu["cells"].as_array().into_iter().flatten() {
        let mib = q["memory_mib"].as_u64().unwrap_or(0);
        let host = |mode: &str| {
            cells
                .iter()
                .find(|c| c.mode == mode && c.vms == 1 && c.memory_mib == mib)
                .and_then(Cell::host_p50)
        };
        let p = pause["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["memory_mib"] == mib)
            .cloned()
            .unwrap_or(Value::Null);
        let cpr = &q["cpr_transfer"];
        let file = &q["migrate_file"];
        out.push(json!({
            "vms": 1,
            "memory_mib": mib,
            "warm_over_qemu_cpr_downtime_stop_to_resume": ratio(host("warm"), cpr["stop_to_resume_ms_p50"].as_f64()),
            "warm_over_qemu_cpr_downtime_qemu_reported": ratio(host("warm"), cpr["qemu_downtime_ms_p50"].as_f64()),
            "saved_over_qemu_file_downtime_stop_to_resume": ratio(host("saved"), file["stop_to_resume_ms_p50"].as_f64()),
            "saved_over_qemu_file_downtime_qemu_reported_total": ratio(host("saved"), file["qemu_total_time_ms_p50"].as_f64()),
            "warm_over_qemu_cpr_guest_pause": ratio(p["warm"]["pause_ms"]["p50"].as_f64(), cpr["guest_pause"]["pause_ms"]["p50"].as_f64()),
            "saved_over_qemu_file_guest_pause": ratio(p["saved"]["pause_ms"]["p50"].as_f64(), file["guest_pause"]["pause_ms"]["p50"].as_f64()),
        }));
    }
    json!(out)
}

/// The human table's part: the guest-visible pauses, the QEMU rows, the ratios.
pub fn table_text(doc: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.2}"));
    let mut rows = Vec::new();
    for c in doc["guest_pause"]["cells"].as_array().into_iter().flatten() {
        for mode in ["warm", "saved"] {
            let p = &c[mode];
            if p.is_null() {
                continue;
            }
            rows.push(vec![
                format!("warmvm {mode}"),
                c["memory_mib"].to_string(),
                f(&Value::Null),
                f(&Value::Null),
                f(&p["pause_ms"]["p50"]),
                f(&p["pause_ms"]["max"]),
                f(&p["noise_ms"]["p50"]),
                p["error"]
                    .as_str()
                    .or(p["source"].as_str())
                    .unwrap_or("")
                    .to_string(),
            ]);
        }
    }
    for q in doc["qemu_peer"]["cells"].as_array().into_iter().flatten() {
        if let Some(why) = q["skipped"].as_str() {
            rows.push(vec![
                "QEMU".into(),
                q["memory_mib"].to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("skipped: {why}"),
            ]);
            continue;
        }
        for (key, name) in [
            ("cpr_transfer", "QEMU cpr-transfer"),
            ("migrate_file", "QEMU migrate to file"),
        ] {
            let r = &q[key];
            let p = &r["guest_pause"];
            rows.push(vec![
                name.into(),
                q["memory_mib"].to_string(),
                f(&r["stop_to_resume_ms_p50"]),
                format!(
                    "{} / {}",
                    f(&r["qemu_downtime_ms_p50"]),
                    f(&r["qemu_total_time_ms_p50"])
                ),
                f(&p["pause_ms"]["p50"]),
                f(&p["pause_ms"]["max"]),
                f(&p["noise_ms"]["p50"]),
                p["trace_unavailable"]
                    .as_str()
                    .map_or("kvm_pio trace".to_string(), |w| format!("no trace: {w}")),
            ]);
        }
    }
    let _ = writeln!(
        out,
        "guest-visible pause (1 VM, heartbeat every {} us, host KVM trace) and the QEMU peer, ms (p50 of {} runs):",
        doc["guest_pause"]["heartbeat_us"], doc["runs_per_cell"]
    );
    let _ = writeln!(
        out,
        "{}",
        crate::output::table(
            &[
                "VMM / MODE",
                "MiB/VM",
                "STOP->RESUME",
                "QEMU downtime / total",
                "PAUSE p50",
                "PAUSE max",
                "NOISE p50",
                "SOURCE",
            ],
            rows,
            &[1, 2, 3, 4, 5, 6],
        )
    );
    for r in doc["peer_ratios"].as_array().into_iter().flatten() {
        let g = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
        let _ = writeln!(
            out,
            "1 VM x {} MiB: guest pause warm/QEMU cpr {} (goal <= 0.3), saved/QEMU file {}; downtime warm/QEMU cpr {} (stop->resume), {} (QEMU's downtime); saved/QEMU file {} (stop->resume), {} (QEMU's total time)",
            r["memory_mib"],
            g("warm_over_qemu_cpr_guest_pause"),
            g("saved_over_qemu_file_guest_pause"),
            g("warm_over_qemu_cpr_downtime_stop_to_resume"),
            g("warm_over_qemu_cpr_downtime_qemu_reported"),
            g("saved_over_qemu_file_downtime_stop_to_resume"),
            g("saved_over_qemu_file_downtime_qemu_reported_total"),
        );
    }
    if let Some(why) = doc["qemu_peer"]["skipped"].as_str() {
        let _ = writeln!(out, "QEMU peer: skipped ({why})");
    }
    out
}
