//! The vCPU state at a kernel's entry: a flat GDT and TSS, and long mode with identity
//! paging (Linux boot protocol) or 32-bit protected mode without paging (PVH).

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_dtable, kvm_regs};

use super::{
    BOOT_STACK_POINTER, GDT_ADDR, IDENTITY_MAP_END, IDT_ADDR, PAGE_TABLES_ADDR, PAGE_TABLES_END,
    PVH_START_INFO_ADDR, SEL_CODE, SEL_DATA, SEL_TSS, TSS_ADDR, TSS_SIZE, ZERO_PAGE_ADDR,
};
use crate::x86::*;
use crate::{CpuEntry, Result, SystemRegisters};

/// The busy TSS descriptor both protocols load into TR (type 11 is a busy 64-bit TSS in long
/// mode and a busy 32-bit TSS in protected mode; the upper half of a 16-byte descriptor is
/// zero since the TSS lies below 4 GiB).
pub(super) fn tss_descriptor() -> [u64; 2] {
    [gdt_entry(0x008b, TSS_ADDR as u32, (TSS_SIZE - 1) as u32), 0]
}

pub(super) fn write_gdt(mem: &GuestMemoryMmap, code: u64) -> Result<[u64; 6]> {
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

pub(super) fn flat_registers(
    gdt: &[u64; 6],
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
) -> SystemRegisters {
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
pub(super) fn linux_entry_state(mem: &GuestMemoryMmap, rip: u64) -> Result<CpuEntry> {
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
pub(super) fn pvh_entry_state(mem: &GuestMemoryMmap, rip: u64) -> Result<CpuEntry> {
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
