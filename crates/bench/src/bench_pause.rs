//! The guest-visible pause of a reboot, measured from outside and the same way for any VMM:
//! the reference guest (`heartbeat_us=N`) writes `HEARTBEAT_PORT` at a steady interval, the
//! host's KVM traces every such port exit (`kvm:kvm_pio` in a tracefs instance of our own,
//! clock `mono`), and the pause is the longest gap between two beats in a window around the
//! reboot. An equal window just before it, without a reboot, gives the noise floor.
//! Console output is no clock (a VMM may buffer it); the KVM trace is the kernel's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_vmm::{Lifecycle, VmReport};

use crate::bench_daemon::BenchDaemon;
use crate::cli::RebootMode;

/// Beat interval the bench asks the guest for, µs.
pub const HEARTBEAT_US: u64 = 100;

/// The beating guest's command line, the same under every VMM: it verifies its RAM non-stop
/// and never rewrites it (`refill_every=0`), so that a precopy migration (QEMU's save to a
/// file) converges instead of chasing a guest that dirties all its RAM every few passes.
pub fn guest_cmdline() -> String {
    format!("quiet interval_ms=0 refill_every=0 heartbeat_us={HEARTBEAT_US}")
}
/// Slack before the reboot request and after its end, in each window.
pub const MARGIN: Duration = Duration::from_millis(50);
/// How long to go on tracing after a reboot's end: the window's margin, and time for the
/// guest's next beats to close its last gap even on a loaded host.
pub const AFTER: Duration = Duration::from_millis(350);

const TRACEFS: &str = "/sys/kernel/tracing";

/// CLOCK_MONOTONIC now, in seconds: the clock of the trace (`trace_clock` = mono).
pub fn mono_now() -> f64 {
    warmvm_vmm::monotonic_ns() as f64 / 1e9
}

/// A tracefs instance recording the heartbeat port's writes; removed when dropped.
pub struct PioTrace {
    dir: PathBuf,
}

impl PioTrace {
    /// Start recording. Fails (with the reason) where tracefs or the KVM events are missing.
    pub fn start() -> Result<Self, String> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let root = Path::new(TRACEFS);
        if !root.join("instances").is_dir() {
            // Mounted nowhere yet (a fresh boot): mount it where the kernel documents it.
            let _ = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", TRACEFS])
                .status();
        }
        if !root.join("events/kvm/kvm_pio").is_dir() {
            return Err(format!(
                "no {TRACEFS}/events/kvm/kvm_pio (tracefs not mounted, not root, or no KVM)"
            ));
        }
        // A name of our own: other benches and people may trace at the same time.
        let name = format!(
            "warmvm-pause-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = root.join("instances").join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let t = Self { dir };
        let filter = format!(
            "port == {:#x} && rw == 1 && val == {:#x}",
            warmvm_abi::HEARTBEAT_PORT,
            warmvm_abi::HEARTBEAT_VALUE
        );
        t.write("trace_clock", "mono")?;
        t.write("buffer_size_kb", "32768")?;
        t.write("events/kvm/kvm_pio/filter", &filter)?;
        t.write("events/kvm/kvm_pio/enable", "1")?;
        Ok(t)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value)
            .map_err(|e| format!("{}/{file}: {e}", self.dir.display()))
    }

    /// Stop recording and return the beats, in time order. Every guest beating on this host
    /// is in it (other people's too): callers pick theirs by thread.
    pub fn finish(self) -> Result<Vec<Beat>, String> {
        self.write("events/kvm/kvm_pio/enable", "0")?;
        let text = std::fs::read_to_string(self.dir.join("trace"))
            .map_err(|e| format!("{}/trace: {e}", self.dir.display()))?;
        let mut beats: Vec<Beat> = text.lines().filter_map(Beat::parse).collect();
        beats.sort_by(|a, b| a.t.total_cmp(&b.t));
        Ok(beats)
    }
}

impl Drop for PioTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/kvm/kvm_pio/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One heartbeat in the trace: when, and which vCPU thread wrote it.
#[derive(Clone, Debug, PartialEq)]
pub struct Beat {
    /// CLOCK_MONOTONIC seconds.
    pub t: f64,
    /// The vCPU thread's id.
    pub tid: u32,
    /// The vCPU thread's name as the kernel keeps it (15 bytes at most): warmvm names it
    /// after its VM (`NAME-vcpuN`), QEMU `CPU N/KVM`.
    pub comm: String,
}

impl Beat {
    /// One `kvm_pio` line: `comm-tid [cpu] flags 123.456789: kvm_pio: ...` (the comm may
    /// hold spaces and dashes: the tid is after its last dash).
    fn parse(line: &str) -> Option<Beat> {
        if line.starts_with('#') || !line.contains("kvm_pio:") {
            return None;
        }
        let head = &line[..line.find(": kvm_pio:")?];
        let t = head.rsplit(' ').next()?.parse().ok()?;
        let task = head[..head.find(" [")?].trim();
        let (comm, tid) = task.rsplit_once('-')?;
        Some(Beat {
            t,
            tid: tid.parse().ok()?,
            comm: comm.to_string(),
        })
    }
}

/// The times of the beats that `mine` picks, in order.
pub fn times(beats: &[Beat], mine: impl Fn(&Beat) -> bool) -> Vec<f64> {
    beats.iter().filter(|b| mine(b)).map(|b| b.t).collect()
}

/// The longest gap that begins in [from, to): a window owns the gaps whose first beat falls
/// in it, however long they last, so a pause still going on at its end counts in full and a
/// gap is never counted by two windows. None when the window's last gap is still open (no
/// beat after it in the whole trace) or no beat falls in it.
#[cfg(test)]
fn longest_gap(beats: &[f64], from: f64, to: f64) -> Option<f64> {
    longest_gap_span(beats, from, to).map(|(a, b)| b - a)
}

/// The longest gap as `longest_gap` finds it: the beats that begin and end it.
pub fn longest_gap_span(beats: &[f64], from: f64, to: f64) -> Option<(f64, f64)> {
    let first = beats.partition_point(|&t| t < from);
    let past = beats.partition_point(|&t| t < to);
    if first >= past || past >= beats.len() {
        return None;
    }
    // Gaps beginning at beats[first..past], each closed by the next beat.
    beats[first..=past]
        .windows(2)
        .map(|w| (w[0], w[1]))
        .reduce(|a, b| if b.1 - b.0 > a.1 - a.0 { b } else { a })
}

/// One reboot's windows, CLOCK_MONOTONIC seconds.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// The equal window just before, without a reboot.
    pub noise: (f64, f64),
    pub reboot: (f64, f64),
}

impl Window {
    /// Windows around a reboot that ran from `start` to `end`. The noise window is as long
    /// as the reboot's and ends `MARGIN` before it begins, so no beat and no gap is in both;
    /// it starts no earlier than `not_before` (the trace's start or the previous reboot's
    /// end): the first reboot of a long mode gets a shorter one, and the JSON says how long
    /// each was.
    pub fn around(start: f64, end: f64, not_before: f64) -> Self {
        let from = start - MARGIN.as_secs_f64();
        let to = end + MARGIN.as_secs_f64();
        let noise_to = from - MARGIN.as_secs_f64();
        Window {
            noise: (
                (noise_to - (to - from)).max(not_before).min(noise_to),
                noise_to,
            ),
            reboot: (from, to),
        }
    }
}

/// Pauses (ms) across reboots and in the noise windows, from one trace, for the VMs rebooted
/// together (`per_vm`: each VM's beat times): each VM's own pause (its longest gap in the
/// window), and host-wide, from the first VM's pause beginning to the last one's end, i.e.
/// first guest stopped to last guest running again on the guests' own clock of beats. (No
/// host-wide noise: without a reboot the VMs' longest gaps fall at unrelated times.)
pub fn pauses(per_vm: &[Vec<f64>], windows: &[Window]) -> Value {
    let per = |w: (f64, f64)| -> Vec<Option<(f64, f64)>> {
        per_vm
            .iter()
            .map(|beats| longest_gap_span(beats, w.0, w.1))
            .collect()
    };
    let vm_ms = |spans: &[Option<(f64, f64)>]| -> Vec<Option<f64>> {
        spans
            .iter()
            .map(|s| s.map(|(a, b)| (b - a) * 1e3))
            .collect()
    };
    // Host-wide only when every VM's pause was seen.
    let host_ms = |spans: &[Option<(f64, f64)>]| -> Option<f64> {
        let all: Option<Vec<(f64, f64)>> = spans.iter().copied().collect();
        let all = all.filter(|a| !a.is_empty())?;
        let first = all.iter().map(|s| s.0).reduce(f64::min)?;
        let last = all.iter().map(|s| s.1).reduce(f64::max)?;
        Some((last - first) * 1e3)
    };
    let mut across = Vec::new();
    let mut noise = Vec::new();
    let mut host = Vec::new();
    for w in windows {
        let r = per(w.reboot);
        let n = per(w.noise);
        across.extend(vm_ms(&r));
        noise.extend(vm_ms(&n));
        host.push(host_ms(&r));
    }
    json!({
        "source": "kvm_pio trace",
        "vms": per_vm.len(),
        "pause_ms": stats(&across),
        "noise_ms": stats(&noise),
        "host_pause_ms": stats(&host),
        "window_ms": windows.iter().map(|w| (w.reboot.1 - w.reboot.0) * 1e3).collect::<Vec<_>>(),
        "noise_window_ms": windows.iter().map(|w| (w.noise.1 - w.noise.0) * 1e3).collect::<Vec<_>>(),
        "beats": per_vm.iter().map(Vec::len).collect::<Vec<_>>(),
    })
}

/// Median (the upper one of an even count), maximum and every value.
fn stats(v: &[Option<f64>]) -> Value {
    let mut s: Vec<f64> = v.iter().flatten().copied().collect();
    s.sort_by(f64::total_cmp);
    json!({ "p50": s.get(s.len() / 2), "max": s.last(), "all": v })
}

/// The name of the `i`th VM of a pause cell: unique on this host (other people's guests
/// beat into the same trace) and short enough that the kernel's 15-byte thread name, after
/// warmvm's `NAME-vcpuN`, still tells the VMs apart.
fn beat_vm_name(i: u32) -> String {
    format!("b{}-{i}", std::process::id())
}

/// warmvm's side: `vms` VMs of `mib` MiB with beating guests in one daemon, `runs` reboots in
/// `mode`, the pause of each VM and host-wide from the trace (or, without tracefs, each
/// guest's own longest stall since it booted, which the API cannot reset: an upper bound).
pub fn warmvm_pause(
    exe: &Path,
    root: &Path,
    mode: RebootMode,
    vms: u32,
    mib: u64,
    runs: u32,
) -> Value {
    let run = || -> Result<Value, String> {
        let dir = root.join(format!("pause-{}-{vms}x{mib}", mode.name()));
        let d = BenchDaemon::start(exe, &dir)?;
        let cmdline = guest_cmdline();
        for i in 0..vms {
            let vm = serde_json::from_value(
                json!({ "name": beat_vm_name(i), "memory_mib": mib, "cmdline": cmdline }),
            )
            .map_err(|e| e.to_string())?;
            d.client.create(&vm).map_err(|e| e.to_string())?;
        }
        wait_verified(&d, vms)?;
        let trace = PioTrace::start();
        let mut not_before = mono_now();
        let mut windows = Vec::new();
        let mut guest_stalls = Vec::new();
        let mut reports = Vec::new();
        for i in 0..runs {
            // The noise window is as long as the reboot's and ends a margin before it: wait
            // that long (at least 0.3 s) and two margins before the request, so that it
            // holds nothing but the running guests.
            let settle = windows
                .last()
                .map_or(1.0, |w: &Window| (w.reboot.1 - w.reboot.0).max(0.3));
            sleep_unless_interrupted(Duration::from_secs_f64(settle + 2.0 * MARGIN.as_secs_f64()))?;
            let start = mono_now();
            let answer = d
                .client
                .typed()
                .reboot_with(crate::cli::api_mode(mode), None, Some(10))
                .map_err(|e| format!("reboot {}: {e}", i + 1))?;
            // A warm reboot's report: its stamps, to lay each guest's pause over.
            reports.push(Some(answer.into_value()));
            // The answer can come before the guests run again (a saved reboot's restored
            // VMs): the window ends once every guest is seen verifying in the new daemon.
            wait_progress(&d)?;
            let end = mono_now();
            // Long enough for the guests' first beats after the window to be traced.
            sleep_unless_interrupted(AFTER)?;
            guest_stalls.push(guest_stalls_ms(&d)?);
            windows.push(Window::around(start, end, not_before));
            not_before = end + MARGIN.as_secs_f64();
        }
        check_guests(&d, vms)?;
        Ok(match trace {
            Ok(t) => {
                let beats = t.finish()?;
                let per_vm: Vec<Vec<f64>> = (0..vms)
                    .map(|i| {
                        let prefix = format!("{}-", beat_vm_name(i));
                        times(&beats, |b| b.comm.starts_with(&prefix))
                    })
                    .collect();
                let mut v = pauses(&per_vm, &windows);
                v["guest_stall_ms"] = json!(guest_stalls);
                if mode == RebootMode::Warm {
                    let names: Vec<String> = (0..vms).map(beat_vm_name).collect();
                    let (measured, not) = crate::bench_segments::collect(&per_vm, &names, &reports);
                    v["segments"] = crate::bench_segments::summary(&measured, &not);
                }
                v
            }
            Err(why) => json!({
                "source": "the guests' own longest stall since boot (no KVM trace): an upper bound",
                "trace_unavailable": why,
                "pause_ms": { "all": guest_stalls },
            }),
        })
    };
    run().unwrap_or_else(|e| json!({ "error": e }))
}

/// Sleep, in short steps that notice SIGINT/SIGTERM.
pub fn sleep_unless_interrupted(d: Duration) -> Result<(), String> {
    let until = Instant::now() + d;
    loop {
        crate::interrupt::check()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

fn wait_verified(d: &BenchDaemon, vms: u32) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        crate::interrupt::check()?;
        let all = vm_reports(d)?;
        if all.len() == vms as usize
            && all
                .iter()
                .all(|v| v.guest.as_ref().is_some_and(|g| g.min_passes >= 1))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the guests did not verify their RAM within 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until every guest's verified-page counter moves: they all run.
fn wait_progress(d: &BenchDaemon) -> Result<(), String> {
    let verified = |d: &BenchDaemon| -> Result<Vec<u64>, String> {
        Ok(vm_reports(d)?
            .iter()
            .map(|v| v.guest.as_ref().map_or(0, |g| g.pages_verified))
            .collect())
    };
    let first = verified(d)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        crate::interrupt::check()?;
        let now = verified(d)?;
        if now.len() == first.len() && now.iter().zip(&first).all(|(n, f)| n > f) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the guests did not all run again within 60 s of the reboot".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every VM's report, as `GET /v1/vms` answers.
fn vm_reports(d: &BenchDaemon) -> Result<Vec<VmReport>, String> {
    let list = d.client.typed().list().map_err(|e| e.to_string())?;
    Ok(list.into_value().vms)
}

fn guest_stalls_ms(d: &BenchDaemon) -> Result<Vec<Option<f64>>, String> {
    Ok(vm_reports(d)?
        .iter()
        .map(|v| v.guest.as_ref().map(|g| g.max_gap_ns as f64 / 1e6))
        .collect())
}

fn check_guests(d: &BenchDaemon, vms: u32) -> Result<(), String> {
    let all = vm_reports(d)?;
    if all.len() != vms as usize {
        return Err(format!("{} of {vms} VMs left after the reboots", all.len()));
    }
    for v in &all {
        let clean = v.guest.as_ref().is_some_and(|g| g.mismatches == 0);
        if v.lifecycle != Lifecycle::Running || !clean {
            return Err(format!(
                "a guest is not running clean: {}",
                serde_json::to_string(v).unwrap_or_default()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_parse_and_gaps_span_the_window_edges() {
        let line = " b77-0-vcpu0-1234   [001] ..... 10161.013182: kvm_pio: pio_write at 0x520 size 1 count 1 val 0xb7 ";
        let b = Beat::parse(line).unwrap();
        assert_eq!(
            (b.t, b.tid, b.comm.as_str()),
            (10161.013182, 1234, "b77-0-vcpu0")
        );
        let qemu = "       CPU 0/KVM-88 [000] d.... 5.5: kvm_pio: pio_write at 0x520 size 1 count 1 val 0xb7";
        let b = Beat::parse(qemu).unwrap();
        assert_eq!((b.t, b.tid, b.comm.as_str()), (5.5, 88, "CPU 0/KVM"));
        assert_eq!(Beat::parse("# tracer: nop"), None);
        let beats = [1.0, 1.1, 1.2, 1.9, 2.0];
        // The gap 1.2 -> 1.9 begins before the window: it is the earlier window's.
        let g = longest_gap(&beats, 1.5, 1.95).unwrap();
        assert!((g - 0.1).abs() < 1e-9, "{g}");
        // It begins in this one and runs past its end: it counts here, in full.
        let g = longest_gap(&beats, 1.0, 1.25).unwrap();
        assert!((g - 0.7).abs() < 1e-9, "{g}");
        let g = longest_gap(&beats, 1.0, 1.15).unwrap();
        assert!((g - 0.1).abs() < 1e-9, "{g}");
        // No beat after the window's last: the pause may still be going on.
        assert_eq!(longest_gap(&beats, 1.5, 2.5), None);
        // No beat in the window at all: nothing begins there.
        assert_eq!(longest_gap(&beats, 1.3, 1.8), None);
        assert_eq!(longest_gap(&[], 0.0, 1.0), None);
        let w = Window::around(10.0, 10.1, 0.0);
        assert!(
            w.noise.1 < w.reboot.0,
            "the windows share no boundary: {w:?}"
        );
        assert!(((w.noise.1 - w.noise.0) - (w.reboot.1 - w.reboot.0)).abs() < 1e-9);
        // Never before the trace began.
        let w = Window::around(10.0, 12.0, 9.0);
        assert_eq!(w.noise.0, 9.0);
    }

    #[test]
    fn a_gap_across_the_noise_and_reboot_windows_counts_in_one_of_them() {
        // Beats every 10 ms with one 300 ms stall that begins in the noise window and ends
        // in the reboot's, once with the windows' own layout and once with adjacent ones.
        let beats: Vec<f64> = (0..=600)
            .map(|i| i as f64 * 0.01)
            .filter(|&t| !(2.905..3.195).contains(&t))
            .collect();
        let w = Window::around(3.1, 3.4, 0.0);
        let adjacent = Window {
            noise: (2.5, 3.0),
            reboot: (3.0, 3.5),
        };
        for w in [w, adjacent] {
            let noise = longest_gap(&beats, w.noise.0, w.noise.1);
            let reboot = longest_gap(&beats, w.reboot.0, w.reboot.1);
            let stall = |g: Option<f64>| g.is_some_and(|g| g > 0.25);
            assert!(
                !(stall(noise) && stall(reboot)),
                "{w:?}: noise {noise:?}, reboot {reboot:?}"
            );
            assert!(
                stall(noise) || stall(reboot),
                "{w:?}: the stall counted nowhere"
            );
        }
    }

    #[test]
    fn host_wide_pause_runs_from_the_first_vm_stopped_to_the_last_running() {
        let step = |from: f64, to: f64| -> Vec<f64> {
            (0..=((to - from) / 0.01).round() as usize)
                .map(|i| from + i as f64 * 0.01)
                .collect()
        };
        // VM a stalls 1.00 -> 1.20, VM b 1.10 -> 1.50; beats every 10 ms otherwise.
        let a = [step(0.0, 1.0), step(1.2, 3.0)].concat();
        let b = [step(0.0, 1.1), step(1.5, 3.0)].concat();
        let w = Window {
            noise: (0.2, 0.8),
            reboot: (0.9, 1.6),
        };
        let v = pauses(&[a, b], &[w]);
        let ms = |x: &Value| x.as_f64().unwrap();
        assert!((ms(&v["pause_ms"]["max"]) - 400.0).abs() < 1e-6, "{v:#}");
        assert!((ms(&v["pause_ms"]["all"][0]) - 200.0).abs() < 1e-6, "{v:#}");
        assert!(
            (ms(&v["host_pause_ms"]["p50"]) - 500.0).abs() < 1e-6,
            "{v:#}"
        );
        assert!(ms(&v["noise_ms"]["max"]) < 10.5, "{v:#}");
        // A VM whose gap never closes: no host-wide figure.
        let v = pauses(&[step(0.0, 3.0), step(0.0, 1.0)], &[w]);
        assert!(v["host_pause_ms"]["p50"].is_null(), "{v:#}");
    }
}
