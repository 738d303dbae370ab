//! Named points of the handover where a test build can kill, stop, delay or panic the old
//! or the new VMM, so that every failure path of a warm reboot can be exercised.
//!
//! Only a build with the `fault-injection` feature acts on them (the integration tests and
//! `warmvm bench faults` are built that way); in a release build [`hit`] compiles to nothing.
//!
//! The fault is named by `WARMVM_FAULT=<side>:<point>:<action>` (several separated by `,`),
//! where side is `old` or `new`, point is one of [`Point`]'s names (kebab-case), and action
//! is `kill` (SIGKILL itself), `stop:<ms>` (SIGSTOP itself, continued after `ms` by a forked
//! child), `delay:<ms>` (sleep on the handover thread) or `panic`. The variable is inherited
//! by the new VMM, so one setting can target either side.

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
}

impl Point {
    pub const ALL: [Point; 18] = [
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
            | OldReady | OldCommitted | OldDone => Side::Old,
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
        }
    }
}

/// Act on `point` if `WARMVM_FAULT` names it (test builds only).
#[inline]
pub fn hit(point: Point) {
    #[cfg(feature = "fault-injection")]
    imp::hit(point);
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

#[cfg(feature = "fault-injection")]
mod imp {
    use super::{Point, Side};
    use std::sync::OnceLock;
    use std::time::Duration;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Action {
        Kill,
        Stop(u64),
        Delay(u64),
        Panic,
    }

    fn parse(spec: &str) -> Vec<(Side, &str, Action)> {
        let mut out = Vec::new();
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let mut parts = item.splitn(3, ':');
            let side = match parts.next() {
                Some("old") => Side::Old,
                Some("new") => Side::New,
                _ => continue,
            };
            let (Some(point), Some(action)) = (parts.next(), parts.next()) else {
                continue;
            };
            let ms = |a: &str| a.split_once(':').and_then(|(_, n)| n.parse().ok());
            let action = match action {
                "kill" => Action::Kill,
                "panic" => Action::Panic,
                a if a.starts_with("stop:") => match ms(a) {
                    Some(n) => Action::Stop(n),
                    None => continue,
                },
                a if a.starts_with("delay:") => match ms(a) {
                    Some(n) => Action::Delay(n),
                    None => continue,
                },
                _ => continue,
            };
            out.push((side, point, action));
        }
        out
    }

    static FAULTS: OnceLock<String> = OnceLock::new();

    pub(super) fn hit(point: Point) {
        let spec = FAULTS.get_or_init(|| std::env::var("WARMVM_FAULT").unwrap_or_default());
        for (side, name, action) in parse(spec) {
            if side != point.side() || name != point.name() {
                continue;
            }
            tracing::warn!(point = name, ?action, "fault injected");
            match action {
                // SAFETY: raising a signal at ourselves has no memory effects.
                Action::Kill => unsafe {
                    libc::raise(libc::SIGKILL);
                },
                Action::Stop(ms) => {
                    // SAFETY: the child only sleeps, signals its parent and exits, all
                    // async-signal-safe; the parent then stops itself.
                    unsafe {
                        let parent = libc::getpid();
                        if libc::fork() == 0 {
                            let ts = libc::timespec {
                                tv_sec: (ms / 1000) as libc::time_t,
                                tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
                            };
                            libc::nanosleep(&ts, std::ptr::null_mut());
                            libc::kill(parent, libc::SIGCONT);
                            libc::_exit(0);
                        }
                        libc::raise(libc::SIGSTOP);
                    }
                }
                Action::Delay(ms) => std::thread::sleep(Duration::from_millis(ms)),
                Action::Panic => panic!("fault injected at {name}"),
            }
        }
    }
}
