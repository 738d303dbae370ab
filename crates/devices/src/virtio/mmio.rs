//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): one 4 KiB register window per
//! device. Registers are 32-bit; the configuration space from 0x100 takes any width.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::status::*;
use super::worker::{Serve, Worker, WorkerError};
use super::{VirtioCounters, VirtioShared, F_VERSION_1};
use crate::bus::{Access, BusDevice};
use crate::persist::Persist;
use crate::thread_setup::ThreadSetup;
use crate::{Doorbell, IoAction, IrqLine};
use warmvm_lifecycle::Pausable;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register, where KVM's ioeventfd listens.
pub const QUEUE_NOTIFY: u64 = 0x50;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4d56_4d57; // "WMVM"
const CONFIG_SPACE: u64 = 0x100;

/// What a device behind the transport does.
/// Bytes of the configuration space past which the MMIO window ends (it starts at 0x100 of
/// a 0x1000-byte window).
const CONFIG_SPACE_LEN: usize = 0xf00;

/// [`VirtioBackend::read_config`] for a device whose configuration fields are `fields`:
/// bytes past them read as zero up to the end of the window; false beyond it.
pub fn read_config_fields(fields: &[u8], offset: u64, data: &mut [u8]) -> bool {
    let Some(end) = (offset as usize).checked_add(data.len()) else {
        return false;
    };
    if end > CONFIG_SPACE_LEN {
        return false;
    }
    for (i, b) in data.iter_mut().enumerate() {
        *b = fields.get(offset as usize + i).copied().unwrap_or(0);
    }
    true
}

pub trait VirtioBackend: Send {
    fn device_type(&self) -> u32;
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Read the configuration space; false if `offset`/`data` are outside it.
    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool;
    /// What serves the queues once the driver is ready: the transport runs it on a worker
    /// thread (or, for fuzzing, on the notifying thread).
    fn server(&mut self, mem: GuestMemoryMmap) -> Box<dyn Serve>;
    /// The device's own state (what is not queues or transport registers).
    fn save(&self) -> BackendState;
    /// The host file or TAP behind the device, to hand to another VMM process.
    fn host_fd(&self) -> std::os::fd::BorrowedFd<'_>;
    /// Another backend over the same host file or TAP (a dup of its fd).
    fn try_clone_backend(&self) -> std::io::Result<Box<dyn VirtioBackend>>;
    /// Whether a saved device state fits this device (the same disk, say).
    fn check_state(&self, state: &BackendState) -> Result<(), StateMismatch>;
}

/// Why a saved device state does not fit the device it is loaded into.
#[derive(Debug, thiserror::Error)]
pub enum StateMismatch {
    #[error("a {expected} device, not {found:?}")]
    Kind {
        expected: &'static str,
        found: Box<BackendState>,
    },
    #[error("disk of {saved} saved, {here} here")]
    Disk { saved: DiskShape, here: DiskShape },
    #[error("MAC {saved:02x?} saved, {here:02x?} here")]
    Mac { saved: [u8; 6], here: [u8; 6] },
}

/// A disk's size and access, as a state names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskShape {
    pub sectors: u64,
    pub read_only: bool,
}

impl std::fmt::Display for DiskShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let access = if self.read_only {
            "read-only"
        } else {
            "writable"
        };
        write!(f, "{} sectors ({access})", self.sectors)
    }
}

/// The device-specific part of a virtio device's state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendState {
    Block(super::block::BlockState),
    Net(super::net::NetState),
}

/// A queue's state: `virtio_queue::QueueState` as plain serde data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStateData {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueStateData {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueStateData> for virtio_queue::QueueState {
    fn from(q: QueueStateData) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio device's state: transport registers, queues, and the device's own part.
/// A device that was serving (DRIVER_OK) serves again from its first `resume`; requests in
/// flight at the pause were completed before the capture, and those the guest queued
/// since wait in the ring.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioMmioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueStateData>,
    pub backend: BackendState,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("virtio device {name}: {err}")]
    Queue {
        name: String,
        err: virtio_queue::Error,
    },
    #[error("virtio device {name}: saved state does not fit: {reason}")]
    BadState { name: String, reason: String },
    #[error("virtio device {name}: saved state does not fit: {source}")]
    Mismatch {
        name: String,
        #[source]
        source: StateMismatch,
    },
    #[error("cannot create the notify eventfd of {name}: {err}")]
    EventFd { name: String, err: std::io::Error },
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// What a virtio-mmio device needs beside its state.
pub struct MmioHandles {
    /// `<vm>/<device>`, for logs.
    pub name: String,
    pub backend: Box<dyn VirtioBackend>,
    pub mem: GuestMemoryMmap,
    pub irq: IrqLine,
    pub doorbell: Arc<Doorbell>,
    pub counters: Arc<VirtioCounters>,
    /// Run by the device's worker thread on itself before it serves (the VMM's filter).
    pub thread_setup: ThreadSetup,
}

/// One virtio device on the MMIO bus.
pub struct VirtioMmio {
    backend: Box<dyn VirtioBackend>,
    shared: Arc<VirtioShared>,
    notify: EventFd,
    mem: GuestMemoryMmap,
    engine: Option<Engine>,
    /// Serve on the notifying thread instead of a worker ([`VirtioMmio::new_inline`]).
    inline: bool,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// Rebuilds a restored device's handles; kept so a reset can create fresh queues.
    max_sizes: Vec<u16>,
    thread_setup: ThreadSetup,
}

/// Where a live device's requests are served.
enum Engine {
    /// On a worker thread of its own: how the VMM runs every device.
    Thread(Worker),
    /// On the thread that notifies, before the notification returns: deterministic, for
    /// fuzzing the device with adversarial guest memory.
    Inline(Box<dyn Serve>),
}

impl Engine {
    fn serve_inline(&mut self, shared: &VirtioShared) {
        if let Engine::Inline(server) = self {
            if !shared.failed() {
                // A host fd with nothing to read just ends the pass; there is no sleep here.
                server.serve(shared);
            }
        }
    }
}

fn new_queues(name: &str, max_sizes: &[u16]) -> Result<Vec<Queue>, VirtioError> {
    max_sizes
        .iter()
        .map(|&m| {
            Queue::new(m).map_err(|err| VirtioError::Queue {
                name: name.to_string(),
                err,
            })
        })
        .collect()
}

impl VirtioMmio {
    pub fn new(h: MmioHandles) -> Result<Self, VirtioError> {
        let max_sizes = h.backend.queue_max_sizes();
        let queues = new_queues(&h.name, &max_sizes)?;
        let notify = EventFd::new(libc::EFD_CLOEXEC).map_err(|err| VirtioError::EventFd {
            name: h.name.clone(),
            err,
        })?;
        Ok(Self {
            shared: Arc::new(VirtioShared::new(
                h.name, queues, h.irq, h.doorbell, h.counters,
            )),
            backend: h.backend,
            notify,
            mem: h.mem,
            engine: None,
            inline: false,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            max_sizes,
            thread_setup: h.thread_setup,
        })
    }

    /// A device that serves its queues on the thread that writes QueueNotify (or sets
    /// DRIVER_OK), before that write returns, and never starts a worker thread: the same
    /// request processing, deterministic, for the fuzz targets. The VMM never uses it.
    pub fn new_inline(h: MmioHandles) -> Result<Self, VirtioError> {
        let mut dev = Self::new(h)?;
        dev.inline = true;
        Ok(dev)
    }

    /// The eventfd a queue notification signals: the VMM registers it with KVM as an
    /// ioeventfd on [`QUEUE_NOTIFY`], so notifications need no exit to the VMM.
    pub fn notify_eventfd(&self) -> &EventFd {
        &self.notify
    }

    pub fn shared(&self) -> &Arc<VirtioShared> {
        &self.shared
    }

    pub fn device_type(&self) -> u32 {
        self.backend.device_type()
    }

    /// Fresh handles over the same memory and host file, as a restore in a test needs.
    #[cfg(test)]
    pub(crate) fn test_handles(&self) -> MmioHandles {
        crate::virtio::testing::handles(self.backend.try_clone_backend().unwrap(), &self.mem)
    }

    /// Another backend over the same host file or TAP, to restore this device's state into
    /// (what the fuzz target checks a guest cannot make impossible).
    pub fn try_clone_backend(&self) -> std::io::Result<Box<dyn VirtioBackend>> {
        self.backend.try_clone_backend()
    }

    fn offered(&self) -> u64 {
        self.backend.features() | F_VERSION_1
    }

    fn status_reg(&self) -> u32 {
        if self.shared.failed() {
            self.status | DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The device's standing and counters, for reports.
    pub fn info(&self) -> super::DeviceInfo {
        use std::sync::atomic::Ordering::Relaxed;
        let health = if self.shared.failed() {
            super::DeviceHealth::NeedsReset
        } else if self.status & FAILED != 0 {
            super::DeviceHealth::DriverFailed
        } else if self.status & DRIVER_OK != 0 {
            super::DeviceHealth::Ok
        } else {
            super::DeviceHealth::NotStarted
        };
        super::DeviceInfo {
            name: self
                .shared
                .name
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            device_type: self.device_type(),
            health,
            requests: self.shared.counters.requests.load(Relaxed),
            failures: self.shared.counters.failures.load(Relaxed),
        }
    }

    /// Stop the worker after it has finished its requests in hand (before a capture).
    pub fn pause(&self) -> Result<(), WorkerError> {
        match &self.engine {
            Some(Engine::Thread(w)) => Pausable::pause(w),
            Some(Engine::Inline(_)) | None => Ok(()),
        }
    }

    /// Serve again after [`VirtioMmio::pause`], or for the first time after a restore (only
    /// once this VMM owns the guest: a worker touches guest memory).
    pub fn resume(&mut self) {
        match &self.engine {
            Some(Engine::Thread(w)) => {
                // Never an error: resuming a worker is an order to it.
                let _ = Pausable::resume(w);
                return;
            }
            Some(Engine::Inline(_)) => return,
            None => {}
        }
        let serving =
            self.status & DRIVER_OK != 0 && self.status & FAILED == 0 && !self.shared.failed();
        if serving {
            if let Err(why) = self.activate() {
                self.fail(&why);
            }
        }
    }

    pub fn host_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.backend.host_fd()
    }

    fn fail(&mut self, why: &str) {
        // Stop touching guest memory and the host file until the driver resets us.
        self.shared.fail(&why);
    }

    fn reset(&mut self) {
        self.engine = None; // joins a worker thread
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shared.interrupt_status.store(0, Ordering::Release);
        self.shared.set_failed(false);
        let mut queues = self.shared.queues();
        for q in queues.iter_mut() {
            q.reset();
        }
    }

    fn selected_queue(&self) -> Option<usize> {
        let i = self.queue_sel as usize;
        (i < self.max_sizes.len()).then_some(i)
    }

    /// A write to a queue register: only while that queue is not live.
    fn write_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        let Some(i) = self.selected_queue() else {
            return self.fail("queue register written for a queue that does not exist");
        };
        if self.status & DRIVER_OK != 0 {
            return self.fail("queue register written after DRIVER_OK");
        }
        let mut queues = self.shared.queues();
        if queues[i].ready() {
            drop(queues);
            return self.fail("queue register written while the queue is ready");
        }
        f(&mut queues[i]);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        let old = self.status;
        let added = value & !old;
        if value & old != old {
            return self.fail("status bits cleared without a reset");
        }
        if value & !(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED) != 0 {
            return self.fail("unknown status bits written");
        }
        let has = |b| value & b != 0;
        if (has(DRIVER) && !has(ACKNOWLEDGE))
            || (has(FEATURES_OK) && !has(DRIVER))
            || (has(DRIVER_OK) && !has(FEATURES_OK))
        {
            return self.fail("status bits set out of order");
        }
        if added & FEATURES_OK != 0
            && (self.driver_features & !self.offered() != 0
                || self.driver_features & F_VERSION_1 == 0)
        {
            return self.fail("driver accepted features not offered, or not VERSION_1");
        }
        self.status = value;
        if added & FAILED != 0 {
            self.engine = None;
        }
        if added & DRIVER_OK != 0 {
            if let Err(why) = self.activate() {
                self.fail(&why);
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        {
            let queues = self.shared.queues();
            for (i, q) in queues.iter().enumerate() {
                if !q.ready() {
                    return Err(format!("DRIVER_OK with queue {i} not ready"));
                }
                if !q.is_valid(&self.mem) {
                    return Err(format!(
                        "queue {i}: rings outside guest RAM, misaligned or of a bad size"
                    ));
                }
            }
        }
        let server = self.backend.server(self.mem.clone());
        if self.inline {
            // As a worker does when it starts: serve what is already there.
            let mut engine = Engine::Inline(server);
            engine.serve_inline(&self.shared);
            self.engine = Some(engine);
            return Ok(());
        }
        let worker = Worker::start(
            self.shared.clone(),
            &self.notify,
            server,
            self.thread_setup.clone(),
        )
        .map_err(|e| e.to_string())?;
        self.engine = Some(Engine::Thread(worker));
        Ok(())
    }

    fn read_reg(&self, offset: u64) -> Option<u32> {
        let queue = || {
            self.selected_queue()
                .map(|i| self.shared.queues()[i].state())
        };
        Some(match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.backend.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            0x34 => queue().map_or(0, |q| q.max_size.into()),
            0x44 => queue().is_some_and(|q| q.ready).into(),
            0x60 => self.shared.interrupt_status.load(Ordering::Acquire),
            0x70 => self.status_reg(),
            0xfc => self.config_generation,
            _ => return None,
        })
    }

    fn write_reg(&mut self, offset: u64, v: u32) -> bool {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & FEATURES_OK != 0 {
                    self.fail("driver features written after FEATURES_OK");
                } else {
                    match self.driver_features_sel {
                        0 => self.driver_features = lo(self.driver_features),
                        1 => self.driver_features = hi(self.driver_features),
                        _ => {}
                    }
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => self.write_queue(|q| q.set_size(v as u16)),
            0x44 => {
                if v == 0 {
                    // Taking a queue back is only allowed through a reset here.
                    if self.status & DRIVER_OK != 0 {
                        self.fail("queue un-readied while the device runs");
                    }
                } else {
                    self.write_queue(|q| q.set_ready(true));
                }
            }
            QUEUE_NOTIFY => {
                // The write reached the VMM (no ioeventfd, or KVM let it through): pass it on.
                if v as usize >= self.max_sizes.len() {
                    self.fail("notification for a queue that does not exist");
                } else {
                    match &mut self.engine {
                        Some(Engine::Thread(_)) => {
                            let _ = self.notify.write(1);
                        }
                        Some(e @ Engine::Inline(_)) => e.serve_inline(&self.shared),
                        None => {}
                    }
                }
            }
            0x64 => {
                self.shared.interrupt_status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => self.write_status(v),
            0x80 => self.write_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.write_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.write_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.write_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.write_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.write_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => return false,
        }
        true
    }
}

impl BusDevice for VirtioMmio {
    fn read(&mut self, offset: u64, data: &mut [u8], _: Access) -> bool {
        if offset >= CONFIG_SPACE {
            return self.backend.read_config(offset - CONFIG_SPACE, data);
        }
        if data.len() != 4 {
            return false;
        }
        match self.read_reg(offset) {
            Some(v) => {
                data.copy_from_slice(&v.to_le_bytes());
                true
            }
            None => false,
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<IoAction> {
        if offset >= CONFIG_SPACE {
            // No device here has a writable configuration space.
            return None;
        }
        let v = u32::from_le_bytes(<[u8; 4]>::try_from(data).ok()?);
        self.write_reg(offset, v).then_some(IoAction::None)
    }
}

impl Persist for VirtioMmio {
    type State = VirtioMmioState;
    type Error = VirtioError;

    fn save(&self) -> VirtioMmioState {
        VirtioMmioState {
            device_type: self.backend.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.shared.interrupt_status.load(Ordering::Acquire),
            config_generation: self.config_generation,
            needs_reset: self.shared.failed(),
            queues: self
                .shared
                .queues()
                .iter()
                .map(|q| q.state().into())
                .collect(),
            backend: self.backend.save(),
        }
    }

    /// Load saved state into this device (keeping its backend, memory, interrupt line and
    /// notify eventfd, so an ioeventfd registered for it stays valid). Everything is
    /// checked before anything changes. The device does not serve until
    /// [`VirtioMmio::resume`].
    fn load(&mut self, s: &VirtioMmioState) -> Result<(), VirtioError> {
        let name = self.shared.name.clone();
        let bad = |reason: String| VirtioError::BadState {
            name: name.clone(),
            reason,
        };
        if s.device_type != self.backend.device_type() {
            return Err(bad(format!(
                "device type {} saved, {} here",
                s.device_type,
                self.backend.device_type()
            )));
        }
        self.backend
            .check_state(&s.backend)
            .map_err(|source| VirtioError::Mismatch {
                name: name.clone(),
                source,
            })?;
        let has = |b| s.status & b != 0;
        if (has(DRIVER) && !has(ACKNOWLEDGE))
            || (has(FEATURES_OK) && !has(DRIVER))
            || (has(DRIVER_OK) && !has(FEATURES_OK))
            || s.status & !(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED) != 0
        {
            return Err(bad(format!("impossible status {:#x}", s.status)));
        }
        let max_sizes = &self.max_sizes;
        if s.queues.len() != max_sizes.len() {
            return Err(bad(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                max_sizes.len()
            )));
        }
        let mut queues = Vec::new();
        for (i, (q, max)) in s.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != *max {
                return Err(bad(format!(
                    "queue {i}: max size {} saved, {max} here",
                    q.max_size
                )));
            }
            queues.push(
                Queue::try_from(virtio_queue::QueueState::from(*q))
                    .map_err(|e| bad(format!("queue {i}: {e}")))?,
            );
        }
        self.engine = None;
        let dev = self;
        *dev.shared.queues() = queues;
        dev.status = s.status;
        dev.device_features_sel = s.device_features_sel;
        dev.driver_features_sel = s.driver_features_sel;
        dev.driver_features = s.driver_features;
        dev.queue_sel = s.queue_sel;
        dev.config_generation = s.config_generation;
        dev.shared
            .interrupt_status
            .store(s.interrupt_status, Ordering::Release);
        dev.shared.set_failed(s.needs_reset);
        // No worker yet: `resume` starts one, which picks up at once whatever the guest
        // queued during the pause.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_read_as_themselves_then_zero_up_to_the_window_end() {
        let fields = [1u8, 2, 3, 4, 5, 6];
        let mut data = [0xffu8; 4];
        assert!(read_config_fields(&fields, 4, &mut data));
        assert_eq!(data, [5, 6, 0, 0]);
        let mut last = [0xffu8; 4];
        assert!(read_config_fields(&fields, 0xf00 - 4, &mut last));
        assert_eq!(last, [0; 4]);
        assert!(!read_config_fields(&fields, 0xf00 - 3, &mut last));
        assert!(!read_config_fields(&fields, u64::MAX, &mut last));
    }
}
