//! A minimal virtio-mmio driver for tests: it programs the registers through the bus
//! interface, as a guest's MMIO accesses would, and builds descriptors in guest memory.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress};

use super::mmio::{MmioHandles, VirtioBackend, VirtioMmio, QUEUE_NOTIFY};
use super::status::*;
use super::VirtioCounters;
use crate::bus::{Access, BusDevice};
use crate::{Doorbell, IrqLine, Wake};

pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const DATA: u64 = 0x10000;
pub const QSIZE: u16 = 16;
pub const MEM_SIZE: usize = 4 << 20;
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn handles(backend: Box<dyn VirtioBackend>, mem: &GuestMemoryMmap) -> MmioHandles {
    MmioHandles {
        name: "test/dev".into(),
        backend,
        mem: mem.clone(),
        irq: IrqLine::none(),
        doorbell: Arc::new(Doorbell::default()),
        counters: Arc::new(VirtioCounters::default()),
        thread_setup: crate::ThreadSetup::none(),
    }
}

/// A scratch file of `sectors` sectors filled with `fill`, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(sectors: u64, fill: u8) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "warmvm-disk-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![fill; (sectors * 512) as usize]).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct TestDriver {
    pub dev: VirtioMmio,
    pub mem: GuestMemoryMmap,
    next_avail: u16,
    /// Queue 1 (a network device's transmit queue) lives at `QUEUE1` onwards.
    next_avail1: u16,
}

/// Queue 1's descriptor table; its avail and used rings follow a page apart each.
pub const QUEUE1: u64 = 0x5000;

impl TestDriver {
    pub fn new(dev: VirtioMmio, mem: GuestMemoryMmap) -> Self {
        Self::resume(dev, mem, 0)
    }

    /// Drive a device whose ring already holds `next_avail` requests.
    pub fn resume(dev: VirtioMmio, mem: GuestMemoryMmap, next_avail: u16) -> Self {
        Self {
            dev,
            mem,
            next_avail,
            next_avail1: 0,
        }
    }

    pub fn w(&mut self, offset: u64, v: u32) {
        self.dev.write(offset, &v.to_le_bytes());
    }

    pub fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        let access = Access {
            last_wake: Wake::Timeout,
        };
        assert!(self.dev.read(offset, &mut b, access), "read {offset:#x}");
        u32::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u32 {
        self.r(0x70)
    }

    pub fn needs_reset(&mut self) -> bool {
        self.status() & DEVICE_NEEDS_RESET != 0
    }

    /// Negotiate every offered feature and set up queue 0; `false` if the device refused.
    pub fn init(&mut self) -> bool {
        self.next_avail = 0;
        self.w(0x70, 0);
        assert_eq!(self.r(0), 0x7472_6976);
        assert_eq!(self.r(4), 2);
        self.w(0x70, ACKNOWLEDGE);
        self.w(0x70, ACKNOWLEDGE | DRIVER);
        for sel in 0..2 {
            self.w(0x14, sel);
            let f = self.r(0x10);
            self.w(0x24, sel);
            self.w(0x20, f);
        }
        self.w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.next_avail1 = 0;
        for (sel, (desc, avail, used)) in [
            (DESC, AVAIL, USED),
            (QUEUE1, QUEUE1 + 0x1000, QUEUE1 + 0x2000),
        ]
        .into_iter()
        .enumerate()
        {
            self.w(0x30, sel as u32);
            if self.r(0x34) == 0 {
                break;
            }
            assert!(self.r(0x34) >= u32::from(QSIZE));
            self.w(0x38, u32::from(QSIZE));
            for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                self.w(reg, addr as u32);
                self.w(reg + 4, (addr >> 32) as u32);
            }
            self.mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
            self.mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
            self.w(0x44, 1);
        }
        self.w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        !self.needs_reset()
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(DESC + u64::from(i) * 16);
        self.mem.write_obj(addr, base).unwrap();
        self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
    }

    /// Put a chain of `(addr, len, device-writable)` buffers in descriptors 0.. and make it
    /// available.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { NEXT } | if writable { WRITE } else { 0 };
            self.set_desc(i as u16, addr, len, flags, i as u16 + 1);
        }
        self.make_available(0);
    }

    pub fn make_available(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.next_avail % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
    }

    pub fn set_avail_idx(&mut self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
        self.w(QUEUE_NOTIFY, 0);
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Wait until the device has used `n` chains in total, or has failed; the used length
    /// of the last one.
    pub fn wait_used(&mut self, n: u16) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.used_idx() == n {
                let slot = USED + 4 + u64::from((n - 1) % QSIZE) * 8;
                return Some(self.mem.read_obj(GuestAddress(slot + 4)).unwrap());
            }
            if self.needs_reset() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Wait until the device reports DEVICE_NEEDS_RESET.
    pub fn wait_failed(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.needs_reset() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

impl TestDriver {
    /// Queue 1: put one buffer `(addr, len, device-writable)` in descriptor `i` and make
    /// it available.
    pub fn submit1(&mut self, i: u16, addr: u64, len: u32, writable: bool) {
        self.set_desc1(i, addr, len, if writable { WRITE } else { 0 }, 0);
        self.make_available1(i);
    }

    /// Queue 1's descriptor `i`.
    pub fn set_desc1(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = GuestAddress(QUEUE1 + u64::from(i) * 16);
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
    }

    /// Make the chain at queue 1's descriptor `i` available and notify.
    pub fn make_available1(&mut self, i: u16) {
        let avail = QUEUE1 + 0x1000;
        let slot = avail + 4 + u64::from(self.next_avail1 % QSIZE) * 2;
        self.mem.write_obj(i, GuestAddress(slot)).unwrap();
        self.next_avail1 = self.next_avail1.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail1, GuestAddress(avail + 2))
            .unwrap();
        self.w(QUEUE_NOTIFY, 1);
    }

    pub fn used_idx1(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(QUEUE1 + 0x2000 + 2))
            .unwrap()
    }

    /// Queue 0: put buffer `(addr, len)` for the device to write in descriptor `i`.
    pub fn offer0(&mut self, i: u16, addr: u64, len: u32) {
        self.set_desc(i, addr, len, WRITE, 0);
        self.make_available(i);
    }

    /// Queue 0's used element `n` (0-based): (descriptor id, length).
    pub fn used0(&self, n: u16) -> (u32, u32) {
        let slot = USED + 4 + u64::from(n % QSIZE) * 8;
        (
            self.mem.read_obj(GuestAddress(slot)).unwrap(),
            self.mem.read_obj(GuestAddress(slot + 4)).unwrap(),
        )
    }
}

/// Wait until `f` holds (5 s at most).
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}
