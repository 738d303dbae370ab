//! Ctrl-C and SIGTERM for the benches that start processes of their own (QEMU): the signal
//! sets a flag that their loops check, and kills every registered child process group at
//! once, so that a loop blocked on a child (a QMP read, a migration) ends too. Each loop then
//! unwinds, and the guards on its way (children, work directories) remove what they made.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Process groups to kill on a signal; 0 = a free slot. Fixed-size: a signal handler may
/// not allocate or lock.
static GROUPS: [AtomicI32; 256] = [const { AtomicI32::new(0) }; 256];

/// Handle SIGINT and SIGTERM from now on (once per process; later calls do nothing).
pub fn install() -> Result<(), String> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the handler only stores and loads atomics and calls kill(2), all
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            signal_hook::low_level::register(sig, || {
                REQUESTED.store(true, Ordering::SeqCst);
                for slot in &GROUPS {
                    let pgid = slot.load(Ordering::SeqCst);
                    if pgid > 0 {
                        libc::kill(-pgid, libc::SIGKILL);
                    }
                }
            })
        }
        .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// `Err("interrupted")` once a signal arrived: for `?` in the benches' loops.
pub fn check() -> Result<(), String> {
    if requested() {
        Err(INTERRUPTED.into())
    } else {
        Ok(())
    }
}

pub const INTERRUPTED: &str = "interrupted (SIGINT or SIGTERM)";

/// A child started in a process group of its own (`Command::process_group(0)`), killed
/// with its group on a signal while this lives.
pub struct Registered(usize);

impl Registered {
    /// None when every slot is taken; the caller's own guard still kills the child then.
    pub fn new(pid: u32) -> Option<Self> {
        let pid = i32::try_from(pid).ok()?;
        GROUPS.iter().enumerate().find_map(|(i, slot)| {
            slot.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                .ok()
                .map(|_| Registered(i))
        })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        GROUPS[self.0].store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_groups_take_and_free_their_slot() {
        let a = Registered::new(4_000_001).unwrap();
        let b = Registered::new(4_000_002).unwrap();
        assert_ne!(a.0, b.0);
        let held = |pid: i32| GROUPS.iter().any(|s| s.load(Ordering::SeqCst) == pid);
        assert!(held(4_000_001) && held(4_000_002));
        drop(a);
        assert!(!held(4_000_001) && held(4_000_002));
        drop(b);
        assert!(!held(4_000_002));
        assert!(Registered::new(u32::MAX).is_none(), "not a pid");
    }
}
