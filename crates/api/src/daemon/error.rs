//! Why the daemon could not run, with the cause kept as its source, and whose fault it is:
//! the operator's input (exit status 2) or the host's (3).

use std::net::SocketAddr;
use std::path::PathBuf;

use warmvm_vmm::aging_config::AgingConfigError;
use warmvm_vmm::{ConfigError, HostError, InheritedTapError};

use crate::privileges::PrivilegeError;
use crate::reboot::bring_back::ManifestError;
use crate::reboot::takeover::TakeoverError;
use crate::socket::SocketError;
use crate::state_lock::LockError;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file cannot be read, parsed, or describes VMs this host cannot run.
    #[error(transparent)]
    Config(ConfigError),
    /// The config's `[aging]` section.
    #[error("{}: {source}", path.display())]
    Aging {
        path: PathBuf,
        #[source]
        source: AgingConfigError,
    },
    /// A `tap_fd` the config names is not an inherited TAP.
    #[error(transparent)]
    InheritedTap(#[from] InheritedTapError),
    /// A flag's value is out of range (the limits, the console's, the metrics address).
    #[error("{0}")]
    Flag(String),
    /// The migration flags, their certificate files, or binding the listener.
    #[error(transparent)]
    Migration(crate::migration::SetupError),
    /// The fleet flags (or the config's `[fleet]`), their TLS files, or the fleet agent's
    /// thread.
    #[error("fleet: {}", chain(.0))]
    Fleet(warmvm_fleet::FleetError),
    /// A path flag cannot be made absolute.
    #[error("{flag} {}: {source}", path.display())]
    Path {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--socket {}: the directory {} does not exist", socket.display(), dir.display())]
    NoSocketDir { socket: PathBuf, dir: PathBuf },
    /// The user or group to drop to, as configured.
    #[error(transparent)]
    Privileges(PrivilegeError),
    /// A manifest of an interrupted reboot that cannot be trusted.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot create the {what} directory {}: {source}", dir.display())]
    CreateDir {
        what: &'static str,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another daemon holds the state directory, or its lock file cannot be made.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Dropping to the configured user failed on this host.
    #[error(transparent)]
    DropPrivileges(PrivilegeError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// `what` is "serve the API", "serve metrics", ...
    #[error("cannot {what}: {source}")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the API server failed: {0}")]
    Server(#[source] std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] warmvm_sandbox::SandboxError),
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
}

/// An error and its causes on one line (the daemon's start-up error is one line).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl DaemonError {
    /// Whether the operator's input is at fault (config, flags, files they named), rather
    /// than the host (no KVM, the socket taken, I/O errors).
    pub fn is_input(&self) -> bool {
        match self {
            DaemonError::Config(_)
            | DaemonError::Aging { .. }
            | DaemonError::InheritedTap(_)
            | DaemonError::Flag(_)
            | DaemonError::Path { .. }
            | DaemonError::NoSocketDir { .. }
            | DaemonError::Privileges(_)
            | DaemonError::Manifest(_) => true,
            DaemonError::Takeover(e) => e.is_input(),
            DaemonError::Migration(e) => e.is_input(),
            DaemonError::Fleet(e) => !matches!(e, warmvm_fleet::FleetError::Runtime(_)),
            // A VM of the config that this host cannot create is the config's fault;
            // KVM itself failing is the host's.
            DaemonError::Host(e) => !matches!(e, HostError::Hypervisor(_) | HostError::Vm { .. }),
            DaemonError::CreateDir { .. }
            | DaemonError::Lock(_)
            | DaemonError::DropPrivileges(_)
            | DaemonError::Socket(_)
            | DaemonError::MetricsListen { .. }
            | DaemonError::Signals(_)
            | DaemonError::Serve { .. }
            | DaemonError::Server(_)
            | DaemonError::Sandbox(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_files_are_the_operators_fault_and_the_host_its_own() {
        assert!(DaemonError::Takeover(TakeoverError::FdTooLow).is_input());
        assert!(DaemonError::Flag("--metrics-addr: not loopback".into()).is_input());
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(!DaemonError::Signals(io()).is_input());
        assert!(!DaemonError::CreateDir {
            what: "state",
            dir: "/x".into(),
            source: io()
        }
        .is_input());
    }

    #[test]
    fn the_cause_is_kept_as_the_source() {
        let e = DaemonError::Serve {
            what: "serve the API",
            source: std::io::Error::other("no fds left"),
        };
        assert_eq!(e.to_string(), "cannot serve the API: no fds left");
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("no fds left"));
    }
}
