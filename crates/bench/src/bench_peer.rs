//! The part of `warmvm bench reboot` that compares warmvm with a peer: the guest-visible
//! pause of warmvm's warm and saved reboots (`bench_pause`), QEMU's cpr-transfer and
//! migrate-to-file on the same guest (`bench_qemu`), and the ratios between them, for each
//! cell of the bench's matrix (the VM counts at the first RAM size, the RAM sizes at 1 VM).

use std::path::Path;

use serde_json::{json, Value};

use crate::bench_reboot::{Cell, RebootBenchArgs};
use crate::cli::RebootMode;
use crate::progress::Progress;

/// The cells the pause and the peer are measured at: the bench's own.
pub fn cells(args: &RebootBenchArgs) -> Vec<(u32, u64)> {
    crate::bench_reboot::matrix(args).0
}

/// Steps this part adds to the progress count.
pub fn steps(args: &RebootBenchArgs) -> usize {
    let pause_modes = pause_modes(args).len();
    let qemu = usize::from(!args.no_qemu);
    cells(args).len() * (pause_modes + qemu)
}

fn pause_modes(args: &RebootBenchArgs) -> Vec<RebootMode> {
    args.modes
        .iter()
        .copied()
        .filter(|m| matches!(m, RebootMode::Warm | RebootMode::Saved))
        .collect()
}

/// Measure everything; returns (`guest_pause`, `qemu_peer`, `peer_ratios`) for the JSON, or
/// the interruption (SIGINT/SIGTERM).
pub fn run(
    exe: &Path,
    root: &Path,
    args: &RebootBenchArgs,
    cells: &[Cell],
    progress: &mut Progress,
) -> Result<(Value, Value, Value), String> {
    let mut pause_cells = Vec::new();
    for (vms, mib) in self::cells(args) {
        let mut c = json!({ "vms": vms, "memory_mib": mib });
        for mode in pause_modes(args) {
            crate::interrupt::check()?;
            progress.step(&format!(
                "guest pause: {} reboot, {vms} VMs x {mib} MiB",
                mode.name()
            ));
            c[mode.name()] = crate::bench_pause::warmvm_pause(exe, root, mode, vms, mib, args.runs);
            progress.done();
        }
        pause_cells.push(c);
    }
    let guest_pause = json!({
        "method": "longest gap between each guest's heartbeat port writes (every ~0.1 ms) in the host's KVM trace (kvm:kvm_pio, trace_clock mono; told apart by vCPU thread), in a window from 50 ms before the reboot request to 50 ms after every guest is seen running again (warmvm: their verified-page counters move; QEMU: each new QEMU's RESUME event); host-wide: from the first guest's longest gap beginning to the last one's ending; noise: each guest's longest gap in an equal window just before, without a reboot",
        "heartbeat_us": crate::bench_pause::HEARTBEAT_US,
        "guest_cmdline": crate::bench_pause::guest_cmdline(),
        "cells": pause_cells,
    });

    let qemu_peer = if args.no_qemu {
        json!({ "skipped": "--no-qemu" })
    } else {
        match crate::bench_qemu::version() {
            Err(why) => {
                for _ in self::cells(args) {
                    progress.step("QEMU peer: skipped");
                    progress.done();
                }
                json!({ "skipped": why })
            }
            Ok(version) => {
                let mut out = Vec::new();
                for (vms, mib) in self::cells(args) {
                    crate::interrupt::check()?;
                    progress.step(&format!(
                        "QEMU peer: cpr-transfer and migrate to files, {vms} VMs x {mib} MiB"
                    ));
                    out.push(crate::bench_qemu::run(root, vms, mib, args.runs));
                    progress.done();
                }
                json!({ "qemu": version, "skipped": null, "cells": out })
            }
        }
    };
    crate::interrupt::check()?;
    let ratios = ratios(cells, &guest_pause, &qemu_peer);
    Ok((guest_pause, qemu_peer, ratios))
}

/// QEMU's cells as the plots' series: host-wide downtime (first `STOP` to last `RESUME`)
/// per run, named after QEMU's two ways.
pub fn plot_cells(qemu: &Value) -> Vec<Cell> {
    let mut out = Vec::new();
    for q in qemu["cells"].as_array().into_iter().flatten() {
        if !q["skipped"].is_null() {
            continue;
        }
        for (key, mode) in [
            ("cpr_transfer", crate::plots::QEMU_CPR),
            ("migrate_file", crate::plots::QEMU_FILE),
        ] {
            let runs = q[key]["all"].as_array().cloned().unwrap_or_default();
            out.push(Cell {
                mode,
                vms: q["vms"].as_u64().unwrap_or(1) as u32,
                memory_mib: q["memory_mib"].as_u64().unwrap_or(0),
                runs: runs.len(),
                host_ms: runs
                    .iter()
                    .filter_map(|r| r["host_stop_to_resume_ms"].as_f64())
                    .collect(),
                vm_ms: runs
                    .iter()
                    .flat_map(|r| r["vms"].as_array().cloned().unwrap_or_default())
                    .filter_map(|v| v["stop_to_resume_ms"].as_f64())
                    .collect(),
                phases_ms: Vec::new(),
                save_mib_s: None,
                restore_mib_s: None,
                error: None,
            });
        }
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b.filter(|b| *b > 0.0)).map(|(a, b)| a / b)
}

/// Per cell: warmvm over QEMU, host-wide on warmvm's measure (first guest stopped → last
/// running; QEMU: first `STOP` → last `RESUME`), per VM against QEMU's own `downtime` (a
/// per-process figure) and total time, and the guest-visible pauses per VM and host-wide.
fn ratios(cells: &[Cell], pause: &Value, qemu: &Value) -> Value {
    let mut out = Vec::new();
    for q in qemu["cells"].as_array().into_iter().flatten() {
        let vms = q["vms"].as_u64().unwrap_or(1);
        let mib = q["memory_mib"].as_u64().unwrap_or(0);
        let cell = |mode: &str| {
            cells
                .iter()
                .find(|c| c.mode == mode && u64::from(c.vms) == vms && c.memory_mib == mib)
        };
        let host = |mode: &str| cell(mode).and_then(Cell::host_p50);
        let per_vm = |mode: &str| cell(mode).and_then(Cell::vm_p50);
        let p = pause["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["memory_mib"] == mib && c["vms"] == vms)
            .cloned()
            .unwrap_or(Value::Null);
        let cpr = &q["cpr_transfer"];
        let file = &q["migrate_file"];
        out.push(json!({
            "vms": vms,
            "memory_mib": mib,
            "warm_over_qemu_cpr_downtime_stop_to_resume": ratio(host("warm"), cpr["host_stop_to_resume_ms"]["p50"].as_f64()),
            "warm_over_qemu_cpr_downtime_qemu_reported": ratio(per_vm("warm"), cpr["qemu_downtime_ms_p50"].as_f64()),
            "saved_over_qemu_file_downtime_stop_to_resume": ratio(host("saved"), file["host_stop_to_resume_ms"]["p50"].as_f64()),
            "saved_over_qemu_file_downtime_qemu_reported_total": ratio(per_vm("saved"), file["qemu_total_time_ms_p50"].as_f64()),
            "warm_over_qemu_cpr_guest_pause": ratio(p["warm"]["pause_ms"]["p50"].as_f64(), cpr["guest_pause"]["pause_ms"]["p50"].as_f64()),
            "saved_over_qemu_file_guest_pause": ratio(p["saved"]["pause_ms"]["p50"].as_f64(), file["guest_pause"]["pause_ms"]["p50"].as_f64()),
            "warm_over_qemu_cpr_host_guest_pause": ratio(p["warm"]["host_pause_ms"]["p50"].as_f64(), cpr["guest_pause"]["host_pause_ms"]["p50"].as_f64()),
            "saved_over_qemu_file_host_guest_pause": ratio(p["saved"]["host_pause_ms"]["p50"].as_f64(), file["guest_pause"]["host_pause_ms"]["p50"].as_f64()),
        }));
    }
    json!(out)
}

/// The human table's part: the guest-visible pauses, the QEMU rows, the ratios.
pub fn table_text(doc: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.2}"));
    let dash = || "-".to_string();
    let mut rows = Vec::new();
    for c in doc["guest_pause"]["cells"].as_array().into_iter().flatten() {
        for mode in ["warm", "saved"] {
            let p = &c[mode];
            if p.is_null() {
                continue;
            }
            rows.push(vec![
                format!("warmvm {mode}"),
                c["vms"].to_string(),
                c["memory_mib"].to_string(),
                dash(),
                dash(),
                dash(),
                f(&p["pause_ms"]["p50"]),
                f(&p["pause_ms"]["max"]),
                f(&p["host_pause_ms"]["p50"]),
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
            let mut row = vec![
                "QEMU".into(),
                q["vms"].to_string(),
                q["memory_mib"].to_string(),
            ];
            row.extend((0..7).map(|_| dash()));
            row.push(format!("skipped: {why}"));
            rows.push(row);
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
                q["vms"].to_string(),
                q["memory_mib"].to_string(),
                f(&r["host_stop_to_resume_ms"]["p50"]),
                f(&r["stop_to_resume_ms_p50"]),
                format!(
                    "{} / {}",
                    f(&r["qemu_downtime_ms_p50"]),
                    f(&r["qemu_total_time_ms_p50"])
                ),
                f(&p["pause_ms"]["p50"]),
                f(&p["pause_ms"]["max"]),
                f(&p["host_pause_ms"]["p50"]),
                f(&p["noise_ms"]["p50"]),
                p["trace_unavailable"]
                    .as_str()
                    .map_or("kvm_pio trace".to_string(), |w| format!("no trace: {w}")),
            ]);
        }
    }
    let _ = writeln!(
        out,
        "guest-visible pause (heartbeat every {} us, host KVM trace) and the QEMU peer, ms (p50 of {} runs; per VM over all VMs and runs):",
        doc["guest_pause"]["heartbeat_us"], doc["runs_per_cell"]
    );
    let _ = writeln!(
        out,
        "{}",
        warmvm_cli_common::output::table(
            &[
                "VMM / MODE",
                "VMS",
                "MiB/VM",
                "HOST STOP->RESUME",
                "VM STOP->RESUME",
                "QEMU downtime / total",
                "PAUSE p50",
                "PAUSE max",
                "HOST PAUSE p50",
                "NOISE p50",
                "SOURCE",
            ],
            rows,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9],
        )
    );
    for c in doc["guest_pause"]["cells"].as_array().into_iter().flatten() {
        let s = &c["warm"]["segments"];
        if !s.is_null() {
            out.push_str(&crate::bench_segments::table_text(&c["vms"], s));
        }
    }
    for r in doc["peer_ratios"].as_array().into_iter().flatten() {
        let g = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
        let _ = writeln!(
            out,
            "{} VMs x {} MiB, warmvm/QEMU: guest pause warm/cpr {} per VM (goal <= 0.3), {} host-wide; saved/file {} per VM, {} host-wide; downtime warm/cpr {} host-wide stop->resume, {} per VM against QEMU's downtime; saved/file {} host-wide stop->resume, {} per VM against QEMU's total time",
            r["vms"],
            r["memory_mib"],
            g("warm_over_qemu_cpr_guest_pause"),
            g("warm_over_qemu_cpr_host_guest_pause"),
            g("saved_over_qemu_file_guest_pause"),
            g("saved_over_qemu_file_host_guest_pause"),
            g("warm_over_qemu_cpr_downtime_stop_to_resume"),
            g("warm_over_qemu_cpr_downtime_qemu_reported"),
            g("saved_over_qemu_file_downtime_stop_to_resume"),
            g("saved_over_qemu_file_downtime_qemu_reported_total"),
        );
    }
    match doc["qemu_peer"]["skipped"].as_str() {
        Some(why) => {
            let _ = writeln!(out, "QEMU peer: skipped ({why})");
        }
        None => {
            let failed = doc["qemu_peer"]["cells"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| !c["skipped"].is_null())
                .count();
            if failed > 0 {
                let _ = writeln!(
                    out,
                    "QEMU peer: {failed} cell(s) skipped (their reasons are in the table)"
                );
            }
        }
    }
    out
}
