//! The boot parameter blocks a kernel reads at entry: the zero page (Linux boot protocol)
//! and `hvm_start_info` with its module list and memory map (PVH).

use crate::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::GuestAddress;

use super::{
    MemoryMapEntry, BOOT_FLAG_MAGIC, BZIMAGE_MAGIC, CMDLINE_ADDR, HEAP_END_PTR,
    LOADER_TYPE_UNDEFINED, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR, ZERO_PAGE_ADDR,
};
use crate::{BootError, Result};

pub(super) fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
    cmdline_len: u32,
    rsdp: u64,
) -> Result<()> {
    let mut bp = boot_params::default();
    match header {
        Some(h) => bp.hdr = h,
        None => {
            // An ELF vmlinux has no setup header: give the kernel the fields it checks.
            bp.hdr.boot_flag = BOOT_FLAG_MAGIC;
            bp.hdr.header = BZIMAGE_MAGIC;
            bp.hdr.kernel_alignment = 0x100_0000;
            bp.hdr.cmdline_size = cmdline_len;
        }
    }
    bp.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    bp.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = HEAP_END_PTR;
    bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    bp.ext_cmd_line_ptr = 0;
    // Read by kernels since 5.0 (boot protocol 2.14); older ones scan the BIOS area.
    bp.acpi_rsdp_addr = rsdp;
    if let Some((addr, len)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = len as u32;
        bp.ext_ramdisk_image = (addr >> 32) as u32;
        bp.ext_ramdisk_size = (len >> 32) as u32;
    }
    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    for (slot, e) in table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    bp.e820_table = table;
    bp.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&bp, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::GuestWrite {
        addr: ZERO_PAGE_ADDR,
        source: e.into(),
    })
}

pub(super) fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| BootError::GuestWrite {
        addr: PVH_START_INFO_ADDR,
        source: e.into(),
    })
}
