//! What an API operation's failure answers: [`ApiError`], and the HTTP status of each error
//! the VMM can return, as docs/openapi.json documents them.

use warmvm_vmm::handover::Phase;
use warmvm_vmm::snapshot::SnapshotError;
use warmvm_vmm::{ConfigError, HostError, VmConfig, VmError};

use crate::http::Response;

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

    pub(crate) fn in_phase(mut self, phase: Phase) -> Self {
        self.phase = Some(phase);
        self
    }

    pub(super) fn response(&self) -> Response {
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
pub(super) fn vm_error_status(err: &VmError, config: Option<&VmConfig>) -> u16 {
    let has_kernel = config.is_some_and(|c| c.kernel.is_some());
    let hugepages = config.is_some_and(|c| c.hugepages);
    match err {
        VmError::InvalidTransition { .. } => 409,
        // A disk image the client named cannot be used as asked (O_DIRECT, size).
        VmError::Disk(_) => 422,
        // A TAP that cannot be created or attached to (permissions, a name in use).
        VmError::Tap(_) => 422,
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
        | ConfigError::TooManyDisks { .. }
        | ConfigError::TooManyNets { .. }
        | ConfigError::EmptyPath { .. }
        // The document's pattern "^/" rules it out.
        | ConfigError::RelativePath { .. }
        | ConfigError::RelativeStateDir { .. } => 400,
        // Well-formed, but not possible with these files, this host, or together.
        ConfigError::MemoryTooLarge { .. }
        | ConfigError::HugeMemoryOdd { .. }
        | ConfigError::BadVcpus { .. }
        | ConfigError::Kernel { .. }
        | ConfigError::Initrd { .. }
        | ConfigError::InitrdWithoutKernel { .. }
        | ConfigError::Ring3WithKernel { .. }
        | ConfigError::BadCmdline { .. }
        | ConfigError::Disk { .. }
        | ConfigError::DuplicateDisk { .. }
        // The document cannot express the name and address rules: refused as unusable.
        | ConfigError::BadTap { .. }
        | ConfigError::TapOrFd { .. }
        | ConfigError::BadTapFd { .. }
        | ConfigError::BadMac { .. } => 422,
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
            HostError::Snapshot(s) => snapshot_error_status(s),
        };
        Self::new(status, e.to_string())
    }
}

/// 409 for a VM or directory in the wrong state; 422 for a snapshot this host cannot use
/// (missing, truncated, corrupt, foreign, another format); 507 for a full disk.
pub(crate) fn snapshot_error_status(e: &SnapshotError) -> u16 {
    match e {
        SnapshotError::NotLive { .. } | SnapshotError::Exists(_) | SnapshotError::InUse { .. } => {
            409
        }
        SnapshotError::BadBacking { .. } => 422,
        SnapshotError::NoSnapshot(_)
        | SnapshotError::State { .. }
        | SnapshotError::Truncated { .. }
        | SnapshotError::Corrupt { .. } => 422,
        SnapshotError::Io { err, .. } if err.raw_os_error() == Some(libc::ENOSPC) => 507,
        SnapshotError::Io { err, .. }
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            422
        }
        SnapshotError::Vm { err, .. } => vm_error_status(err, None),
        SnapshotError::Io { .. } | SnapshotError::Capture { .. } | SnapshotError::Writer { .. } => {
            500
        }
    }
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
}
