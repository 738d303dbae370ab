//! virtio 1.x devices on the MMIO transport, built on rust-vmm's `virtio-queue`.
//!
//! The transport ([`mmio::VirtioMmio`]) decodes the register window on a vCPU thread; each
//! device's work happens on a worker thread of its own ([`worker`]). The two share a
//! [`VirtioShared`]: the queues, the interrupt status and whether the device has failed.
//!
//! A guest that breaks the protocol (a bad ring address, a looping or oversized descriptor
//! chain, status bits out of order) gets that device marked DEVICE_NEEDS_RESET: the device
//! stops touching guest memory and its host file until the driver resets it, one log line
//! is written per power of two of such failures, and a counter goes up. Nothing else in the
//! VMM or on the host is affected.

pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;
#[cfg(test)]
pub(crate) mod testing;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemory;

use crate::{Doorbell, IrqLine};

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// VIRTIO_F_VERSION_1: every device offers it, and a driver must accept it (no legacy).
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Device ids (virtio 1.x, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// How a virtio device stands with its driver, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceHealth {
    /// The driver set DRIVER_OK and the device serves.
    Ok,
    /// The guest broke the protocol: DEVICE_NEEDS_RESET until the driver resets it.
    NeedsReset,
    /// The driver itself gave up on the device (it set FAILED).
    DriverFailed,
    /// No driver has finished setting the device up (since boot or its last reset).
    NotStarted,
}

impl DeviceHealth {
    /// The name the reports use.
    pub fn name(self) -> &'static str {
        match self {
            DeviceHealth::Ok => "ok",
            DeviceHealth::NeedsReset => "needs-reset",
            DeviceHealth::DriverFailed => "driver-failed",
            DeviceHealth::NotStarted => "not-started",
        }
    }
}

/// One virtio device's standing and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `disk0`, `net0`, ...
    pub name: String,
    pub device_type: u32,
    pub health: DeviceHealth,
    pub requests: u64,
    pub failures: u64,
}

/// Failures and activity of one virtio device, for metrics.
#[derive(Debug, Default)]
pub struct VirtioCounters {
    /// Times the guest broke the protocol and the device was marked DEVICE_NEEDS_RESET.
    pub failures: AtomicU64,
    /// Requests completed (used-ring entries written).
    pub requests: AtomicU64,
}

/// What the transport and the device's worker share.
pub struct VirtioShared {
    /// `<vm>/<device>`, for logs.
    pub name: String,
    queues: Mutex<Vec<Queue>>,
    pub interrupt_status: AtomicU32,
    /// The device gave up on the guest until a reset.
    needs_reset: AtomicBool,
    pub counters: Arc<VirtioCounters>,
    irq: IrqLine,
    doorbell: Arc<Doorbell>,
}

impl VirtioShared {
    pub fn new(
        name: String,
        queues: Vec<Queue>,
        irq: IrqLine,
        doorbell: Arc<Doorbell>,
        counters: Arc<VirtioCounters>,
    ) -> Self {
        Self {
            name,
            queues: Mutex::new(queues),
            interrupt_status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            counters,
            irq,
            doorbell,
        }
    }

    pub fn queues(&self) -> MutexGuard<'_, Vec<Queue>> {
        // Queue state is plain indices and addresses, consistent between operations.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn failed(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    pub(crate) fn set_failed(&self, failed: bool) {
        self.needs_reset.store(failed, Ordering::Release);
    }

    /// Used buffers are there: raise the interrupt (Linux) and wake a polling guest that
    /// waits in the VMM.
    pub fn signal_used(&self) {
        self.interrupt_status
            .fetch_or(INT_USED_RING, Ordering::AcqRel);
        self.raise();
    }

    fn raise(&self) {
        if let Err(e) = vm_superio::Trigger::trigger(&self.irq) {
            tracing::debug!(device = %self.name, error = %e, "virtio interrupt could not be raised");
        }
        self.doorbell.ring();
    }

    /// The guest broke the protocol: mark the device DEVICE_NEEDS_RESET and tell the driver
    /// through a configuration interrupt.
    pub fn fail(&self, why: &dyn std::fmt::Display) {
        self.needs_reset.store(true, Ordering::Release);
        let n = self.counters.failures.fetch_add(1, Ordering::Relaxed) + 1;
        // A hostile guest can fail its device millions of times: log at powers of two.
        if n.is_power_of_two() {
            tracing::warn!(device = %self.name, failures = n, reason = %why,
                "guest broke the virtio protocol: device needs a reset");
        }
        self.interrupt_status.fetch_or(INT_CONFIG, Ordering::AcqRel);
        self.raise();
    }
}

/// The bytes a descriptor chain's buffers add up to, or `None` if the chain does not end:
/// `virtio-queue`'s iterator stops early without an error on a loop (it runs out of its
/// queue-size budget), a next index beyond the table or an unreadable descriptor, and a
/// device must not take such a chain for a shorter, valid one.
pub(crate) fn chain_bytes<M>(chain: &DescriptorChain<M>) -> Option<usize>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mut total = 0usize;
    let mut ended = false;
    for d in chain.clone() {
        if ended {
            return None;
        }
        total = total.saturating_add(d.len() as usize);
        ended = !d.has_next();
    }
    ended.then_some(total)
}
