//! A polling virtio-blk driver: one request at a time, reads only (the guest serves files).

use crate::virtio::{Mmio, Queue, DESC_NEXT, DESC_WRITE, QUEUE_BYTES, TYPE_BLOCK};

pub const SECTOR: u64 = 512;
/// Largest read of one request.
pub const MAX_READ: usize = 64 << 10;
/// RAM the driver needs: its queue, a header/status page and the data buffer.
pub const AREA_BYTES: u64 = QUEUE_BYTES + 4096 + MAX_READ as u64;
const QUEUE_SIZE: u16 = 8;
const F_RO: u64 = 1 << 5;

pub struct Blk {
    dev: Mmio,
    queue: Queue,
    header: u64,
    data: u64,
    pub sectors: u64,
    pub reads: u64,
}

// The fields are read through Debug, in the console line that reports the error.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug)]
pub enum BlkError {
    NotBlock,
    Init(&'static str),
    Range,
    Timeout,
    Status(u8),
    NeedsReset,
}

impl Blk {
    /// Set up the block device at `window`, using `area` (AREA_BYTES of free RAM).
    pub fn new(window: u64, area: u64) -> Result<Self, BlkError> {
        let dev = Mmio::new(window);
        if dev.device_type() != Some(TYPE_BLOCK) {
            return Err(BlkError::NotBlock);
        }
        let queue = Queue::new(area, QUEUE_SIZE);
        dev.init(F_RO, &queue).map_err(BlkError::Init)?;
        Ok(Self {
            sectors: dev.config_u64(0),
            dev,
            queue,
            header: area + QUEUE_BYTES,
            data: area + QUEUE_BYTES + 4096,
            reads: 0,
        })
    }

    /// Read `len` bytes (whole sectors, at most MAX_READ) from `sector`.
    pub fn read(&mut self, sector: u64, len: usize) -> Result<&[u8], BlkError> {
        if len == 0 || len > MAX_READ || len as u64 % SECTOR != 0 {
            return Err(BlkError::Range);
        }
        let end = sector
            .checked_add(len as u64 / SECTOR)
            .ok_or(BlkError::Range)?;
        if end > self.sectors {
            return Err(BlkError::Range);
        }
        let status = self.header + 16;
        // SAFETY: header and status live in this driver's page of the I/O area.
        unsafe {
            core::ptr::write_volatile(self.header as *mut u32, 0); // VIRTIO_BLK_T_IN
            core::ptr::write_volatile((self.header + 4) as *mut u32, 0);
            core::ptr::write_volatile((self.header + 8) as *mut u64, sector);
            core::ptr::write_volatile(status as *mut u8, 0xff);
        }
        self.queue.set_desc(0, self.header, 16, DESC_NEXT, 1);
        self.queue
            .set_desc(1, self.data, len as u32, DESC_WRITE | DESC_NEXT, 2);
        self.queue.set_desc(2, status, 1, DESC_WRITE, 0);
        self.queue.push(0);
        self.dev.notify(0);
        if self.queue.wait_used(5000).is_none() {
            return Err(if self.dev.needs_reset() {
                BlkError::NeedsReset
            } else {
                BlkError::Timeout
            });
        }
        self.reads += 1;
        // SAFETY: the device has written the status byte and the data (used ring seen).
        let st = unsafe { core::ptr::read_volatile(status as *const u8) };
        if st != 0 {
            return Err(BlkError::Status(st));
        }
        // SAFETY: `len` bytes of the data buffer, filled by the device, not touched by it
        // again until the next request (which needs `&mut self`).
        Ok(unsafe { core::slice::from_raw_parts(self.data as *const u8, len) })
    }
}

impl Blk {
    /// Break the protocol as `how` says (to test the VMM), and report whether the device
    /// then says it needs a reset.
    pub fn misbehave(&mut self, how: crate::cmdline::Hostile) -> bool {
        use crate::cmdline::Hostile;
        let status = self.header + 16;
        match how {
            Hostile::Loop => {
                self.queue.set_desc(0, self.header, 16, DESC_NEXT, 1);
                self.queue
                    .set_desc(1, self.data, 512, DESC_WRITE | DESC_NEXT, 0);
                self.queue.push(0);
            }
            Hostile::Addr | Hostile::Len => {
                let (addr, len) = if how == Hostile::Addr {
                    (0x7fff_0000_0000, 512)
                } else {
                    (self.data, u32::MAX)
                };
                self.queue.set_desc(0, self.header, 16, DESC_NEXT, 1);
                self.queue.set_desc(1, addr, len, DESC_WRITE | DESC_NEXT, 2);
                self.queue.set_desc(2, status, 1, DESC_WRITE, 0);
                self.queue.push(0);
            }
            Hostile::Index => self.queue.corrupt_avail_index(1000),
            Hostile::Status => self.dev.write_status(1),
        }
        self.dev.notify(0);
        for _ in 0..1000 {
            if self.dev.needs_reset() {
                return true;
            }
            crate::io::wait(1000);
        }
        false
    }
}
