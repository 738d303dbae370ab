//! The migration stream: what the two sides say, and how it is framed.
//!
//! The sender opens with [`MAGIC`]; then every message is a frame: its length (u32,
//! little-endian, at most [`MAX_FRAME`]) and a [`Msg`] in MessagePack. The messages are
//! typed, versioned and strict like the state they carry (`VmRecord`): a field is only
//! ever added, with a `#[serde(default)]` of its own; nothing else defaults, so a missing
//! field is an error that names it. Unknown fields are skipped, so an older receiver reads
//! a newer sender's additions as long as the [`STREAM_VERSION`] is one it reads.
//!
//! ```text
//!  source                                         destination
//!  MAGIC, Hello (build, versions, VmSpec, CPUID digest) ─▶ check: versions, spec, name,
//!                                                          memory, CPUID; build the VM
//!        ◀── Accepted | Refused                             (guest still runs at the source)
//!  Pages{round 0..n}, RoundEnd ─▶  ◀── RoundAck            pre-copy, guest running
//!  [pause] Pages{final}, State(envelope) ─▶                restore, run nothing
//!        ◀── Ready | Failed
//!  Commit ─▶                                               run the guest
//!        ◀── Running
//!  Abort ─▶ (any time before Commit)                       discard the VM
//! ```
//!
//! Resolving a VM left in doubt is a stream of its own on a new connection, told from a
//! migration by its first message:
//!
//! ```text
//!  MAGIC, Ask (VM name, migration id) ─▶                   look up that migration
//!        ◀── Answer (committed | not-committed | undecided)
//! ```

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::state::VmSpec;

/// The first bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"WARMVMLM";
/// The stream format this build speaks, and the oldest it reads.
pub const STREAM_VERSION: u32 = 1;
pub const MIN_STREAM_VERSION: u32 = 1;
/// The largest frame either side reads: page frames are cut at [`FRAME_DATA`] bytes of
/// page data, and the state is kilobytes per vCPU.
pub const MAX_FRAME: u32 = 64 << 20;
/// Page data per frame the sender aims for.
pub const FRAME_DATA: usize = 4 << 20;
/// The longest run of pages in one [`PageRun`].
pub const MAX_RUN: u64 = 4 << 20;
/// The unit of the dirty log and of every run.
pub const PAGE: u64 = 4096;

/// Errors of the stream itself: its framing and its messages.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the peer closed the stream")]
    Closed,
    #[error("stream I/O: {0}")]
    Io(#[source] std::io::Error),
    #[error("not a warmvm migration stream (bad magic)")]
    BadMagic,
    #[error("frame of {len} bytes is over the limit of {max}")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("cannot encode a message: {0}")]
    Encode(#[source] rmp_serde::encode::Error),
    #[error("malformed message: {0}")]
    Decode(#[source] rmp_serde::decode::Error),
}

/// One message of the stream.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub enum Msg {
    /// Source: who it is and the VM it offers (before anything pauses).
    Hello(Box<Hello>),
    /// Destination: the VM is built, waiting for its pages.
    Accepted { receiver: String },
    /// Destination: it cannot take this VM; nothing was created.
    Refused { reason: String },
    /// Source: guest pages.
    Pages(Pages),
    /// Source: a pre-copy round is complete; the destination answers with `RoundAck`.
    RoundEnd { round: u32 },
    /// Destination: every page of `round` is in its RAM.
    RoundAck { round: u32 },
    /// Source, paused: the VM's state, in the state's envelope (format version, CRC-32).
    State {
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
    },
    /// Destination: the VM is restored and has not run a guest instruction.
    Ready,
    /// Source: the destination runs the VM from now on; the source never will.
    Commit,
    /// Destination: the VM runs; `resume_us` from `Commit` read to every vCPU running.
    Running { resume_us: u64 },
    /// Source: the migration is off (before `Commit`); the destination discards the VM.
    Abort { reason: String },
    /// Destination: it failed at `step`; the source resumes the VM.
    Failed { step: String, reason: String },
    /// Source of a migration left in doubt, first on a new connection: did that migration
    /// of that VM commit here?
    Ask { vm: String, migration_id: String },
    /// Destination: what became of the migration asked about.
    Answer {
        vm: String,
        migration_id: String,
        outcome: Outcome,
    },
}

/// What the destination knows of a migration the source holds in doubt.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// It read `Commit`: the VM ran here (and runs, unless it was stopped since).
    Committed,
    /// It never read `Commit` for that migration: it does not have the VM from it.
    NotCommitted,
    /// It cannot tell: a VM of that name is still being received here, or runs here by a
    /// migration it has no record of. The source keeps the VM in doubt.
    Undecided,
}

impl Msg {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "Hello",
            Msg::Accepted { .. } => "Accepted",
            Msg::Refused { .. } => "Refused",
            Msg::Pages(_) => "Pages",
            Msg::RoundEnd { .. } => "RoundEnd",
            Msg::RoundAck { .. } => "RoundAck",
            Msg::State { .. } => "State",
            Msg::Ready => "Ready",
            Msg::Commit => "Commit",
            Msg::Running { .. } => "Running",
            Msg::Abort { .. } => "Abort",
            Msg::Failed { .. } => "Failed",
            Msg::Ask { .. } => "Ask",
            Msg::Answer { .. } => "Answer",
        }
    }
}

/// What the source says first: everything the destination checks before the guest
/// pauses, and builds the VM from.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    /// The sending build ([`crate::build`]).
    pub sender: String,
    pub stream_version: u32,
    /// The state format the `State` envelope will have.
    pub state_format: u32,
    /// The VM: name, RAM layout, the CPUID each vCPU was created with, devices.
    pub spec: VmSpec,
    /// sha256 of the vCPUs' CPUIDs, so that a CPUID damaged in transit is told from one
    /// the destination cannot offer.
    pub cpuid_digest: String,
    /// This migration's id, unique to it, which the destination keeps with the VM: the
    /// source asks by it when the stream broke after `Commit`. (Added in stream format 1
    /// after its first release: a Hello without it has an empty id.)
    #[serde(default)]
    pub migration_id: String,
}

/// Guest pages of one round.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Pages {
    pub round: u32,
    pub runs: Vec<PageRun>,
}

/// `len` bytes of guest RAM from guest-physical `gpa`, both whole pages, inside one RAM
/// region.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PageRun {
    pub gpa: u64,
    pub len: u64,
    pub data: RunData,
}

/// A run's contents.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub enum RunData {
    /// All zero: sent as its length only.
    Zero,
    /// Exactly `len` bytes.
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl PageRun {
    /// The run's data bytes on the wire.
    pub fn data_len(&self) -> u64 {
        match &self.data {
            RunData::Zero => 0,
            RunData::Bytes(b) => b.len() as u64,
        }
    }
}

/// Write the stream's opening.
pub fn write_magic<W: Write>(w: &mut W) -> Result<(), StreamError> {
    w.write_all(&MAGIC).map_err(io)
}

/// Read and check the stream's opening.
pub fn read_magic<R: Read>(r: &mut R) -> Result<(), StreamError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(io)?;
    if magic != MAGIC {
        return Err(StreamError::BadMagic);
    }
    Ok(())
}

/// Encode `msg` as one frame.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, StreamError> {
    let mut out = vec![0u8; 4];
    rmp_serde::encode::write_named(&mut out, msg).map_err(StreamError::Encode)?;
    let len = out.len() as u64 - 4;
    if len > u64::from(MAX_FRAME) {
        return Err(StreamError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Send `msg` as one frame (one write); the bytes written.
pub fn send<W: Write>(w: &mut W, msg: &Msg) -> Result<u64, StreamError> {
    let frame = encode(msg)?;
    w.write_all(&frame).map_err(io)?;
    w.flush().map_err(io)?;
    Ok(frame.len() as u64)
}

/// Read one frame and decode its message. A frame over [`MAX_FRAME`] is refused before
/// anything is allocated for it.
pub fn recv<R: Read>(r: &mut R) -> Result<Msg, StreamError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(io)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(StreamError::FrameTooLarge {
            len: u64::from(len),
            max: MAX_FRAME,
        });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(io)?;
    rmp_serde::from_slice(&payload).map_err(StreamError::Decode)
}

fn io(e: std::io::Error) -> StreamError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StreamError::Closed
    } else {
        StreamError::Io(e)
    }
}

/// Decode a whole stream as the receiver would (magic, then frames until the bytes end),
/// for the fuzz target and its tests.
#[doc(hidden)]
pub fn decode_stream(bytes: &[u8]) -> Result<Vec<Msg>, StreamError> {
    let mut r = bytes;
    read_magic(&mut r)?;
    let mut out = Vec::new();
    while !r.is_empty() {
        out.push(recv(&mut r)?);
    }
    Ok(out)
}

/// One message of every kind, valid (tests and the fuzz corpus).
#[doc(hidden)]
pub fn sample_messages() -> Vec<Msg> {
    vec![
        Msg::Hello(Box::new(Hello {
            sender: crate::build(),
            stream_version: STREAM_VERSION,
            state_format: crate::state::envelope::FORMAT_VERSION,
            spec: VmSpec::seed(),
            cpuid_digest: "00".into(),
            migration_id: "m-1".into(),
        })),
        Msg::Accepted {
            receiver: "b".into(),
        },
        Msg::Pages(Pages {
            round: 0,
            runs: vec![
                PageRun {
                    gpa: 0x1000,
                    len: PAGE,
                    data: RunData::Bytes(vec![7; PAGE as usize]),
                },
                PageRun {
                    gpa: 0x2000,
                    len: 16 * PAGE,
                    data: RunData::Zero,
                },
            ],
        }),
        Msg::RoundEnd { round: 0 },
        Msg::RoundAck { round: 0 },
        Msg::State {
            envelope: vec![1, 2, 3],
        },
        Msg::Ready,
        Msg::Commit,
        Msg::Running { resume_us: 5 },
        Msg::Abort { reason: "x".into() },
        Msg::Failed {
            step: "restore".into(),
            reason: "y".into(),
        },
        Msg::Ask {
            vm: "a".into(),
            migration_id: "m-1".into(),
        },
        Msg::Answer {
            vm: "a".into(),
            migration_id: "m-1".into(),
            outcome: Outcome::Committed,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(msgs: &[Msg]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for m in msgs {
            out.extend(encode(m).unwrap());
        }
        out
    }

    #[test]
    fn every_message_round_trips_and_pages_travel_as_bytes() {
        let msgs = sample_messages();
        let bytes = stream(&msgs);
        assert_eq!(decode_stream(&bytes).unwrap(), msgs);
        // A zero run costs its header, a data run its bytes plus a header: no per-byte
        // encoding.
        let pages = encode(&msgs[2]).unwrap();
        assert!(pages.len() < PAGE as usize + 128, "{}", pages.len());
    }

    #[test]
    fn a_message_missing_a_field_is_refused_by_name() {
        // RoundAck without its round.
        let mut payload = Vec::new();
        rmp_serde::encode::write_named(
            &mut payload,
            &std::collections::BTreeMap::from([(
                "RoundAck",
                std::collections::BTreeMap::<String, u32>::new(),
            )]),
        )
        .unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend((payload.len() as u32).to_le_bytes());
        bytes.extend(payload);
        let err = decode_stream(&bytes).unwrap_err();
        assert!(err.to_string().contains("round"), "{err}");
    }

    #[test]
    fn a_hello_from_a_build_before_migration_ids_is_read_with_an_empty_id() {
        let Msg::Hello(hello) = &sample_messages()[0] else {
            panic!("the first sample is a Hello")
        };
        // The Hello as that build wrote it: every field but the id.
        let named = rmp_serde::to_vec_named(&**hello).unwrap();
        let mut fields = rmpv::decode::read_value(&mut &named[..]).unwrap();
        let rmpv::Value::Map(entries) = &mut fields else {
            panic!("a map: {fields}")
        };
        entries.retain(|(k, _)| k.as_str() != Some("migration_id"));
        let old = rmpv::Value::Map(vec![("Hello".into(), fields)]);
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &old).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend((payload.len() as u32).to_le_bytes());
        bytes.extend(payload);
        let Msg::Hello(read) = decode_stream(&bytes).unwrap().remove(0) else {
            panic!("not a Hello")
        };
        assert_eq!(read.migration_id, "");
        assert_eq!(read.spec, hello.spec);
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend((MAX_FRAME + 1).to_le_bytes());
        assert!(matches!(
            decode_stream(&bytes),
            Err(StreamError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            decode_stream(b"WARMVMHO\0\0\0\0"),
            Err(StreamError::BadMagic)
        ));
    }

    /// The decoder on random bytes, on every truncation of a valid stream and on random
    /// bit flips of it: it never panics, and every failure is one line.
    #[test]
    fn the_decoder_survives_random_and_truncated_input() {
        let valid = stream(&sample_messages());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let check = |bytes: &[u8]| {
            if let Err(e) = decode_stream(bytes) {
                assert!(!e.to_string().contains('\n'), "{e}");
            }
        };
        let whole = sample_messages().len();
        for cut in 0..valid.len() {
            // Cut at a frame's end, it is a shorter stream; anywhere else, an error.
            match decode_stream(&valid[..cut]) {
                Ok(msgs) => assert!(msgs.len() < whole, "a stream cut at {cut} decoded whole"),
                Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
            }
        }
        for _ in 0..3000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + rnd() % 8 {
                let i = (rnd() as usize) % bytes.len();
                bytes[i] ^= 1 << (rnd() % 8);
            }
            check(&bytes);
            let len = (rnd() % 512) as usize;
            let mut noise: Vec<u8> = MAGIC.to_vec();
            noise.extend((0..len).map(|_| rnd() as u8));
            check(&noise);
        }
    }
}
