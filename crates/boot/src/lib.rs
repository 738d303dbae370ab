//! How a guest gets its first instruction.
//!
//! Each protocol writes what it needs into guest memory and returns a [`BootPlan`]: the
//! register state of every vCPU at entry, as plain data. Nothing here calls KVM; the
//! hypervisor layer applies the plan.
//!
//! - [`ring3`]: warmvm's direct entry for the reference guest. The VMM builds page tables,
//!   GDT, TSS (with an I/O bitmap) and the boot information, and starts every vCPU at CPL3,
//!   so no guest code runs in ring 0 (which this project's development KVM only emulates).
//! - [`linux`]: the PVH entry of an ELF image and the Linux boot protocol (bzImage, ELF
//!   vmlinux), through linux-loader.
//!
//! Owns: what guest memory holds at entry (page tables, GDT, boot information, zero page,
//! PVH start info, MP and ACPI tables) and each vCPU's entry state, in the hypervisor
//! layer's plain types ([`CpuEntry`]). Must never: issue a KVM ioctl, start a thread, or be
//! a dependency of `warmvm-hypervisor` (boot depends on the hypervisor's data types, not the
//! reverse).

pub mod acpi;
pub mod linux;
mod mptable;
pub mod ring3;
mod x86;

use vm_memory::GuestAddress;

/// The entry state a protocol returns is the hypervisor layer's plain data type, which
/// applies it: the arrow runs from boot to the hypervisor, never back.
pub use warmvm_hypervisor::{CpuEntry, Segments, SystemRegisters};
pub use x86::MSR_IA32_MISC_ENABLE;

/// Errors of the boot protocols.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "guest RAM of {ram_mib} MiB is too small for this guest (needs at least {need_mib} MiB)"
    )]
    RamTooSmall { ram_mib: u64, need_mib: u64 },
    #[error("the kernel image is not a usable x86-64 ELF: {0}")]
    BadElf(String),
    #[error("the kernel image is neither an ELF nor a bzImage")]
    UnknownImage,
    #[error("the ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    #[error("failed to load the kernel image: {0}")]
    Load(String),
    #[error("failed to load the initrd: {0}")]
    Initrd(String),
    #[error("the command line is invalid: {0}")]
    Cmdline(String),
    #[error("{vcpus} vCPUs requested; this guest supports at most {max}")]
    TooManyVcpus { vcpus: u32, max: u32 },
    #[error("ACPI tables: {0}")]
    Acpi(String),
    #[error("the guest image overlaps memory the VMM reserves at {0:#x}")]
    ImageOverlap(u64),
    #[error("failed to write boot data into guest memory at {addr:#x}: {reason}")]
    GuestWrite { addr: u64, reason: String },
    #[error("the {protocol} protocol cannot boot this image: {reason}")]
    ProtocolMismatch { protocol: Protocol, reason: String },
    #[error("unusable guest RAM layout: {0}")]
    RamLayout(String),
}

pub type Result<T> = std::result::Result<T, BootError>;

/// What the VMM needs to start a guest.
#[derive(Clone, Debug)]
pub struct BootPlan {
    /// Entry state of vCPU `i`, for every vCPU that starts running at once. vCPUs beyond
    /// this list are application processors that wait for an INIT/SIPI from the guest.
    pub entries: Vec<CpuEntry>,
    /// The guest uses the paravirtual status area at this guest-physical address.
    pub status_addr: Option<GuestAddress>,
    /// Which protocol was used, for logs and the API.
    pub protocol: Protocol,
}

/// The boot protocols warmvm speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// warmvm's ring-3 direct entry (the reference guest).
    Ring3,
    /// PVH: 32-bit protected-mode entry from an ELF note.
    Pvh,
    /// Linux 64-bit boot protocol (bzImage or ELF vmlinux) with a zero page.
    Linux,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Ring3 => "ring3",
            Protocol::Pvh => "pvh",
            Protocol::Linux => "linux",
        })
    }
}

/// One range of guest RAM, as the VMM laid it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub len: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}
