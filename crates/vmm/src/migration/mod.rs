//! Live migration: a running VM moves to another host over a byte stream, with pre-copy
//! on the dirty log and a commit point, and never runs in two places.
//!
//! The third transport of a VM's state (beside `handover` and `snapshot`): the source
//! saves it with the state API (`Vm::park_and_save`, `Vm::save`) into a [`VmRecord`], the
//! destination builds the VM from its spec (`Vm::build`, before the guest pauses) and
//! loads it (`Vm::load`, `Loading::finish`). This module moves RAM and that record over
//! any `Read + Write` (loopback TCP in the tests; TLS can wrap it); it reads or writes no
//! KVM or device state itself.
//!
//! - [`stream`]: the messages and their framing.
//! - `pages`: which pages go in each round (KVM's dirty log ORed with the VMM's own
//!   writes, see `warmvm_memory::GuestRam::take_vmm_dirty`) and moving them.
//! - [`send`]: the source. Round 0 sends every page that was ever touched; each later
//!   round sends what was dirtied meanwhile; pre-copy stops when nothing is dirty or when
//!   what is left fits the downtime budget, or at the round or time limit (cancel, or with
//!   `force` stop and copy). Then the switchover: pause, devices finish the request in
//!   hand, disks fdatasync'd, the last pages and the state, `Ready`, `Commit`, `Running`.
//! - [`receive`]: the destination. Checks before anything pauses (stream and state
//!   format, the spec, the name, memory, CPUID), builds the VM over fresh memfd RAM,
//!   writes pages as they come, loads the state without running a guest instruction and
//!   runs it only on `Commit`.
//!
//! Who runs the VM: before `Commit` the source does, and any failure (the destination
//! refusing, dying, or answering late; a failure of the source's own) resumes it there.
//! Once `Commit` is sent the source never runs it again: `Running` back means the VM
//! is the destination's (the source frees its copy); anything else leaves it paused at
//! the source as [`crate::Lifecycle::InDoubt`], until someone asks the destination.
//!
//! Left to the daemon that will call this: the listener and its authentication (mutual
//! TLS), the API and CLI, announcing the guest's MAC after the move, handing over disk
//! locks. Resolving an in-doubt VM is here as its two halves: [`ask`] (the source asks
//! the destination over a new connection) and [`settle`] (the source frees or resumes
//! its copy by the answer); the destination answers in [`serve`].

pub mod faults;
#[doc(hidden)]
pub mod fuzzing;
mod pages;
pub mod receive;
pub mod send;
pub mod stream;
#[cfg(test)]
mod tests;

pub use pages::RunError;
pub use receive::{receive, serve, ReceiveOptions, Received, Served};
pub use send::{
    ask, send, settle, EndReason, MigrationReport, Progress, ProgressHook, RoundHook, RoundReport,
    SendOptions,
};
pub use stream::{Outcome, StreamError};

use crate::state::envelope::Kind;
pub use crate::state::VmRecord;

/// The state's envelope in a migration stream: the handover's format versions, a magic of
/// its own. Format 3 is the first a migration carries; the next format will read 3 (n-1),
/// as the warm reboot does.
pub const STATE_KIND: Kind = Kind {
    magic: *b"WARMVMMS",
    what: "a warmvm migration state",
    min_version: crate::state::envelope::FORMAT_VERSION,
    max_version: crate::state::envelope::FORMAT_VERSION,
};

/// Errors of a migration, on either side. Each keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("the peer sent {got} where {wanted} was due")]
    Unexpected {
        wanted: &'static str,
        got: &'static str,
    },
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination failed at {step}: {reason}")]
    DestinationFailed { step: String, reason: String },
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    #[error("VM {vm} is {state}; only a running VM can be migrated")]
    NotRunning { vm: String, state: &'static str },
    #[error("stream format {version} is not one this warmvm reads ({min}..={max})")]
    StreamVersion { version: u32, min: u32, max: u32 },
    #[error("state format {version} is not one this warmvm reads ({min}..={max})")]
    StateFormat { version: u32, min: u32, max: u32 },
    #[error("a VM named {0} already exists here")]
    NameTaken(String),
    #[error("the VM needs {need_mib} MiB and only {free_mib} MiB are available here")]
    NoMemory { need_mib: u64, free_mib: u64 },
    #[error("the CPUID digest does not match the CPUIDs sent")]
    CpuidDigest,
    #[error("this host cannot offer the VM's CPU: {0}")]
    Cpuid(String),
    #[error("round {round}: {err}")]
    BadRun {
        round: u32,
        #[source]
        err: RunError,
    },
    #[error("{0}")]
    State(#[source] Box<crate::state::StateError>),
    #[error("{0}")]
    Vm(#[source] Box<crate::VmError>),
    #[error("{0}")]
    Memory(#[source] Box<warmvm_memory::MemoryError>),
    #[error("the dirty log: {0}")]
    DirtyLog(#[source] Box<warmvm_hypervisor::Error>),
    #[error("no KVM memory slot for the RAM region at {0:#x}")]
    NoSlot(u64),
    #[error("reading the RAM's data extents: {0}")]
    RamExtents(#[source] std::io::Error),
    #[error("reading guest RAM at {gpa:#x}: {err}")]
    ReadRam {
        gpa: u64,
        #[source]
        err: vm_memory::GuestMemoryError,
    },
    #[error("vCPU {0} did not stop in time")]
    VcpuNotStopped(u32),
    #[error("flushing the disks: {0}")]
    Disks(#[source] Box<crate::snapshot::SnapshotError>),
    #[error("pre-copy did not converge: {0}")]
    Cancelled(String),
    #[error("the stream broke after the commit ({0}): the VM stays paused here, in doubt")]
    InDoubt(String),
    #[error("VM {vm} is {state}, not in doubt")]
    NotInDoubt { vm: String, state: &'static str },
    #[error("the destination answered about {got}, not the migration asked about")]
    OtherAnswer { got: String },
    #[error("the destination cannot tell yet (it is still receiving a VM of that name, or runs one it does not know came by this migration)")]
    Undecided,
}

impl MigrationError {
    pub(crate) fn state(e: crate::state::StateError) -> Self {
        MigrationError::State(Box::new(e))
    }
    pub(crate) fn vm(e: crate::VmError) -> Self {
        MigrationError::Vm(Box::new(e))
    }
    pub(crate) fn dirty_log(e: warmvm_hypervisor::Error) -> Self {
        MigrationError::DirtyLog(Box::new(e))
    }
}

/// A failed migration: what went wrong, and what had happened until then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failed {
    #[source]
    pub error: MigrationError,
    pub report: Box<MigrationReport>,
}
