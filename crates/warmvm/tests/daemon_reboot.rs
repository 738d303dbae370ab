//! Warm reboots of `warmvm daemon` through the CLI and the API: the VMs run on in a new daemon
//! process, and a reboot that cannot happen changes nothing.
//!
//! Tests that need /dev/kvm are skipped without it, unless `WARMVM_REQUIRE_KVM=1` (CI), where
//! they fail.

use serde_json::Value;
use warmvm_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

/// Each VM's name, state, integrity counter and mismatches, from `warmvm vm list --json`.
fn vm_figures(d: &Daemon) -> Vec<(String, String, u64, u64)> {
    d.cli_json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
                counter(v),
                v["guest"]["mismatches"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// `warmvm reboot --mode warm`, twice: each time a new daemon process (a new pid) runs all 4
/// VMs on, their integrity counters never go back and keep growing, and no guest sees a
/// mismatch. The last daemon, not our child, stops on SIGTERM and removes the socket.
#[test]
fn warm_reboots_of_the_daemon_keep_every_vm_running() {
    if !warmvm_testkit::kvm_available("warm_reboots_of_the_daemon_keep_every_vm_running") {
        return;
    }
    let dir = scratch("reboot");
    let mut d = Daemon::start(&dir, &[]);
    let names: Vec<String> = (0..4).map(|i| format!("vm{i}")).collect();
    for name in &names {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, reference_vm(name).to_string()).unwrap();
        d.cli_json(&["vm", "create", file.to_str().unwrap()]);
    }
    assert!(
        wait_until(60, || vm_figures(&d).iter().all(|v| v.2 > 0)),
        "the guests never reported progress"
    );
    let mut before = vm_figures(&d);
    // Requests sent meanwhile wait for whichever daemon serves next: every one is answered.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (c, done) = (d.client(), done.clone());
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0u32, Vec::new());
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                match c.raw("GET", "/v1/vms", None) {
                    Ok(r) if r.status == 200 => answered += 1,
                    Ok(r) => failed.push(format!(
                        "{}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (answered, failed)
        })
    };
    for round in 1..=2 {
        let old_pid = d.cli_json(&["status"])["pid"].as_u64().unwrap() as u32;
        assert_eq!(old_pid, d.pid);
        let report = d.cli_json(&["reboot", "--mode", "warm"]);
        let new_pid = report["new_pid"].as_u64().unwrap() as u32;
        let blackouts: Vec<&str> = report["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(blackouts, names, "round {round}: {report}");
        assert!(report["phases"]["restore_us"].is_u64(), "{report}");
        // The phases are consecutive segments of the blackout, from the first vCPU asked
        // to stop to the last back in its guest: they add up to it exactly.
        let phase = |k: &str| report["phases"][k].as_u64().unwrap();
        let blackout = report["host_blackout_us"].as_u64().unwrap();
        let phases: u64 = [
            "quiesce_us",
            "capture_us",
            "transfer_us",
            "restore_us",
            "commit_us",
            "resume_us",
        ]
        .into_iter()
        .map(phase)
        .sum();
        assert_eq!(
            phases, blackout,
            "round {round}: the phases do not add up to the blackout: {report}"
        );
        // Both daemons stamped their steps, in the order they happen, every VM's vCPUs
        // stopping after the pause request and before the capture's end, and running
        // after the commit.
        let st = &report["stamps"];
        let at = |k: &str| st[k].as_u64().unwrap();
        let steps = [
            "pause_requested_ns",
            "captured_ns",
            "state_sent_ns",
            "state_received_ns",
            "restored_ns",
            "commit_ns",
        ];
        assert!(at(steps[0]) > 0, "round {round}: {st}");
        for w in steps.windows(2) {
            assert!(
                at(w[0]) <= at(w[1]),
                "round {round}: {} > {}: {st}",
                w[0],
                w[1]
            );
        }
        let stamped: Vec<&str> = st["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(stamped, names, "round {round}: {st}");
        for v in st["vms"].as_array().unwrap() {
            let ns = |k: &str| -> Vec<u64> {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap())
                    .collect()
            };
            let (stops, runs) = (ns("vcpu_stops_ns"), ns("vcpu_runs_ns"));
            assert_eq!((stops.len(), runs.len()), (1, 1), "round {round}: {v}");
            assert!(
                stops
                    .iter()
                    .all(|&t| at("pause_requested_ns") <= t && t <= at("captured_ns")),
                "round {round}: {v} vs {st}"
            );
            assert!(
                runs.iter().all(|&t| at("commit_ns") <= t),
                "round {round}: {v} vs {st}"
            );
        }
        d.follow_reboot(new_pid);

        let status = d.cli_json(&["status"]);
        assert_eq!(status["pid"], new_pid, "round {round}");
        assert_ne!(new_pid, old_pid);
        assert_eq!(status["vm_count"], 4);
        assert_eq!(status["vms_running"], 4, "round {round}: {status}");
        let after = vm_figures(&d);
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.0, b.0);
            assert_eq!(a.1, "running", "round {round}: {a:?}");
            assert!(
                a.2 >= b.2,
                "round {round}: {}'s counter went back: {b:?} -> {a:?}",
                a.0
            );
            assert_eq!(a.3, 0, "round {round}: {a:?}");
        }
        // ...and goes on growing in the new daemon.
        assert!(
            wait_until(30, || vm_figures(&d)
                .iter()
                .zip(&after)
                .all(|(now, a)| now.2 > a.2 && now.3 == 0)),
            "round {round}: the guests stopped making progress\n{}",
            d.log()
        );
        before = vm_figures(&d);
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (answered, failed) = prober.join().unwrap();
    assert!(answered > 0);
    assert!(
        failed.is_empty(),
        "requests during warm reboots failed: {failed:?}"
    );
    // The table form: each VM's blackout and the phases. And an upgrade: the new daemon
    // runs the binary named (a copy here, as a new build would be).
    let upgrade = dir.join("warmvm-upgrade");
    std::fs::copy(BIN, &upgrade).unwrap();
    let out = d.cli(&[
        "reboot",
        "--mode",
        "warm",
        "--binary",
        upgrade.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("phases (ms): stage"), "{table}");
    for name in &names {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(name.as_str()) && l.contains("blackout")),
            "{table}"
        );
    }
    let new_pid = d.cli_json(&["status"])["pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    assert_eq!(
        std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap(),
        upgrade
    );

    for name in &names {
        let r = d.cli_json(&["vm", "stop", name, "--grace-secs", "10"]);
        assert_eq!(r["state"], "powered-off", "{name}: {r}");
        assert_eq!(r["exit_status"], 0);
        assert_eq!(r["guest"]["mismatches"], 0, "{name}: {r}");
        assert!(counter(&r) >= before.iter().find(|b| &b.0 == name).unwrap().2);
    }
    d.terminate_adopted();
    assert!(!d.socket.exists(), "the last daemon removes the socket");
    let log = d.log();
    assert_eq!(
        log.matches("took the VMs over by a warm reboot").count(),
        3,
        "{log}"
    );
}

/// A warm reboot that cannot happen changes nothing: a missing binary is refused with 400
/// before anything starts; a binary that is not warmvm fails the handover (500), a new
/// daemon that refuses the state is a 409; each time the VMs run on in the same daemon.
#[test]
fn a_failed_warm_reboot_changes_nothing() {
    if !warmvm_testkit::kvm_available("a_failed_warm_reboot_changes_nothing") {
        return;
    }
    let dir = scratch("rebootfail");
    // Every daemon this one starts refuses the state it is handed (fault injection).
    let mut d = Daemon::start_with_env(
        &dir,
        &[],
        &[(warmvm_vmm::handover::FAULT_ENV, "refuse-state")],
    );
    let c = d.client();
    for name in ["f0", "f1"] {
        c.create(&serde_json::from_value(reference_vm(name)).unwrap())
            .unwrap();
    }
    assert!(wait_until(60, || vm_figures(&d).iter().all(|v| v.2 > 0)));
    let pid = c.status().unwrap()["pid"].clone();

    let out = d.cli(&["reboot", "--mode", "warm", "--binary", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
    let resp = c
        .raw(
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/nonexistent"}"#),
        )
        .unwrap();
    assert_eq!(resp.status, 404);

    let before = vm_figures(&d);
    let resp = c
        .raw(
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/bin/true"}"#),
        )
        .unwrap();
    assert_eq!(resp.status, 500, "{}", String::from_utf8_lossy(&resp.body));
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("run on in this daemon"),
        "{v}"
    );
    let out = d.cli(&["reboot", "--mode", "warm"]);
    assert_eq!(out.status.code(), Some(2), "a refusal is a 409");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refuse-state"), "{err}");

    assert_eq!(c.status().unwrap()["pid"], pid, "the same daemon serves");
    assert_eq!(c.status().unwrap()["vms_running"], 2);
    let after = vm_figures(&d);
    assert!(wait_until(30, || vm_figures(&d).iter().zip(&after).all(
        |(now, a)| now.1 == "running" && now.2 > a.2 && now.3 == 0
    )));
    for (b, a) in before.iter().zip(&after) {
        assert!(a.2 >= b.2, "{b:?} -> {a:?}");
    }
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log());
    assert!(!d.socket.exists());
}

/// A warm reboot whose new daemon takes the VMs but whose report never comes (held past the
/// old daemon's wait for it): the VMs are the new daemon's, so the reboot succeeded, but
/// its answer, the CLI and the log say the blackout was not measured; never 0 µs.
#[test]
fn a_warm_reboot_without_a_report_is_answered_as_not_measured() {
    if !warmvm_testkit::kvm_available("reboot without a report") {
        return;
    }
    let dir = scratch("noreport");
    // Inherited by the new daemon: it holds its report back 6.5 s, past the old daemon's
    // wait (the ready budget, then 5 s).
    let mut d = Daemon::start_with_env(&dir, &[], &[("WARMVM_FAULT", "new:running:delay:6500")]);
    d.create_reference_vms(&["n0"]);
    assert!(wait_until(60, || vm_figures(&d).iter().all(|v| v.2 > 0)));
    let old_pid = d.pid;
    let out = d.cli(&["reboot", "--mode", "warm"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("NOT MEASURED: the new VMM took the VMs over but sent no report"),
        "{stdout}"
    );
    assert!(
        d.log()
            .contains("the new VMM took the guests but sent no report"),
        "{}",
        d.log()
    );
    let mut new_pid = old_pid;
    assert!(wait_until(30, || {
        new_pid = d
            .client()
            .status()
            .ok()
            .and_then(|s| s["pid"].as_u64())
            .unwrap_or(0) as u32;
        new_pid != old_pid && new_pid != 0
    }));
    d.follow_reboot(new_pid);
    let after = vm_figures(&d);
    assert!(
        wait_until(30, || vm_figures(&d).iter().zip(&after).all(|(now, a)| now
            .1
            == "running"
            && now.2 > a.2
            && now.3 == 0)),
        "{}",
        d.log()
    );
    d.terminate_adopted();
}

/// The daemon's open fds, each with what it points to, for a failure's message.
fn open_fds(pid: u32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn warm_reboots_of_a_vm_with_virtio_devices_leave_no_fd_behind() {
    if !warmvm_vmm::testing::kvm_available(
        "warm_reboots_of_a_vm_with_virtio_devices_leave_no_fd_behind",
    ) {
        return;
    }
    // Every process a warm reboot starts is exec'd by the one before: an fd the old
    // process opened without close-on-exec lives on in every successor, one more set per
    // reboot, until a daemon that has run for weeks runs out of fds.
    let dir = scratch("fdlevel");
    let ns = Netns::new("fdlevel", "10.82.0.1/24");
    std::fs::write(dir.join("disk.img"), vec![0u8; 256 * 512]).unwrap();
    let mut d = Daemon::start_in_netns(&dir, &ns.name);
    let vm = serde_json::json!({
        "name": "dev", "memory_mib": 48, "cmdline": "quiet interval_ms=20 disk_check_ms=0",
        "disks": [{"path": dir.join("disk.img")}], "nets": [{"tap": ns.tap}],
    });
    let created = d
        .client()
        .raw("POST", "/v1/vms", Some(vm.to_string().as_bytes()))
        .unwrap();
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let mut after = Vec::new();
    for _ in 0..4 {
        let report = d.cli_json(&["reboot", "--mode", "warm"]);
        let new_pid = report["new_pid"].as_u64().unwrap() as u32;
        d.follow_reboot(new_pid);
        after.push(open_fds(new_pid));
    }
    let (first, last) = (&after[0], &after[3]);
    assert_eq!(
        first.len(),
        last.len(),
        "fds after the first warm reboot:\n{}\nafter the fourth:\n{}",
        first.join("\n"),
        last.join("\n")
    );
    verifies_on(&d, "dev", 1);
    d.terminate_adopted();
}

/// A daemon whose successor settings are of a version this build does not read (a newer
/// build's, stood in for by fault injection) is refused by the new daemon while it stages:
/// 409, in phase stage (the guests never paused), naming both versions; the same daemon
/// serves on and its guests keep running.
#[test]
fn successor_settings_of_another_version_are_refused_with_409_while_staging() {
    if !warmvm_vmm::testing::kvm_available("successor settings of another version") {
        return;
    }
    let dir = scratch("successor-version");
    let mut d = Daemon::start_with_env(&dir, &[], &[("WARMVM_FAULT_SUCCESSOR_VERSION", "2")]);
    d.create_reference_vms(&["s0"]);
    assert!(wait_until(60, || vm_figures(&d).iter().all(|v| v.2 > 0)));
    let c = d.client();
    let pid = c.status().unwrap()["pid"].clone();
    let resp = c
        .raw("PUT", "/v1/reboot", Some(br#"{"mode": "warm"}"#))
        .unwrap();
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(resp.status, 409, "{v}\n{}", d.log());
    assert_eq!(v["phase"], "stage", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("successor settings are version 2; this build reads 1"),
        "{error}"
    );
    assert!(error.contains("run on in this daemon"), "{error}");
    assert_eq!(c.status().unwrap()["pid"], pid, "the same daemon serves");
    let after = vm_figures(&d);
    assert!(wait_until(30, || vm_figures(&d).iter().zip(&after).all(
        |(now, a)| now.1 == "running" && now.2 > a.2 && now.3 == 0
    )));
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log());
}
