use std::sync::atomic::AtomicU8;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, Msrs, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::entry::CpuEntry;
use crate::kick::bind_immediate_exit;
use crate::{Error, Result};

/// Where a vCPU's port and MMIO accesses go. Implemented by the VMM's device buses: the
/// devices behind it never see KVM.
pub trait ExitHandler {
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    fn pio_write(&mut self, port: u16, data: &[u8]);
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A port access, already passed to the handler.
    Io,
    /// An MMIO access, already passed to the handler.
    Mmio,
    /// The guest executed HLT.
    Hlt,
    /// Triple fault or other shutdown: the guest is dead.
    Shutdown,
    /// The VMM kicked this vCPU (signal or immediate_exit).
    Interrupted,
    /// KVM could not handle something (e.g. an instruction its emulator lacks).
    InternalError { suberror: u32 },
    /// VM entry failed.
    FailEntry { reason: u64 },
    /// The guest requested a reset, shutdown or crash through the platform.
    SystemEvent { kind: u32 },
    /// An exit warmvm does not handle, with KVM's exit reason.
    Unhandled { reason: u32 },
}

/// One KVM vCPU. `run` needs `&mut self`: a vCPU belongs to the thread that runs it.
pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    pub(crate) id: u32,
    /// The CPUID this vCPU was given: KVM cannot be asked for it while the vCPU runs, and
    /// a handover gives the next VMM exactly this.
    pub(crate) cpuid: Vec<kvm_cpuid_entry2>,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u32, cpuid: Vec<kvm_cpuid_entry2>) -> Self {
        Self { fd, id, cpuid }
    }

    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Put the vCPU in the state a boot protocol prescribes.
    pub fn set_entry_state(&self, entry: &CpuEntry) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(Error::GetSregs)?;
        entry.sregs.apply(&mut sregs);
        self.fd.set_sregs(&sregs).map_err(Error::SetSregs)?;
        self.fd.set_regs(&entry.regs).map_err(Error::SetRegs)?;
        // x87 and SSE control words as after FNINIT / reset, so guest SSE code works.
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(Error::SetFpu)?;
        let entries: Vec<kvm_msr_entry> = entry
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::PartialMsrWrite {
            written: 0,
            wanted: entries.len(),
        })?;
        let written = self.fd.set_msrs(&msrs).map_err(Error::SetMsrs)?;
        if written != entries.len() {
            return Err(Error::PartialMsrWrite {
                written,
                wanted: entries.len(),
            });
        }
        // With an in-kernel LAPIC, KVM keeps every vCPU but the bootstrap processor in
        // UNINITIALIZED, waiting for INIT/SIPI, and blocks it in KVM_RUN. A vCPU given its
        // entry state directly has been started by the VMM, so it must be runnable.
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(Error::SetState("MP_STATE"))?;
        Ok(())
    }

    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(Error::GetRegs)
    }

    /// The TSC frequency KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Result<u32> {
        self.fd.get_tsc_khz().map_err(Error::GetTscKhz)
    }

    /// Make the calling thread's kick signal stop this vCPU. Call once, on the thread that
    /// will call [`Vcpu::run`], before the first run; call [`Vcpu::unbind_thread`] before the
    /// vCPU is dropped.
    pub fn bind_to_current_thread(&mut self) {
        let ptr = &self.fd.get_kvm_run().immediate_exit as *const u8 as *const AtomicU8;
        bind_immediate_exit(ptr);
    }

    pub fn unbind_thread(&self) {
        bind_immediate_exit(std::ptr::null());
    }

    /// Enter the guest until its next exit. Port and MMIO exits are passed to `handler`
    /// before returning, so their results are in place when the vCPU next runs.
    pub fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<Exit> {
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                handler.pio_read(port, data);
                Exit::Io
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                handler.pio_write(port, data);
                Exit::Io
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                handler.mmio_read(addr, data);
                Exit::Mmio
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                handler.mmio_write(addr, data);
                Exit::Mmio
            }
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(VcpuExit::InternalError) => Exit::InternalError {
                suberror: self.internal_suberror(),
            },
            Ok(VcpuExit::FailEntry(reason, _)) => Exit::FailEntry { reason },
            Ok(VcpuExit::SystemEvent(kind, _)) => Exit::SystemEvent { kind },
            Ok(_) => Exit::Unhandled {
                reason: self.fd.get_kvm_run().exit_reason,
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => return Err(Error::Run(e)),
        };
        if exit == Exit::Interrupted {
            self.fd.set_kvm_immediate_exit(0);
        }
        Ok(exit)
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM fills the `internal` member of the exit union for
        // KVM_EXIT_INTERNAL_ERROR, which is the exit being reported.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}

impl Vcpu {
    /// Complete an access that exited to the VMM without running guest code: KVM finishes
    /// the pending port or MMIO instruction when KVM_RUN is entered, and with
    /// `immediate_exit` set returns right after. Needed before the vCPU's state is read or
    /// the thread parks, or the guest would repeat or lose the access.
    pub fn complete_pending_io(&mut self) -> Result<()> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(drop);
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(Error::Run(e)),
            Ok(()) => Ok(()),
        }
    }
}
