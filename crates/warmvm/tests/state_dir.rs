//! Filesystem hygiene: one daemon per state directory (the lock, through warm, saved and
//! cold reboots), no directory created for a `--socket` that names a missing one, and
//! relative paths refused in requests and configs without anything created.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{create, scratch, Daemon, BIN};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// A second `warmvm daemon` (no logs but errors), waited for.
fn second_daemon(socket: &Path, state_dir: &Path) -> Output {
    Command::new(BIN)
        .args(["--log-level", "error", "daemon", "--socket"])
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A second daemon on `d`'s state directory is refused, naming `d`'s pid, whether it asks
/// for `d`'s socket or another; `d`'s socket file stays the same and still answers.
fn assert_second_refused(d: &Daemon) {
    let state = d.dir.join("state");
    let before = std::fs::symlink_metadata(&d.socket).unwrap();
    let other = d.dir.join("other.sock");
    for socket in [&d.socket, &other] {
        let out = second_daemon(socket, &state);
        assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "warmvm: error: the state directory {} is in use by another warmvm daemon (pid {}): refusing to start",
                state.display(),
                d.pid
            )
        );
    }
    assert!(!other.exists(), "the refused daemon bound no socket");
    let after = std::fs::symlink_metadata(&d.socket).unwrap();
    assert_eq!(
        (before.ino(), before.ctime(), before.ctime_nsec()),
        (after.ino(), after.ctime(), after.ctime_nsec()),
        "the running daemon's socket was not replaced"
    );
    let status = d.client().status().expect("the first daemon still serves");
    assert_eq!(status["pid"].as_u64(), Some(d.pid as u64), "{status}");
    assert_eq!(
        std::fs::read_to_string(state.join("warmvm.lock")).unwrap(),
        format!("{}\n", d.pid),
        "the lock file names the daemon that serves"
    );
}

#[test]
fn a_second_daemon_on_a_used_state_directory_is_refused_and_changes_nothing() {
    if !warmvm_vmm::testing::kvm_available("second_daemon") {
        return;
    }
    let dir = scratch("lock2");
    let mut d = Daemon::start(&dir, &[]);
    assert_second_refused(&d);
    assert_eq!(d.terminate().code(), Some(0));
    // Once the daemon is gone the directory is free again.
    let d = Daemon::start(&dir, &[]);
    assert_second_refused(&d);
}

#[test]
fn the_lock_passes_through_warm_saved_and_cold_reboots() {
    if !warmvm_vmm::testing::kvm_available("lock_reboots") {
        return;
    }
    let dir = scratch("lockrb");
    let mut d = Daemon::start(&dir, &[]);
    create(&d, "l1");
    for mode in ["warm", "saved", "cold"] {
        let out = d.cli_json(&["reboot", "--mode", mode]);
        // A warm reboot's report has the new pid on top, a saved or cold one's in its
        // handover.
        let new_pid = out["new_pid"]
            .as_u64()
            .or(out["handover"]["new_pid"].as_u64())
            .unwrap_or_else(|| panic!("{mode}: {out}")) as u32;
        d.follow_reboot(new_pid);
        assert_second_refused(&d);
    }
    d.terminate_adopted();
}

#[test]
fn a_socket_in_a_missing_directory_is_refused_and_nothing_is_created() {
    let dir = scratch("nosockdir");
    let socket = dir.join("missing").join("api.sock");
    let state = dir.join("state");
    let out = second_daemon(&socket, &state);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "warmvm: error: --socket {}: the directory {} does not exist",
            socket.display(),
            dir.join("missing").display()
        )
    );
    assert!(!dir.join("missing").exists());
    assert!(!state.exists(), "nothing was created");
    let _ = std::fs::remove_dir_all(&dir);
}
