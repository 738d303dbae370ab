//! The KVM device travels with a warm reboot: the old VMM attaches its `/dev/kvm` fd to its
//! `Hello`, so that the new VMM need not be allowed to open the device (a daemon dropped
//! to a user without the `kvm` group). Older builds attach none, and the new VMM then
//! opens the device by path; builds that predate this close the fd unread.

use std::fs::File;

use super::{HandoverError, Violation};

/// The KVM device fd a `Hello` of state format `format` carries, if any. Format 2 had no
/// fds on its `Hello`, and format 3 at most this one: anything else is a malformed `Hello`.
/// (That the fd is a KVM device is checked when it is adopted, by
/// `Hypervisor::from_file`.)
pub(crate) fn from_hello(format: u32, mut files: Vec<File>) -> Result<Option<File>, HandoverError> {
    match files.len() {
        0 => Ok(None),
        1 if format >= 3 => Ok(files.pop()),
        fds => Err(Violation::HelloFds { format, fds }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(n: usize) -> Vec<File> {
        (0..n).map(|_| File::open("/dev/null").unwrap()).collect()
    }

    #[test]
    fn a_hello_carries_no_fd_or_one_kvm_fd_in_format_3() {
        assert!(from_hello(2, files(0)).unwrap().is_none());
        assert!(from_hello(3, files(0)).unwrap().is_none());
        assert!(from_hello(3, files(1)).unwrap().is_some());
    }

    #[test]
    fn more_fds_or_one_in_format_2_are_refused_in_one_line() {
        for (format, n) in [(3, 2), (2, 1)] {
            let e = from_hello(format, files(n)).unwrap_err().to_string();
            assert!(e.contains(&format!("carries {n} fds")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
