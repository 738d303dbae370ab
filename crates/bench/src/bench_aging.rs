//! `warmvm bench aging`: how well the daemon's aging monitor rejuvenates it.
//!
//! 1. Record real noise: a `warmvm daemon` with VMs, under a steady load of API requests,
//!    sampled by its own monitor; and one real warm reboot, for its blackout.
//! 2. Live leaks (a fault-injection build only, whose daemon has `PUT /v1/debug/aging`):
//!    the delay from the start of a heap leak to the warm reboot it triggers, the lead time
//!    left before the budget, and the new daemon's baseline against the old one's.
//! 3. Accelerated time: the monitor's own detectors and policy over the recorded noise,
//!    replayed for days: the delay and lead time for several leak rates, and the false
//!    positives of non-aging runs.
//! 4. Against time-based rejuvenation: reboots and blackout per day against exhaustions.
//!
//! It prints a table (or one JSON document with `--json`) and writes SVG and PNG plots.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use warmvm_api::aging::{AgingHistory, AgingReport, Metric, RebootReason};
use warmvm_api::client::Answer;
use warmvm_api::types::Mode;
pub(crate) use warmvm_cli_common::bench_args::AgingArgs;
use warmvm_vmm::{AgingConfig, Lifecycle};

use crate::bench_aging_plot as plot;
use crate::bench_aging_report::{draw_plots, print_tables};
use crate::bench_aging_sim::{simulate, Leak, Recording};
use crate::bench_daemon::{host_facts, BenchDaemon};
use crate::cli::{Failure, EXIT_BAD_INPUT, EXIT_HOST};

/// The live daemons' monitor settings: fast, so a run takes seconds.
pub(crate) const LIVE_HORIZON_SECS: u64 = 30;
pub(crate) const LIVE_BUDGET_MIB: u64 = 256;

fn write_config(dir: &Path, body: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("aging.toml");
    std::fs::write(&path, body).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn create_vms(d: &BenchDaemon, n: u32) -> Result<(), String> {
    for i in 0..n {
        let vm: warmvm_vmm::VmConfig = serde_json::from_value(json!({
            "name": format!("age-{i}"), "memory_mib": 64, "cmdline": "quiet interval_ms=20"
        }))
        .map_err(|e| e.to_string())?;
        d.client.create(&vm).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn aging_report(d: &BenchDaemon) -> Result<AgingReport, String> {
    d.client
        .typed()
        .aging()
        .map(Answer::into_value)
        .map_err(|e| e.to_string())
}

fn aging_history(d: &BenchDaemon) -> Result<AgingHistory, String> {
    d.client
        .typed()
        .aging_history()
        .map(Answer::into_value)
        .map_err(|e| format!("the history: {e}"))
}

fn daemon_pid(d: &BenchDaemon) -> Result<u32, String> {
    d.client
        .typed()
        .status()
        .map(|s| s.pid)
        .map_err(|e| e.to_string())
}

fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn baselines(d: &BenchDaemon) -> Option<BTreeMap<String, f64>> {
    let r = aging_report(d).ok()?;
    let b: BTreeMap<String, f64> = r
        .metrics
        .iter()
        .filter_map(|m| Some((m.metric.name().to_string(), m.baseline?)))
        .collect();
    (b.len() >= 3).then_some(b)
}

/// The recorded noise, and one real warm reboot's blackout.
struct Recorded {
    rec: Recording,
    blackout_ms: f64,
}

fn record(exe: &Path, dir: &Path, a: &AgingArgs) -> Result<Recorded, String> {
    let samples = (a.record_secs * 1000 / a.record_period_ms) as u32 + 64;
    let cfg = write_config(
        dir,
        &format!(
            "[aging]\nperiod_ms = {}\nhistory = {}\ndry_run = true\n",
            a.record_period_ms,
            samples.max(16)
        ),
    )?;
    let d = BenchDaemon::start_with(exe, dir, &[OsStr::new("--config"), cfg.as_os_str()])?;
    create_vms(&d, a.vms)?;
    let pid = daemon_pid(&d)?;
    // Load: API requests back to back (lists and metrics, as a busy control plane sends).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let client = d.client.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut list = true;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                list = !list;
                let _ = if list {
                    client.list().map(drop)
                } else {
                    client.raw("GET", "/metrics", None).map(drop)
                };
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_secs(a.record_secs));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let requests = load.join().unwrap_or(0);
    let history = aging_history(&d)?;
    // The segment with every VM running, after its first second (start-up).
    let segment: Vec<_> = history
        .samples
        .into_iter()
        .filter(|s| s.pid == pid && s.vms == a.vms)
        .skip((1000 / a.record_period_ms) as usize)
        .collect();
    let rec = Recording::from_samples(&segment, a.record_period_ms).ok_or_else(|| {
        format!(
            "too few samples recorded ({}); record longer",
            segment.len()
        )
    })?;
    let report = d
        .client
        .typed()
        .reboot_with(Mode::Warm, None, None)
        .map_err(|e| format!("the warm reboot: {e}"))?;
    let blackout_ms = report.host_blackout_us as f64 / 1000.0;
    eprintln!(
        "warmvm bench aging: recorded {} samples every {} ms under {requests} API requests; one warm reboot: {blackout_ms:.3} ms blackout",
        rec.samples, a.record_period_ms
    );
    Ok(Recorded { rec, blackout_ms })
}

#[derive(Serialize)]
pub(crate) struct LiveRun {
    pub(crate) heap_mib_per_sec: f64,
    /// Seconds from the start of the leak to the new daemon serving.
    pub(crate) delay_secs: f64,
    pub(crate) reason: String,
    /// Seconds the budget still had at the leak's rate, at the old daemon's last sample.
    pub(crate) lead_secs: f64,
    pub(crate) horizon_secs: u64,
    /// The new daemon's post-start baseline over the old one's, per aged resource.
    pub(crate) baseline_after_ratio: BTreeMap<String, f64>,
    /// Share of the growth above the old baseline gone in the new daemon's baseline.
    pub(crate) growth_shed: BTreeMap<String, f64>,
    pub(crate) vms_verified: bool,
}

/// Guests running, progressing and uncorrupted.
fn vms_verified(d: &BenchDaemon) -> bool {
    let counters = |d: &BenchDaemon| -> Option<Vec<(u64, u64)>> {
        let l = d.client.typed().list().ok()?.into_value();
        l.vms
            .iter()
            .map(|v| {
                (v.lifecycle == Lifecycle::Running).then(|| {
                    v.guest.as_ref().map_or((0, 0), |g| {
                        (g.counter, g.mismatches + g.register_check_failures)
                    })
                })
            })
            .collect()
    };
    let Some(before) = counters(d) else {
        return false;
    };
    wait_for(30, || {
        let now = counters(d)?;
        (now.len() == before.len() && now.iter().zip(&before).all(|(n, b)| n.0 > b.0))
            .then_some(now)
    })
    .is_some_and(|now| now.iter().all(|v| v.1 == 0))
}

/// One live leak; None when this build has no injected aging.
fn live_leak(exe: &Path, dir: &Path, mib_per_sec: f64) -> Result<Option<LiveRun>, String> {
    let cfg = write_config(
        dir,
        &format!(
            "[aging]\nperiod_ms = 200\nwindow = 40\nmin_samples = 15\nbaseline_samples = 5\n\
             horizon_secs = {LIVE_HORIZON_SECS}\nmemory_budget_mib = {LIVE_BUDGET_MIB}\nmax_per_hour = 10\n"
        ),
    )?;
    let d = BenchDaemon::start_with(exe, dir, &[OsStr::new("--config"), cfg.as_os_str()])?;
    create_vms(&d, 2)?;
    let before = wait_for(30, || baselines(&d)).ok_or("no baseline")?;
    let old_pid = daemon_pid(&d)?;
    let rate = mib_per_sec * (1u64 << 20) as f64;
    let body = json!({ "heap_bytes_per_sec": rate as u64 }).to_string();
    let started = Instant::now();
    let answer = d
        .client
        .raw("PUT", "/v1/debug/aging", Some(body.as_bytes()))
        .map_err(|e| e.to_string())?;
    if answer.status == 404 {
        return Ok(None);
    }
    let new_pid = wait_for(180, || {
        let pid = daemon_pid(&d).ok()?;
        (pid != old_pid).then_some(pid)
    })
    .ok_or_else(|| format!("no rejuvenation within 180 s: {}", d.log_tail()))?;
    let delay_secs = started.elapsed().as_secs_f64();
    // The new daemon's own baseline (its samples, with every VM).
    let after = wait_for(30, || {
        let r = aging_report(&d).ok()?;
        let fresh = r.metrics.iter().all(|m| m.baseline.is_some());
        fresh.then(|| baselines(&d)).flatten()
    })
    .ok_or("no baseline after the reboot")?;
    let report = aging_report(&d)?;
    let reason = match report.reboots.last().map(|r| &r.reason) {
        Some(RebootReason::Aging { metric, detector }) => {
            format!("{metric} ({})", detector.name())
        }
        _ => "? (?)".to_string(),
    };
    let history = aging_history(&d)?;
    let old_last = history
        .samples
        .iter()
        .rfind(|s| old_pid == s.pid)
        .cloned()
        .ok_or("no samples of the old daemon")?;
    let peak = |m: Metric| old_last.values.get(&m).copied().unwrap_or(0.0);
    let aged = [
        Metric::HeapInUseBytes,
        Metric::HeapResidentBytes,
        Metric::RssAnonBytes,
    ];
    let mut ratio = BTreeMap::new();
    let mut shed = BTreeMap::new();
    for m in aged {
        if let (Some(b), Some(a)) = (before.get(m.name()), after.get(m.name())) {
            ratio.insert(m.name().to_string(), a / b);
            let p = peak(m);
            if p > *b {
                shed.insert(m.name().to_string(), (p - a) / (p - b));
            }
        }
    }
    let lead_secs = ((LIVE_BUDGET_MIB << 20) as f64 - peak(Metric::HeapInUseBytes)) / rate;
    let verified = vms_verified(&d);
    eprintln!(
        "warmvm bench aging: live leak {mib_per_sec} MiB/s: warm reboot after {delay_secs:.1} s (pid {old_pid} -> {new_pid}), lead {lead_secs:.0} s"
    );
    Ok(Some(LiveRun {
        heap_mib_per_sec: mib_per_sec,
        delay_secs,
        reason,
        lead_secs,
        horizon_secs: LIVE_HORIZON_SECS,
        baseline_after_ratio: ratio,
        growth_shed: shed,
        vms_verified: verified,
    }))
}

#[derive(Serialize)]
pub(crate) struct LeakRow {
    pub(crate) metric: Metric,
    pub(crate) per_hour: f64,
    pub(crate) limit: f64,
    /// Hours from the start of the leak to the first warm reboot.
    pub(crate) delay_hours: Option<f64>,
    pub(crate) lead_hours: Option<f64>,
    pub(crate) horizon_hours: f64,
    pub(crate) reason: Option<String>,
    pub(crate) reboots_per_day: f64,
    pub(crate) exhaustions: u32,
    #[serde(skip)]
    pub(crate) trace: Vec<(f64, f64)>,
    #[serde(skip)]
    pub(crate) first_mark: Option<(f64, f64)>,
}

#[derive(Serialize)]
pub(crate) struct PolicyRow {
    pub(crate) policy: String,
    pub(crate) metric: Metric,
    pub(crate) per_hour: f64,
    pub(crate) reboots_per_day: f64,
    pub(crate) blackout_ms_per_day: f64,
    /// Times per day the resource runs out (the process and its VMs would be lost).
    pub(crate) exhaustions_per_day: f64,
}

pub fn aging(a: &AgingArgs) -> Result<ExitCode, Failure> {
    if !(a.days > 0.0 && a.leak_days > 0.0) {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "--days and --leak-days must be positive",
        ));
    }
    plot::register_font().map_err(|e| Failure::new(EXIT_HOST, e))?;
    std::fs::create_dir_all(&a.out)
        .map_err(|e| Failure::new(EXIT_HOST, format!("{}: {e}", a.out.display())))?;
    let exe = crate::cli::warmvm_exe()?;
    let scratch = std::env::temp_dir().join(format!("warmvm-bench-aging-{}", std::process::id()));
    let host_err = |e: String| Failure::new(EXIT_HOST, e);

    let recorded = record(&exe, &scratch.join("record"), a).map_err(host_err)?;
    let mut live = Vec::new();
    let mut live_note = None;
    let live_rates: &[f64] = if a.no_live {
        live_note = Some("skipped (--no-live)");
        &[]
    } else {
        &a.live_heap_mib_per_sec
    };
    for (i, rate) in live_rates.iter().enumerate() {
        match live_leak(&exe, &scratch.join(format!("live-{i}")), *rate).map_err(host_err)? {
            Some(r) => live.push(r),
            None => {
                live_note = Some("this build has no injected aging (build with --features fault-injection for the live leaks)");
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);

    // Accelerated time.
    let cfg = AgingConfig {
        period_ms: a.sim_period_secs * 1000,
        memory_budget_mib: Some(a.budget_mib),
        ..AgingConfig::default()
    };
    let budget = (a.budget_mib << 20) as f64;
    let mut limits: BTreeMap<Metric, f64> = BTreeMap::new();
    for m in [
        Metric::HeapInUseBytes,
        Metric::HeapResidentBytes,
        Metric::RssAnonBytes,
    ] {
        limits.insert(m, budget);
    }
    limits.insert(Metric::OpenFds, a.fd_limit as f64);
    limits.insert(Metric::Mappings, 65_530.0);
    let rec = &recorded.rec;
    let leaks: Vec<Leak> = a
        .heap_mib_per_hour
        .iter()
        .map(|r| Leak {
            metric: Metric::HeapInUseBytes,
            per_hour: r * (1u64 << 20) as f64,
        })
        .chain(a.fds_per_hour.iter().map(|r| Leak {
            metric: Metric::OpenFds,
            per_hour: *r,
        }))
        .collect();
    let leak_from = 1.0;
    // The non-aging run on one thread, the leaks on another (the host has two cores).
    let (quiet, runs) = std::thread::scope(|s| {
        let quiet = s.spawn(|| simulate(&cfg, &limits, rec, None, 0.0, a.days * 24.0, 0x5eed));
        let runs: Vec<_> = leaks
            .iter()
            .enumerate()
            .map(|(i, l)| {
                simulate(
                    &cfg,
                    &limits,
                    rec,
                    Some(*l),
                    leak_from,
                    a.leak_days * 24.0,
                    100 + i as u64,
                )
            })
            .collect();
        (quiet.join(), runs)
    });
    let quiet = quiet.map_err(|_| Failure::new(EXIT_HOST, "the simulation panicked"))?;
    let fp_per_30_days = quiet.reboots.len() as f64 / a.days * 30.0;
    eprintln!(
        "warmvm bench aging: {} simulated days without aging: {} false rejuvenations",
        a.days,
        quiet.reboots.len()
    );
    let rows: Vec<LeakRow> = leaks
        .iter()
        .zip(runs)
        .map(|(l, run)| {
            let ft = run.first_trigger.as_ref();
            LeakRow {
                metric: l.metric,
                per_hour: l.per_hour,
                limit: limits[&l.metric],
                delay_hours: ft.map(|f| f.delay_hours),
                lead_hours: ft.map(|f| f.lead_hours),
                horizon_hours: cfg.horizon_secs as f64 / 3600.0,
                reason: ft.map(|f| f.reason.clone()),
                reboots_per_day: run.reboots.len() as f64 / a.leak_days,
                exhaustions: run.exhaustions,
                first_mark: ft.map(|f| (leak_from + f.delay_hours, f.value)),
                trace: run.trace,
            }
        })
        .collect();

    // Time-based rejuvenation, computed: a leak that exhausts its resource in less time than
    // the schedule's period kills the process once per time-to-exhaustion.
    let mut policies = Vec::new();
    for (row, l) in rows.iter().zip(&leaks) {
        let base = rec.mean(l.metric).unwrap_or(0.0);
        let tte_hours = (row.limit - base) / l.per_hour;
        policies.push(PolicyRow {
            policy: "aging monitor".into(),
            metric: l.metric,
            per_hour: l.per_hour,
            reboots_per_day: row.reboots_per_day,
            blackout_ms_per_day: row.reboots_per_day * recorded.blackout_ms,
            exhaustions_per_day: row.exhaustions as f64 / a.leak_days,
        });
        for h in &a.schedule_hours {
            let exhaustions = if tte_hours < *h {
                24.0 / tte_hours
            } else {
                0.0
            };
            let reboots = if tte_hours < *h { 0.0 } else { 24.0 / h };
            policies.push(PolicyRow {
                policy: format!("every {h} h"),
                metric: l.metric,
                per_hour: l.per_hour,
                reboots_per_day: reboots,
                blackout_ms_per_day: reboots * recorded.blackout_ms,
                exhaustions_per_day: exhaustions,
            });
        }
    }

    let plots = draw_plots(a, rec, &rows, &policies, &live).map_err(host_err)?;
    let caught = rows
        .iter()
        .all(|r| r.exhaustions == 0 && r.delay_hours.is_some());
    let lead_ok = rows
        .iter()
        .all(|r| r.lead_hours.is_some_and(|l| l >= r.horizon_hours));
    let doc = json!({
        "host": host_facts(),
        "recording": {
            "period_ms": rec.period_ms,
            "samples": rec.samples,
            "vms": a.vms,
            "mean": rec.series.keys().map(|m| (m.name(), rec.mean(*m))).collect::<BTreeMap<_, _>>(),
        },
        "warm_reboot_blackout_ms": recorded.blackout_ms,
        "live": live,
        "live_note": live_note,
        "simulation": {
            "period_secs": a.sim_period_secs,
            "config": cfg,
            "budget_mib": a.budget_mib,
            "fd_limit": a.fd_limit,
        },
        "false_positives": {
            "days": a.days,
            "rejuvenations": quiet.reboots.len(),
            "per_30_days": fp_per_30_days,
            "reasons": quiet.reboots.iter().map(|t| t.reason.clone()).collect::<Vec<_>>(),
        },
        "leaks": rows,
        "policies": policies,
        "goals": {
            "every_leak_caught_before_exhaustion": caught,
            "lead_time_at_least_the_horizon": lead_ok,
            "false_positives_at_most_1_per_30_days": fp_per_30_days <= 1.0,
            "live_growth_shed_95_percent": live.iter().all(|l| l.growth_shed.values().all(|s| *s >= 0.95)),
            "live_vms_verified": live.iter().all(|l| l.vms_verified),
        },
        "plots": plots,
    });
    if a.json {
        warmvm_cli_common::output::print_json(&doc);
    } else {
        print_tables(&doc, &rows, &policies, &live);
    }
    Ok(ExitCode::SUCCESS)
}
