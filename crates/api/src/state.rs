//! The daemon's state: the [`Host`] behind its lock, the operations gate, the view readers
//! see during a reboot, the reboot's flags and progress, and the daemon's own figures.
//! What each operation does with it is [`crate::ops`]; how requests reach them,
//! [`crate::router`].
//!
//! All state lives in the [`Host`]: the VMs, their configs and their state directory. The
//! only other figures are the daemon's own (start time, pid), so a new daemon process that
//! adopts the VMs of an old one (warm reboot) rebuilds this from the Host alone.
//!
//! Locking rule: the Host lock is held only to look VMs up, create them, and remove them;
//! never while a VM pauses or stops (those wait for vCPU threads): handlers clone the
//! `Arc<Vm>` and drop the lock first. A reboot is the exception: it holds the Host lock
//! throughout, and first takes the operations gate for writing, so that it waits for every
//! pause, resume or stop under way (and none starts meanwhile); those take it for reading.
//! Order: the gate, then the Host lock.
//!
//! Readers never wait for a reboot: while one holds the Host lock (and while a new daemon
//! brings a saved or cold reboot's VMs back), it publishes the VMs it holds as a view,
//! which status, listing, showing a VM and the metrics read instead of the Host. Requests
//! that change anything are refused at once (409) while a reboot is under way, rather than
//! left waiting for the Host lock or the gate.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use warmvm_vmm::{Host, Vm};

use crate::aging::Monitor;
use crate::types::ModeReboot;
pub use crate::types::{
    DaemonStatus, RebootRequest, RestoreRequest, SnapshotRequest, StopRequest, TakeoverInfo,
    VmList, DEFAULT_STOP_GRACE_SECS, MAX_STOP_GRACE_SECS, READY_BUDGET_MS, REBOOT_TIMEOUT,
    STAGE_TIMEOUT_MS,
};

mod errors;
pub(crate) use errors::vm_error_status;
pub use errors::ApiError;
pub(crate) use errors::{file_status, snapshot_error_status};

/// How often a request looks again at a lock someone else holds briefly.
const LOCK_POLL: Duration = Duration::from_micros(500);

/// What a warm reboot needs from the daemon around the API state: how to start the new
/// daemon, the fds it inherits, and how to stop this daemon's server loop.
pub struct RebootSetup {
    /// The new daemon's arguments (`--takeover-fd` is added by the handover).
    pub args: Vec<OsString>,
    /// This daemon's client limits, and whether it holds the state directory's lock (its
    /// fd is then among `extra_fds`): both pass to the new daemon in its settings.
    pub limits: crate::limits::Limits,
    pub hands_lock: bool,
    /// Named fds for the new daemon: at least `api-listener`.
    pub extra_fds: Vec<(String, RawFd)>,
    /// Environment for the new daemon (e.g. the seccomp mode, which older builds ignore).
    pub env: Vec<(OsString, OsString)>,
    /// Default stage timeout and ready budget (see [`crate::types::RebootRequest`]).
    pub stage_timeout: Duration,
    pub ready_budget: Duration,
    /// Stops this daemon's server loop once the VMs are handed over.
    pub stop: crate::control::StopHandle,
}

/// The daemon's shared state: the Host and the daemon's own figures.
pub struct ApiState {
    host: Arc<Mutex<Host>>,
    started: Instant,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) reboot: OnceLock<RebootSetup>,
    /// A reboot is under way (or this new daemon brings a saved or cold reboot's VMs
    /// back): requests that change anything are refused meanwhile.
    pub(crate) rebooting: AtomicBool,
    /// The reboot's handover (the blackout and the commit) is under way: the server
    /// accepts no connections meanwhile (they wait in the listen backlog, for this daemon
    /// or the new one).
    pub(crate) handing_over: Arc<AtomicBool>,
    /// Held by the server from its look at `handing_over` until the connection it accepts
    /// is counted, so that a reboot that sets `handing_over` and then takes this once
    /// counts every connection accepted before.
    pub(crate) accepting: Arc<Mutex<()>>,
    /// What the reboot under way does (`reboot_in_progress` in `GET /v1/status`).
    pub(crate) progress: Arc<crate::progress::Tracker>,
    /// The VMs, while a reboot holds the Host lock: what readers see instead of waiting.
    view: Mutex<Option<Vec<Arc<Vm>>>>,
    /// The Host's state directory (it never changes).
    pub(crate) state_dir: PathBuf,
    /// The VMs and the API socket belong to a new daemon process now.
    pub(crate) handed_over: AtomicBool,
    /// Connections being served on the API socket (counted from their accept; the server
    /// keeps it). The metrics port's are counted apart and never delay a reboot.
    pub(crate) connections: Arc<AtomicUsize>,
    /// Connections refused for lack of room (the server's overflow thread counts them).
    pub(crate) overflow_stats: Arc<crate::overflow::OverflowStats>,
    /// The longest a warm reboot waits for the API requests under way.
    pub(crate) reboot_grace: Mutex<Duration>,
    /// Pause, resume and stop hold it for reading while they act on a VM without the Host
    /// lock; a warm reboot holds it for writing.
    pub(crate) ops: RwLock<()>,
    pub(crate) last_takeover: OnceLock<TakeoverInfo>,
    /// The aging monitor, once the daemon has started it.
    aging: OnceLock<Arc<Monitor>>,
    pub(crate) last_reboot: OnceLock<ModeReboot>,
    /// Migrations under way, in and out (see [`crate::migration`]).
    pub(crate) migrations: crate::migration::under_way::UnderWay,
    /// How this daemon migrates VMs out, and its own listener's address, once enabled.
    pub(crate) migration: OnceLock<(crate::migration::setup::Setup, Option<std::net::SocketAddr>)>,
    /// The fleet agent, when the daemon joins a fleet (`--fleet-etcd`).
    fleet: OnceLock<warmvm_fleet::Agent>,
}

impl ApiState {
    pub fn new(host: Host) -> Self {
        Self::from_shared(Arc::new(Mutex::new(host)))
    }

    /// Serve a Host shared with others (e.g. the warm-reboot code).
    pub fn from_shared(host: Arc<Mutex<Host>>) -> Self {
        let state_dir = host
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state_dir()
            .to_path_buf();
        Self {
            host,
            state_dir,
            handing_over: Arc::new(AtomicBool::new(false)),
            accepting: Arc::default(),
            progress: Arc::default(),
            view: Mutex::new(None),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            reboot: OnceLock::new(),
            rebooting: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            ops: RwLock::new(()),
            connections: Arc::new(AtomicUsize::new(0)),
            overflow_stats: Arc::default(),
            reboot_grace: Mutex::new(Duration::from_millis(
                crate::limits::DEFAULT_REBOOT_GRACE_MS,
            )),
            last_takeover: OnceLock::new(),
            aging: OnceLock::new(),
            last_reboot: OnceLock::new(),
            migrations: Default::default(),
            migration: OnceLock::new(),
            fleet: OnceLock::new(),
        }
    }

    /// Serve the aging monitor's report and hand its state over on a warm reboot.
    pub fn set_aging(&self, monitor: Arc<Monitor>) {
        let _ = self.aging.set(monitor);
    }

    /// Keep the fleet agent: its status is served, its lease handed over on a reboot.
    pub fn set_fleet(&self, agent: warmvm_fleet::Agent) {
        let _ = self.fleet.set(agent);
    }

    pub fn fleet(&self) -> Option<&warmvm_fleet::Agent> {
        self.fleet.get()
    }

    /// Whether a fleet step may start here: `Some(true)` while the daemon reaches etcd and
    /// holds its record, `Some(false)` while it does not (a step must not start), `None`
    /// when it joins no fleet.
    pub fn fleet_connected(&self) -> Option<bool> {
        self.fleet.get().map(|f| f.status().connected)
    }

    /// The host's VMs changed: its fleet record is written now rather than at the next
    /// refresh (never waits on etcd).
    pub(crate) fn fleet_changed(&self) {
        if let Some(f) = self.fleet.get() {
            f.refresh();
        }
    }

    pub fn aging(&self) -> Option<&Arc<Monitor>> {
        self.aging.get()
    }

    pub(crate) fn aging_or_404(&self) -> Result<&Arc<Monitor>, ApiError> {
        self.aging()
            .ok_or_else(|| ApiError::new(404, "this daemon runs no aging monitor"))
    }

    pub(crate) fn connections_counter(&self) -> &Arc<AtomicUsize> {
        &self.connections
    }

    /// Connections refused with a 503 for lack of room, and of those the ones closed
    /// without reading their request (the overflow thread was full).
    pub fn refused_connections(&self) -> (u64, u64) {
        (
            self.overflow_stats.refused.load(Ordering::Relaxed),
            self.overflow_stats.closed_unread.load(Ordering::Relaxed),
        )
    }

    /// How long a warm reboot waits for the API requests under way before it goes ahead.
    pub fn set_reboot_grace(&self, grace: Duration) {
        *self.reboot_grace.lock().unwrap_or_else(|p| p.into_inner()) = grace;
    }

    /// Record how this daemon took its VMs over (shown by `GET /v1/status`).
    pub fn set_last_takeover(&self, info: TakeoverInfo) {
        let _ = self.last_takeover.set(info);
    }

    /// Record how the saved or cold reboot that started this daemon went.
    pub fn set_last_reboot(&self, report: ModeReboot) {
        let _ = self.last_reboot.set(report);
    }

    /// How the saved or cold reboot that started this daemon went, if one did.
    pub fn last_reboot(&self) -> Option<ModeReboot> {
        self.last_reboot.get().cloned()
    }

    /// Enter a pause, resume, stop or snapshot (see the locking rule above); refused at
    /// once while a reboot is under way.
    pub(crate) fn op_gate(&self) -> Result<RwLockReadGuard<'_, ()>, ApiError> {
        loop {
            self.refuse_while_rebooting()?;
            match self.ops.try_read() {
                Ok(gate) => {
                    // A reboot that began meanwhile waits for this gate: let it go.
                    self.refuse_while_rebooting()?;
                    return Ok(gate);
                }
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) => std::thread::sleep(LOCK_POLL),
            }
        }
    }

    /// 409 while a reboot is under way (503 once this daemon has handed its VMs over).
    pub(crate) fn refuse_while_rebooting(&self) -> Result<(), ApiError> {
        if self.handed_over() {
            return Err(ApiError::new(
                503,
                "this daemon has handed its VMs over to a new daemon process; retry",
            ));
        }
        if self.rebooting() {
            return Err(ApiError::new(
                409,
                "a reboot is under way (see reboot_in_progress in GET /v1/status); retry when it is done",
            ));
        }
        Ok(())
    }

    /// The Host lock, for a request that changes the VMs: refused at once (409) while a
    /// reboot is under way, instead of waiting for it.
    pub(crate) fn lock_for_change(&self) -> Result<MutexGuard<'_, Host>, ApiError> {
        loop {
            self.refuse_while_rebooting()?;
            match self.host.try_lock() {
                Ok(host) => {
                    self.refuse_while_rebooting()?;
                    return Ok(host);
                }
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) => std::thread::sleep(LOCK_POLL),
            }
        }
    }

    /// Show `vms` to readers instead of the Host while a reboot holds the Host lock
    /// (`None`: read the Host again).
    pub(crate) fn set_view(&self, vms: Option<Vec<Arc<Vm>>>) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = vms;
    }

    /// The reboot under way, if any.
    pub fn reboot_in_progress(&self) -> Option<crate::progress::RebootInProgress> {
        self.progress.get()
    }

    /// Make `PUT /v1/reboot` available (the daemon calls this once its server exists).
    pub fn enable_reboot(&self, setup: RebootSetup) {
        let _ = self.reboot.set(setup);
    }

    /// True while a reboot is under way (or this new daemon brings a saved or cold
    /// reboot's VMs back).
    pub fn rebooting(&self) -> bool {
        self.rebooting.load(Ordering::SeqCst)
    }

    /// True while a reboot's handover is under way: connections wait in the backlog.
    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::SeqCst)
    }

    /// True once a warm reboot handed every VM to a new daemon: this one must not touch
    /// them again, nor stop them, nor remove the socket, and should exit.
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }

    pub fn host(&self) -> &Arc<Mutex<Host>> {
        &self.host
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Host> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every VM, in creation order, with the lock already dropped. Never waits for a
    /// reboot: while one holds the Host lock, the VMs it published (see [`Self::set_view`]).
    pub fn vms(&self) -> Vec<Arc<Vm>> {
        loop {
            if let Some(vms) = self.view.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                return vms.clone();
            }
            match self.host.try_lock() {
                Ok(host) => return host.vms().to_vec(),
                Err(TryLockError::Poisoned(p)) => return p.into_inner().vms().to_vec(),
                // Held briefly (a VM created or removed), or by a reboot about to publish
                // its view.
                Err(TryLockError::WouldBlock) => std::thread::sleep(LOCK_POLL),
            }
        }
    }

    /// 409 if VM `name` is migrating out: nothing else may act on it meanwhile.
    pub(crate) fn refuse_migrating(&self, name: &str) -> Result<(), ApiError> {
        if self.migrations.is_outgoing(name) {
            return Err(ApiError::new(
                409,
                format!("VM {name} is migrating; retry when the migration is done"),
            ));
        }
        Ok(())
    }

    pub(crate) fn find(&self, name: &str) -> Result<Arc<Vm>, ApiError> {
        self.vms()
            .into_iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| ApiError::new(404, format!("no VM named {name}")))
    }
}
