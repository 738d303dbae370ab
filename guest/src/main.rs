//! warmvm's reference guest.
//!
//! A freestanding ring-3 program that fills the guest's free RAM with a known pattern and
//! then verifies it forever, publishing its progress in the status area that the VMM reads
//! (see `warmvm_abi`). It is what warmvm's warm reboot is tested against: after a handover
//! the pattern must still be intact, the counters must go on, guest time must not jump
//! backwards, and the CPU state the guest keeps in registers (FS base, XMM15) must survive.
//!
//! Two ways in:
//! - `_start`, the ELF entry point: warmvm's direct ring-3 entry (`entry.rs`), every vCPU
//!   already at CPL3 in 64-bit mode with paging on.
//! - the PVH entry (Xen ELF note), for other VMMs (QEMU `-M microvm`, Cloud Hypervisor): a
//!   short 32-bit CPL0 stub builds page tables, GDT and TSS and drops to ring 3 (`pvh.rs`).
//!
//! The guest never takes an interrupt or an exception: on this project's KVM (PVM) any
//! exception is a triple fault. It polls, idles through the paravirtual wait port, and its
//! panic handler prints and powers off.
//!
//! Exit statuses written to the power port: 0 all clean, 1 integrity failure (a mismatch or
//! a register check failure), 2 unusable boot environment, 101 panic.
#![cfg_attr(not(warmvm_guest_stub), no_std)]
#![cfg_attr(not(warmvm_guest_stub), no_main)]
#![cfg_attr(warmvm_guest_stub, allow(dead_code, unused_imports, unused_macros))]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(all(not(warmvm_guest_stub), not(panic = "abort")))]
compile_error!("the warmvm guest needs panic = \"abort\": build it with `--profile guest`");

#[macro_use]
mod console;
mod blk;
mod boot;
mod cache;
mod cmdline;
mod cpu;
mod disk;
#[cfg(not(warmvm_guest_stub))]
mod entry;
mod http;
mod io;
mod net;
#[cfg(not(warmvm_guest_stub))]
mod pvh;
#[cfg(not(warmvm_guest_stub))]
mod rt;
mod services;
mod status;
mod tar;
mod time;
mod virtio;
mod workload;

/// Exit status: every vCPU clean.
pub const EXIT_OK: u32 = 0;
/// Exit status: a pattern mismatch or a register check failure was seen.
pub const EXIT_INTEGRITY_FAILURE: u32 = 1;
/// Exit status: the boot information was unusable.
pub const EXIT_BAD_BOOT: u32 = 2;
/// Exit status: the guest panicked.
pub const EXIT_PANIC: u32 = 101;

/// Built under a profile with unwinding panics, the guest cannot link without std: this stub
/// stands in for it so that workspace-wide builds and lints keep working.
#[cfg(warmvm_guest_stub)]
fn main() {
    eprintln!(
        "this is a stub: the warmvm reference guest must be built with \
         `cargo build -p warmvm-guest --profile guest` (crates/guest-image does that)"
    );
    std::process::exit(2);
}

use boot::{Entry, Machine};
use warmvm_abi::BootInfo;

/// Where both entries meet: `bi` is the boot information (warmvm's, or the one the PVH entry
/// built), `vcpu` this vCPU's index, `image_end` the end of the guest image.
pub fn guest_main(bi: &BootInfo, vcpu: u64, entry: Entry, image_end: u64) -> ! {
    let mut m = match Machine::new(bi, vcpu, entry, image_end) {
        Ok(m) => m,
        Err(e) => {
            say!("warmvm-guest: vcpu {}: {}", vcpu, e);
            io::power_off(EXIT_BAD_BOOT)
        }
    };
    io::set_ports(m.serial_port, m.wait_port, m.power_port);
    let status = status::Status::new(m.status_addr);
    if vcpu == 0 {
        status.write_header(m.vcpu_count);
    }

    let cmdline = m.cmdline();
    let (opts, ignored) = cmdline::parse(cmdline);
    let mut tsc_khz = m.tsc_khz;
    if tsc_khz == 0 {
        tsc_khz = time::cpuid_tsc_khz();
    }
    if tsc_khz == 0 {
        tsc_khz = opts.tsc_khz.unwrap_or(0);
    }
    time::init(tsc_khz);
    let fsgsbase = cpu::has_fsgsbase();
    // The HTTP server's page cache comes out of the workload's RAM; every vCPU carves the
    // same, so their stripes agree.
    let mut cache = (0u64, 0u64);
    if opts.ip.is_some() && m.virtio_count > 0 {
        let bytes = opts.cache_mib << 20;
        let first = m.ram_ranges()[0];
        if m.free_start + bytes + (4 << 20) <= first.start + first.len {
            cache = (m.free_start, bytes);
            m.free_start += bytes;
        } else if vcpu == 0 {
            say!(
                "warmvm-guest: cache_mib={} does not fit in RAM: no page cache",
                opts.cache_mib
            );
        }
    }
    let stripe = workload::Stripe::new(&m, opts.fill_percent, vcpu);

    if vcpu == 0 {
        console::with_console(|s| {
            use core::fmt::Write;
            let _ = write!(
                s,
                "warmvm-guest: {} MiB RAM, {} vCPU{}, fill {}%, cmdline \"",
                m.ram_size >> 20,
                m.vcpu_count,
                if m.vcpu_count == 1 { "" } else { "s" },
                opts.fill_percent
            );
            s.put_sanitised(cmdline);
            let _ = writeln!(
                s,
                "\" ({} entry, {} free pages, TSC {} kHz, FS base check {})",
                m.entry.name(),
                stripe.free_pages(),
                tsc_khz,
                if fsgsbase { "on" } else { "off" }
            );
            if ignored.count > 0 {
                let _ = s.write_str("warmvm-guest: ignoring unknown options:");
                for t in ignored.iter() {
                    let _ = s.write_str(" ");
                    s.put_sanitised(t);
                }
                let _ = s.write_str("\n");
            }
            if tsc_khz == 0 {
                let _ = writeln!(
                    s,
                    "warmvm-guest: TSC frequency unknown (no boot info or CPUID, no tsc_khz=): guest time stays 0"
                );
            }
        });
    }

    if opts.spam != 0 {
        hostile(opts.spam, vcpu)
    }
    // Only vCPU 0 drives devices.
    let services = if vcpu == 0 {
        services::Services::start(&m, &opts, cache)
    } else {
        services::Services::none()
    };
    workload::Worker::new(
        vcpu as usize,
        m.vcpu_count as usize,
        status,
        opts,
        stripe,
        fsgsbase,
        services,
    )
    .run()
}

/// A guest that attacks its VMM (`hostile=`): console output and accesses to ports no
/// device decodes, as fast as the exits allow, forever. Nothing is verified.
fn hostile(kinds: u8, vcpu: u64) -> ! {
    const LINE: &[u8] =
        b"hostile guest spamming its console: the VMM must cap and rate-limit this\n";
    let serial = io::serial_port();
    let mut n: u16 = 0;
    loop {
        if kinds & 1 != 0 {
            for &b in LINE {
                io::outb(serial, b);
            }
        }
        if kinds & 2 != 0 {
            // Ports nothing decodes, spread over the space (the paravirtual ports and
            // COM1 excepted: those are the guest's own business).
            for _ in 0..64 {
                n = n.wrapping_add(0x9e37);
                let port = match n {
                    0x3f8..=0x3ff | 0x510..=0x520 => 0x80,
                    p => p,
                };
                io::outb(port, vcpu as u8);
                let _ = io::inb(port);
            }
        }
    }
}
