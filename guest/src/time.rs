//! Guest time: RDTSC scaled by the TSC frequency, relative to a start TSC kept in guest
//! memory (so a VMM that preserves RAM and the TSC keeps guest time continuous).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu;

// In .data rather than .bss: see workload.rs.
#[link_section = ".data.warmvm_tsc_khz"]
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// TSC at boot, set by the first vCPU to get here.
#[link_section = ".data.warmvm_start_tsc"]
static START_TSC: AtomicU64 = AtomicU64::new(0);

/// Record the start TSC (first caller wins) and the frequency (0 = unknown).
pub fn init(tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    let now = cpu::rdtsc().max(1);
    let _ = START_TSC.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
}

pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// TSC ticks to nanoseconds (0 if the frequency is unknown).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let khz = tsc_khz();
    if khz == 0 {
        return 0;
    }
    let ns = u128::from(ticks) * 1_000_000 / u128::from(khz);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Nanoseconds since boot (0 if the TSC frequency is unknown).
pub fn now_ns() -> u64 {
    let start = START_TSC.load(Ordering::Relaxed);
    ticks_to_ns(cpu::rdtsc().saturating_sub(start))
}

/// The TSC frequency as CPUID tells it: the hypervisor timing leaf 0x40000010 (if the
/// hypervisor range reaches it), else leaf 0x15 (crystal ratio), else leaf 0x16 (base MHz).
/// 0 if none does.
pub fn cpuid_tsc_khz() -> u64 {
    let hypervisor_present = cpu::cpuid(1, 0).ecx & (1 << 31) != 0;
    if hypervisor_present {
        let max = cpu::cpuid(0x4000_0000, 0).eax;
        if (0x4000_0010..0x4000_0100).contains(&max) {
            let khz = cpu::cpuid(0x4000_0010, 0).eax;
            if khz != 0 {
                return u64::from(khz);
            }
        }
    }
    let max_basic = cpu::max_basic_leaf();
    if max_basic >= 0x15 {
        let l = cpu::cpuid(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1000;
        }
    }
    if max_basic >= 0x16 {
        let mhz = cpu::cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return u64::from(mhz) * 1000;
        }
    }
    0
}
