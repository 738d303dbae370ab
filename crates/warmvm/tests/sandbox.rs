//! The daemon's seccomp filters, seen from /proc: every thread but the helper that starts a
//! warm reboot's new daemon runs filtered, through warm reboots and a live upgrade, and
//! `--seccomp false` turns them off; the virtio HTTP guest, a snapshot and a saved reboot
//! run under the allow-lists. (Each kind's calls outside its list are tried in
//! crates/sandbox's own tests.)

use std::collections::BTreeMap;

use warmvm_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

/// Each thread's name and its (seccomp mode, number of filters) from /proc.
fn threads(pid: u32) -> BTreeMap<String, Vec<(u32, u32)>> {
    let mut out: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map_or(0, |v| v.trim().parse().unwrap())
        };
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        out.entry(comm.trim().to_string())
            .or_default()
            .push((field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}

/// `console`: the console thread must be there (it starts with the first console output,
/// which a quiet guest taken over by a new daemon may not have printed yet).
fn assert_filtered(d: &Daemon, vm: &str, console: bool) {
    let t = threads(d.pid);
    let vcpu = format!("{vm}-vcpu0");
    let mut expected = vec!["warmvm-spawner", vcpu.as_str()];
    if console {
        expected.push("warmvm-console");
    }
    for name in expected {
        assert!(t.contains_key(name), "no {name} thread in {t:?}");
    }
    for (name, list) in &t {
        for &(mode, filters) in list {
            if name == "warmvm-spawner" {
                assert_eq!(
                    (mode, filters),
                    (0, 0),
                    "the helper must be unfiltered: {t:?}"
                );
            } else {
                // 2 = SECCOMP_MODE_FILTER; each kind stacks its own on the main thread's.
                assert_eq!(mode, 2, "{name} is unfiltered: {t:?}");
                assert!(filters >= 2, "{name}: {t:?}");
            }
        }
    }
    let vcpu = t[&format!("{vm}-vcpu0")][0];
    assert!(
        vcpu.1 >= 4,
        "a vCPU thread has the main thread's and its own: {t:?}"
    );
}

#[test]
fn every_daemon_thread_but_the_helper_runs_filtered_through_reboots_and_an_upgrade() {
    if !warmvm_testkit::kvm_available(
        "every_daemon_thread_but_the_helper_runs_filtered_through_reboots_and_an_upgrade",
    ) {
        return;
    }
    let dir = scratch("sandbox");
    let mut d = Daemon::start(&dir, &[]);
    let c = d.client();
    c.create(&serde_json::from_value(reference_vm("sb")).unwrap())
        .unwrap();
    assert!(wait_until(30, || counter(&c.show("sb").unwrap()) > 0));
    assert_filtered(&d, "sb", true);

    let report = c.reboot("warm", None).unwrap();
    d.follow_reboot(report["new_pid"].as_u64().unwrap() as u32);
    assert_filtered(&d, "sb", false);

    let upgrade = dir.join("warmvm-upgrade");
    std::fs::copy(BIN, &upgrade).unwrap();
    let report = d.client().reboot("warm", Some(&upgrade)).unwrap();
    d.follow_reboot(report["new_pid"].as_u64().unwrap() as u32);
    assert_filtered(&d, "sb", false);
    let vm = d.client().show("sb").unwrap();
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["guest"]["mismatches"], 0, "{vm}");
    d.terminate_adopted();
}

#[test]
fn seccomp_false_leaves_every_thread_unfiltered_and_log_mode_runs_filtered() {
    if !warmvm_testkit::kvm_available(
        "seccomp_false_leaves_every_thread_unfiltered_and_log_mode_runs_filtered",
    ) {
        return;
    }
    let dir = scratch("sandbox-off");
    let mut d = Daemon::start(&dir, &["--seccomp", "false"]);
    d.client()
        .create(&serde_json::from_value(reference_vm("off")).unwrap())
        .unwrap();
    let t = threads(d.pid);
    assert!(t.values().flatten().all(|&(mode, _)| mode == 0), "{t:?}");
    assert!(!t.contains_key("warmvm-spawner"), "{t:?}");
    d.terminate();

    let dir = scratch("sandbox-log");
    let mut d = Daemon::start(&dir, &["--seccomp", "log"]);
    let c = d.client();
    c.create(&serde_json::from_value(reference_vm("lg")).unwrap())
        .unwrap();
    assert!(wait_until(30, || counter(&c.show("lg").unwrap()) > 0));
    assert_filtered(&d, "lg", true);
    // The mode crosses a warm reboot (in the environment, which every build passes on).
    let report = c.reboot("warm", None).unwrap();
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    let environ = std::fs::read(format!("/proc/{new_pid}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|kv| kv == b"WARMVM_SECCOMP=log"),
        "the new daemon's environment lacks the mode"
    );
    d.terminate_adopted();
}

/// The filters are allow-lists, so every path the daemon takes must be on them: the
/// virtio HTTP guest (disk reads, TAP frames, workers started by the guest's driver), a
/// snapshot and its restore, and a saved reboot all run with the filters on, and the
/// daemon is not killed by SIGSYS on the way.
#[test]
fn the_virtio_http_guest_a_snapshot_and_a_saved_reboot_run_under_the_filters() {
    if !warmvm_testkit::kvm_available(
        "the_virtio_http_guest_a_snapshot_and_a_saved_reboot_run_under_the_filters",
    ) {
        return;
    }
    let dir = scratch("sandbox-io");
    let ns = Netns::new("sbio", "10.78.0.1/24");
    let page = b"<html>served under seccomp</html>\n".to_vec();
    let mut image = warmvm_vmm::testing::ustar_entries(&[("index.html", page.clone())]);
    image.resize(image.len().div_ceil(512) * 512 + 2048, 0);
    let disk = dir.join("site.img");
    std::fs::write(&disk, image).unwrap();

    let mut d = Daemon::start_in_netns(&dir, &ns.name);
    let created = d.cli_json(&[
        "vm",
        "create",
        "--name",
        "web",
        "--memory",
        "96",
        "--cmdline",
        "quiet interval_ms=20 disk_check_ms=0 ip=10.78.0.2/24",
        "--disk",
        disk.to_str().unwrap(),
        "--net",
        &ns.tap,
    ]);
    let console = std::path::PathBuf::from(created["console_log"].as_str().unwrap());
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        wait_until(60, || read().contains("http: serving")),
        "the guest never served\n{}\n{}",
        read(),
        d.log()
    );
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "20", "http://10.78.0.2/index.html"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    assert_eq!(out.stdout, page);
    assert_filtered(&d, "web", true);
    let t = threads(d.pid);
    assert!(
        t.keys().any(|n| n.starts_with("virtio-")),
        "no virtio worker thread: {t:?}"
    );

    // A snapshot, restored beside the original.
    let c = d.client();
    c.create(&serde_json::from_value(reference_vm("sn")).unwrap())
        .unwrap();
    assert!(wait_until(30, || counter(&c.show("sn").unwrap()) > 0));
    let snap = dir.join("snap");
    c.snapshot("sn", &snap, false).unwrap();
    c.restore(&snap, Some("sn-copy"), &Default::default())
        .unwrap();
    assert!(wait_until(30, || {
        c.show("sn-copy").unwrap()["state"] == "running"
    }));

    // A saved reboot, the virtio HTTP guest included.
    let out = d.cli_json(&["reboot", "--mode", "saved"]);
    d.follow_reboot(out["handover"]["new_pid"].as_u64().unwrap() as u32);
    for v in out["reboot"]["vms"].as_array().unwrap() {
        assert!(v["error"].is_null(), "{v}");
    }
    assert_filtered(&d, "sn", false);
    let c = d.client();
    for vm in ["sn", "sn-copy"] {
        let before = counter(&c.show(vm).unwrap());
        assert!(wait_until(30, || counter(&c.show(vm).unwrap()) > before));
        assert_eq!(c.show(vm).unwrap()["guest"]["mismatches"], 0);
    }
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "20", "http://10.78.0.2/index.html"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "after the saved reboot: {out:?}\n{}",
        d.log()
    );
    assert_eq!(out.stdout, page);
    d.terminate_adopted();
}

/// The snapshot writer (a process of its own, started outside the daemon's filters) runs
/// under a filter of its own, in the daemon's mode: a socket() it makes at a fault point
/// kills it with SIGSYS (the snapshot or saved reboot fails, every VM runs on), in log
/// mode goes through (the snapshot is written), and with `--seccomp false` meets no filter.
/// `mid-ram` is on one of its RAM-writing threads, `early` on its main thread.
#[test]
fn the_snapshot_writer_is_killed_for_a_call_outside_its_own_allow_list() {
    if !warmvm_testkit::kvm_available(
        "the_snapshot_writer_is_killed_for_a_call_outside_its_own_allow_list",
    ) {
        return;
    }
    for (mode, point) in [
        ("true", "mid-ram"),
        ("true", "early"),
        ("log", "mid-ram"),
        ("false", "mid-ram"),
    ] {
        let dir = scratch(&format!("sandbox-writer-{mode}-{point}"));
        let fault = format!("forbidden:{point}");
        let mut d = Daemon::start_with_env(
            &dir,
            &["--seccomp", mode],
            &[("WARMVM_SNAPSHOT_WRITER_FAULT", &fault)],
        );
        let c = d.client();
        c.create(&serde_json::from_value(reference_vm("wr")).unwrap())
            .unwrap();
        assert!(wait_until(30, || counter(&c.show("wr").unwrap()) > 0));
        let snap = dir.join("snap");
        let out = d.cli(&["vm", "snapshot", "wr", snap.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if mode == "true" {
            assert_eq!(out.status.code(), Some(3), "{mode} {point}: {err}");
            assert!(
                err.contains("killed by signal 31"),
                "{mode} {point}: SIGSYS expected: {err}"
            );
            assert!(!snap.join("vm.state").exists(), "{mode} {point}");
            // A saved reboot's writer is filtered the same way; the VM runs on here.
            let pid = d.pid;
            let out = d.cli(&["reboot", "--mode", "saved"]);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert_eq!(out.status.code(), Some(3), "{point}: {err}");
            assert!(err.contains("killed by signal 31"), "{point}: {err}");
            assert_eq!(c.status().unwrap()["pid"].as_u64(), Some(pid as u64));
        } else {
            assert!(out.status.success(), "{mode} {point}: {err}\n{}", d.log());
            assert!(snap.join("vm.state").exists(), "{mode} {point}");
        }
        let before = counter(&c.show("wr").unwrap());
        assert!(
            wait_until(30, || counter(&c.show("wr").unwrap()) > before),
            "{mode} {point}: the VM does not run on"
        );
        let vm = c.show("wr").unwrap();
        assert_eq!(vm["state"], "running", "{mode} {point}: {vm}");
        assert_eq!(vm["guest"]["mismatches"], 0, "{mode} {point}: {vm}");
        d.terminate();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
