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

    /// Stop recording and return the beats' times (CLOCK_MONOTONIC seconds), sorted.
    pub fn finish(self) -> Result<Vec<f64>, String> {
        self.write("events/kvm/kvm_pio/enable", "0")?;
        let text = std::fs::read_to_string(self.dir.join("trace"))
            .map_err(|e| format!("{}/trace: {e}", self.dir.display()))?;
        let mut beats: Vec<f64> = text.lines().filter_map(beat_time).collect();
        beats.sort_by(f64::total_cmp);
        Ok(beats)
    }
}

impl Drop for PioTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/kvm/kvm_pio/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The timestamp of one `kvm_pio` line: `comm-pid [cpu] flags 123.456789: kvm_pio: ...`.
fn beat_time(line: &str) -> Option<f64> {
    if line.starts_with('#') || !line.contains("kvm_pio:") {
        return None;
    }
    let head = &line[..line.find(": kvm_pio:")?];
    head.rsplit(' ').next()?.parse().ok()
}

/// The longest gap between two beats within [from, to], the gaps across its edges included
/// in full; None when no beat follows the window (the last gap is still open) or there are
/// fewer than two beats.
pub fn longest_gap(beats: &[f64], from: f64, to: f64) -> Option<f64> {
    let start = beats.partition_point(|&t| t < from);
    let end = beats.partition_point(|&t| t <= to);
    // The beat just before the window and just after it close the gaps at its edges: a
    // pause that began before the window still counts in full.
    // Without a beat after the window the last gap is still open: no figure.
    if end >= beats.len() {
        return None;
    }
    let lo = start.saturating_sub(1);
    let hi = end + 1;
    let inside = &beats[lo..hi];
    if inside.len() < 2 {
        return None;
    }
    inside.windows(2).map(|w| w[1] - w[0]).reduce(f64::max)
}

/// One reboot's windows, CLOCK_MONOTONIC seconds.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// The equal window just before, without a reboot.
    pub noise: (f64, f64),
    pub reboot: (f64, f64),
}

impl Window {
    /// Windows around a reboot that ran from `start` to `end`; the noise window ends where
    /// the reboot's begins and is as long, but starts no earlier than `not_before` (the
    /// trace's start or the previous reboot's end): the first reboot of a long mode gets a
    /// shorter one, and the JSON says how long each was.
    pub fn around(start: f64, end: f64, not_before: f64) -> Self {
        let from = start - MARGIN.as_secs_f64();
        let to = end + MARGIN.as_secs_f64();
        Window {
            noise: ((from - (to - from)).max(not_before).min(from), from),
            reboot: (from, to),
        }
    }
}

/// Pauses (ms) across reboots and in the noise windows, from one trace.
pub fn pauses(beats: &[f64], windows: &[Window]) -> Value {
    let ms = |w: (f64, f64)| longest_gap(beats, w.0, w.1).map(|g| g * 1e3);
    let across: Vec<Option<f64>> = windows.iter().map(|w| ms(w.reboot)).collect();
    let noise: Vec<Option<f64>> = windows.iter().map(|w| ms(w.noise)).collect();
    let p50 = |v: &[Option<f64>]| {
        let mut s: Vec<f64> = v.iter().flatten().copied().collect();
        s.sort_by(f64::total_cmp);
        (!s.is_empty()).then(|| s[s.len() / 2])
    };
    json!({
        "source": "kvm_pio trace",
        "pause_ms": { "p50": p50(&across), "max": across.iter().flatten().copied().reduce(f64::max), "all": across },
        "noise_ms": { "p50": p50(&noise), "max": noise.iter().flatten().copied().reduce(f64::max), "all": noise },
        "window_ms": windows.iter().map(|w| (w.reboot.1 - w.reboot.0) * 1e3).collect::<Vec<_>>(),
        "noise_window_ms": windows.iter().map(|w| (w.noise.1 - w.noise.0) * 1e3).collect::<Vec<_>>(),
        "beats": beats.len(),
    })
}

/// warmvm's side: one VM of `mib` MiB with a beating guest, `runs` reboots in `mode`, the
/// pause of each from the trace (or, without tracefs, the guest's own longest stall since it
/// booted, which the API cannot reset: an upper bound).
pub fn warmvm_pause(exe: &Path, root: &Path, mode: RebootMode, mib: u64, runs: u32) -> Value {
    let run = || -> Result<Value, String> {
        let dir = root.join(format!("pause-{}", mode.name()));
        let d = BenchDaemon::start(exe, &dir)?;
        let cmdline = guest_cmdline();
        let vm = serde_json::from_value(
            json!({ "name": "beat", "memory_mib": mib, "cmdline": cmdline }),
        )
        .map_err(|e| e.to_string())?;
        d.client.create(&vm).map_err(|e| e.to_string())?;
        wait_verified(&d)?;
        let trace = PioTrace::start();
        let mut not_before = mono_now();
        let mut windows = Vec::new();
        let mut guest_stalls = Vec::new();
        for i in 0..runs {
            // The noise window is as long as the reboot's: wait that long (at least 0.3 s)
            // before the request, so that it holds nothing but the running guest.
            let settle = windows
                .last()
                .map_or(1.0, |w: &Window| (w.reboot.1 - w.reboot.0).max(0.3));
            std::thread::sleep(Duration::from_secs_f64(settle + MARGIN.as_secs_f64()));
            let start = mono_now();
            d.client
                .reboot_with(mode.name(), None, Some(10))
                .map_err(|e| format!("reboot {}: {e}", i + 1))?;
            // The answer can come before the guest runs again (a saved reboot's restored
            // VM): the window ends once the guest is seen verifying in the new daemon.
            wait_progress(&d)?;
            let end = mono_now();
            // Long enough for the guest's first beats after the window to be traced.
            std::thread::sleep(AFTER);
            guest_stalls.push(guest_stall_ms(&d)?);
            windows.push(Window::around(start, end, not_before));
            not_before = end + MARGIN.as_secs_f64();
        }
        check_guest(&d)?;
        Ok(match trace {
            Ok(t) => {
                let mut v = pauses(&t.finish()?, &windows);
                v["guest_stall_ms"] = json!(guest_stalls);
                v
            }
            Err(why) => json!({
                "source": "the guest's own longest stall since boot (no KVM trace): an upper bound",
                "trace_unavailable": why,
                "pause_ms": { "all": guest_stalls },
            }),
        })
    };
    run().unwrap_or_else(|e| json!({ "error": e }))
}

fn wait_verified(d: &BenchDaemon) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = d.client.list().map_err(|e| e.to_string())?;
        let g = &list["vms"][0]["guest"];
        if g["min_passes"].as_u64().unwrap_or(0) >= 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the guest did not verify its RAM within 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the guest's verified-page counter moves: it runs.
fn wait_progress(d: &BenchDaemon) -> Result<(), String> {
    let verified = |d: &BenchDaemon| -> Result<u64, String> {
        let list = d.client.list().map_err(|e| e.to_string())?;
        Ok(list["vms"][0]["guest"]["pages_verified"]
            .as_u64()
            .unwrap_or(0))
    };
    let first = verified(d)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while verified(d)? <= first {
        if Instant::now() > deadline {
            return Err("the guest did not run again within 60 s of the reboot".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn guest_stall_ms(d: &BenchDaemon) -> Result<Option<f64>, String> {
    let list = d.client.list().map_err(|e| e.to_string())?;
    Ok(list["vms"][0]["guest"]["max_gap_ns"]
        .as_f64()
        .map(|ns| ns / 1e6))
}

fn check_guest(d: &BenchDaemon) -> Result<(), String> {
    let list = d.client.list().map_err(|e| e.to_string())?;
    let v = &list["vms"][0];
    if v["state"] != "running" || v["guest"]["mismatches"].as_u64().unwrap_or(1) != 0 {
        return Err(format!("the guest is not running clean: {v}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_parse_and_gaps_span_the_window_edges() {
        let line = " warmvm-1234   [001] ..... 10161.013182: kvm_pio: pio_write at 0x520 size 1 count 1 val 0xb7 ";
        assert_eq!(beat_time(line), Some(10161.013182));
        assert_eq!(beat_time("# tracer: nop"), None);
        let beats = [1.0, 1.1, 1.2, 1.9, 2.0];
        // The gap 1.2 -> 1.9 straddles the window's start: it counts in full.
        let g = longest_gap(&beats, 1.5, 1.95).unwrap();
        assert!((g - 0.7).abs() < 1e-9, "{g}");
        let g = longest_gap(&beats, 1.0, 1.15).unwrap();
        assert!((g - 0.1).abs() < 1e-9, "{g}");
        // No beat after the window: the pause may still be going on.
        assert_eq!(longest_gap(&beats, 1.5, 2.5), None);
        assert_eq!(longest_gap(&[], 0.0, 1.0), None);
        let w = Window::around(10.0, 10.1, 0.0);
        assert!((w.noise.1 - w.reboot.0).abs() < 1e-12);
        assert!(((w.noise.1 - w.noise.0) - (w.reboot.1 - w.reboot.0)).abs() < 1e-9);
        // Never before the trace began.
        let w = Window::around(10.0, 12.0, 9.0);
        assert_eq!(w.noise.0, 9.0);
    }
}
