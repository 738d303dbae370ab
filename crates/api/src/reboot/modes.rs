//! The alternatives to the warm reboot, for comparison (Kourai and Chiba's saved-VM and
//! cold-VM reboots): the daemon is replaced by a new process all the same, but the VMs do
//! not cross in memory.
//!
//! - **saved**: every live VM is paused and snapshotted to `<state dir>/saved-reboot/`,
//!   the daemon is replaced (a warm reboot that hands over no live VM), and the new daemon
//!   restores every VM from its snapshot (while it serves: see `super::bring_back`).
//! - **cold**: every guest is asked to power off (forced after the grace period), the
//!   daemon is replaced, and the new daemon boots every VM again from its config and waits
//!   until each guest says it is up.
//!
//! The old daemon keeps the VMs it took aside (paused, or their configs) until the new one
//! has taken over: if replacing the daemon fails, they run on here as before. What the new
//! daemon needs travels in the successor settings (`crate::reboot::successor`), strictly typed.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warmvm_vmm::handover::faults::{self, Point};
use warmvm_vmm::snapshot;
use warmvm_vmm::{monotonic_ns, Host, Lifecycle, Vm};

use super::bring_back;
use super::bring_back::process_running;
pub use super::bring_back::{saved_dir, BringBack, BringBackVm, BRING_BACK_VERSION, SAVED_DIR};
use crate::progress::Tracker;
use crate::state::{ApiError, ApiState};
pub use crate::types::{Mode, ModeReboot, ModeRebootVm, BOOT_WAIT_SECS, DEFAULT_BOOT_WAIT};

/// How long the new daemon waits for the old one to exit (and free its RAM) first.
const OLD_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// VMs the old daemon holds aside while it is replaced.
pub struct Held {
    vms: Vec<(Arc<Vm>, bool)>,
    dir: Option<PathBuf>,
}

/// Saved reboot, old side: check the free space, then pause and snapshot every live VM and
/// take it out of the host. On any failure every VM runs on as before and nothing is left
/// on disk.
pub fn save_all(host: &mut Host, progress: &Tracker) -> Result<(BringBack, Held), ApiError> {
    let t0 = Instant::now();
    let dir = host.state_dir().join(SAVED_DIR);
    let live: Vec<Arc<Vm>> = host
        .vms()
        .iter()
        .filter(|v| matches!(v.lifecycle(), Lifecycle::Running | Lifecycle::Paused))
        .cloned()
        .collect();
    if dir.exists() {
        // Left by a saved reboot whose new daemon could not restore some VM: never
        // overwrite snapshots that may be the only copy of a VM.
        return Err(ApiError::new(
            409,
            format!(
                "{} exists (left by an earlier saved reboot?): restore or remove it first; nothing changed",
                dir.display()
            ),
        ));
    }
    let need: u64 = live.iter().map(|v| snapshot::needed_bytes(v)).sum();
    let free = snapshot::free_bytes(&dir).map_err(|e| {
        ApiError::new(
            500,
            format!("cannot read the free space of {}: {e}", dir.display()),
        )
    })?;
    if free < need {
        return Err(ApiError::new(
            507,
            format!(
                "not enough free space for a saved reboot in {}: {} MiB needed, {} MiB free; nothing changed",
                dir.display(),
                need.div_ceil(1 << 20),
                free >> 20
            ),
        ));
    }
    let mut saved: Vec<(Arc<Vm>, bool, BringBackVm)> = Vec::new();
    progress.phase("saving", live.len());
    for vm in &live {
        let was_paused = vm.lifecycle() == Lifecycle::Paused;
        let vm_dir = dir.join(vm.name());
        let t = Instant::now();
        let stopped_ns = monotonic_ns();
        if saved.len() == 1 {
            faults::hit(Point::OldSaving);
        }
        let result = snapshot::save(vm, &vm_dir, false);
        progress.one_done();
        match result {
            Ok(r) => saved.push((
                vm.clone(),
                was_paused,
                BringBackVm {
                    name: vm.name().to_string(),
                    config: vm.config.with_absolute_paths(),
                    snapshot: Some(vm_dir),
                    stopped_ns,
                    prepare_us: t.elapsed().as_micros() as u64,
                    bytes: r.written_bytes,
                    was_paused,
                },
            )),
            Err(e) => {
                let held = Held {
                    vms: saved.into_iter().map(|(v, p, _)| (v, p)).collect(),
                    dir: Some(dir),
                };
                let not_running = undo_in_place(held);
                let status = match &e {
                    snapshot::SnapshotError::Io { err, .. }
                        if err.raw_os_error() == Some(libc::ENOSPC) =>
                    {
                        507
                    }
                    _ => 500,
                };
                return Err(ApiError::new(
                    status,
                    if not_running.is_empty() {
                        format!(
                            "saved reboot failed while saving; every VM runs on in this daemon: {e}"
                        )
                    } else {
                        format!(
                            "saved reboot failed while saving; the VMs stay in this daemon: {e}; but {}",
                            not_running.join("; ")
                        )
                    },
                ));
            }
        }
    }
    let mut held = Held {
        vms: Vec::new(),
        dir: Some(dir),
    };
    let mut vms = Vec::new();
    for (vm, was_paused, bb) in saved {
        host.detach(vm.name());
        held.vms.push((vm, was_paused));
        vms.push(bb);
    }
    Ok((
        BringBack {
            version: BRING_BACK_VERSION,
            mode: Mode::Saved,
            previous_pid: std::process::id(),
            claimed_by: None,
            prepare_us: t0.elapsed().as_micros() as u64,
            prepared_ns: monotonic_ns(),
            vms,
        },
        held,
    ))
}

/// Cold reboot, old side: ask every live guest to power off (forced after `grace`), and
/// take the VMs out of the host.
pub fn stop_all(host: &mut Host, grace: Duration, progress: &Tracker) -> (BringBack, Held) {
    let t0 = Instant::now();
    let live: Vec<Arc<Vm>> = host
        .vms()
        .iter()
        .filter(|v| !v.lifecycle().is_finished())
        .cloned()
        .collect();
    let mut vms = Vec::new();
    progress.phase("shutting-down", live.len());
    std::thread::scope(|s| {
        let jobs: Vec<_> = live
            .iter()
            .map(|vm| {
                s.spawn(move || {
                    let stopped_ns = monotonic_ns();
                    let t = Instant::now();
                    let was_paused = vm.lifecycle() == Lifecycle::Paused;
                    let end = vm.stop(grace);
                    progress.one_done();
                    tracing::info!(vm = %vm.name(), state = end.name(), "VM shut down for a cold reboot");
                    BringBackVm {
                        name: vm.name().to_string(),
                        config: vm.config.with_absolute_paths(),
                        snapshot: None,
                        stopped_ns,
                        prepare_us: t.elapsed().as_micros() as u64,
                        bytes: 0,
                        was_paused,
                    }
                })
            })
            .collect();
        for j in jobs {
            if let Ok(bb) = j.join() {
                vms.push(bb);
            }
        }
    });
    let mut held = Held {
        vms: Vec::new(),
        dir: None,
    };
    for vm in &live {
        if let Some(v) = host.detach(vm.name()) {
            held.vms.push((v, false));
        }
    }
    (
        BringBack {
            version: BRING_BACK_VERSION,
            mode: Mode::Cold,
            previous_pid: std::process::id(),
            claimed_by: None,
            prepare_us: t0.elapsed().as_micros() as u64,
            prepared_ns: monotonic_ns(),
            vms,
        },
        held,
    )
}

/// Why undoing a failed saved or cold reboot left VMs not running here.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    /// The manifest could not be removed: every VM stays stopped, left to it.
    #[error("the VMs stay stopped, left to the next daemon start: {0}")]
    Manifest(#[from] bring_back::ManifestError),
    /// These VMs do not run here again (each entry names one and says how it stays); the
    /// others do.
    #[error("{}", .0.join("; "))]
    NotRunning(Vec<String>),
}

/// Snapshots written, VMs paused by the save: let them run again and remove the files.
/// Returns what could not be resumed: each such VM stays paused, as its state says, and
/// can be resumed through the API (its snapshot is of no further use: it is in memory).
fn undo_in_place(held: Held) -> Vec<String> {
    let mut not_running = Vec::new();
    for (vm, was_paused) in &held.vms {
        if *was_paused {
            continue;
        }
        let resumed = if faults::fails(Point::OldUndoResume) {
            Err("fault injected: undo-resume".to_string())
        } else {
            warmvm_vmm::Pausable::resume(&**vm).map_err(|e| e.to_string())
        };
        if let Err(e) = resumed {
            tracing::error!(vm = %vm.name(), error = %e, "cannot resume the VM after the reboot failed: it stays paused");
            not_running.push(format!(
                "VM {} could not be resumed and stays paused: {e}",
                vm.name()
            ));
        }
    }
    if let Some(dir) = &held.dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    not_running
}

/// Replacing the daemon failed: the VMs held aside run on in this daemon (saved: resumed
/// from memory, their snapshots removed; cold: booted again from their configs).
///
/// The bring-back manifest at `manifest` (if written) goes first, durably: a manifest must
/// never name a VM that runs on here. If it cannot be removed, the VMs stay stopped and
/// left to it (the next daemon start brings them back), and the error says so; a VM that
/// cannot be resumed (saved) or booted again (cold) here is named in the error too.
pub fn undo(host: &mut Host, held: Held, bb: &BringBack, manifest: &Path) -> Result<(), UndoError> {
    if let Err(e) = bring_back::remove(manifest) {
        tracing::error!(error = %e, "cannot remove the bring-back manifest: the VMs stay stopped, left to it");
        // Held paused (saved) or powered off (cold) until this process exits.
        std::mem::forget(held);
        return Err(e.into());
    }
    warmvm_vmm::handover::faults::hit(warmvm_vmm::handover::faults::Point::OldUndoing);
    let mut not_running = Vec::new();
    match bb.mode {
        Mode::Saved | Mode::Warm => {
            for (vm, _) in &held.vms {
                host.attach(vm.clone());
            }
            not_running = undo_in_place(held);
        }
        Mode::Cold => {
            for (vm, _) in held.vms {
                drop(vm);
            }
            for v in &bb.vms {
                let _ = host.remove(&v.name);
                match host.create_vm(&v.config).and_then(|vm| {
                    vm.start().map_err(|err| warmvm_vmm::HostError::Vm {
                        vm: v.name.clone(),
                        err,
                    })
                }) {
                    Ok(()) => tracing::info!(vm = %v.name, "VM booted again in this daemon"),
                    Err(e) => {
                        tracing::error!(vm = %v.name, error = %e, "cannot boot the VM again");
                        not_running.push(format!("VM {} could not be booted again: {e}", v.name));
                    }
                }
            }
        }
    }
    if not_running.is_empty() {
        Ok(())
    } else {
        Err(UndoError::NotRunning(not_running))
    }
}

/// Wait (bounded) until the process `pid` has exited, so that its RAM is free. A zombie
/// (exited, not reaped yet by its parent) has freed its memory: it counts as gone.
fn wait_exit(pid: u32) {
    let deadline = Instant::now() + OLD_EXIT_TIMEOUT;
    let alive = || {
        process_running(pid)
            // A leader already a zombie while its other threads still exit: its fds
            // (TAPs, disk images) are released with the last thread, and a TAP still
            // attached there cannot be attached here.
            || std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| d.count() > 1)
    };
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The name under which a cold reboot hands interface `index` of VM `vm`'s TAP to the new
/// daemon: the old daemon still holds the powered-off VM, and with it the TAP, so the new
/// one could not attach to the TAP by name (EBUSY) and the VM would be lost.
pub fn cold_tap_name(vm: &str, index: usize) -> String {
    format!("cold-tap/{index}/{vm}")
}

/// The VM and interface of a [`cold_tap_name`].
pub fn parse_cold_tap_name(name: &str) -> Option<(String, usize)> {
    let rest = name.strip_prefix("cold-tap/")?;
    let (index, vm) = rest.split_once('/')?;
    Some((vm.to_string(), index.parse().ok()?))
}

/// Cold reboot, old side: duplicates of the held VMs' TAP fds, named for the new daemon.
pub fn cold_taps(held: &Held) -> Vec<(String, std::os::fd::OwnedFd)> {
    let mut out = Vec::new();
    for (vm, _) in &held.vms {
        let disks = vm.config.disks.len();
        match vm.shared().devices.virtio_host_files() {
            Ok(files) => {
                for (i, fd) in files.into_iter().enumerate().skip(disks) {
                    out.push((cold_tap_name(vm.name(), i - disks), fd));
                }
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name(), error = %e, "cannot pass the VM's TAPs on; the new daemon opens them by name")
            }
        }
    }
    out
}

/// A cold-booted VM's config that takes the TAPs `given` (by interface) instead of
/// opening them by name.
fn with_given_taps(
    config: &warmvm_vmm::VmConfig,
    given: &warmvm_vmm::GivenTaps,
) -> warmvm_vmm::VmConfig {
    let mut config = config.clone();
    for (i, net) in config.nets.iter_mut().enumerate() {
        if given.0.contains_key(&i) {
            net.tap = None;
            net.tap_fd = Some(i as i32);
        }
    }
    config
}

/// New side, after the commit (or a daemon started on an interrupted reboot's manifest,
/// `recovered`): bring every VM back (restore its snapshot, or boot it and wait until it
/// is up, at most `boot_wait`). Each VM is taken off the manifest at `manifest` after it is
/// restored or created and before it runs (see [`super::bring_back`]). A VM that cannot be
/// brought back is reported with the reason and stays in the manifest; its snapshot stays.
///
/// The daemon serves meanwhile: the Host lock is held while the VMs are restored or
/// created (readers see the VMs brought back so far, published as the state's view) and
/// not while the guests boot; the progress is in `state`'s tracker. A daemon that stops
/// meanwhile still brings every VM back (so that the manifest is done with, and its
/// shutdown powers them off as any other), but stops waiting for guests to come up.
pub fn bring_back(
    state: &ApiState,
    bb: &BringBack,
    mut taps: std::collections::BTreeMap<String, warmvm_vmm::GivenTaps>,
    manifest: &Path,
    recovered: bool,
    boot_wait: Duration,
) -> ModeReboot {
    let progress = &state.progress;
    // What the manifest names from now on: this daemon owns it, and every VM not yet run.
    // Recorded before the old daemon is gone, so that a manifest never looks abandoned
    // while one of them runs.
    let mut left = bb.clone();
    left.claimed_by = Some(std::process::id());
    let owned = bring_back::write(manifest, &left);
    if let Err(e) = &owned {
        tracing::error!(error = %e, "cannot take the bring-back manifest over; its VMs are left to the next daemon start");
    }
    if !recovered {
        wait_exit(bb.previous_pid);
    }
    let t0 = Instant::now();
    let start_ns = monotonic_ns();
    let mut report = ModeReboot {
        mode: bb.mode.name().to_string(),
        previous_pid: bb.previous_pid,
        prepare_us: bb.prepare_us,
        replace_us: start_ns.saturating_sub(bb.prepared_ns) / 1000,
        recovered,
        ..Default::default()
    };
    faults::hit(Point::NewBringBack);
    let mut booted: Vec<(Arc<Vm>, usize)> = Vec::new();
    let mut first = true;
    let mut host = state.lock();
    state.set_view(Some(host.vms().to_vec()));
    progress.phase(
        if bb.mode == Mode::Cold {
            "booting"
        } else {
            "restoring"
        },
        bb.vms.len(),
    );
    for v in &bb.vms {
        let t = Instant::now();
        let mut r = ModeRebootVm {
            name: v.name.clone(),
            prepare_us: v.prepare_us,
            bytes: v.bytes,
            ..Default::default()
        };
        report.bytes_written += v.bytes;
        // Takes the VM off the manifest, durably: from then on no other daemon brings it
        // back, so it may run here.
        let mut claim = || {
            let mut rest = left.clone();
            rest.vms.retain(|x| x.name != v.name);
            bring_back::write(manifest, &rest)?;
            left = rest;
            let hit_first = std::mem::replace(&mut first, false);
            if hit_first {
                faults::hit(Point::NewClaimedOne);
            }
            Ok::<bool, bring_back::ManifestError>(hit_first)
        };
        let result: Result<bool, String> = match (&owned, bb.mode, &v.snapshot) {
            (Err(e), _, _) => Err(format!("not brought back: {e}")),
            (Ok(()), Mode::Saved, Some(dir)) => host
                .restore_snapshot_unstarted(dir, Some(&v.name), &snapshot::Backing::default())
                .map_err(|e| e.to_string())
                .and_then(|restored| {
                    let hit_first = claim().map_err(|e| e.to_string())?;
                    let read = restored.report.read_bytes;
                    host.start_restored(restored);
                    r.bring_back_us = t.elapsed().as_micros() as u64;
                    r.downtime_us = monotonic_ns().saturating_sub(v.stopped_ns) / 1000;
                    report.bytes_read += read;
                    if let Err(e) = std::fs::remove_dir_all(dir) {
                        tracing::warn!(vm = %v.name, error = %e, "cannot remove the snapshot");
                    }
                    Ok(hit_first)
                }),
            (Ok(()), Mode::Cold, _) => {
                let given = taps.remove(&v.name).unwrap_or_default();
                let config = with_given_taps(&v.config, &given);
                host.create_vm_with(&config, given)
                    .map_err(|e| e.to_string())
                    .and_then(|vm| {
                        let hit_first = match claim() {
                            Ok(h) => h,
                            Err(e) => {
                                let _ = host.remove(&v.name);
                                return Err(e.to_string());
                            }
                        };
                        vm.start().map_err(|e| e.to_string())?;
                        booted.push((vm, report.vms.len()));
                        Ok(hit_first)
                    })
            }
            _ => Err("nothing to bring it back from".into()),
        };
        match result {
            Ok(true) => faults::hit(Point::NewBroughtBackOne),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(vm = %v.name, error = %e, "cannot bring the VM back after a {} reboot", bb.mode.name());
                r.error = Some(e);
            }
        }
        report.vms.push(r);
        state.set_view(Some(host.vms().to_vec()));
        progress.one_done();
    }
    drop(host);
    state.set_view(None);
    if owned.is_ok() && left.vms.is_empty() {
        match bring_back::remove(manifest) {
            // Empty once every snapshot was restored; kept (not empty) otherwise.
            Ok(()) => {
                if let Some(dir) = manifest.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot remove the emptied bring-back manifest"),
        }
    }
    // Cold: every VM boots at once; each is back when its guest says it is up.
    let deadline = Instant::now() + boot_wait;
    let mut waiting = booted;
    let total = waiting.len();
    progress.phase("waiting-for-guests", total);
    while !waiting.is_empty() {
        let stopping = state
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst);
        waiting.retain(|(vm, i)| {
            if vm.guest_ready() {
                let r = &mut report.vms[*i];
                r.downtime_us = monotonic_ns().saturating_sub(bb.vms[*i].stopped_ns) / 1000;
                r.bring_back_us = t0.elapsed().as_micros() as u64;
                false
            } else if Instant::now() >= deadline || vm.lifecycle().is_finished() || stopping {
                let error = if stopping {
                    "the daemon stopped before the guest said it was up".to_string()
                } else {
                    format!(
                        "the guest did not say it was up within {} s ({})",
                        boot_wait.as_secs_f64(),
                        vm.lifecycle().name()
                    )
                };
                tracing::warn!(vm = %vm.name(), %error, "the VM is not back after a cold reboot");
                report.vms[*i].error = Some(error);
                false
            } else {
                true
            }
        });
        progress.done(total - waiting.len());
        std::thread::sleep(Duration::from_micros(200));
    }
    report.bring_back_us = t0.elapsed().as_micros() as u64;
    // Host-wide: from the first guest stopping to the last one back (each VM's downtime
    // ends at its own `stopped_ns + downtime`).
    let first_stop = bb
        .vms
        .iter()
        .map(|v| v.stopped_ns)
        .min()
        .unwrap_or(start_ns);
    let last_back = bb
        .vms
        .iter()
        .zip(&report.vms)
        .map(|(v, r)| v.stopped_ns + r.downtime_us * 1000)
        .max()
        .unwrap_or(start_ns);
    report.host_downtime_us = last_back.saturating_sub(first_stop) / 1000;
    tracing::info!(mode = %report.mode, vms = report.vms.len(),
        host_downtime_ms = report.host_downtime_us / 1000, "VMs brought back");
    report
}

/// The new daemon of a saved or cold reboot, once the handover has committed: bring the
/// VMs back (while it serves: `reboot_in_progress` in its status says how far it is, and
/// requests that change anything are refused until it is done) and report it as
/// `last_reboot`. `boot_wait`: how long a cold-booted guest has to say it is up.
pub fn after_commit(
    state: &crate::state::ApiState,
    bb: &BringBack,
    taps: std::collections::BTreeMap<String, warmvm_vmm::GivenTaps>,
    state_dir: &Path,
    boot_wait: std::time::Duration,
) {
    let report = bring_back(
        state,
        bb,
        taps,
        &bring_back::path(state_dir),
        false,
        boot_wait,
    );
    state.set_last_reboot(report);
}

/// A daemon started normally on a state directory whose manifest is [`bring_back::pending`]: bring
/// its VMs back as the interrupted reboot's new daemon would have, and report it as
/// `last_reboot` (with `recovered`).
pub fn recover(state: &crate::state::ApiState, bb: &BringBack, state_dir: &Path) {
    tracing::warn!(
        manifest = %bring_back::path(state_dir).display(),
        mode = bb.mode.name(),
        vms = bb.vms.len(),
        previous_pid = bb.previous_pid,
        claimed_by = bb.claimed_by,
        "a saved or cold reboot was interrupted: bringing its VMs back"
    );
    let report = bring_back(
        state,
        bb,
        Default::default(),
        &bring_back::path(state_dir),
        true,
        DEFAULT_BOOT_WAIT,
    );
    state.set_last_reboot(report);
}

/// The VMs of a saved or cold reboot, to bring back once the daemon serves.
pub(crate) enum BringBackJob {
    /// Handed over by the old daemon, with the cold reboot's TAPs and the boot wait.
    AfterCommit(
        BringBack,
        std::collections::BTreeMap<String, warmvm_vmm::GivenTaps>,
        Duration,
    ),
    /// Left in the manifest by an interrupted reboot.
    Recover(BringBack),
}

impl BringBackJob {
    pub(crate) fn what(&self) -> (Mode, usize) {
        match self {
            BringBackJob::AfterCommit(bb, ..) | BringBackJob::Recover(bb) => {
                (bb.mode, bb.vms.len())
            }
        }
    }
}

/// Bring a saved or cold reboot's VMs back on a thread of its own while the daemon
/// serves, then let requests change things again. `None` if no thread could be started:
/// then it is done here, before serving, as a daemon that cannot start threads could not
/// serve anyway.
pub(crate) fn bring_back_in_background(
    state: Arc<ApiState>,
    job: BringBackJob,
    state_dir: PathBuf,
) -> Option<std::thread::JoinHandle<()>> {
    let job = Arc::new(Mutex::new(Some(job)));
    let run = {
        let (state, job) = (state.clone(), job.clone());
        move || {
            let taken = job.lock().unwrap_or_else(|p| p.into_inner()).take();
            match taken {
                Some(BringBackJob::AfterCommit(bb, taps, wait)) => {
                    after_commit(&state, &bb, taps, &state_dir, wait)
                }
                Some(BringBackJob::Recover(bb)) => recover(&state, &bb, &state_dir),
                None => {}
            }
            state.progress.end();
            state.rebooting.store(false, Ordering::SeqCst);
        }
    };
    let spawned = std::thread::Builder::new()
        .name("warmvm-bring-back".into())
        .spawn({
            let run = run.clone();
            move || {
                warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Api);
                run()
            }
        });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "cannot start a thread to bring the VMs back; doing it before serving");
            run();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmvm_vmm::VmConfig;

    #[test]
    fn bring_back_crosses_strictly() {
        let bb = BringBack {
            version: BRING_BACK_VERSION,
            mode: Mode::Saved,
            previous_pid: 7,
            claimed_by: None,
            prepare_us: 1,
            prepared_ns: 2,
            vms: vec![BringBackVm {
                name: "a".into(),
                config: VmConfig::reference("a", 64, 1),
                snapshot: Some("/x/a".into()),
                stopped_ns: 1,
                prepare_us: 1,
                bytes: 3,
                was_paused: false,
            }],
        };
        use crate::reboot::successor::{Fallbacks, Successor};
        let fallbacks = Fallbacks {
            stage_timeout: Duration::from_secs(1),
            ready_budget: Duration::from_secs(1),
            limits: crate::limits::Limits::default(),
        };
        let mut settings = Successor::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Default::default(),
            false,
        );
        settings.bring_back = Some(bb);
        let extra = settings.encode().unwrap();
        let back = Successor::decode(&extra, &fallbacks).unwrap();
        back.check().unwrap();
        let back = back.bring_back.unwrap();
        assert_eq!(back.vms[0].snapshot.as_deref(), Some(Path::new("/x/a")));
        let mut bad = extra.clone();
        bad["bring_back"]["surprise"] = serde_json::json!(1);
        assert!(Successor::decode(&bad, &fallbacks).is_err());
        let mut newer = extra.clone();
        newer["bring_back"]["version"] = serde_json::json!(BRING_BACK_VERSION + 1);
        let newer = Successor::decode(&newer, &fallbacks).unwrap();
        assert!(newer.check().unwrap_err().to_string().contains("format"));
        let mut missing = extra;
        missing["bring_back"]
            .as_object_mut()
            .unwrap()
            .remove("prepared_ns");
        assert!(Successor::decode(&missing, &fallbacks).is_err());
        assert_eq!(Mode::parse("cold"), Some(Mode::Cold));
        assert_eq!(
            parse_cold_tap_name(&cold_tap_name("web/1", 3)),
            Some(("web/1".to_string(), 3))
        );
        assert_eq!(parse_cold_tap_name("api-listener"), None);
        assert_eq!(Mode::parse("hot"), None);
    }
}
