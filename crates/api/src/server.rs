//! The API server: a poll(2) loop over the API socket, the optional loopback metrics port
//! and a stop pipe; one short-lived thread per connection, within each listener's own
//! budget ([`crate::limits`]); connections over a budget get a 503 from the overflow thread
//! ([`crate::overflow`]).
//!
//! The server never owns how its Unix listener came to be: [`Server::new`] takes any
//! listening socket, bound by [`crate::socket::bind`] or adopted from an inherited fd by
//! [`crate::socket::listener_from_fd`], and [`Server::into_listener`] gives it back, so a warm
//! reboot can hand the very same socket to a new daemon and clients never see it close.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::control::StopHandle;
#[cfg(feature = "fault-injection")]
use crate::control::INJECT_MAIN_PANIC;
use crate::http::{self, ReadError};
use crate::limits::Limits;
use crate::overflow::Overflow;
use crate::state::ApiState;

/// Most fds one API request may pass (SCM_RIGHTS): one TAP per interface, with room.
pub const MAX_REQUEST_FDS: usize = 16;

/// A client connection on either listener; on the API socket, with the fds the client
/// passed so far.
enum Conn {
    Unix(UnixStream, Vec<File>),
    Tcp(TcpStream),
}

impl Conn {
    fn prepare(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s, _) => s.set_nonblocking(false),
            Conn::Tcp(s) => s.set_nonblocking(false),
        }
    }

    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Unix(s, _) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn into_stream(self) -> Box<dyn crate::overflow::Stream> {
        match self {
            Conn::Unix(s, _) => Box::new(s),
            Conn::Tcp(s) => Box::new(s),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s, _) => s.shutdown(std::net::Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Conn {
    /// The fds the client passed with its request.
    fn take_fds(&mut self) -> Vec<File> {
        match self {
            Conn::Unix(_, fds) => std::mem::take(fds),
            Conn::Tcp(_) => Vec::new(),
        }
    }
}

/// Read from `s` like `read`, keeping the fds that come with the bytes (SCM_RIGHTS) in
/// `fds`, close-on-exec; more than [`MAX_REQUEST_FDS`] in all fail the connection.
fn recv_with_fds(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<File>) -> io::Result<usize> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut slots = [-1; MAX_REQUEST_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, writable for its whole length and alive for the call.
    let (n, count) = unsafe { s.recv_with_fds(&mut iov, &mut slots) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    for &fd in &slots[..count] {
        // SAFETY: recvmsg just installed these fds in this process for us; nothing else
        // knows of them, so the File owns each.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: F_SETFD only sets the close-on-exec flag of this open fd.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        fds.push(file);
    }
    if fds.len() > MAX_REQUEST_FDS {
        fds.clear();
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("more than {MAX_REQUEST_FDS} fds passed"),
        ));
    }
    Ok(n)
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s, fds) => recv_with_fds(s, buf, fds),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s, _) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s, _) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// A connection whose reads and writes must all end by one deadline: a client trickling
/// its request a byte at a time gets no more time than one sending it at once.
struct Deadlined {
    conn: Conn,
    deadline: Instant,
}

impl Deadlined {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request's deadline passed",
            ));
        }
        self.conn.set_timeouts(left)?;
        Ok(left)
    }

    /// Give the next phase (answering, draining) a deadline of its own.
    fn extend(&mut self, by: Duration) {
        self.deadline = Instant::now() + by;
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.remaining()?;
        self.conn.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.remaining()?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

pub struct Server {
    api: UnixListener,
    metrics: Option<TcpListener>,
    state: Arc<ApiState>,
    stop_rx: UnixStream,
    stop_tx: UnixStream,
    limits: Limits,
    /// Connections being served on the metrics port (the API socket's are the state's).
    metrics_active: Arc<AtomicUsize>,
    overflow: Overflow,
}

impl Server {
    /// Serve `state` on `api`, a listening Unix socket.
    pub fn new(api: UnixListener, state: Arc<ApiState>) -> io::Result<Self> {
        api.set_nonblocking(true)?;
        let (stop_rx, stop_tx) = UnixStream::pair()?;
        stop_rx.set_nonblocking(true)?;
        stop_tx.set_nonblocking(true)?;
        let overflow = Overflow::start(state.overflow_stats.clone())?;
        Ok(Self {
            api,
            metrics: None,
            state,
            stop_rx,
            stop_tx,
            limits: Limits::default(),
            metrics_active: Arc::new(AtomicUsize::new(0)),
            overflow,
        })
    }

    /// Serve within `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Also serve `GET /metrics` (and nothing else) on a TCP listener.
    pub fn with_metrics(mut self, listener: TcpListener) -> Result<Self, (Self, io::Error)> {
        if let Err(e) = listener.set_nonblocking(true) {
            return Err((self, e));
        }
        self.metrics = Some(listener);
        Ok(self)
    }

    /// The listening API socket's fd (to hand it to a new daemon; it stays ours).
    pub fn listener_fd(&self) -> RawFd {
        self.api.as_raw_fd()
    }

    /// The metrics listener's fd, if any (to hand it to a new daemon; it stays ours).
    pub fn metrics_fd(&self) -> Option<RawFd> {
        self.metrics.as_ref().map(|l| l.as_raw_fd())
    }

    pub fn state(&self) -> &Arc<ApiState> {
        &self.state
    }

    pub fn stop_handle(&self) -> io::Result<StopHandle> {
        Ok(StopHandle(self.stop_tx.try_clone()?))
    }

    /// Make each of `signals` stop the server (through a self-pipe: async-signal-safe).
    pub fn stop_on_signals(&self, signals: &[libc::c_int]) -> io::Result<()> {
        for &sig in signals {
            signal_hook::low_level::pipe::register(sig, self.stop_tx.try_clone()?)?;
        }
        Ok(())
    }

    /// Accept and serve connections until stopped. Requests already being served finish on
    /// their own threads.
    pub fn run(&self) -> io::Result<()> {
        let no_fd: RawFd = -1;
        loop {
            // During a reboot's handover, connections (API and metrics) wait in the backlog:
            // for the new daemon if the reboot succeeds, for this one again (checked every
            // few ms) if it fails. Before it (staging, saving, shutting guests down) they
            // are served: reads answer, changes are refused.
            let handing_over = self.state.handing_over();
            let mut fds = [
                pollfd(self.stop_rx.as_raw_fd()),
                pollfd(if handing_over {
                    no_fd
                } else {
                    self.api.as_raw_fd()
                }),
                pollfd(match &self.metrics {
                    Some(l) if !handing_over => l.as_raw_fd(),
                    _ => no_fd,
                }),
            ];
            let timeout = if handing_over { 5 } else { -1 };
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[0].revents != 0 {
                let mut buf = [0u8; 64];
                while matches!((&self.stop_rx).read(&mut buf), Ok(n) if n > 0) {}
                return Ok(());
            }
            if fds[1].revents != 0 && !self.state.handing_over() {
                self.accept_all(
                    || self.api.accept().map(|(s, _)| Conn::Unix(s, Vec::new())),
                    false,
                )?;
            }
            #[cfg(feature = "fault-injection")]
            if INJECT_MAIN_PANIC.swap(false, Ordering::AcqRel) {
                panic!("fault injected: a panic in the daemon's main loop");
            }
            if fds[2].revents != 0 && !self.state.handing_over() {
                if let Some(l) = &self.metrics {
                    self.accept_all(|| l.accept().map(|(s, _)| Conn::Tcp(s)), true)?;
                }
            }
        }
    }

    fn accept_all(
        &self,
        mut accept: impl FnMut() -> io::Result<Conn>,
        metrics_only: bool,
    ) -> io::Result<()> {
        loop {
            // Until the connection is counted (see `ApiState::accepting`).
            let _accepting = self
                .state
                .accepting
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // A reboot's handover has begun: leave the rest in the backlog.
            if self.state.handing_over() {
                return Ok(());
            }
            let conn = match accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer gave up before we accepted, or we are short of fds for now: not
                // a reason to stop serving.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return Ok(());
                }
            };
            self.spawn(conn, metrics_only);
        }
    }

    fn spawn(&self, conn: Conn, metrics_only: bool) {
        // Each listener its own budget: the metrics port (open to every local user) can
        // never take the API socket's.
        let (active, max) = if metrics_only {
            (&self.metrics_active, self.limits.metrics_connections)
        } else {
            (
                self.state.connections_counter(),
                self.limits.api_connections,
            )
        };
        if active.fetch_add(1, Ordering::SeqCst) >= max {
            active.fetch_sub(1, Ordering::SeqCst);
            let message = if metrics_only {
                "too many connections to the metrics port; try again"
            } else {
                "too many connections; try again"
            };
            self.overflow.refuse(conn.into_stream(), message);
            return;
        }
        let state = self.state.clone();
        /// Counts the connection as served however its thread ends, a panic included (a
        /// warm reboot waits for the API socket's count to drop).
        struct Served(Arc<AtomicUsize>);
        impl Drop for Served {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let served = Served(active.clone());
        let timeout = self.limits.request_timeout();
        let spawned = std::thread::Builder::new()
            .name("warmvm-api".into())
            .stack_size(512 << 10)
            .spawn(move || {
                let _served = served;
                warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Api);
                serve_connection(conn, &state, metrics_only, timeout);
            });
        if let Err(e) = spawned {
            // The closure, and with it `served`, was dropped: the count is back.
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }

    /// Give the listening socket back (e.g. to hand it to a new daemon).
    pub fn into_listener(self) -> UnixListener {
        self.api
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn serve_connection(conn: Conn, state: &ApiState, metrics_only: bool, timeout: Duration) {
    if let Err(e) = conn.prepare() {
        tracing::debug!(error = %e, "cannot set up a connection");
        return;
    }
    let mut conn = Deadlined {
        conn,
        deadline: Instant::now() + timeout,
    };
    match http::read_request(&mut conn) {
        Ok(req) => {
            let span = tracing::info_span!("request", method = %req.method, path = %req.path);
            let _enter = span.enter();
            let fds = conn.conn.take_fds();
            let response = state.handle_with_fds(&req, metrics_only, fds);
            tracing::debug!(status = response.status, "answered");
            conn.extend(timeout);
            if let Err(e) = response.write_to(&mut conn) {
                tracing::debug!(error = %e, "cannot send the response");
            }
            if response.then_exit {
                // A warm reboot handed everything over: the VMs, the socket and the rest of
                // the work are the new daemon's. Exit without running any destructor (the
                // VMs must not be stopped, the socket file not removed).
                conn.conn.shutdown_write();
                tracing::info!("handed over; exiting");
                std::process::exit(0);
            }
        }
        Err(ReadError::Reject { response, drain }) => {
            tracing::info!(status = response.status, "malformed request rejected");
            conn.extend(timeout);
            let _ = response.write_to(&mut conn);
            conn.conn.shutdown_write();
            http::drain(&mut conn, drain);
        }
        Err(ReadError::Closed) => {}
        Err(ReadError::Io(e)) => tracing::debug!(error = %e, "connection failed"),
    }
}
