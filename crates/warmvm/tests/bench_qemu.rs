//! `warmvm bench reboot` with QEMU 10's CheckPoint-and-Restart as a peer, at the smallest
//! size: the JSON has a QEMU row for cpr-transfer and for migrate-to-file with a measured
//! guest-visible pause and both downtime measures, beside warmvm's warm reboot, and the
//! ratios between them. With QEMU missing the bench must say why it skipped the peer (and
//! under WARMVM_REQUIRE_KVM=1, as in CI, which installs QEMU, that is a failure).

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn reboot_bench_measures_qemu_cpr_beside_the_warm_reboot() {
    if !warmvm_vmm::testing::kvm_available("reboot_bench_qemu_peer") {
        return;
    }
    let out = Command::new(BIN)
        .args(["--json", "bench", "reboot", "--modes", "warm", "--vms", "1"])
        .args(["--memory-mib", "64", "--max-total-mib", "64", "--runs", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let peer = &doc["qemu_peer"];

    // warmvm's own pause, from the same probe.
    let warm = &doc["guest_pause"]["cells"][0]["warm"];
    assert!(warm["error"].is_null(), "{warm:#}");
    let warm_pause = warm["pause_ms"]["all"][0].as_f64();
    assert!(warm_pause.is_some_and(|p| p > 0.0), "{warm:#}");

    if !qemu_installed() {
        assert!(
            std::env::var_os("WARMVM_REQUIRE_KVM").is_none(),
            "QEMU is not installed, and CI must run the peer: {peer:#}"
        );
        let why = peer["skipped"].as_str().unwrap_or_default();
        assert!(why.contains("not found"), "{peer:#}");
        return;
    }
    assert!(peer["skipped"].is_null(), "{peer:#}");
    let cell = &peer["cells"][0];
    assert!(cell["skipped"].is_null(), "the QEMU peer failed: {cell:#}");
    assert_eq!(cell["memory_mib"], 64);
    for key in ["cpr_transfer", "migrate_file"] {
        let r = &cell[key];
        assert_eq!(r["runs"], 1, "{r:#}");
        let pause = &r["guest_pause"];
        assert!(
            pause["pause_ms"]["p50"].as_f64().is_some_and(|p| p > 0.0),
            "{key}: no guest-visible pause measured: {pause:#}"
        );
        assert!(
            pause["noise_ms"]["p50"].as_f64().is_some_and(|p| p > 0.0),
            "{pause:#}"
        );
        assert!(
            r["stop_to_resume_ms_p50"].as_f64().is_some_and(|p| p > 0.0),
            "{r:#}"
        );
        assert!(r["qemu_downtime_ms_p50"].as_f64().is_some(), "{r:#}");
    }
    let ratios = &doc["peer_ratios"][0];
    assert!(
        ratios["warm_over_qemu_cpr_guest_pause"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{ratios:#}"
    );
    assert!(
        ratios["warm_over_qemu_cpr_downtime_qemu_reported"].is_number()
            || cell["cpr_transfer"]["qemu_downtime_ms_p50"] == 0.0,
        "{ratios:#}"
    );
}
