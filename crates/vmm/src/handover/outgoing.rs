//! The old VMM's side of a warm reboot: stage, quiesce, capture, transfer, and then the
//! decision — commit, or abort and resume its own VMs.
//!
//! The one rule: until `Commit` has been handed to the channel, the new VMM has not run a
//! guest instruction, so any failure ends with the new VMM killed and reaped and the VMs
//! resumed here. Once `Commit` is sent, this VMM never runs these VMs again, whatever
//! happens next.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::commit_flag::CommitFlag;
use super::envelope;
use super::faults::{self, Point};
use super::messages::{
    state_size_hint, HandoverState, Msg, Phase, PhaseTimes, RebootReport, RebootStamps,
};
use super::stderr::StderrRelay;
use super::{HandoverError, Late, Violation, COMMIT_FLAG_FD, STDERR_FD};
use crate::channel::{Channel, ChannelError};
use crate::vcpu::monotonic_ns;
use crate::vm::{Lifecycle, Vm};
use crate::Host;

/// The fd number the new VMM finds its end of the channel at.
pub const CHANNEL_FD: RawFd = 3;

/// How long staging may take by default: starting the new VMM and preparing every VM
/// while the guests still run.
pub const DEFAULT_STAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guests may be frozen by default before the new VMM says `Ready`.
pub const DEFAULT_READY_BUDGET: Duration = Duration::from_millis(500);
/// How long the old VMM waits, after committing, for the new one's report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start the new VMM and what else to give it.
pub struct RebootOptions {
    /// The binary to run: this one to rejuvenate, another build to upgrade.
    pub binary: PathBuf,
    /// Its arguments; `--takeover-fd 3` is appended.
    pub args: Vec<OsString>,
    /// How long starting the new VMM and staging every VM may take (guests run meanwhile).
    pub stage_timeout: Duration,
    /// From the first vCPU stopping to the new VMM's `Ready`; past it the old VMM aborts
    /// and resumes its VMs, so no guest is frozen longer than this plus the roll-back.
    pub ready_budget: Duration,
    /// Opaque data for the new VMM (e.g. the daemon's settings).
    pub extra: serde_json::Value,
    /// Named fds for the new VMM (e.g. the API socket).
    pub extra_fds: Vec<(String, RawFd)>,
    /// Extra environment for the new VMM.
    pub env: Vec<(OsString, OsString)>,
    /// Called once the new VMM is prepared, just before the guests are paused (the caller
    /// may e.g. stop taking requests for the blackout, so that none is cut off by it). It
    /// runs while the guests still run and before the ready budget starts.
    pub before_blackout: Option<Box<dyn Fn() + Send + Sync>>,
}

impl RebootOptions {
    /// Options with the default timeouts and nothing extra.
    pub fn new(binary: PathBuf, args: Vec<OsString>) -> Self {
        Self {
            binary,
            args,
            stage_timeout: DEFAULT_STAGE_TIMEOUT,
            ready_budget: DEFAULT_READY_BUDGET,
            extra: serde_json::Value::Null,
            extra_fds: Vec::new(),
            env: Vec::new(),
            before_blackout: None,
        }
    }
}

/// A failed warm reboot: in which phase, and why. The VMs run on in this VMM.
#[derive(Debug, thiserror::Error)]
#[error("{error} (in the {phase} phase)")]
pub struct RebootError {
    pub phase: Phase,
    #[source]
    pub error: HandoverError,
}

impl RebootError {
    pub fn is_refusal(&self) -> bool {
        self.error.is_refusal()
    }
}

/// A completed warm reboot: the report, and the new VMM, which now runs every VM.
pub struct Handed {
    pub report: RebootReport,
    pub child: Option<Child>,
}

/// Hand every VM of `host` to a new VMM process. On success the VMs are marked handed over
/// and must not be touched again; the caller should exit soon. On failure the VMs run on
/// in this process, as they were.
pub fn warm_reboot(host: &Host, opts: &RebootOptions) -> Result<Handed, RebootError> {
    let vms: Vec<Arc<Vm>> = host
        .vms()
        .iter()
        .filter(|v| v.lifecycle() != Lifecycle::HandedOver)
        .cloned()
        .collect();
    let t_stage = Instant::now();
    let stage_deadline = t_stage + opts.stage_timeout;
    let flag = CommitFlag::create().map_err(at(Phase::Spawn))?;
    let (channel, mut peer) = spawn(opts).map_err(at(Phase::Spawn))?;
    faults::hit(Point::OldSpawned);
    let kvm_fd = host.hypervisor().raw_fd();
    let staged = stage(&channel, &vms, opts, &flag, kvm_fd).and_then(|()| {
        faults::hit(Point::OldStaged);
        match recv_by(&channel, stage_deadline, "Prepared")? {
            Msg::Prepared { .. } => Ok(()),
            other => Err(unexpected(Phase::Stage, "Prepared", other)),
        }
    });
    if let Err(error) = staged {
        // The guests never stopped: nothing to roll back.
        let error = peer.stop_and_explain(said_why(&channel, Phase::Stage, error));
        tracing::error!(error = %error, "warm reboot failed while staging; the VMs run on");
        return Err(at(Phase::Stage)(error));
    }
    faults::hit(Point::OldPrepared);
    // The state's memory, allocated and touched now: faulting it in page by page inside
    // the blackout cost more than encoding the state.
    let hint = state_size_hint(&vms.iter().map(|vm| vm.spec()).collect::<Vec<_>>());
    let out = match envelope::StateMemfd::create(hint) {
        Ok(memfd) => (envelope::prefaulted_beside_heap(hint), memfd),
        Err(e) => {
            let error = peer.stop_and_explain(HandoverError::from(e));
            tracing::error!(error = %error, "warm reboot failed while staging; the VMs run on");
            return Err(at(Phase::Stage)(error));
        }
    };
    let stage_us = t_stage.elapsed().as_micros() as u64;
    if let Some(hook) = &opts.before_blackout {
        hook();
    }

    // Asked before the pause: finding the host's cores reads cgroup files.
    let boost = !crate::vm::vcpus_have_cores(&vms);
    // The guests stop here. Until `Commit` is sent, every failure resumes them here.
    let realtime = super::priority::Realtime::enter();
    let t_quiesce = Instant::now();
    let ready_deadline = t_quiesce + opts.ready_budget;
    let host_first_stop = monotonic_ns();
    // The step reached, for a panic's report.
    let reached = std::cell::Cell::new(Phase::Quiesce);
    // What `ready` hands on: the state's size, the phases, and when the capture ended and
    // the state was sent (CLOCK_MONOTONIC ns).
    let ready = || -> Result<(u64, PhaseTimes, u64, u64), RebootError> {
        quiesce(&vms, boost, ready_deadline).map_err(at(Phase::Quiesce))?;
        faults::hit(Point::OldQuiesced);
        let quiesce_us = t_quiesce.elapsed().as_micros() as u64;
        let t_capture = Instant::now();
        reached.set(Phase::Capture);
        let records = vms
            .iter()
            .map(|vm| vm.save(ready_deadline))
            .collect::<Result<Vec<_>, _>>()
            .map_err(at(Phase::Capture))?;
        let phases = PhaseTimes {
            stage_us,
            quiesce_us,
            capture_us: t_capture.elapsed().as_micros() as u64,
            ..Default::default()
        };
        let captured_ns = monotonic_ns();
        let state = HandoverState {
            sender: crate::build(),
            captured_at_ns: captured_ns,
            host_first_stop_ns: host_first_stop,
            vms: records,
            quiesce_us,
            capture_us: t_capture.elapsed().as_micros() as u64,
            stage_us,
        };
        faults::hit(Point::OldCaptured);
        if Instant::now() >= ready_deadline {
            // The new VMM could not be ready in time: don't make it try.
            return Err(at(Phase::Capture)(late(opts.ready_budget, "the capture")));
        }
        reached.set(Phase::Transfer);
        let (mut buf, memfd) = out;
        let bytes = envelope::encode_into(
            &envelope::HANDOVER,
            &state,
            envelope::FORMAT_VERSION,
            &mut buf,
        )
        .and_then(|()| memfd.seal(&buf).map(|memfd| (buf.len(), memfd)))
        .map_err(HandoverError::from)
        .and_then(|(len, memfd)| {
            channel.send(&Msg::State, &[memfd.as_raw_fd()])?;
            Ok(len as u64)
        })
        .map_err(at(Phase::Transfer))?;
        let sent_ns = monotonic_ns();
        faults::hit(Point::OldStateSent);
        if Instant::now() >= ready_deadline {
            return Err(at(Phase::Restore)(late(
                opts.ready_budget,
                "sending the state",
            )));
        }
        reached.set(Phase::Restore);
        match recv_by(&channel, ready_deadline, "Ready").map_err(at(Phase::Restore))? {
            Msg::Ready => {}
            other => {
                return Err(at(Phase::Restore)(unexpected(
                    Phase::Restore,
                    "Ready",
                    other,
                )))
            }
        }
        // Read in time, or it does not count: the budget bounds the blackout, whichever
        // VMM was late.
        if Instant::now() > ready_deadline {
            return Err(at(Phase::Restore)(late(opts.ready_budget, "the restore")));
        }
        faults::hit(Point::OldReady);
        Ok((bytes, phases, captured_ns, sent_ns))
    };
    // Before `Commit` a panic here is a failure like any other: the guests resume here.
    let ready = super::contain(ready).unwrap_or_else(|e| Err(at(reached.get())(e)));
    // Every way back ends the same: the new VMM killed and reaped (it cannot have claimed
    // the guests: `Commit` was not sent, or the claim was revoked), then the guests resumed
    // here, then the report of what happened.
    let mut take_back = |failed: RebootError| -> RebootError {
        let ended = peer.kill_and_wait(!failed.error.is_timeout());
        roll_back(&vms);
        let failed = at(failed.phase)(peer.explain(failed.error, ended));
        tracing::error!(error = %failed, "warm reboot aborted; the VMs run on in this VMM");
        failed
    };
    let (state_bytes, phases, captured_ns, sent_ns) = match ready {
        Ok(ready) => ready,
        Err(failed) => {
            // Tell the new VMM to discard its VMs (it is killed either way). It has not
            // been sent `Commit`, so it cannot have claimed them; revoking makes sure it
            // never will.
            flag.revoke();
            let _ = channel.send(&Msg::Abort, &[]);
            let error = said_why(&channel, failed.phase, failed.error);
            return Err(take_back(at(failed.phase)(error)));
        }
    };
    if let Err(e) = channel.send(&Msg::Commit, &[]) {
        // Not delivered: the new VMM's end is closed, so it never saw `Commit`.
        flag.revoke();
        return Err(take_back(at(Phase::Commit)(e)));
    }
    // The new VMM claims the guests (commit_flag) before it lets them run and reports
    // once they do. No report within the budget (or a panic here): if the claim has not
    // been made, revoke it, and the VMs are ours again; if it has, they are the new
    // VMM's, whatever became of it.
    let first_report = super::contain(|| {
        faults::hit(Point::OldCommitted);
        recv_by(&channel, Instant::now() + opts.ready_budget, "report")
    })
    .and_then(|received| received);
    let report = match first_report {
        Ok(Msg::Resumed(report)) => Some(*report),
        other if flag.revoke() => {
            let error = match other {
                Ok(msg) => unexpected(Phase::Resume, "its report", msg),
                Err(e) => e,
            };
            return Err(take_back(at(Phase::Resume)(error)));
        }
        _ => None,
    };
    // Committed and claimed: the VMs are the new VMM's now. Nothing from here on may kill
    // the new VMM or touch the guests, a panic included: it only costs the report, which
    // then says how long the guests were stopped is not known here, never 0 µs.
    let new_pid = peer.pid;
    // Read after the commit, not in the blackout: the old vCPU threads stay parked for good.
    let old_stamps = |stamps: &mut RebootStamps| {
        let stops = vms.iter().map(|vm| {
            let stops = vm.handles().iter().map(|h| h.park_times().0).collect();
            (vm.name().to_string(), stops)
        });
        stamps.fill_old_side(host_first_stop, captured_ns, sent_ns, stops);
    };
    let unknown = |why: String| RebootReport {
        new_pid,
        from_build: crate::build(),
        phases: phases.clone(),
        state_bytes,
        state_format: envelope::FORMAT_VERSION,
        commit_protocol: true,
        from_binary: Some(crate::executable::info()),
        errors: vec![why],
        ..Default::default()
    };
    let report = super::contain(|| {
        for vm in &vms {
            *vm.shared.lifecycle() = Lifecycle::HandedOver;
        }
        drop(realtime);
        // All that is left for this VMM is cleanup (unmapping guest RAM, tens of ms per
        // GiB here): it must not take CPU from the guests that now run in the new one.
        // SAFETY: setpriority only lowers the calling thread's scheduling priority.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        let report = match report {
            Some(report) => report,
            None => match recv_by(&channel, Instant::now() + REPORT_TIMEOUT, "report") {
                Ok(Msg::Resumed(report)) => *report,
                other => {
                    let why = match other {
                        Ok(msg) => format!("it answered {msg:?}"),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!(error = %why,
                        "the new VMM took the guests but sent no report: this reboot has no blackout figure");
                    unknown(format!(
                        "the new VMM took the VMs over but sent no report ({why}): the blackout was not measured"
                    ))
                }
            },
        };
        let mut report = RebootReport {
            from_binary: Some(crate::executable::info()),
            ..report
        };
        old_stamps(&mut report.stamps);
        if !report.is_measured() {
            tracing::warn!(errors = ?report.errors, "warm reboot done, but not every step is known to have succeeded");
        }
        faults::hit(Point::OldDone);
        report
    })
    .unwrap_or_else(|e| {
        for vm in &vms {
            *vm.shared.lifecycle() = Lifecycle::HandedOver;
        }
        tracing::error!(error = %e, "after the commit: the VMs are the new VMM's");
        unknown(format!(
            "the old VMM hit a bug after the commit ({e}): the blackout was not measured"
        ))
    });
    let child = peer.release();
    Ok(Handed { report, child })
}

/// A failure in `phase`, or in the phase the new VMM says it failed in.
fn at<E: Into<HandoverError>>(phase: Phase) -> impl Fn(E) -> RebootError {
    move |error| {
        let error = error.into();
        RebootError {
            phase: match &error {
                HandoverError::Peer(f) => f.phase,
                _ => phase,
            },
            error,
        }
    }
}

fn unexpected(phase: Phase, wanted: &'static str, got: Msg) -> HandoverError {
    match got {
        Msg::Refused(f) => HandoverError::Peer(f),
        Msg::Failed(text) => HandoverError::from_legacy_text(phase, text),
        other => Violation::Unexpected {
            expected: wanted,
            got: format!("{other:?}"),
        }
        .into(),
    }
}

/// A channel that broke while we were sending may still hold the reason the new VMM gave
/// before it closed its end (e.g. an older build refusing our state format): prefer it.
fn said_why(channel: &Channel, phase: Phase, error: HandoverError) -> HandoverError {
    if !error.channel_broke() {
        return error;
    }
    match recv_by(channel, Instant::now() + Duration::from_millis(1), "reason") {
        Ok(msg @ (Msg::Refused(_) | Msg::Failed(_))) => unexpected(phase, "", msg),
        _ => error,
    }
}

/// The ready budget ran out while this VMM itself was busy with `step`.
fn late(budget: Duration, step: &'static str) -> HandoverError {
    Late::Budget {
        budget_ms: budget.as_millis(),
        step,
    }
    .into()
}

/// How long a receive may block once a message is known to be there (it never should).
const RECV_SAFETY_TIMEOUT: Duration = Duration::from_secs(1);

/// Receive one message by `deadline`. The wait is on a high-resolution timer (the receive
/// timeout would round up to a scheduler tick), and nothing is waited for once the deadline
/// has passed: a message only read after it was not received in time.
fn recv_by(channel: &Channel, deadline: Instant, what: &'static str) -> Result<Msg, HandoverError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Late::NoAnswer(what).into());
        }
        if channel.wait_readable(left)? {
            break;
        }
    }
    channel.set_timeout(Some(RECV_SAFETY_TIMEOUT))?;
    match channel.recv::<Msg>() {
        Ok((msg, _)) => Ok(msg),
        Err(ChannelError::Timeout) => Err(Late::NoAnswer(what).into()),
        Err(e) => Err(e.into()),
    }
}

/// The new VMM process, as the old one keeps it until the handover is over.
struct Peer {
    child: Option<Child>,
    pid: u32,
    relay: StderrRelay,
}

impl Peer {
    /// Kill the new VMM unless it has already exited, and wait until it is gone. Returns
    /// how it ended if it ended by itself.
    fn kill_and_wait(&mut self, grace: bool) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // A VMM that closed its channel or said it failed is usually exiting: give it a
        // moment to be reaped with its own status rather than ours. A hung one gets none.
        let grace = if grace { 20 } else { 0 };
        let until = Instant::now() + Duration::from_millis(grace);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(1)),
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn stop_and_explain(&mut self, error: HandoverError) -> HandoverError {
        let ended = self.kill_and_wait(!error.is_timeout());
        self.explain(error, ended)
    }

    /// Say what became of the new VMM when the channel alone cannot: it exited (with what
    /// status, and its last output), rather than an I/O error on the channel. A VMM that
    /// said why it gave up is quoted instead.
    fn explain(&self, error: HandoverError, ended: Option<ExitStatus>) -> HandoverError {
        let channel_broke = error.channel_broke();
        match ended {
            Some(status) if channel_broke => {
                self.relay.wait_closed(Duration::from_millis(200));
                HandoverError::NewVmmExited {
                    pid: self.pid,
                    how: describe(status),
                    stderr_tail: self.relay.tail(),
                }
            }
            _ => error,
        }
    }

    /// Let the new VMM outlive this handle (it runs the VMs now).
    fn release(mut self) -> Option<Child> {
        self.child.take()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill_and_wait(false);
    }
}

fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        // SAFETY: strsignal returns a pointer to a static (or thread-local) string.
        let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) };
        format!("was killed by signal {sig} ({})", name.to_string_lossy())
    } else {
        format!("ended ({status})")
    }
}

fn spawn(opts: &RebootOptions) -> Result<(Channel, Peer), HandoverError> {
    let (channel, child_end) = Channel::pair()?;
    let mut cmd = Command::new(&opts.binary);
    // Whatever file it runs (/proc/self/exe, another build's path), the new VMM is called
    // warmvm: `pidof warmvm` finds it by this argv[0], and it names itself after it.
    cmd.arg0(crate::executable::PROCESS_NAME)
        .args(&opts.args)
        .arg("--takeover-fd")
        .arg(CHANNEL_FD.to_string())
        .stderr(Stdio::piped());
    // Which path it was started from (a symlink, say), which argv[0] no longer tells.
    cmd.env(crate::executable::STARTED_AS_ENV, &opts.binary);
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let child_fd = child_end.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, which
    // is async-signal-safe; dup2 also clears close-on-exec on the new descriptor.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(child_fd, CHANNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Seccomp filters survive execve and forbid forks: the new VMM is started by the
    // helper thread that runs outside them, and installs its own.
    let spawned = warmvm_sandbox::outside(move || cmd.spawn())
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    let mut child = spawned.map_err(|err| HandoverError::Spawn {
        binary: opts.binary.display().to_string(),
        err,
    })?;
    drop(child_end);
    let pid = child.id();
    let relay = match child.stderr.take() {
        Some(pipe) => StderrRelay::start(pipe),
        None => StderrRelay::start(std::io::empty()),
    };
    Ok((
        channel,
        Peer {
            child: Some(child),
            pid,
            relay,
        },
    ))
}

pub(crate) fn stage(
    channel: &Channel,
    vms: &[Arc<Vm>],
    opts: &RebootOptions,
    flag: &CommitFlag,
    kvm_fd: RawFd,
) -> Result<(), HandoverError> {
    // With this process's KVM device: the new VMM need not be allowed to open /dev/kvm.
    // Older builds drop the fd unread and open the device themselves.
    channel.send(
        &Msg::Hello {
            format_version: envelope::FORMAT_VERSION,
            sender: crate::build(),
        },
        &[kvm_fd],
    )?;
    for vm in vms {
        let ram = vm.shared.ram.regions();
        let log = vm
            .shared
            .devices
            .console_log_file()
            .ok_or_else(|| HandoverError::NoConsoleLog(vm.name().to_string()))?;
        let mut fds: Vec<RawFd> = ram.iter().map(|r| r.file.as_raw_fd()).collect();
        fds.push(log.as_raw_fd());
        // The VM's named fds, in the order `spec.fds` names them (disk0, disk1, ...).
        let host_files =
            vm.shared
                .devices
                .virtio_host_files()
                .map_err(|err| HandoverError::Io {
                    what: format!("VM {}: cannot duplicate a disk fd", vm.name()),
                    err,
                })?;
        fds.extend(host_files.iter().map(|f| f.as_raw_fd()));
        channel.send(&Msg::StageVm(Box::new(vm.spec())), &fds)?;
    }
    let mut names: Vec<String> = opts.extra_fds.iter().map(|(n, _)| n.clone()).collect();
    let mut fds: Vec<RawFd> = opts.extra_fds.iter().map(|(_, fd)| *fd).collect();
    names.push(COMMIT_FLAG_FD.to_string());
    fds.push(flag.file().as_raw_fd());
    // SAFETY: F_GETFD only reads the flags of fd 2, failing if it is not open.
    if unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_GETFD) } >= 0 {
        names.push(STDERR_FD.to_string());
        fds.push(libc::STDERR_FILENO);
    }
    Ok(channel.send(
        &Msg::PrepareDone {
            extra: opts.extra.clone(),
            extra_fd_names: names,
        },
        &fds,
    )?)
}

/// Park every vCPU of every live VM; each saves its own state the moment it has parked
/// (see [`Vm::park_and_save`]).
fn quiesce(vms: &[Arc<Vm>], boost: bool, deadline: Instant) -> Result<(), HandoverError> {
    for vm in vms {
        vm.park_and_save(boost);
    }
    for vm in vms {
        for h in vm.handles() {
            let left = deadline.saturating_duration_since(Instant::now());
            if !h.wait_parked(left) {
                return Err(Late::VcpuNotStopped {
                    vm: vm.name().to_string(),
                    id: h.id,
                }
                .into());
            }
        }
    }
    Ok(())
}

/// Let the guests run here again, as they were before the attempt.
fn roll_back(vms: &[Arc<Vm>]) {
    for vm in vms {
        // A paused VM's devices stay paused until the VM is resumed.
        if matches!(vm.lifecycle(), Lifecycle::Running | Lifecycle::Created) {
            let _ = warmvm_devices::Pausable::resume(&vm.shared.devices); // an order: never fails
        }
        if vm.lifecycle() == Lifecycle::Running {
            for h in vm.handles() {
                h.request_run();
            }
        }
    }
}
