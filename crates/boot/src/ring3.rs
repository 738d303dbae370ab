//! warmvm's ring-3 direct entry.
//!
//! The VMM does what a guest kernel's early boot would do (page tables, GDT, TSS) and starts
//! every vCPU directly at CPL3 in 64-bit mode. The TSS carries an I/O permission bitmap that
//! allows every port: this KVM ignores RFLAGS.IOPL and checks only the bitmap, and letting
//! every access exit means the VMM sees (and counts) accesses to ports it does not emulate
//! instead of the guest dying of a #GP it cannot handle. Nothing runs in ring 0, so no
//! interrupt or exception is ever needed.

use std::io::Cursor;

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::GuestAddress;
use warmvm_abi::{layout, BootInfo, MAX_RAM_RANGES, MAX_VCPUS};

use crate::x86::*;
use crate::{
    BootError, BootPlan, CmdlineError, CpuEntry, LoadError, Protocol, RamRange, Result,
    SystemRegisters,
};

const SEL_USER_CODE: u16 = 0x18 | 3;
const SEL_USER_DATA: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;

/// Everything the ring-3 entry needs to know about the VM.
pub struct Ring3Params<'a> {
    pub image: &'a [u8],
    pub cmdline: &'a str,
    pub ram: &'a [RamRange],
    pub vcpus: u32,
    pub tsc_khz: u64,
    /// The host CPU has FSGSBASE: let the guest use RDFSBASE/WRFSBASE.
    pub fsgsbase: bool,
    /// How many virtio-mmio windows the VM has from `warmvm_abi::VIRTIO_MMIO_BASE`.
    pub virtio_devices: u32,
}

/// Load the reference guest (an ELF linked above 1 MiB) and prepare the ring-3 entry of
/// every vCPU.
pub fn setup(mem: &GuestMemoryMmap, p: &Ring3Params) -> Result<BootPlan> {
    if p.vcpus == 0 || p.vcpus as usize > MAX_VCPUS {
        return Err(BootError::TooManyVcpus {
            vcpus: p.vcpus,
            max: MAX_VCPUS as u32,
        });
    }
    if p.ram.is_empty() || p.ram.len() > MAX_RAM_RANGES || p.ram[0].start != 0 {
        return Err(BootError::Load(LoadError::RamRanges));
    }
    if p.cmdline.len() as u64 >= layout::CMDLINE_MAX || p.cmdline.contains('\0') {
        return Err(BootError::Cmdline(CmdlineError::Ring3 {
            max: layout::CMDLINE_MAX,
        }));
    }
    let ram_size: u64 = p.ram.iter().map(|r| r.len).sum();
    let ram_end = p.ram.last().map(RamRange::end).unwrap_or(0);

    // The image goes in first: the VMM's own structures are written afterwards, so an image
    // that strays below 1 MiB cannot corrupt them.
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(p.image),
        Some(GuestAddress(layout::IMAGE_ADDR)),
    )
    .map_err(|e| BootError::BadElf(e.into()))?;
    let free_start = loaded.kernel_end.next_multiple_of(0x1000);
    if free_start + 0x1000 > p.ram[0].end() {
        return Err(BootError::RamTooSmall {
            ram_mib: ram_size >> 20,
            need_mib: (free_start >> 20) + 1,
        });
    }

    if p.virtio_devices > warmvm_abi::MAX_VIRTIO_DEVICES {
        return Err(BootError::Load(LoadError::TooManyVirtioDevices {
            devices: p.virtio_devices,
            max: warmvm_abi::MAX_VIRTIO_DEVICES,
        }));
    }
    // The guest drives its virtio devices from ring 3: their windows must be mapped too
    // (accesses outside every memory slot exit to the VMM as MMIO).
    let map_end = if p.virtio_devices > 0 {
        ram_end.max(
            warmvm_abi::VIRTIO_MMIO_BASE
                + u64::from(p.virtio_devices) * warmvm_abi::VIRTIO_MMIO_STRIDE,
        )
    } else {
        ram_end
    };
    identity_page_tables(
        mem,
        layout::PAGE_TABLES_ADDR,
        layout::PAGE_TABLES_END,
        map_end,
        PTE_USER,
    )?;

    let tss_limit = (layout::TSS_SIZE - 1) as u32;
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 0x08: kernel code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // 0x10: kernel data
        gdt_entry(0xa0fb, 0, 0xfffff), // 0x18: user code, 64-bit, DPL 3
        gdt_entry(0xc0f3, 0, 0xfffff), // 0x20: user data, DPL 3
        gdt_entry(0x008b, layout::TSS_ADDR as u32, tss_limit), // 0x28: busy 64-bit TSS
        layout::TSS_ADDR >> 32,        // upper half of the TSS descriptor
    ];
    write_u64s(mem, layout::GDT_ADDR, &gdt)?;

    // TSS: RSP0 (never used: nothing enters ring 0), I/O map base at 104, an all-zero bitmap
    // (every port allowed) and the 0xff byte that must end it.
    let mut tss = vec![0u8; layout::TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&layout::STACKS_TOP.to_le_bytes());
    tss[102..104].copy_from_slice(&104u16.to_le_bytes());
    tss[(layout::TSS_SIZE - 1) as usize] = 0xff;
    write_bytes(mem, layout::TSS_ADDR, &tss)?;

    let mut cmdline = p.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write_bytes(mem, layout::CMDLINE_ADDR, &cmdline)?;
    write_bytes(
        mem,
        layout::STATUS_ADDR,
        &vec![0u8; layout::STATUS_SIZE as usize],
    )?;

    let mut info = BootInfo {
        magic: warmvm_abi::BOOTINFO_MAGIC,
        version: warmvm_abi::BOOTINFO_VERSION,
        size: std::mem::size_of::<BootInfo>() as u32,
        ram_size,
        tsc_khz: p.tsc_khz,
        vcpu_count: p.vcpus,
        ram_range_count: p.ram.len() as u32,
        cmdline_addr: layout::CMDLINE_ADDR,
        cmdline_len: p.cmdline.len() as u64,
        status_addr: layout::STATUS_ADDR,
        status_size: layout::STATUS_SIZE,
        free_start,
        serial_port: warmvm_abi::SERIAL_PORT,
        wait_port: warmvm_abi::WAIT_PORT,
        power_port: warmvm_abi::POWER_PORT,
        virtio_mmio_base: if p.virtio_devices > 0 {
            warmvm_abi::VIRTIO_MMIO_BASE
        } else {
            0
        },
        virtio_mmio_count: p.virtio_devices,
        ..Default::default()
    };
    for (slot, r) in info.ram_ranges.iter_mut().zip(p.ram) {
        *slot = warmvm_abi::RamRange {
            start: r.start,
            len: r.len,
        };
    }
    write_bytes(mem, layout::BOOTINFO_ADDR, bootinfo_bytes(&info))?;

    let sregs = system_registers(gdt, p.fsgsbase);
    let entries = (0..p.vcpus)
        .map(|i| CpuEntry {
            regs: kvm_regs {
                rip: loaded.kernel_load.0,
                rsp: layout::STACKS_TOP - u64::from(i) * layout::STACK_SIZE,
                rdi: layout::BOOTINFO_ADDR,
                rsi: u64::from(i),
                rflags: 0x2,
                ..Default::default()
            },
            sregs,
            msrs: [(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)],
        })
        .collect();
    Ok(BootPlan {
        entries,
        status_addr: Some(GuestAddress(layout::STATUS_ADDR)),
        protocol: Protocol::Ring3,
    })
}

fn system_registers(gdt: [u64; 7], fsgsbase: bool) -> SystemRegisters {
    let code = segment_from_gdt(gdt[3], SEL_USER_CODE);
    let data = segment_from_gdt(gdt[4], SEL_USER_DATA);
    let tr = kvm_segment {
        base: layout::TSS_ADDR,
        limit: (layout::TSS_SIZE - 1) as u32,
        selector: SEL_TSS,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    SystemRegisters {
        segments: Segments::flat(code, data, tr),
        gdt: kvm_dtable {
            base: layout::GDT_ADDR,
            limit: (gdt.len() * 8 - 1) as u16,
            ..Default::default()
        },
        idt: kvm_dtable::default(),
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG,
        cr3: layout::PAGE_TABLES_ADDR,
        cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | if fsgsbase { CR4_FSGSBASE } else { 0 },
        efer: EFER_LME | EFER_LMA,
    }
}

fn bootinfo_bytes(info: &BootInfo) -> &[u8] {
    // SAFETY: BootInfo is #[repr(C)], made only of integers, with explicit padding fields and
    // a size that is a multiple of its alignment, so every byte is initialised; the slice
    // borrows `info` and cannot outlive it.
    unsafe {
        std::slice::from_raw_parts(
            (info as *const BootInfo).cast::<u8>(),
            std::mem::size_of::<BootInfo>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn ram(mib: u64) -> (GuestMemoryMmap, Vec<RamRange>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)])
            .expect("anonymous test memory");
        (
            mem,
            vec![RamRange {
                start: 0,
                len: mib << 20,
            }],
        )
    }

    #[test]
    fn garbage_image_is_refused() {
        let (mem, ram) = ram(8);
        let p = Ring3Params {
            image: b"definitely not an ELF file",
            cmdline: "",
            ram: &ram,
            vcpus: 1,
            tsc_khz: 1,
            fsgsbase: false,
            virtio_devices: 0,
        };
        assert!(matches!(setup(&mem, &p), Err(BootError::BadElf(_))));
    }

    #[test]
    fn too_many_vcpus_are_refused() {
        let (mem, ram) = ram(8);
        let p = Ring3Params {
            image: &[],
            cmdline: "",
            ram: &ram,
            vcpus: MAX_VCPUS as u32 + 1,
            tsc_khz: 1,
            fsgsbase: false,
            virtio_devices: 0,
        };
        assert!(matches!(
            setup(&mem, &p),
            Err(BootError::TooManyVcpus { .. })
        ));
    }

    #[test]
    fn page_tables_map_all_ram_as_user_pages() {
        let (mem, _) = ram(8);
        identity_page_tables(&mem, 0x10000, 0x80000, 3 << 30, PTE_USER).unwrap();
        let pml4e: u64 = mem.read_obj(GuestAddress(0x10000)).unwrap();
        assert_eq!(pml4e, 0x11000 | 7);
        // Third GiB, last 2 MiB page.
        let pde: u64 = mem
            .read_obj(GuestAddress(0x12000 + 2 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(pde, ((3u64 << 30) - (2 << 20)) | 0x87);
    }
}
