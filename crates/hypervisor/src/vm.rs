use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
pub use vmm_sys_util::eventfd::EventFd;

use crate::{CpuidOptions, Error, Result, Vcpu};

/// Where KVM may put its real-mode TSS (three pages), at the top of the MMIO hole so it
/// never overlaps RAM.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// A KVM virtual machine.
pub struct Vm {
    pub(crate) fd: VmFd,
    supported_cpuid: CpuId,
    max_memslots: usize,
    irqchip: bool,
}

impl Vm {
    pub(crate) fn new(fd: VmFd, supported_cpuid: CpuId, max_memslots: usize) -> Self {
        Self {
            fd,
            supported_cpuid,
            max_memslots,
            irqchip: false,
        }
    }

    /// Map `size` bytes of host memory at `host_addr` into the guest at `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must be a mapping that stays valid, and is not unmapped,
    /// for as long as this VM exists (KVM keeps using it).
    pub unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        if slot as usize >= self.max_memslots {
            return Err(Error::SetMemoryRegion {
                slot,
                err: kvm_ioctls::Error::new(libc::ENOSPC),
            });
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the VM's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|err| Error::SetMemoryRegion { slot, err })
    }

    /// Create the in-kernel PIC, IOAPIC and local APICs (and KVM's TSS area first, which
    /// Intel hosts need before any vCPU runs).
    pub fn create_irqchip(&mut self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(Error::SetTssAddr)?;
        self.fd.create_irq_chip().map_err(Error::CreateIrqchip)?;
        self.irqchip = true;
        Ok(())
    }

    /// Create the in-kernel i8254 timer (Linux guests calibrate against it).
    pub fn create_pit(&self) -> Result<()> {
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(config).map_err(Error::CreatePit)
    }

    /// Return an eventfd that raises `gsi` on the in-kernel irqchip when written.
    pub fn irq_line(&self, gsi: u32) -> Result<EventFd> {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(Error::RegisterIrqfd)?;
        Ok(evt)
    }

    /// Let guest writes of `datamatch` (32-bit) to MMIO address `addr` signal `evt` inside
    /// KVM, without an exit to the VMM (a virtio queue notification).
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(|err| Error::RegisterIoevent { addr, err })
    }

    /// Undo [`Vm::register_mmio_ioevent`] (a device that is reset or removed).
    pub fn unregister_mmio_ioevent(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .unregister_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(|err| Error::RegisterIoevent { addr, err })
    }

    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Create vCPU `id` with the CPUID `options` ask for.
    pub fn create_vcpu(&self, id: u32, vcpu_count: u32, options: &CpuidOptions) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|err| Error::CreateVcpu { id, err })?;
        let cpuid = options.build(&self.supported_cpuid, id, vcpu_count);
        fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
        let vcpu = Vcpu::new(fd, id, cpuid.as_slice().to_vec());
        vcpu.probe_saveable_msrs();
        Ok(vcpu)
    }

    /// Create vCPU `id` with exactly the CPUID a previous VMM gave it.
    pub fn create_vcpu_with_cpuid(&self, id: u32, entries: &[kvm_cpuid_entry2]) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|err| Error::CreateVcpu { id, err })?;
        let cpuid = CpuId::from_entries(entries).map_err(|_| Error::BadState("CPUID too long"))?;
        fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
        let vcpu = Vcpu::new(fd, id, entries.to_vec());
        vcpu.probe_saveable_msrs();
        Ok(vcpu)
    }
}
