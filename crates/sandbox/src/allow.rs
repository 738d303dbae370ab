//! What each thread kind may call: groups of system calls, each with why it is needed.
//!
//! Found by tracing the daemon (`strace -f -ff`, one file per thread, named by the thread
//! name each sets) through VM creation with virtio disks and a TAP, HTTP traffic, metrics,
//! snapshots and restores, pause/resume, warm reboots, a live upgrade, saved and cold
//! reboots and shutdown, then by running the test suites with `--seccomp log`.
//!
//! Filters stack: a thread inherits the filters of the thread that created it, and a call
//! must pass all of them. So a kind's list must also cover the threads it may create (a
//! vCPU thread starts a virtio worker when the guest's driver activates the device), and
//! the main thread's list is the union of all: the main thread installs its filter before
//! it creates any thread but the helper, and then creates every kind (API threads per
//! connection, which create vCPU and worker threads; the console flusher; the rejuvenation
//! and aging threads, which reboot; and, taking VMs over after a warm reboot, vCPU threads
//! itself). Its own list could only be narrower if those threads were created by an
//! unfiltered thread (the helper) and filtered themselves first thing; until then the one
//! call only the main thread may make is binding listeners ([`LISTEN`]).
//!
//! `ioctl` is never allowed outright: by request number (the second argument), only the
//! KVM requests crates/hypervisor lists as the ones it issues, and the few the VMM makes on
//! TAPs and sockets ([`HOST_IOCTLS`]).
use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::{SandboxError, ThreadKind};

/// A syscall allowed outright, or only when one of its rules matches.
#[derive(Clone, Copy)]
enum Allow {
    Always(i64),
    /// `clone` that creates a thread (CLONE_THREAD set), never a process.
    ThreadClone,
    /// `openat` with O_RDONLY|O_CLOEXEC only: glibc's malloc reads
    /// /sys/devices/system/cpu/online on a thread's first allocation, and std opens files
    /// that way to read them.
    OpenatReadOnly,
    /// `ioctl` with one of the vCPU thread's KVM requests only.
    VcpuIoctls,
    /// `ioctl` with one of the KVM requests building, restoring, snapshotting and handing
    /// over a VM makes on the system and VM fds.
    VmIoctls,
    /// `ioctl` with one of [`HOST_IOCTLS`].
    HostIoctls,
    /// `sched_setscheduler` of the calling thread (pid 0) to SCHED_OTHER only: a vCPU
    /// thread raised to real-time for a warm reboot's blackout drops back by itself before
    /// it runs its guest again; it can never raise itself.
    SchedOtherSelf,
}

/// The ioctl request numbers the lists allow, as crates/hypervisor lists them.
pub(crate) struct Ioctls {
    pub vcpu: Vec<u64>,
    pub vm: Vec<u64>,
}

impl Ioctls {
    pub(crate) fn kvm() -> Ioctls {
        Ioctls {
            vcpu: warmvm_hypervisor::vcpu_thread_ioctls(),
            vm: warmvm_hypervisor::vm_ioctls(),
        }
    }
}

/// The non-KVM ioctls of the threads that build VMs:
/// - `TUNSETIFF` attaches a TAP by name to the /dev/net/tun fd a VM's virtio-net opens;
///   `TUNGETIFF` checks a TAP fd handed over by the caller (`tap_fd`), or by the previous
///   daemon, is a TAP without packet information or vnet headers. (The device uses neither
///   vnet headers nor offloads, so TUNSETVNETHDRSZ and TUNSETOFFLOAD stay forbidden.)
/// - `FIONBIO` is how std makes a socket non-blocking (`set_nonblocking` on the API
///   listener, accepted connections and the overflow responder's streams).
/// - `FIOCLEX` is how std sets close-on-exec on an fd it did not create with it; it only
///   narrows what a successor inherits.
const HOST_IOCTLS: &[u64] = &[
    libc::TUNSETIFF,
    libc::TUNGETIFF,
    libc::FIONBIO,
    libc::FIOCLEX,
];

use Allow::*;

/// What any thread of the process does: memory, locks, time, signals, thread bookkeeping,
/// reading and writing fds it was given, and installing its own kind's filter.
const EVERY_THREAD: &[Allow] = &[
    Always(libc::SYS_read),
    Always(libc::SYS_write),
    Always(libc::SYS_readv),
    Always(libc::SYS_writev),
    Always(libc::SYS_close),
    Always(libc::SYS_lseek),
    Always(libc::SYS_fstat),
    Always(libc::SYS_newfstatat),
    Always(libc::SYS_statx),
    Always(libc::SYS_fcntl),
    Always(libc::SYS_poll),
    Always(libc::SYS_ppoll),
    OpenatReadOnly,
    // memory
    Always(libc::SYS_mmap),
    Always(libc::SYS_munmap),
    Always(libc::SYS_mprotect),
    Always(libc::SYS_madvise),
    Always(libc::SYS_mremap),
    Always(libc::SYS_brk),
    // locks, time, scheduling
    Always(libc::SYS_futex),
    Always(libc::SYS_sched_yield),
    Always(libc::SYS_sched_getaffinity),
    Always(libc::SYS_clock_gettime),
    Always(libc::SYS_clock_getres),
    Always(libc::SYS_gettimeofday),
    Always(libc::SYS_clock_nanosleep),
    Always(libc::SYS_nanosleep),
    Always(libc::SYS_getrandom),
    // signals (the vCPU kick's handler, abort on a fatal error)
    Always(libc::SYS_rt_sigprocmask),
    Always(libc::SYS_rt_sigreturn),
    Always(libc::SYS_sigaltstack),
    Always(libc::SYS_tgkill),
    Always(libc::SYS_restart_syscall),
    // a panic's message and backtrace (std shortens paths against the working directory
    // and finds its own binary)
    Always(libc::SYS_getcwd),
    Always(libc::SYS_readlink),
    Always(libc::SYS_readlinkat),
    // thread start and end (std names the thread with prctl; `enter` installs the kind's
    // filter with prctl(NO_NEW_PRIVS) and seccomp, which can only add restrictions)
    Always(libc::SYS_rseq),
    Always(libc::SYS_set_robust_list),
    Always(libc::SYS_gettid),
    Always(libc::SYS_getpid),
    Always(libc::SYS_prctl),
    Always(libc::SYS_seccomp),
    Always(libc::SYS_exit),
    Always(libc::SYS_exit_group),
];

/// Starting threads (clone3 is let through here and answered ENOSYS by a second filter,
/// so glibc falls back to `clone`, whose flags a filter can read).
const THREADS: &[Allow] = &[ThreadClone, Always(libc::SYS_clone3)];

/// A virtio worker's I/O: disk images by offset, TAP frames, eventfds, flushes.
const DEVICE_IO: &[Allow] = &[
    Always(libc::SYS_pread64),
    Always(libc::SYS_pwrite64),
    Always(libc::SYS_preadv),
    Always(libc::SYS_pwritev),
    Always(libc::SYS_fsync),
    Always(libc::SYS_fdatasync),
];

/// Files by path: console logs and their rotation, snapshots (RAM files by extents, the
/// state renamed into place), the state directory, /proc for metrics and aging.
const FILES: &[Allow] = &[
    Always(libc::SYS_openat),
    Always(libc::SYS_mkdir),
    Always(libc::SYS_mkdirat),
    Always(libc::SYS_unlink),
    Always(libc::SYS_unlinkat),
    Always(libc::SYS_rmdir),
    Always(libc::SYS_rename),
    Always(libc::SYS_renameat),
    Always(libc::SYS_renameat2),
    Always(libc::SYS_link),
    Always(libc::SYS_linkat),
    Always(libc::SYS_chmod),
    Always(libc::SYS_fchmod),
    Always(libc::SYS_access),
    Always(libc::SYS_faccessat),
    Always(libc::SYS_faccessat2),
    Always(libc::SYS_getdents64),
    Always(libc::SYS_ftruncate),
    Always(libc::SYS_fallocate),
    Always(libc::SYS_fadvise64),
    Always(libc::SYS_statfs),
    Always(libc::SYS_fstatfs),
    Always(libc::SYS_copy_file_range),
    Always(libc::SYS_sendfile),
    Always(libc::SYS_flock),
    Always(libc::SYS_mincore),
    Always(libc::SYS_msync),
];

/// Building VMs: the KVM ioctls on the system, VM and vCPU fds (the vCPU ones too, as
/// these threads create the vCPU threads, whose filters stack on theirs), TAP and socket
/// ioctls, guest RAM memfds and their seals, eventfds, fd duplication and pipes.
const VMM: &[Allow] = &[
    VmIoctls,
    VcpuIoctls,
    HostIoctls,
    Always(libc::SYS_memfd_create),
    Always(libc::SYS_eventfd2),
    Always(libc::SYS_dup),
    Always(libc::SYS_dup2),
    Always(libc::SYS_dup3),
    Always(libc::SYS_pipe2),
];

/// Serving the API and handing over: accepted connections, sd_notify's datagram, the
/// handover's socket pair and fd passing; live migration's TCP streams (the listener's
/// accepts, the source's connect, both sides' sends and receives).
const SOCKETS: &[Allow] = &[
    Always(libc::SYS_accept4),
    Always(libc::SYS_accept),
    Always(libc::SYS_socket),
    Always(libc::SYS_socketpair),
    Always(libc::SYS_connect),
    Always(libc::SYS_recvfrom),
    Always(libc::SYS_sendto),
    Always(libc::SYS_recvmsg),
    Always(libc::SYS_sendmsg),
    Always(libc::SYS_shutdown),
    Always(libc::SYS_setsockopt),
    Always(libc::SYS_getsockopt),
    Always(libc::SYS_getsockname),
    Always(libc::SYS_getpeername),
    Always(libc::SYS_epoll_create1),
    Always(libc::SYS_epoll_ctl),
    Always(libc::SYS_epoll_wait),
    Always(libc::SYS_epoll_pwait),
];

/// A network client on an async runtime (the fleet agent's etcd connection): outgoing TCP
/// streams (and a name's lookup, UDP), the runtime's epoll and its wake-up eventfd, and
/// no accepting, no binding. (Its kind adds the host ioctls, for `FIONBIO` on a socket
/// made non-blocking after the fact.)
const NET_CLIENT: &[Allow] = &[
    Always(libc::SYS_socket),
    Always(libc::SYS_connect),
    Always(libc::SYS_recvfrom),
    Always(libc::SYS_sendto),
    Always(libc::SYS_recvmsg),
    Always(libc::SYS_sendmsg),
    Always(libc::SYS_recvmmsg),
    Always(libc::SYS_sendmmsg),
    Always(libc::SYS_shutdown),
    Always(libc::SYS_setsockopt),
    Always(libc::SYS_getsockopt),
    Always(libc::SYS_getsockname),
    Always(libc::SYS_getpeername),
    Always(libc::SYS_epoll_create1),
    Always(libc::SYS_epoll_ctl),
    Always(libc::SYS_epoll_wait),
    Always(libc::SYS_epoll_pwait),
    Always(libc::SYS_eventfd2),
];

/// Binding listeners: only the main thread (a new daemon whose listener did not come
/// with the handover binds the socket again).
const LISTEN: &[Allow] = &[Always(libc::SYS_bind), Always(libc::SYS_listen)];

/// A warm reboot's other process: waiting for and killing the new daemon, the blackout's
/// real-time priority, limits and usage for the aging monitor and the status.
const PROCESS: &[Allow] = &[
    Always(libc::SYS_wait4),
    Always(libc::SYS_waitid),
    Always(libc::SYS_kill),
    Always(libc::SYS_pidfd_open),
    Always(libc::SYS_pidfd_send_signal),
    Always(libc::SYS_sched_setscheduler),
    Always(libc::SYS_sched_getscheduler),
    Always(libc::SYS_sched_setparam),
    Always(libc::SYS_sched_getparam),
    Always(libc::SYS_sched_get_priority_max),
    Always(libc::SYS_sched_get_priority_min),
    Always(libc::SYS_setpriority),
    Always(libc::SYS_getpriority),
    Always(libc::SYS_prlimit64),
    Always(libc::SYS_getrlimit),
    Always(libc::SYS_getrusage),
    Always(libc::SYS_sysinfo),
    Always(libc::SYS_uname),
    Always(libc::SYS_getuid),
    Always(libc::SYS_geteuid),
    Always(libc::SYS_getgid),
    Always(libc::SYS_getegid),
    Always(libc::SYS_getppid),
    Always(libc::SYS_rt_sigaction),
    Always(libc::SYS_timerfd_create),
    Always(libc::SYS_timerfd_settime),
];

/// The snapshot writer: the channel to its VMM (the job and the RAM memfds arrive as
/// SCM_RIGHTS), and creating its files by path: `ramN.bin` (created exclusively, direct
/// I/O where the filesystem has it, sized with ftruncate) and `vm.state.tmp` renamed into
/// place. The paths come from the VMM over the channel after the filter is in, and a
/// filter cannot read a path, so `openat` is not narrowed; no sockets, no ioctls, no
/// unlinking, no processes. `rt_sigaction`: glibc installs its own handler (SIGSETXID)
/// when a process creates its first thread, which in the writer happens under the filter
/// (the daemon's first thread, the helper, predates its filters); a process's own signal
/// handlers give it nothing it did not have.
const WRITER: &[Allow] = &[
    Always(libc::SYS_rt_sigaction),
    Always(libc::SYS_recvmsg),
    Always(libc::SYS_sendmsg),
    Always(libc::SYS_openat),
    Always(libc::SYS_ftruncate),
    Always(libc::SYS_rename),
    Always(libc::SYS_renameat),
    Always(libc::SYS_renameat2),
];

impl ThreadKind {
    /// The groups this kind may use.
    fn groups(self) -> Vec<&'static [Allow]> {
        let vmm_wide = vec![
            EVERY_THREAD,
            THREADS,
            DEVICE_IO,
            FILES,
            VMM,
            SOCKETS,
            PROCESS,
        ];
        match self {
            ThreadKind::Main => {
                let mut g = vmm_wide;
                g.push(LISTEN);
                // The fleet agent's thread is the main thread's child.
                g.push(NET_CLIENT);
                g
            }
            // API threads create VMs (and so vCPU threads), snapshot, restore and run
            // reboots; the handover threads (the new daemon's stderr relay, the emergency
            // rejuvenation and the aging monitor, which reboot too) do the same.
            ThreadKind::Api | ThreadKind::Handover => vmm_wide,
            // KVM_RUN and its own state; a virtio worker it starts when the guest's
            // driver activates a device.
            ThreadKind::Vcpu => vec![
                EVERY_THREAD,
                THREADS,
                DEVICE_IO,
                &[VcpuIoctls, SchedOtherSelf],
            ],
            // Console logs: writes, and rotation (copy to <log>.1, truncate).
            ThreadKind::Console => vec![EVERY_THREAD, FILES],
            ThreadKind::DeviceWorker => vec![EVERY_THREAD, DEVICE_IO],
            // A name's lookup may run on a thread of its own (THREADS).
            ThreadKind::Fleet => vec![EVERY_THREAD, THREADS, NET_CLIENT, &[HostIoctls]],
            // Its RAM-writing threads (THREADS), each writing by offset and syncing
            // (DEVICE_IO).
            ThreadKind::SnapshotWriter => vec![EVERY_THREAD, THREADS, DEVICE_IO, WRITER],
        }
    }

    /// The allow-list as seccompiler rules: syscall → rules (empty: allowed outright).
    pub(crate) fn allowed(
        self,
        ioctls: &Ioctls,
    ) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
        let build = |source| SandboxError::Build { kind: self, source };
        let arg_is = |arg: u8, len, op, value| {
            SeccompCondition::new(arg, len, op, value)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(build)
        };
        let mut out: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
        let mut add = |nr: i64, rules: Option<Vec<SeccompRule>>| {
            let entry = out.entry(nr).or_insert(Some(Vec::new()));
            match (entry.as_mut(), rules) {
                // Allowed outright wins over any condition.
                (_, None) => *entry = None,
                (None, Some(_)) => {}
                (Some(have), Some(more)) => have.extend(more),
            }
        };
        for group in self.groups() {
            for allow in group {
                match *allow {
                    Always(nr) => add(nr, None),
                    ThreadClone => add(
                        libc::SYS_clone,
                        Some(vec![arg_is(
                            0,
                            SeccompCmpArgLen::Qword,
                            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                            libc::CLONE_THREAD as u64,
                        )?]),
                    ),
                    OpenatReadOnly => add(
                        libc::SYS_openat,
                        Some(vec![arg_is(
                            2,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                        )?]),
                    ),
                    SchedOtherSelf => add(
                        libc::SYS_sched_setscheduler,
                        Some(vec![SeccompCondition::new(
                            0,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            0,
                        )
                        .and_then(|pid| {
                            let policy = SeccompCondition::new(
                                1,
                                SeccompCmpArgLen::Dword,
                                SeccompCmpOp::Eq,
                                libc::SCHED_OTHER as u64,
                            )?;
                            SeccompRule::new(vec![pid, policy])
                        })
                        .map_err(build)?]),
                    ),
                    VcpuIoctls | VmIoctls | HostIoctls => {
                        let requests = match *allow {
                            VcpuIoctls => &ioctls.vcpu[..],
                            VmIoctls => &ioctls.vm[..],
                            _ => HOST_IOCTLS,
                        };
                        add(
                            libc::SYS_ioctl,
                            Some(
                                requests
                                    .iter()
                                    .map(|&nr| {
                                        arg_is(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, nr)
                                    })
                                    .collect::<Result<_, _>>()?,
                            ),
                        )
                    }
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect())
    }
}
