//! The snapshot writer's fault points (a fault-injection build): where its tests kill it or
//! make it break its seccomp filter. Its own module so that the writer and the RAM file it
//! fills both reach them without importing each other.

#[cfg(feature = "fault-injection")]
use std::sync::OnceLock;

/// Tests only: `WARMVM_SNAPSHOT_WRITER_FAULT=kill:<point>` makes the writer kill itself with
/// SIGKILL at `early` (before its job, its seccomp filter in), `mid-ram` (after its first
/// RAM request), `before-sync` (RAM written, not synced) or `before-rename` (state written,
/// not renamed); `forbidden:<point>` makes it create a socket there instead, which its
/// seccomp filter forbids (killed by SIGSYS, or only logged with `--seccomp log`).
pub const WRITER_FAULT_ENV: &str = "WARMVM_SNAPSHOT_WRITER_FAULT";

pub(crate) fn fault_point(point: &str) {
    #[cfg(feature = "fault-injection")]
    if IS_WRITER.get().is_some() {
        let fault = std::env::var(WRITER_FAULT_ENV).unwrap_or_default();
        if fault.strip_prefix("kill:") == Some(point) {
            // SAFETY: raise only sends a signal to this process.
            unsafe { libc::raise(libc::SIGKILL) };
        }
        if fault.strip_prefix("forbidden:") == Some(point) {
            // SAFETY: socket() takes no pointers; the fd, if any, is closed at once.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

/// Set in a writer process, so that the fault points never fire in a VMM that writes its
/// own snapshots.
#[cfg(feature = "fault-injection")]
static IS_WRITER: OnceLock<()> = OnceLock::new();

/// This process is a snapshot writer: its fault points may fire.
pub(crate) fn mark_writer() {
    #[cfg(feature = "fault-injection")]
    let _ = IS_WRITER.set(());
}
