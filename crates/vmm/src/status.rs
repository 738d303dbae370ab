//! Reading the reference guest's integrity figures out of its status area, and posting
//! commands to it. The guest is not trusted: its figures are read with a bounded number of
//! sequence-lock retries and anything malformed is reported as absent, never acted on.

use std::mem::{offset_of, size_of};

use serde::Serialize;
use vm_memory::{Address, Bytes, GuestAddress};
use warmvm_abi::{vcpu_status_offset, StatusHeader, VcpuStatus, MAX_VCPUS, STATUS_MAGIC};
use warmvm_memory::GuestMemoryMmap;

/// One vCPU's figures, as the guest reported them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GuestVcpuFigures {
    pub phase: String,
    pub pages_owned: u64,
    pub pages_filled: u64,
    pub pages_verified: u64,
    pub mismatches: u64,
    pub passes: u64,
    pub counter: u64,
    pub guest_time_ns: u64,
    pub generation: u64,
    pub register_check_failures: u64,
    pub time_went_backwards: u64,
    pub last_mismatch_addr: u64,
    /// Longest stretch without progress since the last [`reset_gaps`] (status version 2+).
    pub max_gap_ns: u64,
}

/// The whole guest's figures: per vCPU and summed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GuestFigures {
    pub pages_owned: u64,
    pub pages_verified: u64,
    pub mismatches: u64,
    pub counter: u64,
    pub min_passes: u64,
    pub register_check_failures: u64,
    pub time_went_backwards: u64,
    pub guest_time_ns: u64,
    /// Longest stretch any vCPU went without progress since the last [`reset_gaps`].
    pub max_gap_ns: u64,
    pub vcpus: Vec<GuestVcpuFigures>,
}

impl GuestFigures {
    /// Every vCPU has verified all of its pages at least once, and nothing was ever wrong.
    pub fn all_verified_clean(&self) -> bool {
        !self.vcpus.is_empty()
            && self
                .vcpus
                .iter()
                .all(|v| v.passes >= 1 && v.pages_owned > 0)
            && self.mismatches == 0
            && self.register_check_failures == 0
            && self.time_went_backwards == 0
    }
}

fn phase_name(phase: u32) -> &'static str {
    match phase {
        warmvm_abi::PHASE_BOOTING => "booting",
        warmvm_abi::PHASE_FILLING => "filling",
        warmvm_abi::PHASE_VERIFYING => "verifying",
        warmvm_abi::PHASE_POWERING_OFF => "powering-off",
        _ => "invalid",
    }
}

fn u64_at(buf: &[u8], off: usize) -> u64 {
    buf.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    buf.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

/// Read one vCPU's figures under the guest's sequence lock (a few retries, then give up).
fn read_vcpu(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<GuestVcpuFigures> {
    let mut buf = [0u8; size_of::<VcpuStatus>()];
    // A guest preempted (or paused) in the middle of an update keeps `seq` odd; give it a
    // little time, yielding the core it may need, then report the figures as unavailable.
    for attempt in 0..256 {
        if attempt >= 32 {
            std::thread::yield_now();
        }
        mem.read_slice(&mut buf, addr).ok()?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let seq_after: u64 = mem.read_obj(addr).ok()?;
        let seq = u64_at(&buf, offset_of!(VcpuStatus, seq));
        if seq % 2 == 1 || seq != seq_after {
            std::hint::spin_loop();
            continue;
        }
        let f = |off| u64_at(&buf, off);
        return Some(GuestVcpuFigures {
            phase: phase_name(u32_at(&buf, offset_of!(VcpuStatus, phase))).to_string(),
            pages_owned: f(offset_of!(VcpuStatus, pages_owned)),
            pages_filled: f(offset_of!(VcpuStatus, pages_filled)),
            pages_verified: f(offset_of!(VcpuStatus, pages_verified)),
            mismatches: f(offset_of!(VcpuStatus, mismatches)),
            passes: f(offset_of!(VcpuStatus, passes)),
            counter: f(offset_of!(VcpuStatus, counter)),
            guest_time_ns: f(offset_of!(VcpuStatus, guest_time_ns)),
            generation: f(offset_of!(VcpuStatus, generation)),
            register_check_failures: f(offset_of!(VcpuStatus, register_check_failures)),
            time_went_backwards: f(offset_of!(VcpuStatus, time_went_backwards)),
            last_mismatch_addr: f(offset_of!(VcpuStatus, last_mismatch_addr)),
            max_gap_ns: f(offset_of!(VcpuStatus, max_gap_ns)),
        });
    }
    None
}

/// Read the figures of a guest with `vcpus` vCPUs from its status area at `base`. `None`
/// until the guest has initialised the area, or if it holds garbage.
pub fn read(mem: &GuestMemoryMmap, base: GuestAddress, vcpus: u32) -> Option<GuestFigures> {
    let magic: u64 = mem.read_obj(base).ok()?;
    let count: u32 = mem
        .read_obj(base.unchecked_add(offset_of!(StatusHeader, vcpu_count) as u64))
        .ok()?;
    if magic != STATUS_MAGIC || count != vcpus || count as usize > MAX_VCPUS {
        return None;
    }
    let mut figures = GuestFigures {
        min_passes: u64::MAX,
        ..Default::default()
    };
    for i in 0..count as usize {
        let v = read_vcpu(mem, base.unchecked_add(vcpu_status_offset(i) as u64))?;
        figures.pages_owned += v.pages_owned;
        figures.pages_verified += v.pages_verified;
        figures.mismatches += v.mismatches;
        figures.counter += v.counter;
        figures.min_passes = figures.min_passes.min(v.passes);
        figures.register_check_failures += v.register_check_failures;
        figures.time_went_backwards += v.time_went_backwards;
        figures.guest_time_ns = figures.guest_time_ns.max(v.guest_time_ns);
        figures.max_gap_ns = figures.max_gap_ns.max(v.max_gap_ns);
        figures.vcpus.push(v);
    }
    if figures.vcpus.is_empty() {
        figures.min_passes = 0;
    }
    Some(figures)
}

/// Restart every vCPU's `max_gap_ns` measurement (the guest notices at its next tick).
pub fn reset_gaps(mem: &GuestMemoryMmap, base: GuestAddress, vcpus: u32) {
    for i in 0..(vcpus as usize).min(MAX_VCPUS) {
        let at =
            base.unchecked_add((vcpu_status_offset(i) + offset_of!(VcpuStatus, gap_epoch)) as u64);
        let epoch: u64 = mem.read_obj(at).unwrap_or(0);
        let _ = mem.write_obj(epoch.wrapping_add(1), at);
    }
}

/// The `GUEST_FEATURE_*` bits the guest announces, or `None` while its status area has no
/// valid header (not booted yet, or not the reference guest).
pub fn guest_features(mem: &GuestMemoryMmap, base: GuestAddress) -> Option<u32> {
    let magic: u64 = mem.read_obj(base).ok()?;
    if magic != STATUS_MAGIC {
        return None;
    }
    mem.read_obj(base.unchecked_add(offset_of!(StatusHeader, guest_features) as u64))
        .ok()
}

/// Post a `HOST_COMMAND_*` for the guest to pick up.
pub fn post_command(mem: &GuestMemoryMmap, base: GuestAddress, command: u32) -> bool {
    mem.write_obj(
        command,
        base.unchecked_add(offset_of!(StatusHeader, host_command) as u64),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninitialised_or_garbage_status_reads_as_absent() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert!(read(&mem, GuestAddress(0x8000), 1).is_none());
        mem.write_obj(STATUS_MAGIC, GuestAddress(0x8000)).unwrap();
        mem.write_obj(1000u32, GuestAddress(0x8000 + 12)).unwrap();
        assert!(read(&mem, GuestAddress(0x8000), 1000).is_none());
    }

    #[test]
    fn a_torn_write_is_retried_then_given_up() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(STATUS_MAGIC, GuestAddress(0x8000)).unwrap();
        mem.write_obj(1u32, GuestAddress(0x8000 + 12)).unwrap();
        let v0 = 0x8000 + vcpu_status_offset(0) as u64;
        mem.write_obj(3u64, GuestAddress(v0)).unwrap(); // odd: write in progress forever
        assert!(read(&mem, GuestAddress(0x8000), 1).is_none());
        mem.write_obj(4u64, GuestAddress(v0)).unwrap();
        mem.write_obj(
            7u64,
            GuestAddress(v0 + offset_of!(VcpuStatus, passes) as u64),
        )
        .unwrap();
        let f = read(&mem, GuestAddress(0x8000), 1).unwrap();
        assert_eq!(f.min_passes, 7);
    }
}
