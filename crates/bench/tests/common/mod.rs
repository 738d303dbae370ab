//! What the bench tests share: the `warmvm` binary they run `warmvm bench ...` with (which
//! runs this package's `warmvm-bench` beside it), built fresh with the fault points; and,
//! as crates/warmvm/tests/common has them (whose `BIN` only that package's tests can
//! name), a scratch directory, the KVM requirement, process liveness and waiting.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

/// A fresh, short directory (socket paths are limited to 107 bytes).
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wvm-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn required() -> bool {
    std::env::var("WARMVM_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// True while `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
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
