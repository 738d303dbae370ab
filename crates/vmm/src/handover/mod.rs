//! The warm reboot: hand every VM to a fresh VMM process without copying guest RAM.
//!
//! The old VMM starts the new one with one end of a SOCK_SEQPACKET pair and walks it
//! through these steps (the old side is [`outgoing`], the new side [`incoming`]; the
//! state diagram with every timeout and lost peer is in ARCHITECTURE.md):
//!
//! 1. **stage** (guests still run; bounded by the stage timeout): `Hello`, then one
//!    `StageVm` per VM with its RAM memfds and console log, then `PrepareDone` with the
//!    extra fds. The new VMM adopts the memfds, creates KVM VMs, memslots, irqchips, vCPUs
//!    and parked vCPU threads, and answers `Prepared`.
//! 2. **quiesce**: the old VMM parks every vCPU of every VM. The blackout starts here, and
//!    with it the ready budget: the new VMM must say `Ready` within it.
//! 3. **capture**: every vCPU thread reads its own vCPU's state, in parallel; then VM-wide
//!    and device state, into one [`VmRecord`] per VM.
//! 4. **transfer**: `State`, a checksummed, versioned envelope in a sealed memfd.
//! 5. **restore**: the new VMM restores every VM without running a guest instruction and
//!    answers `Ready`.
//! 6. **commit**: the old VMM sends `Commit` (from then on it never runs these VMs) or
//!    `Abort` (past the budget, or on any failure: it kills the new VMM, waits until it is
//!    gone, and resumes its own VMs).
//! 7. **resume**: on `Commit` the new VMM lets the guests run (nothing fallible in
//!    between) and reports; the old VMM drops its side and exits, its page-table teardown
//!    outside the blackout. Should the old VMM vanish after sending the state, the new VMM
//!    sees its channel close: the old can never run the guests again, so the new adopts them.

pub(crate) mod commit_flag;
pub mod faults;
#[doc(hidden)]
pub mod fuzzing;
pub mod incoming;
mod kvm_fd;
pub(crate) mod messages;
pub mod outgoing;
pub mod pause_segments;
mod priority;
mod stderr;

use crate::channel::ChannelError;
use crate::panic::Panic;
/// The envelope is the state's ([`crate::state::envelope`]); re-exported where it was.
pub use crate::state::envelope;
use crate::state::{StateError, StateErrorKind};

/// The VM state types are the state home's; re-exported where they were.
pub use crate::state::{
    disk_fd_name, net_fd_name, BootProtocol, DiskState, LifecycleState, NetState, RamSlot,
    VmConfigState, VmRecord, VmRuntime, VmSpec,
};
#[cfg(feature = "fault-injection")]
pub use incoming::FAULT_ENV;
pub use incoming::{take_over, take_over_checked, Adopted, ExtraCheck, TakeoverError};
pub use messages::{
    Failure, FailureKind, Phase, PhaseTimes, RebootReport, RebootStamps, VmBlackout, VmStamps,
};
pub use outgoing::{warm_reboot, RebootError, RebootOptions};

/// The image of this very process, to rejuvenate with the same build: `/proc/self/exe`
/// works even when the file on disk was replaced or deleted since this process started.
/// An upgrade starts the path the process was started from instead (what is installed
/// there now): see [`crate::executable::started_from`].
pub fn this_binary() -> std::path::PathBuf {
    crate::executable::running_image()
}

/// The name under which the old VMM hands the new one the shared word that decides which
/// of them runs the guests (see `commit_flag`).
pub const COMMIT_FLAG_FD: &str = "commit-flag";

/// The name under which the old VMM hands its own standard error to the new one: the new
/// VMM's stderr goes through the old one (which keeps its last lines for a failure report)
/// until the commit, and then to this fd directly.
pub const STDERR_FD: &str = "stderr";

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A VM's state could not be saved, framed, read or loaded.
    #[error("{}", state_message(.0))]
    State(#[from] StateError),
    /// A message could not go or come over the control channel (a closed channel is
    /// [`HandoverError::PeerGone`]).
    #[error("{}", channel_message(.0))]
    Channel(#[source] ChannelError),
    #[error("handover I/O failed: {what}: {err}")]
    Io {
        what: String,
        #[source]
        err: std::io::Error,
    },
    #[error("handover I/O failed: VM {0}: console log has no fd")]
    NoConsoleLog(String),
    /// A message or fd the protocol does not allow here.
    #[error("the handover state is invalid: {0}")]
    BadState(#[from] Violation),
    #[error("incompatible handover state: {sender} offers state format {format}; this warmvm reads {min}..={max}")]
    Incompatible {
        sender: String,
        format: u32,
        min: u32,
        max: u32,
    },
    /// The settings the old daemon handed over are of a kind this build does not read (a
    /// version it does not know): refused while staging, before any guest pauses.
    #[error("incompatible handover state: {0}")]
    IncompatibleSettings(String),
    #[error("no answer in time: {0}")]
    Timeout(#[from] Late),
    #[error("the other VMM closed the channel (it exited or crashed)")]
    PeerGone,
    /// The new VMM said why it gave up.
    #[error("the new VMM {}: {}", if .0.kind == FailureKind::Incompatible || .0.kind == FailureKind::Refused { "refused the handover" } else { "failed" }, .0.message)]
    Peer(Failure),
    /// The new VMM exited without saying why (or was found dead).
    #[error("the new VMM (pid {pid}) {how}{}", stderr_suffix(.stderr_tail))]
    NewVmmExited {
        pid: u32,
        /// "exited with status 1", "was killed by signal 9 (SIGKILL)", ...
        how: String,
        /// Its last lines on standard error.
        stderr_tail: String,
    },
    #[error("cannot start the new VMM {binary}: {err}")]
    Spawn {
        binary: String,
        #[source]
        err: std::io::Error,
    },
    #[error("VM {vm}: {err}")]
    Vm {
        vm: String,
        #[source]
        err: crate::VmError,
    },
    /// Declined on purpose.
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("the old VMM aborted the handover")]
    Aborted,
    /// The handover thread itself hit a bug; what it held is dealt with as for any other
    /// failure at that step.
    #[error("the handover hit a bug: {0}")]
    Panicked(#[source] Panic),
}

/// Why a VMM declines a handover on purpose. The other VMM is told it as a refusal
/// ([`FailureKind::Refused`]), and a build that reads failures by their text alone
/// recognises it by its wording: keep each variant's text.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Test builds only: the new VMM was told to refuse the state it is sent
    /// (`WARMVM_HANDOVER_FAULT=refuse-state`).
    #[error("fault injected: refuse-state")]
    InjectedFault,
}

/// What the other VMM sent that the protocol does not allow.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("Hello (format {format}) carries {fds} fds; at most one, the KVM device, in format 3")]
    HelloFds { format: u32, fds: usize },
    #[error("Hello said format {hello}, the state is format {state}")]
    FormatMismatch { hello: u32, state: u32 },
    #[error("state for {state} VMs, {prepared} were prepared")]
    VmCount { state: usize, prepared: usize },
    #[error("VM {0} offered twice")]
    VmTwice(String),
    /// Staging this VM failed (for a reason other than KVM or memory).
    #[error("VM {vm}: {err}")]
    Staging {
        vm: String,
        #[source]
        err: Box<HandoverError>,
    },
    #[error("the state of VM {state} does not match the VM staged as {staged}")]
    SpecMismatch { state: String, staged: String },
    #[error("VM {vm} is {lifecycle:?} but its state {} vCPU state", if *.has_runtime { "has" } else { "lacks" })]
    RuntimeMismatch {
        vm: String,
        lifecycle: LifecycleState,
        has_runtime: bool,
    },
    #[error("{got} fds for {ram} RAM regions, a log and {named} named fds")]
    FdCount {
        got: usize,
        ram: usize,
        named: usize,
    },
    #[error("fd {0} sent twice")]
    FdTwice(String),
    /// `device`: "disk 0", "network interface 1", ...
    #[error("no fd named {name} for {device}")]
    FdMissing { name: String, device: String },
    #[error("fd {0} belongs to no device")]
    FdUnused(String),
    #[error("extra fds do not match their names")]
    ExtraFds,
    #[error("format 3 staging without a commit flag")]
    NoCommitFlag,
    #[error("commit flag: {0}")]
    CommitFlag(&'static str),
    #[error("commit flag: {0}")]
    CommitFlagFile(#[source] std::io::Error),
    /// The caller's check of the settings handed over refused them.
    #[error("the settings handed over: {0}")]
    Settings(String),
}

/// What was not done in time.
#[derive(Debug, thiserror::Error)]
pub enum Late {
    /// This VMM itself used up the ready budget by the end of `step`.
    #[error("the ready budget of {budget_ms} ms was spent by the end of {step}")]
    Budget { budget_ms: u128, step: &'static str },
    #[error("the new VMM sent no {0} within the time allowed")]
    NoAnswer(&'static str),
    #[error("VM {vm}: vCPU {id} did not stop within the ready budget")]
    VcpuNotStopped { vm: String, id: u32 },
}

/// Run `f`, turning a panic on this thread into [`HandoverError::Panicked`]: a bug in the
/// middle of a handover must end in the protocol's failure path (the guests resumed by
/// whichever VMM may run them), never unwind past the VMs it holds.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, HandoverError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|payload| HandoverError::Panicked(Panic::from_payload(&*payload)))
}

/// A state error as the handover always worded its kind (an older build recognises a
/// refusal by the "incompatible handover state: " prefix).
fn state_message(e: &StateError) -> String {
    match e.kind() {
        StateErrorKind::Incompatible => format!("incompatible handover state: {e}"),
        StateErrorKind::Invalid => format!("the handover state is invalid: {e}"),
        StateErrorKind::Encode => match e {
            StateError::Encode { .. } => e.to_string(),
            _ => format!("cannot encode the handover state: {e}"),
        },
        StateErrorKind::Io => format!("handover I/O failed: {e}"),
        StateErrorKind::Timeout => format!("no answer in time: {e}"),
        StateErrorKind::Vm => e.to_string(),
    }
}

fn channel_message(e: &ChannelError) -> String {
    match e {
        ChannelError::Timeout => "no answer in time: the other VMM did not answer in time".into(),
        ChannelError::Encode(_) | ChannelError::TooLarge(_) => {
            format!("cannot encode the handover state: {e}")
        }
        ChannelError::SealedWithoutMemfd | ChannelError::Decode(_) => {
            format!("the handover state is invalid: {e}")
        }
        ChannelError::Sealed(e) => state_message(e),
        ChannelError::Io { .. }
        | ChannelError::Send(_)
        | ChannelError::Recv(_)
        | ChannelError::TooManyFds(_)
        | ChannelError::PeerGone => format!("handover I/O failed: {e}"),
    }
}

impl From<ChannelError> for HandoverError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::PeerGone => HandoverError::PeerGone,
            e => HandoverError::Channel(e),
        }
    }
}

fn stderr_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(
            "; its last output: {}",
            tail.trim_end().replace('\n', " | ")
        )
    }
}

impl HandoverError {
    /// True if a VMM refused the handover (incompatible state, nothing to hand over), on
    /// either side, rather than failed at it.
    pub fn is_refusal(&self) -> bool {
        match self {
            HandoverError::Refused(_)
            | HandoverError::Incompatible { .. }
            | HandoverError::IncompatibleSettings(_) => true,
            HandoverError::State(e) => e.kind() == StateErrorKind::Incompatible,
            HandoverError::Peer(f) => {
                matches!(f.kind, FailureKind::Incompatible | FailureKind::Refused)
            }
            _ => false,
        }
    }

    /// How this error is told to the other VMM.
    pub(crate) fn to_failure(&self, phase: Phase) -> Failure {
        let kind = match self {
            HandoverError::Incompatible { .. } | HandoverError::IncompatibleSettings(_) => {
                FailureKind::Incompatible
            }
            HandoverError::State(e) => match e.kind() {
                StateErrorKind::Incompatible => FailureKind::Incompatible,
                StateErrorKind::Invalid => FailureKind::BadState,
                StateErrorKind::Vm => FailureKind::Vm,
                _ => FailureKind::Internal,
            },
            HandoverError::Refused(_) => FailureKind::Refused,
            HandoverError::BadState(_) => FailureKind::BadState,
            HandoverError::Vm { .. } => FailureKind::Vm,
            HandoverError::Peer(f) => f.kind,
            _ => FailureKind::Internal,
        };
        Failure {
            kind,
            phase,
            message: self.to_string(),
        }
    }

    /// Whether the other side (or a vCPU) did not answer in time: then it gets no grace
    /// to exit by itself.
    pub(crate) fn is_timeout(&self) -> bool {
        match self {
            HandoverError::Timeout(_) | HandoverError::Channel(ChannelError::Timeout) => true,
            HandoverError::State(e) => e.kind() == StateErrorKind::Timeout,
            _ => false,
        }
    }

    /// Whether the channel to the other VMM broke (rather than carried a failure): the
    /// other VMM may have said why before it closed its end, or exited.
    pub(crate) fn channel_broke(&self) -> bool {
        matches!(
            self,
            HandoverError::PeerGone
                | HandoverError::Io { .. }
                | HandoverError::Channel(
                    ChannelError::Io { .. } | ChannelError::Send(_) | ChannelError::Recv(_)
                )
        )
    }

    /// A format-2 build's failure text: it names the kind only by its prefix. Kept for
    /// talking to such builds (an upgrade from one, or a handover it refuses).
    pub(crate) fn from_legacy_text(phase: Phase, text: String) -> Self {
        let kind = if text.starts_with("incompatible handover state: ") {
            FailureKind::Incompatible
        } else if text.starts_with("nothing to hand over: ") {
            FailureKind::Refused
        } else {
            FailureKind::Internal
        };
        HandoverError::Peer(Failure {
            kind,
            phase,
            message: text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_recognised_across_the_channel() {
        for e in [
            HandoverError::Refused(Refusal::InjectedFault),
            HandoverError::Incompatible {
                sender: "x".into(),
                format: 4,
                min: 2,
                max: 3,
            },
        ] {
            assert!(e.is_refusal());
            // As the old VMM gets it from a new VMM of this build...
            assert!(HandoverError::Peer(e.to_failure(Phase::Stage)).is_refusal());
        }
        // A format-2 build names its refusals by their text alone.
        for text in [
            "nothing to hand over: no VMs",
            "incompatible handover state: warmvm 0.1.0 offers state format 3; this warmvm reads 1..=2",
        ] {
            assert!(HandoverError::from_legacy_text(Phase::Stage, text.into()).is_refusal());
        }
        assert!(!HandoverError::from_legacy_text(Phase::Restore, "VM a: boom".into()).is_refusal());
        assert!(!HandoverError::PeerGone.is_refusal());
        let vm_failure = HandoverError::from(Violation::NoCommitFlag).to_failure(Phase::Restore);
        assert_eq!(
            (vm_failure.kind, vm_failure.phase),
            (FailureKind::BadState, Phase::Restore)
        );
    }

    /// State errors are typed, but the other VMM (perhaps an older build) gets the kind and
    /// the wording the handover always used.
    #[test]
    fn state_errors_keep_their_kind_and_wording_across_the_channel() {
        let newer = HandoverError::from(StateError::Newer { version: 4, max: 3 });
        assert!(newer.is_refusal());
        assert_eq!(
            newer.to_string(),
            "incompatible handover state: state format 4 is newer than this warmvm understands (3)"
        );
        assert_eq!(
            newer.to_failure(Phase::Transfer).kind,
            FailureKind::Incompatible
        );
        let corrupt = HandoverError::from(StateError::Checksum);
        assert!(!corrupt.is_refusal());
        assert_eq!(
            corrupt.to_string(),
            "the handover state is invalid: checksum mismatch"
        );
        assert_eq!(
            corrupt.to_failure(Phase::Transfer).kind,
            FailureKind::BadState
        );
        let kvm = HandoverError::from(StateError::Vm {
            vm: "a".into(),
            err: crate::VmError::Thread(std::io::Error::other("no threads")),
        });
        assert_eq!(kvm.to_failure(Phase::Restore).kind, FailureKind::Vm);
        assert!(
            std::error::Error::source(&kvm).is_some(),
            "the source is kept"
        );
        let late = HandoverError::from(StateError::NotSaved {
            vm: "a".into(),
            id: 1,
        });
        assert!(late.is_timeout());
        assert_eq!(
            late.to_string(),
            "no answer in time: VM a: vCPU 1 did not save its state"
        );
    }

    /// A refusal and a bug read as they always have: the other VMM, perhaps an older
    /// build, is told them by their text.
    #[test]
    fn refusals_and_bugs_keep_their_wording_and_kind() {
        let refused = HandoverError::from(Refusal::InjectedFault);
        assert_eq!(refused.to_string(), "fault injected: refuse-state");
        let told = refused.to_failure(Phase::Transfer);
        assert_eq!(told.kind, FailureKind::Refused);
        assert_eq!(told.message, "fault injected: refuse-state");
        assert!(HandoverError::Peer(told).is_refusal());

        let bug = contain::<()>(|| panic!("boom {}", 7)).unwrap_err();
        assert!(matches!(&bug, HandoverError::Panicked(p) if p.message == "boom 7"));
        assert_eq!(bug.to_string(), "the handover hit a bug: boom 7");
        assert!(!bug.is_refusal());
        assert_eq!(bug.to_failure(Phase::Restore).kind, FailureKind::Internal);
        let cause = std::error::Error::source(&bug).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("boom 7"), "the panic is the source");
    }

    #[test]
    fn a_dead_new_vmm_is_reported_with_its_status_and_output() {
        let e = HandoverError::NewVmmExited {
            pid: 7,
            how: "exited with status 2".into(),
            stderr_tail: "error: bad flag\nusage: x\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "the new VMM (pid 7) exited with status 2; its last output: error: bad flag | usage: x"
        );
    }
}
