//! The fault campaign (`warmvm bench faults`) as a test: faults injected at every named
//! point of both sides of a warm reboot (crates/vmm/src/handover/faults.rs) must never
//! corrupt a VM, and lose VMs only where the process that owned them was killed.

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::warmvm;
use serde_json::Value;

/// The campaigns share two cores: one at a time, so that load does not decide outcomes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Run `warmvm bench faults --json` with `args`; its exit status and document.
fn bench(args: &[&str]) -> (Option<i32>, Value) {
    let out = Command::new(warmvm())
        .args([
            "bench",
            "faults",
            "--json",
            "--vms",
            "2",
            "--memory-mib",
            "64",
        ])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), doc)
}

fn trials(doc: &Value) -> &Vec<Value> {
    doc["trials"].as_array().expect("trials")
}

/// Random faults (kill, stop, delay below and above the ready budget, panic) spread evenly
/// over every point of both sides: none may corrupt a VM, leave two daemons alive, or lose
/// VMs whose owner was not killed. CI runs 72 trials (one round of every point and action
/// kind); `WARMVM_FAULT_TRIALS` and `WARMVM_FAULT_SEED` change the count and the draw.
#[test]
fn random_faults_never_corrupt_or_lose_vms_of_a_live_owner() {
    if !warmvm_vmm::testing::kvm_available(
        "random_faults_never_corrupt_or_lose_vms_of_a_live_owner",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let n = std::env::var("WARMVM_FAULT_TRIALS").unwrap_or_else(|_| "72".into());
    let seed = std::env::var("WARMVM_FAULT_SEED").unwrap_or_else(|_| "20261130".into());
    let (code, doc) = bench(&["--trials", &n, "--seed", &seed]);
    let trials = trials(&doc);
    assert_eq!(trials.len().to_string(), n, "{doc}");
    let failures: Vec<String> = trials
        .iter()
        .filter(|t| t["failure"] != false)
        .map(|t| format!("{} -> {}: {}", t["fault"], t["outcome"], t["detail"]))
        .collect();
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {n} trials failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A fault that never fired tested nothing: every point must be reached.
    let unfired: Vec<&Value> = trials
        .iter()
        .filter(|t| t["fired"] != true)
        .map(|t| &t["fault"])
        .collect();
    assert!(unfired.is_empty(), "faults that never fired: {unfired:?}");
    assert_eq!(code, Some(0), "the bench's exit status: {doc}");
}

/// Each point of both sides killed once, and what the protocol promises for it.
#[test]
fn a_kill_at_each_point_ends_as_the_protocol_promises() {
    if !warmvm_vmm::testing::kvm_available("a_kill_at_each_point_ends_as_the_protocol_promises") {
        return;
    }
    const LOST: &[&str] = &["lost (owner killed)"];
    const OLD: &[&str] = &["running-in-old"];
    const NEW: &[&str] = &["running-in-new"];
    let expected: [(&str, &[&str]); 18] = [
        // The old VMM owns the VMs until it has sent the state; killed before that, they
        // die with it. The new VMM has at most their RAM and no vCPU state: it must not
        // run them, and exits when the channel closes.
        ("old:spawned", LOST),
        ("old:staged", LOST),
        ("old:prepared", LOST),
        // The blackout has begun: the guests are parked in the process being killed.
        ("old:quiesced", LOST),
        // Captured, but the state never left the old VMM.
        ("old:captured", LOST),
        // The state was sent and then the old VMM's end of the channel closed: it is
        // provably gone, so the new VMM adopts the VMs and runs them.
        ("old:state-sent", NEW),
        // `Ready` arrived but no decision was sent: the same, the old VMM is gone.
        ("old:ready", NEW),
        // `Commit` was sent: the VMs are the new VMM's.
        ("old:committed", NEW),
        // The new VMM's report arrived: the old one was about to exit anyway.
        ("old:done", NEW),
        // The guests never stopped: the old VMM sees the channel close and carries on.
        ("new:hello", OLD),
        ("new:staged", OLD),
        // `Prepared` was sent; the old VMM may already be quiescing. It sees the channel
        // close, waits until the new VMM is gone, and resumes its own VMs.
        ("new:prepared", OLD),
        // The state arrived but nothing ran: the old VMM gets no `Ready` and resumes.
        ("new:state", OLD),
        // Restored without running a guest instruction, and no `Ready` sent: the same.
        ("new:restored", OLD),
        // `Ready` was sent but the new VMM died before it received `Commit`, so it never
        // ran a guest instruction: the old VMM must notice (its `Commit` cannot be sent,
        // or was never read) and resume its VMs.
        ("new:ready-sent", OLD),
        // `Commit` received, but the new VMM died before it claimed the guests (the shared
        // commit word): no guest ran there, so the old VMM, hearing no report, revokes the
        // claim and resumes its VMs.
        ("new:commit", OLD),
        // Claimed and running in the new VMM, which is killed: they die with it.
        ("new:running", LOST),
        // The report was sent and the old VMM exits; the new one that ran them is killed.
        ("new:reported", LOST),
    ];
    each_point_once("kill", &expected);
}

/// A panic on the handover thread itself at each point of both sides: the process is
/// alive, so no VM may be lost. Before `Commit` the guests resume in the old VMM; once
/// they run in the new one, a panic there costs the report, never the guests. At
/// `old:committed` the old VMM's revocation races with the new VMM's claim, so either
/// may end up running them (never both).
#[test]
fn a_panic_at_each_point_leaves_every_vm_running() {
    if !warmvm_vmm::testing::kvm_available("a_panic_at_each_point_leaves_every_vm_running") {
        return;
    }
    const OLD: &[&str] = &["running-in-old"];
    const NEW: &[&str] = &["running-in-new"];
    const EITHER: &[&str] = &["running-in-old", "running-in-new"];
    let expected: [(&str, &[&str]); 18] = [
        ("old:spawned", OLD),
        ("old:staged", OLD),
        ("old:prepared", OLD),
        ("old:quiesced", OLD),
        ("old:captured", OLD),
        ("old:state-sent", OLD),
        ("old:ready", OLD),
        ("old:committed", EITHER),
        ("old:done", NEW),
        ("new:hello", OLD),
        ("new:staged", OLD),
        ("new:prepared", OLD),
        ("new:state", OLD),
        ("new:restored", OLD),
        ("new:ready-sent", OLD),
        ("new:commit", OLD),
        ("new:running", NEW),
        ("new:reported", NEW),
    ];
    each_point_once("panic", &expected);
}

/// `action` at each point of `expected`, one trial each in that order: each must fire and
/// end in one of the outcomes listed for its point, and no trial may be a failure.
fn each_point_once(action: &str, expected: &[(&str, &[&str])]) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut args = Vec::new();
    for (point, _) in expected {
        args.push("--fault".to_string());
        args.push(format!("{point}:{action}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, doc) = bench(&args);
    let trials = trials(&doc);
    assert_eq!(trials.len(), expected.len(), "{doc}");
    let mut wrong = Vec::new();
    for ((point, want), t) in expected.iter().zip(trials) {
        assert_eq!(t["fault"], format!("{point}:{action}"));
        let got = t["outcome"].as_str().unwrap_or_default();
        if !want.contains(&got) || t["fired"] != true {
            wrong.push(format!(
                "{point}: {got} (fired: {}), expected one of {want:?}; {}",
                t["fired"], t["detail"]
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(code, Some(0), "no trial is a failure: {doc}");
}
