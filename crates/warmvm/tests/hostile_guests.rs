//! Guests that attack their VMM beside guests that work: spamming the serial line and ports
//! no device decodes as fast as their exits allow, and a console log on a full disk. The
//! normal VMs keep verifying their memory, the API keeps answering, the hostile guests'
//! console logs stay within their cap, and what was dropped shows in the metrics; through a
//! warm reboot too. WARMVM_HOSTILE_SECS sets the time (default 20; 600 for the issue's
//! ten-minute figure).

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

const CAP: u64 = 16 << 10;

/// The value of `name` with every one of `labels` (comma-separated `k="v"`, any order).
fn metric(text: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_once("} "))
        .find(|(have, _)| {
            labels
                .split(',')
                .all(|want| have.split(',').any(|h| h == want))
        })
        .unwrap_or_else(|| panic!("no {name}{{{labels}}} in the metrics"))
        .1
        .parse::<f64>()
        .unwrap() as u64
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[test]
fn hostile_guests_stay_within_their_bounds_beside_normal_ones() {
    if !warmvm_vmm::testing::kvm_available(
        "hostile_guests_stay_within_their_bounds_beside_normal_ones",
    ) {
        return;
    }
    let secs: u64 = std::env::var("WARMVM_HOSTILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = scratch("hostile-guests");
    let cap = CAP.to_string();
    let mut d = Daemon::start(
        &dir,
        &[
            "--console-log-max-bytes",
            &cap,
            "--console-rate",
            "1024",
            "--console-burst",
            "4096",
        ],
    );
    let c = d.client();
    let vms: Vec<Value> = vec![
        reference_vm("calm-1"),
        reference_vm("calm-2"),
        json!({"name": "spam-console", "memory_mib": 16, "vcpus": 2, "cmdline": "hostile=console"}),
        json!({"name": "spam-ports", "memory_mib": 16, "cmdline": "hostile=ports"}),
        json!({"name": "spam-both", "memory_mib": 16, "cmdline": "hostile=both"}),
        // Its console log is on a "full disk": every write fails with ENOSPC.
        json!({"name": "full-disk", "memory_mib": 16, "cmdline": "hostile=console",
               "console_log": "/dev/full"}),
    ];
    let create = |vm: &Value| {
        c.create(&serde_json::from_value(vm.clone()).unwrap())
            .unwrap_or_else(|e| panic!("{vm}: {e}"));
    };
    // The API's latency with the normal VMs alone, as the baseline.
    create(&vms[0]);
    create(&vms[1]);
    let mut baseline = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        c.show("calm-1").unwrap();
        baseline.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    baseline.sort();
    for vm in &vms[2..] {
        create(vm);
    }
    let state_dir = d.dir.join("state");
    let log_of = |name: &str| state_dir.join(name).join("console.log");
    let rotated_of = |name: &str| state_dir.join(name).join("console.log.1");

    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut rebooted = false;
    let mut max_log = 0u64;
    let mut before = (counter(&c.show("calm-1").unwrap()), 0u64);
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let vm = d.client().show("calm-1").unwrap();
        latencies.push(t.elapsed());
        assert_eq!(vm["guest"]["mismatches"], 0, "{vm}");
        for name in ["spam-console", "spam-both"] {
            let len = file_len(&log_of(name));
            assert!(
                len <= CAP,
                "{name}'s log has {len} bytes, over its cap {CAP}"
            );
            assert!(file_len(&rotated_of(name)) <= CAP);
            max_log = max_log.max(len);
        }
        if !rebooted && start.elapsed() > Duration::from_secs(secs / 2) {
            let report = d.client().reboot("warm", None).unwrap();
            d.follow_reboot(report["new_pid"].as_u64().unwrap() as u32);
            rebooted = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(rebooted);
    let c = d.client();
    for name in ["calm-1", "calm-2"] {
        let vm = c.show(name).unwrap();
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["guest"]["mismatches"], 0, "{vm}");
        assert!(counter(&vm) > 0, "{vm}");
    }
    before.1 = counter(&c.show("calm-1").unwrap());
    assert!(before.1 > before.0, "calm-1 stopped verifying: {before:?}");
    let metrics = c.metrics().unwrap();
    let m = |name: &str, labels: &str| metric(&metrics, name, labels);
    // The counters are the new daemon's (since the reboot): the bounds held there too.
    let rate_dropped = m(
        "warmvm_vm_console_dropped_bytes_total",
        r#"vm="spam-console",reason="rate_limit""#,
    );
    let rotations = m("warmvm_vm_console_rotations_total", r#"vm="spam-console""#);
    let full_errors = m("warmvm_vm_console_write_errors_total", r#"vm="full-disk""#);
    let full_dropped = m(
        "warmvm_vm_console_dropped_bytes_total",
        r#"vm="full-disk",reason="write_error""#,
    );
    let unknown = m(
        "warmvm_vm_unknown_accesses_total",
        r#"vm="spam-ports",kind="pio_write""#,
    );
    assert!(rate_dropped > 0, "{metrics}");
    // Over the whole run (the counters above start again at the reboot), the log reached
    // its cap and was rotated.
    let rotated = file_len(&rotated_of("spam-console"));
    assert!(
        rotated > 0 && rotated <= CAP,
        "console.log.1 has {rotated} bytes"
    );
    assert!(full_errors > 0 && full_dropped > 0, "{metrics}");
    assert!(unknown > 0, "{metrics}");
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    eprintln!(
        "GET /v1/vms/calm-1 beside the normal VMs alone: p50 {:.1} ms, max {:.1} ms of {}",
        baseline[baseline.len() / 2].as_secs_f64() * 1e3,
        baseline.last().unwrap().as_secs_f64() * 1e3,
        baseline.len()
    );
    eprintln!(
        "{secs} s, 3 spamming guests + a full disk beside 2 normal VMs, one warm reboot: \
         GET /v1/vms/calm-1 p50 {:.1} ms, max {:.1} ms of {} requests; spam-console log at most \
         {max_log} bytes (cap {CAP}), {rotations} rotations and {rate_dropped} bytes rate-limited \
         since the reboot; full-disk: {full_errors} failed writes, {full_dropped} bytes dropped; \
         spam-ports: {unknown} unknown port writes",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        latencies.len()
    );
    let log = d.log();
    assert!(
        log.contains("console output dropped: its log cannot be written"),
        "the full disk was not logged"
    );
    // Rate-limited logging: at most one line per 10 s per VM and daemon (plus one each).
    let lines = log
        .matches("console output dropped: its log cannot be written")
        .count() as u64;
    assert!(
        lines <= 2 * (secs / 10 + 2),
        "{lines} log lines in {secs} s"
    );
    d.terminate_adopted();
}
