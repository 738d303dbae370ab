//! The daemon's state and what each API operation does to it.
//!
//! All state lives in the [`Host`]: the VMs, their configs and their state directory. The
//! only other figures are the daemon's own (start time, pid), so a new daemon process that
//! adopts the VMs of an old one (warm reboot) rebuilds this from the Host alone.
//!
//! Locking rule: the Host lock is held only to look VMs up, create them, and remove them;
//! never while a VM pauses or stops (those wait for vCPU threads): handlers clone the
//! `Arc<Vm>` and drop the lock first. A warm reboot is the exception: it holds the Host lock
//! throughout, and first takes the operations gate for writing, so that it waits for every
//! pause, resume or stop under way (and none starts meanwhile); those take it for reading.
//! Order: the gate, then the Host lock.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use warmvm_vmm::handover::{self, Phase, RebootOptions, RebootReport};
use warmvm_vmm::{ConfigError, Host, HostError, Lifecycle, Vm, VmConfig, VmError, VmReport};

use crate::http::{Request, Response, CONTENT_TYPE_METRICS};
use crate::routes::{route, Op, Routed, ROUTES};

/// Seconds a guest gets to power off when `stop` names none.
pub const DEFAULT_STOP_GRACE_SECS: u64 = 10;
/// The longest grace a `stop` may ask for.
pub const MAX_STOP_GRACE_SECS: u64 = 3600;

/// An API failure: an HTTP status and one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// For a failed warm reboot: the phase it failed in.
    pub phase: Option<Phase>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            phase: None,
        }
    }

    fn in_phase(mut self, phase: Phase) -> Self {
        self.phase = Some(phase);
        self
    }

    fn response(&self) -> Response {
        match self.phase {
            Some(phase) => Response::error_in_phase(self.status, &self.message, phase),
            None => Response::error(self.status, &self.message),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

/// The status of a VM operation that failed; `config` is the VM's, for a creation.
///
/// The statuses' meaning, as docs/openapi.json lists them: 400 the request does not match the
/// document; 409 it does not fit the state of the VM or the host's other VMs; 422 it matches
/// the document but this host cannot carry it out (a kernel path that names no readable
/// kernel, more vCPUs or RAM than the host has, huge pages it has not reserved); 500 the host
/// failed.
fn vm_error_status(err: &VmError, config: Option<&VmConfig>) -> u16 {
    let has_kernel = config.is_some_and(|c| c.kernel.is_some());
    let hugepages = config.is_some_and(|c| c.hugepages);
    match err {
        VmError::InvalidTransition { .. } => 409,
        // A kernel or initrd the client named is unusable.
        VmError::Boot(_) | VmError::ReadFile { .. } if has_kernel => 422,
        // Huge pages the host has not reserved (or not enough of them).
        VmError::Memory(_) if hugepages => 422,
        _ => 500,
    }
}

fn config_error_status(err: &ConfigError) -> u16 {
    match err {
        // Valid on its own, but not next to the VMs this host already has.
        ConfigError::TotalMemoryTooLarge { .. } => 409,
        // What the document itself rules out (see VmConfig there).
        ConfigError::Read { .. }
        | ConfigError::Parse { .. }
        | ConfigError::NoVms
        | ConfigError::BadName(_)
        | ConfigError::DuplicateName(_)
        | ConfigError::MemoryTooSmall { .. }
        | ConfigError::EmptyPath { .. } => 400,
        // Well-formed, but not possible with these files, this host, or together.
        ConfigError::MemoryTooLarge { .. }
        | ConfigError::HugeMemoryOdd { .. }
        | ConfigError::BadVcpus { .. }
        | ConfigError::Kernel { .. }
        | ConfigError::Initrd { .. }
        | ConfigError::InitrdWithoutKernel { .. }
        | ConfigError::Ring3WithKernel { .. }
        | ConfigError::BadCmdline { .. } => 422,
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        let status = match &e {
            HostError::Hypervisor(_) => 500,
            HostError::Config(c) => config_error_status(c),
            HostError::Vm { err, .. } => vm_error_status(err, None),
            HostError::Exists(_) | HostError::StillRunning(_) => 409,
            HostError::NotFound(_) => 404,
        };
        Self::new(status, e.to_string())
    }
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

/// The body of `PUT /v1/reboot`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RebootRequest {
    /// Only `warm`: every VM is handed to a new daemon process without stopping.
    pub mode: String,
    /// The new daemon's binary (absolute path); default: this daemon's own binary. When
    /// present it must be a string: `null` is refused, as the document says.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "warmvm_vmm::config::present"
    )]
    pub binary: Option<PathBuf>,
    /// How long starting the new daemon and preparing every VM may take (the guests run
    /// meanwhile); default: the daemon's `--stage-timeout-ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_timeout_ms: Option<u64>,
    /// How long the guests may be frozen before the new daemon is ready; past it the
    /// reboot is aborted and the VMs run on here. Default: the daemon's `--ready-budget-ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_budget_ms: Option<u64>,
}

/// Bounds of the reboot timeouts a request or a flag may set.
pub const STAGE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=600_000;
pub const READY_BUDGET_MS: std::ops::RangeInclusive<u64> = 10..=60_000;

/// How long a warm reboot waits for VM operations under way before it gives up (409).
const GATE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client waits for a warm reboot's answer, at the least: the longest staging
/// the daemon allows plus the longest budget and the time to answer.
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a warm reboot needs from the daemon around the API state: how to start the new
/// daemon, the fds it inherits, and how to stop this daemon's server loop.
pub struct RebootSetup {
    /// The new daemon's arguments (`--takeover-fd` is added by the handover).
    pub args: Vec<OsString>,
    /// Opaque settings for the new daemon.
    pub extra: serde_json::Value,
    /// Named fds for the new daemon: at least `api-listener`.
    pub extra_fds: Vec<(String, RawFd)>,
    /// Environment for the new daemon (e.g. the seccomp mode, which older builds ignore).
    pub env: Vec<(OsString, OsString)>,
    /// Default stage timeout and ready budget (see [`RebootRequest`]).
    pub stage_timeout: Duration,
    pub ready_budget: Duration,
    /// Stops this daemon's server loop once the VMs are handed over.
    pub stop: crate::server::StopHandle,
}

/// The daemon's shared state: the Host and the daemon's own figures.
pub struct ApiState {
    host: Arc<Mutex<Host>>,
    started: Instant,
    shutting_down: AtomicBool,
    reboot: OnceLock<RebootSetup>,
    /// A warm reboot is under way: the server accepts no connections meanwhile (they wait
    /// in the listen backlog, for this daemon or the new one).
    rebooting: AtomicBool,
    /// The VMs and the API socket belong to a new daemon process now.
    handed_over: AtomicBool,
    /// Connections being served on the API socket (counted from their accept; the server
    /// keeps it). The metrics port's are counted apart and never delay a reboot.
    connections: Arc<AtomicUsize>,
    /// Connections refused for lack of room (the server's overflow thread counts them).
    pub(crate) overflow_stats: Arc<crate::overflow::OverflowStats>,
    /// The longest a warm reboot waits for the API requests under way.
    reboot_grace: Mutex<Duration>,
    /// Pause, resume and stop hold it for reading while they act on a VM without the Host
    /// lock; a warm reboot holds it for writing.
    ops: RwLock<()>,
    last_takeover: OnceLock<TakeoverInfo>,
}

impl ApiState {
    pub fn new(host: Host) -> Self {
        Self::from_shared(Arc::new(Mutex::new(host)))
    }

    /// Serve a Host shared with others (e.g. the warm-reboot code).
    pub fn from_shared(host: Arc<Mutex<Host>>) -> Self {
        Self {
            host,
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
        }
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

    /// Enter a pause, resume or stop (see the locking rule above).
    fn op_gate(&self) -> Result<RwLockReadGuard<'_, ()>, ApiError> {
        let gate = self.ops.read().unwrap_or_else(|p| p.into_inner());
        if self.handed_over() {
            return Err(ApiError::new(
                503,
                "this daemon has handed its VMs over to a new daemon process; retry",
            ));
        }
        Ok(gate)
    }

    /// Make `PUT /v1/reboot` available (the daemon calls this once its server exists).
    pub fn enable_reboot(&self, setup: RebootSetup) {
        let _ = self.reboot.set(setup);
    }

    /// True while a warm reboot is under way.
    pub fn rebooting(&self) -> bool {
        self.rebooting.load(Ordering::SeqCst)
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

    fn lock(&self) -> MutexGuard<'_, Host> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every VM, in creation order, with the lock already dropped.
    pub fn vms(&self) -> Vec<Arc<Vm>> {
        self.lock().vms().to_vec()
    }

    fn find(&self, name: &str) -> Result<Arc<Vm>, ApiError> {
        self.lock()
            .find(name)
            .ok_or_else(|| ApiError::new(404, format!("no VM named {name}")))
    }

    /// Answer one request. `metrics_only` for the loopback metrics port.
    pub fn handle(&self, req: &Request, metrics_only: bool) -> Response {
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
        let result = match op {
            Op::Status => Ok(Response::json(200, &self.status())),
            Op::ListVms => Ok(Response::json(200, &self.list())),
            Op::CreateVm => self.create(&req.body).map(|r| Response::json(201, &r)),
            Op::ShowVm => self.find(name).map(|vm| Response::json(200, &vm.report())),
            Op::PauseVm => self.pause(name).map(|r| Response::json(200, &r)),
            Op::ResumeVm => self.resume(name).map(|r| Response::json(200, &r)),
            Op::StopVm => self.stop(name, &req.body).map(|r| Response::json(200, &r)),
            Op::DeleteVm => parse_delete_query(req.query.as_deref())
                .and_then(|keep_logs| self.delete(name, keep_logs))
                .map(|r| Response::json(200, &r)),
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

    pub fn status(&self) -> DaemonStatus {
        let (vms, state_dir) = {
            let host = self.lock();
            (host.vms().to_vec(), host.state_dir().display().to_string())
        };
        let count = |s: &str| vms.iter().filter(|v| v.lifecycle().name() == s).count();
        DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_ms: self.uptime().as_millis() as u64,
            vm_count: vms.len(),
            vms_running: count("running"),
            vms_paused: count("paused"),
            state_dir,
            build: warmvm_vmm::build(),
            last_takeover: self.last_takeover.get().cloned(),
        }
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
        let config: VmConfig = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("invalid VM config: {e}")))?;
        self.create_config(&config)
    }

    /// Create a VM and start it; on failure nothing has changed.
    pub fn create_config(&self, config: &VmConfig) -> Result<VmReport, ApiError> {
        let span = tracing::info_span!("create", vm = %config.name);
        let _enter = span.enter();
        let vm = {
            let mut host = self.lock();
            if self.shutting_down.load(Ordering::SeqCst) {
                return Err(ApiError::new(503, "the daemon is shutting down"));
            }
            let vm = host.create_vm(config).map_err(|e| match e {
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
        vm.pause()
            .map_err(|e| ApiError::new(vm_error_status(&e, None), e.to_string()))?;
        tracing::info!(vm = %name, "VM paused");
        Ok(vm.report())
    }

    pub fn resume(&self, name: &str) -> Result<VmReport, ApiError> {
        let _gate = self.op_gate()?;
        let vm = self.find(name)?;
        vm.resume()
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
            let mut host = self.lock();
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

    /// Check a reboot request: mode `warm`, and a binary that is an executable file.
    pub fn parse_reboot(body: &[u8]) -> Result<(RebootRequest, PathBuf), ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::new(
                400,
                r#"the request body must be JSON, e.g. {"mode": "warm"}"#,
            ));
        }
        let req: RebootRequest = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("invalid reboot request: {e}")))?;
        if req.mode != "warm" {
            return Err(ApiError::new(
                400,
                format!(
                    "reboot mode {:?} is not supported: the only mode is \"warm\"",
                    req.mode
                ),
            ));
        }
        for (name, value, range) in [
            ("stage_timeout_ms", req.stage_timeout_ms, STAGE_TIMEOUT_MS),
            ("ready_budget_ms", req.ready_budget_ms, READY_BUDGET_MS),
        ] {
            if let Some(v) = value.filter(|v| !range.contains(v)) {
                return Err(ApiError::new(
                    400,
                    format!(
                        "{name} = {v} is out of range: use {} to {}",
                        range.start(),
                        range.end()
                    ),
                ));
            }
        }
        let binary = match &req.binary {
            Some(b) => {
                if b.as_os_str().is_empty() {
                    return Err(ApiError::new(400, "binary must be a path, not empty"));
                }
                // A well-formed request naming a file this host cannot run.
                check_binary(b)
                    .map_err(|why| ApiError::new(422, format!("binary {}: {why}", b.display())))?;
                b.clone()
            }
            None => warmvm_vmm::handover::this_binary(),
        };
        Ok((req, binary))
    }

    /// Warm reboot: hand every VM to a new daemon process (see
    /// [`warmvm_vmm::handover`]). On success this daemon's server is stopped, the Host lock
    /// stays taken for good (nothing here may touch the handed-over VMs again) and the
    /// caller must exit once the answer is sent. On failure the VMs run on here.
    pub fn reboot(&self, body: &[u8]) -> Result<RebootReport, ApiError> {
        let (req, binary) = Self::parse_reboot(body)?;
        let setup = self.reboot.get().ok_or_else(|| {
            ApiError::new(
                409,
                "this daemon cannot warm-reboot (it was started without a server)",
            )
        })?;
        // From here on the server accepts no connection: they wait in the backlog for the
        // new daemon (or for this one, if the reboot fails).
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        if self.rebooting.swap(true, Ordering::SeqCst) {
            return Err(ApiError::new(409, "a warm reboot is already under way"));
        }
        let done = Done(&self.rebooting);
        // Let the API requests under way (ours aside) finish, so that none is left waiting
        // for the Host lock when this process exits; at most the reboot grace, so a slow or
        // stuck client cannot hold the reboot up for longer.
        let grace = *self.reboot_grace.lock().unwrap_or_else(|p| p.into_inner());
        let waited_until = Instant::now() + grace;
        while self.connections.load(Ordering::SeqCst) > 1 && Instant::now() < waited_until {
            std::thread::sleep(Duration::from_millis(2));
        }
        let deadline = Instant::now() + GATE_TIMEOUT;
        // Wait (briefly) for every pause, resume or stop under way; none starts until we
        // are done.
        let gate = loop {
            match self.ops.try_write() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::sync::TryLockError::WouldBlock) => return Err(ApiError::new(
                    409,
                    "a VM operation (e.g. a stop) is under way; retry the reboot when it is done",
                )),
            }
        };
        let host = self.lock();
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(503, "the daemon is shutting down"));
        }
        let opts = RebootOptions {
            binary: binary.clone(),
            args: setup.args.clone(),
            stage_timeout: req
                .stage_timeout_ms
                .map_or(setup.stage_timeout, Duration::from_millis),
            ready_budget: req
                .ready_budget_ms
                .map_or(setup.ready_budget, Duration::from_millis),
            extra: setup.extra.clone(),
            extra_fds: setup.extra_fds.clone(),
            env: setup.env.clone(),
        };
        tracing::info!(binary = %binary.display(), vms = host.vms().len(), "warm reboot");
        match handover::warm_reboot(&host, &opts) {
            Ok(handed) => {
                self.handed_over.store(true, Ordering::SeqCst);
                setup.stop.stop();
                tracing::info!(
                    new_pid = handed.report.new_pid,
                    host_blackout_us = handed.report.host_blackout_us,
                    "warm reboot done: the new daemon runs every VM; this one exits"
                );
                // The new daemon is not waited for: it outlives us.
                drop(handed.child);
                // Keep the Host locked until the process exits, so that no request still
                // in flight here can reach the handed-over VMs.
                std::mem::forget(host);
                std::mem::forget(gate);
                std::mem::forget(done);
                Ok(handed.report)
            }
            Err(e) => {
                let status = if e.is_refusal() { 409 } else { 500 };
                Err(ApiError::new(
                    status,
                    format!("warm reboot failed; the VMs run on in this daemon: {e}"),
                )
                .in_phase(e.phase))
            }
        }
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

    /// A warm reboot into this very binary because this process hit a bug (a panic off the
    /// vCPU threads): on success the caller must exit at once.
    pub fn emergency_reboot(&self) -> Result<RebootReport, ApiError> {
        self.reboot(br#"{"mode": "warm"}"#)
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

/// Why `path` cannot be the new daemon's binary, if it cannot.
fn check_binary(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err("must be an absolute path".into());
    }
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_errors_map_to_statuses() {
        let s = |e: HostError| ApiError::from(e).status;
        assert_eq!(s(HostError::Exists("a".into())), 409);
        assert_eq!(s(HostError::NotFound("a".into())), 404);
        assert_eq!(s(HostError::StillRunning("a".into())), 409);
        assert_eq!(s(HostError::Config(ConfigError::NoVms)), 400);
        assert_eq!(
            s(HostError::Config(ConfigError::TotalMemoryTooLarge {
                total_mib: 2,
                host_mib: 1
            })),
            409
        );
        let transition = VmError::InvalidTransition {
            vm: "a".into(),
            state: "running",
            action: "resume",
        };
        assert_eq!(vm_error_status(&transition, None), 409);
        assert_eq!(
            s(HostError::Vm {
                vm: "a".into(),
                err: VmError::Thread(std::io::Error::other("x"))
            }),
            500
        );
    }

    #[test]
    fn reboot_requests_are_checked() {
        let status = |body: &str| {
            ApiState::parse_reboot(body.as_bytes())
                .err()
                .map(|e| e.status)
        };
        assert_eq!(status(r#"{"mode": "warm"}"#), None);
        assert_eq!(status(r#"{"mode": "warm", "binary": "/bin/sh"}"#), None);
        assert_eq!(status(""), Some(400));
        assert_eq!(status("{}"), Some(400));
        assert_eq!(status(r#"{"mode": "warm", "bogus": 1}"#), Some(400));
        assert_eq!(status(r#"{"mode": "cold"}"#), Some(400));
        // Not what the document allows: 400.
        assert_eq!(status(r#"{"mode": "warm", "binary": null}"#), Some(400));
        assert_eq!(status(r#"{"mode": "warm", "binary": ""}"#), Some(400));
        assert_eq!(status(r#"{"mode": "warm", "binary": 7}"#), Some(400));
        // Well-formed, but not an executable file here: 422.
        assert_eq!(
            status(r#"{"mode": "warm", "binary": "/nonexistent"}"#),
            Some(422)
        );
        assert_eq!(status(r#"{"mode": "warm", "binary": "/etc"}"#), Some(422));
        assert_eq!(
            status(r#"{"mode": "warm", "binary": "/etc/passwd"}"#),
            Some(422)
        );
        assert_eq!(status(r#"{"mode": "warm", "binary": "sh"}"#), Some(422));
        let e = ApiState::parse_reboot(br#"{"mode": "cold"}"#).unwrap_err();
        assert!(e.message.contains("only mode is \"warm\""), "{}", e.message);
    }

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
