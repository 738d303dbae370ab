//! QEMU 10's CheckPoint-and-Restart as a peer in `warmvm bench reboot`: the same reference
//! guest (PVH entry under `-M microvm`, RAM in a shared memfd backend) taken over by a new
//! QEMU process with cpr-transfer (the warm case), and saved to a file and loaded by a new
//! QEMU (the saved case). Measured per reboot:
//!
//! - on warmvm's measure: the old QEMU's QMP `STOP` event to the new one's `RESUME` (both
//!   stamped by QEMU with the host's wall clock, like warmvm's first-stop → last-running);
//! - on QEMU's own: the old QEMU's `query-migrate` downtime and total time;
//! - the guest-visible pause: the longest gap between the guest's heartbeats in the host's
//!   KVM trace (`bench_pause`), against an equal window without a reboot.
//!
//! Any step that fails ends the peer with its reason in the output, never the bench.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bench_pause::{self, PioTrace, Window};

pub const QEMU: &str = "qemu-system-x86_64";

/// A QMP connection: commands and their answers; events are kept with their timestamps.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, within: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        q.read()?; // the greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP: QEMU closed the monitor".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP: {e}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP {cmd}: {e}"))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else {
                return Err(format!("QMP {cmd}: {}", v["error"]["desc"]));
            }
        }
    }

    /// Wait for `event`; its timestamp in seconds (host wall clock, QEMU's stamp).
    fn wait_event(&mut self, event: &str) -> Result<f64, String> {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == event) {
                let e = self.events.remove(i);
                let ts = &e["timestamp"];
                return Ok(ts["seconds"].as_f64().unwrap_or(0.0)
                    + ts["microseconds"].as_f64().unwrap_or(0.0) * 1e-6);
            }
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Poll `query-migrate` until it completes; its answer.
    fn wait_migrated(&mut self) -> Result<Value, String> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let r = self.execute("query-migrate", json!({}))?;
            match r["status"].as_str() {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(format!("migration {}: {}", r["status"], r["error-desc"]))
                }
                _ if Instant::now() > deadline => return Err("migration took over 300 s".into()),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// One QEMU process of the peer.
struct Vm {
    child: Child,
    qmp_path: PathBuf,
    console: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    dir: PathBuf,
    kernel: PathBuf,
    mib: u64,
    cmdline: String,
    seq: u32,
}

impl Setup {
    /// Start a QEMU with the guest; `incoming` are the extra `-incoming` arguments.
    fn spawn(&mut self, incoming: &[String]) -> Result<Vm, String> {
        self.seq += 1;
        let qmp_path = self.dir.join(format!("qmp{}.sock", self.seq));
        let console = self.dir.join(format!("console{}.log", self.seq));
        let mut cmd = Command::new(QEMU);
        // The default CPU model: `-cpu host` fails on this project's nested KVM.
        cmd.args([
            "-M",
            "microvm,memory-backend=ram0,aux-ram-share=on",
            "-accel",
            "kvm",
            "-m",
        ])
        .arg(format!("{}M", self.mib))
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=ram0,size={}M,share=on",
            self.mib
        ))
        .arg("-kernel")
        .arg(&self.kernel)
        .arg("-append")
        .arg(&self.cmdline)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        for i in incoming {
            cmd.arg("-incoming").arg(i);
        }
        let log = std::fs::File::create(self.dir.join(format!("qemu{}.log", self.seq)))
            .map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
        Ok(Vm {
            child,
            qmp_path,
            console,
        })
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{}.sock", self.seq + 1))
    }
}

/// The guest's console says it verified (or failed); wait for its fill line.
fn wait_filled(vm: &mut Vm, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(&vm.console).unwrap_or_default();
        if text.contains("warmvm-guest: filled") {
            // One verification pass after the fill, at least.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(());
        }
        if let Ok(Some(status)) = vm.child.try_wait() {
            return Err(format!("QEMU exited ({status}) before the guest was up"));
        }
        if Instant::now() > deadline {
            return Err(format!("the guest was not up under QEMU within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_console(vm: &Vm) -> Result<(), String> {
    let text = std::fs::read_to_string(&vm.console).unwrap_or_default();
    match text
        .lines()
        .find(|l| l.contains("MISMATCH") || l.contains("REGISTER CHECK FAILED"))
    {
        Some(l) => Err(format!("the guest found corruption: {l}")),
        None => Ok(()),
    }
}

/// QEMU's version line, or why it cannot be used.
pub fn version() -> Result<String, String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .map_err(|e| format!("{QEMU} not found ({e}): install QEMU 10 (see docs/platform.md)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").to_string();
    let major = line
        .split_whitespace()
        .find_map(|w| w.split('.').next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if major < 10 {
        return Err(format!(
            "{QEMU} is too old for cpr-transfer (need 10): {line}"
        ));
    }
    Ok(line)
}

/// The host's TSC frequency for the guest's clock under QEMU (its default CPU model does not
/// tell it): /proc/cpuinfo's MHz is close enough for a heartbeat's interval.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// The peer for one VM of `mib` MiB: `runs` cpr-transfers in a chain of QEMU processes, then
/// `runs` saves to a file, each loaded by a new QEMU.
pub fn run(root: &Path, mib: u64, runs: u32) -> Value {
    let result = (|| -> Result<Value, String> {
        let version = version()?;
        let dir = root.join(format!("qemu-{mib}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let kernel = dir.join("warmvm-guest.elf");
        std::fs::write(&kernel, warmvm_guest_image::REFERENCE_GUEST_ELF)
            .map_err(|e| e.to_string())?;
        let mut cmdline = bench_pause::guest_cmdline();
        if let Some(khz) = host_tsc_khz() {
            cmdline += &format!(" tsc_khz={khz}");
        }
        let mut s = Setup {
            dir: dir.clone(),
            kernel,
            mib,
            cmdline,
            seq: 0,
        };
        let mut vm = s.spawn(&[])?;
        // The PVH stub runs in KVM's instruction emulator here: seconds, not milliseconds.
        wait_filled(&mut vm, Duration::from_secs(180))?;
        let qmp = Qmp::connect(&vm.qmp_path, Duration::from_secs(10))?;
        let trace = PioTrace::start();
        let mut not_before = bench_pause::mono_now();
        let (vm, qmp, cpr, cpr_windows) =
            chain(&mut s, runs, vm, qmp, &mut not_before, cpr_transfer)?;
        check_console(&vm)?;
        let (vm, _qmp, file, file_windows) =
            chain(&mut s, runs, vm, qmp, &mut not_before, migrate_file)?;
        check_console(&vm)?;
        let (cpr_pause, file_pause) = match trace {
            Ok(t) => {
                let beats = t.finish()?;
                (
                    bench_pause::pauses(&beats, &cpr_windows),
                    bench_pause::pauses(&beats, &file_windows),
                )
            }
            Err(why) => {
                let v = json!({ "trace_unavailable": why });
                (v.clone(), v)
            }
        };
        drop(vm);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(json!({
            "qemu": version,
            "vms": 1,
            "memory_mib": mib,
            "cpr_transfer": summary(&cpr, cpr_pause),
            "migrate_file": summary(&file, file_pause),
        }))
    })();
    result.unwrap_or_else(|e| json!({ "memory_mib": mib, "skipped": e }))
}

/// Wait as long as the last reboot's window (at least 0.3 s; 1 s before the first), so that
/// the noise window before the next is as long and holds no reboot.
fn settle(windows: &[Window]) -> Duration {
    let last = windows.last().map_or(0.0, |w| w.reboot.1 - w.reboot.0);
    Duration::from_secs_f64(last.max(0.3) + bench_pause::MARGIN.as_secs_f64())
}

type Step = (Vm, Qmp, Value, Window);

/// `runs` reboots by `step` in a row, each taking over from the QEMU the one before
/// started, with a settling pause before each and [`bench_pause::AFTER`] after: the last
/// QEMU, its monitor, and each reboot's row and window.
fn chain(
    s: &mut Setup,
    runs: u32,
    mut vm: Vm,
    mut qmp: Qmp,
    not_before: &mut f64,
    step: fn(&mut Setup, Qmp, Vm, f64) -> Result<Step, String>,
) -> Result<(Vm, Qmp, Vec<Value>, Vec<Window>), String> {
    let mut rows = Vec::new();
    let mut windows = Vec::new();
    for _ in 0..runs {
        std::thread::sleep(settle(&windows));
        let (next, q, r, w) = step(s, qmp, vm, *not_before)?;
        std::thread::sleep(bench_pause::AFTER);
        *not_before = w.reboot.1;
        vm = next;
        qmp = q;
        rows.push(r);
        windows.push(w);
    }
    Ok((vm, qmp, rows, windows))
}

/// One cpr-transfer: a new QEMU waits on the cpr and main channels, the old one migrates
/// over both and leaves the guest's memfd to it.
fn cpr_transfer(s: &mut Setup, mut old: Qmp, old_vm: Vm, not_before: f64) -> Result<Step, String> {
    let cpr_sock = s.sock("cpr");
    let main_sock = s.sock("main");
    let cpr_addr = json!({ "transport": "socket", "type": "unix", "path": cpr_sock });
    let main_addr = json!({ "transport": "socket", "type": "unix", "path": main_sock });
    let new = s.spawn(&[
        json!({ "channel-type": "cpr", "addr": cpr_addr }).to_string(),
        format!("unix:{}", main_sock.display()),
    ])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cpr_sock.exists() {
        if Instant::now() > deadline {
            return Err("the new QEMU did not listen for the cpr channel".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    old.execute("migrate-set-parameters", json!({ "mode": "cpr-transfer" }))?;
    let start = bench_pause::mono_now();
    old.execute(
        "migrate",
        json!({ "channels": [
            { "channel-type": "main", "addr": main_addr },
            { "channel-type": "cpr", "addr": cpr_addr },
        ]}),
    )?;
    // The new QEMU opens its monitor only once it has the cpr state: connect as soon as it
    // does, to see its RESUME.
    let mut q = Qmp::connect(&new.qmp_path, Duration::from_secs(60))?;
    let stats = old.wait_migrated()?;
    let stopped = old.wait_event("STOP")?;
    let resumed = q.wait_event("RESUME").ok();
    let end = bench_pause::mono_now();
    let _ = old.execute("quit", json!({}));
    drop(old_vm);
    Ok((
        new,
        q,
        row(stopped, resumed, &stats),
        Window::around(start, end, not_before),
    ))
}

/// One save to a file and load by a new QEMU (`-incoming defer`, `migrate-incoming`).
fn migrate_file(s: &mut Setup, mut old: Qmp, old_vm: Vm, not_before: f64) -> Result<Step, String> {
    let path = s.dir.join("state.bin");
    let _ = std::fs::remove_file(&path);
    let uri = format!("file:{}", path.display());
    let start = bench_pause::mono_now();
    old.execute("migrate-set-parameters", json!({ "mode": "normal" }))?;
    old.execute("migrate", json!({ "uri": uri }))?;
    let stats = old.wait_migrated()?;
    let stopped = old.wait_event("STOP")?;
    let _ = old.execute("quit", json!({}));
    drop(old_vm);
    let new = s.spawn(&["defer".to_string()])?;
    let mut q = Qmp::connect(&new.qmp_path, Duration::from_secs(30))?;
    q.execute("migrate-incoming", json!({ "uri": uri }))?;
    let resumed = q.wait_event("RESUME").ok();
    let end = bench_pause::mono_now();
    let _ = std::fs::remove_file(&path);
    Ok((
        new,
        q,
        row(stopped, resumed, &stats),
        Window::around(start, end, not_before),
    ))
}

fn row(stopped: f64, resumed: Option<f64>, stats: &Value) -> Value {
    json!({
        "stop_to_resume_ms": resumed.map(|r| (r - stopped) * 1e3),
        "qemu_downtime_ms": stats["downtime"],
        "qemu_total_time_ms": stats["total-time"],
    })
}

fn summary(rows: &[Value], pause: Value) -> Value {
    let p50 = |k: &str| {
        let mut v: Vec<f64> = rows.iter().filter_map(|r| r[k].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    json!({
        "runs": rows.len(),
        "stop_to_resume_ms_p50": p50("stop_to_resume_ms"),
        "qemu_downtime_ms_p50": p50("qemu_downtime_ms"),
        "qemu_total_time_ms_p50": p50("qemu_total_time_ms"),
        "all": rows,
        "guest_pause": pause,
    })
}
