//! A guest's whole pause in a warm reboot, as consecutive segments between the reboot's
//! stamps ([`RebootStamps`]): from the guest's last sign of life before it (its last
//! heartbeat in the host's KVM trace) to its first after, through the pause request, its
//! vCPUs stopping, the capture, the transfer, the restore, the commit and its vCPUs running
//! again. Every instant is CLOCK_MONOTONIC ns, so the segments add up to the pause exactly.
//!
//! The guest's pause need not start at the pause request nor end at its last vCPU running:
//! it beats until a vCPU is stopped, and may beat again as soon as one runs. Each stamp is
//! therefore taken within the pause (the guest's last beat at the latest, its first beat at
//! the earliest): a segment the guest spent running counts 0, never negative. Stamps that
//! contradict each other or the beats are an error, never a figure.

use super::messages::{RebootStamps, VmStamps};

/// The segments, in order: each runs from the instant before it to its own.
pub const SEGMENTS: [&str; 11] = [
    "last beat to pause request",
    "first vCPU stop",
    "other vCPUs stop",
    "capture",
    "send",
    "receive",
    "read and restore",
    "commit",
    "first vCPU run",
    "other vCPUs run",
    "to first beat",
];

/// The instants that bound the segments, in order.
const INSTANTS: [&str; 12] = [
    "the guest's last beat before the pause",
    "pause requested",
    "first vCPU stopped",
    "last vCPU stopped",
    "state captured",
    "state sent",
    "state received",
    "restored",
    "commit",
    "first vCPU running",
    "last vCPU running",
    "the guest's first beat after the pause",
];

/// One VM's pause in one reboot, ns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PauseSegments {
    /// From the guest's last beat before the pause to its first after.
    pub pause_ns: u64,
    /// As [`SEGMENTS`] names them; they add up to `pause_ns`.
    pub segments: [u64; 11],
}

/// Why a reboot's pause cannot be laid out: it is not measured then.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("not recorded: {0} (a build without stamps took part, or a vCPU did not run)")]
    Missing(String),
    #[error(
        "stamps out of order: {later} at {later_ns} ns is before {earlier} at {earlier_ns} ns"
    )]
    OutOfOrder {
        earlier: &'static str,
        earlier_ns: u64,
        later: &'static str,
        later_ns: u64,
    },
    #[error("VM {vm}: {stops} vCPU stop stamps but {runs} run stamps")]
    VcpuCount {
        vm: String,
        stops: usize,
        runs: usize,
    },
    #[error(
        "the guest's gap ({last_beat_ns} to {first_beat_ns} ns) is not this reboot's pause: {why}"
    )]
    NotThisPause {
        last_beat_ns: u64,
        first_beat_ns: u64,
        why: &'static str,
    },
}

/// VM `vm`'s pause in the reboot of `stamps`, whose guest beat last at `last_beat_ns`
/// before it and first at `first_beat_ns` after.
pub fn pause_segments(
    stamps: &RebootStamps,
    vm: &str,
    last_beat_ns: u64,
    first_beat_ns: u64,
) -> Result<PauseSegments, SegmentError> {
    let not_this = |why| SegmentError::NotThisPause {
        last_beat_ns,
        first_beat_ns,
        why,
    };
    if first_beat_ns <= last_beat_ns {
        return Err(not_this("it does not end after it begins"));
    }
    let v = stamps
        .vms
        .iter()
        .find(|v| v.name == vm)
        .ok_or_else(|| SegmentError::Missing(format!("the stamps of VM {vm}")))?;
    let (first_stop, last_stop) = span(v, &v.vcpu_stops_ns, "vCPU stops")?;
    let (first_run, last_run) = span(v, &v.vcpu_runs_ns, "vCPU runs")?;
    if v.vcpu_stops_ns.len() != v.vcpu_runs_ns.len() {
        return Err(SegmentError::VcpuCount {
            vm: vm.to_string(),
            stops: v.vcpu_stops_ns.len(),
            runs: v.vcpu_runs_ns.len(),
        });
    }
    let at: [u64; 12] = [
        last_beat_ns,
        stamps.pause_requested_ns,
        first_stop,
        last_stop,
        stamps.captured_ns,
        stamps.state_sent_ns,
        stamps.state_received_ns,
        stamps.restored_ns,
        stamps.commit_ns,
        first_run,
        last_run,
        first_beat_ns,
    ];
    for i in 1..11 {
        if at[i] == 0 {
            return Err(SegmentError::Missing(INSTANTS[i].to_string()));
        }
    }
    for i in 1..10 {
        if at[i + 1] < at[i] {
            return Err(SegmentError::OutOfOrder {
                earlier: INSTANTS[i],
                earlier_ns: at[i],
                later: INSTANTS[i + 1],
                later_ns: at[i + 1],
            });
        }
    }
    // Every vCPU of the guest was stopped from `last_stop` until `first_run`: a gap that
    // does not cover that span is some other stall.
    if last_beat_ns > last_stop {
        return Err(not_this("the guest beat after its last vCPU stopped"));
    }
    if first_beat_ns < first_run {
        return Err(not_this("the guest beat before any vCPU ran again"));
    }
    let within = at.map(|t| t.clamp(last_beat_ns, first_beat_ns));
    let mut segments = [0; 11];
    for (i, s) in segments.iter_mut().enumerate() {
        *s = within[i + 1] - within[i];
    }
    Ok(PauseSegments {
        pause_ns: first_beat_ns - last_beat_ns,
        segments,
    })
}

/// The earliest and latest of one VM's vCPU stamps; each vCPU must have one.
fn span(vm: &VmStamps, stamps: &[u64], what: &str) -> Result<(u64, u64), SegmentError> {
    let missing = || SegmentError::Missing(format!("VM {}'s {what}", vm.name));
    if stamps.contains(&0) {
        return Err(missing());
    }
    let first = stamps.iter().copied().min().ok_or_else(missing)?;
    let last = stamps.iter().copied().max().ok_or_else(missing)?;
    Ok((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warm reboot of a `warmvm daemon` on this host with one 2-vCPU reference guest
    /// beating every 100 µs, as recorded: the report's stamps, and the guest's beats on
    /// either side of them in the host's KVM trace (printed to the µs).
    fn recorded() -> RebootStamps {
        RebootStamps {
            pause_requested_ns: 15_580_721_159_015,
            captured_ns: 15_580_721_468_736,
            state_sent_ns: 15_580_721_751_633,
            state_received_ns: 15_580_721_793_566,
            restored_ns: 15_580_722_515_888,
            commit_ns: 15_580_722_750_212,
            vms: vec![VmStamps {
                name: "vm0".into(),
                vcpu_stops_ns: vec![15_580_721_210_060, 15_580_721_233_833],
                vcpu_runs_ns: vec![15_580_722_777_746, 15_580_722_771_113],
            }],
        }
    }
    /// Its last beat came 19 µs after the pause request, before a vCPU stopped.
    const LAST_BEAT: u64 = 15_580_721_178_000;
    const FIRST_BEAT: u64 = 15_580_723_033_000;
    /// The beat before that.
    const BEAT_BEFORE_LAST: u64 = 15_580_721_078_000;

    #[test]
    fn the_segments_follow_the_recorded_stamps_and_add_up_to_the_pause() {
        let s = pause_segments(&recorded(), "vm0", LAST_BEAT, FIRST_BEAT).unwrap();
        assert_eq!(s.pause_ns, 1_855_000);
        assert_eq!(s.segments.iter().sum::<u64>(), s.pause_ns);
        assert_eq!(
            s.segments,
            [
                0,       // the guest still beat after the pause request
                32_060,  // -> first vCPU stopped
                23_773,  // -> last vCPU stopped
                234_903, // -> captured
                282_897, // -> sent
                41_933,  // -> received
                722_322, // -> restored
                234_324, // -> commit
                20_901,  // -> first vCPU running
                6_633,   // -> last vCPU running
                255_254, // -> first beat
            ]
        );
    }

    #[test]
    fn a_guest_that_beat_before_the_request_or_before_its_last_vcpu_ran_counts_only_its_pause() {
        // Had its last beat been the one before, the pause would begin before the request;
        // had it beaten between its two vCPUs running, the pause would end there.
        let first = 15_580_722_775_000;
        let s = pause_segments(&recorded(), "vm0", BEAT_BEFORE_LAST, first).unwrap();
        assert_eq!(s.pause_ns, first - BEAT_BEFORE_LAST);
        assert_eq!(s.segments.iter().sum::<u64>(), s.pause_ns);
        assert_eq!(s.segments[0], 15_580_721_159_015 - BEAT_BEFORE_LAST);
        assert_eq!(s.segments[1], 15_580_721_210_060 - 15_580_721_159_015);
        assert_eq!(s.segments[9], first - 15_580_722_771_113);
        assert_eq!(s.segments[10], 0);
    }

    #[test]
    fn stamps_out_of_order_are_an_error_naming_them() {
        let mut st = recorded();
        st.restored_ns = st.state_received_ns - 1;
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(
            matches!(
                e,
                SegmentError::OutOfOrder {
                    earlier: "state received",
                    later: "restored",
                    ..
                }
            ),
            "{e}"
        );
        // A vCPU that stopped before the pause was requested (a paused VM's).
        let mut st = recorded();
        st.vms[0].vcpu_stops_ns[1] = st.pause_requested_ns - 5;
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(
            matches!(
                e,
                SegmentError::OutOfOrder {
                    earlier: "pause requested",
                    ..
                }
            ),
            "{e}"
        );
        // A vCPU that ran before the commit.
        let mut st = recorded();
        st.vms[0].vcpu_runs_ns[0] = st.commit_ns - 1;
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(
            matches!(
                e,
                SegmentError::OutOfOrder {
                    later: "first vCPU running",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_stamps_are_not_measured() {
        // A report from a build without stamps.
        let e = pause_segments(&RebootStamps::default(), "vm0", LAST_BEAT, FIRST_BEAT);
        assert!(matches!(e, Err(SegmentError::Missing(_))), "{e:?}");
        // An older new VMM: only the old VMM's stamps.
        let mut st = recorded();
        st.state_received_ns = 0;
        st.restored_ns = 0;
        st.commit_ns = 0;
        st.vms[0].vcpu_runs_ns.clear();
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(matches!(e, SegmentError::Missing(_)), "{e}");
        // An older old VMM: only the new VMM's.
        let mut st = recorded();
        st.pause_requested_ns = 0;
        st.captured_ns = 0;
        st.state_sent_ns = 0;
        st.vms[0].vcpu_stops_ns.clear();
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(matches!(e, SegmentError::Missing(_)), "{e}");
        let mut st = recorded();
        st.state_sent_ns = 0;
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert_eq!(e, SegmentError::Missing("state sent".into()));
        // A vCPU that never left its park.
        let mut st = recorded();
        st.vms[0].vcpu_runs_ns[1] = 0;
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(matches!(e, SegmentError::Missing(_)), "{e}");
        // Another VM's stamps.
        let e = pause_segments(&recorded(), "vm1", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(matches!(e, SegmentError::Missing(_)), "{e}");
        // Stops and runs of different vCPU counts.
        let mut st = recorded();
        st.vms[0].vcpu_runs_ns.pop();
        let e = pause_segments(&st, "vm0", LAST_BEAT, FIRST_BEAT).unwrap_err();
        assert!(matches!(e, SegmentError::VcpuCount { .. }), "{e}");
    }

    #[test]
    fn a_gap_that_is_not_the_reboots_pause_is_refused() {
        let st = recorded();
        let last_stop = *st.vms[0].vcpu_stops_ns.iter().max().unwrap();
        let first_run = *st.vms[0].vcpu_runs_ns.iter().min().unwrap();
        for (last, first) in [
            // The guest beat while all its vCPUs were stopped.
            (last_stop + 1, FIRST_BEAT),
            (LAST_BEAT, first_run - 1),
            // A gap well before the reboot.
            (LAST_BEAT - 2_000_000, LAST_BEAT - 1_000_000),
            // Upside down.
            (FIRST_BEAT, LAST_BEAT),
        ] {
            let e = pause_segments(&st, "vm0", last, first).unwrap_err();
            assert!(matches!(e, SegmentError::NotThisPause { .. }), "{e}");
        }
    }
}
