//! CPU instructions the guest uses from ring 3: CPUID, RDTSC, FS base, XMM15.

use core::arch::asm;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
}

/// CPUID (leaf, subleaf). May exit to the VMM: use it at boot only.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let (eax, ebx, ecx): (u32, u32, u32);
    // SAFETY: CPUID has no memory effects. RBX is reserved by LLVM, so it is saved in a
    // scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") _,
            options(nomem, nostack, preserves_flags),
        )
    }
    CpuidResult { eax, ebx, ecx }
}

pub fn max_basic_leaf() -> u32 {
    cpuid(0, 0).eax
}

/// CPUID.(EAX=7,ECX=0):EBX bit 0: RDFSBASE/WRFSBASE and friends exist.
///
/// The instructions also need CR4.FSGSBASE, which ring 3 cannot read. The guest relies on the
/// contract instead: warmvm sets CR4.FSGSBASE whenever the CPUID it gives the guest has the
/// bit, and the PVH stub sets it under the same condition.
pub fn has_fsgsbase() -> bool {
    max_basic_leaf() >= 7 && cpuid(7, 0).ebx & 1 != 0
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the time-stamp counter (CR4.TSD is clear at CPL3 here).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Read the FS base. Only call when [`has_fsgsbase`] said yes.
pub fn read_fs_base() -> u64 {
    let v: u64;
    // SAFETY: RDFSBASE reads a register; guarded by `has_fsgsbase` (see there). The guest
    // uses no thread-local storage, so FS is free for this purpose.
    unsafe { asm!("rdfsbase {}", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Write the FS base. Only call when [`has_fsgsbase`] said yes.
pub fn write_fs_base(v: u64) {
    // SAFETY: as in `read_fs_base`; no code in the guest uses FS-relative addressing.
    unsafe { asm!("wrfsbase {}", in(reg) v, options(nomem, nostack, preserves_flags)) }
}

/// Return the low 64 bits of XMM15 and replace them (and clear the high half) with `new`.
///
/// Caveat: XMM15 is an ordinary caller-saved register to the compiler, which is free to use
/// it anywhere else, and the guest's check would then report a register failure that no VMM
/// caused. Keeping the exchange in one non-inlined function with a fixed symbol lets the
/// guest-image test disassemble the guest and prove no other code touches XMM15.
#[inline(never)]
#[no_mangle]
pub extern "C" fn warmvm_guest_xmm15_swap(new: u64) -> u64 {
    let old: u64;
    // SAFETY: moves between XMM15 and general registers; XMM15 is declared clobbered. SSE is
    // enabled (CR4.OSFXSR) by the VMM or the PVH stub.
    unsafe {
        asm!(
            "movq {old}, xmm15",
            "movq xmm15, {new}",
            old = out(reg) old,
            new = in(reg) new,
            out("xmm15") _,
            options(nomem, nostack, preserves_flags),
        )
    }
    old
}
