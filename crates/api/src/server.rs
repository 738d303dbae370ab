//! The API server: a poll(2) loop over the API socket, the optional loopback metrics port
//! and a stop pipe; one short-lived thread per connection.
//!
//! The server never owns how its Unix listener came to be: [`Server::new`] takes any
//! listening socket, bound by [`crate::socket::bind`] or adopted from an inherited fd by
//! [`crate::socket::listener_from_fd`], and [`Server::into_listener`] gives it back, so a warm
//! reboot can hand the very same socket to a new daemon and clients never see it close.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::http::{self, ReadError, Response, IO_TIMEOUT};
use crate::state::ApiState;

/// Most connections served at once; more get 503 straight away.
pub const MAX_CONNECTIONS: usize = 64;

/// A client connection on either listener.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn prepare(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Tests only: the main loop panics at its next turn.
#[cfg(feature = "fault-injection")]
pub(crate) static INJECT_MAIN_PANIC: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes [`Server::run`] return; usable from any thread.
#[derive(Debug)]
pub struct StopHandle(UnixStream);

impl StopHandle {
    pub fn stop(&self) {
        let _ = (&self.0).write(&[1]);
    }
}

pub struct Server {
    api: UnixListener,
    metrics: Option<TcpListener>,
    state: Arc<ApiState>,
    stop_rx: UnixStream,
    stop_tx: UnixStream,
}

impl Server {
    /// Serve `state` on `api`, a listening Unix socket.
    pub fn new(api: UnixListener, state: Arc<ApiState>) -> io::Result<Self> {
        api.set_nonblocking(true)?;
        let (stop_rx, stop_tx) = UnixStream::pair()?;
        stop_rx.set_nonblocking(true)?;
        stop_tx.set_nonblocking(true)?;
        Ok(Self {
            api,
            metrics: None,
            state,
            stop_rx,
            stop_tx,
        })
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
            // During a warm reboot, connections (API and metrics) wait in the backlog: for
            // the new daemon if the reboot succeeds, for this one again (checked every few
            // ms) if it fails.
            let rebooting = self.state.rebooting();
            let mut fds = [
                pollfd(self.stop_rx.as_raw_fd()),
                pollfd(if rebooting {
                    no_fd
                } else {
                    self.api.as_raw_fd()
                }),
                pollfd(match &self.metrics {
                    Some(l) if !rebooting => l.as_raw_fd(),
                    _ => no_fd,
                }),
            ];
            let timeout = if rebooting { 5 } else { -1 };
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
            if fds[1].revents != 0 && !self.state.rebooting() {
                self.accept_all(|| self.api.accept().map(|(s, _)| Conn::Unix(s)), false)?;
            }
            #[cfg(feature = "fault-injection")]
            if INJECT_MAIN_PANIC.swap(false, Ordering::AcqRel) {
                panic!("fault injected: a panic in the daemon's main loop");
            }
            if fds[2].revents != 0 && !self.state.rebooting() {
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
            // A warm reboot has begun: leave the rest in the backlog.
            if self.state.rebooting() {
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

    fn spawn(&self, mut conn: Conn, metrics_only: bool) {
        let active = &self.state.connections;
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.prepare();
            let _ = Response::error(503, "too many connections; try again").write_to(&mut conn);
            return;
        }
        let state = self.state.clone();
        /// Counts the connection as served however its thread ends, a panic included (a
        /// warm reboot waits for the count to drop).
        struct Served(Arc<ApiState>);
        impl Drop for Served {
            fn drop(&mut self) {
                self.0.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let spawned = std::thread::Builder::new()
            .name("warmvm-api".into())
            .stack_size(512 << 10)
            .spawn(move || {
                let served = Served(state);
                serve_connection(conn, &served.0, metrics_only);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
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

fn serve_connection(mut conn: Conn, state: &ApiState, metrics_only: bool) {
    if let Err(e) = conn.prepare() {
        tracing::debug!(error = %e, "cannot set up a connection");
        return;
    }
    match http::read_request(&mut conn) {
        Ok(req) => {
            let span = tracing::info_span!("request", method = %req.method, path = %req.path);
            let _enter = span.enter();
            let response = state.handle(&req, metrics_only);
            tracing::debug!(status = response.status, "answered");
            if let Err(e) = response.write_to(&mut conn) {
                tracing::debug!(error = %e, "cannot send the response");
            }
            if response.then_exit {
                // A warm reboot handed everything over: the VMs, the socket and the rest of
                // the work are the new daemon's. Exit without running any destructor (the
                // VMs must not be stopped, the socket file not removed).
                conn.shutdown_write();
                tracing::info!("handed over; exiting");
                std::process::exit(0);
            }
        }
        Err(ReadError::Reject { response, drain }) => {
            tracing::info!(status = response.status, "malformed request rejected");
            let _ = response.write_to(&mut conn);
            conn.shutdown_write();
            http::drain(&mut conn, drain);
        }
        Err(ReadError::Closed) => {}
        Err(ReadError::Io(e)) => tracing::debug!(error = %e, "connection failed"),
    }
}
