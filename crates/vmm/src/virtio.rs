//! A VM's virtio devices: where their register windows sit, how they are wired to KVM
//! (an ioeventfd for queue notifications, an irqfd per device for Linux guests), and how a
//! Linux guest learns of them (`virtio_mmio.device=` on its command line).

use std::fs::File;
use std::sync::Arc;

use warmvm_abi::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE};
use warmvm_devices::virtio::block::{open_image, Block};
use warmvm_devices::virtio::mmio::{MmioHandles, QUEUE_NOTIFY};
use warmvm_devices::virtio::net::Net;
use warmvm_devices::virtio::tap::open_tap;
use warmvm_devices::virtio::VirtioCounters;
use warmvm_devices::{Devices, IrqLine, VirtioMmio};

use crate::config::{DiskConfig, NetConfig};
use crate::vm::VmError;

/// GSI of the first virtio device's interrupt (COM1 has 4); device i has `FIRST_GSI + i`.
pub(crate) const FIRST_GSI: u32 = 5;

/// Where virtio device `index` has its registers.
pub(crate) fn window(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_STRIDE
}

/// Open a VM's disk images as its config says.
pub(crate) fn open_disks(disks: &[DiskConfig]) -> Result<Vec<File>, VmError> {
    disks
        .iter()
        .map(|d| Ok(open_image(&d.path, d.read_only, d.cache)?))
        .collect()
}

/// Open (or create) each interface's TAP in this process's network namespace.
pub(crate) fn open_taps(nets: &[NetConfig]) -> Result<Vec<File>, VmError> {
    nets.iter().map(|n| Ok(open_tap(&n.tap)?)).collect()
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
    mem: &vm_memory::GuestMemoryMmap,
    config: &crate::VmConfig,
    files: HostFiles,
    linux: bool,
) -> Result<(), VmError> {
    if files.disks.len() != config.disks.len() || files.taps.len() != config.nets.len() {
        return Err(VmError::DiskFds {
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
            VmError::ReadFile {
                what: "disk image",
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
}
