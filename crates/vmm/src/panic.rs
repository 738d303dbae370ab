//! Surviving the VMM's own bugs: a panic must never take the guests with it.
//!
//! A panic on a vCPU thread ends that VM only: the thread catches it, marks the VM
//! crashed with the panic's message and marks itself exited (so later reboots and stops
//! are not blocked waiting for it). A panic anywhere else (API, console, metrics, the
//! daemon's main loop) means the process itself can no longer be trusted: the hook
//! installed here reports it to the daemon, which warm-reboots into a fresh process, so
//! the VMs outlive the bug — the reactive rejuvenation ReHype does for Xen.

use std::any::Any;

/// Install a panic hook that prints the panic as usual and then, for a panic on any
/// thread but a vCPU's, calls `on_panic` with its description.
pub fn install_hook(on_panic: impl Fn(&str) + Send + Sync + 'static) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if !is_vcpu_thread() {
            let thread = std::thread::current();
            on_panic(&format!(
                "thread {}: {info}",
                thread.name().unwrap_or("unnamed")
            ));
        }
    }));
}

thread_local! {
    static VCPU_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread runs a vCPU (its panics end its VM, not the VMM).
pub fn is_vcpu_thread() -> bool {
    VCPU_THREAD.with(|v| v.get())
}

/// The calling thread runs a vCPU from now on.
pub(crate) fn mark_vcpu_thread() {
    VCPU_THREAD.with(|v| v.set(true));
}

/// A panic caught on a thread that must outlive it, as an error: what the panic said.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Panic {
    pub message: String,
}

impl Panic {
    /// The panic `payload` (what `catch_unwind` returns) carried.
    pub fn from_payload(payload: &(dyn Any + Send)) -> Self {
        Self {
            message: message(payload),
        }
    }
}

/// A panic payload's message.
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Tests only: make the process's console thread panic once.
#[cfg(feature = "fault-injection")]
pub fn inject_console_panic() {
    warmvm_devices::console::inject_panic();
}
