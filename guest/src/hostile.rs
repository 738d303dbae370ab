//! A guest that attacks its VMM (`hostile=console|ports|both|mmio|rings`), for the tests of
//! the VMM's bounds: nothing is verified, the vCPUs do only this, forever.
//!
//! - console, ports: every vCPU writes to the serial port, or to and from ports no device
//!   decodes, as fast as the exits allow.
//! - mmio: every vCPU reads and writes random registers of its virtio-mmio windows, and
//!   MMIO that nothing decodes, as fast as the exits allow.
//! - rings: vCPU 0 sets each virtio device up properly, then writes garbage into a ring and
//!   notifies, again and again: chains that loop, lengths of gigabytes, buffers outside
//!   RAM, avail indices far ahead, random descriptors. Every garbage is one the device must
//!   refuse by failing (DEVICE_NEEDS_RESET), and none lets a device write guest RAM. It
//!   reports on the console how many rounds failed the device and how many did not.

use core::ptr::{read_volatile, write_volatile};

use crate::boot::{Entry, Machine};
use crate::cmdline::spam::{CONSOLE, MMIO, PORTS, RINGS};
use crate::io;
use crate::virtio::{Mmio, Queue, DESC_NEXT, DESC_WRITE, QUEUE_BYTES, TYPE_BLOCK};

/// xorshift64: the garbage only has to be varied, not good.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn run(kinds: u8, m: &Machine, vcpu: u64) -> ! {
    if kinds & RINGS != 0 {
        if vcpu == 0 {
            rings(m)
        }
        loop {
            io::wait(warmvm_abi::WAIT_FOREVER);
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (vcpu + 1));
    let unmapped = unmapped_mmio(m);
    if vcpu == 0 && kinds & MMIO != 0 {
        say!(
            "warmvm-guest: hostile mmio: {} virtio windows, unmapped MMIO at {:#x}",
            m.virtio_count,
            unmapped.unwrap_or(0)
        );
    }
    loop {
        if kinds & CONSOLE != 0 {
            console_line();
        }
        if kinds & PORTS != 0 {
            ports(&mut rng, vcpu);
        }
        if kinds & MMIO != 0 {
            mmio(&mut rng, m, unmapped);
        }
    }
}

fn console_line() {
    const LINE: &[u8] =
        b"hostile guest spamming its console: the VMM must cap and rate-limit this\n";
    let serial = io::serial_port();
    for &b in LINE {
        io::outb(serial, b);
    }
}

/// Ports nothing decodes, spread over the space (the wait and power ports and COM1
/// excepted: those are the guest's own business).
fn ports(rng: &mut Rng, vcpu: u64) {
    for _ in 0..64 {
        let port = match rng.next() as u16 {
            0x3f8..=0x3ff | 0x510..=0x520 => 0x80,
            p => p,
        };
        io::outb(port, vcpu as u8);
        let _ = io::inb(port);
    }
}

/// An address the page tables map but no memory slot or device backs: with warmvm's direct
/// entry the tables map whole GiBs (all of the first 4 GiB once there are virtio windows);
/// the PVH stub's tables are its own, so there is none.
fn unmapped_mmio(m: &Machine) -> Option<u64> {
    const GIB: u64 = 1 << 30;
    if !matches!(m.entry, Entry::Direct) {
        return None;
    }
    if m.virtio_count > 0 {
        return Some(warmvm_abi::layout::MMIO_HOLE_START);
    }
    let ram_end = m.ram_ranges().iter().map(|r| r.start + r.len).max()?;
    let mapped_end = ram_end.div_ceil(GIB) * GIB;
    (mapped_end >= ram_end + 4096).then_some(mapped_end - 4096)
}

fn mmio(rng: &mut Rng, m: &Machine, unmapped: Option<u64>) {
    for _ in 0..64 {
        let r = rng.next();
        let addr = match unmapped {
            Some(u) if m.virtio_count == 0 || r & 1 == 0 => u + ((r >> 8) & 0xffc),
            _ if m.virtio_count > 0 => {
                let window = (r >> 32) % u64::from(m.virtio_count);
                m.virtio_base + window * warmvm_abi::VIRTIO_MMIO_STRIDE + ((r >> 8) & 0xffc)
            }
            _ => return,
        };
        let p = addr as *mut u32;
        // SAFETY: `addr` is in a virtio window (mapped by the VMM as a user page) or at an
        // address the page tables map but no memory backs (`unmapped_mmio`): either way the
        // access exits to the VMM and touches no guest memory.
        unsafe {
            if r & 2 == 0 {
                let _ = read_volatile(p);
            } else {
                write_volatile(p, (r >> 16) as u32);
            }
        }
    }
}

/// How one device fared.
#[derive(Clone, Copy, Default)]
struct Tally {
    failed: u64,
    missed: u64,
}

const QSIZE: u16 = 16;
/// Far outside any guest's RAM: no device may read or write there.
const NOWHERE: u64 = 1 << 40;

fn rings(m: &Machine) -> ! {
    let blk = crate::virtio::find(m, TYPE_BLOCK);
    let net = crate::virtio::find(m, crate::net::TYPE_NET);
    if blk.is_none() && net.is_none() {
        say!("warmvm-guest: hostile rings: no virtio device to attack");
        loop {
            io::wait(warmvm_abi::WAIT_FOREVER);
        }
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut tally = [Tally::default(); 2];
    let mut missed_kinds = 0u8;
    let mut rounds = 0u64;
    loop {
        for (i, window) in [blk, net].into_iter().enumerate() {
            let Some(window) = window else { continue };
            let kind = (rng.next() % KINDS as u64) as u8;
            match round(Mmio::new(window), i == 1, m.io_area, kind, &mut rng) {
                Some(true) => tally[i].failed += 1,
                Some(false) => {
                    tally[i].missed += 1;
                    missed_kinds |= 1 << kind;
                }
                None => {}
            }
            rounds += 1;
        }
        if rounds.is_power_of_two() && rounds >= 4 {
            let missed = tally[0].missed + tally[1].missed;
            say!(
                "warmvm-guest: hostile rings: {} rounds: {} made the device need a reset, {} did not (disk0 {}/{}, net0 {}/{}, kinds missed {:#x})",
                rounds,
                tally[0].failed + tally[1].failed,
                missed,
                tally[0].failed,
                tally[0].failed + tally[0].missed,
                tally[1].failed,
                tally[1].failed + tally[1].missed,
                missed_kinds
            );
        }
    }
}

const KINDS: u8 = 5;

/// One attack: set the device up (a reset first), write garbage of `kind` into a ring,
/// notify, and wait for the device to fail. `None` if the set-up itself failed.
fn round(dev: Mmio, net: bool, area: u64, kind: u8, rng: &mut Rng) -> Option<bool> {
    let mut rx = Queue::new(area, QSIZE);
    let mut tx = Queue::new(area + QUEUE_BYTES, QSIZE);
    let set_up = if net {
        dev.init_queues(0, &[&rx, &tx])
    } else {
        dev.init(0, &rx)
    };
    if set_up.is_err() {
        return None;
    }
    // The block device's one queue, or the net device's transmit queue (its receive queue
    // takes buffers only when a frame comes, so only an index jump fails it at once).
    let (q, index) = if net && !(kind == 3 && rng.next() & 1 == 0) {
        (&mut tx, 1)
    } else {
        (&mut rx, 0)
    };
    let r = rng.next();
    // A readable buffer inside the I/O area, for chains whose fault is elsewhere.
    let buf = area + 3 * QUEUE_BYTES;
    match kind {
        // A chain that loops back on itself.
        0 => {
            let n = 1 + (r % u64::from(QSIZE)) as u16;
            for i in 0..n {
                let next = if i + 1 == n {
                    (r >> 8) as u16 % n
                } else {
                    i + 1
                };
                q.set_desc(i, buf, 64, DESC_NEXT, next);
            }
            q.push(0);
        }
        // A length of gigabytes.
        1 => {
            q.set_desc(0, buf, 16, DESC_NEXT, 1);
            q.set_desc(1, buf, 0x8000_0000 | r as u32, DESC_NEXT, 2);
            q.set_desc(2, buf, 1, 0, 0);
            q.push(0);
        }
        // Buffers outside RAM.
        2 => {
            let n = 1 + (r % 3) as u16;
            for i in 0..n {
                let flags = if i + 1 == n { 0 } else { DESC_NEXT };
                let addr = NOWHERE | ((r >> 16) & 0xff_ffff_f000);
                q.set_desc(i, addr, 16 + (r >> 4) as u32 % 512, flags, i + 1);
            }
            q.push(0);
        }
        // An avail index far beyond what was made available.
        3 => q.corrupt_avail_index(QSIZE + 1 + (r % 1000) as u16),
        // Random descriptors (every buffer outside RAM), from a random head.
        _ => {
            for i in 0..QSIZE {
                let d = rng.next();
                let flags = (d as u16) & (DESC_NEXT | DESC_WRITE | 4);
                let addr = NOWHERE | ((d >> 8) & 0xff_ffff_fff0);
                q.set_desc(i, addr, (d >> 32) as u32, flags, (d >> 48) as u16);
            }
            q.push((r % u64::from(2 * QSIZE)) as u16);
        }
    }
    dev.notify(index);
    // A failing device rings the doorbell, which ends the wait early.
    for _ in 0..1000 {
        if dev.needs_reset() {
            return Some(true);
        }
        io::wait(1000);
    }
    Some(false)
}
