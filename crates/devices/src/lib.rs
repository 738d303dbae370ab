//! The devices of a warmvm VM. They see port and MMIO accesses as plain calls and never
//! touch KVM: interrupts leave them as eventfd writes, and anything that needs the vCPU
//! (sleeping, powering off) is returned to the caller as an [`IoAction`].
//!
//! Owns: each device's registers and state type, the port and MMIO buses, the doorbell, the
//! console sink, and the threads devices run (the console thread, virtio workers).
//! Must never: issue a KVM ioctl, or depend on another warmvm crate but `warmvm-abi`. How
//! its threads are confined is not its business: the VMM passes a [`ThreadSetup`] that
//! those threads run first (it installs the sandbox's filter), so devices never call the
//! sandbox.
//!
//! Each device's state type sits beside it with its [`Persist`] implementation (save, and
//! load in place into a device built beforehand); [`Devices`] saves and loads all of a VM's
//! devices at once as a [`DevicesState`]. How that state crosses a process is not this
//! crate's business (see the VMM's `state` module).

/// Guest RAM as this crate sees it: vm-memory's mmap backend with a dirty bitmap per
/// region (`AtomicBitmap`), so every write that goes through vm-memory (virtio rings and
/// buffers, boot data) is recorded for live migration. The same type as
/// `warmvm_memory::GuestMemoryMmap`.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub mod acpi_pm;
pub mod bus;
pub mod console;
pub mod doorbell;
pub mod i8042;
pub mod persist;
pub mod pv_ports;
pub mod serial;
pub mod thread_setup;
pub mod unknown;
pub mod virtio;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

pub use acpi_pm::{AcpiPm, AcpiPmError, AcpiPmHandles, AcpiPmState};
pub use bus::{Access, Bus, BusDevice, BusError};
pub use console::{ConsoleLimits, ConsoleSink, ConsoleStats};
pub use doorbell::{Doorbell, Wake};
pub use i8042::{I8042Error, I8042Handles, I8042State, I8042};
pub use persist::Persist;
pub use pv_ports::{PvPorts, PvPortsState};
pub use serial::{IrqLine, SerialConsole, SerialPort, SerialStateData};
pub use thread_setup::{DeviceThread, ThreadSetup};
pub use unknown::UnknownAccesses;
pub use virtio::mmio::{VirtioError, VirtioMmio, VirtioMmioState};

use warmvm_abi::{SERIAL_PORT, SERIAL_PORT_LEN};
pub use warmvm_lifecycle::Pausable;

/// What the vCPU must do after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: resume the guest.
    None,
    /// Sleep until the timeout (µs; `u32::MAX` = none) or until a device has work.
    Wait { timeout_us: u32 },
    /// The guest powered off with this exit status.
    PowerOff { status: u32 },
    /// The guest shut itself down through the platform: ACPI S5 in PM1 control.
    Shutdown,
}

/// Counters of device activity, read by the API and metrics.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub serial_bytes_out: AtomicU64,
    pub power_requests: AtomicU64,
    /// Times the VMM pressed the ACPI power button.
    pub power_button_presses: AtomicU64,
    /// Times the guest entered S5 (powered off) through ACPI PM1 control.
    pub acpi_power_offs: AtomicU64,
    /// Times the guest asked for a sleep state other than S5 (ignored).
    pub acpi_sleeps_refused: AtomicU64,
    /// Times the VMM typed Ctrl-Alt-Del on the i8042.
    pub ctrl_alt_dels: AtomicU64,
    /// Times the guest sent the i8042 its CPU reset command.
    pub i8042_resets: AtomicU64,
}

/// The interrupt lines of the platform devices (none for a guest that takes no interrupts).
#[derive(Clone)]
pub struct PlatformIrqs {
    /// The ACPI SCI (`warmvm_abi::SCI_IRQ`).
    pub sci: IrqLine,
    /// The i8042's keyboard interrupt (IRQ 1).
    pub keyboard: IrqLine,
}

impl PlatformIrqs {
    pub fn none() -> Self {
        Self {
            sci: IrqLine::none(),
            keyboard: IrqLine::none(),
        }
    }
}

/// All devices of one VM, shared by its vCPU threads: a port bus (COM1, the paravirtual
/// ports, the ACPI PM1 blocks, the i8042) and an MMIO bus.
pub struct Devices {
    serial: Arc<Mutex<SerialConsole>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    i8042: Arc<Mutex<I8042>>,
    /// The virtio devices, in the order of their MMIO windows.
    virtio: Vec<Arc<Mutex<VirtioMmio>>>,
    pio: Bus,
    mmio: Bus,
    pub doorbell: Arc<Doorbell>,
    pub unknown: UnknownAccesses,
    pub counters: Arc<DeviceCounters>,
    vm_name: String,
}

impl Devices {
    pub fn new(vm_name: &str, serial: SerialConsole, irqs: PlatformIrqs) -> Self {
        let serial = Arc::new(Mutex::new(serial));
        let counters = Arc::new(DeviceCounters::default());
        let doorbell = Arc::new(Doorbell::default());
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(AcpiPmHandles {
            sci: irqs.sci,
            doorbell: doorbell.clone(),
            counters: counters.clone(),
        })));
        let i8042 = Arc::new(Mutex::new(I8042::new(I8042Handles {
            irq: irqs.keyboard,
            doorbell: doorbell.clone(),
            counters: counters.clone(),
        })));
        let mut pio = Bus::default();
        let placed = pio
            .insert(
                u64::from(SERIAL_PORT),
                u64::from(SERIAL_PORT_LEN),
                Arc::new(Mutex::new(SerialPort {
                    console: serial.clone(),
                    counters: counters.clone(),
                })),
            )
            .and_then(|()| {
                pio.insert(
                    u64::from(pv_ports::PV_PORTS_BASE),
                    u64::from(pv_ports::PV_PORTS_LEN),
                    Arc::new(Mutex::new(PvPorts::new(counters.clone()))),
                )
            })
            .and_then(|()| {
                pio.insert(
                    u64::from(acpi_pm::ACPI_PM_BASE),
                    u64::from(acpi_pm::ACPI_PM_LEN),
                    acpi_pm.clone(),
                )
            })
            .and_then(|()| {
                pio.insert(
                    u64::from(i8042::I8042_BASE),
                    u64::from(i8042::I8042_LEN),
                    i8042.clone(),
                )
            });
        // Fixed, disjoint port ranges: the insertions cannot fail.
        debug_assert!(placed.is_ok(), "{placed:?}");
        Self {
            serial,
            acpi_pm,
            i8042,
            virtio: Vec::new(),
            pio,
            mmio: Bus::default(),
            doorbell,
            unknown: UnknownAccesses::default(),
            counters,
            vm_name: vm_name.to_string(),
        }
    }

    /// Put an MMIO device at `base..base+len`.
    pub fn add_mmio(
        &mut self,
        base: u64,
        len: u64,
        device: bus::SharedDevice,
    ) -> Result<(), BusError> {
        self.mmio.insert(base, len, device)
    }

    /// Put a virtio device's register window at `base`.
    pub fn add_virtio(&mut self, base: u64, device: VirtioMmio) -> Result<(), BusError> {
        let device = Arc::new(Mutex::new(device));
        self.mmio
            .insert(base, virtio::mmio::MMIO_WINDOW, device.clone())?;
        self.virtio.push(device);
        Ok(())
    }

    fn each_virtio<T>(&self, mut f: impl FnMut(&mut VirtioMmio) -> T) -> Vec<T> {
        self.virtio
            .iter()
            .map(|d| f(&mut d.lock().unwrap_or_else(|p| p.into_inner())))
            .collect()
    }

    /// Duplicates of the virtio devices' host fds (image files, TAPs), in device order.
    pub fn virtio_host_files(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        self.each_virtio(|d| d.host_fd().try_clone_to_owned())
            .into_iter()
            .collect()
    }

    /// Each virtio device's standing and counters, in device order.
    pub fn virtio_info(&self) -> Vec<virtio::DeviceInfo> {
        self.each_virtio(|d| d.info())
    }

    /// Each virtio device's name (`disk0`, `net0`, ...), protocol failures (times the guest
    /// broke the protocol) and completed requests.
    pub fn virtio_counters(&self) -> Vec<(String, u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        self.each_virtio(|d| {
            let s = d.shared();
            let name = s.name.rsplit('/').next().unwrap_or_default().to_string();
            (
                name,
                s.counters.failures.load(Relaxed),
                s.counters.requests.load(Relaxed),
            )
        })
    }

    /// A port read. `last_wake` is what this vCPU's last wait ended with.
    pub fn pio_read(&self, port: u16, data: &mut [u8], last_wake: Wake) {
        if !self.pio.read(u64::from(port), data, Access { last_wake }) {
            data.fill(0xff);
            self.unknown.pio(&self.vm_name, port, data.len(), false);
        }
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
        self.pio.write(u64::from(port), data).unwrap_or_else(|| {
            self.unknown.pio(&self.vm_name, port, data.len(), true);
            IoAction::None
        })
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let access = Access {
            last_wake: Wake::Timeout,
        };
        if !self.mmio.read(addr, data, access) {
            data.fill(0xff);
            self.unknown.mmio(&self.vm_name, addr, data.len(), false);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> IoAction {
        self.mmio.write(addr, data).unwrap_or_else(|| {
            self.unknown.mmio(&self.vm_name, addr, data.len(), true);
            IoAction::None
        })
    }

    /// Flush console output to its log.
    pub fn flush(&self) {
        self.serial().flush();
    }

    /// The console's figures (bytes written, dropped, rotations).
    pub fn console_stats(&self) -> crate::console::ConsoleStats {
        self.serial().sink().stats()
    }

    /// A duplicate of the console log's fd, to hand to another VMM process.
    pub fn console_log_file(&self) -> Option<std::fs::File> {
        self.serial().sink().log_file()
    }

    /// Press the ACPI power button (the guest is asked to power off).
    pub fn press_power_button(&self) {
        self.acpi_pm().press_power_button();
    }

    /// The PM1 registers (the power button's part of [`DevicesState`]).
    pub fn acpi_pm_state(&self) -> AcpiPmState {
        self.acpi_pm().save()
    }

    /// Type Ctrl-Alt-Del on the i8042 (a guest without ACPI is asked to shut down). False
    /// if the guest has not read what it was typed before.
    pub fn press_ctrl_alt_del(&self) -> bool {
        self.i8042().press_ctrl_alt_del()
    }

    /// The i8042's part of [`DevicesState`].
    pub fn i8042_state(&self) -> I8042State {
        self.i8042().save()
    }

    fn i8042(&self) -> std::sync::MutexGuard<'_, I8042> {
        self.i8042.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acpi_pm(&self) -> std::sync::MutexGuard<'_, AcpiPm> {
        // As for the console: three registers, consistent between accesses.
        self.acpi_pm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, SerialConsole> {
        // A vCPU thread that panicked while holding the lock must not take the whole VM's
        // console down with it: the UART state is a handful of bytes, still consistent.
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The state of all of a VM's devices, in the order [`Devices`] loads it. The paravirtual
/// ports have none (see [`PvPortsState`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: SerialStateData,
    pub acpi_pm: AcpiPmState,
    pub i8042: I8042State,
    /// Each virtio device's transport, queue and device state, in window order.
    pub virtio: Vec<VirtioMmioState>,
}

/// A state [`Devices`] refused to load.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("VM {vm}: state for {saved} virtio devices, the VM has {here}")]
    VirtioCount {
        vm: String,
        saved: usize,
        here: usize,
    },
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error("VM {vm}: {err}")]
    AcpiPm {
        vm: String,
        #[source]
        err: AcpiPmError,
    },
    #[error("VM {vm}: {err}")]
    I8042 {
        vm: String,
        #[source]
        err: I8042Error,
    },
}

/// Every device at once, each through its own [`Persist`]. Implemented for `&Devices`
/// (each device sits behind its own lock, so a VM's shared devices load in place, the way
/// `&File` writes) and, delegating to it, for `Devices`.
impl Persist for &Devices {
    type State = DevicesState;
    type Error = DevicesError;

    /// Callers pause the virtio devices first ([`Pausable::pause`]), so that their queues
    /// are quiescent.
    fn save(&self) -> DevicesState {
        DevicesState {
            serial: self.serial().save(),
            acpi_pm: self.acpi_pm().save(),
            i8042: self.i8042().save(),
            virtio: self.each_virtio(|d| d.save()),
        }
    }

    /// Loaded only: the virtio devices serve from [`Pausable::resume`]. An error may
    /// leave the devices half loaded (each device checks its own state before it changes),
    /// so a VM whose load failed must never run (the handover fails and the old VMM keeps
    /// it; a snapshot restore drops the new VM).
    fn load(&mut self, state: &DevicesState) -> Result<(), DevicesError> {
        if state.virtio.len() != self.virtio.len() {
            return Err(DevicesError::VirtioCount {
                vm: self.vm_name.clone(),
                saved: state.virtio.len(),
                here: self.virtio.len(),
            });
        }
        for (d, s) in self.virtio.iter().zip(&state.virtio) {
            d.lock().unwrap_or_else(|p| p.into_inner()).load(s)?;
        }
        let vm = || self.vm_name.clone();
        self.acpi_pm()
            .load(&state.acpi_pm)
            .map_err(|err| DevicesError::AcpiPm { vm: vm(), err })?;
        self.i8042()
            .load(&state.i8042)
            .map_err(|err| DevicesError::I8042 { vm: vm(), err })?;
        let Ok(()) = self.serial().load(&state.serial);
        Ok(())
    }
}

/// The devices that work on their own (the virtio devices' workers); the port devices act
/// only when a vCPU accesses them, so a VM whose vCPUs are parked has them paused already.
impl Pausable for Devices {
    type Error = virtio::worker::WorkerError;

    /// Let every virtio device finish the requests it has in hand and stop (before a
    /// capture: the queues are then quiescent).
    fn pause(&self) -> Result<(), Self::Error> {
        self.each_virtio(|d| d.pause()).into_iter().collect()
    }

    /// Let every virtio device serve (again, or for the first time after a restore).
    fn resume(&self) -> Result<(), Self::Error> {
        self.each_virtio(|d| d.resume());
        Ok(())
    }
}

impl Persist for Devices {
    type State = DevicesState;
    type Error = DevicesError;

    fn save(&self) -> DevicesState {
        Persist::save(&self)
    }

    fn load(&mut self, state: &DevicesState) -> Result<(), DevicesError> {
        Persist::load(&mut &*self, state)
    }
}

crate::persist_tests!(
    all_devices_persist,
    tests::devices_with_state(),
    |_: &Devices| tests::devices()
);

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn devices() -> Devices {
        Devices::new(
            "t",
            SerialConsole::new(ConsoleSink::memory(), IrqLine::none()),
            PlatformIrqs::none(),
        )
    }

    /// Devices whose every state differs from power-on: a written UART scratch register,
    /// a pressed power button, keys typed on the i8042.
    pub(super) fn devices_with_state() -> Devices {
        let d = devices();
        d.pio_write(SERIAL_PORT + 7, &[0x5a]);
        d.press_power_button();
        assert!(d.press_ctrl_alt_del());
        d
    }

    #[test]
    fn a_state_a_device_refuses_names_the_vm_and_the_device_keeps_its_own() {
        let d = devices();
        let mut state = Persist::save(&devices_with_state());
        state.acpi_pm.pm1_cnt = warmvm_abi::PM1_CNT_SLP_EN;
        let before = Persist::save(&d);
        let err = Persist::load(&mut &d, &state).unwrap_err().to_string();
        assert!(err.starts_with("VM t: "), "{err}");
        assert_eq!(Persist::save(&d).acpi_pm, before.acpi_pm);
    }

    #[test]
    fn wait_and_power_ports_decode_32_bit_writes() {
        use warmvm_abi::{POWER_PORT, WAIT_PORT};
        let d = devices();
        assert_eq!(
            d.pio_write(WAIT_PORT, &500u32.to_le_bytes()),
            IoAction::Wait { timeout_us: 500 }
        );
        assert_eq!(
            d.pio_write(POWER_PORT, &3u32.to_le_bytes()),
            IoAction::PowerOff { status: 3 }
        );
    }

    #[test]
    fn heartbeat_writes_are_decoded_not_counted_as_unknown() {
        use warmvm_abi::HEARTBEAT_PORT;
        let d = devices();
        assert_eq!(d.pio_write(HEARTBEAT_PORT, &[1]), IoAction::None);
        assert_eq!(d.unknown.counts().pio_writes, 0);
        // Only the one-byte write is the heartbeat.
        assert_eq!(d.pio_write(HEARTBEAT_PORT, &[1, 2]), IoAction::None);
        assert_eq!(d.unknown.counts().pio_writes, 1);
    }

    #[test]
    fn odd_sized_and_unknown_accesses_are_counted_not_fatal() {
        use warmvm_abi::WAIT_PORT;
        let d = devices();
        assert_eq!(d.pio_write(WAIT_PORT, &[1]), IoAction::None);
        assert_eq!(d.pio_write(0x80, &[1]), IoAction::None);
        let mut buf = [0u8; 2];
        d.pio_read(0x3f8, &mut buf, Wake::Timeout);
        assert_eq!(buf, [0xff, 0xff]);
        d.mmio_write(0xd000_0000, &[0; 8]);
        let c = d.unknown.counts();
        assert_eq!((c.pio_writes, c.pio_reads, c.mmio_writes), (2, 1, 1));
    }

    #[test]
    fn the_power_button_is_on_the_port_bus_and_s5_shuts_down() {
        use warmvm_abi::{
            PM1A_CNT_PORT, PM1A_EVT_PORT, PM1_CNT_SLP_EN, PM1_CNT_SLP_TYP_SHIFT, PM1_STS_PWRBTN,
            SLP_TYP_S5,
        };
        let d = devices();
        d.press_power_button();
        let mut sts = [0u8; 2];
        d.pio_read(PM1A_EVT_PORT, &mut sts, Wake::Timeout);
        assert_eq!(u16::from_le_bytes(sts), PM1_STS_PWRBTN);
        let s5 = (SLP_TYP_S5 << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SLP_EN;
        assert_eq!(
            d.pio_write(PM1A_CNT_PORT, &s5.to_le_bytes()),
            IoAction::Shutdown
        );
        assert_eq!(d.unknown.counts().pio_reads, 0);
    }

    #[test]
    fn the_i8042_sits_on_0x60_and_0x64_and_leaves_0x61_unknown() {
        let d = devices();
        assert!(d.press_ctrl_alt_del());
        let mut b = [0u8];
        d.pio_read(0x64, &mut b, Wake::Timeout);
        assert_eq!(b[0] & 1, 1, "output buffer full");
        d.pio_read(0x60, &mut b, Wake::Timeout);
        assert_eq!(b[0], 0x14, "Ctrl's make code first");
        d.pio_read(0x61, &mut b, Wake::Timeout);
        assert_eq!(d.unknown.counts().pio_reads, 1);
        assert_eq!(d.pio_write(0x64, &[0xfe]), IoAction::Shutdown);
    }

    #[test]
    fn serial_output_reaches_the_sink() {
        let d = devices();
        for b in b"hi\n" {
            d.pio_write(SERIAL_PORT, &[*b]);
        }
        d.flush();
        assert_eq!(d.serial().sink().captured(), b"hi\n");
    }
}
