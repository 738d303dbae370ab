//! Intel MultiProcessor Specification (v1.4) tables: how a kernel without ACPI learns how
//! many CPUs there are and where the I/O APIC is.
//!
//! The floating pointer structure sits at the start of the BIOS area (0xf0000), where Linux's
//! `find_smp_config` scans for it, and the configuration table follows it directly. The table
//! lists one processor per vCPU (local APIC IDs 0..n, vCPU 0 the bootstrap processor), one
//! ISA bus, the I/O APIC (ID n, at 0xfec00000) with its 24 pins wired 1:1 to bus IRQs 0..23
//! (which matches KVM's default GSI routing with the in-kernel irqchip: GSI i is IOAPIC pin
//! i and, below 16, PIC input i), and LINT0 = ExtINT, LINT1 = NMI on every local APIC.
//!
//! Linux reads it only when built with `CONFIG_X86_MPPARSE` and when no ACPI MADT exists.

use crate::GuestMemoryMmap;

use crate::x86::write_bytes;
use crate::Result;

/// Where the floating pointer structure goes; the configuration table follows it.
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// The highest vCPU count the table can describe: APIC IDs are 8 bits, 0xff means
/// "broadcast", and the I/O APIC takes the ID after the last CPU.
pub const MAX_CPUS: u32 = 254;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Number of I/O APIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;

const SPEC_REV_1_4: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Family 6, as a CPU signature; the kernel takes the real one from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits FPU (0) and APIC (9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Write the floating pointer and the configuration table for `cpus` processors at
/// [`MPTABLE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, cpus: u32) -> Result<()> {
    write_bytes(mem, MPTABLE_ADDR, &build(MPTABLE_ADDR, cpus))
}

/// The bytes of the floating pointer (at `addr`) followed by the configuration table.
/// `cpus` must be in 1..=[`MAX_CPUS`] (the caller checks).
pub fn build(addr: u64, cpus: u32) -> Vec<u8> {
    let cpus = cpus.clamp(1, MAX_CPUS) as u8;
    let ioapic_id = cpus;
    let table_addr = addr + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Flags 0: polarity and trigger mode conform to the bus (ISA: active high, edge).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        // Destination 0xff: every local APIC.
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    table.extend_from_slice(&length.to_le_bytes());
    table.push(SPEC_REV_1_4);
    table.push(0); // checksum, below
    table.extend_from_slice(b"WARMVM  ");
    table.extend_from_slice(b"WARMVM      ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV_1_4);
    out.push(0); // checksum, below
                 // Feature bytes: 0 = a configuration table exists; IMCR absent (virtual wire mode).
    out.extend_from_slice(&[0; 5]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// The byte that makes `bytes` sum to zero (mod 256), given that its own slot holds 0.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_and_count_entries() {
        let t = build(MPTABLE_ADDR, 4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(u64::from(ptr), MPTABLE_ADDR + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + u16::from(IOAPIC_PINS) + 2);
        // First entry: processor 0, enabled bootstrap processor.
        assert_eq!(&table[44..48], &[ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        // Second processor: enabled, not the BSP.
        assert_eq!(table[44 + 20 + 3], 1);
        // I/O APIC entry after 4 processors and the bus, with ID 4.
        let io = 44 + 4 * 20 + 8;
        assert_eq!(&table[io..io + 4], &[ENTRY_IOAPIC, 4, IOAPIC_VERSION, 1]);
    }
}
