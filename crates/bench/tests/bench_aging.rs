//! `warmvm bench aging` on a small scale: it records live noise, runs a live leak (the test
//! build has injected aging) and the accelerated-time simulations, prints its table or its
//! JSON, and writes every plot as SVG and PNG.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn bench(dir: &std::path::Path, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(warmvm());
    cmd.args(["bench", "aging", "--record-secs", "5", "--days", "0.5"])
        .args(["--leak-days", "0.25", "--heap-mib-per-hour", "512"])
        .args(["--fds-per-hour", "100", "--schedule-hours", "6,24"])
        .arg("--out")
        .arg(dir);
    if json {
        cmd.args(["--json", "--live-heap-mib-per-sec", "4"]);
    } else {
        cmd.arg("--no-live");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_aging_bench_prints_its_table_and_json_and_draws_its_plots() {
    if !warmvm_vmm::testing::kvm_available("aging bench") {
        return;
    }
    let dir = scratch("bench-aging");
    let (ok, stdout, stderr) = bench(&dir, true);
    assert!(ok, "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert!(
        doc["recording"]["samples"].as_u64().unwrap() >= 20,
        "{doc:#}"
    );
    assert!(doc["warm_reboot_blackout_ms"].as_f64().unwrap() > 0.0);
    // The live leak ran in this fault-injection build and rejuvenated the daemon.
    let live = &doc["live"][0];
    assert!(live["delay_secs"].as_f64().unwrap() > 0.0, "{doc:#}");
    assert!(live["lead_secs"].as_f64().unwrap() >= 30.0, "{live:#}");
    assert_eq!(live["vms_verified"], true, "{live:#}");
    let leaks = doc["leaks"].as_array().unwrap();
    assert_eq!(leaks.len(), 2);
    for l in leaks {
        assert!(l["delay_hours"].as_f64().is_some(), "{l:#}");
        assert_eq!(l["exhaustions"], 0, "{l:#}");
    }
    assert_eq!(doc["false_positives"]["days"], 0.5);
    // Every policy row: the aging monitor and the two schedules, per leak.
    assert_eq!(doc["policies"].as_array().unwrap().len(), 6);
    let plots: Vec<&str> = doc["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(plots.len(), 10, "{plots:?}");
    for p in &plots {
        let bytes = std::fs::read(p).unwrap();
        if p.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{p}");
        } else {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.contains("<svg") && text.contains("<text"), "{p}");
        }
    }
    // The table, without live leaks.
    let (ok, stdout, stderr) = bench(&dir, false);
    assert!(ok, "{stderr}");
    for needle in [
        "warm reboot blackout (measured once)",
        "false positives:",
        "against time-based rejuvenation:",
        "every 24 h",
        "aging monitor",
        "aging-heap-leaks.png",
    ] {
        assert!(stdout.contains(needle), "{needle}\n{stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
