//! The ACPI fixed-hardware power button and sleep control: the PM1a event block (status and
//! enable registers) and the PM1a control block the FADT points at (`warmvm_abi::PM1A_*`).
//!
//! The VMM presses the button ([`AcpiPm::press_power_button`]): `PWRBTN_STS` is set, the SCI
//! is raised if the guest enabled it (`PWRBTN_EN`), and the VM's doorbell rings, so that a
//! polling guest asleep in the wait port looks. The guest clears the status bit (write 1)
//! and powers off by writing `SLP_TYP = S5 | SLP_EN` to PM1 control, which ends the VM as
//! [`IoAction::Shutdown`].
//!
//! Every access is taken byte by byte over the six ports, so any width the guest uses works;
//! sleep types other than S5 (the DSDT announces no other) are ignored and counted.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use warmvm_abi::{
    PM1A_CNT_LEN, PM1A_CNT_PORT, PM1A_EVT_LEN, PM1A_EVT_PORT, PM1_CNT_SCI_EN, PM1_CNT_SLP_EN,
    PM1_CNT_SLP_TYP_MASK, PM1_CNT_SLP_TYP_SHIFT, PM1_EN_PWRBTN, PM1_STS_PWRBTN, PM1_STS_WAK,
    SLP_TYP_S5,
};

use crate::bus::{Access, BusDevice};
use crate::persist::Persist;
use crate::serial::IrqLine;
use crate::{DeviceCounters, Doorbell, IoAction};

/// First port of the two blocks (they are adjacent), and how many ports they decode.
pub const ACPI_PM_BASE: u16 = PM1A_EVT_PORT;
pub const ACPI_PM_LEN: u16 = PM1A_EVT_LEN + PM1A_CNT_LEN;
const _: () = assert!(PM1A_CNT_PORT == PM1A_EVT_PORT + PM1A_EVT_LEN);

/// Status bits this device can set (the guest can clear only these).
const STS_BITS: u16 = PM1_STS_PWRBTN | PM1_STS_WAK;
/// Enable bits this device has.
const EN_BITS: u16 = PM1_EN_PWRBTN;
/// Control bits that hold a value (SLP_EN is write-only, SCI_EN always reads 1).
const CNT_BITS: u16 = PM1_CNT_SLP_TYP_MASK;

/// The PM1 registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    /// PM1 status (`PM1_STS_*`).
    pub pm1_sts: u16,
    /// PM1 enable (`PM1_EN_*`).
    pub pm1_en: u16,
    /// PM1 control, without the write-only `SLP_EN` and the read-only `SCI_EN`.
    pub pm1_cnt: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiPmError {
    #[error("ACPI PM1 state has bits this device does not have: status {sts:#x}, enable {en:#x}, control {cnt:#x}")]
    BadState { sts: u16, en: u16, cnt: u16 },
}

/// What a restored device is wired to.
pub struct AcpiPmHandles {
    pub sci: IrqLine,
    pub doorbell: Arc<Doorbell>,
    pub counters: Arc<DeviceCounters>,
}

pub struct AcpiPm {
    regs: AcpiPmState,
    sci: IrqLine,
    doorbell: Arc<Doorbell>,
    counters: Arc<DeviceCounters>,
}

impl AcpiPm {
    pub fn new(h: AcpiPmHandles) -> Self {
        Self {
            regs: AcpiPmState::default(),
            sci: h.sci,
            doorbell: h.doorbell,
            counters: h.counters,
        }
    }

    /// Press the power button: the guest sees `PWRBTN_STS`, gets the SCI if it enabled it,
    /// and a guest asleep in the wait port is woken.
    pub fn press_power_button(&mut self) {
        self.regs.pm1_sts |= PM1_STS_PWRBTN;
        self.counters.power_button_presses.fetch_add(1, Relaxed);
        self.update_sci();
        self.doorbell.ring();
    }

    /// Raise the SCI while an enabled event is pending. The line is an irqfd, so each
    /// raise is one pulse; the guest's handler reads the status register and clears it.
    fn update_sci(&self) {
        if self.regs.pm1_sts & self.regs.pm1_en != 0 {
            // An irqfd write fails only if the counter would overflow: the interrupt is
            // pending already.
            let _ = vm_superio::Trigger::trigger(&self.sci);
        }
    }

    fn register_byte(&self, port_offset: u64) -> u8 {
        let (value, shift) = match port_offset {
            0 | 1 => (self.regs.pm1_sts, port_offset * 8),
            2 | 3 => (self.regs.pm1_en, (port_offset - 2) * 8),
            _ => (self.regs.pm1_cnt | PM1_CNT_SCI_EN, (port_offset - 4) * 8),
        };
        (value >> shift) as u8
    }

    /// One byte written; returns the action it triggers.
    fn write_byte(&mut self, port_offset: u64, byte: u8) -> IoAction {
        let (shift, mask_of) = match port_offset {
            0 | 1 => (port_offset * 8, STS_BITS),
            2 | 3 => ((port_offset - 2) * 8, EN_BITS),
            _ => ((port_offset - 4) * 8, CNT_BITS | PM1_CNT_SLP_EN),
        };
        let lane: u16 = 0xff << shift;
        let value = (u16::from(byte) << shift) & mask_of;
        match port_offset {
            // Write 1 to clear.
            0 | 1 => self.regs.pm1_sts &= !value,
            2 | 3 => {
                self.regs.pm1_en = (self.regs.pm1_en & !lane) | value;
                self.update_sci();
            }
            _ => {
                self.regs.pm1_cnt = (self.regs.pm1_cnt & !lane) | (value & CNT_BITS);
                if value & PM1_CNT_SLP_EN != 0 {
                    let typ = (self.regs.pm1_cnt & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT;
                    if typ == SLP_TYP_S5 {
                        self.counters.acpi_power_offs.fetch_add(1, Relaxed);
                        return IoAction::Shutdown;
                    }
                    self.counters.acpi_sleeps_refused.fetch_add(1, Relaxed);
                }
            }
        }
        IoAction::None
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8], _: Access) -> bool {
        if !matches!(data.len(), 1 | 2 | 4) || offset + data.len() as u64 > u64::from(ACPI_PM_LEN) {
            return false;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.register_byte(offset + i as u64);
        }
        true
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<IoAction> {
        if !matches!(data.len(), 1 | 2 | 4) || offset + data.len() as u64 > u64::from(ACPI_PM_LEN) {
            return None;
        }
        let mut action = IoAction::None;
        for (i, &b) in data.iter().enumerate() {
            if let a @ IoAction::Shutdown = self.write_byte(offset + i as u64, b) {
                action = a;
            }
        }
        Some(action)
    }
}

impl Persist for AcpiPm {
    type State = AcpiPmState;
    type Error = AcpiPmError;

    fn save(&self) -> AcpiPmState {
        self.regs.clone()
    }

    fn load(&mut self, state: &AcpiPmState) -> Result<(), AcpiPmError> {
        if state.pm1_sts & !STS_BITS != 0
            || state.pm1_en & !EN_BITS != 0
            || state.pm1_cnt & !CNT_BITS != 0
        {
            return Err(AcpiPmError::BadState {
                sts: state.pm1_sts,
                en: state.pm1_en,
                cnt: state.pm1_cnt,
            });
        }
        self.regs = state.clone();
        Ok(())
    }
}

/// A device wired to nothing, for tests.
#[cfg(test)]
fn test_handles() -> AcpiPmHandles {
    AcpiPmHandles {
        sci: IrqLine::none(),
        doorbell: Default::default(),
        counters: Default::default(),
    }
}

crate::persist_tests!(
    persist,
    {
        let mut d = AcpiPm::new(test_handles());
        d.press_power_button();
        d.write(2, &PM1_EN_PWRBTN.to_le_bytes());
        d.write(4, &(SLP_TYP_S5 << PM1_CNT_SLP_TYP_SHIFT).to_le_bytes());
        d
    },
    |_: &AcpiPm| AcpiPm::new(test_handles())
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::WaitEnd;
    use vmm_sys_util::eventfd::EventFd;

    const ACCESS: Access = Access {
        last_wake: crate::Wake::Timeout,
    };

    fn read16(d: &mut AcpiPm, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        assert!(d.read(offset, &mut b, ACCESS));
        u16::from_le_bytes(b)
    }

    #[test]
    fn a_press_sets_the_status_rings_the_doorbell_and_is_cleared_by_writing_one() {
        let doorbell = Arc::new(Doorbell::default());
        let mut d = AcpiPm::new(AcpiPmHandles {
            doorbell: doorbell.clone(),
            ..test_handles()
        });
        assert_eq!(read16(&mut d, 0) & PM1_STS_PWRBTN, 0);
        d.press_power_button();
        assert_eq!(read16(&mut d, 0), PM1_STS_PWRBTN);
        assert_eq!(
            doorbell.wait(None, doorbell.recall_generation()),
            WaitEnd::DeviceWork
        );
        // Writing 0 changes nothing; writing the bit clears it.
        d.write(0, &0u16.to_le_bytes());
        assert_eq!(read16(&mut d, 0), PM1_STS_PWRBTN);
        d.write(0, &PM1_STS_PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut d, 0), 0);
    }

    #[test]
    fn the_sci_is_raised_only_when_the_guest_enabled_the_button() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = AcpiPm::new(AcpiPmHandles {
            sci: IrqLine::eventfd(evt.try_clone().unwrap()),
            ..test_handles()
        });
        d.press_power_button();
        assert!(evt.read().is_err(), "no SCI without PWRBTN_EN");
        // Enabling while the status is pending raises it.
        d.write(2, &PM1_EN_PWRBTN.to_le_bytes());
        assert_eq!(evt.read().unwrap(), 1);
        d.write(0, &PM1_STS_PWRBTN.to_le_bytes());
        d.press_power_button();
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(read16(&mut d, 2), PM1_EN_PWRBTN);
    }

    #[test]
    fn s5_in_pm1_control_shuts_down_and_other_sleep_types_do_not() {
        let mut d = AcpiPm::new(test_handles());
        assert_eq!(read16(&mut d, 4) & PM1_CNT_SCI_EN, PM1_CNT_SCI_EN);
        let s3 = (3 << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SLP_EN;
        assert_eq!(d.write(4, &s3.to_le_bytes()), Some(IoAction::None));
        assert_eq!(d.counters.acpi_sleeps_refused.load(Relaxed), 1);
        // SLP_TYP alone is only remembered.
        let typ = SLP_TYP_S5 << PM1_CNT_SLP_TYP_SHIFT;
        assert_eq!(d.write(4, &typ.to_le_bytes()), Some(IoAction::None));
        assert_eq!(read16(&mut d, 4) & PM1_CNT_SLP_EN, 0, "SLP_EN reads 0");
        // The high byte alone (as a byte-wide OS writes it) carries SLP_EN.
        let high = ((typ | PM1_CNT_SLP_EN) >> 8) as u8;
        assert_eq!(d.write(5, &[high]), Some(IoAction::Shutdown));
        assert_eq!(d.counters.acpi_power_offs.load(Relaxed), 1);
    }

    #[test]
    fn accesses_past_the_blocks_or_of_odd_widths_are_not_decoded() {
        let mut d = AcpiPm::new(test_handles());
        let mut b = [0u8; 4];
        assert!(!d.read(4, &mut b, ACCESS));
        assert!(d.write(5, &[0, 0]).is_none());
        assert!(d.write(0, &[0, 0, 0]).is_none());
        assert!(d.read(0, &mut b, ACCESS), "status and enable in one read");
    }

    #[test]
    fn a_state_with_bits_the_device_lacks_is_refused() {
        for s in [
            AcpiPmState {
                pm1_sts: 1,
                ..Default::default()
            },
            AcpiPmState {
                pm1_en: 1 << 5,
                ..Default::default()
            },
            AcpiPmState {
                pm1_cnt: PM1_CNT_SLP_EN,
                ..Default::default()
            },
        ] {
            assert!(AcpiPm::new(test_handles()).load(&s).is_err(), "{s:?}");
        }
    }
}
