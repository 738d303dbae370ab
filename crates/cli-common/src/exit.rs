//! Exit statuses: 0 success, 1 a VM failed (crash, integrity error), 2 bad input,
//! 3 the host cannot run VMs (no KVM, no permission).

pub const EXIT_VM_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_HOST: u8 = 3;
