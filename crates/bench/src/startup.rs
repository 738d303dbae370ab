//! Figure 1: how long from starting warmvm until the reference guest runs.
//!
//! Measured twice over, on the same config (one reference-guest VM that fills 1% of its
//! RAM, verifies it once and powers off):
//! - outside: spawn the real `warmvm run` and time until the guest's first console output
//!   reaches the console log. The guest prints right after boot; the log receives what the
//!   UART emits (today byte by byte: vm-superio flushes its writer after every byte), so
//!   this is "process start to first guest instruction" plus the guest's first few exits;
//! - inside: the same VM through warmvm's own `Host` in this process, timing VM creation,
//!   creation to the vCPU's first KVM_RUN, and first KVM_RUN to that first console output.
//!
//! Process start to first instruction is then estimated as the outside figure minus the
//! inside "first KVM_RUN to first console output" (medians).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use warmvm_vmm::{Config, Host, Lifecycle};

use crate::util::{
    ctx, fail, file_len, last_line, ms, spawn_run, wait_or_kill, write_file, Result, Stats,
};

const VM_NAME: &str = "bench-start";
pub const CMDLINE: &str = "passes=1 fill=1 quiet";
const POLL: Duration = Duration::from_micros(200);
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct StartupReport {
    pub runs: usize,
    pub memory_mib: u64,
    pub cmdline: &'static str,
    /// Spawn of `warmvm run` to the guest's first console output in its log.
    pub spawn_to_first_console_output_ms: Stats,
    /// Spawn of `warmvm run` to its exit (boot, fill, one pass, power off, report).
    pub spawn_to_exit_ms: Stats,
    /// In process: `Host::create_all` for the one VM (RAM memfd, KVM VM, memslot,
    /// irqchip, vCPU, boot data, vCPU thread).
    pub create_ms: Stats,
    /// In process: `Vm::time_to_first_run` (VM assembled to the vCPU's first KVM_RUN).
    pub created_to_first_run_ms: Stats,
    /// In process: start of `create_all` to the first KVM_RUN (create + the above, per run).
    pub create_to_first_run_ms: Stats,
    /// In process: first KVM_RUN to the guest's first console output in its log.
    pub first_run_to_first_console_output_ms: Stats,
    /// spawn_to_first_console_output (median) minus first_run_to_first_console_output (median).
    pub estimated_spawn_to_first_instruction_ms: f64,
}

fn config_text(memory_mib: u64) -> String {
    format!("[[vm]]\nname = \"{VM_NAME}\"\nmemory_mib = {memory_mib}\ncmdline = \"{CMDLINE}\"\n")
}

struct Outside {
    first_output_ms: f64,
    exit_ms: f64,
}

fn outside_run(warmvm: &Path, dir: &Path, memory_mib: u64) -> Result<Outside> {
    let config = dir.join("vm.toml");
    write_file(&config, &config_text(memory_mib))?;
    let log = dir.join(VM_NAME).join("console.log");
    let t0 = Instant::now();
    let mut child = spawn_run(warmvm, dir, &config, Stdio::piped())?;
    let mut first_output = None;
    let exit = loop {
        if first_output.is_none() && file_len(&log) > 0 {
            first_output = Some(t0.elapsed());
        }
        if child
            .try_wait()
            .map_err(ctx("waiting for warmvm run"))?
            .is_some()
        {
            break t0.elapsed();
        }
        if t0.elapsed() > RUN_TIMEOUT {
            wait_or_kill(&mut child, Duration::ZERO, "warmvm run")?;
        }
        std::thread::sleep(POLL);
    };
    let out = child
        .wait_with_output()
        .map_err(ctx("reading the output of warmvm run"))?;
    if !out.status.success() {
        return fail(format!(
            "warmvm run failed ({}): {}",
            out.status,
            last_line(&out.stderr)
        ));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(ctx("warmvm run --json printed no valid JSON"))?;
    if report.get("ok") != Some(&serde_json::Value::Bool(true)) {
        return fail("warmvm run reported that its VM did not power off cleanly");
    }
    let Some(first_output) = first_output else {
        return fail(format!(
            "warmvm run exited before its guest's console output reached {}",
            log.display()
        ));
    };
    Ok(Outside {
        first_output_ms: ms(first_output),
        exit_ms: ms(exit),
    })
}

struct Inside {
    create_ms: f64,
    created_to_first_run_ms: f64,
    first_run_to_first_output_ms: f64,
}

fn inside_run(dir: &Path, memory_mib: u64) -> Result<Inside> {
    let config: Config =
        toml::from_str(&config_text(memory_mib)).map_err(ctx("bench VM config"))?;
    let log = dir.join(VM_NAME).join("console.log");
    let mut host = Host::open(dir).map_err(ctx("opening KVM"))?;
    let t0 = Instant::now();
    host.create_all(&config).map_err(ctx("creating the VM"))?;
    let created = Instant::now();
    host.start_all().map_err(ctx("starting the VM"))?;
    let Some(vm) = host.vms().first().cloned() else {
        return fail("the host created no VM");
    };
    let mut first_output = None;
    while !vm.lifecycle().is_finished() {
        if first_output.is_none() && file_len(&log) > 0 {
            first_output = Some(Instant::now());
        }
        if t0.elapsed() > RUN_TIMEOUT {
            vm.stop(Duration::from_secs(1));
            return fail("the in-process VM did not power off in time");
        }
        std::thread::sleep(POLL);
    }
    let state = vm.lifecycle();
    if state != (Lifecycle::PoweredOff { exit_status: 0 }) {
        return fail(format!("the in-process VM ended as {state:?}"));
    }
    let Some(first_output) = first_output else {
        return fail("the in-process VM powered off before its first console output was seen");
    };
    let Some(to_first_run) = vm.time_to_first_run() else {
        return fail("the in-process VM never ran");
    };
    // `Vm::time_to_first_run` counts from the VM's assembly, the last step of its creation
    // (before its vCPU thread is spawned); `created` is a little later, so `created +
    // to_first_run` is at most a thread spawn after the true first KVM_RUN.
    let first_run = created + to_first_run;
    Ok(Inside {
        create_ms: ms(created - t0),
        created_to_first_run_ms: ms(to_first_run),
        first_run_to_first_output_ms: ms(first_output.saturating_duration_since(first_run)),
    })
}

pub fn measure(
    warmvm: &Path,
    scratch: &Path,
    runs: usize,
    memory_mib: u64,
) -> Result<StartupReport> {
    let mut first_output = Vec::new();
    let mut exit = Vec::new();
    let mut create = Vec::new();
    let mut to_run = Vec::new();
    let mut create_to_run = Vec::new();
    let mut run_to_output = Vec::new();
    for i in 0..runs {
        let o = outside_run(warmvm, &scratch.join(format!("start-out-{i}")), memory_mib)?;
        first_output.push(o.first_output_ms);
        exit.push(o.exit_ms);
        let n = inside_run(&scratch.join(format!("start-in-{i}")), memory_mib)?;
        create.push(n.create_ms);
        to_run.push(n.created_to_first_run_ms);
        create_to_run.push(n.create_ms + n.created_to_first_run_ms);
        run_to_output.push(n.first_run_to_first_output_ms);
    }
    let spawn_to_first_console_output_ms = Stats::of(first_output)?;
    let first_run_to_first_console_output_ms = Stats::of(run_to_output)?;
    let estimated = (spawn_to_first_console_output_ms.median
        - first_run_to_first_console_output_ms.median)
        .max(0.0);
    Ok(StartupReport {
        runs,
        memory_mib,
        cmdline: CMDLINE,
        spawn_to_first_console_output_ms,
        spawn_to_exit_ms: Stats::of(exit)?,
        create_ms: Stats::of(create)?,
        created_to_first_run_ms: Stats::of(to_run)?,
        create_to_first_run_ms: Stats::of(create_to_run)?,
        first_run_to_first_console_output_ms,
        estimated_spawn_to_first_instruction_ms: estimated,
    })
}
