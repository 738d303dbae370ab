//! Prometheus text exposition (format 0.0.4) of the daemon's and its VMs' figures.
//!
//! Cheap by design, since aging detection polls it: the Host lock is held only to clone the
//! list of VMs; every figure is then an atomic load, one fstat per RAM region, or a
//! sequence-locked read of the reference guest's status area; the daemon's own figures come
//! from three small /proc reads.

use std::fmt::Write as _;
use std::sync::Arc;

use warmvm_vmm::status::GuestFigures;
use warmvm_vmm::{Lifecycle, VcpuStats, Vm};

use crate::state::ApiState;

/// Every state a VM can be in; the state gauge has one series per state.
const STATES: [&str; 7] = [
    "created",
    "running",
    "paused",
    "powered-off",
    "crashed",
    "stopped",
    "handed-over",
];

/// What one VM contributes, read once per scrape.
struct VmSample {
    vm: Arc<Vm>,
    state: Lifecycle,
    vcpus: Vec<VcpuStats>,
    resident_bytes: u64,
    uptime_secs: f64,
    guest: Option<GuestFigures>,
}

/// The daemon's own figures, from /proc.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessFigures {
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
}

impl ProcessFigures {
    pub fn read() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * page);
        // The directory's own fd is in the listing while it is read.
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count().saturating_sub(1) as u64)
            .unwrap_or(0);
        let threads = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        Self {
            resident_bytes,
            open_fds,
            threads,
        }
    }
}

struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &dyn std::fmt::Display)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"");
                let _ = write!(LabelEscaper(&mut self.text), "{v}");
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// Escapes a label value as the text format wants (backslash, double quote, newline) while
/// it is formatted, without an intermediate string.
struct LabelEscaper<'a>(&'a mut String);

impl std::fmt::Write for LabelEscaper<'_> {
    fn write_str(&mut self, v: &str) -> std::fmt::Result {
        for c in v.chars() {
            match c {
                '\\' => self.0.push_str("\\\\"),
                '"' => self.0.push_str("\\\""),
                '\n' => self.0.push_str("\\n"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// Render every metric.
pub fn render(state: &ApiState) -> String {
    let vms: Vec<VmSample> = state
        .vms()
        .into_iter()
        .map(|vm| VmSample {
            state: vm.lifecycle(),
            vcpus: vm.vcpu_stats().collect(),
            resident_bytes: vm.shared().ram.resident_bytes(),
            uptime_secs: vm.shared().created_at.elapsed().as_secs_f64(),
            guest: vm.guest_figures(),
            vm,
        })
        .collect();
    let process = ProcessFigures::read();
    let mut o = Out {
        text: String::with_capacity(4096 + vms.len() * 4096),
    };

    o.family(
        "warmvm_daemon_info",
        "gauge",
        "The daemon's version (always 1).",
    );
    o.sample(
        "warmvm_daemon_info",
        &[("version", &env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    o.family(
        "warmvm_daemon_uptime_seconds",
        "gauge",
        "Seconds since this daemon process started serving.",
    );
    o.sample(
        "warmvm_daemon_uptime_seconds",
        &[],
        state.uptime().as_secs_f64(),
    );
    o.family(
        "warmvm_daemon_resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon process (includes guest RAM it has touched).",
    );
    o.sample(
        "warmvm_daemon_resident_memory_bytes",
        &[],
        process.resident_bytes as f64,
    );
    o.family(
        "warmvm_daemon_open_fds",
        "gauge",
        "Open file descriptors of the daemon.",
    );
    o.sample("warmvm_daemon_open_fds", &[], process.open_fds as f64);
    o.family(
        "warmvm_daemon_threads",
        "gauge",
        "Threads of the daemon (vCPUs included).",
    );
    o.sample("warmvm_daemon_threads", &[], process.threads as f64);
    o.family("warmvm_vms", "gauge", "VMs the daemon holds, in any state.");
    o.sample("warmvm_vms", &[], vms.len() as f64);

    o.family(
        "warmvm_vm_state",
        "gauge",
        "1 for the state the VM is in, 0 for the others.",
    );
    for s in &vms {
        for st in STATES {
            let v = if s.state.name() == st { 1.0 } else { 0.0 };
            o.sample(
                "warmvm_vm_state",
                &[("vm", &s.vm.name()), ("state", &st)],
                v,
            );
        }
    }
    let per_vm =
        |o: &mut Out, name: &str, kind: &str, help: &str, f: &dyn Fn(&VmSample) -> Option<f64>| {
            o.family(name, kind, help);
            for s in &vms {
                if let Some(v) = f(s) {
                    o.sample(name, &[("vm", &s.vm.name())], v);
                }
            }
        };
    per_vm(
        &mut o,
        "warmvm_vm_memory_bytes",
        "gauge",
        "Guest RAM size.",
        &|s| Some((s.vm.config.memory_mib << 20) as f64),
    );
    per_vm(
        &mut o,
        "warmvm_vm_resident_memory_bytes",
        "gauge",
        "Guest RAM actually backed by host memory.",
        &|s| Some(s.resident_bytes as f64),
    );
    per_vm(
        &mut o,
        "warmvm_vm_vcpus",
        "gauge",
        "vCPUs of the VM.",
        &|s| Some(f64::from(s.vm.config.vcpus)),
    );
    per_vm(
        &mut o,
        "warmvm_vm_uptime_seconds",
        "gauge",
        "Seconds since the VM was created.",
        &|s| Some(s.uptime_secs),
    );
    o.family(
        "warmvm_vm_unknown_accesses_total",
        "counter",
        "Guest accesses to ports or MMIO addresses no device claims.",
    );
    for s in &vms {
        let u = s.vm.shared().devices.unknown.counts();
        for (kind, v) in [
            ("pio_read", u.pio_reads),
            ("pio_write", u.pio_writes),
            ("mmio_read", u.mmio_reads),
            ("mmio_write", u.mmio_writes),
        ] {
            o.sample(
                "warmvm_vm_unknown_accesses_total",
                &[("vm", &s.vm.name()), ("kind", &kind)],
                v as f64,
            );
        }
    }

    o.family(
        "warmvm_vcpu_exits_total",
        "counter",
        "VM exits handled by the VMM, by reason (io: port I/O, mmio, other: HLT and system events).",
    );
    for s in &vms {
        for c in &s.vcpus {
            for (reason, v) in [
                ("io", c.io_exits),
                ("mmio", c.mmio_exits),
                ("other", c.other_exits),
            ] {
                o.sample(
                    "warmvm_vcpu_exits_total",
                    &[("vm", &s.vm.name()), ("vcpu", &c.id), ("reason", &reason)],
                    v as f64,
                );
            }
        }
    }
    let per_vcpu = |o: &mut Out, name: &str, help: &str, f: &dyn Fn(&VcpuStats) -> f64| {
        o.family(name, "counter", help);
        for s in &vms {
            for c in &s.vcpus {
                o.sample(name, &[("vm", &s.vm.name()), ("vcpu", &c.id)], f(c));
            }
        }
    };
    per_vcpu(
        &mut o,
        "warmvm_vcpu_kicks_total",
        "Signals sent to kick the vCPU out of KVM_RUN.",
        &|c| c.kicks as f64,
    );
    per_vcpu(
        &mut o,
        "warmvm_vcpu_waits_total",
        "Sleeps of the vCPU in the VMM on the guest's behalf (wait port, HLT).",
        &|c| c.waits as f64,
    );
    per_vcpu(
        &mut o,
        "warmvm_vcpu_wait_seconds_total",
        "Time the vCPU slept in the VMM on the guest's behalf.",
        &|c| c.wait_ms as f64 / 1000.0,
    );

    let guest: Vec<(&VmSample, &GuestFigures)> = vms
        .iter()
        .filter_map(|s| s.guest.as_ref().map(|g| (s, g)))
        .collect();
    let per_guest =
        |o: &mut Out, name: &str, kind: &str, help: &str, f: &dyn Fn(&GuestFigures) -> u64| {
            o.family(name, kind, help);
            for (s, g) in &guest {
                o.sample(name, &[("vm", &s.vm.name())], f(g) as f64);
            }
        };
    per_guest(
        &mut o,
        "warmvm_guest_pages_verified_total",
        "counter",
        "Pages the reference guest has verified.",
        &|g| g.pages_verified,
    );
    per_guest(
        &mut o,
        "warmvm_guest_mismatches_total",
        "counter",
        "Pages the reference guest found changed behind its back (must stay 0).",
        &|g| g.mismatches,
    );
    per_guest(
        &mut o,
        "warmvm_guest_counter",
        "counter",
        "The reference guest's progress counter (stands still while the VM is paused).",
        &|g| g.counter,
    );
    per_guest(
        &mut o,
        "warmvm_guest_passes_min",
        "gauge",
        "Full verification passes completed by the slowest vCPU.",
        &|g| g.min_passes,
    );
    per_guest(
        &mut o,
        "warmvm_guest_register_check_failures_total",
        "counter",
        "Register checks the reference guest failed (must stay 0).",
        &|g| g.register_check_failures,
    );
    per_guest(
        &mut o,
        "warmvm_guest_time_went_backwards_total",
        "counter",
        "Times the reference guest saw its clock go backwards (must stay 0).",
        &|g| g.time_went_backwards,
    );
    o.family(
        "warmvm_guest_max_gap_seconds",
        "gauge",
        "Longest stretch the reference guest went without progress (a guest-visible stall).",
    );
    for (s, g) in &guest {
        o.sample(
            "warmvm_guest_max_gap_seconds",
            &[("vm", &s.vm.name())],
            g.max_gap_ns as f64 / 1e9,
        );
    }
    o.family(
        "warmvm_guest_vcpu_counter",
        "counter",
        "The reference guest's progress counter, per vCPU.",
    );
    for (s, g) in &guest {
        for (i, v) in g.vcpus.iter().enumerate() {
            o.sample(
                "warmvm_guest_vcpu_counter",
                &[("vm", &s.vm.name()), ("vcpu", &i)],
                v.counter as f64,
            );
        }
    }
    o.family(
        "warmvm_guest_vcpu_pages_verified_total",
        "counter",
        "Pages the reference guest has verified, per vCPU.",
    );
    for (s, g) in &guest {
        for (i, v) in g.vcpus.iter().enumerate() {
            o.sample(
                "warmvm_guest_vcpu_pages_verified_total",
                &[("vm", &s.vm.name()), ("vcpu", &i)],
                v.pages_verified as f64,
            );
        }
    }
    o.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_a_series() {
        // A new Lifecycle variant makes this match fail to compile: add it to STATES.
        let all = |l: &Lifecycle| match l {
            Lifecycle::Created
            | Lifecycle::Running
            | Lifecycle::Paused
            | Lifecycle::PoweredOff { .. }
            | Lifecycle::Crashed { .. }
            | Lifecycle::Stopped
            | Lifecycle::HandedOver => l.name(),
        };
        for l in [
            Lifecycle::Created,
            Lifecycle::Running,
            Lifecycle::Paused,
            Lifecycle::PoweredOff { exit_status: 0 },
            Lifecycle::Crashed {
                reason: String::new(),
            },
            Lifecycle::Stopped,
            Lifecycle::HandedOver,
        ] {
            assert!(STATES.contains(&all(&l)), "{l:?}");
        }
    }

    #[test]
    fn labels_are_escaped() {
        let mut s = String::new();
        LabelEscaper(&mut s).write_str("a\"b\\c\nd").unwrap();
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn process_figures_are_read() {
        let p = ProcessFigures::read();
        assert!(p.resident_bytes > 0);
        assert!(p.open_fds >= 3);
        assert!(p.threads >= 1);
    }

    #[test]
    fn samples_have_the_text_format() {
        let mut o = Out {
            text: String::new(),
        };
        o.family("x_total", "counter", "Help.");
        o.sample("x_total", &[("vm", &"a"), ("vcpu", &0)], 3.0);
        o.sample("x_total", &[], 0.5);
        assert_eq!(
            o.text,
            "# HELP x_total Help.\n# TYPE x_total counter\nx_total{vm=\"a\",vcpu=\"0\"} 3\nx_total 0.5\n"
        );
    }
}
