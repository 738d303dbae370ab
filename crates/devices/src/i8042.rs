//! An i8042 keyboard controller (ports 0x60 data, 0x64 status/command), as much of one as a
//! guest without ACPI needs to be asked to shut down and to end itself: the VMM can type
//! Ctrl-Alt-Del ([`I8042::press_ctrl_alt_del`]: scancode set 2 make and break codes, IRQ 1 per
//! byte), and the guest's CPU reset command (0xFE to port 0x64, Linux's `reboot=k`) ends
//! the VM as [`IoAction::Shutdown`], a VMM having no reset line to pull.
//!
//! The controller answers the commands a kernel's driver probes with (read/write the
//! control byte, self tests, enable/disable the keyboard, read/write the output port) and
//! acknowledges every keyboard command. There is no mouse. Everything else is ignored.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::bus::{Access, BusDevice};
use crate::persist::Persist;
use crate::serial::IrqLine;
use crate::{DeviceCounters, Doorbell, IoAction};

/// The data port; the status/command port is [`I8042_BASE`] + 4.
pub const I8042_BASE: u16 = 0x60;
/// The range the device sits on (0x61-0x63 in between are not its: they stay unknown).
pub const I8042_LEN: u16 = 5;
const DATA: u64 = 0;
const COMMAND: u64 = 4;

/// Status register: output buffer full, system flag (self test passed), last write was a
/// command, keyboard not inhibited.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
const STS_CMD: u8 = 0x08;
const STS_KBD_ENABLED: u8 = 0x10;
/// Control byte: keyboard interrupt enabled, system flag, keyboard disabled.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_RESET: u8 = 0xff;
const KBD_GET_ID: u8 = 0xf2;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const SELF_TEST_OK: u8 = 0x55;

/// Bytes the output buffer holds (a Ctrl-Alt-Del is 11).
pub const BUFFER_MAX: usize = 16;
/// Ctrl, Alt, Del down, then up, in scancode set 2 (the keyboard's own; no translation).
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// The controller's registers and output buffer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    /// The output port (A20 and the reset line, as the guest last wrote them).
    pub outp: u8,
    /// A command waiting for its data byte (`0x60` or `0xd1`), or 0.
    pub pending: u8,
    /// Bytes the guest has yet to read from the data port, oldest first.
    pub buffer: Vec<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            status: STS_SYS | STS_KBD_ENABLED,
            control: CTR_KBD_INT | CTR_SYS,
            outp: 0x01,
            pending: 0,
            buffer: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("i8042 state: {0}")]
    BadState(String),
}

/// What a restored controller is wired to.
pub struct I8042Handles {
    /// IRQ 1.
    pub irq: IrqLine,
    pub doorbell: Arc<Doorbell>,
    pub counters: Arc<DeviceCounters>,
}

pub struct I8042 {
    status: u8,
    control: u8,
    outp: u8,
    pending: u8,
    buffer: VecDeque<u8>,
    irq: IrqLine,
    doorbell: Arc<Doorbell>,
    counters: Arc<DeviceCounters>,
}

impl I8042 {
    pub fn new(h: I8042Handles) -> Self {
        let s = I8042State::default();
        Self {
            status: s.status,
            control: s.control,
            outp: s.outp,
            pending: s.pending,
            buffer: VecDeque::new(),
            irq: h.irq,
            doorbell: h.doorbell,
            counters: h.counters,
        }
    }

    /// Type Ctrl-Alt-Del (a guest without ACPI is asked to shut down). False if the guest
    /// has not read enough of what it was sent before to take it.
    pub fn press_ctrl_alt_del(&mut self) -> bool {
        if self.buffer.len() + CTRL_ALT_DEL.len() > BUFFER_MAX {
            return false;
        }
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.counters.ctrl_alt_dels.fetch_add(1, Relaxed);
        self.doorbell.ring();
        true
    }

    /// Queue a byte for the guest; the interrupt tells it when the byte is the next one.
    fn push(&mut self, byte: u8) {
        if self.buffer.len() >= BUFFER_MAX {
            return;
        }
        self.buffer.push_back(byte);
        if self.buffer.len() == 1 {
            self.byte_ready();
        }
    }

    /// A byte is at the head of the buffer: set OBF and raise IRQ 1 if enabled.
    fn byte_ready(&mut self) {
        self.status |= STS_OBF;
        if self.control & CTR_KBD_INT != 0 {
            // An irqfd write fails only if the counter would overflow: the interrupt is
            // pending already.
            let _ = vm_superio::Trigger::trigger(&self.irq);
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.buffer.pop_front().unwrap_or(0);
        if self.buffer.is_empty() {
            self.status &= !STS_OBF;
        } else {
            self.byte_ready();
        }
        byte
    }

    fn command(&mut self, cmd: u8) -> IoAction {
        self.status |= STS_CMD;
        match cmd {
            CMD_READ_CTR => {
                self.buffer.clear();
                self.push(self.control);
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = cmd,
            CMD_SELF_TEST => {
                self.buffer.clear();
                self.push(SELF_TEST_OK);
            }
            CMD_KBD_TEST => {
                self.buffer.clear();
                self.push(0);
            }
            CMD_KBD_DISABLE => self.control |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CTR_KBD_DISABLED,
            CMD_READ_OUTP => {
                self.buffer.clear();
                self.push(self.outp);
            }
            CMD_RESET_CPU => {
                self.counters.i8042_resets.fetch_add(1, Relaxed);
                return IoAction::Shutdown;
            }
            _ => {}
        }
        IoAction::None
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STS_CMD;
        match std::mem::take(&mut self.pending) {
            CMD_WRITE_CTR => self.control = byte,
            CMD_WRITE_OUTP => self.outp = byte,
            // A keyboard command (or its argument): acknowledged.
            _ => {
                self.buffer.clear();
                self.push(KBD_ACK);
                match byte {
                    KBD_RESET => self.push(KBD_SELF_TEST_OK),
                    KBD_GET_ID => {
                        self.push(0xab);
                        self.push(0x83);
                    }
                    _ => {}
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8], _: Access) -> bool {
        if data.len() != 1 {
            return false;
        }
        data[0] = match offset {
            DATA => self.read_data(),
            COMMAND => self.status,
            _ => return false,
        };
        true
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<IoAction> {
        let &[byte] = data else { return None };
        match offset {
            DATA => {
                self.data(byte);
                Some(IoAction::None)
            }
            COMMAND => Some(self.command(byte)),
            _ => None,
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type Error = I8042Error;

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending: self.pending,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    fn load(&mut self, s: &I8042State) -> Result<(), I8042Error> {
        if s.buffer.len() > BUFFER_MAX {
            return Err(I8042Error::BadState(format!(
                "{} bytes in the output buffer, at most {BUFFER_MAX}",
                s.buffer.len()
            )));
        }
        if !matches!(s.pending, 0 | CMD_WRITE_CTR | CMD_WRITE_OUTP) {
            return Err(I8042Error::BadState(format!(
                "pending command {:#04x} takes no data",
                s.pending
            )));
        }
        if (s.status & STS_OBF != 0) == s.buffer.is_empty() {
            return Err(I8042Error::BadState(
                "the output-buffer-full flag disagrees with the buffer".into(),
            ));
        }
        self.status = s.status;
        self.control = s.control;
        self.outp = s.outp;
        self.pending = s.pending;
        self.buffer = s.buffer.iter().copied().collect();
        Ok(())
    }
}

#[cfg(test)]
fn test_handles() -> I8042Handles {
    I8042Handles {
        irq: IrqLine::none(),
        doorbell: Default::default(),
        counters: Default::default(),
    }
}

crate::persist_tests!(
    persist,
    {
        let mut d = I8042::new(test_handles());
        d.press_ctrl_alt_del();
        d.write(COMMAND, &[CMD_WRITE_OUTP]);
        d
    },
    |_: &I8042| I8042::new(test_handles())
);

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    const ACCESS: Access = Access {
        last_wake: crate::Wake::Timeout,
    };

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        assert!(d.read(offset, &mut b, ACCESS));
        b[0]
    }

    #[test]
    fn ctrl_alt_del_is_typed_one_interrupt_per_byte() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let doorbell = Arc::new(Doorbell::default());
        let mut d = I8042::new(I8042Handles {
            irq: IrqLine::eventfd(evt.try_clone().unwrap()),
            doorbell: doorbell.clone(),
            ..test_handles()
        });
        assert!(d.press_ctrl_alt_del());
        assert_eq!(
            doorbell.wait(None, doorbell.recall_generation()),
            crate::doorbell::WaitEnd::DeviceWork
        );
        let mut typed = Vec::new();
        let mut irqs = 0;
        while read(&mut d, COMMAND) & STS_OBF != 0 {
            irqs += evt.read().unwrap_or(0);
            typed.push(read(&mut d, DATA));
        }
        assert_eq!(typed, CTRL_ALT_DEL);
        assert_eq!(irqs, CTRL_ALT_DEL.len() as u64);
        assert_eq!(d.counters.ctrl_alt_dels.load(Relaxed), 1);
    }

    #[test]
    fn a_full_buffer_refuses_another_ctrl_alt_del() {
        let mut d = I8042::new(test_handles());
        assert!(d.press_ctrl_alt_del());
        assert!(!d.press_ctrl_alt_del(), "11 + 11 bytes do not fit in 16");
        read(&mut d, DATA);
        assert_eq!(d.save().buffer.len(), CTRL_ALT_DEL.len() - 1);
    }

    #[test]
    fn the_cpu_reset_command_ends_the_vm() {
        let mut d = I8042::new(test_handles());
        assert_eq!(d.write(COMMAND, &[CMD_RESET_CPU]), Some(IoAction::Shutdown));
        assert_eq!(d.counters.i8042_resets.load(Relaxed), 1);
    }

    #[test]
    fn the_probe_a_driver_makes_is_answered() {
        let mut d = I8042::new(test_handles());
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, DATA), SELF_TEST_OK);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, DATA), CTR_KBD_INT | CTR_SYS);
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x45]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, DATA), 0x45);
        d.write(DATA, &[KBD_RESET]);
        assert_eq!((read(&mut d, DATA), read(&mut d, DATA)), (KBD_ACK, 0xaa));
        assert_eq!(read(&mut d, COMMAND) & STS_OBF, 0);
        // 0x61 (the PC's port B) is not the controller's.
        assert!(!d.read(1, &mut [0u8], ACCESS));
        assert!(d.write(0, &[1, 2]).is_none());
    }

    #[test]
    fn inconsistent_states_are_refused() {
        let ok = I8042::new(test_handles()).save();
        for bad in [
            I8042State {
                buffer: vec![0; BUFFER_MAX + 1],
                status: STS_OBF,
                ..ok.clone()
            },
            I8042State {
                pending: CMD_SELF_TEST,
                ..ok.clone()
            },
            I8042State {
                buffer: vec![1],
                ..ok.clone()
            },
        ] {
            assert!(I8042::new(test_handles()).load(&bad).is_err(), "{bad:?}");
        }
    }
}
