//! The word that decides, once and for both VMMs, which one runs the guests.
//!
//! After `Commit` the old VMM may hear nothing more: the new VMM may die, stop or hang
//! before or after it let the guests run, and the channel cannot tell which. Resuming the
//! old copies after the new one ran the guests would corrupt them; giving them up when it
//! never did would lose them for nothing. So the old VMM shares one page with the new one,
//! and each side may change its word once, from undecided, with one compare-and-swap: the
//! new VMM *claims* it after reading `Commit` (or seeing the old VMM gone) and before it
//! lets any vCPU run; the old VMM *revokes* it when no report comes in time. Whichever
//! swap succeeds wins, so the guests run in exactly one of the two processes.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use super::{HandoverError, Violation};

const SIZE: usize = 4096;
const UNDECIDED: u32 = 0;
const CLAIMED: u32 = 0x434c_4d44; // "CLMD"
const REVOKED: u32 = 0x5256_4b44; // "RVKD"

pub(crate) struct CommitFlag {
    file: File,
    ptr: *mut AtomicU32,
}

// SAFETY: the mapping is only accessed through an AtomicU32, which is Sync.
unsafe impl Send for CommitFlag {}
// SAFETY: as above.
unsafe impl Sync for CommitFlag {}

impl CommitFlag {
    /// A new, unset flag (old VMM).
    pub(crate) fn create() -> Result<Self, HandoverError> {
        let io = |what: &str| HandoverError::Io {
            what: format!("commit flag: {what}"),
            err: std::io::Error::last_os_error(),
        };
        // SAFETY: a static NUL-terminated name; memfd_create has no memory side effects.
        let fd = unsafe {
            libc::memfd_create(
                c"warmvm-commit".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io("memfd_create"));
        }
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(SIZE as u64).map_err(|err| HandoverError::Io {
            what: "commit flag: set_len".into(),
            err,
        })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl with an integer argument on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io("seal"));
        }
        Self::map(file)
    }

    /// The flag the old VMM passed (new VMM). Refuses a file that could shrink under us
    /// (a mapping past its end would fault).
    pub(crate) fn adopt(file: File) -> Result<Self, HandoverError> {
        let bad = |m: &'static str| HandoverError::from(Violation::CommitFlag(m));
        // SAFETY: F_GET_SEALS only reads the seals of an fd we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad("not sealed against shrinking"));
        }
        let len = file
            .metadata()
            .map_err(|e| HandoverError::from(Violation::CommitFlagFile(e)))?
            .len();
        if len < SIZE as u64 {
            return Err(bad("too small"));
        }
        Self::map(file)
    }

    fn map(file: File) -> Result<Self, HandoverError> {
        // SAFETY: a new shared mapping of SIZE bytes of a file at least that long (sealed
        // against shrinking); unmapped in Drop, and never handed out beyond `self`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HandoverError::Io {
                what: "commit flag: mmap".into(),
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            ptr: ptr.cast(),
        })
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: `ptr` is a live, page-aligned mapping of SIZE bytes for as long as self.
        unsafe { &*self.ptr }
    }

    /// New VMM: take the guests. True if they are ours to run; false if the old VMM
    /// revoked the handover first (then they must never run here).
    pub(crate) fn claim(&self) -> bool {
        self.swap_from_undecided(CLAIMED) == CLAIMED
    }

    /// Old VMM: take the guests back. True if the new VMM has not claimed them and now
    /// never will; false if it has (they are the new VMM's, whatever became of it).
    pub(crate) fn revoke(&self) -> bool {
        self.swap_from_undecided(REVOKED) == REVOKED
    }

    /// The word after trying to set it to `to`: `to`, or what the other side set first.
    fn swap_from_undecided(&self, to: u32) -> u32 {
        match self
            .word()
            .compare_exchange(UNDECIDED, to, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => to,
            Err(now) => now,
        }
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for CommitFlag {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `map`; no reference to it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_wins_over_a_later_revocation() {
        let old = CommitFlag::create().unwrap();
        let new = CommitFlag::adopt(old.file().try_clone().unwrap()).unwrap();
        assert!(new.claim());
        assert!(new.claim(), "claiming twice is still ours");
        assert!(!old.revoke());
    }

    #[test]
    fn a_revocation_wins_over_a_later_claim() {
        let old = CommitFlag::create().unwrap();
        let new = CommitFlag::adopt(old.file().try_clone().unwrap()).unwrap();
        assert!(old.revoke());
        assert!(!new.claim());
    }

    #[test]
    fn racing_sides_agree_on_exactly_one_winner() {
        for _ in 0..200 {
            let old = CommitFlag::create().unwrap();
            let new = CommitFlag::adopt(old.file().try_clone().unwrap()).unwrap();
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| new.claim());
                let b = s.spawn(|| old.revoke());
                (a.join().unwrap(), b.join().unwrap())
            });
            assert!(a ^ b, "claimed {a}, revoked {b}");
        }
    }

    #[test]
    fn an_unsealed_or_short_file_is_refused() {
        // SAFETY: static name; we own the new fd.
        let file = unsafe { File::from_raw_fd(libc::memfd_create(c"t".as_ptr(), 0)) };
        file.set_len(SIZE as u64).unwrap();
        assert!(CommitFlag::adopt(file).is_err());
    }
}
