//! The HTTP load of `warmvm bench cache`, from real tools run inside the bench's network
//! namespace: httperf at a fixed request rate (what the reboot runs use: keep-alive
//! sessions that each send a request every fixed think time) and wrk as fast as it can (the no-reboot maximum throughput and latency). Each records the
//! CLOCK_MONOTONIC time of every successful response, which the figures come from.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use warmvm_vmm::handover::RebootReport;

use serde_json::{json, Value};
use warmvm_vmm::monotonic_ns;

pub const GUEST_IP: &str = "10.78.0.2";

/// One load run.
pub struct Run {
    pub started_ns: u64,
    pub ended_ns: u64,
    /// CLOCK_MONOTONIC of every successful (200) response, sorted.
    pub ok: Vec<u64>,
    /// Failed, reset or timed-out connections and requests, plus non-200 answers.
    pub failed: u64,
    /// The tool's own figures (requests/s, latency, errors by kind).
    pub tool: Value,
    /// (request sent, answer received, the daemon's report) of a reboot during the run.
    pub reboot: Option<(u64, u64, RebootReport)>,
}

/// A fixed-rate load: `rate` requests per second from `sessions` keep-alive sessions,
/// cycling over `files`, for `secs`.
pub struct FixedRate {
    pub rate: u32,
    pub sessions: u32,
    pub files: u32,
    pub secs: u64,
}

/// Run httperf as `load` says in namespace `netns`; `during` runs meanwhile (the reboot)
/// and its result is returned in the run. Replies are timestamped as httperf prints them
/// (line-buffered through stdbuf), which is within a millisecond of their arrival here.
pub fn httperf(
    netns: &str,
    dir: &Path,
    load: &FixedRate,
    during: impl FnOnce() -> Result<Option<(u64, u64, RebootReport)>, String>,
) -> Result<Run, String> {
    let uris = dir.join("uris");
    let list: Vec<u8> = (0..load.files)
        .flat_map(|i| format!("/f{i}.bin\0").into_bytes())
        .collect();
    std::fs::write(&uris, list).map_err(|e| e.to_string())?;
    // Keep-alive sessions started 1/sessions s apart, each making one request every
    // sessions/rate s (httperf's think time): requests arrive evenly at about `rate` per
    // second. (New connections at a fixed rate would be open loop, but arrive in bursts of
    // a connection's calls, and the reference guest recycles only 8 sockets.)
    let sessions = load.sessions;
    let think = f64::from(sessions) / f64::from(load.rate);
    let calls = ((load.secs as f64 / think).ceil() as u64).max(1);
    let started_ns = monotonic_ns();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "stdbuf", "-oL", "httperf", "--hog"])
        .args(["--server", GUEST_IP, "--port", "80", "--timeout", "5"])
        .arg(format!("--wlog=y,{}", uris.display()))
        .arg(format!("--rate={sessions}"))
        .arg(format!("--wsess={sessions},{calls},{think}"))
        .arg("--print-reply=header")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run httperf (apt-get install httperf): {e}"))?;
    let stdout = child.stdout.take().ok_or("httperf has no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut ok = Vec::new();
        let mut non_200 = 0u64;
        let mut summary = String::new();
        // The status line of each connection's reply under way, by connection id.
        let mut status: std::collections::HashMap<String, bool> = Default::default();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let t = monotonic_ns();
            if let Some(rest) = line.strip_prefix("RH") {
                if let Some((id, head)) = rest.split_once(':') {
                    if head.starts_with("HTTP/") {
                        status.insert(id.to_string(), head.split(' ').nth(1) == Some("200"));
                    }
                }
            } else if let Some(rest) = line.strip_prefix("RS") {
                let id = rest.split(':').next().unwrap_or_default();
                match status.remove(id) {
                    Some(true) => ok.push(t),
                    _ => non_200 += 1,
                }
            } else {
                summary.push_str(&line);
                summary.push('\n');
            }
        }
        (ok, non_200, summary)
    });
    let reboot = during();
    // A hung httperf is killed after the run's length and its timeout have passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(load.secs + 30);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended_ns = monotonic_ns();
    let (mut ok, non_200, summary) = reader.join().map_err(|_| "httperf reader panicked")?;
    let reboot = reboot?;
    ok.sort_unstable();
    let tool = parse_httperf(&summary);
    let errors = tool["errors_total"].as_u64().unwrap_or(0);
    Ok(Run {
        started_ns,
        ended_ns,
        ok,
        failed: errors + non_200,
        tool,
        reboot,
    })
}

/// httperf's summary: reply rate, and the errors by kind.
fn parse_httperf(text: &str) -> Value {
    let mut v = json!({});
    let num = |s: &str| s.parse::<f64>().ok();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(rest) = line.strip_prefix("Errors: ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            for pair in w.chunks(2) {
                if let [k, n] = pair {
                    v[format!("errors_{}", k.replace('-', "_"))] = json!(n.parse::<u64>().ok());
                }
            }
        }
        if line.starts_with("Request rate:") {
            v["request_rate"] = json!(words.get(2).and_then(|w| num(w)));
        }
        if line.starts_with("Reply time [ms]:") {
            v["reply_time_ms"] = json!(words.get(4).and_then(|w| num(w)));
        }
        if line.starts_with("Total: connections") {
            v["connections"] = json!(words.get(2).and_then(|w| w.parse::<u64>().ok()));
            v["requests"] = json!(words.get(4).and_then(|w| w.parse::<u64>().ok()));
            v["replies"] = json!(words.get(6).and_then(|w| w.parse::<u64>().ok()));
        }
    }
    v
}

pub const WRK_SCRIPT: &str = r#"
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

/// What wrk printed: requests/s, latency percentiles, socket errors.
pub fn parse_wrk(text: &str) -> Value {
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
