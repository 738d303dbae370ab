//! The daemon's seccomp filters, seen from /proc: every thread but the helper that starts a
//! warm reboot's new daemon runs filtered, through warm reboots and a live upgrade, and
//! `--seccomp false` turns them off. (Each kind's forbidden call is tried in
//! crates/sandbox's own tests.)

mod common;

use std::collections::BTreeMap;

use common::*;

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
    if !warmvm_vmm::testing::kvm_available(
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
    if !warmvm_vmm::testing::kvm_available(
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
