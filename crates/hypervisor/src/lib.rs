//! The one layer of warmvm that talks to KVM.
//!
//! Everything else in the VMM sees [`Hypervisor`], [`Vm`] and [`Vcpu`], plain-data state
//! types, and an [`ExitHandler`] trait through which a vCPU's port and MMIO accesses reach
//! the devices. Each failing ioctl has its own error variant, so a failure names what failed.
//!
//! Owns: every KVM ioctl, the list of those a thread may issue (for the seccomp filters),
//! the vCPU kick, and the plain data that goes in and out of KVM (vCPU and VM state, the
//! entry state [`CpuEntry`] that a boot protocol fills in).
//! Must never: depend on another warmvm crate but `warmvm-abi` (boot, devices, sandbox and
//! the VMM build on it, not the reverse), or know about devices, boot protocols or
//! processes.

mod cpuid;
mod entry;
mod error;
mod hypervisor;
mod ioctl_numbers;
mod kick;
mod state;
mod vcpu;
mod vm;

pub use cpuid::CpuidOptions;
pub use entry::{CpuEntry, Segments, SystemRegisters};
pub use error::{Error, Result};
pub use hypervisor::Hypervisor;
pub use ioctl_numbers::{kvm_run_ioctl, vcpu_thread_ioctls, vm_ioctls};
pub use kick::{install_kick_handler, kick_signal, kick_thread};
pub use state::{required, VcpuState, VmState, MSR_IA32_TSC};
pub use vcpu::{Exit, ExitHandler, Vcpu};
pub use vm::{EventFd, MemorySlot, Vm, DIRTY_PAGE_SIZE};
