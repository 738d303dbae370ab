//! What a device's own thread runs on itself before any work, as the VMM decides.
//!
//! Devices start threads (the console's flusher, each virtio device's I/O worker), but how
//! such a thread is confined (the seccomp filter of its kind) is the VMM's business, not
//! theirs: the VMM hands a [`ThreadSetup`] to the device it builds, and the device's thread
//! calls it first. So the devices crate never depends on the sandbox.

use std::sync::Arc;

/// The kinds of threads devices start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceThread {
    /// The process's console thread (writes out partial lines, rotates full logs).
    Console,
    /// A virtio device's I/O worker.
    VirtioWorker,
}

/// Run by a device thread on itself, before anything else. It cannot fail: a setup that
/// can (installing a filter) logs and lets the thread run on.
#[derive(Clone)]
pub struct ThreadSetup(Arc<dyn Fn(DeviceThread) + Send + Sync>);

impl ThreadSetup {
    pub fn new(setup: impl Fn(DeviceThread) + Send + Sync + 'static) -> Self {
        Self(Arc::new(setup))
    }

    /// Nothing: the thread runs as it was created (tests, fuzzing, a VMM without filters).
    pub fn none() -> Self {
        Self::new(|_| {})
    }

    /// Called by the device's thread, on itself.
    pub(crate) fn enter(&self, thread: DeviceThread) {
        (self.0)(thread)
    }
}

impl Default for ThreadSetup {
    fn default() -> Self {
        Self::none()
    }
}

impl std::fmt::Debug for ThreadSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadSetup")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_setup_is_told_which_kind_of_thread_calls_it() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let setup = ThreadSetup::new(move |t| record.lock().unwrap().push(t));
        setup.clone().enter(DeviceThread::VirtioWorker);
        setup.enter(DeviceThread::Console);
        assert_eq!(
            *seen.lock().unwrap(),
            [DeviceThread::VirtioWorker, DeviceThread::Console]
        );
    }
}
