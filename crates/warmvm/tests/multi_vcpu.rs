//! VMs with several vCPUs through every way a VM's state moves: a warm reboot, a snapshot
//! restored beside the original, a saved reboot and a cold reboot. The reference guest
//! splits its memory over its vCPUs (page k belongs to vCPU k % vcpus), and each vCPU
//! reports its own figures: so each vCPU is judged on its own, from inside the guest. A
//! vCPU whose state was lost or never restored stops verifying (or starts over from zero)
//! while the others go on, which a judgement of the VM as a whole could miss.

use serde_json::Value;

use warmvm_testkit::{scratch, show, wait_until, Daemon};

/// One vCPU's figures as the guest reported them.
#[derive(Clone, Debug)]
struct VcpuFigures {
    pages_owned: u64,
    passes: u64,
    counter: u64,
}

/// Each vCPU's figures of VM `name`; panics on anything the guest counts as wrong (a
/// mismatch, a register that changed under it, its clock going back).
fn vcpu_figures(d: &Daemon, name: &str) -> Vec<VcpuFigures> {
    let vm = show(d, name);
    let Some(vcpus) = vm["guest"]["vcpus"].as_array() else {
        return Vec::new();
    };
    vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| {
            for bad in [
                "mismatches",
                "register_check_failures",
                "time_went_backwards",
            ] {
                assert_eq!(v[bad], 0, "{name} vCPU {i}: {bad}\n{vm}");
            }
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            VcpuFigures {
                pages_owned: n("pages_owned"),
                passes: n("passes"),
                counter: n("counter"),
            }
        })
        .collect()
}

/// Wait until every one of the `vcpus` vCPUs of `name` has owned pages and verified all of
/// them `passes` more times than in `before` (or at all, with no `before`). With `before`
/// and `continues`, each vCPU's counter must also carry on from where it was: a vCPU that
/// was booted again, or lost its state, would count from zero.
fn every_vcpu_verifies(
    d: &Daemon,
    name: &str,
    vcpus: usize,
    before: Option<&[VcpuFigures]>,
    continues: bool,
) -> Vec<VcpuFigures> {
    let mut checked_continuity = false;
    let mut last = Vec::new();
    let ok = wait_until(120, || {
        last = vcpu_figures(d, name);
        if last.len() != vcpus {
            return false;
        }
        if let (Some(before), true, false) = (before, continues, checked_continuity) {
            for (i, (b, a)) in before.iter().zip(&last).enumerate() {
                assert!(
                    a.counter >= b.counter,
                    "{name} vCPU {i}: counter {} after, {} before: it started over\n{}",
                    a.counter,
                    b.counter,
                    d.log()
                );
            }
            checked_continuity = true;
        }
        last.iter().enumerate().all(|(i, a)| {
            let base = before.map_or(0, |b| b[i].passes);
            a.pages_owned > 0 && a.passes > base
        })
    });
    assert!(
        ok,
        "{name}: not every one of its {vcpus} vCPUs verifies on: {last:?}\n{}",
        show(d, name)
    );
    last
}

fn warm_reboot(d: &mut Daemon) {
    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    let new_pid = report["new_pid"].as_u64().expect("new_pid") as u32;
    d.follow_reboot(new_pid);
}

fn daemon_reboot(d: &mut Daemon, mode: &str) -> Value {
    let out = d.cli_json(&["reboot", "--mode", mode, "--grace-secs", "5"]);
    let new_pid = out["handover"]["new_pid"].as_u64().expect("new_pid") as u32;
    d.follow_reboot(new_pid);
    for v in out["reboot"]["vms"].as_array().expect("vms") {
        assert!(v["error"].is_null(), "{mode}: {v}");
    }
    out
}

/// One VM of `vcpus` vCPUs through a warm reboot, a snapshot and its restore under a new
/// name, a saved reboot and a cold reboot, every vCPU judged after each.
fn every_vcpu_survives_every_mode(vcpus: usize) {
    if !warmvm_testkit::kvm_available("multi_vcpu") {
        return;
    }
    let dir = scratch(&format!("mvcpu{vcpus}"));
    let mut d = Daemon::start(&dir, &[]);
    let config = serde_json::json!({
        "name": "mv",
        "memory_mib": 64,
        "vcpus": vcpus,
        "cmdline": "quiet interval_ms=20",
    });
    d.client()
        .create(&serde_json::from_value(config).expect("a VM config"))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let booted = every_vcpu_verifies(&d, "mv", vcpus, None, false);
    // The guest split its memory over all its vCPUs: each owns about 1/vcpus of it.
    let owned: Vec<u64> = booted.iter().map(|v| v.pages_owned).collect();
    let (min, max) = (owned.iter().min().unwrap(), owned.iter().max().unwrap());
    assert!(max - min <= 1, "uneven split over the vCPUs: {owned:?}");

    let before = vcpu_figures(&d, "mv");
    warm_reboot(&mut d);
    every_vcpu_verifies(&d, "mv", vcpus, Some(&before), true);

    let snap = dir.join("snaps").join("mv");
    let before = vcpu_figures(&d, "mv");
    let r = d.cli_json(&["vm", "snapshot", "mv", snap.to_str().unwrap()]);
    assert_eq!(r["resumed"], true, "{r}");
    let r = d.cli_json(&["vm", "restore", snap.to_str().unwrap(), "--name", "copy"]);
    assert_eq!(r["state"], "running", "{r}");
    every_vcpu_verifies(&d, "copy", vcpus, Some(&before), true);
    every_vcpu_verifies(&d, "mv", vcpus, Some(&before), true);
    for step in [
        &["vm", "stop", "copy", "--grace-secs", "5"][..],
        &["vm", "delete", "copy"],
    ] {
        let out = d.cli(step);
        assert!(out.status.success(), "{step:?}: {out:?}");
    }

    let before = vcpu_figures(&d, "mv");
    daemon_reboot(&mut d, "saved");
    every_vcpu_verifies(&d, "mv", vcpus, Some(&before), true);

    daemon_reboot(&mut d, "cold");
    let vm = show(&d, "mv");
    assert!(
        vm["uptime_ms"].as_u64().unwrap_or(u64::MAX) < 60_000,
        "{vm}"
    );
    // Booted again: every vCPU starts over and verifies its share once more.
    every_vcpu_verifies(&d, "mv", vcpus, None, false);
    d.terminate_adopted();
}

#[test]
fn one_vcpu_survives_warm_saved_cold_reboots_and_a_snapshot() {
    every_vcpu_survives_every_mode(1);
}

#[test]
fn two_vcpus_each_survive_warm_saved_cold_reboots_and_a_snapshot() {
    every_vcpu_survives_every_mode(2);
}

#[test]
fn four_vcpus_each_survive_warm_saved_cold_reboots_and_a_snapshot() {
    every_vcpu_survives_every_mode(4);
}
