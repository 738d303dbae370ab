//! `warmvm bench warm-reboot`: blackout of chained warm reboots for a matrix of VM counts
//! and RAM sizes. Each cell is one `warmvm demo --reboots N --json` run (a chain of VMM
//! processes, each taking over from the last), so what is measured is exactly what an
//! operator's reboot does.

use std::process::{Command, ExitCode};

use serde::Serialize;
use serde_json::Value;

use crate::cli::{Failure, EXIT_BAD_INPUT, EXIT_VM_FAILED};

#[derive(clap::Args, Debug)]
pub struct WarmRebootArgs {
    /// Print one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// The global `--socket` (unused: the bench starts its own daemon).
    #[arg(skip)]
    pub socket: Option<std::path::PathBuf>,
    /// Reboots per cell.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub reboots: u32,
    /// VM counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub vms: Vec<u32>,
    /// RAM per VM in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub memory_mib: Vec<u64>,
    /// Reference guest command line: busy guests (interval_ms=0) give the steady
    /// stream the guest-visible gap needs; idle ones isolate the VMM's own cost.
    #[arg(long, default_value = "quiet interval_ms=0")]
    pub guest_cmdline: String,
    #[arg(long, default_value_t = 100)]
    pub reboot_interval_ms: u64,
    #[arg(long, default_value_t = 200)]
    pub gap_window_ms: u64,
    /// Skip cells whose guest RAM is more than this share of host memory.
    #[arg(long, default_value_t = 0.7)]
    pub max_host_share: f64,
}

#[derive(Serialize)]
struct Cell {
    vms: u32,
    memory_mib: u64,
    ok: bool,
    reboots: u64,
    /// The VMM's own blackout: first vCPU stopped → last vCPU running, host-wide.
    host_blackout_ms: Value,
    /// The same per VM.
    vm_blackout_ms: Value,
    phase_p50_ms: Value,
    /// The longest stall a guest saw in equal windows with and without a reboot.
    guest_visible_gap: Value,
    error: Option<String>,
}

pub fn warm_reboot(args: &WarmRebootArgs) -> Result<ExitCode, Failure> {
    let exe = warmvm_vmm::handover::this_binary();
    let host_mib = warmvm_vmm::HostLimits::probe().memory_mib;
    if args.vms.is_empty() || args.memory_mib.is_empty() {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "--vms and --memory-mib need at least one value",
        ));
    }
    let mut cells = Vec::new();
    let mut skipped = Vec::new();
    for &vms in &args.vms {
        for &mib in &args.memory_mib {
            let total = u64::from(vms) * mib;
            if host_mib > 0 && total as f64 > host_mib as f64 * args.max_host_share {
                skipped.push(format!("{vms} x {mib} MiB"));
                continue;
            }
            if !args.json {
                eprintln!(
                    "warmvm bench: {vms} VMs x {mib} MiB, {} reboots ...",
                    args.reboots
                );
            }
            let dir = std::env::temp_dir()
                .join(format!("warmvm-bench-{}-{vms}-{mib}", std::process::id()));
            let out = Command::new(&exe)
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
            let gaps = &doc["guest_visible_gap"];
            let pick = |v: &Value, keys: &[&str]| -> Value {
                keys.iter()
                    .map(|k| (k.to_string(), v[*k].clone()))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            };
            cells.push(Cell {
                vms,
                memory_mib: mib,
                ok: doc["ok"] == true,
                reboots: chain["reboots"].as_u64().unwrap_or(0),
                host_blackout_ms: pick(chain, &["host_p50_ms", "host_p99_ms", "host_max_ms"]),
                vm_blackout_ms: pick(chain, &["vm_p50_ms", "vm_p99_ms", "vm_max_ms"]),
                phase_p50_ms: chain["phase_p50_ms"].clone(),
                guest_visible_gap: gaps.clone(),
                error: match &doc["warm_reboot_error"] {
                    Value::String(s) => Some(s.clone()),
                    _ if doc.is_null() => {
                        Some(String::from_utf8_lossy(&out.stderr).trim().to_string())
                    }
                    _ => None,
                },
            });
        }
    }
    let ok = cells.iter().all(|c| c.ok);
    if args.json {
        crate::output::print_json(&serde_json::json!({
            "ok": ok,
            "reboots_per_cell": args.reboots,
            "guest_cmdline": args.guest_cmdline,
            "skipped": skipped,
            "cells": cells,
        }));
    } else {
        print_table(&cells, &skipped);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VM_FAILED)
    })
}

fn print_table(cells: &[Cell], skipped: &[String]) {
    let f = |v: &Value, k: &str| {
        v[k].as_f64()
            .map(|x| format!("{x:.3}"))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:>4} {:>8} {:>7} | {:>9} {:>9} | {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} | {:>10} {:>10} | ok",
        "VMs", "MiB/VM", "reboots", "host p50", "host p99", "VM p50", "VM p99",
        "quiesce", "capture", "restore", "resume", "gap reboot", "gap noise"
    );
    for c in cells {
        let p = &c.phase_p50_ms;
        let g = &c.guest_visible_gap;
        println!(
            "{:>4} {:>8} {:>7} | {:>9} {:>9} | {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} | {:>10} {:>10} | {}",
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
            f(p, "resume"),
            f(g, "with_reboot_p50_ms"),
            f(g, "without_reboot_p50_ms"),
            if c.ok { "yes".to_string() } else { format!("NO: {}", c.error.clone().unwrap_or_default()) }
        );
    }
    println!(
        "(ms; blackout = first vCPU stopped to last vCPU running again, as the VMM measures it;"
    );
    println!(" gap = longest stall a guest saw in equal windows across a reboot and without one)");
    if !skipped.is_empty() {
        println!("skipped for lack of host memory: {}", skipped.join(", "));
    }
}
