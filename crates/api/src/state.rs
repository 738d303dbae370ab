//! The daemon's state and what each API operation does to it.
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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use warmvm_vmm::{Host, HostError, Lifecycle, Vm, VmConfig, VmReport};

use crate::aging::{HoldRequest, Monitor};
use crate::http::{Request, Response, CONTENT_TYPE_METRICS};
use crate::modes::ModeReboot;
pub use crate::reboot::{
    RebootRequest, RebootSetup, READY_BUDGET_MS, REBOOT_TIMEOUT, STAGE_TIMEOUT_MS,
};

mod errors;
mod snapshots;
use crate::routes::{route, Op, Routed, ROUTES};
use errors::vm_error_status;
pub use errors::ApiError;
pub(crate) use errors::{file_status, snapshot_error_status};
pub use snapshots::{RestoreRequest, SnapshotRequest};

/// Seconds a guest gets to power off when `stop` names none.
pub const DEFAULT_STOP_GRACE_SECS: u64 = 10;
/// The longest grace a `stop` may ask for.
pub const MAX_STOP_GRACE_SECS: u64 = 3600;
/// How often a request looks again at a lock someone else holds briefly.
const LOCK_POLL: Duration = Duration::from_micros(500);

/// Match the fds a create request passed to the interfaces that name them by position.
fn given_taps(
    config: &VmConfig,
    fds: Vec<std::fs::File>,
) -> Result<warmvm_vmm::GivenTaps, ApiError> {
    let passed = fds.len();
    let mut fds: Vec<Option<std::fs::File>> = fds.into_iter().map(Some).collect();
    let mut taps = warmvm_vmm::GivenTaps::default();
    for (index, net) in config.nets.iter().enumerate() {
        let Some(fd) = net.tap_fd else { continue };
        let file = usize::try_from(fd)
            .ok()
            .and_then(|i| fds.get_mut(i))
            .ok_or_else(|| {
                // No fd at that position: what the body names does not exist.
                ApiError::new(
                    404,
                    format!(
                        "tap_fd {fd}: the request passed {passed} fds (tap_fd counts them from 0)"
                    ),
                )
            })?
            .take()
            .ok_or_else(|| ApiError::new(409, format!("tap_fd {fd} is named twice")))?;
        taps.0.insert(index, file);
    }
    let unused = fds.iter().filter(|f| f.is_some()).count();
    if unused > 0 {
        return Err(ApiError::new(
            409,
            format!("{unused} of the {passed} fds passed are not named by any tap_fd"),
        ));
    }
    Ok(taps)
}

/// The query of `DELETE /v1/vms/{name}`: `keep_logs=true|false` (default false).
fn parse_delete_query(query: Option<&str>) -> Result<bool, ApiError> {
    let mut keep_logs = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("keep_logs", "true")) => keep_logs = true,
            Some(("keep_logs", "false")) => keep_logs = false,
            Some(("keep_logs", v)) => {
                return Err(ApiError::new(
                    400,
                    format!("keep_logs must be true or false, not {v:?}"),
                ))
            }
            None if pair == "keep_logs" => {
                return Err(ApiError::new(400, "keep_logs needs a value: true or false"))
            }
            _ => {
                return Err(ApiError::new(
                    400,
                    format!("unknown query parameter {pair:?} (only keep_logs)"),
                ))
            }
        }
    }
    Ok(keep_logs)
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub vm_count: usize,
    /// VMs per lifecycle state.
    pub vms_running: usize,
    pub vms_paused: usize,
    pub state_dir: String,
    /// This build (the version, and the build id a packager set).
    pub build: String,
    /// How this daemon took its VMs over by a warm reboot, if it did.
    pub last_takeover: Option<TakeoverInfo>,
    /// How the saved or cold reboot that started this daemon went, if one did.
    pub last_reboot: Option<ModeReboot>,
    /// What the daemon runs as: uid, gid, groups, capabilities, no_new_privs, seccomp.
    pub privileges: crate::running_as::DaemonPrivileges,
    /// The executable this daemon runs: the path it was started from (what a warm reboot
    /// runs next), version, git commit, and the sha256 of the running image (absent from
    /// older daemons).
    #[serde(default)]
    pub binary: Option<warmvm_vmm::executable::BinaryInfo>,
    /// A reboot under way in this daemon (or the new daemon bringing a saved or cold
    /// reboot's VMs back), and how far it is.
    #[serde(default)]
    pub reboot_in_progress: Option<crate::progress::RebootInProgress>,
}

/// How a daemon took its VMs over from the one before it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TakeoverInfo {
    pub previous_pid: Option<u64>,
    pub from_build: String,
    pub to_build: String,
    /// The state format the old daemon wrote and this one read.
    pub state_format: u32,
    /// False when an older build without the commit step handed over.
    pub commit_protocol: bool,
    pub host_blackout_us: u64,
    /// The executables of the daemon before and of this one (absent when an older build
    /// was one of them).
    #[serde(default)]
    pub from_binary: Option<warmvm_vmm::executable::BinaryInfo>,
    #[serde(default)]
    pub to_binary: Option<warmvm_vmm::executable::BinaryInfo>,
}

/// `GET /v1/vms`.
#[derive(Clone, Debug, Serialize)]
pub struct VmList {
    pub vms: Vec<VmReport>,
}

/// The optional body of `PUT /v1/vms/{name}/stop`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest gets to power off before it is forced (default 10); not `null`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "warmvm_vmm::config::present"
    )]
    pub grace_secs: Option<u64>,
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
    state_dir: PathBuf,
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
    last_takeover: OnceLock<TakeoverInfo>,
    /// The aging monitor, once the daemon has started it.
    aging: OnceLock<Arc<Monitor>>,
    last_reboot: OnceLock<ModeReboot>,
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
        }
    }

    /// Serve the aging monitor's report and hand its state over on a warm reboot.
    pub fn set_aging(&self, monitor: Arc<Monitor>) {
        let _ = self.aging.set(monitor);
    }

    pub fn aging(&self) -> Option<&Arc<Monitor>> {
        self.aging.get()
    }

    fn aging_or_404(&self) -> Result<&Arc<Monitor>, ApiError> {
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
    fn op_gate(&self) -> Result<RwLockReadGuard<'_, ()>, ApiError> {
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
    fn refuse_while_rebooting(&self) -> Result<(), ApiError> {
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
    fn lock_for_change(&self) -> Result<MutexGuard<'_, Host>, ApiError> {
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

    fn find(&self, name: &str) -> Result<Arc<Vm>, ApiError> {
        self.vms()
            .into_iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| ApiError::new(404, format!("no VM named {name}")))
    }

    /// Answer one request. `metrics_only` for the loopback metrics port.
    pub fn handle(&self, req: &Request, metrics_only: bool) -> Response {
        self.handle_with_fds(req, metrics_only, Vec::new())
    }

    /// [`ApiState::handle`] for a request that passed `fds` (SCM_RIGHTS on the API socket):
    /// only VM creation takes any.
    pub fn handle_with_fds(
        &self,
        req: &Request,
        metrics_only: bool,
        fds: Vec<std::fs::File>,
    ) -> Response {
        let started = Instant::now();
        let response = self.handle_timed(req, metrics_only, fds);
        if let Some(m) = self.aging() {
            m.record_latency(started.elapsed());
        }
        response
    }

    fn handle_timed(&self, req: &Request, metrics_only: bool, fds: Vec<std::fs::File>) -> Response {
        #[cfg(feature = "fault-injection")]
        std::thread::sleep(crate::aging::inject::request_delay());
        const METRICS_ONLY: &[crate::routes::Route] = &[crate::routes::Route {
            method: "GET",
            path: "/metrics",
            op: Op::Metrics,
        }];
        #[cfg(feature = "fault-injection")]
        if !metrics_only && req.method == "PUT" && req.path == "/v1/debug/panic" {
            return self
                .inject_panic(&req.body)
                .unwrap_or_else(|e| e.response());
        }
        #[cfg(feature = "fault-injection")]
        if !metrics_only && req.method == "PUT" && req.path == "/v1/debug/aging" {
            return self
                .inject_aging(&req.body)
                .unwrap_or_else(|e| e.response());
        }
        let routes = if metrics_only { METRICS_ONLY } else { ROUTES };
        let (op, name) = match route(routes, &req.method, &req.path) {
            Routed::Found { op, name } => (op, name),
            Routed::MethodNotAllowed(allow) => {
                let mut r = Response::error(
                    405,
                    &format!(
                        "{} does not take {} (allowed: {allow})",
                        req.path, req.method
                    ),
                );
                r.allow = Some(allow);
                return r;
            }
            Routed::NotFound => {
                return Response::error(404, &format!("no such path: {}", req.path))
            }
        };
        if self.handed_over() {
            return Response::error(
                503,
                "this daemon has handed its VMs over to a new daemon process; retry",
            );
        }
        let name = name.unwrap_or_default();
        if !fds.is_empty() && op != Op::CreateVm {
            return Response::error(
                400,
                &format!(
                    "{} {} takes no fds, but {} were passed",
                    req.method,
                    req.path,
                    fds.len()
                ),
            );
        }
        let result = match op {
            Op::Status => self.status().map(|s| Response::json(200, &s)),
            Op::ListVms => Ok(Response::json(200, &self.list())),
            Op::CreateVm => self
                .create_with_fds(&req.body, fds)
                .map(|r| Response::json(201, &r)),
            Op::ShowVm => self.find(name).map(|vm| Response::json(200, &vm.report())),
            Op::PauseVm => self.pause(name).map(|r| Response::json(200, &r)),
            Op::ResumeVm => self.resume(name).map(|r| Response::json(200, &r)),
            Op::StopVm => self.stop(name, &req.body).map(|r| Response::json(200, &r)),
            Op::DeleteVm => parse_delete_query(req.query.as_deref())
                .and_then(|keep_logs| self.delete(name, keep_logs))
                .map(|r| Response::json(200, &r)),
            Op::Aging => self
                .aging_or_404()
                .map(|m| Response::json(200, &m.report())),
            Op::AgingHistory => self
                .aging_or_404()
                .map(|m| Response::json(200, &m.history())),
            Op::AgingHold => self.set_hold(&req.body),
            Op::SnapshotVm => self
                .snapshot(name, &req.body)
                .map(|r| Response::json(200, &r)),
            Op::RestoreVm => self.restore(&req.body).map(|r| Response::json(201, &r)),
            Op::Reboot => self.reboot(&req.body).map(|r| {
                let mut resp = Response::json(200, &r);
                resp.then_exit = true;
                resp
            }),
            Op::Metrics => Ok(Response::text(
                200,
                CONTENT_TYPE_METRICS,
                crate::metrics::render(self),
            )),
        };
        result.unwrap_or_else(|e| {
            // The request's span carries the method and path.
            if e.status >= 500 {
                tracing::error!(status = e.status, error = %e.message, "request failed");
            } else {
                tracing::info!(status = e.status, error = %e.message, "request refused");
            }
            e.response()
        })
    }

    pub fn status(&self) -> Result<DaemonStatus, ApiError> {
        let privileges = crate::running_as::current()
            .map_err(|e| ApiError::new(500, format!("cannot tell what the daemon runs as: {e}")))?;
        let vms = self.vms();
        let state_dir = self.state_dir.display().to_string();
        let count = |s: &str| vms.iter().filter(|v| v.lifecycle().name() == s).count();
        Ok(DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_ms: self.uptime().as_millis() as u64,
            vm_count: vms.len(),
            vms_running: count("running"),
            vms_paused: count("paused"),
            state_dir,
            build: warmvm_vmm::build(),
            last_takeover: self.last_takeover.get().cloned(),
            last_reboot: self.last_reboot.get().cloned(),
            privileges,
            binary: Some(warmvm_vmm::executable::info()),
            reboot_in_progress: self.reboot_in_progress(),
        })
    }

    pub fn list(&self) -> VmList {
        VmList {
            vms: self.vms().iter().map(|v| v.report()).collect(),
        }
    }

    /// Create a VM from the JSON form of [`VmConfig`] and start it.
    pub fn create(&self, body: &[u8]) -> Result<VmReport, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::new(
                400,
                "the request body must be a VM config as JSON (see VmConfig in docs/openapi.json)",
            ));
        }
        self.create_with_fds(body, Vec::new())
    }

    /// [`ApiState::create`] with the fds the request passed: a network interface's
    /// `tap_fd` is the position of its TAP among them. Every fd passed must be used.
    pub fn create_with_fds(
        &self,
        body: &[u8],
        fds: Vec<std::fs::File>,
    ) -> Result<VmReport, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::new(
                400,
                "the request body must be a VM config as JSON (see VmConfig in docs/openapi.json)",
            ));
        }
        let config: VmConfig = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("invalid VM config: {e}")))?;
        let taps = given_taps(&config, fds)?;
        self.create_config_with(&config, taps)
    }

    /// Create a VM and start it; on failure nothing has changed.
    pub fn create_config(&self, config: &VmConfig) -> Result<VmReport, ApiError> {
        self.create_config_with(config, warmvm_vmm::GivenTaps::default())
    }

    fn create_config_with(
        &self,
        config: &VmConfig,
        taps: warmvm_vmm::GivenTaps,
    ) -> Result<VmReport, ApiError> {
        let span = tracing::info_span!("create", vm = %config.name);
        let _enter = span.enter();
        let vm = {
            let mut host = self.lock_for_change()?;
            if self.shutting_down.load(Ordering::SeqCst) {
                return Err(ApiError::new(503, "the daemon is shutting down"));
            }
            let vm = host.create_vm_with(config, taps).map_err(|e| match e {
                HostError::Vm { vm, err } => ApiError::new(
                    vm_error_status(&err, Some(config)),
                    format!("cannot create VM {vm}: {err}"),
                ),
                other => ApiError::from(other),
            })?;
            // Starting only flips the VM's state and wakes its vCPUs: cheap under the lock,
            // and nobody sees a created VM that is not running yet.
            if let Err(err) = vm.start() {
                let removed = host.remove(&config.name);
                drop(host);
                // Joining its vCPU threads happens here, outside the lock.
                drop((vm, removed));
                return Err(ApiError::new(
                    500,
                    format!("cannot start VM {}: {err}", config.name),
                ));
            }
            vm
        };
        tracing::info!(vm = %config.name, memory_mib = config.memory_mib, vcpus = config.vcpus, "VM started");
        Ok(vm.report())
    }

    pub fn pause(&self, name: &str) -> Result<VmReport, ApiError> {
        let _gate = self.op_gate()?;
        let vm = self.find(name)?;
        warmvm_vmm::Pausable::pause(&*vm)
            .map_err(|e| ApiError::new(vm_error_status(&e, None), e.to_string()))?;
        tracing::info!(vm = %name, "VM paused");
        Ok(vm.report())
    }

    pub fn resume(&self, name: &str) -> Result<VmReport, ApiError> {
        let _gate = self.op_gate()?;
        let vm = self.find(name)?;
        warmvm_vmm::Pausable::resume(&*vm)
            .map_err(|e| ApiError::new(vm_error_status(&e, None), e.to_string()))?;
        tracing::info!(vm = %name, "VM resumed");
        Ok(vm.report())
    }

    /// Ask the guest to power off; force it after the grace period.
    pub fn stop(&self, name: &str, body: &[u8]) -> Result<VmReport, ApiError> {
        let req: StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
            StopRequest::default()
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::new(400, format!("invalid stop request: {e}")))?
        };
        let grace = req.grace_secs.unwrap_or(DEFAULT_STOP_GRACE_SECS);
        if grace > MAX_STOP_GRACE_SECS {
            return Err(ApiError::new(
                400,
                format!("grace_secs must be at most {MAX_STOP_GRACE_SECS}"),
            ));
        }
        let _gate = self.op_gate()?;
        let vm = self.find(name)?;
        let state = vm.lifecycle();
        if state.is_finished() {
            return Err(ApiError::new(
                409,
                format!("VM {name} is {}; cannot stop", state.name()),
            ));
        }
        tracing::info!(vm = %name, grace_secs = grace, "stopping VM");
        let end = vm.stop(Duration::from_secs(grace));
        tracing::info!(vm = %name, state = end.name(), "VM stopped");
        Ok(vm.report())
    }

    /// Forget a VM that is not running, and remove its state directory
    /// (`<state dir>/<name>`, with its console log) unless `keep_logs`; returns its last
    /// report.
    pub fn delete(&self, name: &str, keep_logs: bool) -> Result<VmReport, ApiError> {
        let vm_dir;
        let vm = {
            let mut host = self.lock_for_change()?;
            if let Some(vm) = host.find(name) {
                let state = vm.lifecycle();
                if !(state.is_finished() || state == Lifecycle::Created) {
                    return Err(ApiError::new(
                        409,
                        format!("VM {name} is {}: stop it before deleting it", state.name()),
                    ));
                }
            }
            let vm = host.remove(name)?;
            vm_dir = host.state_dir().join(name);
            vm
        };
        let report = vm.report();
        // The VM's threads are joined and its RAM freed here, outside the lock (or later,
        // by whoever still holds a reference).
        drop(vm);
        if !keep_logs {
            let dir = vm_dir;
            // The name is validated (no `/`, no leading `.`), so this stays inside the state
            // directory. The VM is gone already: a failure here is logged, not answered.
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(vm = %name, dir = %dir.display(), error = %e, "cannot remove the VM's state directory")
                }
            }
        }
        tracing::info!(vm = %name, keep_logs, "VM deleted");
        Ok(report)
    }

    /// `PUT /v1/aging/hold`: `{"hold": true|false}`.
    fn set_hold(&self, body: &[u8]) -> Result<Response, ApiError> {
        let monitor = self.aging_or_404()?;
        // The hold travels to the new daemon with the aging state, taken as the reboot
        // starts: one set later would be lost.
        self.refuse_while_rebooting()?;
        let req: HoldRequest = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                400,
                format!(r#"invalid hold request (expected {{"hold": true|false}}): {e}"#),
            )
        })?;
        monitor.set_hold(req.hold);
        Ok(Response::json(200, &monitor.report()))
    }

    /// Tests only (`PUT /v1/debug/panic`, not part of the API): make one kind of thread
    /// panic, as a bug there would. Body: `{"in": "api" | "main" | "console" | "vcpu",
    /// "vm": NAME}` (`vm` for `vcpu` only).
    #[cfg(feature = "fault-injection")]
    fn inject_panic(&self, body: &[u8]) -> Result<Response, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Inject {
            #[serde(rename = "in")]
            thread: String,
            vm: Option<String>,
        }
        let req: Inject = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("invalid panic request: {e}")))?;
        match req.thread.as_str() {
            "api" => panic!("fault injected: a panic in an API thread"),
            "main" => crate::server::INJECT_MAIN_PANIC.store(true, Ordering::Release),
            "console" => warmvm_vmm::panic::inject_console_panic(),
            "vcpu" => self
                .find(req.vm.as_deref().unwrap_or_default())?
                .inject_vcpu_panic(),
            other => return Err(ApiError::new(400, format!("no thread kind {other:?}"))),
        }
        Ok(Response::json(
            202,
            &serde_json::json!({ "injected": req.thread }),
        ))
    }

    /// Tests only (`PUT /v1/debug/aging`, not part of the API): start injected aging.
    #[cfg(feature = "fault-injection")]
    fn inject_aging(&self, body: &[u8]) -> Result<Response, ApiError> {
        let inj: crate::aging::inject::Injection = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("invalid aging injection: {e}")))?;
        inj.check().map_err(|e| ApiError::new(400, e))?;
        if inj.fill_to_bounds {
            self.aging()
                .ok_or_else(|| ApiError::new(409, "this daemon has no aging monitor"))?
                .fill_to_bounds();
        }
        crate::aging::inject::start(inj)
            .map_err(|e| ApiError::new(500, format!("cannot start injected aging: {e}")))?;
        tracing::warn!(?inj, "injected aging started");
        Ok(Response::json(
            202,
            &serde_json::json!({ "injected": true }),
        ))
    }

    /// Stop every VM (each gets `grace` to power off) and refuse new ones from now on.
    pub fn shutdown(&self, grace: Duration) {
        let vms = {
            let host = self.lock();
            self.shutting_down.store(true, Ordering::SeqCst);
            host.vms().to_vec()
        };
        std::thread::scope(|s| {
            for vm in &vms {
                if vm.lifecycle().is_finished() {
                    continue;
                }
                s.spawn(move || {
                    let end = vm.stop(grace);
                    tracing::info!(vm = %vm.name(), state = end.name(), "VM stopped");
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_request_rejects_unknown_fields() {
        assert!(serde_json::from_str::<StopRequest>(r#"{"grace_secs": 3}"#).is_ok());
        assert!(serde_json::from_str::<StopRequest>(r#"{"grace": 3}"#).is_err());
        // The document says integer, not nullable.
        assert!(serde_json::from_str::<StopRequest>(r#"{"grace_secs": null}"#).is_err());
        assert_eq!(
            serde_json::from_str::<StopRequest>("{}").unwrap(),
            StopRequest::default()
        );
    }

    #[test]
    fn vm_config_fields_are_not_null() {
        let ok = r#"{"name": "a", "memory_mib": 16}"#;
        assert!(serde_json::from_str::<VmConfig>(ok).is_ok());
        for field in ["kernel", "initrd", "cmdline", "console_log"] {
            let body = format!(r#"{{"name": "a", "memory_mib": 16, "{field}": null}}"#);
            assert!(serde_json::from_str::<VmConfig>(&body).is_err(), "{field}");
        }
    }
}
