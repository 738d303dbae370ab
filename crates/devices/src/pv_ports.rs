//! The paravirtual wait, power and heartbeat ports (see `warmvm_abi::WAIT_PORT`,
//! `POWER_PORT`, `HEARTBEAT_PORT`): the reference guest's HLT, power button, and the beat an
//! outside probe watches.

use std::sync::Arc;

use warmvm_abi::{HEARTBEAT_PORT, POWER_PORT, WAIT_PORT};

use crate::bus::{Access, BusDevice};
use crate::persist::Persist;
use crate::{DeviceCounters, IoAction};

/// First port of the block, and how many ports it decodes.
pub const PV_PORTS_BASE: u16 = WAIT_PORT;
pub const PV_PORTS_LEN: u16 = HEARTBEAT_PORT + 1 - WAIT_PORT;

pub struct PvPorts {
    counters: Arc<DeviceCounters>,
}

/// The ports keep nothing between accesses, so their state is empty: why a wait ended
/// belongs to the vCPU that waited (a handover recalls every waiting vCPU, and the vCPU's
/// own state carries the rest), a power-off request ends the VM at once, and a heartbeat is
/// only its exit. The power-request count is the VM's [`DeviceCounters`], which live as
/// long as the VMM process and are not guest state. The type exists so that anything the
/// ports keep later has its place; until then [`crate::DevicesState`] carries none of it
/// (an empty struct would only add a field to the wire format).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PvPortsState {}

impl PvPorts {
    pub fn new(counters: Arc<DeviceCounters>) -> Self {
        Self { counters }
    }
}

impl BusDevice for PvPorts {
    fn read(&mut self, offset: u64, data: &mut [u8], access: Access) -> bool {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&(access.last_wake as u32).to_le_bytes());
            return true;
        }
        false
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<IoAction> {
        if offset == u64::from(HEARTBEAT_PORT - WAIT_PORT) {
            // The write itself is the signal (the host traces the exit); nothing to do.
            return (data.len() == 1).then_some(IoAction::None);
        }
        let value = u32::from_le_bytes(<[u8; 4]>::try_from(data).ok()?);
        match offset {
            0 => Some(IoAction::Wait { timeout_us: value }),
            o if o == u64::from(POWER_PORT - WAIT_PORT) => {
                self.counters
                    .power_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(IoAction::PowerOff { status: value })
            }
            _ => None,
        }
    }
}

impl Persist for PvPorts {
    type State = PvPortsState;
    type Error = std::convert::Infallible;

    fn save(&self) -> PvPortsState {
        PvPortsState {}
    }

    fn load(&mut self, _: &PvPortsState) -> Result<(), Self::Error> {
        Ok(())
    }
}

crate::persist_tests!(persist, PvPorts::new(Default::default()), |d: &PvPorts| {
    PvPorts::new(d.counters.clone())
});
