//! Figure 3: the VMM's own resident memory per VM, guest RAM excluded.
//!
//! `warmvm run` is started with 1 and then with 16 reference-guest VMs of 64 MiB that
//! fill and verify their RAM once and then idle. Once every guest has printed its
//! post-fill line (and a moment more for its first verification pass), the process's
//! VmRSS and RssShmem are read from /proc: guest RAM is MAP_SHARED memfd memory, which the
//! kernel counts as RssShmem, so VmRSS - RssShmem is what the VMM itself holds. The
//! per-VM figure is the increment from 1 to 16 VMs, divided by 15.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::util::{ctx, fail, last_line, spawn_run, wait_or_kill, write_file, ProcMemory, Result};

pub const GOAL_MAX_MIB_PER_VM: f64 = 4.0;
pub const MEMORY_MIB: u64 = 64;
pub const CMDLINE: &str = "quiet interval_ms=600000";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// After the post-fill line: the first verification pass of 64 MiB takes milliseconds.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize)]
pub struct MemorySample {
    pub vms: usize,
    #[serde(flatten)]
    pub proc: ProcMemory,
    /// VmRSS - RssShmem.
    pub vmm_kib: u64,
    /// The process exited cleanly after SIGINT (every guest powered off with status 0).
    pub clean_exit: bool,
}

#[derive(Debug, Serialize)]
pub struct MemoryReport {
    pub memory_mib_per_vm: u64,
    pub cmdline: &'static str,
    pub one: MemorySample,
    pub many: MemorySample,
    /// (many.vmm - one.vmm) / (many.vms - 1), MiB.
    pub per_vm_mib: f64,
    pub goal_max_mib_per_vm: f64,
    pub meets_goal: bool,
}

fn sample(warmvm: &Path, dir: &Path, vms: usize) -> Result<MemorySample> {
    let mut text = String::new();
    let mut logs = Vec::new();
    for i in 0..vms {
        let name = format!("bench-rss-{i:02}");
        text.push_str(&format!(
            "[[vm]]\nname = \"{name}\"\nmemory_mib = {MEMORY_MIB}\ncmdline = \"{CMDLINE}\"\n\n"
        ));
        logs.push(dir.join(&name).join("console.log"));
    }
    let config = dir.join("vms.toml");
    write_file(&config, &text)?;
    let mut child = spawn_run(warmvm, dir, &config, Stdio::null())?;
    let pid = child.id();
    let start = Instant::now();
    let ready = loop {
        let filled = logs
            .iter()
            .filter(|l| {
                std::fs::read_to_string(l)
                    .map(|t| t.contains("warmvm-guest: filled"))
                    .unwrap_or(false)
            })
            .count();
        if filled == vms {
            break Ok(());
        }
        if let Some(status) = child.try_wait().map_err(ctx("waiting for warmvm run"))? {
            let out = child
                .wait_with_output()
                .map_err(ctx("reading warmvm's output"))?;
            return fail(format!(
                "warmvm run with {vms} VMs exited early ({status}): {}",
                last_line(&out.stderr)
            ));
        }
        if start.elapsed() > READY_TIMEOUT {
            break fail(format!(
                "only {filled} of {vms} guests filled their RAM within {} s",
                READY_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let reading = ready.and_then(|()| {
        std::thread::sleep(SETTLE);
        ProcMemory::read(pid)
    });
    // SAFETY: kill only sends a signal, to a child this function spawned and has not yet
    // reaped, so the pid cannot have been reused.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
    let status = wait_or_kill(&mut child, Duration::from_secs(30), "warmvm run")?;
    let proc = reading?;
    Ok(MemorySample {
        vms,
        proc,
        vmm_kib: proc.vmm_kib(),
        clean_exit: status.success(),
    })
}

pub fn measure(warmvm: &Path, scratch: &Path, many: usize) -> Result<MemoryReport> {
    if many < 2 {
        return fail("the VMM memory figure needs at least 2 VMs for its second sample");
    }
    let one = sample(warmvm, &scratch.join("rss-1"), 1)?;
    let many = sample(warmvm, &scratch.join(format!("rss-{many}")), many)?;
    let per_vm_mib = (many.vmm_kib as f64 - one.vmm_kib as f64) / (many.vms - 1) as f64 / 1024.0;
    Ok(MemoryReport {
        memory_mib_per_vm: MEMORY_MIB,
        cmdline: CMDLINE,
        one,
        many,
        per_vm_mib,
        goal_max_mib_per_vm: GOAL_MAX_MIB_PER_VM,
        meets_goal: per_vm_mib <= GOAL_MAX_MIB_PER_VM,
    })
}
