//! PVH and the Linux 64-bit boot protocol, for unmodified kernels.
//!
//! Loading, the command line and the boot parameter blocks (zero page, `hvm_start_info` and
//! its memory map) go through linux-loader; this module decides where everything goes, fills
//! the blocks and describes the vCPU state at entry.
//!
//! # Image detection (`LinuxParams::protocol == None`)
//! - ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note: PVH, 32-bit protected mode at the note's
//!   entry.
//! - bzImage (`HdrS` at 0x202): Linux 64-bit boot protocol, entry `code32_start + 0x200`
//!   (`startup_64` of the decompressor; needs `XLF_KERNEL_64`).
//! - ELF without the note (a plain `vmlinux`): Linux 64-bit boot protocol at `e_entry`
//!   (`startup_64`), translated to a physical address if the ELF gives a virtual one.
//! - anything else: [`BootError::UnknownImage`].
//!
//! # Guest-physical layout
//! ```text
//! 0x0000_0000  real-mode IVT and BIOS data area: left zero
//! 0x0000_0500  GDT: 0x10 = __BOOT_CS (64-bit code; 32-bit for PVH), 0x18 = __BOOT_DS,
//!              0x20 = TSS (busy, 16-byte descriptor)
//! 0x0000_0540  IDT (one empty gate: the kernel installs its own before it enables interrupts)
//! 0x0000_0580  TSS (104 bytes, all zero: KVM needs a valid TR, nothing uses it)
//! 0x0000_6000  PVH: hvm_start_info (56 bytes)
//! 0x0000_6040  PVH: module list (the initrd, 32 bytes)
//! 0x0000_6080  PVH: memory map (up to 128 entries of 24 bytes, ends below 0x6c80)
//! 0x0000_7000  Linux: zero page (boot_params, 4 KiB)
//! 0x0000_8000  Linux: boot stack page, RSP = RBP = 0x8ff0 at entry
//! 0x0000_9000  Linux: identity page tables for [0, 4 GiB) with 2 MiB pages: PML4 0x9000,
//!              PDPT 0xa000, four page directories 0xb000..0xf000
//! 0x0002_0000  kernel command line (NUL-terminated, at most 64 KiB; the kernel's own limit,
//!              2047 bytes for current x86 kernels, is what is enforced)
//! 0x0009_fc00  end of the first RAM entry; 0x9fc00..0x100000 is reserved in the memory map
//!              (EBDA, VGA hole, BIOS area), as PC firmware reports it
//! 0x000e_0000  ACPI: RSDP, then FACS, DSDT, FADT, MADT, XSDT (see `acpi`); the zero page's
//!              `acpi_rsdp_addr` and PVH's `rsdp_paddr` point at the RSDP, and a kernel that
//!              scans the BIOS area for it finds it there too
//! 0x000f_0000  MP floating pointer, then the MP configuration table (see `mptable`)
//! 0x0010_0000  bzImage: the protected-mode kernel (code32_start); it decompresses itself to
//!              max(align_up(1 MiB, kernel_alignment), pref_address) (16 MiB for
//!              distribution kernels) and needs `init_size` bytes there.
//!              ELF vmlinux: its PT_LOAD segments at their p_paddr (16 MiB for x86-64 Linux)
//! ...          free RAM
//! top of low RAM (page-aligned, at most the bzImage's initrd_addr_max): the initrd
//! ```
//! The memory map (e820 or PVH) is `p.ram` with the first range split: RAM [0, 0x9fc00),
//! reserved [0x9fc00, 1 MiB), RAM [1 MiB, end). The VMM lays RAM out as
//! [0, min(size, 3 GiB)) and [4 GiB, ...); the 3-4 GiB MMIO hole is not RAM and so is simply
//! absent from the map. Nothing outside RAM is used here: the VMM keeps device state there.
//!
//! # vCPUs
//! Only vCPU 0 gets an entry; the guest starts the others with INIT/SIPI. A kernel learns of
//! them from the ACPI MADT (one local APIC per vCPU); the MP table is written too, for a
//! kernel booted with `acpi=off` (it reads it only if built with `CONFIG_X86_MPPARSE`).

use crate::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{E820_MAX_ENTRIES_ZEROPAGE, XLF_KERNEL_64};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::load_cmdline;
use vm_memory::GuestAddress;

use crate::x86::*;
use crate::{
    mptable, BootError, BootPlan, CmdlineError, InitrdError, LoadError, Protocol, RamLayoutError,
    RamRange, Result,
};

mod blocks;
mod entry;
mod image;

use blocks::{write_pvh_start_info, write_zero_page};
use entry::{linux_entry_state, pvh_entry_state};
use image::{bzimage_footprint_end, detect, elf_physical_entry, load_kernel, ImageKind};

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x540;
pub const TSS_ADDR: u64 = 0x580;
pub const TSS_SIZE: u64 = 104;
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PAGE_TABLES_ADDR: u64 = 0x9000;
pub const PAGE_TABLES_END: u64 = 0x10000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The space reserved for the command line (including its NUL).
pub const CMDLINE_AREA: u64 = 0x1_0000;
/// End of the first RAM entry of the memory map (start of the EBDA in PC firmware).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of RAM above the legacy hole; kernels must load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The identity map built for the Linux protocol covers [0, IDENTITY_MAP_END).
pub const IDENTITY_MAP_END: u64 = 1 << 32;
/// `COMMAND_LINE_SIZE - 1` of x86 Linux, the limit for images that do not state theirs
/// (ELF vmlinux, PVH).
pub const DEFAULT_CMDLINE_MAX: usize = 2047;
/// The most vCPUs this module describes to a guest (the MP table's limit).
pub const MAX_VCPUS: u32 = mptable::MAX_CPUS;

/// e820 / PVH memory map types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const SEL_CODE: u16 = 0x10;
const SEL_DATA: u16 = 0x18;
const SEL_TSS: u16 = 0x20;
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry (`startup_64`) from `code32_start` in a bzImage.
const BZIMAGE_STARTUP_64: u64 = 0x200;
/// `heap_end_ptr` as QEMU sets it: the setup heap ends 0x200 below the real-mode segment's
/// 64 KiB. Unused on a 64-bit entry, but the protocol wants it with `CAN_USE_HEAP`.
const HEAP_END_PTR: u16 = 0xfe00;
/// `initrd_addr_max` when the image does not say (ELF vmlinux, bzImage before 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const ELF_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE: u64 = 0x1000;

/// What the Linux boot needs to know about the VM.
pub struct LinuxParams<'a> {
    /// The whole kernel file: a bzImage or an ELF (vmlinux, or any ELF with a PVH note).
    pub image: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    pub cmdline: &'a str,
    pub ram: &'a [RamRange],
    pub vcpus: u32,
    /// `None`: choose from the image (see the module documentation).
    pub protocol: Option<Protocol>,
    /// The VM has an i8042 at ports 0x60/0x64 (the ACPI tables announce it).
    pub i8042: bool,
}

/// One entry of the e820 / PVH memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Load a Linux kernel (and initrd), write the boot blocks and return vCPU 0's entry.
pub fn setup(mem: &GuestMemoryMmap, p: &LinuxParams) -> Result<BootPlan> {
    if p.vcpus == 0 || p.vcpus > MAX_VCPUS {
        return Err(BootError::TooManyVcpus {
            vcpus: p.vcpus,
            max: MAX_VCPUS,
        });
    }
    let map = memory_map(p.ram)?;
    let ram_size: u64 = p.ram.iter().map(|r| r.len).sum();
    let low_end = p.ram[0].end().min(IDENTITY_MAP_END);

    let kind = detect(p.image)?;
    match (p.protocol, kind) {
        (Some(Protocol::Ring3), _) => {
            return Err(BootError::ProtocolMismatch {
                protocol: Protocol::Ring3,
                reason: "ring3 is warmvm's entry for the reference guest, not for Linux images"
                    .into(),
            })
        }
        (Some(Protocol::Pvh), ImageKind::BzImage) => return Err(BootError::NoPvhEntry),
        _ => {}
    }

    let loaded = load_kernel(mem, p.image, kind)?;
    let pvh_entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
        _ => None,
    };
    let protocol = match p.protocol {
        Some(Protocol::Pvh) if pvh_entry.is_none() => return Err(BootError::NoPvhEntry),
        Some(protocol) => protocol,
        None if pvh_entry.is_some() => Protocol::Pvh,
        None => Protocol::Linux,
    };
    let header = loaded.setup_header;

    // Everything the kernel occupies before it has taken over memory management: its image
    // and, for a bzImage, the area it decompresses to.
    let kernel_end = match &header {
        Some(h) => bzimage_footprint_end(h, loaded.kernel_load.0).max(loaded.kernel_end),
        None => loaded.kernel_end,
    };
    if kernel_end > low_end {
        return Err(BootError::RamTooSmall {
            ram_mib: ram_size >> 20,
            need_mib: kernel_end.div_ceil(1 << 20),
        });
    }

    // Command line.
    let cmdline_max = match &header {
        Some(h) if h.version >= 0x206 => h.cmdline_size as usize,
        Some(_) => 255,
        None => DEFAULT_CMDLINE_MAX,
    }
    .min(CMDLINE_AREA as usize - 1);
    let cmdline = build_cmdline(p.cmdline, cmdline_max)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.into()))?;

    // Initrd, as high as allowed.
    let initrd_max_end = match (protocol, &header) {
        (Protocol::Pvh, _) => low_end,
        (_, Some(h)) if h.version >= 0x203 => u64::from(h.initrd_addr_max) + 1,
        (_, Some(_)) => DEFAULT_INITRD_ADDR_MAX + 1,
        (_, None) => ELF_INITRD_ADDR_MAX + 1,
    }
    .min(low_end);
    let initrd = match p.initrd {
        Some(data) if !data.is_empty() => {
            let addr = place_initrd(data.len() as u64, kernel_end, initrd_max_end)?;
            write_bytes(mem, addr, data)?;
            Some((addr, data.len() as u64))
        }
        _ => None,
    };

    mptable::write(mem, p.vcpus)?;
    let rsdp = crate::acpi::write(
        mem,
        &crate::acpi::AcpiParams {
            vcpus: p.vcpus,
            i8042: p.i8042,
        },
    )?;
    write_u64s(mem, IDT_ADDR, &[0])?;
    write_bytes(mem, TSS_ADDR, &[0u8; TSS_SIZE as usize])?;

    let entry = match protocol {
        Protocol::Pvh => {
            let rip = pvh_entry.ok_or(BootError::NoPvhEntry)?;
            write_pvh_start_info(mem, &map, initrd, rsdp)?;
            pvh_entry_state(mem, rip)?
        }
        _ => {
            let rip = match &header {
                Some(h) => {
                    if h.xloadflags & XLF_KERNEL_64 == 0 {
                        return Err(BootError::Load(LoadError::No64BitEntry));
                    }
                    u64::from(h.code32_start) + BZIMAGE_STARTUP_64
                }
                None => elf_physical_entry(p.image)?,
            };
            write_zero_page(mem, header, &map, initrd, cmdline_len(&cmdline), rsdp)?;
            linux_entry_state(mem, rip)?
        }
    };

    Ok(BootPlan {
        entries: vec![entry],
        status_addr: None,
        protocol,
    })
}

/// The memory map of `ram` as the guest sees it (see the module documentation). The ranges
/// must be sorted and disjoint, and the first must start at 0 and reach beyond 1 MiB.
pub fn memory_map(ram: &[RamRange]) -> Result<Vec<MemoryMapEntry>> {
    let first = ram
        .first()
        .ok_or(BootError::RamLayout(RamLayoutError::NoRam))?;
    if first.start != 0 {
        return Err(BootError::RamLayout(RamLayoutError::FirstNotAtZero(
            first.start,
        )));
    }
    if first.end() <= HIMEM_START {
        return Err(BootError::RamTooSmall {
            ram_mib: first.len >> 20,
            need_mib: 2,
        });
    }
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        MemoryMapEntry {
            addr: HIMEM_START,
            size: first.end() - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    let mut prev_end = first.end();
    for r in &ram[1..] {
        if r.start < prev_end || r.start.checked_add(r.len).is_none() {
            return Err(BootError::RamLayout(RamLayoutError::Unsorted {
                start: r.start,
                len: r.len,
                prev_end,
            }));
        }
        if r.len > 0 {
            map.push(MemoryMapEntry {
                addr: r.start,
                size: r.len,
                kind: E820_RAM,
            });
            prev_end = r.end();
        }
    }
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::RamLayout(RamLayoutError::TooManyEntries {
            entries: map.len(),
            max: E820_MAX_ENTRIES_ZEROPAGE,
        }));
    }
    Ok(map)
}

fn build_cmdline(text: &str, max_len: usize) -> Result<Cmdline> {
    if text.len() > max_len {
        return Err(BootError::Cmdline(CmdlineError::TooLong {
            len: text.len(),
            max: max_len,
        }));
    }
    if let Some(c) = text.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(BootError::Cmdline(CmdlineError::NotPrintable(c)));
    }
    Cmdline::try_from(text, max_len + 1).map_err(|e| BootError::Cmdline(e.into()))
}

fn cmdline_len(cmdline: &Cmdline) -> u32 {
    cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len() as u32)
        .unwrap_or(0)
}

/// The page-aligned start of an initrd of `len` bytes placed as high as possible so that it
/// ends at or below `max_end` and starts at or above `floor`.
fn place_initrd(len: u64, floor: u64, max_end: u64) -> Result<u64> {
    let start = max_end
        .checked_sub(len)
        .map(|s| s & !(PAGE - 1))
        .filter(|s| *s >= floor.next_multiple_of(PAGE));
    start.ok_or(BootError::Initrd(InitrdError::DoesNotFit {
        kib: len.div_ceil(1024),
        floor,
        max_end,
    }))
}

#[cfg(test)]
mod tests;
