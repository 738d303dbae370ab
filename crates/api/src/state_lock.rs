//! One daemon per state directory: an exclusive `flock` on `<state dir>/warmvm.lock`, held
//! for the daemon's whole life and handed to the daemon a warm (or saved, or cold) reboot
//! starts.
//!
//! A `flock` belongs to the open file description, not to the process: the old daemon
//! passes its lock fd with the handover's `PrepareDone` (named [`STATE_LOCK_FD`]), so the
//! new daemon holds the very same lock before the old one exits, and the lock is never free
//! while either runs. The file holds the pid of the daemon that serves, for the refusal
//! message of a second daemon (the kernel does not say who holds a `flock`).
//!
//! A build older than the lock neither holds nor hands one. A new daemon started by such a
//! build therefore tries to take the lock itself as it starts (see [`StateLock::try_take`]):
//! the old build holds none, so it gets it, before it takes any VM over, and a third daemon
//! is refused from then on. Should that fail (a daemon of this build already holds the
//! directory beside the old one), the new daemon refuses the handover before its commit:
//! the old build keeps its VMs and no third daemon ever gets in. A daemon of this build
//! says it hands the lock over (`"state_lock": true` in the handover's extra), so its
//! successor, which cannot take the lock the old one still holds, knows to wait for the fd.
//! While an older build runs, nothing protects the directory: it never took the lock.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The lock file's name in the state directory.
pub const LOCK_NAME: &str = "warmvm.lock";
/// The name under which a reboot hands the lock's fd to the new daemon.
pub const STATE_LOCK_FD: &str = "state-lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the state directory {dir} is in use by another warmvm process{}: refusing to start", holder_suffix(*.holder))]
    Held { dir: PathBuf, holder: Option<u32> },
    #[error("cannot open the lock file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the lock handed over is not {path} (another file)")]
    NotOurs { path: PathBuf },
}

fn holder_suffix(pid: Option<u32>) -> String {
    pid.map_or_else(String::new, |p| format!(" (pid {p})"))
}

/// The lock of one state directory, held as long as this value lives (and by every process
/// its fd was handed to).
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
}

/// Where the lock of `state_dir` lives.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(LOCK_NAME)
}

fn open(path: &Path) -> Result<File, LockError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| LockError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// `flock(LOCK_EX | LOCK_NB)`: Ok(false) if another open file description holds it.
fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on an fd we own; it touches no memory of ours.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The pid written in the lock file, if it reads as one.
fn read_holder(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.seek(io::SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut s).ok()?;
    s.trim().parse().ok().filter(|&p| p > 0)
}

impl StateLock {
    /// Take the lock of `state_dir`, or refuse with the holder's pid when another daemon
    /// has it. Creates the lock file if missing, and nothing else.
    pub fn take(state_dir: &Path) -> Result<Self, LockError> {
        match Self::try_take(state_dir)? {
            Ok(lock) => Ok(lock),
            Err(holder) => Err(LockError::Held {
                dir: state_dir.to_path_buf(),
                holder,
            }),
        }
    }

    /// Try to take the lock: `Ok(Err(holder))` when another daemon has it.
    pub fn try_take(state_dir: &Path) -> Result<Result<Self, Option<u32>>, LockError> {
        let path = path(state_dir);
        let mut file = open(&path)?;
        match try_flock(&file) {
            Ok(true) => {
                let mut lock = Self { file, path };
                lock.write_pid();
                Ok(Ok(lock))
            }
            Ok(false) => Ok(Err(read_holder(&mut file))),
            Err(source) => Err(LockError::Lock { path, source }),
        }
    }

    /// The lock handed over by the old daemon: checked to be `state_dir`'s lock file, and
    /// held (a `flock` on the same open file description succeeds; on another, it fails).
    pub fn adopt(fd: OwnedFd, state_dir: &Path) -> Result<Self, LockError> {
        let path = path(state_dir);
        let file = File::from(fd);
        let same = match (file.metadata(), std::fs::symlink_metadata(&path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            return Err(LockError::NotOurs { path });
        }
        match try_flock(&file) {
            Ok(true) => {}
            Ok(false) => {
                return Err(LockError::Lock {
                    path,
                    source: io::Error::from_raw_os_error(libc::EWOULDBLOCK),
                })
            }
            Err(source) => return Err(LockError::Lock { path, source }),
        }
        // Inherited fds may lack close-on-exec; no process we start may hold the lock.
        // SAFETY: fcntl with an integer argument on an fd we own.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let mut lock = Self { file, path };
        lock.write_pid();
        Ok(lock)
    }

    /// Say who serves now (best effort: the lock itself is what protects the directory).
    fn write_pid(&mut self) {
        let pid = format!("{}\n", std::process::id());
        let r = self
            .file
            .set_len(0)
            .and_then(|_| self.file.seek(io::SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(pid.as_bytes()));
        if let Err(e) = r {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write this daemon's pid to the lock file");
        }
    }

    /// The fd to hand to a reboot's new daemon.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warmvm-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_taker_is_refused_with_the_holders_pid() {
        let dir = temp_dir("second");
        let lock = StateLock::take(&dir).unwrap();
        let e = StateLock::take(&dir).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the state directory {} is in use by another warmvm process (pid {}): refusing to start",
                dir.display(),
                std::process::id()
            )
        );
        drop(lock);
        let _again = StateLock::take(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_handed_fd_holds_the_same_lock_and_nothing_else_is_adopted() {
        let dir = temp_dir("adopt");
        let lock = StateLock::take(&dir).unwrap();
        let dup = lock.file.try_clone().unwrap();
        let adopted = StateLock::adopt(OwnedFd::from(dup), &dir).unwrap();
        // The old holder goes; the adopted fd keeps the directory locked.
        drop(lock);
        assert!(matches!(StateLock::take(&dir), Err(LockError::Held { .. })));
        // Another open of the file is not the lock.
        let other = File::open(path(&dir)).unwrap();
        assert!(matches!(
            StateLock::adopt(OwnedFd::from(other), &dir),
            Err(LockError::Lock { .. })
        ));
        // Nor is another file.
        let stray = File::create(dir.join("stray")).unwrap();
        assert!(matches!(
            StateLock::adopt(OwnedFd::from(stray), &dir),
            Err(LockError::NotOurs { .. })
        ));
        drop(adopted);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_in_the_lock_file_names_no_pid() {
        let dir = temp_dir("garbage");
        let lock = StateLock::take(&dir).unwrap();
        std::fs::write(path(&dir), "not a pid\n").unwrap();
        let e = StateLock::take(&dir).unwrap_err().to_string();
        assert!(e.contains("another warmvm process: refusing"), "{e}");
        drop(lock);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
