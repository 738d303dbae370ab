//! Guests that attack their VMM beside guests that work: spamming the serial line, ports no
//! device decodes and MMIO (virtio registers and addresses nothing decodes) as fast as their
//! exits allow, writing garbage into their virtio-blk and virtio-net rings round after round,
//! and a console log on a full disk. The normal VMs keep verifying their memory, the API
//! keeps answering about as fast as before the attack, the hostile guests' console logs stay
//! within their cap, every garbage ring fails its device (DEVICE_NEEDS_RESET, counted), and
//! what was dropped shows in the metrics; through a warm reboot too. The daemon runs in a
//! network namespace of the test's own, where it creates the hostile guests' TAPs.
//! WARMVM_HOSTILE_SECS sets the time (default 20; 600 for the issue's ten-minute figure).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use warmvm_testkit::*;

/// The console cap and rate are the lowest the daemon takes (a 4 KiB burst is its minimum
/// too), so that even a guest starved of CPU outruns them: on the shared 2-core host, under
/// a load of 25, a console spammer got out only about 500 bytes a second. The rate limit
/// must engage in the three quarters of the run after the reboot (output above RATE + 4 KiB
/// over 15 s: about 340 B/s) and the log must reach its cap (the first burst alone does).
const CAP: u64 = 4 << 10;
const RATE: &str = "64";

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
    if !warmvm_testkit::kvm_available("hostile_guests_stay_within_their_bounds_beside_normal_ones")
    {
        return;
    }
    let secs: u64 = std::env::var("WARMVM_HOSTILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = scratch("hostile-guests");
    let ns = Netns::new("hostile", "10.78.0.1/24");
    let cap = CAP.to_string();
    let mut d = Daemon::start_in_netns_with(
        &dir,
        &ns.name,
        &[
            "--console-log-max-bytes",
            &cap,
            "--console-rate",
            RATE,
            "--console-burst",
            "4096",
        ],
    );
    // The attacked devices' disks: zeros (the hostile guests read nothing from them).
    let disk = |name: &str| {
        let path = dir.join(format!("{name}.img"));
        std::fs::write(&path, vec![0u8; 64 * 512]).unwrap();
        json!([{"path": path, "cache": "writeback"}])
    };
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
        json!({"name": "spam-mmio", "memory_mib": 32, "cmdline": "hostile=mmio",
               "disks": disk("spam-mmio"), "nets": [{"tap": "hmmio0"}]}),
        json!({"name": "bad-rings", "memory_mib": 32, "cmdline": "hostile=rings",
               "disks": disk("bad-rings"), "nets": [{"tap": "hrings0"}]}),
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
        for name in ["spam-console", "spam-both", "spam-mmio", "bad-rings"] {
            let len = file_len(&log_of(name));
            assert!(
                len <= CAP,
                "{name}'s log has {len} bytes, over its cap {CAP}"
            );
            assert!(file_len(&rotated_of(name)) <= CAP);
            max_log = max_log.max(len);
        }
        if !rebooted && start.elapsed() > Duration::from_secs(secs / 4) {
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
    let mmio_unknown = m(
        "warmvm_vm_unknown_accesses_total",
        r#"vm="spam-mmio",kind="mmio_read""#,
    ) + m(
        "warmvm_vm_unknown_accesses_total",
        r#"vm="spam-mmio",kind="mmio_write""#,
    );
    assert!(mmio_unknown > 0, "{metrics}");
    let failures = |vm: &str, device: &str| {
        m(
            "warmvm_virtio_device_failures_total",
            &format!(r#"vm="{vm}",device="{device}""#),
        )
    };
    // Random register writes break the protocol: its devices fail (and recover on resets).
    let mmio_failures = failures("spam-mmio", "disk0") + failures("spam-mmio", "net0");
    assert!(mmio_failures > 0, "{metrics}");
    // Every garbage ring the guest wrote since the reboot failed its device, on both kinds.
    let (disk_failures, net_failures) = (
        failures("bad-rings", "disk0"),
        failures("bad-rings", "net0"),
    );
    assert!(disk_failures > 0 && net_failures > 0, "{metrics}");
    let rings_console = std::fs::read_to_string(log_of("bad-rings")).unwrap_or_default();
    let report = rings_console
        .lines()
        .rfind(|l| l.contains("hostile rings:"))
        .unwrap_or_else(|| panic!("bad-rings never reported:\n{rings_console}"));
    let field = |after: &str| -> u64 {
        let at = report.find(after).unwrap_or_else(|| panic!("{report}")) + after.len();
        report[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{report}"))
    };
    let rounds = field("hostile rings: ");
    assert!(rounds >= 16, "{report}");
    assert!(
        report.contains(", 0 did not"),
        "a garbage ring did not fail its device: {report}"
    );
    assert!(
        field("disk0 ") > 0 && field("net0 ") > 0,
        "both devices were attacked: {report}"
    );
    for vm in ["spam-mmio", "bad-rings"] {
        assert_eq!(c.show(vm).unwrap()["state"], "running", "{vm}");
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    let base_p50 = baseline[baseline.len() / 2];
    // Loose on purpose (a shared, noisy host; one warm reboot inside the run): an API
    // starved by the hostile guests would be seconds, not a few times slower.
    assert!(
        p50 <= base_p50 * 10 + Duration::from_millis(100),
        "GET /v1/vms/calm-1 p50 {p50:?} under attack, {base_p50:?} before"
    );
    eprintln!(
        "GET /v1/vms/calm-1 beside the normal VMs alone: p50 {:.1} ms, max {:.1} ms of {}",
        baseline[baseline.len() / 2].as_secs_f64() * 1e3,
        baseline.last().unwrap().as_secs_f64() * 1e3,
        baseline.len()
    );
    eprintln!(
        "{secs} s, 5 hostile guests + a full disk beside 2 normal VMs, one warm reboot: \
         GET /v1/vms/calm-1 p50 {:.1} ms, max {:.1} ms of {} requests; spam-console log at most \
         {max_log} bytes (cap {CAP}), {rotations} rotations and {rate_dropped} bytes rate-limited \
         since the reboot; full-disk: {full_errors} failed writes, {full_dropped} bytes dropped; \
         spam-ports: {unknown} unknown port writes; spam-mmio: {mmio_unknown} unknown MMIO \
         accesses, {mmio_failures} device failures; bad-rings: {disk_failures} disk0 and \
         {net_failures} net0 failures since the reboot, guest's last report: {report}",
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
