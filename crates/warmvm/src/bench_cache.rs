//! `warmvm bench cache`: a reference guest serving HTTP from its disk through its page
//! cache, driven by wrk from inside a network namespace of the bench's own, with and without
//! a warm reboot of the daemon in the middle. It reports what clients see: requests per
//! second and latency without a reboot; with one, the longest gap between successful
//! responses (next to the longest gap in the same window of the run without a reboot, the
//! host's noise), failed connections, and throughput in the first 1, 5 and 30 s after the
//! reboot relative to the 5 s before it.
//!
//! wrk has no fixed-rate mode: it keeps a fixed number of connections busy (closed loop).
//! A Lua script logs the CLOCK_MONOTONIC time of every response, which is where the gaps
//! come from.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_api::Client;

use crate::cli::{Failure, EXIT_HOST, EXIT_VM_FAILED};

#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    /// Print one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// Length of each wrk run, in seconds.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub duration_secs: u64,
    /// When the warm reboot happens in its run, in seconds from its start.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub reboot_after_secs: u64,
    /// wrk connections (the guest serves 8 at once).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub connections: u32,
    /// Files in the guest's archive, 64 KiB each.
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub files: u32,
    /// The guest's page cache in MiB.
    #[arg(long, default_value_t = 16)]
    pub cache_mib: u64,
}

const GUEST_IP: &str = "10.78.0.2";
const HOST_CIDR: &str = "10.78.0.1/24";
const TAP: &str = "wvbench0";
const FILE_BYTES: usize = 64 << 10;

const WRK_SCRIPT: &str = r#"
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } wvm_timespec;
int clock_gettime(int clk, wvm_timespec *tp);
]]
local ts = ffi.new("wvm_timespec")
local files = tonumber(os.getenv("WARMVM_FILES"))
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end
local out
local n = 0
function init(args)
  out = io.open(os.getenv("WARMVM_LOG") .. "." .. id, "w")
  out:setvbuf("line")
end
function request()
  n = n + 1
  return wrk.format("GET", "/f" .. (n % files) .. ".bin")
end
function response(status, headers, body)
  ffi.C.clock_gettime(1, ts)
  out:write(tostring(ts.tv_sec * 1000000000 + ts.tv_nsec), " ", status, "\n")
end
"#;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

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

/// The bench's network namespace, TAP and daemon; all removed when dropped.
struct Setup {
    netns: String,
    dir: PathBuf,
    client: Client,
    child: Option<std::process::Child>,
}

impl Setup {
    fn start(exe: &Path, args: &CacheArgs) -> Result<Self, String> {
        let netns = format!("wvm-bench-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("wvm-bench-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        let mut s = Self {
            netns,
            client: Client::new(&dir.join("api.sock")),
            dir,
            child: None,
        };
        for a in [
            &["link", "set", "lo", "up"][..],
            &["tuntap", "add", "dev", TAP, "mode", "tap"],
            &["addr", "add", HOST_CIDR, "dev", TAP],
            &["link", "set", TAP, "up"],
        ] {
            run(Command::new("ip").args(["-n", &s.netns]).args(a))?;
        }
        let files: Vec<(String, Vec<u8>)> = (0..args.files)
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
        let log = std::fs::File::create(s.dir.join("daemon.log")).map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &s.netns])
            .arg(exe)
            .args(["--log-level", "warn", "daemon", "--socket"])
            .arg(s.client.socket())
            .arg("--state-dir")
            .arg(s.dir.join("state"))
            .args(["--stop-grace-secs", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
        s.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.client.status().is_err() {
            if Instant::now() > deadline {
                return Err("the daemon did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let vm = json!({
            "name": "web",
            "memory_mib": 64 + args.cache_mib,
            "cmdline": format!("quiet interval_ms=20 disk_check_ms=0 ip={GUEST_IP}/24 cache_mib={}", args.cache_mib),
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
        while s.stats().is_err() {
            if Instant::now() > deadline {
                return Err("the guest never served HTTP".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }

    /// The guest's `/stats`, fetched with curl inside the namespace.
    fn stats(&self) -> Result<Value, String> {
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

    /// One wrk run of `secs`, with a warm reboot after `reboot_after` if given.
    fn wrk(&self, args: &CacheArgs, secs: u64, reboot_after: Option<u64>) -> Result<Run, String> {
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
        let mut reboot = None;
        if let Some(after) = reboot_after {
            std::thread::sleep(Duration::from_secs(after));
            let t0 = monotonic_ns();
            let r = self
                .client
                .raw("PUT", "/v1/reboot", Some(br#"{"mode":"warm"}"#))
                .map_err(|e| e.to_string())?;
            let t1 = monotonic_ns();
            if r.status != 200 {
                return Err(format!(
                    "the warm reboot failed: {}",
                    String::from_utf8_lossy(&r.body)
                ));
            }
            let report: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            reboot = Some((t0, t1, report));
        }
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
        Ok(Run {
            started_ns,
            ended_ns: monotonic_ns(),
            ok,
            non_200: bad,
            wrk: parse_wrk(&text),
            reboot,
        })
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Ok(pid) = self.client.status().map(|s| s["pid"].as_i64().unwrap_or(0)) {
            if pid > 0 {
                // SAFETY: kill has no memory effects; the pid is the bench's daemon (or its
                // successor after a warm reboot), read from its own API.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.client.socket()).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Run {
    started_ns: u64,
    ended_ns: u64,
    /// CLOCK_MONOTONIC of every successful response, sorted.
    ok: Vec<u64>,
    non_200: u64,
    wrk: Value,
    /// (request sent, answer received, the daemon's report)
    reboot: Option<(u64, u64, Value)>,
}

/// What wrk printed: requests/s, latency percentiles, socket errors.
fn parse_wrk(text: &str) -> Value {
    let mut v = json!({});
    let ms = |s: &str| -> Option<f64> {
        let s = s.trim();
        if let Some(x) = s.strip_suffix("us") {
            x.parse::<f64>().ok().map(|x| x / 1000.0)
        } else if let Some(x) = s.strip_suffix("ms") {
            x.parse().ok()
        } else if let Some(x) = s.strip_suffix('s') {
            x.parse::<f64>().ok().map(|x| x * 1000.0)
        } else {
            None
        }
    };
    let mut errors = 0u64;
    for line in text.lines() {
        let t = line.trim();
        if let Some(r) = t.strip_prefix("Requests/sec:") {
            v["requests_per_sec"] = json!(r.trim().parse::<f64>().ok());
        }
        for p in ["50%", "75%", "90%", "99%"] {
            if let Some(r) = t.strip_prefix(p) {
                v[format!("latency_p{}_ms", &p[..2])] = json!(ms(r));
            }
        }
        if let Some(r) = t.strip_prefix("Socket errors:") {
            for part in r.split(',') {
                if let Some(n) = part
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    errors += n;
                }
            }
        }
        if let Some(r) = t.strip_prefix("Non-2xx or 3xx responses:") {
            v["non_2xx"] = json!(r.trim().parse::<u64>().ok());
        }
        if t.contains("requests in") {
            v["requests"] = json!(t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok()));
        }
    }
    v["socket_errors"] = json!(errors);
    v
}

/// Responses in [from, to) per second.
fn rate(ok: &[u64], from: u64, to: u64) -> Option<f64> {
    if to <= from {
        return None;
    }
    let n = ok.partition_point(|&t| t < to) - ok.partition_point(|&t| t < from);
    Some(n as f64 / ((to - from) as f64 / 1e9))
}

/// The longest gap between successive responses in [from, to), in ms (edges included).
fn longest_gap_ms(ok: &[u64], from: u64, to: u64) -> f64 {
    let mut last = from;
    let mut gap = 0u64;
    for &t in ok.iter().filter(|&&t| t >= from && t < to) {
        gap = gap.max(t - last);
        last = t;
    }
    gap = gap.max(to.saturating_sub(last));
    gap as f64 / 1e6
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn cache(args: &CacheArgs) -> Result<ExitCode, Failure> {
    if args.reboot_after_secs + 2 > args.duration_secs {
        return Err(Failure::new(
            crate::cli::EXIT_BAD_INPUT,
            "--reboot-after-secs must leave at least 2 s of the run after the reboot",
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(EXIT_HOST, format!("cannot find this binary: {e}")))?;
    let setup = Setup::start(&exe, args).map_err(|e| Failure::new(EXIT_HOST, e))?;
    let fail = |e: String| Failure::new(EXIT_VM_FAILED, e);
    let cold = setup.stats().map_err(fail)?;
    // Warm the cache: every file, several times over.
    setup.wrk(args, 2, None).map_err(fail)?;
    let warm = setup.stats().map_err(fail)?;
    let steady = setup.wrk(args, args.duration_secs, None).map_err(fail)?;
    let before_reboot_stats = setup.stats().map_err(fail)?;
    let rebooted = setup
        .wrk(args, args.duration_secs, Some(args.reboot_after_secs))
        .map_err(fail)?;
    let after_stats = setup.stats().map_err(fail)?;

    let (r0, r1, report) = rebooted.reboot.clone().unwrap_or((0, 0, Value::Null));
    let window = |run: &Run, rel_from: u64, rel_to: u64| {
        longest_gap_ms(&run.ok, run.started_ns + rel_from, run.started_ns + rel_to)
    };
    // The window around the reboot: 1 s before the request to 1 s after the answer; the
    // same stretch of the run without a reboot is the noise to compare with.
    let rel_from = (r0 - rebooted.started_ns).saturating_sub(1_000_000_000);
    let rel_to = (r1 - rebooted.started_ns) + 1_000_000_000;
    let blackout_ms = window(&rebooted, rel_from, rel_to);
    let noise_ms = window(&steady, rel_from, rel_to);
    let before = rate(
        &rebooted.ok,
        r0.saturating_sub(5_000_000_000).max(rebooted.started_ns),
        r0,
    );
    let after = |secs: u64| {
        let to = r1 + secs * 1_000_000_000;
        (to <= rebooted.ended_ns)
            .then(|| rate(&rebooted.ok, r1, to))
            .flatten()
            .zip(before)
            .map(|(a, b)| round(a / b))
    };
    let failed = rebooted.wrk["socket_errors"].as_u64().unwrap_or(0) + rebooted.non_200;
    let misses = |v: &Value| v["misses"].as_u64().unwrap_or(0);
    let doc = json!({
        "bench": "cache",
        "load": {"tool": "wrk", "mode": "closed loop", "connections": args.connections,
                 "duration_secs": args.duration_secs, "files": args.files, "file_bytes": FILE_BYTES},
        "guest_cache_mib": args.cache_mib,
        "cold_cache": {"hits": cold["hits"], "misses": misses(&cold)},
        "after_warm_up": {"misses": misses(&warm)},
        "no_reboot": {
            "requests_per_sec": steady.wrk["requests_per_sec"],
            "latency_p50_ms": steady.wrk["latency_p50_ms"],
            "latency_p90_ms": steady.wrk["latency_p90_ms"],
            "latency_p99_ms": steady.wrk["latency_p99_ms"],
            "failed": steady.wrk["socket_errors"].as_u64().unwrap_or(0) + steady.non_200,
            "longest_gap_ms_in_reboot_window": round(noise_ms),
        },
        "warm_reboot": {
            "client_blackout_ms": round(blackout_ms),
            "host_blackout_ms": report["host_blackout_us"].as_u64().map(|us| us as f64 / 1000.0),
            "failed_or_reset": failed,
            "failed_detail": {
                "connect": rebooted.wrk["socket_errors_connect"].as_u64().unwrap_or(0),
                "read": rebooted.wrk["socket_errors_read"].as_u64().unwrap_or(0),
                "write": rebooted.wrk["socket_errors_write"].as_u64().unwrap_or(0),
                "timeout": rebooted.wrk["socket_errors_timeout"].as_u64().unwrap_or(0),
                "non_200": rebooted.non_200,
            },
            "requests_per_sec_before": before.map(round),
            "throughput_after_1s": after(1),
            "throughput_after_5s": after(5),
            "throughput_after_30s": after(30),
            "new_cache_misses": misses(&after_stats).saturating_sub(misses(&before_reboot_stats)),
            "requests_per_sec": rebooted.wrk["requests_per_sec"],
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        let w = &doc["warm_reboot"];
        let n = &doc["no_reboot"];
        let show = |v: &Value| match v {
            Value::Null => "-".to_string(),
            v => v.to_string(),
        };
        println!("HTTP from the guest's page cache, wrk -c{} for {} s per run ({} files of 64 KiB, cache {} MiB)", args.connections, args.duration_secs, args.files, args.cache_mib);
        println!(
            "  cold guest: {} misses before any request; {} after the warm-up",
            misses(&cold),
            misses(&warm)
        );
        println!(
            "  no reboot : {} req/s, latency p50 {} ms, p90 {} ms, p99 {} ms, {} failed",
            show(&n["requests_per_sec"]),
            show(&n["latency_p50_ms"]),
            show(&n["latency_p90_ms"]),
            show(&n["latency_p99_ms"]),
            show(&n["failed"])
        );
        println!("  reboot    | client blackout | noise (same window, no reboot) | failed/reset | after 1 s | after 5 s | after 30 s | new misses");
        println!(
            "  warm      | {:>12} ms | {:>27} ms | {:>12} | {:>9} | {:>9} | {:>10} | {:>10}",
            show(&w["client_blackout_ms"]),
            show(&n["longest_gap_ms_in_reboot_window"]),
            show(&w["failed_or_reset"]),
            show(&w["throughput_after_1s"]),
            show(&w["throughput_after_5s"]),
            show(&w["throughput_after_30s"]),
            show(&w["new_cache_misses"])
        );
        println!("  (throughput after the reboot relative to the 5 s before it; saved and cold reboots do not exist yet)");
    }
    Ok(ExitCode::SUCCESS)
}
