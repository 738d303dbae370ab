//! The migration stream's decoding as the fuzz target (`crates/fuzz`) drives it: what a
//! destination reads from a peer before it trusts anything.

use super::stream::{self, Msg};

/// Decode `data` as a whole stream (magic, frames); every `State` goes through the
/// envelope's checks and the strict `VmRecord` decoding, every `Hello`'s spec through
/// its checks. Refusals are expected; a panic is a bug.
pub fn decode(data: &[u8]) {
    let Ok(msgs) = stream::decode_stream(data) else {
        return;
    };
    for msg in msgs {
        match msg {
            Msg::State { envelope } => {
                let _ = super::receive::decode_state(&envelope, "seed");
            }
            Msg::Hello(hello) => {
                let _ = hello.spec.check();
            }
            _ => {}
        }
    }
}

/// A valid stream of every message kind, for the fuzz corpus.
pub fn seed() -> Vec<u8> {
    let mut out = stream::MAGIC.to_vec();
    for msg in stream::sample_messages() {
        out.extend(stream::encode(&msg).unwrap_or_default());
    }
    out
}
