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
                r.name, r.memory_mib, r.vcpus, state, g.pages_verified, g.mismatches, g.counter,
                g.min_passes
            ),
            None => println!(
                "{:<16} {:>8} {:>5} {:<14} {:>14} {:>10} {:>14} {:>7}",
                r.name, r.memory_mib, r.vcpus, state, "-", "-", "-", "-"
            ),
        }
    }
}
