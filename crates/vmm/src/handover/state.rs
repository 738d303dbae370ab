//! What travels from the old VMM to the new one. Only ever extended with defaulted fields.

use std::path::PathBuf;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};
use warmvm_devices::SerialStateData;
use warmvm_hypervisor::{VcpuState, VmState};

use crate::config::VmConfig;

/// Messages on the control channel.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Old → new, first: who is talking, in which state format.
    Hello { format_version: u32, sender: String },
    /// Old → new: one VM to prepare. Fds: its RAM memfds in order, then its console log.
    PrepareVm(Box<VmPrepare>),
    /// Old → new: no more VMs. Fds: the extra fds, named in `extra_fd_names`.
    PrepareDone {
        extra: serde_json::Value,
        extra_fd_names: Vec<String>,
    },
    /// New → old: everything is ready; the old VMM may suspend the guests.
    Prepared { pid: u32 },
    /// Old → new: the captured state. Fd: the sealed memfd holding its envelope.
    State,
    /// New → old: every VM runs in the new VMM.
    Resumed(RebootReport),
    /// Either way: giving up, and why.
    Failed(String),
}

/// A VM as the new VMM needs it before the guests stop.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VmPrepare {
    pub config: VmConfig,
    pub protocol: String,
    pub status_addr: Option<u64>,
    /// (guest address, size) of each RAM memfd, in the order the fds come.
    pub ram: Vec<(u64, u64)>,
    pub hugepages: bool,
    pub cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    pub linux_devices: bool,
    pub console_log: PathBuf,
    pub age_ms: u64,
}

/// A VM's captured state.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct VmCapture {
    pub name: String,
    /// Lifecycle at suspension: "running" or "paused" (a paused VM stays paused).
    pub lifecycle: String,
    /// CLOCK_MONOTONIC ns at which this VM's first vCPU stopped.
    pub first_stop_ns: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialStateData,
}

/// The envelope's payload.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct HandoverState {
    pub sender: String,
    /// CLOCK_MONOTONIC ns when capture finished: restore advances guest time from here.
    pub captured_at_ns: u64,
    pub host_first_stop_ns: u64,
    pub vms: Vec<VmCapture>,
    /// Times of the old side's phases, in µs (added in format 2).
    pub quiesce_us: u64,
    pub capture_us: u64,
    /// Time the old side spent staging (before the pause), in µs.
    pub stage_us: u64,
}

/// The payload as format 1 wrote it (before the phase times were added). Kept so that tests
/// can play an older VMM handing over to this one.
#[derive(Debug, Serialize)]
pub(crate) struct HandoverStateV1<'a> {
    pub sender: &'a str,
    pub captured_at_ns: u64,
    pub host_first_stop_ns: u64,
    pub vms: &'a [VmCapture],
}

/// One VM's blackout.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VmBlackout {
    pub name: String,
    /// From the VM's first vCPU stopping in the old VMM to its last vCPU running in the new.
    pub blackout_us: u64,
}

/// Phase durations, in µs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PhaseTimes {
    /// Starting the new VMM and preparing every VM (before the pause).
    pub stage_us: u64,
    pub quiesce_us: u64,
    pub capture_us: u64,
    pub transfer_us: u64,
    pub restore_us: u64,
    pub resume_us: u64,
}

/// What a warm reboot reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RebootReport {
    pub new_pid: u32,
    /// The builds that handed over and took over (they differ in an upgrade).
    pub from_build: String,
    pub to_build: String,
    /// From the first vCPU stopping to the last one running again, over all VMs.
    pub host_blackout_us: u64,
    pub phases: PhaseTimes,
    pub vms: Vec<VmBlackout>,
    pub state_bytes: u64,
}
