//! The upgrade an operator does: install a new build over the path the daemon was started
//! from, then `warmvm reboot --mode warm` without `--binary`. The new daemon must run the
//! installed file (not the old image the kernel still holds), say so in its status and the
//! reboot's report, and keep the name `warmvm` so that `pidof warmvm` finds it.
//!
//! Tests that need /dev/kvm are skipped without it, unless `WARMVM_REQUIRE_KVM=1` (CI), where
//! they fail.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use warmvm_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

fn sha256_of(path: &Path) -> String {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    warmvm_vmm::executable::hash(&f).unwrap()
}

fn install(from: &Path, to: &Path) {
    let st = Command::new("install")
        .args(["-m", "0755"])
        .arg(from)
        .arg(to)
        .status()
        .expect("install runs");
    assert!(st.success(), "install {} {}", from.display(), to.display());
}

fn pidof_warmvm() -> Vec<u32> {
    let out = Command::new("pidof")
        .arg("warmvm")
        .output()
        .expect("pidof runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A warm reboot the daemon refuses: its answer names the path, and the same daemon runs
/// the VM on.
fn refused(d: &Daemon, want: &str) {
    let out = d.cli(&["reboot", "--mode", "warm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(d.client().status().unwrap()["pid"], d.pid, "{stderr}");
}

#[test]
fn a_warm_reboot_runs_the_build_installed_over_the_daemons_path() {
    if !warmvm_testkit::kvm_available(
        "a_warm_reboot_runs_the_build_installed_over_the_daemons_path",
    ) {
        return;
    }
    let dir = scratch("inplace");
    // Build A is this test's warmvm; build B is the same program with bytes after the ELF
    // image (which the loader ignores): another file, with another sha256, that runs.
    let bin = dir.join("bin").join("warmvm");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    install(Path::new(BIN), &bin);
    let build_b = dir.join("warmvm-b");
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(b"\nbuild B of the in-place upgrade test\n");
    std::fs::write(&build_b, bytes).unwrap();
    let (sha_a, sha_b) = (sha256_of(&bin), sha256_of(&build_b));
    assert_ne!(sha_a, sha_b);

    let mut d = Daemon::start_from(&bin, &dir, &[]);
    create(&d, "vm-a");
    let status = d.client().status().unwrap();
    assert_eq!(status["binary"]["sha256"], sha_a.as_str(), "{status}");
    assert_eq!(status["binary"]["path"], bin.to_str().unwrap(), "{status}");

    // The upgrade: B over A's path, under the running daemon.
    install(&build_b, &bin);
    let status = d.client().status().unwrap();
    // The daemon still runs A: its status says so, whatever the path holds now.
    assert_eq!(status["binary"]["sha256"], sha_a.as_str(), "{status}");

    let old_pid = d.pid;
    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    let new_pid = report["new_pid"].as_u64().expect("new_pid") as u32;
    d.follow_reboot(new_pid);
    assert_ne!(new_pid, old_pid);

    // The new process runs B, the file installed, not A's image.
    let running = sha256_of(Path::new(&format!("/proc/{new_pid}/exe")));
    assert_eq!(running, sha_b);
    assert_ne!(running, sha_a);
    assert_eq!(report["from_binary"]["sha256"], sha_a.as_str(), "{report}");
    assert_eq!(report["to_binary"]["sha256"], sha_b.as_str(), "{report}");
    assert_eq!(
        report["to_binary"]["path"],
        bin.to_str().unwrap(),
        "{report}"
    );
    let status: Value = d.client().status().unwrap();
    assert_eq!(status["pid"], new_pid, "{status}");
    assert_eq!(status["binary"]["sha256"], sha_b.as_str(), "{status}");
    assert_eq!(
        status["last_takeover"]["from_binary"]["sha256"],
        sha_a.as_str(),
        "{status}"
    );

    // Still called warmvm: its name, its argv[0], and what pidof finds.
    let comm = std::fs::read_to_string(format!("/proc/{new_pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "warmvm");
    let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).unwrap();
    assert_eq!(cmdline.split(|&b| b == 0).next(), Some(&b"warmvm"[..]));
    assert!(pidof_warmvm().contains(&new_pid), "{:?}", pidof_warmvm());

    // The guest verified its memory across the reboot, with no mismatch.
    verifies_on(&d, "vm-a", 2);

    // Nothing runnable at the path: refused before anything pauses; the VM runs on here.
    std::fs::remove_file(&bin).unwrap();
    refused(&d, &format!("{}", bin.display()));
    std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
    refused(&d, "not executable");
    verifies_on(&d, "vm-a", 1);
    d.terminate_adopted();
}

#[test]
fn a_daemon_started_through_a_symlink_follows_it_to_the_next_build() {
    if !warmvm_testkit::kvm_available(
        "a_daemon_started_through_a_symlink_follows_it_to_the_next_build",
    ) {
        return;
    }
    // Releases side by side, the daemon started through a link to the current one.
    let dir = scratch("symlink");
    let (a, b) = (dir.join("a").join("warmvm"), dir.join("b").join("warmvm"));
    for (build, tail) in [(&a, &b"A"[..]), (&b, &b"B"[..])] {
        std::fs::create_dir_all(build.parent().unwrap()).unwrap();
        let mut bytes = std::fs::read(BIN).unwrap();
        bytes.extend_from_slice(tail);
        std::fs::write(build, bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(build, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let link = dir.join("warmvm");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let (sha_a, sha_b) = (sha256_of(&a), sha256_of(&b));

    let mut d = Daemon::start_from(&link, &dir, &[]);
    create(&d, "vm-s");
    let status = d.client().status().unwrap();
    assert_eq!(status["binary"]["path"], link.to_str().unwrap(), "{status}");
    // A reboot with the link unchanged: the next daemon still knows it came through it.
    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    let pid = report["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(pid);
    assert_eq!(
        report["to_binary"]["path"],
        link.to_str().unwrap(),
        "{report}"
    );
    assert_eq!(report["to_binary"]["sha256"], sha_a.as_str(), "{report}");

    // The upgrade: the link moves to release B.
    let tmp = dir.join("warmvm.new");
    std::os::unix::fs::symlink(&b, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    let pid = report["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(pid);
    assert_eq!(sha256_of(Path::new(&format!("/proc/{pid}/exe"))), sha_b);
    assert_eq!(report["to_binary"]["sha256"], sha_b.as_str(), "{report}");
    assert_eq!(
        report["to_binary"]["path"],
        link.to_str().unwrap(),
        "{report}"
    );
    verifies_on(&d, "vm-s", 2);
    d.terminate_adopted();
}
