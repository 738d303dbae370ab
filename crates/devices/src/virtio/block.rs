//! virtio-blk over a raw image file (virtio 1.x, 5.2): read, write, flush and get-id, one
//! queue, served on the device's worker thread.
//!
//! The image is opened with O_DIRECT by default (`cache = "none"`: the guest's page cache
//! is the only cache, as on a real disk, and a warm reboot keeps it), or through the host's
//! page cache (`cache = "writeback"`). A flush is an fdatasync either way. Requests are
//! done one at a time, completely, before they are returned to the guest, so a pause never
//! leaves one half done.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Reader, Writer};

use super::mmio::{read_config_fields, BackendState, DiskShape, StateMismatch, VirtioBackend};
use super::worker::Serve;
use super::{VirtioShared, TYPE_BLOCK};

pub const SECTOR_SIZE: u64 = 512;
/// Descriptors in the queue.
pub const QUEUE_SIZE: u16 = 128;
/// Largest data transfer of one request: more is a driver bug or an attack.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;

/// How the image file is cached on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: no host page cache.
    #[default]
    None,
    /// Through the host's page cache; flushes still reach the disk.
    Writeback,
}

impl CacheMode {
    /// The name the config and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {path}: {err}")]
    Open {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    #[error("disk image {path} cannot be opened with O_DIRECT (its file system does not support it): use cache = \"writeback\"")]
    NoDirectIo { path: std::path::PathBuf },
    #[error("disk image {path}: its size ({size} bytes) is not a multiple of 512")]
    Size { path: std::path::PathBuf, size: u64 },
}

/// Open a disk image as a VM config asks.
pub fn open_image(path: &Path, read_only: bool, cache: CacheMode) -> Result<File, BlockError> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    if cache == CacheMode::None {
        o.custom_flags(libc::O_DIRECT);
    }
    let file = o.open(path).map_err(|err| match err.raw_os_error() {
        Some(libc::EINVAL) if cache == CacheMode::None => BlockError::NoDirectIo {
            path: path.to_path_buf(),
        },
        _ => BlockError::Open {
            path: path.to_path_buf(),
            err,
        },
    })?;
    let size = file
        .metadata()
        .map_err(|err| BlockError::Open {
            path: path.to_path_buf(),
            err,
        })?
        .len();
    if !size.is_multiple_of(SECTOR_SIZE) {
        return Err(BlockError::Size {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(file)
}

/// The block device's own state: what it was, so that a restore over another disk (or
/// one that changed size) is refused.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub sectors: u64,
    pub read_only: bool,
    pub cache: CacheMode,
}

/// A virtio-blk device.
pub struct Block {
    file: Arc<File>,
    sectors: u64,
    read_only: bool,
    cache: CacheMode,
    id: [u8; ID_BYTES],
}

impl Block {
    /// `file` as [`open_image`] opened it; `id` is what GET_ID answers (the disk's name).
    pub fn new(file: File, read_only: bool, cache: CacheMode, id: &str) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file: Arc::new(file),
            sectors,
            read_only,
            cache,
            id: id_bytes,
        })
    }

    /// The image file, to hand to another VMM process.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

impl VirtioBackend for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        // Only `capacity` (le64, sectors).
        read_config_fields(&self.sectors.to_le_bytes(), offset, data)
    }

    fn server(&mut self, mem: GuestMemoryMmap) -> Box<dyn Serve> {
        Box::new(BlockServer {
            file: self.file.clone(),
            mem,
            sectors: self.sectors,
            read_only: self.read_only,
            id: self.id,
            bounce: vec![0; MAX_REQUEST_BYTES + 4096],
        })
    }

    fn save(&self) -> BackendState {
        BackendState::Block(BlockState {
            sectors: self.sectors,
            read_only: self.read_only,
            cache: self.cache,
        })
    }

    fn host_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.file)
    }

    fn try_clone_backend(&self) -> std::io::Result<Box<dyn VirtioBackend>> {
        Ok(Box::new(Self {
            file: Arc::new(self.file.try_clone()?),
            sectors: self.sectors,
            read_only: self.read_only,
            cache: self.cache,
            id: self.id,
        }))
    }

    fn check_state(&self, state: &BackendState) -> Result<(), StateMismatch> {
        let BackendState::Block(s) = state else {
            return Err(StateMismatch::Kind {
                expected: "block",
                found: Box::new(state.clone()),
            });
        };
        if s.sectors != self.sectors || s.read_only != self.read_only {
            return Err(StateMismatch::Disk {
                saved: DiskShape {
                    sectors: s.sectors,
                    read_only: s.read_only,
                },
                here: DiskShape {
                    sectors: self.sectors,
                    read_only: self.read_only,
                },
            });
        }
        Ok(())
    }
}

/// A request the guest built wrong: the device fails (DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
enum Malformed {
    #[error("descriptor chain loops, has a bad index or lies outside guest RAM")]
    Chain,
    #[error("request of {0} bytes exceeds {MAX_REQUEST_BYTES}")]
    Oversized(usize),
    #[error("buffer outside guest RAM: {0}")]
    Memory(virtio_queue::Error),
    #[error("request without a full header or a status byte")]
    Layout,
    #[error("avail ring: {0}")]
    Ring(virtio_queue::Error),
    #[error("guest memory: {0}")]
    Io(std::io::Error),
}

struct BlockServer {
    file: Arc<File>,
    mem: GuestMemoryMmap,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// O_DIRECT needs aligned buffers; guest buffers are not, so data goes through here.
    bounce: Vec<u8>,
}

impl Serve for BlockServer {
    fn serve(&mut self, shared: &VirtioShared) -> bool {
        if let Err(e) = self.serve_queue(shared) {
            shared.fail(&e);
        }
        false
    }

    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl BlockServer {
    fn serve_queue(&mut self, shared: &VirtioShared) -> Result<(), Malformed> {
        let mut queues = shared.queues();
        let q = &mut queues[0];
        let mem = self.mem.clone();
        let mut completed = 0u64;
        loop {
            // At most one ring's worth per pass: a guest cannot keep the worker here forever.
            let chains: Vec<_> = q.iter(&mem).map_err(Malformed::Ring)?.collect();
            if chains.is_empty() {
                break;
            }
            for chain in chains {
                let head = chain.head_index();
                let used = self.request(&mem, chain)?;
                q.add_used(&mem, head, used).map_err(Malformed::Ring)?;
                completed += 1;
            }
        }
        if completed > 0 {
            shared
                .counters
                .requests
                .fetch_add(completed, Ordering::Relaxed);
            shared.signal_used();
        }
        Ok(())
    }

    /// Serve one request; the number of bytes written into guest buffers.
    fn request(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, Malformed> {
        let total = super::chain_bytes(&chain).ok_or(Malformed::Chain)?;
        if total > MAX_REQUEST_BYTES + 16 + 1 {
            return Err(Malformed::Oversized(total));
        }
        let mut reader = Reader::new(mem, chain.clone()).map_err(Malformed::Memory)?;
        let mut writer = Writer::new(mem, chain).map_err(Malformed::Memory)?;
        if reader.available_bytes() < 16 || writer.available_bytes() < 1 {
            return Err(Malformed::Layout);
        }
        let mut header = [0u8; 16];
        reader.read_exact(&mut header).map_err(Malformed::Io)?;
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let data_in = writer.available_bytes() - 1;
        let mut status_writer = writer.split_at(data_in).map_err(|_| Malformed::Layout)?;
        let mut written = 0usize;
        let status = match kind {
            T_IN => match self.io_range(sector, data_in) {
                Some(offset) => {
                    let buf = aligned(&mut self.bounce, data_in);
                    match self.file.read_exact_at(buf, offset) {
                        Ok(()) => {
                            writer.write_all(buf).map_err(Malformed::Io)?;
                            written = data_in;
                            S_OK
                        }
                        Err(_) => S_IOERR,
                    }
                }
                None => S_IOERR,
            },
            T_OUT => {
                let len = reader.available_bytes();
                match self.io_range(sector, len) {
                    Some(offset) if !self.read_only => {
                        let buf = aligned(&mut self.bounce, len);
                        reader.read_exact(buf).map_err(Malformed::Io)?;
                        match self.file.write_all_at(buf, offset) {
                            Ok(()) => S_OK,
                            Err(_) => S_IOERR,
                        }
                    }
                    _ => S_IOERR,
                }
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_GET_ID => {
                let n = data_in.min(ID_BYTES);
                writer.write_all(&self.id[..n]).map_err(Malformed::Io)?;
                written = n;
                S_OK
            }
            _ => S_UNSUPP,
        };
        status_writer.write_all(&[status]).map_err(Malformed::Io)?;
        Ok((written + 1) as u32)
    }

    /// The byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors
    /// inside the disk.
    fn io_range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR_SIZE) || len as usize > MAX_REQUEST_BYTES {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        // `then`, not `then_some`: the offset of a sector past the disk may overflow.
        (end <= self.sectors).then(|| sector * SECTOR_SIZE)
    }
}

/// `len` bytes of `buf` starting at a 4 KiB-aligned address (`buf` has 4 KiB of slack).
fn aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let start = buf.as_ptr().align_offset(4096).min(4096);
    &mut buf[start..start + len]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::persist::Persist;
    use crate::virtio::mmio::{VirtioMmio, QUEUE_NOTIFY};
    use crate::virtio::testing::*;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x800;
    const SECTORS: u64 = 64;

    pub(crate) fn block(scratch: &Scratch) -> Box<dyn VirtioBackend> {
        // O_DIRECT where the file system has it (the default), else the page cache.
        let file = open_image(&scratch.0, false, CacheMode::None)
            .or_else(|_| open_image(&scratch.0, false, CacheMode::Writeback))
            .unwrap();
        Box::new(Block::new(file, false, CacheMode::None, "disk-0").unwrap())
    }

    fn driver(scratch: &Scratch) -> TestDriver {
        let mem = memory();
        let dev = VirtioMmio::new(handles(block(scratch), &mem)).unwrap();
        let mut d = TestDriver::new(dev, mem);
        assert!(d.init());
        d
    }

    fn request(
        d: &mut TestDriver,
        kind: u32,
        sector: u64,
        data_len: u32,
        to_device: bool,
    ) -> (Option<u32>, u8) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        d.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![(HDR, 16, false)];
        if data_len > 0 {
            bufs.push((BUF, data_len, !to_device));
        }
        bufs.push((STATUS, 1, true));
        let n = d.used_idx().wrapping_add(1);
        d.submit(&bufs);
        let used = d.wait_used(n);
        (used, d.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    /// A block device that has served a request, its image and its guest memory.
    pub(crate) fn driven_device() -> (VirtioMmio, Scratch, crate::GuestMemoryMmap) {
        let scratch = Scratch::new(SECTORS, 0);
        let mut d = driver(&scratch);
        d.mem.write_slice(&[7u8; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut d, T_OUT, 3, 512, true), (Some(1), S_OK));
        (d.dev, scratch, d.mem)
    }

    #[test]
    fn an_inline_device_has_served_a_request_when_the_notification_returns() {
        let scratch = Scratch::new(SECTORS, 0x22);
        let mem = memory();
        let dev = VirtioMmio::new_inline(handles(block(&scratch), &mem)).unwrap();
        let mut d = TestDriver::new(dev, mem);
        assert!(d.init());
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
        d.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        d.submit(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
        // No waiting: the request was done on this thread, inside the QueueNotify write.
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(d.mem.read_obj::<u8>(GuestAddress(BUF + 511)).unwrap(), 0x22);
        // A looping chain fails the device just as it does with a worker.
        d.set_desc(0, HDR, 16, NEXT, 0);
        d.make_available(0);
        assert!(d.needs_reset());
    }

    #[test]
    fn writes_reach_the_image_and_reads_return_them() {
        let scratch = Scratch::new(SECTORS, 0x11);
        let mut d = driver(&scratch);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        d.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut d, T_OUT, 5, 1024, true), (Some(1), S_OK));
        let on_disk = std::fs::read(&scratch.0).unwrap();
        assert_eq!(&on_disk[5 * 512..7 * 512], &pattern[..]);
        assert_eq!(on_disk[4 * 512], 0x11);

        d.mem.write_slice(&[0u8; 1536], GuestAddress(BUF)).unwrap();
        assert_eq!(request(&mut d, T_IN, 4, 1536, false), (Some(1537), S_OK));
        let mut back = vec![0u8; 1536];
        d.mem.read_slice(&mut back, GuestAddress(BUF)).unwrap();
        assert_eq!(&back[..512], &[0x11; 512][..]);
        assert_eq!(&back[512..], &pattern[..]);

        assert_eq!(request(&mut d, T_FLUSH, 0, 0, false), (Some(1), S_OK));
        assert_eq!(request(&mut d, T_GET_ID, 0, 20, false), (Some(21), S_OK));
        let mut id = [0u8; 6];
        d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id, b"disk-0");
        assert_eq!(d.r(0x100), SECTORS as u32, "capacity in the config space");
        assert!(!d.needs_reset());
    }

    #[test]
    fn requests_outside_the_disk_or_unknown_fail_the_request_not_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let mut d = driver(&scratch);
        assert_eq!(
            request(&mut d, T_IN, SECTORS - 1, 1024, false),
            (Some(1), S_IOERR)
        );
        assert_eq!(
            request(&mut d, T_IN, u64::MAX, 512, false),
            (Some(1), S_IOERR)
        );
        assert_eq!(
            request(&mut d, T_OUT, 0, 100, true),
            (Some(1), S_IOERR),
            "not whole sectors"
        );
        assert_eq!(request(&mut d, 77, 0, 0, false), (Some(1), S_UNSUPP));
        // No data, a sector whose byte offset overflows (found by the virtio_queues target:
        // it panicked a debug build's worker).
        assert_eq!(request(&mut d, T_IN, 1 << 60, 0, false), (Some(1), S_IOERR));
        assert!(!d.needs_reset());
        assert_eq!(
            std::fs::read(&scratch.0).unwrap(),
            vec![0u8; (SECTORS * 512) as usize]
        );
    }

    /// A hostile ring fails the device, leaves the image untouched, and a reset recovers it.
    fn fails_then_recovers(
        scratch: &Scratch,
        mut d: TestDriver,
        break_it: impl FnOnce(&mut TestDriver),
    ) {
        let before = std::fs::read(&scratch.0).unwrap();
        break_it(&mut d);
        assert!(d.wait_failed(), "the device did not fail");
        assert_eq!(
            d.r(0x60) & crate::virtio::INT_CONFIG,
            crate::virtio::INT_CONFIG
        );
        assert!(d.dev.shared().counters.failures.load(Ordering::Relaxed) >= 1);
        assert_eq!(
            std::fs::read(&scratch.0).unwrap(),
            before,
            "the image changed"
        );
        // Notifications to a failed device do nothing.
        d.w(QUEUE_NOTIFY, 0);
        assert!(d.needs_reset());
        assert!(d.init(), "a reset brings the device back");
        assert_eq!(request(&mut d, T_IN, 0, 512, false), (Some(513), S_OK));
    }

    #[test]
    fn a_looping_descriptor_chain_fails_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let d = driver(&scratch);
        fails_then_recovers(&scratch, d, |d| {
            d.set_desc(0, HDR, 16, NEXT, 1);
            d.set_desc(1, BUF, 512, NEXT | WRITE, 0);
            d.make_available(0);
        });
    }

    #[test]
    fn a_descriptor_index_beyond_the_table_fails_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let d = driver(&scratch);
        fails_then_recovers(&scratch, d, |d| {
            d.set_desc(0, HDR, 16, NEXT, 1000);
            d.make_available(0);
        });
    }

    #[test]
    fn a_buffer_outside_guest_ram_fails_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let d = driver(&scratch);
        fails_then_recovers(&scratch, d, |d| {
            d.submit(&[
                (HDR, 16, false),
                (0x7fff_0000_0000, 512, true),
                (STATUS, 1, true),
            ]);
        });
    }

    #[test]
    fn an_oversized_length_fails_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let d = driver(&scratch);
        fails_then_recovers(&scratch, d, |d| {
            d.submit(&[(HDR, 16, false), (BUF, u32::MAX, true), (STATUS, 1, true)]);
        });
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_fails_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let d = driver(&scratch);
        fails_then_recovers(&scratch, d, |d| d.set_avail_idx(QSIZE + 5));
    }

    #[test]
    fn a_request_without_a_status_byte_fails_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let d = driver(&scratch);
        fails_then_recovers(&scratch, d, |d| d.submit(&[(HDR, 16, false)]));
    }

    #[test]
    fn status_bits_out_of_order_or_cleared_fail_the_device() {
        let scratch = Scratch::new(SECTORS, 0);
        let mem = memory();
        let dev = VirtioMmio::new(handles(block(&scratch), &mem)).unwrap();
        let mut d = TestDriver::new(dev, mem);
        use crate::virtio::DeviceHealth;
        assert_eq!(d.dev.info().health, DeviceHealth::NotStarted);
        d.w(0x70, ACK_DRIVER_OK_WITHOUT_FEATURES);
        assert!(d.needs_reset());
        let info = d.dev.info();
        assert_eq!((info.health, info.failures), (DeviceHealth::NeedsReset, 1));
        assert_eq!(info.name, "dev", "the name without the VM's");
        assert!(d.init());
        assert_eq!(d.dev.info().health, DeviceHealth::Ok);
        d.w(0x70, 1 | 2 | 4 | 8 | 0x80);
        assert_eq!(d.dev.info().health, DeviceHealth::DriverFailed);
        assert!(d.init());
        d.w(0x70, 1);
        assert!(d.needs_reset(), "clearing bits without a reset");
        assert!(d.init());
        d.w(0x38, 8);
        assert!(d.needs_reset(), "queue size changed while live");
        assert!(d.init());
        d.w(0x70, 0);
        d.w(0x70, 1 | 2);
        d.w(0x24, 1);
        d.w(0x20, 0); // VERSION_1 not accepted
        d.w(0x70, 1 | 2 | 8);
        assert!(d.needs_reset(), "FEATURES_OK without VERSION_1");
    }

    fn restored_used(mem: &crate::GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    const ACK_DRIVER_OK_WITHOUT_FEATURES: u32 = 1 | 2 | 4;

    #[test]
    fn a_restored_device_serves_requests_queued_while_it_was_paused() {
        let (dev, scratch, mem) = driven_device();
        dev.pause().unwrap();
        let state = dev.save();
        let mut d = TestDriver::resume(dev, mem.clone(), 1);
        // Queued during the pause: no worker may serve it.
        d.mem.write_slice(&[9u8; 512], GuestAddress(BUF)).unwrap();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        hdr[8..16].copy_from_slice(&8u64.to_le_bytes());
        d.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        d.submit(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.used_idx(), 1, "a paused device served a request");
        drop(d); // the old VMM's device goes away
        let mut restored = VirtioMmio::new(handles(block(&scratch), &mem)).unwrap();
        restored.load(&state).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            restored_used(&mem),
            1,
            "served before this VMM owns the guest"
        );
        restored.resume();
        let mut d = TestDriver::resume(restored, mem, 2);
        assert_eq!(d.wait_used(2), Some(1), "served once, after the restore");
        assert_eq!(
            &std::fs::read(&scratch.0).unwrap()[8 * 512..9 * 512],
            &[9u8; 512][..]
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.used_idx(), 2, "served twice");
    }

    #[test]
    fn a_state_for_another_disk_is_refused() {
        let (dev, _scratch, mem) = driven_device();
        let state = dev.save();
        let other = Scratch::new(SECTORS * 2, 0);
        let err = VirtioMmio::new(handles(block(&other), &mem))
            .unwrap()
            .load(&state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sectors"), "{err}");
    }

    #[test]
    fn a_refused_state_says_why_as_a_typed_source() {
        use std::error::Error as _;
        let (dev, _scratch, mem) = driven_device();
        let state = dev.save();
        let other = Scratch::new(SECTORS * 2, 0);
        let Err(err) = VirtioMmio::new(handles(block(&other), &mem))
            .unwrap()
            .load(&state)
        else {
            panic!("a state for another disk was loaded");
        };
        let why = err.source().and_then(|s| s.downcast_ref::<StateMismatch>());
        assert!(
            matches!(
                why,
                Some(StateMismatch::Disk { saved, here })
                    if saved.sectors == SECTORS && here.sectors == SECTORS * 2
            ),
            "{why:?}"
        );
    }
}

crate::persist_tests!(
    persist,
    tests::driven_device().0,
    |dev: &crate::virtio::mmio::VirtioMmio| crate::virtio::mmio::VirtioMmio::new(
        dev.test_handles()
    )
    .expect("a device over the same backend")
);
