//! `warmvm bench cache`: a reference guest serving HTTP from its disk through its page
//! cache, loaded from inside a network namespace of the bench's own, across a warm, a
//! saved and a cold reboot of the daemon. It reports what clients see. wrk, as fast as it
//! can without a reboot, gives the maximum requests per second and latency. httperf, at a
//! fixed request rate (`--rate`), drives one run without a reboot and one per reboot mode;
//! for each mode: the client-visible blackout (the longest gap between successful responses
//! around the reboot), failed or reset connections, and throughput in the first 1, 5 and
//! 30 s after the guest answers again relative to the 5 s before the reboot request. The
//! run without a reboot, measured over the same windows, is the noise each figure is to be
//! compared with.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_api::client::DEFAULT_TIMEOUT;
use warmvm_api::types::RebootRequest;
use warmvm_api::{Client, ClientError};
use warmvm_cli_common::bench_args::CacheArgs;
use warmvm_vmm::monotonic_ns;

use crate::bench_cache_load::{httperf, parse_wrk, FixedRate, Run, GUEST_IP, WRK_SCRIPT};
use crate::bench_daemon::BenchDaemon;
use crate::cli::{Failure, EXIT_HOST, EXIT_VM_FAILED};

const HOST_CIDR: &str = "10.78.0.1/24";
const TAP: &str = "wvbench0";
const FILE_BYTES: usize = 64 << 10;
const SEC: u64 = 1_000_000_000;

fn ustar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = warmvm_vmm::testing::ustar_entries(files);
    out.resize(out.len() + 2048, 0);
    out.resize(out.len().next_multiple_of(4096), 0);
    out
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The HTTP guest's site: its archive of `files` files of 64 KiB each and its page cache.
pub(crate) struct Site {
    pub(crate) files: u32,
    pub(crate) cache_mib: u64,
}

/// The bench's network namespace, TAP, daemon and HTTP guest ("web"); all removed when
/// dropped.
pub(crate) struct Setup {
    netns: String,
    dir: PathBuf,
    client: Client,
    daemon: Option<BenchDaemon>,
}

impl Setup {
    /// Start it all, the daemon with `daemon_extra` arguments, and wait until "web" serves.
    pub(crate) fn start(
        exe: &Path,
        site: &Site,
        daemon_extra: &[&std::ffi::OsStr],
    ) -> Result<Self, String> {
        let netns = format!("wvm-bench-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("wvm-bench-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        let mut s = Self {
            netns,
            client: Client::new(&dir.join("api.sock")),
            dir,
            daemon: None,
        };
        for a in [
            &["link", "set", "lo", "up"][..],
            &["tuntap", "add", "dev", TAP, "mode", "tap"],
            &["addr", "add", HOST_CIDR, "dev", TAP],
            &["link", "set", TAP, "up"],
        ] {
            run(Command::new("ip").args(["-n", &s.netns]).args(a))?;
        }
        let files: Vec<(String, Vec<u8>)> = (0..site.files)
            .map(|i| {
                let mut x = u64::from(i) * 0x9e37_79b9 + 1;
                let data = (0..FILE_BYTES)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                (format!("f{i}.bin"), data)
            })
            .collect();
        let image = s.dir.join("site.img");
        std::fs::write(&image, ustar(&files)).map_err(|e| e.to_string())?;
        s.daemon = Some(BenchDaemon::start_in_netns(
            exe,
            &s.dir,
            &s.netns,
            daemon_extra,
        )?);
        let vm = json!({
            "name": "web",
            "memory_mib": 64 + site.cache_mib,
            "cmdline": format!("quiet interval_ms=20 disk_check_ms=0 ip={GUEST_IP}/24 cache_mib={}", site.cache_mib),
            "disks": [{"path": image}],
            "nets": [{"tap": TAP}],
        });
        let r = s
            .client
            .raw("POST", "/v1/vms", Some(vm.to_string().as_bytes()))
            .map_err(|e| e.to_string())?;
        if r.status != 201 {
            return Err(format!(
                "creating the VM: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.stats_once().is_err() {
            if Instant::now() > deadline {
                return Err("the guest never served HTTP".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn netns(&self) -> &str {
        &self.netns
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest's `/stats`, fetched with curl inside the namespace; a guest that a cold
    /// reboot is booting again gets 30 s to answer.
    fn stats(&self) -> Result<Value, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.stats_once() {
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                r => return r,
            }
        }
    }

    fn stats_once(&self) -> Result<Value, String> {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.netns,
            "curl",
            "-sS",
            "--fail",
            "-m",
            "2",
            &format!("http://{GUEST_IP}/stats"),
        ]))?;
        serde_json::from_str(&out).map_err(|e| e.to_string())
    }

    /// One wrk run of `secs`, as fast as the guest answers.
    fn wrk(&self, args: &CacheArgs, secs: u64) -> Result<Run, String> {
        let script = self.dir.join("log.lua");
        std::fs::write(&script, WRK_SCRIPT).map_err(|e| e.to_string())?;
        let log = self.dir.join(format!("responses-{}", monotonic_ns()));
        let started_ns = monotonic_ns();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "wrk", "--latency", "-t1"])
            .arg(format!("-c{}", args.connections))
            .arg(format!("-d{secs}s"))
            .arg("--timeout")
            .arg("5s")
            .arg("-s")
            .arg(&script)
            .arg(format!("http://{GUEST_IP}/"))
            .env("WARMVM_LOG", &log)
            .env("WARMVM_FILES", args.files.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run wrk (apt-get install wrk): {e}"))?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "wrk failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut ok = Vec::new();
        let mut bad = 0u64;
        for entry in std::fs::read_dir(&self.dir)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let prefix = log
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !name.starts_with(&prefix) {
                continue;
            }
            for line in std::fs::read_to_string(entry.path())
                .unwrap_or_default()
                .lines()
            {
                let mut it = line.split(' ');
                let (Some(t), Some(s)) = (it.next(), it.next()) else {
                    continue;
                };
                // LuaJIT prints 64-bit integers with an LL suffix.
                match (t.trim_end_matches("LL").parse::<u64>(), s) {
                    (Ok(t), "200") => ok.push(t),
                    _ => bad += 1,
                }
            }
        }
        ok.sort_unstable();
        let tool = parse_wrk(&text);
        Ok(Run {
            started_ns,
            ended_ns: monotonic_ns(),
            ok,
            failed: tool["socket_errors"].as_u64().unwrap_or(0) + bad,
            tool,
            reboot: None,
        })
    }

    /// A fixed-rate httperf run; with `mode`, that reboot of the daemon `reboot_after`
    /// seconds in.
    fn fixed_rate(&self, args: &CacheArgs, mode: Option<&str>) -> Result<Run, String> {
        let load = FixedRate {
            rate: args.rate,
            sessions: args.sessions,
            files: args.files,
            secs: args.duration_secs,
        };
        httperf(&self.netns, &self.dir, &load, || {
            let Some(mode) = mode else { return Ok(None) };
            std::thread::sleep(Duration::from_secs(args.reboot_after_secs));
            let req = RebootRequest::new(mode.parse().map_err(|e| format!("{e}"))?);
            let t0 = monotonic_ns();
            let report = match self.client.typed().reboot(&req, DEFAULT_TIMEOUT) {
                Ok(r) => r.into_value(),
                Err(e @ ClientError::Api { .. }) => {
                    return Err(format!("the {mode} reboot failed: {e}"))
                }
                Err(e) => return Err(e.to_string()),
            };
            let t1 = monotonic_ns();
            Ok(Some((t0, t1, report)))
        })
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The daemon first (it stops its VMs and their TAP users), then the namespace.
        drop(self.daemon.take());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Responses in [from, to) per second.
fn rate(ok: &[u64], from: u64, to: u64) -> Option<f64> {
    if to <= from {
        return None;
    }
    let n = ok.partition_point(|&t| t < to) - ok.partition_point(|&t| t < from);
    Some(n as f64 / ((to - from) as f64 / 1e9))
}

/// The longest gap between successive responses in [from, to) (edges included), in ms, and
/// when it ended: the first response after it (`to` if none came).
fn longest_gap(ok: &[u64], from: u64, to: u64) -> (f64, u64) {
    let mut last = from;
    let (mut gap, mut end) = (0u64, from);
    for &t in ok.iter().filter(|&&t| t >= from && t < to) {
        if t - last > gap {
            (gap, end) = (t - last, t);
        }
        last = t;
    }
    if to.saturating_sub(last) > gap {
        (gap, end) = (to - last, to);
    }
    (gap as f64 / 1e6, end)
}

/// The end (the first response after it) of the longest gap between responses that
/// overlaps [from, to]; `to` itself if none came after it.
fn gap_across(ok: &[u64], from: u64, to: u64) -> u64 {
    let first = ok.partition_point(|&t| t < from);
    let mut last = if first == 0 { from } else { ok[first - 1] };
    let (mut gap, mut end) = (0u64, to);
    for &t in &ok[first..] {
        if t - last > gap {
            (gap, end) = (t - last, t);
        }
        if t > to {
            break;
        }
        last = t;
    }
    end
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The figures of one fixed-rate run around a reboot at [r0, r1] (offsets from the start
/// of `run`; for the run without a reboot, the same offsets as the reboot run it is the
/// noise of).
fn figures(run: &Run, r0: u64, r1: u64) -> Value {
    let (t0, t1) = (run.started_ns + r0, run.started_ns + r1);
    // The window around the reboot: 1 s before the request to 1 s after the answer.
    let (blackout_ms, _) = longest_gap(
        &run.ok,
        t0.saturating_sub(SEC).max(run.started_ns),
        t1 + SEC,
    );
    // The guest answers again at the end of the gap that spans the reboot request and its
    // answer (the longest gap touching them, if responses came in between).
    let resumed = gap_across(&run.ok, t0, t1);
    let before = rate(&run.ok, t0.saturating_sub(5 * SEC).max(run.started_ns), t0);
    // Measured from the first response after the blackout: a first second measured from the
    // reboot request would count the blackout itself as lost throughput.
    let after = |secs: u64| {
        let to = resumed + secs * SEC;
        (to <= run.ended_ns)
            .then(|| rate(&run.ok, resumed, to))
            .flatten()
            .zip(before)
            .map(|(a, b)| round(a / b))
    };
    json!({
        "client_blackout_ms": round(blackout_ms),
        "resumed_ms_after_request": round(resumed.saturating_sub(t0) as f64 / 1e6),
        "failed_or_reset": run.failed,
        "failed_detail": run.tool,
        "requests_per_sec_before": before.map(round),
        "throughput_after_1s": after(1),
        "throughput_after_5s": after(5),
        "throughput_after_30s": after(30),
    })
}

pub fn cache(args: &CacheArgs) -> Result<ExitCode, Failure> {
    if args.reboot_after_secs + 2 > args.duration_secs {
        return Err(Failure::new(
            crate::cli::EXIT_BAD_INPUT,
            "--reboot-after-secs must leave at least 2 s of the run after the reboot",
        ));
    }
    let exe = crate::cli::warmvm_exe()?;
    let site = Site {
        files: args.files,
        cache_mib: args.cache_mib,
    };
    let setup = Setup::start(&exe, &site, &[]).map_err(|e| Failure::new(EXIT_HOST, e))?;
    let fail = |e: String| Failure::new(EXIT_VM_FAILED, e);
    let misses = |v: &Value| v["misses"].as_u64().unwrap_or(0);
    let cold = setup.stats().map_err(fail)?;
    // Warm the cache: every file, several times over.
    setup.wrk(args, 2).map_err(fail)?;
    let warm = setup.stats().map_err(fail)?;
    let max = setup.wrk(args, args.duration_secs).map_err(fail)?;
    let steady = setup.fixed_rate(args, None).map_err(fail)?;

    let mut modes = Vec::new();
    for mode in &args.modes {
        let name = mode.name();
        // Each mode starts from a warm cache (a cold reboot empties it).
        setup.wrk(args, 2).map_err(fail)?;
        let before = setup.stats().map_err(fail)?;
        let run = match setup.fixed_rate(args, Some(name)) {
            Ok(run) => run,
            // A mode this build cannot perform for this VM is reported, not fatal.
            Err(e) if e.starts_with(&format!("the {name} reboot failed")) => {
                modes.push(json!({"mode": name, "error": e}));
                continue;
            }
            Err(e) => return Err(fail(e)),
        };
        let after = setup.stats().map_err(fail)?;
        let (t0, t1, report) = match &run.reboot {
            Some((t0, t1, report)) => (*t0, *t1, Some(report)),
            None => (0, 0, None),
        };
        let (r0, r1) = (t0 - run.started_ns, t1 - run.started_ns);
        let mut f = figures(&run, r0, r1);
        f["mode"] = json!(name);
        // A saved or cold reboot hands no VM over: its report's blackout is 0, which is no
        // figure, not a zero blackout. Nor is a warm reboot's whose steps are not all known
        // (`errors`).
        f["host_blackout_ms"] = json!(report
            .filter(|r| r.is_measured())
            .map(|r| r.host_blackout_us)
            .filter(|&us| us > 0)
            .map(|us| us as f64 / 1000.0));
        // A cold reboot restarts the guest (its uptime starts again): every miss is new.
        let uptime = |v: &Value| v["uptime_ms"].as_u64().unwrap_or(0);
        f["new_cache_misses"] = json!(if uptime(&after) < uptime(&before) {
            misses(&after)
        } else {
            misses(&after).saturating_sub(misses(&before))
        });
        f["noise"] = figures(&steady, r0, r1);
        modes.push(f);
    }

    let doc = json!({
        "bench": "cache",
        "load": {"fixed_rate": {"tool": "httperf", "requests_per_sec": args.rate,
                                "sessions": args.sessions},
                 "max_throughput": {"tool": "wrk", "connections": args.connections},
                 "duration_secs": args.duration_secs, "reboot_after_secs": args.reboot_after_secs,
                 "files": args.files, "file_bytes": FILE_BYTES},
        "guest_cache_mib": args.cache_mib,
        "cold_cache": {"hits": cold["hits"], "misses": misses(&cold)},
        "after_warm_up": {"misses": misses(&warm)},
        "no_reboot": {
            "requests_per_sec": max.tool["requests_per_sec"],
            "latency_p50_ms": max.tool["latency_p50_ms"],
            "latency_p90_ms": max.tool["latency_p90_ms"],
            "latency_p99_ms": max.tool["latency_p99_ms"],
            "failed": max.failed,
            "fixed_rate": {
                "requests_per_sec": rate(&steady.ok, steady.started_ns, steady.ended_ns).map(round),
                "failed": steady.failed,
                "reply_time_ms": steady.tool["reply_time_ms"],
            },
        },
        "reboots": modes,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print_table(args, &doc);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(args: &CacheArgs, doc: &Value) {
    let n = &doc["no_reboot"];
    let show = |v: &Value| match v {
        Value::Null => "-".to_string(),
        v => v.to_string(),
    };
    println!(
        "HTTP from the guest's page cache: {} files of 64 KiB, cache {} MiB, {} s per run",
        args.files, args.cache_mib, args.duration_secs
    );
    println!(
        "  cold guest: {} misses before any request; {} after the warm-up",
        show(&doc["cold_cache"]["misses"]),
        show(&doc["after_warm_up"]["misses"])
    );
    println!(
        "  no reboot, wrk -c{}: {} req/s, latency p50 {} ms, p90 {} ms, p99 {} ms, {} failed",
        args.connections,
        show(&n["requests_per_sec"]),
        show(&n["latency_p50_ms"]),
        show(&n["latency_p90_ms"]),
        show(&n["latency_p99_ms"]),
        show(&n["failed"])
    );
    println!(
        "  no reboot, httperf at {} req/s ({} keep-alive sessions): {} req/s answered, {} failed",
        args.rate,
        args.sessions,
        show(&n["fixed_rate"]["requests_per_sec"]),
        show(&n["fixed_rate"]["failed"])
    );
    println!("  reboot | client blackout ms | resumed after ms | failed/reset | after 1 s | after 5 s | after 30 s | new misses | host ms");
    for m in doc["reboots"].as_array().into_iter().flatten() {
        if let Some(e) = m["error"].as_str() {
            println!(
                "  {:<6} | not measured: {e}",
                show(&m["mode"]).replace('"', "")
            );
            continue;
        }
        for (label, f) in [
            (show(&m["mode"]).replace('"', ""), m),
            ("  noise".to_string(), &m["noise"]),
        ] {
            println!(
                "  {:<6} | {:>18} | {:>16} | {:>12} | {:>9} | {:>9} | {:>10} | {:>10} | {:>7}",
                label,
                show(&f["client_blackout_ms"]),
                show(&f["resumed_ms_after_request"]),
                show(&f["failed_or_reset"]),
                show(&f["throughput_after_1s"]),
                show(&f["throughput_after_5s"]),
                show(&f["throughput_after_30s"]),
                show(&f["new_cache_misses"]),
                show(&f["host_blackout_ms"]),
            );
        }
    }
    println!("  (throughput from the first response after the blackout, relative to the 5 s before the reboot request; noise: the run without a reboot over the same windows)");
}
