//! The new VMM's side of a warm reboot: prepare, restore without running, and run the
//! guests only once the old VMM has committed (or has provably gone).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warmvm_hypervisor::Hypervisor;
use warmvm_memory::{GuestRam, RamRegion};

use super::commit_flag::CommitFlag;
use super::envelope;
use super::faults::{self, Point};
use super::messages::{
    BlackoutInstants, HandoverState, Msg, Phase, PhaseTimes, RebootReport, RebootStamps,
    VmBlackout, VmStamps,
};
use super::{HandoverError, Violation, COMMIT_FLAG_FD, STDERR_FD};
use crate::channel::{Channel, ChannelError};
use crate::state::legacy::HandoverStateV2;
use crate::state::{disk_fd_name, net_fd_name, LifecycleState, StateError, VmRecord, VmSpec};
use crate::vcpu::monotonic_ns;
use crate::vm::{Vm, VCPU_RESPONSE_TIMEOUT};
use crate::Host;

/// How long the old VMM may take to stage, and between our `Prepared` and its state.
const STAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Tests only: `WARMVM_HANDOVER_FAULT=refuse-state` makes the new VMM refuse the state
/// it is given (a refusal, as opposed to the crashes and hangs of `WARMVM_FAULT`).
#[cfg(feature = "fault-injection")]
pub const FAULT_ENV: &str = "WARMVM_HANDOVER_FAULT";

/// What the new VMM ends up with.
pub struct Adopted {
    pub host: Host,
    pub extra: serde_json::Value,
    pub extra_fds: Vec<(String, File)>,
    pub report: RebootReport,
}

/// A failed take-over: in which phase, and why. No guest ran in this process.
#[derive(Debug, thiserror::Error)]
#[error("{error} (in the {phase} phase)")]
pub struct TakeoverError {
    pub phase: Phase,
    #[source]
    pub error: HandoverError,
}

fn at<E: Into<HandoverError>>(phase: Phase) -> impl Fn(E) -> TakeoverError {
    move |error| TakeoverError {
        phase,
        error: error.into(),
    }
}

/// Take over the VMs the old VMM offers on `channel_fd`. On an error no guest has run
/// here and the old VMM keeps (or, if it is gone, has lost) the VMs; the caller should
/// exit.
pub fn take_over(channel_fd: OwnedFd, state_dir: &Path) -> Result<Adopted, TakeoverError> {
    take_over_checked(channel_fd, state_dir, &|_| Ok(()))
}

/// What the caller says of the settings handed over in `extra` before the commit: an
/// error refuses the handover, so the old VMM keeps its VMs (after the commit it would be
/// too late to say no). [`HandoverError::Incompatible`] says they are of a kind this build
/// does not read (the old VMM reports a refusal), any other error that they are wrong.
pub type ExtraCheck<'a> = &'a dyn Fn(&serde_json::Value) -> Result<(), HandoverError>;

/// [`take_over`], with `check` run on the handed-over `extra` while staging, before this
/// VMM says it is prepared.
pub fn take_over_checked(
    channel_fd: OwnedFd,
    state_dir: &Path,
    check: ExtraCheck<'_>,
) -> Result<Adopted, TakeoverError> {
    // Inherited without close-on-exec: a later reboot's VMM must not get this end too.
    // SAFETY: fcntl with an integer argument on an fd we own.
    unsafe { libc::fcntl(channel_fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let channel = Channel::from_fd(channel_fd);
    let hello = channel
        .set_timeout(Some(STAGE_TIMEOUT))
        .and_then(|()| channel.recv::<Msg>())
        .map_err(at(Phase::Stage))?;
    let (format, sender) = match hello.0 {
        Msg::Hello {
            format_version,
            sender,
        } => (format_version, sender),
        other => {
            return Err(at(Phase::Stage)(Violation::Unexpected {
                expected: "Hello",
                got: format!("{other:?}"),
            }))
        }
    };
    faults::hit(Point::NewHello);
    let kvm = match super::kvm_fd::from_hello(format, hello.1) {
        Ok(kvm) => kvm,
        Err(e) => {
            let e = at(Phase::Stage)(e);
            let _ = channel.send(&Msg::Refused(e.error.to_failure(e.phase)), &[]);
            tracing::error!(error = %e, "taking the VMs over failed; no guest ran here");
            return Err(e);
        }
    };
    let result = match format {
        2 | 3 => Session::new(&channel, format, sender, kvm, check).run(state_dir),
        _ => Err(at(Phase::Stage)(HandoverError::Incompatible {
            sender,
            format,
            min: envelope::MIN_FORMAT_VERSION,
            max: envelope::FORMAT_VERSION,
        })),
    };
    if let Err(e) = &result {
        // The old VMM resumes its VMs when told; a format-2 build only reads text.
        let reply = if format >= 3 {
            Msg::Refused(e.error.to_failure(e.phase))
        } else {
            Msg::Failed(e.error.to_string())
        };
        if !matches!(e.error, HandoverError::PeerGone | HandoverError::Aborted) {
            let _ = channel.send(&reply, &[]);
        }
        tracing::error!(error = %e, "taking the VMs over failed; no guest ran here");
    }
    result
}

/// VMs prepared before the pause, and what came with them.
struct Staged {
    hv: Hypervisor,
    vms: Vec<Arc<Vm>>,
    specs: Vec<VmSpec>,
    extra: serde_json::Value,
    extra_fds: Vec<(String, File)>,
    stderr: Option<File>,
    /// Format 3: the word the new VMM must claim before any guest runs here.
    commit_flag: Option<CommitFlag>,
}

struct Session<'a> {
    channel: &'a Channel,
    format: u32,
    sender: String,
    /// The old VMM's KVM device, if it handed it over.
    kvm: Option<File>,
    check: ExtraCheck<'a>,
    /// This executable, for the report: found while staging, as the hash of the image may
    /// take a moment that the report must not wait for.
    binary: Option<crate::executable::BinaryInfo>,
}

impl<'a> Session<'a> {
    fn new(
        channel: &'a Channel,
        format: u32,
        sender: String,
        kvm: Option<File>,
        check: ExtraCheck<'a>,
    ) -> Self {
        Self {
            channel,
            format,
            sender,
            kvm,
            check,
            binary: None,
        }
    }

    /// Prepare, receive the state, restore every VM without running it, and then run the
    /// guests: in format 3 only once the old VMM has committed (or is provably gone) and
    /// the commit word is claimed; in format 2, which has no commit point, at once, as the
    /// older build that sent it expects.
    fn run(mut self, state_dir: &Path) -> Result<Adopted, TakeoverError> {
        let kvm = self.kvm.take();
        let staged = self.stage(kvm).map_err(at(Phase::Stage))?;
        self.binary = Some(crate::executable::info());
        // Asked before `Prepared`, on which the old VMM pauses the guests: this process
        // would otherwise take the cores from the blackout's start. Finding the host's
        // cores reads cgroup files (tens of microseconds here).
        let have_cores = crate::vm::vcpus_have_cores(&staged.vms);
        // Memory to read the state into, touched now rather than page by page inside the
        // blackout.
        let buf = envelope::prefaulted_beside_heap(super::messages::state_size_hint(&staged.specs));
        faults::hit(Point::NewStaged);
        self.send_prepared().map_err(at(Phase::Stage))?;
        faults::hit(Point::NewPrepared);
        let (msg, files) = self.channel.recv::<Msg>().map_err(at(Phase::Transfer))?;
        let received_ns = monotonic_ns();
        let realtime = super::priority::Realtime::enter();
        let t_transfer = Instant::now();
        // With more vCPU threads than cores, restoring and resuming must not queue
        // behind the host's other processes for a core; each vCPU thread drops back
        // before it runs its guest. (With fewer, the extra system calls cost more than
        // they save.)
        if !have_cores {
            for vm in &staged.vms {
                for h in vm.handles() {
                    h.boost();
                }
            }
        }
        faults::hit(Point::NewState);
        let state = self
            .read_state(msg, files, &staged.specs, buf)
            .map_err(at(Phase::Transfer))?;
        let transfer_us = t_transfer.elapsed().as_micros() as u64;
        let read_ns = monotonic_ns();
        let (lifecycles, restore_us) =
            restore_all(&staged, state.vms, state.captured_at_ns, have_cores)
                .map_err(at(Phase::Restore))?;
        let restored_ns = monotonic_ns();
        faults::hit(Point::NewRestored);
        let t_commit = Instant::now();
        if self.format >= 3 {
            self.commit(&staged)?;
        }
        let commit_ns = monotonic_ns();
        let commit_us = t_commit.elapsed().as_micros() as u64;
        // On the clock of the vCPUs' own stamps, so that the phase ends where the blackout
        // does (the last vCPU back in its guest), not when this thread got to see it.
        let resume_from_ns = monotonic_ns();
        let (blackouts, runs, errors) = resume(&staged.vms, &lifecycles);
        let last_running_ns = blackouts
            .iter()
            .map(|b| b.1)
            .max()
            .unwrap_or(resume_from_ns);
        drop(realtime);
        // The guests run here now: a bug from here on must not unwind past them (the
        // process would end, and they with it). It costs the report at most.
        let reported = super::contain(|| {
            faults::hit(Point::NewRunning);
            let stamps = RebootStamps {
                state_received_ns: received_ns,
                restored_ns,
                commit_ns,
                vms: staged
                    .vms
                    .iter()
                    .zip(runs)
                    .map(|(vm, vcpu_runs_ns)| VmStamps {
                        name: vm.name().to_string(),
                        vcpu_stops_ns: Vec::new(),
                        vcpu_runs_ns,
                    })
                    .collect(),
                // The old VMM's are filled in by the old VMM.
                ..Default::default()
            };
            let mut report = RebootReport {
                stamps,
                ..self.report(
                    &staged,
                    state.bytes,
                    &blackouts,
                    state.host_first_stop_ns,
                    // Consecutive segments of the blackout between its instants; an older
                    // build's state has none of the old side's, so its phases are each
                    // side's own measures.
                    PhaseTimes::consecutive(
                        state.stage_us,
                        BlackoutInstants {
                            first_stop_ns: state.host_first_stop_ns,
                            quiesced_ns: state.host_first_stop_ns + state.quiesce_us * 1000,
                            captured_ns: state.captured_at_ns,
                            read_ns,
                            restored_ns,
                            committed_ns: commit_ns,
                            last_running_ns,
                        },
                    )
                    .unwrap_or(PhaseTimes {
                        stage_us: state.stage_us,
                        quiesce_us: state.quiesce_us,
                        capture_us: state.capture_us,
                        transfer_us,
                        restore_us,
                        commit_us,
                        resume_us: last_running_ns.saturating_sub(resume_from_ns) / 1000,
                    }),
                    errors,
                )
            };
            if let Err(e) = self
                .channel
                .send(&Msg::Resumed(Box::new(report.clone())), &[])
            {
                // The VMs are ours and run: only the old VMM's account of the reboot
                // suffers (it reports one without figures). Said here, and in our own report.
                let why = format!("the report did not reach the old VMM: {e}");
                tracing::error!(error = %e, "the report did not reach the old VMM; it reports this reboot without figures");
                report.errors.push(why);
            }
            faults::hit(Point::NewReported);
            report
        });
        let report = reported.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the guests run in this VMM; its report is lost");
            RebootReport {
                new_pid: std::process::id(),
                state_format: self.format,
                commit_protocol: self.format >= 3,
                to_binary: Some(crate::executable::info()),
                errors: vec![format!(
                    "the takeover hit a bug once the guests ran ({e}): the blackout was not measured"
                )],
                ..Default::default()
            }
        });
        Ok(self.adopted(staged, report, state_dir))
    }

    /// Say `Ready` and wait for the old VMM's decision; on `Commit` (or once it is gone)
    /// claim the guests. Ok means they are ours to run.
    fn commit(&self, staged: &Staged) -> Result<(), TakeoverError> {
        // From here on, the old VMM decides. A closed channel means it is gone after
        // sending the state, and can never run these VMs again: they are ours.
        let decision = match self.channel.send(&Msg::Ready, &[]) {
            Ok(()) => {
                faults::hit(Point::NewReadySent);
                self.await_decision()
            }
            Err(_) => Decision::OldGone,
        };
        if matches!(decision, Decision::Commit | Decision::OldGone) {
            // Our stderr runs through the old VMM until now (see `stderr`): write to the
            // operator's log directly from here on, the old VMM may be gone.
            redirect_stderr(staged.stderr.as_ref());
        }
        match decision {
            Decision::Commit => {}
            Decision::OldGone => tracing::warn!(
                "the old VMM went away after sending the state: it can never run the VMs again, so this VMM takes them"
            ),
            Decision::Abort => return Err(at(Phase::Commit)(HandoverError::Aborted)),
            Decision::Unknown(why) => {
                // Without a decision the old VMM may still run the VMs: never run them here.
                return Err(at(Phase::Commit)(why));
            }
        }
        faults::hit(Point::NewCommit);
        // The claim decides: if the old VMM revoked the handover first (it gave up waiting),
        // the guests must never run here.
        if !staged.commit_flag.as_ref().is_some_and(CommitFlag::claim) {
            return Err(at(Phase::Commit)(HandoverError::Aborted));
        }
        Ok(())
    }

    /// The state the old VMM sent, in this session's format, as one record per VM.
    fn read_state(
        &self,
        msg: Msg,
        mut files: Vec<File>,
        specs: &[VmSpec],
        buf: Vec<u8>,
    ) -> Result<Received, HandoverError> {
        let bytes = state_bytes(msg, &mut files, buf)?;
        let (version, payload) = envelope::open(&bytes)?;
        if version != self.format {
            return Err(Violation::FormatMismatch {
                hello: self.format,
                state: version,
            }
            .into());
        }
        let received = if version >= 3 {
            let s: HandoverState = envelope::decode_payload(payload)?;
            Received {
                bytes: bytes.len() as u64,
                vms: s.vms,
                captured_at_ns: s.captured_at_ns,
                host_first_stop_ns: s.host_first_stop_ns,
                stage_us: s.stage_us,
                quiesce_us: s.quiesce_us,
                capture_us: s.capture_us,
            }
        } else {
            let s: HandoverStateV2 = envelope::decode_payload(payload)?;
            if s.vms.len() != specs.len() {
                return Err(Violation::VmCount {
                    state: s.vms.len(),
                    prepared: specs.len(),
                }
                .into());
            }
            Received {
                bytes: bytes.len() as u64,
                vms: s
                    .vms
                    .into_iter()
                    .zip(specs)
                    .map(|(cap, spec)| cap.into_record(spec.clone()))
                    .collect::<Result<Vec<_>, _>>()?,
                captured_at_ns: s.captured_at_ns,
                host_first_stop_ns: s.host_first_stop_ns,
                stage_us: s.stage_us,
                quiesce_us: s.quiesce_us,
                capture_us: s.capture_us,
            }
        };
        check_refusal_fault()?;
        Ok(received)
    }

    fn send_prepared(&self) -> Result<(), HandoverError> {
        Ok(self.channel.send(
            &Msg::Prepared {
                pid: std::process::id(),
            },
            &[],
        )?)
    }

    /// Receive every VM's spec and fds and prepare each VM (guests still run in the old
    /// VMM), then the extra fds.
    fn stage(&self, kvm: Option<File>) -> Result<Staged, HandoverError> {
        // The old VMM's KVM fd when it sent one: this process may lack the right to open
        // /dev/kvm (a daemon dropped to a user without the kvm group).
        let hv = match kvm {
            Some(file) => Hypervisor::from_file(file),
            None => Hypervisor::open(),
        }
        .map_err(|e| HandoverError::Vm {
            vm: "-".into(),
            err: e.into(),
        })?;
        let mut vms = Vec::new();
        let mut specs = Vec::new();
        loop {
            let (msg, files) = self.channel.recv::<Msg>()?;
            let spec = match msg {
                Msg::StageVm(spec) if self.format >= 3 => *spec,
                Msg::PrepareVm(prep) if self.format == 2 => prep.into_spec(monotonic_ns())?,
                Msg::PrepareDone {
                    extra,
                    extra_fd_names,
                } => {
                    if extra_fd_names.len() != files.len() {
                        return Err(Violation::ExtraFds.into());
                    }
                    let mut extra_fds = Vec::new();
                    let mut stderr = None;
                    let mut commit_flag = None;
                    for (name, file) in extra_fd_names.into_iter().zip(files) {
                        match name.as_str() {
                            STDERR_FD => stderr = Some(file),
                            COMMIT_FLAG_FD => commit_flag = Some(CommitFlag::adopt(file)?),
                            _ => extra_fds.push((name, file)),
                        }
                    }
                    if self.format >= 3 && commit_flag.is_none() {
                        return Err(Violation::NoCommitFlag.into());
                    }
                    (self.check)(&extra)?;
                    return Ok(Staged {
                        hv,
                        vms,
                        specs,
                        extra,
                        extra_fds,
                        stderr,
                        commit_flag,
                    });
                }
                other => {
                    return Err(Violation::Unexpected {
                        expected: "a VM or the end of staging",
                        got: format!("{other:?}"),
                    }
                    .into())
                }
            };
            if vms.iter().any(|v: &Arc<Vm>| v.name() == spec.config.name) {
                return Err(Violation::VmTwice(spec.config.name.clone()).into());
            }
            let name = spec.config.name.clone();
            let vm = adopt_vm(&hv, &spec, files).map_err(|e| match e {
                // KVM or memory refused: said as such, not as a bad state.
                HandoverError::Vm { .. } | HandoverError::State(StateError::Vm { .. }) => e,
                other => Violation::Staging {
                    vm: name,
                    err: Box::new(other),
                }
                .into(),
            })?;
            vms.push(vm);
            specs.push(spec);
        }
    }

    /// Wait, as long as it takes, for the old VMM's decision: giving up without one could
    /// lose VMs the old VMM has just committed.
    fn await_decision(&self) -> Decision {
        if let Err(e) = self.channel.set_timeout(None) {
            return Decision::Unknown(e.into());
        }
        {
            match self.channel.recv::<Msg>() {
                Ok((Msg::Commit, _)) => Decision::Commit,
                Ok((Msg::Abort, _)) => Decision::Abort,
                Ok((other, _)) => Decision::Unknown(
                    Violation::Unexpected {
                        expected: "Commit or Abort",
                        got: format!("{other:?}"),
                    }
                    .into(),
                ),
                Err(ChannelError::PeerGone) => Decision::OldGone,
                Err(e) => Decision::Unknown(e.into()),
            }
        }
    }

    fn report(
        &self,
        staged: &Staged,
        state_bytes: u64,
        blackouts: &[(u64, u64)],
        host_first_stop_ns: u64,
        phases: PhaseTimes,
        errors: Vec<String>,
    ) -> RebootReport {
        let host_last_resume = blackouts.iter().map(|b| b.1).max().unwrap_or(0);
        RebootReport {
            new_pid: std::process::id(),
            from_build: self.sender.clone(),
            to_build: crate::build(),
            // The old VMM fills in its own.
            from_binary: None,
            to_binary: self.binary.clone(),
            host_blackout_us: host_last_resume.saturating_sub(host_first_stop_ns) / 1000,
            phases,
            vms: staged
                .vms
                .iter()
                .zip(blackouts)
                .map(|(vm, &(first_stop, last_resume))| VmBlackout {
                    name: vm.name().to_string(),
                    blackout_us: last_resume.saturating_sub(first_stop) / 1000,
                })
                .collect(),
            state_bytes,
            state_format: self.format,
            commit_protocol: self.format >= 3,
            errors,
            // The caller's, once the guests run.
            stamps: RebootStamps::default(),
        }
    }

    fn adopted(&self, staged: Staged, report: RebootReport, state_dir: &Path) -> Adopted {
        if report.is_measured() {
            tracing::info!(
                vms = staged.vms.len(),
                host_blackout_us = report.host_blackout_us,
                state_format = self.format,
                "took over"
            );
        } else {
            tracing::warn!(
                vms = staged.vms.len(),
                state_format = self.format,
                errors = ?report.errors,
                "took over, but not every step is known to have succeeded: the blackout was not measured"
            );
        }
        Adopted {
            host: Host::adopted(staged.hv, staged.vms, state_dir),
            extra: staged.extra,
            extra_fds: staged.extra_fds,
            report,
        }
    }
}

/// The state as received, whichever format it came in.
struct Received {
    bytes: u64,
    vms: Vec<VmRecord>,
    captured_at_ns: u64,
    host_first_stop_ns: u64,
    stage_us: u64,
    quiesce_us: u64,
    capture_us: u64,
}

enum Decision {
    Commit,
    Abort,
    OldGone,
    Unknown(HandoverError),
}

fn state_bytes(msg: Msg, files: &mut Vec<File>, buf: Vec<u8>) -> Result<Vec<u8>, HandoverError> {
    if !matches!(msg, Msg::State) || files.len() != 1 {
        return Err(match msg {
            Msg::Abort => HandoverError::Aborted,
            other => Violation::Unexpected {
                expected: "State with one memfd",
                got: format!("{other:?} with {} fds", files.len()),
            }
            .into(),
        });
    }
    Ok(envelope::from_sealed_memfd_into(files.remove(0), buf)?)
}

fn check_refusal_fault() -> Result<(), HandoverError> {
    #[cfg(feature = "fault-injection")]
    if std::env::var(FAULT_ENV).is_ok_and(|f| f == "refuse-state") {
        return Err(super::Refusal::InjectedFault.into());
    }
    Ok(())
}

/// Restore every VM (VM-wide state, then every vCPU in parallel on its own thread)
/// without running any. Returns each VM's lifecycle to resume into, and the time taken.
fn restore_all(
    staged: &Staged,
    records: Vec<VmRecord>,
    captured_at_ns: u64,
    spin: bool,
) -> Result<(Vec<LifecycleState>, u64), HandoverError> {
    if records.len() != staged.vms.len() {
        return Err(Violation::VmCount {
            state: records.len(),
            prepared: staged.vms.len(),
        }
        .into());
    }
    // Check everything before restoring anything.
    for (record, spec) in records.iter().zip(&staged.specs) {
        if &record.spec != spec {
            return Err(Violation::SpecMismatch {
                state: record.spec.config.name.clone(),
                staged: spec.config.name.clone(),
            }
            .into());
        }
        if record.lifecycle.is_live() != record.runtime.is_some() {
            return Err(Violation::RuntimeMismatch {
                vm: spec.config.name.clone(),
                lifecycle: record.lifecycle.clone(),
                has_runtime: record.runtime.is_some(),
            }
            .into());
        }
    }
    let t_restore = Instant::now();
    // All VMs' vCPU threads load at once: start every load before finishing any.
    // Spinning for the resume afterwards saves a wake-up only while every vCPU thread
    // has a core of its own (beside this one); beyond that spinners would starve the
    // threads still loading.
    let mut lifecycles = Vec::new();
    let mut loading = Vec::new();
    for (vm, record) in staged.vms.iter().zip(records) {
        if let Some(runtime) = record.runtime {
            loading.push(vm.load(runtime, captured_at_ns, spin)?);
        }
        lifecycles.push(record.lifecycle);
    }
    for load in loading {
        load.finish()?;
    }
    Ok((lifecycles, t_restore.elapsed().as_micros() as u64))
}

/// What [`resume`] returns.
type Resumed = (Vec<(u64, u64)>, Vec<Vec<u64>>, Vec<String>);

/// Let every restored VM go, as it was in the old VMM. Nothing here can give the VMs back:
/// this runs after `Commit`. Returns each VM's (first vCPU stop, last vCPU resume) in ns,
/// each VM's vCPUs' own stamps of leaving their park to run (0 for one still parked, none
/// for a VM that was not running), and what could not be confirmed: a vCPU that did not
/// leave its park within the vCPU response timeout (its VM's figure is then only a lower
/// bound, the time waited).
fn resume(vms: &[Arc<Vm>], lifecycles: &[LifecycleState]) -> Resumed {
    for (vm, lifecycle) in vms.iter().zip(lifecycles) {
        *vm.shared.lifecycle() = lifecycle.to_lifecycle();
        // A paused VM's devices start serving when the VM is resumed.
        if matches!(lifecycle, LifecycleState::Running | LifecycleState::Created) {
            let _ = warmvm_devices::Pausable::resume(&vm.shared.devices); // an order: never fails
        }
        if *lifecycle == LifecycleState::Running {
            for h in vm.handles() {
                #[cfg(feature = "fault-injection")]
                h.arm_resume_fault();
                h.request_run();
            }
        }
    }
    let mut times = Vec::new();
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    let deadline = Instant::now() + VCPU_RESPONSE_TIMEOUT;
    for (vm, lifecycle) in vms.iter().zip(lifecycles) {
        let mut last_resume = 0;
        let mut vm_runs = Vec::new();
        if *lifecycle == LifecycleState::Running {
            for h in vm.handles() {
                if h.wait_running(deadline.saturating_duration_since(Instant::now())) {
                    let ran = h.park_times().1;
                    last_resume = last_resume.max(ran);
                    vm_runs.push(ran);
                    continue;
                }
                vm_runs.push(0);
                // Still parked: its stop has not ended, so its VM's blackout is at least
                // the time until now.
                last_resume = last_resume.max(monotonic_ns());
                tracing::error!(
                    vm = %vm.name(),
                    vcpu = h.id,
                    "a vCPU did not leave its park after the handover: its VM's blackout is not known"
                );
                errors.push(format!(
                    "VM {}: vCPU {} did not leave its park within {} ms of the order to run; its blackout is at least the figure given",
                    vm.name(),
                    h.id,
                    VCPU_RESPONSE_TIMEOUT.as_millis()
                ));
            }
        }
        times.push((vm.first_stop_ns(), last_resume));
        runs.push(vm_runs);
    }
    (times, runs, errors)
}

/// From now on write to the old VMM's stderr directly, not through its relay (which ends
/// with the old VMM).
fn redirect_stderr(stderr: Option<&File>) {
    if let Some(f) = stderr {
        // SAFETY: dup2 onto fd 2 of two fds that are open; it changes nothing else.
        if unsafe { libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot take over the old VMM's stderr");
        }
    }
}

/// Build a VM over RAM memfds received from the old VMM, with parked vCPU threads.
fn adopt_vm(
    hv: &Hypervisor,
    spec: &VmSpec,
    mut files: Vec<File>,
) -> Result<Arc<Vm>, HandoverError> {
    let bad = |v: Violation| HandoverError::from(v);
    let vm_err = |err: crate::VmError| HandoverError::Vm {
        vm: spec.config.name.clone(),
        err,
    };
    if files.len() != spec.ram.len() + 1 + spec.fds.len() {
        return Err(bad(Violation::FdCount {
            got: files.len(),
            ram: spec.ram.len(),
            named: spec.fds.len(),
        }));
    }
    // The named fd table: each device takes its fd by name, never by position.
    let mut named: std::collections::HashMap<String, File> = HashMap::new();
    for (name, file) in spec.fds.iter().zip(files.split_off(spec.ram.len() + 1)) {
        if named.insert(name.clone(), file).is_some() {
            return Err(bad(Violation::FdTwice(name.clone())));
        }
    }
    let mut disk_files = Vec::new();
    for i in 0..spec.config.disks.len() {
        let name = disk_fd_name(i);
        disk_files.push(named.remove(&name).ok_or_else(|| {
            bad(Violation::FdMissing {
                device: format!("disk {i}"),
                name,
            })
        })?);
    }
    let mut taps = Vec::new();
    for i in 0..spec.config.nets.len() {
        let name = net_fd_name(i);
        taps.push(named.remove(&name).ok_or_else(|| {
            bad(Violation::FdMissing {
                device: format!("network interface {i}"),
                name,
            })
        })?);
    }
    if let Some(name) = named.keys().next() {
        return Err(bad(Violation::FdUnused(name.clone())));
    }
    spec.check()?;
    let log = files
        .pop()
        .ok_or_else(|| HandoverError::NoConsoleLog(spec.config.name.clone()))?;
    let regions = spec
        .ram
        .iter()
        .zip(files)
        .map(|(slot, file)| RamRegion {
            guest_addr: slot.guest_addr,
            size: slot.size,
            file,
        })
        .collect();
    let ram = GuestRam::adopt(regions, spec.hugepages).map_err(|e| vm_err(e.into()))?;
    let host_files = crate::virtio::HostFiles {
        disks: disk_files,
        taps,
    };
    Ok(Arc::new(Vm::build(hv, spec, ram, log, host_files)?))
}
