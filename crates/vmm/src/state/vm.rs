//! The state API on [`Vm`]: save a VM into a [`VmRecord`]; build a VM from a [`VmSpec`] and
//! load a [`VmRuntime`] into it in place. Every transport goes through these and nothing
//! else reads or writes a VM's KVM or device state.

use std::fs::File;
use std::time::Instant;

use vm_memory::GuestAddress;
use warmvm_devices::{ConsoleSink, DevicesState, Persist, SerialConsole};
use warmvm_hypervisor::Hypervisor;
use warmvm_memory::GuestRam;

use super::record::{
    disk_fd_name, net_fd_name, LifecycleState, RamSlot, VmRecord, VmRuntime, VmSpec,
};
use super::StateError;
use crate::vcpu::monotonic_ns;
use crate::vm::{build_kvm_vm, Lifecycle, Parts, Vm, VCPU_RESPONSE_TIMEOUT};

impl LifecycleState {
    /// A VM's lifecycle as it leaves the process; `None` for a VM handed over already.
    pub(crate) fn of(l: &Lifecycle) -> Option<Self> {
        Some(match l {
            Lifecycle::Created => LifecycleState::Created,
            Lifecycle::Running => LifecycleState::Running,
            Lifecycle::Paused => LifecycleState::Paused,
            Lifecycle::PoweredOff { exit_status } => LifecycleState::PoweredOff {
                exit_status: *exit_status,
            },
            Lifecycle::Crashed { reason } => LifecycleState::Crashed {
                reason: reason.clone(),
            },
            Lifecycle::Stopped => LifecycleState::Stopped,
            // Neither leaves the process as a VM to run: one is another VMM's, the other
            // may be running on another host.
            Lifecycle::HandedOver | Lifecycle::InDoubt => return None,
        })
    }

    /// The lifecycle a handed-over or snapshotted VM had, as this process's type.
    pub(crate) fn to_lifecycle(&self) -> Lifecycle {
        match self {
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
}

impl VmSpec {
    /// Check that a spec from outside this process describes a VM this host can build: a
    /// valid config, one CPUID per vCPU, RAM regions that add up, a status area inside RAM.
    pub fn check(&self) -> Result<(), StateError> {
        let config: crate::VmConfig = self.config.clone().into();
        config
            .validate_shape(crate::HostLimits::probe())
            .map_err(StateError::Config)?;
        if self.cpuids.len() != config.vcpus as usize {
            return Err(StateError::CpuidCount);
        }
        let total = self
            .ram
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.size))
            .ok_or(StateError::RamOverflow)?;
        if total != config.memory_mib << 20 {
            return Err(StateError::RamSize);
        }
        if let Some(addr) = self.status_addr {
            if addr
                .checked_add(warmvm_abi::layout::STATUS_SIZE)
                .is_none_or(|end| end > total)
            {
                return Err(StateError::StatusOutsideRam);
            }
        }
        Ok(())
    }
}

impl Vm {
    /// What does not change while the VM lives: what a handover stages and a snapshot
    /// keeps beside the VM's changing state.
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            config: (&self.config).into(),
            protocol: self.protocol.into(),
            status_addr: self.status_addr.map(|a| a.0),
            ram: self
                .shared
                .ram
                .regions()
                .iter()
                .map(|r| RamSlot {
                    guest_addr: r.guest_addr,
                    size: r.size,
                })
                .collect(),
            hugepages: self.shared.ram.hugepages(),
            cpuids: self.cpuids.clone(),
            linux_devices: self.linux_devices,
            console_log: self.console_log.clone(),
            created_monotonic_ns: self.shared.created_ns,
            fds: (0..self.config.disks.len())
                .map(disk_fd_name)
                .chain((0..self.config.nets.len()).map(net_fd_name))
                .collect(),
        }
    }

    /// Build the KVM VM, vCPUs (with the spec's CPUIDs), devices (wired, in their power-on
    /// state) and parked vCPU threads of a VM over `ram`, whose spec [`VmSpec::check`] has
    /// accepted. Nothing is loaded yet: a warm reboot does this while the guest still runs
    /// in the old VMM, and [`Vm::load`]s in the blackout.
    pub(crate) fn build(
        hv: &Hypervisor,
        spec: &VmSpec,
        ram: GuestRam,
        log: File,
        host_files: crate::virtio::HostFiles,
    ) -> Result<Vm, StateError> {
        let vm_err = |err: crate::VmError| StateError::Vm {
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
                return Err(StateError::VcpuThread(h.id));
            }
        }
        Ok(vm)
    }

    /// Ask every vCPU of a live VM to park, each saving its own state the moment it has
    /// parked (in parallel, on its own thread). With `boost`, each is raised to real-time
    /// until it runs again (see `VcpuHandle::boost`). [`Vm::save`] collects the states.
    pub(crate) fn park_and_save(&self, boost: bool) {
        if self.lifecycle().is_finished() {
            return;
        }
        for h in self.handles() {
            h.request_pause_then(Box::new(|vcpu| vcpu.save_state().map(Some)));
            // With more vCPU threads than cores, until it runs again (after an abort, or
            // never): parking and saving must not queue behind the host's other
            // processes for a core.
            if boost {
                h.boost();
            }
        }
    }

    /// Have every vCPU of a VM that is paused already save its state, for [`Vm::save`].
    pub(crate) fn save_parked_vcpus(&self) -> Result<(), StateError> {
        for h in self.handles() {
            if !h.post_task(false, Box::new(|vcpu| vcpu.save_state().map(Some))) {
                return Err(StateError::NotParked(h.id));
            }
        }
        Ok(())
    }

    /// The VM's whole state. Every vCPU of a live VM must have been given its save task
    /// ([`Vm::park_and_save`] or [`Vm::save_parked_vcpus`]); this collects what they saved
    /// (waiting until `deadline` at most), reads the KVM VM-wide state meanwhile, and the
    /// devices' once the virtio devices have finished the requests in hand (what the guest
    /// queued meanwhile stays in the rings, for whoever loads the state).
    pub(crate) fn save(&self, deadline: Instant) -> Result<VmRecord, StateError> {
        let vm_err = |err: crate::VmError| StateError::Vm {
            vm: self.name().to_string(),
            err,
        };
        let runtime = if self.lifecycle().is_finished() {
            None
        } else {
            warmvm_devices::Pausable::pause(&self.shared.devices).map_err(|err| {
                StateError::PauseDevices {
                    vm: self.name().to_string(),
                    err,
                }
            })?;
            // Read while the vCPU threads are still saving theirs.
            let kvm = self
                .shared
                .kvm_vm()
                .save_state(self.linux_devices)
                .map_err(|e| vm_err(e.into()))?;
            let mut vcpus = Vec::new();
            let mut first_stop = u64::MAX;
            for h in self.handles() {
                let left = deadline.saturating_duration_since(Instant::now());
                match h.task_result(left) {
                    Some(Ok(Some(state))) => vcpus.push(state),
                    Some(Err(e)) => return Err(vm_err(e.into())),
                    _ => {
                        return Err(StateError::NotSaved {
                            vm: self.name().to_string(),
                            id: h.id,
                        })
                    }
                }
                first_stop = first_stop.min(h.park_times().0);
            }
            let devices: DevicesState = Persist::save(&&self.shared.devices);
            Some(VmRuntime::new(first_stop, vcpus, kvm, devices))
        };
        // Read after the vCPUs parked: a guest that powered off meanwhile is saved as
        // powered off (its vCPU states, if any, are of no use).
        let lifecycle = LifecycleState::of(&self.lifecycle())
            .ok_or_else(|| StateError::HandedOver(self.name().to_string()))?;
        let runtime = if lifecycle.is_live() { runtime } else { None };
        if lifecycle.is_live() && runtime.is_none() {
            return Err(StateError::EndedDuringSave(self.name().to_string()));
        }
        Ok(VmRecord {
            spec: self.spec(),
            lifecycle,
            runtime,
        })
    }

    /// Start loading `runtime` into this VM, built by [`Vm::build`] from the same spec and
    /// not run since: the VM-wide KVM state now (guest time advanced by the time since
    /// `captured_at_ns`), and each vCPU's state handed to its own thread, so that all
    /// vCPUs of all VMs load in parallel. `spin`: the vCPU threads spin for their next
    /// order instead of sleeping (see `VcpuHandle::post_task`). [`Loading::finish`] waits
    /// for the vCPUs and loads the devices. Nothing runs the guest.
    pub(crate) fn load(
        &self,
        mut runtime: VmRuntime,
        captured_at_ns: u64,
        spin: bool,
    ) -> Result<Loading<'_>, StateError> {
        let vm_err = |err: crate::VmError| StateError::Vm {
            vm: self.name().to_string(),
            err,
        };
        if runtime.vcpus.len() != self.handles().len() {
            return Err(StateError::VcpuCount {
                vm: self.name().to_string(),
                saved: runtime.vcpus.len(),
                here: self.handles().len(),
            });
        }
        if runtime.kvm.pit.is_some() && !self.linux_devices {
            return Err(StateError::PitWithoutPit);
        }
        self.set_first_stop_ns(runtime.first_stop_ns);
        let advance_ns = monotonic_ns().saturating_sub(captured_at_ns);
        self.shared
            .kvm_vm()
            .restore_state(&runtime.kvm, advance_ns)
            .map_err(|e| vm_err(e.into()))?;
        let devices = runtime.take_devices();
        for (h, state) in self.handles().iter().zip(runtime.vcpus) {
            if state.id != h.id {
                return Err(StateError::VcpuOrder);
            }
            let tsc_advance = (advance_ns as u128 * u128::from(state.tsc_khz) / 1_000_000) as u64;
            if !h.post_task(
                spin,
                Box::new(move |vcpu| vcpu.restore_state(&state, tsc_advance).map(|()| None)),
            ) {
                return Err(StateError::NotParked(h.id));
            }
        }
        Ok(Loading { vm: self, devices })
    }
}

/// A load under way: the vCPU threads are loading their state. Dropped unfinished, the VM
/// must not run (its state is half loaded).
#[must_use = "a load is complete only once finished"]
pub struct Loading<'a> {
    vm: &'a Vm,
    devices: DevicesState,
}

impl Loading<'_> {
    /// Wait for every vCPU thread to have loaded its state, then load the devices (without
    /// serving yet: the virtio devices start with `Pausable::resume` of the devices, once the VM
    /// may run).
    pub(crate) fn finish(self) -> Result<(), StateError> {
        let vm = self.vm;
        for h in vm.handles() {
            match h.task_result(VCPU_RESPONSE_TIMEOUT) {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(StateError::Vm {
                        vm: vm.name().to_string(),
                        err: e.into(),
                    })
                }
                None => return Err(StateError::NotLoaded(h.id)),
            }
        }
        Persist::load(&mut &vm.shared.devices, &self.devices)?;
        Ok(())
    }
}
