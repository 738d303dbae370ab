//! Capture and restore of vCPU and VM state, in the orders KVM requires.
//!
//! The state types are plain serde data (KVM's structs are serialised as their raw kernel
//! ABI bytes, which the kernel keeps stable). They carry no file descriptors: memory and
//! the KVM objects come from the process that restores them.

use std::sync::{OnceLock, RwLock};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Vcpu, Vm};

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Deserialise a field that must be present even though its type could be absent: serde
/// otherwise reads a missing `Option` as `None`, so a state without its LAPIC or XSAVE
/// would silently restore without them. Use as `#[serde(deserialize_with = "required")]`.
pub fn required<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d)
}

/// Everything KVM knows about one vCPU. Strict: every field must be present when it is
/// read back (a state without `regs` must not restore zeros); fields added later must come
/// with `#[serde(default)]` of their own.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    #[serde(deserialize_with = "required")]
    pub xsave: Option<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    #[serde(deserialize_with = "required")]
    pub lapic: Option<kvm_lapic_state>,
    /// (index, value) of every MSR KVM would let us read.
    pub msrs: Vec<(u32, u64)>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: u32,
}

/// Everything KVM knows about a VM outside its vCPUs. Strict, like [`VcpuState`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    #[serde(deserialize_with = "required")]
    pub pit: Option<kvm_pit_state2>,
    #[serde(deserialize_with = "required")]
    pub clock: Option<kvm_clock_data>,
}

/// Save-able MSRs: KVM's index list minus those this host refuses to read (found once).
/// The list shrinks as MSRs turn out unreadable, so later captures (inside the blackout)
/// make one KVM_GET_MSRS call instead of one per unreadable MSR.
static SAVEABLE_MSRS: RwLock<Vec<u32>> = RwLock::new(Vec::new());
static MSRS_INITIALISED: OnceLock<()> = OnceLock::new();
static MSRS_PROBED: OnceLock<()> = OnceLock::new();

pub(crate) fn init_saveable_msrs(list: Vec<u32>) {
    MSRS_INITIALISED.get_or_init(|| {
        *SAVEABLE_MSRS.write().unwrap_or_else(|p| p.into_inner()) = list;
    });
}

impl Vcpu {
    /// Find out once per process, on a vCPU that has not run yet (outside any blackout),
    /// which MSRs of KVM's list this host lets us read.
    pub(crate) fn probe_saveable_msrs(&self) {
        if MSRS_PROBED.get().is_none() && self.read_msrs().is_ok() {
            let _ = MSRS_PROBED.set(());
        }
    }

    /// Capture the vCPU's state. The vCPU must be stopped on this thread with no access
    /// pending (see [`Vcpu::complete_pending_io`]). MP_STATE first: reading it makes KVM
    /// accept pending APIC events; VCPU_EVENTS last.
    pub fn save_state(&mut self) -> Result<VcpuState> {
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(Error::GetState("MP_STATE"))?;
        let regs = fd.get_regs().map_err(Error::GetRegs)?;
        let sregs = fd.get_sregs().map_err(Error::GetSregs)?;
        let xsave = Some(fd.get_xsave().map_err(Error::GetState("XSAVE"))?);
        let xcrs = fd.get_xcrs().map_err(Error::GetState("XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(Error::GetState("DEBUGREGS"))?;
        let lapic = Some(fd.get_lapic().map_err(Error::GetLapic)?);
        let tsc_khz = fd.get_tsc_khz().map_err(Error::GetTscKhz)?;
        let msrs = self.read_msrs()?;
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(Error::GetState("VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.id,
            cpuid: self.cpuid.clone(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    fn read_msrs(&self) -> Result<Vec<(u32, u64)>> {
        let mut indices = SAVEABLE_MSRS
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let initial = indices.len();
        // KVM stops at the first MSR it cannot read and returns how many it read: drop
        // that one and go on, so one odd MSR does not lose the others.
        loop {
            let entries: Vec<kvm_msr_entry> = indices
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList)?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(Error::GetState("MSRS"))?;
            if n == indices.len() {
                if n != initial {
                    *SAVEABLE_MSRS.write().unwrap_or_else(|p| p.into_inner()) = indices;
                }
                return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
            }
            indices.remove(n);
        }
    }

    /// Restore a captured state into this (new, never run) vCPU, moving its TSC on by
    /// `tsc_advance` ticks so that guest time includes the time the guest was suspended.
    /// The order is KVM's: REGS before EVENTS (it clears pending exceptions), SREGS before
    /// LAPIC (it sets the APIC base), LAPIC before MSRs (the TSC deadline needs it), the TSC
    /// deadline after the TSC, VCPU_EVENTS last.
    pub fn restore_state(&self, state: &VcpuState, tsc_advance: u64) -> Result<()> {
        let fd = &self.fd;
        fd.set_mp_state(state.mp_state)
            .map_err(Error::SetState("MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(Error::SetRegs)?;
        fd.set_sregs(&state.sregs).map_err(Error::SetSregs)?;
        if let Some(xsave) = &state.xsave {
            // SAFETY: `xsave` is a complete kvm_xsave of the legacy 4 KiB size that
            // KVM_SET_XSAVE reads.
            unsafe { fd.set_xsave(xsave) }.map_err(Error::SetState("XSAVE"))?;
        }
        fd.set_xcrs(&state.xcrs).map_err(Error::SetState("XCRS"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(Error::SetState("DEBUGREGS"))?;
        if let Some(lapic) = &state.lapic {
            fd.set_lapic(lapic).map_err(Error::SetLapic)?;
        }
        let mut entries: Vec<kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data: if index == MSR_IA32_TSC {
                    data.wrapping_add(tsc_advance)
                } else {
                    data
                },
                ..Default::default()
            })
            .collect();
        entries.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList)?;
        let written = fd.set_msrs(&msrs).map_err(Error::SetMsrs)?;
        if written != entries.len() {
            return Err(Error::PartialMsrWrite {
                written,
                wanted: entries.len(),
            });
        }
        fd.set_vcpu_events(&state.vcpu_events)
            .map_err(Error::SetState("VCPU_EVENTS"))?;
        // Tell a kvmclock guest it was paused, so its watchdogs do not fire. Guests
        // without kvmclock make this fail with EINVAL, which is expected.
        if let Err(e) = fd.kvmclock_ctrl() {
            if e.errno() != libc::EINVAL {
                return Err(Error::SetState("KVMCLOCK_CTRL")(e));
            }
        }
        Ok(())
    }
}

impl Vm {
    /// Capture the irqchip, PIT and clock. All vCPUs must be stopped.
    pub fn save_state(&self, has_pit: bool) -> Result<VmState> {
        let mut irqchips = Vec::new();
        if self.has_irqchip() {
            for chip_id in [
                KVM_IRQCHIP_PIC_MASTER,
                KVM_IRQCHIP_PIC_SLAVE,
                KVM_IRQCHIP_IOAPIC,
            ] {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                self.fd
                    .get_irqchip(&mut chip)
                    .map_err(Error::GetState("IRQCHIP"))?;
                irqchips.push(chip);
            }
        }
        let pit = if has_pit {
            Some(self.fd.get_pit2().map_err(Error::GetState("PIT2"))?)
        } else {
            None
        };
        let clock = Some(self.fd.get_clock().map_err(Error::GetState("CLOCK"))?);
        Ok(VmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Restore VM-wide state into a new VM whose irqchip (and PIT, if saved) exist, moving
    /// the clock on by `clock_advance_ns`.
    pub fn restore_state(&self, state: &VmState, clock_advance_ns: u64) -> Result<()> {
        for chip in &state.irqchips {
            if !matches!(
                chip.chip_id,
                KVM_IRQCHIP_PIC_MASTER | KVM_IRQCHIP_PIC_SLAVE | KVM_IRQCHIP_IOAPIC
            ) {
                return Err(Error::BadState("unknown irqchip id"));
            }
            self.fd
                .set_irqchip(chip)
                .map_err(Error::SetState("IRQCHIP"))?;
        }
        if let Some(pit) = &state.pit {
            self.fd.set_pit2(pit).map_err(Error::SetState("PIT2"))?;
        }
        if let Some(clock) = &state.clock {
            let clock = kvm_clock_data {
                clock: clock.clock.wrapping_add(clock_advance_ns),
                flags: 0,
                ..Default::default()
            };
            self.fd
                .set_clock(&clock)
                .map_err(Error::SetState("CLOCK"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_vcpu() -> VcpuState {
        let mut s = VcpuState {
            id: 3,
            xsave: Some(kvm_xsave::default()),
            lapic: Some(kvm_lapic_state::default()),
            msrs: vec![(MSR_IA32_TSC, 42), (MSR_IA32_TSC_DEADLINE, 7)],
            tsc_khz: 2_000_000,
            ..Default::default()
        };
        s.regs.rip = 0x1234;
        s.regs.rsp = 0x8000;
        s.sregs.cr3 = 0x9000;
        s
    }

    /// Re-encode `value` as a MessagePack map without `field`, as a writer that lacked it would.
    fn without_field<T: Serialize>(value: &T, field: &str) -> Vec<u8> {
        let bytes = rmp_serde::to_vec_named(value).unwrap();
        let mut map: std::collections::BTreeMap<String, rmpv::Value> =
            rmp_serde::from_slice(&bytes).unwrap();
        assert!(map.remove(field).is_some(), "{field} is a field");
        rmp_serde::to_vec_named(&map).unwrap()
    }

    #[test]
    fn vcpu_state_round_trips() {
        let s = sample_vcpu();
        let back: VcpuState = rmp_serde::from_slice(&rmp_serde::to_vec_named(&s).unwrap()).unwrap();
        assert_eq!(back.id, 3);
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.sregs.cr3, 0x9000);
        assert_eq!(back.msrs, s.msrs);
        assert!(back.xsave.is_some() && back.lapic.is_some());
    }

    #[test]
    fn a_vcpu_state_missing_any_field_is_refused_by_name() {
        let s = sample_vcpu();
        for field in [
            "id",
            "cpuid",
            "mp_state",
            "regs",
            "sregs",
            "xsave",
            "xcrs",
            "debugregs",
            "lapic",
            "msrs",
            "vcpu_events",
            "tsc_khz",
        ] {
            let err = rmp_serde::from_slice::<VcpuState>(&without_field(&s, field))
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn a_vm_state_missing_any_field_is_refused_by_name() {
        let s = VmState {
            irqchips: vec![kvm_irqchip::default()],
            pit: None,
            clock: Some(kvm_clock_data::default()),
        };
        let back: VmState = rmp_serde::from_slice(&rmp_serde::to_vec_named(&s).unwrap()).unwrap();
        assert_eq!((back.irqchips.len(), back.pit.is_none()), (1, true));
        for field in ["irqchips", "pit", "clock"] {
            let err = rmp_serde::from_slice::<VmState>(&without_field(&s, field))
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
