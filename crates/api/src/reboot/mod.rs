//! The reboot room: `PUT /v1/reboot` and every other reboot of the daemon (a panic, aging,
//! the schedule). Here are the request's checks and the one entry point,
//! [`ApiState::reboot_for`], which takes a typed [`RebootRequest`] and records why; the
//! saved and cold modes ([`modes`]); the bring-back manifest and its types
//! ([`bring_back`]); what the daemon hands the next one ([`successor`]); and the daemon's
//! own triggers, a panic and the aging policy (`rejuvenation`); and the takeover in the new
//! daemon ([`takeover`]), which decodes the [`successor::Successor`] while staging.
//!
//! Inside: `modes` and `successor` use `bring_back`; `rejuvenation` calls the flow
//! ([`ApiState::rejuvenate`]) with a typed request, like the router.

pub mod bring_back;
pub mod modes;
pub(crate) mod rejuvenation;
pub mod successor;
pub mod takeover;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use warmvm_vmm::handover::faults::{self, Point};
use warmvm_vmm::handover::{self, RebootOptions, RebootReport};

use crate::aging::RebootReason;
use crate::state::{ApiError, ApiState};
use crate::types::Mode;
pub use crate::types::{RebootRequest, READY_BUDGET_MS, REBOOT_TIMEOUT, STAGE_TIMEOUT_MS};
use crate::types::{DEFAULT_STOP_GRACE_SECS, MAX_STOP_GRACE_SECS};
use successor::Successor;

/// How long a warm reboot waits for VM operations under way before it gives up (409).
const GATE_TIMEOUT: Duration = Duration::from_secs(5);

impl ApiState {
    /// Check an operator's reboot request: a mode, timeouts in range, and a binary this
    /// daemon can run (the one named, or the path it was started from).
    pub fn parse_reboot(body: &[u8]) -> Result<(RebootRequest, PathBuf), ApiError> {
        let req = Self::parse_reboot_request(body)?;
        let binary = reboot_binary(&req, &RebootReason::Manual)?;
        Ok((req, binary))
    }

    /// Check a reboot request's fields, but not yet which binary it runs.
    pub(crate) fn parse_reboot_request(body: &[u8]) -> Result<RebootRequest, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::new(
                400,
                r#"the request body must be JSON, e.g. {"mode": "warm"}"#,
            ));
        }
        let req: RebootRequest = serde_json::from_slice(body).map_err(|e| {
            // A mode none of the three is said as such, not as a malformed body.
            let text = e.to_string();
            match text
                .strip_prefix(Mode::UNSUPPORTED)
                .and(text.rsplit_once(" at line "))
            {
                Some((why, _)) => ApiError::new(400, why),
                None => ApiError::new(400, format!("invalid reboot request: {text}")),
            }
        })?;
        Self::check_reboot_request(&req)?;
        Ok(req)
    }

    /// Check a typed reboot request's values (the mode is one by its type).
    fn check_reboot_request(req: &RebootRequest) -> Result<(), ApiError> {
        if let Some(g) = req.grace_secs.filter(|g| *g > MAX_STOP_GRACE_SECS) {
            return Err(ApiError::new(
                400,
                format!("grace_secs = {g} is out of range: use 0 to {MAX_STOP_GRACE_SECS}"),
            ));
        }
        if let Some(w) = req
            .boot_wait_secs
            .filter(|w| !modes::BOOT_WAIT_SECS.contains(w))
        {
            return Err(ApiError::new(
                400,
                format!(
                    "boot_wait_secs = {w} is out of range: use {} to {}",
                    modes::BOOT_WAIT_SECS.start(),
                    modes::BOOT_WAIT_SECS.end()
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
        Ok(())
    }

    /// Warm reboot: hand every VM to a new daemon process (see
    /// [`warmvm_vmm::handover`]). On success this daemon's server is stopped, the Host lock
    /// stays taken for good (nothing here may touch the handed-over VMs again) and the
    /// caller must exit once the answer is sent. On failure the VMs run on here.
    pub fn reboot(&self, req: &RebootRequest) -> Result<RebootReport, ApiError> {
        self.reboot_for(req, RebootReason::Manual)
    }

    /// A reboot for `reason`, which the new daemon records in its reboot history.
    pub fn reboot_for(
        &self,
        req: &RebootRequest,
        reason: RebootReason,
    ) -> Result<RebootReport, ApiError> {
        Self::check_reboot_request(req)?;
        let binary = reboot_binary(req, &reason)?;
        let setup = self.reboot.get().ok_or_else(|| {
            ApiError::new(
                409,
                "this daemon cannot warm-reboot (it was started without a server)",
            )
        })?;
        // From here on requests that change anything are refused (409); the server serves
        // on until the handover (see `before_blackout` below).
        struct Done<'a>(&'a ApiState);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                // The Host lock is free again (dropped before this): readers read it.
                self.0.set_view(None);
                self.0.progress.end();
                self.0.handing_over.store(false, Ordering::SeqCst);
                self.0.rebooting.store(false, Ordering::SeqCst);
            }
        }
        if self.rebooting.swap(true, Ordering::SeqCst) {
            return Err(ApiError::new(
                409,
                "a reboot is already under way (or the VMs of the last one are being brought back)",
            ));
        }
        let done = Done(self);
        let mode = req.mode;
        self.progress.begin(mode.name(), "waiting", 0);
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
        // A migration under way holds a VM that is neither fully here nor there: the
        // new daemon could not take it over. (None starts now: they pass the gate.)
        if let Some(why) = self.migrations.any() {
            drop(gate);
            return Err(ApiError::new(
                409,
                format!("{why}; retry the reboot when it is done"),
            ));
        }
        let mut host = self.lock();
        // Held for the whole reboot: readers see these VMs instead of waiting for it.
        self.set_view(Some(host.vms().to_vec()));
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(503, "the daemon is shutting down"));
        }
        let manifest = bring_back::path(host.state_dir());
        if mode != Mode::Warm && manifest.exists() {
            // Left by an interrupted reboot: it may be the only record of some VMs.
            return Err(ApiError::new(
                409,
                format!(
                    "{} exists (left by an interrupted saved or cold reboot): restart the daemon to bring its VMs back, or remove it; nothing changed",
                    manifest.display()
                ),
            ));
        }
        // Saved and cold: the VMs leave memory first; they are held aside until the new
        // daemon has taken over, and run on here if it does not.
        let prepared = match mode {
            Mode::Warm => None,
            Mode::Saved => Some(modes::save_all(&mut host, &self.progress)?),
            Mode::Cold => Some(modes::stop_all(
                &mut host,
                Duration::from_secs(req.grace_secs.unwrap_or(DEFAULT_STOP_GRACE_SECS)),
                &self.progress,
            )),
        };
        // The VMs held aside are written down before anything can take them over: whoever
        // has them when a process dies, the manifest lets the next daemon bring them back.
        if let Some((bb, _)) = &prepared {
            if let Err(e) = bring_back::write(&manifest, bb) {
                let undone =
                    prepared.map(|(bb, held)| modes::undo(&mut host, held, &bb, &manifest));
                return Err(undo_failed(
                    ApiError::new(
                        500,
                        format!(
                            "{} reboot failed; the VMs run on in this daemon: {e}",
                            mode.name()
                        ),
                    ),
                    undone,
                ));
            }
            faults::hit(Point::OldManifest);
        }
        let base = Successor::new(
            setup.stage_timeout,
            setup.ready_budget,
            setup.limits,
            setup.hands_lock,
        );
        let mut successor = self.successor(&base, reason.clone());
        successor.boot_wait_ms = req.boot_wait_secs.map(|w| w * 1000);
        #[allow(unused_mut)]
        let mut bring_back = prepared.as_ref().map(|(bb, _)| bb.clone());
        // Test builds: stand in for a successor that reads another format.
        #[cfg(feature = "fault-injection")]
        if let (Some(bb), Some(n)) = (
            bring_back.as_mut(),
            std::env::var("WARMVM_FAULT_BRING_BACK_VERSION")
                .ok()
                .and_then(|n| n.parse::<u32>().ok()),
        ) {
            bb.version = n;
        }
        successor.bring_back = bring_back;
        #[allow(unused_mut)]
        let mut extra = match successor.encode() {
            Ok(v) => v,
            Err(e) => {
                let undone =
                    prepared.map(|(bb, held)| modes::undo(&mut host, held, &bb, &manifest));
                return Err(undo_failed(
                    ApiError::new(500, format!("cannot encode the VMs: {e}")),
                    undone,
                ));
            }
        };
        // Test builds: stand in for a daemon of a build whose successor settings are of
        // another version.
        #[cfg(feature = "fault-injection")]
        if let Some(n) = std::env::var("WARMVM_FAULT_SUCCESSOR_VERSION")
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
        {
            extra[crate::reboot::successor::VERSION_KEY] = n.into();
        }
        // Cold: the powered-off VMs held here keep their TAPs attached; the new daemon
        // boots them on these (kept open until this process exits or undoes the reboot).
        let cold_taps = match &prepared {
            Some((bb, held)) if bb.mode == Mode::Cold => modes::cold_taps(held),
            _ => Vec::new(),
        };
        let mut extra_fds = setup.extra_fds.clone();
        extra_fds.extend(
            cold_taps
                .iter()
                .map(|(name, fd)| (name.clone(), std::os::fd::AsRawFd::as_raw_fd(fd))),
        );
        // Once the new daemon is prepared: stop taking connections (they wait in the
        // backlog, for the new daemon or for this one if the reboot fails), and let the API
        // requests under way (ours aside) finish, so that none is cut off when this
        // process exits; at most the reboot grace, so a slow or stuck client cannot hold
        // the reboot up for longer. The guests still run meanwhile.
        let before_blackout = {
            let handing_over = self.handing_over.clone();
            let accepting = self.accepting.clone();
            let progress = self.progress.clone();
            let connections = self.connections.clone();
            let grace = *self.reboot_grace.lock().unwrap_or_else(|p| p.into_inner());
            move || {
                handing_over.store(true, Ordering::SeqCst);
                // A connection being accepted as the flag changed is counted once this
                // is free.
                drop(accepting.lock().unwrap_or_else(|p| p.into_inner()));
                progress.phase("handover", 0);
                let waited_until = Instant::now() + grace;
                while connections.load(Ordering::SeqCst) > 1 && Instant::now() < waited_until {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        self.progress.phase("starting", 0);
        let opts = RebootOptions {
            before_blackout: Some(Box::new(before_blackout)),
            binary: binary.clone(),
            args: setup.args.clone(),
            stage_timeout: req
                .stage_timeout_ms
                .map_or(setup.stage_timeout, Duration::from_millis),
            ready_budget: req
                .ready_budget_ms
                .map_or(setup.ready_budget, Duration::from_millis),
            extra,
            extra_fds,
            env: setup.env.clone(),
        };
        tracing::info!(binary = %binary.display(), vms = host.vms().len(), %reason, mode = mode.name(), "reboot");
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
                // VMs held aside (paused or ended) go with this process.
                std::mem::forget(prepared);
                // So do the settings handed over: with a full aging history they are
                // millions of small allocations, whose freeing (seconds of CPU in a debug
                // build on a busy host) would come before the answer, while the
                // fallback that exits without one is already counting.
                std::mem::forget(opts);
                std::mem::forget(successor);
                Ok(handed.report)
            }
            Err(e) => {
                // Let go of the TAPs first: undoing a cold reboot attaches to them again.
                drop(cold_taps);
                let undone =
                    prepared.map(|(bb, held)| modes::undo(&mut host, held, &bb, &manifest));
                let status = if e.is_refusal() { 409 } else { 500 };
                Err(undo_failed(
                    ApiError::new(
                        status,
                        format!(
                            "{} reboot failed; the VMs run on in this daemon: {e}",
                            mode.name()
                        ),
                    )
                    .in_phase(e.phase),
                    undone,
                ))
            }
        }
    }

    /// A warm reboot into this very binary because this process hit a bug (a panic off the
    /// vCPU threads): on success the caller must exit at once.
    pub fn emergency_reboot(&self) -> Result<RebootReport, ApiError> {
        self.rejuvenate(RebootReason::Panic)
    }

    /// A warm reboot into this very binary for `reason` (a bug, aging, the schedule): on
    /// success the caller must exit at once.
    pub fn rejuvenate(&self, reason: RebootReason) -> Result<RebootReport, ApiError> {
        self.reboot_for(&RebootRequest::new(Mode::Warm), reason)
    }

    /// The daemon's settings for its successor, plus the aging state, why it reboots and
    /// this executable.
    fn successor(&self, base: &Successor, reason: RebootReason) -> Successor {
        let mut s = base.clone();
        if let Some(m) = self.aging() {
            s.aging = Some(m.carry(reason).encode());
            // So that a successor that cannot read the state still knows the configuration.
            s.aging_configured = m.configured().and_then(|c| serde_json::to_value(c).ok());
        }
        s.previous_binary = Some(warmvm_vmm::executable::info());
        s.fleet_lease = self.fleet().and_then(|f| f.lease());
        s
    }
}

/// A failed reboot's error, unless undoing it failed too: then the VMs do not run on here
/// but stay left to the bring-back manifest, or some could not be resumed or booted again
/// here, and the error says that instead.
fn undo_failed(err: ApiError, undone: Option<Result<(), modes::UndoError>>) -> ApiError {
    let rest = match undone {
        Some(Err(e @ modes::UndoError::Manifest(_))) => ("", e),
        Some(Err(e @ modes::UndoError::NotRunning(_))) => ("; the VMs stay in this daemon", e),
        _ => return err,
    };
    ApiError {
        message: format!(
            "{}; but {}",
            err.message
                .replace("; the VMs run on in this daemon", rest.0),
            rest.1
        ),
        ..err
    }
}

/// The binary a reboot for `reason` starts. The one the request names; else, when an
/// operator asked, the path this daemon was started from, so that a build installed there
/// since is what runs next (an upgrade); else (a panic, aging, the schedule) the running
/// image itself: a rejuvenation nobody asked for at that moment must not switch builds,
/// nor depend on the installed file. Refused before anything pauses when the binary is
/// relative (400: the document rules it out), missing (404) or not executable by this
/// daemon, which may have dropped its privileges (409); a default that does not run is the
/// daemon's state, not the request's: 409.
fn reboot_binary(req: &RebootRequest, reason: &RebootReason) -> Result<PathBuf, ApiError> {
    use warmvm_vmm::executable;
    match &req.binary {
        Some(b) => {
            if b.as_os_str().is_empty() {
                return Err(ApiError::new(400, "binary must be a path, not empty"));
            }
            if !b.is_absolute() {
                return Err(ApiError::new(
                    400,
                    format!(
                        "binary must be an absolute path, not {:?}",
                        b.display().to_string()
                    ),
                ));
            }
            // A well-formed request naming a file this host cannot run.
            executable::check_runnable(b).map_err(|why| {
                let status = match std::fs::metadata(b) {
                    Err(e) => crate::state::file_status(&e),
                    Ok(_) => 409,
                };
                ApiError::new(status, format!("binary {}: {why}", b.display()))
            })?;
            Ok(b.clone())
        }
        None if *reason == RebootReason::Manual => {
            let path = executable::started_from().map_err(|e| {
                ApiError::new(
                    409,
                    format!("cannot tell the path this daemon was started from ({e}): name the new build with \"binary\"; nothing changed"),
                )
            })?;
            executable::check_runnable(path).map_err(|why| {
                ApiError::new(
                    409,
                    format!(
                        "{} (the path this daemon was started from, which a reboot runs again): {why}; install a build there or name one with \"binary\"; nothing changed",
                        path.display()
                    ),
                )
            })?;
            Ok(path.to_path_buf())
        }
        None => Ok(handover::this_binary()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(status(r#"{"mode": "cold"}"#), None);
        assert_eq!(status(r#"{"mode": "saved"}"#), None);
        assert_eq!(status(r#"{"mode": "cold", "grace_secs": 3}"#), None);
        assert_eq!(
            status(r#"{"mode": "cold", "grace_secs": 99999}"#),
            Some(400)
        );
        assert_eq!(status(r#"{"mode": "cold", "grace_secs": null}"#), Some(400));
        assert_eq!(status(r#"{"mode": "cold", "boot_wait_secs": 5}"#), None);
        assert_eq!(
            status(r#"{"mode": "cold", "boot_wait_secs": 0}"#),
            Some(400)
        );
        assert_eq!(
            status(r#"{"mode": "cold", "boot_wait_secs": 3601}"#),
            Some(400)
        );
        assert_eq!(
            status(r#"{"mode": "cold", "boot_wait_secs": null}"#),
            Some(400)
        );
        assert_eq!(status(r#"{"mode": "hot"}"#), Some(400));
        // Not what the document allows: 400.
        assert_eq!(status(r#"{"mode": "warm", "binary": null}"#), Some(400));
        assert_eq!(status(r#"{"mode": "warm", "binary": ""}"#), Some(400));
        assert_eq!(status(r#"{"mode": "warm", "binary": 7}"#), Some(400));
        // Relative: the document's pattern rules it out.
        assert_eq!(status(r#"{"mode": "warm", "binary": "sh"}"#), Some(400));
        // Well-formed, but no file there (404) or not an executable file (409): the host's
        // state, so that a request the document allows is never refused as malformed.
        assert_eq!(
            status(r#"{"mode": "warm", "binary": "/nonexistent"}"#),
            Some(404)
        );
        assert_eq!(
            status(r#"{"mode": "warm", "binary": "/etc/passwd/x"}"#),
            Some(404)
        );
        assert_eq!(status(r#"{"mode": "warm", "binary": "/etc"}"#), Some(409));
        assert_eq!(
            status(r#"{"mode": "warm", "binary": "/etc/passwd"}"#),
            Some(409)
        );
        let e = ApiState::parse_reboot(br#"{"mode": "hot"}"#).unwrap_err();
        assert!(
            e.message.contains("use \"warm\", \"saved\" or \"cold\""),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_operators_reboot_starts_the_path_a_rejuvenation_the_running_image() {
        let req = RebootRequest::new(Mode::Warm);
        let started = warmvm_vmm::executable::started_from()
            .unwrap()
            .to_path_buf();
        assert_eq!(reboot_binary(&req, &RebootReason::Manual).unwrap(), started);
        for reason in [RebootReason::Panic, RebootReason::Schedule] {
            assert_eq!(
                reboot_binary(&req, &reason).unwrap(),
                handover::this_binary()
            );
        }
        // A binary the request names is started whatever the reason.
        let named = RebootRequest {
            binary: Some("/bin/sh".into()),
            ..req
        };
        assert_eq!(
            reboot_binary(&named, &RebootReason::Schedule).unwrap(),
            PathBuf::from("/bin/sh")
        );
    }
}
