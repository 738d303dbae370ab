//! The VMM's own bugs must not take the guests with them. A panic on a vCPU thread ends
//! that VM only (crashed, with the reason) and blocks no later reboot; a panic anywhere
//! else makes the daemon warm-reboot into a fresh process that runs every VM on. The
//! panics are injected through the test build's `PUT /v1/debug/panic`.

use serde_json::{json, Value};
use warmvm_testkit::*;

/// Every running VM's counter moves on from `before` with nothing corrupted.
fn assert_running_and_verifying(d: &Daemon, before: &[(String, String, u64, u64)]) {
    let moved = wait_until(30, || {
        let now = figures(d);
        now.len() == before.len()
            && now
                .iter()
                .zip(before)
                .all(|(n, b)| n.0 == b.0 && (b.1 != "running" || (n.1 == "running" && n.2 > b.2)))
    });
    let now = figures(d);
    assert!(moved, "before {before:?}, now {now:?}\n{}", d.log());
    for vm in &now {
        assert_eq!(vm.3, 0, "{vm:?} reports corruption\n{}", d.log());
    }
}

fn daemon_with_vms(tag: &str, names: &[&str]) -> Daemon {
    let d = Daemon::start(&scratch(tag), &[]);
    d.create_reference_vms(names);
    d
}

fn inject(d: &Daemon, body: Value) -> Result<Value, String> {
    d.client()
        .raw("PUT", "/v1/debug/panic", Some(body.to_string().as_bytes()))
        .map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null))
        .map_err(|e| e.to_string())
}

/// The daemon now serving the socket, once it is another process than `old_pid`.
fn new_daemon_pid(d: &Daemon, old_pid: u32) -> u32 {
    let mut pid = old_pid;
    let changed = wait_until(60, || {
        pid = d
            .client()
            .status()
            .ok()
            .and_then(|s| s["pid"].as_u64())
            .unwrap_or(old_pid as u64) as u32;
        pid != old_pid
    });
    assert!(changed, "no new daemon took over\n{}", d.log());
    pid
}

fn a_panic_moves_every_vm_to_a_fresh_daemon(thread: &str) {
    if !warmvm_testkit::kvm_available(thread) {
        return;
    }
    let mut d = daemon_with_vms(&format!("panic-{thread}"), &["p1", "p2"]);
    let before = figures(&d);
    let old_pid = d.pid;
    // An API thread dies without answering; the others answer 202 first.
    let answer = inject(&d, json!({ "in": thread }));
    if thread != "api" {
        assert!(answer.is_ok(), "{answer:?}");
    }
    let new_pid = new_daemon_pid(&d, old_pid);
    d.follow_reboot(new_pid);
    let status = d.client().status().expect("status");
    assert_eq!(status["last_takeover"]["previous_pid"], old_pid, "{status}");
    assert_eq!(status["last_takeover"]["commit_protocol"], true, "{status}");
    assert!(
        d.log().contains("emergency warm reboot"),
        "the old daemon says why it rebooted\n{}",
        d.log()
    );
    assert_running_and_verifying(&d, &before);
}

#[test]
fn a_panic_in_an_api_thread_moves_every_vm_to_a_fresh_daemon() {
    a_panic_moves_every_vm_to_a_fresh_daemon("api");
}

#[test]
fn a_panic_in_the_console_thread_moves_every_vm_to_a_fresh_daemon() {
    a_panic_moves_every_vm_to_a_fresh_daemon("console");
}

#[test]
fn a_panic_in_the_main_loop_moves_every_vm_to_a_fresh_daemon() {
    a_panic_moves_every_vm_to_a_fresh_daemon("main");
}

#[test]
fn a_panic_on_a_vcpu_thread_crashes_that_vm_only_and_blocks_no_reboot() {
    if !warmvm_testkit::kvm_available("vcpu panic") {
        return;
    }
    let mut d = daemon_with_vms("panic-vcpu", &["hit", "spared"]);
    let old_pid = d.pid;
    inject(&d, json!({ "in": "vcpu", "vm": "hit" })).expect("injected");
    let crashed = || {
        d.client()
            .show("hit")
            .ok()
            .filter(|vm| vm["state"] == "crashed")
    };
    assert!(wait_until(30, || crashed().is_some()), "{}", d.log());
    let reason = crashed().unwrap()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("panicked"), "{reason}");
    assert_eq!(d.pid, old_pid, "a vCPU panic is not a reason to reboot");
    let before = figures(&d);
    // The crashed VM's exited thread must not hold the reboot up, and the VM crosses with
    // its state and reason, so the API lists the same VMs before and after.
    let report = d.client().reboot("warm", None).expect("warm reboot");
    let new_pid = report["new_pid"].as_u64().expect("new_pid") as u32;
    d.follow_reboot(new_pid);
    let hit = d
        .client()
        .show("hit")
        .expect("the crashed VM is still listed");
    assert_eq!(hit["state"], "crashed", "{hit}");
    assert_eq!(hit["reason"].as_str(), Some(reason.as_str()), "{hit}");
    assert_running_and_verifying(&d, &before);
    // And it can be deleted in the new daemon.
    d.client()
        .delete("hit", false)
        .expect("delete the crashed VM");
}

#[test]
fn a_failed_emergency_reboot_is_retried_after_waits_and_the_vms_run_on() {
    if !warmvm_testkit::kvm_available("emergency reboot retry") {
        return;
    }
    // Every new daemon dies as it starts, so every attempt fails the same way: the old
    // daemon must space its attempts out, then keep running the VMs.
    let mut d = Daemon::builder(&scratch("panic-retry"))
        .envs(&[("WARMVM_FAULT", "new:hello:kill")])
        .start();
    d.create_reference_vms(&["r1"]);
    let old_pid = d.pid;
    inject(&d, json!({ "in": "console" })).expect("injected");
    let attempts = 1 + 5;
    let failures = || d.log().matches("emergency warm reboot failed").count();
    assert!(
        wait_until(120, || failures() >= attempts),
        "{} of {attempts} attempts failed\n{}",
        failures(),
        d.log()
    );
    let log = d.log();
    let retry_times: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("retrying the emergency warm reboot"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(retry_times.len(), attempts - 1, "{log}");
    assert_eq!(
        d.client().status().expect("status")["pid"],
        old_pid,
        "no daemon took over"
    );
    let before = figures(&d);
    assert_running_and_verifying(&d, &before);
    d.terminate();
}
