//! Building a VM again from its [`VmSpec`] and restoring its state: what the new VMM of a
//! warm reboot does for every VM it adopts, and what a snapshot restore does for one.

use std::fs::File;

use vm_memory::GuestAddress;
use warmvm_devices::{ConsoleSink, SerialConsole};
use warmvm_hypervisor::Hypervisor;
use warmvm_memory::GuestRam;

use super::state::{LifecycleState, VmRuntime, VmSpec};
use super::HandoverError;
use crate::vcpu::monotonic_ns;
use crate::vm::{build_kvm_vm, Lifecycle, Parts, Vm, VCPU_RESPONSE_TIMEOUT};

/// The lifecycle a handed-over or snapshotted VM had, as this process's type.
pub(crate) fn to_lifecycle(state: &LifecycleState) -> Lifecycle {
    match state {
        LifecycleState::Created => Lifecycle::Created,
        LifecycleState::Running => Lifecycle::Running,
        LifecycleState::Paused => Lifecycle::Paused,
        LifecycleState::PoweredOff { exit_status } => Lifecycle::PoweredOff {
            exit_status: *exit_status,
        },
        LifecycleState::Crashed { reason } => Lifecycle::Crashed {
            reason: reason.clone(),
        },
        LifecycleState::Stopped => Lifecycle::Stopped,
    }
}

/// Check that a spec from outside this process describes a VM this host can build: a
/// valid config, one CPUID per vCPU, RAM regions that add up, a status area inside RAM.
pub(crate) fn check_spec(spec: &VmSpec) -> Result<(), HandoverError> {
    let bad = |m: String| HandoverError::BadState(m);
    let config: crate::VmConfig = spec.config.clone().into();
    config
        .validate_shape(crate::HostLimits::probe())
        .map_err(|e| bad(e.to_string()))?;
    if spec.cpuids.len() != config.vcpus as usize {
        return Err(bad("vCPU count and CPUIDs disagree".into()));
    }
    let total = spec
        .ram
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.size))
        .ok_or_else(|| bad("RAM regions overflow".into()))?;
    if total != config.memory_mib << 20 {
        return Err(bad("RAM regions do not add up to memory_mib".into()));
    }
    if let Some(addr) = spec.status_addr {
        if addr
            .checked_add(warmvm_abi::layout::STATUS_SIZE)
            .is_none_or(|end| end > total)
        {
            return Err(bad("status area outside RAM".into()));
        }
    }
    Ok(())
}

/// Build the KVM VM, vCPUs (with the spec's CPUIDs), devices and parked vCPU threads of a
/// VM over `ram`, whose spec [`check_spec`] has accepted; nothing is restored yet.
pub(crate) fn build_vm(
    hv: &Hypervisor,
    spec: &VmSpec,
    ram: GuestRam,
    log: File,
    host_files: crate::virtio::HostFiles,
) -> Result<Vm, HandoverError> {
    let bad = |m: String| HandoverError::BadState(m);
    let vm_err = |err: crate::VmError| HandoverError::Vm {
        vm: spec.config.name.clone(),
        err,
    };
    let config: crate::VmConfig = spec.config.clone().into();
    let (kvm_vm, irqs) = build_kvm_vm(hv, &ram, spec.linux_devices).map_err(vm_err)?;
    let mut vcpus = Vec::new();
    for (id, cpuid) in spec.cpuids.iter().enumerate() {
        vcpus.push(
            kvm_vm
                .create_vcpu_with_cpuid(id as u32, cpuid)
                .map_err(|e| vm_err(e.into()))?,
        );
    }
    let serial = SerialConsole::new(
        ConsoleSink::for_vm(&config.name, log, &spec.console_log, config.console_stdout),
        irqs.serial,
    );
    let vm = Vm::assemble(Parts {
        config,
        kvm_vm,
        ram,
        serial,
        platform: irqs.platform,
        vcpus,
        status_addr: spec.status_addr.map(GuestAddress),
        protocol: spec.protocol.into(),
        console_log: spec.console_log.clone(),
        linux_devices: spec.linux_devices,
        lifecycle: Lifecycle::Created,
        created_ns: Some(spec.created_monotonic_ns),
        host_files,
    })
    .map_err(vm_err)?;
    // The threads park before their first run; wait so that tasks can be posted.
    for h in vm.handles() {
        if !h.wait_parked(VCPU_RESPONSE_TIMEOUT) {
            return Err(bad(format!("vCPU {} thread did not start", h.id)));
        }
    }
    Ok(vm)
}

/// Restore one VM's VM-wide state and hand each vCPU thread its state to restore.
pub(crate) fn start_restore(
    vm: &Vm,
    runtime: &mut VmRuntime,
    captured_at_ns: u64,
    spin: bool,
) -> Result<(), HandoverError> {
    let vm_err = |err: crate::VmError| HandoverError::Vm {
        vm: vm.name().to_string(),
        err,
    };
    if runtime.vcpus.len() != vm.handles().len() {
        return Err(HandoverError::BadState(format!(
            "VM {}: state for {} vCPUs, {} were prepared",
            vm.name(),
            runtime.vcpus.len(),
            vm.handles().len()
        )));
    }
    if runtime.kvm.pit.is_some() && !vm.linux_devices {
        return Err(HandoverError::BadState(
            "PIT state for a VM without a PIT".into(),
        ));
    }
    vm.set_first_stop_ns(runtime.first_stop_ns);
    let advance_ns = monotonic_ns().saturating_sub(captured_at_ns);
    vm.shared
        .kvm_vm()
        .restore_state(&runtime.kvm, advance_ns)
        .map_err(|e| vm_err(e.into()))?;
    for (h, state) in vm.handles().iter().zip(runtime.vcpus.drain(..)) {
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

/// Wait for a VM's vCPU threads to finish restoring.
pub(crate) fn finish_restore(vm: &Vm) -> Result<(), HandoverError> {
    for h in vm.handles() {
        match h.task_result(VCPU_RESPONSE_TIMEOUT) {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return Err(HandoverError::Vm {
                    vm: vm.name().to_string(),
                    err: e.into(),
                })
            }
            None => return Err(HandoverError::Io(format!("vCPU {} did not restore", h.id))),
        }
    }
    Ok(())
}
