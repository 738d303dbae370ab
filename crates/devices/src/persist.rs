//! Saving and restoring a device.
//!
//! Every device has a plain serde state type beside it (no fds, no pointers: it must cross
//! a process and may go to disk) and implements [`Persist`]. The trait has no default
//! methods, so a device cannot silently save nothing. What the state cannot hold (guest
//! memory, the host file or TAP, the interrupt line, the console sink) comes back as
//! `Handles` when the device is rebuilt.
//!
//! [`persist_tests!`](crate::persist_tests) gives every device the same two tests: its state
//! survives the wire format and a restore unchanged, and a state missing any field is
//! refused by name (fields added after the oldest readable format list themselves as
//! defaulted).

use serde::de::DeserializeOwned;
use serde::Serialize;

pub trait Persist: Sized {
    /// Plain data, strict to decode.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;
    /// The live things a restored device needs beside its state.
    type Handles;
    type Error: std::error::Error;

    /// The device's state. Callers pause the device first, so that no request is half done.
    fn save(&self) -> Self::State;

    /// Rebuild the device from `state`, which is untrusted: a state that could not have
    /// been saved is an error, never a device that misbehaves later.
    fn restore(handles: Self::Handles, state: &Self::State) -> Result<Self, Self::Error>;
}

/// The save/restore tests every device gets: `persist_tests!(module, device_expr,
/// handles_fn[, defaulted fields])`, where `device_expr` builds a device with some state
/// (not just a fresh one) and `handles_fn(&device)` builds the handles a restore needs.
#[macro_export]
macro_rules! persist_tests {
    ($module:ident, $device:expr, $handles:expr) => {
        $crate::persist_tests!($module, $device, $handles, []);
    };
    ($module:ident, $device:expr, $handles:expr, [$($defaulted:literal),*]) => {
        #[cfg(test)]
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn state_round_trips_through_the_wire_format_and_a_restore() {
                let device = $device;
                let handles = ($handles)(&device);
                $crate::persist::testing::round_trip(&device, handles);
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

    /// Save, encode, decode, restore, save again: every step must give the same state.
    pub fn round_trip<D: Persist>(device: &D, handles: D::Handles) -> D
    where
        D::Error: std::fmt::Debug,
    {
        let state = device.save();
        let bytes = rmp_serde::to_vec_named(&state).expect("encode");
        let back: D::State = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, state, "the state changed through the wire format");
        let restored = D::restore(handles, &back).expect("restore");
        assert_eq!(
            restored.save(),
            state,
            "the restored device saves another state"
        );
        restored
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
