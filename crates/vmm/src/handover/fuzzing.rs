//! Entry points for fuzzing (crates/fuzz) the decoders a new VMM runs on bytes from the old
//! one: control messages, the state envelope, and the state payload behind the envelope's
//! checksum (a fuzzer rarely forges a CRC-32, so the payload gets an entry of its own).
//! Each returns whether the input decoded; none may panic, hang or allocate without bound.

use super::envelope;
use super::messages::{HandoverState, Msg};
use crate::state::legacy::HandoverStateV2;
use crate::state::{LifecycleState, VmRecord, VmSpec};

/// A control-channel message, as `Channel::recv` (`crate::channel`) decodes it.
pub fn decode_message(bytes: &[u8]) -> bool {
    rmp_serde::from_slice::<Msg>(bytes).is_ok()
}

/// A state payload of either format this build reads.
pub fn decode_state_payload(payload: &[u8]) -> bool {
    let v3 = envelope::decode_payload::<HandoverState>(payload).is_ok();
    let v2 = envelope::decode_payload::<HandoverStateV2>(payload).is_ok();
    v3 || v2
}

/// A whole envelope: magic, version, length, CRC, then the payload.
pub fn open_envelope(bytes: &[u8]) -> bool {
    match envelope::open(bytes) {
        Ok((_, payload)) => decode_state_payload(payload),
        Err(_) => false,
    }
}

/// Valid inputs to start a corpus from: (file name, bytes).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let spec = VmSpec::seed();
    let state = HandoverState {
        sender: crate::build(),
        captured_at_ns: 1,
        host_first_stop_ns: 1,
        vms: vec![VmRecord {
            spec: spec.clone(),
            lifecycle: LifecycleState::Crashed {
                reason: "seed".into(),
            },
            runtime: None,
        }],
        quiesce_us: 1,
        capture_us: 1,
        stage_us: 1,
    };
    let msg = |m: &Msg| rmp_serde::to_vec_named(m).unwrap_or_default();
    let payload = rmp_serde::to_vec_named(&state).unwrap_or_default();
    let env = envelope::encode(&state, envelope::FORMAT_VERSION).unwrap_or_default();
    vec![
        (
            "message-hello",
            msg(&Msg::Hello {
                format_version: envelope::FORMAT_VERSION,
                sender: crate::build(),
            }),
        ),
        ("message-stage-vm", msg(&Msg::StageVm(Box::new(spec)))),
        (
            "message-prepare-done",
            msg(&Msg::PrepareDone {
                extra: serde_json::json!({"previous_pid": 1}),
                extra_fd_names: vec!["api-listener".into()],
            }),
        ),
        ("message-commit", msg(&Msg::Commit)),
        ("state-payload", payload),
        ("state-envelope", env),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_and_garbage_does_not() {
        let seeds = seeds();
        for (name, bytes) in &seeds {
            let ok = match *name {
                n if n.starts_with("message") => decode_message(bytes),
                "state-payload" => decode_state_payload(bytes),
                _ => open_envelope(bytes),
            };
            assert!(ok, "{name} does not decode");
        }
        assert!(!decode_message(b"\xff\x00garbage"));
        assert!(!open_envelope(b"WARMVM"));
        assert!(!decode_state_payload(&[0x91, 0xc0]));
    }
}
