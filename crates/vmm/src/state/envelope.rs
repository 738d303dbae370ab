//! The envelope around every state that leaves a process: magic, format version, length and
//! CRC-32 around a MessagePack payload. The handover writes it into a memfd that is sealed
//! before it is passed on, so the receiver reads exactly what the sender wrote; a snapshot
//! writes it to a file with a magic of its own.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};

use serde::{de::DeserializeOwned, Serialize};

use super::StateError;

pub const MAGIC: [u8; 8] = *b"WARMVMHO";
/// The state format this build writes. Format 3 added the commit point and the one
/// `VmRecord` type; format 2 (builds up to commit a412568) is still read, see `legacy`.
/// Within a format, state only grows by fields with defaults of their own.
pub const FORMAT_VERSION: u32 = 3;
pub const MIN_FORMAT_VERSION: u32 = 2;
/// A sane upper bound: vCPU and device state is kilobytes per VM.
pub const MAX_PAYLOAD: u64 = 256 << 20;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;

/// Which kind of state an envelope holds: its magic and the format versions this build
/// reads. Handover state and snapshots share the envelope but not the magic, so neither is
/// ever mistaken for the other.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    pub magic: [u8; 8],
    /// For messages: "a warmvm handover state".
    pub what: &'static str,
    pub min_version: u32,
    pub max_version: u32,
}

/// The handover's state.
pub const HANDOVER: Kind = Kind {
    magic: MAGIC,
    what: "a warmvm handover state",
    min_version: MIN_FORMAT_VERSION,
    max_version: FORMAT_VERSION,
};

/// Encode `value` as a handover envelope in memory.
pub fn encode<T: Serialize>(value: &T, version: u32) -> Result<Vec<u8>, StateError> {
    encode_as(&HANDOVER, value, version)
}

/// Encode `value` as an envelope of `kind` in memory.
pub fn encode_as<T: Serialize>(
    kind: &Kind,
    value: &T,
    version: u32,
) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::new();
    encode_into(kind, value, version, &mut out)?;
    Ok(out)
}

/// Encode `value` as an envelope of `kind` into `out` (cleared first), in place: the payload
/// is written behind room for the header, which is filled in once the payload's length and
/// checksum are known. Memory `out` already has (see [`prefaulted`]) is reused as it is.
pub fn encode_into<T: Serialize>(
    kind: &Kind,
    value: &T,
    version: u32,
    out: &mut Vec<u8>,
) -> Result<(), StateError> {
    out.clear();
    out.resize(HEADER_LEN, 0);
    rmp_serde::encode::write_named(out, value).map_err(|err| StateError::Encode {
        what: kind.what,
        err,
    })?;
    let header = header(kind, version, &out[HEADER_LEN..])?;
    out[..HEADER_LEN].copy_from_slice(&header);
    Ok(())
}

/// Append the header of an envelope of `kind` around `payload` (which the caller appends
/// next) to `out`.
pub fn write_header(
    out: &mut Vec<u8>,
    kind: &Kind,
    version: u32,
    payload: &[u8],
) -> Result<(), StateError> {
    out.extend_from_slice(&header(kind, version, payload)?);
    Ok(())
}

/// The header of an envelope of `kind` around `payload`.
fn header(kind: &Kind, version: u32, payload: &[u8]) -> Result<[u8; HEADER_LEN], StateError> {
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(StateError::TooLarge {
            what: kind.what,
            len: payload.len() as u64,
            max: MAX_PAYLOAD,
        });
    }
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(&kind.magic);
    out[8..12].copy_from_slice(&version.to_le_bytes());
    // 12..16: reserved, zero.
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    // 28..32: reserved, zero.
    Ok(out)
}

/// An empty buffer of `capacity` bytes whose memory has been written once, so that filling
/// it later takes no page faults (each costs microseconds under nested virtualisation): for
/// a state encoded or read inside a warm reboot's blackout, made ready while staging.
// Not `vec![0; capacity]`: that maps zeroed pages without touching them, which is the
// point here.
#[allow(clippy::slow_vector_initialization)]
pub fn prefaulted(capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(capacity);
    buf.resize(capacity, 0);
    buf.clear();
    buf
}

/// [`prefaulted`], for a buffer that lives across a step which allocates about as much
/// again (a capture building the VMs' records, a decode): as much heap is touched and
/// freed around it, so that the step does not fault in fresh heap behind the buffer where
/// it would have reused what was free.
pub fn prefaulted_beside_heap(capacity: usize) -> Vec<u8> {
    let room = prefaulted(capacity);
    let buf = prefaulted(capacity);
    drop(room);
    buf
}

/// Check and decode an envelope. Returns the value and the format version it was written in.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, u32), StateError> {
    let (version, payload) = open(bytes)?;
    Ok((decode_payload(payload)?, version))
}

/// Decode a payload whose envelope [`open`] has checked.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, StateError> {
    rmp_serde::from_slice(payload).map_err(StateError::Decode)
}

/// Check a handover envelope (magic, a format this build reads, length, checksum) and
/// return its format version and payload.
pub fn open(bytes: &[u8]) -> Result<(u32, &[u8]), StateError> {
    open_as(&HANDOVER, bytes)
}

/// Check an envelope of `kind` and return its format version and payload.
pub fn open_as<'a>(kind: &Kind, bytes: &'a [u8]) -> Result<(u32, &'a [u8]), StateError> {
    if bytes.len() < HEADER_LEN || bytes[..8] != kind.magic {
        return Err(StateError::BadMagic { what: kind.what });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if version > kind.max_version {
        return Err(StateError::Newer {
            version,
            max: kind.max_version,
        });
    }
    if version < kind.min_version {
        return Err(StateError::Older {
            version,
            min: kind.min_version,
        });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_PAYLOAD || len != (bytes.len() - HEADER_LEN) as u64 {
        return Err(StateError::Length);
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32fast::hash(payload) != u32_at(24) {
        return Err(StateError::Checksum);
    }
    Ok((version, payload))
}

/// Write an envelope into a new memfd and seal it against any change.
pub fn to_sealed_memfd(bytes: &[u8]) -> Result<File, StateError> {
    StateMemfd::create(0)?.seal(bytes)
}

/// A memfd for an envelope, created (and its memory allocated) before the envelope exists:
/// a warm reboot makes it while staging, so that the blackout only copies the state in and
/// seals it.
pub struct StateMemfd {
    file: File,
}

impl StateMemfd {
    /// A new memfd with `capacity` bytes of memory allocated (none if 0).
    pub fn create(capacity: usize) -> Result<Self, StateError> {
        let io = StateError::Memfd;
        // SAFETY: a static NUL-terminated name; memfd_create has no memory side effects.
        let fd = unsafe {
            libc::memfd_create(
                c"warmvm-handover".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        if capacity > 0 {
            // SAFETY: fallocate on an fd we own, within a length that fits an off_t.
            let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, capacity as libc::off_t) };
            if r < 0 {
                return Err(io(std::io::Error::last_os_error()));
            }
        }
        Ok(Self { file })
    }

    /// Write `bytes` as the memfd's whole content and seal it against any change.
    pub fn seal(self, bytes: &[u8]) -> Result<File, StateError> {
        use std::os::unix::fs::FileExt;
        let io = StateError::Memfd;
        let file = self.file;
        file.write_all_at(bytes, 0).map_err(io)?;
        // The memory allocated beyond the state goes.
        file.set_len(bytes.len() as u64).map_err(io)?;
        let seals =
            libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl with an integer argument on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(file)
    }
}

/// Read an envelope out of a memfd received from the other VMM, refusing one that is not
/// sealed (its sender could still change it under us) or that is too large.
pub fn from_sealed_memfd(file: File) -> Result<Vec<u8>, StateError> {
    from_sealed_memfd_into(file, Vec::new())
}

/// [`from_sealed_memfd`] into `bytes` (cleared first), whose memory is reused as it is (see
/// [`prefaulted`]).
pub fn from_sealed_memfd_into(mut file: File, mut bytes: Vec<u8>) -> Result<Vec<u8>, StateError> {
    // SAFETY: F_GET_SEALS only reads the seals of an fd we own.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let need = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals < 0 || seals & need != need {
        return Err(StateError::Unsealed);
    }
    let len = file.metadata().map_err(StateError::Memfd)?.len();
    if len > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(StateError::Oversized(len));
    }
    bytes.clear();
    bytes.reserve(len as usize);
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(StateError::Memfd)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V1 {
        a: u32,
    }

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V2 {
        a: u32,
        #[serde(default)]
        b: Vec<u8>,
    }

    #[test]
    fn roundtrip_through_a_sealed_memfd() {
        let bytes = encode(
            &V2 {
                a: 7,
                b: vec![1, 2],
            },
            FORMAT_VERSION,
        )
        .unwrap();
        let file = to_sealed_memfd(&bytes).unwrap();
        let back = from_sealed_memfd(file).unwrap();
        let (v, version): (V2, u32) = decode(&back).unwrap();
        assert_eq!((v.a, v.b, version), (7, vec![1, 2], FORMAT_VERSION));
    }

    /// The in-place encoding is byte for byte the envelope as the header and payload were
    /// always laid out (older builds read it), and it fills the memory it was given.
    #[test]
    fn encoding_in_place_writes_the_same_envelope_into_the_given_memory() {
        let value = V2 {
            a: 7,
            b: vec![9; 100],
        };
        let payload = rmp_serde::to_vec_named(&value).unwrap();
        let mut expected = Vec::new();
        write_header(&mut expected, &HANDOVER, FORMAT_VERSION, &payload).unwrap();
        expected.extend_from_slice(&payload);
        let mut buf = prefaulted(4096);
        buf.extend_from_slice(b"left over from before");
        let at = buf.as_ptr();
        encode_into(&HANDOVER, &value, FORMAT_VERSION, &mut buf).unwrap();
        assert_eq!(buf, expected);
        assert_eq!(buf.as_ptr(), at, "the given memory was not used");
        assert_eq!(encode(&value, FORMAT_VERSION).unwrap(), expected);
    }

    /// A memfd made ready larger than the state holds exactly the state once sealed, and
    /// nothing can change it; a read buffer smaller than the state grows to take it whole.
    #[test]
    fn a_memfd_made_ready_before_holds_exactly_the_sealed_state() {
        use std::os::unix::fs::FileExt;
        let bytes = encode(
            &V2 {
                a: 7,
                b: vec![5; 10_000],
            },
            FORMAT_VERSION,
        )
        .unwrap();
        let file = StateMemfd::create(64 << 10).unwrap().seal(&bytes).unwrap();
        assert_eq!(file.metadata().unwrap().len(), bytes.len() as u64);
        assert!(file.write_at(b"x", 0).is_err(), "the state can be changed");
        assert!(file.set_len(1).is_err(), "the state can be cut");
        let back = from_sealed_memfd_into(file, prefaulted(16)).unwrap();
        assert_eq!(back, bytes);
        let (v, _): (V2, u32) = decode(&back).unwrap();
        assert_eq!((v.a, v.b.len()), (7, 10_000));
    }

    #[test]
    fn an_older_format_loads_with_defaults() {
        let bytes = encode(&V1 { a: 3 }, MIN_FORMAT_VERSION).unwrap();
        let (v, version): (V2, u32) = decode(&bytes).unwrap();
        assert_eq!((v.a, v.b.len(), version), (3, 0, MIN_FORMAT_VERSION));
    }

    #[test]
    fn corruption_and_future_versions_are_refused() {
        let mut bytes = encode(&V1 { a: 3 }, FORMAT_VERSION).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        assert!(matches!(decode::<V1>(&bytes), Err(StateError::Checksum)));
        let future = encode(&V1 { a: 3 }, FORMAT_VERSION + 1).unwrap();
        let err = decode::<V1>(&future).unwrap_err();
        assert!(matches!(err, StateError::Newer { .. }), "{err}");
        assert!(decode::<V1>(b"short").is_err());
    }

    #[test]
    fn another_kind_of_envelope_is_refused_by_its_magic() {
        const OTHER: Kind = Kind {
            magic: *b"WARMVMXX",
            what: "another state",
            min_version: 1,
            max_version: 1,
        };
        let bytes = encode_as(&OTHER, &V1 { a: 1 }, 1).unwrap();
        let err = open(&bytes).unwrap_err().to_string();
        assert!(err.contains("not a warmvm handover state"), "{err}");
        assert_eq!(open_as(&OTHER, &bytes).unwrap().0, 1);
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        // SAFETY: static name; we own the new fd.
        let file = unsafe { File::from_raw_fd(libc::memfd_create(c"t".as_ptr(), 0)) };
        assert!(from_sealed_memfd(file).is_err());
    }
}
