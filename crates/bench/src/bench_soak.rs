//! `warmvm bench soak`: warm reboots back to back through a daemon, as a host that runs for
//! weeks sees them. Several reference guests and one guest serving HTTP under a fixed-rate
//! httperf load; after every reboot every VM is judged from inside (each vCPU verified more
//! pages since the reboot before, no mismatch, no register-check failure, time never went
//! back), and the soak stops at the first VM that fails, naming the reboot. Every window of
//! reboots reports the daemon's open fds, threads, anonymous RSS and heap in use (each read
//! right after the window's last reboot, from the process that then owns the VMs) and the
//! host blackout's p50/p99 over the window.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use warmvm_api::Client;
use warmvm_testkit::{advanced_since, sample, Judgement, Sample};
use warmvm_vmm::handover::RebootReport;

use crate::bench_cache::{Setup, Site};
use crate::bench_cache_load::{httperf, FixedRate};
use crate::cli::{Failure, EXIT_BAD_INPUT, EXIT_HOST, EXIT_VM_FAILED};
use warmvm_cli_common::bench_args::SoakArgs;
use warmvm_cli_common::stats::p50_p99_max;

/// Files in the HTTP guest's archive and its page cache: small, as the load is steady
/// service under reboots, not a cache measurement.
const SITE: Site = Site {
    files: 16,
    cache_mib: 16,
};
/// How long one vCPU may take to verify a page more after a reboot before its VM counts as
/// failed (a guest whose vCPU state was lost stops verifying; one that runs keeps going).
const ADVANCE_WITHIN: Duration = Duration::from_secs(10);
/// Each httperf run's length: the soak's end waits for the last one.
const LOAD_RUN_SECS: u64 = 10;

/// What one window of reboots left behind.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Window {
    /// First and last reboot of the window, counted from 1.
    pub first_reboot: u64,
    pub last_reboot: u64,
    pub open_fds: u64,
    pub threads: u64,
    pub rss_anon_bytes: u64,
    /// glibc's heap in use, as the daemon's own aging sampler read it; none when the
    /// process had not sampled itself within the wait.
    pub heap_in_use_bytes: Option<u64>,
    pub blackout_p50_ms: f64,
    /// None for a window under the percentile's minimum sample count.
    pub blackout_p99_ms: Option<f64>,
    pub blackout_max_ms: f64,
    /// Successful HTTP replies received during the window.
    pub http_ok: u64,
    pub seconds: f64,
    /// The window's span, CLOCK_MONOTONIC ns: its replies are counted once the load ends.
    #[serde(skip)]
    pub span_ns: (u64, u64),
}

/// The soak's goals, judged on the first and the last window.
#[derive(Debug, Serialize, PartialEq)]
pub struct Verdict {
    pub fds_equal: bool,
    pub threads_equal: bool,
    /// Last window's anonymous RSS over the first's.
    pub rss_anon_ratio: f64,
    pub rss_anon_within_5_percent: bool,
    /// Last window's blackout p50 over the first's.
    pub blackout_p50_ratio: f64,
    pub blackout_p50_within_10_percent: bool,
}

/// First against last window; none with fewer than two windows.
pub fn verdict(windows: &[Window]) -> Option<Verdict> {
    let (first, last) = match windows {
        [first, .., last] => (first, last),
        _ => return None,
    };
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { f64::NAN };
    let rss = ratio(first.rss_anon_bytes as f64, last.rss_anon_bytes as f64);
    let p50 = ratio(first.blackout_p50_ms, last.blackout_p50_ms);
    Some(Verdict {
        fds_equal: first.open_fds == last.open_fds,
        threads_equal: first.threads == last.threads,
        rss_anon_ratio: rss,
        rss_anon_within_5_percent: (rss - 1.0).abs() <= 0.05,
        blackout_p50_ratio: p50,
        blackout_p50_within_10_percent: (p50 - 1.0).abs() <= 0.10,
    })
}

/// Wait until every VM of `before` has verified more on each vCPU, or say why not (the
/// test kit's judge, polled closely so that the next reboot follows soon).
fn judge_after_reboot(client: &Client, before: &Sample) -> Result<Sample, String> {
    let names: Vec<String> = before.keys().cloned().collect();
    advanced_since(
        client,
        &names,
        before,
        ADVANCE_WITHIN,
        Duration::from_millis(10),
    )
    .map_err(|j| match j {
        Judgement::Corrupted(why) => format!("corrupted: {why}"),
        Judgement::Lost(why) => format!("lost: {why}"),
    })
}

/// A process's open fds, threads and anonymous RSS, from /proc: fds and threads are each the
/// least of a few reads 20 ms apart, so that a connection or a worker thread that comes and
/// goes is not counted as one the process keeps.
fn process_figures(pid: u32) -> Result<(u64, u64, u64), String> {
    let mut least = process_figures_once(pid)?;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(20));
        let (fds, threads, rss) = process_figures_once(pid)?;
        least = (least.0.min(fds), least.1.min(threads), rss);
    }
    Ok(least)
}

fn process_figures_once(pid: u32) -> Result<(u64, u64, u64), String> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))?
        .count() as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/status has no {name}"))
    };
    Ok((fds, field("Threads:")?, field("RssAnon:")? * 1024))
}

#[derive(Debug, Deserialize)]
struct HistorySample {
    pid: u32,
    values: HistoryValues,
}

#[derive(Debug, Deserialize)]
struct HistoryValues {
    heap_in_use_bytes: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct History {
    samples: Vec<HistorySample>,
}

/// The heap in use the daemon `pid` last sampled itself, waiting up to two sampling periods
/// for its first sample.
fn heap_in_use(client: &Client, pid: u32) -> Option<u64> {
    let deadline = Instant::now() + 2 * AGING_PERIOD;
    loop {
        let found = client
            .raw("GET", "/v1/aging/history", None)
            .ok()
            .and_then(|r| serde_json::from_slice::<History>(&r.body).ok())
            .and_then(|h| {
                h.samples
                    .iter()
                    .rev()
                    .find(|s| s.pid == pid)
                    .and_then(|s| s.values.heap_in_use_bytes)
            });
        if found.is_some() || Instant::now() > deadline {
            return found.map(|b| b as u64);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How often each daemon samples itself (its heap is read from inside the process).
const AGING_PERIOD: Duration = Duration::from_millis(500);

#[derive(Debug, Deserialize)]
struct Status {
    pid: u32,
}

/// The fixed-rate load: httperf runs back to back until told to stop; the replies' times.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<Mutex<Vec<u64>>>,
    failed: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Load {
    fn start(netns: String, dir: PathBuf, rate: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let load = FixedRate {
                rate,
                sessions: 4.min(rate),
                files: SITE.files,
                secs: LOAD_RUN_SECS,
            };
            while !s.load(Ordering::Relaxed) {
                let run = httperf(&netns, &dir, &load, || Ok(None))?;
                o.lock().map_err(|_| "poisoned")?.extend(run.ok);
                *f.lock().map_err(|_| "poisoned")? += run.failed;
            }
            Ok(())
        });
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stop after the run under way; every reply's time (CLOCK_MONOTONIC ns), and the
    /// failures.
    fn finish(mut self) -> Result<(Vec<u64>, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| "the load thread panicked")??;
        }
        let ok = self
            .ok
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default();
        let failed = self.failed.lock().map(|f| *f).unwrap_or(0);
        Ok((ok, failed))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where the soak stopped early, and why.
#[derive(Debug, Serialize)]
struct Stopped {
    reboot: u64,
    why: String,
}

pub fn soak(args: &SoakArgs) -> Result<ExitCode, Failure> {
    if args.window > args.reboots {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "--window must not exceed --reboots",
        ));
    }
    // SIGINT or SIGTERM ends the soak after the reboot under way, with the figures so far.
    crate::interrupt::install().map_err(|e| Failure::new(EXIT_HOST, e))?;
    let exe = crate::cli::warmvm_exe()?;
    let host = Host::start(&exe, args).map_err(|e| Failure::new(EXIT_HOST, e))?;
    let client = host
        .setup
        .client()
        .clone()
        .with_timeout(Duration::from_secs(150));
    let load = Load::start(
        host.setup.netns().to_string(),
        host.setup.dir().to_path_buf(),
        args.rate,
    );
    let started = Instant::now();
    let load_average_before = load_average();
    let mut progress = crate::progress::Progress::new("warmvm bench soak", args.reboots as usize);

    let mut before = sample(&client)
        .map_err(|e| Failure::new(EXIT_HOST, format!("cannot list the VMs: {e}")))?;
    let mut windows = Vec::new();
    let mut blackouts_us = Vec::new();
    let mut window_started = (Instant::now(), warmvm_vmm::monotonic_ns());
    let mut stopped = None;
    // Reboots judged good; short of --reboots when a VM failed or a signal asked to stop.
    let mut done = 0;
    for reboot in 1..=args.reboots {
        progress.step(&format!("reboot {reboot}/{}", args.reboots));
        let outcome = (|| -> Result<(), String> {
            let r = client
                .raw("PUT", "/v1/reboot", Some(br#"{"mode":"warm"}"#))
                .map_err(|e| format!("no answer: {e}"))?;
            if r.status != 200 {
                return Err(format!(
                    "{}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body).trim()
                ));
            }
            let report: RebootReport = serde_json::from_slice(&r.body)
                .map_err(|e| format!("the reboot report is malformed: {e}"))?;
            if !report.is_measured() {
                return Err(format!(
                    "the blackout was not measured: {}",
                    report.errors.join("; ")
                ));
            }
            blackouts_us.push(report.host_blackout_us);
            before = judge_after_reboot(&client, &before)?;
            Ok(())
        })();
        progress.done();
        if let Err(why) = outcome {
            if crate::interrupt::requested() {
                // Whatever failed after the signal is the signal's doing.
                done = reboot - 1;
                break;
            }
            stopped = Some(Stopped { reboot, why });
            done = reboot - 1;
            break;
        }
        let last = reboot == args.reboots || crate::interrupt::requested();
        if reboot % args.window == 0 || last {
            let window = close_window(&client, &mut blackouts_us, window_started, &windows, reboot)
                .map_err(|e| Failure::new(EXIT_HOST, e))?;
            window_started = (Instant::now(), window.span_ns.1);
            windows.push(window);
        }
        if last {
            done = reboot;
            break;
        }
    }
    progress.finish();
    let (replies, http_failed) = load.finish().map_err(|e| Failure::new(EXIT_HOST, e))?;
    let http_ok = replies.len() as u64;
    for w in &mut windows {
        w.http_ok = replies
            .iter()
            .filter(|&&t| t >= w.span_ns.0 && t < w.span_ns.1)
            .count() as u64;
    }
    let reboots_done = done;
    let verdict = verdict(&windows);
    let doc = json!({
        "bench": "soak",
        "reboots_requested": args.reboots,
        "reboots_done": reboots_done,
        "stopped": stopped,
        "interrupted": crate::interrupt::requested(),
        "vms": args.vms,
        "reference_guests": {"count": args.vms - 1, "memory_mib": args.memory_mib, "vcpus": args.vcpus},
        "http_guest": {"requests_per_sec": args.rate, "tool": "httperf", "ok": http_ok, "failed": http_failed},
        "window": args.window,
        "windows": windows,
        "verdict": verdict,
        "seconds": started.elapsed().as_secs_f64(),
        "load_average": {"before": load_average_before, "after": load_average()},
        "host": crate::bench_daemon::host_facts(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print_table(&doc, &windows, verdict.as_ref());
    }
    // After the figures: a plot that cannot be written loses no result.
    if let Some(dir) = &args.plot_dir {
        plot(dir, &windows).map_err(|e| Failure::new(EXIT_HOST, e))?;
    }
    match doc["stopped"].is_null() {
        true => Ok(ExitCode::SUCCESS),
        false => Err(Failure::new(
            EXIT_VM_FAILED,
            format!(
                "the soak stopped at reboot {}: {}",
                reboots_done + 1,
                doc["stopped"]["why"].as_str().unwrap_or_default()
            ),
        )),
    }
}

/// The window that ends with `reboot`: the resources of the daemon that now owns the VMs,
/// the blackouts since the window before.
fn close_window(
    client: &Client,
    blackouts_us: &mut Vec<u64>,
    started: (Instant, u64),
    windows: &[Window],
    reboot: u64,
) -> Result<Window, String> {
    let status: Status = client
        .raw("GET", "/v1/status", None)
        .ok()
        .and_then(|r| serde_json::from_slice(&r.body).ok())
        .ok_or("cannot read the daemon's status")?;
    let (fds, threads, rss) = process_figures(status.pid)?;
    let now_ns = warmvm_vmm::monotonic_ns();
    let (p50, p99, max) = p50_p99_max(std::mem::take(blackouts_us));
    Ok(Window {
        first_reboot: windows.last().map_or(1, |w| w.last_reboot + 1),
        last_reboot: reboot,
        open_fds: fds,
        threads,
        rss_anon_bytes: rss,
        heap_in_use_bytes: heap_in_use(client, status.pid),
        blackout_p50_ms: p50,
        blackout_p99_ms: p99,
        blackout_max_ms: max,
        http_ok: 0,
        span_ns: (started.1, now_ns),
        seconds: started.0.elapsed().as_secs_f64(),
    })
}

/// The 1-minute load average, for the record beside the figures.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The soak's host: the network namespace, the daemon (its aging sampler on, in dry run, so
/// that it reports its heap and never reboots on its own), the HTTP guest and the reference
/// guests, all started.
struct Host {
    setup: Setup,
}

impl Host {
    fn start(exe: &Path, args: &SoakArgs) -> Result<Self, String> {
        let config = std::env::temp_dir().join(format!("wvm-soak-{}.toml", std::process::id()));
        std::fs::write(
            &config,
            format!(
                "[aging]\nenabled = true\ndry_run = true\nperiod_ms = {}\n",
                AGING_PERIOD.as_millis()
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let setup = Setup::start(
            exe,
            &SITE,
            &[std::ffi::OsStr::new("--config"), config.as_os_str()],
        );
        let _ = std::fs::remove_file(&config);
        let setup = setup?;
        for i in 1..args.vms {
            let vm = json!({
                "name": format!("soak-{i}"),
                "memory_mib": args.memory_mib,
                "vcpus": args.vcpus,
                "cmdline": "quiet interval_ms=20",
            });
            let r = setup
                .client()
                .raw("POST", "/v1/vms", Some(vm.to_string().as_bytes()))
                .map_err(|e| e.to_string())?;
            if r.status != 201 {
                return Err(format!(
                    "creating soak-{i}: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body).trim()
                ));
            }
        }
        // Every guest verifies before the first reboot, so that each reboot is judged
        // against pages verified before it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let vms = sample(setup.client()).map_err(|e| format!("cannot list the VMs: {e}"))?;
            let all = vms.len() == args.vms as usize
                && vms
                    .values()
                    .all(|vm| !vm.verified.is_empty() && vm.verified.iter().all(|&p| p > 0));
            if all {
                return Ok(Self { setup });
            }
            if Instant::now() > deadline {
                return Err("the guests did not all verify pages within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An optional figure for a table cell: `-` when there is none.
fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn print_table(doc: &serde_json::Value, windows: &[Window], verdict: Option<&Verdict>) {
    println!(
        "warm-reboot soak: {} of {} reboots, {} VMs (1 serving HTTP at {} req/s), {:.0} s",
        doc["reboots_done"],
        doc["reboots_requested"],
        doc["vms"],
        doc["http_guest"]["requests_per_sec"],
        doc["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<13} {:>5} {:>7} {:>12} {:>12} {:>13} {:>8} {:>8} {:>8}",
        "REBOOTS",
        "FDS",
        "THREADS",
        "RSS ANON MiB",
        "HEAP MiB",
        "BLACKOUT P50",
        "P99",
        "MAX",
        "HTTP OK"
    );
    for w in windows {
        println!(
            "{:<13} {:>5} {:>7} {:>12.1} {:>12} {:>10.3} ms {:>8} {:>8.3} {:>8}",
            format!("{}-{}", w.first_reboot, w.last_reboot),
            w.open_fds,
            w.threads,
            mib(w.rss_anon_bytes),
            w.heap_in_use_bytes
                .map_or_else(|| "-".to_string(), |b| format!("{:.2}", mib(b))),
            w.blackout_p50_ms,
            opt_ms(w.blackout_p99_ms),
            w.blackout_max_ms,
            w.http_ok
        );
    }
    println!(
        "HTTP: {} replies, {} failed",
        doc["http_guest"]["ok"], doc["http_guest"]["failed"]
    );
    if let Some(v) = verdict {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "first and last window: fds equal {}, threads equal {}, anonymous RSS x{:.3} (within 5%: {}), blackout p50 x{:.3} (within 10%: {})",
            yes(v.fds_equal),
            yes(v.threads_equal),
            v.rss_anon_ratio,
            yes(v.rss_anon_within_5_percent),
            v.blackout_p50_ratio,
            yes(v.blackout_p50_within_10_percent)
        );
    }
    if let Some(s) = doc["stopped"].as_object() {
        println!(
            "STOPPED at reboot {}: {}",
            s.get("reboot").cloned().unwrap_or_default(),
            s.get("why").and_then(|w| w.as_str()).unwrap_or_default()
        );
    }
    println!(
        "load average: {} before, {} after",
        doc["load_average"]["before"], doc["load_average"]["after"]
    );
}

/// Three plots against the reboot count: fds and threads, anonymous RSS and heap, blackout.
fn plot(dir: &Path, windows: &[Window]) -> Result<(), String> {
    use crate::bench_aging_plot::{save, Chart, Series};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let x = |w: &Window| w.last_reboot as f64;
    let series = |label: &str, f: &dyn Fn(&Window) -> Option<f64>| Series {
        label: label.to_string(),
        points: windows
            .iter()
            .filter_map(|w| f(w).map(|y| (x(w), y)))
            .collect(),
    };
    let charts = [
        (
            "soak-fds-threads",
            "Daemon fds and threads after each window",
            "count",
            vec![
                series("open fds", &|w| Some(w.open_fds as f64)),
                series("threads", &|w| Some(w.threads as f64)),
            ],
        ),
        (
            "soak-memory",
            "Daemon memory after each window",
            "MiB",
            vec![
                series("anonymous RSS", &|w| Some(mib(w.rss_anon_bytes))),
                series("heap in use", &|w| w.heap_in_use_bytes.map(mib)),
            ],
        ),
        (
            "soak-blackout",
            "Host blackout per window",
            "ms",
            vec![
                series("p50", &|w| Some(w.blackout_p50_ms)),
                series("p99", &|w| w.blackout_p99_ms),
            ],
        ),
    ];
    for (name, title, y_label, series) in &charts {
        save(
            dir,
            name,
            &Chart {
                title,
                x_label: "warm reboots",
                y_label,
                series,
                hlines: &[],
                marks: &[],
                log_x: false,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(fds: u64, threads: u64, rss: u64, p50: f64) -> Window {
        Window {
            first_reboot: 1,
            last_reboot: 1000,
            open_fds: fds,
            threads,
            rss_anon_bytes: rss,
            heap_in_use_bytes: Some(1),
            blackout_p50_ms: p50,
            blackout_p99_ms: None,
            blackout_max_ms: p50,
            http_ok: 0,
            seconds: 1.0,
            span_ns: (0, 1),
        }
    }

    #[test]
    fn the_verdict_compares_the_first_window_with_the_last() {
        let w = [
            window(40, 20, 1000, 1.0),
            window(99, 99, 9999, 9.0),
            window(40, 21, 1049, 1.11),
        ];
        let v = verdict(&w).expect("two windows or more");
        assert!(v.fds_equal);
        assert!(!v.threads_equal);
        assert!(v.rss_anon_within_5_percent);
        assert!((v.rss_anon_ratio - 1.049).abs() < 1e-9);
        assert!(!v.blackout_p50_within_10_percent);
        assert!(verdict(&w[..1]).is_none());
    }
}
