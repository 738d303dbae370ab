//! The daemon's and its VMs' figures in the Prometheus text format (0.0.4), encoded by the
//! `prometheus` crate from a registry filled per scrape.
//!
//! Cheap by design, since aging detection polls it: the Host lock is held only to clone the
//! list of VMs; every figure is then an atomic load, one fstat per RAM region, or a
//! sequence-locked read of the reference guest's status area; the daemon's own figures come
//! from three small /proc reads.

use std::sync::Arc;

use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use warmvm_vmm::status::GuestFigures;
use warmvm_vmm::{Lifecycle, VcpuStats, Vm};

use crate::state::ApiState;

/// Every state a VM can be in; the state gauge has one series per state.
const STATES: [&str; 8] = [
    "created",
    "running",
    "paused",
    "powered-off",
    "crashed",
    "stopped",
    "handed-over",
    "in-doubt",
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

/// A metric's type, as far as the exposition needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

/// One label set and its value.
#[derive(Debug)]
struct Sample {
    labels: Vec<(&'static str, String)>,
    value: Value,
}

#[derive(Clone, Copy, Debug)]
enum Value {
    Int(i64),
    Float(f64),
}

/// One metric family: its name, help, type and samples (all with the same label names).
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
}

/// One scrape's figures, read before any is encoded.
#[derive(Debug, Default)]
struct Scrape {
    families: Vec<Family>,
}

impl Scrape {
    fn family(&mut self, name: &'static str, kind: Kind, help: &'static str) -> &mut Family {
        self.families.push(Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        });
        self.families.last_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Family {
    fn int(&mut self, labels: &[(&'static str, &dyn std::fmt::Display)], v: u64) -> &mut Self {
        self.push(labels, Value::Int(i64::try_from(v).unwrap_or(i64::MAX)))
    }

    fn float(&mut self, labels: &[(&'static str, &dyn std::fmt::Display)], v: f64) -> &mut Self {
        self.push(labels, Value::Float(v))
    }

    fn push(
        &mut self,
        labels: &[(&'static str, &dyn std::fmt::Display)],
        value: Value,
    ) -> &mut Self {
        self.samples.push(Sample {
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        });
        self
    }

    /// Register this family, with its samples, in `registry`.
    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        let names: Vec<&str> = self
            .samples
            .first()
            .map(|s| s.labels.iter().map(|(k, _)| *k).collect())
            .unwrap_or_default();
        let opts = || Opts::new(self.name, self.help);
        // A float family is encoded as such even where a sample happens to be whole.
        let float = self
            .samples
            .iter()
            .any(|s| matches!(s.value, Value::Float(_)));
        let as_f64 = |v: Value| match v {
            Value::Int(i) => i as f64,
            Value::Float(f) => f,
        };
        let as_i64 = |v: Value| match v {
            Value::Int(i) => i,
            Value::Float(f) => f as i64,
        };
        macro_rules! fill {
            ($ty:ty, |$m:ident, $v:ident| $set:expr) => {{
                let vec = <$ty>::new(opts(), &names)?;
                registry.register(Box::new(vec.clone()))?;
                for s in &self.samples {
                    let refs: Vec<&str> = s.labels.iter().map(|(_, v)| v.as_str()).collect();
                    let $m = vec.get_metric_with_label_values(&refs)?;
                    let $v = s.value;
                    $set;
                }
            }};
        }
        match (self.kind, float) {
            (Kind::Gauge, false) => fill!(IntGaugeVec, |m, v| m.set(as_i64(v))),
            (Kind::Gauge, true) => fill!(GaugeVec, |m, v| m.set(as_f64(v))),
            (Kind::Counter, false) => {
                fill!(IntCounterVec, |m, v| m.inc_by(as_i64(v).max(0) as u64))
            }
            (Kind::Counter, true) => fill!(CounterVec, |m, v| m.inc_by(as_f64(v).max(0.0))),
        }
        Ok(())
    }
}

/// Render every metric (OpenMetrics text, which Prometheus scrapes natively).
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
    let mut o = Scrape::default();
    use Kind::{Counter, Gauge};

    o.family(
        "warmvm_daemon_info",
        Gauge,
        "The daemon's version (always 1).",
    )
    .int(&[("version", &env!("CARGO_PKG_VERSION"))], 1);
    o.family(
        "warmvm_daemon_uptime_seconds",
        Gauge,
        "Seconds since this daemon process started serving.",
    )
    .float(&[], state.uptime().as_secs_f64());
    o.family(
        "warmvm_daemon_resident_memory_bytes",
        Gauge,
        "Resident memory of the daemon process (includes guest RAM it has touched).",
    )
    .int(&[], process.resident_bytes);
    o.family(
        "warmvm_daemon_open_fds",
        Gauge,
        "Open file descriptors of the daemon.",
    )
    .int(&[], process.open_fds);
    o.family(
        "warmvm_daemon_threads",
        Gauge,
        "Threads of the daemon (vCPUs included).",
    )
    .int(&[], process.threads);
    let (refused, closed_unread) = state.refused_connections();
    o.family(
        "warmvm_api_refused_connections_total",
        Counter,
        "Connections answered 503 because their listener's budget was used up.",
    )
    .int(&[], refused);
    o.family(
        "warmvm_api_refused_unread_total",
        Counter,
        "Of the refused connections, those closed without reading their request (the overflow thread was full).",
    )
    .int(&[], closed_unread);
    o.family("warmvm_vms", Gauge, "VMs the daemon holds, in any state.")
        .int(&[], vms.len() as u64);

    let f = o.family(
        "warmvm_vm_state",
        Gauge,
        "1 for the state the VM is in, 0 for the others.",
    );
    for s in &vms {
        for st in STATES {
            f.int(
                &[("vm", &s.vm.name()), ("state", &st)],
                u64::from(s.state.name() == st),
            );
        }
    }
    type PerVm = (&'static str, &'static str, fn(&VmSample) -> Value);
    let per_vm: [PerVm; 4] = [
        ("warmvm_vm_memory_bytes", "Guest RAM size.", |s| {
            Value::Int((s.vm.config.memory_mib << 20) as i64)
        }),
        (
            "warmvm_vm_resident_memory_bytes",
            "Guest RAM actually backed by host memory.",
            |s| Value::Int(s.resident_bytes as i64),
        ),
        ("warmvm_vm_vcpus", "vCPUs of the VM.", |s| {
            Value::Int(i64::from(s.vm.config.vcpus))
        }),
        (
            "warmvm_vm_uptime_seconds",
            "Seconds since the VM was created.",
            |s| Value::Float(s.uptime_secs),
        ),
    ];
    for (name, help, value) in per_vm {
        let f = o.family(name, Gauge, help);
        for s in &vms {
            f.push(&[("vm", &s.vm.name())], value(s));
        }
    }
    let consoles: Vec<_> = vms
        .iter()
        .map(|s| (s.vm.name(), s.vm.shared().devices.console_stats()))
        .collect();
    let f = o.family(
        "warmvm_vm_console_written_bytes_total",
        Counter,
        "Console output written to the VM's log.",
    );
    for (name, c) in &consoles {
        f.int(&[("vm", name)], c.written_bytes);
    }
    let f = o.family(
        "warmvm_vm_console_dropped_bytes_total",
        Counter,
        "Console output dropped, by reason (write_error: the log could not be written, e.g. a full disk; rate_limit: the guest printed faster than the limit).",
    );
    for (name, c) in &consoles {
        f.int(
            &[("vm", name), ("reason", &"write_error")],
            c.dropped_write_error_bytes,
        );
        f.int(
            &[("vm", name), ("reason", &"rate_limit")],
            c.dropped_rate_limit_bytes,
        );
    }
    let f = o.family(
        "warmvm_vm_console_write_errors_total",
        Counter,
        "Failed writes of console output to the VM's log (e.g. a full disk).",
    );
    for (name, c) in &consoles {
        f.int(&[("vm", name)], c.write_errors);
    }
    let f = o.family(
        "warmvm_vm_console_rotations_total",
        Counter,
        "Times the VM's console log reached its cap and was rotated to <log>.1.",
    );
    for (name, c) in &consoles {
        f.int(&[("vm", name)], c.rotations);
    }
    let f = o.family(
        "warmvm_vm_unknown_accesses_total",
        Counter,
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
            f.int(&[("vm", &s.vm.name()), ("kind", &kind)], v);
        }
    }

    let counters: Vec<_> = vms
        .iter()
        .map(|s| {
            (
                s.vm.name().to_string(),
                s.vm.shared().devices.virtio_counters(),
            )
        })
        .collect();
    let f = o.family(
        "warmvm_virtio_device_failures_total",
        Counter,
        "Times a guest broke the virtio protocol and its device was marked DEVICE_NEEDS_RESET.",
    );
    for (vm, devices) in &counters {
        for (device, failures, _) in devices {
            f.int(&[("vm", vm), ("device", device)], *failures);
        }
    }
    let f = o.family(
        "warmvm_virtio_requests_total",
        Counter,
        "virtio requests completed (block requests, frames received and sent).",
    );
    for (vm, devices) in &counters {
        for (device, _, requests) in devices {
            f.int(&[("vm", vm), ("device", device)], *requests);
        }
    }

    let f = o.family(
        "warmvm_vcpu_exits_total",
        Counter,
        "VM exits handled by the VMM, by reason (io: port I/O, mmio, other: HLT and system events).",
    );
    for s in &vms {
        for c in &s.vcpus {
            for (reason, v) in [
                ("io", c.io_exits),
                ("mmio", c.mmio_exits),
                ("other", c.other_exits),
            ] {
                f.int(
                    &[("vm", &s.vm.name()), ("vcpu", &c.id), ("reason", &reason)],
                    v,
                );
            }
        }
    }
    type PerVcpu = (&'static str, &'static str, fn(&VcpuStats) -> Value);
    let per_vcpu: [PerVcpu; 3] = [
        (
            "warmvm_vcpu_kicks_total",
            "Signals sent to kick the vCPU out of KVM_RUN.",
            |c| Value::Int(c.kicks as i64),
        ),
        (
            "warmvm_vcpu_waits_total",
            "Sleeps of the vCPU in the VMM on the guest's behalf (wait port, HLT).",
            |c| Value::Int(c.waits as i64),
        ),
        (
            "warmvm_vcpu_wait_seconds_total",
            "Time the vCPU slept in the VMM on the guest's behalf.",
            |c| Value::Float(c.wait_ms as f64 / 1000.0),
        ),
    ];
    for (name, help, value) in per_vcpu {
        let f = o.family(name, Counter, help);
        for s in &vms {
            for c in &s.vcpus {
                f.push(&[("vm", &s.vm.name()), ("vcpu", &c.id)], value(c));
            }
        }
    }

    let guest: Vec<(&VmSample, &GuestFigures)> = vms
        .iter()
        .filter_map(|s| s.guest.as_ref().map(|g| (s, g)))
        .collect();
    // The guest's progress counter is a gauge, `warmvm_guest_progress` (it was
    // `warmvm_guest_counter`, a name promtool refuses: it names a type): the VMM reads it from
    // the guest, which may start it again, so it is not a counter the VMM keeps.
    type PerGuest = (&'static str, Kind, &'static str, fn(&GuestFigures) -> Value);
    let per_guest: [PerGuest; 7] = [
        (
            "warmvm_guest_pages_verified_total",
            Counter,
            "Pages the reference guest has verified.",
            |g| Value::Int(g.pages_verified as i64),
        ),
        (
            "warmvm_guest_mismatches_total",
            Counter,
            "Pages the reference guest found changed behind its back (must stay 0).",
            |g| Value::Int(g.mismatches as i64),
        ),
        (
            "warmvm_guest_progress",
            Gauge,
            "The reference guest's progress counter (stands still while the VM is paused).",
            |g| Value::Int(g.counter as i64),
        ),
        (
            "warmvm_guest_passes_min",
            Gauge,
            "Full verification passes completed by the slowest vCPU.",
            |g| Value::Int(g.min_passes as i64),
        ),
        (
            "warmvm_guest_register_check_failures_total",
            Counter,
            "Register checks the reference guest failed (must stay 0).",
            |g| Value::Int(g.register_check_failures as i64),
        ),
        (
            "warmvm_guest_time_went_backwards_total",
            Counter,
            "Times the reference guest saw its clock go backwards (must stay 0).",
            |g| Value::Int(g.time_went_backwards as i64),
        ),
        (
            "warmvm_guest_max_gap_seconds",
            Gauge,
            "Longest stretch the reference guest went without progress (a guest-visible stall).",
            |g| Value::Float(g.max_gap_ns as f64 / 1e9),
        ),
    ];
    for (name, kind, help, value) in per_guest {
        let f = o.family(name, kind, help);
        for (s, g) in &guest {
            f.push(&[("vm", &s.vm.name())], value(g));
        }
    }
    let f = o.family(
        "warmvm_guest_vcpu_progress",
        Gauge,
        "The reference guest's progress counter, per vCPU.",
    );
    for (s, g) in &guest {
        for (i, v) in g.vcpus.iter().enumerate() {
            f.int(&[("vm", &s.vm.name()), ("vcpu", &i)], v.counter);
        }
    }
    let f = o.family(
        "warmvm_guest_vcpu_pages_verified_total",
        Counter,
        "Pages the reference guest has verified, per vCPU.",
    );
    for (s, g) in &guest {
        for (i, v) in g.vcpus.iter().enumerate() {
            f.int(&[("vm", &s.vm.name()), ("vcpu", &i)], v.pages_verified);
        }
    }
    if let Some(m) = state.aging() {
        aging(&mut o, m);
    }
    if let Some(f) = state.fleet() {
        let f = f.status();
        o.family(
            "warmvm_fleet_connected",
            Gauge,
            "1 while the daemon reaches etcd and holds its host record (--fleet-etcd).",
        )
        .int(&[("host", &f.host_name)], u64::from(f.connected));
    }
    encode(o)
}

/// The aging monitor's latest assessment, its decisions, and the reboots it knows of.
fn aging(o: &mut Scrape, m: &crate::aging::Monitor) {
    use crate::aging::Assessment;
    use Kind::{Counter, Gauge};
    let report = m.report();
    type PerMetric = (&'static str, &'static str, fn(&Assessment) -> Option<f64>);
    let per_metric: [PerMetric; 7] = [
        (
            "warmvm_aging_value",
            "The latest sample of a resource the aging monitor watches.",
            |a| Some(a.value),
        ),
        (
            "warmvm_aging_baseline",
            "The resource's mean over the first samples after the last (re)start.",
            |a| a.baseline,
        ),
        (
            "warmvm_aging_limit",
            "What the resource runs out against (budget, rlimit, cgroup, objective).",
            |a| a.limit,
        ),
        (
            "warmvm_aging_slope_per_second",
            "Sen's slope of the resource over the trend window.",
            |a| a.slope_per_sec,
        ),
        (
            "warmvm_aging_trend_p_value",
            "Two-sided p-value of the Mann-Kendall test (Hamed-Rao corrected).",
            |a| a.trend_p,
        ),
        (
            "warmvm_aging_exhaustion_seconds",
            "Seconds until the limit at the low end of the slope's interval (absent: never).",
            |a| a.exhaustion_secs_conservative,
        ),
        (
            "warmvm_aging_cusum",
            "Upper CUSUM against the baseline, in baseline standard deviations.",
            |a| a.cusum,
        ),
    ];
    for (name, help, value) in per_metric {
        let f = o.family(name, Gauge, help);
        for a in &report.metrics {
            if let Some(v) = value(a).filter(|v| v.is_finite()) {
                f.float(&[("metric", &a.metric)], v);
            }
        }
    }
    o.family(
        "warmvm_aging_hold",
        Gauge,
        "1 while rejuvenation is on hold.",
    )
    .int(&[], u64::from(report.hold));
    let f = o.family(
        "warmvm_aging_decisions_total",
        Counter,
        "Decisions of the rejuvenation policy in this process: action (reboot, alert, skip, failed) and why.",
    );
    for ((action, reason), n) in m.decisions() {
        f.int(&[("action", &action), ("reason", &reason)], n);
    }
    let mut by_reason = std::collections::BTreeMap::<String, u64>::new();
    for r in &report.reboots {
        let kind = match &r.reason {
            crate::aging::RebootReason::Aging { .. } => "aging",
            crate::aging::RebootReason::Manual => "manual",
            crate::aging::RebootReason::Panic => "panic",
            crate::aging::RebootReason::Schedule => "schedule",
        };
        *by_reason.entry(kind.to_string()).or_default() += 1;
    }
    let f = o.family(
        "warmvm_reboots_recorded",
        Gauge,
        "Warm reboots in the reboot history handed from daemon to daemon, by reason.",
    );
    for (reason, n) in by_reason {
        f.int(&[("reason", &reason)], n);
    }
}

/// The text of one scrape.
fn encode(scrape: Scrape) -> String {
    let registry = Registry::new();
    for f in &scrape.families {
        // Only a bug (a bad name, a family registered twice) can fail here.
        if let Err(e) = f.register(&registry) {
            tracing::error!(metric = f.name, error = %e, "cannot encode a metric");
        }
    }
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot encode the metrics");
            String::new()
        })
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
            | Lifecycle::HandedOver
            | Lifecycle::InDoubt => l.name(),
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
            Lifecycle::InDoubt,
        ] {
            assert!(STATES.contains(&all(&l)), "{l:?}");
        }
    }

    #[test]
    fn labels_are_escaped() {
        let mut o = Scrape::default();
        o.family("x", Kind::Gauge, "Help.")
            .int(&[("vm", &"a\"b\\c\nd")], 1);
        let text = encode(o);
        assert!(text.contains(r#"x{vm="a\"b\\c\nd"} 1"#), "{text}");
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
        let mut o = Scrape::default();
        o.family("x_total", Kind::Counter, "Help.")
            .int(&[("vm", &"a"), ("vcpu", &0)], 3)
            .int(&[("vm", &"b"), ("vcpu", &1)], 4);
        o.family("g", Kind::Gauge, "Gauge help.").float(&[], 0.5);
        assert_eq!(
            encode(o),
            "# HELP g Gauge help.\n# TYPE g gauge\ng 0.5\n\
             # HELP x_total Help.\n# TYPE x_total counter\nx_total{vcpu=\"0\",vm=\"a\"} 3\nx_total{vcpu=\"1\",vm=\"b\"} 4\n"
        );
    }
}
