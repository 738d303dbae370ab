//! Filesystem hygiene: one daemon per state directory (the lock, through warm, saved and
//! cold reboots), no directory created for a `--socket` that names a missing one, and
//! relative paths refused in requests and configs without anything created.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use warmvm_testkit::{create, daemon_command, refused, scratch, Daemon};

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// A second `warmvm daemon` (no logs but errors), waited for.
fn second_daemon(socket: &Path, state_dir: &Path) -> Output {
    refused(
        daemon_command(socket)
            .args(["--log-level", "error", "--state-dir"])
            .arg(state_dir),
    )
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
                "warmvm: error: the state directory {} is in use by another warmvm process (pid {}): refusing to start",
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
    if !warmvm_testkit::kvm_available("second_daemon") {
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
fn warmvm_run_and_a_daemon_never_share_a_state_directory() {
    if !warmvm_testkit::kvm_available("run_lock") {
        return;
    }
    let dir = scratch("runlock");
    let config = dir.join("vm.toml");
    std::fs::write(&config, "[[vm]]\nname = \"r1\"\nmemory_mib = 64\n").unwrap();
    let run = |state: &Path| {
        Command::new(BIN)
            .args([
                "run",
                config.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("warmvm run starts")
    };
    // A daemon holds the directory: `run` is refused with the holder's pid, starts nothing.
    let d = Daemon::start(&dir.join("d"), &[]);
    let state = d.dir.join("state");
    let mut refused_run = run(&state);
    let exited = warmvm_testkit::wait_until(30, || matches!(refused_run.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = refused_run.kill();
    }
    let out = refused_run.wait_with_output().unwrap();
    assert!(
        exited,
        "warmvm run started beside the daemon: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "warmvm: error: the state directory {} is in use by another warmvm process (pid {}): refusing to start",
            state.display(),
            d.pid
        )
    );
    assert!(
        !state.join("r1.console.log").exists(),
        "the refused run started no VM"
    );
    drop(d);
    // A `run` holds it: a daemon is refused, naming the run's pid.
    let held = dir.join("held");
    let mut child = run(&held);
    let lock = held.join("warmvm.lock");
    let named = warmvm_testkit::wait_until(30, || {
        std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == child.id().to_string())
    });
    assert!(named, "warmvm run took no lock in {}", held.display());
    let out = second_daemon(&dir.join("s.sock"), &held);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).ends_with(&format!(
            "in use by another warmvm process (pid {}): refusing to start",
            child.id()
        )),
        "{}",
        stderr(&out)
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_lock_passes_through_warm_saved_and_cold_reboots() {
    if !warmvm_testkit::kvm_available("lock_reboots") {
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

/// The files in `dir`, recursively, relative to it (sorted).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn relative_paths_in_requests_are_refused_with_one_line_and_create_nothing() {
    if !warmvm_testkit::kvm_available("relative_paths_in_requests") {
        return;
    }
    let dir = scratch("relreq");
    let d = Daemon::start(&dir, &[]);
    create(&d, "r1");
    let snap = dir.join("snap");
    d.client()
        .call(
            "PUT",
            "/v1/vms/r1/snapshot",
            Some(format!(r#"{{"dir": {snap:?}}}"#).as_bytes()),
        )
        .unwrap();
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", d.pid)).unwrap();
    let cwd_before = tree(&cwd);
    let dir_before = tree(&dir);
    let vm = |extra: &str| format!(r#"{{"name": "rel", "memory_mib": 64{extra}}}"#);
    let snap_s = snap.display().to_string();
    for (method, path, body, says) in [
        (
            "POST",
            "/v1/vms",
            vm(r#", "console_log": "rel.log""#),
            "VM rel: console_log \"rel.log\" must be an absolute path",
        ),
        (
            "POST",
            "/v1/vms",
            vm(r#", "kernel": "vmlinuz""#),
            "VM rel: kernel \"vmlinuz\" must be an absolute path",
        ),
        (
            "POST",
            "/v1/vms",
            vm(r#", "kernel": "/boot/none", "initrd": "initrd.img""#),
            "VM rel: initrd \"initrd.img\" must be an absolute path",
        ),
        (
            "POST",
            "/v1/vms",
            vm(r#", "disks": [{"path": "disk.img"}]"#),
            "VM rel: disk \"disk.img\" must be an absolute path",
        ),
        (
            "PUT",
            "/v1/vms/r1/snapshot",
            r#"{"dir": "snaps/r1"}"#.to_string(),
            "dir must be an absolute path, not \"snaps/r1\"",
        ),
        (
            "POST",
            "/v1/restore",
            r#"{"dir": "snap", "name": "rel"}"#.to_string(),
            "dir must be an absolute path, not \"snap\"",
        ),
        (
            "POST",
            "/v1/restore",
            format!(r#"{{"dir": {snap_s:?}, "name": "rel", "disks": ["d.img"]}}"#),
            "disks[0] must be an absolute path, not \"d.img\"",
        ),
        (
            "PUT",
            "/v1/reboot",
            r#"{"mode": "warm", "binary": "warmvm"}"#.to_string(),
            "must be an absolute path",
        ),
    ] {
        let e = d
            .client()
            .call(method, path, Some(body.as_bytes()))
            .expect_err(&body);
        let status = e.status().unwrap_or_default();
        assert!((400..500).contains(&status), "{body}: {status} {e}");
        let msg = e.to_string();
        assert!(msg.contains(says), "{body}: {msg}");
        assert!(!msg.contains('\n'), "{body}: {msg}");
    }
    assert_eq!(
        tree(&cwd),
        cwd_before,
        "nothing in the daemon's working directory"
    );
    assert_eq!(tree(&dir), dir_before, "nothing in the test's directory");
    assert_eq!(
        d.client().list().unwrap()["vms"].as_array().unwrap().len(),
        1
    );
}

#[test]
fn relative_paths_in_a_config_file_are_refused_with_one_line_and_create_nothing() {
    let dir = scratch("relcfg");
    let config = dir.join("vms.toml");
    let state = dir.join("state");
    let vm = "[[vm]]\nname = \"c1\"\nmemory_mib = 64\n";
    for (text, says) in [
        (
            format!("state_dir = \"state\"\n{vm}"),
            format!(
                "config file {}: state_dir \"state\" must be an absolute path",
                config.display()
            ),
        ),
        (
            format!("{vm}console_log = \"c1.log\"\n"),
            "VM c1: console_log \"c1.log\" must be an absolute path".to_string(),
        ),
        (
            format!("{vm}[[vm.disks]]\npath = \"d.img\"\n"),
            "VM c1: disk \"d.img\" must be an absolute path".to_string(),
        ),
    ] {
        std::fs::write(&config, &text).unwrap();
        for args in [
            vec![
                "daemon",
                "--config",
                config.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--socket",
                dir.join("s.sock").to_str().unwrap(),
            ],
            vec![
                "run",
                config.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
            ],
        ] {
            let out = Command::new(BIN)
                .args(&args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
            assert_eq!(stderr(&out), format!("warmvm: error: {says}"), "{args:?}");
            assert_eq!(
                tree(&dir),
                vec!["vms.toml".to_string()],
                "{args:?}: nothing created"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `warmvm demo` on its default directory removes it when it ends: after a warm reboot
/// (which a chain of other processes finish), after a failed one, and on Ctrl-C.
#[test]
fn the_demo_leaves_nothing_behind() {
    if !warmvm_testkit::kvm_available("the_demo_leaves_nothing_behind") {
        return;
    }
    let runtime = warmvm_vmm::config::default_runtime_dir();
    let demo = |extra: &[&str]| {
        Command::new(BIN)
            .args(["demo", "--json", "--vms", "1", "--memory-mib", "16"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait = |child: std::process::Child| {
        let dir = runtime.join(format!("demo-{}", child.id()));
        let out = child.wait_with_output().unwrap();
        (out.status, dir, stderr(&out))
    };
    let (status, dir, err) = wait(demo(&[
        "--seconds",
        "2",
        "--reboots",
        "2",
        "--reboot-interval-ms",
        "50",
    ]));
    assert!(status.success(), "{status}: {err}");
    assert!(!dir.exists(), "{} is left", dir.display());
    let (status, dir, err) = wait(demo(&[
        "--seconds",
        "2",
        "--upgrade-to",
        "/nonexistent/warmvm",
    ]));
    assert!(!status.success(), "a failed reboot fails the demo: {err}");
    assert!(!dir.exists(), "{} is left", dir.display());
    // Ctrl-C once the VM runs (its console log exists).
    let child = demo(&["--seconds", "60", "--no-reboot"]);
    let dir = runtime.join(format!("demo-{}", child.id()));
    assert!(
        warmvm_testkit::wait_until(30, || dir.join("demo-0").exists()),
        "the demo never made {}",
        dir.display()
    );
    // SAFETY: kill has no memory effects; the pid is our unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let (_, dir, _) = wait(child);
    assert!(!dir.exists(), "{} is left after Ctrl-C", dir.display());
}
