//! What the old and the new VMM say to each other, beside the VMs' state itself (which is
//! [`crate::state`]'s): the control messages, the failures, and the report.
//!
//! As strict as the state: a field added after the oldest format this build reads
//! ([`crate::state::envelope::MIN_FORMAT_VERSION`]) carries a `#[serde(default)]` of its own
//! and says in which format it came; nothing else defaults. Phases and failures are enums.

use serde::{Deserialize, Serialize};

use crate::state::{VmRecord, VmSpec};

/// Messages on the control channel. Variants are never renamed or changed: a build reads
/// the messages of every format it supports, and those an older build answers with.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Old → new, first: who is talking, in which state format. Fd (format 3, optional:
    /// older builds send none, and readers that predate it close it unread): the old VMM's
    /// KVM device, so that the new one need not open /dev/kvm.
    Hello { format_version: u32, sender: String },
    /// Format 2 (old → new): one VM to prepare. Fds: its RAM memfds in order, then its
    /// console log.
    PrepareVm(Box<crate::state::legacy::VmPrepareV2>),
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
    /// Boxed: the report is the largest message by far (serde encodes a box as its content).
    Resumed(Box<RebootReport>),
    /// Format 2, either way: giving up, and why. Also what a format-2 build answers a
    /// newer format's `Hello` with.
    Failed(String),
    /// Format 3 (old → new): one VM to prepare. Fds: its RAM memfds in the order of
    /// `spec.ram`, then its console log.
    StageVm(Box<VmSpec>),
    /// Format 3 (new → old): every VM is restored and not one guest instruction has run.
    Ready,
    /// Format 3 (old → new): the VMs are yours. The old VMM never runs them again.
    Commit,
    /// Format 3 (old → new): discard the VMs without running them, and exit.
    Abort,
    /// Format 3, either way: giving up, and why.
    Refused(Failure),
    /// Either way, never decoded as such: the datagram of a message too large to travel
    /// inline, which follows in a sealed memfd (see `crate::channel`). Builds that predate it
    /// refuse it as an unknown message.
    Sealed,
}

/// The steps of a warm reboot, to say where one failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Starting the new VMM.
    Spawn,
    /// Sending every VM's spec and fds; the new VMM prepares them (guests still run).
    Stage,
    /// Parking every vCPU (the blackout begins).
    Quiesce,
    /// Reading vCPU, VM and device state.
    Capture,
    /// Passing the state to the new VMM.
    Transfer,
    /// The new VMM restoring every VM, up to its `Ready`.
    Restore,
    /// The old VMM's decision reaching the new one.
    Commit,
    /// The guests running in the new VMM.
    Resume,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Spawn => "spawn",
            Phase::Stage => "stage",
            Phase::Quiesce => "quiesce",
            Phase::Capture => "capture",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Resume => "resume",
        })
    }
}

/// Why a VMM gave up on a handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// It cannot read the other's state format.
    Incompatible,
    /// It declines on purpose (e.g. a fault injected by a test).
    Refused,
    /// The state or a message is malformed or inconsistent.
    BadState,
    /// A VM could not be re-created or restored (KVM, memory).
    Vm,
    /// Anything else (I/O, resources).
    Internal,
}

/// A handover failure as one VMM reports it to the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub phase: Phase,
    pub message: String,
}

/// The envelope's payload in format 3.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandoverState {
    pub sender: String,
    /// CLOCK_MONOTONIC ns when capture finished: restore advances guest time from here.
    pub captured_at_ns: u64,
    pub host_first_stop_ns: u64,
    pub vms: Vec<VmRecord>,
    /// Times of the old side's phases, in µs.
    pub quiesce_us: u64,
    pub capture_us: u64,
    pub stage_us: u64,
}

/// About how many bytes a [`HandoverState`] of VMs with these specs encodes to, erring
/// high: each spec twice (the vCPUs' CPUIDs travel again in their state), 8 KiB a vCPU
/// (registers, XSAVE area, local APIC, MSRs) and 8 KiB a VM (irqchips, devices). Both VMMs
/// make the state's memory ready this large while staging.
pub(crate) fn state_size_hint(specs: &[VmSpec]) -> usize {
    specs
        .iter()
        .map(|spec| {
            let encoded = rmp_serde::to_vec_named(spec).map_or(4096, |b| b.len());
            2 * encoded + 8192 * spec.cpuids.len() + 8192
        })
        .sum()
}

/// One VM's blackout.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmBlackout {
    pub name: String,
    /// From the VM's first vCPU stopping in the old VMM to its last vCPU running in the new.
    pub blackout_us: u64,
}

/// Phase durations, in µs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseTimes {
    /// Starting the new VMM and preparing every VM (before the pause).
    pub stage_us: u64,
    pub quiesce_us: u64,
    pub capture_us: u64,
    pub transfer_us: u64,
    pub restore_us: u64,
    /// From `Ready` sent to `Commit` received, on the new VMM's side (format 3).
    #[serde(default)]
    pub commit_us: u64,
    pub resume_us: u64,
}

/// The instants that bound the blackout's phases, CLOCK_MONOTONIC ns, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlackoutInstants {
    /// The old VMM asked the first vCPU to stop (the blackout starts).
    pub first_stop_ns: u64,
    /// Every vCPU stopped.
    pub quiesced_ns: u64,
    /// Every VM's state captured.
    pub captured_ns: u64,
    /// The state received and read by the new VMM.
    pub read_ns: u64,
    /// Every VM loaded, before `Ready`.
    pub restored_ns: u64,
    /// The commit claimed (format 3), or the restore's end when there is none.
    pub committed_ns: u64,
    /// The last vCPU running in the new VMM (the blackout ends).
    pub last_running_ns: u64,
}

impl PhaseTimes {
    /// The blackout's phases as consecutive segments between `at`'s instants, in µs: each
    /// is the difference of its ends counted from the blackout's start and truncated to the
    /// µs, so that they add up to the host blackout (`(last_running - first_stop) / 1000`)
    /// exactly. None when the instants are not in order (an older build sent no stamps).
    pub fn consecutive(stage_us: u64, at: BlackoutInstants) -> Option<Self> {
        let ends = [
            at.first_stop_ns,
            at.quiesced_ns,
            at.captured_ns,
            at.read_ns,
            at.restored_ns,
            at.committed_ns,
            at.last_running_ns,
        ];
        if at.first_stop_ns == 0 || ends.windows(2).any(|w| w[0] > w[1]) {
            return None;
        }
        let us = |i: usize| {
            (ends[i + 1] - at.first_stop_ns) / 1000 - (ends[i] - at.first_stop_ns) / 1000
        };
        Some(Self {
            stage_us,
            quiesce_us: us(0),
            capture_us: us(1),
            transfer_us: us(2),
            restore_us: us(3),
            commit_us: us(4),
            resume_us: us(5),
        })
    }

    /// The phases of the blackout, which add up to it.
    pub fn blackout_us(&self) -> u64 {
        self.quiesce_us
            + self.capture_us
            + self.transfer_us
            + self.restore_us
            + self.commit_us
            + self.resume_us
    }
}

/// One VM's vCPU stamps in a warm reboot: CLOCK_MONOTONIC ns, one per vCPU in vCPU order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VmStamps {
    pub name: String,
    /// Each vCPU thread parking after its exit from KVM_RUN in the old VMM. Filled in by
    /// the old VMM (empty when an older build handed over).
    pub vcpu_stops_ns: Vec<u64>,
    /// Each vCPU thread leaving its park for its first KVM_RUN in the new VMM; 0 for a vCPU
    /// that did not leave it in time. Empty for a VM that was not running.
    pub vcpu_runs_ns: Vec<u64>,
}

/// The instants of a warm reboot, CLOCK_MONOTONIC ns (the clock of the host's KVM trace
/// too, so that a guest's pause can be laid over them). Each side stamps its own steps
/// where it already measured its phases; 0 (or empty) means not recorded, by a build that
/// predates the stamps. Added in format 3 as a whole: its own fields are all required.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RebootStamps {
    /// Old VMM: the pause requested (just before it asks every vCPU to park).
    pub pause_requested_ns: u64,
    /// Old VMM: every VM's state captured.
    pub captured_ns: u64,
    /// Old VMM: the state sent.
    pub state_sent_ns: u64,
    /// New VMM: the state received.
    pub state_received_ns: u64,
    /// New VMM: every VM restored (read and loaded), before it says `Ready`.
    pub restored_ns: u64,
    /// New VMM: the commit received and claimed (format 2, which has none: restore done).
    pub commit_ns: u64,
    /// Each VM's vCPU stamps, by name.
    pub vms: Vec<VmStamps>,
}

impl RebootStamps {
    /// The old VMM's own stamps, added to the report the new one sent (it has none of them,
    /// or a newer build's; the old VMM's are the ones that count).
    pub(crate) fn fill_old_side(
        &mut self,
        pause_requested_ns: u64,
        captured_ns: u64,
        state_sent_ns: u64,
        stops: impl IntoIterator<Item = (String, Vec<u64>)>,
    ) {
        self.pause_requested_ns = pause_requested_ns;
        self.captured_ns = captured_ns;
        self.state_sent_ns = state_sent_ns;
        for (name, vcpu_stops_ns) in stops {
            match self.vms.iter_mut().find(|v| v.name == name) {
                Some(v) => v.vcpu_stops_ns = vcpu_stops_ns,
                None => self.vms.push(VmStamps {
                    name,
                    vcpu_stops_ns,
                    vcpu_runs_ns: Vec::new(),
                }),
            }
        }
    }
}

/// What a warm reboot reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
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
    /// The state format the old VMM wrote and the new one read (format 3).
    #[serde(default)]
    pub state_format: u32,
    /// Whether the handover had a commit point (false when an older build handed over).
    #[serde(default)]
    pub commit_protocol: bool,
    /// Steps after the commit whose outcome is not known: a vCPU that did not leave its
    /// park in time, a report that never reached the old VMM. The VMs are the new VMM's
    /// all the same (nothing after the commit can give them back), but the figures above
    /// are then incomplete, not a measurement. Empty when every step is known to have
    /// succeeded. Added in format 3 (older builds send none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// The executable that handed over: filled in by the old VMM itself (absent when an
    /// older build handed over).
    #[serde(default)]
    pub from_binary: Option<crate::executable::BinaryInfo>,
    /// The executable that took over (absent when the new VMM is an older build).
    #[serde(default)]
    pub to_binary: Option<crate::executable::BinaryInfo>,
    /// The instants of this reboot, to account for a guest's whole pause (see
    /// [`crate::handover::pause_segments`]). Added in format 3: a side that is an older
    /// build leaves its own at 0 (empty), and a report from an older build has none.
    #[serde(default)]
    pub stamps: RebootStamps,
}

impl RebootReport {
    /// Whether every figure was measured: no step's outcome is unknown. Only such reports
    /// may be counted as blackout figures.
    pub fn is_measured(&self) -> bool {
        self.errors.is_empty()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_blackouts_phases_are_consecutive_and_add_up_to_it() {
        let at = BlackoutInstants {
            first_stop_ns: 1_000_000_999,
            quiesced_ns: 1_000_120_500,
            captured_ns: 1_000_190_001,
            read_ns: 1_000_400_000,
            restored_ns: 1_000_700_999,
            committed_ns: 1_000_701_000,
            last_running_ns: 1_000_950_998,
        };
        let p = PhaseTimes::consecutive(7, at).expect("in order");
        assert_eq!(
            p.blackout_us(),
            (at.last_running_ns - at.first_stop_ns) / 1000
        );
        assert_eq!(
            (p.stage_us, p.quiesce_us, p.capture_us, p.transfer_us),
            (7, 119, 70, 210)
        );
        assert_eq!((p.restore_us, p.commit_us, p.resume_us), (301, 0, 249));
        let backwards = BlackoutInstants {
            read_ns: at.captured_ns - 1,
            ..at
        };
        assert_eq!(PhaseTimes::consecutive(7, backwards), None);
        let unstamped = BlackoutInstants {
            first_stop_ns: 0,
            ..at
        };
        assert_eq!(PhaseTimes::consecutive(7, unstamped), None);
    }

    use super::*;
    use crate::state::testing::drop_field;
    use crate::state::LifecycleState;

    #[test]
    fn fields_added_after_the_oldest_format_default() {
        let report = RebootReport {
            state_format: 3,
            commit_protocol: true,
            ..Default::default()
        };
        let bytes = rmp_serde::to_vec_named(&report).unwrap();
        let back: RebootReport =
            rmp_serde::from_slice(&drop_field(&bytes, &["commit_protocol"])).unwrap();
        assert!(!back.commit_protocol);
        for field in ["from_binary", "to_binary"] {
            let back: RebootReport = rmp_serde::from_slice(&drop_field(&bytes, &[field])).unwrap();
            assert_eq!(back, report, "{field}");
        }
        let err = rmp_serde::from_slice::<RebootReport>(&drop_field(&bytes, &["new_pid"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("new_pid"), "{err}");
    }

    #[test]
    fn stamps_cross_whole_and_a_report_without_them_reads_as_not_recorded() {
        let report = RebootReport {
            state_format: 3,
            stamps: RebootStamps {
                pause_requested_ns: 1,
                captured_ns: 2,
                state_sent_ns: 3,
                state_received_ns: 4,
                restored_ns: 5,
                commit_ns: 6,
                vms: vec![VmStamps {
                    name: "vm0".into(),
                    vcpu_stops_ns: vec![7, 8],
                    vcpu_runs_ns: vec![9, 10],
                }],
            },
            ..Default::default()
        };
        let bytes = rmp_serde::to_vec_named(&report).unwrap();
        let back: RebootReport = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, report);
        // What a build before the stamps sent, either way (the API's JSON too).
        let older: RebootReport = rmp_serde::from_slice(&drop_field(&bytes, &["stamps"])).unwrap();
        assert_eq!(older.stamps, RebootStamps::default());
        assert_eq!(older.state_format, 3);
        let mut json = serde_json::to_value(&report).unwrap();
        json.as_object_mut().unwrap().remove("stamps");
        let older: RebootReport = serde_json::from_value(json).unwrap();
        assert_eq!(older.stamps, RebootStamps::default());
        // Within them, every field is required.
        for path in [
            &["stamps", "pause_requested_ns"][..],
            &["stamps", "commit_ns"],
            &["stamps", "vms"],
        ] {
            let err = rmp_serde::from_slice::<RebootReport>(&drop_field(&bytes, path))
                .unwrap_err()
                .to_string();
            assert!(err.contains(path[1]), "{path:?}: {err}");
        }
    }

    #[test]
    fn the_old_vmm_adds_its_stamps_to_the_new_ones_by_vm() {
        let mut stamps = RebootStamps {
            state_received_ns: 4,
            vms: vec![VmStamps {
                name: "b".into(),
                vcpu_stops_ns: Vec::new(),
                vcpu_runs_ns: vec![9],
            }],
            ..Default::default()
        };
        stamps.fill_old_side(1, 2, 3, [("a".into(), vec![5]), ("b".into(), vec![6])]);
        assert_eq!((stamps.pause_requested_ns, stamps.captured_ns), (1, 2));
        assert_eq!((stamps.state_sent_ns, stamps.state_received_ns), (3, 4));
        assert_eq!(
            stamps.vms,
            vec![
                VmStamps {
                    name: "b".into(),
                    vcpu_stops_ns: vec![6],
                    vcpu_runs_ns: vec![9],
                },
                VmStamps {
                    name: "a".into(),
                    vcpu_stops_ns: vec![5],
                    vcpu_runs_ns: Vec::new(),
                },
            ]
        );
    }

    #[test]
    fn a_binary_crosses_whole() {
        let report = RebootReport {
            to_binary: Some(crate::executable::BinaryInfo {
                path: "/usr/local/bin/warmvm".into(),
                version: "0.1.0".into(),
                commit: "unknown".into(),
                sha256: "ab".repeat(32),
            }),
            ..Default::default()
        };
        let bytes = rmp_serde::to_vec_named(&report).unwrap();
        let back: RebootReport = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, report);
        for field in ["path", "version", "commit", "sha256"] {
            let err =
                rmp_serde::from_slice::<RebootReport>(&drop_field(&bytes, &["to_binary", field]))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_channels_sealed_marker_is_the_encoding_of_msg_sealed() {
        assert_eq!(
            rmp_serde::to_vec_named(&Msg::Sealed).unwrap(),
            crate::channel::SEALED_MARKER
        );
    }

    #[test]
    fn lifecycles_and_failures_cross_as_typed_values() {
        for l in [
            LifecycleState::Created,
            LifecycleState::Running,
            LifecycleState::Paused,
            LifecycleState::PoweredOff { exit_status: 3 },
            LifecycleState::Crashed { reason: "x".into() },
            LifecycleState::Stopped,
        ] {
            let back: LifecycleState =
                rmp_serde::from_slice(&rmp_serde::to_vec_named(&l).unwrap()).unwrap();
            assert_eq!(back, l);
        }
        let f = Failure {
            kind: FailureKind::Incompatible,
            phase: Phase::Stage,
            message: "m".into(),
        };
        let back: Failure = rmp_serde::from_slice(&rmp_serde::to_vec_named(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        // An unknown lifecycle is an error, not a default.
        let bad = rmp_serde::to_vec_named(&"exploded").unwrap();
        assert!(rmp_serde::from_slice::<LifecycleState>(&bad).is_err());
    }
}
