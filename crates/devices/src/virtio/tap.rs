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
    #[error("fd {fd} is not a TAP device: {err}")]
    NotTap { fd: i32, err: std::io::Error },
    #[error("fd {fd} is TAP {name} but with flags {flags:#x}: it must be a TAP (IFF_TAP) without packet information (IFF_NO_PI) or virtio-net headers (IFF_VNET_HDR)")]
    TapFlags { fd: i32, name: String, flags: i32 },
    #[error("TAP fd {fd}: {err}")]
    Fcntl { fd: i32, err: std::io::Error },
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

/// Check that `file`, a TAP someone else opened, is one this device can drive (a TAP
/// carrying bare Ethernet frames), make it non-blocking, and return its interface name.
pub fn check_tap(file: std::os::fd::BorrowedFd<'_>) -> Result<String, TapError> {
    let fd = file.as_raw_fd();
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes an ifreq into `req`, which outlives the call; on an fd that
    // is not a tun/tap it fails with EBADFD or ENOTTY and writes nothing.
    let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF as _, &mut req) };
    if rc < 0 {
        return Err(TapError::NotTap {
            fd,
            err: std::io::Error::last_os_error(),
        });
    }
    let name: String = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    let kind = flags & (libc::IFF_TUN | libc::IFF_TAP);
    if kind != libc::IFF_TAP || flags & libc::IFF_NO_PI == 0 || flags & libc::IFF_VNET_HDR != 0 {
        return Err(TapError::TapFlags { fd, name, flags });
    }
    // SAFETY: F_GETFL/F_SETFL/F_GETFD/F_SETFD only read and set flags of an open fd; the
    // fd is not closed here. Close-on-exec: a warm reboot passes TAPs by name, never by
    // inheritance.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fdf = libc::fcntl(fd, libc::F_GETFD);
        if fl < 0
            || fdf < 0
            || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0
            || libc::fcntl(fd, libc::F_SETFD, fdf | libc::FD_CLOEXEC) < 0
        {
            return Err(TapError::Fcntl {
                fd,
                err: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn an_fd_that_is_not_a_tap_is_refused_with_its_number() {
        let file = File::open("/dev/null").unwrap();
        let e = check_tap(file.as_fd()).unwrap_err().to_string();
        assert!(e.contains("is not a TAP device"), "{e}");
        assert!(e.contains(&file.as_raw_fd().to_string()), "{e}");
    }

    #[test]
    fn an_unattached_tun_fd_is_refused() {
        // /dev/net/tun opened but never attached to an interface.
        let Ok(file) = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        else {
            return;
        };
        assert!(matches!(
            check_tap(file.as_fd()),
            Err(TapError::NotTap { .. })
        ));
    }
}
