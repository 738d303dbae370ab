//! Builds the reference guest (`guest/`, package `warmvm-guest`) with a nested cargo and
//! leaves it in OUT_DIR for `include_bytes!`.
//!
//! The nested build runs `cargo build -p warmvm-guest --profile guest --target
//! x86_64-unknown-linux-gnu` against the same workspace with its own target directory under
//! OUT_DIR, so it never waits for the outer build's directory lock. The outer cargo passes
//! build scripts many variables meant for this crate's own compilation (wrappers such as
//! clippy-driver, encoded rustflags, the jobserver, the profile, cfgs and features); they
//! would confuse the nested cargo, so they are removed from its environment. `RUSTC` is
//! kept, so both builds use the same compiler. No `--offline`: the guest depends only on
//! warmvm-abi, so the nested cargo has nothing to download, and it inherits
//! `CARGO_NET_OFFLINE` if the caller set it.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_PROFILE: &str = "guest";
const GUEST_PACKAGE: &str = "warmvm-guest";
const GUEST_BIN: &str = "warmvm-guest";

/// Variables the outer cargo (or clippy, or a coverage tool) sets that must not reach the
/// nested cargo.
const REMOVE: &[&str] = &[
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_JOBS",
    "CARGO_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_RUSTC_CURRENT_DIR",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
    "RUSTDOC",
    "RUSTC_LINKER",
];

/// Prefixes of such variables.
const REMOVE_PREFIXES: &[&str] = &[
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_TARGET_",
    "CARGO_PROFILE_",
    "DEP_",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root (crates/guest-image/../..)");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    for path in [
        "guest/src",
        "guest/link.ld",
        "guest/build.rs",
        "guest/Cargo.toml",
        "crates/abi/src",
        "crates/abi/Cargo.toml",
        // The `guest` profile lives here.
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }

    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .args(["-p", GUEST_PACKAGE])
        .args(["--profile", GUEST_PROFILE])
        .args(["--target", GUEST_TARGET])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if REMOVE.contains(&key) || REMOVE_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    // Tell the guest's build script it is building the real, freestanding guest.
    cmd.env("WARMVM_GUEST_FREESTANDING", "1");

    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "could not run {} to build the reference guest: {e}",
            Path::new(&cargo).display()
        )
    });
    if !output.status.success() {
        panic!(
            "building the reference guest failed ({}).\n\
             command: {:?}\n\
             --- stderr ---\n{}\n--- stdout ---\n{}",
            output.status,
            cmd,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
        );
    }

    let built = target_dir
        .join(GUEST_TARGET)
        .join(GUEST_PROFILE)
        .join(GUEST_BIN);
    let dest = out_dir.join("warmvm-guest.elf");
    fs::copy(&built, &dest).unwrap_or_else(|e| {
        panic!(
            "the nested build succeeded but {} could not be copied: {e}",
            built.display()
        )
    });
}
