//! The status area shared with the VMM: the guest writes its figures under a sequence lock
//! (odd `seq` while a write is in progress) with volatile stores and compiler fences (x86
//! keeps stores in order, so the fences are all the ordering needed), and polls the
//! host command with volatile loads.

use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{compiler_fence, Ordering};

use warmvm_abi::{vcpu_status_offset, StatusHeader, VcpuStatus, STATUS_MAGIC, STATUS_VERSION};

#[derive(Clone, Copy)]
pub struct Status {
    base: u64,
}

impl Status {
    /// `base` must be the validated status area address (see `boot::Machine`).
    pub fn new(base: u64) -> Self {
        Status { base }
    }

    fn header(&self) -> *mut StatusHeader {
        self.base as *mut StatusHeader
    }

    fn vcpu(&self, i: usize) -> *mut VcpuStatus {
        (self.base + vcpu_status_offset(i) as u64) as *mut VcpuStatus
    }

    /// vCPU 0, at boot: magic, version, vCPU count and features (the host command is the
    /// VMM's).
    pub fn write_header(&self, vcpu_count: u32) {
        let h = self.header();
        // SAFETY: the status area is guest RAM reserved for this purpose, large enough for
        // the header and `vcpu_count` entries (checked in `boot::Machine::new`), and only
        // accessed with volatile operations.
        unsafe {
            addr_of_mut!((*h).version).write_volatile(STATUS_VERSION);
            addr_of_mut!((*h).vcpu_count).write_volatile(vcpu_count);
            addr_of_mut!((*h).guest_features)
                .write_volatile(warmvm_abi::GUEST_FEATURE_POWER_BUTTON);
            compiler_fence(Ordering::Release);
            addr_of_mut!((*h).magic).write_volatile(STATUS_MAGIC);
        }
        compiler_fence(Ordering::Release);
    }

    pub fn host_command(&self) -> u32 {
        let h = self.header();
        // SAFETY: as in `write_header`.
        unsafe { addr_of!((*h).host_command).read_volatile() }
    }

    /// The gap epoch the VMM last wrote into vCPU `i`'s entry.
    pub fn gap_epoch(&self, i: usize) -> u64 {
        // SAFETY: as in `current_seq`.
        unsafe { addr_of!((*self.vcpu(i)).gap_epoch).read_volatile() }
    }

    /// The sequence number currently in vCPU `i`'s entry (to continue from it).
    pub fn current_seq(&self, i: usize) -> u64 {
        // SAFETY: as in `write_header`; `i` is below the validated vCPU count.
        unsafe { addr_of!((*self.vcpu(i)).seq).read_volatile() }
    }

    /// Publish `s` as vCPU `i`'s figures; `s.seq` is the last published (even) value and is
    /// advanced by two.
    pub fn publish(&self, i: usize, s: &mut VcpuStatus) {
        let p = self.vcpu(i);
        let odd = s.seq | 1;
        let even = odd.wrapping_add(1);
        // SAFETY: as in `current_seq`; only vCPU `i` writes entry `i`.
        unsafe {
            addr_of_mut!((*p).seq).write_volatile(odd);
            compiler_fence(Ordering::SeqCst);
            addr_of_mut!((*p).phase).write_volatile(s.phase);
            addr_of_mut!((*p)._pad).write_volatile(0);
            addr_of_mut!((*p).pages_owned).write_volatile(s.pages_owned);
            addr_of_mut!((*p).pages_filled).write_volatile(s.pages_filled);
            addr_of_mut!((*p).pages_verified).write_volatile(s.pages_verified);
            addr_of_mut!((*p).mismatches).write_volatile(s.mismatches);
            addr_of_mut!((*p).passes).write_volatile(s.passes);
            addr_of_mut!((*p).counter).write_volatile(s.counter);
            addr_of_mut!((*p).guest_time_ns).write_volatile(s.guest_time_ns);
            addr_of_mut!((*p).generation).write_volatile(s.generation);
            addr_of_mut!((*p).register_check_failures).write_volatile(s.register_check_failures);
            addr_of_mut!((*p).time_went_backwards).write_volatile(s.time_went_backwards);
            addr_of_mut!((*p).last_mismatch_addr).write_volatile(s.last_mismatch_addr);
            addr_of_mut!((*p).max_gap_ns).write_volatile(s.max_gap_ns);
            compiler_fence(Ordering::SeqCst);
            addr_of_mut!((*p).seq).write_volatile(even);
        }
        compiler_fence(Ordering::SeqCst);
        s.seq = even;
    }

    /// A consistent copy of vCPU `i`'s figures (retries while a write is in progress, up to a
    /// bound: a vCPU stopped mid-write must not hang the reader).
    pub fn read(&self, i: usize) -> VcpuStatus {
        let p = self.vcpu(i);
        let mut copy = VcpuStatus::default();
        for _ in 0..100_000 {
            // SAFETY: as in `current_seq`.
            let (before, c, after) = unsafe {
                let before = addr_of!((*p).seq).read_volatile();
                compiler_fence(Ordering::SeqCst);
                let c = p.read_volatile();
                compiler_fence(Ordering::SeqCst);
                (before, c, addr_of!((*p).seq).read_volatile())
            };
            copy = c;
            if before & 1 == 0 && before == after {
                break;
            }
            core::hint::spin_loop();
        }
        copy
    }
}
