//! The daemon's operations, typed: what each API request does, as methods of
//! [`ApiState`] that take the request's typed body ([`crate::types`]) and return its typed
//! answer or an [`ApiError`] with the status it maps to. The HTTP router
//! ([`crate::router`]) decodes requests into these types and encodes the answers; tests,
//! the aging monitor and the rejuvenation thread call the same methods without HTTP.
//!
//! The reboot's operation is [`ApiState::reboot`] / [`ApiState::reboot_for`], in
//! [`crate::reboot`].

use std::sync::atomic::Ordering;
use std::time::Duration;
use warmvm_vmm::Pausable;

use warmvm_vmm::{HostError, Lifecycle, VmConfig, VmReport};

use crate::aging::HoldRequest;
use crate::state::{vm_error_status, ApiError, ApiState};
use crate::types::{
    DaemonStatus, StopRequest, VmList, DEFAULT_STOP_GRACE_SECS, MAX_STOP_GRACE_SECS,
};

mod snapshots;

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

impl ApiState {
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
            privileges: Some(privileges),
            binary: Some(warmvm_vmm::executable::info()),
            reboot_in_progress: self.reboot_in_progress(),
            fleet: self.fleet().map(|f| f.status()),
        })
    }

    pub fn list(&self) -> VmList {
        VmList {
            vms: self.vms().iter().map(|v| v.report()).collect(),
        }
    }

    /// Create a VM from `config` with the fds its request passed (a network interface's
    /// `tap_fd` is the position of its TAP among them; every fd passed must be used), and
    /// start it.
    pub fn create_with_fds(
        &self,
        config: &VmConfig,
        fds: Vec<std::fs::File>,
    ) -> Result<VmReport, ApiError> {
        let taps = given_taps(config, fds)?;
        self.create_config_with(config, taps)
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
        self.fleet_changed();
        Ok(vm.report())
    }

    pub fn pause(&self, name: &str) -> Result<VmReport, ApiError> {
        let _gate = self.op_gate()?;
        self.refuse_migrating(name)?;
        let vm = self.find(name)?;
        vm.pause()
            .map_err(|e| ApiError::new(vm_error_status(&e, None), e.to_string()))?;
        tracing::info!(vm = %name, "VM paused");
        Ok(vm.report())
    }

    pub fn resume(&self, name: &str) -> Result<VmReport, ApiError> {
        let _gate = self.op_gate()?;
        self.refuse_migrating(name)?;
        let vm = self.find(name)?;
        vm.resume()
            .map_err(|e| ApiError::new(vm_error_status(&e, None), e.to_string()))?;
        tracing::info!(vm = %name, "VM resumed");
        Ok(vm.report())
    }

    /// Ask the guest to power off; force it after the grace period.
    pub fn stop(&self, name: &str, req: &StopRequest) -> Result<VmReport, ApiError> {
        let grace = req.grace_secs.unwrap_or(DEFAULT_STOP_GRACE_SECS);
        if grace > MAX_STOP_GRACE_SECS {
            return Err(ApiError::new(
                400,
                format!("grace_secs must be at most {MAX_STOP_GRACE_SECS}"),
            ));
        }
        let _gate = self.op_gate()?;
        self.refuse_migrating(name)?;
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
            self.refuse_migrating(name)?;
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
        self.fleet_changed();
        Ok(report)
    }

    /// `PUT /v1/aging/hold`: hold the aging monitor's reboots, or let them go again.
    pub fn hold(&self, req: &HoldRequest) -> Result<crate::aging::AgingReport, ApiError> {
        let monitor = self.aging_or_404()?;
        // The hold travels to the new daemon with the aging state, taken as the reboot
        // starts: one set later would be lost.
        self.refuse_while_rebooting()?;
        monitor.set_hold(req.hold);
        Ok(monitor.report())
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
    use crate::types::StopRequest;

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
