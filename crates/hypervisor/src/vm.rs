use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_cpuid_entry2, kvm_enable_cap,
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
pub use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

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
    /// Every memory slot as it was registered (flags aside), so that dirty logging can be
    /// switched on and off by registering it again.
    slots: Mutex<Vec<kvm_userspace_memory_region>>,
    /// Dirty logging is on for every slot.
    logging: AtomicBool,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled: KVM_GET_DIRTY_LOG leaves pages
    /// write-enabled and the log set until KVM_CLEAR_DIRTY_LOG.
    manual_protect: AtomicBool,
}

/// A page size of 4 KiB: the unit of KVM's dirty log.
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// One memory slot as registered: its number, guest address and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
}

impl MemorySlot {
    /// Pages in the slot, one bit each in its dirty log.
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(DIRTY_PAGE_SIZE)
    }
}

impl Vm {
    pub(crate) fn new(fd: VmFd, supported_cpuid: CpuId, max_memslots: usize) -> Self {
        Self {
            fd,
            supported_cpuid,
            max_memslots,
            irqchip: false,
            slots: Mutex::new(Vec::new()),
            logging: AtomicBool::new(false),
            manual_protect: AtomicBool::new(false),
        }
    }

    fn slot_table(&self) -> std::sync::MutexGuard<'_, Vec<kvm_userspace_memory_region>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut slots = self.slot_table();
        let flags = if self.logging.load(Ordering::Acquire) {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the VM's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|err| Error::SetMemoryRegion { slot, err })?;
        slots.retain(|r| r.slot != slot);
        slots.push(region);
        Ok(())
    }

    /// Every memory slot registered, in slot order.
    pub fn memory_slots(&self) -> Vec<MemorySlot> {
        let mut slots: Vec<MemorySlot> = self
            .slot_table()
            .iter()
            .map(|r| MemorySlot {
                slot: r.slot,
                guest_addr: r.guest_phys_addr,
                size: r.memory_size,
            })
            .collect();
        slots.sort_by_key(|s| s.slot);
        slots
    }

    /// Start logging the guest's writes to every memory slot (re-registering each with
    /// `KVM_MEM_LOG_DIRTY_PAGES`). Where KVM offers KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 it is
    /// enabled first (once per VM), so that [`Vm::dirty_log`] re-protects exactly the pages
    /// it reports. Until the next [`Vm::dirty_log`] every page written from now on is
    /// reported; pages written before are not. Idempotent.
    pub fn start_dirty_log(&self) -> Result<()> {
        self.start_dirty_log_as(true)
    }

    /// [`Vm::start_dirty_log`], with `manual` false to keep KVM's classic log (get and
    /// clear in one call) where the capability exists: what a host without it does.
    #[doc(hidden)]
    pub fn start_dirty_log_as(&self, manual: bool) -> Result<()> {
        if manual
            && !self.manual_protect.load(Ordering::Acquire)
            && self
                .fd
                .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
                & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32
                != 0
        {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            // ENABLE without INITIALLY_SET: switching the log on write-protects every page
            // and starts with an empty log, as without the capability.
            cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            self.fd
                .enable_cap(&cap)
                .map_err(|e| Error::EnableCap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", e))?;
            self.manual_protect.store(true, Ordering::Release);
        }
        self.set_logging(true)
    }

    /// Stop logging writes (a migration that ended at this side, whichever way).
    pub fn stop_dirty_log(&self) -> Result<()> {
        self.set_logging(false)
    }

    /// Whether writes are being logged.
    pub fn dirty_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    /// Whether KVM_CLEAR_DIRTY_LOG is in use (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    pub fn manual_dirty_protect(&self) -> bool {
        self.manual_protect.load(Ordering::Acquire)
    }

    fn set_logging(&self, on: bool) -> Result<()> {
        let slots = self.slot_table();
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for r in slots.iter() {
            let region = kvm_userspace_memory_region { flags, ..*r };
            // SAFETY: the same host range `map_memory` registered, whose caller guaranteed
            // that it stays mapped for the VM's lifetime; only the flags change.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|err| Error::SetMemoryRegion { slot: r.slot, err })?;
        }
        self.logging.store(on, Ordering::Release);
        Ok(())
    }

    /// The pages of `slot` the guest has written since logging started or since the last
    /// call, one bit per 4 KiB page (bit `i % 64` of word `i / 64` for page `i`), and the
    /// log emptied: with manual protection, KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG of
    /// exactly those pages (re-protecting them); without, KVM_GET_DIRTY_LOG alone does both.
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>> {
        let size = self
            .slot_table()
            .iter()
            .find(|r| r.slot == slot)
            .map(|r| r.memory_size)
            .ok_or(Error::NoSuchSlot(slot))?;
        let bitmap = self
            .fd
            .get_dirty_log(slot, size as usize)
            .map_err(|err| Error::GetDirtyLog { slot, err })?;
        if self.manual_protect.load(Ordering::Acquire) {
            let pages = size.div_ceil(DIRTY_PAGE_SIZE);
            self.clear_dirty_log(slot, 0, pages, &bitmap)?;
        }
        Ok(bitmap)
    }

    /// KVM_CLEAR_DIRTY_LOG: clear the log bits of `slot` set in `bitmap` for the `pages`
    /// pages from `first_page` (a multiple of 64), re-protecting those pages so that the
    /// guest's next write to each is logged again. Only with manual protection enabled.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        pages: u64,
        bitmap: &[u64],
    ) -> Result<()> {
        let bad = |what: &'static str| Error::BadState(what);
        if !first_page.is_multiple_of(64) {
            return Err(bad("dirty log clear must start at a multiple of 64 pages"));
        }
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(bad("dirty log bitmap shorter than the pages to clear"));
        }
        let num_pages = u32::try_from(pages).map_err(|_| bad("too many pages to clear"))?;
        let mut bits = bitmap.to_vec();
        let clear = kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bits.as_mut_ptr().cast(),
            },
        };
        // SAFETY: a VM fd; `clear` points at `bits`, which holds at least one bit per page
        // of the range (checked above) and outlives the call; KVM only reads it.
        let rc =
            unsafe { ioctl_with_ref(&self.fd, crate::ioctl_numbers::clear_dirty_log(), &clear) };
        if rc < 0 {
            return Err(Error::ClearDirtyLog {
                slot,
                err: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_regs, kvm_segment};

    use crate::{CpuEntry, CpuidOptions, ExitHandler, Hypervisor, Segments, SystemRegisters};

    const RAM: usize = 4 << 20;
    /// Set A: every other page from 2 MiB; set B: every third page from 3 MiB.
    const A: (u64, u64, u64) = (0x20_0000, 0x2000, 40);
    const B: (u64, u64, u64) = (0x30_0000, 0x3000, 30);

    /// Remembers the port of the last OUT.
    struct Ports(Option<u16>);
    impl ExitHandler for Ports {
        fn pio_read(&mut self, _: u16, _: &mut [u8]) {}
        fn pio_write(&mut self, port: u16, _: &[u8]) {
            self.0 = Some(port);
        }
        fn mmio_read(&mut self, _: u64, _: &mut [u8]) {}
        fn mmio_write(&mut self, _: u64, _: &[u8]) {}
    }

    /// Guest code: write one qword into each page of (start, stride, count), OUT to `port`.
    fn sweep(code: &mut Vec<u8>, (start, stride, count): (u64, u64, u64), port: u8) {
        code.extend_from_slice(&[0x48, 0xc7, 0xc7]); // mov rdi, start
        code.extend_from_slice(&(start as u32).to_le_bytes());
        code.push(0xb9); // mov ecx, count
        code.extend_from_slice(&(count as u32).to_le_bytes());
        let top = code.len();
        code.extend_from_slice(&[0x48, 0x89, 0x3f]); // mov [rdi], rdi
        code.extend_from_slice(&[0x48, 0x81, 0xc7]); // add rdi, stride
        code.extend_from_slice(&(stride as u32).to_le_bytes());
        code.extend_from_slice(&[0xff, 0xc9]); // dec ecx
        let rel = top as i64 - (code.len() as i64 + 2);
        code.extend_from_slice(&[0x75, rel as u8]); // jnz top
        code.extend_from_slice(&[0xe6, port]); // out port, al
    }

    fn pages((start, stride, count): (u64, u64, u64)) -> Vec<u64> {
        (0..count).map(|i| (start + i * stride) / 4096).collect()
    }

    fn set_pages(bitmap: &[u64]) -> Vec<u64> {
        (0..bitmap.len() as u64 * 64)
            .filter(|p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    }

    /// The pages of the ring-3 set-up below that the CPU itself may write (accessed and
    /// dirty bits of the page tables; the GDT's and TSS's busy bits).
    const SYSTEM_PAGES: [u64; 7] = [0, 1, 2, 3, 6, 7, 8];

    /// Minimal ring-3 guest in `mem`: identity-mapped 2 MiB user pages, a GDT with user
    /// segments and a TSS whose I/O bitmap admits every port, code at 0x10000.
    fn ring3_guest(mem: &mut [u8], code: &[u8]) -> CpuEntry {
        let put =
            |mem: &mut [u8], at: usize, v: u64| mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(mem, 0x1000, 0x2000 | 7);
        put(mem, 0x2000, 0x3000 | 7);
        put(mem, 0x3000, 0x87);
        put(mem, 0x3008, 0x20_0000 | 0x87);
        let (tss, tss_limit) = (0x6000u64, 104u64 + 8192);
        let tss_desc = (tss_limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x8b << 40)
            | (((tss_limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        for (i, d) in [
            0,
            0x0020_9a00_0000_0000,
            0x0000_9200_0000_0000,
            0x0020_fa00_0000_0000,
            0x0000_f200_0000_0000,
            tss_desc,
            0,
        ]
        .into_iter()
        .enumerate()
        {
            put(mem, 0x500 + i * 8, d);
        }
        mem[0x6000 + 102..0x6000 + 104].copy_from_slice(&104u16.to_le_bytes());
        mem[(tss + tss_limit) as usize] = 0xff;
        mem[0x10000..0x10000 + code.len()].copy_from_slice(code);
        let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 3,
            s: 1,
            l,
            db,
            g: 1,
            ..Default::default()
        };
        let tr = kvm_segment {
            base: tss,
            limit: tss_limit as u32,
            selector: 0x28,
            type_: 11,
            present: 1,
            ..Default::default()
        };
        CpuEntry {
            regs: kvm_regs {
                rip: 0x10000,
                rflags: 2,
                ..Default::default()
            },
            sregs: SystemRegisters {
                segments: Segments::flat(seg(0x1b, 11, 1, 0), seg(0x23, 3, 0, 1), tr),
                gdt: kvm_bindings::kvm_dtable {
                    base: 0x500,
                    limit: 7 * 8 - 1,
                    ..Default::default()
                },
                idt: Default::default(),
                cr0: 0x8005_0033,
                cr3: 0x1000,
                cr4: 0x620,
                efer: 0x500,
            },
            msrs: [(0x1a0, 1)],
        }
    }

    #[test]
    fn the_dirty_log_reports_exactly_the_pages_the_guest_wrote_and_clears() {
        let test = "the_dirty_log_reports_exactly_the_pages_the_guest_wrote_and_clears";
        if !crate::hypervisor::kvm::kvm_available(test) {
            return;
        }
        // With KVM_CLEAR_DIRTY_LOG, and as on a host without it.
        for manual in [true, false] {
            dirty_log_round_trip(test, manual);
        }
    }

    fn dirty_log_round_trip(test: &str, manual: bool) {
        let hv = Hypervisor::open().unwrap();
        // SAFETY: a new private anonymous mapping; unmapped at the end of the test, after
        // the VM (and so KVM's use of it) is gone.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        // SAFETY: the mapping above, RAM bytes, used through this slice and by the guest.
        let mem = unsafe { std::slice::from_raw_parts_mut(host.cast::<u8>(), RAM) };
        let mut code = Vec::new();
        sweep(&mut code, A, 0x80);
        sweep(&mut code, B, 0x81);
        code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
        let entry = ring3_guest(mem, &code);
        {
            let mut vm = hv.create_vm().unwrap();
            // SAFETY: the mapping lives until after `vm` is dropped (end of this block).
            unsafe { vm.map_memory(0, 0, RAM as u64, host as u64) }.unwrap();
            vm.create_irqchip().unwrap();
            let mut vcpu = vm.create_vcpu(0, 1, &CpuidOptions::default()).unwrap();
            vcpu.set_entry_state(&entry).unwrap();
            vm.start_dirty_log_as(manual).unwrap();
            assert!(vm.dirty_logging());
            if !manual {
                assert!(!vm.manual_dirty_protect());
            }
            let slot = vm.memory_slots()[0];
            assert_eq!(slot.pages(), (RAM / 4096) as u64);
            let run_to = |vcpu: &mut crate::Vcpu, port: u16| {
                let mut ports = Ports(None);
                for _ in 0..1000 {
                    let exit = vcpu.run(&mut ports).unwrap();
                    if ports.0 == Some(port) {
                        return;
                    }
                    assert!(
                        matches!(exit, crate::Exit::Io | crate::Exit::Interrupted),
                        "{exit:?}"
                    );
                }
                panic!("the guest never reached port {port:#x}");
            };
            let beyond_system = |bits: &[u64]| -> Vec<u64> {
                set_pages(bits)
                    .into_iter()
                    .filter(|p| !SYSTEM_PAGES.contains(p))
                    .collect()
            };

            run_to(&mut vcpu, 0x80);
            // The VMM writes a page itself: KVM does not log that (the VMM tracks its own).
            mem[0x25_1000] = 1;
            let first = vm.dirty_log(0).unwrap();
            assert_eq!(beyond_system(&first), pages(A), "set A exactly");

            // The log was emptied: only what the guest writes next shows.
            run_to(&mut vcpu, 0x81);
            let second = vm.dirty_log(0).unwrap();
            assert_eq!(beyond_system(&second), pages(B), "set B exactly, A cleared");
            let third = vm.dirty_log(0).unwrap();
            assert_eq!(
                beyond_system(&third),
                Vec::<u64>::new(),
                "nothing written since"
            );
            eprintln!(
                "{test}: manual protect (KVM_CLEAR_DIRTY_LOG) {}",
                vm.manual_dirty_protect()
            );
            vm.stop_dirty_log().unwrap();
            assert!(!vm.dirty_logging());
        }
        // SAFETY: the VM that used the mapping is gone.
        unsafe { libc::munmap(host, RAM) };
    }
}
