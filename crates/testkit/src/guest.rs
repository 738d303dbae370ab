//! Reference guests seen through a daemon's API: create them, read their figures, wait
//! until they have verified their memory.

use serde_json::{json, Value};

use crate::{wait_until, Daemon};

/// Guests that rewrite and re-verify their memory without pause: any state or RAM the
/// wrong VMM touched shows up as mismatches.
pub const BUSY: &str = "quiet interval_ms=0 refill_every=1";

/// A reference VM of 64 MiB that verifies its memory every 20 ms.
pub fn reference_vm(name: &str) -> Value {
    json!({ "name": name, "memory_mib": 64, "cmdline": "quiet interval_ms=20" })
}

/// `GET /v1/vms/NAME`, which must answer.
pub fn show(d: &Daemon, name: &str) -> Value {
    d.client()
        .show(name)
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log()))
}

/// The guest has verified all its pages `passes` more times than when called, cleanly
/// (no mismatch, its clock never went back): the guest's own evidence that its memory
/// and registers are intact.
pub fn verifies_on(d: &Daemon, name: &str, passes: u64) {
    let start = show(d, name)["guest"]["min_passes"].as_u64().unwrap_or(0);
    assert!(
        wait_until(120, || {
            let g = &show(d, name)["guest"];
            if g.is_null() {
                // A guest that has just started has not reported yet.
                return false;
            }
            assert_eq!(g["mismatches"], 0, "{name}: {g}");
            assert_eq!(g["time_went_backwards"], 0, "{name}: {g}");
            g["min_passes"].as_u64().unwrap_or(0) >= start + passes
        }),
        "{name} does not verify on: {}\n{}",
        show(d, name),
        d.log()
    );
}

/// Create a reference VM (see [`reference_vm`]) and wait until its guest has verified
/// its memory once.
pub fn create(d: &Daemon, name: &str) {
    d.client()
        .create(&serde_json::from_value(reference_vm(name)).expect("a VM config"))
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log()));
    verifies_on(d, name, 1);
}

/// A VM's progress counter, from its `GET /v1/vms/NAME` answer.
pub fn counter(vm: &Value) -> u64 {
    vm["guest"]["counter"].as_u64().unwrap_or(0)
}

/// Pages each of the VM's vCPUs has verified, from its `GET /v1/vms/NAME` answer.
pub fn verified(vm: &Value) -> Vec<u64> {
    vm["guest"]["vcpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["pages_verified"].as_u64().unwrap_or(0))
        .collect()
}

/// Each VM's (name, state, progress counter, mismatches + register check failures +
/// times time went backwards), from `GET /v1/vms`.
pub fn figures(d: &Daemon) -> Vec<(String, String, u64, u64)> {
    let list = d.client().list().expect("the daemon answers");
    list["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|vm| {
            let g = &vm["guest"];
            let bad = g["mismatches"].as_u64().unwrap_or(0)
                + g["register_check_failures"].as_u64().unwrap_or(0)
                + g["time_went_backwards"].as_u64().unwrap_or(0);
            (
                vm["name"].as_str().unwrap_or_default().to_string(),
                vm["state"].as_str().unwrap_or_default().to_string(),
                counter(vm),
                bad,
            )
        })
        .collect()
}
