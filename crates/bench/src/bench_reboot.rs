//! `warmvm bench reboot`: the research's comparison, on this host in one run. For each
//! reboot mode (warm, saved, cold) a `warmvm daemon` of the bench's own holds the cell's VMs
//! and is rebooted through its API several times, as `warmvm reboot --mode M` does:
//!
//! - downtime against the number of VMs (`--vms`, at the first `--memory-mib`), and against
//!   the RAM per VM (`--memory-mib`, at one VM), as far as `--max-total-mib` allows;
//! - each figure from the daemons' own reports: the warm reboot's blackout (first vCPU
//!   stopped → last running, CLOCK_MONOTONIC), the saved and cold reboots' downtime (first
//!   guest stopped → last restored and running, or booted and saying it is up);
//! - the disk's sequential direct-I/O bandwidth, measured in the same run with the very
//!   code that writes snapshots, and the share of it the saved reboot achieved.
//!
//! - the guest-visible pause (host KVM trace of the guest's heartbeat) of the warm and saved
//!   reboots, and QEMU 10's cpr-transfer and migrate-to-file on the same guest as a peer
//!   (`bench_peer`), unless QEMU is missing: then the output says why it skipped the peer.
//!
//! It measures and asserts nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
pub(crate) use warmvm_cli_common::bench_args::RebootBenchArgs;

use warmvm_vmm::Lifecycle;

use crate::bench_daemon::BenchDaemon;
use crate::cli::{Failure, RebootMode, EXIT_BAD_INPUT, EXIT_HOST};
use crate::progress::Progress;

/// One (mode, VM count, RAM size) cell.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub mode: &'static str,
    pub vms: u32,
    pub memory_mib: u64,
    pub runs: usize,
    /// Host-wide downtime per reboot, ms.
    pub host_ms: Vec<f64>,
    /// Every VM's downtime over every reboot, ms.
    pub vm_ms: Vec<f64>,
    /// Median of each phase, ms, in order.
    pub phases_ms: Vec<(String, f64)>,
    /// Saved: RAM bytes moved per reboot and the rates (MiB/s) of the save and restore.
    pub save_mib_s: Option<f64>,
    pub restore_mib_s: Option<f64>,
    pub error: Option<String>,
}

impl Cell {
    pub fn host_p50(&self) -> Option<f64> {
        median(&self.host_ms)
    }

    pub fn vm_p50(&self) -> Option<f64> {
        median(&self.vm_ms)
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(s[s.len() / 2])
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

/// The cells: the VM-count sweep at the first RAM size, then the RAM sweep at one VM.
pub(crate) fn matrix(args: &RebootBenchArgs) -> (Vec<(u32, u64)>, Vec<String>) {
    let mut cells = Vec::new();
    let mut skipped = Vec::new();
    let base = args.memory_mib[0];
    let mut push = |vms: u32, mib: u64| {
        if cells.contains(&(vms, mib)) {
            return;
        }
        if u64::from(vms) * mib > args.max_total_mib {
            skipped.push(format!(
                "{vms} VMs x {mib} MiB: over --max-total-mib {}",
                args.max_total_mib
            ));
        } else {
            cells.push((vms, mib));
        }
    };
    for &n in &args.vms {
        push(n, base);
    }
    for &m in &args.memory_mib {
        push(1, m);
    }
    (cells, skipped)
}

pub fn reboot(args: &RebootBenchArgs) -> Result<ExitCode, Failure> {
    if args.vms.is_empty() || args.memory_mib.is_empty() || args.modes.is_empty() {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "--modes, --vms and --memory-mib need at least one value",
        ));
    }
    let exe = crate::cli::warmvm_exe()?;
    // A Ctrl-C or SIGTERM ends the run cleanly: its QEMU processes killed, its daemons
    // stopped and its work directory removed (by the guards on the way out).
    crate::interrupt::install().map_err(|e| Failure::new(EXIT_HOST, e))?;
    let root = args.dir.clone().unwrap_or_else(|| {
        PathBuf::from("/var/tmp").join(format!("warmvm-bench-reboot-{}", std::process::id()))
    });
    std::fs::create_dir_all(&root)
        .map_err(|e| Failure::new(EXIT_HOST, format!("{}: {e}", root.display())))?;
    let root_guard = RemoveOnDrop(root.clone());
    let (cells, skipped) = matrix(args);
    let biggest = cells
        .iter()
        .map(|c| u64::from(c.0) * c.1)
        .max()
        .unwrap_or(256);
    let mut progress = Progress::new(
        "bench reboot",
        1 + cells.len() * args.modes.len() * args.runs as usize + crate::bench_peer::steps(args),
    );
    // At least 256 MiB, so that the figure is the device's and not a cache's or a
    // request's latency; no more than 1 GiB, to keep the run short.
    let disk_mib = biggest.clamp(256, 1024);
    progress.step(&format!("disk bandwidth ({disk_mib} MiB, direct I/O)"));
    let disk = disk_bandwidth(&root, disk_mib << 20);
    progress.done();
    let interrupted = |_| Failure::new(EXIT_INTERRUPTED, crate::interrupt::INTERRUPTED);
    let mut results = Vec::new();
    for &(vms, mib) in &cells {
        for &mode in &args.modes {
            crate::interrupt::check().map_err(interrupted)?;
            results.push(run_cell(&exe, &root, mode, vms, mib, args, &mut progress));
        }
    }
    let (guest_pause, qemu_peer, peer_ratios) =
        crate::bench_peer::run(&exe, &root, args, &results, &mut progress).map_err(interrupted)?;
    progress.finish();
    drop(root_guard);

    let ratios = ratios(&results);
    let doc = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "host": crate::bench_daemon::host_facts(),
        "runs_per_cell": args.runs,
        "disk": disk,
        "cells": results.iter().map(cell_json).collect::<Vec<_>>(),
        "ratios": ratios,
        "skipped": skipped,
        "guest_pause": guest_pause,
        "qemu_peer": qemu_peer,
        "peer_ratios": peer_ratios,
    });
    let table = table_text(&doc, &results);
    if let Some(dir) = &args.out {
        let write = || -> Result<(), String> {
            let peer = crate::bench_peer::plot_cells(&doc["qemu_peer"]);
            crate::plots::write_all(dir, &results, &peer)?;
            let json = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("results.json"), json + "\n").map_err(|e| e.to_string())?;
            std::fs::write(dir.join("table.txt"), &table).map_err(|e| e.to_string())
        };
        write().map_err(|e| {
            Failure::new(
                EXIT_HOST,
                format!("cannot write into {}: {e}", dir.display()),
            )
        })?;
    }
    if args.json {
        warmvm_cli_common::output::print_json(&doc);
    } else {
        print!("{table}");
        if let Some(dir) = &args.out {
            println!("table, JSON and plots: {}", dir.display());
        }
    }
    let failed = results.iter().any(|c| c.error.is_some());
    Ok(if failed {
        ExitCode::from(crate::cli::EXIT_VM_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Exit status after SIGINT or SIGTERM, as a shell reports a death by SIGINT.
const EXIT_INTERRUPTED: u8 = 130;

/// The bench's work directory, removed however the run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cell_json(c: &Cell) -> Value {
    json!({
        "mode": c.mode,
        "vms": c.vms,
        "memory_mib": c.memory_mib,
        "runs": c.runs,
        "host_downtime_ms": { "p50": c.host_p50(), "max": max(&c.host_ms), "all": c.host_ms },
        "vm_downtime_ms": { "p50": median(&c.vm_ms), "max": max(&c.vm_ms) },
        "phases_p50_ms": c.phases_ms.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "save_mib_s": c.save_mib_s,
        "restore_mib_s": c.restore_mib_s,
        "error": c.error,
    })
}

/// saved/warm and cold/warm of the median host-wide downtime, per cell.
fn ratios(cells: &[Cell]) -> Vec<Value> {
    let mut out = Vec::new();
    for warm in cells.iter().filter(|c| c.mode == "warm") {
        let other = |m: &str| {
            cells
                .iter()
                .find(|c| c.mode == m && c.vms == warm.vms && c.memory_mib == warm.memory_mib)
                .and_then(Cell::host_p50)
        };
        let w = warm.host_p50().filter(|w| *w > 0.0);
        out.push(json!({
            "vms": warm.vms,
            "memory_mib": warm.memory_mib,
            "saved_over_warm": w.zip(other("saved")).map(|(w, s)| s / w),
            "cold_over_warm": w.zip(other("cold")).map(|(w, c)| c / w),
        }));
    }
    out
}

fn table_text(doc: &Value, cells: &[Cell]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let d = &doc["disk"];
    let _ = writeln!(
        out,
        "disk (direct I/O, {} MiB, same code as the snapshots): write {:.0} MiB/s, read {:.0} MiB/s{}",
        d["file_mib"],
        d["write_mib_s"].as_f64().unwrap_or(0.0),
        d["read_mib_s"].as_f64().unwrap_or(0.0),
        if d["direct_io"] == true { "" } else { " (the filesystem has no direct I/O: buffered)" }
    );
    let rows = cells
        .iter()
        .map(|c| {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            let phases = c
                .phases_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ");
            let disk_share = match (c.save_mib_s, c.restore_mib_s) {
                (Some(w), Some(r)) => format!(
                    "{:.0}% / {:.0}%",
                    100.0 * w / d["write_mib_s"].as_f64().unwrap_or(f64::NAN),
                    100.0 * r / d["read_mib_s"].as_f64().unwrap_or(f64::NAN)
                ),
                _ => "-".into(),
            };
            vec![
                c.mode.to_string(),
                c.vms.to_string(),
                c.memory_mib.to_string(),
                f(c.host_p50()),
                f(max(&c.host_ms)),
                f(median(&c.vm_ms)),
                disk_share,
                c.error.clone().unwrap_or(phases),
            ]
        })
        .collect();
    let _ = writeln!(
        out,
        "{}",
        warmvm_cli_common::output::table(
            &[
                "MODE",
                "VMS",
                "MiB/VM",
                "HOST ms p50",
                "HOST ms max",
                "VM ms p50",
                "DISK w/r",
                "PHASES p50 (ms) / ERROR",
            ],
            rows,
            &[1, 2, 3, 4, 5],
        )
    );
    for r in doc["ratios"].as_array().into_iter().flatten() {
        let f = |k: &str| {
            r[k].as_f64()
                .map_or("-".to_string(), |v| format!("{v:.0}x"))
        };
        let _ = writeln!(
            out,
            "{} VMs x {} MiB: saved/warm {}, cold/warm {}",
            r["vms"],
            r["memory_mib"],
            f("saved_over_warm"),
            f("cold_over_warm")
        );
    }
    for s in doc["skipped"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "skipped: {}", s.as_str().unwrap_or_default());
    }
    out.push_str(&crate::bench_peer::table_text(doc));
    out
}

/// Sequential write and read bandwidth of the disk under `dir`, with the snapshots' own
/// direct-I/O code (same request size and parallelism).
fn disk_bandwidth(dir: &Path, bytes: u64) -> Value {
    let run = || -> Result<Value, String> {
        let bytes = bytes.max(64 << 20);
        // An anonymous mapping stands in for guest RAM: page-aligned, filled (so that no
        // zero page is written).
        // SAFETY: a fresh private anonymous mapping; unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: the mapping is `bytes` long and ours.
        let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, bytes as usize) };
        for (i, b) in buf.iter_mut().enumerate().step_by(512) {
            *b = (i / 512) as u8 | 1;
        }
        let path = dir.join("disk-bandwidth.bin");
        let _ = std::fs::remove_file(&path);
        let extents = [(0, bytes)];
        let t = Instant::now();
        // SAFETY: the mapping is valid and unchanged during the call.
        let written =
            unsafe { warmvm_vmm::snapshot::ramfile::write(&path, addr as u64, bytes, &extents) };
        let write_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        // SAFETY: as above; the mapping is writable.
        let read =
            unsafe { warmvm_vmm::snapshot::ramfile::read(&path, addr as u64, bytes, &extents) };
        let read_s = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&path);
        // SAFETY: unmapping what we mapped; `buf` is not used after this.
        unsafe { libc::munmap(addr, bytes as usize) };
        let (_, direct) = written.map_err(|e| format!("write: {e}"))?;
        read.map_err(|e| format!("read: {e:?}"))?;
        let mib = bytes as f64 / f64::from(1 << 20);
        Ok(json!({
            "file_mib": bytes >> 20,
            "direct_io": direct,
            "write_mib_s": mib / write_s,
            "read_mib_s": mib / read_s,
        }))
    };
    run().unwrap_or_else(|e| json!({ "error": e }))
}

fn run_cell(
    exe: &Path,
    root: &Path,
    mode: RebootMode,
    vms: u32,
    mib: u64,
    args: &RebootBenchArgs,
    progress: &mut Progress,
) -> Cell {
    let mut cell = Cell {
        mode: mode.name(),
        vms,
        memory_mib: mib,
        runs: 0,
        host_ms: Vec::new(),
        vm_ms: Vec::new(),
        phases_ms: Vec::new(),
        save_mib_s: None,
        restore_mib_s: None,
        error: None,
    };
    let mut phases: Vec<Vec<(String, f64)>> = Vec::new();
    let mut save_rates = Vec::new();
    let mut restore_rates = Vec::new();
    let result = (|| -> Result<(), String> {
        let dir = root.join(format!("{}-{vms}x{mib}", mode.name()));
        let d = BenchDaemon::start(exe, &dir)?;
        for i in 0..vms {
            let vm = serde_json::from_value(json!({
                "name": format!("vm{i}"), "memory_mib": mib, "cmdline": args.guest_cmdline,
            }))
            .map_err(|e| e.to_string())?;
            d.client.create(&vm).map_err(|e| e.to_string())?;
        }
        for run in 0..args.runs {
            crate::interrupt::check()?;
            progress.step(&format!(
                "{}: {vms} VMs x {mib} MiB, reboot {}/{}",
                mode.name(),
                run + 1,
                args.runs
            ));
            wait_verified(&d, vms)?;
            let answer = d
                .client
                .typed()
                .reboot_with(crate::cli::api_mode(mode), None, Some(10))
                .map_err(|e| format!("reboot {}: {e}", run + 1))?;
            let ms = |us: u64| us as f64 / 1000.0;
            if mode == RebootMode::Warm {
                // The VMs moved, but such a report holds no figure to count.
                if !answer.is_measured() {
                    return Err(format!(
                        "reboot {}: the blackout was not measured: {:?}",
                        run + 1,
                        answer.errors
                    ));
                }
                cell.host_ms.push(ms(answer.host_blackout_us));
                for v in &answer.vms {
                    cell.vm_ms.push(ms(v.blackout_us));
                }
                let p = &answer.phases;
                phases.push(
                    [
                        ("quiesce", p.quiesce_us),
                        ("capture", p.capture_us),
                        ("transfer", p.transfer_us),
                        ("restore", p.restore_us),
                        ("commit", p.commit_us),
                        ("resume", p.resume_us),
                    ]
                    .iter()
                    .map(|(k, us)| (k.to_string(), ms(*us)))
                    .collect(),
                );
            } else {
                let s = d.client.typed().status().map_err(|e| e.to_string())?;
                let r = s
                    .value
                    .last_reboot
                    .ok_or("the new daemon's status has no last_reboot")?;
                if let Some(err) = r.vms.iter().find_map(|v| v.error.as_ref()) {
                    return Err(format!("a VM did not come back: {err}"));
                }
                cell.host_ms.push(ms(r.host_downtime_us));
                for v in &r.vms {
                    cell.vm_ms.push(ms(v.downtime_us));
                }
                let (prep, back) = if mode == RebootMode::Saved {
                    ("save", "restore")
                } else {
                    ("shut down", "boot until ready")
                };
                phases.push(vec![
                    (prep.to_string(), ms(r.prepare_us)),
                    ("replace daemon".to_string(), ms(r.replace_us)),
                    (back.to_string(), ms(r.bring_back_us)),
                ]);
                if mode == RebootMode::Saved {
                    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
                    save_rates.push(mib(r.bytes_written) / (ms(r.prepare_us) / 1000.0));
                    restore_rates.push(mib(r.bytes_read) / (ms(r.bring_back_us) / 1000.0));
                }
            }
            cell.runs += 1;
            progress.done();
        }
        Ok(())
    })();
    cell.error = result.err();
    if let Some(first) = phases.first() {
        cell.phases_ms = first
            .iter()
            .enumerate()
            .map(|(i, (k, _))| {
                let v: Vec<f64> = phases
                    .iter()
                    .filter_map(|p| p.get(i).map(|x| x.1))
                    .collect();
                (k.clone(), median(&v).unwrap_or(0.0))
            })
            .collect();
    }
    cell.save_mib_s = median(&save_rates);
    cell.restore_mib_s = median(&restore_rates);
    cell
}

/// Every guest has filled and verified its RAM once: the state a reboot must keep.
fn wait_verified(d: &BenchDaemon, vms: u32) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        crate::interrupt::check()?;
        let all = d
            .client
            .typed()
            .list()
            .map_err(|e| e.to_string())?
            .into_value()
            .vms;
        let ok = all.len() == vms as usize
            && all.iter().all(|v| {
                v.lifecycle == Lifecycle::Running
                    && v.guest
                        .as_ref()
                        .is_some_and(|g| g.mismatches == 0 && g.min_passes >= 1)
            });
        if ok {
            return Ok(());
        }
        if let Some((bad, g)) = all
            .iter()
            .find_map(|v| Some((v, v.guest.as_ref().filter(|g| g.mismatches > 0)?)))
        {
            return Err(format!(
                "{} found a mismatch: {}",
                bad.name,
                serde_json::to_string(g).unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            return Err("the guests did not verify their RAM within 600 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_has_both_sweeps_within_the_memory_cap() {
        let args = RebootBenchArgs {
            json: false,
            modes: vec![RebootMode::Warm],
            vms: vec![1, 2, 4, 8, 16],
            memory_mib: vec![256, 1024, 4096],
            runs: 1,
            max_total_mib: 2048,
            dir: None,
            out: None,
            guest_cmdline: String::new(),
            no_qemu: true,
        };
        let (cells, skipped) = matrix(&args);
        assert_eq!(
            cells,
            vec![(1, 256), (2, 256), (4, 256), (8, 256), (1, 1024)]
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }
}
