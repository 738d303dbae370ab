//! Every failure path of the saved and cold reboots: the old or the new daemon is killed,
//! stopped or delayed at each step (`WARMVM_FAULT`, see vmm/src/handover/faults.rs), and
//! the guests' own figures (their memory verification passes and mismatches, their
//! counters, their uptime) show what became of each VM.
//!
//! What the protocol promises (api/src/bring_back.rs): before the commit the old daemon
//! keeps every VM; after it, the bring-back manifest lets the next daemon bring back every
//! VM that no process ran yet. A VM may be lost only with the process that owned it when
//! that process was killed, and never runs twice from two states.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use warmvm_testkit::{counter, create, pid_alive, scratch, show, verifies_on, wait_until, Daemon};

const VMS: [&str; 2] = ["v1", "v2"];

/// A daemon with two verifying reference VMs (64 MiB, verifying every 20 ms), started
/// with `WARMVM_FAULT=fault` (inherited by the daemon a reboot starts).
struct Setup {
    d: Daemon,
    mode: &'static str,
    fault: String,
    /// Each VM's guest figures just before the reboot.
    before: Vec<Value>,
    /// Just before the reboot: a VM booted again has an uptime shorter than since then.
    rebooted_at: Instant,
}

fn setup(tag: &str, mode: &'static str, fault: &str) -> Setup {
    let dir = scratch(&format!("rmf-{tag}"));
    let d = Daemon::start_with_env(&dir, &[], &[("WARMVM_FAULT", fault)]);
    for n in VMS {
        create(&d, n);
    }
    let before = VMS.iter().map(|n| show(&d, n)).collect();
    Setup {
        d,
        mode,
        fault: fault.to_string(),
        before,
        rebooted_at: Instant::now(),
    }
}

impl Setup {
    fn reboot(&mut self) -> Result<Value, String> {
        self.rebooted_at = Instant::now();
        let grace = (self.mode == "cold").then_some(5);
        self.d
            .client()
            .reboot_with(self.mode, None, grace)
            .map_err(|e| e.to_string())
    }

    /// The fault point was reached and acted on (else the test would prove nothing).
    fn fired(&self) {
        let line = format!("fault injected fault={}", self.fault);
        assert!(self.d.log().contains(&line), "{line}\n{}", self.d.log());
    }

    fn manifest(&self) -> PathBuf {
        self.d
            .dir
            .join("state")
            .join("saved-reboot")
            .join("bring-back.json")
    }

    fn names(&self) -> Vec<String> {
        let list = self.d.client().list().unwrap();
        let mut names: Vec<String> = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    /// VM `i` is back as the mode promises, seen from inside its guest: saved, it goes on
    /// from its state before the reboot (counter and passes not reset) and verifies all
    /// its memory with no mismatch; cold, it booted again after the reboot began and
    /// verifies.
    fn is_back(&self, i: usize) {
        let name = VMS[i];
        let now = show(&self.d, name);
        assert_eq!(now["state"], "running", "{now}\n{}", self.d.log());
        match self.mode {
            "saved" => self.went_on(i),
            _ => {
                let up = now["uptime_ms"].as_u64().unwrap();
                assert!(
                    up <= self.rebooted_at.elapsed().as_millis() as u64,
                    "{name} was not booted again: up {up} ms: {now}"
                );
                verifies_on(&self.d, name, 1);
            }
        }
    }

    /// VM `i` went on from where it was (its memory and registers survived): its
    /// counter and verification passes did not start over, and it verifies on cleanly.
    fn went_on(&self, i: usize) {
        let name = VMS[i];
        let now = show(&self.d, name);
        let was = &self.before[i]["guest"];
        // The VM existed before the reboot (a VM booted again would be younger).
        let up = now["uptime_ms"].as_u64().unwrap();
        assert!(
            up > self.rebooted_at.elapsed().as_millis() as u64,
            "{name} is younger than the reboot: {now}"
        );
        assert!(
            counter(&now) >= counter(&self.before[i]),
            "{name}: {now} was {was}"
        );
        assert!(
            now["guest"]["min_passes"].as_u64() >= was["min_passes"].as_u64(),
            "{name}: {now} was {was}"
        );
        verifies_on(&self.d, name, 1);
    }

    /// The new daemon `new_pid` was killed after the commit and the old one exited: start
    /// a daemon again (without the fault) on the same state directory.
    fn restart_after(&mut self, new_pid: u32) {
        assert!(
            wait_until(30, || !pid_alive(new_pid)),
            "the new daemon {new_pid} was not killed\n{}",
            self.d.log()
        );
        self.d.start_again(&[], &[]);
    }

    /// What the daemon says of the reboot it finished (`last_reboot`).
    fn last_reboot(&self) -> Value {
        self.d.client().status().unwrap()["last_reboot"].clone()
    }
}

fn new_pid(answer: &Value) -> u32 {
    answer["new_pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("{answer}")) as u32
}

/// The new daemon killed before the commit: the old daemon keeps every VM (saved: resumed
/// from memory, going on where it was; cold: booted again from its config, as the
/// guests were already powered off) and no manifest is left.
fn killed_before_commit(mode: &'static str) {
    let mut s = setup(&format!("{mode}-pre"), mode, "new:ready-sent:kill");
    let old = s.d.pid;
    let e = s.reboot().expect_err("the reboot must fail");
    s.fired();
    assert!(e.contains("run on in this daemon"), "{e}");
    assert_eq!(s.d.client().status().unwrap()["pid"], old);
    assert!(!s.manifest().exists());
    assert_eq!(s.names(), VMS);
    for i in 0..VMS.len() {
        s.is_back(i);
    }
}

/// The new daemon killed after the commit, before it brought any VM back: the next
/// daemon brings every VM back from the manifest.
fn killed_before_bringing_back(mode: &'static str) {
    let mut s = setup(&format!("{mode}-bb"), mode, "new:bring-back:kill");
    let pid = new_pid(&s.reboot().unwrap());
    s.restart_after(pid);
    s.fired();
    assert_eq!(s.names(), VMS);
    for i in 0..VMS.len() {
        s.is_back(i);
    }
    let rep = s.last_reboot();
    assert_eq!(rep["recovered"], true, "{rep}");
    assert_eq!(rep["mode"], mode, "{rep}");
    for v in rep["vms"].as_array().unwrap() {
        assert!(v["error"].is_null(), "{rep}");
    }
    assert!(!s.manifest().exists());
}

/// The new daemon killed with the first VM taken off the manifest (restored or created,
/// not run): that VM is lost with its owner and not brought back; the other one is.
/// `point` claimed-one: the first VM never ran; brought-back-one: it ran, in the killed
/// daemon only.
fn killed_with_the_first_vm_claimed(mode: &'static str, point: &str) {
    let mut s = setup(
        &format!("{mode}-{point}"),
        mode,
        &format!("new:{point}:kill"),
    );
    let pid = new_pid(&s.reboot().unwrap());
    s.restart_after(pid);
    s.fired();
    // Nothing runs twice: the killed daemon is gone, and the first VM is not here.
    assert!(!pid_alive(pid));
    assert_eq!(s.names(), [VMS[1]]);
    s.is_back(1);
    let rep = s.last_reboot();
    assert_eq!(rep["recovered"], true, "{rep}");
    let names: Vec<&str> = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [VMS[1]], "{rep}");
    assert!(!s.manifest().exists());
}

/// The new daemon stopped or delayed after the commit: it brings every VM back itself in
/// that same reboot.
fn held_up_before_bringing_back(mode: &'static str, action: &str) {
    let tag = format!("{mode}-{}", action.replace(':', ""));
    let mut s = setup(&tag, mode, &format!("new:bring-back:{action}"));
    let pid = new_pid(&s.reboot().unwrap());
    s.d.follow_reboot(pid);
    s.fired();
    assert_eq!(s.names(), VMS);
    for i in 0..VMS.len() {
        s.is_back(i);
    }
    let rep = s.last_reboot();
    assert_eq!(rep["recovered"], false, "{rep}");
    for v in rep["vms"].as_array().unwrap() {
        assert!(v["error"].is_null(), "{rep}");
    }
    assert!(!s.manifest().exists());
    s.d.terminate_adopted();
}

/// The old daemon killed once the manifest is durable (every VM saved or powered off,
/// none resumed): the VMs died with their owner, and the next daemon brings them back
/// from the manifest (saved: from consistent snapshots, going on where they were).
fn old_killed_with_the_manifest_written(mode: &'static str) {
    let mut s = setup(&format!("{mode}-om"), mode, "old:manifest:kill");
    let old = s.d.pid;
    assert!(s.reboot().is_err());
    s.fired();
    assert!(s.manifest().exists());
    s.restart_after(old);
    assert_eq!(s.names(), VMS);
    for i in 0..VMS.len() {
        s.is_back(i);
    }
    let rep = s.last_reboot();
    assert_eq!(rep["recovered"], true, "{rep}");
    assert_eq!(rep["previous_pid"], old, "{rep}");
    assert!(!s.manifest().exists());
}

/// VMs to bring back in a format the new daemon does not read (as a successor of another
/// build would see them) are refused before the commit: the old daemon keeps every VM and
/// removes the manifest; nothing is left for a later daemon to bring back a second time.
fn unreadable_bring_back_is_refused_before_the_commit(mode: &'static str) {
    let dir = scratch(&format!("rmf-{mode}-fmt"));
    let d = Daemon::start_with_env(&dir, &[], &[("WARMVM_FAULT_BRING_BACK_VERSION", "99")]);
    for n in VMS {
        create(&d, n);
    }
    let mut s = Setup {
        before: VMS.iter().map(|n| show(&d, n)).collect(),
        d,
        mode,
        fault: String::new(),
        rebooted_at: Instant::now(),
    };
    let old = s.d.pid;
    let e = s.reboot().expect_err("the reboot must fail");
    assert!(e.contains("format 99"), "{e}\n{}", s.d.log());
    assert!(e.contains("run on in this daemon"), "{e}");
    assert_eq!(s.d.client().status().unwrap()["pid"], old);
    assert!(!s.manifest().exists());
    assert_eq!(s.names(), VMS);
    for i in 0..VMS.len() {
        s.is_back(i);
    }
}

/// A failed reboot's undo removes the manifest durably before it resumes (saved) or boots
/// again (cold) any VM, so that no manifest ever names a VM this daemon runs: the old
/// daemon is stopped right between the two, and the manifest must already be gone then.
fn manifest_gone_before_any_vm_runs_again(mode: &'static str) {
    let undoing = "old:undoing:stop:3000";
    let mut s = setup(
        &format!("{mode}-undo"),
        mode,
        &format!("new:ready-sent:kill,{undoing}"),
    );
    let old = s.d.pid;
    let manifest = s.manifest();
    let watcher = std::thread::spawn(move || {
        // /proc/PID/stat's third field: T while stopped.
        let stopped = || {
            std::fs::read_to_string(format!("/proc/{old}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('T'))
                })
                .unwrap_or(false)
        };
        let seen = wait_until(60, stopped);
        (seen, manifest.exists())
    });
    let e = s.reboot().expect_err("the reboot must fail");
    assert!(e.contains("run on in this daemon"), "{e}");
    let (seen, manifest_then) = watcher.join().expect("the watcher");
    let line = format!("fault injected fault={undoing}");
    assert!(s.d.log().contains(&line), "{line}\n{}", s.d.log());
    assert!(
        seen,
        "the old daemon never stopped at the undo point\n{}",
        s.d.log()
    );
    assert!(
        !manifest_then,
        "the manifest was still there with the VMs about to run again"
    );
    assert!(!s.manifest().exists());
    assert_eq!(s.names(), VMS);
    for i in 0..VMS.len() {
        s.is_back(i);
    }
}

macro_rules! for_both_modes {
    ($($name:ident => |$mode:ident| $body:expr;)*) => {
        mod saved {
            use super::*;
            $(#[test]
            fn $name() {
                if !warmvm_testkit::kvm_available(concat!("saved_", stringify!($name))) {
                    return;
                }
                let $mode = "saved";
                $body
            })*
        }
        mod cold {
            use super::*;
            $(#[test]
            fn $name() {
                if !warmvm_testkit::kvm_available(concat!("cold_", stringify!($name))) {
                    return;
                }
                let $mode = "cold";
                $body
            })*
        }
    };
}

for_both_modes! {
    killing_the_new_daemon_before_the_commit_leaves_every_vm_in_the_old => |mode| killed_before_commit(mode);
    killing_the_new_daemon_after_the_commit_leaves_every_vm_to_the_next_daemon => |mode| killed_before_bringing_back(mode);
    a_vm_taken_off_the_manifest_dies_with_the_killed_daemon_the_others_come_back => |mode| killed_with_the_first_vm_claimed(mode, "claimed-one");
    a_vm_that_ran_in_the_killed_daemon_is_not_run_again => |mode| killed_with_the_first_vm_claimed(mode, "brought-back-one");
    a_stopped_new_daemon_brings_every_vm_back_itself => |mode| held_up_before_bringing_back(mode, "stop:500");
    a_delayed_new_daemon_brings_every_vm_back_itself => |mode| held_up_before_bringing_back(mode, "delay:500");
    killing_the_old_daemon_with_the_manifest_written_leaves_every_vm_to_the_next_daemon => |mode| old_killed_with_the_manifest_written(mode);
    vms_to_bring_back_in_an_unreadable_format_stay_in_the_old_daemon => |mode| unreadable_bring_back_is_refused_before_the_commit(mode);
    an_undo_removes_the_manifest_before_any_vm_runs_again => |mode| manifest_gone_before_any_vm_runs_again(mode);
}

/// A saved reboot rolled back (the new daemon killed before the commit) whose resume of
/// the VMs it paused fails: the answer and the log say which VM stays paused, never "the
/// VMs run on"; each VM's state says paused, as it is; and resumed through the API it goes
/// on where it was.
#[test]
fn a_vm_that_cannot_be_resumed_after_a_failed_saved_reboot_is_reported_paused() {
    if !warmvm_testkit::kvm_available("undo_resume_fail") {
        return;
    }
    let mut s = setup(
        "saved-undo-resume",
        "saved",
        "new:ready-sent:kill,old:undo-resume:fail",
    );
    let old = s.d.pid;
    let e = s.reboot().expect_err("the reboot must fail");
    for name in VMS {
        assert!(
            e.contains(&format!("VM {name} could not be resumed and stays paused")),
            "{e}"
        );
    }
    assert!(!e.contains("run on in this daemon"), "{e}");
    assert!(
        s.d.log()
            .contains("cannot resume the VM after the reboot failed"),
        "{}",
        s.d.log()
    );
    assert_eq!(s.d.client().status().unwrap()["pid"], old);
    assert!(!s.manifest().exists());
    assert_eq!(s.names(), VMS);
    for (i, name) in VMS.iter().enumerate() {
        let now = show(&s.d, name);
        assert_eq!(now["state"], "paused", "{now}");
        s.d.client().resume(name).expect("resumed through the API");
        s.went_on(i);
    }
}

/// The old daemon killed while saving, after the first VM's snapshot and before the
/// rest, with no manifest written: the VMs died with their owner. The next daemon brings
/// none back (nothing says the snapshot on disk is not stale) and keeps that snapshot.
#[test]
fn killing_the_old_daemon_while_saving_loses_the_vms_with_it() {
    if !warmvm_testkit::kvm_available("old_saving_kill") {
        return;
    }
    let mut s = setup("saved-os", "saved", "old:saving:kill");
    let old = s.d.pid;
    assert!(s.reboot().is_err());
    s.fired();
    assert!(!s.manifest().exists());
    s.restart_after(old);
    assert!(s.names().is_empty(), "{:?}", s.names());
    assert!(s.last_reboot().is_null());
    let first = s.d.dir.join("state").join("saved-reboot").join(VMS[0]);
    assert!(first.join("vm.state").exists(), "{}", first.display());
}

/// A manifest VM whose snapshot is corrupt is reported with one line and stays in the
/// manifest with its snapshot; the other VM comes back. A corrupt manifest makes the daemon
/// refuse to start, naming the file, and the file stays.
#[test]
fn a_corrupt_snapshot_or_manifest_is_reported_and_kept() {
    if !warmvm_testkit::kvm_available("corrupt_manifest") {
        return;
    }
    let mut s = setup("saved-bad", "saved", "old:manifest:kill");
    let old = s.d.pid;
    assert!(s.reboot().is_err());
    s.fired();
    let snap = s.d.dir.join("state").join("saved-reboot").join(VMS[1]);
    let state = snap.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    s.restart_after(old);
    assert_eq!(s.names(), [VMS[0]]);
    s.went_on(0);
    let rep = s.last_reboot();
    let bad = &rep["vms"][1];
    assert_eq!(bad["name"], VMS[1], "{rep}");
    let e = bad["error"].as_str().unwrap_or_else(|| panic!("{rep}"));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("checksum mismatch"), "{e}");
    assert!(state.exists());
    let manifest = std::fs::read_to_string(s.manifest()).unwrap();
    assert!(
        manifest.contains(VMS[1]) && !manifest.contains("\"v1\""),
        "{manifest}"
    );
    // Stop the daemon (its VM powers off) and spoil the manifest: no daemon starts on it.
    s.d.terminate();
    std::fs::write(s.manifest(), b"{\"version\": 1").unwrap();
    let out = warmvm_testkit::refused(
        warmvm_testkit::daemon_command(&s.d.socket)
            .arg("--state-dir")
            .arg(s.d.dir.join("state")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("bring-back.json"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("move it away"), "{line}");
    assert!(s.manifest().exists());
}

/// A manifest VM whose name is taken by then (here by a VM of the next daemon's config) is
/// not brought back: one line says why, and it stays in the manifest with its snapshot.
#[test]
fn a_vm_whose_name_is_taken_stays_in_the_manifest() {
    if !warmvm_testkit::kvm_available("manifest_name_taken") {
        return;
    }
    let mut s = setup("saved-taken", "saved", "old:manifest:kill");
    let old = s.d.pid;
    assert!(s.reboot().is_err());
    s.fired();
    assert!(
        wait_until(30, || !pid_alive(old)),
        "the old daemon {old} was not killed"
    );
    let config = s.d.dir.join("taken.toml");
    std::fs::write(
        &config,
        format!("[[vm]]\nname = \"{}\"\nmemory_mib = 64\n", VMS[0]),
    )
    .unwrap();
    s.d.start_again(&["--config", config.to_str().unwrap()], &[]);
    assert_eq!(s.names(), VMS);
    // The config's VM booted afresh; the snapshot's did not run.
    let v1 = show(&s.d, VMS[0]);
    assert!(
        v1["uptime_ms"].as_u64().unwrap() <= s.rebooted_at.elapsed().as_millis() as u64,
        "{v1}"
    );
    s.went_on(1);
    let rep = s.last_reboot();
    let taken = &rep["vms"][0];
    assert_eq!(taken["name"], VMS[0], "{rep}");
    let e = taken["error"].as_str().unwrap_or_else(|| panic!("{rep}"));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("already exists"), "{e}");
    let snap = s.d.dir.join("state").join("saved-reboot").join(VMS[0]);
    assert!(snap.join("vm.state").exists());
    let manifest = std::fs::read_to_string(s.manifest()).unwrap();
    assert!(
        manifest.contains("\"v1\"") && !manifest.contains("\"v2\""),
        "{manifest}"
    );
    // The manifest may be the only record of v1: no saved or cold reboot may replace it.
    for mode in ["saved", "cold"] {
        s.mode = mode;
        let e = s.reboot().expect_err("refused while a manifest is left");
        assert!(e.contains("bring-back.json exists"), "{e}");
    }
    assert_eq!(s.names(), VMS);
    s.went_on(1);
}
