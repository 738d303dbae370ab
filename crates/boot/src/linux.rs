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
//! Only vCPU 0 gets an entry; the guest starts the others with INIT/SIPI. The MP table is
//! written for either protocol, since Linux scans the BIOS area for it whatever way it was
//! entered; but a kernel reads it only if built with `CONFIG_X86_MPPARSE` and finds no ACPI
//! MADT. warmvm provides no ACPI tables, so a kernel without MPPARSE (Debian's cloud kernel
//! is one) sees one CPU, and the other vCPUs wait for a SIPI that never comes.

use std::io::Cursor;

use kvm_bindings::{kvm_dtable, kvm_regs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use crate::x86::*;
use crate::{mptable, BootError, BootPlan, CpuEntry, Protocol, RamRange, Result, SystemRegisters};

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
}

/// One entry of the e820 / PVH memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageKind {
    Elf,
    BzImage,
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
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

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
    write_u64s(mem, IDT_ADDR, &[0])?;
    write_bytes(mem, TSS_ADDR, &[0u8; TSS_SIZE as usize])?;

    let entry = match protocol {
        Protocol::Pvh => {
            let rip = pvh_entry.ok_or(BootError::NoPvhEntry)?;
            write_pvh_start_info(mem, &map, initrd)?;
            pvh_entry_state(mem, rip)?
        }
        _ => {
            let rip = match &header {
                Some(h) => {
                    if h.xloadflags & XLF_KERNEL_64 == 0 {
                        return Err(BootError::Load(
                            "the bzImage has no 64-bit entry point (needs boot protocol 2.12 \
                             with XLF_KERNEL_64)"
                                .into(),
                        ));
                    }
                    u64::from(h.code32_start) + BZIMAGE_STARTUP_64
                }
                None => elf_physical_entry(p.image)?,
            };
            write_zero_page(mem, header, &map, initrd, cmdline_len(&cmdline))?;
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
        .ok_or_else(|| BootError::RamLayout("no RAM".into()))?;
    if first.start != 0 {
        return Err(BootError::RamLayout(format!(
            "the first RAM range must start at 0, not {:#x}",
            first.start
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
            return Err(BootError::RamLayout(format!(
                "RAM ranges must be sorted and disjoint: {:#x}+{:#x} overlaps or precedes {:#x}",
                r.start, r.len, prev_end
            )));
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
        return Err(BootError::RamLayout(format!(
            "{} memory map entries; the zero page holds at most {E820_MAX_ENTRIES_ZEROPAGE}",
            map.len()
        )));
    }
    Ok(map)
}

fn detect(image: &[u8]) -> Result<ImageKind> {
    if image.starts_with(b"\x7fELF") {
        return Ok(ImageKind::Elf);
    }
    let magic = image
        .get(0x202..0x206)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let boot_flag = image
        .get(0x1fe..0x200)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    if magic == Some(BZIMAGE_MAGIC) && boot_flag == Some(BOOT_FLAG_MAGIC) {
        return Ok(ImageKind::BzImage);
    }
    Err(BootError::UnknownImage)
}

fn load_kernel(mem: &GuestMemoryMmap, image: &[u8], kind: ImageKind) -> Result<KernelLoaderResult> {
    let mut reader = Cursor::new(image);
    let highmem = Some(GuestAddress(HIMEM_START));
    match kind {
        ImageKind::Elf => {
            check_elf_header(image)?;
            Elf::load(mem, None, &mut reader, highmem)
        }
        ImageKind::BzImage => BzImage::load(mem, None, &mut reader, highmem),
    }
    .map_err(|e| BootError::Load(e.to_string()))
}

fn elf_header(image: &[u8]) -> Result<linux_loader::elf::Elf64_Ehdr> {
    let mut ehdr = linux_loader::elf::Elf64_Ehdr::default();
    let bytes = image
        .get(..std::mem::size_of_val(&ehdr))
        .ok_or_else(|| BootError::BadElf("truncated ELF header".into()))?;
    ehdr.as_mut_slice().copy_from_slice(bytes);
    Ok(ehdr)
}

/// Checks what linux-loader does not: a 64-bit x86 ELF whose segments all load at or above
/// 1 MiB, where they cannot collide with the boot structures written below it.
fn check_elf_header(image: &[u8]) -> Result<()> {
    let ehdr = elf_header(image)?;
    if ehdr.e_ident[linux_loader::elf::EI_CLASS] != linux_loader::elf::ELFCLASS64 {
        return Err(BootError::BadElf("not a 64-bit ELF".into()));
    }
    if ehdr.e_machine != linux_loader::elf::EM_X86_64 {
        return Err(BootError::BadElf(format!(
            "machine {} is not x86-64",
            ehdr.e_machine
        )));
    }
    if let Some(low) = elf_loads(image)?
        .iter()
        .find(|ph| ph.p_filesz > 0 && ph.p_paddr < HIMEM_START)
    {
        return Err(BootError::ImageOverlap(low.p_paddr));
    }
    Ok(())
}

/// The PT_LOAD program headers of an ELF image.
fn elf_loads(image: &[u8]) -> Result<Vec<linux_loader::elf::Elf64_Phdr>> {
    let ehdr = elf_header(image)?;
    let phdr_size = std::mem::size_of::<linux_loader::elf::Elf64_Phdr>() as u64;
    let mut loads = Vec::new();
    for i in 0..u64::from(ehdr.e_phnum) {
        let off = ehdr
            .e_phoff
            .checked_add(i * phdr_size)
            .ok_or_else(|| BootError::BadElf("program header offset overflows".into()))?;
        let bytes = usize::try_from(off)
            .ok()
            .and_then(|o| image.get(o..o.checked_add(phdr_size as usize)?))
            .ok_or_else(|| BootError::BadElf("truncated program headers".into()))?;
        let mut ph = linux_loader::elf::Elf64_Phdr::default();
        ph.as_mut_slice().copy_from_slice(bytes);
        if ph.p_type == linux_loader::elf::PT_LOAD && ph.p_memsz > 0 {
            loads.push(ph);
        }
    }
    Ok(loads)
}

/// The physical address of the ELF's entry point: `e_entry` if a loadable segment holds it
/// physically (x86-64 vmlinux does this), else `e_entry` translated through the segment
/// whose virtual range contains it.
fn elf_physical_entry(image: &[u8]) -> Result<u64> {
    let entry = elf_header(image)?.e_entry;
    let loads = elf_loads(image)?;
    let within = |start: u64, len: u64| entry >= start && entry - start < len;
    if loads.iter().any(|ph| within(ph.p_paddr, ph.p_memsz)) {
        return Ok(entry);
    }
    loads
        .iter()
        .find(|ph| within(ph.p_vaddr, ph.p_memsz))
        .map(|ph| entry - ph.p_vaddr + ph.p_paddr)
        .ok_or_else(|| {
            BootError::BadElf(format!(
                "entry point {entry:#x} is outside every loadable segment"
            ))
        })
}

/// End of the memory a bzImage needs while it decompresses itself (Linux's
/// arch/x86/boot/compressed/head_64.S: the output goes to the load address aligned up to
/// `kernel_alignment`, or `pref_address` if that is higher, and takes `init_size` bytes).
fn bzimage_footprint_end(h: &setup_header, load: u64) -> u64 {
    if h.version < 0x20a || h.init_size == 0 {
        return 0;
    }
    let pref = h.pref_address;
    let align = u64::from(h.kernel_alignment).max(PAGE);
    let out = if h.relocatable_kernel != 0 {
        load.next_multiple_of(align).max(pref)
    } else {
        pref
    };
    out.saturating_add(u64::from(h.init_size))
}

fn build_cmdline(text: &str, max_len: usize) -> Result<Cmdline> {
    if text.len() > max_len {
        return Err(BootError::Cmdline(format!(
            "the command line is {} bytes long; this kernel accepts at most {max_len}",
            text.len()
        )));
    }
    if let Some(c) = text.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(BootError::Cmdline(format!(
            "the command line contains {c:?}; only printable ASCII is allowed"
        )));
    }
    Cmdline::try_from(text, max_len + 1).map_err(|e| BootError::Cmdline(e.to_string()))
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
    start.ok_or_else(|| {
        BootError::Initrd(format!(
            "the initrd ({} KiB) does not fit between the end of the kernel at {floor:#x} and \
             {max_end:#x} (end of low RAM or the kernel's initrd_addr_max); give the VM more \
             memory or use a smaller initrd",
            len.div_ceil(1024)
        ))
    })
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
    cmdline_len: u32,
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
        reason: e.to_string(),
    })
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
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
        reason: e.to_string(),
    })
}

/// The busy TSS descriptor both protocols load into TR (type 11 is a busy 64-bit TSS in long
/// mode and a busy 32-bit TSS in protected mode; the upper half of a 16-byte descriptor is
/// zero since the TSS lies below 4 GiB).
fn tss_descriptor() -> [u64; 2] {
    [gdt_entry(0x008b, TSS_ADDR as u32, (TSS_SIZE - 1) as u32), 0]
}

fn write_gdt(mem: &GuestMemoryMmap, code: u64) -> Result<[u64; 6]> {
    let [tss_lo, tss_hi] = tss_descriptor();
    let gdt = [
        0,
        0,
        code,                          // 0x10: __BOOT_CS
        gdt_entry(0xc093, 0, 0xfffff), // 0x18: __BOOT_DS, flat 4 GiB read/write
        tss_lo,                        // 0x20: TSS
        tss_hi,
    ];
    write_u64s(mem, GDT_ADDR, &gdt)?;
    Ok(gdt)
}

fn flat_registers(gdt: &[u64; 6], cr0: u64, cr3: u64, cr4: u64, efer: u64) -> SystemRegisters {
    let code = segment_from_gdt(gdt[2], SEL_CODE);
    let data = segment_from_gdt(gdt[3], SEL_DATA);
    let tr = segment_from_gdt(gdt[4], SEL_TSS);
    SystemRegisters {
        segments: Segments::flat(code, data, tr),
        gdt: kvm_dtable {
            base: GDT_ADDR,
            limit: (gdt.len() * 8 - 1) as u16,
            ..Default::default()
        },
        idt: kvm_dtable {
            base: IDT_ADDR,
            limit: 7,
            ..Default::default()
        },
        cr0,
        cr3,
        cr4,
        efer,
    }
}

/// Linux 64-bit boot protocol: long mode with identity paging, __BOOT_CS/__BOOT_DS loaded,
/// interrupts off, RSI = zero page.
fn linux_entry_state(mem: &GuestMemoryMmap, rip: u64) -> Result<CpuEntry> {
    identity_page_tables(mem, PAGE_TABLES_ADDR, PAGE_TABLES_END, IDENTITY_MAP_END, 0)?;
    let gdt = write_gdt(mem, gdt_entry(0xa09b, 0, 0xfffff))?;
    let sregs = flat_registers(
        &gdt,
        CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        PAGE_TABLES_ADDR,
        CR4_PAE,
        EFER_LME | EFER_LMA,
    );
    Ok(CpuEntry {
        regs: kvm_regs {
            rip,
            rsi: ZERO_PAGE_ADDR,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rflags: 0x2,
            ..Default::default()
        },
        sregs,
        msrs: [(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)],
    })
}

/// PVH: 32-bit flat protected mode without paging, RBX = hvm_start_info. No stack.
fn pvh_entry_state(mem: &GuestMemoryMmap, rip: u64) -> Result<CpuEntry> {
    let gdt = write_gdt(mem, gdt_entry(0xc09b, 0, 0xfffff))?;
    let sregs = flat_registers(&gdt, CR0_PE | CR0_ET, 0, 0, 0);
    Ok(CpuEntry {
        regs: kvm_regs {
            rip,
            rbx: PVH_START_INFO_ADDR,
            rflags: 0x2,
            ..Default::default()
        },
        sregs,
        msrs: [(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr};
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    fn guest(mib: u64) -> (GuestMemoryMmap, Vec<RamRange>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (mib * MIB) as usize)])
            .expect("anonymous test memory");
        (
            mem,
            vec![RamRange {
                start: 0,
                len: mib * MIB,
            }],
        )
    }

    fn params<'a>(image: &'a [u8], ram: &'a [RamRange]) -> LinuxParams<'a> {
        LinuxParams {
            image,
            initrd: None,
            cmdline: "console=ttyS0 panic=1",
            ram,
            vcpus: 1,
            protocol: None,
        }
    }

    /// A bzImage with 4 setup sectors and `payload` as its protected-mode kernel.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let h = setup_header {
            setup_sects: 4,
            boot_flag: BOOT_FLAG_MAGIC,
            header: BZIMAGE_MAGIC,
            version: 0x20f,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x10_0000,
            ..Default::default()
        };
        let mut image = vec![0u8; 5 * 512];
        image[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(h.as_slice());
        image.extend_from_slice(payload);
        image
    }

    /// A minimal x86-64 ELF with one loadable segment holding `code` at `vaddr`/`paddr`
    /// (file offset 0x1000) and, if `pvh` is given, a PVH entry note.
    fn elf(entry: u64, vaddr: u64, paddr: u64, code: &[u8], pvh: Option<u32>) -> Vec<u8> {
        let phnum = if pvh.is_some() { 2 } else { 1 };
        let mut ehdr = Elf64_Ehdr {
            e_type: 2,
            e_machine: linux_loader::elf::EM_X86_64,
            e_version: 1,
            e_entry: entry,
            e_phoff: 64,
            e_ehsize: 64,
            e_phentsize: 56,
            e_phnum: phnum,
            ..Default::default()
        };
        ehdr.e_ident[..4].copy_from_slice(b"\x7fELF");
        ehdr.e_ident[4] = linux_loader::elf::ELFCLASS64;
        ehdr.e_ident[5] = 1; // little endian
        ehdr.e_ident[6] = 1;
        let load = Elf64_Phdr {
            p_type: linux_loader::elf::PT_LOAD,
            p_flags: 5,
            p_offset: 0x1000,
            p_vaddr: vaddr,
            p_paddr: paddr,
            p_filesz: code.len() as u64,
            p_memsz: code.len() as u64 + 0x1000,
            p_align: 0x1000,
        };
        let mut image = vec![0u8; 0x1000];
        image[..64].copy_from_slice(ehdr.as_slice());
        image[64..120].copy_from_slice(load.as_slice());
        if let Some(entry) = pvh {
            let note_off = 0x200u64;
            // An unrelated note first, then XEN_ELFNOTE_PHYS32_ENTRY.
            let mut note = Vec::new();
            for (ty, desc) in [
                (6u32, b"linux\0\0\0".to_vec()),
                (18, entry.to_le_bytes().to_vec()),
            ] {
                note.extend_from_slice(&4u32.to_le_bytes());
                note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
                note.extend_from_slice(&ty.to_le_bytes());
                note.extend_from_slice(b"Xen\0");
                note.extend_from_slice(&desc);
            }
            let phdr = Elf64_Phdr {
                p_type: linux_loader::elf::PT_NOTE,
                p_offset: note_off,
                p_filesz: note.len() as u64,
                p_memsz: note.len() as u64,
                p_align: 4,
                ..Default::default()
            };
            image[120..176].copy_from_slice(phdr.as_slice());
            image[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
        }
        image.extend_from_slice(code);
        image
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    fn read_cstr(mem: &GuestMemoryMmap, addr: u64) -> String {
        let mut buf = vec![0u8; 256];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        let end = buf.iter().position(|b| *b == 0).unwrap();
        String::from_utf8(buf[..end].to_vec()).unwrap()
    }

    #[test]
    fn bzimage_is_detected_loaded_and_entered_in_long_mode() {
        let (mem, ram) = guest(64);
        let image = bzimage(b"\xf4payload");
        let plan = setup(&mem, &params(&image, &ram)).unwrap();
        assert_eq!(plan.protocol, Protocol::Linux);
        assert_eq!(plan.entries.len(), 1);
        assert!(plan.status_addr.is_none());
        let mut loaded = [0u8; 8];
        mem.read_slice(&mut loaded, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(&loaded, b"\xf4payload");

        let e = &plan.entries[0];
        assert_eq!(e.regs.rip, 0x10_0200);
        assert_eq!(e.regs.rsi, ZERO_PAGE_ADDR);
        assert_eq!(e.regs.rflags, 2);
        let s = &e.sregs;
        assert_eq!(
            (s.segments.cs.selector, s.segments.cs.l, s.segments.cs.db),
            (0x10, 1, 0)
        );
        assert_eq!(s.segments.ds.selector, 0x18);
        assert_eq!(s.segments.ss.selector, 0x18);
        assert_eq!((s.segments.tr.type_, s.segments.tr.present), (11, 1));
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PAGE_TABLES_ADDR);
        // The GDT entry behind CS is the 64-bit code descriptor.
        let cs: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 0x10)).unwrap();
        assert_eq!(cs, gdt_entry(0xa09b, 0, 0xfffff));
        // Identity map: the last 2 MiB page below 4 GiB.
        let pde: u64 = mem
            .read_obj(GuestAddress(
                PAGE_TABLES_ADDR + 0x2000 + 3 * 0x1000 + 511 * 8,
            ))
            .unwrap();
        assert_eq!(pde, ((4u64 << 30) - (2 << 20)) | 0x83);

        let zp = zero_page(&mem);
        let hdr = zp.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(
            hdr.loadflags & (LOADED_HIGH | CAN_USE_HEAP),
            LOADED_HIGH | CAN_USE_HEAP
        );
        assert_eq!({ hdr.heap_end_ptr }, HEAP_END_PTR);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.ramdisk_image }, 0);
        assert_eq!(read_cstr(&mem, CMDLINE_ADDR), "console=ttyS0 panic=1");
        // The MP table is there.
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(0xf_0000)).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn e820_map_splits_off_the_legacy_hole() {
        let (mem, ram) = guest(64);
        setup(&mem, &params(&bzimage(b"k"), &ram)).unwrap();
        let zp = zero_page(&mem);
        assert_eq!(zp.e820_entries, 3);
        let t = zp.e820_table;
        let got: Vec<(u64, u64, u32)> = t[..3]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, 63 * MIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn memory_map_follows_the_vmm_layout_around_the_mmio_hole() {
        let gib = 1u64 << 30;
        let ram = [
            RamRange {
                start: 0,
                len: 3 * gib,
            },
            RamRange {
                start: 4 * gib,
                len: 2 * gib,
            },
        ];
        let map = memory_map(&ram).unwrap();
        let want = [
            (0, 0x9fc00, E820_RAM),
            (0x9fc00, 0x60400, E820_RESERVED),
            (0x100000, 3 * gib - 0x100000, E820_RAM),
            (4 * gib, 2 * gib, E820_RAM),
        ];
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(got, want);

        let overlapping = [
            ram[0],
            RamRange {
                start: gib,
                len: gib,
            },
        ];
        assert!(matches!(
            memory_map(&overlapping),
            Err(BootError::RamLayout(_))
        ));
        let not_at_zero = [RamRange {
            start: MIB,
            len: gib,
        }];
        assert!(matches!(
            memory_map(&not_at_zero),
            Err(BootError::RamLayout(_))
        ));
    }

    #[test]
    fn vmlinux_elf_enters_at_its_physical_entry() {
        let (mem, ram) = guest(64);
        // Linked at the kernel's virtual address with e_entry virtual: translated.
        let image = elf(
            0xffff_ffff_8100_0010,
            0xffff_ffff_8100_0000,
            0x100_0000,
            b"\x90\xf4",
            None,
        );
        let plan = setup(&mem, &params(&image, &ram)).unwrap();
        assert_eq!(plan.protocol, Protocol::Linux);
        assert_eq!(plan.entries[0].regs.rip, 0x100_0010);
        let b: u8 = mem.read_obj(GuestAddress(0x100_0001)).unwrap();
        assert_eq!(b, 0xf4);
        let zp = zero_page(&mem);
        assert_eq!({ zp.hdr.header }, BZIMAGE_MAGIC);
        assert_eq!({ zp.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!(zp.hdr.type_of_loader, 0xff);
        assert_eq!(zp.e820_entries, 3);

        // x86-64 vmlinux style: e_entry is already physical.
        let (mem, ram) = guest(64);
        let image = elf(0x100_0000, 0xffff_ffff_8100_0000, 0x100_0000, b"\xf4", None);
        let plan = setup(&mem, &params(&image, &ram)).unwrap();
        assert_eq!(plan.entries[0].regs.rip, 0x100_0000);
    }

    #[test]
    fn elf_with_pvh_note_boots_through_pvh() {
        let (mem, ram) = guest(64);
        let image = elf(
            0x100_0000,
            0xffff_ffff_8100_0000,
            0x100_0000,
            b"\xf4",
            Some(0x100_0850),
        );
        let initrd = vec![0x5au8; 5000];
        let mut p = params(&image, &ram);
        p.initrd = Some(&initrd);
        let plan = setup(&mem, &p).unwrap();
        assert_eq!(plan.protocol, Protocol::Pvh);
        assert_eq!(plan.entries.len(), 1);
        let e = &plan.entries[0];
        assert_eq!(e.regs.rip, 0x100_0850);
        assert_eq!(e.regs.rbx, PVH_START_INFO_ADDR);
        let s = &e.sregs;
        let cs = s.segments.cs;
        assert_eq!(
            (cs.selector, cs.base, cs.limit, cs.db, cs.l, cs.type_),
            (0x10, 0, 0xffff_ffff, 1, 0, 0xb)
        );
        assert_eq!((s.segments.ds.db, s.segments.ds.limit), (1, 0xffff_ffff));
        assert_eq!(
            (s.segments.tr.type_, s.segments.tr.present, s.segments.tr.s),
            (11, 1, 0)
        );
        assert_eq!(s.cr0, CR0_PE | CR0_ET);
        assert_eq!((s.cr4, s.efer), (0, 0));

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(
            (info.memmap_paddr, info.memmap_entries),
            (PVH_MEMMAP_ADDR, 3)
        );
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_ADDR));
        let m: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 24)).unwrap();
        assert_eq!((m.addr, m.size, m.type_), (0x9fc00, 0x60400, E820_RESERVED));
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!(module.size, 5000);
        assert_eq!(module.paddr, 64 * MIB - 0x2000);
        let b: u8 = mem.read_obj(GuestAddress(module.paddr + 4999)).unwrap();
        assert_eq!(b, 0x5a);

        // The same image booted explicitly through the Linux protocol.
        let (mem, ram) = guest(64);
        let mut p = params(&image, &ram);
        p.protocol = Some(Protocol::Linux);
        let plan = setup(&mem, &p).unwrap();
        assert_eq!(plan.protocol, Protocol::Linux);
        assert_eq!(plan.entries[0].regs.rip, 0x100_0000);
    }

    #[test]
    fn explicit_protocol_that_does_not_fit_is_refused() {
        let (mem, ram) = guest(64);
        let bz = bzimage(b"k");
        let mut p = params(&bz, &ram);
        p.protocol = Some(Protocol::Pvh);
        assert!(matches!(setup(&mem, &p), Err(BootError::NoPvhEntry)));

        let plain = elf(0x100_0000, 0x100_0000, 0x100_0000, b"\xf4", None);
        let mut p = params(&plain, &ram);
        p.protocol = Some(Protocol::Pvh);
        assert!(matches!(setup(&mem, &p), Err(BootError::NoPvhEntry)));

        p.protocol = Some(Protocol::Ring3);
        assert!(matches!(
            setup(&mem, &p),
            Err(BootError::ProtocolMismatch { .. })
        ));
    }

    #[test]
    fn garbage_is_an_unknown_image() {
        let (mem, ram) = guest(64);
        for image in [&b""[..], b"MZ definitely not a kernel", &vec![0u8; 4096]] {
            assert!(matches!(
                setup(&mem, &params(image, &ram)),
                Err(BootError::UnknownImage)
            ));
        }
        // An ELF for another machine is a bad ELF, not a PVH/Linux guess.
        let mut arm = elf(0x100_0000, 0x100_0000, 0x100_0000, b"\xf4", None);
        arm[18] = 183; // EM_AARCH64
        assert!(matches!(
            setup(&mem, &params(&arm, &ram)),
            Err(BootError::BadElf(_))
        ));
        // An ELF that would load over the boot structures below 1 MiB.
        let low = elf(0x10_0000, 0x8000, 0x8000, &[0xf4; 0x100], None);
        assert!(matches!(
            setup(&mem, &params(&low, &ram)),
            Err(BootError::ImageOverlap(0x8000))
        ));
    }

    #[test]
    fn too_long_a_command_line_is_refused() {
        let (mem, ram) = guest(64);
        let image = bzimage(b"k");
        let long = "x".repeat(2048);
        let mut p = params(&image, &ram);
        p.cmdline = &long;
        match setup(&mem, &p) {
            Err(BootError::Cmdline(msg)) => assert!(msg.contains("at most 2047"), "{msg}"),
            other => panic!("expected a command line error, got {other:?}"),
        }
        let exact = "x".repeat(2047);
        p.cmdline = &exact;
        setup(&mem, &p).unwrap();
        assert_eq!(read_cstr(&mem, CMDLINE_ADDR + 2047 - 10).len(), 10);
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let (mem, ram) = guest(64);
        let image = bzimage(b"k");
        let initrd = vec![1u8; (3 * MIB) as usize + 123];
        let mut p = params(&image, &ram);
        p.initrd = Some(&initrd);
        setup(&mem, &p).unwrap();
        let zp = zero_page(&mem);
        let (addr, size) = ({ zp.hdr.ramdisk_image }, { zp.hdr.ramdisk_size });
        assert_eq!(size as usize, initrd.len());
        assert_eq!(addr % 4096, 0);
        assert!(u64::from(addr) + u64::from(size) <= 64 * MIB);
        assert!(u64::from(addr) + u64::from(size) > 64 * MIB - 4096);

        // The kernel decompresses to [16 MiB, 17 MiB): a 48 MiB initrd does not fit.
        let huge = vec![0u8; (48 * MIB) as usize];
        p.initrd = Some(&huge);
        match setup(&mem, &p) {
            Err(BootError::Initrd(msg)) => assert!(msg.contains("does not fit"), "{msg}"),
            other => panic!("expected an initrd error, got {other:?}"),
        }
    }

    #[test]
    fn vcpu_count_is_checked_and_only_the_bsp_gets_an_entry() {
        let (mem, ram) = guest(64);
        let image = bzimage(b"k");
        let mut p = params(&image, &ram);
        p.vcpus = 4;
        let plan = setup(&mem, &p).unwrap();
        assert_eq!(plan.entries.len(), 1);
        for vcpus in [0, MAX_VCPUS + 1] {
            p.vcpus = vcpus;
            assert!(matches!(
                setup(&mem, &p),
                Err(BootError::TooManyVcpus { .. })
            ));
        }
    }

    #[test]
    fn kernel_larger_than_ram_is_refused() {
        let (mem, ram) = guest(16);
        // Decompresses to 16 MiB + 1 MiB: beyond 16 MiB of RAM.
        assert!(matches!(
            setup(&mem, &params(&bzimage(b"k"), &ram)),
            Err(BootError::RamTooSmall { .. })
        ));
    }
}
