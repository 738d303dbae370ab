//! A control channel to another process of this build (the new VMM of a warm reboot, a
//! snapshot's writer): a SOCK_SEQPACKET socket pair, so each message keeps its boundaries
//! and carries its file descriptors (SCM_RIGHTS) with it.
//!
//! A datagram is bounded by the socket's send buffer (about 208 KiB by default, less on a
//! host that lowers `net.core.wmem_default`), while some messages grow with what they carry
//! (the daemon's settings and aging history, a demo's results, a VM with many vCPUs). A
//! message larger than [`MAX_INLINE`] therefore travels sealed: its bytes in an envelope in
//! a sealed memfd, passed as the first fd of a datagram that holds only [`SEALED_MARKER`]
//! (the encoding of `Msg::Sealed`), the message's own fds after it. Smaller messages go as
//! they always did, so an older build reads them; one that predates sealed messages refuses
//! a sealed one as an unknown message, before any commit.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::state::envelope;
use crate::state::StateError;

/// A message that could not go or come over the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{what}: {err}")]
    Io {
        what: &'static str,
        #[source]
        err: std::io::Error,
    },
    #[error("send: {0}")]
    Send(#[source] vmm_sys_util::errno::Error),
    #[error("recv: {0}")]
    Recv(#[source] vmm_sys_util::errno::Error),
    #[error("{0} fds in one message")]
    TooManyFds(usize),
    #[error("{0}")]
    Encode(#[source] rmp_serde::encode::Error),
    #[error("message of {0} bytes")]
    TooLarge(usize),
    #[error("the other process did not answer in time")]
    Timeout,
    /// The other end is closed: its process has exited (or closed it on purpose).
    #[error("the other process closed the channel")]
    PeerGone,
    #[error("a sealed control message without its memfd")]
    SealedWithoutMemfd,
    /// A sealed message's memfd or envelope is unsound.
    #[error("{0}")]
    Sealed(#[source] StateError),
    #[error("control message: {0}")]
    Decode(#[source] rmp_serde::decode::Error),
}

/// Largest datagram this build reads (older builds sent up to this much inline).
const MAX_MESSAGE: usize = 256 << 10;
/// Largest message sent inline; a larger one travels sealed (see the module's doc). Well
/// under any socket send buffer.
pub const MAX_INLINE: usize = 64 << 10;
/// The datagram of a sealed message: MessagePack's encoding of a unit variant named
/// `Sealed` (a string of 6 bytes; the handover's `Msg::Sealed`, which no build decodes as
/// a message of its own).
pub const SEALED_MARKER: &[u8] = b"\xa6Sealed";
/// A sealed message's envelope: its own magic, so it is never read as another state.
pub const SEALED_KIND: envelope::Kind = envelope::Kind {
    magic: *b"WARMVMMS",
    what: "a warmvm control message",
    min_version: 1,
    max_version: 1,
};
/// Most fds one message may carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;

pub struct Channel {
    sock: UnixDatagram,
}

impl Channel {
    /// A connected pair; the second end is for the child and is inheritable.
    pub fn pair() -> Result<(Self, OwnedFd), ChannelError> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array it is given.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(ChannelError::Io {
                what: "socketpair",
                err: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: both fds are new and owned by nobody else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Self::from_fd(ours), theirs))
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            sock: UnixDatagram::from(fd),
        }
    }

    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        self.sock
            .set_read_timeout(timeout)
            .map_err(|err| ChannelError::Io {
                what: "channel timeout",
                err,
            })
    }

    /// Wait at most `timeout` until a message (or the peer's end) is there to be read; true
    /// if it is. Unlike the receive timeout, which the kernel counts in scheduler ticks (a
    /// 1 µs timeout waits a whole tick), this waits on a high-resolution timer, so a
    /// deadline is kept to within the timer's slack.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, ChannelError> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd and a timespec on the stack, both outliving the call; no
        // signal mask is changed.
        match unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) } {
            n if n > 0 => Ok(true),
            0 => Ok(false),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    // Early: the caller checks its deadline and waits again.
                    Ok(false)
                } else {
                    Err(ChannelError::Io {
                        what: "poll",
                        err: e,
                    })
                }
            }
        }
    }

    pub fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> Result<(), ChannelError> {
        let bytes = rmp_serde::to_vec_named(msg).map_err(ChannelError::Encode)?;
        if bytes.len() <= MAX_INLINE {
            return self.send_datagram(&bytes, fds);
        }
        let memfd = seal_message(&bytes)?;
        let mut all = Vec::with_capacity(fds.len() + 1);
        all.push(memfd.as_raw_fd());
        all.extend_from_slice(fds);
        self.send_datagram(SEALED_MARKER, &all)
    }

    fn send_datagram(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), ChannelError> {
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds(fds.len()));
        }
        loop {
            match self.sock.send_with_fds(&[bytes], fds) {
                Ok(_) => return Ok(()),
                Err(e) if e.errno() == libc::EINTR => continue,
                // The other end is closed: its process has exited (or closed it on purpose).
                Err(e) if e.errno() == libc::EPIPE || e.errno() == libc::ECONNRESET => {
                    return Err(ChannelError::PeerGone)
                }
                Err(e) => return Err(ChannelError::Send(e)),
            }
        }
    }

    /// Receive one message and the fds that came with it. A closed peer (the other process
    /// died) and a timeout are errors.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<File>), ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let (len, nfds) = loop {
            // SAFETY: the iovec points into `buf`, which outlives the call and may take any
            // bytes.
            match unsafe { self.sock.recv_with_fds(&mut iov, &mut raw_fds) } {
                Ok(got) => break got,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EWOULDBLOCK => {
                    return Err(ChannelError::Timeout)
                }
                // A peer that died with unread messages resets the connection.
                Err(e) if e.errno() == libc::ECONNRESET => return Err(ChannelError::PeerGone),
                Err(e) => return Err(ChannelError::Recv(e)),
            }
        };
        let mut files: Vec<File> = raw_fds[..nfds]
            .iter()
            .map(|&fd| {
                // recvmsg (without MSG_CMSG_CLOEXEC) leaves them inheritable: a later warm
                // reboot would leak every RAM memfd into the next VMM, which would then keep
                // that RAM alive after the VM is deleted.
                // SAFETY: fcntl on an fd recvmsg just gave us.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                // SAFETY: recvmsg gave us these fds; nothing else owns them.
                unsafe { File::from_raw_fd(fd) }
            })
            .collect();
        if len == 0 {
            return Err(ChannelError::PeerGone);
        }
        let bytes = if &buf[..len] == SEALED_MARKER {
            if files.is_empty() {
                return Err(ChannelError::SealedWithoutMemfd);
            }
            buf = unseal_message(files.remove(0))?;
            &buf[..]
        } else {
            &buf[..len]
        };
        let msg = rmp_serde::from_slice(bytes).map_err(ChannelError::Decode)?;
        Ok((msg, files))
    }
}

/// A message's bytes in an envelope, in a sealed memfd.
fn seal_message(bytes: &[u8]) -> Result<File, ChannelError> {
    let too_big = || ChannelError::TooLarge(bytes.len());
    if bytes.len() as u64 > envelope::MAX_PAYLOAD {
        return Err(too_big());
    }
    let mut out = Vec::with_capacity(bytes.len() + 64);
    envelope::write_header(&mut out, &SEALED_KIND, 1, bytes).map_err(|_| too_big())?;
    out.write_all(bytes).map_err(|_| too_big())?;
    envelope::to_sealed_memfd(&out).map_err(ChannelError::Sealed)
}

/// The bytes of a sealed message, checked (sealed memfd, magic, length, checksum).
fn unseal_message(file: File) -> Result<Vec<u8>, ChannelError> {
    let mut bytes = envelope::from_sealed_memfd(file).map_err(ChannelError::Sealed)?;
    let (_, payload) = envelope::open_as(&SEALED_KIND, &bytes).map_err(ChannelError::Sealed)?;
    let start = bytes.len() - payload.len();
    bytes.drain(..start);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::Read;

    /// Messages like the handover's: small ones, and one that grows with what it carries.
    #[derive(Debug, Serialize, Deserialize)]
    enum Msg {
        PrepareDone {
            extra: serde_json::Value,
            extra_fd_names: Vec<String>,
        },
        Prepared {
            pid: u32,
        },
    }

    fn pair() -> (Channel, Channel) {
        let (a, b) = Channel::pair().unwrap();
        (a, Channel::from_fd(b))
    }

    /// What a daemon hands its successor grows with its aging history, a demo's with every
    /// reboot: far beyond what one datagram can hold, it must arrive whole, fds and all.
    #[test]
    fn a_message_larger_than_a_datagram_arrives_whole_with_its_fds() {
        let (a, b) = pair();
        let history: Vec<serde_json::Value> = (0..100_000)
            .map(|i| serde_json::json!({"t_ms": i, "values": {"open_fds": 12.0, "threads": 9.0}}))
            .collect();
        let extra = serde_json::json!({"aging": {"history": history}});
        let mut side = tempfile_with(b"beside");
        let msg = Msg::PrepareDone {
            extra: extra.clone(),
            extra_fd_names: vec!["side".into()],
        };
        assert!(rmp_serde::to_vec_named(&msg).unwrap().len() > 4 * MAX_MESSAGE);
        // Sent from another thread: the receiver must be reading while a datagram the
        // size of the socket buffer is written.
        let sender = std::thread::spawn(move || {
            a.send(&msg, &[side.as_raw_fd()]).unwrap();
            side.flush().unwrap();
            a
        });
        let (got, mut files) = b.recv::<Msg>().unwrap();
        let _a = sender.join().unwrap();
        match got {
            Msg::PrepareDone {
                extra: got,
                extra_fd_names,
            } => {
                assert_eq!(got, extra);
                assert_eq!(extra_fd_names, ["side"]);
            }
            other => panic!("got {other:?}"),
        }
        assert_eq!(files.len(), 1, "the message's own fd, without the memfd");
        let mut text = String::new();
        files[0].seek_start_and_read(&mut text);
        assert_eq!(text, "beside");
    }

    /// Small messages go as they always did, so an older build still reads them.
    #[test]
    fn a_small_message_stays_inline() {
        let (a, b) = pair();
        a.send(&Msg::Prepared { pid: 7 }, &[]).unwrap();
        let mut buf = [0u8; 64];
        let n = b.sock.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            rmp_serde::to_vec_named(&Msg::Prepared { pid: 7 }).unwrap()
        );
    }

    /// A marker without its memfd, or with a memfd that is not a sealed message, is refused.
    #[test]
    fn a_sealed_message_without_a_sound_memfd_is_refused() {
        let (a, b) = pair();
        a.send_datagram(SEALED_MARKER, &[]).unwrap();
        let err = b.recv::<Msg>().unwrap_err().to_string();
        assert!(err.contains("without its memfd"), "{err}");
        let state = envelope::encode(&1u32, envelope::FORMAT_VERSION).unwrap();
        let memfd = envelope::to_sealed_memfd(&state).unwrap();
        a.send_datagram(SEALED_MARKER, &[memfd.as_raw_fd()])
            .unwrap();
        let err = b.recv::<Msg>().unwrap_err().to_string();
        assert!(err.contains("not a warmvm control message"), "{err}");
    }

    trait ReadAll {
        fn seek_start_and_read(&mut self, out: &mut String);
    }

    impl ReadAll for File {
        fn seek_start_and_read(&mut self, out: &mut String) {
            use std::io::Seek;
            self.seek(std::io::SeekFrom::Start(0)).unwrap();
            self.read_to_string(out).unwrap();
        }
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        // SAFETY: a static name; we own the new fd.
        let mut f = unsafe { File::from_raw_fd(libc::memfd_create(c"t".as_ptr(), 0)) };
        f.write_all(bytes).unwrap();
        f
    }
}
