//! Processes by pid: alive or not, and the ones that belong to a test's daemon socket.

use std::path::Path;
use std::time::{Duration, Instant};

/// True while `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Live processes whose command line has `arg` as one of its arguments: for a daemon's
/// socket, every process of the test that owns it (daemons, their successors, wrappers
/// such as strace, CLI commands talking to it).
pub fn pids_naming(arg: &Path) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let want = arg.as_os_str().as_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == want))
                && pid_alive(pid)
        })
        .collect()
}

/// SIGKILL every live process naming `arg` until none is left (a dying daemon may still
/// start a successor), for at most `limit`; the pids that survived it.
pub fn kill_all_naming(arg: &Path, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = pids_naming(arg);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        for pid in left {
            // SAFETY: kill has no memory effects; the process names the caller's own
            // argument (a test's socket), so it belongs to the test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until `f` holds, at most `secs`.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
