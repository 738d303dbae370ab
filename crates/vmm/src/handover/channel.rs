//! The control channel between the old and the new VMM: a SOCK_SEQPACKET socket pair, so
//! each message keeps its boundaries and carries its file descriptors (SCM_RIGHTS) with it.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::HandoverError;

/// Largest control message (the bulky state travels in a memfd instead).
const MAX_MESSAGE: usize = 256 << 10;
/// Most fds one message may carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;

pub struct Channel {
    sock: UnixDatagram,
}

impl Channel {
    /// A connected pair; the second end is for the child and is inheritable.
    pub fn pair() -> Result<(Self, OwnedFd), HandoverError> {
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
            return Err(HandoverError::Io(format!(
                "socketpair: {}",
                std::io::Error::last_os_error()
            )));
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

    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), HandoverError> {
        self.sock
            .set_read_timeout(timeout)
            .map_err(|e| HandoverError::Io(format!("channel timeout: {e}")))
    }

    pub fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> Result<(), HandoverError> {
        if fds.len() > MAX_FDS {
            return Err(HandoverError::Io(format!(
                "{} fds in one message",
                fds.len()
            )));
        }
        let bytes =
            rmp_serde::to_vec_named(msg).map_err(|e| HandoverError::Encode(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE {
            return Err(HandoverError::Encode(format!(
                "message of {} bytes",
                bytes.len()
            )));
        }
        loop {
            match self.sock.send_with_fds(&[&bytes[..]], fds) {
                Ok(_) => return Ok(()),
                Err(e) if e.errno() == libc::EINTR => continue,
                // The other end is closed: its process has exited (or closed it on purpose).
                Err(e) if e.errno() == libc::EPIPE || e.errno() == libc::ECONNRESET => {
                    return Err(HandoverError::PeerGone)
                }
                Err(e) => return Err(HandoverError::Io(format!("send: {e}"))),
            }
        }
    }

    /// Receive one message and the fds that came with it. A closed peer (the other VMM
    /// died) and a timeout are errors.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<File>), HandoverError> {
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
                    return Err(HandoverError::Timeout(
                        "the other VMM did not answer in time".into(),
                    ))
                }
                // A peer that died with unread messages resets the connection.
                Err(e) if e.errno() == libc::ECONNRESET => return Err(HandoverError::PeerGone),
                Err(e) => return Err(HandoverError::Io(format!("recv: {e}"))),
            }
        };
        let files: Vec<File> = raw_fds[..nfds]
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
            return Err(HandoverError::PeerGone);
        }
        let msg = rmp_serde::from_slice(&buf[..len])
            .map_err(|e| HandoverError::BadState(format!("control message: {e}")))?;
        Ok((msg, files))
    }
}
