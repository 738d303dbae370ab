//! Reference-guest VMs for the VMM's own integration tests (snapshots and the like): a
//! scratch directory that cleans up after itself, a VM that has verified its RAM, and its
//! RAM as bytes to compare.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Host, Vm, VmConfig};

/// A fresh directory for one test, removed with everything in it when dropped (also when
/// the test panics): snapshots and disk images are large, and a failing test must not
/// fill the disk for the tests after it.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `$TMPDIR/warmvm-TAG-PID`, emptied if a killed earlier run left it.
    pub fn new(tag: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("warmvm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        ScratchDir(dir)
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running reference guest of `mib` MiB that has filled and verified its RAM at least
/// once.
pub fn running_vm(host: &mut Host, name: &str, mib: u64) -> Arc<Vm> {
    let mut c = VmConfig::reference(name, mib, 1);
    c.cmdline = Some("quiet interval_ms=10".into());
    let vm = host.create_vm(&c).expect("VM created");
    vm.start().expect("VM starts");
    wait_verified(&vm, 1);
    vm
}

/// Wait until the guest has verified every page `passes` more times, cleanly.
pub fn wait_verified(vm: &Vm, passes: u64) {
    let start = vm.guest_figures().map_or(0, |g| g.min_passes);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let g = vm.guest_figures();
        if let Some(g) = &g {
            assert_eq!(g.mismatches, 0, "VM {}: {g:?}", vm.name());
            if g.all_verified_clean() && g.min_passes >= start + passes {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "VM {} made no progress: {g:?}",
            vm.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole guest RAM of a VM, as bytes.
pub fn ram_bytes(vm: &Vm) -> Vec<u8> {
    use warmvm_memory::vm_memory::{Bytes, GuestAddress};
    let mut out = Vec::new();
    for r in vm.shared().ram.regions() {
        let mut buf = vec![0u8; r.size as usize];
        vm.shared()
            .ram
            .memory()
            .read_slice(&mut buf, GuestAddress(r.guest_addr))
            .expect("RAM readable");
        out.extend_from_slice(&buf);
    }
    out
}
