//! What the bench tests share: the `warmvm` binary they run `warmvm bench ...` with (which
//! runs this package's `warmvm-bench` beside it), built fresh with the fault points; the
//! rest (scratch directories, the KVM requirement, process liveness) is the test kit's.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `warmvm` binary beside the `warmvm-bench` this test run built, itself built (or
/// found up to date) by cargo first, in the same target directory and profile and with the
/// fault points the integration tests of `warmvm` turn on: cargo builds only this package's
/// binaries for its tests, and a stale or missing `warmvm` would test the wrong code.
pub fn warmvm() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bench = Path::new(env!("CARGO_BIN_EXE_warmvm-bench"));
        let profile_dir = bench.parent().expect("target/<profile>/warmvm-bench");
        let target = profile_dir.parent().expect("a target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => panic!("no profile in {}", bench.display()),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--locked",
                "-p",
                "warmvm",
                "--profile",
                profile,
            ])
            .args([
                "--features",
                "warmvm-vmm/fault-injection,warmvm-api/fault-injection",
            ])
            .arg("--target-dir")
            .arg(target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building warmvm for the bench tests failed"
        );
        let warmvm = bench.with_file_name("warmvm");
        assert!(warmvm.is_file(), "no {}", warmvm.display());
        warmvm
    })
}

pub use warmvm_testkit::{pid_alive, scratch, wait_until};

pub fn required() -> bool {
    warmvm_testkit::kvm_required()
}
