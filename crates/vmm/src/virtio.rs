//! A VM's virtio devices: where their register windows sit, how they are wired to KVM
//! (an ioeventfd for queue notifications, an irqfd per device for Linux guests), and how a
//! Linux guest learns of them (`virtio_mmio.device=` on its command line).

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use warmvm_abi::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE};
use warmvm_devices::virtio::block::{open_image, Block};
use warmvm_devices::virtio::mmio::{MmioHandles, QUEUE_NOTIFY};
use warmvm_devices::virtio::net::Net;
use warmvm_devices::virtio::tap::{check_tap, open_tap};
use warmvm_devices::virtio::VirtioCounters;
use warmvm_devices::{Devices, IrqLine, VirtioMmio};

use crate::config::DiskConfig;

/// Why a VM's virtio devices could not be opened or wired (each text is the one the VM's
/// creation has always failed with).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Disk(#[from] warmvm_devices::virtio::block::BlockError),
    #[error("cannot read disk image {path}: {err}")]
    DiskImage {
        path: std::path::PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("{0}")]
    Tap(#[from] warmvm_devices::virtio::tap::TapError),
    #[error("network interface {index} names tap_fd {fd}, but no such TAP fd was passed")]
    TapFdMissing { index: usize, fd: i32 },
    #[error("{disks} virtio devices but {fds} host fds")]
    DiskFds { disks: usize, fds: usize },
    #[error("{0}")]
    Virtio(#[from] warmvm_devices::VirtioError),
    #[error("device placement: {0}")]
    Bus(#[from] warmvm_devices::BusError),
    /// An interrupt line or a queue notification KVM would not wire.
    #[error("{0}")]
    Hypervisor(#[from] warmvm_hypervisor::Error),
}

/// GSI of the first virtio device's interrupt (COM1 has 4); device i has `FIRST_GSI + i`.
pub(crate) const FIRST_GSI: u32 = 5;

/// Where virtio device `index` has its registers.
pub(crate) fn window(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_STRIDE
}

/// Open a VM's disk images as its config says.
pub(crate) fn open_disks(disks: &[DiskConfig]) -> Result<Vec<File>, DeviceError> {
    disks
        .iter()
        .map(|d| Ok(open_image(&d.path, d.read_only, d.cache)?))
        .collect()
}

/// TAPs a caller opened and hands to a new VM, by interface index: the interfaces whose
/// config names a `tap_fd` take theirs from here.
#[derive(Debug, Default)]
pub struct GivenTaps(pub BTreeMap<usize, File>);

/// A `tap_fd = N` of a config file that this process cannot take.
#[derive(Debug, thiserror::Error)]
pub enum InheritedTapError {
    #[error("VM {vm}: tap_fd {fd} is not an open fd of this process (pass the TAP's fd to it)")]
    NotOpen { vm: String, fd: i32 },
    #[error("VM {vm}: tap_fd {fd} is standard input, output or error, not a TAP")]
    Standard { vm: String, fd: i32 },
    #[error("VM {vm}: tap_fd {fd} is named twice in the config")]
    Twice { vm: String, fd: i32 },
    #[error("VM {vm}: {err}")]
    Tap {
        vm: String,
        err: warmvm_devices::virtio::tap::TapError,
    },
}

/// Take the TAP fds that this process inherited and `config` names (`tap_fd = N`), each
/// checked to be open, a TAP carrying bare frames, and named once. Call it before this
/// process opens any TAP of its own: an fd that is a TAP is then certainly an inherited one,
/// nobody else's to close.
pub fn take_inherited_taps(
    config: &crate::Config,
) -> Result<BTreeMap<String, GivenTaps>, InheritedTapError> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    let mut seen = std::collections::BTreeSet::new();
    let mut out: BTreeMap<String, GivenTaps> = BTreeMap::new();
    for vm in &config.vms {
        for (index, net) in vm.nets.iter().enumerate() {
            let Some(fd) = net.tap_fd else { continue };
            let err_vm = || vm.name.clone();
            if fd <= 2 {
                return Err(InheritedTapError::Standard { vm: err_vm(), fd });
            }
            if !seen.insert(fd) {
                return Err(InheritedTapError::Twice { vm: err_vm(), fd });
            }
            // SAFETY: F_GETFD only reads the flags of fd `fd`, if it is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(InheritedTapError::NotOpen { vm: err_vm(), fd });
            }
            // SAFETY: `fd` is open (checked above) and stays open while borrowed here.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            check_tap(borrowed).map_err(|err| InheritedTapError::Tap { vm: err_vm(), err })?;
            // SAFETY: `fd` is an open TAP that this process did not open itself (it opens
            // none before this), named once: an inherited fd that nothing else owns.
            let file = unsafe { File::from_raw_fd(fd) };
            out.entry(vm.name.clone())
                .or_default()
                .0
                .insert(index, file);
        }
    }
    Ok(out)
}

/// Open (or create) each interface's TAP in this process's network namespace, or take the
/// one given for it after checking it is a TAP; the config with every TAP's name filled in,
/// so that what crosses a warm reboot names the interface.
pub(crate) fn open_taps(
    config: &crate::VmConfig,
    mut given: GivenTaps,
) -> Result<(Vec<File>, crate::VmConfig), DeviceError> {
    let mut config = config.clone();
    let mut files = Vec::new();
    for (index, net) in config.nets.iter_mut().enumerate() {
        let file = match (net.tap_fd, &net.tap) {
            (Some(fd), _) => {
                let file = given
                    .0
                    .remove(&index)
                    .ok_or(DeviceError::TapFdMissing { index, fd })?;
                // From here on the VM knows the TAP by name: an fd number means nothing
                // to the next process, and a cold reboot opens the TAP by its name.
                net.tap = Some(check_tap(std::os::fd::AsFd::as_fd(&file))?);
                net.tap_fd = None;
                file
            }
            (None, Some(name)) => open_tap(name)?,
            (None, None) => return Err(DeviceError::TapFdMissing { index, fd: -1 }),
        };
        files.push(file);
    }
    Ok((files, config))
}

/// A virtio device as a VM's report shows it: where the guest finds it, what backs it on
/// the host, how it stands with its driver, and its counters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceReport {
    /// `disk0`, `net0`, ... (the name in metrics and in the handover's fd table).
    pub name: String,
    pub kind: DeviceKind,
    /// The guest-physical address of its 4 KiB virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt (GSI), for a guest with a kernel; none for the polling reference guest.
    pub irq: Option<u32>,
    pub status: warmvm_devices::virtio::DeviceHealth,
    /// Requests completed (block requests, frames received and sent).
    pub requests: u64,
    /// Times the guest broke the protocol.
    pub failures: u64,
    /// Disks: the image, whether read-only, and the cache mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<warmvm_devices::virtio::block::CacheMode>,
    /// Network interfaces: the TAP (also when it was passed as an fd) and the guest's MAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// What a virtio device is, as its report names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    VirtioBlk,
    VirtioNet,
}

impl DeviceKind {
    /// The name the report shows: `virtio-blk` or `virtio-net`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk => "virtio-blk",
            DeviceKind::VirtioNet => "virtio-net",
        }
    }
}

/// The reports of a VM's devices, from its config (disks, then interfaces: the order
/// [`attach`] gives them windows and GSIs) and their live figures.
pub(crate) fn reports(
    config: &crate::VmConfig,
    infos: Vec<warmvm_devices::virtio::DeviceInfo>,
    linux: bool,
) -> Vec<DeviceReport> {
    infos
        .into_iter()
        .enumerate()
        .map(|(i, info)| {
            let mut r = DeviceReport {
                name: info.name,
                kind: DeviceKind::VirtioNet,
                mmio_base: window(i),
                irq: linux.then_some(FIRST_GSI + i as u32),
                status: info.health,
                requests: info.requests,
                failures: info.failures,
                path: None,
                read_only: None,
                cache: None,
                tap: None,
                mac: None,
            };
            if let Some(d) = config.disks.get(i) {
                r.kind = DeviceKind::VirtioBlk;
                r.path = Some(d.path.clone());
                r.read_only = Some(d.read_only);
                r.cache = Some(d.cache);
            } else if let Some(n) = config.nets.get(i - config.disks.len()) {
                let mac = n.mac_for(&config.name, i - config.disks.len());
                r.tap = n.tap.clone();
                r.mac = Some(
                    mac.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            }
            r
        })
        .collect()
}

/// What a Linux guest's command line needs to find the devices.
pub(crate) fn linux_cmdline_args(devices: usize) -> String {
    (0..devices)
        .map(|i| {
            format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                window(i),
                FIRST_GSI + i as u32
            )
        })
        .collect()
}

/// What a VM's virtio devices are built over: its config and the open host files.
pub(crate) struct HostFiles {
    pub disks: Vec<File>,
    pub taps: Vec<File>,
}

/// Put the VM's virtio devices on its MMIO bus, wired to KVM: a virtio-blk device per disk,
/// then a virtio-net device per interface (the windows, GSIs and fd names follow this
/// order).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attach(
    devices: &mut Devices,
    kvm_vm: &warmvm_hypervisor::Vm,
    mem: &warmvm_memory::GuestMemoryMmap,
    config: &crate::VmConfig,
    files: HostFiles,
    linux: bool,
) -> Result<(), DeviceError> {
    if files.disks.len() != config.disks.len() || files.taps.len() != config.nets.len() {
        return Err(DeviceError::DiskFds {
            disks: config.disks.len() + config.nets.len(),
            fds: files.disks.len() + files.taps.len(),
        });
    }
    let mut backends: Vec<(
        String,
        Box<dyn warmvm_devices::virtio::mmio::VirtioBackend>,
        u32,
    )> = Vec::new();
    for (i, (disk, file)) in config.disks.iter().zip(files.disks).enumerate() {
        let name = format!("disk{i}");
        let backend = Block::new(file, disk.read_only, disk.cache, &name).map_err(|err| {
            DeviceError::DiskImage {
                path: disk.path.clone(),
                err,
            }
        })?;
        backends.push((name, Box::new(backend), 1));
    }
    for (i, (net, tap)) in config.nets.iter().zip(files.taps).enumerate() {
        let backend = Net::new(tap, net.mac_for(&config.name, i));
        backends.push((format!("net{i}"), Box::new(backend), 2));
    }
    for (i, (name, backend, queues)) in backends.into_iter().enumerate() {
        let irq = if linux {
            IrqLine::eventfd(kvm_vm.irq_line(FIRST_GSI + i as u32)?)
        } else {
            // The reference guest polls, and sleeps in the wait port until the doorbell.
            IrqLine::none()
        };
        let device = VirtioMmio::new(MmioHandles {
            name: format!("{}/{name}", config.name),
            backend,
            mem: mem.clone(),
            irq,
            doorbell: devices.doorbell.clone(),
            counters: Arc::new(VirtioCounters::default()),
            thread_setup: crate::device_thread_setup(),
        })?;
        let base = window(i);
        for q in 0..queues {
            kvm_vm.register_mmio_ioevent(device.notify_eventfd(), base + QUEUE_NOTIFY, q)?;
        }
        devices.add_virtio(base, device)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_learns_of_each_device_window_and_its_interrupt() {
        assert_eq!(linux_cmdline_args(0), "");
        assert_eq!(
            linux_cmdline_args(2),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    /// A VM's creation fails with the device's own message and cause, as it did when these
    /// were the VM's errors: the API and the CLI show the same line.
    #[test]
    fn a_device_failure_reads_the_same_through_the_vms_error() {
        use std::error::Error;
        let missing = DeviceError::TapFdMissing { index: 1, fd: 7 };
        assert_eq!(
            crate::VmError::from(missing).to_string(),
            "network interface 1 names tap_fd 7, but no such TAP fd was passed"
        );
        let image = crate::VmError::from(DeviceError::DiskImage {
            path: "/d.img".into(),
            err: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert_eq!(
            image.to_string(),
            "cannot read disk image /d.img: permission denied"
        );
        let source = image.source().map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("permission denied"));
    }
}
