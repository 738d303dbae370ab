//! warmvm's direct ring-3 entry: `_start`, the ELF entry point.
//!
//! Every vCPU starts here at CPL3 in 64-bit mode with paging on (all RAM identity-mapped with
//! user-accessible 2 MiB pages), SSE enabled, RDI = boot information address, RSI = vCPU
//! index and RSP = that vCPU's stack top (`STACKS_TOP - i * STACK_SIZE`).

use core::arch::global_asm;

use warmvm_abi::BootInfo;

use crate::boot::Entry;
use crate::{guest_main, io, EXIT_BAD_BOOT};

global_asm!(
    ".pushsection .text.entry, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    // The stack top is page-aligned, but align it anyway: at the call the stack must be
    // 16-byte aligned (SysV), so that the callee sees RSP = 8 mod 16.
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call {direct_entry}",
    "2:  jmp 2b",
    ".size _start, . - _start",
    ".popsection",
    direct_entry = sym direct_entry,
);

extern "C" {
    /// End of the image, page-aligned (link.ld).
    static __image_end: u8;
}

/// First byte after the guest image (including its .bss).
pub fn image_end() -> u64 {
    (&raw const __image_end) as u64
}

extern "C" fn direct_entry(bootinfo: u64, vcpu: u64) -> ! {
    if bootinfo == 0 || bootinfo % 8 != 0 {
        say!(
            "warmvm-guest: vcpu {}: bad boot info address {:#x}",
            vcpu,
            bootinfo
        );
        io::power_off(EXIT_BAD_BOOT);
    }
    // SAFETY: the VMM passes the address of the boot information block in RDI (checked
    // non-null and aligned above); RAM is identity-mapped and the block lies below the free
    // RAM, so nothing else writes it. It is copied out with one volatile read.
    let bi = unsafe { (bootinfo as *const BootInfo).read_volatile() };
    guest_main(&bi, vcpu, Entry::Direct, image_end())
}
