//! A VM's virtio devices: where their register windows sit, how they are wired to KVM
//! (an ioeventfd for queue notifications, an irqfd per device for Linux guests), and how a
//! Linux guest learns of them (`virtio_mmio.device=` on its command line).

use std::fs::File;
use std::sync::Arc;

use warmvm_abi::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE};
use warmvm_devices::virtio::block::{open_image, Block};
use warmvm_devices::virtio::mmio::{MmioHandles, QUEUE_NOTIFY};
use warmvm_devices::virtio::VirtioCounters;
use warmvm_devices::{Devices, IrqLine, VirtioMmio};

use crate::config::DiskConfig;
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

/// Put a virtio-blk device for each disk on the VM's MMIO bus, wired to KVM.
pub(crate) fn attach_disks(
    devices: &mut Devices,
    kvm_vm: &warmvm_hypervisor::Vm,
    mem: &vm_memory::GuestMemoryMmap,
    disks: &[DiskConfig],
    files: Vec<File>,
    linux: bool,
    vm_name: &str,
) -> Result<(), VmError> {
    if files.len() != disks.len() {
        return Err(VmError::DiskFds {
            disks: disks.len(),
            fds: files.len(),
        });
    }
    for (i, (disk, file)) in disks.iter().zip(files).enumerate() {
        let name = format!("disk{i}");
        let backend = Block::new(file, disk.read_only, disk.cache, &name).map_err(|err| {
            VmError::ReadFile {
                what: "disk image",
                path: disk.path.clone(),
                err,
            }
        })?;
        let irq = if linux {
            IrqLine::eventfd(kvm_vm.irq_line(FIRST_GSI + i as u32)?)
        } else {
            // The reference guest polls, and sleeps in the wait port until the doorbell.
            IrqLine::none()
        };
        let device = VirtioMmio::new(MmioHandles {
            name: format!("{vm_name}/{name}"),
            backend: Box::new(backend),
            mem: mem.clone(),
            irq,
            doorbell: devices.doorbell.clone(),
            counters: Arc::new(VirtioCounters::default()),
        })?;
        let base = window(i);
        kvm_vm.register_mmio_ioevent(device.notify_eventfd(), base + QUEUE_NOTIFY, 0)?;
        devices.add_virtio(base, device)?;
    }
    Ok(())
}
