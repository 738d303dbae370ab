//! A VM's uptime is the time it has existed, whichever VMM process runs it: warm reboots
//! must neither lose the time spent staging them nor restart the count.

use std::time::Instant;

use warmvm_testkit::*;

/// The VM's uptime, and the wall-clock window in which it was read.
fn uptime(d: &Daemon, name: &str) -> (Instant, u64, Instant) {
    let before = Instant::now();
    let vm = d.client().show(name).expect("the VM is listed");
    let after = Instant::now();
    (before, vm["uptime_ms"].as_u64().expect("uptime_ms"), after)
}

#[test]
fn uptime_counts_the_time_a_vm_existed_across_warm_reboots() {
    if !warmvm_testkit::kvm_available("uptime across warm reboots") {
        return;
    }
    let mut d = Daemon::start(&scratch("uptime"), &[]);
    d.client()
        .create(&serde_json::from_value(reference_vm("u")).expect("a VM config"))
        .expect("VM created");
    let (b1, u1, a1) = uptime(&d, "u");
    for _ in 0..4 {
        let report = d.client().reboot("warm", None).expect("warm reboot");
        d.follow_reboot(report["new_pid"].as_u64().expect("new_pid") as u32);
    }
    let (b2, u2, a2) = uptime(&d, "u");
    // Whatever the exact moments of the two reads, the uptime moved on by at least the
    // shortest and at most the longest wall-clock time between them (1 ms of rounding:
    // uptime is whole milliseconds).
    let shortest = b2.duration_since(a1).as_millis() as u64;
    let longest = a2.duration_since(b1).as_millis() as u64;
    let moved = u2 - u1;
    assert!(
        moved + 1 >= shortest && moved <= longest + 1,
        "uptime moved {moved} ms while {shortest}..{longest} ms passed\n{}",
        d.log()
    );
}
