use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Access, BusDevice};
use crate::persist::Persist;
use crate::{ConsoleSink, DeviceCounters, IoAction};

/// The UART's interrupt line: an eventfd that the VMM has wired to an irqchip pin, or
/// nothing for guests that poll.
#[derive(Clone)]
pub struct IrqLine(Option<std::sync::Arc<EventFd>>);

impl IrqLine {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn eventfd(evt: EventFd) -> Self {
        Self(Some(std::sync::Arc::new(evt)))
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        match &self.0 {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
}

/// Saved UART registers and receive FIFO. Strict: every field must be present when read
/// back; fields added later come with `#[serde(default)]` of their own.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialStateData {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// COM1, a 16550 emulated by vm-superio, writing to a [`ConsoleSink`].
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, ConsoleSink>,
    irq: IrqLine,
}

impl SerialConsole {
    pub fn new(sink: ConsoleSink, irq: IrqLine) -> Self {
        Self {
            uart: Serial::new(irq.clone(), sink),
            irq,
        }
    }

    /// Rebuild the UART from saved state (the receive FIFO is capped at its capacity).
    fn from_state(state: &SerialStateData, sink: ConsoleSink, irq: IrqLine) -> Self {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.iter().copied().take(64).collect(),
        };
        match Serial::from_state(&s, irq.clone(), NoEvents, sink) {
            Ok(uart) => Self { uart, irq },
            // from_state only fails on an over-long FIFO, which was capped above.
            Err(_) => unreachable!("receive FIFO capped to its capacity"),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // The only failure is the interrupt eventfd write; the byte is already in the sink.
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!(error = ?e, "serial interrupt could not be raised");
        }
    }

    pub fn flush(&mut self) {
        self.uart.writer_mut().emit();
    }

    pub fn sink(&self) -> &ConsoleSink {
        self.uart.writer()
    }

    pub fn state(&self) -> SerialStateData {
        let s = self.uart.state();
        SerialStateData {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// COM1 on the port bus, counting the bytes the guest writes.
pub struct SerialPort {
    pub console: std::sync::Arc<std::sync::Mutex<SerialConsole>>,
    pub counters: std::sync::Arc<DeviceCounters>,
}

impl SerialPort {
    fn console(&self) -> std::sync::MutexGuard<'_, SerialConsole> {
        // A vCPU thread that panicked while holding the lock must not take the whole VM's
        // console down with it: the UART state is a handful of bytes, still consistent.
        self.console.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8], _: Access) -> bool {
        match data {
            [byte] => {
                *byte = self.console().read(offset as u8);
                true
            }
            _ => false,
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<IoAction> {
        let [byte] = data else { return None };
        self.console().write(offset as u8, *byte);
        if offset == 0 {
            self.counters
                .serial_bytes_out
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Some(IoAction::None)
    }
}

impl Persist for SerialConsole {
    type State = SerialStateData;
    type Error = std::convert::Infallible;

    fn save(&self) -> SerialStateData {
        self.state()
    }

    /// Load saved UART state, keeping this console's sink and interrupt line. Every value
    /// of the registers is one the UART can hold; the receive FIFO is capped at its
    /// capacity.
    fn load(&mut self, state: &SerialStateData) -> Result<(), Self::Error> {
        let placeholder = Serial::new(IrqLine::none(), ConsoleSink::new(None, false));
        let sink = std::mem::replace(&mut self.uart, placeholder).into_writer();
        *self = Self::from_state(state, sink, self.irq.clone());
        Ok(())
    }
}

crate::persist_tests!(persist, tests::uart_with_state(), |_: &SerialConsole| {
    SerialConsole::new(ConsoleSink::memory(), IrqLine::none())
});

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn uart_with_state() -> SerialConsole {
        let mut uart = SerialConsole::new(ConsoleSink::memory(), IrqLine::none());
        // Line control with DLAB, a divisor, then scratch and interrupt enable.
        uart.write(3, 0x80);
        uart.write(0, 0x0c);
        uart.write(3, 0x03);
        uart.write(7, 0x5a);
        uart.write(1, 0x01);
        uart
    }

    #[test]
    fn serial_state_round_trips_through_the_wire_format() {
        let state = uart_with_state().state();
        assert_eq!((state.scratch, state.baud_divisor_low), (0x5a, 0x0c));
        let bytes = rmp_serde::to_vec_named(&state).unwrap();
        let back: SerialStateData = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, state);
        // Restored into a fresh UART, it reads back the same registers.
        let mut fresh = SerialConsole::new(ConsoleSink::memory(), IrqLine::none());
        let Ok(()) = fresh.load(&back);
        assert_eq!(fresh.state(), state);
        assert_eq!(fresh.read(7), 0x5a);
    }
}
