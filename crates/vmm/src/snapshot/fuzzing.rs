//! Entry points for fuzzing (crates/fuzz) what `vm restore` reads from a snapshot's
//! `vm.state` before it creates anything: the envelope, and the state behind its checksum
//! (a fuzzer rarely forges a CRC-32, so the payload is reached directly too), each with
//! the checks a restore makes (spec, live lifecycle, RAM files and their extents). Each
//! returns whether the input was accepted; none may panic, hang or allocate without bound.

use std::path::Path;

use super::{decode_state, RamFile, SnapshotState, FORMAT_VERSION, KIND};
use crate::state::envelope;
use crate::state::{LifecycleState, VmRecord, VmRuntime};

const DIR: &str = "/fuzz/snapshot";

/// A whole `vm.state`: magic, version, length, CRC-32, then the checked state.
pub fn open_state(bytes: &[u8]) -> bool {
    match envelope::open_as(&KIND, bytes) {
        Ok((_, payload)) => decode_state_payload(payload),
        Err(_) => false,
    }
}

/// The state behind the checksum, decoded and checked as a restore does.
pub fn decode_state_payload(payload: &[u8]) -> bool {
    decode_state(Path::new(DIR), payload).is_ok()
}

fn state(lifecycle: LifecycleState, runtime: Option<VmRuntime>) -> SnapshotState {
    SnapshotState {
        writer: crate::build(),
        boot_id: "00000000-0000-0000-0000-000000000000".into(),
        captured_at_ns: 7,
        record: VmRecord {
            spec: crate::state::VmSpec::seed(),
            lifecycle,
            runtime,
        },
        ram: vec![RamFile {
            extents: vec![(0, 4096), (1 << 20, 3 << 12)],
            crc32: 0x1234_5678,
        }],
    }
}

/// A live VM's runtime with one vCPU, every required field present (KVM's values zeroed).
fn runtime() -> VmRuntime {
    VmRuntime {
        first_stop_ns: 3,
        vcpus: vec![warmvm_hypervisor::VcpuState {
            xsave: Some(Default::default()),
            lapic: Some(Default::default()),
            msrs: vec![(0x10, 42)],
            ..Default::default()
        }],
        kvm: warmvm_hypervisor::VmState {
            irqchips: vec![Default::default()],
            pit: Some(Default::default()),
            clock: Some(Default::default()),
        },
        serial: Default::default(),
        acpi_pm: Default::default(),
        i8042: Default::default(),
        virtio: Vec::new(),
    }
}

/// Valid inputs to start a corpus from: (file name, bytes). The live VM's state is
/// accepted; the crashed one decodes but a restore refuses it.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let live = state(LifecycleState::Running, Some(runtime()));
    let crashed = state(
        LifecycleState::Crashed {
            reason: "seed".into(),
        },
        None,
    );
    let payload = |s: &SnapshotState| rmp_serde::to_vec_named(s).unwrap_or_default();
    let env = |s: &SnapshotState| envelope::encode_as(&KIND, s, FORMAT_VERSION).unwrap_or_default();
    vec![
        ("vm-state-live", env(&live)),
        ("payload-live", payload(&live)),
        ("payload-crashed", payload(&crashed)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_a_live_vm_is_accepted_and_garbage_is_not() {
        let seeds = seeds();
        assert!(open_state(&seeds[0].1), "the live envelope is refused");
        assert!(
            decode_state_payload(&seeds[1].1),
            "the live payload is refused"
        );
        assert!(
            envelope::decode_payload::<SnapshotState>(&seeds[2].1).is_ok(),
            "the crashed payload does not decode"
        );
        assert!(
            !decode_state_payload(&seeds[2].1),
            "a crashed VM is restorable"
        );
        assert!(!open_state(&seeds[1].1), "a payload without its envelope");
        assert!(!open_state(b"WARMVMSN"));
        assert!(!decode_state_payload(&[0x91, 0xc0]));
    }
}
