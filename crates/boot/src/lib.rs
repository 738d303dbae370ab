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

/// Guest RAM as this crate sees it: vm-memory's mmap backend with a dirty bitmap per
/// region (`AtomicBitmap`), so every write that goes through vm-memory (virtio rings and
/// buffers, boot data) is recorded for live migration. The same type as
/// `warmvm_memory::GuestMemoryMmap`.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

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

/// Errors of the boot protocols. A message includes its source's (the API shows one
/// line); the source is kept too, for callers that walk the chain.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "guest RAM of {ram_mib} MiB is too small for this guest (needs at least {need_mib} MiB)"
    )]
    RamTooSmall { ram_mib: u64, need_mib: u64 },
    #[error("the kernel image is not a usable x86-64 ELF: {0}")]
    BadElf(#[source] ElfError),
    #[error("the kernel image is neither an ELF nor a bzImage")]
    UnknownImage,
    #[error("the ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    #[error("failed to load the kernel image: {0}")]
    Load(#[source] LoadError),
    #[error("failed to load the initrd: {0}")]
    Initrd(#[source] InitrdError),
    #[error("the command line is invalid: {0}")]
    Cmdline(#[source] CmdlineError),
    #[error("{vcpus} vCPUs requested; this guest supports at most {max}")]
    TooManyVcpus { vcpus: u32, max: u32 },
    #[error(
        "ACPI tables: the ACPI tables take {len} bytes, more than the {room} below the MP table"
    )]
    AcpiTooLarge { len: usize, room: u64 },
    #[error("the guest image overlaps memory the VMM reserves at {0:#x}")]
    ImageOverlap(u64),
    #[error("failed to write boot data into guest memory at {addr:#x}: {source}")]
    GuestWrite {
        addr: u64,
        #[source]
        source: GuestWriteError,
    },
    #[error("the {protocol} protocol cannot boot this image: {reason}")]
    ProtocolMismatch { protocol: Protocol, reason: String },
    #[error("unusable guest RAM layout: {0}")]
    RamLayout(#[source] RamLayoutError),
}

/// Why a kernel image is not a usable x86-64 ELF.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error(transparent)]
    Loader(#[from] linux_loader::loader::Error),
    #[error("truncated ELF header")]
    TruncatedHeader,
    #[error("not a 64-bit ELF")]
    Not64Bit,
    #[error("machine {0} is not x86-64")]
    Machine(u16),
    #[error("program header offset overflows")]
    ProgramHeaderOffset,
    #[error("truncated program headers")]
    TruncatedProgramHeaders,
    #[error("entry point {0:#x} is outside every loadable segment")]
    EntryOutsideSegments(u64),
}

/// Why a kernel image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Loader(#[from] linux_loader::loader::Error),
    #[error("RAM must start at guest-physical 0 in at most 4 ranges")]
    RamRanges,
    #[error("{devices} virtio devices, at most {max}")]
    TooManyVirtioDevices { devices: u32, max: u32 },
    #[error("the bzImage has no 64-bit entry point (needs boot protocol 2.12 with XLF_KERNEL_64)")]
    No64BitEntry,
}

/// Why an initrd could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error(
        "the initrd ({kib} KiB) does not fit between the end of the kernel at {floor:#x} and \
         {max_end:#x} (end of low RAM or the kernel's initrd_addr_max); give the VM more \
         memory or use a smaller initrd"
    )]
    DoesNotFit { kib: u64, floor: u64, max_end: u64 },
}

/// Why a kernel command line is refused.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("must be shorter than {max} bytes and contain no NUL")]
    Ring3 { max: u64 },
    #[error("the command line is {len} bytes long; this kernel accepts at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("the command line contains {0:?}; only printable ASCII is allowed")]
    NotPrintable(char),
    #[error(transparent)]
    Build(#[from] linux_loader::cmdline::Error),
    #[error(transparent)]
    Write(#[from] linux_loader::loader::Error),
}

/// Why boot data could not be written into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum GuestWriteError {
    #[error(transparent)]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    BootParams(#[from] linux_loader::configurator::Error),
    #[error("page tables for {gibs} GiB do not fit below {limit:#x}")]
    PageTablesDoNotFit { gibs: u64, limit: u64 },
}

/// Why the VMM's RAM layout cannot be described to the guest.
#[derive(Debug, thiserror::Error)]
pub enum RamLayoutError {
    #[error("no RAM")]
    NoRam,
    #[error("the first RAM range must start at 0, not {0:#x}")]
    FirstNotAtZero(u64),
    #[error("RAM ranges must be sorted and disjoint: {start:#x}+{len:#x} overlaps or precedes {prev_end:#x}")]
    Unsorted { start: u64, len: u64, prev_end: u64 },
    #[error("{entries} memory map entries; the zero page holds at most {max}")]
    TooManyEntries { entries: usize, max: usize },
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

#[cfg(test)]
mod error_tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_boot_error_keeps_its_typed_source_and_its_one_line_message() {
        let e = BootError::GuestWrite {
            addr: 0x1000,
            source: GuestWriteError::PageTablesDoNotFit {
                gibs: 2,
                limit: 0x9000,
            },
        };
        assert_eq!(
            e.to_string(),
            "failed to write boot data into guest memory at 0x1000: page tables for 2 GiB do \
             not fit below 0x9000"
        );
        let source = e.source().expect("the cause is kept");
        assert!(matches!(
            source.downcast_ref::<GuestWriteError>(),
            Some(GuestWriteError::PageTablesDoNotFit { gibs: 2, .. })
        ));
    }
}
