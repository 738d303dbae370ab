//! Port I/O. Every access is a VM exit (~26 µs on this project's KVM): use sparingly.

use core::arch::asm;
use core::sync::atomic::{AtomicU16, Ordering};

static SERIAL_PORT: AtomicU16 = AtomicU16::new(warmvm_abi::SERIAL_PORT);
static WAIT_PORT: AtomicU16 = AtomicU16::new(warmvm_abi::WAIT_PORT);
static POWER_PORT: AtomicU16 = AtomicU16::new(warmvm_abi::POWER_PORT);

/// Use the ports the boot information names (the defaults until then).
pub fn set_ports(serial: u16, wait: u16, power: u16) {
    SERIAL_PORT.store(serial, Ordering::Relaxed);
    WAIT_PORT.store(wait, Ordering::Relaxed);
    POWER_PORT.store(power, Ordering::Relaxed);
}

pub fn serial_port() -> u16 {
    SERIAL_PORT.load(Ordering::Relaxed)
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory the compiler knows about. The VMM (or the PVH stub)
    // allows every port in the TSS I/O bitmap, so the access exits to the VMM instead of
    // faulting.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Whether the ACPI power button was pressed (clearing its status bit if so), or `None`
/// when there is no PM1 status register at warmvm's port: all ones is what a port nothing
/// decodes reads as (another VMM that booted the guest through PVH), never a status.
pub fn take_power_button() -> Option<bool> {
    use warmvm_abi::{PM1A_EVT_PORT, PM1_STS_PWRBTN};
    let sts = inw(PM1A_EVT_PORT);
    if sts == u16::MAX {
        return None;
    }
    let pressed = sts & PM1_STS_PWRBTN != 0;
    if pressed {
        // Write 1 to clear, and only that bit.
        outw(PM1A_EVT_PORT, PM1_STS_PWRBTN);
    }
    Some(pressed)
}

/// Enter ACPI S5 (soft off) through PM1 control: the platform's clean power-off. Never
/// returns (waits forever if the VMM carries on).
pub fn acpi_power_off() -> ! {
    use warmvm_abi::{PM1A_CNT_PORT, PM1_CNT_SLP_EN, PM1_CNT_SLP_TYP_SHIFT, SLP_TYP_S5};
    outw(
        PM1A_CNT_PORT,
        (SLP_TYP_S5 << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SLP_EN,
    );
    loop {
        wait(warmvm_abi::WAIT_FOREVER);
    }
}

/// A 32-bit `out`. Not `nomem`: the VMM may change guest memory (the status area's host
/// command, for one) while the vCPU is out, so the compiler must not cache memory across it.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`; the access has no effect on Rust-visible state other than what
    // the VMM does to guest memory, which every caller reads with volatile loads.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// Idle for up to `micros` µs (`WAIT_FOREVER`: until woken) in the VMM.
pub fn wait(micros: u32) {
    outl(WAIT_PORT.load(Ordering::Relaxed), micros);
}

/// Power the VM off with `status`; never returns (waits forever if the VMM carries on).
pub fn power_off(status: u32) -> ! {
    outl(POWER_PORT.load(Ordering::Relaxed), status);
    loop {
        wait(warmvm_abi::WAIT_FOREVER);
    }
}
