//! The contract between warmvm and the ring-3 reference guest.
//!
//! Both sides compile this crate, so port numbers and the layouts of the boot
//! information block and of the status area cannot drift apart. Everything here is
//! `#[repr(C)]` plain data: the guest writes it with ordinary stores, the VMM reads it
//! with volatile loads out of guest RAM and validates it (the guest is not trusted).
#![no_std]

/// COM1: a 16550 UART, emulated with vm-superio.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const SERIAL_PORT_LEN: u16 = 8;

/// Paravirtual wait port, the guest's replacement for HLT. A 32-bit `out` carries a timeout
/// in microseconds; the vCPU sleeps in the VMM until the timeout passes or one of the VM's
/// devices has work for the guest (or the VMM wants the vCPU back). `u32::MAX` waits
/// without a timeout. A 32-bit `in` returns why the last wait ended ([`WAKE_TIMEOUT`] or
/// [`WAKE_EVENT`]).
pub const WAIT_PORT: u16 = 0x510;
/// Paravirtual power port: a 32-bit `out` powers the VM off with that exit status.
pub const POWER_PORT: u16 = 0x514;
/// Heartbeat port: the reference guest writes one byte here at a steady interval when its
/// command line asks (`heartbeat_us=N`); the VMM ignores the value. It exists for an outside
/// probe: the host's KVM trace (`kvm:kvm_pio`) of these writes shows when the guest ran, the
/// same way under any VMM. Not 0x518: QEMU's fw_cfg DMA register sits there.
pub const HEARTBEAT_PORT: u16 = 0x520;
/// The byte the reference guest writes to [`HEARTBEAT_PORT`]: a probe filters on it too, so
/// that a guest spraying ports (`hostile=ports`) is not mistaken for a heartbeat.
pub const HEARTBEAT_VALUE: u8 = 0xb7;
/// First and last port of the paravirtual block, for I/O bitmaps.
pub const PV_PORT_FIRST: u16 = WAIT_PORT;
pub const PV_PORT_LAST: u16 = HEARTBEAT_PORT;

/// ACPI fixed-hardware PM1a event block: the 16-bit PM1 status register at this port and
/// the 16-bit PM1 enable register two ports on (the FADT's `PM1a_EVT_BLK`, 4 ports).
pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1A_EVT_LEN: u16 = 4;
/// ACPI PM1a control block: the 16-bit PM1 control register (the FADT's `PM1a_CNT_BLK`).
pub const PM1A_CNT_PORT: u16 = 0x604;
pub const PM1A_CNT_LEN: u16 = 2;
/// PM1 status: the power button was pressed (write 1 to clear).
pub const PM1_STS_PWRBTN: u16 = 1 << 8;
/// PM1 status: the system woke (write 1 to clear).
pub const PM1_STS_WAK: u16 = 1 << 15;
/// PM1 enable: raise the SCI while `PM1_STS_PWRBTN` is set.
pub const PM1_EN_PWRBTN: u16 = 1 << 8;
/// PM1 control: the system is in ACPI mode (SCI, not SMI); always set here.
pub const PM1_CNT_SCI_EN: u16 = 1;
/// PM1 control: the sleep type field (bits 10-12) and the bit that enters it.
pub const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
pub const PM1_CNT_SLP_TYP_MASK: u16 = 7 << PM1_CNT_SLP_TYP_SHIFT;
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// The sleep type of S5 (soft off), as the DSDT's `\_S5` package announces it.
pub const SLP_TYP_S5: u16 = 5;
/// The ACPI SCI's interrupt (ISA IRQ = GSI 9, level-triggered, active high).
pub const SCI_IRQ: u8 = 9;

/// `WAIT_PORT` timeout value meaning "no timeout".
pub const WAIT_FOREVER: u32 = u32::MAX;
/// Reasons returned by an `in` from [`WAIT_PORT`].
pub const WAKE_TIMEOUT: u32 = 1;
pub const WAKE_EVENT: u32 = 2;

/// Guest-physical layout used by warmvm's ring-3 direct entry. The VMM builds page
/// tables, GDT, TSS, boot information and command line in the first 1 MiB, loads the
/// guest ELF at its own addresses (≥ 1 MiB), and hands the rest of RAM to the guest.
pub mod layout {
    /// GDT (null, kernel code/data, user code/data, 16-byte TSS descriptor).
    pub const GDT_ADDR: u64 = 0x500;
    /// The boot information block ([`super::BootInfo`]).
    pub const BOOTINFO_ADDR: u64 = 0x1000;
    /// Kernel command line, NUL-terminated, at most [`CMDLINE_MAX`] bytes.
    pub const CMDLINE_ADDR: u64 = 0x2000;
    pub const CMDLINE_MAX: u64 = 0x1000;
    /// TSS: 104-byte header, then an 8 KiB I/O permission bitmap and its 0xff terminator.
    pub const TSS_ADDR: u64 = 0x3000;
    pub const TSS_SIZE: u64 = 104 + 8192 + 1;
    /// Status area ([`super::StatusArea`]), shared by guest (writer) and VMM (reader).
    pub const STATUS_ADDR: u64 = 0x8000;
    pub const STATUS_SIZE: u64 = 0x8000;
    /// Page tables: PML4, then PDPTs and PDs (2 MiB pages), as many as RAM needs.
    pub const PAGE_TABLES_ADDR: u64 = 0x10000;
    /// Page tables end here at the latest (room for RAM up to ~100 GiB with 2 MiB pages).
    pub const PAGE_TABLES_END: u64 = 0x80000;
    /// Top of the boot stack of vCPU 0; vCPU n's stack top is `STACKS_TOP - n * STACK_SIZE`.
    pub const STACKS_TOP: u64 = 0x100000;
    pub const STACK_SIZE: u64 = 0x4000;
    /// Where the guest image is linked (the VMM takes the actual addresses from the ELF).
    pub const IMAGE_ADDR: u64 = 0x100000;
    /// Start of the MMIO hole below 4 GiB; RAM beyond it continues at 4 GiB.
    pub const MMIO_HOLE_START: u64 = 0xC000_0000;
    pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
}

/// "WARMVMBI", little endian.
pub const BOOTINFO_MAGIC: u64 = u64::from_le_bytes(*b"WARMVMBI");
pub const BOOTINFO_VERSION: u32 = 1;

/// Maximum number of RAM ranges described in [`BootInfo`].
pub const MAX_RAM_RANGES: usize = 4;

/// One range of guest-physical RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub len: u64,
}

/// Written by the VMM at [`layout::BOOTINFO_ADDR`] before the first instruction; the
/// guest receives its address in RDI (and its vCPU index in RSI).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    /// `size_of::<BootInfo>()` as the VMM knew it: fields only ever get appended.
    pub size: u32,
    pub ram_size: u64,
    pub tsc_khz: u64,
    pub vcpu_count: u32,
    pub ram_range_count: u32,
    pub ram_ranges: [RamRange; MAX_RAM_RANGES],
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    pub status_addr: u64,
    pub status_size: u64,
    /// First byte after the guest image that the guest may use for its workload.
    pub free_start: u64,
    pub serial_port: u16,
    pub wait_port: u16,
    pub power_port: u16,
    pub _pad: u16,
    /// Guest-physical address of the first virtio-mmio register window (4 KiB each,
    /// [`VIRTIO_MMIO_STRIDE`] apart), and how many there are. The VMM maps them into the
    /// guest's page tables as user pages.
    pub virtio_mmio_base: u64,
    pub virtio_mmio_count: u32,
    pub _pad2: u32,
}

/// Where warmvm puts virtio-mmio devices, in the MMIO hole below 4 GiB.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Most virtio devices one VM may have.
pub const MAX_VIRTIO_DEVICES: u32 = 16;

/// "WARMVMST", little endian.
pub const STATUS_MAGIC: u64 = u64::from_le_bytes(*b"WARMVMST");
/// 2: `max_gap_ns` and `gap_epoch` appended to [`VcpuStatus`].
pub const STATUS_VERSION: u32 = 2;

/// Commands the VMM posts in [`StatusHeader::host_command`]; the guest polls it.
pub const HOST_COMMAND_NONE: u32 = 0;
pub const HOST_COMMAND_POWEROFF: u32 = 1;

/// The guest watches the ACPI power button (PM1 status, [`PM1_STS_PWRBTN`]): the VMM asks
/// it to power off only by pressing the button. A guest without this bit (an older build
/// still running after a warm upgrade) is also sent [`HOST_COMMAND_POWEROFF`].
pub const GUEST_FEATURE_POWER_BUTTON: u32 = 1;

/// Phases of a reference-guest vCPU, in [`VcpuStatus::phase`].
pub const PHASE_BOOTING: u32 = 0;
pub const PHASE_FILLING: u32 = 1;
pub const PHASE_VERIFYING: u32 = 2;
pub const PHASE_POWERING_OFF: u32 = 3;

/// Per-vCPU integrity figures. The guest updates them under a sequence lock: `seq` is
/// odd while a write is in progress, so the VMM retries a read that saw an odd or a
/// changed `seq`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStatus {
    pub seq: u64,
    pub phase: u32,
    pub _pad: u32,
    /// Pages of this vCPU's share of RAM (its stripe) that hold the pattern.
    pub pages_owned: u64,
    /// Pages written with the pattern so far (counts every fill and refill).
    pub pages_filled: u64,
    /// Pages read back and compared, in total.
    pub pages_verified: u64,
    /// Words that did not hold the expected value.
    pub mismatches: u64,
    /// Complete verification passes over this vCPU's stripe.
    pub passes: u64,
    /// Monotonic counter, incremented once per verified page; also mirrored in the
    /// FS base register so that a lost segment state shows up as a check failure.
    pub counter: u64,
    /// Guest time in nanoseconds, from RDTSC and the TSC frequency in the boot info.
    pub guest_time_ns: u64,
    /// Current pattern generation (bumped by every refill pass).
    pub generation: u64,
    /// Times the CPU state the guest keeps in registers did not match its memory copy.
    pub register_check_failures: u64,
    /// Times guest time was seen going backwards.
    pub time_went_backwards: u64,
    /// Guest-physical address of the most recent mismatch (0 if none).
    pub last_mismatch_addr: u64,
    /// Longest time between two consecutive verified pages (deliberate waits excluded)
    /// since the VMM last bumped `gap_epoch`: how long the guest saw the world stop.
    pub max_gap_ns: u64,
    /// Written by the VMM, never by the guest: a new value resets `max_gap_ns`.
    pub gap_epoch: u64,
}

/// Most vCPUs the reference guest supports (one boot stack each below 1 MiB).
pub const MAX_VCPUS: usize = 32;

/// Header of the status area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StatusHeader {
    pub magic: u64,
    pub version: u32,
    pub vcpu_count: u32,
    /// Written by the VMM, read by the guest: one of the `HOST_COMMAND_*` values.
    pub host_command: u32,
    /// Written by the guest: `GUEST_FEATURE_*` bits. Older guests leave 0 here.
    pub guest_features: u32,
}

/// The status area at [`layout::STATUS_ADDR`].
#[repr(C)]
pub struct StatusArea {
    pub header: StatusHeader,
    pub vcpus: [VcpuStatus; MAX_VCPUS],
}

const _: () = assert!(core::mem::size_of::<StatusArea>() as u64 <= layout::STATUS_SIZE);
const _: () = assert!(layout::CMDLINE_ADDR + layout::CMDLINE_MAX <= layout::TSS_ADDR);
const _: () =
    assert!(layout::STACKS_TOP - MAX_VCPUS as u64 * layout::STACK_SIZE >= layout::PAGE_TABLES_END);
const _: () = assert!(layout::TSS_ADDR + layout::TSS_SIZE <= layout::STATUS_ADDR);
const _: () = assert!(
    core::mem::size_of::<BootInfo>() as u64 <= layout::CMDLINE_ADDR - layout::BOOTINFO_ADDR
);

/// Byte offset of vCPU `i`'s [`VcpuStatus`] inside the status area.
pub const fn vcpu_status_offset(i: usize) -> usize {
    core::mem::size_of::<StatusHeader>() + i * core::mem::size_of::<VcpuStatus>()
}

/// The integrity pattern: the value of the 64-bit word at guest-physical `addr` in
/// pattern generation `generation`. A bijective mix (splitmix64's finaliser), so that
/// any two words, pages or generations differ.
pub const fn pattern_word(addr: u64, generation: u64) -> u64 {
    let mut z = addr ^ generation.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_between_addresses_and_generations() {
        assert_ne!(pattern_word(0x1000, 0), pattern_word(0x1008, 0));
        assert_ne!(pattern_word(0x1000, 0), pattern_word(0x1000, 1));
    }

    #[test]
    fn status_offsets_follow_the_header() {
        assert_eq!(vcpu_status_offset(0), 24);
        assert_eq!(
            vcpu_status_offset(1),
            24 + core::mem::size_of::<VcpuStatus>()
        );
    }
}
