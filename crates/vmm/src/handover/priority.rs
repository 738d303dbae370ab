//! Keeping the thread that drives a handover from being preempted by busy vCPU threads.
//!
//! On a host with more busy vCPUs than cores, the thread that parks, captures, restores
//! and wakes the vCPUs competes with guest code for a core, and every time slice it waits
//! is blackout. For the few hundred microseconds of the handover it runs as SCHED_FIFO
//! (when the VMM may: root or CAP_SYS_NICE); vCPU threads are created before, so they do
//! not inherit it.

/// Raises the calling thread to SCHED_FIFO until dropped.
pub(crate) struct Realtime {
    previous: Option<(libc::c_int, libc::sched_param)>,
}

impl Realtime {
    pub(crate) fn enter() -> Self {
        let mut policy = 0;
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pthread_self is always valid; the out-pointers point to locals.
        let ok = unsafe {
            libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut param) == 0
        };
        if !ok {
            return Self { previous: None };
        }
        let fifo = libc::sched_param { sched_priority: 1 };
        // SAFETY: as above; failure (no permission) leaves the thread as it was.
        let raised = unsafe {
            libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &fifo) == 0
        };
        Self {
            previous: raised.then_some((policy, param)),
        }
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.previous.take() {
            // SAFETY: restores the policy this thread had before `enter`.
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), policy, &param) };
        }
    }
}
