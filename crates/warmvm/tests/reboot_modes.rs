//! The alternatives to the warm reboot through the daemon and the CLI: VM snapshots
//! (`vm snapshot`, `vm restore`), the saved reboot (every VM to disk and back through a
//! new daemon) and the cold reboot (every guest powered off and booted again), and what
//! happens when the disk is full or fills up during a saved reboot.

use std::path::Path;
use std::time::Duration;

use warmvm_testkit::{counter, create, figures, scratch, show, verifies_on, Daemon};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[test]
fn a_snapshot_restored_under_a_new_name_runs_beside_the_original() {
    if !warmvm_testkit::kvm_available("cli_snapshot_restore") {
        return;
    }
    let dir = scratch("snap");
    let d = Daemon::start(&dir, &[]);
    create(&d, "orig");
    let snap = dir.join("snaps").join("orig");
    let snap_s = snap.to_str().unwrap();
    let r = d.cli_json(&["vm", "snapshot", "orig", snap_s]);
    assert_eq!(r["resumed"], true, "{r}");
    assert!(r["written_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(show(&d, "orig")["state"], "running");
    let r = d.cli_json(&["vm", "restore", snap_s, "--name", "copy"]);
    assert_eq!(r["name"], "copy");
    assert_eq!(r["state"], "running");
    // The copy carries on from the snapshot's counter, not from a fresh boot.
    assert!(counter(&r) > 0, "{r}");
    verifies_on(&d, "copy", 1);
    verifies_on(&d, "orig", 1);
    // Under the original's name it is refused: the name is taken.
    let out = d.cli(&["vm", "restore", snap_s]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    // A corrupt snapshot is refused with one line, and creates nothing.
    let bad = dir.join("snaps").join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["vm.state", "ram0.bin"] {
        std::fs::copy(snap.join(f), bad.join(f)).unwrap();
    }
    let state = std::fs::read(bad.join("vm.state")).unwrap();
    let mut spoilt = state.clone();
    let n = spoilt.len();
    spoilt[n - 5] ^= 0xff;
    std::fs::write(bad.join("vm.state"), &spoilt).unwrap();
    let out = d.cli(&["vm", "restore", bad.to_str().unwrap(), "--name", "bad"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
    // A foreign file: refused by its magic.
    std::fs::write(
        bad.join("vm.state"),
        b"not a snapshot at all, just some bytes",
    )
    .unwrap();
    let out = d.cli(&["vm", "restore", bad.to_str().unwrap(), "--name", "bad"]);
    assert!(
        stderr(&out).contains("not a warmvm snapshot"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.client().list().unwrap()["vms"].as_array().unwrap().len(),
        2
    );
}

#[test]
fn a_saved_reboot_keeps_every_vm_and_its_memory() {
    if !warmvm_testkit::kvm_available("saved_reboot") {
        return;
    }
    let dir = scratch("saved");
    let mut d = Daemon::start(&dir, &[]);
    create(&d, "s1");
    create(&d, "s2");
    d.client().pause("s2").unwrap();
    let before: Vec<u64> = ["s1", "s2"].iter().map(|n| counter(&show(&d, n))).collect();
    let out = d.cli_json(&["reboot", "--mode", "saved"]);
    let new_pid = out["handover"]["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    let rep = &out["reboot"];
    assert_eq!(rep["mode"], "saved", "{out}");
    let vms = rep["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{out}");
    for v in vms {
        assert!(v["error"].is_null(), "{v}");
        assert!(v["downtime_us"].as_u64().unwrap() > 0, "{v}");
    }
    assert!(rep["bytes_read"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(rep["bytes_written"], rep["bytes_read"], "{out}");
    let status = d.client().status().unwrap();
    assert_eq!(status["pid"].as_u64(), Some(new_pid as u64));
    // The paused VM stays paused, with exactly its counter; the running one goes on from
    // where it was (a fresh boot would count from zero), verifying its whole memory.
    let s2 = show(&d, "s2");
    assert_eq!(s2["state"], "paused", "{s2}");
    assert_eq!(counter(&s2), before[1], "{s2}");
    assert!(counter(&show(&d, "s1")) >= before[0]);
    verifies_on(&d, "s1", 2);
    d.client().resume("s2").unwrap();
    verifies_on(&d, "s2", 1);
    // The snapshots are gone once restored.
    assert!(!dir.join("state").join("saved-reboot").exists());
    d.terminate_adopted();
}

#[test]
fn a_cold_reboot_boots_every_vm_again() {
    if !warmvm_testkit::kvm_available("cold_reboot") {
        return;
    }
    let dir = scratch("cold");
    let mut d = Daemon::start(&dir, &[]);
    create(&d, "c1");
    create(&d, "c2");
    let out = d.cli_json(&["reboot", "--mode", "cold", "--grace-secs", "5"]);
    let new_pid = out["handover"]["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    let rep = &out["reboot"];
    assert_eq!(rep["mode"], "cold", "{out}");
    for v in rep["vms"].as_array().unwrap() {
        assert!(v["error"].is_null(), "{v}");
        assert!(v["downtime_us"].as_u64().unwrap() > 0, "{v}");
    }
    for n in ["c1", "c2"] {
        let vm = show(&d, n);
        assert_eq!(vm["state"], "running", "{vm}");
        // Booted again: its figures start over.
        assert!(vm["uptime_ms"].as_u64().unwrap() < 60_000, "{vm}");
        verifies_on(&d, n, 1);
    }
    // Each guest powered off cleanly: its console says so before the new boot's lines.
    let log = std::fs::read_to_string(dir.join("state").join("c1").join("console.log"))
        .unwrap_or_default();
    assert!(!log.is_empty());
    d.terminate_adopted();
}

/// A small tmpfs, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount a tmpfs at {} (needs root)", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: the daemon's dead process may still be closing its console logs there.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn too_little_free_space_refuses_a_saved_reboot_and_changes_nothing() {
    if !warmvm_testkit::kvm_available("saved_reboot_full_disk") {
        return;
    }
    let dir = scratch("full");
    // The state directory (console logs, snapshots) on a disk far smaller than the RAM.
    let fs = SmallFs::mount(&dir.join("state"), 16);
    let d = Daemon::start(&dir, &[]);
    create(&d, "f1");
    let pid = d.pid;
    let out = d.cli(&["reboot", "--mode", "saved"]);
    // 507 from the daemon: the host cannot, not the request is wrong.
    assert_eq!(out.status.code(), Some(3), "{}\n{}", stderr(&out), d.log());
    assert!(
        stderr(&out).contains("not enough free space"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1);
    assert_eq!(
        d.client().status().unwrap()["pid"].as_u64(),
        Some(pid as u64)
    );
    assert_eq!(show(&d, "f1")["state"], "running");
    verifies_on(&d, "f1", 1);
    assert!(!fs.0.join("saved-reboot").exists());
    drop(d);
    drop(fs);
}

#[test]
fn a_disk_that_fills_up_during_a_saved_reboot_leaves_every_vm_running() {
    if !warmvm_testkit::kvm_available("saved_reboot_interrupted") {
        return;
    }
    let dir = scratch("midway");
    // Writes fail with ENOSPC after 10 requests of 8 MiB: the first VM (64 MiB) is saved,
    // the second fails midway.
    let d = Daemon::start_with_env(&dir, &[], &[("WARMVM_SNAPSHOT_FAULT", "enospc-after:10")]);
    for n in ["m1", "m2", "m3"] {
        create(&d, n);
    }
    d.client().pause("m3").unwrap();
    let pid = d.pid;
    let out = d.cli(&["reboot", "--mode", "saved"]);
    assert_eq!(out.status.code(), Some(3), "{}\n{}", stderr(&out), d.log());
    assert!(stderr(&out).contains("No space left"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("every VM runs on"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.client().status().unwrap()["pid"].as_u64(),
        Some(pid as u64)
    );
    assert_eq!(show(&d, "m3")["state"], "paused");
    for n in ["m1", "m2"] {
        assert_eq!(show(&d, n)["state"], "running");
        verifies_on(&d, n, 1);
    }
    assert!(!dir.join("state").join("saved-reboot").exists());
    std::thread::sleep(Duration::from_millis(10));
}

/// The snapshot writer is a process of its own: killed at any point of a saved reboot's
/// save (before its job, mid-RAM, before its fsync, before its rename), the daemon resumes
/// every VM, reports the writer's death, and the guests verify their memory and registers
/// on in the old daemon. A single `vm snapshot` whose writer dies leaves its VM running.
#[test]
fn killing_the_snapshot_writer_at_any_point_leaves_every_vm_running() {
    if !warmvm_testkit::kvm_available("snapshot_writer_killed") {
        return;
    }
    for point in ["early", "mid-ram", "before-sync", "before-rename"] {
        let dir = scratch(&format!("writer-{point}"));
        let d = Daemon::start_with_env(
            &dir,
            &[],
            &[("WARMVM_SNAPSHOT_WRITER_FAULT", &format!("kill:{point}"))],
        );
        for n in ["w1", "w2"] {
            create(&d, n);
        }
        d.client().pause("w2").unwrap();
        let before = counter(&show(&d, "w2"));
        let pid = d.pid;
        let out = d.cli(&["reboot", "--mode", "saved"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{point}: {err}\n{}", d.log());
        assert!(err.contains("snapshot writer"), "{point}: {err}");
        assert!(err.contains("killed by signal 9"), "{point}: {err}");
        assert!(err.contains("every VM runs on"), "{point}: {err}");
        assert_eq!(err.lines().count(), 1, "{point}: {err}");
        assert_eq!(
            d.client().status().unwrap()["pid"].as_u64(),
            Some(pid as u64),
            "{point}"
        );
        assert!(!dir.join("state").join("saved-reboot").exists(), "{point}");
        // The paused VM is as it was; the running one runs on, and both verify.
        let w2 = show(&d, "w2");
        assert_eq!(w2["state"], "paused", "{point}: {w2}");
        assert_eq!(counter(&w2), before, "{point}: {w2}");
        assert_eq!(show(&d, "w1")["state"], "running", "{point}");
        verifies_on(&d, "w1", 1);
        d.client().resume("w2").unwrap();
        verifies_on(&d, "w2", 1);
        if point == "mid-ram" {
            let snap = dir.join("snap");
            let out = d.cli(&["vm", "snapshot", "w1", snap.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
            assert!(
                stderr(&out).contains("killed by signal 9"),
                "{}",
                stderr(&out)
            );
            assert!(!snap.join("vm.state").exists());
            assert_eq!(show(&d, "w1")["state"], "running");
            verifies_on(&d, "w1", 1);
        }
        for (name, state, _, bad) in figures(&d) {
            assert_eq!(state, "running", "{point}: {name}");
            assert_eq!(
                bad, 0,
                "{point}: {name}: mismatches or register check failures"
            );
        }
    }
}
