//! VM snapshots on disk: a VM's [`VmRecord`] (the very type a warm reboot hands over) in a
//! checksummed, versioned envelope of its own magic, beside one file per RAM region.
//!
//! ```text
//! DIR/ram0.bin, ram1.bin   guest RAM regions, the size of the region, holes where the
//!                          guest never wrote; written with direct I/O, synced
//! DIR/vm.state             envelope "WARMVMSN" (format, length, CRC-32) around
//!                          SnapshotState: the VmRecord, each RAM file's extents and
//!                          CRC-32; written last, through a rename, so a snapshot without
//!                          it is incomplete and never read
//! ```
//!
//! A snapshot is one transport of a VM's state (see [`crate::state`]): taken with the VM
//! paused through `Vm::save`, and restored into a new VM through `Vm::build` and
//! `Vm::load`, as a warm reboot does, under the same or a new name. This module moves the
//! state and the RAM to and from files; it reads or writes no KVM or device state itself.
//!
//! virtio devices: the capture finishes the requests each device has in hand and records
//! its transport and queue state (what the guest queued meanwhile stays in its rings);
//! disks are then flushed. The host backing is recorded by name in the VM's config (each
//! disk's image path, each interface's TAP name), and a restore opens them again, or the
//! ones [`Backing`] names instead: a copy beside its original needs a TAP of its own
//! (a TAP serves one VM), and a disk of its own unless both only read it. The disk
//! image is not copied: it must still hold what it held when the snapshot was taken
//! (virtio-blk refuses one of another size; other changes are the operator's to avoid).

#[doc(hidden)]
pub mod fuzzing;
pub mod ramfile;
pub mod writer;
pub mod writer_faults;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use warmvm_hypervisor::Hypervisor;
use warmvm_memory::GuestRam;

use crate::state::envelope::{self, Kind};
use crate::state::{LifecycleState, StateError, VmConfigState, VmRecord};
use crate::vm::{open_log, Lifecycle, Vm, VmError, VCPU_RESPONSE_TIMEOUT};
use crate::Pausable;

/// The snapshot format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const KIND: Kind = Kind {
    magic: *b"WARMVMSN",
    what: "a warmvm snapshot",
    min_version: 1,
    max_version: FORMAT_VERSION,
};
/// The file that makes a directory a snapshot.
pub const STATE_FILE: &str = "vm.state";

fn ram_file(index: usize) -> String {
    format!("ram{index}.bin")
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {err}")]
    Io {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("{0} holds no warmvm snapshot (no {STATE_FILE})")]
    NoSnapshot(PathBuf),
    #[error("{0} already holds a snapshot; choose an empty or new directory")]
    Exists(PathBuf),
    #[error("snapshot {dir}: {err}")]
    State {
        dir: PathBuf,
        #[source]
        err: StateError,
    },
    #[error(
        "snapshot {dir}: {file} is {len} bytes, the snapshot says {want} (truncated or replaced)"
    )]
    Truncated {
        dir: PathBuf,
        file: String,
        len: u64,
        want: u64,
    },
    #[error("snapshot {dir}: {file} is corrupt (CRC-32 mismatch)")]
    Corrupt { dir: PathBuf, file: String },
    #[error("VM {vm} is {state}; only a running or paused VM can be snapshotted")]
    NotLive { vm: String, state: &'static str },
    /// The restored VM would share a host resource with a VM already on this host.
    #[error("cannot restore VM {vm}: {what} is in use by VM {other}; give it its own ({hint})")]
    InUse {
        vm: String,
        other: String,
        what: String,
        hint: &'static str,
    },
    /// More replacements than the snapshot's VM has devices, or a bad one.
    #[error("cannot restore VM {vm}: {reason}")]
    BadBacking { vm: String, reason: String },
    #[error("VM {vm}: {err}")]
    Vm {
        vm: String,
        #[source]
        err: VmError,
    },
    /// The writer process failed or was killed; the VM runs on.
    #[error("VM {vm}: the snapshot writer {what}")]
    Writer { vm: String, what: String },
    #[error("VM {vm}: cannot capture its state: {err}")]
    Capture {
        vm: String,
        #[source]
        err: StateError,
    },
}

/// One RAM region's file.
#[derive(Debug, Serialize, Deserialize)]
struct RamFile {
    /// `(offset, len)` ranges the file holds data for; zeros elsewhere.
    extents: Vec<(u64, u64)>,
    crc32: u32,
}

/// The payload of `vm.state`.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotState {
    /// The build that wrote it.
    writer: String,
    /// The kernel's boot id when it was taken: CLOCK_MONOTONIC times compare only within
    /// one boot (a restore in the same boot advances guest time by the real gap).
    boot_id: String,
    captured_at_ns: u64,
    record: VmRecord,
    /// One per `record.spec.ram`, in order.
    ram: Vec<RamFile>,
}

/// What taking a snapshot did and how long each part took.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SaveReport {
    pub vm: String,
    pub dir: PathBuf,
    pub ram_bytes: u64,
    /// Bytes of RAM that held data and went to disk.
    pub written_bytes: u64,
    pub state_bytes: u64,
    pub direct_io: bool,
    /// Parking the vCPUs and reading their state.
    pub pause_us: u64,
    pub ram_us: u64,
    pub state_us: u64,
    /// From the first vCPU parked to the last running again (0 if left paused).
    pub downtime_us: u64,
    /// Whether the VM runs again (false: left paused, or it was paused).
    pub resumed: bool,
}

/// What restoring a snapshot did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    pub vm: String,
    pub from: PathBuf,
    pub ram_bytes: u64,
    pub read_bytes: u64,
    pub ram_us: u64,
    /// Building the VM and restoring vCPU and device state.
    pub restore_us: u64,
}

/// Snapshot `vm` into `dir` (created if missing; it must not hold a snapshot). The VM is
/// paused for the capture and the RAM write; it runs again afterwards if it was running
/// and `resume` is set. On any failure the files written are removed and the VM is as it
/// was.
pub fn save(vm: &Vm, dir: &Path, resume: bool) -> Result<SaveReport, SnapshotError> {
    let name = vm.name().to_string();
    let was = vm.lifecycle();
    if !matches!(was, Lifecycle::Running | Lifecycle::Paused) {
        return Err(SnapshotError::NotLive {
            vm: name,
            state: was.name(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| SnapshotError::Io { path, err }
    };
    if dir.join(STATE_FILE).exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Started before the pause: the process start (~0.1 s here) is not the guest's downtime.
    let writer = match writer::writer_binary().map(|b| writer::Writer::spawn(b, &name)) {
        Some(Ok(w)) => Some(w),
        Some(Err(e)) => {
            // Only if empty: the directory may be the operator's.
            let _ = std::fs::remove_dir(dir);
            return Err(e);
        }
        None => None,
    };
    let t_pause = Instant::now();
    let was_running = was == Lifecycle::Running;
    if was_running {
        vm.pause().map_err(|err| SnapshotError::Vm {
            vm: name.clone(),
            err,
        })?;
    }
    let result = write_all(vm, dir, was_running, t_pause, writer);
    if result.is_err() {
        remove_files(dir, vm.shared.ram.regions().len());
    }
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            if was_running {
                let _ = vm.resume();
            }
            return Err(e);
        }
    };
    if was_running && resume {
        vm.resume().map_err(|err| SnapshotError::Vm {
            vm: name.clone(),
            err,
        })?;
        report.resumed = true;
        let parked = vm.handles().iter().map(|h| h.park_times().0).min();
        for h in vm.handles() {
            h.wait_running(VCPU_RESPONSE_TIMEOUT);
        }
        let resumed = vm.handles().iter().map(|h| h.park_times().1).max();
        if let (Some(p), Some(r)) = (parked, resumed) {
            report.downtime_us = r.saturating_sub(p) / 1000;
        }
    }
    tracing::info!(vm = %name, dir = %dir.display(), bytes = report.written_bytes,
        ram_ms = report.ram_us / 1000, "snapshot written");
    Ok(report)
}

fn remove_files(dir: &Path, regions: usize) {
    for i in 0..regions {
        let _ = std::fs::remove_file(dir.join(ram_file(i)));
    }
    let _ = std::fs::remove_file(dir.join(format!("{STATE_FILE}.tmp")));
    // A writer killed after its rename, before it answered: the snapshot is not ours to
    // keep (the save failed, the VM runs on), and `save` refuses a directory that held one.
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    // Only if empty: the directory may be the operator's.
    let _ = std::fs::remove_dir(dir);
}

fn write_all(
    vm: &Vm,
    dir: &Path,
    was_running: bool,
    t_pause: Instant,
    writer: Option<writer::Writer>,
) -> Result<SaveReport, SnapshotError> {
    let name = vm.name().to_string();
    let capture_err = |err| SnapshotError::Capture {
        vm: name.clone(),
        err,
    };
    vm.save_parked_vcpus().map_err(capture_err)?;
    let mut record = vm
        .save(Instant::now() + VCPU_RESPONSE_TIMEOUT)
        .map_err(capture_err)?;
    if was_running {
        // Paused only for the snapshot: a restore runs it.
        record.lifecycle = LifecycleState::Running;
    }
    flush_disks(vm)?;
    let captured_at_ns = crate::monotonic_ns();
    let pause_us = t_pause.elapsed().as_micros() as u64;
    let mut report = write_record(vm, record, captured_at_ns, dir, writer)?;
    report.pause_us = pause_us;
    Ok(report)
}

/// Write `record`, a state of `vm` saved at `captured_at_ns`, and `vm`'s RAM (paused, and
/// left so until this returns) into `dir`: the snapshot's files, through `writer` where the
/// VMM has one.
pub(crate) fn write_record(
    vm: &Vm,
    record: VmRecord,
    captured_at_ns: u64,
    dir: &Path,
    mut writer: Option<writer::Writer>,
) -> Result<SaveReport, SnapshotError> {
    let name = vm.name().to_string();
    let t_ram = Instant::now();
    let slots = vm.shared.ram.slots();
    let regions = vm.shared.ram.regions();
    let mut jobs = Vec::new();
    for (i, (region, &(_, size, _))) in regions.iter().zip(&slots).enumerate() {
        let path = dir.join(ram_file(i));
        let extents = ramfile::data_extents(&region.file, size).map_err(io_at(&path))?;
        jobs.push(writer::RamJob {
            path,
            size,
            extents,
        });
    }
    let written = jobs
        .iter()
        .flat_map(|j| j.extents.iter().map(|e| e.1))
        .sum();
    // A writer process of its own where the VMM has one (the daemon): killing it, or the
    // disk filling up under it, loses the snapshot, never the VM.
    let (crcs, direct_io) = match writer.as_mut() {
        Some(w) => {
            let fds: Vec<_> = regions.iter().map(|r| r.file.as_raw_fd()).collect();
            w.write_ram(jobs.clone(), &fds)?
        }
        None => {
            let mut crcs = Vec::new();
            let mut direct_io = true;
            for (job, &(_, _, host)) in jobs.iter().zip(&slots) {
                // SAFETY: `host` is the mapping of this region, owned by the VM, which is
                // paused: nothing writes it until we return.
                let (crc, direct) =
                    unsafe { ramfile::write(&job.path, host, job.size, &job.extents) }
                        .map_err(io_at(&job.path))?;
                crcs.push(crc);
                direct_io &= direct;
            }
            (crcs, direct_io)
        }
    };
    if crcs.len() != slots.len() {
        return Err(SnapshotError::Writer {
            vm: name,
            what: format!("wrote {} RAM files of {}", crcs.len(), slots.len()),
        });
    }
    let ram = jobs
        .into_iter()
        .map(|j| j.extents)
        .zip(crcs)
        .map(|(extents, crc32)| RamFile { extents, crc32 })
        .collect();
    let ram_us = t_ram.elapsed().as_micros() as u64;

    let t_state = Instant::now();
    let state = SnapshotState {
        writer: crate::build(),
        boot_id: boot_id(),
        captured_at_ns,
        record,
        ram,
    };
    let bytes = envelope::encode_as(&KIND, &state, FORMAT_VERSION).map_err(|err| {
        SnapshotError::Capture {
            vm: name.clone(),
            err,
        }
    })?;
    match writer {
        Some(mut w) => {
            w.write_state(dir, &bytes)?;
            w.finish();
        }
        None => {
            let tmp = dir.join(format!("{STATE_FILE}.tmp"));
            let write_state = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, dir.join(STATE_FILE))?;
                std::fs::File::open(dir)?.sync_all()
            };
            write_state().map_err(io_at(&dir.join(STATE_FILE)))?;
        }
    }
    Ok(SaveReport {
        vm: name,
        dir: dir.to_path_buf(),
        ram_bytes: vm.shared.ram.size(),
        written_bytes: written,
        state_bytes: bytes.len() as u64,
        direct_io,
        pause_us: 0,
        ram_us,
        state_us: t_state.elapsed().as_micros() as u64,
        downtime_us: 0,
        resumed: false,
    })
}

/// Make what the guest wrote to its disks (finished requests, paused devices) durable, so
/// that the snapshot and its disk images agree after a host crash too.
pub(crate) fn flush_disks(vm: &Vm) -> Result<(), SnapshotError> {
    let Some(first) = vm.config.disks.first() else {
        return Ok(());
    };
    let files = vm
        .shared
        .devices
        .virtio_host_files()
        .map_err(io_at(&first.path))?;
    // Disks come first in device order.
    for (disk, fd) in vm.config.disks.iter().zip(files) {
        if !disk.read_only {
            std::fs::File::from(fd)
                .sync_data()
                .map_err(io_at(&disk.path))?;
        }
    }
    Ok(())
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Host resources to put under a restored VM's devices instead of those its snapshot
/// recorded, by position: `disks[i]` replaces disk i's image, `taps[i]` interface i's TAP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backing {
    pub disks: Vec<PathBuf>,
    pub taps: Vec<String>,
}

impl Backing {
    /// Put the replacements into `config`; more than it has devices, a TAP name the kernel
    /// would refuse or a relative image path is an error that changes nothing.
    fn apply(&self, config: &mut VmConfigState) -> Result<(), SnapshotError> {
        let bad = |reason: String| SnapshotError::BadBacking {
            vm: config.name.clone(),
            reason,
        };
        if self.disks.len() > config.disks.len() {
            return Err(bad(format!(
                "{} disk images given, the snapshot's VM has {} disks",
                self.disks.len(),
                config.disks.len()
            )));
        }
        if self.taps.len() > config.nets.len() {
            return Err(bad(format!(
                "{} TAPs given, the snapshot's VM has {} network interfaces",
                self.taps.len(),
                config.nets.len()
            )));
        }
        if let Some(p) = self.disks.iter().find(|p| !p.is_absolute()) {
            return Err(bad(format!(
                "disk image path {} is not absolute",
                p.display()
            )));
        }
        if let Some(t) = self
            .taps
            .iter()
            .find(|t| !warmvm_devices::virtio::tap::valid_name(t))
        {
            return Err(bad(format!(
                "TAP name {t:?} is invalid: 1-15 characters from A-Z a-z 0-9 . _ -"
            )));
        }
        for (d, p) in config.disks.iter_mut().zip(&self.disks) {
            d.path = p.clone();
        }
        for (n, t) in config.nets.iter_mut().zip(&self.taps) {
            n.tap = t.clone();
        }
        Ok(())
    }
}

/// What a restore of a snapshot would create, read from its state (checked).
#[derive(Clone, Debug)]
pub struct Peek {
    pub name: String,
    pub ram_bytes: u64,
    /// Each disk's image (after the replacements) and whether the VM writes it.
    pub disks: Vec<(PathBuf, bool)>,
    /// Each interface's TAP (after the replacements).
    pub taps: Vec<String>,
}

/// What restoring the snapshot in `dir` with `backing` would create (nothing is opened).
pub fn peek(dir: &Path, backing: &Backing) -> Result<Peek, SnapshotError> {
    let mut config = read_state(dir)?.record.spec.config;
    backing.apply(&mut config)?;
    Ok(Peek {
        name: config.name.clone(),
        ram_bytes: config.memory_mib << 20,
        disks: config
            .disks
            .iter()
            .map(|d| (d.path.clone(), !d.read_only))
            .collect(),
        taps: config.nets.iter().map(|n| n.tap.clone()).collect(),
    })
}

fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NoSnapshot(dir.to_path_buf()))
        }
        Err(err) => return Err(SnapshotError::Io { path, err }),
    };
    let (_, payload) = envelope::open_as(&KIND, &bytes).map_err(|err| SnapshotError::State {
        dir: dir.to_path_buf(),
        err,
    })?;
    decode_state(dir, payload)
}

/// The state behind the envelope's checksum, decoded and checked.
fn decode_state(dir: &Path, payload: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let bad = |err| SnapshotError::State {
        dir: dir.to_path_buf(),
        err,
    };
    let state: SnapshotState = envelope::decode_payload(payload).map_err(bad)?;
    state.record.spec.check().map_err(bad)?;
    if !state.record.lifecycle.is_live() || state.record.runtime.is_none() {
        return Err(bad(StateError::NotLive {
            lifecycle: state.record.lifecycle.clone(),
            has_runtime: state.record.runtime.is_some(),
        }));
    }
    if state.ram.len() != state.record.spec.ram.len() {
        return Err(bad(StateError::RamFiles {
            files: state.ram.len(),
            regions: state.record.spec.ram.len(),
        }));
    }
    for (i, (f, slot)) in state.ram.iter().zip(&state.record.spec.ram).enumerate() {
        ramfile::check_extents(&f.extents, slot.size).map_err(|reason| {
            bad(StateError::RamExtents {
                file: ram_file(i),
                reason,
            })
        })?;
    }
    Ok(state)
}

/// A VM restored from a snapshot, not running yet: [`Restored::start`] lets it go.
pub struct Restored {
    pub vm: Vm,
    pub lifecycle: LifecycleState,
    pub report: RestoreReport,
}

impl Restored {
    /// Let the VM run (or stay paused) as it was when the snapshot was taken.
    pub fn start(self) -> Arc<Vm> {
        *self.vm.shared.lifecycle() = self.lifecycle.to_lifecycle();
        // A paused VM's devices start serving when it is resumed, as after a handover.
        if matches!(
            self.lifecycle,
            LifecycleState::Running | LifecycleState::Created
        ) {
            let _ = warmvm_devices::Pausable::resume(&self.vm.shared.devices); // an order: never fails
        }
        if self.lifecycle == LifecycleState::Running {
            for h in self.vm.handles() {
                h.request_run();
            }
        }
        Arc::new(self.vm)
    }
}

/// Restore the snapshot in `dir` into a new VM named `name` (default: the snapshot's),
/// its console log under `state_dir`. Nothing outside the new VM changes, and a snapshot
/// that is truncated, corrupt, foreign or of another format creates nothing.
pub fn restore(
    hv: &Hypervisor,
    dir: &Path,
    name: Option<&str>,
    backing: &Backing,
    state_dir: &Path,
) -> Result<Restored, SnapshotError> {
    let mut state = read_state(dir)?;
    let spec = &mut state.record.spec;
    backing.apply(&mut spec.config)?;
    let renamed = name.is_some_and(|n| n != spec.config.name);
    if let Some(n) = name {
        spec.config.name = n.to_string();
    }
    let same_boot = !state.boot_id.is_empty() && state.boot_id == boot_id();
    if renamed || !same_boot {
        // A new VM: its own log and uptime.
        spec.config.console_log = None;
        spec.console_log = state_dir.join(&spec.config.name).join("console.log");
        spec.created_monotonic_ns = crate::monotonic_ns();
    } else if spec.config.console_log.is_none() {
        spec.console_log = state_dir.join(&spec.config.name).join("console.log");
    }
    spec.check().map_err(|err| SnapshotError::State {
        dir: dir.to_path_buf(),
        err,
    })?;
    let vm_name = spec.config.name.clone();
    let vm_err = |err: VmError| SnapshotError::Vm {
        vm: vm_name.clone(),
        err,
    };
    // The host backing first: a missing image or a busy TAP refuses the restore before
    // any RAM is read.
    let config: crate::VmConfig = spec.config.clone().into();
    let host_files = crate::virtio::HostFiles {
        disks: crate::virtio::open_disks(&config.disks).map_err(|e| vm_err(e.into()))?,
        taps: crate::virtio::open_taps(&config, Default::default())
            .map_err(|e| vm_err(e.into()))?
            .0,
    };
    let ram = GuestRam::create(&vm_name, spec.config.memory_mib << 20, spec.hugepages)
        .map_err(|e| vm_err(e.into()))?;
    let t_ram = Instant::now();
    let mut read_bytes = 0;
    for (i, (file, &(_, size, host))) in state.ram.iter().zip(&ram.slots()).enumerate() {
        let path = dir.join(ram_file(i));
        // SAFETY: `host` maps this region of `ram`, which no VM uses yet.
        let crc =
            unsafe { ramfile::read(&path, host, size, &file.extents) }.map_err(|e| match e {
                ramfile::ReadError::Io(err) => SnapshotError::Io { path, err },
                ramfile::ReadError::Length(len) => SnapshotError::Truncated {
                    dir: dir.to_path_buf(),
                    file: ram_file(i),
                    len,
                    want: size,
                },
            })?;
        if crc != file.crc32 {
            return Err(SnapshotError::Corrupt {
                dir: dir.to_path_buf(),
                file: ram_file(i),
            });
        }
        read_bytes += file.extents.iter().map(|e| e.1).sum::<u64>();
    }
    let ram_us = t_ram.elapsed().as_micros() as u64;
    let t_restore = Instant::now();
    let log = open_log(&spec.console_log).map_err(vm_err)?;
    let state_err = |err| SnapshotError::State {
        dir: dir.to_path_buf(),
        err,
    };
    let vm = Vm::build(hv, spec, ram, log, host_files).map_err(state_err)?;
    let captured_at_ns = if same_boot {
        state.captured_at_ns
    } else {
        crate::monotonic_ns()
    };
    // `decode_state` refused a record without it.
    let Some(mut runtime) = state.record.runtime.take() else {
        return Err(state_err(StateError::NotLive {
            lifecycle: state.record.lifecycle,
            has_runtime: false,
        }));
    };
    // A snapshot's stop time means nothing to the new VM's blackout figures.
    runtime.first_stop_ns = crate::monotonic_ns();
    // Loaded only: the devices serve from `Restored::start`.
    vm.load(runtime, captured_at_ns, false)
        .and_then(|loading| loading.finish())
        .map_err(state_err)?;
    let report = RestoreReport {
        vm: vm_name,
        from: dir.to_path_buf(),
        ram_bytes: vm.shared.ram.size(),
        read_bytes,
        ram_us,
        restore_us: t_restore.elapsed().as_micros() as u64,
    };
    tracing::info!(vm = %report.vm, dir = %dir.display(), ram_ms = ram_us / 1000, "snapshot restored");
    Ok(Restored {
        vm,
        lifecycle: state.record.lifecycle,
        report,
    })
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir` (or its nearest
/// existing ancestor).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut p = dir;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statvfs only writes `st`.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes a snapshot of `vm` will take on disk at most: the RAM that holds data, plus the
/// state (kilobytes; a generous margin).
pub fn needed_bytes(vm: &Vm) -> u64 {
    let data: u64 = vm
        .shared
        .ram
        .regions()
        .iter()
        .map(|r| {
            ramfile::data_extents(&r.file, r.size)
                .map(|e| e.iter().map(|x| x.1).sum())
                .unwrap_or(r.size)
        })
        .sum();
    data + (1 << 20)
}
