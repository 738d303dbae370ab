//! The API socket's file: binding it safely, adopting an inherited one, removing it again;
//! and the systemd readiness notification.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("a warmvm daemon is already listening on {0}")]
    Live(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot check the existing socket {path}: {err}")]
    Probe { path: PathBuf, err: io::Error },
    #[error("cannot remove the stale socket {path}: {err}")]
    RemoveStale { path: PathBuf, err: io::Error },
    #[error("cannot listen on {path}: {err}")]
    Bind { path: PathBuf, err: io::Error },
    #[error("fd {fd} is not a listening Unix stream socket")]
    BadFd { fd: RawFd },
}

/// The identity of the socket file we bound, so we remove it only if it is still ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// dev, inode and change time: inode numbers are reused once a file is gone.
    id: (u64, u64, i64, i64),
    keep: bool,
}

impl SocketFile {
    /// Remember the socket at `path` (as it is now) for removal at drop.
    pub fn adopt(path: &Path) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            id: file_id(&meta),
            keep: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leave the file in place at drop: the socket lives on in another process.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

fn file_id(meta: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Only our socket: another daemon may have replaced it since.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if file_id(&meta) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Bind a listening socket at `path`, mode 0600, in a directory that must exist (a missing
/// one is an error: the operator may have mistyped it). Refuses when a daemon answers there; replaces a stale socket file that nobody
/// listens on; never replaces anything that is not a socket.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::Live(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale socket");
                std::fs::remove_file(path).map_err(|err| SocketError::RemoveStale {
                    path: path.to_path_buf(),
                    err,
                })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(SocketError::Probe {
                    path: path.to_path_buf(),
                    err,
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(SocketError::Probe {
                path: path.to_path_buf(),
                err,
            })
        }
    }
    let bind_err = |err| SocketError::Bind {
        path: path.to_path_buf(),
        err,
    };
    // The socket must never be reachable with wider permissions, not even between bind and
    // chmod (a connection made then would wait in the backlog): bind it inside a private
    // directory, narrow its mode, then hard-link it into place (link fails rather than
    // replace a socket another daemon bound meanwhile). No process-wide umask games.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = dir.join(format!(".warmvm-{}.d", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(bind_err)?;
    let tmp = private.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    let listener = result.map_err(|err: io::Error| match err.kind() {
        io::ErrorKind::AlreadyExists => SocketError::Live(path.to_path_buf()),
        _ => bind_err(err),
    })?;
    let file = SocketFile::adopt(path).map_err(bind_err)?;
    Ok((listener, file))
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes and `len` gives `v`'s size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Adopt an inherited, already listening Unix socket (a warm reboot's handover, or socket
/// activation). Checks that `fd` is one before taking ownership of it.
pub fn listener_from_fd(fd: RawFd) -> Result<UnixListener, SocketError> {
    let ok = sockopt(fd, libc::SO_DOMAIN).ok() == Some(libc::AF_UNIX)
        && sockopt(fd, libc::SO_TYPE).ok() == Some(libc::SOCK_STREAM)
        && sockopt(fd, libc::SO_ACCEPTCONN).ok() == Some(1);
    if !ok {
        return Err(SocketError::BadFd { fd });
    }
    // SAFETY: `fd` is an open listening Unix stream socket (checked above) that the caller
    // hands over to us.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // Inherited fds may lack close-on-exec; ours must not leak into anything we start.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

/// Adopt a listening Unix socket received as an owned fd (a warm reboot's `api-listener`).
pub fn listener_from_owned(fd: std::os::fd::OwnedFd) -> Result<UnixListener, SocketError> {
    let raw = fd.as_raw_fd();
    let ok = sockopt(raw, libc::SO_DOMAIN).ok() == Some(libc::AF_UNIX)
        && sockopt(raw, libc::SO_TYPE).ok() == Some(libc::SOCK_STREAM)
        && sockopt(raw, libc::SO_ACCEPTCONN).ok() == Some(1);
    if !ok {
        return Err(SocketError::BadFd { fd: raw });
    }
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(UnixListener::from(fd))
}

/// Tell systemd (or whatever set `NOTIFY_SOCKET`) about our state, e.g. `READY=1`.
/// Returns false when nobody listens for it.
pub fn sd_notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warmvm-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn binds_0600_refuses_live_replaces_stale() {
        let dir = temp_dir("bind");
        assert!(
            matches!(
                bind(&dir.join("sub/api.sock")),
                Err(SocketError::Bind { .. })
            ),
            "a missing directory is not created"
        );
        assert!(!dir.join("sub").exists());
        let path = dir.join("api.sock");
        let (listener, file) = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(SocketError::Live(_))));
        // A socket nobody listens on any more is stale.
        drop(listener);
        std::mem::forget(file);
        let (_listener, file) = bind(&path).unwrap();
        drop(file);
        assert!(!path.exists(), "the socket file is removed at drop");
        std::fs::write(&path, "not a socket").unwrap();
        assert!(matches!(bind(&path), Err(SocketError::NotASocket(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn removal_spares_a_replaced_socket() {
        let dir = temp_dir("replaced");
        let path = dir.join("api.sock");
        let (l1, f1) = bind(&path).unwrap();
        drop(l1);
        std::fs::remove_file(&path).unwrap();
        let (_l2, f2) = bind(&path).unwrap();
        drop(f1);
        assert!(path.exists(), "another daemon's socket must stay");
        drop(f2);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn adopts_only_listening_unix_sockets() {
        let dir = temp_dir("fd");
        let path = dir.join("api.sock");
        let (listener, _file) = bind(&path).unwrap();
        let fd = listener.into_raw_fd();
        let adopted = listener_from_fd(fd).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        adopted.accept().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            listener_from_fd(a.as_raw_fd()),
            Err(SocketError::BadFd { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn notifies_a_listening_datagram_socket() {
        let dir = temp_dir("notify");
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        // set_var in a test: this test is the only one that touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(sd_notify("READY=1").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!sd_notify("READY=1").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
