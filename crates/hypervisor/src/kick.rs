//! Getting a vCPU thread out of KVM_RUN.
//!
//! The VMM sends a real-time signal to the vCPU's thread. The handler sets `immediate_exit`
//! in that vCPU's `kvm_run` page, which closes the race where the signal lands just before
//! the thread enters KVM_RUN: KVM then returns at once with EINTR instead of running the
//! guest until its next exit.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{Error, Result};

thread_local! {
    /// The `immediate_exit` byte of the vCPU that runs on this thread, if any.
    static IMMEDIATE_EXIT: Cell<*const AtomicU8> = const { Cell::new(std::ptr::null()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(|c| c.get());
    if !ptr.is_null() {
        // SAFETY: the pointer is set by `bind_immediate_exit` on this thread to the
        // `immediate_exit` byte of the vCPU mmap that this thread owns, and cleared before
        // that mapping goes away; an atomic store is async-signal-safe.
        unsafe { (*ptr).store(1, Ordering::SeqCst) };
    }
}

/// Install the kick handler once per process (idempotent).
pub fn install_kick_handler() -> Result<()> {
    static ONCE: std::sync::OnceLock<std::result::Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| Error::SignalHandler(vmm_sys_util::errno::Error::new(errno)))
}

/// Point this thread's kick handler at a vCPU's `immediate_exit` byte (null to unbind).
pub(crate) fn bind_immediate_exit(ptr: *const AtomicU8) {
    IMMEDIATE_EXIT.with(|c| c.set(ptr));
}

/// Kick the vCPU running on `thread` out of KVM_RUN.
pub fn kick_thread(thread: libc::pthread_t) -> Result<()> {
    // SAFETY: pthread_kill only sends a signal; a stale id is reported as ESRCH, which is
    // returned as an error rather than acted on.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        return Err(Error::Kick(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}
