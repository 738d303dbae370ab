//! The thread that does a virtio device's I/O, and how the VMM pauses it.
//!
//! The worker sleeps on the device's notify eventfd (which KVM signals through an
//! ioeventfd, or the transport when the write reaches the VMM). The same eventfd wakes it
//! for orders: pause (finish the requests in hand, so the captured queue state has none
//! half done, then park), resume, stop. Requests the guest made available but the worker
//! had not popped stay in the ring and are picked up by whoever runs the device next.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use warmvm_lifecycle::{Next, NoHooks, Order, Parking, Pausable, ThreadState};

use super::VirtioShared;
use crate::thread_setup::{DeviceThread, ThreadSetup};

/// How long a worker may take to finish its requests in hand and park.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the worker thread of {name}: {err}")]
    Spawn { name: String, err: std::io::Error },
    #[error("cannot duplicate the notify eventfd of {name}: {err}")]
    EventFd { name: String, err: std::io::Error },
    #[error("the worker of {0} did not park within {PARK_TIMEOUT:?}")]
    Unresponsive(String),
    #[error("the worker of {0} has ended")]
    Exited(String),
}

/// The VMM's side of a worker thread.
pub struct Worker {
    parking: Arc<Parking>,
    notify: EventFd,
    thread: Option<JoinHandle<()>>,
    name: String,
}

/// One pass over the device's queues: pop, serve and complete what the guest made
/// available.
pub trait Serve: Send + 'static {
    /// Serve what is there. `true` when the pass stopped because the host side (a TAP)
    /// had nothing more, so the worker should also wake when `host_fd` becomes readable.
    fn serve(&mut self, shared: &VirtioShared) -> bool;
    /// The host fd whose readability is work for the device (a TAP), if any.
    fn host_fd(&self) -> Option<std::os::fd::RawFd>;
}

/// Sleep until the guest notifies (or the VMM orders), or, with `host`, until the host fd
/// is readable.
fn sleep(notify: &EventFd, host: Option<std::os::fd::RawFd>) -> std::io::Result<()> {
    let Some(host) = host else {
        return notify.read().map(drop);
    };
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: notify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: host,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll reads and writes the two pollfds, which outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if fds[0].revents != 0 {
        notify.read()?;
    }
    Ok(())
}

impl Worker {
    /// Start a worker that serves `shared` with `server` whenever `notify` is signalled,
    /// and once at once (notifications may have come while no worker ran: before a
    /// handover, say).
    pub fn start(
        shared: Arc<VirtioShared>,
        notify: &EventFd,
        mut server: Box<dyn Serve>,
        setup: ThreadSetup,
    ) -> Result<Self, WorkerError> {
        let name = shared.name.clone();
        let dup = |n: &EventFd| {
            n.try_clone().map_err(|err| WorkerError::EventFd {
                name: name.clone(),
                err,
            })
        };
        let thread_notify = dup(notify)?;
        let parking = Arc::new(Parking::new(Order::Run, ()));
        let thread_parking = parking.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{}", shared.name.replace('/', "-")))
            .spawn(move || {
                setup.enter(DeviceThread::VirtioWorker);
                let _exit = thread_parking.exit_mark();
                while let Ok(Next::Run) = thread_parking.next(&mut NoHooks) {
                    let wants_host = !shared.failed() && server.serve(&shared);
                    // Blocks until the guest notifies, the VMM gives an order or the host
                    // side has work.
                    let host = if wants_host { server.host_fd() } else { None };
                    if let Err(e) = sleep(&thread_notify, host) {
                        tracing::error!(device = %shared.name, error = %e, "notify eventfd failed; worker stops");
                        return;
                    }
                }
            })
            .map_err(|err| WorkerError::Spawn {
                name: name.clone(),
                err,
            })?;
        Ok(Self {
            parking,
            notify: dup(notify)?,
            thread: Some(thread),
            name,
        })
    }

    fn order(&self, order: Order) {
        self.parking.order(order);
        // Wakes the thread if it sleeps on the eventfd; a counter write cannot fail short of
        // overflowing 2^64 - 1 pending notifications.
        let _ = self.notify.write(1);
    }
}

impl Pausable for Worker {
    type Error = WorkerError;

    /// Finish the requests in hand and park. On return the queues are quiescent.
    fn pause(&self) -> Result<(), WorkerError> {
        self.order(Order::Pause);
        match self.parking.wait_parked(PARK_TIMEOUT) {
            Some(ThreadState::Parked) => Ok(()),
            Some(_) => Err(WorkerError::Exited(self.name.clone())),
            None => Err(WorkerError::Unresponsive(self.name.clone())),
        }
    }

    fn resume(&self) -> Result<(), WorkerError> {
        self.order(Order::Run);
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.order(Order::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
