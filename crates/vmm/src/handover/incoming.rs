//! The new VMM's side of a warm reboot: adopt, restore, resume.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use warmvm_boot::Protocol;
use warmvm_devices::{ConsoleSink, SerialConsole};
use warmvm_hypervisor::Hypervisor;
use warmvm_memory::{GuestRam, RamRegion};

use super::channel::Channel;
use super::envelope;
use super::faults::{hit, Point};
use super::state::{HandoverState, Msg, VmCapture, VmPrepare};
use super::{HandoverError, PhaseTimes, RebootReport, VmBlackout, FAULT_ENV};
use crate::vcpu::monotonic_ns;
use crate::vm::{build_kvm_vm, Lifecycle, Parts, Vm, VCPU_RESPONSE_TIMEOUT};
use crate::Host;

/// How long the old VMM may take between our `Prepared` and its state.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the new VMM ends up with.
pub struct Adopted {
    pub host: Host,
    pub extra: serde_json::Value,
    pub extra_fds: Vec<(String, File)>,
    pub report: RebootReport,
}

fn fault(name: &str) -> bool {
    std::env::var(FAULT_ENV).is_ok_and(|f| f == name)
}

/// Take over the VMs the old VMM offers on `channel_fd`. Any error is also reported to the
/// old VMM, which then resumes its VMs; the caller should exit.
pub fn take_over(channel_fd: OwnedFd, state_dir: &Path) -> Result<Adopted, HandoverError> {
    let channel = Channel::from_fd(channel_fd);
    let result = take_over_on(&channel, state_dir);
    if let Err(e) = &result {
        let _ = channel.send(&Msg::Failed(e.to_string()), &[]);
    }
    result
}

fn take_over_on(channel: &Channel, state_dir: &Path) -> Result<Adopted, HandoverError> {
    channel.set_timeout(Some(STATE_TIMEOUT))?;
    match channel.recv::<Msg>()?.0 {
        Msg::Hello { format_version, .. }
            if (envelope::MIN_FORMAT_VERSION..=envelope::FORMAT_VERSION)
                .contains(&format_version) => {}
        Msg::Hello {
            format_version,
            sender,
        } => {
            return Err(HandoverError::Incompatible(format!(
                "{sender} offers state format {format_version}; this warmvm reads {}..={}",
                envelope::MIN_FORMAT_VERSION,
                envelope::FORMAT_VERSION
            )))
        }
        other => {
            return Err(HandoverError::BadState(format!(
                "expected Hello, got {other:?}"
            )))
        }
    }
    let hv = Hypervisor::open().map_err(|e| HandoverError::Vm {
        vm: "-".into(),
        err: e.into(),
    })?;
    let mut vms = Vec::new();
    let (extra, extra_fds) = loop {
        match channel.recv::<Msg>()? {
            (Msg::PrepareVm(prep), files) => {
                let name = prep.config.name.clone();
                let vm = adopt_vm(&hv, *prep, files).map_err(|e| match e {
                    HandoverError::Vm { .. } => e,
                    other => HandoverError::BadState(format!("VM {name}: {other}")),
                })?;
                vms.push(vm);
            }
            (
                Msg::PrepareDone {
                    extra,
                    extra_fd_names,
                },
                files,
            ) => {
                if extra_fd_names.len() != files.len() {
                    return Err(HandoverError::BadState(
                        "extra fds do not match their names".into(),
                    ));
                }
                break (
                    extra,
                    extra_fd_names.into_iter().zip(files).collect::<Vec<_>>(),
                );
            }
            (other, _) => {
                return Err(HandoverError::BadState(format!(
                    "expected PrepareVm or PrepareDone, got {other:?}"
                )))
            }
        }
    };
    if fault("crash-prepare") {
        std::process::abort();
    }
    channel.send(
        &Msg::Prepared {
            pid: std::process::id(),
        },
        &[],
    )?;

    let (msg, mut files) = channel.recv::<Msg>()?;
    let realtime = super::priority::Realtime::enter();
    let t_transfer = Instant::now();
    if !matches!(msg, Msg::State) || files.len() != 1 {
        return Err(HandoverError::BadState(
            "expected State with one memfd".into(),
        ));
    }
    let bytes = envelope::from_sealed_memfd(files.remove(0))?;
    let (mut state, _version): (HandoverState, u32) = envelope::decode(&bytes)?;
    if fault("refuse-state") {
        return Err(HandoverError::Refused(
            "fault injected: refuse-state".into(),
        ));
    }
    if fault("crash-adopt") {
        std::process::abort();
    }
    if fault("hang-adopt") {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if state.vms.len() != vms.len() {
        return Err(HandoverError::BadState(format!(
            "state for {} VMs, {} were prepared",
            state.vms.len(),
            vms.len()
        )));
    }
    let transfer_us = t_transfer.elapsed().as_micros() as u64;

    // Restore every VM before any runs: a failure here leaves the old VMM in charge.
    // Every VM must be in a state this VMM can resume it into, before anything is restored.
    let mut lifecycles = Vec::new();
    for cap in &state.vms {
        lifecycles.push(match cap.lifecycle.as_str() {
            "running" => Lifecycle::Running,
            "paused" => Lifecycle::Paused,
            "created" => Lifecycle::Created,
            other => {
                return Err(HandoverError::BadState(format!(
                    "VM {}: cannot take over a VM in state {other:?}",
                    cap.name
                )))
            }
        });
    }
    let t_restore = Instant::now();
    // All VMs' vCPU threads restore at once: post every task before waiting for any.
    // Spinning for the resume afterwards saves a wake-up only while every vCPU thread
    // has a core of its own (beside this one); beyond that spinners would starve the
    // threads still restoring.
    let vcpus: usize = vms.iter().map(|vm| vm.handles().len()).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spin = vcpus < cores;
    for (vm, cap) in vms.iter().zip(state.vms.iter_mut()) {
        start_restore(vm, cap, state.captured_at_ns, spin)?;
    }
    for (vm, cap) in vms.iter().zip(&state.vms) {
        finish_restore(vm, cap)?;
    }
    let restore_us = t_restore.elapsed().as_micros() as u64;

    let t_resume = Instant::now();
    for (vm, lifecycle) in vms.iter().zip(lifecycles) {
        let run = lifecycle == Lifecycle::Running;
        *vm.shared.lifecycle() = lifecycle;
        if run {
            for h in vm.handles() {
                h.request_run(&vm.shared);
            }
        }
    }
    let mut blackouts = Vec::new();
    let mut host_last_resume = 0;
    for (vm, cap) in vms.iter().zip(&state.vms) {
        let mut last_resume = 0;
        if *vm.shared.lifecycle() == Lifecycle::Running {
            for h in vm.handles() {
                h.wait_running(VCPU_RESPONSE_TIMEOUT);
                last_resume = last_resume.max(h.park_times().1);
            }
        }
        host_last_resume = host_last_resume.max(last_resume);
        blackouts.push(VmBlackout {
            name: cap.name.clone(),
            blackout_us: last_resume.saturating_sub(cap.first_stop_ns) / 1000,
        });
    }
    let resume_us = t_resume.elapsed().as_micros() as u64;
    drop(realtime);
    let report = RebootReport {
        new_pid: std::process::id(),
        from_build: state.sender.clone(),
        to_build: crate::build(),
        host_blackout_us: host_last_resume.saturating_sub(state.host_first_stop_ns) / 1000,
        phases: PhaseTimes {
            stage_us: state.stage_us,
            quiesce_us: state.quiesce_us,
            capture_us: state.capture_us,
            transfer_us,
            restore_us,
            resume_us,
        },
        vms: blackouts,
        state_bytes: bytes.len() as u64,
    };
    channel.send(&Msg::Resumed(report.clone()), &[])?;
    tracing::info!(
        vms = vms.len(),
        host_blackout_us = report.host_blackout_us,
        "took over"
    );
    Ok(Adopted {
        host: Host::adopted(hv, vms, state_dir),
        extra,
        extra_fds,
        report,
    })
}

/// Build a VM over RAM memfds received from the old VMM, with parked vCPU threads.
fn adopt_vm(
    hv: &Hypervisor,
    prep: VmPrepare,
    mut files: Vec<File>,
) -> Result<Arc<Vm>, HandoverError> {
    let bad = |m: String| HandoverError::BadState(m);
    let vm_err = |err: crate::VmError| HandoverError::Vm {
        vm: prep.config.name.clone(),
        err,
    };
    if files.len() != prep.ram.len() + 1 {
        return Err(bad(format!(
            "{} fds for {} RAM regions and a log",
            files.len(),
            prep.ram.len()
        )));
    }
    prep.config
        .validate_shape(crate::HostLimits::probe())
        .map_err(|e| bad(e.to_string()))?;
    if prep.cpuids.len() != prep.config.vcpus as usize || prep.config.vcpus == 0 {
        return Err(bad("vCPU count and CPUIDs disagree".into()));
    }
    let total: u64 = prep.ram.iter().map(|r| r.1).sum();
    if total != prep.config.memory_mib << 20 {
        return Err(bad("RAM regions do not add up to memory_mib".into()));
    }
    let protocol = match prep.protocol.as_str() {
        "ring3" => Protocol::Ring3,
        "pvh" => Protocol::Pvh,
        "linux" => Protocol::Linux,
        other => return Err(bad(format!("unknown boot protocol {other:?}"))),
    };
    let log = files.pop().ok_or_else(|| bad("no console log fd".into()))?;
    let regions = prep
        .ram
        .iter()
        .zip(files)
        .map(|(&(guest_addr, size), file)| RamRegion {
            guest_addr,
            size,
            file,
        })
        .collect();
    let ram = GuestRam::adopt(regions, prep.hugepages).map_err(|e| vm_err(e.into()))?;
    if let Some(addr) = prep.status_addr {
        if addr
            .checked_add(warmvm_abi::layout::STATUS_SIZE)
            .is_none_or(|end| end > total)
        {
            return Err(bad("status area outside RAM".into()));
        }
    }
    let (kvm_vm, irq) = build_kvm_vm(hv, &ram, prep.linux_devices).map_err(vm_err)?;
    let mut vcpus = Vec::new();
    for (id, cpuid) in prep.cpuids.iter().enumerate() {
        vcpus.push(
            kvm_vm
                .create_vcpu_with_cpuid(id as u32, cpuid)
                .map_err(|e| vm_err(e.into()))?,
        );
    }
    let serial = SerialConsole::new(ConsoleSink::new(Some(log), prep.config.console_stdout), irq);
    let vm = Vm::assemble(Parts {
        config: prep.config.clone(),
        kvm_vm,
        ram,
        serial,
        vcpus,
        status_addr: prep.status_addr.map(GuestAddress),
        protocol,
        console_log: prep.console_log.clone(),
        linux_devices: prep.linux_devices,
        lifecycle: Lifecycle::Created,
        age: Duration::from_millis(prep.age_ms),
    })
    .map_err(vm_err)?;
    // The threads park before their first run; wait so that tasks can be posted.
    for h in vm.handles() {
        if !h.wait_parked(VCPU_RESPONSE_TIMEOUT) {
            return Err(bad(format!("vCPU {} thread did not start", h.id)));
        }
    }
    Ok(Arc::new(vm))
}

/// Restore one VM's VM-wide state and hand each vCPU thread its state to restore.
fn start_restore(
    vm: &Vm,
    cap: &mut VmCapture,
    captured_at_ns: u64,
    spin: bool,
) -> Result<(), HandoverError> {
    let vm_err = |err: crate::VmError| HandoverError::Vm {
        vm: vm.name().to_string(),
        err,
    };
    if cap.name != vm.name() || cap.vcpus.len() != vm.handles().len() {
        return Err(HandoverError::BadState(format!(
            "state of VM {} does not match prepared VM {}",
            cap.name,
            vm.name()
        )));
    }
    if cap.vm.pit.is_some() && !vm.linux_devices {
        return Err(HandoverError::BadState(
            "PIT state for a VM without a PIT".into(),
        ));
    }
    let advance_ns = monotonic_ns().saturating_sub(captured_at_ns);
    vm.shared
        .kvm_vm()
        .restore_state(&cap.vm, advance_ns)
        .map_err(|e| vm_err(e.into()))?;
    for (h, state) in vm.handles().iter().zip(cap.vcpus.drain(..)) {
        if state.id != h.id {
            return Err(HandoverError::BadState("vCPU ids out of order".into()));
        }
        let tsc_advance = (advance_ns as u128 * u128::from(state.tsc_khz) / 1_000_000) as u64;
        if !h.post_task(
            spin,
            Box::new(move |vcpu| vcpu.restore_state(&state, tsc_advance).map(|()| None)),
        ) {
            return Err(HandoverError::Io(format!("vCPU {} is not parked", h.id)));
        }
    }
    Ok(())
}

/// Wait for a VM's vCPU threads to finish restoring, then restore its devices.
fn finish_restore(vm: &Vm, cap: &VmCapture) -> Result<(), HandoverError> {
    let vm_err = |err: crate::VmError| HandoverError::Vm {
        vm: vm.name().to_string(),
        err,
    };
    for h in vm.handles() {
        match h.task_result(VCPU_RESPONSE_TIMEOUT) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(vm_err(e.into())),
            None => return Err(HandoverError::Io(format!("vCPU {} did not restore", h.id))),
        }
    }
    vm.shared.devices.restore_serial(&cap.serial);
    Ok(())
}
