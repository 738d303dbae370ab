//! Tables for people, one JSON document for scripts.

use warmvm_vmm::VmReport;

pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("warmvm: error: cannot encode results as JSON: {e}"),
    }
}

/// The per-VM table of `run` and `demo`.
pub fn print_vm_table(reports: &[VmReport]) {
    println!(
        "{:<16} {:>8} {:>5} {:<14} {:>14} {:>10} {:>14} {:>7}",
        "VM", "RAM MiB", "vCPU", "STATE", "PAGES VERIFIED", "MISMATCHES", "COUNTER", "PASSES"
    );
    for r in reports {
        let state = match &r.lifecycle {
            warmvm_vmm::Lifecycle::PoweredOff { exit_status } => format!("off({exit_status})"),
            other => other.name().to_string(),
        };
        match &r.guest {
            Some(g) => println!(
                "{:<16} {:>8} {:>5} {:<14} {:>14} {:>10} {:>14} {:>7}",
                r.name,
                r.memory_mib,
                r.vcpus,
                state,
                g.pages_verified,
                g.mismatches,
                g.counter,
                g.min_passes
            ),
            None => println!(
                "{:<16} {:>8} {:>5} {:<14} {:>14} {:>10} {:>14} {:>7}",
                r.name, r.memory_mib, r.vcpus, state, "-", "-", "-", "-"
            ),
        }
    }
}

/// The per-VM blackout and phase times of a warm reboot.
pub fn print_reboot_report(r: &warmvm_vmm::handover::RebootReport) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "warm reboot: {} -> {} (pid {}), host-wide blackout {:.3} ms, state {} bytes",
        r.from_build,
        r.to_build,
        r.new_pid,
        ms(r.host_blackout_us),
        r.state_bytes
    );
    let p = &r.phases;
    println!(
        "  phases (ms): stage {:.3} (before the pause) | quiesce {:.3}  capture {:.3}  transfer {:.3}  restore {:.3}  resume {:.3}",
        ms(p.stage_us),
        ms(p.quiesce_us),
        ms(p.capture_us),
        ms(p.transfer_us),
        ms(p.restore_us),
        ms(p.resume_us)
    );
    for vm in &r.vms {
        println!("  {:<16} blackout {:.3} ms", vm.name, ms(vm.blackout_us));
    }
}
