//! Guest RAM.
//!
//! Every region is a memfd, sealed so that it can neither shrink nor grow, mapped
//! `MAP_SHARED`. The VMM keeps the fds: a warm reboot hands them to the next VMM process,
//! which maps the very same pages, so guest RAM is never copied. Layout on x86-64: RAM from
//! 0 up to the MMIO hole at 3 GiB, and the rest from 4 GiB.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestAddress};
use warmvm_abi::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

pub use vm_memory;

/// Guest RAM as the VMM maps it: each region carries a dirty bitmap (one bit per 4 KiB
/// page) that vm-memory sets on every write made through it, i.e. every write of the VMM
/// itself (virtio used rings and buffers, block reads, net receive, boot data, the status
/// area). KVM's dirty log sees only the guest's writes; live migration ORs the two. The
/// boot and devices crates name the same type.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
const PAGE: usize = 4096;

const MIB: u64 = 1 << 20;
const HUGE_PAGE: u64 = 2 * MIB;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM size must be a non-zero multiple of 1 MiB (got {0} bytes)")]
    BadSize(u64),
    #[error("guest RAM with huge pages must be a multiple of 2 MiB (got {0} MiB)")]
    HugeSize(u64),
    #[error("huge pages requested for {need_mib} MiB but the host has only {free_mib} MiB of free 2 MiB huge pages (reserve more in /proc/sys/vm/nr_hugepages)")]
    NoHugePages { need_mib: u64, free_mib: u64 },
    #[error("memfd_create failed: {0}")]
    Create(io::Error),
    #[error("sizing the guest RAM memfd to {size} bytes failed: {err}")]
    Truncate { size: u64, err: io::Error },
    #[error("sealing the guest RAM memfd failed: {0}")]
    Seal(io::Error),
    #[error("mapping guest RAM failed: {0}")]
    Map(String),
    #[error("guest RAM fd {index}: {reason}")]
    Adopt { index: usize, reason: String },
}

pub type Result<T> = std::result::Result<T, MemoryError>;

/// One RAM region: where it sits in the guest and the memfd behind it.
#[derive(Debug)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file: File,
}

/// A VM's RAM: the memfds and their mapping.
pub struct GuestRam {
    regions: Vec<RamRegion>,
    memory: GuestMemoryMmap,
    hugepages: bool,
}

/// Where RAM of `size` bytes goes in the guest-physical address space.
pub fn layout(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_HOLE_END, size - low));
    }
    ranges
}

impl GuestRam {
    /// Allocate `size` bytes of guest RAM in new memfds named after `name`.
    pub fn create(name: &str, size: u64, hugepages: bool) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(MIB) {
            return Err(MemoryError::BadSize(size));
        }
        if hugepages {
            if !size.is_multiple_of(HUGE_PAGE) {
                return Err(MemoryError::HugeSize(size / MIB));
            }
            let free = free_huge_pages_bytes();
            if free < size {
                return Err(MemoryError::NoHugePages {
                    need_mib: size / MIB,
                    free_mib: free / MIB,
                });
            }
        }
        let mut regions = Vec::new();
        for (i, (guest_addr, len)) in layout(size).into_iter().enumerate() {
            let file = create_memfd(&format!("warmvm:{name}:ram{i}"), len, hugepages)?;
            regions.push(RamRegion {
                guest_addr,
                size: len,
                file,
            });
        }
        Self::map(regions, hugepages)
    }

    /// Take over RAM regions handed over by another VMM process. Each fd must be a memfd of
    /// exactly the expected size, sealed against shrinking and growing, so that the pages
    /// the guest left behind are all there and stay there.
    pub fn adopt(regions: Vec<RamRegion>, hugepages: bool) -> Result<Self> {
        let expected = layout(regions.iter().map(|r| r.size).sum());
        if expected.len() != regions.len() {
            return Err(MemoryError::Adopt {
                index: 0,
                reason: format!(
                    "{} regions handed over where the layout has {}",
                    regions.len(),
                    expected.len()
                ),
            });
        }
        for (index, (r, (gpa, len))) in regions.iter().zip(&expected).enumerate() {
            let bad = |reason: String| MemoryError::Adopt { index, reason };
            if r.guest_addr != *gpa || r.size != *len {
                return Err(bad(format!(
                    "describes {:#x}+{:#x}, layout expects {gpa:#x}+{len:#x}",
                    r.guest_addr, r.size
                )));
            }
            let actual = r
                .file
                .metadata()
                .map_err(|e| bad(format!("fstat: {e}")))?
                .len();
            if actual != r.size {
                return Err(bad(format!("is {actual} bytes, the state says {}", r.size)));
            }
            let seals = get_seals(&r.file).map_err(|e| bad(format!("F_GET_SEALS: {e}")))?;
            let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
            if seals & need != need {
                return Err(bad("is not sealed against shrinking and growing".into()));
            }
        }
        Self::map(regions, hugepages)
    }

    fn map(regions: Vec<RamRegion>, hugepages: bool) -> Result<Self> {
        let mut mapped = Vec::new();
        for r in &regions {
            let fd = r
                .file
                .try_clone()
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            let bitmap = AtomicBitmap::new(
                r.size as usize,
                std::num::NonZeroUsize::new(PAGE)
                    .ok_or_else(|| MemoryError::Map("page size".into()))?,
            );
            let region = MmapRegionBuilder::new_with_bitmap(r.size as usize, bitmap)
                .with_file_offset(FileOffset::new(fd, 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .with_hugetlbfs(hugepages)
                .build()
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| MemoryError::Map("region wraps the address space".into()))?;
            mapped.push(region);
        }
        let memory =
            GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Self {
            regions,
            memory,
            hugepages,
        })
    }

    /// The mapped RAM, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// (guest address, size, host address) of every region, for KVM memory slots.
    pub fn slots(&self) -> Vec<(u64, u64, u64)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.memory
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map(|p| p as u64)
                    .unwrap_or(0);
                (r.start_addr().0, r.len(), host)
            })
            .collect()
    }

    /// The pages of region `index` the VMM has written through [`GuestRam::memory`] since
    /// the last call (or since the RAM was mapped), one bit per 4 KiB page as in KVM's
    /// dirty log, and the record emptied. A write racing the call lands either in what it
    /// returns or in what the next call returns, never in neither: each word is read and
    /// cleared at once.
    pub fn take_vmm_dirty(&self, index: usize) -> Option<Vec<u64>> {
        use vm_memory::GuestMemoryBackend;
        let region = self.memory.iter().nth(index)?;
        let mmap: &MmapRegion<AtomicBitmap> = region;
        Some(mmap.bitmap().get_and_reset())
    }

    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// Memory the host has committed to this VM's RAM so far (pages the guest touched).
    pub fn resident_bytes(&self) -> u64 {
        self.regions
            .iter()
            .filter_map(|r| {
                // st_blocks of a memfd counts its allocated pages in 512-byte units.
                use std::os::unix::fs::MetadataExt;
                r.file.metadata().ok().map(|m| m.blocks() * 512)
            })
            .sum()
    }
}

fn create_memfd(name: &str, size: u64, hugepages: bool) -> Result<File> {
    let cname =
        std::ffi::CString::new(name).map_err(|e| MemoryError::Create(io::Error::other(e)))?;
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugepages {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `cname` is a valid NUL-terminated string; the call has no memory side effects.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Create(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|err| MemoryError::Truncate { size, err })?;
    // SAFETY: fcntl on an fd we own, with an integer argument.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc < 0 {
        return Err(MemoryError::Seal(io::Error::last_os_error()));
    }
    Ok(file)
}

fn get_seals(file: &File) -> io::Result<i32> {
    // SAFETY: F_GET_SEALS only reads the seals of an fd we hold.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Total host memory, in bytes (0 if unknown).
pub fn host_memory_bytes() -> u64 {
    meminfo_kib("MemTotal").unwrap_or(0) * 1024
}

/// Memory the host can still give without swapping (MemAvailable), in bytes (0 if unknown).
pub fn available_memory_bytes() -> u64 {
    meminfo_kib("MemAvailable").unwrap_or(0) * 1024
}

/// Free 2 MiB huge pages on the host, in bytes.
pub fn free_huge_pages_bytes() -> u64 {
    let free = meminfo_kib("HugePages_Free").unwrap_or(0);
    let size_kib = meminfo_kib("Hugepagesize").unwrap_or(2048);
    if size_kib * 1024 != HUGE_PAGE {
        return 0;
    }
    free * HUGE_PAGE
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_above_the_hole_moves_to_4_gib() {
        assert_eq!(layout(256 * MIB), vec![(0, 256 * MIB)]);
        assert_eq!(
            layout(4096 * MIB),
            vec![(0, 3072 * MIB), (4096 * MIB, 1024 * MIB)]
        );
    }

    #[test]
    fn zero_and_unaligned_sizes_are_refused() {
        assert!(matches!(
            GuestRam::create("t", 0, false),
            Err(MemoryError::BadSize(0))
        ));
        assert!(GuestRam::create("t", MIB + 1, false).is_err());
    }

    #[test]
    fn memfd_is_sealed_and_shared_with_its_adopter() {
        let ram = GuestRam::create("t", 4 * MIB, false).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u64, GuestAddress(0x1000))
            .unwrap();
        let file = ram.regions()[0].file.try_clone().unwrap();
        assert!(file.set_len(8 * MIB).is_err(), "growing must be sealed");
        let adopted = GuestRam::adopt(
            vec![RamRegion {
                guest_addr: 0,
                size: 4 * MIB,
                file,
            }],
            false,
        )
        .unwrap();
        let v: u64 = adopted.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
    }

    #[test]
    fn the_vmms_own_writes_are_recorded_per_page_and_taken_once() {
        let ram = GuestRam::create("t", 4 * MIB, false).unwrap();
        // Mapping is not writing.
        assert!(ram.take_vmm_dirty(0).unwrap().iter().all(|w| *w == 0));
        ram.memory().write_obj(7u64, GuestAddress(0x3008)).unwrap();
        // A write across a page boundary dirties both pages.
        ram.memory()
            .write_slice(&[1u8; 8], GuestAddress(0x9ffc))
            .unwrap();
        let bits = ram.take_vmm_dirty(0).unwrap();
        let pages: Vec<u64> = (0..bits.len() as u64 * 64)
            .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(pages, vec![3, 9, 10]);
        assert!(ram.take_vmm_dirty(0).unwrap().iter().all(|w| *w == 0));
        assert!(ram.take_vmm_dirty(1).is_none(), "one region below 3 GiB");
    }

    #[test]
    fn adoption_refuses_a_wrong_size() {
        let ram = GuestRam::create("t", 4 * MIB, false).unwrap();
        let file = ram.regions()[0].file.try_clone().unwrap();
        let err = GuestRam::adopt(
            vec![RamRegion {
                guest_addr: 0,
                size: 8 * MIB,
                file,
            }],
            false,
        );
        assert!(matches!(err, Err(MemoryError::Adopt { .. })));
    }

    #[test]
    fn hugepages_without_a_reservation_give_a_clear_error() {
        if free_huge_pages_bytes() >= 64 * MIB {
            return;
        }
        let err = GuestRam::create("t", 64 * MIB, true).err().unwrap();
        assert!(err.to_string().contains("nr_hugepages"), "{err}");
    }
}
