//! The `virtio_queues` target: what a hostile guest can do to its virtio devices. A
//! virtio-blk device over a 64 KiB in-memory disk and a virtio-net device over a datagram
//! socket pair (whole frames, like a TAP, without root) share 64 KiB of guest RAM; the
//! input writes that RAM (descriptor tables, rings, buffers), programs and reads the
//! devices' registers, notifies their queues and sends frames from the host side.
//!
//! The devices serve their queues inline ([`VirtioMmio::new_inline`]): each notification
//! is processed on this thread before it returns, so a run is deterministic and cannot
//! wait on a worker. At the end each device must be in a state it would accept back in a
//! warm reboot's restore (a guest must never be able to make its VM impossible to hand
//! over), whether or not it ended DEVICE_NEEDS_RESET.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use warmvm_devices::virtio::block::{Block, CacheMode};
use warmvm_devices::virtio::mmio::{MmioHandles, VirtioBackend, VirtioMmio, QUEUE_NOTIFY};
use warmvm_devices::virtio::net::Net;
use warmvm_devices::virtio::VirtioCounters;
use warmvm_devices::GuestMemoryMmap;
use warmvm_devices::{Access, BusDevice, Doorbell, IrqLine, Persist, Wake};

/// Guest RAM: every ring address the input can name is inside it or just past it.
pub const RAM: usize = 64 << 10;
const DISK: u64 = 64 << 10;

/// One op of the input (the low bit of its first byte picks the device).
pub mod op {
    /// `[op, reg/4, v0, v1, v2, v3]`: a 32-bit register write.
    pub const WRITE: u8 = 0;
    /// `[op, reg/4]`: a 32-bit register read.
    pub const READ: u8 = 1;
    /// `[op, lo, hi, n, bytes...]`: `n` bytes into guest RAM at `lo | hi << 8`.
    pub const MEMORY: u8 = 2;
    /// `[op, queue]`: a write to QueueNotify.
    pub const NOTIFY: u8 = 3;
    /// `[op, size, base/256]`: the whole driver initialisation, queue `i` of `1 << size % 9`
    /// entries with its descriptor table at `base + i * 0x3000`, avail ring 0x1000 and
    /// used ring 0x2000 after it.
    pub const INIT: u8 = 4;
    /// `[op, n, bytes...]`: a frame of `n` bytes arrives on the net device's host side.
    pub const FRAME: u8 = 5;
    /// `[op, offset, width]`: a configuration-space read of 1, 2, 4 or 8 bytes.
    pub const CONFIG: u8 = 6;
    /// `[op]`: the driver resets the device (status 0).
    pub const RESET: u8 = 7;
}

fn memfd_disk() -> Option<File> {
    // SAFETY: a static NUL-terminated name; memfd_create has no memory side effects.
    let fd = unsafe { libc::memfd_create(c"warmvm-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(DISK).ok()?;
    Some(file)
}

fn handles(backend: Box<dyn VirtioBackend>, mem: &GuestMemoryMmap) -> MmioHandles {
    MmioHandles {
        name: "fuzz/dev".into(),
        backend,
        mem: mem.clone(),
        irq: IrqLine::none(),
        doorbell: Arc::new(Doorbell::default()),
        counters: Arc::new(VirtioCounters::default()),
        thread_setup: warmvm_devices::ThreadSetup::none(),
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

fn write(dev: &mut VirtioMmio, reg: u64, v: u32) {
    let _ = dev.write(reg, &v.to_le_bytes());
}

fn read(dev: &mut VirtioMmio, reg: u64, width: usize) {
    let mut buf = [0u8; 8];
    let access = Access {
        last_wake: Wake::Timeout,
    };
    let _ = dev.read(reg, &mut buf[..width], access);
}

/// What a well-behaved driver does, with the queue size and ring addresses the input
/// picks (so the fuzzer reaches the queues without having to find the sequence itself).
fn init(dev: &mut VirtioMmio, mem: &GuestMemoryMmap, size: u8, base: u8) {
    write(dev, 0x70, 0);
    write(dev, 0x70, 1);
    write(dev, 0x70, 3);
    for sel in 0..2 {
        write(dev, 0x14, sel);
        let mut f = [0u8; 4];
        let access = Access {
            last_wake: Wake::Timeout,
        };
        dev.read(0x10, &mut f, access);
        write(dev, 0x24, sel);
        write(dev, 0x20, u32::from_le_bytes(f));
    }
    write(dev, 0x70, 0xb);
    let base = u64::from(base) << 8;
    for q in 0..2u32 {
        let desc = base + u64::from(q) * 0x3000;
        write(dev, 0x30, q);
        let mut max = [0u8; 4];
        let access = Access {
            last_wake: Wake::Timeout,
        };
        dev.read(0x34, &mut max, access);
        if max == [0; 4] {
            break; // the block device has one queue
        }
        write(dev, 0x38, 1 << (size % 9));
        for (reg, addr) in [(0x80, desc), (0x90, desc + 0x1000), (0xa0, desc + 0x2000)] {
            write(dev, reg, addr as u32);
            write(dev, reg + 4, (addr >> 32) as u32);
        }
        let _ = mem.write_obj(0u16, GuestAddress(desc + 0x1002));
        let _ = mem.write_obj(0u16, GuestAddress(desc + 0x2002));
        write(dev, 0x44, 1);
    }
    write(dev, 0x70, 0xf);
}

/// Run the guest's ops in `data` on a virtio-blk and a virtio-net device.
pub fn virtio_queues(data: &[u8]) {
    run(data);
}

/// The devices (block, net) and guest RAM after `data`, or `None` if the host refused
/// the set-up (no memfd or socket: nothing of the input ran).
fn run(data: &[u8]) -> Option<([VirtioMmio; 2], GuestMemoryMmap)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).ok()?;
    let block = Block::new(memfd_disk()?, false, CacheMode::Writeback, "fuzz-disk").ok()?;
    let (ours, theirs) = UnixDatagram::pair().ok()?;
    ours.set_nonblocking(true).ok()?;
    theirs.set_nonblocking(true).ok()?;
    let tap = File::from(OwnedFd::from(ours));
    let net = Net::new(tap, [2, 0, 0, 0, 0, 1]);
    let blk = VirtioMmio::new_inline(handles(Box::new(block), &mem)).ok()?;
    let net = VirtioMmio::new_inline(handles(Box::new(net), &mem)).ok()?;
    let mut devs = [blk, net];
    let mut input = Input(data);
    while let Some(code) = input.byte() {
        let dev = &mut devs[usize::from(code & 1)];
        match (code >> 1) % 8 {
            op::WRITE => {
                let reg = u64::from(input.byte().unwrap_or(0)) * 4;
                let v = input.bytes(4);
                let mut b = [0u8; 4];
                b[..v.len()].copy_from_slice(v);
                write(dev, reg, u32::from_le_bytes(b));
            }
            op::READ => read(dev, u64::from(input.byte().unwrap_or(0)) * 4, 4),
            op::MEMORY => {
                let lo = input.byte().unwrap_or(0);
                let hi = input.byte().unwrap_or(0);
                let n = usize::from(input.byte().unwrap_or(0));
                let bytes = input.bytes(n);
                // Past the end of RAM, the write stops there (or fails): as for a guest.
                let _ = mem.write(bytes, GuestAddress(u64::from(u16::from_le_bytes([lo, hi]))));
            }
            op::NOTIFY => write(dev, QUEUE_NOTIFY, u32::from(input.byte().unwrap_or(0) % 4)),
            op::INIT => {
                let size = input.byte().unwrap_or(4);
                let base = input.byte().unwrap_or(0);
                init(dev, &mem, size, base);
            }
            op::FRAME => {
                let n = usize::from(input.byte().unwrap_or(0));
                let frame = input.bytes(n).to_vec();
                // A full socket drops the frame, as a full TAP queue would.
                let _ = theirs.send(&frame);
            }
            op::CONFIG => {
                let offset = 0x100 + u64::from(input.byte().unwrap_or(0));
                let width = 1 << (input.byte().unwrap_or(0) % 4);
                read(dev, offset, width);
            }
            _ => write(dev, 0x70, 0),
        }
    }
    // Drain what the net device transmitted, so nothing depends on the socket's buffer.
    let mut frame = [0u8; 2048];
    while theirs.recv(&mut frame).is_ok() {}
    for dev in &devs {
        let state = dev.save();
        let Ok(backend) = dev.try_clone_backend() else {
            continue;
        };
        let loaded = VirtioMmio::new(handles(backend, &mem)).and_then(|mut d| d.load(&state));
        if let Err(e) = loaded {
            panic!("a device saved a state it refuses to restore: {e}\n{state:?}");
        }
    }
    Some((devs, mem))
}

/// Guest RAM layout of the seeds: the block device's rings at 0 (descriptors, avail at
/// 0x1000, used at 0x2000), the net device's at 0x4000 (receive) and 0x7000 (transmit).
const BLK_HDR: u64 = 0xc000;
const BLK_DATA: u64 = 0xc200;
const BLK_STATUS: u64 = 0xc400;
const NET_TX: u64 = 0xd000;
const NET_RX: u64 = 0xe000;

fn memory_op(dev: u8, addr: u64, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![op::MEMORY << 1 | dev];
    v.extend_from_slice(&(addr as u16).to_le_bytes());
    v.push(bytes.len() as u8);
    v.extend_from_slice(bytes);
    v
}

fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

/// Make descriptor 0 available as the ring's first entry (flags 0, idx 1, ring[0] 0).
fn avail_first(dev: u8, avail: u64) -> Vec<u8> {
    memory_op(dev, avail, &[0, 0, 1, 0, 0, 0])
}

/// What real drivers do, as inputs: (file name, bytes).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    const BLK: u8 = 0;
    const NET: u8 = 1;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    // Read sector 3 of the disk: header, 512-byte buffer, status byte.
    let mut blk = vec![op::INIT << 1 | BLK, 4, 0];
    let mut chain = descriptor(BLK_HDR, 16, NEXT, 1);
    chain.extend(descriptor(BLK_DATA, 512, NEXT | WRITE, 2));
    chain.extend(descriptor(BLK_STATUS, 1, WRITE, 0));
    blk.extend(memory_op(BLK, 0, &chain));
    let mut hdr = [0u8; 16];
    hdr[8] = 3;
    blk.extend(memory_op(BLK, BLK_HDR, &hdr));
    blk.extend(avail_first(BLK, 0x1000));
    blk.extend([op::NOTIFY << 1 | BLK, 0, op::READ << 1 | BLK, 0x70 / 4]);
    blk.extend([op::CONFIG << 1 | BLK, 0, 3, op::RESET << 1 | BLK]);

    // Send a frame (12-byte header, then "hello"), then receive one from the host side.
    let mut net = vec![op::INIT << 1 | NET, 4, 0x40];
    net.extend(memory_op(NET, 0x7000, &descriptor(NET_TX, 17, 0, 0)));
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(b"hello");
    net.extend(memory_op(NET, NET_TX, &frame));
    net.extend(avail_first(NET, 0x8000));
    net.extend([op::NOTIFY << 1 | NET, 1]);
    net.extend(memory_op(NET, 0x4000, &descriptor(NET_RX, 2048, WRITE, 0)));
    net.extend(avail_first(NET, 0x5000));
    net.extend([op::FRAME << 1 | NET, 8]);
    net.extend_from_slice(b"hi there");
    net.extend([op::NOTIFY << 1 | NET, 0, op::CONFIG << 1 | NET, 0, 2]);
    vec![("blk-read", blk), ("net-tx-rx", net)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used_idx(mem: &GuestMemoryMmap, used: u64) -> u16 {
        mem.read_obj(GuestAddress(used + 2)).unwrap()
    }

    #[test]
    fn the_seeds_are_served_like_a_real_driver_and_garbage_fails_only_the_device() {
        let seeds = seeds();
        let (devs, mem) = run(&seeds[0].1).unwrap();
        assert_eq!(used_idx(&mem, 0x2000), 1, "the block read was not served");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(BLK_STATUS)).unwrap(), 0);
        assert_eq!(devs[0].save().status, 0, "the seed ends with a reset");

        let (devs2, mem) = run(&seeds[1].1).unwrap();
        assert_eq!(used_idx(&mem, 0x9000), 1, "the frame was not sent");
        assert_eq!(used_idx(&mem, 0x6000), 1, "the frame was not received");
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(NET_RX + 12)).unwrap();
        assert_eq!(&got, b"hi there");
        assert!(!devs2[1].save().needs_reset);

        // The block seed with its avail index jumped past the queue size.
        let mut bad = seeds[0].1.clone();
        bad.truncate(bad.len() - 8);
        bad.extend(memory_op(0, 0x1000, &[0, 0, 0xff, 0x7f]));
        bad.extend([op::NOTIFY << 1, 0]);
        let (devs3, mem) = run(&bad).unwrap();
        assert!(devs3[0].save().needs_reset);
        assert!(!devs3[1].save().needs_reset);
        assert_eq!(used_idx(&mem, 0x2000), 0);
    }
}
