//! virtio-net over a TAP device (virtio 1.x, 5.1): one receive and one transmit queue, no
//! offloads, served on the device's worker thread.
//!
//! A frame is read from the TAP only once the guest has a receive buffer for it, so no
//! frame ever waits inside the VMM: frames that arrive while the device is paused (a warm
//! reboot) stay in the TAP's queue for whichever VMM serves next. Transmitted frames are
//! written to the TAP before their buffers are returned.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};

use super::mmio::{read_config_fields, BackendState, StateMismatch, VirtioBackend};
use super::worker::Serve;
use super::{VirtioShared, TYPE_NET};

pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr with VERSION_1 (num_buffers included).
pub const HDR_BYTES: usize = 12;
/// Largest frame carried: a TAP's frames are at most its MTU plus the Ethernet header.
pub const MAX_FRAME: usize = 65536;

/// The network device's own state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
}

/// A virtio-net device over a TAP (or any fd that reads and writes whole frames).
pub struct Net {
    tap: Arc<File>,
    mac: [u8; 6],
}

impl Net {
    pub fn new(tap: File, mac: [u8; 6]) -> Self {
        Self {
            tap: Arc::new(tap),
            mac,
        }
    }
}

impl VirtioBackend for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        read_config_fields(&self.mac, offset, data)
    }

    fn server(&mut self, mem: GuestMemoryMmap) -> Box<dyn Serve> {
        Box::new(NetServer {
            tap: self.tap.clone(),
            mem,
            frame: vec![0; MAX_FRAME],
        })
    }

    fn save(&self) -> BackendState {
        BackendState::Net(NetState { mac: self.mac })
    }

    fn host_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.tap)
    }

    fn try_clone_backend(&self) -> std::io::Result<Box<dyn VirtioBackend>> {
        Ok(Box::new(Self {
            tap: Arc::new(self.tap.try_clone()?),
            mac: self.mac,
        }))
    }

    fn check_state(&self, state: &BackendState) -> Result<(), StateMismatch> {
        match state {
            BackendState::Net(s) if s.mac == self.mac => Ok(()),
            BackendState::Net(s) => Err(StateMismatch::Mac {
                saved: s.mac,
                here: self.mac,
            }),
            other => Err(StateMismatch::Kind {
                expected: "network",
                found: Box::new(other.clone()),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Malformed {
    #[error("ring: {0}")]
    Ring(virtio_queue::Error),
    #[error("buffer outside guest RAM or a bad chain: {0}")]
    Chain(virtio_queue::Error),
    #[error("descriptor chain loops, has a bad index or lies outside guest RAM")]
    Unterminated,
    #[error("transmit buffer shorter than the virtio-net header")]
    ShortTx,
    #[error("frame of {0} bytes exceeds {MAX_FRAME}")]
    Oversized(usize),
    #[error("guest memory: {0}")]
    Io(std::io::Error),
}

struct NetServer {
    tap: Arc<File>,
    mem: GuestMemoryMmap,
    frame: Vec<u8>,
}

impl Serve for NetServer {
    fn serve(&mut self, shared: &VirtioShared) -> bool {
        match self.transmit(shared).and_then(|()| self.receive(shared)) {
            Ok(wants_tap) => wants_tap,
            Err(e) => {
                shared.fail(&e);
                false
            }
        }
    }

    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.tap.as_raw_fd())
    }
}

impl NetServer {
    fn transmit(&mut self, shared: &VirtioShared) -> Result<(), Malformed> {
        let mem = self.mem.clone();
        let mut queues = shared.queues();
        let q = &mut queues[TX];
        let mut sent = 0u64;
        loop {
            let chains: Vec<_> = q.iter(&mem).map_err(Malformed::Ring)?.collect();
            if chains.is_empty() {
                break;
            }
            for chain in chains {
                let head = chain.head_index();
                super::chain_bytes(&chain).ok_or(Malformed::Unterminated)?;
                let mut reader = Reader::new(&mem, chain).map_err(Malformed::Chain)?;
                let total = reader.available_bytes();
                if total < HDR_BYTES {
                    return Err(Malformed::ShortTx);
                }
                let len = total - HDR_BYTES;
                if len > MAX_FRAME {
                    return Err(Malformed::Oversized(len));
                }
                let mut hdr = [0u8; HDR_BYTES];
                reader.read_exact(&mut hdr).map_err(Malformed::Io)?;
                reader
                    .read_exact(&mut self.frame[..len])
                    .map_err(Malformed::Io)?;
                // A full TAP queue or a link that is down drops the frame, as a NIC would.
                if let Err(e) = (&*self.tap).write(&self.frame[..len]) {
                    tracing::trace!(device = %shared.name, error = %e, "TAP write dropped a frame");
                }
                q.add_used(&mem, head, 0).map_err(Malformed::Ring)?;
                sent += 1;
            }
        }
        drop(queues);
        if sent > 0 {
            shared.counters.requests.fetch_add(sent, Ordering::Relaxed);
            shared.signal_used();
        }
        Ok(())
    }

    /// Move frames from the TAP into receive buffers; `true` when the TAP ran dry (wake
    /// on it), `false` when the guest has no buffer left (wake on its notification).
    fn receive(&mut self, shared: &VirtioShared) -> Result<bool, Malformed> {
        let mem = self.mem.clone();
        let mut delivered = 0u64;
        let wants_tap = loop {
            let mut queues = shared.queues();
            let q = &mut queues[RX];
            let Some(chain) = q.iter(&mem).map_err(Malformed::Ring)?.next() else {
                break false;
            };
            // Checked before a frame is taken from the TAP, so a bad chain loses none.
            if super::chain_bytes(&chain).is_none() {
                return Err(Malformed::Unterminated);
            }
            let n = match (&*self.tap).read(&mut self.frame) {
                Ok(n) => n,
                Err(e) => {
                    // Nothing to read (or the TAP went away): give the buffer back unused.
                    q.go_to_previous_position();
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::debug!(device = %shared.name, error = %e, "TAP read failed");
                    }
                    break true;
                }
            };
            let head = chain.head_index();
            let mut writer = Writer::new(&mem, chain).map_err(Malformed::Chain)?;
            let used = if writer.available_bytes() >= HDR_BYTES + n {
                let mut hdr = [0u8; HDR_BYTES];
                hdr[10] = 1; // num_buffers
                writer.write_all(&hdr).map_err(Malformed::Io)?;
                writer.write_all(&self.frame[..n]).map_err(Malformed::Io)?;
                HDR_BYTES + n
            } else {
                // A buffer too small for the frame: the frame is dropped, as a NIC would.
                0
            };
            q.add_used(&mem, head, used as u32)
                .map_err(Malformed::Ring)?;
            delivered += 1;
        };
        if delivered > 0 {
            shared
                .counters
                .requests
                .fetch_add(delivered, Ordering::Relaxed);
            shared.signal_used();
        }
        Ok(wants_tap)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::persist::Persist;
    use crate::virtio::mmio::{VirtioMmio, QUEUE_NOTIFY};
    use crate::virtio::testing::*;
    use std::os::unix::net::UnixDatagram;
    use vm_memory::{Address, Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 7];
    const RXBUF: u64 = 0x20000;
    const TXBUF: u64 = 0x30000;

    /// A device whose "TAP" is one end of a datagram socket pair (whole frames, like a
    /// TAP); the test holds the other end.
    fn device(mem: &GuestMemoryMmap) -> (VirtioMmio, UnixDatagram) {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let tap = File::from(std::os::fd::OwnedFd::from(ours));
        let dev = VirtioMmio::new(handles(Box::new(Net::new(tap, MAC)), mem)).unwrap();
        (dev, theirs)
    }

    fn driver() -> (TestDriver, UnixDatagram) {
        let mem = memory();
        let (dev, peer) = device(&mem);
        let mut d = TestDriver::new(dev, mem);
        assert!(d.init());
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        (d, peer)
    }

    pub(crate) fn driven_device() -> VirtioMmio {
        let (mut d, peer) = driver();
        d.offer0(0, RXBUF, 2048);
        peer.send(b"frame").unwrap();
        assert!(eventually(|| d.used_idx() == 1));
        d.dev
    }

    #[test]
    fn frames_cross_in_both_directions_with_the_virtio_header() {
        let (mut d, peer) = driver();
        assert_eq!(
            d.r(0x100),
            u32::from_le_bytes([2, 0, 0, 0]),
            "MAC in config space"
        );
        let mut tx = vec![0u8; HDR_BYTES];
        tx.extend_from_slice(b"hello from the guest");
        d.mem.write_slice(&tx, GuestAddress(TXBUF)).unwrap();
        d.submit1(0, TXBUF, tx.len() as u32, false);
        let mut buf = [0u8; 100];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello from the guest");
        assert!(eventually(|| d.used_idx1() == 1));

        d.offer0(0, RXBUF, 2048);
        peer.send(b"hello from the host").unwrap();
        assert!(eventually(|| d.used_idx() == 1));
        let (id, len) = d.used0(0);
        assert_eq!((id, len as usize), (0, HDR_BYTES + 19));
        let mut got = vec![0u8; len as usize];
        d.mem.read_slice(&mut got, GuestAddress(RXBUF)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[HDR_BYTES..], b"hello from the host");
    }

    #[test]
    fn frames_wait_in_the_tap_until_the_guest_has_a_buffer_even_across_a_restore() {
        let (mut d, peer) = driver();
        peer.send(b"early-1").unwrap();
        peer.send(b"early-2").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.used_idx(), 0);
        // One buffer: one frame taken; the other stays in the TAP.
        d.offer0(0, RXBUF, 2048);
        assert!(eventually(|| d.used_idx() == 1));
        d.dev.pause().unwrap();
        let state = d.dev.save();
        let handles = d.dev.test_handles();
        let mem = d.mem.clone();
        drop(d);
        let mut restored = VirtioMmio::new(handles)
            .and_then(|mut d| d.load(&state).map(|()| d))
            .unwrap();
        restored.resume();
        let mut d = TestDriver::resume(restored, mem, 1);
        d.offer0(1, RXBUF + 4096, 2048);
        assert!(
            eventually(|| d.used_idx() == 2),
            "the second frame was lost"
        );
        let mut got = [0u8; 7];
        d.mem
            .read_slice(&mut got, GuestAddress(RXBUF + 4096 + HDR_BYTES as u64))
            .unwrap();
        assert_eq!(&got, b"early-2");
    }

    #[test]
    fn a_looping_chain_fails_the_device_and_sends_nothing() {
        let (mut d, peer) = driver();
        // Transmit: descriptor 0 chains to itself (virtio-queue's iterator would stop after
        // a queue's worth, and the 256 copies would go out as one frame).
        let desc = GuestAddress(QUEUE1);
        d.mem.write_obj(TXBUF, desc).unwrap();
        d.mem.write_obj(64u32, desc.unchecked_add(8)).unwrap();
        d.mem.write_obj(NEXT, desc.unchecked_add(12)).unwrap();
        d.mem.write_obj(0u16, desc.unchecked_add(14)).unwrap();
        let avail = QUEUE1 + 0x1000;
        d.mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        d.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        d.w(QUEUE_NOTIFY, 1);
        assert!(d.wait_failed());
        peer.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert!(peer.recv(&mut buf).is_err(), "nothing reached the TAP");
        assert_eq!(d.used_idx1(), 0);

        // Receive: the same loop in a receive buffer, once a frame is there.
        assert!(d.init());
        peer.send(b"frame").unwrap();
        d.set_desc(0, RXBUF, 64, WRITE | NEXT, 0);
        d.make_available(0);
        assert!(d.wait_failed());
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn a_transmit_buffer_shorter_than_the_header_fails_only_the_device() {
        let (mut d, peer) = driver();
        d.submit1(0, TXBUF, 4, false);
        assert!(d.wait_failed());
        peer.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert!(peer.recv(&mut buf).is_err(), "nothing reached the TAP");
        assert!(d.init());
    }

    #[test]
    fn a_looping_transmit_chain_fails_only_the_device() {
        let (mut d, peer) = driver();
        d.set_desc1(0, TXBUF, 64, NEXT, 1);
        d.set_desc1(1, TXBUF + 64, 64, NEXT, 0);
        d.make_available1(0);
        assert!(d.wait_failed());
        peer.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert!(peer.recv(&mut buf).is_err(), "no frame went out");
        assert!(d.init(), "a reset brings the device back");
    }

    #[test]
    fn a_transmit_buffer_larger_than_any_frame_fails_the_device() {
        let (mut d, _peer) = driver();
        d.submit1(0, TXBUF, (HDR_BYTES + MAX_FRAME + 1) as u32, false);
        assert!(d.wait_failed());
    }

    #[test]
    fn a_looping_receive_chain_fails_the_device_and_keeps_the_frame_in_the_tap() {
        let (mut d, peer) = driver();
        d.set_desc(0, RXBUF, 1024, WRITE | NEXT, 1);
        d.set_desc(1, RXBUF + 1024, 1024, WRITE | NEXT, 0);
        d.make_available(0);
        peer.send(b"kept").unwrap();
        assert!(d.wait_failed());
        assert_eq!(d.used_idx(), 0);
        assert!(d.init());
        d.offer0(0, RXBUF, 2048);
        assert!(eventually(|| d.used_idx() == 1), "the frame was lost");
        assert_eq!(d.used0(0).1 as usize, HDR_BYTES + 4);
    }
}

crate::persist_tests!(
    persist,
    tests::driven_device(),
    |dev: &crate::virtio::mmio::VirtioMmio| crate::virtio::mmio::VirtioMmio::new(
        dev.test_handles()
    )
    .expect("a device over the same backend")
);
