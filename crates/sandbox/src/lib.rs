//! Seccomp filters per kind of thread, and the one thread left outside them.
//!
//! The daemon runs code that sees hostile input (guests' device accesses, API clients), so a
//! bug there must not come with every system call root has. Each thread installs the filter
//! of its kind when it starts ([`enter`]); a filter is inherited by the threads a thread
//! creates and stacks with theirs, so every kind's list includes [`ThreadKind::Main`]'s.
//!
//! The filters are allow-lists ([`allow`]): each kind may make only the system calls its
//! work needs (vCPU threads only their KVM ioctls), and anything else kills the process
//! (SIGSYS), or is only logged by the kernel in log mode. Nothing filtered may start a
//! program or a process, change namespaces, mounts or credentials, or trace anyone.
//!
//! Filters survive `execve`, and the warm reboot must start the next VMM unfiltered. So
//! [`start_helper`], called before any filter, starts a helper thread that stays outside
//! them; [`outside`] runs a closure (a `Command::spawn`, the fault injection's fork) there.
//!
//! The mode comes from `WARMVM_SECCOMP` (`true`, `false` or `log`), which the daemon's
//! `--seccomp` flag sets for itself and passes on to the daemon a warm reboot starts.
//!
//! Owns: the allow-list of each thread kind, installing it, and the helper thread outside
//! the filters. Depends only on `warmvm-hypervisor` (for the KVM ioctls a thread may issue).
//! Must never: be called by the devices crate (the VMM hands devices a thread set-up that
//! calls [`enter_or_log`] for them), or start a thread that runs guest code.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

mod allow;

pub(crate) use allow::Ioctls;

/// The environment variable that carries the mode to this process and its successors.
pub const MODE_ENV: &str = "WARMVM_SECCOMP";

/// What a forbidden system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No filters.
    Off,
    /// Forbidden calls are allowed and logged by the kernel (audit log / dmesg): to find
    /// out what a new code path needs before it kills anyone.
    Log,
    /// Forbidden calls kill the whole process (SIGSYS).
    Kill,
}

impl Mode {
    /// Parse `true`, `false` or `log`.
    pub fn parse(s: &str) -> Result<Self, SandboxError> {
        match s {
            "true" => Ok(Mode::Kill),
            "false" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            other => Err(SandboxError::BadMode(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "false",
            Mode::Log => "log",
            Mode::Kill => "true",
        }
    }
}

/// The kinds of threads, each with its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The daemon's main thread (the accept loop); every other thread inherits its filter.
    Main,
    /// A thread serving an API connection (it creates VMs, runs the warm reboot, and sends
    /// a live migration); also the migration listener and each thread that receives a VM,
    /// which need the same (TCP, creating a VM).
    Api,
    /// A vCPU thread.
    Vcpu,
    /// The process's console thread.
    Console,
    /// Threads of a warm reboot other than the API thread that drives it (the successor's
    /// stderr relay, the emergency rejuvenation thread).
    Handover,
    /// Device worker threads (virtio back-ends).
    DeviceWorker,
    /// The `warmvm snapshot-writer` process (snapshots and saved reboots): a process of
    /// its own, started unfiltered by the helper, so this filter is its only one.
    SnapshotWriter,
    /// The fleet agent: an etcd client (gRPC over TCP, TLS) on a single-threaded async
    /// runtime (epoll, an eventfd to wake it, timers as epoll timeouts).
    Fleet,
}

pub const ALL_KINDS: [ThreadKind; 8] = [
    ThreadKind::Main,
    ThreadKind::Api,
    ThreadKind::Vcpu,
    ThreadKind::Console,
    ThreadKind::Handover,
    ThreadKind::DeviceWorker,
    ThreadKind::SnapshotWriter,
    ThreadKind::Fleet,
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("--seccomp {0}: must be true, false or log")]
    BadMode(String),
    #[error("cannot build the {kind:?} seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the {kind:?} seccomp filter: {source}")]
    Compile {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind:?} seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("the helper thread outside the filters is gone")]
    HelperGone,
    #[error("cannot start the helper thread outside the filters: {0}")]
    HelperStart(#[source] std::io::Error),
}

impl ThreadKind {
    /// The thread's filters: its kind's allow-list (anything else kills the process, or is
    /// logged in log mode), then `clone3` answered with ENOSYS (its flags sit in memory a
    /// filter cannot read, so a fork could hide there; glibc then creates threads with
    /// `clone`, whose flags the allow-list checks).
    fn programs(self, mode: Mode) -> Result<Vec<BpfProgram>, SandboxError> {
        let action = match mode {
            Mode::Kill => SeccompAction::KillProcess,
            Mode::Log | Mode::Off => SeccompAction::Log,
        };
        let build = |source| SandboxError::Build { kind: self, source };
        let allow = SeccompFilter::new(
            self.allowed(&Ioctls::kvm())?,
            action,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(build)?;
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .map_err(build)?;
        let compile = |f: SeccompFilter| {
            BpfProgram::try_from(f).map_err(|source| SandboxError::Compile { kind: self, source })
        };
        Ok(vec![compile(allow)?, compile(clone3)?])
    }
}

static MODE: OnceLock<Mode> = OnceLock::new();

/// Turn the filters on for this process (`--seccomp`); until then [`enter`] does nothing,
/// so `warmvm run`, the demo and unit tests run unfiltered unless they ask.
pub fn set_mode(mode: Mode) {
    let _ = MODE.set(mode);
}

/// The mode [`set_mode`] chose (off if none).
pub fn mode() -> Mode {
    MODE.get().copied().unwrap_or(Mode::Off)
}

/// Install `kind`'s filter on the calling thread (and so on the threads it creates).
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let mode = mode();
    if mode == Mode::Off {
        return Ok(());
    }
    for prog in kind.programs(mode)? {
        seccompiler::apply_filter(&prog)
            .map_err(|source| SandboxError::Install { kind, source })?;
    }
    Ok(())
}

/// As [`enter`], for threads that cannot stop on an error: it is logged, and the thread
/// runs on without its filter (the process's inherited filters still hold).
pub fn enter_or_log(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        tracing::error!(error = %e, "seccomp filter not installed");
    }
}

type Job = Box<dyn FnOnce() + Send>;

static HELPER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Start the helper thread outside every filter. Call it before any [`enter`]: a thread
/// inherits the filters of the thread that creates it.
pub fn start_helper() -> Result<(), SandboxError> {
    if HELPER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("warmvm-spawner".into())
        .stack_size(256 << 10)
        .spawn(move || {
            for job in rx {
                job();
            }
        })
        .map_err(SandboxError::HelperStart)?;
    let _ = HELPER.set(Mutex::new(tx));
    Ok(())
}

/// Run `f` outside the filters (on the helper thread) and return its result. Without a
/// helper (filters off, or not a daemon) it runs here.
pub fn outside<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SandboxError> {
    let Some(helper) = HELPER.get() else {
        return Ok(f());
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    helper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| SandboxError::HelperGone)?;
    rx.recv().map_err(|_| SandboxError::HelperGone)
}

#[cfg(test)]
mod tests;
