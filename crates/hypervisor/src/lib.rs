//! The one layer of warmvm that talks to KVM.
//!
//! Everything else in the VMM sees [`Hypervisor`], [`Vm`] and [`Vcpu`], plain-data state
//! types, and an [`ExitHandler`] trait through which a vCPU's port and MMIO accesses reach
//! the devices. Each failing ioctl has its own error variant, so a failure names what failed.

mod cpuid;
mod error;
mod hypervisor;
mod ioctl_numbers;
mod kick;
mod state;
mod vcpu;
mod vm;

pub use cpuid::CpuidOptions;
pub use error::{Error, Result};
pub use hypervisor::Hypervisor;
pub use ioctl_numbers::{kvm_run_ioctl, vcpu_thread_ioctls, vm_ioctls};
pub use kick::{install_kick_handler, kick_signal, kick_thread};
pub use state::{required, VcpuState, VmState, MSR_IA32_TSC};
pub use vcpu::{Exit, ExitHandler, Vcpu};
pub use vm::{EventFd, Vm};
