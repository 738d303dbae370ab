//! Saving a device's state and loading it into another device.
//!
//! A warm reboot moves a VM in two steps, and so does this trait. While the guest still
//! runs in the old VMM, the new one *builds* every device with its constructor, wired to
//! what the state cannot hold (guest memory, the host file or TAP, the interrupt line, the
//! console sink): a device in its power-on state. Only in the blackout is the saved state
//! *loaded* into it, in place, so that nothing is built or wired while the guest is
//! stopped. A snapshot restore does the same two steps one after the other.
//!
//! Every device has a plain serde state type beside it (no fds, no pointers: it must cross
//! a process and may go to disk) and implements [`Persist`]. The trait has no default
//! methods, so a device cannot silently save nothing. [`crate::Devices`] implements it for
//! all of a VM's devices at once.
//!
//! [`persist_tests!`](crate::persist_tests) gives every device the same two tests: its state
//! survives the wire format and a load into a freshly built device unchanged, and a state
//! missing any field is refused by name (fields added after the oldest readable format list
//! themselves as defaulted).

use serde::de::DeserializeOwned;
use serde::Serialize;

pub trait Persist {
    /// Plain data, strict to decode.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;
    type Error: std::error::Error;

    /// The device's state. Callers pause the device first, so that no request is half done.
    fn save(&self) -> Self::State;

    /// Load `state` into this device, which keeps its wiring. The state is untrusted: one
    /// that could not have been saved is an error, never a device that misbehaves later,
    /// and everything is checked before anything changes, so that a refused state leaves
    /// the device as it was.
    fn load(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// The save/load tests every device gets: `persist_tests!(module, device_expr, fresh_fn[,
/// defaulted fields])`, where `device_expr` builds a device with some state (not just a
/// fresh one) and `fresh_fn(&device)` builds another as staging would: wired the same,
/// in its power-on state.
#[macro_export]
macro_rules! persist_tests {
    ($module:ident, $device:expr, $fresh:expr) => {
        $crate::persist_tests!($module, $device, $fresh, []);
    };
    ($module:ident, $device:expr, $fresh:expr, [$($defaulted:literal),*]) => {
        #[cfg(test)]
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn state_round_trips_through_the_wire_format_and_a_load() {
                let device = $device;
                let fresh = ($fresh)(&device);
                $crate::persist::testing::round_trip(&device, fresh);
            }

            #[test]
            fn a_state_missing_a_field_is_refused_by_name() {
                let device = $device;
                $crate::persist::testing::strict(&device, &[$($defaulted),*]);
            }
        }
    };
}

/// The checks behind [`persist_tests!`](crate::persist_tests).
#[cfg(test)]
pub(crate) mod testing {
    use super::Persist;
    use std::collections::BTreeMap;

    /// Save, encode, decode, load into `fresh`, save again: every step must give the same
    /// state, and the load must have changed `fresh` (a state equal to power-on proves
    /// nothing), unless the device keeps no state at all.
    pub fn round_trip<D: Persist>(device: &D, mut fresh: D) -> D
    where
        D::Error: std::fmt::Debug,
    {
        let state = device.save();
        if std::mem::size_of::<D::State>() > 0 {
            assert_ne!(
                fresh.save(),
                state,
                "the test device must hold more than the power-on state"
            );
        }
        let bytes = rmp_serde::to_vec_named(&state).expect("encode");
        let back: D::State = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, state, "the state changed through the wire format");
        fresh.load(&back).expect("load");
        assert_eq!(fresh.save(), state, "the loaded device saves another state");
        fresh
    }

    /// Removing any top-level field but those in `defaulted` makes decoding fail with an
    /// error that names the field.
    pub fn strict<D: Persist>(device: &D, defaulted: &[&str]) {
        let bytes = rmp_serde::to_vec_named(&device.save()).expect("encode");
        let map: BTreeMap<String, rmpv::Value> = match rmp_serde::from_slice(&bytes) {
            Ok(m) => m,
            // A state that is not a struct (a unit state) has no field to lose.
            Err(_) => return,
        };
        for field in map.keys().filter(|f| !defaulted.contains(&f.as_str())) {
            let mut without = map.clone();
            without.remove(field);
            let encoded = rmp_serde::to_vec_named(&without).expect("encode");
            let err = match rmp_serde::from_slice::<D::State>(&encoded) {
                Ok(_) => panic!("a state without {field:?} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(field.as_str()), "{field}: {err}");
        }
    }
}
