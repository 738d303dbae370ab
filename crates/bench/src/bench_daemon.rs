//! The daemon's path of `warmvm bench warm-reboot`: what an operator's `warmvm reboot --mode
//! warm` does. A `warmvm daemon` is started in a temporary directory, given the cell's VMs
//! through the API, and sent `PUT /v1/reboot` again and again; each figure is taken from
//! the report the daemon answers (and the request's round trip as the client sees it).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_api::types::Mode;
use warmvm_api::Client;
use warmvm_testkit::{Daemon, Ready, Start, StartError};
use warmvm_vmm::handover::RebootReport;

use crate::progress::Progress;
use warmvm_cli_common::stats::p50_p99_max;

/// One cell's outcome: the figures as JSON, or why it failed.
pub struct DaemonCell {
    pub reboots: u64,
    pub host_blackout_ms: Value,
    pub vm_blackout_ms: Value,
    pub phase_p50_ms: Value,
    pub request_ms: Value,
    pub error: Option<String>,
}

/// A daemon of the bench's own (the test kit's, in a process group of its own): SIGTERMed
/// when dropped, whichever process it is by then, so that it powers its VMs off; then
/// whatever is left of it is killed and its directory removed.
pub(crate) struct BenchDaemon {
    pub(crate) client: Client,
    daemon: Daemon,
}

impl BenchDaemon {
    pub(crate) fn start(exe: &Path, dir: &Path) -> Result<Self, String> {
        Self::start_with(exe, dir, &[])
    }

    /// Start one with extra `daemon` arguments (e.g. `--config FILE`).
    pub(crate) fn start_with(
        exe: &Path,
        dir: &Path,
        extra: &[&std::ffi::OsStr],
    ) -> Result<Self, String> {
        Self::start_from(Self::builder(exe, dir, extra))
    }

    /// Start one inside network namespace `netns`.
    pub(crate) fn start_in_netns(
        exe: &Path,
        dir: &Path,
        netns: &str,
        extra: &[&std::ffi::OsStr],
    ) -> Result<Self, String> {
        Self::start_from(Self::builder(exe, dir, extra).netns(netns))
    }

    fn builder(exe: &Path, dir: &Path, extra: &[&std::ffi::OsStr]) -> Start {
        Daemon::builder(dir)
            .binary(exe)
            .log_level("warn")
            .stop_grace_secs(2)
            .args(extra)
            .ready(Ready::Answers, Duration::from_secs(30))
            .own_process_group()
    }

    fn start_from(start: Start) -> Result<Self, String> {
        let daemon = start.try_start().map_err(|e| match e {
            // One line: the reason and the daemon's last word.
            StartError::Exited { status, log } => format!(
                "the daemon exited at start-up ({status}): {}",
                log.lines().last().unwrap_or("")
            ),
            StartError::NotReady { why, log, .. } => format!(
                "the daemon did not start: {why}: {}",
                log.lines().last().unwrap_or("")
            ),
            other => other.to_string(),
        })?;
        Ok(Self {
            client: daemon.client(),
            daemon,
        })
    }

    pub(crate) fn log_tail(&self) -> String {
        self.daemon.log().lines().last().unwrap_or("").to_string()
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        // After a warm reboot the daemon is another process: ask the API for its pid.
        if let Ok(pid) = self.client.typed().status().map(|s| s.pid) {
            if pid > 0 {
                // SAFETY: kill has no memory effects; the pid is the daemon the bench started
                // (or its successor), read from its own API.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.client.socket()).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The kit's daemon, dropped next, kills whatever is left and removes the directory.
    }
}

/// Run one cell: `vms` VMs of `mib` MiB, `reboots` warm reboots through the API.
#[allow(clippy::too_many_arguments)]
pub fn run_cell(
    exe: &Path,
    vms: u32,
    mib: u64,
    reboots: u32,
    interval: Duration,
    cmdline: &str,
    progress: &mut Progress,
) -> DaemonCell {
    let mut reports = Vec::new();
    let mut request_us = Vec::new();
    let error = (|| -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!(
            "warmvm-bench-daemon-{}-{vms}-{mib}",
            std::process::id()
        ));
        let d = BenchDaemon::start(exe, &dir)?;
        for i in 0..vms {
            let vm = serde_json::from_value(json!({
                "name": format!("bench-{i}"), "memory_mib": mib, "cmdline": cmdline,
            }))
            .map_err(|e| e.to_string())?;
            d.client.create(&vm).map_err(|e| e.to_string())?;
        }
        // Every guest has started its work before the first reboot.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let list = d.client.typed().list().map_err(|e| e.to_string())?;
            if list
                .vms
                .iter()
                .all(|v| v.guest.as_ref().is_some_and(|g| g.counter > 0))
            {
                break;
            }
            if Instant::now() > deadline {
                return Err("the guests did not start their work within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for r in 0..reboots {
            progress.step(&format!(
                "daemon: {vms} VMs x {mib} MiB, reboot {}/{reboots}",
                r + 1
            ));
            let t = Instant::now();
            let report = d
                .client
                .typed()
                .reboot_with(Mode::Warm, None, None)
                .map_err(|e| format!("reboot {}: {e}", r + 1))?
                .into_value();
            request_us.push(t.elapsed().as_micros() as u64);
            // The VMs moved, but such a report holds no figure to count.
            if !report.is_measured() {
                return Err(format!(
                    "reboot {}: the blackout was not measured: {}",
                    r + 1,
                    report.errors.join("; ")
                ));
            }
            reports.push(report);
            progress.done();
            std::thread::sleep(interval);
        }
        Ok(())
    })()
    .err();
    summarize(&reports, request_us, error)
}

fn ms3(t: (f64, Option<f64>, f64), names: [&str; 3]) -> Value {
    json!({ names[0]: t.0, names[1]: t.1, names[2]: t.2 })
}

fn summarize(reports: &[RebootReport], request_us: Vec<u64>, error: Option<String>) -> DaemonCell {
    let host = p50_p99_max(reports.iter().map(|r| r.host_blackout_us).collect());
    let vm = p50_p99_max(
        reports
            .iter()
            .flat_map(|r| r.vms.iter().map(|v| v.blackout_us))
            .collect(),
    );
    let phase = |f: fn(&RebootReport) -> u64| p50_p99_max(reports.iter().map(f).collect()).0;
    DaemonCell {
        reboots: reports.len() as u64,
        host_blackout_ms: ms3(host, ["host_p50_ms", "host_p99_ms", "host_max_ms"]),
        vm_blackout_ms: ms3(vm, ["vm_p50_ms", "vm_p99_ms", "vm_max_ms"]),
        phase_p50_ms: json!({
            "stage": phase(|r| r.phases.stage_us),
            "quiesce": phase(|r| r.phases.quiesce_us),
            "capture": phase(|r| r.phases.capture_us),
            "transfer": phase(|r| r.phases.transfer_us),
            "restore": phase(|r| r.phases.restore_us),
            "commit": phase(|r| r.phases.commit_us),
            "resume": phase(|r| r.phases.resume_us),
        }),
        request_ms: ms3(p50_p99_max(request_us), ["p50_ms", "p99_ms", "max_ms"]),
        error,
    }
}

/// The host the figures come from: kernel, CPU model, cores, load average at the start.
pub fn host_facts() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let load: Vec<f64> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu_model": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "load_average": load,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_facts_are_read() {
        let h = super::host_facts();
        assert!(!h["kernel"].as_str().unwrap().is_empty());
        assert!(h["cores"].as_u64().unwrap() >= 1);
        assert_eq!(h["load_average"].as_array().unwrap().len(), 3);
    }
}
