//! `warmvm bench reboot` with QEMU 10's CheckPoint-and-Restart as a peer, at the smallest
//! size and at 1 and 2 VMs: the JSON has a QEMU row for cpr-transfer and for migrate-to-file
//! per VM count, with a measured guest-visible pause (per VM and host-wide) and both
//! downtime measures, beside warmvm's warm reboot, the ratios between them, and QEMU's
//! series in the plots. With QEMU missing the bench must say why it skipped the peer (and
//! under WARMVM_REQUIRE_KVM=1, as in CI, which installs QEMU, that is a failure). A run
//! interrupted by SIGINT leaves no QEMU process and no file behind.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn reboot_bench_measures_qemu_cpr_beside_the_warm_reboot() {
    if !warmvm_vmm::testing::kvm_available("reboot_bench_qemu_peer") {
        return;
    }
    let out_dir = scratch("bench-qemu-out");
    let out = Command::new(warmvm())
        .args([
            "--json", "bench", "reboot", "--modes", "warm", "--vms", "1,2",
        ])
        .args([
            "--memory-mib",
            "64",
            "--max-total-mib",
            "128",
            "--runs",
            "1",
        ])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let peer = &doc["qemu_peer"];

    // warmvm's own pause, from the same probe, per VM count.
    for (i, vms) in [1, 2].into_iter().enumerate() {
        let c = &doc["guest_pause"]["cells"][i];
        assert_eq!(c["vms"], vms, "{c:#}");
        let warm = &c["warm"];
        assert!(warm["error"].is_null(), "{warm:#}");
        let all = warm["pause_ms"]["all"].as_array().unwrap();
        assert_eq!(all.len(), vms, "one pause per VM and run: {warm:#}");
        assert!(all.iter().all(|p| f(p) > 0.0), "{warm:#}");
        assert!(f(&warm["host_pause_ms"]["p50"]) > 0.0, "{warm:#}");
    }

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
    for (i, vms) in [1u64, 2].into_iter().enumerate() {
        let cell = &peer["cells"][i];
        assert!(cell["skipped"].is_null(), "the QEMU peer failed: {cell:#}");
        assert_eq!(cell["memory_mib"], 64);
        assert_eq!(cell["vms"], vms);
        for key in ["cpr_transfer", "migrate_file"] {
            let r = &cell[key];
            assert_eq!(r["runs"], 1, "{r:#}");
            let pause = &r["guest_pause"];
            let each: Vec<f64> = pause["pause_ms"]["all"]
                .as_array()
                .unwrap()
                .iter()
                .map(f)
                .collect();
            assert_eq!(each.len() as u64, vms, "{key}: a pause per VM: {pause:#}");
            assert!(each.iter().all(|p| *p > 0.0), "{key}: {pause:#}");
            // Host-wide spans every VM's pause: from the first stopped to the last running.
            let host = f(&pause["host_pause_ms"]["all"][0]);
            assert!(
                each.iter().all(|p| host >= *p),
                "{key}: host-wide pause {host} shorter than a VM's: {pause:#}"
            );
            assert!(f(&pause["noise_ms"]["p50"]) > 0.0, "{pause:#}");
            let run = &r["all"][0];
            let vm_rows = run["vms"].as_array().unwrap();
            assert_eq!(vm_rows.len() as u64, vms, "{r:#}");
            let host_down = f(&run["host_stop_to_resume_ms"]);
            for v in vm_rows {
                let d = f(&v["stop_to_resume_ms"]);
                assert!(d > 0.0 && host_down >= d, "{key}: {r:#}");
                assert!(v["qemu_downtime_ms"].is_number(), "{r:#}");
            }
        }
        let ratios = &doc["peer_ratios"][i];
        assert_eq!(ratios["vms"], vms, "{ratios:#}");
        for k in [
            "warm_over_qemu_cpr_guest_pause",
            "warm_over_qemu_cpr_host_guest_pause",
            "warm_over_qemu_cpr_downtime_stop_to_resume",
        ] {
            assert!(
                ratios[k].as_f64().is_some_and(|r| r > 0.0),
                "{k}: {ratios:#}"
            );
        }
    }
    // QEMU's series beside warmvm's in the downtime-against-VMs plot.
    let svg = std::fs::read_to_string(out_dir.join("downtime-vs-vms.svg")).unwrap();
    assert!(svg.contains("QEMU cpr-transfer") && svg.contains("warm"));
    let table = std::fs::read_to_string(out_dir.join("table.txt")).unwrap();
    assert!(table.contains("QEMU migrate to file"), "{table}");
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// Pids of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                && pid_alive(*pid)
        })
        .collect()
}

fn qemu_processes_in(dir: &Path) -> Vec<u32> {
    processes_mentioning(dir.to_str().unwrap())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        })
        .collect()
}

#[test]
fn an_interrupted_qemu_peer_leaves_no_process_and_no_file() {
    if !warmvm_vmm::testing::kvm_available("reboot_bench_qemu_interrupt") {
        return;
    }
    if !qemu_installed() {
        assert!(
            !required(),
            "QEMU is not installed, and CI must run the peer"
        );
        return;
    }
    let dir = scratch("bench-qemu-int");
    let mut bench = Command::new(warmvm())
        .args(["bench", "reboot", "--modes", "warm", "--vms", "2"])
        .args([
            "--memory-mib",
            "64",
            "--max-total-mib",
            "128",
            "--runs",
            "3",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once both QEMUs of the peer run (booting their guests or being rebooted):
    // processes, monitor sockets, logs and the guest image all exist then.
    let qemu_seen = wait_until(240, || qemu_processes_in(&dir).len() >= 2);
    std::thread::sleep(Duration::from_secs(1));
    let seen = qemu_processes_in(&dir);
    // SAFETY: kill has no memory effects; the pid is our own child's.
    unsafe { libc::kill(bench.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = bench.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = bench.kill();
            panic!("the bench did not end within 60 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut bench.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(qemu_seen, "no QEMU of the peer within 240 s: {stderr}");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let left: Vec<u32> = seen.into_iter().filter(|p| pid_alive(*p)).collect();
    assert!(left.is_empty(), "QEMU processes left: {left:?}");
    let left = processes_mentioning(dir.to_str().unwrap());
    assert!(left.is_empty(), "processes of the run left: {left:?}");
    assert!(!dir.exists(), "the work directory is left");
}
