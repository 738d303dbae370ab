//! The PVH entry, for VMMs other than warmvm (QEMU `-M microvm`, Cloud Hypervisor).
//!
//! The loader finds the 32-bit entry in the Xen ELF note (XEN_ELFNOTE_PHYS32_ENTRY) and
//! starts the vCPU there in 32-bit protected mode, paging off, at CPL0, EBX = physical
//! address of the `hvm_start_info`. On this project's KVM ring 0 is emulated (~2 M
//! instructions/s), so the stub does only what ring 3 cannot: identity page tables for the
//! first 4 GiB (user-accessible 2 MiB pages), a GDT with kernel and user segments and a TSS
//! whose I/O bitmap allows every port (this KVM checks only the bitmap, not IOPL), PAE + LME +
//! paging, CR4.OSFXSR|OSXMMEXCPT (and FSGSBASE if CPUID has it), TR, and an `iretq` to ring 3.
//! The rest, building a `BootInfo` from the `hvm_start_info`, runs in Rust at CPL3.
//!
//! Under PVH the guest is alone: one vCPU, default ports, its status area in its own .bss,
//! free RAM from the end of the image, and only the first 4 GiB of RAM used.

use core::arch::global_asm;
use core::cell::UnsafeCell;

use warmvm_abi::{layout, BootInfo, RamRange, MAX_RAM_RANGES};

use crate::boot::Entry;
use crate::entry::image_end;
use crate::{guest_main, io, EXIT_BAD_BOOT};

/// Only this much RAM is mapped by the stub's page tables.
const MAPPED_LIMIT: u64 = 4 << 30;

global_asm!(
    // The Xen ELF note: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY), descriptor = the
    // 32-bit entry. The descriptor is 8 bytes: QEMU reads a 64-bit value from a 64-bit ELF,
    // linux-loader (Cloud Hypervisor) the first 4 bytes.
    ".pushsection .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",
    ".long 8",
    ".long 18",
    ".asciz \"Xen\"",
    ".balign 4",
    ".quad warmvm_pvh_start32",
    ".balign 4",
    ".popsection",
    "",
    ".pushsection .text.pvh, \"ax\", @progbits",
    ".code32",
    ".global warmvm_pvh_start32",
    ".type warmvm_pvh_start32, @function",
    "warmvm_pvh_start32:",
    "    cld",
    "    mov edi, ebx", // hvm_start_info: EDI is left alone from here on
    "    mov esp, offset warmvm_pvh_stack_top",
    // PML4[0] -> PDPT; PDPT[0..4] -> the four PDs (present, writable, user).
    "    mov eax, offset warmvm_pvh_pdpt + 7",
    "    mov dword ptr [warmvm_pvh_pml4], eax",
    "    mov dword ptr [warmvm_pvh_pml4 + 4], 0",
    "    xor ecx, ecx",
    "2:",
    "    mov eax, ecx",
    "    shl eax, 12",
    "    add eax, offset warmvm_pvh_pd + 7",
    "    mov dword ptr [warmvm_pvh_pdpt + ecx*8], eax",
    "    mov dword ptr [warmvm_pvh_pdpt + ecx*8 + 4], 0",
    "    inc ecx",
    "    cmp ecx, 4",
    "    jb 2b",
    // 2048 PD entries: identity 2 MiB pages (present, writable, user, PS).
    "    xor ecx, ecx",
    "3:",
    "    mov eax, ecx",
    "    shl eax, 21",
    "    or eax, 0x87",
    "    mov dword ptr [warmvm_pvh_pd + ecx*8], eax",
    "    mov dword ptr [warmvm_pvh_pd + ecx*8 + 4], 0",
    "    inc ecx",
    "    cmp ecx, 2048",
    "    jb 3b",
    // The TSS descriptor's base (the linker cannot split an address into its fields).
    "    mov eax, offset warmvm_pvh_tss",
    "    mov word ptr [warmvm_pvh_gdt_tss + 2], ax",
    "    shr eax, 16",
    "    mov byte ptr [warmvm_pvh_gdt_tss + 4], al",
    "    mov byte ptr [warmvm_pvh_gdt_tss + 7], ah",
    "    lgdt [warmvm_pvh_gdt_ptr]",
    // CR4 = PAE | OSFXSR | OSXMMEXCPT, | FSGSBASE if CPUID.(7,0):EBX[0].
    "    mov esi, 0x620",
    "    xor eax, eax",
    "    cpuid",
    "    cmp eax, 7",
    "    jb 4f",
    "    mov eax, 7",
    "    xor ecx, ecx",
    "    cpuid",
    "    test ebx, 1",
    "    jz 4f",
    "    or esi, 0x10000",
    "4:",
    "    mov cr4, esi",
    "    mov eax, offset warmvm_pvh_pml4",
    "    mov cr3, eax",
    "    mov ecx, 0xc0000080", // EFER.LME
    "    rdmsr",
    "    or eax, 0x100",
    "    wrmsr",
    "    mov eax, cr0", // PG | WP | NE | MP | PE, EM and TS clear (SSE)
    "    and eax, 0xfffffff3",
    "    or eax, 0x80010023",
    "    mov cr0, eax",
    "    .byte 0xea", // ljmp 0x08:warmvm_pvh_start64
    "    .long warmvm_pvh_start64",
    "    .word 0x08",
    ".code64",
    "warmvm_pvh_start64:",
    "    mov eax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    mov esp, offset warmvm_pvh_stack_top", // RSP's upper half is undefined after the switch
    "    mov eax, 0x28",
    "    ltr ax",
    "    mov eax, 0x23",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov fs, ax",
    "    mov gs, ax",
    // iretq to ring 3: SS, RSP, RFLAGS (IF clear), CS, RIP. The user stack is the same one.
    "    mov eax, offset warmvm_pvh_stack_top",
    "    push 0x23",
    "    push rax",
    "    push 0x2",
    "    push 0x1b",
    "    lea rax, [rip + warmvm_pvh_ring3]",
    "    push rax",
    "    iretq",
    "warmvm_pvh_ring3:",
    "    mov edi, edi", // zero-extend the hvm_start_info address
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call {pvh_entry}",
    "5:  jmp 5b",
    ".size warmvm_pvh_start32, . - warmvm_pvh_start32",
    ".popsection",
    "",
    ".pushsection .data.warmvm_pvh, \"aw\", @progbits",
    ".balign 16",
    "warmvm_pvh_gdt:",
    "    .quad 0",
    "    .quad 0x00af9b000000ffff", // 0x08 kernel code, 64-bit
    "    .quad 0x00cf93000000ffff", // 0x10 kernel data
    "    .quad 0x00affb000000ffff", // 0x18 user code, 64-bit, DPL 3
    "    .quad 0x00cff3000000ffff", // 0x20 user data, DPL 3
    "warmvm_pvh_gdt_tss:", // 0x28 64-bit TSS, limit 104 + 8192 (base filled in)
    "    .word 0x2068, 0",
    "    .byte 0, 0x89, 0, 0",
    "    .quad 0",
    "warmvm_pvh_gdt_end:",
    "warmvm_pvh_gdt_ptr:",
    "    .word warmvm_pvh_gdt_end - warmvm_pvh_gdt - 1",
    "    .quad warmvm_pvh_gdt",
    // The TSS is initialised data, not .bss: the I/O bitmap must be zero (every port allowed)
    // whatever the loader does with .bss, at the price of 8 KiB of zeros in the image.
    ".balign 16",
    "warmvm_pvh_tss:",
    "    .long 0",
    "    .quad warmvm_pvh_stack_top", // RSP0 (never used: nothing enters ring 0 again)
    "    .skip 90",
    "    .word 104", // I/O map base
    "    .skip 8192", // I/O permission bitmap
    "    .byte 0xff",
    ".popsection",
    "",
    ".pushsection .bss.warmvm_pvh, \"aw\", @nobits",
    ".balign 4096",
    "warmvm_pvh_pml4: .skip 4096",
    "warmvm_pvh_pdpt: .skip 4096",
    "warmvm_pvh_pd: .skip 4 * 4096",
    "warmvm_pvh_stack: .skip 16384",
    "warmvm_pvh_stack_top:",
    ".popsection",
    pvh_entry = sym pvh_entry,
);

/// `struct hvm_start_info` (Xen's public/arch-x86/hvm/start_info.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    // Version 1 and later:
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;
const HVM_MEMMAP_TYPE_RAM: u32 = 1;

/// A static the single PVH vCPU writes before anything reads it.
#[repr(transparent)]
struct RacyCell<T>(UnsafeCell<T>);

// SAFETY: only the PVH entry, which runs on the only vCPU, touches these cells.
unsafe impl<T> Sync for RacyCell<T> {}

#[repr(C, align(4096))]
struct StatusPage([u8; layout::STATUS_SIZE as usize]);

/// The status area under PVH (no VMM provides one).
static STATUS: RacyCell<StatusPage> = RacyCell(UnsafeCell::new(StatusPage(
    [0; layout::STATUS_SIZE as usize],
)));
/// The command line, copied into the image before the workload overwrites free RAM.
static CMDLINE: RacyCell<[u8; layout::CMDLINE_MAX as usize]> =
    RacyCell(UnsafeCell::new([0; layout::CMDLINE_MAX as usize]));

fn fatal(msg: &str) -> ! {
    say!("warmvm-guest: PVH: {}", msg);
    io::power_off(EXIT_BAD_BOOT)
}

/// Read a `T` from guest-physical `addr` below the mapped limit.
fn read_phys<T: Copy>(addr: u64) -> Option<T> {
    let size = core::mem::size_of::<T>() as u64;
    if addr == 0 || addr % 4 != 0 || addr.checked_add(size)? > MAPPED_LIMIT {
        return None;
    }
    // SAFETY: the address is non-null, 4-byte aligned (enough for these structures' u64
    // fields on x86: unaligned volatile reads are still ordinary moves) and mapped by the
    // stub's identity page tables; the loader put the structure there before the entry.
    Some(unsafe { (addr as *const T).read_unaligned() })
}

extern "C" fn pvh_entry(start_info: u64) -> ! {
    let si: HvmStartInfo = match read_phys(start_info) {
        Some(si) => si,
        None => fatal("no hvm_start_info"),
    };
    if si.magic != HVM_START_MAGIC {
        fatal("bad hvm_start_info magic");
    }
    if si.version < 1 || si.memmap_entries == 0 {
        fatal("no memory map in hvm_start_info (version 0)");
    }

    let mut ranges = [RamRange::default(); MAX_RAM_RANGES];
    let mut count = 0usize;
    let mut ram_size = 0u64;
    let mut dropped = 0u32;
    for i in 0..u64::from(si.memmap_entries) {
        let e: HvmMemmapEntry = match read_phys(si.memmap_paddr + i * 24) {
            Some(e) => e,
            None => fatal("memory map outside the first 4 GiB"),
        };
        if e.kind != HVM_MEMMAP_TYPE_RAM || e.size == 0 {
            continue;
        }
        let start = e.addr.min(MAPPED_LIMIT);
        let end = e.addr.saturating_add(e.size).min(MAPPED_LIMIT);
        if end <= start {
            dropped += 1;
            continue;
        }
        ram_size += end - start;
        if count > 0 && ranges[count - 1].start + ranges[count - 1].len == start {
            ranges[count - 1].len += end - start;
        } else if count < MAX_RAM_RANGES {
            ranges[count] = RamRange {
                start,
                len: end - start,
            };
            count += 1;
        } else {
            dropped += 1;
        }
    }
    if dropped != 0 {
        say!(
            "warmvm-guest: PVH: {} RAM ranges ignored (above 4 GiB or beyond {})",
            dropped,
            MAX_RAM_RANGES
        );
    }

    let cmdline = CMDLINE.0.get() as *mut u8;
    let mut cmdline_len = 0u64;
    if si.cmdline_paddr != 0 && si.cmdline_paddr < MAPPED_LIMIT - layout::CMDLINE_MAX {
        let src = si.cmdline_paddr as *const u8;
        while cmdline_len < layout::CMDLINE_MAX - 1 {
            // SAFETY: the command line is a NUL-terminated string the loader placed at
            // `cmdline_paddr`, mapped (checked against the limit above); reading stops at
            // its NUL or at CMDLINE_MAX - 1 bytes. The destination is this guest's own
            // buffer of CMDLINE_MAX bytes, written only here, on the only vCPU.
            let b = unsafe { src.add(cmdline_len as usize).read_volatile() };
            if b == 0 {
                break;
            }
            // SAFETY: as above.
            unsafe { cmdline.add(cmdline_len as usize).write(b) };
            cmdline_len += 1;
        }
    }

    let bi = BootInfo {
        magic: warmvm_abi::BOOTINFO_MAGIC,
        version: warmvm_abi::BOOTINFO_VERSION,
        size: core::mem::size_of::<BootInfo>() as u32,
        ram_size,
        tsc_khz: 0, // guest_main asks CPUID, then the command line
        vcpu_count: 1,
        ram_range_count: count as u32,
        ram_ranges: ranges,
        cmdline_addr: cmdline as u64,
        cmdline_len,
        status_addr: STATUS.0.get() as u64,
        status_size: layout::STATUS_SIZE,
        free_start: image_end(),
        serial_port: warmvm_abi::SERIAL_PORT,
        wait_port: warmvm_abi::WAIT_PORT,
        power_port: warmvm_abi::POWER_PORT,
        _pad: 0,
        // Other VMMs' virtio devices are not looked for (their place is not known here).
        virtio_mmio_base: 0,
        virtio_mmio_count: 0,
        _pad2: 0,
    };
    guest_main(&bi, 0, Entry::Pvh, image_end())
}
