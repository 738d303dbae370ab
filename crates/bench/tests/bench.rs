//! `warmvm bench warm-reboot` on a tiny matrix: it measures the daemon's reboot path (PUT
//! /v1/reboot, figures from the daemon's reports) and the demo's, says which cell is which,
//! records the host's facts, and reports progress on standard error as plain lines when
//! standard error is not a terminal.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn warm_reboot_bench_measures_both_paths_with_progress() {
    if !warmvm_vmm::testing::kvm_available("warm_reboot_bench") {
        return;
    }
    let out = Command::new(warmvm())
        .args([
            "bench",
            "warm-reboot",
            "--json",
            "--vms",
            "1",
            "--memory-mib",
            "16",
        ])
        .args([
            "--reboots",
            "2",
            "--reboot-interval-ms",
            "50",
            "--gap-window-ms",
            "100",
        ])
        .args(["--guest-cmdline", "quiet interval_ms=0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(doc["ok"], true, "{doc:#}");
    let cells = doc["cells"].as_array().unwrap();
    let paths: Vec<&str> = cells.iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["daemon", "demo"], "{doc:#}");
    for c in cells {
        assert_eq!(c["reboots"], 2, "{c:#}");
        assert!(
            c["host_blackout_ms"]["host_p50_ms"].as_f64().unwrap() > 0.0,
            "{c:#}"
        );
    }
    // The daemon's cell times the API request the operator sends.
    assert!(cells[0]["request_ms"]["p50_ms"].as_f64().unwrap() > 0.0);
    let host = &doc["host"];
    assert!(!host["kernel"].as_str().unwrap().is_empty());
    assert!(host["cores"].as_u64().unwrap() >= 1);
    assert_eq!(host["load_average"].as_array().unwrap().len(), 3);
    assert!(host["cpu_model"].is_string(), "{host}");
    // Progress: one plain line per step (2 daemon reboots + 1 demo chain), no escapes.
    let steps: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warmvm bench warm-reboot: ["))
        .collect();
    assert_eq!(steps.len(), 3, "{stderr}");
    assert!(
        steps[0].contains("[1/3] daemon: 1 VMs x 16 MiB, reboot 1/2"),
        "{stderr}"
    );
    assert!(steps[2].contains("[3/3] demo:"), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr}"
    );
}

/// `warmvm bench cache`, short: a guest serving HTTP in the bench's own network namespace,
/// at a fixed rate (httperf) across a warm, a saved and a cold reboot, and as fast as wrk
/// can without one; the table and the JSON both come out, and the JSON holds the figures the
/// issue asks for.
#[test]
fn cache_bench_prints_its_table_and_json() {
    if !warmvm_vmm::testing::kvm_available("cache_bench") {
        return;
    }
    let args = [
        "--duration-secs",
        "4",
        "--reboot-after-secs",
        "1",
        "--files",
        "8",
        "--rate",
        "20",
    ];
    let out = Command::new(warmvm())
        .args(["bench", "cache", "--json"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let reboots = doc["reboots"].as_array().expect("reboots");
    let modes: Vec<&str> = reboots
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["warm", "saved", "cold"], "{doc}");
    for r in reboots {
        assert!(r["error"].is_null(), "{r}");
        for key in [
            "client_blackout_ms",
            "failed_or_reset",
            "throughput_after_1s",
            "new_cache_misses",
        ] {
            assert!(!r[key].is_null(), "{key} missing: {r}");
        }
        assert!(
            r["throughput_after_30s"].is_null(),
            "a 4 s run has no 30 s window: {r}"
        );
        assert!(r["noise"]["client_blackout_ms"].is_f64(), "{r}");
    }
    // Warm and saved reboots keep the guest's RAM, so its page cache: the files it served
    // before are no new misses after. The cold reboot boots the guest again: its cache
    // starts empty.
    for r in &reboots[..2] {
        assert_eq!(r["new_cache_misses"], 0, "{r}");
    }
    assert!(
        reboots[2]["new_cache_misses"].as_u64().unwrap() > 0,
        "{doc}"
    );
    assert!(
        doc["no_reboot"]["requests_per_sec"].as_f64().unwrap() > 0.0,
        "{doc}"
    );
    assert!(
        doc["no_reboot"]["fixed_rate"]["requests_per_sec"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{doc}"
    );
    assert!(doc["no_reboot"]["latency_p99_ms"].is_f64(), "{doc}");
    assert_eq!(
        doc["cold_cache"]["misses"], 0,
        "a cold guest starts with an empty cache"
    );

    let out = Command::new(warmvm())
        .args(["bench", "cache", "--modes", "warm"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("client blackout"), "{table}");
    assert!(
        table.lines().any(|l| l.trim_start().starts_with("warm ")),
        "{table}"
    );
}

/// The soak CI runs: 200 warm reboots back to back of eight VMs, one serving HTTP under a
/// fixed-rate load. Every VM is judged from inside after every reboot (the bench stops at the
/// first that fails), and the daemon that owns the VMs after the last reboot holds as many
/// fds as after the first window.
#[test]
fn soak_bench_judges_every_vm_after_each_of_200_warm_reboots() {
    if !warmvm_vmm::testing::kvm_available("soak_bench") {
        return;
    }
    let plots = scratch("soakplots");
    let out = Command::new(warmvm())
        .args([
            "bench",
            "soak",
            "--json",
            "--reboots",
            "200",
            "--window",
            "50",
        ])
        .arg("--plot-dir")
        .arg(&plots)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["reboots_done"], 200, "{doc}");
    assert!(doc["stopped"].is_null(), "{doc}");
    let windows = doc["windows"].as_array().unwrap();
    let ends: Vec<u64> = windows
        .iter()
        .map(|w| w["last_reboot"].as_u64().unwrap())
        .collect();
    assert_eq!(ends, [50, 100, 150, 200], "{doc}");
    for w in windows {
        for key in ["open_fds", "threads", "rss_anon_bytes", "http_ok"] {
            assert!(w[key].as_u64().unwrap() > 0, "{key} in {w}");
        }
        assert!(w["blackout_p50_ms"].as_f64().unwrap() > 0.0, "{w}");
    }
    assert_eq!(
        windows[0]["open_fds"], windows[3]["open_fds"],
        "the daemon's fds grew over 150 warm reboots: {doc}"
    );
    assert_eq!(doc["verdict"]["fds_equal"], true, "{doc}");
    for plot in ["soak-fds-threads", "soak-memory", "soak-blackout"] {
        assert!(plots.join(format!("{plot}.svg")).exists(), "{plot}.svg");
    }
    let _ = std::fs::remove_dir_all(&plots);
}
