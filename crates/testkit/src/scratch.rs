//! Files: a test's scratch directory, logs being written, reference-guest disk images.

use std::path::{Path, PathBuf};

/// A fresh, short directory `$TMPDIR/wvm-PID-TAG` (socket paths are limited to 107
/// bytes), emptied if a killed earlier run left it. A [`crate::Daemon`] started in it
/// removes it when dropped, unless the test failed (its logs are kept to read).
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wvm-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("scratch directory {}: {e}", dir.display()));
    dir
}

/// A file's text, or "" if it cannot be read (yet): console logs the VMM is writing.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A ustar archive of `files`, padded with zero sectors to `sectors` in all: a reference
/// guest's disk.
pub fn tar_image(files: &[(&str, Vec<u8>)], sectors: usize) -> Vec<u8> {
    let mut out = warmvm_vmm::testing::ustar_entries(files);
    assert!(out.len() + 1024 <= sectors * 512);
    out.resize(sectors * 512, 0);
    out
}
