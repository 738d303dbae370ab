//! The freestanding runtime: panic handler and the memory functions the compiler calls.

use core::arch::global_asm;

/// Print the panic and power off with status 101. Never traps: a trap would be a triple
/// fault on this KVM, and the message would be lost.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // The console lock may be held by this very vCPU (a panic while printing): bypass it.
    crate::console::print_unlocked(format_args!("\nwarmvm-guest: PANIC: {}\n", info));
    crate::io::power_off(crate::EXIT_PANIC)
}

// memcpy, memmove, memset, memcmp and bcmp: without libc nothing else provides them (the
// target's compiler_builtins does not). String instructions, so that the compiler cannot turn
// them back into calls to themselves. DF is clear on entry (SysV ABI; the PVH stub clears it).
global_asm!(
    ".pushsection .text.warmvm_mem, \"ax\", @progbits",
    ".global memcpy",
    ".type memcpy, @function",
    "memcpy:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    rep movsb",
    "    ret",
    ".size memcpy, . - memcpy",
    "",
    ".global memmove",
    ".type memmove, @function",
    "memmove:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    cmp rdi, rsi",
    "    jbe 2f",
    "    lea r8, [rsi + rdx]",
    "    cmp rdi, r8",
    "    jae 2f",
    // Destination overlaps the end of the source: copy backwards.
    "    lea rsi, [rsi + rdx - 1]",
    "    lea rdi, [rdi + rdx - 1]",
    "    std",
    "    rep movsb",
    "    cld",
    "    ret",
    "2:  rep movsb",
    "    ret",
    ".size memmove, . - memmove",
    "",
    ".global memset",
    ".type memset, @function",
    "memset:",
    "    mov r9, rdi",
    "    mov eax, esi",
    "    mov rcx, rdx",
    "    rep stosb",
    "    mov rax, r9",
    "    ret",
    ".size memset, . - memset",
    "",
    ".global memcmp",
    ".type memcmp, @function",
    ".global bcmp",
    ".type bcmp, @function",
    "memcmp:",
    "bcmp:",
    "    mov rcx, rdx",
    "    xor eax, eax",
    "    test rcx, rcx",
    "    jz 3f",
    "    repe cmpsb",
    "    je 3f",
    "    movzx eax, byte ptr [rdi - 1]",
    "    movzx ecx, byte ptr [rsi - 1]",
    "    sub eax, ecx",
    "3:  ret",
    ".size memcmp, . - memcmp",
    ".popsection",
);
