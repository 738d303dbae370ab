//! A VM's state: what it is, how it is saved and loaded, and how it is framed. The one home
//! of everything that moves a VM out of its process; the transports around it only carry
//! it.
//!
//! - [`record`]: the state types. [`VmRecord`] is a VM's whole state: its [`VmSpec`] (what
//!   does not change while it lives, enough to build it again over its RAM) and its
//!   [`VmRuntime`] (vCPU, KVM VM-wide and device state, read while it is paused).
//! - `vm`: the state API on [`crate::Vm`]. Saving: `crate::Vm::park_and_save` (or
//!   `crate::Vm::save_parked_vcpus` for a VM already paused), then `crate::Vm::save`.
//!   Loading comes in two steps, so that a warm reboot does the slow part while the guest
//!   still runs in the old VMM: `crate::Vm::build` from a spec (KVM VM, vCPUs with their
//!   CPUIDs, devices wired and in their power-on state, parked vCPU threads), and, in the
//!   blackout, `crate::Vm::load` of the runtime in place, which `Loading::finish`
//!   completes. Devices take part through [`warmvm_devices::Persist`].
//! - [`envelope`]: magic, format version, length and CRC-32 around a MessagePack payload,
//!   in memory or in a sealed memfd.
//! - `legacy`: the older formats still read (format 2 of the handover).
//!
//! The transports: [`crate::handover`] (to a new VMM process on this host: RAM as memfds,
//! the state in a sealed memfd) and [`crate::snapshot`] (to files). Neither reads or writes
//! KVM or device state itself; a new transport (e.g. to another host) moves a
//! [`VmRecord`] and calls the same API. A new device adds one state type beside itself,
//! implements `Persist`, and takes its place in [`warmvm_devices::DevicesState`]; a field
//! added to the state follows the rules in [`record`]. `transport_tests.rs` (beside this
//! module) restores one saved record through each transport.

pub mod envelope;
pub(crate) mod legacy;
pub mod record;
pub(crate) mod vm;

pub use record::{
    disk_fd_name, net_fd_name, BootProtocol, DiskState, LifecycleState, NetState, RamSlot,
    VmConfigState, VmRecord, VmRuntime, VmSpec,
};
pub use vm::Loading;

/// A state that cannot be framed, read, checked, saved or loaded. Nothing was changed that
/// a caller must undo: a refused state leaves the VM it was meant for unrun.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot encode {what}: {err}")]
    Encode {
        what: &'static str,
        #[source]
        err: rmp_serde::encode::Error,
    },
    #[error("{what} of {len} bytes is over the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("not {what} (bad magic)")]
    BadMagic { what: &'static str },
    #[error("state format {version} is newer than this warmvm understands ({max})")]
    Newer { version: u32, max: u32 },
    #[error("state format {version} is older than this warmvm supports ({min})")]
    Older { version: u32, min: u32 },
    #[error("payload length does not match the envelope")]
    Length,
    #[error("checksum mismatch")]
    Checksum,
    #[error("payload: {0}")]
    Decode(#[source] rmp_serde::decode::Error),
    #[error("state memfd: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("the state memfd is not sealed")]
    Unsealed,
    #[error("the state is {0} bytes, over the limit")]
    Oversized(u64),
    /// A spec that describes no VM this host can build.
    #[error("{0}")]
    Config(#[source] crate::ConfigError),
    #[error("vCPU count and CPUIDs disagree")]
    CpuidCount,
    #[error("RAM regions overflow")]
    RamOverflow,
    #[error("RAM regions do not add up to memory_mib")]
    RamSize,
    #[error("status area outside RAM")]
    StatusOutsideRam,
    /// Format 2 named boot protocols by strings.
    #[error("VM {vm}: unknown boot protocol {protocol:?}")]
    UnknownProtocol { vm: String, protocol: String },
    /// Format 2 named lifecycles by strings, and handed over only live VMs.
    #[error("VM {vm}: cannot take over a VM in state {lifecycle:?}")]
    UnknownLifecycle { vm: String, lifecycle: String },
    #[error("state of VM {state} does not match prepared VM {prepared}")]
    OtherVm { state: String, prepared: String },
    #[error("VM {vm}: state for {saved} vCPUs, {here} were prepared")]
    VcpuCount {
        vm: String,
        saved: usize,
        here: usize,
    },
    #[error("vCPU ids out of order")]
    VcpuOrder,
    #[error("PIT state for a VM without a PIT")]
    PitWithoutPit,
    #[error("vCPU {0} thread did not start")]
    VcpuThread(u32),
    #[error("vCPU {0} is not parked")]
    NotParked(u32),
    #[error("vCPU {0} did not restore")]
    NotLoaded(u32),
    #[error("VM {vm}: vCPU {id} did not save its state")]
    NotSaved { vm: String, id: u32 },
    /// A record of a VM that has ended, or one that lacks the state of its vCPUs.
    #[error("the VM is {lifecycle:?}, with{} vCPU state: only a live VM can be restored", if *.has_runtime { "" } else { "out" })]
    NotLive {
        lifecycle: LifecycleState,
        has_runtime: bool,
    },
    /// A snapshot's RAM files disagree with its VM's RAM regions.
    #[error("{files} RAM files for {regions} regions")]
    RamFiles { files: usize, regions: usize },
    #[error("{file}: {reason}")]
    RamExtents { file: String, reason: String },
    #[error("VM {0} cannot be handed over now")]
    HandedOver(String),
    #[error("VM {0} ended during the capture")]
    EndedDuringSave(String),
    #[error("VM {vm}: {err}")]
    PauseDevices {
        vm: String,
        #[source]
        err: warmvm_devices::virtio::worker::WorkerError,
    },
    #[error("{0}")]
    Devices(#[from] warmvm_devices::DevicesError),
    #[error("VM {vm}: {err}")]
    Vm {
        vm: String,
        #[source]
        err: crate::VmError,
    },
}

/// What kind of failure a [`StateError`] is, for a transport that tells its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateErrorKind {
    /// A format this build does not read.
    Incompatible,
    /// Malformed or inconsistent state.
    Invalid,
    /// A state too large or not encodable.
    Encode,
    /// The host: a memfd, a device worker, a vCPU thread that does not answer.
    Io,
    /// A vCPU did not save its state in time.
    Timeout,
    /// KVM or memory refused what the state asks for.
    Vm,
}

impl StateError {
    pub fn kind(&self) -> StateErrorKind {
        use StateError::*;
        match self {
            Newer { .. } | Older { .. } => StateErrorKind::Incompatible,
            Encode { .. } | TooLarge { .. } => StateErrorKind::Encode,
            Memfd(_) | PauseDevices { .. } | NotParked(_) | NotLoaded(_) => StateErrorKind::Io,
            NotSaved { .. } => StateErrorKind::Timeout,
            Vm { .. } => StateErrorKind::Vm,
            BadMagic { .. }
            | Length
            | Checksum
            | Decode(_)
            | Unsealed
            | Oversized(_)
            | Config(_)
            | CpuidCount
            | RamOverflow
            | RamSize
            | StatusOutsideRam
            | UnknownProtocol { .. }
            | UnknownLifecycle { .. }
            | OtherVm { .. }
            | VcpuCount { .. }
            | VcpuOrder
            | PitWithoutPit
            | VcpuThread(_)
            | HandedOver(_)
            | EndedDuringSave(_)
            | NotLive { .. }
            | RamFiles { .. }
            | RamExtents { .. }
            | Devices(_) => StateErrorKind::Invalid,
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    /// `bytes` (a MessagePack map) without the field at `path`.
    pub fn drop_field(bytes: &[u8], path: &[&str]) -> Vec<u8> {
        let mut v: rmpv::Value = rmp_serde::from_slice(bytes).unwrap();
        let mut cur = &mut v;
        for (i, key) in path.iter().enumerate() {
            let map = match cur {
                rmpv::Value::Map(m) => m,
                other => panic!("not a map at {key}: {other:?}"),
            };
            let idx = map
                .iter()
                .position(|(k, _)| k.as_str() == Some(key))
                .unwrap_or_else(|| panic!("no field {key}"));
            if i + 1 == path.len() {
                map.remove(idx);
                break;
            }
            cur = &mut map[idx].1;
        }
        rmp_serde::to_vec_named(&v).unwrap()
    }
}
