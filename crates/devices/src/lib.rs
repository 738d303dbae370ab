//! The devices of a warmvm VM. They see port and MMIO accesses as plain calls and never
//! touch KVM: interrupts leave them as eventfd writes, and anything that needs the vCPU
//! (sleeping, powering off) is returned to the caller as an [`IoAction`].

pub mod console;
pub mod doorbell;
pub mod serial;
pub mod unknown;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub use console::{ConsoleLimits, ConsoleSink, ConsoleStats};
pub use doorbell::{Doorbell, Wake};
pub use serial::{IrqLine, SerialConsole, SerialStateData};
pub use unknown::UnknownAccesses;

use warmvm_abi::{POWER_PORT, SERIAL_PORT, SERIAL_PORT_LEN, WAIT_PORT};

/// What the vCPU must do after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: resume the guest.
    None,
    /// Sleep until the timeout (µs; `u32::MAX` = none) or until a device has work.
    Wait { timeout_us: u32 },
    /// The guest powered off with this exit status.
    PowerOff { status: u32 },
}

/// Counters of device activity, read by the API and metrics.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub serial_bytes_out: AtomicU64,
    pub power_requests: AtomicU64,
}

/// All devices of one VM, shared by its vCPU threads.
pub struct Devices {
    serial: Mutex<SerialConsole>,
    pub doorbell: Doorbell,
    pub unknown: UnknownAccesses,
    pub counters: DeviceCounters,
    vm_name: String,
}

impl Devices {
    pub fn new(vm_name: &str, serial: SerialConsole) -> Self {
        Self {
            serial: Mutex::new(serial),
            doorbell: Doorbell::default(),
            unknown: UnknownAccesses::default(),
            counters: DeviceCounters::default(),
            vm_name: vm_name.to_string(),
        }
    }

    fn serial_offset(port: u16) -> Option<u8> {
        port.checked_sub(SERIAL_PORT)
            .filter(|o| *o < SERIAL_PORT_LEN)
            .map(|o| o as u8)
    }

    /// A port read. `last_wake` is what this vCPU's last wait ended with.
    pub fn pio_read(&self, port: u16, data: &mut [u8], last_wake: Wake) {
        if let Some(offset) = Self::serial_offset(port) {
            if data.len() == 1 {
                data[0] = self.serial().read(offset);
                return;
            }
        } else if port == WAIT_PORT && data.len() == 4 {
            data.copy_from_slice(&(last_wake as u32).to_le_bytes());
            return;
        }
        data.fill(0xff);
        self.unknown.pio(&self.vm_name, port, data.len(), false);
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
        if let Some(offset) = Self::serial_offset(port) {
            if let [byte] = data {
                let mut serial = self.serial();
                serial.write(offset, *byte);
                if offset == 0 {
                    self.counters
                        .serial_bytes_out
                        .fetch_add(1, Ordering::Relaxed);
                }
                return IoAction::None;
            }
        } else if let Ok(word) = <[u8; 4]>::try_from(data) {
            let value = u32::from_le_bytes(word);
            match port {
                WAIT_PORT => return IoAction::Wait { timeout_us: value },
                POWER_PORT => {
                    self.counters.power_requests.fetch_add(1, Ordering::Relaxed);
                    return IoAction::PowerOff { status: value };
                }
                _ => {}
            }
        }
        self.unknown.pio(&self.vm_name, port, data.len(), true);
        IoAction::None
    }

    /// An MMIO read: no MMIO devices yet, so every access is unknown.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.unknown.mmio(&self.vm_name, addr, data.len(), false);
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.unknown.mmio(&self.vm_name, addr, data.len(), true);
    }

    /// Flush console output to its log.
    pub fn flush(&self) {
        self.serial().flush();
    }

    pub fn serial_state(&self) -> SerialStateData {
        self.serial().state()
    }

    /// The console's figures (bytes written, dropped, rotations).
    pub fn console_stats(&self) -> crate::console::ConsoleStats {
        self.serial().sink().stats()
    }

    /// A duplicate of the console log's fd, to hand to another VMM process.
    pub fn console_log_file(&self) -> Option<std::fs::File> {
        self.serial().sink().log_file()
    }

    pub fn restore_serial(&self, state: &SerialStateData) {
        self.serial().restore(state);
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, SerialConsole> {
        // A vCPU thread that panicked while holding the lock must not take the whole VM's
        // console down with it: the UART state is a handful of bytes, still consistent.
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices::new(
            "t",
            SerialConsole::new(ConsoleSink::memory(), IrqLine::none()),
        )
    }

    #[test]
    fn wait_and_power_ports_decode_32_bit_writes() {
        let d = devices();
        assert_eq!(
            d.pio_write(WAIT_PORT, &500u32.to_le_bytes()),
            IoAction::Wait { timeout_us: 500 }
        );
        assert_eq!(
            d.pio_write(POWER_PORT, &3u32.to_le_bytes()),
            IoAction::PowerOff { status: 3 }
        );
    }

    #[test]
    fn odd_sized_and_unknown_accesses_are_counted_not_fatal() {
        let d = devices();
        assert_eq!(d.pio_write(WAIT_PORT, &[1]), IoAction::None);
        assert_eq!(d.pio_write(0x80, &[1]), IoAction::None);
        let mut buf = [0u8; 2];
        d.pio_read(0x3f8, &mut buf, Wake::Timeout);
        assert_eq!(buf, [0xff, 0xff]);
        d.mmio_write(0xd000_0000, &[0; 8]);
        let c = d.unknown.counts();
        assert_eq!((c.pio_writes, c.pio_reads, c.mmio_writes), (2, 1, 1));
    }

    #[test]
    fn serial_output_reaches_the_sink() {
        let d = devices();
        for b in b"hi\n" {
            d.pio_write(SERIAL_PORT, &[*b]);
        }
        d.flush();
        assert_eq!(d.serial().sink().captured(), b"hi\n");
    }
}
