//! Each kind's filter, tried in a child process (a filter cannot be removed, and a killed
//! test process would take the harness with it): the test binary runs itself with
//! [`CHILD_ENV`] naming a kind, a mode and a system call.

use super::*;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD_ENV: &str = "WARMVM_SANDBOX_TEST_CHILD";

/// A system call each kind must not make, harmless if it is let through.
fn forbidden_call(kind: ThreadKind) -> (&'static str, fn() -> libc::c_long) {
    match kind {
        // SAFETY (all): the calls take no pointers, or none that are dereferenced.
        ThreadKind::Main => ("unshare(0)", || unsafe {
            libc::syscall(libc::SYS_unshare, 0)
        }),
        ThreadKind::Api | ThreadKind::Handover => ("listen(-1)", || unsafe {
            libc::syscall(libc::SYS_listen, -1, 0)
        }),
        ThreadKind::Vcpu | ThreadKind::Console | ThreadKind::DeviceWorker => {
            ("socket(AF_UNIX)", || unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
            })
        }
    }
}

fn kind_named(name: &str) -> ThreadKind {
    ALL_KINDS
        .into_iter()
        .find(|k| format!("{k:?}") == name)
        .unwrap()
}

/// The child's side: start the helper, enter the kind on a fresh thread as the daemon does,
/// make an allowed call and a thread (which must work), then the forbidden call, then fork
/// outside the filters through the helper.
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (kind, mode) = spec.split_once(':').unwrap();
    let kind = kind_named(kind);
    set_mode(Mode::parse(mode).unwrap());
    start_helper().unwrap();
    std::thread::spawn(move || {
        enter(kind).unwrap();
        // Allowed: files, threads (clone with CLONE_THREAD, after clone3's ENOSYS).
        std::fs::read_to_string("/proc/self/status").unwrap();
        std::thread::spawn(|| 7).join().unwrap();
        println!("filtered");
        let (name, call) = forbidden_call(kind);
        let rc = call();
        println!("survived {name} = {rc}");
        // The helper thread starts processes however this thread is filtered.
        let out = outside(|| Command::new("/bin/true").status())
            .unwrap()
            .unwrap();
        assert!(out.success());
        println!("spawned outside");
    })
    .join()
    .unwrap();
}

fn run_child(kind: ThreadKind, mode: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, format!("{kind:?}:{mode}"))
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn each_thread_kind_is_killed_for_its_forbidden_call() {
    for kind in ALL_KINDS {
        let (status, out) = run_child(kind, "true");
        assert!(out.contains("filtered"), "{kind:?}: {out}");
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{kind:?} making {}: {status:?}\n{out}",
            forbidden_call(kind).0
        );
        assert!(!out.contains("survived"), "{kind:?}: {out}");
    }
}

#[test]
fn in_log_mode_the_forbidden_call_goes_through() {
    for kind in ALL_KINDS {
        let (status, out) = run_child(kind, "log");
        assert!(status.success(), "{kind:?}: {status:?}\n{out}");
        assert!(out.contains("survived"), "{kind:?}: {out}");
        assert!(out.contains("spawned outside"), "{kind:?}: {out}");
    }
}

#[test]
fn with_filters_off_nothing_is_installed() {
    let (status, out) = run_child(ThreadKind::Vcpu, "false");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("survived socket(AF_UNIX) = "), "{out}");
}

#[test]
fn a_filtered_thread_cannot_fork_but_the_helper_can() {
    // Fork from the filtered thread itself: clone without CLONE_THREAD.
    let Ok(spec) = std::env::var(CHILD_ENV.to_string() + "_FORK") else {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_filtered_thread_cannot_fork_but_the_helper_can",
                "--nocapture",
            ])
            .env(CHILD_ENV.to_string() + "_FORK", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
        return;
    };
    assert_eq!(spec, "1");
    set_mode(Mode::Kill);
    start_helper().unwrap();
    enter(ThreadKind::Api).unwrap();
    let _ = Command::new("/bin/true").status();
    unreachable!("the fork above must have killed the process");
}

#[test]
fn modes_parse_and_name_the_flag_when_wrong() {
    assert_eq!(Mode::parse("log").unwrap(), Mode::Log);
    assert_eq!(Mode::parse("true").unwrap().as_str(), "true");
    let e = Mode::parse("yes").unwrap_err().to_string();
    assert_eq!(e, "--seccomp yes: must be true, false or log");
}
