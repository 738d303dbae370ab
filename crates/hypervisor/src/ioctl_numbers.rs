//! The request numbers of the KVM ioctls this crate issues, so that the seccomp filters
//! (crates/sandbox) can allow exactly these and no other: those of a vCPU thread, and those
//! on the system and VM fds that building, restoring and handing over a VM take. This crate
//! is the only one that issues KVM ioctls, so it is the one that lists them; the numbers
//! are those kvm-ioctls uses (same definitions from the kernel's uapi headers).
#![allow(non_snake_case)]

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_enable_cap,
    kvm_fpu, kvm_ioeventfd, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list,
    kvm_msrs, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

// The system fd (/dev/kvm): Hypervisor::open's checks, creating VMs.
ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);

// A VM fd: memory slots, vCPUs, the in-kernel irqchip and PIT and their state, the clock,
// irqfds and ioeventfds.
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
// kvm-ioctls has no call for it: `Vm::clear_dirty_log` issues it with this number.
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
// The kernel defines KVM_SET_IRQCHIP as _IOR (and the clock's pair the other way round).
ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);

// A vCPU fd.
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_io_nr!(KVM_SET_TSC_KHZ, KVMIO, 0xa2);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);

/// `KVM_CLEAR_DIRTY_LOG`, which kvm-ioctls lacks.
pub(crate) fn clear_dirty_log() -> u64 {
    KVM_CLEAR_DIRTY_LOG()
}

/// `KVM_RUN`, for tests that must tell it from the rest.
pub fn kvm_run_ioctl() -> u64 {
    KVM_RUN()
}

/// Every ioctl a vCPU thread makes: `KVM_RUN`, and the state a parked vCPU thread captures
/// or restores on its own vCPU (a warm reboot, a snapshot, a restore).
pub fn vcpu_thread_ioctls() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_SET_TSC_KHZ(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XSAVE2(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
        KVM_KVMCLOCK_CTRL(),
    ]
}

/// Every ioctl building, restoring, snapshotting or handing over a VM makes on the system
/// and VM fds, and on vCPU fds before their threads run (the CPUID is set once, from the
/// thread that builds the VM). The vCPU threads' own ioctls are in [`vcpu_thread_ioctls`];
/// the threads that build VMs need both.
pub fn vm_ioctls() -> Vec<u64> {
    vec![
        KVM_GET_API_VERSION(),
        KVM_CREATE_VM(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_CREATE_VCPU(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_SET_TSS_ADDR(),
        KVM_CREATE_IRQCHIP(),
        KVM_GET_IRQCHIP(),
        KVM_SET_IRQCHIP(),
        KVM_IRQFD(),
        KVM_CREATE_PIT2(),
        KVM_IOEVENTFD(),
        KVM_SET_CLOCK(),
        KVM_GET_CLOCK(),
        KVM_GET_PIT2(),
        KVM_SET_PIT2(),
        KVM_SET_CPUID2(),
        // Live migration's dirty log.
        KVM_ENABLE_CAP(),
        KVM_GET_DIRTY_LOG(),
        KVM_CLEAR_DIRTY_LOG(),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_numbers_are_the_kernels() {
        // Spot checks against the values in <linux/kvm.h> on x86-64.
        assert_eq!(super::KVM_RUN(), 0xae80);
        assert_eq!(super::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(super::KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(super::KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(super::KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(super::KVM_CREATE_VM(), 0xae01);
        assert_eq!(super::KVM_GET_SUPPORTED_CPUID(), 0xc008_ae05);
        assert_eq!(super::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(super::KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(super::KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(super::KVM_SET_IRQCHIP(), 0x8208_ae63);
        assert_eq!(super::KVM_SET_CPUID2(), 0x4008_ae90);
        assert_eq!(super::KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(super::KVM_ENABLE_CAP(), 0x4068_aea3);
        assert_eq!(super::KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
    }
}
