//! What an API operation's failure answers: [`ApiError`], and the HTTP status of each error
//! the VMM can return, as docs/openapi.json documents them.

use warmvm_vmm::handover::Phase;
use warmvm_vmm::snapshot::SnapshotError;
use warmvm_vmm::{ConfigError, DeviceError, HostError, VmConfig, VmError};

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

    pub(crate) fn response(&self) -> Response {
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

/// The status of a refusal because of a file on the host: 404 when the path names nothing
/// (or a directory on it is missing), 409 when it names something this request cannot use
/// as asked (not a kernel, not executable, a directory, no permission).
pub(crate) fn file_status(err: &std::io::Error) -> u16 {
    match err.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => 404,
        _ => 409,
    }
}

/// The status of a VM operation that failed; `config` is the VM's, for a creation.
///
/// The statuses' meaning, as docs/openapi.json lists them: 400 the request does not match the
/// document (which states every rule a request alone can break); the rest answer a request
/// that matches it but meets the host's state: 404 a file it names does not exist; 409 it
/// does not fit the state of the VM, of a file it names (not a kernel, an image of a bad
/// size, a TAP in use), of the host (more RAM than it has, huge pages it has not reserved) or
/// of its other VMs; 500 the host failed. Not 507 for too little RAM: a 5xx says the server
/// failed, and nothing failed; 507 is kept for a disk that filled up while writing.
pub(crate) fn vm_error_status(err: &VmError, config: Option<&VmConfig>) -> u16 {
    let has_kernel = config.is_some_and(|c| c.kernel.is_some());
    let hugepages = config.is_some_and(|c| c.hugepages);
    match err {
        VmError::InvalidTransition { .. } => 409,
        // A disk image the client named cannot be used as asked (O_DIRECT, size, in use).
        VmError::Devices(DeviceError::Disk(_)) => 409,
        // A TAP that cannot be created or attached to (permissions, a name in use).
        VmError::Devices(DeviceError::Tap(_)) => 409,
        VmError::ConsoleLog { err, .. } => file_status(err),
        VmError::ReadFile { err, .. } | VmError::Devices(DeviceError::DiskImage { err, .. })
            if has_kernel =>
        {
            file_status(err)
        }
        // A kernel or initrd the client named is not one.
        VmError::Boot(_) if has_kernel => 409,
        // Huge pages the host has not reserved (or not enough of them).
        VmError::Memory(_) if hugepages => 409,
        _ => 500,
    }
}

fn config_error_status(err: &ConfigError) -> u16 {
    match err {
        // Valid on its own, but not next to the VMs this host already has.
        ConfigError::TotalMemoryTooLarge { .. } => 409,
        // More RAM than the host has.
        ConfigError::MemoryTooLarge { .. } => 409,
        // More vCPUs than this host's KVM supports (the document states the fixed limits).
        ConfigError::BadVcpus { .. } => 409,
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
        | ConfigError::RelativeStateDir { .. }
        | ConfigError::HugeMemoryOdd { .. }
        | ConfigError::InitrdWithoutKernel { .. }
        | ConfigError::Ring3WithKernel { .. }
        | ConfigError::BadCmdline { .. }
        | ConfigError::BadTap { .. }
        | ConfigError::TapOrFd { .. }
        | ConfigError::BadTapFd { .. }
        | ConfigError::BadMac { .. } => 400,
        // A file named that does not exist (404) or cannot be used (409).
        ConfigError::Kernel { err, .. }
        | ConfigError::Initrd { err, .. }
        | ConfigError::Disk { err, .. } => file_status(err),
        // The same image twice, perhaps under two names: it would be in use twice.
        ConfigError::DuplicateDisk { .. } => 409,
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

/// 404 for no snapshot (or no such directory); 409 for a VM or directory in the wrong state,
/// or a snapshot this host cannot use (truncated, corrupt, foreign, another format, fewer
/// devices than the request replaces); 507 for a full disk.
pub(crate) fn snapshot_error_status(e: &SnapshotError) -> u16 {
    match e {
        SnapshotError::NotLive { .. } | SnapshotError::Exists(_) | SnapshotError::InUse { .. } => {
            409
        }
        SnapshotError::NoSnapshot(_) => 404,
        SnapshotError::BadBacking { .. }
        | SnapshotError::State { .. }
        | SnapshotError::Truncated { .. }
        | SnapshotError::Corrupt { .. } => 409,
        SnapshotError::Io { err, .. } if err.raw_os_error() == Some(libc::ENOSPC) => 507,
        SnapshotError::Io { err, .. }
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::NotADirectory
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            file_status(err)
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
            state: warmvm_vmm::State::Running,
            action: warmvm_vmm::Action::Resume,
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

    /// A request the document allows is refused only with a status that says the host's
    /// state is why (404, 409), never with 400 or 422, which a client (and the contract test)
    /// takes for "your request is malformed", nor a 5xx, which says the server failed.
    #[test]
    fn refusals_for_the_hosts_state_are_404_or_409() {
        use std::io::{Error, ErrorKind};
        let c = |e: ConfigError| ApiError::from(HostError::Config(e)).status;
        let missing = || Error::from(ErrorKind::NotFound);
        let vm = || "a".to_string();
        for (err, status) in [
            (missing(), 404),
            (Error::from(ErrorKind::NotADirectory), 404),
            (Error::from(ErrorKind::PermissionDenied), 409),
            (Error::from(ErrorKind::InvalidData), 409),
        ] {
            let kind = err.kind();
            assert_eq!(file_status(&err), status, "{kind:?}");
            let path = std::path::PathBuf::from("/k");
            let e = ConfigError::Kernel {
                vm: vm(),
                path,
                err,
            };
            assert_eq!(c(e), status, "kernel {kind:?}");
        }
        let path = || std::path::PathBuf::from("/d");
        assert_eq!(
            c(ConfigError::Initrd {
                vm: vm(),
                path: path(),
                err: missing()
            }),
            404
        );
        assert_eq!(
            c(ConfigError::Disk {
                vm: vm(),
                path: path(),
                err: missing()
            }),
            404
        );
        assert_eq!(
            c(ConfigError::DuplicateDisk {
                vm: vm(),
                path: path()
            }),
            409
        );
        assert_eq!(
            c(ConfigError::MemoryTooLarge {
                vm: vm(),
                mib: 2,
                host_mib: 1
            }),
            409
        );
        assert_eq!(c(ConfigError::BadVcpus { vm: vm(), max: 1 }), 409);
        // The rules the document states (patterns, bounds, the VM config's allOf): 400.
        for e in [
            ConfigError::HugeMemoryOdd { vm: vm() },
            ConfigError::InitrdWithoutKernel { vm: vm() },
            ConfigError::Ring3WithKernel { vm: vm() },
            ConfigError::BadCmdline { vm: vm(), max: 1 },
            ConfigError::BadTap {
                vm: vm(),
                tap: "a b".into(),
            },
            ConfigError::TapOrFd { vm: vm() },
            ConfigError::BadTapFd { vm: vm(), fd: -1 },
            ConfigError::BadMac {
                vm: vm(),
                mac: "x".into(),
            },
            ConfigError::RelativePath {
                vm: vm(),
                what: "kernel",
                path: "k".into(),
            },
        ] {
            assert_eq!(c(e), 400);
        }
        let read = VmError::ReadFile {
            what: "kernel",
            path: path(),
            err: missing(),
        };
        let with_kernel = VmConfig {
            kernel: Some("/k".into()),
            ..VmConfig::reference("a", 64, 1)
        };
        assert_eq!(vm_error_status(&read, Some(&with_kernel)), 404);
        // The virtio devices' own failures, raised by the VM's device set-up.
        let disk = VmError::from(DeviceError::Disk(
            warmvm_vmm::devices::virtio::block::BlockError::Size {
                path: path(),
                size: 1,
            },
        ));
        assert_eq!(vm_error_status(&disk, None), 409);
        let tap = VmError::from(DeviceError::Tap(
            warmvm_vmm::devices::virtio::tap::TapError::BadName("a b".into()),
        ));
        assert_eq!(vm_error_status(&tap, None), 409);
        let image = VmError::from(DeviceError::DiskImage {
            path: path(),
            err: missing(),
        });
        assert_eq!(vm_error_status(&image, Some(&with_kernel)), 404);
        let log = VmError::ConsoleLog {
            path: path(),
            err: missing(),
        };
        assert_eq!(vm_error_status(&log, None), 404);
        let hugepages = VmConfig {
            hugepages: true,
            ..VmConfig::reference("a", 64, 1)
        };
        let no_pages = VmError::Memory(warmvm_memory::MemoryError::NoHugePages {
            need_mib: 64,
            free_mib: 0,
        });
        assert_eq!(vm_error_status(&no_pages, Some(&hugepages)), 409);
    }

    #[test]
    fn snapshot_refusals_say_what_the_host_lacks() {
        use std::io::{Error, ErrorKind};
        let dir = || std::path::PathBuf::from("/s");
        let io = |err: Error| SnapshotError::Io { path: dir(), err };
        assert_eq!(
            snapshot_error_status(&SnapshotError::NoSnapshot(dir())),
            404
        );
        assert_eq!(snapshot_error_status(&SnapshotError::Exists(dir())), 409);
        assert_eq!(
            snapshot_error_status(&SnapshotError::BadBacking {
                vm: "a".into(),
                reason: "x".into()
            }),
            409
        );
        assert_eq!(
            snapshot_error_status(&io(Error::from(ErrorKind::NotFound))),
            404
        );
        assert_eq!(
            snapshot_error_status(&io(Error::from(ErrorKind::PermissionDenied))),
            409
        );
        assert_eq!(
            snapshot_error_status(&io(Error::from_raw_os_error(libc::ENOSPC))),
            507
        );
        assert_eq!(snapshot_error_status(&io(Error::other("x"))), 500);
    }
}
