//! `warmvm bench warm-reboot`: blackout of chained warm reboots for a matrix of VM counts
//! and RAM sizes, measured on two paths:
//!
//! - `daemon`: what operators use. A `warmvm daemon` holds the VMs and is sent
//!   `PUT /v1/reboot` (as `warmvm reboot --mode warm` does) N times; the figures come from the
//!   reports the daemon answers (see bench_daemon.rs).
//! - `demo`: `warmvm demo --reboots N --json`, a chain of VMM processes each taking over
//!   from the last, which also measures the stall the guests see.
//!
//! Progress goes to standard error (one line in place on a terminal, plain lines otherwise).

use std::process::{Command, ExitCode};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use warmvm_cli_common::bench_args::{RebootPath, WarmRebootArgs};

use crate::cli::{Failure, EXIT_BAD_INPUT, EXIT_VM_FAILED};
use crate::progress::Progress;

#[derive(Serialize)]
struct Cell {
    /// `daemon`: PUT /v1/reboot to a warmvm daemon; `demo`: warmvm demo's chain.
    path: &'static str,
    vms: u32,
    memory_mib: u64,
    ok: bool,
    reboots: u64,
    /// The VMM's own blackout: first vCPU stopped → last vCPU running, host-wide.
    host_blackout_ms: Value,
    /// The same per VM.
    vm_blackout_ms: Value,
    phase_p50_ms: Value,
    /// The longest stall a guest saw in equal windows with and without a reboot (demo).
    guest_visible_gap: Value,
    /// The reboot request's round trip as the client sees it (daemon).
    request_ms: Value,
    error: Option<String>,
}

pub fn warm_reboot(args: &WarmRebootArgs) -> Result<ExitCode, Failure> {
    let exe = crate::cli::warmvm_exe()?;
    let host_mib = warmvm_vmm::HostLimits::probe().memory_mib;
    if args.vms.is_empty() || args.memory_mib.is_empty() {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "--vms and --memory-mib need at least one value",
        ));
    }
    let mut cells = Vec::new();
    let mut skipped = Vec::new();
    let mut matrix = Vec::new();
    for &vms in &args.vms {
        for &mib in &args.memory_mib {
            let total = u64::from(vms) * mib;
            if host_mib > 0 && total as f64 > host_mib as f64 * args.max_host_share {
                skipped.push(format!("{vms} x {mib} MiB"));
            } else {
                matrix.push((vms, mib));
            }
        }
    }
    let host = crate::bench_daemon::host_facts();
    // One step per daemon reboot, one per demo chain.
    let per_cell = |p: &RebootPath| match p {
        RebootPath::Daemon => args.reboots as usize,
        RebootPath::Demo => 1,
    };
    let steps = matrix.len() * args.paths.iter().map(per_cell).sum::<usize>();
    let mut progress = Progress::new("warmvm bench warm-reboot", steps);
    for &(vms, mib) in &matrix {
        for &path in &args.paths {
            let cell = match path {
                RebootPath::Daemon => {
                    let c = crate::bench_daemon::run_cell(
                        &exe,
                        vms,
                        mib,
                        args.reboots,
                        Duration::from_millis(args.reboot_interval_ms),
                        &args.guest_cmdline,
                        &mut progress,
                    );
                    Cell {
                        path: path.name(),
                        vms,
                        memory_mib: mib,
                        ok: c.error.is_none() && c.reboots == u64::from(args.reboots),
                        reboots: c.reboots,
                        host_blackout_ms: c.host_blackout_ms,
                        vm_blackout_ms: c.vm_blackout_ms,
                        phase_p50_ms: c.phase_p50_ms,
                        guest_visible_gap: Value::Null,
                        request_ms: c.request_ms,
                        error: c.error,
                    }
                }
                RebootPath::Demo => {
                    progress.step(&format!(
                        "demo: {vms} VMs x {mib} MiB, a chain of {} reboots",
                        args.reboots
                    ));
                    let c = demo_cell(&exe, args, vms, mib)?;
                    progress.done();
                    c
                }
            };
            cells.push(cell);
        }
    }
    progress.finish();
    let ok = cells.iter().all(|c| c.ok);
    if args.json {
        warmvm_cli_common::output::print_json(&serde_json::json!({
            "ok": ok,
            "host": host,
            "paths": {
                "daemon": "PUT /v1/reboot to a warmvm daemon (what `warmvm reboot --mode warm` sends); figures from the daemon's reports",
                "demo": "warmvm demo --reboots N: a chain of VMM processes, each taking over from the last",
            },
            "reboots_per_cell": args.reboots,
            "guest_cmdline": args.guest_cmdline,
            "skipped": skipped,
            "cells": cells,
        }));
    } else {
        print_table(&cells, &skipped, &host);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VM_FAILED)
    })
}

/// One `warmvm demo --reboots N --json` run.
fn demo_cell(
    exe: &std::path::Path,
    args: &WarmRebootArgs,
    vms: u32,
    mib: u64,
) -> Result<Cell, Failure> {
    let dir = std::env::temp_dir().join(format!("warmvm-bench-{}-{vms}-{mib}", std::process::id()));
    let out = Command::new(exe)
        .args(["demo", "--json", "--seconds", "1"])
        .args(["--vms", &vms.to_string(), "--memory-mib", &mib.to_string()])
        .args(["--reboots", &args.reboots.to_string()])
        .args(["--reboot-interval-ms", &args.reboot_interval_ms.to_string()])
        .args(["--gap-window-ms", &args.gap_window_ms.to_string()])
        .args(["--guest-cmdline", &args.guest_cmdline])
        .arg("--state-dir")
        .arg(&dir)
        .output()
        .map_err(|e| Failure::new(EXIT_VM_FAILED, format!("cannot run the demo: {e}")))?;
    let _ = std::fs::remove_dir_all(&dir);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let chain = &doc["reboot_chain"];
    let pick = |v: &Value, keys: &[&str]| -> Value {
        keys.iter()
            .map(|k| (k.to_string(), v[*k].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    Ok(Cell {
        path: RebootPath::Demo.name(),
        vms,
        memory_mib: mib,
        ok: doc["ok"] == true,
        reboots: chain["reboots"].as_u64().unwrap_or(0),
        host_blackout_ms: pick(chain, &["host_p50_ms", "host_p99_ms", "host_max_ms"]),
        vm_blackout_ms: pick(chain, &["vm_p50_ms", "vm_p99_ms", "vm_max_ms"]),
        phase_p50_ms: chain["phase_p50_ms"].clone(),
        guest_visible_gap: doc["guest_visible_gap"].clone(),
        request_ms: Value::Null,
        error: match &doc["warm_reboot_error"] {
            Value::String(s) => Some(s.clone()),
            _ if doc.is_null() => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            _ => None,
        },
    })
}

fn print_table(cells: &[Cell], skipped: &[String], host: &Value) {
    let f = |v: &Value, k: &str| {
        v[k].as_f64()
            .map(|x| format!("{x:.3}"))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "host: {}, {} cores ({}), Linux {}, load {}",
        host["cpu_model"].as_str().unwrap_or("?"),
        host["cores"],
        std::env::consts::ARCH,
        host["kernel"].as_str().unwrap_or("?"),
        host["load_average"]
    );
    println!(
        "{:<6} {:>4} {:>8} {:>7} | {:>9} {:>9} | {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} | {:>10} {:>10} {:>10} | ok",
        "path", "VMs", "MiB/VM", "reboots", "host p50", "host p99", "VM p50", "VM p99",
        "quiesce", "capture", "restore", "commit", "request", "gap reboot", "gap noise"
    );
    for c in cells {
        let p = &c.phase_p50_ms;
        let g = &c.guest_visible_gap;
        println!(
            "{:<6} {:>4} {:>8} {:>7} | {:>9} {:>9} | {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} | {:>10} {:>10} {:>10} | {}",
            c.path,
            c.vms,
            c.memory_mib,
            c.reboots,
            f(&c.host_blackout_ms, "host_p50_ms"),
            f(&c.host_blackout_ms, "host_p99_ms"),
            f(&c.vm_blackout_ms, "vm_p50_ms"),
            f(&c.vm_blackout_ms, "vm_p99_ms"),
            f(p, "quiesce"),
            f(p, "capture"),
            f(p, "restore"),
            f(p, "commit"),
            f(&c.request_ms, "p50_ms"),
            f(g, "with_reboot_p50_ms"),
            f(g, "without_reboot_p50_ms"),
            if c.ok { "yes".to_string() } else { format!("NO: {}", c.error.clone().unwrap_or_default()) }
        );
    }
    println!(
        "(ms; blackout = first vCPU stopped to last vCPU running again, as the VMM measures it;"
    );
    println!(" request = PUT /v1/reboot round trip as the client sees it (daemon path);");
    println!(" gap = longest stall a guest saw in equal windows across a reboot and without one (demo path);");
    println!(" daemon = PUT /v1/reboot to a warmvm daemon, as operators reboot; demo = warmvm demo's chain;");
    println!(" commit = the new VMM's Ready to its claim of the guests; phases are medians;");
    println!(
        " p99 is shown only with {}+ reboots: with fewer it would be the maximum)",
        warmvm_cli_common::stats::P99_MIN_SAMPLES
    );
    if !skipped.is_empty() {
        println!("skipped for lack of host memory: {}", skipped.join(", "));
    }
}
