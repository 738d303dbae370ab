//! TAP devices: open one by name (creating it, or attaching to a persistent one that
//! `ip tuntap add` made), frames without packet information, non-blocking.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is invalid: 1-15 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    Open(std::io::Error),
    #[error("cannot attach to TAP {name}: {err}")]
    Attach { name: String, err: std::io::Error },
}

pub fn valid_name(name: &str) -> bool {
    (1..libc::IFNAMSIZ).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Open TAP `name` in this process's network namespace.
pub fn open_tap(name: &str) -> Result<File, TapError> {
    if !valid_name(name) {
        return Err(TapError::BadName(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is and outlives the call;
    // the fd is the tun control device just opened.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(TapError::Attach {
            name: name.to_string(),
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// Make an fd handed to the daemon non-blocking (a TAP the caller opened).
pub fn set_nonblocking(file: &File) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the file status flags of an open fd.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
