//! What other threads tell the server loop ([`crate::server::Server::run`]): stop, and in
//! test builds, panic. A leaf, so that the reboot and the operations can hold a
//! [`StopHandle`] without depending on the server.

use std::io::Write;
use std::os::unix::net::UnixStream;

/// Makes [`crate::server::Server::run`] return; usable from any thread.
#[derive(Debug)]
pub struct StopHandle(pub(crate) UnixStream);

impl StopHandle {
    pub fn stop(&self) {
        let _ = (&self.0).write(&[1]);
    }
}

/// Tests only: the main loop panics at its next turn.
#[cfg(feature = "fault-injection")]
pub(crate) static INJECT_MAIN_PANIC: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
