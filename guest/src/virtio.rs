//! A polling virtio-mmio driver core (virtio 1.x, split rings), for ring 3: no interrupts.
//! Every register access is an exit to the VMM (~26 µs here), so the driver touches
//! registers only to set up and to notify; completions are read from the used ring in RAM.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::io;

pub const TYPE_BLOCK: u32 = 2;
const MAGIC: u32 = 0x7472_6976;
const F_VERSION_1: u64 = 1 << 32;
const NOTIFY: u64 = 0x50;

pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

/// The window of the first virtio device of type `kind`, if the VM has one.
pub fn find(m: &crate::boot::Machine, kind: u32) -> Option<u64> {
    (0..u64::from(m.virtio_count))
        .map(|i| m.virtio_base + i * warmvm_abi::VIRTIO_MMIO_STRIDE)
        .find(|&w| Mmio::new(w).device_type() == Some(kind))
}

/// One device's register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    fn r(&self, offset: u64) -> u32 {
        // SAFETY: the window is identity-mapped as a user page by the VMM (boot info names
        // it and `Machine` checked it lies in the MMIO hole); the access exits to the VMM.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    fn w(&self, offset: u64, v: u32) {
        // SAFETY: as in `r`.
        unsafe { write_volatile((self.base + offset) as *mut u32, v) }
    }

    pub fn device_type(&self) -> Option<u32> {
        (self.r(0) == MAGIC && self.r(4) == 2).then(|| self.r(8))
    }

    /// Read a little-endian 64-bit field of the configuration space.
    pub fn config_u64(&self, offset: u64) -> u64 {
        u64::from(self.r(0x100 + offset)) | (u64::from(self.r(0x104 + offset)) << 32)
    }

    pub fn config_u8(&self, offset: u64) -> u8 {
        (self.r(0x100 + (offset & !3)) >> ((offset & 3) * 8)) as u8
    }

    /// Reset, negotiate `wanted` (plus VERSION_1) and set queue 0 up over `q`.
    pub fn init(&self, wanted: u64, q: &Queue) -> Result<u64, &'static str> {
        self.init_queues(wanted, &[q])
    }

    /// Reset, negotiate `wanted` (plus VERSION_1) and set queues 0.. up over `queues`.
    pub fn init_queues(&self, wanted: u64, queues: &[&Queue]) -> Result<u64, &'static str> {
        self.w(0x70, 0);
        self.w(0x70, 1);
        self.w(0x70, 1 | 2);
        self.w(0x14, 0);
        let lo = u64::from(self.r(0x10));
        self.w(0x14, 1);
        let offered = lo | (u64::from(self.r(0x10)) << 32);
        if offered & F_VERSION_1 == 0 {
            return Err("device is not virtio 1.x");
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.w(0x24, 0);
        self.w(0x20, accepted as u32);
        self.w(0x24, 1);
        self.w(0x20, (accepted >> 32) as u32);
        self.w(0x70, 1 | 2 | 8);
        if self.r(0x70) & 8 == 0 {
            return Err("device refused the features");
        }
        for (i, q) in queues.iter().enumerate() {
            self.w(0x30, i as u32);
            if self.r(0x34) < u32::from(q.size) {
                return Err("queue too small");
            }
            self.w(0x38, u32::from(q.size));
            for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
                self.w(reg, addr as u32);
                self.w(reg + 4, (addr >> 32) as u32);
            }
            self.w(0x44, 1);
        }
        self.w(0x70, 1 | 2 | 8 | 4);
        if self.r(0x70) & 0x40 != 0 {
            return Err("device needs a reset");
        }
        Ok(accepted)
    }

    pub fn notify(&self, queue: u32) {
        self.w(NOTIFY, queue);
    }

    /// Write the status register as is (the hostile test's "bits out of order").
    pub fn write_status(&self, v: u32) {
        self.w(0x70, v);
    }

    pub fn needs_reset(&self) -> bool {
        self.r(0x70) & 0x40 != 0
    }
}

/// A split virtqueue in guest RAM: descriptor table, avail and used rings, one page each.
pub struct Queue {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
}

/// Bytes of RAM a queue takes (three pages).
pub const QUEUE_BYTES: u64 = 3 * 4096;

impl Queue {
    /// A queue of `size` descriptors over three zeroed pages at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        let q = Self {
            size,
            desc: base,
            avail: base + 4096,
            used: base + 8192,
            next_avail: 0,
            last_used: 0,
        };
        // SAFETY: `base` is three pages of the I/O area, which only this driver uses.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, QUEUE_BYTES as usize) };
        q
    }

    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + u64::from(i) * 16;
        // SAFETY: descriptor `i` < size lies in the descriptor page, which the device reads
        // only after `push` publishes a chain that uses it.
        unsafe {
            write_volatile(d as *mut u64, addr);
            write_volatile((d + 8) as *mut u32, len);
            write_volatile((d + 12) as *mut u16, flags);
            write_volatile((d + 14) as *mut u16, next);
        }
    }

    /// Make the chain starting at `head` available (the caller notifies).
    pub fn push(&mut self, head: u16) {
        let slot = self.avail + 4 + u64::from(self.next_avail % self.size) * 2;
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: the avail ring page belongs to this queue; the device only reads it.
        unsafe {
            write_volatile(slot as *mut u16, head);
            fence(Ordering::Release);
            write_volatile((self.avail + 2) as *mut u16, self.next_avail);
        }
        fence(Ordering::SeqCst);
    }

    /// Publish an avail index `by` entries beyond what was made available (a driver bug).
    pub fn corrupt_avail_index(&mut self, by: u16) {
        // SAFETY: the avail ring page belongs to this queue.
        unsafe {
            write_volatile(
                (self.avail + 2) as *mut u16,
                self.next_avail.wrapping_add(by),
            )
        };
        fence(Ordering::SeqCst);
    }

    /// The next used element (descriptor id, bytes written), if the device has one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        // SAFETY: the used ring page belongs to this queue; the device writes it, so reads
        // are volatile and ordered after the index.
        unsafe {
            let idx = read_volatile((self.used + 2) as *const u16);
            if idx == self.last_used {
                return None;
            }
            fence(Ordering::Acquire);
            let e = self.used + 4 + u64::from(self.last_used % self.size) * 8;
            self.last_used = self.last_used.wrapping_add(1);
            Some((
                read_volatile(e as *const u32),
                read_volatile((e + 4) as *const u32),
            ))
        }
    }

    /// Wait for the next used element: spin a little (the device's worker runs on another
    /// host thread), then sleep in the VMM until a device rings. `None` after `timeout_ms`.
    pub fn wait_used(&mut self, timeout_ms: u64) -> Option<(u32, u32)> {
        for _ in 0..2000 {
            if let Some(u) = self.pop_used() {
                return Some(u);
            }
            core::hint::spin_loop();
        }
        // 200 µs slices: another vCPU may take the doorbell's wake-up meant for this one.
        for _ in 0..timeout_ms * 5 {
            io::wait(200);
            if let Some(u) = self.pop_used() {
                return Some(u);
            }
        }
        None
    }
}
