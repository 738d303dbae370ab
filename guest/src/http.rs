//! An HTTP/1.1 server with keep-alive over smoltcp, serving the files of the tar archive on
//! the guest's disk through the page cache, and `/stats` (cache hits and misses, uptime).
//! Everything it keeps lives in the guest's I/O area, so a warm reboot keeps connections,
//! half-sent responses and the cache as they were.

use core::fmt::Write;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use crate::blk::SECTOR;
use crate::cache::{Cache, PAGE};
use crate::disk::Disk;
use crate::net::NetDev;
use crate::time;

pub const PORT: u16 = 80;
pub const CONNS: usize = 8;
const RX_BUF: usize = 4096;
const TX_BUF: usize = 32 * 1024;
const REQ_MAX: usize = 2048;
const HEAD_MAX: usize = 512;
/// smoltcp sends no zero-window probes, and when its retransmission timer fires while it
/// sees no window it keeps no timer at all. A peer with nothing more to say (Linux, having
/// dropped segments for want of buffer, waits for them to be sent again) then leaves the
/// download stalled for good. A keep-alive probe on a connection with no timer draws the
/// peer's current window and restarts the flow within this interval.
const KEEP_ALIVE: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(500);

/// Bytes of the I/O area the server takes: its state, then the socket buffers.
pub const STATE_BYTES: u64 = 0x10000;
pub const AREA_BYTES: u64 = STATE_BYTES + (CONNS * (RX_BUF + TX_BUF)) as u64;

struct Conn {
    req: [u8; REQ_MAX],
    req_len: usize,
    head: [u8; HEAD_MAX],
    head_len: usize,
    head_sent: usize,
    /// Disk byte where the body starts, its size, and how much of it is sent.
    body_start: u64,
    body_len: u64,
    body_sent: u64,
    busy: bool,
    close_after: bool,
}

#[derive(Default)]
pub struct Stats {
    pub requests: u64,
    pub not_found: u64,
    pub bad_requests: u64,
    pub connections: u64,
}

pub struct Server {
    iface: Interface,
    sockets: SocketSet<'static>,
    handles: [SocketHandle; CONNS],
    conns: &'static mut [Conn; CONNS],
    pub dev: NetDev,
    pub cache: Cache,
    pub stats: Stats,
    was_open: [bool; CONNS],
}

const _: () = assert!(
    core::mem::size_of::<Server>() as u64
        + (CONNS * core::mem::size_of::<Conn>()) as u64
        + (CONNS * core::mem::size_of::<SocketStorage>()) as u64
        <= STATE_BYTES
);

fn now() -> Instant {
    Instant::from_micros((time::now_ns() / 1000) as i64)
}

/// Writes into a fixed buffer (no allocator here).
struct Buf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let b = s.as_bytes();
        let end = self
            .len
            .checked_add(b.len())
            .filter(|&e| e <= self.buf.len())
            .ok_or(core::fmt::Error)?;
        self.buf[self.len..end].copy_from_slice(b);
        self.len = end;
        Ok(())
    }
}

impl Server {
    /// Build the server in `area` (AREA_BYTES of the I/O area) over `dev`, with its cache.
    pub fn create(
        area: u64,
        mut dev: NetDev,
        cache: Cache,
        ip: [u8; 4],
        prefix: u8,
    ) -> &'static mut Server {
        let conns_at = area + core::mem::size_of::<Server>().next_multiple_of(64) as u64;
        let storage_at =
            conns_at + (CONNS * core::mem::size_of::<Conn>()).next_multiple_of(64) as u64;
        let bufs_at = area + STATE_BYTES;
        // SAFETY: every region below lies inside the server's part of the I/O area (the
        // assertion above bounds them), is suitably aligned, and is used by nothing else;
        // each is initialised here before a reference to it is made.
        unsafe {
            let conns = conns_at as *mut Conn;
            for i in 0..CONNS {
                let c = conns.add(i);
                core::ptr::addr_of_mut!((*c).req_len).write(0);
                core::ptr::addr_of_mut!((*c).head_len).write(0);
                core::ptr::addr_of_mut!((*c).head_sent).write(0);
                core::ptr::addr_of_mut!((*c).body_start).write(0);
                core::ptr::addr_of_mut!((*c).body_len).write(0);
                core::ptr::addr_of_mut!((*c).body_sent).write(0);
                core::ptr::addr_of_mut!((*c).busy).write(false);
                core::ptr::addr_of_mut!((*c).close_after).write(false);
            }
            let storage = storage_at as *mut SocketStorage<'static>;
            for i in 0..CONNS {
                storage.add(i).write(SocketStorage::EMPTY);
            }
            let storage: &'static mut [SocketStorage<'static>] =
                core::slice::from_raw_parts_mut(storage, CONNS);
            let mut sockets = SocketSet::new(storage);
            let mut handles = [SocketHandle::default(); CONNS];
            for (i, h) in handles.iter_mut().enumerate() {
                let base = bufs_at + (i * (RX_BUF + TX_BUF)) as u64;
                let rx: &'static mut [u8] =
                    core::slice::from_raw_parts_mut(base as *mut u8, RX_BUF);
                let tx: &'static mut [u8] =
                    core::slice::from_raw_parts_mut((base + RX_BUF as u64) as *mut u8, TX_BUF);
                let mut sock =
                    tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
                sock.set_keep_alive(Some(KEEP_ALIVE));
                let _ = sock.listen(PORT);
                *h = sockets.add(sock);
            }
            let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac)));
            config.random_seed = crate::cpu::rdtsc();
            let mut iface = Interface::new(config, &mut dev, now());
            iface.update_ip_addrs(|addrs| {
                let _ = addrs.push(IpCidr::new(
                    Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]).into(),
                    prefix,
                ));
            });
            let server = area as *mut Server;
            server.write(Server {
                iface,
                sockets,
                handles,
                conns: &mut *(conns_at as *mut [Conn; CONNS]),
                dev,
                cache,
                stats: Stats::default(),
                was_open: [false; CONNS],
            });
            &mut *server
        }
    }

    /// Move packets and serve requests until nothing more happens now. True if anything
    /// did.
    pub fn poll(&mut self, disk: &mut Disk) -> bool {
        let mut any = false;
        for _ in 0..64 {
            let changed = self.iface.poll(now(), &mut self.dev, &mut self.sockets)
                == smoltcp::iface::PollResult::SocketStateChanged;
            let served = self.serve(disk);
            self.dev.flush();
            if !changed && !served {
                break;
            }
            any = true;
        }
        any
    }

    /// How long smoltcp may sleep before it has timers to run, in µs.
    pub fn delay_us(&mut self) -> Option<u64> {
        self.iface
            .poll_delay(now(), &self.sockets)
            .map(|d| d.total_micros())
    }

    fn serve(&mut self, disk: &mut Disk) -> bool {
        let mut progress = false;
        for i in 0..CONNS {
            let sock = self.sockets.get_mut::<tcp::Socket>(self.handles[i]);
            let conn = &mut self.conns[i];
            if !sock.is_open() {
                // Closed (or never opened): listen again with a clean slate.
                conn.req_len = 0;
                conn.busy = false;
                let _ = sock.listen(PORT);
                self.was_open[i] = false;
                continue;
            }
            if !sock.is_active() {
                continue; // listening
            }
            if !self.was_open[i] {
                self.was_open[i] = true;
                self.stats.connections += 1;
            }
            if sock.can_recv() && conn.req_len < REQ_MAX {
                if let Ok(n) = sock.recv_slice(&mut conn.req[conn.req_len..]) {
                    conn.req_len += n;
                    progress |= n > 0;
                }
            }
            if !conn.busy {
                match request_end(&conn.req[..conn.req_len]) {
                    Some(end) => {
                        self.stats.requests += 1;
                        respond(conn, end, disk, &self.cache, &mut self.stats);
                        progress = true;
                    }
                    None if conn.req_len == REQ_MAX => {
                        self.stats.bad_requests += 1;
                        sock.abort();
                        continue;
                    }
                    None => {
                        // The client closed its side with no request pending: close ours.
                        if sock.state() == tcp::State::CloseWait {
                            sock.close();
                        }
                    }
                }
            }
            if conn.busy {
                progress |= send(sock, conn, disk, &mut self.cache);
                if !conn.busy && conn.close_after {
                    sock.close();
                }
            }
        }
        progress
    }
}

/// Where the request's head ends (after the blank line), if it has arrived.
fn request_end(req: &[u8]) -> Option<usize> {
    req.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Build the response to the request in `conn.req[..end]`, and drop that request from the
/// buffer (a pipelined next one stays).
fn respond(conn: &mut Conn, end: usize, disk: &mut Disk, cache: &Cache, stats: &mut Stats) {
    let head = &conn.req[..end];
    let line_end = head.iter().position(|&b| b == b'\r').unwrap_or(0);
    let mut parts = head[..line_end].split(|&b| b == b' ');
    let method = parts.next().unwrap_or(b"");
    let path = parts.next().unwrap_or(b"");
    let version = parts.next().unwrap_or(b"");
    let keep_alive = if version == b"HTTP/1.0" {
        contains_ci(head, b"\r\nconnection: keep-alive")
    } else {
        !contains_ci(head, b"\r\nconnection: close")
    };
    let head_only = method == b"HEAD";
    conn.close_after = !keep_alive;
    conn.body_start = 0;
    conn.body_len = 0;
    conn.body_sent = 0;
    conn.head_sent = 0;
    let mut out = Buf {
        buf: &mut conn.head,
        len: 0,
    };
    let conn_hdr = if keep_alive { "keep-alive" } else { "close" };
    if method != b"GET" && !head_only {
        stats.bad_requests += 1;
        conn.close_after = true;
        let _ = write!(
            out,
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    } else if path == b"/stats" {
        let mut body = [0u8; 256];
        let mut b = Buf {
            buf: &mut body,
            len: 0,
        };
        let _ = writeln!(
            b,
            "{{\"hits\":{},\"misses\":{},\"pages_filled\":{},\"cache_pages\":{},\"requests\":{},\"connections\":{},\"uptime_ms\":{}}}",
            cache.hits,
            cache.misses,
            cache.filled,
            cache.capacity(),
            stats.requests,
            stats.connections,
            time::now_ns() / 1_000_000
        );
        let n = b.len;
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            n, conn_hdr
        );
        if !head_only {
            let start = out.len;
            let end = (start + n).min(HEAD_MAX);
            out.buf[start..end].copy_from_slice(&body[..end - start]);
            out.len = end;
        }
    } else {
        let name = match path {
            b"/" => &b"index.html"[..],
            p => p.strip_prefix(b"/").unwrap_or(p),
        };
        match disk.find(name) {
            Some(e) => {
                let _ = write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
                    content_type(name),
                    e.size,
                    conn_hdr
                );
                if !head_only {
                    conn.body_start = e.sector * SECTOR;
                    conn.body_len = e.size;
                }
            }
            None => {
                stats.not_found += 1;
                let _ = write!(
                    out,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: {}\r\n\r\n",
                    conn_hdr
                );
            }
        }
    }
    conn.head_len = out.len;
    conn.busy = true;
    conn.req.copy_within(end..conn.req_len, 0);
    conn.req_len -= end;
}

fn content_type(name: &[u8]) -> &'static str {
    if name.ends_with(b".html") {
        "text/html"
    } else if name.ends_with(b".txt") {
        "text/plain"
    } else {
        "application/octet-stream"
    }
}

/// Send what fits of the response; true if anything was sent.
fn send(
    sock: &mut tcp::Socket<'static>,
    conn: &mut Conn,
    disk: &mut Disk,
    cache: &mut Cache,
) -> bool {
    let mut progress = false;
    while conn.head_sent < conn.head_len && sock.can_send() {
        match sock.send_slice(&conn.head[conn.head_sent..conn.head_len]) {
            Ok(0) | Err(_) => return progress,
            Ok(n) => {
                conn.head_sent += n;
                progress = true;
            }
        }
    }
    while conn.head_sent == conn.head_len && conn.body_sent < conn.body_len && sock.can_send() {
        let at = conn.body_start + conn.body_sent;
        let page = match cache.get(disk.blk(), at / PAGE) {
            Ok(p) => p,
            Err(_) => {
                // The disk failed us: end the connection rather than send wrong bytes.
                sock.abort();
                conn.busy = false;
                return true;
            }
        };
        let off = (at % PAGE) as usize;
        let take = ((PAGE as usize - off) as u64).min(conn.body_len - conn.body_sent) as usize;
        match sock.send_slice(&page[off..off + take]) {
            Ok(0) | Err(_) => return progress,
            Ok(n) => {
                conn.body_sent += n as u64;
                progress = true;
            }
        }
    }
    if conn.head_sent == conn.head_len && conn.body_sent == conn.body_len {
        conn.busy = false;
    }
    progress
}
