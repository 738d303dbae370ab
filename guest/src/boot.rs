//! What the guest knows about its machine, taken from (and checked against) a `BootInfo`.

use warmvm_abi::{
    layout, vcpu_status_offset, BootInfo, RamRange, BOOTINFO_MAGIC, BOOTINFO_VERSION,
    MAX_RAM_RANGES, MAX_VCPUS,
};

pub const PAGE_SIZE: u64 = 4096;

/// How the guest was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// warmvm's direct ring-3 entry.
    Direct,
    /// PVH, through the guest's own 32-bit stub.
    Pvh,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Direct => "direct",
            Entry::Pvh => "pvh",
        }
    }
}

/// The validated boot information.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    pub entry: Entry,
    pub ram_size: u64,
    pub tsc_khz: u64,
    pub vcpu_count: u32,
    pub ram_ranges: [RamRange; MAX_RAM_RANGES],
    pub ram_range_count: usize,
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    pub status_addr: u64,
    pub free_start: u64,
    pub serial_port: u16,
    pub wait_port: u16,
    pub power_port: u16,
    /// The virtio-mmio windows (none: base 0, count 0).
    pub virtio_base: u64,
    pub virtio_count: u32,
    /// RAM set aside for device I/O (rings, buffers), outside the integrity workload.
    pub io_area: u64,
}

/// RAM set aside for device I/O when the VM has virtio devices.
pub const IO_AREA_SIZE: u64 = 2 << 20;

impl Machine {
    /// Check `bi` for what the guest relies on. `image_end` is the end of the guest's own
    /// image: free RAM never starts below it, whatever the boot information says.
    pub fn new(
        bi: &BootInfo,
        vcpu: u64,
        entry: Entry,
        image_end: u64,
    ) -> Result<Self, &'static str> {
        if bi.magic != BOOTINFO_MAGIC {
            return Err("boot info: bad magic");
        }
        if bi.version < BOOTINFO_VERSION {
            return Err("boot info: unsupported version");
        }
        if (bi.size as usize) < core::mem::size_of::<BootInfo>() {
            return Err("boot info: too small for this guest");
        }
        if bi.vcpu_count == 0 || bi.vcpu_count as usize > MAX_VCPUS {
            return Err("boot info: bad vCPU count");
        }
        if vcpu >= u64::from(bi.vcpu_count) {
            return Err("vCPU index beyond the vCPU count");
        }
        if bi.ram_range_count as usize > MAX_RAM_RANGES {
            return Err("boot info: too many RAM ranges");
        }
        let status_need = vcpu_status_offset(bi.vcpu_count as usize) as u64;
        if bi.status_addr == 0 || bi.status_addr % 64 != 0 || bi.status_size < status_need {
            return Err("boot info: bad status area");
        }
        if bi.cmdline_len >= layout::CMDLINE_MAX {
            return Err("boot info: command line too long");
        }
        if bi.cmdline_len != 0 && bi.cmdline_addr == 0 {
            return Err("boot info: command line at address 0");
        }
        let mut free_start = bi.free_start.max(image_end).next_multiple_of(PAGE_SIZE);
        let (virtio_base, virtio_count) =
            if bi.size as usize >= core::mem::size_of::<BootInfo>() && bi.virtio_mmio_count > 0 {
                let end = (bi.virtio_mmio_count as u64)
                    .checked_mul(warmvm_abi::VIRTIO_MMIO_STRIDE)
                    .and_then(|n| n.checked_add(bi.virtio_mmio_base));
                if bi.virtio_mmio_count > warmvm_abi::MAX_VIRTIO_DEVICES
                    || bi.virtio_mmio_base < layout::MMIO_HOLE_START
                    || end.is_none_or(|e| e > layout::MMIO_HOLE_END)
                {
                    return Err("boot info: virtio windows outside the MMIO hole");
                }
                (bi.virtio_mmio_base, bi.virtio_mmio_count)
            } else {
                (0, 0)
            };
        // Every vCPU carves the same area, so their workload stripes agree.
        let io_area = if virtio_count > 0 {
            let start = free_start;
            free_start += IO_AREA_SIZE;
            let first = bi.ram_ranges[0];
            if bi.ram_range_count == 0 || free_start > first.start.saturating_add(first.len) {
                return Err("RAM too small for device I/O");
            }
            start
        } else {
            0
        };
        Ok(Machine {
            entry,
            ram_size: bi.ram_size,
            tsc_khz: bi.tsc_khz,
            vcpu_count: bi.vcpu_count,
            ram_ranges: bi.ram_ranges,
            ram_range_count: bi.ram_range_count as usize,
            cmdline_addr: bi.cmdline_addr,
            cmdline_len: bi.cmdline_len,
            status_addr: bi.status_addr,
            free_start,
            serial_port: bi.serial_port,
            wait_port: bi.wait_port,
            power_port: bi.power_port,
            virtio_base,
            virtio_count,
            io_area,
        })
    }

    pub fn ram_ranges(&self) -> &[RamRange] {
        &self.ram_ranges[..self.ram_range_count]
    }

    /// The command line, up to its NUL.
    pub fn cmdline(&self) -> &'static [u8] {
        if self.cmdline_len == 0 {
            return &[];
        }
        // SAFETY: the address was checked non-null and the length bounded; the command line
        // lies below the free RAM (the VMM's layout puts it at CMDLINE_ADDR, the PVH entry
        // copies it into the image), so nothing writes it while the guest runs.
        let bytes = unsafe {
            core::slice::from_raw_parts(self.cmdline_addr as *const u8, self.cmdline_len as usize)
        };
        crate::cmdline::until_nul(bytes)
    }
}
