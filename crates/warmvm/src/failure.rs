//! The exit status each of the VMM's errors means for `warmvm` (the failure itself, one line
//! and a status, is [`warmvm_cli_common::failure::Failure`], which `warmvm-bench` shares).

use warmvm_vmm::{ConfigError, DeviceError, HostError, VmError};

pub use warmvm_cli_common::exit::{EXIT_BAD_INPUT, EXIT_HOST, EXIT_VM_FAILED};
pub use warmvm_cli_common::failure::Failure;

/// The host refusing or failing a VM: bad input (2) for what the operator gave (a config,
/// a name, a kernel, a snapshot), the host's (3) for the rest.
pub fn host(e: HostError) -> Failure {
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
    Failure::from_error(code, &e)
}

/// A config that does not hold: bad input (2).
pub fn config(e: ConfigError) -> Failure {
    Failure::from_error(EXIT_BAD_INPUT, &e)
}

/// The daemon's API: a refusal (4xx: the request, or a file or state it meets) is bad input
/// (2); a failure (5xx, a full disk's 507 included) and no daemon at all are the host's (3).
pub fn api(e: warmvm_api::ClientError) -> Failure {
    let code = match e.status() {
        Some(s) if (400..500).contains(&s) => EXIT_BAD_INPUT,
        _ => EXIT_HOST,
    };
    Failure::from_error(code, &e)
}

/// The daemon could not run: the operator's config or flags (2), or the host (3).
pub fn daemon(e: warmvm_api::DaemonError) -> Failure {
    let code = if e.is_input() {
        EXIT_BAD_INPUT
    } else {
        EXIT_HOST
    };
    Failure::from_error(code, &e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_error_keeps_its_cause_once() {
        let e = HostError::Vm {
            vm: "a".into(),
            err: VmError::Thread(std::io::Error::other("no threads left")),
        };
        let failure = host(e);
        assert_eq!(
            failure.message,
            "VM a: cannot start a vCPU thread: no threads left"
        );
        assert_eq!(failure.code, EXIT_HOST);
    }

    #[test]
    fn refusals_are_bad_input_and_failures_the_hosts() {
        let api_error = |status| warmvm_api::ClientError::Api {
            status,
            message: "no".into(),
        };
        assert_eq!(api(api_error(404)).code, EXIT_BAD_INPUT);
        assert_eq!(api(api_error(507)).code, EXIT_HOST);
        let none = warmvm_api::ClientError::NoDaemon("/x.sock".into());
        assert_eq!(api(none).code, EXIT_HOST);
    }
}
