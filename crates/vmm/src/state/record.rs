//! The state of one VM as it leaves its process: [`VmRecord`], made of the [`VmSpec`] (what
//! does not change while the VM lives) and the [`VmRuntime`] (what does).
//!
//! Strict by design: every struct here must be read back whole. A field added after the
//! oldest format this build reads ([`super::envelope::MIN_FORMAT_VERSION`]) carries a
//! `#[serde(default)]` of its own and says in which format it came; nothing else defaults,
//! so a state that lacks `regs` or a lifecycle is an error that names the field, never a
//! VM restored from zeros. Lifecycles and boot protocols are enums.

use std::path::PathBuf;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};
use warmvm_devices::{DevicesState, SerialStateData};
use warmvm_hypervisor::{required, VcpuState, VmState};

use crate::config::{BootKind, DiskConfig, VmConfig};

/// A VM's configuration as it crosses a process: [`VmConfig`] with every field required
/// (the config file's defaults are for people, not for state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmConfigState {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub hugepages: bool,
    #[serde(deserialize_with = "required")]
    pub kernel: Option<PathBuf>,
    pub boot: BootKind,
    #[serde(deserialize_with = "required")]
    pub cmdline: Option<String>,
    #[serde(deserialize_with = "required")]
    pub initrd: Option<PathBuf>,
    #[serde(deserialize_with = "required")]
    pub console_log: Option<PathBuf>,
    pub console_stdout: bool,
    pub hide_cx16: bool,
    /// Added in format 3 by the virtio devices (older builds had no disks).
    #[serde(default)]
    pub disks: Vec<DiskState>,
    /// Added in format 3 by the virtio devices (older builds had no network).
    #[serde(default)]
    pub nets: Vec<NetState>,
}

/// A network interface as it crosses a process: every field required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub tap: String,
    pub mac: [u8; 6],
}

/// The name under which network interface `i`'s TAP fd crosses, in [`VmSpec::fds`].
pub fn net_fd_name(i: usize) -> String {
    format!("net{i}")
}

/// A disk as it crosses a process: every field required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub path: PathBuf,
    pub read_only: bool,
    pub cache: warmvm_devices::virtio::block::CacheMode,
}

impl From<&DiskConfig> for DiskState {
    fn from(d: &DiskConfig) -> Self {
        Self {
            path: d.path.clone(),
            read_only: d.read_only,
            cache: d.cache,
        }
    }
}

impl From<DiskState> for DiskConfig {
    fn from(d: DiskState) -> Self {
        Self {
            path: d.path,
            read_only: d.read_only,
            cache: d.cache,
        }
    }
}

/// The name under which disk `i`'s image fd crosses, in [`VmSpec::fds`].
pub fn disk_fd_name(i: usize) -> String {
    format!("disk{i}")
}

impl From<&VmConfig> for VmConfigState {
    fn from(c: &VmConfig) -> Self {
        Self {
            name: c.name.clone(),
            memory_mib: c.memory_mib,
            vcpus: c.vcpus,
            hugepages: c.hugepages,
            kernel: c.kernel.clone(),
            boot: c.boot,
            cmdline: c.cmdline.clone(),
            initrd: c.initrd.clone(),
            console_log: c.console_log.clone(),
            console_stdout: c.console_stdout,
            hide_cx16: c.hide_cx16,
            disks: c.disks.iter().map(DiskState::from).collect(),
            nets: c
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| NetState {
                    // Filled in when the VM was created, also for a TAP given by fd.
                    tap: n.tap.clone().unwrap_or_default(),
                    mac: n.mac_for(&c.name, i),
                })
                .collect(),
        }
    }
}

impl From<VmConfigState> for VmConfig {
    fn from(c: VmConfigState) -> Self {
        Self {
            name: c.name,
            memory_mib: c.memory_mib,
            vcpus: c.vcpus,
            hugepages: c.hugepages,
            kernel: c.kernel,
            boot: c.boot,
            cmdline: c.cmdline,
            initrd: c.initrd,
            console_log: c.console_log,
            console_stdout: c.console_stdout,
            hide_cx16: c.hide_cx16,
            disks: c.disks.into_iter().map(DiskConfig::from).collect(),
            nets: c
                .nets
                .into_iter()
                .map(|n| crate::config::NetConfig {
                    tap: Some(n.tap),
                    tap_fd: None,
                    mac: Some(
                        n.mac
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                    ),
                })
                .collect(),
        }
    }
}

/// How the guest was booted (it decides which devices the VM has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    Ring3,
    Pvh,
    Linux,
}

impl From<warmvm_boot::Protocol> for BootProtocol {
    fn from(p: warmvm_boot::Protocol) -> Self {
        match p {
            warmvm_boot::Protocol::Ring3 => BootProtocol::Ring3,
            warmvm_boot::Protocol::Pvh => BootProtocol::Pvh,
            warmvm_boot::Protocol::Linux => BootProtocol::Linux,
        }
    }
}

impl From<BootProtocol> for warmvm_boot::Protocol {
    fn from(p: BootProtocol) -> Self {
        match p {
            BootProtocol::Ring3 => warmvm_boot::Protocol::Ring3,
            BootProtocol::Pvh => warmvm_boot::Protocol::Pvh,
            BootProtocol::Linux => warmvm_boot::Protocol::Linux,
        }
    }
}

/// One RAM region: a memfd that comes beside the message, mapped at `guest_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamSlot {
    pub guest_addr: u64,
    pub size: u64,
}

/// What does not change while a VM lives: enough to re-create its KVM VM, vCPUs and
/// devices over its RAM. Sent before the pause, so that the new VMM prepares the VM while
/// the guest still runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    pub config: VmConfigState,
    pub protocol: BootProtocol,
    /// Guest address of the reference guest's status area.
    #[serde(deserialize_with = "required")]
    pub status_addr: Option<u64>,
    pub ram: Vec<RamSlot>,
    pub hugepages: bool,
    /// The CPUID each vCPU was created with.
    pub cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    /// The VM has the PIT and a wired serial IRQ (Linux guests).
    pub linux_devices: bool,
    pub console_log: PathBuf,
    /// CLOCK_MONOTONIC ns when the VM was first created (in whichever VMM), so that its
    /// uptime counts the time it existed across every warm reboot.
    pub created_monotonic_ns: u64,
    /// The VM's named fd table: the names of the fds that follow its RAM memfds and console
    /// log, in the order they come (`disk0`, ...). Added in format 3 by the virtio devices.
    #[serde(default)]
    pub fds: Vec<String>,
}

impl VmSpec {
    /// A valid spec (64 MiB, one vCPU, the reference guest) that fuzzing seeds and tests
    /// build on.
    #[doc(hidden)]
    pub fn seed() -> VmSpec {
        VmSpec {
            config: VmConfigState {
                name: "seed".into(),
                memory_mib: 64,
                vcpus: 1,
                hugepages: false,
                kernel: None,
                boot: BootKind::Auto,
                cmdline: Some("quiet".into()),
                initrd: None,
                console_log: None,
                console_stdout: false,
                hide_cx16: false,
                disks: Vec::new(),
                nets: Vec::new(),
            },
            protocol: BootProtocol::Ring3,
            status_addr: Some(0x1000),
            ram: vec![RamSlot {
                guest_addr: 0,
                size: 64 << 20,
            }],
            hugepages: false,
            cpuids: vec![vec![kvm_cpuid_entry2::default()]],
            linux_devices: false,
            console_log: "/tmp/seed.log".into(),
            created_monotonic_ns: 5,
            fds: Vec::new(),
        }
    }
}

/// Where a VM is in its life, as it crosses a process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LifecycleState {
    Created,
    Running,
    Paused,
    PoweredOff { exit_status: u32 },
    Crashed { reason: String },
    Stopped,
}

impl LifecycleState {
    /// Whether a VM in this state has vCPU state to restore (it has not ended).
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            LifecycleState::Created | LifecycleState::Running | LifecycleState::Paused
        )
    }
}

/// The part of a live VM that changes as it runs: read while its vCPUs are parked.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmRuntime {
    /// CLOCK_MONOTONIC ns at which this VM's first vCPU stopped.
    pub first_stop_ns: u64,
    pub vcpus: Vec<VcpuState>,
    pub kvm: VmState,
    pub serial: SerialStateData,
    /// Each virtio device's transport, queue and device state, in window order. Added in
    /// format 3 by the virtio devices.
    #[serde(default)]
    pub virtio: Vec<warmvm_devices::VirtioMmioState>,
    /// The ACPI power button's PM1 registers. Added in format 3 by the power button: a
    /// state from a build without it has none, and the device starts from power-on.
    #[serde(default)]
    pub acpi_pm: warmvm_devices::AcpiPmState,
    /// The i8042 keyboard controller. Added in format 3 with the power button, like
    /// `acpi_pm`.
    #[serde(default)]
    pub i8042: warmvm_devices::I8042State,
}

impl VmRuntime {
    /// A runtime from its parts. The devices' state lies flat in the runtime (as format 3
    /// has it on the wire) rather than as one [`DevicesState`] field.
    pub fn new(
        first_stop_ns: u64,
        vcpus: Vec<VcpuState>,
        kvm: VmState,
        devices: DevicesState,
    ) -> Self {
        let DevicesState {
            serial,
            acpi_pm,
            i8042,
            virtio,
        } = devices;
        Self {
            first_stop_ns,
            vcpus,
            kvm,
            serial,
            virtio,
            acpi_pm,
            i8042,
        }
    }

    /// The devices' part, moved out (nothing is copied: it is taken in the blackout).
    pub fn take_devices(&mut self) -> DevicesState {
        DevicesState {
            serial: std::mem::take(&mut self.serial),
            acpi_pm: std::mem::take(&mut self.acpi_pm),
            i8042: std::mem::take(&mut self.i8042),
            virtio: std::mem::take(&mut self.virtio),
        }
    }
}

/// Everything a VM needs to be re-created elsewhere, apart from the fds of its RAM and
/// console log: the one state type a handover sends and a snapshot persists.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub lifecycle: LifecycleState,
    /// `None` exactly when the VM has ended (powered off, crashed, stopped): there is no
    /// vCPU state to restore, and the VM is handed over only to be listed and deleted.
    #[serde(deserialize_with = "required")]
    pub runtime: Option<VmRuntime>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::drop_field;

    /// The fuzzers' seed spec with a read-only disk (and its fd), so that a disk crosses
    /// too.
    fn spec() -> VmSpec {
        let mut spec = VmSpec::seed();
        spec.config.disks = vec![DiskState {
            path: "/tmp/d.img".into(),
            read_only: true,
            cache: Default::default(),
        }];
        spec.fds = vec![disk_fd_name(0)];
        spec
    }

    fn record() -> VmRecord {
        VmRecord {
            spec: spec(),
            lifecycle: LifecycleState::Crashed {
                reason: "triple fault".into(),
            },
            runtime: None,
        }
    }

    #[test]
    fn a_vm_record_round_trips() {
        let bytes = rmp_serde::to_vec_named(&record()).unwrap();
        let back: VmRecord = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.spec, spec());
        assert_eq!(
            back.lifecycle,
            LifecycleState::Crashed {
                reason: "triple fault".into()
            }
        );
        assert!(back.runtime.is_none());
    }

    #[test]
    fn a_vm_record_missing_a_required_field_is_refused_by_name() {
        let bytes = rmp_serde::to_vec_named(&record()).unwrap();
        for path in [
            &["runtime"][..],
            &["lifecycle"],
            &["spec", "status_addr"],
            &["spec", "protocol"],
            &["spec", "config", "kernel"],
            &["spec", "config", "vcpus"],
            &["spec", "created_monotonic_ns"],
        ] {
            let err = rmp_serde::from_slice::<VmRecord>(&drop_field(&bytes, path))
                .expect_err(&path.join("."))
                .to_string();
            assert!(err.contains(path[path.len() - 1]), "{path:?}: {err}");
        }
    }

    #[test]
    fn a_disk_missing_a_field_is_refused_by_name() {
        let disk = &spec().config.disks[0];
        let bytes = rmp_serde::to_vec_named(disk).unwrap();
        for field in ["path", "read_only", "cache"] {
            let err = rmp_serde::from_slice::<DiskState>(&drop_field(&bytes, &[field]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    /// A live VM's runtime with a pressed power button and keys typed on the i8042.
    fn runtime() -> VmRuntime {
        VmRuntime {
            first_stop_ns: 3,
            vcpus: vec![Default::default()],
            kvm: Default::default(),
            serial: Default::default(),
            virtio: Vec::new(),
            acpi_pm: warmvm_devices::AcpiPmState {
                pm1_sts: warmvm_abi::PM1_STS_PWRBTN,
                pm1_en: warmvm_abi::PM1_EN_PWRBTN,
                pm1_cnt: 0,
            },
            i8042: warmvm_devices::I8042State {
                status: 0x15,
                buffer: vec![0x14, 0x11],
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_platform_devices_cross_and_states_without_them_read_as_power_on() {
        let bytes = rmp_serde::to_vec_named(&runtime()).unwrap();
        let back: VmRuntime = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.acpi_pm, runtime().acpi_pm);
        assert_eq!(back.i8042, runtime().i8042);
        // What a build before the power button sent.
        let older = drop_field(&drop_field(&bytes, &["acpi_pm"]), &["i8042"]);
        let back: VmRuntime = rmp_serde::from_slice(&older).unwrap();
        assert_eq!(back.acpi_pm, Default::default());
        assert_eq!(back.i8042, Default::default());
        // Their own fields are all required.
        let err = rmp_serde::from_slice::<VmRuntime>(&drop_field(&bytes, &["acpi_pm", "pm1_en"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pm1_en"), "{err}");
    }
}
