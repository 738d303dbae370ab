use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Why a wait ended, as the guest reads it back from the wait port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Wake {
    Timeout = warmvm_abi::WAKE_TIMEOUT,
    Event = warmvm_abi::WAKE_EVENT,
}

#[derive(Debug, Default)]
struct State {
    /// A device has work for the guest that no wait has reported yet.
    work_pending: bool,
    /// Bumped whenever the VMM wants waiting vCPUs back (pause, stop, handover).
    recall: u64,
}

/// Where a VM's waiting vCPUs sleep. Devices ring it when they have work for the guest; the
/// VMM recalls sleepers when it needs the vCPU threads. Level-triggered for device work, so
/// work that arrives just before a wait is not missed.
#[derive(Debug, Default)]
pub struct Doorbell {
    state: Mutex<State>,
    cv: Condvar,
}

/// How a [`Doorbell::wait`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEnd {
    Timeout,
    DeviceWork,
    Recalled,
}

impl Doorbell {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device has work for the guest.
    pub fn ring(&self) {
        self.lock().work_pending = true;
        self.cv.notify_all();
    }

    /// Wake every sleeping vCPU so its thread can serve the VMM.
    pub fn recall(&self) {
        self.lock().recall += 1;
        self.cv.notify_all();
    }

    /// The recall generation; pass it to [`Doorbell::wait`] so a recall that happened
    /// after the vCPU last checked its orders is not slept through.
    pub fn recall_generation(&self) -> u64 {
        self.lock().recall
    }

    /// Sleep until `deadline` (None: no deadline), device work, or a recall newer than
    /// `seen_recall`.
    pub fn wait(&self, deadline: Option<Instant>, seen_recall: u64) -> WaitEnd {
        let mut s = self.lock();
        loop {
            if s.recall != seen_recall {
                return WaitEnd::Recalled;
            }
            if s.work_pending {
                s.work_pending = false;
                return WaitEnd::DeviceWork;
            }
            match deadline {
                None => s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return WaitEnd::Timeout;
                    }
                    s = self
                        .cv
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn work_rung_before_the_wait_is_not_missed() {
        let d = Doorbell::default();
        d.ring();
        assert_eq!(d.wait(None, d.recall_generation()), WaitEnd::DeviceWork);
    }

    #[test]
    fn timeout_and_recall_end_a_wait() {
        let d = Arc::new(Doorbell::default());
        let t = Instant::now() + Duration::from_millis(5);
        assert_eq!(d.wait(Some(t), d.recall_generation()), WaitEnd::Timeout);
        let g = d.recall_generation();
        let d2 = d.clone();
        let h = std::thread::spawn(move || d2.wait(None, g));
        std::thread::sleep(Duration::from_millis(10));
        d.recall();
        assert_eq!(h.join().unwrap(), WaitEnd::Recalled);
    }
}
