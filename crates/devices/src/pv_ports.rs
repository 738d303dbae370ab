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

/// The ports keep nothing between accesses: why a wait ended belongs to the vCPU that
/// waited (and a handover recalls every waiting vCPU), so the state is empty, but it is a
/// type of its own so that anything the ports keep later has its place.
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
    type Handles = Arc<DeviceCounters>;
    type Error = std::convert::Infallible;

    fn save(&self) -> PvPortsState {
        PvPortsState {}
    }

    fn restore(counters: Arc<DeviceCounters>, _: &PvPortsState) -> Result<Self, Self::Error> {
        Ok(Self::new(counters))
    }
}

crate::persist_tests!(persist, PvPorts::new(Default::default()), |_: &PvPorts| {
    Default::default()
});
