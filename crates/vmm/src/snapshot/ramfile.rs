//! Guest RAM to and from snapshot files: large direct-I/O writes straight from the RAM
//! mapping and reads straight into a new one (no bounce buffer), several at once, each
//! file checksummed with CRC-32 over the bytes it holds.
//!
//! Only the parts of a memfd that hold data are written ([`data_extents`]): pages the guest
//! never touched are holes in the memfd, stay holes in the file, and cost neither disk
//! bandwidth nor, on restore, host memory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// One I/O request: large enough for the disk's full sequential bandwidth, small enough
/// that several threads share a VM's RAM evenly.
pub const CHUNK: u64 = 8 << 20;
/// Holes shorter than this between two data ranges are written as zeros: a few more bytes
/// on disk in exchange for a bounded extent list.
const MERGE_GAP: u64 = 1 << 20;
/// At most this many extents per RAM file (a state from outside is checked against it).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Direct I/O needs page-aligned offsets, lengths and buffers.
pub const ALIGN: u64 = 4096;
/// Concurrent requests: direct I/O blocks in the device, not on the CPU, so more threads
/// than cores keep a fast disk's queue full.
const IO_THREADS: usize = 4;

/// Where the data of a memfd of `size` bytes is: `(offset, len)` ranges, page-aligned,
/// sorted, with short holes merged.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an fd we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let start = (data as u64) / ALIGN * ALIGN;
        let end = (hole as u64).min(size).div_ceil(ALIGN) * ALIGN;
        match extents.last_mut() {
            Some(last) if start <= last.0 + last.1 + MERGE_GAP => {
                last.1 = end.max(last.0 + last.1) - last.0
            }
            _ => extents.push((start, end - start)),
        }
        pos = end.max(pos + ALIGN);
    }
    Ok(extents)
}

/// Check extents read from a snapshot: aligned, sorted, disjoint, inside `size`.
pub fn check_extents(extents: &[(u64, u64)], size: u64) -> Result<(), String> {
    if extents.len() > MAX_EXTENTS {
        return Err(format!(
            "{} extents, more than {MAX_EXTENTS}",
            extents.len()
        ));
    }
    let mut end = 0u64;
    for &(off, len) in extents {
        if off % ALIGN != 0 || len % ALIGN != 0 || len == 0 {
            return Err(format!("extent {off:#x}+{len:#x} is not page-aligned"));
        }
        let stop = off
            .checked_add(len)
            .filter(|s| *s <= size)
            .ok_or_else(|| format!("extent {off:#x}+{len:#x} is outside the region"))?;
        if off < end {
            return Err(format!("extent {off:#x} overlaps the one before"));
        }
        end = stop;
    }
    Ok(())
}

/// The extents cut into requests of at most [`CHUNK`] bytes, in file order.
fn requests(extents: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(off, len) in extents {
        let mut o = off;
        while o < off + len {
            let l = CHUNK.min(off + len - o);
            out.push((o, l));
            o += l;
        }
    }
    out
}

/// Open a snapshot file for direct I/O, or for buffered I/O where the filesystem has none
/// (the caller then syncs). Returns the file and whether it is direct.
fn open(path: &Path, write: bool) -> std::io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    if write {
        o.write(true).create_new(true);
    } else {
        o.read(true);
    }
    match o.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // The kernel may have created the file before refusing O_DIRECT: it is ours.
            if write {
                o.create_new(false).create(true).truncate(true);
            }
            o.open(path).map(|f| (f, false))
        }
        Err(e) => Err(e),
    }
}

/// Run `io` over every request on [`IO_THREADS`] threads; each returns the CRC-32 state of
/// its bytes. The first error stops the others. Returns the CRC of all bytes, in order.
fn parallel(
    reqs: &[(u64, u64)],
    io: impl Fn(u64, u64) -> std::io::Result<crc32fast::Hasher> + Sync,
) -> std::io::Result<u32> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<crc32fast::Hasher>>> = Mutex::new(vec![None; reqs.len()]);
    let first_error: Mutex<Option<std::io::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..IO_THREADS.min(reqs.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reqs.len() || failed.load(Ordering::Relaxed) {
                    return;
                }
                match io(reqs[i].0, reqs[i].1) {
                    Ok(h) => results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(h),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut total = crc32fast::Hasher::new();
    for h in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let h = h.ok_or_else(|| std::io::Error::other("a request was not carried out"))?;
        total.combine(&h);
    }
    Ok(total.finalize())
}

/// Tests only: `WARMVM_SNAPSHOT_FAULT=enospc-after:N` makes every RAM write request after
/// the first N of this process fail with ENOSPC, as a disk that fills up midway would.
#[cfg(feature = "fault-injection")]
pub const FAULT_ENV: &str = "WARMVM_SNAPSHOT_FAULT";

#[cfg(feature = "fault-injection")]
mod fault {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    /// RAM write requests this process has issued (a VMM: through its writers too).
    static WRITTEN: AtomicU64 = AtomicU64::new(0);
    /// A writer's budget, from its VMM; it wins over the environment the writer inherits.
    static GIVEN: OnceLock<Option<u64>> = OnceLock::new();

    fn limit() -> Option<u64> {
        if let Some(given) = GIVEN.get() {
            return *given;
        }
        static ENV: OnceLock<Option<u64>> = OnceLock::new();
        *ENV.get_or_init(|| {
            std::env::var(super::FAULT_ENV)
                .ok()?
                .strip_prefix("enospc-after:")?
                .parse()
                .ok()
        })
    }

    pub fn injected_enospc() -> bool {
        limit().is_some_and(|n| WRITTEN.fetch_add(1, Ordering::Relaxed) >= n)
    }

    pub fn budget() -> Option<u64> {
        limit().map(|n| n.saturating_sub(WRITTEN.load(Ordering::Relaxed)))
    }

    pub fn set_budget(n: Option<u64>) {
        let _ = GIVEN.set(n);
    }

    pub fn spent(n: u64) {
        WRITTEN.fetch_add(n, Ordering::Relaxed);
    }

    pub fn used() -> u64 {
        WRITTEN.load(Ordering::Relaxed)
    }
}

/// The requests left before an injected ENOSPC, for a writer process (tests only).
pub(crate) fn fault_budget() -> Option<u64> {
    #[cfg(feature = "fault-injection")]
    return fault::budget();
    #[cfg(not(feature = "fault-injection"))]
    None
}

/// In a writer: the budget its VMM gave it.
pub(crate) fn set_fault_budget(_n: Option<u64>) {
    #[cfg(feature = "fault-injection")]
    fault::set_budget(_n);
}

/// In a VMM: the requests its writer issued.
pub(crate) fn fault_spent(_n: u64) {
    #[cfg(feature = "fault-injection")]
    fault::spent(_n);
}

/// In a writer: the requests it issued.
pub(crate) fn fault_used() -> u64 {
    #[cfg(feature = "fault-injection")]
    return fault::used();
    #[cfg(not(feature = "fault-injection"))]
    0
}

fn full_write(file: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    #[cfg(feature = "fault-injection")]
    if fault::injected_enospc() {
        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
    }
    file.write_all_at(buf, off)
}

/// Write `extents` of the RAM mapped at `host_addr` (`size` bytes) to a new file at
/// `path`, sized to `size` so that holes read back as zeros; synced. Returns the CRC-32 of
/// the bytes written and whether direct I/O was used.
///
/// # Safety
/// `host_addr..host_addr + size` must be a mapping that stays valid, and is not written
/// by anyone, for the duration of the call (the VM is paused).
pub unsafe fn write(
    path: &Path,
    host_addr: u64,
    size: u64,
    extents: &[(u64, u64)],
) -> std::io::Result<(u32, bool)> {
    let (file, direct) = open(path, true)?;
    file.set_len(size)?;
    let crc = parallel(&requests(extents), |off, len| {
        // SAFETY: the caller guarantees the mapping; `off + len <= size` by construction
        // of the extents.
        let buf =
            unsafe { std::slice::from_raw_parts((host_addr + off) as *const u8, len as usize) };
        let mut h = crc32fast::Hasher::new();
        h.update(buf);
        full_write(&file, buf, off)?;
        super::writer_faults::fault_point("mid-ram");
        Ok(h)
    })?;
    super::writer_faults::fault_point("before-sync");
    file.sync_all()?;
    Ok((crc, direct))
}

/// Read `extents` of the file at `path` into the RAM mapped at `host_addr` (`size` bytes).
/// Refuses a file that is not `size` bytes long. Returns the CRC-32 of the bytes read.
///
/// # Safety
/// `host_addr..host_addr + size` must be a writable mapping that nobody else uses for the
/// duration of the call (the VM has not run yet).
pub unsafe fn read(
    path: &Path,
    host_addr: u64,
    size: u64,
    extents: &[(u64, u64)],
) -> Result<u32, ReadError> {
    let (file, _direct) = open(path, false).map_err(ReadError::Io)?;
    let len = file.metadata().map_err(ReadError::Io)?.len();
    if len != size {
        return Err(ReadError::Length(len));
    }
    parallel(&requests(extents), |off, len| {
        // SAFETY: the caller guarantees the mapping; extents were checked against `size`.
        let buf =
            unsafe { std::slice::from_raw_parts_mut((host_addr + off) as *mut u8, len as usize) };
        file.read_exact_at(buf, off)?;
        let mut h = crc32fast::Hasher::new();
        h.update(buf);
        Ok(h)
    })
    .map_err(ReadError::Io)
}

#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The file is this long, not the region's size.
    Length(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_short_holes_and_are_checked() {
        let dir = std::env::temp_dir().join(format!("warmvm-extents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let size = 64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[1; 10], 0).unwrap();
        f.write_all_at(&[2; 10], 100 << 10).unwrap(); // within MERGE_GAP: merged
        f.write_all_at(&[3; 10], 32 << 20).unwrap(); // far: a second extent
        let ex = data_extents(&f, size).unwrap();
        // Filesystems differ in how finely they track holes; tmpfs and ext4 by pages.
        assert!(ex.len() <= 2, "{ex:?}");
        assert!(ex.iter().any(|e| e.0 <= 32 << 20 && e.0 + e.1 > 32 << 20));
        check_extents(&ex, size).unwrap();
        assert!(check_extents(&[(0, 4096), (0, 4096)], size).is_err());
        assert!(check_extents(&[(1, 4096)], size).is_err());
        assert!(check_extents(&[(size - 4096, 8192)], size).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ram_round_trips_and_the_crc_is_of_the_bytes() {
        let dir = std::env::temp_dir().join(format!("warmvm-ramfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let size = 3 * CHUNK + 8192;
        let layout = std::alloc::Layout::from_size_align(size as usize, 4096).unwrap();
        // SAFETY: a non-zero size; freed below with the same layout.
        let src = unsafe { std::alloc::alloc_zeroed(layout) };
        // SAFETY: as above.
        let dst = unsafe { std::alloc::alloc_zeroed(layout) };
        for i in 0..size as usize {
            // SAFETY: i < size.
            unsafe { *src.add(i) = (i * 7 % 251) as u8 };
        }
        let extents = [(0, CHUNK + 4096), (2 * CHUNK, CHUNK + 8192)];
        let path = dir.join("ram0.bin");
        // SAFETY: `src` is ours and `size` bytes long.
        let (crc, _) = unsafe { write(&path, src as u64, size, &extents) }.unwrap();
        // SAFETY: `dst` is ours and `size` bytes long.
        let back = unsafe { read(&path, dst as u64, size, &extents) }.unwrap();
        assert_eq!(crc, back);
        // SAFETY: both are `size` bytes.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(src, size as usize),
                std::slice::from_raw_parts(dst, size as usize),
            )
        };
        for &(o, l) in &extents {
            assert_eq!(
                a[o as usize..(o + l) as usize],
                b[o as usize..(o + l) as usize]
            );
        }
        let mut whole = crc32fast::Hasher::new();
        for &(o, l) in &extents {
            whole.update(&a[o as usize..(o + l) as usize]);
        }
        assert_eq!(whole.finalize(), crc);
        // A file that is not the region's size is refused.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size - 4096)
            .unwrap();
        // SAFETY: as above: `dst` is a live allocation of `size` bytes.
        let short = unsafe { read(&path, dst as u64, size, &extents) };
        assert!(matches!(short, Err(ReadError::Length(_))));
        // SAFETY: allocated above with this layout.
        unsafe {
            std::alloc::dealloc(src, layout);
            std::alloc::dealloc(dst, layout);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
