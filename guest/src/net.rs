//! A polling virtio-net driver (ring 3) and its smoltcp device.
//!
//! Receive buffers are posted once and re-posted as smoltcp consumes their frames; transmit
//! buffers come from a free list and return to it when the device has used them. The
//! driver notifies the device at most once per poll for each queue.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::{Mmio, Queue, DESC_WRITE, QUEUE_BYTES};

pub const TYPE_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const QSIZE: u16 = 64;
const BUF: u64 = 2048;
const HDR: usize = 12;
const MTU: usize = 1514;
/// RAM the driver needs: two queues and their buffers.
pub const AREA_BYTES: u64 = 2 * QUEUE_BYTES + 2 * QSIZE as u64 * BUF;

struct Rx {
    queue: Queue,
    bufs: u64,
    repost: bool,
}

struct Tx {
    queue: Queue,
    bufs: u64,
    free: [u16; QSIZE as usize],
    free_count: usize,
    kick: bool,
}

pub struct NetDev {
    dev: Mmio,
    rx: Rx,
    tx: Tx,
    pub mac: [u8; 6],
    pub frames_in: u64,
    pub frames_out: u64,
}

impl NetDev {
    /// Set up the network device at `window`, using `area` (AREA_BYTES of free RAM).
    pub fn new(window: u64, area: u64) -> Result<Self, &'static str> {
        let dev = Mmio::new(window);
        if dev.device_type() != Some(TYPE_NET) {
            return Err("not a network device");
        }
        let rxq = Queue::new(area, QSIZE);
        let txq = Queue::new(area + QUEUE_BYTES, QSIZE);
        dev.init_queues(F_MAC, &[&rxq, &txq])?;
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = dev.config_u8(i as u64);
        }
        let mut net = Self {
            dev,
            rx: Rx {
                queue: rxq,
                bufs: area + 2 * QUEUE_BYTES,
                repost: false,
            },
            tx: Tx {
                queue: txq,
                bufs: area + 2 * QUEUE_BYTES + QSIZE as u64 * BUF,
                free: [0; QSIZE as usize],
                free_count: 0,
                kick: false,
            },
            mac,
            frames_in: 0,
            frames_out: 0,
        };
        for i in 0..QSIZE {
            net.tx.free[i as usize] = i;
            let addr = net.rx.bufs + u64::from(i) * BUF;
            net.rx.queue.set_desc(i, addr, BUF as u32, DESC_WRITE, 0);
            net.rx.queue.push(i);
        }
        net.tx.free_count = QSIZE as usize;
        net.dev.notify(0);
        Ok(net)
    }

    /// Give the device what this poll produced: re-posted receive buffers, new frames.
    pub fn flush(&mut self) {
        if self.rx.repost {
            self.rx.repost = false;
            self.dev.notify(0);
        }
        if self.tx.kick {
            self.tx.kick = false;
            self.dev.notify(1);
        }
        while let Some((id, _)) = self.tx.queue.pop_used() {
            if (id as usize) < QSIZE as usize && self.tx.free_count < QSIZE as usize {
                self.tx.free[self.tx.free_count] = id as u16;
                self.tx.free_count += 1;
            }
        }
    }
}

pub struct RxTok<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

pub struct TxTok<'a> {
    tx: &'a mut Tx,
    out: &'a mut u64,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let addr = self.rx.bufs + u64::from(self.id) * BUF;
        let len = self.len.saturating_sub(HDR).min(BUF as usize - HDR);
        // SAFETY: receive buffer `id` was used by the device (its frame is complete) and is
        // not posted again until after `f` returns.
        let frame = unsafe { core::slice::from_raw_parts((addr + HDR as u64) as *const u8, len) };
        let r = f(frame);
        self.rx
            .queue
            .set_desc(self.id, addr, BUF as u32, DESC_WRITE, 0);
        self.rx.queue.push(self.id);
        self.rx.repost = true;
        r
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx.free_count -= 1;
        let id = self.tx.free[self.tx.free_count];
        let addr = self.tx.bufs + u64::from(id) * BUF;
        let len = len.min(BUF as usize - HDR);
        // SAFETY: transmit buffer `id` came off the free list: the device is done with it
        // and nothing else uses it until it is pushed below.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, HDR + len) };
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..]);
        self.tx.queue.set_desc(id, addr, (HDR + len) as u32, 0, 0);
        self.tx.queue.push(id);
        self.tx.kick = true;
        *self.out += 1;
        r
    }
}

impl phy::Device for NetDev {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        if self.tx.free_count == 0 {
            self.flush();
            if self.tx.free_count == 0 {
                return None;
            }
        }
        let (id, len) = self.rx.queue.pop_used()?;
        if id >= u32::from(QSIZE) {
            return None;
        }
        self.frames_in += 1;
        Some((
            RxTok {
                rx: &mut self.rx,
                id: id as u16,
                len: len as usize,
            },
            TxTok {
                tx: &mut self.tx,
                out: &mut self.frames_out,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxTok<'_>> {
        if self.tx.free_count == 0 {
            self.flush();
            if self.tx.free_count == 0 {
                return None;
            }
        }
        Some(TxTok {
            tx: &mut self.tx,
            out: &mut self.frames_out,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(QSIZE as usize / 2);
        caps
    }
}

impl NetDev {
    /// Break the protocol as `how` says on the transmit queue (to test the VMM), and report
    /// whether the device then says it needs a reset. The device is unusable afterwards
    /// until a new `NetDev::new` resets it.
    pub fn misbehave(&mut self, how: crate::cmdline::Hostile) -> bool {
        use crate::cmdline::Hostile;
        use crate::virtio::DESC_NEXT;
        let q = &mut self.tx.queue;
        let buf = self.tx.bufs;
        match how {
            Hostile::Loop => {
                q.set_desc(0, buf, 64, DESC_NEXT, 1);
                q.set_desc(1, buf + BUF, 64, DESC_NEXT, 0);
                q.push(0);
            }
            // Far outside guest RAM.
            Hostile::Addr => {
                q.set_desc(0, 0x7fff_0000_0000, 64, 0, 0);
                q.push(0);
            }
            // In guest RAM, but twice the largest frame the device carries.
            Hostile::Len => {
                q.set_desc(0, buf, 2 * QSIZE as u32 * BUF as u32, 0, 0);
                q.push(0);
            }
            Hostile::Index => q.corrupt_avail_index(1000),
            // A fresh start that sets DRIVER_OK before FEATURES_OK.
            Hostile::Status => {
                self.dev.write_status(0);
                self.dev.write_status(1);
                self.dev.write_status(1 | 2 | 4);
            }
        }
        self.dev.notify(1);
        for _ in 0..1000 {
            if self.dev.needs_reset() {
                return true;
            }
            crate::io::wait(1000);
        }
        false
    }
}
