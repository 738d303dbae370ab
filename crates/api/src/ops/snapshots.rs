//! `PUT /v1/vms/{name}/snapshot` and `POST /v1/restore`: VM snapshots on disk.

use warmvm_vmm::snapshot::{self, SaveReport};
use warmvm_vmm::VmReport;

use crate::state::{snapshot_error_status, ApiError, ApiState};
use crate::types::{RestoreRequest, SnapshotRequest};

fn absolute(what: &str, dir: &std::path::Path) -> Result<(), ApiError> {
    if dir.as_os_str().is_empty() || !dir.is_absolute() {
        return Err(ApiError::new(
            400,
            format!(
                "{what} must be an absolute path, not {:?}",
                dir.display().to_string()
            ),
        ));
    }
    Ok(())
}

impl ApiState {
    /// Snapshot a running or paused VM into a directory.
    pub fn snapshot(&self, name: &str, req: &SnapshotRequest) -> Result<SaveReport, ApiError> {
        absolute("dir", &req.dir)?;
        let _gate = self.op_gate()?;
        self.refuse_migrating(name)?;
        let vm = self.find(name)?;
        let report = snapshot::save(&vm, &req.dir, !req.leave_paused)
            .map_err(|e| ApiError::new(snapshot_error_status(&e), e.to_string()))?;
        Ok(report)
    }

    /// Create a VM from a snapshot and let it run as it was.
    pub fn restore(&self, req: &RestoreRequest) -> Result<VmReport, ApiError> {
        absolute("dir", &req.dir)?;
        if let Some(n) = &req.name {
            warmvm_vmm::config::validate_name(n).map_err(|e| ApiError::new(400, e.to_string()))?;
        }
        if req.disks.len() > warmvm_vmm::config::MAX_DISKS
            || req.taps.len() > warmvm_vmm::config::MAX_NETS
        {
            return Err(ApiError::new(
                400,
                format!(
                    "at most {} disks and {} taps",
                    warmvm_vmm::config::MAX_DISKS,
                    warmvm_vmm::config::MAX_NETS
                ),
            ));
        }
        for (i, d) in req.disks.iter().enumerate() {
            absolute(&format!("disks[{i}]"), d)?;
        }
        if let Some(t) = req
            .taps
            .iter()
            .find(|t| !warmvm_vmm::devices::virtio::tap::valid_name(t))
        {
            return Err(ApiError::new(
                400,
                format!("TAP name {t:?} is invalid: 1-15 characters from A-Z a-z 0-9 . _ -"),
            ));
        }
        let backing = snapshot::Backing {
            disks: req.disks.clone(),
            taps: req.taps.clone(),
        };
        let mut host = self.lock_for_change()?;
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::new(503, "the daemon is shutting down"));
        }
        let (vm, r) = host.restore_snapshot(&req.dir, req.name.as_deref(), &backing)?;
        drop(host);
        tracing::info!(vm = %vm.name(), dir = %req.dir.display(), ram_ms = r.ram_us / 1000,
            "VM restored from a snapshot");
        Ok(vm.report())
    }
}
