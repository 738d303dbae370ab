//! State format 2, as warmvm builds up to commit a412568 write it: read, never written.
//!
//! Format 2 split a VM between a staging message (`PrepareVm`) and the envelope
//! (`VmCapture`), named lifecycles and boot protocols by strings, and had no commit point.
//! This build converts it into the one [`VmRecord`] type and checks it as strictly as its
//! own format: every field format 2 always wrote must be present.

use std::path::PathBuf;
use std::time::Duration;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};
use warmvm_devices::SerialStateData;
use warmvm_hypervisor::{VcpuState, VmState};

use super::record::{
    BootProtocol, LifecycleState, RamSlot, VmConfigState, VmRecord, VmRuntime, VmSpec,
};
use super::StateError;
use crate::config::VmConfig;

/// A VM as format 2 staged it. Its config is the config-file type, which omits unset
/// optional fields and so may default them: format 2 wrote it that way.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VmPrepareV2 {
    pub config: VmConfig,
    pub protocol: String,
    #[serde(deserialize_with = "warmvm_hypervisor::required")]
    pub status_addr: Option<u64>,
    pub ram: Vec<(u64, u64)>,
    pub hugepages: bool,
    pub cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    pub linux_devices: bool,
    pub console_log: PathBuf,
    pub age_ms: u64,
}

/// A VM's captured state in format 2.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VmCaptureV2 {
    pub name: String,
    pub lifecycle: String,
    pub first_stop_ns: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialStateData,
}

/// The envelope's payload in format 2.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandoverStateV2 {
    pub sender: String,
    pub captured_at_ns: u64,
    pub host_first_stop_ns: u64,
    pub vms: Vec<VmCaptureV2>,
    pub quiesce_us: u64,
    pub capture_us: u64,
    pub stage_us: u64,
}

impl VmPrepareV2 {
    /// The spec this staging message describes; `now_ns` is CLOCK_MONOTONIC now.
    pub fn into_spec(self, now_ns: u64) -> Result<VmSpec, StateError> {
        let protocol = match self.protocol.as_str() {
            "ring3" => BootProtocol::Ring3,
            "pvh" => BootProtocol::Pvh,
            "linux" => BootProtocol::Linux,
            other => {
                return Err(StateError::UnknownProtocol {
                    vm: self.config.name,
                    protocol: other.to_string(),
                })
            }
        };
        let age = Duration::from_millis(self.age_ms);
        Ok(VmSpec {
            config: VmConfigState::from(&self.config),
            protocol,
            status_addr: self.status_addr,
            ram: self
                .ram
                .iter()
                .map(|&(guest_addr, size)| RamSlot { guest_addr, size })
                .collect(),
            hugepages: self.hugepages,
            cpuids: self.cpuids,
            linux_devices: self.linux_devices,
            console_log: self.console_log,
            created_monotonic_ns: now_ns.saturating_sub(age.as_nanos() as u64),
            fds: Vec::new(),
        })
    }
}

impl VmCaptureV2 {
    /// Combine with the VM's spec into the one record type.
    pub fn into_record(self, spec: VmSpec) -> Result<VmRecord, StateError> {
        if self.name != spec.config.name {
            return Err(StateError::OtherVm {
                state: self.name,
                prepared: spec.config.name,
            });
        }
        // Format 2 handed over only VMs that had not ended.
        let lifecycle = match self.lifecycle.as_str() {
            "running" => LifecycleState::Running,
            "paused" => LifecycleState::Paused,
            "created" => LifecycleState::Created,
            other => {
                return Err(StateError::UnknownLifecycle {
                    vm: self.name,
                    lifecycle: other.to_string(),
                })
            }
        };
        Ok(VmRecord {
            spec,
            lifecycle,
            runtime: Some(VmRuntime {
                first_stop_ns: self.first_stop_ns,
                vcpus: self.vcpus,
                kvm: self.vm,
                serial: self.serial,
                virtio: Vec::new(),
                acpi_pm: Default::default(),
                i8042: Default::default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare() -> VmPrepareV2 {
        VmPrepareV2 {
            config: VmConfig {
                name: "old".into(),
                memory_mib: 64,
                vcpus: 2,
                hugepages: false,
                kernel: None,
                boot: crate::config::BootKind::Auto,
                cmdline: None,
                initrd: None,
                console_log: None,
                console_stdout: false,
                hide_cx16: false,
                disks: Vec::new(),
                nets: Vec::new(),
            },
            protocol: "ring3".into(),
            status_addr: Some(0x2000),
            ram: vec![(0, 64 << 20)],
            hugepages: false,
            cpuids: vec![vec![], vec![]],
            linux_devices: false,
            console_log: "/x/console.log".into(),
            age_ms: 1500,
        }
    }

    #[test]
    fn a_format_2_vm_converts_into_a_record() {
        // As format 2 wrote it: the config omits its unset options.
        let bytes = rmp_serde::to_vec_named(&prepare()).unwrap();
        let prep: VmPrepareV2 = rmp_serde::from_slice(&bytes).unwrap();
        let spec = prep.into_spec(10_000_000_000).unwrap();
        assert_eq!(spec.protocol, BootProtocol::Ring3);
        assert_eq!(spec.created_monotonic_ns, 8_500_000_000);
        assert_eq!(spec.config.vcpus, 2);
        let capture = VmCaptureV2 {
            name: "old".into(),
            lifecycle: "paused".into(),
            first_stop_ns: 1,
            vcpus: vec![],
            vm: VmState::default(),
            serial: SerialStateData::default(),
        };
        let record = capture.into_record(spec).unwrap();
        assert_eq!(record.lifecycle, LifecycleState::Paused);
        assert!(record.runtime.is_some());
    }

    #[test]
    fn unknown_format_2_strings_are_refused() {
        let mut p = prepare();
        p.protocol = "bios".into();
        assert!(p.into_spec(0).is_err());
        let capture = VmCaptureV2 {
            name: "old".into(),
            lifecycle: "handed-over".into(),
            first_stop_ns: 1,
            vcpus: vec![],
            vm: VmState::default(),
            serial: SerialStateData::default(),
        };
        assert!(capture
            .into_record(prepare().into_spec(0).unwrap())
            .is_err());
    }
}
