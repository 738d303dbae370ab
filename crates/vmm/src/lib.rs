//! warmvm's VMs and the host that runs them.
//!
//! Owns: the VM (`vm`: KVM VM, RAM, devices and vCPU threads put together, and its
//! lifecycle), the host's set of VMs (`host`), a VM's state and the one API that saves and
//! loads it (`state`: `VmRecord`, `Vm::save`, `Vm::build`, `Vm::load`, the envelope, the
//! older formats), and the transports that move that state: `handover` (the warm reboot, to
//! a new VMM process over `channel`) and `snapshot` (to files).
//!
//! Must never: issue a KVM ioctl itself (that is `warmvm-hypervisor`'s), read or write KVM
//! or device state outside `state` (a transport moves a `VmRecord` and calls the state
//! API), decode state from outside without its strict types, or run a guest instruction
//! before the VMM that runs it owns the VM (after a handover's commit, a snapshot's start).

pub mod aging_config;
pub(crate) mod channel;
pub mod config;
pub mod executable;
pub mod handover;
pub mod host;
pub mod migration;
pub mod panic;
pub mod snapshot;
pub mod state;
pub mod status;
#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod transport_tests;
mod vcpu;
mod virtio;
pub mod vm;

pub use aging_config::AgingConfig;
pub use config::{Config, ConfigError, FleetConfig, HostLimits, PrivilegesConfig, VmConfig};
/// The devices crate, for the console's limits and figures.
pub use warmvm_devices as devices;

/// This build's identity: the version, plus `WARMVM_BUILD_ID` if it was set at build time
/// (e.g. by a packager), so a warm reboot can report which build handed over to which.
pub fn build() -> String {
    match option_env!("WARMVM_BUILD_ID") {
        Some(id) => format!("warmvm {} ({id})", env!("CARGO_PKG_VERSION")),
        None => format!("warmvm {}", env!("CARGO_PKG_VERSION")),
    }
}
/// What the devices' own threads run first: the seccomp filter of their kind. The devices
/// crate starts those threads but never depends on the sandbox; the VMM hands it this.
pub fn device_thread_setup() -> warmvm_devices::ThreadSetup {
    use warmvm_devices::DeviceThread;
    use warmvm_sandbox::ThreadKind;
    warmvm_devices::ThreadSetup::new(|thread| {
        warmvm_sandbox::enter_or_log(match thread {
            DeviceThread::Console => ThreadKind::Console,
            DeviceThread::VirtioWorker => ThreadKind::DeviceWorker,
        })
    })
}

pub use host::{Host, HostError};
pub use vcpu::{monotonic_ns, VcpuStats};
pub use virtio::{
    take_inherited_taps, DeviceError, DeviceKind, DeviceReport, GivenTaps, InheritedTapError,
};
pub use vm::{Action, Lifecycle, PowerButton, State, Vm, VmError, VmReport};
pub use warmvm_hypervisor::Hypervisor;
/// What a VM, its devices and a device's worker implement: pause and resume as a whole.
pub use warmvm_lifecycle::Pausable;
