//! Connections over a listener's budget: answered 503 with a JSON body, never reset.
//!
//! Closing a socket whose peer's request is still unread makes the kernel send a reset, and
//! a reset can destroy our answer before the client reads it. So one thread (not one per
//! connection: the budget exists to bound threads) takes every connection refused for lack
//! of room, reads what the client sends until its head is complete, writes the 503, shuts
//! its side down and keeps reading until the client closes (a lingering close), all within
//! [`LINGER`]. It holds at most [`MAX_LINGERING`] connections; past that a refused
//! connection gets the 503 at once and is closed (a reset is then possible, and counted).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::Response;

/// The longest a refused connection is kept to read its request and close gracefully.
pub const LINGER: Duration = Duration::from_millis(1000);
/// Refused connections held at once.
pub const MAX_LINGERING: usize = 512;
/// Request bytes read (and dropped) from a refused connection at most.
const MAX_READ: usize = 64 * 1024;

/// A byte stream the overflow thread can poll.
pub trait Stream: Read + Write + AsRawFd + Send + 'static {
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Stream for std::os::unix::net::UnixStream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_nonblocking(self, on)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl Stream for std::net::TcpStream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        std::net::TcpStream::set_nonblocking(self, on)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Figures of refused connections (for the metrics).
#[derive(Debug, Default)]
pub struct OverflowStats {
    /// Connections answered 503 for lack of room.
    pub refused: AtomicU64,
    /// Of those, connections closed at once because the overflow thread was full.
    pub closed_unread: AtomicU64,
}

struct Refused {
    stream: Box<dyn Stream>,
    message: &'static str,
    since: Instant,
    read: usize,
    /// The 503 is out and our side is shut: now waiting for the client's close.
    answered: bool,
}

/// The handle the server passes refused connections to.
pub struct Overflow {
    tx: SyncSender<Refused>,
    stats: Arc<OverflowStats>,
}

impl Overflow {
    /// Start the overflow thread.
    pub fn start(stats: Arc<OverflowStats>) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(MAX_LINGERING);
        std::thread::Builder::new()
            .name("warmvm-api-overflow".into())
            .stack_size(256 << 10)
            .spawn(move || {
                warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Api);
                run(rx)
            })?;
        Ok(Self { tx, stats })
    }

    /// Answer `stream` 503 with `message`, without a thread of its own.
    pub fn refuse(&self, stream: Box<dyn Stream>, message: &'static str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let refused = Refused {
            stream,
            message,
            since: Instant::now(),
            read: 0,
            answered: false,
        };
        match self.tx.try_send(refused) {
            Ok(()) => {}
            Err(TrySendError::Full(mut r)) | Err(TrySendError::Disconnected(mut r)) => {
                self.stats.closed_unread.fetch_add(1, Ordering::Relaxed);
                let _ = r.stream.set_nonblocking(true);
                let _ = answer(&mut r);
            }
        }
    }
}

fn answer(r: &mut Refused) -> io::Result<()> {
    r.answered = true;
    let mut out = Vec::with_capacity(256);
    Response::error(503, r.message).write_to(&mut out)?;
    // A 503 of ~200 bytes fits an empty socket buffer: one non-blocking write.
    r.stream.write_all(&out)?;
    r.stream.shutdown_write()
}

fn run(rx: Receiver<Refused>) {
    let mut held: VecDeque<Refused> = VecDeque::new();
    loop {
        if held.is_empty() {
            match rx.recv() {
                Ok(r) => held.push_back(r),
                Err(_) => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            held.push_back(r);
        }
        for r in held.iter_mut() {
            let _ = r.stream.set_nonblocking(true);
        }
        let mut fds: Vec<libc::pollfd> = held
            .iter()
            .map(|r| libc::pollfd {
                fd: r.stream.as_raw_fd() as RawFd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Short, so that new refusals (taken above) wait little.
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            tracing::warn!(error = %io::Error::last_os_error(), "overflow poll failed");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut keep = VecDeque::with_capacity(held.len());
        for (mut r, fd) in held.drain(..).zip(fds) {
            if step(&mut r, fd.revents != 0) {
                keep.push_back(r);
            }
        }
        held = keep;
    }
}

/// Advance one refused connection; false once it is done with (then dropped, i.e. closed).
fn step(r: &mut Refused, readable: bool) -> bool {
    let mut eof = false;
    if readable {
        let mut buf = [0u8; 4096];
        loop {
            match r.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    r.read += n;
                    // The end of a head: answer now (a body may follow; it is read and
                    // dropped while lingering).
                    if !r.answered
                        && buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                        && answer(r).is_err()
                    {
                        return false;
                    }
                    if r.read > MAX_READ {
                        eof = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
    }
    let late = r.since.elapsed() >= LINGER;
    if !r.answered && (eof || late || r.since.elapsed() >= LINGER / 2) && answer(r).is_err() {
        return false;
    }
    !(eof || late)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_refused_client_reads_a_json_503_not_a_reset() {
        let stats = Arc::new(OverflowStats::default());
        let overflow = Overflow::start(stats.clone()).unwrap();
        let mut clients = Vec::new();
        for _ in 0..50 {
            let (server, mut client) = UnixStream::pair().unwrap();
            // The request arrives after the refusal: its bytes must still be read, or the
            // close would reset.
            overflow.refuse(Box::new(server), "too many connections; try again");
            client
                .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            clients.push(client);
        }
        for mut c in clients {
            let mut out = Vec::new();
            c.read_to_end(&mut out).unwrap();
            let resp = crate::http::parse_response(&out).unwrap();
            assert_eq!(resp.status, 503);
            let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(v["error"], "too many connections; try again");
        }
        assert_eq!(stats.refused.load(Ordering::Relaxed), 50);
        assert_eq!(stats.closed_unread.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_silent_refused_client_still_gets_its_503_within_the_linger_time() {
        let overflow = Overflow::start(Arc::new(OverflowStats::default())).unwrap();
        let (server, mut client) = UnixStream::pair().unwrap();
        overflow.refuse(Box::new(server), "busy");
        client.set_read_timeout(Some(LINGER * 3)).unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).unwrap();
        assert_eq!(crate::http::parse_response(&out).unwrap().status, 503);
    }
}
