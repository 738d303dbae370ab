//! One VM: its RAM, its KVM VM, its devices and its vCPU threads, and its lifecycle.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::GuestAddress;
use warmvm_boot::{BootPlan, Protocol, RamRange};
use warmvm_devices::{ConsoleSink, Devices, IrqLine, Pausable, PlatformIrqs, SerialConsole};
use warmvm_hypervisor::{CpuidOptions, Hypervisor};
use warmvm_memory::GuestRam;

use crate::config::{BootKind, VmConfig};
use crate::status::{self, GuestFigures};
/// How a VM ended: the vCPU thread that ends it says how.
pub use crate::vcpu::Outcome;
use crate::vcpu::{run_vcpu, VcpuHandle, VcpuStats, VcpuVm};
use crate::virtio::DeviceError;

/// GSI of COM1's interrupt on the in-kernel PIC/IOAPIC.
const SERIAL_GSI: u32 = 4;
/// GSI of the i8042's keyboard interrupt.
const KEYBOARD_GSI: u32 = 1;

/// The interrupt lines of a VM's legacy devices: irqfds for a guest that takes interrupts
/// (Linux), nothing for the reference guest (it polls).
#[derive(Clone)]
pub(crate) struct LegacyIrqs {
    /// COM1 (GSI 4).
    pub serial: IrqLine,
    /// The ACPI SCI and the i8042's keyboard interrupt.
    pub platform: PlatformIrqs,
}
/// How long a vCPU may take to park or exit when told to.
pub(crate) const VCPU_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Hypervisor(#[from] warmvm_hypervisor::Error),
    #[error("{0}")]
    Memory(#[from] warmvm_memory::MemoryError),
    #[error("{0}")]
    Boot(#[from] warmvm_boot::BootError),
    #[error("cannot read {what} {path}: {err}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("cannot open console log {path}: {err}")]
    ConsoleLog {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("VM {vm} is {state}; cannot {action}")]
    InvalidTransition {
        vm: String,
        state: State,
        action: Action,
    },
    /// The VM's virtio devices (disks, network interfaces), with their own message.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("vCPU {vcpu} of VM {vm} did not respond within {secs} s")]
    VcpuUnresponsive { vm: String, vcpu: u32, secs: u64 },
}

/// How a stop asks a guest to shut down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerButton {
    /// The ACPI fixed-hardware power button (PM1 status, SCI).
    Acpi,
    /// Ctrl-Alt-Del typed on the i8042 keyboard controller.
    CtrlAltDel,
}

impl PowerButton {
    /// Ctrl-Alt-Del for a Linux guest whose command line has `acpi=off` (the kernel then
    /// ignores the ACPI tables and so the button); the ACPI button for every other guest,
    /// the reference guest included (it polls PM1 status).
    pub fn for_guest(linux: bool, cmdline: Option<&str>) -> Self {
        let acpi_off = cmdline.is_some_and(|c| c.split_ascii_whitespace().any(|t| t == "acpi=off"));
        if linux && acpi_off {
            PowerButton::CtrlAltDel
        } else {
            PowerButton::Acpi
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PowerButton::Acpi => "acpi",
            PowerButton::CtrlAltDel => "ctrl-alt-del",
        }
    }
}

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Lifecycle {
    Created,
    Running,
    Paused,
    PoweredOff {
        exit_status: u32,
    },
    Crashed {
        reason: String,
    },
    Stopped,
    /// Handed over to another VMM process, or migrated to another host: this one must not
    /// touch it any more.
    HandedOver,
    /// A live migration sent its commit and lost the stream before the destination said
    /// the VM runs there: it may run there, so it stays paused here and is never resumed
    /// blindly; only asking the destination resolves it.
    InDoubt,
}

/// A [`Lifecycle`] without its details: what the transition table is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    PoweredOff,
    Crashed,
    Stopped,
    HandedOver,
    InDoubt,
}

impl State {
    /// The name the API, the metrics and the JSON show.
    pub fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::PoweredOff => "powered-off",
            State::Crashed => "crashed",
            State::Stopped => "stopped",
            State::HandedOver => "handed-over",
            State::InDoubt => "in-doubt",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the VMM asks of a VM's lifecycle (its ending is the guest's or [`Vm::stop`]'s, and
/// comes from any state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Pause,
    Resume,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }

    /// The transition table: the one state each action is allowed from, and the state it
    /// leads to.
    fn transition(self) -> (State, Lifecycle) {
        match self {
            Action::Start => (State::Created, Lifecycle::Running),
            Action::Pause => (State::Running, Lifecycle::Paused),
            Action::Resume => (State::Paused, Lifecycle::Running),
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Lifecycle {
    pub fn state(&self) -> State {
        match self {
            Lifecycle::Created => State::Created,
            Lifecycle::Running => State::Running,
            Lifecycle::Paused => State::Paused,
            Lifecycle::PoweredOff { .. } => State::PoweredOff,
            Lifecycle::Crashed { .. } => State::Crashed,
            Lifecycle::Stopped => State::Stopped,
            Lifecycle::HandedOver => State::HandedOver,
            Lifecycle::InDoubt => State::InDoubt,
        }
    }

    pub fn name(&self) -> &'static str {
        self.state().name()
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Lifecycle::PoweredOff { .. }
                | Lifecycle::Crashed { .. }
                | Lifecycle::Stopped
                | Lifecycle::HandedOver
        )
    }
}

/// What the vCPU threads share with the VMM.
pub struct VmShared {
    pub name: String,
    pub devices: Devices,
    lifecycle: Mutex<Lifecycle>,
    pub(crate) lifecycle_cv: Condvar,
    vcpus: OnceLock<Vec<Arc<VcpuHandle>>>,
    pub created_at: Instant,
    /// CLOCK_MONOTONIC ns when the VM was first created, in whichever VMM: its uptime
    /// counts the time it existed across warm reboots.
    pub(crate) created_ns: u64,
    /// CLOCK_MONOTONIC ns at which the VM's first vCPU stopped in the old VMM, for a VM
    /// taken over by a warm reboot (to report its blackout).
    handover_first_stop_ns: std::sync::atomic::AtomicU64,
    /// Tests only: the next exit on any vCPU thread panics.
    #[cfg(feature = "fault-injection")]
    inject_panic: std::sync::atomic::AtomicBool,
    first_run: OnceLock<Instant>,
    // Declared last: dropped after everything above, and only once no vCPU thread holds
    // this struct any more, so KVM never runs a vCPU over unmapped RAM.
    kvm_vm: warmvm_hypervisor::Vm,
    pub ram: GuestRam,
}

impl VmShared {
    pub(crate) fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kvm_vm(&self) -> &warmvm_hypervisor::Vm {
        &self.kvm_vm
    }
}

/// What the vCPU threads see of their VM.
impl VcpuVm for VmShared {
    fn name(&self) -> &str {
        &self.name
    }

    fn devices(&self) -> &Devices {
        &self.devices
    }

    fn note_first_run(&self) {
        let _ = self.first_run.set(Instant::now());
    }

    fn finish(&self, outcome: Outcome) {
        {
            let mut l = self.lifecycle();
            if !l.is_finished() {
                *l = match &outcome {
                    Outcome::PoweredOff(status) => Lifecycle::PoweredOff {
                        exit_status: *status,
                    },
                    Outcome::Crashed(reason) => Lifecycle::Crashed {
                        reason: reason.clone(),
                    },
                    Outcome::Clean => Lifecycle::PoweredOff { exit_status: 0 },
                    Outcome::Forced => Lifecycle::Stopped,
                };
                match &outcome {
                    Outcome::Crashed(reason) => {
                        tracing::error!(vm = %self.name, %reason, "VM crashed")
                    }
                    other => tracing::info!(vm = %self.name, outcome = ?other, "VM ended"),
                }
            }
        }
        self.lifecycle_cv.notify_all();
        for v in self.vcpus.get().into_iter().flatten() {
            v.request_stop();
        }
    }

    #[cfg(feature = "fault-injection")]
    fn take_injected_panic(&self) -> bool {
        self.inject_panic
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

/// A VM, as the VMM holds it.
pub struct Vm {
    pub config: VmConfig,
    pub(crate) shared: Arc<VmShared>,
    threads: Vec<JoinHandle<()>>,
    pub(crate) status_addr: Option<GuestAddress>,
    pub(crate) protocol: Protocol,
    pub(crate) console_log: PathBuf,
    /// The VM has the PIT and a wired serial IRQ (Linux guests), not only the irqchip.
    pub(crate) linux_devices: bool,
    pub(crate) cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
}

/// A paused VM runs no guest instruction and its devices do no I/O; its state can be read.
impl Pausable for Vm {
    type Error = VmError;

    /// Stop every vCPU between two instructions and wait until all have parked.
    fn pause(&self) -> Result<(), VmError> {
        self.transition(Action::Pause)?;
        for h in self.handles() {
            h.request_pause();
        }
        for h in self.handles() {
            if !h.wait_parked(VCPU_RESPONSE_TIMEOUT) {
                return Err(VmError::VcpuUnresponsive {
                    vm: self.shared.name.clone(),
                    vcpu: h.id,
                    secs: VCPU_RESPONSE_TIMEOUT.as_secs(),
                });
            }
        }
        // A paused VM does no I/O either: its devices finish what they have in hand and
        // stop; what the guest queued, and frames that arrive, wait for the resume.
        if let Err(e) = self.shared.devices.pause() {
            tracing::warn!(vm = %self.shared.name, error = %e, "a device did not pause");
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.transition(Action::Resume)?;
        // An order to each worker: it cannot fail.
        let _ = self.shared.devices.resume();
        for h in self.handles() {
            h.request_run();
        }
        Ok(())
    }
}

/// What [`Vm::assemble`] puts together.
pub(crate) struct Parts {
    pub config: VmConfig,
    pub kvm_vm: warmvm_hypervisor::Vm,
    pub ram: GuestRam,
    pub serial: SerialConsole,
    /// The ACPI SCI's and the i8042's lines.
    pub platform: PlatformIrqs,
    pub vcpus: Vec<warmvm_hypervisor::Vcpu>,
    pub status_addr: Option<GuestAddress>,
    pub protocol: Protocol,
    pub console_log: PathBuf,
    pub linux_devices: bool,
    pub lifecycle: Lifecycle,
    /// CLOCK_MONOTONIC ns when the VM was first created (in the VMM it comes from); `None`
    /// for a new VM.
    pub created_ns: Option<u64>,
    /// The disk images of `config.disks` and the TAPs of `config.nets`, open, in order.
    pub host_files: crate::virtio::HostFiles,
}

/// Create the KVM VM over `ram`: memory slots first (on PVM each slot costs milliseconds
/// once an irqchip exists), then the irqchip, and for Linux guests the PIT and the irqfds of
/// COM1, the ACPI SCI (level-triggered: see the MADT's override) and the i8042 (IRQ 1).
pub(crate) fn build_kvm_vm(
    hv: &Hypervisor,
    ram: &GuestRam,
    linux_devices: bool,
) -> Result<(warmvm_hypervisor::Vm, LegacyIrqs), VmError> {
    let mut kvm_vm = hv.create_vm()?;
    for (slot, (guest_addr, size, host_addr)) in ram.slots().into_iter().enumerate() {
        // SAFETY: the mapping belongs to `ram`, which lives in VmShared beside `kvm_vm` and
        // is dropped only after every vCPU thread has ended.
        unsafe { kvm_vm.map_memory(slot as u32, guest_addr, size, host_addr)? };
    }
    kvm_vm.create_irqchip()?;
    let irqs = if linux_devices {
        kvm_vm.create_pit()?;
        LegacyIrqs {
            serial: IrqLine::eventfd(kvm_vm.irq_line(SERIAL_GSI)?),
            platform: PlatformIrqs {
                sci: IrqLine::eventfd(kvm_vm.irq_line(u32::from(warmvm_abi::SCI_IRQ))?),
                keyboard: IrqLine::eventfd(kvm_vm.irq_line(KEYBOARD_GSI)?),
            },
        }
    } else {
        LegacyIrqs {
            serial: IrqLine::none(),
            platform: PlatformIrqs::none(),
        }
    };
    Ok((kvm_vm, irqs))
}

/// A VM's figures, for the CLI, the API and the benchmarks: what the daemon sends and the
/// client reads back (an older daemon's report lacks the fields noted below).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct VmReport {
    pub name: String,
    #[serde(flatten)]
    pub lifecycle: Lifecycle,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub boot: String,
    pub uptime_ms: u64,
    pub console_log: PathBuf,
    pub ram_resident_mib: u64,
    pub exits: Vec<VcpuStats>,
    pub unknown_accesses: warmvm_devices::unknown::UnknownCounts,
    /// The VM's virtio devices, disks first. Added by commit 12d284d (`vm show` lists the
    /// devices): an older daemon sends none.
    #[serde(default)]
    pub devices: Vec<crate::virtio::DeviceReport>,
    pub guest: Option<GuestFigures>,
}

impl Vm {
    /// Build a VM and its vCPU threads, ready to [`start`](Vm::start): everything that can
    /// fail happens here.
    pub fn create(hv: &Hypervisor, config: &VmConfig, state_dir: &Path) -> Result<Self, VmError> {
        Self::create_with(hv, config, state_dir, crate::virtio::GivenTaps::default())
    }

    /// [`Vm::create`] with TAPs the caller opened (for the interfaces that name a `tap_fd`).
    pub fn create_with(
        hv: &Hypervisor,
        config: &VmConfig,
        state_dir: &Path,
        given: crate::virtio::GivenTaps,
    ) -> Result<Self, VmError> {
        let (taps, config) = crate::virtio::open_taps(config, given)?;
        let config = &config;
        let ram = GuestRam::create(&config.name, config.memory_mib << 20, config.hugepages)?;
        let read = |what, path: &PathBuf| {
            std::fs::read(path).map_err(|err| VmError::ReadFile {
                what,
                path: path.clone(),
                err,
            })
        };
        let image = config
            .kernel
            .as_ref()
            .map(|p| read("kernel", p))
            .transpose()?;
        let initrd = config
            .initrd
            .as_ref()
            .map(|p| read("initrd", p))
            .transpose()?;
        let linux_devices = image.is_some();
        let host_files = crate::virtio::HostFiles {
            disks: crate::virtio::open_disks(&config.disks)?,
            taps,
        };
        let virtio_devices = config.disks.len() + config.nets.len();
        let (kvm_vm, irqs) = build_kvm_vm(hv, &ram, linux_devices)?;

        let console_log = config
            .console_log
            .clone()
            .unwrap_or_else(|| state_dir.join(&config.name).join("console.log"));
        let log = open_log(&console_log)?;

        let cpuid = CpuidOptions {
            hide_cx16: config.hide_cx16,
        };
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            vcpus.push(kvm_vm.create_vcpu(id, config.vcpus, &cpuid)?);
        }
        let tsc_khz = vcpus[0].tsc_khz().map(u64::from).unwrap_or(0);

        let ranges: Vec<RamRange> = ram
            .regions()
            .iter()
            .map(|r| RamRange {
                start: r.guest_addr,
                len: r.size,
            })
            .collect();
        let mut cmdline = config.cmdline.clone().unwrap_or_default();
        if image.is_some() {
            cmdline.push_str(&crate::virtio::linux_cmdline_args(virtio_devices));
        }
        let plan: BootPlan = match &image {
            None => warmvm_boot::ring3::setup(
                ram.memory(),
                &warmvm_boot::ring3::Ring3Params {
                    image: warmvm_guest_image::REFERENCE_GUEST_ELF,
                    cmdline: &cmdline,
                    ram: &ranges,
                    vcpus: config.vcpus,
                    tsc_khz,
                    fsgsbase: hv.has_fsgsbase(),
                    virtio_devices: virtio_devices as u32,
                },
            )?,
            Some(image) => warmvm_boot::linux::setup(
                ram.memory(),
                &warmvm_boot::linux::LinuxParams {
                    image,
                    initrd: initrd.as_deref(),
                    cmdline: &cmdline,
                    ram: &ranges,
                    vcpus: config.vcpus,
                    protocol: match config.boot {
                        BootKind::Auto => None,
                        BootKind::Ring3 => Some(Protocol::Ring3),
                        BootKind::Pvh => Some(Protocol::Pvh),
                        BootKind::Linux => Some(Protocol::Linux),
                    },
                    i8042: true,
                },
            )?,
        };
        for (vcpu, entry) in vcpus.iter().zip(&plan.entries) {
            vcpu.set_entry_state(entry)?;
        }
        let vm = Self::assemble(Parts {
            config: config.clone(),
            kvm_vm,
            ram,
            serial: SerialConsole::new(
                ConsoleSink::for_vm(&config.name, log, &console_log, config.console_stdout),
                irqs.serial,
            ),
            platform: irqs.platform,
            vcpus,
            status_addr: plan.status_addr,
            protocol: plan.protocol,
            console_log,
            linux_devices,
            lifecycle: Lifecycle::Created,
            created_ns: None,
            host_files,
        })?;
        tracing::info!(vm = %config.name, memory_mib = config.memory_mib, vcpus = config.vcpus,
            boot = %plan.protocol, "VM created");
        Ok(vm)
    }

    /// Wrap KVM objects, RAM and devices into a VM with parked vCPU threads.
    pub(crate) fn assemble(p: Parts) -> Result<Self, VmError> {
        let now_ns = crate::vcpu::monotonic_ns();
        let created_ns = p.created_ns.unwrap_or(now_ns).min(now_ns);
        let age = Duration::from_nanos(now_ns - created_ns);
        let mut devices = Devices::new(&p.config.name, p.serial, p.platform);
        crate::virtio::attach(
            &mut devices,
            &p.kvm_vm,
            p.ram.memory(),
            &p.config,
            p.host_files,
            p.linux_devices,
        )?;
        let shared = Arc::new(VmShared {
            name: p.config.name.clone(),
            devices,
            lifecycle: Mutex::new(p.lifecycle),
            lifecycle_cv: Condvar::new(),
            vcpus: OnceLock::new(),
            created_at: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            created_ns,
            handover_first_stop_ns: std::sync::atomic::AtomicU64::new(0),
            #[cfg(feature = "fault-injection")]
            inject_panic: std::sync::atomic::AtomicBool::new(false),
            first_run: OnceLock::new(),
            kvm_vm: p.kvm_vm,
            ram: p.ram,
        });
        warmvm_hypervisor::install_kick_handler()?;
        let handles: Vec<Arc<VcpuHandle>> = p
            .vcpus
            .iter()
            .map(|v| VcpuHandle::new(v.id(), shared.devices.doorbell.clone()))
            .collect();
        let cpuids = p.vcpus.iter().map(|v| v.cpuid().to_vec()).collect();
        let _ = shared.vcpus.set(handles.clone());
        let mut threads = Vec::new();
        for (vcpu, handle) in p.vcpus.into_iter().zip(handles) {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("{}-vcpu{}", p.config.name, handle.id))
                .stack_size(256 << 10)
                .spawn(move || run_vcpu(vcpu, handle, shared))
                .map_err(VmError::Thread)?;
            threads.push(t);
        }
        Ok(Self {
            config: p.config,
            shared,
            threads,
            status_addr: p.status_addr,
            protocol: p.protocol,
            console_log: p.console_log,
            linux_devices: p.linux_devices,
            cpuids,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.shared.lifecycle().clone()
    }

    pub(crate) fn handles(&self) -> &[Arc<VcpuHandle>] {
        self.shared
            .vcpus
            .get()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Take `action`'s step of the transition table, or refuse it (nothing changes).
    fn transition(&self, action: Action) -> Result<(), VmError> {
        let (from, to) = action.transition();
        let mut l = self.shared.lifecycle();
        if l.state() != from {
            return Err(VmError::InvalidTransition {
                vm: self.shared.name.clone(),
                state: l.state(),
                action,
            });
        }
        *l = to;
        Ok(())
    }

    /// Let the guest run for the first time.
    pub fn start(&self) -> Result<(), VmError> {
        self.transition(Action::Start)?;
        for h in self.handles() {
            h.request_run();
        }
        Ok(())
    }

    /// The button a stop presses: Ctrl-Alt-Del on the i8042 for a Linux guest told to
    /// ignore ACPI (`acpi=off` on its command line), the ACPI power button otherwise.
    pub fn power_button(&self) -> PowerButton {
        PowerButton::for_guest(self.linux_devices, self.config.cmdline.as_deref())
    }

    /// Ask the guest to power off: press its power button ([`Vm::power_button`]). A
    /// reference guest of an older build (one that does not announce
    /// `GUEST_FEATURE_POWER_BUTTON`, still running after a warm upgrade) is also sent the
    /// paravirtual power-off command it knows.
    pub fn request_poweroff(&self) {
        match self.power_button() {
            PowerButton::Acpi => self.shared.devices.press_power_button(),
            PowerButton::CtrlAltDel => {
                if !self.shared.devices.press_ctrl_alt_del() {
                    tracing::warn!(vm = %self.shared.name,
                        "the guest has not read the keys typed before: Ctrl-Alt-Del not typed");
                }
            }
        }
        if let Some(addr) = self.status_addr {
            let mem = self.shared.ram.memory();
            let features = status::guest_features(mem, addr).unwrap_or(0);
            if features & warmvm_abi::GUEST_FEATURE_POWER_BUTTON == 0 {
                status::post_command(mem, addr, warmvm_abi::HOST_COMMAND_POWEROFF);
                self.shared.devices.doorbell.ring();
            }
        }
    }

    /// Wait until the VM has ended, at most `timeout`. True if it has.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut l = self.shared.lifecycle();
        while !l.is_finished() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            l = self
                .shared
                .lifecycle_cv
                .wait_timeout(l, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Power the VM off: press its power button, and force it off if it has not powered
    /// off within `grace`. Logs which it was.
    pub fn stop(&self, grace: Duration) -> Lifecycle {
        if self.lifecycle() == Lifecycle::Paused {
            let _ = self.resume();
        }
        if self.lifecycle() == Lifecycle::Created {
            self.shared.finish(Outcome::Forced);
        }
        if !self.lifecycle().is_finished() {
            let t0 = Instant::now();
            self.request_poweroff();
            if !self.wait_finished(grace) {
                self.shared.finish(Outcome::Forced);
            }
            let (outcome, what) = match self.lifecycle() {
                Lifecycle::PoweredOff { .. } => ("Clean", "the guest powered off"),
                Lifecycle::Crashed { .. } => ("Crashed", "the guest crashed"),
                _ => ("Forced", "the guest did not power off in time: forced off"),
            };
            tracing::info!(vm = %self.shared.name, outcome = %outcome,
                button = %self.power_button().name(),
                waited_ms = t0.elapsed().as_millis() as u64, grace_secs = grace.as_secs(),
                "power button pressed: {what}");
        }
        for h in self.handles() {
            h.wait_exited(VCPU_RESPONSE_TIMEOUT);
        }
        self.lifecycle()
    }

    /// Each vCPU's exit and wait counters, read without locking (for metrics).
    pub fn vcpu_stats(&self) -> impl Iterator<Item = VcpuStats> + '_ {
        self.handles().iter().map(|h| h.stats())
    }

    /// Tests only: make the next exit of one of this VM's vCPU threads panic, as a bug in
    /// the VMM would.
    #[cfg(feature = "fault-injection")]
    pub fn inject_vcpu_panic(&self) {
        self.shared
            .inject_panic
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn set_first_stop_ns(&self, ns: u64) {
        self.shared
            .handover_first_stop_ns
            .store(ns, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn first_stop_ns(&self) -> u64 {
        self.shared
            .handover_first_stop_ns
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The reference guest's integrity figures, if this VM runs it and it has reported.
    pub fn guest_figures(&self) -> Option<GuestFigures> {
        status::read(
            self.shared.ram.memory(),
            self.status_addr?,
            self.config.vcpus,
        )
    }

    /// Whether the guest says it is up: the reference guest once every vCPU has left its
    /// boot phase (it reports through its status area). A guest without a status area has
    /// no such signal here and counts as up once it runs.
    pub fn guest_ready(&self) -> bool {
        if self.status_addr.is_none() {
            return self.lifecycle() == Lifecycle::Running;
        }
        self.guest_figures().is_some_and(|g| {
            !g.vcpus.is_empty()
                && g.vcpus
                    .iter()
                    .all(|v| v.phase == "filling" || v.phase == "verifying")
        })
    }

    /// Restart the reference guest's longest-stall measurement.
    pub fn reset_guest_gaps(&self) {
        if let Some(addr) = self.status_addr {
            status::reset_gaps(self.shared.ram.memory(), addr, self.config.vcpus);
        }
    }

    /// Time from the VM's creation to its first KVM_RUN.
    pub fn time_to_first_run(&self) -> Option<Duration> {
        self.shared
            .first_run
            .get()
            .map(|t| t.duration_since(self.shared.created_at))
    }

    pub fn report(&self) -> VmReport {
        VmReport {
            name: self.shared.name.clone(),
            lifecycle: self.lifecycle(),
            memory_mib: self.config.memory_mib,
            vcpus: self.config.vcpus,
            boot: self.protocol.to_string(),
            uptime_ms: crate::vcpu::monotonic_ns().saturating_sub(self.shared.created_ns)
                / 1_000_000,
            console_log: self.console_log.clone(),
            ram_resident_mib: self.shared.ram.resident_bytes() >> 20,
            exits: self.handles().iter().map(|h| h.stats()).collect(),
            unknown_accesses: self.shared.devices.unknown.counts(),
            devices: crate::virtio::reports(
                &self.config,
                self.shared.devices.virtio_info(),
                self.linux_devices,
            ),
            guest: self.guest_figures(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.lifecycle().is_finished() {
            self.shared.finish(Outcome::Forced);
        }
        for h in self.handles() {
            h.request_stop();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether every vCPU thread of `vms` can have a core of its own beside the thread that
/// drives a handover. Only then may vCPU threads spin rather than sleep during it (more
/// spinners would starve the threads still working); only otherwise are they raised to
/// real-time for it (see `VcpuHandle::boost`).
pub(crate) fn vcpus_have_cores(vms: &[Arc<Vm>]) -> bool {
    let vcpus: usize = vms.iter().map(|vm| vm.handles().len()).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    vcpus < cores
}

pub(crate) fn open_log(path: &Path) -> Result<File, VmError> {
    let err = |err| VmError::ConsoleLog {
        path: path.to_path_buf(),
        err,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::PowerButton;

    #[test]
    fn only_a_linux_guest_told_acpi_off_gets_ctrl_alt_del() {
        use PowerButton::{Acpi, CtrlAltDel};
        let cases = [
            (true, None, Acpi),
            (true, Some("console=ttyS0"), Acpi),
            (true, Some("console=ttyS0 acpi=off panic=1"), CtrlAltDel),
            (true, Some("acpi=offx noacpi=off"), Acpi),
            (true, Some("acpi=force"), Acpi),
            (false, Some("acpi=off"), Acpi),
        ];
        for (linux, cmdline, button) in cases {
            assert_eq!(
                PowerButton::for_guest(linux, cmdline),
                button,
                "{cmdline:?}"
            );
        }
    }

    #[test]
    fn each_action_is_allowed_from_exactly_one_state_and_refusals_keep_their_wording() {
        use super::{Action, State, VmError};
        let table = [
            (Action::Start, State::Created, State::Running),
            (Action::Pause, State::Running, State::Paused),
            (Action::Resume, State::Paused, State::Running),
        ];
        for (action, from, to) in table {
            let (allowed, target) = action.transition();
            assert_eq!((allowed, target.state()), (from, to), "{action}");
        }
        let refused = VmError::InvalidTransition {
            vm: "a".into(),
            state: State::PoweredOff,
            action: Action::Resume,
        };
        assert_eq!(refused.to_string(), "VM a is powered-off; cannot resume");
    }
}
