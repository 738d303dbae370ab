//! Embeds the git commit this build was made from as `WARMVM_GIT_COMMIT`, so that `status`
//! and a warm reboot's report can say which commit each side of an upgrade ran.
//!
//! The commit is, in order: `WARMVM_GIT_COMMIT` from the build's environment (a packager
//! building from a tarball can set it), `git rev-parse HEAD` in this crate's directory, or
//! "unknown" (no git, or no repository: a build from a tarball still works).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Watch `path` if it exists: a missing one would rerun this script on every build.
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=WARMVM_GIT_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = match std::env::var("WARMVM_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            // Build again when HEAD moves: a commit, a checkout (HEAD names another
            // branch) or a pack of the refs. The index is not watched: edits alone do not
            // change the commit, and watching it would rebuild on every `git add`.
            if let Some(git_dir) = git(&dir, &["rev-parse", "--absolute-git-dir"]) {
                let git_dir = PathBuf::from(git_dir);
                watch(&git_dir.join("HEAD"));
                if let Some(common) = git(&dir, &["rev-parse", "--git-common-dir"]) {
                    let common = dir.join(common);
                    watch(&common.join("packed-refs"));
                    if let Some(head_ref) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
                        watch(&common.join(head_ref));
                    }
                }
            }
            git(&dir, &["rev-parse", "HEAD"])
                .filter(|c| c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit()))
                .unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env=WARMVM_GIT_COMMIT={commit}");
}
