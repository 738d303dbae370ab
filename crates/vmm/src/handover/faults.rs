//! Named points of the handover where a test build can kill, stop, delay or panic the old
//! or the new VMM, so that every failure path of a warm reboot can be exercised; and of
//! the saved and cold reboots around it (the daemon's `modes` and `bring_back` modules):
//! saving the VMs, writing the bring-back manifest, and bringing the VMs back.
//!
//! Only a build with the `fault-injection` feature acts on them (the integration tests and
//! `warmvm bench faults` are built that way); in a release build [`hit`] compiles to nothing.
//!
//! The fault is named by `WARMVM_FAULT=<side>:<point>:<action>` (several separated by `,`),
//! where side is `old` or `new`, point is one of [`Point`]'s names (kebab-case), and action
//! is `kill` (SIGKILL itself), `stop:<ms>` (SIGSTOP itself, continued after `ms` by a forked
//! child), `delay:<ms>` (sleep on the thread that reaches the point), `panic`, or `fail`
//! (the step at the point fails as if the kernel had refused it; only points whose step can
//! fail by itself act on it, see [`fails`]). The variable is inherited by the new VMM, so
//! one setting can target either side.

/// Which VMM a fault point belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Old,
    New,
}

/// The steps of the protocol, in the order each side reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    // Old VMM.
    /// The new VMM was started; nothing sent yet.
    OldSpawned,
    /// Every VM's spec and the extra fds were sent; waiting for `Prepared`.
    OldStaged,
    /// `Prepared` received; the guests still run.
    OldPrepared,
    /// Every vCPU parked: the blackout has begun.
    OldQuiesced,
    /// The state is captured, not yet sent.
    OldCaptured,
    /// `State` was sent; waiting for `Ready`.
    OldStateSent,
    /// `Ready` received; the decision is not yet sent.
    OldReady,
    /// `Commit` was sent: these VMs are the new VMM's from now on.
    OldCommitted,
    /// The new VMM's report arrived; the old VMM is about to let go and exit.
    OldDone,
    /// Saved reboot: the first VM is snapshotted (and paused), the others not yet; no
    /// manifest written.
    OldSaving,
    /// Saved or cold reboot: every VM is saved (or powered off) and the bring-back
    /// manifest is durable; the new VMM is not started yet.
    OldManifest,
    /// Saved or cold reboot that failed before the commit: the bring-back manifest is
    /// removed, no VM resumed or booted again yet.
    OldUndoing,
    // New VMM.
    /// `Hello` received.
    NewHello,
    /// Every VM was prepared; `Prepared` not yet sent.
    NewStaged,
    /// `Prepared` was sent; waiting for the state.
    NewPrepared,
    /// The state arrived; nothing restored yet.
    NewState,
    /// Every VM restored, no guest instruction run; `Ready` not yet sent.
    NewRestored,
    /// `Ready` was sent; waiting for `Commit` or `Abort`.
    NewReadySent,
    /// `Commit` received; the guests do not run yet.
    NewCommit,
    /// The guests run; the report is not yet sent.
    NewRunning,
    /// The report was sent.
    NewReported,
    /// Saved or cold reboot, after the commit: the manifest names this VMM as its owner;
    /// no VM is restored or booted yet.
    NewBringBack,
    /// The first VM is restored (or created) and taken off the manifest; it does not run
    /// yet.
    NewClaimedOne,
    /// The first VM runs; the next ones are not brought back yet.
    NewBroughtBackOne,
    /// Saved reboot rolled back: a VM held aside is about to be resumed in the old daemon
    /// (`fail`: the resume fails).
    OldUndoResume,
    /// Each vCPU thread of the new VMM, ordered to run after the commit, before it leaves
    /// its park (`delay` longer than the vCPU response timeout: a vCPU stuck in its park).
    NewVcpuResume,
}

impl Point {
    /// Every point, the warm handover's first.
    pub const ALL: [Point; 26] = {
        let mut all = [Point::OldSpawned; 26];
        let mut i = 0;
        while i < Self::HANDOVER.len() {
            all[i] = Self::HANDOVER[i];
            i += 1;
        }
        while i < Self::HANDOVER.len() + Self::REBOOT_MODES.len() {
            all[i] = Self::REBOOT_MODES[i - Self::HANDOVER.len()];
            i += 1;
        }
        while i < all.len() {
            all[i] = Self::STEPS[i - Self::HANDOVER.len() - Self::REBOOT_MODES.len()];
            i += 1;
        }
        all
    };

    /// Points inside a step rather than between two (reached on other threads, or only on
    /// a roll-back): the fault campaign does not walk them.
    pub const STEPS: [Point; 2] = [Point::OldUndoResume, Point::NewVcpuResume];

    /// The points only a saved or cold reboot reaches, in the order they come.
    pub const REBOOT_MODES: [Point; 6] = [
        Point::OldSaving,
        Point::OldManifest,
        Point::OldUndoing,
        Point::NewBringBack,
        Point::NewClaimedOne,
        Point::NewBroughtBackOne,
    ];

    /// The points every warm handover reaches (a saved or cold reboot's own come on top).
    pub const HANDOVER: [Point; 18] = [
        Point::OldSpawned,
        Point::OldStaged,
        Point::OldPrepared,
        Point::OldQuiesced,
        Point::OldCaptured,
        Point::OldStateSent,
        Point::OldReady,
        Point::OldCommitted,
        Point::OldDone,
        Point::NewHello,
        Point::NewStaged,
        Point::NewPrepared,
        Point::NewState,
        Point::NewRestored,
        Point::NewReadySent,
        Point::NewCommit,
        Point::NewRunning,
        Point::NewReported,
    ];

    pub fn side(self) -> Side {
        use Point::*;
        match self {
            OldSpawned | OldStaged | OldPrepared | OldQuiesced | OldCaptured | OldStateSent
            | OldReady | OldCommitted | OldDone | OldSaving | OldManifest | OldUndoing
            | OldUndoResume => Side::Old,
            _ => Side::New,
        }
    }

    /// The point's name without its side, as `WARMVM_FAULT` spells it.
    pub fn name(self) -> &'static str {
        use Point::*;
        match self {
            OldSpawned => "spawned",
            OldStaged | NewStaged => "staged",
            OldPrepared | NewPrepared => "prepared",
            OldQuiesced => "quiesced",
            OldCaptured => "captured",
            OldStateSent => "state-sent",
            OldReady => "ready",
            OldCommitted => "committed",
            OldDone => "done",
            NewHello => "hello",
            NewState => "state",
            NewRestored => "restored",
            NewReadySent => "ready-sent",
            NewCommit => "commit",
            NewRunning => "running",
            NewReported => "reported",
            OldSaving => "saving",
            OldManifest => "manifest",
            OldUndoing => "undoing",
            NewBringBack => "bring-back",
            NewClaimedOne => "claimed-one",
            NewBroughtBackOne => "brought-back-one",
            OldUndoResume => "undo-resume",
            NewVcpuResume => "vcpu-resume",
        }
    }
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Old, Side::New];

    /// As `WARMVM_FAULT` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Side::Old => "old",
            Side::New => "new",
        }
    }
}

impl Point {
    /// The point `side` reaches under `name`, if there is one.
    pub fn find(side: Side, name: &str) -> Option<Point> {
        Point::ALL
            .into_iter()
            .find(|p| p.side() == side && p.name() == name)
    }
}

/// What a fault point does when it is hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL this process.
    Kill,
    /// SIGSTOP this process; a forked child continues it after this many milliseconds.
    Stop(u64),
    /// Sleep this many milliseconds on the thread that hit the point.
    Delay(u64),
    /// Panic on the thread that hit the point.
    Panic,
    /// The step at the point fails (see [`fails`]).
    Fail,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Kill => write!(f, "kill"),
            Action::Stop(ms) => write!(f, "stop:{ms}"),
            Action::Delay(ms) => write!(f, "delay:{ms}"),
            Action::Panic => write!(f, "panic"),
            Action::Fail => write!(f, "fail"),
        }
    }
}

/// One entry of `WARMVM_FAULT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub point: Point,
    pub action: Action,
}

impl std::fmt::Display for Fault {
    /// The `WARMVM_FAULT` spelling, e.g. `new:commit:stop:300`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (side, point) = (self.point.side().name(), self.point.name());
        write!(f, "{side}:{point}:{}", self.action)
    }
}

/// Longest stop or delay accepted (an hour): anything longer is a typo.
pub const MAX_FAULT_MS: u64 = 3_600_000;

/// Why one entry of `WARMVM_FAULT` was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultSpecError {
    #[error("{entry:?}: expected <side>:<point>:<action>")]
    Shape { entry: String },
    #[error("{entry:?}: unknown side {side:?} (old or new)")]
    Side { entry: String, side: String },
    #[error("{entry:?}: the {side} VMM has no point {point:?}")]
    Point {
        entry: String,
        side: &'static str,
        point: String,
    },
    #[error("{entry:?}: unknown action (kill, stop:<ms>, delay:<ms>, panic, fail)")]
    Action { entry: String },
    #[error("{entry:?}: milliseconds must be a whole number up to {MAX_FAULT_MS}")]
    Millis { entry: String },
}

/// Parse `WARMVM_FAULT`: entries separated by `,` (blank ones are skipped). Entries that
/// are not understood come back as errors; the others are returned in order.
pub fn parse(spec: &str) -> (Vec<Fault>, Vec<FaultSpecError>) {
    let mut faults = Vec::new();
    let mut errors = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match parse_entry(entry) {
            Ok(f) => faults.push(f),
            Err(e) => errors.push(e),
        }
    }
    (faults, errors)
}

fn parse_entry(entry: &str) -> Result<Fault, FaultSpecError> {
    let owned = || entry.to_string();
    let mut parts = entry.splitn(4, ':');
    let (Some(side), Some(point), Some(action)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(FaultSpecError::Shape { entry: owned() });
    };
    let arg = parts.next();
    let side = match side {
        "old" => Side::Old,
        "new" => Side::New,
        other => {
            return Err(FaultSpecError::Side {
                entry: owned(),
                side: other.to_string(),
            })
        }
    };
    let point = Point::find(side, point).ok_or_else(|| FaultSpecError::Point {
        entry: owned(),
        side: side.name(),
        point: point.to_string(),
    })?;
    let millis = |arg: Option<&str>| {
        arg.and_then(|a| a.parse::<u64>().ok())
            .filter(|&ms| ms <= MAX_FAULT_MS)
            .ok_or_else(|| FaultSpecError::Millis { entry: owned() })
    };
    let action = match (action, arg) {
        ("kill", None) => Action::Kill,
        ("panic", None) => Action::Panic,
        ("fail", None) => Action::Fail,
        ("stop", arg) => Action::Stop(millis(arg)?),
        ("delay", arg) => Action::Delay(millis(arg)?),
        _ => return Err(FaultSpecError::Action { entry: owned() }),
    };
    Ok(Fault { point, action })
}

/// True in a build that acts on `WARMVM_FAULT` (the `fault-injection` feature).
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// Act on `point` if `WARMVM_FAULT` names it (test builds only).
#[inline]
pub fn hit(point: Point) {
    #[cfg(feature = "fault-injection")]
    imp::hit(point);
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

/// Act on `point` as [`hit`] does, and say whether `WARMVM_FAULT` makes its step fail
/// (`fail`); always false in a build without the `fault-injection` feature.
#[inline]
pub fn fails(point: Point) -> bool {
    #[cfg(feature = "fault-injection")]
    return imp::fails(point);
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = point;
        false
    }
}

#[cfg(feature = "fault-injection")]
mod imp {
    use std::ffi::CString;
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::{Action, Fault, Point};

    /// `WARMVM_FAULT`, parsed once per process; errors are logged once, then ignored.
    fn faults() -> &'static [Fault] {
        static FAULTS: OnceLock<Vec<Fault>> = OnceLock::new();
        FAULTS.get_or_init(|| {
            let Ok(spec) = std::env::var("WARMVM_FAULT") else {
                return Vec::new();
            };
            let (faults, errors) = super::parse(&spec);
            for e in errors {
                tracing::error!(error = %e, "WARMVM_FAULT: ignoring an entry");
            }
            faults
        })
    }

    pub(super) fn hit(point: Point) {
        for fault in faults().iter().filter(|f| f.point == point) {
            tracing::warn!(fault = %fault, pid = std::process::id(), "fault injected");
            match fault.action {
                // SAFETY: raise has no memory effects; SIGKILL ends this process here.
                Action::Kill => unsafe {
                    libc::raise(libc::SIGKILL);
                },
                // The fork must not happen on a filtered thread (filters forbid forks).
                Action::Stop(ms) => {
                    if let Err(e) = warmvm_sandbox::outside(move || stop_for(ms)) {
                        tracing::error!(error = %e, "fault injection: cannot stop the process");
                    }
                }
                Action::Delay(ms) => std::thread::sleep(Duration::from_millis(ms)),
                Action::Panic => panic!("fault injected: {fault}"),
                // Only the step's own code can fail it: see `fails`.
                Action::Fail => {}
            }
        }
    }

    pub(super) fn fails(point: Point) -> bool {
        hit(point);
        faults()
            .iter()
            .any(|f| f.point == point && f.action == Action::Fail)
    }

    /// SIGSTOP this whole process for `ms`: a forked child waits until the process is
    /// stopped, sleeps `ms`, sends SIGCONT and exits. The child of a multithreaded process
    /// may only make async-signal-safe calls, so everything it needs is prepared here.
    pub(super) fn stop_for(ms: u64) {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let Ok(stat_path) = CString::new(format!("/proc/{parent}/stat")) else {
            return;
        };
        let nap = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        let sleep = libc::timespec {
            tv_sec: (ms / 1000) as libc::time_t,
            tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
        };
        // SAFETY: fork has no memory preconditions; the child below only calls
        // async-signal-safe functions (open, read, close, nanosleep, kill, _exit) on memory
        // prepared before the fork, and never returns into Rust code.
        let child = unsafe { libc::fork() };
        if child < 0 {
            tracing::error!(
                error = %std::io::Error::last_os_error(),
                "fault injection: cannot fork the process that would continue this one"
            );
            return;
        }
        if child == 0 {
            // SAFETY: see above: async-signal-safe calls only, then _exit.
            unsafe {
                // Wait (at most ~10 s) until the parent is stopped, so that SIGCONT cannot
                // come before the SIGSTOP and leave it stopped for good. If it is gone
                // (killed meanwhile), there is nothing to continue.
                for _ in 0..10_000 {
                    match is_stopped(stat_path.as_ptr()) {
                        Some(true) => break,
                        Some(false) => {}
                        None => libc::_exit(0),
                    }
                    libc::nanosleep(&nap, std::ptr::null_mut());
                }
                libc::nanosleep(&sleep, std::ptr::null_mut());
                libc::kill(parent, libc::SIGCONT);
                libc::_exit(0);
            }
        }
        // SAFETY: raise has no memory effects: SIGSTOP stops every thread of this process
        // until the child's SIGCONT.
        unsafe { libc::raise(libc::SIGSTOP) };
        let mut status = 0;
        // SAFETY: reaps our own child (it exits right after its SIGCONT); `status` is a
        // valid out-pointer.
        unsafe { libc::waitpid(child, &mut status, 0) };
    }

    /// Whether /proc/<pid>/stat (`path`) shows the process stopped; None if it is gone (or
    /// a zombie). Async-signal-safe: open, read and close on a stack buffer.
    ///
    /// # Safety
    /// `path` must point to a NUL-terminated string.
    unsafe fn is_stopped(path: *const libc::c_char) -> Option<bool> {
        let mut buf = [0u8; 512];
        // SAFETY: the caller guarantees `path`; `buf` is a writable buffer of its length.
        let n = unsafe {
            let fd = libc::open(path, libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return None;
            }
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            n
        };
        if n <= 0 {
            return None;
        }
        // The state follows the last ')' (the command name may contain one): `T` stopped,
        // `t` stopped while traced (e.g. under strace), `Z`/`X` gone.
        let data = &buf[..n as usize];
        let i = data.iter().rposition(|&b| b == b')')?;
        match data.get(i + 2)? {
            b'Z' | b'X' => None,
            state => Some(matches!(state, b'T' | b't')),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_has_a_unique_name_on_its_side() {
        for p in Point::ALL {
            assert_eq!(Point::find(p.side(), p.name()), Some(p));
        }
        assert_eq!(Point::find(Side::Old, "commit"), None);
        assert_eq!(Point::find(Side::New, "committed"), None);
        assert!(Point::HANDOVER.iter().all(|p| Point::ALL.contains(p)));
        assert!(Point::STEPS.iter().all(|p| Point::ALL.contains(p)));
        assert_eq!(
            parse("old:undo-resume:fail").0,
            vec![Fault {
                point: Point::OldUndoResume,
                action: Action::Fail
            }]
        );
        assert_eq!(
            parse("new:vcpu-resume:delay:5").0[0].point,
            Point::NewVcpuResume
        );
        assert_eq!(
            parse("new:brought-back-one:kill,old:saving:stop:5").0,
            vec![
                Fault {
                    point: Point::NewBroughtBackOne,
                    action: Action::Kill
                },
                Fault {
                    point: Point::OldSaving,
                    action: Action::Stop(5)
                },
            ]
        );
    }

    #[test]
    fn entries_parse_into_faults() {
        let (faults, errors) =
            parse("old:quiesced:kill, new:commit:stop:300,new:hello:delay:0,old:done:panic,");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            faults,
            vec![
                Fault {
                    point: Point::OldQuiesced,
                    action: Action::Kill
                },
                Fault {
                    point: Point::NewCommit,
                    action: Action::Stop(300)
                },
                Fault {
                    point: Point::NewHello,
                    action: Action::Delay(0)
                },
                Fault {
                    point: Point::OldDone,
                    action: Action::Panic
                },
            ]
        );
        // Both sides share some names; the side decides.
        assert_eq!(parse("old:staged:kill").0[0].point, Point::OldStaged);
        assert_eq!(parse("new:staged:kill").0[0].point, Point::NewStaged);
        assert_eq!(parse("").0, vec![]);
    }

    #[test]
    fn faults_print_as_they_are_spelled() {
        for spec in [
            "old:state-sent:kill",
            "new:ready-sent:stop:50",
            "new:running:delay:900",
        ] {
            let (faults, errors) = parse(spec);
            assert!(errors.is_empty());
            assert_eq!(faults[0].to_string(), spec);
        }
    }

    #[test]
    fn bad_entries_are_reported_and_the_rest_kept() {
        let (faults, errors) = parse(
            "old:quiesced,both:staged:kill,old:commit:kill,new:hello:explode,\
             new:hello:stop,new:hello:stop:-5,new:hello:delay:9999999999,new:hello:kill:5,\
             new:state:delay:250",
        );
        assert_eq!(
            faults,
            vec![Fault {
                point: Point::NewState,
                action: Action::Delay(250)
            }]
        );
        let kinds: Vec<&str> = errors
            .iter()
            .map(|e| match e {
                FaultSpecError::Shape { .. } => "shape",
                FaultSpecError::Side { .. } => "side",
                FaultSpecError::Point { .. } => "point",
                FaultSpecError::Action { .. } => "action",
                FaultSpecError::Millis { .. } => "millis",
            })
            .collect();
        assert_eq!(
            kinds,
            ["shape", "side", "point", "action", "millis", "millis", "millis", "action"]
        );
        assert_eq!(
            errors[2].to_string(),
            "\"old:commit:kill\": the old VMM has no point \"commit\""
        );
    }

    /// `stop` stops this very process (every thread of the test binary) and a forked child
    /// continues it: the call must come back, not leave the process stopped for good.
    #[cfg(feature = "fault-injection")]
    #[test]
    fn a_stopped_process_is_continued() {
        imp::stop_for(20);
        imp::stop_for(0);
    }
}
