//! Address decoding: a bus maps non-overlapping ranges (ports or guest-physical MMIO
//! addresses) to devices, and hands each access to its device with the offset into the
//! device's range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{IoAction, Wake};

/// What the vCPU that makes an access brings with it.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// How this vCPU's last wait-port sleep ended.
    pub last_wake: Wake,
}

/// A device on a bus. `false`/`None` means the device does not decode this access (a
/// wrong size, say), which the bus counts as an unknown access.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8], access: Access) -> bool;
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<IoAction>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One bus: port I/O or MMIO.
#[derive(Default)]
pub struct Bus {
    /// base → (length, device)
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&other, &(other_len, _))) = before {
            if other + other_len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device at `addr` and the offset into its range.
    pub fn get(&self, addr: u64) -> Option<(u64, MutexGuard<'_, dyn BusDevice + 'static>)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        if offset >= *len {
            return None;
        }
        // A vCPU thread that panicked inside a device must not take the device from the
        // others: each device keeps its registers consistent between accesses.
        Some((offset, device.lock().unwrap_or_else(|p| p.into_inner())))
    }

    pub fn read(&self, addr: u64, data: &mut [u8], access: Access) -> bool {
        match self.get(addr) {
            Some((offset, mut device)) => device.read(offset, data, access),
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Option<IoAction> {
        let (offset, mut device) = self.get(addr)?;
        device.write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8], _: Access) -> bool {
            data.fill(self.0 + offset as u8);
            true
        }
        fn write(&mut self, _: u64, data: &[u8]) -> Option<IoAction> {
            self.0 = data[0];
            Some(IoAction::None)
        }
    }

    fn echo(v: u8) -> SharedDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    const ACCESS: Access = Access {
        last_wake: Wake::Timeout,
    };

    #[test]
    fn accesses_reach_the_device_with_their_offset() {
        let mut bus = Bus::default();
        bus.insert(0x1000, 0x100, echo(1)).unwrap();
        bus.insert(0x2000, 0x10, echo(7)).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x1005, &mut b, ACCESS));
        assert_eq!(b, [6]);
        assert!(bus.write(0x2000, &[9]).is_some());
        assert!(bus.read(0x2001, &mut b, ACCESS));
        assert_eq!(b, [10]);
        assert!(!bus.read(0x1100, &mut b, ACCESS), "one past the end");
        assert!(!bus.read(0xfff, &mut b, ACCESS));
        assert!(bus.write(0x3000, &[1]).is_none());
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x1000, 0x100, echo(0)).unwrap();
        assert!(matches!(
            bus.insert(0x10ff, 1, echo(0)),
            Err(BusError::Overlap { other: 0x1000, .. })
        ));
        assert!(matches!(
            bus.insert(0xf00, 0x101, echo(0)),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(0x1100, 1, echo(0)).is_ok());
        assert!(matches!(
            bus.insert(5, 0, echo(0)),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, echo(0)),
            Err(BusError::BadRange { .. })
        ));
    }
}
