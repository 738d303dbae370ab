//! The reference guest, built from `guest/` by this crate's build script (a nested
//! `cargo build -p warmvm-guest --profile guest`) and embedded here, so that an ordinary
//! `cargo build` of the workspace produces it and the VMM can boot it without any file.
//!
//! The guest's command line (space-separated, unknown options are reported and ignored):
//! `fill=PERCENT` (default 100), `interval_ms=N` (50; 0 = no wait), `refill_every=N` (8;
//! 0 = never), `passes=N` (0 = run until the host command), `quiet`, `tsc_khz=N` (used only
//! when neither the boot information nor CPUID gives a TSC frequency), `heartbeat_us=N`
//! (vCPU 0 writes `warmvm_abi::HEARTBEAT_PORT` every N µs while it verifies, for an outside
//! probe; 0 = never, the default).

/// The reference guest: a static x86-64 ELF linked at `warmvm_abi::layout::IMAGE_ADDR`, with
/// warmvm's ring-3 entry at `e_entry` and a PVH entry (Xen ELF note) for other VMMs.
pub static REFERENCE_GUEST_ELF: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/warmvm-guest.elf"));

/// The statuses the reference guest writes to the power port.
pub mod exit_status {
    /// Stopped cleanly (host command or `passes=N`): no mismatch, no register check failure.
    pub const OK: u32 = 0;
    /// Stopped, but some vCPU saw a pattern mismatch or a register check failure.
    pub const INTEGRITY_FAILURE: u32 = 1;
    /// The boot information was unusable (bad magic, version, vCPU count, status area...).
    pub const BAD_BOOT: u32 = 2;
    /// The guest panicked (the message is on the serial console).
    pub const PANIC: u32 = 101;
}
