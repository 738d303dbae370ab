//! The `warmvm` binary as an operator meets it: the demo, and one clear line for each kind
//! of bad input.

use std::process::{Command, Output};

use warmvm_testkit::scratch;

fn warmvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warmvm"))
        .args(args)
        .output()
        .expect("warmvm runs")
}

/// Write a config and run `warmvm run` on it.
fn run_config(name: &str, toml: &str) -> Output {
    let dir = scratch(name);
    let path = dir.join("vm.toml");
    std::fs::write(&path, toml).expect("config written");
    warmvm(&[
        "run",
        path.to_str().expect("utf-8 path"),
        "--state-dir",
        dir.to_str().expect("utf-8 path"),
    ])
}

/// A bad input: non-zero status, exactly one line on stderr naming the problem, no panic.
fn assert_one_line_error(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_eq!(out.status.code(), Some(2), "bad input exits 2: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line expected, got: {stderr}"
    );
    assert!(stderr.starts_with("warmvm: error: "), "{stderr}");
    assert!(stderr.contains(expected), "{expected:?} not in {stderr:?}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
}

#[test]
fn demo_json_lists_four_vms_that_verified_all_memory() {
    if !warmvm_testkit::kvm_available("demo_json") {
        return;
    }
    let dir = scratch("demo");
    let out = warmvm(&[
        "demo",
        "--json",
        "--state-dir",
        dir.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("demo --json prints JSON");
    assert_eq!(doc["ok"], true);
    let vms = doc["vms"].as_array().expect("vms array");
    assert_eq!(vms.len(), 4);
    for vm in vms {
        assert_eq!(vm["memory_mib"], 256);
        assert_eq!(vm["state"], "powered-off");
        assert_eq!(vm["exit_status"], 0);
        let guest = &vm["guest"];
        assert_eq!(guest["mismatches"], 0);
        assert!(guest["min_passes"].as_u64().expect("passes") >= 1);
        assert!(guest["pages_verified"].as_u64() >= guest["pages_owned"].as_u64());
        // 256 MiB less the guest's own first megabytes, in 4 KiB pages.
        assert!(guest["pages_owned"].as_u64().expect("pages") > 60_000);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_config_file() {
    let out = warmvm(&["run", "/nonexistent/warmvm.toml"]);
    assert_one_line_error(&out, "cannot read config file /nonexistent/warmvm.toml");
}

#[test]
fn unknown_config_key() {
    let out = run_config(
        "unknown-key",
        "[[vm]]\nname = \"a\"\nmemory_mib = 64\nmemroy = 3\n",
    );
    assert_one_line_error(&out, "unknown field `memroy`");
}

#[test]
fn zero_ram() {
    let out = run_config("zero-ram", "[[vm]]\nname = \"a\"\nmemory_mib = 0\n");
    assert_one_line_error(&out, "memory_mib must be at least");
}

#[test]
fn ram_beyond_host_memory() {
    let out = run_config("huge-ram", "[[vm]]\nname = \"a\"\nmemory_mib = 100000000\n");
    assert_one_line_error(&out, "exceeds this host's memory");
}

#[test]
fn missing_kernel_image() {
    let out = run_config(
        "no-kernel",
        "[[vm]]\nname = \"a\"\nmemory_mib = 64\nkernel = \"/nonexistent/vmlinuz\"\n",
    );
    assert_one_line_error(&out, "kernel /nonexistent/vmlinuz");
}

#[test]
fn garbage_kernel_image() {
    if !warmvm_testkit::kvm_available("garbage_kernel_image") {
        return;
    }
    let dir = scratch("garbage");
    let kernel = dir.join("garbage.bin");
    std::fs::write(&kernel, vec![0x5a; 8192]).expect("garbage written");
    let out = run_config(
        "garbage-kernel",
        &format!(
            "[[vm]]\nname = \"a\"\nmemory_mib = 64\nkernel = \"{}\"\n",
            kernel.display()
        ),
    );
    assert_one_line_error(&out, "neither an ELF nor a bzImage");
}

#[test]
fn missing_kvm_device() {
    let out = Command::new(env!("CARGO_BIN_EXE_warmvm"))
        .args(["demo"])
        .env("WARMVM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .expect("warmvm runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
}

/// Where this test cannot show what it claims: fail when the KVM tests are required
/// (CI), as every other KVM test does, and say why otherwise.
fn cannot_show(why: &str) {
    warmvm_testkit::skip_or_fail("kvm_without_permission", why);
}

#[test]
fn kvm_without_permission() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/usr/bin/setpriv").exists() {
        return cannot_show("it needs root and setpriv to drop privileges");
    }
    if !warmvm_testkit::kvm_available("kvm_without_permission") {
        return;
    }
    let kvm_mode = std::fs::metadata("/dev/kvm").map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o006
    });
    if kvm_mode.is_ok_and(|other| other != 0) {
        return cannot_show("/dev/kvm is open to everyone here");
    }
    let dir = scratch("noperm");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    // /dev/kvm is root-only on this host; run as nobody.
    let out = Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_warmvm"))
        .args(["demo", "--state-dir", dir.to_str().expect("utf-8")])
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no permission to open /dev/kvm"),
        "{stderr}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_a_printing_command_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    // Bash completions are larger than a pipe's buffer, so the writer meets the closed pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_warmvm"))
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}
