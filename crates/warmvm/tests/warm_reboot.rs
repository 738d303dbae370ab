//! Warm reboots end to end: the `warmvm demo` VMM hands its VMs to a new process (or a
//! chain of them) and every guest must go on with nothing lost; when the new VMM fails in
//! any way, the VMs must go on in the old one.

use std::process::Command;

use serde_json::Value;
use warmvm_testkit::scratch;

fn demo(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Value, String) {
    // Tests run in parallel threads: each demo gets a state directory of its own.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = scratch(&format!(
        "reboot-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warmvm"));
    cmd.args(["demo", "--json", "--memory-mib", "64", "--seconds", "2"])
        .args(args)
        .arg("--state-dir")
        .arg(&dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("warmvm runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let doc = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): stdout {stdout:?} stderr {stderr:?}"));
    let _ = std::fs::remove_dir_all(dir);
    (out.status.code(), doc, stderr)
}

/// Every VM powered off cleanly after verifying all its memory, with no mismatch.
fn assert_all_vms_verified(doc: &Value) {
    let vms = doc["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 4, "{doc}");
    for vm in vms {
        assert_eq!(vm["state"], "powered-off", "{vm}");
        assert_eq!(vm["exit_status"], 0, "{vm}");
        let g = &vm["guest"];
        assert_eq!(g["mismatches"], 0, "{vm}");
        assert_eq!(g["register_check_failures"], 0, "{vm}");
        assert_eq!(g["time_went_backwards"], 0, "{vm}");
        assert!(g["min_passes"].as_u64().unwrap_or(0) >= 1, "{vm}");
    }
}

#[test]
fn four_vms_survive_consecutive_warm_reboots() {
    if !warmvm_testkit::kvm_available("four_vms_survive_consecutive_warm_reboots") {
        return;
    }
    // CI runs 10; WARMVM_TEST_REBOOTS=100 runs the full acceptance count.
    let reboots = std::env::var("WARMVM_TEST_REBOOTS").unwrap_or_else(|_| "10".into());
    let (code, doc, stderr) = demo(&["--reboots", &reboots, "--reboot-interval-ms", "50"], &[]);
    assert_eq!(code, Some(0), "{doc} {stderr}");
    assert_eq!(doc["ok"], true);
    assert!(doc["warm_reboot_error"].is_null(), "{doc}");
    let n: u64 = reboots.parse().expect("number");
    if n > 1 {
        assert_eq!(doc["reboot_chain"]["reboots"].as_u64(), Some(n), "{doc}");
    }
    assert!(doc["warm_reboot"]["new_pid"].as_u64().unwrap_or(0) > 0);
    assert_all_vms_verified(&doc);
}

#[test]
fn the_demo_with_two_and_four_vcpus_verifies_every_vcpu_across_a_warm_reboot() {
    if !warmvm_testkit::kvm_available("demo_vcpus") {
        return;
    }
    for vcpus in ["2", "4"] {
        let (code, doc, stderr) = demo(&["--vms", "1", "--vcpus", vcpus], &[]);
        assert_eq!(code, Some(0), "--vcpus {vcpus}: {doc} {stderr}");
        assert_eq!(doc["ok"], true, "{doc}");
        assert!(
            doc["warm_reboot"]["new_pid"].as_u64().unwrap_or(0) > 0,
            "{doc}"
        );
        let vm = &doc["vms"][0];
        let each = vm["guest"]["vcpus"].as_array().expect("per-vCPU figures");
        assert_eq!(each.len().to_string(), vcpus, "{vm}");
        for (i, v) in each.iter().enumerate() {
            assert!(v["pages_owned"].as_u64().unwrap_or(0) > 0, "vCPU {i}: {vm}");
            assert!(v["passes"].as_u64().unwrap_or(0) >= 1, "vCPU {i}: {vm}");
            assert_eq!(v["mismatches"], 0, "vCPU {i}: {vm}");
            assert_eq!(v["register_check_failures"], 0, "vCPU {i}: {vm}");
        }
    }
}

/// A fault in the new VMM (`WARMVM_FAULT`, or the refusal `WARMVM_HANDOVER_FAULT`): the
/// reboot must fail, say why and in which phase, and every VM go on in the old VMM.
fn fault_leaves_every_vm_running(env: (&str, &str), expected: &[&str]) {
    if !warmvm_testkit::kvm_available(env.1) {
        return;
    }
    let (code, doc, stderr) = demo(&["--reboot-timeout-secs", "5"], &[env]);
    assert_eq!(
        code,
        Some(1),
        "a failed reboot fails the demo: {doc} {stderr}"
    );
    let error = doc["warm_reboot_error"].as_str().unwrap_or_default();
    for want in expected {
        assert!(
            error.contains(want),
            "{env:?}: {error:?} should mention {want:?}"
        );
    }
    assert!(doc["warm_reboot"].is_null(), "{doc}");
    assert_all_vms_verified(&doc);
}

#[test]
fn new_vmm_refusing_the_state_leaves_vms_running() {
    fault_leaves_every_vm_running(
        (warmvm_vmm::handover::FAULT_ENV, "refuse-state"),
        &["refused the handover", "refuse-state", "transfer phase"],
    );
}

#[test]
fn new_vmm_killed_while_restoring_leaves_vms_running() {
    fault_leaves_every_vm_running(
        ("WARMVM_FAULT", "new:state:kill"),
        &["was killed by signal 9", "restore phase"],
    );
}

#[test]
fn new_vmm_hanging_past_the_ready_budget_leaves_vms_running() {
    fault_leaves_every_vm_running(
        ("WARMVM_FAULT", "new:state:delay:4000"),
        &["sent no Ready within the time allowed", "restore phase"],
    );
}

#[test]
fn new_vmm_killed_while_preparing_leaves_vms_running() {
    fault_leaves_every_vm_running(
        ("WARMVM_FAULT", "new:staged:kill"),
        &["was killed by signal 9", "stage phase"],
    );
}

#[test]
fn new_vmm_killed_after_the_commit_before_its_claim_leaves_vms_running() {
    // It read `Commit` but died before claiming the guests: none ran there, so the old
    // VMM revokes the handover and resumes them.
    fault_leaves_every_vm_running(
        ("WARMVM_FAULT", "new:commit:kill"),
        &["was killed by signal 9", "resume phase"],
    );
}

#[test]
fn new_vmm_stopped_after_the_commit_before_its_claim_leaves_vms_running() {
    fault_leaves_every_vm_running(
        ("WARMVM_FAULT", "new:commit:stop:3000"),
        &["sent no report within", "resume phase"],
    );
}

/// The old VMM itself late (here stopped past the ready budget after sending the state,
/// while the new VMM is long ready): the budget bounds the blackout whichever side was
/// late, so the reboot is abandoned and the VMs run on in the old VMM, although the new
/// VMM's `Ready` is there to be read.
#[test]
fn an_old_vmm_late_past_the_ready_budget_gives_up_and_keeps_its_vms() {
    fault_leaves_every_vm_running(
        ("WARMVM_FAULT", "old:state-sent:delay:800"),
        &["ready budget of 500 ms was spent", "restore phase"],
    );
    fault_leaves_every_vm_running(
        ("WARMVM_FAULT", "old:quiesced:delay:800"),
        &["ready budget of 500 ms was spent", "capture phase"],
    );
}

/// The report of a reboot whose blackout is not known, as the demo prints it: the reboot
/// happened (the VMs run on in the new VMM and verify), but the report says which step's
/// outcome is unknown.
fn unmeasured_reboot(fault: &str) -> (Vec<String>, Value, String) {
    let (code, doc, stderr) = demo(&[], &[("WARMVM_FAULT", fault)]);
    assert_eq!(code, Some(0), "{doc} {stderr}");
    assert!(doc["warm_reboot_error"].is_null(), "{doc}");
    assert_all_vms_verified(&doc);
    let errors = doc["warm_reboot"]["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{fault}: no errors in the report: {doc}"))
        .iter()
        .map(|e| e.as_str().unwrap_or_default().to_string())
        .collect();
    (errors, doc, stderr)
}

/// After the commit the VMs are the new VMM's whatever happens next; a vCPU that does not
/// leave its park then is no 0 µs blackout but an error in the report (and the log), with
/// the blackout given as what it is at least.
#[test]
fn a_vcpu_stuck_in_its_park_after_the_commit_is_reported_not_measured() {
    if !warmvm_testkit::kvm_available("stuck vCPU") {
        return;
    }
    let (errors, doc, stderr) = unmeasured_reboot("new:vcpu-resume:delay:5500");
    assert_eq!(errors.len(), 4, "one per VM's vCPU: {errors:?}");
    for e in &errors {
        assert!(e.contains("did not leave its park"), "{e}");
    }
    // Such a vCPU has no stamp of running (0: not recorded), so no pause is laid over it.
    let unrun = doc["warm_reboot"]["stamps"]["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("no stamps in the report: {doc}"))
        .iter()
        .flat_map(|v| v["vcpu_runs_ns"].as_array().cloned().unwrap_or_default())
        .filter(|t| t.as_u64() == Some(0))
        .count();
    assert_eq!(unrun, errors.len(), "{doc}");
    // Held 5.5 s, given up on after the 5 s vCPU response timeout.
    let host = doc["warm_reboot"]["host_blackout_us"].as_u64().unwrap_or(0);
    assert!(host >= 5_000_000, "a lower bound, not {host} µs: {doc}");
    assert!(stderr.contains("did not leave its park"), "{stderr}");
}

/// The new VMM's report never reaches the old VMM (held past the old one's wait for it):
/// the old VMM reports the reboot without figures and says so, never a 0 µs blackout; the
/// new VMM says in its own report that its report went nowhere.
#[test]
fn a_report_that_never_reaches_the_old_vmm_is_no_figure() {
    if !warmvm_testkit::kvm_available("lost report") {
        return;
    }
    let (errors, _doc, stderr) = unmeasured_reboot("new:running:delay:6500");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("did not reach the old VMM")),
        "{errors:?}"
    );
    assert!(
        stderr.contains("the new VMM took the guests but sent no report"),
        "{stderr}"
    );
}

/// A chain carries its results from VMM to VMM, growing with every reboot; at 456 reboots
/// of 8 VMs they outgrew one control message. Carried filler of 1 MiB (five times what a
/// datagram holds) must arrive whole at every VMM along a chain.
#[test]
fn a_demo_chain_carrying_more_than_a_control_message_holds_passes() {
    if !warmvm_testkit::kvm_available("large carry") {
        return;
    }
    let (code, doc, stderr) = demo(
        &[
            "--reboots",
            "2",
            "--reboot-interval-ms",
            "50",
            "--carry-filler-kib",
            "1024",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{doc} {stderr}");
    assert_eq!(doc["ok"], true, "{doc}");
    assert!(doc["warm_reboot_error"].is_null(), "{doc}");
    assert_eq!(doc["reboot_chain"]["reboots"].as_u64(), Some(2), "{doc}");
    assert_all_vms_verified(&doc);
}

#[test]
fn live_upgrade_to_a_different_build() {
    if !warmvm_testkit::kvm_available("live_upgrade_to_a_different_build") {
        return;
    }
    // Build warmvm a second time, as another build (its own WARMVM_BUILD_ID), in a target
    // directory of its own, and warm-reboot the demo's VMM into it.
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_warmvm"));
    let target = exe
        .ancestors()
        .nth(2)
        .expect("target dir above target/<profile>/warmvm")
        .join("upgrade-build");
    let build_id = format!("upgrade-test-{}", std::process::id());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "warmvm", "--target-dir"])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("WARMVM_BUILD_ID", &build_id)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the upgrade failed");
    let upgrade = target.join("debug").join("warmvm");
    let (code, doc, stderr) = demo(
        &["--upgrade-to", upgrade.to_str().expect("utf-8 path")],
        &[],
    );
    assert_eq!(code, Some(0), "{doc} {stderr}");
    let report = &doc["warm_reboot"];
    assert!(
        report["to_build"]
            .as_str()
            .unwrap_or_default()
            .contains(&build_id),
        "{report}"
    );
    assert!(
        !report["from_build"]
            .as_str()
            .unwrap_or_default()
            .contains(&build_id),
        "{report}"
    );
    assert_all_vms_verified(&doc);
}

#[test]
fn rejuvenation_works_after_the_binary_file_was_replaced() {
    if !warmvm_testkit::kvm_available("rejuvenation_works_after_the_binary_file_was_replaced") {
        return;
    }
    // A package upgrade replaces the file under a running VMM: rejuvenating "with its own
    // binary" must still start the build that is running, not fail on a vanished path.
    let dir = scratch("replaced");
    let copy = dir.join("warmvm");
    std::fs::copy(env!("CARGO_BIN_EXE_warmvm"), &copy).expect("binary copied");
    let child = Command::new(&copy)
        .args([
            "demo",
            "--json",
            "--memory-mib",
            "64",
            "--seconds",
            "4",
            "--reboots",
            "2",
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("warmvm copy runs");
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::remove_file(&copy).expect("binary deleted under the running VMM");
    let out = child.wait_with_output().expect("demo finishes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{doc}");
    assert_eq!(doc["reboot_chain"]["reboots"].as_u64(), Some(2), "{doc}");
    assert_all_vms_verified(&doc);
    let _ = std::fs::remove_dir_all(dir);
}
