//! ACPI tables for Linux guests, built with rust-vmm's `acpi_tables`: what gives a kernel its
//! power button (and its CPUs and interrupt routing, for kernels without MP-table support).
//!
//! All of them sit in the BIOS area below the MP table, in a range the memory map reserves:
//! ```text
//! 0x000e_0000  RSDP (revision 2: points to the XSDT); also where the kernel scans for it
//! 0x000e_0040  FACS (64-byte aligned)
//! 0x000e_0080  DSDT: \_S5 (sleep type 5 = warmvm_abi::SLP_TYP_S5), so the guest can power off
//! ...          FADT: SCI on IRQ 9, the PM1a event block at 0x600 (4 ports), the PM1a control
//!              block at 0x604 (2 ports), a fixed-hardware power button, no SMI command port
//!              (always in ACPI mode), no reset register, optionally an i8042
//! ...          MADT: one local APIC per vCPU (IDs 0..n), the I/O APIC (ID n, GSI base 0),
//!              and the one interrupt source override the in-kernel irqchip needs: ISA IRQ 9
//!              (the SCI) level-triggered, active high (ACPI's default for the SCI is active
//!              low, which KVM's IOAPIC pin would never see asserted). The other ISA IRQs
//!              are GSIs 0-15 one to one, as KVM's default routing and the MP table have them
//! ...          XSDT: the FADT and the MADT
//! ```
//! The PM1 registers are `warmvm_devices::acpi_pm`; the kernel's SCI arrives through an irqfd
//! on GSI 9.

use crate::GuestMemoryMmap;
use acpi_tables::aml::{Name, Package, Path};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use warmvm_abi::{PM1A_CNT_LEN, PM1A_CNT_PORT, PM1A_EVT_LEN, PM1A_EVT_PORT, SCI_IRQ, SLP_TYP_S5};

use crate::mptable::{IOAPIC_ADDR, LAPIC_ADDR, MAX_CPUS, MPTABLE_ADDR};
use crate::x86::write_bytes;
use crate::{BootError, Result};

/// Where the RSDP goes; the other tables follow it, and all end below [`ACPI_TABLES_END`].
pub const RSDP_ADDR: u64 = 0xe_0000;
pub const ACPI_TABLES_END: u64 = MPTABLE_ADDR;

const OEM_ID: [u8; 6] = *b"WARMVM";
const OEM_TABLE_ID: [u8; 8] = *b"WARMVM  ";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`).
const IAPC_8042: u16 = 1 << 1;
/// MADT flags: the machine also has dual 8259 PICs (KVM's irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
/// MPS INTI flags: active high (01), level-triggered (11 << 2).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0b1101;

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiParams {
    pub vcpus: u32,
    /// The VM has an i8042 at ports 0x60/0x64 (announced in the FADT's boot flags).
    pub i8042: bool,
}

/// The tables, laid out from `base` as one block, the RSDP first.
pub fn build(base: u64, p: &AcpiParams) -> Result<Vec<u8>> {
    if p.vcpus == 0 || p.vcpus > MAX_CPUS {
        return Err(BootError::TooManyVcpus {
            vcpus: p.vcpus,
            max: MAX_CPUS,
        });
    }
    // The RSDP is written last, when the XSDT's address is known.
    let mut blob = vec![0; Rsdp::len()];
    let facs_at = place(&mut blob, base, 64, &FACS::new());
    let dsdt_at = place(&mut blob, base, 16, &dsdt());
    let fadt_at = place(&mut blob, base, 16, &fadt(dsdt_at, facs_at, p));
    let madt_at = place(&mut blob, base, 16, &madt(p.vcpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt_at = place(&mut blob, base, 16, &xsdt);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp);
    blob[..rsdp.len()].copy_from_slice(&rsdp);
    Ok(blob)
}

/// Write the tables at [`RSDP_ADDR`]; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, p: &AcpiParams) -> Result<u64> {
    let blob = build(RSDP_ADDR, p)?;
    if RSDP_ADDR + blob.len() as u64 > ACPI_TABLES_END {
        return Err(BootError::AcpiTooLarge {
            len: blob.len(),
            room: ACPI_TABLES_END - RSDP_ADDR,
        });
    }
    write_bytes(mem, RSDP_ADDR, &blob)?;
    Ok(RSDP_ADDR)
}

/// Append `table` to `blob` at the next multiple of `align`; returns its guest address.
fn place(blob: &mut Vec<u8>, base: u64, align: usize, table: &dyn Aml) -> u64 {
    blob.resize(blob.len().next_multiple_of(align), 0);
    let at = base + blob.len() as u64;
    table.to_aml_bytes(blob);
    at
}

fn dsdt() -> Sdt {
    // Revision 2: 64-bit AML integers.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let typ = SLP_TYP_S5 as u8;
    // \_S5: SLP_TYPa, SLP_TYPb, two reserved.
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&typ, &typ, &0u8, &0u8]),
    );
    let mut aml = Vec::new();
    s5.to_aml_bytes(&mut aml);
    dsdt.append_slice(&aml);
    dsdt
}

fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

fn fadt(dsdt_at: u64, facs_at: u64, p: &AcpiParams) -> acpi_tables::fadt::FADT {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_at)
        .firmware_ctrl_64(facs_at)
        // No fixed sleep button; the power button is fixed hardware (its flag stays clear).
        .flag(Flags::SlpButton)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1);
    // No SMI command port: the machine is always in ACPI mode (SCI_EN reads 1).
    f.sci_int = u16::from(SCI_IRQ).into();
    f.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    f.pm1_evt_len = PM1A_EVT_LEN as u8;
    f.x_pm1a_evt_blk = io_gas(
        PM1A_EVT_PORT,
        (PM1A_EVT_LEN * 8) as u8,
        AccessSize::WordAccess,
    );
    f.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    f.pm1_cnt_len = PM1A_CNT_LEN as u8;
    f.x_pm1a_cnt_blk = io_gas(
        PM1A_CNT_PORT,
        (PM1A_CNT_LEN * 8) as u8,
        AccessSize::WordAccess,
    );
    if p.i8042 {
        f.iapc_boot_arch = IAPC_8042.into();
    }
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"WARMVM\0\0").into();
    f.finalize()
}

fn madt(vcpus: u32) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        // `build` checked vcpus <= MAX_CPUS (254).
        let id = id as u8;
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(vcpus as u8, IOAPIC_ADDR, 0).to_aml_bytes(&mut body);
    body.extend_from_slice(&interrupt_override(
        SCI_IRQ,
        u32::from(SCI_IRQ),
        INTI_ACTIVE_HIGH_LEVEL,
    ));
    madt.append_slice(&body);
    madt
}

/// An MADT interrupt source override (type 2; the crate has no type for it): ISA `irq` is
/// `gsi`, with MPS INTI `flags`.
fn interrupt_override(irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut e = [0u8; 10];
    e[0] = MADT_INTERRUPT_OVERRIDE;
    e[1] = 10;
    e[2] = 0; // bus: ISA
    e[3] = irq;
    e[4..8].copy_from_slice(&gsi.to_le_bytes());
    e[8..10].copy_from_slice(&flags.to_le_bytes());
    e
}

#[cfg(test)]
mod tests;
