//! x86 descriptor and paging encodings shared by the boot protocols.

use crate::GuestMemoryMmap;
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

pub use crate::Segments;
use crate::{BootError, GuestWriteError, Result};

pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// Fast-string enable: Linux expects it set, as firmware leaves it.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITE: u64 = 1 << 1;
pub const PTE_USER: u64 = 1 << 2;
pub const PTE_HUGE: u64 = 1 << 7;

/// Encode a code/data segment descriptor for a GDT (flat: base 0, limit 4 GiB).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The `kvm_segment` that loading `selector` with descriptor `entry` produces.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let field = |shift: u32, bits: u32| ((entry >> shift) & ((1u64 << bits) - 1)) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = field(55, 1);
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: field(40, 4),
        present: field(47, 1),
        dpl: field(45, 2),
        db: field(54, 1),
        s: field(44, 1),
        l: field(53, 1),
        g,
        avl: field(52, 1),
        unusable: u8::from(field(47, 1) == 0),
        padding: 0,
    }
}

pub fn write_u64s(mem: &GuestMemoryMmap, addr: u64, values: &[u64]) -> Result<()> {
    for (i, v) in values.iter().enumerate() {
        let a = addr + 8 * i as u64;
        mem.write_obj(*v, GuestAddress(a))
            .map_err(|e| BootError::GuestWrite {
                addr: a,
                source: e.into(),
            })?;
    }
    Ok(())
}

pub fn write_bytes(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            addr,
            source: e.into(),
        })
}

/// Build 4-level identity page tables at `base` that map `[0, map_end)` with 2 MiB pages,
/// with `extra_flags` (e.g. [`PTE_USER`]) on every level. Returns the end of the tables.
pub fn identity_page_tables(
    mem: &GuestMemoryMmap,
    base: u64,
    limit: u64,
    map_end: u64,
    extra_flags: u64,
) -> Result<u64> {
    const GIB: u64 = 1 << 30;
    let gibs = map_end.div_ceil(GIB).max(1);
    let pdpts = gibs.div_ceil(512);
    let pml4 = base;
    let pdpt_base = pml4 + 0x1000;
    let pd_base = pdpt_base + pdpts * 0x1000;
    let end = pd_base + gibs * 0x1000;
    if end > limit {
        return Err(BootError::GuestWrite {
            addr: base,
            source: GuestWriteError::PageTablesDoNotFit { gibs, limit },
        });
    }
    let table_flags = PTE_PRESENT | PTE_WRITE | extra_flags;
    let pml4e: Vec<u64> = (0..pdpts)
        .map(|i| (pdpt_base + i * 0x1000) | table_flags)
        .collect();
    write_u64s(mem, pml4, &pml4e)?;
    let pdpte: Vec<u64> = (0..gibs)
        .map(|i| (pd_base + i * 0x1000) | table_flags)
        .collect();
    write_u64s(mem, pdpt_base, &pdpte)?;
    let pde: Vec<u64> = (0..gibs * 512)
        .map(|i| (i << 21) | table_flags | PTE_HUGE)
        .collect();
    write_u64s(mem, pd_base, &pde)?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_user_code_segment_decodes_to_long_mode_dpl3() {
        let e = gdt_entry(0xa0fb, 0, 0xfffff);
        let s = segment_from_gdt(e, 0x1b);
        assert_eq!((s.l, s.dpl, s.present, s.s, s.type_), (1, 3, 1, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
    }
}
