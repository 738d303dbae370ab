//! QEMU 10's CheckPoint-and-Restart as a peer in `warmvm bench reboot`: the same reference
//! guest (PVH entry under `-M microvm`, RAM in a shared memfd backend), one QEMU process per
//! VM as QEMU runs, all of a cell's VMs rebooted together the way an operator restarts QEMU
//! on a host: each taken over by a new QEMU process with cpr-transfer, all in parallel (the
//! warm case); all saved to files in parallel, then all started again from them (the saved
//! case). Measured per reboot, per VM and host-wide:
//!
//! - on warmvm's measure: each old QEMU's QMP `STOP` event to its successor's `RESUME` (both
//!   stamped by QEMU with the host's wall clock), and host-wide from the first `STOP` to the
//!   last `RESUME`, like warmvm's first guest stopped → last one running;
//! - on QEMU's own: each old QEMU's `query-migrate` downtime and total time;
//! - the guest-visible pause: each guest's longest gap between heartbeats in the host's KVM
//!   trace (`bench_pause`; a QEMU's beats are told apart by its vCPU threads' ids), against
//!   an equal window without a reboot, and host-wide from the first to the last guest.
//!
//! Any step that fails ends the peer with its reason in the output, never the bench. Every
//! QEMU process, socket and migration file is removed whatever happens: each process by its
//! guard (`Vm`), and by the SIGINT/SIGTERM handler (`interrupt`) on a signal; the files with
//! the work directory (`WorkDir`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bench_pause::{self, PioTrace, Window};
use crate::interrupt::{self, Registered};

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
                Err(_) => {
                    interrupt::check()?;
                    std::thread::sleep(Duration::from_millis(1))
                }
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
            interrupt::check()?;
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

    /// The vCPU threads' ids: whose heartbeats in the KVM trace are this guest's.
    fn vcpu_tids(&mut self) -> Result<Vec<u32>, String> {
        let cpus = self.execute("query-cpus-fast", json!({}))?;
        Ok(cpus
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| u32::try_from(c["thread-id"].as_u64()?).ok())
            .collect())
    }
}

/// One QEMU process of the peer, in a process group of its own that a SIGINT or SIGTERM
/// kills (`interrupt`); killed and reaped when dropped.
struct Vm {
    child: Child,
    group: Option<Registered>,
    qmp_path: PathBuf,
    console: PathBuf,
}

impl Vm {
    /// Wait for the process to exit (after `quit`; killed after 10 s): its pid is free
    /// for reuse then, so it leaves the signal handler's list.
    fn reap(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.group = None;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peer's work directory (guest image, QMP and migration sockets, state files, logs),
/// removed when dropped: declared before the `Vm`s, so dropped after them.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(path: PathBuf) -> Result<Self, String> {
        // A leftover of a run killed with SIGKILL (no handler runs then) goes first.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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
        // Its own process group: a Ctrl-C on the terminal reaches the bench only, whose
        // handler kills the group (and the bench's guards clean up after it).
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
        let group = Registered::new(child.id());
        Ok(Vm {
            child,
            group,
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
            bench_pause::sleep_unless_interrupted(Duration::from_millis(500))?;
            return Ok(());
        }
        if let Ok(Some(status)) = vm.child.try_wait() {
            return Err(format!("QEMU exited ({status}) before the guest was up"));
        }
        if Instant::now() > deadline {
            return Err(format!("the guest was not up under QEMU within {within:?}"));
        }
        bench_pause::sleep_unless_interrupted(Duration::from_millis(100))?;
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

/// One VM of the peer: its QEMU (replaced at each reboot), its monitor, and the ids of every
/// vCPU thread it has had.
struct Guest {
    setup: Setup,
    vm: Vm,
    qmp: Qmp,
    tids: Vec<u32>,
}

/// The peer for `vms` VMs of `mib` MiB: `runs` cpr-transfers of all of them together, each in
/// a chain of QEMU processes, then `runs` saves of all to files, each followed by starting
/// all from them.
pub fn run(root: &Path, vms: u32, mib: u64, runs: u32) -> Value {
    let result = (|| -> Result<Value, String> {
        let version = version()?;
        let work = WorkDir::create(root.join(format!("qemu-{vms}x{mib}")))?;
        let kernel = work.0.join("warmvm-guest.elf");
        std::fs::write(&kernel, warmvm_guest_image::REFERENCE_GUEST_ELF)
            .map_err(|e| e.to_string())?;
        let mut cmdline = bench_pause::guest_cmdline();
        if let Some(khz) = host_tsc_khz() {
            cmdline += &format!(" tsc_khz={khz}");
        }
        let mut started = Vec::new();
        for i in 0..vms {
            let dir = work.0.join(format!("vm{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let mut setup = Setup {
                dir,
                kernel: kernel.clone(),
                mib,
                cmdline: cmdline.clone(),
                seq: 0,
            };
            let vm = setup.spawn(&[])?;
            started.push((setup, vm));
        }
        let mut guests = Vec::new();
        for (setup, mut vm) in started {
            // The PVH stub runs in KVM's instruction emulator here: seconds, not
            // milliseconds; the VMs boot side by side meanwhile.
            wait_filled(&mut vm, Duration::from_secs(180))?;
            let mut qmp = Qmp::connect(&vm.qmp_path, Duration::from_secs(10))?;
            let tids = qmp.vcpu_tids()?;
            guests.push(Guest {
                setup,
                vm,
                qmp,
                tids,
            });
        }
        let trace = PioTrace::start();
        let mut not_before = bench_pause::mono_now();
        let (cpr, cpr_windows) = repeat(&mut guests, runs, &mut not_before, cpr_together)?;
        check_consoles(&guests)?;
        let (file, file_windows) = repeat(&mut guests, runs, &mut not_before, saved_together)?;
        check_consoles(&guests)?;
        let (cpr_pause, file_pause) = match trace {
            Ok(t) => {
                let beats = t.finish()?;
                let per_vm: Vec<Vec<f64>> = guests
                    .iter()
                    .map(|g| bench_pause::times(&beats, |b| g.tids.contains(&b.tid)))
                    .collect();
                (
                    bench_pause::pauses(&per_vm, &cpr_windows),
                    bench_pause::pauses(&per_vm, &file_windows),
                )
            }
            Err(why) => {
                let v = json!({ "trace_unavailable": why });
                (v.clone(), v)
            }
        };
        drop(guests);
        drop(work);
        Ok(json!({
            "qemu": version,
            "vms": vms,
            "memory_mib": mib,
            "cpr_transfer": summary(&cpr, cpr_pause),
            "migrate_file": summary(&file, file_pause),
        }))
    })();
    result.unwrap_or_else(|e| json!({ "vms": vms, "memory_mib": mib, "skipped": e }))
}

fn check_consoles(guests: &[Guest]) -> Result<(), String> {
    guests.iter().try_for_each(|g| check_console(&g.vm))
}

/// Wait as long as the last reboot's window (at least 0.3 s) and two
/// margins, so that the noise window before the next, which ends a margin before that
/// reboot's window begins, is as long and holds no reboot.
fn settle(windows: &[Window]) -> Duration {
    let last = windows.last().map_or(0.0, |w| w.reboot.1 - w.reboot.0);
    Duration::from_secs_f64(last.max(0.3) + 2.0 * bench_pause::MARGIN.as_secs_f64())
}

/// One reboot of every guest (after the given mono time): its row and window.
type RebootAll = fn(&mut [Guest], f64) -> Result<(Value, Window), String>;

/// `runs` reboots of every guest by `step`, with a settling pause before each and
/// [`bench_pause::AFTER`] after: each reboot's row and window.
fn repeat(
    guests: &mut [Guest],
    runs: u32,
    not_before: &mut f64,
    step: RebootAll,
) -> Result<(Vec<Value>, Vec<Window>), String> {
    let mut rows = Vec::new();
    let mut windows = Vec::new();
    for _ in 0..runs {
        bench_pause::sleep_unless_interrupted(settle(&windows))?;
        let (r, w) = step(guests, *not_before)?;
        bench_pause::sleep_unless_interrupted(bench_pause::AFTER)?;
        *not_before = w.reboot.1;
        rows.push(r);
        windows.push(w);
    }
    Ok((rows, windows))
}

/// One VM's reboot: its QEMU's `STOP` and its successor's `RESUME` (QEMU's wall-clock
/// stamps, s), `query-migrate`'s answer, and when the step began and ended (mono, s).
struct Step {
    stopped: f64,
    resumed: Option<f64>,
    stats: Value,
    start: f64,
    end: f64,
}

/// Run `step` on every guest at once, one thread each.
fn on_all(
    guests: &mut [Guest],
    step: fn(&mut Guest) -> Result<Step, String>,
) -> Result<Vec<Step>, String> {
    let steps: Vec<Result<Step, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = guests
            .iter_mut()
            .map(|g| scope.spawn(move || step(g)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a QEMU step panicked".into()))
            })
            .collect()
    });
    steps.into_iter().collect()
}

/// The warm case for all VMs: every VM's cpr-transfer at once.
fn cpr_together(guests: &mut [Guest], not_before: f64) -> Result<(Value, Window), String> {
    Ok(run_row(&on_all(guests, cpr_transfer)?, not_before))
}

/// The saved case for all VMs as an operator would do it: save every VM to a file (all at
/// once), and only then start every VM from its file (all at once).
fn saved_together(guests: &mut [Guest], not_before: f64) -> Result<(Value, Window), String> {
    let saves = on_all(guests, save_to_file)?;
    let loads = on_all(guests, load_from_file)?;
    // Each VM's step over both phases: its save's STOP and stats, its load's RESUME.
    let steps: Vec<Step> = saves
        .into_iter()
        .zip(loads)
        .map(|(s, l)| Step {
            resumed: l.resumed,
            end: l.end,
            ..s
        })
        .collect();
    Ok(run_row(&steps, not_before))
}

/// One run of all VMs: per VM and host-wide (first `STOP` to last `RESUME`), and the window
/// from the first step's start to the last one's end.
fn run_row(steps: &[Step], not_before: f64) -> (Value, Window) {
    let start = steps
        .iter()
        .map(|s| s.start)
        .reduce(f64::min)
        .unwrap_or(0.0);
    let end = steps
        .iter()
        .map(|s| s.end)
        .reduce(f64::max)
        .unwrap_or(start);
    let first_stop = steps.iter().map(|s| s.stopped).reduce(f64::min);
    let last_resume: Option<Vec<f64>> = steps.iter().map(|s| s.resumed).collect();
    let last_resume = last_resume.and_then(|r| r.into_iter().reduce(f64::max));
    let row = json!({
        "host_stop_to_resume_ms": first_stop.zip(last_resume).map(|(s, r)| (r - s) * 1e3),
        "vms": steps.iter().map(|s| json!({
            "stop_to_resume_ms": s.resumed.map(|r| (r - s.stopped) * 1e3),
            "qemu_downtime_ms": s.stats["downtime"],
            "qemu_total_time_ms": s.stats["total-time"],
        })).collect::<Vec<_>>(),
    });
    (row, Window::around(start, end, not_before))
}

/// One cpr-transfer: a new QEMU waits on the cpr and main channels, the old one migrates
/// over both and leaves the guest's memfd to it.
fn cpr_transfer(g: &mut Guest) -> Result<Step, String> {
    let s = &mut g.setup;
    let cpr_sock = s.sock("cpr");
    let main_sock = s.sock("main");
    let cpr_addr = json!({ "transport": "socket", "type": "unix", "path": cpr_sock });
    let main_addr = json!({ "transport": "socket", "type": "unix", "path": main_sock });
    let new = s.spawn(&[
        json!({ "channel-type": "cpr", "addr": cpr_addr }).to_string(),
        format!("unix:{}", main_sock.display()),
    ])?;
    // Listening, not only bound: the socket's file exists from bind(2) on, and a migrate
    // between bind and listen is refused (seen with 4 QEMUs starting at once).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening(&cpr_sock) {
        interrupt::check()?;
        if Instant::now() > deadline {
            return Err("the new QEMU did not listen for the cpr channel".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let old = &mut g.qmp;
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
    g.tids.extend(q.vcpu_tids()?);
    g.vm.reap();
    let _ = std::fs::remove_file(&cpr_sock);
    let _ = std::fs::remove_file(&main_sock);
    g.qmp = q;
    g.vm = new;
    Ok(Step {
        stopped,
        resumed,
        stats,
        start,
        end,
    })
}

/// Whether a Unix socket at `path` is listening (`/proc/net/unix`: the flag __SO_ACCEPTCON,
/// 0x10000), without connecting to it: a probe's connection would be QEMU's one accept.
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    // The path is the line's last field and may hold spaces.
    let tail = format!(" {}", path.to_string_lossy());
    table.lines().skip(1).any(|l| {
        l.ends_with(&tail)
            && l.split_whitespace()
                .nth(3)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .is_some_and(|flags| flags & 0x10000 != 0)
    })
}

fn state_file(g: &Guest) -> PathBuf {
    g.setup.dir.join("state.bin")
}

/// The first half of a saved reboot: migrate to a file, then quit.
fn save_to_file(g: &mut Guest) -> Result<Step, String> {
    let path = state_file(g);
    let _ = std::fs::remove_file(&path);
    let uri = format!("file:{}", path.display());
    let start = bench_pause::mono_now();
    g.qmp
        .execute("migrate-set-parameters", json!({ "mode": "normal" }))?;
    g.qmp.execute("migrate", json!({ "uri": uri }))?;
    let stats = g.qmp.wait_migrated()?;
    let stopped = g.qmp.wait_event("STOP")?;
    let _ = g.qmp.execute("quit", json!({}));
    g.vm.reap();
    let end = bench_pause::mono_now();
    Ok(Step {
        stopped,
        resumed: None,
        stats,
        start,
        end,
    })
}

/// The second half: a new QEMU (`-incoming defer`) loads the file (`migrate-incoming`).
fn load_from_file(g: &mut Guest) -> Result<Step, String> {
    let path = state_file(g);
    let uri = format!("file:{}", path.display());
    let start = bench_pause::mono_now();
    let new = g.setup.spawn(&["defer".to_string()])?;
    let mut q = Qmp::connect(&new.qmp_path, Duration::from_secs(30))?;
    q.execute("migrate-incoming", json!({ "uri": uri }))?;
    let resumed = q.wait_event("RESUME").ok();
    let end = bench_pause::mono_now();
    let _ = std::fs::remove_file(&path);
    g.tids.extend(q.vcpu_tids()?);
    g.qmp = q;
    g.vm = new;
    // Only its RESUME and end count (`saved_together`): the STOP was the save's.
    Ok(Step {
        stopped: start,
        resumed,
        stats: Value::Null,
        start,
        end,
    })
}

fn summary(runs: &[Value], pause: Value) -> Value {
    let vm_rows: Vec<&Value> = runs
        .iter()
        .flat_map(|r| r["vms"].as_array().into_iter().flatten())
        .collect();
    let sorted = |v: Vec<Option<f64>>| {
        let mut v: Vec<f64> = v.into_iter().flatten().collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let p50 = |k: &str| {
        let v = sorted(vm_rows.iter().map(|r| r[k].as_f64()).collect());
        v.get(v.len() / 2).copied()
    };
    let host = sorted(
        runs.iter()
            .map(|r| r["host_stop_to_resume_ms"].as_f64())
            .collect(),
    );
    let all: Vec<Value> = runs
        .iter()
        .map(|r| json!({ "host_stop_to_resume_ms": r["host_stop_to_resume_ms"], "vms": r["vms"] }))
        .collect();
    json!({
        "runs": runs.len(),
        "stop_to_resume_ms_p50": p50("stop_to_resume_ms"),
        "host_stop_to_resume_ms": { "p50": host.get(host.len() / 2), "max": host.last() },
        "qemu_downtime_ms_p50": p50("qemu_downtime_ms"),
        "qemu_total_time_ms_p50": p50("qemu_total_time_ms"),
        "all": all,
        "guest_pause": pause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_unix_socket_is_told_from_a_bound_one() {
        let dir = std::env::temp_dir().join(format!("warmvm-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        assert!(!listening(&path));
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(listening(&path));
        drop(l);
        // A bound socket that does not listen: a datagram socket.
        let bound = dir.join("b.sock");
        let _ = std::fs::remove_file(&bound);
        let d = std::os::unix::net::UnixDatagram::bind(&bound).unwrap();
        assert!(!listening(&bound));
        drop(d);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
