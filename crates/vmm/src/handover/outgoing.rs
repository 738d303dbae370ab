//! The old VMM's side of a warm reboot: stage, quiesce, capture, transfer, and roll back
//! if the new VMM does not take over.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::envelope;
use super::faults::{hit, Point};
use super::state::{HandoverState, HandoverStateV1, Msg, VmCapture, VmPrepare};
use super::{HandoverError, RebootReport, EMIT_FORMAT_ENV};
use crate::vcpu::monotonic_ns;
use crate::vm::{Lifecycle, Vm, VCPU_RESPONSE_TIMEOUT};
use crate::Host;

/// The fd number the new VMM finds its end of the channel at.
pub const CHANNEL_FD: RawFd = 3;

/// How to start the new VMM and what else to give it.
pub struct RebootOptions {
    /// The binary to run: this one to rejuvenate, another build to upgrade.
    pub binary: PathBuf,
    /// Its arguments; `--takeover-fd 3` is appended.
    pub args: Vec<OsString>,
    /// How long the new VMM may take to prepare, and then to resume the guests.
    pub timeout: Duration,
    /// Opaque data for the new VMM (e.g. the daemon's settings).
    pub extra: serde_json::Value,
    /// Named fds for the new VMM (e.g. the API socket).
    pub extra_fds: Vec<(String, RawFd)>,
    /// Extra environment for the new VMM.
    pub env: Vec<(OsString, OsString)>,
}

/// A completed warm reboot: the report, and the new VMM, which now runs every VM.
pub struct Handed {
    pub report: RebootReport,
    pub child: Child,
}

/// Hand every live VM of `host` to a new VMM process. On success the VMs are marked
/// handed over and must not be touched again; the caller should exit soon. On failure the
/// VMs run on in this process, as they were.
pub fn warm_reboot(host: &Host, opts: &RebootOptions) -> Result<Handed, HandoverError> {
    let vms: Vec<Arc<Vm>> = host
        .vms()
        .iter()
        .filter(|v| {
            matches!(
                v.lifecycle(),
                Lifecycle::Running | Lifecycle::Paused | Lifecycle::Created
            )
        })
        .cloned()
        .collect();
    let t_stage = Instant::now();
    let (channel, child_end) = Channel::pair()?;
    let mut cmd = Command::new(&opts.binary);
    cmd.args(&opts.args)
        .arg("--takeover-fd")
        .arg(CHANNEL_FD.to_string());
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
    let child = cmd.spawn().map_err(|err| HandoverError::Spawn {
        binary: opts.binary.display().to_string(),
        err,
    })?;
    drop(child_end);
    let mut guard = ChildGuard(Some(child));
    channel.set_timeout(Some(opts.timeout))?;

    stage(&channel, &vms, opts)?;
    match channel.recv::<Msg>()?.0 {
        Msg::Prepared { .. } => {}
        Msg::Failed(why) => return Err(HandoverError::NewVmmFailed(why)),
        other => {
            return Err(HandoverError::BadState(format!(
                "expected Prepared, got {other:?}"
            )))
        }
    }
    let stage_us = t_stage.elapsed().as_micros() as u64;

    // The guests stop here. From now on every error path resumes them.
    let realtime = super::priority::Realtime::enter();
    let t_quiesce = Instant::now();
    let host_first_stop = monotonic_ns();
    let result = quiesce(&vms).and_then(|()| {
        let quiesce_us = t_quiesce.elapsed().as_micros() as u64;
        let t_capture = Instant::now();
        let captures = capture(&vms)?;
        let mut state = HandoverState {
            sender: crate::build(),
            captured_at_ns: monotonic_ns(),
            host_first_stop_ns: host_first_stop,
            vms: captures,
            quiesce_us,
            capture_us: 0,
            stage_us,
        };
        state.capture_us = t_capture.elapsed().as_micros() as u64;
        let bytes = match std::env::var(EMIT_FORMAT_ENV).as_deref() {
            Ok("1") => envelope::encode(
                &HandoverStateV1 {
                    sender: &state.sender,
                    captured_at_ns: state.captured_at_ns,
                    host_first_stop_ns: state.host_first_stop_ns,
                    vms: &state.vms,
                },
                1,
            )?,
            _ => envelope::encode(&state, envelope::FORMAT_VERSION)?,
        };
        let memfd = envelope::to_sealed_memfd(&bytes)?;
        channel.send(&Msg::State, &[memfd.as_raw_fd()])?;
        match channel.recv::<Msg>()?.0 {
            Msg::Resumed(report) => Ok(report),
            Msg::Failed(why) => Err(HandoverError::NewVmmFailed(why)),
            other => Err(HandoverError::BadState(format!(
                "expected Resumed, got {other:?}"
            ))),
        }
    });
    drop(realtime);
    match result {
        Ok(report) => {
            for vm in &vms {
                *vm.shared.lifecycle() = Lifecycle::HandedOver;
            }
            // All that is left for this VMM is cleanup (unmapping guest RAM, tens of ms per
            // GiB here): it must not take CPU from the guests that now run in the new one.
            // SAFETY: setpriority only lowers the calling thread's scheduling priority.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let child = guard.0.take().ok_or(HandoverError::PeerGone)?;
            Ok(Handed { report, child })
        }
        Err(e) => {
            // The new VMM must be gone before the guests run here again: two VMMs running
            // the same RAM would corrupt it.
            guard.kill_and_wait();
            roll_back(&vms);
            tracing::error!(error = %e, "warm reboot failed; the VMs run on in this VMM");
            Err(e)
        }
    }
}

/// Kills the new VMM unless the handover succeeded.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn kill_and_wait(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_wait();
    }
}

fn stage(channel: &Channel, vms: &[Arc<Vm>], opts: &RebootOptions) -> Result<(), HandoverError> {
    channel.send(
        &Msg::Hello {
            format_version: envelope::FORMAT_VERSION,
            sender: crate::build(),
        },
        &[],
    )?;
    for vm in vms {
        let ram = vm.shared.ram.regions();
        let log =
            vm.shared.devices.console_log_file().ok_or_else(|| {
                HandoverError::Io(format!("VM {}: console log has no fd", vm.name()))
            })?;
        let mut fds: Vec<RawFd> = ram.iter().map(|r| r.file.as_raw_fd()).collect();
        fds.push(log.as_raw_fd());
        let prep = VmPrepare {
            config: vm.config.clone(),
            protocol: vm.protocol.to_string(),
            status_addr: vm.status_addr.map(|a| a.0),
            ram: ram.iter().map(|r| (r.guest_addr, r.size)).collect(),
            hugepages: vm.shared.ram.hugepages(),
            cpuids: vm.vcpu_cpuids(),
            linux_devices: vm.linux_devices,
            console_log: vm.console_log.clone(),
            age_ms: vm.shared.created_at.elapsed().as_millis() as u64,
        };
        channel.send(&Msg::PrepareVm(Box::new(prep)), &fds)?;
    }
    let (names, fds): (Vec<String>, Vec<RawFd>) = opts.extra_fds.iter().cloned().unzip();
    channel.send(
        &Msg::PrepareDone {
            extra: opts.extra.clone(),
            extra_fd_names: names,
        },
        &fds,
    )
}

fn quiesce(vms: &[Arc<Vm>]) -> Result<(), HandoverError> {
    // Each vCPU thread saves its own state the moment it has parked: no second wake-up.
    for vm in vms {
        for h in vm.handles() {
            h.request_pause_then(&vm.shared, Box::new(|vcpu| vcpu.save_state().map(Some)));
        }
    }
    for vm in vms {
        for h in vm.handles() {
            if !h.wait_parked(VCPU_RESPONSE_TIMEOUT) {
                return Err(HandoverError::Io(format!(
                    "VM {}: vCPU {} did not stop",
                    vm.name(),
                    h.id
                )));
            }
        }
    }
    Ok(())
}

/// Collect the vCPU states the threads saved as they parked, and read VM-wide state.
fn capture(vms: &[Arc<Vm>]) -> Result<Vec<VmCapture>, HandoverError> {
    // While the vCPU threads work, the VM-wide state is read here.
    let mut vm_states = Vec::new();
    for vm in vms {
        let state = vm
            .shared
            .kvm_vm()
            .save_state(vm.linux_devices)
            .map_err(|e| HandoverError::Vm {
                vm: vm.name().to_string(),
                err: e.into(),
            })?;
        vm_states.push(state);
    }
    let mut captures = Vec::new();
    for (vm, vm_state) in vms.iter().zip(vm_states) {
        let mut vcpus = Vec::new();
        let mut first_stop = u64::MAX;
        for h in vm.handles() {
            let state = match h.task_result(VCPU_RESPONSE_TIMEOUT) {
                Some(Ok(Some(state))) => state,
                Some(Err(e)) => {
                    return Err(HandoverError::Vm {
                        vm: vm.name().to_string(),
                        err: e.into(),
                    })
                }
                _ => {
                    return Err(HandoverError::Io(format!(
                        "VM {}: vCPU {} did not save its state",
                        vm.name(),
                        h.id
                    )))
                }
            };
            vcpus.push(state);
            first_stop = first_stop.min(h.park_times().0);
        }
        captures.push(VmCapture {
            name: vm.name().to_string(),
            lifecycle: vm.lifecycle().name().to_string(),
            first_stop_ns: first_stop,
            vcpus,
            vm: vm_state,
            serial: vm.shared.devices.serial_state(),
        });
    }
    Ok(captures)
}

/// Let the guests run here again, as they were before the attempt.
fn roll_back(vms: &[Arc<Vm>]) {
    for vm in vms {
        if vm.lifecycle() == Lifecycle::Running {
            for h in vm.handles() {
                h.request_run(&vm.shared);
            }
        }
    }
}
