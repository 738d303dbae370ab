//! warmvm's VMs and the host that runs them.

pub mod config;
pub mod handover;
pub mod host;
pub mod status;
#[doc(hidden)]
pub mod testing;
mod vcpu;
pub mod vm;

pub use config::{Config, ConfigError, HostLimits, VmConfig};
pub use host::{Host, HostError};
pub use vcpu::{monotonic_ns, VcpuStats};
pub use vm::{Lifecycle, Vm, VmError, VmReport};
