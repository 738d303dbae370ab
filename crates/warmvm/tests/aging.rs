//! Software aging, end to end: a daemon whose heap or fds leak (injected through the test
//! build's `PUT /v1/debug/aging`) notices the trend, warm-reboots itself before the limit,
//! every VM verifies on the other side, the new daemon's resources are back at the old
//! one's post-start baseline, and the aging history and the reboot (with its reason) are
//! carried over. In dry-run mode the same leak only raises an alert.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_testkit::*;

/// The daemon's config: a fast monitor (200 ms) with a 30 s horizon.
fn config(dir: &std::path::Path, extra: &str) -> String {
    let path = dir.join("aging.toml");
    std::fs::write(
        &path,
        format!(
            "[aging]\nperiod_ms = 200\nwindow = 40\nmin_samples = 15\nbaseline_samples = 5\n\
             horizon_secs = {HORIZON_SECS}\nmax_per_hour = 5\n{extra}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

const HORIZON_SECS: f64 = 30.0;

fn daemon_with_vms(tag: &str, aging: &str, nofile: Option<u64>) -> Daemon {
    let dir = scratch(tag);
    let cfg = config(&dir, aging);
    let d = Daemon::start_limited(&dir, &["--config", &cfg], &[], nofile);
    d.create_reference_vms(&["a1", "a2"]);
    d
}

fn aging(d: &Daemon) -> Value {
    d.client()
        .call("GET", "/v1/aging", None)
        .expect("GET /v1/aging")
}

/// The baseline of `metric` once the monitor has recorded it for the current VM set.
fn baseline(d: &Daemon, metric: &str) -> f64 {
    let mut b = None;
    let ok = wait_until(30, || {
        b = aging(d)["metrics"].as_array().and_then(|ms| {
            ms.iter()
                .find(|m| m["metric"] == metric)
                .and_then(|m| m["baseline"].as_f64())
        });
        b.is_some()
    });
    assert!(ok, "no baseline for {metric}\n{}", d.log());
    b.unwrap()
}

fn inject(d: &Daemon, body: Value) {
    d.client()
        .raw("PUT", "/v1/debug/aging", Some(body.to_string().as_bytes()))
        .expect("injected");
}

/// The daemon now serving the socket, once it is another process than `old_pid`.
fn new_daemon_pid(d: &Daemon, old_pid: u32, secs: u64) -> Option<u32> {
    let mut pid = old_pid;
    wait_until(secs, || {
        pid = d
            .client()
            .status()
            .ok()
            .and_then(|s| s["pid"].as_u64())
            .unwrap_or(old_pid as u64) as u32;
        pid != old_pid
    })
    .then_some(pid)
}

/// Leak at `rate` per second (the injection's `field`), and check that the daemon
/// rejuvenates itself with the horizon still ahead and comes back to its baseline.
fn a_leak_is_rejuvenated_before_the_limit(
    tag: &str,
    field: &str,
    rate: f64,
    limit: f64,
    aged: &[&str],
    nofile: Option<u64>,
    aging_cfg: &str,
) {
    if !warmvm_testkit::kvm_available(tag) {
        return;
    }
    let mut d = daemon_with_vms(tag, aging_cfg, nofile);
    let before: Vec<(String, f64)> = aged
        .iter()
        .map(|m| (m.to_string(), baseline(&d, m)))
        .collect();
    let old_pid = d.pid;
    let started = Instant::now();
    inject(&d, json!({ field: rate as u64 }));
    let new_pid = new_daemon_pid(&d, old_pid, 120)
        .unwrap_or_else(|| panic!("no rejuvenation within 120 s\n{}", d.log()));
    let delay = started.elapsed();
    d.follow_reboot(new_pid);

    // Why, and carried over: the reboot history and the old daemon's samples.
    let report = aging(&d);
    let reboot = report["reboots"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .expect("the reboot is recorded");
    assert_eq!(reboot["reason"]["kind"], "aging", "{reboot}");
    let metric = reboot["reason"]["metric"].as_str().unwrap_or_default();
    assert_eq!(reboot["from_pid"], old_pid, "{reboot}");
    assert_eq!(reboot["to_pid"], new_pid, "{reboot}");
    let history = d
        .client()
        .call("GET", "/v1/aging/history", None)
        .expect("history");
    let old_samples: Vec<&Value> = history["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| s["pid"] == old_pid)
        .collect();
    assert!(
        old_samples.len() > 10,
        "the old daemon's samples are carried over"
    );

    // Before the limit, with at least the horizon ahead at the leak's rate: the leaking
    // resource's last value in the old daemon.
    let leaking = aged[0];
    let last = old_samples
        .last()
        .and_then(|s| s["values"][leaking].as_f64())
        .expect("the old daemon's last sample");
    let lead_secs = (limit - last) / rate;
    eprintln!(
        "{tag}: trigger {metric} ({}), {:.1} s after the leak began; {leaking} at {last:.0} of {limit:.0}: lead time {lead_secs:.1} s (horizon {HORIZON_SECS} s)",
        reboot["reason"]["detector"],
        delay.as_secs_f64()
    );
    assert!(
        aged.contains(&metric),
        "rejuvenated for {metric}, not one of {aged:?}\n{}",
        d.log()
    );
    assert!(
        lead_secs >= HORIZON_SECS,
        "lead time {lead_secs:.1} s < horizon"
    );

    // Every VM runs on and verifies in the new daemon.
    let moved = wait_until(30, || {
        figures(&d).iter().all(|v| v.1 == "running" && v.2 > 0)
    });
    let now = figures(&d);
    assert!(moved && now.len() == 2, "{now:?}\n{}", d.log());
    let counters: Vec<u64> = now.iter().map(|v| v.2).collect();
    assert!(
        wait_until(30, || figures(&d)
            .iter()
            .zip(&counters)
            .all(|(v, c)| v.2 > *c)),
        "the guests stopped making progress\n{}",
        d.log()
    );
    for vm in figures(&d) {
        assert_eq!(vm.3, 0, "{vm:?} reports corruption\n{}", d.log());
    }

    // Back to the baseline: of what each aged resource had grown above the old daemon's
    // post-start baseline by its last sample, at least 95% is gone in the new daemon's own
    // post-start baseline. (Two processes' allocators do not match to the kilobyte: a new
    // daemon's heap differs by a few KiB and its anonymous RSS by ~150 KiB from a fresh
    // one's even without a leak, so "within 5% of a 260 KiB heap" would test noise.)
    let mut not_shed = Vec::new();
    for (m, old) in &before {
        let new = baseline(&d, m);
        let peak = old_samples
            .last()
            .and_then(|s| s["values"][m.as_str()].as_f64())
            .unwrap_or(*old);
        let shed = if peak > *old {
            (peak - new) / (peak - old)
        } else {
            1.0
        };
        eprintln!(
            "{tag}: {m} baseline {old:.0} before, peak {peak:.0}, baseline {new:.0} after the rejuvenation ({:.3}x the old baseline; {:.1}% of the growth shed)",
            new / old,
            shed * 100.0
        );
        if shed < 0.95 {
            not_shed.push(format!("{m}: baseline {old}, peak {peak}, {new} after"));
        }
    }
    assert!(not_shed.is_empty(), "{not_shed:?}");
    d.terminate_adopted();
}

#[test]
fn a_heap_leak_makes_the_daemon_rejuvenate_itself_before_its_memory_budget() {
    // 4 MiB/s against a 256 MiB budget: about a minute to exhaustion from the start.
    a_leak_is_rejuvenated_before_the_limit(
        "aging-heap",
        "heap_bytes_per_sec",
        (4u64 << 20) as f64,
        (256u64 << 20) as f64,
        &["heap_in_use_bytes", "heap_resident_bytes", "rss_anon_bytes"],
        None,
        "memory_budget_mib = 256",
    );
}

#[test]
fn an_fd_leak_makes_the_daemon_rejuvenate_itself_before_rlimit_nofile() {
    // 10 fds/s against a soft limit of 512: under a minute to exhaustion.
    a_leak_is_rejuvenated_before_the_limit(
        "aging-fds",
        "fds_per_sec",
        10.0,
        512.0,
        &["open_fds"],
        Some(512),
        "",
    );
}

#[test]
fn in_dry_run_a_leak_only_raises_an_alert() {
    if !warmvm_testkit::kvm_available("aging dry run") {
        return;
    }
    let d = daemon_with_vms("aging-dry", "memory_budget_mib = 256\ndry_run = true", None);
    baseline(&d, "heap_in_use_bytes");
    let pid = d.pid;
    inject(&d, json!({ "heap_bytes_per_sec": 4u64 << 20 }));
    let mut alert = Value::Null;
    let alerted = wait_until(60, || {
        alert = aging(&d)["events"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["action"] == "alert").cloned())
            .unwrap_or(Value::Null);
        !alert.is_null()
    });
    assert!(alerted, "no alert\n{}", d.log());
    assert_eq!(alert["reason"]["kind"], "aging", "{alert}");
    // A few more periods: still the same process, no reboot recorded, the alert counted.
    std::thread::sleep(Duration::from_secs(2));
    let report = aging(&d);
    assert_eq!(d.client().status().unwrap()["pid"], pid);
    assert_eq!(report["reboots"].as_array().map(Vec::len), Some(0));
    assert!(!report["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "reboot"));
    let metrics = String::from_utf8(
        d.client()
            .raw("GET", "/metrics", None)
            .expect("metrics")
            .body,
    )
    .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("warmvm_aging_decisions_total{action=\"alert\"")),
        "{metrics}"
    );
    // `warmvm aging` shows the alert and what comes next.
    let out = d.cli(&["aging"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("last action: alert for aging ("), "{text}");
    assert!(text.contains("next action: alert (dry run)"), "{text}");
    assert!(text.contains("heap_in_use_bytes"), "{text}");
    assert!(!log_says_rebooted(&d), "{}", d.log());
}

fn log_says_rebooted(d: &Daemon) -> bool {
    d.log().contains("rejuvenating by a warm reboot")
}

/// The other kinds of injected aging show in the samples: leaked threads, a fragmented heap
/// (the allocator holds more than the program uses), and slower API requests.
#[test]
fn injected_threads_fragmentation_and_latency_show_in_the_samples() {
    if !warmvm_testkit::kvm_available("aging kinds") {
        return;
    }
    let d = daemon_with_vms("aging-kinds", "dry_run = true", None);
    let value = |m: &str| -> f64 {
        aging(&d)["metrics"]
            .as_array()
            .and_then(|ms| ms.iter().find(|x| x["metric"] == m))
            .and_then(|x| x["value"].as_f64())
            .unwrap_or(0.0)
    };
    baseline(&d, "threads");
    let threads = value("threads");
    let gap = value("heap_resident_bytes") - value("heap_in_use_bytes");
    inject(
        &d,
        json!({ "threads_per_sec": 20, "fragment_bytes_per_sec": 8u64 << 20, "latency_ms": 5 }),
    );
    // Enough requests for a p99 (from 100 on), each at least 5 ms now.
    for _ in 0..120 {
        d.client().status().expect("status");
    }
    let grew = wait_until(30, || {
        value("threads") >= threads + 20.0
            && value("heap_resident_bytes") - value("heap_in_use_bytes")
                >= gap + (4u64 << 20) as f64
            && value("api_latency_p99_ms") >= 5.0
    });
    assert!(
        grew,
        "threads {threads} -> {}, fragmentation {gap} -> {}, p99 {} ms\n{}",
        value("threads"),
        value("heap_resident_bytes") - value("heap_in_use_bytes"),
        value("api_latency_p99_ms"),
        d.log()
    );
}

/// Time-based rejuvenation, held and released from the CLI: while on hold the schedule's
/// trigger is recorded as skipped; once released the daemon warm-reboots with the reason
/// `schedule`, and the hold's state and the history cross the reboot.
#[test]
fn the_schedule_waits_for_a_hold_to_be_released() {
    if !warmvm_testkit::kvm_available("aging schedule") {
        return;
    }
    let mut d = daemon_with_vms("aging-sched", "schedule_secs = 10\nhold = true", None);
    let old_pid = d.pid;
    let mut skipped = Value::Null;
    assert!(
        wait_until(30, || {
            skipped = aging(&d)["events"]
                .as_array()
                .and_then(|e| e.iter().find(|e| e["action"] == "skip").cloned())
                .unwrap_or(Value::Null);
            !skipped.is_null()
        }),
        "no skipped trigger\n{}",
        d.log()
    );
    assert_eq!(skipped["reason"]["kind"], "schedule", "{skipped}");
    assert!(
        skipped["detail"].as_str().unwrap_or("").contains("on hold"),
        "{skipped}"
    );
    assert_eq!(d.client().status().unwrap()["pid"], old_pid);
    let out = d.cli(&["aging", "release", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let released: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(released["hold"], false, "{released}");
    let new_pid = new_daemon_pid(&d, old_pid, 30)
        .unwrap_or_else(|| panic!("no scheduled rejuvenation\n{}", d.log()));
    d.follow_reboot(new_pid);
    let report = aging(&d);
    let reboot = report["reboots"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(reboot["reason"]["kind"], "schedule", "{reboot}");
    assert_eq!(
        report["hold"], false,
        "the released hold crosses the reboot"
    );
    assert_eq!(
        report["events"].as_array().unwrap().last().unwrap()["action"],
        "reboot",
        "{report}"
    );
    // Put it on hold again before it reboots once more, then stop it.
    let out = d.cli(&["aging", "hold"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("hold yes"));
    d.terminate_adopted();
}

/// The largest state a daemon hands its successor: the aging history at the most samples
/// the settings allow (100,000), and the events and reboot history at their bounds. It is
/// far more than one control message can hold; the warm reboot must go through all the
/// same, with every sample, event and reboot carried over and the VMs running on.
#[test]
fn a_daemon_with_the_largest_aging_history_still_warm_reboots() {
    if !warmvm_testkit::kvm_available("aging history at its bound") {
        return;
    }
    const HISTORY: usize = 100_000;
    let mut d = daemon_with_vms(
        "aging-max",
        &format!("history = {HISTORY}\nhold = true"),
        None,
    );
    let old_pid = d.pid;
    inject(&d, json!({ "fill_to_bounds": true }));
    let before = aging(&d);
    assert_eq!(before["history_len"], HISTORY, "{}", before["history_len"]);
    let events = before["events"].as_array().map_or(0, Vec::len);
    let reboots = before["reboots"].as_array().map_or(0, Vec::len);
    let report = d
        .client()
        .reboot("warm", None)
        .unwrap_or_else(|e| panic!("the warm reboot failed: {e}\n{}", d.log()));
    let new_pid = report["new_pid"].as_u64().expect("new_pid") as u32;
    assert!(report.get("errors").is_none(), "{report}");
    d.follow_reboot(new_pid);
    let after = aging(&d);
    assert_eq!(after["history_len"], HISTORY, "{}", after["history_len"]);
    assert!(
        after["events"].as_array().map_or(0, Vec::len) >= events,
        "{}",
        after["events"]
    );
    // Bounded: the new record pushed the oldest out.
    let after_reboots = after["reboots"].as_array().expect("reboots");
    assert_eq!(after_reboots.len(), reboots, "{after}");
    let last = after_reboots.last().expect("the reboot is recorded");
    assert_eq!(last["from_pid"], old_pid, "{last}");
    assert_eq!(last["to_pid"], new_pid, "{last}");
    let history = d
        .client()
        .call("GET", "/v1/aging/history", None)
        .expect("history");
    let carried = history["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| s["pid"] == old_pid)
        .count();
    assert!(
        carried >= HISTORY - 100,
        "{carried} of the old daemon's samples carried over"
    );
    assert!(
        wait_until(30, || figures(&d)
            .iter()
            .all(|v| v.1 == "running" && v.2 > 0)),
        "{:?}\n{}",
        figures(&d),
        d.log()
    );
    d.terminate_adopted();
}

/// A bad `[aging]` table stops the daemon before it starts anything: one line, status 2.
#[test]
fn a_bad_aging_setting_is_refused_at_start_up() {
    let dir = scratch("aging-bad");
    for (body, needle) in [
        ("[aging]\nperiod_ms = 1\n", "period_ms = 1 is out of range"),
        ("[aging]\nperod_ms = 100\n", "unknown field `perod_ms`"),
        (
            "[aging]\nmaintenance_windows = [\"9-5\"]\n",
            "maintenance window \"9-5\"",
        ),
    ] {
        let cfg = dir.join("bad.toml");
        std::fs::write(&cfg, body).unwrap();
        let out = refused(
            daemon_command(&dir.join("s.sock"))
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--config")
                .arg(&cfg),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!dir.join("s.sock").exists(), "nothing was started");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A warm reboot of a daemon configured `[aging] extra`, with `fault` (if any) making the
/// handed-over aging state unreadable to the new daemon; returns the new daemon's report,
/// the old daemon's pid and `warmvm aging`'s text.
fn after_a_warm_reboot(
    tag: &str,
    extra: &str,
    fault: Option<&str>,
) -> (Daemon, Value, u32, String) {
    let dir = scratch(tag);
    let cfg = config(&dir, extra);
    let env: Vec<(&str, &str)> = fault
        .map(|f| vec![("WARMVM_FAULT_AGING_HANDOVER", f)])
        .unwrap_or_default();
    let mut d = Daemon::start_with_env(&dir, &["--config", &cfg], &env);
    let before = aging(&d);
    assert_eq!(before["settings_source"], "configured", "{before}");
    let old_pid = d.pid;
    let r = d.client().reboot("warm", None).expect("warm reboot");
    let new_pid = r["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    let report = aging(&d);
    let out = d.cli(&["aging"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (d, report, old_pid, text)
}

/// The operator's aging settings survive a warm reboot, and the new daemon says where its
/// settings came from: handed over with the aging state (inherited from the old pid).
#[test]
fn a_warm_reboot_keeps_the_configured_dry_run_and_says_it_is_inherited() {
    if !warmvm_testkit::kvm_available("aging settings inherited") {
        return;
    }
    let (mut d, r, old_pid, text) = after_a_warm_reboot("aging-inherit", "dry_run = true", None);
    assert_eq!(r["dry_run"], true, "{r}");
    assert_eq!(r["enabled"], true, "{r}");
    assert_eq!(r["period_ms"], 200, "{r}");
    assert_eq!(r["settings_source"], "inherited", "{r}");
    assert_eq!(r["settings_from_pid"], old_pid, "{r}");
    assert!(
        text.contains(&format!("settings: inherited from pid {old_pid}")),
        "{text}"
    );
    assert!(d.log().contains("aging monitor settings"), "{}", d.log());
    d.terminate_adopted();
}

/// A new daemon that cannot read the aging state still knows the configuration the old one
/// passed on: `enabled = false` stays off (the defaults would reboot by themselves).
#[test]
fn unreadable_aging_state_keeps_the_configured_settings_passed_on() {
    if !warmvm_testkit::kvm_available("aging settings passed on") {
        return;
    }
    let (mut d, r, _, text) =
        after_a_warm_reboot("aging-passed", "enabled = false", Some("unreadable"));
    assert_eq!(r["enabled"], false, "{r}");
    assert_eq!(r["period_ms"], 200, "{r}");
    assert_eq!(r["settings_source"], "configured", "{r}");
    assert_eq!(r["settings_from_pid"], Value::Null, "{r}");
    assert_eq!(r["history_len"], 0, "{r}");
    assert!(text.contains("settings: configured"), "{text}");
    assert!(text.contains("aging monitor: off"), "{text}");
    assert!(
        d.log()
            .contains("the previous daemon's aging state is unusable"),
        "{}",
        d.log()
    );
    d.terminate_adopted();
}

/// Taking over from a daemon that handed over neither a readable state nor the configured
/// settings (an older build): the settings are unknown, so the monitor only alerts (a dry run,
/// whatever the defaults say), starts an empty history, and says so.
#[test]
fn with_neither_state_nor_settings_handed_over_the_monitor_only_alerts() {
    if !warmvm_testkit::kvm_available("aging settings unknown") {
        return;
    }
    let (mut d, r, _, text) =
        after_a_warm_reboot("aging-unknown", "enabled = false", Some("old-build"));
    assert_eq!(r["dry_run"], true, "{r}");
    assert_eq!(r["settings_source"], "unknown", "{r}");
    assert_eq!(r["history_len"], 0, "{r}");
    assert!(
        r["next_action"].as_str().unwrap().contains("dry run"),
        "{r}"
    );
    assert!(text.contains("settings: unknown"), "{text}");
    assert!(text.contains("dry run"), "{text}");
    assert!(
        d.log()
            .contains("neither a readable aging state nor the configured settings"),
        "{}",
        d.log()
    );
    d.terminate_adopted();
}
