//! What a subcommand that failed hands the binary: one line (an error and its sources) and
//! an exit status.

use warmvm_vmm::{ConfigError, DeviceError, HostError, VmError};

pub use warmvm_cli_common::exit::{EXIT_BAD_INPUT, EXIT_HOST, EXIT_VM_FAILED};

/// A failure the binary turns into one line and an exit status.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        let code = match &e {
            HostError::Hypervisor(_) => EXIT_HOST,
            HostError::Config(_)
            | HostError::Exists(_)
            | HostError::NotFound(_)
            | HostError::StillRunning(_)
            | HostError::Snapshot(_) => EXIT_BAD_INPUT,
            HostError::Vm { err, .. } => match err {
                VmError::Boot(_)
                | VmError::ReadFile { .. }
                | VmError::Devices(DeviceError::DiskImage { .. }) => EXIT_BAD_INPUT,
                _ => EXIT_HOST,
            },
        };
        Self::new(code, chain(&e))
    }
}

/// The operator's config or flags (2), or the host (3).
impl From<warmvm_api::DaemonError> for Failure {
    fn from(e: warmvm_api::DaemonError) -> Self {
        let code = if e.is_input() {
            EXIT_BAD_INPUT
        } else {
            EXIT_HOST
        };
        Self::new(code, chain(&e))
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::new(EXIT_BAD_INPUT, chain(&e))
    }
}

/// `e`'s message and its sources', on one line joined with ": ". A message that already
/// ends with its source's (the one-line messages the API shows include their cause) does
/// not repeat it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

#[cfg(test)]
mod error_chain_tests {
    use super::*;

    /// An error whose message leaves its cause to the chain.
    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot boot VM a")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn the_chain_is_one_line_joined_with_colons() {
        let e = Outer(std::io::Error::other("the disk is gone"));
        assert_eq!(chain(&e), "cannot boot VM a: the disk is gone");
    }

    #[test]
    fn a_cause_the_message_already_ends_with_is_not_repeated() {
        let e = HostError::Vm {
            vm: "a".into(),
            err: VmError::Thread(std::io::Error::other("no threads left")),
        };
        let failure = Failure::from(e);
        assert_eq!(
            failure.message,
            "VM a: cannot start a vCPU thread: no threads left"
        );
        assert_eq!(failure.code, EXIT_HOST);
    }
}
