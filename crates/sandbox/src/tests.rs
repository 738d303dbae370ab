//! Each kind's filter, tried in a child process (a filter cannot be removed, and a killed
//! test process would take the harness with it): the test binary runs itself with
//! [`CHILD_ENV`] naming a kind, a mode and a system call.

use super::*;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD_ENV: &str = "WARMVM_SANDBOX_TEST_CHILD";

/// System calls outside each kind's allow-list, harmless if let through: `getcpu`, which
/// no list has, one the kind's work is near to but must not make, and an ioctl no list
/// has (the kinds that build VMs may make ioctls, but only by request number).
fn forbidden_calls(kind: ThreadKind) -> Vec<&'static str> {
    let mine = match kind {
        ThreadKind::Main => "unshare(0)",
        ThreadKind::Api | ThreadKind::Handover | ThreadKind::Fleet => "listen(-1)",
        ThreadKind::Vcpu => "ioctl(FIONBIO)",
        ThreadKind::Console | ThreadKind::SnapshotWriter => "socket(AF_UNIX)",
        ThreadKind::DeviceWorker => "openat(O_WRONLY)",
    };
    let mut calls = vec!["getcpu", mine, "ioctl(TCGETS)"];
    if kind == ThreadKind::Vcpu {
        // It may only drop itself back to SCHED_OTHER (see `vcpu_threads_may_only_...`).
        calls.push("sched_setscheduler(self, FIFO)");
    }
    calls
}

/// Whether the kind may make the VMM's non-KVM ioctls (it builds VMs).
fn builds_vms(kind: ThreadKind) -> bool {
    matches!(
        kind,
        ThreadKind::Main | ThreadKind::Api | ThreadKind::Handover
    )
}

fn make(call: &str) -> libc::c_long {
    // SAFETY: (every call below) the pointers passed are valid for the call (a local, a C string) or
    // null where the kernel accepts it.
    unsafe {
        match call {
            "getcpu" => {
                let mut cpu = 0u32;
                libc::syscall(libc::SYS_getcpu, &mut cpu, std::ptr::null_mut::<u32>(), 0)
            }
            "unshare(0)" => libc::syscall(libc::SYS_unshare, 0),
            "listen(-1)" => libc::syscall(libc::SYS_listen, -1, 0),
            "ioctl(TCGETS)" => {
                let mut t = std::mem::zeroed::<libc::termios>();
                libc::syscall(libc::SYS_ioctl, 0, libc::TCGETS, &mut t)
            }
            // Clearing non-blocking mode on stdin (/dev/null): harmless.
            "ioctl(FIONBIO)" => {
                let mut off: libc::c_int = 0;
                libc::syscall(libc::SYS_ioctl, 0, libc::FIONBIO, &mut off)
            }
            "socket(AF_UNIX)" => {
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
            }
            "sched_setscheduler(self, FIFO)" | "sched_setscheduler(self, OTHER)" => {
                let fifo = call.ends_with("FIFO)");
                let param = libc::sched_param {
                    sched_priority: i32::from(fifo),
                };
                let policy = if fifo {
                    libc::SCHED_FIFO
                } else {
                    libc::SCHED_OTHER
                };
                libc::syscall(libc::SYS_sched_setscheduler, 0, policy, &param)
            }
            "openat(O_WRONLY)" => libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/dev/null".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            ),
            other => panic!("no call {other}"),
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
    let mut parts = spec.splitn(3, ':');
    let (kind, mode, call) = (
        kind_named(parts.next().unwrap()),
        parts.next().unwrap(),
        parts.next().unwrap().to_string(),
    );
    set_mode(Mode::parse(mode).unwrap());
    start_helper().unwrap();
    // A server for the network client kinds to reach, bound before any filter.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        enter(kind).unwrap();
        // Allowed: reading files, threads where the kind starts some (clone with
        // CLONE_THREAD, after clone3's ENOSYS).
        std::fs::read_to_string("/proc/self/status").unwrap();
        if !matches!(kind, ThreadKind::Console | ThreadKind::DeviceWorker) {
            std::thread::spawn(|| 7).join().unwrap();
        }
        if builds_vms(kind) {
            make("ioctl(FIONBIO)");
        }
        if kind == ThreadKind::Fleet {
            net_client(server_addr);
        }
        drop(server);
        println!("filtered");
        let rc = make(&call);
        println!("survived {call} = {rc}");
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

/// What the fleet agent's runtime does: connect out, non-blocking, an epoll with an
/// eventfd to wake it, send and receive.
fn net_client(addr: std::net::SocketAddr) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_nonblocking(true).unwrap();
    s.write_all(b"x").unwrap();
    // SAFETY: plain fd-creating calls; the fds are closed below.
    let (ep, ev) = unsafe {
        (
            libc::epoll_create1(libc::EPOLL_CLOEXEC),
            libc::eventfd(0, libc::EFD_CLOEXEC),
        )
    };
    assert!(ep >= 0 && ev >= 0);
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 1,
    };
    // SAFETY: `ep` and `ev` are open fds and `event` is valid for the call.
    let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, ev, &mut event) };
    assert_eq!(rc, 0);
    // SAFETY: `event` is valid for writes of one event.
    let n = unsafe { libc::epoll_wait(ep, &mut event, 1, 0) };
    assert_eq!(n, 0);
    // SAFETY: both fds are ours and open.
    unsafe {
        libc::close(ev);
        libc::close(ep);
    }
}

fn run_child(kind: ThreadKind, mode: &str, call: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, format!("{kind:?}:{mode}:{call}"))
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn each_thread_kind_is_killed_for_calls_outside_its_allow_list() {
    for kind in ALL_KINDS {
        for call in forbidden_calls(kind) {
            let (status, out) = run_child(kind, "true", call);
            assert!(out.contains("filtered"), "{kind:?}: {out}");
            assert_eq!(
                status.signal(),
                Some(libc::SIGSYS),
                "{kind:?} making {call}: {status:?}\n{out}"
            );
            assert!(!out.contains("survived"), "{kind:?}: {out}");
        }
    }
}

#[test]
fn in_log_mode_the_forbidden_call_goes_through() {
    for kind in ALL_KINDS {
        let call = forbidden_calls(kind)[1];
        let (status, out) = run_child(kind, "log", call);
        assert!(status.success(), "{kind:?}: {status:?}\n{out}");
        assert!(out.contains(&format!("survived {call}")), "{kind:?}: {out}");
        assert!(out.contains("spawned outside"), "{kind:?}: {out}");
    }
}

#[test]
fn vcpu_threads_may_only_drop_themselves_to_sched_other() {
    let (status, out) = run_child(ThreadKind::Vcpu, "true", "sched_setscheduler(self, OTHER)");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(
        out.contains("survived sched_setscheduler(self, OTHER) = 0"),
        "{out}"
    );
}

#[test]
fn with_filters_off_nothing_is_installed() {
    let (status, out) = run_child(ThreadKind::Vcpu, "false", "socket(AF_UNIX)");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("survived socket(AF_UNIX) = "), "{out}");
}

#[test]
fn ioctls_are_allowed_by_request_number_only() {
    let ioctls = Ioctls {
        vcpu: vec![0xae80],
        vm: vec![0xae01, 0xae41],
    };
    let vcpu = ThreadKind::Vcpu.allowed(&ioctls).unwrap();
    assert_eq!(vcpu[&libc::SYS_ioctl].len(), 1, "one rule: KVM_RUN");
    for kind in [ThreadKind::Main, ThreadKind::Api, ThreadKind::Handover] {
        let list = kind.allowed(&ioctls).unwrap();
        // The vCPU's, the VM's and the host ones (TUNSETIFF, TUNGETIFF, FIONBIO, FIOCLEX),
        // each a rule of its own: never an empty (unconditional) rule list.
        assert_eq!(list[&libc::SYS_ioctl].len(), 1 + 2 + 4, "{kind:?}");
    }
    for kind in [
        ThreadKind::Console,
        ThreadKind::DeviceWorker,
        ThreadKind::SnapshotWriter,
    ] {
        let list = kind.allowed(&ioctls).unwrap();
        assert!(!list.contains_key(&libc::SYS_ioctl), "{kind:?}: no ioctl");
    }
    let real = Ioctls::kvm();
    assert!(real.vm.contains(&0xae01), "KVM_CREATE_VM");
    assert!(
        !real.vm.iter().any(|nr| real.vcpu.contains(nr)),
        "listed twice"
    );
    for kind in ALL_KINDS {
        let list = kind.allowed(&real).unwrap();
        if let Some(ioctl) = list.get(&libc::SYS_ioctl) {
            assert!(!ioctl.is_empty(), "{kind:?}: any ioctl");
        }
    }
}

#[test]
fn no_kind_may_start_programs_fork_trace_or_change_credentials() {
    for kind in ALL_KINDS {
        let list = kind.allowed(&Ioctls::kvm()).unwrap();
        for nr in [
            libc::SYS_execve,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_setgroups,
            libc::SYS_capset,
            libc::SYS_unshare,
            libc::SYS_mount,
        ] {
            assert!(!list.contains_key(&nr), "{kind:?} allows {nr}");
        }
        if let Some(clone) = list.get(&libc::SYS_clone) {
            assert!(!clone.is_empty(), "{kind:?}: clone is checked");
        }
    }
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
